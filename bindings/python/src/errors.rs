//! khub's errors as Python exceptions: `khub.Error` and its subclasses, chosen by the
//! error's kind (`khub::error_kind::ErrorKind`, the classification behind the C API's
//! `KHUB_E_*` codes and the command line's `--json` errors), carrying the messages the
//! command line prints.

use std::ffi::c_int;

use khub::capi as c;
use khub::error_kind::ErrorKind;
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

/// The name of a `KHUB_E_*` code, as `Error.code` says it (the kind's name).
fn code_name(code: c_int) -> &'static str {
    ErrorKind::from_code(code).map_or("internal", ErrorKind::name)
}

/// The messages of an error's chain, each once, as the command line prints them.
pub fn causes(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
    khub::error_kind::messages(e)
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
    raise(e.kind().code(), causes(&e), None)
}

/// A call error.
pub fn call(e: khub::CallError) -> PyErr {
    let status = match &e {
        khub::CallError::Kernel { status, .. } => Some(*status),
        _ => None,
    };
    raise(e.kind().code(), causes(&e), status)
}

/// A signature mismatch found before the call.
pub fn signature(message: String) -> PyErr {
    raise(c::KHUB_E_SIGNATURE_MISMATCH, vec![message], None)
}

/// Any other failure with its code.
pub fn other(code: c_int, e: &(dyn std::error::Error + 'static)) -> PyErr {
    raise(code, causes(e), None)
}
