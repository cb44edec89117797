//! The Grafana dashboard (`deploy/monitoring/grafana-dashboard.json`) against a real
//! Prometheus scraping a running agent while real traffic, throttling and timeouts happen:
//! every query of every panel, with the dashboard's variables filled in as Grafana would,
//! must return data, so the dashboard cannot drift from the metrics the agent exports. The
//! scrape configuration shipped beside it must select the DaemonSet's metrics port.
mod common;
mod operator_util;
mod policy_util;

use std::path::PathBuf;

use operator_util::{setup, traffic};
use serde_json::Value;
use sockmesh_tests::manifest::{repo_manifest_path, Manifest};
use sockmesh_tests::promserver::{sample_value, Prometheus};

fn monitoring(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/monitoring")
        .join(file)
}

fn dashboard() -> Value {
    let path = monitoring("grafana-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("read the dashboard");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// (panel title, refId, expr) of every query in the dashboard, rows' nested panels included.
fn queries(d: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut stack: Vec<&Value> = d["panels"].as_array().expect("panels").iter().collect();
    while let Some(p) = stack.pop() {
        if let Some(inner) = p["panels"].as_array() {
            stack.extend(inner);
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                p["title"].as_str().unwrap_or("?").to_string(),
                t["refId"].as_str().unwrap_or("?").to_string(),
                t["expr"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    out
}

/// A value as Grafana puts a single selected value of a multi-value variable into a regex
/// matcher: regex metacharacters escaped, and the backslash doubled for the PromQL string.
fn regex_value(v: &str) -> String {
    let mut out = String::new();
    for c in v.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push_str("\\\\");
        }
        out.push(c);
    }
    out
}

/// Grafana's built-in interval variables, for a 1 s scrape interval and a range longer than
/// the test: `$__rate_interval` is at least four scrape intervals.
fn builtins(expr: &str) -> String {
    expr.replace("$__rate_interval", "10s")
        .replace("$__interval", "2s")
        .replace("$__range", "10m")
}

/// The dashboard's query variables, in order, each resolved as Grafana would
/// (`label_values(SELECTOR, LABEL)` with the earlier variables substituted), to the first value
/// Prometheus lists. A variable with no values is a failure, named.
fn resolve_variables(d: &Value, prom: &Prometheus) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = Vec::new();
    for v in d["templating"]["list"].as_array().expect("templating") {
        if v["type"] != "query" {
            continue;
        }
        let name = v["name"].as_str().expect("variable name").to_string();
        let def = v["definition"].as_str().expect("variable definition");
        let inner = def
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {name}: only label_values() is supported: {def}"));
        let (selector, label) = inner
            .rsplit_once(',')
            .expect("label_values(selector, label)");
        let selector = substitute(selector.trim(), &vars);
        let values = prom
            .label_values(&selector, label.trim())
            .expect("label values");
        let first = values
            .first()
            .unwrap_or_else(|| panic!("variable {name}: {def} lists nothing"));
        vars.push((name, regex_value(first)));
    }
    vars
}

fn substitute(expr: &str, vars: &[(String, String)]) -> String {
    let mut e = builtins(expr);
    for (k, v) in vars {
        e = e
            .replace(&format!("${{{k}}}"), v)
            .replace(&format!("${k}"), v);
    }
    e
}

#[test]
fn every_panel_query_returns_data_from_a_real_prometheus() {
    let mut s = setup();
    let metrics = s.agent.metrics_addr().expect("metrics address");
    let prom = Prometheus::start(&[metrics]).expect("prometheus");
    let pod = s.client.netns_path().display().to_string();
    let (echo, silent) = (s.echo_addr.to_string(), s.silent_addr.to_string());
    // A step's figures must be scraped before the next step moves them, or increase() over
    // the range cannot see the change (a series' first sample is its baseline).
    let scraped = |what: &str, expr: String| {
        let r = prom
            .query_until(&expr, |v| sample_value(v) >= 1.0)
            .expect("query");
        assert!(
            r.iter().any(|v| sample_value(v) >= 1.0),
            "Prometheus never saw {what} ({expr}): {r:?}"
        );
    };
    scraped("the agent", "sockmesh_ready".into());
    traffic(&mut s, &|step| match step {
        "held" => scraped(
            "the held connection",
            format!("sockmesh_peer_connections_active{{peer=\"{echo}\"}}"),
        ),
        "throttled" => scraped(
            "the throttled connect",
            format!("sockmesh_peer_throttled_total{{peer=\"{echo}\",reason=\"rate\"}}"),
        ),
        "timeout" => scraped(
            "the first connect timeout",
            format!("sockmesh_peer_timeouts_total{{peer=\"{silent}\",kind=\"connect\"}}"),
        ),
        _ => scraped(
            "the open breaker",
            format!("sockmesh_peer_breaker_open{{peer=\"{silent}\"}}"),
        ),
    });
    // The second timeout in Prometheus too: its increase over the range is then 1.
    scraped(
        "the second connect timeout",
        format!("sockmesh_peer_timeouts_total{{peer=\"{silent}\",kind=\"connect\"}} - 1"),
    );

    let d = dashboard();
    let vars = resolve_variables(&d, &prom);
    assert!(
        vars.iter()
            .any(|(k, v)| k == "pod" && *v == regex_value(&pod)),
        "the pod variable lists the meshed pod {pod}: {vars:?}"
    );
    let all = queries(&d);
    assert!(
        all.len() >= 20,
        "the dashboard has its panels: {}",
        all.len()
    );
    let mut empty = Vec::new();
    let mut results = std::collections::BTreeMap::new();
    for (title, ref_id, expr) in &all {
        assert!(
            !expr.is_empty(),
            "panel '{title}' query {ref_id} has no expr"
        );
        let q = substitute(expr, &vars);
        assert!(
            !q.contains('$'),
            "panel '{title}': unresolved variable in {q}"
        );
        let r = prom
            .query(&q)
            .unwrap_or_else(|e| panic!("panel '{title}' query {ref_id}: {e:#}"));
        if r.is_empty() {
            empty.push(format!("panel '{title}' query {ref_id}: {q}"));
        }
        results.insert(format!("{title}/{ref_id}"), r);
    }
    assert!(
        empty.is_empty(),
        "queries returning no data:\n{}",
        empty.join("\n")
    );
    // What happened shows as such, not only as series of zeros.
    let total = |key: &str| -> f64 { results[key].iter().map(sample_value).sum() };
    assert!(
        total("Throttled (range)/A") >= 1.0,
        "{:?}",
        results["Throttled (range)/A"]
    );
    assert!(
        total("Timeouts (range)/A") >= 1.0,
        "{:?}",
        results["Timeouts (range)/A"]
    );
    assert_eq!(total("Open connections/A"), 1.0, "the held connection");
    assert!(total("Top peers by traffic/A") > 0.0);
    assert_eq!(total("Agents ready/A"), 1.0);
    let breakers = &results["Breaker states/A"];
    assert!(
        breakers
            .iter()
            .any(|v| v["metric"]["peer"] == silent.as_str() && sample_value(v) == 1.0),
        "the silent peer's breaker shows open: {breakers:?}"
    );
    let by_reason = &results["Throttled and timed out by peer/A"];
    assert!(
        by_reason
            .iter()
            .any(|v| v["metric"]["peer"] == echo.as_str() && v["metric"]["reason"] == "rate"),
        "{by_reason:?}"
    );
    drop(s.held.take());
}

/// Every panel and query reads the dashboard's datasource variable, so importing it asks for
/// nothing but a Prometheus data source.
#[test]
fn the_dashboard_imports_as_is_with_a_datasource_variable() {
    let d = dashboard();
    let list = d["templating"]["list"].as_array().expect("templating");
    assert!(
        list.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a datasource variable"
    );
    assert!(d.get("__inputs").is_none(), "no import-time inputs needed");
    let mut stack: Vec<&Value> = d["panels"].as_array().expect("panels").iter().collect();
    while let Some(p) = stack.pop() {
        if let Some(inner) = p["panels"].as_array() {
            stack.extend(inner);
        }
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {}",
            p["title"]
        );
        for t in p["targets"].as_array().expect("targets") {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "panel {}",
                p["title"]
            );
        }
    }
}

