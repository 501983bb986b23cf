//! Hostile releases: each is refused with a clear error before any of its code is loaded.
//! Signatures and the trust policy are checked on the raw manifest bytes before parsing;
//! file-level tampering is caught by the store and the loader before `dlopen`.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

mod common;

use common::copy_dir;

use std::path::{Path, PathBuf};

use khub::host::{Environment, HostFacts, ProbeOptions};
use khub::hub::{Hub, HubError, HubOptions, RegistrySpec};
use khub::registry::RepoId;
use khub::verify::sign::{ReleaseClaim, SecretKey};
use khub::verify::trust::TrustPolicy;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

struct Keys {
    sk: SecretKey,
    pk: khub::verify::sign::PublicKey,
}

fn keys() -> Keys {
    let (pk_text, sk_text) = khub::verify::sign::keygen(None).unwrap();
    Keys {
        sk: SecretKey::parse(&sk_text, None).unwrap(),
        pk: pk_text.parse().unwrap(),
    }
}

/// Writes release `version` of acme/activation (kernels-example's CPU build, manifest
/// version rewritten) into the registry, signed with `keys` unless `None`.
fn release(root: &Path, version: &str, keys: Option<&Keys>, expires: Option<u64>) -> PathBuf {
    let dir = root.join("acme/activation").join(version);
    copy_dir(common::example_release(), &dir);
    let m = dir.join("khub.toml");
    let text = std::fs::read_to_string(&m)
        .unwrap()
        .replace("version = \"0.1.0\"", &format!("version = \"{version}\""));
    std::fs::write(&m, &text).unwrap();
    if let Some(k) = keys {
        let claim = ReleaseClaim {
            repo: repo(),
            version: version.parse().unwrap(),
            timestamp: now(),
            expires,
        };
        std::fs::write(
            dir.join("khub.toml.minisig"),
            khub::verify::sign::sign(&k.sk, text.as_bytes(), &claim).unwrap(),
        )
        .unwrap();
    }
    dir
}

fn repo() -> RepoId {
    "acme/activation".parse().unwrap()
}

fn hub(root: &Path, cache: &Path, trust: TrustPolicy, state: Option<&Path>) -> Hub {
    let env = Environment::from_pairs([("KHUB_CPU_LEVEL", "x86-64-v1")]);
    let host = HostFacts::detect(&ProbeOptions::with_env(env.clone()).unwrap()).unwrap().facts;
    Hub::new(HubOptions {
        env,
        registry: RegistrySpec::Dir(root.to_owned()),
        cache: cache.to_owned(),
        offline: false,
        host,
        preferences: Default::default(),
        jobs: 2,
        trust,
        state_dir: state.map(Path::to_owned),
    })
    .unwrap()
}

fn strict(k: &Keys) -> TrustPolicy {
    TrustPolicy::permissive().require_signature(true).trust_key("acme/*", k.pk.clone())
}

/// Loads through the hub; returns the error text (and checks nothing was stored but
/// metadata, i.e. no library bytes were fetched).
fn refused(h: &Hub, req: &str) -> String {
    let e = h.load("acme/activation", req).expect_err("must be refused");
    let libs = h.store().list().unwrap().into_iter().filter(|(_, size)| *size > 10_000).count();
    assert_eq!(libs, 0, "no library was fetched for a refused release ({e})");
    e.to_string()
}

#[test]
fn a_signed_release_loads_under_the_strict_policy() {
    let k = keys();
    let reg = tempfile::tempdir().unwrap();
    release(reg.path(), "0.1.0", Some(&k), Some(now() + 3600));
    // The descriptor says 0.1.0, which matches this release.
    let cache = tempfile::tempdir().unwrap();
    let kernel = hub(reg.path(), cache.path(), strict(&k), None)
        .load("acme/activation", "^0.1")
        .unwrap();
    assert_eq!(kernel.version(), "0.1.0");
}

