//! Reading the pinned maps directly, so the figures are there while the agent is down.
use std::path::Path;

use anyhow::{bail, Context, Result};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuHashMap};
use sockmesh_common::{counter, map_names, GlobalConfig, PodConfig, PodStats, SCHEMA_VERSION};

fn open(dir: &Path, name: &str) -> Result<Map> {
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
}

impl PodCounters {
    pub fn get(&self, idx: usize) -> u64 {
        self.counters.get(idx).copied().unwrap_or(0)
    }
}

/// Every pod with counters, enrolled now or not, after checking the schema version.
pub fn read_pod_counters(dir: &Path) -> Result<Vec<PodCounters>> {
    let cfg = read_config(dir)?;
    if cfg.schema_version != SCHEMA_VERSION {
        bail!(
            "{} holds maps of schema version {}, this sockmesh understands {}: use the matching sockmesh binary",
            dir.display(),
            cfg.schema_version,
            SCHEMA_VERSION
        );
    }
    let pods: HashMap<MapData, u64, PodConfig> = open(dir, map_names::PODS)?.try_into()?;
    let stats: PerCpuHashMap<MapData, u64, PodStats> =
        open(dir, map_names::POD_STATS)?.try_into()?;
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
        });
    }
    out.sort_by_key(|p| p.netns_cookie);
    Ok(out)
}
