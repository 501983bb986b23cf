//! `khub serve`: a Hugging Face Hub-compatible HTTP server over a directory registry.
//!
//! The server answers the subset of the Hub's HTTP API that `hf-hub` (Rust) and
//! `huggingface_hub` (Python) use to read and publish repositories, over the layout of
//! [`crate::registry::dir`]: one directory per release, refs derived from the directories.
//!
//! | route | what |
//! |---|---|
//! | `GET /api/{models,kernels}/{org}/{name}[/revision/{rev}]` | repository info at a revision |
//! | `GET /api/{P}/{org}/{name}/refs` | branches and tags |
//! | `GET /api/{P}/{org}/{name}/tree/{rev}[/{path}]` | file listing, paginated with `Link` |
//! | `POST /api/{P}/{org}/{name}/paths-info/{rev}` | entries for given paths |
//! | `GET /api/{P}/{org}/{name}/commits/{rev}` | the release's single commit |
//! | `HEAD`/`GET /[kernels/]{org}/{name}/resolve/{rev}/{path}` | file bytes, with `Range` |
//! | `POST /api/repos/create` | create a repository directory |
//! | `POST /api/{P}/{org}/{name}/preupload/{rev}` | every file is a regular (inline) upload |
//! | `POST /api/{P}/{org}/{name}/commit/{rev}` | NDJSON commit: creates exactly one new release |
//! | `POST /api/{P}/{org}/{name}/{tag,branch}/{…}` | accepted when consistent with derived refs |
//! | `GET /api/whoami-v2` | who the token is |
//!
//! Releases are immutable: a commit must carry a valid `khub.toml` naming a version that
//! does not exist yet, and every file that manifest lists, with the listed size and digest.
//! The files are staged in a hidden directory inside the repository and renamed into place
//! in one step, so readers never see half a release.
//!
//! Every file is opened with `fsx::open_under`: nothing outside a release
//! directory, and no symlink, is ever served.
//!
//! The server closes every connection after one response, so stopping it leaves no
//! kept-alive connection behind that a client could hang on.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::fsx::{OpenError, open_under};
use crate::manifest::{Manifest, RelPath, Sha256Digest};
use crate::registry::dir::{ReleaseDir, commit_id, derive_refs, scan_repo};
use crate::registry::{MAX_MANIFEST_BYTES, Refs, RegistryError, RepoId};

/// The largest commit body accepted (the NDJSON of one release, files inline in base64).
pub const MAX_COMMIT_BYTES: u64 = 2 << 30;
/// The largest JSON request body accepted.
pub const MAX_JSON_BYTES: u64 = 1 << 20;
/// Requests that declare a body longer than this get no answer at all: see [`Server`].
const MAX_DECLARED_BODY: u64 = MAX_COMMIT_BYTES + (1 << 20);
/// How many requests the in-memory log keeps.
const LOG_CAP: usize = 100_000;
/// How many digests the cache keeps before it starts over.
const DIGEST_CACHE_CAP: usize = 100_000;
/// The most entries a release listing may have.
const MAX_LISTED: usize = 1_000_000;
/// The deepest directory nesting listed.
const MAX_DEPTH: usize = 64;
/// The size the Hub reports for an LFS pointer file.
const LFS_POINTER_SIZE: u64 = 134;

/// How a server runs.
#[derive(Clone)]
pub struct ServeOptions {
    /// When set, every read needs this token or the write token (`Authorization: Bearer`).
    pub read_token: Option<String>,
    /// The token that allows writes. Without one, the server is read-only.
    pub write_token: Option<String>,
    /// Worker threads answering requests (default 8; 0 means 1).
    pub threads: usize,
    /// The most entries one page of a tree listing holds (default 1000; 0 means 1).
    pub page_size: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            read_token: None,
            write_token: None,
            threads: 8,
            page_size: 1000,
        }
    }
}

impl fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |t: &Option<String>| t.as_ref().map(|_| "<redacted>");
        f.debug_struct("ServeOptions")
            .field("read_token", &redact(&self.read_token))
            .field("write_token", &redact(&self.write_token))
            .field("threads", &self.threads)
            .field("page_size", &self.page_size)
            .finish()
    }
}

/// The server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The registry directory is missing or unreadable.
    #[error("registry directory {}: {source}", root.display())]
    Root {
        /// The directory.
        root: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {message}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// What went wrong.
        message: String,
    },
    /// A worker thread could not be started.
    #[error("cannot start a server thread: {0}")]
    Thread(#[source] io::Error),
}

/// One answered request, as kept in the server's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// The method (`GET`, `HEAD`, …).
    pub method: String,
    /// The request target as sent: path and query, still percent-encoded.
    pub path: String,
    /// The status answered.
    pub status: u16,
}

/// A running server. It stops when [`Server::stop`] is called or when it is dropped.
///
/// Built on `tiny_http`, which has no socket timeouts: a client that declares a body and
/// never sends it holds a worker thread until it disconnects. A request declaring a body
/// larger than about 2 GiB is never answered (its connection is abandoned), because
/// `tiny_http` would otherwise allocate the whole declared length to discard it.
pub struct Server {
    http: Option<Arc<tiny_http::Server>>,
    state: Arc<State>,
    workers: Vec<JoinHandle<()>>,
    addr: SocketAddr,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .field("root", &self.state.root)
            .finish()
    }
}

