//! The facts of this machine: OS, CPU, libc, and the GPUs a kernel may run on.
//!
//! Design notes:
//! - Facts come from three places, applied in this order, each overriding the one before:
//!   1. probes of this machine ([`probe`]), unless a host profile says `inherit = false`;
//!   2. a host-profile TOML file (`--host FILE` or `KHUB_HOST_PROFILE`);
//!   3. per-fact environment variables (`KHUB_LIBC`, `KHUB_CUDA_ARCH`, …; see [`crate::env`]).
//!
//!   So any machine can be simulated, in tests and when locking for other hosts, and every
//!   fact records where it came from ([`FactSource`]).
//! - No vendor library is linked. NVIDIA facts come from `libcuda.so.1` loaded at run time,
//!   then NVML, then `/proc/driver/nvidia/version`; AMD facts from KFD sysfs. A probe that
//!   loads vendor code is bounded in time and may run in a child process
//!   ([`Isolation`]), so a hung or crashing driver cannot take the host down.
//! - The environment is read once, into an [`Environment`] snapshot; nothing below reads
//!   `std::env` directly, so tests pass values instead of mutating the process.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::platform::{AmdTarget, CpuArch, Libc, MajorMinor, Os, ParseError, X86Level};

pub mod cache;
mod overrides;

use crate::env;
pub mod probe;

pub use crate::env::Environment;

/// Everything the resolver needs to know about a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct HostFacts {
    /// The operating system.
    pub os: Os,
    /// The CPU architecture.
    pub arch: CpuArch,
    /// Linux: the C library and its version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libc: Option<Libc>,
    /// macOS: the OS version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macos: Option<MajorMinor>,
    /// x86-64: the highest micro-architecture level the CPU (and OS) supports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_level: Option<X86Level>,
    /// CPU features, as `std::arch` names them (`avx2`, `avx512f`, `sve2`, …).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub cpu_features: BTreeSet<String>,
    /// NVIDIA: driver, runtime and visible devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda: Option<CudaHost>,
    /// AMD: ROCm version and devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rocm: Option<RocmHost>,
    /// Apple: Metal is available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metal: Option<MetalHost>,
    /// Intel: oneAPI and devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xpu: Option<XpuHost>,
}

/// NVIDIA facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CudaHost {
    /// The CUDA version the loaded driver supports (`cuDriverGetVersion`), e.g. 12.8.
    pub driver: MajorMinor,
    /// The kernel-module driver version string, e.g. `570.124.06`, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kmd: Option<String>,
    /// The CUDA runtime the host process uses, when it has one. Variants that link cudart
    /// dynamically need it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<MajorMinor>,
    /// The visible devices, in `CUDA_VISIBLE_DEVICES` order.
    #[serde(default)]
    pub devices: Vec<CudaDevice>,
}

/// One visible NVIDIA device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CudaDevice {
    /// The device ordinal, as the CUDA driver numbers visible devices.
    pub index: u32,
    /// The compute capability.
    pub cc: MajorMinor,
    /// The marketing name, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// AMD facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RocmHost {
    /// The ROCm user-space version, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<MajorMinor>,
    /// The GPU agents.
    #[serde(default)]
    pub devices: Vec<RocmDevice>,
}

/// One AMD GPU agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RocmDevice {
    /// The processor and, where known, its xnack and sramecc states (`any` = unknown).
    pub target: AmdTarget,
    /// The KFD topology node, when probed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u32>,
}

/// Apple Metal facts.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MetalHost {
    /// GPU families the default device supports (`apple7`, `metal3`, …), when known.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub families: Vec<String>,
}

/// Intel XPU facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct XpuHost {
    /// The oneAPI runtime release, `YYYY.R`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oneapi: Option<MajorMinor>,
    /// Device IP versions, `arch.release.revision`.
    #[serde(default)]
    pub devices: Vec<String>,
}

impl HostFacts {
    /// A bare host of the given OS and architecture: no libc, no GPU, baseline CPU.
    pub fn bare(os: Os, arch: CpuArch) -> Self {
        HostFacts {
            os,
            arch,
            libc: None,
            macos: None,
            cpu_level: (arch == CpuArch::X86_64).then_some(X86Level::V1),
            cpu_features: BTreeSet::new(),
            cuda: None,
            rocm: None,
            metal: None,
            xpu: None,
        }
    }

