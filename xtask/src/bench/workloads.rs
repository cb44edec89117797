//! The workloads, each run by a real third-party client from a variant's client pod (iperf3,
//! sockperf, wrk), except connect(), which needs a per-call timer no tool gives: a small
//! client here times each connect() from inside the pod. Parsers are pure and unit-tested.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::plan::{Plan, Variant};
use super::stats::{percentile, Better};
use super::topo::{Topology, HTTP_PORT, IPERF_PORT, SERVER_V4, SOCKPERF_PORT};
use crate::util::{describe, wait_timeout};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Bulk1,
    Bulk8,
    Rr,
    Cps,
    Connect,
    /// New connections from an unmeshed client to a meshed server: inbound capture alone.
    InboundCps,
}

/// One measured figure of a workload.
pub struct Metric {
    pub name: &'static str,
    pub unit: &'static str,
    pub better: Better,
}

const fn m(name: &'static str, unit: &'static str, better: Better) -> Metric {
    Metric { name, unit, better }
}

impl Workload {
    pub const ALL: [Workload; 6] = [
        Workload::Bulk1,
        Workload::Bulk8,
        Workload::Rr,
        Workload::Cps,
        Workload::Connect,
        Workload::InboundCps,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Bulk1 => "bulk, 1 stream (iperf3)",
            Workload::Bulk8 => "bulk, 8 streams (iperf3)",
            Workload::Rr => "request/response, 64 B (sockperf ping-pong)",
            Workload::Cps => "new connections (wrk, Connection: close, 8 conns)",
            Workload::Connect => "connect() of the app",
            Workload::InboundCps => {
                "new connections to a meshed server (inbound; wrk, Connection: close, 8 conns)"
            }
        }
    }

    /// The name `--workload` takes.
    pub fn flag(self) -> &'static str {
        match self {
            Workload::Bulk1 => "bulk1",
            Workload::Bulk8 => "bulk8",
            Workload::Rr => "rr",
            Workload::Cps => "new-conns",
            Workload::Connect => "connect",
            Workload::InboundCps => "inbound-conns",
        }
    }

    pub fn metrics(self) -> &'static [Metric] {
        const BULK: &[Metric] = &[m("throughput", "Gbit/s", Better::Higher)];
        const RR: &[Metric] = &[
            m("p50", "µs", Better::Lower),
            m("p99", "µs", Better::Lower),
            m("p99.9", "µs", Better::Lower),
        ];
        const CPS: &[Metric] = &[
            m("rate", "conn/s", Better::Higher),
            m("proxy CPU per 1k conns", "ms", Better::Lower),
        ];
        const CONNECT: &[Metric] = &[m("p50", "µs", Better::Lower), m("p99", "µs", Better::Lower)];
        match self {
            Workload::Bulk1 | Workload::Bulk8 => BULK,
            Workload::Rr => RR,
            Workload::Cps | Workload::InboundCps => CPS,
            Workload::Connect => CONNECT,
        }
    }

    /// The project's target for metric `i` (in the order of `metrics()`), as a ratio to
    /// direct (issue 15's figures; the chart draws them).
    pub fn target(self, i: usize) -> Option<f64> {
        match (self, i) {
            (Workload::Bulk1 | Workload::Bulk8, 0) => Some(0.95),
            (Workload::Rr, 0) => Some(1.05),
            // Outbound: the fast path has no inbound tier (yet).
            (Workload::Cps, 0) => Some(0.9),
            (Workload::Connect, 0) => Some(1.2),
            _ => None,
        }
    }

    /// Whether `v` has a path for this workload. Inbound: the client is never meshed and the
    /// server pod is enrolled by the variant's agent (direct: the plain server), so the
    /// iptables and HAProxy variants, which are client-side captures, have none.
    pub fn applies(self, v: Variant) -> bool {
        self != Workload::InboundCps
            || !matches!(
                v,
                Variant::Iptables | Variant::Haproxy | Variant::SockmeshProxy
            )
    }

    /// Runs once for `v`; values in the order of `metrics()`.
    pub fn run(self, topo: &Topology, v: Variant, plan: &Plan) -> Result<Vec<f64>> {
        let (pod, host) = if self == Workload::InboundCps {
            (topo.client(Variant::Direct), topo.inbound_server(v)?)
        } else {
            (topo.client(v), target_host(v).to_string())
        };
        let host = host.as_str();
        let secs = plan.seconds.to_string();
        match self {
            Workload::Bulk1 | Workload::Bulk8 => {
                let streams = if self == Workload::Bulk1 { "1" } else { "8" };
                let mut cmd = pod.command("iperf3");
                cmd.args(["-c", host, "-p", &IPERF_PORT.to_string(), "-J", "-O", "1"])
                    .args(["-t", &secs, "-P", streams]);
                let out = bounded(&mut cmd, plan, topo)?;
                Ok(vec![parse_iperf3(&out)?])
            }
            Workload::Rr => {
                let mut cmd = pod.command("sockperf");
                cmd.args(["ping-pong", "--tcp", "-i", host, "-p"])
                    .arg(SOCKPERF_PORT.to_string())
                    .args(["-m", "64", "-t", &secs]);
                let out = bounded(&mut cmd, plan, topo)?;
                parse_sockperf(&out)
            }
            Workload::Cps | Workload::InboundCps => {
                let mut cmd = pod.command("wrk");
                cmd.args(["-t1", "-c8", "-d", &format!("{secs}s")])
                    .args(["-H", "Connection: close"])
                    .arg(format!("http://{host}:{HTTP_PORT}/"));
                // The CPU the agent (or HAProxy) spent on the run, per 1,000 connections:
                // what the kernel fast path is meant to save. The variants run one at a
                // time, so an agent serving two (sockmesh, iptables) is charged only for the
                // one running.
                let pid = topo.proxy_pid(v);
                let before = pid.and_then(cpu_ms);
                let out = bounded(&mut cmd, plan, topo)?;
                let spent = match (before, pid.and_then(cpu_ms)) {
                    (Some(a), Some(b)) => b - a,
                    _ => f64::NAN,
                };
                let conns = parse_wrk_requests(&out).unwrap_or(f64::NAN);
                Ok(vec![parse_wrk(&out)?, spent / conns * 1000.0])
            }
            Workload::Connect => {
                let n = plan.connects;
                let dst: SocketAddr = format!("{host}:{HTTP_PORT}").parse()?;
                pod_thread(pod, move || connect_times(dst, n))
            }
        }
    }
}

