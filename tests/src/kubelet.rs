//! Pod cgroups named the way the kubelet names them, under a private `smt-...` directory of
//! the cgroup2 mount, so the agent's netns resolver finds a test pod's processes by pod UID
//! exactly as it would on a node: `.../kubepods.slice/kubepods-besteffort.slice/
//! kubepods-besteffort-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope` (systemd
//! driver) or `.../kubepods/besteffort/pod<uid>/<id>` (cgroupfs driver).

use crate::names::{random_hex, unique_name};
use anyhow::{Context, Result};
use std::fs;
use std::path::{Path, PathBuf};

/// The cgroup2 mount the tests use.
pub const CGROUP2: &str = "/sys/fs/cgroup/unified";

#[derive(Clone, Copy, Debug)]
pub enum Driver {
    Systemd,
    Cgroupfs,
}

/// A fresh pod UID (8-4-4-4-12 hex).
pub fn new_uid() -> String {
    let h = random_hex(16);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// One pod's cgroup subtree; containers are added with [`KubeletPod::container`]. Dropping it
/// moves any process still inside back to the root cgroup and removes the directories.
#[derive(Debug)]
pub struct KubeletPod {
    root: PathBuf,
    pod_dir: PathBuf,
    driver: Driver,
    pub uid: String,
}

impl KubeletPod {
    pub fn new(uid: &str, driver: Driver) -> Result<Self> {
        crate::sys::require_root();
        let root = Path::new(CGROUP2).join(unique_name());
        let pod_dir = match driver {
            Driver::Systemd => root
                .join("kubepods.slice/kubepods-besteffort.slice")
                .join(format!(
                    "kubepods-besteffort-pod{}.slice",
                    uid.replace('-', "_")
                )),
            Driver::Cgroupfs => root.join("kubepods/besteffort").join(format!("pod{uid}")),
        };
        fs::create_dir_all(&pod_dir).with_context(|| format!("mkdir {}", pod_dir.display()))?;
        Ok(KubeletPod {
            root,
            pod_dir,
            driver,
            uid: uid.to_string(),
        })
    }

    /// Puts `pid` into a new container cgroup of this pod (`cri-containerd-<id>.scope` or
    /// `crio-<id>` style, by driver); returns the container id.
    pub fn container(&self, pid: u32) -> Result<String> {
        let id = random_hex(32);
        let dir = match self.driver {
            Driver::Systemd => self.pod_dir.join(format!("cri-containerd-{id}.scope")),
            Driver::Cgroupfs => self.pod_dir.join(format!("crio-{id}")),
        };
        fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        fs::write(dir.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("move {pid} into {}", dir.display()))?;
        Ok(id)
    }
}

/// Moves every process of `dir`'s subtree to the cgroup2 root, then removes the subtree.
pub fn remove_cgroup_tree(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&e.path());
        }
    }
    if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.split_whitespace() {
            let _ = fs::write(Path::new(CGROUP2).join("cgroup.procs"), pid);
        }
    }
    if let Err(e) = fs::remove_dir(dir) {
        eprintln!("[smt] warning: rmdir {}: {e}", dir.display());
    }
}

impl Drop for KubeletPod {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.root);
    }
}
