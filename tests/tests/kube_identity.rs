//! Kubernetes-native peers, end to end: policy rules, `sockmesh peers` and `/metrics` by
//! Service and workload.
//!
//! The API server is the fake one (tests/src/kubeapi): it is not a mock of the agent's client
//! but speaks the real wire protocol to it (HTTP/1.1, Pod/Service/EndpointSlice JSON, list +
//! watch streams with resource versions, `410 Gone` after a compaction), so the agent's own
//! kube-rs client and watchers do all the work. Everything else is real: the kernel programs,
//! pods as network namespaces, sockets, echo servers. A ClusterIP is routed the way kube-proxy
//! routes it, by a DNAT in the client pod's own namespace (iptables nat OUTPUT there, which goes
//! away with the namespace): the host's tables are never touched.
mod common;
mod policy_util;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use policy_util::{attempt, Outcome};
use serde_json::Value;
use sockmesh_tests::kubepod::KubePod;
use sockmesh_tests::names::unique_name;
use sockmesh_tests::prom::{scrape_until, Sample};
use sockmesh_tests::*;

/// Generous: the agent's first lists, or a watch resuming after an outage.
const KT: Duration = Duration::from_secs(60);
const MESH: &str = "sockmesh.io/mesh";
const CLUSTER_IP: &str = "10.96.7.10";
/// At most one connection at a time to the Service, none queued: a second concurrent one is
/// reset, which tells from the client side whether the rule applies.
const POLICY: &str = "[[rule]]\nservice = \"payments.shop\"\nmax_conns = 1\nqueue = 0\n";

/// A backend pod of Deployment `payments` (ReplicaSet `payments-5d8f`), echoing on 8080, with
/// its Pod object (on another node: the agent names it, never enrols it).
struct Backend {
    pod: Pod,
    server: TcpServer,
    obj: FakePod,
}

impl Backend {
    fn new(cluster: &Cluster, label: &str) -> Backend {
        let pod = cluster.add_pod(label).expect("backend pod");
        let server = TcpServer::start(&pod, "0.0.0.0:8080".parse().expect("addr")).expect("echo");
        let obj = FakePod::new(
            "shop",
            &format!("payments-5d8f-{label}"),
            &new_uid(),
            "elsewhere",
        )
        .label("pod-template-hash", "5d8f")
        .owned_by("ReplicaSet", "payments-5d8f")
        .with_ip(&pod.ip4().to_string());
        Backend { pod, server, obj }
    }

    fn addr(&self) -> SocketAddr {
        self.pod.addr4(8080)
    }
}

struct World {
    api: FakeKubeApi,
    client: KubePod,
    b1: Backend,
    b2: Backend,
    agent: Agent,
    _dir: TempDir,
    // Last: the pods' namespaces (and the DNAT in them) go after everything using them.
    cluster: Cluster,
}

fn service() -> FakeService {
    FakeService {
        namespace: "shop".into(),
        name: "payments".into(),
        cluster_ip: Some(CLUSTER_IP.into()),
        ports: vec![(80, 8080)],
    }
}

fn slice(backend: &Backend) -> FakeSlice {
    FakeSlice {
        namespace: "shop".into(),
        name: "payments-x7k2p".into(),
        service: "payments".into(),
        addresses: vec![backend.pod.ip4().to_string()],
        port: 8080,
    }
}

fn cluster_ip() -> SocketAddr {
    format!("{CLUSTER_IP}:80").parse().expect("addr")
}

/// What kube-proxy does for the client: the ClusterIP:80 goes to `backend`:8080.
fn route_cluster_ip(client: &Pod, backend: &Backend) {
    sockmesh_tests::kubepod::route_cluster_ip(client, CLUSTER_IP, 80, backend.addr());
}

