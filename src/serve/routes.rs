//! Routing: [`ROUTES`] is a table of patterns, each with the methods it allows, the access
//! it needs, the body it reads and the one handler that answers it. `app` registers every
//! pattern with axum's router (which matches the raw, still percent-encoded path and
//! answers 405); the route that matched then decodes its captures itself with [`capture`],
//! so percent-encoded revisions (`refs%2Fpr%2F1`) stay one segment and malformed escapes
//! get the Hub's JSON error.
//!
//! A pattern is a `/`-separated list of segments:
//!
//! - `text`: that segment, exactly;
//! - `{org}`, `{name}`, `{rev}`: any one segment, captured;
//! - `{kind}`: any one segment, checked to be `models` or `kernels` once the route matched
//!   (so `datasets` gets the Hub's "repository not found" rather than "no such route");
//!   `{kind=a|b}`: only `a` or `b`, checked the same way;
//! - last, `{rev+}`, `{path+}`: the remaining segments (one or more), joined with `/`;
//!   `{path*}`: the same, possibly none.
//!
//! A matched route answers in this order: the method (405), the kind, the access (401,
//! 403); only then is a body read and the handler run.

use std::net::SocketAddr;
use std::sync::Arc;

use super::State;
use super::auth::{self, Access, Token};
use super::http::{ApiError, Input, Reply, form_pairs, percent_decode};
use super::{read, write};
use crate::registry::RepoId;

/// Which API family a request uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) enum Kind {
    #[default]
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

/// The request, as handlers see it.
pub(super) struct Ctx {
    pub(super) state: Arc<State>,
    pub(super) method: String,
    /// The path, percent-encoded as received.
    pub(super) raw_path: String,
    query: Vec<(String, String)>,
    pub(super) raw_query: String,
    pub(super) token: Token,
    /// `http://` and the host the client asked for.
    pub(super) base: String,
}

impl Ctx {
    pub(super) fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub(super) fn flag(&self, name: &str) -> bool {
        self.param(name)
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
    }

    pub(super) fn repo_url(&self, kind: Kind, repo: &RepoId) -> String {
        format!("{}/{}{}", self.base, kind.prefix(), repo)
    }
}

/// What a route's pattern captured.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Params {
    /// The API family (`Model` where the pattern has no `{kind}`).
    pub(super) kind: Kind,
    /// `org/name`, empty where the pattern has neither.
    pub(super) repo: String,
    /// The revision (a branch name for `branch/{rev}`), when the pattern has one.
    pub(super) rev: Option<String>,
    /// The path inside the repository, `""` when none.
    pub(super) path: String,
}

impl Params {
    /// The revision, `""` where the pattern has none.
    pub(super) fn rev(&self) -> &str {
        self.rev.as_deref().unwrap_or("")
    }
}

pub(super) type Handler = fn(&Ctx, &mut Input, &Params) -> Result<Reply, ApiError>;

/// The methods a route answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Methods {
    /// `GET` and `HEAD`.
    Get,
    Post,
    PostOrDelete,
}

/// The body a route reads, and its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BodyKind {
    /// None: whatever is sent is not read.
    None,
    /// JSON (or a form), read in full before the handler runs: at most
    /// [`super::Limits::max_json_bytes`].
    Json,
    /// An NDJSON commit, streamed to the handler: at most
    /// [`super::Limits::max_commit_bytes`] in all and [`super::Limits::max_file_bytes`] a file.
    Commit,
}

pub(super) struct Route {
    pub(super) pattern: &'static str,
    pub(super) methods: Methods,
    pub(super) access: Access,
    pub(super) body: BodyKind,
    pub(super) handler: Handler,
}

const fn at(pattern: &'static str, methods: Methods, access: Access, body: BodyKind, handler: Handler) -> Route {
    Route {
        pattern,
        methods,
        access,
        body,
        handler,
    }
}

use Access::{Open, Read, Write};
use BodyKind::{Commit, Json, None as NoBody};
use Methods::{Get, Post, PostOrDelete};

/// Every route. A path matches at most one pattern (axum refuses overlaps), so the order
/// only matters for the documentation.
pub(super) const ROUTES: &[Route] = &[
    at("api/whoami-v2", Get, Open, NoBody, auth::whoami),
    at("api/validate-yaml", Post, Read, Json, write::validate_yaml),
    at("api/repos/create", Post, Write, Json, write::create_repo),
    at("api/{kind}", Get, Read, NoBody, read::list),
    at("api/{kind}/{org}/{name}", Get, Read, NoBody, read::info),
    at("api/{kind}/{org}/{name}/revision/{rev+}", Get, Read, NoBody, read::info),
    at("api/{kind}/{org}/{name}/refs", Get, Read, NoBody, read::refs),
    at("api/{kind}/{org}/{name}/tree/{rev}/{path*}", Get, Read, NoBody, read::tree),
    at("api/{kind}/{org}/{name}/paths-info/{rev}", Post, Read, Json, read::paths_info),
    at("api/{kind}/{org}/{name}/commits/{rev}", Get, Read, NoBody, read::commits),
    at("api/{kind}/{org}/{name}/preupload/{rev}", Post, Write, Json, write::preupload),
    at("api/{kind}/{org}/{name}/commit/{rev}", Post, Write, Commit, write::commit),
    at("api/{kind}/{org}/{name}/tag/{rev}", PostOrDelete, Write, Json, write::tag),
    at("api/{kind}/{org}/{name}/branch/{rev}", PostOrDelete, Write, Json, write::branch),
    at(
        "{kind=kernels|datasets|spaces}/{org}/{name}/resolve/{rev}/{path+}",
        Get,
        Read,
        NoBody,
        read::resolve,
    ),
    at("{org}/{name}/resolve/{rev}/{path+}", Get, Read, NoBody, read::resolve),
];

