//! The request and reply types handlers see, independent of the HTTP stack: replies, the
//! API's error answer, request headers and bodies ([`Input`]), percent-decoding and byte
//! ranges. `app` turns them into hyper's types.

use std::fs::File;
use std::io::{self, BufRead};

use serde::Deserialize;
use serde_json::{Value, json};

use crate::registry::RegistryError;

/// What a reply carries.
pub(super) enum Body {
    Bytes(Vec<u8>),
    /// A file positioned at the first byte to send, and how many bytes to send.
    File(File, u64),
}

/// An answer: status, headers and body.
pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) headers: Vec<(&'static str, String)>,
    pub(super) body: Body,
}

impl Reply {
    pub(super) fn json(status: u16, v: &Value) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type", "application/json; charset=utf-8".into())],
            body: Body::Bytes(serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec())),
        }
    }

    pub(super) fn header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }

    pub(super) fn body_len(&self) -> u64 {
        match &self.body {
            Body::Bytes(b) => b.len() as u64,
            Body::File(_, n) => *n,
        }
    }
}

/// An error answer: JSON `{"error": …}` with `X-Error-Code` and `X-Error-Message`.
#[derive(Debug)]
pub(super) struct ApiError {
    pub(super) status: u16,
    code: Option<&'static str>,
    message: String,
    headers: Vec<(&'static str, String)>,
    body: Option<Value>,
}

impl ApiError {
    pub(super) fn new(status: u16, code: Option<&'static str>, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
            body: None,
        }
    }

    pub(super) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, Some("BadRequest"), message)
    }

    pub(super) fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, Some("InternalError"), message)
    }

    pub(super) fn not_found_route() -> ApiError {
        ApiError::new(404, Some("NotFound"), "no such route on this server (khub serve)")
    }

    pub(super) fn too_many_requests(retry_after: u64) -> ApiError {
        ApiError::new(
            429,
            Some("TooManyRequests"),
            format!("too many requests from this address: retry in {retry_after} s"),
        )
        .with_header("Retry-After", retry_after.to_string())
    }

    pub(super) fn too_large(limit: u64) -> ApiError {
        ApiError::new(
            413,
            Some("PayloadTooLarge"),
            format!("the request body is larger than {limit} bytes"),
        )
    }

    pub(super) fn file_too_large(limit: u64) -> ApiError {
        ApiError::new(
            413,
            Some("PayloadTooLarge"),
            format!("a file in the commit is larger than {limit} bytes"),
        )
    }

    pub(super) fn repo_not_found(repo: &str) -> ApiError {
        ApiError::new(404, Some("RepoNotFound"), format!("Repository not found: {}", clip(repo)))
    }

    pub(super) fn with_header(mut self, name: &'static str, value: impl Into<String>) -> ApiError {
        self.headers.push((name, value.into()));
        self
    }

    /// Answers with this JSON body instead of `{"error": message}`.
    pub(super) fn with_body(mut self, body: Value) -> ApiError {
        self.body = Some(body);
        self
    }

    pub(super) fn into_reply(self) -> Reply {
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

/// At most 300 characters of `s`, for messages that quote the request.
pub(super) fn clip(s: &str) -> String {
    s.chars().take(300).collect()
}

/// A header value made safe to send: printable ASCII only, at most 1000 characters.
pub(super) fn header_value(v: &str) -> String {
    v.chars()
        .take(1000)
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .collect()
}

/// Decodes `%XX` escapes (and `+` as a space when `plus` is set). `None` when malformed.
pub(super) fn percent_decode(s: &str, plus: bool) -> Option<Vec<u8>> {
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

/// The `key=value` pairs of a query string or form, decoded; malformed pairs are skipped.
pub(super) fn form_pairs(s: &str) -> impl Iterator<Item = (String, String)> + '_ {
    s.split('&').filter(|p| !p.is_empty()).filter_map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        let k = String::from_utf8(percent_decode(k, true)?).ok()?;
        let v = String::from_utf8(percent_decode(v, true)?).ok()?;
        Some((k, v))
    })
}

/// What a handler gets of a request beside its path: the headers and the body, read
/// before the handler runs (JSON routes) or streamed to it (commits).
pub(super) struct Input {
    headers: axum::http::HeaderMap,
    body: bytes::Bytes,
    stream: Option<Box<dyn BufRead + Send>>,
}

impl Input {
    pub(super) fn new(headers: axum::http::HeaderMap, body: bytes::Bytes, stream: Option<Box<dyn BufRead + Send>>) -> Input {
        Input { headers, body, stream }
    }

    /// The value of a request header, when it is text.
    pub(super) fn header(&self, name: &'static str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body, read in full (empty for a streamed body).
    pub(super) fn body(&self) -> &[u8] {
        &self.body
    }

    /// The body parsed as JSON.
    pub(super) fn json<T: for<'de> Deserialize<'de>>(&self) -> Result<T, ApiError> {
        parse_json(&self.body)
    }

    /// The streamed body (commits); empty when it was read in full.
    pub(super) fn take_stream(&mut self) -> Box<dyn BufRead + Send> {
        self.stream.take().unwrap_or_else(|| Box::new(io::Cursor::new(self.body.clone())))
    }
}

/// Parses a JSON request body.
pub(super) fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))
}

/// A `Range` request, resolved against the file size.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ByteRange {
    Full,
    /// Inclusive bounds.
    Part(u64, u64),
    Unsatisfiable,
}

pub(super) fn parse_range(h: Option<&str>, size: u64) -> ByteRange {
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
    fn percent_decoding() {
        assert_eq!(percent_decode("refs%2Fpr%2F1", false).unwrap(), b"refs/pr/1");
        assert_eq!(percent_decode("a+b", true).unwrap(), b"a b");
        assert_eq!(percent_decode("a+b", false).unwrap(), b"a+b");
        assert!(percent_decode("%zz", false).is_none());
        assert!(percent_decode("%4", false).is_none());
    }

    #[test]
    fn form_pairs_are_decoded() {
        let pairs: Vec<_> = form_pairs("a=1&&b=x+y%2F&c&bad=%zz").collect();
        assert_eq!(
            pairs,
            [("a".into(), "1".into()), ("b".into(), "x y/".into()), ("c".into(), String::new())]
        );
    }
}
