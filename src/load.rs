//! The loader: `dlopen` verified bytes, negotiate the kernel ABI, check the exports, and
//! call the kernel's functions.
//!
//! Design notes:
//! - Nothing is loaded before it is verified: every file of the variant goes through
//!   [`crate::verify::open_verified`] (sealed memfd on Linux), and `dlopen` opens the
//!   sealed copy, never the path the bytes came from.
//! - Libraries are opened with `RTLD_NOW | RTLD_LOCAL` and never unloaded: kernels keep
//!   driver state, thread-locals and function pointers that do not survive `dlclose`.
//!   [`Kernel`] and every [`Function`] taken from it share the library handle.
//! - `load` never opens a socket. Where the bytes come from is a [`FileSource`]: a
//!   [`Release`] directory or the store.

use std::collections::BTreeMap;
use std::ffi::{CStr, c_char, c_void};
use std::mem::ManuallyDrop;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::abi::{self, KernelFn, KhubCall, KhubFunction, KhubKernelDesc, ParamKind, Signature, Status};
use crate::host::HostFacts;
use crate::manifest::{FileEntry, Manifest, RelPath, Sha256Digest, Variant};
use crate::release::{Release, ReleaseError};
use crate::resolve::{NoVariantFits, Preferences};
use crate::verify::{FileSource, VerifyError, open_verified};

/// Loading failed. Every variant says which file or function and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// No variant runs on this host.
    #[error(transparent)]
    NoVariant(#[from] NoVariantFits),
    /// The variant's host code needs an architecture or CPU features this processor does
    /// not have. Host facts from a profile (`--host`) or an override (`KHUB_CPU_LEVEL`) may
    /// describe another machine; running its code here would die with SIGILL.
    #[error(
        "variant `{variant}` needs {needs}, which this processor does not have ({has}); it cannot run on this machine whatever the host facts say (were they simulated with --host, KHUB_HOST_PROFILE or KHUB_CPU_LEVEL?): load it on a matching machine, or choose another variant"
    )]
    CpuUnsupported {
        /// The variant.
        variant: String,
        /// What it needs that is missing.
        needs: String,
        /// What this processor is.
        has: String,
    },
    /// The release directory could not be opened, or its tree holds what it must not.
    #[error(transparent)]
    Release(#[from] ReleaseError),
    /// A file of the variant failed verification.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// A forced variant id is not in the release.
    #[error("the release has no variant `{0}`; `khub explain` lists them")]
    UnknownVariant(String),
    /// The helper process that describes a library failed (the library crashed in its
    /// initialisers, or is not a khub kernel).
    #[error("`{path}`: {message}")]
    Helper {
        /// The library.
        path: String,
        /// What the helper said.
        message: String,
    },
    /// `dlopen` refused the verified library.
    #[error("dlopen of `{path}` failed: {message}")]
    Dlopen {
        /// The library.
        path: String,
        /// What the dynamic loader said.
        message: String,
    },
    /// The library does not export the entry symbol.
    #[error(
        "`{path}` does not export `{}`: it is not a khub kernel (build it against include/khub_kernel.h)",
        abi::ENTRY_SYMBOL
    )]
    NoEntry {
        /// The library.
        path: String,
    },
    /// The kernel returned no descriptor for this khub's ABI.
    #[error(
        "`{path}` refused kernel ABI {}.{} (its entry returned NULL): it was built for another ABI major",
        abi::ABI_MAJOR,
        abi::ABI_MINOR
    )]
    AbiRefused {
        /// The library.
        path: String,
    },
    /// The descriptor is malformed.
    #[error("`{path}` returned a bad descriptor: {problem}")]
    BadDescriptor {
        /// The library.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// A function the manifest declares is not in the kernel's table.
    #[error("the manifest declares `{name}`, but `{path}` does not export it")]
    ExportMissing {
        /// The library.
        path: String,
        /// The function.
        name: String,
    },
    /// A function's signature differs between the manifest and the kernel.
    #[error("`{name}`: the manifest says `{manifest}`, the kernel says `{kernel}`")]
    SignatureMismatch {
        /// The function.
        name: String,
        /// The manifest's signature.
        manifest: String,
        /// The kernel's signature.
        kernel: String,
    },
    /// The kernel names itself differently from the manifest.
    #[error("the kernel reports itself as {kernel}, the manifest says {manifest}")]
    IdentityMismatch {
        /// What the manifest says.
        manifest: String,
        /// What the descriptor says.
        kernel: String,
    },
    /// No function of that name.
    #[error("kernel `{kernel}` has no function `{name}`; it exports: {available}")]
    NoSuchFunction {
        /// The kernel.
        kernel: String,
        /// The function asked for.
        name: String,
        /// What it has.
        available: String,
    },
    /// The Rust type asked for does not match the function's signature.
    #[error("`{name}` has signature `{signature}`, which does not match the requested type `{requested}`")]
    TypeMismatch {
        /// The function.
        name: String,
        /// Its signature.
        signature: String,
        /// The skeleton of the requested type.
        requested: String,
    },
}

