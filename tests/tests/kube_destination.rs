//! Istio DestinationRules at L4, end to end: a rule copied from an Istio cluster takes effect
//! on meshed pods with no other configuration.
//!
//! The API server is the fake one (tests/src/kubeapi) with the DestinationRule CRD installed
//! (list + watch on networking.istio.io). Everything else is real: the kernel programs, pods
//! as network namespaces, three echo backends of one Service, one of them black-holed (an
//! iptables DROP in its own namespace: SYNs vanish, connects time out, a local-origin
//! failure). There is no kube-proxy: where a rule has the agent pick the endpoint, the proxy
//! connects to the endpoint it chose; where the test needs the ClusterIP itself routed, a
//! DNAT in the client pod plays kube-proxy.
mod common;
mod policy_util;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use policy_util::{attempt, Outcome};
use serde_json::{json, Value};
use sockmesh_tests::kubepod::{route_cluster_ip, KubePod};
use sockmesh_tests::names::unique_name;
use sockmesh_tests::*;

/// Generous: the agent's first lists, or a watch event.
const KT: Duration = Duration::from_secs(60);
const MESH: &str = "sockmesh.io/mesh";
const CLUSTER_IP: &str = "10.96.9.10";

struct Backend {
    pod: Pod,
    server: TcpServer,
}

impl Backend {
    fn addr(&self) -> SocketAddr {
        self.pod.addr4(8080)
    }

    /// SYNs to the backend vanish (`false`), or are answered again (`true`).
    fn answer(&self, yes: bool) {
        let op = if yes { "-D" } else { "-A" };
        self.pod
            .exec(&[
                "iptables", op, "INPUT", "-p", "tcp", "--dport", "8080", "-j", "DROP",
            ])
            .expect("iptables in the backend pod");
    }

    /// Whether the backend accepted a connection since the last call.
    fn accepted(&self) -> bool {
        !self.server.drain_accepted().is_empty()
    }
}

struct World {
    api: FakeKubeApi,
    client: KubePod,
    b: Vec<Backend>,
    agent: Agent,
    // Last: the pods' namespaces go after everything using them.
    _cluster: Cluster,
}

/// A DestinationRule as `kubectl get dr -o json` shows it (the fake server adds apiVersion,
/// kind and the creation time).
fn rule(ns: &str, name: &str, spec: Value) -> Value {
    json!({"metadata": {"namespace": ns, "name": name, "uid": format!("dr-{name}")}, "spec": spec})
}

fn cluster_ip() -> SocketAddr {
    format!("{CLUSTER_IP}:80").parse().expect("addr")
}

impl World {
    /// Three backends of Service `payments.shop` (ClusterIP:80 -> 8080), the meshed client
    /// `shop/client`, `rules` in the API before the agent starts, Istio as `istio` installs
    /// it on the API server.
    fn new(istio: impl FnOnce(&FakeKubeApi), rules: &[Value], extra: &[&str]) -> World {
        require_root();
        let cluster = Cluster::new().expect("cluster");
        let api = FakeKubeApi::start().expect("fake api");
        istio(&api);
        let node = unique_name();
        api.add_namespace("shop", &[(MESH, "enabled")]);
        let b: Vec<Backend> = (1..=3)
            .map(|i| {
                let pod = cluster.add_pod(&format!("pay{i}")).expect("backend pod");
                let server =
                    TcpServer::start(&pod, "0.0.0.0:8080".parse().expect("addr")).expect("echo");
                Backend { pod, server }
            })
            .collect();
        api.put_service(&FakeService {
            namespace: "shop".into(),
            name: "payments".into(),
            cluster_ip: Some(CLUSTER_IP.into()),
            ports: vec![(80, 8080)],
        });
        api.put_slice(&FakeSlice {
            namespace: "shop".into(),
            name: "payments-abcde".into(),
            service: "payments".into(),
            addresses: b.iter().map(|b| b.pod.ip4().to_string()).collect(),
            port: 8080,
        });
        for r in rules {
            api.put_destination_rule(r);
        }
        let url = api.url();
        let mut args = vec!["--kube", "--kube-api", &url, "--node-name", &node];
        args.extend_from_slice(extra);
        let agent = Agent::start(args).expect("agent");
        agent.wait_ready().expect("ready");
        agent
            .wait_event_named("identities_synced", KT)
            .expect("services, endpointslices and pods listed");
        let client = KubePod::new(&cluster, "client", "shop", &node, Driver::Systemd);
        api.add_pod(&client.obj);
        agent
            .wait_event(
                |v| v["event"] == "pod_enrolled" && v["id"] == client.uid(),
                KT,
            )
            .expect("client enrolled");
        World {
            api,
            client,
            b,
            agent,
            _cluster: cluster,
        }
    }

