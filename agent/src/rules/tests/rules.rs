//! Which rule wins, and how layers compose. Every case is checked with the rules in
//! both file orders, so the result is shown to come from specificity, not position
//! (except the tie case, which is about position).

use crate::policy::tests::Rng;
use crate::policy::{peer_policy::RateLimit, token_bucket::Rate, Direction, PeerKey, PeerPolicy};
use crate::rules::{
    knobs::Knobs,
    set::{Cidr, PodPattern, PolicySet, PortRange},
};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

fn key(pod: &str, direction: Direction, peer: &str) -> PeerKey {
    let peer: SocketAddr = peer.parse().expect("test socket address");
    PeerKey::new(pod, 1, direction, peer)
}

fn out(pod: &str, peer: &str) -> PeerKey {
    key(pod, Direction::Outbound, peer)
}

fn parse(text: &str) -> PolicySet {
    PolicySet::parse(text, Path::new("test.toml"), Knobs::default())
        .unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// A `[[rule]]` with the given matcher lines, setting connect_timeout to `secs`.
fn rule(matchers: &str, secs: u64) -> String {
    format!("[[rule]]\n{matchers}\nconnect_timeout = \"{secs}s\"\n")
}

fn connect(set: &PolicySet, key: &PeerKey) -> Option<Duration> {
    set.resolve(key).timeouts.connect
}

/// `winner` (1 s) must beat `loser` (2 s) for `key`, whichever comes first.
fn assert_wins(winner: &str, loser: &str, key: &PeerKey) {
    let w = rule(winner, 1);
    let l = rule(loser, 2);
    for text in [format!("{w}{l}"), format!("{l}{w}")] {
        let set = parse(&text);
        assert_eq!(
            connect(&set, key),
            Some(Duration::from_secs(1)),
            "expected {winner:?} to beat {loser:?} for {key:?} in:\n{text}"
        );
    }
}

const POD: &str = "/var/run/netns/shop-1";

#[test]
fn no_rules_gives_the_flag_defaults() {
    let set = parse("");
    assert_eq!(
        set.resolve(&out(POD, "10.0.5.7:5432")),
        PeerPolicy::default()
    );
    let base = Knobs {
        connect_timeout: Some(Duration::from_millis(700)),
        ..Knobs::default()
    };
    let set = PolicySet::new(base);
    assert_eq!(
        connect(&set, &out(POD, "10.0.5.7:5432")),
        Some(Duration::from_millis(700))
    );
}

#[test]
fn pod_exact_beats_glob_beats_any() {
    let k = out(POD, "10.0.5.7:5432");
    assert_wins("pod = \"shop-1\"", "pod = \"shop-*\"", &k);
    assert_wins("pod = \"/var/run/netns/shop-1\"", "pod = \"*\"", &k);
    assert_wins("pod = \"shop-*\"", "", &k);
    assert_wins("pod = \"*\"", "", &k);
    // Between globs, more literal characters; between exact ones, the longer.
    assert_wins("pod = \"shop-*\"", "pod = \"s*\"", &k);
    assert_wins("pod = \"/var/run/netns/shop-*\"", "pod = \"shop-*\"", &k);
    assert_wins("pod = \"/var/run/netns/shop-1\"", "pod = \"shop-1\"", &k);
}

#[test]
fn longer_prefix_beats_shorter_beats_none() {
    let k = out(POD, "10.0.5.7:5432");
    assert_wins("peer = \"10.0.5.0/24\"", "peer = \"10.0.0.0/16\"", &k);
    assert_wins("peer = \"10.0.5.7\"", "peer = \"10.0.5.0/24\"", &k);
    assert_wins("peer = \"10.0.0.0/16\"", "peer = \"0.0.0.0/0\"", &k);
    assert_wins("peer = \"0.0.0.0/0\"", "", &k);
}

#[test]
fn narrower_ports_beat_wider_beat_none() {
    let k = out(POD, "10.0.5.7:5432");
    assert_wins("ports = \"5432\"", "ports = \"5000-6000\"", &k);
    assert_wins("ports = \"5400-5500\"", "ports = \"5000-6000\"", &k);
    assert_wins("ports = \"1-65535\"", "", &k);
    assert_wins("ports = 5432", "ports = \"5432-5433\"", &k);
}

#[test]
fn direction_given_beats_not_given() {
    assert_wins("direction = \"outbound\"", "", &out(POD, "10.0.5.7:5432"));
    assert_wins(
        "direction = \"inbound\"",
        "",
        &key(POD, Direction::Inbound, "10.0.5.7:8080"),
    );
}

#[test]
fn criteria_rank_pod_then_peer_then_ports_then_direction() {
    let k = out(POD, "10.0.5.7:5432");
    // Any pod matcher outranks the narrowest peer, port and direction.
    assert_wins(
        "pod = \"shop-*\"",
        "peer = \"10.0.5.7/32\"\nports = \"5432\"\ndirection = \"outbound\"",
        &k,
    );
    // Then the peer outranks ports and direction.
    assert_wins(
        "peer = \"10.0.0.0/8\"",
        "ports = \"5432\"\ndirection = \"outbound\"",
        &k,
    );
    // Then ports outrank direction.
    assert_wins("ports = \"1-65535\"", "direction = \"outbound\"", &k);
    // Within equal pod matchers, the next criterion decides.
    assert_wins(
        "pod = \"shop-1\"\npeer = \"10.0.5.0/24\"",
        "pod = \"shop-1\"\nports = \"5432\"",
        &k,
    );
}

#[test]
fn ties_go_to_the_later_rule() {
    let k = out(POD, "10.0.5.7:5432");
    let a = rule("peer = \"10.0.5.0/24\"", 1);
    let b = rule("peer = \"10.0.5.0/24\"", 2);
    assert_eq!(
        connect(&parse(&format!("{a}{b}")), &k),
        Some(Duration::from_secs(2))
    );
    assert_eq!(
        connect(&parse(&format!("{b}{a}")), &k),
        Some(Duration::from_secs(1))
    );
    // Different matchers, same specificity: still file order.
    let a = rule("peer = \"10.0.5.0/24\"", 1);
    let b = rule("peer = \"10.0.0.0/24\"\n", 2); // does not match
    let c = rule("peer = \"10.0.4.0/23\"\nports = \"5432\"", 3);
    let d = rule("peer = \"10.0.5.0/24\"\nports = \"5432\"", 4);
    assert_eq!(
        connect(&parse(&format!("{a}{b}{c}{d}")), &k),
        Some(Duration::from_secs(4))
    );
    assert_eq!(
        connect(&parse(&format!("{d}{c}{b}{a}")), &k),
        Some(Duration::from_secs(4))
    );
}

#[test]
fn ipv4_and_ipv6_peers_match_their_own_family() {
    let text = format!(
        "{}{}{}",
        rule("peer = \"10.0.0.0/8\"", 11),
        rule("peer = \"fd00::/8\"", 12),
        rule("peer = \"fd00:5::/32\"", 13),
    );
    let set = parse(&text);
    let s = |n| Some(Duration::from_secs(n));
    assert_eq!(connect(&set, &out(POD, "10.1.2.3:80")), s(11));
    assert_eq!(connect(&set, &out(POD, "[fd00:1::1]:80")), s(12));
    assert_eq!(connect(&set, &out(POD, "[fd00:5::1]:80")), s(13));
    // Neither family's rules leak into the other: no rule, the 3 s default.
    assert_eq!(connect(&set, &out(POD, "11.1.2.3:80")), s(3));
    assert_eq!(connect(&set, &out(POD, "[2001:db8::1]:80")), s(3));
    // An IPv4-mapped IPv6 client (dual-stack socket) is matched as IPv4.
    assert_eq!(connect(&set, &out(POD, "[::ffff:10.1.2.3]:80")), s(11));
    // `0.0.0.0/0` is IPv4 only; `::/0` IPv6 only.
    let set = parse(&format!(
        "{}{}",
        rule("peer = \"0.0.0.0/0\"", 1),
        rule("peer = \"::/0\"", 2)
    ));
    assert_eq!(connect(&set, &out(POD, "10.1.2.3:80")), s(1));
    assert_eq!(connect(&set, &out(POD, "[::1]:80")), s(2));
    assert_eq!(connect(&set, &out(POD, "[::ffff:10.1.2.3]:80")), s(1));
}

#[test]
fn a_rule_matches_only_when_every_matcher_does() {
    let set = parse(&rule(
        "direction = \"outbound\"\npod = \"shop-*\"\npeer = \"10.0.5.0/24\"\nports = \"5000-6000\"",
        1,
    ));
    let hit = Some(Duration::from_secs(1));
    assert_eq!(connect(&set, &out(POD, "10.0.5.7:5432")), hit);
    let default = Some(Duration::from_secs(3));
    for k in [
        key(POD, Direction::Inbound, "10.0.5.7:5432"),
        out("/var/run/netns/cart-1", "10.0.5.7:5432"),
        out(POD, "10.0.6.7:5432"),
        out(POD, "10.0.5.7:6001"),
        out(POD, "[fd00::1]:5432"),
    ] {
        assert_eq!(connect(&set, &k), default, "{k:?}");
    }
}

#[test]
fn pod_patterns_match_path_or_name() {
    let p = |s: &str| PodPattern::parse(s).expect("pattern");
    // No '/': the last path component.
    assert!(p("shop-1").matches("/var/run/netns/shop-1"));
    assert!(p("shop-1").matches("shop-1"));
    assert!(!p("shop-1").matches("/var/run/netns/shop-10"));
    assert!(p("shop-*").matches("/var/run/netns/shop-10"));
    assert!(!p("shop-*").matches("/var/run/netns/cart-1"));
    assert!(!p("shop").matches("/var/run/netns/shop-1"));
    // With '/': the whole path.
    assert!(p("/var/run/netns/*").matches("/var/run/netns/x"));
    assert!(!p("/var/run/netns/shop-1").matches("/run/netns/shop-1"));
    assert!(p("/proc/*/ns/net").matches("/proc/1234/ns/net"));
    // '*' spans '/', and is the only special character.
    assert!(p("/var/*/shop-1").matches("/var/run/netns/shop-1"));
    assert!(p("a*b*c").matches("axxbyyc"));
    assert!(p("a*b*c").matches("abc"));
    assert!(!p("a*b*c").matches("acb"));
    assert!(p("**").matches(""));
    assert!(p("x?").matches("x?"));
    assert!(!p("x?").matches("xy"));
    assert!(p("[ab]").matches("[ab]"));
    assert!(PodPattern::parse(" ").is_err());
}

#[test]
fn cidrs_and_port_ranges_parse_strictly() {
    let c = Cidr::parse("10.0.5.0/24").expect("cidr");
    assert_eq!((c.to_string(), c.prefix()), ("10.0.5.0/24".to_string(), 24));
    assert_eq!(Cidr::parse("10.0.5.7").expect("bare").prefix(), 32);
    assert_eq!(Cidr::parse("fd00::1").expect("bare").prefix(), 128);
    let err = Cidr::parse("10.0.5.7/24").expect_err("host bits");
    assert!(err.contains("write 10.0.5.0/24"), "{err}");
    let err = Cidr::parse("fd00::1/8").expect_err("host bits");
    assert!(err.contains("write fd00::/8"), "{err}");
    assert!(Cidr::parse("10.0.0.0/33").is_err());
    assert!(Cidr::parse("shop").is_err());
    // IPv4-mapped blocks are read as IPv4.
    let mapped = Cidr::parse("::ffff:10.0.0.0/104").expect("mapped");
    assert_eq!(mapped.to_string(), "10.0.0.0/8");

    assert_eq!(
        PortRange::parse("5432"),
        Ok(PortRange { lo: 5432, hi: 5432 })
    );
    assert_eq!(
        PortRange::parse("8000-8100"),
        Ok(PortRange { lo: 8000, hi: 8100 })
    );
    assert_eq!(PortRange::parse("8000-8100").map(|p| p.width()), Ok(101));
    for bad in ["0", "65536", "9000-8000", "x", "", "1-"] {
        assert!(PortRange::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn overrides_compose_knob_by_knob() {
    let base = Knobs {
        dns_timeout: Some(Duration::from_secs(4)), // from a flag
        ..Knobs::default()
    };
    let text = r#"
        [defaults]
        idle_timeout = "5m"
        connect_timeout = "2s"

        [[rule]]                 # most specific: sets only max_conns
        pod = "shop-1"
        peer = "10.0.5.0/24"
        max_conns = 50

        [[rule]]                 # less specific: connect timeout and max_conns
        peer = "10.0.5.0/24"
        connect_timeout = "500ms"
        max_conns = 10
        queue = 7

        [[rule]]                 # least specific: bandwidth
        direction = "outbound"
        bandwidth = "1MiB/s"

        [[rule]]                 # does not match: must change nothing
        peer = "10.0.6.0/24"
        idle_timeout = "1s"
    "#;
    let set = PolicySet::parse(text, Path::new("t.toml"), base).expect("valid");
    let p = set.resolve(&out(POD, "10.0.5.7:5432"));
    let t = &p.timeouts;
    assert_eq!(
        t.connect,
        Some(Duration::from_millis(500)),
        "peer rule over [defaults]"
    );
    assert_eq!(
        t.idle,
        Some(Duration::from_secs(300)),
        "[defaults] over the flags"
    );
    assert_eq!(t.dns, Some(Duration::from_secs(4)), "the flag, untouched");
    assert_eq!(t.max_lifetime, None);
    let c = p.concurrency.expect("max_conns set");
    assert_eq!(
        (c.max_concurrent, c.max_queue),
        (50, 7),
        "max_conns from the pod rule, queue from the peer rule"
    );
    let bw = p.bandwidth.expect("bandwidth set");
    assert_eq!(
        bw.rate,
        Rate::new(1 << 20, Duration::from_secs(1)).expect("rate")
    );
    assert_eq!(p.breaker, PeerPolicy::default().breaker);
    assert_eq!(p.adaptive, PeerPolicy::default().adaptive);

    let applied: Vec<_> = set
        .matching(
            &out(POD, "10.0.5.7:5432"),
            &crate::identity::Index::default(),
        )
        .map(|r| r.number)
        .collect();
    assert_eq!(applied, vec![3, 2, 1], "least to most specific");
    assert_eq!(set.rules()[0].label(), "rule #3 (line 17)");
}

#[test]
fn off_in_a_more_specific_rule_disables_a_knob() {
    let text = r#"
        [defaults]
        conn_rate = "100/s"
        max_conns = 20
        [[rule]]
        peer = "10.0.5.0/24"
        conn_rate = "off"
        max_conns = "off"
        breaker_failures = "off"
        adaptive_k = "off"
        connect_timeout = "off"
    "#;
    let set = parse(text);
    let p = set.resolve(&out(POD, "10.0.5.7:5432"));
    assert_eq!(
        (
            p.conn_rate,
            p.concurrency,
            p.breaker,
            p.adaptive,
            p.timeouts.connect
        ),
        (None, None, None, None, None)
    );
    let other = set.resolve(&out(POD, "10.0.6.7:5432"));
    assert_eq!(
        other.conn_rate,
        Some(RateLimit::new(Rate::per_second(100).expect("rate")))
    );
    assert_eq!(other.concurrency.map(|c| c.max_concurrent), Some(20));
}

#[test]
fn a_burst_waits_for_its_rate_from_another_layer() {
    let base = Knobs {
        conn_burst: Some(7), // --peer-conn-burst 7, no --peer-conn-rate
        ..Knobs::default()
    };
    let text = r#"
        [[rule]]
        ports = "5432"
        conn_rate = "10/s"
        [[rule]]
        ports = "6379"
        conn_rate = "10/s"
        conn_burst = 3
        [[rule]]
        ports = "9000"
        bandwidth = "1MB/s"
        bandwidth_burst = "64KiB"
    "#;
    let set = PolicySet::parse(text, Path::new("t.toml"), base).expect("valid");
    let ten = Rate::per_second(10).expect("rate");
    let burst = |port: u16| {
        set.resolve(&out(POD, &format!("10.0.5.7:{port}")))
            .conn_rate
            .map(|l| l.burst)
    };
    assert_eq!(burst(5432), Some(7));
    assert_eq!(burst(6379), Some(3));
    assert_eq!(burst(80), None, "a burst alone enables nothing");
    let p = set.resolve(&out(POD, "10.0.5.7:5432"));
    assert_eq!(
        p.conn_rate,
        Some(RateLimit {
            rate: ten,
            burst: 7
        })
    );
    let bw = set
        .resolve(&out(POD, "10.0.5.7:9000"))
        .bandwidth
        .expect("bw");
    assert_eq!((bw.rate.tokens(), bw.burst), (1_000_000, 64 * 1024));
}

#[test]
fn resolution_ignores_file_order_when_specificities_differ() {
    // Eight rules with pairwise-different specificity, all matching the key; each
    // sets connect_timeout to its own value and one knob only it sets. Any order
    // must give the same policy.
    let matchers = [
        "",
        "direction = \"outbound\"",
        "ports = \"5000-6000\"",
        "ports = \"5432\"",
        "peer = \"10.0.0.0/8\"",
        "peer = \"10.0.5.0/24\"\nports = \"5432\"",
        "pod = \"shop-*\"",
        "pod = \"shop-1\"\ndirection = \"outbound\"",
    ];
    let k = out(POD, "10.0.5.7:5432");
    let mut rng = Rng::new(42);
    let mut expected = None;
    for _ in 0..50 {
        let mut order: Vec<usize> = (0..matchers.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let text: String = order
            .iter()
            .map(|&i| format!("{}queue = {}\n", rule(matchers[i], i as u64 + 1), i))
            .collect();
        let policy = parse(&text).resolve(&k);
        // The last matcher is the most specific: its connect timeout and queue win.
        assert_eq!(policy.timeouts.connect, Some(Duration::from_secs(8)));
        match &expected {
            None => expected = Some(policy),
            Some(e) => assert_eq!(&policy, e, "order {order:?}"),
        }
    }
}

#[test]
fn the_source_resolves_through_the_set() {
    let set = std::sync::Arc::new(parse(&rule("ports = \"5432\"", 1)));
    let source = set.source(crate::identity::Identities::new());
    assert_eq!(
        source(&out(POD, "10.0.5.7:5432")).timeouts.connect,
        Some(Duration::from_secs(1))
    );
    assert_eq!(
        source(&out(POD, "10.0.5.7:80")).timeouts.connect,
        Some(Duration::from_secs(3))
    );
}

#[test]
fn the_worked_example_in_docs_policy_md() {
    let text = r#"
        [defaults]
        idle_timeout = "5m"

        [[rule]]
        peer = "10.0.0.0/16"
        connect_timeout = "2s"
        max_conns = 100

        [[rule]]
        peer = "10.0.5.0/24"
        max_conns = 20

        [[rule]]
        pod = "shop-*"
        connect_timeout = "500ms"
    "#;
    let set = parse(text);
    let k = out(POD, "10.0.5.7:5432");
    let order: Vec<_> = set
        .matching(&k, &crate::identity::Index::default())
        .map(|r| r.number)
        .collect();
    assert_eq!(order, vec![1, 2, 3], "A, B, C");
    let p = set.resolve(&k);
    assert_eq!(p.timeouts.connect, Some(Duration::from_millis(500)));
    assert_eq!(p.concurrency.map(|c| c.max_concurrent), Some(20));
    assert_eq!(p.timeouts.idle, Some(Duration::from_secs(300)));
    assert_eq!(p.breaker, PeerPolicy::default().breaker);
}
