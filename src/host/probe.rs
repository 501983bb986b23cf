//! Probes of this machine. Nothing here links a vendor library.
//!
//! Order, per fact (the first source that answers wins; a source that is absent or fails
//! is recorded and the next one is tried):
//! - CPU: `std::arch` feature detection (which also checks that the OS saves AVX state).
//! - libc: `gnu_get_libc_version()` in a glibc build; the musl loader's banner in a musl
//!   build.
//! - NVIDIA: 1. `libcuda.so.1` (`cuInit`, `cuDriverGetVersion`, `cuDeviceGetCount`,
//!   compute capability per visible device), isolated and bounded in time; 2. NVML
//!   (`libnvidia-ml.so.1`) for the driver and devices, filtered by `CUDA_VISIBLE_DEVICES`;
//!   3. `/proc/driver/nvidia/version` for the kernel-module version, mapped to the highest
//!   CUDA it supports (devices stay unknown).
//! - AMD: KFD topology in sysfs (`gfx_target_version` per node), then
//!   `HSA_OVERRIDE_GFX_VERSION` (applied with the other overrides). The ROCm user-space
//!   version from 1. `$ROCM_PATH/.info/version` (default `/opt/rocm`), 2. the file name of
//!   the HIP runtime (`libamdhip64.so.6.3.60301`) in the usual library directories. Nothing
//!   is loaded: the HIP runtime need not be installed, and a broken one cannot hang a probe.
//!
//! Parsers are pure functions over captured text, tested on samples.

use std::collections::BTreeSet;
use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{CudaDevice, CudaHost, Detected, FactSource, Isolation, ProbeOptions, RocmDevice, RocmHost};
use crate::env::{self, Environment};
use crate::platform::{AmdTarget, CpuArch, FeatureState, Libc, LibcFamily, MajorMinor, Os, X86Level, gfx_name_from_target_version};

/// Probes everything, recording the source of each fact.
pub(crate) fn probe_all(options: &ProbeOptions) -> Detected {
    let (os, arch) = (this_os(), this_arch());
    let mut d = Detected::empty(os, arch);
    let probe = |m: &str| FactSource::Probe { method: m.to_owned() };
    d.set_source("os", probe("compile target"));
    d.set_source("arch", probe("compile target"));

    let (level, features) = cpu_features();
    d.facts.cpu_level = level;
    d.facts.cpu_features = features;
    d.set_source("cpu-features", probe("std::arch feature detection"));
    if level.is_some() {
        d.set_source("cpu-level", probe("x86-64 psABI levels over detected features"));
    }

    match libc_version() {
        Ok((libc, how)) => {
            d.facts.libc = Some(libc);
            d.set_source("libc", probe(how));
        }
        Err(why) if os == Os::Linux => d.set_source("libc", FactSource::Absent { why }),
        Err(_) => {}
    }

    if os == Os::MacOs {
        match macos_version() {
            Ok(v) => {
                d.facts.macos = Some(v);
                d.set_source("macos", probe("sysctl kern.osproductversion"));
                if arch == CpuArch::Aarch64 {
                    // Every Apple-silicon Mac has a Metal GPU.
                    d.facts.metal = Some(super::MetalHost::default());
                    d.set_source("metal", probe("Apple silicon"));
                }
            }
            Err(why) => d.set_source("macos", FactSource::Absent { why }),
        }
    }

    if os == Os::Linux {
        probe_nvidia_cached(options, &mut d);
        probe_amd(options, &mut d);
    } else if !d.sources.contains_key("metal") {
        d.set_source(
            "cuda",
            FactSource::Absent {
                why: format!("GPU probes are implemented for Linux; this is {os}"),
            },
        );
    }
    d
}

fn this_os() -> Os {
    match std::env::consts::OS {
        "macos" => Os::MacOs,
        "windows" => Os::Windows,
        _ => Os::Linux,
    }
}

/// The architecture this process runs on.
pub fn this_arch() -> CpuArch {
    match std::env::consts::ARCH {
        "aarch64" => CpuArch::Aarch64,
        _ => CpuArch::X86_64,
    }
}

/// The x86-64 level and the feature set, or aarch64 features.
pub fn cpu_features() -> (Option<X86Level>, BTreeSet<String>) {
    let mut set = BTreeSet::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! detect {
            ($($f:tt),*) => {$(
                if std::arch::is_x86_feature_detected!($f) {
                    set.insert($f.to_owned());
                }
            )*};
        }
        detect!(
            "sse3",
            "ssse3",
            "sse4.1",
            "sse4.2",
            "popcnt",
            "cmpxchg16b",
            "avx",
            "avx2",
            "bmi1",
            "bmi2",
            "f16c",
            "fma",
            "lzcnt",
            "movbe",
            "avx512f",
            "avx512bw",
            "avx512cd",
            "avx512dq",
            "avx512vl",
            "avx512vnni",
            "avx512bf16",
            "avx512fp16",
            "avxvnni",
            "sha",
            "aes",
            "pclmulqdq",
            "xsave"
        );
        let level = X86Level::highest_supported(|f| set.contains(f));
        (Some(level), set)
    }
    #[cfg(target_arch = "aarch64")]
    {
        macro_rules! detect {
            ($($f:tt),*) => {$(
                if std::arch::is_aarch64_feature_detected!($f) {
                    set.insert($f.to_owned());
                }
            )*};
        }
        detect!(
            "asimd", "fp16", "dotprod", "sve", "sve2", "i8mm", "bf16", "sha2", "sha3", "aes", "crc", "lse", "rcpc", "fhm", "sme"
        );
        (None, set)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        (None, set)
    }
}

