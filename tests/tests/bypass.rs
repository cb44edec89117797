//! No bypass: a process in an enrolled pod that sets SO_MARK (the agent's own mark, which is
//! public, or any other) is captured like any other. The hostile pod here runs as a container
//! would: with the runtime's default capabilities, CAP_NET_RAW among them (enough to set any
//! mark since Linux 5.17) and no CAP_NET_ADMIN. A victim pod on the same agent keeps working,
//! and the agent's own upstream connections still go straight out (no loops).
mod common;
mod shares_util;

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::{counter, T};
use shares_util::{connect_probes, dns_probes, dns_responder, report_and_check};
use socket2::{Domain, Socket, Type};
use sockmesh_tests::caps::{self, NET_ADMIN, NET_RAW};
use sockmesh_tests::*;

/// Victim probes per series (as in the fair-share attacks).
const PROBES: usize = 200;

/// The agent's default `--mark`: what a hostile pod would copy from the README.
const AGENT_MARK: u32 = 0x534d;

/// What one connection attempt from the hostile pod came to.
#[derive(Debug)]
enum Outcome {
    /// Connected and an echo round trip went through; `via_agent`: the app's own end is the
    /// pod's loopback, the agent's listener (a direct connection's is the pod's address).
    Served { via_agent: bool, peer: SocketAddr },
    /// Accepted, then reset or closed without an answer (the agent refused it).
    Reset,
    /// connect() failed with ECONNREFUSED: the kernel fast reject.
    Refused,
}

impl Outcome {
    fn letter(&self) -> char {
        match self {
            Outcome::Served {
                via_agent: true, ..
            } => 'A',
            Outcome::Served {
                via_agent: false, ..
            } => 'D',
            Outcome::Reset => 'R',
            Outcome::Refused => 'K',
        }
    }
}

/// On a fresh thread in `pod`, as a container process: sets SO_MARK `mark` on a new socket,
/// connects to `dst` (an echo server) and tries one echo round trip.
fn forged_connect(pod: &Pod, mark: u32, dst: SocketAddr) -> Outcome {
    let r = pod.run(|| -> io::Result<(TcpStream, SocketAddr, SocketAddr)> {
        caps::become_container()?;
        let s = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
        s.set_mark(mark)?;
        assert_eq!(s.mark()?, mark, "the mark is set");
        s.connect_timeout(&dst.into(), T)?;
        let local = getsockname(&s)?;
        let peer = getpeername(&s)?;
        Ok((s.into(), local, peer))
    });
    let (mut stream, local, peer) = match r {
        Ok(c) => c,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Outcome::Refused,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNRESET)) => {
            return Outcome::Reset
        }
        Err(e) => panic!("forged connect to {dst}: {e}"),
    };
    stream.set_read_timeout(Some(T)).expect("timeout");
    let mut back = [0u8; 4];
    match stream
        .write_all(b"ping")
        .and_then(|()| stream.read_exact(&mut back))
    {
        Ok(()) => {
            assert_eq!(&back, b"ping");
            Outcome::Served {
                via_agent: local.ip().is_loopback(),
                peer,
            }
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("{dst}: no answer and no reset: the attempt hung")
        }
        Err(_) => Outcome::Reset,
    }
}

fn policy_limiting(dir: &TempDir, pod: &Pod, server: &Pod) -> String {
    let path = dir.join("policy.toml");
    let text = format!(
        "[[rule]]\nname = \"hostile to server\"\ndirection = \"outbound\"\npod = \"{}\"\n\
         peer = \"{}\"\nports = \"8080\"\nconn_rate = \"1/h\"\nconn_burst = 1\n",
        pod.netns_path().display(),
        server.ip4()
    );
    std::fs::write(&path, text).expect("write policy");
    path.display().to_string()
}

