//! The NVIDIA fat binary containers of `.nv_fatbin` and `__nv_relfatbin`
//! (binary-formats.md §1): containers, entries, concatenated entries, the architecture of
//! each entry, and a cross-check against an uncompressed cubin's own ELF header.
//!
//! The tests (a synthetic fatbin builder, one test per malformation the checklist of
//! binary-formats.md §3 names, and a fuzz loop) live in `nv_fatbin/tests.rs`.

use std::fmt;

use object::elf;

use super::{EI_ABIVERSION, EI_CLASS, EI_DATA, InspectError, corrupt, le_u16, le_u32, le_u64, to_usize};
use crate::platform::{CudaArch, CudaFeatureSet};

/// The ELF section holding loadable fat binary containers.
pub const NV_FATBIN_SECTION: &str = ".nv_fatbin";
/// The ELF section holding the relocatable containers of `-rdc` builds.
pub const NV_RELFATBIN_SECTION: &str = "__nv_relfatbin";

/// Most containers read from one section.
const MAX_CONTAINERS: usize = 1 << 16;
/// Most entries read from one container.
const MAX_ENTRIES: usize = 1 << 16;
/// Most sub-entries in one concatenated entry (checklist §3.4).
const MAX_CONCAT: u32 = 1024;

const FATBIN_MAGIC: u32 = 0xBA55_ED50;
const CONTAINER_HEADER_LEN: u64 = 16;
const ENTRY_HEADER_LEN: u64 = 0x40;
const ENTRY_VERSION: u16 = 0x0101;

const KIND_PTX: u16 = 0x0001;
const KIND_ELF: u16 = 0x0002;
const KIND_NVVM: u16 = 0x0008;
const KIND_CONCAT: u16 = 0x0100;

const FLAG_COMPRESS_LEGACY: u64 = 0x1000;
const FLAG_COMPRESS_LZ4: u64 = 0x2000;
const FLAG_COMPRESS_ZSTD: u64 = 0x8000;
const FLAG_ARCH_SPECIFIC: u64 = 0x10_0000;
const FLAG_FAMILY: u64 = 0x20_0000;
/// Every flag bit binary-formats.md §1.6 names, verified or not.
const KNOWN_FLAGS: u64 = 0x1
    | 0x2
    | 0x4
    | 0x8
    | 0x10
    | 0x20
    | 0x40
    | 0xF00
    | FLAG_COMPRESS_LEGACY
    | FLAG_COMPRESS_LZ4
    | FLAG_COMPRESS_ZSTD
    | 0x1_0000
    | FLAG_ARCH_SPECIFIC
    | FLAG_FAMILY
    | 0x100_0000;

pub(super) const EM_CUDA: u16 = 190;

/// What a fatbin entry holds (binary-formats.md §1.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum CudaCodeKind {
    /// A cubin: SASS for one real architecture (kind 2).
    Cubin,
    /// PTX text, JIT-compiled by the driver (kind 1).
    Ptx,
    /// NVVM IR / LTO-IR (kind 8), only found in `__nv_relfatbin`; opaque.
    Nvvm,
    /// A kind khub does not know, with its raw value; skipped by size.
    Unknown(u16),
}

impl fmt::Display for CudaCodeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CudaCodeKind::Cubin => f.write_str("cubin"),
            CudaCodeKind::Ptx => f.write_str("ptx"),
            CudaCodeKind::Nvvm => f.write_str("nvvm"),
            CudaCodeKind::Unknown(k) => write!(f, "unknown kind {k:#x}"),
        }
    }
}

