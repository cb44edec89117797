//! Helpers shared by the `policy_*` integration tests: what one connection attempt through
//! the agent came to, a sink peer that checksums what it receives, and the agent's resources
//! (fds, pinned map entries) to prove nothing leaks.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sockmesh_tests::{tcp_connect, Agent, Connected, Pod};

/// Generous per-step bound: reached only when something is broken.
pub const T: Duration = Duration::from_secs(5);

/// What the client saw of one connection attempt through the agent.
#[derive(Debug)]
pub enum Outcome {
    /// Proxied to the peer: an echo round trip went through.
    Admitted(Connected),
    /// Accepted by the agent, then reset (or closed) without reaching the peer.
    Reset,
    /// connect() itself failed with ECONNREFUSED: the kernel fast reject.
    KernelRefused,
}

impl Outcome {
    pub fn letter(&self) -> char {
        match self {
            Outcome::Admitted(_) => 'A',
            Outcome::Reset => 'R',
            Outcome::KernelRefused => 'K',
        }
    }

    pub fn admitted(self) -> Connected {
        match self {
            Outcome::Admitted(c) => c,
            other => panic!("expected the connection to be admitted, got {other:?}"),
        }
    }
}

/// Connects from `pod` to `dst` (an echo peer) and tells the three outcomes apart.
pub fn attempt(pod: &Pod, dst: SocketAddr) -> Outcome {
    let mut c = match tcp_connect(pod, dst, T) {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Outcome::KernelRefused,
        // Reset by the agent before getpeername() ran.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOTCONN) | Some(libc::ECONNRESET)
            ) =>
        {
            return Outcome::Reset
        }
        Err(e) => panic!("connect to {dst}: {e}"),
    };
    let mut back = [0u8; 4];
    let echoed = c
        .stream
        .write_all(b"ping")
        .and_then(|()| c.stream.read_exact(&mut back));
    match echoed {
        Ok(()) if &back == b"ping" => Outcome::Admitted(c),
        Ok(()) => panic!("echo returned {back:?}"),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
            panic!("no answer from {dst} within the I/O timeout: the attempt hung")
        }
        Err(_) => Outcome::Reset,
    }
}

/// Polls `cond` every 10 ms until it holds, failing after `timeout`. Only for conditions
/// with no event to wait on (a file count, a map's contents, an expiring verdict).
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read the agent's fd directory")
        .count()
}

/// The agent's open fds less the spare upstream sockets it keeps on purpose (a few per pod
/// and family, see the agent's `proxy::upstream`): what its connections and listeners hold.
/// The spares are asked for before and after the count, and again until both agree, so a
/// top-up made meanwhile is not mistaken for a connection.
pub fn conn_fds(agent: &Agent) -> usize {
    let pooled = || {
        agent.signal(libc::SIGUSR1).expect("SIGUSR1");
        let ev = agent.wait_event_named("status", T).expect("status event");
        ev["sockets_pooled"].as_u64().expect("sockets_pooled") as usize
    };
    loop {
        let before = pooled();
        let fds = fd_count(agent.pid());
        if pooled() == before {
            return fds.saturating_sub(before);
        }
    }
}

/// Entries of one of the agent's pinned maps, read with bpftool (as an operator would).
pub fn map_len(agent: &Agent, map: &str) -> usize {
    let path = agent.bpffs_dir().join(map);
    let out = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(&path)
        .arg("-j")
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool map dump {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    v.as_array().expect("a JSON array of entries").len()
}

/// FNV-1a: enough to prove every byte arrived, in order.
pub fn checksum(data: &[u8], mut h: u64) -> u64 {
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}
pub const CHECKSUM_SEED: u64 = 0xcbf2_9ce4_8422_2325;

/// A peer in a pod that reads each connection to EOF and answers with the byte count and
/// checksum of what it got, then closes.
pub struct Sink {
    addr: SocketAddr,
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    pub fn start(pod: &Pod, port: u16) -> Sink {
        let listener = pod
            .run(|| TcpListener::bind(("0.0.0.0", port)))
            .expect("bind the sink");
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (listener, stop) = (listener.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut workers = Vec::new();
                while let Ok((s, _)) = listener.accept() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    workers.push(std::thread::spawn(move || sink(s)));
                }
                for w in workers {
                    let _ = w.join();
                }
            })
        };
        Sink {
            addr: pod.addr4(port),
            listener,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn sink(mut s: TcpStream) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let (mut n, mut h) = (0u64, CHECKSUM_SEED);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                n += k as u64;
                h = checksum(&buf[..k], h);
            }
            Err(_) => return,
        }
    }
    let mut reply = [0u8; 16];
    reply[..8].copy_from_slice(&n.to_le_bytes());
    reply[8..].copy_from_slice(&h.to_le_bytes());
    let _ = s.write_all(&reply);
}

impl Drop for Sink {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocked accept() (see TcpServer's Drop in the harness).
        // SAFETY: valid fd owned by the Arc we hold.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `len` pseudo-random bytes on an admitted connection to a [`Sink`], half-closes,
/// and checks the sink's count and checksum. Returns how long it took, from the first
/// write to the sink's answer.
pub fn send_to_sink(c: &mut Connected, len: usize) -> Duration {
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
    let want = checksum(&data, CHECKSUM_SEED);
    c.stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    c.stream
        .set_write_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let started = Instant::now();
    c.stream.write_all(&data).expect("send to the sink");
    c.stream.shutdown(Shutdown::Write).expect("half-close");
    let mut reply = [0u8; 16];
    c.stream.read_exact(&mut reply).expect("the sink's answer");
    let took = started.elapsed();
    let n = u64::from_le_bytes(reply[..8].try_into().expect("8 bytes"));
    let h = u64::from_le_bytes(reply[8..].try_into().expect("8 bytes"));
    assert_eq!(n, len as u64, "bytes lost or added on the way");
    assert_eq!(h, want, "bytes changed on the way");
    took
}
