//! A fake Kubernetes API server inside the test process: real HTTP/1.1 on 127.0.0.1 (or HTTPS
//! with a bearer token, as an in-cluster agent reaches a real one: [`FakeKubeApi::start_https`]),
//! real Pod, Namespace, Service and EndpointSlice JSON, list and watch (chunked streams of
//! `{"type","object"}` lines) with
//! resource versions, `410 Gone` for a watch resumed from a compacted version (as etcd
//! compaction makes a real API server do), and stop/restart on the same port to play an outage.
//! Events the agent posts (events.k8s.io/v1) are recorded for the test to read.
//!
//! Only what the agent uses is served: `GET /api/v1/pods` (with or without
//! `fieldSelector=spec.nodeName=`), `GET /api/v1/namespaces`, `GET /api/v1/services`,
//! `GET /apis/discovery.k8s.io/v1/endpointslices`, `GET /apis/networking.istio.io/VERSION/
//! destinationrules` once the test installed that CRD, and `POST`/`PATCH` of events. Anything
//! else is a 404 Status.

mod http;
mod istio;
mod objects;
mod tls;

pub use objects::{FakePod, FakeService, FakeSlice};

use anyhow::{bail, Context, Result};
use http::{chunk, read_request, respond, status};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};
use tls::{Conn, Tls};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Pod,
    Namespace,
    Service,
    Slice,
    /// Istio's DestinationRule (networking.istio.io), served only once the test installs
    /// its CRD ([`FakeKubeApi::install_istio`]).
    Rule,
}

impl Kind {
    /// (list kind, apiVersion) of a list response.
    fn list(self) -> (&'static str, &'static str) {
        match self {
            Kind::Pod => ("PodList", "v1"),
            Kind::Namespace => ("NamespaceList", "v1"),
            Kind::Service => ("ServiceList", "v1"),
            Kind::Slice => ("EndpointSliceList", "discovery.k8s.io/v1"),
            Kind::Rule => ("DestinationRuleList", "networking.istio.io/v1"),
        }
    }
}

struct Change {
    rv: u64,
    kind: Kind,
    ty: &'static str,
    obj: Value,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    pods: BTreeMap<String, Value>,
    namespaces: BTreeMap<String, Value>,
    services: BTreeMap<String, Value>,
    slices: BTreeMap<String, Value>,
    rules: BTreeMap<String, Value>,
    /// The networking.istio.io versions served (none: no Istio CRD, a 404 like a real
    /// cluster without Istio).
    istio_versions: Vec<String>,
    /// DestinationRule requests get 403 (the agent's ClusterRole lacks them).
    istio_forbidden: bool,
    log: Vec<Change>,
    /// Watches resumed from a version below this get 410 Gone.
    compacted: u64,
    events: Vec<Value>,
    requests: Vec<String>,
    unauthorized: usize,
    /// Bumped at every stop: connections of an earlier run end.
    epoch: u64,
    running: bool,
}

struct Shared {
    inner: Mutex<Inner>,
    changed: Condvar,
    /// Open connections (clones, to cut them at a stop), removed when their handler ends so
    /// the clone does not keep a finished connection open.
    conns: Mutex<BTreeMap<u64, TcpStream>>,
    /// HTTPS: the server's certificate and key (the client must trust `ca_pem`).
    tls: Option<Tls>,
    /// A request without `Authorization: Bearer <token>` gets 401.
    token: Option<String>,
}

