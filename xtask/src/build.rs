//! `cargo xtask build`, and building the agent binary for the tests and the demo.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::prereqs::{self, Level};
use crate::util::{cargo, log_path, run, run_logged, target_dir};

pub fn build(release: bool) -> Result<()> {
    prereqs::ensure(Level::Build)?;
    let mut cmd = cargo();
    cmd.args(["build", "--workspace"]);
    if release {
        cmd.arg("--release");
    }
    println!("xtask: building the workspace (the agent's build.rs builds the eBPF programs with nightly + bpf-linker)");
    run(&mut cmd).context("build failed")?;
    let profile = if release { "release" } else { "debug" };
    println!(
        "xtask: built {}",
        target_dir().join(profile).join("sockmesh").display()
    );
    Ok(())
}

/// `cargo build -p sockmesh` (debug) and the absolute path of the agent binary.
pub fn build_agent() -> Result<PathBuf> {
    println!(
        "xtask: building the agent (cargo build -p sockmesh; log: {})",
        log_path("build-agent").display()
    );
    run_logged(cargo().args(["build", "-p", "sockmesh"]), "build-agent")
        .context("could not build the agent")?;
    let bin = target_dir().join("debug").join("sockmesh");
    if !bin.is_file() {
        bail!(
            "the agent build succeeded but {} does not exist",
            bin.display()
        );
    }
    Ok(bin)
}
