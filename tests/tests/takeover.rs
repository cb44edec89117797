//! Upgrade handover (`run --takeover`): the new agent takes the running agent's listening
//! sockets and pins over the control socket, so a client connecting in a loop through the
//! upgrade sees every connection captured and answered (none refused, reset or direct); a
//! long connection on the old agent finishes intact while it drains; the old agent exits 0
//! without removing the pins, and the new one serves on its own afterwards.
mod common;

use std::sync::atomic::AtomicBool;
use std::sync::mpsc;

use common::{client_and_echo_server, client_loop, StopOnDrop, ECHO_PORT, T};
use sockmesh_tests::*;

/// Attempts counted in each phase (before, during the overlap, after the old agent exited).
const PHASE: usize = 30;

#[test]
fn takeover_refuses_no_connection_and_the_old_agent_drains() {
    let (_cluster, client, server_pod, _server) = client_and_echo_server();
    let spec = pod_spec(&client, "");
    // No --keep-pins on either: the old agent's exit must leave the pins anyway.
    // Proxy tier: counts that every connection of the rollout reached one of the two agents.
    let args = [
        "--pod",
        spec.as_str(),
        "--drain-timeout",
        "30s",
        "--fast-path",
        "off",
    ];
    let dst = server_pod.addr4(ECHO_PORT);

    let first = Agent::start(args).expect("agent");
    first.wait_ready().expect("ready");
    // A long connection through the old agent, live across the whole handover.
    let mut long = tcp_connect(&client, dst, T).expect("connect");
    assert!(long.local.ip().is_loopback(), "captured by the old agent");
    tcp_echo_roundtrip(&mut long.stream, b"before").expect("echo before");

    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel();
    let (tally, second, after) = std::thread::scope(|s| {
        let looping = s.spawn(|| client_loop(&client, dst, &stop, tx));
        let stopper = StopOnDrop(&stop);
        let progress = |n: usize| -> usize {
            (0..n)
                .map(|_| usize::from(rx.recv_timeout(T).expect("the client loop makes progress")))
                .sum()
        };
        progress(PHASE);

        let mut takeover: Vec<&str> = args.to_vec();
        takeover.push("--takeover");
        let second = Agent::start_in(first.bpffs(), takeover).expect("new agent");
        let ready = second.wait_ready().expect("new agent ready");
        assert_eq!(
            ready["took_over_from"].as_u64(),
            Some(u64::from(first.pid())),
            "{ready}"
        );
        first
            .wait_event_named("handed_over", T)
            .expect("the old agent hands over");
        progress(PHASE);

        // Two agents at once, each known to the programs by the sockets it registered: the
        // old one's upstream socket of the long connection, the new one's of a fresh
        // connection. Neither is captured again (both connections are answered).
        let mut fresh = tcp_connect(&client, dst, T).expect("connect");
        tcp_echo_roundtrip(&mut fresh.stream, b"fresh").expect("echo on the new agent");
        let owners: Vec<u32> = established(&client)
            .expect("ss")
            .into_iter()
            .filter(|e| e.local.ip() == client.ip4() && e.peer == dst)
            .filter_map(|e| common::agent_socket_owner(&second, e.cookie))
            .collect();
        for (agent, which) in [(&first, "old"), (&second, "new")] {
            assert!(
                owners.contains(&agent.pid()),
                "no upstream socket of the {which} agent registered: {owners:?}"
            );
        }
        drop(fresh);

        // The old agent drains: its live connection still works, then ends normally.
        tcp_echo_roundtrip(&mut long.stream, b"during the drain").expect("echo on the old agent");
        drop(long);
        let status = first
            .wait_exit(T * 4)
            .expect("wait")
            .expect("the old agent exits once drained");
        assert!(status.success(), "old agent: {status}");
        let drained = first
            .events()
            .into_iter()
            .find(|e| e["event"] == "drained")
            .expect("drained event");
        assert_eq!(
            drained["reset"], 0,
            "no connection of the old agent was reset"
        );

        // Only the new agent is left: every connection now captured is served by it.
        while rx.try_recv().is_ok() {}
        let after = progress(PHASE);
        drop(stopper);
        (looping.join().expect("client loop"), second, after)
    });
    eprintln!(
        "[takeover] captured {} direct {} failed {}",
        tally.captured,
        tally.direct,
        tally.failures.len()
    );
    assert!(
        tally.failures.is_empty(),
        "connections failed during the takeover: {:#?}",
        tally.failures
    );
    assert_eq!(tally.direct, 0, "no connection bypassed the mesh");
    assert!(
        after >= PHASE - 1,
        "captured by the new agent: {after} of {PHASE}"
    );
    let pins = second.bpffs().entries().expect("pins");
    assert!(
        pins.iter().any(|p| p == "SM_PODS"),
        "the old agent left the pins: {pins:?}"
    );
    assert!(second.is_running(), "the new agent serves");
    assert!(
        common::redirected(&client, dst),
        "captured after the takeover"
    );
}

