//! The policy file (`--policy FILE`): TOML, parsed in full and validated before
//! anything is applied, so a bad file is one [`PolicyError`] and nothing
//! half-applied.
//!
//! TOML through the `toml` crate (with serde derive) rather than a hand-rolled
//! format: a real parser gives exact line/column for syntax errors and a span on
//! every value, so validation errors point at the field too.
//!
//! # Format
//!
//! ```toml
//! # Optional. Overrides the flag defaults for every peer.
//! [defaults]
//! connect_timeout = "1s"
//! idle_timeout = "5m"
//!
//! # Zero or more rules. Matchers (all optional; absent = match anything):
//! [[rule]]
//! name = "payments db"          # optional, shown in logs and errors; unique
//! direction = "outbound"        # outbound | inbound
//! pod = "/var/run/netns/shop-*" # netns path (has a '/') or name; '*' globs
//! peer = "10.0.5.0/24"          # CIDR, IPv4 or IPv6; a bare address is /32 or /128
//! ports = "5432"                # a port, or a range "8000-8100"
//! service = "payments.shop"     # NAME.NAMESPACE of the Service called; '*' globs
//! peer_namespace = "shop"       # the peer's namespace, workload, labels (all must match)
//! peer_workload = "payments"
//! peer_labels = { app = "pay" }
//! namespace = "shop"            # the local pod's namespace, workload, labels
//! workload = "frontend"
//! labels = { tier = "web" }
//! # ...and at least one knob:
//! connect_timeout = "500ms"     # duration > 0, or "off"   (same for the three below)
//! idle_timeout = "10m"
//! max_lifetime = "1h"
//! dns_timeout = "2s"
//! conn_rate = "100/s"           # count/period, or "off"
//! conn_burst = 20               # connections; default one period's worth of conn_rate
//! max_conns = 50                # concurrent connections, or "off"
//! queue = 100                   # waiters when max_conns are busy; 0 = reject at once
//! bandwidth = "10MiB/s"         # size/period, or "off"
//! bandwidth_burst = "1MiB"      # bytes; default one period's worth of bandwidth
//! breaker_failures = 5          # consecutive connect failures to open, or "off"
//! breaker_open = "15s"          # duration > 0
//! adaptive_k = 2.0              # number >= 1, or "off"
//! adaptive_window = "2m"        # duration > 0
//! ```
//!
//! Numbers may also be written as strings (`max_conns = "50"`); durations, rates
//! and sizes must be strings (`"500ms"`). Unknown keys are errors that list the
//! valid ones. Precedence: see [`super::set`]; `docs/policy.md` has the full
//! reference.

pub use super::file_error::PolicyError;
use super::file_error::{describe, Doc};
use super::ident_match::RawIdentity;
use super::knobs::{set_knob, Knobs, Overrides, KNOB_NAMES};
use super::set::{Cidr, PodPattern, PolicySet, PortRange, Rule};
use crate::policy::key::Direction;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;
use toml::{Spanned, Value};

