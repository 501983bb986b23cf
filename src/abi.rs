//! The Rust mirror of Kernel ABI v1 (`include/khub_kernel.h`, specified in `docs/abi.md`).
//!
//! Layouts are `#[repr(C)]` copies of the header's structs; `tests/abi_layout.rs` compiles
//! the header with the system C compiler and checks sizes and offsets against these.
//! Signature strings are parsed here, and [`KernelFn`] maps Rust function-pointer types to
//! the signature they must match, for typed access.

use std::ffi::{c_char, c_void};
use std::fmt;

/// The ABI major this khub speaks.
pub const ABI_MAJOR: u32 = 1;
/// The ABI minor this khub speaks.
pub const ABI_MINOR: u32 = 0;
/// The one symbol a kernel library exports.
pub const ENTRY_SYMBOL: &str = "khub_kernel_entry";
/// The most parameters a kernel function may take.
pub const MAX_PARAMS: usize = 16;

/// `khub_status`: 0 is success.
pub type Status = i32;
/// `KHUB_OK`.
pub const OK: Status = 0;
/// `KHUB_ERR_INVALID_ARGUMENT`.
pub const ERR_INVALID_ARGUMENT: Status = 1;
/// `KHUB_ERR_UNSUPPORTED`.
pub const ERR_UNSUPPORTED: Status = 2;
/// `KHUB_ERR_DEVICE`.
pub const ERR_DEVICE: Status = 3;
/// `KHUB_ERR_INTERNAL`.
pub const ERR_INTERNAL: Status = 4;
/// `KHUB_ERR_SELFTEST_FAILED`.
pub const ERR_SELFTEST_FAILED: Status = 5;

/// The name of a status code, for messages.
pub fn status_name(s: Status) -> &'static str {
    match s {
        OK => "KHUB_OK",
        ERR_INVALID_ARGUMENT => "KHUB_ERR_INVALID_ARGUMENT",
        ERR_UNSUPPORTED => "KHUB_ERR_UNSUPPORTED",
        ERR_DEVICE => "KHUB_ERR_DEVICE",
        ERR_INTERNAL => "KHUB_ERR_INTERNAL",
        ERR_SELFTEST_FAILED => "KHUB_ERR_SELFTEST_FAILED",
        _ => "unknown status",
    }
}

/// DLPack `DLDevice`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DLDevice {
    /// `DLDeviceType` (1 = CPU, 2 = CUDA, 10 = ROCm, …).
    pub device_type: i32,
    /// The device ordinal.
    pub device_id: i32,
}

/// `kDLCPU`.
pub const DL_CPU: i32 = 1;
/// `kDLCUDA`.
pub const DL_CUDA: i32 = 2;
/// `kDLROCM`.
pub const DL_ROCM: i32 = 10;

/// DLPack `DLDataType`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DLDataType {
    /// `DLDataTypeCode`: 0 int, 1 uint, 2 float, 4 bfloat, 6 bool.
    pub code: u8,
    /// Bits per lane.
    pub bits: u8,
    /// Lanes (1 for scalars).
    pub lanes: u16,
}

impl DLDataType {
    /// 32-bit float.
    pub const F32: DLDataType = DLDataType {
        code: 2,
        bits: 32,
        lanes: 1,
    };
}

/// DLPack `DLTensor`. The host owns everything it points to.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DLTensor {
    /// The data pointer (device memory for GPU tensors).
    pub data: *mut c_void,
    /// Where the data lives.
    pub device: DLDevice,
    /// The number of dimensions.
    pub ndim: i32,
    /// The element type.
    pub dtype: DLDataType,
    /// `ndim` extents.
    pub shape: *mut i64,
    /// `ndim` strides in elements, or NULL for compact row-major.
    pub strides: *mut i64,
    /// Offset of the first element from `data`, in bytes.
    pub byte_offset: u64,
}

/// `khub_call`: per-call context, owned by the host.
#[repr(C)]
#[derive(Debug)]
pub struct KhubCall {
    /// `sizeof(khub_call)` as the host built it.
    pub struct_size: u32,
    /// Reserved, 0.
    pub flags: u32,
    /// The CUDA/HIP stream, or NULL for the default stream.
    pub stream: *mut c_void,
    /// A buffer for the error message.
    pub error: *mut c_char,
    /// Its capacity in bytes.
    pub error_capacity: usize,
}