impl Server {
    /// Serves the registry at `root` on `addr` (`"127.0.0.1:0"` picks a free port).
    pub fn start(root: &Path, addr: &str, options: ServeOptions) -> Result<Server, ServeError> {
        let root = root.canonicalize().map_err(|source| ServeError::Root {
            root: root.to_owned(),
            source,
        })?;
        if !root.is_dir() {
            return Err(ServeError::Root {
                root,
                source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        let http = tiny_http::Server::http(addr).map_err(|e| ServeError::Bind {
            addr: addr.to_owned(),
            message: e.to_string(),
        })?;
        let Some(local) = http.server_addr().to_ip() else {
            return Err(ServeError::Bind {
                addr: addr.to_owned(),
                message: "not an IP address".into(),
            });
        };
        let threads = options.threads.max(1);
        let state = Arc::new(State {
            root,
            options,
            addr: local,
            log: Mutex::new(VecDeque::new()),
            received: AtomicU64::new(0),
            digests: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
            commit_lock: Mutex::new(()),
            threads,
            log_stderr: crate::env::var_os(crate::env::KHUB_SERVE_LOG).is_some_and(|v| v == "1"),
        });
        let http = Arc::new(http);
        let mut server = Server {
            http: Some(Arc::clone(&http)),
            state,
            workers: Vec::with_capacity(threads),
            addr: local,
        };
        for i in 0..threads {
            let http = Arc::clone(&http);
            let state = Arc::clone(&server.state);
            let handle = std::thread::Builder::new()
                .name(format!("khub-serve-{i}"))
                .spawn(move || worker(&http, &state))
                .map_err(ServeError::Thread)?; // `server` drops here and stops the others
            server.workers.push(handle);
        }
        Ok(server)
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL, such as `http://127.0.0.1:8080`: what `HF_ENDPOINT` should be.
    pub fn url(&self) -> String {
        let mut a = self.addr;
        if a.ip().is_unspecified() {
            a.set_ip(if a.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        format!("http://{a}")
    }

    /// The requests answered so far, oldest first (the last 100 000).
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.state.log).iter().cloned().collect()
    }

    /// How many requests the server has received. Every connection carries one request (the
    /// server closes it after answering), so this also counts connections: a test of an
    /// offline mode can check that it stays put.
    pub fn connections(&self) -> u64 {
        self.state.received.load(Ordering::SeqCst)
    }

    /// Stops the server: no request is accepted after this returns.
    pub fn stop(self) {
        drop(self);
    }

    /// Serves until the process ends (or until accepting connections fails, which is
    /// reported on stderr).
    pub fn wait(mut self) {
        for w in std::mem::take(&mut self.workers) {
            let _ = w.join();
        }
    }

    fn shutdown(&mut self) {
        let Some(http) = self.http.take() else { return };
        self.state.stop.store(true, Ordering::SeqCst);
        // Each `unblock` wakes one worker blocked in `recv`.
        for _ in 0..self.workers.len() {
            http.unblock();
        }
        for w in std::mem::take(&mut self.workers) {
            let _ = w.join();
        }
        // The last reference: tiny_http tells its accept thread to stop, which then closes
        // the listening socket. Wait (briefly) until connections are refused, so that a
        // caller that stopped the server can rely on the port being closed.
        drop(http);
        let mut probe = self.addr;
        if probe.ip().is_unspecified() {
            probe.set_ip(if probe.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        for _ in 0..200 {
            match std::net::TcpStream::connect_timeout(&probe, std::time::Duration::from_millis(100)) {
                Ok(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                Err(_) => break,
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn worker(http: &tiny_http::Server, state: &State) {
    while !state.stop.load(Ordering::SeqCst) {
        match http.recv() {
            Ok(rq) => handle(state, rq),
            // Woken by `shutdown`: the flag is set.
            Err(_) if state.stop.load(Ordering::SeqCst) => {}
            // tiny_http's accept loop hit an error (such as too many open files) and ended:
            // no connection will come any more, so stop every worker and let `wait` return
            // rather than keep a deaf server running.
            Err(e) => {
                if !state.stop.swap(true, Ordering::SeqCst) {
                    eprintln!("khub serve: accepting connections failed: {e}; stopping");
                    for _ in 0..state.threads {
                        http.unblock();
                    }
                }
            }
        }
    }
}

/// Locks a mutex, ignoring poisoning: every structure behind one stays valid.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type DigestKey = (PathBuf, u64, Option<SystemTime>);

struct State {
    root: PathBuf,
    options: ServeOptions,
    addr: SocketAddr,
    log: Mutex<VecDeque<RequestRecord>>,
    received: AtomicU64,
    digests: Mutex<HashMap<DigestKey, [u8; 32]>>,
    stop: AtomicBool,
    commit_lock: Mutex<()>,
    threads: usize,
    log_stderr: bool,
}

impl State {
    fn record(&self, method: &str, path: &str, status: u16) {
        if self.log_stderr {
            eprintln!("khub serve: {method} {path} -> {status}");
        }
        let mut log = lock(&self.log);
        if log.len() >= LOG_CAP {
            log.pop_front();
        }
        log.push_back(RequestRecord {
            method: method.to_owned(),
            path: path.to_owned(),
            status,
        });
    }

    /// The SHA-256 of an open file, cached by (path, length, mtime). Leaves the file at
    /// offset 0.
    fn digest(&self, path: &Path, file: &mut File) -> io::Result<[u8; 32]> {
        let meta = file.metadata()?;
        let key = (path.to_owned(), meta.len(), meta.modified().ok());
        if let Some(d) = lock(&self.digests).get(&key) {
            return Ok(*d);
        }
        let (digest, n) = crate::verify::sha256_reader(&mut *file)?;
        file.seek(SeekFrom::Start(0))?;
        if n == meta.len() {
            let mut cache = lock(&self.digests);
            if cache.len() >= DIGEST_CACHE_CAP {
                cache.clear();
            }
            cache.insert(key, digest.0);
        }
        Ok(digest.0)
    }
}

// ---------------------------------------------------------------------------------------
// Responses and errors
// ---------------------------------------------------------------------------------------

enum Body {
    Bytes(Vec<u8>),
    /// A file positioned at the first byte to send, and how many bytes to send.
    File(File, u64),
}

struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Body,
}

impl Reply {
    fn json(status: u16, v: &Value) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type", "application/json; charset=utf-8".into())],
            body: Body::Bytes(serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec())),
        }
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }

    fn body_len(&self) -> u64 {
        match &self.body {
            Body::Bytes(b) => b.len() as u64,
            Body::File(_, n) => *n,
        }
    }
}

/// An error answer: JSON `{"error": …}` with `X-Error-Code` and `X-Error-Message`.
#[derive(Debug)]
struct ApiError {
    status: u16,
    code: Option<&'static str>,
    message: String,
    headers: Vec<(&'static str, String)>,
    body: Option<Value>,
}

impl ApiError {
    fn new(status: u16, code: Option<&'static str>, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
            body: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, Some("BadRequest"), message)
    }

    fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, Some("InternalError"), message)
    }

    fn not_found_route() -> ApiError {
        ApiError::new(404, Some("NotFound"), "no such route on this server (khub serve)")
    }

    fn too_large(limit: u64) -> ApiError {
        ApiError::new(
            413,
            Some("PayloadTooLarge"),
            format!("the request body is larger than {limit} bytes"),
        )
    }

    fn repo_not_found(repo: &str) -> ApiError {
        ApiError::new(404, Some("RepoNotFound"), format!("Repository not found: {}", clip(repo)))
    }

    fn with_header(mut self, name: &'static str, value: impl Into<String>) -> ApiError {
        self.headers.push((name, value.into()));
        self
    }

    fn into_reply(self) -> Reply {
        let body = self.body.unwrap_or_else(|| json!({ "error": self.message }));
        let mut r = Reply::json(self.status, &body);
        if let Some(code) = self.code {
            r = r.header("X-Error-Code", code);
        }
        r = r.header("X-Error-Message", self.message);
        r.headers.extend(self.headers);
        r
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        match e {
            RegistryError::RepoNotFound { repo, .. } => ApiError::repo_not_found(&repo.to_string()),
            other => ApiError::internal(other.to_string()),
        }
    }
}

fn clip(s: &str) -> String {
    s.chars().take(300).collect()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        416 => "Range Not Satisfiable",
        500 => "Internal Server Error",
        _ => "Unknown",
    }
}

/// A header value made safe to send: printable ASCII only, at most 1000 characters.
fn header_value(v: &str) -> String {
    v.chars()
        .take(1000)
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .collect()
}

fn write_reply(w: &mut dyn Write, reply: Reply, head_only: bool) -> io::Result<()> {
    let len = reply.body_len();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nServer: khub\r\nConnection: close\r\nContent-Length: {len}\r\n",
        reply.status,
        reason(reply.status)
    );
    for (k, v) in &reply.headers {
        head.push_str(k);
        head.push_str(": ");
        head.push_str(&header_value(v));
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    if !head_only {
        match reply.body {
            Body::Bytes(b) => w.write_all(&b)?,
            Body::File(f, n) => {
                let copied = io::copy(&mut f.take(n), w)?;
                if copied != n {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file shrank while being served"));
                }
            }
        }
    }
    w.flush()
}

// ---------------------------------------------------------------------------------------
// Request handling
// ---------------------------------------------------------------------------------------

fn handle(state: &State, mut rq: tiny_http::Request) {
    state.received.fetch_add(1, Ordering::SeqCst);
    let method = rq.method().as_str().to_owned();
    let url = rq.url().to_owned();
    if rq.body_length().is_some_and(|n| n as u64 > MAX_DECLARED_BODY) {
        // Dropping a tiny_http request whose body was not read in full allocates a buffer of
        // the unread length (its `EqualReader` discards the rest that way), which aborts the
        // process for an absurd `Content-Length`. So this connection is abandoned instead:
        // the request, its socket and its reader thread are leaked, never answered.
        state.record(&method, &url, 413);
        std::mem::forget(rq);
        return;
    }
    let reply = match catch_unwind(AssertUnwindSafe(|| route(state, &mut rq, &method, &url))) {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => e.into_reply(),
        Err(_) => ApiError::internal("internal error").into_reply(),
    };
    // Read what the handler left of the body with a small buffer, so that dropping the
    // request does not buffer it.
    drain(&mut rq);
    // Logged before answering, so that a client that got its answer finds it in the log.
    state.record(&method, &url, reply.status);
    let mut w = rq.into_writer();
    let _ = write_reply(&mut *w, reply, method == "HEAD");
}

fn drain(rq: &mut tiny_http::Request) {
    let r = rq.as_reader();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    while total <= MAX_DECLARED_BODY {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

/// Decodes `%XX` escapes (and `+` as a space when `plus` is set). `None` when malformed.
fn percent_decode(s: &str, plus: bool) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hi = (*b.get(i + 1)? as char).to_digit(16)?;
                let lo = (*b.get(i + 2)? as char).to_digit(16)?;
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            b'+' if plus => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Some(out)
}

/// Which API family a request uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Model,
    Kernel,
}

impl Kind {
    fn from_plural(p: &str) -> Result<Kind, ApiError> {
        match p {
            "models" => Ok(Kind::Model),
            "kernels" => Ok(Kind::Kernel),
            "datasets" | "spaces" => Err(ApiError::new(
                404,
                Some("RepoNotFound"),
                format!("this server hosts models and kernels only, not {p}"),
            )),
            _ => Err(ApiError::not_found_route()),
        }
    }

    /// The prefix of web and resolve URLs.
    fn prefix(self) -> &'static str {
        match self {
            Kind::Model => "",
            Kind::Kernel => "kernels/",
        }
    }
}

/// What a request's token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    None,
    Invalid,
    Read,
    Write,
}

fn token_eq(given: &str, expected: &str) -> bool {
    // Comparing digests keeps the time independent of where the strings differ and of the
    // expected token's length.
    let a = Sha256::digest(given.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    let diff = a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

struct Ctx<'a> {
    state: &'a State,
    method: &'a str,
    /// The path, percent-encoded as received.
    raw_path: &'a str,
    query: Vec<(String, String)>,
    raw_query: &'a str,
    token: Token,
    base: String,
}

impl Ctx<'_> {
    fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn flag(&self, name: &str) -> bool {
        self.param(name)
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
    }

    fn need_read(&self) -> Result<(), ApiError> {
        if self.state.options.read_token.is_none() {
            return Ok(());
        }
        match self.token {
            Token::Read | Token::Write => Ok(()),
            Token::None => Err(ApiError::new(
                401,
                Some("RepoNotFound"),
                "Unauthorized: this server needs a token (set HF_TOKEN)",
            )),
            Token::Invalid => Err(ApiError::new(
                401,
                Some("Unauthorized"),
                "Invalid credentials in Authorization header",
            )),
        }
    }

    fn need_write(&self) -> Result<(), ApiError> {
        if self.state.options.write_token.is_none() {
            return Err(ApiError::new(
                403,
                Some("ReadOnly"),
                "this server is read-only: start it with --write-token",
            ));
        }
        match self.token {
            Token::Write => Ok(()),
            Token::Read => Err(ApiError::new(
                403,
                Some("Forbidden"),
                "this token can only read: writes need the write token",
            )),
            Token::None => Err(ApiError::new(
                401,
                Some("Unauthorized"),
                "Unauthorized: writes need the write token (set HF_TOKEN)",
            )),
            Token::Invalid => Err(ApiError::new(
                401,
                Some("Unauthorized"),
                "Invalid credentials in Authorization header",
            )),
        }
    }

    fn repo_url(&self, kind: Kind, repo: &RepoId) -> String {
        format!("{}/{}{}", self.base, kind.prefix(), repo)
    }
}

fn header<'a>(rq: &'a tiny_http::Request, name: &'static str) -> Option<&'a str> {
    rq.headers().iter().find(|h| h.field.equiv(name)).map(|h| h.value.as_str())
}

fn route(state: &State, rq: &mut tiny_http::Request, method: &str, url: &str) -> Result<Reply, ApiError> {
    // Absolute-form targets (`http://host/path`) are reduced to their path.
    let target = match url.find("://") {
        Some(i) if !url.starts_with('/') => url[i + 3..].find('/').map_or("/", |j| &url[i + 3 + j..]),
        _ => url,
    };
    let (raw_path, raw_query) = target.split_once('?').unwrap_or((target, ""));
    if !raw_path.starts_with('/') {
        return Err(ApiError::not_found_route());
    }
    let mut segs = Vec::new();
    for s in raw_path[1..].split('/') {
        let bytes = percent_decode(s, false).ok_or_else(|| ApiError::bad_request("malformed percent-encoding in the path"))?;
        let s = String::from_utf8(bytes).map_err(|_| ApiError::bad_request("the path is not UTF-8"))?;
        segs.push(s);
    }
    let query = raw_query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let k = String::from_utf8(percent_decode(k, true)?).ok()?;
            let v = String::from_utf8(percent_decode(v, true)?).ok()?;
            Some((k, v))
        })
        .collect();
    let token = match header(rq, "Authorization").map(str::trim) {
        None => Token::None,
        Some(v) => {
            let t = match v.split_once(' ') {
                Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim(),
                _ => "",
            };
            let o = &state.options;
            if o.write_token.as_deref().is_some_and(|w| token_eq(t, w)) {
                Token::Write
            } else if o.read_token.as_deref().is_some_and(|r| token_eq(t, r)) {
                Token::Read
            } else {
                Token::Invalid
            }
        }
    };
    let host = header(rq, "Host")
        .filter(|h| !h.is_empty() && h.len() <= 255 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b)))
        .map_or_else(|| state.addr.to_string(), str::to_owned);
    let ctx = Ctx {
        state,
        method,
        raw_path,
        query,
        raw_query,
        token,
        base: format!("http://{host}"),
    };
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    let get = matches!(method, "GET" | "HEAD");
    let post = method == "POST";
    let allow = |ok: bool| {
        if ok {
            Ok(())
        } else {
            Err(ApiError::new(
                405,
                Some("MethodNotAllowed"),
                format!("{method} is not allowed here"),
            ))
        }
    };
    match s.as_slice() {
        ["api", "whoami-v2"] => {
            allow(get)?;
            whoami(&ctx)
        }
        ["api", "repos", "create"] => {
            allow(post)?;
            ctx.need_write()?;
            create_repo(&ctx, rq)
        }
        ["api", p, org, name, rest @ ..] => {
            let kind = Kind::from_plural(p)?;
            let id = format!("{org}/{name}");
            match rest {
                [] => {
                    allow(get)?;
                    ctx.need_read()?;
                    info(&ctx, kind, &id, None)
                }
                ["revision", rev @ ..] if !rev.is_empty() => {
                    allow(get)?;
                    ctx.need_read()?;
                    info(&ctx, kind, &id, Some(&rev.join("/")))
                }
                ["refs"] => {
                    allow(get)?;
                    ctx.need_read()?;
                    refs(&ctx, &id)
                }
                ["tree", rev, path @ ..] => {
                    allow(get)?;
                    ctx.need_read()?;
                    tree(&ctx, &id, rev, &path.join("/"))
                }
                ["paths-info", rev] => {
                    allow(post)?;
                    ctx.need_read()?;
                    paths_info(&ctx, rq, &id, rev)
                }
                ["commits", rev] => {
                    allow(get)?;
                    ctx.need_read()?;
                    commits(&ctx, &id, rev)
                }
                ["preupload", rev] => {
                    allow(post)?;
                    ctx.need_write()?;
                    preupload(&ctx, rq, &id, rev)
                }
                ["commit", rev] => {
                    allow(post)?;
                    ctx.need_write()?;
                    commit(&ctx, rq, kind, &id, rev)
                }
                ["tag", rev] => {
                    allow(post || method == "DELETE")?;
                    ctx.need_write()?;
                    tag(&ctx, rq, &id, rev)
                }
                ["branch", branch] => {
                    allow(post || method == "DELETE")?;
                    ctx.need_write()?;
                    branch_route(&ctx, rq, &id, branch)
                }
                _ => Err(ApiError::not_found_route()),
            }
        }
        [p @ ("kernels" | "datasets" | "spaces"), org, name, "resolve", rev, path @ ..] if !path.is_empty() => {
            Kind::from_plural(p)?;
            allow(get)?;
            ctx.need_read()?;
            resolve(&ctx, rq, &format!("{org}/{name}"), rev, &path.join("/"))
        }
        [org, name, "resolve", rev, path @ ..] if !path.is_empty() => {
            allow(get)?;
            ctx.need_read()?;
            resolve(&ctx, rq, &format!("{org}/{name}"), rev, &path.join("/"))
        }
        _ => Err(ApiError::not_found_route()),
    }
}

