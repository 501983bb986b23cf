//! The benchmark engine behind `khub bench` and `khub demo`: generate inputs from a
//! function's signature, time the kernel, and time a memcpy of the same bytes in the same
//! run as the floor. Also [`HostTensor`], the owned CPU tensor that tests, benches and
//! embedding hosts use to call CPU kernels.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::abi::{self, ParamKind, Signature};
use crate::load::{Arg, CallError, Kernel};

/// A benchmark could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// The loaded variant is not a CPU variant.
    #[error("khub bench runs CPU variants; `{variant}` is a {backend} variant (use --prefer backend=cpu, or `khub selftest` on the GPU)")]
    NotCpu {
        /// The variant.
        variant: String,
        /// Its backend.
        backend: String,
    },
    /// No function of that name.
    #[error("kernel has no function `{function}`; it exports: {available}")]
    NoSuchFunction {
        /// The function asked for.
        function: String,
        /// What the kernel exports.
        available: String,
    },
    /// A tensor parameter of a dtype other than f32.
    #[error("khub bench generates f32 tensors; this function takes {0}")]
    UnsupportedDtype(String),
    /// The kernel call failed.
    #[error(transparent)]
    Call(#[from] CallError),
}

/// Tensors generated from a signature: every named dimension except `n` is `dim`, and `n`
/// is chosen so the largest tensor holds about `size` elements.
struct Generated {
    tensors: Vec<HostTensor>,
    scalars: Vec<Arg>,
    bytes: usize,
}

fn generate(sig: &Signature, size: usize, dim: u64) -> Result<Generated, BenchError> {
    let per_n = |p: &abi::Param| -> u64 {
        p.shape.as_ref().map_or(1, |s| {
            s.iter()
                .map(|d| {
                    if d.name.as_deref() == Some("n") {
                        d.factor
                    } else {
                        d.factor * if d.name.is_some() { dim } else { 1 }
                    }
                })
                .product()
        })
    };
    let largest = sig
        .params
        .iter()
        .filter(|p| matches!(p.kind, ParamKind::Tensor | ParamKind::TensorMut))
        .map(per_n)
        .max()
        .unwrap_or(1)
        .max(1);
    let n = ((size as u64) / largest).max(1);
    let mut tensors = Vec::new();
    let mut scalars = Vec::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for p in &sig.params {
        match p.kind {
            ParamKind::Tensor | ParamKind::TensorMut => {
                if p.dtype.as_deref().is_some_and(|d| d != "f32") {
                    return Err(BenchError::UnsupportedDtype(p.dtype.clone().unwrap_or_default()));
                }
                let shape: Vec<i64> = match &p.shape {
                    Some(s) => s
                        .iter()
                        .map(|d| {
                            (d.factor
                                * if d.name.as_deref() == Some("n") {
                                    n
                                } else if d.name.is_some() {
                                    dim
                                } else {
                                    1
                                }) as i64
                        })
                        .collect(),
                    None => vec![size as i64],
                };
                tensors.push(HostTensor::from_fn(&shape, |_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    ((seed >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
                }));
            }
            ParamKind::F32 => scalars.push(Arg::F32(1e-6)),
            ParamKind::F64 => scalars.push(Arg::F64(1e-6)),
            ParamKind::I64 => scalars.push(Arg::I64(1)),
            ParamKind::U64 => scalars.push(Arg::U64(1)),
        }
    }
    let bytes = tensors.iter().map(HostTensor::bytes).sum();
    Ok(Generated { tensors, scalars, bytes })
}

fn args(sig: &Signature, g: &mut Generated) -> Vec<Arg> {
    let (mut t, mut s) = (0, 0);
    sig.params
        .iter()
        .map(|p| match p.kind {
            ParamKind::Tensor => {
                t += 1;
                Arg::Tensor(g.tensors[t - 1].dl())
            }
            ParamKind::TensorMut => {
                t += 1;
                Arg::TensorMut(g.tensors[t - 1].dl_mut())
            }
            _ => {
                s += 1;
                g.scalars[s - 1]
            }
        })
        .collect()
}

/// Times `f` `iters` times after one warm-up call; returns the median.
fn median_time<E>(iters: usize, mut f: impl FnMut() -> Result<(), E>) -> Result<Duration, E> {
    f()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}

/// What [`bench_kernel`] measured.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BenchResult {
    /// The variant that ran.
    pub variant: String,
    /// The function.
    pub function: String,
    /// The bytes its tensors hold (read and written).
    pub bytes: usize,
    /// The median time of one call.
    pub median_ms: f64,
    /// Bytes moved per second, in GB/s.
    pub gb_per_s: f64,
    /// A memcpy of the same bytes, in GB/s: the floor.
    pub memcpy_gb_per_s: f64,
    /// `gb_per_s / memcpy_gb_per_s`.
    pub ratio_to_memcpy: f64,
}