/// A kernel function returned an error, or a generic call was malformed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The kernel returned a non-zero status.
    #[error("`{function}` failed with {} ({status}): {message}", abi::status_name(*status))]
    Kernel {
        /// The function.
        function: String,
        /// The status.
        status: Status,
        /// The kernel's message (empty if it wrote none).
        message: String,
    },
    /// The arguments do not match the signature.
    #[error("`{function}` takes `{signature}`, but the call passed ({passed})")]
    Arguments {
        /// The function.
        function: String,
        /// Its signature.
        signature: String,
        /// The kinds passed.
        passed: String,
    },
    /// No function of that name, or it has no self-test.
    #[error("{0}")]
    NotFound(String),
}

/// One function of a loaded kernel.
struct FnEntry {
    signature_text: String,
    signature: Signature,
    func: unsafe extern "C" fn(),
    selftest: Option<abi::SelftestFn>,
}

struct Inner {
    name: String,
    version: String,
    backend: String,
    variant: String,
    abi: (u32, u32),
    files: Vec<FileEntry>,
    library_path: RelPath,
    functions: BTreeMap<String, FnEntry>,
    /// Leaked: kernels are never unloaded.
    _library: &'static libloading::Library,
}

// SAFETY: the descriptor and function table are static and immutable (ABI contract), the
// library is never unloaded, and kernel functions are required to be thread-safe
// (docs/abi.md, "Threading").
unsafe impl Send for Inner {}
// SAFETY: as above; nothing in Inner is mutated after construction.
unsafe impl Sync for Inner {}

/// A loaded, verified kernel. Cheap to clone; all clones share the library.
#[derive(Clone)]
pub struct Kernel {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("name", &self.inner.name)
            .field("version", &self.inner.version)
            .field("variant", &self.inner.variant)
            .finish_non_exhaustive()
    }
}

/// A typed function pointer taken from a [`Kernel`]; it keeps the kernel alive.
#[derive(Clone)]
pub struct Function<F: KernelFn> {
    f: F,
    name: String,
    _kernel: Arc<Inner>,
}

impl<F: KernelFn> Function<F> {
    /// The function pointer. It stays valid as long as this `Function` or its kernel
    /// lives (in fact forever: libraries are never unloaded).
    pub fn get(&self) -> F {
        self.f
    }

    /// The function's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// An argument for the generic call path.
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    /// `tensor`.
    Tensor(*const abi::DLTensor),
    /// `mut tensor`.
    TensorMut(*mut abi::DLTensor),
    /// `f32`.
    F32(f32),
    /// `f64`.
    F64(f64),
    /// `i64`.
    I64(i64),
    /// `u64`.
    U64(u64),
}

impl Arg {
    fn kind(&self) -> ParamKind {
        match self {
            Arg::Tensor(_) => ParamKind::Tensor,
            Arg::TensorMut(_) => ParamKind::TensorMut,
            Arg::F32(_) => ParamKind::F32,
            Arg::F64(_) => ParamKind::F64,
            Arg::I64(_) => ParamKind::I64,
            Arg::U64(_) => ParamKind::U64,
        }
    }
}

/// The result of a self-test.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SelftestReport {
    /// The function.
    pub function: String,
    /// Whether it passed.
    pub passed: bool,
    /// The largest error the test measured.
    pub max_error: f64,
    /// The status it returned.
    pub status: Status,
    /// The kernel's message, if any.
    pub message: String,
}

