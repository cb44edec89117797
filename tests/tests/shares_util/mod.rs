//! Helpers of the fair-share tests (`shares.rs`): a hostile pod's workload as a process of its
//! own (`smt-attack`, so each has its own open-file limit), the victim's probes timed one by
//! one, and the agent's per-pod refusal counters.
#![allow(dead_code)]

mod cast;
// Not every test file that includes these helpers uses the cast.
#[allow(unused_imports)]
pub use cast::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::process::{ChildStdin, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde_json::Value;
use sockmesh_tests::{tcp_connect, tcp_echo_roundtrip, udp_connected, Agent, Pod, Proc};

pub const T: Duration = Duration::from_secs(5);

/// The bound every victim probe must stay under, at the 99th percentile.
pub const P99_BOUND: Duration = Duration::from_millis(100);

/// `smt-attack <args>` running in `pod`: its first JSON line, and its stdin (closing it ends
/// a `hold`). Killed with its process group on drop.
pub struct Attack {
    pub proc: Proc,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<Value>,
}

impl Attack {
    pub fn start(pod: &Pod, args: &[&str]) -> Attack {
        let mut cmd = pod.command(env!("CARGO_BIN_EXE_smt-attack"));
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut proc =
            Proc::spawn(cmd, &format!("{}:smt-attack", pod.label()), None).expect("spawn");
        let stdin = proc.child_mut().stdin.take();
        let stdout = proc.child_mut().stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str(&line).unwrap_or(Value::String(line));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Attack { proc, stdin, lines }
    }

    /// The next line it prints, within `timeout`.
    pub fn report(&self, timeout: Duration) -> Value {
        self.lines
            .recv_timeout(timeout)
            .unwrap_or_else(|e| panic!("{}: no report within {timeout:?}: {e}", self.proc.name()))
    }

    /// Closes its stdin: a `hold` lets its sockets go and exits.
    pub fn release(&mut self) {
        self.stdin.take();
    }
}

/// Times of one probe series, and what failed.
#[derive(Debug, Default)]
pub struct Probes {
    pub times: Vec<Duration>,
    pub failures: Vec<String>,
}

impl Probes {
    /// Nearest-rank quantile.
    pub fn quantile(&self, q: f64) -> Duration {
        let mut t = self.times.clone();
        t.sort_unstable();
        if t.is_empty() {
            return Duration::MAX;
        }
        t[((q * t.len() as f64).ceil() as usize).clamp(1, t.len()) - 1]
    }

    pub fn p99(&self) -> Duration {
        self.quantile(0.99)
    }

    pub fn summary(&self) -> String {
        format!(
            "{} ok, {} failed, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.times.len(),
            self.failures.len(),
            self.quantile(0.5).as_secs_f64() * 1e3,
            self.p99().as_secs_f64() * 1e3,
            self.quantile(1.0).as_secs_f64() * 1e3
        )
    }
}

/// `n` connections from `pod` to `dst` (an echo server), one after the other, each timed from
/// connect() to the end of its first echo round trip: what an app waits before its first
/// answer, which covers the agent's accept, admission and upstream connect.
pub fn connect_probes(pod: &Pod, dst: SocketAddr, n: usize) -> Probes {
    probes(pod, dst, n, true)
}

/// [`connect_probes`] from a pod that is not enrolled, to an enrolled pod's app (inbound).
pub fn inbound_probes(client: &Pod, dst: SocketAddr, n: usize) -> Probes {
    probes(client, dst, n, false)
}

fn probes(pod: &Pod, dst: SocketAddr, n: usize, outbound: bool) -> Probes {
    let mut p = Probes::default();
    for i in 0..n {
        let start = Instant::now();
        let r = tcp_connect(pod, dst, T)
            .map_err(|e| format!("connect: {e}"))
            .and_then(|mut c| {
                tcp_echo_roundtrip(&mut c.stream, format!("probe {i}").as_bytes())
                    .map_err(|e| format!("echo: {e:#}"))?;
                Ok(!outbound || c.local.ip().is_loopback())
            });
        match r {
            Ok(true) => p.times.push(start.elapsed()),
            Ok(false) => p.failures.push(format!("probe {i}: not proxied")),
            Err(e) => p.failures.push(format!("probe {i}: {e}")),
        }
    }
    p
}

/// A minimal A query for `name` with id `id`.
pub fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// `n` DNS queries from `pod` to `server`, one after the other, each timed until its answer
/// (a response with the same id and NOERROR).
pub fn dns_probes(pod: &Pod, server: SocketAddr, n: usize) -> Probes {
    let mut p = Probes::default();
    for i in 0..n {
        let id = 0x7000 + i as u16;
        let start = Instant::now();
        match udp_connected(pod, server, &dns_query(id, "victim.test"), T) {
            Ok(r)
                if r.data.len() >= 4 && r.data[..2] == id.to_be_bytes() && r.data[3] & 0xf == 0 =>
            {
                p.times.push(start.elapsed())
            }
            Ok(r) => p.failures.push(format!(
                "query {i}: bad answer {:?}",
                &r.data[..r.data.len().min(4)]
            )),
            Err(e) => p.failures.push(format!("query {i}: {e}")),
        }
    }
    p
}

/// A DNS server in `pod` on `addr` that answers every query at once (QR set, NOERROR, no
/// records); ends when the returned flag is set and a datagram arrives (or with the pod).
pub fn dns_responder(pod: &Pod, addr: SocketAddr) -> Arc<AtomicBool> {
    let sock = pod
        .run(|| UdpSocket::bind(addr))
        .expect("bind dns responder");
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while !stop2.load(Ordering::Relaxed) {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                break;
            };
            if n >= 12 {
                buf[2] |= 0x80;
                buf[3] = 0x80;
                let _ = sock.send_to(&buf[..n], from);
            }
        }
    });
    stop
}

