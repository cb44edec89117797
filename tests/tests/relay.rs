//! The agent's relay between real pods: bytes arrive intact in both directions on the
//! in-kernel path (`--kernel-relay on`, no bandwidth limit), the splice path (`off`, and bulk
//! connections under the default `auto`), request/response connections moved to the kernel
//! by `auto`, and the copying path (a bandwidth limit); a FIN becomes a half-close on the far
//! side, and a reset reaches the other side as a reset.
mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};

use common::{status, T};
use sockmesh_tests::*;

/// A non-repeating byte pattern (xorshift): a reordered or duplicated chunk shows up.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct Mesh {
    _cluster: Cluster,
    client: Pod,
    _server_pod: Pod,
    server: TcpServer,
    dst: SocketAddr,
    agent: Agent,
}

fn mesh(mode: ServerMode, extra: &[&str]) -> Mesh {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let client = cluster.add_pod("client").expect("pod");
    let server_pod = cluster.add_pod("server").expect("pod");
    let server = TcpServer::start_with(&server_pod, "0.0.0.0:9000".parse().expect("addr"), mode)
        .expect("server");
    let spec = pod_spec(&client, "");
    // Proxy tier: measures the proxy's relays, which a direct connection never meets.
    let mut args = vec!["--pod", spec.as_str(), "--fast-path", "off"];
    args.extend_from_slice(extra);
    let agent = Agent::start(args).expect("agent");
    agent.wait_ready().expect("ready");
    Mesh {
        dst: server_pod.addr4(9000),
        _cluster: cluster,
        client,
        _server_pod: server_pod,
        server,
        agent,
    }
}

fn big_echo(extra: &[&str]) {
    let m = mesh(ServerMode::Echo, extra);
    let mut c = tcp_connect(&m.client, m.dst, T).expect("connect through the agent");
    assert!(c.local.ip().is_loopback(), "captured by the agent");
    // Sent and echoed at the same time: both directions of the relay are busy at once.
    tcp_echo_roundtrip(&mut c.stream, &pattern(48 << 20)).expect("48 MiB echoed intact");
    m.server
        .next_accept(T)
        .expect("the server saw the connection");
    assert!(m.agent.is_running());
}

#[test]
fn large_transfers_are_intact_both_ways_on_the_kernel_path_and_leave_no_entry() {
    let m = mesh(ServerMode::Echo, &["--kernel-relay", "on"]);
    {
        let mut c = tcp_connect(&m.client, m.dst, T).expect("connect through the agent");
        assert!(c.local.ip().is_loopback(), "captured by the agent");
        tcp_echo_roundtrip(&mut c.stream, &pattern(48 << 20)).expect("48 MiB echoed intact");
        let s = status(&m.agent);
        assert_eq!(s["kernel_relay_armed"], 1, "relayed in the kernel: {s}");
        assert_eq!(s["kernel_relay_active"], 1, "{s}");
        assert_eq!(s["pipes_pooled"], 0, "no splice pipe was ever used: {s}");
    }
    // Closed by the client: the connection's entries go with it.
    let deadline = std::time::Instant::now() + T;
    loop {
        let s = status(&m.agent);
        if s["kernel_relay_active"] == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still armed: {s}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn large_transfers_are_intact_both_ways_on_the_splice_path() {
    let m = mesh(ServerMode::Echo, &["--kernel-relay", "off"]);
    let mut c = tcp_connect(&m.client, m.dst, T).expect("connect through the agent");
    tcp_echo_roundtrip(&mut c.stream, &pattern(48 << 20)).expect("48 MiB echoed intact");
    let s = status(&m.agent);
    assert!(s["kernel_relay_armed"].is_null(), "kernel relay off: {s}");
}

/// The default (`auto`): a bulk connection stays on splice, a request/response one moves to
/// the kernel after a few exchanges and goes on intact there, bulk included.
#[test]
fn auto_keeps_bulk_on_splice_and_moves_request_response_to_the_kernel() {
    let m = mesh(ServerMode::Echo, &[]);
    let mut bulk = tcp_connect(&m.client, m.dst, T).expect("connect");
    tcp_echo_roundtrip(&mut bulk.stream, &pattern(8 << 20)).expect("8 MiB echoed intact");
    let s = status(&m.agent);
    assert_eq!(s["kernel_relay_armed"], 0, "bulk stays on splice: {s}");
    assert!(
        s["pipes_pooled"].as_u64() >= Some(1),
        "it went by splice: {s}"
    );
    let mut rr = tcp_connect(&m.client, m.dst, T).expect("connect");
    for i in 0..50usize {
        tcp_echo_roundtrip(&mut rr.stream, &pattern(100 + i)).expect("exchange");
    }
    let s = status(&m.agent);
    assert_eq!(s["kernel_relay_armed"], 1, "request/response moved: {s}");
    assert_eq!(s["kernel_relay_active"], 1, "{s}");
    // Bulk after the move runs on the kernel path, intact.
    tcp_echo_roundtrip(&mut rr.stream, &pattern(4 << 20)).expect("4 MiB echoed intact");
    tcp_echo_roundtrip(&mut bulk.stream, &pattern(1000)).expect("the bulk one still works");
    assert_eq!(status(&m.agent)["kernel_relay_armed"], 1);
}

#[test]
fn large_transfers_are_intact_both_ways_on_the_shaped_copy_path() {
    // A limit far above what the test moves: the copying path, without waiting.
    big_echo(&[
        "--peer-bandwidth",
        "64GiB/s",
        "--peer-bandwidth-burst",
        "1GiB",
    ]);
}

#[test]
fn a_client_half_close_reaches_the_server_and_the_reply_still_flows_back() {
    let m = mesh(ServerMode::Echo, &[]);
    let mut c = tcp_connect(&m.client, m.dst, T).expect("connect");
    let req = pattern(1 << 20);
    c.stream.write_all(&req).expect("write");
    // The echo server shuts its write side only once it reads EOF: getting EOF here proves
    // the FIN went through the agent to the server, and the server's back.
    c.stream.shutdown(Shutdown::Write).expect("half-close");
    let mut back = Vec::new();
    c.stream
        .read_to_end(&mut back)
        .expect("read the echo, then EOF");
    assert!(back == req, "the whole echo arrived after the half-close");
}

#[test]
fn a_server_reset_reaches_the_client_as_a_reset() {
    let m = mesh(ServerMode::Reset, &[]);
    // The reset can race the client's connect() completing (socket2 then reports it from
    // SO_ERROR): either way the client must see a reset, never an EOF or data.
    let connected = tcp_connect(&m.client, m.dst, T);
    m.server
        .next_accept(T)
        .expect("server accepted, then reset");
    let err = match connected {
        Ok(mut c) => c
            .stream
            .read(&mut [0u8; 16])
            .expect_err("a reset, not an EOF or data"),
        // Reset before the harness's getpeername() ran: ENOTCONN, the same reset seen later.
        Err(e) if e.kind() == ErrorKind::NotConnected => return,
        Err(e) => e,
    };
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
}