macro_rules! raw_section {
    ($(#[$m:meta])* $name:ident { $($extra:ident),* }) => {
        $(#[$m])*
        #[derive(Deserialize, Default)]
        #[serde(deny_unknown_fields)]
        struct $name {
            $( $extra: Option<Spanned<Value>>, )*
            connect_timeout: Option<Spanned<Value>>,
            idle_timeout: Option<Spanned<Value>>,
            max_lifetime: Option<Spanned<Value>>,
            dns_timeout: Option<Spanned<Value>>,
            conn_rate: Option<Spanned<Value>>,
            conn_burst: Option<Spanned<Value>>,
            max_conns: Option<Spanned<Value>>,
            queue: Option<Spanned<Value>>,
            bandwidth: Option<Spanned<Value>>,
            bandwidth_burst: Option<Spanned<Value>>,
            breaker_failures: Option<Spanned<Value>>,
            breaker_open: Option<Spanned<Value>>,
            adaptive_k: Option<Spanned<Value>>,
            adaptive_window: Option<Spanned<Value>>,
        }

        impl $name {
            /// The knob keys present, in `KNOB_NAMES` order.
            fn knobs(&self) -> Vec<(&'static str, &Spanned<Value>)> {
                [
                    ("connect_timeout", &self.connect_timeout),
                    ("idle_timeout", &self.idle_timeout),
                    ("max_lifetime", &self.max_lifetime),
                    ("dns_timeout", &self.dns_timeout),
                    ("conn_rate", &self.conn_rate),
                    ("conn_burst", &self.conn_burst),
                    ("max_conns", &self.max_conns),
                    ("queue", &self.queue),
                    ("bandwidth", &self.bandwidth),
                    ("bandwidth_burst", &self.bandwidth_burst),
                    ("breaker_failures", &self.breaker_failures),
                    ("breaker_open", &self.breaker_open),
                    ("adaptive_k", &self.adaptive_k),
                    ("adaptive_window", &self.adaptive_window),
                ]
                .into_iter()
                .filter_map(|(name, v)| v.as_ref().map(|v| (name, v)))
                .collect()
            }
        }
    };
}

raw_section!(
    /// `[defaults]`: knobs only.
    Defaults {}
);
raw_section!(
    /// One `[[rule]]`: matchers, then knobs.
    RuleTable { name, direction, pod, peer, ports, service, peer_namespace, peer_workload,
                peer_labels, namespace, workload, labels }
);

/// The whole file. Values stay `toml::Value` (with spans) so that type errors
/// are ours to word, naming the key, rather than serde's.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    defaults: Option<Spanned<Defaults>>,
    #[serde(default)]
    rule: Vec<Spanned<RuleTable>>,
}

impl PolicySet {
    /// Reads and parses `path` (see [`PolicySet::parse`]).
    pub fn load(path: &Path, base: Knobs) -> Result<PolicySet, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError::unreadable(path, &e))?;
        PolicySet::parse(&text, path, base)
    }

    /// Parses a policy file's text over the flag defaults `base`. `path` is used
    /// in error messages and recorded in the set.
    pub fn parse(text: &str, path: &Path, base: Knobs) -> Result<PolicySet, PolicyError> {
        let doc = Doc { text, path };
        let file: PolicyFile = toml::from_str(text).map_err(|e| doc.toml_error(&e))?;
        let defaults = match &file.defaults {
            Some(d) => doc.overrides("[defaults]", &d.get_ref().knobs())?,
            None => Overrides::default(),
        };
        let mut rules = Vec::with_capacity(file.rule.len());
        let mut names: HashMap<String, (usize, usize)> = HashMap::new();
        for (i, raw) in file.rule.iter().enumerate() {
            let rule = doc.rule(i + 1, raw)?;
            if let (Some(name), Some(span)) = (&rule.name, &raw.get_ref().name) {
                if let Some((first, line)) = names.insert(name.clone(), (rule.number, rule.line)) {
                    return Err(doc.error(
                        span.span(),
                        Some(&format!("rule #{}", rule.number)),
                        "name",
                        format!("duplicate rule name: rule #{first} (line {line}) has it already"),
                    ));
                }
            }
            rules.push(rule);
        }
        Ok(PolicySet::from_parts(
            Some(path.to_path_buf()),
            base,
            defaults,
            rules,
        ))
    }
}