/// A listener in `pod` on `addr` that never accepts: the kernel completes up to `backlog`
/// handshakes for it, which is all a held connection needs.
pub fn never_accepting(pod: &Pod, addr: SocketAddr, backlog: i32) -> TcpListener {
    pod.run(|| -> std::io::Result<TcpListener> {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )?;
        s.set_reuse_address(true)?;
        s.bind(&addr.into())?;
        s.listen(backlog)?;
        Ok(s.into())
    })
    .expect("listen")
}

/// A pod's refusal counters from `sockmesh pods --json` (all zero if it has no row).
pub fn refused(agent: &Agent, pod: &Pod) -> Value {
    let cookie = pod.netns_cookie().expect("cookie");
    let pods = agent.read_json("pods", &[]).expect("sockmesh pods --json");
    pods["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .find(|p| p["netns_cookie"].as_u64() == Some(cookie))
        .map(|p| p["refused"].clone())
        .unwrap_or(Value::Null)
}

pub fn refused_total(v: &Value) -> u64 {
    v.as_object()
        .map(|o| o.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0)
}

/// Reads a pod's refusals until `done` holds or 10 s pass (the agent flushes them about once a
/// second; no event says when), then returns the last read.
pub fn refused_until(agent: &Agent, pod: &Pod, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = refused(agent, pod);
        if done(&v) || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The agent's status event (SIGUSR1).
pub fn status(agent: &Agent) -> Value {
    agent.signal(libc::SIGUSR1).expect("SIGUSR1");
    agent.wait_event_named("status", T).expect("status event")
}

/// Open fds of the agent.
pub fn fds(agent: &Agent) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", agent.pid()))
        .expect("fds")
        .count()
}

/// The `n` lowest descriptor numbers the agent has free. `RLIMIT_NOFILE` bounds descriptor
/// *numbers*, not how many are open: a process whose table has holes (closed descriptors
/// below its highest open one) gets new descriptors in them even with its limit below its
/// open count. A soft limit at the k-th of these leaves it exactly k.
pub fn free_fds(agent: &Agent, n: usize) -> Vec<u64> {
    let open: std::collections::BTreeSet<u64> =
        std::fs::read_dir(format!("/proc/{}/fd", agent.pid()))
            .expect("fds")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
    (0..).filter(|fd| !open.contains(fd)).take(n).collect()
}

/// CPU time (user + system) the agent has used so far.
pub fn cpu_time(agent: &Agent) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", agent.pid())).expect("stat");
    // Fields after the ")" of the command: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz.max(1))
}

/// Prints the victim's baseline and its figures under attack side by side, and checks the
/// issue's bar: every probe succeeded and the p99 stayed under [`P99_BOUND`].
pub fn report_and_check(what: &str, quiet: &Probes, attacked: &Probes) {
    eprintln!("[shares] {what}: quiet baseline: {}", quiet.summary());
    eprintln!("[shares] {what}: under attack:   {}", attacked.summary());
    assert!(
        quiet.failures.is_empty(),
        "{what} baseline: {:?}",
        quiet.failures
    );
    assert!(
        attacked.failures.is_empty(),
        "{what} under attack: {} failed, first: {:?}",
        attacked.failures.len(),
        &attacked.failures[..attacked.failures.len().min(5)]
    );
    assert!(
        attacked.p99() < P99_BOUND,
        "{what}: victim p99 {:?} under attack (baseline {:?})",
        attacked.p99(),
        quiet.p99()
    );
}

/// Drains whatever `r` has, for a slow client that must keep its socket readable.
pub fn drain(r: &mut impl Read) {
    let _ = r.read(&mut [0u8; 4096]);
}

/// Writes `bytes` ignoring errors (a hostile client does not care).
pub fn send(w: &mut impl Write, bytes: &[u8]) {
    let _ = w.write_all(bytes);
}
