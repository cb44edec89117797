//! Soak: many connections through the mesh between two enrolled pods (client outbound proxy,
//! then the server pod's inbound proxy), with random sizes, half-closes, client resets and
//! server resets. Every echoed connection must get back exactly the bytes it sent; at the end
//! the agent's fds and tasks are back to where they were and its RSS has not grown with the
//! connection count.
//!
//! Bounded in count and time. CI runs the short form (SOCKMESH_SOAK_CONNS, default 1500);
//! `cargo xtask soak` runs the full one (>= 10k). SOCKMESH_SOAK_SEED replays a run.
mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{counter, T};
use sockmesh_tests::*;

const WORKERS: usize = 8;
const ECHO_PORT: u16 = 8080;
const RESET_PORT: u16 = 8081;
/// RSS may grow by this much after the warm-up (allocator arenas, tokio's slabs); a leak of
/// even 1 KiB per connection over 10k connections exceeds it.
const RSS_SLACK_KIB: u64 = 12 * 1024;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift64*: deterministic per seed, so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Mostly small, sometimes large: 0 B to 1 MiB.
fn size(rng: &mut Rng) -> usize {
    match rng.below(100) {
        0..=49 => rng.below(1024) as usize,
        50..=89 => rng.below(64 * 1024) as usize,
        _ => rng.below(1024 * 1024) as usize,
    }
}

/// The server pod's apps: an echo server that passes the client's half-close back, and one
/// that resets every connection at once. Threads end when the listeners are shut down.
fn serve(pod: &Pod) -> Vec<Arc<TcpListener>> {
    let mut out = Vec::new();
    for (port, reset) in [(ECHO_PORT, false), (RESET_PORT, true)] {
        let l = Arc::new(
            pod.run(|| TcpListener::bind(("0.0.0.0", port)))
                .expect("bind in the server pod"),
        );
        let listener = l.clone();
        std::thread::spawn(move || {
            while let Ok((mut s, _)) = listener.accept() {
                if reset {
                    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                    continue;
                }
                std::thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(T));
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s.shutdown(Shutdown::Write);
                });
            }
        });
        out.push(l);
    }
    out
}

#[derive(Default)]
struct Tally {
    echoed: AtomicUsize,
    client_resets: AtomicUsize,
    server_resets: AtomicUsize,
    bytes: AtomicU64,
    failures: std::sync::Mutex<Vec<String>>,
}

