//! Bad input makes `sockmesh` fail with one clear error and a non-zero exit, and leaves nothing
//! behind: no pinned maps or links (links are pinned only on purpose; unpinned ones are owned by
//! the process's fds and die with it), no pin directory it created, no event on stdout.
//!
//! Tier: the default (`--fast-path auto`); bad input is refused before any connection, and
//! the one connection a running agent gets is its peer's first, which the proxy takes.

use anyhow::{Context, Result};
use sockmesh_tests::names::random_hex;
use sockmesh_tests::sys::{pid_alive, wait_timeout};
use sockmesh_tests::*;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(5);

/// The exit code, stdout and stderr of one finished `sockmesh` run.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Outcome {
    /// Asserts an agent-reported error: exit code 1 and exactly one `sockmesh: error:` line,
    /// which contains every one of `phrases`. Returns that line.
    fn assert_agent_error(&self, phrases: &[&str]) -> String {
        assert_eq!(
            self.code,
            Some(1),
            "exit code; stderr:\n{}\nstdout:\n{}",
            self.stderr,
            self.stdout
        );
        let errors: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("sockmesh: error:"))
            .collect();
        assert_eq!(
            errors.len(),
            1,
            "exactly one error line expected; stderr:\n{}",
            self.stderr
        );
        for p in phrases {
            assert!(
                errors[0].contains(p),
                "the error should say {p:?}; it says:\n{}",
                errors[0]
            );
        }
        self.assert_no_events();
        errors[0].to_owned()
    }

    /// Nothing was announced on stdout: no pod was enrolled, the agent never became ready.
    fn assert_no_events(&self) {
        assert!(
            self.stdout.trim().is_empty(),
            "a failed run must not report progress; stdout:\n{}",
            self.stdout
        );
    }
}

fn run(args: &[&str]) -> Result<Outcome> {
    let (status, stdout, stderr) = Agent::run_to_exit(args)?;
    Ok(Outcome {
        code: status.code(),
        stdout,
        stderr,
    })
}

/// A fresh private bpffs directory, and a `--bpffs-dir` below it that does not exist yet: a
/// failed run must not even create it.
fn pin_dirs() -> Result<(Arc<BpfFsDir>, PathBuf)> {
    let dir = BpfFsDir::new()?;
    let pins = dir.path().join("sockmesh");
    Ok((dir, pins))
}

fn assert_nothing_pinned(dir: &BpfFsDir, pins: &Path) -> Result<()> {
    assert!(
        !pins.exists(),
        "{} was left behind by a failed run",
        pins.display()
    );
    assert_eq!(
        dir.entries()?,
        Vec::<String>::new(),
        "entries left in {}",
        dir.path().display()
    );
    Ok(())
}

/// `sockmesh run --pod <pod> --bpffs-dir <pins>` with `pod` given verbatim.
fn run_with_pod(pod: &str, pins: &Path) -> Result<Outcome> {
    run(&["run", "--pod", pod, "--bpffs-dir", &pins.to_string_lossy()])
}

#[test]
fn a_file_that_is_not_a_netns_is_refused() -> Result<()> {
    require_root();
    let (dir, pins) = pin_dirs()?;
    let out = run_with_pod("/etc/passwd", &pins)?;
    out.assert_agent_error(&["/etc/passwd", "is not a network namespace"]);
    assert_nothing_pinned(&dir, &pins)
}

#[test]
fn a_missing_netns_is_refused() -> Result<()> {
    require_root();
    let (dir, pins) = pin_dirs()?;
    let missing = format!("/nonexistent-{}/netns", random_hex(4));
    let out = run_with_pod(&missing, &pins)?;
    out.assert_agent_error(&["cannot open network namespace", &missing]);
    assert_nothing_pinned(&dir, &pins)
}

#[test]
fn an_unknown_pod_option_is_a_usage_error() -> Result<()> {
    require_root();
    let pod = Pod::isolated("p")?;
    let (dir, pins) = pin_dirs()?;
    let out = run_with_pod(&pod_spec(&pod, "colour=red"), &pins)?;
    // Rejected while parsing the command line: clap's usage error (exit code 2), naming the
    // flag, the option and the valid ones.
    assert!(
        matches!(out.code, Some(c) if c != 0),
        "exit code {:?}; stderr:\n{}",
        out.code,
        out.stderr
    );
    for p in ["--pod", "unknown pod option 'colour'", "exclude-ports"] {
        assert!(
            out.stderr.contains(p),
            "stderr should say {p:?}:\n{}",
            out.stderr
        );
    }
    out.assert_no_events();
    assert_nothing_pinned(&dir, &pins)
}

#[test]
fn an_outbound_port_in_use_in_the_pod_is_refused() -> Result<()> {
    require_root();
    let pod = Pod::isolated("p")?;
    let squatter = pod.run(|| TcpListener::bind("127.0.0.1:15001"))?;
    let (dir, pins) = pin_dirs()?;
    let out = run_with_pod(&pod_spec(&pod, ""), &pins)?;
    out.assert_agent_error(&["127.0.0.1:15001", "already uses it", "--outbound-port"]);
    assert_nothing_pinned(&dir, &pins)?;
    // Whatever the agent had opened in the pod is gone; the squatter is untouched.
    assert_eq!(
        tcp_listeners(&pod)?,
        vec![squatter.local_addr()?],
        "listeners left in the pod"
    );
    Ok(())
}