// ---------------------------------------------------------------------------------------
// Repositories and revisions
// ---------------------------------------------------------------------------------------

struct Repo {
    id: RepoId,
    dir: PathBuf,
    releases: Vec<ReleaseDir>,
    refs: Refs,
}

impl Repo {
    /// The release at a branch, tag, `refs/heads/…`, `refs/tags/…` or 40-hex commit.
    fn release(&self, rev: &str) -> Result<&ReleaseDir, ApiError> {
        let commit = if rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit()) {
            Some(rev.to_ascii_lowercase())
        } else {
            let find = |list: &[crate::registry::GitRef], name: &str| list.iter().find(|r| r.name == name).map(|r| r.commit.clone());
            if let Some(b) = rev.strip_prefix("refs/heads/") {
                find(&self.refs.branches, b)
            } else if let Some(t) = rev.strip_prefix("refs/tags/") {
                find(&self.refs.tags, t)
            } else {
                find(&self.refs.branches, rev).or_else(|| find(&self.refs.tags, rev))
            }
        };
        commit.and_then(|c| self.releases.iter().find(|r| r.commit == c)).ok_or_else(|| {
            ApiError::new(
                404,
                Some("RevisionNotFound"),
                format!("Invalid rev id: {} (not a branch, tag or commit of {})", clip(rev), self.id),
            )
        })
    }
}

