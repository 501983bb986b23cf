//! `khub explain` and `khub host` end to end: the real binary, the sample release with 17
//! variants across CPU, CUDA, ROCm and Metal, and simulated hosts.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `khub` with a clean khub environment: no overrides leak in from the caller.
fn khub(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_khub"));
    cmd.args(args).current_dir(root());
    for var in khub::env::ALL {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run khub")
}

fn explain_json(host: &str) -> Value {
    let out = khub(&["explain", "examples/sample-release", "--host", host, "--json"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("explain prints JSON")
}

/// The verdict and reason of every candidate, by id.
fn verdicts(doc: &Value) -> Vec<(String, String)> {
    doc["resolution"]["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let what = if c["verdict"] == "accepted" {
                format!("accepted {}", c["score"]["device"].as_str().unwrap())
            } else {
                c["reason"]["reason"].as_str().unwrap().to_owned()
            };
            (c["id"].as_str().unwrap().to_owned(), what)
        })
        .collect()
}

fn verdict_of<'a>(v: &'a [(String, String)], id: &str) -> &'a str {
    &v.iter().find(|(i, _)| i == id).unwrap_or_else(|| panic!("no {id}")).1
}

#[test]
fn h100_picks_the_arch_specific_cubin() {
    let doc = explain_json("examples/hosts/h100.toml");
    assert_eq!(doc["chosen"], "cu128-sm80-sm90a-x86_64-linux");
    let v = verdicts(&doc);
    assert_eq!(v[0].1, "accepted arch-specific");
    assert_eq!(verdict_of(&v, "cu118-sm70-x86_64-linux"), "accepted jit");
    assert_eq!(verdict_of(&v, "cu130-sm90a-sm100a-x86_64-linux"), "DriverTooOld");
    assert_eq!(verdict_of(&v, "cu126-sm80-dyn-x86_64-linux"), "RuntimeMissing");
    assert_eq!(verdict_of(&v, "cu129-sm100f-sm120f-x86_64-linux"), "NoDeviceCode");
    assert_eq!(verdict_of(&v, "rocm63-gfx90a-gfx942-x86_64-linux"), "BackendUnavailable");
    assert_eq!(verdict_of(&v, "cpu-x86_64-musl"), "LibcMismatch");
    // Every variant appears exactly once.
    assert_eq!(v.len(), 17);
}

#[test]
fn mi300x_prefers_exact_over_generic() {
    let doc = explain_json("examples/hosts/mi300x.toml");
    let v = verdicts(&doc);
    assert_eq!(v[0], ("rocm63-gfx90a-gfx942-x86_64-linux".into(), "accepted exact".into()));
    assert_eq!(v[1], ("rocm63-generic-x86_64-linux".into(), "accepted generic".into()));
    assert_eq!(verdict_of(&v, "rocm64-gfx1100-x86_64-linux"), "RocmMinorNotDeclared");
    assert_eq!(verdict_of(&v, "rocm63-gfx90a-xnack-x86_64-linux"), "NoDeviceCode");
}

#[test]
fn a_cpu_only_laptop_gets_the_highest_level_it_runs() {
    let doc = explain_json("examples/hosts/laptop.toml");
    let v = verdicts(&doc);
    assert_eq!(doc["chosen"], "cpu-x86_64-v3-linux");
    assert_eq!(v[1].0, "cpu-x86_64-v1-linux");
    assert_eq!(verdict_of(&v, "cpu-x86_64-v4-linux"), "CpuLevelTooLow");
}

#[test]
fn blackwell_and_strix_halo_use_family_and_generic_code() {
    let doc = explain_json("examples/hosts/rtx5090.toml");
    assert_eq!(doc["chosen"], "cu129-sm100f-sm120f-x86_64-linux");
    let doc = explain_json("examples/hosts/strix-halo.toml");
    assert_eq!(doc["chosen"], "rocm63-generic-x86_64-linux");
    assert_eq!(
        verdict_of(&verdicts(&doc), "rocm63-gfx90a-gfx942-x86_64-linux"),
        "RocmMinorNotDeclared"
    );
}

#[test]
fn human_output_reads_at_a_glance() {
    let out = khub(&["explain", "examples/sample-release", "--host", "examples/hosts/h100.toml"], &[]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("activation 0.3.1: 17 variants, 5 accepted"), "{text}");
    assert!(text.contains("=>  1. cu128-sm80-sm90a-x86_64-linux"), "{text}");
    assert!(
        text.contains("DriverTooOld: built with CUDA 13.0, driver supports CUDA 12.8"),
        "{text}"
    );
    assert!(text.contains("chosen: cu128-sm80-sm90a-x86_64-linux"), "{text}");
}

#[test]
fn preferences_change_the_choice() {
    let out = khub(
        &[
            "explain",
            "examples/sample-release",
            "--host",
            "examples/hosts/h100.toml",
            "--prefer",
            "backend=cpu",
            "--json",
        ],
        &[],
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["chosen"], "cpu-x86_64-v4-linux");
    let out = khub(
        &[
            "explain",
            "examples/sample-release",
            "--host",
            "examples/hosts/rtx5090.toml",
            "--prefer",
            "no-jit,variant=cu128-sm80-sm90a-x86_64-linux",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "nothing fits: exit 1");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("JitForbidden"), "{text}");
    let out = khub(&["explain", "examples/sample-release", "--prefer", "fastest"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown preference `fastest`"));
}

#[test]
fn nothing_fits_reports_the_closest_miss_and_the_host() {
    let out = khub(
        &["explain", "examples/sample-release", "--host", "examples/hosts/laptop.toml"],
        &[("KHUB_LIBC", "glibc 2.12"), ("KHUB_CPU_LEVEL", "x86-64-v1")],
    );
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("no variant of activation 0.3.1 runs on this host (linux x86_64, glibc 2.12, x86-64-v1, no GPU); closest: `cpu-x86_64-v1-linux`, GlibcTooOld: needs glibc 2.17, host has 2.12"),
        "{text}"
    );
}

#[test]
fn bad_manifests_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("khub.toml");
    let text = std::fs::read_to_string(root().join("examples/sample-release/khub.toml")).unwrap();
    std::fs::write(
        &path,
        text.replacen("variants/cpu-x86_64-v1-linux/libactivation.so\"", "../../etc/passwd\"", 1),
    )
    .unwrap();
    let out = khub(&["explain", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("khub.toml") && err.contains("`..`"), "{err}");
    let out = khub(&["explain", "does/not/exist"], &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read does/not/exist"));
}

#[test]
fn host_reports_sources_and_overrides() {
    let out = khub(
        &["host", "--host", "examples/hosts/h100.toml", "--json"],
        &[("KHUB_CUDA_ARCH", "8.0")],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["facts"]["cuda"]["driver"], "12.8");
    assert_eq!(doc["facts"]["cuda"]["devices"][0]["cc"], "8.0");
    assert_eq!(doc["sources"]["cuda.devices"]["kind"], "env");
    assert_eq!(doc["sources"]["libc"]["kind"], "profile");
    let out = khub(
        &["host"],
        &[
            ("KHUB_LIBCUDA", "/nonexistent/libcuda.so.1"),
            ("KHUB_LIBNVML", "/nonexistent/libnvml.so"),
        ],
    );
    let text = String::from_utf8(out.stdout).unwrap();
    if !Path::new("/proc/driver/nvidia/version").exists() {
        assert!(
            text.contains("nvidia gpu    none  [none: /nonexistent/libcuda.so.1 not loaded"),
            "{text}"
        );
    }
    assert!(text.contains("os            linux"), "{text}");
}
