//! Per-peer timeouts end to end: connect timeout, idle timeout (and nothing leaks after a
//! burst of them), maximum lifetime.
mod common;
mod policy_util;

use std::io::{Read, Write};
use std::mem::size_of;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use policy_util::{conn_fds, map_len, wait_until, T};
use sockmesh_common::{map_names, quota::PodQuota};
use sockmesh_tests::bpfmap::{bytes_of, PinnedMap};
use sockmesh_tests::*;

/// A peer that drops SYNs: the agent gives up after the connect timeout and resets the
/// client, whose connection task and sockets are then gone. The same on `--fast-path auto`:
/// a peer that never answered was never handed over (`fast_path.rs` has one that stops
/// answering on the kernel tier, where connect() itself fails with ETIMEDOUT).
#[test]
fn connect_timeout_resets_the_client() {
    connect_timeout(Tier::Proxy);
}

#[test]
fn connect_timeout_resets_the_client_with_the_fast_path_on() {
    connect_timeout(Tier::Kernel);
}

fn connect_timeout(tier: Tier) {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let client = cluster.add_pod("client").expect("pod");
    let server_pod = cluster.add_pod("server").expect("pod");
    // DROP inside the test's own server pod: SYNs vanish, nothing answers.
    server_pod
        .exec(&[
            "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "7777", "-j", "DROP",
        ])
        .expect("iptables in the server pod");
    let _agent = tier.agent(&client, &["--connect-timeout", "1s"]);
    let mut c = tcp_connect(&client, server_pod.addr4(7777), T).expect("accepted by the agent");
    c.stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let started = Instant::now();
    let mut buf = [0u8; 1];
    let r = c.stream.read(&mut buf);
    let err = r.expect_err("reset after the connect timeout");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    // Generous bound: the point is that it ends well before the 20 s read timeout.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
}

/// The agent's footprint that a connection adds: its fds, the client pod's count of live
/// origins (`SM_POD_QUOTA`, what its quota is checked against) and the entries of the pinned
/// map that links a redirected connection to its original destination. (What the programs
/// keep per socket is in the socket's own storage and goes with it.)
fn footprint(agent: &Agent, pod: &Pod) -> (usize, usize, usize) {
    let quota = PinnedMap::open(
        &agent.bpffs_dir().join(map_names::POD_QUOTA),
        size_of::<u64>(),
        size_of::<PodQuota>(),
    )
    .expect("open SM_POD_QUOTA");
    let cookie = pod.netns_cookie().expect("cookie");
    let live = quota
        .get(bytes_of(&cookie))
        .expect("read SM_POD_QUOTA")
        .map_or(0, |v| {
            i64::from_ne_bytes(v[..8].try_into().expect("8 bytes"))
        });
    (
        conn_fds(agent),
        usize::try_from(live).expect("never below zero here"),
        map_len(agent, map_names::ORIGIN_BY_TUPLE),
    )
}

/// Silent connections are closed on both sides after the idle timeout; after a burst of 40,
/// the agent's fds and pinned map entries are back where they were.
#[test]
fn idle_timeout_closes_both_sides_and_a_burst_leaks_nothing() {
    require_root();
    const BURST: usize = 40;
    const IDLE: Duration = Duration::from_millis(300);
    let cluster = Cluster::new().expect("cluster");
    let client = cluster.add_pod("client").expect("pod");
    let server_pod = cluster.add_pod("server").expect("pod");
    let listener = server_pod
        .run(|| TcpListener::bind("0.0.0.0:8080"))
        .expect("listen in the server pod");
    // Proxy tier: counts the agent's fds and origin tuples per connection (the kernel tier's
    // idle sweep: fast_path.rs, `the_agent_closes_idle_direct_connections_from_outside`).
    let agent = Agent::start([
        "--pod",
        &pod_spec(&client, ""),
        "--idle-timeout",
        "300ms",
        "--fast-path",
        "off",
    ])
    .expect("agent");
    agent.wait_ready().expect("ready");
    let dst = server_pod.addr4(8080);

    // One connection first, so that whatever the agent sets up lazily is in the baseline.
    let mut warm = tcp_connect(&client, dst, T).expect("connect");
    let (mut warm_up, _) = listener.accept().expect("accept");
    warm.stream.write_all(b"x").expect("write");
    warm_up.read_exact(&mut [0u8; 1]).expect("read");
    assert_eq!(warm.stream.read(&mut [0u8; 1]).expect("EOF"), 0);
    drop((warm, warm_up));
    let before = footprint(&agent, &client);
    wait_until("the warm-up connection to be gone", T, || {
        let now = footprint(&agent, &client);
        now.1 == 0 && now.2 == 0
    });
    let baseline = footprint(&agent, &client);
    eprintln!("footprint before the warm-up closed {before:?}, baseline {baseline:?}");

    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..BURST {
        clients.push(tcp_connect(&client, dst, T).expect("connect"));
    }
    let mut upstreams = Vec::new();
    for _ in 0..BURST {
        let (s, _) = listener.accept().expect("the agent connected upstream");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        upstreams.push(s);
    }
    // While they are open, the footprint is there to see (so the check below is not vacuous).
    let open = footprint(&agent, &client);
    assert!(
        open.0 >= baseline.0 + 2 * BURST && open.1 >= BURST && open.2 >= BURST,
        "40 open connections should show in the agent's fds, the pod's origin count and SM_ORIG_TUPLE: {open:?} vs {baseline:?}"
    );
    // Both sides see a clean EOF, none before the idle timeout.
    for c in &mut clients {
        let n = c.stream.read(&mut [0u8; 1]).expect("EOF, not an error");
        assert_eq!(n, 0, "client got data instead of EOF");
    }
    assert!(started.elapsed() >= IDLE, "closed before the idle timeout");
    for s in &mut upstreams {
        let n = s.read(&mut [0u8; 1]).expect("EOF, not an error");
        assert_eq!(n, 0, "server got data instead of EOF");
    }
    drop((clients, upstreams));
    wait_until(
        "the agent's fds and map entries to return to the baseline",
        T,
        || footprint(&agent, &client) == baseline,
    );
}

/// A connection still carrying data is closed gracefully (EOF, not a reset) once it reaches
/// its maximum lifetime.
#[test]
fn max_lifetime_closes_a_busy_connection_gracefully() {
    let (_cluster, client, server_pod, _echo) = common::client_and_echo_server();
    // Either tier (the default, auto): a lifetime keeps every peer on the proxy.
    let agent = Agent::start(["--pod", &pod_spec(&client, ""), "--max-conn-lifetime", "1s"])
        .expect("agent");
    agent.wait_ready().expect("ready");

    let mut c = tcp_connect(&client, server_pod.addr4(8080), T).expect("connect");
    let started = Instant::now();
    let (mut echoed, mut last_echo) = (0usize, Duration::ZERO);
    let chunk = [7u8; 512];
    let end = loop {
        // A write can race the close; what counts is what the read sees.
        let _ = c.stream.write_all(&chunk);
        let mut back = [0u8; 512];
        match c.stream.read(&mut back) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                echoed += n;
                last_echo = started.elapsed();
            }
            Err(e) => break Err(e),
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never closed");
    };
    let took = started.elapsed();
    end.expect("a graceful close (EOF), not a reset");
    assert!(took >= Duration::from_secs(1), "closed after {took:?}");
    assert!(
        echoed > 0 && last_echo >= Duration::from_millis(500),
        "bytes must flow up to the end: {echoed} bytes, last at {last_echo:?}"
    );
}
