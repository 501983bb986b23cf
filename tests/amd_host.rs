//! AMD host detection on KFD topology trees (`tests/data/kfd/`, described in
//! `tests/data/README.md`): devices, ROCm versions and the source of each fact, the
//! `HSA_OVERRIDE_GFX_VERSION` override on probed devices, and what the resolver makes of
//! the detected hosts.
//!
//! Each test points `ProbeOptions::root` at a fixture, with an explicit environment
//! snapshot, so the real `/sys` and `/opt` are never read and the process environment is
//! never changed. No HIP runtime is needed: the probe reads files and loads nothing.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

use std::path::{Path, PathBuf};

use khub::host::probe::{hip_runtime_version, parse_hip_soname, rocm_user_space_version};
use khub::host::{Detected, Environment, FactSource, HostFacts, ProbeOptions};
use khub::manifest::Manifest;
use khub::platform::{FeatureState, MajorMinor};
use khub::resolve::{Preferences, resolve};

fn fixture(machine: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/kfd").join(machine)
}

fn detect_at(root: &Path, env: &[(&str, &str)]) -> Detected {
    let mut options = ProbeOptions::with_env(Environment::from_pairs(env.iter().copied())).unwrap();
    options.root = root.to_owned();
    HostFacts::detect(&options).unwrap()
}

fn detect(machine: &str, env: &[(&str, &str)]) -> Detected {
    detect_at(&fixture(machine), env)
}

/// (node, target id) of every detected AMD device.
fn devices(d: &Detected) -> Vec<(Option<u32>, String)> {
    d.facts
        .rocm
        .as_ref()
        .map(|r| r.devices.iter().map(|dev| (dev.node, dev.target.to_string())).collect())
        .unwrap_or_default()
}

fn probe_method(d: &Detected, fact: &str) -> String {
    match &d.sources[fact] {
        FactSource::Probe { method } => method.clone(),
        other => panic!("{fact} should be probed, is {other:?}"),
    }
}

#[test]
fn mi250x_has_eight_gcds_and_rocm_5() {
    let d = detect("mi250x", &[]);
    let expected: Vec<(Option<u32>, String)> = (1..=8).map(|n| (Some(n), "gfx90a".to_owned())).collect();
    assert_eq!(devices(&d), expected);
    let rocm = d.facts.rocm.as_ref().unwrap();
    assert_eq!(rocm.version, Some(MajorMinor::new(5, 2)));
    // sysfs cannot tell the process's xnack and sramecc modes: both stay unknown.
    assert!(
        rocm.devices
            .iter()
            .all(|dev| dev.target.xnack == FeatureState::Any && dev.target.sramecc == FeatureState::Any)
    );
    assert!(probe_method(&d, "rocm.version").ends_with("opt/rocm/.info/version"));
    assert!(probe_method(&d, "rocm.devices").contains("topology/nodes gfx_target_version"));
}

#[test]
fn mi300x_skips_both_cpu_sockets() {
    let d = detect("mi300x", &[]);
    let expected: Vec<(Option<u32>, String)> = (2..=9).map(|n| (Some(n), "gfx942".to_owned())).collect();
    assert_eq!(devices(&d), expected);
    assert_eq!(d.facts.rocm.as_ref().unwrap().version, Some(MajorMinor::new(6, 3)));
}

#[test]
fn rx7900_reads_the_rocm_version_from_the_hip_runtime_file_name() {
    let d = detect("rx7900", &[]);
    assert_eq!(devices(&d), [(Some(1), "gfx1100".to_owned())]);
    assert_eq!(d.facts.rocm.as_ref().unwrap().version, Some(MajorMinor::new(5, 7)));
    let method = probe_method(&d, "rocm.version");
    assert!(
        method.contains("usr/lib/x86_64-linux-gnu/libamdhip64.so.5.7.31921") && method.contains("not loaded"),
        "{method}"
    );
}

#[test]
fn strix_halo_apu_is_gfx1151_with_rocm_6_4() {
    let d = detect("strix-halo", &[]);
    assert_eq!(devices(&d), [(Some(1), "gfx1151".to_owned())]);
    assert_eq!(d.facts.rocm.as_ref().unwrap().version, Some(MajorMinor::new(6, 4)));
}

