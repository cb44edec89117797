//! The sockmesh agent as a guarded child process, and its private bpffs directory.

use crate::names::unique_name;
use crate::pod::Pod;
use crate::sys::{self, FileLock};
use crate::tempdir::TempDir;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::collections::VecDeque;
use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where bpffs is (or gets) mounted.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// How long `wait_ready` waits: loading and attaching the programs plus enrolling pods.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `stop` lets the agent drain after SIGTERM before it counts as hung.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Upper bound for one `run_to_exit` (a CLI call such as `stats` or a bad-flag run).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// The agent binary: `$SOCKMESH_BIN`, else `target/<profile>/sockmesh` beside the running test
/// executable (`target/<profile>/deps/<test>`). Panics with instructions if it is missing: a
/// test that cannot find the agent must fail loudly, never pass vacuously.
pub fn sockmesh_bin() -> PathBuf {
    let path = match std::env::var_os("SOCKMESH_BIN") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.parent()?.join("sockmesh")))
            .expect("cannot locate the test executable's target directory"),
    };
    assert!(
        path.is_file(),
        "sockmesh binary not found at {}: build it with `cargo xtask test` (or point SOCKMESH_BIN at it)",
        path.display()
    );
    path
}

/// `--pod` value for `pod` with agent options, e.g. `pod_spec(&p, "exclude-ports=22;8000-8100")`
/// (empty `opts` gives just the netns path).
pub fn pod_spec(pod: &Pod, opts: &str) -> String {
    let path = pod.netns_path().display().to_string();
    if opts.is_empty() {
        path
    } else {
        format!("{path},{opts}")
    }
}

/// Mounts bpffs at /sys/fs/bpf unless it already is. Serialised across test processes: two
/// mounts racing would stack, and pins made under the lower one would vanish from view.
pub fn ensure_bpffs() -> Result<()> {
    let _lock = FileLock::acquire("smt-bpffs")?;
    let mounts = fs::read_to_string("/proc/self/mounts").context("read /proc/self/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == BPFFS_ROOT && f[2] == "bpf"
    });
    if mounted {
        return Ok(());
    }
    let c = |s: &str| CString::new(s).expect("no NUL");
    let (src, target, fstype) = (c("bpf"), c(BPFFS_ROOT), c("bpf"));
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("mount -t bpf bpf /sys/fs/bpf");
    }
    Ok(())
}

/// A private directory `/sys/fs/bpf/smt-<pid>-<n>-<rand>` for one agent's pins (or several
/// agents' in turn, for restart tests: share it through the `Arc`). Removed recursively when the
/// last holder drops it; removing the pins is what detaches pinned links and frees maps.
#[derive(Debug)]
pub struct BpfFsDir {
    path: PathBuf,
}

