//! The index itself: the objects as the watches last reported them, and the lookup maps
//! derived from them (by ClusterIP, by pod IP, by endpoint address), kept in step one object
//! at a time: replacing an object first takes its old addresses out, so a pod that moved IP,
//! or a Service whose endpoints changed, leaves nothing stale behind.
//!
//! Resolution of a peer `ip:port`, first answer wins:
//!
//! 1. a Service's ClusterIP and one of its ports: that Service (no single workload: the
//!    connection is balanced over its endpoints);
//! 2. a pod's IP: that pod's namespace, workload and labels, and the Services whose
//!    EndpointSlices list this address with this port (headless Services included: their
//!    clients connect to endpoint addresses directly);
//! 3. an endpoint address that is no pod (a selectorless Service's manual endpoints): its
//!    Services;
//! 4. the longest static-file CIDR containing it;
//! 5. nothing: external.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use super::{
    id::{Identity, Labels},
    names::StaticName,
};

/// `(namespace, name)` of an object.
type Key = (String, String);

/// A Service as the index needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceObject {
    pub namespace: String,
    pub name: String,
    /// Empty for a headless Service (`clusterIP: None`).
    pub cluster_ips: Vec<IpAddr>,
    /// The Service's ports (what clients of the ClusterIP connect to).
    pub ports: Vec<u16>,
    /// Their names, in the same order ("" for an unnamed port): what ties a Service port to
    /// its EndpointSlices' ports.
    pub port_names: Vec<String>,
}

/// An EndpointSlice: which addresses, on which ports, back which Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceObject {
    pub namespace: String,
    pub name: String,
    /// The `kubernetes.io/service-name` label.
    pub service: String,
    pub addresses: Vec<IpAddr>,
    /// The endpoints' ports (target ports); empty means every port.
    pub ports: Vec<u16>,
    /// Their names, in the same order.
    pub port_names: Vec<String>,
    /// The addresses of ready endpoints (`conditions.ready` true or absent): where the agent
    /// sends a connection when it picks the endpoint itself.
    pub ready: Vec<IpAddr>,
}

/// A pod: its addresses and who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodObject {
    pub namespace: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
    /// Its owning workload's name, else its own.
    pub workload: String,
    pub labels: BTreeMap<String, String>,
}

/// A pod enrolled from the API, by the name its per-peer keys carry: its identity follows
/// its Pod object (labels change live).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Local {
    pub namespace: String,
    pub name: String,
}

#[derive(Default)]
pub struct Index {
    services: HashMap<Key, ServiceObject>,
    slices: HashMap<Key, SliceObject>,
    pods: HashMap<Key, (PodObject, Labels)>,
    by_cluster_ip: HashMap<IpAddr, BTreeSet<Key>>,
    by_pod_ip: HashMap<IpAddr, BTreeSet<Key>>,
    /// Endpoint address -> the slices listing it.
    by_endpoint: HashMap<IpAddr, BTreeSet<Key>>,
    locals: HashMap<String, Local>,
    /// Every enrolled pod (API or `--pod`) by name, with its addresses: without `--kube`,
    /// the only pods the agent knows.
    enrolled: HashMap<String, Vec<IpAddr>>,
    by_enrolled_ip: HashMap<IpAddr, BTreeSet<Key>>,
    statics: Vec<StaticName>,
    /// Bumped by every change that may change an answer; an update that changes nothing the
    /// index keeps (a pod's status conditions) does not bump it, so readers do not redo work.
    version: u64,
}

fn key(namespace: &str, name: &str) -> Key {
    (namespace.to_string(), name.to_string())
}

fn unlink(map: &mut HashMap<IpAddr, BTreeSet<Key>>, ips: &[IpAddr], k: &Key) {
    for ip in ips {
        if let Some(set) = map.get_mut(ip) {
            set.remove(k);
            if set.is_empty() {
                map.remove(ip);
            }
        }
    }
}

fn link(map: &mut HashMap<IpAddr, BTreeSet<Key>>, ips: &[IpAddr], k: &Key) {
    for ip in ips {
        map.entry(*ip).or_default().insert(k.clone());
    }
}

/// IPv4-mapped IPv6 (`::ffff:10.0.0.1`, how dual-stack sockets show IPv4 clients) as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

