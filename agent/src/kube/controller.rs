//! Kubernetes mode's state: the Pod objects of this node and every Namespace, as the watches
//! report them, and which of those pods are enrolled with which options. Each change to a pod
//! (or to its namespace) reconciles that pod: enrol, re-enrol with new options, or remove.
//!
//! The watches (kube-runtime's watcher) relist on 410 Gone and retry with backoff when the API
//! server is unreachable. Nothing is removed on an error or while a relist is in progress:
//! only a complete relist (`InitDone`) or a delete event says a pod is gone, so an API outage
//! leaves the datapath exactly as it was.
use std::{
    collections::{HashMap, HashSet},
    pin::Pin,
};

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    runtime::{watcher, WatchStreamExt},
    Api, Client,
};
use tracing::{debug, info, warn};

use super::{
    allowed::AllowArgs,
    decide::{decide, Decision, PodOptions, Problem},
    destination::{RuleInput, RuleWatch},
    identity::{IdInput, IdentityWatch},
    report::Report,
};
use crate::{
    datapath::Datapath,
    events,
    identity::{index::Local, Identities},
    inpod::{
        liveness::Anchor,
        manager::{Gone, PodManager, PodTemplate},
        resolver::Resolver,
    },
    rules::PolicyHandle,
    spec::PodSpec,
};

type Watch<K> = Pin<Box<dyn Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send>>;

/// One item from either watch (a Pod is large: boxed, so every Input is small to move).
pub enum Input {
    Pod(Box<Result<watcher::Event<Pod>, watcher::Error>>),
    Namespace(Box<Result<watcher::Event<Namespace>, watcher::Error>>),
    /// Services, EndpointSlices and every pod, for peer identity.
    Identity(IdInput),
    /// Istio DestinationRules.
    Rules(RuleInput),
}

/// A pod as enrolled.
struct Current {
    name: String,
    options: PodOptions,
}

pub struct Controller {
    node: String,
    resolver: Resolver,
    report: Report,
    template: PodTemplate,
    /// What pods may ask for by annotation.
    allowed: AllowArgs,
    pods: HashMap<String, Pod>,
    namespaces: HashMap<String, Namespace>,
    /// Objects of a relist in progress (committed at `InitDone`).
    relist_pods: Option<HashMap<String, Pod>>,
    relist_namespaces: Option<HashMap<String, Namespace>>,
    enrolled: HashMap<String, Current>,
    /// Problems already reported per pod UID, so a pod's every status update does not repeat
    /// the same Event.
    reported: HashMap<String, Vec<Problem>>,
    synced: (bool, bool),
    pod_watch: Watch<Pod>,
    ns_watch: Watch<Namespace>,
    identity: IdentityWatch,
    rules: RuleWatch,
    ids: Identities,
}

fn uid_of(pod: &Pod) -> Option<String> {
    pod.metadata.uid.clone().filter(|u| !u.is_empty())
}

impl Controller {
    pub fn new(
        client: Client,
        node: &str,
        resolver: Resolver,
        report: Report,
        template: PodTemplate,
        allowed: AllowArgs,
        policy: &PolicyHandle,
    ) -> Controller {
        let ids = policy.identities().clone();
        let drs = policy.destination_rules().clone();
        let pods: Api<Pod> = Api::all(client.clone());
        let pod_cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let identity = IdentityWatch::new(&client, ids.clone());
        let rules = RuleWatch::new(&client, drs, report.clone());
        let namespaces: Api<Namespace> = Api::all(client);
        Controller {
            node: node.to_string(),
            resolver,
            report,
            template,
            allowed,
            pods: HashMap::new(),
            namespaces: HashMap::new(),
            relist_pods: None,
            relist_namespaces: None,
            enrolled: HashMap::new(),
            reported: HashMap::new(),
            synced: (false, false),
            pod_watch: watcher(pods, pod_cfg).default_backoff().boxed(),
            ns_watch: watcher(namespaces, watcher::Config::default())
                .default_backoff()
                .boxed(),
            identity,
            rules,
            ids,
        }
    }

