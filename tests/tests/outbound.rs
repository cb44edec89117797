//! Outbound capture through the real agent: connect4/6 redirect, SO_ORIGINAL_DST, sock_ops,
//! getpeername transparency, exclusions, no loops, no effect on host or non-enrolled sockets.
mod common;

use std::net::{IpAddr, SocketAddr, TcpListener};

use common::{counter, has_row, T};
use sockmesh_tests::*;

/// An enrolled client pod reaches a server pod over `dst`; returns what both sides saw.
fn connect_through(client: &Pod, dst: SocketAddr, server: &TcpServer) -> (Connected, Accepted) {
    let mut c = tcp_connect(client, dst, T).expect("connect through the mesh");
    tcp_echo_roundtrip(&mut c.stream, b"through the mesh").expect("echo");
    let big: Vec<u8> = (0..2 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    tcp_echo_roundtrip(&mut c.stream, &big).expect("bulk echo");
    let acc = server.next_accept(T).expect("server accepted");
    (c, acc)
}

fn outbound_reaches_server(v6: bool) {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let client = cluster.add_pod("client").expect("pod");
    let server_pod = cluster.add_pod("server").expect("pod");
    let bind: SocketAddr = if v6 { "[::]:8080" } else { "0.0.0.0:8080" }
        .parse()
        .expect("addr");
    let server = TcpServer::start(&server_pod, bind).expect("server");
    let agent = Agent::start(["--pod", &pod_spec(&client, "")]).expect("agent");
    agent.wait_ready().expect("ready");

    let dst = if v6 {
        server_pod.addr6(8080)
    } else {
        server_pod.addr4(8080)
    };
    let (c, acc) = connect_through(&client, dst, &server);
    // The app is redirected: its socket's own end is on the pod's loopback (the agent's
    // listener), yet getpeername() shows the original destination.
    assert!(
        c.local.ip().is_loopback(),
        "client socket was redirected to loopback, got {}",
        c.local
    );
    assert_eq!(c.peer, dst, "getpeername shows the original destination");
    // The agent connected from the pod's own netns: the server sees the pod's address.
    let pod_ip: IpAddr = if v6 {
        client.ip6().into()
    } else {
        client.ip4().into()
    };
    assert_eq!(
        unmap(acc.peer).ip(),
        pod_ip,
        "server sees the pod's address"
    );
    assert_eq!(counter(&agent, &client, "redirect_tcp"), 1);
    // SO_ORIGINAL_DST was answered for the agent's accepted socket.
    assert_eq!(counter(&agent, &client, "origin_hit"), 1);
    assert!(counter(&agent, &client, "peer_restored") >= 1);
}

#[test]
fn outbound_tcp_v4_reaches_the_server_through_the_agent() {
    outbound_reaches_server(false);
}

#[test]
fn outbound_tcp_v6_reaches_the_server_through_the_agent() {
    outbound_reaches_server(true);
}

/// The datapath alone speaks SO_ORIGINAL_DST like iptables REDIRECT: with the agent killed
/// but its links pinned (--keep-pins), any proxy listening on 127.0.0.1:15001 in the pod gets
/// the redirected connection and learns the original destination.
#[test]
fn so_original_dst_answers_any_proxy_like_iptables_redirect() {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let client = cluster.add_pod("client").expect("pod");
    let server_pod = cluster.add_pod("server").expect("pod");
    // Fail-open off: the stand-in proxy keeps being used however long the agent stays dead.
    let mut agent = Agent::start([
        "--pod",
        &pod_spec(&client, ""),
        "--keep-pins",
        "--fail-open-after",
        "off",
    ])
    .expect("agent");
    agent.wait_ready().expect("ready");
    agent.kill().expect("kill -9 the agent");
    // Programs stay attached through the pinned links; the pod's listener is free again.
    let proxy = TcpServer::start_with(
        &client,
        "127.0.0.1:15001".parse().expect("addr"),
        ServerMode::Hold,
    )
    .expect("stand-in proxy");
    let dst4 = server_pod.addr4(5432);
    let c = tcp_connect(&client, dst4, T).expect("redirected to the stand-in proxy");
    let acc = proxy.next_accept(T).expect("proxy accepted");
    assert_eq!(
        acc.original_dst.map(unmap),
        Some(dst4),
        "SO_ORIGINAL_DST (SOL_IP)"
    );
    assert_eq!(c.peer, dst4, "getpeername on the app's socket");
    assert_eq!(
        unmap(acc.peer),
        unmap(c.local),
        "proxy sees the app's socket"
    );

    let proxy6 = TcpServer::start_with(
        &client,
        "[::1]:15001".parse().expect("addr"),
        ServerMode::Hold,
    )
    .expect("stand-in proxy v6");
    let dst6 = server_pod.addr6(443);
    let c6 = tcp_connect(&client, dst6, T).expect("redirected v6");
    let acc6 = proxy6.next_accept(T).expect("proxy accepted v6");
    assert_eq!(
        acc6.original_dst,
        Some(dst6),
        "IP6T_SO_ORIGINAL_DST (SOL_IPV6)"
    );
    assert_eq!(c6.peer, dst6);
    // Dropping the agent guard removes the pins, which detaches the programs.
}

#[test]
fn excluded_ports_and_cidrs_go_direct() {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let client = cluster.add_pod("client").expect("pod");
    let server_pod = cluster.add_pod("server").expect("pod");
    let s1 = TcpServer::start(&server_pod, "0.0.0.0:2222".parse().expect("addr")).expect("server");
    let s2 = TcpServer::start(&server_pod, "[::]:7000".parse().expect("addr")).expect("server");
    let s3 = TcpServer::start(&server_pod, "0.0.0.0:7001".parse().expect("addr")).expect("server");
    let spec = pod_spec(
        &client,
        &format!(
            "exclude-ports=2000-2999,exclude-cidrs={}/128",
            server_pod.ip6()
        ),
    );
    let agent = Agent::start(["--pod", &spec]).expect("agent");
    agent.wait_ready().expect("ready");

    let direct = tcp_connect(&client, server_pod.addr4(2222), T).expect("excluded port");
    assert_eq!(
        direct.local.ip(),
        IpAddr::from(client.ip4()),
        "excluded port is not redirected"
    );
    s1.next_accept(T).expect("accepted");
    let direct6 = tcp_connect(&client, server_pod.addr6(7000), T).expect("excluded cidr");
    assert_eq!(
        direct6.local.ip(),
        IpAddr::from(client.ip6()),
        "excluded CIDR is not redirected"
    );
    s2.next_accept(T).expect("accepted");
    assert_eq!(counter(&agent, &client, "bypass_excluded"), 2);
    assert_eq!(counter(&agent, &client, "redirect_tcp"), 0);

    // Everything else is still captured.
    let meshed = tcp_connect(&client, server_pod.addr4(7001), T).expect("captured");
    assert!(meshed.local.ip().is_loopback());
    s3.next_accept(T).expect("accepted");
    assert_eq!(counter(&agent, &client, "redirect_tcp"), 1);
}

#[test]
fn loopback_destinations_are_not_captured() {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let client = cluster.add_pod("client").expect("pod");
    let local = TcpServer::start(&client, "127.0.0.1:9999".parse().expect("addr")).expect("server");
    let agent = Agent::start(["--pod", &pod_spec(&client, "")]).expect("agent");
    agent.wait_ready().expect("ready");
    let mut c = tcp_connect(&client, "127.0.0.1:9999".parse().expect("addr"), T).expect("connect");
    tcp_echo_roundtrip(&mut c.stream, b"local").expect("echo");
    let acc = local.next_accept(T).expect("accepted");
    assert_eq!(
        acc.original_dst, None,
        "a direct connection has no original destination"
    );
    assert_eq!(counter(&agent, &client, "bypass_loopback"), 1);
    assert_eq!(counter(&agent, &client, "redirect_tcp"), 0);
}

/// Host processes and pods that are not enrolled keep their sockets as they are.
#[test]
fn host_and_non_enrolled_pods_are_untouched() {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let enrolled = cluster.add_pod("enrolled").expect("pod");
    let other = cluster.add_pod("other").expect("pod");
    let server_pod = cluster.add_pod("server").expect("pod");
    let server =
        TcpServer::start(&server_pod, "0.0.0.0:8080".parse().expect("addr")).expect("server");
    let agent = Agent::start(["--pod", &pod_spec(&enrolled, "")]).expect("agent");
    agent.wait_ready().expect("ready");

    let mut c = tcp_connect(&other, server_pod.addr4(8080), T).expect("connect");
    tcp_echo_roundtrip(&mut c.stream, b"not meshed").expect("echo");
    assert_eq!(c.local.ip(), IpAddr::from(other.ip4()), "not redirected");
    let acc = server.next_accept(T).expect("accepted");
    assert_eq!(unmap(acc.peer), unmap(c.local));
    // A wildcard bind in a non-enrolled pod stays a wildcard bind.
    let l = other.run(|| TcpListener::bind("0.0.0.0:0")).expect("bind");
    assert!(l.local_addr().expect("addr").ip().is_unspecified());
    let stats = agent.stats().expect("stats");
    assert!(
        !has_row(&stats, &other),
        "no counters for a pod that is not enrolled"
    );

    // The host (the test process itself, root netns): a wildcard bind is not moved, and a
    // connection to a host address is not redirected.
    let host = TcpListener::bind("0.0.0.0:0").expect("host bind");
    let port = host.local_addr().expect("addr").port();
    assert!(host.local_addr().expect("addr").ip().is_unspecified());
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("host connect");
    assert_eq!(s.peer_addr().expect("peer").port(), port);
    let (accepted, _) = host.accept().expect("host accept");
    assert_eq!(
        accepted.peer_addr().expect("peer"),
        s.local_addr().expect("local")
    );
}

/// Both ends enrolled: the client's outbound proxy connects (marked) to the server pod, whose
/// inbound capture forwards to the app. Any loop would show up as more than one redirect or
/// a reset, and the server would not see the client's address.
#[test]
fn the_agents_own_connections_are_never_redirected() {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let a = cluster.add_pod("a").expect("pod");
    let b = cluster.add_pod("b").expect("pod");
    // Proxy tier: counts exactly one redirect per connection (a loop would show as more).
    let agent = Agent::start([
        "--pod",
        &pod_spec(&a, ""),
        "--pod",
        &pod_spec(&b, ""),
        "--fast-path",
        "off",
    ])
    .expect("agent");
    agent.wait_ready().expect("ready");
    let server = TcpServer::start(&b, "0.0.0.0:8080".parse().expect("addr")).expect("server");
    agent
        .wait_event_named("inbound_listening", T)
        .expect("inbound listener");
    for _ in 0..3 {
        let (_c, acc) = connect_through(&a, b.addr4(8080), &server);
        assert_eq!(
            unmap(acc.peer).ip(),
            IpAddr::from(a.ip4()),
            "app in b sees a's address"
        );
        assert!(
            acc.local.ip().is_loopback(),
            "b's app was reached through the agent (on its loopback)"
        );
    }
    assert_eq!(
        counter(&agent, &a, "redirect_tcp"),
        3,
        "exactly one redirect per connection"
    );
    assert_eq!(
        counter(&agent, &b, "redirect_tcp"),
        0,
        "the agent's hop into b was not redirected"
    );
    assert_eq!(counter(&agent, &a, "origin_hit"), 3);
}

/// Two pods use the same ports at the same time (outbound listener, app port, client ports):
/// the netns cookie in every key keeps them apart.
#[test]
fn two_pods_with_the_same_ports_do_not_collide() {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let a = cluster.add_pod("a").expect("pod");
    let b = cluster.add_pod("b").expect("pod");
    let server_pod = cluster.add_pod("server").expect("pod");
    let server =
        TcpServer::start(&server_pod, "0.0.0.0:8080".parse().expect("addr")).expect("server");
    let agent =
        Agent::start(["--pod", &pod_spec(&a, ""), "--pod", &pod_spec(&b, "")]).expect("agent");
    agent.wait_ready().expect("ready");
    let app_a = TcpServer::start(&a, "0.0.0.0:9000".parse().expect("addr")).expect("app a");
    let app_b = TcpServer::start(&b, "0.0.0.0:9000".parse().expect("addr")).expect("app b");
    for _ in 0..2 {
        agent
            .wait_event_named("inbound_listening", T)
            .expect("inbound listener");
    }
    // The same client port in both pods, to the same destination, open at the same time.
    let port = 41000;
    let ca = tcp_connect_from(
        &a,
        Some(SocketAddr::new(a.ip4().into(), port)),
        server_pod.addr4(8080),
        T,
    );
    let cb = tcp_connect_from(
        &b,
        Some(SocketAddr::new(b.ip4().into(), port)),
        server_pod.addr4(8080),
        T,
    );
    let (mut ca, mut cb) = (ca.expect("a connects"), cb.expect("b connects"));
    tcp_echo_roundtrip(&mut ca.stream, b"from a").expect("a echo");
    tcp_echo_roundtrip(&mut cb.stream, b"from b").expect("b echo");
    assert_eq!(ca.peer, server_pod.addr4(8080));
    assert_eq!(cb.peer, server_pod.addr4(8080));
    let mut seen: Vec<IpAddr> = (0..2)
        .map(|_| unmap(server.next_accept(T).expect("accept").peer).ip())
        .collect();
    seen.sort();
    let mut want: Vec<IpAddr> = vec![a.ip4().into(), b.ip4().into()];
    want.sort();
    assert_eq!(seen, want, "each connection left from its own pod");

    // Inbound on the same port in both pods reaches the right app.
    let mut to_a = tcp_connect(&server_pod, a.addr4(9000), T).expect("to a");
    tcp_echo_roundtrip(&mut to_a.stream, b"a").expect("echo a");
    let mut to_b = tcp_connect(&server_pod, b.addr4(9000), T).expect("to b");
    tcp_echo_roundtrip(&mut to_b.stream, b"b").expect("echo b");
    let acc_a = app_a.next_accept(T).expect("app a accepted");
    let acc_b = app_b.next_accept(T).expect("app b accepted");
    assert_eq!(unmap(acc_a.peer), unmap(to_a.local));
    assert_eq!(unmap(acc_b.peer), unmap(to_b.local));
}
