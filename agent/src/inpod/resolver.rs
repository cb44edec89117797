//! From a Kubernetes pod UID to its network namespace, on a node where the agent shares the
//! host's PID namespace (`hostPID: true`): every container of a pod, the sandbox ("pause")
//! included, lives in a cgroup whose path names the pod UID, so scanning `/proc/*/cgroup` finds
//! the pod's processes, and `/proc/PID/ns/net` is its namespace.
//!
//! The kubelet names the pod cgroup differently per cgroup driver:
//!
//! * systemd: `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/...`
//!   with the UID's dashes written as underscores (systemd reserves `-` as the hierarchy
//!   separator); Guaranteed pods sit directly under `kubepods.slice` as `kubepods-pod<uid>.slice`;
//! * cgroupfs: `/kubepods/burstable/pod<uid>/<container>` (`/kubepods/pod<uid>/...` for
//!   Guaranteed), the UID as is.
//!
//! The container's own cgroup is named by the runtime: `cri-containerd-<id>.scope` or
//! `crio-<id>.scope` (systemd driver), `<id>` or `crio-<id>` (cgroupfs). Anything may come
//! before `kubepods` (a cgroup namespace root, a nested node, a test's private subtree), so the
//! match is on the segments, not on a fixed prefix.
//!
//! Parsing is pure and unit-tested; [`Resolver::find`] is the I/O around it.
use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// A namespace's identity: device and inode of its nsfs file.
pub type NsId = (u64, u64);

/// The pod UID named by one cgroup path, if it is a kubelet pod cgroup or below one.
pub fn pod_uid_from_cgroup_path(path: &str) -> Option<String> {
    let mut under_kubepods = false;
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        // systemd driver: kubepods[-qos]-pod<uid_with_underscores>.slice
        if let Some(slice) = seg.strip_suffix(".slice") {
            if slice.starts_with("kubepods") {
                under_kubepods = true;
                if let Some((_, uid)) = slice.rsplit_once("-pod") {
                    let uid = uid.replace('_', "-");
                    if is_uid(&uid) {
                        return Some(uid);
                    }
                }
                continue;
            }
        }
        if seg == "kubepods" || seg.starts_with("kubepods-") {
            under_kubepods = true;
            continue;
        }
        // cgroupfs driver: .../kubepods/[qos/]pod<uid>
        if under_kubepods {
            if let Some(uid) = seg.strip_prefix("pod") {
                if is_uid(uid) {
                    return Some(uid.to_string());
                }
            }
        }
    }
    None
}

/// The container runtime's id for a container cgroup segment (`cri-containerd-<id>.scope`,
/// `crio-<id>.scope`, `docker-<id>.scope`, `crio-<id>`, or a bare 64-hex-digit `<id>`).
pub fn container_id_from_segment(seg: &str) -> Option<&str> {
    let base = seg.strip_suffix(".scope").unwrap_or(seg);
    let id = ["cri-containerd-", "crio-", "docker-", "cri-o-"]
        .iter()
        .find_map(|p| base.strip_prefix(p))
        .unwrap_or(base);
    (id.len() >= 12 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// The pod UID and container id in the content of a `/proc/PID/cgroup` file. Every line is
/// looked at (cgroup v2's `0::/path` and v1's `N:controllers:/path` on hybrid hosts).
pub fn pod_of_proc_cgroup(content: &str) -> Option<(String, Option<String>)> {
    content.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        let uid = pod_uid_from_cgroup_path(path)?;
        let container = path
            .rsplit('/')
            .find(|s| !s.is_empty())
            .and_then(container_id_from_segment)
            .map(str::to_string);
        Some((uid, container))
    })
}

/// A Kubernetes UID: 8-4-4-4-12 hex digits.
fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Where a pod's namespace was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The pod process whose namespace this is (the lowest PID: normally the sandbox, which
    /// lives as long as the pod's network does).
    pub pid: u32,
    pub container: Option<String>,
    /// `/proc/PID/ns/net` under the resolver's proc root.
    pub netns: PathBuf,
    pub ns_id: NsId,
}

/// Finds pods' namespaces by scanning a proc filesystem.
#[derive(Clone, Debug)]
pub struct Resolver {
    proc_root: PathBuf,
    /// The agent's own (host) namespace: never a pod's, even if a hostNetwork pod slipped by.
    host: Option<NsId>,
}

impl Resolver {
    pub fn new(proc_root: &Path) -> Resolver {
        let host = ns_id(&proc_root.join("self/ns/net")).ok();
        Resolver {
            proc_root: proc_root.to_path_buf(),
            host,
        }
    }

