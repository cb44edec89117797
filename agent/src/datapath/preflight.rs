//! Checks made before anything is loaded, each failing with one message that names what is
//! missing and how to fix it: privileges, kernel, bpffs, cgroup2, and a single owner per pin
//! directory.
use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Capabilities the agent needs: BPF (load programs, maps), NET_ADMIN (cgroup socket hooks,
/// SO_MARK), SYS_ADMIN (setns into pods, cgroup attach on older kernels).
const NEEDED_CAPS: [(u32, &str); 3] = [
    (39, "CAP_BPF"),
    (12, "CAP_NET_ADMIN"),
    (21, "CAP_SYS_ADMIN"),
];

/// Parse `CapEff:` from /proc/self/status text.
pub fn effective_caps(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

pub fn missing_caps(cap_eff: u64) -> Vec<&'static str> {
    NEEDED_CAPS
        .iter()
        .filter(|(bit, _)| cap_eff & (1u64 << bit) == 0)
        .map(|(_, n)| *n)
        .collect()
}

pub fn check_privileges() -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    let caps = effective_caps(&status).ok_or_else(|| anyhow!("no CapEff in /proc/self/status"))?;
    let missing = missing_caps(caps);
    if !missing.is_empty() {
        bail!(
            "missing capabilities {}: run sockmesh as root, or grant CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN",
            missing.join(", ")
        );
    }
    Ok(())
}

/// `6.18.44-fc-v595` -> (6, 18)
pub fn parse_kernel_release(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

pub fn check_kernel() -> Result<()> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    match parse_kernel_release(release.trim()) {
        // SO_NETNS_COOKIE (5.14) and bpf_get_netns_cookie in sock_ops (5.15).
        Some(v) if v >= (5, 15) => Ok(()),
        Some((a, b)) => bail!("kernel {a}.{b} is too old: sockmesh needs Linux 5.15 or newer"),
        None => bail!("cannot read the kernel version from /proc/sys/kernel/osrelease"),
    }
}

fn fs_magic(path: &Path) -> Option<i64> {
    let f = File::open(path).ok()?;
    // SAFETY: statfs is plain old data (integers only): all-zero bytes are a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: f is open; st is a valid out pointer.
    (unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) } == 0).then_some(st.f_type as i64)
}

/// The pin directory must sit on a bpf filesystem.
pub fn check_bpffs(dir: &Path) -> Result<()> {
    let mut probe = dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if fs_magic(&probe) != Some(BPF_FS_MAGIC) {
        bail!(
            "{} is not on a bpf filesystem: mount one with `mount -t bpf bpf /sys/fs/bpf` or pick --bpffs-dir under a bpffs mount",
            dir.display()
        );
    }
    Ok(())
}

/// The first cgroup2 mount point in /proc/self/mounts text.
pub fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir.replace("\\040", " ")))
    })
}

pub fn cgroup_root(flag: Option<&Path>) -> Result<PathBuf> {
    let dir = match flag {
        Some(p) => p.to_path_buf(),
        None => {
            let mounts =
                std::fs::read_to_string("/proc/self/mounts").context("read /proc/self/mounts")?;
            cgroup2_mount(&mounts).ok_or_else(|| {
                anyhow!("no cgroup2 filesystem is mounted: mount one (`mount -t cgroup2 none /sys/fs/cgroup`) or pass --cgroup-root")
            })?
        }
    };
    if fs_magic(&dir) != Some(CGROUP2_SUPER_MAGIC) {
        bail!(
            "{} is not a cgroup2 directory: pass --cgroup-root with a cgroup2 mount",
            dir.display()
        );
    }
    Ok(dir)
}

/// Where the agent keeps its per-pin-dir files (lock, handover control socket).
pub const RUN_DIR: &str = "/run/sockmesh";

/// `/run/sockmesh/<bpffs dir with / as _>.<ext>`: one name per pin directory.
pub fn run_path(bpffs_dir: &Path, ext: &str) -> PathBuf {
    let name: String = bpffs_dir
        .to_string_lossy()
        .chars()
        .map(|c| if c == '/' { '_' } else { c })
        .collect();
    Path::new(RUN_DIR).join(format!("{name}.{ext}"))
}

/// Holds an exclusive lock on a pin directory for the agent's lifetime, so two agents never
/// share one, and pins found with the lock free are known to be left by a dead agent. An
/// upgrade hands the lock's open file to the successor (SCM_RIGHTS): a flock belongs to the
/// open file, so the directory stays locked while either agent lives.
pub struct PinDirLock {
    file: File,
}

impl PinDirLock {
    /// A lock received from the agent being replaced (already held).
    pub fn adopt(fd: std::os::fd::OwnedFd) -> PinDirLock {
        PinDirLock { file: fd.into() }
    }

    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.file)
    }
}

pub fn lock_pin_dir(dir: &Path) -> Result<PinDirLock> {
    std::fs::create_dir_all(RUN_DIR).with_context(|| format!("create {RUN_DIR}"))?;
    let path = run_path(dir, "lock");
    let file = File::create(&path).with_context(|| format!("create {}", path.display()))?;
    // SAFETY: file is open; flock has no memory effects.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another sockmesh agent is running with --bpffs-dir {}: stop it, give this one another --bpffs-dir, or pass --takeover to take its sockets over (upgrade)",
            dir.display()
        );
    }
    Ok(PinDirLock { file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_from_status() {
        let status = "Name:\tx\nCapInh:\t0\nCapEff:\t000001ffffffffff\nCapBnd:\t0\n";
        let caps = effective_caps(status).expect("parsed");
        assert!(missing_caps(caps).is_empty());
        assert_eq!(
            missing_caps(0),
            vec!["CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"]
        );
        assert_eq!(missing_caps(1 << 39 | 1 << 21), vec!["CAP_NET_ADMIN"]);
        assert_eq!(effective_caps("nothing"), None);
    }

    #[test]
    fn kernel_release() {
        assert_eq!(parse_kernel_release("6.18.44-fc-v595"), Some((6, 18)));
        assert_eq!(parse_kernel_release("5.4.0"), Some((5, 4)));
        assert_eq!(parse_kernel_release("garbage"), None);
    }

    #[test]
    fn finds_cgroup2_mount() {
        let m = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount(m),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount("tmpfs /tmp tmpfs rw 0 0\n"), None);
    }
}
