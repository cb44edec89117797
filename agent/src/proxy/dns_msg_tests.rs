//! Hostile input, property-tested: any datagram an app sends to the DNS listener is
//! classified without panic and answered, if at all, with a SERVFAIL no longer than the query
//! (see `crate::testkit` for the corpus and the seeds).
use proptest::prelude::*;

use super::{check_query, is_reply_to, servfail, HEADER, MAX_MSG};
use crate::testkit::{config, corpus, mutated, seeds};

proptest! {
    #![proptest_config(config())]

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
