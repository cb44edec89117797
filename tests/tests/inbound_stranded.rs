//! Inbound is never stranded: a meshed server (an app that bound a wildcard address in an
//! enrolled pod) stays reachable from other pods whatever happens to the agent, and an agent
//! that comes back captures it again, all without the app restarting.
//!
//! Each test runs the same cast: a server pod with an IPv4 app on `0.0.0.0:8080` and a
//! dual-stack app on `[::]:8443`, reached from a client pod over IPv4 and IPv6 (and over IPv4
//! on the dual-stack app). The apps are started once and never restarted. Every connection
//! must complete an echo round trip with the app seeing the real client (accept() and
//! getpeername()), whether it went through the agent (the app's end is then on the pod's
//! loopback) or directly (the app's end is the pod's own address).
//!
//! Tier: the default (`--fast-path auto`); inbound peers are never on the kernel tier.
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{client_loop, counter, StopOnDrop, T};
use sockmesh_tests::*;

/// The bound the tests set (the agent's minimum is 500 ms, its default 2 s).
const BOUND: &str = "1s";
/// How long after the agent changed state a test waits for the datapath to follow: the bound
/// plus a generous margin for a loaded CI machine (the test only fails past it).
const WITHIN: Duration = Duration::from_secs(6);
const V4_PORT: u16 = 8080;
const DUAL_PORT: u16 = 8443;

/// How a connection reached the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Agent,
    Direct,
}

/// The pods. The apps start once an agent runs (except where a test says otherwise), as apps
/// usually do.
struct Scene {
    _cluster: Cluster,
    client: Pod,
    server: Pod,
}

/// The apps of the server pod, never restarted in a test.
struct Apps {
    v4: TcpServer,
    dual: TcpServer,
}

impl Scene {
    fn new() -> Scene {
        require_root();
        let cluster = Cluster::new().expect("cluster");
        let client = cluster.add_pod("client").expect("pod");
        let server = cluster.add_pod("server").expect("pod");
        Scene {
            _cluster: cluster,
            client,
            server,
        }
    }

    fn spec(&self) -> String {
        pod_spec(&self.server, "")
    }

    fn start_apps(&self) -> Apps {
        Apps {
            v4: app(&self.server, "0.0.0.0:8080"),
            dual: app(&self.server, "[::]:8443"),
        }
    }

