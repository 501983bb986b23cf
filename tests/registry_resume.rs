//! Downloads that finish: the Hub client against a scripted HTTP server on a raw socket.
//! A body cut by a reset, a stall or a short `Content-Length` resumes with `Range`; a
//! server that ignores `Range` is read from the start; a body longer than declared is never
//! accepted; a manifest that does not match its `ETag` is downloaded again, then refused.
#![allow(clippy::disallowed_methods)] // test code

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use khub::manifest::RelPath;
use khub::registry::hf::{HubConfig, HubRegistry};
use khub::registry::{Registry, RegistryError, RepoId};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// What the server does with one connection.
enum Reply {
    /// Writes these bytes, then closes.
    Send(Vec<u8>),
    /// Writes these bytes, then resets the connection.
    Reset(Vec<u8>),
    /// Writes these bytes, waits, then closes.
    Stall(Vec<u8>, Duration),
}

/// A server answering connection `i` (request head `head`) with `script(i, head)`; returns
/// its URL and the request heads seen.
fn scripted(script: impl Fn(usize, &str) -> Reply + Send + 'static) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for (i, conn) in listener.incoming().enumerate() {
            let Ok(mut c) = conn else { continue };
            let head = read_head(&mut c);
            s2.lock().unwrap().push(head.clone());
            match script(i, &head) {
                Reply::Send(b) => {
                    let _ = c.write_all(&b);
                }
                Reply::Reset(b) => {
                    let _ = c.write_all(&b);
                    let _ = c.flush();
                    reset(c);
                }
                Reply::Stall(b, d) => {
                    let _ = c.write_all(&b);
                    std::thread::spawn(move || {
                        std::thread::sleep(d);
                        drop(c);
                    });
                }
            }
        }
    });
    (url, seen)
}

