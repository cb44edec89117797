//! A real Prometheus (Debian's `prometheus`) for one test: on a loopback port of this
//! namespace, scraping the given targets every second, with its config and storage in a temp
//! dir. Dropping it kills the process group and removes the dir, on failure too.
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::prom::http_get;
use crate::{Proc, TempDir};

pub struct Prometheus {
    // Field order: the process dies before its directory is removed.
    proc: Proc,
    addr: SocketAddr,
    _dir: TempDir,
}

/// A free loopback port now; Prometheus binds it right after, and a lost race fails start-up
/// with a clear "address already in use" in its log.
fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("find a free loopback port")?;
    Ok(l.local_addr()?.port())
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (host:port of `/metrics`) as job `sockmesh`, and
    /// waits until it is ready.
    pub fn start(targets: &[SocketAddr]) -> Result<Self> {
        let dir = TempDir::new()?;
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let mut cfg = String::new();
        // 1 s so a short test has enough samples for rate() over a few seconds.
        let _ = write!(
            cfg,
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: sockmesh\n    static_configs:\n      - targets: [{}]\n",
            list.join(", ")
        );
        let config = dir.join("prometheus.yml");
        std::fs::write(&config, cfg).context("write prometheus.yml")?;
        let storage = dir.join("data");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let log = dir.join("prometheus.log");
        let out = std::fs::File::create(&log).context("create the log")?;
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", storage.display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let proc = Proc::spawn(cmd, "prometheus", Some(log))?;
        let p = Prometheus {
            proc,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http_get(addr, "/-/ready") {
                return Ok(p);
            }
            if Instant::now() > deadline {
                bail!(
                    "prometheus not ready on {addr} after 30 s: {}",
                    p.proc.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `GET /api/v1/query?query=EXPR` (an instant query, now): the result vector, or the error
    /// Prometheus gave (a query that does not parse fails here, naming it).
    pub fn query(&self, expr: &str) -> Result<Vec<Value>> {
        let path = format!("/api/v1/query?query={}", urlencode(expr));
        let (status, body) = http_get(self.addr, &path)?;
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("query {expr}: answer is not JSON ({status}): {body}"))?;
        if v["status"] != "success" {
            bail!("query {expr}: {status} {}", v["error"]);
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Values of `label` on the series matching `selector`: what Grafana's
    /// `label_values(selector, label)` lists.
    pub fn label_values(&self, selector: &str, label: &str) -> Result<Vec<String>> {
        let path = format!(
            "/api/v1/label/{label}/values?match[]={}",
            urlencode(selector)
        );
        let (status, body) = http_get(self.addr, &path)?;
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("label values: answer is not JSON ({status}): {body}"))?;
        if v["status"] != "success" {
            bail!("label_values({selector}, {label}): {status} {}", v["error"]);
        }
        Ok(v["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Queries `expr` until it returns a sample for which `done` holds, or 30 s pass; returns
    /// the last result (for the caller's assert to show).
    pub fn query_until(&self, expr: &str, done: impl Fn(&Value) -> bool) -> Result<Vec<Value>> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = self.query(expr)?;
            if r.iter().any(&done) || Instant::now() > deadline {
                return Ok(r);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// The number in an instant-query sample (`"value": [time, "1.5"]`).
pub fn sample_value(s: &Value) -> f64 {
    s["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Percent-encoding for a query-string value: everything but unreserved characters.
pub fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}
