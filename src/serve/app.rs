//! The server on its runtime: the listening socket and the accept loop, one task per
//! connection (hyper's HTTP/1.1 with keep-alive and the header limit, khub's deadlines),
//! the rate limit and the logs in front of axum's router, and the dispatch from a route to
//! its handler on the blocking pool.

use std::convert::Infallible;
use std::io::{self, BufReader};
use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, Response, StatusCode, header};
use axum::routing::{MethodRouter, get, post};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Limited};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio_util::io::{ReaderStream, StreamReader, SyncIoBridge};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;
use tower_http::catch_panic::CatchPanicLayer;

use super::http::{ApiError, Body as ReplyBody, Input, Reply, header_value};
use super::limits::{Limits, Track};
use super::routes::{self, BodyKind, Methods, ROUTES, Route};
use super::{ServeError, State};

/// Files up to this size are read whole on the blocking pool and sent from memory; larger
/// ones are streamed in chunks of [`CHUNK`].
const INLINE_FILE: u64 = 1 << 20;
const CHUNK: usize = 256 << 10;
/// The listen queue: connections beyond the connection limit wait here.
const BACKLOG: u32 = 1024;

/// Binds `addr` (the first of its addresses that binds), with address reuse.
pub(super) fn listen(addr: &str) -> Result<TcpListener, ServeError> {
    let bind_error = |message: String| ServeError::Bind {
        addr: addr.to_owned(),
        message,
    };
    let addrs: Vec<SocketAddr> = addr.to_socket_addrs().map_err(|e| bind_error(e.to_string()))?.collect();
    let mut last = "no address".to_owned();
    for a in addrs {
        let socket = if a.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() };
        let bound = socket.and_then(|s| {
            s.set_reuseaddr(true)?;
            s.bind(a)?;
            s.listen(BACKLOG)
        });
        match bound {
            Ok(l) => return Ok(l),
            Err(e) => last = e.to_string(),
        }
    }
    Err(bind_error(last))
}

/// SIGTERM and SIGINT, registered before the server answers its first request.
pub(super) struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Registers the handlers; must run inside the runtime.
    pub(super) fn new() -> io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Signals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Whether an accept error means the process is out of descriptors or memory: the
/// pending connection stays queued, so accepting again at once would spin.
fn out_of_resources(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// Serves until `shutdown` is cancelled or a signal arrives, then stops accepting, lets the
/// connections finish their requests (for at most the shutdown grace) and returns.
pub(super) async fn run(listener: TcpListener, state: Arc<State>, shutdown: CancellationToken, mut signals: Option<Signals>) {
    let router = router(&state);
    let limits = state.limits.clone();
    let slots = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let sem = Arc::new(Semaphore::new(slots as usize));
    let graceful = CancellationToken::new();
    let stop = async {
        match signals.as_mut() {
            Some(s) => tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = s.recv() => {}
            },
            None => shutdown.cancelled().await,
        }
    };
    tokio::pin!(stop);
    let mut backoff = Duration::from_millis(5);
    let mut last_report: Option<Instant> = None;
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&sem).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut stop => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut stop => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                state.connections.fetch_add(1, Ordering::SeqCst);
                let _ = stream.set_nodelay(true);
                let conn = connection(
                    stream,
                    peer,
                    Arc::clone(&state),
                    router.clone(),
                    graceful.clone(),
                    HalfClose::Closes,
                );
                tokio::spawn(async move {
                    conn.await;
                    // The connection's slot is free once it is closed.
                    drop(permit);
                });
            }
            Err(e) if out_of_resources(&e) => {
                if last_report.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    eprintln!("khub serve: accepting a connection failed: {e}; retrying (raise `ulimit -n` or lower --max-connections)");
                    last_report = Some(Instant::now());
                }
                drop(permit);
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = &mut stop => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            // A connection reset before it was accepted and the like: the next one is
            // unaffected.
            Err(_) => drop(permit),
        }
    }
    drop(listener);
    graceful.cancel();
    let _ = tokio::time::timeout(limits.shutdown_grace, sem.acquire_many(slots)).await;
}

/// A connection's socket (or, for the fuzz entry point, an in-memory stream), telling its
/// [`Track`] about every byte in or out.
struct Tracked<S> {
    inner: S,
    track: Arc<Track>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.track.on_read();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.track.on_write();
        }
        r
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.track.on_write();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What a connection does when its client closes its side (half-closes) mid-request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HalfClose {
    /// The connection is closed, and the request in flight abandoned: the client left.
    /// Every socket the server accepts.
    Closes,
    /// The request in flight is answered first. The fuzz entry point's client sends its
    /// whole input, then closes its side so that an incomplete request ends at once
    /// rather than at a deadline.
    Answers,
}

