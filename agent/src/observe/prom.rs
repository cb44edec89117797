//! `/metrics` in the Prometheus text exposition format (0.0.4), rendered from the same rows as
//! the CLI. Label cardinality is bounded: peers are summed per identity (Service, workload,
//! namespace), and per pod and direction the `top` identities with the most traffic get their
//! own series; the rest are summed under `peer="other"`.
use std::collections::BTreeMap;
use std::fmt::Write;

use sockmesh_common::{counter, peer::agent_counter};

use super::group::{add_into, group, identity_key};
use super::view::{pod_rows, PeerRow, Snapshot};

/// One metric family: its samples are appended in order, then written under HELP/TYPE.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    samples: Vec<(String, String)>,
}

struct Out {
    families: Vec<Family>,
}

impl Out {
    fn family(&mut self, name: &'static str, kind: &'static str, help: &'static str) -> usize {
        if let Some(i) = self.families.iter().position(|f| f.name == name) {
            return i;
        }
        self.families.push(Family {
            name,
            help,
            kind,
            samples: Vec::new(),
        });
        self.families.len() - 1
    }

    fn add(&mut self, f: usize, labels: &[(&str, &str)], value: impl ToString) {
        let mut l = String::new();
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                l.push(',');
            }
            let _ = write!(l, "{k}=\"{}\"", escape(v));
        }
        self.families[f].samples.push((l, value.to_string()));
    }

    fn finish(self) -> String {
        let mut s = String::new();
        for f in self.families {
            let _ = writeln!(s, "# HELP {} {}", f.name, f.help);
            let _ = writeln!(s, "# TYPE {} {}", f.name, f.kind);
            for (labels, v) in f.samples {
                if labels.is_empty() {
                    let _ = writeln!(s, "{} {v}", f.name);
                } else {
                    let _ = writeln!(s, "{}{{{labels}}} {v}", f.name);
                }
            }
        }
        s
    }
}