#[test]
fn unsigned_under_the_strict_policy() {
    let k = keys();
    let reg = tempfile::tempdir().unwrap();
    release(reg.path(), "0.1.0", None, None);
    let cache = tempfile::tempdir().unwrap();
    let e = refused(&hub(reg.path(), cache.path(), strict(&k), None), "^0.1");
    assert!(e.contains("unsigned") || e.contains("Unsigned") || e.contains("not signed"), "{e}");
    assert!(e.contains("khub sign"), "the message says how to fix it: {e}");
    // The permissive policy (the default) accepts it.
    assert!(
        hub(reg.path(), cache.path(), TrustPolicy::permissive(), None)
            .load("acme/activation", "^0.1")
            .is_ok()
    );
}

#[test]
fn signed_with_the_wrong_key() {
    let (k, other) = (keys(), keys());
    let reg = tempfile::tempdir().unwrap();
    release(reg.path(), "0.1.0", Some(&other), None);
    let cache = tempfile::tempdir().unwrap();
    let e = refused(&hub(reg.path(), cache.path(), strict(&k), None), "^0.1");
    assert!(e.contains(&other.pk.key_id()), "names the signing key: {e}");
}

#[test]
fn a_signature_over_different_bytes_and_an_edited_manifest() {
    let k = keys();
    let reg = tempfile::tempdir().unwrap();
    let dir = release(reg.path(), "0.1.0", Some(&k), None);
    // A signature of another manifest, put beside this one.
    let other = tempfile::tempdir().unwrap();
    let odir = release(other.path(), "0.1.0", None, None);
    let mut text = std::fs::read_to_string(odir.join("khub.toml")).unwrap();
    text.push_str("\n# another release\n");
    let claim = ReleaseClaim {
        repo: repo(),
        version: "0.1.0".parse().unwrap(),
        timestamp: now(),
        expires: None,
    };
    std::fs::write(
        dir.join("khub.toml.minisig"),
        khub::verify::sign::sign(&k.sk, text.as_bytes(), &claim).unwrap(),
    )
    .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let e = refused(&hub(reg.path(), cache.path(), strict(&k), None), "^0.1");
    assert!(e.contains("does not match"), "{e}");

    // Edited after signing: sign, then change one byte of the manifest.
    let reg2 = tempfile::tempdir().unwrap();
    let dir2 = release(reg2.path(), "0.1.0", Some(&k), None);
    let m = dir2.join("khub.toml");
    let edited = std::fs::read_to_string(&m).unwrap().replacen("SiLU", "SILU", 1);
    std::fs::write(&m, edited).unwrap();
    let cache2 = tempfile::tempdir().unwrap();
    let e = refused(&hub(reg2.path(), cache2.path(), strict(&k), None), "^0.1");
    assert!(e.contains("does not match"), "{e}");
}

#[test]
fn a_signature_replayed_for_another_release() {
    let k = keys();
    let reg = tempfile::tempdir().unwrap();
    let dir = release(reg.path(), "0.1.0", None, None);
    let bytes = std::fs::read(dir.join("khub.toml")).unwrap();
    let claim = ReleaseClaim {
        repo: "acme/other".parse().unwrap(),
        version: "0.1.0".parse().unwrap(),
        timestamp: now(),
        expires: None,
    };
    std::fs::write(
        dir.join("khub.toml.minisig"),
        khub::verify::sign::sign(&k.sk, &bytes, &claim).unwrap(),
    )
    .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let e = refused(&hub(reg.path(), cache.path(), strict(&k), None), "^0.1");
    assert!(e.contains("acme/other"), "{e}");
}

#[test]
fn an_expired_signature() {
    let k = keys();
    let reg = tempfile::tempdir().unwrap();
    release(reg.path(), "0.1.0", Some(&k), Some(now() - 60));
    let cache = tempfile::tempdir().unwrap();
    let e = refused(&hub(reg.path(), cache.path(), strict(&k), None), "^0.1");
    assert!(e.to_lowercase().contains("expired"), "{e}");
}

