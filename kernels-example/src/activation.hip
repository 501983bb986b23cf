/*
 * activation.hip: the HIP (ROCm) build of the example kernel "activation" (Kernel ABI v1).
 *
 * The same three functions, signatures and self-tests as activation.cu, on kDLROCM float32
 * tensors, launched on the call's stream ((hipStream_t)call->stream; NULL is the null
 * stream). Built as one shared library linked against the HIP runtime (libamdhip64), e.g.
 * with Debian's clang-19 and libamdhip64-dev:
 *     clang-19 -x hip --offload-arch=gfx90a --offload-arch=gfx942 --offload-arch=gfx1100 \
 *              -nogpuinc -nogpulib -shared -fPIC -O3 -I include -o libactivation.so \
 *              activation.hip -lamdhip64
 * Add -mcode-object-version=6 for generic targets (--offload-arch=gfx11-generic).
 *
 * Why the device code uses no HIP device header and no device library: Debian packages
 * HIP 5.2 headers and no ROCm device libraries for gfx942 or gfx110x, so the build passes
 * -nogpuinc -nogpulib (docs/amd.md). The device side is written with clang builtins only
 * (__builtin_amdgcn_* for indices and barriers, __builtin_fmaf, __builtin_sqrtf), and e^x
 * is computed here (the same Cody-Waite reduction and polynomial as the CPU build), so
 * nothing is left for ocml/ockl to provide. The host side uses the HIP runtime API header
 * (hip/hip_runtime_api.h), which declares functions only, and launches with
 * hipLaunchKernel instead of the <<<>>> syntax (whose helpers live in hip_runtime.h).
 * The same source builds unchanged with a full ROCm install.
 *
 * Functions (all float32, contiguous, any number of leading dimensions):
 *     silu_and_mul "(mut tensor<f32>[n, d], tensor<f32>[n, 2d])"
 *                  out[..., d] = silu(x[..., :d]) * x[..., d:]
 *     gelu         "(mut tensor<f32>[n], tensor<f32>[n])"
 *                  out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
 *     rms_norm     "(mut tensor<f32>[n, h], tensor<f32>[n, h], tensor<f32>[h], f32)"
 *                  out = x / sqrt(mean(x^2, last dim) + eps) * weight
 *
 * Calls are asynchronous: a function checks its arguments, launches, checks the launch
 * and returns; errors during execution surface at the caller's next synchronisation. The
 * current device is switched to the tensors' device for the launch and restored
 * afterwards.
 *
 * Self-tests run the function on device copies of generated data and compare with a
 * double-precision libm reference on the host; the error of one element is
 * |got - ref| / max(1, |ref|), and a self-test fails above SELFTEST_TOLERANCE (1e-5).
 * Without a GPU every self-test returns KHUB_ERR_DEVICE (hipGetDevice fails cleanly).
 */
#ifndef __HIP_PLATFORM_AMD__
#define __HIP_PLATFORM_AMD__ 1
#endif

#include "khub_kernel.h"

#include <hip/hip_runtime_api.h>

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef KHUB_KERNEL_VERSION
#define KHUB_KERNEL_VERSION "0.1.0"
#endif

#define SELFTEST_TOLERANCE 1e-5

/* Inputs of exp_f are clamped to [EXP_LO, EXP_HI], where e^x and 2^n stay normal. Above
 * EXP_HI, e^-a (silu) or e^-2u (gelu) is beyond float range and the result, smaller than
 * 1e-36 in magnitude, is returned as 0 (the CPU and CUDA builds do the same). */
#define EXP_HI 88.0f
#define EXP_LO (-87.0f)

/* Threads per block never exceed this (threads_for, gelu); the reduction buffer of
 * rms_norm has this many slots. */
#define MAX_THREADS 256

/* ------------------------------------------------------------------------------------ */
/* Device code: clang builtins only                                                      */
/* ------------------------------------------------------------------------------------ */

#define KHUB_GLOBAL static __attribute__((global)) __attribute__((amdgpu_flat_work_group_size(1, MAX_THREADS)))
#define KHUB_DEVICE static __attribute__((device)) __attribute__((always_inline)) inline
#define KHUB_SHARED __attribute__((shared))

