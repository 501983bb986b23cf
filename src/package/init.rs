//! `khub init`: scaffold a kernel package that builds and packages straight away.
//!
//! The package holds one function, `scale` (`out = x * alpha` over f32), with the ABI
//! boilerplate, a self-test against a scalar reference, a CPU source built for a baseline
//! and an x86-64-v3 variant, a CUDA source, and a test script. Authors replace `scale` with
//! their own functions.

use std::path::{Path, PathBuf};

use super::PackageError;

/// What `init` wrote.
#[derive(Debug, Clone)]
pub struct Scaffold {
    /// The kernel's name.
    pub name: String,
    /// The files written, relative to the package directory.
    pub files: Vec<PathBuf>,
}

/// A kernel name from a directory name: lowercase letters, digits, `_` and `-`.
pub fn kernel_name(dir: &Path) -> Option<String> {
    let raw = std::path::absolute(dir).ok()?.file_name()?.to_string_lossy().to_lowercase();
    let name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = name.trim_matches(['_', '-']).to_owned();
    (!name.is_empty() && name.len() <= 96).then_some(name)
}

/// Writes a new kernel package into `dir` (created if needed; it must not already hold a
/// `kernel.toml`). `name` defaults to the directory's name.
pub fn init(dir: &Path, name: Option<&str>) -> Result<Scaffold, PackageError> {
    let name = match name {
        Some(n) => n.to_owned(),
        None => kernel_name(dir).ok_or_else(|| PackageError::ConfigInvalid {
            path: dir.to_owned(),
            message: "cannot derive a kernel name from the directory; pass --name".into(),
        })?,
    };
    if name.is_empty()
        || name.len() > 96
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return Err(PackageError::ConfigInvalid {
            path: dir.to_owned(),
            message: format!("kernel name `{name}` is not allowed: use lowercase letters, digits, `-` and `_`"),
        });
    }
    let config = dir.join(super::CONFIG_FILE);
    if config.exists() {
        return Err(PackageError::ConfigInvalid {
            path: config,
            message: "already exists; khub init never overwrites a package".into(),
        });
    }
    let c_ident = name.replace('-', "_");
    let files: Vec<(&str, String)> = vec![
        ("kernel.toml", kernel_toml(&name, &c_ident)),
        ("src/kernel.c", C_SOURCE.replace("@NAME@", &name)),
        ("src/kernel.cu", CUDA_SOURCE.replace("@NAME@", &name)),
        ("tests/run.sh", TEST_SCRIPT.to_owned()),
        ("README.md", README.replace("@NAME@", &name)),
        (".gitignore", "/build/\n/release/\n".to_owned()),
    ];
    // Nothing is written unless nothing would be replaced: `khub init .` in an existing
    // repository must not overwrite its README, .gitignore or sources.
    let existing: Vec<&str> = files
        .iter()
        .map(|(rel, _)| *rel)
        .filter(|rel| std::fs::symlink_metadata(dir.join(rel)).is_ok())
        .collect();
    if !existing.is_empty() {
        return Err(PackageError::ConfigInvalid {
            path: dir.to_owned(),
            message: format!(
                "{} already exist{} here; khub init never overwrites files: run it in a new or empty directory, or move them aside",
                existing.iter().map(|r| format!("`{r}`")).collect::<Vec<_>>().join(", "),
                if existing.len() == 1 { "s" } else { "" }
            ),
        });
    }
    let mut written = Vec::new();
    for (rel, text) in files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| PackageError::Write {
                path: parent.to_owned(),
                source,
            })?;
        }
        crate::fsx::write_atomic(&path, text.as_bytes()).map_err(|e| PackageError::Write {
            path: path.clone(),
            source: e.source,
        })?;
        #[cfg(unix)]
        if rel.ends_with(".sh") {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755));
        }
        written.push(PathBuf::from(rel));
    }
    Ok(Scaffold { name, files: written })
}

