//! `cargo xtask test`: prerequisites, leftover sweep, agent build, lints (clippy, rustfmt,
//! manifests, layers), then every test.
//! Per-test timeouts and parallelism for nextest live in `.config/nextest.toml`.

use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::process::{Command, Stdio};
use std::thread;

use anyhow::{bail, Context, Result};

use crate::build::build_agent;
use crate::prereqs::{self, Level};
use crate::util::{cargo, check_status, describe, repo_root, run};

pub fn test(extra: &[String]) -> Result<()> {
    let found = prereqs::ensure(Level::Run)?;
    sweep()?;
    let agent = build_agent()?;
    println!("xtask: SOCKMESH_BIN={}", agent.display());

    let clippy = lint(
        "clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
        "fix the warnings above",
    );
    // rustfmt colours its diffs even into a pipe unless told not to.
    let color = if std::io::stdout().is_terminal() {
        "auto"
    } else {
        "never"
    };
    let rustfmt = lint(
        "rustfmt",
        cargo().args(["fmt", "--all", "--", "--check", "--color", color]),
        "run `cargo fmt --all`",
    );

    let manifests = match crate::manifests::command() {
        Ok(mut cmd) => lint(
            "manifests",
            &mut cmd,
            "fix deploy/ (strict Kubernetes schema)",
        ),
        Err(e) => {
            println!("xtask: manifests FAILED: {e:#}");
            false
        }
    };

    println!("xtask: layers (architecture rules: layer order, no mutual imports, file length)");
    let layers = match crate::layers::layers() {
        Ok(()) => true,
        Err(e) => {
            println!("xtask: layers FAILED: {e:#}; fix them (see `cargo xtask layers`)");
            false
        }
    };

    let mut cmd = cargo();
    let runner = if found.nextest {
        cmd.args(["nextest", "run", "--workspace", "--no-fail-fast"])
            .args(extra);
        Runner::Nextest
    } else {
        // No per-test timeout here; nextest gives one (see .config/nextest.toml).
        cmd.args(["test", "--workspace", "--no-fail-fast"])
            .env("RUST_TEST_THREADS", "4");
        if !extra.is_empty() {
            cmd.arg("--").args(extra);
        }
        Runner::CargoTest
    };
    cmd.env("SOCKMESH_BIN", &agent);
    println!("xtask: running the tests ({})", describe(&cmd));
    let (tests_ok, counts) = run_and_count(&mut cmd, runner)?;

    let verdict = |ok: bool| if ok { "ok" } else { "FAILED" };
    println!(
        "xtask test summary: clippy {}; rustfmt {}; manifests {}; layers {}; tests ({}) {}",
        verdict(clippy),
        verdict(rustfmt),
        verdict(manifests),
        verdict(layers),
        runner.name(),
        verdict(tests_ok)
    );
    let all_ok = clippy && rustfmt && manifests && layers && tests_ok;
    let word = if all_ok { "PASSED" } else { "FAILED" };
    match counts {
        Some(c) => println!(
            "{word}: {} passed, {} failed, {} skipped",
            c.passed, c.failed, c.skipped
        ),
        None => println!("{word}: the test runner reported no summary"),
    }
    if !all_ok {
        bail!("cargo xtask test failed (see the summary above)");
    }
    Ok(())
}

/// Removes leftovers (netns, pins, processes) from interrupted runs, with the tests crate's
/// own `smt-sweep` tool.
fn sweep() -> Result<()> {
    let tests = repo_root().join("tests");
    let declared = std::fs::read_to_string(tests.join("Cargo.toml"))
        .is_ok_and(|toml| toml.contains("\"smt-sweep\""));
    let exists = declared
        || tests.join("src/bin/smt-sweep.rs").is_file()
        || tests.join("src/bin/smt-sweep/main.rs").is_file();
    if !exists {
        println!("xtask: sweep skipped (the smt-sweep binary does not exist yet in tests/)");
        return Ok(());
    }
    println!("xtask: sweeping leftovers of interrupted runs (smt-sweep)");
    run(cargo().args(["run", "-q", "-p", "sockmesh-tests", "--bin", "smt-sweep"]))
        .context("smt-sweep failed: leftovers from an earlier run may remain")
}

fn lint(name: &str, cmd: &mut Command, fix: &str) -> bool {
    println!("xtask: {name} ({})", describe(cmd));
    match run(cmd) {
        Ok(()) => true,
        Err(e) => {
            println!("xtask: {name} FAILED: {e:#}; {fix}");
            false
        }
    }
}

