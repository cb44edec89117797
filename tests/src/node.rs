//! A Kubernetes node as the container test plays it on this machine, and the kubelet's part in
//! starting a pod there: the node's name and address, where its host paths are, and every
//! volume of the pod set up (hostPath directories, ConfigMaps and the service account
//! projected the way the kubelet writes them).

use crate::agent::BpfFsDir;
use crate::kubelet::CGROUP2;
use crate::manifest::Manifest;
use crate::netns::NETNS_DIR;
use crate::tempdir::TempDir;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One node: a name, an address, and private directories standing in for its host paths.
pub struct Node {
    pub name: String,
    /// The node's address, on loopback: 127.x.y.z, a different one per node so that two
    /// tests' agents never share a port (the DaemonSet listens on the node address).
    pub ip: Ipv4Addr,
    bpffs: Arc<BpfFsDir>,
    root: TempDir,
}

impl Node {
    pub fn new() -> Result<Node> {
        let r = crate::names::random_hex(3);
        let b = |i: usize| u8::from_str_radix(&r[2 * i..2 * i + 2], 16).expect("hex");
        Ok(Node {
            name: crate::names::unique_name(),
            // 127.100.0.0-127.227.255.254: clear of 127.0.0.1 and the usual 127.0.x.y.
            ip: Ipv4Addr::new(127, 100 + b(0) % 128, b(1), b(2).clamp(1, 254)),
            bpffs: BpfFsDir::new()?,
            root: TempDir::new()?,
        })
    }

    /// The node's bpf filesystem (a private directory of this machine's).
    pub fn bpffs(&self) -> Arc<BpfFsDir> {
        self.bpffs.clone()
    }

    /// Where the node's `path` is on this machine. Where this machine differs from a node:
    /// - `/sys/fs/bpf`: a private directory of this machine's bpffs, so the agent's pins never
    ///   touch those of an agent running here for real, or of another test;
    /// - `/sys/fs/cgroup`: this machine mounts cgroup v1 controllers there and cgroup2 at
    ///   `/sys/fs/cgroup/unified` (a node with the unified hierarchy has cgroup2 at
    ///   `/sys/fs/cgroup`), so that path is the cgroup2 mount;
    /// - `/var/run/netns` (and `/run/netns`): this machine's own, where the test pods are;
    /// - any other path: a directory of the node's own, private to the test.
    pub fn host_path(&self, path: &str) -> PathBuf {
        let path = Path::new(path);
        if let Ok(rest) = path.strip_prefix("/sys/fs/bpf") {
            return self.bpffs.path().join(rest);
        }
        if let Ok(rest) = path.strip_prefix("/sys/fs/cgroup") {
            return Path::new(CGROUP2).join(rest);
        }
        for netns in ["/var/run/netns", "/run/netns"] {
            if let Ok(rest) = path.strip_prefix(netns) {
                return Path::new(NETNS_DIR).join(rest);
            }
        }
        self.root.join(path.strip_prefix("/").unwrap_or(path))
    }
}

/// Writes `files` into `dir` the way the kubelet projects a ConfigMap or a service account
/// token (its atomic writer): the files in a timestamped directory, `..data` linking to it,
/// and each name a link through `..data`. Called again, it is an update as the kubelet makes
/// one: a new directory, `..data` swapped to it with one rename, the old directory removed.
pub fn project(dir: &Path, files: &BTreeMap<String, Vec<u8>>, mode: u32) -> Result<()> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let stamp = format!("..{nanos}");
    let data = dir.join(&stamp);
    fs::create_dir_all(&data).with_context(|| format!("create {}", data.display()))?;
    for (name, bytes) in files {
        let f = data.join(name);
        fs::write(&f, bytes).with_context(|| format!("write {}", f.display()))?;
        fs::set_permissions(&f, fs::Permissions::from_mode(mode))?;
        let link = dir.join(name);
        if fs::symlink_metadata(&link).is_err() {
            symlink(Path::new("..data").join(name), link)?;
        }
    }
    let old = fs::read_link(dir.join("..data")).ok();
    symlink(&stamp, dir.join("..data_tmp"))?;
    fs::rename(dir.join("..data_tmp"), dir.join("..data"))?;
    if let Some(old) = old {
        fs::remove_dir_all(dir.join(old))?;
    }
    Ok(())
}

/// The service account's files, as the kubelet projects them for a pod in `namespace`.
pub struct ServiceAccount<'a> {
    pub namespace: &'a str,
    pub token: &'a str,
    pub ca_pem: &'a str,
}

/// The kubelet's part in starting the DaemonSet's pod on `node`: every volume ready on this
/// machine (by name), and the service account's projected directory. Scratch volumes
/// (ConfigMaps, emptyDirs, the token) go under `scratch`.
pub fn pod_volumes(
    node: &Node,
    m: &Manifest,
    sa: &ServiceAccount,
    scratch: &Path,
) -> Result<(BTreeMap<String, PathBuf>, PathBuf)> {
    let mut out = BTreeMap::new();
    for v in &m.pod().volumes {
        let own = scratch.join("volumes").join(&v.name);
        let path = match (&v.host_path, &v.config_map, &v.empty_dir) {
            (Some(hp), None, None) => {
                let p = node.host_path(&hp.path);
                match hp.kind.as_deref().unwrap_or("") {
                    "" => {}
                    "DirectoryOrCreate" => fs::create_dir_all(&p)
                        .with_context(|| format!("hostPath {}: create {}", v.name, p.display()))?,
                    "Directory" if p.is_dir() => {}
                    "Directory" => bail!(
                        "hostPath {} ({}): no directory at {} on the node; the kubelet would not start the pod",
                        v.name,
                        hp.path,
                        p.display()
                    ),
                    other => bail!("hostPath type {other} is not modelled by the container test"),
                }
                p
            }
            (None, Some(cm), None) => {
                let files = m
                    .config_map(&cm.name)?
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
                    .collect();
                project(&own, &files, cm.default_mode.unwrap_or(0o644))?;
                own
            }
            (None, None, Some(_)) => {
                fs::create_dir_all(&own)?;
                own
            }
            _ => bail!(
                "volume {}: give exactly one of hostPath, configMap, emptyDir",
                v.name
            ),
        };
        out.insert(v.name.clone(), path);
    }
    let sa_dir = scratch.join("serviceaccount");
    let files = BTreeMap::from([
        ("ca.crt".to_string(), sa.ca_pem.as_bytes().to_vec()),
        ("namespace".to_string(), sa.namespace.as_bytes().to_vec()),
        ("token".to_string(), sa.token.as_bytes().to_vec()),
    ]);
    project(&sa_dir, &files, 0o644)?;
    Ok((out, sa_dir))
}