/// One connection from inside the client pod; failures are recorded, not panicked, so the
/// summary shows them all.
fn one(rng: &mut Rng, server: &Pod, tally: &Tally) {
    let kind = rng.below(100);
    let port = if kind >= 85 { RESET_PORT } else { ECHO_PORT };
    let dst = server.addr4(port);
    let fail = |what: String| tally.failures.lock().expect("lock").push(what);
    let mut s = match TcpStream::connect_timeout(&dst, T) {
        Ok(s) => s,
        // The relayed reset can arrive before connect() has looked at the socket's error.
        Err(e) if port == RESET_PORT && e.kind() == ErrorKind::ConnectionReset => {
            tally.server_resets.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Err(e) => return fail(format!("connect {dst}: {e}")),
    };
    let _ = s.set_read_timeout(Some(T));
    let _ = s.set_write_timeout(Some(T));
    let data: Vec<u8> = (0..size(rng)).map(|_| rng.next() as u8).collect();
    match kind {
        0..=69 => {
            // Write from a second thread while reading: large payloads exceed the buffers.
            let mut w = match s.try_clone() {
                Ok(w) => w,
                Err(e) => return fail(format!("clone: {e}")),
            };
            let mut back = Vec::with_capacity(data.len());
            let (wrote, read) = std::thread::scope(|sc| {
                let h = sc.spawn(|| w.write_all(&data).and_then(|_| w.shutdown(Shutdown::Write)));
                let read = s.read_to_end(&mut back);
                (h.join().expect("writer"), read)
            });
            match (wrote, read) {
                (Ok(()), Ok(_)) if back == data => {
                    tally.echoed.fetch_add(1, Ordering::Relaxed);
                    tally.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                (Ok(()), Ok(_)) => fail(format!(
                    "echo mismatch: sent {} bytes, got {} back",
                    data.len(),
                    back.len()
                )),
                (w, r) => fail(format!(
                    "echo of {} bytes: write {w:?}, read {r:?}",
                    data.len()
                )),
            }
        }
        70..=84 => {
            // Abort mid-transfer: the agent must reset upstream and forget the connection.
            let _ = s.write_all(&data[..data.len() / 2]);
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            drop(s);
            tally.client_resets.fetch_add(1, Ordering::Relaxed);
        }
        _ => {
            // The server resets: the client must see it end, reset or closed, not hang.
            let mut buf = [0u8; 16];
            match s.read(&mut buf) {
                Ok(0) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
                other => return fail(format!("server reset came through as {other:?}")),
            }
            tally.server_resets.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// (fds, tasks, RSS in KiB) of the agent. The fds leave out the splice pipes the agent keeps
/// pooled for reuse (two each, bounded) and its spare upstream sockets (bounded): those are
/// held on purpose, and a pipe or socket still in use at the end would show up as a leak.
fn usage(agent: &Agent) -> (usize, u64, u64) {
    let pid = agent.pid();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .count();
    agent.signal(libc::SIGUSR1).expect("SIGUSR1");
    let ev = agent.wait_event_named("status", T).expect("status event");
    let pooled = ev["pipes_pooled"].as_u64().expect("pipes_pooled") as usize;
    let spare = ev["sockets_pooled"].as_u64().expect("sockets_pooled") as usize;
    let fds = fds - 2 * pooled - spare;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    (fds, ev["tasks"].as_u64().expect("tasks"), rss)
}

/// Runs `count` connections over the workers; returns how long it took.
fn push(count: usize, seed: u64, client: &Pod, server: &Pod, tally: &Arc<Tally>) -> Duration {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    std::thread::scope(|sc| {
        for w in 0..WORKERS {
            let (next, tally) = (next.clone(), tally.clone());
            sc.spawn(move || {
                client.run(|| {
                    let mut rng = Rng(seed ^ (w as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                    while next.fetch_add(1, Ordering::Relaxed) < count {
                        one(&mut rng, server, &tally);
                    }
                })
            });
        }
    });
    start.elapsed()
}

#[test]
fn soak_connections_through_the_mesh_keep_bytes_and_leak_nothing() {
    require_root();
    let count = env_u64("SOCKMESH_SOAK_CONNS", 1500) as usize;
    let limit = Duration::from_secs(env_u64("SOCKMESH_SOAK_SECS", 90));
    let seed = env_u64("SOCKMESH_SOAK_SEED", 0x5eed_50a4);
    let cluster = Cluster::new().expect("cluster");
    let client = cluster.add_pod("client").expect("pod");
    let server = cluster.add_pod("server").expect("pod");
    let agent = Agent::start([
        "--pod",
        &pod_spec(&client, ""),
        "--pod",
        &pod_spec(&server, ""),
        // A server that resets everything would (rightly) open its breaker and have the kernel
        // refuse it: this test is about the datapath, so the policy stays out of the way.
        "--breaker-failures",
        "off",
        "--adaptive-k",
        "off",
        // Proxy tier: soaks the proxy's relays and counts the agent's fds and tasks.
        "--fast-path",
        "off",
    ])
    .expect("agent");
    agent.wait_ready().expect("ready");
    let listeners = serve(&server);
    for _ in 0..2 {
        agent
            .wait_event_named("inbound_listening", T)
            .expect("inbound capture of the server pod");
    }

    // Warm-up, so the baseline includes the allocator's and runtime's steady state.
    let tally = Arc::new(Tally::default());
    push(200, seed ^ 1, &client, &server, &tally);
    let settle = |want: Option<(usize, u64)>| -> (usize, u64, u64) {
        // Connections end asynchronously after the client saw them end: wait for fds and
        // tasks to come back down (no event for that; bounded).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let u = usage(&agent);
            match want {
                Some((fds, tasks)) if (u.0 > fds || u.1 > tasks) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                _ => return u,
            }
        }
    };
    std::thread::sleep(Duration::from_millis(500));
    let base = settle(None);
    let base = settle(Some((base.0, base.1)));
    let redirected_before = counter(&agent, &client, "redirect_tcp");

    let tally = Arc::new(Tally::default());
    let took = push(count, seed, &client, &server, &tally);
    let end = settle(Some((base.0, base.1)));
    let failures = tally.failures.lock().expect("lock").clone();
    eprintln!(
        "[soak] {count} connections in {took:?} ({:.0}/s, seed {seed:#x}): {} echoed ({} MiB), \
         {} client resets, {} server resets, {} failures; agent fds {} -> {}, tasks {} -> {}, \
         RSS {} -> {} KiB",
        count as f64 / took.as_secs_f64(),
        tally.echoed.load(Ordering::Relaxed),
        tally.bytes.load(Ordering::Relaxed) >> 20,
        tally.client_resets.load(Ordering::Relaxed),
        tally.server_resets.load(Ordering::Relaxed),
        failures.len(),
        base.0,
        end.0,
        base.1,
        end.1,
        base.2,
        end.2
    );
    assert!(
        failures.is_empty(),
        "{} of {count} connections failed, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        took <= limit,
        "{count} connections took {took:?}, over {limit:?}"
    );
    let done = tally.echoed.load(Ordering::Relaxed)
        + tally.client_resets.load(Ordering::Relaxed)
        + tally.server_resets.load(Ordering::Relaxed);
    assert_eq!(done, count, "every connection accounted for");
    assert_eq!(
        counter(&agent, &client, "redirect_tcp") - redirected_before,
        count as u64,
        "every connection went through the mesh"
    );
    assert_eq!(end.0, base.0, "agent fds back to the baseline");
    assert_eq!(end.1, base.1, "agent tasks back to the baseline");
    assert!(
        end.2 <= base.2 + RSS_SLACK_KIB,
        "agent RSS grew from {} to {} KiB",
        base.2,
        end.2
    );
    assert!(agent.is_running());
    for l in listeners {
        // SAFETY: shutting down a listener we own wakes its accept loop, which then ends.
        unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&*l), libc::SHUT_RDWR) };
    }
}
