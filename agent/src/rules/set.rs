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
//! 3. the Istio DestinationRule for the key's Service, if any (`istio/mod.rs` says why it
//!    sits here),
//! 4. every `[[rule]]` that matches the key, **from least to most specific**.
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
//!    Then the **identity** matchers (`ident_match.rs`), each the same way (exact >
//!    glob > absent; labels: more labels > fewer), in this order: the local `workload`,
//!    `labels`, `namespace`; then `service`, `peer_workload`, `peer_labels`,
//!    `peer_namespace`. A name is more specific than an address: `service` outranks
//!    `peer`;
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

use super::ident_match::{glob_match, IdentityMatch, IdentityRank, Subject};
use super::istio::{Applied, DestinationRules};
use super::knobs::{Knobs, Overrides};
use crate::identity::{Identities, Index};
use crate::policy::key::{Direction, PeerKey};
use crate::policy::table::PolicySource;
use crate::policy::PeerPolicy;
use crate::spec::{CidrSpec, PortRangeSpec};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Arc;

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

    #[cfg(test)]
    pub fn prefix(&self) -> u8 {
        self.prefix
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
    /// The identity matchers, local then peer.
    pub identity: IdentityRank,
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
    /// `service`, `peer_workload`, `namespace` ...: by name rather than address.
    pub identity: IdentityMatch,
    pub set: Overrides,
}

impl Rule {
    fn matches_canonical(&self, key: &PeerKey, ip: IpAddr, subject: &Subject) -> bool {
        self.direction.is_none_or(|d| d == key.direction)
            && self.ports.is_none_or(|p| p.contains(key.peer.port()))
            && self.peer.is_none_or(|c| c.contains(ip))
            && self.pod.as_ref().is_none_or(|p| p.matches(&key.pod))
            && self.identity.matches(subject)
    }

    pub fn specificity(&self) -> Specificity {
        Specificity {
            pod_kind: match &self.pod {
                None => 0,
                Some(p) if p.is_glob() => 1,
                Some(_) => 2,
            },
            pod_literal: self.pod.as_ref().map_or(0, PodPattern::literal_len),
            identity: self.identity.rank(),
            peer: self.peer.map_or(0, |c| c.prefix + 1),
            ports: self.ports.map_or(0, |p| 65_536 - p.width()),
            direction: self.direction.is_some(),
        }
    }

    #[cfg(test)]
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
    /// Whether any rule matches by identity (else no lookup is made).
    by_identity: bool,
}

impl PolicySet {
    /// No policy file: every key gets `base` (the flag defaults).
    pub fn new(base: Knobs) -> PolicySet {
        PolicySet {
            path: None,
            base,
            defaults: Overrides::default(),
            rules: Vec::new(),
            by_identity: false,
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
            by_identity: rules.iter().any(|r| !r.identity.is_empty()),
            rules,
        }
    }

    /// The file this set was read from, if any.
    #[cfg(test)]
    pub fn path(&self) -> Option<&std::path::Path> {
        self.path.as_deref()
    }

    /// The flag defaults this set builds on.
    #[cfg(test)]
    pub fn base(&self) -> &Knobs {
        &self.base
    }

    /// The file's `[defaults]` table.
    #[cfg(test)]
    pub fn defaults(&self) -> &Overrides {
        &self.defaults
    }

    /// The rules in the order they are applied: least specific first.
    #[cfg(test)]
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The rules that match `key`, in the order they are applied (the last one is
    /// the most specific). For logs: "policy for X from rules ...".
    pub fn matching<'a>(
        &'a self,
        key: &PeerKey,
        ids: &Index,
    ) -> impl Iterator<Item = &'a Rule> + 'a {
        let ip = key.peer.ip().to_canonical();
        let key = key.clone();
        let subject = if self.by_identity {
            subject(&key, ids)
        } else {
            Subject::default()
        };
        self.rules
            .iter()
            .filter(move |r| r.matches_canonical(&key, ip, &subject))
    }

    /// The knobs for `key`: flags, then `[defaults]`, then every matching rule from
    /// least to most specific, identity matchers asking `ids`.
    #[cfg(test)]
    pub fn resolve_knobs_with(&self, key: &PeerKey, ids: &Index) -> Knobs {
        self.resolve_layers(key, ids, None)
    }

    /// The knobs with a DestinationRule's between `[defaults]` and the rules.
    fn resolve_layers(&self, key: &PeerKey, ids: &Index, dr: Option<&Overrides>) -> Knobs {
        let mut knobs = self.base.clone();
        self.defaults.apply_to(&mut knobs);
        if let Some(dr) = dr {
            dr.apply_to(&mut knobs);
        }
        for rule in self.matching(key, ids) {
            rule.set.apply_to(&mut knobs);
        }
        knobs
    }

    /// [`PolicySet::resolve_knobs_with`] knowing no identity (every peer external).
    #[cfg(test)]
    pub fn resolve_knobs(&self, key: &PeerKey) -> Knobs {
        self.resolve_knobs_with(key, &Index::default())
    }

    #[cfg(test)]
    pub fn resolve(&self, key: &PeerKey) -> PeerPolicy {
        self.resolve_knobs(key).to_policy()
    }

    #[cfg(test)]
    pub fn resolve_with(&self, key: &PeerKey, ids: &Index) -> PeerPolicy {
        self.resolve_knobs_with(key, ids).to_policy()
    }

    /// The policy of `key` with the DestinationRules in force: a rule's knobs as a layer, and
    /// a peer whose endpoint the agent picks marked so (it stays on the proxy).
    pub fn resolve_with_rules(
        &self,
        key: &PeerKey,
        ids: &Index,
        drs: &DestinationRules,
    ) -> PeerPolicy {
        let applied = drs.lookup(key, ids);
        let dr = applied.as_ref().map(Applied::overrides);
        let mut p = self.resolve_layers(key, ids, dr.as_ref()).to_policy();
        p.endpoint_selection = applied.is_some_and(|a| a.picks_endpoints());
        p
    }

    /// A `PeerTable` policy source answering from this set and the identity index. After a
    /// reload, or when the index changes, give the table a new source so existing peers
    /// move to their new policy too.
    #[cfg(test)]
    pub fn source(self: Arc<Self>, ids: Identities) -> PolicySource<PeerKey> {
        self.source_with_rules(ids, DestinationRules::default())
    }

    /// [`PolicySet::source`] with DestinationRules: give the table a new one when they change.
    pub fn source_with_rules(
        self: Arc<Self>,
        ids: Identities,
        drs: DestinationRules,
    ) -> PolicySource<PeerKey> {
        Box::new(move |key| self.resolve_with_rules(key, &ids.read(), &drs))
    }
}

/// What the identity matchers see for `key`: outbound, the peer address's identity and the
/// Services it belongs to on that port; inbound, the client's identity (the port is the
/// pod's, not the client's, so no Service of the client's) and the Services that reach this
/// pod on the port it listens on.
pub fn subject(key: &PeerKey, ids: &Index) -> Subject {
    let (ip, port) = (key.peer.ip(), key.peer.port());
    match key.direction {
        Direction::Outbound => {
            let peer = ids.peer(ip, port);
            Subject {
                local: ids.local(&key.pod, None),
                services: peer.services.clone(),
                peer,
            }
        }
        Direction::Inbound => {
            let mut peer = ids.peer(ip, 0);
            peer.services.clear();
            let local = ids.local(&key.pod, Some(port));
            Subject {
                services: local.services.clone(),
                local,
                peer,
            }
        }
    }
}
