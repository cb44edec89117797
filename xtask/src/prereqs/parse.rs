//! Pure parsers for the prerequisite checks: tool output, /proc/self/mounts, kernel releases.

use std::path::{Path, PathBuf};

/// `bpf-linker 0.10.0` (possibly with trailing text) -> (0, 10, 0).
pub fn parse_bpf_linker_version(out: &str) -> Option<(u32, u32, u32)> {
    let word = out
        .split_whitespace()
        .skip_while(|w| *w != "bpf-linker")
        .nth(1)?;
    let core = word.trim_start_matches('v').split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u32>().ok());
    let v = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(v)
}

/// `6.18.44-fc-v595` -> (6, 18); `5.15.0-91-generic` -> (5, 15).
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[derive(Debug, PartialEq, Eq)]
pub struct Mount {
    pub target: PathBuf,
    pub fstype: String,
}

/// Parses `/proc/self/mounts` (fstab format; spaces in paths appear as `\040`).
pub fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let _source = f.next()?;
            let target = PathBuf::from(unescape_mount(f.next()?));
            let fstype = f.next()?.to_string();
            Some(Mount { target, fstype })
        })
        .collect()
}

/// The cgroup2 mount the agent attaches to (its `--cgroup-root` default does the same search).
pub fn cgroup2_mount(mounts: &[Mount]) -> Option<PathBuf> {
    let cgroup2: Vec<&Mount> = mounts.iter().filter(|m| m.fstype == "cgroup2").collect();
    cgroup2
        .iter()
        .find(|m| m.target == Path::new("/sys/fs/cgroup"))
        .or(cgroup2.first())
        .map(|m| m.target.clone())
}

/// Decodes the kernel's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` `\`).
fn unescape_mount(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let oct = bytes
            .get(i + 1..i + 4)
            .filter(|o| o.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], oct) {
            (b'\\', Some(o)) => {
                out.push(
                    o.iter()
                        .fold(0u8, |acc, d| acc.wrapping_mul(8) + (d - b'0')),
                );
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `rustup toolchain list` shows a toolchain called exactly `name`
/// (`nightly-<host>`, not a dated `nightly-2024-01-01-<host>`).
pub fn has_named_toolchain(list: &str, name: &str) -> bool {
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .any(|tc| {
            tc == name
                || tc
                    .strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix('-'))
                    .is_some_and(|host| !host.starts_with(|c: char| c.is_ascii_digit()))
        })
}

/// Whether `rustup component list --installed` lists `component` (`rust-src` has no host suffix).
pub fn has_component(list: &str, component: &str) -> bool {
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .any(|name| {
            name == component
                || name
                    .strip_prefix(component)
                    .and_then(|rest| rest.strip_prefix('-'))
                    .is_some_and(|host| host.matches('-').count() >= 2)
        })
}

/// `dpkg-query -W -f='${Status}'` says the package is installed.
pub fn dpkg_installed(status: &str) -> bool {
    status.trim() == "install ok installed"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpf_linker_versions() {
        assert_eq!(
            parse_bpf_linker_version("bpf-linker 0.10.0\n"),
            Some((0, 10, 0))
        );
        assert_eq!(
            parse_bpf_linker_version("bpf-linker 0.13.1"),
            Some((0, 13, 1))
        );
        assert_eq!(
            parse_bpf_linker_version("bpf-linker 0.10.0-dev (abc123)"),
            Some((0, 10, 0))
        );
        assert_eq!(
            parse_bpf_linker_version("bpf-linker v0.9.15"),
            Some((0, 9, 15))
        );
        assert_eq!(parse_bpf_linker_version(""), None);
        assert_eq!(parse_bpf_linker_version("bpf-linker"), None);
        assert_eq!(parse_bpf_linker_version("bpf-linker 0.10"), None);
        assert_eq!(parse_bpf_linker_version("bpf-linker 0.10.0.1"), None);
        assert_eq!(parse_bpf_linker_version("something 0.10.0"), None);
    }

    #[test]
    fn kernel_versions() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v595"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.15.0-91-generic\n"), Some((5, 15)));
        assert_eq!(parse_kernel_version("6.1.0-rc1"), Some((6, 1)));
        assert_eq!(parse_kernel_version("6.8-rc2"), Some((6, 8)));
        assert_eq!(parse_kernel_version("4.19.0"), Some((4, 19)));
        assert_eq!(parse_kernel_version("6"), None);
        assert_eq!(parse_kernel_version("linux"), None);
        assert!(parse_kernel_version("5.14.21").unwrap() < (5, 15));
        assert!(parse_kernel_version("5.15.0").unwrap() >= (5, 15));
        assert!(parse_kernel_version("6.0.0").unwrap() >= (5, 15));
    }

    const MOUNTS: &str = "\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
bpf /sys/fs/bpf bpf rw,relatime 0 0
/dev/sda1 /mnt/my\\040disk ext4 rw 0 0
";

    #[test]
    fn mounts_parse() {
        let m = parse_mounts(MOUNTS);
        assert_eq!(m.len(), 6);
        assert_eq!(
            m[4],
            Mount {
                target: "/sys/fs/bpf".into(),
                fstype: "bpf".into()
            }
        );
        assert_eq!(m[5].target, PathBuf::from("/mnt/my disk"));
        assert_eq!(
            cgroup2_mount(&m),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert!(parse_mounts("").is_empty());
        assert!(parse_mounts("truncated-line\n").is_empty());
    }

    #[test]
    fn cgroup2_prefers_the_standard_path() {
        let m = parse_mounts(
            "cgroup2 /run/other cgroup2 rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n",
        );
        assert_eq!(cgroup2_mount(&m), Some(PathBuf::from("/sys/fs/cgroup")));
        let m = parse_mounts("cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n");
        assert_eq!(cgroup2_mount(&m), None);
    }

    #[test]
    fn mount_escapes() {
        assert_eq!(unescape_mount("a\\040b\\011c\\134d"), "a b\tc\\d");
        assert_eq!(unescape_mount("trailing\\"), "trailing\\");
        assert_eq!(unescape_mount("not\\9octal"), "not\\9octal");
    }

    #[test]
    fn toolchains() {
        let list = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                    nightly-x86_64-unknown-linux-gnu\n\
                    1.95.0-x86_64-unknown-linux-gnu\n";
        assert!(has_named_toolchain(list, "nightly"));
        assert!(has_named_toolchain(list, "stable"));
        assert!(!has_named_toolchain(list, "beta"));
        assert!(!has_named_toolchain(
            "nightly-2024-05-01-x86_64-unknown-linux-gnu\n",
            "nightly"
        ));
        assert!(has_named_toolchain("nightly\n", "nightly"));
        assert!(!has_named_toolchain("no installed toolchains\n", "nightly"));
    }

    #[test]
    fn components() {
        let list = "cargo-x86_64-unknown-linux-gnu\nrust-src\nrustc-x86_64-unknown-linux-gnu\n";
        assert!(has_component(list, "rust-src"));
        assert!(!has_component(
            "rust-std-x86_64-unknown-linux-gnu\n",
            "rust-src"
        ));
        assert!(has_component(
            "rust-src-x86_64-unknown-linux-gnu\n",
            "rust-src"
        ));
        assert!(!has_component("rust-src-extra\n", "rust-src"));
        assert!(has_component("rust-src (installed)\n", "rust-src"));
    }

    #[test]
    fn dpkg_status() {
        assert!(dpkg_installed("install ok installed"));
        assert!(!dpkg_installed("deinstall ok config-files"));
        assert!(!dpkg_installed("unknown ok not-installed"));
        assert!(!dpkg_installed(""));
    }
}