/// Runs `cmd` to completion within the run length plus a margin; its stdout.
fn bounded(cmd: &mut Command, plan: &Plan, topo: &Topology) -> Result<String> {
    let out_path = topo.tmp.join("client.out");
    let err_path = topo.tmp.join("client.err");
    cmd.stdin(Stdio::null())
        .stdout(fs::File::create(&out_path)?)
        .stderr(fs::File::create(&err_path)?);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("start `{}`", describe(cmd)))?;
    let limit = Duration::from_secs(plan.seconds + 30);
    let status = match wait_timeout(&mut child, limit)? {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{}` did not finish within {limit:?}", describe(cmd));
        }
    };
    let out = fs::read_to_string(&out_path).unwrap_or_default();
    if !status.success() {
        let err = fs::read_to_string(&err_path).unwrap_or_default();
        bail!(
            "`{}` failed ({status}): {} {}",
            describe(cmd),
            err.trim(),
            tail(&out, 400)
        );
    }
    Ok(out)
}

fn tail(s: &str, n: usize) -> &str {
    let start = s.len().saturating_sub(n);
    let start = (start..=s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    &s[start..]
}

/// Where `v`'s client connects: the server, except HAProxy's pod, whose client talks to
/// HAProxy on its loopback as it would to a sidecar.
fn target_host(v: Variant) -> &'static str {
    match v {
        Variant::Haproxy => "127.0.0.1",
        _ => SERVER_V4,
    }
}

/// Runs `f` on a thread inside `pod`'s namespace.
pub fn pod_thread<T: Send + 'static>(
    pod: &sockmesh_tests::Pod,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = pod.netns_path().to_owned();
    std::thread::spawn(move || {
        sockmesh_tests::netns::enter(&path)?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("bench thread panicked"))?
}

/// Times `n` blocking connect()s to `dst` and returns (p50, p99) in µs: what the app waits
/// for in connect(). Every variant connects where its app would (`target_host`): direct and
/// both sockmesh tiers to the server, HAProxy's client to HAProxy on its loopback. So the
/// kernel tier's ratio is its policing's cost on a real handshake, and the proxy tier's (and
/// HAProxy's) is a loopback handshake with the local proxy, which answers before the server
/// is reached.
fn connect_times(dst: SocketAddr, n: usize) -> Result<Vec<f64>> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let s = TcpStream::connect(dst).with_context(|| format!("connect {dst}"))?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
        drop(s);
    }
    times.sort_by(f64::total_cmp);
    Ok(vec![
        percentile(&times, 50.0).unwrap_or(f64::NAN),
        percentile(&times, 99.0).unwrap_or(f64::NAN),
    ])
}

/// iperf3 -J: what the receiver got, in Gbit/s.
pub fn parse_iperf3(json: &str) -> Result<f64> {
    let v: serde_json::Value = serde_json::from_str(json).context("iperf3 output is not JSON")?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("iperf3 JSON has no end.sum_received.bits_per_second")
}

/// sockperf ping-pong: the p50, p99 and p99.9 lines (µs; sockperf reports half the round trip).
pub fn parse_sockperf(out: &str) -> Result<Vec<f64>> {
    let pick = |p: &str| -> Result<f64> {
        out.lines()
            .find_map(|l| {
                let rest = l.split("---> percentile ").nth(1)?;
                let (pct, val) = rest.split_once('=')?;
                (pct.trim() == p).then(|| val.trim().parse::<f64>().ok())?
            })
            .with_context(|| format!("sockperf output has no percentile {p}"))
    };
    Ok(vec![pick("50.000")?, pick("99.000")?, pick("99.900")?])
}

/// A process's CPU time (user + system) so far, in ms, from /proc/PID/stat.
pub fn cpu_ms(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ms(&stat, 100.0)
}

/// utime + stime (fields 14 and 15, after the parenthesised command) of a /proc/PID/stat
/// line, in ms at `ticks_per_s` clock ticks per second (USER_HZ, 100 on Linux).
pub fn parse_cpu_ms(stat: &str, ticks_per_s: f64) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) * 1000.0 / ticks_per_s)
}

/// wrk: how many requests (connections, with `Connection: close`) the run made.
pub fn parse_wrk_requests(out: &str) -> Option<f64> {
    out.lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
}

/// wrk: requests per second; with `Connection: close` each request is a new connection.
pub fn parse_wrk(out: &str) -> Result<f64> {
    if let Some(l) = out.lines().find(|l| l.contains("Non-2xx")) {
        bail!("wrk saw failed requests: {}", l.trim());
    }
    out.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .context("wrk output has no Requests/sec line")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_iperf3_json() {
        let j = r#"{"end":{"sum_received":{"bits_per_second":12500000000.0}}}"#;
        assert_eq!(parse_iperf3(j).unwrap(), 12.5);
        let e = parse_iperf3(r#"{"error":"the server is busy"}"#).unwrap_err();
        assert!(e.to_string().contains("busy"));
        assert!(parse_iperf3("not json").is_err());
    }

    #[test]
    fn parses_sockperf_percentiles() {
        let out = "sockperf: ---> <MAX> observation = 8074.067\n\
                   sockperf: ---> percentile 99.999 = 7693.478\n\
                   sockperf: ---> percentile 99.900 =   53.835\n\
                   sockperf: ---> percentile 99.000 =   25.863\n\
                   sockperf: ---> percentile 50.000 =    9.744\n";
        assert_eq!(parse_sockperf(out).unwrap(), vec![9.744, 25.863, 53.835]);
        assert!(parse_sockperf("sockperf: ---> percentile 50.000 = 1\n").is_err());
    }

    #[test]
    fn inbound_is_measured_only_where_an_agent_meshes_the_server() {
        let with: Vec<Variant> = Variant::ALL
            .into_iter()
            .filter(|v| Workload::InboundCps.applies(*v))
            .collect();
        assert_eq!(
            with,
            [
                Variant::Direct,
                Variant::Sockmesh,
                Variant::SockmeshSplice,
                Variant::Baseline
            ]
        );
        assert!(Variant::ALL.into_iter().all(|v| Workload::Cps.applies(v)));
    }

    #[test]
    fn parses_cpu_time_from_proc_stat() {
        let stat = "4242 (sock mesh) S 1 4242 4242 0 -1 4194560 1000 0 0 0 150 50 0 0 20 0 4 0";
        assert_eq!(parse_cpu_ms(stat, 100.0), Some(2000.0));
        assert_eq!(parse_cpu_ms("garbage", 100.0), None);
    }

    #[test]
    fn parses_wrk() {
        let out = "  25449 requests in 2.01s, 3.52MB read\nRequests/sec:  12684.93\n";
        assert_eq!(parse_wrk(out).unwrap(), 12684.93);
        assert_eq!(parse_wrk_requests(out), Some(25449.0));
        assert!(parse_wrk("Non-2xx or 3xx responses: 5\nRequests/sec: 1\n").is_err());
        assert!(parse_wrk("").is_err());
    }
}
