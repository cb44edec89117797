//! The policy flags: defaults agree with the engine's, every flag parses (and
//! rejects) the documented spellings, every env fallback works, and the flags
//! can be flattened into `sockmesh run` without clashing.
//!
//! Env fallbacks are tested in a child process (this test binary re-run on one
//! test with the variables set): setting variables in this process would race
//! with every other test that parses a command line.

use super::reload::{write, TempDir};
use crate::policy::{table::TableConfig, token_bucket::Rate, PeerPolicy};
use crate::rules::{knobs::Knobs, PolicyArgs};
use clap::{CommandFactory, Parser};
use std::process::Command;
use std::time::Duration;

#[derive(Parser, Debug)]
struct Cmd {
    #[command(flatten)]
    policy: PolicyArgs,
}

fn parse(args: &[&str]) -> Result<PolicyArgs, clap::Error> {
    Cmd::try_parse_from(std::iter::once("sockmesh").chain(args.iter().copied())).map(|c| c.policy)
}

fn knobs(args: &[&str]) -> Knobs {
    parse(args)
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
        .knobs()
}

const S: fn(u64) -> Duration = Duration::from_secs;

/// Every `SOCKMESH_*` variable a flag reads, when the test environment sets one
/// (then the no-argument checks below would not be about defaults).
fn env_is_clean() -> bool {
    let clean = Cmd::command()
        .get_arguments()
        .filter_map(|a| a.get_env())
        .all(|name| std::env::var_os(name).is_none());
    if !clean {
        eprintln!("SOCKMESH_* policy variables are set; skipping the defaults check");
    }
    clean
}

#[test]
fn no_flags_give_the_engine_defaults() {
    if !env_is_clean() {
        return;
    }
    let args = parse(&[]).expect("no flags");
    assert_eq!(args.knobs(), Knobs::default());
    assert_eq!(args.defaults(), Ok(PeerPolicy::default()));
    assert_eq!(args.table_config(), TableConfig::default());
    assert_eq!(args.policy_file, None);
}

#[test]
fn every_flag_parses_its_value() {
    let k = knobs(&["--connect-timeout", "500ms"]);
    assert_eq!(k.connect_timeout, Some(Duration::from_millis(500)));
    assert_eq!(knobs(&["--connect-timeout", "off"]).connect_timeout, None);
    assert_eq!(knobs(&["--idle-timeout", "5m"]).idle_timeout, Some(S(300)));
    assert_eq!(knobs(&["--idle-timeout=off"]).idle_timeout, None);
    assert_eq!(
        knobs(&["--max-conn-lifetime", "1h30m"]).max_lifetime,
        Some(S(5400))
    );
    assert_eq!(
        knobs(&["--dns-timeout", "1.5s"]).dns_timeout,
        Some(Duration::from_millis(1500))
    );
    assert_eq!(knobs(&["--dns-timeout", "none"]).dns_timeout, None);
    assert_eq!(
        knobs(&["--peer-conn-rate", "100/s"]).conn_rate,
        Rate::per_second(100)
    );
    assert_eq!(
        knobs(&["--peer-conn-rate", "5/10s"]).conn_rate,
        Rate::new(5, S(10))
    );
    assert_eq!(knobs(&["--peer-conn-burst", "20"]).conn_burst, Some(20));
    assert_eq!(knobs(&["--peer-max-conns", "50"]).max_conns, Some(50));
    assert_eq!(knobs(&["--peer-max-queue", "0"]).queue, 0);
    assert_eq!(
        knobs(&["--peer-bandwidth", "10MiB/s"]).bandwidth,
        Rate::per_second(10 << 20)
    );
    assert_eq!(
        knobs(&["--peer-bandwidth-burst", "1MiB"]).bandwidth_burst,
        Some(1 << 20)
    );
    assert_eq!(
        knobs(&["--peer-bandwidth-burst", "4096"]).bandwidth_burst,
        Some(4096)
    );
    assert_eq!(
        knobs(&["--breaker-failures", "3"]).breaker_failures,
        Some(3)
    );
    assert_eq!(knobs(&["--breaker-failures", "off"]).breaker_failures, None);
    assert_eq!(knobs(&["--breaker-open", "30s"]).breaker_open, S(30));
    assert_eq!(knobs(&["--adaptive-k", "1.5"]).adaptive_k, Some(1.5));
    assert_eq!(knobs(&["--adaptive-k", "off"]).adaptive_k, None);
    assert_eq!(knobs(&["--adaptive-window", "1m"]).adaptive_window, S(60));

    let t = parse(&["--max-peers", "1000", "--peer-idle-expiry", "10m"])
        .expect("table flags")
        .table_config();
    assert_eq!(
        t,
        TableConfig {
            max_peers: 1000,
            idle_expiry: S(600)
        }
    );

    // Together, into the engine's form.
    let p = parse(&[
        "--peer-conn-rate",
        "10/s",
        "--peer-conn-burst",
        "3",
        "--peer-max-conns",
        "8",
        "--peer-max-queue",
        "4",
        "--breaker-failures",
        "2",
        "--breaker-open",
        "1s",
        "--adaptive-k",
        "3",
        "--adaptive-window",
        "30s",
    ])
    .expect("flags")
    .defaults()
    .expect("defaults");
    let rate = p.conn_rate.expect("rate");
    assert_eq!((rate.rate.tokens(), rate.burst), (10, 3));
    let c = p.concurrency.expect("concurrency");
    assert_eq!((c.max_concurrent, c.max_queue), (8, 4));
    let b = p.breaker.expect("breaker");
    assert_eq!((b.failure_threshold, b.open_for), (2, S(1)));
    let a = p.adaptive.expect("adaptive");
    assert_eq!((a.k, a.window), (3.0, S(30)));
}

