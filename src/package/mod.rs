//! Packaging: a kernel author's sources become a release directory.
//!
//! `kernel.toml` in the kernel directory names the kernel, the functions it exports and the
//! variant matrix. [`build`] compiles each variant into a shared library: C with the `cc`
//! crate's compiler discovery, CUDA with `nvcc` and HIP with clang (plus the HIP runtime,
//! `libamdhip64`) when they are found. [`package`] then inspects every binary and writes
//! the release: the files under `variants/<id>/`, and `khub.toml` derived from the
//! binaries themselves:
//!
//! - exports and signatures from the kernel's own descriptor;
//! - the device code actually embedded (`.nv_fatbin` cubins and PTX, `.hip_fatbin` code
//!   objects), which must equal what the variant declares;
//! - the glibc floor from the highest `GLIBC_x.y` symbol version the library needs;
//! - the CUDA toolkit version from `nvcc --version`; the ROCm version from the HIP runtime
//!   the variant was built and linked against (`hip/hip_version.h`), whose major must be
//!   the one in the linked `libamdhip64.so.N`;
//! - sizes and SHA-256 of every file.
//!
//! A variant whose toolchain is missing is skipped with a warning, or is an error under
//! `strict`.

pub mod init;
#[cfg(feature = "hub")]
pub mod publish;
pub mod sign;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use crate::inspect::{InspectError, inspect_file};
use crate::load::{Description, LoadError, describe_library, describe_library_in};
use crate::manifest::{
    CudaVariant, Export, FileEntry, KernelInfo, Manifest, ManifestError, RelPath, RocmVariant, SCHEMA_MAJOR, SCHEMA_MINOR, Variant,
};
use crate::platform::{AmdTarget, Backend, CpuArch, CudaArch, CudartLinkage, Libc, LibcFamily, MajorMinor, Os, X86Level};
use crate::verify;

/// The package config file in a kernel directory.
pub const CONFIG_FILE: &str = "kernel.toml";

/// A kernel package's config (`kernel.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PackageConfig {
    /// The kernel.
    pub kernel: ConfigKernel,
    /// The functions every variant must export, with their signatures.
    #[serde(default)]
    pub exports: Vec<Export>,
    /// The variant matrix.
    pub variants: Vec<ConfigVariant>,
}

/// `[kernel]` in `kernel.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ConfigKernel {
    /// The kernel's name.
    pub name: String,
    /// Its version.
    pub version: semver::Version,
    /// One line about it.
    #[serde(default)]
    pub description: Option<String>,
    /// An SPDX license expression.
    #[serde(default)]
    pub license: Option<String>,
}

/// One `[[variants]]` entry of `kernel.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ConfigVariant {
    /// The variant id.
    pub id: String,
    /// `cpu`, `cuda` or `rocm`.
    pub backend: Backend,
    /// Source files, relative to the kernel directory.
    pub sources: Vec<RelPath>,
    /// Extra compiler flags.
    #[serde(default)]
    pub flags: Vec<String>,
    /// Libraries to link (`m` for `-lm`).
    #[serde(default)]
    pub libs: Vec<String>,
    /// The CPU architecture; default: the build machine's. Other architectures are skipped
    /// (khub does not cross-compile).
    #[serde(default)]
    pub arch: Option<CpuArch>,
    /// The x86-64 level the flags target.
    #[serde(default)]
    pub cpu_level: Option<X86Level>,
    /// Extra CPU features the flags assume.
    #[serde(default)]
    pub cpu_features: BTreeSet<String>,
    /// Publisher priority.
    #[serde(default)]
    pub priority: i32,
    /// CUDA: the device code to build and its cudart linkage.
    #[serde(default)]
    pub cuda: Option<ConfigCuda>,
    /// ROCm: the AMD targets to build code objects for.
    #[serde(default)]
    pub rocm: Option<ConfigRocm>,
}

/// `cuda` of a config variant.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ConfigCuda {
    /// Device code: `sm_80`, `sm_90a`, `compute_90`, … (each becomes a `-gencode`).
    pub code: Vec<CudaArch>,
    /// `static` (default) or `dynamic`.
    #[serde(default = "static_cudart")]
    pub cudart: CudartLinkage,
}

fn static_cudart() -> CudartLinkage {
    CudartLinkage::Static
}

/// `rocm` of a config variant.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ConfigRocm {
    /// The code objects to build, as target ids: `gfx90a`, `gfx942:sramecc+:xnack-`,
    /// `gfx11-generic`. Each becomes one `--offload-arch`.
    pub targets: Vec<AmdTarget>,
    /// `-mcode-object-version`: 4, 5 or 6. Default: the compiler's own (5 for clang 19),
    /// or 6 when a target is generic (generic targets exist only from v6 on).
    #[serde(default)]
    pub code_object_version: Option<u32>,
    /// The ROCm version to declare. Default: the version of the HIP runtime the variant is
    /// built against (`hip/hip_version.h`). Its major must equal the linked
    /// `libamdhip64.so.N`'s.
    #[serde(default)]
    pub version: Option<MajorMinor>,
    /// Other ROCm releases (same major) the publisher declares the variant runs on.
    #[serde(default)]
    pub compatible: Vec<MajorMinor>,
}

impl ConfigRocm {
    /// The code object version to pass to clang: the declared one, or 6 when a target is
    /// generic, or `None` for the compiler's default.
    pub fn effective_code_object_version(&self) -> Option<u32> {
        self.code_object_version
            .or_else(|| self.targets.iter().any(AmdTarget::is_generic).then_some(6))
    }

