//! Hostile handover frames, property-tested. The control socket is root-only, but what comes
//! over it is still input: arbitrary or mutated bytes never panic the framing or the decoder,
//! a bad frame is one clear error, every message round-trips through its frame, and the
//! pure steps after decoding (chunking offers by the fd limit, matching them to pods) keep
//! every socket exactly once.
use std::net::{IpAddr, SocketAddr};

use proptest::prelude::*;

use super::proto::{
    assign, chunks, decode, encode, frame_len, Kind, Offered, Reply, Request, MAX_FDS, MAX_FRAME,
};
use crate::testkit::{config, mutated};

fn offered() -> impl Strategy<Value = Offered> {
    (
        0u64..6,
        prop_oneof![
            Just(Kind::Outbound),
            Just(Kind::Dns),
            Just(Kind::Inbound),
            Just(Kind::Http)
        ],
        // An address as a socket reports it: flow info and scope id are not part of a
        // frame (the agent's listeners are on loopback, where both are 0).
        (any::<IpAddr>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port)),
    )
        .prop_map(|(netns_cookie, kind, addr)| Offered {
            netns_cookie,
            kind,
            addr,
        })
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        (
            any::<u32>(),
            any::<u32>(),
            proptest::collection::vec(offered(), 0..40),
            any::<bool>()
        )
            .prop_map(|(version, pid, sockets, last)| Reply::Sockets {
                version,
                pid,
                sockets,
                last
            }),
        Just(Reply::Lock),
        Just(Reply::Draining),
        any::<String>().prop_map(|message| Reply::Error { message }),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (any::<u32>(), any::<bool>())
            .prop_map(|(version, http)| Request::Listeners { version, http }),
        Just(Request::Drain),
    ]
}

/// The body of a frame, after its header says how long it is.
fn body(frame: &[u8]) -> &[u8] {
    let n = frame_len(frame[..4].try_into().expect("header")).expect("a frame we made");
    assert_eq!(frame.len(), 4 + n, "the header announces the body");
    &frame[4..]
}

/// A decode error is one line that says it is a bad handover message.
fn clean(e: &str) -> Result<(), TestCaseError> {
    prop_assert!(e.starts_with("bad handover message"), "{e}");
    prop_assert!(!e.contains('\n'), "not one line: {e:?}");
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn replies_and_requests_round_trip_through_their_frames(r in reply(), q in request()) {
        let f = encode(&r);
        prop_assert_eq!(decode::<Reply>(body(&f)), Ok(r));
        let f = encode(&q);
        prop_assert_eq!(decode::<Request>(body(&f)), Ok(q));
    }

    #[test]
    fn any_header_is_a_length_or_one_refusal(h in any::<[u8; 4]>()) {
        let n = u32::from_be_bytes(h) as usize;
        match frame_len(h) {
            Ok(len) => prop_assert!(len == n && n <= MAX_FRAME),
            Err(e) => {
                prop_assert!(n > MAX_FRAME);
                prop_assert!(e.contains("handover frame") && !e.contains('\n'), "{e}");
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(b in proptest::collection::vec(any::<u8>(), 0..512)) {
        for r in [decode::<Reply>(&b).map(|_| ()), decode::<Request>(&b).map(|_| ())] {
            if let Err(e) = r {
                clean(&e)?;
            }
        }
    }

    /// A real frame with a few bytes overwritten, inserted or cut: decoded as some valid
    /// message or refused cleanly, never a panic.
    #[test]
    fn mutated_frames_decode_or_fail_cleanly(
        b in reply().prop_flat_map(|r| mutated(vec![body(&encode(&r)).to_vec()])),
    ) {
        if let Err(e) = decode::<Reply>(&b) {
            clean(&e)?;
        }
    }

    #[test]
    fn chunks_keep_every_offer_in_order_within_the_fd_limit(
        offers in proptest::collection::vec(offered(), 0..200),
        max in 0usize..=MAX_FDS,
    ) {
        let c = chunks(&offers, max);
        prop_assert!(!c.is_empty(), "always at least one message");
        let flat: Vec<Offered> = c.iter().flat_map(|(o, _)| o.iter().copied()).collect();
        prop_assert_eq!(&flat, &offers);
        for (i, (o, last)) in c.iter().enumerate() {
            prop_assert!(o.len() <= max.max(1));
            prop_assert_eq!(*last, i + 1 == c.len());
        }
    }

    /// Every offered socket goes to exactly one place, or the offer is refused for a
    /// duplicate.
    #[test]
    fn assign_places_every_socket_once_or_refuses_a_duplicate(
        offers in proptest::collection::vec(offered(), 0..30),
        wanted in proptest::collection::vec(0u64..6, 0..6),
    ) {
        let n = offers.len();
        let unique = offers.iter().collect::<std::collections::HashSet<_>>().len();
        let with_fds: Vec<(Offered, usize)> = offers.into_iter().enumerate().map(|(i, o)| (o, i)).collect();
        match assign(with_fds, &wanted) {
            Ok(a) => {
                prop_assert_eq!(unique, n, "a duplicate was accepted");
                let placed: usize = a.pods.values().map(|p| p.outbound.len() + p.dns.len() + p.inbound.len()).sum();
                // HTTP listeners are the node's, set apart from every pod's.
                prop_assert_eq!(placed + a.unclaimed.len() + a.http.len(), n);
                prop_assert!(a.pods.keys().all(|k| wanted.contains(k)));
                prop_assert!(a.unclaimed.iter().all(|(o, _)| !wanted.contains(&o.netns_cookie)));
                prop_assert!(a.unclaimed.iter().all(|(o, _)| o.kind != Kind::Http));
            }
            Err(e) => {
                prop_assert!(unique < n, "refused without a duplicate: {e}");
                prop_assert!(e.contains("twice") && !e.contains('\n'), "{e}");
            }
        }
    }
}
