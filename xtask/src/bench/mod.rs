//! `cargo xtask bench`: the same workloads, in one run, through four paths between two pods:
//! direct (no mesh), sockmesh (eBPF capture + agent), iptables REDIRECT + the same agent (the
//! capture Istio uses, so the difference is the capture alone), and HAProxy in TCP mode; and,
//! for inbound, from an unmeshed client to a server pod each agent meshes. With
//! `--baseline-bin`, an agent of another build runs beside this one as a variant of its own.
//! Variants are interleaved within each repetition (rotating which goes first), and figures
//! are medians over repetitions with their spread; ratios pair each run with the direct run
//! of the same repetition. Then a scale step holds many idle connections, direct, through the
//! fast path and through the proxy tier, and counts the agent's and the kernel's memory.
//! Results go to bench-results/ as JSON, Markdown and an SVG chart.

mod chart;
pub mod hold;
mod holders;
mod kmem;
mod plan;
mod rawcost;
mod report;
mod scale;
mod scale_report;
mod select;
mod stats;
mod topo;
mod workloads;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::prereqs::{self, Level};
use crate::util::{
    bail_if_interrupted, cargo, catch_interrupts, log_path, repo_root, run_logged, target_dir,
};
use plan::Plan;
pub use select::Selection;

/// Debian packages the benchmark runs, beyond those of the tests.
const PACKAGES: &[(&str, &[&str])] = &[
    ("iperf3", &["iperf3"]),
    ("sockperf", &["sockperf"]),
    ("wrk", &["wrk"]),
    ("haproxy", &["haproxy"]),
    ("nginx-light", &["nginx"]),
    ("iptables", &["iptables"]),
    ("iproute2", &["ip", "ss"]),
];

pub fn bench(
    quick: bool,
    reps: Option<usize>,
    scale_conns: Option<usize>,
    seconds: Option<u64>,
    mut only: Selection,
    baseline: Option<PathBuf>,
) -> Result<()> {
    match (&baseline, only.variants.contains(&plan::Variant::Baseline)) {
        (Some(_), false) => only.variants.push(plan::Variant::Baseline),
        (None, true) => bail!("--variant sockmesh-baseline needs --baseline-bin"),
        _ => {}
    }
    let plan = if quick {
        Plan {
            reps: reps.unwrap_or(1),
            seconds: seconds.unwrap_or(2),
            connects: 300,
            scale_conns: scale_conns.unwrap_or(10_000),
            scale_hold_secs: 5,
            raw_cost_pairs: 2,
        }
    } else {
        Plan {
            reps: reps.unwrap_or(3),
            seconds: seconds.unwrap_or(4),
            connects: 2000,
            scale_conns: scale_conns.unwrap_or(100_000),
            scale_hold_secs: 10,
            raw_cost_pairs: 8,
        }
    };
    if plan.reps == 0 {
        bail!("--reps must be at least 1");
    }
    if plan.seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    prereqs::ensure(Level::Run)?;
    prereqs::install_packages("benchmark tools", PACKAGES)?;
    let agent = match std::env::var_os("SOCKMESH_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => {
            println!(
                "xtask: building the agent (release; log: {})",
                log_path("build-agent-release").display()
            );
            run_logged(
                cargo().args(["build", "--release", "-p", "sockmesh"]),
                "build-agent-release",
            )
            .context("could not build the agent")?;
            target_dir().join("release").join("sockmesh")
        }
    };
    println!("xtask: agent {}", agent.display());
    catch_interrupts();
    let nofile = scale::raise_nofile()?;
    println!("xtask: open-file limit {nofile}");
    let mut plan = plan;
    if only.workloads.len() < workloads::Workload::ALL.len() {
        // A filtered run iterates on some workloads: the extra step would only slow it.
        plan.raw_cost_pairs = 0;
    }
    // The proxy tier's step holds two agent sockets per connection; the other steps' sockets
    // are in the holders, each under a limit of its own.
    let proxy_cap = scale::max_conns(nofile);
    if plan.scale_conns > proxy_cap {
        println!(
            "xtask: WARNING: the open-file limit ({nofile}; raising it needs CAP_SYS_RESOURCE, \
             which this process lacks) allows {proxy_cap} proxied connections, not {}: the proxy \
             tier's scale step holds {proxy_cap}",
            plan.scale_conns
        );
    }

    let stamp = report::timestamp();
    let out_dir = repo_root().join("bench-results");
    let tmp = std::env::temp_dir().join(format!("sockmesh-bench-{}", std::process::id()));
    let tmp_guard = crate::demo::DirGuard::create(tmp.clone())?;
    let started = Instant::now();
    let machine = report::machine();
    println!("==> setting up pods, servers, agent, iptables rule, haproxy");
    if let Some(b) = &baseline {
        println!("xtask: baseline agent {}", b.display());
    }
    let topo = topo::create(&agent, baseline.as_deref(), &tmp, plan.scale_conns)?;
    let mut results = report::Results::new(plan.reps, only.clone());
    for rep in 0..plan.reps {
        for &w in &only.workloads {
            // Rotate the order each repetition so no variant always runs first (warm caches)
            // or last (after the others' TIME_WAIT sockets).
            let n = only.variants.len();
            for k in 0..n {
                bail_if_interrupted()?;
                let v = only.variants[(k + rep) % n];
                if !w.applies(v) {
                    continue;
                }
                let r = w.run(&topo, v, &plan);
                match &r {
                    Ok(vals) => println!(
                        "    rep {}/{} {:<50} {:<15} {}",
                        rep + 1,
                        plan.reps,
                        w.name(),
                        v.name(),
                        vals.iter()
                            .zip(w.metrics())
                            .map(|(x, m)| format!("{} {x:.2} {}", m.name, m.unit))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    Err(e) => println!(
                        "    rep {} {} {}: FAILED: {e:#}",
                        rep + 1,
                        w.name(),
                        v.name()
                    ),
                }
                results.record(w, v, rep, r);
            }
        }
    }
    let scale = if plan.scale_conns == 0 {
        println!("==> scale: skipped (--scale-conns 0)");
        Vec::new()
    } else {
        scale_steps(&topo, &plan, &only.variants, proxy_cap)
    };
    println!("==> cleaning up");
    drop(topo);
    let raw_cost = if plan.raw_cost_pairs == 0 {
        None
    } else {
        println!(
            "==> cost of --deny-raw-sockets: socket()+close() per second in an enrolled pod, {} ABBA pairs",
            plan.raw_cost_pairs
        );
        // The tests' Agent finds the binary the bench measures through SOCKMESH_BIN.
        std::env::set_var("SOCKMESH_BIN", &agent);
        let r = rawcost::measure(plan.raw_cost_pairs, 1.5);
        match &r {
            Ok(c) => println!(
                "    without {:.0}/s, with {:.0}/s; with/without (median of pairs) {:.3}",
                c.without_per_sec, c.with_per_sec, c.ratio
            ),
            Err(e) => println!("    raw-socket cost FAILED: {e:#}"),
        }
        Some(r)
    };
    drop(tmp_guard);
    let written = report::write(
        &out_dir,
        &stamp,
        &machine,
        &plan,
        &results,
        &scale
            .iter()
            .filter_map(|s| s.as_ref().ok())
            .collect::<Vec<_>>(),
        started.elapsed(),
    )?;
    for p in &written {
        println!("xtask: wrote {}", p.display());
    }
    let failed = results.failures()
        + scale.iter().filter(|s| s.is_err()).count()
        + usize::from(matches!(raw_cost, Some(Err(_))));
    if failed > 0 {
        bail!("{failed} measurement(s) failed; the report shows which");
    }
    Ok(())
}

