//! kernels-example packaged by khub: numerics of every CPU variant this machine runs against
//! a scalar reference written here in Rust, resolution per simulated CPU level, and the
//! `package`, `inspect`, `load`, `selftest` and `bench` commands.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

mod common;

use common::{example_release, khub};
use khub::abi::{DLTensor, KhubCall, Status};
use khub::bench::HostTensor;
use khub::host::{HostFacts, ProbeOptions};
use khub::load::Arg;
use khub::platform::X86Level;
use khub::release::Release;
use khub::resolve::{Preferences, resolve};

/// Relative tolerance for every function: |got - ref| <= TOL * max(1, |ref|). The kernels
/// use a polynomial exp with ~2e-7 relative error and f32 arithmetic throughout.
const TOL: f64 = 1e-5;

type Unary = unsafe extern "C" fn(*const KhubCall, *mut DLTensor, *const DLTensor) -> Status;

fn call() -> KhubCall {
    KhubCall {
        struct_size: std::mem::size_of::<KhubCall>() as u32,
        flags: 0,
        stream: std::ptr::null_mut(),
        error: std::ptr::null_mut(),
        error_capacity: 0,
    }
}

fn data(n: usize, seed: u64) -> impl FnMut(usize) -> f32 {
    let mut s = seed | 1;
    move |_| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 40) as f64 / (1u64 << 24) as f64 * 16.0 - 8.0) as f32 * (if n > 0 { 1.0 } else { 0.0 })
    }
}

fn max_rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).abs() / w.abs().max(1.0))
        .fold(0.0, f64::max)
}

fn silu(a: f64) -> f64 {
    a / (1.0 + (-a).exp())
}

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

/// The CPU variants this machine can run.
fn runnable_variants() -> Vec<String> {
    let host = HostFacts::detect(&ProbeOptions::with_env(khub::host::Environment::empty()).unwrap())
        .unwrap()
        .facts;
    let r = Release::open(example_release()).unwrap();
    resolve(r.manifest(), &host, &Preferences::default())
        .accepted()
        .map(|c| c.id.clone())
        .collect()
}

#[test]
fn every_runnable_variant_matches_the_scalar_reference() {
    let r = Release::open(example_release()).unwrap();
    let variants = runnable_variants();
    assert!(variants.iter().any(|v| v == "cpu-x86_64-v1-linux"), "{variants:?}");
    for id in &variants {
        let k = r.load_variant(id).unwrap();
        for &(rows, d) in &[(1usize, 1usize), (3, 7), (17, 4096), (64, 1000)] {
            // silu_and_mul: x [rows, 2d] -> out [rows, d].
            let x = HostTensor::from_fn(&[rows as i64, 2 * d as i64], data(1, (rows * d) as u64));
            let mut out = HostTensor::zeros(&[rows as i64, d as i64]);
            let f = k.function::<Unary>("silu_and_mul").unwrap();
            // SAFETY: live CPU tensors of the documented shapes.
            assert_eq!(unsafe { (f.get())(&call(), out.dl_mut(), x.dl()) }, 0);
            let want: Vec<f64> = (0..rows)
                .flat_map(|r| {
                    let row = &x.data()[r * 2 * d..(r + 1) * 2 * d];
                    (0..d).map(move |j| silu(row[j] as f64) * row[d + j] as f64)
                })
                .collect();
            let e = max_rel_err(out.data(), &want);
            assert!(e <= TOL, "{id} silu_and_mul [{rows}, {d}]: error {e:e}");

            // gelu, through the generic path.
            let mut out = HostTensor::zeros(&[rows as i64, d as i64]);
            let xs = HostTensor::from_fn(&[rows as i64, d as i64], data(1, 99 + d as u64));
            // SAFETY: live CPU tensors.
            unsafe { k.call("gelu", &[Arg::TensorMut(out.dl_mut()), Arg::Tensor(xs.dl())], std::ptr::null_mut()) }.unwrap();
            let want: Vec<f64> = xs.data().iter().map(|&v| gelu(v as f64)).collect();
            let e = max_rel_err(out.data(), &want);
            assert!(e <= TOL, "{id} gelu [{rows}, {d}]: error {e:e}");

            // rms_norm with eps 1e-6.
            let w = HostTensor::from_fn(&[d as i64], data(1, 7));
            let mut out = HostTensor::zeros(&[rows as i64, d as i64]);
            // SAFETY: live CPU tensors.
            unsafe {
                k.call(
                    "rms_norm",
                    &[
                        Arg::TensorMut(out.dl_mut()),
                        Arg::Tensor(xs.dl()),
                        Arg::Tensor(w.dl()),
                        Arg::F32(1e-6),
                    ],
                    std::ptr::null_mut(),
                )
            }
            .unwrap();
            let want: Vec<f64> = (0..rows)
                .flat_map(|r| {
                    let row: Vec<f64> = xs.data()[r * d..(r + 1) * d].iter().map(|&v| v as f64).collect();
                    let ms = row.iter().map(|v| v * v).sum::<f64>() / d as f64;
                    let inv = 1.0 / (ms + 1e-6).sqrt();
                    let w: Vec<f64> = w.data().iter().map(|&v| v as f64).collect();
                    row.into_iter().zip(w).map(move |(v, w)| v * inv * w)
                })
                .collect();
            let e = max_rel_err(out.data(), &want);
            assert!(e <= TOL, "{id} rms_norm [{rows}, {d}]: error {e:e}");
        }
        // The kernel's own self-tests agree.
        for name in ["silu_and_mul", "gelu", "rms_norm"] {
            let s = k.selftest(name, 7, 10_000).unwrap();
            assert!(s.passed && s.max_error <= TOL, "{id} {name}: {s:?}");
        }
    }
}

