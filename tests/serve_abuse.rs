//! `khub serve` as an attacker meets it: the real binary, started with `ulimit -n 1024`, and
//! waves of hostile clients — 10,000 requests declaring a 5 GB body and closed at once,
//! 1,000 slowloris connections, a 600 MB header line — then 200 honest clients at once.
//! After each wave an honest GET (from another address, so the attacker's rate limit does
//! not apply to it) is answered correctly within a second, the server's memory stays under
//! 200 MB, it is alive, and its open file descriptors return to where they were.
//!
//! Also: SIGTERM lets a slow request in flight finish, then the server exits 0; and a
//! server killed (-9) in the middle of commits leaves each release whole or absent.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own
#![cfg(all(feature = "serve", target_os = "linux"))]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;

/// A manifest of `version` with one variant whose library is `lib`.
fn manifest(version: &str, libs: &[(&str, &[u8])]) -> String {
    let mut text = format!("schema = \"1.0\"\n[kernel]\nname = \"k\"\nversion = \"{version}\"\nabi = 1\n");
    for (i, (path, lib)) in libs.iter().enumerate() {
        text += &format!(
            "\n[[variants]]\nid = \"v{i}\"\nbackend = \"cpu\"\nos = \"linux\"\narch = \"x86_64\"\nlibc = \"glibc 2.17\"\nlibrary = \"{path}\"\nfiles = [{{ path = \"{path}\", size = {}, sha256 = \"{}\" }}]\n",
            lib.len(),
            khub::verify::sha256(lib)
        );
    }
    text
}

const LIB: &[u8] = b"not really a shared object\n";

fn registry() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("acme/k/1.0.0");
    std::fs::create_dir_all(dir.join("variants/a")).unwrap();
    std::fs::write(dir.join("variants/a/libk.so"), LIB).unwrap();
    std::fs::write(dir.join("khub.toml"), manifest("1.0.0", &[("variants/a/libk.so", LIB)])).unwrap();
    d
}

/// Raises this process's own open-file limit to its hard limit (the test holds a thousand
/// sockets itself).
fn raise_own_fd_limit() {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write one `rlimit` through a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

struct Served {
    child: Child,
    addr: SocketAddr,
}

impl Served {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn rss_mb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kb / 1024
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map_or(0, |d| d.count())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `khub serve` on `root` with `ulimit -n 1024` and `args`; returns once it listens.
fn serve(root: &Path, args: &[&str]) -> Served {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_khub"));
    cmd.arg("serve")
        .arg(root)
        .args(["--addr", "127.0.0.1:0"])
        .args(args)
        .env_remove("KHUB_SERVE_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // setrlimit, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let r = libc::rlimit {
                rlim_cur: 1024,
                rlim_max: 1024,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stderr).lines();
        if let Some(Ok(first)) = lines.next() {
            let _ = tx.send(first);
        }
        // Keep draining, so that the server never blocks on a full pipe.
        for l in lines.map_while(Result::ok) {
            eprintln!("[server] {l}");
        }
    });
    let banner = rx.recv_timeout(Duration::from_secs(30)).expect("khub serve did not start");
    let url = banner
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {banner:?}"));
    let addr = url.trim_start_matches("http://").parse().unwrap();
    Served { child, addr }
}

/// A connection from a chosen loopback address (the server counts rates per address).
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    s.bind(&local.into()).unwrap();
    s.connect(&to.into()).unwrap();
    s.into()
}

/// One request on a fresh connection from `from`, answered in full: status and body.
fn fetch(from: &str, to: SocketAddr, path: &str) -> (u16, Vec<u8>) {
    let mut s = connect_from(from, to);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").expect("no head");
    let status = String::from_utf8_lossy(&out[9..12]).parse().unwrap();
    (status, out[split + 4..].to_vec())
}

