//! `sockmesh run`: validate everything, then load, enrol, proxy, and take it all down on
//! SIGINT/SIGTERM. The order is chosen so a failure at any step leaves nothing behind, and
//! the kernel only starts redirecting a pod once its listeners are open. Pods come from
//! `--pod` at start and, with `--kube`, from the Kubernetes API at any time; either kind is
//! removed when its namespace goes away.
use std::{collections::HashMap, sync::Arc, time::Duration};

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{MapData, RingBuf};
use sockmesh_common::{peer, Event};
use tokio::{
    io::unix::AsyncFd,
    net::TcpListener,
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    cli::RunArgs,
    datapath::{heartbeat, preflight, Datapath, DatapathOptions},
    events,
    inpod::{
        manager::{Enrolment, PodManager, PodTemplate},
        resolver::{ns_id, Resolver},
    },
    kube::{controller::Controller, report::Report},
    observe::{self, flush::Observer, http::MetricsState, recorder::Recorder, sink::unix_ms},
    policy::{watch::PolicyWatcher, Direction, PeerKey, PeerTable, PolicyArgs, PolicyHandle},
    proxy::{admission::Admission, ProxyConfig, Shared},
};

pub fn run(args: RunArgs) -> Result<()> {
    preflight::check_privileges()?;
    // Before any thread exists, so every thread the agent starts inherits the reduced sets.
    crate::caps::drop_unneeded()?;
    preflight::check_kernel()?;
    preflight::check_bpffs(&args.bpffs_dir)?;
    let cgroup = preflight::cgroup_root(args.cgroup_root.as_deref())?;
    let node = args.kube.validate()?;
    let template = PodTemplate::from_args(&args);

    // Pure validation of every pod before touching anything.
    for spec in &args.pods {
        template.config(spec).map_err(|e| anyhow!(e))?;
    }
    // The policy file is validated before anything is loaded: a bad file is one clear error.
    let policy = Arc::new(args.policy.policy_handle().map_err(|e| anyhow!("{e}"))?);
    if args.pods.is_empty() && node.is_none() {
        warn!("no --pod given: the programs are attached but no traffic is captured");
    }
    // The same namespace under two paths would fight over its listeners: refuse it by the
    // namespace's identity (device and inode of the nsfs file) before opening anything.
    let mut seen: HashMap<(u64, u64), &std::path::Path> = HashMap::new();
    for spec in &args.pods {
        if let Ok(id) = ns_id(&spec.netns) {
            if let Some(other) = seen.insert(id, &spec.netns) {
                bail!(
                    "--pod {} and --pod {} are the same network namespace: give each pod once",
                    other.display(),
                    spec.netns.display()
                );
            }
        }
    }
    // Namespaces and listeners next: still nothing in the kernel, so failing here is clean.
    let mut prepared = Vec::new();
    for spec in &args.pods {
        let path = spec.netns.display().to_string();
        prepared.push(template.prepare(&path, &path, spec)?);
    }

    // A taken metrics port is a bad flag: refuse it before anything is opened or loaded.
    let metrics = args.metrics_addr.0.map(observe::http::bind).transpose()?;

    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all().thread_name("sockmesh");
    if let Some(n) = args.worker_threads {
        rt.worker_threads(usize::from(n));
    }
    let rt = rt.build().context("start the async runtime")?;
    rt.block_on(serve(
        args, cgroup, prepared, policy, node, template, metrics,
    ))
}

