//! Why a variant was rejected: [`Rejection`], with its fields, and the fieldless
//! [`RejectionKind`] and [`Closeness`] that everything else about a reason derives from.
//!
//! [`Rejection::kind`] is the one match over the reasons (besides the message of
//! [`fmt::Display`], which needs the fields). The code, hint and closeness of a kind are
//! exhaustive matches with no catch-all arm, and the ranking of misses is the declaration
//! order of [`Closeness`], so a new reason does not compile until it is named, explained
//! and ranked.

use std::fmt;

use serde::Serialize;

use super::opt;
use crate::platform::{Backend, CpuArch, LibcFamily, MajorMinor, Os, X86Level};

/// Why a variant cannot run on the host, or was set aside by a preference.
///
/// Variants are declared in the order the checks run. Everything but the fields and the
/// message comes from [`Rejection::kind`]: the code, the hint and the [`Closeness`] that
/// ranks the miss (and its [`Rejection::stage`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all_fields = "kebab-case")]
#[non_exhaustive]
pub enum Rejection {
    /// Another variant was forced by the caller.
    NotSelected {
        /// The forced variant.
        selected: String,
    },
    /// The caller asked for another backend.
    BackendNotPreferred {
        /// The backend asked for.
        want: Backend,
    },
    /// The release speaks a kernel ABI this khub does not.
    AbiUnsupported {
        /// The release's ABI major.
        need: u32,
        /// The ABI major this khub speaks.
        have: u32,
    },
    /// Built for another operating system.
    OsMismatch {
        /// The variant's OS.
        need: Os,
        /// The host's OS.
        have: Os,
    },
    /// Built for another CPU architecture.
    CpuArchMismatch {
        /// The variant's architecture.
        need: CpuArch,
        /// The host's architecture.
        have: CpuArch,
    },
    /// Built against another C library (glibc vs musl), or the host's is unknown.
    LibcMismatch {
        /// The variant's libc.
        need: LibcFamily,
        /// The host's, if known.
        have: Option<LibcFamily>,
    },
    /// Needs a newer glibc (the manylinux rule).
    GlibcTooOld {
        /// The variant's floor.
        need: MajorMinor,
        /// The host's version.
        have: MajorMinor,
    },
    /// Needs a newer musl.
    MuslTooOld {
        /// The variant's floor.
        need: MajorMinor,
        /// The host's version.
        have: MajorMinor,
    },
    /// Needs a newer macOS.
    MacOsTooOld {
        /// The variant's floor.
        need: MajorMinor,
        /// The host's version, if known.
        have: Option<MajorMinor>,
    },
    /// The host has no device of this backend.
    BackendUnavailable {
        /// The variant's backend.
        backend: Backend,
        /// What host detection said.
        why: String,
    },
    /// The driver supports an older CUDA major than the toolkit that built the variant.
    DriverTooOld {
        /// The variant's toolkit.
        need: MajorMinor,
        /// The CUDA version the driver supports.
        have: MajorMinor,
    },
    /// The variant links cudart dynamically and the host process has no CUDA runtime.
    RuntimeMissing {
        /// The runtime it needs.
        need: MajorMinor,
    },
    /// The variant links a cudart of another major than the host process's.
    RuntimeMajorMismatch {
        /// The variant's toolkit.
        need: MajorMinor,
        /// The host's runtime.
        have: MajorMinor,
    },
    /// The variant links a newer cudart minor than the host process has.
    RuntimeTooOld {
        /// The variant's toolkit.
        need: MajorMinor,
        /// The host's runtime.
        have: MajorMinor,
    },
    /// The host's ROCm version is not known.
    RocmVersionUnknown {
        /// The variant's ROCm version.
        need: MajorMinor,
    },
    /// Built for another ROCm major (HIP runtimes of different majors are incompatible).
    RocmMajorMismatch {
        /// The variant's ROCm.
        need: MajorMinor,
        /// The host's ROCm.
        have: MajorMinor,
    },
    /// Built for another ROCm minor, which the publisher did not declare compatible.
    RocmMinorNotDeclared {
        /// The variant's ROCm.
        need: MajorMinor,
        /// The host's ROCm.
        have: MajorMinor,
    },
    /// Built with a Metal language version the host's macOS cannot load.
    MslTooNew {
        /// The macOS that version needs.
        need_macos: MajorMinor,
        /// The host's macOS, if known.
        have: Option<MajorMinor>,
    },
    /// Built with another oneAPI release.
    OneApiMismatch {
        /// The variant's oneAPI.
        need: MajorMinor,
        /// The host's, if known.
        have: Option<MajorMinor>,
    },
    /// Needs a higher x86-64 level.
    CpuLevelTooLow {
        /// The variant's level.
        need: X86Level,
        /// The host's level, if known.
        have: Option<X86Level>,
    },
    /// Needs CPU features the host lacks.
    CpuFeaturesMissing {
        /// The missing features, sorted.
        missing: Vec<String>,
    },
    /// The host's devices of this backend are not known in enough detail to match code.
    DeviceUnknown {
        /// The backend.
        backend: Backend,
    },
    /// Carries arch-specific code (`sm_90a`) for another compute capability of the same
    /// major; arch-specific code never runs on another device.
    ArchSpecificOnly {
        /// The device, e.g. `cuda:0 (9.0)`.
        device: String,
        /// The device code the variant carries.
        have: Vec<String>,
    },
    /// The driver is an older minor of the toolkit's major: minor-version compatibility
    /// applies, but only to cubins, and the variant has only PTX for this device.
    MvcNeedsSass {
        /// The device.
        device: String,
        /// The variant's toolkit.
        toolkit: MajorMinor,
        /// The driver's CUDA version.
        driver: MajorMinor,
    },
    /// Has a code object for the device (exact or generic) whose xnack or sramecc setting does not
    /// match the device's (or the device's state is unknown).
    FeatureMismatch {
        /// The device.
        device: String,
        /// The code objects the variant carries.
        have: Vec<String>,
    },
    /// Carries no device code that runs on the device.
    NoDeviceCode {
        /// The device.
        device: String,
        /// The device code the variant carries.
        have: Vec<String>,
    },
    /// Would only run through JIT compilation, which the caller forbade.
    JitForbidden {
        /// The device.
        device: String,
    },
}

