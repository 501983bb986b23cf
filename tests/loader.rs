//! The loader end to end with real shared libraries: ABI failure modes, tampering, the
//! sealed-memfd path, typed and generic calls.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

mod common;

use std::path::Path;

use common::{build_c_lib, release_with};
use khub::abi::{DLTensor, KhubCall, Status};
use khub::bench::HostTensor;
use khub::load::{Arg, CallError, LoadError};
use khub::release::Release;
use khub::verify::VerifyError;

/// A tiny kernel: `scale` multiplies by a constant baked in at compile time (SCALE), and
/// writes a marker file from a constructor when MARKER is defined, to prove whether
/// dlopen ran.
const SCALE_KERNEL: &str = r#"
#include "khub_kernel.h"
#include <stdio.h>
#ifndef SCALE
#define SCALE 2.0f
#endif
#ifndef SIG
#define SIG "(mut tensor<f32>[n], tensor<f32>[n])"
#endif
#ifdef MARKER
__attribute__((constructor)) static void marker(void) { FILE* f = fopen(MARKER, "w"); if (f) fclose(f); }
#endif
static khub_status scale(const khub_call* call, DLTensor* out, const DLTensor* x) {
    if (!out || !x) return khub_fail(call, KHUB_ERR_INVALID_ARGUMENT, "NULL tensor");
    if (khub_numel(x) < 0) return khub_fail(call, KHUB_ERR_INVALID_ARGUMENT, "scale: the shape overflows");
    if (khub_numel(out) != khub_numel(x)) return khub_fail(call, KHUB_ERR_INVALID_ARGUMENT, "scale: out and x differ in size");
    float* o = (float*)out->data; const float* i = (const float*)x->data;
    for (int64_t k = 0; k < khub_numel(x); k++) o[k] = i[k] * SCALE;
    return KHUB_OK;
}
static const khub_function functions[] = {
    { "scale", SIG, (khub_fn_ptr)scale, NULL },
};
#ifdef NO_ENTRY
KHUB_EXPORT const void* not_an_entry(void) { return functions; }
#else
#ifdef WRONG_MAJOR
static const khub_kernel_desc desc = { 2, 0, sizeof(khub_kernel_desc), "k", "1.0.0", "cpu", sizeof(khub_function), 1, functions };
KHUB_EXPORT const khub_kernel_desc* khub_kernel_entry(uint32_t a, uint32_t b) { (void)a; (void)b; return &desc; }
#elif defined(FN_SIZE)
static const khub_kernel_desc desc = { KHUB_KERNEL_ABI_MAJOR, KHUB_KERNEL_ABI_MINOR, sizeof(khub_kernel_desc), "k", "1.0.0", "cpu", FN_SIZE, 1, functions };
KHUB_EXPORT const khub_kernel_desc* khub_kernel_entry(uint32_t a, uint32_t b) { (void)a; (void)b; return &desc; }
#elif defined(NULL_DESC)
KHUB_EXPORT const khub_kernel_desc* khub_kernel_entry(uint32_t a, uint32_t b) { (void)a; (void)b; (void)functions; return NULL; }
#else
KHUB_DEFINE_KERNEL("k", "1.0.0", "cpu", functions)
#endif
#endif
"#;

const SIG: &str = "(mut tensor<f32>[n], tensor<f32>[n])";

fn build(dir: &Path, name: &str, defines: &[&str]) -> std::path::PathBuf {
    let lib = dir.join(format!("{name}.so"));
    build_c_lib(SCALE_KERNEL, &lib, defines);
    lib
}

fn release(defines: &[&str], exports: &[(&str, &str)]) -> (tempfile::TempDir, Release) {
    let dir = tempfile::tempdir().unwrap();
    let lib = build(dir.path(), "k", defines);
    let rel = release_with(&dir.path().join("release"), &lib, "k", "1.0.0", exports);
    let r = Release::open(&rel).unwrap();
    (dir, r)
}

type Scale = unsafe extern "C" fn(*const KhubCall, *mut DLTensor, *const DLTensor) -> Status;

