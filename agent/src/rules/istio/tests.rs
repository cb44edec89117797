//! DestinationRules: parsing (what applies, what is reported, what is refused), host
//! matching and Istio's precedence, and the layer they form between the policy file's
//! `[defaults]` and its rules.
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::parse::{parse, Export};
use super::{DestinationRules, DEFAULT_ROOT_NAMESPACE};
use crate::identity::{index::Local, Identities, ServiceObject};
use crate::policy::outlier::LbMode;
use crate::policy::{Direction, PeerKey};
use crate::rules::{knobs::Knobs, set::PolicySet};

fn dr(ns: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"namespace": ns, "name": name, "resourceVersion": "7",
                     "creationTimestamp": "2024-01-01T00:00:00Z"},
        "spec": spec,
    })
}

fn rule(ns: &str, name: &str, spec: Value) -> super::parse::DestinationRule {
    parse(&dr(ns, name, spec)).expect("parses").rule
}

fn secs(n: u64) -> Option<Duration> {
    Some(Duration::from_secs(n))
}

#[test]
fn the_l4_fields_are_read_and_the_rest_is_named() {
    let p = parse(&dr(
        "shop",
        "payments",
        json!({
            "host": "payments",
            "trafficPolicy": {
                "connectionPool": {
                    "tcp": {"connectTimeout": "250ms", "maxConnections": 3, "idleTimeout": "1h",
                            "maxConnectionDuration": "10m", "tcpKeepalive": {"time": "7200s"}},
                    "http": {"http1MaxPendingRequests": 1},
                },
                "outlierDetection": {"consecutive5xxErrors": 2, "interval": "1s",
                                     "baseEjectionTime": "3s", "maxEjectionPercent": 50},
                "loadBalancer": {"simple": "LEAST_REQUEST"},
                "tls": {"mode": "ISTIO_MUTUAL"},
            },
            "subsets": [{"name": "v1", "labels": {"version": "v1"}}],
        }),
    ))
    .expect("parses");
    let pool = p.rule.settings.pool.clone().expect("pool");
    assert_eq!(pool.connect_timeout, Some(Duration::from_millis(250)));
    assert_eq!(pool.max_connections, Some(3));
    assert_eq!(pool.idle_timeout, secs(3600));
    assert_eq!(pool.max_connection_duration, secs(600));
    let o = p.rule.settings.outlier.expect("outlier");
    assert_eq!(
        (
            o.threshold,
            o.interval,
            o.base_ejection,
            o.max_ejection_percent
        ),
        (2, Duration::from_secs(1), Duration::from_secs(3), 50)
    );
    assert_eq!(p.rule.settings.lb, Some(LbMode::LeastConnections));
    assert_eq!(p.rule.export, Export::All);
    assert_eq!(
        p.unsupported,
        [
            "spec.subsets",
            "spec.trafficPolicy.connectionPool.http",
            "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive",
            "spec.trafficPolicy.tls",
        ]
    );
}

#[test]
fn connect_failures_count_as_local_origin_or_as_5xx_and_gateway_errors() {
    let threshold = |od: Value| {
        rule(
            "a",
            "r",
            json!({"host": "x", "trafficPolicy": {"outlierDetection": od}}),
        )
        .settings
        .outlier
        .expect("outlier")
        .threshold
    };
    // Split: only consecutiveLocalOriginFailures counts (Envoy's default 5).
    assert_eq!(
        threshold(
            json!({"splitExternalLocalOriginErrors": true, "consecutiveLocalOriginFailures": 2, "consecutive5xxErrors": 9})
        ),
        2
    );
    assert_eq!(
        threshold(json!({"splitExternalLocalOriginErrors": true})),
        5
    );
    // Not split: a connect failure is a 5xx and a gateway error; the lower one ejects.
    assert_eq!(threshold(json!({"consecutive5xxErrors": 4})), 4);
    assert_eq!(threshold(json!({"consecutiveGatewayErrors": 3})), 3);
    assert_eq!(
        threshold(json!({"consecutive5xxErrors": 0, "consecutiveGatewayErrors": 7})),
        7
    );
    assert_eq!(threshold(json!({"consecutive5xxErrors": 0})), 0);
    assert_eq!(threshold(json!({})), 5, "Istio's default");
    // consecutiveLocalOriginFailures without the split is reported, not applied.
    let p = parse(&dr(
        "a",
        "r",
        json!({"host": "x", "trafficPolicy": {"outlierDetection": {"consecutiveLocalOriginFailures": 1}}}),
    ))
    .expect("parses");
    assert_eq!(p.rule.settings.outlier.expect("o").threshold, 5);
    assert_eq!(p.unsupported.len(), 1, "{:?}", p.unsupported);
}