impl World {
    /// The meshed client `shop/client` of Deployment `frontend`, two backends, an agent with
    /// [`POLICY`]; no Service yet.
    fn new(extra: &[&str]) -> World {
        require_root();
        let cluster = Cluster::new().expect("cluster");
        let api = FakeKubeApi::start().expect("fake api");
        let node = unique_name();
        api.add_namespace("shop", &[(MESH, "enabled")]);
        let dir = TempDir::new().expect("tempdir");
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, POLICY).expect("policy");
        let url = api.url();
        let policy = policy.display().to_string();
        let mut args = vec![
            "--kube",
            "--kube-api",
            &url,
            "--node-name",
            &node,
            "--policy",
            &policy,
            // Only the concurrency limit: rejections must not open a breaker or throttle.
            "--breaker-failures",
            "off",
            "--adaptive-k",
            "off",
            // Proxy tier: the Service rule's limit is read from what the agent resets and
            // names (the kernel tier's limits: policy_limits.rs).
            "--fast-path",
            "off",
        ];
        args.extend_from_slice(extra);
        let agent = Agent::start(args).expect("agent");
        agent.wait_ready().expect("ready");
        agent
            .wait_event_named("identities_synced", KT)
            .expect("services, endpointslices and pods listed");
        let mut client = KubePod::new(&cluster, "client", "shop", &node, Driver::Systemd);
        client.obj = client
            .obj
            .clone()
            .label("pod-template-hash", "7c9d")
            .owned_by("ReplicaSet", "frontend-7c9d");
        let b1 = Backend::new(&cluster, "pay1");
        let b2 = Backend::new(&cluster, "pay2");
        api.add_pod(&client.obj);
        api.add_pod(&b1.obj);
        agent
            .wait_event(
                |v| v["event"] == "pod_enrolled" && v["id"] == client.uid(),
                KT,
            )
            .expect("client enrolled");
        route_cluster_ip(&client.pod, &b1);
        World {
            api,
            client,
            b1,
            b2,
            agent,
            _dir: dir,
            cluster,
        }
    }

    /// A connection to `dst` through the agent. A slot the previous one held under
    /// `max_conns = 1` is freed when the agent sees that client close, a moment after the
    /// test dropped it: until then a new one is reset, so retry for a while.
    fn admit(&self, dst: SocketAddr) -> Connected {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match attempt(&self.client.pod, dst) {
                Outcome::Admitted(c) => return c,
                other if Instant::now() > deadline => panic!("{dst}: {other:?} for 10 s"),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Whether [`POLICY`] applies to `dst` now: one connection held, a second one reset.
    /// Holding one and admitting a second means it does not. Panics on anything else.
    fn limited(&self, dst: SocketAddr) -> bool {
        let held = self.admit(dst);
        let second = attempt(&self.client.pod, dst);
        drop(held);
        match second {
            Outcome::Admitted(_) => false,
            Outcome::Reset => true,
            other => panic!("{dst}: {other:?}"),
        }
    }

    /// Waits until [`World::limited`] says `want` for `dst` (the agent applies an API change
    /// when its watch delivers it; no event tells the test when).
    fn until_limited(&self, dst: SocketAddr, want: bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.limited(dst) != want {
            assert!(
                Instant::now() < deadline,
                "{what}: still limited = {}",
                !want
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn sample<'a>(samples: &'a [Sample], labels: &[(&str, &str)]) -> Option<&'a Sample> {
    samples.iter().find(|s| {
        s.name == "sockmesh_peer_connections_total"
            && labels.iter().all(|(k, v)| s.label(k) == Some(v))
    })
}

#[test]
fn a_service_rule_applies_through_its_cluster_ip_and_follows_a_replaced_endpoint() {
    let w = World::new(&[]);
    assert!(
        !w.limited(cluster_ip()),
        "no Service yet: an address like any other"
    );

    // The Service appears in the API after the policy was loaded: no reload needed.
    w.api.put_service(&service());
    w.api.put_slice(&slice(&w.b1));
    w.until_limited(
        cluster_ip(),
        true,
        "the rule on payments.shop applies to its ClusterIP",
    );
    w.b1.server.drain_accepted();
    let c = w.admit(cluster_ip());
    assert!(c.local.ip().is_loopback(), "through the agent");
    w.b1.server
        .next_accept(Duration::from_secs(5))
        .expect("reached backend 1 by the DNAT");
    drop(c);
    assert!(
        w.limited(w.b1.addr()),
        "and to its endpoint's address directly"
    );
    assert!(!w.limited(w.b2.addr()), "not to a pod outside the Service");

    // A rollout replaces the endpoint: new pod, new address, new slice, new DNAT.
    w.api.delete_pod(&w.b1.obj);
    w.api.add_pod(&w.b2.obj);
    w.api.put_slice(&slice(&w.b2));
    route_cluster_ip(&w.client.pod, &w.b2);
    w.until_limited(w.b2.addr(), true, "the new endpoint is the Service's");
    w.until_limited(
        w.b1.addr(),
        false,
        "the old address is the Service's no more",
    );
    w.b2.server.drain_accepted();
    assert!(w.limited(cluster_ip()), "the ClusterIP still is");
    w.b2.server
        .next_accept(Duration::from_secs(5))
        .expect("now reaching backend 2");
    let reloads = w
        .agent
        .events()
        .iter()
        .filter(|v| v["event"] == "policy_reloaded")
        .count();
    assert_eq!(reloads, 0, "followed with no reload");
    assert!(w.agent.is_running());
}

#[test]
fn metrics_and_peers_name_the_service_and_a_deleted_service_falls_back_to_the_address() {
    let w = World::new(&[]);
    w.api.put_service(&service());
    w.api.put_slice(&slice(&w.b1));
    w.until_limited(cluster_ip(), true, "the Service is known");
    // Traffic both ways: through the ClusterIP, and straight to the endpoint.
    let mut held = w.admit(cluster_ip());
    drop(w.admit(w.b1.addr()));

    let metrics = w.agent.metrics_addr().expect("metrics address");
    let named = [
        ("pod", "shop/client"),
        ("direction", "outbound"),
        ("peer", "10.96.7.10:80"),
        ("source_workload", "frontend"),
        ("source_namespace", "shop"),
        ("destination_service", "payments.shop"),
        ("destination_namespace", "shop"),
    ];
    let s = scrape_until(metrics, |s| sample(s, &named).is_some());
    assert!(
        sample(&s, &named).is_some(),
        "the ClusterIP's series is named: {s:?}"
    );
    let endpoint = [
        ("destination_service", "payments.shop"),
        ("destination_workload", "payments"),
        ("destination_namespace", "shop"),
        ("source_workload", "frontend"),
    ];
    let s = scrape_until(metrics, |s| sample(s, &endpoint).is_some());
    assert!(
        sample(&s, &endpoint).is_some(),
        "the endpoint's series names its Deployment"
    );

    let cip = cluster_ip().to_string();
    let peers = common::peers_until(&w.agent, &["--pod", "shop/client"], |v| {
        common::find_peer(v, &cip).is_some_and(|r| r["service"] == "payments.shop")
    });
    let row = common::peer_row(&peers, &cip);
    assert_eq!(row["service"], "payments.shop", "{row}");
    assert_eq!(row["namespace"], "shop", "{row}");
    assert_eq!(row["pod_workload"], "frontend", "{row}");
    assert_eq!(row["pod_namespace"], "shop", "{row}");
    let b1 = w.b1.addr().to_string();
    let row = common::peer_row(&peers, &b1);
    assert_eq!(
        (&row["service"], &row["workload"]),
        (&"payments.shop".into(), &"payments".into())
    );
    let by = w
        .agent
        .read_json("peers", &["--pod", "shop/client", "--by", "service"])
        .expect("peers --by service");
    let rows: Vec<&Value> = by["peers"]
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r["service"] == "payments.shop")
        .collect();
    assert_eq!(rows.len(), 1, "one row for the Service: {by}");
    assert_eq!(rows[0]["peers"], 2, "its ClusterIP and its endpoint: {by}");

    // The Service goes away while a connection through it is open.
    w.api.delete_service(&service());
    w.api.delete_slice(&slice(&w.b1));
    tcp_echo_roundtrip(&mut held.stream, b"still there").expect("the open connection lives on");
    let peers = common::peers_until(&w.agent, &["--pod", "shop/client"], |v| {
        common::find_peer(v, &cip).is_some_and(|r| r["service"].is_null())
    });
    let row = common::peer_row(&peers, &cip);
    assert!(row["service"].is_null(), "back to the address alone: {row}");
    drop(held);
    w.until_limited(cluster_ip(), false, "the rule no longer applies");
    let plain = [("pod", "shop/client"), ("peer", "10.96.7.10:80")];
    let s = scrape_until(metrics, |s| {
        sample(s, &plain).is_some_and(|x| x.label("destination_service").is_none())
    });
    let x = sample(&s, &plain).expect("the ClusterIP's series");
    assert_eq!(x.label("destination_service"), None, "{x:?}");
    assert!(w.agent.is_running(), "no crash");
}

#[test]
fn the_identity_watches_list_again_after_410_gone() {
    let w = World::new(&[]);
    // An outage during which the Service is created and the history compacted: resuming a
    // watch from its old resource version gets 410 Gone, and only a new list finds it.
    w.api.stop();
    w.api.put_service(&service());
    w.api.put_slice(&slice(&w.b1));
    w.api.compact();
    let listed = w.api.lists_of("/api/v1/services");
    w.api.restart().expect("restart the API server");
    w.agent
        .wait_event(
            |v| v["event"] == "identities_synced" && v["services"] == 1,
            KT,
        )
        .expect("listed again");
    assert!(
        w.api.lists_of("/api/v1/services") > listed,
        "a new list, not a watch"
    );
    w.until_limited(
        cluster_ip(),
        true,
        "the Service created during the outage applies",
    );
}

#[test]
fn inbound_a_meshed_endpoint_names_the_service_called_and_its_client() {
    let w = World::new(&[]);
    // A backend on this node, meshed: its agent side sees the client come in.
    let node = w.client.obj.node.clone();
    let mut pay = KubePod::new(&w.cluster, "pay3", "shop", &node, Driver::Systemd);
    pay.obj = pay
        .obj
        .clone()
        .label("pod-template-hash", "5d8f")
        .owned_by("ReplicaSet", "payments-5d8f");
    let _echo = TcpServer::start(&pay.pod, "0.0.0.0:8080".parse().expect("addr")).expect("echo");
    w.api.put_service(&service());
    w.api.put_slice(&FakeSlice {
        addresses: vec![pay.pod.ip4().to_string()],
        ..slice(&w.b1)
    });
    w.api.add_pod(&pay.obj);
    w.agent
        .wait_event(|v| v["event"] == "pod_enrolled" && v["id"] == pay.uid(), KT)
        .expect("backend enrolled");
    w.agent
        .wait_event(
            |v| v["event"] == "inbound_listening" && v["port"] == 8080,
            KT,
        )
        .expect("its port 8080 captured");
    let dst = pay.pod.addr4(8080);
    w.until_limited(dst, true, "the new endpoint is the Service's");
    drop(w.admit(dst));

    // The backend's inbound row: the client's identity, and the Service it called.
    let client_ip = w.client.pod.ip4().to_string();
    let inbound = |v: &Value| -> Option<Value> {
        v["peers"]
            .as_array()?
            .iter()
            .find(|r| {
                r["direction"] == "inbound"
                    && r["peer"]
                        .as_str()
                        .is_some_and(|p| p.starts_with(&client_ip))
            })
            .cloned()
    };
    let peers = common::peers_until(&w.agent, &["--pod", "shop/pay3"], |v| {
        inbound(v).is_some_and(|r| r["service"] == "payments.shop")
    });
    let row = inbound(&peers).unwrap_or_else(|| panic!("no inbound row: {peers}"));
    assert_eq!(row["service"], "payments.shop", "{row}");
    assert_eq!(row["workload"], "frontend", "the client's workload: {row}");
    assert_eq!(row["pod_workload"], "payments", "{row}");
    let metrics = w.agent.metrics_addr().expect("metrics address");
    let want = [
        ("pod", "shop/pay3"),
        ("direction", "inbound"),
        ("source_workload", "frontend"),
        ("source_namespace", "shop"),
        ("destination_service", "payments.shop"),
        ("destination_workload", "payments"),
        ("destination_namespace", "shop"),
    ];
    let s = scrape_until(metrics, |s| sample(s, &want).is_some());
    assert!(
        sample(&s, &want).is_some(),
        "inbound: source is the client, destination the pod"
    );
}
