/*
 * khub.h: the C API of khub, for host applications written in C or C++.
 *
 * A host opens a hub (host facts, a registry, the store), loads a kernel by repository and
 * version requirement (or from a lockfile), takes typed function pointers checked against
 * the kernel's signatures or calls functions generically, and reads what was loaded and
 * why as JSON. The full reference is docs/c-api.md; the kernel side of the contract
 * (khub_call, DLTensor, status codes, signature strings) is khub_kernel.h, included here.
 *
 * Link with libkhub (pkg-config --cflags --libs khub). C99 or later; valid C++.
 *
 * Conventions, for every function:
 *
 *   Errors.   Fallible functions return 0 (KHUB_OK) or a KHUB_E_* code and take a
 *             trailing `khub_error** err`. When err is not NULL, *err is always written:
 *             NULL on success, a new error object on failure (free it with
 *             khub_error_free). Pass NULL to get only the code.
 *   Outputs.  Out-parameters must not be NULL; on failure they are set to NULL.
 *   Handles.  khub_options, khub_hub, khub_kernel and khub_error are opaque. Each one a
 *             function hands out is owned by the caller until passed to its *_free
 *             function; every *_free accepts NULL. Freeing a hub does not invalidate the
 *             kernels loaded through it.
 *   Strings.  Strings passed in are borrowed for the call only: NUL-terminated UTF-8.
 *             `char*` strings handed out are owned by the caller and freed with
 *             khub_string_free. `const char*` results are borrowed (see each function).
 *   Threads.  khub_hub and khub_kernel may be used from several threads at once. A
 *             khub_options must not be changed while another thread uses it. No handle may
 *             be freed while another thread still uses it.
 *   Panics.   No Rust panic crosses this API: it comes back as KHUB_E_PANIC.
 *
 * Versioning: KHUB_C_API_VERSION_MAJOR / _MINOR here, khub_c_api_version() at run time.
 * A minor release only adds declarations, at the end of this file; codes are never
 * reused or renumbered. A host built against M.m runs with a library M.n, n >= m.
 */
#ifndef KHUB_H
#define KHUB_H

#include <stddef.h>
#include <stdint.h>

#include "khub_kernel.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------ */
/* Versions                                                                              */
/* ------------------------------------------------------------------------------------ */

/* The C API's major: a new major may change or remove declarations. */
#define KHUB_C_API_VERSION_MAJOR 1
/* The C API's minor: additions only. */
#define KHUB_C_API_VERSION_MINOR 0
/* (major << 16) | minor, as khub_c_api_version() returns it. */
#define KHUB_C_API_VERSION ((KHUB_C_API_VERSION_MAJOR << 16) | KHUB_C_API_VERSION_MINOR)

/* ------------------------------------------------------------------------------------ */
/* Error codes (0 is KHUB_OK, from khub_kernel.h)                                        */
/* ------------------------------------------------------------------------------------ */

/* An argument is wrong: a NULL pointer, a string that is not UTF-8, a repository id that
 * is not org/name, a version requirement or signature string that does not parse, an
 * unknown argument kind. */
#define KHUB_E_INVALID_ARGUMENT 1
/* Something named does not exist: the repository, a release matching the requirement, a
 * function of the kernel, the repository's entry in a lockfile. */
#define KHUB_E_NOT_FOUND 2
/* No variant of the release runs on this host (the message names the closest miss). */
#define KHUB_E_NO_VARIANT 3
/* Bytes do not match what pins them: a file's size or SHA-256 differs from the
 * manifest's, a lock's digest from the manifest's; a symlink or unlisted file. */
#define KHUB_E_VERIFY 4
/* The trust policy refused the release (signature, key, rollback), or cannot be read. */
#define KHUB_E_TRUST 5
/* The registry failed or served an invalid release (transport, access, rate limit, bad
 * manifest). */
#define KHUB_E_REGISTRY 6
/* Offline, and something needed is not in the store; the message names it and the
 * command that fetches it. */
#define KHUB_E_OFFLINE_MISS 7
/* The verified library could not be loaded: dlopen failed, no entry symbol, ABI refused,
 * a bad descriptor, exports that differ from the manifest. */
#define KHUB_E_LOAD 8
/* The signature asked of khub_kernel_function, or the arguments passed to
 * khub_kernel_call, do not match the function's signature. */
#define KHUB_E_SIGNATURE_MISMATCH 9
/* The kernel function returned a non-zero status: khub_error_kernel_status() gives it,
 * the message holds what the kernel wrote. */
#define KHUB_E_KERNEL 10
/* The host configuration is wrong or host detection failed: a KHUB_* variable that does
 * not parse, an unreadable host profile. */