impl BpfFsDir {
    pub fn new() -> Result<Arc<Self>> {
        crate::sys::require_root();
        ensure_bpffs()?;
        let path = Path::new(BPFFS_ROOT).join(unique_name());
        fs::create_dir(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Arc::new(Self { path }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names of the entries pinned directly in this directory, sorted.
    pub fn entries(&self) -> Result<Vec<String>> {
        let mut v: Vec<String> = fs::read_dir(&self.path)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()?;
        v.sort();
        Ok(v)
    }
}

impl Drop for BpfFsDir {
    fn drop(&mut self) {
        if self.path.exists() {
            if let Err(e) = fs::remove_dir_all(&self.path) {
                eprintln!("[smt] warning: remove {}: {e}", self.path.display());
            }
        }
    }
}

/// The agent reads every flag also from a `SOCKMESH_*` variable; one exported in a developer's
/// shell (say SOCKMESH_KEEP_PINS) would silently change what a test runs. Only the log level is
/// let through, since raising it is how one debugs a failing test.
fn hermetic_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let Some(k) = k.to_str() else { continue };
        // NODE_NAME is --node-name's fallback (the DaemonSet's downward API variable).
        if (k.starts_with("SOCKMESH_") && k != "SOCKMESH_LOG_LEVEL") || k == "NODE_NAME" {
            cmd.env_remove(k);
        }
    }
}

struct Events {
    rx: Receiver<Value>,
    /// Received but not yet returned by `wait_event` (they did not match its predicate then).
    pending: VecDeque<Value>,
}

/// A running `sockmesh run ...`. Its stdout is parsed as JSON event lines; its stderr (the log)
/// goes to a file that is printed if the test panics. Drop SIGKILLs its process group if it is
/// still running, then (when this was the last holder) removes its bpffs directory.
pub struct Agent {
    child: Mutex<Child>,
    events: Mutex<Events>,
    history: Arc<Mutex<Vec<Value>>>,
    stderr_log: PathBuf,
    bpffs: Arc<BpfFsDir>,
    /// The agent's pin directory as seen from here: `bpffs`, or a directory in it for an
    /// agent in a container that mounts `bpffs` as its own bpf filesystem.
    pins: PathBuf,
    _tmp: TempDir,
}

impl Agent {
    /// Starts `sockmesh run <args> --bpffs-dir <fresh dir>`.
    pub fn start<I, S>(args: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::start_in(BpfFsDir::new()?, args)
    }

    /// Starts `sockmesh run <args> --bpffs-dir <bpffs>`: for a restarted agent re-adopting
    /// the pins of a previous one (pass `previous.bpffs()`).
    pub fn start_in<I, S>(bpffs: Arc<BpfFsDir>, args: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        crate::sys::require_root();
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let mut cmd = Command::new(sockmesh_bin());
        cmd.arg("run").args(&args);
        // Agents of parallel tests must not fight over the default metrics port: an ephemeral
        // one unless the test picks (the address is in the `metrics_listening` event).
        if !args.iter().any(|a| a.to_str() == Some("--metrics-addr")) {
            cmd.args(["--metrics-addr", "127.0.0.1:0"]);
        }
        cmd.arg("--bpffs-dir")
            .arg(bpffs.path())
            .env("RUST_BACKTRACE", "1");
        hermetic_env(&mut cmd);
        let pins = bpffs.path().to_path_buf();
        Self::spawn(cmd, bpffs, pins)
    }

    /// Starts `cmd`, a command whose stdout and stderr are the agent's (such as a container
    /// runtime running it in the foreground), whose pins are in `pins` under `bpffs`.
    pub fn spawn(mut cmd: Command, bpffs: Arc<BpfFsDir>, pins: PathBuf) -> Result<Self> {
        let tmp = TempDir::new()?;
        let stderr_log = tmp.join("agent.stderr.log");
        let stdout_log = tmp.join("agent.stdout.log");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr_log)?);
        sys::own_group_and_die_with_parent(&mut cmd);
        let mut child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
        let stdout = child.stdout.take().expect("stdout is piped");

