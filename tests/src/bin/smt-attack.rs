//! A hostile pod's workloads for the fair-share tests (`tests/tests/shares.rs`), run inside a
//! pod by `ip netns exec` so each attacking process has its own open-file limit (20,000 on
//! the CI machines). Prints one JSON line with what it did, then (for `hold`) keeps its
//! sockets until stdin closes.
//!
//! ```text
//! smt-attack hold DST N          connect N TCP sockets to DST and hold them
//! smt-attack dns DST SECS        send DNS queries to DST as fast as the socket takes them
//! smt-attack binds PORT N SECS   bind/listen/close wildcard sockets on PORT..PORT+N in a loop
//! smt-attack peers THREADS SPEC  connect once to every peer of SPEC (`IP:FIRST-LAST`, `;`
//!                                separated), waiting for each to end (refused or reset)
//! ```
use std::io::{ErrorKind, Read};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use socket2::{Domain, Socket, Type};

fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out pointer; then a valid in pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Result<T> {
    args.get(i)
        .with_context(|| format!("missing {what}"))?
        .parse()
        .map_err(|_| anyhow::anyhow!("bad {what}: {:?}", args[i]))
}

fn main() -> Result<()> {
    raise_nofile();
    let args: Vec<String> = std::env::args().collect();
    let out = match args.get(1).map(String::as_str) {
        Some("hold") => hold(arg(&args, 2, "DST")?, arg(&args, 3, "N")?)?,
        Some("dns") => dns(arg(&args, 2, "DST")?, arg(&args, 3, "SECS")?)?,
        Some("binds") => binds(
            arg(&args, 2, "PORT")?,
            arg(&args, 3, "N")?,
            arg(&args, 4, "SECS")?,
        )?,
        Some("peers") => peers(arg(&args, 2, "THREADS")?, &args[3..])?,
        Some("socks") => socks(
            &args[2],
            arg(&args, 3, "DST")?,
            arg(&args, 4, "N")?,
            arg(&args, 5, "FIRST_PORT")?,
        )?,
        _ => bail!("usage: smt-attack hold|dns|binds|peers|socks ..."),
    };
    println!("{out}");
    Ok(())
}

