//! The kernel fast path (`--fast-path auto`): a peer whose policy the kernel can enforce is
//! handed over after its first proxied connection; later connect()s to it are policed in
//! `connect4/6` and go direct, counted in the same per-peer schema.
mod common;
mod policy_util;

use std::time::{Duration, Instant};

use std::mem::size_of;

use common::{counter, peer_row, peers_until, redirected, ECHO_PORT};
use policy_util::{attempt, wait_until, Outcome, T};
use serde_json::Value;
use sockmesh_common::{
    fast::{Verdict, VerdictKey},
    SockAddr,
};
use sockmesh_tests::prom::{metric, scrape_until, Sample};
use sockmesh_tests::*;

/// What every fast-path agent here runs with: the default policy (connect and idle timeouts,
/// breaker, adaptive throttling), all of which the kernel tier enforces.
const ELIGIBLE: [&str; 2] = ["--fast-path", "auto"];

fn start(client: &Pod, extra: &[&str]) -> Agent {
    let spec = pod_spec(client, "");
    let mut args = vec!["--pod", spec.as_str()];
    args.extend_from_slice(&ELIGIBLE);
    args.extend_from_slice(extra);
    let agent = Agent::start(args).expect("agent");
    agent.wait_ready().expect("ready");
    agent
}

fn tier_of(agent: &Agent, peer: &str) -> Value {
    peers_until(agent, &[], |v| {
        common::find_peer(v, peer).is_some_and(|r| r["tier"] == "kernel")
    })
}

/// The first connection is proxied (and resolves the peer's policy), every later one goes
/// direct: the app's socket is bound to the pod's own address, not the loopback listener,
/// the pod's `redirect_tcp` does not move, and `sockmesh peers` says `kernel` and counts
/// the direct connections as connections of the peer, with their bytes.
#[test]
fn after_the_first_proxied_connection_a_peer_goes_direct() {
    let (_cluster, client, server_pod, _echo) = common::client_and_echo_server();
    let agent = start(&client, &[]);
    let dst = server_pod.addr4(ECHO_PORT);
    assert!(redirected(&client, dst), "the first connection is proxied");
    let peers = tier_of(&agent, &dst.to_string());
    let row = peer_row(&peers, &dst.to_string());
    assert_eq!(row["tier"], "kernel", "{row}");
    assert_eq!(counter(&agent, &client, "redirect_tcp"), 1);
    for _ in 0..3 {
        assert!(!redirected(&client, dst), "went direct");
    }
    assert_eq!(
        counter(&agent, &client, "redirect_tcp"),
        1,
        "no redirect after the handover"
    );
    let peers = peers_until(&agent, &[], |v| {
        common::find_peer(v, &dst.to_string())
            .is_some_and(|r| r["conns_total"] == 4 && r["direct"] == 3 && r["conns_active"] == 0)
    });
    let row = peer_row(&peers, &dst.to_string());
    assert_eq!(row["conns_total"], 4, "{row}");
    assert_eq!(row["direct"], 3, "{row}");
    assert_eq!(row["conns_active"], 0, "{row}");
    assert!(row["bytes_out"].as_u64() >= Some(16), "{row}");
    assert!(row["bytes_in"].as_u64() >= Some(16), "{row}");
}

/// `--fast-path off`, or a policy with a knob the kernel cannot enforce (a
/// lifetime, a queue): the peer stays on the proxy, and `peers` says why.
#[test]
fn a_peer_stays_on_the_proxy_when_the_fast_path_is_off_or_its_policy_needs_the_proxy() {
    let (_cluster, client, server_pod, _echo) = common::client_and_echo_server();
    let dst = server_pod.addr4(ECHO_PORT);
    for (args, reason) in [
        (vec!["--fast-path", "off"], "fast_path_off"),
        (
            vec!["--fast-path", "auto", "--max-conn-lifetime", "1h"],
            "lifetime",
        ),
        (
            vec!["--fast-path", "auto", "--peer-max-conns", "5"],
            "queue",
        ),
    ] {
        let spec = pod_spec(&client, "");
        let mut all = vec!["--pod", spec.as_str()];
        all.extend(args);
        let mut agent = Agent::start(all).expect("agent");
        agent.wait_ready().expect("ready");
        for _ in 0..3 {
            assert!(redirected(&client, dst), "every connection proxied");
        }
        let peers = peers_until(&agent, &[], |v| {
            common::find_peer(v, &dst.to_string()).is_some_and(|r| r["tier_reason"] == reason)
        });
        let row = peer_row(&peers, &dst.to_string());
        assert_eq!(row["tier"], "proxy", "{row}");
        assert_eq!(row["tier_reason"], reason, "{row}");
        agent.stop().expect("stop");
    }
}