/// The C library this process runs on, and how it was found.
pub fn libc_version() -> Result<(Libc, &'static str), String> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: gnu_get_libc_version takes no arguments and returns a pointer to a static,
        // NUL-terminated string owned by glibc.
        let text = unsafe { CStr::from_ptr(libc::gnu_get_libc_version()) };
        let text = text.to_str().map_err(|e| format!("gnu_get_libc_version: {e}"))?;
        let version: MajorMinor = text.parse().map_err(|e| format!("gnu_get_libc_version: {e}"))?;
        Ok((
            Libc {
                family: LibcFamily::Glibc,
                version,
            },
            "gnu_get_libc_version()",
        ))
    }
    #[cfg(all(target_os = "linux", target_env = "musl"))]
    {
        musl_version().map(|version| {
            (
                Libc {
                    family: LibcFamily::Musl,
                    version,
                },
                "musl loader banner",
            )
        })
    }
    #[cfg(not(all(target_os = "linux", any(target_env = "gnu", target_env = "musl"))))]
    {
        Err("not a Linux build".to_owned())
    }
}

#[cfg(all(target_os = "linux", target_env = "musl"))]
fn musl_version() -> Result<MajorMinor, String> {
    let loader = std::fs::read_dir("/lib")
        .map_err(|e| format!("/lib: {e}"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("ld-musl-")))
        .ok_or("no /lib/ld-musl-*.so.1")?;
    let out = Command::new(&loader).output().map_err(|e| format!("{}: {e}", loader.display()))?;
    parse_musl_banner(&String::from_utf8_lossy(&out.stderr)).ok_or_else(|| "no version in the musl loader banner".to_owned())
}

/// Reads `Version 1.2.4` from the banner the musl loader prints when run bare.
pub fn parse_musl_banner(text: &str) -> Option<MajorMinor> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Version "))
        .and_then(|v| v.trim().parse().ok())
}

