//! `sockmesh maps list|dump`: any pinned map printed with field names, decoded with the
//! layouts in `sockmesh_common::layout` (the one schema), per CPU where the map is per-CPU.
//! `bpftool map dump` shows the same fields from the maps' BTF; this adds what BTF cannot say
//! (counter names, addresses, directions, breaker states) and reads pins that have no BTF
//! (left by an older agent).
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};
use sockmesh_common::{
    layout::{maps, Field, Kind, MapKind, MapLayout},
    Cidr, PortRange, SockAddr, SCHEMA_VERSION,
};

use crate::datapath::{
    nr_cpus,
    rawmap::{RawEntry, RawMap},
    stats::check_schema,
};

#[derive(Args, Debug, Clone)]
pub struct MapsArgs {
    #[command(subcommand)]
    pub command: MapsCommand,
}

#[derive(Subcommand, Debug, Clone)]
pub enum MapsCommand {
    /// Every map the schema knows: kind, key and value sizes, entries, what it holds.
    List(MapsCommon),
    /// Every entry of one pinned map, with field names (per CPU for per-CPU maps).
    Dump {
        /// The map's name under the pin directory, e.g. SM_POD_STATS (see `sockmesh maps list`).
        name: String,
        #[command(flatten)]
        common: MapsCommon,
    },
}

#[derive(Args, Debug, Clone)]
pub struct MapsCommon {
    /// Where the agent pinned its maps.
    #[arg(
        long,
        env = "SOCKMESH_BPFFS_DIR",
        default_value = "/sys/fs/bpf/sockmesh"
    )]
    pub bpffs_dir: PathBuf,
    /// Print JSON (the shape of `bpftool -j map dump`, with decoded fields).
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &MapsArgs) -> Result<()> {
    let out = match &args.command {
        MapsCommand::List(c) => list(&c.bpffs_dir, c.json)?,
        MapsCommand::Dump { name, common } => dump(&common.bpffs_dir, name, common.json)?,
    };
    print!("{out}");
    Ok(())
}

fn known() -> String {
    let names: Vec<&str> = maps::MAPS.iter().map(|m| m.name).collect();
    names.join(", ")
}

/// Opens `layout`'s map under `dir` and checks the kernel's sizes and type against the
/// schema, so a map of another layout is refused rather than decoded into wrong figures.
fn open(dir: &Path, layout: &MapLayout) -> Result<RawMap> {
    let path = dir.join(layout.name);
    if !path.exists() {
        bail!(
            "{} is not pinned (is the agent running with --bpffs-dir {}?)",
            path.display(),
            dir.display()
        );
    }
    let raw = RawMap::open(&path)?;
    let i = &raw.info;
    if i.map_type != layout.kind.bpf_type()
        || i.key_size != layout.key_size
        || (layout.kind != MapKind::RingBuf && i.value_size != layout.value_size)
    {
        bail!(
            "{} is a map of type {} with {}-byte keys and {}-byte values; schema version {} \
             expects a {} with {} and {}: use the sockmesh binary that pinned it",
            path.display(),
            i.map_type,
            i.key_size,
            i.value_size,
            SCHEMA_VERSION,
            layout.kind.name(),
            layout.key_size,
            layout.value_size
        );
    }
    Ok(raw)
}

fn entries(raw: &RawMap, layout: &MapLayout) -> Result<Vec<RawEntry>> {
    let cpus = if layout.kind.per_cpu() {
        Some(nr_cpus()?)
    } else {
        None
    };
    raw.entries(cpus)
}

