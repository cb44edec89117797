//! The cast of every fair-share test: a victim and a hostile pod enrolled on one agent, and
//! a server pod for the victim.
use std::net::SocketAddr;

use serde_json::Value;
use sockmesh_tests::*;

use crate::common;

/// The cast: a victim and a hostile pod (both enrolled), and a server pod with an echo server
/// on :8080 for the victim.
pub struct Cast {
    pub cluster: Cluster,
    pub victim: Pod,
    pub hostile: Pod,
    pub server: Pod,
    pub _echo: TcpServer,
}

pub fn cast() -> Cast {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let victim = cluster.add_pod("victim").expect("pod");
    let hostile = cluster.add_pod("hostile").expect("pod");
    let server = cluster.add_pod("server").expect("pod");
    let echo = TcpServer::start(&server, "0.0.0.0:8080".parse().expect("addr")).expect("echo");
    Cast {
        cluster,
        victim,
        hostile,
        server,
        _echo: echo,
    }
}

pub fn start_agent(c: &Cast, extra: &[&str]) -> (Agent, Value) {
    let mut args = vec![
        "--pod".to_string(),
        pod_spec(&c.victim, ""),
        "--pod".to_string(),
        pod_spec(&c.hostile, ""),
    ];
    // Proxy tier unless a test asks for another: the attacks load what pods share in the
    // agent and the origin maps, which only proxied connections take (a kernel-tier peer's
    // connections go direct).
    if !extra.contains(&"--fast-path") {
        args.extend(["--fast-path".to_string(), "off".to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let agent = Agent::start(&args).expect("agent");
    let ready = agent.wait_ready().expect("ready");
    (agent, ready)
}

/// The agent kept serving and never failed open (its heartbeat stayed fresh throughout).
pub fn still_serving(agent: &Agent, c: &Cast) {
    assert!(agent.is_running(), "the agent died");
    for pod in [&c.victim, &c.hostile] {
        assert_eq!(
            common::counter(agent, pod, "bypass_stale"),
            0,
            "failed open"
        );
    }
    assert!(
        common::redirected(&c.victim, c.server.addr4(8080)),
        "the victim is still proxied"
    );
}

/// A server of `pod` on its wildcard address and `port`, once the agent has captured it (its
/// inbound listener for the port is open).
pub fn serve_captured(agent: &Agent, pod: &Pod, port: u16) -> TcpServer {
    let cookie = pod.netns_cookie().expect("cookie");
    let addr = SocketAddr::from(([0, 0, 0, 0], port));
    let server = TcpServer::start(pod, addr).expect("app");
    agent
        .wait_event(
            |v: &Value| {
                v["event"] == "inbound_listening"
                    && v["netns_cookie"].as_u64() == Some(cookie)
                    && v["port"].as_u64() == Some(u64::from(port))
            },
            common::T,
        )
        .unwrap_or_else(|e| panic!("the inbound listener of port {port}: {e:#}"));
    server
}
