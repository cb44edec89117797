//! Observability end to end: real traffic through the agent, then the CLI's JSON, the parsed
//! Prometheus exposition and `bpftool map dump pinned` must all agree with what was sent, to
//! the connection and the byte; bounded metric cardinality; figures that outlive the agent and
//! continue across a restart; health endpoints; refusals of bad input.
mod common;
mod observe_util;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};

use anyhow::Result;
use common::peer_row;
use observe_util::{bpftool_dump, peer_key_bytes};
use serde_json::Value;
use sockmesh_tests::prom::{http_get, metric, scrape, scrape_until, Sample};
use sockmesh_tests::*;

/// How much the test server answers per byte received: makes "in" and "out" differ.
const REPLY_FACTOR: usize = 3;

/// A server in `pod` that reads each connection to EOF, then answers REPLY_FACTOR times as
/// many bytes and closes. Its threads end when the test process does.
fn start_reply_server(pod: &Pod, addr: SocketAddr) -> Result<()> {
    let listener = pod.run(|| TcpListener::bind(addr))?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            std::thread::spawn(move || {
                let mut got = Vec::new();
                if c.read_to_end(&mut got).is_ok() {
                    let _ = c.write_all(&vec![7u8; got.len() * REPLY_FACTOR]);
                }
            });
        }
    });
    Ok(())
}

/// One request/response through the mesh: returns (bytes sent, bytes received).
fn exchange(client: &Pod, dst: SocketAddr, n: usize) -> (u64, u64) {
    let mut c = tcp_connect(client, dst, common::T).expect("connect through the mesh");
    c.stream.write_all(&vec![1u8; n]).expect("send");
    c.stream.shutdown(Shutdown::Write).expect("half-close");
    let mut got = Vec::new();
    c.stream.read_to_end(&mut got).expect("receive");
    assert_eq!(got.len(), n * REPLY_FACTOR, "the whole answer came back");
    (n as u64, got.len() as u64)
}

/// On both tiers, the same figures for the same traffic. On the kernel tier peer a's first
/// connection is proxied (and hands the peer over) and the other four go direct: the kernel
/// counts them (connections, bytes at close) in the same schema, and what differs is only
/// where a connection went: `redirects` (proxied) and `direct`, the tier, and the agent's own
/// state in SM_PEER_STATE, which holds the proxied connection alone.
#[test]
fn cli_metrics_and_bpftool_agree_exactly_with_the_traffic_sent() {
    exact_figures(Tier::Proxy);
}

#[test]
fn cli_metrics_and_bpftool_agree_exactly_with_the_traffic_sent_on_the_kernel_tier() {
    exact_figures(Tier::Kernel);
}

