//! Security: the agent's in-pod listeners serve only their own pod, an inbound connection
//! only reaches its own pod's app, the agent is not an open relay, and it runs with no more
//! capabilities than it needs.
//!
//! Tier: the default (`--fast-path auto`); every outbound connection here is its peer's
//! first, which the proxy takes.
mod common;

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::time::Duration;

use common::{counter, T};
use sockmesh_tests::*;

/// A port free on the host right now, for listener ports the test can also probe on the host
/// without meeting anything of another test's.
fn free_port() -> u16 {
    let tcp = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = tcp.local_addr().expect("addr").port();
    // Free for UDP too, so one number serves both listeners.
    UdpSocket::bind(("127.0.0.1", port)).map_or_else(|_| free_port(), |_| port)
}

/// A recursive A query for `name`.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// `payload` sent to `dst` from `pod` gets no answer (refused, or nothing within a second).
fn udp_unanswered(pod: &Pod, dst: SocketAddr, payload: &[u8]) {
    match udp_connected(pod, dst, payload, Duration::from_secs(1)) {
        Ok(r) => panic!("{dst} answered {} bytes from {}", r.data.len(), r.from),
        Err(e) => assert!(
            matches!(
                e.kind(),
                ErrorKind::ConnectionRefused | ErrorKind::WouldBlock | ErrorKind::TimedOut
            ),
            "{dst}: {e}"
        ),
    }
}

#[test]
fn outbound_and_dns_listeners_are_reachable_only_from_inside_their_pod() {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let pod = cluster.add_pod("meshed").expect("pod");
    let other = cluster.add_pod("other").expect("pod");
    let port = free_port();
    let p = port.to_string();
    let agent = Agent::start([
        "--pod",
        &pod_spec(&pod, ""),
        "--outbound-port",
        &p,
        "--dns-port",
        &p,
    ])
    .expect("agent");
    agent.wait_ready().expect("ready");

    // Inside the pod: on loopback only, nothing on the pod's address or a wildcard.
    let mine: Vec<SocketAddr> = tcp_listeners(&pod)
        .expect("listeners")
        .into_iter()
        .filter(|l| l.port() == port)
        .collect();
    assert!(!mine.is_empty(), "the outbound listener is in the pod");
    assert!(
        mine.iter().all(|l| l.ip().is_loopback()),
        "outbound listener bound beyond loopback: {mine:?}"
    );

    // Another pod cannot reach either listener over the pod network.
    for dst in [pod.addr4(port), pod.addr6(port)] {
        let e = tcp_connect(&other, dst, T).expect_err("outbound listener reachable");
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{dst}: {e}");
        udp_unanswered(&other, dst, &dns_query(7, "x.test"));
    }
    // The host's own loopback has nothing of the agent's.
    let loopback: SocketAddr = ([127, 0, 0, 1], port).into();
    let e = std::net::TcpStream::connect_timeout(&loopback, T).expect_err("host reaches it");
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused);
    let host_udp = UdpSocket::bind("127.0.0.1:0").expect("bind");
    host_udp.connect(loopback).expect("connect");
    host_udp
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    host_udp.send(&dns_query(9, "x.test")).expect("send");
    let mut buf = [0u8; 512];
    assert!(
        host_udp.recv(&mut buf).is_err(),
        "the host got a DNS answer"
    );
    assert_eq!(
        counter(&agent, &pod, "redirect_tcp"),
        0,
        "nothing was captured"
    );
}