    /// The namespace of pod `uid`'s processes, if any process of it is running.
    pub fn find(&self, uid: &str) -> Option<Resolved> {
        let mut best: Option<Resolved> = None;
        for entry in fs::read_dir(&self.proc_root).ok()?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if best.as_ref().is_some_and(|b| b.pid < pid) {
                continue;
            }
            // A process may exit mid-scan: every read failing just skips it.
            let Ok(content) = fs::read_to_string(entry.path().join("cgroup")) else {
                continue;
            };
            let Some((found, container)) = pod_of_proc_cgroup(&content) else {
                continue;
            };
            if found != uid {
                continue;
            }
            let netns = entry.path().join("ns/net");
            let Ok(id) = ns_id(&netns) else { continue };
            if Some(id) == self.host {
                continue;
            }
            best = Some(Resolved {
                pid,
                container,
                netns,
                ns_id: id,
            });
        }
        best
    }
}

/// Device and inode of a namespace file (following the /proc magic link).
pub fn ns_id(path: &Path) -> std::io::Result<NsId> {
    let m = fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "5e3bd4a2-9c1f-4b7e-8f00-0123456789ab";

    #[test]
    fn systemd_driver_paths() {
        let u = UID.replace('-', "_");
        for path in [
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-0123456789abcdef0123456789abcdef.scope"),
            format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/crio-abcdefabcdef0123.scope"),
            format!("/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-aaaaaaaaaaaa.scope"),
            format!("/kubepods.slice/kubepods-pod{u}.slice"),
            // Nested under something else (a test subtree, a kind node).
            format!("/smt-1-x/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-abcabcabcabc.scope"),
        ] {
            assert_eq!(pod_uid_from_cgroup_path(&path).as_deref(), Some(UID), "{path}");
        }
    }

    #[test]
    fn cgroupfs_driver_paths() {
        for path in [
            format!("/kubepods/burstable/pod{UID}/0123456789abcdef0123456789abcdef"),
            format!("/kubepods/besteffort/pod{UID}/crio-0123456789abcdef"),
            format!("/kubepods/pod{UID}/0123456789ab"),
            format!("/docker/abc/kubepods/pod{UID}"),
        ] {
            assert_eq!(
                pod_uid_from_cgroup_path(&path).as_deref(),
                Some(UID),
                "{path}"
            );
        }
    }

    #[test]
    fn non_pod_paths_are_not_pods() {
        for path in [
            "/",
            "/system.slice/containerd.service",
            "/user.slice/user-0.slice/session-1.scope",
            "/kubepods.slice/kubepods-burstable.slice",
            "/kubepods/burstable",
            // `pod<uid>` outside kubepods is not the kubelet's.
            "/pod5e3bd4a2-9c1f-4b7e-8f00-0123456789ab/x",
            // Not a UID.
            "/kubepods/burstable/podnotauid/abc",
            "/kubepods.slice/kubepods-burstable-pod1234.slice",
        ] {
            assert_eq!(pod_uid_from_cgroup_path(path), None, "{path}");
        }
    }

    #[test]
    fn container_ids() {
        let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(
            container_id_from_segment(&format!("cri-containerd-{id}.scope")),
            Some(id)
        );
        assert_eq!(
            container_id_from_segment(&format!("crio-{id}.scope")),
            Some(id)
        );
        assert_eq!(container_id_from_segment(&format!("crio-{id}")), Some(id));
        assert_eq!(container_id_from_segment(id), Some(id));
        assert_eq!(container_id_from_segment("kubepods-burstable.slice"), None);
        assert_eq!(container_id_from_segment("session-1.scope"), None);
    }

    #[test]
    fn proc_cgroup_files_v2_and_hybrid() {
        let u = UID.replace('-', "_");
        let v2 = format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-abcdef012345.scope\n");
        assert_eq!(
            pod_of_proc_cgroup(&v2),
            Some((UID.to_string(), Some("abcdef012345".to_string())))
        );
        let hybrid = format!(
            "12:pids:/kubepods/burstable/pod{UID}/abcdef0123456789\n1:name=systemd:/\n0::/\n"
        );
        assert_eq!(
            pod_of_proc_cgroup(&hybrid),
            Some((UID.to_string(), Some("abcdef0123456789".to_string())))
        );
        // The pod cgroup itself (a process directly in it): no container.
        let bare = format!("0::/kubepods/pod{UID}\n");
        assert_eq!(pod_of_proc_cgroup(&bare), Some((UID.to_string(), None)));
        assert_eq!(pod_of_proc_cgroup("0::/system.slice/ssh.service\n"), None);
    }

    #[test]
    fn the_host_namespace_is_never_a_pod() {
        // This test process is in no pod cgroup: nothing is found for any UID.
        let r = Resolver::new(Path::new("/proc"));
        assert!(r.host.is_some());
        assert_eq!(r.find(UID), None);
    }
}