#[test]
fn a_malformed_rule_is_refused_with_the_field_named() {
    let err = |spec: Value| parse(&dr("a", "r", spec)).expect_err("malformed");
    assert!(err(json!({})).contains("spec.host"));
    let e = err(
        json!({"host": "x", "trafficPolicy": {"connectionPool": {"tcp": {"connectTimeout": "5 parsecs"}}}}),
    );
    assert!(e.contains("connectionPool.tcp.connectTimeout"), "{e}");
    let e = err(
        json!({"host": "x", "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": -1}}}}),
    );
    assert!(e.contains("maxConnections"), "{e}");
    let e = err(
        json!({"host": "x", "trafficPolicy": {"outlierDetection": {"maxEjectionPercent": 101}}}),
    );
    assert!(e.contains("0-100"), "{e}");
    let e = err(json!({"host": "x", "trafficPolicy": {"loadBalancer": {"simple": "FASTEST"}}}));
    assert!(e.contains("ROUND_ROBIN"), "{e}");
    let e = err(json!({"host": "x", "workloadSelector": {"matchLabels": {"app": "a"}}}));
    assert!(e.contains("workloadSelector"), "{e}");
    let e =
        err(json!({"host": "x", "trafficPolicy": {"portLevelSettings": [{"connectionPool": {}}]}}));
    assert!(e.contains("port.number"), "{e}");
    assert!(parse(&json!("not an object")).is_err());
}

#[test]
fn port_level_settings_replace_the_top_level_section_by_section() {
    let r = rule(
        "shop",
        "p",
        json!({"host": "p", "trafficPolicy": {
            "connectionPool": {"tcp": {"connectTimeout": "1s", "maxConnections": 10}},
            "loadBalancer": {"simple": "LEAST_CONN"},
            "portLevelSettings": [{"port": {"number": 9090},
                                   "connectionPool": {"tcp": {"connectTimeout": "2s"}}}],
        }}),
    );
    let p80 = r.for_port(80);
    let p9090 = r.for_port(9090);
    assert_eq!(p80.pool.as_ref().and_then(|p| p.max_connections), Some(10));
    let pool = p9090.pool.expect("port pool");
    assert_eq!(pool.connect_timeout, secs(2));
    assert_eq!(
        pool.max_connections, None,
        "the port's pool replaces the whole section, as Istio merges"
    );
    assert_eq!(p9090.lb, Some(LbMode::LeastConnections), "not overridden");
}

#[test]
fn hosts_match_short_names_fqdns_and_wildcards() {
    use super::host::host_rank;
    let svc = "payments.shop.svc.cluster.local";
    let r = |ns: &str, host: &str| rule(ns, "r", json!({"host": host}));
    assert!(host_rank(&r("shop", "payments"), svc).is_some());
    assert!(
        host_rank(&r("other", "payments"), svc).is_none(),
        "a short name is the rule's namespace's"
    );
    assert!(host_rank(&r("other", svc), svc).is_some());
    assert!(host_rank(&r("other", "payments.shop"), svc).is_none());
    assert!(host_rank(&r("x", "*.shop.svc.cluster.local"), svc).is_some());
    assert!(host_rank(&r("x", "*.other.svc.cluster.local"), svc).is_none());
    assert!(host_rank(&r("x", "*"), svc).is_some());
    let exact = host_rank(&r("shop", "payments"), svc);
    let ns_wild = host_rank(&r("x", "*.shop.svc.cluster.local"), svc);
    let all_wild = host_rank(&r("x", "*.cluster.local"), svc);
    assert!(exact > ns_wild && ns_wild > all_wild && all_wild > Some(0));
}

/// payments.shop at 10.96.0.10:80, the local pod `POD` in namespace `client_ns`.
fn world(client_ns: &str) -> Identities {
    let ids = Identities::new();
    ids.write(|ix| {
        ix.apply_service(ServiceObject {
            namespace: "shop".into(),
            name: "payments".into(),
            cluster_ips: vec!["10.96.0.10".parse().expect("ip")],
            ports: vec![80],
            port_names: vec!["http".into()],
        });
        ix.set_local(
            POD,
            Local {
                namespace: client_ns.into(),
                name: "web-1".into(),
            },
        );
    });
    ids
}

const POD: &str = "web/web-1";

fn out(peer: &str) -> PeerKey {
    PeerKey::new(POD, 1, Direction::Outbound, peer.parse().expect("addr"))
}

fn timeout_rule(ns: &str, name: &str, host: &str, t: &str, export: Option<Value>) -> Value {
    let mut spec = json!({"host": host,
        "trafficPolicy": {"connectionPool": {"tcp": {"connectTimeout": t}}}});
    if let Some(e) = export {
        spec["exportTo"] = e;
    }
    dr(ns, name, spec)
}

fn connect_timeout(drs: &DestinationRules, ids: &Identities) -> Option<Duration> {
    drs.lookup(&out("10.96.0.10:80"), &ids.read())
        .and_then(|a| a.settings.pool)
        .and_then(|p| p.connect_timeout)
}

