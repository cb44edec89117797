//! Reading the pinned maps directly, so the figures are there while the agent is down.
use std::path::Path;

use anyhow::{bail, Context, Result};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuHashMap};
use sockmesh_common::{
    counter,
    fast::{Verdict, VerdictKey},
    map_names,
    peer::{
        self, agent_counter, peer_counter, pod_refusal, AgentStats, PeerKernelStats, PeerKey,
        PeerNames, PeerState, PodMeta, PodRefused,
    },
    GlobalConfig, PodConfig, PodStats, SCHEMA_VERSION,
};

pub(super) fn open(dir: &Path, name: &str) -> Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "open {} (is the agent running with --bpffs-dir {}?)",
            path.display(),
            dir.display()
        )
    })?;
    Map::from_map_data(data).with_context(|| format!("map {}", path.display()))
}

pub fn read_config(dir: &Path) -> Result<GlobalConfig> {
    let cfg: Array<MapData, GlobalConfig> = open(dir, map_names::CONFIG)?.try_into()?;
    Ok(cfg.get(&0, 0)?)
}

/// One pod's kernel counters, summed over CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCounters {
    pub netns_cookie: u64,
    pub enrolled: bool,
    pub counters: [u64; counter::COUNT],
    /// What the agent wrote about the pod (its name), if anything.
    pub meta: Option<PodMeta>,
    /// What the agent's per-pod caps and shares refused it ([`pod_refusal`] indexes).
    pub refused: [u64; pod_refusal::COUNT],
}

impl PodCounters {}

/// Every pod with counters, enrolled now or not, after checking the schema version.
pub fn read_pod_counters(dir: &Path) -> Result<Vec<PodCounters>> {
    check_schema(dir)?;
    let pods: HashMap<MapData, u64, PodConfig> = open(dir, map_names::PODS)?.try_into()?;
    let stats: PerCpuHashMap<MapData, u64, PodStats> =
        open(dir, map_names::POD_STATS)?.try_into()?;
    let meta: HashMap<MapData, u64, PodMeta> = open(dir, peer::map_names::POD_META)?.try_into()?;
    let refused: HashMap<MapData, u64, PodRefused> =
        open(dir, peer::map_names::POD_REFUSED)?.try_into()?;
    let mut out = Vec::new();
    for entry in stats.iter() {
        let (cookie, per_cpu) = entry?;
        let mut sum = [0u64; counter::COUNT];
        for cpu in per_cpu.iter() {
            for (s, v) in sum.iter_mut().zip(cpu.counters.iter()) {
                *s = s.wrapping_add(*v);
            }
        }
        out.push(PodCounters {
            netns_cookie: cookie,
            enrolled: pods.get(&cookie, 0).is_ok(),
            counters: sum,
            meta: meta.get(&cookie, 0).ok(),
            refused: refused
                .get(&cookie, 0)
                .map(|r| r.counters)
                .unwrap_or_default(),
        });
    }
    out.sort_by_key(|p| p.netns_cookie);
    Ok(out)
}

/// Refuses maps of a schema this binary does not understand, naming both versions.
pub fn check_schema(dir: &Path) -> Result<()> {
    let cfg = read_config(dir)?;
    if cfg.schema_version != SCHEMA_VERSION {
        bail!(
            "{} holds maps of schema version {}, this sockmesh understands {}: use the matching sockmesh binary",
            dir.display(),
            cfg.schema_version,
            SCHEMA_VERSION
        );
    }
    Ok(())
}

/// One peer of one pod: the kernel's counters and the agent's state (either may be missing:
/// the kernel only sees outbound connects, the agent only what it proxied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRecord {
    pub key: PeerKey,
    pub kernel: [u64; peer_counter::COUNT],
    pub state: PeerState,
    /// Who the peer is, as the agent last resolved it.
    pub names: Option<PeerNames>,
    /// Outbound peers: their `SM_VERDICTS` entry now, (tier, whether the kernel opened the
    /// breaker), so readers show the tier the kernel applies, not the agent's last decision.
    pub live: Option<(u32, bool)>,
}

/// Every peer in `SM_PEER_STATE` or `SM_PEER_STATS`, sorted by key. Call after
/// [`check_schema`].
pub fn read_peers(dir: &Path) -> Result<Vec<PeerRecord>> {
    let kernel: PerCpuHashMap<MapData, PeerKey, PeerKernelStats> =
        open(dir, peer::map_names::PEER_STATS)?.try_into()?;
    let state: HashMap<MapData, PeerKey, PeerState> =
        open(dir, peer::map_names::PEER_STATE)?.try_into()?;
    let mut out: std::collections::BTreeMap<Vec<u8>, PeerRecord> = Default::default();
    let blank = |key: PeerKey| PeerRecord {
        key,
        kernel: [0; peer_counter::COUNT],
        state: PeerState::default(),
        names: None,
        live: None,
    };
    for entry in kernel.iter() {
        let (key, per_cpu) = entry?;
        let rec = out.entry(sort_key(&key)).or_insert_with(|| blank(key));
        for cpu in per_cpu.iter() {
            for (s, v) in rec.kernel.iter_mut().zip(cpu.counters.iter()) {
                *s = s.wrapping_add(*v);
            }
        }
    }
    for entry in state.iter() {
        let (key, v) = entry?;
        out.entry(sort_key(&key))
            .or_insert_with(|| blank(key))
            .state = v;
    }
    let names: HashMap<MapData, PeerKey, PeerNames> =
        open(dir, peer::map_names::PEER_NAMES)?.try_into()?;
    let verdicts: HashMap<MapData, VerdictKey, Verdict> =
        open(dir, map_names::VERDICTS)?.try_into()?;
    for rec in out.values_mut() {
        rec.names = names.get(&rec.key, 0).ok();
        if rec.key.direction == peer::direction::OUTBOUND {
            let key = VerdictKey {
                netns_cookie: rec.key.netns_cookie,
                peer: rec.key.peer,
                _pad: 0,
            };
            rec.live = verdicts
                .get(&key, 0)
                .ok()
                .map(|v| (v.tier, v.breaker_opened != 0));
        }
    }
    Ok(out.into_values().collect())
}

/// A stable order for peers: pod, direction, family, address, port.
fn sort_key(k: &PeerKey) -> Vec<u8> {
    let mut v = k.netns_cookie.to_be_bytes().to_vec();
    v.extend(k.direction.to_be_bytes());
    v.extend(k.peer.family.to_be_bytes());
    for w in k.peer.addr {
        v.extend(w.to_ne_bytes());
    }
    v.extend(u16::from_be(k.peer.port).to_be_bytes());
    v
}

/// Agent-wide counters (`agent_counter` indexes); zeros before any agent wrote them.
pub fn read_agent_counters(dir: &Path) -> Result<[u64; agent_counter::COUNT]> {
    let a: Array<MapData, AgentStats> = open(dir, peer::map_names::AGENT_STATS)?.try_into()?;
    Ok(a.get(&0, 0).map(|s| s.counters).unwrap_or_default())
}
