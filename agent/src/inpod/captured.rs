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
use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use sockmesh_common::{event_kind, Event, AF_INET6};
use tracing::info;

use crate::{datapath::steer::BoundPort, events};

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
    use sockmesh_common::AF_INET;

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
