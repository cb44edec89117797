//! Policy file reload end to end: a valid edit applies to new connections (and lifts the
//! kernel verdicts the old policy left); an invalid one is rejected with file, line and
//! field, and the old policy keeps applying, proven by what connections get.
mod common;
mod policy_util;

use std::path::Path;
use std::time::Duration;

use policy_util::attempt;
use sockmesh_tests::*;

/// Replaces the file the way editors and config managers do (write aside, rename over).
fn save(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write the policy file");
    std::fs::rename(&tmp, path).expect("rename it into place");
}

fn rule(server: std::net::Ipv4Addr, knobs: &str) -> String {
    format!("[[rule]]\nname = \"server\"\npeer = \"{server}\"\nports = \"8080\"\n{knobs}\n")
}

/// On both tiers. On the kernel tier the peer is handed over after its first connection, so
/// v1's third attempt is refused at connect() by the kernel's bucket (`K`) where the proxy
/// resets it (`R`); the reload takes the peer back to the proxy (and lifts the verdict),
/// and v2's connections are admitted either way.
#[test]
fn a_valid_edit_applies_and_an_invalid_one_keeps_the_old_policy() {
    reload(Tier::Proxy);
}

#[test]
fn a_valid_edit_applies_and_an_invalid_one_keeps_the_old_policy_on_the_kernel_tier() {
    reload(Tier::Kernel);
}

fn reload(tier: Tier) {
    let (_cluster, client, server_pod, _echo) = common::client_and_echo_server();
    let dir = TempDir::new().expect("tempdir");
    let path = dir.join("policy.toml");
    let server = server_pod.ip4();
    let dst = server_pod.addr4(8080);
    // v1: two connections an hour to the server.
    save(&path, &rule(server, "conn_rate = \"1/h\"\nconn_burst = 2"));
    let policy = path.display().to_string();
    let agent = tier.agent(&client, &["--policy", &policy]);
    let seen: String = (0..4).map(|_| attempt(&client, dst).letter()).collect();
    let want = match tier {
        Tier::Proxy => "AARK",
        Tier::Kernel => "AAKK",
    };
    assert_eq!(
        seen, want,
        "v1 on {tier:?}: burst of two, then refused (reset by the proxy, or at connect() by the kernel tier), then refused in the kernel"
    );

    // v2 lifts the limit: new connections are admitted at once, although the kernel had
    // been told to refuse this peer for the next hour.
    save(&path, &rule(server, "conn_rate = \"off\""));
    agent
        .wait_event_named("policy_reloaded", Duration::from_secs(10))
        .expect("reloaded");
    let seen: String = (0..4).map(|_| attempt(&client, dst).letter()).collect();
    assert_eq!(seen, "AAAA", "v2 applies to new connections");

    // v3 is invalid on line 10; its first rule alone would allow one connection an hour.
    let bad = format!(
        "{}\n[[rule]]\nports = \"9000\"\nconnect_timeout = \"5x\"\n",
        rule(server, "conn_rate = \"1/h\"\nconn_burst = 1")
    );
    save(&path, &bad);
    let ev = agent
        .wait_event_named("policy_rejected", Duration::from_secs(10))
        .expect("rejected");
    let error = ev["error"].as_str().expect("an error message");
    let place = format!("{}:{}:", path.display(), 10);
    assert!(
        error.starts_with(&place) && error.contains("connect_timeout"),
        "the error names file, line and field: {error}"
    );
    // Nothing of v3 applies: v2's unlimited policy does.
    let seen: String = (0..4).map(|_| attempt(&client, dst).letter()).collect();
    assert_eq!(seen, "AAAA", "the old policy keeps applying");
}
