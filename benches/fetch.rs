//! Cold fetch: khub's `Hub::fetch` against `huggingface_hub.snapshot_download` and `curl`,
//! from `khub serve` on 127.0.0.1, in one run.
//!
//! The registry holds one release, `acme/blobs` 1.0.0, with one CPU variant for this host
//! made of 3 files of random bytes (12, 5 and 3 MiB: 20 MiB, about 21 MB). Every
//! measurement starts from a FRESH, empty cache or output directory; the three clients
//! alternate (ABC, CBA, …) so drift in the machine's load hits them alike. Every
//! download is checked afterwards (sizes; khub checks digests itself).
//!
//! - **khub**: `Hub::new` (the HTTP client) + `Hub::fetch(repo, "^1", …)`: refs, the
//!   manifest (HEAD + GET) and a probe for its signature, then the variant's 3 files
//!   (HEAD + GET each) in parallel, each streamed through SHA-256 into the store, fsynced
//!   and renamed into place. Host facts are detected once, outside the timed region.
//! - **huggingface_hub**: `snapshot_download(repo, revision="v1.0.0",
//!   allow_patterns=[the 3 paths], cache_dir=fresh)` in a Python subprocess, with
//!   `HF_ENDPOINT` set to the server, `HF_HUB_DISABLE_TELEMETRY=1` and
//!   `HF_HUB_DISABLE_XET=1`. The download is timed inside Python with `time.perf_counter`
//!   around the call; the whole process (interpreter start, import, download) is timed from
//!   here. Python is `$PYTHON`, else `python3`; skipped when `huggingface_hub` does not
//!   import.
//! - **curl**: `curl -s -f --parallel -o f1 URL1 -o f2 URL2 -o f3 URL3` (plus
//!   `--no-progress-meter --noproxy '*'`) on the resolve URLs
//!   `/<org>/<name>/resolve/<commit>/<path>`, timed as a process. Skipped without curl.
//!
//! The server closes every connection after one response, so every request of every
//! client opens a new TCP connection.
//!
//! Two more arms, for the notes and not the goals, write to tmpfs (`/dev/shm`) instead of
//! the disk: khub's store there, and curl's output. They show what khub's durability
//! (`fsync` of each file and directory) costs on this disk.
//!
//! Run: `cargo bench --bench fetch` (option: `--reps N`, default 7). Results:
//! `docs/performance.md`.
//!
//! `cargo bench` passes `--bench`; without it (as under `cargo test --benches`) this is a
//! short smoke run with few repetitions, whose numbers mean little.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use khub::host::Environment;
use khub::hub::{Hub, HubOptions, Quiet, RegistrySpec};
use khub::registry::RepoId;
use khub::serve::{ServeOptions, Server};

const REPO: &str = "acme/blobs";
const FILES: [(&str, usize); 3] = [
    ("variants/cpu/libblobs.so", 12 << 20),
    ("variants/cpu/weights.bin", 5 << 20),
    ("variants/cpu/tables.bin", 3 << 20),
];

const PY: &str = r#"
import json, sys, time
t0 = time.perf_counter()
from huggingface_hub import snapshot_download
t1 = time.perf_counter()
repo, revision, cache = sys.argv[1], sys.argv[2], sys.argv[3]
path = snapshot_download(repo, revision=revision, allow_patterns=sys.argv[4:], cache_dir=cache)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "download_s": t2 - t1, "path": path}))
"#;

fn reps() -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(if smoke() { 1 } else { 7 })
        .max(1)
}

/// Without `--bench` (`cargo test --benches`): a short smoke run.
fn smoke() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

/// Pseudo-random bytes (xorshift64*), so nothing downstream can compress or dedupe them.
fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        out.extend_from_slice(&s.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(n);
    out
}

/// Writes the release; returns the commit id the server derives for it.
fn write_registry(root: &Path) -> String {
    let dir = root.join(REPO).join("1.0.0");
    let mut files = Vec::new();
    for (i, (path, size)) in FILES.iter().enumerate() {
        let bytes = random_bytes(*size, 0x9E37_79B9_7F4A_7C15 ^ i as u64);
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().expect("a parent")).expect("create the variant directory");
        std::fs::write(&p, &bytes).expect("write a file");
        files.push(format!(
            "{{ path = \"{path}\", size = {size}, sha256 = \"{}\" }}",
            khub::verify::sha256(&bytes)
        ));
    }
    let arch = std::env::consts::ARCH;
    let manifest = format!(
        "schema = \"1.0\"\n[kernel]\nname = \"blobs\"\nversion = \"1.0.0\"\nabi = 1\n\n[[variants]]\nid = \"cpu-{arch}-linux\"\n\
         backend = \"cpu\"\nos = \"linux\"\narch = \"{arch}\"\nlibc = \"glibc 2.17\"\nlibrary = \"{}\"\nfiles = [\n  {}\n]\n",
        FILES[0].0,
        files.join(",\n  ")
    );
    khub::Manifest::from_toml_str(&manifest).expect("the manifest is valid");
    std::fs::write(dir.join("khub.toml"), &manifest).expect("write khub.toml");
    khub::registry::dir::commit_id(manifest.as_bytes())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn spread(v: &[f64]) -> String {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    format!("{:.1}–{:.1}", s[0] * 1e3, s[s.len() - 1] * 1e3)
}

