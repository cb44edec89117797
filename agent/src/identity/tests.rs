//! The index, deterministically: objects in, lookups out.
use std::{collections::BTreeMap, net::IpAddr, path::Path};

use super::{
    index::{Index, Local},
    names, PodObject, ServiceObject, SliceObject,
};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn svc(ns: &str, name: &str, cluster_ip: Option<&str>, ports: &[u16]) -> ServiceObject {
    ServiceObject {
        namespace: ns.into(),
        name: name.into(),
        cluster_ips: cluster_ip.into_iter().map(ip).collect(),
        ports: ports.to_vec(),
        ..Default::default()
    }
}

fn slice(ns: &str, name: &str, service: &str, addrs: &[&str], ports: &[u16]) -> SliceObject {
    SliceObject {
        namespace: ns.into(),
        name: name.into(),
        service: service.into(),
        addresses: addrs.iter().map(|a| ip(a)).collect(),
        ports: ports.to_vec(),
        ..Default::default()
    }
}

fn pod(ns: &str, name: &str, addr: &str, workload: &str, labels: &[(&str, &str)]) -> PodObject {
    PodObject {
        namespace: ns.into(),
        name: name.into(),
        ips: vec![ip(addr)],
        workload: workload.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
    }
}

/// payments.shop: ClusterIP 10.96.0.10:80 -> pods 10.1.0.5, 10.1.0.6 on 8080.
fn shop() -> Index {
    let mut ix = Index::default();
    ix.apply_service(svc("shop", "payments", Some("10.96.0.10"), &[80]));
    ix.apply_slice(slice(
        "shop",
        "payments-abc",
        "payments",
        &["10.1.0.5", "10.1.0.6"],
        &[8080],
    ));
    ix.apply_pod(pod(
        "shop",
        "payments-7d-x",
        "10.1.0.5",
        "payments",
        &[("app", "pay")],
    ));
    ix.apply_pod(pod(
        "shop",
        "payments-7d-y",
        "10.1.0.6",
        "payments",
        &[("app", "pay")],
    ));
    ix
}

#[test]
fn a_cluster_ip_on_a_service_port_is_the_service() {
    let ix = shop();
    let id = ix.peer(ip("10.96.0.10"), 80);
    assert_eq!(id.service(), Some("payments.shop"));
    assert_eq!(id.namespace.as_deref(), Some("shop"));
    assert_eq!(
        id.workload, None,
        "balanced over its endpoints: no single workload"
    );
    assert!(
        ix.peer(ip("10.96.0.10"), 81).is_unknown(),
        "not a port of the Service"
    );
}

#[test]
fn a_backend_address_is_its_pod_and_its_services() {
    let ix = shop();
    let id = ix.peer(ip("10.1.0.5"), 8080);
    assert_eq!(id.service(), Some("payments.shop"));
    assert_eq!(id.workload.as_deref(), Some("payments"));
    assert_eq!(id.labels.get("app").map(String::as_str), Some("pay"));
    let other_port = ix.peer(ip("10.1.0.5"), 9090);
    assert_eq!(other_port.service(), None, "not an endpoint port");
    assert_eq!(
        other_port.workload.as_deref(),
        Some("payments"),
        "still the pod"
    );
}

#[test]
fn an_ipv4_mapped_address_resolves_as_ipv4() {
    let ix = shop();
    let id = ix.peer(ip("::ffff:10.1.0.6"), 8080);
    assert_eq!(id.service(), Some("payments.shop"));
}

#[test]
fn a_replaced_endpoint_moves_the_service_to_the_new_address() {
    let mut ix = shop();
    ix.apply_slice(slice(
        "shop",
        "payments-abc",
        "payments",
        &["10.1.0.6", "10.1.0.7"],
        &[8080],
    ));
    ix.delete_pod("shop", "payments-7d-x");
    ix.apply_pod(pod("shop", "payments-7d-z", "10.1.0.7", "payments", &[]));
    assert!(
        ix.peer(ip("10.1.0.5"), 8080).is_unknown(),
        "the old address is nobody now"
    );
    assert_eq!(
        ix.peer(ip("10.1.0.7"), 8080).service(),
        Some("payments.shop")
    );
    assert_eq!(
        ix.peer(ip("10.96.0.10"), 80).service(),
        Some("payments.shop")
    );
}

#[test]
fn a_deleted_service_falls_back_to_the_pod_then_to_nothing() {
    let mut ix = shop();
    ix.delete_service("shop", "payments");
    ix.delete_slice("shop", "payments-abc");
    assert!(ix.peer(ip("10.96.0.10"), 80).is_unknown());
    let id = ix.peer(ip("10.1.0.5"), 8080);
    assert_eq!(id.service(), None);
    assert_eq!(id.workload.as_deref(), Some("payments"));
}

