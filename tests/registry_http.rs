//! The Hub client (hf-hub) against `khub serve` on 127.0.0.1: request counts from the
//! server's log, loads through HTTP, concurrent processes into one empty store, offline
//! mode with a connection counter, 429 + Retry-After and timeouts against raw sockets.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

mod common;

use common::copy_dir;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use khub::host::{Environment, HostFacts, ProbeOptions};
use khub::hub::{Hub, HubOptions, Quiet, RegistrySpec};
use khub::registry::{Registry, RepoId};
use khub::serve::{ServeOptions, Server};

/// A registry with `acme/activation` (kernels-example, 3 CPU variants) and `acme/wide`
/// (the same release plus 60 aarch64 variants that never fit this host).
fn registry() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(common::example_release(), &dir.path().join("acme/activation/0.1.0"));
    let wide = dir.path().join("acme/wide/0.1.0");
    copy_dir(common::example_release(), &wide);
    let mut m = khub::Manifest::from_bytes(&std::fs::read(wide.join("khub.toml")).unwrap()).unwrap();
    let template = m.variants[0].clone();
    for i in 0..60 {
        let mut v = template.clone();
        v.id = format!("cpu-aarch64-{i}");
        v.arch = khub::platform::CpuArch::Aarch64;
        v.cpu_level = None;
        m.variants.push(v);
    }
    std::fs::write(wide.join("khub.toml"), m.to_toml_string().unwrap()).unwrap();
    let root = dir.path().to_owned();
    (dir, root)
}

fn hub_for(url: &str, cache: &Path, env: &[(&str, &str)]) -> Hub {
    let env = Environment::from_pairs(env.iter().copied());
    let host = HostFacts::detect(&ProbeOptions::with_env(env.clone()).unwrap()).unwrap().facts;
    Hub::new(HubOptions {
        env,
        registry: RegistrySpec::Url(url.to_owned()),
        cache: cache.to_owned(),
        offline: false,
        host,
        preferences: Default::default(),
        jobs: 4,
        trust: khub::verify::trust::TrustPolicy::permissive(),
        state_dir: None,
    })
    .unwrap()
}

/// Requests the server answered since `from`, as "METHOD path" lines.
fn log_since(server: &Server, from: usize) -> Vec<String> {
    server.requests()[from..]
        .iter()
        .map(|r| format!("{} {} {}", r.method, r.path, r.status))
        .collect()
}

#[test]
fn request_count_does_not_depend_on_the_number_of_variants() {
    let (_d, root) = registry();
    let server = Server::start(&root, "127.0.0.1:0", ServeOptions::default()).unwrap();
    let mut counts = Vec::new();
    for repo in ["acme/activation", "acme/wide"] {
        let cache = tempfile::tempdir().unwrap();
        let hub = hub_for(&server.url(), cache.path(), &[("KHUB_CPU_LEVEL", "x86-64-v3")]);
        let before = server.requests().len();
        let report = hub.fetch(&repo.parse().unwrap(), "^0.1", false, &Quiet).unwrap();
        assert_eq!(report.downloaded, 1);
        let log = log_since(&server, before);
        // 1 refs + manifest (GET) + signature (GET: 404, unsigned) + the one library (GET).
        assert_eq!(log.len(), 4, "{repo}: {log:#?}");
        assert_eq!(log.iter().filter(|l| l.contains("/refs")).count(), 1, "{log:#?}");
        assert_eq!(log.iter().filter(|l| l.ends_with(" 200")).count(), 3, "{log:#?}");
        assert!(
            log.iter()
                .any(|l| l.starts_with("GET ") && l.contains("khub.toml.minisig") && l.ends_with(" 404")),
            "{log:#?}"
        );
        counts.push(log.len());
        // A second fetch: refs, then the manifest and the signature (404) again, since
        // online the registry decides what the release holds, never the store; the file
        // is in the store (re-hashed) and not downloaded.
        let before = server.requests().len();
        hub.fetch(&repo.parse().unwrap(), "^0.1", false, &Quiet).unwrap();
        let log = log_since(&server, before);
        assert_eq!(log.len(), 3, "{log:#?}");
        assert!(!log.iter().any(|l| l.contains("libactivation.so")), "{log:#?}");
    }
    assert_eq!(counts[0], counts[1], "3 variants and 63 variants cost the same requests");
}