/// One piece of device code found in a fatbin section.
///
/// Entries of a concatenated entry (kind 0x100, `nvcc --concat`) are reported one by one,
/// with [`CudaCodeEntry::concat`] set; the concatenated entry itself is not reported.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CudaCodeEntry {
    /// Cubin, PTX, NVVM, or an unknown kind.
    pub kind: CudaCodeKind,
    /// The architecture: `sm_XY[a|f]` for cubins (and NVVM, whose `lto_XY` target it
    /// names), `compute_XY[a|f]` for PTX. `None` when the header's arch is 0 or out of
    /// range, and for unknown kinds.
    pub arch: Option<CudaArch>,
    /// The header's code version `(major, minor)`: the PTX ISA version for PTX (9.5 for
    /// nvcc 13.5), 1.8 for CUDA 13 cubins.
    pub code_version: (u16, u16),
    /// How the payload is compressed: `"zstd"`, `"lz4"` or `"legacy"`; `None` if it is
    /// stored as is. Sub-entries of a concatenated entry inherit the blob's compression.
    pub compression: Option<&'static str>,
    /// True for entries of `__nv_relfatbin` (`-rdc` builds): relocatable, not directly
    /// loadable.
    pub relocatable: bool,
    /// The index of the container within its section, from 0.
    pub container: usize,
    /// The offset of the entry header (or concat sub-header) within its section.
    pub offset: u64,
    /// The raw entry flags (binary-formats.md §1.6).
    pub flags: u64,
    /// True for a sub-entry of a concatenated entry.
    pub concat: bool,
    /// The identifier (source file name) recorded by `-g` builds and `fatbinary --ident`.
    pub identifier: Option<String>,
}

/// The fields of a 64-byte fatbin entry header (binary-formats.md §1.3).
///
/// In a concat sub-header, `header_size` holds the image offset in the decompressed blob
/// and `payload_size` the image size (§1.10).
#[derive(Debug, Clone, Copy)]
struct RawEntry {
    kind: u16,
    version: u16,
    header_size: u32,
    payload_size: u64,
    compressed_size: u32,
    ext_offset: u32,
    code_version_minor: u16,
    code_version_major: u16,
    arch: u32,
    ident_offset: u32,
    ident_size: u32,
    flags: u64,
    uncompressed_size: u64,
}

impl RawEntry {
    /// Reads the base header at the start of `b`; `None` if `b` is shorter than 64 bytes.
    fn read(b: &[u8]) -> Option<RawEntry> {
        Some(RawEntry {
            kind: le_u16(b, 0x00)?,
            version: le_u16(b, 0x02)?,
            header_size: le_u32(b, 0x04)?,
            payload_size: le_u64(b, 0x08)?,
            compressed_size: le_u32(b, 0x10)?,
            ext_offset: le_u32(b, 0x14)?,
            code_version_minor: le_u16(b, 0x18)?,
            code_version_major: le_u16(b, 0x1A)?,
            arch: le_u32(b, 0x1C)?,
            ident_offset: le_u32(b, 0x20)?,
            ident_size: le_u32(b, 0x24)?,
            flags: le_u64(b, 0x28)?,
            uncompressed_size: le_u64(b, 0x38)?,
        })
    }
}

fn align8(v: u64) -> Option<u64> {
    v.checked_add(7).map(|x| x & !7)
}

/// Where an entry lies, for messages and the entries' bookkeeping.
struct Place<'a> {
    section: &'a str,
    relocatable: bool,
    container: usize,
}