fn macos_version() -> Result<MajorMinor, String> {
    let out = Command::new("sysctl")
        .args(["-n", "kern.osproductversion"])
        .output()
        .map_err(|e| format!("sysctl: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|e| format!("sysctl kern.osproductversion: {e}"))
}

/// What the CUDA driver reports, as the probe helper prints it in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CudaProbe {
    /// `cuDriverGetVersion`.
    pub driver: MajorMinor,
    /// The visible devices.
    pub devices: Vec<CudaDevice>,
    /// The library that answered.
    pub library: String,
}

/// [`probe_nvidia`] through the per-boot cache, when `options` names one.
fn probe_nvidia_cached(options: &ProbeOptions, d: &mut Detected) {
    let Some(path) = &options.host_cache else {
        probe_nvidia(options, d);
        return;
    };
    let key = super::cache::key(options);
    if let Some(key) = &key
        && super::cache::apply(path, key, d)
    {
        return;
    }
    if probe_nvidia(options, d)
        && let Some(key) = &key
    {
        super::cache::record(path, key, d);
    }
}

/// Probes the NVIDIA driver into `d`. Returns whether the answer is definite (the driver
/// answered, or nothing NVIDIA is installed), and so may be cached for this boot; a timeout,
/// a crash or a half-working driver is not.
fn probe_nvidia(options: &ProbeOptions, d: &mut Detected) -> bool {
    let probe = |m: String| FactSource::Probe { method: m };
    let mut tried = Vec::new();
    // Whether each step found its library or file absent (rather than failing).
    let mut all_absent = true;

    match run_isolated_cuda_probe(options) {
        Ok(p) => {
            let method = format!("{} (cuDriverGetVersion, cuDeviceGetAttribute)", p.library);
            d.facts.cuda = Some(CudaHost {
                driver: p.driver,
                kmd: read_kmd_version(&options.root),
                runtime: None,
                devices: p.devices,
            });
            d.set_source("cuda.driver", probe(method.clone()));
            d.set_source("cuda.devices", probe(method));
            return true;
        }
        Err(why) => {
            all_absent &= why.starts_with(&format!("{} not loaded", options.env.get(env::LIBCUDA).unwrap_or("libcuda.so.1")));
            tried.push(why);
        }
    }

    match nvml_probe(&options.env) {
        Ok(p) => {
            // Keep why libcuda did not answer: NVML is the fallback, and says less.
            let method = format!("{} (nvmlSystemGetCudaDriverVersion_v2; after {})", p.library, tried.join("; "));
            d.facts.cuda = Some(CudaHost {
                driver: p.driver,
                kmd: read_kmd_version(&options.root),
                runtime: None,
                devices: p.devices,
            });
            d.set_source("cuda.driver", probe(method.clone()));
            d.set_source("cuda.devices", probe(method));
            return true;
        }
        Err(why) => {
            all_absent &= why.starts_with(&format!(
                "{} not loaded",
                options.env.get(env::LIBNVML).unwrap_or("libnvidia-ml.so.1")
            ));
            tried.push(why);
        }
    }

    let proc_path = options.root.join("proc/driver/nvidia/version");
    match std::fs::read_to_string(&proc_path) {
        Ok(text) => match parse_proc_nvidia_version(&text).and_then(|kmd| Some((cuda_for_kmd(&kmd)?, kmd))) {
            Some((driver, kmd)) => {
                d.facts.cuda = Some(CudaHost {
                    driver,
                    kmd: Some(kmd.clone()),
                    runtime: None,
                    devices: Vec::new(),
                });
                d.set_source(
                    "cuda.driver",
                    probe(format!("{} (kernel module {kmd}; lower bound)", proc_path.display())),
                );
                d.set_source(
                    "cuda.devices",
                    FactSource::Absent {
                        why: format!(
                            "compute capabilities unknown without libcuda or NVML ({}); set KHUB_CUDA_ARCH",
                            tried.join("; ")
                        ),
                    },
                );
                return false;
            }
            None => {
                all_absent = false;
                tried.push(format!("{}: no driver version found", proc_path.display()));
            }
        },
        Err(e) => {
            all_absent &= e.kind() == std::io::ErrorKind::NotFound;
            tried.push(format!("{}: {e}", proc_path.display()));
        }
    }
    d.set_source("cuda", FactSource::Absent { why: tried.join("; ") });
    all_absent
}

fn read_kmd_version(root: &Path) -> Option<String> {
    std::fs::read_to_string(root.join("proc/driver/nvidia/version"))
        .ok()
        .and_then(|t| parse_proc_nvidia_version(&t))
}

/// A loader error with its cause (libloading keeps `dlerror()` in `source`).
fn dl_error(e: &libloading::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// Runs the libcuda probe under the configured isolation and time bound.
fn run_isolated_cuda_probe(options: &ProbeOptions) -> Result<CudaProbe, String> {
    let lib = options.env.get(env::LIBCUDA).unwrap_or("libcuda.so.1").to_owned();
    match &options.isolation {
        Isolation::Thread => {
            // In this process the driver applies the process's own CUDA_VISIBLE_DEVICES
            // (read once, at cuInit), which the snapshot cannot change. When the two
            // differ, an in-process answer would describe other devices: decline, so the
            // NVML fallback (which applies the snapshot's value) or a helper process is used.
            let live = env::var_os_raw(env::CUDA_VISIBLE_DEVICES);
            let wanted = options.env.get_raw(env::CUDA_VISIBLE_DEVICES);
            if live.as_deref() != wanted.map(std::ffi::OsStr::new) {
                return Err(format!(
                    "{lib}: not probed in this process: the driver would apply the process's CUDA_VISIBLE_DEVICES ({}), not the snapshot's ({}); a probe helper (KHUB_PROBE_HELPER) applies the snapshot's",
                    live.as_deref().map_or("(unset)".into(), |v| format!("`{}`", v.to_string_lossy())),
                    wanted.map_or("(unset)".into(), |v| format!("`{v}`")),
                ));
            }
            let (tx, rx) = mpsc::channel();
            let spawned = std::thread::Builder::new().name("khub-cuda-probe".into()).spawn(move || {
                let _ = tx.send(cuda_driver_probe(&lib));
            });
            if let Err(e) = spawned {
                return Err(format!("cannot start the probe thread: {e}"));
            }
            match rx.recv_timeout(options.timeout) {
                Ok(r) => r,
                // The thread is abandoned; it holds nothing of ours.
                Err(_) => Err(format!(
                    "libcuda probe did not answer within {:?} (KHUB_PROBE_TIMEOUT)",
                    options.timeout
                )),
            }
        }
        Isolation::Subprocess { exe, args } => run_helper(exe, args, &options.env, options.timeout),
    }
}

fn run_helper(exe: &Path, args: &[String], env: &Environment, timeout: Duration) -> Result<CudaProbe, String> {
    let mut cmd = Command::new(exe);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    // The child sees the variables the probe uses, from the snapshot, not the parent's
    // live environment.
    for var in [env::LIBCUDA, env::CUDA_VISIBLE_DEVICES] {
        cmd.env_remove(var);
        if let Some(v) = env.get_raw(var) {
            cmd.env(var, v);
        }
    }
    let mut child = cmd.spawn().map_err(|e| format!("cannot run probe helper {}: {e}", exe.display()))?;
    let mut stdout = child.stdout.take().ok_or("probe helper has no stdout")?;
    // Read stdout on a thread so a full pipe cannot block the child, and hand the result
    // over a channel so a grandchild holding the pipe open cannot block us.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.by_ref().take(1 << 20).read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "libcuda probe did not answer within {timeout:?} and was killed (KHUB_PROBE_TIMEOUT)"
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("probe helper: {e}")),
        }
    };
    let out = rx
        .recv_timeout(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100)))
        .map_err(|_| "probe helper exited but its output never closed".to_owned())?;
    if !status.success() {
        return Err(format!("libcuda probe helper failed ({status})"));
    }
    let r: Result<CudaProbe, String> =
        serde_json::from_slice(&out).map_err(|e| format!("probe helper printed something that is not a probe result: {e}"))?;
    r
}

