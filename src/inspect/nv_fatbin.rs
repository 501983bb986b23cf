//! The NVIDIA fat binary containers of `.nv_fatbin` and `__nv_relfatbin`
//! (binary-formats.md §1): containers, entries, concatenated entries, the architecture of
//! each entry, and a cross-check against an uncompressed cubin's own ELF header.
//!
//! The file runs past 1,000 lines because of its tests: the parser is about 600 lines,
//! and the tests (a synthetic fatbin builder, one test per malformation the checklist of
//! binary-formats.md §3 names, and a fuzz loop) about 450. Splitting either would separate
//! the builder from the layout it mirrors.

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
pub(super) mod tests {
    use super::*;
    use crate::inspect::LibraryInfo;
    use crate::inspect::elf::tests::elf_with_fatbin;
    use crate::inspect::inspect_library;
    use crate::inspect::tests::{XorShift, mutate};

    pub(crate) fn arch(s: &str) -> CudaArch {
        s.parse().expect("valid arch token")
    }

    /// One entry for the synthetic builder.
    #[derive(Clone)]
    pub(crate) struct E {
        kind: u16,
        arch: u32,
        flags: u64,
        code_version: (u16, u16),
        /// Extra header tail after the 64 base bytes (ext descriptor, concat table, ...).
        tail: Vec<u8>,
        ext_offset: u32,
        payload: Vec<u8>,
        compressed_size: u32,
        uncompressed_size: u64,
    }

    impl E {
        fn new(kind: u16, arch: u32, flags: u64) -> E {
            E {
                kind,
                arch,
                flags,
                code_version: if kind == KIND_PTX { (9, 5) } else { (1, 8) },
                tail: Vec::new(),
                ext_offset: 0,
                payload: vec![0xAB; 16],
                compressed_size: 0,
                uncompressed_size: 0,
            }
        }

        pub(crate) fn cubin(arch: u32, flags: u64) -> E {
            let mut e = E::new(KIND_ELF, arch, 0x11 | flags);
            e.payload = fake_cubin(arch);
            e
        }

        /// A zstd PTX entry with an empty options descriptor, as nvcc 13.5 writes it.
        fn zstd_ptx(arch: u32, flags: u64) -> E {
            let mut e = E::new(KIND_PTX, arch, 0x11 | FLAG_COMPRESS_ZSTD | flags);
            e.ext_offset = 0x40;
            e.tail = [0x48u32.to_le_bytes(), 0u32.to_le_bytes()].concat();
            e.tail.extend_from_slice(&[0; 8]);
            e.payload = vec![0x28, 0xB5, 0x2F, 0xFD, 1, 2, 3, 4, 5, 6, 7, 0, 0, 0, 0, 0];
            e.compressed_size = 11;
            e.uncompressed_size = 100;
            e
        }

        fn header(&self, header_size: u32, payload_size: u64) -> Vec<u8> {
            let mut h = Vec::with_capacity(64);
            h.extend_from_slice(&self.kind.to_le_bytes());
            h.extend_from_slice(&ENTRY_VERSION.to_le_bytes());
            h.extend_from_slice(&header_size.to_le_bytes());
            h.extend_from_slice(&payload_size.to_le_bytes());
            h.extend_from_slice(&self.compressed_size.to_le_bytes());
            h.extend_from_slice(&self.ext_offset.to_le_bytes());
            h.extend_from_slice(&self.code_version.1.to_le_bytes());
            h.extend_from_slice(&self.code_version.0.to_le_bytes());
            h.extend_from_slice(&self.arch.to_le_bytes());
            h.extend_from_slice(&0u32.to_le_bytes()); // ident offset
            h.extend_from_slice(&0u32.to_le_bytes()); // ident size
            h.extend_from_slice(&self.flags.to_le_bytes());
            h.extend_from_slice(&0u64.to_le_bytes()); // reserved
            h.extend_from_slice(&self.uncompressed_size.to_le_bytes());
            assert_eq!(h.len(), 64);
            h
        }