fn kernel_toml(name: &str, _ident: &str) -> String {
    let arch = if cfg!(target_arch = "aarch64") { "aarch64" } else { "x86_64" };
    let cpu_variants = if arch == "x86_64" {
        r#"[[variants]]
id = "cpu-x86_64-v1-linux"
backend = "cpu"
arch = "x86_64"
sources = ["src/kernel.c"]
flags = ["-O3", "-march=x86-64"]
libs = ["m"]
cpu-level = "x86-64-v1"

[[variants]]
id = "cpu-x86_64-v3-linux"
backend = "cpu"
arch = "x86_64"
sources = ["src/kernel.c"]
flags = ["-O3", "-march=x86-64-v3"]
libs = ["m"]
cpu-level = "x86-64-v3"
"#
    } else {
        r#"[[variants]]
id = "cpu-aarch64-linux"
backend = "cpu"
arch = "aarch64"
sources = ["src/kernel.c"]
flags = ["-O3"]
libs = ["m"]
"#
    };
    format!(
        r#"# The package config khub build / khub package read. The release manifest (khub.toml) is
# derived from the binaries.

[kernel]
name = "{name}"
version = "0.1.0"
description = "A new khub kernel"
license = "Apache-2.0"

[[exports]]
name = "scale"
signature = "(mut tensor<f32>[n], tensor<f32>[n], f32)"

{cpu_variants}
# Built when nvcc is found (KHUB_NVCC, PATH, CUDA_HOME); skipped with a warning otherwise.
[[variants]]
id = "cuda-sm80-{arch}-linux"
backend = "cuda"
arch = "{arch}"
sources = ["src/kernel.cu"]
flags = ["-O3"]
cuda = {{ code = ["sm_80", "compute_80"], cudart = "static" }}
"#
    )
}

const C_SOURCE: &str = r#"/* @NAME@: a khub kernel (Kernel ABI v1, include/khub_kernel.h). CPU build.
 *
 * scale "(mut tensor<f32>[n], tensor<f32>[n], f32)": out = x * alpha.
 * Replace it with your functions; keep one table entry and one self-test per function.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "khub_kernel.h"

#ifndef KHUB_KERNEL_VERSION
#define KHUB_KERNEL_VERSION "0.1.0"
#endif

static khub_status check(const khub_call* call, const DLTensor* t, const char* what) {
    if (t == NULL) return khub_fail(call, KHUB_ERR_INVALID_ARGUMENT, what);
    if (t->device.device_type != kDLCPU) return khub_fail(call, KHUB_ERR_INVALID_ARGUMENT, "tensors must be on the CPU");
    if (!khub_is_dtype(t, kDLFloat, 32)) return khub_fail(call, KHUB_ERR_UNSUPPORTED, "only float32 tensors are supported");
    if (!khub_is_contiguous(t)) return khub_fail(call, KHUB_ERR_UNSUPPORTED, "tensors must be contiguous");
    return KHUB_OK;
}

static khub_status scale(const khub_call* call, DLTensor* out, const DLTensor* x, const float* alpha) {
    khub_status s;
    if ((s = check(call, out, "scale: out is NULL")) != KHUB_OK) return s;
    if ((s = check(call, x, "scale: x is NULL")) != KHUB_OK) return s;
    if (alpha == NULL) return khub_fail(call, KHUB_ERR_INVALID_ARGUMENT, "scale: alpha is NULL");
    int64_t n = khub_numel(x);
    if (khub_numel(out) != n) return khub_fail(call, KHUB_ERR_INVALID_ARGUMENT, "scale: out and x differ in size");
    float* restrict o = (float*)((char*)out->data + out->byte_offset);
    const float* restrict i = (const float*)((const char*)x->data + x->byte_offset);
    const float a = *alpha;
    for (int64_t k = 0; k < n; k++) o[k] = i[k] * a;
    return KHUB_OK;
}

