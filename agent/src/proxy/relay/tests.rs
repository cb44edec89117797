//! The relay against real loopback sockets: client <-> [a relay b] <-> server. Each test has
//! its own pipe pool so it can tell whether bytes went by splice and whether pipes were held.
use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
    time::Instant,
};

use super::{relay_with, Counts, End, Limits, PipePool, Relayed};
use crate::datapath::relay::{Mode, RelayMaps};

const T: Duration = Duration::from_secs(20);

/// A connected pair on 127.0.0.1: (the end a peer holds, the end the relay holds).
pub(super) async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (c, a) = tokio::join!(TcpStream::connect(addr), l.accept());
    let (c, a) = (c.expect("connect"), a.expect("accept").0);
    // As the agent's own sockets are made (`sys::sockets`).
    a.set_nodelay(true).expect("nodelay");
    (c, a)
}

pub(super) struct Setup {
    pub client: TcpStream,
    pub server: TcpStream,
    pub relay: JoinHandle<Relayed>,
    pub pool: &'static PipePool,
    /// Socket cookies of the relay's two sockets.
    pub cookies: [u64; 2],
    pub bytes: std::sync::Arc<Counts>,
}

/// What is left of a `Setup` once its two ends are taken.
pub(super) struct Rest {
    pub relay: JoinHandle<Relayed>,
    pub pool: &'static PipePool,
    pub cookies: [u64; 2],
}

impl Setup {
    /// (client, server) or (server, client), and the rest.
    pub(super) fn ends(self, client_first: bool) -> (TcpStream, TcpStream, Rest) {
        let rest = Rest {
            relay: self.relay,
            pool: self.pool,
            cookies: self.cookies,
        };
        if client_first {
            (self.client, self.server, rest)
        } else {
            (self.server, self.client, rest)
        }
    }
}

async fn setup(limits: Limits<'static>) -> Setup {
    setup_in(false, limits).await
}

/// The relay maps (`--kernel-relay on`) of one loaded copy of the kernel programs, shared by
/// this test binary's kernel-relay tests.
pub(super) fn kernel_maps() -> &'static RelayMaps {
    static MAPS: std::sync::OnceLock<RelayMaps> = std::sync::OnceLock::new();
    MAPS.get_or_init(|| load_maps(Mode::On))
}

/// Another loaded copy, in `--kernel-relay auto` mode.
pub(super) fn auto_maps() -> &'static RelayMaps {
    static MAPS: std::sync::OnceLock<RelayMaps> = std::sync::OnceLock::new();
    MAPS.get_or_init(|| load_maps(Mode::Auto))
}

/// Loads the kernel programs (the pins a load needs are removed at once: the maps live on by
/// fd) and attaches the relay.
fn load_maps(mode: Mode) -> RelayMaps {
    let dir = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/smt-unit-{}-{mode:?}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("pin dir (bpffs mounted, root)");
    // The object takes the socket storage the agent makes (see datapath::sockstore).
    crate::datapath::sockstore::ensure_pinned(&dir).expect("socket storage");
    let loaded = aya::EbpfLoader::new()
        .default_map_pin_directory(&dir)
        .load(crate::EBPF_OBJECT);
    let _ = std::fs::remove_dir_all(&dir);
    // Leaked: the programs must stay loaded for the process's life.
    let ebpf = Box::leak(Box::new(loaded.expect("load the programs")));
    RelayMaps::attach(ebpf, mode).expect("attach the relay")
}

/// `kernel`: relay unshaped bytes in the kernel (the shared test maps), else by splice.
pub(super) async fn setup_in(kernel: bool, limits: Limits<'static>) -> Setup {
    setup_with(kernel.then(kernel_maps), limits).await
}

