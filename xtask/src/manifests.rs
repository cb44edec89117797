//! The Kubernetes manifests in deploy/ are validated offline against the Kubernetes OpenAPI
//! schemas, strictly (an unknown field is an error), by PyPI's `kubernetes-validate`, which
//! ships the schemas inside the package: no cluster and no network at validation time.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{log_path, repo_root, run_logged, try_output};

/// Pinned so that the bundled schema set, and so the verdict, does not change under us.
const VALIDATOR: &str = "kubernetes-validate==1.37.0";
/// The oldest Kubernetes the manifests promise to work with (the agent's k8s-openapi
/// feature is v1_33 too).
const KUBERNETES_VERSION: &str = "1.33.0";

fn installed() -> Option<String> {
    try_output(Command::new("python3").args(["-m", "kubernetes_validate", "--version"]))
}

/// Installs the validator with pip unless the pinned version is there (idempotent).
pub fn ensure_validator() -> Result<()> {
    let what = "kubernetes-validate (offline manifest validation)";
    let want = VALIDATOR.rsplit('=').next().unwrap_or_default();
    if installed().is_some_and(|v| v.trim() == want) {
        println!("prereq: {what} ... ok (already installed)");
        return Ok(());
    }
    println!(
        "prereq: {what} ... installing (python3 -m pip install {VALIDATOR}; log: {})",
        log_path("pip").display()
    );
    run_logged(
        Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            VALIDATOR,
        ]),
        "pip",
    )
    .context("could not install kubernetes-validate: install python3 and pip, then re-run")?;
    if installed().is_none() {
        bail!("kubernetes-validate was installed but `python3 -m kubernetes_validate` fails");
    }
    println!("prereq: {what} ... ok (installed)");
    Ok(())
}

/// Every YAML file under deploy/.
fn files() -> Result<Vec<PathBuf>> {
    let dir = repo_root().join("deploy");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("read {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    v.sort();
    if v.is_empty() {
        bail!("no manifests in {}", dir.display());
    }
    Ok(v)
}

/// The validation command for `cargo xtask test`.
pub fn command() -> Result<Command> {
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m",
        "kubernetes_validate",
        "--strict",
        "--quiet",
        "-k",
        KUBERNETES_VERSION,
    ])
    .args(files()?);
    Ok(cmd)
}
