//! Every pinned map read with field names while real traffic flows, by the standard tool
//! (`bpftool map dump pinned`: the maps carry BTF for their keys and values) and by `sockmesh
//! maps dump NAME --json` (the same maps with counters and addresses decoded from the schema).
//! The figures are checked against what the test did.
mod common;
mod operator_util;
mod policy_util;

use std::time::{Duration, Instant};

use operator_util::{setup_on, traffic, HELD, SMALL};
use serde_json::Value;
use sockmesh_common::{counter, peer::direction, peer::throttle_reason};
use sockmesh_tests::Agent;

/// `bpftool -j map <args> pinned PATH`, parsed.
fn bpftool(args: &[&str], path: &std::path::Path) -> Value {
    let out = std::process::Command::new("bpftool")
        .arg("-j")
        .args(args)
        .arg("pinned")
        .arg(path)
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool {args:?} {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bpftool JSON")
}

/// What bpftool formatted from the map's BTF, entry by entry (`"formatted"`: there only when
/// the map carries key and value types).
fn bpftool_formatted(agent: &Agent, name: &str) -> Vec<Value> {
    let dump = bpftool(&["map", "dump"], &agent.bpffs_dir().join(name));
    dump.as_array()
        .expect("an array")
        .iter()
        .map(|e| {
            e.get("formatted")
                .cloned()
                .unwrap_or_else(|| panic!("{name}: bpftool shows no fields (no BTF): {e}"))
        })
        .collect()
}

/// A u64 in bpftool's formatted JSON.
fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// `sockmesh maps <args> --bpffs-dir DIR`: (success, stdout, stderr).
fn maps(agent: &Agent, args: &[&str]) -> (bool, String, String) {
    let dir = agent.bpffs_dir().display().to_string();
    let mut full = vec!["maps"];
    full.extend_from_slice(args);
    full.extend(["--bpffs-dir", dir.as_str()]);
    let (status, out, err) = Agent::run_to_exit(&full).expect("run sockmesh maps");
    (status.success(), out, err)
}

fn dump(agent: &Agent, name: &str) -> Vec<Value> {
    let (ok, out, err) = maps(agent, &["dump", name, "--json"]);
    assert!(ok, "maps dump {name} failed: {err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{name}: {e}: {out}"));
    v.as_array()
        .cloned()
        .unwrap_or_else(|| panic!("{name}: not an array: {v}"))
}

