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

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use semver::Version;
use sha2::{Digest, Sha256};

use super::{GitRef, Refs, Registry, RegistryError, RepoId, copy_limited};
use crate::manifest::{Manifest, RelPath};

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
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(version) = name.parse::<Version>() else {
            if !name.starts_with('.') {
                skipped.push(format!("{name}: not a version"));
            }
            continue;
        };
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            skipped.push(format!("{name}: not a directory"));
            continue;
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
                        skipped.push(format!("{name}: {err}"));
                        continue;
                    }
                }
            }
            Err(err) => {
                skipped.push(format!("{name}: {err}"));
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
            Ok(m) => skipped.push(format!("{name}: khub.toml says version {}", m.kernel.version)),
            Err(err) => skipped.push(format!("{name}: {err}")),
        }
    }
    out.sort_by(|a, b| b.version.cmp(&a.version));
    skipped.sort();
    Ok((out, skipped))
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
            return Err(RegistryError::Io {
                what: format!("registry directory {}", root.display()),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
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

    fn fetch(&self, repo: &RepoId, commit: &str, path: &RelPath, limit: u64, sink: &mut dyn Write) -> Result<u64, RegistryError> {
        let release = self.release(repo, commit)?;
        let mut f = crate::fsx::open_under(&release.dir, path).map_err(|e| match e {
            crate::fsx::OpenError::Missing { .. } => RegistryError::NotFound {
                repo: repo.clone(),
                registry: self.describe(),
                what: format!("file `{path}` at {commit}"),
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

    fn release(root: &Path, repo: &str, version: &str) {
        let dir = root.join(repo).join(version);
        std::fs::create_dir_all(dir.join("variants/v")).unwrap();
        let lib = b"not really a library";
        std::fs::write(dir.join("variants/v/libk.so"), lib).unwrap();
        let text = format!(
            "schema = \"1.0\"\n[kernel]\nname = \"k\"\nversion = \"{version}\"\nabi = 1\n\n[[variants]]\nid = \"v\"\nbackend = \"cpu\"\nos = \"linux\"\narch = \"x86_64\"\nlibc = \"glibc 2.17\"\nlibrary = \"variants/v/libk.so\"\nfiles = [{{ path = \"variants/v/libk.so\", size = {}, sha256 = \"{}\" }}]\n",
            lib.len(),
            crate::verify::sha256(lib)
        );
        std::fs::write(dir.join("khub.toml"), text).unwrap();
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
}
