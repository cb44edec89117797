//! The enrolled pods at runtime: enrol one (its listeners are already open), remove one, and
//! notice when one's namespace goes away; which of their ports are captured (`captured`).
//! Every pod's proxy tasks run under its own cancellation token (a child of the agent's), so
//! removing a pod stops exactly its listeners, and the agent's shutdown still reaches all of
//! them.
//!
//! Order matters both ways. Enrolment: listeners serve first, then `sk_lookup` is attached to
//! the pod's namespace, then the kernel starts redirecting and steering (SM_PODS), so nothing
//! is sent to a socket nobody serves. Removal: the kernel stops redirecting and steering
//! first, then the listeners close, then the pod's map entries go.
//! Connections already proxied are left to finish (bounded by the idle timeout and lifetime
//! policy), as at shutdown: removing a pod does not cut its live connections.
use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    sync::Arc,
};

use anyhow::{bail, Context, Result};
use sockmesh_common::{Event, PodConfig};
use tokio::{
    net::{TcpListener, UdpSocket},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    captured::{record_listening, Captured},
    liveness::{self, Anchor},
    pod::{Pod, PodListeners, Ports},
    resolver::{ns_id, NsId},
};
use crate::{
    datapath::Datapath,
    events,
    handover::{
        proto::{Kind, Offered},
        Handed,
    },
    policy::{token_bucket::TokenBucket, Clock, Direction, PeerKey},
    proxy::{dns, inbound, outbound, PodCtx, Shared},
    spec::{CidrSpec, PodSpec, PortRangeSpec},
    telemetry::flush::Observer,
};

/// A pod's namespace went away (sent by its liveness watch).
#[derive(Debug)]
pub struct Gone {
    pub id: Arc<str>,
    generation: u64,
    pub why: String,
}

/// One enrolled pod.
struct Enrolled {
    name: Arc<str>,
    cookie: u64,
    ns: NsId,
    generation: u64,
    /// Stops this pod's listeners and its liveness watch.
    cancel: CancellationToken,
    /// A duplicate of each of the pod's outbound, inbound and DNS sockets (the originals are
    /// moved into their serve loops), to hand to a successor agent.
    offers: Vec<(Offered, OwnedFd)>,
    /// Holds the namespace (fd and worker thread) until removal.
    _pod: Pod,
}

/// Everything [`PodManager::enrol`] needs about a pod.
pub struct Enrolment {
    /// Stable identity of the pod for its source (the netns path for `--pod`, the UID for
    /// Kubernetes).
    pub id: Arc<str>,
    /// Name used in logs, events and policy rules.
    pub name: Arc<str>,
    pub pod: Pod,
    pub listeners: PodListeners,
    pub config: PodConfig,
    /// What to watch to learn that the namespace is gone.
    pub anchor: Anchor,
}

pub struct PodManager {
    shared: Shared,
    /// Per-pod figures: a pod's name for `sockmesh pods`, its peers flushed to the maps.
    observer: Arc<Observer>,
    captured: Captured,
    pods: HashMap<Arc<str>, Enrolled>,
    gone_tx: mpsc::UnboundedSender<Gone>,
    next_generation: u64,
    /// When each pod's direct connections next need a look for the idle timeout.
    idle: Arc<std::sync::Mutex<crate::policy::idle_sweep::IdleSchedule>>,
    /// When each pod's open direct connections are next looked at for their bytes.
    live_bytes: Arc<std::sync::Mutex<super::live_bytes::LiveSchedule>>,
}