/// Connects `n` sockets (2 s each) and holds every one that connected until stdin closes;
/// then reports how many are still alive, and how many the other end closed or reset.
fn hold(dst: SocketAddr, n: usize) -> Result<serde_json::Value> {
    let mut held = Vec::with_capacity(n);
    let (mut failed, mut first_error) = (0u64, None);
    for _ in 0..n {
        match TcpStream::connect_timeout(&dst, Duration::from_secs(2)) {
            Ok(s) => held.push(s),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    let v = serde_json::json!({
        "connected": held.len(), "failed": failed, "first_error": first_error,
    });
    println!("{v}");
    // Held until the test closes our stdin (or kills us).
    let _ = std::io::stdin().read(&mut [0u8; 1]);
    // What became of them: nothing was ever sent, so a live connection has nothing to read
    // (WouldBlock); one the other end closed reads EOF, one it reset fails.
    let (mut alive, mut closed, mut reset) = (0u64, 0u64, 0u64);
    for s in &held {
        let _ = s.set_nonblocking(true);
        match s.peek(&mut [0u8; 1]) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => alive += 1,
            Ok(0) => closed += 1,
            Ok(_) => alive += 1,
            Err(_) => reset += 1,
        }
    }
    drop(held);
    Ok(serde_json::json!({ "released": true, "alive": alive, "closed": closed, "reset": reset }))
}

/// Makes `n` sockets of `kind` and holds them until stdin closes: `tcp`, each a non-blocking
/// connect() to `dst` (each one the programs remember, redirected to the agent); `udp`, each
/// bound to the next port from `first_port` (autobind would scan a nearly full ephemeral
/// range of 28k ports for each one) and one DNS query sent to `dst` (each one a DNS origin
/// the kernel keeps until the socket closes); `bind`, each a TCP socket bound to the wildcard
/// address of `dst`'s family and the next port from `first_port` (each one a captured port).
/// Reports how many were made, and how many connect()/sendto()/bind() calls failed, by error
/// (EPERM: the pod's quota).
fn socks(kind: &str, dst: SocketAddr, n: usize, first_port: u16) -> Result<serde_json::Value> {
    let any = if dst.is_ipv4() {
        IpAddr::from([0u8; 4])
    } else {
        IpAddr::from([0u16; 8])
    };
    let domain = Domain::for_address(dst);
    let mut held = Vec::with_capacity(n);
    let (mut ok, mut eperm, mut other, mut first_error) = (0u64, 0u64, 0u64, None);
    for i in 0..n {
        let r = match kind {
            "tcp" => {
                let s = Socket::new(domain, Type::STREAM, None)?;
                s.set_nonblocking(true)?;
                let r = match s.connect(&dst.into()) {
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(()),
                    r => r,
                };
                held.push(s);
                r
            }
            "udp" => {
                let s = Socket::new(domain, Type::DGRAM, None)?;
                let port = first_port
                    .checked_add(i as u16)
                    .context("socks: FIRST_PORT + N is past 65535")?;
                if dst.is_ipv6() {
                    // Not dual-stack: the IPv4 processes bind the same port numbers.
                    s.set_only_v6(true)?;
                }
                let r = s
                    .bind(&SocketAddr::new(any, port).into())
                    .and_then(|()| s.send_to(&query(i as u16), &dst.into()).map(|_| ()));
                held.push(s);
                r
            }
            "bind" => {
                let s = Socket::new(domain, Type::STREAM, None)?;
                let port = first_port
                    .checked_add(i as u16)
                    .context("socks: FIRST_PORT + N is past 65535")?;
                let r = s.bind(&SocketAddr::new(any, port).into());
                held.push(s);
                r
            }
            _ => bail!("socks: tcp, udp or bind, not {kind:?}"),
        };
        match r {
            Ok(()) => ok += 1,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => eperm += 1,
            Err(e) => {
                other += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    let v = serde_json::json!({
        "made": held.len(), "ok": ok, "eperm": eperm, "other": other, "first_error": first_error,
    });
    println!("{v}");
    let _ = std::io::stdin().read(&mut [0u8; 1]);
    drop(held);
    Ok(serde_json::json!({ "released": true }))
}

/// A minimal recursive A query with id `id`.
fn query(id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend_from_slice(b"\x05flood\x04test\x00\x00\x01\x00\x01");
    q
}

/// Sends queries to `dst` for `secs` from a few sockets, as fast as they take them, reading
/// whatever answers come back.
fn dns(dst: SocketAddr, secs: u64) -> Result<serde_json::Value> {
    let bind: SocketAddr = if dst.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socks: Vec<UdpSocket> = (0..4)
        .map(|_| -> Result<UdpSocket> {
            let s = UdpSocket::bind(bind)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect::<Result<_>>()?;
    let (mut sent, mut answered, mut blocked) = (0u64, 0u64, 0u64);
    let until = Instant::now() + Duration::from_secs(secs);
    let mut buf = [0u8; 512];
    while Instant::now() < until {
        for s in &socks {
            for _ in 0..64 {
                match s.send_to(&query(sent as u16), dst) {
                    Ok(_) => sent += 1,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        blocked += 1;
                        break;
                    }
                    Err(_) => break,
                }
            }
            while s.recv_from(&mut buf).is_ok() {
                answered += 1;
            }
        }
    }
    Ok(serde_json::json!({ "sent": sent, "answered": answered, "blocked": blocked }))
}

/// bind/listen/close on wildcard ports `first..first+n`, round robin, for `secs`.
fn binds(first: u16, n: u16, secs: u64) -> Result<serde_json::Value> {
    let until = Instant::now() + Duration::from_secs(secs);
    let (mut done, mut failed) = (0u64, 0u64);
    let mut i = 0u16;
    while Instant::now() < until {
        let port = first + i % n.max(1);
        i = i.wrapping_add(1);
        let r = (|| -> std::io::Result<()> {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
            s.listen(1)
        })();
        match r {
            Ok(()) => done += 1,
            Err(_) => failed += 1,
        }
    }
    Ok(serde_json::json!({ "binds": done, "failed": failed }))
}

/// Every (ip, port) of `specs` (`IP:FIRST-LAST`), connected to once from `threads` threads:
/// connect, then wait (up to 5 s) for the connection to end, as a refused upstream makes it.
fn peers(threads: usize, specs: &[String]) -> Result<serde_json::Value> {
    let mut all: Vec<SocketAddr> = Vec::new();
    for spec in specs.iter().flat_map(|s| s.split(';')) {
        let (ip, ports) = spec.rsplit_once(':').context("IP:FIRST-LAST")?;
        let ip: IpAddr = ip.trim_matches(['[', ']']).parse()?;
        let (lo, hi) = ports.split_once('-').context("FIRST-LAST")?;
        let (lo, hi): (u16, u16) = (lo.parse()?, hi.parse()?);
        all.extend((lo..=hi).map(|p| SocketAddr::new(ip, p)));
    }
    let next = AtomicUsize::new(0);
    let (ended, connect_failed, hung) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let start = Instant::now();
    std::thread::scope(|sc| {
        for _ in 0..threads.max(1) {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(dst) = all.get(i) else { break };
                match TcpStream::connect_timeout(dst, Duration::from_secs(5)) {
                    Ok(mut s) => {
                        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                        match s.read(&mut [0u8; 1]) {
                            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                                hung.fetch_add(1, Ordering::Relaxed)
                            }
                            _ => ended.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                    Err(_) => {
                        connect_failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    Ok(serde_json::json!({
        "peers": all.len(), "ended": ended.into_inner(), "connect_failed": connect_failed.into_inner(),
        "hung": hung.into_inner(), "secs": start.elapsed().as_secs_f64(),
    }))
}
