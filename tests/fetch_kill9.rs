//! The reliability suite, part 2: `kill -9` at random points of 20 slow fetches (the
//! khub binary, through a proxy that throttles every answer), each into a fresh store.
//! After each kill, every blob re-hashes to its name, no partial file sits outside `tmp/`,
//! and the next fetch and an offline load succeed.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

mod common;
#[path = "common/fault_proxy.rs"]
mod fault_proxy;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fault_proxy::{FaultProxy, ProxyOptions, Rng, check_store, test_release};
use khub::serve::{ServeOptions, Server};

const KILLS: usize = 20;

fn khub<S: AsRef<std::ffi::OsStr>>(args: &[S], cache: &Path, work: &Path, trust: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_khub"));
    cmd.args(args).arg("--cache").arg(cache);
    for var in khub::env::ALL {
        cmd.env_remove(var);
    }
    // KHUB_CACHE too: the CLI wants a default cache directory even when --cache names one.
    cmd.env("KHUB_CACHE", cache)
        .env("KHUB_CPU_LEVEL", "x86-64-v3")
        .env("KHUB_CUDA_DRIVER", "none")
        .env("KHUB_AMD_GPU_ARCH", "none")
        .env("KHUB_STATE_DIR", work.join("state"))
        .env("KHUB_TRUST_POLICY", trust)
        .env("KHUB_HTTP_TIMEOUT", "5")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn run_ok(mut cmd: Command, what: &str) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kill_9_mid_fetch_leaves_a_store_that_verifies_and_recovers() {
    let started = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let release = test_release(w, &[300_000, 400_000, 500_000]);
    let server = Server::start(&release.root, "127.0.0.1:0", ServeOptions::default()).unwrap();
    // About 1.3 MB/s: the three data files take most of a second.
    let proxy = FaultProxy::start(
        server.addr(),
        ProxyOptions {
            fault_rate: 0.0,
            throttle: Some((16 * 1024, Duration::from_millis(12))),
            ..ProxyOptions::default()
        },
    );
    let fetch_args = |url: &str| -> Vec<String> {
        ["fetch", "acme/activation", "--version", "^0.1", "--registry", url]
            .map(str::to_owned)
            .to_vec()
    };

    // One whole slow fetch: how long the window for a kill is.
    let calib = w.join("cache-calibration");
    let t0 = Instant::now();
    let slow_args = fetch_args(&proxy.url());
    run_ok(khub(&slow_args, &calib, w, &release.trust_file), "a slow fetch");
    let window = t0.elapsed();
    println!("a whole slow fetch takes {window:?}");

    let fast_args = fetch_args(&server.url());
    let mut rng = Rng::new(9);
    let mut killed_running = 0;
    let mut temps_left = 0;
    for i in 0..KILLS {
        let cache = w.join(format!("cache-{i}"));
        let mut child = khub(&slow_args, &cache, w, &release.trust_file).spawn().unwrap();
        let at = Duration::from_micros(rng.below(window.as_micros() as u64 + 1));
        std::thread::sleep(at);
        if child.try_wait().unwrap().is_none() {
            killed_running += 1;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let c = check_store(&cache, &release.known);
        assert!(c.problems.is_empty(), "kill {i} at {at:?}: {:#?}", c.problems);
        temps_left += c.temps;
        println!(
            "kill {i} at {:>4} ms: {} blobs stored, {} temp files",
            at.as_millis(),
            c.clean.len(),
            c.temps
        );

        run_ok(
            khub(&fast_args, &cache, w, &release.trust_file),
            &format!("kill {i}: the next fetch"),
        );
        run_ok(
            khub(
                &[
                    "load",
                    "acme/activation",
                    "--version",
                    "^0.1",
                    "--offline",
                    "--registry",
                    &server.url(),
                ],
                &cache,
                w,
                &release.trust_file,
            ),
            &format!("kill {i}: the offline load"),
        );
        let c = check_store(&cache, &release.known);
        assert!(c.problems.is_empty(), "kill {i}, after the next fetch: {:#?}", c.problems);
        for d in &release.wanted {
            assert!(c.clean.contains(d), "kill {i}: after the next fetch, {d} is missing");
        }
        assert_eq!(c.temps, 0, "kill {i}: the next fetch removed the dead writer's temp files");
    }
    println!(
        "{KILLS} kills ({killed_running} while running), {temps_left} temp files left by them, in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(killed_running >= KILLS / 2, "most kills hit a running fetch");
    assert!(started.elapsed() < Duration::from_secs(60), "{:?}", started.elapsed());
}
