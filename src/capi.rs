//! The C API for host applications: the Rust side of `include/khub.h`.
//!
//! C and C++ hosts resolve, verify and load kernels through these functions, as Rust hosts
//! do through [`Hub`]. The reference, with the ownership of every pointer, is
//! `docs/c-api.md`; `tests/capi_header.rs` checks that the hand-written header declares
//! exactly what this module exports.
//!
//! Conventions, for every function here:
//! - Handles (`khub_options`, `khub_hub`, `khub_kernel`, `khub_error`) are opaque boxes
//!   owned by the caller from the moment a function hands one out until its `*_free`
//!   function takes it back. Every `*_free` accepts NULL.
//! - Strings khub returns (`char*`) are owned by the caller and freed with
//!   [`khub_string_free`]; strings the caller passes in are borrowed for the call only and
//!   must be NUL-terminated UTF-8.
//! - Fallible functions return `0` or a `KHUB_E_*` code, and take a trailing
//!   `khub_error** err`: when `err` is not NULL, `*err` is always written, NULL on success
//!   and a new error object on failure. Out-parameters are set to NULL on failure.
//! - No panic crosses the boundary: every body runs under [`std::panic::catch_unwind`],
//!   and a panic comes back as an error with code [`KHUB_E_PANIC`].
//! - `khub_hub` and `khub_kernel` may be used from several threads at once; a handle must
//!   not be freed while another thread still uses it.
//!
//! This file holds the whole C surface and runs past 1,000 lines on purpose:
//! `tests/capi_header.rs` runs cbindgen over this one file to check `include/khub.h`, so
//! every exported function, constant and struct must be declared here. The logic behind
//! them lives in the library (`hub`, `load`, `resolve::Explain`); the tests are in
//! `capi/tests.rs`.

// The C names of the handle and argument types are the Rust names, so the header and this
// module read alike (and cbindgen needs no renaming table).
#![allow(non_camel_case_types)]

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use serde::Serialize;

use crate::abi::{DLTensor, Signature};
use crate::env as vars;
use crate::host::Environment;
use crate::hub::{Hub, HubError, HubOptions, Origin, RegistrySpec};
use crate::load::{Arg, CallError, Kernel, LoadError, LoadReport};
use crate::lock::{LockError, Lockfile};
use crate::registry::RepoId;
use crate::resolve::{Explain, ExplainRelease, Preferences, resolve};
use crate::version::parse_requirement;

// ---------------------------------------------------------------------------------------
// Versions
// ---------------------------------------------------------------------------------------

/// The C API's major version. A new major may change or remove declarations; khub.h and
/// the library must then come from the same release.
pub const KHUB_C_API_VERSION_MAJOR: u32 = 1;
/// The C API's minor version. A new minor only adds: functions and constants at the end
/// of the header, never a changed signature or a reused code.
pub const KHUB_C_API_VERSION_MINOR: u32 = 0;
/// `(major << 16) | minor`, as [`khub_c_api_version`] returns it at run time.
pub const KHUB_C_API_VERSION: u32 = (KHUB_C_API_VERSION_MAJOR << 16) | KHUB_C_API_VERSION_MINOR;

// ---------------------------------------------------------------------------------------
// Error codes
// ---------------------------------------------------------------------------------------

/// An argument is wrong: a NULL pointer, a string that is not UTF-8, a repository id that
/// is not `org/name`, a version requirement or signature string that does not parse, an
/// unknown argument kind.
pub const KHUB_E_INVALID_ARGUMENT: c_int = 1;
/// Something named does not exist: the repository, a release matching the requirement, a
/// function of the kernel, the repository's entry in a lockfile.
pub const KHUB_E_NOT_FOUND: c_int = 2;
/// No variant of the release runs on this host (the message names the closest miss).
pub const KHUB_E_NO_VARIANT: c_int = 3;
/// Bytes do not match what pins them: a file's size or SHA-256 differs from the manifest's,
/// a lock's digest from the manifest's, a release holds a symlink or an unlisted file.
pub const KHUB_E_VERIFY: c_int = 4;
/// The trust policy refused the release (signature, key, rollback), or cannot be read.
pub const KHUB_E_TRUST: c_int = 5;
/// The registry failed or served an invalid release (transport, access, rate limit, bad
/// manifest).
pub const KHUB_E_REGISTRY: c_int = 6;
/// Offline mode is on and something needed is not in the store; the message names it and
/// the command that fetches it.
pub const KHUB_E_OFFLINE_MISS: c_int = 7;
/// The verified library could not be loaded: `dlopen` failed, no entry symbol, ABI refused,
/// a bad descriptor, exports that differ from the manifest.
pub const KHUB_E_LOAD: c_int = 8;
/// A signature check failed: the signature asked of `khub_kernel_function`, or the
/// arguments passed to `khub_kernel_call`, do not match the function's signature.
pub const KHUB_E_SIGNATURE_MISMATCH: c_int = 9;
/// The kernel function ran and returned a non-zero status; `khub_error_kernel_status`
/// returns it, the message holds what the kernel wrote.
pub const KHUB_E_KERNEL: c_int = 10;
/// The host configuration is wrong or host detection failed: a `KHUB_*` variable that does
/// not parse, an unreadable host profile.
pub const KHUB_E_HOST: c_int = 11;
/// A lockfile could not be read or is not valid.
pub const KHUB_E_LOCK: c_int = 12;
/// Local I/O failed (the store, the index of known releases).
pub const KHUB_E_IO: c_int = 13;
/// khub panicked; the panic was caught at the boundary. A bug: please report it.
pub const KHUB_E_PANIC: c_int = 14;
/// Any other failure inside khub.
pub const KHUB_E_INTERNAL: c_int = 15;

