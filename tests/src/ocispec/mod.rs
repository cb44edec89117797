//! The OCI runtime spec (`config.json`) a kubelet and its container runtime would give the
//! DaemonSet's container, generated from the manifest ([`crate::manifest`]): process (command,
//! args and env with `$(VAR)` expanded and `fieldRef`s filled in, user, capabilities),
//! namespaces (hostPID, hostNetwork), read-only root, every volume mount plus the service
//! account's, resources. Pure: where the volumes are on this machine comes in [`PodContext`].
//!
//! What a node's runtime adds that this spec leaves out, each for the reason given where it is
//! decided: `process.rlimits` (see [`spec`]), the kubelet's /etc/hosts, /etc/resolv.conf and
//! /dev/termination-log files (the agent reads none of them), seccomp profiles other than
//! `Unconfined` (the manifest asks for that one).

use crate::caps::cap_names;
use crate::manifest::{cpu_millis, memory_bytes, Container, Manifest, PodSpec};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

/// Where the kubelet mounts the service account's token, CA and namespace.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// What the image says (`podman image inspect`'s `Config`).
#[derive(Debug, Clone, Default)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

/// What the kubelet knows when it starts the pod on a node.
#[derive(Debug, Clone)]
pub struct PodContext {
    pub pod_name: String,
    pub pod_uid: String,
    pub node_name: String,
    /// The node's address: also the pod's, with hostNetwork.
    pub node_ip: IpAddr,
    /// The API server as the kubelet announces it (`KUBERNETES_SERVICE_HOST`/`_PORT`).
    pub api_host: String,
    pub api_port: u16,
    /// Where each of the pod's volumes is on this machine.
    pub volumes: BTreeMap<String, PathBuf>,
    /// The projected service-account volume (token, ca.crt, namespace), if mounted.
    pub service_account: Option<PathBuf>,
    /// The container's cgroup (relative to each hierarchy's root).
    pub cgroups_path: String,
    /// The image's filesystem, unpacked.
    pub rootfs: PathBuf,
}

/// The container's capabilities as `CAP_*` names, from its securityContext.
pub fn capabilities(c: &Container) -> Result<Vec<String>> {
    let sc = c.security_context.as_ref();
    if sc.and_then(|s| s.privileged) == Some(true) {
        bail!("privileged containers are not modelled: the manifest grants capabilities instead");
    }
    let none = Default::default();
    let caps = sc.and_then(|s| s.capabilities.as_ref()).unwrap_or(&none);
    let mut set: Vec<String> = if caps.drop.iter().any(|d| d == "ALL") {
        Vec::new()
    } else {
        // What the runtime grants when the pod spec drops none.
        let defaults = crate::caps::CONTAINER_DEFAULT
            .iter()
            .fold(0, |m, c| m | 1 << c);
        cap_names(defaults)
            .into_iter()
            .map(|c| c.trim_start_matches("CAP_").to_string())
            .filter(|d| !caps.drop.contains(d))
            .collect()
    };
    for a in &caps.add {
        if a == "ALL" {
            bail!("capabilities.add: ALL is not modelled");
        }
        if !set.contains(a) {
            set.push(a.clone());
        }
    }
    Ok(set.into_iter().map(|c| format!("CAP_{c}")).collect())
}

