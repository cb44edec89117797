//! Rule matchers by identity: the peer's Service, namespace, workload and labels, and the
//! local pod's namespace, workload and labels. Matched against what the identity index says
//! at the moment the peer's policy is resolved (when its entry is created, and again each
//! time the index changes), so a rule on a Service follows its endpoints with no reload.
//!
//! * `service` — `NAME.NAMESPACE`, `*` globbing (`*.shop`, `payments.*`). Outbound: the
//!   Service the connection is addressed to (its ClusterIP and port, or one of its endpoints'
//!   addresses and ports). Inbound: a Service whose endpoints include this pod on the port it
//!   listens on (the Service the client called).
//! * `peer_namespace`, `peer_workload` — the peer's namespace and workload (a ClusterIP peer
//!   has a namespace but no single workload).
//! * `peer_labels` — a table; every label given must be on the peer pod with that value.
//! * `namespace`, `workload`, `labels` — the same for the local pod.
//!
//! An address the index does not know (external) matches none of these.
use std::sync::Arc;

use toml::{Spanned, Value};

use super::file_error::{describe, Doc, PolicyError};
use crate::identity::Identity;

/// `*` matches any run of bytes; everything else is literal. The classic single-backtrack-
/// point algorithm, O(pattern × subject) worst case.
pub fn glob_match(pattern: &[u8], subject: &[u8]) -> bool {
    let (mut p, mut s) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while s < subject.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, s));
            p += 1;
        } else if p < pattern.len() && pattern[p] == subject[s] {
            p += 1;
            s += 1;
        } else if let Some((sp, ss)) = star {
            p = sp + 1;
            s = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// A name with `*` wildcards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    fn matches(&self, s: &str) -> bool {
        glob_match(self.0.as_bytes(), s.as_bytes())
    }

    fn rank(m: &Option<Glob>) -> (u8, usize) {
        match m {
            None => (0, 0),
            Some(g) if g.0.contains('*') => (1, g.0.chars().filter(|&c| c != '*').count()),
            Some(g) => (2, g.0.len()),
        }
    }
}

/// Label selector: every pair must be present with that value.
pub type LabelMatch = Vec<(String, String)>;

/// What a rule's identity matchers are matched against, for one key.
#[derive(Clone, Debug, Default)]
pub struct Subject {
    pub local: Identity,
    pub peer: Identity,
    /// The Service(s) the connection is addressed to (see the module doc).
    pub services: Vec<Arc<str>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityMatch {
    pub service: Option<Glob>,
    pub peer_namespace: Option<Glob>,
    pub peer_workload: Option<Glob>,
    pub peer_labels: Option<LabelMatch>,
    pub namespace: Option<Glob>,
    pub workload: Option<Glob>,
    pub labels: Option<LabelMatch>,
}

fn name_matches(g: &Option<Glob>, v: &Option<Arc<str>>) -> bool {
    match (g, v) {
        (None, _) => true,
        (Some(g), Some(v)) => g.matches(v),
        (Some(_), None) => false,
    }
}

fn labels_match(m: &Option<LabelMatch>, id: &Identity) -> bool {
    m.as_ref().is_none_or(|m| {
        m.iter()
            .all(|(k, v)| id.labels.get(k).is_some_and(|have| have == v))
    })
}

/// The identity part of a rule's specificity, most significant first (see `set.rs`).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct IdentityRank {
    pub workload: (u8, usize),
    pub labels: usize,
    pub namespace: (u8, usize),
    pub service: (u8, usize),
    pub peer_workload: (u8, usize),
    pub peer_labels: usize,
    pub peer_namespace: (u8, usize),
}

impl IdentityMatch {
    pub fn is_empty(&self) -> bool {
        *self == IdentityMatch::default()
    }

    pub fn matches(&self, s: &Subject) -> bool {
        self.service
            .as_ref()
            .is_none_or(|g| s.services.iter().any(|svc| g.matches(svc)))
            && name_matches(&self.peer_namespace, &s.peer.namespace)
            && name_matches(&self.peer_workload, &s.peer.workload)
            && labels_match(&self.peer_labels, &s.peer)
            && name_matches(&self.namespace, &s.local.namespace)
            && name_matches(&self.workload, &s.local.workload)
            && labels_match(&self.labels, &s.local)
    }

    pub fn rank(&self) -> IdentityRank {
        let n = |m: &Option<LabelMatch>| m.as_ref().map_or(0, Vec::len);
        IdentityRank {
            workload: Glob::rank(&self.workload),
            labels: n(&self.labels),
            namespace: Glob::rank(&self.namespace),
            service: Glob::rank(&self.service),
            peer_workload: Glob::rank(&self.peer_workload),
            peer_labels: n(&self.peer_labels),
            peer_namespace: Glob::rank(&self.peer_namespace),
        }
    }
}

