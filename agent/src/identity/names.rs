//! `--peer-names FILE`: names for address blocks the API does not describe (a database VM, a
//! partner's range), or for every peer when the agent runs without `--kube`. TOML:
//!
//! ```toml
//! [[name]]
//! cidr = "10.0.5.0/24"        # an address block; a bare address is /32 or /128
//! service = "db.shop"         # NAME.NAMESPACE, as a policy rule's `service` names it
//! workload = "postgres"       # optional
//! namespace = "shop"          # optional; defaults to the service's namespace
//! ```
//!
//! Each entry needs a `cidr` and a `service` or a `workload`. The longest block containing an
//! address names it. Read at start; a bad file is one error naming the file, line and key, and
//! the agent does not start.
use std::{net::IpAddr, path::Path, sync::Arc};

use serde::Deserialize;
use toml::{Spanned, Value};

use super::id::Identity;
use crate::spec::CidrSpec;

/// One `[[name]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticName {
    pub cidr: CidrSpec,
    pub service: Option<String>,
    pub workload: Option<String>,
    pub namespace: Option<String>,
}

impl StaticName {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        self.cidr.covers(&CidrSpec {
            addr: ip,
            prefix: max,
        })
    }

    pub fn identity(&self) -> Identity {
        Identity {
            services: self.service.iter().map(|s| Arc::from(s.as_str())).collect(),
            namespace: self.namespace.as_deref().map(Arc::from),
            workload: self.workload.as_deref().map(Arc::from),
            labels: Default::default(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    name: Vec<Spanned<RawName>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawName {
    cidr: Option<Spanned<Value>>,
    service: Option<Spanned<Value>>,
    workload: Option<Spanned<Value>>,
    namespace: Option<Spanned<Value>>,
}

/// `NAME.NAMESPACE`: one dot, both parts DNS labels (lower-case letters, digits, `-`).
pub fn check_service_name(s: &str) -> Result<(), String> {
    let label = |p: &str| {
        !p.is_empty()
            && p.len() <= 63
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    match s.split_once('.') {
        Some((n, ns)) if label(n) && label(ns) => Ok(()),
        _ => Err(format!(
            "'{s}' is not NAME.NAMESPACE: write e.g. payments.shop (lower-case letters, digits, '-')"
        )),
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, col)
}

/// Parses the file's text; `path` names it in errors.
pub fn parse(text: &str, path: &Path) -> Result<Vec<StaticName>, String> {
    let at = |span: std::ops::Range<usize>, what: &str, msg: &str| {
        let (l, c) = line_col(text, span.start);
        format!("{}:{l}:{c}: {what}: {msg}", path.display())
    };
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let (l, c) = e.span().map_or((1, 1), |s| line_col(text, s.start));
        format!(
            "{}:{l}:{c}: {}; each entry is a [[name]] table with cidr and service or workload",
            path.display(),
            e.message()
        )
    })?;
    let mut out = Vec::new();
    for (i, n) in raw.name.iter().enumerate() {
        let section = format!("name #{}", i + 1);
        let r = n.get_ref();
        let string = |v: &Option<Spanned<Value>>, field: &str| -> Result<Option<String>, String> {
            match v {
                None => Ok(None),
                Some(v) => match v.get_ref() {
                    Value::String(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_string())),
                    _ => Err(at(
                        v.span(),
                        &format!("{section}: {field}"),
                        "expected a non-empty string",
                    )),
                },
            }
        };
        let Some(cidr_v) = &r.cidr else {
            return Err(at(
                n.span(),
                &section,
                "no cidr: add e.g. cidr = \"10.0.5.0/24\"",
            ));
        };
        let cidr_s = string(&r.cidr, "cidr")?.unwrap_or_default();
        let cidr = CidrSpec::parse(&cidr_s)
            .map_err(|m| at(cidr_v.span(), &format!("{section}: cidr = {cidr_s:?}"), &m))?;
        let service = string(&r.service, "service")?;
        if let (Some(s), Some(v)) = (&service, &r.service) {
            check_service_name(s)
                .map_err(|m| at(v.span(), &format!("{section}: service = {s:?}"), &m))?;
        }
        let workload = string(&r.workload, "workload")?;
        if service.is_none() && workload.is_none() {
            return Err(at(
                n.span(),
                &section,
                "names nothing: add service = \"NAME.NAMESPACE\" or workload = \"NAME\"",
            ));
        }
        let namespace = string(&r.namespace, "namespace")?.or_else(|| {
            service
                .as_deref()
                .and_then(|s| s.split_once('.'))
                .map(|(_, ns)| ns.to_string())
        });
        out.push(StaticName {
            cidr,
            service,
            workload,
            namespace,
        });
    }
    Ok(out)
}

/// Reads and parses `path`.
pub fn load(path: &Path) -> Result<Vec<StaticName>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--peer-names {}: {e}", path.display()))?;
    parse(&text, path)
}