fn load_repo(ctx: &Ctx, id: &str) -> Result<Repo, ApiError> {
    let repo: RepoId = id.parse().map_err(|_| ApiError::repo_not_found(id))?;
    let root = &ctx.state.root;
    // The organisation and repository directories must be real directories: a symlink
    // there would lead outside the registry.
    for dir in [root.join(repo.org()), root.join(repo.org()).join(repo.name())] {
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            _ => return Err(ApiError::repo_not_found(id)),
        }
    }
    let (releases, _) = scan_repo(root, &repo)?;
    let refs = derive_refs(&releases);
    Ok(Repo {
        dir: crate::registry::dir::repo_dir(root, &repo),
        id: repo,
        releases,
        refs,
    })
}

fn rel_path(path: &str) -> Result<RelPath, ApiError> {
    RelPath::new(path).map_err(|e| ApiError::bad_request(format!("invalid path: {e}")))
}

fn entry_not_found(path: &str, release: &ReleaseDir, why: &str) -> ApiError {
    ApiError::new(
        404,
        Some("EntryNotFound"),
        format!("{} {why} at revision {}", clip(path), release.commit),
    )
    .with_header("X-Repo-Commit", release.commit.clone())
}

fn open_error(e: OpenError, path: &str, release: &ReleaseDir) -> ApiError {
    match e {
        OpenError::Missing { .. } => entry_not_found(path, release, "does not exist"),
        OpenError::NotRegular { what, .. } => entry_not_found(path, release, &format!("is not served: a component is {what}")),
        other => ApiError::internal(other.to_string()),
    }
}

/// A file or directory of a release.
struct Entry {
    path: String,
    dir: bool,
}

/// Lists `rel` (a directory, `""` for the root) of a release, sorted by name, directories
/// before their contents; symlinks, special files and names that are not valid paths are
/// skipped.
fn list_dir(base: &Path, rel: &str, recursive: bool, depth: usize, out: &mut Vec<Entry>) -> Result<(), ApiError> {
    let dir = if rel.is_empty() { base.to_owned() } else { base.join(rel) };
    let rd = std::fs::read_dir(&dir).map_err(|e| ApiError::internal(format!("listing {rel}: {e}")))?;
    let mut children = Vec::new();
    for e in rd {
        let e = e.map_err(|e| ApiError::internal(format!("listing {rel}: {e}")))?;
        let Ok(name) = e.file_name().into_string() else { continue };
        let Ok(ft) = e.file_type() else { continue };
        let path = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
        if RelPath::new(path.as_str()).is_err() {
            continue;
        }
        if ft.is_dir() {
            children.push((name, Entry { path, dir: true }));
        } else if ft.is_file() {
            children.push((name, Entry { path, dir: false }));
        }
    }
    children.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, entry) in children {
        if out.len() >= MAX_LISTED {
            return Err(ApiError::internal(format!("more than {MAX_LISTED} files in a release")));
        }
        let sub = (entry.dir && recursive && depth < MAX_DEPTH).then(|| entry.path.clone());
        out.push(entry);
        if let Some(sub) = sub {
            list_dir(base, &sub, true, depth + 1, out)?;
        }
    }
    Ok(())
}

/// The files of a release, recursively.
fn release_files(release: &ReleaseDir) -> Result<Vec<Entry>, ApiError> {
    let mut all = Vec::new();
    list_dir(&release.dir, "", true, 0, &mut all)?;
    all.retain(|e| !e.dir);
    Ok(all)
}

