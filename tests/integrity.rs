//! Issue 12's integrity cases, each a regression test: nothing shadows the lock, the cache
//! is untrusted, rollback state advances only on verified releases, damaged blobs heal,
//! names compare byte-exactly, publishing checks what loading checks, no SIGILL from a
//! simulated host, directory registries report what they cannot serve.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own
#![cfg(all(unix, target_arch = "x86_64", feature = "cli", feature = "serve"))]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::copy_dir;
use khub::host::{Environment, HostFacts, ProbeOptions};
use khub::hub::{Hub, HubError, HubOptions, Quiet, RegistrySpec};
use khub::manifest::{Manifest, Sha256Digest};
use khub::registry::RepoId;
use khub::verify::trust::TrustPolicy;

fn repo() -> RepoId {
    "acme/activation".parse().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A directory registry with kernels-example's CPU release as acme/activation `versions`
/// (the manifest's version rewritten).
fn registry(versions: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    for v in versions {
        write_release(&dir.path().join("acme/activation").join(v), v);
    }
    let root = dir.path().to_owned();
    (dir, root)
}

fn write_release(dir: &Path, version: &str) {
    copy_dir(common::example_release(), dir);
    let m = dir.join("khub.toml");
    let text = std::fs::read_to_string(&m)
        .unwrap()
        .replace("version = \"0.1.0\"", &format!("version = \"{version}\""));
    std::fs::write(&m, text).unwrap();
}

fn hub_with(registry: &Path, cache: &Path, offline: bool, state: Option<&Path>) -> Hub {
    let env = Environment::from_pairs([("KHUB_CPU_LEVEL", "x86-64-v1")]);
    let host = HostFacts::detect(&ProbeOptions::with_env(env.clone()).unwrap()).unwrap().facts;
    Hub::new(HubOptions {
        env,
        registry: RegistrySpec::Dir(registry.to_owned()),
        cache: cache.to_owned(),
        offline,
        host,
        preferences: Default::default(),
        jobs: 2,
        trust: TrustPolicy::permissive(),
        state_dir: state.map(Path::to_owned),
    })
    .unwrap()
}

/// Runs the khub binary in `cwd`, with no KHUB_* variable from the caller.
fn khub_in(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_khub"));
    cmd.args(args).current_dir(cwd);
    for var in khub::env::ALL {
        cmd.env_remove(var);
    }
    cmd.env("KHUB_STATE_DIR", cwd.join("state"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The blob path of `d` in the store under `cache`.
fn blob(cache: &Path, d: &Sha256Digest) -> PathBuf {
    let hex = d.to_string();
    cache.join("store-v1/blobs").join(&hex[..2]).join(hex)
}

/// Flips one byte of a file in place (same size), as bit rot or an attacker would.
fn flip(path: &Path, at: usize) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x5a;
    std::fs::write(path, b).unwrap();
}

fn library_digest(m: &Manifest, variant: &str) -> (Sha256Digest, u64) {
    let f = &m.variant(variant).unwrap().files[0];
    (f.sha256, f.size)
}

// 1. Shadowing ------------------------------------------------------------------------

#[test]
fn a_local_directory_named_like_the_repository_never_shadows_it() {
    let (_d, reg) = registry(&["0.1.0"]);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let cache = w.join("cache");
    std::fs::write(w.join("kernels.toml"), "[kernels]\n\"acme/activation\" = \"^0.1\"\n").unwrap();
    let env = [("KHUB_CPU_LEVEL", "x86-64-v1"), ("KHUB_CACHE", s(&cache))];
    let o = khub_in(w, &["lock", "--registry", s(&reg)], &env);
    assert!(o.status.success(), "{}", text(&o));
    // A directory ./acme/activation holding another (here: broken) release.
    let shadow = w.join("acme/activation");
    write_release(&shadow, "0.2.0");
    std::fs::write(shadow.join("khub.toml"), "this is not the locked release").unwrap();

    let o = khub_in(w, &["load", "acme/activation", "--locked", "--offline", "--json"], &env);
    assert!(o.status.success(), "the lock's release loads, not ./acme/activation: {}", text(&o));
    let o = khub_in(w, &["load", "acme/activation", "--registry", s(&reg), "--json"], &env);
    assert!(o.status.success(), "org/name is the registry's repository: {}", text(&o));
    // A valid 0.2.0 in ./acme/activation does not replace the locked 0.1.0 either: the
    // lock's manifest digest is what is loaded.
    std::fs::remove_dir_all(&shadow).unwrap();
    write_release(&shadow, "0.2.0");
    let o = khub_in(w, &["load", "acme/activation", "--locked", "--offline", "--json"], &env);
    assert!(o.status.success(), "{}", text(&o));
    let lock = std::fs::read_to_string(w.join("khub.lock")).unwrap();
    assert!(lock.contains("version = \"0.1.0\""), "{lock}");
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let locked_lib = Manifest::from_bytes(&std::fs::read(reg.join("acme/activation/0.1.0/khub.toml")).unwrap())
        .unwrap()
        .variant("cpu-x86_64-v1-linux")
        .unwrap()
        .files[0]
        .sha256
        .to_string();
    assert_eq!(report["files"][0]["sha256"], locked_lib.as_str());

    // The directory is loaded only when named as a path (this one is refused: its manifest
    // says 0.2.0, its library 0.1.0); --locked never takes one.
    let o = khub_in(w, &["load", "./acme/activation"], &env);
    assert!(!o.status.success() && text(&o).contains("0.2.0"), "{}", text(&o));
    let o = khub_in(w, &["load", "./acme/activation", "--locked"], &env);
    assert!(text(&o).contains("--locked loads only what"), "{}", text(&o));
    // A bare directory name is not a repository: the error says how to name the path.
    copy_dir(common::example_release(), &w.join("rel"));
    let o = khub_in(w, &["load", "rel"], &env);
    assert!(!o.status.success() && text(&o).contains("./rel"), "{}", text(&o));
    let o = khub_in(w, &["load", "./rel"], &env);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn local_releases_are_subject_to_the_trust_policy() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    copy_dir(common::example_release(), &w.join("rel"));
    std::fs::write(w.join("trust.toml"), "require-signature = true\n").unwrap();
    let env = [("KHUB_CPU_LEVEL", "x86-64-v1")];
    let o = khub_in(w, &["load", "./rel", "--trust", "trust.toml"], &env);
    assert!(
        !o.status.success(),
        "an unsigned local release under require-signature: {}",
        text(&o)
    );
    assert!(text(&o).contains("unsigned") && text(&o).contains("--skip-trust"), "{}", text(&o));
    // The policy from the environment applies too.
    let o = khub_in(
        w,
        &["load", "./rel"],
        &[("KHUB_CPU_LEVEL", "x86-64-v1"), ("KHUB_TRUST_POLICY", "trust.toml")],
    );
    assert!(!o.status.success(), "{}", text(&o));
    // The explicit development opt-out.
    let o = khub_in(w, &["load", "./rel", "--trust", "trust.toml", "--skip-trust"], &env);
    assert!(o.status.success(), "{}", text(&o));
    // Signed for acme/activation with a key the policy trusts for it: accepted.
    let o = khub_in(w, &["keygen", "--public", "k.pub", "--secret", "k.key"], &env);
    assert!(o.status.success(), "{}", text(&o));
    let o = khub_in(w, &["sign", "./rel", "--key", "k.key", "--repo", "acme/activation"], &env);
    assert!(o.status.success(), "{}", text(&o));
    std::fs::write(
        w.join("trust.toml"),
        "require-signature = true\n[[publisher]]\nrepos = [\"acme/*\"]\nkeys = [\"k.pub\"]\n",
    )
    .unwrap();
    let o = khub_in(w, &["load", "./rel", "--trust", "trust.toml"], &env);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("signed by key") && text(&o).contains("acme/activation"),
        "{}",
        text(&o)
    );
    // A key trusted for another repository does not vouch for it.
    std::fs::write(
        w.join("trust.toml"),
        "require-signature = true\n[[publisher]]\nrepos = [\"other/*\"]\nkeys = [\"k.pub\"]\n",
    )
    .unwrap();
    let o = khub_in(w, &["load", "./rel", "--trust", "trust.toml"], &env);
    assert!(!o.status.success(), "{}", text(&o));
    // A signature claiming a repository the policy has no key for verifies nothing: with
    // keys configured (even without require-signature), it is refused like an unsigned one.
    let o = khub_in(w, &["sign", "./rel", "--key", "k.key", "--repo", "evil/x"], &env);
    assert!(o.status.success(), "{}", text(&o));
    std::fs::write(w.join("trust.toml"), "[[publisher]]\nrepos = [\"acme/*\"]\nkeys = [\"k.pub\"]\n").unwrap();
    let o = khub_in(w, &["load", "./rel", "--trust", "trust.toml"], &env);
    assert!(!o.status.success(), "a claim for evil/x is not a pass: {}", text(&o));
    std::fs::write(
        w.join("trust.toml"),
        "require-signature = true\nallow-unsigned = [\"evil/*\"]\n[[publisher]]\nrepos = [\"acme/*\"]\nkeys = [\"k.pub\"]\n",
    )
    .unwrap();
    let o = khub_in(w, &["load", "./rel", "--trust", "trust.toml"], &env);
    assert!(!o.status.success(), "allow-unsigned does not apply to local releases: {}", text(&o));
}

// 2. The cache index is untrusted -------------------------------------------------------

#[test]
fn a_planted_index_entry_is_ignored_online() {
    let (_d, reg) = registry(&["0.1.0"]);
    let cache = tempfile::tempdir().unwrap();
    let h = hub_with(&reg, cache.path(), false, None);
    h.fetch(&repo(), "^0.1", false, &Quiet).unwrap();
    let honest = std::fs::read(reg.join("acme/activation/0.1.0/khub.toml")).unwrap();
    let honest_digest = khub::verify::sha256(&honest);

    // Plant a different manifest as a blob and point the index at it.
    let planted = [honest.as_slice(), b"\n# planted\n"].concat();
    let planted_digest = h.store().insert_bytes("planted", &planted).unwrap();
    let index = h.store().index_path(&reg.display().to_string(), &repo());
    let text = std::fs::read_to_string(&index).unwrap();
    assert!(text.contains(&honest_digest.to_string()), "{text}");
    std::fs::write(&index, text.replace(&honest_digest.to_string(), &planted_digest.to_string())).unwrap();

    let (release, _k) = h.load_release(&repo(), "^0.1").unwrap();
    assert_eq!(release.manifest_sha256, honest_digest, "online, the registry's manifest is used");
    // The honest load rewrote the entry.
    assert!(std::fs::read_to_string(&index).unwrap().contains(&honest_digest.to_string()));
}

// 3. Rollback state ----------------------------------------------------------------------

#[test]
fn a_release_that_never_loaded_does_not_advance_the_rollback_state() {
    let (_d, reg) = registry(&["0.1.0"]);
    // A fake 99.0.0: a manifest whose files do not exist.
    let fake = reg.join("acme/activation/99.0.0");
    std::fs::create_dir_all(&fake).unwrap();
    let m = std::fs::read_to_string(reg.join("acme/activation/0.1.0/khub.toml"))
        .unwrap()
        .replace("version = \"0.1.0\"", "version = \"99.0.0\"");
    std::fs::write(fake.join("khub.toml"), m).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let h = hub_with(&reg, cache.path(), false, Some(state.path()));
    assert!(h.load("acme/activation", "*").is_err(), "99.0.0 has no files");
    assert!(h.fetch(&repo(), "*", false, &Quiet).is_err());
    std::fs::remove_dir_all(&fake).unwrap();
    let k = h
        .load("acme/activation", "*")
        .expect("0.1.0 is not a rollback: 99.0.0 never loaded");
    assert_eq!(k.variant(), "cpu-x86_64-v1-linux");
    let rollback = std::fs::read_to_string(state.path().join("rollback.toml")).unwrap();
    assert!(rollback.contains("0.1.0") && !rollback.contains("99.0.0"), "{rollback}");
}

// 5. A damaged stored manifest is refetched and repaired online ---------------------------

#[test]
fn a_damaged_manifest_blob_is_repaired_online_and_named_offline() {
    let (_d, reg) = registry(&["0.1.0"]);
    let cache = tempfile::tempdir().unwrap();
    let h = hub_with(&reg, cache.path(), false, None);
    let (release, _) = h.load_release(&repo(), "^0.1").unwrap();
    let path = blob(cache.path(), &release.manifest_sha256);
    flip(&path, 10);
    // Offline: refused, naming the blob and the repair; the damaged copy is quarantined.
    let off = hub_with(&reg, cache.path(), true, None);
    let e = off.load("acme/activation", "^0.1").unwrap_err();
    assert!(matches!(e, HubError::DamagedBlob { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(s(&path)) && msg.contains("khub fetch acme/activation"), "{msg}");
    assert!(h.store().quarantined_path(&release.manifest_sha256).is_some());
    // Online: with the damaged copy back in place, the load fetches the manifest from the
    // registry and replaces the stored copy with intact bytes.
    flip_back_or_recreate(&path, &h, &release.manifest_sha256);
    assert_ne!(khub::verify::sha256(&std::fs::read(&path).unwrap()), release.manifest_sha256);
    h.load("acme/activation", "^0.1").unwrap();
    assert_eq!(khub::verify::sha256(&std::fs::read(&path).unwrap()), release.manifest_sha256);
}

// 6. Damaged blobs heal ------------------------------------------------------------------

#[test]
fn a_damaged_library_blob_is_quarantined_and_fetched_again() {
    let (_d, reg) = registry(&["0.1.0"]);
    let cache = tempfile::tempdir().unwrap();
    let h = hub_with(&reg, cache.path(), false, None);
    let (release, _) = h.load_release(&repo(), "^0.1").unwrap();
    let (lib, size) = library_digest(&release.manifest, "cpu-x86_64-v1-linux");
    let path = blob(cache.path(), &lib);

    // fetch re-hashes what is present: the damaged copy is downloaded again.
    flip(&path, 1000);
    let r = h.fetch(&repo(), "^0.1", false, &Quiet).unwrap();
    assert_eq!((r.downloaded, r.cached), (1, 0), "the damaged blob is fetched again");
    assert!(h.store().verify_blob(&lib, size).unwrap());

    // An online load heals too.
    flip(&path, 1000);
    h.load("acme/activation", "^0.1").expect("an online load repairs the blob");
    assert!(h.store().verify_blob(&lib, size).unwrap());

    // Offline: the error names the blob and the repair.
    flip(&path, 1000);
    let off = hub_with(&reg, cache.path(), true, None);
    let e = off.load("acme/activation", "^0.1").unwrap_err().to_string();
    assert!(e.contains(s(&path)) && e.contains("khub cache verify --repair"), "{e}");
    assert!(
        h.store().quarantined_path(&lib).is_some(),
        "the damaged copy is kept for inspection"
    );
}

#[test]
fn cache_verify_repair_ls_rm_and_gc_through_the_cli() {
    let (_d, reg) = registry(&["0.1.0"]);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let cache = w.join("cache");
    let env = [("KHUB_CPU_LEVEL", "x86-64-v1"), ("KHUB_CACHE", s(&cache))];
    let o = khub_in(w, &["fetch", "acme/activation", "--registry", s(&reg)], &env);
    assert!(o.status.success(), "{}", text(&o));

    let o = khub_in(w, &["cache", "ls"], &env);
    assert!(o.status.success() && text(&o).contains("acme/activation 0.1.0"), "{}", text(&o));
    assert!(text(&o).contains("cpu-x86_64-v1-linux"), "{}", text(&o));
    let o = khub_in(w, &["cache", "ls", "--json"], &env);
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["releases"][0]["repo"], "acme/activation");

    let o = khub_in(w, &["cache", "verify"], &env);
    assert!(o.status.success() && text(&o).contains("0 damaged"), "{}", text(&o));

    let h = hub_with(&reg, &cache, true, None);
    let m = Manifest::from_bytes(&std::fs::read(reg.join("acme/activation/0.1.0/khub.toml")).unwrap()).unwrap();
    let (lib, size) = library_digest(&m, "cpu-x86_64-v1-linux");
    let path = blob(&cache, &lib);
    flip(&path, 500);
    let o = khub_in(w, &["cache", "verify"], &env);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains(s(&path)) && text(&o).contains("acme/activation 0.1.0"),
        "{}",
        text(&o)
    );
    // Offline repair quarantines and says what to run.
    let o = khub_in(w, &["cache", "verify", "--repair", "--offline"], &env);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("khub fetch acme/activation --version '=0.1.0'"), "{}", text(&o));
    // Online repair fetches it again.
    flip_back_or_recreate(&path, &h, &lib);
    flip(&path, 500);
    let o = khub_in(w, &["cache", "verify", "--repair", "--registry", s(&reg)], &env);
    assert!(o.status.success(), "{}", text(&o));
    assert!(h.store().verify_blob(&lib, size).unwrap());

    // gc keeps what a lock pins, but not a damaged copy.
    std::fs::write(w.join("kernels.toml"), "[kernels]\n\"acme/activation\" = \"^0.1\"\n").unwrap();
    let o = khub_in(w, &["lock", "--registry", s(&reg)], &env);
    assert!(o.status.success(), "{}", text(&o));
    flip(&path, 500);
    let o = khub_in(w, &["gc", "--keep", "khub.lock"], &env);
    assert!(o.status.success() && text(&o).contains("failed verification"), "{}", text(&o));
    assert!(!path.exists(), "the damaged pinned blob is gone");
    // lock fetches it again.
    let o = khub_in(w, &["lock", "--registry", s(&reg)], &env);
    assert!(o.status.success(), "{}", text(&o));
    assert!(h.store().verify_blob(&lib, size).unwrap());

    // rm forgets the release and deletes its blobs.
    let o = khub_in(w, &["cache", "rm", "acme/activation"], &env);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!path.exists());
    let o = khub_in(w, &["cache", "ls"], &env);
    assert!(text(&o).contains("no releases recorded"), "{}", text(&o));
    let o = khub_in(w, &["cache", "rm", "acme/activation"], &env);
    assert!(
        !o.status.success() && text(&o).contains("no release of acme/activation"),
        "{}",
        text(&o)
    );
}