#[test]
fn a_headless_service_is_found_through_its_endpoints() {
    let mut ix = Index::default();
    ix.apply_service(svc("data", "db", None, &[5432]));
    ix.apply_slice(slice("data", "db-1", "db", &["10.2.0.9"], &[5432]));
    ix.apply_pod(pod("data", "db-0", "10.2.0.9", "db", &[]));
    let id = ix.peer(ip("10.2.0.9"), 5432);
    assert_eq!(id.service(), Some("db.data"));
    assert_eq!(id.workload.as_deref(), Some("db"));
}

#[test]
fn a_selectorless_endpoint_is_its_service() {
    let mut ix = Index::default();
    ix.apply_slice(slice("ext", "legacy-1", "legacy", &["192.0.2.7"], &[]));
    let id = ix.peer(ip("192.0.2.7"), 443);
    assert_eq!(
        id.service(),
        Some("legacy.ext"),
        "no ports listed: every port"
    );
    assert_eq!(id.namespace.as_deref(), Some("ext"));
}

#[test]
fn a_pod_in_two_services_lists_both_sorted() {
    let mut ix = shop();
    ix.apply_slice(slice("shop", "all-1", "all", &["10.1.0.5"], &[8080]));
    let id = ix.peer(ip("10.1.0.5"), 8080);
    let names: Vec<&str> = id.services.iter().map(|s| &**s).collect();
    assert_eq!(names, ["all.shop", "payments.shop"]);
}

#[test]
fn a_relist_drops_what_it_does_not_list() {
    let mut ix = shop();
    ix.replace_services(vec![svc("shop", "cart", Some("10.96.0.11"), &[80])]);
    ix.replace_slices(vec![]);
    ix.replace_pods(vec![]);
    assert!(ix.peer(ip("10.96.0.10"), 80).is_unknown());
    assert!(ix.peer(ip("10.1.0.5"), 8080).is_unknown());
    assert_eq!(ix.peer(ip("10.96.0.11"), 80).service(), Some("cart.shop"));
    assert_eq!(ix.sizes(), (1, 0, 0));
}

#[test]
fn a_pod_that_changes_address_leaves_nothing_at_the_old_one() {
    let mut ix = shop();
    ix.apply_pod(pod("shop", "payments-7d-x", "10.1.0.50", "payments", &[]));
    assert_eq!(ix.peer(ip("10.1.0.5"), 9).workload, None);
    assert_eq!(
        ix.peer(ip("10.1.0.50"), 9).workload.as_deref(),
        Some("payments")
    );
}

#[test]
fn a_local_pod_follows_its_pod_object_and_its_services_on_a_port() {
    let mut ix = shop();
    ix.set_local(
        "@gold/shop/payments-7d-x",
        Local {
            namespace: "shop".into(),
            name: "payments-7d-x".into(),
        },
    );
    let id = ix.local("@gold/shop/payments-7d-x", None);
    assert_eq!(id.workload.as_deref(), Some("payments"));
    assert_eq!(
        id.service(),
        None,
        "outbound: the pod's own Services are not asked for"
    );
    let id = ix.local("@gold/shop/payments-7d-x", Some(8080));
    assert_eq!(
        id.service(),
        Some("payments.shop"),
        "inbound on 8080: the Service it serves"
    );
    ix.apply_pod(pod(
        "shop",
        "payments-7d-x",
        "10.1.0.5",
        "payments",
        &[("tier", "gold")],
    ));
    let id = ix.local("@gold/shop/payments-7d-x", None);
    assert_eq!(
        id.labels.get("tier").map(String::as_str),
        Some("gold"),
        "labels live"
    );
}

#[test]
fn a_local_pod_not_listed_yet_is_named_by_its_object_name() {
    let mut ix = Index::default();
    ix.set_local(
        "shop/web-1",
        Local {
            namespace: "shop".into(),
            name: "web-1".into(),
        },
    );
    let id = ix.local("shop/web-1", None);
    assert_eq!(id.namespace.as_deref(), Some("shop"));
    assert_eq!(id.workload.as_deref(), Some("web-1"));
}

#[test]
fn without_the_api_enrolled_pods_are_named_by_their_netns() {
    let mut ix = Index::default();
    ix.set_enrolled("/var/run/netns/web-1", &[ip("127.0.0.1"), ip("10.3.0.2")]);
    let id = ix.local("/var/run/netns/web-1", None);
    assert_eq!(id.workload.as_deref(), Some("web-1"));
    assert_eq!(id.namespace, None);
    assert_eq!(
        ix.peer(ip("10.3.0.2"), 80).workload.as_deref(),
        Some("web-1")
    );
    assert!(
        ix.peer(ip("127.0.0.1"), 80).is_unknown(),
        "loopback is not the pod's"
    );
    ix.remove_enrolled("/var/run/netns/web-1");
    assert!(ix.peer(ip("10.3.0.2"), 80).is_unknown());
    assert!(ix.local("/var/run/netns/web-1", None).is_unknown());
}

