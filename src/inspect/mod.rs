//! Reading a shared library's own facts from its bytes: CPU machine, exported and needed
//! symbols and libraries, glibc floor, musl, and the GPU device code it embeds (CUDA
//! cubins and PTX, AMD code objects).
//!
//! Nothing here runs or loads the library. The CUDA part walks the fat binary containers
//! in `.nv_fatbin` and `__nv_relfatbin` as laid out in `shared/reference/binary-formats.md`
//! §1, following the parser checklist of §3: every offset is bounds-checked with checked
//! arithmetic, loop counts are capped, entries must tile their container exactly, and
//! unknown kinds, flags and versions become warnings rather than failures. No input makes
//! this module panic.
//!
//! The architecture of each CUDA entry comes from the fatbin entry header (`arch` plus the
//! `a`/`f` flags), never from the cubin inside it: CUDA 13 cubins do not record `f` and
//! no longer record `a` in their ELF header (binary-formats.md §1.11). The cubin's SM is
//! only used as a cross-check, whose mismatches are warnings. Nothing CUDA is decompressed.
//!
//! The AMD part walks the clang offload bundles of `.hip_fatbin` (binary-formats.md §2):
//! plain `__CLANG_OFFLOAD_BUNDLE__` bundles and compressed `CCOB` bundles (versions 1 to 3,
//! zlib or zstd). Compressed bundles hide their entry ids, so they are decompressed, in
//! memory, with the output capped at the size the header declares (and at
//! [`MAX_HIP_DECOMPRESSED`]), which defuses decompression bombs. Each device entry's target
//! id is read from its bundle id and cross-checked against the code object's own ELF
//! header (`e_flags`: processor, xnack, sramecc, generic version); mismatches are warnings.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use object::LittleEndian;
use object::elf;
use object::read::elf::{Dyn as _, FileHeader as _, ProgramHeader as _, SectionHeader as _, Sym as _};

use crate::platform::{AmdTarget, CudaArch, CudaFeatureSet, FeatureState, MajorMinor};

/// The largest file [`inspect_file`] reads: 2 GiB.
pub const MAX_FILE_SIZE: u64 = 2 << 30;

/// The ELF section holding loadable fat binary containers.
pub const NV_FATBIN_SECTION: &str = ".nv_fatbin";
/// The ELF section holding the relocatable containers of `-rdc` builds.
pub const NV_RELFATBIN_SECTION: &str = "__nv_relfatbin";
/// The ELF section holding HIP offload bundles, one per translation unit (or per link
/// with `-fgpu-rdc`).
pub const HIP_FATBIN_SECTION: &str = ".hip_fatbin";
/// The most bytes one compressed offload bundle may expand to, whatever its header says:
/// 1 GiB.
pub const MAX_HIP_DECOMPRESSED: u64 = 1 << 30;

/// Most containers read from one section.
const MAX_CONTAINERS: usize = 1 << 16;
/// Most entries read from one container.
const MAX_ENTRIES: usize = 1 << 16;
/// Most sub-entries in one concatenated entry (checklist §3.4).
const MAX_CONCAT: u32 = 1024;
/// Most `DT_NEEDED`, version-need and version-aux records read.
const MAX_DYNAMIC_RECORDS: usize = 1 << 16;

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

const EM_CUDA: u16 = 190;
/// Byte offsets in `e_ident`.
const EI_CLASS: usize = 4;
const EI_DATA: usize = 5;
const EI_ABIVERSION: usize = 8;

/// Why a library could not be inspected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InspectError {
    /// The bytes do not start with the ELF magic.
    #[error("not an ELF file")]
    NotElf,
    /// An ELF file of a kind khub does not read (32-bit, big-endian, too large).
    #[error("unsupported binary: {0}")]
    Unsupported(String),
    /// A structure is malformed: truncated, overrunning, or not tiling its container.
    #[error("corrupt {section} at offset {offset:#x}: {problem}")]
    Corrupt {
        /// The ELF section (or "ELF header", "dynamic symbols", ...) being read.
        section: String,
        /// The byte offset of the bad structure, within the section for fatbin sections
        /// and within the file otherwise.
        offset: u64,
        /// What is wrong, for a person.
        problem: String,
    },
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn corrupt(section: &str, offset: u64, problem: impl Into<String>) -> InspectError {
    InspectError::Corrupt {
        section: section.to_owned(),
        offset,
        problem: problem.into(),
    }
}

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

/// What a shared library is, needs and embeds, read from its bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LibraryInfo {
    /// The CPU: `"x86_64"`, `"aarch64"`, or `"elf machine N"` for any other `e_machine`.
    pub machine: String,
    /// Dynamic symbols the library defines and exports (global or weak binding, default or
    /// protected visibility), sorted and deduplicated.
    pub exports: Vec<String>,
    /// The `DT_NEEDED` libraries, in file order.
    pub needed: Vec<String>,
    /// The highest `GLIBC_x.y` version required in `.gnu.version_r`; `None` if none.
    pub glibc_floor: Option<MajorMinor>,
    /// True if a `DT_NEEDED` entry is a musl libc (`libc.musl-*`, `ld-musl-*`) or the
    /// `PT_INTERP` interpreter names musl.
    pub musl: bool,
    /// Every entry of `.nv_fatbin` and `__nv_relfatbin`, in file order.
    pub cuda: Vec<CudaCodeEntry>,
    /// Every entry of every offload bundle in `.hip_fatbin`, host entries included, in
    /// file order.
    pub hip: Vec<HipCodeObject>,
    /// Unknown kinds, flags and versions, and cross-check mismatches, for a person.
    pub warnings: Vec<String>,
}

impl LibraryInfo {
    /// The distinct device code the library can load: cubins and PTX from `.nv_fatbin`
    /// only (not `__nv_relfatbin`, not NVVM, not unknown kinds), deduplicated, with cubins
    /// first and PTX after, each ordered by compute capability then feature set.
    pub fn cuda_code(&self) -> Vec<CudaArch> {
        let mut code: Vec<CudaArch> = self
            .cuda
            .iter()
            .filter(|e| !e.relocatable && matches!(e.kind, CudaCodeKind::Cubin | CudaCodeKind::Ptx))
            .filter_map(|e| e.arch)
            .collect();
        code.sort_by_key(|a| (a.ptx, a.major, a.minor, a.set));
        code.dedup();
        code
    }

    /// The distinct AMD targets the library carries code objects for: the target ids of
    /// every HIP (`hip`, `hipv4`) and OpenMP bundle entry, with the generic version taken
    /// from the code object's `e_flags`; host entries, entries of an unknown offload kind
    /// and ids that do not parse are left out. Sorted and deduplicated.
    pub fn hip_targets(&self) -> Vec<AmdTarget> {
        let mut targets: Vec<AmdTarget> = self.hip.iter().filter(|o| o.is_device()).filter_map(|o| o.target.clone()).collect();
        targets.sort();
        targets.dedup();
        targets
    }
}

/// Reads `path` (at most [`MAX_FILE_SIZE`] bytes) and inspects it with [`inspect_library`].
pub fn inspect_file(path: &Path) -> Result<LibraryInfo, InspectError> {
    let io_err = |source| InspectError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io_err)?;
    let too_large = || InspectError::Unsupported(format!("{} is larger than 2 GiB", path.display()));
    if file.metadata().map_err(io_err)?.len() > MAX_FILE_SIZE {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    // One byte past the limit tells a file that grew (or a special file) from one that fits.
    file.take(MAX_FILE_SIZE + 1).read_to_end(&mut bytes).map_err(io_err)?;
    if bytes.len() as u64 > MAX_FILE_SIZE {
        return Err(too_large());
    }
    inspect_library(&bytes)
}

