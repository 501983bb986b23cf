//! Registries end to end over a directory registry (no network): version resolution,
//! fetching only the chosen variant into the store, loading from the store, lockfiles,
//! offline mode.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

mod common;

use common::copy_dir;

use std::path::{Path, PathBuf};

use khub::host::{Environment, HostFacts, ProbeOptions};
use khub::hub::{Hub, HubError, HubOptions, Quiet, RegistrySpec};
use khub::lock::{AppKernels, Lockfile};
use khub::registry::RepoId;

/// A directory registry holding kernels-example's CPU release as `acme/activation`
/// 0.1.0, plus a pre-release 0.2.0-rc.1 (same files, only the manifest version differs).
fn registry() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("acme/activation");
    copy_dir(common::example_release(), &repo.join("0.1.0"));
    copy_dir(common::example_release(), &repo.join("0.2.0-rc.1"));
    let m = repo.join("0.2.0-rc.1/khub.toml");
    let text = std::fs::read_to_string(&m)
        .unwrap()
        .replace("version = \"0.1.0\"", "version = \"0.2.0-rc.1\"");
    std::fs::write(&m, text).unwrap();
    let root = dir.path().to_owned();
    (dir, root)
}

fn hub(registry: &Path, cache: &Path, offline: bool, env: &[(&str, &str)]) -> Hub {
    let env = Environment::from_pairs(env.iter().copied());
    let host = HostFacts::detect(&ProbeOptions::with_env(env.clone()).unwrap()).unwrap().facts;
    Hub::new(HubOptions {
        env,
        registry: RegistrySpec::Dir(registry.to_owned()),
        cache: cache.to_owned(),
        offline,
        host,
        preferences: Default::default(),
        jobs: 4,
        trust: khub::verify::trust::TrustPolicy::permissive(),
        state_dir: None,
    })
    .unwrap()
}

fn repo() -> RepoId {
    "acme/activation".parse().unwrap()
}

#[test]
fn fetch_downloads_only_the_chosen_variant_then_nothing() {
    let (_d, reg) = registry();
    let cache = tempfile::tempdir().unwrap();
    let h = hub(&reg, cache.path(), false, &[("KHUB_CPU_LEVEL", "x86-64-v3")]);
    let r = h.fetch(&repo(), "^0.1", false, &Quiet).unwrap();
    assert_eq!(
        (r.version.as_str(), r.variants.as_slice()),
        ("0.1.0", &["cpu-x86_64-v3-linux".to_owned()][..])
    );
    assert_eq!((r.downloaded, r.cached), (1, 0));
    // The store holds the manifest and exactly that variant's library.
    assert_eq!(h.store().list().unwrap().len(), 2);
    let again = h.fetch(&repo(), "^0.1", false, &Quiet).unwrap();
    assert_eq!((again.downloaded, again.cached), (0, 1));
    let all = h.fetch(&repo(), "=0.1.0", true, &Quiet).unwrap();
    assert_eq!(all.variants.len(), 3);
    assert_eq!((all.downloaded, all.cached), (2, 1));
}

#[test]
fn pre_releases_only_when_asked() {
    let (_d, reg) = registry();
    let cache = tempfile::tempdir().unwrap();
    let h = hub(&reg, cache.path(), false, &[]);
    assert_eq!(h.resolve_release(&repo(), "*").unwrap().version.to_string(), "0.1.0");
    assert_eq!(
        h.resolve_release(&repo(), ">=0.2.0-rc.1").unwrap().version.to_string(),
        "0.2.0-rc.1"
    );
    let e = h.resolve_release(&repo(), "^1").unwrap_err();
    assert!(matches!(e, HubError::NoMatchingRelease { .. }), "{e}");
    assert!(e.to_string().contains("it has: 0.2.0-rc.1, 0.1.0"), "{e}");
    let e = h.resolve_release(&repo(), "latest").unwrap_err();
    assert!(e.to_string().contains("^1.2"), "{e}");
}

#[test]
fn load_from_the_store_and_a_tampered_blob_is_refused() {
    let (_d, reg) = registry();
    let cache = tempfile::tempdir().unwrap();
    let h = hub(&reg, cache.path(), false, &[("KHUB_CPU_LEVEL", "x86-64-v1")]);
    let k = h.load("acme/activation", "^0.1").unwrap();
    assert_eq!(k.variant(), "cpu-x86_64-v1-linux");
    assert!(k.selftest("gelu", 1, 1000).unwrap().passed);
    // Corrupt the registry copy: the store already has the verified bytes, so loads keep
    // working; a fresh store refuses the corrupt download.
    let lib = reg.join("acme/activation/0.1.0/variants/cpu-x86_64-v1-linux/libactivation.so");
    let mut bytes = std::fs::read(&lib).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&lib, &bytes).unwrap();
    assert!(h.load("acme/activation", "^0.1").is_ok());
    let fresh = tempfile::tempdir().unwrap();
    let h2 = hub(&reg, fresh.path(), false, &[("KHUB_CPU_LEVEL", "x86-64-v1")]);
    let e = h2.load("acme/activation", "^0.1").unwrap_err().to_string();
    assert!(e.contains("sha256") || e.contains("digest"), "{e}");
    let leftover: Vec<_> = h2.store().list().unwrap().into_iter().map(|(d, _)| d.to_string()).collect();
    assert_eq!(leftover.len(), 1, "only the manifest is stored: {leftover:?}");
}

