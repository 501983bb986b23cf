//! `khub serve` over a temporary directory registry, exercised with a raw HTTP/1.1 client
//! so that every status code and header is checked exactly as sent.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own
#![cfg(feature = "serve")]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use khub::serve::{ServeOptions, Server};
use serde_json::{Value, json};

const REPO: &str = "acme/k";

/// The text of a valid manifest for `version`, with variants `a` and `b` whose libraries
/// hold `libs`.
fn manifest(version: &str, libs: [&[u8]; 2]) -> String {
    let mut text = format!("schema = \"1.0\"\n[kernel]\nname = \"k\"\nversion = \"{version}\"\nabi = 1\n");
    for (id, arch, lib) in [("a", "x86_64", libs[0]), ("b", "aarch64", libs[1])] {
        text += &format!(
            "\n[[variants]]\nid = \"{id}\"\nbackend = \"cpu\"\nos = \"linux\"\narch = \"{arch}\"\nlibc = \"glibc 2.17\"\nlibrary = \"variants/{id}/libk.so\"\nfiles = [{{ path = \"variants/{id}/libk.so\", size = {}, sha256 = \"{}\" }}]\n",
            lib.len(),
            khub::verify::sha256(lib)
        );
    }
    text
}

fn lib_bytes(version: &str, id: &str) -> Vec<u8> {
    format!("library {id} of release {version}: not really a shared object\n").into_bytes()
}

/// Writes release `version` of `repo` under `root`; returns its manifest text.
fn release(root: &Path, repo: &str, version: &str) -> String {
    let dir = root.join(repo).join(version);
    let (a, b) = (lib_bytes(version, "a"), lib_bytes(version, "b"));
    for (id, lib) in [("a", &a), ("b", &b)] {
        std::fs::create_dir_all(dir.join("variants").join(id)).unwrap();
        std::fs::write(dir.join(format!("variants/{id}/libk.so")), lib).unwrap();
    }
    let text = manifest(version, [&a, &b]);
    std::fs::write(dir.join("khub.toml"), &text).unwrap();
    text
}

fn registry() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    release(d.path(), REPO, "1.0.0");
    release(d.path(), REPO, "1.2.0");
    d
}

fn start(root: &Path, read: Option<&str>, write: Option<&str>) -> Server {
    let options = ServeOptions {
        read_token: read.map(str::to_owned),
        write_token: write.map(str::to_owned),
        threads: 4,
        page_size: 2,
        ..ServeOptions::default()
    };
    Server::start(root, "127.0.0.1:0", options).unwrap()
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    fn error_code(&self) -> Option<&str> {
        self.header("X-Error-Code")
    }
}

/// Sends raw bytes and parses the answer (`Connection: close`, so the answer ends at EOF).
fn raw(addr: SocketAddr, bytes: &[u8], head: bool) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(&out)));
    let head_text = String::from_utf8(out[..split].to_vec()).unwrap();
    let mut lines = head_text.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    let body = out[split + 4..].to_vec();
    let resp = Resp { status, headers, body };
    if let Some(len) = resp.header("Content-Length") {
        let expected = if head { 0 } else { len.parse::<usize>().unwrap() };
        assert_eq!(resp.body.len(), expected, "body length against Content-Length");
    }
    resp
}

fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    if !body.is_empty() || method == "POST" {
        req += &format!("Content-Length: {}\r\n", body.len());
    }
    req += "\r\n";
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    raw(addr, &bytes, method == "HEAD")
}

fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, "GET", path, &[], b"")
}

fn commit_of(root: &Path, version: &str) -> String {
    khub::registry::dir::commit_id(&std::fs::read(root.join(REPO).join(version).join("khub.toml")).unwrap())
}

fn sha(bytes: &[u8]) -> String {
    khub::verify::sha256(bytes).to_string()
}