/// Times `function` of a CPU kernel on generated f32 tensors (every named dimension `dim`,
/// the largest tensor about `size` elements), median of `iters` calls after a warm-up,
/// against a memcpy of the same bytes measured in the same run.
pub fn bench_kernel(kernel: &Kernel, function: &str, size: usize, dim: u64, iters: usize) -> Result<BenchResult, BenchError> {
    if kernel.backend() != "cpu" {
        return Err(BenchError::NotCpu {
            variant: kernel.variant().to_owned(),
            backend: kernel.backend().to_owned(),
        });
    }
    let sig = kernel
        .signature(function)
        .ok_or_else(|| BenchError::NoSuchFunction {
            function: function.to_owned(),
            available: kernel.functions().collect::<Vec<_>>().join(", "),
        })?
        .clone();
    let mut g = generate(&sig, size, dim)?;
    let a = args(&sig, &mut g);
    // SAFETY: the tensors are live CPU tensors owned by `g` for the whole loop, of the
    // kinds the signature names.
    let t = median_time(iters, || unsafe { kernel.call(function, &a, std::ptr::null_mut()) })?;
    // memcpy of the same number of bytes, read + written, as the floor.
    let src = vec![1u8; g.bytes / 2];
    let mut dst = vec![0u8; g.bytes / 2];
    let m = median_time(iters, || {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&dst);
        Ok::<(), BenchError>(())
    })?;
    let gbs = g.bytes as f64 / t.as_secs_f64() / 1e9;
    let mgbs = g.bytes as f64 / m.as_secs_f64() / 1e9;
    Ok(BenchResult {
        variant: kernel.variant().to_owned(),
        function: function.to_owned(),
        bytes: g.bytes,
        median_ms: t.as_secs_f64() * 1e3,
        gb_per_s: gbs,
        memcpy_gb_per_s: mgbs,
        ratio_to_memcpy: gbs / mgbs,
    })
}

/// Owned CPU tensors for tests, benchmarks and `khub bench`: f32 data with its shape,
/// and the `DLTensor` that describes it.
#[derive(Debug)]
pub struct HostTensor {
    data: Vec<f32>,
    shape: Vec<i64>,
    dl: abi::DLTensor,
}

impl HostTensor {
    /// A tensor of the given shape filled by `fill(i)`.
    pub fn from_fn(shape: &[i64], fill: impl FnMut(usize) -> f32) -> Self {
        let n: i64 = shape.iter().product();
        let data: Vec<f32> = (0..n.max(0) as usize).map(fill).collect();
        let mut t = HostTensor {
            data,
            shape: shape.to_vec(),
            dl: abi::DLTensor {
                data: std::ptr::null_mut(),
                device: abi::DLDevice {
                    device_type: abi::DL_CPU,
                    device_id: 0,
                },
                ndim: shape.len() as i32,
                dtype: abi::DLDataType::F32,
                shape: std::ptr::null_mut(),
                strides: std::ptr::null_mut(),
                byte_offset: 0,
            },
        };
        t.dl.data = t.data.as_mut_ptr().cast();
        t.dl.shape = t.shape.as_mut_ptr();
        t
    }

    /// A zero-filled tensor.
    pub fn zeros(shape: &[i64]) -> Self {
        Self::from_fn(shape, |_| 0.0)
    }

    /// The data.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The `DLTensor`, for reading.
    pub fn dl(&self) -> *const abi::DLTensor {
        &self.dl
    }

    /// The `DLTensor`, for writing.
    pub fn dl_mut(&mut self) -> *mut abi::DLTensor {
        &mut self.dl
    }

    /// The size in bytes.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }
}

// SAFETY: the DLTensor's pointers point into the tensor's own Vecs, which move with it
// (their heap buffers do not).
unsafe impl Send for HostTensor {}
