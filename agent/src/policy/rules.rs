//! Policy rules: which knobs apply to which (pod, direction, peer), and how
//! overlapping rules combine. Pure: no I/O (the file format is in `file.rs`).
//!
//! # Layers
//!
//! The policy of a [`PeerKey`] is built in layers, each setting only the knobs it
//! names, later layers overriding earlier ones knob by knob:
//!
//! 1. the flag defaults (`--connect-timeout` ...; [`Knobs`]),
//! 2. the policy file's `[defaults]` table,
//! 3. every `[[rule]]` that matches the key, **from least to most specific**.
//!
//! So the most specific rule wins for each knob it sets, and a knob it does not
//! set comes from the next most specific rule that does (then `[defaults]`, then
//! the flags).
//!
//! # Specificity
//!
//! A rule's [`Specificity`] depends only on its matchers, never on the key. Two
//! rules are compared criterion by criterion, the first difference deciding:
//!
//! 1. **pod**: an exact pod (no `*`) > a glob > no `pod`; between two globs, the
//!    one with more literal (non-`*`) characters; between two exact ones, the
//!    longer (a full path beats a bare name);
//! 2. **peer**: a longer CIDR prefix > a shorter one > no `peer` (`0.0.0.0/0`
//!    still beats no `peer`: it excludes IPv6);
//! 3. **ports**: a narrower range > a wider one > no `ports` (a single port is a
//!    range of width 1);
//! 4. **direction**: given > not given;
//! 5. **ties: the rule later in the file wins** (is applied last), as with
//!    repeated keys in most config formats.
//!
//! Pod outranks peer: `pod = "shop-1"` beats `peer = "10.0.5.7/32"` for pod
//! shop-1 talking to 10.0.5.7, whichever comes first in the file.
//!
//! # Matching
//!
//! * `direction` — `outbound` or `inbound`.
//! * `pod` — matched against the netns path exactly as given to `--pod` when the
//!   pattern contains a `/`, otherwise against its last path component (the
//!   "name": `shop-1` for `/var/run/netns/shop-1`). `*` matches any run of
//!   characters (including `/`); every other character is literal.
//! * `peer` — a CIDR (`10.0.5.0/24`, `fd00::/8`; a bare address is a /32 or
//!   /128). An IPv4-mapped IPv6 peer (`::ffff:10.0.5.7`, as dual-stack sockets
//!   report IPv4 clients) is matched as the IPv4 address.
//! * `ports` — the key's port: the original destination port for outbound, the
//!   pod's listening port for inbound.

