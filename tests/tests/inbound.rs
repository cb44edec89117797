//! Inbound capture: an app in an enrolled pod keeps its wildcard bind, the kernel (sk_lookup)
//! steers connections to that port to the agent's inbound listener, the agent forwards them to
//! the app over the pod's loopback, and the app sees the real client (accept/getpeername).
//!
//! Tier: the default (`--fast-path auto`); inbound peers are never on the kernel tier.
mod common;

use std::net::{IpAddr, SocketAddr, TcpListener};

use common::{counter, T};
use sockmesh_tests::*;

fn inbound_capture(bind: &str, v6_client: bool) {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let app_pod = cluster.add_pod("app").expect("pod");
    let client = cluster.add_pod("client").expect("pod");
    let agent = Agent::start(["--pod", &pod_spec(&app_pod, "")]).expect("agent");
    agent.wait_ready().expect("ready");
    let app = TcpServer::start(&app_pod, bind.parse().expect("addr")).expect("app");
    let port = app.local_addr().port();
    // The app keeps the address it bound: nothing of it depends on the agent being there.
    assert!(
        app.local_addr().ip().is_unspecified(),
        "app bound {}",
        app.local_addr()
    );
    let ev = agent
        .wait_event_named("inbound_listening", T)
        .expect("agent listens");
    assert_eq!(ev["port"].as_u64(), Some(port as u64));
    assert_eq!(
        ev["netns_cookie"].as_u64(),
        Some(app_pod.netns_cookie().expect("cookie"))
    );

    let dst = if v6_client {
        app_pod.addr6(port)
    } else {
        app_pod.addr4(port)
    };
    let mut c = tcp_connect(&client, dst, T).expect("connect to the pod");
    tcp_echo_roundtrip(&mut c.stream, b"inbound").expect("echo through the agent");
    let acc = app.next_accept(T).expect("app accepted");
    // accept() and getpeername() both show the real client, not the agent on loopback.
    assert_eq!(
        unmap(acc.peer),
        unmap(c.local),
        "the app sees the real client"
    );
    // (For a dual-stack app an IPv4 client arrives as ::ffff:127.0.0.1, as an IPv4 client
    // without the mesh arrives v4-mapped.)
    assert!(
        acc.local.ip().to_canonical().is_loopback(),
        "the connection arrived on loopback (via the agent): {}",
        acc.local
    );
    assert_eq!(
        unmap(acc.from),
        unmap(c.local),
        "accept() returns the real client too"
    );
    assert_eq!(counter(&agent, &app_pod, "bind_capture"), 1);
    assert_eq!(counter(&agent, &app_pod, "inbound_steered"), 1);
    assert!(counter(&agent, &app_pod, "peer_restored") >= 1);
}

#[test]
fn inbound_v4_wildcard_bind_is_captured_and_the_app_sees_the_client() {
    inbound_capture("0.0.0.0:8080", false);
}

#[test]
fn inbound_v6_wildcard_bind_is_captured_and_the_app_sees_the_client() {
    inbound_capture("[::]:8080", true);
}

/// A dual-stack `[::]` socket also serves IPv4 clients; the app sees them v4-mapped, as it
/// would without the mesh.
#[test]
fn inbound_dual_stack_bind_serves_ipv4_clients() {
    inbound_capture("[::]:8080", false);
}

#[test]
fn closing_the_app_closes_the_inbound_listener() {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let app_pod = cluster.add_pod("app").expect("pod");
    let client = cluster.add_pod("client").expect("pod");
    let agent = Agent::start(["--pod", &pod_spec(&app_pod, "")]).expect("agent");
    agent.wait_ready().expect("ready");
    let app = TcpServer::start(&app_pod, "0.0.0.0:8081".parse().expect("addr")).expect("app");
    agent
        .wait_event_named("inbound_listening", T)
        .expect("agent listens");
    drop(app);
    let ev = agent
        .wait_event_named("inbound_closed", T)
        .expect("listener closed with the app");
    assert_eq!(ev["port"].as_u64(), Some(8081));
    let err = tcp_connect(&client, app_pod.addr4(8081), T).expect_err("nothing listens any more");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[test]
fn excluded_inbound_ports_and_specific_binds_are_left_alone() {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let app_pod = cluster.add_pod("app").expect("pod");
    let agent = Agent::start([
        "--pod",
        &pod_spec(&app_pod, "exclude-inbound-ports=9000-9010"),
    ])
    .expect("agent");
    agent.wait_ready().expect("ready");
    let excluded = app_pod
        .run(|| TcpListener::bind("0.0.0.0:9005"))
        .expect("bind");
    assert!(
        excluded.local_addr().expect("addr").ip().is_unspecified(),
        "excluded port keeps its wildcard bind"
    );
    let specific = app_pod
        .run(|| TcpListener::bind(SocketAddr::new(IpAddr::from(app_pod.ip4()), 9100)))
        .expect("bind");
    assert_eq!(
        specific.local_addr().expect("addr").ip(),
        IpAddr::from(app_pod.ip4())
    );
    let port0 = app_pod
        .run(|| TcpListener::bind("0.0.0.0:0"))
        .expect("bind");
    assert!(
        port0.local_addr().expect("addr").ip().is_unspecified(),
        "port 0 binds are not captured"
    );
    assert_eq!(counter(&agent, &app_pod, "bind_capture"), 0);
    assert_eq!(counter(&agent, &app_pod, "bypass_excluded"), 1);
}
