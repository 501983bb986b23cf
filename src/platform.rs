//! The shared vocabulary of platforms: operating systems, CPU architectures and levels,
//! libc families, GPU backends and device-code tokens.
//!
//! Both the release manifest (what a variant needs) and the host facts (what this machine
//! has) are written in these terms, and the resolver compares one with the other. Every
//! type here is a plain value: parsing is pure, `Display` and `FromStr` round-trip, and
//! nothing does I/O.
//!
//! Device-code rules come from `shared/reference/compat-rules.md`: §1.1 for CUDA
//! (`sm_XY`, `sm_XYa`, `sm_XYf`, `compute_XY[a|f]`), §2.1 and §2.2 for AMD target ids and
//! generic targets.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A value in one of this module's types could not be parsed.
///
/// The message names what was read and lists the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} `{value}`: expected {expected}")]
pub struct ParseError {
    /// The kind of value, such as "CUDA architecture".
    pub what: &'static str,
    /// The text that was read (truncated to 80 characters).
    pub value: String,
    /// The accepted forms, for the user.
    pub expected: &'static str,
}

impl ParseError {
    fn new(what: &'static str, value: &str, expected: &'static str) -> Self {
        let value: String = value.chars().take(80).collect();
        Self { what, value, expected }
    }
}

/// Implements `Serialize` / `Deserialize` through `Display` / `FromStr`, so that a value
/// reads and writes the same way in TOML, JSON, environment variables and CLI flags.
macro_rules! serde_via_str {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = std::borrow::Cow::<'de, str>::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// Declares a fieldless enum whose names round-trip through `Display` and `FromStr`.
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $name:ident, $what:literal, $expected:literal {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal $(| $alias:literal)* ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* #[doc = concat!("`", $text, "`")] $variant ),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The canonical name, as written in manifests and host profiles.
            pub fn name(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl FromStr for $name {
            type Err = ParseError;
            fn from_str(s: &str) -> Result<Self, ParseError> {
                match s {
                    $($text $(| $alias)* => Ok($name::$variant),)+
                    _ => Err(ParseError::new($what, s, $expected)),
                }
            }
        }

        serde_via_str!($name);
    };
}

named_enum! {
    /// An operating system.
    Os, "operating system", "one of linux, macos, windows" {
        Linux = "linux",
        MacOs = "macos" | "darwin",
        Windows = "windows",
    }
}

named_enum! {
    /// A CPU instruction-set architecture.
    CpuArch, "CPU architecture", "one of x86_64, aarch64" {
        X86_64 = "x86_64" | "amd64",
        Aarch64 = "aarch64" | "arm64",
    }
}

named_enum! {
    /// The compute backend a variant's code runs on.
    ///
    /// The order is the default preference between backends when a host has several:
    /// accelerators before the CPU.
    Backend, "backend", "one of cpu, cuda, rocm, metal, xpu" {
        Cpu = "cpu",
        Cuda = "cuda",
        Rocm = "rocm",
        Metal = "metal",
        Xpu = "xpu",
    }
}

named_enum! {
    /// The C library a Linux binary was linked against.
    LibcFamily, "libc family", "glibc or musl" {
        Glibc = "glibc",
        Musl = "musl",
    }
}

named_enum! {
    /// How a CUDA variant links the CUDA runtime.
    ///
    /// A static cudart needs only a new-enough driver; a dynamic one also needs a
    /// `libcudart.so.<major>` of the same major and an equal or higher minor in the
    /// process (compat-rules.md §1.2 rule 4).
    CudartLinkage, "cudart linkage", "static or dynamic" {
        Static = "static",
        Dynamic = "dynamic",
    }
}

/// A `major.minor` version, as used for CUDA, ROCm, glibc, musl, macOS and Metal.
///
/// Parses `X`, `X.Y` and `X.Y.Z` (the patch is dropped: no rule here depends on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MajorMinor {
    /// The major version.
    pub major: u32,
    /// The minor version.
    pub minor: u32,
}