impl Inner {
    fn objects(&mut self, kind: Kind) -> &mut BTreeMap<String, Value> {
        match kind {
            Kind::Pod => &mut self.pods,
            Kind::Namespace => &mut self.namespaces,
            Kind::Service => &mut self.services,
            Kind::Slice => &mut self.slices,
            Kind::Rule => &mut self.rules,
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The fake API server. Dropping it stops it.
pub struct FakeKubeApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl FakeKubeApi {
    /// Plain HTTP, no credentials: what `--kube-api` (`kubectl proxy`) reaches.
    pub fn start() -> Result<Self> {
        Self::start_with(None, None)
    }

    /// HTTPS with a certificate from a CA made for this server ([`FakeKubeApi::ca_pem`]), and
    /// every request must carry `Authorization: Bearer <`[`FakeKubeApi::token`]`>`: what an
    /// agent using in-cluster configuration reaches.
    pub fn start_https() -> Result<Self> {
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let tls = Tls::new(ip).context("the fake API server's certificates")?;
        let token = format!("smt-token-{}", crate::names::random_hex(16));
        Self::start_with(Some(tls), Some(token))
    }

    fn start_with(tls: Option<Tls>, token: Option<String>) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind the fake API server")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                rv: 100,
                ..Default::default()
            }),
            changed: Condvar::new(),
            conns: Mutex::new(BTreeMap::new()),
            tls,
            token,
        });
        let api = FakeKubeApi { shared, addr };
        api.serve(listener);
        Ok(api)
    }

    /// `http://127.0.0.1:PORT` (or `https://`), for `--kube-api`.
    pub fn url(&self) -> String {
        let scheme = if self.shared.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// Where the server listens (`KUBERNETES_SERVICE_HOST` and `_PORT` for an in-cluster client).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA certificate (PEM) that signed the server's, with [`FakeKubeApi::start_https`].
    pub fn ca_pem(&self) -> Option<&str> {
        self.shared.tls.as_ref().map(|t| t.ca_pem.as_str())
    }

    /// The bearer token every request must carry, with [`FakeKubeApi::start_https`].
    pub fn token(&self) -> Option<&str> {
        self.shared.token.as_deref()
    }

    /// Requests refused for a missing or wrong token.
    pub fn unauthorized(&self) -> usize {
        self.shared.lock().unauthorized
    }

    fn serve(&self, listener: TcpListener) {
        let shared = self.shared.clone();
        let epoch = {
            let mut g = shared.lock();
            g.running = true;
            g.epoch
        };
        thread::spawn(move || {
            for (n, conn) in listener.incoming().enumerate() {
                let Ok(conn) = conn else { continue };
                if shared.lock().epoch != epoch {
                    return; // stopped: this accept was the wake-up
                }
                let id = (epoch << 32) | n as u64;
                if let Ok(c) = conn.try_clone() {
                    let mut conns = shared.conns.lock().unwrap_or_else(|p| p.into_inner());
                    conns.insert(id, c);
                }
                let s = shared.clone();
                thread::spawn(move || {
                    let _ = handle_conn(&s, conn, epoch);
                    s.conns
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                });
            }
        });
    }

    /// An outage: refuse new connections and cut every open one (watches included).
    pub fn stop(&self) {
        {
            let mut g = self.shared.lock();
            if !g.running {
                return;
            }
            g.running = false;
            g.epoch += 1;
        }
        self.shared.changed.notify_all();
        // Wake the accept loop so it sees the new epoch and drops the listener.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        for c in self
            .shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            let _ = c.shutdown(Shutdown::Both);
        }
        // The port is free once the accept thread has dropped the listener.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && TcpStream::connect(self.addr).is_ok() {
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Back on the same port, with the same objects.
    pub fn restart(&self) -> Result<()> {
        let listener = TcpListener::bind(self.addr)
            .with_context(|| format!("rebind the fake API server on {}", self.addr))?;
        self.serve(listener);
        Ok(())
    }

    /// Forget the change history up to now: a watch resumed from a version older than the
    /// current one gets `410 Gone` and the client must list again.
    pub fn compact(&self) {
        let mut g = self.shared.lock();
        g.compacted = g.rv;
        g.log.clear();
    }

    fn record(&self, kind: Kind, ty: &'static str, mut obj: Value) -> Value {
        let mut g = self.shared.lock();
        g.rv += 1;
        let rv = g.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = match kind {
            Kind::Namespace => obj["metadata"]["name"].as_str().unwrap_or("").to_string(),
            _ => format!(
                "{}/{}",
                obj["metadata"]["namespace"].as_str().unwrap_or(""),
                obj["metadata"]["name"].as_str().unwrap_or("")
            ),
        };
        let map = g.objects(kind);
        if ty == "DELETED" {
            map.remove(&key);
        } else {
            map.insert(key, obj.clone());
        }
        g.log.push(Change {
            rv,
            kind,
            ty,
            obj: obj.clone(),
        });
        drop(g);
        self.shared.changed.notify_all();
        obj
    }

    pub fn add_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let ns = json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "uid": format!("ns-{name}"), "labels": labels},
            "status": {"phase": "Active"},
        });
        let exists = self.shared.lock().namespaces.contains_key(name);
        self.record(
            Kind::Namespace,
            if exists { "MODIFIED" } else { "ADDED" },
            ns,
        );
    }

    pub fn add_pod(&self, pod: &FakePod) {
        self.record(Kind::Pod, "ADDED", pod.to_json());
    }

    /// Replaces the pod's annotations (a MODIFIED event).
    pub fn set_pod_annotations(&self, pod: &FakePod) {
        self.record(Kind::Pod, "MODIFIED", pod.to_json());
    }

    pub fn delete_pod(&self, pod: &FakePod) {
        self.record(Kind::Pod, "DELETED", pod.to_json());
    }

    /// Adds or replaces a Service (ADDED or MODIFIED).
    pub fn put_service(&self, s: &FakeService) {
        let exists = self
            .shared
            .lock()
            .services
            .contains_key(&format!("{}/{}", s.namespace, s.name));
        self.record(
            Kind::Service,
            if exists { "MODIFIED" } else { "ADDED" },
            s.to_json(),
        );
    }

    pub fn delete_service(&self, s: &FakeService) {
        self.record(Kind::Service, "DELETED", s.to_json());
    }

    /// Adds or replaces an EndpointSlice (ADDED or MODIFIED).
    pub fn put_slice(&self, e: &FakeSlice) {
        let exists = self
            .shared
            .lock()
            .slices
            .contains_key(&format!("{}/{}", e.namespace, e.name));
        self.record(
            Kind::Slice,
            if exists { "MODIFIED" } else { "ADDED" },
            e.to_json(),
        );
    }

    pub fn delete_slice(&self, e: &FakeSlice) {
        self.record(Kind::Slice, "DELETED", e.to_json());
    }

    /// Events the agent posted (events.k8s.io/v1 Event objects), oldest first.
    pub fn events(&self) -> Vec<Value> {
        self.shared.lock().events.clone()
    }

    /// Waits for a posted event satisfying `pred`.
    pub fn wait_event(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut g = self.shared.lock();
        loop {
            if let Some(e) = g.events.iter().find(|e| pred(e)) {
                return Ok(e.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "no matching event posted within {timeout:?}; posted: {:?}",
                    g.events
                );
            }
            g = self
                .shared
                .changed
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Request lines served so far (`GET /api/v1/pods?...`).
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// How many list (non-watch) requests for `path` were served.
    pub fn lists_of(&self, path: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| {
                r.starts_with(&format!("GET {path}"))
                    && !r.contains("watch=true")
                    && !r.contains("watch=1")
            })
            .count()
    }
}

