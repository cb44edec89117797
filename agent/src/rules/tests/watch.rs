//! `PolicyWatcher` on real files with real inotify. A change must be reported
//! (within a generous bound: inotify queues the event synchronously with the
//! syscall, so it is already there when `changed` is called); a non-change is
//! checked by a short wait that must run out.

use super::reload::{write, TempDir};
use crate::policy::{Direction, PeerKey};
use crate::rules::{knobs::Knobs, PolicyHandle, PolicyWatcher};
use std::future::Future;
use std::io::Write;
use std::time::Duration;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

async fn fires(f: impl Future<Output = std::io::Result<()>>) -> bool {
    match tokio::time::timeout(Duration::from_secs(5), f).await {
        Ok(r) => {
            r.expect("watch error");
            true
        }
        Err(_) => false,
    }
}

async fn stays_quiet(f: impl Future<Output = std::io::Result<()>>) -> bool {
    tokio::time::timeout(Duration::from_millis(150), f)
        .await
        .is_err()
}

#[test]
fn reports_rename_over_and_in_place_writes_of_the_file_only() {
    runtime().block_on(async {
        let dir = TempDir::new("watch");
        let path = dir.path("policy.toml");
        write(&path, "# v1\n");
        let mut w = PolicyWatcher::new(&path).expect("watch");
        assert!(stays_quiet(w.changed()).await, "nothing happened yet");

        // Renamed over (write() writes policy.tmp, then renames).
        write(&path, "# v2\n");
        assert!(fires(w.changed()).await, "rename over");
        // The write to policy.tmp was not the file: one change, then quiet.
        assert!(stays_quiet(w.changed()).await, "folded into one");

        // Written in place, several writes and one close: one change.
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&path)
                .expect("open");
            for _ in 0..5 {
                f.write_all(b"# v3\n").expect("write");
            }
        }
        assert!(fires(w.changed()).await, "in-place write");
        assert!(stays_quiet(w.changed()).await);

        // Other files in the directory are ignored.
        std::fs::write(dir.path("other.toml"), "x").expect("write other");
        write(&dir.path("another.toml"), "x");
        assert!(stays_quiet(w.changed()).await, "other files");

        // Deleting the file is not a change; re-creating it is (at its close).
        std::fs::remove_file(&path).expect("rm");
        assert!(stays_quiet(w.changed()).await, "delete");
        std::fs::write(&path, "# v4\n").expect("recreate");
        assert!(fires(w.changed()).await, "recreate");
    });
}

#[test]
fn follows_a_configmap_style_symlink_swap() {
    runtime().block_on(async {
        // The kubelet's layout: policy.toml -> ..data/policy.toml, ..data -> ..v1;
        // an update writes ..v2, points ..data_tmp at it, renames ..data_tmp to ..data.
        let dir = TempDir::new("configmap");
        std::fs::create_dir(dir.path("..v1")).expect("mkdir");
        std::fs::write(
            dir.path("..v1/policy.toml"),
            "[defaults]\nconnect_timeout = \"1s\"\n",
        )
        .expect("v1");
        std::os::unix::fs::symlink("..v1", dir.path("..data")).expect("..data");
        std::os::unix::fs::symlink("..data/policy.toml", dir.path("policy.toml")).expect("link");
        let path = dir.path("policy.toml");
        let handle = PolicyHandle::new(Knobs::default(), Some(path.clone())).expect("load");
        let mut w = PolicyWatcher::new(&path).expect("watch");

        std::fs::create_dir(dir.path("..v2")).expect("mkdir");
        std::fs::write(
            dir.path("..v2/policy.toml"),
            "[defaults]\nconnect_timeout = \"2s\"\n",
        )
        .expect("v2");
        std::os::unix::fs::symlink("..v2", dir.path("..data_tmp")).expect("tmp link");
        std::fs::rename(dir.path("..data_tmp"), dir.path("..data")).expect("swap");
        assert!(fires(w.changed()).await, "..data swapped");

        handle.reload().expect("reload");
        let key = PeerKey::new(
            "/var/run/netns/a",
            1,
            Direction::Outbound,
            "10.0.0.1:80".parse().expect("addr"),
        );
        assert_eq!(
            handle.resolve(&key).timeouts.connect,
            Some(Duration::from_secs(2))
        );
    });
}

#[test]
fn drives_reloads_end_to_end() {
    runtime().block_on(async {
        let dir = TempDir::new("watch-reload");
        let path = dir.path("policy.toml");
        write(&path, "[defaults]\nconnect_timeout = \"1s\"\n");
        let handle = PolicyHandle::new(Knobs::default(), Some(path.clone())).expect("load");
        let mut w = PolicyWatcher::new(&path).expect("watch");
        let key = PeerKey::new(
            "/var/run/netns/a",
            1,
            Direction::Outbound,
            "10.0.0.1:80".parse().expect("addr"),
        );
        let connect = |h: &PolicyHandle| h.resolve(&key).timeouts.connect;

        write(&path, "[defaults]\nconnect_timeout = \"soon\"\n");
        assert!(fires(w.changed()).await);
        let err = handle.reload().expect_err("bad file");
        assert_eq!(
            (err.line, err.field.as_deref()),
            (2, Some("connect_timeout"))
        );
        assert_eq!(
            connect(&handle),
            Some(Duration::from_secs(1)),
            "old policy kept"
        );

        write(&path, "[defaults]\nconnect_timeout = \"4s\"\n");
        assert!(fires(w.changed()).await);
        handle.reload().expect("good file");
        assert_eq!(connect(&handle), Some(Duration::from_secs(4)));
    });
}

#[test]
fn a_removed_directory_ends_the_watch_with_an_error() {
    runtime().block_on(async {
        let dir = TempDir::new("watch-gone");
        let sub = dir.path("conf");
        std::fs::create_dir(&sub).expect("mkdir");
        let mut w = PolicyWatcher::new(&sub.join("policy.toml")).expect("watch");
        std::fs::remove_dir(&sub).expect("rmdir");
        let r = tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("reported, not hung");
        assert_eq!(r.expect_err("gone").kind(), std::io::ErrorKind::NotFound);
    });
}

#[test]
fn a_missing_directory_is_an_error_at_once() {
    runtime().block_on(async {
        let err = PolicyWatcher::new(std::path::Path::new("/nonexistent/sockmesh/policy.toml"))
            .err()
            .expect("no such directory");
        assert!(err.to_string().contains("/nonexistent/sockmesh"), "{err}");
    });
}