/// Dumps `name` until an entry satisfies `done` (the agent writes its figures about once a
/// second), or 20 s pass; returns that entry, or panics showing the last dump.
fn entry_until(agent: &Agent, name: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let entries = dump(agent, name);
        if let Some(e) = entries.iter().find(|e| done(e)) {
            return e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{name}: no entry as expected in {}",
            Value::Array(entries)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A per-CPU counter summed over the entry's CPUs.
fn per_cpu_sum(e: &Value, counter: &str) -> u64 {
    e["values"]
        .as_array()
        .expect("per-CPU values")
        .iter()
        .map(|v| v["value"]["counters"][counter].as_u64().expect("a number"))
        .sum()
}

#[test]
fn every_pinned_map_dumps_with_named_fields_and_real_values() {
    // Proxy tier: reads the agent's own state of throttled connections (SM_PEER_STATE), which
    // only the proxy tier writes; the kernel tier's figures are in SM_PEER_STATS, and
    // observe.rs shows them on both tiers.
    let mut s = setup_on(&["--fast-path", "off"]);
    traffic(&mut s, &|_| {});
    let agent = &s.agent;
    let cookie = s.client.netns_cookie().expect("netns cookie");
    let pod_name = s.client.netns_path().display().to_string();
    let (echo, silent) = (s.echo_addr.to_string(), s.silent_addr.to_string());
    let peer_is = |e: &Value, peer: &str| {
        e["key"]["netns_cookie"] == cookie
            && e["key"]["peer"] == peer
            && e["key"]["direction"] == "outbound"
    };

    // The agent's per-peer state: the echo peer with the held connection still open.
    let st = entry_until(agent, "SM_PEER_STATE", |e| {
        peer_is(e, &echo)
            && e["value"]["throttled"]["rate"].as_u64() >= Some(1)
            && e["value"]["bytes_in"].as_u64() >= Some((HELD + 2 * SMALL) as u64)
    });
    let v = &st["value"];
    assert_eq!(v["conns_active"], 1, "the held connection is open: {st}");
    assert!(v["conns_total"].as_u64() >= Some(3), "{st}");
    assert!(
        v["bytes_out"].as_u64() >= Some((HELD + 2 * SMALL) as u64),
        "{st}"
    );
    assert!(
        v["connect_p50_us"].as_u64() > Some(0),
        "a connect latency: {st}"
    );
    assert_eq!(v["throttled"]["breaker"], 0, "{st}");
    assert!(v.get("_pad").is_none(), "padding is not shown: {st}");
    // The silent peer: two connect timeouts opened its breaker.
    let st = entry_until(agent, "SM_PEER_STATE", |e| {
        peer_is(e, &silent) && e["value"]["timeouts"]["connect"].as_u64() >= Some(2)
    });
    assert_eq!(st["value"]["breaker"], "open", "{st}");
    assert_eq!(st["value"]["last_error"], "connect_timeout", "{st}");
    assert_eq!(st["value"]["conns_total"], 0, "{st}");

    // Kernel counters per pod, per CPU: one value per possible CPU, summed as the CLI does.
    let pod = entry_until(agent, "SM_POD_STATS", |e| {
        e["key"]["netns_cookie"] == cookie
    });
    let cpus = std::fs::read_to_string("/sys/devices/system/cpu/possible").expect("cpus");
    assert!(!cpus.trim().is_empty());
    assert!(
        pod["values"].as_array().is_some_and(|a| !a.is_empty()),
        "{pod}"
    );
    assert!(per_cpu_sum(&pod, "redirect_tcp") >= 5, "{pod}");
    assert!(per_cpu_sum(&pod, "fast_reject") >= 1, "{pod}");
    assert_eq!(per_cpu_sum(&pod, "map_full"), 0, "{pod}");
    // Kernel counters per peer, per CPU.
    let pk = entry_until(agent, "SM_PEER_STATS", |e| peer_is(e, &echo));
    assert!(per_cpu_sum(&pk, "redirect") >= 4, "{pk}");
    assert!(per_cpu_sum(&pk, "fast_reject") >= 1, "{pk}");

    // The pod as enrolled, and its name.
    let pc = entry_until(agent, "SM_PODS", |e| e["key"]["netns_cookie"] == cookie);
    assert!(pc["value"]["flags"].as_u64() > Some(0), "{pc}");
    assert_eq!(pc["value"]["exclude_outbound_ports"], serde_json::json!([]));
    let meta = entry_until(agent, "SM_POD_META", |e| e["key"]["netns_cookie"] == cookie);
    assert_eq!(meta["value"]["name"], pod_name.as_str(), "{meta}");
    assert!(
        meta["value"]["enrolled_unix_ms"].as_u64() > Some(0),
        "{meta}"
    );
    // The open breaker is a fast-reject verdict in the kernel.
    let vd = entry_until(agent, "SM_VERDICTS", |e| {
        e["key"]["netns_cookie"] == cookie && e["key"]["peer"] == silent.as_str()
    });
    assert!(vd["value"]["until_ns"].as_u64() > Some(0), "{vd}");
    // Written because the breaker opened: its refusals count as throttled by the breaker.
    assert_eq!(vd["value"]["refusal"], "breaker", "{vd}");
    // The held connection: its socket's original destination, and the agent's own sockets.
    // Socket-local storage lives in the sockets: listed, never walked from outside.
    let (ok, _, err) = maps(agent, &["dump", "SM_SOCK_STORE"]);
    assert!(!ok && err.contains("socket-local storage"), "{err}");
    entry_until(agent, "SM_ORIG_TUPLE", |e| {
        e["key"]["netns_cookie"] == cookie && e["value"]["origin"] == echo.as_str()
    });
    entry_until(agent, "SM_AGENT_SOCKS", |e| {
        e["value"]["pid"] == agent.pid()
    });
    let cfg = entry_until(agent, "SM_CONFIG", |e| e["key"]["index"] == 0);
    assert_eq!(
        cfg["value"]["schema_version"],
        sockmesh_common::SCHEMA_VERSION,
        "{cfg}"
    );
    assert_eq!(cfg["value"]["outbound_port"], 15001, "{cfg}");
    assert!(cfg["value"]["heartbeat_ns"].as_u64() > Some(0), "{cfg}");
    let ag = entry_until(agent, "SM_AGENT_STATS", |e| {
        e["value"]["counters"]["flushes"].as_u64() > Some(0)
    });
    assert_eq!(
        ag["value"]["counters"]["peer_state_write_failed"], 0,
        "{ag}"
    );

    // The standard tool: every map with key and value types carries BTF, so bpftool prints
    // its fields (counters as arrays: their names are the schema's, which `maps dump` adds).
    for m in sockmesh_common::layout::maps::MAPS {
        if m.kind == sockmesh_common::layout::MapKind::RingBuf {
            continue;
        }
        let show = bpftool(&["map", "show"], &agent.bpffs_dir().join(m.name));
        assert!(
            show["btf_id"].as_u64() > Some(0),
            "{}: no BTF: {show}",
            m.name
        );
    }
    let ip4 = |a: std::net::SocketAddr| match a {
        std::net::SocketAddr::V4(v4) => u32::from_ne_bytes(v4.ip().octets()),
        _ => panic!("ipv4 only"),
    };
    let bt_peer_is = |k: &Value, a: std::net::SocketAddr| {
        num(&k["netns_cookie"]) == cookie
            && num(&k["direction"]) == u64::from(direction::OUTBOUND)
            && num(&k["peer"]["addr"][0]) == u64::from(ip4(a))
            && num(&k["peer"]["port"]) == u64::from(a.port().to_be())
    };
    let state = bpftool_formatted(agent, "SM_PEER_STATE");
    let e = state
        .iter()
        .find(|e| bt_peer_is(&e["key"], s.echo_addr))
        .unwrap_or_else(|| panic!("the echo peer in bpftool's SM_PEER_STATE: {state:?}"));
    let v = &e["value"];
    assert_eq!(num(&v["conns_active"]), 1, "{e}");
    assert!(num(&v["bytes_out"]) >= (HELD + 2 * SMALL) as u64, "{e}");
    assert!(num(&v["throttled"][throttle_reason::RATE]) >= 1, "{e}");
    let e = state
        .iter()
        .find(|e| bt_peer_is(&e["key"], s.silent_addr))
        .unwrap_or_else(|| panic!("the silent peer in bpftool's SM_PEER_STATE: {state:?}"));
    assert_eq!(
        num(&e["value"]["timeouts"][0]),
        2,
        "two connect timeouts: {e}"
    );
    // Per-CPU: one value per CPU, as bpftool shows any per-CPU map.
    let stats = bpftool_formatted(agent, "SM_POD_STATS");
    let e = stats
        .iter()
        .find(|e| num(&e["key"]) == cookie)
        .unwrap_or_else(|| panic!("the pod in bpftool's SM_POD_STATS: {stats:?}"));
    let cpus = e["values"].as_array().expect("per-CPU values");
    let sum = |i: usize| -> u64 { cpus.iter().map(|c| num(&c["value"]["counters"][i])).sum() };
    assert!(sum(counter::REDIRECT_TCP) >= 5, "{e}");
    assert!(sum(counter::FAST_REJECT) >= 1, "{e}");
    let meta = bpftool_formatted(agent, "SM_POD_META");
    let e = meta
        .iter()
        .find(|e| num(&e["key"]) == cookie)
        .expect("the pod in bpftool's SM_POD_META");
    let name: Vec<u8> = e["value"]["name"]
        .as_array()
        .expect("name bytes")
        .iter()
        .map(|b| num(b) as u8)
        .take_while(|b| *b != 0)
        .collect();
    assert_eq!(String::from_utf8_lossy(&name), pod_name);

    // The text form names the same fields, in the layout's order.
    let (ok, text, err) = maps(agent, &["dump", "SM_PEER_STATE"]);
    assert!(ok, "{err}");
    assert!(
        text.contains(&format!("peer={echo} direction=outbound")),
        "{text}"
    );
    assert!(
        text.contains("throttled{breaker=0 adaptive=0 rate="),
        "{text}"
    );

    // `maps list` knows every map, all pinned; each one with entries dumps (a ring buffer
    // has none, socket storage's live in the sockets: refused above).
    let (ok, out, err) = maps(agent, &["list", "--json"]);
    assert!(ok, "{err}");
    let list: Value = serde_json::from_str(&out).expect("list JSON");
    for m in list.as_array().expect("array") {
        assert_eq!(m["pinned"], true, "{m}");
        if m["kind"] != "ringbuf" && m["kind"] != "sk_storage" {
            dump(agent, m["name"].as_str().expect("name"));
        }
    }

    // A name the schema does not know is one error naming the known ones.
    let (ok, _, err) = maps(agent, &["dump", "SM_NOPE"]);
    assert!(!ok);
    assert!(
        err.contains("unknown map 'SM_NOPE'") && err.contains("SM_PEER_STATE"),
        "{err}"
    );
}