    /// The next change from either watch (never ends: the watches retry forever).
    pub async fn next(&mut self) -> Input {
        tokio::select! {
            Some(e) = self.pod_watch.next() => Input::Pod(Box::new(e)),
            Some(e) = self.ns_watch.next() => Input::Namespace(Box::new(e)),
            e = self.identity.next() => Input::Identity(e),
            e = self.rules.next() => Input::Rules(e),
            else => std::future::pending().await,
        }
    }

    /// Whether both watches have listed everything once (pods of this node, namespaces).
    pub fn synced(&self) -> bool {
        self.synced == (true, true)
    }

    /// Whether this controller enrolled pod `id` (a UID).
    pub fn owns(&self, id: &str) -> bool {
        self.enrolled.contains_key(id)
    }

    pub fn handle(&mut self, input: Input, mgr: &mut PodManager, dp: &mut Datapath) {
        match input {
            Input::Pod(e) => match *e {
                Err(e) => {
                    warn!(error = %e, "pod watch failed; retrying with backoff (enrolled pods keep working)")
                }
                Ok(ev) => self.on_pod(ev, mgr, dp),
            },
            Input::Namespace(e) => match *e {
                Err(e) => {
                    warn!(error = %e, "namespace watch failed; retrying with backoff (enrolled pods keep working)")
                }
                Ok(ev) => self.on_namespace(ev, mgr, dp),
            },
            Input::Identity(i) => self.identity.handle(i),
            Input::Rules(r) => self.rules.handle(r),
        }
    }

    fn on_pod(&mut self, ev: watcher::Event<Pod>, mgr: &mut PodManager, dp: &mut Datapath) {
        match ev {
            watcher::Event::Apply(p) => {
                if let Some(uid) = uid_of(&p) {
                    self.pods.insert(uid.clone(), p);
                    self.reconcile(&uid, mgr, dp);
                }
            }
            watcher::Event::Delete(p) => {
                if let Some(uid) = uid_of(&p) {
                    self.pods.remove(&uid);
                    self.reconcile(&uid, mgr, dp);
                }
            }
            watcher::Event::Init => self.relist_pods = Some(HashMap::new()),
            watcher::Event::InitApply(p) => {
                if let (Some(uid), Some(m)) = (uid_of(&p), self.relist_pods.as_mut()) {
                    m.insert(uid, p);
                }
            }
            watcher::Event::InitDone => {
                let Some(new) = self.relist_pods.take() else {
                    return;
                };
                let old = std::mem::replace(&mut self.pods, new);
                let uids: HashSet<String> =
                    old.into_keys().chain(self.pods.keys().cloned()).collect();
                for uid in uids {
                    self.reconcile(&uid, mgr, dp);
                }
                self.synced.0 = true;
                self.announce_sync();
            }
        }
    }