fn exact_figures(tier: Tier) {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let client = cluster.add_pod("client").expect("pod");
    let server = cluster.add_pod("server").expect("pod");
    let (a, b) = (server.addr4(8080), server.addr4(8081));
    start_reply_server(&server, a).expect("server a");
    start_reply_server(&server, b).expect("server b");
    let agent = tier.agent(&client, &[]);
    let metrics = agent.metrics_addr().expect("metrics address");
    let pod = client.netns_path().display().to_string();

    let (mut sent_a, mut recv_a) = (0, 0);
    let mut first = (0, 0);
    for n in [1, 1000, 70_000, 333, 4096] {
        let (s, r) = exchange(&client, a, n);
        if sent_a == 0 {
            first = (s, r);
        }
        sent_a += s;
        recv_a += r;
    }
    // Peer a's connections the proxy saw, and those that went direct; b has one, proxied.
    let (proxied_a, direct_a, tier_a): (u64, u64, &str) = match tier {
        Tier::Proxy => (5, 0, "proxy"),
        Tier::Kernel => (1, 4, "kernel"),
    };
    let (sent_b, recv_b) = exchange(&client, b, 12_345);

    let (pa, pb) = (a.to_string(), b.to_string());
    let prom = scrape_until(metrics, |s| {
        metric(s, "sockmesh_peer_connections_total", &pod, &pa) == 5.0
            && metric(s, "sockmesh_peer_connections_total", &pod, &pb) == 1.0
            && metric(s, "sockmesh_peer_connections_active", &pod, &pa) == 0.0
            && metric(s, "sockmesh_peer_connections_active", &pod, &pb) == 0.0
    });
    let m = |name: &str, peer: &str| metric(&prom, name, &pod, peer);
    assert_eq!(m("sockmesh_peer_connections_total", &pa), 5.0);
    assert_eq!(m("sockmesh_peer_connections_active", &pa), 0.0);
    assert_eq!(m("sockmesh_peer_sent_bytes_total", &pa), sent_a as f64);
    assert_eq!(m("sockmesh_peer_received_bytes_total", &pa), recv_a as f64);
    assert_eq!(
        m("sockmesh_peer_kernel_redirects_total", &pa),
        proxied_a as f64
    );
    assert_eq!(m("sockmesh_peer_connections_total", &pb), 1.0);
    assert_eq!(m("sockmesh_peer_sent_bytes_total", &pb), sent_b as f64);
    assert_eq!(m("sockmesh_peer_received_bytes_total", &pb), recv_b as f64);
    assert_eq!(m("sockmesh_peer_connect_failures_total", &pa), 0.0);
    let redirects: f64 = prom
        .iter()
        .filter(|s| {
            s.name == "sockmesh_kernel_events_total"
                && s.label("pod") == Some(pod.as_str())
                && s.label("event") == Some("redirect_tcp")
        })
        .map(|s| s.value)
        .sum();
    assert_eq!(redirects, (proxied_a + 1) as f64);

    // The CLI reads the same maps (the scrape above flushed them).
    let peers = agent.read_json("peers", &["--pod", &pod]).expect("peers");
    let ra = peer_row(&peers, &pa);
    assert_eq!(ra["direction"], "outbound");
    assert_eq!(ra["pod"], pod.as_str());
    assert_eq!(ra["conns_total"], 5);
    assert_eq!(ra["conns_active"], 0);
    assert_eq!(ra["bytes_out"], sent_a);
    assert_eq!(ra["bytes_in"], recv_a);
    assert_eq!(ra["redirects"], proxied_a);
    assert_eq!(ra["direct"], direct_a);
    assert_eq!(ra["tier"], tier_a, "{ra}");
    assert_eq!(
        peer_row(&peers, &pb)["tier"],
        tier_a,
        "b's one connection decided it too"
    );
    assert_eq!(ra["breaker"], "closed");
    assert!(
        ra["connect_p50_us"].as_u64().expect("p50") > 0,
        "latency kept"
    );
    assert_eq!(peer_row(&peers, &pb)["bytes_out"], sent_b);
    // Sorted by traffic: the busier peer first.
    assert_eq!(peers["peers"][0]["peer"], pa.as_str());
    let only_b = agent
        .read_json("peers", &["--peer", ":8081"])
        .expect("peers");
    assert_eq!(only_b["peers"].as_array().expect("rows").len(), 1);
    let pods = agent.read_json("pods", &[]).expect("pods");
    let row = &pods["pods"][0];
    assert_eq!(row["pod"], pod.as_str());
    assert_eq!(
        (row["conns_total"].as_u64(), row["peers"].as_u64()),
        (Some(6), Some(2))
    );
    let stats = agent.read_json("stats", &[]).expect("stats");
    assert_eq!(stats["totals"]["bytes_out"], sent_a + sent_b);
    assert_eq!(stats["totals"]["kernel"]["redirect_tcp"], proxied_a + 1);

    // bpftool, with nothing of sockmesh in between, reads the same bytes.
    let cookie = client.netns_cookie().expect("cookie");
    let state = bpftool_dump(&agent.bpffs_dir().join("SM_PEER_STATE")).expect("dump state");
    let key = peer_key_bytes(cookie, a);
    let (_, v) = state
        .iter()
        .find(|(k, _)| *k == key)
        .expect("peer a in SM_PEER_STATE");
    // conns_active, conns_total, bytes_out, bytes_in: the agent's own, of proxied connections.
    let agent_saw = match tier {
        Tier::Proxy => [0, 5, sent_a, recv_a],
        Tier::Kernel => [0, 1, first.0, first.1],
    };
    assert_eq!(&v[..4], &agent_saw);
    let kernel = bpftool_dump(&agent.bpffs_dir().join("SM_PEER_STATS")).expect("dump stats");
    let (_, v) = kernel
        .iter()
        .find(|(k, _)| *k == key)
        .expect("peer a in SM_PEER_STATS");
    assert_eq!(v[0], proxied_a, "redirects summed over CPUs");
    // direct, conns, closed, bytes out, bytes in: what the kernel tier counted itself.
    let kernel_saw = match tier {
        Tier::Proxy => [0, 0, 0, 0, 0],
        Tier::Kernel => [4, 4, 4, sent_a - first.0, recv_a - first.1],
    };
    assert_eq!(&v[3..8], &kernel_saw, "the kernel tier's own counters");
}

