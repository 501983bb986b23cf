//! `khub._khub`: the Rust half of the Python package `khub` (python/khub wraps it).
//!
//! The same front door as Rust and C hosts: a [`Hub`] resolves, fetches, verifies and
//! loads; a loaded kernel's functions take any DLPack producer (torch, numpy ≥ 1.23, jax,
//! cupy) zero-copy. Arguments are checked against the export's signature before the call
//! (check.rs), tensors are imported and handed back by the DLPack rules (dlpack.rs), the
//! call itself goes through [`Kernel::call`], the generic path the C API uses, with the
//! GIL released. Errors become `khub.Error` subclasses (errors.rs).

#![deny(unsafe_op_in_unsafe_fn)]

mod check;
mod dlpack;
mod errors;

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use khub::abi::{DL_CUDA, DL_ROCM, ParamKind, Signature};
use khub::host::{Environment, HostFacts, ProbeOptions};
use khub::hub::{Hub, HubOptions, Origin, RegistrySpec};
use khub::load::{Arg, Kernel};
use khub::lock::Lockfile;
use khub::manifest::Manifest;
use khub::registry::RepoId;
use khub::resolve::{Explain, ExplainRelease, Preferences, resolve};
use pyo3::exceptions::PyAttributeError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use serde_json::Value;

/// Parses a JSON document into Python objects (dicts, lists, str, int, float, None).
fn to_python<'py>(py: Python<'py>, doc: &impl serde::Serialize) -> PyResult<Bound<'py, PyAny>> {
    let text = serde_json::to_string(doc).map_err(|e| errors::other(khub::capi::KHUB_E_INTERNAL, &e))?;
    py.import("json")?.call_method1("loads", (text,))
}

fn repo_id(repo: &str) -> PyResult<RepoId> {
    repo.parse()
        .map_err(|e: khub::RepoIdError| errors::other(khub::capi::KHUB_E_INVALID_ARGUMENT, &e))
}

/// Probe options from the process environment and an optional host profile.
fn probe_options(profile: Option<PathBuf>) -> PyResult<ProbeOptions> {
    let mut o = ProbeOptions::from_env().map_err(|e| errors::other(khub::capi::KHUB_E_HOST, &e))?;
    if profile.is_some() {
        o.profile = profile;
    }
    Ok(o)
}

/// An open hub: host facts, a registry and the store. Python: `khub.Hub`.
#[pyclass(module = "khub", name = "Hub", frozen)]
struct PyHub {
    hub: Hub,
    registry: String,
    preferences: Preferences,
}