/// Walks the fat binary containers of one section (`.nv_fatbin`, or `__nv_relfatbin`
/// when `relocatable`) and appends every entry to `out`, expanding concatenated entries
/// into their sub-entries.
///
/// Containers must follow each other, separated by nothing but zero bytes; each must fit
/// in the section and its entries must tile it exactly. A container whose version is not
/// 1 stops the walk of the section with a warning. Unknown kinds are appended as
/// [`CudaCodeKind::Unknown`] and warned about; unknown flag bits and entry versions are
/// warned about. Offsets in errors are relative to the section start.
pub fn parse_nv_fatbin(
    section: &[u8],
    relocatable: bool,
    out: &mut Vec<CudaCodeEntry>,
    warnings: &mut Vec<String>,
) -> Result<(), InspectError> {
    let name = if relocatable { NV_RELFATBIN_SECTION } else { NV_FATBIN_SECTION };
    let len = section.len() as u64;
    let mut off: u64 = 0;
    let mut container = 0usize;
    loop {
        // Zero padding between containers (and at the end of the section).
        while section.get(to_usize(off)) == Some(&0) {
            off += 1;
        }
        if off >= len {
            return Ok(());
        }
        if container >= MAX_CONTAINERS {
            return Err(corrupt(name, off, format!("more than {MAX_CONTAINERS} containers")));
        }
        let Some(header) = section
            .get(to_usize(off)..)
            .and_then(|rest| rest.get(..to_usize(CONTAINER_HEADER_LEN)))
        else {
            return Err(corrupt(
                name,
                off,
                format!("truncated container header: {} bytes left, 16 needed", len - off),
            ));
        };
        let (Some(magic), Some(version), Some(header_size), Some(fat_size)) =
            (le_u32(header, 0), le_u16(header, 4), le_u16(header, 6), le_u64(header, 8))
        else {
            return Err(corrupt(name, off, "truncated container header"));
        };
        if magic != FATBIN_MAGIC {
            return Err(corrupt(
                name,
                off,
                format!("expected container magic {FATBIN_MAGIC:#010x}, found {magic:#010x}"),
            ));
        }
        if version != 1 {
            warnings.push(format!(
                "{name} container {container} at {off:#x}: unknown container version {version}; \
                 the rest of the section is not read"
            ));
            return Ok(());
        }
        if u64::from(header_size) < CONTAINER_HEADER_LEN {
            return Err(corrupt(name, off, format!("container header size {header_size} is less than 16")));
        }
        let end = off
            .checked_add(u64::from(header_size))
            .and_then(|v| v.checked_add(fat_size))
            .filter(|&end| end <= len)
            .ok_or_else(|| {
                corrupt(
                    name,
                    off,
                    format!(
                        "container of {header_size} + {fat_size} bytes overruns the section ({} bytes left)",
                        len - off
                    ),
                )
            })?;
        let place = Place {
            section: name,
            relocatable,
            container,
        };
        parse_entries(section, off + u64::from(header_size), end, &place, out, warnings)?;
        off = end;
        container += 1;
    }
}

/// Walks the entries of one container, `section[start..end]`.
fn parse_entries(
    section: &[u8],
    start: u64,
    end: u64,
    place: &Place<'_>,
    out: &mut Vec<CudaCodeEntry>,
    warnings: &mut Vec<String>,
) -> Result<(), InspectError> {
    let name = place.section;
    let mut p = start;
    let mut count = 0usize;
    while p < end {
        count += 1;
        if count > MAX_ENTRIES {
            return Err(corrupt(name, p, format!("more than {MAX_ENTRIES} entries in one container")));
        }
        if end - p < ENTRY_HEADER_LEN {
            return Err(corrupt(
                name,
                p,
                format!(
                    "entries do not tile container {}: {} bytes left, less than an entry header",
                    place.container,
                    end - p
                ),
            ));
        }
        let raw = section
            .get(to_usize(p)..to_usize(p + ENTRY_HEADER_LEN))
            .and_then(RawEntry::read)
            .ok_or_else(|| corrupt(name, p, "truncated entry header"))?;
        let header_size = u64::from(raw.header_size);
        if header_size < ENTRY_HEADER_LEN {
            return Err(corrupt(name, p, format!("entry header size {header_size:#x} is less than 0x40")));
        }
        let next = p
            .checked_add(header_size)
            .and_then(|v| v.checked_add(raw.payload_size))
            .filter(|&next| next <= end)
            .ok_or_else(|| {
                corrupt(
                    name,
                    p,
                    format!(
                        "entry of {header_size:#x} + {:#x} bytes overruns container {} ({:#x} bytes left)",
                        raw.payload_size,
                        place.container,
                        end - p
                    ),
                )
            })?;
        if u64::from(raw.compressed_size) > raw.payload_size {
            return Err(corrupt(
                name,
                p,
                format!(
                    "compressed size {:#x} exceeds payload size {:#x}",
                    raw.compressed_size, raw.payload_size
                ),
            ));
        }
        // In bounds: p + header_size <= next <= end <= section.len().
        let header = section
            .get(to_usize(p)..to_usize(p + header_size))
            .ok_or_else(|| corrupt(name, p, "truncated entry header"))?;
        let payload = section.get(to_usize(p + header_size)..to_usize(next)).unwrap_or(&[]);
        if raw.kind == KIND_CONCAT {
            expand_concat(header, &raw, p, place, out, warnings)?;
        } else {
            check_ext_descriptor(header, &raw, header_size).map_err(|problem| corrupt(name, p, problem))?;
            let identifier = read_identifier(header, &raw, header_size).map_err(|problem| corrupt(name, p, problem))?;
            let entry = make_entry(&raw, identifier, p, false, None, place, warnings);
            if entry.kind == CudaCodeKind::Cubin && entry.compression.is_none() && raw.compressed_size == 0 {
                cross_check_cubin(payload, raw.arch, p, place, warnings);
            }
            out.push(entry);
        }
        p = next;
    }
    Ok(())
}

