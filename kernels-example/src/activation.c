/*
 * activation.c: the CPU build of the example kernel "activation" (Kernel ABI v1).
 *
 * One source, compiled once per CPU level by flags alone, for example:
 *     gcc -O3 -march=x86-64                                -fPIC -shared -std=c11 -I include ...
 *     gcc -O3 -march=x86-64-v3                             -fPIC -shared -std=c11 -I include ...
 *     gcc -O3 -march=x86-64-v4 -mprefer-vector-width=512   -fPIC -shared -std=c11 -I include ...
 * There are no intrinsics: the hot loops are plain C that gcc -O3 auto-vectorises (SSE2,
 * AVX2 + FMA or AVX-512 depending on -march). That is why they never call expf or tanhf;
 * the exponential is the branch-free, inline approximation below. Do not build with
 * -ffast-math: nothing here needs it, and the self-tests assume IEEE semantics.
 *
 * Functions (all float32, contiguous, any number of leading dimensions):
 *     silu_and_mul "(mut tensor<f32>[n, d], tensor<f32>[n, 2d])"
 *                  out[..., d] = silu(x[..., :d]) * x[..., d:]
 *     gelu         "(mut tensor<f32>[n], tensor<f32>[n])"
 *                  out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
 *     rms_norm     "(mut tensor<f32>[n, h], tensor<f32>[n, h], tensor<f32>[h], f32)"
 *                  out = x / sqrt(mean(x^2, last dim) + eps) * weight
 *
 * Self-tests compare with a double-precision libm reference. The error of one element is
 * |got - ref| / max(1, |ref|) (relative for large values, absolute below 1); a self-test
 * reports the maximum over all elements and fails above SELFTEST_TOLERANCE (1e-5). The
 * measured maxima are about 2e-7 on every CPU level (see README.md); the margin covers
 * other compilers and targets.
 */
#include "khub_kernel.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef KHUB_KERNEL_VERSION
#define KHUB_KERNEL_VERSION "0.1.0"
#endif

/* The largest error a self-test accepts (see the top of this file for the metric). */
#define SELFTEST_TOLERANCE 1e-5

/* ------------------------------------------------------------------------------------ */
/* Vectorisable math                                                                     */
/* ------------------------------------------------------------------------------------ */

/* a * b + c, fused where the target has FMA (x86-64-v3 and up). In ISO C mode gcc does not
 * contract a * b + c by itself, and fmaf is only inlined (and vectorised) when __FMA__. */
#if defined(__FMA__) || defined(__aarch64__)
#define MADD(a, b, c) fmaf((a), (b), (c))
#else
#define MADD(a, b, c) ((a) * (b) + (c))
#endif

/*
 * c ? a : b, through bit masks. A plain `x < k ? x : k` followed by arithmetic makes gcc's
 * partial redundancy elimination fold the arithmetic into the constant arm, which leaves
 * control flow in the loop and, with the default -ftrapping-math, stops vectorisation.
 * The mask form compiles to a compare and a blend (or and/andnot/or) on every target.
 */
static inline float select_f(int c, float a, float b) {
    uint32_t ab, bb;
    memcpy(&ab, &a, sizeof ab);
    memcpy(&bb, &b, sizeof bb);
    const uint32_t m = 0u - (uint32_t)(c != 0);
    const uint32_t rb = (ab & m) | (bb & ~m);
    float r;
    memcpy(&r, &rb, sizeof r);
    return r;
}

/* Inputs of fast_expf are clamped to [EXP_LO, EXP_HI], where e^x and 2^n stay normal. */
#define EXP_HI 88.0f
#define EXP_LO (-87.0f)

