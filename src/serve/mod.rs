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
//! | `GET /api/{models,kernels}?author=&search=` | the repositories, paginated with `Link` |
//! | `POST /api/validate-yaml` | checks a README's front matter before an upload |
//!
//! Releases are immutable: a commit must carry a valid `khub.toml` naming a version that
//! does not exist yet, and every file that manifest lists, with the listed size and digest.
//! The server parses the commit; [`crate::registry::dir::commit_release`] writes it: the
//! files are staged (and synced) in a hidden directory inside the repository and renamed
//! into place in one step, so readers never see half a release, and a failed commit leaves
//! nothing behind.
//!
//! The stack is hyper (HTTP/1.1 connections: parsing, keep-alive, `Connection: close`,
//! the header size limit) under axum's router, on tokio. khub's own code is the route
//! table, the Hub's wire format and the registry logic, and the limits hyper and axum do
//! not have: the connection cap, the per-connection deadlines, the rate per client address
//! and the accept loop that backs off when file descriptors run out instead of exiting.
//!
//! The modules: `app` (the accept loop, connections, the router, dispatch to handlers),
//! `limits` ([`Limits`], the rate limiter, connection deadlines), `routes` (the route table
//! and request context), `auth` (tokens), `http` (replies, errors, request input, ranges),
//! `read` and `write` (the handlers; they run on tokio's blocking pool), and the hidden
//! `fuzz` (one raw request through a connection in memory, for `fuzz/`).
//!
//! Every file is opened with `fsx::open_under`: nothing outside a release
//! directory, and no symlink, is ever served.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

pub use self::limits::{Limits, parse_bytes};

mod app;
mod auth;
#[doc(hidden)]
pub mod fuzz;
mod http;
mod limits;
mod read;
mod routes;
mod write;

/// How many requests the in-memory log keeps.
const LOG_CAP: usize = 10_000;
/// How much of a request's method and target the in-memory log keeps, in bytes: a client
/// may send targets of 64 KiB, and the log lives as long as the server.
const LOG_TEXT_CAP: usize = 1024;
/// How many digests the cache keeps before it starts over.
const DIGEST_CACHE_CAP: usize = 100_000;

/// How a server runs.
#[derive(Clone)]
pub struct ServeOptions {
    /// When set, every read needs this token or the write token (`Authorization: Bearer`).
    pub read_token: Option<String>,
    /// The token that allows writes. Without one, the server is read-only.
    pub write_token: Option<String>,
    /// Threads answering connections (default 4; 0 means 1). File-system work runs on a
    /// separate pool of blocking threads.
    pub threads: usize,
    /// The most entries one page of a tree listing holds (default 1000; 0 means 1).
    pub page_size: usize,
    /// What clients may ask of the server.
    pub limits: Limits,
    /// One line of JSON on stderr per request: method, path, status, bytes, milliseconds,
    /// client (default off; `KHUB_SERVE_LOG=1` turns it on too).
    pub access_log: bool,
    /// Shut down gracefully on SIGTERM and SIGINT (`khub serve` sets it): [`Server::wait`]
    /// then returns once the requests in flight are answered.
    pub handle_signals: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            read_token: None,
            write_token: None,
            threads: 4,
            page_size: 1000,
            limits: Limits::default(),
            access_log: false,
            handle_signals: false,
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
            .field("limits", &self.limits)
            .field("access_log", &self.access_log)
            .field("handle_signals", &self.handle_signals)
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
    /// The runtime or a server thread could not be started.
    #[error("cannot start a server thread: {0}")]
    Thread(#[source] io::Error),
    /// A limit's setting does not parse.
    #[error("{name}={value:?}: expected {expected}")]
    Setting {
        /// The variable or flag.
        name: String,
        /// Its value.
        value: String,
        /// The form expected.
        expected: &'static str,
    },
}

/// One answered request, as kept in the server's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// The method (`GET`, `HEAD`, …).
    pub method: String,
    /// The request target: path and query, still percent-encoded.
    pub path: String,
    /// The status answered.
    pub status: u16,
}

