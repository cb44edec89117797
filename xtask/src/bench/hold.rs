//! `cargo xtask bench-hold`: one process of the scale step, run in a pod's namespace by the
//! bench (`holders`), holding its share of the idle connections under an open-file limit of
//! its own, so no process needs one as large as the whole step. A server listens on its ports
//! and accepts; a client connects when told. Both speak lines on stdin/stdout and exit, closing
//! everything they hold, when stdin closes (so a bench that dies leaves nothing open).
//!
//! Protocol (one line each way per step): both print `ready` once set up. A server then prints
//! `accepted N` (its running total) whenever it accepted more. A client answers `warm` (one
//! connection to each target, held) with `warmed`, `open K` (K more connections, round robin
//! over its targets, held) with `opened N` (its running total), and `cool` (close the warm-up
//! connections) with `cooled`. A failure is `error MESSAGE`, after which it exits.

use std::io::{BufRead, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use socket2::{Domain, Socket, Type};

pub const READY: &str = "ready";
pub const ACCEPTED: &str = "accepted ";
pub const OPENED: &str = "opened ";
pub const WARMED: &str = "warmed";
pub const COOLED: &str = "cooled";
pub const ERROR: &str = "error ";
/// A connect() that takes longer than this failed (a SYN lost to a full backlog is resent
/// after 1 s, 3 s, ...: a few resends, not a hang).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// What one holder does.
pub enum Role {
    /// Listen on these ports (IPv4 and IPv6) and accept until stdin closes.
    Serve(Vec<u16>),
    /// Connect to these targets when told.
    Connect(Vec<SocketAddr>),
}

/// The holder's main: sets its own open-file limit to `nofile`, then plays `role`.
pub fn run(role: Role, nofile: u64) -> Result<()> {
    let r = set_nofile(nofile).and_then(|()| match role {
        Role::Serve(ports) => serve(&ports),
        Role::Connect(targets) => connect(&targets),
    });
    if let Err(e) = &r {
        say(&format!("{ERROR}{e:#}"));
    }
    r
}

/// The soft limit only: the hard one stays as inherited (lowering it could not be undone).
fn set_nofile(nofile: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with a valid struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("read RLIMIT_NOFILE");
    }
    if nofile > lim.rlim_max {
        bail!(
            "an open-file limit of {nofile} is above this process's hard limit ({})",
            lim.rlim_max
        );
    }
    lim.rlim_cur = nofile;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("set RLIMIT_NOFILE to {nofile}"));
    }
    Ok(())
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn serve(ports: &[u16]) -> Result<()> {
    let listeners = ports
        .iter()
        .map(|&p| {
            let s = Socket::new(Domain::IPV6, Type::STREAM, None)?;
            s.set_only_v6(false)?;
            s.set_reuse_address(true)?;
            s.bind(&SocketAddr::from(([0u16; 8], p)).into())?;
            s.listen(8192)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect::<std::io::Result<Vec<Socket>>>()
        .with_context(|| format!("listen on {ports:?}"))?;
    say(READY);
    // stdin last: its end (POLLHUP or a read of 0) is the signal to go.
    let mut fds: Vec<libc::pollfd> = listeners
        .iter()
        .map(|l| l.as_raw_fd())
        .chain([libc::STDIN_FILENO])
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut held = Vec::new();
    loop {
        // SAFETY: a valid array of pollfds on fds this process owns.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("poll");
        }
        let before = held.len();
        for l in &listeners {
            while let Ok((s, _)) = l.accept() {
                held.push(s);
            }
        }
        if held.len() != before {
            say(&format!("{ACCEPTED}{}", held.len()));
        }
        if fds.last().is_some_and(|p| p.revents != 0) {
            return Ok(());
        }
        fds.iter_mut().for_each(|p| p.revents = 0);
    }
}

fn connect(targets: &[SocketAddr]) -> Result<()> {
    if targets.is_empty() {
        bail!("no targets");
    }
    say(READY);
    let mut held: Vec<TcpStream> = Vec::new();
    // Held until told: a proxied connection hands its peer to the kernel tier only once the
    // agent's upstream connect succeeded, which one closed at once may not live to see.
    let mut warm: Vec<TcpStream> = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line.context("read a command")?;
        if line == "warm" {
            for t in targets {
                warm.push(
                    TcpStream::connect_timeout(t, CONNECT_TIMEOUT)
                        .with_context(|| format!("warm-up connection to {t}"))?,
                );
            }
            say(WARMED);
        } else if line == "cool" {
            warm.clear();
            say(COOLED);
        } else if let Some(k) = line.strip_prefix("open ") {
            let k: usize = k.parse().with_context(|| format!("bad command `{line}`"))?;
            for _ in 0..k {
                let t = targets[held.len() % targets.len()];
                let s = TcpStream::connect_timeout(&t, CONNECT_TIMEOUT).with_context(|| {
                    format!("connection {} (to {t}) of this holder", held.len() + 1)
                })?;
                held.push(s);
            }
            say(&format!("{OPENED}{}", held.len()));
        } else {
            bail!("unknown command `{line}`");
        }
    }
    Ok(())
}

/// `--serve` ports or `--connect` targets, comma-separated, as the bench passes them.
pub fn parse_role(serve: Option<&str>, connect: Option<&str>) -> Result<Role> {
    match (serve, connect) {
        (Some(p), None) => Ok(Role::Serve(
            p.split(',')
                .map(|x| x.parse().with_context(|| format!("bad port `{x}`")))
                .collect::<Result<_>>()?,
        )),
        (None, Some(t)) => Ok(Role::Connect(
            t.split(',')
                .map(|x| x.parse().with_context(|| format!("bad target `{x}`")))
                .collect::<Result<_>>()?,
        )),
        _ => bail!("bench-hold takes exactly one of --serve PORTS and --connect TARGETS"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_role() {
        assert!(matches!(parse_role(Some("1,2"), None), Ok(Role::Serve(p)) if p == [1, 2]));
        match parse_role(None, Some("10.0.0.1:80,[fd00::1]:81")) {
            Ok(Role::Connect(t)) => assert_eq!(t[1].to_string(), "[fd00::1]:81"),
            _ => panic!("a client's targets"),
        }
        assert!(parse_role(None, None).is_err());
        assert!(parse_role(Some("1"), Some("10.0.0.1:80")).is_err());
        assert!(parse_role(Some("x"), None).is_err());
    }
}
