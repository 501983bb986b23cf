//! A fault-injecting HTTP/1.1 proxy for the reliability tests (tests/fault_proxy.rs,
//! tests/fetch_kill9.rs): one thread per connection, one request per connection. Each
//! request goes upstream (`khub serve`) on a fresh connection; the answer is read whole,
//! then sent to the client, possibly damaged, possibly slowly, with `Connection: close`.
//!
//! Which fault a request gets is deterministic: a function of the seed, the request line
//! and how many times that request line was seen before. With concurrent clients, which
//! client sees the n-th answer to a request line may vary; the faults handed out do not.
#![allow(clippy::disallowed_methods)] // test code
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the proxy may do to an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// The headers and part of the body, then a TCP reset.
    Reset,
    /// The headers and part of the body, then a clean close.
    Truncate,
    /// One byte of the body changed.
    FlipByte,
    /// 1 to 64 bytes appended to the body, `Content-Length` counting them.
    ExtraBytes,
    /// The body as it is, with a `Content-Length` that is too small or too large.
    WrongLength,
    /// `500 Internal Server Error` (upstream is not asked).
    Status500,
    /// `429 Too Many Requests` with `Retry-After: 1`.
    Status429,
    /// Nothing (or the headers and part of the body), then silence longer than the
    /// client's read timeout, then a close.
    Stall,
    /// Bytes that are not an HTTP response.
    GarbageHeaders,
}

pub const ALL_FAULTS: [Fault; 9] = [
    Fault::Reset,
    Fault::Truncate,
    Fault::FlipByte,
    Fault::ExtraBytes,
    Fault::WrongLength,
    Fault::Status500,
    Fault::Status429,
    Fault::Stall,
    Fault::GarbageHeaders,
];

#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// The seed of every decision.
    pub seed: u64,
    /// The probability that a request gets a fault.
    pub fault_rate: f64,
    /// The faults to choose from, uniformly.
    pub faults: Vec<Fault>,
    /// How long a stall lasts.
    pub stall: Duration,
    /// Send bodies in chunks of this many bytes with this pause after each (a slow link).
    pub throttle: Option<(usize, Duration)>,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            seed: 1,
            fault_rate: 0.25,
            faults: ALL_FAULTS.to_vec(),
            stall: Duration::from_millis(2500),
            throttle: None,
        }
    }
}

/// What the proxy did.
#[derive(Debug, Clone, Default)]
pub struct ProxyStats {
    pub requests: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u64>,
    /// Faults injected, by kind and request (`GET /kernels/…/khub.toml: Reset`).
    pub log: Vec<String>,
}

pub struct FaultProxy {
    addr: SocketAddr,
    stats: Arc<Mutex<ProxyStats>>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    pub fn start(upstream: SocketAddr, options: ProxyOptions) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Mutex::new(ProxyStats::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
        let (st, sp) = (stats.clone(), stop.clone());
        let options = Arc::new(options);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (st, seen, options) = (st.clone(), seen.clone(), options.clone());
                std::thread::spawn(move || {
                    let _ = serve_one(conn, upstream, &options, &st, &seen);
                });
            }
        });
        FaultProxy { addr, stats, stop }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stats(&self) -> ProxyStats {
        self.stats.lock().unwrap().clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

/// splitmix64: a small, good mixing function.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A deterministic random stream.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(mix(seed))
    }
    pub fn next(&mut self) -> u64 {
        self.0 = mix(self.0);
        self.0
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p && p > 0.0
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// Reads an HTTP request head (and a `Content-Length` body) from `s`.
fn read_request(s: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        let k = s.read(&mut tmp).ok()?;
        if k == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..k]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let len = content_length(&head).unwrap_or(0);
    while buf.len() < head_end + len {
        let k = s.read(&mut tmp).ok()?;
        if k == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..k]);
    }
    let line = head.lines().next().unwrap_or("").to_owned();
    // Rewrite the request for upstream: one request, then close.
    let mut out = Vec::new();
    for (i, l) in head.split("\r\n").enumerate() {
        if l.is_empty() {
            continue;
        }
        if i > 0 && l.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        out.extend_from_slice(l.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out.extend_from_slice(&buf[head_end..head_end + len]);
    Some((line, out))
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok())?
    })
}