    /// Checks what clang cannot be asked for: no target twice, generic targets only with
    /// code object v6, a code object version clang 19 knows (4 to 6).
    fn validate(&self) -> Result<(), String> {
        if self.targets.is_empty() {
            return Err("`rocm.targets` lists no target; name at least one, such as gfx942".into());
        }
        let mut seen = BTreeSet::new();
        for t in &self.targets {
            if !seen.insert(t) {
                return Err(format!("`rocm.targets` lists `{t}` twice"));
            }
            if t.generic_version > 1 {
                return Err(format!(
                    "`{t}`: the generic version comes from the compiler; write `{}`",
                    t.processor
                ));
            }
        }
        if let Some(v) = self.code_object_version
            && !(4..=6).contains(&v)
        {
            return Err(format!(
                "`rocm.code-object-version` {v}: clang builds code object versions 4, 5 and 6"
            ));
        }
        if let (Some(v), Some(g)) = (self.code_object_version, self.targets.iter().find(|t| t.is_generic()))
            && v < 6
        {
            return Err(format!("`{g}` is a generic target, which needs code object version 6 (set {v})"));
        }
        Ok(())
    }
}

/// Packaging failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PackageError {
    /// `--variant` names a variant the package does not declare.
    #[error("kernel.toml declares no variant `{id}`; its variants are: {known}")]
    UnknownVariant {
        /// The id asked for.
        id: String,
        /// The declared ids, comma-separated.
        known: String,
    },
    /// The output directory already holds files.
    #[error(
        "{} is not empty: a release directory must hold only what its new khub.toml lists (an old khub.toml.minisig or old variant files would go out with it); choose an empty or new directory, or pass --force to empty it first",
        path.display()
    )]
    OutNotEmpty {
        /// The directory.
        path: PathBuf,
    },
    /// The output directory is the kernel directory or holds it.
    #[error("--out {} is or holds the kernel directory {}: the release would be written over the sources; choose a directory outside it", out.display(), kernel.display())]
    OutHoldsSources {
        /// The output directory.
        out: PathBuf,
        /// The kernel directory.
        kernel: PathBuf,
    },
    /// The config could not be read.
    #[error("cannot read {}: {source}", path.display())]
    ConfigRead {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The config is not valid.
    #[error("{} is not valid: {message}", path.display())]
    ConfigInvalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A toolchain is missing and `strict` is set.
    #[error("variant `{variant}`: {message} (run without --strict to skip it)")]
    ToolchainMissing {
        /// The variant.
        variant: String,
        /// What is missing.
        message: String,
    },
    /// A compiler failed.
    #[error("variant `{variant}`: the compiler failed ({command}):\n{stderr}")]
    Compile {
        /// The variant.
        variant: String,
        /// The command line.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// A binary could not be inspected.
    #[error("variant `{variant}`: cannot inspect {}: {source}", path.display())]
    Inspect {
        /// The variant.
        variant: String,
        /// The binary.
        path: PathBuf,
        /// Why.
        #[source]
        source: InspectError,
    },
    /// The kernel's descriptor could not be read.
    #[error("variant `{variant}`: {source}")]
    Describe {
        /// The variant.
        variant: String,
        /// Why.
        #[source]
        source: LoadError,
    },
    /// The binary does not contain what the config declares.
    #[error("variant `{variant}`: {message}")]
    Mismatch {
        /// The variant.
        variant: String,
        /// The difference.
        message: String,
    },
    /// No variant could be built.
    #[error("no variant was built: {0}")]
    NothingBuilt(String),
    /// Writing the release failed.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The derived manifest is not valid.
    #[error("the derived manifest is not valid: {0}")]
    Manifest(#[from] ManifestError),
}

/// How to build.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Fail instead of skipping variants whose toolchain is missing.
    pub strict: bool,
    /// The `nvcc` to use; default: `KHUB_NVCC`, then `nvcc` on `PATH`, then
    /// `$CUDA_HOME/bin/nvcc`.
    pub nvcc: Option<PathBuf>,
    /// Extra arguments for every nvcc call (include or library paths of a pip-installed
    /// toolkit, for instance).
    pub nvcc_args: Vec<String>,
    /// The clang that builds HIP variants; default: `KHUB_HIPCC`, then `clang-19`, then
    /// ROCm's own (`$ROCM_PATH/llvm/bin/clang`), then `clang` on `PATH` (see [`find_hip`]).
    pub hip: Option<PathBuf>,
    /// Only these variant ids (all when empty).
    pub only: Vec<String>,
    /// Reading a built library's descriptor runs its initialisers. With a helper (the
    /// `khub` binary), that happens in a child process (`khub __describe`); without one,
    /// in this process (the library is one the caller just built).
    pub describe_helper: Option<PathBuf>,
    /// [`package`] only: empty an existing, non-empty output directory first instead of
    /// refusing it (a release directory must hold what its new manifest lists and nothing
    /// else: an old signature or old variant files would be published with it).
    pub force: bool,
}

/// One variant that was built.
#[derive(Debug, Clone)]
pub struct BuiltVariant {
    /// The config entry.
    pub config: ConfigVariant,
    /// The shared library.
    pub library: PathBuf,
    /// The toolkit version: CUDA's for cuda variants, the HIP runtime's (= ROCm's) for
    /// rocm variants.
    pub toolkit: Option<MajorMinor>,
}

/// The outcome of a build.
#[derive(Debug, Clone, Default)]
pub struct BuildReport {
    /// Variants built.
    pub built: Vec<BuiltVariant>,
    /// Variants skipped, with the reason.
    pub skipped: Vec<(String, String)>,
}

impl PackageConfig {
    /// Reads `kernel.toml` from a kernel directory.
    pub fn read(kernel_dir: &Path) -> Result<Self, PackageError> {
        let path = kernel_dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| PackageError::ConfigRead {
            path: path.clone(),
            source,
        })?;
        let invalid = |message: String| PackageError::ConfigInvalid {
            path: path.clone(),
            message,
        };
        let config: PackageConfig = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        // The name and the ids become file and directory names under `--out` (and
        // `variants/<id>/` is emptied when a variant is skipped): checked before anything
        // is built or removed, by the manifest's own rules.
        crate::manifest::check_kernel_name("kernel.name", &config.kernel.name).map_err(|e| invalid(e.to_string()))?;
        let mut ids = BTreeSet::new();
        for (i, v) in config.variants.iter().enumerate() {
            crate::manifest::check_variant_id(&format!("variants[{i}].id"), &v.id).map_err(|e| invalid(e.to_string()))?;
            if !ids.insert(&v.id) {
                return Err(invalid(format!("variant id `{}` is used twice", v.id)));
            }
            if v.sources.is_empty() {
                return Err(invalid(format!("variant `{}` lists no sources", v.id)));
            }
            match (v.backend, &v.cuda, &v.rocm) {
                (Backend::Cpu, None, None) | (Backend::Cuda, Some(_), None) => {}
                (Backend::Rocm, None, Some(r)) => r.validate().map_err(|m| invalid(format!("variant `{}`: {m}", v.id)))?,
                (Backend::Cuda, None, _) => {
                    return Err(invalid(format!(
                        "variant `{}`: backend cuda needs a `cuda` table with `code`",
                        v.id
                    )));
                }
                (Backend::Rocm, _, None) => {
                    return Err(invalid(format!(
                        "variant `{}`: backend rocm needs a `rocm` table with `targets`",
                        v.id
                    )));
                }
                (b @ (Backend::Cpu | Backend::Cuda | Backend::Rocm), ..) => {
                    return Err(invalid(format!(
                        "variant `{}`: a {b} variant has only its own backend's table (`cuda` for cuda, `rocm` for rocm)",
                        v.id
                    )));
                }
                (b, ..) => {
                    return Err(invalid(format!(
                        "variant `{}`: khub cannot build {b} variants yet; supported: cpu, cuda, rocm",
                        v.id
                    )));
                }
            }
        }
        Ok(config)
    }
}

