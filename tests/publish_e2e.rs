//! From `khub init` to a signed release on `khub serve` to a verified load in another
//! process, all through the CLI.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

mod common;

use std::path::Path;
use std::process::Output;

use khub::serve::{ServeOptions, Server};

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn init_package_sign_publish_and_load_elsewhere() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let pkg = w.join("mykernel");
    let rel = w.join("release");
    let registry = w.join("registry");
    std::fs::create_dir_all(&registry).unwrap();
    // Only CPU variants: this test is about the release path, and nvcc may be absent.
    let env_common: Vec<(&str, String)> = vec![("KHUB_NVCC", "/nonexistent/nvcc".into())];
    let env = |extra: &[(&'static str, String)]| -> Vec<(&'static str, String)> {
        env_common.iter().cloned().chain(extra.iter().cloned()).collect()
    };
    let run = |args: &[&str], env: &[(&'static str, String)]| {
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        common::khub(args, &pairs)
    };

    ok(run(&["init", s(&pkg)], &env(&[])), "init");
    let out = ok(run(&["package", s(&pkg), "--out", s(&rel)], &env(&[])), "package");
    assert!(out.contains("packaged mykernel 0.1.0"), "{out}");
    ok(
        run(
            &["keygen", "--public", s(&w.join("k.pub")), "--secret", s(&w.join("k.key"))],
            &env(&[]),
        ),
        "keygen",
    );
    let out = ok(
        run(
            &[
                "sign",
                s(&rel),
                "--key",
                s(&w.join("k.key")),
                "--repo",
                "acme/mykernel",
                "--expires",
                "30d",
            ],
            &env(&[]),
        ),
        "sign",
    );
    assert!(out.contains("khub-release repo=acme/mykernel version=0.1.0"), "{out}");

    let server = Server::start(
        &registry,
        "127.0.0.1:0",
        ServeOptions {
            write_token: Some("publish-secret".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let url = server.url();
    let out = ok(
        run(
            &[
                "publish",
                s(&rel),
                "--to",
                "acme/mykernel",
                "--registry",
                &url,
                "--create",
                "--json",
            ],
            &env(&[("HF_TOKEN", "publish-secret".into())]),
        ),
        "publish",
    );
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["tag"], "v0.1.0");
    assert_eq!(report["verified"], true);
    assert_eq!(report["signed"], true);
    // Publishing the same version again is refused: releases are immutable.
    let again = run(
        &["publish", s(&rel), "--to", "acme/mykernel", "--registry", &url],
        &env(&[("HF_TOKEN", "publish-secret".into())]),
    );
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("immutable"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    // Without the token the server refuses to be written, and the hint says so. (An
    // unsigned copy: the signed release names acme/mykernel, and publish refuses to send
    // it anywhere else before asking the server.)
    let unsigned = w.join("unsigned");
    common::copy_dir(&rel, &unsigned);
    std::fs::remove_file(unsigned.join("khub.toml.minisig")).unwrap();
    let anon = run(
        &["publish", s(&unsigned), "--to", "acme/other", "--registry", &url, "--create"],
        &env(&[]),
    );
    assert!(!anon.status.success());
    let err = String::from_utf8_lossy(&anon.stderr);
    assert!(err.contains("refused write access") && err.contains("--write-token"), "{err}");
    let signed_elsewhere = run(
        &["publish", s(&rel), "--to", "acme/other", "--registry", &url, "--create"],
        &env(&[("KHUB_TOKEN", "publish-secret".into())]),
    );
    assert!(!signed_elsewhere.status.success());
    assert!(String::from_utf8_lossy(&signed_elsewhere.stderr).contains("signed for acme/mykernel"));

    // Another process, another store, a strict policy trusting the key.
    let key = std::fs::read_to_string(w.join("k.pub")).unwrap();
    let key_line = key.lines().nth(1).unwrap();
    let policy = w.join("trust.toml");
    std::fs::write(
        &policy,
        format!("require-signature = true\n\n[[publisher]]\nrepos = [\"acme/*\"]\nkeys = [\"{key_line}\"]\n"),
    )
    .unwrap();
    let host_env = env(&[
        ("KHUB_CACHE", s(&w.join("cache")).to_owned()),
        ("KHUB_STATE_DIR", s(&w.join("state")).to_owned()),
        ("KHUB_TRUST_POLICY", s(&policy).to_owned()),
    ]);
    let out = ok(
        run(
            &["load", "acme/mykernel", "--version", "^0.1", "--registry", &url, "--json"],
            &host_env,
        ),
        "load",
    );
    let loaded: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(loaded["kernel"], "mykernel");
    let out = ok(
        run(&["selftest", "acme/mykernel", "--version", "^0.1", "--registry", &url], &host_env),
        "selftest",
    );
    assert!(out.contains("pass  scale"), "{out}");

    // A policy trusting another key refuses the same release.
    let other = w.join("other");
    std::fs::create_dir_all(&other).unwrap();
    ok(
        run(
            &["keygen", "--public", s(&other.join("o.pub")), "--secret", s(&other.join("o.key"))],
            &env(&[]),
        ),
        "keygen 2",
    );
    let other_line = std::fs::read_to_string(other.join("o.pub"))
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .to_owned();
    std::fs::write(
        &policy,
        format!("require-signature = true\n\n[[publisher]]\nrepos = [\"acme/*\"]\nkeys = [\"{other_line}\"]\n"),
    )
    .unwrap();
    let fresh_env = env(&[
        ("KHUB_CACHE", s(&w.join("cache2")).to_owned()),
        ("KHUB_STATE_DIR", s(&w.join("state2")).to_owned()),
        ("KHUB_TRUST_POLICY", s(&policy).to_owned()),
    ]);
    let refused = run(&["load", "acme/mykernel", "--version", "^0.1", "--registry", &url], &fresh_env);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("does not trust") || err.contains("not trust"), "{err}");

    // The minisign CLI, when installed, verifies khub's signature with khub's key.
    if std::process::Command::new("minisign").arg("-v").output().is_ok() {
        let out = std::process::Command::new("minisign")
            .args(["-V", "-p", s(&w.join("k.pub")), "-m", s(&rel.join("khub.toml"))])
            .output()
            .unwrap();
        assert!(out.status.success(), "minisign -V: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("khub-release repo=acme/mykernel"));
    } else {
        eprintln!("minisign CLI not installed: interop check skipped here (tests/minisign_interop.rs covers it where installed)");
    }
}
