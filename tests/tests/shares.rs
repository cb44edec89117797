//! Fair shares: a hostile pod enrolled next to a victim pod on the same agent attacks what
//! they share, and the victim's connections and queries all keep working, fast (p99 under
//! 100 ms, printed beside the victim's quiet baseline from the same test), while the attacker
//! is refused and counted against itself, and the agent neither crashes nor fails open.
//! Each attack is its own test; the attacker's processes are `smt-attack` (each with its own
//! open-file limit, 20,000 on the CI machines).
mod common;
mod shares_util;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use shares_util::*;
use sockmesh_tests::prom;
use sockmesh_tests::*;

/// Victim probes per series: enough for a p99 that is not just the maximum of a handful.
const PROBES: usize = 200;

#[test]
fn twenty_thousand_held_connections_leave_the_victim_its_share() {
    let c = cast();
    let sink = c.server.addr4(9000);
    let sink_listener = never_accepting(&c.server, sink, 4096);
    let (agent, ready) = start_agent(&c, &[]);
    let limits = &ready["limits"];
    eprintln!("[shares] agent limits: {limits}");
    let pod_cap = limits["pod_max_conns"].as_u64().expect("pod cap");
    assert_eq!(pod_cap, 1024, "the default");
    assert!(
        limits["max_conns"].as_u64().expect("node cap") * 2
            < limits["nofile"].as_u64().expect("nofile"),
        "two fds per connection fit under the open-file limit"
    );
    let dst = c.server.addr4(8080);
    let quiet = connect_probes(&c.victim, dst, PROBES);

    // 20,000 connections from four processes of 5,000 (each under its own fd limit).
    let attacks: Vec<Attack> = (0..4)
        .map(|_| Attack::start(&c.hostile, &["hold", &sink.to_string(), "5000"]))
        .collect();
    let attacked = connect_probes(&c.victim, dst, PROBES);
    let mut connected = 0;
    for a in &attacks {
        let r = a.report(Duration::from_secs(120));
        connected += r["connected"].as_u64().expect("connected");
    }
    let held = status(&agent);
    let during = connect_probes(&c.victim, dst, PROBES / 2);
    report_and_check("connect+echo, 20k connections held", &quiet, &attacked);
    report_and_check("connect+echo, while held", &quiet, &during);
    eprintln!(
        "[shares] hostile connected {connected} of 20000; agent: {held}; fds {}",
        fds(&agent)
    );

    // The hostile pod got its cap and no more; the rest were reset and counted against it.
    assert_eq!(held["conns_held"].as_u64(), Some(pod_cap), "{held}");
    // (A connect the hostile pod gave up on while the agent's backlog was full may still
    // have reached the agent, and been refused: between the two.)
    let want = connected - pod_cap;
    let r = refused_until(&agent, &c.hostile, |r| {
        r["conn_pod_cap"].as_u64() >= Some(want)
    });
    let refused_conns = r["conn_pod_cap"].as_u64().expect("counted");
    assert!(
        (want..=20_000 - pod_cap).contains(&refused_conns),
        "{r}: want {want}..={}",
        20_000 - pod_cap
    );
    assert_eq!(
        refused_total(&refused(&agent, &c.victim)),
        0,
        "the victim was refused nothing"
    );
    assert!(
        fds(&agent) < 2 * pod_cap as usize + 1000,
        "{} fds",
        fds(&agent)
    );

    // Let go (the sink resets what it never accepted): the slots come back.
    drop(attacks);
    drop(sink_listener);
    assert_eq!(wait_held(&agent, 0), 0, "every slot given back");
    still_serving(&agent, &c);
}

