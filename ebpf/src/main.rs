//! sockmesh kernel programs. All are attached once at the cgroup2 root (multi-attach links)
//! and act only on sockets whose network namespace is enrolled in `SM_PODS`; every other
//! socket, and every socket carrying the agent's SO_MARK, passes untouched.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![allow(clippy::missing_safety_doc)]

#[cfg(target_arch = "bpf")]
mod addr;
#[cfg(target_arch = "bpf")]
mod capture;
#[cfg(target_arch = "bpf")]
mod dns;
#[cfg(target_arch = "bpf")]
mod inbound;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod outbound;
#[cfg(target_arch = "bpf")]
mod relay;
#[cfg(target_arch = "bpf")]
mod util;

#[cfg(all(not(test), target_arch = "bpf"))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

// Host builds (cargo check/clippy of the workspace) only need the crate to type-check.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