/// How close a rejected variant came to running, farthest first: the declaration order is
/// the ranking (the derived `Ord`), so a greater `Closeness` is a closer miss and sorts
/// first among rejections. Each check step of compat-rules.md §7.2 ([`Closeness::stage`])
/// has one or more of these, ranking the reasons within the step: a glibc that is too old
/// is closer than a wrong libc family; a cubin for another minor is closer than no code for
/// the device at all. Reasons of the same closeness tie; `resolve` orders ties by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Closeness {
    /// Stage 0: set aside by a preference.
    Preference,
    /// Stage 1: another kernel ABI.
    Abi,
    /// Stage 2: another operating system or CPU architecture.
    Platform,
    /// Stage 3: another C library family, or the host's is unknown.
    LibcFamily,
    /// Stage 3: the right C library or macOS, but too old.
    OsTooOld,
    /// Stage 4: no device of the backend.
    BackendMissing,
    /// Stage 5: a driver or toolkit runtime of another major, or of an unknown version; or
    /// a Metal or oneAPI version that does not fit.
    RuntimeMismatch,
    /// Stage 5: the CUDA runtime the variant links is missing, or of another major.
    CudartMismatch,
    /// Stage 5: the CUDA runtime is an older minor.
    CudartTooOld,
    /// Stage 5: another ROCm minor, not declared compatible.
    RocmMinor,
    /// Stage 6: the host CPU's level or features.
    Cpu,
    /// Stage 7: the devices are not known well enough to match code.
    DeviceUnknown,
    /// Stage 7: no code runs on the device.
    NoDeviceCode,
    /// Stage 7: code for the device, but built for another mode of it (arch-specific code
    /// for another minor, another xnack/sramecc setting).
    DeviceMode,
    /// Stage 7: PTX only, and the driver is an older minor than the toolkit, so
    /// minor-version compatibility needs a cubin.
    NeedsCubin,
    /// Stage 8: runs only through JIT compilation, which the caller forbade.
    JitForbidden,
}

impl Closeness {
    /// The check step of compat-rules.md §7.2, 0 to 8: a higher stage is a closer miss.
    pub fn stage(self) -> u8 {
        use Closeness::*;
        match self {
            Preference => 0,
            Abi => 1,
            Platform => 2,
            LibcFamily | OsTooOld => 3,
            BackendMissing => 4,
            RuntimeMismatch | CudartMismatch | CudartTooOld | RocmMinor => 5,
            Cpu => 6,
            DeviceUnknown | NoDeviceCode | DeviceMode | NeedsCubin => 7,
            JitForbidden => 8,
        }
    }
}