/// What was loaded, for `khub load` and provenance.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LoadReport {
    /// The kernel's name.
    pub kernel: String,
    /// Its version.
    pub version: String,
    /// The variant loaded.
    pub variant: String,
    /// Its backend.
    pub backend: String,
    /// The kernel ABI version the kernel reported.
    pub abi: String,
    /// The library file.
    pub library: String,
    /// Every file of the variant with its verified digest.
    pub files: Vec<FileReport>,
    /// The exports: name and signature.
    pub exports: Vec<ExportReport>,
}

/// One verified file.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FileReport {
    /// Its path in the release.
    pub path: String,
    /// Its size.
    pub size: u64,
    /// Its SHA-256, checked.
    pub sha256: String,
}

/// One export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ExportReport {
    /// The name.
    pub name: String,
    /// The signature.
    pub signature: String,
    /// Whether it has a self-test.
    pub selftest: bool,
}

/// Loading from a release directory.
impl Release {
    /// Resolves for `host` and loads the best variant.
    pub fn load(&self, host: &HostFacts, prefs: &Preferences) -> Result<Kernel, LoadError> {
        let chosen = crate::resolve::choose(self.manifest(), host, prefs)?;
        self.load_variant(&self.manifest().variants[chosen].id)
    }

    /// Verifies and loads one variant by id, without resolution.
    pub fn load_variant(&self, id: &str) -> Result<Kernel, LoadError> {
        self.check_tree()?;
        let variant = self
            .manifest()
            .variant(id)
            .ok_or_else(|| LoadError::UnknownVariant(id.to_owned()))?;
        load_verified(self, self.manifest(), variant, &|| {})
    }

    /// As [`Release::load_variant`], running `after_verify` between verification and
    /// `dlopen`: for tests that swap files in that window (feature `testing`).
    #[cfg(any(test, feature = "testing"))]
    pub fn load_variant_with_hook(&self, id: &str, after_verify: &dyn Fn()) -> Result<Kernel, LoadError> {
        self.check_tree()?;
        let variant = self
            .manifest()
            .variant(id)
            .ok_or_else(|| LoadError::UnknownVariant(id.to_owned()))?;
        load_verified(self, self.manifest(), variant, after_verify)
    }
}

/// Verifies and loads `variant_id` of `manifest`, reading its files from `source`.
pub fn load_from(source: &dyn FileSource, manifest: &Manifest, variant_id: &str) -> Result<Kernel, LoadError> {
    let variant = manifest
        .variant(variant_id)
        .ok_or_else(|| LoadError::UnknownVariant(variant_id.to_owned()))?;
    load_verified(source, manifest, variant, &|| {})
}

/// Reads a C string from a descriptor field, refusing NULL and absurd lengths.
///
/// # Safety
/// `p` must be NULL or point to a NUL-terminated string that lives as long as the library.
unsafe fn c_str(p: *const c_char, what: &str) -> Result<String, String> {
    if p.is_null() {
        return Err(format!("{what} is NULL"));
    }
    // SAFETY: the caller guarantees a NUL-terminated string; strnlen reads no further
    // than its NUL, and at most 4097 bytes.
    if unsafe { libc::strnlen(p, 4097) } > 4096 {
        return Err(format!("{what} is longer than 4096 bytes"));
    }
    // SAFETY: as above, and its NUL is within 4097 bytes.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map(str::to_owned).map_err(|_| format!("{what} is not UTF-8"))
}

/// What a kernel's descriptor says, after ABI negotiation.
struct Negotiated {
    name: String,
    version: String,
    backend: String,
    abi: (u32, u32),
    functions: BTreeMap<String, FnEntry>,
}