fn this_arch() -> CpuArch {
    if cfg!(target_arch = "aarch64") {
        CpuArch::Aarch64
    } else {
        CpuArch::X86_64
    }
}

fn this_triple() -> String {
    let env = if cfg!(target_env = "musl") { "musl" } else { "gnu" };
    format!("{}-unknown-linux-{env}", std::env::consts::ARCH)
}

/// Finds `nvcc`: the explicit path, `KHUB_NVCC`, `PATH`, `$CUDA_HOME/bin`.
pub fn find_nvcc(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_owned());
    }
    if let Some(p) = crate::env::var_os(crate::env::KHUB_NVCC) {
        return Some(PathBuf::from(p));
    }
    let path = crate::env::var_os(crate::env::PATH).unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let c = dir.join("nvcc");
        if c.is_file() {
            return Some(c);
        }
    }
    crate::env::var_os(crate::env::CUDA_HOME)
        .map(|h| PathBuf::from(h).join("bin/nvcc"))
        .filter(|p| p.is_file())
}

/// Reads the toolkit version from `nvcc --version` ("release 13.0, V13.0.88").
pub fn nvcc_version(nvcc: &Path) -> Option<MajorMinor> {
    let out = Command::new(nvcc).arg("--version").output().ok()?;
    parse_nvcc_version(&String::from_utf8_lossy(&out.stdout))
}

/// Parses `nvcc --version` output.
pub fn parse_nvcc_version(text: &str) -> Option<MajorMinor> {
    let rest = text.split("release ").nth(1)?;
    rest.split(',').next()?.trim().parse().ok()
}

/// A HIP toolchain: the clang that compiles HIP, and the HIP runtime it links against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HipToolchain {
    /// The clang driver.
    pub clang: PathBuf,
    /// The first line of `clang --version`, for messages.
    pub clang_version: String,
    /// The HIP runtime: headers, `libamdhip64.so` and version.
    pub runtime: HipRuntime,
}

/// An installed HIP runtime, as a build needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HipRuntime {
    /// The directory holding `hip/hip_runtime_api.h`.
    pub include: PathBuf,
    /// The directory holding `libamdhip64.so`, the link-time name a `-dev` package (or
    /// ROCm) installs.
    pub lib_dir: PathBuf,
    /// The HIP version, which is the ROCm version (HIP 6.3 ships in ROCm 6.3).
    pub version: MajorMinor,
    /// The file the version was read from.
    pub version_source: PathBuf,
}