KHUB_DEVICE uint32_t thread_x(void) { return __builtin_amdgcn_workitem_id_x(); }
KHUB_DEVICE uint32_t block_x(void) { return __builtin_amdgcn_workgroup_id_x(); }
KHUB_DEVICE uint32_t block_y(void) { return __builtin_amdgcn_workgroup_id_y(); }
KHUB_DEVICE uint32_t block_dim_x(void) { return __builtin_amdgcn_workgroup_size_x(); }
/* HIP launches whole blocks, so the grid size in work-items is a multiple of the block. */
KHUB_DEVICE uint32_t grid_dim_x(void) { return __builtin_amdgcn_grid_size_x() / __builtin_amdgcn_workgroup_size_x(); }
KHUB_DEVICE uint32_t grid_dim_y(void) { return __builtin_amdgcn_grid_size_y() / __builtin_amdgcn_workgroup_size_y(); }

/* __syncthreads(): release the block's LDS writes, wait for every wave, then acquire. */
KHUB_DEVICE void sync_block(void) {
    __builtin_amdgcn_fence(__ATOMIC_RELEASE, "workgroup");
    __builtin_amdgcn_s_barrier();
    __builtin_amdgcn_fence(__ATOMIC_ACQUIRE, "workgroup");
}

/* Clamps the argument of exp_f to [EXP_LO, EXP_HI]; NaN fails the first comparison and
 * becomes EXP_HI, so the integer conversion in exp_f is always defined. */
KHUB_DEVICE float clamp_exp_arg(float x) {
    x = x < EXP_HI ? x : EXP_HI; /* also NaN -> EXP_HI */
    return x > EXP_LO ? x : EXP_LO;
}

/*
 * e^x: x is clamped to [-87, 88] (NaN becomes 88; callers propagate NaN through their other
 * factor), x = n ln2 + r with n = round(x / ln2) and |r| <= ln2/2 (Cody-Waite: ln2 in two
 * parts so n ln2 is exact), e^r is the degree-6 Cephes polynomial, 2^n is built in the
 * exponent bits. The CPU build uses the same steps; its measured relative error is at most
 * 8.4e-8 over [-87, 88]. fmaf is a hardware instruction on every AMD GPU.
 */
KHUB_DEVICE float exp_f(float x) {
    x = clamp_exp_arg(x);
    const int32_t n = (int32_t)(x * 1.44269504088896341f + 128.5f) - 128;
    const float nf = (float)n;
    float r = x - nf * 0.693359375f;
    r = r - nf * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = __builtin_fmaf(p, r, 1.3981999507e-3f);
    p = __builtin_fmaf(p, r, 8.3334519073e-3f);
    p = __builtin_fmaf(p, r, 4.1665795894e-2f);
    p = __builtin_fmaf(p, r, 1.6666665459e-1f);
    p = __builtin_fmaf(p, r, 5.0000001201e-1f);
    const float y = __builtin_fmaf(p, r * r, r) + 1.0f;
    const float scale = __builtin_bit_cast(float, (uint32_t)(n + 127) << 23);
    return y * scale;
}

KHUB_DEVICE float silu_f(float a) {
    const float y = a / (1.0f + exp_f(-a));
    return -a > EXP_HI ? 0.0f : y; /* NaN stays NaN */
}

/* gelu(x) = 0.5 x (1 + tanh(u)) = x / (1 + e^(-2u)): no cancellation near 0, no overflow. */
KHUB_DEVICE float gelu_f(float x) {
    const float u = 0.7978845608028654f * __builtin_fmaf(0.044715f * x, x * x, x);
    const float t = -2.0f * u;
    const float y = x / (1.0f + exp_f(t));
    return t > EXP_HI ? 0.0f : y;
}

/* out [rows, d] from x [rows, 2d]: rows grid-stride over the y blocks, columns over x. */
KHUB_GLOBAL void silu_and_mul_kernel(float* __restrict__ out, const float* __restrict__ x, int64_t rows, int64_t d) {
    const int64_t stride = (int64_t)block_dim_x() * grid_dim_x();
    for (int64_t r = block_y(); r < rows; r += grid_dim_y()) {
        const float* xr = x + r * 2 * d;
        float* o = out + r * d;
        for (int64_t i = (int64_t)block_x() * block_dim_x() + thread_x(); i < d; i += stride) {
            o[i] = silu_f(xr[i]) * xr[d + i];
        }
    }
}

/* Elementwise; out may equal x (in place), so no __restrict__. */
KHUB_GLOBAL void gelu_kernel(float* out, const float* x, int64_t n) {
    const int64_t stride = (int64_t)block_dim_x() * grid_dim_x();
    for (int64_t i = (int64_t)block_x() * block_dim_x() + thread_x(); i < n; i += stride) {
        out[i] = gelu_f(x[i]);
    }
}