    fn attempt(&self) -> Outcome {
        attempt(&self.client.pod, cluster_ip())
    }

    /// Which backends accepted since the last look.
    fn reached(&self) -> Vec<bool> {
        self.b.iter().map(Backend::accepted).collect()
    }
}

/// A rule as an Istio user writes it for a TCP Service: a short connect timeout, and eject an
/// endpoint after two local-origin failures in a row (Istio's default 10 % cap).
fn outlier_rule(base_ejection: &str) -> Value {
    rule(
        "shop",
        "payments",
        json!({
            "host": "payments.shop.svc.cluster.local",
            "trafficPolicy": {
                "connectionPool": {"tcp": {"connectTimeout": "300ms"}},
                "outlierDetection": {
                    "splitExternalLocalOriginErrors": true,
                    "consecutiveLocalOriginFailures": 2,
                    "interval": "1s",
                    "baseEjectionTime": base_ejection,
                },
            },
        }),
    )
}

#[test]
fn a_black_holed_endpoint_is_ejected_connections_keep_succeeding_and_it_comes_back() {
    // v1beta1 only (Istio before 1.22): the agent falls back to it.
    // Proxy tier: this is the proxy's endpoint picking (a failed upstream connect resets the
    // app's accepted connection); the kernel tier's is the test below.
    let w = World::new(
        |api| api.install_istio(&["v1beta1"]),
        &[outlier_rule("3s")],
        &["--fast-path", "off"],
    );
    w.agent
        .wait_event(
            |v| v["event"] == "destination_rules_synced" && v["version"] == "v1beta1",
            KT,
        )
        .expect("rules listed through v1beta1");
    let bad = &w.b[2];
    bad.answer(false);

    // Round robin over the three: every third attempt meets the black hole and is reset
    // after the rule's 300 ms connect timeout (the default is 3 s); the second such failure
    // ejects it.
    let mut resets = 0;
    for _ in 0..6 {
        let started = Instant::now();
        match w.attempt() {
            Outcome::Admitted(_) => {}
            Outcome::Reset => {
                resets += 1;
                assert!(
                    started.elapsed() < Duration::from_secs(2),
                    "reset after {:?}: not the rule's 300 ms connect timeout",
                    started.elapsed()
                );
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        resets, 2,
        "two of six attempts met the black-holed endpoint"
    );
    let ejected = w
        .agent
        .wait_event(|v| v["event"] == "endpoint_ejected", KT)
        .expect("ejected");
    assert_eq!(ejected["endpoint"], bad.addr().to_string(), "{ejected}");
    assert_eq!(ejected["service"], "payments.shop");
    assert_eq!(ejected["for_ms"], 3000, "base ejection time x 1");
    let ejected_at = Instant::now();

    // Ejected: every connection succeeds, spread over the two that answer.
    w.reached();
    for i in 0..8 {
        assert!(
            matches!(w.attempt(), Outcome::Admitted(_)),
            "attempt {i} after the ejection failed"
        );
    }
    assert_eq!(w.reached(), [true, true, false]);

    // The cap: 1 of 3 ejected is 33 % >= Istio's default 10 %, so a second failing endpoint
    // stays in rotation (Envoy's rule): it is still picked after failing twice in a row.
    let second = &w.b[1];
    second.answer(false);
    let letters: String = (0..6).map(|_| w.attempt().letter()).collect();
    assert_eq!(
        letters.matches('R').count(),
        3,
        "{letters}: b2 still picked every other time, b3 still skipped"
    );
    second.answer(true);

    // Back after the ejection time (3 s, no timer: the next pick after it finds it back).
    bad.answer(true);
    if let Some(left) = Duration::from_millis(3100).checked_sub(ejected_at.elapsed()) {
        std::thread::sleep(left);
    }
    w.reached();
    for _ in 0..3 {
        assert!(matches!(w.attempt(), Outcome::Admitted(_)));
    }
    assert_eq!(
        w.reached(),
        [true, true, true],
        "round robin over all three again"
    );
    assert!(w.agent.is_running());
}

/// A direct connect (on the kernel tier) to the ClusterIP: `Some(backend index)` once an echo
/// went through, `None` if the connect failed (the black hole: the rule's 300 ms connect
/// timeout as `TCP_USER_TIMEOUT`). It went direct (not through the loopback listener) to the
/// endpoint connect4 picked, and the app still sees the ClusterIP as its peer.
fn direct(w: &World) -> Option<usize> {
    let mut c = tcp_connect(&w.client.pod, cluster_ip(), common::T).ok()?;
    assert!(!c.local.ip().is_loopback(), "went through the proxy");
    assert_eq!(
        c.peer,
        cluster_ip(),
        "getpeername shows the VIP, as after kube-proxy's DNAT"
    );
    tcp_echo_roundtrip(&mut c.stream, b"ping").expect("echo");
    let reached: Vec<usize> = (0..3).filter(|&i| w.b[i].accepted()).collect();
    assert_eq!(reached.len(), 1, "one backend accepted it: {reached:?}");
    Some(reached[0])
}

/// The kernel tier writes the endpoints in service for the VIP (`kernel_endpoints`).
fn kernel_endpoints(w: &World, n: usize) {
    w.agent
        .wait_event(
            |v| {
                v["event"] == "kernel_endpoints"
                    && v["endpoints"].as_array().is_some_and(|a| a.len() == n)
            },
            KT,
        )
        .expect("the kernel's endpoints rewritten");
}

/// The same rule with `--fast-path auto`: the first proxied connection hands the Service to
/// the kernel tier, whose connect4 then sends each connection direct to the next endpoint in
/// service; its failures eject the black-holed endpoint in the proxy's pool (one state for
/// both tiers), the kernel's endpoints are rewritten without it, and it comes back.
#[test]
fn on_the_kernel_tier_connect4_picks_the_endpoint_and_ejects_the_black_holed_one() {
    let w = World::new(
        |api| api.install_istio(&["v1"]),
        &[outlier_rule("4s")],
        &["--fast-path", "auto"],
    );
    w.agent
        .wait_event_named("destination_rules_synced", KT)
        .expect("rules listed");
    let first = tcp_connect(&w.client.pod, cluster_ip(), common::T).expect("proxied");
    assert!(
        first.local.ip().is_loopback(),
        "the first connection is proxied"
    );
    drop(first);
    common::peers_until(&w.agent, &[], |v| {
        common::find_peer(v, &cluster_ip().to_string()).is_some_and(|r| r["tier"] == "kernel")
    });
    w.reached();
    let mut hit: Vec<usize> = (0..3).filter_map(|_| direct(&w)).collect();
    hit.sort();
    assert_eq!(hit, [0, 1, 2], "round robin over the three");

    let bad = &w.b[2];
    bad.answer(false);
    let failed = (0..6).filter(|_| direct(&w).is_none()).count();
    assert_eq!(failed, 2, "two of six direct connects met the black hole");
    let ejected = w
        .agent
        .wait_event(|v| v["event"] == "endpoint_ejected", KT)
        .expect("ejected on the kernel tier's failures");
    assert_eq!(ejected["endpoint"], bad.addr().to_string(), "{ejected}");
    kernel_endpoints(&w, 2);
    let ejected_at = Instant::now();
    for i in 0..6 {
        let got = direct(&w);
        assert!(
            got.is_some_and(|b| b < 2),
            "attempt {i} after the ejection: {got:?}"
        );
    }

    bad.answer(true);
    kernel_endpoints(&w, 3);
    assert!(
        ejected_at.elapsed() >= Duration::from_secs(3),
        "back only after the ejection time"
    );
    let mut hit: Vec<usize> = (0..3).filter_map(|_| direct(&w)).collect();
    hit.sort();
    assert_eq!(hit, [0, 1, 2], "round robin over all three again");
    assert!(w.agent.is_running());
}

#[test]
fn max_connections_from_the_rule_the_endpoint_tier_bad_rules_reported_and_removal_restores_defaults(
) {
    let pool = rule(
        "shop",
        "payments",
        json!({
            "host": "payments",
            "trafficPolicy": {
                "connectionPool": {"tcp": {"maxConnections": 1}, "http": {"http2MaxRequests": 10}},
                "loadBalancer": {"simple": "LEAST_REQUEST"},
                "tls": {"mode": "ISTIO_MUTUAL"},
            },
        }),
    );
    let broken = rule(
        "shop",
        "cart",
        json!({"host": "cart", "trafficPolicy": {"connectionPool": {"tcp": {"connectTimeout": "soon"}}}}),
    );
    let w = World::new(
        |api| api.install_istio(&["v1", "v1beta1"]),
        &[pool, broken],
        &["--fast-path", "auto"],
    );
    w.agent
        .wait_event(
            |v| v["event"] == "destination_rules_synced" && v["version"] == "v1",
            KT,
        )
        .expect("rules listed through v1");
    // Without the rule, the ClusterIP goes where kube-proxy would send it.
    route_cluster_ip(&w.client.pod, CLUSTER_IP, 80, w.b[0].addr());

    // The malformed rule: a Warning Event on it, and ignored; the other one applies.
    let ev = w
        .api
        .wait_event(|e| e["reason"] == "InvalidDestinationRule", KT)
        .expect("malformed rule reported");
    assert_eq!(ev["regarding"]["name"], "cart", "{ev}");
    assert!(
        ev["note"]
            .as_str()
            .is_some_and(|n| n.contains("connectTimeout")),
        "{ev}"
    );
    // What L4 cannot honour is named, once, on the rule that has it.
    let ev = w
        .api
        .wait_event(|e| e["reason"] == "UnsupportedDestinationRuleFields", KT)
        .expect("unsupported fields reported");
    assert_eq!(ev["regarding"]["name"], "payments", "{ev}");
    let note = ev["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("spec.trafficPolicy.tls") && note.contains("connectionPool.http"),
        "{note}"
    );

    // maxConnections: 1 held, a second refused (Envoy's overflow: no queue).
    let held = w.attempt().admitted();
    assert_eq!(w.attempt().letter(), 'R', "over maxConnections");
    drop(held);

    // The agent picks the endpoint and connect4 can too: on auto the kernel tier takes the
    // peer once the held connection is gone (LEAST_REQUEST is round robin there).
    let peers = common::peers_until(&w.agent, &[], |v| {
        common::find_peer(v, &cluster_ip().to_string()).is_some_and(|r| r["tier"] == "kernel")
    });
    let row = common::peer_row(&peers, &cluster_ip().to_string());
    assert_eq!(row["tier_reason"], "kernel", "{row}");
    let events = w.api.events();
    let unsupported = events
        .iter()
        .filter(|e| e["reason"] == "UnsupportedDestinationRuleFields")
        .count();
    assert_eq!(unsupported, 1, "once per resource version: {events:?}");

    // The rule removed: defaults again (no cap), through the ClusterIP as kube-proxy routes it.
    w.api.delete_destination_rule("shop", "payments");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let held = w.attempt().admitted();
        let second = w.attempt();
        drop(held);
        if matches!(second, Outcome::Admitted(_)) {
            break;
        }
        assert!(Instant::now() < deadline, "still capped after the removal");
        std::thread::sleep(Duration::from_millis(100));
    }
    w.reached();
    drop(w.attempt().admitted());
    assert_eq!(w.reached(), [true, false, false], "by the DNAT, not picked");
}

/// Where the DestinationRules cannot be read (no CRD, or a ClusterRole that predates them),
/// the agent says so once, with `event` and a log line containing `log`, and meshes pods
/// with the file's and flags' policy.
fn no_rules(istio: impl FnOnce(&FakeKubeApi), event: &str, log: &str) {
    let w = World::new(istio, &[], &[]);
    w.agent.wait_event_named(event, KT).expect("noticed");
    route_cluster_ip(&w.client.pod, CLUSTER_IP, 80, w.b[0].addr());
    assert!(matches!(w.attempt(), Outcome::Admitted(_)));
    let told = w
        .agent
        .events()
        .iter()
        .filter(|v| v["event"] == event)
        .count();
    assert_eq!(told, 1);
    assert_eq!(w.agent.stderr().matches(log).count(), 1, "one log line");
}

#[test]
fn a_cluster_without_istio_is_logged_once_and_pods_are_meshed() {
    no_rules(
        |_| {},
        "destination_rules_absent",
        "no Istio DestinationRule CRD",
    );
}

#[test]
fn a_cluster_role_without_destination_rules_says_how_to_fix_it_once() {
    no_rules(
        |api| {
            api.install_istio(&["v1"]);
            api.forbid_istio();
        },
        "destination_rules_forbidden",
        "grant list and watch on networking.istio.io destinationrules",
    );
}
