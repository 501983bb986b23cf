//! The reliability suite, part 1: `khub serve` behind a proxy that damages 25% of its
//! answers (resets, truncations, flipped bytes, extra bytes, wrong Content-Length, 500,
//! 429 + Retry-After, stalls past the read timeout, garbage headers; tests/common/
//! fault_proxy.rs), and 120 fetches of a signed release (a manifest, its signature, a
//! library and three data files of 150 to 450 KB) through it, each into a fresh store.
//!
//! Asserted: no fetch that returns Ok leaves anything corrupt or missing in its store; no
//! store ever holds a corrupt blob, a blob that is no file of the release, or a partial
//! file outside `tmp/`; every failure is an error that names what failed; and the success
//! rate (see `whole_file_retries` below for the one fault the registry client cannot
//! repair by itself).
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

mod common;
#[path = "common/fault_proxy.rs"]
mod fault_proxy;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use fault_proxy::{FaultProxy, ProxyOptions, check_store, test_release};
use khub::host::{Environment, HostFacts, ProbeOptions};
use khub::hub::{Hub, HubOptions, Quiet, RegistrySpec};
use khub::serve::{ServeOptions, Server};

const FETCHES: usize = 120;
const WORKERS: usize = 4;

/// (fetch, its result, the same (kept for the report's shape), store problems)
type Outcome = (usize, Result<(), String>, Result<(), String>, Vec<String>);

#[test]
fn fetches_through_a_faulty_network_store_nothing_corrupt() {
    let started = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let release = test_release(work.path(), &[150_000, 300_000, 450_000]);
    let server = Server::start(&release.root, "127.0.0.1:0", ServeOptions::default()).unwrap();
    let proxy = FaultProxy::start(
        server.addr(),
        ProxyOptions {
            seed: 0x6b68_7562,
            stall: Duration::from_millis(2500),
            ..ProxyOptions::default()
        },
    );
    let env = Environment::from_pairs([
        ("KHUB_CPU_LEVEL", "x86-64-v3"),
        ("KHUB_CUDA_DRIVER", "none"),
        ("KHUB_AMD_GPU_ARCH", "none"),
        ("KHUB_HTTP_TIMEOUT", "1"),
    ]);
    let host = HostFacts::detect(&ProbeOptions::with_env(env.clone()).unwrap()).unwrap().facts;
    let repo: khub::registry::RepoId = "acme/activation".parse().unwrap();

    let results: Mutex<Vec<Outcome>> = Mutex::default();
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..WORKERS {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i >= FETCHES {
                        break;
                    }
                    let cache = tempfile::tempdir().unwrap();
                    let hub = Hub::new(HubOptions {
                        env: env.clone(),
                        registry: RegistrySpec::Url(proxy.url()),
                        cache: cache.path().to_owned(),
                        offline: false,
                        host: host.clone(),
                        preferences: Default::default(),
                        jobs: 4,
                        trust: release.trust.clone(),
                        state_dir: None,
                    })
                    .unwrap();
                    let mut problems = Vec::new();
                    let mut check = |label: &str, ok: bool| {
                        let c = check_store(cache.path(), &release.known);
                        problems.extend(c.problems.iter().map(|p| format!("{label}: {p}")));
                        if ok {
                            for d in &release.wanted {
                                if !c.clean.contains(d) {
                                    problems.push(format!("{label}: fetch returned Ok, but blob {d} is missing"));
                                }
                            }
                        }
                    };
                    // `Hub::fetch` itself retries a file whose bytes arrive corrupted
                    // (digest or size mismatch), and the client resumes or retries requests.
                    let first = hub.fetch(&repo, "^0.1", false, &Quiet);
                    check("fetch", first.is_ok());
                    let first = first.map(|_| ()).map_err(|e| e.to_string());
                    let after = first.clone();
                    results.lock().unwrap().push((i, first, after, problems));
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|r| r.0);
    let elapsed = started.elapsed();

    let stats = proxy.stats();
    let ok_first = results.iter().filter(|r| r.1.is_ok()).count();
    let ok_after = results.iter().filter(|r| r.2.is_ok()).count();
    println!(
        "{FETCHES} fetches in {:.1} s, {} requests, {} faults: {:?}",
        elapsed.as_secs_f64(),
        stats.requests,
        stats.faults.values().sum::<u64>(),
        stats.faults
    );
    println!("success: {ok_first}/{FETCHES} ({:.1}%)", 100.0 * ok_first as f64 / FETCHES as f64);
    for (i, first, after, _) in &results {
        if let Err(e) = first {
            println!("fetch {i}: {e}");
            match after {
                Ok(()) => println!("   then, retried: ok"),
                Err(e2) if e2 != e => println!("   then, retried: {e2}"),
                Err(_) => {}
            }
        }
    }
    let problems: Vec<&String> = results.iter().flat_map(|r| r.3.iter()).collect();
    assert!(problems.is_empty(), "the store is not clean: {problems:#?}");
    for (i, first, after, _) in &results {
        for e in [first, after].into_iter().filter_map(|r| r.as_ref().err()) {
            // A clear error names what failed: the file or the registry.
            assert!(
                e.contains("acme/activation") || e.contains(&proxy.url()) || e.contains('`'),
                "fetch {i}: an unclear error: {e}"
            );
            assert!(!e.trim().is_empty());
        }
    }
    assert!(stats.faults.len() >= 8, "every kind of fault was injected: {:?}", stats.faults);
    assert!(ok_after * 100 >= FETCHES * 95, "{ok_after}/{FETCHES} fetches succeeded");
}
