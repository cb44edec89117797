//! The watches that keep the identity index current: every Service, every EndpointSlice and
//! every pod of the cluster (not only this node's: peers live on other nodes), list + watch
//! through kube-runtime's watcher (resource versions, a relist after `410 Gone`, backoff while
//! the API server is away). A relist is applied whole at its end (`InitDone`), so lookups never
//! see a half-listed cluster; while the API is unreachable the index keeps what it had.
use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    runtime::{watcher, WatchStreamExt},
    Api, Client, Resource,
};
use tracing::{info, warn};

use super::owners;
use crate::identity::{Identities, Index};

type Watch<K> = Pin<Box<dyn Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send>>;
type Item<K> = Box<Result<watcher::Event<K>, watcher::Error>>;

/// One item from one of the three watches.
pub enum IdInput {
    Service(Item<Service>),
    Slice(Item<EndpointSlice>),
    Pod(Item<Pod>),
}

/// What one watch event does to the index.
pub(super) enum Change<O> {
    Apply(O),
    Delete(String, String),
    Replace(Vec<O>),
    Nothing,
}

fn watch<K>(client: &Client) -> Watch<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let api: Api<K> = Api::all(client.clone());
    watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed()
}

/// Folds one event into a [`Change`], buffering a relist until it is complete.
pub(super) fn step<K: Resource, O>(
    ev: watcher::Event<K>,
    relist: &mut Option<Vec<O>>,
    mut conv: impl FnMut(&K) -> Option<O>,
) -> Change<O> {
    match ev {
        watcher::Event::Apply(k) => conv(&k).map_or_else(
            // An object that no longer qualifies (a slice that lost its Service label) goes.
            || delete_of(&k),
            Change::Apply,
        ),
        watcher::Event::Delete(k) => delete_of(&k),
        watcher::Event::Init => {
            *relist = Some(Vec::new());
            Change::Nothing
        }
        watcher::Event::InitApply(k) => {
            if let (Some(list), Some(o)) = (relist.as_mut(), conv(&k)) {
                list.push(o);
            }
            Change::Nothing
        }
        watcher::Event::InitDone => relist.take().map_or(Change::Nothing, Change::Replace),
    }
}

fn delete_of<K: Resource, O>(k: &K) -> Change<O> {
    let m = k.meta();
    Change::Delete(
        m.namespace.clone().unwrap_or_else(|| "default".into()),
        m.name.clone().unwrap_or_default(),
    )
}

pub struct IdentityWatch {
    ids: Identities,
    services: Watch<Service>,
    slices: Watch<EndpointSlice>,
    pods: Watch<Pod>,
    relist_services: Option<Vec<crate::identity::ServiceObject>>,
    relist_slices: Option<Vec<crate::identity::SliceObject>>,
    relist_pods: Option<Vec<crate::identity::PodObject>>,
    /// Which watches have completed a list: (services, slices, pods).
    synced: (bool, bool, bool),
}

impl IdentityWatch {
    pub fn new(client: &Client, ids: Identities) -> IdentityWatch {
        IdentityWatch {
            ids,
            services: watch(client),
            slices: watch(client),
            pods: watch(client),
            relist_services: None,
            relist_slices: None,
            relist_pods: None,
            synced: (false, false, false),
        }
    }

    /// The next event of any of the watches (never ends: they retry forever).
    pub async fn next(&mut self) -> IdInput {
        tokio::select! {
            Some(e) = self.services.next() => IdInput::Service(Box::new(e)),
            Some(e) = self.slices.next() => IdInput::Slice(Box::new(e)),
            Some(e) = self.pods.next() => IdInput::Pod(Box::new(e)),
            else => std::future::pending().await,
        }
    }