/// Calls the entry point, checks the descriptor and reads the function table. `path` is
/// only used in messages.
fn negotiate(lib: &libloading::Library, path: &str) -> Result<Negotiated, LoadError> {
    let bad = |problem: String| LoadError::BadDescriptor {
        path: path.to_owned(),
        problem,
    };
    // SAFETY: the symbol is looked up as the entry point's declared C type (EntryFn).
    let entry: abi::EntryFn = unsafe { lib.get::<abi::EntryFn>(abi::ENTRY_SYMBOL.as_bytes()) }
        .map(|s| *s)
        .map_err(|_| LoadError::NoEntry { path: path.to_owned() })?;
    // SAFETY: the entry point takes two integers and returns a pointer to static data.
    let desc_ptr = unsafe { entry(abi::ABI_MAJOR, abi::ABI_MINOR) };
    if desc_ptr.is_null() {
        return Err(LoadError::AbiRefused { path: path.to_owned() });
    }
    // SAFETY: non-NULL; the three frozen leading fields exist in every ABI version.
    let (major, minor, size) = unsafe { ((*desc_ptr).abi_major, (*desc_ptr).abi_minor, (*desc_ptr).struct_size) };
    if major != abi::ABI_MAJOR {
        return Err(bad(format!("it reports ABI major {major}, khub asked for {}", abi::ABI_MAJOR)));
    }
    if size < std::mem::size_of::<KhubKernelDesc>() as u64 {
        return Err(bad(format!(
            "struct_size is {size}, smaller than ABI 1.0's {}",
            std::mem::size_of::<KhubKernelDesc>()
        )));
    }
    // SAFETY: struct_size covers every v1.0 field, so the whole struct may be read.
    let desc = unsafe { &*desc_ptr };
    // SAFETY: descriptor strings are static NUL-terminated strings (ABI contract); c_str
    // checks NULL.
    let (name, version, backend) = unsafe {
        (
            c_str(desc.name, "name").map_err(&bad)?,
            c_str(desc.version, "version").map_err(&bad)?,
            c_str(desc.backend, "backend").map_err(&bad)?,
        )
    };
    // The stride must hold a v1.0 entry, keep every entry aligned, and stay small: a
    // stride of 2^62 would overflow the offsets, and an odd one would misalign them.
    if desc.function_size < std::mem::size_of::<KhubFunction>() as u64
        || desc.function_size > 4096
        || !desc.function_size.is_multiple_of(std::mem::align_of::<KhubFunction>() as u64)
        || desc.function_count > 4096
    {
        return Err(bad(format!(
            "function table of {} entries of {} bytes (need {} to 4096 bytes each, a multiple of {}, and at most 4096 entries)",
            desc.function_count,
            desc.function_size,
            std::mem::size_of::<KhubFunction>(),
            std::mem::align_of::<KhubFunction>()
        )));
    }
    if desc.function_count > 0 && desc.functions.is_null() {
        return Err(bad("functions is NULL".into()));
    }
    let mut functions = BTreeMap::new();
    for i in 0..desc.function_count as usize {
        // SAFETY: the table has function_count entries function_size bytes apart;
        // function_size covers the v1.0 khub_function, is a multiple of its alignment and
        // at most 4096, so i * function_size (below 2^24) cannot overflow.
        let f = unsafe {
            &*(desc
                .functions
                .cast::<u8>()
                .add(i * desc.function_size as usize)
                .cast::<KhubFunction>())
        };
        // SAFETY: static NUL-terminated strings (ABI contract).
        let fname = unsafe { c_str(f.name, &format!("functions[{i}].name")).map_err(&bad)? };
        // SAFETY: as above.
        let sig_text = unsafe { c_str(f.signature, &format!("functions[{i}].signature")).map_err(&bad)? };
        let signature = Signature::parse(&sig_text).map_err(|e| bad(e.to_string()))?;
        let func = f.func.ok_or_else(|| bad(format!("function `{fname}` has a NULL pointer")))?;
        let entry = FnEntry {
            signature_text: sig_text,
            signature,
            func,
            selftest: f.selftest,
        };
        if functions.insert(fname.clone(), entry).is_some() {
            return Err(bad(format!("function `{fname}` appears twice")));
        }
    }
    Ok(Negotiated {
        name,
        version,
        backend,
        abi: (major, minor),
        functions,
    })
}

/// This processor's x86-64 level and features, detected once.
fn real_cpu() -> &'static (Option<crate::platform::X86Level>, std::collections::BTreeSet<String>) {
    static CPU: std::sync::OnceLock<(Option<crate::platform::X86Level>, std::collections::BTreeSet<String>)> = std::sync::OnceLock::new();
    CPU.get_or_init(crate::host::probe::cpu_features)
}

