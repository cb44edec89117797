//! `sockmesh run --kube` against a fake Kubernetes API server (real HTTP, list + watch with
//! resource versions, 410 Gone, outages) and real test pods whose processes sit in cgroups
//! named the way the kubelet names them, so the agent finds each pod's namespace through its
//! real resolver (pod UID in /proc/*/cgroup -> /proc/PID/ns/net).
mod common;
mod policy_util;

use common::redirected;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use sockmesh_tests::kubepod::KubePod;
use sockmesh_tests::names::unique_name;
use sockmesh_tests::*;

/// Generous: the agent's first list, or its watch retrying with backoff after an outage.
const KT: Duration = Duration::from_secs(60);
const MESH: &str = "sockmesh.io/mesh";

/// A cluster with a server pod (echo on 8080), a fake API server and a fresh node name.
struct World {
    cluster: Cluster,
    server_pod: Pod,
    _server: TcpServer,
    dst: SocketAddr,
    api: FakeKubeApi,
    node: String,
}

impl World {
    fn new() -> World {
        require_root();
        let cluster = Cluster::new().expect("cluster");
        let server_pod = cluster.add_pod("server").expect("pod");
        let server =
            TcpServer::start(&server_pod, "0.0.0.0:8080".parse().expect("addr")).expect("server");
        World {
            dst: server_pod.addr4(8080),
            cluster,
            server_pod,
            _server: server,
            api: FakeKubeApi::start().expect("fake api"),
            node: unique_name(),
        }
    }
}

fn kube_agent(api: &FakeKubeApi, node: &str) -> Agent {
    kube_agent_with(api, node, &[])
}

fn kube_agent_with(api: &FakeKubeApi, node: &str, extra: &[&str]) -> Agent {
    let url = api.url();
    // Proxy tier: tells enrolment by the app's loopback end, so every connection must reach
    // the agent.
    let mut args = vec![
        "--kube",
        "--kube-api",
        &url,
        "--node-name",
        node,
        "--fast-path",
        "off",
    ];
    args.extend_from_slice(extra);
    let agent = Agent::start(args).expect("agent");
    agent.wait_ready().expect("ready");
    agent
}

fn wait_enrolled(agent: &Agent, uid: &str) -> Value {
    agent
        .wait_event(|v| v["event"] == "pod_enrolled" && v["id"] == uid, KT)
        .unwrap_or_else(|e| panic!("pod {uid} never enrolled: {e:#}"))
}

fn wait_removed(agent: &Agent, uid: &str) -> Value {
    agent
        .wait_event(|v| v["event"] == "pod_removed" && v["id"] == uid, KT)
        .unwrap_or_else(|e| panic!("pod {uid} never removed: {e:#}"))
}