use super::adaptive::AdaptiveConfig;
use super::breaker::BreakerConfig;
use super::concurrency::ConcurrencyConfig;
use super::config::{
    parse_bandwidth, parse_duration, parse_rate, parse_size, parse_timeout, ParseError, PeerPolicy,
    RateLimit,
};
use super::table::PolicySource;
use super::timeouts::Timeouts;
use super::token_bucket::Rate;
use crate::config::{CidrSpec, PortRangeSpec};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Which way a connection goes, seen from the pod.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// The pod connects out; the peer is the original destination.
    Outbound,
    /// A client connects to the pod; the peer is the client.
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }

    /// `outbound` or `inbound` (exactly).
    pub fn parse(s: &str) -> Option<Direction> {
        match s {
            "outbound" => Some(Direction::Outbound),
            "inbound" => Some(Direction::Inbound),
            _ => None,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What per-peer state is keyed by: the `K` of `PeerTable<PeerKey>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// The pod's netns path, exactly as given to `--pod`.
    pub pod: Arc<str>,
    pub direction: Direction,
    /// Outbound: the original destination ip:port. Inbound: the client's ip, with
    /// the port the pod listens on (not the client's ephemeral port).
    pub peer: SocketAddr,
}

impl PeerKey {
    pub fn new(pod: impl Into<Arc<str>>, direction: Direction, peer: SocketAddr) -> PeerKey {
        PeerKey {
            pod: pod.into(),
            direction,
            peer,
        }
    }
}

macro_rules! knobs {
    ($( $(#[$doc:meta])* $name:ident : $ty:ty ),* $(,)?) => {
        /// Every per-peer knob, flat: the flag defaults, and what a key resolves to
        /// before it becomes a [`PeerPolicy`] ([`Knobs::to_policy`]). Flat, unlike
        /// `PeerPolicy`, so that e.g. a burst set on one layer survives until a
        /// later layer turns the rate on.
        #[derive(Clone, Debug, PartialEq)]
        pub struct Knobs {
            $( $(#[$doc])* pub $name: $ty, )*
        }

        /// The knobs one layer (`[defaults]` or a rule) sets; `None`: not named,
        /// left as the earlier layers had it.
        #[derive(Clone, Debug, Default, PartialEq)]
        pub struct Overrides {
            $( pub $name: Option<$ty>, )*
        }

        impl Overrides {
            /// Sets, on `knobs`, every knob this layer names.
            pub fn apply_to(&self, knobs: &mut Knobs) {
                $( if let Some(v) = &self.$name { knobs.$name = v.clone(); } )*
            }

            /// The names (file keys) of the knobs this layer sets, in [`KNOB_NAMES`]
            /// order.
            pub fn names(&self) -> Vec<&'static str> {
                let mut names = Vec::new();
                $( if self.$name.is_some() { names.push(stringify!($name)); } )*
                names
            }

            pub fn is_empty(&self) -> bool {
                self.names().is_empty()
            }
        }

        /// Every knob's name, as spelled in the policy file.
        pub const KNOB_NAMES: &[&str] = &[$( stringify!($name) ),*];
    };
}

knobs! {
    /// `None`: off.
    connect_timeout: Option<Duration>,
    /// `None`: off.
    idle_timeout: Option<Duration>,
    /// `None`: off.
    max_lifetime: Option<Duration>,
    /// `None`: off.
    dns_timeout: Option<Duration>,
    /// New connections per period; `None`: unlimited.
    conn_rate: Option<Rate>,
    /// Token-bucket capacity for `conn_rate`; `None`: one period's worth.
    conn_burst: Option<u64>,
    /// Concurrent connections; `None`: unlimited (and `queue` unused).
    max_conns: Option<u32>,
    /// Waiters allowed while `max_conns` are busy; 0: reject at once.
    queue: u32,
    /// Bytes per period, both directions together; `None`: unlimited.
    bandwidth: Option<Rate>,
    /// Token-bucket capacity in bytes for `bandwidth`; `None`: one period's worth.
    bandwidth_burst: Option<u64>,
    /// Consecutive connect failures that open the breaker; `None`: no breaker.
    breaker_failures: Option<u32>,
    /// How long an opened breaker stays open.
    breaker_open: Duration,
    /// Adaptive throttling's K; `None`: no adaptive throttling.
    adaptive_k: Option<f64>,
    /// Adaptive throttling's sliding window.
    adaptive_window: Duration,
}

impl Default for Knobs {
    /// The same values as [`PeerPolicy::default`] (and the flags' defaults).
    fn default() -> Self {
        let concurrency = ConcurrencyConfig::default();
        let breaker = BreakerConfig::default();
        let adaptive = AdaptiveConfig::default();
        let timeouts = Timeouts::default();
        Knobs {
            connect_timeout: timeouts.connect,
            idle_timeout: timeouts.idle,
            max_lifetime: timeouts.max_lifetime,
            dns_timeout: timeouts.dns,
            conn_rate: None,
            conn_burst: None,
            max_conns: None,
            queue: concurrency.max_queue,
            bandwidth: None,
            bandwidth_burst: None,
            breaker_failures: Some(breaker.failure_threshold),
            breaker_open: breaker.open_for,
            adaptive_k: Some(adaptive.k),
            adaptive_window: adaptive.window,
        }
    }
}

impl Knobs {
    /// The engine's form. Settings without a knob (the breaker's 10 % half-open
    /// start, the queue's CoDel 5 ms / 100 ms) take their defaults; a burst
    /// without its rate is ignored.
    pub fn to_policy(&self) -> PeerPolicy {
        let limit = |rate: Option<Rate>, burst: Option<u64>| {
            rate.map(|rate| RateLimit {
                rate,
                burst: burst.unwrap_or(rate.tokens()),
            })
        };
        PeerPolicy {
            timeouts: Timeouts {
                connect: self.connect_timeout,
                idle: self.idle_timeout,
                max_lifetime: self.max_lifetime,
                dns: self.dns_timeout,
            },
            conn_rate: limit(self.conn_rate, self.conn_burst),
            bandwidth: limit(self.bandwidth, self.bandwidth_burst),
            concurrency: self.max_conns.map(|max| ConcurrencyConfig {
                max_concurrent: max,
                max_queue: self.queue,
                ..ConcurrencyConfig::default()
            }),
            breaker: self.breaker_failures.map(|failures| BreakerConfig {
                failure_threshold: failures,
                open_for: self.breaker_open,
                ..BreakerConfig::default()
            }),
            adaptive: self.adaptive_k.map(|k| AdaptiveConfig {
                k,
                window: self.adaptive_window,
            }),
        }
    }
}

// ---------------------------------------------------------------------------
// Knob values: one parser per knob, shared by the flags and the policy file, so
// both accept exactly the same spellings and give the same errors.

const COUNT_EX: &str = "50, 1000";
const COUNT_OFF_EX: &str = "50, off";
const K_EX: &str = "2, 1.5, off";
const BURST_EX: &str = "20, 100";

fn value_error(kind: &'static str, input: &str, reason: &str, ex: &'static str) -> ParseError {
    ParseError {
        kind,
        input: input.to_string(),
        reason: reason.to_string(),
        example: ex,
    }
}

fn is_off(s: &str) -> bool {
    let s = s.trim();
    s.eq_ignore_ascii_case("off") || s.eq_ignore_ascii_case("none")
}

/// A timeout: a duration > 0, or `off`.
pub fn parse_timeout_knob(s: &str) -> Result<Option<Duration>, ParseError> {
    parse_timeout(s)
}

/// A duration that must be > 0 (breaker open time, windows, expiry).
pub fn parse_positive_duration(s: &str) -> Result<Duration, ParseError> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(value_error("duration", s, "must be > 0", "500ms, 15s, 2m"));
    }
    Ok(d)
}

/// A connection rate (`100/s`) or `off`.
pub fn parse_rate_knob(s: &str) -> Result<Option<Rate>, ParseError> {
    if is_off(s) {
        return Ok(None);
    }
    parse_rate(s).map(Some).map_err(|mut e| {
        e.example = "100/s, 6000/m, off";
        e
    })
}

/// A bandwidth (`10MiB/s`) or `off`.
pub fn parse_bandwidth_knob(s: &str) -> Result<Option<Rate>, ParseError> {
    if is_off(s) {
        return Ok(None);
    }
    parse_bandwidth(s).map(Some).map_err(|mut e| {
        e.example = "10MiB/s, 1.5MB/s, off";
        e
    })
}

/// A whole number in `min..=u32::MAX`.
pub fn parse_count(s: &str, min: u32) -> Result<u32, ParseError> {
    let t = s.trim();
    let err = |reason: &str| value_error("count", s, reason, COUNT_EX);
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err("expected a whole number"));
    }
    let n: u32 = t
        .parse()
        .map_err(|_| err(&format!("too large (at most {})", u32::MAX)))?;
    if n < min {
        return Err(err(&format!("must be at least {min}")));
    }
    Ok(n)
}

/// A whole number ≥ 1, or `off`.
pub fn parse_count_or_off(s: &str) -> Result<Option<u32>, ParseError> {
    if is_off(s) {
        return Ok(None);
    }
    parse_count(s, 1).map(Some).map_err(|mut e| {
        if e.reason == "must be at least 1" {
            e.reason = "must be at least 1; use off to disable".into();
        }
        e.example = COUNT_OFF_EX;
        e
    })
}

/// A connection burst: a whole number of connections ≥ 1.
pub fn parse_conn_burst(s: &str) -> Result<u64, ParseError> {
    let t = s.trim();
    let err = |reason: &str| value_error("burst", s, reason, BURST_EX);
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err("expected a whole number of connections"));
    }
    match t.parse::<u64>() {
        Ok(0) => Err(err("must be at least 1")),
        Ok(n) => Ok(n),
        Err(_) => Err(err("too large")),
    }
}

/// A bandwidth burst: a size ≥ 1 byte (`1MiB`, or a bare number of bytes).
pub fn parse_bandwidth_burst(s: &str) -> Result<u64, ParseError> {
    match parse_size(s)? {
        0 => Err(value_error(
            "size",
            s,
            "must be at least 1 byte",
            "64KiB, 1MiB",
        )),
        n => Ok(n),
    }
}

/// Adaptive throttling's K: a finite number ≥ 1, or `off`.
pub fn parse_adaptive_k(s: &str) -> Result<Option<f64>, ParseError> {
    if is_off(s) {
        return Ok(None);
    }
    let t = s.trim();
    let err = |reason: &str| value_error("K", s, reason, K_EX);
    // Digits and one optional fraction only: no `inf`, `nan`, exponents or signs.
    let plain = !t.is_empty()
        && t.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && t.bytes().filter(|&b| b == b'.').count() <= 1
        && !t.starts_with('.')
        && !t.ends_with('.');
    if !plain {
        return Err(err("expected a number such as 2 or 1.5"));
    }
    let k: f64 = t.parse().map_err(|_| err("expected a number"))?;
    if !(k.is_finite() && k >= 1.0) {
        return Err(err(
            "must be at least 1 (below 1 a healthy peer would be throttled); use off to disable",
        ));
    }
    Ok(Some(k))
}

/// Parses `raw` as the knob `name` and records it in `set`. `None` if `name` is
/// not a knob.
pub(crate) fn set_knob(
    set: &mut Overrides,
    name: &str,
    raw: &str,
) -> Option<Result<(), ParseError>> {
    fn put<T>(slot: &mut Option<T>, v: Result<T, ParseError>) -> Result<(), ParseError> {
        *slot = Some(v?);
        Ok(())
    }
    Some(match name {
        "connect_timeout" => put(&mut set.connect_timeout, parse_timeout_knob(raw)),
        "idle_timeout" => put(&mut set.idle_timeout, parse_timeout_knob(raw)),
        "max_lifetime" => put(&mut set.max_lifetime, parse_timeout_knob(raw)),
        "dns_timeout" => put(&mut set.dns_timeout, parse_timeout_knob(raw)),
        "conn_rate" => put(&mut set.conn_rate, parse_rate_knob(raw)),
        "conn_burst" => put(&mut set.conn_burst, parse_conn_burst(raw).map(Some)),
        "max_conns" => put(&mut set.max_conns, parse_count_or_off(raw)),
        "queue" => put(&mut set.queue, parse_count(raw, 0)),
        "bandwidth" => put(&mut set.bandwidth, parse_bandwidth_knob(raw)),
        "bandwidth_burst" => put(
            &mut set.bandwidth_burst,
            parse_bandwidth_burst(raw).map(Some),
        ),
        "breaker_failures" => put(&mut set.breaker_failures, parse_count_or_off(raw)),
        "breaker_open" => put(&mut set.breaker_open, parse_positive_duration(raw)),
        "adaptive_k" => put(&mut set.adaptive_k, parse_adaptive_k(raw)),
        "adaptive_window" => put(&mut set.adaptive_window, parse_positive_duration(raw)),
        _ => return None,
    })
}

// ---------------------------------------------------------------------------
// Matchers.

/// A `pod` matcher: see the module doc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPattern {
    pattern: String,
}

impl PodPattern {
    pub fn parse(s: &str) -> Result<PodPattern, String> {
        if s.trim().is_empty() {
            return Err(
                "empty pod pattern: give a netns path, a name, or a glob such as shop-*".into(),
            );
        }
        Ok(PodPattern {
            pattern: s.to_string(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    pub fn is_glob(&self) -> bool {
        self.pattern.contains('*')
    }

    pub fn matches(&self, pod: &str) -> bool {
        let subject = if self.pattern.contains('/') {
            pod
        } else {
            pod.rsplit('/').next().unwrap_or(pod)
        };
        glob_match(self.pattern.as_bytes(), subject.as_bytes())
    }

    fn literal_len(&self) -> usize {
        self.pattern.chars().filter(|&c| c != '*').count()
    }
}

/// `*` matches any run of bytes; everything else is literal. Linear-ish: the
/// classic single-backtrack-point algorithm, O(pattern × subject) worst case.
fn glob_match(pattern: &[u8], subject: &[u8]) -> bool {
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

/// A `peer` matcher: an address block.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `10.0.5.0/24`, `fd00::/8`, or a bare address. Host bits must be zero
    /// (`10.0.5.7/24` is an error suggesting `10.0.5.0/24`): a rule's reader should
    /// not have to wonder which was meant. An IPv4-mapped IPv6 block
    /// (`::ffff:10.0.0.0/104`) is read as the IPv4 block.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let spec = CidrSpec::parse(s)?;
        let (addr, prefix) = match spec.addr {
            IpAddr::V6(v6) if spec.prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), spec.prefix - 96),
                None => (spec.addr, spec.prefix),
            },
            addr => (addr, spec.prefix),
        };
        let cidr = Cidr { addr, prefix };
        let network = cidr.network();
        if network != addr {
            return Err(format!(
                "'{}' has host bits set: write {}/{}",
                s.trim(),
                network,
                prefix
            ));
        }
        Ok(cidr)
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    fn network(&self) -> IpAddr {
        mask(self.addr, self.prefix)
    }

    /// Whether `ip` (already canonical: IPv4-mapped addresses as IPv4) is inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                mask(ip, self.prefix) == self.addr
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

/// A `ports` matcher: an inclusive range (a single port is `lo == hi`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    /// `5432` or `8000-8100`; ports 1-65535.
    pub fn parse(s: &str) -> Result<PortRange, String> {
        let spec = PortRangeSpec::parse(s)?;
        Ok(PortRange {
            lo: spec.lo,
            hi: spec.hi,
        })
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }

    /// How many ports the range covers.
    pub fn width(&self) -> u32 {
        u32::from(self.hi) - u32::from(self.lo) + 1
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// How specific a rule is; greater is more specific. Field order is the
/// comparison order (see the module doc).
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Specificity {
    /// 0: no `pod`; 1: a glob; 2: exact.
    pub pod_kind: u8,
    /// Literal (non-`*`) characters in the pod pattern.
    pub pod_literal: usize,
    /// 0: no `peer`; else the prefix length + 1.
    pub peer: u8,
    /// 0: no `ports`; else 65 536 minus the range's width (narrower is greater).
    pub ports: u32,
    pub direction: bool,
}

/// One `[[rule]]`: matchers (all optional; an absent one matches everything) and
/// the knobs it sets.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// The `name` key, if given.
    pub name: Option<String>,
    /// 1-based position among the file's rules (the tie-breaker).
    pub number: usize,
    /// Line of the rule's `[[rule]]` header (1-based; 0 if not from a file).
    pub line: usize,
    pub direction: Option<Direction>,
    pub pod: Option<PodPattern>,
    pub peer: Option<Cidr>,
    pub ports: Option<PortRange>,
    pub set: Overrides,
}

impl Rule {
    pub fn matches(&self, key: &PeerKey) -> bool {
        self.matches_canonical(key, key.peer.ip().to_canonical())
    }

    fn matches_canonical(&self, key: &PeerKey, ip: IpAddr) -> bool {
        self.direction.is_none_or(|d| d == key.direction)
            && self.ports.is_none_or(|p| p.contains(key.peer.port()))
            && self.peer.is_none_or(|c| c.contains(ip))
            && self.pod.as_ref().is_none_or(|p| p.matches(&key.pod))
    }

    pub fn specificity(&self) -> Specificity {
        Specificity {
            pod_kind: match &self.pod {
                None => 0,
                Some(p) if p.is_glob() => 1,
                Some(_) => 2,
            },
            pod_literal: self.pod.as_ref().map_or(0, PodPattern::literal_len),
            peer: self.peer.map_or(0, |c| c.prefix + 1),
            ports: self.ports.map_or(0, |p| 65_536 - p.width()),
            direction: self.direction.is_some(),
        }
    }

    /// `rule #3 "payments db" (line 12)`, for logs and errors.
    pub fn label(&self) -> String {
        let mut s = format!("rule #{}", self.number);
        if let Some(name) = &self.name {
            s.push_str(&format!(" {name:?}"));
        }
        if self.line > 0 {
            s.push_str(&format!(" (line {})", self.line));
        }
        s
    }
}

/// A parsed policy: flag defaults, the file's `[defaults]`, and its rules. Cheap to
/// share (`Arc<PolicySet>`); immutable once built.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicySet {
    path: Option<PathBuf>,
    base: Knobs,
    defaults: Overrides,
    /// Sorted least to most specific; equal ones in file order.
    rules: Vec<Rule>,
}

