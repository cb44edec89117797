//! The metrics endpoint: `/metrics` (Prometheus text, from the pinned maps through the same
//! reader as the CLI, after a flush), `/healthz` (the process serves requests) and `/readyz`
//! (programs attached and pods enrolled; not while draining); and the health-only listener
//! (`--health-addr`: `/healthz` and `/readyz`, nothing else).
//!
//! Off the proxy's threads: both listeners are served by one thread of their own with its
//! own single-threaded runtime ([`spawn`]), so a slow or hostile client, or a render walking
//! 16k-entry maps, delays neither a proxied connection nor the heartbeat (which runs on the
//! proxy runtime: a stall there would make every pod fail open). Bounded: at most
//! [`MAX_CONNS`] connections per listener and [`MAX_CONNS_PER_CLIENT`] per client address
//! (more are closed at once, counted as `http_refused`), each at most
//! [`CONN_LIFETIME`] long and given [`HEADER_TIMEOUT`] to send its request head, and
//! `/metrics` is rendered at most once per [`MIN_RENDER`]: a scrape sooner gets the last
//! render (so a scrape is exact as of at most that long before it).
use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Method, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use sockmesh_common::peer::agent_counter;

use super::{prom, view};
use crate::{sys::lock::lock, telemetry::flush::Observer};

/// A client that sends no complete request head within this is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// No connection lasts longer than this, however slowly it reads.
pub const CONN_LIFETIME: Duration = Duration::from_secs(30);
/// Connections served at once per listener; more are closed as soon as they are accepted.
pub const MAX_CONNS: usize = 32;
/// Of those, how many one client address may hold: one slow client cannot take them all.
pub const MAX_CONNS_PER_CLIENT: usize = 8;
/// `/metrics` is rendered (with a flush) at most this often.
pub const MIN_RENDER: Duration = Duration::from_millis(250);

pub struct MetricsState {
    pub bpffs_dir: PathBuf,
    pub top_peers: usize,
    pub observer: Arc<Observer>,
    /// Programs attached and every pod enrolled; cleared when shutdown starts.
    pub ready: AtomicBool,
    /// The last `/metrics` answer and when it was rendered.
    pub last: Mutex<Option<(Instant, u16, Bytes)>>,
}

impl MetricsState {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
}

/// What a listener answers.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Endpoints {
    /// `/metrics`, `/healthz`, `/readyz`.
    All,
    /// `/healthz` and `/readyz` only (what a node address exposes by default).
    Health,
}

fn reply(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

const PROM_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

fn metrics(state: &MetricsState) -> Response<Full<Bytes>> {
    if let Some((at, status, body)) = lock(&state.last).as_ref() {
        if at.elapsed() < MIN_RENDER {
            return reply(*status, PROM_TEXT, body.clone());
        }
    }
    state.observer.flush();
    let (status, body) = match view::Snapshot::read(&state.bpffs_dir) {
        Ok(snap) => {
            let rows = view::peer_rows(&snap);
            let ready = state.ready.load(Ordering::SeqCst);
            (200, prom::render(&snap, &rows, state.top_peers, ready))
        }
        Err(e) => (500, format!("cannot read the maps: {e:#}\n")),
    };
    let body = Bytes::from(body);
    *lock(&state.last) = Some((Instant::now(), status, body.clone()));
    reply(status, PROM_TEXT, body)
}

fn route(
    state: &MetricsState,
    what: Endpoints,
    req: &Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(405, "text/plain", "only GET\n");
    }
    match req.uri().path() {
        "/metrics" if what == Endpoints::All => metrics(state),
        "/healthz" => reply(200, "text/plain", "ok\n"),
        "/readyz" if state.ready.load(Ordering::SeqCst) => reply(200, "text/plain", "ready\n"),
        "/readyz" => reply(503, "text/plain", "not ready\n"),
        _ if what == Endpoints::Health => reply(404, "text/plain", "try /healthz or /readyz\n"),
        _ => reply(404, "text/plain", "try /metrics, /healthz or /readyz\n"),
    }
}

/// Serves `listeners` on a thread of their own (a single-threaded runtime) until `cancel`.
pub fn spawn(
    listeners: Vec<(std::net::TcpListener, Endpoints)>,
    state: Arc<MetricsState>,
    cancel: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("sockmesh-http".into())
        .spawn(move || {
            rt.block_on(async move {
                let mut loops = tokio::task::JoinSet::new();
                for (l, what) in listeners {
                    match TcpListener::from_std(l) {
                        Ok(l) => {
                            loops.spawn(serve(l, what, state.clone(), cancel.clone()));
                        }
                        Err(e) => warn!(error = %e, "cannot serve an HTTP listener"),
                    }
                }
                while loops.join_next().await.is_some() {}
            })
        })
}

/// Serves one listener until `cancel`; each connection is a task of this thread's runtime,
/// at most [`MAX_CONNS`] at once, ended by `cancel` too.
async fn serve(
    listener: TcpListener,
    what: Endpoints,
    state: Arc<MetricsState>,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNS));
    let clients: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    loop {
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "http accept failed");
                    // Out of fds, most likely: give the proxy the next one, not this loop.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let client = ClientSlot::take(&clients, peer.ip());
        let (Ok(slot), Some(client)) = (slots.clone().try_acquire_owned(), client) else {
            debug!(%peer, "http: every connection slot (or this client's) taken; closing");
            state.observer.count(agent_counter::HTTP_REFUSED);
            continue;
        };
        let (state, cancel) = (state.clone(), cancel.clone());
        tokio::spawn(async move {
            let _slots = (slot, client);
            let svc_state = state.clone();
            let svc = service_fn(move |req| {
                let state = svc_state.clone();
                async move { Ok::<_, Infallible>(route(&state, what, &req)) }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { debug!(%peer, error = %e, "http connection ended") },
                _ = tokio::time::sleep(CONN_LIFETIME) => {
                    debug!(%peer, "http connection past its lifetime: closed");
                    state.observer.count(agent_counter::HTTP_EXPIRED);
                }
                _ = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
                }
            }
        });
    }
}

/// One of a client address's connection slots, given back on drop.
struct ClientSlot {
    clients: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl ClientSlot {
    fn take(clients: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<ClientSlot> {
        let mut c = lock(clients);
        let n = c.entry(ip).or_insert(0);
        if *n >= MAX_CONNS_PER_CLIENT {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            clients: clients.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut c = lock(&self.clients);
        if let Some(n) = c.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.ip);
            }
        }
    }
}

/// `--metrics-addr`: an address, or `off` (None).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<SocketAddr>);

pub fn parse_addr(s: &str) -> Result<MetricsAddr, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(MetricsAddr(None));
    }
    s.parse().map(|a| MetricsAddr(Some(a))).map_err(|_| {
        format!("'{s}' is not an address: use ip:port such as 127.0.0.1:15090, or off")
    })
}

/// Binds an HTTP listener (`flag` names it in the error) before anything is loaded, so a
/// taken port is a clean error.
pub fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr).map_err(|e| {
        anyhow::anyhow!("{flag} {addr}: cannot listen: {e}: pick a free address, or `{flag} off`")
    })?;
    l.set_nonblocking(true)?;
    Ok(l)
}
