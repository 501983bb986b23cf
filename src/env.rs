//! Environment variables: the one place khub reads the process environment.
//!
//! Every variable khub reads is a constant here and listed in [`ALL`], documented in
//! `docs/host.md` and `docs/registry.md`. The library reads a snapshot ([`Environment`],
//! taken once by [`Environment::capture`] or built by the caller), so tests and embedding
//! hosts can simulate any setting; the few lookups that must see the live process
//! environment (tool discovery, the driver's own `CUDA_VISIBLE_DEVICES`) go through
//! [`var_os`], which refuses names missing from [`ALL`]. `clippy.toml` forbids
//! `std::env::var*` everywhere else.
//!
//! An empty value means unset. A value that does not parse is an error naming the
//! variable, the value and the expected form; it never silently falls back to probing.

use std::collections::BTreeMap;
use std::ffi::OsString;

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

/// `1` turns on `khub serve`'s access log on stderr (as `--access-log` does).
pub const KHUB_SERVE_LOG: &str = "KHUB_SERVE_LOG";
/// `khub serve`: the most connections served at once (default 1024).
pub const KHUB_SERVE_MAX_CONNECTIONS: &str = "KHUB_SERVE_MAX_CONNECTIONS";
/// `khub serve`: the largest request head, in bytes (default 64K).
pub const KHUB_SERVE_MAX_HEADER_BYTES: &str = "KHUB_SERVE_MAX_HEADER_BYTES";
/// `khub serve`: seconds a client has to send a request head (default 10).
pub const KHUB_SERVE_HEADER_TIMEOUT: &str = "KHUB_SERVE_HEADER_TIMEOUT";
/// `khub serve`: seconds a request may go without progress reading or writing (default 30).
pub const KHUB_SERVE_BODY_TIMEOUT: &str = "KHUB_SERVE_BODY_TIMEOUT";
/// `khub serve`: seconds an idle kept-alive connection stays open (default 30).
pub const KHUB_SERVE_IDLE_TIMEOUT: &str = "KHUB_SERVE_IDLE_TIMEOUT";
/// `khub serve`: the largest JSON request body, in bytes (default 1M).
pub const KHUB_SERVE_MAX_JSON_BYTES: &str = "KHUB_SERVE_MAX_JSON_BYTES";
/// `khub serve`: the largest file in a commit, in bytes (default 1G).
pub const KHUB_SERVE_MAX_FILE_BYTES: &str = "KHUB_SERVE_MAX_FILE_BYTES";
/// `khub serve`: the largest commit body, in bytes (default 2G).
pub const KHUB_SERVE_MAX_COMMIT_BYTES: &str = "KHUB_SERVE_MAX_COMMIT_BYTES";
/// `khub serve`: requests a second per client address, 0 for no limit (default 500).
pub const KHUB_SERVE_RATE: &str = "KHUB_SERVE_RATE";
/// `khub serve`: requests a client address may send at once (default 1000).
pub const KHUB_SERVE_RATE_BURST: &str = "KHUB_SERVE_RATE_BURST";
/// The `nvcc` that `khub build` / `khub package` use.
pub const KHUB_NVCC: &str = "KHUB_NVCC";
/// The CUDA toolkit root, searched for `bin/nvcc` when `KHUB_NVCC` is unset.
pub const CUDA_HOME: &str = "CUDA_HOME";
/// The HIP compiler (`clang` with HIP support) that `khub build` uses.
pub const KHUB_HIPCC: &str = "KHUB_HIPCC";
/// The directory holding `khub_kernel.h`, for building kernels outside a source checkout.
pub const KHUB_INCLUDE: &str = "KHUB_INCLUDE";
/// The executable search path, for finding compilers.
pub const PATH: &str = "PATH";
/// The dynamic loader's search path: part of the key of the host-facts cache, since it
/// decides which `libcuda.so.1` a probe loads.
pub const LD_LIBRARY_PATH: &str = "LD_LIBRARY_PATH";

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
    KHUB_SERVE_LOG,
    KHUB_SERVE_MAX_CONNECTIONS,
    KHUB_SERVE_MAX_HEADER_BYTES,
    KHUB_SERVE_HEADER_TIMEOUT,
    KHUB_SERVE_BODY_TIMEOUT,
    KHUB_SERVE_IDLE_TIMEOUT,
    KHUB_SERVE_MAX_JSON_BYTES,
    KHUB_SERVE_MAX_FILE_BYTES,
    KHUB_SERVE_MAX_COMMIT_BYTES,
    KHUB_SERVE_RATE,
    KHUB_SERVE_RATE_BURST,
    KHUB_NVCC,
    CUDA_HOME,
    KHUB_HIPCC,
    KHUB_INCLUDE,
];

/// Variables of the process that khub consults but that are not khub settings (a test or
/// an embedding host that clears [`ALL`] keeps these): only through [`var_os`].
pub const SYSTEM: &[&str] = &[PATH, LD_LIBRARY_PATH];

/// Whether `var` is registered: in [`ALL`] or [`SYSTEM`].
fn registered(var: &str) -> bool {
    ALL.contains(&var) || SYSTEM.contains(&var)
}

/// A snapshot of the environment variables khub reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Environment {
    vars: BTreeMap<String, String>,
}

impl Environment {
    /// Reads every variable in [`ALL`] from the process environment, once.
    pub fn capture() -> Self {
        #[allow(clippy::disallowed_methods)] // the one snapshot of the process environment
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

/// The live value of `var`, which must be one of [`ALL`] or [`SYSTEM`] (a name missing
/// from the registry reads as unset, and fails debug builds): for the lookups that must see the process
/// environment itself rather than a snapshot. Empty counts as unset.
pub fn var_os(var: &str) -> Option<OsString> {
    var_os_raw(var).filter(|v| !v.is_empty())
}

/// As [`var_os`], but an empty value is returned as set: `CUDA_VISIBLE_DEVICES=""` means
/// "no device" to the driver, not "unset".
pub fn var_os_raw(var: &str) -> Option<OsString> {
    debug_assert!(registered(var), "{var} is not registered in env::ALL or env::SYSTEM");
    if !registered(var) {
        return None;
    }
    #[allow(clippy::disallowed_methods)] // the registry's one live lookup, empty kept
    std::env::var_os(var)
}

/// The live value of any variable the *user* named (for example `--password-env NAME`):
/// the one read of a name that cannot be in [`ALL`]. Empty counts as unset.
pub fn user_named_var(var: &str) -> Option<String> {
    #[allow(clippy::disallowed_methods)] // a variable the user named on the command line
    std::env::var(var).ok().filter(|v| !v.is_empty())
}