#[test]
fn load_through_http_and_the_cli() {
    let (_d, root) = registry();
    let server = Server::start(&root, "127.0.0.1:0", ServeOptions::default()).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let hub = hub_for(&server.url(), cache.path(), &[("KHUB_CPU_LEVEL", "x86-64-v1")]);
    let k = hub.load("acme/activation", "^0.1").unwrap();
    assert_eq!(k.variant(), "cpu-x86_64-v1-linux");
    assert!(k.selftest("silu_and_mul", 3, 4096).unwrap().passed);

    let cache2 = tempfile::tempdir().unwrap();
    let c = cache2.path().to_str().unwrap();
    let out = common::khub(
        &[
            "fetch",
            "acme/activation",
            "--version",
            "^0.1",
            "--registry",
            &server.url(),
            "--json",
        ],
        &[("KHUB_CACHE", c)],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["downloaded"], 1);
    let out = common::khub(
        &[
            "load",
            "acme/activation",
            "--version",
            "^0.1",
            "--registry",
            &server.url(),
            "--json",
        ],
        &[("KHUB_CACHE", c)],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["kernel"], "activation");
    let out = common::khub(&["load", "acme/nothing", "--registry", &server.url()], &[("KHUB_CACHE", c)]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("repository acme/nothing not found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn concurrent_processes_share_one_download() {
    let (_d, root) = registry();
    let server = Server::start(&root, "127.0.0.1:0", ServeOptions::default()).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let c = cache.path().to_str().unwrap().to_owned();
    let before = server.requests().len();
    let children: Vec<_> = (0..4)
        .map(|_| {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_khub"));
            cmd.args(["load", "acme/activation", "--version", "^0.1", "--registry", &server.url()]);
            for var in khub::env::ALL {
                cmd.env_remove(var);
            }
            cmd.env("KHUB_CACHE", &c).env("KHUB_CPU_LEVEL", "x86-64-v1");
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let log = log_since(&server, before);
    let lib_gets = log
        .iter()
        .filter(|l| l.starts_with("GET ") && l.contains("libactivation.so"))
        .count();
    assert_eq!(lib_gets, 1, "the library is downloaded once: {log:#?}");
}

/// A `Progress` callback that panics on a download worker: the panic reaches the caller
/// of `fetch` (it used to be swallowed with that worker's files, and the fetch reported
/// success for a release it had not stored), and the release is not recorded as known.
#[test]
fn a_panicking_progress_callback_is_not_a_successful_fetch() {
    struct PanicOnSecond(std::sync::atomic::AtomicUsize);
    impl khub::hub::Progress for PanicOnSecond {
        fn start(&self, file: &str, _size: u64) {
            if self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                panic!("progress callback fails on {file}");
            }
        }
    }
    let (_d, root) = registry();
    let server = Server::start(&root, "127.0.0.1:0", ServeOptions::default()).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let hub = hub_for(&server.url(), cache.path(), &[("KHUB_CPU_LEVEL", "x86-64-v1")]);
    let repo: RepoId = "acme/activation".parse().unwrap();
    let progress = PanicOnSecond(Default::default());
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        hub.fetch(&repo, "^0.1", true, &progress).map_err(Box::new)
    }));
    let payload = outcome.expect_err("the worker's panic reaches the caller");
    let message = payload.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("progress callback fails on"), "{message}");
    assert!(progress.0.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    assert!(hub.store().index_entries().is_empty(), "a fetch that panicked recorded the release");
}

