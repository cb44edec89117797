//! The benchmark's outputs: one JSON document with every sample, a Markdown table (absolute
//! medians, spread, ratios to direct, and the issue's targets checked), and an SVG chart of
//! the ratios. `bench-results/latest.*` are copies of the newest run.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::chart::{self, Cell, Chart, Group, Row};
use super::plan::{Plan, Variant};
use super::scale::ScaleResult;
use super::select::Selection;
use super::stats::{summarise, Better, Summary};
use super::workloads::Workload;
use crate::util::try_output;

/// One run's values (in the order of the workload's metrics), or why it failed.
type Run = Result<Vec<f64>, String>;

/// Every repetition's run per (workload, variant).
pub struct Results {
    reps: usize,
    /// What this run measures: the report shows these and nothing else.
    only: Selection,
    runs: HashMap<(usize, usize), Vec<Run>>,
}

fn key(w: Workload, v: Variant) -> (usize, usize) {
    let wi = Workload::ALL.iter().position(|x| *x == w).unwrap_or(0);
    let vi = Variant::ALL.iter().position(|x| *x == v).unwrap_or(0);
    (wi, vi)
}

impl Results {
    pub fn new(reps: usize, only: Selection) -> Self {
        Results {
            reps,
            only,
            runs: HashMap::new(),
        }
    }

    pub fn record(&mut self, w: Workload, v: Variant, rep: usize, r: Result<Vec<f64>>) {
        let runs = self
            .runs
            .entry(key(w, v))
            .or_insert_with(|| vec![Err("not run".into()); self.reps]);
        runs[rep] = r.map_err(|e| format!("{e:#}"));
    }

    pub fn failures(&self) -> usize {
        self.runs.values().flatten().filter(|r| r.is_err()).count()
    }

    /// Per repetition, metric `i` of (w, v) (None where the run failed).
    fn column(&self, w: Workload, v: Variant, i: usize) -> Vec<Option<f64>> {
        match self.runs.get(&key(w, v)) {
            Some(runs) => runs
                .iter()
                .map(|r| r.as_ref().ok().and_then(|vals| vals.get(i).copied()))
                .collect(),
            None => vec![None; self.reps],
        }
    }

    pub fn summary(&self, w: Workload, v: Variant, i: usize) -> Option<Summary> {
        summarise(&self.column(w, v, i), &self.column(w, Variant::Direct, i))
    }

    fn errors(&self) -> Vec<String> {
        let mut out = Vec::new();
        for &w in &self.only.workloads {
            for &v in &self.only.variants {
                for (rep, r) in self.runs.get(&key(w, v)).into_iter().flatten().enumerate() {
                    if let Err(e) = r {
                        out.push(format!("rep {} {} {}: {e}", rep + 1, w.name(), v.name()));
                    }
                }
            }
        }
        out
    }
}

/// The median of `a[i] / b[i]` over the repetitions where both ran.
fn paired_median(a: &[Option<f64>], b: &[Option<f64>]) -> Option<f64> {
    let mut r: Vec<f64> = a
        .iter()
        .zip(b)
        .filter_map(|(x, y)| Some((*x)? / (*y)?))
        .collect();
    r.sort_by(f64::total_cmp);
    super::stats::percentile(&r, 50.0)
}

pub fn timestamp() -> String {
    try_output(Command::new("date").args(["-u", "+%Y%m%dT%H%M%SZ"]))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "run".into())
}

/// What the figures were measured on.
pub fn machine() -> Value {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_default();
    let vm = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.contains(" hypervisor"));
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": model,
        "virtual_machine": vm,
        "kernel": try_output(Command::new("uname").arg("-r")).unwrap_or_default().trim(),
        "loadavg_at_start": fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    })
}

pub fn write(
    dir: &Path,
    stamp: &str,
    machine: &Value,
    plan: &Plan,
    results: &Results,
    scale: &[&ScaleResult],
    took: Duration,
) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut machine = machine.clone();
    machine["loadavg_at_end"] = json!(fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim());
    let doc = to_json(&machine, plan, results, scale, took);
    let md = to_markdown(&machine, plan, results, scale, took);
    let svg = to_svg(results, scale);
    let mut written = Vec::new();
    for (ext, body) in [
        ("json", serde_json::to_string_pretty(&doc)?),
        ("md", md),
        ("svg", svg),
    ] {
        for name in [format!("bench-{stamp}.{ext}"), format!("latest.{ext}")] {
            let p = dir.join(name);
            fs::write(&p, &body).with_context(|| format!("write {}", p.display()))?;
            written.push(p);
        }
    }
    Ok(written)
}