/// Inspects a 64-bit little-endian ELF shared library held in memory.
///
/// Fails with [`InspectError::NotElf`] for anything without the ELF magic,
/// [`InspectError::Unsupported`] for 32-bit or big-endian ELF, and
/// [`InspectError::Corrupt`] for malformed headers, tables or fatbin sections.
pub fn inspect_library(bytes: &[u8]) -> Result<LibraryInfo, InspectError> {
    if bytes.get(..4) != Some(&elf::ELFMAG[..]) {
        return Err(InspectError::NotElf);
    }
    match bytes.get(EI_CLASS) {
        Some(&elf::ELFCLASS64) => {}
        Some(&elf::ELFCLASS32) => return Err(InspectError::Unsupported("32-bit ELF".into())),
        _ => return Err(corrupt("ELF header", 0, "invalid ELF class")),
    }
    match bytes.get(EI_DATA) {
        Some(&elf::ELFDATA2LSB) => {}
        Some(&elf::ELFDATA2MSB) => return Err(InspectError::Unsupported("big-endian ELF".into())),
        _ => return Err(corrupt("ELF header", 0, "invalid ELF data encoding")),
    }
    let elf_err = |what: &str| {
        let what = what.to_owned();
        move |e: object::read::Error| corrupt(&what, 0, e.to_string())
    };
    let endian = LittleEndian;
    let header = elf::FileHeader64::<LittleEndian>::parse(bytes).map_err(elf_err("ELF header"))?;
    let mut info = LibraryInfo {
        machine: match header.e_machine(endian) {
            elf::EM_X86_64 => "x86_64".to_owned(),
            elf::EM_AARCH64 => "aarch64".to_owned(),
            m => format!("elf machine {m}"),
        },
        ..LibraryInfo::default()
    };
    let sections = header.sections(endian, bytes).map_err(elf_err("section headers"))?;
    if sections.is_empty() {
        info.warnings
            .push("no section headers: exports, needed libraries, versions and device code cannot be read".into());
    }

    // Exports.
    let dynsym = sections
        .symbols(endian, bytes, elf::SHT_DYNSYM)
        .map_err(elf_err("dynamic symbol table"))?;
    for sym in dynsym.symbols().iter().skip(1) {
        let exported_binding = matches!(sym.st_bind(), elf::STB_GLOBAL | elf::STB_WEAK);
        let exported_visibility = matches!(sym.st_visibility(), elf::STV_DEFAULT | elf::STV_PROTECTED);
        let shndx = sym.st_shndx(endian);
        // Version-definition placeholders are absolute symbols of value and size 0.
        let placeholder = shndx == elf::SHN_ABS && sym.st_value(endian) == 0 && sym.st_size(endian) == 0;
        if !exported_binding
            || !exported_visibility
            || shndx == elf::SHN_UNDEF
            || placeholder
            || matches!(sym.st_type(), elf::STT_SECTION | elf::STT_FILE)
        {
            continue;
        }
        let name = sym.name(endian, dynsym.strings()).map_err(elf_err("dynamic symbol table"))?;
        if !name.is_empty() {
            info.exports.push(String::from_utf8_lossy(name).into_owned());
        }
    }
    info.exports.sort();
    info.exports.dedup();

    // Needed libraries.
    if let Some((dynamic, link)) = sections.dynamic(endian, bytes).map_err(elf_err("dynamic section"))? {
        let strings = sections.strings(endian, bytes, link).map_err(elf_err("dynamic string table"))?;
        for d in dynamic.iter().take(MAX_DYNAMIC_RECORDS) {
            match d.tag32(endian) {
                Some(elf::DT_NULL) => break,
                Some(elf::DT_NEEDED) => {
                    let name = d.string(endian, strings).map_err(elf_err("dynamic section"))?;
                    info.needed.push(String::from_utf8_lossy(name).into_owned());
                }
                _ => {}
            }
        }
    }

    // glibc floor, from the version needs.
    if let Some((mut needs, link)) = sections.gnu_verneed(endian, bytes).map_err(elf_err("version needs"))? {
        let strings = sections
            .strings(endian, bytes, link)
            .map_err(elf_err("version needs string table"))?;
        let mut records = 0usize;
        while let Some((_, mut aux)) = needs.next().map_err(elf_err("version needs"))? {
            while let Some(vernaux) = aux.next().map_err(elf_err("version needs"))? {
                records += 1;
                if records > MAX_DYNAMIC_RECORDS {
                    return Err(corrupt("version needs", 0, "too many version records"));
                }
                let name = vernaux.name(endian, strings).map_err(elf_err("version needs"))?;
                let version = std::str::from_utf8(name)
                    .ok()
                    .and_then(|n| n.strip_prefix("GLIBC_"))
                    .and_then(|v| v.parse::<MajorMinor>().ok());
                if let Some(v) = version {
                    info.glibc_floor = info.glibc_floor.max(Some(v));
                }
            }
            records += 1;
            if records > MAX_DYNAMIC_RECORDS {
                return Err(corrupt("version needs", 0, "too many version records"));
            }
        }
    }

    // musl.
    let musl_name = |n: &str| n.starts_with("libc.musl-") || n.starts_with("ld-musl");
    info.musl = info.needed.iter().any(|n| musl_name(n));
    let program_headers = header.program_headers(endian, bytes).map_err(elf_err("program headers"))?;
    for ph in program_headers {
        match ph.interpreter(endian, bytes) {
            Ok(Some(interp)) => {
                if String::from_utf8_lossy(interp).contains("musl") {
                    info.musl = true;
                }
            }
            Ok(None) => {}
            Err(e) => info.warnings.push(format!("unreadable PT_INTERP: {e}")),
        }
    }

    // Device code: CUDA fat binaries and HIP offload bundles.
    for (_, sh) in sections.enumerate().skip(1) {
        let Ok(name) = sections.section_name(endian, sh) else {
            continue;
        };
        let section_name = match name {
            b".nv_fatbin" => NV_FATBIN_SECTION,
            b"__nv_relfatbin" => NV_RELFATBIN_SECTION,
            b".hip_fatbin" => HIP_FATBIN_SECTION,
            _ => continue,
        };
        if sh.sh_type(endian) == elf::SHT_NOBITS {
            info.warnings
                .push(format!("{section_name} has no file contents (SHT_NOBITS); skipped"));
            continue;
        }
        let data = sh
            .data(endian, bytes)
            .map_err(|e| corrupt(section_name, 0, format!("section bytes lie outside the file: {e}")))?;
        if section_name == HIP_FATBIN_SECTION {
            parse_hip_fatbin(data, &mut info.hip, &mut info.warnings)?;
        } else {
            parse_nv_fatbin(data, section_name == NV_RELFATBIN_SECTION, &mut info.cuda, &mut info.warnings)?;
        }
    }

    Ok(info)
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

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    let bytes = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes(bytes.try_into().ok()?))
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    let bytes = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    let bytes = b.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
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

/// `usize` from a `u64` known to be at most a slice length.
fn to_usize(v: u64) -> usize {
    // Every caller passes a value already checked against a slice length, which is a usize.
    usize::try_from(v).unwrap_or(usize::MAX)
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

// ---- AMD: clang offload bundles in .hip_fatbin (binary-formats.md §2) ----

const BUNDLE_MAGIC: &[u8] = b"__CLANG_OFFLOAD_BUNDLE__";
const CCOB_MAGIC: &[u8] = b"CCOB";
/// The fixed part of a plain bundle: magic and entry count.
const BUNDLE_HEADER_LEN: u64 = 24 + 8;
/// The fixed part of a bundle entry: offset, size and id length.
const BUNDLE_ENTRY_LEN: u64 = 24;
/// Most bundles read from one section.
const MAX_BUNDLES: usize = 1 << 12;
/// Most entries in one bundle (checklist §3.8).
const MAX_BUNDLE_ENTRIES: u64 = 4096;
/// The longest entry id (checklist §3.8).
const MAX_BUNDLE_ID_LEN: u64 = 4096;

const EM_AMDGPU: u16 = 224;
const EI_OSABI: usize = 7;
const ELFOSABI_AMDGPU_HSA: u8 = 64;
const EF_AMDGPU_MACH: u32 = 0xFF;
const EF_AMDGPU_FEATURE_XNACK_V2: u32 = 0x01;
const EF_AMDGPU_FEATURE_XNACK_V3: u32 = 0x100;
const EF_AMDGPU_FEATURE_SRAMECC_V3: u32 = 0x200;
const EF_AMDGPU_FEATURE_XNACK_V4: u32 = 0x300;
const EF_AMDGPU_FEATURE_SRAMECC_V4: u32 = 0xC00;
const EF_AMDGPU_GENERIC_VERSION_OFFSET: u32 = 24;

/// `EF_AMDGPU_MACH` values of AMDGCN processors (LLVM `BinaryFormat/ELF.h`; 0x04F gfx950,
/// 0x058 gfx1153 and 0x05F gfx9-4-generic from newer LLVM, binary-formats.md §2.5).
/// Values not listed here, the reserved ones included, are reported numerically.
const AMDGPU_MACHS: &[(u32, &str)] = &[
    (0x020, "gfx600"),
    (0x021, "gfx601"),
    (0x022, "gfx700"),
    (0x023, "gfx701"),
    (0x024, "gfx702"),
    (0x025, "gfx703"),
    (0x026, "gfx704"),
    (0x028, "gfx801"),
    (0x029, "gfx802"),
    (0x02A, "gfx803"),
    (0x02B, "gfx810"),
    (0x02C, "gfx900"),
    (0x02D, "gfx902"),
    (0x02E, "gfx904"),
    (0x02F, "gfx906"),
    (0x030, "gfx908"),
    (0x031, "gfx909"),
    (0x032, "gfx90c"),
    (0x033, "gfx1010"),
    (0x034, "gfx1011"),
    (0x035, "gfx1012"),
    (0x036, "gfx1030"),
    (0x037, "gfx1031"),
    (0x038, "gfx1032"),
    (0x039, "gfx1033"),
    (0x03A, "gfx602"),
    (0x03B, "gfx705"),
    (0x03C, "gfx805"),
    (0x03D, "gfx1035"),
    (0x03E, "gfx1034"),
    (0x03F, "gfx90a"),
    (0x040, "gfx940"),
    (0x041, "gfx1100"),
    (0x042, "gfx1013"),
    (0x043, "gfx1150"),
    (0x044, "gfx1103"),
    (0x045, "gfx1036"),
    (0x046, "gfx1101"),
    (0x047, "gfx1102"),
    (0x048, "gfx1200"),
    (0x04A, "gfx1151"),
    (0x04B, "gfx941"),
    (0x04C, "gfx942"),
    (0x04E, "gfx1201"),
    (0x04F, "gfx950"),
    (0x051, "gfx9-generic"),
    (0x052, "gfx10-1-generic"),
    (0x053, "gfx10-3-generic"),
    (0x054, "gfx11-generic"),
    (0x055, "gfx1152"),
    (0x058, "gfx1153"),
    (0x059, "gfx12-generic"),
    (0x05F, "gfx9-4-generic"),
];

/// The processor name of an `EF_AMDGPU_MACH` value, if khub knows it.
pub fn amdgpu_mach_name(mach: u32) -> Option<&'static str> {
    AMDGPU_MACHS.iter().find(|(m, _)| *m == mach).map(|(_, n)| *n)
}