/// The probe helper's entry: runs the libcuda probe in this process and returns the JSON
/// to print (`Ok` or `Err` with the reason, both as JSON).
pub fn cuda_probe_helper_main(env: &Environment) -> String {
    let lib = env.get(env::LIBCUDA).unwrap_or("libcuda.so.1");
    let r = cuda_driver_probe(lib);
    serde_json::to_string(&r).unwrap_or_else(|e| format!("{{\"Err\":\"cannot encode the probe result: {e}\"}}"))
}

// The driver API's types, from cuda.h: CUresult is an int, CUdevice an int.
type CuInit = unsafe extern "C" fn(c_uint) -> c_int;
type CuDriverGetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
type CuDeviceGetCount = unsafe extern "C" fn(*mut c_int) -> c_int;
type CuDeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
type CuDeviceGetAttribute = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int;
type CuDeviceGetName = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;

const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: c_int = 75;
const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: c_int = 76;
const CUDA_ERROR_NO_DEVICE: c_int = 100;

/// Loads the CUDA driver library and asks it for its version and visible devices.
///
/// The driver itself applies `CUDA_VISIBLE_DEVICES`. The library is never unloaded: a
/// driver keeps threads and state that do not survive `dlclose`.
pub fn cuda_driver_probe(lib: &str) -> Result<CudaProbe, String> {
    // SAFETY: loading the driver runs its initialisers; that is the point of the probe, and
    // it runs on a dedicated thread or process bounded in time by the caller.
    let library = unsafe { libloading::Library::new(lib) }.map_err(|e| format!("{lib} not loaded: {}", dl_error(&e)))?;
    let library: &'static libloading::Library = Box::leak(Box::new(library));
    // SAFETY (all symbol lookups): the types match the declarations in cuda.h for these
    // driver API entry points, which have kept these C signatures since CUDA 2.0.
    let sym = |name: &[u8]| -> Result<*const c_void, String> {
        unsafe { library.get::<*const c_void>(name) }
            .map(|s| *s)
            .map_err(|e| format!("{lib}: missing {}: {e}", String::from_utf8_lossy(&name[..name.len() - 1])))
    };
    // SAFETY: each pointer was found under the name of a function with exactly this type.
    let (init, get_version, get_count, get, attr, name) = unsafe {
        (
            std::mem::transmute::<*const c_void, CuInit>(sym(b"cuInit\0")?),
            std::mem::transmute::<*const c_void, CuDriverGetVersion>(sym(b"cuDriverGetVersion\0")?),
            std::mem::transmute::<*const c_void, CuDeviceGetCount>(sym(b"cuDeviceGetCount\0")?),
            std::mem::transmute::<*const c_void, CuDeviceGet>(sym(b"cuDeviceGet\0")?),
            std::mem::transmute::<*const c_void, CuDeviceGetAttribute>(sym(b"cuDeviceGetAttribute\0")?),
            std::mem::transmute::<*const c_void, CuDeviceGetName>(sym(b"cuDeviceGetName\0")?),
        )
    };
    let mut version: c_int = 0;
    // SAFETY: the out-pointer is a valid local.
    let rc = unsafe { get_version(&mut version) };
    if rc != 0 || version <= 0 {
        return Err(format!("{lib}: cuDriverGetVersion failed (CUresult {rc})"));
    }
    let driver = MajorMinor::from_cuda_int(version as u32);
    // SAFETY: cuInit takes flags, which must be 0.
    let rc = unsafe { init(0) };
    if rc == CUDA_ERROR_NO_DEVICE {
        return Ok(CudaProbe {
            driver,
            devices: Vec::new(),
            library: lib.to_owned(),
        });
    }
    if rc != 0 {
        return Err(format!("{lib}: cuInit failed (CUresult {rc})"));
    }
    let mut count: c_int = 0;
    // SAFETY: valid out-pointer, after a successful cuInit.
    let rc = unsafe { get_count(&mut count) };
    if rc != 0 {
        return Err(format!("{lib}: cuDeviceGetCount failed (CUresult {rc})"));
    }
    let mut devices = Vec::new();
    for ordinal in 0..count.clamp(0, 1024) {
        let (mut dev, mut major, mut minor) = (0, 0, 0);
        let mut buf = [0 as c_char; 256];
        // SAFETY: valid out-pointers; `ordinal` is below the count the driver returned; the
        // name buffer's length is passed and the driver NUL-terminates within it.
        let ok = unsafe {
            get(&mut dev, ordinal) == 0
                && attr(&mut major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev) == 0
                && attr(&mut minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev) == 0
        };
        if !ok || major < 0 || minor < 0 {
            return Err(format!("{lib}: cannot read the compute capability of device {ordinal}"));
        }
        // SAFETY: as above; the last byte stays 0 so the buffer is always terminated.
        let dev_name = unsafe {
            (name(buf.as_mut_ptr(), (buf.len() - 1) as c_int, dev) == 0)
                .then(|| CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned())
        };
        devices.push(CudaDevice {
            index: ordinal as u32,
            cc: MajorMinor::new(major as u32, minor as u32),
            name: dev_name,
        });
    }
    Ok(CudaProbe {
        driver,
        devices,
        library: lib.to_owned(),
    })
}