impl MajorMinor {
    /// Builds a version from its two parts.
    pub const fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }

    /// Decodes the CUDA driver API's integer form, `1000 * major + 10 * minor`.
    pub const fn from_cuda_int(v: u32) -> Self {
        Self {
            major: v / 1000,
            minor: (v % 1000) / 10,
        }
    }
}

impl fmt::Display for MajorMinor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl FromStr for MajorMinor {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        const EXPECTED: &str = "a version such as 12.8 or 2.28";
        let err = || ParseError::new("version", s, EXPECTED);
        let mut parts = s.trim().split('.');
        let number = |p: Option<&str>| -> Result<Option<u32>, ParseError> {
            match p {
                None => Ok(None),
                Some(p) if !p.is_empty() && p.len() <= 9 && p.bytes().all(|b| b.is_ascii_digit()) => p.parse().map(Some).map_err(|_| err()),
                Some(_) => Err(err()),
            }
        };
        let major = number(parts.next())?.ok_or_else(err)?;
        let minor = number(parts.next())?.unwrap_or(0);
        let _patch = number(parts.next())?;
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(Self { major, minor })
    }
}

serde_via_str!(MajorMinor);

/// An x86-64 micro-architecture level from the x86-64 psABI (compat-rules.md §3.3).
///
/// Levels nest: a v4 machine runs v1, v2, v3 and v4 code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct X86Level(u8);

impl X86Level {
    /// The baseline every x86-64 CPU has.
    pub const V1: X86Level = X86Level(1);
    /// Adds SSE3, SSSE3, SSE4.1, SSE4.2, POPCNT, CMPXCHG16B, LAHF/SAHF.
    pub const V2: X86Level = X86Level(2);
    /// Adds AVX, AVX2, BMI1, BMI2, F16C, FMA, LZCNT, MOVBE.
    pub const V3: X86Level = X86Level(3);
    /// Adds AVX512F, AVX512BW, AVX512CD, AVX512DQ, AVX512VL.
    pub const V4: X86Level = X86Level(4);

    /// The level number, 1 to 4.
    pub const fn number(self) -> u8 {
        self.0
    }

    /// The CPU features (as `std::arch` names them) that a level adds over the one below.
    pub fn added_features(self) -> &'static [&'static str] {
        match self.0 {
            2 => &["cmpxchg16b", "popcnt", "sse3", "sse4.1", "sse4.2", "ssse3"],
            3 => &["avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "lzcnt", "movbe"],
            4 => &["avx512bw", "avx512cd", "avx512dq", "avx512f", "avx512vl"],
            _ => &[],
        }
    }

    /// The highest level whose features are all in `has`.
    pub fn highest_supported(has: impl Fn(&str) -> bool) -> X86Level {
        let mut level = X86Level::V1;
        for next in [X86Level::V2, X86Level::V3, X86Level::V4] {
            if next.added_features().iter().all(|f| has(f)) {
                level = next;
            } else {
                break;
            }
        }
        level
    }
}

impl fmt::Display for X86Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "x86-64-v{}", self.0)
    }
}

impl FromStr for X86Level {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let n = s
            .strip_prefix("x86-64-v")
            .or_else(|| s.strip_prefix("x86_64_v"))
            .or_else(|| s.strip_prefix('v'));
        match n {
            Some("1") => Ok(X86Level::V1),
            Some("2") => Ok(X86Level::V2),
            Some("3") => Ok(X86Level::V3),
            Some("4") => Ok(X86Level::V4),
            _ => Err(ParseError::new(
                "x86-64 level",
                s,
                "one of x86-64-v1, x86-64-v2, x86-64-v3, x86-64-v4",
            )),
        }
    }
}

serde_via_str!(X86Level);

/// A libc with its version: what a variant needs as a floor, or what the host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Libc {
    /// glibc or musl.
    pub family: LibcFamily,
    /// The version: for a variant the minimum, for a host the running one.
    pub version: MajorMinor,
}

