//! The AMD offload bundles of `.hip_fatbin` (binary-formats.md §2): plain
//! `__CLANG_OFFLOAD_BUNDLE__` bundles, compressed `CCOB` bundles (decompressed in memory,
//! capped), entry ids and target ids, and the AMDGPU code objects' ELF headers they are
//! cross-checked against.
//!
//! The tests (bundle and CCOB builders, the malformations of binary-formats.md §3, a fuzz
//! loop) live in `hip_bundle/tests.rs`.

use std::fmt;
use std::io::Read;

use object::elf;

use super::{EI_ABIVERSION, EI_CLASS, EI_DATA, InspectError, corrupt, le_u16, le_u32, le_u64, to_usize};
use crate::platform::{AmdTarget, FeatureState};

/// The ELF section holding HIP offload bundles, one per translation unit (or per link
/// with `-fgpu-rdc`).
pub const HIP_FATBIN_SECTION: &str = ".hip_fatbin";
/// The most bytes one compressed offload bundle may expand to, whatever its header says:
/// 1 GiB.
pub const MAX_HIP_DECOMPRESSED: u64 = 1 << 30;

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
#[serde(rename_all = "kebab-case")]
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
#[serde(rename_all = "kebab-case")]
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
#[serde(rename_all = "kebab-case")]
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
pub(super) mod tests;
