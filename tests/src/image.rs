//! The agent's container image, built on this machine from the repository's `Dockerfile` with
//! podman, without any image registry: the Debian base is made from Debian's own packages with
//! mmdebstrap once (and kept: present means done), and the Dockerfile's runtime stage is built
//! on it around the agent binary the tests run (`SOCKMESH_BIN`), which stands in for the
//! Dockerfile's build stage (`--build-arg AGENT=prebuilt`). Layers are cached: with the same
//! binary a rebuild takes about a second.

use crate::ocispec::ImageConfig;
use crate::sys::{self, FileLock};
use crate::tempdir::TempDir;
use anyhow::{Context, Result};
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The local Debian base (the Dockerfile's `BASE_IMAGE` build argument).
pub const BASE_IMAGE: &str = "localhost/debian:bookworm-slim";
const SUITE: &str = "bookworm";
/// Image builds are serialised across test processes (same tag, same layer cache).
const LOCK: &str = "smt-image-build";
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);

/// The repository's Dockerfile.
pub fn dockerfile() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../Dockerfile")
}

fn podman(args: &[&str]) -> Result<String> {
    sys::run(Command::new("podman").args(args))
}

fn image_exists(name: &str) -> bool {
    Command::new("podman")
        .args(["image", "exists", name])
        .status()
        .is_ok_and(|s| s.success())
}

