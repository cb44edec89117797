//! The agent's HTTP listeners (`--metrics-addr`, `--health-addr`): served on a thread of
//! their own, and offered to a successor, which serves on the very same sockets.
use std::{os::fd::OwnedFd, sync::Arc};

use tracing::{info, warn};

use crate::{
    events,
    handover::proto::{Kind, Offered},
    observe::{
        self,
        http::{Endpoints, MetricsState},
    },
    proxy::Shared,
};

/// Starts the HTTP thread for the metrics and health listeners (if any) and announces them.
pub fn serve_http(
    metrics: Option<std::net::TcpListener>,
    health: Option<std::net::TcpListener>,
    state: &Arc<MetricsState>,
    shared: &Shared,
) -> Option<std::thread::JoinHandle<()>> {
    let mut listeners = Vec::new();
    let mut announce = Vec::new();
    for (l, what, event) in [
        (metrics, Endpoints::All, "metrics_listening"),
        (health, Endpoints::Health, "health_listening"),
    ] {
        if let Some(l) = l {
            announce.push((event, l.local_addr().ok()));
            listeners.push((l, what));
        }
    }
    if listeners.is_empty() {
        return None;
    }
    match observe::http::spawn(listeners, state.clone(), shared.cancel.clone()) {
        Ok(h) => {
            for (event, addr) in announce {
                info!(addr = ?addr, event, "HTTP endpoint listening");
                events::emit(serde_json::json!({ "event": event, "addr": addr }));
            }
            Some(h)
        }
        Err(e) => {
            warn!(error = %e, "cannot serve metrics or health");
            None
        }
    }
}

/// Duplicates of the HTTP listeners, offered to a successor that asks for them.
pub fn http_offers(listeners: &[Option<&std::net::TcpListener>]) -> Vec<(Offered, OwnedFd)> {
    let mut out = Vec::new();
    for l in listeners.iter().flatten() {
        match (l.local_addr(), l.try_clone()) {
            (Ok(addr), Ok(dup)) => {
                let o = Offered {
                    netns_cookie: 0,
                    kind: Kind::Http,
                    addr,
                };
                out.push((o, OwnedFd::from(dup)));
            }
            (Err(e), _) | (_, Err(e)) => {
                warn!(error = %e, "an HTTP listener cannot be offered to a successor, which will bind its own")
            }
        }
    }
    out
}