/// What `path` is in a release, checking every component and refusing symlinks.
enum Kindof {
    Missing,
    Dir,
    File,
    Other(&'static str),
}

fn kind_of(base: &Path, rel: &RelPath) -> Result<Kindof, ApiError> {
    let mut p = base.to_owned();
    let parts: Vec<&str> = rel.components().collect();
    for (i, part) in parts.iter().enumerate() {
        p.push(part);
        let m = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Kindof::Missing),
            Err(e) => return Err(ApiError::internal(format!("{rel}: {e}"))),
        };
        if m.file_type().is_symlink() {
            return Ok(Kindof::Other("a symlink"));
        }
        if i + 1 < parts.len() && !m.is_dir() {
            return Ok(Kindof::Missing);
        }
        if i + 1 == parts.len() {
            return Ok(if m.is_dir() {
                Kindof::Dir
            } else if m.is_file() {
                Kindof::File
            } else {
                Kindof::Other("not a regular file")
            });
        }
    }
    Ok(Kindof::Dir)
}

fn iso8601(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.000Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn release_date(release: &ReleaseDir) -> String {
    let t = std::fs::symlink_metadata(release.dir.join("khub.toml"))
        .and_then(|m| m.modified())
        .unwrap_or(UNIX_EPOCH);
    iso8601(t)
}

fn file_json(ctx: &Ctx, release: &ReleaseDir, path: &str, expand: bool) -> Result<Value, ApiError> {
    let rel = rel_path(path)?;
    let mut f = open_under(&release.dir, &rel).map_err(|e| open_error(e, path, release))?;
    let size = f.metadata().map_err(|e| ApiError::internal(format!("{path}: {e}")))?.len();
    let digest = hex::encode(
        ctx.state
            .digest(&release.dir.join(path), &mut f)
            .map_err(|e| ApiError::internal(format!("hashing {path}: {e}")))?,
    );
    let mut v = json!({
        "type": "file",
        "oid": digest,
        "size": size,
        "path": path,
        "lfs": { "oid": digest, "sha256": digest, "size": size, "pointerSize": LFS_POINTER_SIZE },
    });
    if expand {
        v["lastCommit"] = last_commit(release);
    }
    Ok(v)
}

fn dir_json(release: &ReleaseDir, path: &str, expand: bool) -> Value {
    let mut h = Sha256::new();
    h.update(b"khub-tree\0");
    h.update(release.commit.as_bytes());
    h.update(b"\0");
    h.update(path.as_bytes());
    let mut v = json!({ "type": "directory", "oid": hex::encode(&h.finalize()[..20]), "size": 0, "path": path });
    if expand {
        v["lastCommit"] = last_commit(release);
    }
    v
}

fn last_commit(release: &ReleaseDir) -> Value {
    json!({ "id": release.commit, "title": format!("release {}", release.version), "date": release_date(release) })
}

fn internal_id(repo: &RepoId) -> String {
    hex::encode(&Sha256::digest(format!("khub-repo\0{repo}").as_bytes())[..12])
}

// ---------------------------------------------------------------------------------------
// Read routes
// ---------------------------------------------------------------------------------------

fn whoami(ctx: &Ctx) -> Result<Reply, ApiError> {
    let role = match ctx.token {
        Token::Write => "write",
        Token::Read => "read",
        Token::None | Token::Invalid => {
            return Err(ApiError::new(
                401,
                Some("Unauthorized"),
                "Invalid credentials in Authorization header",
            ));
        }
    };
    Ok(Reply::json(
        200,
        &json!({
            "type": "user",
            "id": "khub",
            "name": "khub",
            "fullname": "khub serve",
            "orgs": [],
            "auth": { "type": "access_token", "accessToken": { "displayName": "khub serve", "role": role } },
        }),
    ))
}

fn info(ctx: &Ctx, kind: Kind, id: &str, rev: Option<&str>) -> Result<Reply, ApiError> {
    let repo = load_repo(ctx, id)?;
    let release = match rev {
        Some(rev) => Some(repo.release(rev)?),
        None => repo.release("main").ok(),
    };
    let blobs = ctx.flag("blobs");
    let mut siblings = Vec::new();
    let mut families = BTreeSet::new();
    if let Some(release) = release {
        for e in release_files(release)? {
            if blobs {
                let f = file_json(ctx, release, &e.path, false)?;
                let digest = f["oid"].clone();
                siblings.push(json!({
                    "rfilename": e.path, "size": f["size"], "blobId": digest,
                    "lfs": { "sha256": digest, "size": f["size"], "pointerSize": LFS_POINTER_SIZE },
                }));
            } else {
                siblings.push(json!({ "rfilename": e.path }));
            }
        }
        if let Ok(m) = Manifest::from_bytes(&release.manifest_bytes) {
            for v in &m.variants {
                if let Ok(Value::String(b)) = serde_json::to_value(v.backend) {
                    families.insert(b);
                }
            }
        }
    }
    let date = release.map(release_date);
    Ok(Reply::json(
        200,
        &json!({
            "_id": internal_id(&repo.id),
            "id": repo.id.to_string(),
            "modelId": repo.id.to_string(),
            "author": repo.id.org(),
            "sha": release.map(|r| r.commit.clone()),
            "lastModified": date,
            "createdAt": date,
            "private": false,
            "gated": false,
            "disabled": false,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "library_name": "kernels",
            "siblings": siblings,
            "spaces": [],
            "trustedPublisher": false,
            "supportedDriverFamilies": families,
            "repoType": match kind { Kind::Model => "model", Kind::Kernel => "kernel" },
        }),
    ))
}

fn refs(ctx: &Ctx, id: &str) -> Result<Reply, ApiError> {
    let repo = load_repo(ctx, id)?;
    let list = |refs: &[crate::registry::GitRef], kind: &str| -> Vec<Value> {
        refs.iter()
            .map(|r| json!({ "name": r.name, "ref": format!("refs/{kind}/{}", r.name), "targetCommit": r.commit }))
            .collect()
    };
    Ok(Reply::json(
        200,
        &json!({
            "branches": list(&repo.refs.branches, "heads"),
            "tags": list(&repo.refs.tags, "tags"),
            "converts": [],
            "pullRequests": [],
        }),
    ))
}

fn tree(ctx: &Ctx, id: &str, rev: &str, path: &str) -> Result<Reply, ApiError> {
    let repo = load_repo(ctx, id)?;
    let release = repo.release(rev)?;
    let path = path.trim_end_matches('/');
    if !path.is_empty() {
        let rel = rel_path(path)?;
        match kind_of(&release.dir, &rel)? {
            Kindof::Dir => {}
            Kindof::Missing | Kindof::File => return Err(entry_not_found(path, release, "is not a directory")),
            Kindof::Other(what) => return Err(entry_not_found(path, release, &format!("is not served: it is {what}"))),
        }
    }
    let recursive = ctx.flag("recursive");
    let expand = ctx.flag("expand");
    let mut entries = Vec::new();
    list_dir(&release.dir, path, recursive, 0, &mut entries)?;
    let offset = match ctx.param("cursor") {
        None | Some("") => 0,
        Some(c) => c.parse::<usize>().map_err(|_| ApiError::bad_request("invalid cursor"))?,
    };
    let mut page = ctx.state.options.page_size.max(1);
    if let Some(l) = ctx.param("limit").and_then(|l| l.parse::<usize>().ok()).filter(|&l| l > 0) {
        page = page.min(l);
    }
    let end = offset.saturating_add(page).min(entries.len());
    let mut out = Vec::new();
    for e in entries.get(offset..end).unwrap_or_default() {
        out.push(if e.dir {
            dir_json(release, &e.path, expand)
        } else {
            file_json(ctx, release, &e.path, expand)?
        });
    }
    let mut reply = Reply::json(200, &Value::Array(out));
    if end < entries.len() {
        let mut q: Vec<&str> = ctx
            .raw_query
            .split('&')
            .filter(|p| !p.is_empty() && !p.starts_with("cursor="))
            .collect();
        let cursor = format!("cursor={end}");
        q.push(&cursor);
        reply = reply.header("Link", format!("<{}{}?{}>; rel=\"next\"", ctx.base, ctx.raw_path, q.join("&")));
    }
    Ok(reply)
}

fn paths_info(ctx: &Ctx, rq: &mut tiny_http::Request, id: &str, rev: &str) -> Result<Reply, ApiError> {
    let body = read_body(rq, MAX_JSON_BYTES)?;
    let form = header(rq, "Content-Type").is_some_and(|t| t.starts_with("application/x-www-form-urlencoded"));
    let (paths, expand) = if form {
        let text = String::from_utf8(body).map_err(|_| ApiError::bad_request("the form is not UTF-8"))?;
        let mut paths = Vec::new();
        let mut expand = false;
        for p in text.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let k = percent_decode(k, true).and_then(|k| String::from_utf8(k).ok());
            let v = percent_decode(v, true).and_then(|v| String::from_utf8(v).ok());
            match (k.as_deref(), v) {
                (Some("paths"), Some(v)) => paths.push(v),
                (Some("expand"), Some(v)) => expand = matches!(v.as_str(), "1" | "true" | "True"),
                _ => {}
            }
        }
        (paths, expand)
    } else {
        #[derive(Deserialize)]
        struct Req {
            #[serde(default)]
            paths: Vec<String>,
            #[serde(default)]
            expand: bool,
        }
        let r: Req = serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))?;
        (r.paths, r.expand)
    };
    let repo = load_repo(ctx, id)?;
    let release = repo.release(rev)?;
    let mut out = Vec::new();
    for p in paths.iter().take(10_000) {
        let p = p.trim_matches('/');
        let Ok(rel) = RelPath::new(p) else { continue };
        match kind_of(&release.dir, &rel)? {
            Kindof::Dir => out.push(dir_json(release, p, expand)),
            Kindof::File => out.push(file_json(ctx, release, p, expand)?),
            Kindof::Missing | Kindof::Other(_) => {}
        }
    }
    Ok(Reply::json(200, &Value::Array(out)))
}

