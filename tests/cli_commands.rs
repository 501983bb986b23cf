//! The commands a first hour reaches for, and what they say: remote explain, add/remove,
//! -q/-v, publishing into a directory registry, an unreachable registry's root cause and
//! its --offline hint, and output details (glibc 2.2.5, a variant named once).
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A directory registry holding the CPU-only example release as acme/activation 0.1.0.
fn registry(root: &Path) -> String {
    let reg = root.join("registry");
    common::copy_dir(common::example_release(), &reg.join("acme/activation/0.1.0"));
    reg.to_str().unwrap().to_owned()
}

fn blobs(cache: &Path) -> usize {
    let mut n = 0;
    if let Ok(dirs) = std::fs::read_dir(cache.join("store-v1/blobs")) {
        for d in dirs {
            n += std::fs::read_dir(d.unwrap().path()).unwrap().count();
        }
    }
    n
}

#[test]
fn explain_reads_a_remote_repository_fetching_only_its_manifest() {
    let w = tempfile::tempdir().unwrap();
    let reg = registry(w.path());
    let cache = w.path().join("cache");
    let env = [("KHUB_CACHE", cache.to_str().unwrap()), ("KHUB_CPU_LEVEL", "x86-64-v3")];
    let o = common::khub(&["explain", "acme/activation", "--version", "^0.1", "--registry", &reg], &env);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("activation 0.1.0: 3 variants, 2 accepted") && t.contains("chosen: cpu-x86_64-v3-linux"),
        "{t}"
    );
    assert_eq!(blobs(&cache), 1, "only the manifest is fetched");
    let o = common::khub(&["explain", "acme/activation", "--registry", &reg, "--json"], &env);
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["chosen"], "cpu-x86_64-v3-linux", "{doc}");
    // A directory named like a repository stays the directory (explain loads nothing) …
    let o = common::khub(&["explain", "examples/sample-release", "--host", "examples/hosts/h100.toml"], &env);
    assert!(o.status.success(), "{}", text(&o));
    // … unless a registry option asks for the repository.
    let o = common::khub(&["explain", "examples/sample-release", "--registry", &reg], &env);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("examples/sample-release"), "{}", text(&o));
    // --version on a local release is a mistake, said as such.
    let o = common::khub(&["explain", "./examples/sample-release", "--version", "^1"], &env);
    assert!(text(&o).contains("--version applies to a repository"), "{}", text(&o));
    let o = common::khub(&["explain", "nope"], &env);
    assert!(text(&o).contains("cannot read nope"), "{}", text(&o));
}

