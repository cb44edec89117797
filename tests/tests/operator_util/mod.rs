//! The operator's view, shared by `maps_dump.rs` and `dashboard.rs`: a client pod meshed by an
//! agent with a connection-rate limit, a short connect timeout and a quick breaker; an echo
//! server and a silent port in a server pod; then real traffic that leaves every figure an
//! operator reads non-zero: bytes both ways (one connection held open), connections throttled
//! by the rate and refused in the kernel, connect timeouts that open the peer's breaker.
#![allow(dead_code)]

use std::io::Read;
use std::net::SocketAddr;
use std::time::Duration;

use sockmesh_tests::{
    pod_spec, require_root, tcp_connect, tcp_echo_roundtrip, Agent, Cluster, Connected, Pod,
    TcpServer,
};

use crate::policy_util::{attempt, Outcome, T};

/// Bytes of each echo round trip, and of the connection held open.
pub const SMALL: usize = 1_000;
pub const HELD: usize = 100_000;

pub struct Scenario {
    // Field order is drop order: the held connection and the agent go before the pods.
    pub held: Option<Connected>,
    pub agent: Agent,
    pub echo: TcpServer,
    pub client: Pod,
    pub server_pod: Pod,
    pub cluster: Cluster,
    /// The echo server, as the client addresses it (and as `peer` labels and map keys show it).
    pub echo_addr: SocketAddr,
    /// A port in the server pod whose SYNs are dropped: every connect to it times out.
    pub silent_addr: SocketAddr,
}

/// Pods, the silent port and the agent (on the default tier, auto); no traffic yet.
pub fn setup() -> Scenario {
    setup_on(&[])
}

/// [`setup`], with `extra` flags for the agent (a tier pin).
pub fn setup_on(extra: &[&str]) -> Scenario {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let client = cluster.add_pod("client").expect("pod");
    let server_pod = cluster.add_pod("server").expect("pod");
    let echo =
        TcpServer::start(&server_pod, SocketAddr::from(([0, 0, 0, 0], 8080))).expect("echo server");
    // DROP inside the test's own server pod: SYNs to 7777 vanish, nothing answers.
    server_pod
        .exec(&[
            "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "7777", "-j", "DROP",
        ])
        .expect("iptables in the server pod");
    let spec = pod_spec(&client, "");
    let agent = Agent::start(
        [
            "--pod",
            spec.as_str(),
            // A burst of 3, then one every 500 ms: a quick fourth connect is throttled.
            "--peer-conn-rate",
            "2/s",
            "--peer-conn-burst",
            "3",
            "--connect-timeout",
            "300ms",
            // Adaptive throttling off: after one failed connect it would refuse the next one to
            // the silent peer at random (p = 1/2), and this scenario wants two timeouts.
            "--adaptive-k",
            "off",
            // Two connect timeouts open the silent peer's breaker, long enough to be read.
            "--breaker-failures",
            "2",
            "--breaker-open",
            "60s",
        ]
        .into_iter()
        .chain(extra.iter().copied()),
    )
    .expect("agent");
    agent.wait_ready().expect("ready");
    let echo_addr = server_pod.addr4(8080);
    let silent_addr = server_pod.addr4(7777);
    Scenario {
        held: None,
        agent,
        echo,
        client,
        server_pod,
        cluster,
        echo_addr,
        silent_addr,
    }
}

/// A connection the agent accepted and then reset without reaching the peer (the connect
/// timed out upstream), read to its end.
fn connect_timing_out(client: &Pod, dst: SocketAddr) {
    let mut c = tcp_connect(client, dst, T).expect("accepted by the agent");
    c.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = [0u8; 1];
    let r = c.stream.read(&mut buf);
    assert!(
        !matches!(r, Ok(n) if n > 0),
        "a connect to the silent port must not get data: {r:?}"
    );
}

/// The traffic. `seen(step)` is called after each step whose figures should be observed before
/// the next one moves them (Prometheus must scrape a series before its increase can show);
/// `step` names what happened.
pub fn traffic(s: &mut Scenario, seen: &dyn Fn(&str)) {
    // One connection held open, with bytes both ways: connections_active = 1.
    let mut held = tcp_connect(&s.client, s.echo_addr, T).expect("connect through the mesh");
    assert!(held.local.ip().is_loopback(), "captured by the agent");
    tcp_echo_roundtrip(&mut held.stream, &vec![7u8; HELD]).expect("echo on the held connection");
    s.held = Some(held);
    seen("held");
    // Two short ones: the burst of 3 is spent.
    for _ in 0..2 {
        let mut c = tcp_connect(&s.client, s.echo_addr, T).expect("connect through the mesh");
        tcp_echo_roundtrip(&mut c.stream, &[1u8; SMALL]).expect("echo");
    }
    // Quick connects until one is refused in the kernel: the bucket refills one token every
    // 500 ms, these take a few ms each. On the kernel tier (the default; the peer was handed
    // over after the held connection) that refusal is the throttling itself, counted as
    // throttled and fast-rejected; on the proxy tier a reset by the agent comes first, and
    // its verdict refuses the next in the kernel.
    let mut saw = String::new();
    for _ in 0..20 {
        let o = attempt(&s.client, s.echo_addr);
        saw.push(o.letter());
        if saw.contains('K') {
            break;
        }
        if let Outcome::Admitted(mut c) = o {
            tcp_echo_roundtrip(&mut c.stream, &[2u8; SMALL]).expect("echo");
        }
    }
    assert!(saw.contains('K'), "no kernel-refused connect in {saw}");
    seen("throttled");
    // Connect timeouts: the first makes the peer's series, the second opens its breaker.
    connect_timing_out(&s.client, s.silent_addr);
    seen("timeout");
    connect_timing_out(&s.client, s.silent_addr);
    seen("breaker");
}
