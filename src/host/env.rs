//! Environment variables: the one place khub reads the process environment, and the
//! per-fact overrides.
//!
//! Every variable khub reads is a constant here, documented in `docs/host.md`. An empty
//! value means unset. A value that does not parse is an error naming the variable, the
//! value and the expected form; it never silently falls back to probing.

use std::collections::BTreeMap;

use super::{CudaDevice, CudaHost, Detected, FactSource, HostError, MetalHost, RocmDevice, RocmHost, XpuHost};
use crate::platform::{AmdTarget, CpuArch, Libc, MajorMinor, Os, X86Level, gfx_name_from_override};

/// A host-profile file to read.
pub const HOST_PROFILE: &str = "KHUB_HOST_PROFILE";
/// The longest a GPU probe may run, in seconds (default 20).
pub const PROBE_TIMEOUT: &str = "KHUB_PROBE_TIMEOUT";
/// An executable that runs GPU probes out of process (`khub`).
pub const PROBE_HELPER: &str = "KHUB_PROBE_HELPER";
/// The CUDA driver library to load instead of `libcuda.so.1`.
pub const LIBCUDA: &str = "KHUB_LIBCUDA";
/// The NVML library to load instead of `libnvidia-ml.so.1`.
pub const LIBNVML: &str = "KHUB_LIBNVML";
/// Override: operating system.
pub const OS: &str = "KHUB_OS";
/// Override: CPU architecture.
pub const ARCH: &str = "KHUB_ARCH";
/// Override: libc, `glibc 2.28`, `musl 1.2` or `none`.
pub const LIBC: &str = "KHUB_LIBC";
/// Override: macOS version.
pub const MACOS: &str = "KHUB_MACOS";
/// Override: x86-64 level.
pub const CPU_LEVEL: &str = "KHUB_CPU_LEVEL";
/// Override: CPU features, comma-separated (replaces the probed set).
pub const CPU_FEATURES: &str = "KHUB_CPU_FEATURES";
/// Override: the CUDA version the driver supports, or `none` for no NVIDIA GPU.
pub const CUDA_DRIVER: &str = "KHUB_CUDA_DRIVER";
/// Override: the CUDA runtime in the host process, or `none`.
pub const CUDA_RUNTIME: &str = "KHUB_CUDA_RUNTIME";
/// Override: compute capabilities of the visible devices, comma-separated (`8.6,9.0`).
pub const CUDA_ARCH: &str = "KHUB_CUDA_ARCH";
/// Which NVIDIA devices are visible; honoured by the driver and by the NVML fallback.
pub const CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";
/// Override: the ROCm version.
pub const ROCM_VERSION: &str = "KHUB_ROCM_VERSION";
/// Override: AMD devices as target ids, comma-separated, or `none`.
pub const AMD_GPU_ARCH: &str = "KHUB_AMD_GPU_ARCH";
/// The HSA runtime's ISA override (`11.0.0`): honoured, since the runtime will only load
/// code for the overridden ISA.
pub const HSA_OVERRIDE_GFX_VERSION: &str = "HSA_OVERRIDE_GFX_VERSION";
/// Where ROCm is installed (default `/opt/rocm`).
pub const ROCM_PATH: &str = "ROCM_PATH";
/// Override: Metal availability, `1` or `none`.
pub const METAL: &str = "KHUB_METAL";
/// Override: oneAPI release, `YYYY.R`.
pub const ONEAPI_VERSION: &str = "KHUB_ONEAPI_VERSION";
/// Override: Intel device IP versions, comma-separated, or `none`.
pub const XPU_IP: &str = "KHUB_XPU_IP";

/// The store's root (default `$XDG_CACHE_HOME/khub`, then `$HOME/.cache/khub`).
pub const KHUB_CACHE: &str = "KHUB_CACHE";
/// How long to wait for a store lock, in seconds (default 600).
pub const KHUB_LOCK_TIMEOUT: &str = "KHUB_LOCK_TIMEOUT";
/// The XDG cache directory.
pub const XDG_CACHE_HOME: &str = "XDG_CACHE_HOME";
/// The home directory.
pub const HOME: &str = "HOME";
/// The registry: a Hub-compatible URL or a local directory.
pub const KHUB_REGISTRY: &str = "KHUB_REGISTRY";
/// The Hub endpoint, as huggingface_hub reads it.
pub const HF_ENDPOINT: &str = "HF_ENDPOINT";
/// A registry token; wins over `HF_TOKEN`.
pub const KHUB_TOKEN: &str = "KHUB_TOKEN";
/// The Hub token, as huggingface_hub reads it.
pub const HF_TOKEN: &str = "HF_TOKEN";
/// A file holding the Hub token.
pub const HF_TOKEN_PATH: &str = "HF_TOKEN_PATH";
/// The Hugging Face home directory.
pub const HF_HOME: &str = "HF_HOME";
/// The Hub repository type kernels live in: `kernel` (default) or `model`.
pub const KHUB_REPO_TYPE: &str = "KHUB_REPO_TYPE";
/// The HTTP read timeout, in seconds (default 60).
pub const KHUB_HTTP_TIMEOUT: &str = "KHUB_HTTP_TIMEOUT";
/// Retries per HTTP request (default 3).
pub const KHUB_HTTP_RETRIES: &str = "KHUB_HTTP_RETRIES";
/// Offline mode: resolve from the store and the lock only, never open a socket.
pub const KHUB_OFFLINE: &str = "KHUB_OFFLINE";
/// Offline mode, as huggingface_hub reads it.
pub const HF_HUB_OFFLINE: &str = "HF_HUB_OFFLINE";