/*
 * e^x for float, branch-free and inline so that loops calling it vectorise.
 *
 * x is clamped to [-87, 88] (NaN becomes 88, so the integer conversion below is always
 * defined; callers propagate NaN through their other factor). Then x = n ln2 + r with
 * n = round(x / ln2) and |r| <= ln2/2 (ln2 split in two parts, Cody-Waite, so n ln2 is
 * exact), e^r is a degree-6 polynomial (the Cephes expf coefficients), and 2^n is built
 * directly in the exponent bits. Relative error at most 8.4e-8 over [-87, 88] (measured on
 * every 7th float bit pattern there, against double exp).
 */
static inline float fast_expf(float x) {
    x = select_f(x < EXP_HI, x, EXP_HI); /* also NaN -> EXP_HI */
    x = select_f(x > EXP_LO, x, EXP_LO);
    /* round(x log2 e): the argument of the truncation is in [2.9, 255.5], positive, so
     * truncation is floor and the result fits easily. */
    const int32_t n = (int32_t)(x * 1.44269504088896341f + 128.5f) - 128;
    const float nf = (float)n;
    float r = x - nf * 0.693359375f;   /* ln2, high part: 9 bits, so nf * it is exact */
    r = r - nf * -2.12194440e-4f;      /* ln2, low part */
    float p = 1.9875691500e-4f;
    p = MADD(p, r, 1.3981999507e-3f);
    p = MADD(p, r, 8.3334519073e-3f);
    p = MADD(p, r, 4.1665795894e-2f);
    p = MADD(p, r, 1.6666665459e-1f);
    p = MADD(p, r, 5.0000001201e-1f);
    const float y = MADD(p, r * r, r) + 1.0f;
    /* 2^n, n in [-126, 127]: a normal float with biased exponent n + 127. */
    const uint32_t bits = (uint32_t)(n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

/* a / (1 + e^-a). For a < -88, e^-a is clamped, so the true value (|a| e^a < 1e-36) is
 * returned as 0; NaN stays NaN. */
static inline float silu_f(float a) {
    const float y = a / (1.0f + fast_expf(-a));
    return select_f(-a > EXP_HI, 0.0f, y);
}

/*
 * GELU, tanh approximation. With u = sqrt(2/pi) (x + 0.044715 x^3) and the identity
 *     0.5 (1 + tanh(u)) = 1 / (1 + e^(-2u)),
 * gelu(x) = x / (1 + e^(-2u)): tanh comes from the exponential with no cancellation near
 * u = 0 and no overflow for large |u| (e^(-2u) is clamped; for -2u > 88 the true value,
 * below 1e-36 in magnitude, is returned as 0). x^3 may overflow to +-inf for |x| > 7e12; the
 * clamp handles that too, and NaN stays NaN.
 */
static inline float gelu_f(float x) {
    const float u = 0.7978845608028654f * MADD(0.044715f * x, x * x, x);
    const float t = -2.0f * u;
    const float y = x / (1.0f + fast_expf(t));
    return select_f(t > EXP_HI, 0.0f, y);
}

/* ------------------------------------------------------------------------------------ */
/* Loops (restrict: callers guarantee that out does not overlap the inputs)              */
/* ------------------------------------------------------------------------------------ */

static void silu_and_mul_rows(float* restrict out, const float* restrict x, int64_t rows, int64_t d) {
    for (int64_t r = 0; r < rows; r++) {
        const float* restrict a = x + r * 2 * d;
        const float* restrict b = a + d;
        float* restrict o = out + r * d;
        for (int64_t i = 0; i < d; i++) {
            o[i] = silu_f(a[i]) * b[i];
        }
    }
}

static void gelu_loop(float* restrict out, const float* restrict x, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        out[i] = gelu_f(x[i]);
    }
}

/* In place (out == x): one pointer, so no aliasing question arises. */
static void gelu_loop_inplace(float* p, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        p[i] = gelu_f(p[i]);
    }
}

/* 1 / sqrt(mean(x^2) + eps) for one row, accumulated in double in 8 independent lanes
 * (a plain float sum would not vectorise without -ffast-math, and would lose accuracy on
 * wide rows). */
