//! Builds the kernel programs (`ebpf/`) for bpfel-unknown-none with the nightly toolchain and
//! bpf-linker, the aya-template way; the object is embedded in the agent with
//! `include_bytes_aligned!`. `AYA_BUILD_SKIP=1` skips it (host-only checks, clippy).
fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf");
    let ebpf = aya_build::Package {
        name: "sockmesh-ebpf",
        root_dir: root,
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}