impl fmt::Display for Libc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.family, self.version)
    }
}

impl FromStr for Libc {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let err = || ParseError::new("libc", s, "`glibc 2.28` or `musl 1.2`");
        let s2 = s.trim();
        let split = s2.find([' ', '-', '>', '=']).ok_or_else(err)?;
        let family: LibcFamily = s2[..split].parse().map_err(|_| err())?;
        let rest = s2[split..].trim_start_matches([' ', '-', '>', '=']);
        let version: MajorMinor = rest.parse().map_err(|_| err())?;
        Ok(Libc { family, version })
    }
}

serde_via_str!(Libc);

/// The feature class of a CUDA architecture token (compat-rules.md §1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CudaFeatureSet {
    /// `sm_XY`: runs on the same major with an equal or higher minor.
    Baseline,
    /// `sm_XYf` (CUDA 12.9+): the family; same major, equal or higher minor.
    Family,
    /// `sm_XYa` (CUDA 12.0+): this exact compute capability only.
    ArchSpecific,
}

/// One piece of CUDA device code: a cubin (`sm_*`) or PTX (`compute_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CudaArch {
    /// Major compute capability.
    pub major: u32,
    /// Minor compute capability.
    pub minor: u32,
    /// Baseline, family (`f`) or arch-specific (`a`).
    pub set: CudaFeatureSet,
    /// True for PTX (`compute_XY`), false for a cubin (`sm_XY`).
    pub ptx: bool,
}

impl CudaArch {
    /// The compute capability as a pair.
    pub const fn cc(self) -> (u32, u32) {
        (self.major, self.minor)
    }
}

impl fmt::Display for CudaArch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = if self.ptx { "compute" } else { "sm" };
        let suffix = match self.set {
            CudaFeatureSet::Baseline => "",
            CudaFeatureSet::Family => "f",
            CudaFeatureSet::ArchSpecific => "a",
        };
        write!(f, "{prefix}_{}{}{suffix}", self.major, self.minor)
    }
}

impl FromStr for CudaArch {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let err = || {
            ParseError::new(
                "CUDA architecture",
                s,
                "sm_XY, sm_XYa, sm_XYf (cubins) or compute_XY, compute_XYa, compute_XYf (PTX), e.g. sm_90a",
            )
        };
        let (ptx, rest) = if let Some(r) = s.strip_prefix("sm_") {
            (false, r)
        } else if let Some(r) = s.strip_prefix("compute_") {
            (true, r)
        } else {
            return Err(err());
        };
        let (digits, set) = if let Some(d) = rest.strip_suffix('a') {
            (d, CudaFeatureSet::ArchSpecific)
        } else if let Some(d) = rest.strip_suffix('f') {
            (d, CudaFeatureSet::Family)
        } else {
            (rest, CudaFeatureSet::Baseline)
        };
        // XY is 10 * major + minor with a one-digit minor: 75, 90, 100, 103, 120.
        if !(2..=3).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let n: u32 = digits.parse().map_err(|_| err())?;
        if n < 10 {
            return Err(err());
        }
        Ok(CudaArch {
            major: n / 10,
            minor: n % 10,
            set,
            ptx,
        })
    }
}

serde_via_str!(CudaArch);

/// A compute capability of a device, `major.minor`.
pub type ComputeCapability = MajorMinor;

/// The state of an AMD target feature (`xnack`, `sramecc`).
///
/// In a code object's target id it is a requirement; on a device it is the known state,
/// where [`FeatureState::Any`] means "unknown" (sysfs cannot tell the process's xnack mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum FeatureState {
    /// Omitted: the code runs either way / the device state is unknown.
    #[default]
    Any,
    /// `+`: on.
    On,
    /// `-`: off.
    Off,
}

impl FeatureState {
    fn suffix(self) -> &'static str {
        match self {
            FeatureState::Any => "",
            FeatureState::On => "+",
            FeatureState::Off => "-",
        }
    }
}

