//! Kernel call overhead: what a call through khub costs over a plain C call.
//!
//! Three ways to call the same C function of `kernels-example/src/activation.c`, built
//! with the `cpu-x86_64-v3-linux` flags:
//!
//! - **(a) direct**: the function linked statically into this bench binary and called by
//!   name (`khub_example_gelu`, …). Only when built with `KHUB_BENCH_STATIC=1` (see
//!   `build.rs`); otherwise this bench says so and runs (b) and (c) only.
//! - **(b) typed**: the function pointer from `kernel.function::<F>(name)` of the loaded,
//!   verified `cpu-x86_64-v3-linux` variant (`Release::load_variant`).
//! - **(c) generic**: `kernel.call(name, &[Arg…], null)`, which checks the arguments
//!   against the signature and passes them as pointers.
//!
//! The tensors are small, so the per-call overhead is visible: `gelu` on 16, 4096 and
//! 65536 floats, `silu_and_mul` on 32 → 16 floats and `rms_norm` (4 arguments, one scalar)
//! on 16 floats. Criterion measures each path; then `main` reads criterion's medians back
//! and prints the ratios, and runs a short interleaved check (the three paths alternate
//! in short batches, ABC CBA …) whose ratios do not drift with the machine's load.
//!
//! Run: `KHUB_BENCH_STATIC=1 cargo bench --bench kernel_call` (results and machine:
//! `docs/performance.md`). Criterion's options work after `--`.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use criterion::Criterion;
use khub::Release;
use khub::abi::{DLTensor, KhubCall, Status};
use khub::bench::HostTensor;
use khub::load::{Arg, Kernel};

type Unary = unsafe extern "C" fn(*const KhubCall, *mut DLTensor, *const DLTensor) -> Status;
type RmsNorm = unsafe extern "C" fn(*const KhubCall, *mut DLTensor, *const DLTensor, *const DLTensor, *const f32) -> Status;

#[cfg(khub_static_kernel)]
unsafe extern "C" {
    fn khub_example_gelu(call: *const KhubCall, out: *mut DLTensor, x: *const DLTensor) -> Status;
    fn khub_example_silu_and_mul(call: *const KhubCall, out: *mut DLTensor, x: *const DLTensor) -> Status;
    fn khub_example_rms_norm(call: *const KhubCall, out: *mut DLTensor, x: *const DLTensor, w: *const DLTensor, eps: *const f32) -> Status;
}