fn run_scale(k: &khub::Kernel) -> Vec<f32> {
    let f = k.function::<Scale>("scale").unwrap();
    let x = HostTensor::from_fn(&[4], |i| i as f32);
    let mut out = HostTensor::zeros(&[4]);
    let call = KhubCall {
        struct_size: std::mem::size_of::<KhubCall>() as u32,
        flags: 0,
        stream: std::ptr::null_mut(),
        error: std::ptr::null_mut(),
        error_capacity: 0,
    };
    // SAFETY: live CPU tensors of the right size; the signature was checked.
    let status = unsafe { (f.get())(&call, out.dl_mut(), x.dl()) };
    assert_eq!(status, 0);
    out.data().to_vec()
}

#[test]
fn a_good_kernel_loads_and_runs_typed_and_generic() {
    let (_d, r) = release(&[], &[("scale", SIG)]);
    let k = r.load_variant("v").unwrap();
    assert_eq!(run_scale(&k), [0.0, 2.0, 4.0, 6.0]);
    assert_eq!(k.abi_version(), (1, 0));
    // Generic path.
    let x = HostTensor::from_fn(&[3], |i| i as f32 + 1.0);
    let mut out = HostTensor::zeros(&[3]);
    // SAFETY: live tensors.
    unsafe { k.call("scale", &[Arg::TensorMut(out.dl_mut()), Arg::Tensor(x.dl())], std::ptr::null_mut()) }.unwrap();
    assert_eq!(out.data(), [2.0, 4.0, 6.0]);
    // Wrong argument kinds are refused before the call.
    // SAFETY: the call is refused before any pointer is used.
    let e = unsafe { k.call("scale", &[Arg::Tensor(x.dl()), Arg::F32(1.0)], std::ptr::null_mut()) }.unwrap_err();
    assert!(matches!(e, CallError::Arguments { .. }), "{e}");
    // A wrong Rust type is refused.
    type Wrong = unsafe extern "C" fn(*const KhubCall, *mut DLTensor, *const DLTensor, *const f32) -> Status;
    let e = k.function::<Wrong>("scale").err().unwrap();
    assert!(
        e.to_string()
            .contains("does not match the requested type `(mut tensor, tensor, f32)`"),
        "{e}"
    );
    assert!(k.function::<Scale>("nope").err().unwrap().to_string().contains("it exports: scale"));
}

#[test]
fn a_kernel_error_status_comes_back_with_its_message() {
    let (_d, r) = release(&[], &[("scale", SIG)]);
    let k = r.load_variant("v").unwrap();
    let x = HostTensor::zeros(&[3]);
    let mut out = HostTensor::zeros(&[2]);
    // SAFETY: live tensors; the kernel checks sizes and fails.
    let e = unsafe { k.call("scale", &[Arg::TensorMut(out.dl_mut()), Arg::Tensor(x.dl())], std::ptr::null_mut()) }.unwrap_err();
    assert_eq!(
        e,
        CallError::Kernel {
            function: "scale".into(),
            status: 1,
            message: "scale: out and x differ in size".into()
        }
    );
    assert!(e.to_string().contains("KHUB_ERR_INVALID_ARGUMENT"));
}

#[test]
fn abi_failure_modes_are_clear_errors() {
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 7] = [
        (&["-DWRONG_MAJOR"], &[("scale", SIG)], "reports ABI major 2"),
        // A function-table stride that would misalign the entries, or overflow their
        // offsets: refused before any entry is read.
        (&["-DFN_SIZE=(sizeof(khub_function)+1)"], &[("scale", SIG)], "a multiple of 8"),
        (&["-DFN_SIZE=(1ull<<62)"], &[("scale", SIG)], "need 32 to 4096 bytes each"),
        (&["-DNULL_DESC"], &[("scale", SIG)], "refused kernel ABI 1.0"),
        (&["-DNO_ENTRY"], &[("scale", SIG)], "does not export `khub_kernel_entry`"),
        (&[], &[("scale", SIG), ("shift", "(mut tensor)")], "declares `shift`"),
        (
            &["-DSIG=\"(mut tensor, tensor, f32)\""],
            &[("scale", SIG)],
            "the kernel says `(mut tensor, tensor, f32)`",
        ),
    ];
    for (defines, exports, needle) in cases {
        let (_d, r) = release(defines, exports);
        let e = r.load_variant("v").unwrap_err().to_string();
        assert!(e.contains(needle), "{defines:?}: {e}");
    }
}

