//! Checks, and where it can installs, everything the build, the tests and the demo need.
//! Idempotent: on a machine that has everything it only checks, one line per step.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{cargo, find_in_path, is_root, log_path, output, run, run_logged, try_output};

mod parse;
use parse::{
    cgroup2_mount, dpkg_installed, has_component, has_named_toolchain, parse_bpf_linker_version,
    parse_kernel_version, parse_mounts, Mount,
};

/// The only bpf-linker that builds against rustc's own LLVM on this machine kind.
const BPF_LINKER_VERSION: (u32, u32, u32) = (0, 10, 0);
const MIN_KERNEL: (u32, u32) = (5, 15);
const BPFFS: &str = "/sys/fs/bpf";
const BTF: &str = "/sys/kernel/btf/vmlinux";

/// Debian packages the tests and the demo use, with the binaries each must provide.
const PACKAGES: &[(&str, &[&str])] = &[
    ("iproute2", &["ip", "ss"]),
    ("bpftool", &["bpftool"]),
    ("nginx-light", &["nginx"]),
    ("dnsmasq-base", &["dnsmasq"]),
    ("dnsutils", &["dig"]),
    ("iperf3", &["iperf3"]),
    ("curl", &["curl"]),
    ("socat", &["socat"]),
    ("iptables", &["iptables"]),
    ("procps", &["ps", "sysctl"]),
    // The dashboard test (tests/tests/dashboard.rs) evaluates every panel's query in a real
    // Prometheus it starts on loopback. Debian's package also enables a system service where
    // systemd runs; the tests never use that one.
    ("prometheus", &["prometheus"]),
    // The container test (tests/tests/container.rs): podman builds the image from the
    // Dockerfile, runc runs it (podman cannot here: it always sets rlimits, which this kind of
    // machine forbids), mmdebstrap makes the Debian base image with no registry, strip makes
    // the agent binary the image gets small.
    ("podman", &["podman"]),
    ("runc", &["runc"]),
    ("mmdebstrap", &["mmdebstrap"]),
    ("binutils", &["strip"]),
];

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Toolchain only (`build`): no root needed.
    Build,
    /// Everything (`test`, `demo`, `prereqs`): root, packages, mounts, kernel.
    Run,
}

/// What the checks found that later steps use.
pub struct Found {
    /// `cargo nextest` works.
    pub nextest: bool,
}

fn line(what: &str, status: &str) {
    println!("prereq: {what} ... {status}");
}

pub fn ensure(level: Level) -> Result<Found> {
    platform(level)?;
    rustup()?;
    nightly()?;
    rust_src()?;
    bpf_linker()?;
    if level == Level::Build {
        return Ok(Found { nextest: false });
    }
    debian_packages()?;
    crate::manifests::ensure_validator()?;
    let nextest = nextest();
    bpffs()?;
    cgroup2()?;
    kernel()?;
    btf();
    Ok(Found { nextest })
}

fn platform(level: Level) -> Result<()> {
    if !cfg!(target_os = "linux") {
        bail!(
            "prereq: Linux ... missing: sockmesh uses cgroup BPF programs and network namespaces, \
             which only Linux has (this is {})",
            std::env::consts::OS
        );
    }
    line("Linux", "ok");
    if level == Level::Run {
        if !is_root() {
            bail!(
                "prereq: root ... missing: test, demo and prereqs load BPF programs, create network \
                 namespaces, mount bpffs and install packages; run as root (e.g. `sudo -E \"$(command -v cargo)\" xtask test`)"
            );
        }
        line("root", "ok");
    }
    Ok(())
}

fn rustup() -> Result<()> {
    let Some(out) = try_output(Command::new("rustup").arg("--version")) else {
        bail!(
            "prereq: rustup ... missing: the eBPF build runs `rustup run nightly cargo ...`; \
             install rustup (see rustup.rs) and re-run"
        );
    };
    line("rustup", &format!("ok ({})", first_words(&out, 2)));
    Ok(())
}