#[test]
fn strix_halo_resolves_to_gfx11_generic_code() {
    // The sample release has exact gfx90a/gfx942 and gfx1100/gfx1101 code, and a
    // generic build (gfx9-4-generic, gfx11-generic) for ROCm 6.3 that declares 6.4
    // compatible. gfx1151 is only reachable through gfx11-generic.
    let manifest =
        Manifest::from_bytes(&std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/sample-release/khub.toml")).unwrap())
            .unwrap();
    let d = detect("strix-halo", &[]);
    let r = resolve(&manifest, &d.facts, &Preferences::default());
    let best = r.best().expect("a variant fits");
    assert_eq!(best.id, "rocm63-generic-x86_64-linux");
    let score = best.score().unwrap();
    assert_eq!(score.device.name(), "generic");
    assert_eq!(score.matched.as_deref(), Some("gfx11-generic"));
}

#[test]
fn hsa_override_turns_a_probed_gfx1103_into_gfx1100() {
    let d = detect("phoenix", &[]);
    assert_eq!(devices(&d), [(Some(1), "gfx1103".to_owned())]);
    assert_eq!(d.facts.rocm.as_ref().unwrap().version, Some(MajorMinor::new(6, 2)));

    let d = detect("phoenix", &[("HSA_OVERRIDE_GFX_VERSION", "11.0.0")]);
    // The node stays the probed one; the processor is what the runtime will present.
    assert_eq!(devices(&d), [(Some(1), "gfx1100".to_owned())]);
    assert_eq!(
        d.sources["rocm.devices"],
        FactSource::Env {
            var: "HSA_OVERRIDE_GFX_VERSION".into()
        }
    );
    // The version is still the probed one.
    assert_eq!(d.facts.rocm.as_ref().unwrap().version, Some(MajorMinor::new(6, 2)));

    // Every device takes the override, as the HSA runtime applies it to every agent.
    let d = detect("mi250x", &[("HSA_OVERRIDE_GFX_VERSION", "9.4.2")]);
    assert!(devices(&d).iter().all(|(_, t)| t == "gfx942"));
    assert_eq!(devices(&d).len(), 8);

    // A bad value is an error naming the variable, never a silent fallback.
    let mut options = ProbeOptions::with_env(Environment::from_pairs([("HSA_OVERRIDE_GFX_VERSION", "11")])).unwrap();
    options.root = fixture("phoenix");
    let e = HostFacts::detect(&options).unwrap_err().to_string();
    assert!(e.contains("HSA_OVERRIDE_GFX_VERSION"), "{e}");
}

#[test]
fn overrides_of_the_version_and_devices_win_over_the_probe() {
    let d = detect("mi300x", &[("KHUB_ROCM_VERSION", "6.4")]);
    assert_eq!(d.facts.rocm.as_ref().unwrap().version, Some(MajorMinor::new(6, 4)));
    assert_eq!(
        d.sources["rocm.version"],
        FactSource::Env {
            var: "KHUB_ROCM_VERSION".into()
        }
    );
    assert_eq!(devices(&d).len(), 8);

    let d = detect("mi300x", &[("KHUB_AMD_GPU_ARCH", "gfx942:sramecc+:xnack-")]);
    assert_eq!(devices(&d), [(None, "gfx942:sramecc+:xnack-".to_owned())]);
    let d = detect("mi300x", &[("KHUB_AMD_GPU_ARCH", "none")]);
    assert!(d.facts.rocm.is_none());
}

#[test]
fn rocm_path_points_at_another_install() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join(".info")).unwrap();
    std::fs::write(dir.path().join(".info/version"), "6.1.2-1\n").unwrap();
    let d = detect("mi300x", &[("ROCM_PATH", dir.path().to_str().unwrap())]);
    assert_eq!(d.facts.rocm.as_ref().unwrap().version, Some(MajorMinor::new(6, 1)));
    assert!(probe_method(&d, "rocm.version").starts_with(dir.path().to_str().unwrap()));
}

