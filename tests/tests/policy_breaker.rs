//! The circuit breaker and adaptive throttling end to end: the breaker opens and the kernel
//! refuses at once, half-open recovery when the peer comes back, adaptive throttling that
//! starts under a failing peer and stops once it recovers.
mod common;
mod policy_util;

use std::io::Read;
use std::time::{Duration, Instant};

use common::{counter, T};
use policy_util::{attempt, wait_until, Outcome};
use sockmesh_tests::*;

/// A peer that refuses connections trips its breaker; from then on the pod's connect() to it
/// fails at once in the kernel (no proxy round trip), while other peers are unaffected.
/// Adaptive throttling stays on (the default): its local refusals count toward the breaker,
/// so the count is exact whichever attempts it refuses.
///
/// On `--fast-path auto` the same: a peer is handed to the kernel only after a proxied
/// connection to it succeeded, which a dead peer never gives. (A peer that dies once on the
/// kernel tier: `fast_path.rs`, `the_kernel_tier_times_out_connects_and_opens_the_breaker`.)
#[test]
fn breaker_opens_on_a_failing_peer_and_the_kernel_refuses_at_once() {
    breaker_opens(Tier::Proxy);
}

#[test]
fn breaker_opens_on_a_failing_peer_with_the_fast_path_on() {
    breaker_opens(Tier::Kernel);
}

fn breaker_opens(tier: Tier) {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let client = cluster.add_pod("client").expect("pod");
    let server_pod = cluster.add_pod("server").expect("pod");
    let healthy =
        TcpServer::start(&server_pod, "0.0.0.0:8080".parse().expect("addr")).expect("server");
    let agent = tier.agent(&client, &["--breaker-failures", "5"]);

    // Nothing listens on 9 in the server pod: every upstream connect is refused. The client's
    // own connect() succeeds (to the agent), then the agent resets it.
    let dead = server_pod.addr4(9);
    let mut refused_in_kernel = None;
    for attempt in 1..=30 {
        match tcp_connect(&client, dead, T) {
            Ok(mut c) => {
                let mut buf = [0u8; 1];
                let r = c.stream.read(&mut buf);
                assert!(
                    matches!(r, Ok(0) | Err(_)),
                    "a refused peer must not answer"
                );
            }
            // Refused by connect() itself: only the kernel verdict does that here.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                refused_in_kernel = Some(attempt);
                break;
            }
            // Connected to the agent, which reset the connection before getpeername().
            Err(e) => assert!(
                matches!(
                    e.raw_os_error(),
                    Some(libc::ENOTCONN) | Some(libc::ECONNRESET)
                ),
                "attempt {attempt}: {e}"
            ),
        }
    }
    let attempt = refused_in_kernel.expect("the breaker never opened");
    assert_eq!(
        attempt, 6,
        "five refused connects open the breaker; the sixth fails in the kernel"
    );
    assert_eq!(counter(&agent, &client, "fast_reject"), 1);
    // Further connects are refused by the kernel too, and never reach the proxy.
    let redirects = counter(&agent, &client, "redirect_tcp");
    let e = tcp_connect(&client, dead, T).expect_err("still open");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    assert_eq!(counter(&agent, &client, "fast_reject"), 2);
    assert_eq!(
        counter(&agent, &client, "redirect_tcp"),
        redirects,
        "no redirect while open"
    );
    // Another peer of the same pod is unaffected.
    let mut ok = tcp_connect(&client, server_pod.addr4(8080), T).expect("healthy peer");
    tcp_echo_roundtrip(&mut ok.stream, b"still fine").expect("echo");
    healthy.next_accept(T).expect("accepted");
}

/// The breaker opens on a dead peer; the peer comes back; after the open period the first
/// connect is the half-open probe, then the ramp (10 % → 20 → 40 → 80 → closed) admits a
/// growing share until every connect goes through.
///
/// The same on both tiers: a peer with an open or half-open breaker stays on the proxy, which
/// runs the ramp; once closed, the kernel tier takes the peer and admits every connect too.
#[test]
fn half_open_recovery_after_the_peer_comes_back() {
    half_open_recovery(Tier::Proxy);
}

#[test]
fn half_open_recovery_after_the_peer_comes_back_on_the_kernel_tier() {
    half_open_recovery(Tier::Kernel);
}