/*
 * One block per row (grid-stride over rows), at most MAX_THREADS threads. The sum of
 * squares is reduced through LDS by halving, which works for any wave size (64 on CDNA,
 * 32 or 64 on RDNA) and any block size up to MAX_THREADS. out may equal x (in place):
 * every read of a row happens before the barrier that precedes its writes.
 */
KHUB_GLOBAL void rms_norm_kernel(float* out, const float* x, const float* __restrict__ w, int64_t rows, int64_t h, float eps) {
    KHUB_SHARED float partial[MAX_THREADS];
    KHUB_SHARED float s_inv;
    const uint32_t tid = thread_x(), nthreads = block_dim_x();
    for (int64_t r = block_x(); r < rows; r += grid_dim_x()) {
        const float* xr = x + r * h;
        float* o = out + r * h;
        float ss = 0.0f;
        for (int64_t i = tid; i < h; i += nthreads) {
            const float v = xr[i];
            ss = __builtin_fmaf(v, v, ss);
        }
        partial[tid] = ss;
        sync_block();
        for (uint32_t s = MAX_THREADS / 2; s > 0; s >>= 1) {
            if (tid < s && tid + s < nthreads) {
                partial[tid] += partial[tid + s];
            }
            sync_block();
        }
        if (tid == 0) {
            s_inv = 1.0f / __builtin_sqrtf(partial[0] / (float)h + eps);
        }
        sync_block();
        const float inv = s_inv;
        for (int64_t i = tid; i < h; i += nthreads) {
            o[i] = xr[i] * inv * w[i];
        }
        sync_block(); /* partial and s_inv are reused by the next row */
    }
}

/* ------------------------------------------------------------------------------------ */
/* Host helpers                                                                          */
/* ------------------------------------------------------------------------------------ */

#if defined(__GNUC__)
static khub_status failf(const khub_call* call, khub_status status, const char* fmt, ...)
    __attribute__((format(printf, 3, 4)));
#endif

static khub_status failf(const khub_call* call, khub_status status, const char* fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return khub_fail(call, status, buf);
}

static hipStream_t stream_of(const khub_call* call) {
    return call != NULL ? (hipStream_t)call->stream : (hipStream_t)0;
}

struct f32_view {
    float* data; /* data + byte_offset; may be NULL only when numel == 0 */
    int64_t numel;
    int32_t ndim;
    const int64_t* shape;
    int32_t device_id;
};

/* Checks that t is a usable float32 ROCm tensor: not NULL, kDLROCM, float32 with one lane
 * (other float widths are KHUB_ERR_UNSUPPORTED, anything else invalid), a sane shape,
 * compact row-major (else KHUB_ERR_UNSUPPORTED), and data non-NULL and 4-byte aligned
 * unless the tensor is empty. */
static khub_status check_f32(const khub_call* call, const char* fn, const char* arg, const DLTensor* t, int32_t min_ndim,
                             f32_view* v) {
    if (t == NULL) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: %s is NULL", fn, arg);
    }
    if (t->device.device_type != kDLROCM) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: %s is on device type %d; this ROCm build takes kDLROCM (10) tensors only",
                     fn, arg, (int)t->device.device_type);
    }
    if (t->device.device_id < 0) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: %s has device id %d", fn, arg, (int)t->device.device_id);
    }
    if (!khub_is_dtype(t, kDLFloat, 32)) {
        const DLDataType dt = t->dtype;
        const int is_float =
            dt.lanes == 1 && ((dt.code == kDLFloat && (dt.bits == 16 || dt.bits == 64)) || (dt.code == kDLBfloat && dt.bits == 16));
        return failf(call, is_float ? KHUB_ERR_UNSUPPORTED : KHUB_ERR_INVALID_ARGUMENT,
                     "%s: %s has dtype (code %u, bits %u, lanes %u); %s float32 (code 2, bits 32, lanes 1)", fn, arg, (unsigned)dt.code,
                     (unsigned)dt.bits, (unsigned)dt.lanes, is_float ? "this build supports only" : "expected");
    }
    if (t->ndim < min_ndim) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: %s has %d dimensions; at least %d needed", fn, arg, (int)t->ndim,
                     (int)min_ndim);
    }
    if (t->ndim > 0 && t->shape == NULL) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: %s has ndim %d but shape is NULL", fn, arg, (int)t->ndim);
    }
    int64_t numel = 1;
    int overflow = 0;
    for (int32_t i = 0; i < t->ndim; i++) {
        const int64_t e = t->shape[i];
        if (e < 0) {
            return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: %s has a negative extent %lld in dimension %d", fn, arg, (long long)e,
                         (int)i);
        }
        if (e != 0 && numel > INT64_MAX / e) {
            overflow = 1;
        } else {
            numel *= e;
        }
    }
    if (numel == 0) {
        overflow = 0;
    }
    if (overflow || (uint64_t)numel > (uint64_t)(SIZE_MAX / sizeof(float))) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: %s has too many elements", fn, arg);
    }
    /* A layout this build lacks is KHUB_ERR_UNSUPPORTED (docs/abi.md); an empty tensor's
     * strides do not matter. */
    if (numel > 0 && !khub_is_contiguous(t)) {
        return failf(call, KHUB_ERR_UNSUPPORTED, "%s: %s is not contiguous; this kernel takes compact row-major tensors only", fn, arg);
    }
    float* data = NULL;
    if (numel > 0) {
        if (t->data == NULL) {
            return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: %s has %lld elements but data is NULL", fn, arg, (long long)numel);
        }
        data = (float*)((char*)t->data + t->byte_offset);
        if ((uintptr_t)data % sizeof(float) != 0) {
            return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: %s data (with byte_offset) is not 4-byte aligned", fn, arg);
        }
    }
    v->data = data;
    v->numel = numel;
    v->ndim = t->ndim;
    v->shape = t->shape;
    v->device_id = t->device.device_id;
    return KHUB_OK;
}

