//! `deploy/sockmesh.yaml` read the way the API server and the kubelet read it: the DaemonSet's
//! pod template as typed structs, and the ConfigMaps its volumes name. The container test
//! generates its OCI spec from this ([`crate::ocispec`]), so a change to the manifest changes
//! what the test runs.
//!
//! Every field of the pod template is named here. A field this file does not know fails the
//! parse (`deny_unknown_fields`) instead of being dropped in silence: whoever adds one to the
//! manifest decides here what it means on a node. Fields that only matter to the scheduler or
//! to the DaemonSet controller are read and ignored, each with the reason.

use anyhow::{bail, Context, Result};
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The shipped manifest, from the repository this test crate belongs to.
pub fn repo_manifest_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/sockmesh.yaml")
}

/// What the container test needs from a manifest file.
#[derive(Debug)]
pub struct Manifest {
    pub daemonset: DaemonSet,
    /// `namespace/name` -> the ConfigMap's `data`.
    pub config_maps: BTreeMap<String, BTreeMap<String, String>>,
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Manifest> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        Manifest::parse(&text).with_context(|| format!("{}", path.display()))
    }

    /// Parses every document; exactly one must be a DaemonSet.
    pub fn parse(text: &str) -> Result<Manifest> {
        let mut daemonsets = Vec::new();
        let mut config_maps = BTreeMap::new();
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let v = Value::deserialize(doc).with_context(|| format!("YAML document {}", i + 1))?;
            match v["kind"].as_str() {
                Some("DaemonSet") => {
                    let ds: DaemonSet = serde_json::from_value(v).with_context(|| {
                        "the DaemonSet has a field the container test does not model: say in \
                         tests/src/manifest.rs (and tests/src/ocispec.rs) what it means on a node"
                    })?;
                    daemonsets.push(ds);
                }
                Some("ConfigMap") => {
                    let cm: ConfigMap = serde_json::from_value(v)
                        .with_context(|| format!("ConfigMap in YAML document {}", i + 1))?;
                    let key = format!("{}/{}", cm.metadata.namespace, cm.metadata.name);
                    config_maps.insert(key, cm.data);
                }
                _ => {}
            }
        }
        let Some(daemonset) = daemonsets.pop() else {
            bail!("no DaemonSet in the manifest");
        };
        if !daemonsets.is_empty() {
            bail!("more than one DaemonSet in the manifest");
        }
        Ok(Manifest {
            daemonset,
            config_maps,
        })
    }

    /// The DaemonSet's pod spec.
    pub fn pod(&self) -> &PodSpec {
        &self.daemonset.spec.template.spec
    }

    /// The agent's container: the only one (a second would need its own spec and test).
    pub fn container(&self) -> Result<&Container> {
        match self.pod().containers.as_slice() {
            [c] => Ok(c),
            cs => bail!(
                "the DaemonSet has {} containers; the test runs one",
                cs.len()
            ),
        }
    }

    /// The data of ConfigMap `name` in the DaemonSet's namespace.
    pub fn config_map(&self, name: &str) -> Result<&BTreeMap<String, String>> {
        let key = format!("{}/{name}", self.daemonset.metadata.namespace);
        self.config_maps
            .get(&key)
            .with_context(|| format!("ConfigMap {key} is not in the manifest"))
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigMap {
    metadata: Meta,
    #[serde(default)]
    data: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
pub struct Meta {
    pub name: String,
    #[serde(default)]
    pub namespace: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DaemonSet {
    pub metadata: Meta,
    pub spec: DaemonSetSpec,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DaemonSetSpec {
    pub template: PodTemplate,
    /// Which pods the controller owns: nothing a container runs with.
    pub selector: IgnoredAny,
    /// How the controller replaces pods on an update: the rollout test plays it.
    #[serde(default)]
    pub update_strategy: Option<UpdateStrategy>,
    #[serde(default)]
    pub min_ready_seconds: Option<u32>,
    #[serde(default)]
    pub revision_history_limit: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateStrategy {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub rolling_update: Option<RollingUpdate>,
}

/// `maxSurge` and `maxUnavailable` (a count or a percentage, kept as written).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RollingUpdate {
    #[serde(default)]
    pub max_surge: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    pub max_unavailable: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodTemplate {
    #[serde(default)]
    pub metadata: Option<TemplateMeta>,
    pub spec: PodSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TemplateMeta {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodSpec {
    pub containers: Vec<Container>,
    #[serde(default)]
    pub volumes: Vec<Volume>,
    #[serde(default, rename = "hostPID")]
    pub host_pid: bool,
    #[serde(default)]
    pub host_network: bool,
    #[serde(default, rename = "hostIPC")]
    pub host_ipc: bool,
    #[serde(default)]
    pub service_account_name: Option<String>,
    #[serde(default)]
    pub automount_service_account_token: Option<bool>,
    /// How long the kubelet waits after SIGTERM before SIGKILL.
    #[serde(default)]
    pub termination_grace_period_seconds: Option<u64>,
    #[serde(default)]
    pub security_context: Option<PodSecurityContext>,
    /// Scheduling, and the pod's resolv.conf (which the agent never reads): nothing the
    /// container runs with on the node it landed on.
    #[serde(default)]
    pub dns_policy: Option<IgnoredAny>,
    #[serde(default)]
    pub priority_class_name: Option<IgnoredAny>,
    #[serde(default)]
    pub tolerations: Option<IgnoredAny>,
    #[serde(default)]
    pub node_selector: Option<IgnoredAny>,
    #[serde(default)]
    pub affinity: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodSecurityContext {
    #[serde(default)]
    pub run_as_user: Option<u32>,
    #[serde(default)]
    pub run_as_group: Option<u32>,
    #[serde(default)]
    pub run_as_non_root: Option<bool>,
    #[serde(default)]
    pub seccomp_profile: Option<SeccompProfile>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Container {
    pub name: String,
    pub image: String,
    /// The image is built on this machine, never pulled.
    #[serde(default)]
    pub image_pull_policy: Option<IgnoredAny>,
    #[serde(default)]
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub args: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub env: Vec<EnvVar>,
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
    #[serde(default)]
    pub readiness_probe: Option<Probe>,
    #[serde(default)]
    pub liveness_probe: Option<Probe>,
    #[serde(default)]
    pub startup_probe: Option<Probe>,
    #[serde(default)]
    pub resources: Option<Resources>,
    #[serde(default)]
    pub security_context: Option<SecurityContext>,
    #[serde(default)]
    pub volume_mounts: Vec<VolumeMount>,
}

impl Container {
    /// The port a probe names (a number, or a `ports[].name`).
    pub fn probe_port(&self, port: &PortRef) -> Result<u16> {
        match port {
            PortRef::Number(n) => Ok(*n),
            PortRef::Name(name) => self
                .ports
                .iter()
                .find(|p| p.name.as_deref() == Some(name))
                .map(|p| p.container_port)
                .with_context(|| format!("no container port named {name:?}")),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvVar {
    pub name: String,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub value_from: Option<EnvVarSource>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvVarSource {
    pub field_ref: FieldRef,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FieldRef {
    pub field_path: String,
    #[serde(default)]
    pub api_version: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerPort {
    #[serde(default)]
    pub name: Option<String>,
    pub container_port: u16,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub host_port: Option<u16>,
}

/// A port given as a number or as the name of a container port.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Probe {
    pub http_get: HttpGet,
    #[serde(default)]
    pub initial_delay_seconds: Option<u32>,
    #[serde(default)]
    pub period_seconds: Option<u32>,
    #[serde(default)]
    pub timeout_seconds: Option<u32>,
    #[serde(default)]
    pub success_threshold: Option<u32>,
    #[serde(default)]
    pub failure_threshold: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpGet {
    #[serde(default = "root_path")]
    pub path: String,
    pub port: PortRef,
    /// Defaults to the pod IP.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub scheme: Option<String>,
}

fn root_path() -> String {
    "/".into()
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    #[serde(default)]
    pub requests: BTreeMap<String, String>,
    #[serde(default)]
    pub limits: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecurityContext {
    #[serde(default)]
    pub privileged: Option<bool>,
    #[serde(default)]
    pub run_as_user: Option<u32>,
    #[serde(default)]
    pub run_as_group: Option<u32>,
    #[serde(default)]
    pub run_as_non_root: Option<bool>,
    #[serde(default)]
    pub read_only_root_filesystem: Option<bool>,
    #[serde(default)]
    pub allow_privilege_escalation: Option<bool>,
    #[serde(default)]
    pub capabilities: Option<Capabilities>,
    #[serde(default)]
    pub seccomp_profile: Option<SeccompProfile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    #[serde(default)]
    pub add: Vec<String>,
    #[serde(default)]
    pub drop: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SeccompProfile {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub localhost_profile: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: String,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub mount_propagation: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Volume {
    pub name: String,
    #[serde(default)]
    pub host_path: Option<HostPathVolume>,
    #[serde(default)]
    pub config_map: Option<ConfigMapVolume>,
    #[serde(default)]
    pub empty_dir: Option<EmptyDirVolume>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostPathVolume {
    pub path: String,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigMapVolume {
    pub name: String,
    #[serde(default)]
    pub default_mode: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EmptyDirVolume {
    #[serde(default)]
    pub medium: Option<String>,
    #[serde(default)]
    pub size_limit: Option<String>,
}

/// A memory quantity (`512Mi`, `1G`, `1000`) in bytes.
pub fn memory_bytes(q: &str) -> Result<u64> {
    const UNITS: [(&str, u64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    let (num, mult) = UNITS
        .iter()
        .find_map(|(u, m)| q.strip_suffix(u).map(|n| (n, *m)))
        .unwrap_or((q, 1));
    let n: u64 = num
        .parse()
        .with_context(|| format!("memory quantity {q:?}"))?;
    Ok(n * mult)
}

/// A CPU quantity (`50m`, `2`) in millicores.
pub fn cpu_millis(q: &str) -> Result<u64> {
    match q.strip_suffix('m') {
        Some(m) => m.parse().with_context(|| format!("cpu quantity {q:?}")),
        None => Ok(q
            .parse::<f64>()
            .map(|c| (c * 1000.0).round() as u64)
            .with_context(|| format!("cpu quantity {q:?}"))?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repo_manifest_parses() {
        let m = Manifest::load(&repo_manifest_path()).expect("deploy/sockmesh.yaml");
        let c = m.container().expect("one container");
        assert_eq!(c.name, "sockmesh");
        assert!(m.pod().host_pid && m.pod().host_network);
        for v in &m.pod().volumes {
            if let Some(cm) = &v.config_map {
                m.config_map(&cm.name).expect("the ConfigMap ships with it");
            }
        }
    }

    #[test]
    fn an_unknown_field_is_an_error_not_ignored() {
        let text = "kind: DaemonSet\nmetadata: {name: x, namespace: y}\nspec:\n  selector: {}\n  \
                    template:\n    spec:\n      containers:\n        - name: a\n          image: i\n          \
                    stdin: true\n";
        let e = Manifest::parse(text).expect_err("stdin is not modelled");
        assert!(format!("{e:#}").contains("stdin"), "{e:#}");
    }

    #[test]
    fn quantities() {
        assert_eq!(memory_bytes("512Mi").unwrap(), 512 << 20);
        assert_eq!(memory_bytes("1G").unwrap(), 1_000_000_000);
        assert_eq!(memory_bytes("4096").unwrap(), 4096);
        assert!(memory_bytes("lots").is_err());
        assert_eq!(cpu_millis("50m").unwrap(), 50);
        assert_eq!(cpu_millis("1.5").unwrap(), 1500);
    }
}
