//! Makes the kernel programs' BTF loadable: bpf-linker 0.10.0 sanitizes struct names for the
//! kernel (`Foo<u8>` becomes `Foo_3C_u8_3E_`) but not union names, and aya-log-ebpf brings in
//! a union named `MaybeUninit<u8>` (the `AYA_LOG_LEVEL` global). The kernel rejects the whole
//! object's BTF for that one name ("Invalid name"), aya then loads without BTF without a word,
//! and no map can carry key/value types. This rewrites, in place, every byte of a struct,
//! union, enum, forward or typedef name in `.BTF` that is not `[A-Za-z0-9_]` into `_`: same
//! length, so no offset moves. Newer bpf-linkers sanitize unions themselves; then this finds
//! nothing to do.

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// The `.BTF` section of a little-endian ELF64 object: (offset, size).
fn btf_section(obj: &[u8]) -> Option<(usize, usize)> {
    if obj.get(0..4)? != b"\x7fELF" || *obj.get(4)? != 2 || *obj.get(5)? != 1 {
        return None;
    }
    let shoff = u64_at(obj, 0x28)? as usize;
    let shentsize = u16_at(obj, 0x3a)? as usize;
    let shnum = u16_at(obj, 0x3c)? as usize;
    let shstrndx = u16_at(obj, 0x3e)? as usize;
    let sh = |i: usize| shoff + i * shentsize;
    let names = u64_at(obj, sh(shstrndx) + 24)? as usize;
    for i in 0..shnum {
        let name_off = u32_at(obj, sh(i))? as usize;
        let name = obj.get(names + name_off..)?;
        if name.starts_with(b".BTF\0") {
            let off = u64_at(obj, sh(i) + 24)? as usize;
            let size = u64_at(obj, sh(i) + 32)? as usize;
            return Some((off, size));
        }
    }
    None
}

/// Sanitizes the type names described above; returns how many names it changed, or why the
/// object could not be read (then it is left as it was).
pub fn sanitize_type_names(obj: &mut [u8]) -> Result<usize, String> {
    let Some((base, size)) = btf_section(obj) else {
        return Ok(0);
    };
    let btf = obj
        .get(base..base + size)
        .ok_or("the .BTF section lies outside the file")?;
    if u16_at(btf, 0) != Some(0xeb9f) {
        return Err("no BTF magic in .BTF".into());
    }
    let field = |off| {
        u32_at(btf, off)
            .map(|v| v as usize)
            .ok_or("short BTF header")
    };
    let (hdr_len, type_off, type_len, str_off, str_len) =
        (field(4)?, field(8)?, field(12)?, field(16)?, field(20)?);
    let types = hdr_len + type_off;
    let strs = hdr_len + str_off;
    let mut to_fix = Vec::new();
    let mut at = types;
    while at < types + type_len {
        let name_off = field(at)?;
        let info = field(at + 4)?;
        let (kind, vlen) = ((info >> 24) & 0x1f, info & 0xffff);
        // Bytes after the 12-byte common header, per kind (include/uapi/linux/btf.h).
        let extra = match kind {
            1 | 14 | 17 => 4,
            3 => 12,
            2 | 7..=12 | 16 | 18 => 0,
            4 | 5 | 15 | 19 => 12 * vlen,
            6 | 13 => 8 * vlen,
            k => return Err(format!("unknown BTF kind {k}")),
        };
        // Named types whose names the kernel checks as C identifiers.
        if matches!(kind, 4 | 5 | 6 | 7 | 8 | 19) && name_off != 0 {
            to_fix.push(strs + name_off);
        }
        at += 12 + extra;
    }
    let mut fixed = 0;
    for start in to_fix {
        let mut changed = false;
        let mut i = base + start;
        while i < base + strs + str_len && obj[i] != 0 {
            if !(obj[i].is_ascii_alphanumeric() || obj[i] == b'_') {
                obj[i] = b'_';
                changed = true;
            }
            i += 1;
        }
        fixed += usize::from(changed);
    }
    Ok(fixed)
}
