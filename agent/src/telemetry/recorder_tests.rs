use super::*;
use crate::policy::{BreakerState, Nanos};

fn key(peer: &str, dir: Direction) -> PeerKey {
    PeerKey::new("/var/run/netns/web", 42, dir, peer.parse().expect("addr"))
}

fn recorder() -> Recorder {
    Recorder::new(4, Box::new(|| 1_700_000_000_000))
}

fn no_view(_: &PeerKey) -> Option<PeerView> {
    None
}

fn relayed(a_to_b: u64, b_to_a: u64, end: End) -> Relayed {
    Relayed {
        a_to_b,
        b_to_a,
        end,
    }
}

#[test]
fn a_connection_adds_bytes_by_direction_and_ends_inactive() {
    let r = recorder();
    let out = key("10.0.0.1:80", Direction::Outbound);
    let inn = key("10.0.0.2:8080", Direction::Inbound);
    r.connected(&out, Ok(Duration::from_micros(300)));
    r.connected(&inn, Ok(Duration::from_micros(100)));
    let (batch, _) = r.drain(no_view, |_| 0);
    assert!(batch
        .iter()
        .all(|(_, d)| d.active == 1 && d.add.conns_total == 1));
    r.ended(&out, &relayed(10, 2000, End::Closed), None);
    r.ended(&inn, &relayed(10, 2000, End::Closed), None);
    let (batch, dropped) = r.drain(no_view, |_| 0);
    assert_eq!(dropped, 0);
    let get = |d: u16| {
        batch
            .iter()
            .find(|(k, _)| k.direction == d)
            .expect("peer")
            .1
            .clone()
    };
    let o = get(direction::OUTBOUND);
    assert_eq!((o.add.bytes_out, o.add.bytes_in, o.active), (10, 2000, 0));
    assert_eq!(o.add.conns_total, 0, "counted once, at connect");
    // Inbound: the client is the peer, so what it sent (a_to_b) came *in* to the pod.
    let i = get(direction::INBOUND);
    assert_eq!((i.add.bytes_out, i.add.bytes_in), (2000, 10));
    // Nothing changed and nothing is live: the next flush writes nothing.
    assert!(r.drain(no_view, |_| 0).0.is_empty());
}

#[test]
fn deltas_add_to_what_the_map_holds_and_gauges_are_set() {
    let r = recorder();
    let k = key("10.0.0.1:80", Direction::Outbound);
    r.connected(&k, Err(ConnectFailure::Timeout));
    r.connected(&k, Err(ConnectFailure::Refused));
    r.rejected(&k, RejectReason::RateLimited);
    r.rejected(&k, RejectReason::QueueTimeout);
    let view = |_: &PeerKey| {
        Some(PeerView {
            connections: 0,
            queued: 0,
            breaker: Some(BreakerState::Open {
                until: Nanos(5_000),
            }),
            reject_probability: Some(0.25),
            conn_tokens: None,
            idle_for: Duration::ZERO,
            counters: Default::default(),
            tier: Default::default(),
        })
    };
    let (batch, _) = r.drain(view, |t| t.0 + 1_000_000);
    let (mk, d) = &batch[0];
    assert_eq!(mk.netns_cookie, 42);
    assert_eq!(mk.peer.to_std(), Some("10.0.0.1:80".parse().expect("addr")));
    // A previous agent left totals in the map: they continue.
    let mut v = PeerState {
        connect_failures: 7,
        conns_active: 3,
        ..Default::default()
    };
    v.throttled[throttle_reason::RATE] = 1;
    d.apply_to(&mut v);
    assert_eq!(v.connect_failures, 9);
    assert_eq!(v.timeouts[timeout_kind::CONNECT], 1);
    assert_eq!(v.throttled[throttle_reason::RATE], 2);
    assert_eq!(v.throttled[throttle_reason::QUEUE_TIMEOUT], 1);
    assert_eq!(v.conns_active, 0, "gauge set, not added");
    assert_eq!(v.breaker, breaker_state::OPEN);
    assert_eq!(v.breaker_open_until_ns, 1_005_000);
    assert_eq!(v.adaptive_reject_ppm, 250_000);
    assert_eq!(v.last_error, peer_error::THROTTLED);
    assert_eq!(v.last_error_unix_ms, 1_700_000_000_000);
    // An open breaker is live: flushed again with no new traffic, adding nothing.
    let (again, _) = r.drain(view, |t| t.0);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].1.add, PeerState::default());
    assert_eq!(
        again[0].1.last_error,
        peer_error::NONE,
        "keeps the map's error"
    );
}

