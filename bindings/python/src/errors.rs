//! khub's errors as Python exceptions: `khub.Error` and its subclasses, chosen by the code
//! the C API reports for the same error (`khub::capi::hub_error_code`), carrying the
//! message the command line prints.

use std::ffi::c_int;

use khub::capi as c;
use pyo3::prelude::*;
use pyo3::{create_exception, exceptions::PyException};

create_exception!(
    khub,
    Error,
    PyException,
    "Any khub failure. `code` names the kind, `causes` lists the messages of the chain."
);
create_exception!(
    khub,
    NotFound,
    Error,
    "A repository, release, function or lockfile entry does not exist."
);
create_exception!(
    khub,
    NoVariant,
    Error,
    "No variant of the release runs on this host; the message names the closest miss."
);
create_exception!(
    khub,
    VerifyError,
    Error,
    "Bytes differ from what pins them (size, SHA-256, lock digest, extra file)."
);
create_exception!(
    khub,
    TrustError,
    Error,
    "The trust policy refused the release (signature, key, rollback) or cannot be read."
);
create_exception!(
    khub,
    OfflineMiss,
    Error,
    "Offline mode is on and something needed is not in the store."
);
create_exception!(
    khub,
    SignatureMismatch,
    Error,
    "The arguments of a call do not match the function's signature (count, kind, dtype, rank, named dimensions, device, writability)."
);
create_exception!(
    khub,
    KernelError,
    Error,
    "The kernel function ran and returned a non-zero status; `status` holds it."
);

/// The name of a `KHUB_E_*` code, as `Error.code` says it.
fn code_name(code: c_int) -> &'static str {
    match code {
        c::KHUB_E_INVALID_ARGUMENT => "invalid-argument",
        c::KHUB_E_NOT_FOUND => "not-found",
        c::KHUB_E_NO_VARIANT => "no-variant",
        c::KHUB_E_VERIFY => "verify",
        c::KHUB_E_TRUST => "trust",
        c::KHUB_E_REGISTRY => "registry",
        c::KHUB_E_OFFLINE_MISS => "offline-miss",
        c::KHUB_E_LOAD => "load",
        c::KHUB_E_SIGNATURE_MISMATCH => "signature-mismatch",
        c::KHUB_E_KERNEL => "kernel",
        c::KHUB_E_HOST => "host",
        c::KHUB_E_LOCK => "lock",
        c::KHUB_E_IO => "io",
        _ => "internal",
    }
}

/// The messages of an error's chain, outermost first, each once: a cause whose text a
/// message before it already contains is dropped, and so is a parenthesized group repeated
/// back to back. The command line's report (src/cli/report.rs) does the same over its
/// `anyhow` chain, so both say the same words.
pub fn causes(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = next {
        let text = collapse_repeats(c.to_string().trim());
        if !text.is_empty() && !out.iter().any(|kept| kept.contains(&text)) {
            out.push(text);
        }
        next = c.source();
    }
    out
}

/// `a (x) (x)` → `a (x)`.
fn collapse_repeats(s: &str) -> String {
    let mut out = s.to_owned();
    let mut from = 0;
    while let Some(open) = out[from..].find('(').map(|i| i + from) {
        let Some(close) = out[open..].find(')').map(|i| i + open) else {
            break;
        };
        let group = out[open..=close].to_owned();
        let repeat = format!(" {group}");
        if out[close + 1..].starts_with(&repeat) {
            out.replace_range(close + 1..close + 1 + repeat.len(), "");
        } else {
            from = close + 1;
        }
    }
    out
}

/// A Python exception for a `KHUB_E_*` code and its messages.
pub fn raise(code: c_int, causes: Vec<String>, kernel_status: Option<i32>) -> PyErr {
    let message = causes.join(": ");
    let err = match code {
        c::KHUB_E_NOT_FOUND => NotFound::new_err(message),
        c::KHUB_E_NO_VARIANT => NoVariant::new_err(message),
        c::KHUB_E_VERIFY => VerifyError::new_err(message),
        c::KHUB_E_TRUST => TrustError::new_err(message),
        c::KHUB_E_OFFLINE_MISS => OfflineMiss::new_err(message),
        c::KHUB_E_SIGNATURE_MISMATCH => SignatureMismatch::new_err(message),
        c::KHUB_E_KERNEL => KernelError::new_err(message),
        _ => Error::new_err(message),
    };
    Python::attach(|py| {
        let value = err.value(py);
        // Setting attributes on a fresh exception instance cannot fail short of memory
        // exhaustion; the exception is still raised if it does.
        let _ = value.setattr("code", code_name(code));
        let _ = value.setattr("causes", causes);
        let _ = value.setattr("status", kernel_status);
    });
    err
}

/// A hub error (resolve, fetch, verify, load, lock).
pub fn hub(e: khub::HubError) -> PyErr {
    raise(c::hub_error_code(&e), causes(&e), None)
}

/// A call error.
pub fn call(e: khub::CallError) -> PyErr {
    let status = match &e {
        khub::CallError::Kernel { status, .. } => Some(*status),
        _ => None,
    };
    raise(c::call_error_code(&e), causes(&e), status)
}

/// A signature mismatch found before the call.
pub fn signature(message: String) -> PyErr {
    raise(c::KHUB_E_SIGNATURE_MISMATCH, vec![message], None)
}

/// Any other failure with its code.
pub fn other(code: c_int, e: &(dyn std::error::Error + 'static)) -> PyErr {
    raise(code, causes(e), None)
}
