//! Per-socket state in the socket's own storage, and per-pod quotas on the maps that cannot
//! be keyed by the socket (see `sockmesh_common::quota`).
//!
//! `SM_SOCK_STORE` is a `BPF_MAP_TYPE_SK_STORAGE` map: an entry lives in its socket and goes
//! with it, with no capacity to share, so one pod's sockets never evict another's. The
//! kernel requires BTF for such a map and bpf-linker 0.10 leaves this object's BTF unusable
//! (see AYA-NOTES), so the agent creates the map itself with a BTF of its own and pins it
//! before loading this object; the definition here only names it (pinned by name, so the
//! loader takes the pinned map) and tells the verifier its type.
use aya_ebpf::{
    bindings::{bpf_map_def, bpf_map_type::BPF_MAP_TYPE_SK_STORAGE, BPF_SK_STORAGE_GET_F_CREATE},
    btf_maps::HashMap,
    cty::c_void,
    helpers::generated::bpf_sk_storage_get,
    macros::map,
};
use core::{
    cell::UnsafeCell,
    intrinsics::{atomic_xadd, AtomicOrdering},
    ptr::read_volatile,
};
use sockmesh_common::{counter, quota::at_quota, SocketEntry};

use crate::{
    maps::POD_QUOTA,
    util::{count, BPF_NOEXIST},
};

const EEXIST: i32 = 17;

/// `BPF_F_NO_PREALLOC`, which socket-local storage requires.
const BPF_F_NO_PREALLOC: u32 = 1;
/// Pinned by name: the loader takes the map the agent pinned under this name.
const PIN_BY_NAME: u32 = 1;

/// A classic definition of the socket-local storage map (see the module doc).
#[repr(transparent)]
pub struct SockStore(UnsafeCell<bpf_map_def>);

// SAFETY: the definition is read by the loader only; the programs pass its address to
// helpers, never write it.
unsafe impl Sync for SockStore {}

impl SockStore {
    const fn pinned() -> Self {
        SockStore(UnsafeCell::new(bpf_map_def {
            type_: BPF_MAP_TYPE_SK_STORAGE,
            key_size: 4,
            value_size: core::mem::size_of::<SocketEntry>() as u32,
            max_entries: 0,
            map_flags: BPF_F_NO_PREALLOC,
            id: 0,
            pinning: PIN_BY_NAME,
        }))
    }

    /// The socket's entry, created zeroed (`kind` 0: nothing remembered) if `create`.
    #[inline(always)]
    fn entry(&self, sk: *mut c_void, create: bool) -> Option<&mut SocketEntry> {
        let flags = if create {
            BPF_SK_STORAGE_GET_F_CREATE as u64
        } else {
            0
        };
        // SAFETY: the map pointer is this map's definition, which the loader relocates to the
        // map's fd; `sk` is a socket pointer the caller took from its program's context (the
        // verifier checks its type and refuses a possibly-null one); no initial value is
        // passed (a new entry is zeroed).
        let p =
            unsafe { bpf_sk_storage_get(self.0.get().cast(), sk, core::ptr::null_mut(), flags) };
        // SAFETY: a non-null result points at the socket's storage, `SocketEntry`-sized, live
        // while the socket is (longer than this program run), and plain integers valid for
        // any bytes. Every hook of a socket runs under the socket's lock or from its own
        // syscalls; two hooks of one socket racing could mix fields of two writes of the
        // same socket, nothing outside its entry.
        unsafe { (p as *mut SocketEntry).as_mut() }
    }

    /// What the programs remember about this socket, if anything.
    #[inline(always)]
    pub fn get(&self, sk: *mut c_void) -> Option<SocketEntry> {
        self.entry(sk, false).filter(|e| e.kind != 0).map(|e| *e)
    }

    /// Remember `value` for this socket. False if the kernel refused the storage (out of
    /// memory, or the socket is being freed).
    #[inline(always)]
    pub fn set(&self, sk: *mut c_void, value: &SocketEntry) -> bool {
        match self.entry(sk, true) {
            Some(e) => {
                *e = *value;
                true
            }
            None => false,
        }
    }
}

/// The storage itself; see the module doc.
#[map(name = "SM_SOCK_STORE")]
pub static SOCK_STORE: SockStore = SockStore::pinned();

