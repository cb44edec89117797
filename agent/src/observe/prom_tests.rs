use super::*;
use crate::datapath::stats::{PeerRecord, PodCounters};
use sockmesh_common::peer::{PeerKey, PeerNames, PeerState, PodMeta};
use sockmesh_common::SockAddr;

fn snapshot(peers: usize) -> Snapshot {
    let mut counters = [0u64; counter::COUNT];
    counters[counter::REDIRECT_TCP] = 9;
    Snapshot {
        pods: vec![PodCounters {
            netns_cookie: 7,
            enrolled: true,
            counters,
            meta: Some(PodMeta::new("web \"a\"", 1)),
            refused: {
                let mut r = [0; sockmesh_common::peer::pod_refusal::COUNT];
                r[sockmesh_common::peer::pod_refusal::CONN_POD_CAP] = 3;
                r
            },
        }],
        peers: (0..peers)
            .map(|i| PeerRecord {
                key: PeerKey {
                    netns_cookie: 7,
                    peer: SockAddr::from_std(
                        format!("10.1.{}.{}:80", i / 250, i % 250)
                            .parse()
                            .expect("addr"),
                    ),
                    direction: sockmesh_common::peer::direction::OUTBOUND,
                    _pad: 0,
                },
                kernel: [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                state: PeerState {
                    conns_total: 1,
                    bytes_out: i as u64,
                    bytes_in: 1,
                    ..Default::default()
                },
                names: None,
                live: None,
            })
            .collect(),
        agent: [0; agent_counter::COUNT],
        monotonic_ns: 0,
    }
}

/// (name, labels, value) of every sample line; checks each family is declared before use.
fn samples(text: &str) -> Vec<(String, String, f64)> {
    let mut typed = std::collections::HashSet::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().expect("name");
            assert!(
                typed.insert(name.to_string()),
                "family {name} declared twice"
            );
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("value");
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        assert!(
            typed.contains(name),
            "{name} has no TYPE line before its samples"
        );
        out.push((name.into(), labels.into(), value.parse().expect("number")));
    }
    out
}

#[test]
fn peers_beyond_the_top_are_folded_into_other_exactly() {
    let snap = snapshot(1000);
    let rows = super::super::view::peer_rows(&snap);
    let text = render(&snap, &rows, 10, true);
    let s = samples(&text);
    let sent: Vec<&(String, String, f64)> = s
        .iter()
        .filter(|(n, _, _)| n == "sockmesh_peer_sent_bytes_total")
        .collect();
    assert_eq!(sent.len(), 11, "10 peers and other");
    // The biggest senders keep their label; the rest add up exactly.
    assert!(sent
        .iter()
        .any(|(_, l, v)| l.contains("peer=\"10.1.3.249:80\"") && *v == 999.0));
    let total: f64 = sent.iter().map(|(_, _, v)| v).sum();
    assert_eq!(total, (0..1000).sum::<u64>() as f64);
    let other = sent
        .iter()
        .find(|(_, l, _)| l.contains("peer=\"other\""))
        .expect("other");
    assert_eq!(other.2, (0..990).sum::<u64>() as f64);
    let conns: f64 = s
        .iter()
        .filter(|(n, _, _)| n == "sockmesh_peer_connections_total")
        .map(|(_, _, v)| v)
        .sum();
    assert_eq!(conns, 1000.0);
    assert!(s
        .iter()
        .any(|(n, l, v)| n == "sockmesh_peers" && l == "kind=\"folded\"" && *v == 990.0));
    // Label values are escaped.
    assert!(text.contains("pod=\"web \\\"a\\\"\""));
}