/// Checks that the kind-specific `{off, size}` descriptor at `ext_offset`, and the bytes it
/// points at, lie within the first `limit` bytes of the header.
fn check_ext_descriptor(header: &[u8], raw: &RawEntry, limit: u64) -> Result<(), String> {
    if raw.ext_offset == 0 {
        return Ok(());
    }
    let ext = u64::from(raw.ext_offset);
    if ext.checked_add(8).is_none_or(|e| e > limit) {
        return Err(format!("extension descriptor at {ext:#x} lies outside the {limit:#x}-byte header"));
    }
    let (Some(data_off), Some(data_size)) = (le_u32(header, to_usize(ext)), le_u32(header, to_usize(ext + 4))) else {
        return Err("truncated extension descriptor".into());
    };
    if u64::from(data_off) + u64::from(data_size) > limit {
        return Err(format!(
            "extension data {data_off:#x} + {data_size:#x} lies outside the {limit:#x}-byte header"
        ));
    }
    Ok(())
}

/// Reads the identifier string, which must lie within the first `limit` header bytes.
fn read_identifier(header: &[u8], raw: &RawEntry, limit: u64) -> Result<Option<String>, String> {
    if raw.ident_offset == 0 {
        return Ok(None);
    }
    let start = u64::from(raw.ident_offset);
    let end = start + u64::from(raw.ident_size);
    if end > limit {
        return Err(format!(
            "identifier {start:#x} + {:#x} lies outside the {limit:#x}-byte header",
            raw.ident_size
        ));
    }
    let bytes = header
        .get(to_usize(start)..to_usize(end))
        .ok_or_else(|| "truncated identifier".to_owned())?;
    let bytes = bytes.split(|&b| b == 0).next().unwrap_or(bytes);
    Ok(Some(String::from_utf8_lossy(bytes).trim_end().to_owned()))
}

/// The length of a concat sub-header, which is not stored: the §1.3 rule
/// `align8(max(0x40, ident_off+ident_size+1, ext_offset+8, ext_data_off+ext_data_size+1))`.
///
/// `sub` is the rest of the concat table from the sub-header's start.
fn sub_header_len(sub: &[u8], raw: &RawEntry) -> Result<u64, String> {
    let mut len = ENTRY_HEADER_LEN;
    if raw.ident_offset != 0 {
        len = len.max(u64::from(raw.ident_offset) + u64::from(raw.ident_size) + 1);
    }
    if raw.ext_offset != 0 {
        let ext = u64::from(raw.ext_offset);
        len = len.max(ext + 8);
        let (Some(data_off), Some(data_size)) = (le_u32(sub, to_usize(ext)), le_u32(sub, to_usize(ext + 4))) else {
            return Err(format!("sub-entry extension descriptor at {ext:#x} lies outside the concat table"));
        };
        len = len.max(u64::from(data_off) + u64::from(data_size) + 1);
    }
    align8(len).ok_or_else(|| "sub-entry header length overflows".to_owned())
}