#[pymethods]
impl PyHub {
    /// Opens a hub. Every argument left `None` comes from the environment, as for the
    /// command line: `KHUB_REGISTRY` (or `HF_ENDPOINT`), `KHUB_CACHE`, `KHUB_OFFLINE` (or
    /// `HF_HUB_OFFLINE`), `KHUB_TRUST_POLICY`, `KHUB_HOST_PROFILE`, `KHUB_STATE_DIR`.
    #[new]
    #[pyo3(signature = (registry=None, cache=None, offline=None, trust=None, host=None, state_dir=None))]
    fn new(
        py: Python<'_>,
        registry: Option<PathBuf>,
        cache: Option<PathBuf>,
        offline: Option<bool>,
        trust: Option<PathBuf>,
        host: Option<PathBuf>,
        state_dir: Option<PathBuf>,
    ) -> PyResult<Self> {
        let registry = registry.map(|r| r.to_string_lossy().into_owned());
        // Settings become part of the environment snapshot, as the C API does it, so
        // everything derived from it (host facts, store, trust policy) sees them once.
        let mut env = Environment::capture();
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());
        for (var, value) in [
            (khub::env::KHUB_REGISTRY, registry.clone()),
            (khub::env::KHUB_CACHE, path(&cache)),
            (khub::env::KHUB_TRUST_POLICY, path(&trust)),
            (khub::env::HOST_PROFILE, path(&host)),
            (khub::env::KHUB_STATE_DIR, path(&state_dir)),
        ] {
            if let Some(v) = value {
                env.set(var, v.as_str());
            }
        }
        py.detach(move || {
            let mut options = HubOptions::from_env(env).map_err(errors::hub)?;
            if let Some(r) = &registry {
                options.registry = RegistrySpec::parse(r);
            }
            if let Some(off) = offline {
                options.offline = off;
            }
            let registry = options.registry.describe();
            let preferences = options.preferences.clone();
            Ok(PyHub {
                hub: Hub::new(options).map_err(errors::hub)?,
                registry,
                preferences,
            })
        })
    }

    /// The registry, as the store's index names it.
    #[getter]
    fn registry(&self) -> String {
        self.registry.clone()
    }

    /// Whether offline mode is on.
    #[getter]
    fn offline(&self) -> bool {
        self.hub.offline()
    }

    /// The store's root directory.
    #[getter]
    fn cache(&self) -> PathBuf {
        self.hub.store().root().to_path_buf()
    }

    /// The host facts this hub resolves for (the `facts` of `khub host --json`).
    #[getter]
    fn host<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_python(py, self.hub.host())
    }

    /// Resolves `repo` at the highest release matching `version`, fetches what the store
    /// lacks, verifies every byte and loads the variant for this host.
    #[pyo3(signature = (repo, version="*"))]
    fn load(&self, py: Python<'_>, repo: &str, version: &str) -> PyResult<PyKernel> {
        let id = repo_id(repo)?;
        let (release, kernel) = py
            .detach(|| self.hub.load_release(&id, version).map_err(Box::new))
            .map_err(|e| errors::hub(*e))?;
        Ok(PyKernel::new(kernel, Origin::resolved(version, self.registry.clone(), &release)))
    }

    /// Loads `repo` exactly as the lockfile pins it: manifest and files from the store,
    /// checked against the lock's digests; no registry request, no version resolution.
    fn load_locked(&self, py: Python<'_>, lock_path: PathBuf, repo: &str) -> PyResult<PyKernel> {
        let id = repo_id(repo)?;
        let (kernel, entry) = py.detach(|| -> Result<_, PyErr> {
            let lock = Lockfile::read(&lock_path).map_err(|e| errors::hub(e.into()))?;
            let kernel = self.hub.load_locked(&lock, &lock_path, &id).map_err(errors::hub)?;
            let entry = lock.get(&id).cloned();
            Ok((kernel, entry))
        })?;
        let entry = entry.ok_or_else(|| {
            errors::hub(
                khub::lock::LockError::NotLocked {
                    path: lock_path.clone(),
                    repo: id.clone(),
                }
                .into(),
            )
        })?;
        Ok(PyKernel::new(kernel, Origin::locked(&entry, &lock_path)))
    }

    /// The explain document for `repo` at `version` (that of `khub explain --json`, plus
    /// the release it was resolved from): every variant ranked or rejected with its reason.
    /// Fetches no variant and loads nothing.
    #[pyo3(signature = (repo, version="*"))]
    fn explain<'py>(&self, py: Python<'py>, repo: &str, version: &str) -> PyResult<Bound<'py, PyAny>> {
        let id = repo_id(repo)?;
        let release = py
            .detach(|| self.hub.resolve_release(&id, version).map_err(Box::new))
            .map_err(|e| errors::hub(*e))?;
        let resolution = resolve(&release.manifest, self.hub.host(), &self.preferences);
        let doc = Explain::new(&resolution, self.hub.host()).with_release(ExplainRelease {
            repo: id.to_string(),
            requirement: version,
            registry: &self.registry,
            version: release.version.to_string(),
            commit: &release.commit,
        });
        to_python(py, &doc)
    }

    fn __repr__(&self) -> String {
        format!(
            "khub.Hub(registry={:?}, cache={:?}, offline={})",
            self.registry,
            self.hub.store().root().display().to_string(),
            if self.hub.offline() { "True" } else { "False" }
        )
    }
}