impl PodManager {
    pub fn new(
        shared: Shared,
        observer: Arc<Observer>,
    ) -> (PodManager, mpsc::UnboundedReceiver<Gone>) {
        let (gone_tx, gone_rx) = mpsc::unbounded_channel();
        let mgr = PodManager {
            captured: Captured::default(),
            shared,
            observer,
            pods: HashMap::new(),
            gone_tx,
            next_generation: 0,
            idle: Default::default(),
            live_bytes: Default::default(),
        };
        (mgr, gone_rx)
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    /// The netns cookies of every enrolled pod.
    pub fn cookies(&self) -> Vec<u64> {
        self.pods.values().map(|p| p.cookie).collect()
    }

    /// The namespace identity of an enrolled pod.
    pub fn ns_of(&self, id: &str) -> Option<NsId> {
        self.pods.get(id).map(|p| p.ns)
    }

    /// Whether `g` is about the pod as currently enrolled (not an earlier enrolment).
    pub fn is_current(&self, g: &Gone) -> bool {
        self.pods
            .get(&g.id)
            .is_some_and(|p| p.generation == g.generation)
    }

    /// Start the pod's proxies, then tell the kernel to redirect its sockets. On error nothing
    /// of the pod is left running or in the maps.
    pub fn enrol(&mut self, dp: &mut Datapath, e: Enrolment) -> Result<()> {
        if self.pods.contains_key(&e.id) {
            bail!("pod {} is already enrolled", e.name);
        }
        let ns = ns_id(e.pod.netns.path())
            .with_context(|| format!("pod {}: stat its namespace", e.name))?;
        if let Some(other) = self.pods.values().find(|p| p.ns == ns) {
            bail!(
                "pod {} is in the same network namespace as pod {}: a namespace is enrolled once",
                e.name,
                other.name
            );
        }
        let cancel = self.shared.cancel.child_token();
        let shared = Shared {
            cancel: cancel.clone(),
            ..self.shared.clone()
        };
        let ctx = PodCtx {
            name: e.name.clone(),
            cookie: e.pod.cookie,
            worker: e.pod.worker.clone(),
            upstream: Default::default(),
            refusals: self.observer.refusals.pod(e.pod.cookie),
            dns_rate: Arc::new(std::sync::Mutex::new(self.dns_bucket())),
        };
        let mut offers = Vec::new();
        let mut offer =
            |kind, addr: std::io::Result<SocketAddr>, fd: std::io::Result<OwnedFd>| -> Result<()> {
                let o = Offered {
                    netns_cookie: ctx.cookie,
                    kind,
                    addr: addr?,
                };
                offers.push((o, fd.context("duplicate a listener for a successor")?));
                Ok(())
            };
        let started = (|| -> Result<()> {
            for l in e.listeners.outbound {
                offer(
                    Kind::Outbound,
                    l.local_addr(),
                    l.try_clone().map(OwnedFd::from),
                )?;
                // Already set on a listener this agent made; one handed over by an older
                // agent may lack it, and accepted sockets inherit it.
                let _ = socket2::SockRef::from(&l).set_nodelay(true);
                let l = TcpListener::from_std(l).context("register outbound listener")?;
                shared
                    .tasks
                    .spawn(outbound::serve(l, ctx.clone(), shared.clone()));
            }
            for s in e.listeners.dns {
                offer(Kind::Dns, s.local_addr(), s.try_clone().map(OwnedFd::from))?;
                let s = UdpSocket::from_std(s).context("register DNS listener")?;
                shared
                    .tasks
                    .spawn(dns::serve(s, ctx.clone(), shared.clone()));
            }
            let mut inbound_fds = Vec::new();
            for l in e.listeners.inbound {
                let dup = l.try_clone().map(OwnedFd::from);
                offer(Kind::Inbound, l.local_addr(), dup)?;
                let _ = socket2::SockRef::from(&l).set_nodelay(true);
                inbound_fds.push(
                    l.try_clone()
                        .map(OwnedFd::from)
                        .context("duplicate an inbound listener")?,
                );
                let l = TcpListener::from_std(l).context("register inbound listener")?;
                shared
                    .tasks
                    .spawn(inbound::serve(l, ctx.clone(), shared.clone()));
            }
            let fds: Vec<_> = inbound_fds.iter().map(|f| f.as_fd()).collect();
            dp.steer(ctx.cookie, e.pod.netns.as_fd(), &fds)
                .with_context(|| format!("pod {}: steer its inbound connections", ctx.name))?;
            dp.enrol(ctx.cookie, e.config)
                .with_context(|| format!("enrol pod {}", ctx.name))
        })();
        if let Err(err) = started {
            cancel.cancel();
            dp.unsteer(ctx.cookie);
            dp.maps.verdicts.forget_pod(ctx.cookie);
            return Err(err);
        }
        // Servers that were listening before: captured too. What the bind hook recorded for
        // this pod before (a restarted agent on the same pins) is captured from now on: report
        // it.
        record_listening(dp, &ctx.name, ctx.cookie, &ctx.worker, &e.config);
        self.captured.add_pod(ctx.cookie, ctx.name.clone());
        self.captured.reconcile(dp.bound_ports());
        self.next_generation += 1;
        let generation = self.next_generation;
        self.watch(e.id.clone(), generation, e.anchor, ns, cancel.clone());
        self.observer.pod_enrolled(ctx.cookie, &ctx.name);
        // Its addresses name it as a peer of the other pods (all the agent knows without
        // --kube; with it, the pod watch knows more).
        let ids = self.shared.policy.identities();
        ids.write(|ix| ix.set_enrolled(&ctx.name, &e.pod.addrs));
        info!(event = "pod_enrolled", pod = %ctx.name, netns_cookie = ctx.cookie, addrs = ?e.pod.addrs, "pod enrolled");
        events::emit(serde_json::json!({
            "event": "pod_enrolled", "pod": &*ctx.name, "id": &*e.id, "netns_cookie": ctx.cookie,
        }));
        self.shared.shares.set_pods(self.pods.len() + 1);
        self.pods.insert(
            e.id,
            Enrolled {
                name: ctx.name,
                cookie: ctx.cookie,
                ns,
                generation,
                cancel,
                offers,
                _pod: e.pod,
            },
        );
        Ok(())
    }

    /// A full bucket of `--pod-dns-rate`, or none.
    fn dns_bucket(&self) -> Option<TokenBucket> {
        let now = self.shared.admission.clock().now();
        let rate = self.shared.shares.config.pod_dns_rate?;
        Some(TokenBucket::new(rate, rate.tokens(), now))
    }

    /// Watch another anchor of the same namespace (a Kubernetes pod whose watched process
    /// exited while its namespace lives on in another one).
    pub fn rewatch(&mut self, id: &str, anchor: Anchor) {
        self.next_generation += 1;
        let generation = self.next_generation;
        if let Some(p) = self.pods.get_mut(id) {
            p.generation = generation;
            let (key, ns, cancel) = (Arc::<str>::from(id), p.ns, p.cancel.clone());
            self.watch(key, generation, anchor, ns, cancel);
        }
    }

    fn watch(
        &self,
        id: Arc<str>,
        generation: u64,
        anchor: Anchor,
        ns: NsId,
        cancel: CancellationToken,
    ) {
        let tx = self.gone_tx.clone();
        self.shared.tasks.spawn(async move {
            let what = format!("{anchor:?}");
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = liveness::gone(anchor, ns) => match r {
                    Ok(why) => { let _ = tx.send(Gone { id, generation, why }); }
                    // The pod stays enrolled: without a watch its removal needs its source
                    // (Kubernetes) or a restart.
                    Err(e) => warn!(pod = %id, anchor = %what, error = %e, "cannot watch the pod's namespace"),
                },
            }
        });
    }