/// Reports the sub-entries of a concatenated entry (kind 0x100, binary-formats.md §1.10).
///
/// `header` is the whole top-level header (`header_size` bytes) at section offset `at`.
fn expand_concat(
    header: &[u8],
    raw: &RawEntry,
    at: u64,
    place: &Place<'_>,
    out: &mut Vec<CudaCodeEntry>,
    warnings: &mut Vec<String>,
) -> Result<(), InspectError> {
    let name = place.section;
    let limit = header.len() as u64;
    let bad = |problem: String| corrupt(name, at, problem);
    warn_entry_fields(raw, at, place, warnings);
    if raw.ext_offset == 0 {
        return Err(bad("concatenated entry without a sub-entry table".into()));
    }
    let table = u64::from(raw.ext_offset);
    if table + 8 > limit {
        return Err(bad(format!("concat table at {table:#x} lies outside the {limit:#x}-byte header")));
    }
    let (Some(count), Some(table_size)) = (le_u32(header, to_usize(table)), le_u32(header, to_usize(table + 4))) else {
        return Err(bad("truncated concat table".into()));
    };
    if count > MAX_CONCAT {
        return Err(bad(format!("concat count {count} exceeds the cap of {MAX_CONCAT}")));
    }
    let table_end = table + u64::from(table_size);
    if u64::from(table_size) < 8 || table_end > limit {
        return Err(bad(format!(
            "concat table {table:#x} + {table_size:#x} does not fit the {limit:#x}-byte header"
        )));
    }
    // In bounds: table_end <= limit == header.len().
    let table_bytes = header.get(..to_usize(table_end)).unwrap_or(&[]);
    let compression = compression_of(raw.flags);
    let blob_len = if compression.is_some() {
        raw.uncompressed_size
    } else {
        raw.payload_size
    };
    let mut q = table + 8;
    for i in 0..count {
        let sub_at = at + q;
        let sub = table_bytes.get(to_usize(q)..).unwrap_or(&[]);
        let sub_raw = RawEntry::read(sub)
            .ok_or_else(|| corrupt(name, sub_at, format!("concat sub-entry {i} of {count} overruns the concat table")))?;
        let sub_len = sub_header_len(sub, &sub_raw).map_err(|p| corrupt(name, sub_at, p))?;
        if q.checked_add(sub_len).is_none_or(|e| e > table_end) {
            return Err(corrupt(
                name,
                sub_at,
                format!("concat sub-entry {i} of {sub_len:#x} bytes overruns the concat table"),
            ));
        }
        let sub_header = sub.get(..to_usize(sub_len)).unwrap_or(sub);
        let identifier = read_identifier(sub_header, &sub_raw, sub_len).map_err(|p| corrupt(name, sub_at, p))?;
        let image_end = u64::from(sub_raw.header_size).checked_add(sub_raw.payload_size);
        if image_end.is_none_or(|e| e > blob_len) {
            warnings.push(format!(
                "{name} container {} concat sub-entry at {sub_at:#x}: image {:#x} + {:#x} lies outside \
                 the {blob_len:#x}-byte blob",
                place.container, sub_raw.header_size, sub_raw.payload_size
            ));
        }
        let mut entry = make_entry(&sub_raw, identifier, sub_at, true, compression, place, warnings);
        if sub_raw.kind == KIND_CONCAT {
            warnings.push(format!(
                "{name} container {} at {sub_at:#x}: nested concatenated entry not supported; skipped",
                place.container
            ));
            entry.kind = CudaCodeKind::Unknown(KIND_CONCAT);
            entry.arch = None;
        }
        out.push(entry);
        q += sub_len;
    }
    if q != table_end {
        return Err(bad(format!(
            "concat sub-entries end at {q:#x}, but the table ends at {table_end:#x}"
        )));
    }
    Ok(())
}

fn compression_of(flags: u64) -> Option<&'static str> {
    if flags & FLAG_COMPRESS_ZSTD != 0 {
        Some("zstd")
    } else if flags & FLAG_COMPRESS_LZ4 != 0 {
        Some("lz4")
    } else if flags & FLAG_COMPRESS_LEGACY != 0 {
        Some("legacy")
    } else {
        None
    }
}

/// Warns about an entry version other than 0x0101, unknown flag bits and several
/// compression bits at once.
fn warn_entry_fields(raw: &RawEntry, at: u64, place: &Place<'_>, warnings: &mut Vec<String>) {
    let here = format!("{} container {} entry at {at:#x}", place.section, place.container);
    if raw.version != ENTRY_VERSION {
        warnings.push(format!("{here}: unknown entry version {:#06x}", raw.version));
    }
    let unknown = raw.flags & !KNOWN_FLAGS;
    if unknown != 0 {
        warnings.push(format!("{here}: unknown flag bits {unknown:#x}"));
    }
    let compressions = raw.flags & (FLAG_COMPRESS_ZSTD | FLAG_COMPRESS_LZ4 | FLAG_COMPRESS_LEGACY);
    if compressions.count_ones() > 1 {
        warnings.push(format!("{here}: several compression flags {compressions:#x}"));
    }
}