fn nightly() -> Result<()> {
    let what = "toolchain `nightly` (builds the eBPF programs)";
    let list = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if has_named_toolchain(&list, "nightly") {
        line(what, "ok (already installed)");
        return Ok(());
    }
    let mut cmd = Command::new("rustup");
    cmd.args(["toolchain", "install", "nightly", "--profile", "minimal"]);
    line(
        what,
        &format!(
            "installing (rustup toolchain install nightly --profile minimal; log: {})",
            log_path("nightly").display()
        ),
    );
    run_logged(&mut cmd, "nightly").context("could not install the nightly toolchain")?;
    line(what, "ok (installed)");
    Ok(())
}

fn rust_src() -> Result<()> {
    let what = "rust-src for nightly (-Z build-std=core)";
    let list = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if has_component(&list, "rust-src") {
        line(what, "ok (already installed)");
        return Ok(());
    }
    line(
        what,
        &format!(
            "installing (rustup component add rust-src --toolchain nightly; log: {})",
            log_path("rust-src").display()
        ),
    );
    run_logged(
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        "rust-src",
    )
    .context("could not add rust-src to the nightly toolchain")?;
    line(what, "ok (installed)");
    Ok(())
}

fn bpf_linker_version() -> Option<(u32, u32, u32)> {
    try_output(Command::new("bpf-linker").arg("--version"))
        .and_then(|out| parse_bpf_linker_version(&out))
}

fn bpf_linker() -> Result<()> {
    let (a, b, c) = BPF_LINKER_VERSION;
    let want = format!("{a}.{b}.{c}");
    let what = format!("bpf-linker {want}");
    let why = "newer versions need a system LLVM this machine cannot get; 0.10.0 uses rustc's own";
    let log = log_path("bpf-linker");
    let mut cmd = cargo();
    cmd.args(["install", "bpf-linker", "--version", &want, "--locked"]);
    match bpf_linker_version() {
        Some(v) if v == BPF_LINKER_VERSION => {
            line(&what, "ok (already installed)");
            return Ok(());
        }
        Some((x, y, z)) => {
            line(
                &what,
                &format!(
                    "found {x}.{y}.{z}, replacing it ({why}); takes 1-2 min; log: {}",
                    log.display()
                ),
            );
            cmd.arg("--force");
        }
        None => line(
            &what,
            &format!(
                "installing with cargo install ({why}); takes 1-2 min; log: {}",
                log.display()
            ),
        ),
    }
    run_logged(&mut cmd, "bpf-linker").context("could not install bpf-linker")?;
    match bpf_linker_version() {
        Some(v) if v == BPF_LINKER_VERSION => {
            line(&what, "ok (installed)");
            Ok(())
        }
        _ => bail!(
            "prereq: {what} ... missing after install: add cargo's bin directory \
             (~/.cargo/bin or $CARGO_HOME/bin) to PATH"
        ),
    }
}

fn debian_packages() -> Result<()> {
    install_packages("Debian packages for tests and demo", PACKAGES)
}

/// Installs the missing ones of `packages` (package, binaries it must provide) with apt-get,
/// then checks every binary is on PATH. Idempotent: only checks when all are there.
pub fn install_packages(what: &str, packages: &[(&str, &[&str])]) -> Result<()> {
    let names: Vec<&str> = packages.iter().map(|(p, _)| *p).collect();
    if find_in_path("dpkg-query").is_none() {
        // Not Debian: accept the binaries if they are there, else say what to install.
        line(
            what,
            "skipped (no dpkg-query); checking the binaries instead",
        );
        return check_binaries(packages);
    }
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|pkg| {
            let status = try_output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]));
            !status.is_some_and(|s| dpkg_installed(&s))
        })
        .collect();
    if missing.is_empty() {
        line(what, "ok (already installed)");
    } else {
        line(
            what,
            &format!(
                "installing {} (log: {})",
                missing.join(" "),
                log_path("apt-get").display()
            ),
        );
        let apt = |args: &[&str], step: &str| {
            let mut cmd = Command::new("apt-get");
            cmd.env("DEBIAN_FRONTEND", "noninteractive").args(args);
            run_logged(&mut cmd, step)
        };
        apt(&["update"], "apt-get-update").context("apt-get update failed")?;
        let mut args = vec!["install", "-y", "--no-install-recommends"];
        args.extend(&missing);
        apt(&args, "apt-get")
            .with_context(|| format!("could not install {}", missing.join(" ")))?;
        line(what, "ok (installed)");
    }
    check_binaries(packages)
}