#[test]
fn offline_makes_no_connection() {
    let (_d, root) = registry();
    let server = Server::start(&root, "127.0.0.1:0", ServeOptions::default()).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let c = cache.path().to_str().unwrap().to_owned();
    let app_dir = tempfile::tempdir().unwrap();
    let app = app_dir.path().join("kernels.toml");
    std::fs::write(
        &app,
        format!(
            "[registry]\nurl = \"{}\"\n\n[kernels]\n\"acme/activation\" = \"^0.1\"\n",
            server.url()
        ),
    )
    .unwrap();
    let lock = app_dir.path().join("khub.lock");
    let env = [("KHUB_CACHE", c.as_str()), ("KHUB_CPU_LEVEL", "x86-64-v3")];
    let out = common::khub(&["lock", "--app", app.to_str().unwrap(), "--out", lock.to_str().unwrap()], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let seen = server.connections();
    for args in [
        vec![
            "load",
            "acme/activation",
            "--locked",
            "--lock",
            lock.to_str().unwrap(),
            "--registry",
            &server.url(),
        ],
        vec![
            "load",
            "acme/activation",
            "--version",
            "^0.1",
            "--offline",
            "--registry",
            &server.url(),
        ],
    ] {
        let out = common::khub(&args, &env);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = common::khub(
        &["load", "acme/activation", "--version", "^0.1", "--registry", &server.url()],
        &[("KHUB_CACHE", c.as_str()), ("KHUB_OFFLINE", "1"), ("KHUB_CPU_LEVEL", "x86-64-v3")],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = common::khub(
        &["load", "acme/activation", "--version", "^0.1", "--registry", &server.url()],
        &[("KHUB_CACHE", c.as_str()), ("HF_HUB_OFFLINE", "1"), ("KHUB_CPU_LEVEL", "x86-64-v3")],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(server.connections(), seen, "offline and locked loads opened no connection");

    // With the server gone, locked and offline loads still work; an online load fails.
    let url = server.url();
    server.stop();
    let out = common::khub(&["load", "acme/activation", "--locked", "--lock", lock.to_str().unwrap()], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = common::khub(
        &["load", "acme/activation", "--version", "^0.1", "--registry", &url],
        &[("KHUB_CACHE", c.as_str()), ("KHUB_HTTP_RETRIES", "0")],
    );
    assert!(!out.status.success());
    // An offline miss names the file and the command.
    let empty = tempfile::tempdir().unwrap();
    let out = common::khub(
        &["load", "acme/activation", "--locked", "--lock", lock.to_str().unwrap()],
        &[("KHUB_CACHE", empty.path().to_str().unwrap())],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not in the store") && err.contains("khub fetch acme/activation"),
        "{err}"
    );
}

/// A one-route HTTP server on a raw socket: answers each connection with the next canned
/// response, counting requests.
fn canned(responses: Vec<String>, delay_first: Option<Duration>) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for (i, stream) in listener.incoming().enumerate() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if i == 0
                && let Some(d) = delay_first
            {
                std::thread::sleep(d);
            }
            let r = responses.get(i).or(responses.last()).cloned().unwrap_or_default();
            let _ = s.write_all(r.as_bytes());
        }
    });
    (url, count)
}

fn http(status: &str, headers: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/json\r\nConnection: close\r\n{headers}\r\n{body}",
        body.len()
    )
}

#[test]
fn rate_limits_honour_retry_after() {
    let refs = r#"{"branches":[],"tags":[{"name":"v1.0.0","ref":"refs/tags/v1.0.0","targetCommit":"0123456789012345678901234567890123456789"}],"converts":[]}"#;
    let (url, count) = canned(
        vec![http("429 Too Many Requests", "Retry-After: 1\r\n", "{}"), http("200 OK", "", refs)],
        None,
    );
    let reg = khub::registry::hf::HubRegistry::new(khub::registry::hf::HubConfig::new(&url)).unwrap();
    let started = Instant::now();
    let r = reg.refs(&"acme/k".parse::<RepoId>().unwrap()).unwrap();
    assert_eq!(r.tags[0].name, "v1.0.0");
    assert!(started.elapsed() >= Duration::from_millis(950), "waited {:?}", started.elapsed());
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 2);

    // Out of attempts: the error says so and when to retry.
    let (url, _) = canned(vec![http("429 Too Many Requests", "Retry-After: 1\r\n", "{}")], None);
    let mut config = khub::registry::hf::HubConfig::new(&url);
    config.attempts = 1;
    let e = khub::registry::hf::HubRegistry::new(config)
        .unwrap()
        .refs(&"acme/k".parse().unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("rate-limiting") && e.contains("retry after 1 s"), "{e}");
}

#[test]
fn a_silent_server_times_out() {
    let (url, _) = canned(vec![http("200 OK", "", "{}")], Some(Duration::from_secs(30)));
    let mut config = khub::registry::hf::HubConfig::new(&url);
    config.read_timeout = Duration::from_millis(500);
    config.attempts = 1;
    let started = Instant::now();
    let e = khub::registry::hf::HubRegistry::new(config)
        .unwrap()
        .refs(&"acme/k".parse().unwrap())
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert!(e.to_string().contains(&url), "{e}");
}

