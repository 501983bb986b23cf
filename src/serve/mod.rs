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
//! The server parses the commit; [`crate::registry::dir::commit_release`] writes it: the
//! files are staged (and synced) in a hidden directory inside the repository and renamed
//! into place in one step, so readers never see half a release, and a failed commit leaves
//! nothing behind.
//!
//! The modules: `routes` (the route table and request context), `auth` (tokens), `http`
//! (replies, errors, request bodies, ranges), `read` and `write` (the handlers).
//!
//! Every file is opened with `fsx::open_under`: nothing outside a release
//! directory, and no symlink, is ever served.
//!
//! The server closes every connection after one response, so stopping it leaves no
//! kept-alive connection behind that a client could hang on.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::SystemTime;

use self::http::{ApiError, drain, write_reply};

mod auth;
mod http;
mod read;
mod routes;
mod write;

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
        format!("http://{}", self.local_addr())
    }

    /// The address to connect to: the one listened on, with loopback for "any address".
    fn local_addr(&self) -> SocketAddr {
        let mut a = self.addr;
        if a.ip().is_unspecified() {
            a.set_ip(if a.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        a
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
        let probe = self.local_addr();
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
    let reply = match catch_unwind(AssertUnwindSafe(|| routes::route(state, &mut rq, &method, &url))) {
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
