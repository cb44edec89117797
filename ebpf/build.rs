use std::process::Command;

// bpf-linker is the linker for the bpfel target; say clearly when it is missing instead of
// letting rustc fail with a cryptic linker error.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("bpf") {
        return;
    }
    if which::which("bpf-linker").is_err()
        && Command::new("bpf-linker")
            .arg("--version")
            .output()
            .is_err()
    {
        panic!(
            "bpf-linker not found on PATH: run `cargo xtask build` (installs bpf-linker 0.10.0)"
        );
    }
}
