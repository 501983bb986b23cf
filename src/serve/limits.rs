//! The server's limits: what a client may ask of it ([`Limits`], with defaults and the
//! `KHUB_SERVE_*` variables), the request rate per client address ([`RateLimiter`]) and
//! the state of one connection that its deadlines are computed from ([`Track`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::ServeError;
use crate::env::Environment;

/// What a client may ask of the server. Every limit has a default, a `khub serve` flag and
/// a `KHUB_SERVE_*` variable (see `docs/serve.md`).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Limits {
    /// The most connections served at once; further ones wait in the listen queue. Never
    /// more than the open-file limit less 64 (for the files being served). Default 1024.
    pub max_connections: usize,
    /// The largest request head (request line and headers), in bytes; a larger one gets
    /// 431 and its connection is closed, whatever arrives after. Default 64 KiB (at least
    /// 8 KiB).
    pub max_header_bytes: usize,
    /// How long a client has to send a request head, from its connection or its first
    /// byte after a response. Default 10 s.
    pub header_timeout: Duration,
    /// How long a request may go without a byte read or written while it is being served
    /// (a body that stops arriving, a client that stops reading); JSON bodies must also
    /// arrive whole within it. Default 30 s.
    pub body_timeout: Duration,
    /// How long a kept-alive connection may wait, idle, for its next request. Default 30 s.
    pub idle_timeout: Duration,
    /// The largest JSON body (repository creation, pre-upload, paths-info, refs,
    /// validate-yaml). Default 1 MiB.
    pub max_json_bytes: u64,
    /// The largest file in a commit. Default 1 GiB.
    pub max_file_bytes: u64,
    /// The largest commit body (NDJSON, files inline in base64). Default 2 GiB.
    pub max_commit_bytes: u64,
    /// Requests a second per client address (IPv6: per /64), refilling a bucket of
    /// `rate_burst`; above it, 429 with `Retry-After`. 0 turns the limit off. Default 500.
    pub rate_per_second: f64,
    /// The requests a client address may send at once before the rate applies. Default
    /// 1000.
    pub rate_burst: u32,
    /// How long a shutdown waits for requests in flight before it closes their
    /// connections. Default 30 s.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_header_bytes: 64 << 10,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            max_json_bytes: 1 << 20,
            max_file_bytes: 1 << 30,
            max_commit_bytes: 2 << 30,
            rate_per_second: 500.0,
            rate_burst: 1000,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// One limit's variable, what it sets, and the form of its value.
struct Setting {
    var: &'static str,
    set: fn(&mut Limits, &str) -> Option<()>,
    expected: &'static str,
}

fn secs(v: &str) -> Option<Duration> {
    let s: f64 = v.trim().parse().ok()?;
    (s.is_finite() && s > 0.0 && s < 1e9).then(|| Duration::from_secs_f64(s))
}

