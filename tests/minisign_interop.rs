//! khub's signatures and the `minisign` command-line tool, in both directions: keys made by
//! either, signatures made by either, checked by the other.
//!
//! Needs the `minisign` CLI (`apt-get install minisign`; CI installs it). Without it each
//! test prints "skipped: …" and passes.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use khub::verify::sign::{self, ReleaseClaim};

const SKIP: &str = "skipped: minisign not installed (apt-get install minisign)";

fn have_minisign() -> bool {
    let found = Command::new("minisign")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        println!("{SKIP}");
    }
    found
}

/// Runs minisign with `args`, feeding `stdin`, and returns its output.
fn minisign(args: &[&str], stdin: &str, dir: &Path) -> Output {
    let mut child = Command::new("minisign")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn minisign");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn ok(out: &Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "minisign failed ({}): {text}", out.status);
    text
}

fn claim() -> ReleaseClaim {
    ReleaseClaim {
        repo: "acme/activation".parse().unwrap(),
        version: semver::Version::parse("1.2.3").unwrap(),
        timestamp: 1_700_000_000,
        expires: Some(4_000_000_000),
    }
}

const MANIFEST: &[u8] = b"[kernel]\nname = \"activation\"\nversion = \"1.2.3\"\n";

#[test]
fn cli_keys_work_with_khub() {
    if !have_minisign() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&minisign(&["-G", "-W", "-p", "cli.pub", "-s", "cli.key"], "", d));
    std::fs::write(d.join("khub.toml"), MANIFEST).unwrap();
    let pk = sign::read_public_key(&d.join("cli.pub")).unwrap();

    // The CLI signs with a khub trusted comment; khub verifies.
    let trusted = claim().to_string();
    ok(&minisign(&["-S", "-s", "cli.key", "-m", "khub.toml", "-t", &trusted], "", d));
    let sig = std::fs::read(d.join("khub.toml.minisig")).unwrap();
    assert_eq!(sign::signature_key_id(&sig).unwrap(), pk.key_id());
    let v = sign::verify(&pk, MANIFEST, &sig).unwrap();
    assert_eq!(v.trusted_comment.parse::<ReleaseClaim>().unwrap(), claim());
    // The CLI's legacy (non-prehashed) format is accepted too.
    ok(&minisign(
        &[
            "-S",
            "-l",
            "-s",
            "cli.key",
            "-m",
            "khub.toml",
            "-x",
            "legacy.minisig",
            "-t",
            &trusted,
        ],
        "",
        d,
    ));
    sign::verify(&pk, MANIFEST, &std::fs::read(d.join("legacy.minisig")).unwrap()).unwrap();
    // And a changed manifest is refused.
    assert!(sign::verify(&pk, b"changed", &sig).is_err());

    // khub signs with the CLI's unencrypted key; the CLI verifies and prints the claim.
    let sk = sign::read_secret_key(&d.join("cli.key"), None).unwrap();
    assert_eq!(sk.key_id(), pk.key_id());
    std::fs::write(d.join("khub.toml.minisig"), sign::sign(&sk, MANIFEST, &claim()).unwrap()).unwrap();
    let out = ok(&minisign(&["-V", "-p", "cli.pub", "-m", "khub.toml"], "", d));
    assert!(out.contains(&format!("Trusted comment: {trusted}")), "{out}");
    // Prehashed: verifies even where only prehashed signatures are accepted.
    ok(&minisign(&["-V", "-H", "-p", "cli.pub", "-m", "khub.toml"], "", d));
    // The CLI refuses it for changed bytes, as khub does.
    std::fs::write(d.join("khub.toml"), b"changed").unwrap();
    assert!(!minisign(&["-V", "-p", "cli.pub", "-m", "khub.toml"], "", d).status.success());
}

