//! The DaemonSet's pod started on a [`Node`] the way a kubelet would start it: the image built
//! from the repository's Dockerfile ([`crate::image`]), the pod's volumes and service account
//! set up ([`crate::node`]), the OCI spec generated from the manifest ([`crate::ocispec`]),
//! and the container run by runc ([`crate::runc`]).

use crate::agent::sockmesh_bin;
use crate::caps;
use crate::image::{self, Unpacked};
use crate::kubeapi::FakeKubeApi;
use crate::kubelet::new_uid;
use crate::manifest::{Manifest, Probe};
use crate::names::{random_hex, unique_name};
use crate::node::{pod_volumes, Node, ServiceAccount};
use crate::ocispec::{self, PodContext};
use crate::runc::Container;
use crate::tempdir::TempDir;
use anyhow::{Context, Result};
use serde_json::Value;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the agent pins when the manifest does not say (`sockmesh run`'s default).
const DEFAULT_PINS: &str = "/sys/fs/bpf/sockmesh";

/// Builds the image the DaemonSet's container names, from the Dockerfile, around the agent
/// binary the tests run.
pub fn build_image(m: &Manifest) -> Result<Unpacked> {
    image::build_and_unpack(&m.container()?.image, &sockmesh_bin())
}

/// One running pod of the DaemonSet.
pub struct DaemonSetPod {
    pub container: Container,
    /// The generated `config.json`.
    pub spec: Value,
    pub node_ip: IpAddr,
    _scratch: TempDir,
}

impl DaemonSetPod {
    /// Starts the manifest's pod on `node` from `image`, its API server being `api` (HTTPS,
    /// reached through in-cluster configuration).
    pub fn start(node: &Node, m: &Manifest, image: &Unpacked, api: &FakeKubeApi) -> Result<Self> {
        let id = unique_name();
        let scratch = TempDir::new()?;
        let sa = ServiceAccount {
            namespace: &m.daemonset.metadata.namespace,
            token: api.token().context("the API server must require a token")?,
            ca_pem: api.ca_pem().context("the API server must speak HTTPS")?,
        };
        let (volumes, sa_dir) = pod_volumes(node, m, &sa, scratch.path())?;
        let ctx = PodContext {
            pod_name: format!("{}-{}", m.daemonset.metadata.name, random_hex(3)),
            pod_uid: new_uid(),
            node_name: node.name.clone(),
            node_ip: IpAddr::V4(node.ip),
            api_host: api.addr().ip().to_string(),
            api_port: api.addr().port(),
            volumes,
            service_account: Some(sa_dir),
            cgroups_path: format!("/{id}"),
            rootfs: image.rootfs().to_path_buf(),
        };
        let spec = ocispec::spec(m, &image.image.config, &ctx)?;
        check_capabilities(&spec)?;
        let bundle = TempDir::new()?;
        let pins_inside = flag_value(&spec, "--bpffs-dir").unwrap_or_else(|| DEFAULT_PINS.into());
        let pins = host_path(&spec, &pins_inside)
            .with_context(|| format!("the pin directory {pins_inside} is on no volume"))?;
        let container = Container::run(&id, bundle, &spec, node.bpffs(), pins)?;
        Ok(DaemonSetPod {
            container,
            spec,
            node_ip: ctx.node_ip,
            _scratch: scratch,
        })
    }

    /// The address and path a probe GETs (`host` defaults to the pod IP, the node's).
    pub fn probe_target(&self, m: &Manifest, probe: &Probe) -> Result<(SocketAddr, String)> {
        let g = &probe.http_get;
        let port = m.container()?.probe_port(&g.port)?;
        let ip = match &g.host {
            Some(h) => h.parse().with_context(|| format!("probe host {h}"))?,
            None => self.node_ip,
        };
        Ok((SocketAddr::new(ip, port), g.path.clone()))
    }

    /// How long the kubelet lets the pod drain after SIGTERM.
    pub fn grace(m: &Manifest) -> Duration {
        Duration::from_secs(m.pod().termination_grace_period_seconds.unwrap_or(30))
    }
}

/// A container cannot get a capability its runtime does not have: runc would fail with
/// "unable to apply caps". On a node the runtime has them all; in this sandbox root's
/// bounding set lacks some (CAP_SYS_RESOURCE), so a manifest asking for one is an error here
/// that names it, rather than a silent difference.
fn check_capabilities(spec: &Value) -> Result<()> {
    let here = caps::of_process("self", "CapBnd")?;
    let missing: Vec<&str> = spec["process"]["capabilities"]["bounding"]
        .as_array()
        .context("no bounding set in the spec")?
        .iter()
        .filter_map(Value::as_str)
        .filter(|c| caps::cap_number(c).is_none_or(|n| here & (1u64 << n) == 0))
        .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "the manifest grants {} which this machine's root does not have (its bounding set: \
             {}), so no container here can be given it",
            missing.join(", "),
            caps::cap_names(here).join(",")
        );
    }
    Ok(())
}

/// The value of `--flag=V` or `--flag V` in the spec's process arguments.
pub fn flag_value(spec: &Value, flag: &str) -> Option<String> {
    let args: Vec<&str> = spec["process"]["args"]
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix(&format!("{flag}="))
            .map(str::to_string)
            .or_else(|| (*a == flag).then(|| args.get(i + 1).map(|v| v.to_string()))?)
    })
}

/// Where `path` inside the container is on this machine: through the bind mount with the
/// longest destination that contains it.
pub fn host_path(spec: &Value, path: &str) -> Option<PathBuf> {
    let path = Path::new(path);
    spec["mounts"]
        .as_array()?
        .iter()
        .filter(|m| m["type"] == "bind")
        .filter_map(|m| {
            let dst = Path::new(m["destination"].as_str()?);
            let rest = path.strip_prefix(dst).ok()?;
            Some((
                dst.components().count(),
                Path::new(m["source"].as_str()?).join(rest),
            ))
        })
        .max_by_key(|(depth, _)| *depth)
        .map(|(_, p)| p)
}