    /// Detects this machine's facts, then applies the profile and environment overrides
    /// that `options` carries.
    pub fn detect(options: &ProbeOptions) -> Result<Detected, HostError> {
        detect(options)
    }
}

/// Where a fact came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum FactSource {
    /// Probed on this machine, with the method used.
    Probe {
        /// How, e.g. `libcuda.so.1 cuDriverGetVersion`.
        method: String,
    },
    /// Read from a host-profile file.
    Profile {
        /// The file.
        path: PathBuf,
    },
    /// Set by an environment variable.
    Env {
        /// The variable.
        var: String,
    },
    /// Not present on this host, with the reason.
    Absent {
        /// Why: what was tried and what it said.
        why: String,
    },
}

impl fmt::Display for FactSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FactSource::Probe { method } => write!(f, "probe: {method}"),
            FactSource::Profile { path } => write!(f, "profile {}", path.display()),
            FactSource::Env { var } => write!(f, "env {var}"),
            FactSource::Absent { why } => write!(f, "none: {why}"),
        }
    }
}

/// Host facts with the source of each one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Detected {
    /// The facts.
    pub facts: HostFacts,
    /// The source of each fact, keyed by the fact's name (`os`, `libc`, `cuda.devices`, …).
    pub sources: BTreeMap<String, FactSource>,
}

impl Detected {
    fn empty(os: Os, arch: CpuArch) -> Self {
        Detected {
            facts: HostFacts::bare(os, arch),
            sources: BTreeMap::new(),
        }
    }

    fn set_source(&mut self, fact: &str, source: FactSource) {
        self.sources.insert(fact.to_owned(), source);
    }
}

/// How a probe that loads vendor code is isolated from the calling process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Isolation {
    /// On a thread of this process, abandoned when it runs past the timeout. A hang is
    /// bounded; a crash inside the driver is not contained. The driver applies this
    /// process's `CUDA_VISIBLE_DEVICES`, so when the snapshot's value differs the libcuda
    /// probe is skipped (and NVML, which applies the snapshot's, answers instead).
    Thread,
    /// In a child process: this executable run with `args`, which must print the probe's
    /// JSON (the `khub` binary does this for `khub __probe cuda`). Hangs and crashes are
    /// both contained.
    Subprocess {
        /// The helper executable.
        exe: PathBuf,
        /// Its arguments.
        args: Vec<String>,
    },
}

/// How to probe, and which overrides to apply.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// The environment snapshot: overrides and probe settings.
    pub env: Environment,
    /// A host-profile file; `None` falls back to `KHUB_HOST_PROFILE`.
    pub profile: Option<PathBuf>,
    /// The longest a GPU probe may run.
    pub timeout: Duration,
    /// How GPU probes that load vendor code are isolated.
    pub isolation: Isolation,
    /// The root under which `/sys` and `/proc` are read (tests point it at fixtures).
    pub root: PathBuf,
    /// A per-boot cache file for the NVIDIA probe's answer ([`cache`]); `None` (the
    /// default) probes every time. The CLI sets it to [`cache::default_path`] of the cache
    /// directory.
    pub host_cache: Option<PathBuf>,
}

impl ProbeOptions {
    /// Options from the process environment: `KHUB_PROBE_TIMEOUT`, `KHUB_PROBE_HELPER`,
    /// and every per-fact override.
    pub fn from_env() -> Result<Self, HostError> {
        Self::with_env(Environment::capture())
    }

    /// Options from an explicit environment snapshot.
    pub fn with_env(env: Environment) -> Result<Self, HostError> {
        let timeout = match env.get(env::PROBE_TIMEOUT) {
            Some(v) => {
                let secs: f64 = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0 && *s <= 3600.0)
                    .ok_or_else(|| HostError::InvalidEnv {
                        var: env::PROBE_TIMEOUT,
                        value: v.to_owned(),
                        expected: "a number of seconds between 0 and 3600",
                    })?;
                Duration::from_secs_f64(secs)
            }
            None => Duration::from_secs(20),
        };
        let isolation = match env.get(env::PROBE_HELPER) {
            Some(exe) => Isolation::Subprocess {
                exe: PathBuf::from(exe),
                args: vec!["__probe".into(), "cuda".into()],
            },
            None => Isolation::Thread,
        };
        Ok(ProbeOptions {
            profile: None,
            timeout,
            isolation,
            root: PathBuf::from("/"),
            host_cache: None,
            env,
        })
    }
}