/// At most 2 connections, no queue: the kernel counts live direct connections from
/// connect() to their close (sock_ops) and refuses the third at connect(); a slot freed by a
/// close admits the next at once. (The proxy tier resets the third after its handshake.)
#[test]
fn the_kernel_tier_caps_live_connections_without_a_queue() {
    let (_cluster, client, server_pod, _echo) = common::client_and_echo_server();
    let agent = start(&client, &["--peer-max-conns", "2", "--peer-max-queue", "0"]);
    let dst = server_pod.addr4(ECHO_PORT);
    // The handover waits for the peer's proxied connections to end: the kernel counts from 0.
    drop(attempt(&client, dst).admitted());
    tier_of(&agent, &dst.to_string());
    let a = attempt(&client, dst).admitted();
    let b = attempt(&client, dst).admitted();
    assert!(!a.local.ip().is_loopback() && !b.local.ip().is_loopback());
    assert_eq!(attempt(&client, dst).letter(), 'K', "the third is refused");
    drop(a);
    let mut c = None;
    wait_until("a slot freed by the close", T, || {
        match attempt(&client, dst) {
            Outcome::Admitted(x) => {
                c = Some(x);
                true
            }
            _ => false,
        }
    });
    assert_eq!(attempt(&client, dst).letter(), 'K', "two live again");
    drop((b, c));
    let peers = peers_until(&agent, &[], |v| {
        common::find_peer(v, &dst.to_string()).is_some_and(|r| {
            r["conns_active"] == 0 && r["throttled"]["concurrency"].as_u64() >= Some(2)
        })
    });
    let row = peer_row(&peers, &dst.to_string());
    assert_eq!(row["conns_active"], 0, "{row}");
}

/// A peer that stops answering SYNs after the handover: connect() fails with ETIMEDOUT
/// within 10 % of the 2 s connect timeout (the kernel's own SYN retries would take over two
/// minutes), counted as a connect timeout; two in a row open the breaker in the kernel, so
/// the next connect() is refused at once, and the peer is handed back to the proxy, whose
/// breaker is open until the same moment.
#[test]
fn the_kernel_tier_times_out_connects_and_opens_the_breaker() {
    let (_cluster, client, server_pod, _echo) = common::client_and_echo_server();
    let agent = start(
        &client,
        &[
            "--connect-timeout",
            "2s",
            "--breaker-failures",
            "2",
            "--breaker-open",
            "30s",
        ],
    );
    let dst = server_pod.addr4(ECHO_PORT);
    drop(attempt(&client, dst).admitted());
    tier_of(&agent, &dst.to_string());
    server_pod
        .exec(&[
            "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "8080", "-j", "DROP",
        ])
        .expect("iptables in the server pod");
    for _ in 0..2 {
        let started = Instant::now();
        let err = tcp_connect(&client, dst, Duration::from_secs(10)).expect_err("timed out");
        let took = started.elapsed();
        assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT), "{err}");
        assert!(
            took >= Duration::from_millis(1800) && took <= Duration::from_millis(2200),
            "connect() failed after {took:?}, not within 10% of 2 s"
        );
    }
    let started = Instant::now();
    let err = tcp_connect(&client, dst, T).expect_err("breaker open");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(started.elapsed() < Duration::from_millis(100));
    let peers = peers_until(&agent, &[], |v| {
        common::find_peer(v, &dst.to_string())
            .is_some_and(|r| r["breaker"] == "open" && r["tier_reason"] == "breaker_opened")
    });
    let row = peer_row(&peers, &dst.to_string());
    assert_eq!(row["timeouts"]["connect"], 2, "{row}");
    assert_eq!(row["connect_failures"], 2, "{row}");
    assert_eq!(row["breaker"], "open", "{row}");
    assert_eq!(row["tier"], "proxy", "{row}");
    // Still refused in the kernel once the agent took the breaker over.
    assert_eq!(attempt(&client, dst).letter(), 'K');
    // Both refusals are throttled by the open breaker: the kernel's own verdict and the
    // agent's alike.
    let peers = peers_until(&agent, &[], |v| {
        common::find_peer(v, &dst.to_string()).is_some_and(|r| r["fast_rejects"] == 2)
    });
    let row = peer_row(&peers, &dst.to_string());
    assert_eq!(row["fast_rejects"], 2, "{row}");
    assert_eq!(row["throttled"]["breaker"], 2, "{row}");
}

