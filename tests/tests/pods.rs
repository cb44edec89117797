//! Pods leave at runtime: a `--pod` whose namespace goes away (its process exits, or its
//! netns file is deleted) is removed, its redirect stops, and the agent lets go of the
//! namespace (no thread left inside it), while other pods keep working.
//!
//! Tier: the default (`--fast-path auto`); each pod connects to a peer once, so the proxy
//! takes it (a peer's first connection is always proxied) and a redirect shows the capture.
mod common;

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{redirected, T};
use sockmesh_tests::names::unique_name;
use sockmesh_tests::*;

/// Threads of `pid` whose network namespace is `ns` (device, inode).
fn threads_in(pid: u32, ns: (u64, u64)) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| {
            rd.flatten()
                .filter(|t| sys::ns_id(&t.path().join("ns/net")).ok() == Some(ns))
                .count()
        })
        .unwrap_or(0)
}

/// Waits (bounded) for the agent's last thread to leave `ns`: a thread ending has no event
/// to wait on from outside the process.
fn agent_leaves(agent: &Agent, ns: (u64, u64)) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while threads_in(agent.pid(), ns) > 0 {
        assert!(
            Instant::now() < deadline,
            "the agent still has a thread in the removed pod's namespace"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_pod_whose_process_exits_is_removed_and_the_others_keep_working() {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let server_pod = cluster.add_pod("server").expect("pod");
    let _server =
        TcpServer::start(&server_pod, "0.0.0.0:8080".parse().expect("addr")).expect("server");
    let dst = server_pod.addr4(8080);
    let gone = cluster.add_pod("gone").expect("pod");
    let stays = cluster.add_pod("stays").expect("pod");
    let mut anchor = gone.spawn(&["sleep", "1000"]).expect("sleep");
    let by_pid = format!("/proc/{}/ns/net", anchor.pid());
    let agent = Agent::start(["--pod", &by_pid, "--pod", &pod_spec(&stays, "")]).expect("agent");
    agent.wait_ready().expect("ready");
    assert!(redirected(&gone, dst));
    let ns = sys::ns_id(gone.netns_path()).expect("ns id");
    assert!(
        threads_in(agent.pid(), ns) > 0,
        "the agent works inside the pod"
    );

    anchor.kill().expect("kill");
    let ev = agent
        .wait_event(
            |v| v["event"] == "pod_removed" && v["pod"] == by_pid.as_str(),
            T,
        )
        .expect("pod_removed");
    assert!(
        ev["reason"].as_str().unwrap_or("").contains("exited"),
        "{ev}"
    );
    assert_eq!(
        ev["netns_cookie"].as_u64(),
        Some(gone.netns_cookie().expect("cookie"))
    );
    assert!(!redirected(&gone, dst), "no longer captured");
    assert!(redirected(&stays, dst), "the other pod is unaffected");
    agent_leaves(&agent, ns);
    let stats = agent.stats().expect("stats");
    assert!(
        !common::has_row(&stats, &gone),
        "its counters are gone: {stats}"
    );
    assert!(common::has_row(&stats, &stays));
}

#[test]
fn a_pod_whose_netns_file_is_deleted_is_removed() {
    require_root();
    // A namespace of our own (not a harness Pod), since the test deletes it.
    let name = unique_name();
    sys::ip(&["netns", "add", &name]).expect("ip netns add");
    let path = Path::new("/var/run/netns").join(&name);
    let holder = File::open(&path).expect("open netns");
    let ns = sys::ns_id(&path).expect("ns id");
    let cleanup = scopeguard(&name);
    sys::ip(&["-n", &name, "link", "set", "lo", "up"]).expect("lo up");

    let path_s = path.display().to_string();
    let agent = Agent::start(["--pod", &path_s]).expect("agent");
    agent.wait_ready().expect("ready");
    assert!(threads_in(agent.pid(), ns) > 0);

    sys::ip(&["netns", "del", &name]).expect("ip netns del");
    let ev = agent
        .wait_event(
            |v| v["event"] == "pod_removed" && v["pod"] == path_s.as_str(),
            T,
        )
        .expect("pod_removed");
    assert!(
        ev["reason"].as_str().unwrap_or("").contains("deleted"),
        "{ev}"
    );
    agent_leaves(&agent, ns);
    assert!(agent.is_running());
    drop(holder);
    drop(cleanup);
}

/// Deletes the named namespace at the end if the test did not.
struct NetnsName(String);

impl Drop for NetnsName {
    fn drop(&mut self) {
        if Path::new("/var/run/netns").join(&self.0).exists() {
            let _ = sys::ip(&["netns", "del", &self.0]);
        }
    }
}

fn scopeguard(name: &str) -> NetnsName {
    NetnsName(name.to_string())
}