/// `khub_selftest_fn`.
pub type SelftestFn = unsafe extern "C" fn(*const KhubCall, u64, usize, *mut f64) -> Status;

/// `khub_function`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KhubFunction {
    /// NUL-terminated name.
    pub name: *const c_char,
    /// NUL-terminated signature string.
    pub signature: *const c_char,
    /// The function, to be cast to the type its signature names.
    pub func: Option<unsafe extern "C" fn()>,
    /// The self-test, if any.
    pub selftest: Option<SelftestFn>,
}

/// `khub_kernel_desc`.
#[repr(C)]
#[derive(Debug)]
pub struct KhubKernelDesc {
    /// Frozen: the kernel's ABI major.
    pub abi_major: u32,
    /// Frozen: the kernel's ABI minor.
    pub abi_minor: u32,
    /// Frozen: `sizeof(khub_kernel_desc)` as the kernel built it.
    pub struct_size: u64,
    /// The kernel's name.
    pub name: *const c_char,
    /// Its version.
    pub version: *const c_char,
    /// Its backend.
    pub backend: *const c_char,
    /// `sizeof(khub_function)` as the kernel built it.
    pub function_size: u64,
    /// The number of functions.
    pub function_count: u64,
    /// The function table.
    pub functions: *const KhubFunction,
}

/// `khub_kernel_entry_fn`.
pub type EntryFn = unsafe extern "C" fn(u32, u32) -> *const KhubKernelDesc;

/// The kind of one parameter in a signature string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamKind {
    /// `tensor`: `const DLTensor*`.
    Tensor,
    /// `mut tensor`: `DLTensor*`.
    TensorMut,
    /// `f32`: `const float*`.
    F32,
    /// `f64`: `const double*`.
    F64,
    /// `i64`: `const int64_t*`.
    I64,
    /// `u64`: `const uint64_t*`.
    U64,
}

impl ParamKind {
    /// The spelling in a signature string.
    pub fn name(self) -> &'static str {
        match self {
            ParamKind::Tensor => "tensor",
            ParamKind::TensorMut => "mut tensor",
            ParamKind::F32 => "f32",
            ParamKind::F64 => "f64",
            ParamKind::I64 => "i64",
            ParamKind::U64 => "u64",
        }
    }
}

/// One dimension of a documented tensor shape: `128`, `n`, `2d`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dim {
    /// The factor (1 when only a name is given; the value when no name is given).
    pub factor: u64,
    /// The symbolic name, if any.
    pub name: Option<String>,
}

/// One parameter of a signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    /// Its kind.
    pub kind: ParamKind,
    /// The documented dtype of a tensor, if given.
    pub dtype: Option<String>,
    /// The documented shape of a tensor, if given.
    pub shape: Option<Vec<Dim>>,
}

/// A parsed signature string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// The parameters after the `khub_call`.
    pub params: Vec<Param>,
}

/// A signature string that does not follow the grammar in `khub_kernel.h`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("signature `{signature}` is not valid: {problem}; expected e.g. \"(mut tensor<f32>[n, d], tensor<f32>[n, 2d], f32)\"")]
pub struct SignatureError {
    /// The signature.
    pub signature: String,
    /// What is wrong.
    pub problem: String,
}