/// What readers show is what the kernel does now. A kernel-tier peer's direct connections
/// are counted in /metrics with its tier; their connect latency, measured by the kernel from
/// connect() to the handshake's end, joins the peer's samples (here the proxied first
/// connection waited 1 s for a dropped SYN, the direct ones did not, so the median is a
/// direct one's); and once the peer's `SM_VERDICTS` entry is gone (deleted here, as an LRU
/// eviction would), `peers` and /metrics say `proxy (entry_gone)` and its next connection is
/// proxied.
#[test]
fn readers_show_the_live_tier_and_the_kernels_connect_latency() {
    let (_cluster, client, server_pod, _echo) = common::client_and_echo_server();
    let agent = start(&client, &[]);
    let dst = server_pod.addr4(ECHO_PORT);
    let (peer, pod) = (dst.to_string(), client.netns_path().display().to_string());
    // The first SYN to the server is dropped: the agent's upstream connect (the first
    // connection, proxied) retransmits it after 1 s.
    server_pod
        .exec(&[
            "iptables",
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            "8080",
            "--syn",
            "-m",
            "statistic",
            "--mode",
            "nth",
            "--every",
            "1000000",
            "--packet",
            "0",
            "-j",
            "DROP",
        ])
        .expect("iptables in the server pod");
    assert!(redirected(&client, dst), "the first connection is proxied");
    tier_of(&agent, &peer);
    for _ in 0..4 {
        assert!(!redirected(&client, dst), "went direct");
    }
    let metrics = agent.metrics_addr().expect("metrics address");
    let tier_is = |s: &[Sample], tier: &str, why: &str| {
        s.iter().any(|x| {
            x.name == "sockmesh_peer_tier"
                && x.label("peer") == Some(peer.as_str())
                && x.label("tier") == Some(tier)
                && x.label("reason") == Some(why)
                && x.value == 1.0
        })
    };
    let prom = scrape_until(metrics, |s| {
        metric(s, "sockmesh_peer_direct_connections_total", &pod, &peer) == 4.0
            && tier_is(s, "kernel", "kernel")
    });
    assert_eq!(
        metric(&prom, "sockmesh_peer_direct_connections_total", &pod, &peer),
        4.0
    );
    assert!(tier_is(&prom, "kernel", "kernel"));
    let peers = peers_until(&agent, &[], |v| {
        common::find_peer(v, &peer).is_some_and(|r| r["connect_p50_us"].as_u64() < Some(500_000))
    });
    let row = peer_row(&peers, &peer);
    let (p50, p99) = (
        row["connect_p50_us"].as_u64().expect("p50"),
        row["connect_p99_us"].as_u64().expect("p99"),
    );
    assert!(
        p50 > 0 && p50 < 500_000,
        "the median is a direct handshake's: {row}"
    );
    assert!(
        p99 >= 900_000,
        "the proxied one that waited 1 s is kept: {row}"
    );
    // The entry as `sockmesh maps dump` decodes it: the kernel tier, four handshakes timed.
    let dir = agent.bpffs_dir().display().to_string();
    let (status, out, err) = Agent::run_to_exit([
        "maps",
        "dump",
        "SM_VERDICTS",
        "--json",
        "--bpffs-dir",
        dir.as_str(),
    ])
    .expect("maps dump");
    assert!(status.success(), "{err}");
    let dumped: Value = serde_json::from_str(&out).expect("JSON");
    let entry = dumped
        .as_array()
        .and_then(|a| a.iter().find(|e| e["key"]["peer"] == peer.as_str()))
        .unwrap_or_else(|| panic!("no entry for {peer}: {dumped}"));
    assert_eq!(entry["value"]["tier"], "kernel", "{entry}");
    assert_eq!(entry["value"]["latency_seq"], 4, "{entry}");

    // The entry goes, as an eviction would take it: readers say so at once.
    let map = sockmesh_tests::bpfmap::PinnedMap::open(
        &agent.bpffs_dir().join("SM_VERDICTS"),
        size_of::<VerdictKey>(),
        size_of::<Verdict>(),
    )
    .expect("SM_VERDICTS");
    let key = VerdictKey {
        netns_cookie: client.netns_cookie().expect("cookie"),
        peer: SockAddr::v4(u32::from(server_pod.ip4()).to_be(), ECHO_PORT.to_be()),
        _pad: 0,
    };
    map.delete(sockmesh_tests::bpfmap::bytes_of(&key))
        .expect("delete the peer's entry");
    let peers = agent.read_json("peers", &[]).expect("peers");
    let row = peer_row(&peers, &peer);
    assert_eq!(
        (row["tier"].as_str(), row["tier_reason"].as_str()),
        (Some("proxy"), Some("entry_gone")),
        "{row}"
    );
    let prom = scrape_until(metrics, |s| tier_is(s, "proxy", "entry_gone"));
    assert!(tier_is(&prom, "proxy", "entry_gone"));
    assert!(redirected(&client, dst), "proxied again");
}

