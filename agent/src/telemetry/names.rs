//! Peers' names for the readers: at each flush, every peer flushed for the first time, and
//! every peer ever named once the identity index has changed, gets its `SM_PEER_NAMES` entry
//! (re)written when its names differ from the last ones written. The readers (`sockmesh
//! peers`, `/metrics`) run in other processes, or read only the pinned maps: the names must be
//! in a map beside the figures, keyed the same way.
use std::{
    collections::{hash_map::DefaultHasher, HashMap},
    hash::{Hash, Hasher},
    sync::Arc,
};

use sockmesh_common::peer::{direction, PeerKey as MapKey, PeerNames};

use crate::{
    datapath::sink::Sink,
    identity::{Identities, Index},
    policy::{Direction, PeerKey},
    rules::set::subject,
};

/// The five names of one peer entry, as text.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Names {
    pub service: String,
    pub workload: String,
    pub namespace: String,
    pub pod_workload: String,
    pub pod_namespace: String,
}

impl Names {
    fn to_map(&self) -> PeerNames {
        PeerNames::new(
            &self.service,
            &self.workload,
            &self.namespace,
            &self.pod_workload,
            &self.pod_namespace,
        )
    }

    fn digest(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }
}

/// What the index says of `key`: the same subject the policy rules match.
pub fn names_of(key: &PeerKey, ix: &Index) -> Names {
    let s = subject(key, ix);
    let text = |v: &Option<Arc<str>>| v.as_deref().unwrap_or_default().to_string();
    Names {
        service: s
            .services
            .first()
            .map(|x| x.to_string())
            .unwrap_or_default(),
        workload: text(&s.peer.workload),
        namespace: text(&s.peer.namespace),
        pod_workload: text(&s.local.workload),
        pod_namespace: text(&s.local.namespace),
    }
}

/// Entries remembered at most: twice what the map holds.
const WRITTEN_MAX: usize = 2 * sockmesh_common::peer::map_sizes::PEERS as usize;

pub struct NameWriter {
    ids: Identities,
    /// Enrolled pods' names by netns cookie (the map key has only the cookie).
    pods: HashMap<u64, Arc<str>>,
    /// Digest of the names last written per entry.
    written: HashMap<MapKey, u64>,
    /// The index generation the written names were resolved at.
    generation: u64,
}

impl NameWriter {
    pub fn new(ids: Identities) -> NameWriter {
        NameWriter {
            ids,
            pods: HashMap::new(),
            written: HashMap::new(),
            generation: 0,
        }
    }

    pub fn pod_enrolled(&mut self, cookie: u64, name: &str) {
        self.pods.insert(cookie, name.into());
    }

    /// The pod's entries stay in the map (like its figures); only the bookkeeping goes.
    pub fn forget_pod(&mut self, cookie: u64) {
        self.pods.remove(&cookie);
        self.written.retain(|k, _| k.netns_cookie != cookie);
    }

    fn policy_key(&self, k: &MapKey) -> Option<PeerKey> {
        Some(PeerKey {
            pod: self.pods.get(&k.netns_cookie)?.clone(),
            netns_cookie: k.netns_cookie,
            direction: match k.direction {
                direction::OUTBOUND => Direction::Outbound,
                direction::INBOUND => Direction::Inbound,
                _ => return None,
            },
            peer: k.peer.to_std()?,
        })
    }

    /// Writes the names of `flushed` peers not named yet, and of every named peer if the
    /// index changed since the last call.
    pub fn flush<'a>(&mut self, flushed: impl Iterator<Item = &'a MapKey>, sink: &mut Sink) {
        let generation = self.ids.generation();
        let mut todo: Vec<MapKey> = flushed
            .filter(|k| !self.written.contains_key(k))
            .copied()
            .collect();
        if generation != self.generation {
            todo.extend(self.written.keys().copied());
            self.generation = generation;
        }
        if self.written.len() > WRITTEN_MAX {
            // Peers the recorder and the map have long dropped: start over (each is written
            // again at its next flush).
            self.written.clear();
        }
        if todo.is_empty() {
            return;
        }
        let ix = self.ids.read();
        for k in todo {
            let Some(key) = self.policy_key(&k) else {
                continue;
            };
            let names = names_of(&key, &ix);
            let digest = names.digest();
            if self.written.get(&k) == Some(&digest) {
                continue;
            }
            if sink.set_names(k, names.to_map()) {
                self.written.insert(k, digest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{index::Local, PodObject, SliceObject};

    fn index() -> Index {
        let mut ix = Index::default();
        for (name, ip, workload) in [("web-1", "10.1.0.9", "web"), ("pay-1", "10.1.0.5", "pay")] {
            ix.apply_pod(PodObject {
                namespace: "shop".into(),
                name: name.into(),
                ips: vec![ip.parse().expect("ip")],
                workload: workload.into(),
                labels: Default::default(),
            });
        }
        ix.apply_slice(SliceObject {
            namespace: "shop".into(),
            name: "pay-s".into(),
            service: "payments".into(),
            addresses: vec!["10.1.0.5".parse().expect("ip")],
            ports: vec![8080],
            ..Default::default()
        });
        ix.set_local(
            "shop/pay-1",
            Local {
                namespace: "shop".into(),
                name: "pay-1".into(),
            },
        );
        ix
    }

    fn key(direction: Direction, peer: &str) -> PeerKey {
        PeerKey::new("shop/pay-1", 1, direction, peer.parse().expect("addr"))
    }

    #[test]
    fn inbound_names_the_service_called_and_the_client() {
        let n = names_of(&key(Direction::Inbound, "10.1.0.9:8080"), &index());
        assert_eq!(n.service, "payments.shop", "pay-1 serves payments on 8080");
        assert_eq!(
            (n.workload.as_str(), n.pod_workload.as_str()),
            ("web", "pay")
        );
        let n = names_of(&key(Direction::Inbound, "10.1.0.9:9000"), &index());
        assert_eq!(n.service, "", "not a port of the Service");
    }

    #[test]
    fn outbound_names_the_peer_and_an_unknown_peer_nothing() {
        let n = names_of(&key(Direction::Outbound, "10.1.0.9:80"), &index());
        assert_eq!((n.service.as_str(), n.workload.as_str()), ("", "web"));
        assert_eq!(n.pod_namespace, "shop");
        let n = names_of(&key(Direction::Outbound, "192.0.2.1:80"), &index());
        assert_eq!((n.workload.as_str(), n.namespace.as_str()), ("", ""));
    }
}
