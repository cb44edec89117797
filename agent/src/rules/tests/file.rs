//! The policy file: the documented example parses to what it says, every knob key
//! is accepted, and every error names file, line, column, field and bad value.

use crate::policy::{token_bucket::Rate, Direction, PeerKey};
use crate::rules::{
    file::PolicyError,
    knobs::{Knobs, KNOB_NAMES},
    set::PolicySet,
};
use std::path::Path;
use std::time::Duration;

fn parse(text: &str) -> Result<PolicySet, PolicyError> {
    PolicySet::parse(text, Path::new("/etc/sockmesh/test.toml"), Knobs::default())
}

const EXAMPLE: &str = include_str!("../../../../docs/policy.example.toml");

#[test]
fn the_documented_example_parses() {
    let set = parse(EXAMPLE).unwrap_or_else(|e| panic!("docs/policy.example.toml: {e}"));
    assert!(!set.rules().is_empty());
    assert!(!set.defaults().is_empty());
    // Every knob appears somewhere in the example, so it documents them all.
    for knob in KNOB_NAMES {
        let named = set.defaults().names().contains(knob)
            || set.rules().iter().any(|r| r.set.names().contains(knob));
        assert!(named, "docs/policy.example.toml never sets {knob}");
    }
}

#[test]
fn every_knob_key_is_accepted_and_parsed() {
    let text = r#"
        [[rule]]
        name = "all"
        direction = "inbound"
        pod = "shop-*"
        peer = "fd00::/64"
        ports = "8000-8100"
        connect_timeout = "500ms"
        idle_timeout = "5m"
        max_lifetime = "1h"
        dns_timeout = "off"
        conn_rate = "100/s"
        conn_burst = 20
        max_conns = 50
        queue = 100
        bandwidth = "10MiB/s"
        bandwidth_burst = "1MiB"
        breaker_failures = 5
        breaker_open = "15s"
        adaptive_k = 2.5
        adaptive_window = "1m"
    "#;
    let set = parse(text).expect("valid");
    let rule = &set.rules()[0];
    assert_eq!(rule.set.names(), KNOB_NAMES.to_vec());
    assert_eq!(rule.name.as_deref(), Some("all"));
    assert_eq!(rule.direction, Some(Direction::Inbound));
    assert_eq!(rule.line, 2);
    let key = PeerKey::new(
        "/var/run/netns/shop-3",
        1,
        Direction::Inbound,
        "[fd00::7]:8080".parse().expect("addr"),
    );
    let k = set.resolve_knobs(&key);
    let s = Duration::from_secs;
    assert_eq!(k.connect_timeout, Some(Duration::from_millis(500)));
    assert_eq!(k.idle_timeout, Some(s(300)));
    assert_eq!(k.max_lifetime, Some(s(3600)));
    assert_eq!(k.dns_timeout, None);
    assert_eq!(k.conn_rate, Rate::per_second(100));
    assert_eq!(k.conn_burst, Some(20));
    assert_eq!(k.max_conns, Some(50));
    assert_eq!(k.queue, 100);
    assert_eq!(k.bandwidth, Rate::per_second(10 << 20));
    assert_eq!(k.bandwidth_burst, Some(1 << 20));
    assert_eq!(k.breaker_failures, Some(5));
    assert_eq!(k.breaker_open, s(15));
    assert_eq!(k.adaptive_k, Some(2.5));
    assert_eq!(k.adaptive_window, s(60));
}

#[test]
fn numbers_may_be_quoted_and_k_may_be_an_integer() {
    let set =
        parse("[defaults]\nmax_conns = \"50\"\nadaptive_k = 3\nqueue = 0\nports_unused = 1\n");
    // (`ports_unused` is unknown: checked below; here only the first three matter.)
    assert!(set.is_err());
    let set = parse("[defaults]\nmax_conns = \"50\"\nadaptive_k = 3\nqueue = 0\n").expect("valid");
    let d = set.defaults();
    assert_eq!(d.max_conns, Some(Some(50)));
    assert_eq!(d.adaptive_k, Some(Some(3.0)));
    assert_eq!(d.queue, Some(0));
}

#[test]
fn an_empty_file_is_the_flags() {
    let set = parse("# nothing yet\n").expect("valid");
    assert!(set.rules().is_empty() && set.defaults().is_empty());
    assert_eq!(set.path(), Some(Path::new("/etc/sockmesh/test.toml")));
}

/// (file text, line, column, field, value as written, part of the message)
type Case = (
    &'static str,
    usize,
    usize,
    &'static str,
    &'static str,
    &'static str,
);