static int overlaps(const f32_view* a, const f32_view* b) {
    if (a->numel == 0 || b->numel == 0) {
        return 0;
    }
    const uintptr_t a0 = (uintptr_t)a->data, a1 = a0 + (uintptr_t)a->numel * sizeof(float);
    const uintptr_t b0 = (uintptr_t)b->data, b1 = b0 + (uintptr_t)b->numel * sizeof(float);
    return a0 < b1 && b0 < a1;
}

static int same_shape(const f32_view* a, const f32_view* b) {
    if (a->ndim != b->ndim) return 0;
    for (int32_t i = 0; i < a->ndim; i++) {
        if (a->shape[i] != b->shape[i]) return 0;
    }
    return 1;
}

/* Makes `device` current for the launch; leave_device() puts the previous one back. */
struct device_guard {
    int previous;
    int switched;
};

static khub_status enter_device(const khub_call* call, const char* fn, int device, device_guard* g) {
    g->previous = -1;
    g->switched = 0;
    hipError_t e = hipGetDevice(&g->previous);
    if (e != hipSuccess) {
        return failf(call, KHUB_ERR_DEVICE, "%s: hipGetDevice failed: %s", fn, hipGetErrorString(e));
    }
    if (g->previous != device) {
        e = hipSetDevice(device);
        if (e != hipSuccess) {
            return failf(call, KHUB_ERR_DEVICE, "%s: hipSetDevice(%d) failed: %s", fn, device, hipGetErrorString(e));
        }
        g->switched = 1;
    }
    return KHUB_OK;
}

static void leave_device(const device_guard* g) {
    if (g->switched) {
        (void)hipSetDevice(g->previous);
    }
}

/* Launches `kernel` (its host stub) and reports the launch's own status; hipGetLastError
 * also clears the sticky error, as cudaGetLastError does. */
static khub_status launch(const khub_call* call, const char* fn, const void* kernel, dim3 grid, dim3 block, void** args) {
    hipError_t e = hipLaunchKernel(kernel, grid, block, args, 0, stream_of(call));
    const hipError_t last = hipGetLastError();
    if (e == hipSuccess) {
        e = last;
    }
    if (e != hipSuccess) {
        return failf(call, KHUB_ERR_DEVICE, "%s: kernel launch failed: %s (%s)", fn, hipGetErrorString(e), hipGetErrorName(e));
    }
    return KHUB_OK;
}

/* Threads for a row of `width` elements: a multiple of 32 in [32, MAX_THREADS]. */
static unsigned threads_for(int64_t width) {
    const int64_t t = (width + 31) / 32 * 32;
    return (unsigned)(t < 32 ? 32 : t > MAX_THREADS ? MAX_THREADS : t);
}

static unsigned blocks_for(int64_t work, unsigned threads, int64_t cap) {
    int64_t b = (work + threads - 1) / threads;
    if (b < 1) b = 1;
    return (unsigned)(b > cap ? cap : b);
}

