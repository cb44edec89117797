//! Guards for processes the tests start.

use crate::sys;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

/// A started process in its own process group. Drop SIGKILLs the whole group (so helpers it
/// forked go too) and reaps it; when the test is panicking it also prints the tail of the
/// process's log file, if it has one.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    name: String,
    log: Option<PathBuf>,
}

impl Proc {
    /// Spawns `cmd` in a new process group that also dies if the test process dies (see
    /// [`sys::own_group_and_die_with_parent`]). `name` is used in messages; `log` is where the
    /// caller pointed its output, printed on failure.
    pub fn spawn(mut cmd: Command, name: &str, log: Option<PathBuf>) -> Result<Self> {
        sys::own_group_and_die_with_parent(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
        Ok(Self {
            child,
            name: name.to_owned(),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The underlying child, e.g. to take a piped stdin/stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// The process's log so far (empty if it has none).
    pub fn log(&self) -> String {
        self.log
            .as_deref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// Still running (not yet exited)?
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits at most `timeout` for exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        sys::wait_timeout(&mut self.child, timeout).with_context(|| format!("wait {}", self.name))
    }

    /// Sends `sig` to the process only (not its group).
    pub fn signal(&self, sig: libc::c_int) -> Result<()> {
        sys::signal(self.pgid(), sig).with_context(|| format!("signal {}", self.name))
    }

    /// SIGKILLs the process group and reaps the leader.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        // The group id is the leader's pid; it cannot be reused while the leader is unreaped or
        // any member is alive, so signalling it cannot hit an unrelated process.
        sys::signal(-self.pgid(), libc::SIGKILL)
            .with_context(|| format!("kill group of {}", self.name))?;
        self.child
            .wait()
            .with_context(|| format!("reap {}", self.name))
    }

    fn pgid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("[smt] warning: {e:#}");
        }
        if std::thread::panicking() {
            if let Some(log) = &self.log {
                eprintln!(
                    "----- [smt] log of {} ({}) -----\n{}\n----- end of log -----",
                    self.name,
                    log.display(),
                    sys::tail(log, 16 * 1024)
                );
            }
        }
    }
}
