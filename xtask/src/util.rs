//! Small helpers shared by the subcommands: running commands with readable errors, locating
//! the workspace, the PATH, and a guard that stops a child process when dropped.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The workspace root (the parent of `xtask/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` if set, else `<root>/target`.
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => repo_root().join(dir),
        None => repo_root().join("target"),
    }
}

/// A `cargo` command (the same cargo that runs xtask), started in the workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(repo_root());
    cmd
}

/// `program arg1 arg2 ...` for messages (program shown by its file name for cargo's full path).
pub fn describe(cmd: &Command) -> String {
    let prog = Path::new(cmd.get_program());
    let mut s = match prog.file_name() {
        Some(name) if prog.is_absolute() => name.to_string_lossy().into_owned(),
        _ => prog.to_string_lossy().into_owned(),
    };
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs `cmd` with inherited stdio; an error names the command and its exit status.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{}`", describe(cmd)))?;
    check_status(cmd, status)
}

/// Where [`run_logged`] writes: one file per step under `target/xtask-logs/`.
pub fn log_path(step: &str) -> PathBuf {
    target_dir().join("xtask-logs").join(format!("{step}.log"))
}

/// How many of a failed step's last log lines are shown.
const TAIL_LINES: usize = 40;

/// Runs `cmd` with its stdout and stderr going to [`log_path`]`(step)` (replaced each run), so a
/// package manager's or a compiler's hundreds of lines stay out of the reader's way. On
/// failure the error carries the log's last lines and names the file, so nothing is hidden
/// when it matters.
pub fn run_logged(cmd: &mut Command, step: &str) -> Result<()> {
    let path = log_path(step);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("could not create {}", dir.display()))?;
    }
    let log = std::fs::File::create(&path)
        .with_context(|| format!("could not create {}", path.display()))?;
    let err = log
        .try_clone()
        .with_context(|| format!("could not reopen {}", path.display()))?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .status()
        .with_context(|| format!("could not start `{}`", describe(cmd)))?;
    if status.success() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    bail!(
        "`{}` failed ({status}); its last lines (all of it in {}):\n{}",
        describe(cmd),
        path.display(),
        tail(&text, TAIL_LINES)
    )
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn check_status(cmd: &Command, status: ExitStatus) -> Result<()> {
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; an error names the command and includes its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{}`", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Like [`output`], but `None` when the program is missing or fails.
pub fn try_output(cmd: &mut Command) -> Option<String> {
    output(cmd).ok()
}

/// Finds an executable on `$PATH`.
pub fn find_in_path(bin: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(bin))
        .find(|p| p.is_file())
}

/// Makes sure the places our tools live are on `$PATH` for us and every child: cargo's bin
/// directory (bpf-linker, cargo-nextest) and the sbin directories (ip, bpftool, nginx, dnsmasq),
/// which a non-login root shell may lack. Call once at startup, before any thread exists.
pub fn extend_path() {
    let mut dirs: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();
    let cargo_bin = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|home| home.join("bin"));
    let extra = cargo_bin
        .into_iter()
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from));
    let mut changed = false;
    for dir in extra {
        if !dirs.contains(&dir) {
            dirs.push(dir);
            changed = true;
        }
    }
    if changed {
        if let Ok(joined) = env::join_paths(dirs) {
            env::set_var("PATH", joined);
        }
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Sends `signal` to `pid`; errors (e.g. the process is gone) are ignored.
pub fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: plain syscall on a pid we started.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Catches SIGINT/SIGTERM so long-running steps can stop and their guards clean up.
pub fn catch_interrupts() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub fn bail_if_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Waits for `child` to exit, up to `timeout`.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A child process that is stopped (SIGTERM, then SIGKILL after 5 s) when the guard drops.
pub struct ChildGuard {
    pub name: String,
    pub child: Child,
}

impl ChildGuard {
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self> {
        let child = cmd
            .spawn()
            .with_context(|| format!("could not start {name} (`{}`)", describe(cmd)))?;
        Ok(Self {
            name: name.to_string(),
            child,
        })
    }

    /// Fails if the process has already exited (e.g. it could not bind its port).
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited early ({status}); see its output above",
                self.name
            );
        }
        Ok(())
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status if it exited in time.
    pub fn stop(&mut self, grace: Duration) -> Result<Option<ExitStatus>> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(Some(status));
        }
        signal(self.child.id(), libc::SIGTERM);
        let status = wait_timeout(&mut self.child, grace)?;
        if status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        Ok(status)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.stop(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logged_step_keeps_its_output_in_the_log_and_shows_the_tail_when_it_fails() {
        let step = format!("xtask-selftest-{}", std::process::id());
        run_logged(
            Command::new("sh").args(["-c", "echo one; echo two >&2"]),
            &step,
        )
        .expect("a step that succeeds");
        let log = std::fs::read_to_string(log_path(&step)).expect("the log");
        assert_eq!(log, "one\ntwo\n", "stdout and stderr, in order, in the log");

        let script = "for i in $(seq 1 100); do echo line$i; done; echo boom >&2; exit 3";
        let err = run_logged(Command::new("sh").args(["-c", script]), &step)
            .expect_err("a step that fails")
            .to_string();
        assert!(err.contains("boom"), "{err}");
        assert!(err.contains("line100"), "{err}");
        assert!(!err.contains("line50\n"), "only the tail: {err}");
        assert!(
            err.contains(&log_path(&step).display().to_string()),
            "{err}"
        );
        assert!(err.contains("exit status: 3"), "{err}");
        let _ = std::fs::remove_file(log_path(&step));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 5), "");
    }
}