#[test]
fn takeover_with_no_running_agent_is_one_clear_error() {
    let dir = BpfFsDir::new().expect("bpffs dir");
    let path = dir.path().to_string_lossy().into_owned();
    let (status, _out, err) = Agent::run_to_exit([
        "run",
        "--takeover",
        "--bpffs-dir",
        &path,
        "--metrics-addr",
        "127.0.0.1:0",
    ])
    .expect("run");
    assert!(!status.success(), "{status}: {err}");
    assert_eq!(err.matches("sockmesh: error:").count(), 1, "{err}");
    assert!(
        err.contains("--takeover: no running agent to take over"),
        "{err}"
    );
    assert_eq!(
        dir.entries().expect("entries"),
        Vec::<String>::new(),
        "nothing pinned"
    );
}

/// `kubectl delete pod` order: SIGTERM reaches the old agent before its successor exists.
/// With --handover-wait it serves on (unready) for that long; the successor arriving within
/// it takes over as in a rollout: nothing refused, reset or direct, pins left to it, and the
/// old agent exits 0 once drained.
#[test]
fn sigterm_first_then_a_successor_within_the_handover_wait_is_a_rollout() {
    let (_cluster, client, server_pod, _server) = client_and_echo_server();
    let spec = pod_spec(&client, "");
    // Proxy tier: asserts that no connection of the rollout went direct.
    let args = [
        "--pod",
        spec.as_str(),
        "--handover-wait",
        "20s",
        "--fast-path",
        "off",
    ];
    let dst = server_pod.addr4(ECHO_PORT);
    let first = Agent::start(args).expect("agent");
    first.wait_ready().expect("ready");
    let metrics = first.metrics_addr().expect("metrics address");

    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel();
    let (tally, second) = std::thread::scope(|s| {
        let looping = s.spawn(|| client_loop(&client, dst, &stop, tx));
        let stopper = StopOnDrop(&stop);
        let progress = |n: usize| {
            for _ in 0..n {
                rx.recv_timeout(T).expect("the client loop makes progress");
            }
        };
        progress(PHASE);
        first.signal(libc::SIGTERM).expect("SIGTERM");
        first
            .wait_event_named("terminating", T)
            .expect("it waits for a successor");
        // Still serving, but no longer ready: the node's probes say this agent is going.
        let (code, _) = prom::http_get(metrics, "/readyz").expect("readyz");
        assert_eq!(code, 503);
        progress(PHASE);

        let mut takeover: Vec<&str> = args.to_vec();
        takeover.push("--takeover");
        let second = Agent::start_in(first.bpffs(), takeover).expect("new agent");
        let ready = second.wait_ready().expect("new agent ready");
        assert_eq!(
            ready["took_over_from"].as_u64(),
            Some(u64::from(first.pid()))
        );
        first
            .wait_event_named("handed_over", T)
            .expect("a rollout, not an uninstall");
        let status = first
            .wait_exit(T * 4)
            .expect("wait")
            .expect("the old agent exits once drained (it was told to stop)");
        assert!(status.success(), "old agent: {status}");
        assert!(
            !first.events().iter().any(|e| e["event"] == "no_successor"),
            "the successor came within the wait"
        );
        progress(PHASE);
        drop(stopper);
        (looping.join().expect("client loop"), second)
    });
    eprintln!(
        "[takeover after SIGTERM] captured {} direct {} failed {}",
        tally.captured,
        tally.direct,
        tally.failures.len()
    );
    assert!(tally.failures.is_empty(), "{:#?}", tally.failures);
    assert_eq!(tally.direct, 0, "no connection bypassed the mesh");
    assert!(second.bpffs_dir().join("SM_PODS").exists(), "pins kept");
    assert!(common::redirected(&client, dst), "the successor serves");
}

/// Without a successor, --handover-wait only delays the uninstall: the agent serves on
/// until the wait ends, then stops for good (pods go direct, pins removed). No connection
/// fails on the way.
#[test]
fn sigterm_without_a_successor_is_an_uninstall_after_the_handover_wait() {
    let (_cluster, client, server_pod, _server) = client_and_echo_server();
    let spec = pod_spec(&client, "");
    let dst = server_pod.addr4(ECHO_PORT);
    let mut agent = Agent::start(["--pod", spec.as_str(), "--handover-wait", "2s"]).expect("agent");
    agent.wait_ready().expect("ready");
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel();
    let tally = std::thread::scope(|s| {
        let looping = s.spawn(|| client_loop(&client, dst, &stop, tx));
        let stopper = StopOnDrop(&stop);
        rx.recv_timeout(T).expect("progress");
        let t = std::time::Instant::now();
        let status = agent.stop().expect("stops");
        assert!(status.success(), "{status}");
        let took = t.elapsed();
        assert!(
            took >= std::time::Duration::from_secs(2),
            "it waited for a successor first: {took:?}"
        );
        agent
            .wait_event_named("no_successor", T)
            .expect("no_successor event");
        for _ in 0..PHASE {
            rx.recv_timeout(T).expect("the client loop makes progress");
        }
        drop(stopper);
        looping.join().expect("client loop")
    });
    assert!(tally.failures.is_empty(), "{:#?}", tally.failures);
    assert!(
        tally.direct > 0,
        "pods go direct once it stopped: {tally:?}"
    );
    let pins = agent.bpffs_dir();
    let left = std::fs::read_dir(pins).map_or(0, |d| d.count());
    assert_eq!(
        left,
        0,
        "an uninstall removes the pins in {}",
        pins.display()
    );
}
