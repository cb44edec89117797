//! Kernel memory, as the scale step counts it per connection: the slab caches
//! (`/proc/slabinfo`: every socket, its inode, file and dentry, the BPF maps' elements and the
//! socket storage, all allocated from slabs), the TCP buffer pages (`/proc/net/sockstat`
//! `mem`), and what one BPF map says it uses (its fdinfo `memlock`, which since Linux 6.4 is
//! the map's real usage: a hash map without preallocation counts its live elements). Slabs
//! are machine-wide, so whatever else runs meanwhile is counted too; the parsers are pure.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{Context, Result};

/// Bytes per slab cache (its slabs' pages), by cache name.
pub type Slabs = BTreeMap<String, u64>;

/// Caches left out of the totals: inodes of `/proc/PID/fd/N`, made when a process lists
/// another's descriptors (`ss -p`, `lsof`, a test elsewhere on the machine) and kept as a
/// cache; with 100,000 sockets held such a listing adds ~800 bytes a connection that holding
/// a connection does not cost.
pub const NOT_COUNTED: [&str; 1] = ["proc_inode_cache"];

/// `/proc/slabinfo` (version 2.x): each cache's `num_slabs * pagesperslab * page size`.
pub fn parse_slabinfo(text: &str, page: u64) -> Slabs {
    text.lines()
        .filter(|l| !l.starts_with("slabinfo") && !l.starts_with('#'))
        .filter_map(|l| {
            let (head, slabdata) = l.split_once(": tunables")?;
            let f: Vec<&str> = head.split_whitespace().collect();
            let pages_per_slab: u64 = f.get(5)?.parse().ok()?;
            // `: slabdata <active_slabs> <num_slabs> <sharedavail>`
            let num_slabs: u64 = slabdata
                .split(": slabdata")
                .nth(1)?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((f.first()?.to_string(), num_slabs * pages_per_slab * page))
        })
        .collect()
}

/// TCP's buffer memory in pages (the `mem` field of sockstat's `TCP:` line).
pub fn parse_sockstat_tcp_pages(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let i = f.iter().position(|w| *w == "mem")?;
    f.get(i + 1)?.parse().ok()
}

/// The `memlock:` line of a BPF map's fdinfo, in bytes.
pub fn parse_memlock(fdinfo: &str) -> Option<u64> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

/// What the kernel uses at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub slabs: Slabs,
    pub tcp_buffer_pages: u64,
    /// The map's memlock, if one was asked for and could be read.
    pub map_bytes: Option<u64>,
}

impl Snapshot {
    pub fn take(map_pin: Option<&Path>) -> Result<Snapshot> {
        let page = page_size();
        let slabs = parse_slabinfo(
            &std::fs::read_to_string("/proc/slabinfo").context("read /proc/slabinfo")?,
            page,
        );
        let tcp_buffer_pages =
            parse_sockstat_tcp_pages(&std::fs::read_to_string("/proc/net/sockstat")?).unwrap_or(0);
        Ok(Snapshot {
            slabs,
            tcp_buffer_pages,
            map_bytes: map_pin.and_then(map_memlock),
        })
    }

    /// Every cache but [`NOT_COUNTED`].
    pub fn slab_total(&self) -> u64 {
        self.slabs
            .iter()
            .filter(|(k, _)| !NOT_COUNTED.contains(&k.as_str()))
            .map(|(_, v)| v)
            .sum()
    }
}

/// What grew from `before` to `after`: slab bytes in all (but [`NOT_COUNTED`]), the caches
/// that grew most (name, bytes; at most `top`, all caches), TCP buffer bytes and the map's
/// bytes.
#[derive(Clone, Debug, Default)]
pub struct Growth {
    pub slab_bytes: i64,
    pub top_caches: Vec<(String, i64)>,
    pub tcp_buffer_bytes: i64,
    pub map_bytes: Option<i64>,
}

