/*
 * c-host: a C host application loading a kernel through khub's C API (include/khub.h).
 *
 *   c-host [--registry URL|DIR] [--repo ORG/NAME] [--version REQ] [--lock FILE]
 *          [--threads N] [--explain]
 *
 * It opens a hub (the registry from --registry, else KHUB_REGISTRY / HF_ENDPOINT / the
 * public Hub; the store from KHUB_CACHE), loads the example kernel (acme/activation,
 * "^0.1"), takes silu_and_mul as a typed function pointer and checks it against a scalar
 * reference, calls gelu through the generic path, prints the kernel's provenance, then
 * loads and calls the kernel from N threads at once. With --lock it also loads the kernel
 * as the lockfile pins it. Every handle and string is freed; exit status 0 means every
 * check passed.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "khub.h"

/* silu_and_mul's signature is "(mut tensor<f32>[n, d], tensor<f32>[n, 2d])". */
typedef khub_status (*silu_and_mul_fn)(const khub_call* call, DLTensor* out, const DLTensor* x);

typedef struct {
    const char* registry;
    const char* repo;
    const char* version;
    const char* lock;
    int threads;
    int explain;
} args;

static int fail(const char* what, khub_error* err) {
    fprintf(stderr, "c-host: %s failed (code %d): %s\n", what, khub_error_code(err), khub_error_message(err));
    khub_error_free(err);
    return 1;
}

static DLTensor tensor_f32(float* data, int32_t ndim, int64_t* shape) {
    DLTensor t;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.device.device_type = kDLCPU;
    t.device.device_id = 0;
    t.ndim = ndim;
    t.dtype.code = kDLFloat;
    t.dtype.bits = 32;
    t.dtype.lanes = 1;
    t.shape = shape;
    t.strides = NULL; /* compact row-major */
    t.byte_offset = 0;
    return t;
}

static double silu_ref(double a) { return a / (1.0 + exp(-a)); }

static double gelu_ref(double x) {
    return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)));
}

static int close_enough(double got, double want) { return fabs(got - want) <= 1e-5 + 1e-5 * fabs(want); }

/* silu_and_mul through a typed function pointer, checked against the reference. */
static int check_silu_and_mul(const khub_kernel* kernel) {
    enum { ROWS = 4, D = 8 };
    khub_error* err = NULL;
    khub_fn_ptr raw = NULL;
    if (khub_kernel_function(kernel, "silu_and_mul", "(mut tensor, tensor)", &raw, &err) != KHUB_OK) {
        return fail("khub_kernel_function(silu_and_mul)", err);
    }
    silu_and_mul_fn silu_and_mul = (silu_and_mul_fn)raw;

    float x[ROWS * 2 * D], out[ROWS * D];
    for (int i = 0; i < ROWS * 2 * D; i++) {
        x[i] = (float)(i % 13) * 0.37f - 2.0f;
    }
    int64_t x_shape[2] = {ROWS, 2 * D}, out_shape[2] = {ROWS, D};
    DLTensor xt = tensor_f32(x, 2, x_shape), ot = tensor_f32(out, 2, out_shape);
    char message[256] = "";
    khub_call call = {sizeof(khub_call), 0, NULL, message, sizeof message};
    khub_status s = silu_and_mul(&call, &ot, &xt);
    if (s != KHUB_OK) {
        fprintf(stderr, "c-host: silu_and_mul returned %d: %s\n", s, message);
        return 1;
    }
    for (int r = 0; r < ROWS; r++) {
        for (int j = 0; j < D; j++) {
            double a = x[r * 2 * D + j], b = x[r * 2 * D + D + j];
            double want = silu_ref(a) * b, got = out[r * D + j];
            if (!close_enough(got, want)) {
                fprintf(stderr, "c-host: silu_and_mul[%d][%d] = %.9g, the reference says %.9g\n", r, j, got, want);
                return 1;
            }
        }
    }
    printf("silu_and_mul: %d x %d outputs match the C reference\n", ROWS, D);
    return 0;
}

/* gelu through the generic path, checked against the reference. */
static int check_gelu(const khub_kernel* kernel, int quiet) {
    enum { N = 64 };
    float x[N], out[N];
    for (int i = 0; i < N; i++) {
        x[i] = (float)i / 8.0f - 4.0f;
    }
    int64_t shape[1] = {N};
    DLTensor xt = tensor_f32(x, 1, shape), ot = tensor_f32(out, 1, shape);
    khub_arg argv[2];
    argv[0].kind = KHUB_ARG_TENSOR_MUT;
    argv[0].value.tensor = &ot;
    argv[1].kind = KHUB_ARG_TENSOR;
    argv[1].value.tensor = &xt;
    khub_error* err = NULL;
    if (khub_kernel_call(kernel, "gelu", argv, 2, NULL, &err) != KHUB_OK) {
        return fail("khub_kernel_call(gelu)", err);
    }
    for (int i = 0; i < N; i++) {
        if (!close_enough(out[i], gelu_ref(x[i]))) {
            fprintf(stderr, "c-host: gelu(%g) = %.9g, the reference says %.9g\n", x[i], out[i], gelu_ref(x[i]));
            return 1;
        }
    }
    if (!quiet) {
        printf("gelu: %d outputs match the C reference\n", N);
    }
    return 0;
}

static int print_provenance(const khub_kernel* kernel, const char* label) {
    char* json = NULL;
    khub_error* err = NULL;
    if (khub_kernel_provenance_json(kernel, &json, &err) != KHUB_OK) {
        return fail("khub_kernel_provenance_json", err);
    }
    printf("provenance (%s):\n%s\n", label, json);
    khub_string_free(json);
    return 0;
}