#[test]
fn timeouts_resets_and_dns_are_counted_by_kind() {
    let r = recorder();
    let k = key("10.0.0.1:80", Direction::Outbound);
    for end in [End::IdleTimeout, End::MaxLifetime, End::Reset] {
        r.connected(&k, Ok(Duration::from_millis(1)));
        r.ended(&k, &relayed(1, 1, end), None);
    }
    let dns = key("10.0.0.53:53", Direction::Outbound);
    r.dns(&dns, DnsOutcome::Answered);
    r.dns(&dns, DnsOutcome::TimedOut);
    let (batch, _) = r.drain(no_view, |_| 0);
    let find = |port: u16| {
        batch
            .iter()
            .find(|(k, _)| k.peer.to_std().map(|a| a.port()) == Some(port))
            .expect("peer")
            .1
            .clone()
    };
    let d = find(80);
    assert_eq!(d.add.timeouts[timeout_kind::IDLE], 1);
    assert_eq!(d.add.timeouts[timeout_kind::LIFETIME], 1);
    assert_eq!(d.add.resets, 1);
    assert_eq!(d.add.conns_total, 3);
    assert_eq!(d.last_error, peer_error::RESET);
    let d = find(53);
    assert_eq!(d.add.dns_queries, 2);
    assert_eq!(d.add.timeouts[timeout_kind::DNS], 1);
}

#[test]
fn latency_quantiles_are_nearest_rank_over_recent_samples() {
    let r = recorder();
    let k = key("10.0.0.1:80", Direction::Outbound);
    for us in 1..=100u64 {
        r.connected(&k, Ok(Duration::from_micros(us)));
    }
    let (batch, _) = r.drain(no_view, |_| 0);
    // The last 64 samples are 37..=100.
    assert_eq!(batch[0].1.connect_p50_us, 68);
    assert_eq!(batch[0].1.connect_p99_us, 100);
}

#[test]
fn memory_is_bounded_and_flushed_idle_peers_make_room() {
    let r = recorder(); // cap 4
    let peers: Vec<PeerKey> = (0..5)
        .map(|i| key(&format!("10.0.0.{i}:80"), Direction::Outbound))
        .collect();
    for p in &peers[..4] {
        r.rejected(p, RejectReason::RateLimited);
    }
    // Full of unflushed figures: the fifth is dropped and counted.
    r.rejected(&peers[4], RejectReason::RateLimited);
    let (batch, dropped) = r.drain(no_view, |_| 0);
    assert_eq!((batch.len(), dropped), (4, 1));
    // Flushed and idle now: they make room, losing nothing.
    r.rejected(&peers[4], RejectReason::RateLimited);
    assert_eq!(r.len(), 1);
    assert_eq!(r.drain(no_view, |_| 0).1, 0);
}

#[test]
fn v4_mapped_peers_are_keyed_as_ipv4_like_the_kernel_does() {
    let k = key("[::ffff:10.0.0.1]:80", Direction::Outbound);
    let mk = map_key(&k);
    assert_eq!(mk.peer.to_std(), Some("10.0.0.1:80".parse().expect("addr")));
}

/// Sum of what the batches added for the one peer they hold: (out, in).
fn bytes_added(batch: &[(MapKey, Delta)]) -> (u64, u64) {
    batch.iter().fold((0, 0), |(o, i), (_, d)| {
        (o + d.add.bytes_out, i + d.add.bytes_in)
    })
}

