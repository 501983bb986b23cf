/*
 * bad-args: khub's C API under wrong arguments. Every call below must return the expected
 * KHUB_E_* code with a message, leave its out-parameter NULL, and never crash.
 *
 *   bad-args [--registry URL|DIR] [--repo ORG/NAME] [--version REQ]
 *
 * The registry must hold the example kernel (acme/activation ^0.1): some checks need a
 * loaded kernel.
 */
#include <stdio.h>
#include <string.h>

#include "khub.h"

static int checks = 0, failures = 0;

/* Checks that a call returned `want`, that *err carries the same code and a message, then
 * frees the error. */
static void expect(const char* what, int got, int want, khub_error* err) {
    checks++;
    const char* message = khub_error_message(err);
    int ok = got == want && (want == KHUB_OK ? err == NULL : (khub_error_code(err) == want && message[0] != '\0'));
    if (!ok) {
        failures++;
        fprintf(stderr, "FAIL %-58s returned %d (want %d), error code %d: %s\n", what, got, want, khub_error_code(err),
                message);
    } else if (want != KHUB_OK) {
        printf("ok   %-58s %2d  %.100s\n", what, got, message);
    } else {
        printf("ok   %-58s %2d\n", what, got);
    }
    khub_error_free(err);
}

/* Runs `expr` (which writes `err`), then checks its result. */
#define CHECK(what, want, expr)             \
    do {                                    \
        err = NULL;                         \
        int rc_ = (expr);                   \
        expect((what), rc_, (want), err);   \
        err = NULL;                         \
    } while (0)

static void expect_null(const char* what, const void* p) {
    checks++;
    if (p != NULL) {
        failures++;
        fprintf(stderr, "FAIL %s: the out-parameter is not NULL after a failure\n", what);
    }
}

static DLTensor tensor_f32(float* data, int64_t* shape) {
    DLTensor t;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.device.device_type = kDLCPU;
    t.ndim = 1;
    t.dtype.code = kDLFloat;
    t.dtype.bits = 32;
    t.dtype.lanes = 1;
    t.shape = shape;
    return t;
}

