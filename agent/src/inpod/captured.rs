//! Which ports of which enrolled pods are captured (steered to the agent), as the agent
//! reports them: `inbound_listening` when a port is captured, `inbound_closed` when it no
//! longer is.
//!
//! The kernel alone decides what is captured: the bind hook records an app's wildcard bind in
//! `SM_IN_BINDS` and `sk_lookup` steers its connections to the pod's one inbound listener,
//! which exists for as long as the pod is enrolled. So a bind event the agent never reads (the
//! ring buffer was full, counted `event_lost`; another agent read it; the agent was not running)
//! never leaves a port without its agent side. It would only leave this report wrong, which is
//! why the report is also reconciled from the pinned `SM_IN_BINDS` at every enrolment and
//! every second.
//!
//! A server already listening when its pod is enrolled bound before the hook could see it:
//! [`record_listening`] records it from the namespace's socket table instead.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use sockmesh_common::{event_kind, pod_flags, Event, PodConfig, AF_INET, AF_INET6};
use tracing::{info, warn};

use crate::{
    datapath::{steer::BoundPort, Datapath},
    events,
    sys::{
        netns::NetnsWorker,
        sockdiag::{tcp_listeners, Listener},
    },
};

/// Record the wildcard listeners the pod already has (bound before it was enrolled, or before
/// an agent that removed its pins came back), as the bind hook records a bind: the port is
/// captured from now on, and the socket's release forgets it. The table is read once more
/// afterwards, since a socket released between the two steps could not forget its record.
pub fn record_listening(
    dp: &mut Datapath,
    pod: &str,
    cookie: u64,
    worker: &NetnsWorker,
    cfg: &PodConfig,
) {
    if !cfg.has(pod_flags::INBOUND) {
        return;
    }
    let list = || match worker.run_blocking(tcp_listeners) {
        Ok(Ok(l)) => Some(l),
        Ok(Err(e)) => {
            warn!(pod, error = %e, "cannot list the pod's listening sockets");
            None
        }
        Err(e) => {
            warn!(pod, error = %e, "cannot list the pod's listening sockets");
            None
        }
    };
    let Some(listening) = list() else { return };
    let quota = dp.found_bind_quota();
    let candidates: Vec<(BoundPort, u64)> = listening
        .iter()
        .filter_map(|l| Some((wildcard_port(cfg, l)?, l.cookie)))
        .collect();
    let recorded: Vec<(BoundPort, u64)> = candidates
        .iter()
        .copied()
        .filter(|(port, socket)| dp.record_bind(cookie, *port, *socket))
        .take(quota)
        .collect();
    if recorded.len() == quota && candidates.len() > quota {
        warn!(pod, quota, listening = candidates.len(), "only the pod's inbound-bind quota of the servers listening before its enrolment are captured; the others' inbound connections go to them directly (raise --pod-inbound-binds)");
    }
    if recorded.is_empty() {
        return;
    }
    let still: HashSet<u64> = list()
        .unwrap_or_default()
        .iter()
        .map(|l| l.cookie)
        .collect();
    for (port, socket) in &recorded {
        if !still.contains(socket) {
            dp.forget_bind(cookie, *port, *socket);
        }
    }
    info!(pod, ports = ?recorded.iter().map(|(p, _)| p.0).collect::<Vec<_>>(), "servers listening before enrolment are captured");
}

/// The port a listener holds on the pod's wildcard address, unless the pod keeps it out of
/// inbound capture; None for a listener on a specific address (the agent's own, on loopback,
/// included).
fn wildcard_port(cfg: &PodConfig, l: &Listener) -> Option<BoundPort> {
    if !l.addr.ip().is_unspecified() {
        return None;
    }
    let port = l.addr.port();
    if cfg.exclude_inbound_ports.iter().any(|r| r.contains(port)) {
        return None;
    }
    Some((port, if l.addr.is_ipv6() { AF_INET6 } else { AF_INET }))
}

#[derive(Default)]
pub struct Captured {
    pods: HashMap<u64, (Arc<str>, BTreeSet<BoundPort>)>,
}

impl Captured {
    pub fn add_pod(&mut self, cookie: u64, name: Arc<str>) {
        self.pods.insert(cookie, (name, BTreeSet::new()));
    }

