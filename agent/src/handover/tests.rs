use std::{
    io::{Read, Write},
    net::SocketAddr,
    os::{fd::AsFd, unix::net::UnixStream},
};

use super::proto::*;
use super::transport;

fn offer(cookie: u64, kind: Kind, addr: &str) -> Offered {
    Offered {
        netns_cookie: cookie,
        kind,
        addr: addr.parse::<SocketAddr>().expect("addr"),
    }
}

#[test]
fn frames_round_trip_and_oversized_ones_are_refused() {
    let msg = Reply::Sockets {
        version: VERSION,
        pid: 42,
        sockets: vec![offer(7, Kind::Outbound, "127.0.0.1:15001")],
        last: true,
    };
    let bytes = encode(&msg);
    let len = frame_len(bytes[..4].try_into().expect("header")).expect("len");
    assert_eq!(len, bytes.len() - 4);
    assert_eq!(decode::<Reply>(&bytes[4..]).expect("decode"), msg);
    let r = encode(&Request::Listeners {
        version: VERSION,
        http: false,
    });
    // What agents before the HTTP handover send and read: the field is left out, and a
    // request without it asks for no HTTP listener.
    assert_eq!(
        String::from_utf8_lossy(&r[4..]),
        r#"{"op":"listeners","version":1}"#
    );
    assert_eq!(
        decode::<Request>(&r[4..]).expect("decode"),
        Request::Listeners {
            version: VERSION,
            http: false
        }
    );
    let r = encode(&Request::Listeners {
        version: VERSION,
        http: true,
    });
    assert_eq!(
        String::from_utf8_lossy(&r[4..]),
        r#"{"op":"listeners","version":1,"http":true}"#
    );
    assert!(frame_len(((MAX_FRAME + 1) as u32).to_be_bytes()).is_err());
    assert!(decode::<Request>(b"{\"op\":\"format_disk\"}").is_err());
}

#[test]
fn chunks_respect_the_fd_limit_and_flag_the_last() {
    let offers: Vec<Offered> = (0..5)
        .map(|i| offer(i, Kind::Dns, "127.0.0.1:15053"))
        .collect();
    let c = chunks(&offers, 2);
    assert_eq!(
        c.iter().map(|(s, l)| (s.len(), *l)).collect::<Vec<_>>(),
        vec![(2, false), (2, false), (1, true)]
    );
    assert_eq!(chunks(&offers, 5).len(), 1);
    // No pods: still one (empty, last) message, so the successor is not left waiting.
    let none = chunks(&[], MAX_FDS);
    assert_eq!(none.len(), 1);
    assert!(none[0].0.is_empty() && none[0].1);
}

#[test]
fn assign_matches_by_netns_cookie_and_kind() {
    let offered = vec![
        (offer(1, Kind::Outbound, "127.0.0.1:15001"), 'a'),
        (offer(1, Kind::Outbound, "[::1]:15001"), 'b'),
        (offer(1, Kind::Dns, "127.0.0.1:15053"), 'c'),
        (offer(2, Kind::Outbound, "127.0.0.1:15001"), 'd'),
        (offer(1, Kind::Inbound, "10.0.0.5:8080"), 'e'),
        (offer(3, Kind::Outbound, "127.0.0.1:15001"), 'f'),
        (offer(0, Kind::Http, "10.0.0.1:15090"), 'g'),
    ];
    let a = assign(offered, &[1, 2, 4]).expect("assign");
    let p1 = &a.pods[&1];
    let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
    assert_eq!(
        p1.outbound,
        vec![(addr("127.0.0.1:15001"), 'a'), (addr("[::1]:15001"), 'b')]
    );
    assert_eq!(p1.dns, vec![(addr("127.0.0.1:15053"), 'c')]);
    assert_eq!(p1.inbound, vec![(addr("10.0.0.5:8080"), 'e')]);
    assert_eq!(a.pods[&2].outbound.len(), 1);
    // A pod the new agent enrols that the old one did not serve gets nothing (it binds anew).
    assert!(!a.pods.contains_key(&4));
    // A pod only the old agent had: its socket is not the new agent's.
    assert_eq!(a.unclaimed.len(), 1);
    assert_eq!(a.unclaimed[0].1, 'f');
    // The node's HTTP listener belongs to no pod: set apart, by address.
    assert_eq!(a.http, vec![(addr("10.0.0.1:15090"), 'g')]);
}

#[test]
fn assign_refuses_the_same_socket_twice() {
    let o = offer(1, Kind::Outbound, "127.0.0.1:15001");
    let e = assign(vec![(o, 1), (o, 2)], &[1]).expect_err("duplicate");
    assert!(e.contains("twice"), "{e}");
}

#[test]
fn control_socket_sits_beside_the_lock() {
    let p = control_path(std::path::Path::new("/sys/fs/bpf/sockmesh"));
    assert_eq!(
        p,
        std::path::Path::new("/run/sockmesh/_sys_fs_bpf_sockmesh.sock")
    );
}

/// Real fd passing over a real socketpair: the received fd is the same pipe.
#[test]
fn fds_travel_with_their_frame() {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let (mut pipe_r, pipe_w) = std::io::pipe().expect("pipe");
    let frame = encode(&Reply::Lock);
    transport::send(&a, &frame, &[pipe_w.as_fd()]).expect("send");
    // A second frame without fds right behind it: frames do not run into each other.
    transport::send(&a, &encode(&Reply::Draining), &[]).expect("send");
    drop(pipe_w);
    let (body, fds) = transport::recv(&b).expect("recv");
    assert_eq!(decode::<Reply>(&body).expect("decode"), Reply::Lock);
    assert_eq!(fds.len(), 1);
    let mut w = std::fs::File::from(fds.into_iter().next().expect("fd"));
    w.write_all(b"through the received fd").expect("write");
    drop(w);
    let mut got = String::new();
    pipe_r.read_to_string(&mut got).expect("read");
    assert_eq!(got, "through the received fd");
    let (body, fds) = transport::recv(&b).expect("recv");
    assert_eq!(decode::<Reply>(&body).expect("decode"), Reply::Draining);
    assert!(fds.is_empty());
    // Peer credentials: this very process.
    // SAFETY: getuid has no preconditions.
    assert_eq!(transport::peer_uid(&b).expect("cred"), unsafe {
        libc::getuid()
    });
    drop(a);
    let e = transport::recv(&b).expect_err("closed");
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
}
