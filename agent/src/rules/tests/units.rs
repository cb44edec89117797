use crate::policy::adaptive::AdaptiveConfig;
use crate::policy::breaker::BreakerConfig;
use crate::policy::peer_policy::{PeerPolicy, RateLimit};
use crate::policy::tests::{dms, Rng};
use crate::policy::timeouts::Timeouts;
use crate::policy::token_bucket::Rate;
use crate::rules::units::{
    format_duration, format_size, parse_bandwidth, parse_duration, parse_rate, parse_size,
    parse_timeout,
};
use std::time::Duration;

fn rate(tokens: u64, per: Duration) -> Rate {
    Rate::new(tokens, per).expect("valid test rate")
}

#[test]
fn durations_accepted() {
    let ns = Duration::from_nanos;
    let cases: &[(&str, Duration)] = &[
        ("500ms", dms(500)),
        ("2s", Duration::from_secs(2)),
        ("1m", Duration::from_secs(60)),
        ("1h", Duration::from_secs(3600)),
        ("1h30m", Duration::from_secs(5400)),
        ("1m30s", Duration::from_secs(90)),
        ("1s500ms", dms(1500)),
        ("1.5s", dms(1500)),
        ("0.25h", Duration::from_secs(900)),
        ("0.000000001s", ns(1)),
        ("1.999999999s", ns(1_999_999_999)),
        ("250us", Duration::from_micros(250)),
        ("250µs", Duration::from_micros(250)),
        ("250μs", Duration::from_micros(250)),
        ("7ns", ns(7)),
        ("1h1m1s1ms1us1ns", ns(3_661_001_001_001)),
        ("90m", Duration::from_secs(5400)),
        ("1h90m", Duration::from_secs(9000)),
        ("0", Duration::ZERO),
        ("0s", Duration::ZERO),
        ("007s", Duration::from_secs(7)),
        ("  2s\t", Duration::from_secs(2)),
        ("18446744073709551615ns", ns(u64::MAX)),
        ("5124095h", Duration::from_secs(5_124_095 * 3600)),
    ];
    for (input, expected) in cases {
        assert_eq!(parse_duration(input), Ok(*expected), "{input}");
    }
}

#[test]
fn durations_rejected_with_the_reason() {
    let cases: &[(&str, &str)] = &[
        ("", "empty value"),
        ("   ", "empty value"),
        ("5", "missing unit after 5"),
        ("1m30", "missing unit after 30"),
        ("5x", "unknown unit \"x\""),
        ("1S", "unknown unit \"S\""),
        ("1 s", "unknown unit \" s\""),
        ("1d", "unknown unit \"d\""),
        ("s", "expected a number, found 's'"),
        ("-1s", "expected a number, found '-'"),
        ("+1s", "expected a number, found '+'"),
        (".5s", "expected a number, found '.'"),
        ("1.s", "missing digits after '.'"),
        ("1.0000000001s", "more than 9 decimal places"),
        ("30s1m", "out of order"),
        ("1s1s", "repeated or out of order"),
        ("1us1µs", "repeated or out of order"),
        ("18446744073709551616ns", "too large"),
        ("5124096h", "too large"),
        ("99999999999999999999999999999999999999999h", "too large"),
        ("5124095h1h", "repeated or out of order"),
        ("5124095h59m59s", "too large"),
    ];
    for (input, reason) in cases {
        let err = parse_duration(input).expect_err(input);
        assert!(err.reason.contains(reason), "{input}: {}", err.reason);
        assert_eq!(err.kind, "duration");
        assert_eq!(err.input, *input);
    }
}

#[test]
fn error_message_names_the_value_and_shows_examples() {
    let err = parse_duration("5x").expect_err("bad unit");
    assert_eq!(
        err.to_string(),
        "invalid duration \"5x\": unknown unit \"x\"; use h, m, s, ms, us or ns \
         (valid examples: 500ms, 2s, 1m30s)"
    );
    let err = parse_rate("0/s").expect_err("zero");
    assert_eq!(
        err.to_string(),
        "invalid rate \"0/s\": amount must be at least 1; leave the limit unset to \
         disable it (valid examples: 100/s, 6000/m, 5/10s)"
    );
    let err = parse_size("10Mbit").expect_err("bits");
    assert_eq!(
        err.to_string(),
        "invalid size \"10Mbit\": unknown unit \"Mbit\"; use B, KB, MB, GB, KiB, MiB or \
         GiB (valid examples: 512KiB, 10MiB, 1MB)"
    );
}