#[test]
fn metrics_cardinality_stays_bounded_with_1000_peers() {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let client = cluster.add_pod("client").expect("pod");
    let server = cluster.add_pod("server").expect("pod");
    let agent = Agent::start([
        "--pod",
        &pod_spec(&client, ""),
        "--metrics-top-peers",
        "10",
        "--adaptive-k",
        "off",
    ])
    .expect("agent");
    agent.wait_ready().expect("ready");
    let metrics = agent.metrics_addr().expect("metrics address");
    let pod = client.netns_path().display().to_string();
    // 1000 distinct peers: ports where nothing listens. The agent's upstream connect is
    // refused at once, so each is one quick connect failure for a different peer.
    let base = server.ip4();
    client.run(|| {
        for port in 20_000..21_000u16 {
            if let Ok(mut s) =
                TcpStream::connect_timeout(&SocketAddr::new(base.into(), port), common::T)
            {
                let _ = s.set_read_timeout(Some(common::T));
                let _ = s.read(&mut [0u8; 1]);
            }
        }
    });
    let failures = |s: &[Sample]| -> f64 {
        s.iter()
            .filter(|s| {
                s.name == "sockmesh_peer_connect_failures_total"
                    && s.label("pod") == Some(pod.as_str())
            })
            .map(|s| s.value)
            .sum()
    };
    let prom = scrape_until(metrics, |s| failures(s) == 1000.0);
    assert_eq!(
        failures(&prom),
        1000.0,
        "every failure counted, folded or not"
    );
    let labels: BTreeSet<&str> = prom
        .iter()
        .filter(|s| s.name == "sockmesh_peer_connect_failures_total")
        .filter_map(|s| s.label("peer"))
        .collect();
    assert_eq!(labels.len(), 11, "10 peers and other: {labels:?}");
    assert!(labels.contains("other"));
    let series = prom
        .iter()
        .filter(|s| s.name.starts_with("sockmesh_peer_"))
        .count();
    assert!(series < 300, "{series} per-peer series for 1000 peers");
    let tracked = prom
        .iter()
        .find(|s| s.name == "sockmesh_peers" && s.label("kind") == Some("tracked"))
        .expect("sockmesh_peers");
    assert_eq!(tracked.value, 1000.0);
    // The CLI is not capped: every peer has its row.
    let peers = agent
        .read_json("peers", &["--sort", "failures"])
        .expect("peers");
    assert_eq!(peers["peers"].as_array().expect("rows").len(), 1000);
}

/// On both tiers: an agent starting on the pins takes back what the previous one handed to
/// the kernel, so on the kernel tier the first connection after the restart is proxied again.
#[test]
fn figures_outlive_the_agent_and_continue_after_a_restart() {
    figures_outlive(Tier::Proxy);
}

#[test]
fn figures_outlive_the_agent_and_continue_after_a_restart_on_the_kernel_tier() {
    figures_outlive(Tier::Kernel);
}

fn figures_outlive(tier: Tier) {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let client = cluster.add_pod("client").expect("pod");
    let server = cluster.add_pod("server").expect("pod");
    let dst = server.addr4(8080);
    start_reply_server(&server, dst).expect("server");
    let args = [
        "--pod".to_string(),
        pod_spec(&client, ""),
        "--keep-pins".into(),
        tier.flags()[0].into(),
        tier.flags()[1].into(),
    ];
    let mut agent = Agent::start(&args).expect("agent");
    agent.wait_ready().expect("ready");
    let (s1, _) = exchange(&client, dst, 100);
    let (s2, _) = exchange(&client, dst, 200);
    let dir = agent.bpffs();
    assert!(agent.stop().expect("stop").success());
    // Stopped: the final flush ran after the drain, so the figures are exact now.
    let peers = read_json(dir.path(), "peers", &[]).expect("peers with the agent down");
    let row = peer_row(&peers, &dst.to_string());
    assert_eq!(
        (row["conns_total"].as_u64(), row["bytes_out"].as_u64()),
        (Some(2), Some(s1 + s2))
    );
    let pods = read_json(dir.path(), "pods", &[]).expect("pods");
    assert_eq!(pods["pods"][0]["enrolled"], false);
    assert!(pods["pods"][0]["removed_unix_ms"].as_u64().expect("ms") > 0);
    drop(agent);

    let mut again = Agent::start_in(dir.clone(), &args).expect("restart");
    again.wait_ready().expect("ready");
    let (s3, _) = exchange(&client, dst, 300);
    assert!(again.stop().expect("stop").success());
    let peers = read_json(dir.path(), "peers", &[]).expect("peers");
    let row = peer_row(&peers, &dst.to_string());
    assert_eq!(row["conns_total"], 3, "continued, not restarted: {row}");
    assert_eq!(row["bytes_out"], s1 + s2 + s3);
    // Proxied: every connection, or (kernel tier) the first before and after the restart.
    let proxied = match tier {
        Tier::Proxy => 3,
        Tier::Kernel => 2,
    };
    assert_eq!(row["redirects"], proxied, "{row}");
    assert_eq!(row["direct"], 3 - proxied, "{row}");
}