/// The relay with these relay maps (their mode decides when the kernel takes over).
pub(super) async fn setup_with(
    maps: Option<&'static RelayMaps>,
    mut limits: Limits<'static>,
) -> Setup {
    if maps.is_some() {
        limits.kernel = maps;
    }
    // Leaked so the spawned relay can borrow it; a few bytes per test.
    let pool: &'static PipePool = Box::leak(Box::new(PipePool::new(4)));
    let (client, a) = pair().await;
    let (b, server) = pair().await;
    use std::os::fd::AsRawFd;
    let cookies =
        [a.as_raw_fd(), b.as_raw_fd()].map(|fd| super::kernel::cookie(fd).expect("cookie"));
    let bytes = std::sync::Arc::new(Counts::default());
    let relay = tokio::spawn(relay_with(a, b, limits, pool, bytes.clone()));
    Setup {
        client,
        server,
        relay,
        pool,
        bytes,
        cookies,
    }
}

/// Bytes whose every 4-byte word holds its own index (xored with `seed`): a reordered, lost or
/// duplicated chunk anywhere shows up as a mismatch.
pub(super) fn stream(seed: u32, len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..len.div_ceil(4) as u32)
        .flat_map(|i| (i ^ seed).to_le_bytes())
        .collect();
    v.truncate(len);
    v
}

pub(super) async fn send_all_then_fin(mut s: tokio::net::tcp::OwnedWriteHalf, data: Vec<u8>) {
    s.write_all(&data).await.expect("write");
    s.shutdown().await.expect("shutdown");
}

pub(super) async fn read_to_end(mut s: tokio::net::tcp::OwnedReadHalf) -> Vec<u8> {
    let mut v = Vec::new();
    s.read_to_end(&mut v).await.expect("read");
    v
}

/// Both ends send their bytes then FIN, and read to the end, at once: what each received.
pub(super) async fn exchange(
    client: TcpStream,
    server: TcpStream,
    up: &[u8],
    down: &[u8],
) -> (Vec<u8>, Vec<u8>) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let (got_up, got_down, (), ()) = tokio::join!(
        read_to_end(sr),
        read_to_end(cr),
        send_all_then_fin(cw, up.to_vec()),
        send_all_then_fin(sw, down.to_vec()),
    );
    (got_up, got_down)
}

pub(super) async fn ended(relay: JoinHandle<Relayed>) -> Relayed {
    tokio::time::timeout(T, relay)
        .await
        .expect("relay ended")
        .expect("relay task")
}

/// Waits for `bytes` to read `want` (no event marks the add after a write); fails past T or
/// if they overshoot.
pub(super) async fn counts_reach(bytes: &Counts, want: (u64, u64)) {
    let deadline = Instant::now() + T;
    while bytes.get() != want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(bytes.get(), want);
}

