//! Variant resolution: a pure function from (manifest, host facts, preferences) to a
//! ranked, explained [`Resolution`].
//!
//! Every variant ends up either [`Verdict::Accepted`] with a [`Score`] or
//! [`Verdict::Rejected`] with a typed [`Rejection`]. The rules follow
//! `shared/reference/compat-rules.md` §7:
//!
//! - Hard constraints are checked in a fixed order (§7.2); the first one that fails is the
//!   variant's reason. [`Rejection::stage`] numbers those steps, so a later stage means the
//!   variant got closer to running; the closest miss is what a user sees when nothing fits.
//! - Accepted variants are ranked lexicographically (§7.3): device-code match quality, then
//!   toolkit version, then CPU specialisation, then specificity, then publisher priority,
//!   and finally the variant id, so the order is total and never depends on hash order or
//!   input order.
//!
//! Nothing here does I/O; the host facts arrive as a value.

use std::cmp::{Ordering, Reverse};
use std::fmt;

use serde::Serialize;

use crate::abi::ABI_MAJOR;
use crate::host::{CudaDevice, HostFacts, RocmDevice};
use crate::manifest::{CudaVariant, Manifest, RocmVariant, Variant, XpuVariant};
use crate::platform::{
    AmdTarget, Backend, CudaArch, CudaFeatureSet, CudartLinkage, FeatureState, Libc, LibcFamily, MajorMinor, X86Level, generic_member_since,
};

mod explain;
mod rejection;

pub use explain::{Explain, ExplainRelease};
pub use rejection::{Closeness, Rejection, RejectionKind};

/// What the caller wants, beyond what the host can run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Preferences {
    /// Only consider variants of this backend.
    pub backend: Option<Backend>,
    /// Only consider the variant with this id.
    pub variant: Option<String>,
    /// Refuse variants whose only way to run is JIT compilation (PTX, SPIR-V).
    pub forbid_jit: bool,
    /// Match device code against this device (an index among the backend's visible
    /// devices) instead of all of them.
    pub device: Option<u32>,
}

/// How well a variant's device code fits the device, best last (compat-rules.md §7.3
/// rule 1). A CPU-only variant has no device code and ranks below every GPU match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceMatch {
    /// Host code only (a CPU variant).
    Cpu,
    /// Runs through the driver's JIT (PTX, SPIR-V).
    Jit,
    /// An AMD generic target (`gfx11-generic`).
    Generic,
    /// A cubin for a lower minor of the same major (`sm_80` on 8.6).
    SameMajorLower,
    /// Native code for exactly this device (`sm_86`, `sm_100f` on 10.0, `gfx942`, Metal,
    /// an XPU AOT binary).
    Exact,
    /// An arch-specific cubin for exactly this device (`sm_90a` on 9.0).
    ArchSpecific,
}

impl DeviceMatch {
    /// A short name for explain output.
    pub fn name(self) -> &'static str {
        match self {
            DeviceMatch::Cpu => "cpu",
            DeviceMatch::Jit => "jit",
            DeviceMatch::Generic => "generic",
            DeviceMatch::SameMajorLower => "same-major",
            DeviceMatch::Exact => "exact",
            DeviceMatch::ArchSpecific => "arch-specific",
        }
    }
}

/// The rank of an accepted variant. Compare with `Ord`: greater is better.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Score {
    /// Device-code match quality (the worst over the devices considered).
    pub device: DeviceMatch,
    /// The device-code entry that matched, such as `sm_90a` or `gfx11-generic`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched: Option<String>,
    /// For JIT matches: how many compute-capability steps the PTX is below the device
    /// (`compute_80` on 9.0 is 10); smaller is better.
    #[serde(skip_serializing_if = "is_zero")]
    pub jit_distance: u32,
    /// AMD only: the exact code object leaves xnack and sramecc as "any".
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub any_features: bool,
    /// The toolkit (CUDA, ROCm, oneAPI) version; 0.0 for CPU variants.
    pub toolkit: MajorMinor,
    /// The x86-64 level the host code needs (0 when none).
    pub cpu_level: u8,
    /// How many extra CPU features the host code needs.
    pub cpu_features: u32,
    /// How many properties the variant constrains.
    pub specificity: u32,
    /// The publisher's priority.
    pub priority: i32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