/// Makes [`BASE_IMAGE`] unless it exists: a minimal Debian with ca-certificates, from Debian's
/// own packages (`mmdebstrap`), imported into podman. About 40 s, once per machine.
pub fn ensure_base_image() -> Result<()> {
    let _lock = FileLock::acquire(LOCK)?;
    if image_exists(BASE_IMAGE) {
        return Ok(());
    }
    eprintln!("[smt] building the base image {BASE_IMAGE} with mmdebstrap (once)");
    let tmp = TempDir::new()?;
    let tar = tmp.join("base.tar");
    // What Debian's own images configure: apt drops its caches after every run.
    let clean = tmp.join("docker-clean");
    fs::write(
        &clean,
        "DPkg::Post-Invoke { \"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true\"; };\n\
         APT::Update::Post-Invoke { \"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true\"; };\n\
         Dir::Cache::pkgcache \"\";\nDir::Cache::srcpkgcache \"\";\n",
    )?;
    sys::run_bounded(
        Command::new("mmdebstrap")
            .args(["--variant=minbase", "--include=ca-certificates"])
            // What Debian's own slim images leave out.
            .args([
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--dpkgopt=path-include=/usr/share/doc/*/copyright",
                "--dpkgopt=path-exclude=/usr/share/locale/*",
            ])
            .arg(format!(
                "--customize-hook=upload {} /etc/apt/apt.conf.d/docker-clean",
                clean.display()
            ))
            .arg("--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*.bin")
            .arg(SUITE)
            .arg(&tar),
        BUILD_TIMEOUT,
        tmp.path(),
    )
    .context("mmdebstrap (it needs Debian's package mirror)")?;
    podman(&["import", &tar.to_string_lossy(), BASE_IMAGE])?;
    Ok(())
}

/// A built image: its id and what its config says.
#[derive(Debug, Clone)]
pub struct Image {
    pub id: String,
    pub config: ImageConfig,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn inspect(name: &str) -> Result<Image> {
    let out = podman(&["image", "inspect", "--format", "json", name])?;
    let v: Value = serde_json::from_str(&out).context("podman image inspect output")?;
    let img = &v[0];
    let c = &img["Config"];
    Ok(Image {
        id: img["Id"]
            .as_str()
            .context("image without an Id")?
            .to_string(),
        config: ImageConfig {
            entrypoint: strings(&c["Entrypoint"]),
            cmd: strings(&c["Cmd"]),
            env: strings(&c["Env"]),
            working_dir: c["WorkingDir"].as_str().unwrap_or("").to_string(),
            user: c["User"].as_str().unwrap_or("").to_string(),
        },
    })
}

/// The runtime image built, and its filesystem unpacked for runc bundles to use as their
/// (read-only) root. Built and unpacked under one lock, so a parallel build of another agent
/// binary, which removes the image this one replaces, cannot remove it before it is unpacked.
pub struct Unpacked {
    pub image: Image,
    rootfs: TempDir,
}

impl Unpacked {
    /// The image's filesystem (a bundle's `root.path`).
    pub fn rootfs(&self) -> &Path {
        self.rootfs.path()
    }
}

/// Builds the Dockerfile's runtime image as `tag` around `agent_bin`, on [`BASE_IMAGE`], and
/// unpacks it. Images of an earlier agent binary are removed: they are nobody's cache any more.
pub fn build_and_unpack(tag: &str, agent_bin: &Path) -> Result<Unpacked> {
    ensure_base_image()?;
    let _lock = FileLock::acquire(LOCK)?;
    // The context holds only the binary; debug symbols are stripped (35 MB instead of 200),
    // the same bytes every time for the same binary, so the layer cache still hits.
    let ctx = TempDir::new()?;
    let bin = ctx.join("sockmesh");
    sys::run(Command::new("strip").arg("-o").arg(&bin).arg(agent_bin))
        .with_context(|| format!("strip {}", agent_bin.display()))?;
    sys::run_bounded(
        Command::new("podman")
            .args(["build", "--layers", "--runtime", "runc"])
            // RUN steps (apt-get) reach Debian's mirror through the host's network.
            .args(["--network", "host"])
            .args(["--build-arg", &format!("BASE_IMAGE={BASE_IMAGE}")])
            .args(["--build-arg", "AGENT=prebuilt"])
            .arg("-f")
            .arg(dockerfile())
            .args(["-t", tag])
            .arg(ctx.path()),
        BUILD_TIMEOUT,
        ctx.path(),
    )
    .context("podman build of the Dockerfile")?;
    let image = inspect(tag)?;
    let rootfs = TempDir::new()?;
    export_rootfs(&image, rootfs.path())?;
    remove_stale(&image);
    Ok(Unpacked { image, rootfs })
}

/// Content hashes of the agent binaries in an image's history (`COPY file:<hash> in
/// .../sockmesh`): the build stage's image and every image built on it carry the line.
fn agent_binaries(history: &Value) -> Vec<String> {
    history
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h["created_by"].as_str().or(h["CreatedBy"].as_str()))
        .filter_map(|c| c.split("COPY file:").nth(1))
        .filter_map(|c| {
            let mut words = c.split_whitespace();
            let hash = words.next()?;
            let dst = words.nth(1)?;
            dst.ends_with("/sockmesh").then(|| hash.to_string())
        })
        .collect()
}

/// Removes every image (build cache included) holding an agent binary other than `current`'s,
/// newest layers first. Errors are ignored: an image still in use stays, harmlessly.
fn remove_stale(current: &Image) {
    let Ok(all) = podman(&["images", "--all", "--quiet", "--no-trunc"]) else {
        return;
    };
    let mut args = vec!["image", "inspect", "--format", "json"];
    args.extend(all.lines());
    let images: Vec<Value> = podman(&args)
        .ok()
        .and_then(|o| serde_json::from_str(&o).ok())
        .unwrap_or_default();
    let current_bin = images
        .iter()
        .find(|i| i["Id"] == current.id.as_str())
        .map(|i| agent_binaries(&i["History"]))
        .unwrap_or_default();
    if current_bin.is_empty() {
        return;
    }
    let mut stale: Vec<(usize, &str)> = images
        .iter()
        .filter_map(|i| {
            let bins = agent_binaries(&i["History"]);
            let old = !bins.is_empty() && !bins.iter().any(|b| current_bin.contains(b));
            let depth = i["History"].as_array().map_or(0, Vec::len);
            old.then(|| Some((depth, i["Id"].as_str()?)))?
        })
        .collect();
    stale.sort_by_key(|s| std::cmp::Reverse(s.0));
    for (_, id) in stale {
        let _ = podman(&["rmi", id]);
    }
}

/// Unpacks `image`'s filesystem into `dir`: a container is created (never started) to
/// export it, and removed.
fn export_rootfs(image: &Image, dir: &Path) -> Result<()> {
    let name = crate::names::unique_name();
    let scratch = TempDir::new()?;
    let tar = scratch.join("rootfs.tar");
    podman(&["create", "--network", "none", "--name", &name, &image.id])?;
    let export = podman(&["export", "-o", &tar.to_string_lossy(), &name]);
    let _ = podman(&["rm", "--force", &name]);
    export?;
    sys::run(
        Command::new("tar")
            .args(["-x", "--numeric-owner", "-f"])
            .arg(&tar)
            .arg("-C")
            .arg(dir),
    )
    .map(|_| ())
}

/// Names of podman containers (a killed test may leave the one it exported from).
pub fn containers() -> Vec<String> {
    podman(&["ps", "--all", "--format", "{{.Names}}"])
        .map(|o| o.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Removes a podman container.
pub fn remove_container(name: &str) {
    let _ = podman(&["rm", "--force", name]);
}