/// A reload hands every peer back to the proxy (its policy may have changed); the next
/// proxied connection decides again.
#[test]
fn a_policy_reload_takes_peers_off_the_kernel_tier() {
    let (_cluster, client, server_pod, _echo) = common::client_and_echo_server();
    let agent = start(&client, &[]);
    let dst = server_pod.addr4(ECHO_PORT);
    assert!(redirected(&client, dst));
    tier_of(&agent, &dst.to_string());
    assert!(!redirected(&client, dst));
    agent.signal(libc::SIGHUP).expect("SIGHUP");
    wait_until("the reload to demote the peer", T, || {
        redirected(&client, dst)
    });
    assert!(!redirected(&client, dst), "handed over again");
}

/// Adaptive throttling on the kernel tier, K = 1, breaker off: once the peer refuses every
/// connection (its server gone), the kernel refuses a growing share of connect()s itself with
/// the proxy's probability (requests - K * accepts) / (requests + 1), counted
/// `throttled.adaptive`; every attempt it let through failed at the peer.
#[test]
fn the_kernel_tier_throttles_adaptively_when_the_peer_fails() {
    let (_cluster, client, server_pod, echo) = common::client_and_echo_server();
    let agent = start(&client, &["--adaptive-k", "1", "--breaker-failures", "off"]);
    let dst = server_pod.addr4(ECHO_PORT);
    assert!(redirected(&client, dst));
    tier_of(&agent, &dst.to_string());
    drop(echo);
    let attempts = 60;
    for _ in 0..attempts {
        let err = tcp_connect(&client, dst, T).expect_err("nothing listens");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    }
    let peers = peers_until(&agent, &[], |v| {
        common::find_peer(v, &dst.to_string()).is_some_and(|r| {
            let a = r["throttled"]["adaptive"].as_u64().unwrap_or(0);
            let f = r["connect_failures"].as_u64().unwrap_or(0);
            a + f == attempts
        })
    });
    let row = peer_row(&peers, &dst.to_string());
    let throttled = row["throttled"]["adaptive"].as_u64().unwrap_or(0);
    // With p = (r - 1) / (r + 1) after r requests, the expected number refused out of 60 is
    // about 50; 20 is far in the tail for a working throttle, 0 means none.
    assert!(throttled >= 20, "{row}");
    assert_eq!(
        throttled + row["connect_failures"].as_u64().unwrap_or(0),
        attempts,
        "{row}"
    );
    assert_eq!(row["tier"], "kernel", "{row}");
}

/// The idle timeout of a direct connection, which the agent does not own: its sweep (every
/// second) finds it idle through sock_diag and destroys it, so the app's blocked read fails
/// (ECONNABORTED) between the timeout and a sweep later, and `peers` counts an idle timeout.
/// (The proxy tier closes both sides with a FIN instead; see README, "Two tiers".)
#[test]
fn the_agent_closes_idle_direct_connections_from_outside() {
    let (_cluster, client, server_pod, _echo) = common::client_and_echo_server();
    let agent = start(&client, &["--idle-timeout", "2s"]);
    let dst = server_pod.addr4(ECHO_PORT);
    drop(attempt(&client, dst).admitted());
    tier_of(&agent, &dst.to_string());
    let mut c = attempt(&client, dst).admitted();
    assert!(!c.local.ip().is_loopback(), "direct");
    c.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let idle_from = Instant::now();
    let mut b = [0u8; 1];
    let err = std::io::Read::read(&mut c.stream, &mut b).expect_err("closed by the agent");
    let after = idle_from.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED), "{err}");
    assert!(
        after >= Duration::from_millis(1900) && after < Duration::from_millis(3600),
        "closed after {after:?} idle (timeout 2 s, sweep every 1 s)"
    );
    let peers = peers_until(&agent, &[], |v| {
        common::find_peer(v, &dst.to_string()).is_some_and(|r| r["timeouts"]["idle"] == 1)
    });
    let row = peer_row(&peers, &dst.to_string());
    assert_eq!(row["timeouts"]["idle"], 1, "{row}");
}