impl Ord for Score {
    fn cmp(&self, other: &Self) -> Ordering {
        self.device
            .cmp(&other.device)
            .then_with(|| other.jit_distance.cmp(&self.jit_distance))
            .then_with(|| self.any_features.cmp(&other.any_features))
            .then_with(|| self.toolkit.cmp(&other.toolkit))
            .then_with(|| self.cpu_level.cmp(&other.cpu_level))
            .then_with(|| self.cpu_features.cmp(&other.cpu_features))
            .then_with(|| self.specificity.cmp(&other.specificity))
            .then_with(|| self.priority.cmp(&other.priority))
    }
}

impl PartialOrd for Score {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Score {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.device.name())?;
        if let Some(m) = &self.matched {
            write!(f, " {m}")?;
        }
        if self.jit_distance > 0 {
            write!(f, " (-{})", self.jit_distance)?;
        }
        if self.toolkit != MajorMinor::default() {
            write!(f, ", toolkit {}", self.toolkit)?;
        }
        if self.cpu_level > 0 {
            write!(f, ", x86-64-v{}", self.cpu_level)?;
        }
        if self.cpu_features > 0 {
            write!(f, " +{} features", self.cpu_features)?;
        }
        write!(f, ", specificity {}, priority {}", self.specificity, self.priority)
    }
}

fn opt<T: fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "unknown".to_owned(), ToString::to_string)
}

/// The decision for one variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "kebab-case")]
pub enum Verdict {
    /// It runs here, with this rank.
    Accepted {
        /// The rank.
        score: Score,
    },
    /// It does not, or was set aside.
    Rejected {
        /// Why.
        reason: Rejection,
    },
}

/// One variant and its verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Candidate {
    /// The variant's id.
    pub id: String,
    /// Its position in the manifest.
    pub index: usize,
    /// Its backend.
    pub backend: Backend,
    /// The decision.
    #[serde(flatten)]
    pub verdict: Verdict,
}

impl Candidate {
    /// The score, if accepted.
    pub fn score(&self) -> Option<&Score> {
        match &self.verdict {
            Verdict::Accepted { score } => Some(score),
            Verdict::Rejected { .. } => None,
        }
    }

    /// The rejection, if rejected.
    pub fn rejection(&self) -> Option<&Rejection> {
        match &self.verdict {
            Verdict::Accepted { .. } => None,
            Verdict::Rejected { reason } => Some(reason),
        }
    }
}

/// A candidate's place in a [`Resolution`], first first (the derived `Ord`): accepted
/// variants before rejected ones, the greatest [`Score`] first among the accepted, the
/// closest miss ([`Closeness`]) first among the rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Rank<'a> {
    Accepted(Reverse<&'a Score>),
    Rejected(Reverse<Closeness>),
}

impl<'a> Rank<'a> {
    fn of(verdict: &'a Verdict) -> Self {
        match verdict {
            Verdict::Accepted { score } => Rank::Accepted(Reverse(score)),
            Verdict::Rejected { reason } => Rank::Rejected(Reverse(reason.closeness())),
        }
    }
}

/// [`Rank`] as a tuple of integers with the same order (least first), for sorting.
/// Accepted before rejected; among accepted, each [`Score`] field in the order and the
/// direction of `Score::cmp`, negated so that the best comes first; among rejected, the
/// closest miss first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct FlatRank {
    rejected: bool,
    device: Reverse<DeviceMatch>,
    jit_distance: u32,
    any_features: Reverse<bool>,
    toolkit: Reverse<MajorMinor>,
    cpu_level: Reverse<u8>,
    cpu_features: Reverse<u32>,
    specificity: Reverse<u32>,
    priority: Reverse<i32>,
    closeness: Reverse<Closeness>,
}

