//! The C API from C: installs libkhub (the debug build `cargo test` just made) with
//! `examples/c-host/install-khub.sh`, builds `examples/c-host` with make, gcc and
//! pkg-config against the installed header, and runs it against a directory registry
//! holding the example kernel: typed and generic calls, provenance, explain, a locked load,
//! threads, bad arguments, the header as C++, a static link, and valgrind (0 errors, no
//! definite or indirect leak).
//!
//! Skipped, with a message, when make, pkg-config or a C or C++ compiler is missing; the
//! valgrind part is skipped when valgrind is missing (`apt-get install valgrind`). On CI
//! (`CI=true`) a missing tool fails the test instead, so CI cannot silently skip it.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own
#![cfg(all(feature = "capi", feature = "cli"))]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Where cargo put libkhub.so and libkhub.a for this test build (target/debug).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_owned()
}

fn text(o: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Skips part of the test with a message; on CI (`CI=true`), where every tool must be
/// installed so the C API is really exercised, fails instead.
fn skip(what: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{what}; CI must install it (apt-get install make gcc g++ pkg-config valgrind)");
    }
    eprintln!("skipping {what} (apt-get install make gcc g++ pkg-config valgrind)");
}

struct Env {
    dir: PathBuf,
    vars: Vec<(String, String)>,
}

impl Env {
    /// A command with no KHUB_* (or HF_*) setting from the caller, and this test's store,
    /// state and config directories.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        for var in khub::env::ALL {
            if *var != "HOME" {
                cmd.env_remove(var);
            }
        }
        cmd.envs(self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd.current_dir(&self.dir);
        cmd
    }

    fn run(&self, cmd: &mut Command, what: &str) -> Output {
        let o = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(o.status.success(), "{what} failed:\n{}", text(&o));
        o
    }

    fn make(&self, args: &[&str]) -> Output {
        self.make_with(args, &[])
    }

    fn make_with(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = self.command("make");
        cmd.arg("-C").arg(self.dir.join("c-host")).args(args).envs(env.iter().copied());
        self.run(&mut cmd, &format!("make {}", args.join(" ")))
    }
}