/// The counts are live: bytes written each way show while the connection is still open (the
/// recorder reads them for long-lived connections), and match the final result at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_show_bytes_of_a_connection_still_open() {
    fn no_delay(_: u64) -> Duration {
        Duration::ZERO
    }
    // Both paths: splice (unshaped) and copy (shaped).
    for shaped in [false, true] {
        let limits = Limits {
            shape: shaped.then_some(&no_delay as super::Shaper<'static>),
            ..Limits::default()
        };
        let mut s = setup(limits).await;
        let up = stream(3, 100_000);
        s.client.write_all(&up).await.expect("write up");
        let mut got = vec![0u8; up.len()];
        s.server.read_exact(&mut got).await.expect("read up");
        // The server has read every byte, so the relay has written every byte (its count
        // follows the write by a few instructions).
        counts_reach(&s.bytes, (up.len() as u64, 0)).await;
        s.server.write_all(&up[..777]).await.expect("write down");
        let mut back = vec![0u8; 777];
        s.client.read_exact(&mut back).await.expect("read down");
        counts_reach(&s.bytes, (up.len() as u64, 777)).await;
        let bytes = s.bytes.clone();
        let (client, server, rest) = s.ends(true);
        drop((client, server));
        let r = ended(rest.relay).await;
        assert_eq!((r.a_to_b, r.b_to_a), bytes.get());
        assert_eq!((r.a_to_b, r.b_to_a), (up.len() as u64, 777));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfers_both_ways_arrive_intact_by_splice_with_exact_counts() {
    const LEN: usize = 24 * 1024 * 1024;
    let s = setup(Limits::default()).await;
    let (up, down) = (stream(7, LEN), stream(11, LEN));
    let (cr, cw) = s.client.into_split();
    let (sr, sw) = s.server.into_split();
    // Both directions at once: each pump has its own pipe.
    let (got_up, got_down, (), ()) = tokio::time::timeout(T, async {
        tokio::join!(
            read_to_end(sr),
            read_to_end(cr),
            send_all_then_fin(cw, up.clone()),
            send_all_then_fin(sw, down.clone()),
        )
    })
    .await
    .expect("transfers finished");
    assert!(got_up == up, "client -> server bytes differ");
    assert!(got_down == down, "server -> client bytes differ");
    let r = ended(s.relay).await;
    assert_eq!(
        r,
        Relayed {
            a_to_b: LEN as u64,
            b_to_a: LEN as u64,
            end: End::Closed
        }
    );
    assert!(s.pool.created() >= 1, "the bytes went through a pipe");
    assert_eq!(s.pool.in_use(), 0, "every pipe went back");
}

/// A FIN from one side half-closes the other, and the open direction keeps working.
async fn half_close(client_first: bool) {
    let (mut first, mut second, s) = setup(Limits::default()).await.ends(client_first);
    first.write_all(b"request").await.expect("write");
    first.shutdown().await.expect("shutdown");
    let mut got = Vec::new();
    second.read_to_end(&mut got).await.expect("read to EOF");
    assert_eq!(got, b"request", "bytes before the FIN, then EOF");
    // The other direction is still open after the half-close.
    let reply = stream(3, 300_000);
    second
        .write_all(&reply)
        .await
        .expect("write after peer's FIN");
    second.shutdown().await.expect("shutdown");
    let mut back = Vec::new();
    first.read_to_end(&mut back).await.expect("read reply");
    assert!(back == reply, "reply after the half-close arrived intact");
    let r = ended(s.relay).await;
    assert_eq!(r.end, End::Closed);
    let (up, down) = if client_first {
        (7, 300_000)
    } else {
        (300_000, 7)
    };
    assert_eq!((r.a_to_b, r.b_to_a), (up, down));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_from_the_client_keeps_the_reply_flowing() {
    half_close(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_from_the_server_keeps_the_request_flowing() {
    half_close(false).await;
}

/// A reset on one side reaches the other as a reset, mid-stream. Returns the pool and the
/// relay's cookies.
pub(super) async fn reset_propagates(
    kernel: bool,
    server_resets: bool,
) -> (&'static PipePool, [u64; 2]) {
    let (mut resetter, mut other, s) = setup_in(kernel, Limits::default())
        .await
        .ends(!server_resets);
    other.write_all(&stream(5, 100_000)).await.expect("write");
    let mut buf = vec![0u8; 100_000];
    resetter.read_exact(&mut buf).await.expect("read through");
    socket2::SockRef::from(&resetter)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    drop(resetter);
    let r = ended(s.relay).await;
    assert_eq!(r.end, End::Reset);
    let mut rest = Vec::new();
    let err = other
        .read_to_end(&mut rest)
        .await
        .expect_err("the other side is reset, not closed");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    assert_eq!(s.pool.in_use(), 0);
    (s.pool, s.cookies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_reset_resets_the_client() {
    reset_propagates(false, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_resets_the_server() {
    reset_propagates(false, false).await;
}

/// Bytes flowing for longer than the idle timeout keep the connection; once idle, it ends
/// after a full idle period with a FIN both ways. Returns the pool and the relay's cookies.
pub(super) async fn idle_timeout(kernel: bool) -> (&'static PipePool, [u64; 2]) {
    const IDLE: Duration = Duration::from_millis(400);
    let mut s = setup_in(
        kernel,
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
    if !kernel {
        // Idle now: the pipe goes back to the pool as soon as the pump finds nothing to
        // read. No event tells the test when that happened, hence the bounded wait.
        let deadline = Instant::now() + IDLE / 2;
        while s.pool.in_use() != 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if !s.relay.is_finished() {
            assert_eq!(s.pool.in_use(), 0, "an idle connection holds no pipe");
        }
    }
    let r = ended(s.relay).await;
    assert!(
        Instant::now() >= last_write + IDLE,
        "timed out only after a full idle period"
    );
    assert_eq!(r.end, End::IdleTimeout);
    // Both sides are closed (FIN, not reset).
    let mut rest = Vec::new();
    s.client
        .read_to_end(&mut rest)
        .await
        .expect("client sees EOF");
    s.server
        .read_to_end(&mut rest)
        .await
        .expect("server sees EOF");
    assert!(rest.is_empty());
    (s.pool, s.cookies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_counts_spliced_bytes_as_activity_and_holds_no_pipe_while_idle() {
    let (pool, _) = idle_timeout(false).await;
    assert!(pool.created() >= 1, "the bytes went by splice");
}

static SHAPED: AtomicU64 = AtomicU64::new(0);

fn count_shaped(n: u64) -> Duration {
    SHAPED.fetch_add(n, Ordering::Relaxed);
    Duration::ZERO
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shaped_connections_are_copied_and_every_byte_is_debited() {
    let s = setup(Limits {
        shape: Some(&count_shaped),
        ..Limits::default()
    })
    .await;
    let (up, down) = (stream(1, 1 << 20), stream(2, 3 << 19));
    let (got_up, got_down) = exchange(s.client, s.server, &up, &down).await;
    assert!(got_up == up && got_down == down, "bytes intact");
    let r = ended(s.relay).await;
    assert_eq!((r.a_to_b, r.b_to_a), (up.len() as u64, down.len() as u64));
    assert_eq!(SHAPED.load(Ordering::Relaxed), r.a_to_b + r.b_to_a);
    assert_eq!(s.pool.created(), 0, "shaped bytes are not spliced");
}

/// Every open connection's task holds this future, idle ones included: the scale figures
/// (agent memory per idle connection) depend on it staying small, so rare states (the kernel
/// relay, the shaped copy, the graceful close) are boxed rather than inlined.
#[tokio::test]
async fn an_idle_connection_s_relay_state_stays_small() {
    let (_c, a) = pair().await;
    let (b, _s) = pair().await;
    let pool: &'static PipePool = Box::leak(Box::new(PipePool::new(1)));
    let limits = Limits {
        kernel: Some(auto_maps()),
        ..Limits::default()
    };
    let fut = relay_with(a, b, limits, pool, Default::default());
    let size = std::mem::size_of_val(&fut);
    eprintln!("relay future: {size} bytes");
    assert!(size <= 2048, "relay future grew to {size} bytes");
}

/// Messages go by the small-copy path (no pipe); the first read that fills its buffer switches
/// the direction to splice, with every byte in order across the switch (the sender writes a
/// large block in one go while the relay's first reads are small ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_copied_and_bulk_switches_to_splice_in_order() {
    let mut s = setup(Limits::default()).await;
    for i in 0..20u32 {
        let msg = stream(i, 300);
        s.client.write_all(&msg).await.expect("request");
        let mut got = vec![0u8; msg.len()];
        s.server
            .read_exact(&mut got)
            .await
            .expect("request arrives");
        assert!(got == msg, "message {i} intact");
    }
    assert_eq!(s.pool.created(), 0, "messages took no pipe");
    let bulk = stream(99, 8 << 20);
    let (got, ()) = tokio::join!(
        async {
            let mut v = vec![0u8; bulk.len()];
            s.server.read_exact(&mut v).await.expect("bulk arrives");
            v
        },
        async { s.client.write_all(&bulk).await.expect("bulk write") }
    );
    assert!(got == bulk, "bulk intact and in order across the switch");
    assert!(s.pool.created() >= 1, "bulk went by splice");
    let (client, server, rest) = s.ends(true);
    drop((client, server));
    let r = ended(rest.relay).await;
    assert_eq!(r.a_to_b, 20 * 300 + bulk.len() as u64);
}
