//! Many concurrent idle proxied connections: the client pod opens N connections to the server
//! pod (half IPv4, half IPv6, over several server ports, so no 4-tuple space runs out), each
//! captured and proxied by the agent; the server pod accepts and holds them. Reports the time
//! to establish them all, the agent's RSS and fds per connection, and that the fds go back
//! once the connections close (nothing leaked).

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use socket2::{Domain, Socket, Type};
use sockmesh_tests::netns::enter;
use sockmesh_tests::Pod;

use super::plan::Variant;
use super::topo::{Topology, SERVER_V4, SERVER_V6};
use crate::util::bail_if_interrupted;

const PORTS: u16 = 4;
const FIRST_PORT: u16 = 20000;
/// Connections the client may be ahead of the server's accepts: keeps the agent's listen
/// backlog (1024) from overflowing, which would stall connects on SYN retransmits.
const WINDOW: usize = 512;

pub struct ScaleResult {
    pub conns: usize,
    pub establish_secs: f64,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub fds_before: usize,
    pub fds_after: usize,
    pub fds_after_close: usize,
}

impl ScaleResult {
    pub fn rss_per_conn_bytes(&self) -> f64 {
        (self.rss_after_kib.saturating_sub(self.rss_before_kib) * 1024) as f64 / self.conns as f64
    }

    pub fn to_json(&self) -> Value {
        json!({
            "connections": self.conns,
            "establish_seconds": self.establish_secs,
            "connections_per_second": self.conns as f64 / self.establish_secs,
            "agent_rss_before_kib": self.rss_before_kib,
            "agent_rss_after_kib": self.rss_after_kib,
            "agent_rss_per_connection_bytes": self.rss_per_conn_bytes(),
            "agent_fds_before": self.fds_before,
            "agent_fds_with_connections": self.fds_after,
            "agent_fds_after_close": self.fds_after_close,
        })
    }
}

/// Through the proxy tier (`sockmesh-proxy`'s agent, `--fast-path off`): what the agent holds
/// per proxied connection. (`sockmesh` runs the fast path, whose connections after the first
/// to a peer do not pass through the agent at all.)
pub fn idle_connections(topo: &Topology, n: usize) -> Result<ScaleResult> {
    let pid = topo
        .proxy_pid(Variant::SockmeshProxy)
        .context("the proxy tier's agent")?;
    let accepted = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let server = spawn_server(&topo.server, accepted.clone(), stop.clone())?;
    let result = (|| {
        // Connections of the workloads before may still be closing (a half-closed one waits
        // for its server): let the agent's fd count settle, so it is a baseline.
        let settle = Instant::now() + Duration::from_secs(15);
        let mut fds_before = fds(pid)?;
        while Instant::now() < settle {
            std::thread::sleep(Duration::from_millis(300));
            let now = fds(pid)?;
            if now == fds_before {
                break;
            }
            fds_before = now;
        }
        let rss_before_kib = rss_kib(pid)?;
        let client = topo.client(Variant::SockmeshProxy);
        let start = Instant::now();
        let conns = open_clients(client, n, accepted.clone())?;
        let establish_secs = start.elapsed().as_secs_f64();
        let (rss_after_kib, fds_after) = (rss_kib(pid)?, fds(pid)?);
        if fds_after < fds_before + 2 * n {
            bail!(
                "the agent holds {fds_after} fds with {n} connections open (from {fds_before}): \
                 the connections did not all go through it"
            );
        }
        drop(conns);
        Ok(ScaleResult {
            conns: n,
            establish_secs,
            rss_before_kib,
            rss_after_kib,
            fds_before,
            fds_after,
            fds_after_close: 0,
        })
    })();
    stop.store(true, Ordering::SeqCst);
    let _ = server.join();
    let mut r = result?;
    // The agent closes its sides once it sees both ends go: no event to wait on from here.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        r.fds_after_close = fds(pid)?;
        if r.fds_after_close <= r.fds_before + 8 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(r)
}