/// One export of a loaded kernel.
struct Export {
    name: String,
    signature: Signature,
    text: String,
}

/// A loaded, verified kernel. Python: `khub.Kernel`.
#[pyclass(module = "khub", name = "Kernel", frozen)]
struct PyKernel {
    kernel: Kernel,
    origin: Origin,
    exports: BTreeMap<String, Arc<Export>>,
}

impl PyKernel {
    fn new(kernel: Kernel, origin: Origin) -> Self {
        let exports = kernel
            .report()
            .exports
            .into_iter()
            .filter_map(|e| {
                let signature = kernel.signature(&e.name)?.clone();
                Some((
                    e.name.clone(),
                    Arc::new(Export {
                        name: e.name,
                        signature,
                        text: e.signature,
                    }),
                ))
            })
            .collect();
        PyKernel { kernel, origin, exports }
    }

    fn export(&self, name: &str) -> PyResult<&Arc<Export>> {
        self.exports.get(name).ok_or_else(|| {
            errors::raise(
                khub::capi::KHUB_E_NOT_FOUND,
                vec![format!(
                    "kernel `{}` has no function `{name}`; it exports: {}",
                    self.kernel.name(),
                    self.exports.keys().cloned().collect::<Vec<_>>().join(", ")
                )],
                None,
            )
        })
    }
}

#[pymethods]
impl PyKernel {
    /// The exported functions' names, sorted.
    #[getter]
    fn functions(&self) -> Vec<String> {
        self.exports.keys().cloned().collect()
    }