/// Which [`Rejection`] a value is, without its fields: one kind per reason, declared in
/// the same order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectionKind {
    /// [`Rejection::NotSelected`].
    NotSelected,
    /// [`Rejection::BackendNotPreferred`].
    BackendNotPreferred,
    /// [`Rejection::AbiUnsupported`].
    AbiUnsupported,
    /// [`Rejection::OsMismatch`].
    OsMismatch,
    /// [`Rejection::CpuArchMismatch`].
    CpuArchMismatch,
    /// [`Rejection::LibcMismatch`].
    LibcMismatch,
    /// [`Rejection::GlibcTooOld`].
    GlibcTooOld,
    /// [`Rejection::MuslTooOld`].
    MuslTooOld,
    /// [`Rejection::MacOsTooOld`].
    MacOsTooOld,
    /// [`Rejection::BackendUnavailable`].
    BackendUnavailable,
    /// [`Rejection::DriverTooOld`].
    DriverTooOld,
    /// [`Rejection::RuntimeMissing`].
    RuntimeMissing,
    /// [`Rejection::RuntimeMajorMismatch`].
    RuntimeMajorMismatch,
    /// [`Rejection::RuntimeTooOld`].
    RuntimeTooOld,
    /// [`Rejection::RocmVersionUnknown`].
    RocmVersionUnknown,
    /// [`Rejection::RocmMajorMismatch`].
    RocmMajorMismatch,
    /// [`Rejection::RocmMinorNotDeclared`].
    RocmMinorNotDeclared,
    /// [`Rejection::MslTooNew`].
    MslTooNew,
    /// [`Rejection::OneApiMismatch`].
    OneApiMismatch,
    /// [`Rejection::CpuLevelTooLow`].
    CpuLevelTooLow,
    /// [`Rejection::CpuFeaturesMissing`].
    CpuFeaturesMissing,
    /// [`Rejection::DeviceUnknown`].
    DeviceUnknown,
    /// [`Rejection::ArchSpecificOnly`].
    ArchSpecificOnly,
    /// [`Rejection::MvcNeedsSass`].
    MvcNeedsSass,
    /// [`Rejection::FeatureMismatch`].
    FeatureMismatch,
    /// [`Rejection::NoDeviceCode`].
    NoDeviceCode,
    /// [`Rejection::JitForbidden`].
    JitForbidden,
}

impl RejectionKind {
    /// How close a rejection of this kind came to running.
    pub fn closeness(self) -> Closeness {
        use RejectionKind::*;
        match self {
            NotSelected | BackendNotPreferred => Closeness::Preference,
            AbiUnsupported => Closeness::Abi,
            OsMismatch | CpuArchMismatch => Closeness::Platform,
            LibcMismatch => Closeness::LibcFamily,
            GlibcTooOld | MuslTooOld | MacOsTooOld => Closeness::OsTooOld,
            BackendUnavailable => Closeness::BackendMissing,
            DriverTooOld | RocmVersionUnknown | RocmMajorMismatch | MslTooNew | OneApiMismatch => Closeness::RuntimeMismatch,
            RuntimeMissing | RuntimeMajorMismatch => Closeness::CudartMismatch,
            RuntimeTooOld => Closeness::CudartTooOld,
            RocmMinorNotDeclared => Closeness::RocmMinor,
            CpuLevelTooLow | CpuFeaturesMissing => Closeness::Cpu,
            DeviceUnknown => Closeness::DeviceUnknown,
            NoDeviceCode => Closeness::NoDeviceCode,
            ArchSpecificOnly | FeatureMismatch => Closeness::DeviceMode,
            MvcNeedsSass => Closeness::NeedsCubin,
            JitForbidden => Closeness::JitForbidden,
        }
    }

