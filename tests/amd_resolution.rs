//! The packaged example under AMD host profiles, end to end: `khub package` builds
//! kernels-example's CPU, CUDA (when nvcc is found) and HIP variants; `khub explain --json`
//! under each profile in `examples/hosts/` must choose the right variant and give the right
//! reason for every other one; `khub fetch` and `khub load` through a directory registry
//! must pick the same variant.
//!
//! The HIP variants declare the ROCm version of the HIP runtime they were built against
//! (Debian's libamdhip64-dev: 5.2). Device-code decisions are checked with the host's ROCm
//! version set to the release's (`KHUB_ROCM_VERSION`), so they hold whatever HIP the
//! build found; version decisions are checked with the profiles' own versions and with
//! other majors and minors.
//!
//! Needs clang (clang-19) and the HIP runtime (libamdhip64-dev); skipped with a message
//! otherwise.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use khub::manifest::Manifest;
use khub::platform::{Backend, MajorMinor};
use serde_json::Value;

const EXACT: &str = "rocm-gfx90a-gfx942-gfx1100-x86_64-linux";
const XNACK: &str = "rocm-xnack-gfx90a-gfx942-x86_64-linux";
const GFX11_GENERIC: &str = "rocm-gfx11-generic-x86_64-linux";
const GFX94_GENERIC: &str = "rocm-gfx9-4-generic-x86_64-linux";
const CUDA: &str = "cuda-sm80-sm90a-x86_64-linux";

struct Packaged {
    dir: PathBuf,
    manifest: Manifest,
    skipped: Vec<(String, String)>,
    /// The ROCm version every HIP variant declares.
    rocm: MajorMinor,
}

/// Packages kernels-example once per test binary; `None` when no HIP toolchain is here.
fn packaged() -> Option<&'static Packaged> {
    static CELL: OnceLock<Option<Packaged>> = OnceLock::new();
    CELL.get_or_init(|| {
        if let Err(why) = khub::package::find_hip(None) {
            eprintln!("skipped: no HIP toolchain ({why}); apt-get install clang-19 lld-19 libamdhip64-dev");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("khub-test-amd-release-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (manifest, report) = khub::package::package(
            &common::repo().join("kernels-example"),
            &dir,
            &khub::package::BuildOptions::default(),
            &mut |l| eprintln!("{l}"),
        )
        .expect("package kernels-example");
        let rocm = manifest
            .variant(EXACT)
            .and_then(|v| v.rocm.as_ref())
            .expect("the exact HIP variant")
            .version;
        Some(Packaged {
            dir,
            manifest,
            skipped: report.skipped,
            rocm,
        })
    })
    .as_ref()
}

fn profile(name: &str) -> String {
    common::repo()
        .join("examples/hosts")
        .join(format!("{name}.toml"))
        .to_str()
        .unwrap()
        .to_owned()
}