/// Kubernetes' `$(VAR)` expansion (command, args and env values): a defined variable is
/// replaced, `$$` is a literal `$`, anything else is left as written.
pub fn expand(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some((name, tail)) = after.strip_prefix('(').and_then(|a| a.split_once(')')) {
            match vars.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(&format!("$({name})")),
            }
            rest = tail;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A `fieldRef` value as the kubelet fills it in.
fn field(path: &str, m: &Manifest, ctx: &PodContext) -> Result<String> {
    let pod = m.pod();
    Ok(match path {
        "metadata.name" => ctx.pod_name.clone(),
        "metadata.namespace" => m.daemonset.metadata.namespace.clone(),
        "metadata.uid" => ctx.pod_uid.clone(),
        "spec.nodeName" => ctx.node_name.clone(),
        "spec.serviceAccountName" => pod.service_account_name.clone().unwrap_or_default(),
        "status.hostIP" => ctx.node_ip.to_string(),
        "status.podIP" if pod.host_network => ctx.node_ip.to_string(),
        other => bail!("fieldRef {other} is not modelled by the container test"),
    })
}

/// The environment, in the runtime's order: the image's, then the kubelet's service
/// variables, then the container's own (each overriding an earlier one of the same name).
fn environment(m: &Manifest, image: &ImageConfig, ctx: &PodContext) -> Result<Vec<String>> {
    let c = m.container()?;
    let mut order: Vec<String> = Vec::new();
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut set = |k: &str, v: String, order: &mut Vec<String>| {
        if vars.insert(k.to_string(), v).is_none() {
            order.push(k.to_string());
        }
    };
    for kv in &image.env {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        set(k, v.to_string(), &mut order);
    }
    let (h, p) = (&ctx.api_host, ctx.api_port);
    let tcp = format!("tcp://{h}:{p}");
    for (k, v) in [
        ("KUBERNETES_SERVICE_HOST".to_string(), h.clone()),
        ("KUBERNETES_SERVICE_PORT".to_string(), p.to_string()),
        ("KUBERNETES_SERVICE_PORT_HTTPS".to_string(), p.to_string()),
        ("KUBERNETES_PORT".to_string(), tcp.clone()),
        (format!("KUBERNETES_PORT_{p}_TCP"), tcp),
        (format!("KUBERNETES_PORT_{p}_TCP_PROTO"), "tcp".into()),
        (format!("KUBERNETES_PORT_{p}_TCP_PORT"), p.to_string()),
        (format!("KUBERNETES_PORT_{p}_TCP_ADDR"), h.clone()),
    ] {
        set(&k, v, &mut order);
    }
    // Only the container's own variables defined before one can be referenced by it.
    let mut defined: BTreeMap<String, String> = BTreeMap::new();
    for e in &c.env {
        let v = match (&e.value, &e.value_from) {
            (Some(v), None) => expand(v, &defined),
            (None, Some(from)) => field(&from.field_ref.field_path, m, ctx)?,
            (None, None) => String::new(),
            (Some(_), Some(_)) => bail!("env {}: both value and valueFrom", e.name),
        };
        defined.insert(e.name.clone(), v.clone());
        set(&e.name, v, &mut order);
    }
    Ok(order.iter().map(|k| format!("{k}={}", vars[k])).collect())
}

fn process(m: &Manifest, image: &ImageConfig, ctx: &PodContext) -> Result<Value> {
    let (pod, c) = (m.pod(), m.container()?);
    let env = environment(m, image, ctx)?;
    let vars: BTreeMap<String, String> = env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let argv: Vec<String> = match (&c.command, &c.args) {
        (Some(cmd), Some(args)) => cmd.iter().chain(args).cloned().collect(),
        (Some(cmd), None) => cmd.clone(),
        (None, Some(args)) => image.entrypoint.iter().chain(args).cloned().collect(),
        (None, None) => image.entrypoint.iter().chain(&image.cmd).cloned().collect(),
    };
    if argv.is_empty() {
        bail!("neither the manifest nor the image says what to run");
    }
    let argv: Vec<String> = argv.iter().map(|a| expand(a, &vars)).collect();

    let sc = c.security_context.as_ref();
    let psc = pod.security_context.as_ref();
    let image_uid = match image.user.split(':').next().unwrap_or("") {
        "" | "root" => 0,
        u => u.parse().with_context(|| format!("image user {u:?}"))?,
    };
    let uid = sc
        .and_then(|s| s.run_as_user)
        .or(psc.and_then(|s| s.run_as_user))
        .unwrap_or(image_uid);
    let gid = sc
        .and_then(|s| s.run_as_group)
        .or(psc.and_then(|s| s.run_as_group))
        .unwrap_or(0);
    let non_root = sc
        .and_then(|s| s.run_as_non_root)
        .or(psc.and_then(|s| s.run_as_non_root));
    if non_root == Some(true) && uid == 0 {
        bail!("runAsNonRoot with uid 0: the kubelet would refuse to start the container");
    }
    let caps = capabilities(c)?;
    // Without ambient capabilities, a non-root process keeps only the bounding set.
    let held = if uid == 0 { caps.clone() } else { Vec::new() };
    let cwd = c
        .working_dir
        .clone()
        .or_else(|| (!image.working_dir.is_empty()).then(|| image.working_dir.clone()))
        .unwrap_or_else(|| "/".into());
    Ok(json!({
        "terminal": false,
        "user": {"uid": uid, "gid": gid},
        "args": argv,
        "env": env,
        "cwd": cwd,
        "capabilities": {
            "bounding": caps,
            "effective": held,
            "permitted": held,
            "inheritable": [],
            "ambient": [],
        },
        "noNewPrivileges": sc.and_then(|s| s.allow_privilege_escalation) == Some(false),
        // No `rlimits`: a node's runtime sets its own, but in this sandbox setting them on a
        // container fails ("setrlimit ... Operation not permitted": root lacks
        // CAP_SYS_RESOURCE, so no limit can be raised), so the agent runs with this test's
        // limits (hard open files 20000). That is also why the test runs runc itself: podman
        // always writes rlimits into the spec.
    }))
}

/// A runtime's standard mounts for an unprivileged container.
fn default_mounts() -> Vec<Value> {
    vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
               "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
    ]
}

