//! Checks of call arguments against an export's signature, before the kernel runs: dtype,
//! rank, named dimensions and device of every tensor (docs/abi.md, "Signature strings").
//!
//! A documented shape `[n, d]` describes a tensor of rank ≥ 2 whose leading dimensions
//! flatten into `n`; a name binds at its first use and must agree at every later one,
//! with its factor (`2d` is twice `d`).

use std::collections::BTreeMap;

use khub::abi::{DL_CPU, DL_CUDA, DL_ROCM, DLTensor, Dim, Param};

/// A DLPack device type, named.
pub fn device_name(device_type: i32) -> String {
    match device_type {
        1 => "cpu".into(),
        2 => "cuda".into(),
        3 => "cuda-host".into(),
        4 => "opencl".into(),
        7 => "vulkan".into(),
        8 => "metal".into(),
        9 => "vpi".into(),
        10 => "rocm".into(),
        11 => "rocm-host".into(),
        13 => "cuda-managed".into(),
        14 => "oneapi".into(),
        other => format!("device type {other}"),
    }
}

/// The DLPack device type a backend's kernels take, or `None` for a backend whose
/// tensors khub does not check.
pub fn backend_device(backend: &str) -> Option<i32> {
    match backend {
        "cpu" => Some(DL_CPU),
        "cuda" => Some(DL_CUDA),
        "rocm" => Some(DL_ROCM),
        _ => None,
    }
}

/// The DLPack `(code, bits)` of a signature dtype.
fn dtype_code(name: &str) -> Option<(u8, u8)> {
    Some(match name {
        "f16" => (2, 16),
        "bf16" => (4, 16),
        "f32" => (2, 32),
        "f64" => (2, 64),
        "i8" => (0, 8),
        "i32" => (0, 32),
        "i64" => (0, 64),
        "u8" => (1, 8),
        "bool" => (6, 8),
        _ => return None,
    })
}

/// A DLPack dtype, named as signatures name them where they can.
pub fn dtype_name(code: u8, bits: u8, lanes: u16) -> String {
    let base = match (code, bits) {
        (2, 16) => "f16".to_owned(),
        (4, 16) => "bf16".to_owned(),
        (2, 32) => "f32".to_owned(),
        (2, 64) => "f64".to_owned(),
        (0, b) => format!("i{b}"),
        (1, b) => format!("u{b}"),
        (6, 8) => "bool".to_owned(),
        (2, b) => format!("f{b}"),
        (c, b) => format!("dtype code {c} with {b} bits"),
    };
    if lanes == 1 { base } else { format!("{base}x{lanes}") }
}

/// A documented shape, as written.
fn shape_text(dims: &[Dim]) -> String {
    let parts: Vec<String> = dims
        .iter()
        .map(|d| match &d.name {
            Some(n) if d.factor == 1 => n.clone(),
            Some(n) => format!("{}{n}", d.factor),
            None => d.factor.to_string(),
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

/// Why a tensor does not fit its parameter. The messages follow "the tensor …".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgError {
    /// On another kind of device than the kernel's variant runs on.
    #[error("is on {}, but this kernel's variant runs on {}", device_name(*found), device_name(*expected))]
    Device {
        /// The tensor's DLPack device type.
        found: i32,
        /// The backend's.
        expected: i32,
    },
    /// On another device than an earlier tensor of the call.
    #[error(
        "is on {}:{}, but an earlier tensor is on {}:{}; every tensor of a call must be on one device",
        device_name(found.0), found.1, device_name(first.0), first.1
    )]
    MixedDevices {
        /// This tensor's `(type, id)`.
        found: (i32, i32),
        /// The first tensor's.
        first: (i32, i32),
    },
    /// Another dtype than the signature's.
    #[error("has dtype {found}, but the signature wants {wanted}")]
    Dtype {
        /// The tensor's dtype, named.
        found: String,
        /// The signature's.
        wanted: String,
    },
    /// A rank below the documented shape's.
    #[error(
        "has rank {} (shape {shape:?}), but the signature wants {wanted} (rank {rank}{})",
        shape.len(),
        if *rank == 0 { "" } else { " or more, leading dimensions flattened into the first" }
    )]
    Rank {
        /// The tensor's shape.
        shape: Vec<i64>,
        /// The documented shape, as written.
        wanted: String,
        /// Its rank.
        rank: usize,
    },
    /// A negative extent.
    #[error("has a negative extent in shape {shape:?}")]
    Negative {
        /// The tensor's shape.
        shape: Vec<i64>,
    },
    /// An extent that does not fit the documented dimension.
    #[error("has shape {shape:?}, but the signature wants {wanted}: {which} must be {rule}")]
    Extent {
        /// The tensor's shape.
        shape: Vec<i64>,
        /// The documented shape, as written.
        wanted: String,
        /// Which dimension, in words.
        which: String,
        /// What it must be, in words.
        rule: String,
    },
}