/// Host detection failed: a bad override, an unreadable profile, or a probe that errored
/// in a way that is not simply "absent".
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// An environment variable holds a value khub cannot use.
    #[error("environment variable {var}=`{value}` is not valid: expected {expected}")]
    InvalidEnv {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is accepted.
        expected: &'static str,
    },
    /// An environment variable holds a value that does not parse.
    #[error("environment variable {var} is not valid: {source}")]
    EnvParse {
        /// The variable.
        var: &'static str,
        /// The parse failure.
        #[source]
        source: ParseError,
    },
    /// The host-profile file could not be read.
    #[error("cannot read host profile {}: {source}", path.display())]
    ProfileRead {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The host-profile file is not a valid profile.
    #[error("host profile {} is not valid: {message}", path.display())]
    ProfileInvalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// A host-profile file: any subset of [`HostFacts`], plus whether to start from this
/// machine's probed facts.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct HostProfile {
    /// Start from this machine's facts (true) or from nothing (false, the default).
    #[serde(default)]
    inherit: bool,
    /// A free-text description.
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    os: Option<Os>,
    arch: Option<CpuArch>,
    libc: Option<Libc>,
    macos: Option<MajorMinor>,
    cpu_level: Option<X86Level>,
    cpu_features: Option<BTreeSet<String>>,
    cuda: Option<CudaHost>,
    rocm: Option<RocmHost>,
    metal: Option<MetalHost>,
    xpu: Option<XpuHost>,
}

impl HostProfile {
    const MAX_BYTES: u64 = 1024 * 1024;

