//! Proves the harness itself, with no agent: pods reach each other over the private bridge on
//! IPv4 and IPv6, code and processes really run inside the pods, and everything is cleaned up.
//!
//! Tier: no agent runs here.

use sockmesh_tests::cleanup::sweep_stale;
use sockmesh_tests::names::{format_name, random_hex};
use sockmesh_tests::netns::NETNS_DIR;
use sockmesh_tests::sys::{pid_alive, pids_in_netns, wait_pid_exit};
use sockmesh_tests::*;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(5);

fn any4() -> SocketAddr {
    "0.0.0.0:0".parse().unwrap()
}

fn any6() -> SocketAddr {
    "[::]:0".parse().unwrap()
}

/// TCP from `a` to `b` at `dst`; checks what both ends report.
fn tcp_between(a: &Pod, b: &Pod, bind: SocketAddr, dst_ip: std::net::IpAddr) -> anyhow::Result<()> {
    let server = TcpServer::start(b, bind)?;
    let dst = SocketAddr::new(dst_ip, server.local_addr().port());
    let mut c = tcp_connect(a, dst, T)?;
    assert_eq!(c.peer, dst, "client getpeername");
    tcp_echo_roundtrip(&mut c.stream, b"ping over the bridge")?;
    // Bigger than the socket buffers, to exercise flow control both ways.
    let big: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| i as u8).collect();
    tcp_echo_roundtrip(&mut c.stream, &big)?;

    let acc = server.next_accept(T)?;
    assert_eq!(
        unmap(acc.peer),
        unmap(c.local),
        "server sees the client's own address"
    );
    assert_eq!(unmap(acc.local), dst, "server's local address");
    // No redirect exists: either nobody knows an original destination, or conntrack reports the
    // untranslated one.
    if let Some(o) = acc.original_dst {
        assert_eq!(unmap(o), dst);
    }
    Ok(())
}

#[test]
fn pods_talk_tcp_and_udp_on_v4_and_v6() -> anyhow::Result<()> {
    require_root();
    let cluster = Cluster::new()?;
    let a = cluster.add_pod("a")?;
    let b = cluster.add_pod("b")?;
    assert_ne!(a.ip4(), b.ip4());
    assert_eq!(a.netns_path(), Path::new(NETNS_DIR).join(a.name()));

    tcp_between(&a, &b, any4(), b.ip4().into())?;
    tcp_between(&a, &b, any6(), b.ip6().into())?;
    // A dual-stack [::] listener also serves IPv4 (peer shows up IPv4-mapped).
    tcp_between(&b, &a, any6(), a.ip4().into())?;
    // Specific-address listeners.
    tcp_between(&b, &a, a.addr4(0), a.ip4().into())?;
    tcp_between(&b, &a, a.addr6(0), a.ip6().into())?;

    // Nothing listens there: refused, as a raw io::Error.
    let err = tcp_connect(&a, b.addr4(9), T).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);

    for (bind, dst_ip) in [(any4(), b.ip4().into()), (any6(), b.ip6().into())] {
        let udp = UdpEchoServer::start(&b, bind)?;
        let dst = SocketAddr::new(dst_ip, udp.local_addr().port());
        let r = udp_sendto(&a, dst, b"dgram", T)?;
        assert_eq!((r.data.as_slice(), r.from), (&b"dgram"[..], dst));
        let (src, data) = udp.next_datagram(T)?;
        let a_ip = if dst.is_ipv4() {
            a.ip4().into()
        } else {
            a.ip6().into()
        };
        let client = SocketAddr::new(a_ip, r.local.port());
        assert_eq!((unmap(src), data.as_slice()), (client, &b"dgram"[..]));

        let r = udp_connected(&a, dst, b"conn", T)?;
        assert_eq!(
            (r.data.as_slice(), r.from, r.peer),
            (&b"conn"[..], dst, Some(dst))
        );
    }

    // Listening state is visible without connecting.
    let server = TcpServer::start(&b, "0.0.0.0:8080".parse()?)?;
    let l = wait_tcp_listening(&b, b.addr4(8080), T)?;
    assert_eq!(l, server.local_addr());
    assert!(wait_tcp_listening(&a, a.addr4(8080), Duration::from_millis(50)).is_err());
    Ok(())
}

#[test]
fn run_executes_inside_the_pod_netns() -> anyhow::Result<()> {
    require_root();
    let pod = Pod::isolated("lonely")?;
    let root = current_netns_inode()?;
    let inside = pod.run(current_netns_inode)?;
    assert_eq!(inside, pod.netns_inode()?);
    assert_ne!(inside, root, "the pod has its own namespace");
    // Only the helper thread moved: this thread is still in the root namespace.
    assert_eq!(current_netns_inode()?, root);

    // A socket made in the pod stays there when used from another thread.
    let l = pod.run(|| std::net::TcpListener::bind("127.0.0.1:0"))?;
    let port = l.local_addr()?.port();
    let mut c = tcp_connect(&pod, ([127, 0, 0, 1], port).into(), T)?;
    let (mut s, _) = l.accept()?;
    std::io::Write::write_all(&mut s, b"hi")?;
    let mut buf = [0u8; 2];
    std::io::Read::read_exact(&mut c.stream, &mut buf)?;
    assert_eq!(&buf, b"hi");
    // The root namespace's loopback is another one: a connection there never reaches `l`.
    let _ = std::net::TcpStream::connect(("127.0.0.1", port));
    l.set_nonblocking(true)?;
    assert_eq!(
        l.accept().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock
    );
    Ok(())
}

