//! The in-kernel relay against real loopback sockets and the real verdict program: the same
//! semantics as the splice relay (bytes intact, exact counts, FIN as half-close, RST as RST,
//! idle timeout on the last byte), no pipe used, and no map entry left once it ends.
use std::{io, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::Instant,
};

use super::{
    relay_with,
    tests::{ended, kernel_maps, pair, read_to_end, send_all_then_fin, setup_in, stream, Setup},
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
    let (cr, cw) = s.client.into_split();
    let (sr, sw) = s.server.into_split();
    let (got_up, got_down, (), ()) = tokio::join!(
        read_to_end(sr),
        read_to_end(cr),
        send_all_then_fin(cw, up.clone()),
        send_all_then_fin(sw, down.clone()),
    );
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
    let relay = tokio::spawn(relay_with(a, b, limits, pool));
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
    let s = setup_in(true, Limits::default()).await;
    let (pool, cookies) = (s.pool, s.cookies);
    let (mut resetter, mut other, rest) = s.ends(!server_resets);
    other.write_all(&stream(5, 100_000)).await.expect("write");
    let mut buf = vec![0u8; 100_000];
    resetter.read_exact(&mut buf).await.expect("read through");
    socket2::SockRef::from(&resetter)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    drop(resetter);
    let r = ended(rest.relay).await;
    assert_eq!(r.end, End::Reset);
    let mut all = Vec::new();
    let err = other
        .read_to_end(&mut all)
        .await
        .expect_err("the other side is reset, not closed");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
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
    const IDLE: Duration = Duration::from_millis(400);
    let mut s = setup_in(
        true,
        Limits {
            idle: Some(IDLE),
            ..Limits::default()
        },
    )
    .await;
    let chunk = stream(9, 64 * 1024);
    let mut buf = vec![0u8; chunk.len()];
    let start = Instant::now();
    let mut last_write = start;
    while start.elapsed() < IDLE * 2 {
        last_write = Instant::now();
        s.client.write_all(&chunk).await.expect("write");
        s.server.read_exact(&mut buf).await.expect("read");
        assert!(buf == chunk);
        tokio::time::sleep(IDLE / 8).await;
    }
    assert!(!s.relay.is_finished(), "no idle timeout while bytes flow");
    let Setup {
        mut client,
        mut server,
        relay,
        pool,
        cookies,
    } = s;
    let r = ended(relay).await;
    assert!(
        Instant::now() >= last_write + IDLE,
        "timed out only after a full idle period"
    );
    assert_eq!(r.end, End::IdleTimeout);
    let mut rest = Vec::new();
    client
        .read_to_end(&mut rest)
        .await
        .expect("client sees EOF");
    server
        .read_to_end(&mut rest)
        .await
        .expect("server sees EOF");
    assert!(rest.is_empty());
    assert_clean(pool, cookies);
}