/// The scrape configurations shipped beside the dashboard select what deploy/sockmesh.yaml
/// runs: its namespace, its pod label, and the container port named `metrics` that
/// `--metrics-addr` serves on.
#[test]
fn the_scrape_configs_select_the_daemonsets_metrics_port() {
    let m = Manifest::load(&repo_manifest_path()).expect("deploy/sockmesh.yaml");
    let ns = m.daemonset.metadata.namespace.clone();
    let labels = m
        .daemonset
        .spec
        .template
        .metadata
        .as_ref()
        .map(|t| t.labels.clone())
        .unwrap_or_default();
    let app = labels
        .get("app.kubernetes.io/name")
        .expect("the pod label")
        .clone();
    let c = m.container().expect("container");
    let args = c.args.clone().unwrap_or_default();
    // The DaemonSet serves /metrics nowhere by default (`--metrics-addr=off`: it shows every
    // pod's peers and bytes); the container port named `metrics` is where an operator who
    // turns it on serves it, and where the scrape configs look. Turned on, it must be there.
    let port = c
        .ports
        .iter()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .map(|p| p.container_port)
        .expect("a container port named metrics");
    let metrics_addr = args
        .iter()
        .find_map(|a| a.strip_prefix("--metrics-addr="))
        .expect("--metrics-addr in the manifest");
    if metrics_addr != "off" {
        let on: u16 = metrics_addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("a port in --metrics-addr");
        assert_eq!(on, port, "--metrics-addr serves on the port named metrics");
    }
    let port_name = "metrics".to_string();

    let read = |f: &str| -> Value {
        let text = std::fs::read_to_string(monitoring(f)).expect("read");
        serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{f}: {e}"))
    };
    let job = &read("prometheus-scrape.yml")["scrape_configs"][0];
    assert_eq!(job["metrics_path"], "/metrics");
    assert_eq!(job["kubernetes_sd_configs"][0]["role"], "pod");
    assert_eq!(
        job["kubernetes_sd_configs"][0]["namespaces"]["names"][0],
        ns.as_str()
    );
    let keeps: Vec<(String, String)> = job["relabel_configs"]
        .as_array()
        .expect("relabel_configs")
        .iter()
        .filter(|r| r["action"] == "keep")
        .map(|r| {
            (
                r["source_labels"][0]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                r["regex"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert!(keeps.contains(&(
        "__meta_kubernetes_pod_label_app_kubernetes_io_name".into(),
        app.clone()
    )));
    assert!(keeps.contains(&(
        "__meta_kubernetes_pod_container_port_name".into(),
        port_name.clone()
    )));

    let pm = read("podmonitor.yaml");
    assert_eq!(pm["kind"], "PodMonitor");
    assert_eq!(pm["metadata"]["namespace"], ns.as_str());
    assert_eq!(
        pm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        app.as_str()
    );
    assert_eq!(
        pm["spec"]["podMetricsEndpoints"][0]["port"],
        port_name.as_str()
    );
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["path"], "/metrics");
}
