//! `sockmesh run`: validate everything, then load, enrol, proxy, and take it all down on
//! SIGINT/SIGTERM. The order is chosen so a failure at any step leaves nothing behind, and
//! the kernel only starts redirecting a pod once its listeners are open. Pods come from
//! `--pod` at start and, with `--kube`, from the Kubernetes API at any time; either kind is
//! removed when its namespace goes away.
mod kernel_io;
mod shutdown;
mod takeover;

use std::{collections::HashMap, sync::Arc, time::Duration};

use anyhow::{anyhow, bail, Context, Result};
use sockmesh_common::peer;
use tokio::{
    net::TcpListener,
    signal::unix::{signal, SignalKind},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use kernel_io::{next_events, read_kernel_logs, watch_events};
use shutdown::{stop, Exit};

use crate::{
    admission::Admission,
    cli::RunArgs,
    datapath::{heartbeat, preflight, Datapath, DatapathOptions},
    events,
    handover::{
        client::{self, Taken},
        serve::{Control, Step},
    },
    inpod::{
        manager::{Enrolment, PodManager, PodTemplate},
        resolver::{ns_id, Resolver},
    },
    kube::{controller::Controller, report::Report},
    observe::{self, http::MetricsState},
    policy::{Direction, PeerKey, PeerTable},
    proxy::{ProxyConfig, Shared},
    rules::{PolicyArgs, PolicyHandle, PolicyWatcher},
    sys::clock::unix_ms,
    telemetry::{flush::Observer, recorder::Recorder},
};

pub fn run(args: RunArgs) -> Result<()> {
    preflight::check_privileges()?;
    // Before any thread exists, so every thread the agent starts inherits the reduced sets.
    crate::sys::caps::drop_unneeded()?;
    preflight::check_kernel()?;
    preflight::check_bpffs(&args.bpffs_dir)?;
    let cgroup = preflight::cgroup_root(args.cgroup_root.as_deref())?;
    let node = args.kube.validate()?;
    let mut template = args.pod_template();
    if args.takeover && node.is_some() {
        bail!("--takeover cannot be combined with --kube yet: upgrade a --kube agent by restarting it with --keep-pins");
    }

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
    // Last of the checks: the running agent hands over only once all else is known good.
    let taken = if args.takeover {
        Some(takeover::begin(&args)?)
    } else {
        None
    };
    template.handed = taken.as_ref().map(|t| t.handed.clone());
    // Namespaces and listeners next: still nothing in the kernel, so failing here is clean
    // (a running agent being taken over sees the connection close and keeps serving).
    let mut prepared = Vec::new();
    for spec in &args.pods {
        let path = spec.netns.display().to_string();
        prepared.push(template.prepare(&path, &path, spec)?);
    }
    if let Some(h) = template.handed.take() {
        let n = client::close_unclaimed(&h);
        if n > 0 {
            info!(
                sockets = n,
                "closed the handed-over sockets of pods this agent does not enrol"
            );
        }
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
        args,
        cgroup,
        Prepared {
            pods: prepared,
            taken,
        },
        policy,
        node,
        template,
        metrics,
    ))
}

/// The pods, ready to enrol, and on `--takeover` what the running agent handed over.
struct Prepared {
    pods: Vec<Enrolment>,
    taken: Option<Taken>,
}

async fn serve(
    args: RunArgs,
    cgroup: std::path::PathBuf,
    prepared: Prepared,
    policy: Arc<PolicyHandle>,
    node: Option<String>,
    template: PodTemplate,
    metrics: Option<std::net::TcpListener>,
) -> Result<()> {
    let Prepared {
        pods: prepared,
        taken,
    } = prepared;
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
    let (handed_lock, predecessor) = match taken {
        Some(t) => (Some(t.lock), Some((t.stream, t.pid))),
        None => (None, None),
    };
    let mut dp = Datapath::start(
        &DatapathOptions {
            bpffs_dir: &args.bpffs_dir,
            cgroup_root: &cgroup,
            mark: args.mark,
            outbound_port: args.outbound_port,
            dns_port: args.dns_port,
            keep_pins: args.keep_pins,
            kernel_log: args.kernel_log,
            fail_open_after: args.fail_open_after.0,
            kernel_relay: args.kernel_relay,
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
    let admission = admission(&dp, &args.policy, &policy);
    let observer = Arc::new(Observer::new(recorder.clone(), admission.clone(), sink));
    let shared = Shared {
        cfg: std::sync::Arc::new(ProxyConfig {
            mark: args.mark,
            outbound_port: args.outbound_port,
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
    let took_over_from = {
        let pid = predecessor.as_ref().map(|(_, pid)| *pid);
        let started = async {
            for e in prepared {
                pods.enrol(&mut dp, e)?;
            }
            match predecessor {
                Some((stream, pid)) => takeover::finish(&mut dp, &pods, stream, pid).await,
                None => Ok(()),
            }
        }
        .await;
        if let Err(e) = started {
            // On a takeover the old agent still serves every pod: leave them to it.
            let exit = if pid.is_some() {
                Exit::Release
            } else {
                Exit::Stop
            };
            stop(dp, &shared, &observer, &mut pods, Duration::ZERO, exit).await;
            return Err(e);
        }
        pid
    };
    // Where a successor will ask for this agent's sockets; without it upgrades restart.
    let mut control = match Control::bind(&args.bpffs_dir) {
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

    let mut ring = dp.take_events().and_then(watch_events);
    if let Some(logger) = dp.take_logger() {
        shared
            .tasks
            .spawn(read_kernel_logs(logger, shared.cancel.clone()));
    }
    // /readyz turns ready before the event, so whoever reacts to the event sees it ready.
    metrics_state.set_ready(true);
    info!(pods = pods.len(), "ready");
    events::emit(serde_json::json!({
        "event": "ready", "pods": pods.len(), "pid": std::process::id(), "took_over_from": took_over_from,
    }));

    let mut exit = Exit::Stop;
    loop {
        // While a successor is being answered, its snapshot of the inbound listeners must stay
        // true: bind events wait in the ring (for the successor, or for this agent if it fails).
        let handing_over = control.as_ref().is_some_and(Control::busy);
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
            evs = next_events(ring.as_mut()), if !handing_over => {
                for ev in evs { pods.on_event(ev).await; }
            }
            step = async { match control.as_mut() { Some(c) => c.next().await, None => std::future::pending().await } } => {
                match step {
                    Step::Asked(conn) => takeover::answer(control.as_mut(), conn, &pods, &dp),
                    Step::Done(Ok(())) => {
                        info!(event = "handed_over", "a successor took over: draining");
                        events::emit(serde_json::json!({ "event": "handed_over", "tasks": shared.tasks.len() }));
                        if let Some(c) = control.as_mut() { c.leave_path(); }
                        exit = Exit::Release;
                        break;
                    }
                    Step::Done(Err(e)) => warn!(error = %e, "a successor gave up taking over; still serving"),
                }
            }
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
                "sockets_pooled": crate::proxy::upstream::pooled(),
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
    // The watches end before the pods go, so no enrolment races the shutdown; a handover in
    // progress is cut short.
    drop(kube);
    drop(control);
    drop(ring);
    metrics_state.set_ready(false);
    stop(dp, &shared, &observer, &mut pods, args.drain_timeout, exit).await;
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
                    Some(t) => verdicts.verdicts.refuse(key.netns_cookie, key.peer, t),
                    None => verdicts.verdicts.lift(key.netns_cookie, key.peer),
                }
            }
        }),
    )
}
