//! CPU variant throughput: each CPU variant of kernels-example that this CPU runs, on
//! 64 MiB inputs, beside a memcpy of the same number of bytes measured in the same run.
//!
//! - `silu_and_mul`: x `[2048, 8192]` f32 (16 Mi floats, 64 MiB) → out `[2048, 4096]`
//!   (32 MiB): 96 MiB moved per call.
//! - `gelu`: x `[16 Mi]` → out `[16 Mi]`: 128 MiB moved.
//! - `rms_norm`: x `[4096, 4096]`, weight `[4096]` → out `[4096, 4096]`: 128 MiB moved
//!   (the weight, 16 KiB, is not counted; each row is read twice, the second time from
//!   cache, and counted once).
//!
//! GB/s = (bytes read + bytes written) / median time. The reference is
//! `copy_from_slice` between two buffers of half the moved bytes each, so it reads and
//! writes the same total. Calls go through the typed function pointers of the loaded,
//! verified variants. Every round calls each (function, variant) once and the memcpy once,
//! rotating the order, so load drift hits all of them alike; medians over the rounds.
//!
//! Run: `cargo bench --bench throughput` (option: `--rounds N`, default 15). Results:
//! `docs/performance.md`.
//!
//! `cargo bench` passes `--bench`; without it (as under `cargo test --benches`) this is a
//! short smoke run with few repetitions, whose numbers mean little.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use khub::abi::{DLTensor, KhubCall, Status};
use khub::bench::HostTensor;
use khub::host::{HostFacts, ProbeOptions};
use khub::load::Kernel;
use khub::{Manifest, Release};

type Unary = unsafe extern "C" fn(*const KhubCall, *mut DLTensor, *const DLTensor) -> Status;
type RmsNorm = unsafe extern "C" fn(*const KhubCall, *mut DLTensor, *const DLTensor, *const DLTensor, *const f32) -> Status;

const VARIANTS: [&str; 3] = ["cpu-x86_64-v1-linux", "cpu-x86_64-v3-linux", "cpu-x86_64-v4-linux"];

fn rounds() -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(if smoke() { 2 } else { 15 })
        .max(1)
}

/// Without `--bench` (`cargo test --benches`): a short smoke run.
fn smoke() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The tensors of one function, shared by every variant.
struct Work {
    function: &'static str,
    bytes: usize,
    x: HostTensor,
    w: Option<HostTensor>,
    out: HostTensor,
}

fn work() -> Vec<Work> {
    let fill = |i: usize| ((i * 7919) % 2000) as f32 / 250.0 - 4.0;
    let silu = {
        let (n, d) = (2048i64, 4096i64);
        let x = HostTensor::from_fn(&[n, 2 * d], fill);
        let out = HostTensor::zeros(&[n, d]);
        Work {
            function: "silu_and_mul",
            bytes: x.bytes() + out.bytes(),
            x,
            w: None,
            out,
        }
    };
    let gelu = {
        let x = HostTensor::from_fn(&[16 << 20], fill);
        let out = HostTensor::zeros(&[16 << 20]);
        Work {
            function: "gelu",
            bytes: x.bytes() + out.bytes(),
            x,
            w: None,
            out,
        }
    };
    let rms = {
        let (n, h) = (4096i64, 4096i64);
        let x = HostTensor::from_fn(&[n, h], fill);
        let out = HostTensor::zeros(&[n, h]);
        let w = HostTensor::from_fn(&[h], |i| 0.5 + i as f32 / h as f32);
        Work {
            function: "rms_norm",
            bytes: x.bytes() + out.bytes(),
            x,
            w: Some(w),
            out,
        }
    };
    vec![silu, gelu, rms]
}

/// One call of `w.function` on `kernel`, timed, in seconds.
fn run(kernel: &Kernel, w: &mut Work) -> f64 {
    let mut err = [0 as std::ffi::c_char; 1024];
    let call = KhubCall {
        struct_size: std::mem::size_of::<KhubCall>() as u32,
        flags: 0,
        stream: std::ptr::null_mut(),
        error: err.as_mut_ptr(),
        error_capacity: err.len(),
    };
    let eps = 1e-6f32;
    let status;
    let t;
    if w.function == "rms_norm" {
        let f = kernel.function::<RmsNorm>("rms_norm").expect("typed access").get();
        let wt = w.w.as_ref().expect("rms_norm has a weight").dl();
        let start = Instant::now();
        // SAFETY: live tensors of the shapes the signature names.
        status = unsafe { f(&call, w.out.dl_mut(), w.x.dl(), wt, &eps) };
        t = start.elapsed();
    } else {
        let f = kernel.function::<Unary>(w.function).expect("typed access").get();
        let start = Instant::now();
        // SAFETY: as above.
        status = unsafe { f(&call, w.out.dl_mut(), w.x.dl()) };
        t = start.elapsed();
    }
    assert_eq!(status, khub::abi::OK, "{} failed", w.function);
    black_box(w.out.data());
    t.as_secs_f64()
}