/// Runs `cmd`, echoing its output while reading the runner's pass/fail counts from it.
fn run_and_count(cmd: &mut Command, runner: Runner) -> Result<(bool, Option<Counts>)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{}`", describe(cmd)))?;
    let out = child.stdout.take().expect("piped");
    let err = child.stderr.take().expect("piped");
    let out = thread::spawn(move || echo_and_scan(out, std::io::stdout(), runner));
    let err = thread::spawn(move || echo_and_scan(err, std::io::stderr(), runner));
    let status = child.wait()?;
    let (out, err) = (
        out.join().expect("echo thread"),
        err.join().expect("echo thread"),
    );
    let counts = out.merge(err);
    Ok((
        check_status(cmd, status).is_ok(),
        counts.seen.then_some(counts),
    ))
}

fn echo_and_scan(from: impl Read, mut to: impl Write, runner: Runner) -> Counts {
    let mut counts = Counts::default();
    let mut reader = BufReader::new(from);
    let mut buf = Vec::new();
    while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
        let _ = to.write_all(&buf);
        let _ = to.flush();
        counts.scan(&String::from_utf8_lossy(&buf), runner);
        buf.clear();
    }
    counts
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runner {
    Nextest,
    CargoTest,
}

impl Runner {
    fn name(self) -> &'static str {
        match self {
            Runner::Nextest => "nextest",
            Runner::CargoTest => "cargo test",
        }
    }
}

/// Test counts from the runner's summary lines.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub skipped: u64,
    seen: bool,
}

impl Counts {
    /// Reads one output line: nextest's `Summary [..] N tests run: A passed, B failed, C skipped`
    /// (the last one wins) or libtest's `test result: ok. A passed; B failed; C ignored; ...`
    /// (summed over test binaries). Only the runner's own kind of line counts: nextest may
    /// replay a failed test's libtest output.
    pub fn scan(&mut self, line: &str, runner: Runner) {
        let nextest = line
            .split_once("tests run:")
            .or(line.split_once("test run:"));
        let libtest = line.split_once("test result: ");
        if let (Runner::Nextest, Some(rest)) = (runner, nextest) {
            *self = Counts {
                seen: true,
                ..Counts::default()
            };
            for part in rest.1.split(',') {
                let (n, what) = count_and_label(part);
                match what {
                    w if w.starts_with("passed") => self.passed += n,
                    w if w.starts_with("skipped") => self.skipped += n,
                    // failed, timed out, exec failed, ...
                    _ => self.failed += n,
                }
            }
        } else if let (Runner::CargoTest, Some((_, rest))) = (runner, libtest) {
            self.seen = true;
            for part in rest.split(';') {
                let part = part.split_once(". ").map_or(part, |(_, p)| p);
                let (n, what) = count_and_label(part);
                match what {
                    w if w.starts_with("passed") => self.passed += n,
                    w if w.starts_with("failed") => self.failed += n,
                    w if w.starts_with("ignored") => self.skipped += n,
                    _ => {}
                }
            }
        }
    }

    fn merge(self, other: Counts) -> Counts {
        if !other.seen {
            return self;
        }
        if !self.seen {
            return other;
        }
        Counts {
            passed: self.passed + other.passed,
            failed: self.failed + other.failed,
            skipped: self.skipped + other.skipped,
            seen: true,
        }
    }
}

/// ` 3 passed (1 slow)` -> (3, "passed (1 slow)"); no number -> (0, "").
fn count_and_label(part: &str) -> (u64, &str) {
    let part = part.trim();
    match part.split_once(' ') {
        Some((n, label)) => n.parse().map_or((0, ""), |n| (n, label.trim())),
        None => (0, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(lines: &str, runner: Runner) -> Counts {
        let mut c = Counts::default();
        lines.lines().for_each(|l| c.scan(l, runner));
        c
    }

    fn nextest(lines: &str) -> Counts {
        scan(lines, Runner::Nextest)
    }

    fn counts(passed: u64, failed: u64, skipped: u64) -> Counts {
        Counts {
            passed,
            failed,
            skipped,
            seen: true,
        }
    }

    #[test]
    fn nextest_summary() {
        assert_eq!(
            nextest("     Summary [  12.345s] 15 tests run: 15 passed, 0 skipped"),
            counts(15, 0, 0)
        );
        assert_eq!(
            nextest("     Summary [ 200.1s] 9 tests run: 6 passed (1 slow), 2 failed, 1 timed out, 3 skipped"),
            counts(6, 3, 3)
        );
        assert_eq!(
            nextest("     Summary [   0.002s] 1 test run: 1 passed, 0 skipped"),
            counts(1, 0, 0)
        );
        assert_eq!(nextest("  Cancelling due to test failure\n   Summary [1s] 4/10 tests run: 3 passed, 1 failed, 0 skipped"), counts(3, 1, 0));
    }

    #[test]
    fn libtest_results_are_summed() {
        let out = "running 3 tests\n\
                   test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s\n\
                   test result: FAILED. 4 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1.2s\n";
        assert_eq!(scan(out, Runner::CargoTest), counts(7, 2, 1));
        // nextest replaying a failed test's libtest output does not count twice.
        let replay =
            format!("{out}     Summary [ 1s] 2 tests run: 1 passed, 1 failed, 0 skipped\n");
        assert_eq!(nextest(&replay), counts(1, 1, 0));
    }

    #[test]
    fn no_summary_is_unseen() {
        let c = scan(
            "   Compiling xtask v0.1.0\nerror: could not compile\n",
            Runner::CargoTest,
        );
        assert!(!c.seen);
        assert_eq!(c.merge(Counts::default()), Counts::default());
        assert_eq!(Counts::default().merge(counts(1, 2, 3)), counts(1, 2, 3));
        assert_eq!(counts(1, 0, 0).merge(counts(2, 1, 0)), counts(3, 1, 0));
    }
}
