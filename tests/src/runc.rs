//! A container run by `runc` on an OCI bundle, in the foreground: runc passes its stdio
//! through and forwards signals, so the agent inside is an [`Agent`] like any other (its
//! stdout events, its log, SIGTERM to stop it). Dropping the guard kills the container and
//! removes it and its bundle, on a failed test too; a container left by a killed test is
//! removed by [`crate::cleanup::sweep_stale`] (its id is `smt-<pid>-...`).

use crate::agent::{Agent, BpfFsDir};
use crate::sys;
use crate::tempdir::TempDir;
use anyhow::{Context, Result};
use serde_json::Value;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::sync::Arc;
use std::time::Duration;

/// A running container (its id is unique and sweepable).
pub struct Container {
    id: String,
    agent: Agent,
    _bundle: TempDir,
}

impl Container {
    /// `runc run --bundle <bundle> <id>` with `config` as the bundle's `config.json`. `pins`
    /// is where the agent's pins appear on this machine, in `bpffs`.
    pub fn run(
        id: &str,
        bundle: TempDir,
        config: &Value,
        bpffs: Arc<BpfFsDir>,
        pins: PathBuf,
    ) -> Result<Container> {
        fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(config)?,
        )?;
        let mut cmd = Command::new("runc");
        cmd.arg("run").arg("--bundle").arg(bundle.path()).arg(id);
        let agent = Agent::spawn(cmd, bpffs, pins).context("runc run")?;
        Ok(Container {
            id: id.to_string(),
            agent,
            _bundle: bundle,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The agent inside (its events, its log, its pins).
    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// The container's first process as this machine's pid namespace numbers it.
    pub fn pid(&self) -> Result<u32> {
        let out = sys::run(Command::new("runc").args(["state", &self.id]))?;
        let v: Value = serde_json::from_str(&out).context("runc state output")?;
        v["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .with_context(|| format!("runc state without a pid: {v}"))
    }

    /// SIGTERM, as the kubelet stops a pod, then up to `grace` for it to exit (the kubelet
    /// would SIGKILL it then; this reports an error instead).
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        self.agent.signal(libc::SIGTERM)?;
        match self.agent.wait_exit(grace)? {
            Some(status) => Ok(status),
            None => anyhow::bail!(
                "the container did not exit within {grace:?} of SIGTERM\n{}",
                self.agent.stderr()
            ),
        }
    }
}

/// `runc delete --force`: kills the container if it runs and removes its state and cgroups.
pub fn delete(id: &str) {
    let _ = sys::run(Command::new("runc").args(["delete", "--force", id]));
}

/// Ids of the containers runc knows.
pub fn list() -> Vec<String> {
    sys::run(Command::new("runc").args(["list", "--quiet"]))
        .map(|out| out.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.agent.is_running() {
            let _ = sys::run(Command::new("runc").args(["kill", &self.id, "KILL"]));
            let _ = self.agent.wait_exit(Duration::from_secs(10));
        }
        // `runc run` removes the container when it exits; this covers the case it did not.
        delete(&self.id);
    }
}
