//! `SM_SOCK_STORE`, the programs' per-socket state: socket-local storage
//! (`BPF_MAP_TYPE_SK_STORAGE`), created here rather than by the loader.
//!
//! Why here: the kernel refuses to create socket-local storage without BTF describing its
//! key and value, and the object's own BTF is unusable (bpf-linker 0.10 leaves aya-log's union
//! names unsanitized, so the loader drops it; see AYA-NOTES). So the agent loads a BTF of
//! three types of its own (the key, an `int`; the value, `unsigned char[N]` with N the size of
//! `SocketEntry`), creates the map with it and pins it under the map's name before loading the
//! object, whose definition is pinned by name: the loader then takes this map instead of
//! creating one. An existing pin (a restart on the same pins) is kept as it is.
use std::{
    io,
    os::fd::{FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, Result};
use aya::maps::MapData;
use sockmesh_common::{map_names, SocketEntry};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_BTF_LOAD: libc::c_long = 18;
const BPF_MAP_TYPE_SK_STORAGE: u32 = 24;
const BPF_F_NO_PREALLOC: u32 = 1;

const BTF_KIND_INT: u32 = 1;
const BTF_KIND_ARRAY: u32 = 3;
const BTF_INT_SIGNED: u32 = 1;
/// Type ids in [`btf`] (0 is `void`).
const KEY_TYPE: u32 = 1;
const VALUE_TYPE: u32 = 3;

/// Creates and pins the storage map in `dir` unless it is pinned there already.
pub fn ensure_pinned(dir: &Path) -> Result<()> {
    let path = dir.join(map_names::SOCK_STORE);
    if path.exists() {
        return Ok(());
    }
    let value_size = std::mem::size_of::<SocketEntry>() as u32;
    let btf = load_btf(&btf(value_size)).context("load the socket storage's BTF")?;
    let map = create_map(&btf, value_size).context("create the socket storage map")?;
    let map = MapData::from_fd(map).context("open the socket storage map")?;
    map.pin(&path)
        .with_context(|| format!("pin {}", path.display()))?;
    Ok(())
}

fn push(out: &mut Vec<u8>, words: &[u32]) {
    for w in words {
        out.extend_from_slice(&w.to_ne_bytes());
    }
}

/// The raw BTF: `int` (key), `unsigned char`, `unsigned char[value_size]` (value).
fn btf(value_size: u32) -> Vec<u8> {
    let strings: &[u8] = b"\0int\0unsigned char\0";
    let (int_name, uchar_name) = (1, 5);
    let mut types = Vec::new();
    // [1] int: name, info (kind), size; then encoding | offset | bits.
    push(
        &mut types,
        &[int_name, BTF_KIND_INT << 24, 4, BTF_INT_SIGNED << 24 | 32],
    );
    // [2] unsigned char.
    push(&mut types, &[uchar_name, BTF_KIND_INT << 24, 1, 8]);
    // [3] unsigned char[value_size]: no name, info (kind), unused; element, index, count.
    push(
        &mut types,
        &[0, BTF_KIND_ARRAY << 24, 0, 2, KEY_TYPE, value_size],
    );
    let mut out = Vec::new();
    // Header: magic, version 1, flags 0, header length; type and string sections.
    out.extend_from_slice(&0xeb9f_u16.to_ne_bytes());
    out.extend_from_slice(&[1, 0]);
    push(
        &mut out,
        &[
            24,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ],
    );
    out.extend_from_slice(&types);
    out.extend_from_slice(strings);
    out
}

/// `union bpf_attr` as BPF_BTF_LOAD reads it (the rest of the union zeroed).
#[repr(C)]
#[derive(Default)]
struct BtfLoadAttr {
    btf: u64,
    btf_log_buf: u64,
    btf_size: u32,
    btf_log_size: u32,
    btf_log_level: u32,
    _rest: [u32; 27],
}

/// `union bpf_attr` as BPF_MAP_CREATE reads it (the rest zeroed).
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
    map_ifindex: u32,
    btf_fd: u32,
    btf_key_type_id: u32,
    btf_value_type_id: u32,
    _rest: [u32; 19],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a live, exclusively borrowed `bpf_attr` prefix followed by zeroes,
    // of the size passed; the kernel reads (and for logs writes) only within it and the
    // buffers it points to, which the caller keeps alive across the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a non-negative return of these commands is a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn load_btf(raw: &[u8]) -> Result<OwnedFd> {
    let mut log = vec![0u8; 4096];
    let mut attr = BtfLoadAttr {
        btf: raw.as_ptr() as u64,
        btf_log_buf: log.as_mut_ptr() as u64,
        btf_size: raw.len() as u32,
        btf_log_size: log.len() as u32,
        btf_log_level: 1,
        ..Default::default()
    };
    bpf(BPF_BTF_LOAD, &mut attr).map_err(|e| {
        let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
        anyhow::anyhow!("{e}: {}", String::from_utf8_lossy(&log[..end]).trim())
    })
}

fn create_map(btf: &OwnedFd, value_size: u32) -> Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let mut name = [0u8; 16];
    let n = map_names::SOCK_STORE.len().min(15);
    name[..n].copy_from_slice(&map_names::SOCK_STORE.as_bytes()[..n]);
    let mut attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_SK_STORAGE,
        key_size: 4,
        value_size,
        max_entries: 0,
        map_flags: BPF_F_NO_PREALLOC,
        map_name: name,
        btf_fd: btf.as_raw_fd() as u32,
        btf_key_type_id: KEY_TYPE,
        btf_value_type_id: VALUE_TYPE,
        ..Default::default()
    };
    Ok(bpf(BPF_MAP_CREATE, &mut attr)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_btf_has_a_header_three_types_and_their_names() {
        let b = btf(28);
        assert_eq!(&b[..2], &0xeb9f_u16.to_ne_bytes());
        let word = |i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let (type_len, str_off, str_len) = (word(12), word(16), word(20));
        assert_eq!(type_len, 4 * (4 + 4 + 6));
        assert_eq!(str_off, type_len);
        assert_eq!(b.len(), 24 + (type_len + str_len) as usize);
        // The array's element count is the value size.
        assert_eq!(word(24 + type_len as usize - 4), 28);
        assert!(b.ends_with(b"\0int\0unsigned char\0"));
    }
}
