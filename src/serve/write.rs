//! The write API: creating repositories and committing releases. Refs are derived from the
//! release directories, so tag and branch requests are only checked against them.
//!
//! This module parses the wire format; the release itself is checked, staged and moved
//! into place by [`crate::registry::dir::commit_release`].

use std::io::{self, BufRead, Read};

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

use super::http::{ApiError, Input, Reply, clip, parse_json};
use super::read::{load_repo, rel_path};
use super::routes::{Ctx, Kind, Params};
use crate::manifest::RelPath;
use crate::registry::RepoId;
use crate::registry::dir::{CommitError, commit_release};

/// `POST /api/repos/create`: creates a repository directory (and its organisation's).
pub(super) fn create_repo(ctx: &Ctx, rq: &mut Input, _: &Params) -> Result<Reply, ApiError> {
    #[derive(Deserialize)]
    struct Req {
        name: String,
        #[serde(default)]
        organization: Option<String>,
        #[serde(default, rename = "type")]
        kind: Option<String>,
    }
    let r: Req = rq.json()?;
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
        // Messages name the organization, never the registry's path on this machine.
        Ok(_) => {
            return Err(ApiError::new(
                409,
                Some("RepoExists"),
                format!("`{}` in the registry is not a directory: choose another organization", repo.org()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => match std::fs::create_dir(&org_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(ApiError::internal(format!("creating organization `{}`: {}", repo.org(), e.kind()))),
        },
        Err(e) => return Err(ApiError::internal(format!("organization `{}`: {}", repo.org(), e.kind()))),
    }
    match std::fs::create_dir(org_dir.join(repo.name())) {
        Ok(()) => Ok(Reply::json(
            200,
            &json!({ "url": url, "name": repo.to_string(), "id": repo.to_string() }),
        )),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(ApiError::new(409, Some("RepoExists"), "You already created this repo")
            .with_body(json!({ "error": "You already created this repo", "url": url }))),
        Err(e) => Err(ApiError::internal(format!("creating {repo}: {e}"))),
    }
}

/// `POST /api/{P}/{org}/{name}/preupload/{rev}`: every file is a regular (inline) upload.
pub(super) fn preupload(ctx: &Ctx, rq: &mut Input, p: &Params) -> Result<Reply, ApiError> {
    #[derive(Deserialize)]
    struct File {
        path: String,
    }
    #[derive(Deserialize)]
    struct Req {
        #[serde(default)]
        files: Vec<File>,
    }
    let r: Req = rq.json()?;
    load_repo(ctx, &p.repo)?;
    commit_branch(p.rev())?;
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

/// A commit line's operation. Its value is skipped here, not built: a `header` line may be
/// as long as a file line (over a gigabyte), and a JSON value tree costs about 16 times
/// its text in memory. Only a `file` line's value is read, into [`FileLine`].
#[derive(Deserialize)]
struct CommitLine {
    key: String,
    #[serde(default, rename = "value")]
    _value: serde::de::IgnoredAny,
}

/// A `file` line, read for its value's three fields (anything else in it is skipped).
#[derive(Deserialize)]
struct FileLine {
    #[serde(default)]
    value: FileValue,
}

/// What a `file` operation carries.
#[derive(Deserialize, Default)]
struct FileValue {
    path: Option<String>,
    content: Option<String>,
    encoding: Option<String>,
}

/// `POST /api/{P}/{org}/{name}/commit/{rev}`: an NDJSON commit that creates exactly one new
/// release, written by [`commit_release`].
pub(super) fn commit(ctx: &Ctx, rq: &mut Input, p: &Params) -> Result<Reply, ApiError> {
    if ctx.flag("create_pr") {
        return Err(ApiError::bad_request(
            "pull requests are not supported: commit a new release instead",
        ));
    }
    let repo = load_repo(ctx, &p.repo)?;
    let major = commit_branch(p.rev())?;
    let limits = &ctx.state.limits;
    let files = CommitFiles {
        reader: rq.take_stream(),
        total: 0,
        max_total: limits.max_commit_bytes,
        max_file: limits.max_file_bytes,
        line: Vec::new(),
    };
    let release = commit_release(&ctx.state.root, &repo.id, major, files)?;
    let oid = release.commit;
    Ok(Reply::json(
        200,
        &json!({
            "success": true,
            "commitUrl": format!("{}/commit/{oid}", ctx.repo_url(p.kind, &repo.id)),
            "commitOid": oid,
            "commitMessage": format!("release {}", release.version),
            "pullRequestUrl": null,
        }),
    ))
}

/// The files of an NDJSON commit body, decoded one line at a time. No line is buffered
/// beyond what the largest allowed file needs in base64.
struct CommitFiles<R> {
    reader: R,
    /// The bytes read so far.
    total: u64,
    /// The most bytes the body may have.
    max_total: u64,
    /// The most bytes one file may have.
    max_file: u64,
    line: Vec<u8>,
}

impl<R: BufRead> CommitFiles<R> {
    /// The longest line a file of `max_file` bytes needs: its base64, and room for the
    /// path and the JSON around it.
    fn max_line(&self) -> u64 {
        self.max_file.div_ceil(3).saturating_mul(4).saturating_add(64 * 1024)
    }

    /// The next file operation's path and bytes; `None` at the end of the body.
    fn next_file(&mut self) -> Result<Option<(RelPath, Vec<u8>)>, ApiError> {
        loop {
            self.line.clear();
            let max_line = self.max_line();
            let n = (&mut self.reader)
                .take(max_line.saturating_add(1))
                .read_until(b'\n', &mut self.line)
                .map_err(|e| ApiError::bad_request(format!("reading the commit: {e}")))?;
            if n == 0 {
                return Ok(None);
            }
            self.total += n as u64;
            if self.total > self.max_total {
                return Err(ApiError::too_large(self.max_total));
            }
            if n as u64 > max_line {
                return Err(ApiError::file_too_large(self.max_file));
            }
            let text = self.line.trim_ascii();
            if text.is_empty() {
                continue;
            }
            let op: CommitLine = serde_json::from_slice(text).map_err(|e| ApiError::bad_request(format!("invalid NDJSON line: {e}")))?;
            match op.key.as_str() {
                "header" => {}
                "file" => {
                    let line: FileLine =
                        serde_json::from_slice(text).map_err(|e| ApiError::bad_request(format!("invalid file operation: {e}")))?;
                    let (path, bytes) = file_op(&line.value)?;
                    if bytes.len() as u64 > self.max_file {
                        return Err(ApiError::file_too_large(self.max_file));
                    }
                    return Ok(Some((path, bytes)));
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
    }
}

impl<R: BufRead> Iterator for CommitFiles<R> {
    type Item = Result<(RelPath, Vec<u8>), ApiError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_file().transpose()
    }
}

/// The path and bytes of a `file` operation: its content inline, UTF-8 or base64.
fn file_op(value: &FileValue) -> Result<(RelPath, Vec<u8>), ApiError> {
    let path = value
        .path
        .as_deref()
        .ok_or_else(|| ApiError::bad_request("a file operation has no `path`"))?;
    let rel = rel_path(path)?;
    let content = value
        .content
        .as_deref()
        .ok_or_else(|| ApiError::bad_request(format!("file `{}` has no `content`", clip(path))))?;
    let bytes = match value.encoding.as_deref().unwrap_or("utf-8") {
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
    Ok((rel, bytes))
}

impl From<CommitError> for ApiError {
    fn from(e: CommitError) -> ApiError {
        match e {
            CommitError::RepoNotFound { repo } => ApiError::repo_not_found(&repo.to_string()),
            CommitError::ReleaseExists { .. } => ApiError::new(409, Some("ReleaseExists"), e.to_string()),
            CommitError::Io { .. } => ApiError::internal(e.to_string()),
            _ => ApiError::bad_request(e.to_string()),
        }
    }
}

/// `POST`/`DELETE /api/{P}/{org}/{name}/tag/{rev}`: tags are derived, so creating the tag a
/// release has is accepted and anything else refused.
pub(super) fn tag(ctx: &Ctx, rq: &mut Input, p: &Params) -> Result<Reply, ApiError> {
    let (id, rev) = (p.repo.as_str(), p.rev());
    let derived = |m: String| derived_refs(m, TAGS_RULE);
    if ctx.method == "DELETE" {
        return Err(refuse_delete(ctx, id, "tag", rev, TAGS_RULE));
    }
    #[derive(Deserialize)]
    struct Req {
        tag: String,
    }
    let r: Req = rq.json()?;
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

/// `POST`/`DELETE /api/{P}/{org}/{name}/branch/{branch}`: branches are derived, so creating
/// one that exists (at the same release) is accepted and anything else refused.
pub(super) fn branch(ctx: &Ctx, rq: &mut Input, p: &Params) -> Result<Reply, ApiError> {
    let (id, branch) = (p.repo.as_str(), p.rev());
    let derived = |m: String| derived_refs(m, BRANCHES_RULE);
    if ctx.method == "DELETE" {
        return Err(refuse_delete(ctx, id, "branch", branch, BRANCHES_RULE));
    }
    #[derive(Deserialize, Default)]
    struct Req {
        #[serde(default, rename = "startingPoint")]
        starting_point: Option<String>,
    }
    let body = rq.body();
    let r: Req = if body.trim_ascii().is_empty() {
        Req::default()
    } else {
        parse_json(body)?
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

const TAGS_RULE: &str = "tags are derived from release directories (v<version>)";
const BRANCHES_RULE: &str = "branches are derived from release directories (main and v<major>)";

/// A ref request that the releases do not back: refs are derived from them.
fn derived_refs(message: String, rule: &str) -> ApiError {
    ApiError::new(409, Some("DerivedRefs"), format!("{message}: {rule}"))
}

/// The answer to deleting a ref (`what` is `tag` or `branch`): refused, once the repository
/// is known to exist.
fn refuse_delete(ctx: &Ctx, id: &str, what: &str, name: &str, rule: &str) -> ApiError {
    match load_repo(ctx, id) {
        Ok(_) => derived_refs(format!("cannot delete {what} `{}`", clip(name)), rule),
        Err(e) => e,
    }
}

/// `POST /api/validate-yaml`: checks a README's front matter before an upload, as the Hub
/// does (`{"content": …, "repoType": …}` → `{"errors": [], "warnings": []}`, 400 with the
/// errors). khub checks the block's structure, not a full YAML parse: see
/// [`front_matter_errors`].
pub(super) fn validate_yaml(_: &Ctx, rq: &mut Input, _: &Params) -> Result<Reply, ApiError> {
    #[derive(Deserialize)]
    struct Req {
        content: String,
    }
    let r: Req = rq.json()?;
    let errors: Vec<Value> = front_matter_errors(&r.content)
        .into_iter()
        .map(|m| json!({ "message": m }))
        .collect();
    let status = if errors.is_empty() { 200 } else { 400 };
    let mut reply = Reply::json(status, &json!({ "errors": errors, "warnings": [] }));
    if status == 400 {
        reply = reply
            .header("X-Error-Code", "InvalidYaml")
            .header("X-Error-Message", "Invalid metadata in README.md");
    }
    Ok(reply)
}

/// What is wrong with a README's front matter (the block between a first line `---` and
/// the next line `---`); nothing when it has none. The block must be closed and be a
/// mapping: top-level lines are `key:` or `key: value` with unique keys, nested lines are
/// indented with spaces (YAML forbids tabs), and comments and blank lines are allowed.
///
/// At most [`MAX_FRONT_MATTER_ERRORS`] are listed, then one line counting the rest: a
/// megabyte of bad lines would otherwise answer with hundreds of megabytes of messages.
pub(super) fn front_matter_errors(content: &str) -> Vec<String> {
    let content = content.strip_prefix('\u{feff}').unwrap_or(content);
    let mut lines = content.lines();
    if lines.next().map(str::trim_end) != Some("---") {
        return Vec::new();
    }
    let mut errors = Errors::default();
    let mut keys = std::collections::BTreeSet::new();
    let mut closed = false;
    for (i, line) in lines.enumerate() {
        let n = i + 2;
        if line.trim_end() == "---" || line.trim_end() == "..." {
            closed = true;
            break;
        }
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let indent = line.len() - line.trim_start_matches([' ', '\t']).len();
        if line[..indent].contains('\t') {
            errors.push(format!("line {n}: tabs cannot indent YAML"));
            continue;
        }
        if indent > 0 || line.starts_with("- ") || line == "-" {
            // Nested content, or a list under the previous key.
            continue;
        }
        let Some((key, _)) = line.split_once(':') else {
            errors.push(format!(
                "line {n}: expected `key: value` in the metadata mapping, found `{}`",
                clip(line)
            ));
            continue;
        };
        let key = key.trim().trim_matches(['"', '\'']);
        if key.is_empty() {
            errors.push(format!("line {n}: empty key"));
        } else if !keys.insert(key.to_owned()) {
            errors.push(format!("line {n}: duplicated mapping key `{}`", clip(key)));
        }
    }
    if !closed {
        errors.push("the metadata block opened by `---` on the first line is never closed by a line `---`".to_owned());
    }
    errors.finish()
}

/// How many front-matter errors are listed before the rest are only counted.
const MAX_FRONT_MATTER_ERRORS: usize = 20;

/// Front-matter errors, the first [`MAX_FRONT_MATTER_ERRORS`] kept, the rest counted.
#[derive(Default)]
struct Errors {
    kept: Vec<String>,
    more: usize,
}

impl Errors {
    fn push(&mut self, message: String) {
        if self.kept.len() < MAX_FRONT_MATTER_ERRORS {
            self.kept.push(message);
        } else {
            self.more += 1;
        }
    }

    fn finish(mut self) -> Vec<String> {
        if self.more > 0 {
            self.kept.push(format!("… and {} more errors not listed", self.more));
        }
        self.kept
    }
}

#[cfg(test)]
mod tests {
    use super::front_matter_errors;

    #[test]
    fn front_matter_is_checked() {
        assert!(front_matter_errors("# Title\n\ntext").is_empty(), "no metadata is fine");
        let ok = "---\nlicense: apache-2.0\ntags:\n- kernels\n  - nested\ndescription: |\n  text: with colon\n# note\n---\n# Title\n";
        assert!(front_matter_errors(ok).is_empty(), "{:?}", front_matter_errors(ok));
        assert_eq!(front_matter_errors("---\nlicense: mit\n# Title").len(), 1, "never closed");
        assert_eq!(front_matter_errors("---\na: 1\na: 2\n---\n").len(), 1, "duplicate key");
        assert_eq!(front_matter_errors("---\na:\n\t- x\n---\n").len(), 1, "tab indent");
        assert_eq!(front_matter_errors("---\njust words\n---\n").len(), 1, "not a mapping");
    }

    /// A megabyte of bad lines answers with 21 messages, not one per line (each ~70
    /// bytes of message for 2 bytes of input).
    #[test]
    fn front_matter_errors_are_bounded() {
        let content = format!("---\n{}", "x\n".repeat(500_000));
        let errors = front_matter_errors(&content);
        assert_eq!(errors.len(), super::MAX_FRONT_MATTER_ERRORS + 1);
        assert!(errors[0].starts_with("line 2:"), "{}", errors[0]);
        // 500,000 lines that are not `key: value`, and the block never closed.
        assert_eq!(errors[20], "… and 499981 more errors not listed");
    }
}