fn to_json(
    machine: &Value,
    plan: &Plan,
    results: &Results,
    scale: &[&ScaleResult],
    took: Duration,
) -> Value {
    let mut rows = Vec::new();
    for &w in &results.only.workloads {
        for (i, m) in w.metrics().iter().enumerate() {
            let mut variants = serde_json::Map::new();
            for &v in &results.only.variants {
                variants.insert(
                    v.name().into(),
                    results
                        .summary(w, v, i)
                        .map_or(Value::Null, |s| s.to_json()),
                );
            }
            rows.push(json!({
                "workload": w.name(), "metric": m.name, "unit": m.unit,
                "better": m.better.as_str(), "variants": variants,
            }));
        }
    }
    json!({
        "machine": machine,
        "plan": { "repetitions": plan.reps, "seconds_per_run": plan.seconds,
                  "workloads": results.only.workloads.iter().map(|w| w.flag()).collect::<Vec<_>>(),
                  "variants": results.only.variants.iter().map(|v| v.flag()).collect::<Vec<_>>(),
                  "connects_per_run": plan.connects, "scale_connections": plan.scale_conns,
                  "scale_hold_seconds": plan.scale_hold_secs },
        "duration_seconds": took.as_secs_f64(),
        "results": rows,
        "scale": scale.iter().map(|s| s.to_json()).collect::<Vec<_>>(),
        "targets": targets(results, scale).iter().map(|t| json!({
            "target": t.what, "reached": t.reached, "measured": t.measured })).collect::<Vec<_>>(),
        "errors": results.errors(),
    })
}

