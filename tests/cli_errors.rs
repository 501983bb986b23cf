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

#[test]
fn lock_prunes_removed_kernels_stores_tidy_paths_and_errors_name_the_files_given() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let reg = w.join("registry");
    for name in ["a", "b"] {
        common::copy_dir(common::example_release(), &reg.join("acme").join(name).join("0.1.0"));
    }
    std::fs::create_dir_all(w.join("lk")).unwrap();
    let run = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_khub"));
        cmd.args(args).current_dir(w);
        for var in khub::env::ALL {
            cmd.env_remove(var);
        }
        cmd.env("KHUB_CACHE", w.join("cache")).env("KHUB_CPU_LEVEL", "x86-64-v1");
        cmd.output().unwrap()
    };
    let say = |o: &std::process::Output| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    std::fs::write(w.join("k1.toml"), "[kernels]\n\"acme/a\" = \"^0.1\"\n\"acme/b\" = \"^0.1\"\n").unwrap();
    let o = run(&["lock", "--app", "k1.toml", "--out", "l.lock", "--registry", "lk/../registry"]);
    assert!(o.status.success(), "{}", say(&o));
    let text = std::fs::read_to_string(w.join("l.lock")).unwrap();
    assert!(!text.contains(".."), "the registry path is stored tidy: {text}");
    std::fs::write(w.join("k1.toml"), "[kernels]\n\"acme/a\" = \"^0.1\"\n").unwrap();
    let o = run(&["lock", "--app", "k1.toml", "--out", "l.lock", "--registry", "registry"]);
    assert!(o.status.success() && say(&o).contains("removed acme/b"), "{}", say(&o));
    let text = std::fs::read_to_string(w.join("l.lock")).unwrap();
    assert!(text.contains("acme/a") && !text.contains("acme/b"), "{text}");

    // Errors name the files given, not the defaults.
    std::fs::write(w.join("bad.toml"), "[kernels\n").unwrap();
    let o = run(&["lock", "--app", "bad.toml", "--out", "l.lock", "--registry", "registry"]);
    assert!(
        !o.status.success() && say(&o).contains("bad.toml") && !say(&o).contains("kernels.toml"),
        "{}",
        say(&o)
    );
    // Edit the last file digest of the lock (a hand-edited lock).
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let i = lines.iter().rposition(|l| l.trim_start().starts_with("sha256 = \"")).unwrap();
    let last_hex = lines[i].rfind(|c: char| c.is_ascii_hexdigit()).unwrap();
    let mut bytes = std::mem::take(&mut lines[i]).into_bytes();
    bytes[last_hex] = if bytes[last_hex] == b'0' { b'1' } else { b'0' };
    lines[i] = String::from_utf8(bytes).unwrap();
    std::fs::write(w.join("l.lock"), lines.join("\n") + "\n").unwrap();
    let o = run(&["load", "acme/a", "--locked", "--lock", "l.lock", "--offline"]);
    assert!(!o.status.success() && say(&o).contains("l.lock pins"), "{}", say(&o));
}

#[test]
fn versions_lists_releases_online_and_offline() {
    let work = tempfile::tempdir().unwrap();
    let reg = work.path().join("registry");
    common::copy_dir(common::example_release(), &reg.join("acme/activation/0.1.0"));
    let cache = work.path().join("cache");
    let env = [("KHUB_CACHE", cache.to_str().unwrap()), ("KHUB_CPU_LEVEL", "x86-64-v1")];
    let r = reg.to_str().unwrap();
    let out = common::khub(&["versions", "acme/activation", "--registry", r], &env);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("0.1.0") && text.contains("unsigned"),
        "{text}"
    );
    assert!(text.contains("cpu-x86_64-v1-linux"), "{text}");
    // Offline: only what this machine has verified.
    let out = common::khub(&["versions", "acme/activation", "--registry", r, "--offline"], &env);
    assert!(String::from_utf8_lossy(&out.stdout).contains("no releases"), "{out:?}");
    let out = common::khub(&["fetch", "acme/activation", "--registry", r], &env);
    assert!(out.status.success(), "{out:?}");
    let out = common::khub(&["versions", "acme/activation", "--registry", r, "--offline", "--json"], &env);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc[0]["version"], "0.1.0");
    assert_eq!(doc[0]["variants"].as_array().unwrap().len(), 3);
}

#[test]
fn a_closed_pipe_ends_output_quietly() {
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_khub"))
        .args(["host"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away at once, like `| head -0`
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(out.status.code(), Some(101), "{err}");
}

#[test]
fn a_benchmark_of_nothing_is_refused() {
    let rel = common::example_release().to_str().unwrap().to_owned();
    let out = common::khub(&["bench", &rel, "gelu", "--size", "0"], &[("KHUB_CPU_LEVEL", "x86-64-v1")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--size"), "{out:?}");
}