/// Finds a HIP toolchain: a clang that compiles HIP, and a HIP runtime to link.
///
/// clang: the explicit path, `KHUB_HIPCC`, `clang-19` on `PATH`, ROCm's own
/// (`$ROCM_PATH/llvm/bin/clang`, default `/opt/rocm`), `clang` on `PATH`; the first that
/// answers `--version` as clang. The runtime: see [`find_hip_runtime`]. `Err` says what is
/// missing and how to get it.
pub fn find_hip(explicit: Option<&Path>) -> Result<HipToolchain, String> {
    let rocm = crate::host::probe::rocm_roots();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = explicit {
        candidates.push(p.to_owned());
    } else if let Some(p) = crate::env::var_os(crate::env::KHUB_HIPCC) {
        candidates.push(PathBuf::from(p));
    } else {
        let path = crate::env::var_os(crate::env::PATH).unwrap_or_default();
        let on_path = |name: &str| std::env::split_paths(&path).map(|d| d.join(name)).find(|c| c.is_file());
        candidates.extend(on_path("clang-19"));
        candidates.extend(rocm.iter().map(|r| r.join("llvm/bin/clang")).filter(|c| c.is_file()));
        candidates.extend(on_path("clang"));
    }
    if candidates.is_empty() {
        return Err(
            "no clang for HIP found (set --hipcc or KHUB_HIPCC, or put clang-19 on PATH; `apt-get install clang-19 lld-19` provides one)"
                .into(),
        );
    }
    let mut tried = Vec::new();
    let mut found = None;
    for c in candidates {
        match Command::new(&c).arg("--version").output() {
            Ok(out) if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("clang version") => {
                let version = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
                found = Some((c, version));
                break;
            }
            Ok(_) => tried.push(format!("{} --version does not report a clang", c.display())),
            Err(e) => tried.push(format!("{}: {e}", c.display())),
        }
    }
    let Some((clang, clang_version)) = found else {
        return Err(format!("no usable clang for HIP: {}", tried.join("; ")));
    };
    let runtime = find_hip_runtime(&rocm)?;
    Ok(HipToolchain {
        clang,
        clang_version,
        runtime,
    })
}

/// Finds the HIP runtime to build against: under a ROCm root (`include/hip`,
/// `lib/libamdhip64.so`), else the system's (`/usr/include/hip` and the multiarch library
/// directory, where Debian's `libamdhip64-dev` puts them). The version comes from
/// `hip/hip_version.h` next to the headers, else `<root>/.info/version`, else
/// `share/hip/version`.
pub fn find_hip_runtime(rocm_roots: &[PathBuf]) -> Result<HipRuntime, String> {
    use crate::host::probe::{rocm_lib_dirs, system_lib_dirs};
    let mut layouts: Vec<(PathBuf, PathBuf, Vec<PathBuf>)> = rocm_roots
        .iter()
        .map(|r| (r.clone(), r.join("include"), rocm_lib_dirs(r).to_vec()))
        .collect();
    let mut system = system_lib_dirs(Path::new("/")).to_vec();
    system.push(PathBuf::from("/usr/local/lib"));
    layouts.push((PathBuf::from("/usr"), PathBuf::from("/usr/include"), system));
    let mut looked = Vec::new();
    for (root, include, libs) in layouts {
        let header = include.join("hip/hip_runtime_api.h");
        let lib_dir = libs.into_iter().find(|d| d.join("libamdhip64.so").exists());
        let (true, Some(lib_dir)) = (header.is_file(), lib_dir) else {
            looked.push(root.display().to_string());
            continue;
        };
        let version_files = [
            include.join("hip/hip_version.h"),
            root.join(".info/version"),
            root.join("share/hip/version"),
        ];
        let version = version_files.iter().find_map(|f| {
            let text = std::fs::read_to_string(f).ok()?;
            parse_hip_version(&text).map(|v| (v, f.clone()))
        });
        let Some((version, version_source)) = version else {
            return Err(format!(
                "the HIP runtime in {} has no readable version (hip/hip_version.h, .info/version, share/hip/version)",
                root.display()
            ));
        };
        return Ok(HipRuntime {
            include,
            lib_dir,
            version,
            version_source,
        });
    }
    Err(format!(
        "no HIP runtime found (hip/hip_runtime_api.h and libamdhip64.so under {}); `apt-get install libamdhip64-dev` or a ROCm install (ROCM_PATH) provides one",
        looked.join(", ")
    ))
}

/// Reads the HIP version from `hip/hip_version.h` (`#define HIP_VERSION_MAJOR 6`),
/// `share/hip/version` (`HIP_VERSION_MAJOR=5`) or ROCm's `.info/version` (`6.3.1-48`).
pub fn parse_hip_version(text: &str) -> Option<MajorMinor> {
    let field = |name: &str| -> Option<u32> {
        text.lines().find_map(|l| {
            let l = l.trim();
            let rest = l.strip_prefix("#define").map(str::trim_start).unwrap_or(l);
            let value = rest.strip_prefix(name)?;
            let value = value.trim_start_matches([' ', '\t', '=']).trim();
            value.parse().ok()
        })
    };
    match (field("HIP_VERSION_MAJOR"), field("HIP_VERSION_MINOR")) {
        (Some(major), Some(minor)) => Some(MajorMinor::new(major, minor)),
        _ => crate::host::probe::parse_rocm_version(text),
    }
}

/// The `--offload-arch` value of a target: its processor and features, without khub's
/// `@version` (clang picks the generic version).
pub fn offload_arch(t: &AmdTarget) -> String {
    let mut t = t.clone();
    t.generic_version = t.generic_version.min(1);
    t.to_string()
}

/// Asks clang whether it knows an offload target (clang 19 does not know `gfx9-4-generic`,
/// for instance), with a device-only syntax check of an empty file; `Err` holds clang's
/// message.
pub fn hip_target_supported(clang: &Path, target: &AmdTarget) -> Result<(), String> {
    let out = Command::new(clang)
        .args(["-x", "hip", "-nogpuinc", "-nogpulib", "--offload-device-only", "-fsyntax-only"])
        .arg(format!("--offload-arch={}", offload_arch(target)))
        .arg("/dev/null")
        .output()
        .map_err(|e| format!("{}: {e}", clang.display()))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    // "clang-19: error: invalid target ID 'gfx9-4-generic'; format is …": the first part says it.
    let line = stderr.lines().find(|l| l.contains("error")).unwrap_or("clang rejected the target");
    Err(line.split(';').next().unwrap_or(line).trim().to_owned())
}

