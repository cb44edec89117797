//! sockmesh: a sidecar-less eBPF service-mesh agent. The binary is a thin shell over this
//! library so the pure parts are unit-tested and the integration tests can reuse the schema.
pub mod app;
pub mod caps;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod events;
pub mod handover;
pub mod inotify;
pub mod inpod;
pub mod kube;
pub mod observe;
pub mod policy;
pub mod proxy;

/// The kernel programs, built by build.rs for bpfel-unknown-none.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sockmesh"));