/// Accepts on every port until `stop`, holding the sockets; counts them in `accepted`.
fn spawn_server(
    ns: &Pod,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<Result<()>>> {
    let path = ns.netns_path().to_owned();
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || -> Result<()> {
        let listeners = (|| {
            enter(&path)?;
            (0..PORTS)
                .map(|i| {
                    let s = Socket::new(Domain::IPV6, Type::STREAM, None)?;
                    s.set_only_v6(false)?;
                    s.set_reuse_address(true)?;
                    s.bind(&SocketAddr::from(([0u16; 8], FIRST_PORT + i)).into())?;
                    s.listen(8192)?;
                    s.set_nonblocking(true)?;
                    Ok(s)
                })
                .collect::<std::io::Result<Vec<Socket>>>()
                .context("server listeners")
        })();
        let listeners = match listeners {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = tx.send(Err(format!("{e:#}")));
                return Err(e);
            }
        };
        let mut held = Vec::new();
        let mut fds: Vec<libc::pollfd> = listeners
            .iter()
            .map(|l| libc::pollfd {
                fd: l.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        while !stop.load(Ordering::SeqCst) {
            // SAFETY: a valid array of pollfds for the listeners this thread owns.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
            for l in &listeners {
                while let Ok((s, _)) = l.accept() {
                    held.push(s);
                    accepted.fetch_add(1, Ordering::SeqCst);
                }
            }
            fds.iter_mut().for_each(|p| p.revents = 0);
        }
        Ok(())
    });
    match rx.recv() {
        Ok(Ok(())) => Ok(h),
        Ok(Err(e)) => bail!("scale server: {e}"),
        Err(_) => bail!("scale server thread ended early"),
    }
}

/// Opens `n` connections from `pod`, never more than WINDOW ahead of the server's accepts,
/// and returns them once the server has accepted all.
fn open_clients(pod: &Pod, n: usize, accepted: Arc<AtomicUsize>) -> Result<Vec<TcpStream>> {
    let path = pod.netns_path().to_owned();
    std::thread::spawn(move || -> Result<Vec<TcpStream>> {
        enter(&path)?;
        let v4: std::net::IpAddr = SERVER_V4.parse()?;
        let v6: std::net::IpAddr = SERVER_V6.parse()?;
        let mut conns = Vec::with_capacity(n);
        for i in 0..n {
            let ip = if i % 2 == 0 { v4 } else { v6 };
            let port = FIRST_PORT + ((i / 2) % PORTS as usize) as u16;
            let dst = SocketAddr::new(ip, port);
            let s = TcpStream::connect(dst)
                .with_context(|| format!("connection {i} of {n} to {dst}"))?;
            conns.push(s);
            if i % 1024 == 0 {
                bail_if_interrupted()?;
            }
            wait_for(&accepted, (i + 1).saturating_sub(WINDOW))?;
        }
        wait_for(&accepted, n)?;
        Ok(conns)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("scale client thread panicked"))?
}

/// Waits until `count` reaches `at_least` (another thread's accept loop has no event to
/// hand over here; a bench-only bounded wait).
fn wait_for(count: &AtomicUsize, at_least: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while count.load(Ordering::SeqCst) < at_least {
        if Instant::now() > deadline {
            bail!(
                "the server accepted only {} connections in 30 s (waiting for {at_least})",
                count.load(Ordering::SeqCst)
            );
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("read the agent's /proc status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS in the agent's /proc status")
}

fn fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .context("list the agent's fds")?
        .count())
}

/// Raises this process's open-file limit as far as it may (the agent and the clients started
/// from here inherit it) and returns it. Past the hard limit needs CAP_SYS_RESOURCE; without
/// it the soft limit still goes up to the hard one.
pub fn raise_nofile() -> Result<u64> {
    let max: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let mut lim = libc::rlimit {
        rlim_cur: max,
        rlim_max: max,
    };
    // SAFETY: plain syscalls with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        return Ok(max);
    }
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("read RLIMIT_NOFILE");
    }
    lim.rlim_cur = lim.rlim_max;
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("raise RLIMIT_NOFILE");
    }
    Ok(lim.rlim_max)
}

/// How many proxied connections `nofile` allows: the agent holds two sockets per connection
/// (idle connections stay on splice under the default `--kernel-relay auto`, so no epoll of
/// closes), this process two (the client and the server end), plus a margin for the rest.
pub fn max_conns(nofile: u64) -> usize {
    (nofile.saturating_sub(512) / 2) as usize
}