/* Self-test: n generated values, compared with a double-precision reference. */
static khub_status scale_selftest(const khub_call* call, uint64_t seed, size_t n, double* max_error) {
    float* x = malloc((n ? n : 1) * sizeof(float));
    float* out = malloc((n ? n : 1) * sizeof(float));
    if (x == NULL || out == NULL) {
        free(x);
        free(out);
        return khub_fail(call, KHUB_ERR_INTERNAL, "scale_selftest: out of memory");
    }
    uint64_t s = seed | 1;
    for (size_t k = 0; k < n; k++) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        x[k] = (float)((double)(s >> 40) / (double)(1 << 24) * 16.0 - 8.0);
    }
    int64_t shape[1] = {(int64_t)n};
    DLTensor tx = {x, {kDLCPU, 0}, 1, {kDLFloat, 32, 1}, shape, NULL, 0};
    DLTensor to = {out, {kDLCPU, 0}, 1, {kDLFloat, 32, 1}, shape, NULL, 0};
    const float alpha = 1.5f;
    khub_status st = scale(call, &to, &tx, &alpha);
    double worst = 0.0;
    for (size_t k = 0; st == KHUB_OK && k < n; k++) {
        double ref = (double)x[k] * 1.5;
        double err = fabs((double)out[k] - ref) / fmax(1.0, fabs(ref));
        if (err > worst) worst = err;
    }
    free(x);
    free(out);
    if (max_error != NULL) *max_error = worst;
    if (st != KHUB_OK) return st;
    return worst <= 1e-6 ? KHUB_OK : khub_fail(call, KHUB_ERR_SELFTEST_FAILED, "scale: error above 1e-6");
}

static const khub_function functions[] = {
    {"scale", "(mut tensor<f32>[n], tensor<f32>[n], f32)", (khub_fn_ptr)scale, scale_selftest},
};

KHUB_DEFINE_KERNEL("@NAME@", KHUB_KERNEL_VERSION, "cpu", functions)
"#;

const CUDA_SOURCE: &str = r#"// @NAME@: a khub kernel (Kernel ABI v1, include/khub_kernel.h). CUDA build.
//
// scale "(mut tensor<f32>[n], tensor<f32>[n], f32)": out = x * alpha, on call->stream.
#include <cuda_runtime.h>
#include <math.h>
#include <stdlib.h>

#include "khub_kernel.h"

#ifndef KHUB_KERNEL_VERSION
#define KHUB_KERNEL_VERSION "0.1.0"
#endif

__global__ void scale_kernel(float* out, const float* x, float a, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        out[i] = x[i] * a;
    }
}

static khub_status scale(const khub_call* call, DLTensor* out, const DLTensor* x, const float* alpha) {
    if (out == NULL || x == NULL || alpha == NULL) return khub_fail(call, KHUB_ERR_INVALID_ARGUMENT, "scale: NULL argument");
    if (out->device.device_type != kDLCUDA || x->device.device_type != kDLCUDA)
        return khub_fail(call, KHUB_ERR_INVALID_ARGUMENT, "scale: tensors must be CUDA tensors");
    if (!khub_is_dtype(out, kDLFloat, 32) || !khub_is_dtype(x, kDLFloat, 32))
        return khub_fail(call, KHUB_ERR_UNSUPPORTED, "scale: only float32 tensors are supported");
    long long n = (long long)khub_numel(x);
    if ((long long)khub_numel(out) != n) return khub_fail(call, KHUB_ERR_INVALID_ARGUMENT, "scale: out and x differ in size");
    if (n == 0) return KHUB_OK;
    int blocks = (int)((n + 255) / 256 < 65535 ? (n + 255) / 256 : 65535);
    scale_kernel<<<blocks, 256, 0, (cudaStream_t)(call ? call->stream : NULL)>>>(
        (float*)((char*)out->data + out->byte_offset), (const float*)((const char*)x->data + x->byte_offset), *alpha, n);
    cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? KHUB_OK : khub_fail(call, KHUB_ERR_DEVICE, cudaGetErrorString(e));
}