/// Refuses a variant whose host code this processor cannot run, from the processor itself
/// (never from host facts, which a profile or an override may have simulated): the
/// architecture, the x86-64 level and every named CPU feature. Loading runs the library's
/// initialisers and calls run its code, so this comes before both.
pub fn check_cpu(variant: &Variant) -> Result<(), LoadError> {
    let this = crate::host::probe::this_arch();
    let refuse = |needs: String, has: String| LoadError::CpuUnsupported {
        variant: variant.id.clone(),
        needs,
        has,
    };
    if variant.arch != this {
        return Err(refuse(format!("a {} processor", variant.arch), format!("{this}")));
    }
    let (level, features) = real_cpu();
    let has = || match level {
        Some(l) => format!("{this}, level {l}"),
        None => format!("{this}"),
    };
    if let (Some(need), Some(have)) = (variant.cpu_level, level)
        && need > *have
    {
        return Err(refuse(format!("x86-64 level {need}"), has()));
    }
    let missing: Vec<&str> = variant
        .cpu_features
        .iter()
        .filter(|f| !features.contains(*f))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(refuse(
            format!(
                "the CPU feature{} {}",
                if missing.len() == 1 { "" } else { "s" },
                missing.join(", ")
            ),
            has(),
        ));
    }
    Ok(())
}

fn load_verified(source: &dyn FileSource, manifest: &Manifest, variant: &Variant, after_verify: &dyn Fn()) -> Result<Kernel, LoadError> {
    check_cpu(variant)?;
    // Verify every file first; keep the library's private copy for dlopen.
    let mut library = None;
    for entry in &variant.files {
        let v = open_verified(source, variant, entry)?;
        if entry.path == variant.library {
            library = Some(v);
        }
    }
    let lib_path = variant.library.clone();
    let mut verified = library.ok_or_else(|| LoadError::BadDescriptor {
        path: lib_path.to_string(),
        problem: "the library is not among the variant's files".into(),
    })?;
    after_verify();
    let lib_digest = variant.files.iter().find(|f| f.path == lib_path).map(|f| f.sha256);
    // One load at a time in the process, from the lookup to the record: two threads
    // loading the same bytes at once would otherwise each map a copy (with its own global
    // state), and the name check below must not race another load. Nothing in the map
    // can be half-written, so a poisoned lock is taken as it is.
    let mut loaded = loaded_registry().lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let lib = match lib_digest.and_then(|d| loaded.get(&d).copied()) {
        // The same verified bytes are already mapped: reuse them rather than map a copy.
        Some(lib) => lib,
        None => {
            verified.claim_unused_name().map_err(|e| LoadError::Dlopen {
                path: lib_path.to_string(),
                message: format!("cannot find a free name for the verified copy: {e}"),
            })?;
            let lib = dlopen(&verified.load_path()).map_err(|message| LoadError::Dlopen {
                path: lib_path.to_string(),
                message,
            })?;
            let lib: &'static libloading::Library = Box::leak(Box::new(lib));
            // Keep the memfd open for the life of the process: glibc identifies loaded
            // objects by path too, and a closed fd number reused by the next kernel's
            // memfd would make `/proc/self/fd/N` name this library.
            verified.keep_open();
            if let Some(d) = lib_digest {
                loaded.entry(d).or_insert(lib);
            }
            lib
        }
    };
    drop(loaded);
    let n = negotiate(lib, lib_path.as_str())?;
    if n.name != manifest.kernel.name || n.version != manifest.kernel.version.to_string() {
        return Err(LoadError::IdentityMismatch {
            manifest: format!("{} {}", manifest.kernel.name, manifest.kernel.version),
            kernel: format!("{} {}", n.name, n.version),
        });
    }
    // The manifest's exports must all be there, with the same signatures.
    for e in &manifest.exports {
        let f = n.functions.get(&e.name).ok_or_else(|| LoadError::ExportMissing {
            path: lib_path.to_string(),
            name: e.name.clone(),
        })?;
        let same = Signature::parse(&e.signature).is_ok_and(|m| m == f.signature);
        if !same {
            return Err(LoadError::SignatureMismatch {
                name: e.name.clone(),
                manifest: e.signature.clone(),
                kernel: f.signature_text.clone(),
            });
        }
    }
    Ok(Kernel {
        inner: Arc::new(Inner {
            name: n.name,
            version: n.version,
            backend: n.backend,
            variant: variant.id.clone(),
            abi: n.abi,
            files: variant.files.clone(),
            library_path: lib_path,
            functions: n.functions,
            _library: lib,
        }),
    })
}

/// Libraries loaded so far, by the SHA-256 of their bytes. Never emptied: libraries are
/// never unloaded.
fn loaded_registry() -> &'static std::sync::Mutex<BTreeMap<Sha256Digest, &'static libloading::Library>> {
    static LOADED: std::sync::OnceLock<std::sync::Mutex<BTreeMap<Sha256Digest, &'static libloading::Library>>> = std::sync::OnceLock::new();
    LOADED.get_or_init(Default::default)
}

