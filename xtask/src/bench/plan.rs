//! What one bench run measures: the variants (the paths a connection can take) and how long
//! and how often. Every other part of the bench uses these, and they use none of it.

/// The paths a connection can take from a client pod to the server pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Direct,
    /// eBPF capture + the agent as deployed (`--kernel-relay auto`: splice, request/response
    /// connections in the kernel).
    Sockmesh,
    Iptables,
    Haproxy,
    /// eBPF capture + a second agent with `--kernel-relay off`: the splice relay, measured in
    /// the same run so what the in-kernel relay adds is a ratio, not a recollection.
    SockmeshSplice,
    /// eBPF capture + an agent of another build (`--baseline-bin`, e.g. main's), as deployed:
    /// a change to the datapath measured against what it replaces in the same run. Only
    /// with `--baseline-bin`.
    Baseline,
    /// eBPF capture + a third agent with `--fast-path off`: every connection proxied, beside
    /// `sockmesh` (`--fast-path auto`) in the same run, so what the kernel tier saves is a
    /// ratio.
    SockmeshProxy,
}

impl Variant {
    pub const ALL: [Variant; 7] = [
        Variant::Direct,
        Variant::Sockmesh,
        Variant::Iptables,
        Variant::Haproxy,
        Variant::SockmeshSplice,
        Variant::Baseline,
        Variant::SockmeshProxy,
    ];
    /// What a run measures unless told otherwise (the baseline needs a binary).
    pub const DEFAULT: [Variant; 6] = [
        Variant::Direct,
        Variant::Sockmesh,
        Variant::Iptables,
        Variant::Haproxy,
        Variant::SockmeshSplice,
        Variant::SockmeshProxy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Direct => "direct",
            Variant::Sockmesh => "sockmesh",
            Variant::Iptables => "iptables+agent",
            Variant::Haproxy => "haproxy",
            Variant::SockmeshSplice => "sockmesh-splice",
            Variant::Baseline => "sockmesh-baseline",
            Variant::SockmeshProxy => "sockmesh-proxy",
        }
    }

    /// The name `--variant` takes (the report's, without the `+agent`).
    pub fn flag(self) -> &'static str {
        match self {
            Variant::Iptables => "iptables",
            v => v.name(),
        }
    }

    /// Pod name suffix.
    pub fn short(self) -> &'static str {
        match self {
            Variant::Direct => "direct",
            Variant::Sockmesh => "mesh",
            Variant::Iptables => "ipt",
            Variant::Haproxy => "hap",
            Variant::SockmeshSplice => "splice",
            Variant::Baseline => "base",
            Variant::SockmeshProxy => "proxy",
        }
    }
}

/// How long and how often.
pub struct Plan {
    pub reps: usize,
    pub seconds: u64,
    pub connects: usize,
    pub scale_conns: usize,
    /// How long the scale step holds its connections open (the agent's CPU meanwhile is its
    /// idle sweep over them).
    pub scale_hold_secs: u64,
    /// ABBA pairs of rounds measuring what `--deny-raw-sockets` costs socket() (0 skips).
    pub raw_cost_pairs: usize,
}