static khub_status scale_selftest(const khub_call* call, uint64_t seed, size_t n, double* max_error) {
    size_t bytes = (n ? n : 1) * sizeof(float);
    float* hx = (float*)malloc(bytes);
    float* ho = (float*)malloc(bytes);
    float *dx = NULL, *dout = NULL;
    khub_status st = KHUB_OK;
    double worst = 0.0;
    if (hx == NULL || ho == NULL) { st = khub_fail(call, KHUB_ERR_INTERNAL, "scale_selftest: out of memory"); goto done; }
    if (cudaMalloc(&dx, bytes) != cudaSuccess || cudaMalloc(&dout, bytes) != cudaSuccess) {
        st = khub_fail(call, KHUB_ERR_DEVICE, "scale_selftest: cudaMalloc failed");
        goto done;
    }
    {
        uint64_t s = seed | 1;
        for (size_t k = 0; k < n; k++) {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            hx[k] = (float)((double)(s >> 40) / (double)(1 << 24) * 16.0 - 8.0);
        }
        cudaMemcpy(dx, hx, bytes, cudaMemcpyHostToDevice);
        int64_t shape[1] = {(int64_t)n};
        DLTensor tx = {dx, {kDLCUDA, 0}, 1, {kDLFloat, 32, 1}, shape, NULL, 0};
        DLTensor to = {dout, {kDLCUDA, 0}, 1, {kDLFloat, 32, 1}, shape, NULL, 0};
        const float alpha = 1.5f;
        khub_call local = {sizeof(khub_call), 0, NULL, call ? call->error : NULL, call ? call->error_capacity : 0};
        st = scale(&local, &to, &tx, &alpha);
        if (st == KHUB_OK && cudaMemcpy(ho, dout, bytes, cudaMemcpyDeviceToHost) != cudaSuccess)
            st = khub_fail(call, KHUB_ERR_DEVICE, "scale_selftest: copy back failed");
        for (size_t k = 0; st == KHUB_OK && k < n; k++) {
            double ref = (double)hx[k] * 1.5;
            double err = fabs((double)ho[k] - ref) / fmax(1.0, fabs(ref));
            if (err > worst) worst = err;
        }
    }
done:
    if (dx) cudaFree(dx);
    if (dout) cudaFree(dout);
    free(hx);
    free(ho);
    if (max_error != NULL) *max_error = worst;
    if (st != KHUB_OK) return st;
    return worst <= 1e-6 ? KHUB_OK : khub_fail(call, KHUB_ERR_SELFTEST_FAILED, "scale: error above 1e-6");
}

static const khub_function functions[] = {
    {"scale", "(mut tensor<f32>[n], tensor<f32>[n], f32)", (khub_fn_ptr)scale, scale_selftest},
};

KHUB_DEFINE_KERNEL("@NAME@", KHUB_KERNEL_VERSION, "cuda", functions)
"#;

const TEST_SCRIPT: &str = r#"#!/bin/sh
# Builds every variant this machine can build, packages a release, and runs the self-tests
# of the variant khub picks for this machine.
set -eu
cd "$(dirname "$0")/.."
khub package . --out release
khub selftest release
"#;

const README: &str = r#"# @NAME@

A khub kernel package.

- `kernel.toml`: the name, version, exported functions and the variant matrix.
- `src/kernel.c`: the CPU build; `src/kernel.cu`: the CUDA build (built when nvcc is found).
- `tests/run.sh`: package and self-test.

```sh
khub package . --out release        # build, inspect, write release/khub.toml
khub selftest release               # run the self-tests on this machine's variant
khub sign release --key khub.key    # sign the manifest
khub publish release --to org/@NAME@ --create
```
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_directories() {
        assert_eq!(kernel_name(Path::new("/tmp/My Kernel!")).as_deref(), Some("my_kernel"));
        assert_eq!(kernel_name(Path::new("/tmp/flash-attn")).as_deref(), Some("flash-attn"));
    }

    #[test]
    fn init_refuses_to_overwrite_and_bad_names() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("k");
        init(&dir, None).unwrap();
        let e = init(&dir, None).unwrap_err().to_string();
        assert!(e.contains("never overwrites"), "{e}");
        let e = init(&d.path().join("x"), Some("Bad Name")).unwrap_err().to_string();
        assert!(e.contains("not allowed"), "{e}");
    }

    /// `khub init .` in an existing repository (no kernel.toml, but a README and a
    /// .gitignore of its own) replaced those files; now it refuses and writes nothing.
    #[test]
    #[allow(clippy::disallowed_methods)] // test fixtures
    fn init_writes_nothing_over_a_repository_s_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("README.md"), "# mine\n").unwrap();
        std::fs::write(d.path().join(".gitignore"), "target/\n").unwrap();
        let e = init(d.path(), Some("k")).unwrap_err().to_string();
        assert!(e.contains("`README.md`, `.gitignore` already exist"), "{e}");
        assert_eq!(std::fs::read_to_string(d.path().join("README.md")).unwrap(), "# mine\n");
        assert_eq!(std::fs::read_to_string(d.path().join(".gitignore")).unwrap(), "target/\n");
        assert!(!d.path().join("kernel.toml").exists() && !d.path().join("src").exists());
    }
}