static float rms_inv(const float* restrict x, int64_t h, float eps) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= h; i += 8) {
        for (int j = 0; j < 8; j++) {
            const double v = (double)x[i + j];
            acc[j] += v * v;
        }
    }
    double sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < h; i++) {
        const double v = (double)x[i];
        sum += v * v;
    }
    return (float)(1.0 / sqrt(sum / (double)h + (double)eps));
}

static void rms_norm_rows(float* restrict out, const float* restrict x, const float* restrict w,
                          int64_t rows, int64_t h, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float* restrict xr = x + r * h;
        float* restrict o = out + r * h;
        const float inv = rms_inv(xr, h, eps);
        for (int64_t i = 0; i < h; i++) {
            o[i] = xr[i] * inv * w[i];
        }
    }
}

static void rms_norm_rows_inplace(float* p, const float* restrict w, int64_t rows, int64_t h, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        float* pr = p + r * h;
        const float inv = rms_inv(pr, h, eps);
        for (int64_t i = 0; i < h; i++) {
            pr[i] = pr[i] * inv * w[i];
        }
    }
}

/* ------------------------------------------------------------------------------------ */
/* Argument checks                                                                       */
/* ------------------------------------------------------------------------------------ */

/* Formats a message into the call's error buffer and returns status. */
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

/* A checked float32 CPU tensor. */
typedef struct {
    float* data;   /* data + byte_offset; may be NULL only when numel == 0 */
    int64_t numel;
    int32_t ndim;
    const int64_t* shape;
} f32_view;

/*
 * Checks that t is a usable float32 tensor on the CPU: not NULL, kDLCPU, float32 with one
 * lane (other float widths are KHUB_ERR_UNSUPPORTED, anything else invalid), a sane shape
 * (ndim >= min_ndim, no negative extent, element count and byte size without overflow),
 * compact row-major (else KHUB_ERR_UNSUPPORTED), and data non-NULL and 4-byte aligned
 * unless the tensor is empty.
 */
static khub_status check_f32(const khub_call* call, const char* fn, const char* arg, const DLTensor* t,
                             int32_t min_ndim, f32_view* v) {
    if (t == NULL) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: %s is NULL", fn, arg);
    }
    if (t->device.device_type != kDLCPU) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT,
                     "%s: %s is on device type %d; this CPU build takes kDLCPU (1) tensors only", fn, arg,
                     (int)t->device.device_type);
    }
    if (!khub_is_dtype(t, kDLFloat, 32)) {
        const DLDataType dt = t->dtype;
        const int is_float = dt.lanes == 1 && ((dt.code == kDLFloat && (dt.bits == 16 || dt.bits == 64)) ||
                                               (dt.code == kDLBfloat && dt.bits == 16));
        return failf(call, is_float ? KHUB_ERR_UNSUPPORTED : KHUB_ERR_INVALID_ARGUMENT,
                     "%s: %s has dtype (code %u, bits %u, lanes %u); %s float32 (code 2, bits 32, lanes 1)", fn,
                     arg, (unsigned)dt.code, (unsigned)dt.bits, (unsigned)dt.lanes,
                     is_float ? "this build supports only" : "expected");
    }
    if (t->ndim < min_ndim) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: %s has %d dimensions; at least %d needed", fn, arg,
                     (int)t->ndim, (int)min_ndim);
    }
    if (t->ndim > 0 && t->shape == NULL) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: %s has ndim %d but shape is NULL", fn, arg,
                     (int)t->ndim);
    }
    int64_t numel = 1;
    int overflow = 0;
    for (int32_t i = 0; i < t->ndim; i++) {
        const int64_t e = t->shape[i];
        if (e < 0) {
            return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: %s has a negative extent %lld in dimension %d", fn,
                         arg, (long long)e, (int)i);
        }
        if (e != 0 && numel > INT64_MAX / e) {
            overflow = 1;
        } else {
            numel *= e;
        }
    }
    if (numel == 0) {
        overflow = 0; /* an empty tensor, whatever its other extents */
    }
    if (overflow || (uint64_t)numel > (uint64_t)(SIZE_MAX / sizeof(float))) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: %s has too many elements", fn, arg);
    }
    /* A layout this build lacks is KHUB_ERR_UNSUPPORTED (docs/abi.md); an empty tensor's
     * strides do not matter. */
    if (numel > 0 && !khub_is_contiguous(t)) {
        return failf(call, KHUB_ERR_UNSUPPORTED,
                     "%s: %s is not contiguous; this kernel takes compact row-major tensors only", fn, arg);
    }
    float* data = NULL;
    if (numel > 0) {
        if (t->data == NULL) {
            return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: %s has %lld elements but data is NULL", fn, arg,
                         (long long)numel);
        }
        data = (float*)((char*)t->data + t->byte_offset);
        if ((uintptr_t)data % sizeof(float) != 0) {
            return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: %s data (with byte_offset) is not 4-byte aligned",
                         fn, arg);
        }
    }
    v->data = data;
    v->numel = numel;
    v->ndim = t->ndim;
    v->shape = t->shape;
    return KHUB_OK;
}