/// After an offline repair moved the blob to quarantine, puts a (still damaged) copy
/// back so the next step has something to repair.
fn flip_back_or_recreate(path: &Path, h: &Hub, d: &Sha256Digest) {
    if !path.exists() {
        let q = h.store().quarantined_path(d).unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::copy(q, path).unwrap();
    }
}

// 7. Byte-exact names ---------------------------------------------------------------------

#[test]
fn a_name_that_is_not_utf8_is_refused_not_compared_lossily() {
    use std::os::unix::ffi::OsStrExt;
    let work = tempfile::tempdir().unwrap();
    let rel = work.path().join("rel");
    copy_dir(common::example_release(), &rel);
    std::fs::write(rel.join(std::ffi::OsStr::from_bytes(b"lib\xff.so")), b"smuggled").unwrap();
    let e = khub::Release::open(&rel).unwrap().check_tree().unwrap_err();
    assert!(matches!(e, khub::release::ReleaseError::NonUtf8Name { .. }), "{e}");
    assert!(e.to_string().contains("not UTF-8"), "{e}");
}

#[test]
fn an_overlong_path_component_has_its_own_message() {
    let long = format!("variants/{}/lib.so", "x".repeat(256));
    let e = khub::manifest::RelPath::new(long).unwrap_err().to_string();
    assert!(e.contains("256 bytes") && e.contains("255"), "{e}");
    assert!(!e.contains("`..`"), "{e}");
}