/// What a kernel library's descriptor declares, read by loading it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Description {
    /// The kernel's name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Its backend.
    pub backend: String,
    /// The ABI version it was built with, `major.minor`.
    pub abi: String,
    /// Its functions.
    pub functions: Vec<ExportReport>,
}

/// Loads a library **without verification** and reads its descriptor: for packaging and
/// inspecting libraries one built oneself. Running the library's initialisers is the
/// caller's decision; `khub inspect` does this in a child process. The library is never
/// unloaded.
pub fn describe_library(path: &Path) -> Result<Description, LoadError> {
    let shown = path.display().to_string();
    let abs = std::path::absolute(path).map_err(|source| {
        LoadError::Verify(crate::verify::VerifyError::Io {
            what: "cannot resolve",
            path: shown.clone(),
            source,
        })
    })?;
    let lib = dlopen(&abs).map_err(|message| LoadError::Dlopen {
        path: shown.clone(),
        message,
    })?;
    let lib = ManuallyDrop::new(lib);
    let n = negotiate(&lib, &shown)?;
    Ok(Description {
        name: n.name,
        version: n.version,
        backend: n.backend,
        abi: format!("{}.{}", n.abi.0, n.abi.1),
        functions: n
            .functions
            .iter()
            .map(|(name, f)| ExportReport {
                name: name.clone(),
                signature: f.signature_text.clone(),
                selftest: f.selftest.is_some(),
            })
            .collect(),
    })
}

/// The hidden `khub` subcommand that describes a library in a helper process.
pub const DESCRIBE_SUBCOMMAND: &str = "__describe";

/// As [`describe_library`], in a helper process: runs `<helper> __describe LIB` (the `khub`
/// binary, or any program that prints [`describe_library`]'s result as JSON) so the
/// library's initialisers cannot affect this process.
pub fn describe_library_in(helper: &Path, path: &Path) -> Result<Description, LoadError> {
    let shown = path.display().to_string();
    let out = std::process::Command::new(helper)
        .arg(DESCRIBE_SUBCOMMAND)
        .arg(path)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| {
            LoadError::Verify(crate::verify::VerifyError::Io {
                what: "cannot run the describe helper for",
                path: shown.clone(),
                source,
            })
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(LoadError::Helper {
            path: shown,
            message: match stderr.trim() {
                "" => format!("the helper {} exited with {}", helper.display(), out.status),
                s => s.trim_start_matches("error: ").to_owned(),
            },
        });
    }
    serde_json::from_slice(&out.stdout).map_err(|e| LoadError::Helper {
        path: shown,
        message: format!("the helper {} printed no description: {e}", helper.display()),
    })
}

#[cfg(unix)]
fn dlopen(path: &Path) -> Result<libloading::Library, String> {
    use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
    // SAFETY: the bytes behind `path` were verified against the manifest just before, and
    // cannot change (sealed memfd). Running their initialisers is what loading means.
    unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL) }
        .map(Into::into)
        .map_err(|e| match std::error::Error::source(&e) {
            Some(c) => c.to_string(),
            None => e.to_string(),
        })
}

#[cfg(not(unix))]
fn dlopen(path: &Path) -> Result<libloading::Library, String> {
    // SAFETY: as above; the verified private copy is read-only.
    unsafe { libloading::Library::new(path) }.map_err(|e| e.to_string())
}

/// The size of the error buffer handed to kernels.
const ERROR_CAPACITY: usize = 1024;

impl Kernel {
    /// The kernel's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The kernel's version.
    pub fn version(&self) -> &str {
        &self.inner.version
    }

    /// The variant that was loaded.
    pub fn variant(&self) -> &str {
        &self.inner.variant
    }

    /// The backend the descriptor reports.
    pub fn backend(&self) -> &str {
        &self.inner.backend
    }

    /// The kernel ABI version the kernel was built with.
    pub fn abi_version(&self) -> (u32, u32) {
        self.inner.abi
    }

    /// The exported functions' names.
    pub fn functions(&self) -> impl Iterator<Item = &str> {
        self.inner.functions.keys().map(String::as_str)
    }

    /// The parsed signature of a function.
    pub fn signature(&self, name: &str) -> Option<&Signature> {
        self.inner.functions.get(name).map(|f| &f.signature)
    }