// ---------------------------------------------------------------------------------------
// Generic call arguments
// ---------------------------------------------------------------------------------------

/// `khub_arg.kind` for a `tensor` parameter: `value.tensor`, read only.
pub const KHUB_ARG_TENSOR: i32 = 1;
/// `khub_arg.kind` for a `mut tensor` parameter: `value.tensor`, whose data is written.
pub const KHUB_ARG_TENSOR_MUT: i32 = 2;
/// `khub_arg.kind` for an `f32` parameter: `value.f32`.
pub const KHUB_ARG_F32: i32 = 3;
/// `khub_arg.kind` for an `f64` parameter: `value.f64`.
pub const KHUB_ARG_F64: i32 = 4;
/// `khub_arg.kind` for an `i64` parameter: `value.i64`.
pub const KHUB_ARG_I64: i32 = 5;
/// `khub_arg.kind` for a `u64` parameter: `value.u64`.
pub const KHUB_ARG_U64: i32 = 6;

/// The value of one generic-call argument; which member is read depends on
/// [`khub_arg::kind`].
#[repr(C)]
#[derive(Clone, Copy)]
pub union khub_arg_value {
    /// `KHUB_ARG_TENSOR`, `KHUB_ARG_TENSOR_MUT`: a tensor the caller owns (not NULL).
    pub tensor: *mut DLTensor,
    /// `KHUB_ARG_F32`.
    pub f32: f32,
    /// `KHUB_ARG_F64`.
    pub f64: f64,
    /// `KHUB_ARG_I64`.
    pub i64: i64,
    /// `KHUB_ARG_U64`.
    pub u64: u64,
}

/// One argument of [`khub_kernel_call`]: a `KHUB_ARG_*` kind and its value.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct khub_arg {
    /// One of the `KHUB_ARG_*` constants.
    pub kind: i32,
    /// The value, read as the member `kind` names.
    pub value: khub_arg_value,
}

/// An untyped kernel function pointer, `void (*)(void)` (`khub_fn_ptr` of
/// `khub_kernel.h`); the caller casts it to the type the signature names.
pub type khub_fn_ptr = Option<unsafe extern "C" fn()>;

// ---------------------------------------------------------------------------------------
// Handles
// ---------------------------------------------------------------------------------------

/// How to open a hub. Every setting left unset comes from the environment, as for
/// `Hub::from_env` (docs/host.md, docs/registry.md).
#[derive(Debug, Clone, Default)]
pub struct khub_options {
    registry: Option<String>,
    cache: Option<String>,
    offline: Option<bool>,
    trust_policy: Option<String>,
    host_profile: Option<String>,
    state_dir: Option<String>,
}

/// An open hub: host facts, a registry and the store.
#[derive(Debug)]
pub struct khub_hub {
    hub: Hub,
    registry: String,
    preferences: Preferences,
}

/// A loaded, verified kernel, with where it came from.
#[derive(Debug)]
pub struct khub_kernel {
    kernel: Kernel,
    origin: Origin,
}

/// An error: a `KHUB_E_*` code and a message.
#[derive(Debug)]
pub struct khub_error {
    code: c_int,
    kernel_status: i32,
    message: CString,
}

// Handles cross threads: the C API promises it, so the compiler must agree.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<khub_hub>();
    send_sync::<khub_kernel>();
    send_sync::<khub_error>();
};

/// The document `khub_kernel_provenance_json` returns.
#[derive(Serialize)]
struct ProvenanceJson<'a> {
    /// Format version of this document.
    format: u32,
    #[serde(flatten)]
    origin: &'a Origin,
    loaded: LoadReport,
}

// ---------------------------------------------------------------------------------------
// Failures and the boundary
// ---------------------------------------------------------------------------------------

/// A failure on its way to becoming a [`khub_error`].
#[derive(Debug)]
struct Failure {
    code: c_int,
    kernel_status: i32,
    message: String,
}