#[test]
fn an_unreachable_registry_names_the_root_cause_and_suggests_offline() {
    let w = tempfile::tempdir().unwrap();
    let reg = registry(w.path());
    let cache = w.path().join("cache");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let mut server = Command::new(env!("CARGO_BIN_EXE_khub"))
        .args(["serve", &reg, "--addr", &format!("127.0.0.1:{port}")])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let up = (0..200).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(25));
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(up, "khub serve did not start");
    let env = [
        ("KHUB_CACHE", cache.to_str().unwrap()),
        ("KHUB_CPU_LEVEL", "x86-64-v1"),
        ("KHUB_HTTP_RETRIES", "0"),
    ];
    let o = common::khub(&["fetch", "acme/activation", "--registry", &url], &env);
    assert!(o.status.success(), "{}", text(&o));
    server.kill().unwrap();
    server.wait().unwrap();

    let o = common::khub(&["load", "acme/activation", "--registry", &url], &env);
    let t = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(t.contains("Connection refused"), "the root cause: {t}");
    assert_eq!(t.matches(&format!("{url}/api")).count(), 1, "the URL once: {t}");
    let hint = t
        .lines()
        .find(|l| l.starts_with("hint: "))
        .unwrap_or_else(|| panic!("a hint line: {t}"));
    assert!(
        hint.contains("1 release of acme/activation") && hint.contains("--offline"),
        "{hint}"
    );
    assert_eq!(t.lines().filter(|l| l.starts_with("hint: ")).count(), 1, "{t}");
    // With --json: one object with the kind, the message and the hint.
    let o = common::khub(&["load", "acme/activation", "--registry", &url, "--json"], &env);
    let doc: serde_json::Value = serde_json::from_slice(&o.stderr).unwrap();
    assert_eq!(doc["error"]["code"], "registry", "{doc}");
    assert!(doc["error"]["hint"].as_str().unwrap().contains("--offline"), "{doc}");
    // The hint is right: offline, the release loads.
    let o = common::khub(&["load", "acme/activation", "--registry", &url, "--offline"], &env);
    assert!(o.status.success(), "{}", text(&o));
    // Offline without --registry, the miss names the registry it checked and the one the
    // store has the release from.
    let o = common::khub(&["load", "acme/activation", "--offline"], &env);
    let t = text(&o);
    assert!(
        t.contains("from https://huggingface.co") && t.contains(&format!("pass --registry {url}")),
        "{t}"
    );
    // A store without the release gets the hint without --offline.
    let empty = w.path().join("empty");
    let o = common::khub(
        &["load", "acme/activation", "--registry", &url],
        &[("KHUB_CACHE", empty.to_str().unwrap()), ("KHUB_HTTP_RETRIES", "0")],
    );
    let t = String::from_utf8_lossy(&o.stderr);
    assert!(t.contains("hint: the registry did not answer") && !t.contains("--offline"), "{t}");
}

#[test]
fn add_and_remove_edit_kernels_toml_keeping_its_comments() {
    let w = tempfile::tempdir().unwrap();
    let reg = registry(w.path());
    let app = w.path().join("kernels.toml");
    std::fs::write(
        &app,
        format!("# the app's kernels\n[registry]\nurl = \"{reg}\"  # local\n\n[kernels]\n\"acme/old\" = \"^1\"\n"),
    )
    .unwrap();
    let cache = w.path().join("cache");
    let env = [("KHUB_CACHE", cache.to_str().unwrap())];
    let a = app.to_str().unwrap();
    // Without a requirement: ^ the newest release, from the registry kernels.toml names.
    let o = common::khub(&["add", "acme/activation", "--app", a], &env);
    assert!(o.status.success(), "{}", text(&o));
    let t = std::fs::read_to_string(&app).unwrap();
    assert!(
        t.contains("\"acme/activation\" = \"^0.1\"") && t.contains("# the app's kernels") && t.contains("# local"),
        "{t}"
    );
    let o = common::khub(&["add", "acme/activation@=0.1.0", "--app", a], &env);
    assert!(
        text(&o).contains("changed acme/activation from \"^0.1\" to \"=0.1.0\""),
        "{}",
        text(&o)
    );
    let o = common::khub(&["remove", "acme/old", "--app", a], &env);
    assert!(o.status.success(), "{}", text(&o));
    let t = std::fs::read_to_string(&app).unwrap();
    assert!(!t.contains("acme/old") && t.contains("\"acme/activation\" = \"=0.1.0\""), "{t}");
    // What a lock reads back is what add wrote.
    let decl = khub::lock::AppKernels::read(&app).unwrap();
    assert_eq!(decl.kernels.len(), 1);
    // Hostile or mistaken input: refused, the file unchanged.
    for (args, says) in [
        (vec!["remove", "acme/nope", "--app", a], "does not declare acme/nope"),
        (vec!["add", "acme/x@bogus", "--app", a], "`bogus` is not valid"),
        (vec!["add", "acme/x@", "--app", a], "empty requirement"),
        (vec!["add", "not-a-repo@^1", "--app", a], "not valid"),
    ] {
        let o = common::khub(&args, &env);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(text(&o).contains(says), "{args:?}: {}", text(&o));
        assert_eq!(std::fs::read_to_string(&app).unwrap(), t, "{args:?} changed the file");
    }
    // A broken file is not edited.
    std::fs::write(&app, "[kernels\n").unwrap();
    let o = common::khub(&["add", "acme/x@^1", "--app", a], &env);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(std::fs::read_to_string(&app).unwrap(), "[kernels\n");
    // A missing file is created.
    let fresh = w.path().join("new.toml");
    let o = common::khub(&["add", "acme/activation@^0.1", "--app", fresh.to_str().unwrap()], &env);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(khub::lock::AppKernels::read(&fresh).unwrap().kernels.len(), 1);
}