/// The paths axum's router registers for a pattern: `{kind=a|b}` becomes one path per
/// choice, `{rev+}` / `{path+}` a catch-all, `{path*}` two paths (without and with a
/// catch-all).
pub(super) fn axum_paths(pattern: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    for part in pattern.split('/') {
        let var = part.strip_prefix('{').and_then(|p| p.strip_suffix('}'));
        let choices: Vec<String> = match var {
            None => vec![format!("/{part}")],
            Some(v) => match v.split_once('=') {
                Some((_, allowed)) => allowed.split('|').map(|a| format!("/{a}")).collect(),
                None => match (v.strip_suffix('+'), v.strip_suffix('*')) {
                    (Some(name), _) => vec![format!("/{{*{name}}}")],
                    (_, Some(name)) => vec![String::new(), format!("/{{*{name}}}")],
                    _ => vec![format!("/{{{v}}}")],
                },
            },
        };
        out = out.iter().flat_map(|p| choices.iter().map(move |c| format!("{p}{c}"))).collect();
    }
    out
}

/// What a pattern captured, before the kind is checked.
#[derive(Debug, Default, PartialEq, Eq)]
struct Captures<'s> {
    plural: Option<&'s str>,
    org: Option<&'s str>,
    name: Option<&'s str>,
    rev: Option<String>,
    path: String,
}

impl<'s> Captures<'s> {
    fn set(&mut self, var: &str, value: &'s str) {
        match var {
            "kind" => self.plural = Some(value),
            "org" => self.org = Some(value),
            "name" => self.name = Some(value),
            other => self.set_rest(other, value.to_owned()),
        }
    }

    fn set_rest(&mut self, var: &str, value: String) {
        match var {
            "rev" => self.rev = Some(value),
            "path" => self.path = value,
            _ => {}
        }
    }

    fn params(self) -> Result<Params, ApiError> {
        Ok(Params {
            kind: self.plural.map(Kind::from_plural).transpose()?.unwrap_or_default(),
            repo: match (self.org, self.name) {
                (Some(org), Some(name)) => format!("{org}/{name}"),
                _ => String::new(),
            },
            rev: self.rev,
            path: self.path,
        })
    }
}

/// Matches decoded path segments against a pattern (see the module docs).
fn capture<'s>(pattern: &str, segs: &[&'s str]) -> Option<Captures<'s>> {
    let mut c = Captures::default();
    let mut i = 0;
    for part in pattern.split('/') {
        let Some(var) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) else {
            if segs.get(i) != Some(&part) {
                return None;
            }
            i += 1;
            continue;
        };
        let rest = segs.get(i..).unwrap_or_default();
        if let Some(var) = var.strip_suffix('+') {
            if rest.is_empty() {
                return None;
            }
            c.set_rest(var, rest.join("/"));
            return Some(c);
        }
        if let Some(var) = var.strip_suffix('*') {
            c.set_rest(var, rest.join("/"));
            return Some(c);
        }
        let seg = *segs.get(i)?;
        let var = match var.split_once('=') {
            Some((var, allowed)) => {
                if !allowed.split('|').any(|a| a == seg) {
                    return None;
                }
                var
            }
            None => var,
        };
        c.set(var, seg);
        i += 1;
    }
    (i == segs.len()).then_some(c)
}

/// The first route matching the segments, and what it captured.
#[cfg(test)]
fn find<'s>(segs: &[&'s str]) -> Option<(&'static Route, Captures<'s>)> {
    ROUTES.iter().find_map(|r| capture(r.pattern, segs).map(|c| (r, c)))
}

/// A request that matched `route`: its context and parameters, once the kind and the
/// access are checked.
pub(super) fn prepare(
    state: Arc<State>,
    route: &Route,
    method: &str,
    target: &str,
    headers: &axum::http::HeaderMap,
) -> Result<(Ctx, Params), ApiError> {
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
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    // The segments are split before they are decoded, as the router split them, so the
    // pattern the router matched matches them too.
    let params = capture(route.pattern, &segs).ok_or_else(ApiError::not_found_route)?.params()?;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let token = Token::from_header(header("Authorization"), &state.options);
    auth::check(route.access, token, &state.options)?;
    let ctx = Ctx {
        base: format!("http://{}", host(header("Host"), state.addr)),
        method: method.to_owned(),
        raw_path: raw_path.to_owned(),
        query: form_pairs(raw_query).collect(),
        raw_query: raw_query.to_owned(),
        token,
        state,
    };
    Ok((ctx, params))
}