/* Several threads share one hub: each loads the kernel and calls gelu. */
typedef struct {
    const khub_hub* hub;
    const args* a;
    int failed;
} worker;

static void* work(void* p) {
    worker* w = (worker*)p;
    khub_kernel* kernel = NULL;
    khub_error* err = NULL;
    if (khub_hub_load(w->hub, w->a->repo, w->a->version, &kernel, &err) != KHUB_OK) {
        w->failed = fail("khub_hub_load (thread)", err);
        return NULL;
    }
    for (int i = 0; i < 20 && !w->failed; i++) {
        w->failed = check_gelu(kernel, 1);
    }
    khub_kernel_free(kernel);
    return NULL;
}

static int check_threads(const khub_hub* hub, const args* a) {
    enum { MAX_THREADS = 16 };
    pthread_t ids[MAX_THREADS];
    worker w[MAX_THREADS];
    int n = a->threads < MAX_THREADS ? a->threads : MAX_THREADS, failed = 0;
    for (int i = 0; i < n; i++) {
        w[i].hub = hub;
        w[i].a = a;
        w[i].failed = 0;
        if (pthread_create(&ids[i], NULL, work, &w[i]) != 0) {
            fprintf(stderr, "c-host: pthread_create failed\n");
            n = i;
            failed = 1;
            break;
        }
    }
    for (int i = 0; i < n; i++) {
        pthread_join(ids[i], NULL);
        failed |= w[i].failed;
    }
    if (!failed && n > 0) {
        printf("threads: %d threads loaded %s and called gelu concurrently\n", n, a->repo);
    }
    return failed;
}

static int run(const args* a) {
    int rc = 1;
    khub_options* options = NULL;
    khub_hub* hub = NULL;
    khub_kernel* kernel = NULL;
    khub_kernel* locked = NULL;
    khub_error* err = NULL;

    uint32_t v = khub_c_api_version();
    /* Same major, and a minor at least the header's (so, with the same major, v >= it). */
    if (v >> 16 != KHUB_C_API_VERSION_MAJOR || v < KHUB_C_API_VERSION) {
        fprintf(stderr, "c-host: built for C API %d.%d, the library has %u.%u\n", KHUB_C_API_VERSION_MAJOR,
                KHUB_C_API_VERSION_MINOR, v >> 16, v & 0xffff);
        return 1;
    }
    printf("khub %s, C API %u.%u\n", khub_version_string(), v >> 16, v & 0xffff);

    options = khub_options_new();
    if (options == NULL) {
        fprintf(stderr, "c-host: khub_options_new failed\n");
        return 1;
    }
    if (a->registry != NULL && khub_options_set_registry(options, a->registry, &err) != KHUB_OK) {
        fail("khub_options_set_registry", err);
        goto done;
    }
    if (khub_hub_open(options, &hub, &err) != KHUB_OK) {
        fail("khub_hub_open", err);
        goto done;
    }

    if (a->explain) {
        char* json = NULL;
        if (khub_hub_explain_json(hub, a->repo, a->version, &json, &err) != KHUB_OK) {
            fail("khub_hub_explain_json", err);
            goto done;
        }
        printf("explain:\n%s\n", json);
        khub_string_free(json);
    }

    if (khub_hub_load(hub, a->repo, a->version, &kernel, &err) != KHUB_OK) {
        fail("khub_hub_load", err);
        goto done;
    }
    printf("loaded %s %s\n", a->repo, a->version);
    if (check_silu_and_mul(kernel) || check_gelu(kernel, 0) || print_provenance(kernel, "registry")) {
        goto done;
    }

    if (a->lock != NULL) {
        if (khub_hub_load_locked(hub, a->lock, a->repo, &locked, &err) != KHUB_OK) {
            fail("khub_hub_load_locked", err);
            goto done;
        }
        printf("loaded %s as %s pins it\n", a->repo, a->lock);
        if (check_gelu(locked, 0) || print_provenance(locked, "lockfile")) {
            goto done;
        }
    }

    if (check_threads(hub, a)) {
        goto done;
    }
    rc = 0;
    printf("c-host: OK\n");

done:
    khub_kernel_free(locked);
    khub_kernel_free(kernel);
    khub_hub_free(hub);
    khub_options_free(options);
    return rc;
}

int main(int argc, char** argv) {
    args a = {NULL, "acme/activation", "^0.1", NULL, 4, 0};
    for (int i = 1; i < argc; i++) {
        const char* next = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(argv[i], "--explain") == 0) {
            a.explain = 1;
        } else if (next != NULL && strcmp(argv[i], "--registry") == 0) {
            a.registry = argv[++i];
        } else if (next != NULL && strcmp(argv[i], "--repo") == 0) {
            a.repo = argv[++i];
        } else if (next != NULL && strcmp(argv[i], "--version") == 0) {
            a.version = argv[++i];
        } else if (next != NULL && strcmp(argv[i], "--lock") == 0) {
            a.lock = argv[++i];
        } else if (next != NULL && strcmp(argv[i], "--threads") == 0) {
            a.threads = atoi(argv[++i]);
        } else {
            fprintf(stderr,
                    "usage: c-host [--registry URL|DIR] [--repo ORG/NAME] [--version REQ] [--lock FILE] "
                    "[--threads N] [--explain]\n");
            return 2;
        }
    }
    return run(&a);
}