fn check_binaries(packages: &[(&str, &[&str])]) -> Result<()> {
    let mut missing = Vec::new();
    for (pkg, bins) in packages {
        for bin in *bins {
            if find_in_path(bin).is_none() {
                missing.push(format!("{bin} (package {pkg})"));
            }
        }
    }
    let all: Vec<&str> = packages
        .iter()
        .flat_map(|(_, b)| b.iter().copied())
        .collect();
    if !missing.is_empty() {
        bail!(
            "prereq: tools ... missing on PATH: {}; install those packages",
            missing.join(", ")
        );
    }
    line(&format!("tools {}", all.join(" ")), "ok");
    Ok(())
}

fn nextest() -> bool {
    let what = "cargo-nextest";
    match try_output(cargo().args(["nextest", "--version"])) {
        Some(out) => {
            line(what, &format!("ok ({})", first_words(&out, 2)));
            true
        }
        None => {
            line(
                what,
                "not found: falling back to `cargo test` (no per-test timeouts; \
                 `cargo install cargo-nextest --locked` to get them)",
            );
            false
        }
    }
}

fn read_mounts() -> Result<Vec<Mount>> {
    let text =
        fs::read_to_string("/proc/self/mounts").context("could not read /proc/self/mounts")?;
    Ok(parse_mounts(&text))
}

fn bpffs() -> Result<()> {
    let what = format!("bpffs at {BPFFS}");
    let mounted = |m: &[Mount]| {
        m.iter()
            .any(|m| m.fstype == "bpf" && m.target == Path::new(BPFFS))
    };
    if mounted(&read_mounts()?) {
        line(&what, "ok (already mounted)");
        return Ok(());
    }
    line(&what, &format!("mounting (mount -t bpf bpf {BPFFS})"));
    fs::create_dir_all(BPFFS).with_context(|| format!("could not create {BPFFS}"))?;
    run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
        .with_context(|| format!("could not mount bpffs at {BPFFS}"))?;
    if !mounted(&read_mounts()?) {
        bail!("prereq: {what} ... still not mounted after `mount -t bpf bpf {BPFFS}`");
    }
    line(&what, "ok (mounted)");
    Ok(())
}

fn cgroup2() -> Result<()> {
    match cgroup2_mount(&read_mounts()?) {
        Some(path) => {
            line("cgroup2 mount", &format!("ok ({})", path.display()));
            Ok(())
        }
        None => bail!(
            "prereq: cgroup2 mount ... missing: sockmesh attaches its programs to the cgroup2 root \
             and no cgroup2 filesystem is mounted; mount one, e.g. \
             `mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified`"
        ),
    }
}

fn kernel() -> Result<()> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("could not read the kernel release")?;
    let release = release.trim();
    let (maj, min) = MIN_KERNEL;
    let what = format!("kernel >= {maj}.{min}");
    match parse_kernel_version(release) {
        Some(v) if v >= MIN_KERNEL => line(&what, &format!("ok ({release})")),
        Some(_) => bail!(
            "prereq: {what} ... too old: this is {release}; the programs need the netns cookie in \
             sock_ops and cgroup sockopt/getpeername hooks from {maj}.{min}"
        ),
        None => line(
            &what,
            &format!("warning: cannot parse release {release:?}; continuing"),
        ),
    }
    Ok(())
}

fn btf() {
    let what = format!("BTF at {BTF}");
    if Path::new(BTF).exists() {
        line(&what, "ok");
    } else {
        line(
            &what,
            "warning: missing (kernel built without CONFIG_DEBUG_INFO_BTF); programs needing \
             kernel type info may fail to load",
        );
    }
}

fn first_words(s: &str, n: usize) -> String {
    s.split_whitespace().take(n).collect::<Vec<_>>().join(" ")
}