/// Waits (up to 10 s) for the agent to hold `n` connections; returns what it holds then.
fn wait_held(agent: &Agent, n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let held = status(agent)["conns_held"].as_u64().expect("conns_held");
        if held == n || Instant::now() > deadline {
            return held;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Set an agent's soft open-file limit from outside (root may lower another root process's
/// limit, and raise it again up to the hard limit).
fn set_soft_nofile(pid: u32, n: u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointers to rlimits; a null new limit only reads.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut r,
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    r.rlim_cur = n;
    // SAFETY: as above.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &r,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// Out of file descriptors, the accept loops back off (woken by a connection ending, or a
/// timer doubling up to 1 s) instead of spinning, count it, and serve again once fds free up:
/// what waited in the backlog is served, not reset, and so is what was accepted into the last
/// few free descriptors (it waits for an upstream socket).
#[test]
fn out_of_fds_the_accept_loops_back_off_without_spinning() {
    let c = cast();
    let sink = c.server.addr4(9000);
    let _sink = never_accepting(&c.server, sink, 4096);
    let (agent, _) = start_agent(&c, &[]);
    assert!(common::redirected(&c.victim, c.server.addr4(8080)));
    wait_held(&agent, 0);
    // The limit bounds descriptor *numbers*, not how many are open, and the agent's table
    // has holes (what loading each pod's `sk_lookup` object opened and closed): a limit just
    // below the open count leaves those free. Leave exactly `FEW` free, below the limit:
    // that many connections are accepted and then find no descriptor for their upstream
    // socket; every other accept fails with EMFILE.
    const FEW: usize = 4;
    let free = free_fds(&agent, FEW + 1);
    eprintln!(
        "[shares] out of fds: the agent holds {} fds, the lowest free are {free:?}",
        fds(&agent)
    );
    set_soft_nofile(agent.pid(), free[FEW]);

    let mut attack = Attack::start(&c.hostile, &["hold", &sink.to_string(), "200"]);
    let r = attack.report(Duration::from_secs(60));
    assert_eq!(
        r["connected"].as_u64(),
        Some(200),
        "queued in the backlog: {r}"
    );
    let backoffs = refused_until(&agent, &c.hostile, |r| {
        r["accept_backoff"].as_u64() > Some(0)
    });
    assert!(backoffs["accept_backoff"].as_u64() > Some(0), "{backoffs}");
    let (cpu0, n0) = (
        cpu_time(&agent),
        backoffs["accept_backoff"].as_u64().unwrap_or(0),
    );
    std::thread::sleep(Duration::from_secs(3));
    let spent = cpu_time(&agent) - cpu0;
    let n1 = refused(&agent, &c.hostile)["accept_backoff"]
        .as_u64()
        .unwrap_or(0);
    eprintln!(
        "[shares] out of fds: {} more backoffs in 3 s, {spent:?} of CPU",
        n1 - n0
    );
    assert!(
        spent < Duration::from_millis(300),
        "the agent spun: {spent:?} of CPU in 3 s"
    );
    assert!((1..20).contains(&(n1 - n0)), "{} backoffs in 3 s", n1 - n0);

    // The limit back: within its backoff (at most 1 s) every connection that waited, in the
    // backlog or for its upstream socket, is served; none was reset.
    set_soft_nofile(agent.pid(), 20_000);
    let held = wait_held(&agent, 200);
    assert_eq!(held, 200, "served once fds were back");
    // Served means proxied: the agent's 200 upstream connections reached the sink (they wait
    // in its accept queue, established).
    let deadline = Instant::now() + Duration::from_secs(10);
    let upstream = loop {
        let n = established(&c.server)
            .expect("ss")
            .iter()
            .filter(|e| e.local == sink)
            .count();
        if n >= 200 || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(upstream, 200, "connections proxied to the sink");
    attack.release();
    let end = attack.report(Duration::from_secs(30));
    eprintln!("[shares] out of fds: the attacker's connections at release: {end}");
    assert_eq!(end["alive"].as_u64(), Some(200), "none was reset: {end}");
    still_serving(&agent, &c);
}

#[test]
fn a_dns_flood_is_held_to_the_pods_rate_and_the_victims_queries_are_answered() {
    let c = cast();
    let server: SocketAddr = c.server.addr4(53);
    let _responder = dns_responder(&c.server, server);
    let (agent, _) = start_agent(&c, &[]);
    let quiet = dns_probes(&c.victim, server, PROBES);

    let floods: Vec<Attack> = (0..2)
        .map(|_| Attack::start(&c.hostile, &["dns", &server.to_string(), "6"]))
        .collect();
    let attacked = dns_probes(&c.victim, server, PROBES);
    let mut sent = 0;
    let mut answered = 0;
    for f in &floods {
        let r = f.report(Duration::from_secs(30));
        sent += r["sent"].as_u64().expect("sent");
        answered += r["answered"].as_u64().expect("answered");
    }
    report_and_check("dns query", &quiet, &attacked);
    eprintln!("[shares] dns flood: {sent} queries sent, {answered} answered");

    // The flood got the pod's rate (500/s, burst 500) and nothing more; the rest waited in
    // its own socket buffer and was dropped there, counted against it.
    assert!(answered > 0, "the hostile pod's DNS is slowed, not dead");
    assert!(answered < 500 + 8 * 500, "{answered} answered in ~6 s");
    let r = refused_until(&agent, &c.hostile, |r| {
        r["dns_rate"].as_u64() > Some(0) && r["dns_dropped"].as_u64() > Some(0)
    });
    eprintln!("[shares] hostile refusals: {r}");
    assert!(r["dns_rate"].as_u64() > Some(0), "{r}");
    assert!(r["dns_dropped"].as_u64() > Some(sent / 2), "{r} of {sent}");
    let v = refused(&agent, &c.victim);
    assert_eq!(refused_total(&v), 0, "the victim was refused nothing: {v}");
    let st = status(&agent);
    assert!(st["dns_inflight"].as_u64() <= Some(64), "{st}");
    still_serving(&agent, &c);
    let _ = &c.cluster;
}

/// The victim's row for `peer` in `sockmesh peers --json`.
fn victim_row(agent: &Agent, victim: &Pod, peer: SocketAddr) -> Value {
    let cookie = victim.netns_cookie().expect("cookie").to_string();
    let peers = agent
        .read_json("peers", &["--pod", &cookie])
        .expect("sockmesh peers");
    common::find_peer(&peers, &peer.to_string())
        .cloned()
        .unwrap_or(Value::Null)
}

#[test]
fn a_hundred_thousand_peers_churn_only_the_hostile_pods_own_policy_state() {
    let c = cast();
    let dead = c.server.addr4(7000);
    // A breaker that stays open for the whole test: the state the churn must not evict.
    let (agent, _) = start_agent(&c, &["--breaker-open", "5m"]);
    // Failures until the breaker opens: adaptive throttling (on by default) may refuse an
    // attempt itself, and a refused attempt is not a failure the breaker counts.
    let open = |agent: &Agent| victim_row(agent, &c.victim, dead)["breaker"] == "open";
    let deadline = Instant::now() + Duration::from_secs(10);
    while !open(&agent) && Instant::now() < deadline {
        let _ = tcp_connect(&c.victim, dead, T);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(open(&agent), "{}", victim_row(&agent, &c.victim, dead));
    let dst = c.server.addr4(8080);
    let quiet = connect_probes(&c.victim, dst, PROBES);

    // 100,000 distinct peers, every one refused at once (nothing listens on those ports).
    let spec = format!(
        "{}:10000-59999;[{}]:10000-59999",
        c.server.ip4(),
        c.server.ip6()
    );
    let attack = Attack::start(&c.hostile, &["peers", "4", &spec]);
    let attacked = connect_probes(&c.victim, dst, PROBES);
    let r = attack.report(Duration::from_secs(170));
    eprintln!("[shares] hostile peers: {r}");
    report_and_check("connect+echo, 100k peers churned", &quiet, &attacked);
    assert_eq!(r["peers"].as_u64(), Some(100_000));

    // The victim's open breaker is still there, in the agent and in the kernel.
    assert!(open(&agent), "{}", victim_row(&agent, &c.victim, dead));
    let e = tcp_connect(&c.victim, dead, T).expect_err("refused");
    assert_eq!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "fast reject: {e}"
    );
    // The churn evicted the hostile pod's own entries, counted against it, and no other.
    let evicted = refused_until(&agent, &c.hostile, |r| {
        r["peers_evicted"].as_u64() >= Some(100_000 - 16_384)
    });
    assert!(
        evicted["peers_evicted"].as_u64() >= Some(100_000 - 16_384),
        "{evicted}; agent: {}",
        agent.stats().expect("stats")["agent"]
    );
    let v = refused(&agent, &c.victim);
    assert_eq!(refused_total(&v), 0, "the victim lost nothing: {v}");
    still_serving(&agent, &c);
}

#[test]
fn a_bind_close_loop_is_held_to_the_pods_share_and_the_victims_binds_open_at_once() {
    let c = cast();
    let (agent, _) = start_agent(&c, &[]);
    let _app = serve_captured(&agent, &c.victim, 8080);
    let dst = c.victim.addr4(8080);
    let quiet = inbound_probes(&c.server, dst, PROBES);

    // Binds and closes on 50 ports as fast as it can.
    let loops = [Attack::start(&c.hostile, &["binds", "20000", "50", "6"])];
    let cpu0 = cpu_time(&agent);
    std::thread::sleep(Duration::from_millis(500));
    eprintln!(
        "[shares] agent CPU in 500 ms of the loop: {:?}",
        cpu_time(&agent) - cpu0
    );
    // A new bind of the victim gets its listener at once, the hostile pod's backlog of
    // changes notwithstanding.
    let asked = Instant::now();
    let _app2 = serve_captured(&agent, &c.victim, 8081);
    let opened = asked.elapsed();
    let attacked = inbound_probes(&c.server, dst, PROBES);
    let mut binds = 0;
    for l in &loops {
        binds += l.report(Duration::from_secs(30))["binds"]
            .as_u64()
            .expect("binds");
    }
    report_and_check("inbound connect+echo, bind/close loop", &quiet, &attacked);
    eprintln!("[shares] bind/close loop: {binds} binds; victim's new listener after {opened:?}");
    assert!(opened < Duration::from_secs(1), "{opened:?}");
    let mut probe = tcp_connect(&c.server, c.victim.addr4(8081), T).expect("new listener");
    tcp_echo_roundtrip(&mut probe.stream, b"8081").expect("echo");

    // The hostile pod's changes waited for its rate, counted against it; the victim lost none.
    let r = refused_until(&agent, &c.hostile, |r| {
        r["bind_deferred"].as_u64() > Some(0)
    });
    eprintln!("[shares] hostile refusals: {r}");
    assert!(
        r["bind_deferred"].as_u64() > Some(binds / 2),
        "{r} of {binds} binds"
    );
    let v = refused(&agent, &c.victim);
    assert_eq!(refused_total(&v), 0, "{v}");
    assert_eq!(common::counter(&agent, &c.victim, "event_lost"), 0);
    // At most one change per port waits: the backlog drains at the pod's rate.
    assert!(status(&agent)["binds_pending"].as_u64() <= Some(100));
    still_serving(&agent, &c);
}

#[test]
fn slow_metrics_clients_delay_neither_proxying_nor_the_heartbeat() {
    let c = cast();
    let (agent, _) = start_agent(
        &c,
        &["--health-addr", "127.0.0.1:0", "--fail-open-after", "500ms"],
    );
    let metrics = agent.metrics_addr().expect("metrics address");
    let health: SocketAddr = agent
        .wait_event_named("health_listening", T)
        .expect("health listener")["addr"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("health address");
    let dst = c.server.addr4(8080);
    let quiet = connect_probes(&c.victim, dst, PROBES);
    let fds_before = fds(&agent);

    // 200 connections: half trickle a request head a byte at a time, half ask for /metrics
    // and never read the answer; and one client scrapes as fast as it can.
    let mut slow = Vec::new();
    for i in 0..200 {
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&metrics, T) else {
            continue;
        };
        let _ = s.set_write_timeout(Some(Duration::from_millis(100)));
        if i % 2 == 0 {
            send(&mut s, b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
        } else {
            for _ in 0..50 {
                send(&mut s, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
            }
        }
        slow.push(s);
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (attacked, scrapes, healthy) = std::thread::scope(|sc| {
        // Another client (another address) scraping as fast as it can: answered, at most one
        // render per 250 ms.
        let hammer = sc.spawn(|| {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += u32::from(scrape_from([127, 0, 0, 2], metrics));
            }
            n
        });
        let trickle = sc.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for s in slow.iter_mut().step_by(2) {
                    send(s, b"X");
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        // Three seconds of it: the heartbeat (every 125 ms here) must not miss a beat.
        let mut attacked = connect_probes(&c.victim, dst, PROBES);
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            let more = connect_probes(&c.victim, dst, 20);
            attacked.times.extend(more.times);
            attacked.failures.extend(more.failures);
        }
        // The node's probe keeps answering at once on its own listener.
        let t0 = Instant::now();
        let healthy = prom::http_get(health, "/healthz").map(|(s, _)| s);
        let took = t0.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        trickle.join().expect("trickle");
        (attacked, hammer.join().expect("hammer"), (healthy, took))
    });
    report_and_check("connect+echo, slow /metrics clients", &quiet, &attacked);
    assert!(scrapes > 0, "another client's scrapes were answered");
    eprintln!(
        "[shares] /metrics: 200 slow clients, {scrapes} fast scrapes answered; /healthz {:?} in {:?}; agent fds {} -> {}",
        healthy.0,
        healthy.1,
        fds_before,
        fds(&agent)
    );
    assert_eq!(healthy.0.ok(), Some(200));
    assert!(healthy.1 < Duration::from_secs(1), "{:?}", healthy.1);
    // Bounded: the slow client held at most its 8 slots, and the rest were refused, counted.
    assert!(fds(&agent) <= fds_before + 8 + 4, "{} fds", fds(&agent));
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let n = agent.stats().expect("stats")["agent"]["http_refused"].as_u64();
        if n > Some(100) || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(refused > Some(100), "http_refused {refused:?}");
    // The metrics listener at the node address publishes /healthz and /readyz only.
    assert_eq!(prom::http_get(health, "/metrics").expect("get").0, 404);
    assert_eq!(prom::http_get(health, "/readyz").expect("get").0, 200);
    drop(slow);
    still_serving(&agent, &c);
}

/// One GET /metrics from source address `from` (any 127.x is this host's loopback): whether
/// it was answered 200.
fn scrape_from(from: [u8; 4], to: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None);
    let Ok(s) = s else { return false };
    if s.bind(&SocketAddr::from((from, 0)).into()).is_err()
        || s.connect_timeout(&to.into(), T).is_err()
    {
        return false;
    }
    let mut s: std::net::TcpStream = s.into();
    let _ = s.set_read_timeout(Some(T));
    if s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200")
}
