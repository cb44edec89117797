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