#[test]
fn the_same_pod_twice_is_refused() -> Result<()> {
    require_root();
    let pod = Pod::isolated("p")?;
    let (dir, pins) = pin_dirs()?;
    let spec = pod_spec(&pod, "");
    let out = run(&[
        "run",
        "--pod",
        &spec,
        "--pod",
        &spec,
        "--bpffs-dir",
        &pins.to_string_lossy(),
    ])?;
    out.assert_agent_error(&["same network namespace"]);
    assert_nothing_pinned(&dir, &pins)?;
    assert_eq!(tcp_listeners(&pod)?, vec![], "listeners left in the pod");
    Ok(())
}

#[test]
fn a_bpffs_dir_off_bpffs_is_refused() -> Result<()> {
    require_root();
    let pod = Pod::isolated("p")?;
    let dir = std::env::temp_dir().join(format!("smt-not-bpffs-{}", random_hex(6)));
    let out = run_with_pod(&pod_spec(&pod, ""), &dir)?;
    out.assert_agent_error(&[&dir.to_string_lossy(), "not on a bpf filesystem"]);
    assert!(!dir.exists(), "{} was created", dir.display());
    Ok(())
}

#[test]
fn without_privileges_it_names_the_missing_capabilities() -> Result<()> {
    require_root();
    let pod = Pod::isolated("p")?;
    let (dir, pins) = pin_dirs()?;
    // As nobody, with no capabilities at all, not even inheritable or in the bounding set.
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ])
    .arg(sockmesh_bin())
    .args(["run", "--pod", &pod_spec(&pod, ""), "--bpffs-dir"])
    .arg(&pins)
    // Hermetic: no SOCKMESH_* variable from the caller's shell changes what runs.
    .env_clear()
    .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("spawn setpriv")?;
    let pid = child.id();
    let status = wait_timeout(&mut child, Duration::from_secs(60))?;
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("sockmesh without privileges did not exit within 60 s");
    };
    let read = |r: Option<Box<dyn std::io::Read>>| -> String {
        let mut s = String::new();
        if let Some(mut r) = r {
            let _ = r.read_to_string(&mut s);
        }
        s
    };
    let out = Outcome {
        code: status.code(),
        stdout: read(child.stdout.take().map(|r| Box::new(r) as _)),
        stderr: read(child.stderr.take().map(|r| Box::new(r) as _)),
    };
    let line = out.assert_agent_error(&["missing capabilities", "run sockmesh as root"]);
    for cap in ["CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"] {
        assert!(line.contains(cap), "{cap} not named: {line}");
    }
    assert!(!pid_alive(pid));
    assert_nothing_pinned(&dir, &pins)
}

#[test]
fn a_second_agent_on_the_same_bpffs_dir_is_refused_and_the_first_keeps_working() -> Result<()> {
    require_root();
    let cluster = Cluster::new()?;
    let a = cluster.add_pod("a")?;
    let b = cluster.add_pod("b")?;
    let server = cluster.add_pod("server")?;
    let first = Agent::start(["--pod", &pod_spec(&a, "")])?;
    first.wait_ready()?;
    let pins_before = first.bpffs().entries()?;
    assert!(!pins_before.is_empty(), "the first agent pins its maps");

    let dir = first.bpffs_dir().to_string_lossy().into_owned();
    let out = run(&["run", "--pod", &pod_spec(&b, ""), "--bpffs-dir", &dir])?;
    out.assert_agent_error(&["another sockmesh agent is running", &dir]);

    // The loser changed nothing: same pins, and pod b was never enrolled.
    assert_eq!(
        first.bpffs().entries()?,
        pins_before,
        "pins of the first agent"
    );
    let stats = first.stats()?;
    let b_cookie = b.netns_cookie()?;
    let pods = stats["pods"].as_array().context("pods array")?;
    assert!(
        !pods
            .iter()
            .any(|p| p["netns_cookie"].as_u64() == Some(b_cookie)),
        "pod b has kernel state: {stats}"
    );
    assert_eq!(tcp_listeners(&b)?, vec![], "listeners left in pod b");

    // The first agent still proxies pod a's traffic.
    assert!(first.is_running(), "the first agent died");
    let a_cookie = a.netns_cookie()?;
    let redirected = |stats: &serde_json::Value| {
        stats["pods"]
            .as_array()
            .and_then(|ps| {
                ps.iter()
                    .find(|p| p["netns_cookie"].as_u64() == Some(a_cookie))
            })
            .and_then(|p| p["counters"]["redirect_tcp"].as_u64())
            .unwrap_or(0)
    };
    let before = redirected(&stats);
    let srv = TcpServer::start(&server, "0.0.0.0:8080".parse()?)?;
    let mut c = tcp_connect(&a, server.addr4(8080), T)?;
    tcp_echo_roundtrip(&mut c.stream, b"still proxied")?;
    assert_eq!(c.peer, server.addr4(8080));
    assert_eq!(
        srv.next_accept(T)?.peer.ip(),
        std::net::IpAddr::from(a.ip4())
    );
    let after = redirected(&first.stats()?);
    assert!(
        after > before,
        "the connection was not redirected (redirect_tcp {before} -> {after})"
    );
    Ok(())
}

#[test]
fn stats_without_pins_names_the_missing_map() -> Result<()> {
    require_root();
    let dir = BpfFsDir::new()?;
    let path = dir.path().to_string_lossy().into_owned();
    let out = run(&["stats", "--bpffs-dir", &path, "--json"])?;
    let line = out.assert_agent_error(&["SM_CONFIG", "is the agent running", &path]);
    assert!(line.contains(&format!("{path}/SM_CONFIG")), "{line}");
    assert_eq!(dir.entries()?, Vec::<String>::new(), "stats created pins");
    Ok(())
}