#[test]
fn a_rollback_is_refused_unless_allowed() {
    let k = keys();
    let reg = tempfile::tempdir().unwrap();
    release(reg.path(), "0.1.0", Some(&k), None);
    let newer = release(reg.path(), "0.1.1", Some(&k), None);
    let state = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let h = hub(reg.path(), cache.path(), strict(&k), Some(state.path()));
    // Resolving alone records nothing: the state advances once the files are verified.
    assert_eq!(h.resolve_release(&repo(), "^0.1").unwrap().version.to_string(), "0.1.1");
    assert!(!state.path().join("rollback.toml").exists());
    assert_eq!(h.fetch(&repo(), "^0.1", false, &khub::hub::Quiet).unwrap().version, "0.1.1");
    // The registry now hides 0.1.1 (a mirror serving stale refs).
    std::fs::remove_dir_all(&newer).unwrap();
    let fresh = tempfile::tempdir().unwrap();
    let h = hub(reg.path(), fresh.path(), strict(&k), Some(state.path()));
    let e = h.resolve_release(&repo(), "^0.1").unwrap_err();
    assert!(matches!(e, HubError::Trust(_)), "{e}");
    assert!(e.to_string().contains("0.1.1") && e.to_string().contains("0.1.0"), "{e}");
    // A requirement that excludes the newer version is not a rollback.
    assert!(h.resolve_release(&repo(), "=0.1.0").is_ok());
    // Explicitly allowed.
    let allowed = hub(
        reg.path(),
        fresh.path(),
        strict(&k).allow_rollback("acme/activation"),
        Some(state.path()),
    );
    assert_eq!(allowed.resolve_release(&repo(), "^0.1").unwrap().version.to_string(), "0.1.0");
}

#[test]
fn file_level_tampering_is_refused_before_dlopen() {
    let k = keys();
    let lib = "variants/cpu-x86_64-v1-linux/libactivation.so";
    for (case, tamper) in [
        (
            "digest mismatch",
            Box::new(|p: &Path| {
                let mut b = std::fs::read(p).unwrap();
                b[200] ^= 1;
                std::fs::write(p, b).unwrap();
            }) as Box<dyn Fn(&Path)>,
        ),
        (
            "truncated",
            Box::new(|p: &Path| {
                let b = std::fs::read(p).unwrap();
                std::fs::write(p, &b[..b.len() / 2]).unwrap();
            }),
        ),
        ("missing", Box::new(|p: &Path| std::fs::remove_file(p).unwrap())),
        (
            "symlink",
            Box::new(|p: &Path| {
                let real = p.with_extension("real");
                std::fs::rename(p, &real).unwrap();
                std::os::unix::fs::symlink(&real, p).unwrap();
            }),
        ),
    ] {
        let reg = tempfile::tempdir().unwrap();
        let dir = release(reg.path(), "0.1.0", Some(&k), None);
        tamper(&dir.join(lib));
        let cache = tempfile::tempdir().unwrap();
        let e = refused(&hub(reg.path(), cache.path(), strict(&k), None), "^0.1");
        assert!(e.contains("libactivation.so"), "{case}: {e}");
    }
}

#[test]
fn a_release_directory_with_extra_files_symlinks_or_traversal_is_refused() {
    let host = HostFacts::detect(&ProbeOptions::with_env(Environment::from_pairs([("KHUB_CPU_LEVEL", "x86-64-v1")])).unwrap())
        .unwrap()
        .facts;
    let d = tempfile::tempdir().unwrap();
    // Extra file.
    let rel = d.path().join("extra");
    copy_dir(common::example_release(), &rel);
    std::fs::write(rel.join("variants/cpu-x86_64-v1-linux/evil.so"), b"x").unwrap();
    let e = khub::Release::open(&rel)
        .unwrap()
        .load(&host, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("evil.so") && e.contains("does not list"), "{e}");
    // A symlink anywhere in the tree.
    let rel = d.path().join("link");
    copy_dir(common::example_release(), &rel);
    std::os::unix::fs::symlink("/etc/passwd", rel.join("variants/passwd")).unwrap();
    let e = khub::Release::open(&rel)
        .unwrap()
        .load(&host, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("variants/passwd") && e.contains("symlink"), "{e}");
    // Path traversal in the manifest.
    let rel = d.path().join("traversal");
    copy_dir(common::example_release(), &rel);
    let m = rel.join("khub.toml");
    let text = std::fs::read_to_string(&m).unwrap().replace(
        "\"variants/cpu-x86_64-v1-linux/libactivation.so\"",
        "\"variants/../../../etc/passwd\"",
    );
    std::fs::write(&m, text).unwrap();
    let e = khub::Release::open(&rel).unwrap_err().to_string();
    assert!(e.contains("`..`"), "{e}");
}