impl Failure {
    fn new(code: c_int, message: impl Into<String>) -> Self {
        Failure {
            code,
            kernel_status: 0,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(KHUB_E_INVALID_ARGUMENT, message)
    }

    fn null(what: &str) -> Self {
        Self::invalid(format!("`{what}` is NULL"))
    }

    fn panic(payload: Box<dyn std::any::Any + Send>) -> Self {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic with a non-string payload".to_owned());
        // A payload whose destructor panics must not unwind out of here either.
        let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
        Self::new(KHUB_E_PANIC, format!("khub panicked (a bug, please report it): {what}"))
    }

    fn into_raw(self) -> *mut khub_error {
        Box::into_raw(Box::new(khub_error {
            code: self.code,
            kernel_status: self.kernel_status,
            message: c_string(self.message),
        }))
    }
}

impl From<HubError> for Failure {
    fn from(e: HubError) -> Self {
        Failure::new(e.kind().code(), e.to_string())
    }
}

impl From<LoadError> for Failure {
    fn from(e: LoadError) -> Self {
        Failure::new(e.kind().code(), e.to_string())
    }
}

impl From<LockError> for Failure {
    fn from(e: LockError) -> Self {
        Failure::from(HubError::Lock(e))
    }
}

impl From<CallError> for Failure {
    fn from(e: CallError) -> Self {
        match &e {
            CallError::Kernel { status, .. } => Failure {
                code: KHUB_E_KERNEL,
                kernel_status: *status,
                message: e.to_string(),
            },
            CallError::Arguments { .. } => Failure::new(KHUB_E_SIGNATURE_MISMATCH, e.to_string()),
            CallError::NotFound(_) => Failure::new(KHUB_E_NOT_FOUND, e.to_string()),
        }
    }
}

/// A C string from Rust text; an interior NUL (never expected) becomes a space.
fn c_string(s: String) -> CString {
    CString::new(s).unwrap_or_else(|e| {
        let bytes: Vec<u8> = e.into_vec().into_iter().map(|b| if b == 0 { b' ' } else { b }).collect();
        CString::new(bytes).unwrap_or_default()
    })
}

/// Runs `body` at the boundary: catches panics, writes `*err` (when `err` is not NULL)
/// and returns 0 or the failure's code.
fn guard(err: *mut *mut khub_error, body: impl FnOnce() -> Result<(), Failure>) -> c_int {
    let result = catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| Err(Failure::panic(payload)));
    let (code, error) = match result {
        Ok(()) => (0, std::ptr::null_mut()),
        Err(f) => (f.code, f.into_raw()),
    };
    if err.is_null() {
        if !error.is_null() {
            // SAFETY: `error` was allocated by into_raw just above and nobody else has it.
            drop(unsafe { Box::from_raw(error) });
        }
    } else {
        // SAFETY: `err` is not NULL and, by the API's contract, points to writable storage
        // for one `khub_error*`.
        unsafe { err.write(error) };
    }
    code
}

/// Borrows a handle, refusing NULL.
///
/// # Safety
/// `p` must be NULL or point to a live `T` that stays valid, and is not mutated elsewhere,
/// for `'a`.
unsafe fn handle<'a, T>(p: *const T, what: &str) -> Result<&'a T, Failure> {
    // SAFETY: the caller guarantees `p` is NULL or valid for `'a`.
    unsafe { p.as_ref() }.ok_or_else(|| Failure::null(what))
}

/// Borrows a handle mutably, refusing NULL.
///
/// # Safety
/// `p` must be NULL or point to a live `T` that nothing else uses for `'a`.
unsafe fn handle_mut<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T, Failure> {
    // SAFETY: the caller guarantees `p` is NULL or valid and unaliased for `'a`.
    unsafe { p.as_mut() }.ok_or_else(|| Failure::null(what))
}

/// Borrows a NUL-terminated UTF-8 string, refusing NULL.
///
/// # Safety
/// `p` must be NULL or point to a NUL-terminated string that lives for `'a`.
unsafe fn text<'a>(p: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if p.is_null() {
        return Err(Failure::null(what));
    }
    // SAFETY: not NULL, and NUL-terminated by the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map_err(|_| Failure::invalid(format!("`{what}` is not valid UTF-8")))
}

/// An optional setting: NULL means unset, an empty string is refused.
///
/// # Safety
/// As for [`text`].
unsafe fn setting(p: *const c_char, what: &str) -> Result<Option<String>, Failure> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: forwarded from the caller.
    let s = unsafe { text(p, what) }?;
    if s.is_empty() {
        return Err(Failure::invalid(format!(
            "`{what}` is empty; pass NULL to take it from the environment"
        )));
    }
    Ok(Some(s.to_owned()))
}

/// Checks an out-parameter and sets it to NULL, so it is NULL on any failure.
///
/// # Safety
/// `p` must be NULL or valid for writing one `T`.
unsafe fn clear_out<T>(p: *mut *mut T, what: &str) -> Result<(), Failure> {
    if p.is_null() {
        return Err(Failure::null(what));
    }
    // SAFETY: not NULL, and writable by the caller's contract.
    unsafe { p.write(std::ptr::null_mut()) };
    Ok(())
}

/// Parses a repository id.
fn repo_id(s: &str) -> Result<RepoId, Failure> {
    s.parse().map_err(|e: crate::registry::RepoIdError| Failure::invalid(e.to_string()))
}