        fn bytes(&self) -> Vec<u8> {
            let header_size = 64 + self.tail.len() as u32;
            let mut payload = self.payload.clone();
            payload.resize(payload.len().div_ceil(8) * 8, 0);
            let mut b = self.header(header_size, payload.len() as u64);
            b.extend_from_slice(&self.tail);
            b.extend_from_slice(&payload);
            b
        }

        /// A concat sub-header: +4 image offset, +8 image size, and the same tail.
        fn sub_bytes(&self, image_offset: u32, image_size: u64) -> Vec<u8> {
            let mut b = self.header(image_offset, image_size);
            b.extend_from_slice(&self.tail);
            b
        }
    }

    /// A concat entry (kind 0x100, zstd) holding `subs` as sub-headers.
    fn concat(subs: &[E]) -> E {
        let mut table = Vec::new();
        let mut image = 0u32;
        for s in subs {
            table.extend(s.sub_bytes(image, 0x100));
            image += 0x100;
        }
        let mut e = E::new(KIND_CONCAT, 0, 0x8011);
        e.code_version = (0, 1);
        e.ext_offset = 0x40;
        e.tail = [(subs.len() as u32).to_le_bytes(), (8 + table.len() as u32).to_le_bytes()].concat();
        e.tail.extend(table);
        e.payload = vec![0x28, 0xB5, 0x2F, 0xFD, 9, 9, 9, 9];
        e.compressed_size = 8;
        e.uncompressed_size = u64::from(image);
        e
    }

    /// A 64-byte ELF header of a CUDA 13 cubin for `sm` (ABI version 8).
    fn fake_cubin(sm: u32) -> Vec<u8> {
        let mut c = vec![0u8; 64];
        c[..4].copy_from_slice(&elf::ELFMAG);
        c[4] = elf::ELFCLASS64;
        c[5] = elf::ELFDATA2LSB;
        c[6] = 1;
        c[7] = 0x41;
        c[8] = 8;
        c[0x10..0x12].copy_from_slice(&2u16.to_le_bytes());
        c[0x12..0x14].copy_from_slice(&EM_CUDA.to_le_bytes());
        let flags = 0x0600_0004 | (sm << 8);
        c[0x30..0x34].copy_from_slice(&flags.to_le_bytes());
        c
    }

    pub(crate) fn container(entries: &[E]) -> Vec<u8> {
        let body: Vec<u8> = entries.iter().flat_map(E::bytes).collect();
        let mut c = Vec::new();
        c.extend_from_slice(&FATBIN_MAGIC.to_le_bytes());
        c.extend_from_slice(&1u16.to_le_bytes());
        c.extend_from_slice(&16u16.to_le_bytes());
        c.extend_from_slice(&(body.len() as u64).to_le_bytes());
        c.extend(body);
        c
    }

    fn parse(section: &[u8]) -> Result<(Vec<CudaCodeEntry>, Vec<String>), InspectError> {
        let mut out = Vec::new();
        let mut warnings = Vec::new();
        parse_nv_fatbin(section, false, &mut out, &mut warnings)?;
        Ok((out, warnings))
    }

    fn archs(entries: &[CudaCodeEntry]) -> Vec<String> {
        entries
            .iter()
            .map(|e| e.arch.map_or_else(|| format!("{}", e.kind), |a| a.to_string()))
            .collect()
    }

    fn info_of(entries: Vec<CudaCodeEntry>) -> LibraryInfo {
        LibraryInfo {
            cuda: entries,
            ..LibraryInfo::default()
        }
    }

    fn expect_corrupt(section: &[u8], needle: &str) {
        match parse(section) {
            Err(InspectError::Corrupt { problem, .. }) => {
                assert!(problem.contains(needle), "problem `{problem}` should mention `{needle}`")
            }
            other => panic!("expected a Corrupt error mentioning `{needle}`, got {other:?}"),
        }
    }