type NvmlInit = unsafe extern "C" fn() -> c_int;
type NvmlGetCudaDriverVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
type NvmlDeviceGetCount = unsafe extern "C" fn(*mut c_uint) -> c_int;
type NvmlDeviceGetHandleByIndex = unsafe extern "C" fn(c_uint, *mut *mut c_void) -> c_int;
type NvmlDeviceGetCc = unsafe extern "C" fn(*mut c_void, *mut c_int, *mut c_int) -> c_int;
type NvmlDeviceGetString = unsafe extern "C" fn(*mut c_void, *mut c_char, c_uint) -> c_int;

/// Asks NVML for the driver's CUDA version and the devices, then applies
/// `CUDA_VISIBLE_DEVICES` (which NVML ignores) by index or UUID.
///
/// NVML creates no CUDA context and does not hang in practice, so it runs in process.
pub fn nvml_probe(env: &Environment) -> Result<CudaProbe, String> {
    let lib = env.get(env::LIBNVML).unwrap_or("libnvidia-ml.so.1");
    // SAFETY: as for libcuda: loading runs NVML's initialisers.
    let library = unsafe { libloading::Library::new(lib) }.map_err(|e| format!("{lib} not loaded: {}", dl_error(&e)))?;
    let library: &'static libloading::Library = Box::leak(Box::new(library));
    let sym = |name: &[u8]| -> Result<*const c_void, String> {
        // SAFETY: the symbol is read as an opaque pointer, then given its nvml.h type.
        unsafe { library.get::<*const c_void>(name) }
            .map(|s| *s)
            .map_err(|e| format!("{lib}: missing {}: {e}", String::from_utf8_lossy(&name[..name.len() - 1])))
    };
    // SAFETY: each type matches nvml.h for the named entry point.
    let (init, version, count, handle, cc, uuid, name) = unsafe {
        (
            std::mem::transmute::<*const c_void, NvmlInit>(sym(b"nvmlInit_v2\0")?),
            std::mem::transmute::<*const c_void, NvmlGetCudaDriverVersion>(sym(b"nvmlSystemGetCudaDriverVersion_v2\0")?),
            std::mem::transmute::<*const c_void, NvmlDeviceGetCount>(sym(b"nvmlDeviceGetCount_v2\0")?),
            std::mem::transmute::<*const c_void, NvmlDeviceGetHandleByIndex>(sym(b"nvmlDeviceGetHandleByIndex_v2\0")?),
            std::mem::transmute::<*const c_void, NvmlDeviceGetCc>(sym(b"nvmlDeviceGetCudaComputeCapability\0")?),
            std::mem::transmute::<*const c_void, NvmlDeviceGetString>(sym(b"nvmlDeviceGetUUID\0")?),
            std::mem::transmute::<*const c_void, NvmlDeviceGetString>(sym(b"nvmlDeviceGetName\0")?),
        )
    };
    // SAFETY: nvmlInit_v2 takes no arguments.
    let rc = unsafe { init() };
    if rc != 0 {
        return Err(format!("{lib}: nvmlInit_v2 failed (nvmlReturn {rc})"));
    }
    let mut v: c_int = 0;
    // SAFETY: valid out-pointer after a successful init.
    let rc = unsafe { version(&mut v) };
    if rc != 0 || v <= 0 {
        return Err(format!("{lib}: nvmlSystemGetCudaDriverVersion_v2 failed (nvmlReturn {rc})"));
    }
    let mut n: c_uint = 0;
    // SAFETY: valid out-pointer.
    if unsafe { count(&mut n) } != 0 {
        return Err(format!("{lib}: nvmlDeviceGetCount_v2 failed"));
    }
    let mut all = Vec::new();
    for i in 0..n.min(1024) {
        let mut h: *mut c_void = std::ptr::null_mut();
        let (mut major, mut minor) = (0, 0);
        let mut ubuf = [0 as c_char; 96];
        let mut nbuf = [0 as c_char; 96];
        // SAFETY: valid out-pointers; the handle comes from NVML for an index below its
        // count; string buffers are passed with their length minus the kept final NUL.
        let ok = unsafe {
            handle(i, &mut h) == 0 && cc(h, &mut major, &mut minor) == 0 && uuid(h, ubuf.as_mut_ptr(), (ubuf.len() - 1) as c_uint) == 0
        };
        if !ok {
            return Err(format!("{lib}: cannot read device {i}"));
        }
        // SAFETY: as above.
        let dev_name = unsafe {
            (name(h, nbuf.as_mut_ptr(), (nbuf.len() - 1) as c_uint) == 0)
                .then(|| CStr::from_ptr(nbuf.as_ptr()).to_string_lossy().into_owned())
        };
        // SAFETY: the buffer's last byte is 0.
        let uuid = unsafe { CStr::from_ptr(ubuf.as_ptr()) }.to_string_lossy().into_owned();
        all.push((uuid, MajorMinor::new(major.max(0) as u32, minor.max(0) as u32), dev_name));
    }
    let uuids: Vec<&str> = all.iter().map(|(u, _, _)| u.as_str()).collect();
    let visible = visible_devices(env.get_raw(env::CUDA_VISIBLE_DEVICES), &uuids);
    let devices = visible
        .into_iter()
        .enumerate()
        .map(|(ordinal, i)| CudaDevice {
            index: ordinal as u32,
            cc: all[i].1,
            name: all[i].2.clone(),
        })
        .collect();
    Ok(CudaProbe {
        driver: MajorMinor::from_cuda_int(v as u32),
        devices,
        library: lib.to_owned(),
    })
}