/// Renders a document as pretty JSON.
fn json(doc: &impl Serialize) -> Result<String, Failure> {
    serde_json::to_string_pretty(doc).map_err(|e| Failure::new(KHUB_E_INTERNAL, format!("cannot render JSON: {e}")))
}

// ---------------------------------------------------------------------------------------
// Versions, strings, errors
// ---------------------------------------------------------------------------------------

/// The C API version of the library: `(major << 16) | minor`. A host built against
/// `KHUB_C_API_VERSION_MAJOR` M and minor m works with a library whose major is M and
/// whose minor is at least m.
#[unsafe(no_mangle)]
pub extern "C" fn khub_c_api_version() -> u32 {
    KHUB_C_API_VERSION
}

/// The khub release, e.g. `"0.1.0"`: a static string, never freed.
#[unsafe(no_mangle)]
pub extern "C" fn khub_version_string() -> *const c_char {
    const VERSION: &CStr = match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(v) => v,
        Err(_) => c"unknown",
    };
    VERSION.as_ptr()
}

/// Frees a string khub returned. NULL is accepted.
///
/// # Safety
/// `s` must be NULL or a string returned by a khub function and not freed yet.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn khub_string_free(s: *mut c_char) {
    if s.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `s` came from CString::into_raw in this module (the caller's contract).
        drop(unsafe { CString::from_raw(s) });
    }));
}

/// The error's `KHUB_E_*` code; 0 for NULL.
///
/// # Safety
/// `err` must be NULL or a live error.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn khub_error_code(err: *const khub_error) -> c_int {
    // SAFETY: the caller guarantees `err` is NULL or live.
    unsafe { err.as_ref() }.map_or(0, |e| e.code)
}

/// The error's message, UTF-8: borrowed, valid until the error is freed. `""` for NULL.
///
/// # Safety
/// `err` must be NULL or a live error.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn khub_error_message(err: *const khub_error) -> *const c_char {
    // SAFETY: the caller guarantees `err` is NULL or live.
    match unsafe { err.as_ref() } {
        Some(e) => e.message.as_ptr(),
        None => c"".as_ptr(),
    }
}

/// The kernel's status for a `KHUB_E_KERNEL` error (a `KHUB_ERR_*` of `khub_kernel.h`);
/// 0 for any other error and for NULL.
///
/// # Safety
/// `err` must be NULL or a live error.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn khub_error_kernel_status(err: *const khub_error) -> i32 {
    // SAFETY: the caller guarantees `err` is NULL or live.
    unsafe { err.as_ref() }.map_or(0, |e| e.kernel_status)
}

/// Frees an error. NULL is accepted.
///
/// # Safety
/// `err` must be NULL or an error returned by khub and not freed yet.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn khub_error_free(err: *mut khub_error) {
    if err.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `err` came from Box::into_raw in this module (the caller's contract).
        drop(unsafe { Box::from_raw(err) });
    }));
}

// ---------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------

/// New options, all unset (everything from the environment). Free with
/// [`khub_options_free`]. Returns NULL only if khub panicked.
#[unsafe(no_mangle)]
pub extern "C" fn khub_options_new() -> *mut khub_options {
    catch_unwind(|| Box::into_raw(Box::default())).unwrap_or(std::ptr::null_mut())
}

/// Frees options. NULL is accepted. Hubs opened with them do not need them any more.
///
/// # Safety
/// `options` must be NULL or options from [`khub_options_new`] not freed yet.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn khub_options_free(options: *mut khub_options) {
    if options.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: from Box::into_raw in khub_options_new (the caller's contract).
        drop(unsafe { Box::from_raw(options) });
    }));
}

/// Sets one optional string of `options`.
///
/// # Safety
/// `options` NULL or live and unaliased; `value` NULL or a NUL-terminated string.
unsafe fn set_option(
    options: *mut khub_options,
    value: *const c_char,
    what: &str,
    field: fn(&mut khub_options) -> &mut Option<String>,
    err: *mut *mut khub_error,
) -> c_int {
    guard(err, || {
        // SAFETY: forwarded from the caller.
        let o = unsafe { handle_mut(options, "options") }?;
        // SAFETY: forwarded from the caller.
        *field(o) = unsafe { setting(value, what) }?;
        Ok(())
    })
}

/// The registry: a Hub-compatible URL (`http://…`, `https://…`) or a directory registry
/// path. NULL: from the environment (`KHUB_REGISTRY`, `HF_ENDPOINT`, then the public Hub).
///
/// # Safety
/// `options` must be NULL or live options not used by another thread meanwhile; `registry`
/// NULL or a NUL-terminated string (copied); `err` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn khub_options_set_registry(
    options: *mut khub_options,
    registry: *const c_char,
    err: *mut *mut khub_error,
) -> c_int {
    // SAFETY: forwarded from the caller.
    unsafe { set_option(options, registry, "registry", |o| &mut o.registry, err) }
}

