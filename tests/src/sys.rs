//! Thin wrappers over the system calls and commands the harness needs.

use anyhow::{bail, Context, Result};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// Panics unless running as root. Kernel tests need root for namespaces, bpffs and BPF; they
/// must fail, never skip, when they cannot run, or a misconfigured CI would pass vacuously.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "sockmesh integration tests must run as root (euid is {euid}): they create network \
         namespaces, mount bpffs and load BPF programs. Run them via `cargo xtask test` as root; \
         they are never skipped."
    );
}

/// Runs `cmd` to completion; on failure the error carries the command line and its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawn {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` to completion within `timeout` and returns its stdout (error if it fails or times
/// out, with its stderr). Output goes through files in `scratch`, not pipes: a command that
/// leaves a daemon behind (which inherits stdout) must not make us wait for the daemon.
pub fn run_bounded(cmd: &mut Command, timeout: Duration, scratch: &Path) -> Result<String> {
    let base = scratch.join(crate::names::unique_name());
    let (out_path, err_path) = (base.with_extension("out"), base.with_extension("err"));
    let result = (|| {
        cmd.stdin(Stdio::null())
            .stdout(File::create(&out_path)?)
            .stderr(File::create(&err_path)?);
        own_group_and_die_with_parent(cmd);
        let mut child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
        let Some(status) = wait_timeout(&mut child, timeout)? else {
            let _ = signal(-(child.id() as libc::pid_t), libc::SIGKILL);
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {timeout:?}");
        };
        let out = fs::read_to_string(&out_path)?;
        if !status.success() {
            bail!(
                "{cmd:?} failed ({status}): {}",
                tail(&err_path, 4096).trim()
            );
        }
        Ok(out)
    })();
    let _ = fs::remove_file(&out_path);
    let _ = fs::remove_file(&err_path);
    result
}

/// Whether `program` is an executable on PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| {
            fs::metadata(d.join(program)).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
        })
    })
}

/// Runs `ip <args>`.
pub fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// An exclusive `flock` on a machine-wide lock file, released on drop. Used where parallel test
/// processes would otherwise race on shared one-time setup (the first `ip netns add` makes
/// /run/netns a shared mount; the first test mounts bpffs): two racing mounts would stack and
/// hide each other's contents.
pub struct FileLock {
    _file: File,
}

impl FileLock {
    pub fn acquire(name: &str) -> Result<Self> {
        let path = format!("/run/{name}.lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("open {path}"))?;
        // SAFETY: plain syscall on a valid fd we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error()).with_context(|| format!("flock {path}"));
        }
        Ok(Self { _file: f })
    }
}

/// Whether a process with this pid exists (a zombie counts: its pid is not reusable yet).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Sends `sig` to a pid (positive) or a process group (negative); a vanished target is not an
/// error because cleanup races with processes exiting on their own.
pub fn signal(target: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: plain syscall.
    if unsafe { libc::kill(target, sig) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        Ok(())
    } else {
        Err(e)
    }
}

/// Makes a spawned child die with SIGKILL when the thread that spawned it exits (for example when
/// the whole test process is SIGKILLed), and puts it in its own process group so that cleanup can
/// kill it together with anything it forked.
///
/// Caveat: the kernel ties PR_SET_PDEATHSIG to the spawning *thread*, so spawn long-lived
/// processes from the test's own thread (the usual case), not from a short-lived helper thread.
pub fn own_group_and_die_with_parent(cmd: &mut Command) {
    cmd.process_group(0);
    // SAFETY: the closure runs between fork and exec and only calls async-signal-safe prctl.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Waits at most `timeout` for `child` to exit, without polling: a pidfd becomes readable when
/// the process exits. Returns `None` on timeout (the child is left running).
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    if let Some(status) = child.try_wait()? {
        return Ok(Some(status));
    }
    let pidfd = pidfd_open(child.id())?;
    if poll_readable(&pidfd, timeout)? {
        child.wait().map(Some)
    } else {
        Ok(None)
    }
}

/// (device, inode) identifying a namespace file such as /run/netns/X or /proc/P/ns/net.
pub fn ns_id(path: &Path) -> io::Result<(u64, u64)> {
    let m = fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Pids of processes whose (main thread's) network namespace is the one pinned at `netns_path`:
/// what `ip netns pids` prints. Threads of other processes that merely `setns` into it (the
/// agent's listener threads, this harness's `Pod::run`) are deliberately not included, so
/// cleaning a pod never kills the agent or the test itself.
pub fn pids_in_netns(netns_path: &Path) -> io::Result<Vec<u32>> {
    let target = fs::metadata(netns_path)?.ino();
    let me = std::process::id();
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        // Processes may exit while we scan; a failed stat just means "not in there".
        if let Ok(m) = fs::metadata(format!("/proc/{pid}/ns/net")) {
            // nsfs inodes are unique machine-wide, so the inode alone identifies the netns.
            if m.ino() == target {
                pids.push(pid);
            }
        }
    }
    Ok(pids)
}

/// SIGKILLs every process living in the netns pinned at `netns_path` and waits (bounded) until
/// they have exited, so their sockets are closed when this returns; returns their pids.
/// Daemons (nginx, dnsmasq) leave the process group they were started in, so killing by group
/// is not enough: the netns is the boundary that catches them.
pub fn kill_netns_processes(netns_path: &Path) -> io::Result<Vec<u32>> {
    let pids = pids_in_netns(netns_path)?;
    // Open the pidfds before killing, so a pid cannot be recycled between kill and wait.
    let fds: Vec<Option<OwnedFd>> = pids.iter().map(|&p| pidfd_open(p).ok()).collect();
    for &pid in &pids {
        if let Ok(p) = libc::pid_t::try_from(pid) {
            let _ = signal(p, libc::SIGKILL);
        }
    }
    for fd in fds.iter().flatten() {
        let _ = poll_readable(fd, Duration::from_secs(5));
    }
    Ok(pids)
}

/// A pidfd for any process (not only our children): readable once the process has exited.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall just returned this fd to us and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits until `fd` is readable; `Ok(false)` on timeout.
pub fn poll_readable(fd: &OwnedFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    loop {
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc >= 0 {
            return Ok(rc > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Waits at most `timeout` for process `pid` (any process, not only a child) to exit;
/// `Ok(true)` if it has (or was already gone).
pub fn wait_pid_exit(pid: u32, timeout: Duration) -> io::Result<bool> {
    match pidfd_open(pid) {
        Ok(fd) => poll_readable(&fd, timeout),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(true),
        Err(e) => Err(e),
    }
}

/// The argv of a process, or empty if it has gone (or is a kernel thread).
pub fn cmdline(pid: u32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Last `max` bytes of a log file, for printing when a test fails.
pub fn tail(path: &Path, max: usize) -> String {
    match fs::read(path) {
        Ok(b) => {
            let start = b.len().saturating_sub(max);
            let mut s = String::from_utf8_lossy(&b[start..]).into_owned();
            if start > 0 {
                s.insert_str(0, "...\n");
            }
            s
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}