/// A byte count: a number, optionally with a `K`, `M` or `G` suffix (powers of 1024).
pub fn parse_bytes(v: &str) -> Option<u64> {
    let v = v.trim();
    let (num, shift) = match v.as_bytes().last()? {
        b'k' | b'K' => (&v[..v.len() - 1], 10),
        b'm' | b'M' => (&v[..v.len() - 1], 20),
        b'g' | b'G' => (&v[..v.len() - 1], 30),
        _ => (v, 0),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(1 << shift)
}

const SETTINGS: &[Setting] = &[
    Setting {
        var: crate::env::KHUB_SERVE_MAX_CONNECTIONS,
        set: |l, v| {
            l.max_connections = v.trim().parse().ok().filter(|&n| n > 0)?;
            Some(())
        },
        expected: "a number of connections, at least 1",
    },
    Setting {
        var: crate::env::KHUB_SERVE_MAX_HEADER_BYTES,
        set: |l, v| {
            l.max_header_bytes = usize::try_from(parse_bytes(v)?).ok()?;
            Some(())
        },
        expected: "a size in bytes (suffixes K, M, G)",
    },
    Setting {
        var: crate::env::KHUB_SERVE_HEADER_TIMEOUT,
        set: |l, v| {
            l.header_timeout = secs(v)?;
            Some(())
        },
        expected: "seconds, more than 0",
    },
    Setting {
        var: crate::env::KHUB_SERVE_BODY_TIMEOUT,
        set: |l, v| {
            l.body_timeout = secs(v)?;
            Some(())
        },
        expected: "seconds, more than 0",
    },
    Setting {
        var: crate::env::KHUB_SERVE_IDLE_TIMEOUT,
        set: |l, v| {
            l.idle_timeout = secs(v)?;
            Some(())
        },
        expected: "seconds, more than 0",
    },
    Setting {
        var: crate::env::KHUB_SERVE_MAX_JSON_BYTES,
        set: |l, v| {
            l.max_json_bytes = parse_bytes(v)?;
            Some(())
        },
        expected: "a size in bytes (suffixes K, M, G)",
    },
    Setting {
        var: crate::env::KHUB_SERVE_MAX_FILE_BYTES,
        set: |l, v| {
            l.max_file_bytes = parse_bytes(v)?;
            Some(())
        },
        expected: "a size in bytes (suffixes K, M, G)",
    },
    Setting {
        var: crate::env::KHUB_SERVE_MAX_COMMIT_BYTES,
        set: |l, v| {
            l.max_commit_bytes = parse_bytes(v)?;
            Some(())
        },
        expected: "a size in bytes (suffixes K, M, G)",
    },
    Setting {
        var: crate::env::KHUB_SERVE_RATE,
        set: |l, v| {
            l.rate_per_second = v.trim().parse().ok().filter(|r: &f64| r.is_finite() && *r >= 0.0)?;
            Some(())
        },
        expected: "requests a second (0 turns the limit off)",
    },
    Setting {
        var: crate::env::KHUB_SERVE_RATE_BURST,
        set: |l, v| {
            l.rate_burst = v.trim().parse().ok().filter(|&n| n > 0)?;
            Some(())
        },
        expected: "a number of requests, at least 1",
    },
];

impl Limits {
    /// The defaults, with each `KHUB_SERVE_*` limit variable set in `env` applied.
    pub fn from_env(env: &Environment) -> Result<Limits, ServeError> {
        let mut limits = Limits::default();
        for s in SETTINGS {
            if let Some(v) = env.get(s.var) {
                (s.set)(&mut limits, v).ok_or_else(|| ServeError::Setting {
                    name: s.var.to_owned(),
                    value: v.chars().take(100).collect(),
                    expected: s.expected,
                })?;
            }
        }
        Ok(limits)
    }

    /// These limits as the server applies them: the header limit at least 8 KiB (hyper's
    /// floor), the connection limit within the open-file limit.
    pub(super) fn effective(&self) -> Limits {
        let mut l = self.clone();
        l.max_header_bytes = l.max_header_bytes.max(8 << 10);
        l.max_connections = l.max_connections.clamp(1, open_file_limit().saturating_sub(64).max(16));
        l.rate_burst = l.rate_burst.max(1);
        l
    }
}

/// The soft limit on open files of this process.
fn open_file_limit() -> usize {
    #[cfg(unix)]
    {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes one `rlimit` through a valid pointer to a local.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 {
            return usize::try_from(r.rlim_cur).unwrap_or(usize::MAX);
        }
    }
    usize::MAX
}

/// The key a client address is counted under: IPv4 addresses (mapped ones included) alone,
/// IPv6 addresses by their /64, which one client usually holds whole.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// How many addresses the rate limiter remembers before it forgets those that are idle.
const RATE_TABLE_CAP: usize = 65_536;

/// Token buckets per client address.
pub(super) struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl RateLimiter {
    pub(super) fn new(limits: &Limits) -> RateLimiter {
        RateLimiter {
            rate: limits.rate_per_second,
            burst: f64::from(limits.rate_burst),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a request from `ip`: `Err(seconds)` to wait when it is over the rate.
    pub(super) fn check(&self, ip: IpAddr) -> Result<(), u64> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= RATE_TABLE_CAP {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, (tokens, last)| *tokens + now.duration_since(*last).as_secs_f64() * rate < burst);
            if buckets.len() >= RATE_TABLE_CAP {
                buckets.clear();
            }
        }
        let (tokens, last) = buckets.entry(client_key(ip)).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            // At least one second: Retry-After counts whole seconds.
            Err(((1.0 - *tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

/// "Not set" in [`Track`]'s times.
const NONE: u64 = u64::MAX;

/// What one connection is doing, for its deadline: waiting for a request head, serving a
/// request, or idle between requests. Updated by its I/O and by the requests it carries;
/// times are milliseconds since the connection was accepted.
pub(super) struct Track {
    start: Instant,
    last_io: AtomicU64,
    head_since: AtomicU64,
    idle_since: AtomicU64,
    busy: AtomicU32,
}

impl Track {
    /// A connection just accepted: its first request head is due within the header timeout.
    pub(super) fn new() -> Track {
        Track {
            start: Instant::now(),
            last_io: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            busy: AtomicU32::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    /// Bytes arrived.
    pub(super) fn on_read(&self) {
        let now = self.now();
        self.last_io.store(now, Ordering::Relaxed);
        if self.busy.load(Ordering::Relaxed) == 0 {
            let _ = self.head_since.compare_exchange(NONE, now, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// Bytes left.
    pub(super) fn on_write(&self) {
        self.last_io.store(self.now(), Ordering::Relaxed);
    }

    /// A request head arrived and is being served.
    pub(super) fn begin(&self) {
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.head_since.store(NONE, Ordering::Relaxed);
        self.last_io.store(self.now(), Ordering::Relaxed);
    }

    /// A response was sent (or abandoned).
    pub(super) fn end(&self) {
        let now = self.now();
        self.last_io.store(now, Ordering::Relaxed);
        if self.busy.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.idle_since.store(now, Ordering::Relaxed);
            self.head_since.store(NONE, Ordering::Relaxed);
        }
    }

    /// When the connection is to be closed if nothing changes before.
    pub(super) fn deadline(&self, limits: &Limits) -> Instant {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(NONE / 2);
        let at = if self.busy.load(Ordering::Relaxed) > 0 {
            self.last_io.load(Ordering::Relaxed).saturating_add(ms(limits.body_timeout))
        } else {
            match self.head_since.load(Ordering::Relaxed) {
                NONE => self.idle_since.load(Ordering::Relaxed).saturating_add(ms(limits.idle_timeout)),
                since => since.saturating_add(ms(limits.header_timeout)),
            }
        };
        self.start + Duration::from_millis(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_come_from_the_environment() {
        let env = Environment::from_pairs([
            (crate::env::KHUB_SERVE_MAX_HEADER_BYTES, "16K"),
            (crate::env::KHUB_SERVE_HEADER_TIMEOUT, "2.5"),
            (crate::env::KHUB_SERVE_RATE, "0"),
        ]);
        let l = Limits::from_env(&env).unwrap();
        assert_eq!(l.max_header_bytes, 16 << 10);
        assert_eq!(l.header_timeout, Duration::from_millis(2500));
        assert_eq!(l.rate_per_second, 0.0);
        assert_eq!(l.max_commit_bytes, Limits::default().max_commit_bytes);
        let bad = Environment::from_pairs([(crate::env::KHUB_SERVE_BODY_TIMEOUT, "soon")]);
        let e = Limits::from_env(&bad).unwrap_err().to_string();
        assert!(e.contains("KHUB_SERVE_BODY_TIMEOUT") && e.contains("soon"), "{e}");
        assert_eq!(parse_bytes("2G"), Some(2 << 30));
        assert_eq!(parse_bytes("12"), Some(12));
        assert_eq!(parse_bytes("x"), None);
    }

    #[test]
    fn the_rate_is_per_address() {
        let limits = Limits {
            rate_per_second: 1.0,
            rate_burst: 3,
            ..Limits::default()
        };
        let r = RateLimiter::new(&limits);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(r.check(a).is_ok());
        }
        assert_eq!(r.check(a), Err(1));
        assert!(r.check(b).is_ok(), "another address has its own bucket");
        let v6a: IpAddr = "2001:db8::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8::2".parse().unwrap();
        for _ in 0..3 {
            assert!(r.check(v6a).is_ok());
        }
        assert!(r.check(v6b).is_err(), "one /64 is one client");
        let off = RateLimiter::new(&Limits {
            rate_per_second: 0.0,
            ..Limits::default()
        });
        for _ in 0..10_000 {
            assert!(off.check(a).is_ok());
        }
    }

    #[test]
    fn deadlines_follow_the_connection() {
        let limits = Limits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            ..Limits::default()
        };
        let t = Track::new();
        let head = t.deadline(&limits).duration_since(t.start);
        assert_eq!(head, Duration::from_secs(10), "a new connection owes a head");
        t.begin();
        assert!(t.deadline(&limits).duration_since(t.start) >= Duration::from_secs(30));
        t.end();
        assert!(t.deadline(&limits).duration_since(t.start) >= Duration::from_secs(60), "idle");
        t.on_read();
        assert!(
            t.deadline(&limits).duration_since(t.start) < Duration::from_secs(11),
            "a head started"
        );
    }
}