/// Every file under `dir` (following no links) with its size, by path relative to `dir`.
fn sizes_under(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let meta = std::fs::metadata(&p).expect("stat");
            if meta.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap_or(&p).to_string_lossy().into_owned();
                out.push((rel, meta.len()));
            }
        }
    }
    out
}

fn main() {
    let bench_started = Instant::now();
    let reps = reps();
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "smoke run (no --bench, as under `cargo test --benches`): few repetitions, debug builds; the numbers are not measurements"
        );
    }
    let work = tempfile::tempdir().expect("a temporary directory");
    let root = work.path().join("registry");
    let commit = write_registry(&root);
    // SAFETY: sync(2) takes no arguments; flush the new files before measuring.
    unsafe { libc::sync() };
    let server = Server::start(&root, "127.0.0.1:0", ServeOptions::default()).expect("start khub serve");
    let url = server.url();
    let repo: RepoId = REPO.parse().expect("a repository id");
    let total: usize = FILES.iter().map(|f| f.1).sum();
    println!(
        "server {url}; release {REPO} 1.0.0 (commit {commit}), 3 files, {total} bytes ({:.1} MiB); {reps} repetitions, fresh cache each",
        total as f64 / (1 << 20) as f64
    );

    // khub: options (and host facts) once.
    let template = {
        let env = Environment::from_pairs([("KHUB_CACHE", work.path().join("unused").to_str().expect("a UTF-8 path"))]);
        let mut o = HubOptions::from_env(env).expect("hub options");
        o.registry = RegistrySpec::Url(url.clone());
        o.offline = false;
        o
    };

    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let have_python = Command::new(&python)
        .args(["-c", "import huggingface_hub"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_python {
        println!("skipped huggingface_hub: `{python} -c 'import huggingface_hub'` failed (pip install huggingface_hub)");
    }
    let have_curl = Command::new("curl").arg("--version").output().is_ok_and(|o| o.status.success());
    if !have_curl {
        println!("skipped curl: no `curl` on PATH");
    }
    let script = work.path().join("snapshot.py");
    std::fs::write(&script, PY).expect("write the Python script");
    let hf_home = work.path().join("hf-home");

    // Informational arms: khub and curl writing to tmpfs, where fsync costs nothing.
    let shm = tempfile::tempdir_in("/dev/shm").ok();
    if shm.is_none() {
        println!("no writable /dev/shm: the tmpfs arms are skipped");
    }

    let mut khub_total = Vec::new();
    let mut khub_fetch = Vec::new();
    let mut khub_shm = Vec::new();
    let mut curl_shm = Vec::new();
    let mut py_download = Vec::new();
    let mut py_process = Vec::new();
    let mut py_import = Vec::new();
    let mut curl_s = Vec::new();
    let mut n = 0;
    for r in 0..reps {
        let mut order = [0, 1, 2, 3, 4];
        if r % 2 == 1 {
            order.reverse();
        }
        for which in order {
            n += 1;
            let base = match (which, &shm) {
                (0..=2, _) => work.path(),
                (_, Some(d)) => d.path(),
                (_, None) => continue,
            };
            let fresh = base.join(format!("run-{n}"));
            std::fs::create_dir_all(&fresh).expect("a fresh directory");
            match which {
                0 | 3 => {
                    let mut o = template.clone();
                    o.cache = fresh.clone();
                    let t = Instant::now();
                    let hub = Hub::new(o).expect("a hub");
                    let t_fetch = Instant::now();
                    let report = hub.fetch(&repo, "^1", false, &Quiet).expect("khub fetch");
                    let fetch = t_fetch.elapsed().as_secs_f64();
                    let all = t.elapsed().as_secs_f64();
                    assert_eq!(report.downloaded, 3, "{report:?}");
                    assert_eq!(report.downloaded_bytes, total as u64);
                    if which == 0 {
                        khub_total.push(all);
                        khub_fetch.push(fetch);
                    } else {
                        khub_shm.push(all);
                    }
                }
                1 if have_python => {
                    let mut cmd = Command::new(&python);
                    cmd.arg(&script).arg(REPO).arg("v1.0.0").arg(&fresh);
                    cmd.args(FILES.iter().map(|f| f.0));
                    for var in [
                        "HF_TOKEN",
                        "HUGGING_FACE_HUB_TOKEN",
                        "HF_TOKEN_PATH",
                        "HF_HUB_OFFLINE",
                        "HF_HUB_CACHE",
                        "HUGGINGFACE_HUB_CACHE",
                        "HF_XET_CACHE",
                    ] {
                        cmd.env_remove(var);
                    }
                    cmd.env("HF_ENDPOINT", &url)
                        .env("HF_HOME", &hf_home)
                        .env("HF_HUB_DISABLE_TELEMETRY", "1")
                        .env("HF_HUB_DISABLE_XET", "1")
                        .env("HF_HUB_ENABLE_HF_TRANSFER", "0")
                        .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
                        .env("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
                        .env("NO_PROXY", "127.0.0.1,localhost")
                        .env("no_proxy", "127.0.0.1,localhost")
                        .stdin(Stdio::null());
                    let t = Instant::now();
                    let out = cmd.output().expect("run python");
                    let all = t.elapsed().as_secs_f64();
                    assert!(
                        out.status.success(),
                        "snapshot_download failed:\n{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    let doc: serde_json::Value =
                        serde_json::from_slice(out.stdout.split(|&b| b == b'\n').rfind(|l| !l.is_empty()).unwrap_or_default())
                            .expect("the script prints JSON");
                    let snap = PathBuf::from(doc["path"].as_str().expect("a snapshot path"));
                    for (path, size) in FILES {
                        assert_eq!(std::fs::metadata(snap.join(path)).expect("downloaded").len(), size as u64);
                    }
                    py_download.push(doc["download_s"].as_f64().expect("seconds"));
                    py_import.push(doc["import_s"].as_f64().expect("seconds"));
                    py_process.push(all);
                }
                2 | 4 if have_curl => {
                    let mut cmd = Command::new("curl");
                    cmd.args(["-s", "-f", "--no-progress-meter", "--parallel", "--noproxy", "*"])
                        .current_dir(&fresh)
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null());
                    for (i, (path, _)) in FILES.iter().enumerate() {
                        cmd.arg("-o")
                            .arg(format!("f{i}"))
                            .arg(format!("{url}/{REPO}/resolve/{commit}/{path}"));
                    }
                    let t = Instant::now();
                    let status = cmd.status().expect("run curl");
                    let all = t.elapsed().as_secs_f64();
                    assert!(status.success(), "curl failed: {status}");
                    let got = sizes_under(&fresh);
                    for (i, (_, size)) in FILES.iter().enumerate() {
                        assert!(got.contains(&(format!("f{i}"), *size as u64)), "{got:?}");
                    }
                    if which == 2 {
                        curl_s.push(all);
                    } else {
                        curl_shm.push(all);
                    }
                }
                _ => {}
            }
            std::fs::remove_dir_all(&fresh).expect("remove the fresh directory");
        }
    }

    let row = |name: &str, v: &[f64]| {
        if v.is_empty() {
            println!("{name:<58} {:>10} {:>14}", "skipped", "-");
        } else {
            let m = median(v);
            println!("{name:<58} {:>10.1} {:>14} {:>9.0}", m * 1e3, spread(v), total as f64 / m / 1e6);
        }
    };
    println!(
        "\n{:<58} {:>10} {:>14} {:>9}",
        "client (fresh cache each time)", "median ms", "min–max ms", "MB/s"
    );
    row("khub: Hub::new + Hub::fetch", &khub_total);
    row("khub: Hub::fetch alone", &khub_fetch);
    let hub_new: Vec<f64> = khub_total.iter().zip(&khub_fetch).map(|(a, f)| a - f).collect();
    if !hub_new.is_empty() {
        println!(
            "{:<58} {:>10.1} {:>14}",
            "khub: Hub::new alone (store, HTTP client)",
            median(&hub_new) * 1e3,
            spread(&hub_new)
        );
    }
    row("huggingface_hub: snapshot_download (in Python)", &py_download);
    row("huggingface_hub: whole python process", &py_process);
    row("curl --parallel (whole process)", &curl_s);
    println!("informational, writing to tmpfs (/dev/shm), where fsync is free:");
    row("khub: Hub::new + Hub::fetch, store on tmpfs", &khub_shm);
    row("curl --parallel, output on tmpfs", &curl_shm);
    if !py_import.is_empty() {
        println!(
            "(python: `from huggingface_hub import snapshot_download` took {:.1} ms, median)",
            median(&py_import) * 1e3
        );
    }
    let k = median(&khub_total);
    if !py_download.is_empty() {
        let (d, p) = (median(&py_download), median(&py_process));
        println!(
            "huggingface_hub / khub: {:.2}x (download in Python), {:.2}x (whole process); goal >= 2x: {}",
            d / k,
            p / k,
            if d / k >= 2.0 { "met" } else { "NOT met" }
        );
    }
    if !curl_s.is_empty() {
        let c = median(&curl_s);
        println!(
            "khub / curl time: {:.2} (khub at {:.0}% of curl's speed); goal <= 1.25: {}",
            k / c,
            c / k * 100.0,
            if k / c <= 1.25 { "met" } else { "NOT met" }
        );
    }
    if !khub_shm.is_empty() && !curl_shm.is_empty() {
        println!("on tmpfs: khub / curl time {:.2}", median(&khub_shm) / median(&curl_shm));
    }
    let requests = server.requests();
    println!("server answered {} requests in all", requests.len());
    server.stop();
    println!("(this bench ran for {:.1} s)", bench_started.elapsed().as_secs_f64());
}