/* Whether the byte ranges of two non-empty views overlap. */
static int overlaps(const f32_view* a, const f32_view* b) {
    if (a->numel == 0 || b->numel == 0) {
        return 0;
    }
    const uintptr_t a0 = (uintptr_t)a->data, a1 = a0 + (uintptr_t)a->numel * sizeof(float);
    const uintptr_t b0 = (uintptr_t)b->data, b1 = b0 + (uintptr_t)b->numel * sizeof(float);
    return a0 < b1 && b0 < a1;
}

/* ------------------------------------------------------------------------------------ */
/* The functions                                                                         */
/* ------------------------------------------------------------------------------------ */

/* silu_and_mul "(mut tensor, tensor)": x [..., 2d] -> out [..., d]. out must not overlap x. */
static khub_status silu_and_mul(const khub_call* call, DLTensor* out, const DLTensor* x) {
    static const char fn[] = "silu_and_mul";
    f32_view o = {NULL, 0, 0, NULL}, xv = o;
    khub_status s;
    if ((s = check_f32(call, fn, "out", out, 1, &o)) != KHUB_OK) return s;
    if ((s = check_f32(call, fn, "x", x, 1, &xv)) != KHUB_OK) return s;
    const int32_t nd = xv.ndim;
    const int64_t two_d = xv.shape[nd - 1];
    if (two_d % 2 != 0) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: the last dimension of x (%lld) must be even", fn,
                     (long long)two_d);
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
    silu_and_mul_rows(o.data, xv.data, o.numel / d, d);
    return KHUB_OK;
}

/* gelu "(mut tensor, tensor)": elementwise, same shape; out may be x itself (in place) but
 * must not overlap it otherwise. */
static khub_status gelu(const khub_call* call, DLTensor* out, const DLTensor* x) {
    static const char fn[] = "gelu";
    f32_view o = {NULL, 0, 0, NULL}, xv = o;
    khub_status s;
    if ((s = check_f32(call, fn, "out", out, 0, &o)) != KHUB_OK) return s;
    if ((s = check_f32(call, fn, "x", x, 0, &xv)) != KHUB_OK) return s;
    int ok = o.ndim == xv.ndim;
    for (int32_t i = 0; ok && i < xv.ndim; i++) {
        ok = o.shape[i] == xv.shape[i];
    }
    if (!ok) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: out and x must have the same shape", fn);
    }
    if (o.numel == 0) {
        return KHUB_OK;
    }
    if (o.data == xv.data) {
        gelu_loop_inplace(o.data, o.numel);
    } else if (overlaps(&o, &xv)) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: out partially overlaps x (only exact in-place is allowed)",
                     fn);
    } else {
        gelu_loop(o.data, xv.data, o.numel);
    }
    return KHUB_OK;
}

/* rms_norm "(mut tensor, tensor, tensor, f32)": out, x [..., h], weight [h], eps >= 0.
 * out may be x itself (in place); it must not overlap weight. */
