//! A DaemonSet rollout, for real: the old pod's container serving, the new pod's container
//! started beside it from the same generated spec (as `maxSurge: 1` does), on the same node
//! (its bpffs and `/run/sockmesh` host paths, its address and probe port), while a meshed pod
//! connects out and an unmeshed pod connects in, in loops, through the switch. Then the old
//! pod is deleted (SIGTERM) once the new one is ready, as the DaemonSet controller does.
//!
//! What a real node would add that this does not play: the controller and kubelet deciding
//! when (here the test waits for the same conditions: the new pod ready, then the old one
//! deleted). See `container.rs` for what else differs from a node, and why.
mod common;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{client_loop, StopOnDrop, Tally, T};
use sockmesh_tests::daemonset::{build_image, DaemonSetPod};
use sockmesh_tests::kubepod::KubePod;
use sockmesh_tests::manifest::{repo_manifest_path, Manifest};
use sockmesh_tests::node::Node;
use sockmesh_tests::prom::http_get;
use sockmesh_tests::*;

const MESH: &str = "sockmesh.io/mesh";
const KT: Duration = Duration::from_secs(60);
const PORT: u16 = 8080;
/// Connections counted in each phase of each loop.
const PHASE: usize = 20;

/// Inbound connections to `pod` the agent counted, from the pinned maps `sockmesh peers` reads
/// (the node address serves only the probes: /metrics is off in the shipped DaemonSet).
fn inbound_total(agent: &Agent, pod: &str) -> u64 {
    let peers = agent.read_json("peers", &[]).expect("sockmesh peers");
    peers["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["pod"] == pod && r["direction"] == "inbound")
        .filter_map(|r| r["conns_total"].as_u64())
        .sum()
}

fn report(what: &str, t: &Tally) {
    eprintln!(
        "[rollout] {what}: captured {} other {} failed {}",
        t.captured,
        t.direct,
        t.failures.len()
    );
}

#[test]
fn a_rollout_hands_over_with_no_connection_refused_or_reset() {
    require_root();
    let manifest = Manifest::load(&repo_manifest_path()).expect("deploy/sockmesh.yaml");
    // The strategy this test plays: the new pod first, the old one deleted once it is ready.
    let rolling = manifest
        .daemonset
        .spec
        .update_strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref())
        .expect("a rollingUpdate strategy");
    let count = |v: &Option<serde_yaml_ng::Value>| v.as_ref().and_then(|v| v.as_u64());
    assert_eq!(count(&rolling.max_surge), Some(1), "{rolling:?}");
    assert_eq!(count(&rolling.max_unavailable), Some(0), "{rolling:?}");
    let image = build_image(&manifest).expect("the image, from the Dockerfile");

    let node = Node::new().expect("node");
    let api = FakeKubeApi::start_https().expect("fake API server");
    let cluster = Cluster::new().expect("cluster");
    api.add_namespace("shop", &[(MESH, "enabled")]);
    api.add_namespace("plain", &[]);
    let client = KubePod::new(&cluster, "client", "shop", &node.name, Driver::Systemd);
    let web = KubePod::new(&cluster, "web", "shop", &node.name, Driver::Cgroupfs);
    let outsider = KubePod::new(&cluster, "outsider", "plain", &node.name, Driver::Systemd);
    for p in [&client, &web, &outsider] {
        api.add_pod(&p.obj);
    }
    let any = |p: u16| SocketAddr::from(([0, 0, 0, 0], p));
    // Meshed servers keep their wildcard binds: web's is steered to the agent (inbound), the
    // outsider's is reached by the meshed client through its agent (outbound).
    let _web_app = TcpServer::start(&web.pod, any(PORT)).expect("echo in web");
    let _outsider_app = TcpServer::start(&outsider.pod, any(PORT)).expect("echo in outsider");

    let mut old = DaemonSetPod::start(&node, &manifest, &image, &api).expect("the old pod");
    {
        let a = old.container.agent();
        a.wait_ready().expect("the old agent starts");
        for p in [&client, &web] {
            a.wait_event(|v| v["event"] == "pod_enrolled" && v["id"] == p.uid(), KT)
                .unwrap_or_else(|e| panic!("{} never enrolled: {e:#}", p.obj.name));
        }
        a.wait_event(
            |v| v["event"] == "inbound_listening" && v["port"] == PORT,
            KT,
        )
        .expect("web's server is captured");
    }
    // Asked once the container runs (runc knows its pid only then).
    let old_pid = old.container.pid().expect("old pid");
    let c = manifest.container().expect("container");
    let readiness = c.readiness_probe.as_ref().expect("readiness probe");
    let liveness = c.liveness_probe.as_ref().expect("liveness probe");
    let (probe, ready_path) = old.probe_target(&manifest, readiness).expect("probe");

    let out_dst = outsider.pod.addr4(PORT);
    let in_dst = web.pod.addr4(PORT);
    let (stop_out, stop_in) = (AtomicBool::new(false), AtomicBool::new(false));
    let (tx_out, rx_out) = mpsc::channel();
    let (tx_in, rx_in) = mpsc::channel();
    let (outbound, inbound, new, switch) = std::thread::scope(|s| {
        let out_loop = s.spawn(|| client_loop(&client.pod, out_dst, &stop_out, tx_out));
        let in_loop = s.spawn(|| client_loop(&outsider.pod, in_dst, &stop_in, tx_in));
        let _stoppers = (StopOnDrop(&stop_out), StopOnDrop(&stop_in));
        let progress = |what: &str| {
            for rx in [&rx_out, &rx_in] {
                for i in 0..PHASE {
                    rx.recv_timeout(T * 2)
                        .unwrap_or_else(|e| panic!("{what}: attempt {i} made no progress: {e}"));
                }
            }
        };
        progress("before the rollout");

        // The new pod: the same manifest, the same generated spec, the same node.
        let started = Instant::now();
        let new = DaemonSetPod::start(&node, &manifest, &image, &api).expect("the new pod");
        let ready = new.container.agent().wait_ready().expect("the new agent");
        let switch = started.elapsed();
        assert_eq!(
            ready["took_over_from"].as_u64(),
            Some(u64::from(old_pid)),
            "the new pod takes over from the old one: {ready}"
        );
        let old_agent = old.container.agent();
        old_agent
            .wait_event_named("handed_over", T)
            .expect("the old agent hands over");
        progress("during the overlap");

        // The old agent drains and then stays: had it exited, the kubelet would restart it.
        old_agent
            .wait_event_named("idle", T * 4)
            .expect("the old agent drains and waits for its pod's deletion");
        let drained = old_agent
            .events()
            .into_iter()
            .find(|e| e["event"] == "drained")
            .expect("drained event");
        assert_eq!(drained["reset"], 0, "the old agent reset no connection");
        assert!(old_agent.is_running(), "the old container still runs");
        // The node's probe port answers for the new pod: one socket, handed over, now the
        // new agent's (binding its own would have failed: the old one still held the port).
        let log = new.container.agent().stderr();
        assert!(
            log.contains("serving HTTP on the old agent's listener"),
            "{log}"
        );
        let (code, _) = http_get(probe, &ready_path).expect("readiness probe");
        assert_eq!(code, 200, "the new pod is ready");

        // The controller deletes the old pod: SIGTERM, and it is gone at once, exit 0.
        let t = Instant::now();
        let status = old
            .container
            .stop(DaemonSetPod::grace(&manifest))
            .expect("the old container stops");
        assert!(
            status.success(),
            "old container: {status}\n{}",
            old.container.agent().stderr()
        );
        eprintln!(
            "[rollout] new agent ready {switch:?} after its container started; old container exited {:?} after SIGTERM",
            t.elapsed()
        );
        progress("after the old pod is gone");
        drop(_stoppers);
        (
            out_loop.join().expect("outbound loop"),
            in_loop.join().expect("inbound loop"),
            new,
            switch,
        )
    });
    report("outbound", &outbound);
    report("inbound", &inbound);
    assert!(
        outbound.failures.is_empty() && inbound.failures.is_empty(),
        "connections refused or reset through the rollout:\noutbound {:#?}\ninbound {:#?}",
        outbound.failures,
        inbound.failures
    );
    // As shipped (`--fast-path=auto`) a connection to a kernel-tier peer goes direct, policed
    // in connect() and counted `direct`; one that escaped the mesh (fail-open, a pod no agent
    // enrolled) would be counted neither redirected nor direct.
    let agent = new.container.agent();
    assert!(
        common::meshed(agent, "shop/client", out_dst)
            >= (outbound.captured + outbound.direct) as u64,
        "every outbound connection was redirected or policed direct: {outbound:?}"
    );
    assert_eq!(
        common::counter(agent, &client.pod, "bypass_stale"),
        0,
        "none failed open"
    );
    assert!(switch < KT, "{switch:?}");

    // The new pod serves on its own: probes 200, outbound meshed, inbound proxied.
    for p in [readiness, liveness] {
        let (addr, path) = new.probe_target(&manifest, p).expect("probe target");
        let (code, _) = http_get(addr, &path).expect("probe");
        assert_eq!(code, 200, "GET {addr}{path}");
    }
    let meshed = common::meshed(agent, "shop/client", out_dst);
    let mut c = tcp_connect(&client.pod, out_dst, T).expect("connect out");
    tcp_echo_roundtrip(&mut c.stream, b"out").expect("echo");
    assert_eq!(
        common::meshed(agent, "shop/client", out_dst),
        meshed + 1,
        "outbound redirected or policed direct by the new agent's programs"
    );
    let before = inbound_total(agent, "shop/web");
    let mut conn = tcp_connect(&outsider.pod, in_dst, T).expect("connect in");
    tcp_echo_roundtrip(&mut conn.stream, b"after").expect("echo through the new agent");
    drop(conn);
    // Counted once the agent flushes (every second): wait for it, bounded.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut after = inbound_total(agent, "shop/web");
    while after <= before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        after = inbound_total(agent, "shop/web");
    }
    assert!(
        after > before,
        "the new agent proxies inbound: {before} -> {after}"
    );
    let pins = agent.bpffs_dir().to_path_buf();
    assert!(
        pins.join("SM_PODS").exists(),
        "the pins stayed across the switch"
    );

    // Uninstall: SIGTERM and no successor within --handover-wait. Everything is removed.
    let mut new = new;
    let status = new
        .container
        .stop(DaemonSetPod::grace(&manifest))
        .expect("the new container stops");
    assert!(status.success(), "new container: {status}");
    let agent = new.container.agent();
    agent
        .wait_event_named("no_successor", T)
        .expect("it waited for a successor first");
    assert!(
        !pins.exists() || std::fs::read_dir(&pins).is_ok_and(|mut d| d.next().is_none()),
        "{} left behind by an uninstall",
        pins.display()
    );
}