/// What the named dimensions were bound to so far in one call.
#[derive(Debug, Default)]
pub struct Bindings {
    values: BTreeMap<String, (u64, usize)>,
}

/// The view of one tensor argument that the checks need.
pub struct TensorView<'a> {
    /// The tensor.
    pub tensor: &'a DLTensor,
}

impl TensorView<'_> {
    fn shape(&self) -> Vec<i64> {
        let n = usize::try_from(self.tensor.ndim).unwrap_or(0);
        if n == 0 || self.tensor.shape.is_null() {
            return Vec::new();
        }
        // SAFETY: a DLTensor from a live managed tensor has `ndim` extents at `shape`.
        unsafe { std::slice::from_raw_parts(self.tensor.shape, n) }.to_vec()
    }
}

/// Checks one tensor argument (`index`, 0-based) against its parameter. `device` is the
/// device every tensor of the call must be on (`(type, id)` of the first one, or the
/// backend's type).
pub fn check_tensor(
    index: usize,
    param: &Param,
    view: &TensorView<'_>,
    expected_device: i32,
    first_device: &mut Option<(i32, i32)>,
    bindings: &mut Bindings,
) -> Result<(), ArgError> {
    let t = view.tensor;
    let dev = (t.device.device_type, t.device.device_id);
    if dev.0 != expected_device {
        return Err(ArgError::Device {
            found: dev.0,
            expected: expected_device,
        });
    }
    match first_device {
        Some(first) if *first != dev => {
            return Err(ArgError::MixedDevices { found: dev, first: *first });
        }
        Some(_) => {}
        None => *first_device = Some(dev),
    }
    if let Some(want) = &param.dtype
        && let Some((code, bits)) = dtype_code(want)
        && (t.dtype.code, t.dtype.bits, t.dtype.lanes) != (code, bits, 1)
    {
        return Err(ArgError::Dtype {
            found: dtype_name(t.dtype.code, t.dtype.bits, t.dtype.lanes),
            wanted: want.clone(),
        });
    }
    let Some(dims) = &param.shape else {
        return Ok(());
    };
    let shape = view.shape();
    if shape.len() < dims.len() || dims.is_empty() && !shape.is_empty() {
        return Err(ArgError::Rank {
            shape,
            wanted: shape_text(dims),
            rank: dims.len(),
        });
    }
    if dims.is_empty() {
        return Ok(());
    }
    // Leading dimensions flatten into the first documented one.
    let lead = shape.len() - dims.len() + 1;
    let mut extents: Vec<u64> = Vec::with_capacity(dims.len());
    let mut first: u64 = 1;
    for &e in &shape[..lead] {
        let e = u64::try_from(e).map_err(|_| ArgError::Negative { shape: shape.clone() })?;
        first = first.saturating_mul(e);
    }
    extents.push(first);
    for &e in &shape[lead..] {
        extents.push(u64::try_from(e).map_err(|_| ArgError::Negative { shape: shape.clone() })?);
    }
    for (pos, (dim, &extent)) in dims.iter().zip(&extents).enumerate() {
        let which = if pos == 0 && lead > 1 {
            format!("its leading dimensions (flattened: {extent})")
        } else {
            format!("dimension {pos} ({extent})")
        };
        match &dim.name {
            None => {
                if extent != dim.factor {
                    return Err(ArgError::Extent {
                        shape,
                        wanted: shape_text(dims),
                        which,
                        rule: dim.factor.to_string(),
                    });
                }
            }
            Some(name) => {
                if dim.factor == 0 || extent % dim.factor != 0 {
                    return Err(ArgError::Extent {
                        shape,
                        wanted: shape_text(dims),
                        which,
                        rule: format!("a multiple of {}", dim.factor),
                    });
                }
                let value = extent / dim.factor;
                match bindings.values.get(name) {
                    Some(&(bound, at)) if bound != value => {
                        let want = bound.saturating_mul(dim.factor);
                        return Err(ArgError::Extent {
                            shape,
                            wanted: shape_text(dims),
                            which,
                            rule: format!("{want}, since `{name}` is {bound} from argument {at}"),
                        });
                    }
                    Some(_) => {}
                    None => {
                        bindings.values.insert(name.clone(), (value, index));
                    }
                }
            }
        }
    }
    Ok(())
}
