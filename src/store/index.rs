//! The known-release index: per registry and repository, the releases this machine has
//! resolved before (version → commit, manifest digest, signature digest). Offline mode
//! resolves against it.
//!
//! Layout: `<cache>/index-v1/<first 16 hex of sha256(registry)>/<org>/<name>.json`. Each
//! file is replaced atomically and durably ([`crate::fsx::write_atomic`]). A file that is
//! unreadable or does not parse reads as empty: the index is a cache of facts the registry
//! (or the lock) gives again, and the digests it records are checked before use.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{LockMode, NONBLOCK, Store, StoreError, StoreLock, acquire, open_nofollow};
use crate::ids::RepoId;
use crate::manifest::Sha256Digest;

/// The directory of the index inside the cache directory; the suffix is the layout version.
pub const INDEX_DIR: &str = "index-v1";

/// The largest index file read. A release's entry is a few hundred bytes, so this holds
/// tens of thousands of releases; a larger file is not an index khub wrote.
const MAX_INDEX_FILE_BYTES: u64 = 16 << 20;

/// Reads one index file: a regular file only, never through a symlink at its name, without
/// blocking on a FIFO planted there, and at most [`MAX_INDEX_FILE_BYTES`]. Anything else,
/// like a file that is unreadable or does not parse, reads as absent.
fn read_index_file(path: &Path) -> Option<KnownReleases> {
    let file = open_nofollow(OpenOptions::new().read(true), path, NONBLOCK).ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.len() > MAX_INDEX_FILE_BYTES {
        return None;
    }
    let mut bytes = Vec::new();
    (&file).take(MAX_INDEX_FILE_BYTES + 1).read_to_end(&mut bytes).ok()?;
    if bytes.len() as u64 > MAX_INDEX_FILE_BYTES {
        return None;
    }
    serde_json::from_slice(&bytes).ok()
}

/// The releases known for one repository on one registry, by version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownReleases {
    /// The registry these releases were verified against (as [`crate::hub::RegistrySpec`]
    /// describes it); absent in files written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
    /// Version (semver text) → where it was found.
    pub releases: BTreeMap<String, KnownRelease>,
}

/// One release seen before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownRelease {
    /// The commit the release was read at.
    pub commit: String,
    /// The SHA-256 of its manifest bytes (a blob in the store).
    pub manifest_sha256: Sha256Digest,
    /// The SHA-256 of its signature, when it had one (a blob in the store).
    #[serde(default)]
    pub signature_sha256: Option<Sha256Digest>,
    /// When the release was last accepted (fetched, locked or loaded online), in seconds
    /// since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_at: Option<u64>,
}

/// One release recorded in the index, as [`Store::index_entries`] lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// The registry, when the index file records it.
    pub registry: Option<String>,
    /// The repository.
    pub repo: RepoId,
    /// The version, as recorded.
    pub version: String,
    /// What was recorded.
    pub release: KnownRelease,
    /// The index file.
    pub file: PathBuf,
}

impl Store {
    /// The index file of `repo` on the registry described by `registry` (any stable text
    /// naming it: a URL or a directory).
    pub fn index_path(&self, registry: &str, repo: &RepoId) -> PathBuf {
        let key = crate::verify::sha256(registry.as_bytes()).to_string();
        self.cache
            .join(INDEX_DIR)
            .join(&key[..16])
            .join(repo.org())
            .join(format!("{}.json", repo.name()))
    }

    /// The releases known for `repo` on `registry`; empty when none are, or when the file
    /// is unreadable or invalid.
    pub fn known_releases(&self, registry: &str, repo: &RepoId) -> KnownReleases {
        read_index_file(&self.index_path(registry, repo)).unwrap_or_default()
    }

    /// Takes `gc.lock` shared and the lock of index file `path` exclusively (a lock file in
    /// `locks/` named by the SHA-256 of the path), for a read-modify-write of that file:
    /// two processes recording releases of one repository at once would otherwise each
    /// write back what it read plus its own, and one release would be lost. The entry lock
    /// comes first in the pair, so it is released first.
    fn lock_index_file(&self, path: &Path) -> Result<(StoreLock, StoreLock), StoreError> {
        let pin = self.pin()?;
        let key = crate::verify::sha256(format!("index file {}", path.display()).as_bytes());
        let lock = acquire(&self.entry_lock_path(&key), LockMode::Exclusive, self.options.lock_timeout)?;
        Ok((lock, pin))
    }

    /// Records `release` as `version` of `repo` on `registry`, replacing the index file
    /// atomically and durably.
    pub fn record_release(
        &self,
        registry: &str,
        repo: &RepoId,
        version: &semver::Version,
        release: KnownRelease,
    ) -> Result<(), StoreError> {
        let path = self.index_path(registry, repo);
        let _locks = self.lock_index_file(&path)?;
        let mut known = self.known_releases(registry, repo);
        known.registry = Some(registry.to_owned());
        known.releases.insert(version.to_string(), release);
        self.write_index_file(&path, &known)
    }