#[test]
fn processes_are_killed_and_netns_deleted_on_drop() -> anyhow::Result<()> {
    require_root();
    let cluster = Cluster::new()?;
    let pod = cluster.add_pod("p")?;
    let names: Vec<PathBuf> = vec![
        pod.netns_path().to_owned(),
        cluster.switch().path().to_owned(),
    ];

    let mut proc_ = pod.spawn(&["sleep", "1000"])?;
    let pid = proc_.pid();
    assert!(proc_.is_running());
    assert_eq!(
        sockmesh_tests::sys::ns_id(Path::new(&format!("/proc/{pid}/ns/net")))?.1,
        pod.netns_inode()?,
        "spawned process runs in the pod"
    );
    drop(proc_);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "killed and reaped on drop"
    );

    // A daemon that left our process group is still caught by the pod's drop.
    pod.exec(&["setsid", "-f", "sleep", "1000"])?;
    let daemons = pids_in_netns(pod.netns_path())?;
    assert_eq!(daemons.len(), 1, "{daemons:?}");

    // Logs of spawned processes land in the cluster's temp dir.
    let mut echo = pod.spawn(&["sh", "-c", "echo hello-from-pod"])?;
    echo.wait_timeout(T)?.expect("sh exits");
    assert_eq!(echo.log().trim(), "hello-from-pod");
    let tmp = cluster.tmp().to_owned();
    drop(echo);

    drop(pod);
    assert!(wait_pid_exit(daemons[0], T)?, "daemon killed with its pod");
    assert!(!names[0].exists(), "pod netns deleted");
    drop(cluster);
    assert!(!names[1].exists(), "switch netns deleted");
    assert!(!tmp.exists(), "temp dir removed");
    Ok(())
}

#[test]
fn parallel_clusters_reuse_the_same_subnet() -> anyhow::Result<()> {
    require_root();
    let (c1, c2) = (Cluster::new()?, Cluster::new()?);
    let (a1, b1) = (c1.add_pod("a")?, c1.add_pod("b")?);
    let (a2, b2) = (c2.add_pod("a")?, c2.add_pod("b")?);
    assert_eq!((a1.ip4(), b1.ip4()), (a2.ip4(), b2.ip4()));
    let s1 = TcpServer::start(&b1, "0.0.0.0:7000".parse()?)?;
    let s2 = TcpServer::start(&b2, "0.0.0.0:7000".parse()?)?;
    let _c1 = tcp_connect(&a1, b1.addr4(7000), T)?;
    assert!(s1.next_accept(T).is_ok());
    assert!(
        s2.next_accept(Duration::from_millis(200)).is_err(),
        "cluster 2 saw cluster 1's traffic"
    );
    Ok(())
}

/// What `cargo xtask bench` builds: a cluster on subnets of its own, pods at chosen host
/// numbers (mixed with numbered ones), sysctls set per pod.
#[test]
fn pods_at_chosen_hosts_on_other_subnets() -> anyhow::Result<()> {
    require_root();
    let c = Cluster::with_subnets("10.79.0.0".parse()?, "fd79::".parse()?)?;
    let (srv, cli) = (c.add_pod_at("srv", 11)?, c.add_pod_at("cli", 20)?);
    assert_eq!(srv.ip4().to_string(), "10.79.0.11");
    assert_eq!(srv.ip6().to_string(), "fd79::11");
    assert!(srv.name().starts_with(c.name()));
    assert!(
        c.add_pod_at("again", 11).is_err(),
        "host 11 given out twice"
    );
    assert!(
        c.add_pod_at("unused", 254).is_err(),
        "the unused address given out"
    );
    // Numbered pods skip the taken hosts.
    let next = c.add_pod("next")?;
    assert_eq!(next.ip4().to_string(), "10.79.0.10");
    assert_eq!(c.add_pod("then")?.ip4().to_string(), "10.79.0.12");
    cli.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    let reuse = cli.exec(&["cat", "/proc/sys/net/ipv4/tcp_tw_reuse"])?;
    assert_eq!(reuse.trim(), "1");
    tcp_between(&cli, &srv, any6(), srv.ip6().into())?;
    tcp_between(&cli, &srv, any4(), srv.ip4().into())
}

#[test]
fn sweep_removes_leftovers_of_dead_test_processes() -> anyhow::Result<()> {
    require_root();
    // A pid that certainly belonged to a process that is now dead: one we reaped ourselves.
    let mut child = std::process::Command::new("true").spawn()?;
    let dead = child.id();
    child.wait()?;
    assert!(!pid_alive(dead));
    let name = format_name(dead, 0, &random_hex(2));

    // Leftovers as a SIGKILLed test would leave them: a netns with a process in it, a bpffs
    // dir, a temp dir. (Guards are forgotten, as if the process had died.)
    let ns = NetNs::create(&name)?;
    let mut sleeper = Proc::spawn(
        {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", &name, "sleep", "1000"]);
            c
        },
        "sleeper",
        None,
    )?;
    let netns_path = ns.path().to_owned();
    std::mem::forget(ns);
    sockmesh_tests::agent::ensure_bpffs()?;
    let bpf = Path::new(sockmesh_tests::agent::BPFFS_ROOT).join(&name);
    std::fs::create_dir(&bpf)?;
    let tmp = std::env::temp_dir().join(&name);
    std::fs::create_dir(&tmp)?;
    // Something of a live owner (us) must survive the sweep.
    let live = Pod::isolated("live")?;

    let done = sweep_stale()?;
    assert!(done.iter().any(|l| l.contains(&name)), "{done:?}");
    assert!(
        sleeper.wait_timeout(T)?.is_some(),
        "process in stale netns killed"
    );
    assert!(!netns_path.exists());
    assert!(!bpf.exists());
    assert!(!tmp.exists());
    assert!(live.netns_path().exists(), "live test's netns untouched");
    Ok(())
}