#[test]
fn an_inbound_listener_forwards_only_to_its_own_pods_app() {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let a = cluster.add_pod("a").expect("pod");
    let b = cluster.add_pod("b").expect("pod");
    let client = cluster.add_pod("client").expect("pod");
    let agent =
        Agent::start(["--pod", &pod_spec(&a, ""), "--pod", &pod_spec(&b, "")]).expect("agent");
    agent.wait_ready().expect("ready");
    // The same port in both pods: each inbound listener must pick its own pod's app.
    let bind: SocketAddr = "0.0.0.0:8080".parse().expect("addr");
    let app_a = TcpServer::start(&a, bind).expect("app a");
    agent
        .wait_event_named("inbound_listening", T)
        .expect("a listened");
    let app_b = TcpServer::start(&b, bind).expect("app b");
    agent
        .wait_event_named("inbound_listening", T)
        .expect("b listened");

    for (target, app, bystander) in [(&a, &app_a, &app_b), (&b, &app_b, &app_a)] {
        let mut c = tcp_connect(&client, target.addr4(8080), T).expect("connect");
        tcp_echo_roundtrip(&mut c.stream, target.label().as_bytes()).expect("echo");
        let acc = app.next_accept(T).expect("the target pod's app accepted");
        assert_eq!(unmap(acc.peer).ip(), client.ip4(), "app sees the client");
        assert!(
            bystander.drain_accepted().is_empty(),
            "the other pod's app got a connection meant for {}",
            target.label()
        );
    }
    // The agent holds nothing on a pod's address: its inbound listener is on each pod's
    // loopback (the kernel hands it the connections), so no other pod can reach it directly.
    for pod in [&a, &b] {
        let listeners = tcp_listeners(pod).expect("listeners");
        assert!(
            listeners.contains(&"127.0.0.1:15006".parse().expect("addr")),
            "{listeners:?}"
        );
        assert!(
            listeners
                .iter()
                .all(|l| l.ip().is_loopback() || l.ip().is_unspecified()),
            "a listener on a pod address: {listeners:?}"
        );
        let err = tcp_connect(&client, pod.addr4(15006), T).expect_err("not reachable");
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    }
}

#[test]
fn the_agent_is_not_an_open_relay() {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let pod = cluster.add_pod("meshed").expect("pod");
    let bystander = cluster.add_pod("bystander").expect("pod");
    let watcher =
        TcpServer::start(&bystander, "0.0.0.0:15001".parse().expect("addr")).expect("server");
    let dns_watcher =
        UdpEchoServer::start(&bystander, "0.0.0.0:53".parse().expect("addr")).expect("udp");
    let agent = Agent::start(["--pod", &pod_spec(&pod, "")]).expect("agent");
    agent.wait_ready().expect("ready");

    // Straight to the listener (a loopback destination is never captured, so the kernel holds
    // no origin for it): the agent has nowhere legitimate to send it, and resets it. The same
    // for the inbound listener: a connection the kernel did not steer there has no app port.
    for listener in [
        "127.0.0.1:15001",
        "[::1]:15001",
        "127.0.0.1:15006",
        "[::1]:15006",
    ] {
        let dst: SocketAddr = listener.parse().expect("addr");
        let end = pod.run(|| -> std::io::Result<usize> {
            let mut s = std::net::TcpStream::connect_timeout(&dst, T)?;
            s.set_read_timeout(Some(T))?;
            s.read(&mut [0u8; 16])
        });
        match end {
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => {
                panic!("{listener}: a connection without an origin must be reset, got {other:?}")
            }
        }
    }
    assert_eq!(
        counter(&agent, &pod, "origin_miss"),
        2,
        "asked for an origin, found none (the outbound listener asks, the inbound one need not)"
    );

    // A captured connection to the pod's own address on the listener port is not looped back
    // into the agent: upstream nothing listens there, so the client is reset.
    match tcp_connect(&pod, pod.addr4(15001), T) {
        // The reset can beat the harness's getpeername() after connect, which then reports
        // ENOTCONN: the same reset, seen a step later.
        Err(e) => assert!(
            matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::NotConnected
            ),
            "{e}"
        ),
        Ok(mut c) => assert!(
            c.stream.read(&mut [0u8; 16]).is_err(),
            "a loop through the agent was served"
        ),
    }

    // DNS sent straight to the DNS listener has no origin: SERVFAIL, not forwarded anywhere.
    let r = udp_connected(
        &pod,
        "127.0.0.1:15053".parse().expect("addr"),
        &dns_query(0x4242, "relay.test"),
        T,
    )
    .expect("an answer");
    assert_eq!(&r.data[..2], &[0x42, 0x42], "same id");
    assert_eq!(r.data[3] & 0x0f, 2, "SERVFAIL");

    assert!(watcher.drain_accepted().is_empty(), "something was relayed");
    assert!(
        dns_watcher
            .next_datagram(Duration::from_millis(200))
            .is_err(),
        "a DNS query was relayed"
    );
}