async fn serve(
    args: RunArgs,
    cgroup: std::path::PathBuf,
    prepared: Vec<Enrolment>,
    policy: Arc<PolicyHandle>,
    node: Option<String>,
    template: PodTemplate,
    metrics: Option<std::net::TcpListener>,
) -> Result<()> {
    // Signals are hooked before anything is attached so an early SIGTERM still cleans up.
    let mut sigterm = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("install SIGHUP handler")?;
    let mut sigusr1 = signal(SignalKind::user_defined1()).context("install SIGUSR1 handler")?;
    let mut watcher = match policy.path() {
        Some(p) => Some(PolicyWatcher::new(p).with_context(|| format!("watch {}", p.display()))?),
        None => None,
    };
    // Built (not connected) before anything is loaded: a bad kubeconfig is a clean error.
    let client = match &node {
        Some(_) => Some(args.kube.client().await?),
        None => None,
    };
    let mut dp = Datapath::start(&DatapathOptions {
        bpffs_dir: &args.bpffs_dir,
        cgroup_root: &cgroup,
        mark: args.mark,
        outbound_port: args.outbound_port,
        dns_port: args.dns_port,
        keep_pins: args.keep_pins,
        kernel_log: args.kernel_log,
        fail_open_after: args.fail_open_after.0,
        kernel_relay: args.kernel_relay,
    })?;
    let Some(sink) = dp.take_sink() else {
        dp.shutdown();
        bail!("the observability maps were not loaded");
    };
    let recorder = Arc::new(Recorder::new(
        peer::map_sizes::PEERS as usize,
        Box::new(unix_ms),
    ));
    let admission = admission(&dp, &args.policy, &policy);
    let observer = Arc::new(Observer::new(recorder.clone(), admission.clone(), sink));
    let shared = Shared {
        cfg: std::sync::Arc::new(ProxyConfig {
            mark: args.mark,
            outbound_port: args.outbound_port,
            dns_port: args.dns_port,
        }),
        maps: dp.maps.clone(),
        admission,
        policy: policy.clone(),
        recorder,
        cancel: CancellationToken::new(),
        tasks: TaskTracker::new(),
        abort: CancellationToken::new(),
    };
    let metrics_state = Arc::new(MetricsState {
        bpffs_dir: args.bpffs_dir.clone(),
        top_peers: args.metrics_top_peers,
        observer: observer.clone(),
        ready: false.into(),
    });
    if let Some(l) = metrics {
        match TcpListener::from_std(l) {
            Ok(l) => {
                let addr = l.local_addr().ok();
                shared.tasks.spawn(observe::http::serve(
                    l,
                    metrics_state.clone(),
                    shared.cancel.clone(),
                    shared.tasks.clone(),
                ));
                info!(addr = ?addr, "metrics endpoint listening");
                events::emit(serde_json::json!({ "event": "metrics_listening", "addr": addr }));
            }
            Err(e) => warn!(error = %e, "cannot serve metrics"),
        }
    }
    // Beat from before the first pod is enrolled: a pod is never captured by a silent agent.
    if let Some(hb) = dp.take_heartbeat() {
        let period = heartbeat::period(args.fail_open_after.0);
        shared.tasks.spawn(hb.run(period, shared.cancel.clone()));
    }
    let (mut pods, mut gone_rx) = PodManager::new(shared.clone(), observer.clone());
    for e in prepared {
        if let Err(e) = pods.enrol(&mut dp, e) {
            stop(dp, &shared, &observer, &pods, Duration::ZERO).await;
            return Err(e);
        }
    }
    shared
        .tasks
        .spawn(observe::flush::run(observer.clone(), shared.cancel.clone()));
    let mut kube = match (client, &node) {
        (Some(client), Some(node)) => {
            let tasks = shared.tasks.clone();
            let report = Report::new(client.clone(), node, tasks, shared.cancel.clone());
            let resolver = Resolver::new(&args.kube.proc_root);
            info!(%node, "watching this node's pods in the Kubernetes API");
            Some(Controller::new(client, node, resolver, report, template))
        }
        _ => None,
    };

    let (ev_tx, mut ev_rx) = mpsc::channel::<Event>(1024);
    if let Some(ring) = dp.take_events() {
        shared
            .tasks
            .spawn(read_events(ring, ev_tx, shared.cancel.clone()));
    }
    if let Some(logger) = dp.take_logger() {
        shared
            .tasks
            .spawn(read_kernel_logs(logger, shared.cancel.clone()));
    }
    info!(pods = pods.len(), "ready");
    events::emit(serde_json::json!({ "event": "ready", "pods": pods.len() }));
    metrics_state.set_ready(true);

    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
            Some(ev) = ev_rx.recv() => pods.on_event(ev).await,
            Some(g) = gone_rx.recv() => match kube.as_mut() {
                Some(k) if k.owns(&g.id) => k.on_gone(g, &mut pods, &mut dp),
                _ if pods.is_current(&g) => {
                    let why = format!("namespace gone: {}", g.why);
                    pods.remove(&mut dp, &g.id, &why);
                }
                _ => {}
            },
            input = async { match kube.as_mut() { Some(k) => k.next().await, None => std::future::pending().await } } => {
                if let Some(k) = kube.as_mut() { k.handle(input, &mut pods, &mut dp); }
            }
            _ = sighup.recv() => reload(&policy, &shared, "SIGHUP"),
            // Live task count on demand: what an operator (and the soak test) checks for leaks.
            _ = sigusr1.recv() => events::emit(serde_json::json!({
                "event": "status",
                "tasks": shared.tasks.len(),
                "pods": pods.len(),
                "pipes_in_use": crate::proxy::relay::PipePool::global().in_use(),
                "pipes_pooled": crate::proxy::relay::PipePool::global().pooled(),
                "kernel_relay_active": shared.maps.relay.as_ref().map(|r| r.active()),
                "kernel_relay_armed": shared.maps.relay.as_ref().map(|r| r.armed()),
            })),
            r = async { match watcher.as_mut() { Some(w) => w.changed().await, None => std::future::pending().await } } => {
                match r {
                    Ok(()) => reload(&policy, &shared, "file changed"),
                    Err(e) => { warn!(error = %e, "policy file watch ended; SIGHUP still reloads"); watcher = None; }
                }
            }
        }
    }
    // The watches end before the pods go, so no enrolment races the shutdown.
    drop(kube);
    metrics_state.set_ready(false);
    stop(dp, &shared, &observer, &pods, args.drain_timeout).await;
    events::emit(serde_json::json!({ "event": "stopped" }));
    Ok(())
}

