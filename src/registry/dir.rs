//! A directory registry: releases on disk, no network. `khub serve` serves the same layout.
//!
//! ```text
//! <root>/<org>/<name>/<version>/khub.toml      one release per directory, named by its
//! <root>/<org>/<name>/<version>/variants/…     semver version (no leading `v`)
//! ```
//!
//! Refs are derived from the directories, like the Hub's conventions for kernels:
//! - a tag `v<version>` per release whose `khub.toml` parses and names that version;
//! - a branch `v<major>` pointing at the highest release of that major (releases
//!   preferred over pre-releases);
//! - a branch `main` pointing at the highest release overall.
//!
//! A release's commit id is derived from its manifest bytes (which pin every file's
//! digest): the first 20 bytes of SHA-256 over `"khub-release-v1\0"` and the manifest, as 40
//! hex digits. So ids are stable, content-addressed and need no state beside the files.
//!
//! Releases are written by [`commit_release`] (which `khub serve` calls for a commit): staged
//! in a hidden directory, synced, and renamed into place in one step.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use semver::Version;
use sha2::{Digest, Sha256};

use super::{GitRef, Refs, Registry, RegistryError, RepoId, copy_limited};
use crate::manifest::{Manifest, RelPath, Sha256Digest};

/// One release found in a repository directory.
#[derive(Debug, Clone)]
pub struct ReleaseDir {
    /// Its version.
    pub version: Version,
    /// Its commit id.
    pub commit: String,
    /// Its directory.
    pub dir: PathBuf,
    /// The raw manifest.
    pub manifest_bytes: Vec<u8>,
}

/// The commit id of a release with these manifest bytes.
pub fn commit_id(manifest_bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"khub-release-v1\0");
    h.update(manifest_bytes);
    hex::encode(&h.finalize()[..20])
}

/// The directory of a repository under a registry root.
pub fn repo_dir(root: &Path, repo: &RepoId) -> PathBuf {
    root.join(repo.org()).join(repo.name())
}

/// Scans a repository directory for releases, highest version first. Directories whose
/// name is not a version, whose manifest is missing or invalid, or whose manifest names
/// another version are skipped and reported in the second list.
pub fn scan_repo(root: &Path, repo: &RepoId) -> Result<(Vec<ReleaseDir>, Vec<String>), RegistryError> {
    let scan = scan_repo_detailed(root, repo)?;
    Ok((scan.releases, scan.skipped))
}

/// What [`scan_repo_detailed`] found in a repository directory.
#[derive(Debug, Default)]
pub struct RepoScan {
    /// The usable releases, highest version first.
    pub releases: Vec<ReleaseDir>,
    /// Every entry skipped, as `name: why`, sorted.
    pub skipped: Vec<String>,
    /// The skipped entries named like a version (meant as releases), with why each is
    /// unusable: a resolver reports these rather than silently choosing around them.
    pub unusable: Vec<(Version, String)>,
}