fn main() {
    let bench_started = Instant::now();
    let rounds = rounds();
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "smoke run (no --bench, as under `cargo test --benches`): few repetitions, debug builds; the numbers are not measurements"
        );
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let kernel_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernels-example");
    let options = khub::package::BuildOptions {
        only: VARIANTS.iter().map(|v| v.to_string()).collect(),
        ..Default::default()
    };
    khub::package::package(&kernel_dir, dir.path(), &options, &mut |_| {}).expect("package kernels-example");
    let release = Release::open(dir.path()).expect("open the release");
    let manifest: &Manifest = release.manifest();
    let host = HostFacts::detect(&ProbeOptions::from_env().expect("valid KHUB_* environment"))
        .expect("host detection")
        .facts;
    let mut kernels: Vec<(String, Kernel)> = Vec::new();
    for id in VARIANTS {
        let Some(v) = manifest.variant(id) else {
            println!("{id}: not built (skipped)");
            continue;
        };
        if !khub::resolve::runs_on(manifest, v, &host) {
            println!("{id}: this CPU does not run it (skipped)");
            continue;
        }
        kernels.push((id.to_owned(), release.load_variant(id).expect("load the variant")));
    }
    let mut work = work();
    let mut memcpy_src: Vec<Vec<u8>> = work.iter().map(|w| vec![1u8; w.bytes / 2]).collect();
    let mut memcpy_dst: Vec<Vec<u8>> = work.iter().map(|w| vec![0u8; w.bytes / 2]).collect();
    // Warm up: one call of everything (page faults are already taken: the buffers were
    // written when they were filled).
    for w in &mut work {
        for (_, k) in &kernels {
            run(k, w);
        }
    }
    // times[function][0] = memcpy, times[function][1 + variant] = kernel.
    let mut times: Vec<Vec<Vec<f64>>> = (0..work.len())
        .map(|_| (0..=kernels.len()).map(|_| Vec::with_capacity(rounds)).collect())
        .collect();
    let started = Instant::now();
    for r in 0..rounds {
        for (fi, w) in work.iter_mut().enumerate() {
            let mut order: Vec<usize> = (0..=kernels.len()).collect();
            let len = order.len();
            order.rotate_left(r % len);
            if r % 2 == 1 {
                order.reverse();
            }
            for slot in order {
                let t = if slot == 0 {
                    let (src, dst) = (&memcpy_src[fi], &mut memcpy_dst[fi]);
                    let start = Instant::now();
                    dst.copy_from_slice(black_box(src));
                    let t = start.elapsed().as_secs_f64();
                    black_box(&dst);
                    t
                } else {
                    run(&kernels[slot - 1].1, w)
                };
                times[fi][slot].push(t);
            }
        }
    }
    memcpy_src.clear();
    println!(
        "\n{rounds} rounds in {:.1} s; medians; GB/s = (bytes read + written) / time, 1 GB = 1e9 bytes\n",
        started.elapsed().as_secs_f64()
    );
    println!(
        "{:<14} {:<22} {:>9} {:>9} {:>9} {:>10} {:>11}",
        "function", "variant", "MiB moved", "ms", "GB/s", "of memcpy", "vs v1"
    );
    let mut best_silu = 0.0f64;
    for (fi, w) in work.iter().enumerate() {
        let mib = w.bytes as f64 / (1 << 20) as f64;
        let m = median(&mut times[fi][0]);
        let gbs = |t: f64| w.bytes as f64 / t / 1e9;
        println!(
            "{:<14} {:<22} {:>9.0} {:>9.2} {:>9.2} {:>10} {:>11}",
            w.function,
            "memcpy (reference)",
            mib,
            m * 1e3,
            gbs(m),
            "100%",
            "-"
        );
        let base = kernels
            .iter()
            .position(|(id, _)| id == VARIANTS[0])
            .map(|i| median(&mut times[fi][i + 1].clone()));
        for (vi, (id, _)) in kernels.iter().enumerate() {
            let t = median(&mut times[fi][vi + 1]);
            let share = m / t;
            if w.function == "silu_and_mul" {
                best_silu = best_silu.max(share);
            }
            println!(
                "{:<14} {:<22} {:>9.0} {:>9.2} {:>9.2} {:>9.0}% {:>11}",
                "",
                id,
                mib,
                t * 1e3,
                gbs(t),
                share * 100.0,
                base.map_or("-".into(), |b| format!("{:.2}x", b / t))
            );
        }
    }
    black_box(&memcpy_dst);
    println!(
        "\ngoal: best silu_and_mul variant >= 70% of memcpy bandwidth: {:.0}% ({})",
        best_silu * 100.0,
        if best_silu >= 0.7 { "met" } else { "NOT met" }
    );
    println!("(this bench ran for {:.1} s)", bench_started.elapsed().as_secs_f64());
}