pub fn list(dir: &Path, json: bool) -> Result<String> {
    check_schema(dir)?;
    let mut rows = Vec::new();
    for m in maps::MAPS {
        let path = dir.join(m.name);
        let count = if !m.kind.listable() || !path.exists() {
            None
        } else {
            Some(entries(&open(dir, m)?, m)?.len())
        };
        rows.push(json!({
            "name": m.name,
            "kind": m.kind.name(),
            "pinned": path.exists(),
            "key_size": m.key_size,
            "value_size": m.value_size,
            "entries": count,
            "holds": m.what,
        }));
    }
    if json {
        return Ok(format!("{}\n", Value::Array(rows)));
    }
    let mut out = format!(
        "{:<16} {:<16} {:>4} {:>6} {:>8}  HOLDS\n",
        "NAME", "KIND", "KEY", "VALUE", "ENTRIES"
    );
    for r in rows {
        let entries = match (&r["pinned"], &r["entries"]) {
            (Value::Bool(false), _) => "unpinned".to_string(),
            (_, Value::Number(n)) => n.to_string(),
            _ => "-".to_string(),
        };
        let _ = writeln!(
            out,
            "{:<16} {:<16} {:>4} {:>6} {:>8}  {}",
            r["name"].as_str().unwrap_or_default(),
            r["kind"].as_str().unwrap_or_default(),
            r["key_size"].as_u64().unwrap_or_default(),
            r["value_size"].as_u64().unwrap_or_default(),
            entries,
            r["holds"].as_str().unwrap_or_default()
        );
    }
    Ok(out)
}

pub fn dump(dir: &Path, name: &str, json: bool) -> Result<String> {
    let Some(layout) = maps::find(name) else {
        bail!(
            "unknown map '{name}': schema version {SCHEMA_VERSION} knows {}",
            known()
        );
    };
    if layout.kind == MapKind::RingBuf {
        bail!(
            "{name} is a ring buffer: a stream of events the agent consumes, with no entries \
             to dump (`sockmesh maps list` shows the maps that have them)"
        );
    }
    if layout.kind == MapKind::SkStorage {
        bail!(
            "{name} is socket-local storage: each entry lives in its socket and goes with it, \
             so it cannot be listed from outside (`sockmesh peers` and `pods` show what the \
             programs did with it)"
        );
    }
    check_schema(dir)?;
    let raw = open(dir, layout)?;
    let raw_entries = entries(&raw, layout)?;
    if json {
        let decoded: Vec<Value> = raw_entries
            .iter()
            .map(|e| decode_entry(layout, e))
            .collect();
        return Ok(format!("{}\n", Value::Array(decoded)));
    }
    // The text form follows the layout's field order (JSON objects here are sorted by name).
    let mut out = String::new();
    for e in &raw_entries {
        let _ = writeln!(out, "key: {}", text(layout.key, &e.key));
        if layout.kind.per_cpu() {
            for (cpu, v) in e.values.iter().enumerate() {
                let _ = writeln!(out, "  cpu{cpu}: {}", text(layout.value, v));
            }
        } else if let Some(v) = e.values.first() {
            let _ = writeln!(out, "  value: {}", text(layout.value, v));
        }
    }
    let _ = writeln!(out, "{name}: {} entries", raw_entries.len());
    Ok(out)
}

/// One entry as `bpftool -j` shapes it: `{"key", "value"}`, or `{"key", "values": [{"cpu",
/// "value"}]}` for a per-CPU map.
pub fn decode_entry(layout: &MapLayout, e: &RawEntry) -> Value {
    let key = decode(layout.key, &e.key);
    if layout.kind.per_cpu() {
        let values: Vec<Value> = e
            .values
            .iter()
            .enumerate()
            .map(|(cpu, v)| json!({"cpu": cpu, "value": decode(layout.value, v)}))
            .collect();
        json!({"key": key, "values": values})
    } else {
        let value = e
            .values
            .first()
            .map_or(Value::Null, |v| decode(layout.value, v));
        json!({"key": key, "value": value})
    }
}

/// Decodes `bytes` field by field; padding is left out. The sizes were checked against the
/// kernel's at open, and every layout covers its type (a test in common), so every field is
/// within `bytes`; a short buffer still decodes its fields as null rather than panicking.
pub fn decode(fields: &[Field], bytes: &[u8]) -> Value {
    let mut obj = Map::new();
    for f in fields {
        if matches!(f.kind, Kind::Pad { .. }) {
            continue;
        }
        let v = bytes
            .get(f.offset..f.offset + f.kind.size())
            .map_or(Value::Null, |b| field(f.kind, b));
        obj.insert(f.name.to_string(), v);
    }
    Value::Object(obj)
}