    fn entry(&self, name: &str) -> Result<&FnEntry, LoadError> {
        self.inner.functions.get(name).ok_or_else(|| LoadError::NoSuchFunction {
            kernel: self.inner.name.clone(),
            name: name.to_owned(),
            available: self.inner.functions.keys().cloned().collect::<Vec<_>>().join(", "),
        })
    }

    /// A typed function pointer, checked against the function's signature string.
    ///
    /// ```ignore
    /// type SiluAndMul = unsafe extern "C" fn(*const KhubCall, *mut DLTensor, *const DLTensor) -> Status;
    /// let f = kernel.function::<SiluAndMul>("silu_and_mul")?;
    /// ```
    pub fn function<F: KernelFn>(&self, name: &str) -> Result<Function<F>, LoadError> {
        let f = self.raw_function(name, &F::kinds())?;
        Ok(Function {
            // SAFETY: `raw_function` checked that the signature's parameter kinds equal F's,
            // and every kind is passed as a pointer, so the C type of the function is F.
            f: unsafe { F::from_raw(f) },
            name: name.to_owned(),
            _kernel: Arc::clone(&self.inner),
        })
    }

    /// The untyped function pointer of `name`, after checking that its signature takes
    /// exactly the parameter kinds `kinds`. For FFI layers (the C API) that hand the
    /// pointer on; Rust callers want [`Kernel::function`]. The pointer stays valid for the
    /// life of the process (libraries are never unloaded).
    pub fn raw_function(&self, name: &str, kinds: &[ParamKind]) -> Result<unsafe extern "C" fn(), LoadError> {
        let e = self.entry(name)?;
        if kinds != e.signature.kinds().as_slice() {
            let kinds: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
            return Err(LoadError::TypeMismatch {
                name: name.to_owned(),
                signature: e.signature_text.clone(),
                requested: format!("({})", kinds.join(", ")),
            });
        }
        Ok(e.func)
    }

    /// Calls a function through the generic path: arguments are checked against the
    /// signature, then passed as the pointers the ABI prescribes.
    ///
    /// # Safety
    /// Tensor arguments must point to valid `DLTensor`s whose data the kernel may read
    /// (and write, for `TensorMut`) for the duration of the call; `stream` must be NULL or
    /// a stream of the kernel's backend.
    pub unsafe fn call(&self, name: &str, args: &[Arg], stream: *mut c_void) -> Result<(), CallError> {
        let e = self.entry(name).map_err(|e| CallError::NotFound(e.to_string()))?;
        let kinds: Vec<ParamKind> = args.iter().map(Arg::kind).collect();
        if kinds != e.signature.kinds() {
            let passed: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
            return Err(CallError::Arguments {
                function: name.to_owned(),
                signature: e.signature_text.clone(),
                passed: passed.join(", "),
            });
        }
        // Scalars are passed by pointer: keep them alive in this frame, in u64 slots so
        // that a `const double *` or `const int64_t *` is 8-byte aligned whatever the
        // global allocator (the bytes are as before: an f32 in the slot's first four).
        let scalars: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::F32(v) => {
                    let mut b = [0u8; 8];
                    b[..4].copy_from_slice(&v.to_ne_bytes());
                    b
                }
                Arg::F64(v) => v.to_ne_bytes(),
                Arg::I64(v) => v.to_ne_bytes(),
                Arg::U64(v) => v.to_ne_bytes(),
                Arg::Tensor(_) | Arg::TensorMut(_) => [0u8; 8],
            })
            .map(u64::from_ne_bytes)
            .collect();
        let ptrs: Vec<*mut c_void> = args
            .iter()
            .zip(&scalars)
            .map(|(a, s)| match *a {
                Arg::Tensor(t) => t as *mut c_void,
                Arg::TensorMut(t) => t.cast(),
                _ => std::ptr::from_ref::<u64>(s).cast_mut().cast::<c_void>(),
            })
            .collect();
        let mut err = [0 as c_char; ERROR_CAPACITY];
        let call = KhubCall {
            struct_size: std::mem::size_of::<KhubCall>() as u32,
            flags: 0,
            stream,
            error: err.as_mut_ptr(),
            error_capacity: ERROR_CAPACITY,
        };
        // SAFETY: every parameter of a kernel function is a pointer (ABI v1), so the
        // function's C type is fn(const khub_call*, void*, …, void*) with one pointer per
        // parameter; arity was checked against the signature above, and the pointees
        // outlive the call (the caller's contract, and `scalars` in this frame).
        let status = unsafe { call_pointers(e.func, &call, &ptrs) };
        status_result(name, status, &err)
    }

    /// Runs a function's self-test on `n` generated elements.
    pub fn selftest(&self, name: &str, seed: u64, n: usize) -> Result<SelftestReport, CallError> {
        let e = self.entry(name).map_err(|e| CallError::NotFound(e.to_string()))?;
        let test = e
            .selftest
            .ok_or_else(|| CallError::NotFound(format!("`{name}` has no self-test")))?;
        let mut err = [0 as c_char; ERROR_CAPACITY];
        let call = KhubCall {
            struct_size: std::mem::size_of::<KhubCall>() as u32,
            flags: 0,
            stream: std::ptr::null_mut(),
            error: err.as_mut_ptr(),
            error_capacity: ERROR_CAPACITY,
        };
        let mut max_error = f64::NAN;
        // SAFETY: the self-test's C type is khub_selftest_fn; all pointers are valid locals.
        let status = unsafe { test(&call, seed, n, &mut max_error) };
        Ok(SelftestReport {
            function: name.to_owned(),
            passed: status == abi::OK,
            max_error,
            status,
            message: message(&err),
        })
    }

    /// What was loaded: identity, variant, verified digests, ABI version and exports.
    pub fn report(&self) -> LoadReport {
        let i = &self.inner;
        LoadReport {
            kernel: i.name.clone(),
            version: i.version.clone(),
            variant: i.variant.clone(),
            backend: i.backend.clone(),
            abi: format!("{}.{}", i.abi.0, i.abi.1),
            library: i.library_path.to_string(),
            files: i
                .files
                .iter()
                .map(|f| FileReport {
                    path: f.path.to_string(),
                    size: f.size,
                    sha256: f.sha256.to_string(),
                })
                .collect(),
            exports: i
                .functions
                .iter()
                .map(|(n, f)| ExportReport {
                    name: n.clone(),
                    signature: f.signature_text.clone(),
                    selftest: f.selftest.is_some(),
                })
                .collect(),
        }
    }
}