/// Serves one connection until the client closes it, a deadline passes or the server shuts
/// down (after the request in flight).
pub(super) async fn connection<S>(
    stream: S,
    peer: SocketAddr,
    state: Arc<State>,
    router: Router,
    graceful: CancellationToken,
    half_close: HalfClose,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let track = Arc::new(Track::new());
    let io = TokioIo::new(Tracked {
        inner: stream,
        track: Arc::clone(&track),
    });
    let limits = state.limits.clone();
    let service = {
        let track = Arc::clone(&track);
        hyper::service::service_fn(move |req| request(Arc::clone(&state), router.clone(), peer, Arc::clone(&track), req))
    };
    let mut builder = http1::Builder::new();
    builder
        .keep_alive(true)
        .half_close(half_close == HalfClose::Answers)
        .max_buf_size(limits.max_header_bytes)
        .max_header_size(limits.max_header_bytes)
        .header_read_timeout(None);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut shutting_down = false;
    loop {
        let deadline = track.deadline(&limits);
        tokio::select! {
            _ = conn.as_mut() => return,
            () = tokio::time::sleep_until(deadline.into()) => {
                if track.deadline(&limits) <= Instant::now() {
                    // Dropping the connection closes the socket.
                    return;
                }
            }
            () = graceful.cancelled(), if !shutting_down => {
                shutting_down = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Marks a connection busy while a request is served: from its head until its response
/// is sent or dropped.
struct Busy(Arc<Track>);

impl Busy {
    fn new(track: Arc<Track>) -> Busy {
        track.begin();
        Busy(track)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// What the access log says of a request, written when its response is done.
struct AccessLine {
    method: String,
    path: String,
    status: u16,
    client: SocketAddr,
    start: Instant,
    bytes: u64,
}

impl Drop for AccessLine {
    fn drop(&mut self) {
        let line = serde_json::json!({
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "bytes": self.bytes,
            "ms": (self.start.elapsed().as_secs_f64() * 1e4).round() / 10.0,
            "client": self.client.ip().to_string(),
        });
        eprintln!("{line}");
    }
}

/// A response body that keeps its connection busy until it is sent, and counts its bytes
/// for the access log.
struct Tail {
    inner: Body,
    access: Option<AccessLine>,
    _busy: Busy,
}

impl hyper::body::Body for Tail {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(frame))), Some(a)) = (&r, self.access.as_mut())
            && let Some(d) = frame.data_ref()
        {
            a.bytes += d.len() as u64;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// One request, before routing: the rate limit, the in-memory log, the access log.
async fn request(
    state: Arc<State>,
    router: Router,
    peer: SocketAddr,
    track: Arc<Track>,
    req: hyper::Request<Incoming>,
) -> Result<Response<Tail>, Infallible> {
    let busy = Busy::new(track);
    let start = Instant::now();
    let method = req.method().as_str().to_owned();
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING) || content_length(req.headers()).is_some_and(|n| n > 0);
    let mut response = match state.rate.check(peer.ip()) {
        Err(retry_after) => response(ApiError::too_many_requests(retry_after).into_reply()),
        Ok(()) => match router.oneshot(req.map(Body::new)).await {
            Ok(r) => r,
            Err(never) => match never {},
        },
    };
    let status = response.status().as_u16();
    // A refused request's body may not have been read: rather than read (or guess at) the
    // rest, close the connection after the answer.
    if has_body && status >= 400 {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    // Logged before answering, so that a client that got its answer finds it in the log.
    state.record(&method, &path, status);
    let access = state.access_log.then(|| AccessLine {
        method,
        path,
        status,
        client: peer,
        start,
        bytes: 0,
    });
    let (parts, body) = response.into_parts();
    Ok(Response::from_parts(
        parts,
        Tail {
            inner: body,
            access,
            _busy: busy,
        },
    ))
}

/// The router: every route of [`ROUTES`] at its paths, the Hub's JSON errors for unknown
/// paths (404) and methods (405), and a 500 for a handler that panics.
pub(super) fn router(state: &Arc<State>) -> Router {
    let mut app = Router::new();
    for route in ROUTES {
        let handler = {
            let state = Arc::clone(state);
            move |req: Request| dispatch(Arc::clone(&state), route, req)
        };
        let methods: MethodRouter = match route.methods {
            Methods::Get => get(handler),
            Methods::Post => post(handler),
            Methods::PostOrDelete => post(handler.clone()).delete(handler),
        };
        for path in routes::axum_paths(route.pattern) {
            app = app.route(&path, methods.clone());
        }
    }
    app.fallback(|| async { response(ApiError::not_found_route().into_reply()) })
        .method_not_allowed_fallback(|req: Request| async move {
            let e = ApiError::new(405, Some("MethodNotAllowed"), format!("{} is not allowed here", req.method()));
            response(e.into_reply())
        })
        .layer(CatchPanicLayer::custom(|_| {
            response(ApiError::internal("internal error").into_reply())
        }))
}

/// The declared body length, when there is one.
fn content_length(headers: &axum::http::HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// Answers a request that matched `route`: checks it, reads its body as the route says,
/// and runs the handler on the blocking pool.
async fn dispatch(state: Arc<State>, route: &'static Route, req: Request) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let (ctx, params) = match routes::prepare(Arc::clone(&state), route, parts.method.as_str(), target, &parts.headers) {
        Ok(p) => p,
        Err(e) => return response(e.into_reply()),
    };
    let limits: &Limits = &state.limits;
    let declared = content_length(&parts.headers);
    let input = match route.body {
        BodyKind::None => Input::new(parts.headers, Bytes::new(), None),
        BodyKind::Json => {
            let max = limits.max_json_bytes;
            if declared.is_some_and(|n| n > max) {
                return response(ApiError::too_large(max).into_reply());
            }
            let limited = Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX));
            match tokio::time::timeout(limits.body_timeout, limited.collect()).await {
                Ok(Ok(collected)) => Input::new(parts.headers, collected.to_bytes(), None),
                Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                    return response(ApiError::too_large(max).into_reply());
                }
                Ok(Err(e)) => return response(ApiError::bad_request(format!("reading the request body: {e}")).into_reply()),
                Err(_) => {
                    return response(ApiError::new(408, Some("RequestTimeout"), "the request body did not arrive in time").into_reply());
                }
            }
        }
        BodyKind::Commit => {
            let max = limits.max_commit_bytes;
            if declared.is_some_and(|n| n > max) {
                return response(ApiError::too_large(max).into_reply());
            }
            let stream = futures_util::TryStreamExt::map_err(body.into_data_stream(), io::Error::other);
            let reader = BufReader::with_capacity(CHUNK, SyncIoBridge::new(StreamReader::new(stream)));
            Input::new(parts.headers, Bytes::new(), Some(Box::new(reader)))
        }
    };
    let handler = route.handler;
    let head = parts.method == Method::HEAD;
    let running = Running::new(Arc::clone(&state));
    let done = tokio::task::spawn_blocking(move || {
        let _running = running;
        let mut input = input;
        let reply = handler(&ctx, &mut input, &params).unwrap_or_else(ApiError::into_reply);
        if head { reply } else { inline_small_file(reply) }
    })
    .await;
    match done {
        Ok(reply) => response(reply),
        Err(_) => response(ApiError::internal("internal error").into_reply()),
    }
}

/// Counts a handler in [`State::handlers`] while it lives.
struct Running(Arc<State>);

impl Running {
    fn new(state: Arc<State>) -> Running {
        state.handlers.fetch_add(1, Ordering::SeqCst);
        Running(state)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.handlers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A reply whose file is small enough to send from memory, read now (on the blocking pool).
fn inline_small_file(reply: Reply) -> Reply {
    let Reply { status, headers, body } = reply;
    let body = match body {
        ReplyBody::File(f, n) if n <= INLINE_FILE => {
            use std::io::Read as _;
            let mut buf = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
            match f.take(n).read_to_end(&mut buf) {
                Ok(_) if buf.len() as u64 == n => ReplyBody::Bytes(buf),
                _ => return ApiError::internal("the file changed while being read").into_reply(),
            }
        }
        other => other,
    };
    Reply { status, headers, body }
}

/// A reply as hyper sends it, with `Content-Length` and `Server`.
fn response(reply: Reply) -> Response<Body> {
    let len = reply.body_len();
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = match reply.body {
        ReplyBody::Bytes(b) => Body::from(b),
        ReplyBody::File(f, n) => {
            use tokio::io::AsyncReadExt as _;
            let file = tokio::fs::File::from_std(f).take(n);
            Body::from_stream(ReaderStream::with_capacity(file, CHUNK))
        }
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::SERVER, HeaderValue::from_static("khub"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    for (name, value) in reply.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&header_value(&value)),
        ) {
            h.append(name, value);
        }
    }
    r
}