impl Doc<'_> {
    /// A knob value as the text its parser reads: strings as they are, numbers
    /// in decimal (so `max_conns = 50` and `"50"` are the same, and
    /// `connect_timeout = 500` says "missing unit after 500").
    fn knob_text(
        &self,
        section: &str,
        field: &str,
        v: &Spanned<Value>,
    ) -> Result<String, PolicyError> {
        match v.get_ref() {
            Value::String(s) => Ok(s.clone()),
            Value::Integer(i) => Ok(i.to_string()),
            Value::Float(f) => Ok(f.to_string()),
            other => Err(self.error(
                v.span(),
                Some(section),
                field,
                format!(
                    "expected a string or a number, found {}; e.g. {field} = {}",
                    describe(other),
                    knob_example(field)
                ),
            )),
        }
    }

    fn overrides(
        &self,
        section: &str,
        knobs: &[(&'static str, &Spanned<Value>)],
    ) -> Result<Overrides, PolicyError> {
        let mut set = Overrides::default();
        for (name, v) in knobs {
            let text = self.knob_text(section, name, v)?;
            match set_knob(&mut set, name, &text) {
                Some(Ok(())) => {}
                Some(Err(e)) => return Err(self.value_error(section, name, v, e)),
                // Not reached: the raw tables only have knob names.
                None => {
                    return Err(self.error(
                        v.span(),
                        Some(section),
                        name,
                        "internal error: not a knob".into(),
                    ))
                }
            }
        }
        Ok(set)
    }

    fn string<'v>(
        &self,
        section: &str,
        field: &str,
        v: &'v Spanned<Value>,
        example: &str,
    ) -> Result<&'v str, PolicyError> {
        match v.get_ref() {
            Value::String(s) => Ok(s),
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

    fn rule(&self, number: usize, raw: &Spanned<RuleTable>) -> Result<Rule, PolicyError> {
        let r = raw.get_ref();
        let mut section = format!("rule #{number}");
        let name = match &r.name {
            Some(v) => {
                let name = self.string(&section, "name", v, "\"payments db\"")?;
                if name.trim().is_empty() {
                    return Err(self.error(
                        v.span(),
                        Some(&section),
                        "name",
                        "empty name: leave it out or give e.g. \"payments db\"".into(),
                    ));
                }
                section = format!("rule #{number} {name:?}");
                Some(name.to_string())
            }
            None => None,
        };
        let direction = match &r.direction {
            Some(v) => {
                let s = self.string(&section, "direction", v, "\"outbound\"")?;
                Some(Direction::parse(s).ok_or_else(|| {
                    self.error(
                        v.span(),
                        Some(&section),
                        "direction",
                        "must be \"outbound\" or \"inbound\" (leave it out to match both)".into(),
                    )
                })?)
            }
            None => None,
        };
        let pod = match &r.pod {
            Some(v) => {
                let s = self.string(&section, "pod", v, "\"/var/run/netns/shop-*\"")?;
                Some(
                    PodPattern::parse(s)
                        .map_err(|m| self.error(v.span(), Some(&section), "pod", m))?,
                )
            }
            None => None,
        };
        let peer = match &r.peer {
            Some(v) => {
                let s = self.string(&section, "peer", v, "\"10.0.5.0/24\"")?;
                Some(Cidr::parse(s).map_err(|m| self.error(v.span(), Some(&section), "peer", m))?)
            }
            None => None,
        };
        let ports = match &r.ports {
            Some(v) => {
                let s = match v.get_ref() {
                    Value::Integer(i) => i.to_string(),
                    _ => self
                        .string(&section, "ports", v, "\"8000-8100\"")?
                        .to_string(),
                };
                Some(PortRange::parse(&s).map_err(|m| {
                    self.error(
                        v.span(),
                        Some(&section),
                        "ports",
                        format!("{m} (valid examples: 5432, \"8000-8100\")"),
                    )
                })?)
            }
            None => None,
        };
        let identity = self.identity(
            &section,
            RawIdentity {
                service: &r.service,
                peer_namespace: &r.peer_namespace,
                peer_workload: &r.peer_workload,
                peer_labels: &r.peer_labels,
                namespace: &r.namespace,
                workload: &r.workload,
                labels: &r.labels,
            },
        )?;
        let knobs = r.knobs();
        if knobs.is_empty() {
            return Err(self.error(
                raw.span(),
                Some(&section),
                "rule",
                format!(
                    "the rule sets no knob, so it would change nothing; add at least one of: {}",
                    KNOB_NAMES.join(", ")
                ),
            ));
        }
        let set = self.overrides(&section, &knobs)?;
        Ok(Rule {
            name,
            number,
            line: self.locate(raw.span().start).0,
            direction,
            pod,
            peer,
            ports,
            identity,
            set,
        })
    }
}

fn knob_example(field: &str) -> &'static str {
    match field {
        "conn_rate" => "\"100/s\"",
        "bandwidth" => "\"10MiB/s\"",
        "bandwidth_burst" => "\"1MiB\"",
        "conn_burst" | "max_conns" | "queue" | "breaker_failures" => "50",
        "adaptive_k" => "2.0",
        _ => "\"500ms\"",
    }
}