/// Kubernetes' mountPropagation as an OCI bind option.
fn propagation(p: Option<&str>) -> Result<&'static str> {
    Ok(match p {
        None | Some("None") => "rprivate",
        Some("HostToContainer") => "rslave",
        Some("Bidirectional") => "rshared",
        Some(other) => bail!("mountPropagation {other:?}"),
    })
}

/// The pod's own mounts (volumes and the service account), sorted as the runtime sorts them:
/// fewer path components first, so a mount never hides one below it. Also the root's
/// propagation: as containerd does, a slave or shared mount makes the root slave or shared.
fn pod_mounts(pod: &PodSpec, c: &Container, ctx: &PodContext) -> Result<(Vec<Value>, String)> {
    let mut mounts: Vec<(String, Value)> = Vec::new();
    let mut rootfs_propagation = "rprivate";
    for vm in &c.volume_mounts {
        let source = ctx
            .volumes
            .get(&vm.name)
            .with_context(|| format!("volumeMount {}: no such volume", vm.name))?;
        let prop = propagation(vm.mount_propagation.as_deref())?;
        if prop == "rshared" || (prop == "rslave" && rootfs_propagation == "rprivate") {
            rootfs_propagation = prop;
        }
        let rw = if vm.read_only { "ro" } else { "rw" };
        mounts.push((
            vm.mount_path.clone(),
            json!({"destination": vm.mount_path, "type": "bind", "source": source,
                   "options": ["rbind", prop, rw]}),
        ));
    }
    if pod.automount_service_account_token != Some(false) {
        let sa = ctx
            .service_account
            .as_ref()
            .context("the pod mounts its service account token: give its directory")?;
        mounts.push((
            SERVICE_ACCOUNT_DIR.into(),
            json!({"destination": SERVICE_ACCOUNT_DIR, "type": "bind", "source": sa,
                   "options": ["rbind", "rprivate", "ro"]}),
        ));
    }
    mounts.sort_by_key(|(dst, _)| dst.split('/').filter(|p| !p.is_empty()).count());
    Ok((
        mounts.into_iter().map(|(_, m)| m).collect(),
        rootfs_propagation.to_string(),
    ))
}

fn resources(c: &Container) -> Result<Value> {
    let mut r = json!({"devices": [{"allow": false, "access": "rwm"}]});
    let Some(res) = &c.resources else {
        return Ok(r);
    };
    if let Some(mem) = res.limits.get("memory") {
        r["memory"] = json!({"limit": memory_bytes(mem)?});
    }
    if let Some(cpu) = res.requests.get("cpu") {
        // The kubelet's shares: 1024 per CPU requested, at least 2.
        r["cpu"] = json!({"shares": (cpu_millis(cpu)? * 1024 / 1000).max(2)});
    }
    if let Some(cpu) = res.limits.get("cpu") {
        let period = 100_000u64;
        r["cpu"]["period"] = json!(period);
        r["cpu"]["quota"] = json!(cpu_millis(cpu)? * period / 1000);
    }
    Ok(r)
}

/// The complete `config.json` for the manifest's container.
pub fn spec(m: &Manifest, image: &ImageConfig, ctx: &PodContext) -> Result<Value> {
    let (pod, c) = (m.pod(), m.container()?);
    let seccomp = c
        .security_context
        .as_ref()
        .and_then(|s| s.seccomp_profile.as_ref())
        .or(pod
            .security_context
            .as_ref()
            .and_then(|s| s.seccomp_profile.as_ref()));
    match seccomp.map(|s| s.kind.as_str()) {
        // The kubelet's default (without --seccomp-default) is Unconfined too.
        None | Some("Unconfined") => {}
        Some(other) => bail!("seccompProfile {other} is not modelled by the container test"),
    }
    let mut namespaces = vec![json!({"type": "mount"})];
    if !pod.host_ipc {
        namespaces.push(json!({"type": "ipc"}));
    }
    if !pod.host_pid {
        namespaces.push(json!({"type": "pid"}));
    }
    if !pod.host_network {
        bail!("a pod network is not modelled: the DaemonSet uses hostNetwork");
    }
    // hostNetwork: the node's network and UTS (hostname) namespaces, so no entries for them.

    let (own, rootfs_propagation) = pod_mounts(pod, c, ctx)?;
    let mut mounts = default_mounts();
    mounts.extend(own);
    let read_only = c
        .security_context
        .as_ref()
        .and_then(|s| s.read_only_root_filesystem)
        .unwrap_or(false);
    Ok(json!({
        "ociVersion": "1.0.2",
        "process": process(m, image, ctx)?,
        "root": {"path": ctx.rootfs, "readonly": read_only},
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "resources": resources(c)?,
            "cgroupsPath": ctx.cgroups_path,
            "rootfsPropagation": rootfs_propagation,
            "maskedPaths": [
                "/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
                "/sys/devices/virtual/powercap",
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
        },
    }))
}

#[cfg(test)]
mod tests;
