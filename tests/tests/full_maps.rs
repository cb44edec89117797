//! Full maps refuse and count, never crash, and never evict a pod's entry for anything else.
//! What the programs remember per socket is in the socket's own storage (`SM_SOCK_STORE`),
//! which nothing outside a socket can fill. The map SO_ORIGINAL_DST answers from
//! (`SM_ORIG_TUPLE`) is a plain hash that pods fill only up to their quotas; here another
//! tool on the node (the test, through the pin) fills it to capacity with junk. A mesh
//! connection then keeps no origin: it is counted (`map_full`), the proxy finds no origin
//! and resets it (no connection goes anywhere unpoliced), the agent keeps running, and once
//! the junk is gone connections are captured and answered again.
mod common;

use std::path::Path;

use common::{client_and_echo_server, counter, ECHO_PORT, T};
use sockmesh_common::{map_names, map_sizes, SockAddr, SocketEntry, TupleKey};
use sockmesh_tests::bpfmap::{bytes_of, PinnedMap};
use sockmesh_tests::*;

/// A namespace cookie no pod has (cookies count up from 1).
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

fn counters(agent: &Agent, pod: &Pod) -> Vec<u64> {
    ["redirect_tcp", "origin_hit", "origin_miss", "map_full"]
        .iter()
        .map(|c| counter(agent, pod, c))
        .collect()
}

#[test]
fn a_full_origin_map_refuses_and_counts_and_recovers_once_emptied() {
    let (_cluster, client, server_pod, _server) = client_and_echo_server();
    // Proxy tier: fills the origin map that only redirected connections use.
    let agent =
        Agent::start(["--pod", &pod_spec(&client, ""), "--fast-path", "off"]).expect("agent");
    agent.wait_ready().expect("ready");
    let dst = server_pod.addr4(ECHO_PORT);
    assert!(common::redirected(&client, dst), "captured before the fill");
    let dir = agent.bpffs_dir();

    // Socket-local storage has no keys an outsider could use: its key is a descriptor of
    // the caller's own socket.
    let store = open::<u32, SocketEntry>(dir, map_names::SOCK_STORE);
    let e = store
        .update(bytes_of(&999_999u32), bytes_of(&SocketEntry::default()))
        .expect_err("no such socket");
    assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");

    // Fill SM_ORIG_TUPLE: a plain hash takes junk until it holds its capacity, then refuses
    // (nothing is evicted).
    let tuples = open::<TupleKey, SockAddr>(dir, map_names::ORIGIN_BY_TUPLE);
    let junk_origin = SockAddr::v4(u32::to_be(0x0a00_0001), 9u16.to_be());
    let cap = u64::from(map_sizes::ORIG_TUPLES);
    let mut filled = 0;
    let refused = loop {
        match tuples.update(bytes_of(&junk_tuple(filled)), bytes_of(&junk_origin)) {
            Ok(()) => filled += 1,
            Err(e) => break e,
        }
        assert!(filled <= cap, "more than the capacity went in");
    };
    eprintln!("[full_maps] SM_ORIG_TUPLE: {filled} junk entries (capacity {cap}), then: {refused}");
    assert_eq!(refused.raw_os_error(), Some(libc::E2BIG), "{refused}");
    assert!(filled >= cap - 16, "full: {filled} of {cap}");

    // A mesh connection now: redirected (its origin is in its own storage), but its tuple
    // has no room, so the proxy finds no origin and resets it.
    let before = counters(&agent, &client);
    let failed = match tcp_connect(&client, dst, T) {
        Ok(mut c) => tcp_echo_roundtrip(&mut c.stream, b"no room").is_err(),
        Err(_) => true,
    };
    assert!(failed, "a connection with no origin is never forwarded");
    // The reset follows the proxy's SO_ORIGINAL_DST: every count is in by now.
    let after = counters(&agent, &client);
    let delta: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(
        delta,
        vec![1, 0, 1, 1],
        "redirect_tcp, origin_hit, origin_miss, map_full: one refused, counted"
    );
    assert!(agent.is_running(), "the agent did not crash");

    // Emptied, the map takes mesh connections again.
    for i in 0..filled {
        tuples
            .delete(bytes_of(&junk_tuple(i)))
            .expect("delete junk");
    }
    let before = counters(&agent, &client);
    for i in 0..20 {
        let mut c = tcp_connect(&client, dst, T).unwrap_or_else(|e| panic!("connect {i}: {e}"));
        assert!(c.local.ip().is_loopback(), "connection {i} captured");
        tcp_echo_roundtrip(&mut c.stream, format!("again {i}").as_bytes())
            .unwrap_or_else(|e| panic!("echo {i} through the mesh: {e:#}"));
    }
    let after = counters(&agent, &client);
    let delta: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(delta, vec![20, 20, 0, 0], "captured and answered again");
}
