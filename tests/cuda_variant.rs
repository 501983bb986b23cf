//! The CUDA variant of kernels-example, built with nvcc when one is available (CI installs
//! it from PyPI): the device code khub reads from the library equals what the manifest
//! declares and what `cuobjdump` lists. On a machine with an NVIDIA GPU the variant is also
//! loaded and its self-tests run on the device; elsewhere that part is skipped, saying so.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

mod common;

use std::path::PathBuf;
use std::process::Command;

use khub::host::{HostFacts, ProbeOptions};
use khub::platform::{Backend, CudaArch};

const CUDA_VARIANT: &str = "cuda-sm80-sm90a-x86_64-linux";

/// nvcc from KHUB_NVCC, PATH or CUDA_HOME (the packager's own search).
fn nvcc() -> Option<PathBuf> {
    khub::package::find_nvcc(None)
}

/// `cuobjdump` next to nvcc, or on PATH.
fn cuobjdump(nvcc: &std::path::Path) -> Option<PathBuf> {
    let beside = nvcc.with_file_name("cuobjdump");
    if beside.is_file() {
        return Some(beside);
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("cuobjdump"))
        .find(|p| p.is_file())
}

/// Parses `cuobjdump --list-elf --list-ptx` ("ELF file    1: x.1.sm_80.cubin",
/// "PTX file    1: x.1.sm_90.ptx") into the set of device code, as khub names it. cuobjdump
/// writes PTX as sm_XY; khub writes compute_XY.
fn cuobjdump_code(out: &str) -> std::collections::BTreeSet<String> {
    out.lines()
        .filter_map(|l| {
            let name = l.rsplit(": ").next()?.trim();
            let (stem, ext) = name.rsplit_once('.')?;
            let arch = stem.rsplit('.').next()?;
            match ext {
                "cubin" => Some(arch.to_owned()),
                "ptx" => Some(arch.replacen("sm_", "compute_", 1)),
                _ => None,
            }
        })
        .collect()
}

#[test]
fn the_cuda_variant_embeds_exactly_what_the_manifest_declares() {
    let Some(nvcc) = nvcc() else {
        eprintln!(
            "skipped: nvcc not found (KHUB_NVCC, PATH, CUDA_HOME); `pip install nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-crt nvidia-cuda-cuobjdump` provides one"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let opts = khub::package::BuildOptions {
        strict: true,
        nvcc: Some(nvcc.clone()),
        only: vec![CUDA_VARIANT.into()],
        ..Default::default()
    };
    let (manifest, _) = khub::package::package(&common::repo().join("kernels-example"), dir.path(), &opts, &mut |l| {
        eprintln!("{l}")
    })
    .expect("package the CUDA variant");
    let v = manifest.variant(CUDA_VARIANT).unwrap();
    assert_eq!(v.backend, Backend::Cuda);
    let cuda = v.cuda.as_ref().unwrap();
    let declared: Vec<String> = cuda.code.iter().map(CudaArch::to_string).collect();
    assert_eq!(declared, ["sm_80", "sm_90a", "compute_90"]);
    assert!(cuda.toolkit.major >= 12, "toolkit from nvcc --version: {}", cuda.toolkit);

    let lib = dir.path().join(v.library.as_str());
    let inspected: Vec<String> = khub::inspect::inspect_file(&lib)
        .unwrap()
        .cuda_code()
        .iter()
        .map(CudaArch::to_string)
        .collect();
    assert_eq!(inspected, declared, "khub inspect vs manifest");

    let Some(cuobjdump) = cuobjdump(&nvcc) else {
        eprintln!("cuobjdump not found: cross-check skipped (pip install nvidia-cuda-cuobjdump)");
        return;
    };
    let out = Command::new(&cuobjdump)
        .args(["--list-elf", "--list-ptx"])
        .arg(&lib)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed = cuobjdump_code(&String::from_utf8_lossy(&out.stdout));
    let ours: std::collections::BTreeSet<String> = inspected.into_iter().collect();
    assert_eq!(ours, listed, "khub inspect vs cuobjdump");

    // On a machine with an NVIDIA GPU the variant runs; elsewhere say why not.
    let host = HostFacts::detect(&ProbeOptions::from_env().unwrap()).unwrap().facts;
    let has_gpu = host.cuda.as_ref().is_some_and(|c| !c.devices.is_empty());
    if !has_gpu {
        eprintln!("skipped: no NVIDIA GPU here, so the CUDA self-tests and bandwidth check do not run");
        return;
    }
    let release = khub::Release::open(dir.path()).unwrap();
    let kernel = release.load_variant(CUDA_VARIANT).expect("load the CUDA variant on a GPU host");
    for f in ["silu_and_mul", "gelu", "rms_norm"] {
        let r = kernel.selftest(f, 42, 1 << 22).unwrap();
        eprintln!("GPU self-test {f}: passed={} max error {:e}", r.passed, r.max_error);
        assert!(r.passed, "{r:?}");
    }
}

#[test]
fn cuobjdump_listing_parses() {
    let out = "ELF file    1: libactivation.1.sm_80.cubin\nELF file    2: libactivation.2.sm_90a.cubin\nPTX file    1: libactivation.1.sm_90.ptx\n";
    let got: Vec<String> = cuobjdump_code(out).into_iter().collect();
    assert_eq!(got, ["compute_90", "sm_80", "sm_90a"]);
}