/// `khub explain --json` on the release under a profile, with extra environment.
fn explain(p: &Packaged, host: &str, env: &[(&str, &str)], extra: &[&str]) -> Value {
    let host = profile(host);
    let mut args = vec!["explain", p.dir.to_str().unwrap(), "--host", &host, "--json"];
    args.extend_from_slice(extra);
    let out = common::khub(&args, env);
    // 0: chosen, 1: nothing fits; both print the document.
    assert!(matches!(out.status.code(), Some(0 | 1)), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Explains under the profile with its ROCm version set to the release's.
fn explain_at_release_rocm(p: &Packaged, host: &str) -> Value {
    let v = p.rocm.to_string();
    explain(p, host, &[("KHUB_ROCM_VERSION", &v)], &[])
}

fn candidates(doc: &Value) -> BTreeMap<String, Value> {
    doc["resolution"]["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["id"].as_str().unwrap().to_owned(), c.clone()))
        .collect()
}

fn chosen(doc: &Value) -> &str {
    doc["chosen"].as_str().unwrap_or("")
}

/// The rejection reason's name, or "accepted".
fn verdict(doc: &Value, id: &str) -> String {
    let c = &candidates(doc)[id];
    match c["verdict"].as_str().unwrap() {
        "accepted" => "accepted".to_owned(),
        _ => c["reason"]["reason"].as_str().unwrap().to_owned(),
    }
}

fn score(doc: &Value, id: &str) -> Value {
    candidates(doc)[id]["score"].clone()
}

fn has(p: &Packaged, id: &str) -> bool {
    p.manifest.variant(id).is_some()
}

/// Every candidate carries its decision: a score when accepted, a named reason with its
/// fields when rejected; and every variant of the release is a candidate.
fn assert_every_decision_explained(p: &Packaged, doc: &Value) {
    let c = candidates(doc);
    assert_eq!(c.len(), p.manifest.variants.len());
    for (id, cand) in &c {
        match cand["verdict"].as_str().unwrap() {
            "accepted" => assert!(cand["score"]["device"].is_string(), "{id}: {cand}"),
            "rejected" => assert!(cand["reason"]["reason"].is_string(), "{id}: {cand}"),
            other => panic!("{id}: verdict {other}"),
        }
    }
}

#[test]
fn the_release_holds_cpu_cuda_and_hip_variants() {
    let Some(p) = packaged() else { return };
    for id in [
        "cpu-x86_64-v1-linux",
        "cpu-x86_64-v3-linux",
        "cpu-x86_64-v4-linux",
        EXACT,
        XNACK,
        GFX11_GENERIC,
    ] {
        assert!(has(p, id), "{id} missing; skipped: {:?}", p.skipped);
    }
    // CUDA when nvcc is here (CI installs it), skipped with a reason otherwise.
    let nvcc = khub::package::find_nvcc(None).and_then(|n| khub::package::nvcc_version(&n));
    assert_eq!(has(p, CUDA), nvcc.is_some(), "skipped: {:?}", p.skipped);
    // gfx9-4-generic needs LLVM 20: clang-19 cannot build it, and says so.
    if !has(p, GFX94_GENERIC) {
        let (_, why) = p.skipped.iter().find(|(id, _)| id == GFX94_GENERIC).expect("skipped with a reason");
        assert!(why.contains("gfx9-4-generic"), "{why}");
    }
    // The manifest's targets are what the binaries hold; the version is the HIP runtime's.
    let hip = khub::package::find_hip(None).unwrap();
    let targets = |id: &str| -> Vec<String> {
        let r = p.manifest.variant(id).unwrap().rocm.as_ref().unwrap();
        assert_eq!(r.version, hip.runtime.version, "{id}");
        r.targets.iter().map(ToString::to_string).collect()
    };
    assert_eq!(targets(EXACT), ["gfx1100", "gfx90a", "gfx942"]);
    assert_eq!(targets(XNACK), ["gfx90a:xnack+", "gfx942:sramecc+:xnack-"]);
    assert_eq!(targets(GFX11_GENERIC), ["gfx11-generic"]);
    for v in &p.manifest.variants {
        assert_eq!(v.rocm.is_some(), v.backend == Backend::Rocm, "{}", v.id);
    }
    // And `khub inspect` reads the same from the binary.
    let lib = p.dir.join(p.manifest.variant(GFX11_GENERIC).unwrap().library.as_str());
    let out = common::khub(&["inspect", lib.to_str().unwrap(), "--json"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["hip-targets"], serde_json::json!(["gfx11-generic"]));
    assert_eq!(doc["descriptor"]["backend"], "rocm");
    let device = doc["hip-entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "hipv4")
        .unwrap()
        .clone();
    assert_eq!(device["elf"]["code-object-version"], 6);
    assert_eq!(device["elf"]["generic-version"], 1);
}

#[test]
fn mi250x_takes_exact_gfx90a_and_refuses_pinned_xnack_and_other_processors() {
    let Some(p) = packaged() else { return };
    let doc = explain_at_release_rocm(p, "mi250x");
    assert_every_decision_explained(p, &doc);
    assert_eq!(chosen(&doc), EXACT);
    let s = score(&doc, EXACT);
    assert_eq!(
        (s["device"].as_str(), s["matched"].as_str(), s["any-features"].as_bool()),
        (Some("exact"), Some("gfx90a"), Some(true))
    );
    // xnack+ needs the device to be known to run with xnack on; sysfs cannot tell.
    assert_eq!(verdict(&doc, XNACK), "FeatureMismatch");
    let reason = &candidates(&doc)[XNACK]["reason"];
    assert!(reason["device"].as_str().unwrap().contains("gfx90a"), "{reason}");
    // gfx11-generic code does not run on gfx90a: no cross-processor compatibility.
    assert_eq!(verdict(&doc, GFX11_GENERIC), "NoDeviceCode");
    if has(p, GFX94_GENERIC) {
        assert_eq!(verdict(&doc, GFX94_GENERIC), "NoDeviceCode");
    }
    if has(p, CUDA) {
        // No NVIDIA GPU (or, first, a glibc older than the CUDA build needs).
        assert!(["BackendUnavailable", "GlibcTooOld"].contains(&verdict(&doc, CUDA).as_str()));
    }
    assert_eq!(verdict(&doc, "cpu-x86_64-v4-linux"), "CpuLevelTooLow");
    assert_eq!(verdict(&doc, "cpu-x86_64-v3-linux"), "accepted");
}

#[test]
fn xnack_pinned_code_is_accepted_when_the_mode_is_known() {
    let Some(p) = packaged() else { return };
    let doc = explain_at_release_rocm(p, "mi250x-xnack");
    assert_every_decision_explained(p, &doc);
    assert_eq!(verdict(&doc, XNACK), "accepted");
    let s = score(&doc, XNACK);
    assert_eq!(
        (s["device"].as_str(), s["matched"].as_str()),
        (Some("exact"), Some("gfx90a:xnack+"))
    );
    assert!(s.get("any-features").is_none(), "{s}");
    // Code that runs in either mode still ranks first (compat-rules.md §2.4).
    assert_eq!(chosen(&doc), EXACT);
    let order: Vec<&str> = doc["resolution"]["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(&order[..2], [EXACT, XNACK]);
    // Asked for, it is taken.
    let v = p.rocm.to_string();
    let doc = explain(
        p,
        "mi250x-xnack",
        &[("KHUB_ROCM_VERSION", &v)],
        &["--prefer", &format!("variant={XNACK}")],
    );
    assert_eq!(chosen(&doc), XNACK);
}

#[test]
fn mi300x_takes_exact_gfx942_over_any_generic_code() {
    let Some(p) = packaged() else { return };
    let doc = explain_at_release_rocm(p, "mi300x");
    assert_every_decision_explained(p, &doc);
    assert_eq!(chosen(&doc), EXACT);
    assert_eq!(score(&doc, EXACT)["matched"], "gfx942");
    // gfx942:sramecc+:xnack- pins both modes, unknown here.
    assert_eq!(verdict(&doc, XNACK), "FeatureMismatch");
    assert_eq!(verdict(&doc, GFX11_GENERIC), "NoDeviceCode");
    if has(p, GFX94_GENERIC) {
        // gfx942 is a member of gfx9-4-generic since version 1: accepted, ranked below.
        assert_eq!(verdict(&doc, GFX94_GENERIC), "accepted");
        assert_eq!(score(&doc, GFX94_GENERIC)["device"], "generic");
    }
}

#[test]
fn rx7900_prefers_exact_gfx1100_to_gfx11_generic() {
    let Some(p) = packaged() else { return };
    let doc = explain_at_release_rocm(p, "rx7900");
    assert_every_decision_explained(p, &doc);
    assert_eq!(chosen(&doc), EXACT);
    assert_eq!(score(&doc, EXACT)["device"], "exact");
    assert_eq!(score(&doc, EXACT)["matched"], "gfx1100");
    // The generic build runs too (gfx1100 joined gfx11-generic at version 1), but ranks
    // below the exact one.
    assert_eq!(verdict(&doc, GFX11_GENERIC), "accepted");
    assert_eq!(score(&doc, GFX11_GENERIC)["device"], "generic");
    assert_eq!(score(&doc, GFX11_GENERIC)["matched"], "gfx11-generic");
    assert_eq!(verdict(&doc, XNACK), "NoDeviceCode");
}

#[test]
fn strix_halo_runs_only_the_generic_build() {
    let Some(p) = packaged() else { return };
    let doc = explain_at_release_rocm(p, "strix-halo");
    assert_every_decision_explained(p, &doc);
    assert_eq!(chosen(&doc), GFX11_GENERIC);
    assert_eq!(score(&doc, GFX11_GENERIC)["device"], "generic");
    // gfx1100 code does not run on gfx1151, though both are RDNA3: no cross-processor
    // compatibility outside generic targets.
    assert_eq!(verdict(&doc, EXACT), "NoDeviceCode");
    let reason = &candidates(&doc)[EXACT]["reason"];
    assert!(reason["device"].as_str().unwrap().contains("gfx1151"), "{reason}");
    assert_eq!(verdict(&doc, XNACK), "NoDeviceCode");
}

#[test]
fn rocm_versions_decide_before_device_code() {
    let Some(p) = packaged() else { return };
    let v = p.rocm;
    let hip_variants: Vec<&str> = p
        .manifest
        .variants
        .iter()
        .filter(|x| x.backend == Backend::Rocm)
        .map(|x| x.id.as_str())
        .collect();
    let expect_all = |doc: &Value, reason: &str| {
        for id in &hip_variants {
            assert_eq!(verdict(doc, id), reason, "{id}");
        }
    };
    // Another major: the HIP runtime's soname differs, nothing of it loads.
    let other_major = format!("{}.0", v.major + 1);
    let doc = explain(p, "mi300x", &[("KHUB_ROCM_VERSION", &other_major)], &[]);
    assert_every_decision_explained(p, &doc);
    expect_all(&doc, "RocmMajorMismatch");
    let reason = &candidates(&doc)[EXACT]["reason"];
    assert_eq!(
        (reason["need"].as_str(), reason["have"].as_str()),
        (Some(v.to_string().as_str()), Some(other_major.as_str()))
    );
    assert_eq!(chosen(&doc), "cpu-x86_64-v4-linux");
    // Same major, another minor the publisher did not declare.
    let other_minor = format!("{}.{}", v.major, v.minor + 1);
    let doc = explain(p, "mi250x", &[("KHUB_ROCM_VERSION", &other_minor)], &[]);
    expect_all(&doc, "RocmMinorNotDeclared");
    assert_eq!(chosen(&doc), "cpu-x86_64-v3-linux");

    // The profiles' own versions: mi300x runs ROCm 6.3, mi250x ROCm 5.2.
    for (host, have) in [("mi300x", MajorMinor::new(6, 3)), ("mi250x", MajorMinor::new(5, 2))] {
        let doc = explain(p, host, &[], &[]);
        assert_every_decision_explained(p, &doc);
        let expected = if have.major != v.major {
            "RocmMajorMismatch"
        } else if have != v {
            "RocmMinorNotDeclared"
        } else {
            "accepted"
        };
        assert_eq!(verdict(&doc, EXACT), expected, "{host}: release built for ROCm {v}");
    }
}

#[test]
fn other_hosts_have_no_amd_gpu() {
    let Some(p) = packaged() else { return };
    for host in ["h100", "laptop"] {
        let doc = explain(p, host, &[], &[]);
        assert_every_decision_explained(p, &doc);
        for id in [EXACT, XNACK, GFX11_GENERIC] {
            assert_eq!(verdict(&doc, id), "BackendUnavailable", "{host} {id}");
        }
    }
    let doc = explain(p, "h100", &[], &[]);
    if has(p, CUDA) {
        // The H100 has a GPU for it; whether its driver runs this toolkit is CUDA's rule.
        assert_ne!(verdict(&doc, CUDA), "BackendUnavailable");
    }
    let cuda_runs = has(p, CUDA) && verdict(&doc, CUDA) == "accepted";
    assert_eq!(chosen(&doc), if cuda_runs { CUDA } else { "cpu-x86_64-v4-linux" });
    let doc = explain(p, "laptop", &[], &[]);
    assert_eq!(chosen(&doc), "cpu-x86_64-v3-linux");
}

#[test]
fn explain_text_names_every_variant_and_its_reason() {
    let Some(p) = packaged() else { return };
    let out = common::khub(
        &["explain", p.dir.to_str().unwrap(), "--host", &profile("strix-halo")],
        &[("KHUB_ROCM_VERSION", &p.rocm.to_string())],
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}");
    for v in &p.manifest.variants {
        let line = text
            .lines()
            .find(|l| l.contains(&v.id))
            .unwrap_or_else(|| panic!("{} not in\n{text}", v.id));
        assert!(line.contains("accepted") || line.contains("rejected"), "{line}");
    }
    assert!(text.contains(&format!("chosen: {GFX11_GENERIC}")), "{text}");
    assert!(text.contains("NoDeviceCode"), "{text}");
}

#[test]
fn fetch_and_load_pick_what_explain_picks() {
    let Some(p) = packaged() else { return };
    let registry = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    common::copy_dir(&p.dir, &registry.path().join("acme/activation/0.1.0"));
    let reg = registry.path().to_str().unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    let v = p.rocm.to_string();
    for host in ["mi250x", "mi250x-xnack", "mi300x", "rx7900", "strix-halo"] {
        let env = [("KHUB_ROCM_VERSION", v.as_str()), ("KHUB_CACHE", cache_dir)];
        let expected = chosen(&explain(p, host, &env, &[])).to_owned();
        let out = common::khub(
            &["fetch", "acme/activation", "--registry", reg, "--host", &profile(host), "--json"],
            &env,
        );
        assert!(out.status.success(), "{host}: {}", String::from_utf8_lossy(&out.stderr));
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(doc["variants"], serde_json::json!([expected]), "{host}");
    }

    // Loading a HIP variant dlopens it, which needs the HIP runtime library (not a GPU).
    let env = [("KHUB_ROCM_VERSION", v.as_str()), ("KHUB_CACHE", cache_dir)];
    let out = common::khub(
        &["load", "acme/activation", "--registry", reg, "--host", &profile("mi300x"), "--json"],
        &env,
    );
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("libamdhip64"), "{err}");
        eprintln!("skipped the load checks: the HIP runtime library is not loadable here: {err}");
        return;
    }
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((doc["variant"].as_str(), doc["backend"].as_str()), (Some(EXACT), Some("rocm")));
    assert_eq!(doc["exports"].as_array().unwrap().len(), 3);

    // Without an AMD GPU every self-test fails cleanly with KHUB_ERR_DEVICE (3), from
    // hipGetDevice, instead of crashing the host.
    if Path::new("/dev/kfd").exists() {
        eprintln!("skipped the no-GPU self-test checks: /dev/kfd exists");
        return;
    }
    let out = common::khub(
        &[
            "selftest",
            "acme/activation",
            "--registry",
            reg,
            "--host",
            &profile("mi300x"),
            "--json",
        ],
        &env,
    );
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let results = doc["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for r in results {
        assert_eq!(r["status"], 3, "{r}");
        assert!(r["message"].as_str().unwrap().contains("hipGetDevice failed"), "{r}");
    }
}