/// The scale step for each variant that has one: direct (what the kernel alone spends on an
/// idle connection), the fast path and the proxy tier, one after the other, each on its own
/// connections.
fn scale_steps(
    topo: &topo::Topology,
    plan: &Plan,
    only: &[plan::Variant],
    proxy_cap: usize,
) -> Vec<Result<scale::ScaleResult>> {
    use plan::Variant;
    let hold = std::time::Duration::from_secs(plan.scale_hold_secs);
    let mut out = Vec::new();
    for v in [Variant::Direct, Variant::Sockmesh, Variant::SockmeshProxy] {
        if !only.contains(&v) {
            continue;
        }
        if bail_if_interrupted().is_err() {
            break;
        }
        let n = match v {
            Variant::SockmeshProxy => plan.scale_conns.min(proxy_cap),
            _ => plan.scale_conns,
        };
        println!(
            "==> scale: {} concurrent idle connections, {} (held {} s)",
            n,
            v.name(),
            plan.scale_hold_secs
        );
        let r = scale::idle_connections(topo, v, n, hold);
        match &r {
            Ok(s) => {
                println!(
                    "    {} processes; established in {:.1} s; kernel {:.0} B per connection \
                     (slab {} MiB, TCP buffers {} KiB{})",
                    s.processes,
                    s.establish_secs,
                    s.kernel_per_conn_bytes(),
                    s.kernel.slab_bytes >> 20,
                    s.kernel.tcp_buffer_bytes >> 10,
                    match (s.map, s.map_per_conn_bytes()) {
                        (Some(m), Some(b)) => format!("; {m} {b:.0} B per connection"),
                        _ => String::new(),
                    }
                );
                println!(
                    "    top slab caches: {}",
                    s.kernel
                        .top_caches
                        .iter()
                        .map(|(n, b)| format!("{n} {} KiB", b >> 10))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                if let Some(a) = &s.agent {
                    println!(
                        "    agent RSS {} -> {} KiB ({:.0} B per connection); fds {} -> {} -> {}; \
                         CPU while held {:.1} ms/s{}",
                        a.rss_before_kib,
                        a.rss_after_kib,
                        s.rss_per_conn_bytes().unwrap_or(f64::NAN),
                        a.fds_before,
                        a.fds_after,
                        a.fds_after_close,
                        a.cpu_ms_per_s_held,
                        s.direct
                            .map(|d| format!("; {d} went direct"))
                            .unwrap_or_default()
                    );
                }
            }
            Err(e) => println!("    scale step FAILED: {e:#}"),
        }
        out.push(r);
    }
    out
}