/* ------------------------------------------------------------------------------------ */
/* The functions                                                                         */
/* ------------------------------------------------------------------------------------ */

static khub_status silu_and_mul(const khub_call* call, DLTensor* out, const DLTensor* x) {
    static const char fn[] = "silu_and_mul";
    f32_view o = {NULL, 0, 0, NULL, 0}, xv = o;
    khub_status s;
    if ((s = check_f32(call, fn, "out", out, 1, &o)) != KHUB_OK) return s;
    if ((s = check_f32(call, fn, "x", x, 1, &xv)) != KHUB_OK) return s;
    if (o.device_id != xv.device_id) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: out is on ROCm device %d but x on %d", fn, (int)o.device_id,
                     (int)xv.device_id);
    }
    const int32_t nd = xv.ndim;
    const int64_t two_d = xv.shape[nd - 1];
    if (two_d % 2 != 0) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: the last dimension of x (%lld) must be even", fn, (long long)two_d);
    }
    const int64_t d = two_d / 2;
    int ok = o.ndim == nd && o.shape[nd - 1] == d;
    for (int32_t i = 0; ok && i < nd - 1; i++) {
        ok = o.shape[i] == xv.shape[i];
    }
    if (!ok) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT,
                     "%s: out must have the shape of x with the last dimension halved (x [..., %lld] -> out [..., "
                     "%lld], same leading dimensions)",
                     fn, (long long)two_d, (long long)d);
    }
    if (o.numel == 0) {
        return KHUB_OK;
    }
    if (overlaps(&o, &xv)) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: out overlaps x", fn);
    }
    int64_t rows = o.numel / d;
    device_guard g;
    if ((s = enter_device(call, fn, o.device_id, &g)) != KHUB_OK) return s;
    const unsigned threads = threads_for(d);
    const dim3 grid(blocks_for(d, threads, 1024), (unsigned)(rows < 65535 ? rows : 65535));
    float* op = o.data;
    const float* xp = xv.data;
    int64_t dd = d;
    void* args[] = {&op, &xp, &rows, &dd};
    s = launch(call, fn, (const void*)silu_and_mul_kernel, grid, dim3(threads), args);
    leave_device(&g);
    return s;
}

static khub_status gelu(const khub_call* call, DLTensor* out, const DLTensor* x) {
    static const char fn[] = "gelu";
    f32_view o = {NULL, 0, 0, NULL, 0}, xv = o;
    khub_status s;
    if ((s = check_f32(call, fn, "out", out, 0, &o)) != KHUB_OK) return s;
    if ((s = check_f32(call, fn, "x", x, 0, &xv)) != KHUB_OK) return s;
    if (o.device_id != xv.device_id) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: out is on ROCm device %d but x on %d", fn, (int)o.device_id,
                     (int)xv.device_id);
    }
    if (!same_shape(&o, &xv)) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: out and x must have the same shape", fn);
    }
    if (o.numel == 0) {
        return KHUB_OK;
    }
    if (o.data != xv.data && overlaps(&o, &xv)) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: out partially overlaps x (only exact in-place is allowed)", fn);
    }
    device_guard g;
    if ((s = enter_device(call, fn, o.device_id, &g)) != KHUB_OK) return s;
    const unsigned threads = MAX_THREADS;
    float* op = o.data;
    const float* xp = xv.data;
    int64_t n = o.numel;
    void* args[] = {&op, &xp, &n};
    s = launch(call, fn, (const void*)gelu_kernel, dim3(blocks_for(n, threads, 65536)), dim3(threads), args);
    leave_device(&g);
    return s;
}

