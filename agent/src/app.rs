//! `sockmesh run`: validate everything, then load, enrol, proxy, and take it all down on
//! SIGINT/SIGTERM. The order is chosen so a failure at any step leaves nothing behind, and
//! the kernel only starts redirecting a pod once its listeners are open. Pods come from
//! `--pod` at start and, with `--kube`, from the Kubernetes API at any time; either kind is
//! removed when its namespace goes away.
mod agent;
mod engine;
mod kernel_io;
mod shutdown;
mod takeover;

use std::{collections::HashMap, sync::Arc};

use anyhow::{anyhow, bail, Context, Result};
use tracing::{info, warn};

use agent::{Agent, Prepared, Setup, Signals};

use crate::{cli::RunArgs, datapath::preflight, handover::client, inpod::resolver::ns_id, observe};

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
        Some(takeover::begin(&args.bpffs_dir, &template)?)
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

    // A taken metrics or health port is a bad flag: refuse it before anything is loaded.
    let metrics = (args.metrics_addr.0)
        .map(|a| observe::http::bind(a, "--metrics-addr"))
        .transpose()?;
    let health = (args.health_addr.0)
        .map(|a| observe::http::bind(a, "--health-addr"))
        .transpose()?;

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
        let mut agent = Agent::start(args, setup).await?;
        let exit = agent.serve(&mut signals).await;
        agent.stop(drain, exit).await;
        Ok(())
    })
}