/// The raw values of a rule's identity keys, as the file parser found them.
pub struct RawIdentity<'a> {
    pub service: &'a Option<Spanned<Value>>,
    pub peer_namespace: &'a Option<Spanned<Value>>,
    pub peer_workload: &'a Option<Spanned<Value>>,
    pub peer_labels: &'a Option<Spanned<Value>>,
    pub namespace: &'a Option<Spanned<Value>>,
    pub workload: &'a Option<Spanned<Value>>,
    pub labels: &'a Option<Spanned<Value>>,
}

/// A Kubernetes name part, or `*` globs of one: lower-case letters, digits, `-`, `*`.
fn name_part_ok(p: &str) -> bool {
    !p.is_empty()
        && p.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'*')
}

fn service_glob(s: &str) -> Result<Glob, String> {
    match s.split_once('.') {
        Some((n, ns)) if name_part_ok(n) && name_part_ok(ns) => Ok(Glob(s.to_string())),
        _ => Err(format!(
            "'{s}' is not NAME.NAMESPACE: write e.g. \"payments.shop\", or \"*.shop\" for every Service of namespace shop"
        )),
    }
}

fn name_glob(s: &str) -> Result<Glob, String> {
    // Workload names may have dots (a StatefulSet "db.v2"); namespaces cannot, but a pattern
    // that can never match is caught by review, not worth a second validator.
    if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(format!(
            "'{s}' is not a name: give a Kubernetes name such as \"frontend\", '*' globs"
        ));
    }
    Ok(Glob(s.to_string()))
}

impl Doc<'_> {
    fn glob(
        &self,
        section: &str,
        field: &str,
        v: &Option<Spanned<Value>>,
        parse: fn(&str) -> Result<Glob, String>,
        example: &str,
    ) -> Result<Option<Glob>, PolicyError> {
        let Some(v) = v else { return Ok(None) };
        match v.get_ref() {
            Value::String(s) => parse(s.trim())
                .map(Some)
                .map_err(|m| self.error(v.span(), Some(section), field, m)),
            other => Err(self.error(
                v.span(),
                Some(section),
                field,
                format!(
                    "expected a string, found {}; e.g. {field} = {example}",
                    describe(other)
                ),
            )),
        }
    }

    fn labels(
        &self,
        section: &str,
        field: &str,
        v: &Option<Spanned<Value>>,
    ) -> Result<Option<LabelMatch>, PolicyError> {
        let Some(v) = v else { return Ok(None) };
        let example = format!("{field} = {{ app = \"web\" }}");
        let Value::Table(t) = v.get_ref() else {
            return Err(self.error(
                v.span(),
                Some(section),
                field,
                format!(
                    "expected a table of labels, found {}; e.g. {example}",
                    describe(v.get_ref())
                ),
            ));
        };
        if t.is_empty() {
            return Err(self.error(
                v.span(),
                Some(section),
                field,
                format!("no labels: leave the key out or give some, e.g. {example}"),
            ));
        }
        let mut out = Vec::new();
        for (k, val) in t {
            match val {
                Value::String(s) => out.push((k.clone(), s.clone())),
                other => {
                    return Err(self.error(
                        v.span(),
                        Some(section),
                        field,
                        format!(
                            "label {k}: expected a string, found {}; e.g. {example}",
                            describe(other)
                        ),
                    ))
                }
            }
        }
        Ok(Some(out))
    }

    pub(super) fn identity(
        &self,
        section: &str,
        r: RawIdentity<'_>,
    ) -> Result<IdentityMatch, PolicyError> {
        Ok(IdentityMatch {
            service: self.glob(
                section,
                "service",
                r.service,
                service_glob,
                "\"payments.shop\"",
            )?,
            peer_namespace: self.glob(
                section,
                "peer_namespace",
                r.peer_namespace,
                name_glob,
                "\"shop\"",
            )?,
            peer_workload: self.glob(
                section,
                "peer_workload",
                r.peer_workload,
                name_glob,
                "\"payments\"",
            )?,
            peer_labels: self.labels(section, "peer_labels", r.peer_labels)?,
            namespace: self.glob(section, "namespace", r.namespace, name_glob, "\"shop\"")?,
            workload: self.glob(section, "workload", r.workload, name_glob, "\"frontend\"")?,
            labels: self.labels(section, "labels", r.labels)?,
        })
    }
}