#[test]
fn bad_values_are_rejected_with_the_flag_and_the_reason() {
    let cases: &[(&str, &str, &str)] = &[
        ("--connect-timeout", "5x", "unknown unit \"x\""),
        ("--connect-timeout", "0", "must be > 0; use off to disable"),
        ("--idle-timeout", "10", "missing unit after 10"),
        ("--max-conn-lifetime", "forever", "expected a number"),
        ("--dns-timeout", "-1s", "expected a number"),
        ("--peer-conn-rate", "100", "expected <amount>/<period>"),
        ("--peer-conn-rate", "0/s", "amount must be at least 1"),
        ("--peer-conn-burst", "0", "must be at least 1"),
        ("--peer-conn-burst", "off", "expected a whole number"),
        ("--peer-max-conns", "0", "use off to disable"),
        ("--peer-max-queue", "-1", "expected a whole number"),
        ("--peer-max-queue", "off", "expected a whole number"),
        ("--peer-bandwidth", "10Mbit/s", "unknown unit"),
        ("--peer-bandwidth-burst", "0", "must be at least 1 byte"),
        ("--breaker-failures", "1.5", "expected a whole number"),
        ("--breaker-open", "0s", "must be > 0"),
        ("--breaker-open", "off", "expected a number"),
        ("--adaptive-k", "0.5", "must be at least 1"),
        ("--adaptive-k", "nan", "expected a number"),
        ("--adaptive-window", "0", "must be > 0"),
        ("--max-peers", "0", "must be at least 1"),
        ("--peer-idle-expiry", "5", "missing unit after 5"),
    ];
    for (flag, value, reason) in cases {
        let err = parse(&[&format!("{flag}={value}")]).expect_err(&format!("{flag} {value}"));
        let shown = err.to_string();
        assert!(
            shown.contains(&format!("invalid value '{value}' for '{flag} "))
                && shown.contains(reason)
                && shown.contains("valid examples"),
            "{flag} {value}: {shown}"
        );
    }
}

#[test]
fn every_flag_has_an_env_fallback_and_says_its_default() {
    let cmd = Cmd::command();
    let mut count = 0;
    for arg in cmd.get_arguments().filter(|a| a.get_long().is_some()) {
        let long = arg.get_long().unwrap_or_default();
        if long == "help" {
            continue;
        }
        count += 1;
        let env = arg.get_env().and_then(|e| e.to_str()).unwrap_or_default();
        let expected = format!("SOCKMESH_{}", long.to_uppercase().replace('-', "_"));
        let expected = if long == "policy" {
            "SOCKMESH_POLICY".to_string()
        } else {
            expected
        };
        assert_eq!(env, expected, "--{long}");
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        assert!(help.len() > 20, "--{long} needs a real help text");
        assert!(
            !arg.get_default_values().is_empty() || help.contains("Default"),
            "--{long} must say its default"
        );
    }
    assert_eq!(count, 18);
    // And clap shows them.
    let help = Cmd::command().render_long_help().to_string();
    for shown in [
        "[default: 3s]",
        "[env: SOCKMESH_PEER_CONN_RATE=]",
        "[default: off]",
        "--peer-idle-expiry",
    ] {
        assert!(help.contains(shown), "--help lacks {shown}:\n{help}");
    }
}

#[test]
fn policy_names_the_file_and_loads_it() {
    let dir = TempDir::new("flags");
    let path = dir.path("p.toml");
    write(&path, "[defaults]\nconnect_timeout = \"750ms\"\n");
    let p = path.to_str().expect("utf-8 temp path");
    let args = parse(&["--policy", p, "--idle-timeout", "9s"]).expect("flags");
    assert_eq!(args.policy_file.as_deref(), Some(path.as_path()));
    let handle = args.policy_handle().expect("loads");
    let set = handle.current();
    assert_eq!(
        set.defaults().connect_timeout,
        Some(Some(Duration::from_millis(750)))
    );
    assert_eq!(set.base().idle_timeout, Some(S(9)));

    write(&path, "[defaults]\nconnect_timeout = 750\n");
    let err = args.policy_handle().err().expect("bad file");
    assert!(err.to_string().starts_with(&format!("{p}:2:19: ")), "{err}");
}