/// An upstream answer: status line + headers (without Content-Length and Connection), body.
struct Answer {
    status_line: String,
    headers: Vec<String>,
    body: Vec<u8>,
}

fn fetch_upstream(upstream: SocketAddr, request: &[u8], head_only: bool) -> Option<Answer> {
    let mut u = TcpStream::connect(upstream).ok()?;
    u.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    u.write_all(request).ok()?;
    let mut all = Vec::new();
    u.read_to_end(&mut all).ok()?;
    let head_end = find(&all, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&all[..head_end]).into_owned();
    let mut lines = head.split("\r\n").filter(|l| !l.is_empty());
    let status_line = lines.next()?.to_owned();
    let mut headers = Vec::new();
    let mut declared = None;
    for l in lines {
        let lower = l.to_ascii_lowercase();
        if lower.starts_with("content-length:") {
            declared = l.split_once(':').and_then(|(_, v)| v.trim().parse::<usize>().ok());
        } else if !lower.starts_with("connection:") {
            headers.push(l.to_owned());
        }
    }
    let mut body = all[head_end..].to_vec();
    if head_only {
        // A HEAD answer declares the length of the body it does not send.
        headers.push(format!("Content-Length: {}", declared.unwrap_or(0)));
        body.clear();
    } else if let Some(n) = declared {
        body.truncate(n);
    }
    Some(Answer {
        status_line,
        headers,
        body,
    })
}

fn head_bytes(status_line: &str, headers: &[String], content_length: Option<usize>) -> Vec<u8> {
    let mut h = format!("{status_line}\r\n");
    for l in headers {
        h.push_str(l);
        h.push_str("\r\n");
    }
    if let Some(n) = content_length {
        h.push_str(&format!("Content-Length: {n}\r\n"));
    }
    h.push_str("Connection: close\r\n\r\n");
    h.into_bytes()
}

fn send_body(s: &mut TcpStream, body: &[u8], throttle: Option<(usize, Duration)>) -> std::io::Result<()> {
    match throttle {
        None => s.write_all(body),
        Some((chunk, pause)) => {
            for c in body.chunks(chunk.max(1)) {
                s.write_all(c)?;
                s.flush()?;
                std::thread::sleep(pause);
            }
            Ok(())
        }
    }
}

/// Closes `s` with a TCP reset (SO_LINGER 0) rather than a FIN.
fn reset(s: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: `s` owns a valid socket descriptor for the duration of the call, and `linger`
    // is a properly initialized `struct linger` whose size is passed alongside it.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
}