/// One way of calling: its name and a closure that makes `iters` calls.
type CallPath = (&'static str, Box<dyn FnMut(u64)>);

const VARIANT: &str = "cpu-x86_64-v3-linux";
const PATHS: [&str; 3] = ["a_direct", "b_typed", "c_generic"];

/// Packages kernels-example (the v3 CPU variant only) into `dir`.
fn package_example(dir: &Path) {
    let kernel_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernels-example");
    let options = khub::package::BuildOptions {
        only: vec![VARIANT.into()],
        ..Default::default()
    };
    khub::package::package(&kernel_dir, dir, &options, &mut |_| {}).expect("package kernels-example");
}

fn call_context(err: &mut [std::ffi::c_char; 1024]) -> KhubCall {
    KhubCall {
        struct_size: std::mem::size_of::<KhubCall>() as u32,
        flags: 0,
        stream: std::ptr::null_mut(),
        error: err.as_mut_ptr(),
        error_capacity: err.len(),
    }
}

/// Inputs in [-4, 4).
fn input(shape: &[i64]) -> HostTensor {
    HostTensor::from_fn(shape, |i| ((i * 7919) % 1000) as f32 / 125.0 - 4.0)
}

/// One benchmark case: a function on tensors of one size, callable three ways.
struct Case {
    /// The criterion group name.
    group: String,
    /// `(path, closure)`; the closure makes `iters` calls.
    paths: Vec<CallPath>,
}

fn check(s: Status) {
    assert_eq!(s, khub::abi::OK, "the kernel refused the call");
}

/// `gelu` or `silu_and_mul`: out = f(x).
fn unary_case(kernel: &Kernel, name: &'static str, out_shape: &[i64], x_shape: &[i64]) -> Case {
    // Everything the closures point to is leaked: it must outlive them, and the bench is
    // one process.
    let x = Box::leak(Box::new(input(x_shape)));
    let out = Box::leak(Box::new(HostTensor::zeros(out_shape)));
    let err = Box::leak(Box::new([0 as std::ffi::c_char; 1024]));
    let call: &'static KhubCall = Box::leak(Box::new(call_context(err)));
    let (xp, op, cp) = (x.dl(), out.dl_mut(), call as *const KhubCall);
    let typed: Unary = kernel.function::<Unary>(name).expect("typed access").get();
    let mut paths: Vec<CallPath> = Vec::new();
    #[cfg(khub_static_kernel)]
    {
        let direct: Box<dyn FnMut(u64)> = if name == "gelu" {
            Box::new(move |iters| {
                for _ in 0..iters {
                    // SAFETY: live tensors of the right shapes; the C function's type.
                    check(unsafe { khub_example_gelu(black_box(cp), black_box(op), black_box(xp)) });
                }
            })
        } else {
            Box::new(move |iters| {
                for _ in 0..iters {
                    // SAFETY: as above.
                    check(unsafe { khub_example_silu_and_mul(black_box(cp), black_box(op), black_box(xp)) });
                }
            })
        };
        paths.push((PATHS[0], direct));
    }
    paths.push((
        PATHS[1],
        Box::new(move |iters| {
            for _ in 0..iters {
                // SAFETY: the pointer's type was checked against the signature; live tensors.
                check(unsafe { typed(black_box(cp), black_box(op), black_box(xp)) });
            }
        }),
    ));
    let k = kernel.clone();
    paths.push((
        PATHS[2],
        Box::new(move |iters| {
            for _ in 0..iters {
                let args = [Arg::TensorMut(black_box(op)), Arg::Tensor(black_box(xp))];
                // SAFETY: live tensors of the kinds the signature names.
                unsafe { k.call(name, &args, std::ptr::null_mut()) }.expect("generic call");
            }
        }),
    ));
    let size: i64 = x_shape.iter().product();
    Case {
        group: format!("{name}_{size}"),
        paths,
    }
}

/// `rms_norm` on `[rows, h]`.
fn rms_case(kernel: &Kernel, rows: i64, h: i64) -> Case {
    let x = Box::leak(Box::new(input(&[rows, h])));
    let w = Box::leak(Box::new(HostTensor::from_fn(&[h], |i| 0.5 + i as f32 / h as f32)));
    let out = Box::leak(Box::new(HostTensor::zeros(&[rows, h])));
    let eps: &'static f32 = Box::leak(Box::new(1e-6f32));
    let err = Box::leak(Box::new([0 as std::ffi::c_char; 1024]));
    let call: &'static KhubCall = Box::leak(Box::new(call_context(err)));
    let (xp, wp, op, cp, ep) = (x.dl(), w.dl(), out.dl_mut(), call as *const KhubCall, eps as *const f32);
    let typed: RmsNorm = kernel.function::<RmsNorm>("rms_norm").expect("typed access").get();
    let mut paths: Vec<CallPath> = Vec::new();
    #[cfg(khub_static_kernel)]
    paths.push((
        PATHS[0],
        Box::new(move |iters| {
            for _ in 0..iters {
                // SAFETY: live tensors of the right shapes; the C function's type.
                check(unsafe { khub_example_rms_norm(black_box(cp), black_box(op), black_box(xp), black_box(wp), black_box(ep)) });
            }
        }),
    ));
    paths.push((
        PATHS[1],
        Box::new(move |iters| {
            for _ in 0..iters {
                // SAFETY: the pointer's type was checked against the signature; live tensors.
                check(unsafe { typed(black_box(cp), black_box(op), black_box(xp), black_box(wp), black_box(ep)) });
            }
        }),
    ));
    let k = kernel.clone();
    paths.push((
        PATHS[2],
        Box::new(move |iters| {
            for _ in 0..iters {
                let args = [
                    Arg::TensorMut(black_box(op)),
                    Arg::Tensor(black_box(xp)),
                    Arg::Tensor(black_box(wp)),
                    Arg::F32(black_box(1e-6)),
                ];
                // SAFETY: live tensors of the kinds the signature names.
                unsafe { k.call("rms_norm", &args, std::ptr::null_mut()) }.expect("generic call");
            }
        }),
    ));
    Case {
        group: format!("rms_norm_{}", rows * h),
        paths,
    }
}

/// Runs every path of every case once and checks that they all write the same output.
fn check_same_results(kernel: &Kernel) {
    let x = input(&[4096]);
    let mut outs: Vec<HostTensor> = (0..3).map(|_| HostTensor::zeros(&[4096])).collect();
    let mut err = [0 as std::ffi::c_char; 1024];
    let call = call_context(&mut err);
    let typed: Unary = kernel.function::<Unary>("gelu").expect("typed access").get();
    #[cfg(khub_static_kernel)]
    // SAFETY: live tensors of the right shapes.
    check(unsafe { khub_example_gelu(&call, outs[0].dl_mut(), x.dl()) });
    // SAFETY: as above.
    check(unsafe { typed(&call, outs[1].dl_mut(), x.dl()) });
    // SAFETY: as above.
    unsafe {
        kernel.call(
            "gelu",
            &[Arg::TensorMut(outs[2].dl_mut()), Arg::Tensor(x.dl())],
            std::ptr::null_mut(),
        )
    }
    .expect("generic call");
    assert_eq!(outs[1].data(), outs[2].data());
    #[cfg(khub_static_kernel)]
    assert_eq!(
        outs[0].data(),
        outs[1].data(),
        "the static copy and the loaded variant compute the same bits"
    );
}

/// Criterion's median for `group/path`, in ns, if this run wrote it.
fn criterion_median(dir: &Path, group: &str, path: &str, since: SystemTime) -> Option<f64> {
    let file = dir.join(group).join(path).join("new/estimates.json");
    let modified = std::fs::metadata(&file).ok()?.modified().ok()?;
    if modified < since {
        return None;
    }
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).ok()?).ok()?;
    doc["median"]["point_estimate"].as_f64()
}