#[test]
fn khub_keys_work_with_the_cli() {
    if !have_minisign() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (pub_text, key_text) = sign::keygen(None).unwrap();
    std::fs::write(d.join("khub.pub"), &pub_text).unwrap();
    std::fs::write(d.join("khub.key"), &key_text).unwrap();
    std::fs::write(d.join("khub.toml"), MANIFEST).unwrap();
    let pk = sign::read_public_key(&d.join("khub.pub")).unwrap();
    let sk = sign::read_secret_key(&d.join("khub.key"), None).unwrap();

    // khub signs; the CLI verifies with khub's .pub file and with the base64 key.
    std::fs::write(d.join("khub.toml.minisig"), sign::sign(&sk, MANIFEST, &claim()).unwrap()).unwrap();
    let out = ok(&minisign(&["-V", "-p", "khub.pub", "-m", "khub.toml"], "", d));
    assert!(out.contains(&format!("Trusted comment: {}", claim())), "{out}");
    ok(&minisign(&["-V", "-P", &pk.to_string(), "-m", "khub.toml"], "", d));

    // The CLI signs with khub's (unencrypted) secret key; khub verifies.
    let other = ReleaseClaim { expires: None, ..claim() };
    ok(&minisign(
        &[
            "-S",
            "-W",
            "-s",
            "khub.key",
            "-m",
            "khub.toml",
            "-x",
            "cli.minisig",
            "-t",
            &other.to_string(),
        ],
        "",
        d,
    ));
    let v = sign::verify(&pk, MANIFEST, &std::fs::read(d.join("cli.minisig")).unwrap()).unwrap();
    assert_eq!(v.key_id, pk.key_id());
    assert_eq!(v.trusted_comment.parse::<ReleaseClaim>().unwrap(), other);

    // The CLI recreates the same public key from khub's secret key.
    ok(&minisign(&["-R", "-W", "-s", "khub.key", "-p", "again.pub"], "", d));
    assert_eq!(sign::read_public_key(&d.join("again.pub")).unwrap(), pk);
}

#[test]
fn khub_encrypted_keys_work_with_the_cli() {
    if !have_minisign() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (pub_text, key_text) = sign::keygen(Some("hunter2")).unwrap();
    std::fs::write(d.join("enc.pub"), &pub_text).unwrap();
    std::fs::write(d.join("enc.key"), &key_text).unwrap();
    std::fs::write(d.join("khub.toml"), MANIFEST).unwrap();
    // The CLI decrypts khub's key (password on stdin) and signs; khub verifies.
    ok(&minisign(
        &["-S", "-s", "enc.key", "-m", "khub.toml", "-t", &claim().to_string()],
        "hunter2\n",
        d,
    ));
    let pk = sign::read_public_key(&d.join("enc.pub")).unwrap();
    sign::verify(&pk, MANIFEST, &std::fs::read(d.join("khub.toml.minisig")).unwrap()).unwrap();
}

#[test]
fn cli_encrypted_keys_need_their_password() {
    if !have_minisign() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The CLI asks for the password twice; it reads them from stdin when it is not a tty.
    ok(&minisign(
        &["-G", "-p", "enc.pub", "-s", "enc.key"],
        "s3cret pass\ns3cret pass\n",
        d,
    ));
    let key = d.join("enc.key");
    assert!(matches!(
        sign::read_secret_key(&key, None),
        Err(sign::SignError::PasswordRequired { .. })
    ));
    let sk = sign::read_secret_key(&key, Some("s3cret pass")).unwrap();
    let pk = sign::read_public_key(&d.join("enc.pub")).unwrap();
    assert_eq!(sk.key_id(), pk.key_id());
    std::fs::write(d.join("khub.toml"), MANIFEST).unwrap();
    std::fs::write(d.join("khub.toml.minisig"), sign::sign(&sk, MANIFEST, &claim()).unwrap()).unwrap();
    ok(&minisign(&["-V", "-p", "enc.pub", "-m", "khub.toml"], "", d));
    // (A wrong password is tested on khub's own keys in src/sign.rs: each try on a CLI key
    // costs a 1 GiB scrypt, minutes in a debug build.)
}