    /// Stop redirecting the pod, close its listeners and forget its map entries. False if it
    /// was not enrolled.
    pub fn remove(&mut self, dp: &mut Datapath, id: &str, reason: &str) -> bool {
        let Some(p) = self.pods.remove(id) else {
            return false;
        };
        self.shared.shares.set_pods(self.pods.len());
        dp.unenrol(p.cookie);
        p.cancel.cancel();
        self.captured.remove_pod(p.cookie);
        dp.maps.verdicts.forget_pod(p.cookie);
        dp.forget_pod(p.cookie);
        self.observer.pod_removed(p.cookie);
        self.observer.forget_pod(p.cookie, &p.name);
        let ids = self.shared.policy.identities();
        ids.write(|ix| ix.remove_enrolled(&p.name));
        info!(event = "pod_removed", pod = %p.name, netns_cookie = p.cookie, reason, "pod removed");
        events::emit(serde_json::json!({
            "event": "pod_removed", "pod": &*p.name, "id": id, "netns_cookie": p.cookie, "reason": reason,
        }));
        true
    }

    /// Every listening socket of every pod (duplicates), for a successor agent: outbound, DNS
    /// and inbound.
    pub fn offers(&self) -> Result<Vec<(Offered, OwnedFd)>> {
        let mut out = Vec::new();
        for p in self.pods.values() {
            for (o, fd) in &p.offers {
                out.push((*o, fd.try_clone().context("duplicate a listener")?));
            }
        }
        Ok(out)
    }

