//! Graceful drain on SIGTERM: stop capturing and accepting, let live connections finish up to
//! --drain-timeout, reset the rest at the deadline, exit as soon as nothing is left.
mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use common::{client_and_echo_server, T};
use sockmesh_tests::*;

const GRACE: Duration = Duration::from_secs(3);
/// Generous bound on how long after its last connection ends (or the deadline) the agent may
/// take to exit; it only fails a hang.
const EXIT_WITHIN: Duration = Duration::from_secs(8);

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// Sends `bytes` from a helper thread while reading as many back (the echo server).
fn echo_exact(c: &mut Connected, bytes: &[u8]) {
    tcp_echo_roundtrip(&mut c.stream, bytes).expect("echo through the mesh");
}

fn agent_with_pod(client: &Pod, grace: &str) -> Agent {
    let agent =
        // Proxy tier: drains the proxy's live connections; direct ones are not the agent's.
        Agent::start(["--pod", &pod_spec(client, ""), "--drain-timeout", grace, "--fast-path", "off"]).expect("agent");
    agent.wait_ready().expect("ready");
    agent
}

#[test]
fn sigterm_lets_a_short_transfer_finish_and_resets_a_long_one_at_the_deadline() {
    let (_cluster, client, server_pod, _server) = client_and_echo_server();
    let agent = agent_with_pod(&client, "3s");
    let dst = server_pod.addr4(8080);

    // Two live transfers through the mesh, each half done.
    let mut short = tcp_connect(&client, dst, T).expect("connect");
    let mut long = tcp_connect(&client, dst, T).expect("connect");
    assert!(short.local.ip().is_loopback() && long.local.ip().is_loopback());
    let first = payload(512 * 1024, 1);
    echo_exact(&mut short, &first);
    echo_exact(&mut long, &payload(64 * 1024, 2));

    agent.signal(libc::SIGTERM).expect("SIGTERM");
    let term = Instant::now();
    agent
        .wait_event_named("draining", T)
        .expect("draining event");

    // Stopped accepting and capturing: the listener is gone, new connections go direct.
    let listener: SocketAddr = "127.0.0.1:15001".parse().expect("addr");
    // "draining" is emitted as the accept loops are told to stop: a connection that lands in
    // the backlog just before the listener closes is reset with it, never served.
    let end = client.run(|| -> std::io::Result<usize> {
        let mut s = std::net::TcpStream::connect_timeout(&listener, T)?;
        s.set_read_timeout(Some(T))?;
        s.read(&mut [0u8; 8])
    });
    assert!(
        matches!(&end, Err(e) if matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset))
            || matches!(end, Ok(0)),
        "a connection to the closed listener was served: {end:?}"
    );
    let direct = tcp_connect(&client, dst, T).expect("new connection goes direct");
    assert!(
        !direct.local.ip().is_loopback(),
        "not captured while draining"
    );
    drop(direct);

    // Live connections keep flowing during the grace period ...
    echo_exact(&mut long, b"still alive while draining");
    // ... and one that finishes in time completes intact, with a clean close.
    let second = payload(512 * 1024, 3);
    let mut writer = short.stream.try_clone().expect("clone");
    let sent = second.clone();
    let w = std::thread::spawn(move || {
        writer.write_all(&sent)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut back = Vec::new();
    short
        .stream
        .read_to_end(&mut back)
        .expect("the finishing transfer is not reset");
    w.join().expect("writer").expect("write and half-close");
    assert!(
        back == second,
        "transfer intact: {} of {} bytes",
        back.len(),
        second.len()
    );

    // The one still open at the deadline is reset, not closed as if it were complete.
    long.stream
        .set_read_timeout(Some(GRACE + EXIT_WITHIN))
        .expect("timeout");
    let mut buf = [0u8; 64];
    let end = long.stream.read(&mut buf);
    let reset_after = term.elapsed();
    match end {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("the long transfer should be reset at the deadline, got {other:?}"),
    }
    // Not before the grace period (a lower bound: a slow machine only makes it later).
    assert!(
        reset_after >= GRACE - Duration::from_millis(300),
        "reset {reset_after:?} after SIGTERM, before the {GRACE:?} drain timeout"
    );
    let drained = agent.wait_event_named("drained", T).expect("drained event");
    assert!(
        drained["reset"].as_u64().expect("reset count") >= 1,
        "{drained}"
    );
    let status = agent
        .wait_exit(EXIT_WITHIN)
        .expect("wait")
        .expect("the agent exits promptly after the deadline");
    assert!(status.success(), "clean exit: {status}");
}

/// The drain waits for connections, not for the clock: with a long drain timeout, the agent
/// exits as soon as its last connection closes.
#[test]
fn drain_ends_when_the_last_connection_closes_not_at_the_timeout() {
    let (_cluster, client, server_pod, _server) = client_and_echo_server();
    let agent = agent_with_pod(&client, "5m");
    let mut c = tcp_connect(&client, server_pod.addr4(8080), T).expect("connect");
    echo_exact(&mut c, b"open across the SIGTERM");

    agent.signal(libc::SIGTERM).expect("SIGTERM");
    agent
        .wait_event_named("draining", T)
        .expect("draining event");
    assert!(
        agent.is_running(),
        "the agent waits for the open connection"
    );
    echo_exact(&mut c, b"still served");
    drop(c);
    let drained = agent.wait_event_named("drained", T).expect("drained event");
    assert_eq!(drained["reset"], 0, "nothing left to reset: {drained}");
    let status = agent
        .wait_exit(EXIT_WITHIN)
        .expect("wait")
        .expect("exits once the last connection is gone, long before 5m");
    assert!(status.success(), "clean exit: {status}");
}
