//! Per-socket kernel state one pod cannot evict for another. What the programs remember per
//! socket lives in the socket's own storage (`SM_SOCK_STORE`), and the two maps keyed by a
//! tuple (`SM_ORIG_TUPLE`, `SM_DNS_ORIG`) hold at most each pod's quota: a hostile pod making
//! more sockets and DNS origins than those maps hold (they used to be LRU maps of 65,536
//! shared by all pods) takes nothing from the victim. The victim's sockets made before the
//! flood keep their state (its DNS replies still come from its server, its proxied connection
//! still shows its peer), its new connections and queries keep working (p99 under 100 ms,
//! printed beside its quiet baseline), and the hostile pod is refused past its quotas,
//! counted against it alone.
mod common;
mod shares_util;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use serde_json::Value;

use shares_util::*;
use sockmesh_tests::prom;
use sockmesh_tests::*;

const PROBES: usize = 200;
/// UDP sockets of each attacking process (under its 20,000 open files), and processes (two
/// per family, each binding its own ports: a DNS origin is keyed by pod, port and family):
/// 68,000 DNS origins, more than `SM_DNS_ORIG` holds (65,536) and than the old shared maps did.
const UDP_PER_PROC: u64 = 17_000;
const UDP_PROCS: u64 = 4;
/// The first port each process binds: two disjoint ranges, each used once per family.
const FIRST_PORTS: [u16; 4] = [2000, 19_000, 2000, 19_000];
/// Connections the hostile pod holds, against a connection-origin quota of [`ORIGINS`].
const TCP_HELD: u64 = 2_000;
const ORIGINS: u64 = 256;
/// The default DNS-origin quota (`sockmesh_common::quota::defaults::DNS`).
const DNS_ORIGINS: u64 = 512;

/// A query from the victim's long-lived socket: the source its reply shows.
fn ask(udp: &UdpSocket, server: SocketAddr, id: u16) -> SocketAddr {
    udp.send_to(&dns_query(id, "victim.test"), server)
        .expect("victim query");
    let mut buf = [0u8; 512];
    let (n, from) = udp.recv_from(&mut buf).expect("victim reply");
    assert!(
        n >= 2 && buf[..2] == id.to_be_bytes(),
        "the victim's own answer"
    );
    from
}