#define KHUB_E_HOST 11
/* A lockfile could not be read or is not valid. */
#define KHUB_E_LOCK 12
/* Local I/O failed (the store, the index of known releases). */
#define KHUB_E_IO 13
/* khub panicked; the panic was caught at the boundary. A bug: please report it. */
#define KHUB_E_PANIC 14
/* Any other failure inside khub. */
#define KHUB_E_INTERNAL 15

/* ------------------------------------------------------------------------------------ */
/* Handles                                                                               */
/* ------------------------------------------------------------------------------------ */

/* How to open a hub; unset settings come from the environment. */
typedef struct khub_options khub_options;
/* An open hub: host facts, a registry and the store. Thread-safe. */
typedef struct khub_hub khub_hub;
/* A loaded, verified kernel. Thread-safe. */
typedef struct khub_kernel khub_kernel;
/* An error: a KHUB_E_* code and a message. */
typedef struct khub_error khub_error;

/* ------------------------------------------------------------------------------------ */
/* Generic call arguments                                                                */
/* ------------------------------------------------------------------------------------ */

/* khub_arg.kind, one per parameter kind of a signature string. */
#define KHUB_ARG_TENSOR 1     /* "tensor":     value.tensor, read only */
#define KHUB_ARG_TENSOR_MUT 2 /* "mut tensor": value.tensor, data written */
#define KHUB_ARG_F32 3        /* "f32":        value.f32 */
#define KHUB_ARG_F64 4        /* "f64":        value.f64 */
#define KHUB_ARG_I64 5        /* "i64":        value.i64 */
#define KHUB_ARG_U64 6        /* "u64":        value.u64 */

/* The value of one argument; the member read is the one `kind` names. */
typedef union khub_arg_value {
    DLTensor* tensor; /* owned by the caller; not NULL */
    float f32;
    double f64;
    int64_t i64;
    uint64_t u64;
} khub_arg_value;

/* One argument of khub_kernel_call. */
typedef struct khub_arg {
    int32_t kind; /* KHUB_ARG_* */
    khub_arg_value value;
} khub_arg;

/* ------------------------------------------------------------------------------------ */
/* Versions, strings, errors                                                             */
/* ------------------------------------------------------------------------------------ */

/* The library's C API version, (major << 16) | minor. */
uint32_t khub_c_api_version(void);

/* The khub release, e.g. "0.1.0". Static: never free it. */
const char* khub_version_string(void);

/* Frees a string khub handed out. NULL is accepted. */
void khub_string_free(char* s);

/* The error's KHUB_E_* code; 0 for NULL. */
int khub_error_code(const khub_error* err);

/* The error's message (UTF-8). Borrowed: valid until the error is freed. "" for NULL. */
const char* khub_error_message(const khub_error* err);

/* For a KHUB_E_KERNEL error, the kernel's status (KHUB_ERR_* of khub_kernel.h); 0 for any
 * other error and for NULL. */
int32_t khub_error_kernel_status(const khub_error* err);

/* Frees an error. NULL is accepted. */
void khub_error_free(khub_error* err);

/* ------------------------------------------------------------------------------------ */
/* Options                                                                               */
/* ------------------------------------------------------------------------------------ */

/* New options, every setting unset (taken from the environment). Owned by the caller:
 * free with khub_options_free. NULL only if khub panicked. */
khub_options* khub_options_new(void);

/* Frees options. NULL is accepted. Hubs opened with them do not need them any more. */
void khub_options_free(khub_options* options);

/* The setters below copy their string (borrowed for the call only). NULL resets the
 * setting to the environment's; an empty string is KHUB_E_INVALID_ARGUMENT. */

/* The registry: a Hub-compatible URL ("https://…", "http://127.0.0.1:8080") or a
 * directory registry path. Default: KHUB_REGISTRY, HF_ENDPOINT, then the public Hub. */
int khub_options_set_registry(khub_options* options, const char* registry, khub_error** err);

/* The store's root. Default: KHUB_CACHE, then $XDG_CACHE_HOME/khub, ~/.cache/khub. */
int khub_options_set_cache(khub_options* options, const char* dir, khub_error** err);

/* Offline mode: 1 never touches the network (versions resolve against releases seen
 * before, files come from the store), 0 allows the network even if KHUB_OFFLINE or
 * HF_HUB_OFFLINE is set, -1 takes it from the environment (the default). */
int khub_options_set_offline(khub_options* options, int offline, khub_error** err);

/* The trust policy file, read when the hub opens (a missing file is an error). Default:
 * KHUB_TRUST_POLICY, then ~/.config/khub/trust.toml if present, else signatures are not
 * required. */
int khub_options_set_trust_policy(khub_options* options, const char* path, khub_error** err);