fn ids_of(agent: &Agent, event: &str) -> Vec<String> {
    agent
        .events()
        .iter()
        .filter(|v| v["event"] == event)
        .filter_map(|v| v["id"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn an_opted_in_pod_is_redirected_and_opting_out_or_deleting_it_stops_that() {
    let w = World::new();
    let (cluster, api, node, dst) = (&w.cluster, &w.api, w.node.as_str(), w.dst);
    api.add_namespace("shop", &[(MESH, "enabled")]);
    let agent = kube_agent(api, node);
    agent.wait_event_named("kube_synced", KT).expect("synced");

    let app = KubePod::new(cluster, "app", "shop", node, Driver::Systemd);
    assert!(!redirected(&app.pod, dst), "not in the API yet: not meshed");

    api.add_pod(&app.obj);
    let ev = wait_enrolled(&agent, app.uid());
    assert_eq!(ev["pod"], "shop/app");
    assert_eq!(
        ev["netns_cookie"].as_u64(),
        Some(app.pod.netns_cookie().expect("cookie"))
    );
    assert!(
        redirected(&app.pod, dst),
        "an opted-in pod goes through the agent"
    );

    api.set_pod_annotations(&app.obj.clone().annotate(MESH, "disabled"));
    let ev = wait_removed(&agent, app.uid());
    assert_eq!(ev["reason"], "opted out by annotation");
    assert!(!redirected(&app.pod, dst), "opted out: direct again");

    api.set_pod_annotations(&app.obj);
    wait_enrolled(&agent, app.uid());
    assert!(redirected(&app.pod, dst), "opted back in");

    api.delete_pod(&app.obj);
    let ev = wait_removed(&agent, app.uid());
    assert_eq!(ev["reason"], "pod deleted");
    assert!(!redirected(&app.pod, dst), "deleted: direct again");

    // The namespace label going away opts out every pod in it.
    let other = KubePod::new(cluster, "other", "shop", node, Driver::Cgroupfs);
    api.add_pod(&other.obj);
    wait_enrolled(&agent, other.uid());
    api.add_namespace("shop", &[]);
    let ev = wait_removed(&agent, other.uid());
    assert_eq!(ev["reason"], "namespace not opted in");
    assert!(agent.is_running());
}

/// A pod that leaves and comes back starts with fresh per-peer policy state: a breaker it
/// tripped before leaving is closed again, so its first connect to the (now healthy) peer
/// goes through instead of being refused for the rest of the open period.
#[test]
fn a_removed_and_re_enrolled_pod_starts_with_fresh_policy_state() {
    let w = World::new();
    let (cluster, api, node) = (&w.cluster, &w.api, w.node.as_str());
    api.add_namespace("shop", &[(MESH, "enabled")]);
    let agent = Agent::start([
        "--kube",
        "--kube-api",
        &api.url(),
        "--node-name",
        node,
        "--breaker-failures",
        "2",
        "--breaker-open",
        "300s",
        // Only the breaker: adaptive throttling's coin would make the attempt count vary.
        "--adaptive-k",
        "off",
    ])
    .expect("agent");
    agent.wait_ready().expect("ready");
    agent.wait_event_named("kube_synced", KT).expect("synced");
    let app = KubePod::new(cluster, "app", "shop", node, Driver::Systemd);
    api.add_pod(&app.obj);
    wait_enrolled(&agent, app.uid());

    // Nothing listens there yet: refused upstream connects trip the breaker, then the kernel
    // refuses connect() itself.
    let peer = w.server_pod.addr4(9300);
    let outcomes: String = (0..3)
        .map(|_| policy_util::attempt(&app.pod, peer).letter())
        .collect();
    assert_eq!(outcomes, "RRK", "two failures open the breaker");
    let _server = TcpServer::start(&w.server_pod, peer).expect("the peer comes up");
    assert_eq!(
        policy_util::attempt(&app.pod, peer).letter(),
        'K',
        "open for 300 s"
    );

    api.set_pod_annotations(&app.obj.clone().annotate(MESH, "disabled"));
    wait_removed(&agent, app.uid());
    api.set_pod_annotations(&app.obj);
    wait_enrolled(&agent, app.uid());
    let c = policy_util::attempt(&app.pod, peer).admitted();
    assert!(
        c.local.ip().is_loopback(),
        "fresh breaker: admitted through the agent"
    );
    // The pinned state agrees once the agent has flushed this connection.
    let p = peer.to_string();
    let peers = common::peers_until(&agent, &["--pod", "shop/app"], |v| {
        common::find_peer(v, &p).is_some_and(|r| r["breaker"] == "closed")
    });
    let row = common::peer_row(&peers, &p);
    assert_eq!(row["breaker"], "closed", "{row}");
}

#[test]
fn pods_running_before_the_agent_are_enrolled_and_only_the_opted_in_ones() {
    let w = World::new();
    let (cluster, api, node, dst) = (&w.cluster, &w.api, w.node.as_str(), w.dst);
    api.add_namespace("shop", &[(MESH, "enabled")]);
    api.add_namespace("plain", &[]);

    let labelled = KubePod::new(cluster, "labelled", "shop", node, Driver::Systemd);
    let plain = KubePod::new(cluster, "plain", "plain", node, Driver::Systemd);
    let annotated = KubePod::new(cluster, "annotated", "plain", node, Driver::Cgroupfs);
    let opted_out = KubePod::new(cluster, "optedout", "shop", node, Driver::Systemd);
    let host = KubePod::new(cluster, "host", "shop", node, Driver::Systemd);
    let elsewhere = KubePod::new(
        cluster,
        "elsewhere",
        "shop",
        "another-node",
        Driver::Systemd,
    );
    api.add_pod(&labelled.obj);
    api.add_pod(&plain.obj);
    api.add_pod(&annotated.obj.clone().annotate(MESH, "enabled"));
    api.add_pod(&opted_out.obj.clone().annotate(MESH, "disabled"));
    api.add_pod(&host.obj.clone().host_network());
    api.add_pod(&elsewhere.obj);

    let agent = kube_agent(api, node);
    let synced = agent.wait_event_named("kube_synced", KT).expect("synced");
    let mut enrolled = ids_of(&agent, "pod_enrolled");
    enrolled.sort();
    let mut want = vec![labelled.uid().to_string(), annotated.uid().to_string()];
    want.sort();
    assert_eq!(enrolled, want, "exactly the opted-in pods of this node");
    assert_eq!(synced["pods"], 2);
    // Only this node's pods were asked for.
    assert!(
        api.requests()
            .iter()
            .any(|r| r.starts_with("GET /api/v1/pods")
                && r.contains(&format!("spec.nodeName={node}")))
    );

    assert!(redirected(&labelled.pod, dst));
    assert!(redirected(&annotated.pod, dst));
    for p in [&plain, &opted_out, &host, &elsewhere] {
        assert!(
            !redirected(&p.pod, dst),
            "{} must not be meshed",
            p.obj.name
        );
    }
}

#[test]
fn annotations_apply_and_a_malformed_one_is_reported_and_isolated() {
    let w = World::new();
    let (cluster, api, node, server_pod) = (&w.cluster, &w.api, w.node.as_str(), &w.server_pod);
    let _s2 = TcpServer::start(server_pod, "0.0.0.0:8081".parse().expect("addr")).expect("server");
    api.add_namespace("shop", &[(MESH, "enabled")]);
    let allow = [
        "--allow-pod-exclude-ports",
        "8081",
        "--allow-pod-profiles",
        "gold",
    ];
    let agent = kube_agent_with(api, node, &allow);
    agent.wait_event_named("kube_synced", KT).expect("synced");

    let good = KubePod::new(cluster, "good", "shop", node, Driver::Systemd);
    let bad = KubePod::new(cluster, "bad", "shop", node, Driver::Systemd);
    api.add_pod(
        &good
            .obj
            .clone()
            .annotate("sockmesh.io/exclude-outbound-ports", "8081")
            .annotate("sockmesh.io/policy-profile", "gold"),
    );
    api.add_pod(
        &bad.obj
            .clone()
            .annotate("sockmesh.io/exclude-outbound-ports", "http"),
    );
    let ev = wait_enrolled(&agent, good.uid());
    assert_eq!(
        ev["pod"], "@gold/shop/good",
        "the profile names the pod for policy rules"
    );
    let ev = wait_enrolled(&agent, bad.uid());
    assert_eq!(ev["pod"], "shop/bad");

    assert!(redirected(&good.pod, server_pod.addr4(8080)));
    assert!(
        !redirected(&good.pod, server_pod.addr4(8081)),
        "excluded by annotation"
    );
    // The malformed pod is meshed with the defaults: nothing excluded.
    assert!(redirected(&bad.pod, server_pod.addr4(8081)));

    // Reported three ways, each naming pod and key.
    let key = "sockmesh.io/exclude-outbound-ports";
    let k8s = api
        .wait_event(|e| e["regarding"]["name"] == "bad", KT)
        .expect("a kubernetes event about the bad pod");
    assert_eq!(k8s["type"], "Warning");
    assert_eq!(k8s["reason"], "InvalidAnnotation");
    assert_eq!(k8s["regarding"]["uid"], bad.uid());
    assert!(k8s["note"].as_str().unwrap_or("").contains(key), "{k8s}");
    let out = agent
        .wait_event_named("pod_annotation_rejected", common::T)
        .expect("stdout event");
    assert_eq!(out["pod"], "shop/bad");
    assert_eq!(out["key"], key);
    let log = agent.stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("shop/bad") && l.contains(key)),
        "log names pod and key:\n{log}"
    );
    assert!(
        !api.events()
            .iter()
            .any(|e| e["regarding"]["name"] == "good"),
        "the good pod is not reported"
    );
}

#[test]
fn an_api_outage_and_410_gone_do_not_disturb_traffic_and_the_watch_recovers() {
    let w = World::new();
    let (cluster, api, node, dst) = (&w.cluster, &w.api, w.node.as_str(), w.dst);
    api.add_namespace("shop", &[(MESH, "enabled")]);
    let first = KubePod::new(cluster, "first", "shop", node, Driver::Systemd);
    api.add_pod(&first.obj);
    let agent = kube_agent(api, node);
    wait_enrolled(&agent, first.uid());
    agent.wait_event_named("kube_synced", KT).expect("synced");
    let mut long = tcp_connect(&first.pod, dst, common::T).expect("connect");
    assert!(long.local.ip().is_loopback());
    let lists_before = api.lists_of("/api/v1/pods");

    api.stop();
    // The API is down: existing and new connections keep going through the agent.
    tcp_echo_roundtrip(&mut long.stream, b"during the outage").expect("echo");
    for _ in 0..3 {
        assert!(redirected(&first.pod, dst));
    }
    // Changes while it was down are beyond the history the server keeps: resuming the watch
    // gets 410 Gone, and only a relist sees the new pod.
    let second = KubePod::new(cluster, "second", "shop", node, Driver::Systemd);
    api.add_pod(&second.obj);
    api.compact();
    api.restart().expect("restart the API");

    if let Err(e) = agent.wait_event(
        |v| v["event"] == "pod_enrolled" && v["id"] == second.uid(),
        KT,
    ) {
        panic!("{e:#}\nrequests: {:#?}", api.requests());
    }
    assert!(redirected(&second.pod, dst));
    assert!(
        api.lists_of("/api/v1/pods") > lists_before,
        "the pods were listed again after 410: {:?}",
        api.requests()
    );
    tcp_echo_roundtrip(&mut long.stream, b"after the outage").expect("echo");
    assert!(redirected(&first.pod, dst));
    assert!(
        ids_of(&agent, "pod_removed").is_empty(),
        "no pod was removed because of the outage"
    );
    assert!(
        agent.stderr().contains("watch failed"),
        "the outage was logged"
    );
}

#[test]
fn a_restarted_container_keeps_the_pod_and_a_new_sandbox_is_enrolled_anew() {
    let w = World::new();
    let (cluster, api, node, dst) = (&w.cluster, &w.api, w.node.as_str(), w.dst);
    api.add_namespace("shop", &[(MESH, "enabled")]);
    // Two containers: the first started (lowest pid) plays the sandbox.
    let mut app = KubePod::new(cluster, "app", "shop", node, Driver::Cgroupfs);
    app.start_container();
    api.add_pod(&app.obj);
    let agent = kube_agent(api, node);
    let first = wait_enrolled(&agent, app.uid());

    // One process of the pod exits; another still holds the namespace: the pod stays.
    let mut sandbox = app.procs.remove(0);
    sandbox.kill().expect("kill");
    let ev = agent
        .wait_event_named("pod_reresolved", KT)
        .expect("re-resolved");
    assert_eq!(ev["id"], app.uid());
    assert_eq!(ev["pid"].as_u64(), Some(u64::from(app.procs[0].pid())));
    assert!(redirected(&app.pod, dst));
    assert!(ids_of(&agent, "pod_removed").is_empty());

    // The last one exits: the namespace is gone for the agent.
    app.procs[0].kill().expect("kill");
    let ev = wait_removed(&agent, app.uid());
    assert!(
        ev["reason"]
            .as_str()
            .unwrap_or("")
            .contains("namespace gone"),
        "{ev}"
    );

    // The pod's new sandbox, in a new namespace, is enrolled when the pod is next updated.
    let new_ns = cluster.add_pod("app2").expect("pod");
    let p = new_ns.spawn(&["sleep", "1000"]).expect("sleep");
    app.cgroup.container(p.pid()).expect("into the pod cgroup");
    api.set_pod_annotations(&app.obj);
    let again = wait_enrolled(&agent, app.uid());
    assert_ne!(again["netns_cookie"], first["netns_cookie"]);
    assert_eq!(
        again["netns_cookie"].as_u64(),
        Some(new_ns.netns_cookie().expect("cookie"))
    );
    assert!(redirected(&new_ns, dst));
}

#[test]
fn kube_mode_flags_are_checked_before_anything_is_loaded() {
    require_root();
    let dir = BpfFsDir::new().expect("bpffs dir");
    let pins = dir.path().join("sockmesh").to_string_lossy().into_owned();
    for (args, says) in [
        (vec!["--kube"], "--node-name"),
        (
            vec!["--kube", "--node-name", "n", "--kube-api", "ftp://x"],
            "give a URL",
        ),
        (
            vec![
                "--kube",
                "--node-name",
                "n",
                "--kubeconfig",
                "/nonexistent/kubeconfig",
            ],
            "no such file",
        ),
        (vec!["--kube-api", "http://127.0.0.1:1"], "add --kube"),
    ] {
        let mut argv = vec!["run", "--bpffs-dir", &pins];
        argv.extend(args.iter().copied());
        let (status, stdout, stderr) = Agent::run_to_exit(&argv).expect("run");
        assert_eq!(status.code(), Some(1), "{args:?}: {stderr}");
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("sockmesh: error:"))
            .collect();
        assert_eq!(errors.len(), 1, "{args:?}: {stderr}");
        assert!(errors[0].contains(says), "{args:?}: {}", errors[0]);
        assert!(stdout.trim().is_empty(), "nothing announced: {stdout}");
        assert!(dir.entries().expect("entries").is_empty(), "nothing pinned");
    }
}