pub fn growth(before: &Snapshot, after: &Snapshot, top: usize) -> Growth {
    let mut caches: Vec<(String, i64)> = after
        .slabs
        .iter()
        .map(|(k, &v)| {
            (
                k.clone(),
                v as i64 - *before.slabs.get(k).unwrap_or(&0) as i64,
            )
        })
        .collect();
    caches.sort_by_key(|(_, d)| -d);
    caches.truncate(top);
    Growth {
        slab_bytes: after.slab_total() as i64 - before.slab_total() as i64,
        top_caches: caches,
        tcp_buffer_bytes: (after.tcp_buffer_pages as i64 - before.tcp_buffer_pages as i64)
            * page_size() as i64,
        map_bytes: before
            .map_bytes
            .zip(after.map_bytes)
            .map(|(b, a)| a as i64 - b as i64),
    }
}

fn page_size() -> u64 {
    // SAFETY: a plain query.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// The memlock of the BPF map pinned at `pin` (opened with BPF_OBJ_GET, read from this
/// process's fdinfo of it).
fn map_memlock(pin: &Path) -> Option<u64> {
    const BPF_OBJ_GET: libc::c_long = 7;
    let path = CString::new(pin.as_os_str().as_bytes()).ok()?;
    // union bpf_attr for BPF_OBJ_GET: pathname (u64), bpf_fd, file_flags; the rest zero.
    let mut attr = [0u64; 8];
    attr[0] = path.as_ptr() as u64;
    // SAFETY: a zeroed bpf_attr whose pathname points at a live NUL-terminated string.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr) as u32,
        )
    };
    if fd < 0 {
        return None;
    }
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok();
    // SAFETY: the fd the kernel just returned, owned by nothing else.
    unsafe { libc::close(fd as i32) };
    parse_memlock(&info?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_slabinfo_sockstat_and_fdinfo() {
        let slab = "slabinfo - version: 2.1\n\
            # name            <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab> : tunables <limit> <batchcount> <sharedfactor> : slabdata <active_slabs> <num_slabs> <sharedavail>\n\
            TCPv6                 26     26   2432   13    8 : tunables    0    0    0 : slabdata      2      3      0\n\
            kmalloc-64          4096   4096     64   64    1 : tunables    0    0    0 : slabdata     64     64      0\n";
        let s = parse_slabinfo(slab, 4096);
        assert_eq!(s.get("TCPv6"), Some(&(3 * 8 * 4096)));
        assert_eq!(s.get("kmalloc-64"), Some(&(64 * 4096)));
        assert_eq!(s.len(), 2);
        let stat =
            "sockets: used 300\nTCP: inuse 5 orphan 0 tw 2 alloc 9 mem 17\nUDP: inuse 1 mem 0\n";
        assert_eq!(parse_sockstat_tcp_pages(stat), Some(17));
        let fdinfo = "pos:\t0\nflags:\t02000002\nmap_type:\t1\nmemlock:\t4198400\nmap_id:\t9\n";
        assert_eq!(parse_memlock(fdinfo), Some(4_198_400));
    }

    #[test]
    fn growth_is_after_minus_before() {
        let snap = |a: u64, b: u64, m| Snapshot {
            slabs: [
                ("a".to_string(), a),
                ("b".to_string(), b),
                ("proc_inode_cache".to_string(), a * 9),
            ]
            .into(),
            tcp_buffer_pages: 1,
            map_bytes: m,
        };
        let g = growth(&snap(100, 50, Some(10)), &snap(400, 40, Some(30)), 2);
        assert_eq!(g.slab_bytes, 290, "/proc's inodes not counted");
        assert_eq!(
            g.top_caches,
            vec![
                ("proc_inode_cache".to_string(), 2700),
                ("a".to_string(), 300)
            ],
            "but shown"
        );
        assert_eq!(g.tcp_buffer_bytes, 0);
        assert_eq!(g.map_bytes, Some(20));
        assert_eq!(
            growth(&snap(1, 1, None), &snap(1, 1, Some(3)), 1).map_bytes,
            None
        );
    }
}
