//! Builds the kernel programs (`ebpf/`) for bpfel-unknown-none with the nightly toolchain and
//! bpf-linker, the aya-template way; the object is embedded in the agent with
//! `include_bytes_aligned!`. `AYA_BUILD_SKIP=1` skips it (host-only checks, clippy).
#[path = "build_btf.rs"]
mod build_btf;

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf");
    let ebpf = aya_build::Package {
        name: "sockmesh-ebpf",
        root_dir: root,
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())?;
    // Both objects (see lib.rs) get BTF the kernel accepts, so their maps can carry key and
    // value types (build_btf.rs says why this is needed).
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    for name in ["sockmesh", "sockmesh-steer"] {
        let path = out.join(name);
        let Ok(mut obj) = std::fs::read(&path) else {
            continue; // AYA_BUILD_SKIP: no object to fix.
        };
        let fixed = build_btf::sanitize_type_names(&mut obj)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if fixed > 0 {
            std::fs::write(&path, obj)?;
        }
    }
    Ok(())
}