static khub_status rms_norm(const khub_call* call, DLTensor* out, const DLTensor* x, const DLTensor* weight,
                            const float* eps) {
    static const char fn[] = "rms_norm";
    f32_view o = {NULL, 0, 0, NULL}, xv = o, w = o;
    khub_status s;
    if ((s = check_f32(call, fn, "out", out, 1, &o)) != KHUB_OK) return s;
    if ((s = check_f32(call, fn, "x", x, 1, &xv)) != KHUB_OK) return s;
    if ((s = check_f32(call, fn, "weight", weight, 1, &w)) != KHUB_OK) return s;
    if (eps == NULL) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: eps is NULL", fn);
    }
    const float e = *eps;
    if (!(e >= 0.0f) || isinf(e)) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: eps must be finite and >= 0 (got %g)", fn, (double)e);
    }
    const int64_t h = xv.shape[xv.ndim - 1];
    if (w.ndim != 1 || w.shape[0] != h) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: weight must have shape [%lld] (the last dimension of x)",
                     fn, (long long)h);
    }
    int ok = o.ndim == xv.ndim;
    for (int32_t i = 0; ok && i < xv.ndim; i++) {
        ok = o.shape[i] == xv.shape[i];
    }
    if (!ok) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: out and x must have the same shape", fn);
    }
    if (o.numel == 0) {
        return KHUB_OK;
    }
    if (overlaps(&o, &w)) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s: out overlaps weight", fn);
    }
    if (o.data == xv.data) {
        rms_norm_rows_inplace(o.data, w.data, o.numel / h, h, e);
    } else if (overlaps(&o, &xv)) {
        return failf(call, KHUB_ERR_INVALID_ARGUMENT,
                     "%s: out partially overlaps x (only exact in-place is allowed)", fn);
    } else {
        rms_norm_rows(o.data, xv.data, w.data, o.numel / h, h, e);
    }
    return KHUB_OK;
}

/* ------------------------------------------------------------------------------------ */
/* Self-tests                                                                            */
/* ------------------------------------------------------------------------------------ */

