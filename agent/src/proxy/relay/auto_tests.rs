//! `--kernel-relay auto` against real loopback sockets and the real verdict program: a
//! request/response connection moves from splice to the kernel with no byte lost, reordered or
//! counted twice, and its bytes keep showing while the kernel relays them; a bulk connection
//! stays on splice.
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    tests::{auto_maps, counts_reach, ended, exchange, setup_with, stream, Setup},
    turns::MIN_TURNS,
    End, Limits,
};

/// `rounds` round trips of `len` bytes each way (the server echoes what the client sent).
async fn round_trips(s: &mut Setup, rounds: u32, len: usize) {
    for i in 0..rounds {
        let msg = stream(i, len);
        s.client.write_all(&msg).await.expect("request");
        let mut got = vec![0u8; len];
        within(s.server.read_exact(&mut got), "request arrives", i).await;
        assert!(got == msg, "request {i} intact");
        s.server.write_all(&got).await.expect("reply");
        within(s.client.read_exact(&mut got), "reply arrives", i).await;
        assert!(got == msg, "reply {i} intact");
    }
}

async fn within<T>(f: impl std::future::Future<Output = std::io::Result<T>>, what: &str, i: u32) {
    match tokio::time::timeout(Duration::from_secs(10), f).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => panic!("round {i}: {what}: {e}"),
        Err(_) => panic!("round {i}: {what}: nothing after 10 s"),
    }
}

fn in_kernel(s: &Setup) -> bool {
    s.cookies.iter().all(|&c| auto_maps().holds(c))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_response_moves_to_the_kernel_and_its_bytes_show_while_it_runs() {
    let mut s = setup_with(Some(auto_maps()), Limits::default()).await;
    round_trips(&mut s, 1, 100).await;
    assert!(
        !in_kernel(&s),
        "one exchange is not a pattern: still on splice"
    );
    round_trips(&mut s, MIN_TURNS + 46, 100).await;
    assert!(in_kernel(&s), "after {} exchanges", MIN_TURNS + 47);
    assert_eq!(s.pool.created(), 0, "messages are copied, no pipe taken");
    // Live: the spliced part plus the kernel's running count, while the connection is open.
    let n = u64::from(MIN_TURNS + 47) * 100;
    counts_reach(&s.bytes, (n, n)).await;
    // A bigger exchange in the kernel after the move: intact, and counted exactly at the end.
    let (up, down) = (stream(5, 3 << 20), stream(6, 1 << 20));
    let Setup {
        client,
        server,
        relay,
        cookies,
        ..
    } = s;
    let (got_up, got_down) = exchange(client, server, &up, &down).await;
    assert!(
        got_up == up && got_down == down,
        "bytes after the move intact"
    );
    let r = ended(relay).await;
    assert_eq!(
        (r.a_to_b, r.b_to_a, r.end),
        (n + up.len() as u64, n + down.len() as u64, End::Closed)
    );
    for c in cookies {
        assert!(!auto_maps().holds(c), "socket {c} left in the relay maps");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_connection_stays_on_splice_even_when_it_later_takes_turns() {
    let mut s = setup_with(Some(auto_maps()), Limits::default()).await;
    s.client
        .write_all(&stream(1, 4 << 20))
        .await
        .expect("bulk write");
    let mut sink = vec![0u8; 4 << 20];
    s.server.read_exact(&mut sink).await.expect("bulk read");
    round_trips(&mut s, 2 * MIN_TURNS + 10, 64).await;
    assert!(!in_kernel(&s), "bulk seen: stays on splice");
    let Setup {
        client,
        server,
        relay,
        ..
    } = s;
    drop((client, server));
    let r = ended(relay).await;
    let n = u64::from(2 * MIN_TURNS + 10) * 64;
    assert_eq!((r.a_to_b, r.b_to_a), ((4 << 20) + n, n));
}

/// The lifetime counts from the connection's start, not from its move to the kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lifetime_spans_the_move_to_the_kernel() {
    let lifetime = Duration::from_millis(2500);
    let limits = Limits {
        lifetime: Some(lifetime),
        ..Limits::default()
    };
    let started = tokio::time::Instant::now();
    let mut s = setup_with(Some(auto_maps()), limits).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    round_trips(&mut s, MIN_TURNS + 2, 10).await;
    assert!(in_kernel(&s));
    let moved = started.elapsed();
    let mut rest = Vec::new();
    s.client.read_to_end(&mut rest).await.expect("EOF");
    let took = started.elapsed();
    let r = ended(s.relay).await;
    assert_eq!(r.end, End::MaxLifetime);
    // A lifetime counted from the move would end at `moved + lifetime` (>= 4 s); a generous
    // half second before that still tells the two apart on a loaded machine.
    assert!(
        took >= lifetime && took + Duration::from_millis(500) < moved + lifetime,
        "moved to the kernel at {moved:?}, closed at {took:?}"
    );
}