#[test]
fn floods_of_sockets_and_dns_origins_evict_nothing_of_the_victims() {
    let c = cast();
    // The agent's own sockets in the hostile pod (its DNS upstream sockets) take ephemeral
    // ports: keep those above the ports the flood binds, so its binds fail only for quotas.
    c.hostile
        .exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 60999"])
        .expect("ephemeral range of the hostile pod");
    let dns = c.server.addr4(53);
    let _responder = dns_responder(&c.server, dns);
    let dns6 = c.server.addr6(53);
    let _responder6 = dns_responder(&c.server, dns6);
    let sink = c.server.addr4(9000);
    let _sink = never_accepting(&c.server, sink, 4096);
    let (agent, ready) = start_agent(&c, &["--pod-conn-origins", &ORIGINS.to_string()]);
    assert_eq!(
        ready["limits"]["pod_dns_origins"].as_u64(),
        Some(DNS_ORIGINS),
        "{ready}"
    );
    let echo = c.server.addr4(8080);

    // The victim's long-lived sockets, made before the flood: a proxied connection and a
    // DNS socket (its server remembered in SM_DNS_ORIG, its origin in its own storage).
    let mut held = tcp_connect(&c.victim, echo, T).expect("victim connection");
    assert!(held.local.ip().is_loopback(), "proxied");
    let udp = c
        .victim
        .run(|| UdpSocket::bind("0.0.0.0:0"))
        .expect("victim udp socket");
    udp.set_read_timeout(Some(T)).expect("timeout");
    assert_eq!(ask(&udp, dns, 1), dns, "the reply shows the server");
    let quiet_conn = connect_probes(&c.victim, echo, PROBES);
    let quiet_dns = dns_probes(&c.victim, dns, PROBES);

    let udp_floods: Vec<Attack> = FIRST_PORTS
        .iter()
        .enumerate()
        .map(|(i, first)| {
            let (n, first) = (UDP_PER_PROC.to_string(), first.to_string());
            let server = if i < 2 { dns } else { dns6 };
            let args = ["socks", "udp", &server.to_string(), &n, &first];
            Attack::start(&c.hostile, &args)
        })
        .collect();
    let n = TCP_HELD.to_string();
    let tcp_args = ["socks", "tcp", &sink.to_string(), &n, "0"];
    let mut tcp_flood = Attack::start(&c.hostile, &tcp_args);
    let (mut sent, mut eperm, mut other) = (0, 0, 0);
    for f in &udp_floods {
        let r = f.report(Duration::from_secs(120));
        eprintln!("[shares_maps] hostile udp: {r}");
        assert_eq!(r["made"].as_u64(), Some(UDP_PER_PROC), "{r}");
        sent += r["ok"].as_u64().expect("ok");
        eperm += r["eperm"].as_u64().expect("eperm");
        other += r["other"].as_u64().expect("other");
    }
    let t = tcp_flood.report(Duration::from_secs(120));
    eprintln!("[shares_maps] hostile tcp: {t}");
    assert_eq!(t["made"].as_u64(), Some(TCP_HELD), "{t}");

    // Every hostile socket is held now: the victim, new and old.
    let attacked_conn = connect_probes(&c.victim, echo, PROBES);
    let attacked_dns = dns_probes(&c.victim, dns, PROBES);
    report_and_check(
        "connect+echo, 68k DNS origins and 2k connections held",
        &quiet_conn,
        &attacked_conn,
    );
    report_and_check(
        "dns query, 68k DNS origins and 2k connections held",
        &quiet_dns,
        &attacked_dns,
    );
    assert_eq!(
        ask(&udp, dns, 2),
        dns,
        "the victim's old DNS socket still sees its server"
    );
    tcp_echo_roundtrip(&mut held.stream, b"still proxied").expect("the victim's old connection");
    assert_eq!(
        held.stream.peer_addr().expect("getpeername"),
        echo,
        "the victim's old connection still shows its peer"
    );

    // The hostile pod got its quota of DNS origins and was refused the rest at sendto()
    // (EPERM); its connections past its origin quota found no origin and were reset. Both
    // counted against it, in `sockmesh pods` and /metrics; the victim was refused nothing.
    let total = UDP_PROCS * UDP_PER_PROC;
    eprintln!("[shares_maps] hostile DNS origins: {sent} kept, {eperm} refused of {total}");
    // The only other failure: a bind to the port of the agent's DNS listener in the pod
    // (15053, one per family), which the ranges cross.
    assert!(other <= 2, "{other} binds or sends failed otherwise");
    assert_eq!(
        sent + eperm + other,
        total,
        "every sendto either went or was refused"
    );
    // A few past the quota: CPUs racing at the edge each take one.
    assert!(sent <= DNS_ORIGINS + 4, "{sent} DNS origins kept");
    let r = refused_until(&agent, &c.hostile, |r| {
        r["dns_quota"].as_u64() >= Some(eperm) && r["origin_quota"].as_u64() > Some(0)
    });
    eprintln!("[shares_maps] hostile refusals: {r}");
    assert_eq!(r["dns_quota"].as_u64(), Some(eperm), "{r}");
    assert!(r["origin_quota"].as_u64() > Some(0), "{r}");
    let v = refused(&agent, &c.victim);
    assert_eq!(refused_total(&v), 0, "the victim was refused nothing: {v}");
    let metrics = agent.metrics_addr().expect("metrics address");
    let s = prom::scrape_until(metrics, |s| {
        s.iter().any(|s| {
            s.name == "sockmesh_pod_refused_total"
                && s.label("reason") == Some("dns_quota")
                && s.label("pod").is_some_and(|p| p.ends_with("hostile"))
                && s.value as u64 == eperm
        })
    });
    assert!(
        s.iter().any(|s| s.name == "sockmesh_pod_refused_total"
            && s.label("reason") == Some("origin_quota")
            && s.label("pod").is_some_and(|p| p.ends_with("hostile"))
            && s.value > 0.0),
        "origin_quota in /metrics"
    );

    for f in udp_floods {
        drop(f);
    }
    tcp_flood.release();
    still_serving(&agent, &c);
}