#[test]
fn a_tampered_byte_is_refused_before_dlopen() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("constructor-ran");
    let lib = build(dir.path(), "k", &[&format!("-DMARKER=\"{}\"", marker.display())]);
    let rel = release_with(&dir.path().join("release"), &lib, "k", "1.0.0", &[("scale", SIG)]);
    let file = rel.join("variants/v/libk.so");
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    let e = Release::open(&rel).unwrap().load_variant("v").unwrap_err();
    assert!(matches!(e, LoadError::Verify(VerifyError::DigestMismatch { .. })), "{e}");
    assert!(e.to_string().contains("variants/v/libk.so"));
    assert!(
        !marker.exists(),
        "the library's constructor ran: bytes were loaded before verification"
    );

    // Truncated, extended and missing files are refused too.
    std::fs::write(&file, &bytes[..mid]).unwrap();
    let e = Release::open(&rel).unwrap().load_variant("v").unwrap_err();
    assert!(
        matches!(e, LoadError::Verify(VerifyError::SizeMismatch { actual, .. }) if actual == mid as u64),
        "{e}"
    );
    let mut longer = std::fs::read(&lib).unwrap();
    longer.push(0);
    std::fs::write(&file, &longer).unwrap();
    let e = Release::open(&rel).unwrap().load_variant("v").unwrap_err();
    assert!(matches!(e, LoadError::Verify(VerifyError::SizeMismatch { .. })), "{e}");
    std::fs::remove_file(&file).unwrap();
    let e = Release::open(&rel).unwrap().load_variant("v").unwrap_err();
    assert!(matches!(e, LoadError::Verify(VerifyError::FileMissing { .. })), "{e}");
    assert!(!marker.exists());
}

#[test]
fn a_symlink_in_the_release_is_refused() {
    let (d, r) = release(&[], &[("scale", SIG)]);
    let real = d.path().join("elsewhere.so");
    let file = r.root().join("variants/v/libk.so");
    std::fs::rename(&file, &real).unwrap();
    std::os::unix::fs::symlink(&real, &file).unwrap();
    let e = r.load_variant("v").unwrap_err().to_string();
    assert!(e.contains("is a symlink"), "{e}");
    // A symlinked directory on the path is refused as well.
    std::fs::remove_file(&file).unwrap();
    std::fs::rename(&real, &file).unwrap();
    let vdir = r.root().join("variants/v");
    let moved = d.path().join("vdir");
    std::fs::rename(&vdir, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &vdir).unwrap();
    let e = r.load_variant("v").unwrap_err().to_string();
    assert!(e.contains("`variants/v`") && e.contains("symlink"), "{e}");
}

#[test]
fn a_file_swapped_after_verification_is_never_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let good = build(dir.path(), "good", &["-DSCALE=2.0f"]);
    let evil = build(dir.path(), "evil", &["-DSCALE=-1000.0f"]);
    let rel = release_with(&dir.path().join("release"), &good, "k", "1.0.0", &[("scale", SIG)]);
    let r = Release::open(&rel).unwrap();
    let file = rel.join("variants/v/libk.so");
    let k = r
        .load_variant_with_hook("v", &|| {
            // The attacker's window: swap the verified file for another library.
            std::fs::copy(&evil, &file).unwrap();
        })
        .unwrap();
    assert_eq!(std::fs::read(&file).unwrap(), std::fs::read(&evil).unwrap(), "the swap happened");
    assert_eq!(run_scale(&k), [0.0, 2.0, 4.0, 6.0], "the verified code is what runs");
    // And the mapping comes from a sealed memfd, not from the release directory.
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    assert!(maps.contains("/memfd:khub:libk.so"), "{maps}");
    assert!(!maps.contains(&file.display().to_string()));
}

