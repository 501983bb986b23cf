//! Packaging HIP variants: the packager checks each binary against `kernel.toml` (the set
//! of AMD targets it holds, the ROCm major of the HIP runtime it links) and skips a
//! variant whose toolchain is missing or cannot build a target, with a warning, or fails
//! under `strict`.
//!
//! The tests that compile need clang (clang-19) and the HIP runtime (libamdhip64-dev) and
//! are skipped with a message otherwise.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

mod common;

use std::path::{Path, PathBuf};

use khub::package::{BuildOptions, PackageError, find_hip, hip_target_supported, package};

/// A copy of kernels-example whose kernel.toml has the CPU v1 variant and one rocm
/// variant with the given `rocm` table and flags.
fn kernel_with(dir: &Path, rocm: &str, flags: &str) -> PathBuf {
    let k = dir.join("kernel");
    common::copy_dir(&common::repo().join("kernels-example"), &k);
    let config = std::fs::read_to_string(k.join("kernel.toml")).unwrap();
    let head = &config[..config.find("[[variants]]").unwrap()];
    let text = format!(
        "{head}[[variants]]\nid = \"cpu\"\nbackend = \"cpu\"\nsources = [\"src/activation.c\"]\nlibs = [\"m\"]\n\n\
         [[variants]]\nid = \"hip\"\nbackend = \"rocm\"\nsources = [\"src/activation.hip\"]\nflags = {flags}\nrocm = {rocm}\n"
    );
    std::fs::write(k.join("kernel.toml"), text).unwrap();
    k
}

fn hip_here() -> bool {
    match find_hip(None) {
        Ok(_) => true,
        Err(why) => {
            eprintln!("skipped: no HIP toolchain ({why}); apt-get install clang-19 lld-19 libamdhip64-dev");
            false
        }
    }
}

#[test]
fn declared_targets_must_be_what_the_binary_holds() {
    if !hip_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // An extra --offload-arch among the flags puts a code object in the binary that
    // kernel.toml does not declare.
    let k = kernel_with(
        dir.path(),
        r#"{ targets = ["gfx90a", "gfx942"] }"#,
        r#"["-O3", "--offload-arch=gfx1100"]"#,
    );
    let e = package(&k, &dir.path().join("out"), &BuildOptions::default(), &mut |_| {}).unwrap_err();
    assert!(matches!(e, PackageError::Mismatch { ref variant, .. } if variant == "hip"), "{e}");
    let e = e.to_string();
    assert!(
        e.contains("declares AMD targets [gfx90a, gfx942], the binary holds code objects for [gfx1100, gfx90a, gfx942]"),
        "{e}"
    );
}

#[test]
fn the_declared_rocm_major_must_be_the_linked_runtimes() {
    let Ok(hip) = find_hip(None) else {
        hip_here();
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let other = format!("{}.0", hip.runtime.version.major + 1);
    let k = kernel_with(
        dir.path(),
        &format!(r#"{{ targets = ["gfx90a"], version = "{other}" }}"#),
        r#"["-O3"]"#,
    );
    let e = package(&k, &dir.path().join("out"), &BuildOptions::default(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("links libamdhip64.so.{}", hip.runtime.version.major)) && e.contains(&format!("declares ROCm {other}")),
        "{e}"
    );

    // A declared minor of the same major is the publisher's word, and `compatible` passes
    // through to the manifest.
    let same = format!("{}.{}", hip.runtime.version.major, hip.runtime.version.minor + 1);
    let k = kernel_with(
        dir.path(),
        &format!(
            r#"{{ targets = ["gfx90a"], version = "{same}", compatible = ["{}"] }}"#,
            hip.runtime.version
        ),
        r#"["-O3"]"#,
    );
    let (m, _) = package(&k, &dir.path().join("out2"), &BuildOptions::default(), &mut |_| {}).unwrap();
    let r = m.variant("hip").unwrap().rocm.clone().unwrap();
    assert_eq!(r.version.to_string(), same);
    assert_eq!(r.compatible, [hip.runtime.version]);
}

#[test]
fn a_target_the_compiler_does_not_know_skips_the_variant() {
    let Ok(hip) = find_hip(None) else {
        hip_here();
        return;
    };
    let target = "gfx9-4-generic".parse().unwrap();
    if hip_target_supported(&hip.clang, &target).is_ok() {
        eprintln!("skipped: {} builds gfx9-4-generic (LLVM 20 or newer)", hip.clang_version);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = kernel_with(dir.path(), r#"{ targets = ["gfx9-4-generic"] }"#, r#"["-O3"]"#);
    let mut log = Vec::new();
    let (m, report) = package(&k, &dir.path().join("out"), &BuildOptions::default(), &mut |l| {
        log.push(l.to_owned())
    })
    .unwrap();
    assert!(m.variant("hip").is_none());
    assert_eq!(report.skipped.len(), 1);
    assert!(
        report.skipped[0].1.contains("cannot build `gfx9-4-generic`"),
        "{:?}",
        report.skipped
    );
    assert!(log.iter().any(|l| l.starts_with("warning: skipping variant `hip`")), "{log:?}");
    let strict = BuildOptions {
        strict: true,
        ..Default::default()
    };
    let e = package(&k, &dir.path().join("out2"), &strict, &mut |_| {}).unwrap_err();
    assert!(matches!(e, PackageError::ToolchainMissing { .. }), "{e}");
}

#[test]
fn a_missing_hip_compiler_skips_the_variant_like_nvcc() {
    let dir = tempfile::tempdir().unwrap();
    let k = kernel_with(dir.path(), r#"{ targets = ["gfx90a"] }"#, r#"["-O3"]"#);
    let options = BuildOptions {
        hip: Some("/nonexistent/clang-19".into()),
        ..Default::default()
    };
    let (m, report) = package(&k, &dir.path().join("out"), &options, &mut |_| {}).unwrap();
    assert_eq!(m.variants.len(), 1);
    assert_eq!(report.skipped[0].0, "hip");
    assert!(report.skipped[0].1.contains("/nonexistent/clang-19"), "{:?}", report.skipped);
    let strict = BuildOptions { strict: true, ..options };
    let e = package(&k, &dir.path().join("out2"), &strict, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("variant `hip`") && e.contains("--strict"), "{e}");
}
