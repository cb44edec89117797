//! Least privilege: right after the preflight checks, before any thread or socket exists, the
//! agent drops every capability it will never use, from its effective, permitted, inheritable,
//! ambient and bounding sets, so neither it nor anything it could be tricked into running can
//! regain them.
//!
//! Why so early: capabilities are per-thread on Linux and `capset(2)` changes only the calling
//! thread, so a drop after the runtime and the pod workers started would leave them privileged.
//! Dropping first makes every later thread inherit the reduced sets. What is kept is what the
//! agent still needs for its whole life, not only at start:
//!
//! | kept | why |
//! |---|---|
//! | `CAP_BPF` | every `bpf(2)` call: loading, and map writes (heartbeat, pods, verdicts) while it runs |
//! | `CAP_PERFMON` | loading programs that use the kernel's tracing-class helpers |
//! | `CAP_NET_ADMIN` | cgroup socket hooks, and `SO_MARK` on every upstream socket it opens |
//! | `CAP_SYS_ADMIN` | `setns(2)` into pods (at start and when pods are enrolled later), cgroup attach |
//! | `CAP_NET_BIND_SERVICE` | inbound listeners on an app's port below 1024 inside its pod |
//! | `CAP_SYS_PTRACE` | opening `/proc/PID/ns/net` of a pod process running as another user |
//!
//! Everything else (`CAP_SYS_MODULE`, `CAP_KILL`, `CAP_SETUID`, `CAP_CHOWN`, `CAP_DAC_OVERRIDE`,
//! `CAP_SYS_RAWIO`, `CAP_SETPCAP` itself, ...) goes.
use anyhow::{bail, Context, Result};
use tracing::info;

/// Capabilities kept for the agent's lifetime (numbers from linux/capability.h).
pub const KEEP: [(u32, &str); 6] = [
    (39, "CAP_BPF"),
    (38, "CAP_PERFMON"),
    (12, "CAP_NET_ADMIN"),
    (21, "CAP_SYS_ADMIN"),
    (10, "CAP_NET_BIND_SERVICE"),
    (19, "CAP_SYS_PTRACE"),
];

/// The kept set as a bit mask.
pub fn keep_mask() -> u64 {
    KEEP.iter().fold(0, |m, (bit, _)| m | 1u64 << bit)
}

/// Capabilities to remove from the bounding set: every one up to `last_cap` not kept.
pub fn to_drop(last_cap: u32) -> Vec<u32> {
    (0..=last_cap.min(63))
        .filter(|c| keep_mask() & (1u64 << c) == 0)
        .collect()
}

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

fn split(mask: u64) -> [u32; 2] {
    [mask as u32, (mask >> 32) as u32]
}

/// Drop everything not in [`KEEP`]. Call on the main thread before any other thread exists.
pub fn drop_unneeded() -> Result<()> {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .context("read /proc/sys/kernel/cap_last_cap")?
        .trim()
        .parse()
        .context("parse /proc/sys/kernel/cap_last_cap")?;
    // The bounding set first: it needs CAP_SETPCAP, which the capset below removes. Without
    // CAP_SETPCAP (an agent started with only what it needs) the bounding set stays as given:
    // the permitted set below still cannot grow, only an exec could use the bounding set.
    let mut bounded = true;
    for cap in to_drop(last) {
        // SAFETY: plain prctl with integer arguments.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        let err = std::io::Error::last_os_error();
        match (rc, err.raw_os_error()) {
            (0, _) => {}
            // A capability this kernel does not know: nothing to drop.
            (_, Some(libc::EINVAL)) => {}
            (_, Some(libc::EPERM)) => {
                bounded = false;
                break;
            }
            _ => bail!("drop capability {cap} from the bounding set: {err}"),
        }
    }
    // SAFETY: plain prctl with integer arguments.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let mut hdr = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: version 3 takes a header and two data structs, both valid for the call.
    if unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) } != 0 {
        bail!("capget: {}", std::io::Error::last_os_error());
    }
    let keep = split(keep_mask());
    for (d, k) in data.iter_mut().zip(keep) {
        d.effective &= k;
        d.permitted &= k;
        d.inheritable = 0;
    }
    // SAFETY: as above; capset only ever lowers the sets here.
    if unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) } != 0 {
        bail!("capset: {}", std::io::Error::last_os_error());
    }
    let kept: Vec<&str> = KEEP.iter().map(|(_, n)| *n).collect();
    info!(
        kept = kept.join(","),
        bounding_set = bounded,
        "dropped every other capability"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_exactly_what_the_agent_uses() {
        let m = keep_mask();
        for (bit, name) in KEEP {
            assert!(m & (1 << bit) != 0, "{name}");
        }
        assert_eq!(m.count_ones() as usize, KEEP.len());
        // What preflight requires is a subset of what is kept.
        for name in ["CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"] {
            assert!(KEEP.iter().any(|(_, n)| *n == name), "{name}");
        }
    }

    #[test]
    fn drops_everything_else_up_to_the_kernels_last() {
        let d = to_drop(40);
        assert_eq!(d.len(), 41 - KEEP.len());
        for c in [0, 1, 5, 7, 8, 16, 17, 40] {
            assert!(d.contains(&c), "{c} dropped");
        }
        for (bit, name) in KEEP {
            assert!(!d.contains(&bit), "{name} kept");
        }
        assert!(to_drop(200).iter().all(|&c| c <= 63));
    }
}
