/*
 * khub_kernel.h: Kernel ABI v1, the contract between a khub kernel library and the host
 * that loads it. The full specification is docs/abi.md; this header is its C form.
 *
 * Pure C99. Needs nothing beyond <stdint.h> and <stddef.h>. Compiles as C++ too, so CUDA
 * and HIP sources can include it.
 *
 * A kernel library exports exactly one symbol, khub_kernel_entry. The host calls it with
 * the ABI version it speaks; the kernel returns a pointer to its static, immutable
 * descriptor, or NULL when it cannot serve that ABI major. The descriptor lists the
 * kernel's functions: name, signature string, function pointer and an optional self-test.
 *
 * Every function takes a khub_call (stream, error buffer) first, then one pointer per
 * parameter of its signature string, and returns a khub_status. A kernel never exits,
 * aborts or throws across this boundary.
 */
#ifndef KHUB_KERNEL_H
#define KHUB_KERNEL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------ */
/* Versions                                                                              */
/* ------------------------------------------------------------------------------------ */

/* The ABI major: a change here means an incompatible layout or calling convention. */
#define KHUB_KERNEL_ABI_MAJOR 1
/* The ABI minor: additions only (fields at the end of structs, new status codes). */
#define KHUB_KERNEL_ABI_MINOR 0

/* The name of the one exported entry symbol. */
#define KHUB_KERNEL_ENTRY_SYMBOL "khub_kernel_entry"

#if defined(_WIN32)
#define KHUB_EXPORT __declspec(dllexport)
#elif defined(__GNUC__) || defined(__clang__)
#define KHUB_EXPORT __attribute__((visibility("default")))
#else
#define KHUB_EXPORT
#endif

/* The entry point has C linkage in C++ (CUDA, HIP) translation units too. */
#ifdef __cplusplus
#define KHUB_EXTERN_C extern "C"
#else
#define KHUB_EXTERN_C
#endif

/* ------------------------------------------------------------------------------------ */
/* DLPack tensors                                                                        */
/*                                                                                       */
/* Layout-compatible with dlpack.h v1.x (github.com/dmlc/dlpack). Define                 */
/* KHUB_USE_DLPACK_H to use the real header instead; if it was already included, its    */
/* definitions are used.                                                                 */
/* ------------------------------------------------------------------------------------ */

#if defined(KHUB_USE_DLPACK_H)
#include <dlpack/dlpack.h>
#elif !defined(DLPACK_DLPACK_H_)
#define DLPACK_DLPACK_H_ 1

typedef enum {
    kDLCPU = 1,
    kDLCUDA = 2,
    kDLCUDAHost = 3,
    kDLOpenCL = 4,
    kDLVulkan = 7,
    kDLMetal = 8,
    kDLVPI = 9,
    kDLROCM = 10,
    kDLROCMHost = 11,
    kDLExtDev = 12,
    kDLCUDAManaged = 13,
    kDLOneAPI = 14,
    kDLWebGPU = 15,
    kDLHexagon = 16,
    kDLMAIA = 17
} DLDeviceType;

typedef struct {
    DLDeviceType device_type;
    int32_t device_id;
} DLDevice;

typedef enum {
    kDLInt = 0,
    kDLUInt = 1,
    kDLFloat = 2,
    kDLOpaqueHandle = 3,
    kDLBfloat = 4,
    kDLComplex = 5,
    kDLBool = 6
} DLDataTypeCode;

typedef struct {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
} DLDataType;

typedef struct {
    void* data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t* shape;
    int64_t* strides; /* in elements; NULL means compact row-major */
    uint64_t byte_offset;
} DLTensor;

#endif /* DLPack */

/* ------------------------------------------------------------------------------------ */
/* Status codes                                                                          */
/* ------------------------------------------------------------------------------------ */

typedef int32_t khub_status;

