//! Attachment as bpf_links, made with the raw `bpf(2)` commands: aya 0.14 cannot turn every
//! cgroup link type into a pinnable `FdLink` (the sockopt one is missing), and the agent needs
//! all of them uniform: held by fd (detached when the agent exits) or pinned (kept). The same
//! command attaches `sk_lookup` to a network namespace.
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;

/// Large enough for every `union bpf_attr` variant used here; the kernel accepts any size up
/// to its own as long as the tail is zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: attr is a valid, zero-padded bpf_attr of the given size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            std::mem::size_of::<Attr>() as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// An attached program: detached when dropped unless it was pinned.
#[derive(Debug)]
pub struct Link {
    fd: OwnedFd,
}

impl Link {
    /// `BPF_LINK_CREATE` on a cgroup or (for `sk_lookup`) a network namespace. Such links
    /// always coexist with other programs on the same hook (cgroup multi-attach semantics; up
    /// to 64 `sk_lookup` programs per namespace, run in attach order), so Cilium and friends
    /// keep working.
    pub fn create(
        prog: BorrowedFd<'_>,
        target: BorrowedFd<'_>,
        attach_type: u32,
    ) -> io::Result<Self> {
        let mut attr = Attr([0; 128]);
        attr.0[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
        attr.0[4..8].copy_from_slice(&(target.as_raw_fd() as u32).to_ne_bytes());
        attr.0[8..12].copy_from_slice(&attach_type.to_ne_bytes());
        let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
        // SAFETY: the kernel returned a new fd that nothing else owns.
        Ok(Link {
            fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
        })
    }

    /// Pin the link so the program stays attached after this process exits.
    pub fn pin(&self, path: &Path) -> io::Result<()> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in pin path"))?;
        let mut attr = Attr([0; 128]);
        attr.0[0..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
        attr.0[8..12].copy_from_slice(&(self.fd.as_raw_fd() as u32).to_ne_bytes());
        bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
    }
}

impl AsFd for Link {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