/// The offload kind that starts a bundle entry id (binary-formats.md §2.3).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HipOffloadKind {
    /// `hip`: written by clang's new offload driver (`--offload-new-driver -fgpu-rdc`).
    Hip,
    /// `hipv4`: the classic driver, code object v4 or newer.
    HipV4,
    /// `openmp`: OpenMP offloading.
    OpenMp,
    /// `host`: the host entry, of size 0.
    Host,
    /// Any other kind, as written; reported and skipped.
    Other(String),
}

impl HipOffloadKind {
    fn parse(s: &str) -> Self {
        match s {
            "hip" => HipOffloadKind::Hip,
            "hipv4" => HipOffloadKind::HipV4,
            "openmp" => HipOffloadKind::OpenMp,
            "host" => HipOffloadKind::Host,
            other => HipOffloadKind::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for HipOffloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HipOffloadKind::Hip => f.write_str("hip"),
            HipOffloadKind::HipV4 => f.write_str("hipv4"),
            HipOffloadKind::OpenMp => f.write_str("openmp"),
            HipOffloadKind::Host => f.write_str("host"),
            HipOffloadKind::Other(s) => f.write_str(s),
        }
    }
}

/// How a compressed (`CCOB`) bundle was stored (binary-formats.md §2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct HipCompression {
    /// The CCOB format version, 1 to 3.
    pub version: u16,
    /// `"zlib"` (method 0) or `"zstd"` (method 1).
    pub method: &'static str,
    /// The bytes the compressed bundle occupies in the section, header included.
    pub stored_size: u64,
    /// The size of the decompressed bundle, as the header declares it (and as checked).
    pub uncompressed_size: u64,
}

/// The state of `xnack` or `sramecc` that a code object's `e_flags` records
/// (binary-formats.md §2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CodeObjectFeature {
    /// The processor has no such feature (`0` in v4+).
    Unsupported,
    /// Built to run with the feature on or off (`any`).
    Any,
    /// Built for the feature off.
    Off,
    /// Built for the feature on.
    On,
}

impl CodeObjectFeature {
    /// The requirement in target-id terms: unsupported and any both leave it out.
    pub fn requirement(self) -> FeatureState {
        match self {
            CodeObjectFeature::Unsupported | CodeObjectFeature::Any => FeatureState::Any,
            CodeObjectFeature::Off => FeatureState::Off,
            CodeObjectFeature::On => FeatureState::On,
        }
    }

    fn v4(bits: u32, any: u32, off: u32, on: u32) -> Self {
        if bits == on {
            CodeObjectFeature::On
        } else if bits == off {
            CodeObjectFeature::Off
        } else if bits == any {
            CodeObjectFeature::Any
        } else {
            CodeObjectFeature::Unsupported
        }
    }
}

/// What the ELF header of one AMDGPU code object says (binary-formats.md §2.5).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AmdCodeObjectHeader {
    /// `e_machine`: 224 (`EM_AMDGPU`) for every AMDGPU code object.
    pub e_machine: u16,
    /// `EI_OSABI`: 64 for the HSA runtime (what HIP uses), 65 PAL, 66 Mesa.
    pub os_abi: u8,
    /// `EI_ABIVERSION`.
    pub abi_version: u8,
    /// The code object version (2 to 6) that `EI_ABIVERSION` encodes for HSA objects
    /// (0 = v2 … 4 = v6); `None` for other OS ABIs and unknown values.
    pub code_object_version: Option<u8>,
    /// The raw `e_flags`.
    pub e_flags: u32,
    /// `EF_AMDGPU_MACH` (`e_flags & 0xff`): the processor.
    pub mach: u32,
    /// The processor's name, when khub knows the `mach` value.
    pub processor: Option<&'static str>,
    /// The xnack setting.
    pub xnack: CodeObjectFeature,
    /// The sramecc setting.
    pub sramecc: CodeObjectFeature,
    /// `EF_AMDGPU_GENERIC_VERSION` (bits 24–31, code object v6 and later): the generic
    /// version of a generic target, 0 for a specific processor.
    pub generic_version: u32,
}

impl AmdCodeObjectHeader {
    /// Decodes the ELF header at the start of `bytes`; `Err` says why it is not an AMDGPU
    /// code object header.
    pub fn read(bytes: &[u8]) -> Result<Self, String> {
        if bytes.get(..4) != Some(&elf::ELFMAG[..]) {
            return Err("not an ELF image".into());
        }
        if bytes.get(EI_CLASS) != Some(&elf::ELFCLASS64) || bytes.get(EI_DATA) != Some(&elf::ELFDATA2LSB) {
            return Err("not a 64-bit little-endian ELF image".into());
        }
        let (Some(&os_abi), Some(&abi_version), Some(e_machine), Some(e_flags)) = (
            bytes.get(EI_OSABI),
            bytes.get(EI_ABIVERSION),
            le_u16(bytes, 0x12),
            le_u32(bytes, 0x30),
        ) else {
            return Err("truncated ELF header".into());
        };
        if e_machine != EM_AMDGPU {
            return Err(format!("e_machine is {e_machine}, not EM_AMDGPU (224)"));
        }
        let code_object_version = match (os_abi, abi_version) {
            (ELFOSABI_AMDGPU_HSA, v @ 0..=4) => Some(v + 2),
            _ => None,
        };
        let mach = e_flags & EF_AMDGPU_MACH;
        // The feature bits moved in code object v4 (binary-formats.md §2.5); v2 and v3 had
        // no "any" state.
        let on_off = |set: bool| if set { CodeObjectFeature::On } else { CodeObjectFeature::Off };
        let (xnack, sramecc) = match code_object_version {
            Some(2) => (on_off(e_flags & EF_AMDGPU_FEATURE_XNACK_V2 != 0), CodeObjectFeature::Unsupported),
            Some(3) => (
                on_off(e_flags & EF_AMDGPU_FEATURE_XNACK_V3 != 0),
                on_off(e_flags & EF_AMDGPU_FEATURE_SRAMECC_V3 != 0),
            ),
            _ => (
                CodeObjectFeature::v4(e_flags & EF_AMDGPU_FEATURE_XNACK_V4, 0x100, 0x200, 0x300),
                CodeObjectFeature::v4(e_flags & EF_AMDGPU_FEATURE_SRAMECC_V4, 0x400, 0x800, 0xC00),
            ),
        };
        // The generic version exists from code object v6 on (and in whatever comes next).
        let generic_version = match code_object_version {
            Some(2..=5) => 0,
            _ => e_flags >> EF_AMDGPU_GENERIC_VERSION_OFFSET,
        };
        Ok(AmdCodeObjectHeader {
            e_machine,
            os_abi,
            abi_version,
            code_object_version,
            e_flags,
            mach,
            processor: amdgpu_mach_name(mach),
            xnack,
            sramecc,
            generic_version,
        })
    }

    /// The target id the header describes, `processor[:sramecc±][:xnack±]` (features in
    /// the "any" or "unsupported" state are omitted, as `llvm-readelf` and the bundle ids
    /// do); `None` when the processor is unknown.
    pub fn target_id(&self) -> Option<String> {
        let mut id = self.processor?.to_owned();
        for (name, state) in [("sramecc", self.sramecc), ("xnack", self.xnack)] {
            match state {
                CodeObjectFeature::On => id.push_str(&format!(":{name}+")),
                CodeObjectFeature::Off => id.push_str(&format!(":{name}-")),
                CodeObjectFeature::Any | CodeObjectFeature::Unsupported => {}
            }
        }
        Some(id)
    }
}

/// One entry of a clang offload bundle in `.hip_fatbin`: a code object for one target, or
/// the (empty) host entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HipCodeObject {
    /// The index of the bundle within the section, from 0: one bundle per translation unit
    /// in an ordinary build.
    pub bundle: usize,
    /// The offset of the bundle within the section.
    pub bundle_offset: u64,
    /// How the bundle is compressed; `None` for a plain bundle.
    pub compression: Option<HipCompression>,
    /// The entry id as written: `hipv4-amdgcn-amd-amdhsa--gfx90a:xnack-`.
    pub id: String,
    /// The offload kind (the id's first field).
    pub kind: HipOffloadKind,
    /// The target triple (`amdgcn-amd-amdhsa-`, `x86_64-unknown-linux-`), as written.
    pub triple: String,
    /// The target id (everything after the fifth dash); empty for the host entry.
    pub target_id: String,
    /// The target id parsed, with the generic version taken from the code object's
    /// `e_flags`; `None` for the host and for ids khub cannot parse.
    pub target: Option<AmdTarget>,
    /// The offset of the code object within its bundle (within the decompressed bundle
    /// when it is compressed).
    pub offset: u64,
    /// The size of the code object; 0 for the host entry.
    pub size: u64,
    /// The code object's ELF header; `None` for the host entry and for payloads that are
    /// not AMDGPU ELF images (with a warning).
    pub elf: Option<AmdCodeObjectHeader>,
}

impl HipCodeObject {
    /// Whether this is device code khub can match against a GPU: a HIP or OpenMP entry
    /// whose target id parsed.
    pub fn is_device(&self) -> bool {
        matches!(self.kind, HipOffloadKind::Hip | HipOffloadKind::HipV4 | HipOffloadKind::OpenMp) && self.target.is_some()
    }
}