impl FlatRank {
    fn of(verdict: &Verdict) -> Self {
        match verdict {
            // Destructured field by field, so that a field added to `Score` does not
            // compile here until it has its place in this key (and in `Score::cmp`).
            Verdict::Accepted {
                score:
                    Score {
                        device,
                        matched: _,
                        jit_distance,
                        any_features,
                        toolkit,
                        cpu_level,
                        cpu_features,
                        specificity,
                        priority,
                    },
            } => FlatRank {
                rejected: false,
                device: Reverse(*device),
                jit_distance: *jit_distance,
                any_features: Reverse(*any_features),
                toolkit: Reverse(*toolkit),
                cpu_level: Reverse(*cpu_level),
                cpu_features: Reverse(*cpu_features),
                specificity: Reverse(*specificity),
                priority: Reverse(*priority),
                closeness: Reverse(Closeness::Preference),
            },
            Verdict::Rejected { reason } => FlatRank {
                rejected: true,
                device: Reverse(DeviceMatch::Cpu),
                jit_distance: 0,
                any_features: Reverse(false),
                toolkit: Reverse(MajorMinor::default()),
                cpu_level: Reverse(0),
                cpu_features: Reverse(0),
                specificity: Reverse(0),
                priority: Reverse(0),
                closeness: Reverse(reason.closeness()),
            },
        }
    }
}

/// Every variant of a manifest, best first, with the host facts and preferences used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Resolution {
    /// The kernel's name.
    pub kernel: String,
    /// The release version.
    pub version: String,
    /// Accepted variants (best first), then rejected ones (closest miss first).
    pub candidates: Vec<Candidate>,
    /// The preferences applied.
    pub preferences: Preferences,
}

impl Resolution {
    /// The chosen variant, if any was accepted.
    pub fn best(&self) -> Option<&Candidate> {
        self.candidates.first().filter(|c| c.score().is_some())
    }

    /// The accepted candidates, best first.
    pub fn accepted(&self) -> impl Iterator<Item = &Candidate> {
        self.candidates.iter().filter(|c| c.score().is_some())
    }

    /// When nothing was accepted, the rejection that got furthest.
    pub fn closest_miss(&self) -> Option<&Candidate> {
        if self.best().is_some() {
            return None;
        }
        self.candidates.first()
    }

    /// The chosen variant, or an error naming the closest miss and the host facts used.
    pub fn chosen(&self, host: &HostFacts) -> Result<&Candidate, NoVariantFits> {
        self.best().ok_or_else(|| NoVariantFits {
            kernel: format!("{} {}", self.kernel, self.version),
            closest: self.closest_miss().map(|c| Box::new((c.id.clone(), c.rejection().cloned()))),
            host: describe_host(host),
        })
    }
}

/// No variant of a release runs on the host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no variant of {kernel} runs on this host ({host}){}", closest_text(.closest))]
pub struct NoVariantFits {
    /// The kernel and version.
    pub kernel: String,
    /// The closest miss: the variant id and its rejection.
    pub closest: Option<Box<(String, Option<Rejection>)>>,
    /// The host facts used, in one line.
    pub host: String,
}

fn closest_text(c: &Option<Box<(String, Option<Rejection>)>>) -> String {
    match c.as_deref() {
        Some((id, Some(r))) => format!("; closest: `{id}`, {r}; hint: {}", r.hint()),
        _ => "; the release has no variants".to_owned(),
    }
}

/// One line describing a host, for messages: `linux x86_64, glibc 2.36, x86-64-v3, CUDA
/// 12.8 [9.0]`.
pub fn describe_host(h: &HostFacts) -> String {
    let mut parts = vec![format!("{} {}", h.os, h.arch)];
    if let Some(l) = &h.libc {
        parts.push(l.to_string());
    }
    if let Some(m) = &h.macos {
        parts.push(format!("macOS {m}"));
    }
    if let Some(l) = h.cpu_level {
        parts.push(l.to_string());
    }
    if let Some(c) = &h.cuda {
        let ccs: Vec<String> = c.devices.iter().map(|d| d.cc.to_string()).collect();
        parts.push(format!("CUDA driver {} [{}]", c.driver, ccs.join(", ")));
    }
    if let Some(r) = &h.rocm {
        let gfx: Vec<String> = r.devices.iter().map(|d| d.target.to_string()).collect();
        parts.push(format!("ROCm {} [{}]", opt(&r.version), gfx.join(", ")));
    }
    if h.metal.is_some() {
        parts.push("Metal".to_owned());
    }
    if let Some(x) = &h.xpu {
        parts.push(format!("oneAPI {} [{}]", opt(&x.oneapi), x.devices.join(", ")));
    }
    if h.cuda.is_none() && h.rocm.is_none() && h.metal.is_none() && h.xpu.is_none() {
        parts.push("no GPU".to_owned());
    }
    parts.join(", ")
}