// 8. Publishing checks what loading checks --------------------------------------------------

#[test]
fn publish_refuses_a_signature_for_another_repository_and_package_refuses_a_used_directory() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let env = [("KHUB_CPU_LEVEL", "x86-64-v1")];
    copy_dir(common::example_release(), &w.join("rel"));
    let o = khub_in(w, &["keygen", "--public", "k.pub", "--secret", "k.key"], &env);
    assert!(o.status.success(), "{}", text(&o));
    let o = khub_in(w, &["sign", "./rel", "--key", "k.key", "--repo", "other/thing"], &env);
    assert!(o.status.success(), "{}", text(&o));
    let registry = w.join("registry");
    std::fs::create_dir_all(&registry).unwrap();
    let server = khub::serve::Server::start(
        &registry,
        "127.0.0.1:0",
        khub::serve::ServeOptions {
            write_token: Some("w".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let url = server.url();
    let o = khub_in(
        w,
        &["publish", "rel", "--to", "acme/x", "--registry", &url, "--create"],
        &[("KHUB_TOKEN", "w")],
    );
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("signed for other/thing") && text(&o).contains("--repo acme/x"),
        "{}",
        text(&o)
    );
    assert!(!registry.join("acme/x").exists(), "nothing was uploaded");

    // package --out refuses a directory that holds a release (its old signature would be
    // published with the new bytes), and --force empties it first.
    let kernel = common::repo().join("kernels-example");
    let nvcc = [("KHUB_NVCC", "/nonexistent/nvcc"), ("KHUB_HIPCC", "/nonexistent/clang")];
    let o = khub_in(w, &["package", s(&kernel), "--out", "rel"], &nvcc);
    assert!(!o.status.success() && text(&o).contains("--force"), "{}", text(&o));
    let o = khub_in(w, &["package", s(&kernel), "--out", "rel", "--force"], &nvcc);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!w.join("rel/khub.toml.minisig").exists(), "the old signature is gone");
    // Skipped variants (no nvcc, no HIP compiler here) leave no directory behind.
    let m = Manifest::from_bytes(&std::fs::read(w.join("rel/khub.toml")).unwrap()).unwrap();
    let dirs: Vec<String> = std::fs::read_dir(w.join("rel/variants"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for d in &dirs {
        assert!(m.variant(d).is_some(), "variants/{d} is not in the manifest");
    }
}

// 9. No SIGILL from a simulated host --------------------------------------------------------

#[test]
fn a_variant_this_cpu_cannot_run_is_refused_whatever_the_host_facts_say() {
    let m = Manifest::from_bytes(&std::fs::read(common::example_release().join("khub.toml")).unwrap()).unwrap();
    // Another architecture: refused on this machine, without loading anything.
    let mut v = m.variant("cpu-x86_64-v1-linux").unwrap().clone();
    v.arch = khub::platform::CpuArch::Aarch64;
    let e = khub::load::check_cpu(&v).unwrap_err().to_string();
    assert!(e.contains("does not have") && e.contains("aarch64"), "{e}");
    // A feature no x86 CPU has.
    let mut v = m.variant("cpu-x86_64-v1-linux").unwrap().clone();
    v.cpu_features.insert("no-such-feature".into());
    let e = khub::load::check_cpu(&v).unwrap_err().to_string();
    assert!(e.contains("no-such-feature"), "{e}");

    // The CLI with a v4 override: on a CPU without AVX-512 the v4 variant is refused with
    // a clear error (not SIGILL); on one with it, it loads.
    let has_v4 = std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512cd")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512vl");
    let work = tempfile::tempdir().unwrap();
    copy_dir(common::example_release(), &work.path().join("rel"));
    for cmd in [&["load", "./rel"][..], &["selftest", "./rel"][..]] {
        let o = khub_in(work.path(), cmd, &[("KHUB_CPU_LEVEL", "x86-64-v4")]);
        if has_v4 {
            assert!(o.status.success(), "{}", text(&o));
        } else {
            assert_eq!(o.status.code(), Some(2), "a clear error, not a signal: {}", text(&o));
            assert!(text(&o).contains("x86-64 level"), "{}", text(&o));
        }
    }
}

// 10. Directory registries report what they cannot serve -------------------------------------

#[test]
fn a_directory_registry_names_a_release_it_cannot_serve() {
    let (_d, reg) = registry(&["0.1.0", "0.2.0"]);
    std::fs::write(reg.join("acme/activation/0.2.0/khub.toml"), "not toml [").unwrap();
    let cache = tempfile::tempdir().unwrap();
    let h = hub_with(&reg, cache.path(), false, None);
    let e = h.load("acme/activation", "*").unwrap_err();
    assert!(matches!(e, HubError::UnusableRelease { .. }), "{e}");
    assert!(e.to_string().contains("release 0.2.0"), "{e}");
    // A requirement that excludes it is not affected.
    h.load("acme/activation", "^0.1").unwrap();

    // A symlinked release directory.
    std::fs::remove_dir_all(reg.join("acme/activation/0.2.0")).unwrap();
    std::os::unix::fs::symlink(reg.join("acme/activation/0.1.0"), reg.join("acme/activation/0.3.0")).unwrap();
    let e = h.load("acme/activation", "*").unwrap_err().to_string();
    assert!(e.contains("0.3.0") && e.contains("symlink"), "{e}");
}

#[test]
fn a_symlinked_library_in_a_directory_registry_is_a_verification_error() {
    let (_d, reg) = registry(&["0.1.0"]);
    let lib_dir = reg.join("acme/activation/0.1.0/variants/cpu-x86_64-v1-linux");
    let lib = lib_dir.join("libactivation.so");
    let elsewhere = reg.join("elsewhere.so");
    std::fs::rename(&lib, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &lib).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let h = hub_with(&reg, cache.path(), false, None);
    let e = h.load("acme/activation", "^0.1").unwrap_err();
    assert!(
        matches!(e, HubError::Registry(khub::registry::RegistryError::NotRegular { .. })),
        "{e:?}"
    );
    assert!(e.to_string().contains("symlink"), "{e}");
}

#[test]
fn publish_refuses_a_library_the_loader_could_not_load() {
    let work = tempfile::tempdir().unwrap();
    let rel = work.path().join("rel");
    copy_dir(common::example_release(), &rel);
    // A variant whose "library" is not an ELF object, with the manifest updated to match
    // (so the digests check out and only the loader's own checks can catch it).
    let lib = rel.join("variants/cpu-x86_64-v1-linux/libactivation.so");
    let old = std::fs::read(&lib).unwrap();
    let bogus = b"#!/bin/sh\necho not a library\n".to_vec();
    std::fs::write(&lib, &bogus).unwrap();
    assert_ne!(old, bogus);
    let mut m = Manifest::from_bytes(&std::fs::read(rel.join("khub.toml")).unwrap()).unwrap();
    let v = m.variants.iter_mut().find(|v| v.id == "cpu-x86_64-v1-linux").unwrap();
    v.files[0].sha256 = khub::verify::sha256(&bogus);
    v.files[0].size = bogus.len() as u64;
    std::fs::write(rel.join("khub.toml"), m.to_toml_string().unwrap()).unwrap();
    khub::Release::open(&rel).unwrap().verify_variant("cpu-x86_64-v1-linux").unwrap();
    let config = khub::registry::hf::HubConfig::new("http://127.0.0.1:9");
    let e = khub::package::publish::publish(&rel, &repo(), config, true, None, &mut |_| {}).unwrap_err();
    assert!(matches!(e, khub::package::publish::PublishError::NotLoadable { .. }), "{e}");
    assert!(e.to_string().contains("cpu-x86_64-v1-linux"), "{e}");
}

#[test]
fn a_planted_offline_entry_is_refused_under_a_signature_policy() {
    let (_d, reg) = registry(&["0.1.0"]);
    let cache = tempfile::tempdir().unwrap();
    hub_with(&reg, cache.path(), false, None)
        .fetch(&repo(), "^0.1", false, &Quiet)
        .unwrap();
    // Offline, with a policy requiring signatures: the stored (unsigned) release is refused
    // like any other unsigned release, so whatever was planted in the cache is too.
    let env = Environment::from_pairs([("KHUB_CPU_LEVEL", "x86-64-v1")]);
    let host = HostFacts::detect(&ProbeOptions::with_env(env.clone()).unwrap()).unwrap().facts;
    let strict = Hub::new(HubOptions {
        env,
        registry: RegistrySpec::Dir(reg.clone()),
        cache: cache.path().to_owned(),
        offline: true,
        host,
        preferences: Default::default(),
        jobs: 2,
        trust: TrustPolicy::permissive().require_signature(true),
        state_dir: None,
    })
    .unwrap();
    let e = strict.load("acme/activation", "^0.1").unwrap_err();
    assert!(matches!(e, HubError::Trust(_)), "{e}");
}

#[test]
fn the_store_never_follows_a_symlinked_quarantine_nor_evicts_an_intact_blob() {
    let cache = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("precious"), b"keep me").unwrap();
    let store = khub::store::Store::open(cache.path()).unwrap();
    let q = cache.path().join("store-v1/quarantine");
    std::fs::remove_dir(&q).unwrap();
    std::os::unix::fs::symlink(outside.path(), &q).unwrap();
    store.gc(&Default::default(), false).unwrap();
    assert!(outside.path().join("precious").exists(), "gc deleted through the symlink");
    assert!(!q.exists(), "the symlink itself is removed");

    // A manifest naming an intact blob's digest with another size does not evict it.
    let d = store.insert_bytes("x", b"shared bytes").unwrap();
    assert!(!store.verify_blob(&d, 999).unwrap());
    assert!(store.contains(&d, 12), "the intact blob stays");
    assert!(store.quarantined_path(&d).is_none());
}

#[test]
fn package_never_writes_over_its_own_sources() {
    let work = tempfile::tempdir().unwrap();
    let kernel = work.path().join("k");
    copy_dir(&common::repo().join("kernels-example"), &kernel);
    let o = khub_in(
        work.path(),
        &["package", "k", "--out", "k", "--force"],
        &[("KHUB_NVCC", "/nonexistent/nvcc")],
    );
    assert!(!o.status.success() && text(&o).contains("over the sources"), "{}", text(&o));
    let o = khub_in(
        work.path(),
        &["package", "k", "--out", ".", "--force"],
        &[("KHUB_NVCC", "/nonexistent/nvcc")],
    );
    assert!(!o.status.success(), "{}", text(&o));
    assert!(kernel.join("kernel.toml").exists(), "the sources are intact");
}
