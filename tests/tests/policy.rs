//! Per-peer policy enforced end to end with real sockets: the breaker and its kernel fast
//! reject.
mod common;

use std::io::Read;

use common::{counter, T};
use sockmesh_tests::*;

/// A peer that refuses connections trips its breaker; from then on the pod's connect() to it
/// fails at once in the kernel (no proxy round trip), while other peers are unaffected.
#[test]
fn breaker_opens_on_a_failing_peer_and_the_kernel_refuses_at_once() {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let client = cluster.add_pod("client").expect("pod");
    let server_pod = cluster.add_pod("server").expect("pod");
    let healthy =
        TcpServer::start(&server_pod, "0.0.0.0:8080".parse().expect("addr")).expect("server");
    // Adaptive throttling off so that every attempt reaches the peer and the count is exact.
    let agent = Agent::start([
        "--pod",
        &pod_spec(&client, ""),
        "--breaker-failures",
        "5",
        "--adaptive-k",
        "off",
    ])
    .expect("agent");
    agent.wait_ready().expect("ready");

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
