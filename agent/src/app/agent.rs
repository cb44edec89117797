//! The running agent: what `sockmesh run` holds once everything is loaded, and one method per
//! event the event loop handles (signals, bind events, pods leaving, the Kubernetes watch,
//! policy reloads, a successor asking to take over).
use std::{collections::HashMap, os::fd::OwnedFd, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{bail, Context, Result};
use sockmesh_common::{
    peer::{self, pod_refusal},
    Event,
};
use tokio::{
    signal::unix::{signal, Signal, SignalKind},
    sync::mpsc,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use super::{
    http::{http_offers, serve_http},
    kernel_io::{next_events, read_kernel_logs, watch_events, Events},
    shutdown::{stop, Exit},
    takeover,
    waits::{next_bind, next_kube, next_step, policy_changed, sleep_until},
};
use crate::{
    admission::{endpoints::Endpoints, ProxyClock},
    cli::RunArgs,
    datapath::{heartbeat, Datapath, DatapathOptions},
    events,
    handover::{
        client::Taken,
        proto::Offered,
        serve::{Control, Step},
    },
    inpod::{
        manager::{Enrolment, Gone, PodManager, PodTemplate},
        resolver::Resolver,
    },
    kube::{
        controller::{Controller, Input},
        report::Report,
    },
    observe::http::MetricsState,
    policy::{
        bind_queue::{BindQueue, Pushed},
        Clock, Direction,
    },
    proxy::{
        shares::{ShareConfig, Shares},
        ProxyConfig, Shared,
    },
    rules::{PolicyHandle, PolicyWatcher},
    sys::clock::unix_ms,
    telemetry::{flush::Observer, recorder::Recorder},
};

/// How often the captured-port report is checked against `SM_IN_BINDS`.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);

/// The pods, ready to enrol, and on `--takeover` what the running agent handed over.
pub struct Prepared {
    pub pods: Vec<Enrolment>,
    pub taken: Option<Taken>,
}

/// What `run` validated and opened before the runtime started.
pub struct Setup {
    /// The soft open-file limit, raised to the hard one.
    pub nofile: u64,
    pub shares: ShareConfig,
    pub cgroup: PathBuf,
    pub prepared: Prepared,
    pub policy: Arc<PolicyHandle>,
    pub node: Option<String>,
    pub template: PodTemplate,
    pub metrics: Option<std::net::TcpListener>,
    /// `--health-addr`: /healthz and /readyz only.
    pub health: Option<std::net::TcpListener>,
}

/// The signals the agent answers.
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
    usr1: Signal,
}

impl Signals {
    pub fn install() -> Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("install SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("install SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("install SIGHUP handler")?,
            usr1: signal(SignalKind::user_defined1()).context("install SIGUSR1 handler")?,
        })
    }

    /// The next SIGTERM or SIGINT (one that arrived since the last wait counts).
    pub async fn stopped(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

pub struct Agent {
    dp: Datapath,
    shared: Shared,
    observer: Arc<Observer>,
    pods: PodManager,
    gone_rx: mpsc::UnboundedReceiver<Gone>,
    policy: Arc<PolicyHandle>,
    watcher: Option<PolicyWatcher>,
    metrics: Arc<MetricsState>,
    /// Where a successor asks for this agent's sockets; without it upgrades restart.
    control: Option<Control>,
    kube: Option<Controller>,
    ring: Option<Events>,
    /// The thread serving /metrics, /healthz and /readyz (off the proxy's runtime).
    http: Option<std::thread::JoinHandle<()>>,
    /// Bind/unbind events read from the ring, waiting for their pod's share.
    binds: BindQueue<Event>,
    /// The identity index's generation the policy source was last given.
    ids_seen: (u64, u64),
    /// Duplicates of the HTTP listeners, for a successor.
    http_offers: Vec<(Offered, OwnedFd)>,
    /// `--handover-wait`: after SIGTERM, how long a successor may still take over.
    handover_wait: Duration,
    /// A SIGTERM or SIGINT arrived.
    signalled: bool,
}

impl Agent {
    /// Load and attach, enrol the prepared pods (or take them over), start the background
    /// tasks, and announce `ready`. On failure everything started is stopped again.
    pub async fn start(args: RunArgs, setup: Setup) -> Result<Agent> {
        let Setup {
            nofile,
            shares,
            cgroup,
            prepared,
            policy,
            node,
            template,
            metrics,
            health,
        } = setup;
        let watcher = match policy.path() {
            Some(p) => {
                Some(PolicyWatcher::new(p).with_context(|| format!("watch {}", p.display()))?)
            }
            None => None,
        };
        // Built (not connected) before anything is loaded: a bad kubeconfig is a clean error.
        let client = match &node {
            Some(_) => Some(args.kube.client().await?),
            None => None,
        };
        let (handed_lock, predecessor, handed) = match prepared.taken {
            Some(t) => (Some(t.lock), Some((t.stream, t.pid)), Some(t.handed)),
            None => (None, None, None),
        };
        let mut dp = Datapath::start(
            &DatapathOptions {
                bpffs_dir: &args.bpffs_dir,
                cgroup_root: &cgroup,
                mark: args.mark,
                outbound_port: args.outbound_port,
                dns_port: args.dns_port,
                deny_raw_sockets: args.deny_raw_sockets,
                inbound_port: args.inbound_port,
                keep_pins: args.keep_pins,
                kernel_log: args.kernel_log,
                fail_open_after: args.fail_open_after.0,
                kernel_relay: args.kernel_relay,
                pod_origin_quota: args.shares.pod_conn_origins,
                pod_dns_quota: args.shares.pod_dns_origins,
                pod_bind_quota: args.shares.pod_inbound_binds,
                pod_fast_quota: args.shares.direct_conns(),
                fast_sockets: args.shares.fast_path_sockets,
            },
            handed_lock,
        )?;
        let Some(sink) = dp.take_sink() else {
            dp.shutdown();
            bail!("the observability maps were not loaded");
        };
        let recorder = Arc::new(Recorder::new(
            peer::map_sizes::PEERS as usize,
            Box::new(unix_ms),
        ));
        let endpoints = Endpoints::new(policy.clone(), ProxyClock::new());
        let admission =
            super::engine::admission(&dp, &args.policy, &policy, args.fast_path, &endpoints);
        let ids = policy.identities().clone();
        let observer = Arc::new(Observer::new(
            recorder.clone(),
            admission.clone(),
            sink,
            ids,
        ));
        let shared = Shared {
            cfg: Arc::new(ProxyConfig {
                mark: args.mark,
                outbound_port: args.outbound_port,
            }),
            maps: dp.maps.clone(),
            endpoints,
            admission,
            policy: policy.clone(),
            recorder,
            shares: Shares::new(shares),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            abort: CancellationToken::new(),
        };
        let metrics_state = Arc::new(MetricsState {
            bpffs_dir: args.bpffs_dir.clone(),
            top_peers: args.metrics_top_peers,
            observer: observer.clone(),
            ready: false.into(),
            last: Default::default(),
        });
        let http_offers = http_offers(&[metrics.as_ref(), health.as_ref()]);
        // On a takeover the listeners may be the old agent's, still served by it: this agent
        // answers on them only once the old one drains (both would answer otherwise, the old
        // one ready and this one not yet), so a probe always gets the serving agent's answer.
        let mut http_later = None;
        let http = if predecessor.is_some() {
            http_later = Some((metrics, health));
            None
        } else {
            serve_http(metrics, health, &metrics_state, &shared)
        };
        // Beat from before the first pod is enrolled: a pod is never captured by a silent agent.
        if let Some(hb) = dp.take_heartbeat() {
            let period = heartbeat::period(args.fail_open_after.0);
            shared.tasks.spawn(hb.run(period, shared.cancel.clone()));
        }
        let (mut pods, gone_rx) = PodManager::new(shared.clone(), observer.clone());
        let took_over_from = predecessor.as_ref().map(|(_, pid)| *pid);
        let mut kube = match (client, &node) {
            (Some(client), Some(node)) => {
                let tasks = shared.tasks.clone();
                let report = Report::new(client.clone(), node, tasks, shared.cancel.clone());
                let resolver = Resolver::new(&args.kube.proc_root);
                info!(%node, "watching this node's pods in the Kubernetes API");
                let allowed = args.kube.allow.clone();
                policy
                    .destination_rules()
                    .set_root_namespace(&args.kube.istio_root_namespace);
                Some(Controller::new(
                    client, node, resolver, report, template, allowed, &policy,
                ))
            }
            _ => None,
        };
        let started = async {
            for e in prepared.pods {
                pods.enrol(&mut dp, e)?;
            }
            let Some((stream, pid)) = predecessor else {
                return Ok(());
            };
            // In Kubernetes the pods to serve are the API's: enrol every one it lists on this
            // node (on the old agent's sockets where it had them) before the old agent stops.
            if let Some(k) = kube.as_mut() {
                takeover::sync_kube(k, &mut pods, &mut dp).await?;
            }
            if let Some(h) = &handed {
                takeover::close_unclaimed(h);
            }
            takeover::finish(&mut dp, &pods, stream, pid).await
        }
        .await;
        if let Err(e) = started {
            // On a takeover the old agent still serves every pod: leave them to it.
            let exit = if took_over_from.is_some() {
                Exit::Release
            } else {
                Exit::Stop
            };
            stop(dp, &shared, &observer, &mut pods, Duration::ZERO, exit).await;
            return Err(e);
        }
        let control = match Control::bind(&args.bpffs_dir) {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(
                    error = format!("{e:#}"),
                    "no control socket: upgrades cannot use --takeover"
                );
                None
            }
        };
        shared.tasks.spawn(crate::telemetry::flush::run(
            observer.clone(),
            shared.cancel.clone(),
        ));
        let ring = dp.take_events().and_then(watch_events);
        if let Some(logger) = dp.take_logger() {
            shared
                .tasks
                .spawn(read_kernel_logs(logger, shared.cancel.clone()));
        }
        let http = match http_later {
            Some((metrics, health)) => serve_http(metrics, health, &metrics_state, &shared),
            None => http,
        };
        // /readyz turns ready before the event, so whoever reacts to the event sees it ready.
        metrics_state.set_ready(true);
        info!(pods = pods.len(), "ready");
        events::emit(serde_json::json!({
            "event": "ready", "pods": pods.len(), "pid": std::process::id(), "took_over_from": took_over_from,
            "limits": {
                "nofile": nofile, "max_conns": shares.conns.global, "pod_max_conns": shares.conns.per_pod,
                "pod_max_queued": shares.pod_max_queued, "max_dns_inflight": shares.dns.global,
                "pod_dns_inflight": shares.dns.per_pod,
                "pod_conn_origins": args.shares.pod_conn_origins, "pod_dns_origins": args.shares.pod_dns_origins,
                "pod_inbound_binds": args.shares.pod_inbound_binds, "pod_direct_conns": args.shares.direct_conns(),
            },
        }));
        let ids_seen = policy.inputs_generation();
        Ok(Agent {
            dp,
            shared,
            observer,
            pods,
            gone_rx,
            policy,
            watcher,
            metrics: metrics_state,
            control,
            kube,
            ring,
            http,
            http_offers,
            binds: BindQueue::new(shares.pod_bind_events),
            ids_seen,
            handover_wait: args.handover_wait,
            signalled: false,
        })
    }

    /// The event loop: runs until a signal stops the agent or a successor took over.
    pub async fn serve(&mut self, sig: &mut Signals) -> Exit {
        let clock = self.shared.admission.clock();
        // Events can be lost (a full ring); what the kernel recorded is read again every second
        // so the captured-port report catches up. (Capture itself never waits for the agent.)
        let mut reconcile = tokio::time::interval(RECONCILE_EVERY);
        reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Set by a stop signal under --handover-wait: a successor taking over before then makes
        // it a rollout (pins and pods left to it), none an uninstall (everything removed).
        let mut last_call = None;
        loop {
            // While a successor is being answered, bind events wait in the ring, for the
            // successor (or for this agent if it fails): one agent reads them at a time.
            let handing_over = self.control.as_ref().is_some_and(Control::busy);
            tokio::select! {
                _ = sig.term.recv() => if let Some(exit) = self.on_stop_signal("SIGTERM", &mut last_call) { return exit; },
                _ = sig.int.recv() => if let Some(exit) = self.on_stop_signal("SIGINT", &mut last_call) { return exit; },
                // A handover under way is waited for: the successor is already here.
                _ = sleep_until(last_call), if !handing_over => {
                    info!(event = "no_successor", "no successor took over within --handover-wait: stopping for good");
                    events::emit(serde_json::json!({ "event": "no_successor" }));
                    return Exit::Stop;
                }
                evs = next_events(self.ring.as_mut()), if !handing_over => self.on_bind_events(evs),
                ev = next_bind(&mut self.binds, clock), if !handing_over => self.pods.on_event(ev),
                _ = reconcile.tick(), if !handing_over => {
                    self.pods.reconcile(&self.dp);
                    // Pods enrolled or gone outside the Kubernetes watch (`--pod`).
                    self.follow_identities();
                    self.kernel_breakers();
                    self.pods.sweep_kernel_tier();
                }
                step = next_step(self.control.as_mut()) => {
                    if matches!(step, Step::Asked(_)) {
                        // The successor's snapshot of the listeners must include every bind
                        // already read from the ring.
                        for (_, ev) in self.binds.drain_all() { self.pods.on_event(ev); }
                    }
                    if let Some(exit) = self.on_control(step) { return exit; }
                }
                Some(g) = self.gone_rx.recv() => self.on_pod_gone(g),
                input = next_kube(self.kube.as_mut()) => self.on_kube(input),
                _ = sig.hup.recv() => self.reload("SIGHUP"),
                _ = sig.usr1.recv() => self.status(),
                r = policy_changed(self.watcher.as_mut()) => self.on_policy_file(r),
            }
        }
    }

    /// Breakers the kernel tier opened since the last look: the proxy takes the peers back
    /// with their breakers open, and probes half-open when the open period ends.
    fn kernel_breakers(&self) {
        super::engine::kernel_endpoints(&self.dp, &self.shared.endpoints);
        for (netns, peer, until) in self.dp.maps.verdicts.take_kernel_opened() {
            let key = self.shared.admission.kernel_opened_breaker(
                |k| k.netns_cookie == netns && k.peer == peer && k.direction == Direction::Outbound,
                until,
            );
            if let Some(key) = key {
                self.shared.recorder.touched(&key);
            }
        }
    }

    /// Events read from the ring join their pod's queue (coalesced by port, applied at the
    /// pod's `--pod-bind-events` rate by [`next_bind`]); what waits or is dropped is counted
    /// against the pod.
    fn on_bind_events(&mut self, evs: Vec<Event>) {
        let now = self.shared.admission.clock().now();
        // Counted once per pod and kind for the whole batch: a flood arrives in big ones.
        let mut counts: HashMap<(u64, usize), u64> = HashMap::new();
        for ev in evs {
            let port = u32::from(ev.port) | u32::from(ev.family) << 16;
            let counted = match self.binds.push(now, ev.netns_cookie, port, ev) {
                Pushed::Ready => continue,
                Pushed::Deferred => pod_refusal::BIND_DEFERRED,
                Pushed::Dropped => pod_refusal::BIND_DROPPED,
            };
            *counts.entry((ev.netns_cookie, counted)).or_default() += 1;
        }
        for ((cookie, what), n) in counts {
            self.observer.refusals.add(cookie, what, n);
        }
    }

    /// SIGTERM or SIGINT. Without --handover-wait (or on a second signal) stop now. Else keep
    /// serving (unready: the node's probes then say this agent is going) until a successor
    /// takes over or `last_call` passes.
    fn on_stop_signal(
        &mut self,
        name: &str,
        last_call: &mut Option<tokio::time::Instant>,
    ) -> Option<Exit> {
        self.signalled = true;
        if self.handover_wait.is_zero() || last_call.is_some() || self.control.is_none() {
            info!("{name}: shutting down");
            return Some(Exit::Stop);
        }
        *last_call = Some(tokio::time::Instant::now() + self.handover_wait);
        self.metrics.set_ready(false);
        let wait_ms = self.handover_wait.as_millis() as u64;
        info!(
            wait_ms,
            "{name}: serving on for a successor to take over before stopping"
        );
        events::emit(serde_json::json!({ "event": "terminating", "handover_wait_ms": wait_ms }));
        None
    }

    /// Whether a SIGTERM or SIGINT arrived while serving.
    pub fn signalled(&self) -> bool {
        self.signalled
    }

    /// A successor asked for the sockets, finished taking over, or gave up.
    fn on_control(&mut self, step: Step) -> Option<Exit> {
        match step {
            Step::Asked(conn) => {
                let c = self.control.as_mut();
                takeover::answer(c, conn, &self.pods, &self.http_offers, &self.dp);
                None
            }
            Step::Done(Ok(())) => {
                info!(event = "handed_over", "a successor took over: draining");
                events::emit(
                    serde_json::json!({ "event": "handed_over", "tasks": self.shared.tasks.len() }),
                );
                if let Some(c) = self.control.as_mut() {
                    c.leave_path();
                }
                Some(Exit::Release)
            }
            Step::Done(Err(e)) => {
                warn!(error = %e, "a successor gave up taking over; still serving");
                None
            }
        }
    }

    /// A pod's namespace went away.
    fn on_pod_gone(&mut self, g: Gone) {
        match self.kube.as_mut() {
            Some(k) if k.owns(&g.id) => k.on_gone(g, &mut self.pods, &mut self.dp),
            _ if self.pods.is_current(&g) => {
                let why = format!("namespace gone: {}", g.why);
                self.pods.remove(&mut self.dp, &g.id, &why);
            }
            _ => {}
        }
    }

    fn on_kube(&mut self, input: Input) {
        if let Some(k) = self.kube.as_mut() {
            k.handle(input, &mut self.pods, &mut self.dp);
        }
        self.follow_identities();
    }

    /// A rule on a Service follows its endpoints (and a rule on a workload its pods): when
    /// the identity index changed, peers re-resolve their policy on their next use.
    fn follow_identities(&mut self) {
        let ids = self.policy.inputs_generation();
        if ids != self.ids_seen {
            let rules_changed = ids.1 != self.ids_seen.1;
            self.ids_seen = ids;
            (self.shared.admission).refresh_source(self.policy.source(), rules_changed);
        }
    }

    fn on_policy_file(&mut self, changed: std::io::Result<()>) {
        match changed {
            Ok(()) => self.reload("file changed"),
            Err(e) => {
                warn!(error = %e, "policy file watch ended; SIGHUP still reloads");
                self.watcher = None;
            }
        }
    }

    /// Apply a changed policy file to new connections, or keep the old policy and say why.
    fn reload(&self, why: &str) {
        let policy = &self.policy;
        match policy.reload() {
            Ok(()) => {
                self.shared.admission.set_source(policy.source());
                info!(
                    event = "policy_reloaded",
                    why,
                    generation = policy.generation(),
                    "policy reloaded"
                );
                events::emit(
                    serde_json::json!({ "event": "policy_reloaded", "generation": policy.generation() }),
                );
            }
            Err(e) => {
                warn!(event = "policy_rejected", why, error = %e, "policy file rejected; the previous policy stays");
                events::emit(
                    serde_json::json!({ "event": "policy_rejected", "error": e.to_string() }),
                );
            }
        }
    }

    /// Live task count on demand: what an operator (and the soak test) checks for leaks.
    fn status(&self) {
        let maps = &self.shared.maps;
        events::emit(serde_json::json!({
            "event": "status",
            "tasks": self.shared.tasks.len(),
            "pods": self.pods.len(),
            "pipes_in_use": crate::proxy::relay::PipePool::global().in_use(),
            "pipes_pooled": crate::proxy::relay::PipePool::global().pooled(),
            "sockets_pooled": crate::proxy::upstream::pooled(),
            "conns_held": self.shared.shares.conns_held(),
            "dns_inflight": self.shared.shares.dns_held(),
            "binds_pending": self.binds.pending(),
            "kernel_relay_active": maps.relay.as_ref().map(|r| r.active()),
            "kernel_relay_armed": maps.relay.as_ref().map(|r| r.armed()),
        }));
    }

    /// The watches end before the pods go, so no enrolment races the shutdown; a handover in
    /// progress is cut short. Then drain (see [`stop`]).
    pub async fn stop(self, grace: Duration, exit: Exit) {
        let Agent {
            dp,
            shared,
            observer,
            mut pods,
            metrics,
            control,
            kube,
            ring,
            http,
            ..
        } = self;
        drop(kube);
        drop(control);
        drop(ring);
        // After a handover the successor answers on the same HTTP listeners, ready: this
        // agent stops answering there (below) without saying "not ready" first.
        if exit == Exit::Stop {
            metrics.set_ready(false);
        }
        stop(dp, &shared, &observer, &mut pods, grace, exit).await;
        // The cancel token that stopped the proxies ended the HTTP thread's loops too.
        if let Some(h) = http {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        events::emit(serde_json::json!({ "event": "stopped" }));
    }
}
