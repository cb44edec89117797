//! Taking a map out of the loaded object, typed, with an error that names it: the one step
//! every part of the datapath that owns a map starts with.
use anyhow::{anyhow, Context, Result};
use aya::Ebpf;

pub fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the object"))?;
    T::try_from(map).with_context(|| format!("map {name}"))
}