/// As [`scan_repo`], keeping apart the skipped entries that are named like a release.
pub fn scan_repo_detailed(root: &Path, repo: &RepoId) -> Result<RepoScan, RegistryError> {
    let dir = repo_dir(root, repo);
    let meta = std::fs::symlink_metadata(&dir);
    match meta {
        Ok(m) if m.is_dir() => {}
        _ => {
            return Err(RegistryError::RepoNotFound {
                repo: repo.clone(),
                registry: root.display().to_string(),
            });
        }
    }
    let entries = std::fs::read_dir(&dir).map_err(|source| RegistryError::Io {
        what: format!("listing {}", dir.display()),
        source,
    })?;
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    let mut unusable: Vec<(Version, String)> = Vec::new();
    let mut refuse = |version: &Version, name: &str, why: String, skipped: &mut Vec<String>| {
        skipped.push(format!("{name}: {why}"));
        unusable.push((version.clone(), why));
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(version) = name.parse::<Version>() else {
            if !name.starts_with('.') {
                skipped.push(format!("{name}: not a version"));
            }
            continue;
        };
        match e.file_type() {
            Ok(t) if t.is_dir() => {}
            Ok(t) if t.is_symlink() => {
                refuse(
                    &version,
                    &name,
                    "it is a symlink; release directories must be real directories".into(),
                    &mut skipped,
                );
                continue;
            }
            _ => {
                refuse(&version, &name, "it is not a directory".into(), &mut skipped);
                continue;
            }
        }
        let manifest_path = RelPath::new("khub.toml").map_err(|e| RegistryError::Io {
            what: "khub.toml".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let bytes = match crate::fsx::open_under(&e.path(), &manifest_path) {
            Ok(mut f) => {
                let mut buf = Vec::new();
                match copy_limited(
                    &mut f,
                    &mut buf,
                    super::MAX_MANIFEST_BYTES,
                    "khub.toml",
                    &root.display().to_string(),
                ) {
                    Ok(_) => buf,
                    Err(err) => {
                        refuse(&version, &name, err.to_string(), &mut skipped);
                        continue;
                    }
                }
            }
            Err(err) => {
                refuse(&version, &name, err.to_string(), &mut skipped);
                continue;
            }
        };
        match Manifest::from_bytes(&bytes) {
            Ok(m) if m.kernel.version == version => out.push(ReleaseDir {
                version,
                commit: commit_id(&bytes),
                dir: e.path(),
                manifest_bytes: bytes,
            }),
            Ok(m) => refuse(
                &version,
                &name,
                format!("its khub.toml says version {}", m.kernel.version),
                &mut skipped,
            ),
            Err(err) => refuse(&version, &name, format!("its khub.toml is not valid: {err}"), &mut skipped),
        }
    }
    out.sort_by(|a, b| b.version.cmp(&a.version));
    skipped.sort();
    unusable.sort_by(|a, b| b.0.cmp(&a.0));
    Ok(RepoScan {
        releases: out,
        skipped,
        unusable,
    })
}

/// The refs derived from a repository's releases (see the module docs).
pub fn derive_refs(releases: &[ReleaseDir]) -> Refs {
    let tags = releases
        .iter()
        .map(|r| GitRef {
            name: format!("v{}", r.version),
            commit: r.commit.clone(),
        })
        .collect();
    // Highest first; a release beats a pre-release for branch heads.
    let rank = |r: &ReleaseDir| (r.version.pre.is_empty(), r.version.clone());
    let mut heads: BTreeMap<String, &ReleaseDir> = BTreeMap::new();
    for r in releases {
        for name in [format!("v{}", r.version.major), "main".to_owned()] {
            let replace = heads.get(&name).is_none_or(|cur| rank(r) > rank(cur));
            if replace {
                heads.insert(name, r);
            }
        }
    }
    let branches = heads
        .into_iter()
        .map(|(name, r)| GitRef {
            name,
            commit: r.commit.clone(),
        })
        .collect();
    Refs { tags, branches }
}

/// A release could not be committed by [`commit_release`]. Nothing of it is left behind.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommitError {
    /// The repository directory does not exist (or is not a real directory).
    #[error("repository {repo} not found")]
    RepoNotFound {
        /// The repository.
        repo: RepoId,
    },
    /// A path is both a file and a directory in this commit.
    #[error("`{path}` is both a file and a directory in this commit")]
    PathConflict {
        /// The path.
        path: String,
    },
    /// The commit has no `khub.toml`.
    #[error("a release commit must include khub.toml")]
    MissingManifest,
    /// `khub.toml` is larger than [`super::MAX_MANIFEST_BYTES`].
    #[error("khub.toml is larger than {} bytes", super::MAX_MANIFEST_BYTES)]
    ManifestTooLarge,
    /// `khub.toml` does not parse.
    #[error("khub.toml: {0}")]
    InvalidManifest(#[source] crate::manifest::ManifestError),
    /// The manifest lists a file the commit does not include.
    #[error("khub.toml lists `{path}` but the commit does not include it")]
    MissingFile {
        /// The path listed.
        path: String,
    },
    /// A file's size or digest differs from what the manifest lists.
    #[error("`{path}` is {size} bytes with sha256 {sha256}, but khub.toml says {expected_size} bytes with sha256 {expected_sha256}")]
    FileMismatch {
        /// The path.
        path: String,
        /// Its size in the commit.
        size: u64,
        /// Its digest in the commit.
        sha256: Sha256Digest,
        /// The size the manifest lists.
        expected_size: u64,
        /// The digest the manifest lists.
        expected_sha256: Sha256Digest,
    },
    /// The release's major is not the one of the `v<major>` branch committed to.
    #[error("release {version} cannot be committed to branch v{major}")]
    WrongBranch {
        /// The release's version.
        version: Version,
        /// The branch's major.
        major: u64,
    },
    /// The release exists already: releases are immutable.
    #[error("release {version} of {repo} already exists: releases are immutable, publish a new version")]
    ReleaseExists {
        /// The repository.
        repo: RepoId,
        /// The version.
        version: Version,
    },
    /// Local I/O failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Serialises the check that a release does not exist with the rename that creates it, for
/// every commit in this process (a rename over an empty directory would replace it).
static COMMIT_LOCK: Mutex<()> = Mutex::new(());

/// Commits one new release of `repo` under the registry `root`: the write path of a
/// directory registry (and of `khub serve`).
///
/// `files` yields each file of the release (its path and bytes) in order; the first `Err`
/// it yields stops the commit and is returned. The release must carry a valid `khub.toml`
/// naming a version that does not exist yet, and every file that manifest lists with the
/// listed size and digest. When `branch_major` is `Some(n)` (a commit to branch `v<n>`),
/// the version's major must be `n`.
///
/// The files are staged in a hidden directory of the repository (`.staging-<pid>-…`, which
/// [`scan_repo`] ignores), each written and `fsync`ed as it comes; the staged directories
/// are `fsync`ed, the staging directory is renamed into place as `<version>` in one step, and
/// then the release directory and the repository directory are `fsync`ed. Readers never see
/// half a release, and on any failure nothing is left behind: neither the staging directory
/// nor the release. A process killed mid-commit leaves its staging directory; the next
/// commit to the repository removes those whose process is gone.
///
/// The organisation and repository directories must exist and be real directories (not
/// symlinks): [`CommitError::RepoNotFound`] otherwise.
pub fn commit_release<E: From<CommitError>>(
    root: &Path,
    repo: &RepoId,
    branch_major: Option<u64>,
    files: impl IntoIterator<Item = Result<(RelPath, Vec<u8>), E>>,
) -> Result<ReleaseDir, E> {
    let dir = repo_dir(root, repo);
    // Real directories, not symlinks that could lead outside the registry.
    for d in [root.join(repo.org()), dir.clone()] {
        if !std::fs::symlink_metadata(&d).is_ok_and(|m| m.is_dir()) {
            return Err(CommitError::RepoNotFound { repo: repo.clone() }.into());
        }
    }
    remove_stale_staging(&dir);
    let mut staging = Staging::new(&dir)?;
    for file in files {
        let (path, bytes) = file?;
        staging.add(&path, bytes)?;
    }
    Ok(staging.publish(&dir, repo, branch_major)?)
}

/// A release being staged: a private directory (removed when dropped) and what is in it.
struct Staging {
    dir: tempfile::TempDir,
    files: BTreeMap<String, (u64, Sha256Digest)>,
    dirs: BTreeSet<String>,
    manifest: Option<Vec<u8>>,
}

/// The prefix of this process's staging directories: `.staging-<pid>-`.
fn staging_prefix() -> String {
    format!(".staging-{}-", std::process::id())
}

/// Removes the staging directories left by commits whose process is gone (killed
/// mid-commit): `.staging-<pid>-…` where no process `<pid>` runs. Best effort.
fn remove_stale_staging(repo_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(repo_dir) else { return };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix(".staging-"))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<i32>().ok());
        if pid.is_some_and(|pid| pid > 0 && !process_alive(pid)) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Whether a process `pid` exists.
fn process_alive(pid: i32) -> bool {
    #[cfg(unix)]
    {
        // SAFETY: signal 0 sends nothing; kill only checks that the process exists.
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

impl Staging {
    fn new(repo_dir: &Path) -> Result<Staging, CommitError> {
        let dir = tempfile::Builder::new()
            .prefix(&staging_prefix())
            .tempdir_in(repo_dir)
            .map_err(|source| CommitError::Io {
                what: "creating a staging directory".into(),
                source,
            })?;
        Ok(Staging {
            dir,
            files: BTreeMap::new(),
            dirs: BTreeSet::new(),
            manifest: None,
        })
    }

    /// Writes one file durably into the staging directory, refusing a path that is both a
    /// file and a directory.
    fn add(&mut self, rel: &RelPath, bytes: Vec<u8>) -> Result<(), CommitError> {
        let path = rel.as_str();
        let conflict = || CommitError::PathConflict { path: path.to_owned() };
        if self.dirs.contains(path) {
            return Err(conflict());
        }
        let parts: Vec<&str> = rel.components().collect();
        for i in 1..parts.len() {
            let prefix = parts[..i].join("/");
            if self.files.contains_key(&prefix) {
                return Err(conflict());
            }
            self.dirs.insert(prefix);
        }
        let io = |source| CommitError::Io {
            what: format!("staging `{path}`"),
            source,
        };
        let dest = self.dir.path().join(path);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        crate::fsx::write_durable_new(&dest, &bytes).map_err(io)?;
        self.files
            .insert(path.to_owned(), (bytes.len() as u64, crate::verify::sha256(&bytes)));
        if path == "khub.toml" {
            self.manifest = Some(bytes);
        }
        Ok(())
    }

    /// Checks the staged files against their manifest and returns the manifest's bytes and
    /// version.
    fn check(&mut self, branch_major: Option<u64>) -> Result<(Vec<u8>, Version), CommitError> {
        let bytes = self.manifest.take().ok_or(CommitError::MissingManifest)?;
        if bytes.len() as u64 > super::MAX_MANIFEST_BYTES {
            return Err(CommitError::ManifestTooLarge);
        }
        let manifest = Manifest::from_bytes(&bytes).map_err(CommitError::InvalidManifest)?;
        for f in manifest.variants.iter().flat_map(|v| &v.files) {
            match self.files.get(f.path.as_str()) {
                None => {
                    return Err(CommitError::MissingFile { path: f.path.to_string() });
                }
                Some(&(size, sha256)) if size != f.size || sha256 != f.sha256 => {
                    return Err(CommitError::FileMismatch {
                        path: f.path.to_string(),
                        size,
                        sha256,
                        expected_size: f.size,
                        expected_sha256: f.sha256,
                    });
                }
                Some(_) => {}
            }
        }
        let version = manifest.kernel.version;
        if let Some(major) = branch_major
            && version.major != major
        {
            return Err(CommitError::WrongBranch { version, major });
        }
        Ok((bytes, version))
    }

    /// Checks the release, makes the staged entries durable, renames the staging directory
    /// into place and makes that durable too.
    fn publish(mut self, repo_dir: &Path, repo: &RepoId, branch_major: Option<u64>) -> Result<ReleaseDir, CommitError> {
        let (manifest_bytes, version) = self.check(branch_major)?;
        let sync = |dir: &Path| {
            crate::fsx::sync_dir(dir).map_err(|source| CommitError::Io {
                what: format!("syncing {}", dir.display()),
                source,
            })
        };
        // The files are synced as written; their directory entries now.
        for d in &self.dirs {
            sync(&self.dir.path().join(d))?;
        }
        let target = repo_dir.join(version.to_string());
        let exists = || CommitError::ReleaseExists {
            repo: repo.clone(),
            version: version.clone(),
        };
        let _guard = COMMIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        if std::fs::symlink_metadata(&target).is_ok() {
            return Err(exists());
        }
        if let Err(source) = std::fs::rename(self.dir.path(), &target) {
            if std::fs::symlink_metadata(&target).is_ok() {
                return Err(exists());
            }
            return Err(CommitError::Io {
                what: "moving the release into place".into(),
                source,
            });
        }
        // The directory is now the release: the guard must not delete it.
        let _ = self.dir.keep();
        if let Err(e) = sync(&target).and_then(|()| sync(repo_dir)) {
            withdraw(repo_dir, &target);
            return Err(e);
        }
        Ok(ReleaseDir {
            version,
            commit: commit_id(&manifest_bytes),
            dir: target,
            manifest_bytes,
        })
    }
}

/// Takes a release that could not be made durable out of view (renamed over a fresh hidden
/// directory, in one step) and deletes it.
fn withdraw(repo_dir: &Path, release: &Path) {
    let hidden = tempfile::Builder::new().prefix(&staging_prefix()).tempdir_in(repo_dir);
    match hidden {
        // Renaming a directory over an empty one replaces it; dropping the guard deletes it.
        Ok(hidden) if std::fs::rename(release, hidden.path()).is_ok() => drop(hidden),
        _ => {
            let _ = std::fs::remove_dir_all(release);
        }
    }
}

/// A registry rooted at a local directory.
#[derive(Debug, Clone)]
pub struct DirRegistry {
    root: PathBuf,
}

impl DirRegistry {
    /// A registry over `root`, which must be a directory.
    pub fn new(root: &Path) -> Result<Self, RegistryError> {
        let root = std::path::absolute(root).map_err(|source| RegistryError::Io {
            what: format!("resolving {}", root.display()),
            source,
        })?;
        if !root.is_dir() {
            let given = root.display().to_string();
            let written = given.rsplit('/').next().unwrap_or_default();
            // `127.0.0.1:8080` or `host:port` without a scheme was meant as a URL.
            let hint = match written.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    format!("; for a server, write the URL with its scheme: http://{written}")
                }
                _ => String::new(),
            };
            let what = if root.exists() { "is not a directory" } else { "does not exist" };
            return Err(RegistryError::Io {
                what: format!("the registry directory {given}"),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, format!("{what}{hint}")),
            });
        }
        Ok(DirRegistry { root })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The release with this commit id.
    pub fn release(&self, repo: &RepoId, commit: &str) -> Result<ReleaseDir, RegistryError> {
        let (releases, _) = scan_repo(&self.root, repo)?;
        releases
            .into_iter()
            .find(|r| r.commit == commit)
            .ok_or_else(|| RegistryError::NotFound {
                repo: repo.clone(),
                registry: self.describe(),
                what: format!("commit {commit}"),
            })
    }
}

impl Registry for DirRegistry {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn refs(&self, repo: &RepoId) -> Result<Refs, RegistryError> {
        let (releases, _) = scan_repo(&self.root, repo)?;
        Ok(derive_refs(&releases))
    }

    fn manifest(&self, repo: &RepoId, commit: &str) -> Result<Vec<u8>, RegistryError> {
        Ok(self.release(repo, commit)?.manifest_bytes)
    }

    fn unusable(&self, repo: &RepoId) -> Vec<(Version, String)> {
        scan_repo_detailed(&self.root, repo).map(|s| s.unusable).unwrap_or_default()
    }

    fn fetch(&self, repo: &RepoId, commit: &str, path: &RelPath, limit: u64, sink: &mut dyn Write) -> Result<u64, RegistryError> {
        let release = self.release(repo, commit)?;
        let mut f = crate::fsx::open_under(&release.dir, path).map_err(|e| match e {
            crate::fsx::OpenError::Missing { .. } => RegistryError::NotFound {
                repo: repo.clone(),
                registry: self.describe(),
                what: format!("file `{path}` at {commit}"),
            },
            crate::fsx::OpenError::NotRegular { path: bad, what, .. } => RegistryError::NotRegular {
                registry: self.describe(),
                repo: repo.clone(),
                path: bad,
                what,
            },
            other => RegistryError::Io {
                what: format!("reading `{path}`"),
                source: std::io::Error::other(other.to_string()),
            },
        })?;
        copy_limited(&mut f, sink, limit, path.as_str(), &self.describe())
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests write scratch files directly
mod tests {
    use super::*;

    const LIB: &[u8] = b"not really a library";

    /// A manifest of `version` listing one file, `variants/v/libk.so`, with `lib`'s bytes.
    fn manifest(version: &str, lib: &[u8]) -> String {
        format!(
            "schema = \"1.0\"\n[kernel]\nname = \"k\"\nversion = \"{version}\"\nabi = 1\n\n[[variants]]\nid = \"v\"\nbackend = \"cpu\"\nos = \"linux\"\narch = \"x86_64\"\nlibc = \"glibc 2.17\"\nlibrary = \"variants/v/libk.so\"\nfiles = [{{ path = \"variants/v/libk.so\", size = {}, sha256 = \"{}\" }}]\n",
            lib.len(),
            crate::verify::sha256(lib)
        )
    }

    fn release(root: &Path, repo: &str, version: &str) {
        let dir = root.join(repo).join(version);
        std::fs::create_dir_all(dir.join("variants/v")).unwrap();
        std::fs::write(dir.join("variants/v/libk.so"), LIB).unwrap();
        std::fs::write(dir.join("khub.toml"), manifest(version, LIB)).unwrap();
    }

    #[test]
    fn refs_are_derived_from_release_directories() {
        let d = tempfile::tempdir().unwrap();
        for v in ["1.0.0", "1.2.0", "2.0.0-rc.1", "0.9.0"] {
            release(d.path(), "acme/k", v);
        }
        std::fs::create_dir_all(d.path().join("acme/k/not-a-version")).unwrap();
        release(d.path(), "acme/k", "3.0.0");
        // A directory whose manifest names another version is skipped.
        std::fs::rename(d.path().join("acme/k/3.0.0"), d.path().join("acme/k/3.0.1")).unwrap();
        let repo: RepoId = "acme/k".parse().unwrap();
        let (rels, skipped) = scan_repo(d.path(), &repo).unwrap();
        assert_eq!(
            rels.iter().map(|r| r.version.to_string()).collect::<Vec<_>>(),
            ["2.0.0-rc.1", "1.2.0", "1.0.0", "0.9.0"]
        );
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        let refs = derive_refs(&rels);
        let branch = |n: &str| refs.branches.iter().find(|b| b.name == n).map(|b| b.commit.clone());
        let tag = |n: &str| refs.tags.iter().find(|b| b.name == n).map(|b| b.commit.clone());
        assert_eq!(branch("main"), tag("v1.2.0"), "main is the highest release, not the pre-release");
        assert_eq!(branch("v2"), tag("v2.0.0-rc.1"), "a major with only a pre-release points at it");
        assert_eq!(branch("v1"), tag("v1.2.0"));
        assert_eq!(branch("v0"), tag("v0.9.0"));
        assert_eq!(tag("v1.0.0").unwrap().len(), 40);
    }

    #[test]
    fn files_are_fetched_within_limits() {
        let d = tempfile::tempdir().unwrap();
        release(d.path(), "acme/k", "1.0.0");
        let reg = DirRegistry::new(d.path()).unwrap();
        let repo: RepoId = "acme/k".parse().unwrap();
        let refs = reg.refs(&repo).unwrap();
        let commit = &refs.tags[0].commit;
        let m = Manifest::from_bytes(&reg.manifest(&repo, commit).unwrap()).unwrap();
        let path = &m.variants[0].files[0].path;
        let mut out = Vec::new();
        assert_eq!(reg.fetch(&repo, commit, path, 1000, &mut out).unwrap(), 20);
        let e = reg.fetch(&repo, commit, path, 5, &mut Vec::new()).unwrap_err();
        assert!(matches!(e, RegistryError::TooLarge { .. }), "{e}");
        let e = reg.fetch(&repo, "0".repeat(40).as_str(), path, 1000, &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("not found"), "{e}");
        let e = reg.refs(&"acme/none".parse().unwrap()).unwrap_err();
        assert!(matches!(e, RegistryError::RepoNotFound { .. }));
    }

    /// The files of a commit, as `commit_release` takes them.
    fn files(list: &[(&str, &[u8])]) -> Vec<Result<(RelPath, Vec<u8>), CommitError>> {
        list.iter().map(|(p, b)| Ok((RelPath::new(*p).unwrap(), b.to_vec()))).collect()
    }

    /// The names in a repository directory, hidden ones included.
    fn entries(dir: &Path) -> Vec<String> {
        let names: BTreeSet<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.into_iter().collect()
    }

    #[test]
    fn a_commit_creates_one_release_and_leaves_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("acme/k")).unwrap();
        let repo: RepoId = "acme/k".parse().unwrap();
        let text = manifest("1.2.0", LIB);
        let r = commit_release(
            d.path(),
            &repo,
            Some(1),
            files(&[("khub.toml", text.as_bytes()), ("variants/v/libk.so", LIB)]),
        )
        .unwrap();
        assert_eq!(r.version.to_string(), "1.2.0");
        assert_eq!(r.commit, commit_id(text.as_bytes()));
        assert_eq!(std::fs::read(r.dir.join("variants/v/libk.so")).unwrap(), LIB);
        assert_eq!(entries(&d.path().join("acme/k")), ["1.2.0"]);
        let (rels, skipped) = scan_repo(d.path(), &repo).unwrap();
        assert_eq!((rels.len(), skipped.len()), (1, 0));
        assert_eq!(rels[0].commit, r.commit);

        // The same version again: refused, and the release is untouched.
        let e = commit_release(
            d.path(),
            &repo,
            None,
            files(&[("khub.toml", text.as_bytes()), ("variants/v/libk.so", LIB)]),
        )
        .unwrap_err();
        assert!(matches!(e, CommitError::ReleaseExists { .. }), "{e}");
        assert_eq!(entries(&d.path().join("acme/k")), ["1.2.0"]);
    }

    #[test]
    fn staging_of_a_dead_process_is_removed_by_the_next_commit() {
        let d = tempfile::tempdir().unwrap();
        let repo_path = d.path().join("acme/k");
        // A process id that cannot be running (above the kernel's pid_max), and this one.
        std::fs::create_dir_all(repo_path.join(".staging-2147483646-abc/variants")).unwrap();
        let mine = format!(".staging-{}-live", std::process::id());
        std::fs::create_dir_all(repo_path.join(&mine)).unwrap();
        let repo: RepoId = "acme/k".parse().unwrap();
        let text = manifest("1.0.0", LIB);
        commit_release(
            d.path(),
            &repo,
            None,
            files(&[("khub.toml", text.as_bytes()), ("variants/v/libk.so", LIB)]),
        )
        .unwrap();
        assert_eq!(entries(&repo_path), [mine, "1.0.0".to_owned()]);
    }

    #[test]
    fn a_failed_commit_leaves_no_staging_directory_and_no_release() {
        let d = tempfile::tempdir().unwrap();
        let repo_path = d.path().join("acme/k");
        std::fs::create_dir_all(&repo_path).unwrap();
        let repo: RepoId = "acme/k".parse().unwrap();
        let text = manifest("1.0.0", LIB);
        let m = text.as_bytes();
        let fails = |list: &[(&str, &[u8])], major: Option<u64>| {
            let e = commit_release(d.path(), &repo, major, files(list)).unwrap_err();
            assert_eq!(entries(&repo_path), Vec::<String>::new(), "left behind after: {e}");
            e
        };
        // A path that is a file, then a directory.
        let e = fails(&[("khub.toml", m), ("variants", b"x"), ("variants/v/libk.so", LIB)], None);
        assert!(
            matches!(e, CommitError::PathConflict { ref path } if path == "variants/v/libk.so"),
            "{e}"
        );
        // A directory, then a file.
        let e = fails(&[("variants/v/libk.so", LIB), ("variants/v", b"x"), ("khub.toml", m)], None);
        assert!(matches!(e, CommitError::PathConflict { .. }), "{e}");
        // The same file twice.
        let e = fails(&[("khub.toml", m), ("khub.toml", m)], None);
        assert!(matches!(e, CommitError::Io { .. }), "{e}");
        let e = fails(&[("variants/v/libk.so", LIB)], None);
        assert!(matches!(e, CommitError::MissingManifest), "{e}");
        let e = fails(&[("khub.toml", b"not toml [")], None);
        assert!(matches!(e, CommitError::InvalidManifest(_)), "{e}");
        let e = fails(&[("khub.toml", m)], None);
        assert!(matches!(e, CommitError::MissingFile { .. }), "{e}");
        let e = fails(&[("khub.toml", m), ("variants/v/libk.so", b"other bytes")], None);
        assert!(matches!(e, CommitError::FileMismatch { .. }), "{e}");
        let e = fails(&[("khub.toml", m), ("variants/v/libk.so", LIB)], Some(2));
        assert!(matches!(e, CommitError::WrongBranch { major: 2, .. }), "{e}");
        // The caller's own error, after a file was staged, is returned as it is.
        let input: Vec<Result<(RelPath, Vec<u8>), CommitError>> = vec![
            Ok((RelPath::new("khub.toml").unwrap(), m.to_vec())),
            Err(CommitError::MissingManifest),
        ];
        let e = commit_release(d.path(), &repo, None, input).unwrap_err();
        assert!(matches!(e, CommitError::MissingManifest), "{e}");
        assert_eq!(entries(&repo_path), Vec::<String>::new());
        // No repository directory: nothing is created.
        let e = commit_release(d.path(), &"acme/none".parse().unwrap(), None, files(&[("khub.toml", m)])).unwrap_err();
        assert!(matches!(e, CommitError::RepoNotFound { .. }), "{e}");
        assert!(!d.path().join("acme/none").exists());
    }
}
