//! Warm locked load: `Hub::load_locked` from a filled store against the floor, in one run.
//!
//! Setup (not timed): a directory registry with many one-variant releases of the v3 build
//! of kernels-example, each made distinct by a few trailing bytes; `Hub::lock` for this
//! host, which fetches every locked variant into a fresh store; the lock is written and read
//! back. Then a second, offline `Hub` over the same store is built once; its host facts
//! are detected once, outside the timed region.
//!
//! - **khub**: `hub.load_locked(&lock, path, repo)`: the locked manifest from the store
//!   (read, digest check, parse), the lock's digests checked against it, resolution among
//!   the locked variants, the store checked for every file, then the verified load (sealed
//!   memfd, hash, `dlopen`, negotiation, export check).
//! - **floor**: SHA-256 of the same library bytes, in memory, plus a plain `dlopen` of a
//!   distinct copy.
//! - **replica** (for the breakdown): the steps of `load_locked` done one by one with
//!   khub's public API, each timed, on releases of its own: where the time goes, measured
//!   in the same interleaved run rather than in a hot loop of its own.
//!
//! khub reuses a library whose digest it has loaded before, so every load is of a distinct
//! release (distinct bytes); the arms alternate (ABC, CBA, …). Reading a one-entry
//! `khub.lock`, which the timed call does not include, is measured beside it.
//!
//! Run: `cargo bench --bench locked` (option: `--copies N`, default 100). Results:
//! `docs/performance.md`.
//!
//! `cargo bench` passes `--bench`; without it (as under `cargo test --benches`) this is a
//! short smoke run with few repetitions, whose numbers mean little.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

use std::ffi::CString;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Instant;

use khub::Manifest;
use khub::host::Environment;
use khub::hub::{Hub, HubOptions, Quiet, RegistrySpec};
use khub::lock::{AppKernels, Lockfile};
use khub::registry::RepoId;
use khub::store::StoreSource;

const VARIANT: &str = "cpu-x86_64-v3-linux";
const WARMUP: usize = 5;
/// What `Hub::load_locked` does, as the replica arm times it.
const REPLICA_STEPS: [&str; 4] = [
    "read the locked manifest from the store (read_verified)",
    "Manifest::from_bytes",
    "choose_among the locked variants (one pass)",
    "load_from: copy into a sealed memfd, hash it, dlopen, negotiate",
];

fn copies() -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--copies")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(if smoke() { 5 } else { 100 })
        .max(1)
}

/// Without `--bench` (`cargo test --benches`): a short smoke run.
fn smoke() -> bool {
    !std::env::args().any(|a| a == "--bench")
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

/// `bytes` with a unique trailer (ELF ignores trailing data).
fn unique(bytes: &[u8], tag: u8, i: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b.extend_from_slice(b"khub-bench");
    b.push(tag);
    b.extend_from_slice(&(i as u32).to_le_bytes());
    b.push(b'\n');
    b
}

/// Writes a one-variant release at `dir` around `lib` (what `release_with` in tests/common
/// does, with the packaged manifest as the template).
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
    let text = m.to_toml_string().expect("serialise the manifest");
    std::fs::write(dir.join("khub.toml"), text).expect("write khub.toml");
}

fn dlopen(path: &Path) -> *mut libc::c_void {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL in the path");
    // SAFETY: a valid C string; loading runs the library's initialisers, which is the point.
    unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) }
}

struct Stats {
    median: f64,
    p90: f64,
    min: f64,
}