/// Walks the offload bundles of a `.hip_fatbin` section and appends every entry to `out`.
///
/// Bundles follow each other, separated by nothing but zero bytes (clang aligns each to
/// 4096 bytes). A plain bundle ends where its last code object ends; a compressed one
/// where its header says (v2, v3) or where its compressed stream ends (v1). Entry ids,
/// target ids and the code objects' ELF headers are decoded; mismatches between them,
/// unknown offload kinds and unknown processors are warnings. A CCOB version other than
/// 1 to 3 stops the walk of the section with a warning. Offsets in errors are relative to
/// the section start.
pub fn parse_hip_fatbin(section: &[u8], out: &mut Vec<HipCodeObject>, warnings: &mut Vec<String>) -> Result<(), InspectError> {
    let name = HIP_FATBIN_SECTION;
    let len = section.len() as u64;
    let mut off: u64 = 0;
    let mut bundle = 0usize;
    loop {
        while section.get(to_usize(off)) == Some(&0) {
            off += 1;
        }
        if off >= len {
            return Ok(());
        }
        if bundle >= MAX_BUNDLES {
            return Err(corrupt(name, off, format!("more than {MAX_BUNDLES} bundles")));
        }
        let rest = section.get(to_usize(off)..).unwrap_or(&[]);
        if rest.starts_with(BUNDLE_MAGIC) {
            let place = BundlePlace {
                bundle,
                offset: off,
                compression: None,
            };
            let used = parse_bundle(rest, &place, out, warnings)?;
            off += used;
        } else if rest.starts_with(CCOB_MAGIC) {
            let Some((inner, compression)) = decompress_ccob(rest, off, warnings)? else {
                return Ok(());
            };
            if !inner.starts_with(BUNDLE_MAGIC) {
                return Err(corrupt(
                    name,
                    off,
                    "the decompressed bundle does not start with __CLANG_OFFLOAD_BUNDLE__",
                ));
            }
            let place = BundlePlace {
                bundle,
                offset: off,
                compression: Some(compression),
            };
            parse_bundle(&inner, &place, out, warnings)?;
            off += compression.stored_size;
        } else {
            let shown: Vec<String> = rest.iter().take(8).map(|b| format!("{b:02x}")).collect();
            return Err(corrupt(
                name,
                off,
                format!("expected __CLANG_OFFLOAD_BUNDLE__ or CCOB, found bytes {}", shown.join(" ")),
            ));
        }
        bundle += 1;
    }
}

/// Where a bundle lies, for messages and its entries' bookkeeping.
struct BundlePlace {
    bundle: usize,
    offset: u64,
    compression: Option<HipCompression>,
}

impl BundlePlace {
    /// A corruption at `rel` bytes into the bundle: a section offset for a plain bundle,
    /// the bundle's own offset (and the position in the decompressed bytes) otherwise.
    fn corrupt(&self, rel: u64, problem: String) -> InspectError {
        match self.compression {
            None => corrupt(HIP_FATBIN_SECTION, self.offset.saturating_add(rel), problem),
            Some(_) => corrupt(
                HIP_FATBIN_SECTION,
                self.offset,
                format!("{problem} (at {rel:#x} in the decompressed bundle)"),
            ),
        }
    }
}

/// Parses one plain bundle at the start of `b` (which may run on past the bundle) and
/// returns how many bytes it spans: up to the end of its last code object, and at least
/// its header.
fn parse_bundle(b: &[u8], place: &BundlePlace, out: &mut Vec<HipCodeObject>, warnings: &mut Vec<String>) -> Result<u64, InspectError> {
    let len = b.len() as u64;
    let count = le_u64(b, BUNDLE_MAGIC.len())
        .ok_or_else(|| place.corrupt(0, format!("truncated bundle header: {len} bytes, {BUNDLE_HEADER_LEN} needed")))?;
    if count > MAX_BUNDLE_ENTRIES {
        return Err(place.corrupt(24, format!("{count} bundle entries exceed the cap of {MAX_BUNDLE_ENTRIES}")));
    }
    let mut p = BUNDLE_HEADER_LEN;
    let mut end = p;
    for i in 0..count {
        let (Some(offset), Some(size), Some(id_len)) = (le_u64(b, to_usize(p)), le_u64(b, to_usize(p + 8)), le_u64(b, to_usize(p + 16)))
        else {
            return Err(place.corrupt(p, format!("bundle entry {i} of {count} is truncated")));
        };
        if id_len > MAX_BUNDLE_ID_LEN {
            return Err(place.corrupt(
                p,
                format!("bundle entry id of {id_len} bytes exceeds the cap of {MAX_BUNDLE_ID_LEN}"),
            ));
        }
        let id_start = p + BUNDLE_ENTRY_LEN;
        let id_bytes = b
            .get(to_usize(id_start)..to_usize(id_start + id_len))
            .ok_or_else(|| place.corrupt(p, format!("bundle entry {i} id of {id_len} bytes is truncated")))?;
        let object_end = offset.checked_add(size).filter(|&e| e <= len).ok_or_else(|| {
            place.corrupt(
                p,
                format!("code object {offset:#x} + {size:#x} overruns the bundle ({len:#x} bytes)"),
            )
        })?;
        // In bounds: object_end <= len.
        let payload = b.get(to_usize(offset)..to_usize(object_end)).unwrap_or(&[]);
        if size > 0 {
            end = end.max(object_end);
        }
        if id_bytes.is_empty() {
            return Err(place.corrupt(p, format!("bundle entry {i} of {count} has an empty id")));
        }
        let id = String::from_utf8_lossy(id_bytes).into_owned();
        out.push(bundle_entry(id, offset, size, payload, place, warnings));
        p = id_start + id_len;
    }
    Ok(end.max(p))
}

/// Splits an entry id into kind, triple and target id: `split('-', 5)`, the target id
/// being everything after the fifth dash (target ids contain dashes: `gfx9-generic`).
/// A host triple written without the trailing `--` (clang 15 and older) has no target id.
fn split_bundle_id(id: &str) -> (&str, String, &str) {
    let parts: Vec<&str> = id.splitn(6, '-').collect();
    let kind = parts.first().copied().unwrap_or("");
    let triple_parts = parts.get(1..parts.len().min(5)).unwrap_or(&[]);
    let target = if parts.len() == 6 { parts[5] } else { "" };
    (kind, triple_parts.join("-"), target)
}

/// Decodes one bundle entry: its id, and for device entries the target id and the code
/// object's ELF header, cross-checked.
fn bundle_entry(id: String, offset: u64, size: u64, payload: &[u8], place: &BundlePlace, warnings: &mut Vec<String>) -> HipCodeObject {
    let (kind, triple, target_id) = split_bundle_id(&id);
    let kind = HipOffloadKind::parse(kind);
    let (triple, target_id) = (triple, target_id.to_owned());
    let here = format!("{HIP_FATBIN_SECTION} bundle {} entry `{id}`", place.bundle);
    let mut entry = HipCodeObject {
        bundle: place.bundle,
        bundle_offset: place.offset,
        compression: place.compression,
        id: id.clone(),
        kind,
        triple,
        target_id,
        target: None,
        offset,
        size,
        elf: None,
    };
    match &entry.kind {
        HipOffloadKind::Host => {
            if size != 0 {
                warnings.push(format!("{here}: the host entry has {size} bytes; host entries are empty"));
            }
            return entry;
        }
        HipOffloadKind::Other(k) => {
            warnings.push(format!("{here}: unknown offload kind `{k}`; skipped"));
            return entry;
        }
        HipOffloadKind::Hip | HipOffloadKind::HipV4 | HipOffloadKind::OpenMp => {}
    }
    if !entry.triple.starts_with("amdgcn-") {
        warnings.push(format!("{here}: not an AMDGPU triple; skipped"));
        return entry;
    }
    match entry.target_id.parse::<AmdTarget>() {
        Ok(t) => entry.target = Some(t),
        Err(e) => warnings.push(format!("{here}: {e}; not reported as a target")),
    }
    if size == 0 {
        warnings.push(format!("{here}: empty code object"));
        return entry;
    }
    match AmdCodeObjectHeader::read(payload) {
        Ok(h) => {
            cross_check_code_object(&h, &mut entry, &here, warnings);
            entry.elf = Some(h);
        }
        Err(why) => warnings.push(format!("{here}: code object is {why}")),
    }
    entry
}

/// Compares the code object's ELF header with its bundle id (checklist §3.10) and takes
/// the generic version from `e_flags`. Mismatches are warnings.
fn cross_check_code_object(h: &AmdCodeObjectHeader, entry: &mut HipCodeObject, here: &str, warnings: &mut Vec<String>) {
    let Some(processor) = h.processor else {
        warnings.push(format!("{here}: unknown EF_AMDGPU_MACH {:#05x} (e_flags {:#x})", h.mach, h.e_flags));
        return;
    };
    if h.os_abi != ELFOSABI_AMDGPU_HSA {
        warnings.push(format!("{here}: code object OS ABI {} is not AMDGPU HSA (64)", h.os_abi));
    }
    let Some(target) = entry.target.as_mut() else {
        return;
    };
    if target.processor != processor {
        warnings.push(format!(
            "{here}: the code object is for {processor} (e_flags {:#x}), the id says {}",
            h.e_flags, target.processor
        ));
        return;
    }
    if target.xnack != h.xnack.requirement() || target.sramecc != h.sramecc.requirement() {
        warnings.push(format!(
            "{here}: the code object's features are {} (e_flags {:#x}), the id says {}",
            h.target_id().unwrap_or_default(),
            h.e_flags,
            entry.target_id
        ));
    }
    if target.is_generic() {
        if h.generic_version == 0 {
            warnings.push(format!(
                "{here}: a generic target whose code object has no generic version (code object v{})",
                h.code_object_version.map_or("?".to_owned(), |v| v.to_string())
            ));
        } else {
            target.generic_version = h.generic_version;
        }
    } else if h.generic_version != 0 {
        warnings.push(format!(
            "{here}: {processor} is not generic, but e_flags carries generic version {}",
            h.generic_version
        ));
    }
}

