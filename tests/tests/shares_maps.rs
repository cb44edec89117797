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