/// The generic AMD processors of code object v6 and their members (compat-rules.md §2.2).
///
/// Each member is paired with the generic version it was added in; all current families
/// are version 1.
const GENERIC_FAMILIES: &[(&str, &[(&str, u32)])] = &[
    (
        "gfx9-generic",
        &[
            ("gfx900", 1),
            ("gfx902", 1),
            ("gfx904", 1),
            ("gfx906", 1),
            ("gfx909", 1),
            ("gfx90c", 1),
        ],
    ),
    ("gfx9-4-generic", &[("gfx940", 1), ("gfx941", 1), ("gfx942", 1), ("gfx950", 1)]),
    ("gfx10-1-generic", &[("gfx1010", 1), ("gfx1011", 1), ("gfx1012", 1), ("gfx1013", 1)]),
    (
        "gfx10-3-generic",
        &[
            ("gfx1030", 1),
            ("gfx1031", 1),
            ("gfx1032", 1),
            ("gfx1033", 1),
            ("gfx1034", 1),
            ("gfx1035", 1),
            ("gfx1036", 1),
        ],
    ),
    (
        "gfx11-generic",
        &[
            ("gfx1100", 1),
            ("gfx1101", 1),
            ("gfx1102", 1),
            ("gfx1103", 1),
            ("gfx1150", 1),
            ("gfx1151", 1),
            ("gfx1152", 1),
            ("gfx1153", 1),
        ],
    ),
    ("gfx12-generic", &[("gfx1200", 1), ("gfx1201", 1)]),
];

/// The generic version in which `processor` joined the generic target `generic`, if it is
/// a member at all.
pub fn generic_member_since(generic: &str, processor: &str) -> Option<u32> {
    GENERIC_FAMILIES
        .iter()
        .find(|(g, _)| *g == generic)
        .and_then(|(_, members)| members.iter().find(|(p, _)| *p == processor))
        .map(|(_, v)| *v)
}

/// Whether `name` is a generic processor khub knows.
pub fn is_known_generic(name: &str) -> bool {
    GENERIC_FAMILIES.iter().any(|(g, _)| *g == name)
}

/// An AMD GPU target id, `<processor>(:<feature>(+|-))*`, e.g. `gfx942:sramecc+:xnack-`.
///
/// For a generic processor (`gfx11-generic`) the generic version may follow after `@`
/// (`gfx11-generic@1`, khub's spelling of `EF_AMDGPU_GENERIC_VERSION`); it defaults to 1.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AmdTarget {
    /// The processor: `gfx90a`, `gfx1100`, or a generic name such as `gfx11-generic`.
    pub processor: String,
    /// The `xnack` requirement (or device state).
    pub xnack: FeatureState,
    /// The `sramecc` requirement (or device state).
    pub sramecc: FeatureState,
    /// For a generic processor, the generic version (1 to 255); 0 otherwise.
    pub generic_version: u32,
}

impl AmdTarget {
    /// Whether the processor is a generic target.
    pub fn is_generic(&self) -> bool {
        self.generic_version > 0
    }

    /// A plain processor with both features in the "any" state.
    pub fn processor(name: &str) -> Result<Self, ParseError> {
        name.parse::<AmdTarget>().and_then(|t| {
            if t.xnack == FeatureState::Any && t.sramecc == FeatureState::Any {
                Ok(t)
            } else {
                Err(ParseError::new("AMD processor", name, "a processor such as gfx942"))
            }
        })
    }
}

impl fmt::Display for AmdTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Canonical form: features sorted alphabetically (sramecc before xnack).
        f.write_str(&self.processor)?;
        if self.sramecc != FeatureState::Any {
            write!(f, ":sramecc{}", self.sramecc.suffix())?;
        }
        if self.xnack != FeatureState::Any {
            write!(f, ":xnack{}", self.xnack.suffix())?;
        }
        if self.generic_version > 1 {
            write!(f, "@{}", self.generic_version)?;
        }
        Ok(())
    }
}

