//! The inbound steering object: only the `sk_lookup` program (`steer.rs`), loaded by the agent
//! once per enrolled pod with that pod's netns cookie as a constant (an `sk_lookup` program
//! cannot ask for it). It shares the pinned maps with the main object, by name, and the
//! modules they are declared in.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![warn(clippy::undocumented_unsafe_blocks)]

#[cfg(target_arch = "bpf")]
#[path = "../addr.rs"]
#[allow(dead_code)]
mod addr;
#[cfg(target_arch = "bpf")]
#[path = "../maps.rs"]
#[allow(dead_code)]
mod maps;
#[cfg(target_arch = "bpf")]
#[path = "../steer.rs"]
mod steer;
#[cfg(target_arch = "bpf")]
#[path = "../util.rs"]
#[allow(dead_code)]
mod util;

#[cfg(all(not(test), target_arch = "bpf"))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here.
    loop {}
}

// SAFETY: as in main.rs: the program license, in the "license" section, referred to by nothing.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

// Host builds (cargo check/clippy of the workspace) only need the crate to type-check.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