    /// The reason's stable name, as in JSON output (`GlibcTooOld`).
    pub fn code(self) -> &'static str {
        use RejectionKind::*;
        match self {
            NotSelected => "NotSelected",
            BackendNotPreferred => "BackendNotPreferred",
            AbiUnsupported => "AbiUnsupported",
            OsMismatch => "OsMismatch",
            CpuArchMismatch => "CpuArchMismatch",
            LibcMismatch => "LibcMismatch",
            GlibcTooOld => "GlibcTooOld",
            MuslTooOld => "MuslTooOld",
            MacOsTooOld => "MacOsTooOld",
            BackendUnavailable => "BackendUnavailable",
            DriverTooOld => "DriverTooOld",
            RuntimeMissing => "RuntimeMissing",
            RuntimeMajorMismatch => "RuntimeMajorMismatch",
            RuntimeTooOld => "RuntimeTooOld",
            RocmVersionUnknown => "RocmVersionUnknown",
            RocmMajorMismatch => "RocmMajorMismatch",
            RocmMinorNotDeclared => "RocmMinorNotDeclared",
            MslTooNew => "MslTooNew",
            OneApiMismatch => "OneApiMismatch",
            CpuLevelTooLow => "CpuLevelTooLow",
            CpuFeaturesMissing => "CpuFeaturesMissing",
            DeviceUnknown => "DeviceUnknown",
            ArchSpecificOnly => "ArchSpecificOnly",
            MvcNeedsSass => "MvcNeedsSass",
            FeatureMismatch => "FeatureMismatch",
            NoDeviceCode => "NoDeviceCode",
            JitForbidden => "JitForbidden",
        }
    }

    /// What would change the outcome, for a user reading why nothing fits.
    pub fn hint(self) -> &'static str {
        use RejectionKind::*;
        match self {
            NotSelected | BackendNotPreferred | JitForbidden => "drop the preference (--prefer) that set this variant aside",
            AbiUnsupported => "use a khub that speaks this kernel ABI, or a release built for ABI 1",
            OsMismatch | CpuArchMismatch => "the publisher needs to build for this platform",
            LibcMismatch | GlibcTooOld | MuslTooOld => {
                "run on a newer distribution, or ask for a build against an older libc (set KHUB_LIBC to simulate another host)"
            }
            MacOsTooOld | MslTooNew => "update macOS, or ask for a build with a lower deployment target",
            BackendUnavailable => "run where that GPU is visible, or simulate one with --host FILE or KHUB_CUDA_ARCH / KHUB_AMD_GPU_ARCH",
            DriverTooOld | MvcNeedsSass => "update the GPU driver, or ask for cubins (sm_XY) for this device",
            RuntimeMissing | RuntimeMajorMismatch | RuntimeTooOld => {
                "load a matching CUDA runtime in the process (set KHUB_CUDA_RUNTIME to declare it), or use a variant with static cudart"
            }
            RocmVersionUnknown => "set KHUB_ROCM_VERSION, or install ROCm so /opt/rocm/.info/version exists",
            RocmMajorMismatch | RocmMinorNotDeclared => "install the ROCm release the variant was built for, or ask for a build for yours",
            OneApiMismatch => "install the oneAPI release the variant was built for",
            CpuLevelTooLow | CpuFeaturesMissing => "ask for a baseline CPU build",
            DeviceUnknown => "set KHUB_CUDA_ARCH or KHUB_AMD_GPU_ARCH to the device's architecture",
            ArchSpecificOnly | NoDeviceCode => "ask the publisher for code for this device (a cubin for its arch, or PTX)",
            FeatureMismatch => "ask for a build with xnack/sramecc left as any, or state the device's mode in KHUB_AMD_GPU_ARCH",
        }
    }
}

impl Rejection {
    /// Which reason this is, without its fields.
    pub fn kind(&self) -> RejectionKind {
        use Rejection::*;
        match self {
            NotSelected { .. } => RejectionKind::NotSelected,
            BackendNotPreferred { .. } => RejectionKind::BackendNotPreferred,
            AbiUnsupported { .. } => RejectionKind::AbiUnsupported,
            OsMismatch { .. } => RejectionKind::OsMismatch,
            CpuArchMismatch { .. } => RejectionKind::CpuArchMismatch,
            LibcMismatch { .. } => RejectionKind::LibcMismatch,
            GlibcTooOld { .. } => RejectionKind::GlibcTooOld,
            MuslTooOld { .. } => RejectionKind::MuslTooOld,
            MacOsTooOld { .. } => RejectionKind::MacOsTooOld,
            BackendUnavailable { .. } => RejectionKind::BackendUnavailable,
            DriverTooOld { .. } => RejectionKind::DriverTooOld,
            RuntimeMissing { .. } => RejectionKind::RuntimeMissing,
            RuntimeMajorMismatch { .. } => RejectionKind::RuntimeMajorMismatch,
            RuntimeTooOld { .. } => RejectionKind::RuntimeTooOld,
            RocmVersionUnknown { .. } => RejectionKind::RocmVersionUnknown,
            RocmMajorMismatch { .. } => RejectionKind::RocmMajorMismatch,
            RocmMinorNotDeclared { .. } => RejectionKind::RocmMinorNotDeclared,
            MslTooNew { .. } => RejectionKind::MslTooNew,
            OneApiMismatch { .. } => RejectionKind::OneApiMismatch,
            CpuLevelTooLow { .. } => RejectionKind::CpuLevelTooLow,
            CpuFeaturesMissing { .. } => RejectionKind::CpuFeaturesMissing,
            DeviceUnknown { .. } => RejectionKind::DeviceUnknown,
            ArchSpecificOnly { .. } => RejectionKind::ArchSpecificOnly,
            MvcNeedsSass { .. } => RejectionKind::MvcNeedsSass,
            FeatureMismatch { .. } => RejectionKind::FeatureMismatch,
            NoDeviceCode { .. } => RejectionKind::NoDeviceCode,
            JitForbidden { .. } => RejectionKind::JitForbidden,
        }
    }