impl PolicySet {
    /// No policy file: every key gets `base` (the flag defaults).
    pub fn new(base: Knobs) -> PolicySet {
        PolicySet {
            path: None,
            base,
            defaults: Overrides::default(),
            rules: Vec::new(),
        }
    }

    /// From already-validated parts (the file parser's output, or tests). `rules`
    /// in file order; their `number`s decide ties.
    pub fn from_parts(
        path: Option<PathBuf>,
        base: Knobs,
        defaults: Overrides,
        mut rules: Vec<Rule>,
    ) -> PolicySet {
        // Stable sort on (specificity, number): equal specificity keeps file order,
        // so the later rule is applied last and wins.
        rules.sort_by_key(|r| (r.specificity(), r.number));
        PolicySet {
            path,
            base,
            defaults,
            rules,
        }
    }

    /// The file this set was read from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The flag defaults this set builds on.
    pub fn base(&self) -> &Knobs {
        &self.base
    }

    /// The file's `[defaults]` table.
    pub fn defaults(&self) -> &Overrides {
        &self.defaults
    }

    /// The rules in the order they are applied: least specific first.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The rules that match `key`, in the order they are applied (the last one is
    /// the most specific). For logs: "policy for X from rules ...".
    pub fn matching(&self, key: &PeerKey) -> impl Iterator<Item = &Rule> + '_ {
        let ip = key.peer.ip().to_canonical();
        let key = key.clone();
        self.rules
            .iter()
            .filter(move |r| r.matches_canonical(&key, ip))
    }

    /// The knobs for `key`: flags, then `[defaults]`, then every matching rule from
    /// least to most specific.
    pub fn resolve_knobs(&self, key: &PeerKey) -> Knobs {
        let mut knobs = self.base.clone();
        self.defaults.apply_to(&mut knobs);
        for rule in self.matching(key) {
            rule.set.apply_to(&mut knobs);
        }
        knobs
    }

    pub fn resolve(&self, key: &PeerKey) -> PeerPolicy {
        self.resolve_knobs(key).to_policy()
    }

    /// A `PeerTable` policy source answering from this set. After a reload, give
    /// the table the new set's source (`table.set_source(handle.current().source())`)
    /// so existing peers move to the new policy too.
    pub fn source(self: Arc<Self>) -> PolicySource<PeerKey> {
        Box::new(move |key| self.resolve(key))
    }
}