fn commits(ctx: &Ctx, id: &str, rev: &str) -> Result<Reply, ApiError> {
    let repo = load_repo(ctx, id)?;
    let release = repo.release(rev)?;
    let title = format!("release {}", release.version);
    Ok(Reply::json(
        200,
        &json!([{
            "id": release.commit,
            "title": title,
            "message": "",
            "authors": [{ "user": "khub" }],
            "date": release_date(release),
            "parents": [],
        }]),
    ))
}

/// A `Range` request, resolved against the file size.
#[derive(Debug, PartialEq, Eq)]
enum ByteRange {
    Full,
    /// Inclusive bounds.
    Part(u64, u64),
    Unsatisfiable,
}

fn parse_range(h: Option<&str>, size: u64) -> ByteRange {
    let Some(h) = h else { return ByteRange::Full };
    let h = h.trim();
    let Some(spec) = h.get(..6).filter(|u| u.eq_ignore_ascii_case("bytes=")).map(|_| &h[6..]) else {
        return ByteRange::Full;
    };
    // Several ranges would need a multipart answer; RFC 9110 lets a server ignore Range.
    if spec.contains(',') {
        return ByteRange::Full;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return ByteRange::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| {
        if !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) {
            s.parse::<u64>().ok()
        } else {
            None
        }
    };
    if a.is_empty() {
        let Some(n) = num(b) else { return ByteRange::Full };
        if n == 0 || size == 0 {
            return ByteRange::Unsatisfiable;
        }
        return ByteRange::Part(size - n.min(size), size - 1);
    }
    let Some(start) = num(a) else { return ByteRange::Full };
    let end = if b.is_empty() {
        u64::MAX
    } else {
        match num(b) {
            Some(e) => e,
            None => return ByteRange::Full,
        }
    };
    if end < start {
        return ByteRange::Full;
    }
    if start >= size {
        return ByteRange::Unsatisfiable;
    }
    ByteRange::Part(start, end.min(size - 1))
}

fn resolve(ctx: &Ctx, rq: &tiny_http::Request, id: &str, rev: &str, path: &str) -> Result<Reply, ApiError> {
    let repo = load_repo(ctx, id)?;
    let release = repo.release(rev)?;
    let rel = rel_path(path).map_err(|e| e.with_header("X-Repo-Commit", release.commit.clone()))?;
    let mut f = open_under(&release.dir, &rel).map_err(|e| open_error(e, path, release))?;
    let size = f.metadata().map_err(|e| ApiError::internal(format!("{path}: {e}")))?.len();
    let digest = hex::encode(
        ctx.state
            .digest(&release.dir.join(rel.as_str()), &mut f)
            .map_err(|e| ApiError::internal(format!("hashing {path}: {e}")))?,
    );
    let etag = format!("\"{digest}\"");
    let common = |r: Reply| {
        r.header("ETag", etag.clone())
            .header("X-Linked-Etag", etag.clone())
            .header("X-Linked-Size", size.to_string())
            .header("X-Repo-Commit", release.commit.clone())
            .header("Accept-Ranges", "bytes")
    };
    let range = if ctx.method == "GET" || ctx.method == "HEAD" {
        parse_range(header(rq, "Range"), size)
    } else {
        ByteRange::Full
    };
    match range {
        ByteRange::Full => Ok(common(Reply {
            status: 200,
            headers: vec![("Content-Type", "application/octet-stream".into())],
            body: Body::File(f, size),
        })),
        ByteRange::Part(a, b) => {
            f.seek(SeekFrom::Start(a)).map_err(|e| ApiError::internal(format!("{path}: {e}")))?;
            Ok(common(Reply {
                status: 206,
                headers: vec![
                    ("Content-Type", "application/octet-stream".into()),
                    ("Content-Range", format!("bytes {a}-{b}/{size}")),
                ],
                body: Body::File(f, b - a + 1),
            }))
        }
        ByteRange::Unsatisfiable => Err(ApiError::new(
            416,
            Some("RangeNotSatisfiable"),
            format!("the range is outside the file ({size} bytes)"),
        )
        .with_header("Content-Range", format!("bytes */{size}"))
        .with_header("X-Repo-Commit", release.commit.clone())),
    }
}

// ---------------------------------------------------------------------------------------
// Write routes
// ---------------------------------------------------------------------------------------

fn read_body(rq: &mut tiny_http::Request, limit: u64) -> Result<Vec<u8>, ApiError> {
    if rq.body_length().is_some_and(|n| n as u64 > limit) {
        return Err(ApiError::too_large(limit));
    }
    let mut buf = Vec::new();
    rq.as_reader()
        .take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?;
    if buf.len() as u64 > limit {
        return Err(ApiError::too_large(limit));
    }
    Ok(buf)
}

fn read_json<T: for<'de> Deserialize<'de>>(rq: &mut tiny_http::Request) -> Result<T, ApiError> {
    let body = read_body(rq, MAX_JSON_BYTES)?;
    serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))
}