#[test]
fn bad_arguments_are_errors_not_crashes() {
    let r = Release::open(example_release()).unwrap();
    let k = r.load_variant("cpu-x86_64-v1-linux").unwrap();
    let x = HostTensor::zeros(&[2, 8]);
    let mut wrong = HostTensor::zeros(&[2, 3]);
    // SAFETY: live tensors with mismatched shapes; the kernel must refuse them.
    let e = unsafe {
        k.call(
            "silu_and_mul",
            &[Arg::TensorMut(wrong.dl_mut()), Arg::Tensor(x.dl())],
            std::ptr::null_mut(),
        )
    }
    .unwrap_err();
    assert!(e.to_string().contains("KHUB_ERR_INVALID_ARGUMENT"), "{e}");
    // SAFETY: NULL tensors; the kernel must refuse them.
    let e = unsafe {
        k.call(
            "gelu",
            &[Arg::TensorMut(std::ptr::null_mut()), Arg::Tensor(std::ptr::null())],
            std::ptr::null_mut(),
        )
    }
    .unwrap_err();
    assert!(e.to_string().contains("KHUB_ERR_INVALID_ARGUMENT"), "{e}");
}

#[test]
fn the_resolver_picks_the_level_each_host_supports() {
    let r = Release::open(example_release()).unwrap();
    for (level, want) in [
        (X86Level::V1, "cpu-x86_64-v1-linux"),
        (X86Level::V2, "cpu-x86_64-v1-linux"),
        (X86Level::V3, "cpu-x86_64-v3-linux"),
        (X86Level::V4, "cpu-x86_64-v4-linux"),
    ] {
        let env = khub::host::Environment::from_pairs([("KHUB_CPU_LEVEL", level.to_string())]);
        let host = HostFacts::detect(&ProbeOptions::with_env(env).unwrap()).unwrap().facts;
        let res = resolve(r.manifest(), &host, &Preferences::default());
        assert_eq!(res.best().map(|c| c.id.as_str()), Some(want), "{level}");
    }
}