/// Resolves every variant of `manifest` against `host`, best first.
pub fn resolve(manifest: &Manifest, host: &HostFacts, prefs: &Preferences) -> Resolution {
    // Sort small inline keys (the rank as integers, the id borrowed from the manifest, the
    // position) rather than the candidates themselves: no comparison follows a pointer into
    // a score or a rejection, and each candidate is built once, in its final place. Ids are
    // unique (manifest validation), so the order is total and an unstable sort is
    // deterministic.
    let mut verdicts: Vec<Option<Verdict>> = Vec::with_capacity(manifest.variants.len());
    let mut order: Vec<(FlatRank, &str, usize)> = Vec::with_capacity(manifest.variants.len());
    for (index, v) in manifest.variants.iter().enumerate() {
        let verdict = match judge(manifest, v, host, prefs) {
            Ok(score) => Verdict::Accepted { score },
            Err(reason) => Verdict::Rejected { reason },
        };
        order.push((FlatRank::of(&verdict), v.id.as_str(), index));
        verdicts.push(Some(verdict));
    }
    order.sort_unstable();
    // Each position is in `order` once, so every `take` finds its verdict.
    let candidates = order
        .into_iter()
        .filter_map(|(_, id, index)| {
            Some(Candidate {
                id: id.to_owned(),
                index,
                backend: manifest.variants[index].backend,
                verdict: verdicts[index].take()?,
            })
        })
        .collect();
    Resolution {
        kernel: manifest.kernel.name.clone(),
        version: manifest.kernel.version.to_string(),
        candidates,
        preferences: prefs.clone(),
    }
}

/// The variant [`resolve`] would put first, found in one pass: the index in
/// `manifest.variants` of the best accepted variant, or the error
/// [`Resolution::chosen`] gives. Linear in the number of variants, with no candidate list
/// built or sorted: loading needs the winner, not the ranking (explain output does, and
/// calls [`resolve`]).
pub fn choose(manifest: &Manifest, host: &HostFacts, prefs: &Preferences) -> Result<usize, NoVariantFits> {
    choose_among(manifest, host, prefs, |_| true)
}

/// As [`choose`], among the variants `keep` accepts only (a lock's variants, say); the
/// others are neither judged nor reported.
pub fn choose_among(
    manifest: &Manifest,
    host: &HostFacts,
    prefs: &Preferences,
    keep: impl Fn(&Variant) -> bool,
) -> Result<usize, NoVariantFits> {
    // The least (rank, id) so far, as `resolve`'s sort would order them.
    let mut best: Option<(usize, Verdict)> = None;
    for (index, v) in manifest.variants.iter().enumerate() {
        if !keep(v) {
            continue;
        }
        let verdict = match judge(manifest, v, host, prefs) {
            Ok(score) => Verdict::Accepted { score },
            Err(reason) => Verdict::Rejected { reason },
        };
        let better = match &best {
            None => true,
            Some((b, bv)) => (Rank::of(&verdict), v.id.as_str()) < (Rank::of(bv), manifest.variants[*b].id.as_str()),
        };
        if better {
            best = Some((index, verdict));
        }
    }
    match best {
        Some((index, Verdict::Accepted { .. })) => Ok(index),
        other => Err(NoVariantFits {
            kernel: format!("{} {}", manifest.kernel.name, manifest.kernel.version),
            closest: other.map(|(index, verdict)| {
                let reason = match verdict {
                    Verdict::Rejected { reason } => Some(reason),
                    Verdict::Accepted { .. } => None,
                };
                Box::new((manifest.variants[index].id.clone(), reason))
            }),
            host: describe_host(host),
        }),
    }
}

/// Whether `variant` runs on `host`: the cheap yes/no path, which agrees with [`resolve`].
pub fn runs_on(manifest: &Manifest, variant: &Variant, host: &HostFacts) -> bool {
    judge(manifest, variant, host, &Preferences::default()).is_ok()
}

/// Device-code verdict for one device: the match and the token that gave it.
struct DeviceFit {
    tier: DeviceMatch,
    matched: String,
    jit_distance: u32,
    any_features: bool,
}