fn read_head(c: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match c.read(&mut b) {
            Ok(1) => buf.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn reset(s: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: `s` owns a valid socket for the duration of the call; `linger` is an
    // initialized `struct linger` and its size is passed with it.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn range_of(head: &str) -> Option<u64> {
    head.lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("range: bytes=").map(str::to_owned))
        .and_then(|r| r.trim().trim_end_matches('-').parse().ok())
}

fn answer(status: &str, headers: &[String], body: &[u8]) -> Vec<u8> {
    let mut h = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for l in headers {
        h.push_str(l);
        h.push_str("\r\n");
    }
    h.push_str("\r\n");
    let mut out = h.into_bytes();
    out.extend_from_slice(body);
    out
}

fn file(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

fn etag(bytes: &[u8]) -> String {
    format!("ETag: \"{}\"", khub::verify::sha256(bytes))
}

fn registry(url: &str) -> HubRegistry {
    let mut c = HubConfig::new(url);
    c.backoff = Duration::from_millis(10);
    c.read_timeout = Duration::from_millis(500);
    HubRegistry::new(c).unwrap()
}

fn repo() -> RepoId {
    "acme/k".parse().unwrap()
}

fn fetch(reg: &HubRegistry, path: &str, limit: u64) -> (Result<u64, RegistryError>, Vec<u8>) {
    let mut sink = Vec::new();
    let r = reg.fetch(&repo(), COMMIT, &RelPath::new(path).unwrap(), limit, &mut sink);
    (r, sink)
}

/// A 200 for the whole file (`X-Linked-Size`, `Content-Length`, the SHA-256 `ETag`), or a
/// 206 from the `Range` asked for.
fn honest(data: &[u8], head: &str) -> Vec<u8> {
    let n = data.len();
    match range_of(head) {
        Some(a) => answer(
            "206 Partial Content",
            &[
                format!("Content-Range: bytes {a}-{}/{n}", n - 1),
                format!("Content-Length: {}", n - a as usize),
                format!("X-Linked-Size: {n}"),
                etag(data),
            ],
            &data[a as usize..],
        ),
        None => answer(
            "200 OK",
            &[format!("Content-Length: {n}"), format!("X-Linked-Size: {n}"), etag(data)],
            data,
        ),
    }
}

#[test]
fn a_reset_mid_body_resumes_with_range() {
    let data = file(100_000);
    let d = data.clone();
    let (url, seen) = scripted(move |i, head| {
        let full = honest(&d, head);
        if i == 0 {
            Reply::Reset(full[..full.len() - 60_000].to_vec())
        } else {
            Reply::Send(full)
        }
    });
    let (r, sink) = fetch(&registry(&url), "variants/v/libk.so", 100_000);
    assert_eq!(r.unwrap(), 100_000);
    assert!(sink == data, "the resumed file is the file");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert!(seen[0].starts_with("GET /kernels/acme/k/resolve/0123456789abcdef0123456789abcdef01234567/variants/v/libk.so "));
    assert!(range_of(&seen[0]).is_none());
    // At most the 40000 bytes sent before the reset (a reset may drop unread ones).
    assert!(range_of(&seen[1]).is_some_and(|n| n <= 40_000), "{seen:#?}");
}

#[test]
fn a_server_that_ignores_range_is_read_from_the_start() {
    let data = file(50_000);
    let d = data.clone();
    let (url, seen) = scripted(move |i, _| {
        let full = honest(&d, "");
        if i == 0 {
            Reply::Reset(full[..full.len() - 20_000].to_vec())
        } else {
            Reply::Send(full)
        }
    });
    let (r, sink) = fetch(&registry(&url), "f.bin", 50_000);
    assert_eq!(r.unwrap(), 50_000);
    assert!(sink == data);
    assert!(range_of(&seen.lock().unwrap()[1]).is_some(), "the second attempt asked for a range");
}

#[test]
fn a_short_content_length_and_a_stall_are_resumed() {
    let data = file(80_000);
    let d = data.clone();
    let (url, seen) = scripted(move |i, head| match i {
        // Content-Length says 30000: a clean, short body.
        0 => Reply::Send(answer(
            "200 OK",
            &["Content-Length: 30000".into(), "X-Linked-Size: 80000".into(), etag(&d)],
            &d[..30_000],
        )),
        // Ten more bytes, then silence past the read timeout.
        1 => {
            let full = honest(&d, head);
            let head_len = full.len() - (80_000 - 30_000);
            Reply::Stall(full[..head_len + 10].to_vec(), Duration::from_secs(5))
        }
        _ => Reply::Send(honest(&d, head)),
    });
    let started = Instant::now();
    let (r, sink) = fetch(&registry(&url), "f.bin", 80_000);
    assert_eq!(r.unwrap(), 80_000);
    assert!(sink == data);
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen.iter().map(|h| range_of(h)).collect::<Vec<_>>(),
        [None, Some(30_000), Some(30_010)]
    );
}

#[test]
fn a_body_longer_than_declared_is_never_accepted() {
    let data = file(1_000);
    let mut long = data.clone();
    long.extend_from_slice(b"trailing garbage");
    let d = data.clone();
    // Always the long body, whatever the range asked for.
    let (url, seen) = scripted(move |_, _| {
        Reply::Send(answer(
            "200 OK",
            &[format!("Content-Length: {}", long.len()), "X-Linked-Size: 1000".into(), etag(&d)],
            &long,
        ))
    });
    let (r, sink) = fetch(&registry(&url), "f.bin", 1_000_000);
    let e = r.unwrap_err().to_string();
    assert!(e.contains("longer than") && e.contains("`f.bin`") && e.contains(&url), "{e}");
    // The first attempt wrote 1000 bytes (moved forward, not counted), then 4 more.
    assert!(e.contains("gave up after 5 attempts"), "{e}");
    assert!(sink == data, "nothing past the declared size reached the sink");
    assert_eq!(seen.lock().unwrap().len(), 5);

    // A server that honours ranges: the next attempt learns the file was complete.
    let d = data.clone();
    let (url, seen) = scripted(move |_, head| match range_of(head) {
        Some(_) => Reply::Send(answer(
            "416 Range Not Satisfiable",
            &["Content-Range: bytes */1000".into(), "Content-Length: 0".into()],
            b"",
        )),
        None => {
            let mut long = d.clone();
            long.extend_from_slice(b"trailing garbage");
            Reply::Send(answer(
                "200 OK",
                &[format!("Content-Length: {}", long.len()), "X-Linked-Size: 1000".into()],
                &long,
            ))
        }
    });
    let (r, sink) = fetch(&registry(&url), "f.bin", 1_000_000);
    assert_eq!(r.unwrap(), 1_000);
    assert!(sink == data);
    assert_eq!(seen.lock().unwrap().len(), 2);

    // Without X-Linked-Size, the limit (the manifest's size for a file) bounds the body.
    let (url, _) = scripted(move |_, _| {
        let long = file(1_100);
        Reply::Send(answer("200 OK", &[format!("Content-Length: {}", long.len())], &long))
    });
    let (r, sink) = fetch(&registry(&url), "f.bin", 1_000);
    assert!(matches!(r, Err(RegistryError::TooLarge { .. })), "{r:?}");
    assert!(sink.len() <= 1_000);
}

#[test]
fn a_manifest_that_does_not_match_its_etag_is_downloaded_again_then_refused() {
    let manifest = b"schema = \"1.0\"\n# a manifest\n".to_vec();
    let mut flipped = manifest.clone();
    flipped[3] ^= 0x20;
    let (m, f) = (manifest.clone(), flipped.clone());
    let (url, seen) = scripted(move |i, _| {
        let body = if i == 0 { &f } else { &m };
        Reply::Send(answer("200 OK", &[format!("Content-Length: {}", body.len()), etag(&m)], body))
    });
    let got = registry(&url).manifest(&repo(), COMMIT).unwrap();
    assert!(got == manifest, "the verified bytes are returned");
    assert_eq!(seen.lock().unwrap().len(), 2);

    let (m, f) = (manifest.clone(), flipped.clone());
    let (url, seen) = scripted(move |_, _| {
        Reply::Send(answer(
            "200 OK",
            &[
                format!("Content-Length: {}", f.len()),
                format!("X-Linked-Etag: \"{}\"", khub::verify::sha256(&m)),
            ],
            &f,
        ))
    });
    let e = registry(&url).manifest(&repo(), COMMIT).unwrap_err().to_string();
    assert!(
        e.contains("`khub.toml` of acme/k") && e.contains("corrupt") && e.contains(&url) && e.contains("gave up after 4 attempts"),
        "{e}"
    );
    assert_eq!(seen.lock().unwrap().len(), 4);

    // A git blob id (40 hex digits, the Hub's ETag for small files) is not checked.
    let m = manifest.clone();
    let (url, _) = scripted(move |_, _| {
        Reply::Send(answer(
            "200 OK",
            &[
                format!("Content-Length: {}", m.len()),
                "ETag: W/\"0123456789abcdef0123456789abcdef01234567\"".into(),
            ],
            &m,
        ))
    });
    assert!(registry(&url).manifest(&repo(), COMMIT).unwrap() == manifest);
}

#[test]
fn a_missing_signature_is_none_and_refusals_are_not_retried() {
    let (url, seen) = scripted(|_, _| {
        Reply::Send(answer(
            "404 Not Found",
            &["X-Error-Code: EntryNotFound".into(), "Content-Length: 2".into()],
            b"{}",
        ))
    });
    assert!(registry(&url).signature(&repo(), COMMIT).unwrap().is_none());
    assert_eq!(seen.lock().unwrap().len(), 1);

    let (url, seen) = scripted(|_, _| Reply::Send(answer("401 Unauthorized", &["Content-Length: 0".into()], b"")));
    let (r, _) = fetch(&registry(&url), "f.bin", 10);
    assert!(matches!(r, Err(RegistryError::Unauthorized { .. })), "{r:?}");
    assert_eq!(seen.lock().unwrap().len(), 1);

    // 500s are retried, and the last error says how many attempts were made.
    let (url, seen) = scripted(|_, _| Reply::Send(answer("500 Internal Server Error", &["Content-Length: 0".into()], b"")));
    let (r, _) = fetch(&registry(&url), "f.bin", 10);
    let e = r.unwrap_err().to_string();
    assert!(e.contains("500") && e.contains("gave up after 4 attempts"), "{e}");
    assert_eq!(seen.lock().unwrap().len(), 4);
}
