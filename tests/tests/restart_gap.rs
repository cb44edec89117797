//! No gap on a restart with --keep-pins: while the agent is stopped (SIGTERM) and a new one is
//! started on the same pins, a client connecting in a loop sees every connection either
//! captured by an agent or direct, and every one of them works; none is refused or reset.
//! Once the new agent is ready, connections are captured again.
mod common;

use std::sync::atomic::AtomicBool;
use std::sync::mpsc;

use common::{client_and_echo_server, client_loop, counter, StopOnDrop, ECHO_PORT, T};
use sockmesh_tests::*;

/// Attempts counted once the new agent is ready.
const AFTER_READY: u64 = 50;

#[test]
fn restart_with_kept_pins_refuses_no_connection_and_captures_again() {
    let (_cluster, client, server_pod, _server) = client_and_echo_server();
    let spec = pod_spec(&client, "");
    // Proxy tier: counts redirects to tell that the new agent captures again.
    let args = [
        "--pod",
        &spec,
        "--keep-pins",
        "--drain-timeout",
        "10s",
        "--fast-path",
        "off",
    ];
    let dst = server_pod.addr4(ECHO_PORT);

    let mut first = Agent::start(args).expect("agent");
    first.wait_ready().expect("ready");
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel();
    let tally = std::thread::scope(|s| {
        let looping = s.spawn(|| client_loop(&client, dst, &stop, tx));
        // Whatever happens below, the loop ends (a panic here must not hang the scope).
        let stopper = StopOnDrop(&stop);
        // Some connections through the first agent before it goes.
        for _ in 0..20 {
            rx.recv_timeout(T).expect("the client loop makes progress");
        }

        let status = first.stop().expect("SIGTERM");
        assert!(status.success(), "{status}");
        let second = Agent::start_in(first.bpffs(), args).expect("restarted agent");
        second.wait_ready().expect("ready again");
        // Attempts reported during the gap are queued; skip them, so the ones counted below
        // all started after the new agent was ready (but for at most the one in flight).
        while rx.try_recv().is_ok() {}
        let before = counter(&second, &client, "redirect_tcp");
        let mut captured_after = 0;
        for _ in 0..AFTER_READY {
            captured_after +=
                u64::from(rx.recv_timeout(T).expect("the client loop makes progress"));
        }
        drop(stopper);
        (
            looping.join().expect("client loop"),
            second,
            before,
            captured_after,
        )
    });
    let (tally, second, before, captured_after) = tally;
    eprintln!(
        "[restart_gap] captured {} direct {} failed {}",
        tally.captured,
        tally.direct,
        tally.failures.len()
    );
    assert!(
        tally.failures.is_empty(),
        "connections failed during the restart: {:#?}",
        tally.failures
    );
    assert!(
        captured_after >= AFTER_READY - 1,
        "the new agent captures the loop's connections again: {captured_after} of the last {AFTER_READY}"
    );
    assert!(
        counter(&second, &client, "redirect_tcp") > before,
        "counted by the new agent's programs"
    );
    // And the next connection, on its own, is captured by the new agent.
    assert!(common::redirected(&client, dst), "captured after restart");
}