/// Applies `CUDA_VISIBLE_DEVICES` to physical devices identified by UUID, returning the
/// physical indices in visible order.
///
/// The driver's rules: unset means all; entries are indices or (prefixes of) UUIDs; the
/// list stops at the first entry that is invalid or names no device; a repeated device
/// ends the list too.
pub fn visible_devices(cvd: Option<&str>, uuids: &[&str]) -> Vec<usize> {
    let Some(cvd) = cvd else {
        return (0..uuids.len()).collect();
    };
    let mut out = Vec::new();
    for entry in cvd.split(',').map(str::trim) {
        let found = if let Ok(i) = entry.parse::<usize>() {
            (i < uuids.len()).then_some(i)
        } else if entry.starts_with("GPU-") || entry.starts_with("MIG-") {
            let matches: Vec<usize> = (0..uuids.len()).filter(|&i| uuids[i].starts_with(entry)).collect();
            (matches.len() == 1).then(|| matches[0])
        } else {
            None
        };
        match found {
            Some(i) if !out.contains(&i) => out.push(i),
            _ => break,
        }
    }
    out
}

/// Extracts the driver version from `/proc/driver/nvidia/version`:
/// `NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.144.03  Release Build …`.
pub fn parse_proc_nvidia_version(text: &str) -> Option<String> {
    let line = text.lines().find(|l| l.starts_with("NVRM version:"))?;
    line.split_whitespace()
        .find(|w| {
            let parts: Vec<&str> = w.split('.').collect();
            parts.len() >= 2 && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(str::to_owned)
}

/// The minimum Linux driver for each CUDA toolkit release (the toolkit release notes'
/// table "CUDA Toolkit and Corresponding Driver Versions", GA releases), newest first.
type CudaForDriver = ((u32, u32), (u32, u32, u32));
const LINUX_DRIVER_FOR_CUDA: &[CudaForDriver] = &[
    ((13, 0), (580, 65, 6)),
    ((12, 9), (575, 51, 3)),
    ((12, 8), (570, 26, 0)),
    ((12, 6), (560, 28, 3)),
    ((12, 5), (555, 42, 2)),
    ((12, 4), (550, 54, 14)),
    ((12, 3), (545, 23, 6)),
    ((12, 2), (535, 54, 3)),
    ((12, 1), (530, 30, 2)),
    ((12, 0), (525, 60, 13)),
    ((11, 8), (520, 61, 5)),
    ((11, 7), (515, 43, 4)),
    ((11, 6), (510, 39, 1)),
    ((11, 5), (495, 29, 5)),
    ((11, 4), (470, 42, 1)),
    ((11, 3), (465, 19, 1)),
    ((11, 2), (460, 27, 3)),
    ((11, 1), (455, 23, 5)),
    ((11, 0), (450, 36, 6)),
];

/// The highest CUDA version a kernel-module driver version supports, from the table above.
/// A lower bound: a forward-compatibility user-mode driver may support more.
pub fn cuda_for_kmd(kmd: &str) -> Option<MajorMinor> {
    let mut it = kmd.split('.').map(|p| p.parse::<u32>());
    let v = (it.next()?.ok()?, it.next().unwrap_or(Ok(0)).ok()?, it.next().unwrap_or(Ok(0)).ok()?);
    LINUX_DRIVER_FOR_CUDA
        .iter()
        .find(|(_, min)| v >= *min)
        .map(|((a, b), _)| MajorMinor::new(*a, *b))
}

fn probe_amd(options: &ProbeOptions, d: &mut Detected) {
    let nodes = options.root.join("sys/class/kfd/kfd/topology/nodes");
    match kfd_devices(&nodes) {
        Ok(devices) if devices.is_empty() => {
            d.set_source(
                "rocm",
                FactSource::Absent {
                    why: format!("{}: no GPU node", nodes.display()),
                },
            );
        }
        Ok(devices) => {
            let rocm_path = options.env.get(env::ROCM_PATH).map(PathBuf::from);
            let version = rocm_user_space_version(&options.root, rocm_path.as_deref());
            d.facts.rocm = Some(RocmHost {
                version: version.as_ref().ok().map(|(v, _)| *v),
                devices,
            });
            d.set_source(
                "rocm.devices",
                FactSource::Probe {
                    method: format!("{} gfx_target_version", nodes.display()),
                },
            );
            d.set_source(
                "rocm.version",
                match version {
                    Ok((_, method)) => FactSource::Probe { method },
                    Err(why) => FactSource::Absent {
                        why: format!("{why}; set KHUB_ROCM_VERSION"),
                    },
                },
            );
        }
        Err(why) => d.set_source("rocm", FactSource::Absent { why }),
    }
}

/// Reads the GPU agents from a KFD topology directory (`…/topology/nodes`). CPU nodes
/// (`gfx_target_version 0`) are skipped. Nodes come in numeric order.
pub fn kfd_devices(nodes: &Path) -> Result<Vec<RocmDevice>, String> {
    let entries = std::fs::read_dir(nodes).map_err(|e| format!("{}: {e}", nodes.display()))?;
    let mut ids: Vec<u32> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    ids.sort_unstable();
    let mut out = Vec::new();
    for id in ids {
        let path = nodes.join(id.to_string()).join("properties");
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        if let Some(processor) = parse_kfd_properties(&text) {
            out.push(RocmDevice {
                target: AmdTarget {
                    processor,
                    xnack: FeatureState::Any,
                    sramecc: FeatureState::Any,
                    generic_version: 0,
                },
                node: Some(id),
            });
        }
    }
    Ok(out)
}

/// The processor name of a KFD node's `properties` file, or `None` for a CPU node.
pub fn parse_kfd_properties(text: &str) -> Option<String> {
    let value = |key: &str| -> Option<u32> {
        text.lines().find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some(key)).then(|| it.next()?.parse().ok()).flatten()
        })
    };
    gfx_name_from_target_version(value("gfx_target_version")?)
}