/// Bound sockets of each attacking process (under its 20,000 open files), and processes: the
/// hostile pod tries to hold 34,000 captured ports, more than `SM_IN_BINDS` holds (32,768;
/// it used to be an LRU map of 16,384 shared by all pods, where such a flood evicted the
/// victim's ports, whose connections then reached the app unsteered and unpoliced).
const BINDS_PER_PROC: u64 = 17_000;
const BIND_FIRST_PORTS: [u16; 2] = [2000, 19_000];
/// The default inbound-bind quota (`sockmesh_common::quota::defaults::BINDS`).
const BIND_QUOTA: u64 = 128;

#[test]
fn a_flood_of_binds_takes_none_of_the_victims_captured_ports() {
    let c = cast();
    let (agent, ready) = start_agent(&c, &[]);
    assert_eq!(
        ready["limits"]["pod_inbound_binds"].as_u64(),
        Some(BIND_QUOTA),
        "{ready}"
    );
    // The victim's server, bound before the flood.
    let _app = serve_captured(&agent, &c.victim, 8080);
    let dst = c.victim.addr4(8080);
    let steered0 = common::counter(&agent, &c.victim, "inbound_steered");
    let quiet = inbound_probes(&c.server, dst, PROBES);

    let floods: Vec<Attack> = BIND_FIRST_PORTS
        .iter()
        .map(|first| {
            let (n, first) = (BINDS_PER_PROC.to_string(), first.to_string());
            Attack::start(&c.hostile, &["socks", "bind", "0.0.0.0:1", &n, &first])
        })
        .collect();
    let (mut bound, mut eperm, mut other) = (0, 0, 0);
    for f in &floods {
        let r = f.report(Duration::from_secs(120));
        eprintln!("[shares_maps] hostile binds: {r}");
        assert_eq!(r["made"].as_u64(), Some(BINDS_PER_PROC), "{r}");
        bound += r["ok"].as_u64().expect("ok");
        eperm += r["eperm"].as_u64().expect("eperm");
        other += r["other"].as_u64().expect("other");
    }
    let total = BINDS_PER_PROC * BIND_FIRST_PORTS.len() as u64;
    eprintln!("[shares_maps] hostile binds: {bound} kept, {eperm} refused of {total}");
    assert_eq!(other, 0, "no bind failed but for the quota");
    assert_eq!(bound + eperm, total);
    // A few past the quota: the two processes racing at the edge each take one.
    assert!(
        (BIND_QUOTA..=BIND_QUOTA + 2).contains(&bound),
        "{bound} ports kept"
    );

    // Every hostile socket is held: the victim's port is still steered through the agent,
    // and a port it binds now is captured too.
    let attacked = inbound_probes(&c.server, dst, PROBES);
    report_and_check("inbound connect+echo, 34k binds held", &quiet, &attacked);
    let steered = common::counter(&agent, &c.victim, "inbound_steered") - steered0;
    assert_eq!(
        steered,
        2 * PROBES as u64,
        "every victim connection went through the agent"
    );
    // A port the victim binds now is captured too.
    let _app2 = serve_captured(&agent, &c.victim, 8081);
    assert_eq!(common::counter(&agent, &c.victim, "bind_capture"), 2);

    // The refusals are the hostile pod's alone, in `sockmesh pods` and /metrics.
    let r = refused_until(&agent, &c.hostile, |r| {
        r["bind_quota"].as_u64() >= Some(eperm)
    });
    assert_eq!(r["bind_quota"].as_u64(), Some(eperm), "{r}");
    let v = refused(&agent, &c.victim);
    assert_eq!(refused_total(&v), 0, "the victim was refused nothing: {v}");
    let metrics = agent.metrics_addr().expect("metrics address");
    prom::scrape_until(metrics, |s| {
        s.iter().any(|s| {
            s.name == "sockmesh_pod_refused_total"
                && s.label("reason") == Some("bind_quota")
                && s.label("pod").is_some_and(|p| p.ends_with("hostile"))
                && s.value as u64 == eperm
        })
    });

    // Closed sockets give their entries back: the pod binds again once it holds fewer (the
    // floods are reaped, so their sockets are released).
    drop(floods);
    let again = TcpServer::start(&c.hostile, "0.0.0.0:9090".parse().expect("addr"));
    assert!(again.is_ok(), "a bind after the flood: {:?}", again.err());
    still_serving(&agent, &c);
}

