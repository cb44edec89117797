//! Field-by-field descriptions of every pinned map's key and value, for readers that only have
//! the bytes: `sockmesh maps list|dump` prints any pinned map with field names from these.
//!
//! Why, when the maps carry BTF (so `bpftool map dump` shows their fields): BTF names struct
//! fields but not what the schema knows beyond them: the names of the counters in each
//! counter array, addresses and ports in network order, enum-like bytes (direction, breaker,
//! last error). And maps pinned by an agent built before the maps carried BTF have none. The
//! descriptions are built from the `#[repr(C)]` types themselves (`offset_of!`, `size_of`),
//! and a test checks that each one covers its type byte for byte, so a layout change that
//! forgets its description fails the tests instead of printing wrong names.
use core::mem::size_of;

use crate::{Cidr, PortRange, SockAddr};

pub mod maps;
mod peer_state;
mod verdicts;

/// How a field's bytes read.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// Unsigned integers, native order.
    U8,
    U16,
    U32,
    U64,
    /// A u16 port in network order (as the kernel hands it to the programs).
    PortBe,
    /// A [`SockAddr`]: family, address and port (network order).
    SockAddr,
    /// `[u64; slots]` counters; index `i` is named `names[i]` (spare slots are not shown).
    Counters {
        names: &'static [&'static str],
        slots: usize,
    },
    /// A small integer (of `size` bytes) with names for its values.
    Named {
        size: usize,
        name: fn(u64) -> &'static str,
    },
    /// NUL-padded UTF-8 of `len` bytes.
    Text {
        len: usize,
    },
    /// `[PortRange; n]`, host order; `{0, 0}` slots are unused.
    PortRanges {
        n: usize,
    },
    /// `[Cidr; n]`, network order; slots with family 0 are unused.
    Cidrs {
        n: usize,
    },
    /// Explicit padding: covered, never shown.
    Pad {
        len: usize,
    },
}

impl Kind {
    pub const fn size(&self) -> usize {
        match *self {
            Kind::U8 => 1,
            Kind::U16 | Kind::PortBe => 2,
            Kind::U32 => 4,
            Kind::U64 => 8,
            Kind::SockAddr => size_of::<SockAddr>(),
            Kind::Counters { slots, .. } => 8 * slots,
            Kind::Named { size, .. } => size,
            Kind::Text { len } | Kind::Pad { len } => len,
            Kind::PortRanges { n } => n * size_of::<PortRange>(),
            Kind::Cidrs { n } => n * size_of::<Cidr>(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Field {
    pub name: &'static str,
    pub offset: usize,
    pub kind: Kind,
}

pub(crate) const fn f(name: &'static str, offset: usize, kind: Kind) -> Field {
    Field { name, offset, kind }
}

/// The kernel map types the pinned maps use (`bpf_map_type` values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Hash,
    Array,
    PerCpuHash,
    LruHash,
    LruPerCpuHash,
    RingBuf,
    /// Socket-local storage: entries live in the sockets and cannot be listed from outside.
    SkStorage,
}

impl MapKind {
    pub const fn bpf_type(self) -> u32 {
        match self {
            MapKind::Hash => 1,
            MapKind::Array => 2,
            MapKind::PerCpuHash => 5,
            MapKind::LruHash => 9,
            MapKind::LruPerCpuHash => 10,
            MapKind::RingBuf => 27,
            MapKind::SkStorage => 24,
        }
    }
    /// Whether userspace can walk its entries (a ring buffer has none; socket storage keys
    /// are sockets, reachable only through them).
    pub const fn listable(self) -> bool {
        !matches!(self, MapKind::RingBuf | MapKind::SkStorage)
    }
    pub const fn per_cpu(self) -> bool {
        matches!(self, MapKind::PerCpuHash | MapKind::LruPerCpuHash)
    }
    pub const fn name(self) -> &'static str {
        match self {
            MapKind::Hash => "hash",
            MapKind::Array => "array",
            MapKind::PerCpuHash => "percpu_hash",
            MapKind::LruHash => "lru_hash",
            MapKind::LruPerCpuHash => "lru_percpu_hash",
            MapKind::RingBuf => "ringbuf",
            MapKind::SkStorage => "sk_storage",
        }
    }
}

/// One pinned map: its name under the pin directory, kind, and key and value layouts.
#[derive(Clone, Copy, Debug)]
pub struct MapLayout {
    pub name: &'static str,
    pub kind: MapKind,
    pub what: &'static str,
    pub key_size: usize,
    pub key: &'static [Field],
    pub value_size: usize,
    pub value: &'static [Field],
}

pub(crate) const fn map(
    name: &'static str,
    kind: MapKind,
    what: &'static str,
    key: (usize, &'static [Field]),
    value: (usize, &'static [Field]),
) -> MapLayout {
    MapLayout {
        name,
        kind,
        what,
        key_size: key.0,
        key: key.1,
        value_size: value.0,
        value: value.1,
    }
}

#[cfg(test)]
mod tests;
