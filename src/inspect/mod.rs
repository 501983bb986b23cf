//! Reading a shared library's own facts from its bytes: CPU machine, exported and needed
//! symbols and libraries, glibc floor, musl, and the GPU device code it embeds (CUDA
//! cubins and PTX, AMD code objects).
//!
//! Nothing here runs or loads the library. The work is split by format: `elf` reads the
//! library's own ELF facts and finds the device code sections, `nv_fatbin` parses the
//! NVIDIA ones and `hip_bundle` the AMD one; this module holds the entry points, the
//! report ([`LibraryInfo`]), the error type, and the byte readers and ELF `e_ident`
//! offsets the parsers share.
//!
//! The CUDA part walks the fat binary containers in `.nv_fatbin` and `__nv_relfatbin` as
//! laid out in `shared/reference/binary-formats.md` §1, following the parser checklist of
//! §3: every offset is bounds-checked with checked arithmetic, loop counts are capped,
//! entries must tile their container exactly, and unknown kinds, flags and versions become
//! warnings rather than failures. No input makes any of these modules panic.
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

mod elf;
mod hip_bundle;
mod nv_fatbin;

use std::io::Read;
use std::path::{Path, PathBuf};

pub use elf::inspect_library;
pub use hip_bundle::{
    AmdCodeObjectHeader, CodeObjectFeature, HIP_FATBIN_SECTION, HipCodeObject, HipCompression, HipOffloadKind, MAX_HIP_DECOMPRESSED,
    amdgpu_mach_name, parse_hip_fatbin,
};
pub use nv_fatbin::{CudaCodeEntry, CudaCodeKind, NV_FATBIN_SECTION, NV_RELFATBIN_SECTION, parse_nv_fatbin};

use crate::platform::{AmdTarget, CudaArch, MajorMinor};

/// The largest file [`inspect_file`] reads: 2 GiB.
pub const MAX_FILE_SIZE: u64 = 2 << 30;

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

/// What a shared library is, needs and embeds, read from its bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
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
    /// That version as the symbol writes it (`2.2.5` for `GLIBC_2.2.5`), for display:
    /// [`MajorMinor`] keeps only `2.2`, which is what hosts are compared on.
    pub glibc_floor_version: Option<String>,
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

/// `usize` from a `u64` known to be at most a slice length.
fn to_usize(v: u64) -> usize {
    // Every caller passes a value already checked against a slice length, which is a usize.
    usize::try_from(v).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspect_file_reports_io_errors() {
        let err = inspect_file(Path::new("/nonexistent/khub/libnothing.so")).unwrap_err();
        assert!(matches!(err, InspectError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("libnothing.so"));
    }

    pub(super) struct XorShift(pub(super) u64);

    impl XorShift {
        pub(super) fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        pub(super) fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    pub(super) fn mutate(rng: &mut XorShift, base: &[u8]) -> Vec<u8> {
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
}