int main(int argc, char** argv) {
    const char *registry = NULL, *repo = "acme/activation", *version = "^0.1";
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--registry") == 0) {
            registry = argv[i + 1];
        } else if (strcmp(argv[i], "--repo") == 0) {
            repo = argv[i + 1];
        } else if (strcmp(argv[i], "--version") == 0) {
            version = argv[i + 1];
        } else {
            fprintf(stderr, "usage: bad-args [--registry URL|DIR] [--repo ORG/NAME] [--version REQ]\n");
            return 2;
        }
    }

    khub_error* err = NULL;
    khub_hub* hub = NULL;
    khub_kernel* kernel = NULL;
    char* json = NULL;

    /* Errors and frees of NULL. */
    checks++;
    if (khub_error_code(NULL) != 0 || strcmp(khub_error_message(NULL), "") != 0 || khub_error_kernel_status(NULL) != 0) {
        failures++;
        fprintf(stderr, "FAIL khub_error_* of NULL\n");
    }
    khub_error_free(NULL);
    khub_string_free(NULL);
    khub_options_free(NULL);
    khub_hub_free(NULL);
    khub_kernel_free(NULL);

    /* Options. */
    khub_options* options = khub_options_new();
    CHECK("khub_options_set_registry(NULL options)", KHUB_E_INVALID_ARGUMENT, khub_options_set_registry(NULL, "x", &err));
    CHECK("khub_options_set_registry(\"\")", KHUB_E_INVALID_ARGUMENT, khub_options_set_registry(options, "", &err));
    CHECK("khub_options_set_cache(\"\\xff\") (not UTF-8)", KHUB_E_INVALID_ARGUMENT, khub_options_set_cache(options, "\xff", &err));
    CHECK("khub_options_set_offline(7)", KHUB_E_INVALID_ARGUMENT, khub_options_set_offline(options, 7, &err));
    CHECK("khub_options_set_offline(NULL options)", KHUB_E_INVALID_ARGUMENT, khub_options_set_offline(NULL, 1, &err));
    CHECK("khub_options_set_trust_policy(NULL) resets", KHUB_OK, khub_options_set_trust_policy(options, NULL, &err));
    CHECK("khub_options_set_host_profile(NULL options)", KHUB_E_INVALID_ARGUMENT, khub_options_set_host_profile(NULL, "x", &err));
    CHECK("khub_options_set_state_dir(NULL options)", KHUB_E_INVALID_ARGUMENT, khub_options_set_state_dir(NULL, "x", &err));

    /* Opening a hub. */
    CHECK("khub_hub_open(NULL options)", KHUB_E_INVALID_ARGUMENT, khub_hub_open(NULL, &hub, &err));
    expect_null("khub_hub_open(NULL options)", hub);
    CHECK("khub_hub_open(NULL out)", KHUB_E_INVALID_ARGUMENT, khub_hub_open(options, NULL, &err));
    {
        khub_options* bad = khub_options_new();
        khub_hub* h = NULL;
        khub_options_set_trust_policy(bad, "/nonexistent/khub-trust.toml", NULL);
        CHECK("khub_hub_open(missing trust policy)", KHUB_E_TRUST, khub_hub_open(bad, &h, &err));
        expect_null("khub_hub_open(missing trust policy)", h);
        khub_options_set_trust_policy(bad, NULL, NULL);
        khub_options_set_host_profile(bad, "/nonexistent/host.toml", NULL);
        CHECK("khub_hub_open(missing host profile)", KHUB_E_HOST, khub_hub_open(bad, &h, &err));
        khub_options_free(bad);
    }
    if (registry != NULL) {
        CHECK("khub_options_set_registry", KHUB_OK, khub_options_set_registry(options, registry, &err));
    }
    CHECK("khub_hub_open", KHUB_OK, khub_hub_open(options, &hub, &err));
    khub_options_free(options);
    if (hub == NULL) {
        fprintf(stderr, "bad-args: cannot go on without a hub\n");
        return 1;
    }

    /* Loading. */
    CHECK("khub_hub_load(NULL hub)", KHUB_E_INVALID_ARGUMENT, khub_hub_load(NULL, repo, version, &kernel, &err));
    expect_null("khub_hub_load(NULL hub)", kernel);
    CHECK("khub_hub_load(NULL repo)", KHUB_E_INVALID_ARGUMENT, khub_hub_load(hub, NULL, version, &kernel, &err));
    CHECK("khub_hub_load(NULL requirement)", KHUB_E_INVALID_ARGUMENT, khub_hub_load(hub, repo, NULL, &kernel, &err));
    CHECK("khub_hub_load(NULL out)", KHUB_E_INVALID_ARGUMENT, khub_hub_load(hub, repo, version, NULL, &err));
    CHECK("khub_hub_load(\"not a repo\")", KHUB_E_INVALID_ARGUMENT, khub_hub_load(hub, "not a repo", version, &kernel, &err));
    CHECK("khub_hub_load(\"\\xff/x\") (not UTF-8)", KHUB_E_INVALID_ARGUMENT, khub_hub_load(hub, "\xff/x", version, &kernel, &err));
    CHECK("khub_hub_load(unknown repo)", KHUB_E_NOT_FOUND, khub_hub_load(hub, "acme/no-such-kernel", version, &kernel, &err));
    expect_null("khub_hub_load(unknown repo)", kernel);
    CHECK("khub_hub_load(requirement \"one.two\")", KHUB_E_INVALID_ARGUMENT, khub_hub_load(hub, repo, "one.two", &kernel, &err));
    CHECK("khub_hub_load(no release matches \"^9\")", KHUB_E_NOT_FOUND, khub_hub_load(hub, repo, "^9", &kernel, &err));
    checks++;
    if (khub_hub_load(hub, "acme/no-such-kernel", version, &kernel, NULL) != KHUB_E_NOT_FOUND || kernel != NULL) {
        failures++;
        fprintf(stderr, "FAIL khub_hub_load with err == NULL\n");
    }
    CHECK("khub_hub_load_locked(NULL lockfile)", KHUB_E_INVALID_ARGUMENT, khub_hub_load_locked(hub, NULL, repo, &kernel, &err));
    CHECK("khub_hub_load_locked(missing lockfile)", KHUB_E_LOCK, khub_hub_load_locked(hub, "/nonexistent/khub.lock", repo, &kernel, &err));
    CHECK("khub_hub_explain_json(NULL out)", KHUB_E_INVALID_ARGUMENT, khub_hub_explain_json(hub, repo, version, NULL, &err));
    CHECK("khub_hub_explain_json(unknown repo)", KHUB_E_NOT_FOUND, khub_hub_explain_json(hub, "acme/no-such-kernel", version, &json, &err));
    expect_null("khub_hub_explain_json(unknown repo)", json);
    CHECK("khub_hub_host_json(NULL hub)", KHUB_E_INVALID_ARGUMENT, khub_hub_host_json(NULL, &json, &err));
    CHECK("khub_hub_host_json", KHUB_OK, khub_hub_host_json(hub, &json, &err));
    khub_string_free(json);
    json = NULL;

    CHECK("khub_hub_load", KHUB_OK, khub_hub_load(hub, repo, version, &kernel, &err));
    if (kernel == NULL) {
        khub_hub_free(hub);
        fprintf(stderr, "bad-args: cannot go on without a kernel\n");
        return 1;
    }

    /* Typed functions. */
    khub_fn_ptr fn = NULL;
    CHECK("khub_kernel_function(NULL kernel)", KHUB_E_INVALID_ARGUMENT, khub_kernel_function(NULL, "gelu", "(mut tensor, tensor)", &fn, &err));
    CHECK("khub_kernel_function(NULL name)", KHUB_E_INVALID_ARGUMENT, khub_kernel_function(kernel, NULL, "(mut tensor, tensor)", &fn, &err));
    CHECK("khub_kernel_function(NULL signature)", KHUB_E_INVALID_ARGUMENT, khub_kernel_function(kernel, "gelu", NULL, &fn, &err));
    CHECK("khub_kernel_function(NULL fn_out)", KHUB_E_INVALID_ARGUMENT, khub_kernel_function(kernel, "gelu", "(mut tensor, tensor)", NULL, &err));
    CHECK("khub_kernel_function(unknown name)", KHUB_E_NOT_FOUND, khub_kernel_function(kernel, "no_such_fn", "(mut tensor, tensor)", &fn, &err));
    CHECK("khub_kernel_function(\"(tensor, tensor)\")", KHUB_E_SIGNATURE_MISMATCH, khub_kernel_function(kernel, "silu_and_mul", "(tensor, tensor)", &fn, &err));
    expect_null("khub_kernel_function(wrong signature)", (const void*)fn);
    CHECK("khub_kernel_function(\"(mut tensor, tensor, f32)\")", KHUB_E_SIGNATURE_MISMATCH, khub_kernel_function(kernel, "gelu", "(mut tensor, tensor, f32)", &fn, &err));
    CHECK("khub_kernel_function(\"(mut tensor<f64>, tensor)\")", KHUB_E_SIGNATURE_MISMATCH, khub_kernel_function(kernel, "gelu", "(mut tensor<f64>, tensor)", &fn, &err));
    CHECK("khub_kernel_function(\"mut tensor, tensor\") (malformed)", KHUB_E_INVALID_ARGUMENT, khub_kernel_function(kernel, "gelu", "mut tensor, tensor", &fn, &err));
    CHECK("khub_kernel_function(full signature)", KHUB_OK, khub_kernel_function(kernel, "silu_and_mul", "(mut tensor<f32>[n, d], tensor<f32>[n, 2d])", &fn, &err));

    /* Generic calls. */
    float x[8] = {0}, out[8] = {0}, small[4] = {0};
    int64_t shape[1] = {8}, small_shape[1] = {4};
    DLTensor xt = tensor_f32(x, shape), ot = tensor_f32(out, shape), st = tensor_f32(small, small_shape);
    khub_arg a[17];
    memset(a, 0, sizeof a);
    a[0].kind = KHUB_ARG_TENSOR_MUT;
    a[0].value.tensor = &ot;
    a[1].kind = KHUB_ARG_TENSOR;
    a[1].value.tensor = &xt;
    CHECK("khub_kernel_call(gelu)", KHUB_OK, khub_kernel_call(kernel, "gelu", a, 2, NULL, &err));
    CHECK("khub_kernel_call(NULL kernel)", KHUB_E_INVALID_ARGUMENT, khub_kernel_call(NULL, "gelu", a, 2, NULL, &err));
    CHECK("khub_kernel_call(NULL name)", KHUB_E_INVALID_ARGUMENT, khub_kernel_call(kernel, NULL, a, 2, NULL, &err));
    CHECK("khub_kernel_call(unknown name)", KHUB_E_NOT_FOUND, khub_kernel_call(kernel, "no_such_fn", a, 2, NULL, &err));
    CHECK("khub_kernel_call(nargs 1 for 2 parameters)", KHUB_E_SIGNATURE_MISMATCH, khub_kernel_call(kernel, "gelu", a, 1, NULL, &err));
    CHECK("khub_kernel_call(nargs 0, args NULL)", KHUB_E_SIGNATURE_MISMATCH, khub_kernel_call(kernel, "gelu", NULL, 0, NULL, &err));
    CHECK("khub_kernel_call(args NULL, nargs 2)", KHUB_E_INVALID_ARGUMENT, khub_kernel_call(kernel, "gelu", NULL, 2, NULL, &err));
    CHECK("khub_kernel_call(nargs 17)", KHUB_E_INVALID_ARGUMENT, khub_kernel_call(kernel, "gelu", a, 17, NULL, &err));
    a[1].kind = KHUB_ARG_F32;
    a[1].value.f32 = 1.0f;
    CHECK("khub_kernel_call(f32 for a tensor)", KHUB_E_SIGNATURE_MISMATCH, khub_kernel_call(kernel, "gelu", a, 2, NULL, &err));
    a[1].kind = 99;
    CHECK("khub_kernel_call(kind 99)", KHUB_E_INVALID_ARGUMENT, khub_kernel_call(kernel, "gelu", a, 2, NULL, &err));
    a[1].kind = KHUB_ARG_TENSOR;
    a[1].value.tensor = NULL;
    CHECK("khub_kernel_call(NULL tensor)", KHUB_E_INVALID_ARGUMENT, khub_kernel_call(kernel, "gelu", a, 2, NULL, &err));
    a[1].value.tensor = &st;
    {
        int rc = khub_kernel_call(kernel, "gelu", a, 2, NULL, &err);
        int status = khub_error_kernel_status(err);
        expect("khub_kernel_call(shapes differ: the kernel refuses)", rc, KHUB_E_KERNEL, err);
        err = NULL;
        checks++;
        if (status != KHUB_ERR_INVALID_ARGUMENT) {
            failures++;
            fprintf(stderr, "FAIL the kernel's status is %d, want KHUB_ERR_INVALID_ARGUMENT\n", status);
        }
    }

    /* Provenance. */
    CHECK("khub_kernel_provenance_json(NULL kernel)", KHUB_E_INVALID_ARGUMENT, khub_kernel_provenance_json(NULL, &json, &err));
    CHECK("khub_kernel_provenance_json(NULL out)", KHUB_E_INVALID_ARGUMENT, khub_kernel_provenance_json(kernel, NULL, &err));

    khub_kernel_free(kernel);
    khub_hub_free(hub);
    if (failures == 0) {
        printf("bad-args: all %d checks passed\n", checks);
    } else {
        printf("bad-args: %d of %d checks failed\n", failures, checks);
    }
    return failures == 0 ? 0 : 1;
}
