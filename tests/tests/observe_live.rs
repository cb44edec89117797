//! Bytes of connections still open: a long-lived connection's traffic shows in `sockmesh
//! peers` and `/metrics` while it flows (the flusher reads the relay's live counts: the pumps'
//! on splice, the verdict program's running count on the in-kernel relay), and once it closes
//! the totals are exact, with no byte counted twice.
//!
//! The first two are the proxy tier's (each connection is its peer's first, which the proxy
//! takes); the last a direct (kernel-tier) connection's, which the agent looks at from outside
//! (`inpod::live_bytes`).
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};

use common::{find_peer, peer_row, peers_until, status};
use sockmesh_tests::prom::{metric, scrape_until};
use sockmesh_tests::*;

/// A field of a peer's row, 0 while the row is missing.
fn field(peers: &serde_json::Value, peer: &str, name: &str) -> u64 {
    find_peer(peers, peer)
        .and_then(|r| r[name].as_u64())
        .unwrap_or(0)
}

#[test]
fn bytes_of_a_long_lived_connection_show_while_open_and_are_exact_after() {
    live_bytes(&[]);
}

#[test]
fn bytes_of_a_kernel_relayed_connection_show_while_open_and_are_exact_after() {
    live_bytes(&["--kernel-relay", "on"]);
}

/// The kernel tier too: a direct connection's bytes show while it is open (the agent's look
/// at the open connections, every second on a small pod) and are exact once it ends, the
/// figure never going down between the two.
#[test]
fn bytes_of_a_direct_connection_show_while_open_and_are_exact_after() {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let client = cluster.add_pod("client").expect("pod");
    let server_pod = cluster.add_pod("server").expect("pod");
    let addr: SocketAddr = server_pod.addr4(9100);
    let listener = server_pod
        .run(|| TcpListener::bind(addr))
        .expect("listen in the server pod");
    let agent = Tier::Kernel.agent(&client, &[]);
    let metrics = agent.metrics_addr().expect("metrics address");
    let pod = client.netns_path().display().to_string();
    let peer = addr.to_string();

    // The first connection is proxied and hands the peer over; one byte each way.
    let mut first = tcp_connect(&client, addr, common::T).expect("connect");
    let (mut s, _) = listener.accept().expect("accept");
    first.stream.write_all(b"1").expect("send");
    s.read_exact(&mut [0u8; 1]).expect("read");
    s.write_all(b"2").expect("answer");
    first.stream.read_exact(&mut [0u8; 1]).expect("read");
    drop((first, s));

    let mut c = tcp_connect(&client, addr, common::T).expect("connect direct");
    assert!(!c.local.ip().is_loopback(), "went direct");
    let (mut s, _) = listener.accept().expect("accept");
    s.set_read_timeout(Some(common::T)).expect("timeout");
    const N: usize = 300_000;
    c.stream.write_all(&vec![5u8; N]).expect("send");
    s.read_exact(&mut vec![0u8; N]).expect("server reads all");
    let open = scrape_until(metrics, |sm| {
        metric(sm, "sockmesh_peer_connections_active", &pod, &peer) == 1.0
            && metric(sm, "sockmesh_peer_sent_bytes_total", &pod, &peer) == (1 + N) as f64
    });
    assert_eq!(
        metric(&open, "sockmesh_peer_connections_active", &pod, &peer),
        1.0,
        "the direct connection is open"
    );
    assert_eq!(
        metric(&open, "sockmesh_peer_sent_bytes_total", &pod, &peer),
        (1 + N) as f64,
        "the direct connection's bytes while it is open"
    );

    c.stream
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    s.read_to_end(&mut Vec::new()).expect("server reads to EOF");
    drop(s);
    c.stream
        .read_to_end(&mut Vec::new())
        .expect("client sees EOF");
    drop(c);
    let done = scrape_until(metrics, |sm| {
        metric(sm, "sockmesh_peer_connections_active", &pod, &peer) == 0.0
    });
    assert_eq!(
        metric(&done, "sockmesh_peer_sent_bytes_total", &pod, &peer),
        (1 + N) as f64,
        "exact once it ended"
    );
    assert_eq!(
        metric(&done, "sockmesh_peer_received_bytes_total", &pod, &peer),
        1.0
    );
}

