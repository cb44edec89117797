//! Integration-test harness for sockmesh: real network namespaces ("pods") on a private bridge,
//! processes and small Rust peers inside them, and the real agent as a guarded child process.
//!
//! Every resource is an RAII guard that cleans up on drop, also when the test panics; leftovers
//! of test processes that were killed outright are removed by [`cleanup::sweep_stale`] (the
//! `smt-sweep` binary). Nothing is created in the root network namespace, and traffic only
//! flows on loopback and inside the test's own namespaces.
//!
//! ```no_run
//! use sockmesh_tests::*;
//! use std::time::Duration;
//! # fn main() -> anyhow::Result<()> {
//! require_root();
//! let cluster = Cluster::new()?;
//! let (a, b) = (cluster.add_pod("client")?, cluster.add_pod("server")?);
//! let server = TcpServer::start(&b, "0.0.0.0:8080".parse()?)?;
//! let mut c = tcp_connect(&a, b.addr4(8080), Duration::from_secs(5))?;
//! tcp_echo_roundtrip(&mut c.stream, b"hello")?;
//! assert_eq!(server.next_accept(Duration::from_secs(5))?.peer.ip(), a.ip4());
//! # Ok(()) }
//! ```

pub mod agent;
pub mod bpfmap;
pub mod caps;
pub mod cleanup;
pub mod daemonset;
pub mod image;
pub mod kubeapi;
pub mod kubelet;
pub mod kubepod;
pub mod manifest;
pub mod names;
pub mod netns;
pub mod node;
pub mod ocispec;
pub mod peers;
pub mod pod;
pub mod process;
pub mod procnet;
pub mod prom;
pub mod promserver;
pub mod rawpkt;
pub mod runc;
pub mod sockaddr;
pub mod sys;
pub mod tempdir;
pub mod tier;

pub use agent::{pod_spec, read_json, sockmesh_bin, Agent, BpfFsDir};
pub use kubeapi::{FakeKubeApi, FakePod, FakeService, FakeSlice};
pub use kubelet::{new_uid, Driver, KubeletPod};
pub use netns::{current_netns_inode, run_in_netns, NetNs};
pub use peers::{
    tcp_connect, tcp_connect_from, tcp_echo_roundtrip, udp_connected, udp_sendto, Accepted,
    Connected, ServerMode, TcpServer, UdpEchoServer, UdpReply, IO_TIMEOUT,
};
pub use pod::{Cluster, Pod};
pub use process::Proc;
pub use procnet::{established, tcp_listeners, wait_tcp_listening, Established};
pub use sockaddr::{getpeername, getsockname, original_dst, parse_sockaddr, unmap};
pub use sys::require_root;
pub use tempdir::TempDir;
pub use tier::Tier;