static khub_status rms_norm(const khub_call* call, DLTensor* out, const DLTensor* x, const DLTensor* weight, const float* eps) {
    static const char fn[] = "rms_norm";
    f32_view o = {NULL, 0, 0, NULL, 0}, xv = o, w = o;
    khub_status s;
    if ((s = check_f32(call, fn, "out", out, 1, &o)) != KHUB_OK) return s;
    if ((s = check_f32(call, fn, "x", x, 1, &xv)) != KHUB_OK) return s;
    if ((s = check_f32(call, fn, "weight", weight, 1, &w)) != KHUB_OK) return s;
    if (o.device_id != xv.device_id || w.device_id != xv.device_id) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: out, x and weight must be on one ROCm device (%d, %d, %d)", fn,
                     (int)o.device_id, (int)xv.device_id, (int)w.device_id);
    }
    if (eps == NULL) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: eps is NULL", fn);
    }
    float e = *eps;
    if (!(e >= 0.0f) || isinf(e)) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: eps must be finite and >= 0 (got %g)", fn, (double)e);
    }
    int64_t h = xv.shape[xv.ndim - 1];
    if (w.ndim != 1 || w.shape[0] != h) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: weight must have shape [%lld] (the last dimension of x)", fn, (long long)h);
    }
    if (!same_shape(&o, &xv)) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: out and x must have the same shape", fn);
    }
    if (o.numel == 0) {
        return KHUB_OK;
    }
    if (overlaps(&o, &w)) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: out overlaps weight", fn);
    }
    if (o.data != xv.data && overlaps(&o, &xv)) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: out partially overlaps x (only exact in-place is allowed)", fn);
    }
    int64_t rows = o.numel / h;
    device_guard g;
    if ((s = enter_device(call, fn, o.device_id, &g)) != KHUB_OK) return s;
    const unsigned threads = threads_for(h);
    float* op = o.data;
    const float* xp = xv.data;
    const float* wp = w.data;
    void* args[] = {&op, &xp, &wp, &rows, &h, &e};
    s = launch(call, fn, (const void*)rms_norm_kernel, dim3((unsigned)(rows < 65535 ? rows : 65535)), dim3(threads), args);
    leave_device(&g);
    return s;
}

/* ------------------------------------------------------------------------------------ */
/* Self-tests                                                                            */
/* ------------------------------------------------------------------------------------ */

