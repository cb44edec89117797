//! A per-test scratch directory under /tmp, removed on drop.

use crate::names::unique_name;
use anyhow::{Context, Result};
use std::fs;
use std::path::{Path, PathBuf};

/// `/tmp/smt-<pid>-<n>-<rand>`; removed on drop (also when the test panics, after the guards
/// holding logs in it have printed them). Set `SMT_KEEP=1` to keep it for post-mortem reading.
/// Leftovers of killed test processes are removed by [`crate::cleanup::sweep_stale`].
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> Result<Self> {
        let path = std::env::temp_dir().join(unique_name());
        fs::create_dir(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("SMT_KEEP").is_some() {
            eprintln!("[smt] SMT_KEEP set: keeping {}", self.path.display());
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("[smt] warning: remove {}: {e}", self.path.display());
        }
    }
}
