//! The fuzz entry point (the `serve_request` target of `fuzz/`): one raw HTTP/1.1 request,
//! as bytes, through the code a real connection runs, in memory.
//!
//! [`handle_bytes`] writes the bytes into one end of a [`tokio::io::duplex`] stream, closes
//! that end's writing side, and reads the answer; the other end is served by the server's
//! own connection code: hyper's HTTP/1.1 connection with the default [`Limits`] (the header
//! limit included) and khub's deadlines, the request wrapper (log, `Connection: close` after
//! a refused body), axum's router and the handlers on the blocking pool. What differs from a
//! socket the server accepted:
//!
//! - the client closes its side once the bytes are sent, so the connection answers the
//!   request in flight before closing ([`HalfClose::Answers`]) rather than abandoning it, and
//!   an incomplete head or body ends at once instead of at a deadline;
//! - the rate limit is off (the fuzzer is one client sending thousands of requests a second);
//! - tree listings have 2 entries a page, so that paging is reached with a small registry;
//! - the runtime is a current-thread one, created once per process.
//!
//! Not part of khub's API: hidden from the documentation, and free to change.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use super::app::{self, HalfClose};
use super::{Limits, ServeError, ServeOptions, State, canonical_root, lock};

/// The server's write token: a request with `Authorization: Bearer` and this token may
/// create repositories and commit releases. There is no read token: anyone reads.
pub const WRITE_TOKEN: &str = "hf_khubFuzzWriteToken0123456789";

/// The longest one request may take, from its first byte to the connection's end and the
/// end of its handler.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The address the server says it listens on, and the client's.
const SERVER_ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
const PEER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 40000);

/// The in-memory stream's buffer, each way.
const DUPLEX_BUFFER: usize = 64 << 10;

/// The fuzz entry point could not run a request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FuzzError {
    /// The server could not be set up (the registry directory, the runtime).
    #[error(transparent)]
    Setup(#[from] ServeError),
    /// The connection was still open after [`REQUEST_TIMEOUT`]: a hang.
    #[error("the request was not done after {0:?}")]
    TimedOut(Duration),
}

/// The runtime, and the server of the last registry asked for.
struct Fuzzer {
    runtime: tokio::runtime::Runtime,
    server: Option<(PathBuf, Arc<State>, Router)>,
}

/// The options of the fuzzed server (see the module's documentation).
fn options() -> ServeOptions {
    ServeOptions {
        write_token: Some(WRITE_TOKEN.to_owned()),
        threads: 1,
        page_size: 2,
        limits: Limits {
            rate_per_second: 0.0,
            ..Limits::default()
        },
        ..ServeOptions::default()
    }
}

/// Serves `request` (raw bytes: request line, headers, body, possibly several requests) on
/// one in-memory connection to a server of the registry at `root`, and returns the status
/// of the first answer: `None` when the connection closed without one (an incomplete or
/// malformed head that hyper drops without answering).
///
/// The runtime is created once per process, the server once per `root`: the state it keeps
/// (the request log, the digest cache) carries over between calls. Calls are serialized.
pub fn handle_bytes(root: &Path, request: &[u8]) -> Result<Option<u16>, FuzzError> {
    static FUZZER: Mutex<Option<Fuzzer>> = Mutex::new(None);
    let mut guard = lock(&FUZZER);
    let fuzzer = match guard.take() {
        Some(f) => f,
        None => Fuzzer {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(ServeError::Thread)?,
            server: None,
        },
    };
    let fuzzer = guard.insert(fuzzer);
    let (state, router) = match &fuzzer.server {
        Some((r, state, router)) if r == root => (Arc::clone(state), router.clone()),
        _ => {
            let state = Arc::new(State::new(canonical_root(root)?, options(), SERVER_ADDR));
            let router = app::router(&state);
            fuzzer.server = Some((root.to_owned(), Arc::clone(&state), router.clone()));
            (state, router)
        }
    };
    fuzzer.runtime.block_on(async move {
        let (client, server) = tokio::io::duplex(DUPLEX_BUFFER);
        let running = Arc::clone(&state);
        let serve = app::connection(server, PEER, state, router, CancellationToken::new(), HalfClose::Answers);
        let (mut rx, mut tx) = tokio::io::split(client);
        let send = async move {
            // The server may close before it read everything (a refused head): not an error.
            let _ = tx.write_all(request).await;
            let _ = tx.shutdown().await;
        };
        let receive = async move {
            let mut head = Vec::new();
            let mut buf = vec![0; DUPLEX_BUFFER];
            // Read to the end (so that the server is never blocked writing); keep the start.
            while let Ok(n @ 1..) = rx.read(&mut buf).await {
                let room = STATUS_LINE.saturating_sub(head.len()).min(n);
                head.extend_from_slice(&buf[..room]);
            }
            status(&head)
        };
        let all = async {
            let status = tokio::join!(serve, send, receive).2;
            // A handler can outlive its connection (one that failed mid-body): the next
            // request must meet the registry as this one left it.
            while running.handlers.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            status
        };
        tokio::time::timeout(REQUEST_TIMEOUT, all)
            .await
            .map_err(|_| FuzzError::TimedOut(REQUEST_TIMEOUT))
    })
}

/// How much of an answer [`status`] reads: `HTTP/1.1 200`.
const STATUS_LINE: usize = 12;

/// The status of an answer that starts with `HTTP/1.x NNN`.
fn status(head: &[u8]) -> Option<u16> {
    let rest = head.strip_prefix(b"HTTP/1.")?;
    let code = rest.get(2..5)?;
    if rest.get(1) != Some(&b' ') || !code.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_is_read() {
        assert_eq!(status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(status(b"HTTP/1.0 404"), Some(404));
        assert_eq!(status(b"HTTP/1.1 20"), None);
        assert_eq!(status(b""), None);
        assert_eq!(status(b"HTTP/2 200"), None);
    }

    #[test]
    fn requests_are_answered_in_memory() {
        let root = tempfile::tempdir().unwrap();
        let get = |req: &[u8]| handle_bytes(root.path(), req).unwrap();
        assert_eq!(get(b"GET /api/whoami-v2 HTTP/1.1\r\nHost: x\r\n\r\n"), Some(401));
        let auth = format!("GET /api/whoami-v2 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {WRITE_TOKEN}\r\n\r\n");
        assert_eq!(get(auth.as_bytes()), Some(200));
        assert_eq!(get(b"GET /api/models/acme/k/refs HTTP/1.1\r\n\r\n"), Some(404));
        assert_eq!(get(b"GET /api/models HTTP/1.1\r\n\r\n"), Some(200));
        // Incomplete: a head never finished, a body cut short; answered at once.
        assert_eq!(get(b"GET /api/models HTTP/1.1\r\nHost"), None);
        let cut = b"POST /api/validate-yaml HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"content\":";
        assert_eq!(get(cut), Some(400));
        assert_eq!(get(b"\x00garbage\r\n\r\n"), Some(400));
    }
}
