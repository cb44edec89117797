//! `PolicyHandle` on real files: a good file swaps in whole, a bad one is rejected
//! with its location and the old set stays.

use crate::policy::{table::TableConfig, Direction, Nanos, PeerKey, PeerPolicy, PeerTable};
use crate::rules::{knobs::Knobs, PolicyHandle};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A fresh directory under the system temp dir, removed on drop (also when the
/// test fails).
pub(super) struct TempDir(PathBuf);

impl TempDir {
    pub(super) fn new(tag: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sockmesh-policy-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub(super) fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Replaces the file's contents the way editors and config managers do: write a
/// sibling, rename over (so a reader never sees half a file).
pub(super) fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write temp file");
    std::fs::rename(&tmp, path).expect("rename over");
}

fn key() -> PeerKey {
    PeerKey::new(
        "/var/run/netns/shop-1",
        1,
        Direction::Outbound,
        "10.0.5.7:5432".parse().expect("addr"),
    )
}

fn policy_with(connect_ms: u64, idle_s: u64) -> String {
    format!(
        "[[rule]]\npeer = \"10.0.5.0/24\"\nconnect_timeout = \"{connect_ms}ms\"\nidle_timeout = \"{idle_s}s\"\n"
    )
}

fn timeouts(p: &PeerPolicy) -> (Option<Duration>, Option<Duration>) {
    (p.timeouts.connect, p.timeouts.idle)
}

fn ms(n: u64) -> Option<Duration> {
    Some(Duration::from_millis(n))
}

fn s(n: u64) -> Option<Duration> {
    Some(Duration::from_secs(n))
}

#[test]
fn a_bad_file_keeps_the_old_policy_and_a_good_one_swaps_in() {
    let dir = TempDir::new("reload");
    let path = dir.path("policy.toml");
    write(&path, &policy_with(100, 10));
    let handle = PolicyHandle::new(Knobs::default(), Some(path.clone())).expect("loads");
    assert_eq!(handle.path(), Some(path.as_path()));
    assert_eq!(timeouts(&handle.resolve(&key())), (ms(100), s(10)));
    assert_eq!(handle.generation(), 0);
    let before = handle.current();

    // Invalid: a bad value on line 4. Rejected, nothing changes.
    write(
        &path,
        "[[rule]]\npeer = \"10.0.5.0/24\"\nconnect_timeout = \"200ms\"\nidle_timeout = \"ten\"\n",
    );
    let err = handle.reload().expect_err("bad file");
    assert_eq!((err.path.as_path(), err.line), (path.as_path(), 4));
    assert_eq!(err.field.as_deref(), Some("idle_timeout"));
    assert_eq!(err.value.as_deref(), Some("\"ten\""));
    let shown = err.to_string();
    assert!(
        shown.starts_with(&format!("{}:4:16: ", path.display())),
        "{shown}"
    );
    assert!(Arc::ptr_eq(&before, &handle.current()), "old set kept");
    assert_eq!(
        timeouts(&handle.resolve(&key())),
        (ms(100), s(10)),
        "not half-applied"
    );
    assert_eq!(handle.generation(), 0);

    // Syntax error: rejected the same way.
    write(&path, "[[rule]\n");
    let err = handle.reload().expect_err("bad syntax");
    assert_eq!(err.line, 1);
    assert!(Arc::ptr_eq(&before, &handle.current()));

    // Gone: rejected, old set kept.
    std::fs::remove_file(&path).expect("rm");
    let err = handle.reload().expect_err("missing");
    assert!(
        err.to_string().contains("cannot read the policy file"),
        "{err}"
    );
    assert!(Arc::ptr_eq(&before, &handle.current()));

    // Valid again: swapped in whole.
    write(&path, &policy_with(300, 30));
    handle.reload().expect("good file");
    assert_eq!(handle.generation(), 1);
    assert_eq!(timeouts(&handle.resolve(&key())), (ms(300), s(30)));
    // A connection that took the old set before the reload keeps seeing it whole.
    assert_eq!(timeouts(&before.resolve(&key())), (ms(100), s(10)));
}

#[test]
fn the_flags_stay_the_base_across_reloads() {
    let dir = TempDir::new("base");
    let path = dir.path("policy.toml");
    let base = Knobs {
        dns_timeout: Some(Duration::from_millis(1500)),
        ..Knobs::default()
    };
    write(&path, "[defaults]\nidle_timeout = \"1m\"\n");
    let handle = PolicyHandle::new(base, Some(path.clone())).expect("loads");
    write(&path, "[defaults]\nconnect_timeout = \"1s\"\n");
    handle.reload().expect("good");
    let p = handle.resolve(&key());
    // idle_timeout is back to the flag default: the old file's [defaults] is gone.
    assert_eq!(
        (p.timeouts.connect, p.timeouts.idle, p.timeouts.dns),
        (s(1), s(3600), ms(1500))
    );
}

#[test]
fn without_a_file_reload_is_a_no_op() {
    let handle = PolicyHandle::new(Knobs::default(), None).expect("no file");
    assert_eq!(handle.path(), None);
    handle.reload().expect("nothing to do");
    assert_eq!(handle.generation(), 0);
    assert_eq!(handle.resolve(&key()), PeerPolicy::default());
}

#[test]
fn a_bad_file_at_startup_is_an_error() {
    let dir = TempDir::new("startup");
    let path = dir.path("policy.toml");
    write(&path, "[defaults]\nmax_conns = 0\n");
    let err = PolicyHandle::new(Knobs::default(), Some(path.clone()))
        .err()
        .expect("rejected");
    assert_eq!((err.line, err.field.as_deref()), (2, Some("max_conns")));
    let err = PolicyHandle::new(Knobs::default(), Some(dir.path("missing.toml")))
        .err()
        .expect("rejected");
    assert_eq!(err.line, 0);
}

#[test]
fn readers_always_see_one_whole_policy_while_reloads_race() {
    // Two files whose knobs move together; a reader must never see a mix.
    let dir = TempDir::new("race");
    let path = dir.path("policy.toml");
    write(&path, &policy_with(100, 10));
    let handle = Arc::new(PolicyHandle::new(Knobs::default(), Some(path.clone())).expect("loads"));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let handle = handle.clone();
            std::thread::spawn(move || {
                for _ in 0..2_000 {
                    let t = timeouts(&handle.resolve(&key()));
                    assert!(
                        t == (ms(100), s(10)) || t == (ms(200), s(20)),
                        "mixed: {t:?}"
                    );
                }
            })
        })
        .collect();
    for i in 0..50 {
        let (c, idle) = if i % 2 == 0 { (200, 20) } else { (100, 10) };
        write(&path, &policy_with(c, idle));
        handle.reload().expect("good");
        // Bad ones in between never get through.
        write(
            &path,
            "[[rule]]\npeer = \"10.0.5.0/24\"\nconnect_timeout = \"7ms\"\nidle = 1\n",
        );
        handle.reload().expect_err("bad");
    }
    for r in readers {
        r.join().expect("reader");
    }
    assert_eq!(handle.generation(), 50);
}

#[test]
fn a_table_follows_the_new_set_after_set_source() {
    let dir = TempDir::new("table");
    let path = dir.path("policy.toml");
    write(&path, &policy_with(100, 10));
    let handle = PolicyHandle::new(Knobs::default(), Some(path.clone())).expect("loads");
    let mut table = PeerTable::new(TableConfig::default(), handle.source());
    let t0 = Nanos::ZERO;
    table.admit(t0, &key(), 0.5);
    assert_eq!(
        table.policy(&key()).map(|p| p.timeouts.connect),
        Some(ms(100))
    );

    write(&path, &policy_with(250, 10));
    handle.reload().expect("good");
    table.set_source(handle.source());
    table.admit(t0, &key(), 0.5);
    assert_eq!(
        table.policy(&key()).map(|p| p.timeouts.connect),
        Some(ms(250))
    );
}
