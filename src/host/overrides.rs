//! Per-fact overrides: `KHUB_OS`, `KHUB_CPU_LEVEL`, `KHUB_CUDA_ARCH`, … applied on top of
//! probed or profiled facts, each recorded with its variable as the source.

use super::{CudaDevice, CudaHost, Detected, FactSource, HostError, MetalHost, RocmDevice, RocmHost, XpuHost};
use crate::env::*;
use crate::platform::{AmdTarget, CpuArch, Libc, MajorMinor, Os, X86Level, gfx_name_from_override};

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