/// The `-gencode` arguments for a list of device code: a cubin `sm_XY[a|f]` builds from
/// `compute_XY[a|f]`; PTX `compute_XY` embeds itself.
pub fn gencode_args(code: &[CudaArch]) -> Vec<String> {
    code.iter()
        .map(|a| {
            let virt = CudaArch { ptx: true, ..*a };
            format!("-gencode=arch={virt},code={a}")
        })
        .collect()
}

/// The include directory holding `khub_kernel.h`: `KHUB_INCLUDE` (the directory, or the
/// header file itself), else the one next to this crate's sources (a source checkout or
/// `cargo install --path`).
pub fn include_dir() -> PathBuf {
    match crate::env::var_os(crate::env::KHUB_INCLUDE).map(PathBuf::from) {
        Some(p) if p.is_file() => p.parent().map(Path::to_path_buf).unwrap_or(p),
        Some(p) => p,
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("include"),
    }
}

/// Refuses a `--variant` the package does not declare.
fn check_only(config: &PackageConfig, only: &[String]) -> Result<(), PackageError> {
    match only.iter().find(|id| !config.variants.iter().any(|v| &v.id == *id)) {
        Some(id) => Err(PackageError::UnknownVariant {
            id: id.clone(),
            known: config.variants.iter().map(|v| v.id.as_str()).collect::<Vec<_>>().join(", "),
        }),
        None => Ok(()),
    }
}

