//! `sockmesh run`: validate everything, then load, enrol, proxy, and take it all down on
//! SIGINT/SIGTERM. The order is chosen so a failure at any step leaves nothing behind, and
//! the kernel only starts redirecting a pod once its listeners are open.
use std::{collections::HashMap, sync::Arc, time::Duration};

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{MapData, RingBuf};
use sockmesh_common::{Event, PodConfig};
use tokio::{
    io::unix::AsyncFd,
    net::{TcpListener, UdpSocket},
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use sockmesh_common::peer;

use crate::{
    cli::RunArgs,
    datapath::{heartbeat, preflight, Datapath, DatapathOptions},
    events,
    inpod::pod::{Pod, PodListeners},
    observe::{self, flush::Observer, http::MetricsState, recorder::Recorder, sink::unix_ms},
    policy::{watch::PolicyWatcher, Direction, PeerKey, PeerTable, PolicyArgs, PolicyHandle},
    proxy::{admission::Admission, dns, inbound::Inbound, outbound, PodCtx, ProxyConfig, Shared},
};

pub fn run(args: RunArgs) -> Result<()> {
    preflight::check_privileges()?;
    preflight::check_kernel()?;
    preflight::check_bpffs(&args.bpffs_dir)?;
    let cgroup = preflight::cgroup_root(args.cgroup_root.as_deref())?;
    // Before any thread exists, so every thread the agent starts inherits the reduced sets.
    crate::caps::drop_unneeded()?;

    // Pure validation of every pod before touching anything.
    let configs = args
        .pods
        .iter()
        .map(|p| {
            p.to_kernel(
                &args.exclude_outbound_ports,
                &args.exclude_outbound_cidrs,
                &args.exclude_inbound_ports,
            )
        })
        .collect::<Result<Vec<PodConfig>, String>>()
        .map_err(|e| anyhow!(e))?;
    // The policy file is validated before anything is loaded: a bad file is one clear error.
    let policy = Arc::new(args.policy.policy_handle().map_err(|e| anyhow!("{e}"))?);
    if args.pods.is_empty() {
        warn!("no --pod given: the programs are attached but no traffic is captured");
    }
    // The same namespace under two paths would fight over its listeners: refuse it by the
    // namespace's identity (device and inode of the nsfs file) before opening anything.
    let mut seen: HashMap<(u64, u64), &std::path::Path> = HashMap::new();
    for spec in &args.pods {
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = std::fs::metadata(&spec.netns) {
            if let Some(other) = seen.insert((m.dev(), m.ino()), &spec.netns) {
                bail!(
                    "--pod {} and --pod {} are the same network namespace: give each pod once",
                    other.display(),
                    spec.netns.display()
                );
            }
        }
    }
    // A taken metrics port is a bad flag: refuse it before anything is opened or loaded.
    let metrics = args.metrics_addr.0.map(observe::http::bind).transpose()?;
    // Namespaces and listeners next: still nothing in the kernel, so failing here is clean.
    let mut prepared = Vec::new();
    for spec in &args.pods {
        prepared.push(Pod::prepare(
            spec,
            args.mark,
            args.outbound_port,
            args.dns_port,
        )?);
    }

    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all().thread_name("sockmesh");
    if let Some(n) = args.worker_threads {
        rt.worker_threads(usize::from(n));
    }
    let rt = rt.build().context("start the async runtime")?;
    rt.block_on(serve(args, cgroup, prepared, configs, policy, metrics))
}

async fn serve(
    args: RunArgs,
    cgroup: std::path::PathBuf,
    prepared: Vec<(Pod, PodListeners)>,
    configs: Vec<PodConfig>,
    policy: Arc<PolicyHandle>,
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
    let mut dp = Datapath::start(&DatapathOptions {
        bpffs_dir: &args.bpffs_dir,
        cgroup_root: &cgroup,
        mark: args.mark,
        outbound_port: args.outbound_port,
        dns_port: args.dns_port,
        keep_pins: args.keep_pins,
        kernel_log: args.kernel_log,
        fail_open_after: args.fail_open_after.0,
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
        abort: CancellationToken::new(),
        tasks: TaskTracker::new(),
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
    let result = enrol_all(&mut dp, &shared, &observer, prepared, configs);
    let (mut inbound, cookies) = match result {
        Ok(x) => x,
        Err(e) => {
            stop(dp, &shared, &observer, &[], Duration::ZERO).await;
            return Err(e);
        }
    };
    shared
        .tasks
        .spawn(observe::flush::run(observer.clone(), shared.cancel.clone()));

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
    metrics_state.set_ready(true);
    info!(pods = cookies.len(), "ready");
    events::emit(serde_json::json!({ "event": "ready", "pods": cookies.len() }));

    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
            Some(ev) = ev_rx.recv() => inbound.on_event(ev).await,
            _ = sighup.recv() => reload(&policy, &shared, "SIGHUP"),
            // Live task count on demand: what an operator (and the soak test) checks for leaks.
            _ = sigusr1.recv() => events::emit(serde_json::json!({
                "event": "status",
                "tasks": shared.tasks.len(),
                "pods": cookies.len(),
                "pipes_in_use": crate::proxy::relay::PipePool::global().in_use(),
                "pipes_pooled": crate::proxy::relay::PipePool::global().pooled(),
            })),
            r = async { match watcher.as_mut() { Some(w) => w.changed().await, None => std::future::pending().await } } => {
                match r {
                    Ok(()) => reload(&policy, &shared, "file changed"),
                    Err(e) => { warn!(error = %e, "policy file watch ended; SIGHUP still reloads"); watcher = None; }
                }
            }
        }
    }
    metrics_state.set_ready(false);
    stop(dp, &shared, &observer, &cookies, args.drain_timeout).await;
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

/// Start each pod's proxies, then tell the kernel to redirect its sockets.
fn enrol_all(
    dp: &mut Datapath,
    shared: &Shared,
    observer: &Observer,
    prepared: Vec<(Pod, PodListeners)>,
    configs: Vec<PodConfig>,
) -> Result<(Inbound, Vec<u64>)> {
    let mut inbound = Inbound::new(shared.clone());
    let mut cookies = Vec::new();
    for ((pod, listeners), cfg) in prepared.into_iter().zip(configs) {
        let ctx = PodCtx {
            name: pod.name().into(),
            cookie: pod.cookie,
            worker: pod.worker.clone(),
            addrs: pod.addrs.clone().into(),
        };
        for l in listeners.outbound {
            let l = TcpListener::from_std(l).context("register outbound listener")?;
            shared
                .tasks
                .spawn(outbound::serve(l, ctx.clone(), shared.clone()));
        }
        for s in listeners.dns {
            let s = UdpSocket::from_std(s).context("register DNS listener")?;
            shared
                .tasks
                .spawn(dns::serve(s, ctx.clone(), shared.clone()));
        }
        inbound.add_pod(ctx.clone());
        dp.maps.add_pod(&ctx.name, pod.cookie);
        observer.pod_enrolled(pod.cookie, &ctx.name);
        dp.enrol(pod.cookie, cfg)
            .with_context(|| format!("enrol pod {}", ctx.name))?;
        cookies.push(pod.cookie);
        info!(event = "pod_enrolled", pod = %ctx.name, netns_cookie = pod.cookie, addrs = ?pod.addrs, "pod enrolled");
        events::emit(
            serde_json::json!({ "event": "pod_enrolled", "pod": &*ctx.name, "netns_cookie": pod.cookie }),
        );
    }
    Ok((inbound, cookies))
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
    cookies: &[u64],
    grace: Duration,
) {
    dp.unenrol_all();
    for &c in cookies {
        observer.pod_removed(c);
        info!(event = "pod_removed", netns_cookie = c, "pod removed");
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