impl FromStr for AmdTarget {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        const EXPECTED: &str = "a target id such as gfx90a, gfx942:sramecc+:xnack- or gfx11-generic";
        let err = || ParseError::new("AMD target id", s, EXPECTED);
        let (body, version) = match s.split_once('@') {
            Some((b, v)) => {
                let v: u32 = v.parse().map_err(|_| err())?;
                if !(1..=255).contains(&v) {
                    return Err(err());
                }
                (b, Some(v))
            }
            None => (s, None),
        };
        let mut parts = body.split(':');
        let processor = parts.next().unwrap_or_default();
        let valid_processor = processor.len() <= 24
            && processor.starts_with("gfx")
            && processor.len() > 3
            && processor[3..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b'-' || b.is_ascii_lowercase());
        if !valid_processor {
            return Err(err());
        }
        let generic = processor.ends_with("-generic");
        if generic && !is_known_generic(processor) {
            return Err(ParseError::new(
                "AMD generic target",
                s,
                "one of gfx9-generic, gfx9-4-generic, gfx10-1-generic, gfx10-3-generic, gfx11-generic, gfx12-generic",
            ));
        }
        if !generic && (version.is_some() || !processor[3..].bytes().all(|b| b.is_ascii_hexdigit())) {
            return Err(err());
        }
        let mut target = AmdTarget {
            processor: processor.to_owned(),
            xnack: FeatureState::Any,
            sramecc: FeatureState::Any,
            generic_version: if generic { version.unwrap_or(1) } else { 0 },
        };
        let mut seen = BTreeSet::new();
        for feature in parts {
            let (name, state) = match feature.as_bytes().last() {
                Some(b'+') => (&feature[..feature.len() - 1], FeatureState::On),
                Some(b'-') => (&feature[..feature.len() - 1], FeatureState::Off),
                _ => return Err(err()),
            };
            if !seen.insert(name) {
                return Err(err());
            }
            match name {
                "xnack" => target.xnack = state,
                "sramecc" => target.sramecc = state,
                _ => {
                    return Err(ParseError::new(
                        "AMD target feature",
                        s,
                        "only xnack and sramecc, each followed by + or -",
                    ));
                }
            }
        }
        Ok(target)
    }
}

serde_via_str!(AmdTarget);

/// Decodes KFD's `gfx_target_version` (`major*10000 + minor*100 + stepping`) into a
/// processor name: 90010 → gfx90a, 90402 → gfx942, 110501 → gfx1151.
///
/// Returns `None` for 0 (a CPU node) and for values out of range.
pub fn gfx_name_from_target_version(v: u32) -> Option<String> {
    if v == 0 {
        return None;
    }
    let major = v / 10000;
    let minor = (v / 100) % 100;
    let stepping = v % 100;
    if major == 0 || minor > 15 || stepping > 15 {
        return None;
    }
    Some(format!("gfx{major}{minor:x}{stepping:x}"))
}

