//! The read API: repository info, refs, listings, commits and file downloads, over the
//! releases of a directory registry.

use std::collections::BTreeSet;
use std::io::{self, Seek, SeekFrom};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::http::{ApiError, Body, ByteRange, Input, Reply, clip, form_pairs, parse_json, parse_range};
use super::routes::{Ctx, Kind, Params};
use crate::fsx::{OpenError, open_under};
use crate::manifest::{Manifest, RelPath};
use crate::registry::dir::{ReleaseDir, derive_refs, scan_repo};
use crate::registry::{Refs, RepoId};

/// The most entries a release listing may have.
const MAX_LISTED: usize = 1_000_000;
/// The deepest directory nesting listed.
const MAX_DEPTH: usize = 64;
/// The size the Hub reports for an LFS pointer file.
const LFS_POINTER_SIZE: u64 = 134;

// ---------------------------------------------------------------------------------------
// Repositories, revisions and entries
// ---------------------------------------------------------------------------------------

/// A repository and its releases, as scanned for one request.
pub(super) struct Repo {
    pub(super) id: RepoId,
    releases: Vec<ReleaseDir>,
    pub(super) refs: Refs,
}

impl Repo {
    /// The release at a branch, tag, `refs/heads/…`, `refs/tags/…` or 40-hex commit.
    pub(super) fn release(&self, rev: &str) -> Result<&ReleaseDir, ApiError> {
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

/// The repository `id` (`org/name`), or 404.
pub(super) fn load_repo(ctx: &Ctx, id: &str) -> Result<Repo, ApiError> {
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
    Ok(Repo { id: repo, releases, refs })
}

/// A path inside a release, or 400.
pub(super) fn rel_path(path: &str) -> Result<RelPath, ApiError> {
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
// Handlers
// ---------------------------------------------------------------------------------------

/// `GET /api/{P}/{org}/{name}[/revision/{rev}]`: repository info at a revision (`main`
/// by default, where a repository without releases has none).
pub(super) fn info(ctx: &Ctx, _: &mut Input, p: &Params) -> Result<Reply, ApiError> {
    let repo = load_repo(ctx, &p.repo)?;
    let release = match p.rev.as_deref() {
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
    let mut v = summary_json(&repo.id, release, p.kind);
    v["siblings"] = Value::Array(siblings);
    v["spaces"] = json!([]);
    v["trustedPublisher"] = json!(false);
    v["supportedDriverFamilies"] = json!(families);
    Ok(Reply::json(200, &v))
}

/// What both the repository info and the listings say of a repository at a release.
fn summary_json(id: &RepoId, release: Option<&ReleaseDir>, kind: Kind) -> Value {
    let date = release.map(release_date);
    json!({
        "_id": internal_id(id),
        "id": id.to_string(),
        "modelId": id.to_string(),
        "author": id.org(),
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
        "repoType": match kind { Kind::Model => "model", Kind::Kernel => "kernel" },
    })
}

/// The real directories under `dir` whose names are valid, sorted; hidden entries and
/// symlinks are skipped.
fn subdirs(dir: &Path) -> Result<Vec<String>, ApiError> {
    let rd = std::fs::read_dir(dir).map_err(|e| ApiError::internal(format!("listing the registry: {e}")))?;
    let mut out: Vec<String> = rd
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    out.sort();
    Ok(out)
}

/// `GET /api/{models,kernels}?author=&search=&limit=`: the repositories, sorted by id,
/// `author` matching the organisation exactly and `search` a part of `org/name` (any
/// case); each as the repository info says it (at `main`, without siblings). Paginated
/// with `Link` like the Hub.
pub(super) fn list(ctx: &Ctx, _: &mut Input, p: &Params) -> Result<Reply, ApiError> {
    let author = ctx.param("author").filter(|a| !a.is_empty());
    let search = ctx.param("search").map(str::to_lowercase).filter(|s| !s.is_empty());
    let root = &ctx.state.root;
    let mut ids = Vec::new();
    for org in subdirs(root)? {
        if author.is_some_and(|a| a != org) {
            continue;
        }
        for name in subdirs(&root.join(&org))? {
            let Ok(id) = format!("{org}/{name}").parse::<RepoId>() else {
                continue;
            };
            if search.as_ref().is_some_and(|s| !id.to_string().to_lowercase().contains(s.as_str())) {
                continue;
            }
            ids.push(id);
        }
    }
    let (offset, end) = page_bounds(ctx, ids.len())?;
    let mut out = Vec::new();
    for id in ids.get(offset..end).unwrap_or_default() {
        let (releases, _) = scan_repo(root, id)?;
        let refs = derive_refs(&releases);
        let main = refs
            .branches
            .iter()
            .find(|b| b.name == "main")
            .and_then(|b| releases.iter().find(|r| r.commit == b.commit));
        out.push(summary_json(id, main, p.kind));
    }
    let mut reply = Reply::json(200, &Value::Array(out));
    if end < ids.len() {
        reply = reply.header("Link", next_link(ctx, end));
    }
    Ok(reply)
}

/// The `Link` header of the next page, which starts at entry `cursor`.
/// The slice of a listing of `len` entries one page covers: from `cursor=` (default 0),
/// at most the server's page size, or `limit=` when smaller.
fn page_bounds(ctx: &Ctx, len: usize) -> Result<(usize, usize), ApiError> {
    let offset = match ctx.param("cursor") {
        None | Some("") => 0,
        Some(c) => c.parse::<usize>().map_err(|_| ApiError::bad_request("invalid cursor"))?,
    };
    let mut page = ctx.state.options.page_size.max(1);
    if let Some(l) = ctx.param("limit").and_then(|l| l.parse::<usize>().ok()).filter(|&l| l > 0) {
        page = page.min(l);
    }
    Ok((offset, offset.saturating_add(page).min(len)))
}

fn next_link(ctx: &Ctx, cursor: usize) -> String {
    let mut q: Vec<&str> = ctx
        .raw_query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("cursor="))
        .collect();
    let cursor = format!("cursor={cursor}");
    q.push(&cursor);
    format!("<{}{}?{}>; rel=\"next\"", ctx.base, ctx.raw_path, q.join("&"))
}

/// `GET /api/{P}/{org}/{name}/refs`: branches and tags.
pub(super) fn refs(ctx: &Ctx, _: &mut Input, p: &Params) -> Result<Reply, ApiError> {
    let repo = load_repo(ctx, &p.repo)?;
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

/// `GET /api/{P}/{org}/{name}/tree/{rev}[/{path}]`: a directory listing, paginated with
/// `Link`.
pub(super) fn tree(ctx: &Ctx, _: &mut Input, p: &Params) -> Result<Reply, ApiError> {
    let repo = load_repo(ctx, &p.repo)?;
    let release = repo.release(p.rev())?;
    let path = p.path.trim_end_matches('/');
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
    let (offset, end) = page_bounds(ctx, entries.len())?;
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
        reply = reply.header("Link", next_link(ctx, end));
    }
    Ok(reply)
}

/// `POST /api/{P}/{org}/{name}/paths-info/{rev}`: the entries at the paths asked for (a
/// form or JSON), skipping those that do not exist.
pub(super) fn paths_info(ctx: &Ctx, rq: &mut Input, p: &Params) -> Result<Reply, ApiError> {
    let body = rq.body();
    let form = rq
        .header("Content-Type")
        .is_some_and(|t| t.starts_with("application/x-www-form-urlencoded"));
    let (paths, expand) = if form {
        let text = std::str::from_utf8(body).map_err(|_| ApiError::bad_request("the form is not UTF-8"))?;
        let mut paths = Vec::new();
        let mut expand = false;
        for (k, v) in form_pairs(text) {
            match k.as_str() {
                "paths" => paths.push(v),
                "expand" => expand = matches!(v.as_str(), "1" | "true" | "True"),
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
        let r: Req = parse_json(body)?;
        (r.paths, r.expand)
    };
    let repo = load_repo(ctx, &p.repo)?;
    let release = repo.release(p.rev())?;
    let mut out = Vec::new();
    for path in paths.iter().take(10_000) {
        let path = path.trim_matches('/');
        let Ok(rel) = RelPath::new(path) else { continue };
        match kind_of(&release.dir, &rel)? {
            Kindof::Dir => out.push(dir_json(release, path, expand)),
            Kindof::File => out.push(file_json(ctx, release, path, expand)?),
            Kindof::Missing | Kindof::Other(_) => {}
        }
    }
    Ok(Reply::json(200, &Value::Array(out)))
}

/// `GET /api/{P}/{org}/{name}/commits/{rev}`: the release's single commit.
pub(super) fn commits(ctx: &Ctx, _: &mut Input, p: &Params) -> Result<Reply, ApiError> {
    let repo = load_repo(ctx, &p.repo)?;
    let release = repo.release(p.rev())?;
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

/// `HEAD`/`GET /[kernels/]{org}/{name}/resolve/{rev}/{path}`: a file's bytes, with `Range`.
pub(super) fn resolve(ctx: &Ctx, rq: &mut Input, p: &Params) -> Result<Reply, ApiError> {
    let repo = load_repo(ctx, &p.repo)?;
    let release = repo.release(p.rev())?;
    let path = p.path.as_str();
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
        parse_range(rq.header("Range"), size)
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