impl Drop for FakeKubeApi {
    fn drop(&mut self) {
        self.stop();
    }
}

fn handle_conn(shared: &Shared, conn: TcpStream, epoch: u64) -> Result<()> {
    let conn = match &shared.tls {
        Some(tls) => tls.accept(conn)?,
        None => Conn::Plain(conn),
    };
    let mut r = BufReader::new(conn);
    while let Some(req) = read_request(&mut r)? {
        let w = r.get_mut();
        if let Some(token) = &shared.token {
            if req.authorization.as_deref() != Some(&format!("Bearer {token}")) {
                shared.lock().unauthorized += 1;
                let body = status(401, "Unauthorized", "Unauthorized");
                respond(w, 401, &body)?;
                continue;
            }
        }
        {
            let mut g = shared.lock();
            if g.epoch != epoch {
                return Ok(());
            }
            let q: Vec<String> = req.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
            g.requests
                .push(format!("{} {}?{}", req.method, req.path, q.join("&")));
        }
        let kind = match req.path.as_str() {
            "/api/v1/pods" => Some(Kind::Pod),
            "/api/v1/namespaces" => Some(Kind::Namespace),
            "/api/v1/services" => Some(Kind::Service),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Kind::Slice),
            p => match route_rules(shared, p) {
                Ok(kind) => kind,
                Err(body) => {
                    respond(w, 403, &body)?;
                    continue;
                }
            },
        };
        let node = req
            .query
            .get("fieldSelector")
            .and_then(|f| f.strip_prefix("spec.nodeName="))
            .map(str::to_string);
        match (req.method.as_str(), kind) {
            ("GET", Some(kind))
                if req
                    .query
                    .get("watch")
                    .is_some_and(|v| v == "true" || v == "1") =>
            {
                let since: u64 = req
                    .query
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let timeout = req
                    .query
                    .get("timeoutSeconds")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(300u64);
                // A watch that ended cleanly leaves the connection reusable (keep-alive).
                if !watch(shared, w, kind, node, since, timeout, epoch)? {
                    return Ok(());
                }
            }
            ("GET", Some(kind)) => {
                let mut g = shared.lock();
                let rv = g.rv.to_string();
                let items: Vec<Value> = g
                    .objects(kind)
                    .values()
                    .filter(|p| matches(p, kind, node.as_deref()))
                    .cloned()
                    .collect();
                let (list_kind, api_version) = kind.list();
                let body = json!({"kind": list_kind, "apiVersion": api_version,
                                  "metadata": {"resourceVersion": rv}, "items": items});
                drop(g);
                respond(w, 200, &body)?;
            }
            ("POST", None) | ("PATCH", None) if req.path.contains("/events") => {
                let mut ev: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
                if ev["metadata"]["name"].is_null() {
                    ev["metadata"]["name"] = json!(format!("ev-{}", shared.lock().events.len()));
                }
                shared.lock().events.push(ev.clone());
                shared.changed.notify_all();
                respond(w, if req.method == "POST" { 201 } else { 200 }, &ev)?;
            }
            _ => respond(
                w,
                404,
                &status(404, "NotFound", &format!("{} not served", req.path)),
            )?,
        }
    }
    Ok(())
}