    /// What was loaded and where it came from: kernel, version, variant, backend, ABI,
    /// library, files with their verified SHA-256, exports with their signatures, and the
    /// provenance (repo, registry, source, lockfile, commit, manifest digest, signature
    /// status).
    #[getter]
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let mut doc = serde_json::to_value(self.kernel.report()).map_err(|e| errors::other(khub::capi::KHUB_E_INTERNAL, &e))?;
        let origin = serde_json::to_value(&self.origin).map_err(|e| errors::other(khub::capi::KHUB_E_INTERNAL, &e))?;
        if let (Value::Object(d), Value::Object(o)) = (&mut doc, origin) {
            d.extend(o);
        }
        to_python(py, &doc)
    }

    /// The signature string of a function.
    fn signature(&self, name: &str) -> PyResult<String> {
        Ok(self.export(name)?.text.clone())
    }

    /// Runs the self-tests (of `name`, or of every export that has one) on `n` generated
    /// elements; returns `{name: report}`, each report with `passed`, `max_error`,
    /// `status` and `message`.
    #[pyo3(signature = (name=None, seed=42, n=65536))]
    fn selftest<'py>(&self, py: Python<'py>, name: Option<&str>, seed: u64, n: usize) -> PyResult<Bound<'py, PyAny>> {
        let names: Vec<String> = match name {
            Some(n) => vec![self.export(n)?.name.clone()],
            None => self
                .kernel
                .report()
                .exports
                .into_iter()
                .filter(|e| e.selftest)
                .map(|e| e.name)
                .collect(),
        };
        let kernel = self.kernel.clone();
        let reports = py
            .detach(move || {
                names
                    .iter()
                    .map(|f| kernel.selftest(f, seed, n).map(|r| (f.clone(), r)))
                    .collect::<Result<BTreeMap<_, _>, _>>()
            })
            .map_err(errors::call)?;
        to_python(py, &reports)
    }

    /// Calls function `name` with `args`: tensors (any object with `__dlpack__`) and
    /// numbers, in the signature's order.
    #[pyo3(signature = (name, *args))]
    fn call(&self, py: Python<'_>, name: &str, args: &Bound<'_, PyTuple>) -> PyResult<()> {
        let export = Arc::clone(self.export(name)?);
        call_export(py, &self.kernel, &export, args)
    }

    fn __getattr__(&self, name: &str) -> PyResult<PyFunction> {
        match self.exports.get(name) {
            Some(e) => Ok(PyFunction {
                kernel: self.kernel.clone(),
                export: Arc::clone(e),
            }),
            None => Err(PyAttributeError::new_err(format!(
                "kernel `{}` has no attribute or function `{name}`; it exports: {}",
                self.kernel.name(),
                self.exports.keys().cloned().collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    fn __dir__(&self) -> Vec<String> {
        let mut names: Vec<String> = ["functions", "info", "signature", "selftest", "call"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        names.extend(self.exports.keys().cloned());
        names
    }

    fn __repr__(&self) -> String {
        format!(
            "<khub.Kernel {} {} variant {} ({}), functions: {}>",
            self.kernel.name(),
            self.kernel.version(),
            self.kernel.variant(),
            self.kernel.backend(),
            self.exports.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    }
}

/// One function of a loaded kernel, callable. Python: `khub.Function`.
#[pyclass(module = "khub", name = "Function", frozen)]
struct PyFunction {
    kernel: Kernel,
    export: Arc<Export>,
}

#[pymethods]
impl PyFunction {
    /// The function's name.
    #[getter]
    fn name(&self) -> String {
        self.export.name.clone()
    }

    /// The function's signature string.
    #[getter]
    fn signature(&self) -> String {
        self.export.text.clone()
    }

    #[pyo3(signature = (*args))]
    fn __call__(&self, py: Python<'_>, args: &Bound<'_, PyTuple>) -> PyResult<()> {
        call_export(py, &self.kernel, &self.export, args)
    }

    fn __repr__(&self) -> String {
        format!("<khub.Function {}{}>", self.export.name, self.export.text)
    }
}

/// One parameter as the signature writes it: `mut tensor<f32>[n, d]`.
fn param_text(p: &khub::abi::Param) -> String {
    let s = Signature { params: vec![p.clone()] }.to_string();
    s.trim_start_matches('(').trim_end_matches(')').to_owned()
}

/// The raw pointers of one call, moved to the thread-free section of the call.
struct CallArgs(Vec<Arg>);
// SAFETY: the pointers refer to tensors owned by `managed` in `call_export`, which keeps
// them alive (and unmoved) until after the GIL-free section returns; nothing else touches
// them meanwhile.
unsafe impl Send for CallArgs {}

impl CallArgs {
    /// Unpacks inside the closure (a method call, so the closure captures the whole
    /// `Send` wrapper, not its field).
    fn into_inner(self) -> Vec<Arg> {
        self.0
    }
}

/// The current stream of the framework `obj` belongs to, on its device (torch, cupy), as
/// an address; `None` for frameworks khub does not know (the default stream is used).
fn framework_stream(obj: &Bound<'_, PyAny>, device_id: i32) -> PyResult<Option<usize>> {
    let py = obj.py();
    let module = obj.get_type().module()?.to_string();
    if module.starts_with("torch") {
        let stream = py.import("torch")?.getattr("cuda")?.call_method1("current_stream", (device_id,))?;
        return Ok(Some(stream.getattr("cuda_stream")?.extract::<usize>()?));
    }
    if module.starts_with("cupy") {
        let stream = py.import("cupy")?.getattr("cuda")?.call_method0("get_current_stream")?;
        return Ok(Some(stream.getattr("ptr")?.extract::<usize>()?));
    }
    Ok(None)
}

/// Checks `args` against the export's signature, imports the tensors through DLPack and
/// calls the function with the GIL released.
fn call_export(py: Python<'_>, kernel: &Kernel, export: &Export, args: &Bound<'_, PyTuple>) -> PyResult<()> {
    let params = &export.signature.params;
    let name = &export.name;
    if args.len() != params.len() {
        return Err(errors::signature(format!(
            "`{name}` takes {} argument{} {}, but the call passed {}",
            params.len(),
            if params.len() == 1 { "" } else { "s" },
            export.text,
            args.len()
        )));
    }
    let backend = kernel.backend();
    let Some(expected_device) = check::backend_device(backend) else {
        return Err(errors::signature(format!(
            "`{name}` runs on the {backend} backend, whose tensors the Python package cannot pass yet"
        )));
    };
    // For GPU kernels: the stream of the framework of the first tensor argument. The
    // producer is told it (so it orders its pending work before our use), and the kernel
    // enqueues on it.
    let mut kernel_stream: usize = 0;
    let mut producer_stream: Option<isize> = None;
    if expected_device == DL_CUDA || expected_device == DL_ROCM {
        let first_tensor = params
            .iter()
            .zip(args.iter())
            .find(|(p, _)| matches!(p.kind, ParamKind::Tensor | ParamKind::TensorMut));
        if let Some((_, obj)) = first_tensor
            && let Some((_, device_id)) = dlpack::device_of(&obj)
            && let Some(s) = framework_stream(&obj, device_id)?
        {
            kernel_stream = s;
            // DLPack: 1 is CUDA's legacy default stream (0 is not allowed); on ROCm, 0 is
            // the default stream.
            producer_stream = Some(if s == 0 && expected_device == DL_CUDA { 1 } else { s as isize });
        }
    }
    let mut managed: Vec<dlpack::Managed> = Vec::with_capacity(params.len());
    let mut call_args: Vec<Arg> = Vec::with_capacity(params.len());
    let mut bindings = check::Bindings::default();
    let mut first_device = None;
    for (i, (param, obj)) in params.iter().zip(args.iter()).enumerate() {
        let label = || format!("argument {i} (`{}`) of `{name}`", param_text(param));
        match param.kind {
            ParamKind::Tensor | ParamKind::TensorMut => {
                let m = dlpack::import(&obj, producer_stream).map_err(|e| errors::signature(format!("{}: {e}", label())))?;
                if param.kind == ParamKind::TensorMut {
                    if m.flags() & dlpack::FLAG_READ_ONLY != 0 {
                        return Err(errors::signature(format!(
                            "{}: the tensor is read-only (its DLPack export says so), and the function writes it; pass a writable tensor",
                            label()
                        )));
                    }
                    if m.flags() & dlpack::FLAG_IS_COPIED != 0 {
                        return Err(errors::signature(format!(
                            "{}: the producer exported a copy, so what the function writes would be lost; pass a tensor it can export without copying",
                            label()
                        )));
                    }
                }
                let ptr = m.tensor();
                // SAFETY: `ptr` points into the managed tensor `m`, live until `m` drops.
                let view = check::TensorView { tensor: unsafe { &*ptr } };
                check::check_tensor(i, param, &view, expected_device, &mut first_device, &mut bindings)
                    .map_err(|e| errors::signature(format!("{}: the tensor {e}", label())))?;
                managed.push(m);
                call_args.push(if param.kind == ParamKind::TensorMut {
                    Arg::TensorMut(ptr)
                } else {
                    Arg::Tensor(ptr.cast_const())
                });
            }
            ParamKind::F32 | ParamKind::F64 => {
                let v: f64 = obj
                    .extract()
                    .map_err(|_| errors::signature(format!("{}: expected a number, got {}", label(), type_name(&obj))))?;
                call_args.push(if param.kind == ParamKind::F32 {
                    Arg::F32(v as f32)
                } else {
                    Arg::F64(v)
                });
            }
            ParamKind::I64 => {
                let v: i64 = obj.extract().map_err(|_| {
                    errors::signature(format!(
                        "{}: expected an integer in the i64 range, got {}",
                        label(),
                        type_name(&obj)
                    ))
                })?;
                call_args.push(Arg::I64(v));
            }
            ParamKind::U64 => {
                let v: u64 = obj.extract().map_err(|_| {
                    errors::signature(format!(
                        "{}: expected an integer in the u64 range, got {}",
                        label(),
                        type_name(&obj)
                    ))
                })?;
                call_args.push(Arg::U64(v));
            }
        }
    }
    let kernel = kernel.clone();
    let fname = name.clone();
    let packed = CallArgs(call_args);
    let result = py.detach(move || {
        let args = packed.into_inner();
        // SAFETY: every tensor pointer points into a managed tensor of `managed`, alive
        // until after this call returns; the signature checks above matched each to its
        // parameter; the stream is the framework's current stream on the tensors' device
        // (or NULL, the default stream).
        unsafe { kernel.call(&fname, &args, kernel_stream as *mut c_void) }
    });
    // The producers' deleters run here, with the GIL held.
    drop(managed);
    result.map_err(errors::call)
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .fully_qualified_name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "object".to_owned())
}

/// The facts of this host and where each came from: the document of `khub host --json`.
#[pyfunction]
#[pyo3(signature = (host=None))]
fn host(py: Python<'_>, host: Option<PathBuf>) -> PyResult<Bound<'_, PyAny>> {
    let options = probe_options(host)?;
    let detected = py
        .detach(|| HostFacts::detect(&options))
        .map_err(|e| errors::other(khub::capi::KHUB_E_HOST, &e))?;
    to_python(py, &detected)
}

/// Every variant of the release in a manifest (a `khub.toml`, or a release directory
/// holding one) ranked or rejected for a host: the document of `khub explain --json`.
#[pyfunction]
#[pyo3(signature = (manifest, host=None))]
fn explain_manifest(py: Python<'_>, manifest: PathBuf, host: Option<PathBuf>) -> PyResult<Bound<'_, PyAny>> {
    let m = read_manifest(&manifest)?;
    let options = probe_options(host)?;
    let facts = py
        .detach(|| HostFacts::detect(&options))
        .map_err(|e| errors::other(khub::capi::KHUB_E_HOST, &e))?
        .facts;
    let resolution = resolve(&m, &facts, &Preferences::default());
    to_python(py, &Explain::new(&resolution, &facts))
}

fn read_manifest(path: &Path) -> PyResult<Manifest> {
    let file = if path.is_dir() { path.join("khub.toml") } else { path.to_owned() };
    let bytes = std::fs::read(&file).map_err(|e| {
        errors::raise(
            if e.kind() == std::io::ErrorKind::NotFound {
                khub::capi::KHUB_E_NOT_FOUND
            } else {
                khub::capi::KHUB_E_IO
            },
            vec![format!("cannot read {}", file.display()), e.to_string()],
            None,
        )
    })?;
    Manifest::from_bytes(&bytes).map_err(|e| {
        let mut causes = vec![format!("in {}", file.display())];
        causes.extend(errors::causes(&e));
        errors::raise(khub::capi::KHUB_E_INVALID_ARGUMENT, causes, None)
    })
}

/// The version of the khub library inside this package.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _khub(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PyHub>()?;
    m.add_class::<PyKernel>()?;
    m.add_class::<PyFunction>()?;
    m.add_function(wrap_pyfunction!(host, m)?)?;
    m.add_function(wrap_pyfunction!(explain_manifest, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add("Error", py.get_type::<errors::Error>())?;
    m.add("NotFound", py.get_type::<errors::NotFound>())?;
    m.add("NoVariant", py.get_type::<errors::NoVariant>())?;
    m.add("VerifyError", py.get_type::<errors::VerifyError>())?;
    m.add("TrustError", py.get_type::<errors::TrustError>())?;
    m.add("OfflineMiss", py.get_type::<errors::OfflineMiss>())?;
    m.add("SignatureMismatch", py.get_type::<errors::SignatureMismatch>())?;
    m.add("KernelError", py.get_type::<errors::KernelError>())?;
    Ok(())
}