/// The container set is what the hostile pod has: NET_RAW, enough for SO_MARK, and no
/// NET_ADMIN; without NET_RAW the same call is refused. (So the attack below is open to any
/// container a runtime starts with its defaults.)
#[test]
fn a_container_can_set_so_mark_with_net_raw_alone() {
    require_root();
    let pod = Pod::isolated("container").expect("pod");
    let (with_raw, without_raw) = pod.run(|| {
        caps::become_container().expect("capset");
        assert!(caps::has(NET_RAW).expect("capget"));
        assert!(!caps::has(NET_ADMIN).expect("capget"));
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        let with_raw = s.set_mark(AGENT_MARK);
        let fewer: Vec<u32> = caps::CONTAINER_DEFAULT
            .iter()
            .copied()
            .filter(|&c| c != NET_RAW)
            .collect();
        caps::restrict_thread_to(&fewer).expect("capset");
        let without_raw = s.set_mark(AGENT_MARK + 1);
        (with_raw, without_raw)
    });
    with_raw.expect("SO_MARK with CAP_NET_RAW and without CAP_NET_ADMIN");
    assert_eq!(
        without_raw.expect_err("SO_MARK without CAP_NET_RAW").kind(),
        ErrorKind::PermissionDenied
    );
}

/// The forged-mark connections of the hostile pod are captured and policed: its rule (one
/// connection an hour to the server) admits the first, resets the second, and the kernel
/// refuses the rest at connect(), whatever mark the socket carries. The victim pod, on the
/// same agent, with no such rule, gets every connection through. The admitted connection
/// reaches the server from the hostile pod's own address: the agent's upstream socket was
/// not captured again.
#[test]
fn a_forged_mark_is_captured_and_policed_and_the_victim_keeps_working() {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let hostile = cluster.add_pod("hostile").expect("pod");
    let victim = cluster.add_pod("victim").expect("pod");
    let server_pod = cluster.add_pod("server").expect("pod");
    let server = TcpServer::start(&server_pod, "[::]:8080".parse().expect("addr")).expect("echo");
    let dir = TempDir::new().expect("tempdir");
    let policy = policy_limiting(&dir, &hostile, &server_pod);
    // Proxy tier: counts the hostile pod's resets and every victim connection's redirect (the
    // kernel tier refuses over the rate at connect() whatever the mark: policy_limits.rs).
    let agent = Agent::start([
        "--pod",
        &pod_spec(&hostile, ""),
        "--pod",
        &pod_spec(&victim, ""),
        "--policy",
        &policy,
        "--fast-path",
        "off",
    ])
    .expect("agent");
    agent.wait_ready().expect("ready");
    let dst4 = server_pod.addr4(8080);
    let dns = server_pod.addr4(53);
    let _responder = dns_responder(&server_pod, dns);
    let quiet = connect_probes(&victim, dst4, PROBES);
    let quiet_dns = dns_probes(&victim, dns, PROBES);
    // The server's record of accepted connections starts after the victim's baseline.
    let _ = server.drain_accepted();

    // The agent's own mark, then others: the mark never decides.
    let first = forged_connect(&hostile, AGENT_MARK, dst4);
    let Outcome::Served {
        via_agent: true,
        peer,
    } = first
    else {
        panic!("the first forged-mark connection: {first:?}, want served through the agent");
    };
    assert_eq!(peer, dst4, "getpeername shows the real server");
    let accepted = server.next_accept(T).expect("the server got it");
    assert_eq!(
        unmap(accepted.peer).ip(),
        hostile.ip4(),
        "the agent's upstream left from the hostile pod's address, not captured again"
    );
    let rest: String = [AGENT_MARK, AGENT_MARK, 1, 0xffff_ffff, 0]
        .iter()
        .map(|&m| forged_connect(&hostile, m, dst4).letter())
        .collect();
    assert_eq!(
        rest, "RKKKK",
        "the rule applies to every mark: reset by the agent, then refused in the kernel"
    );
    // IPv6, which the rule does not limit: captured too.
    let v6 = forged_connect(&hostile, AGENT_MARK, server_pod.addr6(8080));
    assert_eq!(v6.letter(), 'A', "{v6:?}");

    assert_eq!(
        counter(&agent, &hostile, "redirect_tcp"),
        3,
        "the admitted, the reset and the IPv6 connection were redirected"
    );
    assert_eq!(counter(&agent, &hostile, "fast_reject"), 4);
    let from_hostile = server
        .drain_accepted()
        .iter()
        .filter(|a| unmap(a.peer).ip() == hostile.ip4())
        .count();
    assert_eq!(
        from_hostile, 0,
        "nothing else of the hostile pod reached the server over IPv4"
    );

    // The victim, same server, same agent: every connection through, none refused.
    for i in 0..5 {
        let mut c = tcp_connect(&victim, dst4, T).expect("victim connects");
        tcp_echo_roundtrip(&mut c.stream, format!("victim {i}").as_bytes()).expect("echo");
        assert!(c.local.ip().is_loopback(), "captured");
        assert_eq!(c.peer, dst4);
    }
    let victim_redirects = counter(&agent, &victim, "redirect_tcp");
    assert_eq!(victim_redirects, 5 + PROBES as u64);
    assert_eq!(counter(&agent, &victim, "fast_reject"), 0);

    // The victim under a sustained forgery: the hostile pod connects with the agent's mark as
    // fast as it can (refused in the kernel, every one) while the victim is probed.
    let stop = AtomicBool::new(false);
    let forged = AtomicU64::new(0);
    let (attacked, attacked_dns) = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let o = forged_connect(&hostile, AGENT_MARK, dst4);
                assert_eq!(o.letter(), 'K', "{o:?}");
                forged.fetch_add(1, Ordering::Relaxed);
            }
        });
        let r = (
            connect_probes(&victim, dst4, PROBES),
            dns_probes(&victim, dns, PROBES),
        );
        stop.store(true, Ordering::Relaxed);
        r
    });
    eprintln!(
        "[bypass] {} forged-mark connects during the victim's probes",
        forged.load(Ordering::Relaxed)
    );
    report_and_check("connect+echo, forged-mark connects", &quiet, &attacked);
    report_and_check("dns query, forged-mark connects", &quiet_dns, &attacked_dns);
    assert!(
        forged.load(Ordering::Relaxed) > 0,
        "the attack ran beside the probes"
    );
    assert_eq!(
        counter(&agent, &victim, "redirect_tcp"),
        victim_redirects + PROBES as u64,
        "every victim probe was captured (policed)"
    );
    assert_eq!(counter(&agent, &victim, "fast_reject"), 0);
    assert!(agent.is_running());
}

