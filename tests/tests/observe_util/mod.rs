//! The pinned maps as an outside tool reads them (bpftool, no sockmesh in between), for the
//! observe tests to hold the CLI and /metrics against.
use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// `bpftool -j map dump pinned`: (key bytes, value bytes summed per u64 over CPUs).
pub fn bpftool_dump(path: &std::path::Path) -> Result<Vec<(Vec<u8>, Vec<u64>)>> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(path)
        .output()
        .context("run bpftool")?;
    if !out.status.success() {
        bail!("bpftool: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let bytes = |a: &Value| -> Vec<u8> {
        a.as_array()
            .expect("byte array")
            .iter()
            .map(|b| {
                u8::from_str_radix(b.as_str().expect("hex").trim_start_matches("0x"), 16)
                    .expect("hex byte")
            })
            .collect()
    };
    let words = |b: &[u8]| -> Vec<u64> {
        b.chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
            .collect()
    };
    let mut rows = Vec::new();
    for e in v.as_array().context("dump is an array")? {
        let key = bytes(&e["key"]);
        let value = match e.get("values") {
            // Per-CPU map: one value per CPU, summed.
            Some(cpus) => {
                let mut sum: Vec<u64> = Vec::new();
                for c in cpus.as_array().expect("cpus") {
                    let w = words(&bytes(&c["value"]));
                    sum.resize(w.len(), 0);
                    for (s, x) in sum.iter_mut().zip(w) {
                        *s += x;
                    }
                }
                sum
            }
            None => words(&bytes(&e["value"])),
        };
        rows.push((key, value));
    }
    Ok(rows)
}

/// The `PeerKey` bytes of an IPv4 outbound peer of a pod, as the maps hold them.
pub fn peer_key_bytes(cookie: u64, peer: SocketAddr) -> Vec<u8> {
    let SocketAddr::V4(v4) = peer else {
        panic!("ipv4 only")
    };
    let mut k = cookie.to_ne_bytes().to_vec();
    k.extend(v4.ip().octets());
    k.extend([0u8; 12]);
    k.extend(v4.port().to_be_bytes());
    k.extend(2u16.to_ne_bytes()); // AF_INET
    k.extend(1u16.to_ne_bytes()); // outbound
    k.extend([0u8; 2]);
    k
}
