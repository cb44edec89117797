//! The open-file limit: every proxied connection costs the agent two sockets, so the soft
//! limit is raised to the hard one at start, and the caps are sized from what it ends up at.
use std::io;

/// (soft, hard) RLIMIT_NOFILE of this process.
pub fn nofile() -> io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out pointer of the right type.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((r.rlim_cur, r.rlim_max))
}

/// Raises the soft RLIMIT_NOFILE to the hard one (no capability needed for that); returns
/// (soft before, soft now, hard). Lowering or raising the hard limit is not attempted: that
/// needs CAP_SYS_RESOURCE, which the agent does not keep.
pub fn raise_nofile() -> io::Result<(u64, u64, u64)> {
    let (before, hard) = nofile()?;
    if before < hard {
        let r = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: valid pointer to an initialised rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let (now, hard) = nofile()?;
    Ok((before, now, hard))
}

/// Whether an accept (or socket) error means the process or the system is out of file
/// descriptors or socket memory: retrying at once would fail the same way.
pub fn out_of_fds(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_reaches_the_hard_one() {
        let (_, now, hard) = raise_nofile().expect("setrlimit");
        assert_eq!(now, hard);
        assert_eq!(nofile().expect("getrlimit"), (hard, hard));
    }

    #[test]
    fn out_of_fds_is_told_apart() {
        assert!(out_of_fds(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(out_of_fds(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(!out_of_fds(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }
}