    /// Forget a pod (its listener closes with it; nothing is reported per port).
    pub fn remove_pod(&mut self, cookie: u64) {
        self.pods.remove(&cookie);
    }

    /// A bind/unbind event from the kernel.
    pub fn on_event(&mut self, ev: &Event) {
        let Some((name, ports)) = self.pods.get_mut(&ev.netns_cookie) else {
            return;
        };
        let port = (ev.port, ev.family);
        match ev.kind {
            event_kind::BIND if ports.insert(port) => {
                report(ev.netns_cookie, name, port, true, false)
            }
            event_kind::UNBIND if ports.remove(&port) => {
                report(ev.netns_cookie, name, port, false, false)
            }
            _ => {}
        }
    }

    /// Make the report match what the kernel holds (`bound`: every pod's recorded ports), for
    /// the enrolled pods; report each difference, marked `reconciled`.
    pub fn reconcile(&mut self, mut bound: HashMap<u64, Vec<BoundPort>>) {
        for (cookie, (name, ports)) in &mut self.pods {
            let now: BTreeSet<BoundPort> = bound
                .remove(cookie)
                .unwrap_or_default()
                .into_iter()
                .collect();
            for p in now.difference(ports) {
                report(*cookie, name, *p, true, true);
            }
            for p in ports.difference(&now) {
                report(*cookie, name, *p, false, true);
            }
            *ports = now;
        }
    }
}

fn report(cookie: u64, pod: &str, (port, family): BoundPort, captured: bool, reconciled: bool) {
    let family = if family == AF_INET6 { "ipv6" } else { "ipv4" };
    let event = if captured {
        "inbound_listening"
    } else {
        "inbound_closed"
    };
    info!(
        pod,
        port, family, reconciled, captured, "inbound port {event}"
    );
    events::emit(serde_json::json!({
        "event": event, "netns_cookie": cookie, "port": port, "family": family, "reconciled": reconciled,
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use sockmesh_common::PortRange;

    #[test]
    fn only_wildcard_listeners_on_ports_not_excluded_are_recorded() {
        let mut cfg = PodConfig::default();
        cfg.exclude_inbound_ports[0] = PortRange { lo: 9000, hi: 9010 };
        let l = |a: &str| Listener {
            addr: a.parse().expect("addr"),
            cookie: 1,
        };
        assert_eq!(wildcard_port(&cfg, &l("0.0.0.0:80")), Some((80, AF_INET)));
        assert_eq!(wildcard_port(&cfg, &l("[::]:443")), Some((443, AF_INET6)));
        assert_eq!(wildcard_port(&cfg, &l("0.0.0.0:9005")), None);
        assert_eq!(wildcard_port(&cfg, &l("127.0.0.1:15006")), None);
        assert_eq!(wildcard_port(&cfg, &l("10.0.0.2:80")), None);
    }

    fn ev(kind: u32, port: u16) -> Event {
        Event {
            kind,
            family: AF_INET,
            port,
            netns_cookie: 7,
        }
    }

    #[test]
    fn events_and_reconciliation_agree_on_the_ports() {
        let mut c = Captured::default();
        c.add_pod(7, "web".into());
        c.on_event(&ev(event_kind::BIND, 80));
        c.on_event(&ev(event_kind::BIND, 80));
        c.on_event(&ev(event_kind::BIND, 81));
        // An event of a pod that is not enrolled is ignored.
        c.on_event(&Event {
            netns_cookie: 8,
            ..ev(event_kind::BIND, 82)
        });
        assert_eq!(c.pods[&7].1, BTreeSet::from([(80, AF_INET), (81, AF_INET)]));
        // The unbind of 81 and the bind of 90 were lost: the kernel's record wins.
        c.reconcile(HashMap::from([
            (7, vec![(90, AF_INET6), (80, AF_INET)]),
            (8, vec![(1, AF_INET)]),
        ]));
        assert_eq!(
            c.pods[&7].1,
            BTreeSet::from([(80, AF_INET), (90, AF_INET6)])
        );
        assert!(!c.pods.contains_key(&8));
        c.on_event(&ev(event_kind::UNBIND, 80));
        c.reconcile(HashMap::new());
        assert!(c.pods[&7].1.is_empty());
    }
}