fn message(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn status_result(name: &str, status: Status, err: &[c_char]) -> Result<(), CallError> {
    if status == abi::OK {
        Ok(())
    } else {
        Err(CallError::Kernel {
            function: name.to_owned(),
            status,
            message: message(err),
        })
    }
}

/// Calls `f` with the call context and `ptrs.len()` pointer arguments.
///
/// # Safety
/// `f` must be a kernel function taking exactly `ptrs.len()` pointer parameters after the
/// `khub_call`, and every pointer must be valid for it.
unsafe fn call_pointers(f: unsafe extern "C" fn(), call: &KhubCall, ptrs: &[*mut c_void]) -> Status {
    type P = *mut c_void;
    let c: *const KhubCall = call;
    macro_rules! arity {
        ($($i:literal),*) => {{
            // SAFETY: the caller guarantees the function's type has this arity; all
            // function pointers share one representation.
            let g = unsafe { std::mem::transmute::<unsafe extern "C" fn(), unsafe extern "C" fn(*const KhubCall $(, arity!(@ty $i))*) -> Status>(f) };
            // SAFETY: as above.
            unsafe { g(c $(, ptrs[$i])*) }
        }};
        (@ty $i:literal) => { P };
    }
    match ptrs.len() {
        0 => arity!(),
        1 => arity!(0),
        2 => arity!(0, 1),
        3 => arity!(0, 1, 2),
        4 => arity!(0, 1, 2, 3),
        5 => arity!(0, 1, 2, 3, 4),
        6 => arity!(0, 1, 2, 3, 4, 5),
        7 => arity!(0, 1, 2, 3, 4, 5, 6),
        8 => arity!(0, 1, 2, 3, 4, 5, 6, 7),
        9 => arity!(0, 1, 2, 3, 4, 5, 6, 7, 8),
        10 => arity!(0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
        11 => arity!(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10),
        12 => arity!(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11),
        13 => arity!(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12),
        14 => arity!(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13),
        15 => arity!(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14),
        16 => arity!(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _ => abi::ERR_INVALID_ARGUMENT,
    }
}
