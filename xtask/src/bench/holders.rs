//! The scale step's processes (`hold`): servers in the server pod and clients in a client
//! pod, pair by pair, each under an open-file limit of at most [`HOLDER_NOFILE`] (less if this
//! process's hard limit is lower) and holding that many connections less a margin. The bench drives the clients in batches and never lets them get more
//! than [`WINDOW`] connections ahead of the servers' accepts (a proxy's listen backlog that
//! overflows stalls connects on SYN resends). Dropping [`Holders`] closes their stdin, which
//! ends them and every connection they hold.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::{ChildStdin, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sockmesh_tests::Pod;

use super::hold;
use crate::util::{bail_if_interrupted, ChildGuard};

/// A holder's open-file limit: well under what a container usually gets.
pub const HOLDER_NOFILE: u64 = 32_768;
/// Of a holder's open files, those not for connections (stdio, listeners, the runtime's).
const HOLDER_SPARE: u64 = 256;

/// The open-file limit of each holder: [`HOLDER_NOFILE`], or this process's hard limit if
/// lower (the holders inherit it, and only CAP_SYS_RESOURCE could raise it).
pub fn holder_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a plain syscall with a valid struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    HOLDER_NOFILE.min(lim.rlim_max)
}
/// Server ports per server holder (each reached over IPv4 and IPv6): 8 destinations per
/// client, so no (source, destination) pair needs more than a few thousand ephemeral ports.
const PORTS_PER_SERVER: u16 = 4;
const FIRST_PORT: u16 = 20000;
const BATCH: usize = 256;
const WINDOW: usize = 512;

struct Holder {
    guard: ChildGuard,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Holder {
    fn spawn(pod: &Pod, name: &str, args: &[String]) -> Result<Holder> {
        let exe = std::env::current_exe().context("this program's path")?;
        let mut cmd = pod.command(&exe.to_string_lossy());
        cmd.arg("bench-hold")
            .arg("--nofile")
            .arg(holder_nofile().to_string())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut guard = ChildGuard::spawn(name, &mut cmd)?;
        let stdin = guard.child.stdin.take();
        let stdout = guard.child.stdout.take().context("the holder's stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut h = Holder {
            guard,
            stdin,
            lines,
        };
        h.expect(hold::READY, Duration::from_secs(30))?;
        Ok(h)
    }

    fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("holder already stopped")?;
        writeln!(stdin, "{line}").with_context(|| format!("tell {} `{line}`", self.guard.name))
    }

    /// The next line starting with `prefix` (the rest of it); an `error` line fails.
    fn expect(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let line = self.lines.recv_timeout(timeout).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => {
                anyhow::anyhow!("{} said nothing in {timeout:?}", self.guard.name)
            }
            mpsc::RecvTimeoutError::Disconnected => {
                anyhow::anyhow!("{} exited (see its output above)", self.guard.name)
            }
        })?;
        if let Some(e) = line.strip_prefix(hold::ERROR) {
            bail!("{}: {e}", self.guard.name);
        }
        match line.strip_prefix(prefix) {
            Some(rest) => Ok(rest.to_string()),
            None => bail!("{} said `{line}`, expected `{prefix}...`", self.guard.name),
        }
    }
}

/// The pairs of server and client processes of one scale step.
pub struct Holders {
    clients: Vec<Holder>,
    /// Connections each client is to open, in the order of `clients`.
    shares: Vec<usize>,
    /// Accepts of all servers together, kept current by a thread per server.
    accepted: Arc<AtomicUsize>,
    /// Declared after the clients: dropped (stopped) after them.
    _servers: Vec<ChildGuard>,
    pub targets: Vec<SocketAddr>,
}

