//! The metrics endpoint: `/metrics` (Prometheus text, from the pinned maps through the same
//! reader as the CLI, after a flush so a scrape is exact), `/healthz` (the process serves
//! requests) and `/readyz` (programs attached and pods enrolled; not while draining).
use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Method, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};

use super::{prom, view};
use crate::telemetry::flush::Observer;

/// A client that sends no complete request head within this is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

pub struct MetricsState {
    pub bpffs_dir: PathBuf,
    pub top_peers: usize,
    pub observer: Arc<Observer>,
    /// Programs attached and every pod enrolled; cleared when shutdown starts.
    pub ready: AtomicBool,
}

impl MetricsState {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
}

fn reply(status: u16, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn metrics(state: &MetricsState) -> Response<Full<Bytes>> {
    state.observer.flush();
    match view::Snapshot::read(&state.bpffs_dir) {
        Ok(snap) => {
            let rows = view::peer_rows(&snap);
            let ready = state.ready.load(Ordering::SeqCst);
            reply(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                prom::render(&snap, &rows, state.top_peers, ready),
            )
        }
        Err(e) => reply(500, "text/plain", format!("cannot read the maps: {e:#}\n")),
    }
}

fn route(state: &MetricsState, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(405, "text/plain", "only GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => metrics(state),
        "/healthz" => reply(200, "text/plain", "ok\n".into()),
        "/readyz" if state.ready.load(Ordering::SeqCst) => {
            reply(200, "text/plain", "ready\n".into())
        }
        "/readyz" => reply(503, "text/plain", "not ready\n".into()),
        _ => reply(
            404,
            "text/plain",
            "try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

/// Serves until `cancel`; each connection is a task on `tasks`, ended by `cancel` too.
pub async fn serve(
    listener: TcpListener,
    state: Arc<MetricsState>,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => { warn!(error = %e, "metrics accept failed"); continue; }
            },
        };
        let (state, cancel) = (state.clone(), cancel.clone());
        tasks.spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move {
                    // Map reads are a few syscalls: fine on a runtime thread.
                    Ok::<_, Infallible>(route(&state, &req))
                }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { debug!(%peer, error = %e, "metrics connection ended") },
                _ = cancel.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
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

/// Binds the metrics listener before anything is loaded, so a taken port is a clean error.
pub fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr).map_err(|e| {
        anyhow::anyhow!("--metrics-addr {addr}: cannot listen: {e}: pick a free address, or `--metrics-addr off`")
    })?;
    l.set_nonblocking(true)?;
    Ok(l)
}