fn serve_one(
    mut client: TcpStream,
    upstream: SocketAddr,
    options: &ProxyOptions,
    stats: &Mutex<ProxyStats>,
    seen: &Mutex<BTreeMap<String, u64>>,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let Some((line, request)) = read_request(&mut client) else {
        return Ok(());
    };
    let n = {
        let mut seen = seen.lock().unwrap();
        let c = seen.entry(line.clone()).or_insert(0);
        *c += 1;
        *c
    };
    let mut rng = Rng::new(options.seed ^ fnv(&line) ^ mix(n));
    let fault = (rng.chance(options.fault_rate) && !options.faults.is_empty())
        .then(|| options.faults[rng.below(options.faults.len() as u64) as usize]);
    {
        let mut st = stats.lock().unwrap();
        st.requests += 1;
        if let Some(f) = fault {
            *st.faults.entry(format!("{f:?}")).or_insert(0) += 1;
            st.log.push(format!("{line} (#{n}): {f:?}"));
        }
    }
    let throttle = options.throttle;
    match fault {
        Some(Fault::Status500) => {
            let body = b"{\"error\":\"injected\"}";
            client.write_all(&head_bytes(
                "HTTP/1.1 500 Internal Server Error",
                &["Content-Type: application/json".into()],
                Some(body.len()),
            ))?;
            return client.write_all(body);
        }
        Some(Fault::Status429) => {
            let body = b"{\"error\":\"slow down\"}";
            client.write_all(&head_bytes(
                "HTTP/1.1 429 Too Many Requests",
                &["Content-Type: application/json".into(), "Retry-After: 1".into()],
                Some(body.len()),
            ))?;
            return client.write_all(body);
        }
        Some(Fault::GarbageHeaders) => {
            let mut junk = b"HTTP/1.1 2\x00\x07 OK\r\nContent-Length: banana\r\n\xff\xfe: \x01\r\n".to_vec();
            for _ in 0..rng.below(64) {
                junk.push(rng.next() as u8);
            }
            junk.extend_from_slice(b"\r\n\r\n");
            return client.write_all(&junk);
        }
        _ => {}
    }
    let head_only = line.starts_with("HEAD ");
    let Some(a) = fetch_upstream(upstream, &request, head_only) else {
        reset(client);
        return Ok(());
    };
    let len = a.body.len();
    let part = |rng: &mut Rng| if len == 0 { 0 } else { rng.below(len as u64) as usize };
    match fault {
        None | Some(Fault::Status500 | Fault::Status429 | Fault::GarbageHeaders) => {
            let cl = (!head_only).then_some(len);
            client.write_all(&head_bytes(&a.status_line, &a.headers, cl))?;
            send_body(&mut client, &a.body, throttle)
        }
        Some(Fault::Reset) => {
            client.write_all(&head_bytes(&a.status_line, &a.headers, Some(len)))?;
            let k = part(&mut rng);
            send_body(&mut client, &a.body[..k], throttle)?;
            client.flush()?;
            reset(client);
            Ok(())
        }
        Some(Fault::Truncate) => {
            client.write_all(&head_bytes(&a.status_line, &a.headers, Some(len)))?;
            let k = part(&mut rng);
            send_body(&mut client, &a.body[..k], throttle)?;
            client.shutdown(Shutdown::Write)
        }
        Some(Fault::FlipByte) => {
            let mut body = a.body;
            if !body.is_empty() {
                let i = part(&mut rng);
                body[i] ^= 1 << rng.below(8);
            }
            client.write_all(&head_bytes(&a.status_line, &a.headers, Some(body.len())))?;
            send_body(&mut client, &body, throttle)
        }
        Some(Fault::ExtraBytes) => {
            let mut body = a.body;
            for _ in 0..1 + rng.below(64) {
                body.push(rng.next() as u8);
            }
            client.write_all(&head_bytes(&a.status_line, &a.headers, Some(body.len())))?;
            send_body(&mut client, &body, throttle)
        }
        Some(Fault::WrongLength) => {
            let wrong = if len > 1 && rng.chance(0.5) {
                part(&mut rng).max(1).min(len - 1)
            } else {
                len + 1 + rng.below(4096) as usize
            };
            client.write_all(&head_bytes(&a.status_line, &a.headers, Some(wrong)))?;
            send_body(&mut client, &a.body, throttle)?;
            client.shutdown(Shutdown::Write)
        }
        Some(Fault::Stall) => {
            if rng.chance(0.5) {
                client.write_all(&head_bytes(&a.status_line, &a.headers, Some(len)))?;
                let k = part(&mut rng);
                send_body(&mut client, &a.body[..k], throttle)?;
                client.flush()?;
            }
            std::thread::sleep(options.stall);
            client.shutdown(Shutdown::Both)
        }
    }
}

/// The release the reliability tests fetch: kernels-example's CPU variants, with data files
/// added to the x86-64-v3 variant, signed.
pub struct TestRelease {
    /// The registry root (`acme/activation/0.1.0`).
    pub root: std::path::PathBuf,
    /// The SHA-256 (hex) of every file of the release, the manifest and its signature.
    pub known: std::collections::BTreeSet<String>,
    /// The SHA-256 of what a fetch for an x86-64-v3 host must store: the manifest, the
    /// signature and the variant's files.
    pub wanted: Vec<String>,
    /// The trust policy that requires this release's signature.
    pub trust: khub::verify::trust::TrustPolicy,
    /// The same policy as a file (`trust.toml`).
    pub trust_file: std::path::PathBuf,
}

pub const VARIANT: &str = "cpu-x86_64-v3-linux";

