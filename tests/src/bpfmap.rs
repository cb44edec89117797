//! A pinned BPF map opened by path and written or walked with raw `bpf(2)` calls: for tests
//! that fill the agent's maps from outside (as another tool on the node could), without
//! linking a BPF library into the harness.
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;

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
    // SAFETY: attr is a zero-padded bpf_attr; the pointers in it outlive the call.
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

/// The bytes of a `#[repr(C)]` map key or value. Only for types without padding (every layout
/// in `sockmesh-common` is laid out so), or uninitialised bytes would reach the kernel.
pub fn bytes_of<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is Copy and, per the contract above, has no padding bytes.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
}

pub struct PinnedMap {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
}

impl PinnedMap {
    /// Opens the map pinned at `path`, whose keys and values are `key_size`/`value_size` bytes.
    pub fn open(path: &Path, key_size: usize, value_size: usize) -> io::Result<Self> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        let fd = bpf(BPF_OBJ_GET, Attr::new().u64_at(0, c.as_ptr() as u64))?;
        Ok(Self {
            // SAFETY: a new fd from the kernel that nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
            key_size,
            value_size,
        })
    }

    fn check(&self, key: &[u8], value: &[u8]) -> io::Result<()> {
        if key.len() != self.key_size || value.len() != self.value_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "key/value of {}/{} bytes for a map of {}/{}",
                    key.len(),
                    value.len(),
                    self.key_size,
                    self.value_size
                ),
            ));
        }
        Ok(())
    }

    /// `BPF_ANY` update: creates or replaces (an LRU map evicts to make room; a full plain
    /// hash refuses with E2BIG).
    pub fn update(&self, key: &[u8], value: &[u8]) -> io::Result<()> {
        self.check(key, value)?;
        let attr = Attr::new()
            .u32_at(0, self.fd.as_raw_fd() as u32)
            .u64_at(8, key.as_ptr() as u64)
            .u64_at(16, value.as_ptr() as u64);
        bpf(BPF_MAP_UPDATE_ELEM, attr).map(|_| ())
    }

    /// Deletes `key` (an error if it is not there).
    pub fn delete(&self, key: &[u8]) -> io::Result<()> {
        self.check(key, &vec![0u8; self.value_size])?;
        let attr = Attr::new()
            .u32_at(0, self.fd.as_raw_fd() as u32)
            .u64_at(8, key.as_ptr() as u64);
        bpf(BPF_MAP_DELETE_ELEM, attr).map(|_| ())
    }

    /// Whether `key` is in the map.
    pub fn contains(&self, key: &[u8]) -> io::Result<bool> {
        Ok(self.get(key)?.is_some())
    }

    /// The value of `key`, if it is in the map.
    pub fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let mut value = vec![0u8; self.value_size];
        self.check(key, &value)?;
        let attr = Attr::new()
            .u32_at(0, self.fd.as_raw_fd() as u32)
            .u64_at(8, key.as_ptr() as u64)
            .u64_at(16, value.as_mut_ptr() as u64);
        match bpf(BPF_MAP_LOOKUP_ELEM, attr) {
            Ok(_) => Ok(Some(value)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every key, walked with `BPF_MAP_GET_NEXT_KEY` (entries may change meanwhile: a snapshot
    /// good enough for counting). A walk longer than `max` keys (the kernel restarts it when the
    /// previous key was deleted under it) is an error rather than an endless loop.
    pub fn keys(&self, max: usize) -> io::Result<Vec<Vec<u8>>> {
        let mut keys: Vec<Vec<u8>> = Vec::new();
        while keys.len() <= max {
            let mut next = vec![0u8; self.key_size];
            // A null key asks for the first one.
            let prev = keys.last().map_or(0, |k| k.as_ptr() as u64);
            let attr = Attr::new()
                .u32_at(0, self.fd.as_raw_fd() as u32)
                .u64_at(8, prev)
                .u64_at(16, next.as_mut_ptr() as u64);
            match bpf(BPF_MAP_GET_NEXT_KEY, attr) {
                Ok(_) => keys.push(next),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other(format!("more than {max} keys")))
    }
}