    /// How far the checks got before this rejection, 0 to 8: a higher stage is a closer
    /// miss (compat-rules.md §7.2).
    pub fn stage(&self) -> u8 {
        self.closeness().stage()
    }

    /// How close this miss came to running; closest misses sort first among rejections.
    pub fn closeness(&self) -> Closeness {
        self.kind().closeness()
    }

    /// The reason's name, as in JSON output (`GlibcTooOld`).
    pub fn code(&self) -> &'static str {
        self.kind().code()
    }

    /// What would change the outcome, for a user reading why nothing fits.
    pub fn hint(&self) -> &'static str {
        self.kind().hint()
    }
}

fn list(v: &[String]) -> String {
    if v.is_empty() { "nothing".to_owned() } else { v.join(", ") }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Rejection::*;
        write!(f, "{}: ", self.code())?;
        match self {
            NotSelected { selected } => write!(f, "variant `{selected}` was requested"),
            BackendNotPreferred { want } => write!(f, "backend {want} was requested"),
            AbiUnsupported { need, have } => write!(f, "release speaks kernel ABI {need}, this khub speaks {have}"),
            OsMismatch { need, have } => write!(f, "built for {need}, host is {have}"),
            CpuArchMismatch { need, have } => write!(f, "built for {need}, host is {have}"),
            LibcMismatch { need, have } => write!(f, "built against {need}, host runs {}", opt(have)),
            GlibcTooOld { need, have } => write!(f, "needs glibc {need}, host has {have}"),
            MuslTooOld { need, have } => write!(f, "needs musl {need}, host has {have}"),
            MacOsTooOld { need, have } => write!(f, "needs macOS {need}, host runs {}", opt(have)),
            BackendUnavailable { backend, why } => write!(f, "no {backend} device: {why}"),
            DriverTooOld { need, have } => write!(f, "built with CUDA {need}, driver supports CUDA {have}"),
            RuntimeMissing { need } => write!(
                f,
                "links libcudart.so.{} dynamically ({need}); host has no CUDA runtime",
                need.major
            ),
            RuntimeMajorMismatch { need, have } => write!(f, "links cudart {need}, host runtime is {have} (another major)"),
            RuntimeTooOld { need, have } => write!(f, "links cudart {need}, host runtime is {have}"),
            RocmVersionUnknown { need } => write!(f, "built for ROCm {need}; host ROCm version unknown"),
            RocmMajorMismatch { need, have } => write!(f, "built for ROCm {need}, host runs ROCm {have} (another major)"),
            RocmMinorNotDeclared { need, have } => write!(f, "built for ROCm {need}, host runs ROCm {have}, not declared compatible"),
            MslTooNew { need_macos, have } => write!(f, "Metal library needs macOS {need_macos}, host runs {}", opt(have)),
            OneApiMismatch { need, have } => write!(f, "built with oneAPI {need}, host has {}", opt(have)),
            CpuLevelTooLow { need, have } => write!(f, "needs {need}, host is {}", opt(have)),
            CpuFeaturesMissing { missing } => write!(f, "host CPU lacks {}", missing.join(", ")),
            DeviceUnknown { backend } => write!(f, "the {backend} devices' architectures are unknown"),
            ArchSpecificOnly { device, have } => write!(
                f,
                "{device}: arch-specific code runs only on its exact device; variant has {}",
                list(have)
            ),
            MvcNeedsSass { device, toolkit, driver } => {
                write!(
                    f,
                    "{device}: driver supports CUDA {driver} < toolkit {toolkit}; minor-version compatibility needs a cubin, variant has only PTX"
                )
            }
            FeatureMismatch { device, have } => write!(f, "{device}: xnack/sramecc setting does not match; variant has {}", list(have)),
            NoDeviceCode { device, have } => write!(f, "{device}: no code runs on it; variant has {}", list(have)),
            JitForbidden { device } => write!(f, "{device}: only PTX/SPIR-V would run, and JIT was forbidden"),
        }
    }
}