    pub(crate) fn liba_container() -> Vec<u8> {
        container(&[E::cubin(80, 0), E::cubin(90, FLAG_ARCH_SPECIFIC), E::zstd_ptx(90, 0)])
    }

    #[test]
    fn reads_cubins_and_compressed_ptx() {
        let (entries, warnings) = parse(&liba_container()).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(archs(&entries), ["sm_80", "sm_90a", "compute_90"]);
        assert_eq!(entries[2].kind, CudaCodeKind::Ptx);
        assert_eq!(entries[2].code_version, (9, 5));
        assert_eq!(entries[2].compression, Some("zstd"));
        assert_eq!(entries[0].compression, None);
        assert!(entries.iter().all(|e| e.container == 0 && !e.relocatable && !e.concat));
        assert_eq!(entries[0].offset, 16);
        let info = info_of(entries);
        assert_eq!(info.cuda_code(), [arch("sm_80"), arch("sm_90a"), arch("compute_90")]);
    }

    #[test]
    fn dedups_across_containers_and_excludes_relocatable_and_nvvm() {
        // A dlink container then a per-TU container, as every nvcc -shared link has.
        let mut section = container(&[E::cubin(80, 0), E::cubin(90, FLAG_ARCH_SPECIFIC)]);
        section.extend(liba_container());
        let (mut entries, _) = parse(&section).unwrap();
        assert_eq!(entries.len(), 5);
        assert_eq!(entries[4].container, 1);
        let mut warnings = Vec::new();
        let rel = container(&[E::cubin(75, 0), E::new(KIND_NVVM, 86, 0x18011)]);
        parse_nv_fatbin(&rel, true, &mut entries, &mut warnings).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert!(entries[5].relocatable && entries[6].relocatable);
        assert_eq!(entries[6].kind, CudaCodeKind::Nvvm);
        let info = info_of(entries);
        assert_eq!(info.cuda_code(), [arch("sm_80"), arch("sm_90a"), arch("compute_90")]);
    }

    #[test]
    fn family_flag_gives_f_suffix() {
        let (entries, _) = parse(&container(&[
            E::cubin(100, FLAG_FAMILY),
            E::zstd_ptx(100, FLAG_FAMILY),
            E::cubin(120, FLAG_ARCH_SPECIFIC),
        ]))
        .unwrap();
        assert_eq!(archs(&entries), ["sm_100f", "compute_100f", "sm_120a"]);
        assert_eq!(entries[0].arch.unwrap().set, CudaFeatureSet::Family);
    }

    #[test]
    fn concat_entries_are_expanded() {
        let section = container(&[
            E::cubin(100, FLAG_FAMILY),
            concat(&[E::zstd_ptx(90, 0), E::zstd_ptx(120, 0)]),
            concat(&[E::cubin(80, 0), E::cubin(90, FLAG_ARCH_SPECIFIC)]),
        ]);
        let (entries, warnings) = parse(&section).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(archs(&entries), ["sm_100f", "compute_90", "compute_120", "sm_80", "sm_90a"]);
        assert!(!entries[0].concat && entries[1..].iter().all(|e| e.concat));
        assert!(entries[1..].iter().all(|e| e.compression == Some("zstd")));
        assert_eq!(entries[1].code_version, (9, 5));
        assert_eq!(
            info_of(entries).cuda_code(),
            [
                arch("sm_80"),
                arch("sm_90a"),
                arch("sm_100f"),
                arch("compute_90"),
                arch("compute_120")
            ]
        );
    }