/// Pod owners do not choose their own policy: an exclusion or profile the operator did not
/// allow is refused like a malformed annotation (a Warning Event naming the key, and the pod
/// meshed with none of its annotations' options), and what is allowed applies.
#[test]
fn annotations_beyond_what_the_operator_allows_are_refused() {
    let w = World::new();
    let (cluster, api, node, server_pod) = (&w.cluster, &w.api, w.node.as_str(), &w.server_pod);
    let _s2 = TcpServer::start(server_pod, "0.0.0.0:8081".parse().expect("addr")).expect("server");
    api.add_namespace("shop", &[(MESH, "enabled")]);
    let allow = [
        "--allow-pod-exclude-ports",
        "8081",
        "--allow-pod-profiles",
        "gold",
    ];
    let agent = kube_agent_with(api, node, &allow);
    agent.wait_event_named("kube_synced", KT).expect("synced");

    let modest = KubePod::new(cluster, "modest", "shop", node, Driver::Systemd);
    let greedy = KubePod::new(cluster, "greedy", "shop", node, Driver::Systemd);
    let upgrader = KubePod::new(cluster, "upgrader", "shop", node, Driver::Systemd);
    api.add_pod(
        &modest
            .obj
            .clone()
            .annotate("sockmesh.io/exclude-outbound-ports", "8081"),
    );
    // Everything out of the mesh, and a port beside the allowed one: neither applies.
    api.add_pod(
        &greedy
            .obj
            .clone()
            .annotate("sockmesh.io/exclude-outbound-cidrs", "0.0.0.0/0")
            .annotate("sockmesh.io/exclude-outbound-ports", "8081"),
    );
    api.add_pod(
        &upgrader
            .obj
            .clone()
            .annotate("sockmesh.io/policy-profile", "platinum"),
    );
    wait_enrolled(&agent, modest.uid());
    assert_eq!(wait_enrolled(&agent, greedy.uid())["pod"], "shop/greedy");
    assert_eq!(
        wait_enrolled(&agent, upgrader.uid())["pod"],
        "shop/upgrader",
        "no profile"
    );
    assert!(
        !redirected(&modest.pod, server_pod.addr4(8081)),
        "allowed: excluded"
    );
    for p in [&greedy, &upgrader] {
        assert!(
            redirected(&p.pod, server_pod.addr4(8080)),
            "{} is meshed",
            p.obj.name
        );
        assert!(
            redirected(&p.pod, server_pod.addr4(8081)),
            "{}: nothing excluded",
            p.obj.name
        );
    }
    for (name, key) in [
        ("greedy", "sockmesh.io/exclude-outbound-cidrs"),
        ("upgrader", "sockmesh.io/policy-profile"),
    ] {
        let k8s = api
            .wait_event(|e| e["regarding"]["name"] == name, KT)
            .expect("a kubernetes event");
        assert_eq!(k8s["type"], "Warning");
        assert_eq!(k8s["reason"], "InvalidAnnotation");
        let note = k8s["note"].as_str().unwrap_or("");
        assert!(note.contains(key) && note.contains("not allowed"), "{k8s}");
    }
    assert!(
        !api.events()
            .iter()
            .any(|e| e["regarding"]["name"] == "modest"),
        "the allowed pod is not reported"
    );
}