    fn read(path: &Path) -> Result<Self, HostError> {
        let read_err = |source| HostError::ProfileRead {
            path: path.to_owned(),
            source,
        };
        let len = std::fs::metadata(path).map_err(read_err)?.len();
        if len > Self::MAX_BYTES {
            return Err(HostError::ProfileInvalid {
                path: path.to_owned(),
                message: format!("{len} bytes is over the 1 MiB limit"),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        let profile: HostProfile = toml::from_str(&text).map_err(|e| HostError::ProfileInvalid {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        if !profile.inherit && (profile.os.is_none() || profile.arch.is_none()) {
            return Err(HostError::ProfileInvalid {
                path: path.to_owned(),
                message: "a profile that does not inherit this machine's facts must set `os` and `arch` (or set inherit = true)".into(),
            });
        }
        Ok(profile)
    }

    fn apply(self, d: &mut Detected, path: &Path) -> Result<(), HostError> {
        let src = || FactSource::Profile { path: path.to_owned() };
        let f = &mut d.facts;
        let mut touched: Vec<&str> = Vec::new();
        if let Some(v) = self.os {
            f.os = v;
            touched.push("os");
        }
        if let Some(v) = self.arch {
            f.arch = v;
            touched.push("arch");
        }
        if !self.inherit {
            // A whole machine: clear what the profile leaves out rather than keep defaults
            // that describe nothing.
            f.cpu_level = (f.arch == CpuArch::X86_64).then_some(X86Level::V1);
        }
        macro_rules! take {
            ($($field:ident => $name:literal),*) => {$(
                if let Some(v) = self.$field {
                    f.$field = Some(v);
                    touched.push($name);
                }
            )*};
        }
        take!(libc => "libc", macos => "macos", cpu_level => "cpu-level", cuda => "cuda", rocm => "rocm", metal => "metal", xpu => "xpu");
        if let Some(v) = self.cpu_features {
            f.cpu_features = v;
            touched.push("cpu-features");
        }
        for name in touched {
            d.set_source(name, src());
        }
        Ok(())
    }
}

fn detect(options: &ProbeOptions) -> Result<Detected, HostError> {
    let profile_path = options
        .profile
        .clone()
        .or_else(|| options.env.get(env::HOST_PROFILE).map(PathBuf::from));
    let profile = profile_path.as_deref().map(HostProfile::read).transpose()?;

    let mut d = match &profile {
        Some(p) if !p.inherit => Detected::empty(Os::Linux, CpuArch::X86_64),
        _ => probe::probe_all(options),
    };
    if let (Some(p), Some(path)) = (profile, profile_path.as_deref()) {
        p.apply(&mut d, path)?;
    }
    overrides::apply_overrides(&options.env, &mut d)?;
    Ok(d)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests write scratch files directly
mod tests {
    use super::*;

    fn profile(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn options(env: &[(&str, &str)], profile: Option<PathBuf>) -> ProbeOptions {
        let mut o = ProbeOptions::with_env(Environment::from_pairs(env.iter().copied())).unwrap();
        o.profile = profile;
        o
    }

    const H100: &str = r#"
os = "linux"
arch = "x86_64"
libc = "glibc 2.35"
cpu-level = "x86-64-v4"
[cuda]
driver = "12.8"
devices = [{ index = 0, cc = "9.0", name = "H100" }]
"#;

    #[test]
    fn a_full_profile_replaces_probing() {
        let (_dir, path) = profile(H100);
        let d = HostFacts::detect(&options(&[], Some(path.clone()))).unwrap();
        assert_eq!(d.facts.cuda.as_ref().unwrap().devices[0].cc, MajorMinor::new(9, 0));
        assert_eq!(d.facts.cpu_level, Some(X86Level::V4));
        assert_eq!(d.sources["cuda"], FactSource::Profile { path });
        assert!(d.facts.rocm.is_none());
    }

    #[test]
    fn env_overrides_win_over_the_profile() {
        let (_dir, path) = profile(H100);
        let d = HostFacts::detect(&options(&[("KHUB_CUDA_ARCH", "8.6,8.9"), ("KHUB_LIBC", "glibc 2.27")], Some(path))).unwrap();
        let cuda = d.facts.cuda.unwrap();
        assert_eq!(cuda.devices.iter().map(|d| d.cc.to_string()).collect::<Vec<_>>(), ["8.6", "8.9"]);
        assert_eq!(d.facts.libc.unwrap().version, MajorMinor::new(2, 27));
        assert_eq!(d.sources["libc"], FactSource::Env { var: "KHUB_LIBC".into() });
    }

    #[test]
    fn the_profile_path_can_come_from_the_environment() {
        let (_dir, path) = profile(H100);
        let d = HostFacts::detect(&options(&[("KHUB_HOST_PROFILE", path.to_str().unwrap())], None)).unwrap();
        assert!(d.facts.cuda.is_some());
    }

    #[test]
    fn bad_profiles_are_clear_errors() {
        let (_dir, path) = profile("os = \"linux\"\n");
        let e = HostFacts::detect(&options(&[], Some(path))).unwrap_err().to_string();
        assert!(e.contains("must set `os` and `arch`"), "{e}");
        let (_dir, path) = profile("os = \"linux\"\narch = \"x86_64\"\ngpu = 1\n");
        let e = HostFacts::detect(&options(&[], Some(path))).unwrap_err().to_string();
        assert!(e.contains("gpu"), "{e}");
        let e = HostFacts::detect(&options(&[], Some("/nonexistent/host.toml".into())))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/host.toml"), "{e}");
    }

    #[test]
    fn an_inheriting_profile_keeps_probed_facts() {
        let (_dir, path) = profile("inherit = true\n[rocm]\nversion = \"6.3\"\ndevices = [{ target = \"gfx942\" }]\n");
        let d = HostFacts::detect(&options(&[], Some(path))).unwrap();
        assert_eq!(d.facts.os.name(), std::env::consts::OS);
        assert_eq!(d.facts.rocm.unwrap().devices[0].target.processor, "gfx942");
        assert!(matches!(d.sources["os"], FactSource::Probe { .. }));
    }

    #[test]
    fn bad_timeouts_are_refused() {
        for bad in ["0", "-1", "soon", "NaN"] {
            let e = ProbeOptions::with_env(Environment::from_pairs([("KHUB_PROBE_TIMEOUT", bad)])).unwrap_err();
            assert!(e.to_string().contains("KHUB_PROBE_TIMEOUT"));
        }
    }
}
