//! Variant resolution and manifest parsing over generated manifests of 10 to 10,000
//! variants.
//!
//! The manifests are built as TOML text (as a registry would serve them) from a realistic
//! mix of CPU, CUDA, ROCm, musl and macOS variants, then parsed once, outside the timed
//! loops. The host is a typical CUDA server: Linux x86_64, glibc 2.35, x86-64-v4, CUDA
//! driver 12.8 with one compute-capability 9.0 device and a CUDA 12.8 runtime in process.
//!
//! Run: `cargo bench --bench resolve -- --warm-up-time 1 --measurement-time 3`
//! (results and machine: `docs/performance.md`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use khub::host::{CudaDevice, CudaHost, HostFacts};
use khub::manifest::Manifest;
use khub::platform::{CpuArch, Libc, LibcFamily, MajorMinor, Os, X86Level};
use khub::resolve::{Preferences, resolve, runs_on};

/// Manifest sizes, in variants.
const SIZES: [usize; 4] = [10, 100, 1_000, 10_000];

const CUDA_TOOLKITS: [&str; 5] = ["12.4", "12.6", "12.8", "12.9", "13.0"];
const GLIBC: [&str; 4] = ["2.17", "2.28", "2.34", "2.39"];

/// CUDA device-code lists, with the lowest toolkit (minor of 12.x, or 13.0) that can build
/// each one.
const CUDA_CODE: [(&[&str], (u32, u32)); 7] = [
    (&["sm_80", "sm_90a", "compute_90"], (12, 0)),
    (&["sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "compute_90"], (12, 0)),
    (&["sm_90a"], (12, 0)),
    (&["sm_80", "compute_80"], (12, 0)),
    (&["sm_86", "sm_89", "compute_89"], (12, 0)),
    (&["sm_90a", "sm_100a", "compute_100"], (12, 8)),
    (&["sm_100f", "sm_120f", "compute_120"], (12, 9)),
];

const ROCM_VERSIONS: [&str; 4] = ["6.2", "6.3", "6.4", "7.0"];
const ROCM_TARGETS: [&[&str]; 5] = [
    &["gfx90a", "gfx942:sramecc+:xnack-"],
    &["gfx11-generic"],
    &["gfx90a:xnack+", "gfx942", "gfx1100", "gfx1201"],
    &["gfx942:sramecc+:xnack-", "gfx950"],
    &["gfx10-3-generic", "gfx11-generic", "gfx12-generic"],
];

/// A deterministic 64-hex-digit digest for file `i` of variant `v`.
fn digest(v: usize, i: usize) -> String {
    let mut x = (v as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64).wrapping_add(0x2545_f491_4f6c_dd1d);
    let mut out = String::with_capacity(64);
    for _ in 0..4 {
        // splitmix64
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        write!(out, "{z:016x}").unwrap();
    }
    out
}

fn quoted(items: &[&str]) -> String {
    let inner: Vec<String> = items.iter().map(|s| format!("\"{s}\"")).collect();
    format!("[{}]", inner.join(", "))
}

/// One `[[variants]]` entry. The mix, by `i % 20`: 9 CUDA (x86_64 and aarch64 sbsa), 4
/// ROCm, 5 CPU (x86_64 v1..v4 and aarch64), 1 musl CPU, 1 macOS (CPU or Metal).
fn variant(out: &mut String, i: usize) {
    let slot = i % 20;
    let round = i / 20;
    let mut files: Vec<(String, u64)> = Vec::new();
    let id;
    let lib;
    let mut body = String::new();
    match slot {
        0..=8 => {
            let tk = CUDA_TOOLKITS[(i / 3) % CUDA_TOOLKITS.len()];
            let tk_mm: MajorMinor = tk.parse().unwrap();
            // Pick the first code list (cycling from a per-variant offset) this toolkit can
            // build.
            let start = (i / 7) % CUDA_CODE.len();
            let code = (0..CUDA_CODE.len())
                .map(|k| CUDA_CODE[(start + k) % CUDA_CODE.len()])
                .find(|(_, (maj, min))| tk_mm >= MajorMinor::new(*maj, *min))
                .unwrap()
                .0;
            let cudart = if i.is_multiple_of(2) { "static" } else { "dynamic" };
            let arch = if slot == 8 { "aarch64" } else { "x86_64" };
            id = format!("cu{}-{cudart}-{arch}-linux-{i}", tk.replace('.', ""));
            lib = format!("variants/{id}/libactivation.so");
            let _ = writeln!(body, "backend = \"cuda\"\nos = \"linux\"\narch = \"{arch}\"");
            let _ = writeln!(body, "libc = \"glibc {}\"", GLIBC[i % 3]);
            if arch == "x86_64" && i % 4 == 1 {
                let _ = writeln!(body, "cpu-level = \"x86-64-v3\"");
            }
            if i.is_multiple_of(11) {
                let _ = writeln!(body, "priority = {}", (i % 5) as i32 - 2);
            }
            let _ = writeln!(body, "library = \"{lib}\"");
            let _ = writeln!(
                body,
                "cuda = {{ toolkit = \"{tk}\", cudart = \"{cudart}\", code = {} }}",
                quoted(code)
            );
            files.push((lib.clone(), 40_000_000 + (i as u64 * 4096)));
            if i.is_multiple_of(3) {
                files.push((format!("variants/{id}/libactivation_kernels.fatbin"), 120_000_000));
            }
        }
        9..=12 => {
            let ver = ROCM_VERSIONS[(i / 5) % ROCM_VERSIONS.len()];
            let targets = ROCM_TARGETS[(i / 3) % ROCM_TARGETS.len()];
            id = format!("rocm{}-x86_64-linux-{i}", ver.replace('.', ""));
            lib = format!("variants/{id}/libactivation.so");
            let _ = writeln!(body, "backend = \"rocm\"\nos = \"linux\"\narch = \"x86_64\"");
            let _ = writeln!(body, "libc = \"glibc {}\"", GLIBC[1 + i % 2]);
            let _ = writeln!(body, "library = \"{lib}\"");
            let compatible = if ver == "6.2" { ", compatible = [\"6.3\"]" } else { "" };
            let _ = writeln!(body, "rocm = {{ version = \"{ver}\"{compatible}, targets = {} }}", quoted(targets));
            files.push((lib.clone(), 60_000_000));
        }
        13..=16 => {
            let level = slot - 12; // v1..v4
            id = format!("cpu-x86_64-v{level}-linux-{i}");
            lib = format!("variants/{id}/libactivation.so");
            let _ = writeln!(body, "backend = \"cpu\"\nos = \"linux\"\narch = \"x86_64\"");
            let _ = writeln!(body, "libc = \"glibc {}\"", GLIBC[i % 4]);
            let _ = writeln!(body, "cpu-level = \"x86-64-v{level}\"");
            if level == 4 && round % 2 == 1 {
                let _ = writeln!(body, "cpu-features = [\"avx512bf16\", \"avx512vnni\"]");
            }
            let _ = writeln!(body, "library = \"{lib}\"");
            files.push((lib.clone(), 2_000_000));
        }
        17 => {
            id = format!("cpu-aarch64-linux-{i}");
            lib = format!("variants/{id}/libactivation.so");
            let _ = writeln!(body, "backend = \"cpu\"\nos = \"linux\"\narch = \"aarch64\"");
            let _ = writeln!(body, "libc = \"glibc 2.28\"");
            if round % 2 == 1 {
                let _ = writeln!(body, "cpu-features = [\"sve2\"]");
            }
            let _ = writeln!(body, "library = \"{lib}\"");
            files.push((lib.clone(), 2_000_000));
        }
        18 => {
            let arch = if round.is_multiple_of(2) { "x86_64" } else { "aarch64" };
            id = format!("cpu-{arch}-linux-musl-{i}");
            lib = format!("variants/{id}/libactivation.so");
            let _ = writeln!(body, "backend = \"cpu\"\nos = \"linux\"\narch = \"{arch}\"");
            let _ = writeln!(body, "libc = \"musl 1.2\"");
            let _ = writeln!(body, "library = \"{lib}\"");
            files.push((lib.clone(), 2_000_000));
        }
        _ => {
            let metal = round.is_multiple_of(2);
            id = format!("{}-aarch64-macos-{i}", if metal { "metal" } else { "cpu" });
            lib = format!("variants/{id}/libactivation.dylib");
            let backend = if metal { "metal" } else { "cpu" };
            let _ = writeln!(body, "backend = \"{backend}\"\nos = \"macos\"\narch = \"aarch64\"");
            let _ = writeln!(body, "macos-min = \"{}\"", if metal { "14.0" } else { "13.0" });
            if metal {
                let _ = writeln!(body, "metal = {{ language = \"3.1\" }}");
            }
            let _ = writeln!(body, "library = \"{lib}\"");
            files.push((lib.clone(), 3_000_000));
        }
    }
    let _ = writeln!(out, "\n[[variants]]\nid = \"{id}\"");
    out.push_str(&body);
    for (j, (path, size)) in files.iter().enumerate() {
        let _ = writeln!(
            out,
            "\n[[variants.files]]\npath = \"{path}\"\nsize = {size}\nsha256 = \"{}\"",
            digest(i, j)
        );
    }
}

/// The TOML text of a release with `n` variants.
fn manifest_text(n: usize) -> String {
    let mut out = String::with_capacity(n * 600 + 1024);
    out.push_str(
        r#"schema = "1.0"

[kernel]
name = "activation"
version = "0.3.1"
abi = 1
description = "Fused activation kernels"
license = "Apache-2.0"

[[exports]]
name = "silu_and_mul"
signature = "status(tensor out, tensor in, stream)"

[[exports]]
name = "gelu_and_mul"
signature = "status(tensor out, tensor in, stream)"

[[exports]]
name = "gelu_tanh_and_mul"
signature = "status(tensor out, tensor in, stream)"
"#,
    );
    for i in 0..n {
        variant(&mut out, i);
    }
    out
}

/// Linux x86_64, glibc 2.35, x86-64-v4 (with the features of a Sapphire Rapids server),
/// CUDA driver 12.8, one compute-capability 9.0 device (H100), CUDA 12.8 runtime in process.
fn host() -> HostFacts {
    let features: BTreeSet<String> = [
        "sse3",
        "ssse3",
        "sse4.1",
        "sse4.2",
        "popcnt",
        "cmpxchg16b",
        "avx",
        "avx2",
        "bmi1",
        "bmi2",
        "f16c",
        "fma",
        "lzcnt",
        "movbe",
        "avx512f",
        "avx512bw",
        "avx512cd",
        "avx512dq",
        "avx512vl",
        "avx512vnni",
        "sha",
        "aes",
        "pclmulqdq",
        "xsave",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    let mut h = HostFacts::bare(Os::Linux, CpuArch::X86_64);
    h.libc = Some(Libc {
        family: LibcFamily::Glibc,
        version: MajorMinor::new(2, 35),
    });
    h.cpu_level = Some(X86Level::V4);
    h.cpu_features = features;
    h.cuda = Some(CudaHost {
        driver: MajorMinor::new(12, 8),
        kmd: Some("570.124.06".into()),
        runtime: Some(MajorMinor::new(12, 8)),
        devices: vec![CudaDevice {
            index: 0,
            cc: MajorMinor::new(9, 0),
            name: Some("NVIDIA H100 80GB HBM3".into()),
        }],
    });
    h
}

/// Prints, once, what the 1,000-variant manifest looks like and how it resolves, so the
/// benchmark's workload is visible next to its numbers.
fn describe_workload(host: &HostFacts) {
    let n = 1_000;
    let text = manifest_text(n);
    let t = Instant::now();
    let m = Manifest::from_toml_str(&text).expect("generated manifest is valid");
    let parse = t.elapsed();
    let t = Instant::now();
    let r = resolve(&m, host, &Preferences::default());
    let first = t.elapsed();
    let mut backends: BTreeMap<String, usize> = BTreeMap::new();
    for v in &m.variants {
        *backends.entry(v.backend.to_string()).or_default() += 1;
    }
    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &r.candidates {
        *reasons.entry(c.rejection().map_or("accepted", |x| x.code())).or_default() += 1;
    }
    eprintln!("workload ({n} variants, {} KiB of TOML): backends {backends:?}", text.len() / 1024);
    eprintln!("  verdicts: {reasons:?}");
    eprintln!(
        "  best: {} ({})",
        r.best().map_or("none", |c| c.id.as_str()),
        r.best().and_then(|c| c.score()).map(ToString::to_string).unwrap_or_default()
    );
    eprintln!("  first parse in process: {parse:?}; first resolve in process: {first:?}");
}

fn benches(c: &mut Criterion) {
    let host = host();
    let prefs = Preferences::default();
    describe_workload(&host);
    let texts: Vec<(usize, String)> = SIZES.iter().map(|&n| (n, manifest_text(n))).collect();
    let manifests: Vec<(usize, Manifest)> = texts
        .iter()
        .map(|(n, t)| {
            let m = Manifest::from_toml_str(t).unwrap_or_else(|e| panic!("generated manifest of {n} variants is invalid: {e}"));
            assert_eq!(m.variants.len(), *n);
            (*n, m)
        })
        .collect();

    scaling(&manifests, &host, &prefs);

    // The load path's selection: the best variant in one pass, nothing sorted.
    let mut g = c.benchmark_group("choose");
    for (n, m) in &manifests {
        g.throughput(Throughput::Elements(*n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), m, |b, m| {
            b.iter(|| khub::resolve::choose(black_box(m), black_box(&host), black_box(&prefs)))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("resolve");
    for (n, m) in &manifests {
        g.throughput(Throughput::Elements(*n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), m, |b, m| {
            b.iter(|| resolve(black_box(m), black_box(&host), black_box(&prefs)))
        });
    }
    g.finish();

    // The cheap yes/no path, over every variant of the manifest.
    let mut g = c.benchmark_group("runs_on");
    for (n, m) in &manifests {
        g.throughput(Throughput::Elements(*n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), m, |b, m| {
            b.iter(|| m.variants.iter().filter(|v| runs_on(black_box(m), v, black_box(&host))).count())
        });
    }
    g.finish();

    let mut g = c.benchmark_group("manifest_parse");
    // Parsing 10,000 variants takes tens of milliseconds; 20 samples keep the run short.
    g.sample_size(20);
    for (n, text) in &texts {
        g.throughput(Throughput::Elements(*n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), text, |b, text| {
            b.iter(|| Manifest::from_toml_str(black_box(text)).unwrap())
        });
    }
    g.finish();
}

/// Growth from 1,000 to 10,000 variants, measured interleaved (1,000 ten times, then
/// 10,000 once, alternating, 15 rounds), for `choose` (what loading uses) and `resolve`
/// (the full ranking explain prints). Linear growth is 10×; the goal is at most 12×.
fn scaling(manifests: &[(usize, Manifest)], host: &HostFacts, prefs: &Preferences) {
    let get = |n: usize| manifests.iter().find(|(k, _)| *k == n).map(|(_, m)| m);
    let (Some(small), Some(large)) = (get(1_000), get(10_000)) else {
        return;
    };
    let rounds = if std::env::args().any(|a| a == "--bench") { 15 } else { 2 };
    let time = |f: &dyn Fn()| {
        let t = std::time::Instant::now();
        f();
        t.elapsed().as_secs_f64()
    };
    type Arm<'a> = (&'a str, &'a dyn Fn(&Manifest));
    let arms: [Arm; 2] = [
        ("choose", &|m| {
            black_box(khub::resolve::choose(black_box(m), host, prefs).ok());
        }),
        ("resolve", &|m| {
            black_box(resolve(black_box(m), host, prefs));
        }),
    ];
    for (name, f) in arms {
        let mut ratios = Vec::new();
        let (mut t_small, mut t_large) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let s = time(&|| (0..10).for_each(|_| f(small))) / 10.0;
            let l = time(&|| f(large));
            ratios.push(l / s);
            t_small.push(s);
            t_large.push(l);
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let r = median(&mut ratios);
        eprintln!(
            "scaling {name}: 1,000 variants {:.0} µs, 10,000 variants {:.0} µs (medians); 10,000 / 1,000 = {r:.1}× (median of {rounds} interleaved rounds); goal <= 12×: {}",
            median(&mut t_small) * 1e6,
            median(&mut t_large) * 1e6,
            if r <= 12.0 { "met" } else { "NOT met" }
        );
    }
}

criterion_group!(resolve_benches, benches);
criterion_main!(resolve_benches);
