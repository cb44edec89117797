//! `sockmesh run --kube`: enrol the opted-in pods of this node from the Kubernetes API.
//!
//! [`decide`] is the pure policy (which pods, which options), within what the operator
//! [`allowed`] pods to ask for; [`controller`] keeps the watched
//! Pod and Namespace objects and turns their changes into enrolments and removals;
//! [`report`] tells the cluster about malformed annotations (Kubernetes Events);
//! [`identity`] watches Services, EndpointSlices and every pod to name peers, converting the
//! objects with [`owners`] (pure: a pod's workload through its owner references);
//! [`destination`] watches Istio DestinationRules into the policy's live set.
pub mod allowed;
pub mod controller;
pub mod decide;
pub mod destination;
pub mod identity;
pub mod owners;
pub mod report;

#[cfg(test)]
mod hostile_tests;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

/// Flags of Kubernetes mode.
#[derive(Args, Debug, Clone)]
pub struct KubeArgs {
    /// Enrol this node's pods from the Kubernetes API (namespace label or pod annotation
    /// `sockmesh.io/mesh`). Needs hostPID to find the pods' namespaces.
    #[arg(long, env = "SOCKMESH_KUBE")]
    pub kube: bool,
    /// This node's name: only pods scheduled here are enrolled (the DaemonSet sets NODE_NAME
    /// from spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// A kubeconfig file instead of the in-cluster service account.
    #[arg(long, env = "SOCKMESH_KUBECONFIG", conflicts_with = "kube_api")]
    pub kubeconfig: Option<PathBuf>,
    /// An API server URL reached without credentials (e.g. `http://127.0.0.1:8001` from
    /// `kubectl proxy`), instead of the in-cluster service account.
    #[arg(long, env = "SOCKMESH_KUBE_API", value_name = "URL")]
    pub kube_api: Option<String>,
    /// Where the host's processes are listed (the pods' namespaces are found through
    /// /proc/PID/cgroup and /proc/PID/ns/net).
    #[arg(long, env = "SOCKMESH_PROC_ROOT", default_value = "/proc")]
    pub proc_root: PathBuf,
    /// Istio's root namespace (`meshConfig.rootNamespace`): its DestinationRules apply to
    /// every namespace, after the client's and the Service's own.
    #[arg(long, env = "SOCKMESH_ISTIO_ROOT_NAMESPACE", default_value = crate::rules::istio::DEFAULT_ROOT_NAMESPACE, value_name = "NAMESPACE")]
    pub istio_root_namespace: String,
    /// What pods may ask for by annotation.
    #[command(flatten)]
    pub allow: allowed::AllowArgs,
}

impl KubeArgs {
    /// Check the flags before anything is loaded; returns the node name.
    pub fn validate(&self) -> Result<Option<String>> {
        if !self.kube {
            if self.kube_api.is_some() || self.kubeconfig.is_some() {
                bail!("--kube-api and --kubeconfig only apply with --kube: add --kube");
            }
            return Ok(None);
        }
        let node = match self.node_name.as_deref().map(str::trim) {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => bail!(
                "--kube needs this node's name: pass --node-name or set NODE_NAME (the DaemonSet sets it from spec.nodeName)"
            ),
        };
        if let Some(url) = &self.kube_api {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                bail!("--kube-api {url}: give a URL such as http://127.0.0.1:8001");
            }
            url.parse::<http::Uri>()
                .with_context(|| format!("--kube-api {url} is not a URL"))?;
        }
        if let Some(p) = &self.kubeconfig {
            if !p.is_file() {
                bail!("--kubeconfig {}: no such file", p.display());
            }
        }
        if !self.proc_root.join("self/ns/net").exists() {
            bail!(
                "--proc-root {}: not a proc filesystem (no self/ns/net)",
                self.proc_root.display()
            );
        }
        Ok(Some(node))
    }

    /// The API client. Nothing is contacted yet, so an unreachable API server does not stop
    /// the agent: the watches retry with backoff.
    pub async fn client(&self) -> Result<kube::Client> {
        let config = if let Some(url) = &self.kube_api {
            kube::Config::new(url.parse().context("--kube-api")?)
        } else if let Some(path) = &self.kubeconfig {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        } else {
            kube::Config::incluster().context(
                "in-cluster Kubernetes config (run in a pod with a service account, or pass --kubeconfig / --kube-api)",
            )?
        };
        kube::Client::try_from(config).context("create the Kubernetes client")
    }
}