impl Holders {
    /// Enough pairs for `n` connections from `client` to `server` (at `v4` and `v6`).
    pub fn start(server: &Pod, client: &Pod, v4: IpAddr, v6: IpAddr, n: usize) -> Result<Self> {
        let per_process = holder_nofile().saturating_sub(HOLDER_SPARE).max(1) as usize;
        let procs = n.div_ceil(per_process).max(1);
        let accepted = Arc::new(AtomicUsize::new(0));
        let mut servers = Vec::new();
        let mut clients = Vec::new();
        let mut all_targets = Vec::new();
        for i in 0..procs {
            let first = FIRST_PORT + i as u16 * PORTS_PER_SERVER;
            let ports: Vec<u16> = (first..first + PORTS_PER_SERVER).collect();
            let list = ports
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(",");
            let mut s = Holder::spawn(
                server,
                &format!("scale server {i}"),
                &["--serve".into(), list],
            )?;
            let lines = std::mem::replace(&mut s.lines, mpsc::channel().1);
            let counted = accepted.clone();
            // Each server's running total, summed: the last value seen per server.
            std::thread::spawn(move || {
                let mut mine = 0usize;
                for l in lines {
                    if let Some(Ok(total)) = l.strip_prefix(hold::ACCEPTED).map(str::parse::<usize>)
                    {
                        counted.fetch_add(total.saturating_sub(mine), Ordering::SeqCst);
                        mine = total;
                    }
                }
            });
            // The server's stdin stays open in its guard's Child until the guard drops.
            s.guard.child.stdin = s.stdin.take();
            servers.push(s.guard);
            let targets: Vec<SocketAddr> = ports
                .iter()
                .flat_map(|&p| [SocketAddr::new(v4, p), SocketAddr::new(v6, p)])
                .collect();
            let list = targets
                .iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(",");
            clients.push(Holder::spawn(
                client,
                &format!("scale client {i}"),
                &["--connect".into(), list],
            )?);
            all_targets.extend(targets);
        }
        let shares = (0..procs)
            .map(|i| n / procs + usize::from(i < n % procs))
            .collect();
        Ok(Holders {
            clients,
            shares,
            accepted,
            _servers: servers,
            targets: all_targets,
        })
    }

    pub fn processes(&self) -> usize {
        self.clients.len() * 2
    }

    /// One connection from each client to each of its targets, held until [`Self::cool`];
    /// returns once the servers accepted them.
    pub fn warm(&mut self) -> Result<()> {
        for c in &mut self.clients {
            c.send("warm")?;
        }
        for c in &mut self.clients {
            c.expect(hold::WARMED, Duration::from_secs(60))?;
        }
        self.wait_accepted(self.targets.len())
    }

    /// Closes the warm-up connections.
    pub fn cool(&mut self) -> Result<()> {
        for c in &mut self.clients {
            c.send("cool")?;
        }
        for c in &mut self.clients {
            c.expect(hold::COOLED, Duration::from_secs(60))?;
        }
        Ok(())
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Opens every client's share, in batches, and returns once the servers accepted as many
    /// more connections as were opened (`base`: accepts before, e.g. of warm-up connections).
    pub fn open_all(&mut self, base: usize) -> Result<usize> {
        let mut opened = vec![0usize; self.clients.len()];
        loop {
            bail_if_interrupted()?;
            let mut asked = Vec::new();
            for (i, c) in self.clients.iter_mut().enumerate() {
                let k = BATCH.min(self.shares[i] - opened[i]);
                if k > 0 {
                    c.send(&format!("open {k}"))?;
                    asked.push(i);
                }
            }
            if asked.is_empty() {
                break;
            }
            for i in asked {
                let total = self.clients[i].expect(hold::OPENED, Duration::from_secs(120))?;
                opened[i] = total.parse().context("a client's running total")?;
            }
            let sum: usize = opened.iter().sum();
            self.wait_accepted(base + sum.saturating_sub(WINDOW))?;
        }
        let sum = opened.iter().sum();
        self.wait_accepted(base + sum)?;
        Ok(sum)
    }

    /// Waits until the servers accepted `at_least` (their lines come on other threads: a
    /// bench-only bounded wait).
    fn wait_accepted(&self, at_least: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.accepted() < at_least {
            if Instant::now() > deadline {
                bail!(
                    "the servers accepted only {} connections in 30 s (waiting for {at_least})",
                    self.accepted()
                );
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        Ok(())
    }

    /// Ends the clients (then, on drop, the servers): every connection closes.
    pub fn close(mut self) {
        for c in &mut self.clients {
            c.stdin = None;
        }
        for c in &mut self.clients {
            let _ = crate::util::wait_timeout(&mut c.guard.child, Duration::from_secs(30));
        }
    }
}