/// What must hold after every wave, once the server has closed the wave's connections
/// (its open file descriptors back to the baseline, within a bounded wait).
fn check_health(server: &mut Served, wave: &str, baseline_fds: usize) {
    let t = Instant::now();
    let deadline = t + Duration::from_secs(15);
    let mut fds = server.fds();
    while fds > baseline_fds && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        fds = server.fds();
    }
    let settled = t.elapsed();
    assert!(fds <= baseline_fds, "after {wave}: {fds} open fds, baseline {baseline_fds}");
    assert!(server.alive(), "after {wave}: the server died");
    let t = Instant::now();
    let (status, body) = fetch("127.0.0.2", server.addr, "/acme/k/resolve/main/variants/a/libk.so");
    let took = t.elapsed();
    assert_eq!((status, body.as_slice()), (200, LIB), "after {wave}");
    assert!(took < Duration::from_secs(1), "after {wave}: an honest GET took {took:?}");
    let rss = server.rss_mb();
    assert!(rss < 200, "after {wave}: RSS {rss} MB");
    println!(
        "{wave}: fds back to {fds} (baseline {baseline_fds}) in {:.0} ms; honest GET {:.1} ms; RSS {rss} MB",
        settled.as_secs_f64() * 1e3,
        took.as_secs_f64() * 1e3
    );
}

#[test]
fn hostile_clients_do_not_knock_the_server_over() {
    raise_own_fd_limit();
    let reg = registry();
    let mut server = serve(
        reg.path(),
        &[
            "--write-token",
            "w",
            "--header-timeout",
            "2",
            "--idle-timeout",
            "2",
            "--body-timeout",
            "3",
        ],
    );
    let addr = server.addr;
    let t0 = Instant::now();
    // Warm up (the runtime's threads, the digest cache), then take the baseline.
    for _ in 0..3 {
        assert_eq!(fetch("127.0.0.2", addr, "/api/models/acme/k").0, 200);
    }
    std::thread::sleep(Duration::from_millis(200));
    let baseline = server.fds();
    println!("baseline: {baseline} fds, RSS {} MB", server.rss_mb());

    // 1. 10,000 requests declaring a 5 GB body, closed at once (half with the write token,
    //    which get 413 rather than 401).
    let t = Instant::now();
    std::thread::scope(|s| {
        for i in 0..50 {
            s.spawn(move || {
                for j in 0..200 {
                    let auth = if (i + j) % 2 == 0 { "Authorization: Bearer w\r\n" } else { "" };
                    let Ok(mut c) = TcpStream::connect(addr) else { continue };
                    let _ = c.write_all(
                        format!("POST /api/repos/create HTTP/1.1\r\nHost: k\r\n{auth}Content-Length: 5000000000\r\n\r\n{{").as_bytes(),
                    );
                }
            });
        }
    });
    println!("10,000 huge declared bodies sent in {:?}", t.elapsed());
    check_health(&mut server, "10,000 huge declared bodies", baseline);

    // 2. 1,000 slowloris connections: a request head that never ends. The server closes
    //    each after the header timeout (2 s here), serving the ones over its connection limit
    //    (1024 less 64) as slots free up.
    let t = Instant::now();
    let mut slow: Vec<TcpStream> = (0..1000)
        .map(|_| {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(b"GET /api/models/acme/k HTTP/1.1\r\nHost: k\r\nX-Slow: ").unwrap();
            c.set_nonblocking(true).unwrap();
            c
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !slow.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        slow.retain_mut(|c| {
            let _ = c.write(b"a");
            let mut buf = [0u8; 64];
            match c.read(&mut buf) {
                Ok(0) => false,
                Ok(_) => true,
                Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            }
        });
    }
    assert!(slow.is_empty(), "{} slowloris connections still open after 15 s", slow.len());
    println!("1,000 slowloris connections closed by the server in {:?}", t.elapsed());
    check_health(&mut server, "1,000 slowloris connections", baseline);

    // 3. A 600 MB header line, streamed: cut off at the header limit, never buffered.
    let t = Instant::now();
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"GET /api/models/acme/k HTTP/1.1\r\nHost: k\r\nX-Big: ").unwrap();
    let chunk = vec![b'a'; 1 << 20];
    let mut sent = 0u64;
    while sent < 600 << 20 {
        match c.write(&chunk) {
            Ok(n) => sent += n as u64,
            Err(_) => break,
        }
    }
    let mut answer = Vec::new();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = c.read_to_end(&mut answer);
    drop(c);
    assert!(sent < 600 << 20, "the server read a 600 MB header line to its end");
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    println!(
        "600 MB header line: cut off after {} KiB sent ({}), {:?}",
        sent >> 10,
        if answer.is_empty() { "reset" } else { "431" },
        t.elapsed()
    );
    check_health(&mut server, "a 600 MB header line", baseline);

    // 4. 200 honest clients at once, each with two requests on one kept-alive connection.
    let t = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..200)
            .map(|_| {
                s.spawn(move || {
                    let mut c = connect_from("127.0.0.3", addr);
                    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    let req = b"GET /acme/k/resolve/main/variants/a/libk.so HTTP/1.1\r\nHost: k\r\n\r\n";
                    c.write_all(req).unwrap();
                    c.write_all(req).unwrap();
                    let mut out = Vec::new();
                    let mut buf = [0u8; 4096];
                    while out.windows(LIB.len()).filter(|w| *w == LIB).count() < 2 {
                        let n = c.read(&mut buf).unwrap();
                        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&out));
                        out.extend_from_slice(&buf[..n]);
                    }
                    assert!(out.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&out));
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
    println!("200 concurrent honest clients served in {:?}", t.elapsed());
    check_health(&mut server, "200 concurrent honest clients", baseline);
    println!("all waves in {:?}", t0.elapsed());
}