pub fn test_release(dir: &std::path::Path, data_sizes: &[usize]) -> TestRelease {
    use khub::manifest::{FileEntry, RelPath};
    let rel = dir.join("registry/acme/activation/0.1.0");
    super::common::copy_dir(super::common::example_release(), &rel);
    let mut m = khub::Manifest::from_bytes(&std::fs::read(rel.join("khub.toml")).unwrap()).unwrap();
    let v = m.variants.iter_mut().find(|v| v.id == VARIANT).expect("the x86-64-v3 variant");
    let lib = v.library.as_str().to_owned();
    let vdir = lib.rsplit_once('/').map_or("", |(d, _)| d).to_owned();
    let mut rng = Rng::new(42);
    for (i, &size) in data_sizes.iter().enumerate() {
        let bytes: Vec<u8> = (0..size).map(|_| rng.next() as u8).collect();
        let path = format!("{vdir}/data/w{i}.bin");
        std::fs::create_dir_all(rel.join(&path).parent().unwrap()).unwrap();
        std::fs::write(rel.join(&path), &bytes).unwrap();
        v.files.push(FileEntry {
            path: RelPath::new(&path).unwrap(),
            size: size as u64,
            sha256: khub::verify::sha256(&bytes),
        });
    }
    std::fs::write(rel.join("khub.toml"), m.to_toml_string().unwrap()).unwrap();

    let (public, secret) = khub::verify::sign::keygen(None).unwrap();
    let key = dir.join("k.key");
    std::fs::write(&key, secret).unwrap();
    khub::package::sign::sign_release(
        &rel,
        &key,
        "acme/activation".parse().unwrap(),
        khub::package::sign::Expiry::Never,
        None,
    )
    .unwrap();
    let trust = khub::verify::trust::TrustPolicy::permissive()
        .require_signature(true)
        .trust_key("acme/*", public.parse().unwrap());
    let key_line = public.lines().last().unwrap().trim().to_owned();
    let trust_file = dir.join("trust.toml");
    std::fs::write(
        &trust_file,
        format!("require-signature = true\n\n[[publisher]]\nrepos = [\"acme/*\"]\nkeys = [\"{key_line}\"]\n"),
    )
    .unwrap();

    let hash = |p: &std::path::Path| khub::verify::sha256(&std::fs::read(p).unwrap()).to_string();
    let m = khub::Manifest::from_bytes(&std::fs::read(rel.join("khub.toml")).unwrap()).unwrap();
    let mut known: std::collections::BTreeSet<String> = m
        .variants
        .iter()
        .flat_map(|v| v.files.iter().map(|f| f.sha256.to_string()))
        .collect();
    let mut wanted = vec![hash(&rel.join("khub.toml")), hash(&rel.join("khub.toml.minisig"))];
    known.extend(wanted.iter().cloned());
    let v = m.variants.iter().find(|v| v.id == VARIANT).unwrap();
    wanted.extend(v.files.iter().map(|f| f.sha256.to_string()));
    TestRelease {
        root: dir.join("registry"),
        known,
        wanted,
        trust,
        trust_file,
    }
}

/// What a store holds, checked: every blob re-hashed against its name.
#[derive(Debug, Default)]
pub struct StoreCheck {
    /// Blobs whose bytes hash to their name.
    pub clean: std::collections::BTreeSet<String>,
    /// Problems: corrupt blobs, `.partial` files outside `tmp/`, blobs of no file of the
    /// release.
    pub problems: Vec<String>,
    /// `.partial` files in `tmp/` (left by a killed writer; the next writer of the entry
    /// removes them).
    pub temps: usize,
}

pub fn check_store(cache: &std::path::Path, known: &std::collections::BTreeSet<String>) -> StoreCheck {
    let mut out = StoreCheck::default();
    let store = cache.join("store-v1");
    let mut stack = vec![cache.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            let ty = e.file_type().unwrap();
            if ty.is_dir() {
                stack.push(p);
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".partial") {
                if p.parent() == Some(&store.join("tmp")) {
                    out.temps += 1;
                } else {
                    out.problems.push(format!("a partial file outside tmp/: {}", p.display()));
                }
            }
        }
    }
    let Ok(shards) = std::fs::read_dir(store.join("blobs")) else {
        return out;
    };
    for shard in shards.flatten() {
        for blob in std::fs::read_dir(shard.path()).unwrap().flatten() {
            let name = blob.file_name().to_string_lossy().into_owned();
            let actual = khub::verify::sha256(&std::fs::read(blob.path()).unwrap()).to_string();
            if actual != name {
                out.problems
                    .push(format!("corrupt blob {}: its bytes hash to {actual}", blob.path().display()));
            } else if !known.contains(&name) {
                out.problems
                    .push(format!("blob {} is no file of the release", blob.path().display()));
            } else {
                out.clean.insert(name);
            }
        }
    }
    out
}