/// Marks the child run; its value picks the scenario.
const CHILD: &str = "SOCKMESH_POLICY_FLAGS_TEST_CHILD";

const ENV: &[(&str, &str)] = &[
    ("SOCKMESH_POLICY", "/etc/sockmesh/p.toml"),
    ("SOCKMESH_CONNECT_TIMEOUT", "250ms"),
    ("SOCKMESH_IDLE_TIMEOUT", "off"),
    ("SOCKMESH_MAX_CONN_LIFETIME", "2h"),
    ("SOCKMESH_DNS_TIMEOUT", "1s"),
    ("SOCKMESH_PEER_CONN_RATE", "50/m"),
    ("SOCKMESH_PEER_CONN_BURST", "5"),
    ("SOCKMESH_PEER_MAX_CONNS", "12"),
    ("SOCKMESH_PEER_MAX_QUEUE", "6"),
    ("SOCKMESH_PEER_BANDWIDTH", "1MB/s"),
    ("SOCKMESH_PEER_BANDWIDTH_BURST", "64KiB"),
    ("SOCKMESH_BREAKER_FAILURES", "off"),
    ("SOCKMESH_BREAKER_OPEN", "20s"),
    ("SOCKMESH_ADAPTIVE_K", "1.25"),
    ("SOCKMESH_ADAPTIVE_WINDOW", "90s"),
    ("SOCKMESH_MAX_PEERS", "64"),
    ("SOCKMESH_PEER_IDLE_EXPIRY", "1m"),
];

/// Runs `env_child` in a child process with `vars` set; returns its output.
fn run_child(scenario: &str, vars: &[(&str, &str)]) -> std::process::Output {
    let exe = std::env::current_exe().expect("test binary");
    let mut cmd = Command::new(exe);
    cmd.args([
        "rules::tests::flags::env_child",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ]);
    for (name, _) in ENV {
        cmd.env_remove(name);
    }
    cmd.envs(vars.iter().copied()).env(CHILD, scenario);
    cmd.output().expect("run the test binary")
}

#[test]
fn every_flag_falls_back_to_its_env_variable() {
    assert_eq!(ENV.len(), 17, "one variable per flag");
    for scenario in ["env", "flag-beats-env"] {
        let out = run_child(scenario, ENV);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{scenario}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("child scenario {scenario} ok")),
            "{stdout}"
        );
    }
    let out = run_child("bad-env", &[("SOCKMESH_PEER_MAX_CONNS", "lots")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("child scenario bad-env ok"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The child half of `every_flag_falls_back_to_its_env_variable`: a no-op in a
/// normal run.
#[test]
fn env_child() {
    let Ok(scenario) = std::env::var(CHILD) else {
        return;
    };
    match scenario.as_str() {
        "env" => {
            let args = parse(&[]).expect("env values parse");
            let k = args.knobs();
            assert_eq!(
                args.policy_file.as_deref(),
                Some(std::path::Path::new("/etc/sockmesh/p.toml"))
            );
            assert_eq!(k.connect_timeout, Some(Duration::from_millis(250)));
            assert_eq!(k.idle_timeout, None);
            assert_eq!(k.max_lifetime, Some(S(7200)));
            assert_eq!(k.dns_timeout, Some(S(1)));
            assert_eq!(k.conn_rate, Rate::new(50, S(60)));
            assert_eq!(k.conn_burst, Some(5));
            assert_eq!(k.max_conns, Some(12));
            assert_eq!(k.queue, 6);
            assert_eq!(k.bandwidth, Rate::per_second(1_000_000));
            assert_eq!(k.bandwidth_burst, Some(64 * 1024));
            assert_eq!(k.breaker_failures, None);
            assert_eq!(k.breaker_open, S(20));
            assert_eq!(k.adaptive_k, Some(1.25));
            assert_eq!(k.adaptive_window, S(90));
            assert_eq!(
                args.table_config(),
                TableConfig {
                    max_peers: 64,
                    idle_expiry: S(60)
                }
            );
        }
        "flag-beats-env" => {
            let k = knobs(&["--connect-timeout", "9s", "--peer-max-conns", "off"]);
            assert_eq!(k.connect_timeout, Some(S(9)));
            assert_eq!(k.max_conns, None);
            assert_eq!(k.dns_timeout, Some(S(1)), "the rest still from env");
        }
        "bad-env" => {
            let err = parse(&[]).expect_err("bad env value");
            let shown = err.to_string();
            assert!(
                shown.contains("invalid value 'lots' for '--peer-max-conns")
                    && shown.contains("expected a whole number"),
                "{shown}"
            );
        }
        other => panic!("unknown scenario {other}"),
    }
    println!("child scenario {scenario} ok");
}