#[test]
fn lock_then_load_locked_offline_for_several_hosts() {
    let (_d, reg) = registry();
    let cache = tempfile::tempdir().unwrap();
    let h = hub(&reg, cache.path(), false, &[]);
    let app: AppKernels = toml::from_str("[kernels]\n\"acme/activation\" = \"^0.1\"\n").unwrap();
    let v3 = HostFacts::detect(&ProbeOptions::with_env(Environment::from_pairs([("KHUB_CPU_LEVEL", "x86-64-v3")])).unwrap())
        .unwrap()
        .facts;
    let v1 = HostFacts::detect(&ProbeOptions::with_env(Environment::from_pairs([("KHUB_CPU_LEVEL", "x86-64-v1")])).unwrap())
        .unwrap()
        .facts;
    let lock = h
        .lock(&app, &[("v3 host".into(), v3), ("v1 host".into(), v1)], Lockfile::new(), &Quiet)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("khub.lock");
    lock.write(&path).unwrap();
    let lock = Lockfile::read(&path).unwrap();
    let k = &lock.kernels[0];
    assert_eq!(k.version.to_string(), "0.1.0");
    assert_eq!(
        k.targets.iter().map(|t| t.variant.as_str()).collect::<Vec<_>>(),
        ["cpu-x86_64-v3-linux", "cpu-x86_64-v1-linux"]
    );

    // Offline, with the registry gone: the locked load needs nothing but the store.
    std::fs::remove_dir_all(&reg).unwrap();
    let off = hub(&reg, cache.path(), true, &[("KHUB_CPU_LEVEL", "x86-64-v3")]);
    assert_eq!(off.load_locked(&lock, &path, &repo()).unwrap().variant(), "cpu-x86_64-v3-linux");
    let off1 = hub(&reg, cache.path(), true, &[("KHUB_CPU_LEVEL", "x86-64-v1")]);
    assert_eq!(off1.load_locked(&lock, &path, &repo()).unwrap().variant(), "cpu-x86_64-v1-linux");
    // Offline, version resolution uses the releases seen before.
    assert_eq!(off.resolve_release(&repo(), "^0.1").unwrap().version.to_string(), "0.1.0");
    let e = off.resolve_release(&repo(), "^0.3").unwrap_err().to_string();
    assert!(e.contains("offline") && e.contains("khub fetch acme/activation"), "{e}");

    // An empty store: the miss names the file and the command.
    let empty = tempfile::tempdir().unwrap();
    let off2 = hub(&reg, empty.path(), true, &[]);
    let e = off2.load_locked(&lock, &path, &repo()).unwrap_err().to_string();
    assert!(
        e.contains("locked manifest of acme/activation 0.1.0") && e.contains("run `khub fetch acme/activation"),
        "{e}"
    );
    // The manifest is there but the library blob is gone: the miss names the file, its
    // digest and the command (load_locked no longer stats the files first; the open in
    // load_from finds the miss).
    let lib = &lock.kernels[0].targets[0].files[0];
    let hex = lib.sha256.to_string();
    let blob = cache.path().join("store-v1/blobs").join(&hex[..2]).join(&hex);
    let kept = std::fs::read(&blob).unwrap();
    std::fs::remove_file(&blob).unwrap();
    let e = off.load_locked(&lock, &path, &repo()).unwrap_err();
    assert!(matches!(e, HubError::OfflineMiss { .. }), "{e:?}");
    let e = e.to_string();
    assert!(
        e.contains(&format!("file `{}` (sha256 {hex}) of acme/activation 0.1.0", lib.path))
            && e.contains("run `khub fetch acme/activation"),
        "{e}"
    );
    std::fs::write(&blob, kept).unwrap();
    assert_eq!(off.load_locked(&lock, &path, &repo()).unwrap().variant(), "cpu-x86_64-v3-linux");
    // A lock with an edited digest is refused, naming the file.
    let edited = std::fs::read_to_string(&path).unwrap();
    let digest = lock.kernels[0].targets[0].files[0].sha256.to_string();
    std::fs::write(&path, edited.replacen(&digest, &"0".repeat(64), 1)).unwrap();
    let bad = Lockfile::read(&path).unwrap();
    let e = off.load_locked(&bad, &path, &repo()).unwrap_err().to_string();
    assert!(e.contains("variants/cpu-x86_64-v3-linux/libactivation.so"), "{e}");
}

#[test]
fn offline_mode_never_constructs_a_registry() {
    let (_d, reg) = registry();
    let cache = tempfile::tempdir().unwrap();
    let off = hub(&reg, cache.path(), true, &[]);
    let e = off.fetch(&repo(), "^0.1", false, &Quiet).unwrap_err().to_string();
    assert!(
        e.contains("offline") && e.contains("khub fetch acme/activation --version '^0.1'"),
        "{e}"
    );
}