/// `khub serve`: the token every read must present.
pub const KHUB_SERVE_READ_TOKEN: &str = "KHUB_SERVE_READ_TOKEN";
/// `khub serve`: the token writes must present.
pub const KHUB_SERVE_WRITE_TOKEN: &str = "KHUB_SERVE_WRITE_TOKEN";

/// The trust policy file (default `$XDG_CONFIG_HOME/khub/trust.toml` when it exists).
pub const KHUB_TRUST_POLICY: &str = "KHUB_TRUST_POLICY";
/// Where khub keeps state that must survive cache purges (rollback protection); default
/// `$XDG_STATE_HOME/khub`, then `$HOME/.local/state/khub`.
pub const KHUB_STATE_DIR: &str = "KHUB_STATE_DIR";
/// The XDG state directory.
pub const XDG_STATE_HOME: &str = "XDG_STATE_HOME";
/// The XDG config directory.
pub const XDG_CONFIG_HOME: &str = "XDG_CONFIG_HOME";
/// The password of a signing key, for `khub keygen` and `khub sign`.
pub const KHUB_SIGNING_PASSWORD: &str = "KHUB_SIGNING_PASSWORD";

/// Every variable khub reads, for the snapshot and the documentation.
pub const ALL: &[&str] = &[
    HOST_PROFILE,
    PROBE_TIMEOUT,
    PROBE_HELPER,
    LIBCUDA,
    LIBNVML,
    OS,
    ARCH,
    LIBC,
    MACOS,
    CPU_LEVEL,
    CPU_FEATURES,
    CUDA_DRIVER,
    CUDA_RUNTIME,
    CUDA_ARCH,
    CUDA_VISIBLE_DEVICES,
    ROCM_VERSION,
    AMD_GPU_ARCH,
    HSA_OVERRIDE_GFX_VERSION,
    ROCM_PATH,
    METAL,
    ONEAPI_VERSION,
    XPU_IP,
    KHUB_CACHE,
    KHUB_LOCK_TIMEOUT,
    XDG_CACHE_HOME,
    HOME,
    KHUB_REGISTRY,
    HF_ENDPOINT,
    KHUB_TOKEN,
    HF_TOKEN,
    HF_TOKEN_PATH,
    HF_HOME,
    KHUB_REPO_TYPE,
    KHUB_HTTP_TIMEOUT,
    KHUB_HTTP_RETRIES,
    KHUB_OFFLINE,
    HF_HUB_OFFLINE,
    KHUB_SERVE_READ_TOKEN,
    KHUB_SERVE_WRITE_TOKEN,
    KHUB_TRUST_POLICY,
    KHUB_STATE_DIR,
    XDG_STATE_HOME,
    XDG_CONFIG_HOME,
    KHUB_SIGNING_PASSWORD,
];

/// A snapshot of the environment variables khub reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Environment {
    vars: BTreeMap<String, String>,
}

impl Environment {
    /// Reads every variable in [`ALL`] from the process environment, once.
    pub fn capture() -> Self {
        Self::from_pairs(ALL.iter().filter_map(|k| std::env::var(k).ok().map(|v| (*k, v))))
    }

    /// An empty snapshot: no overrides.
    pub fn empty() -> Self {
        Self::default()
    }

    /// A snapshot from explicit pairs (tests, embedding hosts).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        Environment {
            vars: pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
        }
    }

    /// The value of `var`, or `None` when it is unset or empty. `CUDA_VISIBLE_DEVICES` is
    /// the exception: set but empty means "no device", so use [`Environment::get_raw`].
    pub fn get(&self, var: &str) -> Option<&str> {
        self.vars.get(var).map(String::as_str).filter(|v| !v.trim().is_empty())
    }

    /// The value of `var` exactly as set, empty included.
    pub fn get_raw(&self, var: &str) -> Option<&str> {
        self.vars.get(var).map(String::as_str)
    }

    /// Sets a variable in the snapshot.
    pub fn set(&mut self, var: impl Into<String>, value: impl Into<String>) {
        self.vars.insert(var.into(), value.into());
    }

    /// The pairs, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