    #[test]
    fn concat_table_must_tile_and_count_is_capped() {
        let mut bad = concat(&[E::cubin(80, 0)]);
        bad.tail[4..8].copy_from_slice(&(8u32 + 0x40 + 8).to_le_bytes());
        bad.tail.extend_from_slice(&[0; 8]);
        expect_corrupt(&container(&[bad]), "table ends");

        let mut huge = concat(&[E::cubin(80, 0)]);
        huge.tail[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        expect_corrupt(&container(&[huge]), "exceeds the cap");

        let mut short = concat(&[E::cubin(80, 0)]);
        short.tail[..4].copy_from_slice(&2u32.to_le_bytes());
        expect_corrupt(&container(&[short]), "overruns the concat table");

        let mut no_table = concat(&[]);
        no_table.ext_offset = 0;
        expect_corrupt(&container(&[no_table]), "without a sub-entry table");
    }

    #[test]
    fn truncated_container_is_corrupt() {
        let c = liba_container();
        expect_corrupt(&c[..10], "truncated container header");
        expect_corrupt(&c[..c.len() - 8], "overruns the section");
    }

    #[test]
    fn small_entry_header_is_corrupt() {
        let mut c = liba_container();
        c[16 + 4..16 + 8].copy_from_slice(&0x38u32.to_le_bytes());
        expect_corrupt(&c, "less than 0x40");
        let mut c = liba_container();
        c[6..8].copy_from_slice(&8u16.to_le_bytes());
        expect_corrupt(&c, "less than 16");
    }

    #[test]
    fn overrunning_payload_is_corrupt() {
        let mut c = liba_container();
        c[16 + 8..16 + 16].copy_from_slice(&0x10_0000u64.to_le_bytes());
        expect_corrupt(&c, "overruns container");
        let mut c = liba_container();
        c[16 + 8..16 + 16].copy_from_slice(&u64::MAX.to_le_bytes());
        expect_corrupt(&c, "overruns container");
        let mut c = liba_container();
        c[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        expect_corrupt(&c, "overruns the section");
        let mut c = liba_container();
        c[16 + 0x10..16 + 0x14].copy_from_slice(&0x1000u32.to_le_bytes());
        expect_corrupt(&c, "exceeds payload size");
    }

    #[test]
    fn non_tiling_walk_is_corrupt() {
        // Container claims 8 more bytes than its entries use.
        let mut c = liba_container();
        let fat = le_u64(&c, 8).unwrap() + 8;
        c[8..16].copy_from_slice(&fat.to_le_bytes());
        c.extend_from_slice(&[0; 8]);
        expect_corrupt(&c, "do not tile");
    }

    #[test]
    fn header_offsets_must_stay_in_the_header() {
        let mut e = E::zstd_ptx(90, 0);
        e.ext_offset = 0x50;
        expect_corrupt(&container(&[e]), "extension descriptor");
        let mut e = E::zstd_ptx(90, 0);
        e.tail[4..8].copy_from_slice(&0x100u32.to_le_bytes());
        expect_corrupt(&container(&[e]), "extension data");
        let mut c = container(&[E::cubin(80, 0)]);
        c[16 + 0x20..16 + 0x24].copy_from_slice(&0x40u32.to_le_bytes());
        c[16 + 0x24..16 + 0x28].copy_from_slice(&0x20u32.to_le_bytes());
        expect_corrupt(&c, "identifier");
    }

    #[test]
    fn identifier_is_read() {
        let mut e = E::cubin(80, 0);
        e.tail = b"k.cu \0\0\0".to_vec();
        let mut c = container(&[e]);
        c[16 + 0x20..16 + 0x24].copy_from_slice(&0x40u32.to_le_bytes());
        c[16 + 0x24..16 + 0x28].copy_from_slice(&5u32.to_le_bytes());
        let (entries, _) = parse(&c).unwrap();
        assert_eq!(entries[0].identifier.as_deref(), Some("k.cu"));
    }

    #[test]
    fn zero_padding_between_containers_is_skipped() {
        let mut section = container(&[E::cubin(80, 0)]);
        section.extend_from_slice(&[0; 24]);
        section.extend(liba_container());
        section.extend_from_slice(&[0; 8]);
        let (entries, warnings) = parse(&section).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(archs(&entries), ["sm_80", "sm_80", "sm_90a", "compute_90"]);
        assert_eq!(entries[3].container, 1);

        // Garbage instead of padding is not.
        let mut section = container(&[E::cubin(80, 0)]);
        section.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]);
        expect_corrupt(&section, "magic");
        // So is an empty or all-zero section.
        assert!(parse(&[]).unwrap().0.is_empty());
        assert!(parse(&[0; 64]).unwrap().0.is_empty());
    }

