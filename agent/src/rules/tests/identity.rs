//! Rules by identity: parsing and its errors, matching through the identity index (a rule on
//! a Service follows its endpoints with no new policy), and where identity matchers stand in
//! specificity.

use crate::identity::{index::Local, Identities, PodObject, ServiceObject, SliceObject};
use crate::policy::{table::TableConfig, Direction, Nanos, PeerKey, PeerTable};
use crate::rules::{knobs::Knobs, set::PolicySet};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const POD: &str = "shop/web-1";

fn parse(text: &str) -> PolicySet {
    PolicySet::parse(text, Path::new("test.toml"), Knobs::default())
        .unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn err(text: &str) -> String {
    PolicySet::parse(text, Path::new("/p.toml"), Knobs::default())
        .err()
        .unwrap_or_else(|| panic!("accepted:\n{text}"))
        .to_string()
}

fn key(direction: Direction, peer: &str) -> PeerKey {
    let peer: SocketAddr = peer.parse().expect("addr");
    PeerKey::new(POD, 1, direction, peer)
}

fn pod(name: &str, ip: &str, workload: &str, labels: &[(&str, &str)]) -> PodObject {
    PodObject {
        namespace: "shop".into(),
        name: name.into(),
        ips: vec![ip.parse().expect("ip")],
        workload: workload.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
    }
}

/// payments.shop (10.96.0.10:80 -> 10.1.0.5:8080), and the local pod web-1 of frontend.
fn cluster() -> Identities {
    let ids = Identities::new();
    ids.write(|ix| {
        ix.apply_service(ServiceObject {
            namespace: "shop".into(),
            name: "payments".into(),
            cluster_ips: vec!["10.96.0.10".parse().expect("ip")],
            ports: vec![80],
            ..Default::default()
        });
        ix.apply_slice(SliceObject {
            namespace: "shop".into(),
            name: "payments-1".into(),
            service: "payments".into(),
            addresses: vec!["10.1.0.5".parse().expect("ip")],
            ports: vec![8080],
            ..Default::default()
        });
        ix.apply_pod(pod("payments-x", "10.1.0.5", "payments", &[("app", "pay")]));
        ix.apply_pod(pod("web-1", "10.1.0.9", "frontend", &[("tier", "web")]));
        ix.set_local(
            POD,
            Local {
                namespace: "shop".into(),
                name: "web-1".into(),
            },
        );
    });
    ids
}

fn connect(set: &PolicySet, ids: &Identities, k: &PeerKey) -> Option<Duration> {
    set.resolve_with(k, &ids.read()).timeouts.connect
}

const SECS_1: Option<Duration> = Some(Duration::from_secs(1));
const DEFAULT: Option<Duration> = Some(Duration::from_secs(3));

#[test]
fn a_service_rule_applies_to_its_cluster_ip_and_its_endpoints() {
    let set = parse("[[rule]]\nservice = \"payments.shop\"\nconnect_timeout = \"1s\"\n");
    let ids = cluster();
    let out = |p| key(Direction::Outbound, p);
    assert_eq!(connect(&set, &ids, &out("10.96.0.10:80")), SECS_1);
    assert_eq!(connect(&set, &ids, &out("10.1.0.5:8080")), SECS_1);
    assert_eq!(
        connect(&set, &ids, &out("10.1.0.5:9090")),
        DEFAULT,
        "not an endpoint port"
    );
    assert_eq!(
        connect(&set, &ids, &out("10.96.0.11:80")),
        DEFAULT,
        "external"
    );
    let glob = parse("[[rule]]\nservice = \"*.shop\"\nconnect_timeout = \"1s\"\n");
    assert_eq!(connect(&glob, &ids, &out("10.96.0.10:80")), SECS_1);
}

#[test]
fn a_service_rule_follows_a_replaced_endpoint_in_a_live_table() {
    let set = Arc::new(parse(
        "[[rule]]\nservice = \"payments.shop\"\nmax_conns = 7\n",
    ));
    let ids = cluster();
    let mut table = PeerTable::new(TableConfig::default(), set.clone().source(ids.clone()));
    let new_backend = key(Direction::Outbound, "10.1.0.6:8080");
    let t0 = Nanos::ZERO;
    let max = |t: &mut PeerTable<PeerKey>, k: &PeerKey| {
        t.admit(t0, k, 0.5);
        t.policy(k)
            .and_then(|p| p.concurrency.map(|c| c.max_concurrent))
    };
    assert_eq!(max(&mut table, &new_backend), None, "not a backend yet");
    ids.write(|ix| {
        ix.apply_slice(SliceObject {
            namespace: "shop".into(),
            name: "payments-1".into(),
            service: "payments".into(),
            addresses: vec!["10.1.0.6".parse().expect("ip")],
            ports: vec![8080],
            ..Default::default()
        })
    });
    // What the agent does when the index changes: the same set, a new source.
    table.set_source(set.clone().source(ids.clone()));
    assert_eq!(
        max(&mut table, &new_backend),
        Some(7),
        "the new endpoint is the Service"
    );
    let old = key(Direction::Outbound, "10.1.0.5:8080");
    assert_eq!(max(&mut table, &old), None, "the replaced one is not");
}

#[test]
fn peer_and_local_workload_namespace_and_labels_all_must_match() {
    let ids = cluster();
    let out = key(Direction::Outbound, "10.1.0.5:8080");
    let ok = |m: &str| {
        let set = parse(&format!("[[rule]]\n{m}\nconnect_timeout = \"1s\"\n"));
        connect(&set, &ids, &out) == SECS_1
    };
    assert!(ok("peer_workload = \"payments\""));
    assert!(ok(
        "peer_namespace = \"shop\"\npeer_labels = { app = \"pay\" }"
    ));
    assert!(
        !ok("peer_labels = { app = \"pay\", tier = \"x\" }"),
        "every label"
    );
    assert!(ok(
        "workload = \"front*\"\nnamespace = \"shop\"\nlabels = { tier = \"web\" }"
    ));
    assert!(
        !ok("workload = \"frontend\"\npeer_workload = \"cart\""),
        "all must match"
    );
    assert!(!ok("namespace = \"other\""));
    let external = key(Direction::Outbound, "192.0.2.1:80");
    let set = parse("[[rule]]\npeer_namespace = \"*\"\nconnect_timeout = \"1s\"\n");
    assert_eq!(
        connect(&set, &ids, &external),
        DEFAULT,
        "external: no namespace"
    );
}

#[test]
fn inbound_the_service_is_the_one_called_and_the_peer_is_the_client() {
    let ids = cluster();
    ids.write(|ix| {
        ix.apply_slice(SliceObject {
            namespace: "shop".into(),
            name: "web-1s".into(),
            service: "web".into(),
            addresses: vec!["10.1.0.9".parse().expect("ip")],
            ports: vec![8080],
            ..Default::default()
        })
    });
    // payments-x (10.1.0.5) calls web-1 on 8080.
    let inbound = key(Direction::Inbound, "10.1.0.5:8080");
    let set = parse("[[rule]]\nservice = \"web.shop\"\npeer_workload = \"payments\"\nconnect_timeout = \"1s\"\n");
    assert_eq!(connect(&set, &ids, &inbound), SECS_1);
    let set = parse("[[rule]]\nservice = \"payments.shop\"\nconnect_timeout = \"1s\"\n");
    assert_eq!(
        connect(&set, &ids, &inbound),
        DEFAULT,
        "the client's own Service is not the one called"
    );
}

#[test]
fn a_service_outranks_a_cidr_and_a_workload_a_namespace() {
    let ids = cluster();
    let out = key(Direction::Outbound, "10.96.0.10:80");
    let both = |a: &str, b: &str| {
        for text in [format!("{a}{b}"), format!("{b}{a}")] {
            assert_eq!(connect(&parse(&text), &ids, &out), SECS_1, "{text}");
        }
    };
    both(
        "[[rule]]\nservice = \"payments.shop\"\nconnect_timeout = \"1s\"\n",
        "[[rule]]\npeer = \"10.96.0.10\"\nports = 80\nconnect_timeout = \"2s\"\n",
    );
    both(
        "[[rule]]\nservice = \"payments.shop\"\nconnect_timeout = \"1s\"\n",
        "[[rule]]\nservice = \"*.shop\"\nconnect_timeout = \"2s\"\n",
    );
    both(
        "[[rule]]\nworkload = \"frontend\"\nconnect_timeout = \"1s\"\n",
        "[[rule]]\nnamespace = \"shop\"\nservice = \"payments.shop\"\nconnect_timeout = \"2s\"\n",
    );
    both(
        "[[rule]]\npod = \"web-*\"\nconnect_timeout = \"1s\"\n",
        "[[rule]]\nworkload = \"frontend\"\nconnect_timeout = \"2s\"\n",
    );
}

#[test]
fn identity_errors_name_file_line_field_and_fix() {
    let e = err("[[rule]]\nservice = \"payments\"\nmax_conns = 1\n");
    assert!(
        e.starts_with("/p.toml:2:11: rule #1: service = \"payments\""),
        "{e}"
    );
    assert!(e.contains("NAME.NAMESPACE"), "{e}");
    let e = err("[[rule]]\nservice = \"Pay.shop\"\nmax_conns = 1\n");
    assert!(e.contains("payments.shop"), "{e}");
    let e = err("[[rule]]\npeer_labels = \"app=web\"\nmax_conns = 1\n");
    assert!(
        e.contains("peer_labels") && e.contains("{ app = \"web\" }"),
        "{e}"
    );
    let e = err("[[rule]]\nlabels = {}\nmax_conns = 1\n");
    assert!(e.contains("no labels"), "{e}");
    let e = err("[[rule]]\nlabels = { app = 1 }\nmax_conns = 1\n");
    assert!(e.contains("label app: expected a string"), "{e}");
    let e = err("[[rule]]\nworkload = \"a b\"\nmax_conns = 1\n");
    assert!(e.contains("rule #1: workload = \"a b\""), "{e}");
    let e = err("[[rule]]\nservce = \"a.b\"\nmax_conns = 1\n");
    assert!(e.contains("did you mean `service`"), "{e}");
    let e = err("[[rule]]\npeer_namespace = 3\nmax_conns = 1\n");
    assert!(e.contains("expected a string"), "{e}");
}
