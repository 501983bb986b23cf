//! The Rust mirror of include/khub_kernel.h has the header's layout: a C program built
//! against the header prints every size and offset, and each must equal the Rust one.
//! Also checks that the header is pure C99 and valid C++.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

mod common;

use std::mem::{offset_of, size_of};
use std::process::Command;

use khub::abi::{DLDataType, DLDevice, DLTensor, KhubCall, KhubFunction, KhubKernelDesc};

const PROBE: &str = r#"
#include "khub_kernel.h"
#include <stdio.h>
#define S(T) printf(#T " %zu\n", sizeof(T));
#define O(T, F) printf(#T "." #F " %zu\n", offsetof(T, F));
int main(void) {
    S(DLDevice) O(DLDevice, device_id)
    S(DLDataType) O(DLDataType, bits) O(DLDataType, lanes)
    S(DLTensor) O(DLTensor, device) O(DLTensor, ndim) O(DLTensor, dtype) O(DLTensor, shape) O(DLTensor, strides) O(DLTensor, byte_offset)
    S(khub_call) O(khub_call, flags) O(khub_call, stream) O(khub_call, error) O(khub_call, error_capacity)
    S(khub_function) O(khub_function, signature) O(khub_function, fn) O(khub_function, selftest)
    S(khub_kernel_desc) O(khub_kernel_desc, abi_minor) O(khub_kernel_desc, struct_size) O(khub_kernel_desc, name)
    O(khub_kernel_desc, version) O(khub_kernel_desc, backend) O(khub_kernel_desc, function_size)
    O(khub_kernel_desc, function_count) O(khub_kernel_desc, functions)
    printf("KHUB_KERNEL_ABI_MAJOR %d\nKHUB_KERNEL_ABI_MINOR %d\n", KHUB_KERNEL_ABI_MAJOR, KHUB_KERNEL_ABI_MINOR);
    printf("KHUB_ERR_SELFTEST_FAILED %d\n", KHUB_ERR_SELFTEST_FAILED);
    return 0;
}
"#;

#[test]
fn rust_layouts_match_the_c_header() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("probe.c");
    let exe = dir.path().join("probe");
    std::fs::write(&src, PROBE).unwrap();
    let include = common::repo().join("include");
    let ok = Command::new("cc")
        .args(["-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-I"])
        .arg(&include)
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .status()
        .unwrap();
    assert!(ok.success(), "the header must compile as strict C99");
    let out = String::from_utf8(Command::new(&exe).output().unwrap().stdout).unwrap();
    let c: std::collections::BTreeMap<&str, usize> = out
        .lines()
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k, v.parse().unwrap())
        })
        .collect();
    let rust = [
        ("DLDevice", size_of::<DLDevice>()),
        ("DLDevice.device_id", offset_of!(DLDevice, device_id)),
        ("DLDataType", size_of::<DLDataType>()),
        ("DLDataType.bits", offset_of!(DLDataType, bits)),
        ("DLDataType.lanes", offset_of!(DLDataType, lanes)),
        ("DLTensor", size_of::<DLTensor>()),
        ("DLTensor.device", offset_of!(DLTensor, device)),
        ("DLTensor.ndim", offset_of!(DLTensor, ndim)),
        ("DLTensor.dtype", offset_of!(DLTensor, dtype)),
        ("DLTensor.shape", offset_of!(DLTensor, shape)),
        ("DLTensor.strides", offset_of!(DLTensor, strides)),
        ("DLTensor.byte_offset", offset_of!(DLTensor, byte_offset)),
        ("khub_call", size_of::<KhubCall>()),
        ("khub_call.flags", offset_of!(KhubCall, flags)),
        ("khub_call.stream", offset_of!(KhubCall, stream)),
        ("khub_call.error", offset_of!(KhubCall, error)),
        ("khub_call.error_capacity", offset_of!(KhubCall, error_capacity)),
        ("khub_function", size_of::<KhubFunction>()),
        ("khub_function.signature", offset_of!(KhubFunction, signature)),
        ("khub_function.fn", offset_of!(KhubFunction, func)),
        ("khub_function.selftest", offset_of!(KhubFunction, selftest)),
        ("khub_kernel_desc", size_of::<KhubKernelDesc>()),
        ("khub_kernel_desc.abi_minor", offset_of!(KhubKernelDesc, abi_minor)),
        ("khub_kernel_desc.struct_size", offset_of!(KhubKernelDesc, struct_size)),
        ("khub_kernel_desc.name", offset_of!(KhubKernelDesc, name)),
        ("khub_kernel_desc.version", offset_of!(KhubKernelDesc, version)),
        ("khub_kernel_desc.backend", offset_of!(KhubKernelDesc, backend)),
        ("khub_kernel_desc.function_size", offset_of!(KhubKernelDesc, function_size)),
        ("khub_kernel_desc.function_count", offset_of!(KhubKernelDesc, function_count)),
        ("khub_kernel_desc.functions", offset_of!(KhubKernelDesc, functions)),
        ("KHUB_KERNEL_ABI_MAJOR", khub::abi::ABI_MAJOR as usize),
        ("KHUB_KERNEL_ABI_MINOR", khub::abi::ABI_MINOR as usize),
        ("KHUB_ERR_SELFTEST_FAILED", khub::abi::ERR_SELFTEST_FAILED as usize),
    ];
    for (name, value) in rust {
        assert_eq!(c.get(name), Some(&value), "{name}: C says {:?}, Rust says {value}", c.get(name));
    }
    assert_eq!(c.len(), rust.len(), "every C value is checked");
}

#[test]
fn the_header_is_valid_cpp_and_the_entry_has_c_linkage() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("k.cpp");
    let lib = dir.path().join("k.so");
    std::fs::write(
        &src,
        r#"#include "khub_kernel.h"
static khub_status f(const khub_call* c, DLTensor* o) { (void)o; return khub_fail(c, KHUB_OK, ""); }
static const khub_function functions[] = { { "f", "(mut tensor)", (khub_fn_ptr)f, nullptr } };
KHUB_DEFINE_KERNEL("k", "1.0.0", "cpu", functions)
"#,
    )
    .unwrap();
    let ok = Command::new("c++")
        .args(["-std=c++11", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-I"])
        .arg(common::repo().join("include"))
        .arg("-o")
        .arg(&lib)
        .arg(&src)
        .status()
        .unwrap();
    assert!(ok.success(), "the header must compile as C++11");
    let info = khub::inspect::inspect_file(&lib).unwrap();
    assert!(info.exports.iter().any(|e| e == "khub_kernel_entry"), "{:?}", info.exports);
    let d = khub::load::describe_library(&lib).unwrap();
    assert_eq!((d.name.as_str(), d.functions.len()), ("k", 1));
}