fn fmt_val(x: f64) -> String {
    if x >= 1000.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn to_markdown(
    machine: &Value,
    plan: &Plan,
    results: &Results,
    scale: &[&ScaleResult],
    took: Duration,
) -> String {
    let mut s = format!(
        "# sockmesh benchmark\n\nMachine: {} cores ({}), kernel {}, {}; load average at start {}, at end {}.\n\
         {} repetition(s) of {} s per run, variants interleaved; run took {:.0} s.\n\
         Cells: median (spread = (max-min)/median over repetitions) and, in bold, the median ratio \
         to direct in the same repetition.\n\n",
        machine["cores"],
        machine["cpu"].as_str().unwrap_or("?"),
        machine["kernel"].as_str().unwrap_or("?"),
        if machine["virtual_machine"] == true { "virtual machine" } else { "bare metal?" },
        machine["loadavg_at_start"].as_str().unwrap_or("?"),
        machine["loadavg_at_end"].as_str().unwrap_or("?"),
        plan.reps,
        plan.seconds,
        took.as_secs_f64(),
    );
    s.push_str("| workload | metric |");
    for v in &results.only.variants {
        s.push_str(&format!(" {} |", v.name()));
    }
    s.push_str("\n|---|---|");
    s.push_str(&"---|".repeat(results.only.variants.len()));
    s.push('\n');
    for &w in &results.only.workloads {
        for (i, m) in w.metrics().iter().enumerate() {
            s.push_str(&format!(
                "| {} | {} ({}, {} is better) |",
                w.name(),
                m.name,
                m.unit,
                m.better.as_str()
            ));
            for &v in &results.only.variants {
                if !w.applies(v) {
                    s.push_str(" n/a |");
                    continue;
                }
                match results.summary(w, v, i) {
                    Some(x) => {
                        s.push_str(&format!(" {} (±{:.0}%)", fmt_val(x.median), x.spread_pct));
                        if let (true, Some(r)) = (v != Variant::Direct, x.ratio_to_direct) {
                            s.push_str(&format!(" **×{r:.2}**"));
                        }
                        s.push_str(" |");
                    }
                    None => s.push_str(" failed |"),
                }
            }
            s.push('\n');
        }
    }
    if results.only.variants.contains(&Variant::Baseline) {
        s.push_str("\nThis build against the baseline build (sockmesh / sockmesh-baseline, median of the ratios paired per repetition):");
        for &w in &results.only.workloads {
            for (i, m) in w.metrics().iter().enumerate() {
                let r = paired_median(
                    &results.column(w, Variant::Sockmesh, i),
                    &results.column(w, Variant::Baseline, i),
                );
                let r = r.map_or("n/a".into(), |r| format!("×{r:.3}"));
                s.push_str(&format!(" {} {}: **{r}**;", w.name(), m.name));
            }
        }
        s.push('\n');
    }
    s.push_str(
        "\nconnect(): every client connects where its app would: direct, sockmesh (fast path) \
         and sockmesh-proxy to the server, HAProxy's to HAProxy on its loopback. On the kernel \
         tier the handshake is the real one to the server, so the ratio is the cost of the \
         policing; the proxy tier, iptables+agent and HAProxy answer connect() from a listener \
         on the pod's loopback before the server is reached, so theirs can be below 1. \
         sockperf reports half the round trip.\n",
    );
    s.push_str(&super::scale_report::markdown(scale));
    s.push_str("\n## The issue's targets\n\n| target | measured | reached |\n|---|---|---|\n");
    for t in targets(results, scale) {
        let mark = match t.reached {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "n/a",
        };
        s.push_str(&format!("| {} | {} | {mark} |\n", t.what, t.measured));
    }
    let errors = results.errors();
    if !errors.is_empty() {
        s.push_str("\n## Failed runs\n\n");
        for e in errors {
            s.push_str(&format!("- {e}\n"));
        }
    }
    s
}

struct Target {
    what: String,
    measured: String,
    reached: Option<bool>,
}

/// The issue's targets, checked against this run's ratios.
fn targets(results: &Results, scale: &[&ScaleResult]) -> Vec<Target> {
    let ratio = |w, v, i| results.summary(w, v, i).and_then(|s| s.ratio_to_direct);
    let med = |w, v, i| results.summary(w, v, i).map(|s| s.median);
    let mut t = Vec::new();
    let mut check = |what: &str, measured: Option<f64>, ok: &dyn Fn(f64) -> bool, fmt: &str| {
        t.push(Target {
            what: what.into(),
            measured: measured.map_or("n/a".into(), |x| fmt.replace("{}", &format!("{x:.2}"))),
            reached: measured.map(ok),
        });
    };
    // The targets against direct are the ones the chart draws (`Workload::target`).
    for &w in &results.only.workloads {
        for (i, m) in w.metrics().iter().enumerate() {
            let Some(bound) = w.target(i) else { continue };
            let at_least = m.better == Better::Higher;
            let what = format!(
                "{} {}: sockmesh {} {bound:.2}x direct",
                w.name(),
                m.name,
                if at_least { ">=" } else { "<=" }
            );
            let ok = move |r: f64| if at_least { r >= bound } else { r <= bound };
            check(&what, ratio(w, Variant::Sockmesh, i), &ok, "×{}");
        }
    }
    // Both redirect to the agent on loopback: the proxy tier's connect() against iptables'
    // is the cost of the capture alone (the kernel tier's is a real handshake).
    for (what, w, v) in [
        (
            "RR p50 below iptables+agent",
            Workload::Rr,
            Variant::Sockmesh,
        ),
        (
            "eBPF capture cheaper than iptables REDIRECT (connect() p50, proxy tier)",
            Workload::Connect,
            Variant::SockmeshProxy,
        ),
    ] {
        let below = med(w, v, 0)
            .zip(med(w, Variant::Iptables, 0))
            .map(|(a, b)| a / b);
        check(
            what,
            below,
            &|r| r < 1.0,
            &format!("{}/iptables ×{{}}", v.name()),
        );
    }
    // The kernel fast path (#15): sockmesh runs `--fast-path auto`, sockmesh-proxy `off`.
    check(
        "fast path: agent CPU per 1,000 new connections <= 1/5 of the proxy tier's",
        (|| {
            Some(
                med(Workload::Cps, Variant::Sockmesh, 1)?
                    / med(Workload::Cps, Variant::SockmeshProxy, 1)?,
            )
        })(),
        &|r| r <= 0.2,
        "sockmesh/sockmesh-proxy ×{}",
    );
    check(
        "fast path: new connections/s >= 0.90x direct",
        ratio(Workload::Cps, Variant::Sockmesh, 0),
        &|r| r >= 0.9,
        "×{}",
    );
    let step = |v: Variant| scale.iter().find(|s| s.variant == v);
    check(
        "proxy tier: agent RSS <= 4 KiB per idle connection",
        step(Variant::SockmeshProxy)
            .and_then(|s| s.rss_per_conn_bytes())
            .map(|b| b / 1024.0),
        &|k| k <= 4.0,
        "{} KiB",
    );
    check(
        "fast path: 100,000 idle connections held, all direct",
        step(Variant::Sockmesh)
            .and_then(|s| s.direct)
            .map(|d| d as f64),
        &|d| d >= 100_000.0,
        "{} direct",
    );
    check(
        "fast path: agent RSS <= 1 KiB per idle connection",
        step(Variant::Sockmesh)
            .and_then(|s| s.rss_per_conn_bytes())
            .map(|b| b / 1024.0),
        &|k| k <= 1.0,
        "{} KiB",
    );
    for &w in results
        .only
        .workloads
        .iter()
        .filter(|w| w.applies(Variant::Haproxy))
    {
        // HAProxy answers connect() on the pod's loopback, as the proxy tier does; the
        // kernel tier's connect() is the real handshake with the server, so for connect()
        // the like-for-like comparison is the proxy tier's.
        let v = match w {
            Workload::Connect => Variant::SockmeshProxy,
            _ => Variant::Sockmesh,
        };
        for (i, m) in w.metrics().iter().enumerate() {
            let vs = med(w, v, i)
                .zip(med(w, Variant::Haproxy, i))
                .map(|(a, b)| a / b);
            let better = m.better;
            check(
                &format!("ahead of HAProxy: {} {}", w.name(), m.name),
                vs,
                &move |r| match better {
                    Better::Higher => r > 1.0,
                    Better::Lower => r < 1.0,
                },
                &format!("{}/haproxy ×{{}}", v.name()),
            );
        }
    }
    t
}

/// The chart of this run: each metric's ratio to direct for every non-direct variant, grouped
/// by workload, with the targets (see `chart`).
fn to_svg(results: &Results, scale: &[&ScaleResult]) -> String {
    let colour = |v: Variant| match v {
        Variant::Direct => "#000000",
        Variant::Sockmesh => "#2a7ab0",
        Variant::Iptables => "#e08a1e",
        Variant::Haproxy => "#7a7a7a",
        Variant::SockmeshSplice => "#7ab02a",
        Variant::Baseline => "#b02a7a",
        Variant::SockmeshProxy => "#2ab0a0",
    };
    let others: Vec<Variant> = results
        .only
        .variants
        .iter()
        .copied()
        .filter(|v| *v != Variant::Direct)
        .collect();
    let mut groups: Vec<Group> = results
        .only
        .workloads
        .iter()
        .map(|&w| Group {
            title: w.name().to_string(),
            rows: w
                .metrics()
                .iter()
                .enumerate()
                // A metric direct has no value for (the CPU of a proxy, where direct has
                // none) has no ratio to draw: it is in the table only.
                .filter(|&(i, _)| {
                    results
                        .summary(w, Variant::Direct, i)
                        .is_some_and(|s| s.median > 0.0)
                })
                .map(|(i, m)| Row {
                    label: format!("{} ({}, {} better)", m.name, m.unit, m.better.as_str()),
                    target: w.target(i).map(|ratio| chart::Target {
                        ratio,
                        higher_is_better: m.better == Better::Higher,
                    }),
                    cells: others
                        .iter()
                        .map(|&v| {
                            if !w.applies(v) {
                                return Cell::NotApplicable;
                            }
                            match results.summary(w, v, i).and_then(|s| s.ratio_to_direct) {
                                Some(r) => Cell::Ratio(r),
                                None => Cell::Failed,
                            }
                        })
                        .collect(),
                })
                .collect(),
        })
        .collect();
    groups.extend(super::scale_report::chart_group(scale, &others));
    Chart {
        title: format!(
            "sockmesh bench: ratio to direct, median over {} repetitions",
            results.reps
        ),
        series: others.iter().map(|&v| (v.name(), colour(v))).collect(),
        groups,
    }
    .to_svg()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_ratios_by_repetition() {
        let a = [Some(10.0), None, Some(30.0), Some(8.0)];
        let b = [Some(10.0), Some(5.0), Some(20.0), None];
        assert_eq!(paired_median(&a, &b), Some(1.0));
        assert_eq!(paired_median(&[None], &[Some(1.0)]), None);
    }
}