fn judge(manifest: &Manifest, v: &Variant, host: &HostFacts, prefs: &Preferences) -> Result<Score, Rejection> {
    // Stage 0: preferences that set a variant aside.
    if let Some(selected) = &prefs.variant
        && *selected != v.id
    {
        return Err(Rejection::NotSelected {
            selected: selected.clone(),
        });
    }
    if let Some(want) = prefs.backend
        && want != v.backend
    {
        return Err(Rejection::BackendNotPreferred { want });
    }
    // Stage 1: the kernel ABI.
    if manifest.kernel.abi != ABI_MAJOR {
        return Err(Rejection::AbiUnsupported {
            need: manifest.kernel.abi,
            have: ABI_MAJOR,
        });
    }
    // Stage 2: platform.
    if v.os != host.os {
        return Err(Rejection::OsMismatch { need: v.os, have: host.os });
    }
    if v.arch != host.arch {
        return Err(Rejection::CpuArchMismatch {
            need: v.arch,
            have: host.arch,
        });
    }
    // Stage 3: libc and OS version.
    if let Some(need) = v.libc {
        check_libc(need, host.libc)?;
    }
    if let Some(need) = v.macos_min
        && host.macos.is_none_or(|have| have < need)
    {
        return Err(Rejection::MacOsTooOld { need, have: host.macos });
    }
    // Stages 4 and 5: backend present, runtime versions.
    let toolkit = check_backend_runtime(v, host)?;
    // Stage 6: host CPU.
    if let Some(need) = v.cpu_level
        && host.cpu_level.is_none_or(|have| have < need)
    {
        return Err(Rejection::CpuLevelTooLow {
            need,
            have: host.cpu_level,
        });
    }
    if !v.cpu_features.is_subset(&host.cpu_features) {
        return Err(Rejection::CpuFeaturesMissing {
            missing: v.cpu_features.difference(&host.cpu_features).cloned().collect(),
        });
    }
    // Stages 7 and 8: device code.
    let fit = check_device_code(v, host, prefs)?;
    Ok(Score {
        device: fit.tier,
        matched: (!fit.matched.is_empty()).then_some(fit.matched),
        jit_distance: fit.jit_distance,
        any_features: fit.any_features,
        toolkit,
        cpu_level: v.cpu_level.map_or(0, X86Level::number),
        cpu_features: v.cpu_features.len() as u32,
        specificity: v.specificity(),
        priority: v.priority,
    })
}

fn check_libc(need: Libc, have: Option<Libc>) -> Result<(), Rejection> {
    match have {
        Some(have) if have.family == need.family => {
            if have.version >= need.version {
                Ok(())
            } else if need.family == LibcFamily::Glibc {
                Err(Rejection::GlibcTooOld {
                    need: need.version,
                    have: have.version,
                })
            } else {
                Err(Rejection::MuslTooOld {
                    need: need.version,
                    have: have.version,
                })
            }
        }
        _ => Err(Rejection::LibcMismatch {
            need: need.family,
            have: have.map(|l| l.family),
        }),
    }
}

/// Checks that the backend exists on the host and its runtime versions fit; returns the
/// toolkit version for ranking.
fn check_backend_runtime(v: &Variant, host: &HostFacts) -> Result<MajorMinor, Rejection> {
    let unavailable = |why: &str| Rejection::BackendUnavailable {
        backend: v.backend,
        why: why.to_owned(),
    };
    match (v.backend, &v.cuda, &v.rocm, &v.metal, &v.xpu) {
        (Backend::Cpu, ..) => Ok(MajorMinor::default()),
        (Backend::Cuda, Some(c), ..) => {
            let cuda = host.cuda.as_ref().ok_or_else(|| unavailable("no NVIDIA driver found"))?;
            if cuda.devices.is_empty() {
                return Err(unavailable("the NVIDIA driver reports no visible device"));
            }
            check_cuda_versions(c, cuda.driver, cuda.runtime)?;
            Ok(c.toolkit)
        }
        (Backend::Rocm, _, Some(r), ..) => {
            let rocm = host.rocm.as_ref().ok_or_else(|| unavailable("no AMD GPU found"))?;
            if rocm.devices.is_empty() {
                return Err(unavailable("no AMD GPU agent found"));
            }
            check_rocm_version(r, rocm.version)?;
            Ok(r.version)
        }
        (Backend::Metal, _, _, Some(m), _) => {
            if host.metal.is_none() {
                return Err(unavailable("no Metal device"));
            }
            let need_macos = m.min_macos().unwrap_or(MajorMinor::new(u32::MAX, 0));
            if host.macos.is_none_or(|have| have < need_macos) {
                return Err(Rejection::MslTooNew {
                    need_macos,
                    have: host.macos,
                });
            }
            Ok(m.language)
        }
        (Backend::Xpu, _, _, _, Some(x)) => {
            let xpu = host.xpu.as_ref().ok_or_else(|| unavailable("no Intel GPU found"))?;
            if xpu.devices.is_empty() {
                return Err(unavailable("no Intel GPU device"));
            }
            if xpu.oneapi != Some(x.oneapi) {
                return Err(Rejection::OneApiMismatch {
                    need: x.oneapi,
                    have: xpu.oneapi,
                });
            }
            Ok(x.oneapi)
        }
        // Validation guarantees each backend has its own section.
        _ => Err(unavailable("the variant lacks its backend section")),
    }
}

