//! One DestinationRule object (`networking.istio.io` v1 or v1beta1, as JSON) into what L4 can
//! apply, and the list of what it cannot. Pure.
//!
//! A field that is well formed but means nothing at L4 (HTTP pool settings, TLS, subsets,
//! consistent hashing ...) is *unsupported*: named in the list, the rest applies. A field
//! whose value is wrong (a duration that does not parse, a negative count, no `host`) makes
//! the whole rule *malformed*: it is ignored, as Istio's validation would have refused it.
use std::time::Duration;

use serde_json::{Map, Value};

use crate::policy::outlier::{LbMode, OutlierConfig};
use crate::rules::units::parse_duration;

/// The connection pool's TCP settings (`connectionPool.tcp`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pool {
    pub connect_timeout: Option<Duration>,
    pub max_connections: Option<u32>,
    pub idle_timeout: Option<Duration>,
    pub max_connection_duration: Option<Duration>,
}

/// A `trafficPolicy` (or one port's): each section replaces the top-level one as a whole when
/// a port sets it, as Istio merges them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Settings {
    pub pool: Option<Pool>,
    pub outlier: Option<OutlierConfig>,
    pub lb: Option<LbMode>,
}

impl Settings {
    /// `port`'s settings over the top-level ones, section by section.
    pub fn merged(&self, port: Option<&Settings>) -> Settings {
        let Some(p) = port else { return self.clone() };
        Settings {
            pool: p.pool.clone().or_else(|| self.pool.clone()),
            outlier: p.outlier.or(self.outlier),
            lb: p.lb.or(self.lb),
        }
    }
}

/// Who may use a rule (`exportTo`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Export {
    /// Absent, or `*`.
    All,
    /// These namespaces (`.` is the rule's own, already resolved).
    Namespaces(Vec<String>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct DestinationRule {
    pub namespace: String,
    pub name: String,
    pub resource_version: String,
    /// RFC 3339 (sorts as text): the older rule wins a tie, as in Istio.
    pub created: String,
    /// As written (`reviews`, `reviews.shop.svc.cluster.local`, `*.shop.svc.cluster.local`).
    pub host: String,
    pub export: Export,
    pub settings: Settings,
    /// `portLevelSettings`, by Service port.
    pub ports: Vec<(u16, Settings)>,
}

impl DestinationRule {
    /// `shop/payments`, for logs and events.
    pub fn label(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// What applies to connections to Service port `port`.
    pub fn for_port(&self, port: u16) -> Settings {
        let p = self.ports.iter().find(|(n, _)| *n == port).map(|(_, s)| s);
        self.settings.merged(p)
    }
}

/// A parsed rule and what of it L4 cannot honour (field paths).
#[derive(Clone, Debug, PartialEq)]
pub struct Parsed {
    pub rule: DestinationRule,
    pub unsupported: Vec<String>,
}

struct Ctx {
    unsupported: Vec<String>,
}

type R<T> = Result<T, String>;

fn obj<'a>(v: &'a Value, path: &str) -> R<&'a Map<String, Value>> {
    v.as_object()
        .ok_or_else(|| format!("{path}: expected an object, found {v}"))
}

fn duration(v: &Value, path: &str) -> R<Duration> {
    let s = v
        .as_str()
        .ok_or_else(|| format!("{path}: expected a duration such as \"5s\", found {v}"))?;
    let d = parse_duration(s).map_err(|e| format!("{path}: {e}"))?;
    if d.is_zero() {
        return Err(format!("{path}: must be > 0, found {s:?}"));
    }
    Ok(d)
}

fn count(v: &Value, path: &str) -> R<u32> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| format!("{path}: expected a whole number >= 0, found {v}"))
}

fn percent(v: &Value, path: &str) -> R<u32> {
    let n = count(v, path)?;
    if n > 100 {
        return Err(format!("{path}: a percentage is 0-100, found {n}"));
    }
    Ok(n)
}

impl Ctx {
    fn unsupported(&mut self, path: String) {
        self.unsupported.push(path);
    }

    /// Every key of `m` not in `known` is unsupported.
    fn rest(&mut self, m: &Map<String, Value>, known: &[&str], path: &str) {
        for k in m.keys().filter(|k| !known.contains(&k.as_str())) {
            self.unsupported(format!("{path}.{k}"));
        }
    }

