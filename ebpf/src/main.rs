//! sockmesh kernel programs. All but one are attached once at the cgroup2 root (multi-attach
//! links) and act only on sockets whose network namespace is enrolled in `SM_PODS`; every other
//! socket, and every socket the agent registered as its own (`SM_AGENT_SOCKS`, by cookie),
//! passes untouched. The exception, `sk_lookup` (inbound steering), is attached to each
//! enrolled pod's network namespace and built as an object of its own (`bin/steer.rs`).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The atomic add of `store.rs` (core has no atomic read-modify-write for this target).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]
// The kernel tier's shared counters and rate bucket need atomic fetch-and-add and
// compare-and-swap on map memory, written as BPF instructions (see `fast.rs`).
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]
// Every `unsafe` block says why it is sound (checked by `cargo +nightly clippy --target
// bpfel-unknown-none`; a host clippy compiles none of the programs).
#![warn(clippy::undocumented_unsafe_blocks)]

#[cfg(target_arch = "bpf")]
mod addr;
#[cfg(target_arch = "bpf")]
mod capture;
#[cfg(target_arch = "bpf")]
mod dns;
#[cfg(target_arch = "bpf")]
mod endpoints;
#[cfg(target_arch = "bpf")]
mod fast;
#[cfg(target_arch = "bpf")]
mod inbound;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod outbound;
#[cfg(target_arch = "bpf")]
mod raw;
#[cfg(target_arch = "bpf")]
mod relay;
#[cfg(target_arch = "bpf")]
mod store;
#[cfg(target_arch = "bpf")]
mod util;

#[cfg(all(not(test), target_arch = "bpf"))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here.
    loop {}
}

// SAFETY: `no_mangle` exports the symbol `LICENSE`, which nothing else in the object defines;
// `link_section` puts these 4 bytes in the "license" section, where the loader reads the
// program license (GPL, so the verifier allows GPL-only helpers). No code refers to it.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

// Host builds (cargo check/clippy of the workspace) only need the crate to type-check.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
