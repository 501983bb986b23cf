//! How the CLI reports errors: each cause once, and one JSON object on stderr with --json.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

mod common;

#[test]
fn causes_are_said_once() {
    let out = common::khub(&["inspect", "/nonexistent/libk.so"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    let out = common::khub(&["host"], &[("KHUB_CPU_LEVEL", "bogus")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("bogus").count(), 1, "{err}");
}

#[test]
fn json_errors_are_one_object_on_stderr() {
    let cache = tempfile::tempdir().unwrap();
    let out = common::khub(
        &["fetch", "acme/activation", "--registry", "/nonexistent/registry", "--json"],
        &[("KHUB_CACHE", cache.path().to_str().unwrap())],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let doc: serde_json::Value = serde_json::from_slice(&out.stderr).expect("stderr is one JSON document");
    assert!(doc["error"]["message"].as_str().unwrap().contains("/nonexistent/registry"), "{doc}");
    assert_eq!(doc["error"]["exit-code"], 2);
}

#[test]
fn input_is_recognised_for_what_it_is() {
    let cache = tempfile::tempdir().unwrap();
    let c = cache.path().to_str().unwrap();
    let out = common::khub(&["load", "/tmp/khub-does-not-exist"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/tmp/khub-does-not-exist does not exist"), "{err}");
    let out = common::khub(&["fetch", "acme/activation", "--registry", "127.0.0.1:8080"], &[("KHUB_CACHE", c)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("http://127.0.0.1:8080"), "{err}");
}

#[test]
fn cache_flag_needs_no_home() {
    let cache = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_khub"))
        .args(["fetch", "acme/activation", "--registry", "/nonexistent/registry", "--cache"])
        .arg(cache.path())
        .env_remove("HOME")
        .env_remove("KHUB_CACHE")
        .env_remove("XDG_CACHE_HOME")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/registry") && !err.contains("cache directory"), "{err}");
}
