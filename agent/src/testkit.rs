//! Test support shared by the property tests of hostile input (`rules::tests::hostile`,
//! `proxy::dns_msg`'s tests): the committed seed corpus, the fixed-seed proptest
//! configuration, and byte-level mutation of seeds.
//!
//! Seeds live in `agent/tests/corpus/` (committed; add a file there for every input that once
//! broke something) and are both checked as they are and mutated. proptest runs from a fixed
//! seed so CI is reproducible. `PROPTEST_CASES=100000 cargo test -p sockmesh hostile` runs a
//! longer campaign.
use std::path::{Path, PathBuf};

use proptest::{prelude::*, test_runner::RngSeed};

/// The committed seeds of one kind (`policy`, `dns`), sorted by file name.
pub fn corpus(kind: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(kind);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.expect("corpus entry").path();
            let bytes = std::fs::read(&p).expect("corpus file");
            (p, bytes)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "empty corpus {}", dir.display());
    out
}

/// A fixed seed, so CI is reproducible.
pub fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        rng_seed: RngSeed::Fixed(0x50c4_3e54),
        ..ProptestConfig::default()
    }
}

/// A corpus file with a few bytes overwritten, inserted or cut.
pub fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (
        proptest::sample::select(seeds),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    )
        .prop_map(|(mut bytes, edits)| {
            for (at, b, op) in edits {
                if bytes.is_empty() {
                    bytes.push(b);
                    continue;
                }
                let i = at.index(bytes.len());
                match op {
                    0 => bytes[i] = b,
                    1 => bytes.insert(i, b),
                    _ => bytes.truncate(i),
                }
            }
            bytes
        })
}

pub fn seeds(kind: &str) -> Vec<Vec<u8>> {
    corpus(kind).into_iter().map(|(_, b)| b).collect()
}
