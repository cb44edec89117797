//! `--fast-path-sockets` sizes the kernel fast path's map of direct sockets (`SM_FAST_SOCKS`).
//! A map's size is fixed when it is created and the pins outlive an agent: a plain start over
//! pins of another size replaces the map, so the flag takes effect; a takeover keeps the
//! running agent's map (its direct sockets are in it) and says how to resize. A size the agent
//! cannot give is one clear error.
mod common;

use std::path::Path;
use std::process::Command;

use common::{client_and_echo_server, T};
use serde_json::Value;
use sockmesh_common::map_names;
use sockmesh_tests::*;

fn max_entries(dir: &Path) -> u64 {
    let pin = dir.join(map_names::FAST_SOCKETS);
    let out = Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(&pin)
        .output()
        .expect("run bpftool (Debian package bpftool; cargo xtask prereqs installs it)");
    assert!(
        out.status.success(),
        "bpftool map show {}: {}",
        pin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    v["max_entries"].as_u64().expect("max_entries")
}

#[test]
fn the_direct_socket_map_is_sized_by_the_flag_at_a_start_and_kept_across_a_takeover() {
    let (_cluster, client, _server_pod, _server) = client_and_echo_server();
    let spec = pod_spec(&client, "");
    let args = |n: &'static str| {
        vec![
            "--pod",
            spec.as_str(),
            "--keep-pins",
            "--fast-path",
            "auto",
            "--fast-path-sockets",
            n,
        ]
    };
    let mut first = Agent::start(args("1000")).expect("agent");
    first.wait_ready().expect("ready");
    assert_eq!(max_entries(first.bpffs_dir()), 1000);

    // A crash keeps the pins; a plain start asking for another size gets it.
    let bpffs = first.bpffs();
    first.kill().expect("kill -9");
    let second = Agent::start_in(bpffs.clone(), args("2000")).expect("restarted agent");
    second.wait_ready().expect("ready again");
    assert_eq!(max_entries(bpffs.path()), 2000);

    // A takeover keeps the running agent's map, and says so.
    let mut takeover = args("3000");
    takeover.push("--takeover");
    let third = Agent::start_in(bpffs.clone(), takeover).expect("new agent");
    third.wait_ready().expect("new agent ready");
    second
        .wait_event_named("handed_over", T)
        .expect("the old agent hands over");
    assert_eq!(max_entries(bpffs.path()), 2000);
    let log = third.stderr();
    assert!(
        log.contains("--fast-path-sockets takes effect at the next start without --takeover"),
        "{log}"
    );
}

#[test]
fn a_direct_socket_map_size_out_of_range_is_one_clear_error() {
    for (bad, says) in [
        ("0", "must be at least 1"),
        ("16777217", "is more than 16777216"),
    ] {
        let (status, _, err) =
            Agent::run_to_exit(["run", "--fast-path-sockets", bad]).expect("run sockmesh");
        assert!(!status.success(), "--fast-path-sockets {bad} accepted");
        assert!(
            err.contains("--fast-path-sockets") && err.contains(says),
            "--fast-path-sockets {bad}: {err}"
        );
    }
}

/// A pod's quota of direct sockets larger than the map they count in would promise what the
/// map cannot give: refused at start, naming both flags. (Left unset, the quota follows a
/// small map down instead: see the test above, whose maps are smaller than the default.)
#[test]
fn a_pod_quota_of_direct_sockets_beyond_the_map_is_one_clear_error() {
    let (status, _, err) = Agent::run_to_exit([
        "run",
        "--fast-path-sockets",
        "1000",
        "--pod-direct-conns",
        "2000",
    ])
    .expect("run sockmesh");
    assert!(!status.success(), "accepted");
    let errors: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("sockmesh: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(
        errors[0].contains("--pod-direct-conns 2000 is more than --fast-path-sockets 1000"),
        "{err}"
    );
}
