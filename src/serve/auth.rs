//! Tokens: what a request's `Authorization: Bearer` allows, and what a route needs.
//!
//! Without a read token anyone reads; without a write token nobody writes. The write token
//! also reads. Tokens are compared in constant time.

use serde_json::json;
use sha2::{Digest, Sha256};

use super::ServeOptions;
use super::http::{ApiError, Input, Reply};
use super::routes::{Ctx, Params};

/// What a request's token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Token {
    None,
    Invalid,
    Read,
    Write,
}

impl Token {
    /// The token of a request with this `Authorization` header.
    pub(super) fn from_header(authorization: Option<&str>, options: &ServeOptions) -> Token {
        let Some(v) = authorization.map(str::trim) else {
            return Token::None;
        };
        let t = match v.split_once(' ') {
            Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim(),
            _ => "",
        };
        // No token given (another scheme, or `Bearer` alone) is never a match, whatever
        // is configured: an empty configured token must not admit an empty given one.
        if t.is_empty() {
            return Token::Invalid;
        }
        if options.write_token.as_deref().is_some_and(|w| token_eq(t, w)) {
            Token::Write
        } else if options.read_token.as_deref().is_some_and(|r| token_eq(t, r)) {
            Token::Read
        } else {
            Token::Invalid
        }
    }
}

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    /// Nothing: the handler decides (`whoami`), or the route answers an error anyway.
    Open,
    /// The read token, when the server has one.
    Read,
    /// The write token.
    Write,
}

fn invalid() -> ApiError {
    ApiError::new(401, Some("Unauthorized"), "Invalid credentials in Authorization header")
}

/// Whether `token` gives `access` on a server run with `options`.
pub(super) fn check(access: Access, token: Token, options: &ServeOptions) -> Result<(), ApiError> {
    match access {
        Access::Open => Ok(()),
        Access::Read if options.read_token.is_none() => Ok(()),
        Access::Read => match token {
            Token::Read | Token::Write => Ok(()),
            Token::None => Err(ApiError::new(
                401,
                Some("RepoNotFound"),
                "Unauthorized: this server needs a token (set HF_TOKEN)",
            )),
            Token::Invalid => Err(invalid()),
        },
        Access::Write if options.write_token.is_none() => Err(ApiError::new(
            403,
            Some("ReadOnly"),
            "this server is read-only: start it with --write-token",
        )),
        Access::Write => match token {
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
            Token::Invalid => Err(invalid()),
        },
    }
}

fn token_eq(given: &str, expected: &str) -> bool {
    // Comparing digests keeps the time independent of where the strings differ and of the
    // expected token's length.
    let a = Sha256::digest(given.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    let diff = a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// `GET /api/whoami-v2`: who the token is.
pub(super) fn whoami(ctx: &Ctx, _: &mut Input, _: &Params) -> Result<Reply, ApiError> {
    let role = match ctx.token {
        Token::Write => "write",
        Token::Read => "read",
        Token::None | Token::Invalid => return Err(invalid()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare() {
        assert!(token_eq("abc", "abc"));
        assert!(!token_eq("abc", "abd"));
        assert!(!token_eq("", "abc"));
    }

    #[test]
    fn access_follows_the_configured_tokens() {
        let open = ServeOptions::default();
        let both = ServeOptions {
            read_token: Some("r".into()),
            write_token: Some("w".into()),
            ..ServeOptions::default()
        };
        let token = |h: &str, o: &ServeOptions| Token::from_header(Some(h), o);
        assert_eq!(Token::from_header(None, &both), Token::None);
        assert_eq!(token("Bearer w", &both), Token::Write);
        assert_eq!(token("bearer  r ", &both), Token::Read);
        assert_eq!(token("Basic r", &both), Token::Invalid);
        assert!(check(Access::Read, Token::None, &open).is_ok());
        assert_eq!(check(Access::Write, Token::Write, &open).unwrap_err().status, 403);
        assert_eq!(check(Access::Read, Token::None, &both).unwrap_err().status, 401);
        assert_eq!(check(Access::Write, Token::Read, &both).unwrap_err().status, 403);
        assert!(check(Access::Read, Token::Write, &both).is_ok());
        assert!(check(Access::Open, Token::Invalid, &both).is_ok());
    }

    /// A server configured with an empty token (`--write-token "$UNSET"`) admitted any
    /// `Authorization` header without a bearer token as that token. `Server::start` now
    /// refuses such a configuration, and no header without a token matches anyway.
    #[test]
    fn an_empty_token_admits_nobody() {
        let empty = ServeOptions {
            read_token: Some(String::new()),
            write_token: Some(String::new()),
            ..ServeOptions::default()
        };
        for h in ["Basic x", "Bearer", "Bearer ", "bearer\t", "x", ""] {
            assert_eq!(Token::from_header(Some(h), &empty), Token::Invalid, "{h:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        for (read, write) in [(Some(""), None), (None, Some(" ")), (Some("r"), Some("\t"))] {
            let options = ServeOptions {
                read_token: read.map(str::to_owned),
                write_token: write.map(str::to_owned),
                ..ServeOptions::default()
            };
            let Err(err) = super::super::Server::start(dir.path(), "127.0.0.1:0", options) else {
                panic!("a blank token was accepted");
            };
            assert!(err.to_string().contains("non-empty"), "{err}");
        }
    }
}