/// The capability sets of every thread of the agent, by `/proc/PID/task/TID/status` field.
fn thread_caps(pid: u32, field: &str) -> Vec<u64> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let status =
            std::fs::read_to_string(task.expect("task").path().join("status")).expect("status");
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .unwrap_or_else(|| panic!("no {field}"));
        out.push(u64::from_str_radix(hex.trim(), 16).expect("hex"));
    }
    out
}

/// Started as root with every capability, the agent keeps only what it documents it needs.
#[test]
fn the_agent_keeps_only_the_capabilities_it_needs() {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let pod = cluster.add_pod("meshed").expect("pod");
    let agent = Agent::start(["--pod", &pod_spec(&pod, "")]).expect("agent");
    agent.wait_ready().expect("ready");
    // CAP_NET_BIND_SERVICE 10, CAP_NET_ADMIN 12, CAP_SYS_PTRACE 19, CAP_SYS_ADMIN 21,
    // CAP_PERFMON 38, CAP_BPF 39 (agent/src/caps.rs says why each).
    let keep: u64 = [10, 12, 19, 21, 38, 39].iter().map(|b| 1u64 << b).sum();
    let pid = agent.pid();
    for field in ["CapEff:", "CapPrm:", "CapBnd:"] {
        let caps = thread_caps(pid, field);
        assert!(
            caps.len() > 2,
            "the runtime and pod threads are checked too"
        );
        for c in caps {
            assert_eq!(c, keep, "{field} {c:#x}, want {keep:#x}");
        }
    }
    for field in ["CapInh:", "CapAmb:"] {
        assert!(thread_caps(pid, field).iter().all(|&c| c == 0), "{field}");
    }
    // And it still does its job with them: a captured connection works.
    let server_pod = cluster.add_pod("server").expect("pod");
    let _server =
        TcpServer::start(&server_pod, "0.0.0.0:8080".parse().expect("addr")).expect("server");
    let mut c = tcp_connect(&pod, server_pod.addr4(8080), T).expect("connect");
    tcp_echo_roundtrip(&mut c.stream, b"least privilege").expect("echo");
    assert_eq!(counter(&agent, &pod, "redirect_tcp"), 1);
}

/// Hostile DNS through the mesh: a datagram that is not a query is dropped, not forwarded; an
/// upstream datagram that is not a response to the query is not passed to the app (the app gets
/// SERVFAIL at the DNS timeout); the agent keeps serving.
#[test]
fn malformed_dns_is_dropped_and_non_answers_become_servfail() {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let pod = cluster.add_pod("meshed").expect("pod");
    let server_pod = cluster.add_pod("server").expect("pod");
    // Echoes every datagram back unchanged: a query comes back with QR clear, not an answer.
    let echo = UdpEchoServer::start(&server_pod, "0.0.0.0:53".parse().expect("addr")).expect("udp");
    let agent =
        Agent::start(["--pod", &pod_spec(&pod, ""), "--dns-timeout", "500ms"]).expect("agent");
    agent.wait_ready().expect("ready");
    let server = server_pod.addr4(53);

    for round in 0..2 {
        let q = dns_query(0x1000 + round, "hostile.test");
        let r = udp_connected(&pod, server, &q, T).expect("an answer");
        assert_eq!(&r.data[..2], &q[..2], "same id");
        assert!(r.data[2] & 0x80 != 0, "a response, not the echoed query");
        assert_eq!(r.data[3] & 0x0f, 2, "SERVFAIL");
        echo.next_datagram(T)
            .expect("the query itself was forwarded");
    }
    for garbage in [&b"\x01\x02\x03"[..], &[0u8; 11][..]] {
        udp_unanswered(&pod, server, garbage);
    }
    assert!(
        echo.next_datagram(Duration::from_millis(300)).is_err(),
        "a malformed datagram was forwarded"
    );
    assert!(agent.is_running());
}