#define KHUB_OK 0
/* An argument is wrong: NULL, a shape mismatch, a dtype the function never takes. */
#define KHUB_ERR_INVALID_ARGUMENT 1
/* A valid request this build does not serve: a dtype, layout or device it lacks. */
#define KHUB_ERR_UNSUPPORTED 2
/* A device or runtime call failed (a launch error, an out-of-memory). */
#define KHUB_ERR_DEVICE 3
/* A bug in the kernel. */
#define KHUB_ERR_INTERNAL 4
/* A self-test ran and the function's result was outside its tolerance. */
#define KHUB_ERR_SELFTEST_FAILED 5

/* ------------------------------------------------------------------------------------ */
/* Calls                                                                                 */
/* ------------------------------------------------------------------------------------ */

/*
 * Per-call context, owned by the host and valid for the duration of one call. The kernel
 * reads it and writes only into `error`.
 */
typedef struct khub_call {
    /* sizeof(khub_call) as the host built it: fields past it must not be read. */
    uint32_t struct_size;
    /* Reserved, 0. */
    uint32_t flags;
    /* The stream to run on: a cudaStream_t or hipStream_t; NULL means the legacy default
     * stream. CPU kernels ignore it. */
    void* stream;
    /* A host-owned buffer for a NUL-terminated UTF-8 message when the call fails. May be
     * NULL; then error_capacity is 0. */
    char* error;
    size_t error_capacity;
} khub_call;

/* A function pointer of no particular type; cast it to the type its signature names. */
typedef void (*khub_fn_ptr)(void);

/* A self-test: runs the function on `n` generated elements (seeded by `seed`), compares
 * with the kernel's own scalar reference, stores the largest error found in *max_error
 * and returns KHUB_OK, or KHUB_ERR_SELFTEST_FAILED when it is beyond the tolerance the
 * kernel documents. */
typedef khub_status (*khub_selftest_fn)(const khub_call* call, uint64_t seed, size_t n, double* max_error);

/*
 * One exported function.
 *
 * The signature string lists the parameters after the khub_call, in order:
 *
 *     signature := "(" [ param { "," param } ] ")"
 *     param     := tensor | scalar
 *     tensor    := [ "mut" ] "tensor" [ "<" dtype ">" ] [ "[" dim { "," dim } "]" ]
 *     dtype     := "f16" | "bf16" | "f32" | "f64" | "i8" | "i32" | "i64" | "u8" | "bool"
 *     dim       := integer | [ integer ] name          e.g. 128, n, 2d
 *     scalar    := "f32" | "f64" | "i64" | "u64"
 *
 * e.g. "(mut tensor<f32>[n, d], tensor<f32>[n, 2d])". The dtype and the shape are
 * documentation the host may use (to validate arguments, to generate benchmark inputs);
 * a shape [n, d] describes the tensor with its leading dimensions flattened into n.
 * Whitespace is not significant.
 *
 * Every parameter is passed as a pointer: a tensor as `const DLTensor*` (`DLTensor*` for
 * "mut tensor", whose data the function writes), a scalar as a pointer to its value
 * (`const float*` for "f32"). So the C type of "(mut tensor, tensor, f32)" is
 *     khub_status fn(const khub_call*, DLTensor*, const DLTensor*, const float*);
 * At most 16 parameters.
 */
typedef struct khub_function {
    const char* name;
    const char* signature;
    khub_fn_ptr fn;
    khub_selftest_fn selftest; /* may be NULL */
} khub_function;

/*
 * The module descriptor. The first three fields are frozen forever; everything after
 * them is ABI v1.0, and later minors only append fields.
 */
typedef struct khub_kernel_desc {
    /* --- frozen --- */
    uint32_t abi_major;   /* KHUB_KERNEL_ABI_MAJOR the kernel was built with */
    uint32_t abi_minor;   /* KHUB_KERNEL_ABI_MINOR the kernel was built with */
    uint64_t struct_size; /* sizeof(khub_kernel_desc) as the kernel built it */
    /* --- v1.0 --- */
    const char* name;     /* the kernel's name, as in khub.toml */
    const char* version;  /* its semver version */
    const char* backend;  /* "cpu", "cuda", "rocm", "metal" or "xpu" */
    uint64_t function_size;  /* sizeof(khub_function) as the kernel built it */
    uint64_t function_count;
    const khub_function* functions; /* function_count entries, function_size bytes apart */
} khub_kernel_desc;