/// A recursive A query for `name`.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The other two things the programs capture, with the agent's mark forged: a DNS query sent
/// with sendto() goes to the agent (which answers SERVFAIL, as the server only echoes; a
/// direct query would get the echo back), and a wildcard bind is recorded, so connections to
/// it are steered to the agent (sk_lookup) like any other app's.
#[test]
fn forged_marks_on_dns_and_binds_are_captured_too() {
    require_root();
    let cluster = Cluster::new().expect("cluster");
    let hostile = cluster.add_pod("hostile").expect("pod");
    let server_pod = cluster.add_pod("server").expect("pod");
    let echo = UdpEchoServer::start(&server_pod, "0.0.0.0:53".parse().expect("addr")).expect("udp");
    let agent =
        Agent::start(["--pod", &pod_spec(&hostile, ""), "--dns-timeout", "500ms"]).expect("agent");
    agent.wait_ready().expect("ready");
    let dns = server_pod.addr4(53);

    let q = dns_query(0x5151, "forged.test");
    let (reply, from) = hostile
        .run(|| -> io::Result<(Vec<u8>, SocketAddr)> {
            caps::become_container()?;
            let s = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
            s.set_mark(AGENT_MARK)?;
            let s: UdpSocket = s.into();
            s.set_read_timeout(Some(T))?;
            s.send_to(&q, dns)?;
            let mut buf = [0u8; 512];
            let (n, from) = s.recv_from(&mut buf)?;
            Ok((buf[..n].to_vec(), from))
        })
        .expect("an answer");
    assert_eq!(from, dns, "the reply shows the server the app asked");
    assert_eq!(&reply[..2], &q[..2], "same id");
    assert!(
        reply[2] & 0x80 != 0,
        "a response (from the agent), not the echo"
    );
    assert_eq!(reply[3] & 0x0f, 2, "SERVFAIL");
    let (src, _) = echo.next_datagram(T).expect("the agent forwarded it");
    assert_eq!(src.ip(), hostile.ip4(), "from the pod's own address");
    assert_eq!(counter(&agent, &hostile, "redirect_dns"), 1);

    let (listener, local) = hostile
        .run(|| -> io::Result<(std::net::TcpListener, SocketAddr)> {
            caps::become_container()?;
            let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            s.set_mark(AGENT_MARK)?;
            s.bind(&SocketAddr::from(([0, 0, 0, 0], 9090)).into())?;
            s.listen(16)?;
            let local = getsockname(&s)?;
            Ok((s.into(), local))
        })
        .expect("bind");
    assert_eq!(
        local,
        SocketAddr::from(([0, 0, 0, 0], 9090)),
        "the app keeps its wildcard bind"
    );
    agent
        .wait_event_named("inbound_listening", T)
        .expect("the agent reports the port captured");
    assert_eq!(counter(&agent, &hostile, "bind_capture"), 1);
    // And the inbound path works: a client reaches the app through the agent.
    let client = cluster.add_pod("client").expect("pod");
    let mut c = tcp_connect(&client, hostile.addr4(9090), T).expect("connect");
    c.stream.write_all(b"in").expect("write");
    listener.set_nonblocking(false).expect("blocking");
    let (mut app_side, peer) = listener.accept().expect("the app accepts");
    let mut buf = [0u8; 2];
    app_side.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"in");
    assert_eq!(peer.ip(), client.ip4(), "the app sees the real client");
    assert_eq!(
        counter(&agent, &hostile, "inbound_steered"),
        1,
        "steered to the agent, not delivered to the app directly"
    );
    drop(app_side);
}