/// The store's root directory. NULL: from the environment (`KHUB_CACHE`, then
/// `$XDG_CACHE_HOME/khub`, then `~/.cache/khub`).
///
/// # Safety
/// As for [`khub_options_set_registry`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn khub_options_set_cache(options: *mut khub_options, dir: *const c_char, err: *mut *mut khub_error) -> c_int {
    // SAFETY: forwarded from the caller.
    unsafe { set_option(options, dir, "dir", |o| &mut o.cache, err) }
}

/// Offline mode: `1` never touches the network (versions resolve against releases seen
/// before, files come from the store), `0` allows it even if `KHUB_OFFLINE` or
/// `HF_HUB_OFFLINE` is set, `-1` takes it from the environment (the default). Any other
/// value is `KHUB_E_INVALID_ARGUMENT`.
///
/// # Safety
/// `options` must be NULL or live options not used by another thread meanwhile; `err`
/// NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn khub_options_set_offline(options: *mut khub_options, offline: c_int, err: *mut *mut khub_error) -> c_int {
    guard(err, || {
        // SAFETY: forwarded from the caller.
        let o = unsafe { handle_mut(options, "options") }?;
        o.offline = match offline {
            -1 => None,
            0 => Some(false),
            1 => Some(true),
            v => return Err(Failure::invalid(format!("offline is {v}; pass 1, 0 or -1"))),
        };
        Ok(())
    })
}

/// The trust policy file (docs/publishing.md). NULL: from the environment
/// (`KHUB_TRUST_POLICY`, then `~/.config/khub/trust.toml` when present, else signatures
/// are not required). The file is read by [`khub_hub_open`]; a missing file is an error.
///
/// # Safety
/// As for [`khub_options_set_registry`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn khub_options_set_trust_policy(
    options: *mut khub_options,
    path: *const c_char,
    err: *mut *mut khub_error,
) -> c_int {
    // SAFETY: forwarded from the caller.
    unsafe { set_option(options, path, "path", |o| &mut o.trust_policy, err) }
}

/// A host-profile file (docs/host.md) that overrides probed host facts, to resolve for
/// another machine. NULL: from the environment (`KHUB_HOST_PROFILE`, else probed).
///
/// # Safety
/// As for [`khub_options_set_registry`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn khub_options_set_host_profile(
    options: *mut khub_options,
    path: *const c_char,
    err: *mut *mut khub_error,
) -> c_int {
    // SAFETY: forwarded from the caller.
    unsafe { set_option(options, path, "path", |o| &mut o.host_profile, err) }
}

/// Where rollback state lives, outside the purgeable cache. NULL: from the environment
/// (`KHUB_STATE_DIR`, then `$XDG_STATE_HOME/khub`, then `~/.local/state/khub`).
///
/// # Safety
/// As for [`khub_options_set_registry`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn khub_options_set_state_dir(options: *mut khub_options, dir: *const c_char, err: *mut *mut khub_error) -> c_int {
    // SAFETY: forwarded from the caller.
    unsafe { set_option(options, dir, "dir", |o| &mut o.state_dir, err) }
}

// ---------------------------------------------------------------------------------------
// Hubs
// ---------------------------------------------------------------------------------------

fn open_hub(o: &khub_options) -> Result<khub_hub, Failure> {
    // Settings become part of the environment snapshot, so everything derived from it
    // (host facts, store, trust policy, Hub client) sees them exactly once.
    let mut env = Environment::capture();
    for (var, value) in [
        (vars::KHUB_REGISTRY, &o.registry),
        (vars::KHUB_CACHE, &o.cache),
        (vars::KHUB_TRUST_POLICY, &o.trust_policy),
        (vars::HOST_PROFILE, &o.host_profile),
        (vars::KHUB_STATE_DIR, &o.state_dir),
    ] {
        if let Some(v) = value {
            env.set(var, v.as_str());
        }
    }
    let mut options = HubOptions::from_env(env)?;
    if let Some(r) = &o.registry {
        options.registry = RegistrySpec::parse(r);
    }
    if let Some(off) = o.offline {
        options.offline = off;
    }
    let registry = options.registry.describe();
    let preferences = options.preferences.clone();
    Ok(khub_hub {
        hub: Hub::new(options)?,
        registry,
        preferences,
    })
}

/// Opens a hub: reads the environment as `Hub::from_env` does, applies `options`, probes
/// the host and opens the store (and, online, the registry client). On success `*out` is a
/// new hub, freed with [`khub_hub_free`]; `options` stays the caller's.
///
/// # Safety
/// `options` must be NULL or live options; `out` NULL or writable; `err` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn khub_hub_open(options: *const khub_options, out: *mut *mut khub_hub, err: *mut *mut khub_error) -> c_int {
    guard(err, || {
        // SAFETY: forwarded from the caller.
        unsafe { clear_out(out, "out") }?;
        // SAFETY: forwarded from the caller.
        let o = unsafe { handle(options, "options") }?;
        let hub = Box::into_raw(Box::new(open_hub(o)?));
        // SAFETY: checked not NULL by clear_out.
        unsafe { out.write(hub) };
        Ok(())
    })
}

