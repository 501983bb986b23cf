//! Unit tests of the C API boundary: codes, strings, handles and bad arguments.
use super::*;
use crate::registry::RegistryError;

fn message(err: *const khub_error) -> String {
    // SAFETY: `err` is NULL or a live error from this module.
    unsafe { CStr::from_ptr(khub_error_message(err)) }.to_string_lossy().into_owned()
}

#[test]
fn versions() {
    assert_eq!(khub_c_api_version(), (KHUB_C_API_VERSION_MAJOR << 16) | KHUB_C_API_VERSION_MINOR);
    // SAFETY: a static NUL-terminated string.
    let v = unsafe { CStr::from_ptr(khub_version_string()) };
    assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
}

#[test]
fn a_panic_becomes_an_error() {
    let mut err = std::ptr::null_mut();
    let code = guard(&mut err, || panic!("boom"));
    assert_eq!(code, KHUB_E_PANIC);
    // SAFETY: `err` was just written by guard.
    assert_eq!(unsafe { khub_error_code(err) }, KHUB_E_PANIC);
    assert!(message(err).contains("boom"), "{}", message(err));
    // SAFETY: freed once.
    unsafe { khub_error_free(err) };
    // With err == NULL the error is dropped, not leaked, and the code still returned.
    assert_eq!(guard(std::ptr::null_mut(), || panic!("again")), KHUB_E_PANIC);
    assert_eq!(guard(std::ptr::null_mut(), || Ok(())), 0);
}

#[test]
fn nulls_are_errors_not_crashes() {
    let mut err = std::ptr::null_mut();
    let mut hub = std::ptr::null_mut();
    // SAFETY: every pointer is NULL or a valid local.
    unsafe {
        assert_eq!(khub_hub_open(std::ptr::null(), &mut hub, &mut err), KHUB_E_INVALID_ARGUMENT);
        assert!(hub.is_null());
        assert_eq!(message(err), "`options` is NULL");
        khub_error_free(err);
        let mut kernel = std::ptr::null_mut();
        assert_eq!(
            khub_hub_load(std::ptr::null(), c"a/b".as_ptr(), c"^1".as_ptr(), &mut kernel, &mut err),
            KHUB_E_INVALID_ARGUMENT
        );
        khub_error_free(err);
        let mut f: khub_fn_ptr = None;
        assert_eq!(
            khub_kernel_function(std::ptr::null(), c"f".as_ptr(), c"()".as_ptr(), &mut f, &mut err),
            KHUB_E_INVALID_ARGUMENT
        );
        khub_error_free(err);
        assert_eq!(
            khub_kernel_call(std::ptr::null(), c"f".as_ptr(), std::ptr::null(), 0, std::ptr::null_mut(), &mut err),
            KHUB_E_INVALID_ARGUMENT
        );
        khub_error_free(err);
        assert_eq!(khub_error_code(std::ptr::null()), 0);
        assert_eq!(message(std::ptr::null()), "");
        khub_error_free(std::ptr::null_mut());
        khub_string_free(std::ptr::null_mut());
        khub_options_free(std::ptr::null_mut());
        khub_hub_free(std::ptr::null_mut());
        khub_kernel_free(std::ptr::null_mut());
    }
}

#[test]
fn options_are_checked_and_reset() {
    let o = khub_options_new();
    let mut err = std::ptr::null_mut();
    // SAFETY: `o` is live until freed at the end; strings are NUL-terminated literals.
    unsafe {
        assert_eq!(khub_options_set_registry(o, c"http://127.0.0.1:1".as_ptr(), &mut err), 0);
        assert!(err.is_null());
        assert_eq!((*o).registry.as_deref(), Some("http://127.0.0.1:1"));
        assert_eq!(khub_options_set_registry(o, std::ptr::null(), &mut err), 0);
        assert_eq!((*o).registry, None);
        assert_eq!(khub_options_set_cache(o, c"".as_ptr(), &mut err), KHUB_E_INVALID_ARGUMENT);
        khub_error_free(err);
        assert_eq!(khub_options_set_offline(o, 2, &mut err), KHUB_E_INVALID_ARGUMENT);
        khub_error_free(err);
        assert_eq!(khub_options_set_offline(o, 1, std::ptr::null_mut()), 0);
        assert_eq!((*o).offline, Some(true));
        khub_options_free(o);
    }
}

#[test]
fn error_codes_are_distinct() {
    let codes = [
        KHUB_E_INVALID_ARGUMENT,
        KHUB_E_NOT_FOUND,
        KHUB_E_NO_VARIANT,
        KHUB_E_VERIFY,
        KHUB_E_TRUST,
        KHUB_E_REGISTRY,
        KHUB_E_OFFLINE_MISS,
        KHUB_E_LOAD,
        KHUB_E_SIGNATURE_MISMATCH,
        KHUB_E_KERNEL,
        KHUB_E_HOST,
        KHUB_E_LOCK,
        KHUB_E_IO,
        KHUB_E_PANIC,
        KHUB_E_INTERNAL,
    ];
    assert_eq!(codes.to_vec(), (1..=15).collect::<Vec<c_int>>());
}

#[test]
fn refused_files_and_damaged_blobs_are_verification_errors() {
    let repo: RepoId = "acme/k".parse().unwrap();
    let symlinked = HubError::Registry(RegistryError::NotRegular {
        registry: "/srv/registry".into(),
        repo: repo.clone(),
        path: "variants/cpu/libk.so".into(),
        what: "a symlink",
    });
    assert_eq!(Failure::from(symlinked).code, KHUB_E_VERIFY);
    let damaged = HubError::DamagedBlob {
        what: "file `variants/cpu/libk.so` of acme/k 0.1.0".into(),
        blob: "/cache/store-v1/blobs/ab/abcd".into(),
        quarantined: None,
        command: "khub fetch acme/k --version '=0.1.0'".into(),
    };
    assert_eq!(Failure::from(damaged).code, KHUB_E_VERIFY);
    let cpu = LoadError::CpuUnsupported {
        variant: "cpu-x86_64-v4-linux".into(),
        needs: "x86-64 level x86-64-v4".into(),
        has: "x86_64, level x86-64-v3".into(),
    };
    assert_eq!(Failure::from(cpu).code, KHUB_E_NO_VARIANT);
}

/// The library's error kinds are the C API's codes, one for one.
#[test]
fn error_kinds_are_the_c_codes() {
    use crate::error_kind::ErrorKind as K;
    let pairs = [
        (K::InvalidArgument, KHUB_E_INVALID_ARGUMENT),
        (K::NotFound, KHUB_E_NOT_FOUND),
        (K::NoVariant, KHUB_E_NO_VARIANT),
        (K::Verify, KHUB_E_VERIFY),
        (K::Trust, KHUB_E_TRUST),
        (K::Registry, KHUB_E_REGISTRY),
        (K::OfflineMiss, KHUB_E_OFFLINE_MISS),
        (K::Load, KHUB_E_LOAD),
        (K::SignatureMismatch, KHUB_E_SIGNATURE_MISMATCH),
        (K::Kernel, KHUB_E_KERNEL),
        (K::Host, KHUB_E_HOST),
        (K::Lock, KHUB_E_LOCK),
        (K::Io, KHUB_E_IO),
    ];
    for (kind, code) in pairs {
        assert_eq!(kind.code(), code, "{kind:?}");
    }
}