#[test]
fn a_gpu_without_rocm_user_space_is_found_with_an_unknown_version() {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("sys/class/kfd/kfd/topology/nodes/1");
    std::fs::create_dir_all(&node).unwrap();
    std::fs::copy(
        fixture("strix-halo").join("sys/class/kfd/kfd/topology/nodes/1/properties"),
        node.join("properties"),
    )
    .unwrap();
    let d = detect_at(dir.path(), &[]);
    assert_eq!(devices(&d), [(Some(1), "gfx1151".to_owned())]);
    assert_eq!(d.facts.rocm.as_ref().unwrap().version, None);
    match &d.sources["rocm.version"] {
        FactSource::Absent { why } => {
            assert!(
                why.contains(".info/version") && why.contains("libamdhip64") && why.contains("KHUB_ROCM_VERSION"),
                "{why}"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn no_gpu_agent_means_no_amd_gpu() {
    let d = detect("cpu-only", &[]);
    assert!(d.facts.rocm.is_none());
    match &d.sources["rocm"] {
        FactSource::Absent { why } => assert!(why.contains("no GPU node"), "{why}"),
        other => panic!("{other:?}"),
    }
    let empty = tempfile::tempdir().unwrap();
    let d = detect_at(empty.path(), &[]);
    assert!(d.facts.rocm.is_none());
    match &d.sources["rocm"] {
        FactSource::Absent { why } => assert!(why.contains("topology/nodes"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn hip_runtime_file_names() {
    assert_eq!(parse_hip_soname("libamdhip64.so.6.3.60301"), Some((6, Some(3))));
    assert_eq!(parse_hip_soname("libamdhip64.so.5"), Some((5, None)));
    assert_eq!(parse_hip_soname("libamdhip64.so"), None);
    assert_eq!(parse_hip_soname("libamdhip64.so.x"), None);
    assert_eq!(parse_hip_soname("libhsa-runtime64.so.1.5.0"), None);

    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("lib");
    std::fs::create_dir_all(&lib).unwrap();
    // A bare major is followed through its symbolic link to the versioned name.
    std::os::unix::fs::symlink("libamdhip64.so.6.4.60400", lib.join("libamdhip64.so.6")).unwrap();
    assert_eq!(hip_runtime_version(std::slice::from_ref(&lib)).unwrap().0, MajorMinor::new(6, 4));
    // A bare major that names nothing more says so.
    let bare = dir.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::write(bare.join("libamdhip64.so.7"), "").unwrap();
    let e = hip_runtime_version(std::slice::from_ref(&bare)).unwrap_err();
    assert!(e.contains("libamdhip64.so.7") && e.contains("minor"), "{e}");
    // The highest version in the first directory that has one wins.
    std::fs::write(bare.join("libamdhip64.so.6.2.41133"), "").unwrap();
    std::fs::write(bare.join("libamdhip64.so.6.10.1"), "").unwrap();
    assert_eq!(
        hip_runtime_version(&[dir.path().join("none"), bare.clone()]).unwrap().0,
        MajorMinor::new(6, 10)
    );

    // .info/version comes first; the file name is the fallback.
    let root = dir.path().join("root");
    let multiarch = root.join(format!("usr/lib/{}-linux-gnu", std::env::consts::ARCH));
    std::fs::create_dir_all(&multiarch).unwrap();
    std::fs::write(multiarch.join("libamdhip64.so.5.2.21153"), "").unwrap();
    let (v, how) = rocm_user_space_version(&root, None).unwrap();
    assert_eq!(v, MajorMinor::new(5, 2));
    assert!(how.contains("libamdhip64.so.5.2.21153"), "{how}");
    std::fs::create_dir_all(root.join("opt/rocm/.info")).unwrap();
    std::fs::write(root.join("opt/rocm/.info/version"), "6.3.0\n").unwrap();
    let (v, how) = rocm_user_space_version(&root, None).unwrap();
    assert_eq!(v, MajorMinor::new(6, 3));
    assert!(how.ends_with(".info/version"), "{how}");
}