/// The `Host` the client asked for when it looks like one, else the address listened on.
fn host(header: Option<&str>, addr: SocketAddr) -> String {
    header
        .filter(|h| !h.is_empty() && h.len() <= 255 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b)))
        .map_or_else(|| addr.to_string(), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pattern of the route answering `path`, and its parameters.
    fn resolve(path: &str) -> Option<(&'static str, Result<Params, u16>)> {
        let segs: Vec<&str> = path.split('/').collect();
        find(&segs).map(|(r, c)| (r.pattern, c.params().map_err(|e| e.status)))
    }

    #[test]
    fn paths_find_their_route() {
        let cases = [
            ("api/whoami-v2", "api/whoami-v2", Kind::Model, "", None, ""),
            (
                "api/kernels/acme/k/revision/refs/pr/1",
                "api/{kind}/{org}/{name}/revision/{rev+}",
                Kind::Kernel,
                "acme/k",
                Some("refs/pr/1"),
                "",
            ),
            (
                "api/models/acme/k/tree/main",
                "api/{kind}/{org}/{name}/tree/{rev}/{path*}",
                Kind::Model,
                "acme/k",
                Some("main"),
                "",
            ),
            (
                "api/models/acme/k/tree/main/a/b",
                "api/{kind}/{org}/{name}/tree/{rev}/{path*}",
                Kind::Model,
                "acme/k",
                Some("main"),
                "a/b",
            ),
            (
                "kernels/acme/k/resolve/v1/a/b.so",
                "{kind=kernels|datasets|spaces}/{org}/{name}/resolve/{rev}/{path+}",
                Kind::Kernel,
                "acme/k",
                Some("v1"),
                "a/b.so",
            ),
            (
                "acme/k/resolve/main/khub.toml",
                "{org}/{name}/resolve/{rev}/{path+}",
                Kind::Model,
                "acme/k",
                Some("main"),
                "khub.toml",
            ),
        ];
        for (path, pattern, kind, repo, rev, file) in cases {
            let expected = Params {
                kind,
                repo: repo.into(),
                rev: rev.map(str::to_owned),
                path: file.into(),
            };
            assert_eq!(resolve(path), Some((pattern, Ok(expected))), "{path}");
        }
    }

    #[test]
    fn what_no_route_answers() {
        // Not found at all: the fallback answers 404 NotFound.
        for path in [
            "",
            "api/models/acme",
            "acme/k/resolve/main",
            "models/acme/k/resolve/main/f",
            "api/models/acme/k/",
            "api/models/acme/resolve/main/f",
            "api/models/acme/k/revision",
        ] {
            assert!(resolve(path).is_none(), "{path}");
        }
        // The kind is checked once a route matched.
        assert_eq!(resolve("api/datasets/acme/k/refs").unwrap().1, Err(404));
        assert_eq!(resolve("datasets/acme/k/resolve/main/f").unwrap().1, Err(404));
        assert_eq!(resolve("api/spaces").unwrap().1, Err(404));
        assert_eq!(resolve("api/whoami-v2/x/y").unwrap().1, Err(404));
    }

    #[test]
    fn patterns_become_axum_paths() {
        assert_eq!(axum_paths("api/{kind}/{org}/{name}/refs"), ["/api/{kind}/{org}/{name}/refs"]);
        assert_eq!(
            axum_paths("api/{kind}/{org}/{name}/revision/{rev+}"),
            ["/api/{kind}/{org}/{name}/revision/{*rev}"]
        );
        assert_eq!(
            axum_paths("api/{kind}/{org}/{name}/tree/{rev}/{path*}"),
            ["/api/{kind}/{org}/{name}/tree/{rev}", "/api/{kind}/{org}/{name}/tree/{rev}/{*path}"]
        );
        assert_eq!(
            axum_paths("{kind=kernels|datasets}/{org}/{name}/resolve/{rev}/{path+}"),
            [
                "/kernels/{org}/{name}/resolve/{rev}/{*path}",
                "/datasets/{org}/{name}/resolve/{rev}/{*path}"
            ]
        );
    }

    #[test]
    fn every_pattern_is_well_formed() {
        for r in ROUTES {
            let parts: Vec<&str> = r.pattern.split('/').collect();
            for (i, part) in parts.iter().enumerate() {
                let Some(var) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) else {
                    assert!(!part.contains(['{', '}']), "{}", r.pattern);
                    continue;
                };
                let var = var.split_once('=').map_or(var, |(v, _)| v);
                let rest = var.ends_with(['*', '+']);
                assert!(!rest || i + 1 == parts.len(), "a rest capture must be last: {}", r.pattern);
                let known = ["kind", "org", "name", "rev", "rev+", "path*", "path+"];
                assert!(known.contains(&var), "unknown capture {var} in {}", r.pattern);
            }
        }
    }
}