/// The identity the programs trust, seen from outside: each upstream socket the agent opens
/// in the pod is in `SM_AGENT_SOCKS` under its cookie, with the agent's pid; the app's own
/// sockets are not (a pod cannot get in there); and once the connections close, the
/// `sock_release` program has removed the agent's entries (nothing accumulates).
#[test]
fn the_agent_registers_its_own_sockets_only_and_they_go_when_closed() {
    let (_cluster, client, server_pod, _server) = common::client_and_echo_server();
    // Proxy tier: looks at the agent's upstream socket of each connection.
    let agent =
        Agent::start(["--pod", &pod_spec(&client, ""), "--fast-path", "off"]).expect("agent");
    agent.wait_ready().expect("ready");
    let dst = server_pod.addr4(common::ECHO_PORT);
    let mut held = Vec::new();
    for i in 0..3 {
        let mut c = tcp_connect(&client, dst, T).expect("connect");
        tcp_echo_roundtrip(&mut c.stream, format!("held {i}").as_bytes()).expect("echo");
        held.push(c);
    }
    let rows = established(&client).expect("ss");
    let upstream: Vec<u64> = rows
        .iter()
        .filter(|r| r.local.ip() == client.ip4() && r.peer == dst)
        .map(|r| r.cookie)
        .collect();
    let apps: Vec<u64> = held
        .iter()
        .map(|c| {
            rows.iter()
                .find(|r| r.local == c.local)
                .unwrap_or_else(|| panic!("no ss row for the app socket {}", c.local))
                .cookie
        })
        .collect();
    assert_eq!(upstream.len(), 3, "one upstream socket per connection");

    for &c in &upstream {
        assert_eq!(
            common::agent_socket_owner(&agent, c),
            Some(agent.pid()),
            "upstream socket {c:#x}: registered by this agent"
        );
    }
    for &c in &apps {
        assert_eq!(
            common::agent_socket_owner(&agent, c),
            None,
            "the app's socket {c:#x} is registered"
        );
    }

    drop(held);
    let deadline = std::time::Instant::now() + T;
    while upstream
        .iter()
        .any(|&c| common::agent_socket_owner(&agent, c).is_some())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the closed upstream sockets are still registered"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