/* The entry point's type. */
typedef const khub_kernel_desc* (*khub_kernel_entry_fn)(uint32_t host_abi_major, uint32_t host_abi_minor);

/* ------------------------------------------------------------------------------------ */
/* Helpers for kernel authors (static inline; nothing here is exported)                  */
/* ------------------------------------------------------------------------------------ */

/* Copies `message` into the call's error buffer (truncating, always NUL-terminated) and
 * returns `status`, so a function can write: return khub_fail(call, KHUB_ERR_..., "..."); */
static inline khub_status khub_fail(const khub_call* call, khub_status status, const char* message) {
    if (call != NULL && call->error != NULL && call->error_capacity > 0 && message != NULL) {
        size_t i = 0;
        for (; i + 1 < call->error_capacity && message[i] != '\0'; i++) {
            call->error[i] = message[i];
        }
        call->error[i] = '\0';
    }
    return status;
}

/* The number of elements of a tensor (1 for a 0-d tensor); -1 when an extent is negative
   or the count does not fit in int64_t. */
static inline int64_t khub_numel(const DLTensor* t) {
    int64_t n = 1;
    int32_t i;
    for (i = 0; i < t->ndim; i++) {
        int64_t d = t->shape[i];
        /* -1 for a negative extent or a count past INT64_MAX: a kernel that bounds its
           loops with khub_numel must not be handed a product that wrapped around. */
        if (d < 0 || (d != 0 && n > INT64_MAX / d)) {
            return -1;
        }
        n *= d;
    }
    return n;
}

/* Whether a tensor is compact row-major (strides NULL or matching the shape). */
static inline int khub_is_contiguous(const DLTensor* t) {
    int64_t expected = 1;
    int32_t i;
    if (t->strides == NULL) {
        return 1;
    }
    for (i = t->ndim - 1; i >= 0; i--) {
        if (t->shape[i] != 1 && t->strides[i] != expected) {
            return 0;
        }
        if (t->shape[i] < 0 || (t->shape[i] != 0 && expected > INT64_MAX / t->shape[i])) {
            return 0;
        }
        expected *= t->shape[i];
    }
    return 1;
}

/* Whether a tensor holds scalars of the given code and bit width (lanes 1). */
static inline int khub_is_dtype(const DLTensor* t, uint8_t code, uint8_t bits) {
    return t->dtype.code == code && t->dtype.bits == bits && t->dtype.lanes == 1;
}

/*
 * Defines the entry point for a kernel whose functions are in `table` (an array of
 * khub_function). It serves ABI major 1 and returns NULL for any other major.
 *
 *     static const khub_function functions[] = {
 *         { "silu_and_mul", "(mut tensor, tensor)", (khub_fn_ptr)silu_and_mul, silu_and_mul_selftest },
 *     };
 *     KHUB_DEFINE_KERNEL("activation", "0.1.0", "cpu", functions)
 */
#define KHUB_DEFINE_KERNEL(NAME, VERSION, BACKEND, TABLE)                                          \
    static const khub_kernel_desc khub_descriptor_ = {                                             \
        KHUB_KERNEL_ABI_MAJOR, KHUB_KERNEL_ABI_MINOR, sizeof(khub_kernel_desc), NAME, VERSION,     \
        BACKEND, sizeof(khub_function), sizeof(TABLE) / sizeof((TABLE)[0]), TABLE};                \
    KHUB_EXTERN_C KHUB_EXPORT const khub_kernel_desc* khub_kernel_entry(                           \
        uint32_t host_abi_major, uint32_t host_abi_minor) {                                        \
        (void)host_abi_minor;                                                                      \
        return host_abi_major == KHUB_KERNEL_ABI_MAJOR ? &khub_descriptor_ : NULL;                \
    }

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KHUB_KERNEL_H */