static uint64_t splitmix64(uint64_t* state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Floats uniform in [-8, 8) with 24 random bits: the same data as the CPU self-tests. */
static void fill_uniform(float* p, size_t n, uint64_t* state) {
    for (size_t i = 0; i < n; i++) {
        p[i] = -8.0f + 16.0f * (float)(splitmix64(state) >> 40) * (1.0f / 16777216.0f);
    }
}

static size_t row_width(size_t n) {
    size_t w = n < 128 ? n : 128;
    if (w == 0) {
        return 1;
    }
    while (n % w != 0) {
        w--;
    }
    return w;
}

static double elem_error(float got, double ref) {
    const double e = fabs((double)got - ref) / fmax(1.0, fabs(ref));
    return e == e ? e : INFINITY;
}

static void rocm_tensor(DLTensor* t, float* data, int device, int32_t ndim, int64_t* shape) {
    t->data = data;
    t->device.device_type = kDLROCM;
    t->device.device_id = device;
    t->ndim = ndim;
    t->dtype.code = kDLFloat;
    t->dtype.bits = 32;
    t->dtype.lanes = 1;
    t->shape = shape;
    t->strides = NULL;
    t->byte_offset = 0;
}

#define SELFTEST_MAX_N (SIZE_MAX / (4 * sizeof(float)))

/*
 * What one self-test needs: host input (n_in floats) and weight (n_w), device copies, a
 * device output and a host copy of it. setup() allocates and uploads; finish()
 * synchronises the stream, downloads the output (when status is still OK) and frees
 * everything, whatever happened before.
 */
struct selftest_buffers {
    size_t n_in, n_out, n_w;
    float *h_in, *h_w, *h_out;
    float *d_in, *d_w, *d_out;
    int device;
};

static khub_status hip_fail(const khub_call* call, const char* fn, const char* what, hipError_t e) {
    return failf(call, KHUB_ERR_DEVICE, "%s self-test: %s failed: %s", fn, what, hipGetErrorString(e));
}

static khub_status setup(const khub_call* call, const char* fn, selftest_buffers* b, uint64_t seed) {
    hipError_t e;
    const hipStream_t st = stream_of(call);
    b->h_in = (float*)malloc(b->n_in * sizeof(float) + 1);
    b->h_w = (float*)malloc(b->n_w * sizeof(float) + 1);
    b->h_out = (float*)malloc(b->n_out * sizeof(float) + 1);
    if (b->h_in == NULL || b->h_w == NULL || b->h_out == NULL) {
        return failf(call, KHUB_ERR_DEVICE, "%s self-test: out of host memory", fn);
    }
    uint64_t state = seed;
    fill_uniform(b->h_in, b->n_in, &state);
    fill_uniform(b->h_w, b->n_w, &state);
    if ((e = hipGetDevice(&b->device)) != hipSuccess) return hip_fail(call, fn, "hipGetDevice", e);
    if (b->n_in > 0 && (e = hipMalloc((void**)&b->d_in, b->n_in * sizeof(float))) != hipSuccess)
        return hip_fail(call, fn, "hipMalloc", e);
    if (b->n_w > 0 && (e = hipMalloc((void**)&b->d_w, b->n_w * sizeof(float))) != hipSuccess) return hip_fail(call, fn, "hipMalloc", e);
    if (b->n_out > 0 && (e = hipMalloc((void**)&b->d_out, b->n_out * sizeof(float))) != hipSuccess)
        return hip_fail(call, fn, "hipMalloc", e);
    if (b->n_in > 0 && (e = hipMemcpyAsync(b->d_in, b->h_in, b->n_in * sizeof(float), hipMemcpyHostToDevice, st)) != hipSuccess)
        return hip_fail(call, fn, "hipMemcpyAsync (to device)", e);
    if (b->n_w > 0 && (e = hipMemcpyAsync(b->d_w, b->h_w, b->n_w * sizeof(float), hipMemcpyHostToDevice, st)) != hipSuccess)
        return hip_fail(call, fn, "hipMemcpyAsync (to device)", e);
    return KHUB_OK;
}

static khub_status finish(const khub_call* call, const char* fn, selftest_buffers* b, khub_status s) {
    hipError_t e;
    const hipStream_t st = stream_of(call);
    if (s == KHUB_OK && b->n_out > 0 &&
        (e = hipMemcpyAsync(b->h_out, b->d_out, b->n_out * sizeof(float), hipMemcpyDeviceToHost, st)) != hipSuccess) {
        s = hip_fail(call, fn, "hipMemcpyAsync (to host)", e);
    }
    /* Synchronise before freeing when anything reached the device: the stream may still
     * use the buffers. Without a device (hipGetDevice failed) there is nothing to wait for. */
    if (b->d_in != NULL || b->d_w != NULL || b->d_out != NULL) {
        e = hipStreamSynchronize(st);
        if (s == KHUB_OK && e != hipSuccess) {
            s = hip_fail(call, fn, "hipStreamSynchronize", e);
        }
    }
    if (b->d_in != NULL) (void)hipFree(b->d_in);
    if (b->d_w != NULL) (void)hipFree(b->d_w);
    if (b->d_out != NULL) (void)hipFree(b->d_out);
    b->d_in = b->d_w = b->d_out = NULL;
    return s;
}

static void free_host(selftest_buffers* b) {
    free(b->h_in);
    free(b->h_w);
    free(b->h_out);
    b->h_in = b->h_w = b->h_out = NULL;
}

static khub_status selftest_verdict(const khub_call* call, const char* fn, double max_err) {
    if (!(max_err <= SELFTEST_TOLERANCE)) {
        return failf(call, KHUB_ERR_SELFTEST_FAILED, "%s self-test: max error %.3g exceeds the tolerance %.1g", fn, max_err,
                     SELFTEST_TOLERANCE);
    }
    return KHUB_OK;
}

/* silu_and_mul on out [n / w, w] from x [n / w, 2w] (n output elements). */
static khub_status silu_and_mul_selftest(const khub_call* call, uint64_t seed, size_t n, double* max_error) {
    static const char fn[] = "silu_and_mul";
    if (max_error == NULL) return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s self-test: max_error is NULL", fn);
    *max_error = 0.0;
    if (n > SELFTEST_MAX_N) return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s self-test: n is too large", fn);
    const size_t w = row_width(n), rows = n / w;
    selftest_buffers b = {2 * n, n, 0, NULL, NULL, NULL, NULL, NULL, NULL, 0};
    khub_status s = setup(call, fn, &b, seed);
    if (s == KHUB_OK) {
        int64_t xs[2] = {(int64_t)rows, 2 * (int64_t)w}, os[2] = {(int64_t)rows, (int64_t)w};
        DLTensor xt, ot;
        rocm_tensor(&xt, b.d_in, b.device, 2, xs);
        rocm_tensor(&ot, b.d_out, b.device, 2, os);
        s = silu_and_mul(call, &ot, &xt);
    }
    s = finish(call, fn, &b, s);
    if (s == KHUB_OK) {
        const float* x = b.h_in;
        double m = 0.0;
        for (size_t r = 0; r < rows; r++) {
            for (size_t i = 0; i < w; i++) {
                const double a = x[r * 2 * w + i], bb = x[r * 2 * w + w + i];
                const double e = elem_error(b.h_out[r * w + i], a / (1.0 + exp(-a)) * bb);
                m = e > m ? e : m;
            }
        }
        *max_error = m;
        s = selftest_verdict(call, fn, m);
    }
    free_host(&b);
    return s;
}

/* gelu on [n / w, w]. */
static khub_status gelu_selftest(const khub_call* call, uint64_t seed, size_t n, double* max_error) {
    static const char fn[] = "gelu";
    if (max_error == NULL) return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s self-test: max_error is NULL", fn);
    *max_error = 0.0;
    if (n > SELFTEST_MAX_N) return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s self-test: n is too large", fn);
    const size_t w = row_width(n), rows = n / w;
    selftest_buffers b = {n, n, 0, NULL, NULL, NULL, NULL, NULL, NULL, 0};
    khub_status s = setup(call, fn, &b, seed);
    if (s == KHUB_OK) {
        int64_t shape[2] = {(int64_t)rows, (int64_t)w};
        DLTensor xt, ot;
        rocm_tensor(&xt, b.d_in, b.device, 2, shape);
        rocm_tensor(&ot, b.d_out, b.device, 2, shape);
        s = gelu(call, &ot, &xt);
    }
    s = finish(call, fn, &b, s);
    if (s == KHUB_OK) {
        const double c = sqrt(2.0 / 3.14159265358979323846);
        double m = 0.0;
        for (size_t i = 0; i < n; i++) {
            const double v = b.h_in[i];
            const double e = elem_error(b.h_out[i], 0.5 * v * (1.0 + tanh(c * (v + 0.044715 * v * v * v))));
            m = e > m ? e : m;
        }
        *max_error = m;
        s = selftest_verdict(call, fn, m);
    }
    free_host(&b);
    return s;
}

/* rms_norm on x [n / h, h], h = row_width(n), weight [h], eps = 1e-6. */
static khub_status rms_norm_selftest(const khub_call* call, uint64_t seed, size_t n, double* max_error) {
    static const char fn[] = "rms_norm";
    if (max_error == NULL) return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s self-test: max_error is NULL", fn);
    *max_error = 0.0;
    if (n > SELFTEST_MAX_N) return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s self-test: n is too large", fn);
    const size_t h = row_width(n), rows = n / h;
    const float eps = 1e-6f;
    selftest_buffers b = {n, n, h, NULL, NULL, NULL, NULL, NULL, NULL, 0};
    khub_status s = setup(call, fn, &b, seed);
    if (s == KHUB_OK) {
        int64_t shape[2] = {(int64_t)rows, (int64_t)h}, wshape[1] = {(int64_t)h};
        DLTensor xt, ot, wt;
        rocm_tensor(&xt, b.d_in, b.device, 2, shape);
        rocm_tensor(&ot, b.d_out, b.device, 2, shape);
        rocm_tensor(&wt, b.d_w, b.device, 1, wshape);
        s = rms_norm(call, &ot, &xt, &wt, &eps);
    }
    s = finish(call, fn, &b, s);
    if (s == KHUB_OK) {
        double m = 0.0;
        for (size_t r = 0; r < rows; r++) {
            const float* xr = b.h_in + r * h;
            double ss = 0.0;
            for (size_t i = 0; i < h; i++) ss += (double)xr[i] * (double)xr[i];
            const double rms = sqrt(ss / (double)h + (double)eps);
            for (size_t i = 0; i < h; i++) {
                const double e = elem_error(b.h_out[r * h + i], (double)xr[i] / rms * (double)b.h_w[i]);
                m = e > m ? e : m;
            }
        }
        *max_error = m;
        s = selftest_verdict(call, fn, m);
    }
    free_host(&b);
    return s;
}

/* ------------------------------------------------------------------------------------ */
/* The descriptor                                                                        */
/* ------------------------------------------------------------------------------------ */

static const khub_function functions[] = {
    {"silu_and_mul", "(mut tensor<f32>[n, d], tensor<f32>[n, 2d])", (khub_fn_ptr)silu_and_mul, silu_and_mul_selftest},
    {"gelu", "(mut tensor<f32>[n], tensor<f32>[n])", (khub_fn_ptr)gelu, gelu_selftest},
    {"rms_norm", "(mut tensor<f32>[n, h], tensor<f32>[n, h], tensor<f32>[h], f32)", (khub_fn_ptr)rms_norm, rms_norm_selftest},
};

KHUB_DEFINE_KERNEL("activation", KHUB_KERNEL_VERSION, "rocm", functions)
