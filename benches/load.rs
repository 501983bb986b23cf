//! Load time: `Release::load_variant` against the floor of any verified load, in one run.
//!
//! - **khub**: `Release::load_variant` of a one-variant release: every path component
//!   checked, the bytes copied into a memfd and sealed, the sealed bytes hashed and checked
//!   against the manifest, `dlopen` of `/proc/self/fd/N`, ABI negotiation and the export
//!   check. The release's manifest is read (`Release::open`) before the clock starts.
//! - **floor**: what any loader that checks a digest must do at least: SHA-256 of the same
//!   bytes, already in memory (`khub::verify::sha256`), plus a plain
//!   `dlopen(path, RTLD_NOW | RTLD_LOCAL)` of a file holding the same bytes.
//! - **memfd floor** (for the breakdown, not the goal): the floor done khub's way, without
//!   khub's bookkeeping: open the file, copy it into a memfd, seal it, hash the sealed
//!   bytes, `dlopen` the memfd, each step timed. khub minus this is path checks,
//!   negotiation and the export check; this minus the floor is what the memfd costs.
//!
//! A second `dlopen` of a loaded library is nearly free, and khub reuses a library whose
//! digest it has loaded before, so every measurement loads a DISTINCT library: the v3
//! build of kernels-example, made unique by a few trailing bytes (ELF ignores data past its
//! sections). Each arm has its own copies; the arms alternate (ABC, CBA, …) so drift in the
//! machine's load cancels.
//!
//! Two regimes: the library as built (about 28 KiB: `dlopen` dominates), its copies in a
//! temporary directory on disk, and padded to 16 MiB with trailing bytes (hashing
//! dominates), its copies on tmpfs (`/dev/shm`) when there is one.
//!
//! Run: `cargo bench --bench load` (options: `--copies N` (default 200), `--large-copies N`
//! (default 16), `--large-mib N` (default 16)). Results: `docs/performance.md`.
//!
//! `cargo bench` passes `--bench`; without it (as under `cargo test --benches`) this is a
//! short smoke run with few repetitions, whose numbers mean little.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

use std::ffi::CString;
use std::hint::black_box;
use std::io::{Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use khub::{Manifest, Release};

const VARIANT: &str = "cpu-x86_64-v3-linux";
const WARMUP: usize = 5;

struct Options {
    copies: usize,
    large_copies: usize,
    large_mib: usize,
}

fn options() -> Options {
    // Without `--bench` (`cargo test --benches`): a short smoke run.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let mut o = Options {
        copies: if smoke { 5 } else { 200 },
        large_copies: if smoke { 2 } else { 16 },
        large_mib: 16,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = || {
            args.get(i + 1)
                .and_then(|v| v.parse::<usize>().ok())
                .expect("a number after the option")
        };
        match args[i].as_str() {
            "--copies" => o.copies = value(),
            "--large-copies" => o.large_copies = value(),
            "--large-mib" => o.large_mib = value(),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

/// Packages the v3 variant of kernels-example into `dir`; returns its manifest (that
/// variant only) and the library's bytes.
fn package_example(dir: &Path) -> (Manifest, Vec<u8>) {
    let kernel_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernels-example");
    let options = khub::package::BuildOptions {
        only: vec![VARIANT.into()],
        ..Default::default()
    };
    let (mut m, _) = khub::package::package(&kernel_dir, dir, &options, &mut |_| {}).expect("package kernels-example");
    m.variants.retain(|v| v.id == VARIANT);
    let v = m.variants.first().expect("the v3 variant was built (is a C compiler installed?)");
    let bytes = std::fs::read(dir.join(v.library.as_str())).expect("read the library");
    (m, bytes)
}

/// `bytes`, padded with zeros to `pad_to` (when larger), then a unique trailer.
fn unique(bytes: &[u8], tag: u8, i: usize, pad_to: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    if pad_to > b.len() + 16 {
        b.resize(pad_to - 16, 0);
    }
    b.extend_from_slice(b"khub-bench");
    b.push(tag);
    b.extend_from_slice(&(i as u32).to_le_bytes());
    b.push(b'\n');
    b
}

/// Writes a one-variant release at `dir` around `lib`: the template's manifest with the
/// library's size and digest replaced (what `release_with` in tests/common does).
fn write_release(dir: &Path, template: &Manifest, lib: &[u8]) {
    let mut m = template.clone();
    let v = &mut m.variants[0];
    let library = v.library.clone();
    let f = v
        .files
        .iter_mut()
        .find(|f| f.path == library)
        .expect("the library is a file of the variant");
    f.size = lib.len() as u64;
    f.sha256 = khub::verify::sha256(lib);
    let path = dir.join(library.as_str());
    std::fs::create_dir_all(path.parent().expect("a parent directory")).expect("create the variant directory");
    std::fs::write(&path, lib).expect("write the library");
    std::fs::write(dir.join("khub.toml"), m.to_toml_string().expect("serialise the manifest")).expect("write khub.toml");
}

fn dlopen(path: &Path) -> *mut libc::c_void {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL in the path");
    // SAFETY: a valid C string; loading runs the library's initialisers, which is the point.
    unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) }
}

/// Steps of the memfd floor, timed one by one.
const MEMFD_STEPS: [&str; 6] = [
    "open the file",
    "memfd_create",
    "copy into the memfd (std::io::copy)",
    "seal",
    "hash the sealed bytes (dup, rewind, read)",
    "dlopen /proc/self/fd/N",
];

/// The memfd floor: khub's pipeline without its bookkeeping. The memfd stays open (as
/// khub's does) so its `/proc/self/fd/N` path never names another library. Returns the
/// handle and the µs each step took.
fn memfd_load(path: &Path) -> (*mut libc::c_void, [f64; 6]) {
    let mut steps = [0.0; 6];
    let mut t = Instant::now();
    let mut lap = |i: usize| {
        steps[i] = t.elapsed().as_secs_f64() * 1e6;
        t = Instant::now();
    };
    let mut src = std::fs::File::open(path).expect("open the copy");
    lap(0);
    // SAFETY: a valid name and flags; the descriptor is owned by the File below.
    let fd = unsafe { libc::memfd_create(c"bench".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nothing else owns.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    lap(1);
    std::io::copy(&mut src, &mut file).expect("copy into the memfd");
    file.flush().expect("flush");
    lap(2);
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on our descriptor with an integer argument.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) }, 0, "seal");
    lap(3);
    let mut reader = file.try_clone().expect("dup");
    reader.rewind().expect("rewind");
    black_box(khub::verify::sha256_reader(&mut reader).expect("hash"));
    drop(reader);
    lap(4);
    let h = dlopen(&PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd())));
    lap(5);
    let _ = file.into_raw_fd();
    (h, steps)
}