fn stats(us: &[f64]) -> Stats {
    let mut s = us.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = |q: f64| s[((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
    Stats {
        median: rank(0.5),
        p90: rank(0.9),
        min: s[0],
    }
}

/// Median µs of `f` over `n` calls.
fn time_us(n: usize, mut f: impl FnMut()) -> Stats {
    let us: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    stats(&us)
}

fn main() {
    let bench_started = Instant::now();
    let n = copies();
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "smoke run (no --bench, as under `cargo test --benches`): few repetitions, debug builds; the numbers are not measurements"
        );
    }
    let total = n + WARMUP;
    let work = tempfile::tempdir().expect("a temporary directory");
    let (template, lib) = package_example(&work.path().join("package"));

    // The registry: bench/locked-i (timed through load_locked) and bench/plain-i (timed
    // through load_from), all distinct; the floor's copies as plain files.
    let t = Instant::now();
    let root = work.path().join("registry");
    let mut app = AppKernels::default();
    let mut locked_repos = Vec::with_capacity(total);
    let mut plain_repos = Vec::with_capacity(total);
    let mut floor = Vec::with_capacity(total);
    for i in 0..total {
        let repo: RepoId = format!("bench/locked-{i}").parse().expect("a repository id");
        write_release(&root.join(format!("bench/locked-{i}/0.1.0")), &template, &unique(&lib, b'L', i));
        app.kernels.insert(repo.clone(), "^0.1".into());
        locked_repos.push(repo);
        let repo: RepoId = format!("bench/plain-{i}").parse().expect("a repository id");
        write_release(&root.join(format!("bench/plain-{i}/0.1.0")), &template, &unique(&lib, b'P', i));
        app.kernels.insert(repo.clone(), "^0.1".into());
        plain_repos.push(repo);
        let bytes = unique(&lib, b'F', i);
        let path = work.path().join(format!("floor{i}.so"));
        std::fs::write(&path, &bytes).expect("write a floor copy");
        floor.push((bytes, path));
    }
    let cache = work.path().join("cache");
    let env = Environment::from_pairs([("KHUB_CACHE", cache.to_str().expect("a UTF-8 path"))]);
    let mut options = HubOptions::from_env(env).expect("hub options");
    options.registry = RegistrySpec::Dir(root.clone());
    options.offline = false;
    let online = Hub::new(options.clone()).expect("a hub over the directory registry");
    let host = online.host().clone();
    let lock = online
        .lock(&app, &[("bench host".into(), host)], Lockfile::new(), &Quiet)
        .expect("lock and fetch");
    let lock_path = work.path().join("khub.lock");
    lock.write(&lock_path).expect("write khub.lock");
    let lock = Lockfile::read(&lock_path).expect("read khub.lock");
    // A one-entry lockfile, as an application with one kernel has.
    let one_path = work.path().join("one.lock");
    let mut one = Lockfile::new();
    one.upsert(lock.get(&locked_repos[0]).expect("locked").clone());
    one.write(&one_path).expect("write one.lock");
    drop(online);
    // Hub::new when no request will be made: offline, and online over a Hub URL (whose
    // HTTP client and runtime are built on the first request, so not here).
    let hub_new_offline = time_us(if smoke() { 5 } else { 200 }, || {
        let mut o = options.clone();
        o.offline = true;
        black_box(Hub::new(o).expect("an offline hub"));
    });
    let hub_new_url = time_us(if smoke() { 5 } else { 200 }, || {
        let mut o = options.clone();
        o.registry = RegistrySpec::Url("http://127.0.0.1:9".into());
        black_box(Hub::new(o).expect("a hub over a URL"));
    });
    options.offline = true;
    let hub = Hub::new(options).expect("an offline hub over the store");
    // SAFETY: sync(2) takes no arguments; flush the new files before measuring.
    unsafe { libc::sync() };
    println!(
        "library of {} bytes; {n} distinct releases per arm + {WARMUP} warm-up; registry, lock and store prepared in {:.1} s",
        lib.len() + 16,
        t.elapsed().as_secs_f64()
    );

    let mut locked_us = Vec::with_capacity(n);
    let mut floor_us = Vec::with_capacity(n);
    let mut replica_us = Vec::with_capacity(n);
    let mut replica_steps = (0..REPLICA_STEPS.len()).map(|_| Vec::with_capacity(n)).collect::<Vec<Vec<f64>>>();
    let mut kernels = Vec::with_capacity(2 * total);
    let store = hub.store();
    let source = StoreSource { store };
    let host = hub.host().clone();
    for i in 0..total {
        let order: [usize; 3] = if i % 2 == 0 { [0, 1, 2] } else { [2, 1, 0] };
        for which in order {
            let us = match which {
                0 => {
                    let t = Instant::now();
                    let k = hub.load_locked(&lock, &lock_path, &locked_repos[i]).expect("locked load");
                    let us = t.elapsed().as_secs_f64() * 1e6;
                    kernels.push(k);
                    us
                }
                1 => {
                    let (bytes, path) = &floor[i];
                    let t = Instant::now();
                    let d = khub::verify::sha256(bytes);
                    let h = dlopen(path);
                    let us = t.elapsed().as_secs_f64() * 1e6;
                    assert!(!h.is_null(), "dlopen of {} failed", path.display());
                    black_box(d);
                    us
                }
                _ => {
                    let entry = lock.get(&plain_repos[i]).expect("locked");
                    let mut steps = [0.0; REPLICA_STEPS.len()];
                    let start = Instant::now();
                    let mut t = start;
                    let mut lap = |k: usize| {
                        steps[k] = t.elapsed().as_secs_f64() * 1e6;
                        t = Instant::now();
                    };
                    let buf = store
                        .read_verified(&entry.manifest_sha256, khub::manifest::MAX_MANIFEST_BYTES as u64)
                        .expect("the manifest blob");
                    lap(0);
                    let m = Manifest::from_bytes(&buf).expect("the manifest parses");
                    lap(1);
                    let locked = |v: &khub::manifest::Variant| entry.targets.iter().any(|t| t.variant == v.id);
                    let chosen = khub::resolve::choose_among(&m, &host, &Default::default(), locked).expect("the locked variant fits");
                    let chosen = m.variants[chosen].id.clone();
                    lap(2);
                    let k = khub::load::load_from(&source, &m, &chosen).expect("load from the store");
                    lap(3);
                    let us = start.elapsed().as_secs_f64() * 1e6;
                    kernels.push(k);
                    if i >= WARMUP {
                        for (all, s) in replica_steps.iter_mut().zip(steps) {
                            all.push(s);
                        }
                    }
                    us
                }
            };
            if i >= WARMUP {
                [&mut locked_us, &mut floor_us, &mut replica_us][which].push(us);
            }
        }
    }
    assert!(kernels.iter().all(|k| k.variant() == VARIANT && k.functions().count() == 3));

    // Not inside load_locked: reading the lock, which a caller does once.
    let reads = time_us(200, || {
        black_box(Lockfile::read(&one_path).expect("read one.lock"));
    });

    let (l, f, r) = (stats(&locked_us), stats(&floor_us), stats(&replica_us));
    let mut paired: Vec<f64> = locked_us.iter().zip(&floor_us).map(|(l, f)| l / f).collect();
    paired.sort_by(f64::total_cmp);
    let ratio = l.median / f.median;
    println!("{:<44} {:>10} {:>10} {:>10}", "arm (µs per load)", "median", "p90", "min");
    for (name, st) in [
        ("khub Hub::load_locked", &l),
        ("floor: sha256 + dlopen", &f),
        ("replica of load_locked, step by step", &r),
    ] {
        println!("{name:<44} {:>10.1} {:>10.1} {:>10.1}", st.median, st.p90, st.min);
    }
    println!(
        "ratio load_locked / floor: {ratio:.3} (medians), {:.3} (median of paired ratios); goal <= 1.3: {}",
        paired[paired.len() / 2],
        if ratio <= 1.3 { "met" } else { "NOT met" }
    );
    println!("the replica's steps (median µs of each, measured in the interleaved run):");
    let mut sum = 0.0;
    for (name, v) in REPLICA_STEPS.iter().zip(&replica_steps) {
        let m = stats(v).median;
        sum += m;
        println!("  {name:<62} {m:>8.1}");
    }
    println!("  {:<62} {sum:>8.1}", "sum of the step medians");
    println!("  {:<62} {:>8.1}", "(for comparison: the floor)", f.median);
    println!(
        "not inside load_locked: Lockfile::read of a one-entry khub.lock, median {:.1} µs (the caller reads the lock once)",
        reads.median
    );
    for (name, st) in [
        ("Hub::new, offline (store only)", &hub_new_offline),
        ("Hub::new over a Hub URL, no request made", &hub_new_url),
    ] {
        println!(
            "{name:<44} median {:>7.1} µs, p90 {:>7.1} µs; goal <= 1000 µs: {}",
            st.median,
            st.p90,
            if st.median <= 1000.0 { "met" } else { "NOT met" }
        );
    }
    println!("(this bench ran for {:.1} s)", bench_started.elapsed().as_secs_f64());
}