#[test]
fn kernel_events_and_readiness_are_exported() {
    let snap = snapshot(1);
    let rows = super::super::view::peer_rows(&snap);
    let s = samples(&render(&snap, &rows, 10, false));
    assert!(s.iter().any(|(n, l, v)| n == "sockmesh_kernel_events_total"
        && l.contains("event=\"redirect_tcp\"")
        && *v == 9.0));
    assert!(s.iter().any(|(n, _, v)| n == "sockmesh_ready" && *v == 0.0));
    // Every refusal kind has its series per pod, zero or not.
    let refused: Vec<_> = s
        .iter()
        .filter(|(n, _, _)| n == "sockmesh_pod_refused_total")
        .collect();
    // The agent's kinds and the kernel's quotas.
    assert_eq!(
        refused.len(),
        sockmesh_common::peer::pod_refusal::NAMES.len() + sockmesh_common::counter::REFUSALS.len()
    );
    assert!(refused
        .iter()
        .any(|(_, l, _)| l.contains("reason=\"dns_quota\"")));
    assert!(refused
        .iter()
        .any(|(_, l, v)| l.contains("reason=\"conn_pod_cap\"") && *v == 3.0));
}

/// Peers 0..1000 where every peer whose number is a multiple of 10 is an endpoint of
/// payments.shop (workload payments); the pod is frontend in shop.
fn named_snapshot() -> Snapshot {
    let mut snap = snapshot(1000);
    for (i, p) in snap.peers.iter_mut().enumerate() {
        p.names = Some(if i % 10 == 0 {
            PeerNames::new("payments.shop", "payments", "shop", "frontend", "shop")
        } else {
            PeerNames::new("", "", "", "frontend", "shop")
        });
    }
    snap
}

#[test]
fn the_top_n_bound_ranks_identities_and_a_service_is_one_series() {
    let snap = named_snapshot();
    let rows = super::super::view::peer_rows(&snap);
    let text = render(&snap, &rows, 10, true);
    let s = samples(&text);
    let sent: Vec<&(String, String, f64)> = s
        .iter()
        .filter(|(n, _, _)| n == "sockmesh_peer_sent_bytes_total")
        .collect();
    assert_eq!(sent.len(), 11, "10 identities and other");
    let service: f64 = (0..1000).filter(|i| i % 10 == 0).sum::<u64>() as f64;
    let svc = sent
        .iter()
        .find(|(_, l, _)| l.contains("destination_service=\"payments.shop\""))
        .expect("the Service's series");
    assert_eq!(svc.2, service, "its 100 endpoints summed");
    assert!(!svc.1.contains("peer="), "no single peer: {}", svc.1);
    for label in [
        "source_workload=\"frontend\"",
        "source_namespace=\"shop\"",
        "destination_workload=\"payments\"",
        "destination_namespace=\"shop\"",
    ] {
        assert!(svc.1.contains(label), "{label} in {}", svc.1);
    }
    let total: f64 = sent.iter().map(|(_, _, v)| v).sum();
    assert_eq!(total, (0..1000).sum::<u64>() as f64, "nothing lost");
    // The Service's endpoints count as peers folded: not in the top as themselves.
    assert!(s
        .iter()
        .any(|(n, l, v)| n == "sockmesh_peers" && l == "kind=\"folded\"" && *v == 891.0));
    // An unnamed peer keeps its address and the pod's own names.
    assert!(sent
        .iter()
        .any(|(_, l, _)| l.contains("peer=\"10.1.3.249:80\"")
            && l.contains("source_workload=\"frontend\"")
            && !l.contains("destination_service")));
}

#[test]
fn grouping_by_service_and_workload_sums_and_keeps_the_rest() {
    use super::super::group::{group, By};
    let snap = named_snapshot();
    let rows = super::super::view::peer_rows(&snap);
    let by_service = group(&rows, |r| By::Service.key(r));
    assert_eq!(
        by_service.len(),
        901,
        "100 endpoints in one row, 900 by address"
    );
    let svc = by_service
        .iter()
        .find(|r| r.service.as_deref() == Some("payments.shop"))
        .expect("service row");
    assert_eq!((svc.peers, svc.conns_total), (100, 100));
    assert_eq!(svc.peer, "(100 peers)");
    let by_workload = group(&rows, |r| By::Workload.key(r));
    assert_eq!(by_workload.len(), 901);
    assert_eq!(group(&rows, |r| By::Peer.key(r)).len(), 1000);
}