    #[test]
    fn unknown_kind_is_warned_and_skipped() {
        let (entries, warnings) = parse(&container(&[
            E::cubin(80, 0),
            E::new(0x4, 80, 0x11),
            E::new(0x40, 0, 0x11),
            E::zstd_ptx(90, 0),
        ]))
        .unwrap();
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[1].kind, CudaCodeKind::Unknown(4));
        assert_eq!(entries[2].kind, CudaCodeKind::Unknown(0x40));
        assert!(entries[1].arch.is_none());
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("unknown(kind=0x4, arch=80)"), "{warnings:?}");
        assert_eq!(info_of(entries).cuda_code(), [arch("sm_80"), arch("compute_90")]);
    }

    #[test]
    fn unknown_flags_versions_and_mismatches_are_warned() {
        let mut odd = E::cubin(80, 0x4000_0000);
        odd.payload = fake_cubin(86);
        let mut c = container(&[odd, E::cubin(90, 0)]);
        let second = 16 + 64 + 64;
        c[second + 2..second + 4].copy_from_slice(&0x0202u16.to_le_bytes());
        let (entries, warnings) = parse(&c).unwrap();
        assert_eq!(entries.len(), 2);
        let all = warnings.join("\n");
        assert!(all.contains("unknown flag bits 0x40000000"), "{all}");
        assert!(all.contains("says sm_86"), "{all}");
        assert!(all.contains("unknown entry version 0x0202"), "{all}");
    }

    #[test]
    fn other_container_version_stops_the_section() {
        let mut section = liba_container();
        let mut second = container(&[E::cubin(75, 0)]);
        second[4..6].copy_from_slice(&2u16.to_le_bytes());
        section.extend(second);
        let (entries, warnings) = parse(&section).unwrap();
        assert_eq!(entries.len(), 3);
        assert!(warnings[0].contains("unknown container version 2"), "{warnings:?}");
    }

    #[test]
    fn huge_counts_are_bounded() {
        // 70,000 minimal entries in one container: over the entry cap.
        let mut e = E::new(0x77, 0, 0);
        e.payload.clear();
        let one = e.bytes();
        let mut body = Vec::new();
        for _ in 0..(MAX_ENTRIES + 1) {
            body.extend_from_slice(&one);
        }
        let mut c = Vec::new();
        c.extend_from_slice(&FATBIN_MAGIC.to_le_bytes());
        c.extend_from_slice(&1u16.to_le_bytes());
        c.extend_from_slice(&16u16.to_le_bytes());
        c.extend_from_slice(&(body.len() as u64).to_le_bytes());
        c.extend(body);
        expect_corrupt(&c, "more than");
    }

    #[test]
    fn fuzzed_inputs_never_panic() {
        let section = {
            let mut s = container(&[E::cubin(80, 0), E::cubin(90, FLAG_ARCH_SPECIFIC)]);
            s.extend(container(&[
                E::cubin(100, FLAG_FAMILY),
                concat(&[E::zstd_ptx(90, 0), E::cubin(80, 0)]),
                E::zstd_ptx(120, FLAG_ARCH_SPECIFIC),
            ]));
            s
        };
        let library = elf_with_fatbin(&section, Some(&liba_container()));
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let mut outcomes = [0usize; 2];
        for i in 0..20_000 {
            let m = mutate(&mut rng, &section);
            let mut out = Vec::new();
            let mut warnings = Vec::new();
            outcomes[usize::from(parse_nv_fatbin(&m, i % 2 == 0, &mut out, &mut warnings).is_ok())] += 1;
            let m = mutate(&mut rng, &library);
            let _ = inspect_library(&m);
        }
        // Both outcomes happen: the mutations reach past the first check.
        assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
    }
}