#[test]
fn c_host_example_builds_runs_and_is_clean_under_valgrind() {
    let cc = ["gcc", "cc"].into_iter().find(|c| have(c));
    let cxx = ["g++", "c++"].into_iter().find(|c| have(c));
    let mut missing: Vec<&str> = ["make", "pkg-config"].into_iter().filter(|t| !have(t)).collect();
    if cc.is_none() {
        missing.push("a C compiler");
    }
    if cxx.is_none() {
        missing.push("a C++ compiler");
    }
    if !missing.is_empty() {
        skip(&format!("the C host test: missing {}", missing.join(", ")));
        return;
    }
    let (cc, cxx) = (cc.unwrap(), cxx.unwrap());
    let libs = profile_dir();
    // `cargo test` links integration tests against the rlib only; the cdylib and staticlib
    // exist after a `cargo build`. On a fresh checkout, build them here (same profile and
    // target directory; cargo has released its build lock while tests run).
    if !libs.join("libkhub.so").is_file() || !libs.join("libkhub.a").is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--lib"]).current_dir(env!("CARGO_MANIFEST_DIR"));
        if libs.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build --lib");
        assert!(status.success(), "cargo build --lib failed");
    }
    for f in ["libkhub.so", "libkhub.a"] {
        assert!(
            libs.join(f).is_file(),
            "{} is missing: Cargo.toml's [lib] crate-type must list cdylib and staticlib",
            libs.join(f).display()
        );
    }

    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = tmp.path().to_owned();
    let registry = root.join("registry");
    common::copy_dir(common::example_release(), &registry.join("acme/activation/0.1.0"));
    let env = Env {
        dir: root.clone(),
        vars: vec![
            ("KHUB_CACHE".into(), root.join("cache").display().to_string()),
            ("KHUB_STATE_DIR".into(), root.join("state").display().to_string()),
            ("XDG_CONFIG_HOME".into(), root.join("config").display().to_string()),
            ("PKG_CONFIG_PATH".into(), root.join("prefix/lib/pkgconfig").display().to_string()),
            ("CC".into(), cc.into()),
            ("CXX".into(), cxx.into()),
        ],
    };

    // Install as a C developer would, from the libraries cargo test already built.
    let script = common::repo().join("examples/c-host/install-khub.sh");
    env.run(
        env.command("bash")
            .arg(&script)
            .arg("--from")
            .arg(&libs)
            .arg("--link")
            .arg(root.join("prefix")),
        "install-khub.sh",
    );
    for f in [
        "lib/libkhub.so",
        "lib/libkhub.a",
        "lib/pkgconfig/khub.pc",
        "include/khub.h",
        "include/khub_kernel.h",
    ] {
        assert!(root.join("prefix").join(f).is_file(), "install-khub.sh did not install {f}");
    }
    let cflags = env.run(env.command("pkg-config").args(["--cflags", "--libs", "khub"]), "pkg-config");
    assert!(String::from_utf8_lossy(&cflags.stdout).contains("-lkhub"), "{}", text(&cflags));

    // Build the example out of the source tree (a copy), so parallel runs do not race.
    let src = common::repo().join("examples/c-host");
    std::fs::create_dir_all(root.join("c-host")).unwrap();
    for f in ["Makefile", "main.c", "bad_args.c", "valgrind.supp"] {
        std::fs::copy(src.join(f), root.join("c-host").join(f)).unwrap();
    }
    env.make(&[]);
    env.make(&["cxx-check"]);

    // A lockfile for the locked load, written by the CLI into the same store, for a fleet
    // of an x86-64-v3 laptop and an x86-64 baseline: the host loads the best of those (under
    // valgrind, which hides AVX-512, too).
    std::fs::write(root.join("kernels.toml"), "[kernels]\n\"acme/activation\" = \"^0.1\"\n").unwrap();
    std::fs::write(
        root.join("baseline.toml"),
        "description = \"x86-64 baseline\"\nos = \"linux\"\narch = \"x86_64\"\nlibc = \"glibc 2.31\"\ncpu-level = \"x86-64-v1\"\n",
    )
    .unwrap();
    let reg = registry.display().to_string();
    let laptop = common::repo().join("examples/hosts/laptop.toml").display().to_string();
    env.run(
        env.command(env!("CARGO_BIN_EXE_khub")).args([
            "lock",
            "--app",
            "kernels.toml",
            "--out",
            "khub.lock",
            "--registry",
            &reg,
            "--host",
            &laptop,
            "--host",
            "baseline.toml",
        ]),
        "khub lock",
    );

    let lock = root.join("khub.lock").display().to_string();
    let host = env.run(
        env.command(root.join("c-host/c-host"))
            .args(["--registry", &reg, "--explain", "--lock", &lock, "--threads", "4"]),
        "c-host",
    );
    let out = String::from_utf8_lossy(&host.stdout).into_owned();
    for want in [
        "silu_and_mul: 4 x 8 outputs match the C reference",
        "gelu: 64 outputs match the C reference",
        "\"chosen\": \"cpu-x86_64-",
        "\"source\": \"registry\"",
        "\"source\": \"lockfile\"",
        "\"repo\": \"acme/activation\"",
        "\"commit\": \"",
        "\"manifest-sha256\": \"",
        "\"variant\": \"cpu-x86_64-",
        "threads: 4 threads loaded acme/activation",
        "c-host: OK",
    ] {
        assert!(out.contains(want), "c-host's output lacks {want:?}:\n{}", text(&host));
    }

    // Bad arguments: every call returns its error, nothing crashes.
    let check = env.make(&["check", &format!("REGISTRY={reg}")]);
    let out = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(out.contains("bad-args: all ") && out.contains(" checks passed"), "{}", text(&check));

    // Statically linked against libkhub.a with pkg-config's Libs.private.
    env.make(&["static"]);
    env.run(
        env.command(root.join("c-host/c-host-static"))
            .args(["--registry", &reg, "--threads", "0"]),
        "c-host-static",
    );

    if !have("valgrind") {
        skip("the valgrind run: valgrind is not installed");
        return;
    }
    // On a machine with a GPU driver, probe it in a child process (as the CLI does): the
    // driver's own code is not what this run checks.
    let gpu = ["/dev/nvidiactl", "/dev/kfd"].iter().any(|d| Path::new(d).exists());
    let helper: &[(&str, &str)] = if gpu {
        &[("KHUB_PROBE_HELPER", env!("CARGO_BIN_EXE_khub"))]
    } else {
        &[]
    };
    let vg = env.make_with(
        &[
            "valgrind",
            &format!("REGISTRY={reg}"),
            &format!("HOST_ARGS=--threads 2 --explain --lock {lock}"),
        ],
        helper,
    );
    let log = String::from_utf8_lossy(&vg.stderr).into_owned();
    let summaries: Vec<&str> = log.lines().filter(|l| l.contains("ERROR SUMMARY:")).collect();
    assert_eq!(summaries.len(), 2, "two valgrind runs expected:\n{}", text(&vg));
    for s in &summaries {
        assert!(s.contains("ERROR SUMMARY: 0 errors"), "valgrind found errors:\n{}", text(&vg));
    }
    for l in log
        .lines()
        .filter(|l| l.contains("definitely lost:") || l.contains("indirectly lost:"))
    {
        assert!(l.contains(" 0 bytes in 0 blocks"), "valgrind found leaks: {l}\n{}", text(&vg));
    }
    println!(
        "valgrind:\n{}",
        log.lines()
            .filter(|l| l.contains("SUMMARY") || l.contains("lost:") || l.contains("reachable:"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