/// Frees a hub. NULL is accepted. Kernels loaded through it stay valid.
///
/// # Safety
/// `hub` must be NULL or a hub from [`khub_hub_open`], not freed yet and not in use by
/// another thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn khub_hub_free(hub: *mut khub_hub) {
    if hub.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: from Box::into_raw in khub_hub_open (the caller's contract).
        drop(unsafe { Box::from_raw(hub) });
    }));
}

/// Resolves, fetches, verifies and loads like `Hub::load`, keeping the release's identity
/// for the provenance document.
fn load(h: &khub_hub, repo: &RepoId, requirement: &str) -> Result<khub_kernel, HubError> {
    let (release, kernel) = h.hub.load_release(repo, requirement)?;
    Ok(khub_kernel {
        kernel,
        origin: Origin::resolved(requirement, h.registry.clone(), &release),
    })
}

/// Loads `repo` (`"org/name"`) at the highest release matching `requirement` (semver
/// syntax: `"^0.1"`, `"=1.2.0"`, `">=1, <3"`, `"*"`): resolves the release, picks the
/// variant for this host, fetches what the store lacks, verifies every byte and loads it.
/// On success `*out` is a new kernel, freed with [`khub_kernel_free`].
///
/// # Safety
/// `hub` must be NULL or a live hub; `repo` and `requirement` NULL or NUL-terminated
/// strings; `out` and `err` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn khub_hub_load(
    hub: *const khub_hub,
    repo: *const c_char,
    requirement: *const c_char,
    out: *mut *mut khub_kernel,
    err: *mut *mut khub_error,
) -> c_int {
    guard(err, || {
        // SAFETY: forwarded from the caller.
        unsafe { clear_out(out, "out") }?;
        // SAFETY: forwarded from the caller.
        let h = unsafe { handle(hub, "hub") }?;
        // SAFETY: forwarded from the caller.
        let repo = repo_id(unsafe { text(repo, "repo") }?)?;
        // SAFETY: forwarded from the caller.
        let requirement = unsafe { text(requirement, "requirement") }?;
        parse_requirement(requirement).map_err(|e| Failure::invalid(e.to_string()))?;
        let kernel = Box::into_raw(Box::new(load(h, &repo, requirement)?));
        // SAFETY: checked not NULL by clear_out.
        unsafe { out.write(kernel) };
        Ok(())
    })
}

/// Loads `repo` exactly as the lockfile at `lockfile` (`khub.lock`) pins it: manifest and
/// files from the store, checked against the lock's digests; no registry request, no
/// version resolution. Of the locked variants, the best one for this host is loaded. On
/// success `*out` is a new kernel, freed with [`khub_kernel_free`].
///
/// # Safety
/// As for [`khub_hub_load`], with `lockfile` a NUL-terminated path.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn khub_hub_load_locked(
    hub: *const khub_hub,
    lockfile: *const c_char,
    repo: *const c_char,
    out: *mut *mut khub_kernel,
    err: *mut *mut khub_error,
) -> c_int {
    guard(err, || {
        // SAFETY: forwarded from the caller.
        unsafe { clear_out(out, "out") }?;
        // SAFETY: forwarded from the caller.
        let h = unsafe { handle(hub, "hub") }?;
        // SAFETY: forwarded from the caller.
        let path = Path::new(unsafe { text(lockfile, "lockfile") }?);
        // SAFETY: forwarded from the caller.
        let repo = repo_id(unsafe { text(repo, "repo") }?)?;
        let lock = Lockfile::read(path)?;
        let kernel = h.hub.load_locked(&lock, path, &repo)?;
        let entry = lock.get(&repo).ok_or_else(|| {
            Failure::from(LockError::NotLocked {
                path: path.to_owned(),
                repo: repo.clone(),
            })
        })?;
        let loaded = khub_kernel {
            kernel,
            origin: Origin::locked(entry, path),
        };
        // SAFETY: checked not NULL by clear_out.
        unsafe { out.write(Box::into_raw(Box::new(loaded))) };
        Ok(())
    })
}

/// Writes a new string to a checked out-parameter.
///
/// # Safety
/// `out` must have passed [`clear_out`].
unsafe fn put_string(out: *mut *mut c_char, s: String) {
    // SAFETY: the caller checked `out`.
    unsafe { out.write(c_string(s).into_raw()) };
}