impl Index {
    /// See the `version` field.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn apply_service(&mut self, s: ServiceObject) {
        let k = key(&s.namespace, &s.name);
        if self.services.get(&k) == Some(&s) {
            return;
        }
        self.delete_service(&s.namespace, &s.name);
        self.version += 1;
        link(&mut self.by_cluster_ip, &s.cluster_ips, &k);
        self.services.insert(k, s);
    }

    pub fn delete_service(&mut self, namespace: &str, name: &str) {
        let k = key(namespace, name);
        if let Some(old) = self.services.remove(&k) {
            unlink(&mut self.by_cluster_ip, &old.cluster_ips, &k);
            self.version += 1;
        }
    }

    pub fn apply_slice(&mut self, s: SliceObject) {
        let k = key(&s.namespace, &s.name);
        if self.slices.get(&k) == Some(&s) {
            return;
        }
        self.delete_slice(&s.namespace, &s.name);
        self.version += 1;
        link(&mut self.by_endpoint, &s.addresses, &k);
        self.slices.insert(k, s);
    }

    pub fn delete_slice(&mut self, namespace: &str, name: &str) {
        let k = key(namespace, name);
        if let Some(old) = self.slices.remove(&k) {
            unlink(&mut self.by_endpoint, &old.addresses, &k);
            self.version += 1;
        }
    }

    pub fn apply_pod(&mut self, p: PodObject) {
        let k = key(&p.namespace, &p.name);
        if self.pods.get(&k).is_some_and(|(old, _)| *old == p) {
            return;
        }
        self.delete_pod(&p.namespace, &p.name);
        self.version += 1;
        link(&mut self.by_pod_ip, &p.ips, &k);
        let labels = Arc::new(p.labels.clone());
        self.pods.insert(k, (p, labels));
    }

    pub fn delete_pod(&mut self, namespace: &str, name: &str) {
        let k = key(namespace, name);
        if let Some((old, _)) = self.pods.remove(&k) {
            unlink(&mut self.by_pod_ip, &old.ips, &k);
            self.version += 1;
        }
    }

    /// A complete relist (after a 410 Gone, or the first list): every Service is replaced.
    pub fn replace_services(&mut self, all: Vec<ServiceObject>) {
        self.version += 1;
        self.services.clear();
        self.by_cluster_ip.clear();
        for s in all {
            self.apply_service(s);
        }
    }

    pub fn replace_slices(&mut self, all: Vec<SliceObject>) {
        self.version += 1;
        self.slices.clear();
        self.by_endpoint.clear();
        for s in all {
            self.apply_slice(s);
        }
    }

    pub fn replace_pods(&mut self, all: Vec<PodObject>) {
        self.version += 1;
        self.pods.clear();
        self.by_pod_ip.clear();
        for p in all {
            self.apply_pod(p);
        }
    }

    /// The static names file's entries (replacing the previous ones).
    pub fn set_statics(&mut self, names: Vec<StaticName>) {
        self.version += 1;
        self.statics = names;
    }

    /// A pod enrolled from the API, by the name its per-peer keys carry.
    pub fn set_local(&mut self, pod: &str, local: Local) {
        self.version += 1;
        self.locals.insert(pod.to_string(), local);
    }

    pub fn remove_local(&mut self, pod: &str) {
        self.version += 1;
        self.locals.remove(pod);
    }

    /// A pod the agent enrolled (any source), with the addresses found in its namespace.
    pub fn set_enrolled(&mut self, pod: &str, addrs: &[IpAddr]) {
        self.version += 1;
        self.remove_enrolled(pod);
        let k = key("", pod);
        let addrs: Vec<IpAddr> = addrs
            .iter()
            .map(|a| canonical(*a))
            .filter(|a| !a.is_loopback() && !a.is_unspecified())
            .collect();
        link(&mut self.by_enrolled_ip, &addrs, &k);
        self.enrolled.insert(pod.to_string(), addrs);
    }

    pub fn remove_enrolled(&mut self, pod: &str) {
        if let Some(old) = self.enrolled.remove(pod) {
            self.version += 1;
            unlink(&mut self.by_enrolled_ip, &old, &key("", pod));
        }
    }

    /// Counts, for logs and tests: (services, slices, pods).
    pub fn sizes(&self) -> (usize, usize, usize) {
        (self.services.len(), self.slices.len(), self.pods.len())
    }

    fn pod_identity(&self, k: &Key) -> Option<Identity> {
        let (p, labels) = self.pods.get(k)?;
        Some(Identity {
            services: Vec::new(),
            namespace: Some(p.namespace.as_str().into()),
            workload: Some(p.workload.as_str().into()),
            labels: labels.clone(),
        })
    }

    /// `NAME.NAMESPACE` of the Services whose endpoints include `ip` on `port`, sorted.
    fn endpoint_services(&self, ip: IpAddr, port: u16) -> Vec<Arc<str>> {
        let Some(slices) = self.by_endpoint.get(&ip) else {
            return Vec::new();
        };
        let names: BTreeSet<String> = slices
            .iter()
            .filter_map(|k| self.slices.get(k))
            .filter(|s| s.ports.is_empty() || s.ports.contains(&port))
            .map(|s| format!("{}.{}", s.service, s.namespace))
            .collect();
        names.into_iter().map(Arc::from).collect()
    }

    /// The Service whose ClusterIP and port `ip:port` is.
    pub fn service_at(&self, ip: IpAddr, port: u16) -> Option<&ServiceObject> {
        self.by_cluster_ip
            .get(&canonical(ip))?
            .iter()
            .filter_map(|k| self.services.get(k))
            .find(|s| s.ports.contains(&port))
    }

    /// The ready endpoints of Service `namespace/name` for its port `port`: each slice's
    /// port of the same name (an unnamed single port matches the Service's single port), as
    /// kube-proxy pairs them. Scans the slices: for the proxy's endpoint picking, which
    /// caches the answer until the index changes.
    pub fn service_endpoints(&self, namespace: &str, name: &str, port: u16) -> Vec<SocketAddr> {
        let Some(svc) = self.services.get(&key(namespace, name)) else {
            return Vec::new();
        };
        let Some(i) = svc.ports.iter().position(|&p| p == port) else {
            return Vec::new();
        };
        let want = svc.port_names.get(i).map_or("", String::as_str);
        let mut out: Vec<SocketAddr> = self
            .slices
            .values()
            .filter(|s| s.namespace == namespace && s.service == name)
            .filter_map(|s| {
                let j = s.port_names.iter().position(|n| n == want);
                let target = match j {
                    Some(j) => s.ports.get(j).copied(),
                    None if s.ports.len() == 1 && svc.ports.len() == 1 => s.ports.first().copied(),
                    None => None,
                }?;
                Some(s.ready.iter().map(move |ip| SocketAddr::new(*ip, target)))
            })
            .flatten()
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Who the peer `ip:port` is (see the module doc for the order).
    pub fn peer(&self, ip: IpAddr, port: u16) -> Identity {
        let ip = canonical(ip);
        if let Some(keys) = self.by_cluster_ip.get(&ip) {
            let hit = keys
                .iter()
                .filter_map(|k| self.services.get(k))
                .find(|s| s.ports.is_empty() || s.ports.contains(&port));
            if let Some(s) = hit {
                return Identity {
                    services: vec![format!("{}.{}", s.name, s.namespace).into()],
                    namespace: Some(s.namespace.as_str().into()),
                    ..Identity::default()
                };
            }
        }
        let services = self.endpoint_services(ip, port);
        // An address can belong to two pod objects for a moment (a pod deleted, its IP
        // reused before the delete arrives): the first by name decides, deterministically.
        let pod = self
            .by_pod_ip
            .get(&ip)
            .and_then(|keys| keys.iter().find_map(|k| self.pod_identity(k)));
        if let Some(mut id) = pod {
            id.services = services;
            return id;
        }
        if services.is_empty() {
            let enrolled = self
                .by_enrolled_ip
                .get(&ip)
                .and_then(|keys| keys.iter().next())
                .map(|(_, pod)| self.local(pod, None));
            if let Some(id) = enrolled {
                return id;
            }
        } else {
            let namespace = services
                .first()
                .and_then(|s| s.split_once('.'))
                .map(|(_, ns)| Arc::from(ns));
            return Identity {
                services,
                namespace,
                ..Identity::default()
            };
        }
        self.static_name(ip).unwrap_or_default()
    }

    fn static_name(&self, ip: IpAddr) -> Option<Identity> {
        self.statics
            .iter()
            .filter(|n| n.contains(ip))
            .max_by_key(|n| n.cidr.prefix)
            .map(StaticName::identity)
    }

    /// Who the enrolled pod named `pod` is. `listen_port` (inbound) adds the Services that
    /// send it traffic on that port, through its own address.
    pub fn local(&self, pod: &str, listen_port: Option<u16>) -> Identity {
        match self.locals.get(pod) {
            Some(Local { namespace, name }) => {
                let k = key(namespace, name);
                let Some(mut id) = self.pod_identity(&k) else {
                    // Not listed yet (the all-pods watch lags the node's): what the name says.
                    return Identity {
                        namespace: Some(namespace.as_str().into()),
                        workload: Some(name.as_str().into()),
                        ..Identity::default()
                    };
                };
                if let (Some(port), Some((p, _))) = (listen_port, self.pods.get(&k)) {
                    let mut all: BTreeSet<Arc<str>> = BTreeSet::new();
                    for ip in &p.ips {
                        all.extend(self.endpoint_services(*ip, port));
                    }
                    id.services = all.into_iter().collect();
                }
                id
            }
            // A `--pod` namespace: named by its path's last component, in no namespace.
            None if self.enrolled.contains_key(pod) => Identity {
                workload: Some(pod.rsplit('/').next().unwrap_or(pod).into()),
                ..Identity::default()
            },
            None => Identity::default(),
        }
    }
}
