//! The consumer side of the Python DLPack protocol: `obj.__dlpack__(...)` gives a capsule
//! holding a `DLManagedTensorVersioned` (`"dltensor_versioned"`, DLPack ≥ 1.0) or a
//! `DLManagedTensor` (`"dltensor"`, the legacy layout); khub takes ownership of it for the
//! length of one call and hands it back through its deleter.
//!
//! The rules, from the DLPack Python specification:
//! - the consumer renames a capsule it consumed to `"used_dltensor_versioned"` /
//!   `"used_dltensor"`, after which the capsule's own destructor no longer frees the
//!   tensor: the consumer calls `deleter` (when not NULL) exactly once;
//! - a versioned tensor whose major version the consumer does not know is refused, and
//!   still deleted;
//! - `flags` bit 0 (`READ_ONLY`) means the consumer must not write the data; bit 1
//!   (`IS_COPIED`) means the producer copied it, so writes would not reach the caller.

use std::ffi::{CStr, c_void};
use std::ptr::NonNull;

use khub::abi::DLTensor;
use pyo3::exceptions::PyTypeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

/// `DLPackVersion`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct DLPackVersion {
    major: u32,
    minor: u32,
}

/// `DLManagedTensor` (legacy, unversioned).
#[repr(C)]
pub struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

/// `DLManagedTensorVersioned` (DLPack ≥ 1.0).
#[repr(C)]
pub struct DLManagedTensorVersioned {
    version: DLPackVersion,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DLTensor,
}

/// `DLPACK_FLAG_BITMASK_READ_ONLY`.
pub const FLAG_READ_ONLY: u64 = 1 << 0;
/// `DLPACK_FLAG_BITMASK_IS_COPIED`.
pub const FLAG_IS_COPIED: u64 = 1 << 1;

/// The DLPack major version khub understands.
const MAJOR: u32 = 1;

const VERSIONED: &CStr = c"dltensor_versioned";
const USED_VERSIONED: &CStr = c"used_dltensor_versioned";
const LEGACY: &CStr = c"dltensor";
const USED_LEGACY: &CStr = c"used_dltensor";

/// A managed tensor khub consumed from a capsule: deleted (through the producer's
/// deleter) when dropped.
pub enum Managed {
    /// From a `"dltensor"` capsule.
    Legacy(NonNull<DLManagedTensor>),
    /// From a `"dltensor_versioned"` capsule.
    Versioned(NonNull<DLManagedTensorVersioned>),
}

impl Managed {
    /// The tensor. Valid until `self` is dropped.
    pub fn tensor(&self) -> *mut DLTensor {
        match self {
            // SAFETY: the pointer came from a consumed capsule and is live until Drop;
            // addr_of_mut! makes no reference.
            Managed::Legacy(p) => unsafe { std::ptr::addr_of_mut!((*p.as_ptr()).dl_tensor) },
            // SAFETY: as above.
            Managed::Versioned(p) => unsafe { std::ptr::addr_of_mut!((*p.as_ptr()).dl_tensor) },
        }
    }

    /// The DLPack flags (0 for a legacy tensor, which cannot say it is read-only).
    pub fn flags(&self) -> u64 {
        match self {
            Managed::Legacy(_) => 0,
            // SAFETY: live until Drop (see `tensor`).
            Managed::Versioned(p) => unsafe { (*p.as_ptr()).flags },
        }
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        match self {
            Managed::Legacy(p) => {
                // SAFETY: we own the managed tensor since renaming its capsule; its deleter
                // is called once, here, with the pointer it was handed out with.
                if let Some(d) = unsafe { (*p.as_ptr()).deleter } {
                    // SAFETY: as above.
                    unsafe { d(p.as_ptr()) }
                }
            }
            Managed::Versioned(p) => {
                // SAFETY: as above.
                if let Some(d) = unsafe { (*p.as_ptr()).deleter } {
                    // SAFETY: as above.
                    unsafe { d(p.as_ptr()) }
                }
            }
        }
    }
}