/// Decompresses the `CCOB` bundle at the start of `rest` (section offset `at`): the
/// decompressed bytes and how the bundle was stored, or `None` (with a warning) for a
/// CCOB version khub does not know.
///
/// Layouts per binary-formats.md §2.4: after the magic, `u16 version, u16 method`, then
/// v1 `u32 uncompressed, u64 hash`; v2 `u32 total, u32 uncompressed, u64 hash`; v3
/// `u64 total, u64 uncompressed, u64 hash`. `total` counts the header. The output is
/// capped at the declared size and must reach it exactly.
fn decompress_ccob(rest: &[u8], at: u64, warnings: &mut Vec<String>) -> Result<Option<(Vec<u8>, HipCompression)>, InspectError> {
    let name = HIP_FATBIN_SECTION;
    let truncated = || corrupt(name, at, "truncated CCOB header");
    let version = le_u16(rest, 4).ok_or_else(truncated)?;
    let method = le_u16(rest, 6).ok_or_else(truncated)?;
    let (header_len, total, uncompressed) = match version {
        1 => (20u64, None, u64::from(le_u32(rest, 8).ok_or_else(truncated)?)),
        2 => (
            24,
            Some(u64::from(le_u32(rest, 8).ok_or_else(truncated)?)),
            u64::from(le_u32(rest, 12).ok_or_else(truncated)?),
        ),
        3 => (
            32,
            Some(le_u64(rest, 8).ok_or_else(truncated)?),
            le_u64(rest, 16).ok_or_else(truncated)?,
        ),
        v => {
            warnings.push(format!(
                "{name} at {at:#x}: unknown CCOB version {v}; the rest of the section is not read"
            ));
            return Ok(None);
        }
    };
    if (rest.len() as u64) < header_len {
        return Err(truncated());
    }
    let stream_end = match total {
        Some(t) if t < header_len || t > rest.len() as u64 => {
            return Err(corrupt(
                name,
                at,
                format!(
                    "CCOB v{version} total size {t:#x} does not fit the section ({:#x} bytes left)",
                    rest.len()
                ),
            ));
        }
        Some(t) => t,
        None => rest.len() as u64,
    };
    if uncompressed > MAX_HIP_DECOMPRESSED {
        return Err(corrupt(
            name,
            at,
            format!("CCOB declares {uncompressed} uncompressed bytes, over the cap of {MAX_HIP_DECOMPRESSED}"),
        ));
    }
    // In bounds: header_len <= stream_end <= rest.len().
    let stream = rest.get(to_usize(header_len)..to_usize(stream_end)).unwrap_or(&[]);
    let (method_name, decoded) = match method {
        0 => ("zlib", inflate_zlib(stream, uncompressed)),
        1 => ("zstd", decode_zstd(stream, uncompressed)),
        m => {
            return Err(corrupt(
                name,
                at,
                format!("unknown CCOB compression method {m} (0 is zlib, 1 zstd)"),
            ));
        }
    };
    let (inner, consumed) = decoded.map_err(|why| corrupt(name, at, format!("CCOB v{version} {method_name} stream: {why}")))?;
    if inner.len() as u64 != uncompressed {
        return Err(corrupt(
            name,
            at,
            format!(
                "CCOB v{version} decompressed to {} bytes, its header declares {uncompressed}",
                inner.len()
            ),
        ));
    }
    let stored_size = total.unwrap_or(header_len + consumed);
    Ok(Some((
        inner,
        HipCompression {
            version,
            method: method_name,
            stored_size,
            uncompressed_size: uncompressed,
        },
    )))
}

/// Reads a decoder to its end, keeping at most `cap` bytes: one byte more means the
/// stream expands past what its header declared.
fn read_capped(mut reader: impl Read, cap: u64) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    reader
        .by_ref()
        .take(cap.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| e.to_string())?;
    if out.len() as u64 > cap {
        return Err(format!("expands past the declared {cap} bytes"));
    }
    Ok(out)
}

/// Inflates a zlib stream into at most `cap` bytes; returns the bytes and how much of
/// `stream` the zlib stream used.
fn inflate_zlib(stream: &[u8], cap: u64) -> Result<(Vec<u8>, u64), String> {
    let mut decoder = flate2::bufread::ZlibDecoder::new(stream);
    let out = read_capped(&mut decoder, cap)?;
    Ok((out, decoder.total_in()))
}

