//! Fail open: a dead or hung agent must never be why a pod cannot talk. The agent writes a
//! heartbeat into SM_CONFIG; once it is older than --fail-open-after the programs stop
//! capturing, so new connections go direct; an agent that beats again captures again.
mod common;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{client_and_echo_server, counter, T};
use sockmesh_tests::*;

/// The bound the tests set (the agent's minimum is 500 ms, its default 2 s).
const BOUND: &str = "1s";
/// How long after the agent stops beating the first direct connection must succeed: the bound
/// plus a generous margin for a loaded CI machine (the test only fails past it).
const FAIL_OPEN_WITHIN: Duration = Duration::from_secs(6);
/// Between attempts while waiting for the kernel to switch (there is no event to wait on:
/// the switch is a timestamp comparison inside the kernel).
const RETRY: Duration = Duration::from_millis(50);

/// What one attempt saw: refused, captured by the mesh (the app's socket ends on the pod's
/// loopback, at the agent's listener), or direct.
#[derive(Debug, PartialEq)]
enum Seen {
    Refused,
    Captured,
    Direct,
}

fn attempt(client: &Pod, dst: SocketAddr) -> (Seen, Option<Connected>) {
    match tcp_connect(client, dst, T) {
        Ok(c) if c.local.ip().is_loopback() => (Seen::Captured, Some(c)),
        Ok(c) => (Seen::Direct, Some(c)),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => (Seen::Refused, None),
        Err(e) => panic!("connect to {dst} failed unexpectedly: {e}"),
    }
}

/// Retries until an attempt is `want`, failing once `within` has passed since `since`.
fn until(client: &Pod, dst: SocketAddr, want: Seen, since: Instant, within: Duration) -> Connected {
    loop {
        let (seen, c) = attempt(client, dst);
        if seen == want {
            return c.expect("a connection");
        }
        assert!(
            since.elapsed() < within,
            "still {seen:?} {:?} after the agent changed state (wanted {want:?})",
            since.elapsed()
        );
        std::thread::sleep(RETRY);
    }
}

#[test]
fn killed_agent_fails_open_within_the_bound_and_a_restarted_one_captures_again() {
    let (_cluster, client, server_pod, server) = client_and_echo_server();
    let spec = pod_spec(&client, "");
    // Proxy tier: times how soon connections stop being redirected to a dead listener.
    let args = [
        "--pod",
        &spec,
        "--keep-pins",
        "--fail-open-after",
        BOUND,
        "--fast-path",
        "off",
    ];
    let mut agent = Agent::start(args).expect("agent");
    agent.wait_ready().expect("ready");
    let dst = server_pod.addr4(8080);

    let (seen, c) = attempt(&client, dst);
    assert_eq!(seen, Seen::Captured, "the live agent captures");
    tcp_echo_roundtrip(&mut c.expect("connected").stream, b"meshed").expect("echo");
    server.next_accept(T).expect("server accepted");

    // kill -9: the links are pinned, so the programs stay attached and SM_PODS still lists
    // the pod, but the listener died with the process.
    let bpffs = agent.bpffs();
    agent.kill().expect("kill -9");
    let killed = Instant::now();

    let mut first = until(&client, dst, Seen::Direct, killed, FAIL_OPEN_WITHIN);
    eprintln!(
        "[failopen] first direct connection {:?} after kill -9",
        killed.elapsed()
    );
    assert_eq!(first.peer, dst, "the app is connected to the server itself");
    tcp_echo_roundtrip(&mut first.stream, b"direct").expect("echo without the mesh");
    assert_eq!(
        unmap(server.next_accept(T).expect("accepted").peer).ip(),
        client.ip4(),
        "the server sees the pod itself"
    );
    let redirected = counter(&agent, &client, "redirect_tcp");
    // Once stale, stale for good: nothing more goes to the dead listener.
    for i in 0..20 {
        let (seen, c) = attempt(&client, dst);
        assert_eq!(seen, Seen::Direct, "attempt {i} after failing open");
        tcp_echo_roundtrip(&mut c.expect("connected").stream, b"x").expect("echo");
    }
    assert_eq!(
        counter(&agent, &client, "redirect_tcp"),
        redirected,
        "no connection was redirected to the dead listener after failing open"
    );
    assert!(
        counter(&agent, &client, "bypass_stale") >= 21,
        "each direct connect is counted as bypass_stale"
    );

    // A new agent on the same pins beats again: the pod is captured again.
    let agent2 = Agent::start_in(bpffs, args).expect("restarted agent");
    agent2.wait_ready().expect("ready again");
    let (seen, c) = attempt(&client, dst);
    assert_eq!(seen, Seen::Captured, "the restarted agent captures again");
    tcp_echo_roundtrip(&mut c.expect("connected").stream, b"meshed again").expect("echo");
    assert_eq!(counter(&agent2, &client, "redirect_tcp"), redirected + 1);
}

/// A hung agent (SIGSTOP: its runtime cannot beat) fails open too, and captures again as soon
/// as it runs again, without a restart.
#[test]
fn hung_agent_fails_open_and_captures_again_when_it_resumes() {
    let (_cluster, client, server_pod, _server) = client_and_echo_server();
    let spec = pod_spec(&client, "");
    // Proxy tier: times how soon connections stop being redirected to a hung agent.
    let agent = Agent::start([
        "--pod",
        &spec,
        "--fail-open-after",
        BOUND,
        "--fast-path",
        "off",
    ])
    .expect("agent");
    agent.wait_ready().expect("ready");
    let dst = server_pod.addr4(8080);
    assert_eq!(attempt(&client, dst).0, Seen::Captured);

    agent.signal(libc::SIGSTOP).expect("SIGSTOP");
    let stopped = Instant::now();
    // Until the bound passes, connections are still redirected and wait in the stopped
    // agent's backlog; then they go direct.
    let mut c = until(&client, dst, Seen::Direct, stopped, FAIL_OPEN_WITHIN);
    tcp_echo_roundtrip(&mut c.stream, b"direct while hung").expect("echo");
    assert!(counter(&agent, &client, "bypass_stale") >= 1);

    agent.signal(libc::SIGCONT).expect("SIGCONT");
    let resumed = Instant::now();
    let mut c = until(&client, dst, Seen::Captured, resumed, FAIL_OPEN_WITHIN);
    tcp_echo_roundtrip(&mut c.stream, b"meshed after resume").expect("echo through the agent");
}

/// `--fail-open-after off`: a dead agent's pinned programs keep redirecting (for operators
/// who run their own proxy on the listener port, as the SO_ORIGINAL_DST test does).
#[test]
fn fail_open_off_keeps_capturing_after_the_agent_dies() {
    let (_cluster, client, server_pod, _server) = client_and_echo_server();
    let spec = pod_spec(&client, "");
    let mut agent =
        Agent::start(["--pod", &spec, "--keep-pins", "--fail-open-after", "off"]).expect("agent");
    agent.wait_ready().expect("ready");
    agent.kill().expect("kill -9");
    // Well past what the 1 s bound would allow: with fail-open off the kernel still redirects,
    // to a listener that is gone.
    std::thread::sleep(Duration::from_secs(3));
    let dst = server_pod.addr4(8080);
    assert_eq!(attempt(&client, dst).0, Seen::Refused);
    assert_eq!(counter(&agent, &client, "bypass_stale"), 0);
}