/// Which of a pod's quotas.
#[derive(Clone, Copy)]
pub enum Quota {
    /// `SM_ORIG_TUPLE` entries.
    Origins,
    /// `SM_DNS_ORIG` entries.
    Dns,
    /// `SM_IN_BINDS` entries the bind hook made.
    Binds,
    /// `SM_FAST_SOCKS` entries.
    Fast,
}

/// The pod's live-entry counter of `which`; None for a pod the agent made no entry for (it
/// then has no quota: never refused, never counted).
#[inline(always)]
fn counter_of(netns: u64, which: Quota) -> Option<*mut i64> {
    let q = POD_QUOTA.get_ptr_mut(&netns)?;
    // SAFETY: only the field's address is taken (no read or reference): `q` is a live entry.
    Some(unsafe {
        match which {
            Quota::Origins => &raw mut (*q).origins,
            Quota::Dns => &raw mut (*q).dns,
            Quota::Binds => &raw mut (*q).binds,
            Quota::Fast => &raw mut (*q).fast,
        }
    })
}

/// Adds `n` to a counter atomically. Core offers the BPF target no atomic read-modify-write
/// (it has no compare-and-swap), but the BPF instruction set has an atomic add, which LLVM
/// emits for this intrinsic when the result is unused (as here).
#[inline(always)]
fn atomic_add(c: *mut i64, n: i64) {
    // SAFETY: `c` points at an aligned i64 of a live map entry (see `counter_of`): a plain
    // hash allocated per insert, so an element is not reused while a program holds it; the
    // programs only ever change it with this atomic add.
    let _ = unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(c, n) };
}

/// Take one entry of the pod's quota: false (counted against the pod) when it is at its quota.
/// Checked then added, not atomically: CPUs racing at the edge may each take one past it.
#[inline(always)]
pub fn take(netns: u64, which: Quota, quota: u32) -> bool {
    let Some(c) = counter_of(netns, which) else {
        return true;
    };
    // SAFETY: as in `atomic_add`; an aligned 8-byte load is a single BPF load, so it sees a
    // whole value, older or newer than a racing add.
    if at_quota(unsafe { read_volatile(c) }, quota) {
        count(
            netns,
            match which {
                Quota::Origins => counter::ORIGIN_QUOTA,
                Quota::Dns => counter::DNS_QUOTA,
                Quota::Binds => counter::BIND_QUOTA,
                Quota::Fast => counter::FAST_QUOTA,
            },
        );
        return false;
    }
    atomic_add(c, 1);
    true
}

/// Give back one entry of the pod's quota (its entry was deleted).
#[inline(always)]
pub fn give(netns: u64, which: Quota) {
    if let Some(c) = counter_of(netns, which) {
        atomic_add(c, -1);
    }
}

/// What became of an insert into a quota-counted map.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Yes,
    /// The pod is at its quota (counted against it).
    OverQuota,
    /// The map refused it (full: counted `map_full`).
    Full,
}

/// Insert or refresh `key` in `map`, one of the pod's `which` quota: a new key takes one
/// entry of the quota, a key already there is rewritten in place and takes none.
#[inline(always)]
pub fn insert_counted<K, V: Copy, const N: usize, const F: usize>(
    map: &HashMap<K, V, N, F>,
    key: &K,
    value: &V,
    netns: u64,
    which: Quota,
    quota: u32,
) -> Stored {
    if let Some(v) = map.get_ptr_mut(key) {
        // SAFETY: `v` points at a live element of a map allocated per insert (not reused
        // while this program holds it); `V` is plain integers, valid for any bytes. A racing
        // writer of the same key writes the same kind of value.
        unsafe { *v = *value };
        return Stored::Yes;
    }
    if !take(netns, which, quota) {
        return Stored::OverQuota;
    }
    match map.insert(key, value, BPF_NOEXIST) {
        Ok(()) => Stored::Yes,
        Err(e) => {
            give(netns, which);
            if e == -EEXIST && map.insert(key, value, 0).is_ok() {
                // Another CPU inserted the key meanwhile (and took the quota entry for it).
                return Stored::Yes;
            }
            count(netns, counter::MAP_FULL);
            Stored::Full
        }
    }
}

/// Delete `key`, giving its entry of the pod's quota back if it was there.
#[inline(always)]
pub fn remove_counted<K, V, const N: usize, const F: usize>(
    map: &HashMap<K, V, N, F>,
    key: &K,
    netns: u64,
    which: Quota,
) {
    if map.remove(key).is_ok() {
        give(netns, which);
    }
}