/// Label values escape backslash, double quote and newline.
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Series with their own labels: peers are first summed by identity (one series per Service,
/// workload and namespace, whatever addresses it had; peers with no cluster name stay by
/// address), then per (pod, direction) the `top` with the most bytes (then connections) keep
/// theirs and the others are folded into one "other" row. Returns the rows and how many
/// peers were folded.
pub fn bound_peers(rows: &[PeerRow], top: usize) -> (Vec<PeerRow>, usize) {
    let named = group(rows, identity_key);
    let mut groups: BTreeMap<(u64, &str), Vec<&PeerRow>> = BTreeMap::new();
    for r in &named {
        groups
            .entry((r.netns_cookie, r.direction))
            .or_default()
            .push(r);
    }
    let mut out = Vec::new();
    let mut folded = 0;
    for (_, mut g) in groups {
        g.sort_by(|a, b| {
            (b.bytes(), b.conns_total, &a.peer).cmp(&(a.bytes(), a.conns_total, &b.peer))
        });
        let rest = g.split_off(g.len().min(top));
        out.extend(g.into_iter().cloned());
        if let Some(first) = rest.first() {
            let mut other = (*first).clone();
            other.peer = "other".into();
            (other.service, other.workload, other.namespace) = (None, None, None);
            for r in &rest[1..] {
                add_into(&mut other, r);
            }
            folded += other.peers as usize;
            out.push(other);
        }
    }
    (out, folded)
}

/// The identity labels of a row: source and destination as the connection goes (outbound,
/// the pod is the source; inbound, the peer is), only those known.
fn identity_labels(r: &PeerRow) -> Vec<(&'static str, &str)> {
    let (src, dst) = if r.direction == "inbound" {
        (
            (&r.workload, &r.namespace),
            (&r.pod_workload, &r.pod_namespace),
        )
    } else {
        (
            (&r.pod_workload, &r.pod_namespace),
            (&r.workload, &r.namespace),
        )
    };
    [
        ("source_workload", src.0),
        ("source_namespace", src.1),
        ("destination_service", &r.service),
        ("destination_workload", dst.0),
        ("destination_namespace", dst.1),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
    .collect()
}

pub fn render(snap: &Snapshot, rows: &[PeerRow], top: usize, ready: bool) -> String {
    let mut o = Out {
        families: Vec::new(),
    };
    let f = o.family(
        "sockmesh_ready",
        "gauge",
        "1 when programs are attached and pods enrolled.",
    );
    o.add(f, &[], u8::from(ready));
    let f = o.family(
        "sockmesh_schema_version",
        "gauge",
        "Layout version of the pinned maps.",
    );
    o.add(f, &[], sockmesh_common::SCHEMA_VERSION);

    for p in pod_rows(snap, rows) {
        let pod = p.pod.as_str();
        let f = o.family(
            "sockmesh_pod_enrolled",
            "gauge",
            "1 while the pod is enrolled.",
        );
        o.add(f, &[("pod", pod)], u8::from(p.enrolled));
        let f = o.family(
            "sockmesh_kernel_events_total",
            "counter",
            "Kernel datapath events per pod (redirects, bypasses and why, origin hits and misses, fast rejects, map full).",
        );
        for (i, name) in counter::NAMES.iter().enumerate() {
            o.add(f, &[("pod", pod), ("event", name)], p.counters[i].1);
        }
        let f = o.family(
            "sockmesh_pod_refused_total",
            "counter",
            "What the agent's per-pod caps and node-wide shares refused or held back, per pod (connections over a cap, DNS queries held back or dropped, bind events deferred or dropped, policy peers evicted).",
        );
        for (name, n) in &p.refused {
            o.add(f, &[("pod", pod), ("reason", name)], n);
        }
    }

    let (bounded, folded) = bound_peers(rows, top);
    let f = o.family(
        "sockmesh_peers",
        "gauge",
        "Peers in the pinned maps, and how many are folded into peer=\"other\".",
    );
    o.add(f, &[("kind", "tracked")], rows.len());
    o.add(f, &[("kind", "folded")], folded);
    for r in &bounded {
        peer_samples(&mut o, r);
    }

    let f = o.family(
        "sockmesh_agent_events_total",
        "counter",
        "Agent-wide events (flushes, per-peer state dropped or not written, policy peers evicted).",
    );
    for (i, name) in agent_counter::NAMES.iter().enumerate() {
        o.add(f, &[("event", name)], snap.agent[i]);
    }
    o.finish()
}

fn peer_samples(o: &mut Out, r: &PeerRow) {
    let mut base = vec![("pod", r.pod.as_str()), ("direction", r.direction)];
    // A series summing several addresses of one identity has no single peer to name.
    if r.peers == 1 || r.peer == "other" {
        base.push(("peer", r.peer.as_str()));
    }
    base.extend(identity_labels(r));
    let with = |extra: (&'static str, &'static str)| {
        let mut l = base.to_vec();
        l.push(extra);
        l
    };
    let simple: [(&'static str, &'static str, &'static str, u64); 11] = [
        (
            "sockmesh_peer_connections_active",
            "gauge",
            "Relayed connections open now.",
            r.conns_active,
        ),
        (
            "sockmesh_peer_connections_total",
            "counter",
            "Connections relayed (upstream connect succeeded).",
            r.conns_total,
        ),
        (
            "sockmesh_peer_sent_bytes_total",
            "counter",
            "Bytes from the pod to the peer (open connections included, as of the last flush).",
            r.bytes_out,
        ),
        (
            "sockmesh_peer_received_bytes_total",
            "counter",
            "Bytes from the peer to the pod (open connections included, as of the last flush).",
            r.bytes_in,
        ),
        (
            "sockmesh_peer_connect_failures_total",
            "counter",
            "Upstream connects that failed.",
            r.connect_failures,
        ),
        (
            "sockmesh_peer_resets_total",
            "counter",
            "Relayed connections that ended in a reset.",
            r.resets,
        ),
        (
            "sockmesh_peer_dns_queries_total",
            "counter",
            "DNS queries forwarded to the peer.",
            r.dns_queries,
        ),
        (
            "sockmesh_peer_kernel_redirects_total",
            "counter",
            "connect() calls the kernel redirected to the proxy.",
            r.redirects,
        ),
        (
            "sockmesh_peer_kernel_fast_rejects_total",
            "counter",
            "connect() calls refused in the kernel while the breaker was open.",
            r.fast_rejects,
        ),
        (
            "sockmesh_peer_direct_connections_total",
            "counter",
            "connect() calls the kernel tier policed and let go direct (the rest of the peer's connections were proxied).",
            r.direct,
        ),
        (
            "sockmesh_peer_kernel_dns_redirects_total",
            "counter",
            "DNS connect()/sendto() calls to this server the kernel redirected to the agent.",
            r.dns_redirects,
        ),
    ];
    for (name, kind, help, v) in simple {
        let f = o.family(name, kind, help);
        o.add(f, &base, v);
    }
    let f = o.family(
        "sockmesh_peer_timeouts_total",
        "counter",
        "Timeouts by kind (connect, idle, lifetime, dns).",
    );
    for (k, v) in &r.timeouts {
        o.add(f, &with(("kind", k)), v);
    }
    let f = o.family(
        "sockmesh_peer_throttled_total",
        "counter",
        "Connections refused locally, by reason.",
    );
    for (k, v) in &r.throttled {
        o.add(f, &with(("reason", k)), v);
    }
    if r.peer == "other" {
        // Gauges of a single peer's state do not add up across peers.
        return;
    }
    let f = o.family(
        "sockmesh_peer_breaker_open",
        "gauge",
        "1 while the peer's circuit breaker is open.",
    );
    o.add(f, &base, u8::from(r.breaker == "open"));
    if r.peers == 1 {
        // One address, one tier (a row summing several may mix them).
        let f = o.family(
            "sockmesh_peer_tier",
            "gauge",
            "1 for the tier the peer is on now (kernel: its connections go direct, policed in the kernel; proxy: through the agent), with why.",
        );
        let mut l = with(("tier", r.tier));
        l.push(("reason", r.tier_reason));
        o.add(f, &l, 1);
    }
    let f = o.family(
        "sockmesh_peer_adaptive_reject_ratio",
        "gauge",
        "Adaptive throttling's local reject probability.",
    );
    o.add(f, &base, r.adaptive_reject_ratio);
    let f = o.family(
        "sockmesh_peer_connect_latency_seconds",
        "gauge",
        "Upstream connect latency over recent samples, by quantile.",
    );
    o.add(f, &with(("quantile", "0.5")), r.connect_p50_us as f64 / 1e6);
    o.add(
        f,
        &with(("quantile", "0.99")),
        r.connect_p99_us as f64 / 1e6,
    );
}

#[cfg(test)]
#[path = "prom_tests.rs"]
mod tests;
