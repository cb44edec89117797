//! Restart with pins kept: a new agent re-adopts the pinned maps (counters continue), attaches
//! its own programs and removes the crashed agent's pinned links, so exactly one copy stays
//! attached; removing the pin directory by hand (uninstall) detaches everything.
mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{client_and_echo_server, counter, T};
use serde_json::Value;
use sockmesh_tests::*;

/// sockmesh attaches 13 programs (agent/src/datapath/mod.rs, PROGRAMS).
const PROGRAMS: usize = 13;

fn bpftool(args: &[&str]) -> Value {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("run bpftool (Debian package bpftool; cargo xtask prereqs installs it)");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `bpftool -j cgroup show` prints nothing at all (not `[]`) for a cgroup with no program
    // attached: what the root is once ours are gone and no other agent runs.
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Value::Array(Vec::new());
    }
    serde_json::from_slice(&out.stdout).expect("bpftool JSON")
}

/// The cgroup2 mount the agent attaches to by default.
fn cgroup_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| PathBuf::from(f[1]))
        .expect("a cgroup2 mount")
}

/// Program ids behind the links pinned in `<bpffs>/links`.
fn pinned_programs(bpffs: &Path) -> BTreeSet<u64> {
    let dir = bpffs.join("links");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.expect("entry").path();
            let link = bpftool(&["link", "show", "pinned", &path.to_string_lossy()]);
            link["prog_id"].as_u64().expect("prog_id")
        })
        .collect()
}

/// How many times each program id is attached at the cgroup root (every agent on the machine
/// attaches there; ids tell ours apart).
fn attached(ids: &BTreeSet<u64>) -> Vec<usize> {
    let all = bpftool(&["cgroup", "show", &cgroup_root().to_string_lossy()]);
    let all = all.as_array().expect("array");
    ids.iter()
        .map(|id| all.iter().filter(|p| p["id"].as_u64() == Some(*id)).count())
        .collect()
}

#[test]
fn restart_readopts_maps_replaces_stale_links_and_uninstall_detaches() {
    let (_cluster, client, server_pod, _server) = client_and_echo_server();
    let spec = pod_spec(&client, "");
    // Proxy tier: counts redirects to tell the programs the agent attached are running.
    let args = ["--pod", &spec, "--keep-pins", "--fast-path", "off"];
    let dst = server_pod.addr4(8080);
    let connect = || {
        let mut c = tcp_connect(&client, dst, T).expect("connect");
        assert!(c.local.ip().is_loopback(), "captured");
        tcp_echo_roundtrip(&mut c.stream, b"through the mesh").expect("echo");
    };

    let mut first = Agent::start(args).expect("agent");
    first.wait_ready().expect("ready");
    connect();
    let bpffs = first.bpffs();
    let old = pinned_programs(bpffs.path());
    assert_eq!(old.len(), PROGRAMS);
    assert_eq!(attached(&old), vec![1; PROGRAMS], "each attached once");

    // A crash leaves the links pinned and the programs attached.
    first.kill().expect("kill -9");
    assert_eq!(
        attached(&old),
        vec![1; PROGRAMS],
        "pinned links outlive the agent"
    );

    let second = Agent::start_in(bpffs.clone(), args).expect("restarted agent");
    second.wait_ready().expect("ready again");
    let new = pinned_programs(bpffs.path());
    assert_eq!(new.len(), PROGRAMS);
    assert!(old.is_disjoint(&new), "the new agent pinned its own links");
    assert_eq!(
        attached(&new),
        vec![1; PROGRAMS],
        "one copy of the new programs"
    );
    assert_eq!(
        attached(&old),
        vec![0; PROGRAMS],
        "the crashed agent's links were removed, not stacked"
    );
    // The maps were re-adopted: the pod's counters continue across the restart.
    connect();
    assert_eq!(counter(&second, &client, "redirect_tcp"), 2);

    // Uninstall after a kept-pins exit: removing the directory detaches everything.
    let mut second = second;
    let status = second.stop().expect("SIGTERM");
    assert!(status.success(), "{status}");
    assert_eq!(
        attached(&new),
        vec![1; PROGRAMS],
        "--keep-pins: still attached"
    );
    std::fs::remove_dir_all(bpffs.path()).expect("rm -r the pin directory");
    assert_eq!(attached(&new), vec![0; PROGRAMS], "rm -r detaches");
}