#[test]
fn commands_offer_only_options_that_do_something() {
    let o = common::khub(&["gc", "--help"], &[]);
    let help = String::from_utf8_lossy(&o.stdout);
    for opt in ["--trust", "--allow-rollback", "--registry", "--offline"] {
        assert!(!help.contains(opt), "gc offers {opt}: {help}");
    }
    assert!(help.contains("--cache") && help.contains("--keep"), "{help}");
    let o = common::khub(&["gc", "--trust", "t.toml"], &[]);
    assert_eq!(o.status.code(), Some(2));
    // Listing releases makes no trust decision; resolving one does.
    for cmd in ["versions", "add"] {
        let help = String::from_utf8_lossy(&common::khub(&[cmd, "--help"], &[]).stdout).into_owned();
        assert!(!help.contains("--trust") && !help.contains("--allow-rollback"), "{cmd}: {help}");
        assert!(help.contains("--registry") && help.contains("--offline"), "{cmd}: {help}");
    }
    for cmd in ["load", "fetch", "lock", "explain"] {
        let help = String::from_utf8_lossy(&common::khub(&[cmd, "--help"], &[]).stdout).into_owned();
        assert!(help.contains("--trust") && help.contains("--allow-rollback"), "{cmd}: {help}");
    }
}

#[test]
fn quiet_and_verbose() {
    let w = tempfile::tempdir().unwrap();
    let out = w.path().join("rel");
    let base = [
        "package",
        "kernels-example",
        "--out",
        out.to_str().unwrap(),
        "--force",
        "--variant",
        "cpu-x86_64-v1-linux",
    ];
    let o = common::khub(&base, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.contains("building `cpu-x86_64-v1-linux`") && !err.contains("-march"),
        "{err}"
    );
    let o = common::khub(&[&base[..], &["-v"]].concat(), &[]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("-march=x86-64"), "{}", text(&o));
    let o = common::khub(&[&base[..], &["-q"]].concat(), &[]);
    assert!(o.status.success() && o.stderr.is_empty(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("packaged activation 0.1.0"));
    let reg = registry(w.path());
    let cache = w.path().join("cache");
    let o = common::khub(
        &["-v", "versions", "acme/activation", "--registry", &reg],
        &[("KHUB_CACHE", cache.to_str().unwrap())],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("registry ") && err.contains("store    ") && err.contains("host     "),
        "{err}"
    );
    let o = common::khub(&["-q", "-v", "host"], &[]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn package_checks_its_variants_before_emptying_anything_and_names_a_skip_once() {
    let w = tempfile::tempdir().unwrap();
    let out = w.path().join("rel");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "old").unwrap();
    let o = common::khub(
        &[
            "package",
            "kernels-example",
            "--out",
            out.to_str().unwrap(),
            "--force",
            "--variant",
            "nope",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("no variant `nope`") && text(&o).contains("cpu-x86_64-v1-linux"),
        "{}",
        text(&o)
    );
    assert!(out.join("keep.txt").exists(), "--force emptied the directory before the error");
    let o = common::khub(
        &[
            "package",
            "kernels-example",
            "--out",
            out.to_str().unwrap(),
            "--force",
            "--variant",
            "cpu-x86_64-v1-linux",
            "--variant",
            "cuda-sm80-sm90a-x86_64-linux",
            "--nvcc",
            "/nonexistent/nvcc",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(text(&o).matches("cuda-sm80-sm90a-x86_64-linux").count(), 1, "{}", text(&o));
}

#[test]
fn inspect_shows_the_glibc_version_as_the_symbol_writes_it() {
    let w = tempfile::tempdir().unwrap();
    let lib = w.path().join("libputs.so");
    // puts is GLIBC_2.2.5 on x86-64.
    common::build_c_lib("#include <stdio.h>\nint hello(void) { return puts(\"hi\"); }\n", &lib, &[]);
    let o = common::khub(&["inspect", lib.to_str().unwrap()], &[]);
    assert!(text(&o).contains("libc         glibc 2.2.5 or newer"), "{}", text(&o));
    let o = common::khub(&["inspect", lib.to_str().unwrap(), "--json"], &[]);
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["glibc-floor"], "2.2.5", "{doc}");
}

#[test]
fn publish_writes_a_directory_registry_in_place() {
    let w = tempfile::tempdir().unwrap();
    let reg = w.path().join("registry");
    std::fs::create_dir_all(&reg).unwrap();
    let r = reg.to_str().unwrap();
    let rel = common::example_release().to_str().unwrap();
    let o = common::khub(&["publish", rel, "--to", "acme/act", "--registry", r], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("--create"), "{}", text(&o));
    let o = common::khub(&["publish", rel, "--to", "acme/act", "--registry", r, "--create"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(reg.join("acme/act/0.1.0/khub.toml").is_file());
    let leftovers: Vec<_> = std::fs::read_dir(reg.join("acme/act"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "no staging directory left: {leftovers:?}");
    // Immutable.
    let o = common::khub(&["publish", rel, "--to", "acme/act", "--registry", r], &[]);
    assert!(text(&o).contains("already exists: releases are immutable"), "{}", text(&o));
    // What was published loads.
    let cache = w.path().join("cache");
    let o = common::khub(
        &["load", "acme/act", "--registry", r],
        &[("KHUB_CACHE", cache.to_str().unwrap()), ("KHUB_CPU_LEVEL", "x86-64-v1")],
    );
    assert!(o.status.success(), "{}", text(&o));
    // A server address without a scheme is recognised.
    let o = common::khub(&["publish", rel, "--to", "acme/act", "--registry", "127.0.0.1:8080"], &[]);
    assert!(text(&o).contains("http://127.0.0.1:8080"), "{}", text(&o));
}

#[test]
fn a_lock_for_several_hosts_names_each_variant_once() {
    let w = tempfile::tempdir().unwrap();
    let reg = registry(w.path());
    let cache = w.path().join("cache");
    std::fs::write(
        w.path().join("kernels.toml"),
        format!("[registry]\nurl = \"{reg}\"\n[kernels]\n\"acme/activation\" = \"^0.1\"\n"),
    )
    .unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_khub"));
        cmd.args(args).current_dir(w.path()).env("KHUB_CACHE", &cache);
        for var in khub::env::ALL {
            cmd.env_remove(var);
        }
        cmd.env("KHUB_CACHE", &cache);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let hosts = common::repo().join("examples/hosts");
    let h100 = hosts.join("h100.toml");
    let mi300 = hosts.join("mi300x.toml");
    let o = run(&["lock", "--host", h100.to_str().unwrap(), "--host", mi300.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(
        &["load", "acme/activation", "--locked", "--offline"],
        &[("KHUB_CPU_LEVEL", "x86-64-v1")],
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(t.contains("(cpu-x86_64-v4-linux)"), "each locked variant once: {t}");
}

#[test]
fn khub_include_takes_the_header_or_its_directory() {
    let w = tempfile::tempdir().unwrap();
    let inc = w.path().join("inc");
    std::fs::create_dir_all(&inc).unwrap();
    std::fs::copy(common::repo().join("include/khub_kernel.h"), inc.join("khub_kernel.h")).unwrap();
    for given in [inc.join("khub_kernel.h"), inc.clone()] {
        let out = w.path().join("rel");
        let o = common::khub(
            &[
                "-v",
                "package",
                "kernels-example",
                "--out",
                out.to_str().unwrap(),
                "--force",
                "--variant",
                "cpu-x86_64-v1-linux",
            ],
            &[("KHUB_INCLUDE", given.to_str().unwrap())],
        );
        let t = text(&o);
        assert!(o.status.success(), "{given:?}: {t}");
        assert!(t.contains(&format!("-I {}", inc.display())), "{given:?}: {t}");
    }
}

/// A variant id of `../..` in kernel.toml (any project one packages may carry one): when
/// that variant was skipped, packaging removed `<out>/variants/../..`, the kernel project
/// itself. Ids (and the kernel's name) are now checked before anything is built or removed.
#[test]
fn a_variant_id_that_climbs_out_is_refused_before_anything_is_removed() {
    let w = tempfile::tempdir().unwrap();
    let project = w.path().join("k");
    common::copy_dir(std::path::Path::new("kernels-example"), &project);
    let config = project.join("kernel.toml");
    let original = std::fs::read_to_string(&config).unwrap();
    // A second variant that this x86_64 builder skips, with a hostile id.
    let hostile = "\n[[variants]]\nid = \"../..\"\nbackend = \"cpu\"\narch = \"aarch64\"\nsources = [\"src/activation.c\"]\n";
    std::fs::write(&config, original + hostile).unwrap();
    let out = project.join("release");
    let o = common::khub(&["package", project.to_str().unwrap(), "--out", out.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("`../..` is not allowed"), "{}", text(&o));
    assert!(config.exists() && project.join("src").is_dir(), "the project was removed");
    assert!(!out.exists(), "nothing was built");
}

/// `package --force` over a good release, where the new build fails: the old release is
/// still there, whole (it used to be emptied first, leaving a directory with no
/// khub.toml that a plain re-run then refused as not empty), and nothing is left beside it.
#[test]
fn a_failed_package_keeps_the_release_it_would_replace() {
    let w = tempfile::tempdir().unwrap();
    let project = w.path().join("k");
    common::copy_dir(std::path::Path::new("kernels-example"), &project);
    let out = w.path().join("rel");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["package", project.to_str().unwrap(), "--out", out.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |a: Vec<String>| common::khub(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    let o = run(args(&["--variant", "cpu-x86_64-v1-linux"]));
    assert!(o.status.success(), "{}", text(&o));
    let manifest = std::fs::read(out.join("khub.toml")).unwrap();

    // A variant whose source does not compile.
    std::fs::write(project.join("src/broken.c"), "this is not C\n").unwrap();
    let config = project.join("kernel.toml");
    let original = std::fs::read_to_string(&config).unwrap();
    let broken = "\n[[variants]]\nid = \"cpu-broken\"\nbackend = \"cpu\"\narch = \"x86_64\"\nsources = [\"src/broken.c\"]\n";
    std::fs::write(&config, original + broken).unwrap();
    let o = run(args(&["--force", "--variant", "cpu-broken"]));
    assert!(!o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::read(out.join("khub.toml")).unwrap(),
        manifest,
        "the old release was touched"
    );
    assert!(out.join("variants/cpu-x86_64-v1-linux").is_dir());
    let beside: Vec<String> = std::fs::read_dir(w.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("staging"))
        .collect();
    assert!(beside.is_empty(), "left behind: {beside:?}");

    // A successful --force replaces it whole.
    let o = run(args(&["--force", "--variant", "cpu-x86_64-v3-linux"]));
    assert!(o.status.success(), "{}", text(&o));
    assert!(out.join("variants/cpu-x86_64-v3-linux").is_dir() && !out.join("variants/cpu-x86_64-v1-linux").exists());
    assert!(text(&o).contains(&format!("into {}", out.display())), "{}", text(&o));
}