#[test]
fn health_endpoints_and_json_logs() {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let client = cluster.add_pod("client").expect("pod");
    let agent =
        Agent::start(["--pod", &pod_spec(&client, ""), "--log-format", "json"]).expect("agent");
    agent.wait_ready().expect("ready");
    let addr = agent.metrics_addr().expect("metrics address");
    assert_eq!(http_get(addr, "/healthz").expect("healthz").0, 200);
    assert_eq!(http_get(addr, "/readyz").expect("readyz").0, 200);
    assert_eq!(http_get(addr, "/nope").expect("404").0, 404);
    let prom = scrape(addr).expect("metrics");
    let ready = prom
        .iter()
        .find(|s| s.name == "sockmesh_ready")
        .expect("ready gauge");
    assert_eq!(ready.value, 1.0);
    // Every log line is one JSON object; enrolment is a structured event.
    let log = agent.stderr();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    assert!(lines.iter().any(|l| l["event"] == "pod_enrolled"
        && l["pod"] == client.netns_path().display().to_string().as_str()));
}

#[test]
fn bad_metrics_address_and_unknown_schema_are_refused() {
    require_root();
    // A taken port: one clear error, nothing loaded or pinned.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = BpfFsDir::new().expect("bpffs dir");
    let pins = dir.path().join("pins");
    let (status, _, err) = Agent::run_to_exit([
        "run",
        "--metrics-addr",
        &addr,
        "--bpffs-dir",
        pins.to_str().expect("utf-8"),
    ])
    .expect("run");
    assert!(!status.success());
    assert!(
        err.contains(&format!(
            "sockmesh: error: --metrics-addr {addr}: cannot listen"
        )),
        "{err}"
    );
    assert!(!pins.exists(), "nothing pinned");

    // Maps of a schema this binary does not know are refused by every reader.
    let cluster = Cluster::new().expect("cluster");
    let client = cluster.add_pod("client").expect("pod");
    let mut agent = Agent::start(["--pod", &pod_spec(&client, ""), "--keep-pins"]).expect("agent");
    agent.wait_ready().expect("ready");
    let dir = agent.bpffs();
    assert!(agent.stop().expect("stop").success());
    let config = dir.path().join("SM_CONFIG");
    // schema_version is GlobalConfig's first u32; the rest of the value stays zero.
    let mut cmd = std::process::Command::new("bpftool");
    cmd.args(["map", "update", "pinned"])
        .arg(&config)
        .args(["key", "0", "0", "0", "0", "value", "99", "0", "0", "0"]);
    cmd.args(std::iter::repeat_n(
        "0",
        std::mem::size_of::<sockmesh_common::GlobalConfig>() - 4,
    ));
    let out = cmd.output().expect("bpftool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for what in ["stats", "peers", "pods"] {
        let e = read_json(dir.path(), what, &[]).expect_err("refused");
        assert!(
            format!("{e:#}").contains(&format!(
                "schema version 99, this sockmesh understands {}",
                sockmesh_common::SCHEMA_VERSION
            )),
            "{what}: {e:#}"
        );
    }
}

/// "Which peer of which pod is being throttled, and why" from one command: a rate-limited
/// peer and a failing peer whose breaker opened, each with its reason and exact counts.
///
/// On both tiers, the same throttled counts: every refused attempt is throttled, wherever it
/// was refused. On the kernel tier the limited peer goes direct after its first connection,
/// and the kernel's bucket refuses the third to fifth at connect(); on the proxy tier the
/// agent resets the third and its verdict refuses the next two in the kernel (so one fewer
/// fast reject), and the kernel tier keeps no last error. The dead peer never succeeds, so it
/// stays on the proxy either way, and the kernel's refusal while its breaker is open is
/// throttled by the breaker.
#[test]
fn peers_shows_which_peer_is_throttled_and_why() {
    throttled_and_why(Tier::Proxy);
}