/// A running server. It stops when [`Server::stop`] is called or when it is dropped.
///
/// The server runs on its own tokio runtime, on a thread of its own; this handle is
/// synchronous.
pub struct Server {
    state: Arc<State>,
    addr: SocketAddr,
    shutdown: CancellationToken,
    thread: Option<JoinHandle<()>>,
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
        for (name, token) in [("read-token", &options.read_token), ("write-token", &options.write_token)] {
            if token.as_deref().is_some_and(|t| t.trim().is_empty()) {
                return Err(ServeError::Setting {
                    name: name.to_owned(),
                    value: token.clone().unwrap_or_default(),
                    expected: "a non-empty token (is the variable it was read from unset?); leave the option out for no token",
                });
            }
        }
        let root = canonical_root(root)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(options.threads.max(1))
            .max_blocking_threads(256)
            .thread_name("khub-serve")
            .enable_all()
            .build()
            .map_err(ServeError::Thread)?;
        let listener = {
            let _in_runtime = runtime.enter();
            app::listen(addr)?
        };
        let local = listener.local_addr().map_err(|e| ServeError::Bind {
            addr: addr.to_owned(),
            message: e.to_string(),
        })?;
        let signals = if options.handle_signals {
            let _in_runtime = runtime.enter();
            Some(app::Signals::new().map_err(ServeError::Thread)?)
        } else {
            None
        };
        let state = Arc::new(State::new(root, options, local));
        let shutdown = CancellationToken::new();
        let thread = {
            let state = Arc::clone(&state);
            let shutdown = shutdown.clone();
            std::thread::Builder::new()
                .name("khub-serve-main".into())
                .spawn(move || {
                    runtime.block_on(app::run(listener, state, shutdown, signals));
                    // Handlers still running on the blocking pool (a commit being written)
                    // finish on their own; they are not waited for here.
                    runtime.shutdown_background();
                })
                .map_err(ServeError::Thread)?
        };
        Ok(Server {
            state,
            addr: local,
            shutdown,
            thread: Some(thread),
        })
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

    /// How many connections the server has accepted: a test of an offline mode can check
    /// that it stays put.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Stops the server: the port is closed, idle connections are closed, and requests in
    /// flight are answered (for at most [`Limits::shutdown_grace`]) before this returns.
    pub fn stop(self) {
        drop(self);
    }

    /// Serves until the server is stopped: by a signal with
    /// [`ServeOptions::handle_signals`], else until the process ends.
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The registry directory `root`, canonical; an error when it is not a directory.
fn canonical_root(root: &Path) -> Result<PathBuf, ServeError> {
    let canonical = root.canonicalize().map_err(|source| ServeError::Root {
        root: root.to_owned(),
        source,
    })?;
    if !canonical.is_dir() {
        return Err(ServeError::Root {
            root: canonical,
            source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    Ok(canonical)
}

/// Locks a mutex, ignoring poisoning: every structure behind one stays valid.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type DigestKey = (PathBuf, u64, Option<SystemTime>);

struct State {
    root: PathBuf,
    options: ServeOptions,
    /// The limits in force ([`Limits::effective`]).
    limits: Limits,
    rate: limits::RateLimiter,
    addr: SocketAddr,
    log: Mutex<VecDeque<RequestRecord>>,
    connections: AtomicU64,
    /// Handlers running on the blocking pool (the fuzz entry point waits for them: a
    /// handler may outlive its connection).
    handlers: AtomicU64,
    digests: Mutex<HashMap<DigestKey, [u8; 32]>>,
    access_log: bool,
}

impl State {
    /// The state of a server of the registry at `root` (canonical) listening on `addr`.
    fn new(root: PathBuf, options: ServeOptions, addr: SocketAddr) -> State {
        let limits = options.limits.effective();
        let access_log = options.access_log || crate::env::var_os(crate::env::KHUB_SERVE_LOG).is_some_and(|v| v == "1");
        State {
            root,
            rate: limits::RateLimiter::new(&limits),
            limits,
            options,
            addr,
            log: Mutex::new(VecDeque::new()),
            connections: AtomicU64::new(0),
            handlers: AtomicU64::new(0),
            digests: Mutex::new(HashMap::new()),
            access_log,
        }
    }

    fn record(&self, method: &str, path: &str, status: u16) {
        let mut log = lock(&self.log);
        if log.len() >= LOG_CAP {
            log.pop_front();
        }
        log.push_back(RequestRecord {
            method: clip_bytes(method, LOG_TEXT_CAP),
            path: clip_bytes(path, LOG_TEXT_CAP),
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

/// At most `max` bytes of `s`, cut at a character boundary, with `…` when cut.
fn clip_bytes(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", s.get(..end).unwrap_or_default())
}