const CASES: &[Case] = &[
    // Bad knob values, in a rule and in [defaults].
    (
        "[[rule]]\nname = \"payments db\"\nconnect_timeout = \"5x\"\n",
        3, 19, "connect_timeout", "\"5x\"",
        "invalid timeout: unknown unit \"x\"; use h, m, s, ms, us or ns (valid examples: 500ms, 3s, off)",
    ),
    (
        "[defaults]\nidle_timeout = \"0\"\n",
        2, 16, "idle_timeout", "\"0\"", "must be > 0; use off to disable",
    ),
    (
        "[defaults]\nconnect_timeout = 500\n",
        2, 19, "connect_timeout", "500", "missing unit after 500",
    ),
    (
        "[defaults]\nconnect_timeout = false\n",
        2, 19, "connect_timeout", "false",
        "expected a string or a number, found a boolean (false)",
    ),
    (
        "[[rule]]\nports = \"80\"\nconn_rate = \"0/s\"\n",
        3, 13, "conn_rate", "\"0/s\"", "amount must be at least 1",
    ),
    (
        "[[rule]]\nports = \"80\"\nconn_rate = \"100\"\n",
        3, 13, "conn_rate", "\"100\"", "expected <amount>/<period> (valid examples: 100/s, 6000/m, off)",
    ),
    (
        "[[rule]]\nports = \"80\"\nbandwidth = \"10Mbit/s\"\n",
        3, 13, "bandwidth", "\"10Mbit/s\"", "unknown unit",
    ),
    (
        "[[rule]]\nports = \"80\"\nbandwidth_burst = \"0\"\n",
        3, 19, "bandwidth_burst", "\"0\"", "must be at least 1 byte",
    ),
    (
        "[[rule]]\nports = \"80\"\nmax_conns = 0\n",
        3, 13, "max_conns", "0", "must be at least 1; use off to disable (valid examples: 50, off)",
    ),
    (
        "[[rule]]\nports = \"80\"\nmax_conns = -3\n",
        3, 13, "max_conns", "-3", "expected a whole number",
    ),
    (
        "[[rule]]\nports = \"80\"\nqueue = 1.5\n",
        3, 9, "queue", "1.5", "expected a whole number",
    ),
    (
        "[[rule]]\nports = \"80\"\nconn_burst = 0\n",
        3, 14, "conn_burst", "0", "must be at least 1",
    ),
    (
        "[[rule]]\nports = \"80\"\nbreaker_failures = 99999999999\n",
        3, 20, "breaker_failures", "99999999999", "too large",
    ),
    (
        "[[rule]]\nports = \"80\"\nbreaker_open = \"0s\"\n",
        3, 16, "breaker_open", "\"0s\"", "must be > 0",
    ),
    (
        "[[rule]]\nports = \"80\"\nadaptive_k = 0.5\n",
        3, 14, "adaptive_k", "0.5", "must be at least 1",
    ),
    (
        "[[rule]]\nports = \"80\"\nadaptive_k = \"inf\"\n",
        3, 14, "adaptive_k", "\"inf\"", "expected a number",
    ),
    (
        "[[rule]]\nports = \"80\"\nadaptive_window = [1]\n",
        3, 19, "adaptive_window", "[1]", "found an array",
    ),
    // Matchers.
    (
        "[[rule]]\ndirection = \"out\"\nmax_conns = 1\n",
        2, 13, "direction", "\"out\"", "must be \"outbound\" or \"inbound\"",
    ),
    (
        "[[rule]]\npeer = \"10.0.5.7/24\"\nmax_conns = 1\n",
        2, 8, "peer", "\"10.0.5.7/24\"", "write 10.0.5.0/24",
    ),
    (
        "[[rule]]\npeer = \"10.0.5.0/40\"\nmax_conns = 1\n",
        2, 8, "peer", "\"10.0.5.0/40\"", "prefix length must be 0-32",
    ),
    (
        "[[rule]]\npeer = 10\nmax_conns = 1\n",
        2, 8, "peer", "10", "expected a string, found an integer; e.g. peer = \"10.0.5.0/24\"",
    ),
    (
        "[[rule]]\nports = \"9000-8000\"\nmax_conns = 1\n",
        2, 9, "ports", "\"9000-8000\"", "is backwards: write 8000-9000",
    ),
    (
        "[[rule]]\nports = 70000\nmax_conns = 1\n",
        2, 9, "ports", "70000", "is not a port (1-65535)",
    ),
    (
        "[[rule]]\npod = \"\"\nmax_conns = 1\n",
        2, 7, "pod", "\"\"", "empty pod pattern",
    ),
    (
        "[[rule]]\nname = \"\"\nmax_conns = 1\n",
        2, 8, "name", "\"\"", "empty name",
    ),
    // Whole rules.
    (
        "[[rule]]\nname = \"x\"\nmax_conns = 1\n\n[[rule]]\nname = \"x\"\nmax_conns = 2\n",
        6, 8, "name", "\"x\"", "duplicate rule name: rule #1 (line 1) has it already",
    ),
    (
        "[defaults]\nmax_conns = 1\n\n[[rule]]\npeer = \"10.0.0.0/8\"\n",
        4, 1, "rule", "[[rule]]", "the rule sets no knob",
    ),
    // Structure and syntax, reported by the TOML parser.
    (
        "[[rule]]\nports = \"80\"\nconect_timeout = \"1s\"\n",
        3, 1, "conect_timeout", "\"1s\"",
        "unknown key `conect_timeout`; valid keys here: `name`, `direction`, `pod`, `peer`, `ports`, `service`, `peer_namespace`, `peer_workload`, `peer_labels`, `namespace`, `workload`, `labels`, `connect_timeout`",
    ),
    (
        "[defaults]\nports = \"80\"\n",
        2, 1, "ports", "\"80\"", "unknown key `ports`; valid keys here: `connect_timeout`",
    ),
    (
        "[default]\nmax_conns = 1\n",
        1, 2, "default", "[default]", "unknown key `default`; valid keys here: `defaults` or `rule` (did you mean `defaults`?)",
    ),
    (
        "[rule]\nmax_conns = 1\n",
        1, 1, "rule", "[rule]", "write each rule as a [[rule]] table (double brackets)",
    ),
    (
        "[[defaults]]\nmax_conns = 1\n",
        1, 1, "defaults", "[[defaults]]", "[defaults] is one table: write it with single brackets, once",
    ),
    (
        "rule = 5\n",
        1, 8, "rule", "5", "invalid type: integer `5`, expected a sequence",
    ),
    (
        "[[rule]]\nname = \"unterminated\nmax_conns = 1\n",
        2, 21, "name", "\"unterminated", "invalid basic string",
    ),
    (
        "[[rule]]\nmax_conns = 1\nmax_conns = 2\n",
        3, 1, "max_conns", "2", "duplicate key",
    ),
];