fn parse<T: std::str::FromStr<Err = crate::platform::ParseError>>(var: &'static str, v: &str) -> Result<T, HostError> {
    v.trim().parse().map_err(|source| HostError::EnvParse { var, source })
}

fn list<T: std::str::FromStr<Err = crate::platform::ParseError>>(var: &'static str, v: &str) -> Result<Vec<T>, HostError> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| parse(var, s))
        .collect()
}

fn is_none(v: &str) -> bool {
    matches!(v.trim(), "none" | "0" | "false")
}

/// Applies every per-fact override in `env` to `d`, recording the variable as the source.
pub(crate) fn apply_overrides(env: &Environment, d: &mut Detected) -> Result<(), HostError> {
    let src = |var: &str| FactSource::Env { var: var.to_owned() };
    let f = &mut d.facts;
    let mut touched: Vec<(&str, &str)> = Vec::new();

    if let Some(v) = env.get(OS) {
        f.os = parse::<Os>(OS, v)?;
        touched.push(("os", OS));
    }
    if let Some(v) = env.get(ARCH) {
        f.arch = parse::<CpuArch>(ARCH, v)?;
        touched.push(("arch", ARCH));
    }
    if let Some(v) = env.get(LIBC) {
        f.libc = if is_none(v) { None } else { Some(parse::<Libc>(LIBC, v)?) };
        touched.push(("libc", LIBC));
    }
    if let Some(v) = env.get(MACOS) {
        f.macos = if is_none(v) { None } else { Some(parse::<MajorMinor>(MACOS, v)?) };
        touched.push(("macos", MACOS));
    }
    if let Some(v) = env.get(CPU_LEVEL) {
        f.cpu_level = Some(parse::<X86Level>(CPU_LEVEL, v)?);
        touched.push(("cpu-level", CPU_LEVEL));
    }
    if let Some(v) = env.get(CPU_FEATURES) {
        f.cpu_features = v.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect();
        touched.push(("cpu-features", CPU_FEATURES));
    }

    // NVIDIA. The driver version and the device list can each be set alone; setting either
    // on a host without an NVIDIA GPU creates one.
    match env.get(CUDA_DRIVER) {
        Some(v) if is_none(v) => {
            f.cuda = None;
            touched.push(("cuda", CUDA_DRIVER));
        }
        Some(v) => {
            let driver = parse::<MajorMinor>(CUDA_DRIVER, v)?;
            f.cuda.get_or_insert_with(|| empty_cuda(driver)).driver = driver;
            touched.push(("cuda.driver", CUDA_DRIVER));
        }
        None => {}
    }
    if let Some(v) = env.get(CUDA_ARCH) {
        let ccs: Vec<MajorMinor> = if is_none(v) { Vec::new() } else { list(CUDA_ARCH, v)? };
        let Some(cuda) = f.cuda.as_mut() else {
            return Err(HostError::InvalidEnv {
                var: CUDA_ARCH,
                value: v.to_owned(),
                expected: "devices of a host with a CUDA driver: set KHUB_CUDA_DRIVER too (e.g. 12.8) when simulating one",
            });
        };
        cuda.devices = ccs
            .into_iter()
            .enumerate()
            .map(|(i, cc)| CudaDevice {
                index: i as u32,
                cc,
                name: None,
            })
            .collect();
        touched.push(("cuda.devices", CUDA_ARCH));
    }
    if let Some(v) = env.get(CUDA_RUNTIME)
        && let Some(cuda) = f.cuda.as_mut()
    {
        cuda.runtime = if is_none(v) {
            None
        } else {
            Some(parse::<MajorMinor>(CUDA_RUNTIME, v)?)
        };
        touched.push(("cuda.runtime", CUDA_RUNTIME));
    }

    // AMD.
    if let Some(v) = env.get(AMD_GPU_ARCH) {
        if is_none(v) {
            f.rocm = None;
        } else {
            let targets: Vec<AmdTarget> = list(AMD_GPU_ARCH, v)?;
            if let Some(t) = targets.iter().find(|t| t.is_generic()) {
                return Err(HostError::InvalidEnv {
                    var: AMD_GPU_ARCH,
                    value: t.to_string(),
                    expected: "real processors such as gfx942; a device is never a generic target",
                });
            }
            let rocm = f.rocm.get_or_insert_with(|| RocmHost {
                version: None,
                devices: Vec::new(),
            });
            rocm.devices = targets.into_iter().map(|target| RocmDevice { target, node: None }).collect();
        }
        touched.push(("rocm.devices", AMD_GPU_ARCH));
    }
    if let Some(v) = env.get(HSA_OVERRIDE_GFX_VERSION)
        && let Some(rocm) = f.rocm.as_mut()
    {
        let name = gfx_name_from_override(v).map_err(|source| HostError::EnvParse {
            var: HSA_OVERRIDE_GFX_VERSION,
            source,
        })?;
        for dev in &mut rocm.devices {
            dev.target.processor = name.clone();
        }
        touched.push(("rocm.devices", HSA_OVERRIDE_GFX_VERSION));
    }
    if let Some(v) = env.get(ROCM_VERSION) {
        let version = if is_none(v) {
            None
        } else {
            Some(parse::<MajorMinor>(ROCM_VERSION, v)?)
        };
        f.rocm
            .get_or_insert_with(|| RocmHost {
                version: None,
                devices: Vec::new(),
            })
            .version = version;
        touched.push(("rocm.version", ROCM_VERSION));
    }

    // Apple and Intel.
    if let Some(v) = env.get(METAL) {
        f.metal = if is_none(v) { None } else { Some(MetalHost::default()) };
        touched.push(("metal", METAL));
    }
    if let Some(v) = env.get(ONEAPI_VERSION) {
        let oneapi = if is_none(v) {
            None
        } else {
            Some(parse::<MajorMinor>(ONEAPI_VERSION, v)?)
        };
        f.xpu
            .get_or_insert_with(|| XpuHost {
                oneapi: None,
                devices: Vec::new(),
            })
            .oneapi = oneapi;
        touched.push(("xpu.oneapi", ONEAPI_VERSION));
    }
    if let Some(v) = env.get(XPU_IP) {
        if is_none(v) {
            f.xpu = None;
        } else {
            let ips: Vec<String> = v.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect();
            f.xpu
                .get_or_insert_with(|| XpuHost {
                    oneapi: None,
                    devices: Vec::new(),
                })
                .devices = ips;
        }
        touched.push(("xpu.devices", XPU_IP));
    }

    for (fact, var) in touched {
        d.set_source(fact, src(var));
    }
    Ok(())
}

