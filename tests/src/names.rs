//! Unique, sweepable names for everything a test creates outside its own process.
//!
//! Tests run in parallel threads (cargo test) and in parallel processes (cargo-nextest runs each
//! test in its own process), so an in-process counter alone would collide across processes and
//! the pid alone would collide across threads. A name is `smt-<pid>-<n>-<rand>`: the pid lets
//! [`crate::cleanup::sweep_stale`] recognise leftovers of dead test processes, the counter keeps
//! names distinct inside one process, and the random suffix guards against a recycled pid finding
//! a leftover of its namesake.

use std::fs::File;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};

/// Every name the harness creates starts with this, so the sweeper can find them.
pub const PREFIX: &str = "smt-";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh `smt-<pid>-<n>-<rand>` name, unique across threads and processes on this machine.
pub fn unique_name() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format_name(std::process::id(), n, &random_hex(2))
}

/// The pure part of [`unique_name`], kept separate so it can be unit-tested.
pub fn format_name(pid: u32, n: u64, suffix: &str) -> String {
    format!("{PREFIX}{pid}-{n}-{suffix}")
}

/// `bytes` random bytes from the kernel, as lowercase hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // /dev/urandom never blocks and always exists on Linux; failing here means a broken machine.
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// The pid of the test process that created `name`, if `name` is one of ours
/// (`smt-<pid>-...`). Used by the sweeper to decide whether the owner is still alive.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, tail) = rest.split_once('-')?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) || tail.is_empty() {
        return None;
    }
    pid.parse().ok()
}

/// Whether `label` is safe to embed in a netns name and a file name.
pub fn valid_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 32
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_parse_back() {
        let a = unique_name();
        let b = unique_name();
        assert_ne!(a, b);
        assert!(a.starts_with(PREFIX));
        assert_eq!(owner_pid(&a), Some(std::process::id()));
        assert_eq!(owner_pid(&format!("{a}-client")), Some(std::process::id()));
    }

    #[test]
    fn format_is_stable() {
        assert_eq!(format_name(42, 7, "beef"), "smt-42-7-beef");
    }

    #[test]
    fn owner_pid_rejects_foreign_names() {
        assert_eq!(owner_pid("smt-123-0-ab"), Some(123));
        assert_eq!(owner_pid("smt-123"), None);
        assert_eq!(owner_pid("smt-123-"), None);
        assert_eq!(owner_pid("smt--1-ab"), None);
        assert_eq!(owner_pid("smt-12a-0"), None);
        assert_eq!(owner_pid("sockmesh"), None);
        assert_eq!(owner_pid("cni-123-0"), None);
        assert_eq!(owner_pid("smt-99999999999999999999-0"), None);
    }

    #[test]
    fn random_hex_has_requested_length() {
        assert_eq!(random_hex(2).len(), 4);
        assert!(random_hex(8).bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn labels() {
        assert!(valid_label("client-1"));
        assert!(!valid_label(""));
        assert!(!valid_label("a/b"));
        assert!(!valid_label("a b"));
    }
}
