//! Hostile input, property-tested: the policy file parser takes arbitrary, mutated and
//! structurally plausible garbage without panicking, and answers it with one error that names
//! the file (see `crate::testkit` for the corpus and the seeds).
use std::{net::SocketAddr, path::Path, sync::Arc};

use proptest::prelude::*;

use crate::policy::{Direction, PeerKey};
use crate::rules::{
    knobs::{Knobs, KNOB_NAMES},
    set::PolicySet,
};
use crate::testkit::{config, corpus, mutated, seeds};

const POLICY_PATH: &str = "/etc/sockmesh/fuzz.toml";

/// Parse, and hold the outcome to the parser's contract: an error is one line that names the
/// file; a success answers lookups for any peer.
fn parse_policy(text: &str) -> Result<(), String> {
    match PolicySet::parse(text, Path::new(POLICY_PATH), Knobs::default()) {
        Ok(set) => {
            for (direction, peer) in [
                (Direction::Outbound, "10.1.2.3:443"),
                (Direction::Inbound, "[fd00::1]:8080"),
            ] {
                let key = PeerKey {
                    pod: Arc::from("/var/run/netns/shop-1"),
                    netns_cookie: 1,
                    direction,
                    peer: peer.parse::<SocketAddr>().expect("addr"),
                };
                let _ = set.resolve(&key);
            }
            Ok(())
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.starts_with(POLICY_PATH),
                "error does not name the file: {msg}"
            );
            assert!(!msg.contains('\n'), "error is not one line: {msg:?}");
            assert!(
                msg.len() > POLICY_PATH.len() + 2,
                "error says nothing: {msg}"
            );
            Err(msg)
        }
    }
}

#[test]
fn policy_corpus_parses_or_fails_cleanly() {
    for (path, bytes) in corpus("policy") {
        let text = String::from_utf8_lossy(&bytes);
        let r = parse_policy(&text);
        let good = path.file_name().is_some_and(|n| n == "full.toml");
        assert_eq!(r.is_ok(), good, "{}: {r:?}", path.display());
    }
}

/// A value for a knob or a match field: valid ones, near misses, and the extremes.
fn policy_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\"500ms\"".to_string()),
        Just("\"off\"".to_string()),
        Just("\"100/s\"".to_string()),
        Just("\"10MiB/s\"".to_string()),
        Just("\"10.0.0.0/8\"".to_string()),
        Just("\"8000-8100\"".to_string()),
        Just("\"outbound\"".to_string()),
        Just("18446744073709551615".to_string()),
        Just("-1".to_string()),
        Just("0".to_string()),
        Just("1e308".to_string()),
        Just("nan".to_string()),
        Just("\"99999999999999999999d\"".to_string()),
        Just("[1, 2]".to_string()),
        Just("{ a = 1 }".to_string()),
        Just("true".to_string()),
        "[0-9]{1,25}".prop_map(|s| s),
        "\"[ -~]{0,30}\"".prop_map(|s| s),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
    ]
}

fn policy_key() -> impl Strategy<Value = String> {
    let fields = [
        "name",
        "direction",
        "pod",
        "peer",
        "ports",
        "bogus",
        "Connect_Timeout",
    ];
    prop_oneof![
        proptest::sample::select(KNOB_NAMES.to_vec()).prop_map(str::to_string),
        proptest::sample::select(fields.to_vec()).prop_map(str::to_string),
    ]
}

/// Key/value lines of one TOML table.
type Table = Vec<(String, String)>;

/// A plausible file: some `[defaults]` keys and some `[[rule]]` tables of random keys/values.
fn policy_file() -> impl Strategy<Value = String> {
    let table = || proptest::collection::vec((policy_key(), policy_value()), 0..6);
    (
        proptest::option::of(table()),
        proptest::collection::vec(table(), 0..4),
    )
        .prop_map(|(defaults, rules): (Option<Table>, Vec<Table>)| {
            let mut text = String::new();
            let body = |t: &[(String, String)], text: &mut String| {
                for (k, v) in t {
                    text.push_str(&format!("{k} = {v}\n"));
                }
            };
            if let Some(d) = defaults {
                text.push_str("[defaults]\n");
                body(&d, &mut text);
            }
            for r in rules {
                text.push_str("[[rule]]\n");
                body(&r, &mut text);
            }
            text
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn policy_parser_survives_any_text(text in "\\PC{0,400}") {
        let _ = parse_policy(&text);
    }

    #[test]
    fn policy_parser_survives_plausible_files(text in policy_file()) {
        let _ = parse_policy(&text);
    }

    #[test]
    fn policy_parser_survives_mutated_corpus(bytes in mutated(seeds("policy"))) {
        let _ = parse_policy(&String::from_utf8_lossy(&bytes));
    }
}