    /// Close the duplicates kept for a successor, so a listener whose serve loop ended is
    /// really closed (at shutdown, queued connections are then refused, not left hanging).
    pub fn close_offers(&mut self) {
        for p in self.pods.values_mut() {
            p.offers.clear();
        }
    }

    /// A bind/unbind event from the kernel.
    pub fn on_event(&mut self, ev: Event) {
        self.captured.on_event(&ev);
    }

    /// Bring the captured-port report in line with the kernel's record (`SM_IN_BINDS`), which
    /// events lost on the way (a full ring) left behind.
    pub fn reconcile(&mut self, dp: &Datapath) {
        self.captured.reconcile(dp.bound_ports());
    }

    /// The agent's look at the kernel tier, once a second: closes the direct connections
    /// that outlived their idle timeout, and folds the connect latencies the kernel measured
    /// since the last look into their peers' samples (the p50/p99 the proxy tier reports).
    pub fn sweep_kernel_tier(&self) {
        let scan = self.shared.maps.verdicts.scan();
        let pods = self
            .pods
            .values()
            .map(|p| (&p.name, p.cookie, &p._pod.worker));
        super::idle::sweep(pods.clone(), &scan.idle_timeouts, &self.shared, &self.idle);
        super::live_bytes::sweep(pods, &scan.kernel_peers, &self.shared, &self.live_bytes);
        let names: HashMap<u64, &Arc<str>> =
            self.pods.values().map(|p| (p.cookie, &p.name)).collect();
        for (cookie, peer, samples) in scan.latencies {
            let Some(name) = names.get(&cookie) else {
                continue;
            };
            let key = PeerKey {
                pod: Arc::clone(name),
                netns_cookie: cookie,
                direction: Direction::Outbound,
                peer,
            };
            self.shared.recorder.kernel_connected(&key, &samples);
        }
    }
}

/// What every pod shares: the agent's mark and ports and the global exclusions. Turns a
/// [`PodSpec`] into an [`Enrolment`] (namespace opened, listeners open, nothing in the kernel).
#[derive(Clone, Debug)]
pub struct PodTemplate {
    pub mark: u32,
    pub outbound_port: u16,
    pub dns_port: u16,
    pub inbound_port: u16,
    pub exclude_outbound_ports: Vec<PortRangeSpec>,
    pub exclude_outbound_cidrs: Vec<CidrSpec>,
    pub exclude_inbound_ports: Vec<PortRangeSpec>,
    /// On `--takeover`, the old agent's sockets not yet taken by a pod.
    pub handed: Option<Handed>,
}

impl PodTemplate {
    /// The kernel's view of the pod, global exclusions merged in (pure).
    pub fn config(&self, spec: &PodSpec) -> Result<PodConfig, String> {
        spec.to_kernel(
            &self.exclude_outbound_ports,
            &self.exclude_outbound_cidrs,
            &self.exclude_inbound_ports,
        )
    }

    /// Open the pod's namespace and listeners (blocking: a thread enters the namespace).
    pub fn prepare(&self, id: &str, name: &str, spec: &PodSpec) -> Result<Enrolment> {
        let config = self.config(spec).map_err(|e| anyhow::anyhow!(e))?;
        let (pod, listeners) = Pod::prepare(
            spec,
            self.mark,
            Ports {
                outbound: self.outbound_port,
                dns: self.dns_port,
                inbound: self.inbound_port,
            },
            self.handed.clone(),
        )?;
        Ok(Enrolment {
            id: id.into(),
            name: name.into(),
            pod,
            listeners,
            config,
            anchor: Anchor::of(&spec.netns),
        })
    }
}
