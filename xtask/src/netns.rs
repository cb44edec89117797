//! Named network namespaces for the demo and the benchmarks: created with `ip netns add`,
//! deleted (with every process still in them) when dropped, also on error or Ctrl-C.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::util::{output, signal};

/// A named network namespace, deleted (with every process still in it) when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> Result<Self> {
        if delete_netns(name) {
            println!("    removed network namespace {name} left over from an earlier run");
        }
        output(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Netns { name: name.into() };
        ns.ip("link set lo up")?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS...` (ARGS split on spaces).
    pub fn ip(&self, args: &str) -> Result<()> {
        output(
            Command::new("ip")
                .args(["-n", &self.name])
                .args(args.split_whitespace()),
        )
        .map(drop)
    }

    /// A command that runs `program` inside this namespace.
    pub fn exec(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// `/var/run/netns/NAME`: what `sockmesh run --pod` takes.
    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// Sets a sysctl of this namespace (`key` as `sysctl` spells it).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        output(
            self.exec("sysctl")
                .args(["-q", "-w", &format!("{key}={value}")]),
        )
        .map(drop)
    }

    /// Moves the calling thread into the namespace at `path` (for a thread that then only
    /// makes sockets there; other threads are unaffected).
    pub fn enter_path(path: &Path, name: &str) -> Result<()> {
        let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
        // SAFETY: setns on an fd we own; it affects only the calling thread.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("setns into {name}"));
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if delete_netns(&self.name) {
            println!("    deleted network namespace {}", self.name);
        }
    }
}

/// Kills what still runs in the namespace and deletes it; true if it existed.
fn delete_netns(name: &str) -> bool {
    if !Path::new("/var/run/netns").join(name).exists() {
        return false;
    }
    if let Ok(pids) = output(Command::new("ip").args(["netns", "pids", name])) {
        for pid in pids.split_whitespace().filter_map(|p| p.parse().ok()) {
            signal(pid, libc::SIGKILL);
        }
    }
    if let Err(e) = output(Command::new("ip").args(["netns", "delete", name])) {
        eprintln!("    warning: could not delete network namespace {name}: {e:#}");
    }
    true
}
