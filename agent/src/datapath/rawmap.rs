//! Any pinned map read as bytes, with the kernel's own description of it (type, key and value
//! sizes): what `sockmesh maps dump` decodes with the schema's layouts. Raw `bpf(2)` calls,
//! because aya's typed maps need the key and value types at compile time and this reader
//! walks whichever map it is named.
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// Large enough for the `union bpf_attr` variants used here; the tail stays zero.
#[repr(C, align(8))]
struct Attr([u8; 64]);

impl Attr {
    fn new() -> Self {
        Attr([0; 64])
    }
    fn u32_at(mut self, off: usize, v: u32) -> Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64_at(mut self, off: usize, v: u64) -> Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn bpf(cmd: libc::c_long, mut attr: Attr) -> io::Result<i64> {
    // SAFETY: attr is a zero-padded bpf_attr; every pointer in it points at a buffer of the
    // size the kernel will use (checked by the callers) that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &mut attr as *mut Attr,
            std::mem::size_of::<Attr>() as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// What the kernel says about a map (`struct bpf_map_info`, the fields used here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawInfo {
    pub map_type: u32,
    pub key_size: usize,
    pub value_size: usize,
    pub max_entries: u32,
}

/// One entry: the key and, for a per-CPU map, one value per possible CPU (else exactly one).
#[derive(Debug, Clone)]
pub struct RawEntry {
    pub key: Vec<u8>,
    pub values: Vec<Vec<u8>>,
}

pub struct RawMap {
    fd: OwnedFd,
    pub info: RawInfo,
}

impl RawMap {
    pub fn open(path: &Path) -> Result<Self> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| anyhow!("{}: NUL in path", path.display()))?;
        let fd = bpf(BPF_OBJ_GET, Attr::new().u64_at(0, c.as_ptr() as u64))
            .with_context(|| format!("open {}", path.display()))?;
        // SAFETY: a new fd from the kernel that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // struct bpf_map_info: type, id, key_size, value_size, max_entries (u32 each) first;
        // the kernel fills at most the length asked for.
        let mut buf = [0u8; 20];
        let attr = Attr::new()
            .u32_at(0, fd.as_raw_fd() as u32)
            .u32_at(4, buf.len() as u32)
            .u64_at(8, buf.as_mut_ptr() as u64);
        bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
            .with_context(|| format!("{}: is it a BPF map?", path.display()))?;
        let word = |i: usize| u32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        let info = RawInfo {
            map_type: word(0),
            key_size: word(8) as usize,
            value_size: word(12) as usize,
            max_entries: word(16),
        };
        Ok(RawMap { fd, info })
    }

    /// Every entry, walked with `BPF_MAP_GET_NEXT_KEY`: a snapshot as good as bpftool's
    /// (entries may come and go meanwhile; one deleted under the walk is skipped). `cpus`
    /// is the number of possible CPUs for a per-CPU map, `None` for any other.
    pub fn entries(&self, cpus: Option<usize>) -> Result<Vec<RawEntry>> {
        // The kernel copies per-CPU values in 8-byte slots, one per possible CPU.
        let slot = match cpus {
            Some(_) => self.info.value_size.div_ceil(8) * 8,
            None => self.info.value_size,
        };
        let n = cpus.unwrap_or(1);
        // The walk restarts from the first key when the previous one was deleted under it;
        // bounded so a map churning faster than it is read cannot keep it going forever.
        let max = (self.info.max_entries as usize).saturating_mul(2).max(16);
        let mut out: Vec<RawEntry> = Vec::new();
        let mut prev: Option<Vec<u8>> = None;
        while out.len() <= max {
            let mut next = vec![0u8; self.info.key_size];
            // A null key asks for the first one.
            let prev_ptr = prev.as_ref().map_or(0, |k| k.as_ptr() as u64);
            let attr = Attr::new()
                .u32_at(0, self.fd.as_raw_fd() as u32)
                .u64_at(8, prev_ptr)
                .u64_at(16, next.as_mut_ptr() as u64);
            match bpf(BPF_MAP_GET_NEXT_KEY, attr) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
                Err(e) => return Err(e).context("walk the map's keys"),
            }
            let mut value = vec![0u8; slot * n];
            let attr = Attr::new()
                .u32_at(0, self.fd.as_raw_fd() as u32)
                .u64_at(8, next.as_ptr() as u64)
                .u64_at(16, value.as_mut_ptr() as u64);
            match bpf(BPF_MAP_LOOKUP_ELEM, attr) {
                Ok(_) => out.push(RawEntry {
                    key: next.clone(),
                    values: value
                        .chunks(slot)
                        .map(|c| c[..self.info.value_size].to_vec())
                        .collect(),
                }),
                // Deleted (or evicted) between the two calls.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e).context("read an entry"),
            }
            prev = Some(next);
        }
        bail!("the map changed faster than it could be read ({max} entries walked); try again")
    }
}