/// Decodes one zstd frame into at most `cap` bytes; returns the bytes and how much of
/// `stream` the frame used.
fn decode_zstd(stream: &[u8], cap: u64) -> Result<(Vec<u8>, u64), String> {
    let mut source = stream;
    let out = {
        let decoder = ruzstd::decoding::StreamingDecoder::new(&mut source).map_err(|e| e.to_string())?;
        read_capped(decoder, cap)?
    };
    Ok((out, (stream.len() - source.len()) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arch(s: &str) -> CudaArch {
        s.parse().expect("valid arch token")
    }

    /// One entry for the synthetic builder.
    #[derive(Clone)]
    struct E {
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

        fn cubin(arch: u32, flags: u64) -> E {
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

    fn container(entries: &[E]) -> Vec<u8> {
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

    fn liba_container() -> Vec<u8> {
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

    // ---- ELF ----

    /// A minimal ELF64 x86-64 shared object with a `.nv_fatbin` section (and optionally
    /// `__nv_relfatbin`) and no dynamic section.
    fn elf_with_fatbin(fatbin: &[u8], relfatbin: Option<&[u8]>) -> Vec<u8> {
        let shstrtab = b"\0.nv_fatbin\0__nv_relfatbin\0.shstrtab\0".to_vec();
        let mut out = vec![0u8; 64];
        let mut sections: Vec<(u32, u32, u64, u64)> = Vec::new(); // name, type, off, size
        let fat_off = out.len() as u64;
        out.extend_from_slice(fatbin);
        sections.push((1, elf::SHT_PROGBITS, fat_off, fatbin.len() as u64));
        if let Some(rel) = relfatbin {
            while !out.len().is_multiple_of(8) {
                out.push(0);
            }
            let off = out.len() as u64;
            out.extend_from_slice(rel);
            sections.push((12, elf::SHT_PROGBITS, off, rel.len() as u64));
        }
        let str_off = out.len() as u64;
        out.extend_from_slice(&shstrtab);
        sections.push((27, elf::SHT_STRTAB, str_off, shstrtab.len() as u64));
        while !out.len().is_multiple_of(8) {
            out.push(0);
        }
        let shoff = out.len() as u64;
        out.extend_from_slice(&[0u8; 64]); // null section
        for (name, ty, off, size) in &sections {
            let mut sh = vec![0u8; 64];
            sh[0..4].copy_from_slice(&name.to_le_bytes());
            sh[4..8].copy_from_slice(&ty.to_le_bytes());
            sh[8..16].copy_from_slice(&u64::from(elf::SHF_ALLOC).to_le_bytes());
            sh[0x18..0x20].copy_from_slice(&off.to_le_bytes());
            sh[0x20..0x28].copy_from_slice(&size.to_le_bytes());
            sh[0x30..0x38].copy_from_slice(&8u64.to_le_bytes());
            out.extend(sh);
        }
        let h = &mut out[..64];
        h[..4].copy_from_slice(&elf::ELFMAG);
        h[4] = elf::ELFCLASS64;
        h[5] = elf::ELFDATA2LSB;
        h[6] = elf::EV_CURRENT;
        h[0x10..0x12].copy_from_slice(&elf::ET_DYN.to_le_bytes());
        h[0x12..0x14].copy_from_slice(&elf::EM_X86_64.to_le_bytes());
        h[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
        h[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        h[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        h[0x3A..0x3C].copy_from_slice(&64u16.to_le_bytes());
        let shnum = sections.len() as u16 + 1;
        h[0x3C..0x3E].copy_from_slice(&shnum.to_le_bytes());
        h[0x3E..0x40].copy_from_slice(&(shnum - 1).to_le_bytes());
        out
    }

    #[test]
    fn library_with_fatbin_sections() {
        let rel = container(&[E::cubin(75, 0)]);
        let bytes = elf_with_fatbin(&liba_container(), Some(&rel));
        let info = inspect_library(&bytes).unwrap();
        assert_eq!(info.machine, "x86_64");
        assert!(info.exports.is_empty() && info.needed.is_empty());
        assert_eq!(info.glibc_floor, None);
        assert!(!info.musl);
        assert_eq!(info.cuda.len(), 4);
        assert!(info.cuda[3].relocatable);
        assert_eq!(info.cuda_code(), [arch("sm_80"), arch("sm_90a"), arch("compute_90")]);
    }

    #[test]
    fn library_errors() {
        assert!(matches!(inspect_library(b"MZ\x90\0"), Err(InspectError::NotElf)));
        assert!(matches!(inspect_library(b""), Err(InspectError::NotElf)));
        let mut bytes = elf_with_fatbin(&liba_container(), None);
        bytes[4] = elf::ELFCLASS32;
        assert!(matches!(inspect_library(&bytes), Err(InspectError::Unsupported(_))));
        let mut bytes = elf_with_fatbin(&liba_container(), None);
        bytes[5] = elf::ELFDATA2MSB;
        assert!(matches!(inspect_library(&bytes), Err(InspectError::Unsupported(_))));
        let bytes = elf_with_fatbin(&liba_container(), None);
        assert!(matches!(
            inspect_library(&bytes[..bytes.len() - 1]),
            Err(InspectError::Corrupt { .. })
        ));
        // A corrupt fatbin is an error of the section.
        let mut c = liba_container();
        c[16 + 4..16 + 8].copy_from_slice(&0x10u32.to_le_bytes());
        match inspect_library(&elf_with_fatbin(&c, None)) {
            Err(InspectError::Corrupt { section, offset, .. }) => {
                assert_eq!(section, ".nv_fatbin");
                assert_eq!(offset, 16);
            }
            other => panic!("{other:?}"),
        }
        // Misaligned input still parses.
        let bytes = elf_with_fatbin(&liba_container(), None);
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes);
        assert_eq!(inspect_library(&shifted[1..]).unwrap().cuda.len(), 3);
    }

    #[test]
    fn inspect_file_reports_io_errors() {
        let err = inspect_file(Path::new("/nonexistent/khub/libnothing.so")).unwrap_err();
        assert!(matches!(err, InspectError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("libnothing.so"));
    }

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    fn mutate(rng: &mut XorShift, base: &[u8]) -> Vec<u8> {
        let mut m = base.to_vec();
        for _ in 0..=rng.below(4) {
            match rng.below(6) {
                0 => {
                    let i = rng.below(m.len());
                    if let Some(b) = m.get_mut(i) {
                        *b ^= 1 << rng.below(8);
                    }
                }
                1 => {
                    let i = rng.below(m.len());
                    if let Some(b) = m.get_mut(i) {
                        *b = rng.next() as u8;
                    }
                }
                2 => {
                    let n = rng.below(m.len() + 1);
                    m.truncate(n);
                }
                3 => {
                    // Write an interesting 32-bit value at an aligned offset.
                    let values = [0u32, 1, 7, 8, 0x3F, 0x40, 0x41, 0xFFFF, 0x8000_0000, u32::MAX];
                    let i = rng.below(m.len() / 4) * 4;
                    let v = values[rng.below(values.len())].to_le_bytes();
                    if let Some(s) = m.get_mut(i..i + 4) {
                        s.copy_from_slice(&v);
                    }
                }
                4 => {
                    let i = rng.below(m.len() + 1);
                    m.insert(i, rng.next() as u8);
                }
                _ => {
                    if !m.is_empty() {
                        let i = rng.below(m.len());
                        m.remove(i);
                    }
                }
            }
        }
        m
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

    // ---- HIP offload bundles ----

    /// A 64-byte AMDGPU code object header (HSA OS ABI) with the given `e_flags` and code
    /// object version, padded to `len` bytes.
    fn code_object(e_flags: u32, cov: u8, len: usize) -> Vec<u8> {
        let mut h = vec![0u8; len.max(64)];
        h[..4].copy_from_slice(&elf::ELFMAG);
        h[EI_CLASS] = elf::ELFCLASS64;
        h[EI_DATA] = elf::ELFDATA2LSB;
        h[6] = elf::EV_CURRENT;
        h[EI_OSABI] = ELFOSABI_AMDGPU_HSA;
        h[EI_ABIVERSION] = cov - 2;
        h[0x10..0x12].copy_from_slice(&elf::ET_DYN.to_le_bytes());
        h[0x12..0x14].copy_from_slice(&EM_AMDGPU.to_le_bytes());
        h[0x30..0x34].copy_from_slice(&e_flags.to_le_bytes());
        h
    }

    const HOST_ID: &str = "host-x86_64-unknown-linux--";

    /// A plain bundle: the entries in order, code objects at `align`-aligned offsets.
    fn bundle(entries: &[(&str, Vec<u8>)], align: usize) -> Vec<u8> {
        let header_len = 32 + entries.iter().map(|(id, _)| 24 + id.len()).sum::<usize>();
        let mut offsets = Vec::new();
        let mut at = header_len;
        for (_, payload) in entries {
            if payload.is_empty() {
                offsets.push(0);
                continue;
            }
            at = at.div_ceil(align) * align;
            offsets.push(at);
            at += payload.len();
        }
        let mut b = BUNDLE_MAGIC.to_vec();
        b.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        for ((id, payload), off) in entries.iter().zip(&offsets) {
            b.extend_from_slice(&(*off as u64).to_le_bytes());
            b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            b.extend_from_slice(&(id.len() as u64).to_le_bytes());
            b.extend_from_slice(id.as_bytes());
        }
        for ((_, payload), off) in entries.iter().zip(&offsets) {
            if !payload.is_empty() {
                b.resize(*off, 0);
                b.extend_from_slice(payload);
            }
        }
        b
    }

    /// The three code objects of `libhip19_a` (binary-formats.md §4), clang-19 v5 flags.
    fn hip19_a() -> Vec<u8> {
        bundle(
            &[
                (HOST_ID, Vec::new()),
                ("hipv4-amdgcn-amd-amdhsa--gfx1100", code_object(0x41, 5, 256)),
                ("hipv4-amdgcn-amd-amdhsa--gfx90a", code_object(0x53F, 5, 256)),
                ("hipv4-amdgcn-amd-amdhsa--gfx942", code_object(0x54C, 5, 256)),
            ],
            4096,
        )
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        use std::io::Write as _;
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zstd(data: &[u8]) -> Vec<u8> {
        ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
    }

    /// A CCOB bundle of `version` (1 to 3) and `method` (0 zlib, 1 zstd) around `inner`.
    fn ccob(version: u16, method: u16, inner: &[u8]) -> Vec<u8> {
        let stream = if method == 0 { zlib(inner) } else { zstd(inner) };
        let mut b = CCOB_MAGIC.to_vec();
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&method.to_le_bytes());
        let hash = [0x5Au8; 8];
        match version {
            1 => {
                b.extend_from_slice(&(inner.len() as u32).to_le_bytes());
            }
            2 => {
                b.extend_from_slice(&((24 + stream.len()) as u32).to_le_bytes());
                b.extend_from_slice(&(inner.len() as u32).to_le_bytes());
            }
            _ => {
                b.extend_from_slice(&((32 + stream.len()) as u64).to_le_bytes());
                b.extend_from_slice(&(inner.len() as u64).to_le_bytes());
            }
        }
        b.extend_from_slice(&hash);
        b.extend(stream);
        b
    }

    fn hip_parse(section: &[u8]) -> Result<(Vec<HipCodeObject>, Vec<String>), InspectError> {
        let mut out = Vec::new();
        let mut warnings = Vec::new();
        parse_hip_fatbin(section, &mut out, &mut warnings).map(|()| (out, warnings))
    }

    fn hip_targets_of(objects: Vec<HipCodeObject>) -> Vec<String> {
        LibraryInfo {
            hip: objects,
            ..LibraryInfo::default()
        }
        .hip_targets()
        .iter()
        .map(ToString::to_string)
        .collect()
    }

    fn expect_hip_corrupt(section: &[u8], needle: &str) {
        match hip_parse(section) {
            Err(InspectError::Corrupt { problem, section, .. }) => {
                assert_eq!(section, HIP_FATBIN_SECTION);
                assert!(problem.contains(needle), "expected `{needle}` in `{problem}`");
            }
            other => panic!("expected a corrupt-section error containing `{needle}`, got {other:?}"),
        }
    }

    #[test]
    fn plain_bundle_lists_every_entry_and_target() {
        let (objects, warnings) = hip_parse(&hip19_a()).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(objects.len(), 4);
        let host = &objects[0];
        assert_eq!(
            (host.kind.clone(), host.size, host.target.is_none()),
            (HipOffloadKind::Host, 0, true)
        );
        assert_eq!(host.triple, "x86_64-unknown-linux-");
        assert!(!host.is_device());
        let gfx90a = &objects[2];
        assert_eq!(gfx90a.kind, HipOffloadKind::HipV4);
        assert_eq!(gfx90a.triple, "amdgcn-amd-amdhsa-");
        assert_eq!(gfx90a.target_id, "gfx90a");
        assert_eq!(gfx90a.offset % 4096, 0);
        let elf = gfx90a.elf.as_ref().unwrap();
        assert_eq!((elf.e_machine, elf.mach, elf.processor), (224, 0x3F, Some("gfx90a")));
        assert_eq!(
            (elf.code_object_version, elf.xnack, elf.sramecc),
            (Some(5), CodeObjectFeature::Any, CodeObjectFeature::Any)
        );
        assert_eq!(elf.target_id().as_deref(), Some("gfx90a"));
        let gfx1100 = objects[1].elf.as_ref().unwrap();
        assert_eq!(
            (gfx1100.xnack, gfx1100.sramecc),
            (CodeObjectFeature::Unsupported, CodeObjectFeature::Unsupported)
        );
        assert_eq!(hip_targets_of(objects), ["gfx1100", "gfx90a", "gfx942"]);
    }

    #[test]
    fn feature_settings_come_from_the_id_and_match_e_flags() {
        let section = bundle(
            &[
                (HOST_ID, Vec::new()),
                ("hipv4-amdgcn-amd-amdhsa--gfx1100", code_object(0x41, 5, 128)),
                ("hipv4-amdgcn-amd-amdhsa--gfx90a:xnack+", code_object(0x73F, 5, 128)),
                ("hipv4-amdgcn-amd-amdhsa--gfx90a:xnack-", code_object(0x63F, 5, 128)),
                ("hipv4-amdgcn-amd-amdhsa--gfx942:sramecc+:xnack-", code_object(0xE4C, 5, 128)),
            ],
            64,
        );
        let (objects, warnings) = hip_parse(&section).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let elf = |i: usize| objects[i].elf.clone().unwrap();
        assert_eq!((elf(2).xnack, elf(2).sramecc), (CodeObjectFeature::On, CodeObjectFeature::Any));
        assert_eq!((elf(3).xnack, elf(3).sramecc), (CodeObjectFeature::Off, CodeObjectFeature::Any));
        assert_eq!((elf(4).xnack, elf(4).sramecc), (CodeObjectFeature::Off, CodeObjectFeature::On));
        assert_eq!(elf(4).target_id().as_deref(), Some("gfx942:sramecc+:xnack-"));
        let t = objects[2].target.clone().unwrap();
        assert_eq!((t.xnack, t.sramecc), (FeatureState::On, FeatureState::Any));
        assert_eq!(
            hip_targets_of(objects),
            ["gfx1100", "gfx90a:xnack+", "gfx90a:xnack-", "gfx942:sramecc+:xnack-"]
        );
    }

    #[test]
    fn generic_targets_take_their_version_from_e_flags() {
        let section = bundle(
            &[
                (HOST_ID, Vec::new()),
                ("hipv4-amdgcn-amd-amdhsa--gfx11-generic", code_object(0x100_0054, 6, 128)),
                ("hipv4-amdgcn-amd-amdhsa--gfx9-generic", code_object(0x100_0151, 6, 128)),
                ("hipv4-amdgcn-amd-amdhsa--gfx942", code_object(0x54C, 6, 128)),
                ("hipv4-amdgcn-amd-amdhsa--gfx10-3-generic", code_object(0x200_0053, 6, 128)),
            ],
            64,
        );
        let (objects, warnings) = hip_parse(&section).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let gen11 = objects[1].elf.clone().unwrap();
        assert_eq!(
            (gen11.code_object_version, gen11.generic_version, gen11.processor),
            (Some(6), 1, Some("gfx11-generic"))
        );
        let gen9 = objects[2].elf.clone().unwrap();
        assert_eq!((gen9.generic_version, gen9.xnack), (1, CodeObjectFeature::Any));
        assert_eq!(objects[3].elf.clone().unwrap().generic_version, 0);
        assert_eq!(objects[4].target.clone().unwrap().generic_version, 2);
        assert_eq!(
            hip_targets_of(objects),
            ["gfx10-3-generic@2", "gfx11-generic", "gfx9-generic", "gfx942"]
        );
    }

    #[test]
    fn older_code_object_versions_decode_their_own_feature_bits() {
        let v3 = AmdCodeObjectHeader::read(&code_object(0x3F | 0x100, 3, 64)).unwrap();
        assert_eq!(
            (v3.code_object_version, v3.xnack, v3.sramecc),
            (Some(3), CodeObjectFeature::On, CodeObjectFeature::Off)
        );
        let v2 = AmdCodeObjectHeader::read(&code_object(0x2C | 0x1, 2, 64)).unwrap();
        assert_eq!((v2.xnack, v2.sramecc), (CodeObjectFeature::On, CodeObjectFeature::Unsupported));
        // hipcc 5.2.3's gfx940 (binary-formats.md §4): v4, e_flags 0x540.
        let v4 = AmdCodeObjectHeader::read(&code_object(0x540, 4, 64)).unwrap();
        assert_eq!(
            (v4.processor, v4.xnack, v4.sramecc),
            (Some("gfx940"), CodeObjectFeature::Any, CodeObjectFeature::Any)
        );
        // The generic version field only exists from v6 on.
        assert_eq!(
            AmdCodeObjectHeader::read(&code_object(0x100_003F, 5, 64)).unwrap().generic_version,
            0
        );
        assert!(AmdCodeObjectHeader::read(b"\x7fELF").unwrap_err().contains("not a 64-bit"));
        let mut cuda = code_object(0x41, 5, 64);
        cuda[0x12..0x14].copy_from_slice(&EM_CUDA.to_le_bytes());
        assert!(AmdCodeObjectHeader::read(&cuda).unwrap_err().contains("EM_AMDGPU"));
        assert_eq!(amdgpu_mach_name(0x5F), Some("gfx9-4-generic"));
        assert_eq!(amdgpu_mach_name(0x49), None);
    }

    #[test]
    fn bundles_follow_each_other_after_zero_padding() {
        // libhip19_two: a second translation unit's bundle at 0x5000.
        let mut section = hip19_a();
        section.resize(0x5000, 0);
        section.extend(bundle(
            &[
                (HOST_ID, Vec::new()),
                ("hipv4-amdgcn-amd-amdhsa--gfx90a", code_object(0x53F, 5, 128)),
            ],
            4096,
        ));
        section.resize(section.len().div_ceil(4096) * 4096, 0);
        let (objects, warnings) = hip_parse(&section).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(objects.len(), 6);
        assert_eq!((objects[4].bundle, objects[4].bundle_offset), (1, 0x5000));
        assert_eq!(hip_targets_of(objects), ["gfx1100", "gfx90a", "gfx942"]);
        // An empty or all-zero section holds nothing.
        assert!(hip_parse(&[]).unwrap().0.is_empty());
        assert!(hip_parse(&[0; 4096]).unwrap().0.is_empty());
    }

    #[test]
    fn compressed_bundles_of_every_version_and_method() {
        let inner = hip19_a();
        let (plain, _) = hip_parse(&inner).unwrap();
        for version in 1..=3u16 {
            for method in 0..=1u16 {
                let mut section = ccob(version, method, &inner);
                let stored = section.len() as u64;
                // Another bundle after the compressed one, 4096-aligned: v1 records no
                // size, so its end is where the stream ends.
                section.resize(section.len().div_ceil(4096) * 4096, 0);
                let second_at = section.len() as u64;
                section.extend(bundle(
                    &[
                        (HOST_ID, Vec::new()),
                        ("hipv4-amdgcn-amd-amdhsa--gfx1030", code_object(0x36, 4, 128)),
                    ],
                    4096,
                ));
                let (objects, warnings) = hip_parse(&section).unwrap_or_else(|e| panic!("v{version} method {method}: {e}"));
                assert!(warnings.is_empty(), "{warnings:?}");
                assert_eq!(objects.len(), 6, "v{version} method {method}");
                let c = objects[0].compression.unwrap();
                assert_eq!(c.version, version);
                assert_eq!(c.method, if method == 0 { "zlib" } else { "zstd" });
                assert_eq!(c.uncompressed_size, inner.len() as u64);
                assert_eq!(c.stored_size, stored, "v{version} method {method}");
                for (a, b) in objects.iter().zip(&plain) {
                    assert_eq!((&a.id, a.offset, a.size, &a.elf), (&b.id, b.offset, b.size, &b.elf));
                }
                assert_eq!((objects[5].bundle, objects[5].bundle_offset), (1, second_at));
                assert!(objects[5].compression.is_none());
                assert_eq!(hip_targets_of(objects), ["gfx1030", "gfx1100", "gfx90a", "gfx942"]);
            }
        }
    }

    #[test]
    fn compressed_bundles_are_capped_at_their_declared_size() {
        let inner = hip19_a();
        // A stream that expands past what the header declares: a bomb, refused.
        let mut bomb = ccob(2, 1, &inner);
        bomb[12..16].copy_from_slice(&100u32.to_le_bytes());
        expect_hip_corrupt(&bomb, "expands past the declared 100 bytes");
        let mut bomb = ccob(3, 0, &inner);
        bomb[16..24].copy_from_slice(&100u64.to_le_bytes());
        expect_hip_corrupt(&bomb, "expands past");
        // One that falls short of it.
        let mut short = ccob(1, 0, &inner);
        short[8..12].copy_from_slice(&(inner.len() as u32 + 1).to_le_bytes());
        expect_hip_corrupt(&short, "its header declares");
        // A declared size over the cap is refused before decompressing.
        let mut huge = ccob(3, 1, &inner);
        huge[16..24].copy_from_slice(&(MAX_HIP_DECOMPRESSED + 1).to_le_bytes());
        expect_hip_corrupt(&huge, "over the cap");
        // Sizes and methods that do not fit.
        let mut long = ccob(2, 1, &inner);
        long[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        expect_hip_corrupt(&long, "does not fit the section");
        let mut tiny = ccob(3, 1, &inner);
        tiny[8..16].copy_from_slice(&8u64.to_le_bytes());
        expect_hip_corrupt(&tiny, "does not fit the section");
        let mut method = ccob(2, 1, &inner);
        method[6..8].copy_from_slice(&7u16.to_le_bytes());
        expect_hip_corrupt(&method, "unknown CCOB compression method 7");
        let mut garbage = ccob(2, 1, &inner);
        let n = garbage.len();
        garbage[30..n].fill(0x55);
        expect_hip_corrupt(&garbage, "zstd stream");
        expect_hip_corrupt(&ccob(1, 0, &inner)[..30], "zlib stream");
        expect_hip_corrupt(b"CCOB\x02", "truncated CCOB header");
        // What decompresses must be a bundle.
        expect_hip_corrupt(&ccob(2, 1, b"not a bundle"), "does not start with __CLANG_OFFLOAD_BUNDLE__");
        // An unknown version stops the walk with a warning.
        let mut section = hip19_a();
        let mut v4 = ccob(3, 1, &inner);
        v4[4..6].copy_from_slice(&4u16.to_le_bytes());
        section.resize(4 * 4096, 0);
        section.extend(v4);
        let (objects, warnings) = hip_parse(&section).unwrap();
        assert_eq!(objects.len(), 4);
        assert!(warnings[0].contains("unknown CCOB version 4"), "{warnings:?}");
    }

    #[test]
    fn malformed_bundles_are_corrupt() {
        let good = hip19_a();
        let mut magic = good.clone();
        magic[0] = b'X';
        expect_hip_corrupt(&magic, "expected __CLANG_OFFLOAD_BUNDLE__ or CCOB");
        expect_hip_corrupt(&good[..28], "truncated bundle header");
        let mut count = good.clone();
        count[24..32].copy_from_slice(&5000u64.to_le_bytes());
        expect_hip_corrupt(&count, "exceed the cap");
        // A count past the real entries reads the zero padding: an entry with no id.
        let mut more = good.clone();
        more[24..32].copy_from_slice(&5u64.to_le_bytes());
        expect_hip_corrupt(&more, "has an empty id");
        expect_hip_corrupt(&good[..40], "is truncated");
        let mut id_len = good.clone();
        id_len[32 + 16..32 + 24].copy_from_slice(&5000u64.to_le_bytes());
        expect_hip_corrupt(&id_len, "exceeds the cap");
        let mut id_past = good.clone();
        id_past[32 + 16..32 + 24].copy_from_slice(&4000u64.to_le_bytes());
        expect_hip_corrupt(&id_past[..200], "id of 4000 bytes is truncated");
        // Second entry (gfx1100): offset + size beyond the bundle, or overflowing.
        let second = 32 + 24 + HOST_ID.len();
        let mut past = good.clone();
        past[second + 8..second + 16].copy_from_slice(&0x10_0000u64.to_le_bytes());
        expect_hip_corrupt(&past, "overruns the bundle");
        let mut wrap = good.clone();
        wrap[second..second + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        expect_hip_corrupt(&wrap, "overruns the bundle");
        // Garbage after a bundle is not padding.
        let mut trailing = good.clone();
        trailing.extend_from_slice(&[0, 0, 1, 2, 3]);
        match hip_parse(&trailing) {
            Err(InspectError::Corrupt { offset, .. }) => assert_eq!(offset, good.len() as u64 + 2),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn odd_entries_are_warnings() {
        let mut wrong_mach = code_object(0x4C, 5, 128);
        wrong_mach[0x30] = 0x3F;
        let section = bundle(
            &[
                ("host-x86_64-unknown-linux", Vec::new()),
                ("hipv4-amdgcn-amd-amdhsa--gfx942", wrong_mach),
                ("hipv4-amdgcn-amd-amdhsa--gfx90a:xnack+", code_object(0x53F, 5, 128)),
                ("hipv4-amdgcn-amd-amdhsa--gfx90a", code_object(0x3D0 | 0x20, 5, 128)),
                (
                    "hipv4-amdgcn-amd-amdhsa--gfx1100",
                    b"not an elf image at all, but long enough".to_vec(),
                ),
                ("sycl-spir64-unknown-unknown-", code_object(0x41, 5, 64)),
                ("hip-amdgcn-amd-amdhsa--gfx90a:cumode+", code_object(0x53F, 5, 64)),
                ("hip-amdgcn-amd-amdhsa--gfx11-generic", code_object(0x54, 5, 64)),
                ("hip-amdgcn-amd-amdhsa--gfx1100", code_object(0x100_0041, 6, 64)),
            ],
            64,
        );
        let (objects, warnings) = hip_parse(&section).unwrap();
        let all = warnings.join("\n");
        assert_eq!(objects.len(), 9);
        // clang 15 and older write the host triple without a trailing `--`.
        assert_eq!(
            (objects[0].kind.clone(), objects[0].triple.as_str()),
            (HipOffloadKind::Host, "x86_64-unknown-linux")
        );
        assert!(
            all.contains("the code object is for gfx90a (e_flags 0x3f), the id says gfx942"),
            "{all}"
        );
        assert!(
            all.contains("features are gfx90a (e_flags 0x53f), the id says gfx90a:xnack+"),
            "{all}"
        );
        assert!(all.contains("unknown EF_AMDGPU_MACH 0x0f0 (e_flags 0x3f0)"), "{all}");
        assert!(all.contains("code object is not an ELF image"), "{all}");
        assert!(all.contains("unknown offload kind `sycl`"), "{all}");
        assert!(all.contains("invalid AMD target feature `gfx90a:cumode+`"), "{all}");
        assert!(all.contains("no generic version"), "{all}");
        assert!(all.contains("not generic, but e_flags carries generic version 1"), "{all}");
        // The kind `hip` (new offload driver) counts; unknown kinds and unparsable ids do not.
        assert_eq!(objects[7].kind, HipOffloadKind::Hip);
        assert!(!objects[5].is_device() && !objects[6].is_device());
        assert_eq!(
            hip_targets_of(objects),
            ["gfx11-generic", "gfx1100", "gfx90a", "gfx90a:xnack+", "gfx942"]
        );
    }

    #[test]
    fn bundle_ids_split_at_the_fifth_dash() {
        assert_eq!(
            split_bundle_id("hipv4-amdgcn-amd-amdhsa--gfx10-3-generic"),
            ("hipv4", "amdgcn-amd-amdhsa-".to_owned(), "gfx10-3-generic")
        );
        assert_eq!(
            split_bundle_id("host-x86_64-unknown-linux--"),
            ("host", "x86_64-unknown-linux-".to_owned(), "")
        );
        assert_eq!(
            split_bundle_id("host-x86_64-unknown-linux"),
            ("host", "x86_64-unknown-linux".to_owned(), "")
        );
        assert_eq!(split_bundle_id(""), ("", String::new(), ""));
    }

    /// A minimal ELF64 x86-64 shared object with one `.hip_fatbin` section.
    fn elf_with_hip(section: &[u8]) -> Vec<u8> {
        let mut out = elf_with_fatbin(section, None);
        // Rename the section: ".nv_fatbin" and ".hip_fatbin" differ in length, so rewrite
        // the string table entry in place with a name of the same length.
        let at = out.windows(10).position(|w| w == b".nv_fatbin").unwrap();
        out[at..at + 10].copy_from_slice(b".nv_hipbin");
        out
    }

    #[test]
    fn library_with_a_hip_fatbin_section() {
        let shstrtab = b"\0.hip_fatbin\0.shstrtab\0";
        let section = ccob(2, 1, &hip19_a());
        // Build by hand: the NVIDIA helper's name table does not fit `.hip_fatbin`.
        let mut out = vec![0u8; 64];
        let off = 4096usize;
        out.resize(off, 0);
        out.extend_from_slice(&section);
        let str_off = out.len();
        out.extend_from_slice(shstrtab);
        out.resize(out.len().div_ceil(8) * 8, 0);
        let shoff = out.len();
        out.extend_from_slice(&[0u8; 64]);
        for (name, ty, o, size) in [
            (1u32, elf::SHT_PROGBITS, off, section.len()),
            (13, elf::SHT_STRTAB, str_off, shstrtab.len()),
        ] {
            let mut sh = vec![0u8; 64];
            sh[0..4].copy_from_slice(&name.to_le_bytes());
            sh[4..8].copy_from_slice(&ty.to_le_bytes());
            sh[8..16].copy_from_slice(&u64::from(elf::SHF_ALLOC).to_le_bytes());
            sh[0x18..0x20].copy_from_slice(&(o as u64).to_le_bytes());
            sh[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            sh[0x30..0x38].copy_from_slice(&4096u64.to_le_bytes());
            out.extend(sh);
        }
        let h = &mut out[..64];
        h[..4].copy_from_slice(&elf::ELFMAG);
        h[4] = elf::ELFCLASS64;
        h[5] = elf::ELFDATA2LSB;
        h[6] = elf::EV_CURRENT;
        h[0x10..0x12].copy_from_slice(&elf::ET_DYN.to_le_bytes());
        h[0x12..0x14].copy_from_slice(&elf::EM_X86_64.to_le_bytes());
        h[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
        h[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        h[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        h[0x3A..0x3C].copy_from_slice(&64u16.to_le_bytes());
        h[0x3C..0x3E].copy_from_slice(&3u16.to_le_bytes());
        h[0x3E..0x40].copy_from_slice(&2u16.to_le_bytes());
        let info = inspect_library(&out).unwrap();
        assert_eq!(info.hip.len(), 4);
        assert!(info.cuda.is_empty());
        assert_eq!(
            info.hip_targets().iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["gfx1100", "gfx90a", "gfx942"]
        );
        // A section by another name is not read.
        assert!(inspect_library(&elf_with_hip(&section)).unwrap().hip.is_empty());
        // A corrupt bundle is an error of the section.
        let mut bad = out.clone();
        bad[off + 6] = 9;
        match inspect_library(&bad) {
            Err(InspectError::Corrupt { section, .. }) => assert_eq!(section, HIP_FATBIN_SECTION),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fuzzed_hip_inputs_never_panic() {
        let inner = bundle(
            &[
                (HOST_ID, Vec::new()),
                ("hipv4-amdgcn-amd-amdhsa--gfx90a:xnack+", code_object(0x73F, 5, 96)),
                ("hipv4-amdgcn-amd-amdhsa--gfx11-generic", code_object(0x100_0054, 6, 96)),
            ],
            64,
        );
        let mut section = inner.clone();
        for (version, method) in [(2u16, 1u16), (1, 0), (3, 1)] {
            section.resize(section.len().div_ceil(64) * 64, 0);
            section.extend(ccob(version, method, &inner));
        }
        assert_eq!(hip_parse(&section).unwrap().0.len(), 12);
        let mut rng = XorShift(0xD1B5_4A32_D192_ED03);
        let mut outcomes = [0usize; 2];
        for _ in 0..20_000 {
            let m = mutate(&mut rng, &section);
            outcomes[usize::from(hip_parse(&m).is_ok())] += 1;
        }
        assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
        for _ in 0..2_000 {
            let m = mutate(&mut rng, &code_object(0xE4C, 5, 64));
            let _ = AmdCodeObjectHeader::read(&m);
        }
    }
}