#[test]
fn the_client_namespace_wins_then_the_services_then_the_root() {
    let ids = world("web");
    let drs = DestinationRules::default();
    let put = |v: Value| drs.apply(parse(&v).expect("parses").rule);
    let fq = "payments.shop.svc.cluster.local";
    put(timeout_rule(
        DEFAULT_ROOT_NAMESPACE,
        "mesh",
        "*",
        "9s",
        None,
    ));
    assert_eq!(connect_timeout(&drs, &ids), secs(9));
    put(timeout_rule("shop", "owner", "payments", "2s", None));
    assert_eq!(connect_timeout(&drs, &ids), secs(2));
    put(timeout_rule("web", "client", fq, "1s", None));
    assert_eq!(connect_timeout(&drs, &ids), secs(1));
    // Within one namespace: the exact host beats a wildcard, whatever the order.
    put(timeout_rule(
        "web",
        "wild",
        "*.shop.svc.cluster.local",
        "5s",
        None,
    ));
    assert_eq!(connect_timeout(&drs, &ids), secs(1));
    drs.delete("web", "client");
    assert_eq!(connect_timeout(&drs, &ids), secs(5));
    drs.delete("web", "wild");
    drs.delete("shop", "owner");
    drs.delete(DEFAULT_ROOT_NAMESPACE, "mesh");
    assert_eq!(connect_timeout(&drs, &ids), None);
    // Another namespace's rule, not the client's nor the Service's: never.
    put(timeout_rule("elsewhere", "x", fq, "4s", None));
    assert_eq!(connect_timeout(&drs, &ids), None);
}

#[test]
fn export_to_limits_who_sees_a_rule() {
    let drs = DestinationRules::default();
    let put = |v: Value| drs.apply(parse(&v).expect("parses").rule);
    put(timeout_rule(
        "shop",
        "own",
        "payments",
        "2s",
        Some(json!(["."])),
    ));
    assert_eq!(
        connect_timeout(&drs, &world("web")),
        None,
        "exported nowhere else"
    );
    assert_eq!(
        connect_timeout(&drs, &world("shop")),
        secs(2),
        "its own namespace"
    );
    put(timeout_rule(
        "shop",
        "own",
        "payments",
        "2s",
        Some(json!(["web"])),
    ));
    assert_eq!(connect_timeout(&drs, &world("web")), secs(2));
    assert_eq!(connect_timeout(&drs, &world("api")), None);
    put(timeout_rule(
        "shop",
        "own",
        "payments",
        "2s",
        Some(json!(["*"])),
    ));
    assert_eq!(connect_timeout(&drs, &world("api")), secs(2));
    put(timeout_rule(
        "shop",
        "own",
        "payments",
        "2s",
        Some(json!(["~"])),
    ));
    assert_eq!(connect_timeout(&drs, &world("api")), None);
}

#[test]
fn the_rule_applies_to_the_cluster_ip_and_port_outbound_only() {
    let ids = world("web");
    let drs = DestinationRules::default();
    drs.apply(rule(
        "shop",
        "p",
        json!({"host": "payments", "trafficPolicy": {"outlierDetection": {}}}),
    ));
    let ix = ids.read();
    assert!(drs.lookup(&out("10.96.0.10:80"), &ix).is_some());
    assert!(
        drs.lookup(&out("10.96.0.10:81"), &ix).is_none(),
        "not a Service port"
    );
    assert!(drs.lookup(&out("10.96.0.11:80"), &ix).is_none());
    let inbound = PeerKey::new(
        POD,
        1,
        Direction::Inbound,
        "10.96.0.10:80".parse().expect("a"),
    );
    assert!(drs.lookup(&inbound, &ix).is_none());
}

#[test]
fn the_policy_file_defaults_yield_to_the_rule_and_its_rules_override_it() {
    let ids = world("web");
    let drs = DestinationRules::default();
    drs.apply(rule(
        "shop",
        "p",
        json!({"host": "payments", "trafficPolicy": {
            "connectionPool": {"tcp": {"connectTimeout": "1s", "maxConnections": 4, "idleTimeout": "30s",
                                       "maxConnectionDuration": "10m"}},
            "outlierDetection": {"consecutive5xxErrors": 1},
        }}),
    ));
    let file = "[defaults]\nconnect_timeout = \"7s\"\nqueue = 9\n\n[[rule]]\nservice = \"payments.shop\"\nidle_timeout = \"5s\"\n";
    let set = PolicySet::parse(file, Path::new("p.toml"), Knobs::default()).expect("file");
    let k = out("10.96.0.10:80");
    let p = set.resolve_with_rules(&k, &ids.read(), &drs);
    assert_eq!(p.timeouts.connect, secs(1), "the rule beats [defaults]");
    assert_eq!(p.timeouts.idle, secs(5), "the file's rule beats the rule");
    assert_eq!(p.timeouts.max_lifetime, secs(600));
    let c = p.concurrency.expect("maxConnections");
    assert_eq!(
        (c.max_concurrent, c.max_queue),
        (4, 0),
        "overflow refused, not queued"
    );
    assert!(p.endpoint_selection, "outlier detection: the agent picks");
    // Without the rule, the defaults again.
    drs.delete("shop", "p");
    let p = set.resolve_with_rules(&k, &ids.read(), &drs);
    assert_eq!(p.timeouts.connect, secs(7));
    assert_eq!(p.timeouts.max_lifetime, None);
    assert!(p.concurrency.is_none() && !p.endpoint_selection);
}