/// The interleaved check: `rounds` rounds, each timing a batch of calls of every path, in
/// alternating order. Returns the median ns per call of each path.
fn interleaved(case: &mut Case, rounds: usize) -> Vec<f64> {
    let n = case.paths.len();
    // A batch of about 0.5 ms for the slowest path.
    let mut batch = 1u64;
    loop {
        let t = Instant::now();
        (case.paths[n - 1].1)(batch);
        if t.elapsed() > Duration::from_micros(500) || batch > 1 << 24 {
            break;
        }
        batch *= 2;
    }
    let mut samples: Vec<Vec<f64>> = (0..n).map(|_| Vec::with_capacity(rounds)).collect();
    for r in 0..rounds {
        let order: Vec<usize> = if r % 2 == 0 { (0..n).collect() } else { (0..n).rev().collect() };
        for i in order {
            let t = Instant::now();
            (case.paths[i].1)(batch);
            samples[i].push(t.elapsed().as_nanos() as f64 / batch as f64);
        }
    }
    samples
        .into_iter()
        .map(|mut s| {
            s.sort_by(f64::total_cmp);
            s[s.len() / 2]
        })
        .collect()
}

fn main() {
    if cfg!(not(khub_static_kernel)) {
        println!(
            "note: the direct-call baseline (a) needs the static copy of the kernel: run with KHUB_BENCH_STATIC=1 \
             (`KHUB_BENCH_STATIC=1 cargo bench --bench kernel_call`). Running (b) typed and (c) generic only."
        );
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    package_example(dir.path());
    let release = Release::open(dir.path()).expect("open the release");
    let kernel = release.load_variant(VARIANT).expect("load the v3 variant");
    check_same_results(&kernel);

    let mut cases = vec![
        unary_case(&kernel, "gelu", &[16], &[16]),
        unary_case(&kernel, "gelu", &[4096], &[4096]),
        unary_case(&kernel, "gelu", &[65536], &[65536]),
        unary_case(&kernel, "silu_and_mul", &[1, 16], &[1, 32]),
        rms_case(&kernel, 1, 16),
    ];

    // The output directory criterion would pick, made explicit so the medians can be read
    // back: $CRITERION_HOME, else <target>/criterion next to this executable.
    let out_dir = std::env::var_os("CRITERION_HOME").map(PathBuf::from).unwrap_or_else(|| {
        let exe = std::env::current_exe().expect("the bench executable's path");
        // <target>/release/deps/kernel_call-…
        exe.ancestors().nth(3).unwrap_or(Path::new("target")).join("criterion")
    });
    let started = SystemTime::now();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .output_directory(&out_dir)
        .configure_from_args();
    for case in &mut cases {
        let mut g = c.benchmark_group(&case.group);
        for (path, f) in &mut case.paths {
            g.bench_function(*path, |b| {
                b.iter_custom(|iters| {
                    let t = Instant::now();
                    f(iters);
                    t.elapsed()
                })
            });
        }
        g.finish();
    }
    c.final_summary();
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --benches`: criterion ran each path once as a test; no tables.
        return;
    }

    println!();
    println!("criterion medians (ns per call) and ratios, from this run:");
    println!(
        "{:<18} {:>10} {:>10} {:>11} {:>9} {:>17}",
        "case", "(a) direct", "(b) typed", "(c) generic", "(b)/(a)", "(c)-(b) ns/call"
    );
    for case in &cases {
        let m: Vec<Option<f64>> = PATHS.iter().map(|p| criterion_median(&out_dir, &case.group, p, started)).collect();
        let fmt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
        let ratio = match (m[0], m[1]) {
            (Some(a), Some(b)) => format!("{:.3}", b / a),
            _ => "-".into(),
        };
        let over = match (m[1], m[2]) {
            (Some(b), Some(c)) => format!("{:.1}", c - b),
            _ => "-".into(),
        };
        println!(
            "{:<18} {:>10} {:>10} {:>11} {:>9} {:>17}",
            case.group,
            fmt(m[0]),
            fmt(m[1]),
            fmt(m[2]),
            ratio,
            over
        );
    }

    let rounds = 101;
    println!();
    println!("interleaved check ({rounds} rounds of ~0.5 ms batches per path, ABC/CBA order; median ns per call):");
    println!(
        "{:<18} {:>10} {:>10} {:>11} {:>9} {:>17}",
        "case", "(a) direct", "(b) typed", "(c) generic", "(b)/(a)", "(c)-(b) ns/call"
    );
    for case in &mut cases {
        let names: Vec<&str> = case.paths.iter().map(|p| p.0).collect();
        let m = interleaved(case, rounds);
        let get = |p: &str| names.iter().position(|n| *n == p).map(|i| m[i]);
        let (a, b, c) = (get(PATHS[0]), get(PATHS[1]), get(PATHS[2]));
        let fmt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
        println!(
            "{:<18} {:>10} {:>10} {:>11} {:>9} {:>17}",
            case.group,
            fmt(a),
            fmt(b),
            fmt(c),
            a.zip(b).map_or("-".into(), |(a, b)| format!("{:.3}", b / a)),
            b.zip(c).map_or("-".into(), |(b, c)| format!("{:.1}", c - b)),
        );
    }
    println!();
    println!("goal: (b)/(a) <= 1.05");
}
