//! The per-peer policy flags: global defaults for every knob, the table bounds,
//! and `--policy FILE`. Each flag has a `SOCKMESH_*` env fallback and takes the
//! same spellings as the policy file (`500ms`, `100/s`, `10MiB/s`, `off`), parsed
//! by the same functions. Flattened into `sockmesh run`.
//!
//! | flag | policy file key | default |
//! |---|---|---|
//! | `--connect-timeout` | `connect_timeout` | 3s |
//! | `--idle-timeout` | `idle_timeout` | 1h |
//! | `--max-conn-lifetime` | `max_lifetime` | off |
//! | `--dns-timeout` | `dns_timeout` | 2s |
//! | `--peer-conn-rate` | `conn_rate` | off |
//! | `--peer-conn-burst` | `conn_burst` | one period's worth |
//! | `--peer-max-conns` | `max_conns` | off |
//! | `--peer-max-queue` | `queue` | 128 |
//! | `--peer-bandwidth` | `bandwidth` | off |
//! | `--peer-bandwidth-burst` | `bandwidth_burst` | one period's worth |
//! | `--breaker-failures` | `breaker_failures` | 5 |
//! | `--breaker-open` | `breaker_open` | 15s |
//! | `--adaptive-k` | `adaptive_k` | 2 |
//! | `--adaptive-window` | `adaptive_window` | 2m |
//! | `--max-peers` | — | 16384 |
//! | `--peer-idle-expiry` | — | 5m |

use super::file::PolicyError;
use super::knobs::{
    parse_adaptive_k, parse_bandwidth_burst, parse_bandwidth_knob, parse_conn_burst, parse_count,
    parse_count_or_off, parse_positive_duration, parse_rate_knob, parse_timeout_knob, Knobs,
};
use super::reload::PolicyHandle;
use super::units::ParseError;
use crate::identity::names::{self, StaticName};
use crate::policy::table::TableConfig;
use crate::policy::token_bucket::Rate;
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

/// A flag value that may be `off` (`None`).
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct OrOff<T>(pub Option<T>);

#[derive(Args, Debug, Clone)]
#[command(
    next_help_heading = "Per-peer policy (flags set the defaults; --policy rules override them)"
)]
pub struct PolicyArgs {
    /// Policy file (TOML) with per-pod/peer/port rules overriding these defaults.
    /// Re-read on SIGHUP and when it changes; a bad file is rejected whole and the
    /// old policy stays. Format: docs/policy.md. Default: none (flags only).
    #[arg(long = "policy", value_name = "FILE", env = "SOCKMESH_POLICY")]
    pub policy_file: Option<PathBuf>,

    /// Names for address blocks (TOML `[[name]]` tables: cidr, service, workload,
    /// namespace), for peers the Kubernetes API does not describe or when running without
    /// --kube. Read at start. Format: docs/policy.md, "Peers by name". Default: none.
    #[arg(long = "peer-names", value_name = "FILE", env = "SOCKMESH_PEER_NAMES")]
    pub peer_names: Option<PathBuf>,