/// Builds the reported entry from a header (or concat sub-header).
fn make_entry(
    raw: &RawEntry,
    identifier: Option<String>,
    at: u64,
    concat: bool,
    inherited_compression: Option<&'static str>,
    place: &Place<'_>,
    warnings: &mut Vec<String>,
) -> CudaCodeEntry {
    warn_entry_fields(raw, at, place, warnings);
    let here = format!("{} container {} entry at {at:#x}", place.section, place.container);
    let kind = match raw.kind {
        KIND_ELF => CudaCodeKind::Cubin,
        KIND_PTX => CudaCodeKind::Ptx,
        KIND_NVVM => CudaCodeKind::Nvvm,
        other => {
            if other != KIND_CONCAT {
                warnings.push(format!("{here}: unknown(kind={other:#x}, arch={}); skipped", raw.arch));
            }
            CudaCodeKind::Unknown(other)
        }
    };
    let arch = match kind {
        CudaCodeKind::Unknown(_) => None,
        _ => decode_arch(raw, kind == CudaCodeKind::Ptx, &here, warnings),
    };
    CudaCodeEntry {
        kind,
        arch,
        code_version: (raw.code_version_major, raw.code_version_minor),
        compression: compression_of(raw.flags).or(inherited_compression),
        relocatable: place.relocatable,
        container: place.container,
        offset: at,
        flags: raw.flags,
        concat,
        identifier,
    }
}

/// `arch` plus the `a`/`f` flags (binary-formats.md §1.7).
fn decode_arch(raw: &RawEntry, ptx: bool, here: &str, warnings: &mut Vec<String>) -> Option<CudaArch> {
    if raw.arch == 0 {
        return None;
    }
    if !(10..=999).contains(&raw.arch) {
        warnings.push(format!("{here}: architecture {} out of range; not reported", raw.arch));
        return None;
    }
    let a = raw.flags & FLAG_ARCH_SPECIFIC != 0;
    let f = raw.flags & FLAG_FAMILY != 0;
    if a && f {
        warnings.push(format!(
            "{here}: both the arch-specific and the family flag are set; reading it as arch-specific"
        ));
    }
    let set = if a {
        CudaFeatureSet::ArchSpecific
    } else if f {
        CudaFeatureSet::Family
    } else {
        CudaFeatureSet::Baseline
    };
    Some(CudaArch {
        major: raw.arch / 10,
        minor: raw.arch % 10,
        set,
        ptx,
    })
}

/// Compares an uncompressed cubin's own SM with the entry's `arch` (checklist §3.10).
fn cross_check_cubin(payload: &[u8], arch: u32, at: u64, place: &Place<'_>, warnings: &mut Vec<String>) {
    let here = format!("{} container {} entry at {at:#x}", place.section, place.container);
    if payload.get(..4) != Some(&elf::ELFMAG[..]) {
        warnings.push(format!("{here}: uncompressed cubin payload is not an ELF image"));
        return;
    }
    if payload.get(EI_CLASS) != Some(&elf::ELFCLASS64) || payload.get(EI_DATA) != Some(&elf::ELFDATA2LSB) {
        warnings.push(format!("{here}: cubin is not a 64-bit little-endian ELF image"));
        return;
    }
    let (Some(machine), Some(&abi_version), Some(e_flags)) = (le_u16(payload, 0x12), payload.get(EI_ABIVERSION), le_u32(payload, 0x30))
    else {
        warnings.push(format!("{here}: truncated cubin ELF header"));
        return;
    };
    if machine != EM_CUDA {
        warnings.push(format!("{here}: cubin e_machine is {machine}, not EM_CUDA (190)"));
        return;
    }
    let sm = if abi_version >= 8 { (e_flags >> 8) & 0xFF } else { e_flags & 0xFF };
    if sm != arch {
        warnings.push(format!(
            "{here}: cubin ELF header says sm_{sm} (e_flags {e_flags:#010x}), the entry says {arch}"
        ));
    }
}

#[cfg(test)]
pub(super) mod tests;
