//! Rows summed by identity: `sockmesh peers --by service|workload`, and the `/metrics`
//! cardinality bound, which ranks identities rather than addresses (a Service whose
//! endpoints churn stays one series). Pure: rows in, rows out.
use std::collections::BTreeMap;

use super::view::PeerRow;

/// What `--by` groups peers by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum By {
    Peer,
    Service,
    Workload,
}

pub fn parse_by(s: &str) -> Result<By, String> {
    match s {
        "peer" => Ok(By::Peer),
        "service" => Ok(By::Service),
        "workload" => Ok(By::Workload),
        _ => Err(format!(
            "unknown grouping '{s}': use service, workload or peer"
        )),
    }
}

impl By {
    /// The row's group, or None to keep it by its address (a peer with no such name).
    pub fn key(self, r: &PeerRow) -> Option<String> {
        match self {
            By::Peer => None,
            By::Service => r.service.clone(),
            By::Workload => r
                .workload
                .as_ref()
                .map(|w| format!("{}/{w}", r.namespace.as_deref().unwrap_or_default())),
        }
    }
}

/// The key `/metrics` bounds by: the peer's whole identity (Service, workload, namespace) when
/// it comes from the cluster (a Service or a namespace); else the address.
pub fn identity_key(r: &PeerRow) -> Option<String> {
    if r.service.is_none() && r.namespace.is_none() {
        return None;
    }
    let t = |v: &Option<String>| v.clone().unwrap_or_default();
    Some(format!(
        "{}|{}|{}",
        t(&r.service),
        t(&r.workload),
        t(&r.namespace)
    ))
}

fn breaker_rank(b: &str) -> u8 {
    match b {
        "open" => 3,
        "half_open" => 2,
        "closed" => 1,
        _ => 0,
    }
}

/// Adds `b`'s figures to `a`. Counters add up; of the gauges, the worst is kept (the most open
/// breaker, the highest reject ratio and latencies, the latest error).
pub fn add_into(a: &mut PeerRow, b: &PeerRow) {
    a.peers += b.peers;
    a.conns_active += b.conns_active;
    a.conns_total += b.conns_total;
    a.bytes_out += b.bytes_out;
    a.bytes_in += b.bytes_in;
    for (x, y) in a.timeouts.iter_mut().zip(&b.timeouts) {
        x.1 += y.1;
    }
    for (x, y) in a.throttled.iter_mut().zip(&b.throttled) {
        x.1 += y.1;
    }
    a.connect_failures += b.connect_failures;
    a.resets += b.resets;
    a.dns_queries += b.dns_queries;
    a.redirects += b.redirects;
    a.fast_rejects += b.fast_rejects;
    a.dns_redirects += b.dns_redirects;
    a.direct += b.direct;
    if breaker_rank(b.breaker) > breaker_rank(a.breaker) {
        a.breaker = b.breaker;
    }
    a.adaptive_reject_ratio = a.adaptive_reject_ratio.max(b.adaptive_reject_ratio);
    a.connect_p50_us = a.connect_p50_us.max(b.connect_p50_us);
    a.connect_p99_us = a.connect_p99_us.max(b.connect_p99_us);
    if b.last_error_unix_ms > a.last_error_unix_ms {
        a.last_error = b.last_error;
        a.last_error_unix_ms = b.last_error_unix_ms;
    }
}

/// One row per (pod, direction, group), in first-seen order; rows `key` leaves ungrouped stay
/// as they are. A group of several peers shows `(N peers)` as its peer; the names its peers
/// disagree on (a Service's endpoints of two workloads) are dropped.
pub fn group(rows: &[PeerRow], key: impl Fn(&PeerRow) -> Option<String>) -> Vec<PeerRow> {
    let mut order: Vec<(u64, &str, String)> = Vec::new();
    let mut groups: BTreeMap<(u64, &str, String), PeerRow> = BTreeMap::new();
    for r in rows {
        let k = (
            r.netns_cookie,
            r.direction,
            key(r).map_or_else(|| format!("addr {}", r.peer), |g| format!("name {g}")),
        );
        match groups.get_mut(&k) {
            Some(g) => {
                add_into(g, r);
                for (mine, theirs) in [
                    (&mut g.service, &r.service),
                    (&mut g.workload, &r.workload),
                    (&mut g.namespace, &r.namespace),
                ] {
                    if mine != theirs {
                        *mine = None;
                    }
                }
                g.peer = format!("({} peers)", g.peers);
            }
            None => {
                order.push(k.clone());
                groups.insert(k, r.clone());
            }
        }
    }
    order
        .into_iter()
        .filter_map(|k| groups.remove(&k))
        .collect()
}