fn uint(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w[..b.len().min(8)].copy_from_slice(&b[..b.len().min(8)]);
    u64::from_ne_bytes(w)
}

fn words(b: &[u8]) -> [u32; 4] {
    let w = |i: usize| uint(&b[i * 4..i * 4 + 4]) as u32;
    [w(0), w(1), w(2), w(3)]
}

fn sockaddr(b: &[u8]) -> Value {
    let a = SockAddr {
        addr: words(&b[..16]),
        port: uint(&b[16..18]) as u16,
        family: uint(&b[18..20]) as u16,
    };
    a.to_std()
        .map_or(Value::Null, |s| Value::String(s.to_string()))
}

fn field(kind: Kind, b: &[u8]) -> Value {
    match kind {
        Kind::U8 | Kind::U16 | Kind::U32 | Kind::U64 => json!(uint(b)),
        Kind::PortBe => json!(u16::from_be(uint(b) as u16)),
        Kind::SockAddr => sockaddr(b),
        Kind::Counters { names, .. } => {
            let mut o = Map::new();
            for (i, n) in names.iter().enumerate() {
                o.insert(n.to_string(), json!(uint(&b[i * 8..i * 8 + 8])));
            }
            Value::Object(o)
        }
        Kind::Named { name, .. } => json!(name(uint(b))),
        Kind::Text { .. } => {
            let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
            json!(String::from_utf8_lossy(&b[..end]))
        }
        Kind::PortRanges { .. } => {
            let size = std::mem::size_of::<PortRange>();
            let ranges: Vec<Value> = b
                .chunks(size)
                .map(|c| (uint(&c[0..2]) as u16, uint(&c[2..4]) as u16))
                .filter(|&(lo, hi)| (lo, hi) != (0, 0))
                .map(|(lo, hi)| match lo == hi {
                    true => json!(lo.to_string()),
                    false => json!(format!("{lo}-{hi}")),
                })
                .collect();
            Value::Array(ranges)
        }
        Kind::Cidrs { .. } => {
            let size = std::mem::size_of::<Cidr>();
            let cidrs: Vec<Value> = b
                .chunks(size)
                .filter_map(|c| {
                    let family = uint(&c[32..34]) as u16;
                    let addr = SockAddr {
                        addr: words(&c[0..16]),
                        port: 0,
                        family,
                    };
                    let prefix: u32 = words(&c[16..32]).iter().map(|w| w.count_ones()).sum();
                    addr.to_std().map(|s| json!(format!("{}/{prefix}", s.ip())))
                })
                .collect();
            Value::Array(cidrs)
        }
        Kind::Pad { .. } => Value::Null,
    }
}

/// `a=1 b=x c{d=2 e=3}`: one line a person can scan, in the layout's order.
fn text(fields: &[Field], bytes: &[u8]) -> String {
    let mut parts = Vec::new();
    for f in fields {
        if matches!(f.kind, Kind::Pad { .. }) {
            continue;
        }
        let Some(b) = bytes.get(f.offset..f.offset + f.kind.size()) else {
            parts.push(format!("{}=-", f.name));
            continue;
        };
        match f.kind {
            Kind::Counters { names, .. } => {
                let inner: Vec<String> = names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| format!("{n}={}", uint(&b[i * 8..i * 8 + 8])))
                    .collect();
                parts.push(format!("{}{{{}}}", f.name, inner.join(" ")));
            }
            kind => parts.push(format!("{}={}", f.name, leaf(&field(kind, b)))),
        }
    }
    parts.join(" ")
}

fn leaf(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("[{}]", a.iter().map(leaf).collect::<Vec<_>>().join(",")),
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
#[path = "maps_tests.rs"]
mod tests;
