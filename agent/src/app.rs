//! `sockmesh run`: validate everything, then load, enrol, proxy, and take it all down on
//! SIGINT/SIGTERM. The order is chosen so a failure at any step leaves nothing behind, and
//! the kernel only starts redirecting a pod once its listeners are open. Pods come from
//! `--pod` at start and, with `--kube`, from the Kubernetes API at any time; either kind is
//! removed when its namespace goes away.
mod agent;
mod engine;
mod http;
mod kernel_io;
mod shutdown;
mod takeover;
mod waits;

use std::{collections::HashMap, sync::Arc};

use anyhow::{anyhow, bail, Context, Result};
use tracing::{info, warn};

use agent::{Agent, Prepared, Setup, Signals};
use shutdown::Exit;

use crate::{
    cli::{RunArgs, TakeoverMode},
    datapath::preflight,
    events,
    inpod::resolver::ns_id,
};

pub fn run(args: RunArgs) -> Result<()> {
    preflight::check_privileges()?;
    // Before any thread exists, so every thread the agent starts inherits the reduced sets.
    crate::sys::caps::drop_unneeded()?;
    preflight::check_kernel()?;
    // Every proxied connection costs two fds: take all the kernel allows before sizing caps.
    let nofile = match crate::sys::rlimit::raise_nofile() {
        Ok((before, soft, hard)) => {
            info!(
                soft_before = before,
                soft, hard, "open-file limit (RLIMIT_NOFILE) raised to its hard limit"
            );
            soft
        }
        Err(e) => {
            let soft = crate::sys::rlimit::nofile().map_or(1024, |(s, _)| s);
            warn!(error = %e, soft, "cannot raise the open-file limit");
            soft
        }
    };
    args.shares.check()?;
    let shares = args.shares.config(nofile);
    info!(
        max_conns = shares.conns.global,
        pod_max_conns = shares.conns.per_pod,
        max_dns_inflight = shares.dns.global,
        pod_dns_inflight = shares.dns.per_pod,
        "caps on what pods share"
    );
    preflight::check_bpffs(&args.bpffs_dir)?;
    let cgroup = preflight::cgroup_root(args.cgroup_root.as_deref())?;
    let node = args.kube.validate()?;
    let mut template = args.pod_template();
    if args.inbound_port == args.outbound_port {
        bail!(
            "--inbound-port and --outbound-port are both {}: each in-pod TCP listener needs its own port",
            args.inbound_port
        );
    }

    // Pure validation of every pod before touching anything.
    for spec in &args.pods {
        template.config(spec).map_err(|e| anyhow!(e))?;
    }
    // The policy file is validated before anything is loaded: a bad file is one clear error.
    let policy = Arc::new(args.policy.policy_handle().map_err(|e| anyhow!("{e}"))?);
    let names = args.policy.peer_names().map_err(|e| anyhow!(e))?;
    policy.identities().write(|ix| ix.set_statics(names));
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
    let mut taken = takeover::begin(&args.bpffs_dir, &template, args.takeover)?;
    template.handed = taken.as_ref().map(|t| t.handed.clone());
    // Namespaces and listeners next: still nothing in the kernel, so failing here is clean
    // (a running agent being taken over sees the connection close and keeps serving).
    let mut prepared = Vec::new();
    for spec in &args.pods {
        let path = spec.netns.display().to_string();
        prepared.push(template.prepare(&path, &path, spec)?);
    }
    // With --kube the pods come from the API once the runtime runs: the old agent's sockets
    // wait for them (see `Agent::start`), and those no listed pod takes are closed then.
    if node.is_none() {
        if let Some(h) = template.handed.take() {
            takeover::close_unclaimed(&h);
        }
    }

    // A taken metrics or health port is a bad flag: refuse it before anything is loaded. On a
    // takeover the old agent's listener on that address is served on instead (it cannot be
    // bound twice, and the node's probes must always find one agent answering).
    let mut handed_http = taken.as_mut().map(|t| std::mem::take(&mut t.http));
    let mut http = |addr: Option<std::net::SocketAddr>, flag| {
        addr.map(|a| takeover::http_listener(a, flag, handed_http.as_mut()))
            .transpose()
    };
    let metrics = http(args.metrics_addr.0, "--metrics-addr")?;
    let health = http(args.health_addr.0, "--health-addr")?;

    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all().thread_name("sockmesh");
    if let Some(n) = args.worker_threads {
        rt.worker_threads(usize::from(n));
    }
    let rt = rt.build().context("start the async runtime")?;
    rt.block_on(async move {
        let prepared = Prepared {
            pods: prepared,
            taken,
        };
        // Signals are hooked before anything is attached so an early SIGTERM still cleans up.
        let mut signals = Signals::install()?;
        let drain = args.drain_timeout;
        let setup = Setup {
            nofile,
            shares,
            cgroup,
            prepared,
            policy,
            node,
            template,
            metrics,
            health,
        };
        let stays = args.takeover == TakeoverMode::IfRunning;
        let mut agent = Agent::start(args, setup).await?;
        let exit = agent.serve(&mut signals).await;
        // Handed over before any stop signal, an agent that takes over when it starts must
        // not exit: its supervisor (the kubelet) would start it again, and it would take the
        // node back from its successor. It holds nothing once drained.
        let idle = stays && exit == Exit::Release && !agent.signalled();
        agent.stop(drain, exit).await;
        if idle {
            info!(
                event = "idle",
                "handed over and drained: waiting for SIGTERM (the pod's deletion)"
            );
            events::emit(serde_json::json!({ "event": "idle" }));
            signals.stopped().await;
            info!("stop signal: exiting");
        }
        Ok(())
    })
}