/// Where ROCm installs by default, relative to the file-system root.
pub const DEFAULT_ROCM_ROOT: &str = "opt/rocm";

/// The library directories of a ROCm install: `lib`, `lib64`.
pub fn rocm_lib_dirs(rocm: &Path) -> [PathBuf; 2] {
    [rocm.join("lib"), rocm.join("lib64")]
}

/// The system library directories where a distribution's HIP runtime lives (Debian's
/// `libamdhip64-dev` uses the multiarch one), under the file-system root `root`.
pub fn system_lib_dirs(root: &Path) -> [PathBuf; 3] {
    [
        root.join(format!("usr/lib/{}-linux-gnu", std::env::consts::ARCH)),
        root.join("usr/lib64"),
        root.join("usr/lib"),
    ]
}

/// The ROCm install roots to search on this machine: `$ROCM_PATH` (live), then
/// `/opt/rocm`.
pub fn rocm_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = env::var_os(env::ROCM_PATH).map(PathBuf::from).into_iter().collect();
    let default = Path::new("/").join(DEFAULT_ROCM_ROOT);
    if !roots.contains(&default) {
        roots.push(default);
    }
    roots
}

/// Reads `6.3.1-48` (the contents of `.info/version`) as 6.3.
pub fn parse_rocm_version(text: &str) -> Option<MajorMinor> {
    text.trim().split(['-', '\n']).next()?.parse().ok()
}

/// The ROCm user-space version of a host whose file system is mounted at `root`, and how
/// it was found, without loading anything:
///
/// 1. `.info/version` of the ROCm install: `rocm_path` (`ROCM_PATH`), else
///    `<root>/opt/rocm`;
/// 2. the versioned file name of the HIP runtime, `libamdhip64.so.MAJOR.MINOR.PATCH`, in
///    the ROCm install's `lib` and `lib64`, then `<root>/usr/lib/<arch>-linux-gnu`,
///    `<root>/usr/lib64` and `<root>/usr/lib` (Debian's `libamdhip64-5` puts
///    `libamdhip64.so.5.2.21153` in the multiarch directory). HIP versions are ROCm
///    versions (HIP 6.3 ships in ROCm 6.3), and the soname's major is the ABI.
///
/// `Err` lists what was tried.
pub fn rocm_user_space_version(root: &Path, rocm_path: Option<&Path>) -> Result<(MajorMinor, String), String> {
    let rocm = rocm_path.map(Path::to_path_buf).unwrap_or_else(|| root.join(DEFAULT_ROCM_ROOT));
    let info = rocm.join(".info/version");
    let mut tried = Vec::new();
    match std::fs::read_to_string(&info) {
        Ok(text) => match parse_rocm_version(&text) {
            Some(v) => return Ok((v, info.display().to_string())),
            None => tried.push(format!("{}: no version in `{}`", info.display(), text.trim())),
        },
        Err(e) => tried.push(format!("{}: {e}", info.display())),
    }
    let dirs: Vec<PathBuf> = rocm_lib_dirs(&rocm).into_iter().chain(system_lib_dirs(root)).collect();
    match hip_runtime_version(&dirs) {
        Ok((v, file)) => Ok((v, format!("{} (HIP runtime file name; not loaded)", file.display()))),
        Err(why) => {
            tried.push(why);
            Err(tried.join("; "))
        }
    }
}