/// A registry whose refs name something other than a full commit id (a branch name, `..`)
/// is refused with that said: such a ref can move, would be sent as a URL path segment,
/// and made `khub lock` write a lockfile it could not read back.
#[test]
fn refs_must_name_full_commit_ids() {
    for commit in ["main", "..", "0123456", &"a".repeat(41)] {
        let refs =
            format!(r#"{{"branches":[],"tags":[{{"name":"v1.0.0","ref":"refs/tags/v1.0.0","targetCommit":"{commit}"}}],"converts":[]}}"#);
        let (url, _) = canned(vec![http("200 OK", "", &refs)], None);
        let reg = khub::registry::hf::HubRegistry::new(khub::registry::hf::HubConfig::new(&url)).unwrap();
        let e = reg.refs(&"acme/k".parse::<RepoId>().unwrap()).unwrap_err().to_string();
        assert!(
            e.contains("full commit id (40 hex digits)") && e.contains("v1.0.0"),
            "{commit}: {e}"
        );
    }
}

/// A file download that breaks mid-body, then meets answers a flaky network or a
/// hostile server gives, and finishes from a third, good answer.
fn resumed_download(second: String, third: String) -> Result<Vec<u8>, String> {
    let first = "HTTP/1.1 200 OK\r\nContent-Length: 10\r\nETag: \"abc\"\r\nConnection: close\r\n\r\n12345".to_owned();
    let (url, _) = canned(vec![first, second, third], None);
    let mut config = khub::registry::hf::HubConfig::new(&url);
    config.backoff = Duration::from_millis(1);
    let reg = khub::registry::hf::HubRegistry::new(config).unwrap();
    let mut sink = Vec::new();
    let path = khub::manifest::RelPath::new("lib/libk.so").unwrap();
    reg.fetch(&"acme/k".parse().unwrap(), &"0".repeat(40), &path, 1 << 20, &mut sink)
        .map(|_| sink)
        .map_err(|e| e.to_string())
}

/// A proxy's 503 page with an ETag of its own, between two parts of a download, is a
/// reason to retry, not "the file changed on the server" (it ended the download).
#[test]
fn an_error_page_with_its_own_etag_is_retried() {
    let unavailable = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nETag: \"proxy-page\"\r\nConnection: close\r\n\r\nbusy";
    let rest = "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 5-9/10\r\nContent-Length: 5\r\nETag: \"abc\"\r\nConnection: close\r\n\r\n67890";
    assert_eq!(resumed_download(unavailable.into(), rest.into()).unwrap(), b"1234567890");
}

/// `Content-Range: bytes 5-18446744073709551615/*` (an end with no successor) panicked
/// while computing the end (debug builds) or wrapped to 0 and moved the download
/// backwards (release). It is a bad range now: the download starts over without one.
#[test]
fn a_content_range_ending_at_u64_max_is_refused() {
    let hostile = "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 5-18446744073709551615/*\r\nContent-Length: 5\r\nETag: \"abc\"\r\nConnection: close\r\n\r\n67890";
    let whole = "HTTP/1.1 200 OK\r\nContent-Length: 10\r\nETag: \"abc\"\r\nConnection: close\r\n\r\n1234567890";
    assert_eq!(resumed_download(hostile.into(), whole.into()).unwrap(), b"1234567890");
}

/// A registry that answers the refs request with an endless body is cut off at the refs
/// limit with an error that says so (the refs were read through hf-hub, which reads a
/// body of any length into memory).
#[test]
fn an_endless_refs_answer_is_cut_off() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{\"tags\":[");
            let chunk = r#"{"name":"v1.0.0","targetCommit":"0123456789012345678901234567890123456789"},"#.repeat(1000);
            while s.write_all(chunk.as_bytes()).is_ok() {}
        }
    });
    let reg = khub::registry::hf::HubRegistry::new(khub::registry::hf::HubConfig::new(&url)).unwrap();
    let e = reg.refs(&"acme/k".parse::<RepoId>().unwrap()).unwrap_err();
    assert!(matches!(e, khub::registry::RegistryError::TooLarge { .. }), "{e}");
    assert!(e.to_string().contains("the refs of acme/k"), "{e}");
}