/// `Ok(Some(Rule))` for a DestinationRule path of a served version, `Ok(None)` for anything
/// else (a 404 later), `Err(body)` for a 403 ([`FakeKubeApi::forbid_istio`]).
fn route_rules(shared: &Shared, path: &str) -> Result<Option<Kind>, Value> {
    let Some(version) = path
        .strip_prefix("/apis/networking.istio.io/")
        .and_then(|v| v.strip_suffix("/destinationrules"))
    else {
        return Ok(None);
    };
    let g = shared.lock();
    if g.istio_forbidden {
        let why = format!("destinationrules.networking.istio.io is forbidden: cannot list resource \"destinationrules\" in API group \"networking.istio.io\" ({version})");
        return Err(status(403, "Forbidden", &why));
    }
    Ok(g.istio_versions
        .iter()
        .any(|s| s == version)
        .then_some(Kind::Rule))
}

fn matches(obj: &Value, kind: Kind, node: Option<&str>) -> bool {
    match (kind, node) {
        (Kind::Pod, Some(n)) => obj["spec"]["nodeName"].as_str() == Some(n),
        _ => true,
    }
}

/// timeout, a stop, or the client going away. False when the server stopped mid-stream (the
/// connection is then dropped unterminated, as by a dying server).
fn watch(
    shared: &Shared,
    w: &mut impl Write,
    kind: Kind,
    node: Option<String>,
    since: u64,
    timeout_s: u64,
    epoch: u64,
) -> Result<bool> {
    write!(
        w,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )?;
    let deadline = Instant::now() + Duration::from_secs(timeout_s);
    let mut last = since;
    let mut g = shared.lock();
    if since < g.compacted {
        drop(g);
        let gone = status(
            410,
            "Expired",
            &format!("too old resource version: {since}"),
        );
        chunk(w, &json!({"type": "ERROR", "object": gone}))?;
        write!(w, "0\r\n\r\n")?;
        return Ok(true);
    }
    loop {
        if g.epoch != epoch {
            return Ok(false);
        }
        let out: Vec<Value> = g
            .log
            .iter()
            .filter(|c| c.rv > last && c.kind == kind && matches(&c.obj, kind, node.as_deref()))
            .map(|c| json!({"type": c.ty, "object": c.obj}))
            .collect();
        last = g.rv;
        drop(g);
        for ev in &out {
            chunk(w, ev)?;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            write!(w, "0\r\n\r\n")?;
            return Ok(true);
        }
        g = shared.lock();
        if g.rv == last && g.epoch == epoch {
            g = shared
                .changed
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}