/// The HIP runtime's version from its file names in `dirs`: the first directory holding a
/// `libamdhip64.so.N…` answers, with its highest `MAJOR.MINOR`. A bare `libamdhip64.so.6`
/// is followed (by name, as a symbolic link) to the versioned file. `Err` says what was
/// found: nothing, or a major without a minor.
pub fn hip_runtime_version(dirs: &[PathBuf]) -> Result<(MajorMinor, PathBuf), String> {
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        let mut best: Option<(MajorMinor, PathBuf)> = None;
        let mut majors_only = Vec::new();
        for entry in entries.filter_map(Result::ok).take(100_000) {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = dir.join(name);
            let parsed = parse_hip_soname(name).and_then(|(major, minor)| match minor {
                Some(minor) => Some(MajorMinor::new(major, minor)),
                // libamdhip64.so.6 -> libamdhip64.so.6.3.60301: the link's target names
                // the minor.
                None => std::fs::read_link(&path)
                    .ok()
                    .and_then(|t| t.file_name().and_then(|n| n.to_str()).and_then(parse_hip_soname))
                    .and_then(|(m, minor)| Some(MajorMinor::new(m, minor?)))
                    .filter(|v| v.major == major)
                    .or_else(|| {
                        majors_only.push(name.to_owned());
                        None
                    }),
            });
            if let Some(v) = parsed
                && best.as_ref().is_none_or(|(b, _)| v > *b)
            {
                best = Some((v, path));
            }
        }
        if let Some(found) = best {
            return Ok(found);
        }
        if let Some(name) = majors_only.first() {
            return Err(format!("{}: {name} does not name its minor version", dir.display()));
        }
    }
    Err(format!(
        "no libamdhip64.so.N in {}",
        dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
    ))
}

/// Parses a HIP runtime file name: `libamdhip64.so.6.3.60301` → (6, Some(3)),
/// `libamdhip64.so.6` → (6, None); `None` for anything else (`libamdhip64.so`).
pub fn parse_hip_soname(name: &str) -> Option<(u32, Option<u32>)> {
    let rest = name.strip_prefix("libamdhip64.so.")?;
    let mut parts = rest.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = match parts.next() {
        None => None,
        Some(m) => Some(m.parse().ok()?),
    };
    Some((major, minor))
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests write scratch files directly
mod tests {
    use super::*;

    #[test]
    fn proc_driver_version_parses() {
        let text = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.144.03  Release Build  (dvs-builder@U16-I3-B03-4-3)  Thu Jan  9 2025\nGCC version:  gcc version 12.2.0\n";
        assert_eq!(parse_proc_nvidia_version(text).as_deref(), Some("550.144.03"));
        assert_eq!(cuda_for_kmd("550.144.03"), Some(MajorMinor::new(12, 4)));
        assert_eq!(cuda_for_kmd("580.82.07"), Some(MajorMinor::new(13, 0)));
        assert_eq!(cuda_for_kmd("525.60.13"), Some(MajorMinor::new(12, 0)));
        assert_eq!(cuda_for_kmd("525.60.12"), Some(MajorMinor::new(11, 8)));
        assert_eq!(cuda_for_kmd("390.1"), None);
        assert_eq!(parse_proc_nvidia_version("garbage"), None);
    }

    #[test]
    fn visible_devices_follow_the_driver_rules() {
        let uuids = ["GPU-aaaa-1", "GPU-bbbb-2", "GPU-cccc-3"];
        assert_eq!(visible_devices(None, &uuids), [0, 1, 2]);
        assert_eq!(visible_devices(Some(""), &uuids), Vec::<usize>::new());
        assert_eq!(visible_devices(Some("2,0"), &uuids), [2, 0]);
        assert_eq!(visible_devices(Some("1,7,0"), &uuids), [1]);
        assert_eq!(visible_devices(Some("GPU-bbbb,0"), &uuids), [1, 0]);
        assert_eq!(visible_devices(Some("GPU-,0"), &uuids), Vec::<usize>::new());
        assert_eq!(visible_devices(Some("-1"), &uuids), Vec::<usize>::new());
        assert_eq!(visible_devices(Some("0,0,1"), &uuids), [0]);
    }

    #[test]
    fn kfd_properties_and_rocm_versions_parse() {
        let gpu = "cpu_cores_count 0\nsimd_count 440\ngfx_target_version 90402\nvendor_id 4098\n";
        assert_eq!(parse_kfd_properties(gpu).as_deref(), Some("gfx942"));
        assert_eq!(parse_kfd_properties("cpu_cores_count 64\ngfx_target_version 0\n"), None);
        assert_eq!(parse_rocm_version("6.3.1-48\n"), Some(MajorMinor::new(6, 3)));
        assert_eq!(
            parse_musl_banner("musl libc (x86_64)\nVersion 1.2.4\nDynamic Program Loader\n"),
            Some(MajorMinor::new(1, 2))
        );
    }

    #[test]
    fn kfd_tree_skips_cpu_nodes() {
        let dir = tempfile::tempdir().unwrap();
        for (node, v) in [(0, 0), (1, 90010), (2, 0), (10, 110000)] {
            let p = dir.path().join(node.to_string());
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("properties"), format!("simd_count 4\ngfx_target_version {v}\n")).unwrap();
        }
        let devs = kfd_devices(dir.path()).unwrap();
        let names: Vec<_> = devs.iter().map(|d| (d.node, d.target.processor.as_str())).collect();
        assert_eq!(names, [(Some(1), "gfx90a"), (Some(10), "gfx1100")]);
    }

    #[test]
    fn a_missing_driver_is_absent_not_an_error() {
        let r = cuda_driver_probe("/nonexistent/libcuda.so.1");
        assert!(r.unwrap_err().contains("not loaded"));
    }
}
