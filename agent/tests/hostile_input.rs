//! Hostile input, property-tested: the policy file parser and the DNS message handling take
//! arbitrary, mutated and structurally plausible garbage without panicking, and answer it with
//! an error that names the problem (policy) or with a drop or SERVFAIL (DNS).
//!
//! Seeds live in `tests/corpus/` (committed; add a file there for every input that once broke
//! something) and are both checked as they are and mutated. proptest runs from a fixed seed so
//! CI is reproducible; a failure is shrunk and saved in `hostile_input.proptest-regressions`,
//! which is committed too. `PROPTEST_CASES=100000 cargo test -p sockmesh --test hostile_input`
//! runs a longer campaign.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use proptest::{prelude::*, test_runner::RngSeed};
use sockmesh::{
    policy::{Direction, Knobs, PeerKey, PolicySet, KNOB_NAMES},
    proxy::dns_msg::{check_query, is_reply_to, servfail, HEADER, MAX_MSG},
};

const POLICY_PATH: &str = "/etc/sockmesh/fuzz.toml";

fn corpus(kind: &str) -> Vec<(PathBuf, Vec<u8>)> {
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

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        rng_seed: RngSeed::Fixed(0x50c4_3e54),
        ..ProptestConfig::default()
    }
}

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

/// A corpus file with a few bytes overwritten, inserted or cut.
fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
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

fn seeds(kind: &str) -> Vec<Vec<u8>> {
    corpus(kind).into_iter().map(|(_, b)| b).collect()
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

    #[test]
    fn dns_handling_survives_any_bytes(msg in proptest::collection::vec(any::<u8>(), 0..2048)) {
        check_dns(&msg);
    }

    #[test]
    fn dns_handling_survives_mutated_corpus(msg in mutated(seeds("dns"))) {
        check_dns(&msg);
    }

    #[test]
    fn only_a_response_with_the_same_id_is_taken_as_the_reply(
        query in proptest::collection::vec(any::<u8>(), 0..64),
        reply in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let taken = is_reply_to(&query, &reply);
        let expected = query.len() >= 2
            && reply.len() >= HEADER
            && reply[2] & 0x80 != 0
            && reply[..2] == query[..2];
        prop_assert_eq!(taken, expected);
    }
}

/// The contract for any datagram an app sends to the DNS listener: classify without panic;
/// a SERVFAIL, when one can be built, is a well-formed response to exactly that query and
/// never longer than it (the agent cannot be used to amplify).
fn check_dns(msg: &[u8]) {
    let forwarded = check_query(msg).is_ok();
    if msg.len() < HEADER || msg[2] & 0x80 != 0 {
        assert!(!forwarded, "forwarded a non-query");
    }
    if let Some(r) = servfail(msg) {
        assert!(forwarded, "answered a datagram that is not a query");
        assert!(r.len() >= HEADER && r.len() <= msg.len(), "amplified");
        assert_eq!(&r[..2], &msg[..2], "same id");
        assert!(r[2] & 0x80 != 0, "QR set");
        assert_eq!(r[3] & 0x0f, 2, "SERVFAIL");
        assert_eq!(&r[4..6], &msg[4..6], "same question count");
        assert_eq!(&r[6..12], &[0; 6], "no records");
        assert!(
            is_reply_to(msg, &r),
            "the client would take it as the answer"
        );
    }
}

#[test]
fn dns_corpus_is_classified() {
    for (path, msg) in corpus("dns") {
        check_dns(&msg);
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let answered = servfail(&msg).is_some();
        // A self-pointing compression pointer is echoed, never followed: no loop to fall in.
        let expect = matches!(
            name,
            "query_a.bin" | "query_edns.bin" | "header_only.bin" | "pointer_loop.bin"
        );
        assert_eq!(answered, expect, "{name}");
    }
    // The largest datagram: classified and answered without trouble.
    let mut huge = vec![0u8; MAX_MSG];
    huge[2] = 0x01;
    huge[5] = 1;
    check_dns(&huge);
    let mut too_big = huge.clone();
    too_big.push(0);
    assert!(check_query(&too_big).is_err());
}
