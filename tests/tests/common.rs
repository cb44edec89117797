//! Shared by the integration tests (each test file is its own crate and includes this).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use sockmesh_tests::{tcp_connect, tcp_echo_roundtrip, Agent, Cluster, Pod, TcpServer};

pub const T: Duration = Duration::from_secs(5);

/// One kernel counter of one pod from `sockmesh stats --json` (0 if the pod has no row).
pub fn counter(agent: &Agent, pod: &Pod, name: &str) -> u64 {
    let cookie = pod.netns_cookie().expect("netns cookie");
    let stats = agent.stats().expect("sockmesh stats");
    stats["pods"]
        .as_array()
        .expect("pods array")
        .iter()
        .find(|p| p["netns_cookie"].as_u64() == Some(cookie))
        .map(|p| p["counters"][name].as_u64().expect("counter is a number"))
        .unwrap_or(0)
}

pub fn has_row(stats: &Value, pod: &Pod) -> bool {
    let cookie = pod.netns_cookie().expect("netns cookie");
    stats["pods"]
        .as_array()
        .expect("pods array")
        .iter()
        .any(|p| p["netns_cookie"].as_u64() == Some(cookie))
}

/// Port of the echo server [`client_and_echo_server`] starts.
pub const ECHO_PORT: u16 = 8080;

/// A cluster with a client pod and a server pod whose echo server listens on
/// `0.0.0.0:`[`ECHO_PORT`]: the usual cast of a test through the mesh.
pub fn client_and_echo_server() -> (Cluster, Pod, Pod, TcpServer) {
    sockmesh_tests::require_root();
    let cluster = Cluster::new().expect("cluster");
    let client = cluster.add_pod("client").expect("pod");
    let server_pod = cluster.add_pod("server").expect("pod");
    let bind = std::net::SocketAddr::from(([0, 0, 0, 0], ECHO_PORT));
    let server = TcpServer::start(&server_pod, bind).expect("echo server");
    (cluster, client, server_pod, server)
}

/// Connects from `client` to `dst` (an echo server) and says whether the connection went
/// through the agent: the app's own end is then the pod's loopback, the agent's listener.
pub fn redirected(client: &Pod, dst: std::net::SocketAddr) -> bool {
    let mut c = tcp_connect(client, dst, T).expect("connect");
    tcp_echo_roundtrip(&mut c.stream, b"ping").expect("echo");
    c.local.ip().is_loopback()
}

/// connect()s from `pod` (its name in `sockmesh peers`) to `dst` the kernel either redirected
/// to the agent or, on the kernel tier, policed and let go direct: every connection the mesh
/// saw, whichever tier. Read from the kernel's own counters, so no flush is waited for.
pub fn meshed(agent: &Agent, pod: &str, dst: SocketAddr) -> u64 {
    let peers = agent.read_json("peers", &[]).expect("sockmesh peers");
    peers["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["pod"] == pod && r["peer"] == dst.to_string().as_str())
        .map(|r| r["redirects"].as_u64().unwrap_or(0) + r["direct"].as_u64().unwrap_or(0))
        .sum()
}

/// The row of `peer` (as printed, `ip:port`) in `sockmesh peers --json`, if any.
pub fn find_peer<'a>(peers: &'a Value, peer: &str) -> Option<&'a Value> {
    peers["peers"]
        .as_array()
        .expect("peers array")
        .iter()
        .find(|r| r["peer"] == peer)
}

/// The row of `peer` in `sockmesh peers --json`; panics if there is none.
pub fn peer_row<'a>(peers: &'a Value, peer: &str) -> &'a Value {
    find_peer(peers, peer).unwrap_or_else(|| panic!("no row for {peer} in {peers}"))
}

/// Reads `sockmesh peers --json` (with `extra` filters) until `done` holds for it or 20 s
/// pass, then returns the last read: the agent flushes its figures to the maps about once a
/// second, and no event tells a test when.
pub fn peers_until(agent: &Agent, extra: &[&str], done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let v = agent
            .read_json("peers", extra)
            .expect("sockmesh peers --json");
        if done(&v) || std::time::Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the loop saw, attempt by attempt.
#[derive(Debug, Default)]
pub struct Tally {
    pub captured: usize,
    pub direct: usize,
    /// Every attempt that did not end in a full echo round trip, with what went wrong.
    pub failures: Vec<String>,
}

/// One connection: connect, one echo round trip, and whether it went through an agent (the
/// app's own end is then the pod's loopback, the agent's listener).
fn attempt(client: &Pod, dst: SocketAddr, i: usize) -> Result<bool, String> {
    let mut c = tcp_connect(client, dst, T).map_err(|e| format!("connect: {e}"))?;
    tcp_echo_roundtrip(&mut c.stream, format!("attempt {i}").as_bytes())
        .map_err(|e| format!("echo: {e:#}"))?;
    Ok(c.local.ip().is_loopback())
}

/// Connects in a loop until `stop`, reporting each attempt on `seen` so the test can wait for
/// progress instead of sleeping.
pub fn client_loop(
    client: &Pod,
    dst: SocketAddr,
    stop: &AtomicBool,
    seen: mpsc::Sender<bool>,
) -> Tally {
    let mut t = Tally::default();
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let captured = match attempt(client, dst, i) {
            Ok(true) => {
                t.captured += 1;
                true
            }
            Ok(false) => {
                t.direct += 1;
                false
            }
            Err(e) => {
                t.failures.push(format!("attempt {i}: {e}"));
                false
            }
        };
        let _ = seen.send(captured);
        i += 1;
    }
    t
}

/// Ends a [`client_loop`] when dropped, so a failing test never hangs its thread scope.
pub struct StopOnDrop<'a>(pub &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Which agent registered the socket with this cookie as its own (its pid, from
/// `SM_AGENT_SOCKS` under `agent`'s pin directory), if any did.
pub fn agent_socket_owner(agent: &Agent, cookie: u64) -> Option<u32> {
    let path = agent.bpffs_dir().join("SM_AGENT_SOCKS");
    let map = sockmesh_tests::bpfmap::PinnedMap::open(&path, 8, 8).expect("SM_AGENT_SOCKS");
    map.get(&cookie.to_ne_bytes())
        .expect("lookup")
        .map(|v| u32::from_ne_bytes([v[0], v[1], v[2], v[3]]))
}

/// The agent's status event (SIGUSR1): live tasks, pipes, kernel relay counters.
pub fn status(agent: &Agent) -> Value {
    agent.signal(libc::SIGUSR1).expect("SIGUSR1");
    agent.wait_event_named("status", T).expect("status event")
}