    fn pool(&mut self, v: &Value, path: &str) -> R<Option<Pool>> {
        let m = obj(v, path)?;
        self.rest(m, &["tcp"], path);
        let Some(tcp) = m.get("tcp") else {
            return Ok(None);
        };
        let p = format!("{path}.tcp");
        let t = obj(tcp, &p)?;
        const KNOWN: &[&str] = &[
            "connectTimeout",
            "maxConnections",
            "idleTimeout",
            "maxConnectionDuration",
        ];
        self.rest(t, KNOWN, &p);
        let d = |k: &str| {
            t.get(k)
                .map(|v| duration(v, &format!("{p}.{k}")))
                .transpose()
        };
        Ok(Some(Pool {
            connect_timeout: d("connectTimeout")?,
            max_connections: t
                .get("maxConnections")
                .map(|v| count(v, &format!("{p}.maxConnections")))
                .transpose()?,
            idle_timeout: d("idleTimeout")?,
            max_connection_duration: d("maxConnectionDuration")?,
        }))
    }

    fn outlier(&mut self, v: &Value, path: &str) -> R<OutlierConfig> {
        let m = obj(v, path)?;
        const KNOWN: &[&str] = &[
            "splitExternalLocalOriginErrors",
            "consecutiveLocalOriginFailures",
            "consecutiveGatewayErrors",
            "consecutive5xxErrors",
            "consecutiveErrors",
            "interval",
            "baseEjectionTime",
            "maxEjectionPercent",
            "minHealthPercent",
        ];
        self.rest(m, KNOWN, path);
        let get = |k: &str| m.get(k).map(|v| (v, format!("{path}.{k}")));
        let n = |k: &str| get(k).map(|(v, p)| count(v, &p)).transpose();
        let split = match get("splitExternalLocalOriginErrors") {
            None => false,
            Some((v, p)) => v
                .as_bool()
                .ok_or_else(|| format!("{p}: expected true or false, found {v}"))?,
        };
        let defaults = OutlierConfig::default();
        // Every failure L4 sees is a connect failure: local-origin. With the split, Envoy
        // counts those alone (consecutiveLocalOriginFailures, default 5); without it, they
        // count as 5xx and as gateway errors, so the lower enabled threshold ejects first.
        let threshold = if split {
            n("consecutiveLocalOriginFailures")?.unwrap_or(defaults.threshold)
        } else {
            let five = n("consecutive5xxErrors")?.unwrap_or(defaults.threshold);
            let gateway = n("consecutiveGatewayErrors")?
                .or(n("consecutiveErrors")?)
                .unwrap_or(0);
            [five, gateway]
                .into_iter()
                .filter(|&t| t > 0)
                .min()
                .unwrap_or(0)
        };
        if !split && m.contains_key("consecutiveLocalOriginFailures") {
            // Istio ignores it without the split: say so rather than apply it.
            self.unsupported(format!(
                "{path}.consecutiveLocalOriginFailures (needs splitExternalLocalOriginErrors: true)"
            ));
        }
        let d = |k: &str| get(k).map(|(v, p)| duration(v, &p)).transpose();
        let pc = |k: &str| get(k).map(|(v, p)| percent(v, &p)).transpose();
        Ok(OutlierConfig {
            threshold,
            interval: d("interval")?.unwrap_or(defaults.interval),
            base_ejection: d("baseEjectionTime")?.unwrap_or(defaults.base_ejection),
            max_ejection_percent: pc("maxEjectionPercent")?
                .unwrap_or(defaults.max_ejection_percent),
            min_health_percent: pc("minHealthPercent")?.unwrap_or(defaults.min_health_percent),
        })
    }

    fn lb(&mut self, v: &Value, path: &str) -> R<Option<LbMode>> {
        let m = obj(v, path)?;
        self.rest(m, &["simple"], path);
        let Some(s) = m.get("simple") else {
            return Ok(None);
        };
        let p = format!("{path}.simple");
        match s.as_str() {
            Some("ROUND_ROBIN" | "UNSPECIFIED") => Ok(Some(LbMode::RoundRobin)),
            Some("LEAST_REQUEST" | "LEAST_CONN") => Ok(Some(LbMode::LeastConnections)),
            Some(other @ ("RANDOM" | "PASSTHROUGH")) => {
                self.unsupported(format!("{p}: {other} (round robin is used)"));
                Ok(Some(LbMode::RoundRobin))
            }
            _ => Err(format!(
                "{p}: expected ROUND_ROBIN, LEAST_REQUEST, LEAST_CONN, RANDOM or PASSTHROUGH, found {s}"
            )),
        }
    }

