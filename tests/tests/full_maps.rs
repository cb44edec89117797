//! Full maps evict and count, never crash: another tool on the node (here the test, through
//! the pinned maps) fills SM_SOCKETS and SM_ORIG_TUPLE, the two maps every redirected
//! connection writes, with twice their capacity of junk. Both are LRU maps, so the programs'
//! inserts evict the stalest junk instead of failing: mesh connections keep being captured and
//! answered, and the counters say exactly that (map_full and origin_miss stay 0).
mod common;

use std::path::Path;

use common::{client_and_echo_server, counter, ECHO_PORT, T};
use sockmesh_common::{map_names, map_sizes, SockAddr, SocketEntry, TupleKey};
use sockmesh_tests::bpfmap::{bytes_of, PinnedMap};
use sockmesh_tests::*;

/// Junk per map: twice what it holds, so every slot has been overwritten at least once.
const JUNK: u64 = 2 * map_sizes::ORIGINS as u64;
/// Connections pushed through the mesh once the maps are full of junk.
const CONNECTIONS: u64 = 50;

/// Socket cookies count up from 1; nothing real reaches the top bit.
fn junk_cookie(i: u64) -> u64 {
    1 << 63 | i
}

/// A namespace cookie no pod has (cookies count up from 1 too).
const JUNK_NETNS: u64 = u64::MAX - 7;

fn junk_tuple(i: u64) -> TupleKey {
    TupleKey {
        netns_cookie: JUNK_NETNS,
        src: SockAddr::v4(u32::to_be(0x7f00_0001), (i as u16).to_be()),
        dst: SockAddr::v4(u32::to_be(0x7f00_0001 + (i >> 16) as u32), 15001u16.to_be()),
    }
}

fn open<K, V>(dir: &Path, name: &str) -> PinnedMap {
    PinnedMap::open(
        &dir.join(name),
        std::mem::size_of::<K>(),
        std::mem::size_of::<V>(),
    )
    .unwrap_or_else(|e| panic!("open pinned {name}: {e}"))
}

/// How many keys of `map` are junk (per `is_junk`), and how many there are in all.
fn census(map: &PinnedMap, is_junk: impl Fn(&[u8]) -> bool) -> (usize, usize) {
    let keys = map
        .keys(2 * map_sizes::ORIGINS as usize)
        .expect("walk the map");
    let junk = keys.iter().filter(|k| is_junk(k)).count();
    (junk, keys.len())
}

#[test]
fn full_origin_maps_evict_junk_and_mesh_connections_keep_working() {
    let (_cluster, client, server_pod, _server) = client_and_echo_server();
    let agent = Agent::start(["--pod", &pod_spec(&client, "")]).expect("agent");
    agent.wait_ready().expect("ready");
    let dst = server_pod.addr4(ECHO_PORT);
    assert!(common::redirected(&client, dst), "captured before the fill");

    let dir = agent.bpffs_dir();
    let sockets = open::<u64, SocketEntry>(dir, map_names::SOCKETS);
    let tuples = open::<TupleKey, SockAddr>(dir, map_names::ORIGIN_BY_TUPLE);
    let junk_entry = SocketEntry::default();
    let junk_origin = SockAddr::v4(u32::to_be(0x0a00_0001), 9u16.to_be());
    for i in 0..JUNK {
        // An LRU map takes every update, evicting when full: none may fail.
        sockets
            .update(bytes_of(&junk_cookie(i)), bytes_of(&junk_entry))
            .unwrap_or_else(|e| panic!("junk socket {i}: {e}"));
        tuples
            .update(bytes_of(&junk_tuple(i)), bytes_of(&junk_origin))
            .unwrap_or_else(|e| panic!("junk tuple {i}: {e}"));
    }
    let is_junk_socket = |k: &[u8]| k[7] & 0x80 != 0;
    let is_junk_tuple = |k: &[u8]| k[..8] == JUNK_NETNS.to_ne_bytes();
    let cap = map_sizes::ORIGINS as usize;
    for (name, map, is_junk) in [
        (
            "SM_SOCKETS",
            &sockets,
            &is_junk_socket as &dyn Fn(&[u8]) -> bool,
        ),
        ("SM_ORIG_TUPLE", &tuples, &is_junk_tuple),
    ] {
        let (junk, all) = census(map, is_junk);
        eprintln!("[full_maps] {name}: {junk} junk of {all} entries (capacity {cap})");
        assert!(all <= cap, "{name} holds {all} > {cap}");
        // LRU eviction frees a batch at a time, so "full" is close to, not exactly, capacity.
        assert!(
            junk >= cap * 3 / 4,
            "{name} is full of junk: {junk} of {cap}"
        );
    }

    let before: Vec<u64> = ["redirect_tcp", "origin_hit", "origin_miss", "map_full"]
        .iter()
        .map(|c| counter(&agent, &client, c))
        .collect();
    // Each connection needs a fresh SM_SOCKETS entry (connect4) and SM_ORIG_TUPLE entry
    // (sock_ops), then the proxy's SO_ORIGINAL_DST finds it (getsockopt), or the echo fails.
    for i in 0..CONNECTIONS {
        let mut c = tcp_connect(&client, dst, T).unwrap_or_else(|e| panic!("connect {i}: {e}"));
        assert!(c.local.ip().is_loopback(), "connection {i} captured");
        tcp_echo_roundtrip(&mut c.stream, format!("full {i}").as_bytes())
            .unwrap_or_else(|e| panic!("echo {i} through the mesh: {e:#}"));
    }
    let after: Vec<u64> = ["redirect_tcp", "origin_hit", "origin_miss", "map_full"]
        .iter()
        .map(|c| counter(&agent, &client, c))
        .collect();
    let delta: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(
        delta,
        vec![CONNECTIONS, CONNECTIONS, 0, 0],
        "redirect_tcp, origin_hit, origin_miss, map_full over {CONNECTIONS} connections: \
         every insert evicted junk, none was refused"
    );
    // Junk was what made room: fewer junk entries now, the maps still within capacity.
    let (junk, all) = census(&sockets, is_junk_socket);
    assert!(all <= cap, "SM_SOCKETS holds {all} > {cap}");
    assert!(junk < cap, "junk was evicted: {junk}");
    assert!(agent.is_running(), "the agent did not crash");
    assert!(
        common::redirected(&client, dst),
        "still captured at the end"
    );
}