/// Compiles every variant of the kernel in `kernel_dir` into `out_dir/<id>/lib<name>.so`.
pub fn build(kernel_dir: &Path, out_dir: &Path, options: &BuildOptions, log: &mut dyn FnMut(&str)) -> Result<BuildReport, PackageError> {
    let config = PackageConfig::read(kernel_dir)?;
    let include = include_dir();
    let mut report = BuildReport::default();
    let nvcc = find_nvcc(options.nvcc.as_deref());
    // Looked up on the first rocm variant only: it runs the compiler.
    let mut hip: Option<Result<HipToolchain, String>> = None;
    check_only(&config, &options.only)?;
    for v in &config.variants {
        if !options.only.is_empty() && !options.only.contains(&v.id) {
            continue;
        }
        let skip = |report: &mut BuildReport, log: &mut dyn FnMut(&str), why: String| -> Result<(), PackageError> {
            if options.strict {
                return Err(PackageError::ToolchainMissing {
                    variant: v.id.clone(),
                    message: why,
                });
            }
            log(&format!("warning: skipping variant `{}`: {why}", v.id));
            report.skipped.push((v.id.clone(), why));
            Ok(())
        };
        if v.arch.is_some_and(|a| a != this_arch()) {
            skip(
                &mut report,
                log,
                format!(
                    "it targets {}, this machine is {} (khub does not cross-compile)",
                    v.arch.map(|a| a.name()).unwrap_or(""),
                    this_arch()
                ),
            )?;
            continue;
        }
        let dir = out_dir.join(&v.id);
        std::fs::create_dir_all(&dir).map_err(|source| PackageError::Write { path: dir.clone(), source })?;
        let lib = dir.join(format!("lib{}.so", config.kernel.name));
        let sources: Vec<PathBuf> = v.sources.iter().map(|s| kernel_dir.join(s.as_str())).collect();
        let version_define = format!("-DKHUB_KERNEL_VERSION=\"{}\"", config.kernel.version);
        // Arguments after the sources: the HIP runtime's library path and name.
        let mut post: Vec<String> = Vec::new();
        let (mut cmd, toolkit) = match v.backend {
            Backend::Cuda => {
                let Some(nvcc) = &nvcc else {
                    skip(&mut report, log, "nvcc not found (set --nvcc, KHUB_NVCC or PATH; `pip install nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-crt` provides one)".into())?;
                    continue;
                };
                let Some(toolkit) = nvcc_version(nvcc) else {
                    skip(
                        &mut report,
                        log,
                        format!("{} --version did not report a CUDA release", nvcc.display()),
                    )?;
                    continue;
                };
                let cuda = v
                    .cuda
                    .as_ref()
                    .map_or((Vec::new(), CudartLinkage::Static), |c| (c.code.clone(), c.cudart));
                let mut cmd = Command::new(nvcc);
                cmd.args(["-shared", "-Xcompiler", "-fPIC", "-O3", "-cudart"]);
                cmd.arg(if cuda.1 == CudartLinkage::Static { "static" } else { "shared" });
                cmd.args(gencode_args(&cuda.0));
                cmd.args(&options.nvcc_args);
                (cmd, Some(toolkit))
            }
            Backend::Rocm => {
                let Some(rocm) = &v.rocm else {
                    return Err(PackageError::ConfigInvalid {
                        path: kernel_dir.join(CONFIG_FILE),
                        message: format!("variant `{}`: backend rocm needs a `rocm` table with `targets`", v.id),
                    });
                };
                let hip = match hip.get_or_insert_with(|| find_hip(options.hip.as_deref())) {
                    Ok(h) => h.clone(),
                    Err(why) => {
                        skip(&mut report, log, why.clone())?;
                        continue;
                    }
                };
                if let Some((t, why)) = rocm
                    .targets
                    .iter()
                    .find_map(|t| hip_target_supported(&hip.clang, t).err().map(|why| (t, why)))
                {
                    skip(
                        &mut report,
                        log,
                        format!("{} ({}) cannot build `{t}`: {why}", hip.clang.display(), hip.clang_version),
                    )?;
                    continue;
                }
                // Device code without HIP device headers or ROCm device libraries
                // (-nogpuinc -nogpulib): Debian ships neither for gfx942 or gfx110x, and a
                // kernel written with clang builtins needs none (docs/amd.md). The host side
                // includes hip/hip_runtime_api.h and links libamdhip64.
                let mut cmd = Command::new(&hip.clang);
                cmd.args(["-x", "hip"]);
                cmd.args(rocm.targets.iter().map(|t| format!("--offload-arch={}", offload_arch(t))));
                if let Some(cov) = rocm.effective_code_object_version() {
                    cmd.arg(format!("-mcode-object-version={cov}"));
                }
                cmd.args(["-nogpuinc", "-nogpulib", "-shared", "-fPIC", "-O3"]);
                // /usr/include is already searched, and naming it again with -I would break
                // libstdc++'s #include_next.
                if hip.runtime.include != Path::new("/usr/include") {
                    cmd.arg("-I").arg(&hip.runtime.include);
                }
                post.push(format!("-L{}", hip.runtime.lib_dir.display()));
                post.push("-lamdhip64".into());
                (cmd, Some(hip.runtime.version))
            }
            _ => {
                let tool = cc::Build::new()
                    .target(&this_triple())
                    .host(&this_triple())
                    .opt_level(3)
                    .cargo_metadata(false)
                    .cargo_warnings(false)
                    .try_get_compiler();
                let tool = match tool {
                    Ok(t) => t,
                    Err(e) => {
                        skip(&mut report, log, format!("no C compiler: {e}"))?;
                        continue;
                    }
                };
                let mut cmd = tool.to_command();
                cmd.args(["-shared", "-fPIC", "-std=c11", "-Wall"]);
                (cmd, None)
            }
        };
        cmd.arg("-I")
            .arg(&include)
            .arg(&version_define)
            .args(&v.flags)
            .arg("-o")
            .arg(&lib)
            .args(&sources);
        for l in &v.libs {
            cmd.arg(format!("-l{l}"));
        }
        cmd.args(&post);
        let shown = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        log(&format!("building `{}`: {shown}", v.id));
        let out = cmd.output().map_err(|e| PackageError::Compile {
            variant: v.id.clone(),
            command: shown.clone(),
            stderr: e.to_string(),
        })?;
        if !out.status.success() {
            return Err(PackageError::Compile {
                variant: v.id.clone(),
                command: shown,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        report.built.push(BuiltVariant {
            config: v.clone(),
            library: lib,
            toolkit,
        });
    }
    if report.built.is_empty() {
        let why: Vec<String> = report.skipped.iter().map(|(id, w)| format!("{id}: {w}")).collect();
        return Err(PackageError::NothingBuilt(if why.is_empty() {
            "the config selects no variant".into()
        } else {
            why.join("; ")
        }));
    }
    Ok(report)
}

/// What `inspect` found in a built library, checked against its config.
#[derive(Debug, Clone)]
pub struct Inspected {
    /// The descriptor.
    pub description: Description,
    /// The glibc floor (or musl).
    pub libc: Libc,
    /// The floor as people read it: `glibc 2.2.5` where [`Inspected::libc`] keeps `2.2`.
    pub libc_display: String,
    /// The device code embedded.
    pub cuda_code: Vec<CudaArch>,
    /// The AMD targets of the code objects embedded (`.hip_fatbin`).
    pub hip_targets: Vec<AmdTarget>,
    /// For a rocm variant: the ROCm version to declare, checked against the linked
    /// `libamdhip64.so.N`.
    pub rocm_version: Option<MajorMinor>,
}

/// Inspects a built variant and checks it against the config: the descriptor's identity,
/// backend and exports, and the embedded device code (CUDA cubins and PTX; AMD code
/// objects, whose set of target ids must equal the declared one), and for rocm variants
/// that the declared ROCm major is the linked HIP runtime's.
pub fn check_variant(config: &PackageConfig, built: &BuiltVariant, describe_helper: Option<&Path>) -> Result<Inspected, PackageError> {
    let v = &built.config;
    let mismatch = |message: String| PackageError::Mismatch {
        variant: v.id.clone(),
        message,
    };
    let info = inspect_file(&built.library).map_err(|source| PackageError::Inspect {
        variant: v.id.clone(),
        path: built.library.clone(),
        source,
    })?;
    if !info.exports.iter().any(|e| e == crate::abi::ENTRY_SYMBOL) {
        return Err(mismatch(format!(
            "the library does not export `{}`; define it with KHUB_DEFINE_KERNEL",
            crate::abi::ENTRY_SYMBOL
        )));
    }
    let description = match describe_helper {
        Some(helper) => describe_library_in(helper, &built.library),
        None => describe_library(&built.library),
    }
    .map_err(|source| PackageError::Describe {
        variant: v.id.clone(),
        source,
    })?;
    let want = format!("{} {} ({})", config.kernel.name, config.kernel.version, v.backend);
    let have = format!("{} {} ({})", description.name, description.version, description.backend);
    if want != have {
        return Err(mismatch(format!("the descriptor says {have}, kernel.toml says {want}")));
    }
    // Exports: the same names, and signatures that parse to the same thing.
    let declared: Vec<(&str, &str)> = config.exports.iter().map(|e| (e.name.as_str(), e.signature.as_str())).collect();
    for (name, sig) in &declared {
        let found = description.functions.iter().find(|f| f.name == *name);
        match found {
            None => return Err(mismatch(format!("kernel.toml declares `{name}`, the binary does not export it"))),
            Some(f) => {
                let a = crate::abi::Signature::parse(sig).map_err(|e| mismatch(e.to_string()))?;
                let b = crate::abi::Signature::parse(&f.signature).map_err(|e| mismatch(e.to_string()))?;
                if a != b {
                    return Err(mismatch(format!(
                        "`{name}`: kernel.toml says `{sig}`, the binary says `{}`",
                        f.signature
                    )));
                }
            }
        }
    }
    for f in &description.functions {
        if !declared.iter().any(|(n, _)| *n == f.name) {
            return Err(mismatch(format!(
                "the binary exports `{}`, which kernel.toml does not declare",
                f.name
            )));
        }
    }
    // Device code: exactly what was asked for.
    let cuda_code = info.cuda_code();
    if let Some(c) = &v.cuda {
        let want: BTreeSet<CudaArch> = c.code.iter().copied().collect();
        let have: BTreeSet<CudaArch> = cuda_code.iter().copied().collect();
        if want != have {
            let show = |s: &BTreeSet<CudaArch>| s.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
            return Err(mismatch(format!(
                "kernel.toml declares device code [{}], the binary embeds [{}]",
                show(&want),
                show(&have)
            )));
        }
    } else if !cuda_code.is_empty() {
        return Err(mismatch(format!("a {} variant embeds CUDA device code", v.backend)));
    }
    let hip_targets = info.hip_targets();
    let show_amd = |s: &BTreeSet<AmdTarget>| s.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    let mut rocm_version = None;
    if let Some(r) = &v.rocm {
        let want: BTreeSet<AmdTarget> = r.targets.iter().cloned().collect();
        let have: BTreeSet<AmdTarget> = hip_targets.iter().cloned().collect();
        if want != have {
            return Err(mismatch(format!(
                "kernel.toml declares AMD targets [{}], the binary holds code objects for [{}]",
                show_amd(&want),
                show_amd(&have)
            )));
        }
        let version = r
            .version
            .or(built.toolkit)
            .ok_or_else(|| mismatch("the ROCm version is unknown: no HIP runtime version was found; declare `rocm.version`".into()))?;
        // The HIP runtime's soname carries the ROCm major, and majors are not ABI
        // compatible (compat-rules.md §2.5): what the binary links decides.
        let linked = info.needed.iter().find_map(|n| {
            n.strip_prefix("libamdhip64.so.")
                .map(|rest| (n, rest.split('.').next().and_then(|m| m.parse::<u32>().ok())))
        });
        match linked {
            Some((name, Some(major))) if major != version.major => {
                return Err(mismatch(format!(
                    "the binary links {name} (ROCm {major}), but the variant declares ROCm {version}"
                )));
            }
            Some(_) => {}
            None => {
                return Err(mismatch(
                    "a rocm variant must link the HIP runtime (libamdhip64.so.N), whose major is the ROCm major it needs".into(),
                ));
            }
        }
        rocm_version = Some(version);
    } else if !hip_targets.is_empty() {
        return Err(mismatch(format!(
            "a {} variant embeds AMD code objects ({})",
            v.backend,
            show_amd(&hip_targets.iter().cloned().collect())
        )));
    }
    let libc = if info.musl {
        // The musl version a binary needs is not recorded in it; 1.2 is the floor of
        // every musl with a 64-bit time_t.
        Libc {
            family: LibcFamily::Musl,
            version: MajorMinor::new(1, 2),
        }
    } else {
        Libc {
            family: LibcFamily::Glibc,
            version: info.glibc_floor.unwrap_or(MajorMinor::new(2, 17)),
        }
    };
    let libc_display = match (&info.glibc_floor_version, libc.family) {
        (Some(v), LibcFamily::Glibc) => format!("glibc {v}"),
        _ => libc.to_string(),
    };
    Ok(Inspected {
        description,
        libc,
        libc_display,
        cuda_code,
        hip_targets,
        rocm_version,
    })
}

/// Makes sure `out` is an empty directory: creates it, or (with `force`) empties it, or
/// refuses it when it holds anything.
/// Checks that `out` can take a release: absent, an empty directory, or (with `force`) a
/// directory whose contents will be replaced. Nothing is removed here: the release is
/// built beside `out` and swapped in only once it is complete.
fn check_out(out: &Path, force: bool) -> Result<(), PackageError> {
    let write = |source| PackageError::Write {
        path: out.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(write(e)),
        Ok(m) if !m.is_dir() => {
            return Err(write(std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                "exists and is not a directory",
            )));
        }
        Ok(_) => {}
    }
    let mut entries = std::fs::read_dir(out).map_err(write)?;
    if entries.next().is_some() && !force {
        return Err(PackageError::OutNotEmpty { path: out.to_owned() });
    }
    Ok(())
}

/// A directory beside `out` (same filesystem, so it can be renamed into place) that the
/// release is built in; removed on drop unless it was moved into place.
struct Staging {
    dir: PathBuf,
    done: bool,
}

impl Staging {
    fn new(out: &Path) -> Result<Staging, PackageError> {
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "release".into());
        std::fs::create_dir_all(parent).map_err(|source| PackageError::Write {
            path: parent.to_owned(),
            source,
        })?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = parent.join(format!(".{name}.khub-staging-{}-{nanos}", std::process::id()));
        // create_dir: the mode any new directory gets (0777 less the umask).
        std::fs::create_dir(&dir).map_err(|source| PackageError::Write { path: dir.clone(), source })?;
        Ok(Staging { dir, done: false })
    }

    /// Replaces `out` with the staged release: the old contents (if any) are moved aside,
    /// the staging directory renamed into place, and the old contents then removed.
    fn commit(mut self, out: &Path) -> Result<(), PackageError> {
        let write = |path: &Path| {
            let path = path.to_owned();
            move |source| PackageError::Write { path, source }
        };
        // Beside the staging directory, under its own unique name.
        let mut old = self.dir.clone().into_os_string();
        old.push("-old");
        let old = PathBuf::from(old);
        let had_out = std::fs::symlink_metadata(out).is_ok();
        if had_out {
            std::fs::rename(out, &old).map_err(write(out))?;
        }
        if let Err(e) = std::fs::rename(&self.dir, out) {
            if had_out {
                let _ = std::fs::rename(&old, out);
            }
            return Err(write(out)(e));
        }
        self.done = true;
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            let _ = crate::fsx::sync_dir(parent);
        }
        if had_out {
            std::fs::remove_dir_all(&old).map_err(write(&old))?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Builds, inspects and writes a release directory: `out/khub.toml` and
/// `out/variants/<id>/…`. Returns the manifest and the build report.
pub fn package(
    kernel_dir: &Path,
    out: &Path,
    options: &BuildOptions,
    log: &mut dyn FnMut(&str),
) -> Result<(Manifest, BuildReport), PackageError> {
    let config = PackageConfig::read(kernel_dir)?;
    // Replacing --out must never reach the sources: refuse an output directory that is the
    // kernel directory, holds it, or holds any source or kernel.toml.
    if let Ok(o) = out.canonicalize() {
        let holds = |p: &Path| p.canonicalize().is_ok_and(|p| p.starts_with(&o));
        let sources = config
            .variants
            .iter()
            .flat_map(|v| v.sources.iter())
            .map(|s| kernel_dir.join(s.as_str()));
        if holds(kernel_dir) || holds(&kernel_dir.join(CONFIG_FILE)) || sources.into_iter().any(|s| holds(&s)) {
            return Err(PackageError::OutHoldsSources {
                out: out.to_owned(),
                kernel: kernel_dir.to_owned(),
            });
        }
    }
    // Everything that can be checked before building is; the old release is replaced
    // only by a complete new one (built beside it), never emptied first.
    check_only(&config, &options.only)?;
    check_out(out, options.force)?;
    let staging = Staging::new(out)?;
    let variants_dir = staging.dir.join("variants");
    let mut report = build(kernel_dir, &variants_dir, options, log)?;
    // A skipped variant leaves no directory behind.
    for (id, _) in &report.skipped {
        let dir = variants_dir.join(id);
        if dir.is_dir() {
            std::fs::remove_dir_all(&dir).map_err(|source| PackageError::Write { path: dir.clone(), source })?;
        }
    }
    let mut variants = Vec::new();
    let mut exports: Option<Vec<Export>> = None;
    for built in &report.built {
        let inspected = check_variant(&config, built, options.describe_helper.as_deref())?;
        let device_code: Vec<String> = inspected
            .cuda_code
            .iter()
            .map(ToString::to_string)
            .chain(inspected.hip_targets.iter().map(ToString::to_string))
            .collect();
        log(&format!(
            "inspected `{}`: {} export{}, {}{}{}",
            built.config.id,
            inspected.description.functions.len(),
            if inspected.description.functions.len() == 1 { "" } else { "s" },
            inspected.libc_display,
            if device_code.is_empty() {
                String::new()
            } else {
                format!(", device code [{}]", device_code.join(", "))
            },
            inspected.rocm_version.map(|v| format!(", ROCm {v}")).unwrap_or_default()
        ));
        let from_binary: Vec<Export> = inspected
            .description
            .functions
            .iter()
            .map(|f| Export {
                name: f.name.clone(),
                signature: f.signature.clone(),
            })
            .collect();
        exports.get_or_insert(from_binary);
        let file_name = built.library.file_name().and_then(|n| n.to_str()).unwrap_or("lib.so");
        let rel = RelPath::new(format!("variants/{}/{file_name}", built.config.id)).map_err(|e| PackageError::Mismatch {
            variant: built.config.id.clone(),
            message: e.to_string(),
        })?;
        let bytes = std::fs::read(&built.library).map_err(|source| PackageError::Write {
            path: built.library.clone(),
            source,
        })?;
        let c = &built.config;
        variants.push(Variant {
            id: c.id.clone(),
            backend: c.backend,
            os: Os::Linux,
            arch: this_arch(),
            libc: Some(inspected.libc),
            macos_min: None,
            cpu_level: c.cpu_level,
            cpu_features: c.cpu_features.clone(),
            cuda: c.cuda.as_ref().map(|cc| CudaVariant {
                toolkit: built.toolkit.unwrap_or_default(),
                cudart: cc.cudart,
                code: inspected.cuda_code.clone(),
            }),
            rocm: match (&c.rocm, inspected.rocm_version) {
                (Some(r), Some(version)) => Some(RocmVariant {
                    version,
                    compatible: r.compatible.clone(),
                    targets: inspected.hip_targets.clone(),
                }),
                _ => None,
            },
            metal: None,
            xpu: None,
            priority: c.priority,
            library: rel.clone(),
            files: vec![FileEntry {
                path: rel,
                size: bytes.len() as u64,
                sha256: verify::sha256(&bytes),
            }],
        });
    }
    let manifest = Manifest {
        schema: format!("{SCHEMA_MAJOR}.{SCHEMA_MINOR}"),
        kernel: KernelInfo {
            name: config.kernel.name.clone(),
            version: config.kernel.version.clone(),
            abi: crate::abi::ABI_MAJOR,
            description: config.kernel.description.clone(),
            license: config.kernel.license.clone(),
        },
        exports: exports.unwrap_or_default(),
        variants,
    };
    let text = manifest.to_toml_string()?;
    let path = staging.dir.join("khub.toml");
    crate::fsx::write_atomic(&path, text.as_bytes()).map_err(|e| PackageError::Write { path, source: e.source })?;
    let staged = staging.dir.clone();
    staging.commit(out)?;
    // The report names the libraries where they now are.
    for b in &mut report.built {
        if let Ok(rel) = b.library.strip_prefix(&staged) {
            b.library = out.join(rel);
        }
    }
    Ok((manifest, report))
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests write scratch files directly
mod tests;