/* A host-profile file overriding probed host facts (docs/host.md), to resolve as another
 * machine would. Default: KHUB_HOST_PROFILE, else the facts are probed. */
int khub_options_set_host_profile(khub_options* options, const char* path, khub_error** err);

/* Where rollback state lives, outside the purgeable cache. Default: KHUB_STATE_DIR, then
 * $XDG_STATE_HOME/khub, ~/.local/state/khub. */
int khub_options_set_state_dir(khub_options* options, const char* dir, khub_error** err);

/* ------------------------------------------------------------------------------------ */
/* Hubs                                                                                  */
/* ------------------------------------------------------------------------------------ */

/* Opens a hub: reads the environment, applies `options` (borrowed, not NULL), probes the
 * host, opens the store and (online) the registry client. *out: a new hub, owned by the
 * caller, freed with khub_hub_free. */
int khub_hub_open(const khub_options* options, khub_hub** out, khub_error** err);

/* Frees a hub. NULL is accepted. Kernels loaded through it stay valid. */
void khub_hub_free(khub_hub* hub);

/* Loads `repo` ("org/name") at the highest release matching `requirement` (semver:
 * "^0.1", "=1.2.0", ">=1, <3", "*"): resolves the release, picks the variant for this
 * host, fetches only what the store lacks, verifies every byte, loads it and checks its
 * exports. *out: a new kernel, owned by the caller, freed with khub_kernel_free. */
int khub_hub_load(const khub_hub* hub, const char* repo, const char* requirement, khub_kernel** out, khub_error** err);

/* Loads `repo` exactly as the lockfile at path `lockfile` (khub.lock) pins it, from the
 * store: no registry request, no version resolution. Of the locked variants, the best one
 * for this host is loaded. *out: a new kernel, freed with khub_kernel_free. */
int khub_hub_load_locked(const khub_hub* hub, const char* lockfile, const char* repo, khub_kernel** out, khub_error** err);

/* The explain trace as JSON: the release `requirement` resolves to, the host facts, the
 * chosen variant (null when none fits: not an error here) and every variant ranked or
 * rejected with its reason (docs/c-api.md). Fetches no variant, loads nothing.
 * *out: a new string, freed with khub_string_free. */
int khub_hub_explain_json(const khub_hub* hub, const char* repo, const char* requirement, char** out, khub_error** err);

/* The host facts the hub resolves for, as JSON. *out: a new string, freed with
 * khub_string_free. */
int khub_hub_host_json(const khub_hub* hub, char** out, khub_error** err);

/* ------------------------------------------------------------------------------------ */
/* Kernels                                                                               */
/* ------------------------------------------------------------------------------------ */

/* Frees a kernel handle. NULL is accepted. The library is never unloaded: function
 * pointers taken from the kernel stay valid. */
void khub_kernel_free(khub_kernel* kernel);

/* A typed function pointer. `signature` follows the grammar of khub_kernel.h; its
 * parameter kinds must equal the function's, e.g. "(mut tensor, tensor)" for
 * silu_and_mul, and any dtype or shape it spells out must equal the function's too
 * (KHUB_E_SIGNATURE_MISMATCH otherwise; KHUB_E_NOT_FOUND for an unknown name).
 * *fn_out: the function, to be cast to the C type the signature names, e.g.
 *     typedef khub_status (*silu_and_mul_fn)(const khub_call*, DLTensor*, const DLTensor*);
 * It is not owned by anyone and stays valid for the life of the process. */
int khub_kernel_function(const khub_kernel* kernel, const char* name, const char* signature, khub_fn_ptr* fn_out,
                         khub_error** err);

/* Calls `name` generically. `args` is an array of `nargs` arguments (NULL if nargs is
 * 0), borrowed for the call, whose kinds must equal the function's signature
 * (KHUB_E_SIGNATURE_MISMATCH otherwise). Tensors stay the caller's; the kernel reads them,
 * and writes the data of KHUB_ARG_TENSOR_MUT ones, during the call. `stream` is a
 * cudaStream_t / hipStream_t, or NULL (CPU kernels ignore it). A non-zero kernel status is
 * KHUB_E_KERNEL, with the status in khub_error_kernel_status() and the kernel's message. */
int khub_kernel_call(const khub_kernel* kernel, const char* name, const khub_arg* args, size_t nargs, void* stream,
                     khub_error** err);

/* The kernel's provenance as JSON: repository, requirement, registry (or lockfile),
 * version, commit and manifest SHA-256 it was loaded from; variant, backend, kernel ABI,
 * every verified file with its size and SHA-256, and the exports (docs/c-api.md).
 * *out: a new string, freed with khub_string_free. */
int khub_kernel_provenance_json(const khub_kernel* kernel, char** out, khub_error** err);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KHUB_H */