fn half_open_recovery(tier: Tier) {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let client = cluster.add_pod("client").expect("pod");
    let server_pod = cluster.add_pod("server").expect("pod");
    let _agent = tier.agent(
        &client,
        &["--breaker-failures", "2", "--breaker-open", "1s"],
    );
    let dst = server_pod.addr4(8080);
    // Nothing listens yet: two refused connects open the breaker.
    let opened = Instant::now();
    let seen: String = (0..3).map(|_| attempt(&client, dst).letter()).collect();
    assert_eq!(
        seen, "RRK",
        "two failures open it, the kernel refuses the third"
    );
    // The peer comes back; the kernel keeps refusing until the open period is over.
    let _server =
        TcpServer::start(&server_pod, "0.0.0.0:8080".parse().expect("addr")).expect("server");
    let mut first = None;
    wait_until("the open period to end", T, || {
        match attempt(&client, dst) {
            Outcome::KernelRefused => false,
            other => {
                first = Some(other);
                true
            }
        }
    });
    assert!(
        opened.elapsed() >= Duration::from_secs(1),
        "the kernel let a connect through before the open period ended"
    );
    // The deterministic ramp: the probe, then one in 5, one in 2.5, one in 1.25, closed.
    let mut pattern = String::from(first.expect("an outcome").letter());
    for _ in 0..14 {
        pattern.push(attempt(&client, dst).letter());
    }
    assert_eq!(pattern, "ARRRRARRAAAAAAA", "half-open ramp, then closed");
}

/// Adaptive throttling (K = 2, breaker off) refuses locally once a peer fails: most attempts
/// never reach it. When the peer recovers and the failures leave the (1 s) window, every
/// attempt goes through again.
///
/// On the kernel tier the same: with the breaker off a failing peer is handed over once its
/// first proxied connection ended, and from then on the kernel throttles with the proxy's
/// formula; what differs is how the app hears of a local refusal: ECONNREFUSED at connect()
/// (`K`) instead of a reset after the handshake (`R`).
#[test]
fn adaptive_throttling_starts_under_a_failing_peer_and_stops_after_it_recovers() {
    adaptive_throttling(Tier::Proxy);
}

#[test]
fn adaptive_throttling_starts_under_a_failing_peer_and_stops_after_it_recovers_on_the_kernel_tier()
{
    adaptive_throttling(Tier::Kernel);
}

fn adaptive_throttling(tier: Tier) {
    require_root();
    const ATTEMPTS: u64 = 30;
    let cluster = Cluster::new().expect("cluster");
    let client = cluster.add_pod("client").expect("pod");
    let server_pod = cluster.add_pod("server").expect("pod");
    let _agent = tier.agent(
        &client,
        &["--breaker-failures", "off", "--adaptive-window", "1s"],
    );
    let dst = server_pod.addr4(8080);
    // Each attempt that reaches the dead peer costs it one RST: count them in its netns.
    let resets_before = tcp_out_rsts(&server_pod);
    let refused_locally = match tier {
        Tier::Proxy => "R",
        Tier::Kernel => "RK",
    };
    for _ in 0..ATTEMPTS {
        let seen = attempt(&client, dst).letter();
        assert!(refused_locally.contains(seen), "{seen} on {tier:?}");
    }
    let reached = tcp_out_rsts(&server_pod) - resets_before;
    // Without throttling all 30 would; with p = n/(n+1) the expected count is about 4.
    assert!(
        (1..=ATTEMPTS / 2).contains(&reached),
        "{reached} of {ATTEMPTS} attempts reached the failing peer"
    );
    // The peer recovers. Once the failures have left the 1 s window, nothing is throttled.
    let _server =
        TcpServer::start(&server_pod, "0.0.0.0:8080".parse().expect("addr")).expect("server");
    let mut admitted_in_a_row = 0;
    wait_until("ten admitted in a row", Duration::from_secs(20), || {
        match attempt(&client, dst) {
            Outcome::Admitted(_) => admitted_in_a_row += 1,
            _ => admitted_in_a_row = 0,
        }
        admitted_in_a_row >= 10
    });
}

/// `Tcp: OutRsts` of a pod's network namespace (/proc/net/snmp read from inside it).
fn tcp_out_rsts(pod: &Pod) -> u64 {
    let snmp = pod.exec(&["cat", "/proc/net/snmp"]).expect("read snmp");
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().expect("header"), tcp.next().expect("values"));
    let i = names
        .split_whitespace()
        .position(|n| n == "OutRsts")
        .expect("OutRsts column");
    values
        .split_whitespace()
        .nth(i)
        .and_then(|v| v.parse().ok())
        .expect("a number")
}