/// compat-rules.md §1.2: backward compatibility, minor-version compatibility (same major,
/// decided later because it needs cubins), and the dynamic runtime's soname.
fn check_cuda_versions(c: &CudaVariant, driver: MajorMinor, runtime: Option<MajorMinor>) -> Result<(), Rejection> {
    if driver.major < c.toolkit.major {
        return Err(Rejection::DriverTooOld {
            need: c.toolkit,
            have: driver,
        });
    }
    if c.cudart == CudartLinkage::Dynamic {
        match runtime {
            None => return Err(Rejection::RuntimeMissing { need: c.toolkit }),
            Some(have) if have.major != c.toolkit.major => {
                return Err(Rejection::RuntimeMajorMismatch { need: c.toolkit, have });
            }
            Some(have) if have.minor < c.toolkit.minor => return Err(Rejection::RuntimeTooOld { need: c.toolkit, have }),
            Some(_) => {}
        }
    }
    Ok(())
}

/// compat-rules.md §2.5: same major required; another minor only where declared.
fn check_rocm_version(r: &RocmVariant, have: Option<MajorMinor>) -> Result<(), Rejection> {
    let have = have.ok_or(Rejection::RocmVersionUnknown { need: r.version })?;
    if have.major != r.version.major {
        return Err(Rejection::RocmMajorMismatch { need: r.version, have });
    }
    if have != r.version && !r.compatible.contains(&have) {
        return Err(Rejection::RocmMinorNotDeclared { need: r.version, have });
    }
    Ok(())
}

fn check_device_code(v: &Variant, host: &HostFacts, prefs: &Preferences) -> Result<DeviceFit, Rejection> {
    let mut worst: Option<DeviceFit> = None;
    let mut consider = |fit: DeviceFit| {
        let replace = match &worst {
            None => true,
            Some(w) => (fit.tier, std::cmp::Reverse(fit.jit_distance)) < (w.tier, std::cmp::Reverse(w.jit_distance)),
        };
        if replace {
            worst = Some(fit);
        }
    };
    let picked = |i: usize| prefs.device.is_none_or(|d| d as usize == i);
    match v.backend {
        Backend::Cpu => {
            return Ok(DeviceFit {
                tier: DeviceMatch::Cpu,
                matched: String::new(),
                jit_distance: 0,
                any_features: false,
            });
        }
        Backend::Cuda => {
            let (Some(c), Some(cuda)) = (&v.cuda, &host.cuda) else {
                return Err(Rejection::DeviceUnknown { backend: v.backend });
            };
            for (i, dev) in cuda.devices.iter().enumerate().filter(|(i, _)| picked(*i)) {
                consider(cuda_fit(c, dev, cuda.driver, i)?);
            }
        }
        Backend::Rocm => {
            let (Some(r), Some(rocm)) = (&v.rocm, &host.rocm) else {
                return Err(Rejection::DeviceUnknown { backend: v.backend });
            };
            for (i, dev) in rocm.devices.iter().enumerate().filter(|(i, _)| picked(*i)) {
                consider(rocm_fit(r, dev, i)?);
            }
        }
        Backend::Metal => {
            consider(DeviceFit {
                tier: DeviceMatch::Exact,
                matched: v.metal.map(|m| format!("metal {}", m.language)).unwrap_or_default(),
                jit_distance: 0,
                any_features: false,
            });
        }
        Backend::Xpu => {
            let (Some(x), Some(xpu)) = (&v.xpu, &host.xpu) else {
                return Err(Rejection::DeviceUnknown { backend: v.backend });
            };
            for (i, ip) in xpu.devices.iter().enumerate().filter(|(i, _)| picked(*i)) {
                consider(xpu_fit(x, ip, i)?);
            }
        }
    }
    let fit = worst.ok_or_else(|| Rejection::BackendUnavailable {
        backend: v.backend,
        why: format!("device {} is not visible", prefs.device.unwrap_or(0)),
    })?;
    if prefs.forbid_jit && fit.tier == DeviceMatch::Jit {
        return Err(Rejection::JitForbidden {
            device: format!("{}:{}", v.backend, prefs.device.unwrap_or(0)),
        });
    }
    Ok(fit)
}