/// An NDJSON commit body of `files`.
fn ndjson(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = b"{\"key\":\"header\",\"value\":{\"summary\":\"release\"}}\n".to_vec();
    for (path, bytes) in files {
        let line = serde_json::json!({ "key": "file", "value": {
            "path": path,
            "content": base64::engine::general_purpose::STANDARD.encode(bytes),
            "encoding": "base64",
        }});
        out.extend_from_slice(line.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

/// The head of a commit request with a body of `len` bytes.
fn commit_head(len: usize) -> String {
    format!(
        "POST /api/models/acme/k/commit/main HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer w\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\nContent-Length: {len}\r\n\r\n"
    )
}

#[test]
fn sigterm_lets_the_request_in_flight_finish() {
    let reg = registry();
    let mut server = serve(reg.path(), &["--write-token", "w"]);
    let lib = b"release 2.0.0".to_vec();
    let text = manifest("2.0.0", &[("variants/a/libk.so", &lib)]);
    let body = ndjson(&[("khub.toml", text.as_bytes()), ("variants/a/libk.so", &lib)]);
    let mut c = TcpStream::connect(server.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(commit_head(body.len()).as_bytes()).unwrap();
    let half = body.len() / 2;
    c.write_all(&body[..half]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill sends SIGTERM to the child this test started.
    assert_eq!(unsafe { libc::kill(server.pid() as i32, libc::SIGTERM) }, 0);
    std::thread::sleep(Duration::from_millis(500));
    assert!(server.alive(), "the server waits for the request in flight");
    assert!(TcpStream::connect(server.addr).is_err(), "no new connection is accepted");
    c.write_all(&body[half..]).unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).unwrap();
    assert!(out.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&out));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the server did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(reg.path().join("acme/k/2.0.0/variants/a/libk.so").is_file());
}

/// Whether the release `version` is on disk: `Some(true)` whole (every file the manifest
/// lists, with its digest), `None` absent; a partial release fails the test.
fn release_state(root: &Path, version: &str) -> Option<bool> {
    let dir = root.join("acme/k").join(version);
    if !dir.exists() {
        return None;
    }
    let m = khub::manifest::Manifest::from_bytes(&std::fs::read(dir.join("khub.toml")).expect("a release without its manifest")).unwrap();
    for f in m.variants.iter().flat_map(|v| &v.files) {
        let bytes = std::fs::read(dir.join(f.path.as_str())).unwrap_or_else(|e| panic!("{version}: {} {e}", f.path));
        assert_eq!(khub::verify::sha256(&bytes), f.sha256, "{version}: {} differs", f.path);
    }
    Some(true)
}

fn staging_dirs(root: &Path) -> Vec<String> {
    std::fs::read_dir(root.join("acme/k"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(".staging"))
        .collect()
}

#[test]
fn kill_9_during_a_commit_leaves_the_release_whole_or_absent() {
    let reg = registry();
    // Eight 256 KiB files: big enough that a commit takes a while, small enough for 20 runs.
    let libs: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| (format!("variants/v{i}/libk.so"), vec![b'a' + i as u8; 256 << 10]))
        .collect();
    let refs: Vec<(&str, &[u8])> = libs.iter().map(|(p, b)| (p.as_str(), b.as_slice())).collect();
    // The files' lines once (encoding them is slow in a debug build); the manifest per version.
    let file_lines = ndjson(&refs);
    let body_of = |version: &str| {
        let text = manifest(version, &refs);
        let mut body = ndjson(&[("khub.toml", text.as_bytes())]);
        body.extend_from_slice(&file_lines);
        body
    };
    // How long one whole commit takes, to spread the kills over it.
    let full = {
        let server = serve(reg.path(), &["--write-token", "w"]);
        let body = body_of("0.9.0");
        let t = Instant::now();
        let mut c = TcpStream::connect(server.addr).unwrap();
        c.write_all(commit_head(body.len()).as_bytes()).unwrap();
        c.write_all(&body).unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).unwrap();
        assert!(out.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&out));
        t.elapsed()
    };
    let runs = 20u32;
    let (mut whole, mut absent) = (0, 0);
    let t0 = Instant::now();
    for i in 0..runs {
        let version = format!("1.{i}.0");
        let body = body_of(&version);
        let mut server = serve(reg.path(), &["--write-token", "w"]);
        let mut c = TcpStream::connect(server.addr).unwrap();
        c.write_all(commit_head(body.len()).as_bytes()).unwrap();
        // Kill at a point spread over the commit: the upload, then the staging and the rename.
        let at = full * i / runs + full / (2 * runs);
        let writer = {
            let mut c = c.try_clone().unwrap();
            let body = body.clone();
            std::thread::spawn(move || {
                let _ = c.write_all(&body);
            })
        };
        std::thread::sleep(at);
        // SAFETY: kill sends SIGKILL to the child this test started.
        unsafe { libc::kill(server.pid() as i32, libc::SIGKILL) };
        let _ = server.child.wait();
        drop(c);
        let _ = writer.join();
        match release_state(reg.path(), &version) {
            Some(_) => whole += 1,
            None => absent += 1,
        }
        // A new server: committing the same version again either creates it or finds it
        // whole, and the dead commit's staging directory is gone.
        let server = serve(reg.path(), &["--write-token", "w"]);
        let mut c = TcpStream::connect(server.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        c.write_all(commit_head(body.len()).as_bytes()).unwrap();
        c.write_all(&body).unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).unwrap();
        assert!(
            out.starts_with(b"HTTP/1.1 200") || out.starts_with(b"HTTP/1.1 409"),
            "{}",
            String::from_utf8_lossy(&out[..out.len().min(300)])
        );
        assert_eq!(release_state(reg.path(), &version), Some(true));
        assert_eq!(staging_dirs(reg.path()), Vec::<String>::new());
    }
    println!(
        "{runs} kills over a {full:?} commit: {whole} releases whole, {absent} absent, in {:?}",
        t0.elapsed()
    );
}