fn create_repo(ctx: &Ctx, rq: &mut tiny_http::Request) -> Result<Reply, ApiError> {
    #[derive(Deserialize)]
    struct Req {
        name: String,
        #[serde(default)]
        organization: Option<String>,
        #[serde(default, rename = "type")]
        kind: Option<String>,
    }
    let r: Req = read_json(rq)?;
    let kind = match r.kind.as_deref() {
        None | Some("model") => Kind::Model,
        Some("kernel") => Kind::Kernel,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "this server hosts models and kernels only, not {}",
                clip(other)
            )));
        }
    };
    let id = match (r.organization.as_deref(), r.name.contains('/')) {
        (Some(org), false) => format!("{org}/{}", r.name),
        (None, true) => r.name.clone(),
        (Some(org), true) if r.name.starts_with(&format!("{org}/")) => r.name.clone(),
        (None, false) => {
            return Err(ApiError::bad_request(
                "give the repository as org/name (this server has no user namespace)",
            ));
        }
        (Some(_), true) => return Err(ApiError::bad_request("`name` and `organization` disagree")),
    };
    let repo: RepoId = id
        .parse()
        .map_err(|e: crate::registry::RepoIdError| ApiError::bad_request(e.to_string()))?;
    let url = ctx.repo_url(kind, &repo);
    let org_dir = ctx.state.root.join(repo.org());
    match std::fs::symlink_metadata(&org_dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(ApiError::internal(format!("{} is not a directory", org_dir.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => match std::fs::create_dir(&org_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(ApiError::internal(format!("creating {}: {e}", org_dir.display()))),
        },
        Err(e) => return Err(ApiError::internal(format!("{}: {e}", org_dir.display()))),
    }
    match std::fs::create_dir(org_dir.join(repo.name())) {
        Ok(()) => Ok(Reply::json(
            200,
            &json!({ "url": url, "name": repo.to_string(), "id": repo.to_string() }),
        )),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let mut err = ApiError::new(409, Some("RepoExists"), "You already created this repo");
            err.body = Some(json!({ "error": "You already created this repo", "url": url }));
            Err(err)
        }
        Err(e) => Err(ApiError::internal(format!("creating {repo}: {e}"))),
    }
}

fn preupload(ctx: &Ctx, rq: &mut tiny_http::Request, id: &str, rev: &str) -> Result<Reply, ApiError> {
    #[derive(Deserialize)]
    struct File {
        path: String,
    }
    #[derive(Deserialize)]
    struct Req {
        #[serde(default)]
        files: Vec<File>,
    }
    let r: Req = read_json(rq)?;
    load_repo(ctx, id)?;
    commit_branch(rev)?;
    let mut out = Vec::new();
    for f in r.files {
        rel_path(&f.path)?;
        out.push(json!({ "path": f.path, "uploadMode": "regular", "shouldIgnore": false }));
    }
    Ok(Reply::json(200, &json!({ "files": out, "commitOid": null })))
}

/// The branch a commit may target: `main`, or `v<major>` (`Some(major)`).
fn commit_branch(rev: &str) -> Result<Option<u64>, ApiError> {
    let b = rev.strip_prefix("refs/heads/").unwrap_or(rev);
    if b == "main" {
        return Ok(None);
    }
    if let Some(n) = b
        .strip_prefix('v')
        .filter(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()))
        .and_then(|n| n.parse().ok())
    {
        return Ok(Some(n));
    }
    Err(ApiError::bad_request(format!(
        "commit to `main` or to `v<major>`, not `{}`: each commit creates one release, and refs are derived from the releases",
        clip(rev)
    )))
}

#[derive(Deserialize)]
struct CommitLine {
    key: String,
    #[serde(default)]
    value: Value,
}

fn commit(ctx: &Ctx, rq: &mut tiny_http::Request, kind: Kind, id: &str, rev: &str) -> Result<Reply, ApiError> {
    if ctx.flag("create_pr") {
        return Err(ApiError::bad_request(
            "pull requests are not supported: commit a new release instead",
        ));
    }
    let repo = load_repo(ctx, id)?;
    let major = commit_branch(rev)?;
    if rq.body_length().is_some_and(|n| n as u64 > MAX_COMMIT_BYTES) {
        return Err(ApiError::too_large(MAX_COMMIT_BYTES));
    }
    let staging = tempfile::Builder::new()
        .prefix(".staging-")
        .tempdir_in(&repo.dir)
        .map_err(|e| ApiError::internal(format!("creating a staging directory: {e}")))?;
    let mut reader = BufReader::with_capacity(256 * 1024, rq.as_reader().take(MAX_COMMIT_BYTES + 1));
    let mut total = 0u64;
    let mut files: BTreeMap<String, (u64, Sha256Digest)> = BTreeMap::new();
    let mut dirs: BTreeSet<String> = BTreeSet::new();
    let mut manifest_bytes = None;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| ApiError::bad_request(format!("reading the commit: {e}")))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > MAX_COMMIT_BYTES {
            return Err(ApiError::too_large(MAX_COMMIT_BYTES));
        }
        let text = line.trim_ascii();
        if text.is_empty() {
            continue;
        }
        let op: CommitLine = serde_json::from_slice(text).map_err(|e| ApiError::bad_request(format!("invalid NDJSON line: {e}")))?;
        let str_field = |name: &str| op.value.get(name).and_then(Value::as_str);
        match op.key.as_str() {
            "header" => {}
            "file" => {
                let path = str_field("path").ok_or_else(|| ApiError::bad_request("a file operation has no `path`"))?;
                let rel = rel_path(path)?;
                let content =
                    str_field("content").ok_or_else(|| ApiError::bad_request(format!("file `{}` has no `content`", clip(path))))?;
                let bytes = match str_field("encoding").unwrap_or("utf-8") {
                    "base64" => base64::engine::general_purpose::STANDARD
                        .decode(content)
                        .map_err(|e| ApiError::bad_request(format!("file `{}`: invalid base64: {e}", clip(path))))?,
                    "utf-8" | "utf8" => content.as_bytes().to_vec(),
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "file `{}`: unknown encoding `{}`",
                            clip(path),
                            clip(other)
                        )));
                    }
                };
                stage_file(staging.path(), &rel, &bytes, &mut files, &mut dirs)?;
                if rel.as_str() == "khub.toml" {
                    manifest_bytes = Some(bytes);
                }
            }
            "deletedFile" | "deletedFolder" => {
                return Err(ApiError::bad_request(
                    "releases are immutable: a commit cannot delete files (each commit creates a new release directory)",
                ));
            }
            "lfsFile" => {
                return Err(ApiError::bad_request(
                    "this server only accepts regular uploads (files inline in the commit, base64), not LFS; it answers `regular` to preupload",
                ));
            }
            other => return Err(ApiError::bad_request(format!("unknown commit operation `{}`", clip(other)))),
        }
    }
    let manifest_bytes = manifest_bytes.ok_or_else(|| ApiError::bad_request("a release commit must include khub.toml"))?;
    if manifest_bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(ApiError::bad_request(format!(
            "khub.toml is larger than {MAX_MANIFEST_BYTES} bytes"
        )));
    }
    let manifest = Manifest::from_bytes(&manifest_bytes).map_err(|e| ApiError::bad_request(format!("khub.toml: {e}")))?;
    for v in &manifest.variants {
        for f in &v.files {
            match files.get(f.path.as_str()) {
                None => {
                    return Err(ApiError::bad_request(format!(
                        "khub.toml lists `{}` but the commit does not include it",
                        f.path
                    )));
                }
                Some((size, digest)) if *size != f.size || *digest != f.sha256 => {
                    return Err(ApiError::bad_request(format!(
                        "`{}` is {size} bytes with sha256 {digest}, but khub.toml says {} bytes with sha256 {}",
                        f.path, f.size, f.sha256
                    )));
                }
                Some(_) => {}
            }
        }
    }
    let version = manifest.kernel.version.clone();
    if let Some(n) = major
        && version.major != n
    {
        return Err(ApiError::bad_request(format!(
            "release {version} cannot be committed to branch v{n}"
        )));
    }
    let target = repo.dir.join(version.to_string());
    let exists = || {
        ApiError::new(
            409,
            Some("ReleaseExists"),
            format!(
                "release {version} of {} already exists: releases are immutable, publish a new version",
                repo.id
            ),
        )
    };
    {
        let _guard = lock(&ctx.state.commit_lock);
        if std::fs::symlink_metadata(&target).is_ok() {
            return Err(exists());
        }
        if let Err(e) = std::fs::rename(staging.path(), &target) {
            if std::fs::symlink_metadata(&target).is_ok() {
                return Err(exists());
            }
            return Err(ApiError::internal(format!("moving the release into place: {e}")));
        }
    }
    // The directory is now the release: do not let the guard delete it.
    let _ = staging.keep();
    let oid = commit_id(&manifest_bytes);
    Ok(Reply::json(
        200,
        &json!({
            "success": true,
            "commitUrl": format!("{}/commit/{oid}", ctx.repo_url(kind, &repo.id)),
            "commitOid": oid,
            "commitMessage": format!("release {version}"),
            "pullRequestUrl": null,
        }),
    ))
}

