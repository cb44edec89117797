//! The demo's named network namespaces (fixed names, `smdemo-*`, that its printed commands
//! use): created with `ip netns add`, deleted (with every process still in them) when dropped,
//! also on error or Ctrl-C. The bench builds its network with the tests' `Cluster` instead.

use std::path::Path;
use std::process::Command;

use anyhow::Result;

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