        let (tx, rx) = mpsc::channel();
        let history: Arc<Mutex<Vec<Value>>> = Arc::default();
        let hist = history.clone();
        let mut raw = File::create(&stdout_log)?;
        // Forwards each stdout line as one event; the thread ends at EOF (agent exited), which
        // the receiver sees as a disconnect, so waiters learn about a dead agent at once.
        std::thread::Builder::new()
            .name("smt-agent-stdout".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(raw, "{line}");
                    let v = serde_json::from_str::<Value>(&line).unwrap_or(Value::String(line));
                    hist.lock().expect("history lock").push(v.clone());
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            })?;

        Ok(Self {
            child: Mutex::new(child),
            events: Mutex::new(Events {
                rx,
                pending: VecDeque::new(),
            }),
            history,
            stderr_log,
            bpffs,
            pins,
            _tmp: tmp,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.lock().expect("child lock").id()
    }

    /// The agent's pin directory (the `--bpffs-dir` it was given, seen from here).
    pub fn bpffs_dir(&self) -> &Path {
        &self.pins
    }

    /// A handle on the bpffs directory, to keep it (and pins left with `--keep-pins`) alive
    /// after this agent is dropped, or to start a successor in it with [`Agent::start_in`].
    pub fn bpffs(&self) -> Arc<BpfFsDir> {
        self.bpffs.clone()
    }

    /// The first event not yet returned by an earlier `wait_event` that satisfies `pred`,
    /// waiting at most `timeout`. Events that do not match stay queued for later calls, so the
    /// order in which a test waits does not matter. Fails at once if the agent exits first.
    pub fn wait_event(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut ev = self.events.lock().expect("events lock");
        if let Some(i) = ev.pending.iter().position(&pred) {
            return Ok(ev.pending.remove(i).expect("index from position"));
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match ev.rx.recv_timeout(left) {
                Ok(v) if pred(&v) => return Ok(v),
                Ok(v) => ev.pending.push_back(v),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(self.failure(&format!("no matching agent event within {timeout:?}")))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = {
                        let mut child = self.child.lock().expect("child lock");
                        sys::wait_timeout(&mut child, Duration::from_secs(5))
                            .ok()
                            .flatten()
                    };
                    let status = status.map_or("still running?".into(), |s| s.to_string());
                    return Err(self.failure(&format!(
                        "agent closed stdout ({status}) before a matching event"
                    )));
                }
            }
        }
    }

    /// `wait_event` for `{"event": name, ...}`.
    pub fn wait_event_named(&self, name: &str, timeout: Duration) -> Result<Value> {
        self.wait_event(|v| v["event"] == name, timeout)
            .with_context(|| format!("waiting for agent event {name:?}"))
    }

    /// Waits for `{"event":"ready",...}` (all pods enrolled, listeners open).
    pub fn wait_ready(&self) -> Result<Value> {
        self.wait_event_named("ready", READY_TIMEOUT)
    }

    /// Every stdout line seen so far, in order (non-JSON lines as strings).
    pub fn events(&self) -> Vec<Value> {
        self.history.lock().expect("history lock").clone()
    }

    /// The agent's log (stderr) so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Sends `sig` to the agent process.
    pub fn signal(&self, sig: libc::c_int) -> Result<()> {
        sys::signal(self.pid() as libc::pid_t, sig).context("signal agent")
    }

    pub fn is_running(&self) -> bool {
        matches!(self.child.lock().expect("child lock").try_wait(), Ok(None))
    }

    /// SIGTERM, then wait up to [`STOP_TIMEOUT`] for a clean exit; returns the exit status.
    /// An agent that does not exit in time is killed and reported as an error.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM)?;
        let mut child = self.child.lock().expect("child lock");
        match sys::wait_timeout(&mut child, STOP_TIMEOUT)? {
            Some(status) => Ok(status),
            None => {
                let pid = child.id() as libc::pid_t;
                let _ = sys::signal(-pid, libc::SIGKILL);
                let _ = child.wait();
                drop(child);
                Err(self.failure(&format!(
                    "agent still running {STOP_TIMEOUT:?} after SIGTERM"
                )))
            }
        }
    }

    /// Waits up to `timeout` for the agent to exit by itself (no signal sent); `None` if it
    /// is still running then.
    pub fn wait_exit(&self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let mut child = self.child.lock().expect("child lock");
        Ok(sys::wait_timeout(&mut child, timeout)?)
    }

    /// SIGKILL (a crash, as far as the kernel side can tell): pins stay in the bpffs dir.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.lock().expect("child lock");
        sys::signal(-(child.id() as libc::pid_t), libc::SIGKILL)?;
        Ok(child.wait()?)
    }

    /// `sockmesh stats --bpffs-dir <dir> --json`, parsed.
    pub fn stats(&self) -> Result<Value> {
        let dir = self.pins.to_string_lossy().into_owned();
        let (status, out, err) = Self::run_to_exit(["stats", "--bpffs-dir", &dir, "--json"])?;
        if !status.success() {
            bail!("sockmesh stats failed ({status}): {err}");
        }
        serde_json::from_str(&out).with_context(|| format!("stats output is not JSON: {out}"))
    }

    /// `sockmesh <what> --bpffs-dir <dir> --json <extra...>` (what: stats, peers, pods), parsed.
    pub fn read_json(&self, what: &str, extra: &[&str]) -> Result<Value> {
        read_json(&self.pins, what, extra)
    }

    /// Where the metrics endpoint listens (from the `metrics_listening` event).
    pub fn metrics_addr(&self) -> Result<std::net::SocketAddr> {
        // From the history if an earlier call already took the event.
        let seen = self
            .events()
            .into_iter()
            .find(|v| v["event"] == "metrics_listening");
        let ev = match seen {
            Some(ev) => ev,
            None => self.wait_event_named("metrics_listening", READY_TIMEOUT)?,
        };
        ev["addr"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| anyhow!("metrics_listening event without an address: {ev}"))
    }

    /// Runs `sockmesh <args>` (full command line, subcommand included) to completion within
    /// [`RUN_TIMEOUT`] and returns (status, stdout, stderr): for CLI calls and bad-input tests.
    /// Give any `run` a `--bpffs-dir` from [`BpfFsDir::new`] so it never touches the default one.
    pub fn run_to_exit<I, S>(args: I) -> Result<(ExitStatus, String, String)>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(sockmesh_bin());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        hermetic_env(&mut cmd);
        sys::own_group_and_die_with_parent(&mut cmd);
        let mut child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
        // Drain both pipes concurrently so a chatty child cannot block on a full pipe.
        let drain = |r: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut s = String::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_string(&mut s);
                }
                s
            })
        };
        let out = drain(child.stdout.take().map(|r| Box::new(r) as _));
        let err = drain(child.stderr.take().map(|r| Box::new(r) as _));
        let status = match sys::wait_timeout(&mut child, RUN_TIMEOUT)? {
            Some(s) => s,
            None => {
                let _ = sys::signal(-(child.id() as libc::pid_t), libc::SIGKILL);
                let _ = child.wait();
                bail!("{cmd:?} did not exit within {RUN_TIMEOUT:?}");
            }
        };
        let join =
            |h: std::thread::JoinHandle<String>| h.join().map_err(|_| anyhow!("reader panicked"));
        Ok((status, join(out)?, join(err)?))
    }

    fn failure(&self, what: &str) -> anyhow::Error {
        let events: Vec<String> = self.events().iter().map(Value::to_string).collect();
        anyhow!(
            "{what}\nagent events so far: [{}]\nagent stderr (tail):\n{}",
            events.join(", "),
            sys::tail(&self.stderr_log, 8 * 1024)
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let child = self.child.get_mut().expect("child lock");
        if matches!(child.try_wait(), Ok(None)) {
            let _ = sys::signal(-(child.id() as libc::pid_t), libc::SIGKILL);
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let events: Vec<String> = self.events().iter().map(Value::to_string).collect();
            eprintln!(
                "----- [smt] agent (bpffs {}) events -----\n{}\n----- agent stderr -----\n{}\n----- end of agent log -----",
                self.pins.display(),
                events.join("\n"),
                sys::tail(&self.stderr_log, 32 * 1024)
            );
        }
        // The bpffs dir goes when the last Arc does (field drop, right after this).
    }
}

/// `sockmesh <what> --bpffs-dir <dir> --json <extra...>`, parsed: works with no agent running.
pub fn read_json(dir: &Path, what: &str, extra: &[&str]) -> Result<Value> {
    let dir = dir.to_string_lossy().into_owned();
    let mut args = vec![what, "--bpffs-dir", &dir, "--json"];
    args.extend_from_slice(extra);
    let (status, out, err) = Agent::run_to_exit(&args)?;
    if !status.success() {
        bail!("sockmesh {what} failed ({status}): {err}");
    }
    serde_json::from_str(&out).with_context(|| format!("{what} output is not JSON: {out}"))
}