#[test]
fn format_duration_is_canonical() {
    assert_eq!(format_duration(Duration::ZERO), "0s");
    assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
    assert_eq!(format_duration(dms(1500)), "1s500ms");
    assert_eq!(format_duration(Duration::from_nanos(1)), "1ns");
    assert_eq!(format_duration(Duration::from_secs(86400)), "24h");
}

#[test]
fn duration_round_trips_for_any_value() {
    let mut rng = Rng::new(1);
    for _ in 0..20_000 {
        let d = Duration::from_nanos(rng.any_magnitude());
        assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{d:?}");
    }
}

#[test]
fn parsers_never_panic_on_noise() {
    // Random strings over the characters the grammars care about: every result is
    // either an error or a value that reformats and reparses to itself.
    const ALPHABET: &[&str] = &[
        "0",
        "1",
        "5",
        "9",
        ".",
        "/",
        "h",
        "m",
        "s",
        "ms",
        "us",
        "µ",
        "ns",
        "k",
        "K",
        "i",
        "B",
        "M",
        "G",
        "T",
        " ",
        "-",
        "x",
        "99999999999",
    ];
    let mut rng = Rng::new(2);
    for _ in 0..30_000 {
        let len = rng.below(8);
        let input: String = (0..len)
            .map(|_| ALPHABET[rng.below(ALPHABET.len() as u64) as usize])
            .collect();
        if let Ok(d) = parse_duration(&input) {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{input:?}");
        }
        if let Ok(n) = parse_size(&input) {
            assert_eq!(parse_size(&format_size(n)), Ok(n), "{input:?}");
        }
        if let Ok(r) = parse_rate(&input) {
            assert_eq!(parse_rate(&r.to_string()), Ok(r), "{input:?}");
        }
        let _ = parse_bandwidth(&input);
        let _ = parse_timeout(&input);
    }
}

#[test]
fn sizes() {
    let cases: &[(&str, u64)] = &[
        ("42", 42),
        ("42B", 42),
        ("42b", 42),
        ("100k", 100_000),
        ("100K", 100_000),
        ("1kb", 1_000),
        ("1KB", 1_000),
        ("1MB", 1_000_000),
        ("1m", 1_000_000),
        ("2GB", 2_000_000_000),
        ("1TB", 1_000_000_000_000),
        ("512KiB", 524_288),
        ("512Ki", 524_288),
        ("10MiB", 10_485_760),
        ("10mib", 10_485_760),
        ("1GiB", 1 << 30),
        ("16384TiB", 1 << 54),
        ("1.5MiB", 1_572_864),
        ("1.5KB", 1_500),
        ("0.5B", 0),
        ("0.5KiB", 512),
        ("0.001KB", 1),
        ("18446744073709551615", u64::MAX),
    ];
    for (input, expected) in cases {
        assert_eq!(parse_size(input), Ok(*expected), "{input}");
    }
    for bad in [
        "",
        "MiB",
        "-1",
        "10 MiB",
        "10Mbit",
        "1EiB",
        "1.5.5MB",
        "18446744073709551616",
        "20000000TiB",
    ] {
        let err = parse_size(bad).expect_err(bad);
        assert_eq!((err.kind, err.input.as_str()), ("size", bad));
    }
}

#[test]
fn format_size_round_trips() {
    assert_eq!(format_size(10_485_760), "10MiB");
    assert_eq!(format_size(1_000_000), "1MB");
    assert_eq!(format_size(1500), "1500B");
    assert_eq!(format_size(0), "0B");
    let mut rng = Rng::new(3);
    for _ in 0..20_000 {
        let n = rng.any_magnitude();
        assert_eq!(parse_size(&format_size(n)), Ok(n), "{n}");
    }
}