    /// Every destination with the app serving it: IPv4, IPv6, and IPv4 to the dual-stack app.
    fn targets<'a>(&self, apps: &'a Apps) -> [(SocketAddr, &'a TcpServer); 3] {
        [
            (self.server.addr4(V4_PORT), &apps.v4),
            (self.server.addr6(DUAL_PORT), &apps.dual),
            (self.server.addr4(DUAL_PORT), &apps.dual),
        ]
    }

    /// Every destination reached through `want`, once each.
    fn all_reach(&self, apps: &Apps, want: Path) {
        for (dst, app) in self.targets(apps) {
            assert_eq!(reach(&self.client, dst, app), Ok(want), "{dst}");
        }
    }

    /// Waits until every destination is reached through `want`, failing `within` after
    /// `since`; then checks it stays so. Attempts before that may fail or take the other path.
    fn until(&self, apps: &Apps, want: Path, since: Instant, within: Duration) {
        for (dst, app) in self.targets(apps) {
            let mut seen = Vec::new();
            loop {
                let r = reach_within(&self.client, dst, app, Duration::from_millis(500));
                if r == Ok(want) {
                    break;
                }
                seen.push(r);
                assert!(
                    since.elapsed() < within,
                    "{dst}: not {want:?} {:?} after the agent changed state: {seen:?}",
                    since.elapsed()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!(
                "[inbound_stranded] {dst}: {want:?} {:?} after the change ({} attempts before)",
                since.elapsed(),
                seen.len()
            );
        }
        for _ in 0..5 {
            self.all_reach(apps, want);
        }
    }
}

/// An echo app on `addr` in `pod`, which keeps its wildcard bind whatever the agent does.
fn app(pod: &Pod, addr: &str) -> TcpServer {
    let app = TcpServer::start(pod, addr.parse().expect("addr")).expect("app");
    assert!(
        app.local_addr().ip().is_unspecified(),
        "{}",
        app.local_addr()
    );
    app
}

/// One connection from `client` to `dst`, one echo round trip, and which path it took. The
/// app must see the real client either way.
fn reach(client: &Pod, dst: SocketAddr, app: &TcpServer) -> Result<Path, String> {
    reach_within(client, dst, app, T)
}

/// As [`reach`], giving up after `timeout` (a connection can wait in a hung agent's backlog).
fn reach_within(
    client: &Pod,
    dst: SocketAddr,
    app: &TcpServer,
    timeout: Duration,
) -> Result<Path, String> {
    let mut c = tcp_connect(client, dst, T).map_err(|e| format!("connect: {e}"))?;
    c.stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    tcp_echo_roundtrip(&mut c.stream, b"are you there").map_err(|e| format!("echo: {e:#}"))?;
    // Connections of earlier attempts may reach the app late (one that waited in a hung
    // agent's backlog is served when it resumes): this attempt's is the one from its client.
    let client_addr = unmap(c.local);
    let mut others = Vec::new();
    loop {
        let acc = app
            .next_accept(timeout)
            .map_err(|e| format!("{e:#}; the app saw only {others:?}"))?;
        if unmap(acc.peer) == client_addr {
            if unmap(acc.from) != client_addr {
                return Err(format!("accept() returned {}, not {client_addr}", acc.from));
            }
            return Ok(if acc.local.ip().to_canonical().is_loopback() {
                Path::Agent
            } else {
                Path::Direct
            });
        }
        others.push(acc.peer);
    }
}

fn wait_captured(agent: &Agent, port: u16, reconciled: bool) {
    agent
        .wait_event(
            |e| {
                e["event"] == "inbound_listening"
                    && e["port"] == port
                    && (!reconciled || e["reconciled"] == true)
            },
            T,
        )
        .unwrap_or_else(|e| panic!("port {port} reported captured: {e:#}"));
}

/// kill -9 with the programs pinned (the worst case: they stay attached): the agent's inbound
/// listener dies with it, and so does the sk_lookup link it held, so the apps are reached
/// directly at once, well inside the fail-open bound outbound has.
#[test]
fn killed_agent_leaves_servers_reachable_within_the_fail_open_bound() {
    let s = Scene::new();
    let spec = s.spec();
    let mut agent =
        Agent::start(["--pod", &spec, "--keep-pins", "--fail-open-after", BOUND]).expect("agent");
    agent.wait_ready().expect("ready");
    let apps = s.start_apps();
    s.all_reach(&apps, Path::Agent);
    let steered = counter(&agent, &s.server, "inbound_steered");
    assert_eq!(steered, 3);

    agent.kill().expect("kill -9");
    s.until(&apps, Path::Direct, Instant::now(), WITHIN);
    assert_eq!(
        counter(&agent, &s.server, "inbound_steered"),
        steered,
        "nothing was steered to the dead agent"
    );
}

/// A hung agent (SIGSTOP: its heartbeat stops) still holds its listener, so here it is the
/// heartbeat check in sk_lookup that lets connections through to the apps within the bound;
/// once it runs again it captures them again.
#[test]
fn hung_agent_leaves_servers_reachable_within_the_bound_and_captures_again() {
    let s = Scene::new();
    let spec = s.spec();
    let agent = Agent::start(["--pod", &spec, "--fail-open-after", BOUND]).expect("agent");
    agent.wait_ready().expect("ready");
    let apps = s.start_apps();
    s.all_reach(&apps, Path::Agent);

    agent.signal(libc::SIGSTOP).expect("SIGSTOP");
    s.until(&apps, Path::Direct, Instant::now(), WITHIN);
    assert!(counter(&agent, &s.server, "bypass_stale") >= 3);

    agent.signal(libc::SIGCONT).expect("SIGCONT");
    s.until(&apps, Path::Agent, Instant::now(), WITHIN);
}

/// kill -9, then an agent started again on the same pins: the apps are captured again,
/// including one that bound while no agent ran, with the new agent's inbound policy applied
/// (a rate of one connection per peer: the second is reset).
#[test]
fn restarted_agent_captures_servers_again_with_its_policy() {
    let s = Scene::new();
    let spec = s.spec();
    let mut first = Agent::start(["--pod", &spec, "--keep-pins"]).expect("agent");
    first.wait_ready().expect("ready");
    let apps = s.start_apps();
    s.all_reach(&apps, Path::Agent);
    first.kill().expect("kill -9");
    s.all_reach(&apps, Path::Direct);
    // Bound while no agent runs: the kept programs record it all the same.
    let late = app(&s.server, "[::]:9443");
    assert_eq!(
        reach(&s.client, s.server.addr6(9443), &late),
        Ok(Path::Direct)
    );

    let policy = ["--peer-conn-rate", "1/m", "--peer-conn-burst", "1"];
    let mut args = vec!["--pod", spec.as_str(), "--keep-pins"];
    args.extend(policy);
    let second = Agent::start_in(first.bpffs(), args).expect("restarted agent");
    second.wait_ready().expect("ready again");
    for port in [V4_PORT, DUAL_PORT, 9443] {
        wait_captured(&second, port, true);
    }
    let mut targets = s.targets(&apps).to_vec();
    targets.push((s.server.addr6(9443), &late));
    for (dst, app) in targets {
        assert_eq!(reach(&s.client, dst, app), Ok(Path::Agent), "{dst}");
        // The same peer again: over the rate, so the agent resets it before the app sees it.
        let again = reach(&s.client, dst, app);
        assert!(again.is_err(), "{dst}: {again:?}");
        assert!(app.drain_accepted().is_empty(), "{dst}: reached the app");
    }
}

/// A server closed while no agent runs (stopped with --keep-pins: its pods are no longer
/// enrolled, the programs stay) leaves no record behind: the next agent on the pins does not
/// steer its port, so a client is refused as it would be without the mesh, not reset by an
/// agent that finds no app.
#[test]
fn a_server_closed_while_no_agent_runs_is_forgotten() {
    let s = Scene::new();
    let spec = s.spec();
    let args = ["--pod", spec.as_str(), "--keep-pins"];
    let mut first = Agent::start(args).expect("agent");
    first.wait_ready().expect("ready");
    let apps = s.start_apps();
    s.all_reach(&apps, Path::Agent);
    let status = first.stop().expect("SIGTERM");
    assert!(status.success(), "{status}");
    let Apps { v4, dual } = apps;
    drop(v4);

    let second = Agent::start_in(first.bpffs(), args).expect("restarted agent");
    second.wait_ready().expect("ready again");
    wait_captured(&second, DUAL_PORT, true);
    let err = tcp_connect(&s.client, s.server.addr4(V4_PORT), T).expect_err("nothing listens");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(
        !second
            .events()
            .iter()
            .any(|e| e["event"] == "inbound_listening" && e["port"] == V4_PORT),
        "the closed server's port was reported captured"
    );
    assert_eq!(
        reach(&s.client, s.server.addr6(DUAL_PORT), &dual),
        Ok(Path::Agent)
    );
}

/// Servers listening before their pod is enrolled (the agent started after them, or restarted
/// without its pins, which forgot the bind hook's record): captured from the namespace's
/// socket table at enrolment, and forgotten when they close, like a bind the hook recorded.
#[test]
fn servers_listening_before_enrolment_are_captured() {
    let s = Scene::new();
    let apps = s.start_apps();
    let spec = s.spec();
    let mut first = Agent::start(["--pod", &spec]).expect("agent");
    first.wait_ready().expect("ready");
    wait_captured(&first, V4_PORT, true);
    wait_captured(&first, DUAL_PORT, true);
    s.all_reach(&apps, Path::Agent);
    assert_eq!(
        counter(&first, &s.server, "bind_capture"),
        0,
        "no bind was seen"
    );
    // An uninstall forgets everything; a new agent finds the servers again.
    assert!(first.stop().expect("SIGTERM").success());
    s.all_reach(&apps, Path::Direct);
    let second = Agent::start(["--pod", &spec]).expect("agent");
    second.wait_ready().expect("ready");
    s.all_reach(&apps, Path::Agent);
    // A recorded server that closes is forgotten: refused as without the mesh.
    let Apps { v4, dual } = apps;
    drop(v4);
    let err = tcp_connect(&s.client, s.server.addr4(V4_PORT), T).expect_err("nothing listens");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert_eq!(
        reach(&s.client, s.server.addr6(DUAL_PORT), &dual),
        Ok(Path::Agent)
    );
}

/// An upgrade with --takeover: connections in a loop through the switch all reach the app
/// (none refused or reset), and afterwards the new agent alone captures the apps.
#[test]
fn taken_over_agent_captures_servers_again() {
    let s = Scene::new();
    let spec = s.spec();
    let args = ["--pod", spec.as_str(), "--drain-timeout", "30s"];
    let first = Agent::start(args).expect("agent");
    first.wait_ready().expect("ready");
    let apps = s.start_apps();
    s.all_reach(&apps, Path::Agent);

    let stop = std::sync::atomic::AtomicBool::new(false);
    let (tx, rx) = std::sync::mpsc::channel();
    let dst = s.server.addr6(DUAL_PORT);
    let tally = std::thread::scope(|scope| {
        let looping = scope.spawn(|| client_loop(&s.client, dst, &stop, tx));
        let stopper = StopOnDrop(&stop);
        let progress = |n: usize| {
            for _ in 0..n {
                rx.recv_timeout(T).expect("the client loop makes progress");
            }
        };
        progress(20);
        let mut takeover = args.to_vec();
        takeover.push("--takeover");
        let second = Agent::start_in(first.bpffs(), takeover).expect("new agent");
        second.wait_ready().expect("new agent ready");
        let status = first
            .wait_exit(T * 4)
            .expect("wait")
            .expect("old agent exits");
        assert!(status.success(), "old agent: {status}");
        progress(20);
        drop(stopper);
        let tally = looping.join().expect("client loop");
        // The loop's connections are in the app's queue: the checks below start afresh.
        apps.dual.drain_accepted();
        s.all_reach(&apps, Path::Agent);
        assert!(
            counter(&second, &s.server, "inbound_steered") >= 3 + 3 + tally.direct as u64,
            "every connection of the loop was steered to an agent"
        );
        tally
    });
    assert!(tally.failures.is_empty(), "{:?}", tally.failures);
}

/// Uninstall by SIGTERM without --keep-pins: the agent detaches everything and removes its
/// pins; the apps are reached directly, never restarted.
#[test]
fn uninstalled_agent_leaves_servers_reachable() {
    let s = Scene::new();
    let spec = s.spec();
    let mut agent = Agent::start(["--pod", &spec]).expect("agent");
    agent.wait_ready().expect("ready");
    let apps = s.start_apps();
    s.all_reach(&apps, Path::Agent);
    let status = agent.stop().expect("SIGTERM");
    assert!(status.success(), "{status}");
    assert!(
        agent.bpffs().entries().unwrap_or_default().is_empty(),
        "pins removed"
    );
    s.all_reach(&apps, Path::Direct);
}

/// Uninstall by hand after a crash with pins kept (`rm -r` of the pin directory, which
/// detaches the programs): the apps are reached directly, never restarted.
#[test]
fn servers_stay_reachable_when_the_pins_are_removed_by_hand() {
    let s = Scene::new();
    let spec = s.spec();
    let mut agent = Agent::start(["--pod", &spec, "--keep-pins"]).expect("agent");
    agent.wait_ready().expect("ready");
    let apps = s.start_apps();
    s.all_reach(&apps, Path::Agent);
    agent.kill().expect("kill -9");
    std::fs::remove_dir_all(agent.bpffs_dir()).expect("rm -r the pins");
    s.all_reach(&apps, Path::Direct);
}

/// Bind events lost to a full ring (the agent stopped reading while an app churned through
/// binds): the apps bound then are captured all the same, since capture is the kernel's
/// record and not the agent's reaction to an event, and the agent's report of captured ports
/// is reconciled from that record (SM_IN_BINDS).
#[test]
fn lost_bind_events_are_reconciled_and_their_ports_captured() {
    let s = Scene::new();
    let spec = s.spec();
    // Fail-open off: the churn below may outlast the bound, and what is checked afterwards is
    // the capture, not the fail-open.
    let agent = Agent::start(["--pod", &spec, "--fail-open-after", "off"]).expect("agent");
    agent.wait_ready().expect("ready");

    agent.signal(libc::SIGSTOP).expect("SIGSTOP");
    // Each bind and close is two events (16 B + an 8 B header each in a 256 KiB ring).
    const CHURN_PORT: u16 = 7000;
    let mut binds = 0;
    while counter(&agent, &s.server, "event_lost") == 0 {
        assert!(binds < 40_000, "the ring never filled");
        s.server.run(|| {
            for _ in 0..2000 {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .expect("socket");
                s.bind(&SocketAddr::from(([0, 0, 0, 0], CHURN_PORT)).into())
                    .expect("bind");
            }
        });
        binds += 2000;
    }
    let lost = counter(&agent, &s.server, "event_lost");
    let apps = s.start_apps();
    assert_eq!(
        counter(&agent, &s.server, "event_lost"),
        lost + 2,
        "the apps' bind events were lost too"
    );
    agent.signal(libc::SIGCONT).expect("SIGCONT");
    s.all_reach(&apps, Path::Agent);
    wait_captured(&agent, V4_PORT, true);
    wait_captured(&agent, DUAL_PORT, true);
    // The churned port, released long ago, ends up reported as not captured.
    let deadline = Instant::now() + T;
    loop {
        let last = agent.events().into_iter().rfind(|e| {
            e["port"] == CHURN_PORT
                && e["event"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("inbound_"))
        });
        match last {
            Some(e) if e["event"] == "inbound_closed" => break,
            None => break,
            other => assert!(
                Instant::now() < deadline,
                "last report of {CHURN_PORT}: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let listeners = tcp_listeners(&s.server).expect("listeners");
    assert!(
        listeners.contains(&"127.0.0.1:15006".parse().expect("addr")),
        "the agent's side of every captured port: {listeners:?}"
    );
}