/// Jetson Thor is compute capability 10.1 under CUDA 12 and 11.0 under CUDA 13: one
/// device, two names. Under a CUDA 13 driver both the device and the code are normalised
/// to 11.0 before matching (compat-rules.md §1.1); under CUDA 12 the plain rules apply.
fn thor_alias(cc: (u32, u32), driver: MajorMinor) -> (u32, u32) {
    if driver.major >= 13 && cc == (10, 1) { (11, 0) } else { cc }
}

/// compat-rules.md §1.1: which cubin or PTX runs on compute capability `dev.cc`.
fn cuda_fit(c: &CudaVariant, dev: &CudaDevice, driver: MajorMinor, i: usize) -> Result<DeviceFit, Rejection> {
    let (m_major, m_minor) = thor_alias((dev.cc.major, dev.cc.minor), driver);
    // PTX is JIT-compiled by the driver, which accepts PTX only from toolkits up to its own
    // version. Below that, minor-version compatibility runs cubins only.
    let ptx_allowed = driver >= c.toolkit;
    let mut best: Option<DeviceFit> = None;
    let (mut arch_specific_elsewhere, mut ptx_blocked) = (false, false);
    for a in &c.code {
        let (x, y) = thor_alias(a.cc(), driver);
        let same_major = m_major == x;
        let fit = match (a.ptx, a.set) {
            (false, CudaFeatureSet::ArchSpecific) if same_major && m_minor == y => Some((DeviceMatch::ArchSpecific, 0)),
            (false, CudaFeatureSet::ArchSpecific) => {
                arch_specific_elsewhere |= same_major;
                None
            }
            (false, _) if same_major && m_minor == y => Some((DeviceMatch::Exact, 0)),
            (false, _) if same_major && m_minor > y => Some((DeviceMatch::SameMajorLower, 0)),
            (false, _) => None,
            (true, set) => {
                let runs = match set {
                    CudaFeatureSet::Baseline => (m_major, m_minor) >= (x, y),
                    CudaFeatureSet::Family => same_major && m_minor >= y,
                    CudaFeatureSet::ArchSpecific => {
                        arch_specific_elsewhere |= same_major && m_minor != y;
                        same_major && m_minor == y
                    }
                };
                if runs && !ptx_allowed {
                    ptx_blocked = true;
                }
                (runs && ptx_allowed).then(|| (DeviceMatch::Jit, (m_major * 10 + m_minor) - (x * 10 + y)))
            }
        };
        if let Some((tier, jit_distance)) = fit {
            let better = best
                .as_ref()
                .is_none_or(|b| (tier, std::cmp::Reverse(jit_distance)) > (b.tier, std::cmp::Reverse(b.jit_distance)));
            if better {
                best = Some(DeviceFit {
                    tier,
                    matched: a.to_string(),
                    jit_distance,
                    any_features: false,
                });
            }
        }
    }
    let device = || format!("cuda:{i} ({})", dev.cc);
    best.ok_or_else(|| {
        let have = || c.code.iter().map(CudaArch::to_string).collect();
        if ptx_blocked {
            Rejection::MvcNeedsSass {
                device: device(),
                toolkit: c.toolkit,
                driver,
            }
        } else if arch_specific_elsewhere {
            Rejection::ArchSpecificOnly {
                device: device(),
                have: have(),
            }
        } else {
            Rejection::NoDeviceCode {
                device: device(),
                have: have(),
            }
        }
    })
}