#[test]
fn open_connections_add_their_bytes_as_they_flow_and_exactly_once() {
    use std::sync::atomic::Ordering;
    for dir in [Direction::Outbound, Direction::Inbound] {
        let r = recorder();
        let k = key("10.0.0.1:80", dir);
        let bytes = Arc::new(Counts::default());
        r.connected(&k, Ok(Duration::from_micros(5)));
        r.relaying(&k, &bytes);
        let mut total = bytes_added(&r.drain(no_view, |_| 0).0);
        assert_eq!(total, (0, 0));
        bytes.a_to_b.fetch_add(1000, Ordering::Relaxed);
        bytes.b_to_a.fetch_add(30, Ordering::Relaxed);
        let (batch, _) = r.drain(no_view, |_| 0);
        assert_eq!(batch[0].1.active, 1, "still open");
        let got = bytes_added(&batch);
        // Outbound: client (a) is the pod; inbound: the client is the peer.
        let want = match dir {
            Direction::Outbound => (1000, 30),
            Direction::Inbound => (30, 1000),
        };
        assert_eq!(got, want, "bytes of an open connection show ({dir:?})");
        total = (total.0 + got.0, total.1 + got.1);
        // Nothing new: an open connection adds nothing more.
        assert_eq!(bytes_added(&r.drain(no_view, |_| 0).0), (0, 0));
        bytes.a_to_b.fetch_add(24, Ordering::Relaxed);
        let (a_to_b, b_to_a) = bytes.get();
        // The connection ends between flushes: only the rest is added.
        r.ended(&k, &relayed(a_to_b, b_to_a, End::Closed), Some(&bytes));
        let (batch, _) = r.drain(no_view, |_| 0);
        assert_eq!(batch[0].1.active, 0);
        let got = bytes_added(&batch);
        total = (total.0 + got.0, total.1 + got.1);
        let want = match dir {
            Direction::Outbound => (1024, 30),
            Direction::Inbound => (30, 1024),
        };
        assert_eq!(total, want, "exact totals after the end ({dir:?})");
        // Ended: no longer read, nothing left to flush.
        bytes.a_to_b.fetch_add(5, Ordering::Relaxed);
        assert!(r.drain(no_view, |_| 0).0.is_empty());
    }
}

#[test]
fn a_forgotten_pod_starts_afresh_but_open_connections_still_count_once() {
    let r = recorder();
    let idle = key("10.0.0.1:80", Direction::Outbound);
    let open = key("10.0.0.2:80", Direction::Outbound);
    r.connected(&idle, Ok(Duration::from_micros(900)));
    r.ended(&idle, &relayed(5, 5, End::Closed), None);
    r.connected(&open, Ok(Duration::from_micros(900)));
    let bytes = Arc::new(Counts::default());
    r.relaying(&open, &bytes);
    bytes
        .a_to_b
        .fetch_add(10, std::sync::atomic::Ordering::Relaxed);
    let first = bytes_added(&r.drain(no_view, |_| 0).0);
    assert_eq!(first, (15, 5));
    r.forget_pod(42);
    assert_eq!(r.len(), 1, "only the peer with an open connection stays");
    // Back again: fresh latency samples.
    r.connected(&idle, Ok(Duration::from_micros(7)));
    let (batch, _) = r.drain(no_view, |_| 0);
    let d = &batch
        .iter()
        .find(|(k, _)| k.peer.to_std() == Some(idle.peer))
        .expect("idle peer")
        .1;
    assert_eq!((d.connect_p50_us, d.connect_p99_us), (7, 7));
    // The open connection ends after the forget: only its rest is added.
    bytes
        .a_to_b
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    r.ended(&open, &relayed(11, 0, End::Closed), Some(&bytes));
    assert_eq!(bytes_added(&r.drain(no_view, |_| 0).0), (1, 0));
}

#[test]
fn a_full_recorder_is_shared_between_pods() {
    let r = recorder(); // room for 4 peers
    let of = |pod: u64, peer: &str| {
        PeerKey::new("p", pod, Direction::Outbound, peer.parse().expect("addr"))
    };
    // One pod fills it with unflushed figures.
    for i in 1..=4 {
        r.rejected(&of(1, &format!("10.0.0.{i}:80")), RejectReason::RateLimited);
    }
    // Its fifth peer finds no room: it already holds its share.
    r.rejected(&of(1, "10.0.0.5:80"), RejectReason::RateLimited);
    // Another pod's peer takes the place of one of the first pod's records.
    r.rejected(&of(2, "10.9.9.9:53"), RejectReason::RateLimited);
    let (batch, dropped) = r.drain(no_view, |_| 0);
    assert_eq!(
        dropped, 2,
        "the first pod's fifth record and one it gave way with"
    );
    assert_eq!(batch.len(), 4);
    assert!(
        batch.iter().any(|(k, _)| k.netns_cookie == 2),
        "the second pod is recorded"
    );
    assert_eq!(batch.iter().filter(|(k, _)| k.netns_cookie == 1).count(), 3);
}
