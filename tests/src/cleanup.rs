//! Removing leftovers of test processes that died without running their destructors (SIGKILL,
//! a timeout, a crash). Everything the harness creates is named `smt-<pid>-...`, so a leftover
//! is anything with that prefix whose pid is no longer alive. Resources of live test processes
//! are never touched, so this is safe to run while other tests run.

use crate::agent::BPFFS_ROOT;
use crate::names::{owner_pid, PREFIX};
use crate::netns::{ETC_NETNS_DIR, NETNS_DIR};
use crate::sys;
use anyhow::Result;
use std::fs;
use std::path::{Path, PathBuf};

/// Whether `name` is ours and its owner process is gone.
fn stale(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| !sys::pid_alive(pid))
}

/// Entries of `dir` named like ours and owned by dead processes (missing dir: none).
fn stale_entries(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<(String, PathBuf)> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            stale(&name).then(|| (name, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// The `smt-...` name of the bpffs dir an agent process was started with, if any.
fn agent_bpffs_name(argv: &[String]) -> Option<String> {
    let root = format!("{BPFFS_ROOT}/{PREFIX}");
    argv.iter().enumerate().find_map(|(i, a)| {
        let value = match a.strip_prefix("--bpffs-dir=") {
            Some(v) => v,
            None if i > 0 && argv[i - 1] == "--bpffs-dir" => a.as_str(),
            None => return None,
        };
        value.starts_with(&root).then(|| {
            value[BPFFS_ROOT.len() + 1..]
                .trim_end_matches('/')
                .to_owned()
        })
    })
}

/// Removes leftovers of dead test processes and returns one line per action taken:
/// agents still running for a dead test (killed first, so nothing re-pins), processes inside
/// stale namespaces (killed), the namespaces (`ip netns del`), their /etc/netns overrides, bpffs
/// directories, and /tmp scratch directories.
pub fn sweep_stale() -> Result<Vec<String>> {
    let mut done = Vec::new();
    let me = std::process::id();

    // 0. Containers: an agent in a runc container (killed and removed with its cgroups), and
    //    the podman container an image is exported from. Only where those tools exist.
    if crate::sys::on_path("runc") {
        for id in crate::runc::list().into_iter().filter(|id| stale(id)) {
            crate::runc::delete(&id);
            done.push(format!("removed runc container {id}"));
        }
    }
    if crate::sys::on_path("podman") {
        for name in crate::image::containers().into_iter().filter(|n| stale(n)) {
            crate::image::remove_container(&name);
            done.push(format!("removed podman container {name}"));
        }
    }

    // 1. Orphaned agents: their test died, so nobody will stop them.
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            if let Some(name) = agent_bpffs_name(&sys::cmdline(pid)) {
                if stale(&name) {
                    let _ = sys::signal(pid as libc::pid_t, libc::SIGKILL);
                    done.push(format!("killed agent pid {pid} (bpffs {name})"));
                }
            }
        }
    }

    // 2. Namespaces: kill what runs inside, then delete.
    for (name, path) in stale_entries(Path::new(NETNS_DIR)) {
        match sys::kill_netns_processes(&path) {
            Ok(pids) if !pids.is_empty() => {
                done.push(format!("killed pids {pids:?} in netns {name}"));
            }
            Ok(_) => {}
            Err(e) => done.push(format!("could not scan netns {name}: {e}")),
        }
        match sys::ip(&["netns", "del", &name]) {
            Ok(_) => done.push(format!("deleted netns {name}")),
            Err(e) => done.push(format!("could not delete netns {name}: {e:#}")),
        }
    }

    // 3. Directories: /etc/netns overrides, bpffs pins (unpinning frees maps and detaches
    //    links nobody else holds), scratch dirs.
    let dirs = [
        PathBuf::from(ETC_NETNS_DIR),
        PathBuf::from(BPFFS_ROOT),
        std::env::temp_dir(),
    ];
    for dir in dirs {
        for (_, path) in stale_entries(&dir) {
            match fs::remove_dir_all(&path) {
                Ok(()) => done.push(format!("removed {}", path.display())),
                Err(e) => done.push(format!("could not remove {}: {e}", path.display())),
            }
        }
    }
    // 4. Kubelet-style pod cgroups (tests of the netns resolver): processes go back to the
    //    root cgroup, then the subtree is removed.
    for (_, path) in stale_entries(Path::new(crate::kubelet::CGROUP2)) {
        crate::kubelet::remove_cgroup_tree(&path);
        done.push(format!("removed cgroup {}", path.display()));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_owned).collect()
    }

    #[test]
    fn finds_agent_bpffs_dir() {
        assert_eq!(
            agent_bpffs_name(&argv(
                "sockmesh run --pod /x --bpffs-dir /sys/fs/bpf/smt-12-0-ab"
            )),
            Some("smt-12-0-ab".into())
        );
        assert_eq!(
            agent_bpffs_name(&argv("sockmesh run --bpffs-dir=/sys/fs/bpf/smt-12-0-ab/")),
            Some("smt-12-0-ab".into())
        );
        assert_eq!(
            agent_bpffs_name(&argv("sockmesh run --bpffs-dir /sys/fs/bpf/sockmesh")),
            None
        );
        assert_eq!(agent_bpffs_name(&argv("nginx -g daemon")), None);
    }

    #[test]
    fn live_owner_is_not_stale() {
        assert!(!stale(&crate::names::unique_name()));
        assert!(!stale("sockmesh"));
    }
}