/// Writes one file of a commit into the staging directory, refusing a path that is both a
/// file and a directory.
fn stage_file(
    staging: &Path,
    rel: &RelPath,
    bytes: &[u8],
    files: &mut BTreeMap<String, (u64, Sha256Digest)>,
    dirs: &mut BTreeSet<String>,
) -> Result<(), ApiError> {
    let path = rel.as_str();
    let parts: Vec<&str> = rel.components().collect();
    let conflict = || ApiError::bad_request(format!("`{path}` is both a file and a directory in this commit"));
    if dirs.contains(path) {
        return Err(conflict());
    }
    for i in 1..parts.len() {
        let prefix = parts[..i].join("/");
        if files.contains_key(&prefix) {
            return Err(conflict());
        }
        dirs.insert(prefix);
    }
    let dest = staging.join(path);
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| ApiError::internal(format!("staging `{path}`: {e}")))?;
    }
    crate::fsx::write_durable_new(&dest, bytes).map_err(|e| ApiError::internal(format!("staging `{path}`: {e}")))?;
    files.insert(path.to_owned(), (bytes.len() as u64, crate::verify::sha256(bytes)));
    Ok(())
}

fn tag(ctx: &Ctx, rq: &mut tiny_http::Request, id: &str, rev: &str) -> Result<Reply, ApiError> {
    let derived = |m: String| {
        ApiError::new(
            409,
            Some("DerivedRefs"),
            format!("{m}: tags are derived from release directories (v<version>)"),
        )
    };
    if ctx.method == "DELETE" {
        load_repo(ctx, id)?;
        return Err(derived(format!("cannot delete tag `{}`", clip(rev))));
    }
    #[derive(Deserialize)]
    struct Req {
        tag: String,
    }
    let r: Req = read_json(rq)?;
    let repo = load_repo(ctx, id)?;
    let release = repo.release(rev)?;
    let expected = format!("v{}", release.version);
    if r.tag == expected {
        Ok(Reply::json(
            200,
            &json!({ "name": expected, "ref": format!("refs/tags/{expected}"), "targetCommit": release.commit }),
        ))
    } else {
        Err(derived(format!("the tag of {} is `{expected}`, not `{}`", clip(rev), clip(&r.tag))))
    }
}

fn branch_route(ctx: &Ctx, rq: &mut tiny_http::Request, id: &str, branch: &str) -> Result<Reply, ApiError> {
    let derived = |m: String| {
        ApiError::new(
            409,
            Some("DerivedRefs"),
            format!("{m}: branches are derived from release directories (main and v<major>)"),
        )
    };
    if ctx.method == "DELETE" {
        load_repo(ctx, id)?;
        return Err(derived(format!("cannot delete branch `{}`", clip(branch))));
    }
    #[derive(Deserialize, Default)]
    struct Req {
        #[serde(default, rename = "startingPoint")]
        starting_point: Option<String>,
    }
    let body = read_body(rq, MAX_JSON_BYTES)?;
    let r: Req = if body.trim_ascii().is_empty() {
        Req::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))?
    };
    let repo = load_repo(ctx, id)?;
    commit_branch(branch).map_err(|_| derived(format!("`{}` cannot be created", clip(branch))))?;
    let name = branch.strip_prefix("refs/heads/").unwrap_or(branch);
    let current = repo.refs.branches.iter().find(|b| b.name == name).map(|b| b.commit.clone());
    let target = match r.starting_point.as_deref() {
        Some(sp) => Some(repo.release(sp)?),
        None => None,
    };
    match (current, target) {
        (Some(cur), Some(t)) if cur != t.commit => Err(derived(format!("`{name}` points at {cur}, not at {}", t.commit))),
        (None, Some(t)) => Err(derived(format!(
            "`{name}` has no release yet, so it cannot point at release {}",
            t.version
        ))),
        (cur, _) => Ok(Reply::json(
            200,
            &json!({ "name": name, "ref": format!("refs/heads/{name}"), "targetCommit": cur }),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_parsed() {
        assert_eq!(parse_range(None, 10), ByteRange::Full);
        assert_eq!(parse_range(Some("bytes=0-3"), 10), ByteRange::Part(0, 3));
        assert_eq!(parse_range(Some("bytes=5-"), 10), ByteRange::Part(5, 9));
        assert_eq!(parse_range(Some("bytes=-4"), 10), ByteRange::Part(6, 9));
        assert_eq!(parse_range(Some("bytes=-40"), 10), ByteRange::Part(0, 9));
        assert_eq!(parse_range(Some("bytes=2-400"), 10), ByteRange::Part(2, 9));
        assert_eq!(parse_range(Some("bytes=10-"), 10), ByteRange::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), ByteRange::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-"), 0), ByteRange::Unsatisfiable);
        for ignored in ["bytes=3-1", "bytes=a-b", "items=0-1", "bytes=0-1,3-4", "bytes=+1-2", "bytes"] {
            assert_eq!(parse_range(Some(ignored), 10), ByteRange::Full, "{ignored}");
        }
    }

    #[test]
    fn dates_are_iso() {
        assert_eq!(iso8601(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            iso8601(UNIX_EPOCH + std::time::Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(
            iso8601(UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000)),
            "2023-11-14T22:13:20.000Z"
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("refs%2Fpr%2F1", false).unwrap(), b"refs/pr/1");
        assert_eq!(percent_decode("a+b", true).unwrap(), b"a b");
        assert_eq!(percent_decode("a+b", false).unwrap(), b"a+b");
        assert!(percent_decode("%zz", false).is_none());
        assert!(percent_decode("%4", false).is_none());
    }

    #[test]
    fn tokens_compare() {
        assert!(token_eq("abc", "abc"));
        assert!(!token_eq("abc", "abd"));
        assert!(!token_eq("", "abc"));
    }
}