/// Decodes `HSA_OVERRIDE_GFX_VERSION` (`major.minor.stepping`, decimal parts) into a
/// processor name: `11.0.0` → gfx1100, `9.0.10` → gfx90a.
pub fn gfx_name_from_override(s: &str) -> Result<String, ParseError> {
    let err = || ParseError::new("HSA_OVERRIDE_GFX_VERSION", s, "major.minor.stepping, e.g. 11.0.0 or 9.4.2");
    let parts: Vec<&str> = s.trim().split('.').collect();
    if parts.len() != 3 {
        return Err(err());
    }
    let mut n = [0u32; 3];
    for (slot, p) in n.iter_mut().zip(&parts) {
        if p.is_empty() || p.len() > 4 {
            return Err(err());
        }
        *slot = p.parse().map_err(|_| err())?;
    }
    if n[0] == 0 || n[0] > 99 {
        return Err(err());
    }
    gfx_name_from_target_version(n[0] * 10000 + n[1] * 100 + n[2]).ok_or_else(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_arch_tokens_round_trip() {
        for t in ["sm_80", "sm_90a", "sm_100f", "sm_103a", "compute_90", "compute_120f", "sm_75"] {
            let a: CudaArch = t.parse().unwrap();
            assert_eq!(a.to_string(), t);
        }
        let a: CudaArch = "sm_100f".parse().unwrap();
        assert_eq!((a.major, a.minor, a.set, a.ptx), (10, 0, CudaFeatureSet::Family, false));
    }

    #[test]
    fn cuda_arch_rejects_malformed_tokens() {
        for t in ["sm80", "sm_", "sm_8", "sm_1000", "compute_9x", "sm_90b", "SM_90", "sm_-90", "sm_05"] {
            assert!(t.parse::<CudaArch>().is_err(), "{t} should be rejected");
        }
    }

    #[test]
    fn amd_target_ids_parse_and_canonicalise() {
        let t: AmdTarget = "gfx942:xnack-:sramecc+".parse().unwrap();
        assert_eq!(t.to_string(), "gfx942:sramecc+:xnack-");
        let g: AmdTarget = "gfx11-generic".parse().unwrap();
        assert!(g.is_generic());
        assert_eq!(g.generic_version, 1);
        for bad in [
            "gfx90a:xnack",
            "gfx90a:cumode+",
            "gfx90a:xnack+:xnack-",
            "gfx99-generic",
            "nv90",
            "gfx90a@2",
            "gfx",
        ] {
            assert!(bad.parse::<AmdTarget>().is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn kfd_target_versions_decode() {
        assert_eq!(gfx_name_from_target_version(90010).as_deref(), Some("gfx90a"));
        assert_eq!(gfx_name_from_target_version(90402).as_deref(), Some("gfx942"));
        assert_eq!(gfx_name_from_target_version(110000).as_deref(), Some("gfx1100"));
        assert_eq!(gfx_name_from_target_version(110501).as_deref(), Some("gfx1151"));
        assert_eq!(gfx_name_from_target_version(120001).as_deref(), Some("gfx1201"));
        assert_eq!(gfx_name_from_target_version(0), None);
        assert_eq!(gfx_name_from_override("11.0.0").unwrap(), "gfx1100");
        assert_eq!(gfx_name_from_override("9.0.10").unwrap(), "gfx90a");
        assert!(gfx_name_from_override("eleven").is_err());
    }

    #[test]
    fn versions_and_levels_parse() {
        assert_eq!("12.8".parse::<MajorMinor>().unwrap(), MajorMinor::new(12, 8));
        assert_eq!("2.28.1".parse::<MajorMinor>().unwrap(), MajorMinor::new(2, 28));
        assert_eq!("13".parse::<MajorMinor>().unwrap(), MajorMinor::new(13, 0));
        assert!("1.2.3.4".parse::<MajorMinor>().is_err());
        assert!("".parse::<MajorMinor>().is_err());
        assert!("1.-2".parse::<MajorMinor>().is_err());
        assert_eq!(MajorMinor::from_cuda_int(12080), MajorMinor::new(12, 8));
        assert_eq!("x86-64-v3".parse::<X86Level>().unwrap(), X86Level::V3);
        assert_eq!("glibc 2.28".parse::<Libc>().unwrap().version, MajorMinor::new(2, 28));
        assert_eq!("musl>=1.2".parse::<Libc>().unwrap().family, LibcFamily::Musl);
        assert_eq!("darwin".parse::<Os>().unwrap(), Os::MacOs);
    }

    #[test]
    fn x86_level_from_features() {
        let v3: BTreeSet<&str> = X86Level::V2
            .added_features()
            .iter()
            .chain(X86Level::V3.added_features())
            .copied()
            .collect();
        assert_eq!(X86Level::highest_supported(|f| v3.contains(f)), X86Level::V3);
        assert_eq!(X86Level::highest_supported(|_| false), X86Level::V1);
    }
}