impl Signature {
    /// Parses a signature string.
    pub fn parse(s: &str) -> Result<Signature, SignatureError> {
        let err = |problem: &str| SignatureError {
            signature: s.chars().take(200).collect(),
            problem: problem.to_owned(),
        };
        let inner = s
            .trim()
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(|| err("it must be enclosed in parentheses"))?;
        let mut params = Vec::new();
        if inner.trim().is_empty() {
            return Ok(Signature { params });
        }
        // Split on commas outside brackets.
        let (mut depth, mut start, mut parts) = (0i32, 0usize, Vec::new());
        for (i, c) in inner.char_indices() {
            match c {
                '[' | '<' => depth += 1,
                ']' | '>' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&inner[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
            if depth < 0 {
                return Err(err("unbalanced brackets"));
            }
        }
        parts.push(&inner[start..]);
        if parts.len() > MAX_PARAMS {
            return Err(err("more than 16 parameters"));
        }
        for part in parts {
            params.push(parse_param(part.trim()).map_err(|p| err(&p))?);
        }
        Ok(Signature { params })
    }

    /// The parameter kinds, in order.
    pub fn kinds(&self) -> Vec<ParamKind> {
        self.params.iter().map(|p| p.kind).collect()
    }

    /// The skeleton `(mut tensor, tensor, f32)`: kinds only.
    pub fn skeleton(&self) -> String {
        let kinds: Vec<&str> = self.params.iter().map(|p| p.kind.name()).collect();
        format!("({})", kinds.join(", "))
    }
}

fn parse_param(p: &str) -> Result<Param, String> {
    let (mutable, rest) = match p.strip_prefix("mut ") {
        Some(r) => (true, r.trim_start()),
        None => (false, p),
    };
    if let Some(rest) = rest.strip_prefix("tensor") {
        let mut rest = rest.trim_start();
        let mut dtype = None;
        if let Some(r) = rest.strip_prefix('<') {
            let end = r.find('>').ok_or("a `<` without `>`")?;
            let d = r[..end].trim();
            const DTYPES: &[&str] = &["f16", "bf16", "f32", "f64", "i8", "i32", "i64", "u8", "bool"];
            if !DTYPES.contains(&d) {
                return Err(format!("unknown dtype `{d}`"));
            }
            dtype = Some(d.to_owned());
            rest = r[end + 1..].trim_start();
        }
        let mut shape = None;
        if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']').ok_or("a `[` without `]`")?;
            let dims = r[..end].split(',').map(|d| parse_dim(d.trim())).collect::<Result<Vec<_>, _>>()?;
            shape = Some(dims);
            rest = r[end + 1..].trim_start();
        }
        if !rest.is_empty() {
            return Err(format!("unexpected `{rest}` after a tensor"));
        }
        let kind = if mutable { ParamKind::TensorMut } else { ParamKind::Tensor };
        return Ok(Param { kind, dtype, shape });
    }
    if mutable {
        return Err(format!("`mut` applies to tensors only, not `{rest}`"));
    }
    let kind = match rest {
        "f32" => ParamKind::F32,
        "f64" => ParamKind::F64,
        "i64" => ParamKind::I64,
        "u64" => ParamKind::U64,
        other => return Err(format!("unknown parameter `{other}`; use tensor, mut tensor, f32, f64, i64 or u64")),
    };
    Ok(Param {
        kind,
        dtype: None,
        shape: None,
    })
}

fn parse_dim(d: &str) -> Result<Dim, String> {
    let digits = d.bytes().take_while(u8::is_ascii_digit).count();
    let (num, name) = d.split_at(digits);
    let factor = if num.is_empty() {
        1
    } else {
        num.parse().map_err(|_| format!("dimension `{d}` is too large"))?
    };
    if name.is_empty() {
        if num.is_empty() {
            return Err("an empty dimension".into());
        }
        return Ok(Dim { factor, name: None });
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') || !name.as_bytes()[0].is_ascii_alphabetic() {
        return Err(format!("dimension `{d}` is neither a number nor [number]name"));
    }
    Ok(Dim {
        factor,
        name: Some(name.to_owned()),
    })
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("(")?;
        for (i, p) in self.params.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(p.kind.name())?;
            if let Some(d) = &p.dtype {
                write!(f, "<{d}>")?;
            }
            if let Some(s) = &p.shape {
                let dims: Vec<String> = s
                    .iter()
                    .map(|d| match (&d.name, d.factor) {
                        (Some(n), 1) => n.clone(),
                        (Some(n), k) => format!("{k}{n}"),
                        (None, k) => k.to_string(),
                    })
                    .collect();
                write!(f, "[{}]", dims.join(", "))?;
            }
        }
        f.write_str(")")
    }
}

/// A Rust type that may stand for one parameter of a kernel function.
///
/// # Safety
/// Implementors must be pointer-sized types passed the way the header says for
/// [`KernelParam::KIND`].
pub unsafe trait KernelParam: Copy {
    /// The kind it stands for.
    const KIND: ParamKind;
}