    pub fn handle(&mut self, input: IdInput) {
        let failed = |what: &str, e: &watcher::Error| {
            warn!(error = %e, watch = what, "identity watch failed; retrying with backoff (peers keep the names they had)");
        };
        match input {
            IdInput::Service(r) => match *r {
                Err(e) => failed("services", &e),
                Ok(ev) => {
                    let c = step(ev, &mut self.relist_services, |s| Some(owners::service(s)));
                    self.synced.0 |= matches!(c, Change::Replace(_));
                    self.apply(c, Index::apply_service, Index::delete_service, |ix, all| {
                        ix.replace_services(all)
                    });
                }
            },
            IdInput::Slice(r) => match *r {
                Err(e) => failed("endpointslices", &e),
                Ok(ev) => {
                    let c = step(ev, &mut self.relist_slices, owners::slice);
                    self.synced.1 |= matches!(c, Change::Replace(_));
                    self.apply(c, Index::apply_slice, Index::delete_slice, |ix, all| {
                        ix.replace_slices(all)
                    });
                }
            },
            IdInput::Pod(r) => match *r {
                Err(e) => failed("pods", &e),
                Ok(ev) => {
                    let c = step(ev, &mut self.relist_pods, |p| Some(owners::pod(p)));
                    self.synced.2 |= matches!(c, Change::Replace(_));
                    self.apply(c, Index::apply_pod, Index::delete_pod, |ix, all| {
                        ix.replace_pods(all)
                    });
                }
            },
        }
    }

    fn apply<O>(
        &mut self,
        c: Change<O>,
        apply: fn(&mut Index, O),
        delete: fn(&mut Index, &str, &str),
        replace: impl FnOnce(&mut Index, Vec<O>),
    ) {
        let listed = matches!(c, Change::Replace(_));
        match c {
            Change::Nothing => return,
            Change::Apply(o) => self.ids.write(|ix| apply(ix, o)),
            Change::Delete(ns, name) => self.ids.write(|ix| delete(ix, &ns, &name)),
            Change::Replace(all) => self.ids.write(|ix| replace(ix, all)),
        }
        if listed && self.synced == (true, true, true) {
            let (services, slices, pods) = self.ids.read().sizes();
            info!(services, slices, pods, "peer identities listed");
            crate::events::emit(serde_json::json!({
                "event": "identities_synced", "services": services, "endpointslices": slices, "pods": pods,
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(name: &str, service: Option<&str>) -> EndpointSlice {
        let labels = match service {
            Some(s) => json!({"kubernetes.io/service-name": s}),
            None => json!({}),
        };
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "labels": labels},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.1.0.5"]}],
        }))
        .expect("slice")
    }

    fn names<O>(c: &Change<O>, f: impl Fn(&O) -> String) -> String {
        match c {
            Change::Apply(o) => format!("apply {}", f(o)),
            Change::Delete(ns, n) => format!("delete {ns}/{n}"),
            Change::Replace(all) => {
                let v: Vec<String> = all.iter().map(f).collect();
                format!("replace [{}]", v.join(","))
            }
            Change::Nothing => "nothing".into(),
        }
    }

    #[test]
    fn a_relist_is_applied_whole_at_its_end_and_only_then() {
        let mut relist = None;
        let name = |s: &crate::identity::SliceObject| s.name.clone();
        let mut steps = Vec::new();
        for ev in [
            watcher::Event::Init,
            watcher::Event::InitApply(slice("a", Some("payments"))),
            watcher::Event::InitApply(slice("own", None)),
            watcher::Event::InitApply(slice("b", Some("cart"))),
            watcher::Event::InitDone,
            watcher::Event::Apply(slice("c", Some("cart"))),
            watcher::Event::Apply(slice("a", None)),
            watcher::Event::Delete(slice("b", Some("cart"))),
            // A stray InitDone (no relist in progress) replaces nothing.
            watcher::Event::InitDone,
        ] {
            steps.push(names(&step(ev, &mut relist, owners::slice), name));
        }
        assert_eq!(
            steps,
            [
                "nothing",
                "nothing",
                "nothing",
                "nothing",
                "replace [a,b]",
                "apply c",
                "delete shop/a",
                "delete shop/b",
                "nothing",
            ],
            "a slice that names no Service is left out; one that loses its label goes"
        );
    }
}
