//! The in-kernel relay against real loopback sockets and the real verdict program: the same
//! semantics as the splice relay (bytes intact, exact counts, FIN as half-close, RST as RST,
//! idle timeout on the last byte), no pipe used, and no map entry left once it ends.
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    relay_with,
    tests::{ended, exchange, idle_timeout, kernel_maps, pair, setup_in, stream, Setup},
    End, Limits, PipePool,
};

/// Nothing of the connection is left in the maps, and no pipe was ever taken.
fn assert_clean(s_pool: &PipePool, cookies: [u64; 2]) {
    assert_eq!(
        s_pool.created(),
        0,
        "bytes went by the kernel, not by splice"
    );
    for c in cookies {
        assert!(!kernel_maps().holds(c), "socket {c} left in the relay maps");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_relay_moves_large_transfers_both_ways_with_exact_counts() {
    const LEN: usize = 24 * 1024 * 1024;
    let armed = kernel_maps().armed();
    let s = setup_in(true, Limits::default()).await;
    let (pool, cookies) = (s.pool, s.cookies);
    let (up, down) = (stream(7, LEN), stream(11, LEN));
    let (got_up, got_down) = exchange(s.client, s.server, &up, &down).await;
    assert!(got_up == up, "client -> server bytes differ");
    assert!(got_down == down, "server -> client bytes differ");
    let r = ended(s.relay).await;
    assert_eq!(
        (r.a_to_b, r.b_to_a, r.end),
        (LEN as u64, LEN as u64, End::Closed)
    );
    assert!(kernel_maps().armed() > armed, "the connection was armed");
    assert_clean(pool, cookies);
}

/// Bytes the client sent before the relay started (waiting in the accepted socket's queue)
/// are forwarded too: the program only sees new arrivals unless the relay kicks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_relay_forwards_bytes_that_arrived_before_it_was_armed() {
    let pool: &'static PipePool = Box::leak(Box::new(PipePool::new(4)));
    let (mut client, a) = pair().await;
    let (b, mut server) = pair().await;
    client.write_all(b"early request").await.expect("write");
    server.write_all(b"early banner").await.expect("write");
    // Let both land in the relay's receive queues before it starts.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let limits = Limits {
        kernel: Some(kernel_maps()),
        ..Limits::default()
    };
    let relay = tokio::spawn(relay_with(a, b, limits, pool, Default::default()));
    let mut got = [0u8; 13];
    server.read_exact(&mut got).await.expect("request");
    assert_eq!(&got, b"early request");
    let mut got = [0u8; 12];
    client.read_exact(&mut got).await.expect("banner");
    assert_eq!(&got, b"early banner");
    drop((client, server));
    let r = ended(relay).await;
    assert_eq!((r.a_to_b, r.b_to_a), (13, 12));
    assert_eq!(pool.created(), 0);
}

/// Request/response, many rounds of small messages: each must come back without the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_relay_carries_many_small_round_trips() {
    let mut s = setup_in(true, Limits::default()).await;
    for i in 0..2000u32 {
        let msg = i.to_le_bytes();
        s.client.write_all(&msg).await.expect("request");
        let mut got = [0u8; 4];
        s.server
            .read_exact(&mut got)
            .await
            .expect("request arrives");
        assert_eq!(got, msg);
        s.server.write_all(&got).await.expect("reply");
        s.client.read_exact(&mut got).await.expect("reply arrives");
        assert_eq!(got, msg);
    }
    let Setup {
        client,
        server,
        relay,
        pool,
        cookies,
        ..
    } = s;
    drop((client, server));
    let r = ended(relay).await;
    assert_eq!((r.a_to_b, r.b_to_a), (8000, 8000));
    assert_clean(pool, cookies);
}

async fn half_close(client_first: bool) {
    let s = setup_in(true, Limits::default()).await;
    let (pool, cookies) = (s.pool, s.cookies);
    let (mut first, mut second, rest) = s.ends(client_first);
    // Enough that the FIN is seen while the kernel still forwards the bytes before it.
    let request = stream(4, 4 << 20);
    first.write_all(&request).await.expect("write");
    first.shutdown().await.expect("shutdown");
    let mut got = Vec::new();
    second.read_to_end(&mut got).await.expect("read to EOF");
    assert!(got == request, "every byte before the FIN, then EOF");
    let reply = stream(3, 300_000);
    second.write_all(&reply).await.expect("write after FIN");
    second.shutdown().await.expect("shutdown");
    let mut back = Vec::new();
    first.read_to_end(&mut back).await.expect("read reply");
    assert!(back == reply, "reply after the half-close arrived intact");
    let r = ended(rest.relay).await;
    assert_eq!(r.end, End::Closed);
    let (fwd, rev) = (request.len() as u64, reply.len() as u64);
    let expect = if client_first { (fwd, rev) } else { (rev, fwd) };
    assert_eq!((r.a_to_b, r.b_to_a), expect);
    assert_clean(pool, cookies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_relay_half_close_from_the_client_keeps_the_reply_flowing() {
    half_close(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_relay_half_close_from_the_server_keeps_the_request_flowing() {
    half_close(false).await;
}

async fn reset_propagates(server_resets: bool) {
    let (pool, cookies) = super::tests::reset_propagates(true, server_resets).await;
    assert_clean(pool, cookies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_relay_server_reset_resets_the_client() {
    reset_propagates(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_relay_client_reset_resets_the_server() {
    reset_propagates(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_relay_idle_timeout_counts_forwarded_bytes_as_activity() {
    let (pool, cookies) = idle_timeout(true).await;
    assert_clean(pool, cookies);
}