#[test]
fn rates() {
    let s = Duration::from_secs;
    assert_eq!(parse_rate("100/s"), Ok(rate(100, s(1))));
    assert_eq!(parse_rate("6000/m"), Ok(rate(6000, s(60))));
    assert_eq!(parse_rate("1/h"), Ok(rate(1, s(3600))));
    assert_eq!(parse_rate("5/10s"), Ok(rate(5, s(10))));
    assert_eq!(parse_rate("3/1m30s"), Ok(rate(3, s(90))));
    assert_eq!(parse_rate("1/100ms"), Ok(rate(1, dms(100))));
    assert_eq!(parse_rate("1/24h"), Ok(rate(1, s(86_400))));
    assert_eq!(parse_rate(" 100/s "), Ok(rate(100, s(1))));
    for (bad, reason) in [
        ("0/s", "at least 1"),
        ("100", "expected <amount>/<period>"),
        ("100/", "expected <amount>/<period>"),
        ("/s", "expected <amount>/<period>"),
        ("1.5/s", "whole number"),
        ("-1/s", "whole number"),
        ("1k/s", "whole number"),
        ("100/x", "period: expected a number"),
        ("100/S", "period: expected a number"),
        ("1/25h", "at most 24h"),
        ("1/0s", "must be > 0"),
        ("1/s/s", "period"),
        ("18446744073709551616/s", "count too large"),
    ] {
        let err = parse_rate(bad).expect_err(bad);
        assert!(err.reason.contains(reason), "{bad}: {}", err.reason);
        assert_eq!(err.kind, "rate");
    }
}

#[test]
fn bandwidths() {
    let s = Duration::from_secs;
    assert_eq!(parse_bandwidth("10MiB/s"), Ok(rate(10_485_760, s(1))));
    assert_eq!(parse_bandwidth("1.5MB/s"), Ok(rate(1_500_000, s(1))));
    assert_eq!(parse_bandwidth("100k/s"), Ok(rate(100_000, s(1))));
    assert_eq!(parse_bandwidth("1GiB/m"), Ok(rate(1 << 30, s(60))));
    assert_eq!(parse_bandwidth("512/s"), Ok(rate(512, s(1))));
    for bad in ["0MB/s", "10Mbit/s", "10MiB", "10MiB/0s", "0.1B/s"] {
        let err = parse_bandwidth(bad).expect_err(bad);
        assert_eq!((err.kind, err.input.as_str()), ("bandwidth", bad));
        assert_eq!(err.example, "10MiB/s, 1.5MB/s, 100k/s");
    }
}

#[test]
fn timeouts() {
    assert_eq!(parse_timeout("off"), Ok(None));
    assert_eq!(parse_timeout("OFF"), Ok(None));
    assert_eq!(parse_timeout("none"), Ok(None));
    assert_eq!(parse_timeout("500ms"), Ok(Some(dms(500))));
    for bad in ["0", "0s", "0.0s"] {
        let err = parse_timeout(bad).expect_err(bad);
        assert!(err.reason.contains("use off to disable"), "{bad}");
        assert_eq!(err.kind, "timeout");
    }
    let err = parse_timeout("soon").expect_err("soon");
    assert_eq!(err.kind, "timeout");
    assert_eq!(err.example, "500ms, 3s, off");
}

#[test]
fn policy_defaults() {
    let p = PeerPolicy::default();
    assert_eq!(p.timeouts, Timeouts::default());
    assert_eq!(p.breaker, Some(BreakerConfig::default()));
    assert_eq!(p.adaptive, Some(AdaptiveConfig::default()));
    assert_eq!(
        (p.conn_rate, p.bandwidth, p.concurrency),
        (None, None, None)
    );
}

#[test]
fn rate_limit_burst_defaults_to_one_period() {
    let limit = RateLimit::new(rate(6000, Duration::from_secs(60)));
    assert_eq!(limit.burst, 6000);
    let bw = RateLimit::new(rate(10_485_760, Duration::from_secs(1)));
    assert_eq!(bw.burst, 10_485_760);
}