// SAFETY (all impls): each is a raw pointer, passed as the header's pointer parameter.
unsafe impl KernelParam for *const DLTensor {
    const KIND: ParamKind = ParamKind::Tensor;
}
// SAFETY: a raw pointer, passed as the header says for this kind.
unsafe impl KernelParam for *mut DLTensor {
    const KIND: ParamKind = ParamKind::TensorMut;
}
// SAFETY: a raw pointer, passed as the header says for this kind.
unsafe impl KernelParam for *const f32 {
    const KIND: ParamKind = ParamKind::F32;
}
// SAFETY: a raw pointer, passed as the header says for this kind.
unsafe impl KernelParam for *const f64 {
    const KIND: ParamKind = ParamKind::F64;
}
// SAFETY: a raw pointer, passed as the header says for this kind.
unsafe impl KernelParam for *const i64 {
    const KIND: ParamKind = ParamKind::I64;
}
// SAFETY: a raw pointer, passed as the header says for this kind.
unsafe impl KernelParam for *const u64 {
    const KIND: ParamKind = ParamKind::U64;
}

/// A Rust function-pointer type that may stand for a kernel function:
/// `unsafe extern "C" fn(*const KhubCall, P1, …, Pn) -> Status` with `Pi: KernelParam`.
///
/// # Safety
/// Implementors must be function pointers with exactly that C type.
pub unsafe trait KernelFn: Copy {
    /// The parameter kinds after the `khub_call`.
    fn kinds() -> Vec<ParamKind>;
    /// Builds the function pointer from the untyped one.
    ///
    /// # Safety
    /// `f` must point to a function of this type.
    unsafe fn from_raw(f: unsafe extern "C" fn()) -> Self;
}

macro_rules! kernel_fn {
    ($($p:ident),*) => {
        // SAFETY: a function pointer with the header's calling convention and parameters.
        unsafe impl<$($p: KernelParam),*> KernelFn for unsafe extern "C" fn(*const KhubCall $(, $p)*) -> Status {
            fn kinds() -> Vec<ParamKind> {
                vec![$($p::KIND),*]
            }
            unsafe fn from_raw(f: unsafe extern "C" fn()) -> Self {
                // SAFETY: the caller guarantees the pointee has this type; function pointers
                // of any type have the same size and representation.
                unsafe { std::mem::transmute::<unsafe extern "C" fn(), Self>(f) }
            }
        }
    };
}

kernel_fn!();
kernel_fn!(A);
kernel_fn!(A, B);
kernel_fn!(A, B, C);
kernel_fn!(A, B, C, D);
kernel_fn!(A, B, C, D, E);
kernel_fn!(A, B, C, D, E, F);
kernel_fn!(A, B, C, D, E, F, G);
kernel_fn!(A, B, C, D, E, F, G, H);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_parse_and_print() {
        let s = Signature::parse("(mut tensor<f32>[n, d], tensor<f32>[n,2d], f32)").unwrap();
        assert_eq!(s.kinds(), [ParamKind::TensorMut, ParamKind::Tensor, ParamKind::F32]);
        assert_eq!(s.to_string(), "(mut tensor<f32>[n, d], tensor<f32>[n, 2d], f32)");
        assert_eq!(s.skeleton(), "(mut tensor, tensor, f32)");
        assert_eq!(
            s.params[1].shape.as_ref().unwrap()[1],
            Dim {
                factor: 2,
                name: Some("d".into())
            }
        );
        assert_eq!(Signature::parse("()").unwrap().params.len(), 0);
        assert_eq!(
            Signature::parse(" ( mut  tensor , tensor ) ").unwrap().skeleton(),
            "(mut tensor, tensor)"
        );
    }

    #[test]
    fn bad_signatures_say_why() {
        for (bad, needle) in [
            ("mut tensor", "parentheses"),
            ("(mut f32)", "tensors only"),
            ("(tensor<f31>)", "dtype"),
            ("(tensor[n,])", "empty"),
            ("(tensor[-1])", "neither"),
            ("(tensor, string)", "unknown parameter"),
            ("(tensor[n)", "without"),
        ] {
            let e = Signature::parse(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
        let many = format!("({})", vec!["tensor"; 17].join(", "));
        assert!(Signature::parse(&many).unwrap_err().to_string().contains("16"));
    }

    #[test]
    fn fn_types_map_to_kinds() {
        type Silu = unsafe extern "C" fn(*const KhubCall, *mut DLTensor, *const DLTensor) -> Status;
        assert_eq!(<Silu as KernelFn>::kinds(), [ParamKind::TensorMut, ParamKind::Tensor]);
        type Rms = unsafe extern "C" fn(*const KhubCall, *mut DLTensor, *const DLTensor, *const DLTensor, *const f32) -> Status;
        assert_eq!(<Rms as KernelFn>::kinds().len(), 4);
    }
}