/// Why an object could not be taken as a tensor.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The object has no `__dlpack__`.
    #[error("a {0} is not a tensor: it has no `__dlpack__` (pass a torch tensor, a numpy >= 1.23 array, or any DLPack producer)")]
    NoProtocol(String),
    /// `__dlpack__` raised.
    #[error("its `__dlpack__` raised {0}")]
    Raised(PyErr),
    /// `__dlpack__` returned something else than a fresh DLPack capsule.
    #[error("its `__dlpack__` returned an object of type `{0}`, not an unused DLPack capsule (\"dltensor\" or \"dltensor_versioned\")")]
    NotCapsule(String),
    /// A versioned tensor of a major version khub does not know.
    #[error("it is a DLPack {0}.{1} tensor, and khub understands DLPack {MAJOR}.x only")]
    Version(u32, u32),
}

/// The device of a DLPack producer, from `__dlpack_device__()`, without exporting it.
pub fn device_of(obj: &Bound<'_, PyAny>) -> Option<(i32, i32)> {
    obj.call_method0("__dlpack_device__").ok()?.extract::<(i32, i32)>().ok()
}

/// Calls `obj.__dlpack__` (asking for DLPack 1.0, falling back to the legacy call for
/// producers that predate `max_version`) and takes ownership of the tensor.
///
/// `stream` is the consumer's stream for GPU data, as the protocol defines it (`None` for
/// CPU data).
pub fn import(obj: &Bound<'_, PyAny>, stream: Option<isize>) -> Result<Managed, ImportError> {
    let py = obj.py();
    let type_name = || {
        obj.get_type()
            .fully_qualified_name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "object".to_owned())
    };
    let method = match obj.getattr(pyo3::intern!(py, "__dlpack__")) {
        Ok(m) => m,
        Err(_) => return Err(ImportError::NoProtocol(type_name())),
    };
    let kwargs = PyDict::new(py);
    if let Some(s) = stream {
        kwargs.set_item("stream", s).map_err(ImportError::Raised)?;
    }
    let max_version = PyTuple::new(py, [MAJOR, 0]).map_err(ImportError::Raised)?;
    kwargs.set_item("max_version", max_version).map_err(ImportError::Raised)?;
    let capsule = match method.call((), Some(&kwargs)) {
        Ok(c) => c,
        // A producer older than DLPack 1.0 does not take `max_version`.
        Err(e) if e.is_instance_of::<PyTypeError>(py) => {
            kwargs.del_item("max_version").map_err(ImportError::Raised)?;
            method.call((), Some(&kwargs)).map_err(ImportError::Raised)?
        }
        Err(e) => return Err(ImportError::Raised(e)),
    };
    take(&capsule)
}

/// Takes the tensor out of a DLPack capsule, renaming the capsule so its destructor leaves
/// the tensor to us.
fn take(capsule: &Bound<'_, PyAny>) -> Result<Managed, ImportError> {
    let not_capsule = || {
        ImportError::NotCapsule(
            capsule
                .get_type()
                .fully_qualified_name()
                .map(|n| n.to_string())
                .unwrap_or_else(|_| "object".to_owned()),
        )
    };
    let ptr = capsule.as_ptr();
    for (name, used, versioned) in [(VERSIONED, USED_VERSIONED, true), (LEGACY, USED_LEGACY, false)] {
        // SAFETY: `ptr` is a live object (we hold a reference); PyCapsule_IsValid accepts
        // any object and checks the type and name itself.
        if unsafe { ffi::PyCapsule_IsValid(ptr, name.as_ptr()) } != 1 {
            continue;
        }
        // SAFETY: just checked to be a valid capsule of this name.
        let raw = unsafe { ffi::PyCapsule_GetPointer(ptr, name.as_ptr()) };
        let Some(raw) = NonNull::new(raw) else {
            return Err(not_capsule());
        };
        // SAFETY: a valid capsule; `used` is a static C string, so the name outlives it.
        if unsafe { ffi::PyCapsule_SetName(ptr, used.as_ptr()) } != 0 {
            // The capsule keeps ownership (its destructor frees the tensor).
            return Err(ImportError::Raised(PyErr::fetch(capsule.py())));
        }
        let managed = if versioned {
            Managed::Versioned(raw.cast())
        } else {
            Managed::Legacy(raw.cast())
        };
        if let Managed::Versioned(p) = &managed {
            // SAFETY: live until `managed` drops.
            let v = unsafe { (*p.as_ptr()).version };
            if v.major != MAJOR {
                // Dropping `managed` deletes the tensor, as the protocol requires.
                return Err(ImportError::Version(v.major, v.minor));
            }
        }
        return Ok(managed);
    }
    Err(not_capsule())
}
