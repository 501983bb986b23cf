//! Many writers, one blob: threads of one process, then separate processes, insert the
//! same 5 MB blob into an empty store at the same moment. Exactly one of them may download
//! it (`fill` runs once in total), all must succeed, the blob must be intact and no temp
//! file may remain.
//!
//! The process test re-runs this test binary with `KHUB_STORE_CHILD=1`, which turns the
//! same test function into one child writer.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use khub::manifest::Sha256Digest;
use khub::store::{FillError, Inserted, Store};

const BLOB_SIZE: usize = 5 * 1024 * 1024;
const THREADS: usize = 8;
const PROCESSES: usize = 4;

/// Selects child mode; the value is unused.
const CHILD: &str = "KHUB_STORE_CHILD";
/// In child mode: the cache directory, the counter file and the start signal's directory.
const CHILD_CACHE: &str = "KHUB_STORE_CHILD_CACHE";
const CHILD_COUNTER: &str = "KHUB_STORE_CHILD_COUNTER";
const CHILD_SYNC: &str = "KHUB_STORE_CHILD_SYNC";

/// The same pseudo-random 5 MB in every thread and process.
fn blob() -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..BLOB_SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Writes `bytes` in 64 KiB pieces, like a download would.
fn stream(bytes: &[u8], w: &mut dyn Write) -> Result<u64, FillError> {
    for chunk in bytes.chunks(64 * 1024) {
        w.write_all(chunk)?;
    }
    Ok(bytes.len() as u64)
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The blob is in the store, byte for byte, and nothing else is.
fn assert_intact(store: &Store, d: &Sha256Digest, bytes: &[u8]) {
    assert!(store.contains(d, bytes.len() as u64));
    let on_disk = std::fs::read(store.blob_path(d)).unwrap();
    assert!(on_disk == bytes, "the stored blob differs from what was inserted");
    assert!(store.verify_blob(d, bytes.len() as u64).unwrap());
    assert_eq!(store.list().unwrap(), vec![(*d, bytes.len() as u64)]);
    assert!(
        entries(&store.root().join("tmp")).is_empty(),
        "temp files remain: {:?}",
        entries(&store.root().join("tmp"))
    );
}

#[test]
fn eight_threads_insert_the_same_blob_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let bytes = Arc::new(blob());
    let d = khub::verify::sha256(&bytes);
    let fills = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(THREADS));

    let handles: Vec<_> = (0..THREADS)
        .map(|i| {
            let (store, bytes, fills, start) = (store.clone(), bytes.clone(), fills.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                store.insert_with(&format!("blob (thread {i})"), &d, bytes.len() as u64, &mut |w| {
                    fills.fetch_add(1, Ordering::SeqCst);
                    stream(&bytes, w)
                })
            })
        })
        .collect();
    let results: Vec<Inserted> = handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect();

    assert_eq!(fills.load(Ordering::SeqCst), 1, "fill must run exactly once");
    let written = results
        .iter()
        .filter(|r| matches!(r, Inserted::Written(n) if *n == BLOB_SIZE as u64))
        .count();
    assert_eq!(written, 1, "{results:?}");
    assert_eq!(results.iter().filter(|r| **r == Inserted::Present).count(), THREADS - 1);
    assert_intact(&store, &d, &bytes);
}

/// Waits for `cond`, failing the test after a minute.
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Child mode: announce readiness, wait for the start signal, insert, print the outcome.
fn child() {
    let var = |k: &str| PathBuf::from(std::env::var_os(k).unwrap_or_else(|| panic!("{k} is not set")));
    let (cache, counter, sync) = (var(CHILD_CACHE), var(CHILD_COUNTER), var(CHILD_SYNC));
    let store = Store::open(&cache).unwrap();
    let bytes = blob();
    let d = khub::verify::sha256(&bytes);
    std::fs::write(sync.join(format!("ready.{}", std::process::id())), b"").unwrap();
    wait_for("the start signal", || sync.join("go").exists());
    let r = store
        .insert_with("blob (child)", &d, bytes.len() as u64, &mut |w| {
            let mut c = std::fs::OpenOptions::new().append(true).create(true).open(&counter)?;
            writeln!(c, "fill in {}", std::process::id())?;
            stream(&bytes, w)
        })
        .unwrap();
    println!(
        "CHILD-RESULT {}",
        if matches!(r, Inserted::Present) { "present" } else { "written" }
    );
}

#[test]
fn four_processes_insert_the_same_blob_once() {
    if std::env::var_os(CHILD).is_some() {
        return child();
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let counter = dir.path().join("fills.txt");
    let sync = dir.path().join("sync");
    std::fs::create_dir(&sync).unwrap();
    Store::open(&cache).unwrap();

    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "four_processes_insert_the_same_blob_once",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD, "1")
                .env(CHILD_CACHE, &cache)
                .env(CHILD_COUNTER, &counter)
                .env(CHILD_SYNC, &sync)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    wait_for("every child to start", || {
        entries(&sync).iter().filter(|n| n.starts_with("ready.")).count() == PROCESSES
    });
    std::fs::write(sync.join("go"), b"").unwrap();

    let mut outcomes = Vec::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "a child failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // libtest prints `test <name> ... ` without a newline before the test's own output.
        let outcome = stdout
            .lines()
            .find_map(|l| l.split_once("CHILD-RESULT ").map(|(_, rest)| rest.trim().to_owned()));
        outcomes.push(outcome.unwrap_or_else(|| panic!("a child did not run the insert:\n{stdout}")));
    }
    outcomes.sort();
    assert_eq!(outcomes, ["present", "present", "present", "written"]);

    let fills = std::fs::read_to_string(&counter).unwrap();
    assert_eq!(fills.lines().count(), 1, "fill must run exactly once in total:\n{fills}");
    let bytes = blob();
    assert_intact(&Store::open(&cache).unwrap(), &khub::verify::sha256(&bytes), &bytes);
}