#[test]
fn every_error_names_file_line_field_and_value() {
    for &(text, line, column, field, value, message) in CASES {
        let err = match parse(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e,
        };
        let shown = err.to_string();
        let ctx = format!("\n{text}\n=> {shown}\n   {err:?}");
        assert_eq!(err.path, Path::new("/etc/sockmesh/test.toml"), "{ctx}");
        assert_eq!((err.line, err.column), (line, column), "position{ctx}");
        assert_eq!(err.field.as_deref(), Some(field), "field{ctx}");
        assert_eq!(err.value.as_deref(), Some(value), "value{ctx}");
        assert!(err.message.contains(message), "message{ctx}");
        // The one-line message carries all of it.
        assert!(
            shown.starts_with(&format!("/etc/sockmesh/test.toml:{line}:{column}: ")),
            "{ctx}"
        );
        assert!(shown.contains(field) && shown.contains(value), "{ctx}");
        assert!(!shown.contains('\n'), "one line{ctx}");
    }
}

#[test]
fn errors_say_which_section_they_are_in() {
    let err =
        parse("[[rule]]\nname = \"payments db\"\nconnect_timeout = \"5x\"\n").expect_err("bad");
    assert_eq!(err.section.as_deref(), Some("rule #1 \"payments db\""));
    assert_eq!(
        err.to_string(),
        "/etc/sockmesh/test.toml:3:19: rule #1 \"payments db\": connect_timeout = \"5x\": \
         invalid timeout: unknown unit \"x\"; use h, m, s, ms, us or ns \
         (valid examples: 500ms, 3s, off)"
    );
    let err = parse("[defaults]\nidle_timeout = \"1x\"\n").expect_err("bad");
    assert_eq!(err.section.as_deref(), Some("[defaults]"));
    // Parser errors locate the section from the headers above them.
    let err =
        parse("[[rule]]\nqueue = 1\n[[rule]]\nqueue = 1\n[[rule]]\nqeue = 1\n").expect_err("bad");
    assert_eq!(err.section.as_deref(), Some("rule #3"));
    let err = parse("[defaults]\nbogus = 1\n").expect_err("bad");
    assert_eq!(err.section.as_deref(), Some("[defaults]"));
    // Header errors show the header once, not as a section too.
    let err = parse("[default]\nmax_conns = 1\n").expect_err("bad");
    assert_eq!(err.section, None);
    assert!(
        err.to_string()
            .starts_with("/etc/sockmesh/test.toml:1:2: [default]: unknown key `default`"),
        "{err}"
    );
    let err = parse("[[rule]]\nports = 80\n").expect_err("no knob");
    assert!(
        err.to_string()
            .starts_with("/etc/sockmesh/test.toml:1:1: rule #1: [[rule]]: the rule sets no knob"),
        "{err}"
    );
    // A near miss is named.
    let err = parse("[[rule]]\nports = 80\nconect_timeout = \"1s\"\n").expect_err("typo");
    assert!(
        err.message.ends_with("(did you mean `connect_timeout`?)"),
        "{err}"
    );
    let err = parse("[[rule]]\nports = 80\nfrobnicate = 1\n").expect_err("unknown");
    assert!(!err.message.contains("did you mean"), "{err}");
}

#[test]
fn an_unreadable_file_names_the_file() {
    let path = Path::new("/nonexistent/sockmesh/policy.toml");
    let err = PolicySet::load(path, Knobs::default()).expect_err("missing");
    assert_eq!((err.line, err.column), (0, 0));
    assert_eq!(err.path, path);
    let shown = err.to_string();
    assert!(
        shown.starts_with("/nonexistent/sockmesh/policy.toml: cannot read the policy file: "),
        "{shown}"
    );
}