    fn settings(&mut self, v: &Value, path: &str, known_extra: &[&str]) -> R<Settings> {
        let m = obj(v, path)?;
        let mut known = vec!["connectionPool", "outlierDetection", "loadBalancer"];
        known.extend_from_slice(known_extra);
        self.rest(m, &known, path);
        let at = |k: &str| m.get(k).map(|v| (v, format!("{path}.{k}")));
        Ok(Settings {
            pool: match at("connectionPool") {
                Some((v, p)) => self.pool(v, &p)?,
                None => None,
            },
            outlier: at("outlierDetection")
                .map(|(v, p)| self.outlier(v, &p))
                .transpose()?,
            lb: match at("loadBalancer") {
                Some((v, p)) => self.lb(v, &p)?,
                None => None,
            },
        })
    }
}

fn text(m: &Map<String, Value>, k: &str) -> String {
    m.get(k).and_then(Value::as_str).unwrap_or("").to_string()
}

/// Parses one DestinationRule object. `Err`: malformed (the message names the field).
pub fn parse(v: &Value) -> R<Parsed> {
    let top = obj(v, "the object")?;
    let meta = top
        .get("metadata")
        .and_then(Value::as_object)
        .ok_or("no metadata")?;
    let namespace = match text(meta, "namespace") {
        ns if ns.is_empty() => "default".to_string(),
        ns => ns,
    };
    let spec = obj(top.get("spec").unwrap_or(&Value::Null), "spec")?;
    let mut cx = Ctx {
        unsupported: Vec::new(),
    };
    cx.rest(
        spec,
        &[
            "host",
            "trafficPolicy",
            "exportTo",
            "subsets",
            "workloadSelector",
        ],
        "spec",
    );
    let host = match spec.get("host").and_then(Value::as_str).map(str::trim) {
        Some(h) if !h.is_empty() => h.to_ascii_lowercase(),
        _ => return Err("spec.host: required (a Service name or FQDN, e.g. \"reviews\" or \"reviews.shop.svc.cluster.local\")".into()),
    };
    if spec.get("subsets").is_some() {
        // Subsets pick pods by label for HTTP routes; an L4 connection names no subset.
        cx.unsupported("spec.subsets".into());
    }
    if spec.get("workloadSelector").is_some() {
        return Err("spec.workloadSelector: rules for some client workloads only are not supported at L4; remove it or use a policy-file rule with `workload`".into());
    }
    let export = match spec.get("exportTo") {
        None => Export::All,
        Some(Value::Array(a)) => {
            let mut out = Vec::new();
            for e in a {
                match e.as_str().map(str::trim) {
                    Some("*") => {
                        out.clear();
                        break;
                    }
                    Some(".") => out.push(namespace.clone()),
                    // `~`: nobody.
                    Some("~") => {}
                    Some(ns) if !ns.is_empty() => out.push(ns.to_string()),
                    _ => {
                        return Err(format!(
                            "spec.exportTo: expected namespace names, \".\" or \"*\", found {e}"
                        ))
                    }
                }
            }
            let star = a.iter().any(|e| e.as_str() == Some("*"));
            if star {
                Export::All
            } else {
                Export::Namespaces(out)
            }
        }
        Some(other) => return Err(format!("spec.exportTo: expected a list, found {other}")),
    };
    let (settings, ports) = match spec.get("trafficPolicy") {
        None => (Settings::default(), Vec::new()),
        Some(tp) => {
            let path = "spec.trafficPolicy";
            let settings = cx.settings(tp, path, &["portLevelSettings"])?;
            let mut ports = Vec::new();
            let pls = tp.get("portLevelSettings").unwrap_or(&Value::Null);
            for (i, p) in pls.as_array().into_iter().flatten().enumerate() {
                let pp = format!("{path}.portLevelSettings[{i}]");
                let number = p
                    .pointer("/port/number")
                    .and_then(Value::as_u64)
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("{pp}.port.number: required, 1-65535"))?;
                ports.push((number, cx.settings(p, &pp, &["port"])?));
            }
            (settings, ports)
        }
    };
    // TLS is the proxy's business to originate; sockmesh relays bytes as they are.
    cx.unsupported.sort();
    cx.unsupported.dedup();
    Ok(Parsed {
        rule: DestinationRule {
            resource_version: text(meta, "resourceVersion"),
            created: text(meta, "creationTimestamp"),
            name: text(meta, "name"),
            namespace,
            host,
            export,
            settings,
            ports,
        },
        unsupported: cx.unsupported,
    })
}