#[test]
fn static_names_take_the_longest_block_and_yield_to_the_api() {
    let text = r#"
[[name]]
cidr = "10.0.0.0/8"
workload = "corp"

[[name]]
cidr = "10.0.5.0/24"
service = "db.shop"
"#;
    let statics = names::parse(text, Path::new("names.toml")).expect("parse");
    let mut ix = shop();
    ix.set_statics(statics);
    let id = ix.peer(ip("10.0.5.7"), 5432);
    assert_eq!(id.service(), Some("db.shop"));
    assert_eq!(
        id.namespace.as_deref(),
        Some("shop"),
        "from the service name"
    );
    assert_eq!(ix.peer(ip("10.9.9.9"), 1).workload.as_deref(), Some("corp"));
    assert_eq!(
        ix.peer(ip("10.96.0.10"), 80).service(),
        Some("payments.shop"),
        "the API's answer comes first"
    );
}

#[test]
fn static_name_errors_name_the_file_line_and_fix() {
    let err = |text: &str| names::parse(text, Path::new("/etc/n.toml")).expect_err("bad");
    let e = err("[[name]]\ncidr = \"10.0.5.0/24\"\nservice = \"db\"\n");
    assert!(
        e.starts_with("/etc/n.toml:3:11: name #1: service = \"db\""),
        "{e}"
    );
    assert!(e.contains("NAME.NAMESPACE"), "{e}");
    let e = err("[[name]]\ncidr = \"10.0.5.0/33\"\nworkload = \"x\"\n");
    assert!(e.starts_with("/etc/n.toml:2:8: name #1: cidr"), "{e}");
    let e = err("[[name]]\ncidr = \"10.0.5.0/24\"\n");
    assert!(e.contains("names nothing"), "{e}");
    let e = err("[[name]]\nworkload = \"x\"\n");
    assert!(e.contains("no cidr"), "{e}");
    let e = err("[[name]]\ncidr = \"10.0.0.0/8\"\nworkload = \"x\"\nwrkload = 1\n");
    assert!(e.starts_with("/etc/n.toml:4:1:"), "{e}");
}

#[test]
fn an_update_that_changes_nothing_bumps_no_generation() {
    let ids = super::Identities::new();
    ids.write(|ix| ix.apply_pod(pod("shop", "a", "10.1.0.5", "a", &[])));
    let g = ids.generation();
    ids.write(|ix| ix.apply_pod(pod("shop", "a", "10.1.0.5", "a", &[])));
    ids.write(|ix| ix.delete_service("shop", "nothing"));
    assert_eq!(ids.generation(), g, "a status update: the same identity");
    ids.write(|ix| ix.apply_pod(pod("shop", "a", "10.1.0.5", "a", &[("v", "2")])));
    assert_eq!(ids.generation(), g + 1, "a label changed");
}

#[test]
fn a_services_ready_endpoints_pair_its_port_with_the_slice_port_of_the_same_name() {
    let mut ix = Index::default();
    ix.apply_service(ServiceObject {
        ports: vec![80, 9090],
        port_names: vec!["http".into(), "metrics".into()],
        ..svc("shop", "payments", Some("10.96.0.10"), &[])
    });
    ix.apply_slice(SliceObject {
        ports: vec![9100, 8080],
        port_names: vec!["metrics".into(), "http".into()],
        ready: vec![ip("10.1.0.5"), ip("10.1.0.6")],
        ..slice(
            "shop",
            "payments-a",
            "payments",
            &["10.1.0.5", "10.1.0.6", "10.1.0.7"],
            &[],
        )
    });
    // Another Service's slice, and one of the same name in another namespace: not its.
    ix.apply_slice(SliceObject {
        port_names: vec!["http".into()],
        ready: vec![ip("10.2.0.1")],
        ..slice("shop", "cart-a", "cart", &["10.2.0.1"], &[8080])
    });
    ix.apply_slice(SliceObject {
        port_names: vec!["http".into()],
        ready: vec![ip("10.3.0.1")],
        ..slice("other", "payments-a", "payments", &["10.3.0.1"], &[8080])
    });
    let eps = |port| {
        ix.service_endpoints("shop", "payments", port)
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        eps(80),
        ["10.1.0.5:8080", "10.1.0.6:8080"],
        "10.1.0.7 is not ready"
    );
    assert_eq!(eps(9090), ["10.1.0.5:9100", "10.1.0.6:9100"]);
    assert!(eps(81).is_empty(), "not a Service port");
    assert_eq!(
        ix.service_at(ip("10.96.0.10"), 9090)
            .map(|s| s.name.as_str()),
        Some("payments")
    );
    assert!(ix.service_at(ip("10.96.0.10"), 81).is_none());
    // One unnamed port on each side pairs up, as kube-proxy does.
    let mut ix = Index::default();
    ix.apply_service(ServiceObject {
        port_names: vec![String::new()],
        ..svc("shop", "db", Some("10.96.0.11"), &[5432])
    });
    ix.apply_slice(SliceObject {
        ready: vec![ip("10.1.0.9")],
        ..slice("shop", "db-a", "db", &["10.1.0.9"], &[15432])
    });
    assert_eq!(
        ix.service_endpoints("shop", "db", 5432),
        vec!["10.1.0.9:15432"
            .parse::<std::net::SocketAddr>()
            .expect("addr")]
    );
}