#[test]
fn function_pointers_outlive_the_kernel_handle() {
    let (_d, r) = release(&[], &[("scale", SIG)]);
    let f = {
        let k = r.load_variant("v").unwrap();
        k.function::<Scale>("scale").unwrap()
    };
    let x = HostTensor::from_fn(&[2], |i| i as f32);
    let mut out = HostTensor::zeros(&[2]);
    let call = KhubCall {
        struct_size: std::mem::size_of::<KhubCall>() as u32,
        flags: 0,
        stream: std::ptr::null_mut(),
        error: std::ptr::null_mut(),
        error_capacity: 0,
    };
    // SAFETY: live tensors; `f` keeps the kernel (and the library) alive.
    assert_eq!(unsafe { (f.get())(&call, out.dl_mut(), x.dl()) }, 0);
    assert_eq!(out.data(), [0.0, 2.0]);
}

/// Another part of the process loaded a library from `/proc/self/fd/N` and closed N (as
/// memfd-based loaders do); glibc keeps that name for its library. A khub load whose
/// verified memfd got N back was handed that other library by `dlopen` (glibc matches
/// names before it opens anything). The memfd now moves to a number no loaded library is
/// named by. Sixteen numbers are aliased, so that whichever the load gets collides.
#[cfg(target_os = "linux")]
#[test]
fn a_reused_descriptor_number_does_not_alias_another_library() {
    use std::os::fd::AsRawFd;
    let (dir, r) = release(&[], &[("scale", SIG)]);
    let foreign = build(dir.path(), "foreign", &["-DNO_ENTRY"]);
    let files: Vec<std::fs::File> = (0..16).map(|_| std::fs::File::open(&foreign).unwrap()).collect();
    for f in &files {
        let lib = unsafe { libloading::Library::new(format!("/proc/self/fd/{}", f.as_raw_fd())) }.unwrap();
        std::mem::forget(lib);
    }
    drop(files);
    let k = r
        .load_variant("v")
        .unwrap_or_else(|e| panic!("the verified library was not the one loaded: {e}"));
    assert_eq!(run_scale(&k), [0.0, 2.0, 4.0, 6.0]);
}

/// `khub_numel` of a shape whose product passes INT64_MAX ([2^62, 4]) wrapped around to 0
/// (undefined behaviour in C), so a kernel bounding its loops with it saw an empty tensor
/// or worse; it is -1 now, which the kernel refuses.
#[test]
fn khub_numel_reports_an_overflowing_shape() {
    let (_d, r) = release(&[], &[("scale", SIG)]);
    let k = r.load_variant("v").unwrap();
    let f = k.function::<Scale>("scale").unwrap();
    let x = HostTensor::from_fn(&[4], |i| i as f32);
    let mut out = HostTensor::zeros(&[4]);
    let mut huge = [1i64 << 62, 4];
    // SAFETY: dl() points at a live DLTensor; the copy borrows its data pointer.
    let mut hostile = unsafe { *x.dl() };
    hostile.ndim = 2;
    hostile.shape = huge.as_mut_ptr();
    let mut err = [0 as std::ffi::c_char; 256];
    let call = KhubCall {
        struct_size: std::mem::size_of::<KhubCall>() as u32,
        flags: 0,
        stream: std::ptr::null_mut(),
        error: err.as_mut_ptr(),
        error_capacity: err.len(),
    };
    // SAFETY: the kernel checks the shape before it reads any element.
    let status = unsafe { (f.get())(&call, out.dl_mut(), &hostile) };
    assert_ne!(status, 0, "an overflowing shape was accepted");
    // SAFETY: the kernel wrote a NUL-terminated message into `err`.
    let message = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
    assert!(message.contains("overflows"), "{message}");
}
