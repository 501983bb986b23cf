/* The smallest khub host: open a hub (registry, store and trust policy from the
 * environment, as the khub command uses them), load acme/activation ^0.1, and look up
 * silu_and_mul checked against the signature it is called with.
 *
 *   cc examples/c-host/hello.c -o hello $(pkg-config --cflags --libs khub)
 *   KHUB_REGISTRY=http://127.0.0.1:8080 ./hello
 */
#include <stdio.h>

#include <khub.h>

int main(void) {
    khub_options* options = khub_options_new();
    khub_hub* hub = NULL;
    khub_kernel* kernel = NULL;
    khub_error* err = NULL;
    khub_fn_ptr f = NULL;
    int rc = 1;
    if (khub_hub_open(options, &hub, &err) != 0 || khub_hub_load(hub, "acme/activation", "^0.1", &kernel, &err) != 0 ||
        khub_kernel_function(kernel, "silu_and_mul", "(mut tensor, tensor)", &f, &err) != 0) {
        fprintf(stderr, "hello: %s\n", khub_error_message(err));
        khub_error_free(err);
    } else {
        printf("loaded acme/activation: silu_and_mul at %p\n", (void*)f);
        rc = 0;
    }
    khub_kernel_free(kernel);
    khub_hub_free(hub);
    khub_options_free(options);
    return rc;
}