#[test]
fn repository_info_and_refs() {
    let reg = registry();
    let server = start(reg.path(), None, None);
    let addr = server.addr();
    let (c10, c12) = (commit_of(reg.path(), "1.0.0"), commit_of(reg.path(), "1.2.0"));

    let r = get(addr, "/api/models/acme/k");
    assert_eq!(r.status, 200);
    assert!(r.header("Content-Type").unwrap().starts_with("application/json"));
    let info = r.json();
    assert_eq!(info["id"], REPO);
    assert_eq!(info["modelId"], REPO);
    assert_eq!(info["sha"], c12.as_str(), "main is the highest release");
    assert_eq!(info["private"], false);
    assert_eq!(info["library_name"], "kernels");
    assert!(info["lastModified"].as_str().unwrap().ends_with('Z'));
    let siblings: Vec<&str> = info["siblings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["rfilename"].as_str().unwrap())
        .collect();
    assert_eq!(siblings, ["khub.toml", "variants/a/libk.so", "variants/b/libk.so"]);

    for (rev, commit) in [
        ("v1.0.0", &c10),
        ("v1", &c12),
        ("main", &c12),
        (c10.as_str(), &c10),
        ("refs%2Fheads%2Fmain", &c12),
        ("refs%2Ftags%2Fv1.0.0", &c10),
    ] {
        for p in ["models", "kernels"] {
            let r = get(addr, &format!("/api/{p}/acme/k/revision/{rev}"));
            assert_eq!(r.status, 200, "{p} {rev}");
            assert_eq!(r.json()["sha"], commit.as_str(), "{p} {rev}");
        }
    }
    let r = get(addr, "/api/models/acme/k/revision/v1.0.0?blobs=true");
    let sib = &r.json()["siblings"][1];
    let lib = lib_bytes("1.0.0", "a");
    assert_eq!(sib["size"], lib.len());
    assert_eq!(sib["lfs"]["sha256"], sha(&lib));

    let r = get(addr, "/api/models/acme/k/revision/v9.9.9");
    assert_eq!((r.status, r.error_code()), (404, Some("RevisionNotFound")));
    assert!(r.json()["error"].as_str().unwrap().contains("v9.9.9"));
    let r = get(addr, "/api/models/acme/k/revision/refs%2Fpr%2F1");
    assert_eq!((r.status, r.error_code()), (404, Some("RevisionNotFound")));
    for missing in [
        "/api/models/acme/nope",
        "/api/models/nope/k/refs",
        "/api/datasets/acme/k",
        "/api/spaces/acme/k/refs",
        "/api/models/..%2F../k",
    ] {
        let r = get(addr, missing);
        assert_eq!((r.status, r.error_code()), (404, Some("RepoNotFound")), "{missing}");
        assert!(r.header("X-Error-Message").is_some());
    }

    let r = get(addr, "/api/kernels/acme/k/refs");
    assert_eq!(r.status, 200);
    let refs = r.json();
    let tags: Vec<(&str, &str, &str)> = refs["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap(),
                t["ref"].as_str().unwrap(),
                t["targetCommit"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        tags,
        [
            ("v1.2.0", "refs/tags/v1.2.0", c12.as_str()),
            ("v1.0.0", "refs/tags/v1.0.0", c10.as_str())
        ]
    );
    let branches: Vec<(&str, &str, &str)> = refs["branches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap(),
                t["ref"].as_str().unwrap(),
                t["targetCommit"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        branches,
        [("main", "refs/heads/main", c12.as_str()), ("v1", "refs/heads/v1", c12.as_str())]
    );
    assert_eq!(refs["converts"], json!([]));
    assert_eq!(refs["pullRequests"], json!([]));

    let r = get(addr, "/api/models/acme/k/commits/v1.0.0");
    assert_eq!(r.json()[0]["id"], c10.as_str());

    // A repository directory without releases exists, with no revision.
    std::fs::create_dir_all(reg.path().join("acme/empty")).unwrap();
    let r = get(addr, "/api/models/acme/empty");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["sha"], Value::Null);
    assert_eq!(
        get(addr, "/api/models/acme/empty/revision/main").error_code(),
        Some("RevisionNotFound")
    );
}

#[test]
fn files_are_served_with_hub_headers() {
    let reg = registry();
    let server = start(reg.path(), None, None);
    let addr = server.addr();
    let c10 = commit_of(reg.path(), "1.0.0");
    let c12 = commit_of(reg.path(), "1.2.0");
    let lib = lib_bytes("1.0.0", "a");

    for path in [
        "/acme/k/resolve/v1.0.0/variants/a/libk.so",
        "/kernels/acme/k/resolve/v1.0.0/variants/a/libk.so",
        "/acme/k/resolve/v1.0.0/variants/a/libk%2Eso",
        &format!("/acme/k/resolve/{c10}/variants/a/libk.so"),
        "/acme/k/resolve/refs%2Ftags%2Fv1.0.0/variants/a/libk.so",
    ] {
        for method in ["HEAD", "GET"] {
            let r = request(addr, method, path, &[], b"");
            assert_eq!(r.status, 200, "{method} {path}");
            let etag = format!("\"{}\"", sha(&lib));
            assert_eq!(r.header("ETag"), Some(etag.as_str()));
            assert_eq!(r.header("X-Linked-Etag"), Some(etag.as_str()));
            assert_eq!(r.header("X-Linked-Size"), Some(lib.len().to_string().as_str()));
            assert_eq!(r.header("Content-Length"), Some(lib.len().to_string().as_str()));
            assert_eq!(r.header("X-Repo-Commit"), Some(c10.as_str()));
            assert_eq!(r.header("Accept-Ranges"), Some("bytes"));
            assert_eq!(r.header("Content-Type"), Some("application/octet-stream"));
            assert_eq!(r.header("Connection"), Some("close"));
            if method == "GET" {
                assert_eq!(r.body, lib);
            }
        }
    }
    let r = get(addr, "/acme/k/resolve/main/khub.toml");
    assert_eq!(r.header("X-Repo-Commit"), Some(c12.as_str()));
    assert_eq!(r.body, std::fs::read(reg.path().join("acme/k/1.2.0/khub.toml")).unwrap());

    // A bigger file streams whole, and the digest follows its content.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(reg.path().join("acme/k/1.2.0/big.bin"), &big).unwrap();
    let r = get(addr, "/acme/k/resolve/main/big.bin");
    assert_eq!(r.status, 200);
    assert!(r.body == big, "big file differs");
    assert_eq!(r.header("ETag").unwrap(), format!("\"{}\"", sha(&big)));
    let again = get(addr, "/acme/k/resolve/main/big.bin");
    assert_eq!(again.header("ETag"), r.header("ETag"));
    std::fs::write(reg.path().join("acme/k/1.2.0/big.bin"), b"changed").unwrap();
    let changed = get(addr, "/acme/k/resolve/main/big.bin");
    assert_eq!(changed.header("ETag").unwrap(), format!("\"{}\"", sha(b"changed")));
}

#[test]
fn ranges() {
    let reg = registry();
    let server = start(reg.path(), None, None);
    let addr = server.addr();
    let lib = lib_bytes("1.0.0", "a");
    let n = lib.len();
    let path = "/acme/k/resolve/v1.0.0/variants/a/libk.so";
    for (range, a, b) in [
        ("bytes=0-3", 0, 3),
        ("bytes=5-", 5, n - 1),
        ("bytes=-4", n - 4, n - 1),
        ("bytes=2-100000", 2, n - 1),
    ] {
        let r = request(addr, "GET", path, &[("Range", range)], b"");
        assert_eq!(r.status, 206, "{range}");
        assert_eq!(r.body, &lib[a..=b], "{range}");
        assert_eq!(r.header("Content-Range").unwrap(), format!("bytes {a}-{b}/{n}"));
        assert_eq!(r.header("X-Linked-Size").unwrap(), n.to_string());
        assert_eq!(r.header("Content-Length").unwrap(), (b - a + 1).to_string());
        let h = request(addr, "HEAD", path, &[("Range", range)], b"");
        assert_eq!(h.status, 206);
    }
    for range in [format!("bytes={n}-"), "bytes=-0".to_owned(), format!("bytes={}-{}", n + 5, n + 10)] {
        let r = request(addr, "GET", path, &[("Range", &range)], b"");
        assert_eq!(r.status, 416, "{range}");
        assert_eq!(r.header("Content-Range").unwrap(), format!("bytes */{n}"));
    }
    // Ranges the server may ignore are ignored.
    for range in ["bytes=4-1", "bytes=0-1,4-5", "lines=1-2"] {
        let r = request(addr, "GET", path, &[("Range", range)], b"");
        assert_eq!((r.status, r.body.len()), (200, n), "{range}");
    }
}

#[test]
fn missing_entries_and_traversal_are_refused() {
    let reg = registry();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"TOP-SECRET-CONTENT").unwrap();
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(outside.path().join("secret"), reg.path().join("acme/k/1.2.0/link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), reg.path().join("acme/k/1.2.0/variants/out")).unwrap();
        std::os::unix::fs::symlink(outside.path(), reg.path().join("evil")).unwrap();
        std::fs::create_dir_all(outside.path().join("k/1.0.0")).unwrap();
        std::fs::copy(reg.path().join("acme/k/1.0.0/khub.toml"), outside.path().join("k/1.0.0/khub.toml")).unwrap();
    }
    let server = start(reg.path(), None, None);
    let addr = server.addr();
    let c12 = commit_of(reg.path(), "1.2.0");

    let r = request(addr, "HEAD", "/acme/k/resolve/main/nope.txt", &[], b"");
    assert_eq!((r.status, r.error_code()), (404, Some("EntryNotFound")));
    assert_eq!(r.header("X-Repo-Commit"), Some(c12.as_str()));
    let r = get(addr, "/acme/k/resolve/main/variants");
    assert_eq!(
        (r.status, r.error_code()),
        (404, Some("EntryNotFound")),
        "a directory is not a file"
    );
    let r = get(addr, "/acme/k/resolve/v7/khub.toml");
    assert_eq!((r.status, r.error_code()), (404, Some("RevisionNotFound")));
    for p in [
        "/acme/nope/resolve/main/khub.toml",
        "/kernels/acme/nope/resolve/main/khub.toml",
        "/datasets/acme/k/resolve/main/khub.toml",
    ] {
        let r = get(addr, p);
        assert_eq!((r.status, r.error_code()), (404, Some("RepoNotFound")), "{p}");
    }

    for p in [
        "/acme/k/resolve/main/link",
        "/acme/k/resolve/main/variants/out/secret",
        "/evil/k/resolve/main/khub.toml",
        "/acme/k/resolve/main/../../../../../../etc/passwd",
        "/acme/k/resolve/main/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/acme/k/resolve/main/variants%2F..%2F..%2F..%2F1.0.0%2Fkhub.toml",
        "/acme/k/resolve/main/%2Fetc%2Fpasswd",
        "/acme/k/resolve/main/a%5C..%5Cb",
        "/acme/k/resolve/main/x%00y",
        "/acme/k/resolve/main/x%zz",
        "/acme/k/resolve/main/x%ff",
        "/acme/k/resolve/main//etc/passwd",
        "/..%2F..%2Fetc/passwd/resolve/main/x",
        "/api/models/acme/k/tree/main/..%2F..",
        "/api/models/acme/k/tree/main/variants/out",
        "/api/models/acme/k/tree/main/link",
    ] {
        let r = get(addr, p);
        assert!(matches!(r.status, 400 | 404), "{p}: {}", r.status);
        assert!(!String::from_utf8_lossy(&r.body).contains("TOP-SECRET"), "{p}");
        assert!(r.error_code().is_some(), "{p}");
    }
    // Listings skip symlinks.
    let r = get(addr, "/api/models/acme/k/tree/main?recursive=true&limit=1000");
    let listed = r.json().to_string() + &get(addr, "/api/models/acme/k").json().to_string();
    assert!(!listed.contains("link") && !listed.contains("out"), "{listed}");

    // Malformed requests get an answer and leave the server serving.
    let r = raw(addr, b"GARBAGE\r\n\r\n", false);
    assert_eq!(r.status, 400);
    // tiny_http drops a request line that is not ASCII without an answer.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"GET /acme/k/resolve/main/\xff HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(
        out.is_empty() || out.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    // A request head over the limit (64 KiB by default) gets 431, and the connection is closed.
    let long = format!(
        "GET /api/models/acme/k HTTP/1.1\r\nConnection: close\r\nX-Long: {}\r\n\r\n",
        "a".repeat(60 << 10)
    );
    assert_eq!(raw(addr, long.as_bytes(), false).status, 200);
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = s.write_all(format!("GET /api/models/acme/k HTTP/1.1\r\nX-Long: {}", "a".repeat(100 << 10)).as_bytes());
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(
        out.is_empty() || out.starts_with(b"HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let r = get(addr, &format!("/api/models/acme/k/revision/{}", "x".repeat(60_000)));
    assert_eq!(r.error_code(), Some("RevisionNotFound"));
    assert!(r.header("X-Error-Message").unwrap().len() <= 1000);
    assert_eq!(get(addr, "/nowhere").status, 404);
    assert_eq!(get(addr, "/api/models/acme/k/unknown").status, 404);
    assert_eq!(request(addr, "DELETE", "/api/models/acme/k", &[], b"").status, 405);
    assert_eq!(get(addr, "/api/models/acme/k").status, 200);
}

#[test]
fn tree_listing_is_paginated() {
    let reg = registry();
    let server = start(reg.path(), None, None);
    let addr = server.addr();
    let c12 = commit_of(reg.path(), "1.2.0");

    // Follows `Link: <url>; rel="next"` as huggingface_hub does, from a full URL.
    let list = |first: &str| -> (Vec<Value>, usize) {
        let mut url = first.to_owned();
        let mut out = Vec::new();
        let mut pages = 0;
        loop {
            let r = get(addr, &url);
            assert_eq!(r.status, 200, "{url}");
            let page = r.json();
            assert!(page.as_array().unwrap().len() <= 2, "page size");
            out.extend(page.as_array().unwrap().iter().cloned());
            pages += 1;
            match r.header("Link") {
                Some(link) => {
                    let next = link.strip_prefix('<').unwrap().split_once(">; rel=\"next\"").unwrap().0;
                    let prefix = format!("http://{addr}");
                    assert!(next.starts_with(&prefix), "{next}");
                    url = next[prefix.len()..].to_owned();
                }
                None => return (out, pages),
            }
        }
    };
    let (all, pages) = list("/api/models/acme/k/tree/main?recursive=true&expand=false");
    assert_eq!(pages, 3);
    let paths: Vec<(&str, &str)> = all
        .iter()
        .map(|e| (e["type"].as_str().unwrap(), e["path"].as_str().unwrap()))
        .collect();
    assert_eq!(
        paths,
        [
            ("file", "khub.toml"),
            ("directory", "variants"),
            ("directory", "variants/a"),
            ("file", "variants/a/libk.so"),
            ("directory", "variants/b"),
            ("file", "variants/b/libk.so"),
        ]
    );
    let lib = lib_bytes("1.2.0", "a");
    let f = &all[3];
    assert_eq!(f["oid"], sha(&lib));
    assert_eq!(f["size"], lib.len());
    assert_eq!(f["lfs"]["oid"], sha(&lib));
    assert_eq!(f["lfs"]["size"], lib.len());
    assert_eq!(f["lfs"]["pointerSize"], 134);
    assert!(all[1]["oid"].as_str().unwrap().len() == 40);

    let (top, _) = list("/api/models/acme/k/tree/main");
    assert_eq!(
        top.iter().map(|e| e["path"].as_str().unwrap()).collect::<Vec<_>>(),
        ["khub.toml", "variants"]
    );
    let (sub, _) = list("/api/kernels/acme/k/tree/v1.0.0/variants?recursive=false");
    assert_eq!(
        sub.iter().map(|e| e["path"].as_str().unwrap()).collect::<Vec<_>>(),
        ["variants/a", "variants/b"]
    );
    let (deep, _) = list(&format!("/api/models/acme/k/tree/{c12}/variants/a?expand=true"));
    assert_eq!(deep.len(), 1);
    assert_eq!(deep[0]["lastCommit"]["id"], c12.as_str());
    let r = get(addr, "/api/models/acme/k/tree/main?recursive=1&limit=1");
    assert_eq!(r.json().as_array().unwrap().len(), 1);
    assert!(r.header("Link").unwrap().contains("cursor=1"));

    let r = get(addr, "/api/models/acme/k/tree/main/nope");
    assert_eq!((r.status, r.error_code()), (404, Some("EntryNotFound")));
    assert_eq!(r.header("X-Repo-Commit"), Some(c12.as_str()));
    let r = get(addr, "/api/models/acme/k/tree/v3/variants");
    assert_eq!(r.error_code(), Some("RevisionNotFound"));
    assert_eq!(get(addr, "/api/models/acme/k/tree/main?cursor=bogus").status, 400);

    let body = json!({ "paths": ["khub.toml", "variants", "nope"] }).to_string();
    let r = request(
        addr,
        "POST",
        "/api/models/acme/k/paths-info/main",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200);
    let found: Vec<String> = r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(found, ["khub.toml", "variants"]);
    let form = b"paths=khub.toml&paths=variants%2Fa%2Flibk.so&expand=false";
    let r = request(
        addr,
        "POST",
        "/api/models/acme/k/paths-info/main",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        form,
    );
    assert_eq!(r.json().as_array().unwrap().len(), 2);
}

#[test]
fn tokens_guard_reads_and_writes() {
    let reg = registry();
    let server = start(reg.path(), Some("reader"), Some("writer"));
    let addr = server.addr();
    let bearer = |t: &str| format!("Bearer {t}");

    for path in ["/api/models/acme/k", "/acme/k/resolve/main/khub.toml", "/api/models/acme/nope"] {
        let r = get(addr, path);
        assert_eq!((r.status, r.error_code()), (401, Some("RepoNotFound")), "{path}");
        let r = request(addr, "GET", path, &[("Authorization", &bearer("wrong"))], b"");
        assert_eq!(r.status, 401, "{path}");
        assert_eq!(r.header("X-Error-Message"), Some("Invalid credentials in Authorization header"));
    }
    for t in ["reader", "writer"] {
        let r = request(addr, "GET", "/acme/k/resolve/main/khub.toml", &[("Authorization", &bearer(t))], b"");
        assert_eq!(r.status, 200, "{t}");
        let r = request(addr, "GET", "/api/models/acme/nope", &[("Authorization", &bearer(t))], b"");
        assert_eq!((r.status, r.error_code()), (404, Some("RepoNotFound")));
    }
    // Checking a README is a read: with a read token, it needs one.
    let yaml = br#"{"content":"---\nlicense: mit\n---\n"}"#;
    let json = ("Content-Type", "application/json");
    assert_eq!(request(addr, "POST", "/api/validate-yaml", &[json], yaml).status, 401);
    let r = request(
        addr,
        "POST",
        "/api/validate-yaml",
        &[json, ("Authorization", &bearer("reader"))],
        yaml,
    );
    assert_eq!(r.status, 200);
    let create = br#"{"name":"acme/new","type":"kernel"}"#;
    let r = request(addr, "POST", "/api/repos/create", &[], create);
    assert_eq!(r.status, 401);
    let r = request(addr, "POST", "/api/repos/create", &[("Authorization", &bearer("reader"))], create);
    assert_eq!(r.status, 403);
    let r = request(addr, "POST", "/api/repos/create", &[("Authorization", &bearer("nope"))], create);
    assert_eq!(r.status, 401);
    let r = request(addr, "POST", "/api/repos/create", &[("Authorization", &bearer("writer"))], create);
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json()["url"], format!("http://{addr}/kernels/acme/new"));
    assert!(reg.path().join("acme/new").is_dir());
    let r = request(addr, "POST", "/api/repos/create", &[("Authorization", &bearer("writer"))], create);
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["url"], format!("http://{addr}/kernels/acme/new"));
    let r = request(addr, "GET", "/api/whoami-v2", &[("Authorization", &bearer("writer"))], b"");
    assert_eq!(r.json()["auth"]["accessToken"]["role"], "write");
    // An organization name taken by a file: refused, naming it, not the registry's path.
    std::fs::write(reg.path().join("README.md"), b"# registry").unwrap();
    let taken = br#"{"name":"README.md/x","type":"kernel"}"#;
    let r = request(addr, "POST", "/api/repos/create", &[("Authorization", &bearer("writer"))], taken);
    let text = String::from_utf8_lossy(&r.body).into_owned() + r.header("X-Error-Message").unwrap_or("");
    assert_eq!(r.status, 409, "{text}");
    assert!(text.contains("`README.md`"), "{text}");
    assert!(!text.contains(reg.path().to_str().unwrap()), "the registry's path leaked: {text}");
    drop(server);

    // Without a write token, the server is read-only, whatever the token.
    let server = start(reg.path(), None, None);
    let addr = server.addr();
    for path in [
        "/api/repos/create",
        "/api/models/acme/k/commit/main",
        "/api/models/acme/k/preupload/main",
    ] {
        let r = request(addr, "POST", path, &[("Authorization", "Bearer writer")], b"{}");
        assert_eq!(r.status, 403, "{path}");
        assert_eq!(
            r.header("X-Error-Message"),
            Some("this server is read-only: start it with --write-token")
        );
    }
    // Reads are open, and a token the server does not know does not matter.
    let r = request(addr, "GET", "/api/models/acme/k", &[("Authorization", "Bearer hf_whatever")], b"");
    assert_eq!(r.status, 200);
}

/// The NDJSON body of a commit holding `files`.
fn ndjson(summary: &str, files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = json!({ "key": "header", "value": { "summary": summary, "description": "" } }).to_string() + "\n";
    for (path, content) in files {
        let b64 = base64::engine::general_purpose::STANDARD.encode(content);
        out += &(json!({ "key": "file", "value": { "content": b64, "path": path, "encoding": "base64" } }).to_string() + "\n");
    }
    out.into_bytes()
}

fn release_files(version: &str) -> (String, Vec<u8>, Vec<u8>) {
    let (a, b) = (lib_bytes(version, "a"), lib_bytes(version, "b"));
    (manifest(version, [&a, &b]), a, b)
}

#[test]
fn commits_create_exactly_one_new_release() {
    let reg = registry();
    let server = start(reg.path(), None, Some("w"));
    let addr = server.addr();
    let auth = [("Authorization", "Bearer w"), ("Content-Type", "application/x-ndjson")];
    let post = |path: &str, body: &[u8]| request(addr, "POST", path, &auth, body);

    let r = post("/api/repos/create", br#"{"name":"k","organization":"acme","private":false}"#);
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["error"], "You already created this repo");
    assert_eq!(r.json()["url"], format!("http://{addr}/acme/k"));

    let r = post(
        "/api/models/acme/k/preupload/main",
        br#"{"files":[{"path":"khub.toml","size":10,"sample":""},{"path":"variants/a/libk.so","size":5,"sample":""}]}"#,
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["files"],
        json!([
            { "path": "khub.toml", "uploadMode": "regular", "shouldIgnore": false },
            { "path": "variants/a/libk.so", "uploadMode": "regular", "shouldIgnore": false },
        ])
    );
    assert_eq!(
        post("/api/models/acme/k/preupload/main", br#"{"files":[{"path":"../x"}]}"#).status,
        400
    );
    assert_eq!(post("/api/models/acme/k/preupload/main", b"{not json").status, 400);

    let (text, a, b) = release_files("1.3.0");
    let body = ndjson(
        "release 1.3.0",
        &[
            ("khub.toml", text.as_bytes()),
            ("variants/a/libk.so", &a),
            ("variants/b/libk.so", &b),
            ("README.md", b"hello"),
        ],
    );
    let r = post("/api/kernels/acme/k/commit/main", &body);
    assert_eq!(r.status, 200, "{:?}", r.json());
    let commit = khub::registry::dir::commit_id(text.as_bytes());
    assert_eq!(r.json()["commitOid"], commit.as_str());
    assert_eq!(r.json()["commitUrl"], format!("http://{addr}/kernels/acme/k/commit/{commit}"));
    assert_eq!(r.json()["pullRequestUrl"], Value::Null);
    let refs = get(addr, "/api/models/acme/k/refs").json();
    assert_eq!(refs["tags"][0]["name"], "v1.3.0");
    assert_eq!(refs["tags"][0]["targetCommit"], commit.as_str());
    assert!(
        refs["branches"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["name"] == "main" && b["targetCommit"] == commit.as_str())
    );
    let r = get(addr, "/acme/k/resolve/v1.3.0/README.md");
    assert_eq!((r.status, r.body.as_slice()), (200, b"hello".as_slice()));
    assert_eq!(r.header("X-Repo-Commit"), Some(commit.as_str()));

    // Releases are immutable.
    let r = post("/api/models/acme/k/commit/main", &body);
    assert_eq!((r.status, r.error_code()), (409, Some("ReleaseExists")));
    let r = post("/api/models/acme/k/commit/v1", &body);
    assert_eq!(r.status, 409);

    // Commits that are not one complete, valid release are refused.
    let (text4, a4, b4) = release_files("1.4.0");
    let mut refused: Vec<(&str, Vec<u8>)> = vec![
        ("no manifest", ndjson("x", &[("variants/a/libk.so", &a4)])),
        (
            "a listed file missing",
            ndjson("x", &[("khub.toml", text4.as_bytes()), ("variants/a/libk.so", &a4)]),
        ),
        (
            "a file differs",
            ndjson(
                "x",
                &[
                    ("khub.toml", text4.as_bytes()),
                    ("variants/a/libk.so", &a4),
                    ("variants/b/libk.so", &a4),
                ],
            ),
        ),
        ("invalid manifest", ndjson("x", &[("khub.toml", b"schema = \"1.0\"\n")])),
        ("traversal", ndjson("x", &[("khub.toml", text4.as_bytes()), ("../escape", b"x")])),
        ("absolute", ndjson("x", &[("/etc/x", b"x")])),
        (
            "file and directory",
            ndjson("x", &[("variants", b"x"), ("variants/a/libk.so", &a4)]),
        ),
        ("not json", b"{\"key\":\"header\"\nnope\n".to_vec()),
        (
            "bad base64",
            b"{\"key\":\"file\",\"value\":{\"path\":\"a\",\"content\":\"!!\",\"encoding\":\"base64\"}}\n".to_vec(),
        ),
    ];
    let mut lfs = ndjson("x", &[("khub.toml", text4.as_bytes())]);
    lfs.extend_from_slice(b"{\"key\":\"lfsFile\",\"value\":{\"path\":\"big.bin\",\"algo\":\"sha256\",\"oid\":\"00\",\"size\":5}}\n");
    refused.push(("lfs", lfs));
    let mut del = ndjson("x", &[("khub.toml", text4.as_bytes())]);
    del.extend_from_slice(b"{\"key\":\"deletedFile\",\"value\":{\"path\":\"README.md\"}}\n");
    refused.push(("deletion", del));
    for (what, body) in &refused {
        let r = post("/api/models/acme/k/commit/main", body);
        assert_eq!(r.status, 400, "{what}: {:?}", String::from_utf8_lossy(&r.body));
        assert!(r.header("X-Error-Message").is_some_and(|m| !m.is_empty()), "{what}");
    }
    let r = post("/api/models/acme/k/commit/main", &refused[refused.len() - 2].1);
    assert!(r.json()["error"].as_str().unwrap().contains("regular"), "the LFS refusal says why");
    let full4 = ndjson(
        "x",
        &[
            ("khub.toml", text4.as_bytes()),
            ("variants/a/libk.so", &a4),
            ("variants/b/libk.so", &b4),
        ],
    );
    let r = post("/api/models/acme/k/commit/v2", &full4);
    assert_eq!(r.status, 400, "a 1.x release does not go on branch v2");
    let r = post("/api/models/acme/k/commit/v1.2.0", &full4);
    assert_eq!(r.status, 400, "commits go to branches");
    let r = post("/api/models/acme/k/commit/main?create_pr=1", &full4);
    assert_eq!(r.status, 400);
    let r = post("/api/models/acme/nope/commit/main", &full4);
    assert_eq!(r.error_code(), Some("RepoNotFound"));
    // Nothing of the refused commits is left behind.
    let mut left: Vec<String> = std::fs::read_dir(reg.path().join(REPO))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["1.0.0", "1.2.0", "1.3.0"]);
    let r = post("/api/models/acme/k/commit/v1", &full4);
    assert_eq!(r.status, 200, "{:?}", r.json());

    // Tags and branches are derived: consistent requests succeed, others conflict.
    let c13 = commit.as_str();
    let r = post("/api/models/acme/k/tag/v1.3.0", br#"{"tag":"v1.3.0"}"#);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["targetCommit"], c13);
    let r = post(&format!("/api/models/acme/k/tag/{c13}"), br#"{"tag":"v1.3.0","message":"m"}"#);
    assert_eq!(r.status, 200);
    let r = post("/api/models/acme/k/tag/main", br#"{"tag":"latest"}"#);
    assert_eq!(r.status, 409);
    assert!(r.json()["error"].as_str().unwrap().contains("derived"));
    assert_eq!(request(addr, "DELETE", "/api/models/acme/k/tag/v1.3.0", &auth, b"").status, 409);
    let c14 = khub::registry::dir::commit_id(text4.as_bytes());
    assert_eq!(
        post("/api/models/acme/k/branch/v1", format!(r#"{{"startingPoint":"{c14}"}}"#).as_bytes()).status,
        200
    );
    assert_eq!(post("/api/models/acme/k/branch/v1", br#"{"startingPoint":"v1.0.0"}"#).status, 409);
    assert_eq!(post("/api/models/acme/k/branch/v1", b"").status, 200);
    assert_eq!(
        post("/api/models/acme/k/branch/v3", b"{}").status,
        200,
        "a major without releases yet"
    );
    assert_eq!(post("/api/models/acme/k/branch/v3", br#"{"startingPoint":"main"}"#).status, 409);
    assert_eq!(post("/api/models/acme/k/branch/feature", b"{}").status, 409);
    assert_eq!(request(addr, "DELETE", "/api/models/acme/k/branch/v1", &auth, b"").status, 409);
}

#[test]
fn bodies_are_limited() {
    let reg = registry();
    let server = start(reg.path(), None, Some("w"));
    let addr = server.addr();
    let auth = [("Authorization", "Bearer w")];
    let big = vec![b' '; (1 << 20) + 10];
    let r = request(addr, "POST", "/api/repos/create", &auth, &big);
    assert_eq!((r.status, r.error_code()), (413, Some("PayloadTooLarge")));
    // A chunked body over the limit, without Content-Length.
    let mut req =
        b"POST /api/repos/create HTTP/1.1\r\nConnection: close\r\nAuthorization: Bearer w\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..20 {
        req.extend_from_slice(format!("{:x}\r\n", 100_000).as_bytes());
        req.extend_from_slice(&vec![b' '; 100_000]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(raw(addr, &req, false).status, 413);
    // An absurd declared length is never read (nor allocated): without the token the answer
    // is 401, with it 413, at once.
    let absurd = "4611686018427387904";
    let r = raw(
        addr,
        format!("POST /api/repos/create HTTP/1.1\r\nContent-Length: {absurd}\r\n\r\n{{}}").as_bytes(),
        false,
    );
    assert_eq!(r.status, 401);
    let r = raw(
        addr,
        format!("POST /api/repos/create HTTP/1.1\r\nAuthorization: Bearer w\r\nContent-Length: {absurd}\r\n\r\n{{}}").as_bytes(),
        false,
    );
    assert_eq!((r.status, r.error_code()), (413, Some("PayloadTooLarge")));
    let r = raw(
        addr,
        format!("POST /api/models/acme/k/commit/main HTTP/1.1\r\nAuthorization: Bearer w\r\nContent-Length: {absurd}\r\n\r\n{{}}")
            .as_bytes(),
        false,
    );
    assert_eq!((r.status, r.error_code()), (413, Some("PayloadTooLarge")));
    // A declared length within limits whose body never fully arrives.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"POST /api/repos/create HTTP/1.1\r\nAuthorization: Bearer w\r\nContent-Length: 100000000\r\n\r\n{}")
        .unwrap();
    drop(s);
    assert_eq!(get(addr, "/api/models/acme/k").status, 200);
    assert!(server.requests().iter().any(|r| r.status == 413 && r.method == "POST"));
}

#[test]
fn requests_are_logged_and_stop_closes_the_port() {
    let reg = registry();
    let server = start(reg.path(), None, None);
    let addr = server.addr();
    assert_eq!(server.url(), format!("http://{addr}"));
    assert_eq!(server.connections(), 0);
    get(addr, "/api/models/acme/k/refs");
    request(addr, "HEAD", "/acme/k/resolve/main/nope?x=1", &[], b"");
    let log = server.requests();
    assert_eq!(log.len(), 2);
    assert_eq!(
        (log[0].method.as_str(), log[0].path.as_str(), log[0].status),
        ("GET", "/api/models/acme/k/refs", 200)
    );
    assert_eq!(
        (log[1].method.as_str(), log[1].path.as_str(), log[1].status),
        ("HEAD", "/acme/k/resolve/main/nope?x=1", 404)
    );
    assert_eq!(server.connections(), 2);

    // The log keeps at most 1 KiB of a target: a client sending 60 KB targets would
    // otherwise fill the server's memory with them (no token needed, 404s count).
    let long = format!("/acme/k/resolve/main/{}", "a".repeat(60_000));
    assert!(get(addr, &long).status >= 400);
    let last = server.requests().pop().unwrap();
    assert!(last.path.len() <= 1024 + '…'.len_utf8(), "{} bytes kept", last.path.len());
    assert!(last.path.starts_with("/acme/k/resolve/main/aaa") && last.path.ends_with('…'));

    // Concurrent clients are all answered.
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| {
                for _ in 0..5 {
                    assert_eq!(get(addr, "/acme/k/resolve/main/khub.toml").status, 200);
                }
            });
        }
    });
    assert_eq!(server.connections(), 83);
    server.stop();
    assert!(TcpStream::connect(addr).is_err(), "the port is closed after stop");
}

/// Reads one response from a kept-alive connection: the head, then `Content-Length` bytes.
fn read_response(s: &mut TcpStream) -> Resp {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "closed mid-head: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let text = String::from_utf8(head[..head.len() - 4].to_vec()).unwrap();
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    let mut resp = Resp {
        status,
        headers,
        body: Vec::new(),
    };
    let len: usize = resp.header("Content-Length").unwrap().parse().unwrap();
    resp.body = vec![0; len];
    s.read_exact(&mut resp.body).unwrap();
    resp
}

#[test]
fn connections_are_kept_alive_until_the_client_closes() {
    let reg = registry();
    let server = start(reg.path(), None, None);
    let addr = server.addr();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    for _ in 0..3 {
        s.write_all(b"GET /acme/k/resolve/v1.0.0/variants/a/libk.so HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let r = read_response(&mut s);
        assert_eq!((r.status, r.body), (200, lib_bytes("1.0.0", "a")));
    }
    // Two requests in one write (pipelined), the second asking to close.
    s.write_all(b"HEAD /acme/k/resolve/main/khub.toml HTTP/1.1\r\nHost: x\r\n\r\nGET /api/models/acme/k/refs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    let r = read_response(&mut s);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Connection"), Some("close"));
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0, "closed after `Connection: close`");
    assert_eq!(server.connections(), 1);
    assert_eq!(server.requests().len(), 5);
}

#[test]
fn the_request_rate_is_limited_per_address() {
    let reg = registry();
    let mut options = ServeOptions::default();
    options.limits.rate_per_second = 0.5;
    options.limits.rate_burst = 3;
    let server = Server::start(reg.path(), "127.0.0.1:0", options).unwrap();
    let addr = server.addr();
    for _ in 0..3 {
        assert_eq!(get(addr, "/api/models/acme/k/refs").status, 200);
    }
    let r = get(addr, "/api/models/acme/k/refs");
    assert_eq!((r.status, r.error_code()), (429, Some("TooManyRequests")));
    assert_eq!(r.header("Retry-After"), Some("2"));
}

#[test]
fn listings_and_readme_checks() {
    let reg = registry();
    release(reg.path(), "other/x", "0.1.0");
    std::fs::create_dir_all(reg.path().join("acme/empty")).unwrap();
    std::fs::create_dir_all(reg.path().join("acme/.hidden")).unwrap();
    let server = start(reg.path(), None, None);
    let addr = server.addr();
    let ids = |path: &str| -> Vec<String> {
        let r = get(addr, path);
        assert_eq!(r.status, 200, "{path}");
        r.json()
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };
    // Pages of two (the test server's page size), linked.
    let r = get(addr, "/api/models");
    assert_eq!(r.json().as_array().unwrap().len(), 2);
    let link = r.header("Link").unwrap();
    assert!(link.contains("cursor=2") && link.ends_with("rel=\"next\""), "{link}");
    assert_eq!(ids("/api/models?cursor=2"), ["other/x"]);
    assert_eq!(ids("/api/kernels?author=acme"), ["acme/empty", "acme/k"]);
    assert_eq!(ids("/api/models?search=X"), ["other/x"]);
    assert_eq!(ids("/api/models?author=nobody"), Vec::<String>::new());
    let k = &get(addr, "/api/models?author=acme&search=k").json()[0];
    assert_eq!(k["sha"], commit_of(reg.path(), "1.2.0"));
    assert_eq!(k["author"], "acme");
    assert_eq!(get(addr, "/api/datasets").status, 404);

    let validate = |content: &str| {
        let body = json!({ "content": content, "repoType": "model" }).to_string();
        request(
            addr,
            "POST",
            "/api/validate-yaml",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
    };
    let r = validate("---\nlicense: mit\n---\n# k\n");
    assert_eq!((r.status, r.json()), (200, json!({ "errors": [], "warnings": [] })));
    let r = validate("---\nlicense: mit\n");
    assert_eq!(r.status, 400);
    assert!(r.json()["errors"][0]["message"].as_str().unwrap().contains("never closed"));
    assert_eq!(request(addr, "GET", "/api/validate-yaml", &[], b"").status, 405);
}

/// The Rust client khub uses, `hf-hub`, against the server: cache-mode downloads (HEAD then
/// GET, blobs named by ETag), paginated trees, snapshots with patterns, ranges, errors, and
/// publishing a release with `create_repository` + `upload_folder` on a kernel repository.
#[cfg(feature = "hub")]
#[test]
fn hf_hub_client_talks_to_khub_serve() {
    use hf_hub::{HFClient, HFError, RepoTypeKernel};
    use khub::registry::Registry as _;

    let reg = registry();
    let server = start(reg.path(), None, Some("w"));
    let (c10, c12) = (commit_of(reg.path(), "1.0.0"), commit_of(reg.path(), "1.2.0"));
    let cache = tempfile::tempdir().unwrap();
    let client = HFClient::builder()
        .endpoint(server.url())
        .cache_dir(cache.path().to_owned())
        .retry_max_attempts(0)
        .token("w".to_owned())
        .build_sync()
        .unwrap();
    let k = client.kernel("acme", "k");

    let p = k.download_file().filename("khub.toml").revision("v1").send().unwrap();
    assert!(
        p.ends_with(format!("kernels--acme--k/snapshots/{c12}/khub.toml")),
        "{}",
        p.display()
    );
    assert_eq!(
        std::fs::read(&p).unwrap(),
        std::fs::read(reg.path().join("acme/k/1.2.0/khub.toml")).unwrap()
    );
    let blob = std::fs::canonicalize(&p).unwrap();
    assert_eq!(
        blob.file_name().unwrap().to_string_lossy(),
        sha(&std::fs::read(&p).unwrap()),
        "the blob is named by the ETag"
    );
    assert_eq!(std::fs::read_to_string(cache.path().join("kernels--acme--k/refs/v1")).unwrap(), c12);

    let refs = k.list_refs().send().unwrap();
    assert_eq!(refs.tags.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["v1.2.0", "v1.0.0"]);
    let tree = k.list_tree().revision("main").recursive(true).send().unwrap();
    assert_eq!(tree.len(), 6, "{tree:?}");

    let snap = k
        .snapshot_download()
        .revision("v1.0.0")
        .allow_patterns(vec!["variants/a/*".into()])
        .send()
        .unwrap();
    assert!(snap.ends_with(&c10));
    assert_eq!(std::fs::read(snap.join("variants/a/libk.so")).unwrap(), lib_bytes("1.0.0", "a"));
    assert!(!snap.join("variants/b").exists());
    let part = k
        .download_file_to_bytes()
        .filename("variants/a/libk.so")
        .revision("v1.0.0")
        .range(0..7)
        .send()
        .unwrap();
    assert_eq!(&part[..], &lib_bytes("1.0.0", "a")[..7]);
    let info = client.model("acme", "k").info().revision("v1.0.0").send().unwrap();
    assert_eq!(info.sha.as_deref(), Some(c10.as_str()));

    let e = k.download_file().filename("nope").revision("v1").send().unwrap_err();
    assert!(matches!(e, HFError::EntryNotFound { .. }), "{e:?}");
    // hf-hub maps a 404 on a download to EntryNotFound whatever the X-Error-Code says.
    let e = k.download_file().filename("khub.toml").revision("v7").send().unwrap_err();
    assert!(
        matches!(e, HFError::RevisionNotFound { .. } | HFError::EntryNotFound { .. }),
        "{e:?}"
    );
    let e = client.model("acme", "k").info().revision("v7").send().unwrap_err();
    assert!(matches!(e, HFError::RevisionNotFound { .. }), "{e:?}");
    let e = client.kernel("acme", "none").list_refs().send().unwrap_err();
    assert!(matches!(e, HFError::RepoNotFound { .. }), "{e:?}");

    client
        .create_repository()
        .repo_id("acme/k")
        .repo_type(RepoTypeKernel)
        .exist_ok(true)
        .send()
        .unwrap();
    let folder = tempfile::tempdir().unwrap();
    let (text, a, b) = release_files("2.0.0");
    std::fs::create_dir_all(folder.path().join("variants/a")).unwrap();
    std::fs::create_dir_all(folder.path().join("variants/b")).unwrap();
    std::fs::write(folder.path().join("khub.toml"), &text).unwrap();
    std::fs::write(folder.path().join("variants/a/libk.so"), &a).unwrap();
    std::fs::write(folder.path().join("variants/b/libk.so"), &b).unwrap();
    let commit = k
        .upload_folder()
        .folder_path(folder.path().to_owned())
        .revision("v2")
        .commit_message("release 2.0.0")
        .send()
        .unwrap();
    let c20 = khub::registry::dir::commit_id(text.as_bytes());
    assert_eq!(commit.commit_oid.as_deref(), Some(c20.as_str()));
    let refs = k.list_refs().send().unwrap();
    assert!(refs.branches.iter().any(|b| b.name == "v2" && b.target_commit == c20), "{refs:?}");

    // khub's own registry client over the same server.
    let hub = khub::registry::hf::HubRegistry::new(khub::registry::hf::HubConfig::new(&server.url())).unwrap();
    let repo: khub::registry::RepoId = REPO.parse().unwrap();
    let refs = hub.refs(&repo).unwrap();
    assert!(refs.tags.iter().any(|t| t.name == "v2.0.0" && t.commit == c20));
    assert_eq!(hub.manifest(&repo, &c20).unwrap(), text.as_bytes());
    let mut out = Vec::new();
    let path = khub::manifest::RelPath::new("variants/b/libk.so").unwrap();
    hub.fetch(&repo, &c20, &path, 1 << 20, &mut out).unwrap();
    assert_eq!(out, b);
}

/// The peak resident memory of process `pid`, in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A commit's header line carrying a 24 MB JSON array (any writer can send one) is
/// skipped, not built: parsed into a JSON value tree it took about 16 times its size in
/// the server's memory. Measured on a `khub serve` process of its own.
#[cfg(all(target_os = "linux", feature = "cli"))]
#[test]
fn a_huge_commit_header_is_skipped_not_built() {
    let reg = registry();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server = std::process::Command::new(env!("CARGO_BIN_EXE_khub"))
        .args(["serve", reg.path().to_str().unwrap(), "--addr", &format!("127.0.0.1:{port}")])
        .env("KHUB_SERVE_WRITE_TOKEN", "w")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let up = (0..400).any(|_| {
        std::thread::sleep(Duration::from_millis(25));
        TcpStream::connect(addr).is_ok()
    });
    assert!(up, "khub serve did not start");
    let before = peak_rss_kib(server.id());

    let (text, a, b) = release_files("1.3.0");
    let files = ndjson(
        "release 1.3.0",
        &[
            ("khub.toml", text.as_bytes()),
            ("variants/a/libk.so", &a),
            ("variants/b/libk.so", &b),
        ],
    );
    let mut body = b"{\"key\":\"header\",\"value\":{\"summary\":\"big\",\"extra\":[".to_vec();
    body.extend(std::iter::repeat_n(b"0,".as_slice(), 12_000_000).flatten());
    body.extend_from_slice(b"0]}}\n");
    body.extend_from_slice(&files);
    let auth = [("Authorization", "Bearer w"), ("Content-Type", "application/x-ndjson")];
    let r = request(addr, "POST", "/api/kernels/acme/k/commit/main", &auth, &body);
    let grew_mib = peak_rss_kib(server.id()).saturating_sub(before) / 1024;
    server.kill().unwrap();
    server.wait().unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // The line itself is buffered (24 MB); a value tree of it took hundreds of MB.
    assert!(grew_mib < 150, "the server's peak memory grew by {grew_mib} MiB");
}