    fn on_namespace(
        &mut self,
        ev: watcher::Event<Namespace>,
        mgr: &mut PodManager,
        dp: &mut Datapath,
    ) {
        let mut listed = false;
        let changed: Vec<String> = match ev {
            watcher::Event::Apply(n) => {
                let name = n.metadata.name.clone().unwrap_or_default();
                self.namespaces.insert(name.clone(), n);
                vec![name]
            }
            watcher::Event::Delete(n) => {
                let name = n.metadata.name.clone().unwrap_or_default();
                self.namespaces.remove(&name);
                vec![name]
            }
            watcher::Event::Init => {
                self.relist_namespaces = Some(HashMap::new());
                vec![]
            }
            watcher::Event::InitApply(n) => {
                if let Some(m) = self.relist_namespaces.as_mut() {
                    m.insert(n.metadata.name.clone().unwrap_or_default(), n);
                }
                vec![]
            }
            watcher::Event::InitDone => {
                let Some(new) = self.relist_namespaces.take() else {
                    return;
                };
                let old = std::mem::replace(&mut self.namespaces, new);
                listed = true;
                old.into_keys()
                    .chain(self.namespaces.keys().cloned())
                    .collect()
            }
        };
        let changed: HashSet<String> = changed.into_iter().collect();
        let uids: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, p)| changed.contains(p.metadata.namespace.as_deref().unwrap_or("default")))
            .map(|(u, _)| u.clone())
            .collect();
        for uid in uids {
            self.reconcile(&uid, mgr, dp);
        }
        if listed {
            self.synced.1 = true;
            self.announce_sync();
        }
    }

    fn announce_sync(&self) {
        if self.synced == (true, true) {
            info!(pods = self.enrolled.len(), "kubernetes pods listed");
            events::emit(serde_json::json!({
                "event": "kube_synced", "node": &self.node, "pods": self.enrolled.len(),
            }));
        }
    }

    /// Bring pod `uid` to what its objects ask for.
    fn reconcile(&mut self, uid: &str, mgr: &mut PodManager, dp: &mut Datapath) {
        let Some(pod) = self.pods.get(uid).cloned() else {
            self.reported.remove(uid);
            self.remove(uid, "pod deleted", mgr, dp);
            return;
        };
        let ns_name = pod.metadata.namespace.as_deref().unwrap_or("default");
        let ns = self.namespaces.get(ns_name);
        let allowed = |o: &PodOptions| self.allowed.check(o);
        let (decision, problems) = decide(&pod, ns, &self.node, allowed);
        let label = format!("{ns_name}/{}", pod.metadata.name.as_deref().unwrap_or(""));
        if self.reported.get(uid) != Some(&problems) {
            for p in &problems {
                self.report.problem(&pod, &label, p);
            }
            self.reported.insert(uid.to_string(), problems);
        }
        let (name, options) = match decision {
            Decision::Skip(why) => {
                self.remove(uid, why, mgr, dp);
                return;
            }
            Decision::Enrol { name, options } => (name, options),
        };
        if let Some(cur) = self.enrolled.get(uid) {
            if cur.name == name && cur.options == options {
                return;
            }
            self.remove(uid, "options changed", mgr, dp);
        }
        let Some(found) = self.resolver.find(uid) else {
            // Containers not started yet: the pod's next status update tries again.
            debug!(pod = %name, "no process of the pod found yet");
            return;
        };
        let spec = PodSpec {
            netns: found.netns.clone(),
            exclude_outbound_ports: options.exclude_outbound_ports.clone(),
            exclude_outbound_cidrs: options.exclude_outbound_cidrs.clone(),
            exclude_inbound_ports: options.exclude_inbound_ports.clone(),
        };
        let enrolment = tokio::task::block_in_place(|| self.template.prepare(uid, &name, &spec));
        let result = enrolment.and_then(|mut e| {
            // Anchored by the process found, not by the /proc path's text.
            e.anchor = Anchor::Pid(found.pid as i32);
            mgr.enrol(dp, e)
        });
        match result {
            Ok(()) => {
                info!(pod = %name, pid = found.pid, container = ?found.container, "kubernetes pod enrolled");
                let local = Local {
                    namespace: ns_name.to_string(),
                    name: pod.metadata.name.clone().unwrap_or_default(),
                };
                self.ids.write(|ix| ix.set_local(&name, local));
                self.enrolled
                    .insert(uid.to_string(), Current { name, options });
            }
            Err(e) => self.report.enrol_failed(&pod, &name, &e),
        }
    }

    fn remove(&mut self, uid: &str, why: &str, mgr: &mut PodManager, dp: &mut Datapath) {
        if let Some(cur) = self.enrolled.remove(uid) {
            mgr.remove(dp, uid, why);
            self.ids.write(|ix| ix.remove_local(&cur.name));
        }
    }

    /// The process anchoring an enrolled pod exited: if another process of the pod still
    /// holds the same namespace (an app container restarted), watch that one; otherwise the
    /// namespace is gone (or was replaced by a new sandbox): remove, and enrol it anew if the
    /// pod is still wanted and running.
    pub fn on_gone(&mut self, g: Gone, mgr: &mut PodManager, dp: &mut Datapath) {
        if !mgr.is_current(&g) {
            return;
        }
        let uid = g.id.to_string();
        if let Some(found) = self.resolver.find(&uid) {
            if Some(found.ns_id) == mgr.ns_of(&uid) {
                info!(pod = %uid, pid = found.pid, why = %g.why, "pod's namespace lives on in another of its processes");
                events::emit(serde_json::json!({
                    "event": "pod_reresolved", "id": &uid, "pid": found.pid,
                }));
                mgr.rewatch(&uid, Anchor::Pid(found.pid as i32));
                return;
            }
        }
        let why = format!("namespace gone: {}", g.why);
        self.remove(&uid, &why, mgr, dp);
        self.reconcile(&uid, mgr, dp);
    }
}