    /// Upstream connect must finish within this, else the client is reset, or
    /// `off`. 3s lets one lost SYN be retransmitted (1s RTO) and still connect.
    #[arg(long, env = "SOCKMESH_CONNECT_TIMEOUT", value_name = "DURATION|off",
          default_value = "3s", value_parser = timeout)]
    pub connect_timeout: OrOff<Duration>,

    /// Close both sides after this long with no byte either way, or `off`.
    #[arg(long, env = "SOCKMESH_IDLE_TIMEOUT", value_name = "DURATION|off",
          default_value = "1h", value_parser = timeout)]
    pub idle_timeout: OrOff<Duration>,

    /// Close connections gracefully after this long whatever the traffic (to
    /// rebalance), or `off`.
    #[arg(long, env = "SOCKMESH_MAX_CONN_LIFETIME", value_name = "DURATION|off",
          default_value = "off", value_parser = timeout)]
    pub max_conn_lifetime: OrOff<Duration>,

    /// A DNS query unanswered upstream this long gets SERVFAIL, or `off`. 2s is
    /// under the 5s resolver retry, so clients get an answer, not a timeout.
    #[arg(long, env = "SOCKMESH_DNS_TIMEOUT", value_name = "DURATION|off",
          default_value = "2s", value_parser = timeout)]
    pub dns_timeout: OrOff<Duration>,

    /// New connections per peer, token bucket (`100/s`, `6000/m`, `5/10s`), or
    /// `off`. Excess attempts are reset.
    #[arg(long, env = "SOCKMESH_PEER_CONN_RATE", value_name = "RATE|off",
          default_value = "off", value_parser = rate)]
    pub peer_conn_rate: OrOff<Rate>,

    /// Connection burst allowed above --peer-conn-rate (bucket size). Default: one
    /// period's worth of the rate (`100/s` → 100).
    #[arg(long, env = "SOCKMESH_PEER_CONN_BURST", value_name = "COUNT",
          value_parser = parse_conn_burst)]
    pub peer_conn_burst: Option<u64>,

    /// Concurrent connections per peer, or `off`; excess ones wait in a queue.
    #[arg(long, env = "SOCKMESH_PEER_MAX_CONNS", value_name = "COUNT|off",
          default_value = "off", value_parser = count_or_off)]
    pub peer_max_conns: OrOff<u32>,

    /// Connections allowed to wait for a --peer-max-conns slot (CoDel-timed,
    /// 5ms/100ms); 0 rejects at once.
    #[arg(long, env = "SOCKMESH_PEER_MAX_QUEUE", value_name = "COUNT",
          default_value = "128", value_parser = queue)]
    pub peer_max_queue: u32,

    /// Bytes per second per peer, both directions together (`10MiB/s`, `1.5MB/s`),
    /// or `off`. Shapes (delays) traffic, never drops it.
    #[arg(long, env = "SOCKMESH_PEER_BANDWIDTH", value_name = "SIZE/PERIOD|off",
          default_value = "off", value_parser = bandwidth)]
    pub peer_bandwidth: OrOff<Rate>,

    /// Bytes allowed in a burst above --peer-bandwidth (`1MiB`). Default: one
    /// period's worth of the bandwidth.
    #[arg(long, env = "SOCKMESH_PEER_BANDWIDTH_BURST", value_name = "SIZE",
          value_parser = parse_bandwidth_burst)]
    pub peer_bandwidth_burst: Option<u64>,

    /// Consecutive connect failures that open a peer's circuit breaker, or `off`.
    #[arg(long, env = "SOCKMESH_BREAKER_FAILURES", value_name = "COUNT|off",
          default_value = "5", value_parser = count_or_off)]
    pub breaker_failures: OrOff<u32>,

    /// How long an open breaker rejects a peer before probing it again.
    #[arg(long, env = "SOCKMESH_BREAKER_OPEN", value_name = "DURATION",
          default_value = "15s", value_parser = parse_positive_duration)]
    pub breaker_open: Duration,

    /// Adaptive throttling K (Google SRE): reject locally with probability
    /// (requests - K*accepts)/(requests+1). A number >= 1, or `off`.
    #[arg(long, env = "SOCKMESH_ADAPTIVE_K", value_name = "K|off",
          default_value = "2", value_parser = adaptive_k)]
    pub adaptive_k: OrOff<f64>,

    /// Adaptive throttling's sliding window.
    #[arg(long, env = "SOCKMESH_ADAPTIVE_WINDOW", value_name = "DURATION",
          default_value = "2m", value_parser = parse_positive_duration)]
    pub adaptive_window: Duration,

    /// Most (pod, direction, peer) entries tracked at once; beyond it the least
    /// recently used idle one is evicted. ~1 KiB each.
    #[arg(long, env = "SOCKMESH_MAX_PEERS", value_name = "COUNT",
          default_value = "16384", value_parser = max_peers)]
    pub max_peers: usize,

    /// Forget a peer's state after this long unused (never while it has
    /// connections, an open breaker or recent history).
    #[arg(long, env = "SOCKMESH_PEER_IDLE_EXPIRY", value_name = "DURATION",
          default_value = "5m", value_parser = parse_positive_duration)]
    pub peer_idle_expiry: Duration,
}

impl PolicyArgs {
    /// The flag defaults, flat: the base every policy file builds on.
    pub fn knobs(&self) -> Knobs {
        Knobs {
            connect_timeout: self.connect_timeout.0,
            idle_timeout: self.idle_timeout.0,
            max_lifetime: self.max_conn_lifetime.0,
            dns_timeout: self.dns_timeout.0,
            conn_rate: self.peer_conn_rate.0,
            conn_burst: self.peer_conn_burst,
            max_conns: self.peer_max_conns.0,
            queue: self.peer_max_queue,
            bandwidth: self.peer_bandwidth.0,
            bandwidth_burst: self.peer_bandwidth_burst,
            breaker_failures: self.breaker_failures.0,
            breaker_open: self.breaker_open,
            adaptive_k: self.adaptive_k.0,
            adaptive_window: self.adaptive_window,
        }
    }

    /// The policy of a peer no rule matches (before the file's `[defaults]`).
    /// Every value was validated by clap already; the `Result` leaves room for
    /// checks across flags.
    #[cfg(test)]
    pub fn defaults(&self) -> Result<crate::policy::PeerPolicy, String> {
        Ok(self.knobs().to_policy())
    }

    pub fn table_config(&self) -> TableConfig {
        TableConfig {
            max_peers: self.max_peers,
            idle_expiry: self.peer_idle_expiry,
        }
    }

    /// The live policy: the flags plus `--policy` (loaded now; an error is fatal at
    /// startup).
    pub fn policy_handle(&self) -> Result<PolicyHandle, PolicyError> {
        PolicyHandle::new(self.knobs(), self.policy_file.clone())
    }

    /// `--peer-names`, parsed (an error names the file, line and key).
    pub fn peer_names(&self) -> Result<Vec<StaticName>, String> {
        match &self.peer_names {
            Some(p) => names::load(p),
            None => Ok(Vec::new()),
        }
    }
}

fn timeout(s: &str) -> Result<OrOff<Duration>, ParseError> {
    parse_timeout_knob(s).map(OrOff)
}

fn rate(s: &str) -> Result<OrOff<Rate>, ParseError> {
    parse_rate_knob(s).map(OrOff)
}

fn bandwidth(s: &str) -> Result<OrOff<Rate>, ParseError> {
    parse_bandwidth_knob(s).map(OrOff)
}

fn count_or_off(s: &str) -> Result<OrOff<u32>, ParseError> {
    parse_count_or_off(s).map(OrOff)
}

fn adaptive_k(s: &str) -> Result<OrOff<f64>, ParseError> {
    parse_adaptive_k(s).map(OrOff)
}

fn queue(s: &str) -> Result<u32, ParseError> {
    parse_count(s, 0)
}

fn max_peers(s: &str) -> Result<usize, ParseError> {
    parse_count(s, 1).map(|n| n as usize)
}
