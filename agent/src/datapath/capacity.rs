//! The size of `SM_FAST_SOCKS` (the kernel fast path's direct sockets, node-wide), set by
//! `--fast-path-sockets`. A map's size is fixed when it is created, and the pins outlive an
//! agent: a restart or a takeover finds the map an earlier agent made, perhaps of another size.
//! A takeover keeps it (the running agent's direct sockets are in it) and says how to resize;
//! a fresh start replaces it, so the flag always takes effect at the next plain start.
use std::path::Path;

use anyhow::{Context, Result};
use sockmesh_common::map_names;
use tracing::{info, warn};

use super::rawmap::RawMap;

/// What to do with a pinned `SM_FAST_SOCKS` before loading the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sizing {
    /// No pin: the object creates the map with the asked size.
    Create,
    /// The pinned map has the asked size.
    Reuse,
    /// A fresh start over pins of another size: remove the pin, the object makes a new one.
    /// Direct connections opened before this start are no longer counted at their close
    /// (their kernel-tier peers were handed back at start anyway).
    Replace { pinned: u32 },
    /// A takeover over a map of another size: keep it (the predecessor's direct sockets are
    /// in it), with the pinned size.
    Keep { pinned: u32 },
}

impl Sizing {
    pub fn decide(pinned: Option<u32>, wanted: u32, takeover: bool) -> Sizing {
        match pinned {
            None => Sizing::Create,
            Some(p) if p == wanted => Sizing::Reuse,
            Some(p) if takeover => Sizing::Keep { pinned: p },
            Some(p) => Sizing::Replace { pinned: p },
        }
    }

    /// The size the map will have.
    pub fn size(self, wanted: u32) -> u32 {
        match self {
            Sizing::Keep { pinned } => pinned,
            _ => wanted,
        }
    }
}

/// Prepares the pin of `SM_FAST_SOCKS` in `dir` for a map of `wanted` entries and returns the
/// size the loaded map will have (the loader is then told it).
pub fn fast_sockets(dir: &Path, wanted: u32, takeover: bool) -> Result<u32> {
    let pin = dir.join(map_names::FAST_SOCKETS);
    let pinned = if pin.exists() {
        Some(RawMap::open(&pin)?.info.max_entries)
    } else {
        None
    };
    let sizing = Sizing::decide(pinned, wanted, takeover);
    match sizing {
        Sizing::Create | Sizing::Reuse => {}
        Sizing::Replace { pinned } => {
            std::fs::remove_file(&pin).with_context(|| format!("remove {}", pin.display()))?;
            info!(
                map = map_names::FAST_SOCKETS,
                from = pinned,
                to = wanted,
                "resized the direct-socket map; direct connections opened before this start are not counted at their close"
            );
        }
        Sizing::Keep { pinned } => warn!(
            map = map_names::FAST_SOCKETS,
            pinned,
            wanted,
            "the direct-socket map keeps the size the running agent made it with (a map's size is fixed when it is created, and its direct sockets are in it); --fast-path-sockets takes effect at the next start without --takeover"
        ),
    }
    Ok(sizing.size(wanted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_of_another_size_is_replaced_on_a_fresh_start_and_kept_on_a_takeover() {
        assert_eq!(Sizing::decide(None, 8, false), Sizing::Create);
        assert_eq!(Sizing::decide(None, 8, true), Sizing::Create);
        assert_eq!(Sizing::decide(Some(8), 8, true), Sizing::Reuse);
        assert_eq!(
            Sizing::decide(Some(4), 8, false),
            Sizing::Replace { pinned: 4 }
        );
        assert_eq!(Sizing::decide(Some(4), 8, true), Sizing::Keep { pinned: 4 });
        assert_eq!(Sizing::Keep { pinned: 4 }.size(8), 4);
        assert_eq!(Sizing::Replace { pinned: 4 }.size(8), 8);
        assert_eq!(Sizing::Create.size(8), 8);
    }
}