/// compat-rules.md §2.1 and §2.2: exact processors with matching features, or generic
/// targets whose member list and version admit the processor.
fn rocm_fit(r: &RocmVariant, dev: &RocmDevice, i: usize) -> Result<DeviceFit, Rejection> {
    let mut best: Option<DeviceFit> = None;
    let mut feature_mismatch = false;
    let proc = &dev.target.processor;
    for t in &r.targets {
        // §2.1: a `+`/`-` feature binds every code object, generic ones included.
        let ok = feature_ok(t.xnack, dev.target.xnack) && feature_ok(t.sramecc, dev.target.sramecc);
        let fit = if t.is_generic() {
            let member = generic_member_since(&t.processor, proc).is_some_and(|since| t.generic_version >= since);
            feature_mismatch |= member && !ok;
            (member && ok).then_some((DeviceMatch::Generic, false))
        } else if t.processor == *proc {
            feature_mismatch |= !ok;
            ok.then_some((DeviceMatch::Exact, t.xnack == FeatureState::Any && t.sramecc == FeatureState::Any))
        } else {
            None
        };
        if let Some((tier, any)) = fit {
            let better = best.as_ref().is_none_or(|b| (tier, any) > (b.tier, b.any_features));
            if better {
                best = Some(DeviceFit {
                    tier,
                    matched: t.to_string(),
                    jit_distance: 0,
                    any_features: any,
                });
            }
        }
    }
    best.ok_or_else(|| {
        let device = format!("rocm:{i} ({})", dev.target);
        let have = r.targets.iter().map(AmdTarget::to_string).collect();
        if feature_mismatch {
            Rejection::FeatureMismatch { device, have }
        } else {
            Rejection::NoDeviceCode { device, have }
        }
    })
}

/// A code object's feature requirement against the device's state: "any" runs either way;
/// `+` or `-` needs the device to be known to be in that state.
fn feature_ok(need: FeatureState, have: FeatureState) -> bool {
    need == FeatureState::Any || need == have
}

fn xpu_fit(x: &XpuVariant, ip: &str, i: usize) -> Result<DeviceFit, Rejection> {
    if x.aot.iter().any(|a| a == ip) {
        return Ok(DeviceFit {
            tier: DeviceMatch::Exact,
            matched: ip.to_owned(),
            jit_distance: 0,
            any_features: false,
        });
    }
    if x.spirv {
        return Ok(DeviceFit {
            tier: DeviceMatch::Jit,
            matched: "spirv".to_owned(),
            jit_distance: 0,
            any_features: false,
        });
    }
    Err(Rejection::NoDeviceCode {
        device: format!("xpu:{i} ({ip})"),
        have: x.aot.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flattened sort key orders every pair of verdicts exactly as `Rank` does: each
    /// score field at two values (256 scores, in both directions of every field), and
    /// rejections of four closeness stages.
    #[test]
    fn flat_rank_orders_as_rank_does() {
        let mut verdicts = Vec::new();
        for bits in 0u32..256 {
            let b = |i: u32| (bits >> i) & 1;
            verdicts.push(Verdict::Accepted {
                score: Score {
                    device: if b(0) == 1 { DeviceMatch::Exact } else { DeviceMatch::Jit },
                    matched: None,
                    jit_distance: b(1) * 10,
                    any_features: b(2) == 1,
                    toolkit: MajorMinor {
                        major: 12,
                        minor: 4 + b(3) * 4,
                    },
                    cpu_level: b(4) as u8 * 3,
                    cpu_features: b(5),
                    specificity: b(6) * 2,
                    priority: if b(7) == 1 { -1 } else { 2 },
                },
            });
        }
        for reason in [
            Rejection::NotSelected { selected: "a".into() },
            Rejection::AbiUnsupported { need: 9, have: 1 },
            Rejection::AbiUnsupported { need: 8, have: 1 },
            Rejection::OsMismatch {
                need: crate::platform::Os::MacOs,
                have: crate::platform::Os::Linux,
            },
        ] {
            verdicts.push(Verdict::Rejected { reason });
        }
        for a in &verdicts {
            for b in &verdicts {
                assert_eq!(
                    FlatRank::of(a).cmp(&FlatRank::of(b)),
                    Rank::of(a).cmp(&Rank::of(b)),
                    "{a:?} against {b:?}"
                );
            }
        }
    }
}