/// The explain trace for `repo` at `requirement`, as JSON: the release chosen, the host
/// facts, the chosen variant and every variant ranked or rejected with its reason (the
/// document of `khub explain --json`, docs/resolve.md, plus `repo`, `requirement`,
/// `registry`, `version` and `commit`). Resolves the release like [`khub_hub_load`] but
/// fetches no variant and loads nothing; a release with no variant for this host is not an
/// error here (`chosen` is null). On success `*out` is a new string, freed with
/// [`khub_string_free`].
///
/// # Safety
/// As for [`khub_hub_load`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn khub_hub_explain_json(
    hub: *const khub_hub,
    repo: *const c_char,
    requirement: *const c_char,
    out: *mut *mut c_char,
    err: *mut *mut khub_error,
) -> c_int {
    guard(err, || {
        // SAFETY: forwarded from the caller.
        unsafe { clear_out(out, "out") }?;
        // SAFETY: forwarded from the caller.
        let h = unsafe { handle(hub, "hub") }?;
        // SAFETY: forwarded from the caller.
        let repo = repo_id(unsafe { text(repo, "repo") }?)?;
        // SAFETY: forwarded from the caller.
        let requirement = unsafe { text(requirement, "requirement") }?;
        parse_requirement(requirement).map_err(|e| Failure::invalid(e.to_string()))?;
        let release = h.hub.resolve_release(&repo, requirement)?;
        let resolution = resolve(&release.manifest, h.hub.host(), &h.preferences);
        // `khub explain --json`'s document, plus the release it was resolved from.
        let doc = json(&Explain::new(&resolution, h.hub.host()).with_release(ExplainRelease {
            repo: repo.to_string(),
            requirement,
            registry: &h.registry,
            version: release.version.to_string(),
            commit: &release.commit,
        }))?;
        // SAFETY: checked by clear_out.
        unsafe { put_string(out, doc) };
        Ok(())
    })
}

/// The host facts the hub resolves for, as JSON (the `host` object of the explain
/// document; docs/host.md). On success `*out` is a new string, freed with
/// [`khub_string_free`].
///
/// # Safety
/// `hub` must be NULL or a live hub; `out` and `err` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn khub_hub_host_json(hub: *const khub_hub, out: *mut *mut c_char, err: *mut *mut khub_error) -> c_int {
    guard(err, || {
        // SAFETY: forwarded from the caller.
        unsafe { clear_out(out, "out") }?;
        // SAFETY: forwarded from the caller.
        let h = unsafe { handle(hub, "hub") }?;
        let doc = json(h.hub.host())?;
        // SAFETY: checked by clear_out.
        unsafe { put_string(out, doc) };
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------

/// Frees a kernel handle. NULL is accepted. The library itself is never unloaded, so
/// function pointers taken from the kernel stay valid.
///
/// # Safety
/// `kernel` must be NULL or a kernel from khub, not freed yet and not in use by another
/// thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn khub_kernel_free(kernel: *mut khub_kernel) {
    if kernel.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: from Box::into_raw in khub_hub_load(_locked) (the caller's contract).
        drop(unsafe { Box::from_raw(kernel) });
    }));
}

/// Looks up `name`, checking `requested` against its signature.
fn typed_function(kernel: &Kernel, name: &str, requested: &str) -> Result<unsafe extern "C" fn(), Failure> {
    let Some(actual) = kernel.signature(name) else {
        return Err(Failure::new(
            KHUB_E_NOT_FOUND,
            format!(
                "kernel `{}` has no function `{name}`; it exports: {}",
                kernel.name(),
                kernel.functions().collect::<Vec<_>>().join(", ")
            ),
        ));
    };
    let want = Signature::parse(requested).map_err(|e| Failure::invalid(e.to_string()))?;
    let f = kernel.raw_function(name, &want.kinds())?;
    // Kinds equal; dtypes and shapes the caller wrote must be the function's too.
    let annotated_differ = want
        .params
        .iter()
        .zip(&actual.params)
        .any(|(w, a)| (w.dtype.is_some() && w.dtype != a.dtype) || (w.shape.is_some() && w.shape != a.shape));
    if annotated_differ {
        return Err(Failure::new(
            KHUB_E_SIGNATURE_MISMATCH,
            format!("`{name}` has signature `{actual}`, which does not match the requested `{want}`"),
        ));
    }
    Ok(f)
}

/// A typed function pointer: looks `name` up and checks `signature` against its signature.
/// `signature` uses the grammar of `khub_kernel.h`; its parameter kinds must equal the
/// function's (`"(mut tensor, tensor)"`), and any dtype or shape it writes must equal the
/// function's too. On success `*fn_out` is the function, to be cast to
/// `khub_status (*)(const khub_call*, …)` with one pointer per parameter; it stays valid
/// for the life of the process (libraries are never unloaded), even after the kernel handle
/// is freed.
///
/// # Safety
/// `kernel` must be NULL or a live kernel; `name` and `signature` NULL or NUL-terminated
/// strings; `fn_out` and `err` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn khub_kernel_function(
    kernel: *const khub_kernel,
    name: *const c_char,
    signature: *const c_char,
    fn_out: *mut khub_fn_ptr,
    err: *mut *mut khub_error,
) -> c_int {
    guard(err, || {
        if fn_out.is_null() {
            return Err(Failure::null("fn_out"));
        }
        // SAFETY: not NULL, writable by the caller's contract.
        unsafe { fn_out.write(None) };
        // SAFETY: forwarded from the caller.
        let k = unsafe { handle(kernel, "kernel") }?;
        // SAFETY: forwarded from the caller.
        let name = unsafe { text(name, "name") }?;
        // SAFETY: forwarded from the caller.
        let signature = unsafe { text(signature, "signature") }?;
        let f = typed_function(&k.kernel, name, signature)?;
        // SAFETY: checked not NULL above.
        unsafe { fn_out.write(Some(f)) };
        Ok(())
    })
}