/// Apply a changed policy file to new connections, or keep the old policy and say why.
fn reload(policy: &PolicyHandle, shared: &Shared, why: &str) {
    match policy.reload() {
        Ok(()) => {
            shared.admission.set_source(policy.current().source());
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
            events::emit(serde_json::json!({ "event": "policy_rejected", "error": e.to_string() }));
        }
    }
}

/// The policy engine behind every proxied connection; an open breaker or an empty rate
/// bucket becomes a kernel verdict so the pod's next connect() to that peer fails at once.
fn admission(dp: &Datapath, args: &PolicyArgs, policy: &PolicyHandle) -> Arc<Admission<PeerKey>> {
    let table = PeerTable::new(args.table_config(), policy.current().source());
    let verdicts = dp.maps.clone();
    Admission::new(
        table,
        Box::new(move |key: &PeerKey, until_ns: Option<u64>| {
            // Only outbound connect()s pass through the kernel hook that reads verdicts.
            if key.direction == Direction::Outbound {
                match until_ns {
                    Some(t) => verdicts.set_verdict(&key.pod, key.peer, t),
                    None => verdicts.clear_verdict(&key.pod, key.peer),
                }
            }
        }),
    )
}

/// How long reset connections get to close after the drain deadline. Resetting is immediate;
/// this only bounds a task caught before its relay (connecting upstream, queued for
/// admission), which then ends with the runtime.
const ABORT_WAIT: Duration = Duration::from_secs(1);

/// Graceful drain. Stop redirecting first (new connections go direct), stop accepting (the
/// accept loops end and close their listeners), give live connections up to `grace` to finish,
/// reset (RST) the ones still open, then detach, or keep the pins per `--keep-pins`. Every wait
/// is on the task tracker, woken when the last task ends: nothing polls. The final per-peer
/// figures are written once every connection task has ended.
async fn stop(
    mut dp: Datapath,
    shared: &Shared,
    observer: &Observer,
    pods: &PodManager,
    grace: Duration,
) {
    dp.unenrol_all();
    for c in pods.cookies() {
        observer.pod_removed(c);
        info!(
            event = "pod_removed",
            netns_cookie = c,
            reason = "agent stopping",
            "pod removed"
        );
    }
    shared.cancel.cancel();
    shared.tasks.close();
    events::emit(serde_json::json!({
        "event": "draining",
        "tasks": shared.tasks.len(),
        "grace_ms": grace.as_millis() as u64,
    }));
    let mut reset = 0;
    if tokio::time::timeout(grace, shared.tasks.wait())
        .await
        .is_err()
    {
        reset = shared.tasks.len();
        warn!(
            left = reset,
            "connections still open after the drain timeout; resetting them"
        );
        shared.abort.cancel();
        if tokio::time::timeout(ABORT_WAIT, shared.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                left = shared.tasks.len(),
                "tasks still running after the reset; they end with the agent"
            );
        }
    }
    // Every connection task has ended (or was dropped): the figures are complete now.
    observer.flush();
    events::emit(serde_json::json!({ "event": "drained", "reset": reset }));
    dp.shutdown();
}

/// Bind/unbind events from the kernel, woken by the ring buffer's fd (no polling).
async fn read_events(ring: RingBuf<MapData>, tx: mpsc::Sender<Event>, cancel: CancellationToken) {
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd owns the ring buffer.
    let mut fd = match unsafe { AsyncFd::register(ring) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "cannot watch the event ring buffer; inbound capture is off");
            return;
        }
    };
    loop {
        let mut guard = tokio::select! {
            _ = cancel.cancelled() => return,
            g = fd.readable_mut() => match g { Ok(g) => g, Err(_) => return },
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<Event>() {
                // SAFETY: the kernel wrote a whole Event (checked length); read_unaligned copes
                // with the ring's 8-byte alignment.
                let ev = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) };
                if tx.try_send(ev).is_err() {
                    warn!("event queue full; an inbound bind event was dropped");
                }
            }
        }
        guard.clear_ready();
    }
}

async fn read_kernel_logs(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
    cancel: CancellationToken,
) {
    // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd owns the logger.
    let Ok(mut fd) = (unsafe { AsyncFd::register(logger) }) else {
        return;
    };
    loop {
        let mut guard = tokio::select! {
            _ = cancel.cancelled() => return,
            g = fd.readable_mut() => match g { Ok(g) => g, Err(_) => return },
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