    fn write_index_file(&self, path: &std::path::Path, known: &KnownReleases) -> Result<(), StoreError> {
        let dir = path.parent().unwrap_or(&self.cache);
        std::fs::create_dir_all(dir).map_err(StoreError::io("cannot create", dir))?;
        let bytes = serde_json::to_vec_pretty(known).map_err(|e| StoreError::io("cannot encode", path)(std::io::Error::other(e)))?;
        crate::fsx::write_atomic(path, &bytes).map_err(|e| StoreError::Io {
            what: e.what,
            path: path.to_owned(),
            source: e.source,
        })
    }

    /// Every release the index records, on every registry, sorted by repository and
    /// version. Files that do not parse, and names that are not `org/name`, are skipped.
    pub fn index_entries(&self) -> Vec<IndexEntry> {
        let mut out = Vec::new();
        let root = self.cache.join(INDEX_DIR);
        let dirs = |p: &std::path::Path| -> Vec<std::fs::DirEntry> {
            std::fs::read_dir(p)
                .map(|rd| {
                    rd.filter_map(Result::ok)
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .collect()
                })
                .unwrap_or_default()
        };
        for key in dirs(&root) {
            for org in dirs(&key.path()) {
                let Ok(files) = std::fs::read_dir(org.path()) else { continue };
                for f in files.filter_map(Result::ok) {
                    let name = f.file_name();
                    let (Some(org_name), Some(file_name)) = (org.file_name().to_str().map(str::to_owned), name.to_str()) else {
                        continue;
                    };
                    let Some(repo_name) = file_name.strip_suffix(".json") else {
                        continue;
                    };
                    let Ok(repo) = format!("{org_name}/{repo_name}").parse::<RepoId>() else {
                        continue;
                    };
                    let Some(known) = read_index_file(&f.path()) else {
                        continue;
                    };
                    for (version, release) in known.releases {
                        out.push(IndexEntry {
                            registry: known.registry.clone(),
                            repo: repo.clone(),
                            version,
                            release,
                            file: f.path(),
                        });
                    }
                }
            }
        }
        out.sort_by(|a, b| (&a.repo, &a.version, &a.registry).cmp(&(&b.repo, &b.version, &b.registry)));
        out
    }

    /// Removes the releases of `repo` from the index (all of them, or only `version`), on
    /// every registry; returns what was removed. The blobs stay: [`Store::gc`] removes
    /// those nothing else references.
    pub fn forget(&self, repo: &RepoId, version: Option<&str>) -> Result<Vec<IndexEntry>, StoreError> {
        let mut removed = Vec::new();
        let entries: Vec<IndexEntry> = self
            .index_entries()
            .into_iter()
            .filter(|e| &e.repo == repo && version.is_none_or(|v| e.version == v))
            .collect();
        let files: std::collections::BTreeSet<PathBuf> = entries.iter().map(|e| e.file.clone()).collect();
        for file in files {
            let _locks = self.lock_index_file(&file)?;
            let Some(mut known) = read_index_file(&file) else {
                continue;
            };
            known.releases.retain(|v, _| version.is_some_and(|want| v != want));
            if known.releases.is_empty() {
                std::fs::remove_file(&file).map_err(StoreError::io("cannot remove", &file))?;
            } else {
                self.write_index_file(&file, &known)?;
            }
        }
        removed.extend(entries);
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_replace_atomically_and_read_back() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let repo: RepoId = "acme/k".parse().unwrap();
        assert_eq!(s.known_releases("reg", &repo), KnownReleases::default());
        let r = KnownRelease {
            commit: "c".repeat(40),
            manifest_sha256: crate::verify::sha256(b"m"),
            signature_sha256: None,
            accepted_at: None,
        };
        s.record_release("reg", &repo, &semver::Version::new(1, 0, 0), r.clone()).unwrap();
        s.record_release("reg", &repo, &semver::Version::new(1, 1, 0), r.clone()).unwrap();
        let known = s.known_releases("reg", &repo);
        assert_eq!(known.releases.len(), 2);
        assert_eq!(known.releases["1.1.0"], r);
        assert!(s.index_path("reg", &repo).starts_with(d.path().join(INDEX_DIR)));
        // Another registry has its own index.
        assert!(s.known_releases("other", &repo).releases.is_empty());
        // Nothing but the index file in its directory: no temp file left behind.
        let dir = s.index_path("reg", &repo).parent().unwrap().to_owned();
        assert_eq!(std::fs::read_dir(dir).unwrap().count(), 1);
    }
}
