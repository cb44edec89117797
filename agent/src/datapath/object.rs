//! Loading an object over the pin directory, and taking a map out of the loaded object, typed,
//! with an error that names it: the steps every part of the datapath that owns a map starts
//! with.
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use aya::{Ebpf, EbpfLoader};
use sockmesh_common::{map_names, peer};

/// A loader that finds (or creates and pins) every pinned map under `dir`. The maps are BTF
/// maps (`ebpf/src/maps.rs`), whose definitions in aya-ebpf 0.2 have no pinning flag, so each
/// one's pin is named here; a map an object does not declare is skipped by aya.
pub fn loader<'a>(dir: &Path) -> EbpfLoader<'a> {
    let mut l = EbpfLoader::new();
    l.default_map_pin_directory(dir);
    for name in map_names::ALL.into_iter().chain(peer::map_names::ALL) {
        l.map_pin_path(name, dir.join(name));
    }
    l
}

pub fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the object"))?;
    T::try_from(map).with_context(|| format!("map {name}"))
}
