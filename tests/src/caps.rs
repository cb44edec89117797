//! A pod process as a container runtime starts it: with the runtime's default capabilities,
//! which include CAP_NET_RAW (enough to set any SO_MARK since Linux 5.17, and to open raw and
//! packet sockets) but not CAP_NET_ADMIN. The tests run as root with every capability; this
//! lowers them for the calling thread only (capabilities are per-thread on Linux), which is
//! why it is meant for the fresh thread [`crate::Pod::run`] makes.
use std::io;

/// The default set of containerd, CRI-O and Docker: CHOWN, DAC_OVERRIDE, FOWNER, FSETID,
/// KILL, SETGID, SETUID, SETPCAP, NET_BIND_SERVICE, NET_RAW, SYS_CHROOT, MKNOD, AUDIT_WRITE,
/// SETFCAP.
pub const CONTAINER_DEFAULT: &[u32] = &[0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31];
/// CAP_NET_RAW.
pub const NET_RAW: u32 = 13;
/// CAP_NET_ADMIN.
pub const NET_ADMIN: u32 = 12;

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Lowers the calling thread's effective and permitted capabilities to exactly `caps` (bit
/// numbers) and clears its inheritable set. Irreversible for the thread: call it on a thread
/// of its own.
pub fn restrict_thread_to(caps: &[u32]) -> io::Result<()> {
    let mut data = [Data::default(); 2];
    for &c in caps {
        let (word, bit) = ((c / 32) as usize, c % 32);
        data[word].effective |= 1 << bit;
        data[word].permitted |= 1 << bit;
    }
    let mut hdr = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    // SAFETY: a v3 header for the calling thread (pid 0) and the two data words v3 takes.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// [`restrict_thread_to`] the container default set.
pub fn become_container() -> io::Result<()> {
    restrict_thread_to(CONTAINER_DEFAULT)
}

/// Whether the calling thread has capability `cap` in its effective set.
pub fn has(cap: u32) -> io::Result<bool> {
    let mut data = [Data::default(); 2];
    let mut hdr = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    // SAFETY: as in `restrict_thread_to`; capget fills the two data words.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(data[(cap / 32) as usize].effective & (1 << (cap % 32)) != 0)
}

/// Capability names in the order of their numbers (linux/capability.h).
const CAP_NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// The number of `CAP_NAME`.
pub fn cap_number(name: &str) -> Option<u32> {
    let bare = name.strip_prefix("CAP_")?;
    CAP_NAMES.iter().position(|n| *n == bare).map(|i| i as u32)
}

/// The `CAP_*` names of the bits set in `mask` (a `/proc/PID/status` capability line).
pub fn cap_names(mask: u64) -> Vec<String> {
    (0..64)
        .filter(|b| mask & (1u64 << b) != 0)
        .map(|b| match CAP_NAMES.get(b as usize) {
            Some(n) => format!("CAP_{n}"),
            None => format!("CAP_{b}"),
        })
        .collect()
}

/// A capability set of a process: `which` is `CapEff`, `CapBnd`, ... of `/proc/PID/status`
/// (`pid` may be `self`).
pub fn of_process(pid: &str, which: &str) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(which)?.strip_prefix(':'))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| io::Error::other(format!("no {which} in /proc/{pid}/status")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(cap_number("CAP_BPF"), Some(39));
        assert_eq!(cap_number("CAP_NET_BIND_SERVICE"), Some(10));
        assert_eq!(cap_number("BPF"), None);
        assert_eq!(
            cap_names(1 << 21 | 1 << 38),
            vec!["CAP_SYS_ADMIN", "CAP_PERFMON"]
        );
        assert_eq!(cap_names(1 << NET_RAW), vec!["CAP_NET_RAW"]);
        assert!(of_process("self", "CapBnd").is_ok());
    }
}
