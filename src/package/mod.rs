//! Packaging: a kernel author's sources become a release directory.
//!
//! `kernel.toml` in the kernel directory names the kernel, the functions it exports and the
//! variant matrix. [`build`] compiles each variant into a shared library: C with the `cc`
//! crate's compiler discovery, CUDA with `nvcc` when it is found. [`package`] then inspects
//! every binary and writes the release: the files under `variants/<id>/`, and `khub.toml`
//! derived from the binaries themselves:
//!
//! - exports and signatures from the kernel's own descriptor;
//! - the device code actually embedded (`.nv_fatbin`), which must equal what the variant
//!   declares;
//! - the glibc floor from the highest `GLIBC_x.y` symbol version the library needs;
//! - the CUDA toolkit version from `nvcc --version`;
//! - sizes and SHA-256 of every file.
//!
//! A variant whose toolchain is missing is skipped with a warning, or is an error under
//! `strict`.

pub mod init;
#[cfg(feature = "hub")]
pub mod publish;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use crate::inspect::{InspectError, inspect_file};
use crate::load::{Description, LoadError, describe_library};
use crate::manifest::{CudaVariant, Export, FileEntry, KernelInfo, Manifest, ManifestError, RelPath, SCHEMA_MAJOR, SCHEMA_MINOR, Variant};
use crate::platform::{Backend, CpuArch, CudaArch, CudartLinkage, Libc, LibcFamily, MajorMinor, Os, X86Level};
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
    /// `cpu` or `cuda`.
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

/// Packaging failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PackageError {
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
    /// Only these variant ids (all when empty).
    pub only: Vec<String>,
}

/// One variant that was built.
#[derive(Debug, Clone)]
pub struct BuiltVariant {
    /// The config entry.
    pub config: ConfigVariant,
    /// The shared library.
    pub library: PathBuf,
    /// The toolkit version (CUDA).
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
        let mut ids = BTreeSet::new();
        for v in &config.variants {
            if !ids.insert(&v.id) {
                return Err(invalid(format!("variant id `{}` is used twice", v.id)));
            }
            if v.sources.is_empty() {
                return Err(invalid(format!("variant `{}` lists no sources", v.id)));
            }
            match (v.backend, &v.cuda) {
                (Backend::Cpu, None) | (Backend::Cuda, Some(_)) => {}
                (Backend::Cuda, None) => {
                    return Err(invalid(format!(
                        "variant `{}`: backend cuda needs a `cuda` table with `code`",
                        v.id
                    )));
                }
                (Backend::Cpu, Some(_)) => return Err(invalid(format!("variant `{}`: a cpu variant cannot have a `cuda` table", v.id))),
                (b, _) => {
                    return Err(invalid(format!(
                        "variant `{}`: khub cannot build {b} variants yet; supported: cpu, cuda",
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
    if let Some(p) = std::env::var_os("KHUB_NVCC").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let c = dir.join("nvcc");
        if c.is_file() {
            return Some(c);
        }
    }
    std::env::var_os("CUDA_HOME")
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

/// The include directory holding `khub_kernel.h`: `KHUB_INCLUDE`, else the one next to
/// this crate's sources (a source checkout or `cargo install --path`).
pub fn include_dir() -> PathBuf {
    std::env::var_os("KHUB_INCLUDE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("include"))
}

/// Compiles every variant of the kernel in `kernel_dir` into `out_dir/<id>/lib<name>.so`.
pub fn build(kernel_dir: &Path, out_dir: &Path, options: &BuildOptions, log: &mut dyn FnMut(&str)) -> Result<BuildReport, PackageError> {
    let config = PackageConfig::read(kernel_dir)?;
    let include = include_dir();
    let mut report = BuildReport::default();
    let nvcc = find_nvcc(options.nvcc.as_deref());
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
    /// The device code embedded.
    pub cuda_code: Vec<CudaArch>,
}

/// Inspects a built variant and checks it against the config: the descriptor's identity,
/// backend and exports, and the embedded device code.
pub fn check_variant(config: &PackageConfig, built: &BuiltVariant) -> Result<Inspected, PackageError> {
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
    let description = describe_library(&built.library).map_err(|source| PackageError::Describe {
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
        return Err(mismatch("a cpu variant embeds CUDA device code".into()));
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
    Ok(Inspected {
        description,
        libc,
        cuda_code,
    })
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
    let variants_dir = out.join("variants");
    let report = build(kernel_dir, &variants_dir, options, log)?;
    let mut variants = Vec::new();
    let mut exports: Option<Vec<Export>> = None;
    for built in &report.built {
        let inspected = check_variant(&config, built)?;
        log(&format!(
            "inspected `{}`: {} exports, {}{}",
            built.config.id,
            inspected.description.functions.len(),
            inspected.libc,
            if inspected.cuda_code.is_empty() {
                String::new()
            } else {
                format!(
                    ", device code [{}]",
                    inspected.cuda_code.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                )
            }
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
            rocm: None,
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
    let path = out.join("khub.toml");
    std::fs::write(&path, text).map_err(|source| PackageError::Write { path, source })?;
    Ok((manifest, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gencode_pairs_cubins_with_their_virtual_arch() {
        let code: Vec<CudaArch> = ["sm_80", "sm_90a", "compute_90", "sm_100f"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(
            gencode_args(&code),
            [
                "-gencode=arch=compute_80,code=sm_80",
                "-gencode=arch=compute_90a,code=sm_90a",
                "-gencode=arch=compute_90,code=compute_90",
                "-gencode=arch=compute_100f,code=sm_100f"
            ]
        );
    }

    #[test]
    fn nvcc_version_parses() {
        let text = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88\nBuild cuda_13.0.r13.0/compiler.36424714_0\n";
        assert_eq!(parse_nvcc_version(text), Some(MajorMinor::new(13, 0)));
        assert_eq!(parse_nvcc_version("nothing"), None);
    }
}