fn live_bytes(extra: &[&str]) {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let client = cluster.add_pod("client").expect("pod");
    let server_pod = cluster.add_pod("server").expect("pod");
    let addr: SocketAddr = server_pod.addr4(9100);
    let listener = server_pod
        .run(|| TcpListener::bind(addr))
        .expect("listen in the server pod");
    let spec = pod_spec(&client, "");
    let agent = Agent::start([&["--pod", spec.as_str()], extra].concat()).expect("agent");
    agent.wait_ready().expect("ready");
    let metrics = agent.metrics_addr().expect("metrics address");
    let pod = client.netns_path().display().to_string();
    let (filter, peer) = (["--pod", pod.as_str()], addr.to_string());

    let mut c = tcp_connect(&client, addr, common::T).expect("connect through the mesh");
    assert!(c.local.ip().is_loopback(), "went through the agent");
    let (mut s, _) = listener.accept().expect("accept");
    s.set_read_timeout(Some(common::T)).expect("timeout");

    // Up: N bytes written by the client and read by the server, the connection held open.
    const N: usize = 300_000;
    c.stream.write_all(&vec![5u8; N]).expect("send");
    s.read_exact(&mut vec![0u8; N]).expect("server reads all");
    let open = peers_until(&agent, &filter, |p| {
        field(p, &peer, "bytes_out") >= N as u64
    });
    let row = peer_row(&open, &peer);
    assert_eq!(row["conns_active"], 1, "still open: {row}");
    assert!(row["bytes_out"].as_u64() >= Some(N as u64), "{row}");
    let prom = scrape_until(metrics, |sm| {
        metric(sm, "sockmesh_peer_sent_bytes_total", &pod, &peer) >= N as f64
    });
    assert!(metric(&prom, "sockmesh_peer_sent_bytes_total", &pod, &peer) >= N as f64);
    assert_eq!(
        metric(&prom, "sockmesh_peer_connections_active", &pod, &peer),
        1.0
    );
    let kernel = extra.contains(&"on");
    let st = status(&agent);
    assert_eq!(st["kernel_relay_active"], u64::from(kernel), "{st}");

    // Down: M bytes the other way, still open.
    const M: usize = 70_001;
    s.write_all(&vec![6u8; M]).expect("answer");
    c.stream
        .read_exact(&mut vec![0u8; M])
        .expect("client reads all");
    let open = peers_until(&agent, &filter, |p| field(p, &peer, "bytes_in") >= M as u64);
    assert!(field(&open, &peer, "bytes_in") >= M as u64, "{open}");
    assert_eq!(peer_row(&open, &peer)["conns_active"], 1);

    // More up, then both close: the totals are what was sent, exactly.
    const MORE: usize = 12_345;
    c.stream.write_all(&vec![7u8; MORE]).expect("send more");
    c.stream
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("server reads to EOF");
    assert_eq!(rest.len(), MORE);
    drop(s);
    let mut tail = Vec::new();
    c.stream.read_to_end(&mut tail).expect("client sees EOF");
    let prom = scrape_until(metrics, |sm| {
        metric(sm, "sockmesh_peer_connections_active", &pod, &peer) == 0.0
    });
    let m = |name: &str| metric(&prom, name, &pod, &peer);
    assert_eq!(m("sockmesh_peer_connections_active"), 0.0);
    assert_eq!(m("sockmesh_peer_sent_bytes_total"), (N + MORE) as f64);
    assert_eq!(m("sockmesh_peer_received_bytes_total"), M as f64);
    // The scrape flushed: the CLI reads the same exact figures.
    let done = agent.read_json("peers", &filter).expect("peers");
    let row = peer_row(&done, &peer);
    assert_eq!(row["conns_active"], 0);
    assert_eq!(row["conns_total"], 1);
    assert_eq!(row["bytes_out"], (N + MORE) as u64);
    assert_eq!(row["bytes_in"], M as u64);
}