#[test]
fn peers_shows_which_peer_is_throttled_and_why_on_the_kernel_tier() {
    throttled_and_why(Tier::Kernel);
}

fn throttled_and_why(tier: Tier) {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let client = cluster.add_pod("client").expect("pod");
    let server = cluster.add_pod("server").expect("pod");
    let limited = server.addr4(8080);
    start_reply_server(&server, limited).expect("server");
    let agent = tier.agent(
        &client,
        &[
            "--peer-conn-rate",
            "1/h",
            "--peer-conn-burst",
            "2",
            "--breaker-failures",
            "2",
            "--adaptive-k",
            "off",
        ],
    );
    let metrics = agent.metrics_addr().expect("metrics address");
    // Two pass; on the proxy tier the third is reset by the agent, which then tells the
    // kernel the bucket is empty, so the fourth and fifth connect() fail at once in the
    // kernel. On the kernel tier the kernel's own bucket refuses all three at connect().
    let throttled = 3;
    let (fast_rejects, last_error) = match tier {
        Tier::Proxy => (2, "throttled"),
        Tier::Kernel => (3, "none"),
    };
    for i in 0..5 {
        if i < 2 {
            exchange(&client, limited, 10);
        } else if i == 2 && tier == Tier::Proxy {
            // The agent accepts and resets it; the reset may already be there when the
            // connect completes.
            match tcp_connect(&client, limited, common::T) {
                Ok(mut c) => {
                    let n = c.stream.read(&mut [0u8; 1]);
                    assert!(
                        matches!(n, Ok(0) | Err(_)),
                        "a throttled connection gets no data"
                    );
                }
                // Reset before getpeername() ran: ENOTCONN. Either way not refused.
                Err(e) => assert!(
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::NotConnected
                    ),
                    "{e}"
                ),
            }
        } else {
            let e = tcp_connect(&client, limited, common::T).expect_err("refused in the kernel");
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
        }
    }
    // Nothing listens on 9: two refused connects open the breaker; the third connect()
    // fails in the kernel.
    let dead = server.addr4(9);
    for _ in 0..2 {
        if let Ok(mut c) = tcp_connect(&client, dead, common::T) {
            let _ = c.stream.read(&mut [0u8; 1]);
        }
    }
    let (pl, pd) = (limited.to_string(), dead.to_string());
    let pod = client.netns_path().display().to_string();
    let prom = scrape_until(metrics, |s| {
        metric(s, "sockmesh_peer_breaker_open", &pod, &pd) == 1.0
            && metric(s, "sockmesh_peer_throttled_total", &pod, &pl) == throttled as f64
    });
    let e = tcp_connect(&client, dead, common::T).expect_err("refused in the kernel");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    let rate = prom
        .iter()
        .find(|s| {
            s.name == "sockmesh_peer_throttled_total"
                && s.label("peer") == Some(pl.as_str())
                && s.label("reason") == Some("rate")
        })
        .expect("rate series");
    assert_eq!(rate.value, throttled as f64);

    let peers = agent
        .read_json("peers", &["--sort", "throttled"])
        .expect("peers");
    let first = &peers["peers"][0];
    assert_eq!(first["peer"], pl.as_str(), "the throttled peer sorts first");
    assert_eq!(first["throttled"]["rate"], throttled);
    assert_eq!(first["fast_rejects"], fast_rejects);
    assert_eq!(first["conns_total"], 2);
    assert_eq!(first["last_error"], last_error);
    let d = peer_row(&peers, &pd);
    assert_eq!(d["connect_failures"], 2);
    assert_eq!(d["last_error"], "connect_refused");
    assert_eq!(d["breaker"], "open");
    assert_eq!(d["fast_rejects"], 1);
    assert_eq!(
        d["throttled"]["breaker"], 1,
        "refused by the open breaker: {d}"
    );
    // The human table says the same in one row per peer.
    let dir = agent.bpffs_dir().to_string_lossy().into_owned();
    let (status, table, _) =
        Agent::run_to_exit(["peers", "--bpffs-dir", &dir, "--sort", "throttled"]).expect("peers");
    assert!(status.success());
    let row = table.lines().nth(1).expect("first row");
    assert!(
        row.contains(&pl)
            && row.contains(&format!("rate={throttled}"))
            && (tier == Tier::Kernel || row.contains("throttled")),
        "{table}"
    );
}
