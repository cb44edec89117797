//! Which TCP sockets are listening in a pod, read from the kernel's /proc/net tables of the
//! pod's namespace, and which are established, with their cookies (`ss`). Checking this way
//! never connects to the application, so it cannot disturb servers that count connections,
//! nor be redirected by the agent's programs.

use crate::pod::Pod;
use anyhow::{bail, Context, Result};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

const TCP_LISTEN: &str = "0A";

/// Parses a /proc/net/tcp or /proc/net/tcp6 table and returns the local addresses of sockets in
/// LISTEN state.
pub fn parse_listening(table: &str) -> Vec<SocketAddr> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let local = f.nth(1)?;
            let state = f.nth(1)?;
            if state != TCP_LISTEN {
                return None;
            }
            parse_hex_addr(local)
        })
        .collect()
}

/// `0100007F:0050` or a 32-hex-digit IPv6 address plus port. The kernel prints each 32-bit word
/// of the (network-order) address as a host-order integer, hence `to_ne_bytes`.
fn parse_hex_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// TCP listeners currently open in `pod` (IPv4 and IPv6 tables).
pub fn tcp_listeners(pod: &Pod) -> Result<Vec<SocketAddr>> {
    pod.run(|| -> Result<Vec<SocketAddr>> {
        let mut all = Vec::new();
        for t in ["tcp", "tcp6"] {
            // thread-self: /proc/self/net would show the namespace of the process's main
            // thread, not of this thread that entered the pod.
            let path = format!("/proc/thread-self/net/{t}");
            let table = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
            all.extend(parse_listening(&table));
        }
        Ok(all)
    })
}

/// Whether a listener bound at `listener` accepts connections for `want`: same port, and the
/// same address or either side a wildcard (a wildcard listener serves every address; a test
/// asking for `0.0.0.0:P` means "anything listening on port P", e.g. after the agent's bind
/// hook moved it to 127.0.0.1:P).
pub fn listener_matches(listener: SocketAddr, want: SocketAddr) -> bool {
    listener.port() == want.port()
        && (want.ip().is_unspecified()
            || listener.ip().is_unspecified()
            || listener.ip() == want.ip())
}

/// Waits until something in `pod` listens on `addr` (see [`listener_matches`]) and returns the
/// listener's actual address. A daemon's listen() emits no event we can wait on, so this
/// re-reads the tables every 10 ms within `timeout`.
pub fn wait_tcp_listening(pod: &Pod, addr: SocketAddr, timeout: Duration) -> Result<SocketAddr> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = tcp_listeners(pod)?;
        if let Some(l) = now.iter().find(|l| listener_matches(**l, addr)) {
            return Ok(*l);
        }
        if Instant::now() >= deadline {
            bail!(
                "nothing listening on {addr} in pod {} after {timeout:?} (listening: {now:?})",
                pod.label()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0A004D0A:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0
   2: 0A004D0A:C350 0B004D0A:0050 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:3A99 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1 0000000000000000 100 0 0 10 0
   1: 000077FD000000000000000010000000:01BB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5 1 0000000000000000 100 0 0 10 0
";

    #[test]
    #[cfg(target_endian = "little")]
    fn parses_kernel_tables() {
        assert_eq!(
            parse_listening(TCP),
            vec![
                "127.0.0.1:15001".parse().unwrap(),
                "10.77.0.10:80".parse().unwrap()
            ]
        );
        assert_eq!(
            parse_listening(TCP6),
            vec![
                "[::1]:15001".parse().unwrap(),
                "[fd77::10]:443".parse().unwrap()
            ]
        );
    }

    #[test]
    fn matching() {
        let l = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(listener_matches(l("0.0.0.0:80"), l("10.77.0.10:80")));
        assert!(listener_matches(l("127.0.0.1:80"), l("0.0.0.0:80")));
        assert!(listener_matches(l("[::]:80"), l("[fd77::10]:80")));
        assert!(!listener_matches(l("127.0.0.1:80"), l("10.77.0.10:80")));
        assert!(!listener_matches(l("0.0.0.0:81"), l("0.0.0.0:80")));
    }

    #[test]
    fn real_table_has_a_real_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let table = std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap();
        assert!(parse_listening(&table).contains(&l.local_addr().unwrap()));
    }
}

/// An established TCP socket as `ss -tne` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Established {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// The socket cookie (`sk:`, printed in hex): what `bpf_get_socket_cookie` and
    /// `SO_COOKIE` return, the key of the agent's `SM_AGENT_SOCKS`.
    pub cookie: u64,
}

/// Every established TCP socket in `pod`, whoever owns it (the app's or the agent's).
pub fn established(pod: &Pod) -> Result<Vec<Established>> {
    let out = pod.exec(&["ss", "-tneH", "state", "established"])?;
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let parse = || -> Option<Established> {
                let cookie = f.iter().find_map(|w| w.strip_prefix("sk:"))?;
                Some(Established {
                    local: f.get(2)?.parse().ok()?,
                    peer: f.get(3)?.parse().ok()?,
                    cookie: u64::from_str_radix(cookie, 16).ok()?,
                })
            };
            parse().with_context(|| format!("unexpected ss line {l:?}"))
        })
        .collect()
}