/// The kernel tier's direct sockets (`SM_FAST_SOCKS`) are shared by all pods, each within its
/// quota (`--pod-direct-conns`): a pod holding its quota of direct connections sends its next
/// ones through the proxy (served, policed, counted `fast_quota` against it alone), and the
/// victim's connections to the same peer still go direct.
#[test]
fn a_pod_at_its_direct_connection_quota_takes_the_proxy_and_the_victims_go_direct() {
    const QUOTA: usize = 4;
    let c = cast();
    let (agent, ready) = start_agent(
        &c,
        &[
            "--fast-path",
            "auto",
            "--pod-direct-conns",
            &QUOTA.to_string(),
        ],
    );
    assert_eq!(
        ready["limits"]["pod_direct_conns"].as_u64(),
        Some(QUOTA as u64)
    );
    let echo = c.server.addr4(8080);
    let row_of = |v: &Value, suffix: &str| {
        v["peers"].as_array().and_then(|rows| {
            rows.iter()
                .find(|r| {
                    r["peer"] == echo.to_string()
                        && r["pod"].as_str().is_some_and(|p| p.ends_with(suffix))
                })
                .cloned()
        })
    };
    // Each pod's first connection to the peer is proxied and hands the peer to the kernel.
    for pod in [&c.victim, &c.hostile] {
        assert!(common::redirected(pod, echo), "the first is proxied");
        common::peers_until(&agent, &[], |v| {
            row_of(v, pod.label()).is_some_and(|r| r["tier"] == "kernel")
        });
    }
    let direct = |conn: &Connected| !conn.local.ip().is_loopback();
    let hostile: Vec<Connected> = (0..3 * QUOTA)
        .map(|_| tcp_connect(&c.hostile, echo, T).expect("hostile connection"))
        .collect();
    let went_direct = hostile.iter().filter(|h| direct(h)).count();
    assert_eq!(went_direct, QUOTA, "the hostile pod's quota went direct");
    for mut h in hostile {
        tcp_echo_roundtrip(&mut h.stream, b"served").expect("every one served");
    }
    // Dropped above: once their ends are counted (sock_ops sees the close after the FIN
    // exchange), the hostile pod holds no direct socket.
    let v = common::peers_until(&agent, &[], |v| {
        row_of(v, c.hostile.label()).is_some_and(|r| r["conns_active"] == 0)
    });
    let r = row_of(&v, c.hostile.label()).expect("the hostile pod's row");
    assert_eq!(r["conns_active"], 0, "{r}");
    let victim: Vec<Connected> = (0..QUOTA)
        .map(|_| tcp_connect(&c.victim, echo, T).expect("victim connection"))
        .collect();
    assert!(
        victim.iter().all(direct),
        "the victim's connections go direct"
    );
    let held: Vec<Connected> = (0..QUOTA)
        .map(|_| tcp_connect(&c.hostile, echo, T).expect("hostile connection"))
        .collect();
    assert!(
        held.iter().all(direct),
        "closed direct connections gave their entries back"
    );
    assert_eq!(
        common::counter(&agent, &c.hostile, "fast_quota"),
        2 * QUOTA as u64
    );
    assert_eq!(common::counter(&agent, &c.victim, "fast_quota"), 0);
    still_serving(&agent, &c);
}