/// `MemFree` and `Dirty` from /proc/meminfo: copying into a memfd allocates fresh pages,
/// which is much slower while the machine writes back a lot of dirty data.
fn meminfo() -> String {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("MemFree:") || l.starts_with("Dirty:"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}

struct Stats {
    median: f64,
    p90: f64,
    min: f64,
    max: f64,
}

fn stats(us: &[f64]) -> Stats {
    let mut s = us.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = |q: f64| s[((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
    Stats {
        median: rank(0.5),
        p90: rank(0.9),
        min: s[0],
        max: s[s.len() - 1],
    }
}

/// Runs one regime: `n` measured loads per arm (plus warm-up), library padded to `pad_to`.
fn regime(label: &str, template: &Manifest, lib: &[u8], n: usize, pad_to: usize) -> f64 {
    // The padded copies (about 1 GB in all) go to tmpfs when there is one: on this VM's
    // disk, writing them back and discarding them on removal took longer than the whole
    // measurement, and read from tmpfs or from a disk's page cache they cost the same.
    let work = match pad_to {
        0 => tempfile::tempdir(),
        _ => tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()),
    }
    .expect("a temporary directory");
    let total = n + WARMUP;
    let t = Instant::now();
    let mut releases = Vec::with_capacity(total);
    let mut floor_bytes = Vec::with_capacity(total);
    let mut floor_paths = Vec::with_capacity(total);
    let mut memfd_paths = Vec::with_capacity(total);
    let mut open_us = Vec::with_capacity(total);
    let mut size = 0;
    for i in 0..total {
        let dir = work.path().join(format!("k{i}"));
        let k = unique(lib, b'K', i, pad_to);
        size = k.len();
        write_release(&dir, template, &k);
        let t = Instant::now();
        releases.push(Release::open(&dir).expect("open the release"));
        open_us.push(t.elapsed().as_secs_f64() * 1e6);
        let f = unique(lib, b'F', i, pad_to);
        let p = work.path().join(format!("floor{i}.so"));
        std::fs::write(&p, &f).expect("write a floor copy");
        floor_paths.push(p);
        floor_bytes.push(f);
        let p = work.path().join(format!("memfd{i}.so"));
        std::fs::write(&p, unique(lib, b'M', i, pad_to)).expect("write a memfd copy");
        memfd_paths.push(p);
    }
    // Flush the new files so writeback does not run during the measurements.
    // SAFETY: sync(2) takes no arguments.
    unsafe { libc::sync() };
    println!(
        "\n== {label}: library of {size} bytes ({:.1} KiB), {n} distinct copies per arm + {WARMUP} warm-up, in {} (prepared in {:.1} s)",
        size as f64 / 1024.0,
        work.path().parent().unwrap_or(work.path()).display(),
        t.elapsed().as_secs_f64()
    );

    println!("memory before measuring: {}", meminfo());

    let mut khub_us = Vec::with_capacity(n);
    let mut floor_us = Vec::with_capacity(n);
    let mut memfd_us = Vec::with_capacity(n);
    let mut kernels = Vec::with_capacity(total);
    let mut floor_steps = (0..2).map(|_| Vec::with_capacity(n)).collect::<Vec<Vec<f64>>>();
    let mut memfd_steps = (0..MEMFD_STEPS.len()).map(|_| Vec::with_capacity(n)).collect::<Vec<Vec<f64>>>();
    for i in 0..total {
        let mut arm = |which: usize| match which {
            0 => {
                let t = Instant::now();
                let k = releases[i].load_variant(VARIANT).expect("khub loads the copy");
                let us = t.elapsed().as_secs_f64() * 1e6;
                kernels.push(k);
                (0, us)
            }
            1 => {
                let t = Instant::now();
                let d = khub::verify::sha256(&floor_bytes[i]);
                let hashed = t.elapsed();
                let h = dlopen(&floor_paths[i]);
                let elapsed = t.elapsed();
                assert!(!h.is_null(), "dlopen of {} failed", floor_paths[i].display());
                black_box(d);
                if i >= WARMUP {
                    floor_steps[0].push(hashed.as_secs_f64() * 1e6);
                    floor_steps[1].push((elapsed - hashed).as_secs_f64() * 1e6);
                }
                (1, elapsed.as_secs_f64() * 1e6)
            }
            _ => {
                let t = Instant::now();
                let (h, steps) = memfd_load(&memfd_paths[i]);
                let us = t.elapsed().as_secs_f64() * 1e6;
                assert!(!h.is_null(), "dlopen of a memfd failed");
                if i >= WARMUP {
                    for (all, s) in memfd_steps.iter_mut().zip(steps) {
                        all.push(s);
                    }
                }
                (2, us)
            }
        };
        let order: [usize; 3] = if i % 2 == 0 { [0, 1, 2] } else { [2, 1, 0] };
        for which in order {
            let (w, us) = arm(which);
            if i >= WARMUP {
                [&mut khub_us, &mut floor_us, &mut memfd_us][w].push(us);
            }
        }
    }
    assert!(kernels.iter().all(|k| k.functions().count() == 3));

    let (k, f, m) = (stats(&khub_us), stats(&floor_us), stats(&memfd_us));
    let mut paired: Vec<f64> = khub_us.iter().zip(&floor_us).map(|(k, f)| k / f).collect();
    paired.sort_by(f64::total_cmp);
    let ratio = k.median / f.median;
    println!(
        "{:<44} {:>10} {:>10} {:>10} {:>10}",
        "arm (µs per load)", "median", "p90", "min", "max"
    );
    for (name, s) in [
        ("khub Release::load_variant", &k),
        ("floor: sha256 + dlopen", &f),
        ("memfd floor: file -> sealed memfd -> dlopen", &m),
    ] {
        println!("{name:<44} {:>10.1} {:>10.1} {:>10.1} {:>10.1}", s.median, s.p90, s.min, s.max);
    }
    let open = stats(&open_us);
    println!(
        "not timed above: Release::open (read + parse khub.toml) median {:.1} µs, p90 {:.1} µs",
        open.median, open.p90
    );
    println!(
        "ratio khub / floor: {ratio:.3} (medians), {:.3} (median of paired ratios), p90 {:.3}; goal <= 1.2: {}",
        paired[paired.len() / 2],
        k.p90 / f.p90,
        if ratio <= 1.2 { "met" } else { "NOT met" }
    );
    println!("steps (median µs of each step, measured inside the two floors):");
    for (name, v) in ["floor: sha256 of the bytes in memory", "floor: dlopen of the file"]
        .iter()
        .zip(&floor_steps)
        .chain(MEMFD_STEPS.iter().zip(&memfd_steps))
    {
        println!("  {name:<46} {:>10.1}", stats(v).median);
    }
    println!(
        "breakdown (medians): memfd floor - floor = {:.1} µs (open, memfd copy, seal, hashing through read(), \
         dlopen through /proc); khub - memfd floor = {:.1} µs (path checks, negotiation, export check)",
        m.median - f.median,
        k.median - m.median
    );
    ratio
}

fn main() {
    let bench_started = Instant::now();
    let o = options();
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "smoke run (no --bench, as under `cargo test --benches`): few repetitions, debug builds; the numbers are not measurements"
        );
    }
    // Loads keep their descriptors open for the life of the process (as khub's do).
    // SAFETY: plain get/setrlimit on a local struct.
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (template, lib) = package_example(dir.path());
    let small = regime("as built", &template, &lib, o.copies, 0);
    let large = regime(
        &format!("padded to {} MiB", o.large_mib),
        &template,
        &lib,
        o.large_copies,
        o.large_mib << 20,
    );
    println!("\nsummary: khub / floor = {small:.3} (as built), {large:.3} (padded); goal <= 1.2");
    println!("(this bench ran for {:.1} s)", bench_started.elapsed().as_secs_f64());
}