#[test]
fn the_manifest_is_derived_from_the_binaries() {
    let m = Release::open(example_release()).unwrap().manifest().clone();
    assert_eq!(m.kernel.name, "activation");
    let names: Vec<&str> = m.exports.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["gelu", "rms_norm", "silu_and_mul"]);
    for v in &m.variants {
        let libc = v.libc.unwrap();
        assert!(
            libc.version.major == 2 && libc.version.minor >= 2,
            "glibc floor from symbol versions: {libc}"
        );
        let bytes = std::fs::read(example_release().join(v.files[0].path.as_str())).unwrap();
        assert_eq!(khub::verify::sha256(&bytes), v.files[0].sha256);
        assert_eq!(bytes.len() as u64, v.files[0].size);
    }
}

#[test]
fn a_declaration_that_differs_from_the_binary_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let kdir = dir.path().join("k");
    std::fs::create_dir_all(kdir.join("src")).unwrap();
    std::fs::copy(
        common::repo().join("kernels-example/src/activation.c"),
        kdir.join("src/activation.c"),
    )
    .unwrap();
    let config = std::fs::read_to_string(common::repo().join("kernels-example/kernel.toml")).unwrap();
    // Declare a signature the binary does not have.
    std::fs::write(
        kdir.join("kernel.toml"),
        config.replace("(mut tensor<f32>[n], tensor<f32>[n])", "(mut tensor<f32>[n], tensor<f32>[n], f32)"),
    )
    .unwrap();
    let opts = khub::package::BuildOptions {
        only: vec!["cpu-x86_64-v1-linux".into()],
        ..Default::default()
    };
    let e = khub::package::package(&kdir, &dir.path().join("out"), &opts, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("`gelu`: kernel.toml says"), "{e}");
    // An undeclared export is refused too.
    std::fs::write(kdir.join("kernel.toml"), config.replace("name = \"gelu\"", "name = \"gelu_fast\"")).unwrap();
    let e = khub::package::package(&kdir, &dir.path().join("out2"), &opts, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("gelu_fast"), "{e}");
    // --strict turns a missing nvcc into an error.
    let strict = khub::package::BuildOptions {
        strict: true,
        nvcc: Some("/nonexistent/nvcc".into()),
        ..Default::default()
    };
    std::fs::write(kdir.join("kernel.toml"), &config).unwrap();
    std::fs::write(kdir.join("src/activation.cu"), "").unwrap();
    let e = khub::package::package(&kdir, &dir.path().join("out3"), &strict, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("cuda-sm80-sm90a-x86_64-linux") && e.contains("--strict"), "{e}");
}

#[test]
fn cli_load_selftest_bench_and_inspect() {
    let rel = example_release().to_str().unwrap().to_owned();
    let out = khub(&["load", &rel, "--json"], &[("KHUB_CPU_LEVEL", "x86-64-v1")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["variant"], "cpu-x86_64-v1-linux");
    assert_eq!(doc["abi"], "1.0");
    assert_eq!(doc["exports"].as_array().unwrap().len(), 3);
    assert_eq!(doc["files"][0]["sha256"].as_str().unwrap().len(), 64);

    let out = khub(&["selftest", &rel], &[("KHUB_CPU_LEVEL", "x86-64-v1")]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches("  pass  ").count(), 3, "{text}");

    let out = khub(
        &["bench", &rel, "gelu", "--size", "100000", "--iters", "3", "--json"],
        &[("KHUB_CPU_LEVEL", "x86-64-v1")],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(doc["gb-per-s"].as_f64().unwrap() > 0.0);
    assert_eq!(doc["bytes"], 800_000);

    let lib = format!("{rel}/variants/cpu-x86_64-v1-linux/libactivation.so");
    let out = khub(&["inspect", &lib, "--json"], &[]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["descriptor"]["name"], "activation");
    assert!(doc["exports"].as_array().unwrap().iter().any(|e| e == "khub_kernel_entry"));
    assert!(doc["glibc-floor"].as_str().unwrap().starts_with("2."));

    // A library that is not a kernel is described as such, without crashing khub.
    let out = khub(&["inspect", "/bin/sh"], &[]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("not a loadable khub kernel"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