/* splitmix64, and floats uniform in [-8, 8) with 24 random bits. */
static uint64_t splitmix64(uint64_t* state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void fill_uniform(float* p, size_t n, uint64_t* state) {
    for (size_t i = 0; i < n; i++) {
        p[i] = -8.0f + 16.0f * (float)(splitmix64(state) >> 40) * (1.0f / 16777216.0f);
    }
}

/* The widest row width <= 128 that divides n (n itself when n <= 128; 1 when n == 0). */
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

/* |got - ref| / max(1, |ref|); NaN counts as infinitely wrong. */
static double elem_error(float got, double ref) {
    const double e = fabs((double)got - ref) / fmax(1.0, fabs(ref));
    return e == e ? e : INFINITY;
}

static void cpu_tensor(DLTensor* t, float* data, int32_t ndim, int64_t* shape) {
    t->data = data;
    t->device.device_type = kDLCPU;
    t->device.device_id = 0;
    t->ndim = ndim;
    t->dtype.code = kDLFloat;
    t->dtype.bits = 32;
    t->dtype.lanes = 1;
    t->shape = shape;
    t->strides = NULL;
    t->byte_offset = 0;
}

static khub_status selftest_verdict(const khub_call* call, const char* fn, double max_err) {
    if (!(max_err <= SELFTEST_TOLERANCE)) {
        return failf(call, KHUB_ERR_SELFTEST_FAILED, "%s self-test: max error %.3g exceeds the tolerance %.1g", fn,
                     max_err, SELFTEST_TOLERANCE);
    }
    return KHUB_OK;
}

/* The element count a self-test may take: its buffers (up to 3n floats) must fit. */
#define SELFTEST_MAX_N (SIZE_MAX / (4 * sizeof(float)))

/* silu_and_mul on out [n / w, w] from x [n / w, 2w] (n output elements). */
static khub_status silu_and_mul_selftest(const khub_call* call, uint64_t seed, size_t n, double* max_error) {
    static const char fn[] = "silu_and_mul";
    if (max_error == NULL) return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s self-test: max_error is NULL", fn);
    *max_error = 0.0;
    if (n > SELFTEST_MAX_N) return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s self-test: n is too large", fn);
    const size_t w = row_width(n), rows = n / w;
    float* x = (float*)malloc(2 * n * sizeof(float) + 1);
    float* out = (float*)malloc(n * sizeof(float) + 1);
    if (x == NULL || out == NULL) {
        free(x);
        free(out);
        return failf(call, KHUB_ERR_DEVICE, "%s self-test: out of host memory", fn);
    }
    uint64_t state = seed;
    fill_uniform(x, 2 * n, &state);
    int64_t xs[2] = {(int64_t)rows, 2 * (int64_t)w}, os[2] = {(int64_t)rows, (int64_t)w};
    DLTensor xt, ot;
    cpu_tensor(&xt, x, 2, xs);
    cpu_tensor(&ot, out, 2, os);
    khub_status s = silu_and_mul(call, &ot, &xt);
    if (s == KHUB_OK) {
        double m = 0.0;
        for (size_t r = 0; r < rows; r++) {
            for (size_t i = 0; i < w; i++) {
                const double a = x[r * 2 * w + i], b = x[r * 2 * w + w + i];
                const double e = elem_error(out[r * w + i], a / (1.0 + exp(-a)) * b);
                m = e > m ? e : m;
            }
        }
        *max_error = m;
        s = selftest_verdict(call, fn, m);
    }
    free(x);
    free(out);
    return s;
}

/* gelu on [n / w, w], out of place, then in place on a copy. */
static khub_status gelu_selftest(const khub_call* call, uint64_t seed, size_t n, double* max_error) {
    static const char fn[] = "gelu";
    if (max_error == NULL) return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s self-test: max_error is NULL", fn);
    *max_error = 0.0;
    if (n > SELFTEST_MAX_N) return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s self-test: n is too large", fn);
    const size_t w = row_width(n), rows = n / w;
    float* x = (float*)malloc(n * sizeof(float) + 1);
    float* out = (float*)malloc(n * sizeof(float) + 1);
    float* inplace = (float*)malloc(n * sizeof(float) + 1);
    if (x == NULL || out == NULL || inplace == NULL) {
        free(x);
        free(out);
        free(inplace);
        return failf(call, KHUB_ERR_DEVICE, "%s self-test: out of host memory", fn);
    }
    uint64_t state = seed;
    fill_uniform(x, n, &state);
    if (n > 0) memcpy(inplace, x, n * sizeof(float));
    int64_t shape[2] = {(int64_t)rows, (int64_t)w};
    DLTensor xt, ot, it;
    cpu_tensor(&xt, x, 2, shape);
    cpu_tensor(&ot, out, 2, shape);
    cpu_tensor(&it, inplace, 2, shape);
    khub_status s = gelu(call, &ot, &xt);
    if (s == KHUB_OK) s = gelu(call, &it, &it);
    if (s == KHUB_OK) {
        const double c = sqrt(2.0 / 3.14159265358979323846);
        double m = 0.0;
        for (size_t i = 0; i < n; i++) {
            const double v = x[i];
            const double ref = 0.5 * v * (1.0 + tanh(c * (v + 0.044715 * v * v * v)));
            const double e1 = elem_error(out[i], ref), e2 = elem_error(inplace[i], ref);
            m = e1 > m ? e1 : m;
            m = e2 > m ? e2 : m;
        }
        *max_error = m;
        s = selftest_verdict(call, fn, m);
    }
    free(x);
    free(out);
    free(inplace);
    return s;
}

/* rms_norm on x [n / h, h], h = row_width(n), weight [h], eps = 1e-6; out of place, then
 * in place on a copy. */
static khub_status rms_norm_selftest(const khub_call* call, uint64_t seed, size_t n, double* max_error) {
    static const char fn[] = "rms_norm";
    if (max_error == NULL) return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s self-test: max_error is NULL", fn);
    *max_error = 0.0;
    if (n > SELFTEST_MAX_N) return failf(call, KHUB_ERR_INVALID_ARGUMENT, "%s self-test: n is too large", fn);
    const size_t h = row_width(n), rows = n / h;
    float* x = (float*)malloc(n * sizeof(float) + 1);
    float* out = (float*)malloc(n * sizeof(float) + 1);
    float* inplace = (float*)malloc(n * sizeof(float) + 1);
    float* w = (float*)malloc(h * sizeof(float) + 1);
    if (x == NULL || out == NULL || inplace == NULL || w == NULL) {
        free(x);
        free(out);
        free(inplace);
        free(w);
        return failf(call, KHUB_ERR_DEVICE, "%s self-test: out of host memory", fn);
    }
    uint64_t state = seed;
    fill_uniform(x, n, &state);
    fill_uniform(w, h, &state);
    if (n > 0) memcpy(inplace, x, n * sizeof(float));
    const float eps = 1e-6f;
    int64_t shape[2] = {(int64_t)rows, (int64_t)h}, wshape[1] = {(int64_t)h};
    DLTensor xt, ot, it, wt;
    cpu_tensor(&xt, x, 2, shape);
    cpu_tensor(&ot, out, 2, shape);
    cpu_tensor(&it, inplace, 2, shape);
    cpu_tensor(&wt, w, 1, wshape);
    khub_status s = rms_norm(call, &ot, &xt, &wt, &eps);
    if (s == KHUB_OK) s = rms_norm(call, &it, &it, &wt, &eps);
    if (s == KHUB_OK) {
        double m = 0.0;
        for (size_t r = 0; r < rows; r++) {
            const float* xr = x + r * h;
            double ss = 0.0;
            for (size_t i = 0; i < h; i++) ss += (double)xr[i] * (double)xr[i];
            const double rms = sqrt(ss / (double)h + (double)eps);
            for (size_t i = 0; i < h; i++) {
                const double ref = (double)xr[i] / rms * (double)w[i];
                const double e1 = elem_error(out[r * h + i], ref), e2 = elem_error(inplace[r * h + i], ref);
                m = e1 > m ? e1 : m;
                m = e2 > m ? e2 : m;
            }
        }
        *max_error = m;
        s = selftest_verdict(call, fn, m);
    }
    free(x);
    free(out);
    free(inplace);
    free(w);
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

KHUB_DEFINE_KERNEL("activation", KHUB_KERNEL_VERSION, "cpu", functions)

#ifdef KHUB_STATIC_EXPORT
/* Only for the direct-call baseline of benches/kernel_call.rs (build.rs compiles this file
 * into a static library with -DKHUB_STATIC_EXPORT when KHUB_BENCH_STATIC=1). Kernel builds
 * never define it: the shared library still exports only khub_kernel_entry. */
khub_status khub_example_gelu(const khub_call* call, DLTensor* out, const DLTensor* x);
khub_status khub_example_silu_and_mul(const khub_call* call, DLTensor* out, const DLTensor* x);
khub_status khub_example_rms_norm(const khub_call* call, DLTensor* out, const DLTensor* x, const DLTensor* weight,
                                  const float* eps);
khub_status khub_example_gelu(const khub_call* call, DLTensor* out, const DLTensor* x) { return gelu(call, out, x); }
khub_status khub_example_silu_and_mul(const khub_call* call, DLTensor* out, const DLTensor* x) {
    return silu_and_mul(call, out, x);
}
khub_status khub_example_rms_norm(const khub_call* call, DLTensor* out, const DLTensor* x, const DLTensor* weight,
                                  const float* eps) {
    return rms_norm(call, out, x, weight, eps);
}
#endif
