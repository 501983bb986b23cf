//! Host detection: the full probe (`HostFacts::detect` with `ProbeOptions::from_env()`),
//! a full host profile that skips probing (`inherit = false`), and CPU feature detection
//! alone.
//!
//! The first call in a process pays one-time costs that repeated calls do not: the dynamic
//! loader maps `ld.so.cache` and walks its search path for `libcuda.so.1` and
//! `libnvidia-ml.so.1` with cold caches, `std::arch` runs CPUID for the first time, the
//! first thread is created. So `main` times one first call with `Instant` before criterion
//! runs (in this process, and in 25 fresh child processes of this executable for a
//! distribution), and criterion then measures repeated calls.
//!
//! Run: `cargo bench --bench host -- --warm-up-time 1 --measurement-time 3`
//! (results and machine: `docs/performance.md`).
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

use std::hint::black_box;
use std::time::Instant;

use criterion::Criterion;
use khub::host::{HostFacts, Isolation, ProbeOptions, probe};

/// A whole machine in a profile: no probe runs.
const PROFILE: &str = r#"
inherit = false
description = "H100 server"
os = "linux"
arch = "x86_64"
libc = "glibc 2.35"
cpu-level = "x86-64-v4"
cpu-features = ["avx2", "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512vnni", "fma", "f16c"]

[cuda]
driver = "12.8"
kmd = "570.124.06"
runtime = "12.8"
devices = [{ index = 0, cc = "9.0", name = "NVIDIA H100 80GB HBM3" }]
"#;

fn probe_options() -> ProbeOptions {
    let mut o = ProbeOptions::from_env().expect("the KHUB_* environment is valid");
    o.isolation = Isolation::Thread;
    o
}

/// Set in a child run of this executable: time one first call and print it.
const CHILD: &str = "KHUB_BENCH_FIRST_CALL";
/// How many child processes measure the first call.
const FIRST_CALL_RUNS: usize = 25;

/// Times one `detect` as the first thing the process does, in nanoseconds.
fn first_call_ns(options: &ProbeOptions) -> u128 {
    let t = Instant::now();
    let d = HostFacts::detect(options).expect("host detection succeeds");
    let ns = t.elapsed().as_nanos();
    black_box(d);
    ns
}

/// Runs this executable `FIRST_CALL_RUNS` times in child mode and summarises the first-call
/// times they print.
fn first_call_in_fresh_processes(mode: &str) -> String {
    let exe = std::env::current_exe().expect("the bench executable's path");
    let mut times: Vec<f64> = (0..FIRST_CALL_RUNS)
        .map(|_| {
            let out = std::process::Command::new(&exe)
                .env(CHILD, mode)
                .output()
                .expect("the bench runs as a child");
            assert!(out.status.success(), "child run failed: {}", String::from_utf8_lossy(&out.stderr));
            let ns: f64 = String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("the child prints nanoseconds");
            ns / 1000.0
        })
        .collect();
    times.sort_by(f64::total_cmp);
    format!(
        "median {:.1} µs, min {:.1} µs, max {:.1} µs over {FIRST_CALL_RUNS} fresh processes",
        times[times.len() / 2],
        times[0],
        times[times.len() - 1]
    )
}

fn main() {
    if let Ok(mode) = std::env::var(CHILD) {
        let mut options = probe_options();
        if mode == "profile" {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let path = dir.path().join("host.toml");
            std::fs::write(&path, PROFILE).expect("profile written");
            options.profile = Some(path);
            println!("{}", first_call_ns(&options));
        } else {
            println!("{}", first_call_ns(&options));
        }
        return;
    }

    // The first call in this process, before anything else has touched the loader,
    // CPUID or the thread machinery; then the same in fresh processes, for a distribution.
    let options = probe_options();
    let t = Instant::now();
    let first = HostFacts::detect(&options).expect("host detection succeeds");
    let first_time = t.elapsed();
    let t = Instant::now();
    let second = HostFacts::detect(&options).expect("host detection succeeds");
    let second_time = t.elapsed();
    assert_eq!(first.facts, second.facts);
    eprintln!("host_detect/probe: first call in process: {first_time:?}; second call: {second_time:?}");
    eprintln!("  first call, {}", first_call_in_fresh_processes("probe"));
    eprintln!("  detected: {}", khub::resolve::describe_host(&first.facts));
    for (fact, source) in &first.sources {
        eprintln!("  {fact}: {source}");
    }

    let dir = tempfile::tempdir().expect("a temporary directory");
    let profile_path = dir.path().join("host.toml");
    std::fs::write(&profile_path, PROFILE).expect("profile written");
    let mut profile_options = probe_options();
    profile_options.profile = Some(profile_path);
    let from_profile = HostFacts::detect(&profile_options).expect("the profile is valid");
    assert!(from_profile.facts.cuda.is_some());
    eprintln!(
        "host_detect/profile_no_inherit: first call, {}",
        first_call_in_fresh_processes("profile")
    );

    let mut c = Criterion::default().configure_from_args();
    {
        let mut g = c.benchmark_group("host_detect");
        g.bench_function("probe", |b| b.iter(|| HostFacts::detect(black_box(&options)).unwrap()));
        g.bench_function("profile_no_inherit", |b| {
            b.iter(|| HostFacts::detect(black_box(&profile_options)).unwrap())
        });
        g.bench_function("cpu_features", |b| b.iter(probe::cpu_features));
        g.finish();
    }
    c.final_summary();
}