fn empty_cuda(driver: MajorMinor) -> CudaHost {
    CudaHost {
        driver,
        kmd: None,
        runtime: None,
        devices: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostFacts;
    use crate::platform::FeatureState;

    fn apply(pairs: &[(&str, &str)]) -> Result<Detected, HostError> {
        let mut d = Detected {
            facts: HostFacts::bare(Os::Linux, CpuArch::X86_64),
            sources: Default::default(),
        };
        apply_overrides(&Environment::from_pairs(pairs.iter().copied()), &mut d).map(|()| d)
    }

    #[test]
    fn empty_values_mean_unset() {
        let d = apply(&[("KHUB_LIBC", ""), ("KHUB_CUDA_DRIVER", "  ")]).unwrap();
        assert!(d.facts.cuda.is_none() && d.sources.is_empty());
    }

    #[test]
    fn bad_values_name_the_variable_and_the_form() {
        let e = apply(&[("KHUB_LIBC", "glibc two")]).unwrap_err().to_string();
        assert!(e.contains("KHUB_LIBC") && e.contains("glibc 2.28"), "{e}");
        let e = apply(&[("KHUB_CUDA_ARCH", "8.6,sm90")]).unwrap_err().to_string();
        assert!(e.contains("KHUB_CUDA_ARCH") && e.contains("sm90"), "{e}");
        let e = apply(&[("KHUB_AMD_GPU_ARCH", "gfx11-generic")]).unwrap_err().to_string();
        assert!(e.contains("never a generic"), "{e}");
        let e = apply(&[("KHUB_AMD_GPU_ARCH", "gfx1100"), ("HSA_OVERRIDE_GFX_VERSION", "11")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("HSA_OVERRIDE_GFX_VERSION"), "{e}");
    }

    #[test]
    fn hsa_override_rewrites_the_processor() {
        let d = apply(&[("KHUB_AMD_GPU_ARCH", "gfx1103:xnack-"), ("HSA_OVERRIDE_GFX_VERSION", "11.0.0")]).unwrap();
        let t = &d.facts.rocm.unwrap().devices[0].target;
        assert_eq!(t.processor, "gfx1100");
        assert_eq!(t.xnack, FeatureState::Off);
    }

    #[test]
    fn none_removes_a_gpu() {
        let e = apply(&[("KHUB_CUDA_ARCH", "9.0"), ("KHUB_CUDA_DRIVER", "none")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("KHUB_CUDA_DRIVER"), "{e}");
        let d = apply(&[("KHUB_CUDA_ARCH", "9.0"), ("KHUB_CUDA_DRIVER", "12.4")]).unwrap();
        assert_eq!(d.facts.cuda.unwrap().devices[0].cc, MajorMinor::new(9, 0));
        let d = apply(&[("KHUB_CUDA_DRIVER", "none")]).unwrap();
        assert!(d.facts.cuda.is_none());
    }
}
