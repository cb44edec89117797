//! `cargo xtask soak`: the soak test (tests/tests/soak.rs) in its full form. CI runs the same
//! test with a short count; this runs >= 10k connections by default and prints the figures.

use anyhow::{bail, Context, Result};

use crate::build::build_agent;
use crate::prereqs::{self, Level};
use crate::util::{cargo, describe, run};

/// The issue asks for at least this many connections in the full run.
pub const MIN_CONNS: u64 = 10_000;

pub fn soak(conns: u64, secs: u64, seed: Option<u64>) -> Result<()> {
    if conns < MIN_CONNS {
        bail!("--conns {conns} is the CI form; the full soak runs at least {MIN_CONNS}");
    }
    prereqs::ensure(Level::Run)?;
    let agent = build_agent()?;
    let mut cmd = cargo();
    // cargo test, not nextest: nextest's per-test timeout (3 min) would cut a long soak short;
    // the test bounds itself with SOCKMESH_SOAK_SECS.
    cmd.args([
        "test",
        "-p",
        "sockmesh-tests",
        "--test",
        "soak",
        "--",
        "--nocapture",
    ])
    .env("SOCKMESH_BIN", &agent)
    .env("SOCKMESH_SOAK_CONNS", conns.to_string())
    .env("SOCKMESH_SOAK_SECS", secs.to_string());
    if let Some(seed) = seed {
        cmd.env("SOCKMESH_SOAK_SEED", seed.to_string());
    }
    println!(
        "xtask: soak with {conns} connections, at most {secs} s ({})",
        describe(&cmd)
    );
    run(&mut cmd).context("the soak failed (its [soak] line above has the figures)")
}