/// Converts C arguments into the crate's, refusing unknown kinds and NULL tensors.
fn convert_args(args: &[khub_arg]) -> Result<Vec<Arg>, Failure> {
    args.iter()
        .enumerate()
        .map(|(i, a)| {
            let tensor = || {
                // SAFETY: read only for the tensor kinds, where `kind` says the caller
                // initialised `value.tensor`.
                let t = unsafe { a.value.tensor };
                if t.is_null() {
                    Err(Failure::null(&format!("args[{i}].value.tensor")))
                } else {
                    Ok(t)
                }
            };
            Ok(match a.kind {
                KHUB_ARG_TENSOR => Arg::Tensor(tensor()?.cast_const()),
                KHUB_ARG_TENSOR_MUT => Arg::TensorMut(tensor()?),
                // SAFETY: `kind` names the member the caller initialised.
                KHUB_ARG_F32 => Arg::F32(unsafe { a.value.f32 }),
                // SAFETY: `kind` names the member the caller initialised.
                KHUB_ARG_F64 => Arg::F64(unsafe { a.value.f64 }),
                // SAFETY: `kind` names the member the caller initialised.
                KHUB_ARG_I64 => Arg::I64(unsafe { a.value.i64 }),
                // SAFETY: `kind` names the member the caller initialised.
                KHUB_ARG_U64 => Arg::U64(unsafe { a.value.u64 }),
                k => return Err(Failure::invalid(format!("args[{i}].kind is {k}, not one of the KHUB_ARG_* kinds"))),
            })
        })
        .collect()
}

/// Calls `name` through the generic path: the arguments' kinds are checked against the
/// function's signature (`KHUB_E_SIGNATURE_MISMATCH` otherwise), then passed as the
/// pointers the ABI prescribes. `stream` is a `cudaStream_t` / `hipStream_t` or NULL (CPU
/// kernels ignore it). A non-zero status from the kernel is `KHUB_E_KERNEL`, with the
/// status in [`khub_error_kernel_status`] and the kernel's message.
///
/// # Safety
/// `kernel` must be NULL or a live kernel; `name` NULL or a NUL-terminated string; `args`
/// NULL (only with `nargs` 0) or an array of `nargs` initialised arguments, each tensor a
/// valid `DLTensor` whose data the kernel may read (and write, for `KHUB_ARG_TENSOR_MUT`)
/// for the duration of the call; `stream` NULL or a stream of the kernel's backend; `err`
/// NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn khub_kernel_call(
    kernel: *const khub_kernel,
    name: *const c_char,
    args: *const khub_arg,
    nargs: usize,
    stream: *mut c_void,
    err: *mut *mut khub_error,
) -> c_int {
    guard(err, || {
        // SAFETY: forwarded from the caller.
        let k = unsafe { handle(kernel, "kernel") }?;
        // SAFETY: forwarded from the caller.
        let name = unsafe { text(name, "name") }?;
        if nargs > crate::abi::MAX_PARAMS {
            return Err(Failure::invalid(format!(
                "nargs is {nargs}; kernel functions take at most {} parameters",
                crate::abi::MAX_PARAMS
            )));
        }
        let args: &[khub_arg] = match (args.is_null(), nargs) {
            (_, 0) => &[],
            (true, _) => return Err(Failure::null("args")),
            // SAFETY: `args` points to `nargs` initialised elements (the caller's contract).
            (false, n) => unsafe { std::slice::from_raw_parts(args, n) },
        };
        let converted = convert_args(args)?;
        // SAFETY: the tensors are valid for the call and the stream belongs to the kernel's
        // backend (the caller's contract); the kinds are checked against the signature.
        unsafe { k.kernel.call(name, &converted, stream) }?;
        Ok(())
    })
}

/// The kernel's provenance as JSON: the repository, requirement, registry (or lockfile),
/// release version, commit and manifest SHA-256 it was loaded from, and what was loaded
/// (variant, backend, kernel ABI, every verified file with its size and SHA-256, the
/// exports). On success `*out` is a new string, freed with [`khub_string_free`].
///
/// # Safety
/// `kernel` must be NULL or a live kernel; `out` and `err` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn khub_kernel_provenance_json(
    kernel: *const khub_kernel,
    out: *mut *mut c_char,
    err: *mut *mut khub_error,
) -> c_int {
    guard(err, || {
        // SAFETY: forwarded from the caller.
        unsafe { clear_out(out, "out") }?;
        // SAFETY: forwarded from the caller.
        let k = unsafe { handle(kernel, "kernel") }?;
        let doc = json(&ProvenanceJson {
            format: 1,
            origin: &k.origin,
            loaded: k.kernel.report(),
        })?;
        // SAFETY: checked by clear_out.
        unsafe { put_string(out, doc) };
        Ok(())
    })
}

#[cfg(test)]
mod tests;
