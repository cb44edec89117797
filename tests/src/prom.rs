//! A strict reader of the Prometheus text exposition format (0.0.4), for asserting on what
//! `/metrics` serves: every sample must belong to a family declared by a `# TYPE` line before
//! it, families must not repeat, label values are unescaped, and values must be numbers.

use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, k: &str) -> Option<&str> {
        self.labels.get(k).map(String::as_str)
    }
}

/// Parses a whole exposition.
pub fn parse(text: &str) -> Result<Vec<Sample>> {
    let mut declared = HashSet::new();
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let ctx = || format!("line {}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().with_context(ctx)?;
            let kind = parts.next().with_context(ctx)?;
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                bail!("unknown metric type ({})", ctx());
            }
            if !declared.insert(name.to_string()) {
                bail!("family declared twice ({})", ctx());
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let s = sample(line).with_context(ctx)?;
        if !declared.contains(&s.name) {
            bail!("sample before its TYPE line ({})", ctx());
        }
        out.push(s);
    }
    Ok(out)
}

fn sample(line: &str) -> Result<Sample> {
    let name_end = line
        .find(['{', ' '])
        .context("no value after the metric name")?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        bail!("bad metric name {name:?}");
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let eq = rest.find("=\"").context("label without =\"")?;
            let key = rest[..eq].trim_start_matches(',').to_string();
            let mut value = String::new();
            let mut chars = rest[eq + 2..].char_indices();
            let end = loop {
                match chars.next() {
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c @ ('\\' | '"'))) => value.push(c),
                        other => bail!("bad escape {other:?}"),
                    },
                    Some((_, c)) => value.push(c),
                    None => bail!("unterminated label value"),
                }
            };
            if labels.insert(key.clone(), value).is_some() {
                bail!("label {key} repeated");
            }
            rest = &rest[eq + 2 + end + 1..];
        }
    }
    let value = rest.trim();
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v
            .parse()
            .with_context(|| format!("value {v:?} is not a number"))?,
    };
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// A plain HTTP/1.1 GET from this (root) namespace: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).context("read the response")?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no header end")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// GET /metrics, parsed.
pub fn scrape(addr: SocketAddr) -> Result<Vec<Sample>> {
    let (status, body) = http_get(addr, "/metrics")?;
    if status != 200 {
        bail!("/metrics answered {status}: {body}");
    }
    parse(&body)
}

/// The samples of `name` for one peer (all pods' rows carry the pod label), summed.
pub fn metric(samples: &[Sample], name: &str, pod: &str, peer: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && s.label("pod") == Some(pod) && s.label("peer") == Some(peer))
        .map(|s| s.value)
        .sum()
}

/// Scrapes until `done` holds or 20 s pass (then returns the last scrape, for the caller's
/// asserts to explain): per-peer figures change when a relay ends or a flush runs, moments no
/// event tells a test about.
pub fn scrape_until(addr: SocketAddr, done: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = scrape(addr).expect("scrape /metrics");
        if done(&s) || std::time::Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_escapes_and_rejects_undeclared_samples() {
        let text = "# HELP a_total x\n# TYPE a_total counter\na_total{pod=\"w \\\"q\\\" \\\\\",peer=\"1.2.3.4:80\"} 7\nb 1\n";
        let e = parse(text).expect_err("b is undeclared");
        assert!(e.to_string().contains("line 4"), "{e}");
        let s = parse("# TYPE a_total counter\na_total{pod=\"w \\\"q\\\" \\\\\",peer=\"1.2.3.4:80\"} 7\na_total 2.5\n")
            .expect("valid");
        assert_eq!(s[0].label("pod"), Some("w \"q\" \\"));
        assert_eq!(s[0].label("peer"), Some("1.2.3.4:80"));
        assert_eq!(s[0].value, 7.0);
        assert_eq!(s[1].value, 2.5);
        assert!(parse("# TYPE a gauge\na{x=\"1\"} seven\n").is_err());
        assert!(parse("# TYPE a gauge\n# TYPE a gauge\n").is_err());
    }
}
