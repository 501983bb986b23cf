//! `khub.lock`: what a host application loads, pinned, and `kernels.toml`, where the
//! application declares what it needs.
//!
//! An application lists its kernels in `kernels.toml`:
//!
//! ```toml
//! [registry]                 # optional; else --registry, KHUB_REGISTRY or HF_ENDPOINT
//! url = "http://127.0.0.1:8080"
//!
//! [kernels]
//! "kernels-community/activation" = "^0.1"
//! ```
//!
//! `khub lock` resolves each requirement once, for one or more target hosts, and writes
//! `khub.lock`: the release (version, commit, SHA-256 of the manifest) and, per target
//! host, the chosen variant and the digest of every file. A locked load reads only the lock
//! and the store: no refs request, no version resolution, no network.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ids::RepoId;
use crate::manifest::{FileEntry, Sha256Digest};

/// The lockfile format version this khub writes and reads.
pub const LOCK_VERSION: u32 = 1;
/// The default name of the application's declaration file.
pub const APP_FILE: &str = "kernels.toml";
/// The default name of the lockfile.
pub const LOCK_FILE: &str = "khub.lock";

/// A lockfile or declaration file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// The file could not be read or written.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("{} is not valid: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// `khub remove` of a kernel the file does not declare.
    #[error("{} does not declare {repo}; its kernels: {declared}", path.display())]
    NotDeclared {
        /// The declaration file.
        path: PathBuf,
        /// The repository.
        repo: RepoId,
        /// The repositories it declares, comma-separated (or `none`).
        declared: String,
    },
    /// The lock has no entry for this repository.
    #[error("{} has no entry for {repo}; add it to kernels.toml and run `khub lock`", path.display())]
    NotLocked {
        /// The lockfile.
        path: PathBuf,
        /// The repository.
        repo: RepoId,
    },
}

/// `kernels.toml`: the kernels an application declares.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppKernels {
    /// Where to fetch from, if the application pins it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<AppRegistry>,
    /// Repository → version requirement.
    #[serde(default)]
    pub kernels: BTreeMap<RepoId, String>,
}

/// `[registry]` of `kernels.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppRegistry {
    /// A Hub-compatible URL or a local directory.
    pub url: String,
}

impl AppKernels {
    /// Reads and checks `kernels.toml` (every requirement must parse).
    pub fn read(path: &Path) -> Result<Self, LockError> {
        let text = std::fs::read_to_string(path).map_err(|source| LockError::Io {
            what: "cannot read",
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| LockError::Invalid {
            path: path.to_owned(),
            message,
        })
    }

    #[cfg(feature = "tools")]
    /// Declares `repo` with `requirement` in the file at `path` (created when missing),
    /// replacing an earlier requirement, which is returned. Comments, order and layout of
    /// the rest of the file are kept; the result is checked before it replaces the file.
    pub fn add(path: &Path, repo: &RepoId, requirement: &str) -> Result<Option<String>, LockError> {
        crate::version::parse_requirement(requirement).map_err(|e| LockError::Invalid {
            path: path.to_owned(),
            message: format!("{repo}: {e}"),
        })?;
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(LockError::Io {
                    what: "cannot read",
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let key = repo.to_string();
        Self::edit(path, &text, |kernels| {
            let old = kernels.get(&key).and_then(|v| v.as_str()).map(str::to_owned);
            kernels.insert(&key, toml_edit::value(requirement));
            Ok(old)
        })
    }

    #[cfg(feature = "tools")]
    /// Removes `repo` from the file at `path`; returns the requirement it had.
    pub fn remove(path: &Path, repo: &RepoId) -> Result<String, LockError> {
        let text = std::fs::read_to_string(path).map_err(|source| LockError::Io {
            what: "cannot read",
            path: path.to_owned(),
            source,
        })?;
        let key = repo.to_string();
        Self::edit(path, &text, |kernels| match kernels.remove(&key) {
            Some(old) => Ok(old.as_str().unwrap_or_default().to_owned()),
            None => Err(LockError::NotDeclared {
                path: path.to_owned(),
                repo: repo.clone(),
                declared: {
                    let names: Vec<&str> = kernels.iter().map(|(k, _)| k).collect();
                    if names.is_empty() { "none".to_owned() } else { names.join(", ") }
                },
            }),
        })
    }

    #[cfg(feature = "tools")]
    /// Applies `change` to the `[kernels]` table of `text` (the file at `path`), checks
    /// the result parses as a declaration file, and writes it atomically.
    fn edit<T>(path: &Path, text: &str, change: impl FnOnce(&mut toml_edit::Table) -> Result<T, LockError>) -> Result<T, LockError> {
        let invalid = |message: String| LockError::Invalid {
            path: path.to_owned(),
            message,
        };
        // The file must be valid before it is edited: a broken file is the user's to fix.
        if !text.trim().is_empty() {
            Self::parse(text).map_err(invalid)?;
        }
        let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| invalid(e.to_string()))?;
        let kernels = doc
            .entry("kernels")
            .or_insert_with(|| toml_edit::Item::Table(toml_edit::Table::new()))
            .as_table_mut()
            .ok_or_else(|| invalid("`kernels` is not a table".to_owned()))?;
        let out = change(kernels)?;
        let new = doc.to_string();
        Self::parse(&new).map_err(invalid)?;
        crate::fsx::write_atomic_user_file(path, new.as_bytes()).map_err(|e| LockError::Io {
            what: e.what,
            path: path.to_owned(),
            source: e.source,
        })?;
        Ok(out)
    }

    /// Parses and checks the text of `kernels.toml` (every requirement must parse).
    pub fn parse(text: &str) -> Result<Self, String> {
        let app: AppKernels = toml::from_str(text).map_err(|e| e.to_string())?;
        for (repo, req) in &app.kernels {
            crate::version::parse_requirement(req).map_err(|e| format!("{repo}: {e}"))?;
        }
        Ok(app)
    }
}

/// `khub.lock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Lockfile {
    /// The format version.
    pub version: u32,
    /// One entry per kernel, sorted by repository.
    #[serde(default, rename = "kernel")]
    pub kernels: Vec<LockedKernel>,
}

/// One locked kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LockedKernel {
    /// The repository.
    pub repo: RepoId,
    /// The requirement it was locked from.
    pub requirement: String,
    /// Where it was resolved (informational; a locked load does not contact it).
    pub registry: String,
    /// The resolved version.
    pub version: semver::Version,
    /// The commit of the release.
    pub commit: String,
    /// The SHA-256 of the release's `khub.toml`.
    pub manifest_sha256: Sha256Digest,
    /// The chosen variant per target host.
    #[serde(default, rename = "target")]
    pub targets: Vec<LockedTarget>,
}

/// The variant chosen for one target host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LockedTarget {
    /// The host: `this machine` or the host-profile file it was resolved for.
    pub host: String,
    /// The variant id.
    pub variant: String,
    /// Every file of the variant.
    pub files: Vec<FileEntry>,
}

impl Lockfile {
    /// An empty lockfile.
    pub fn new() -> Self {
        Lockfile {
            version: LOCK_VERSION,
            kernels: Vec::new(),
        }
    }

    /// Reads and checks a lockfile.
    pub fn read(path: &Path) -> Result<Self, LockError> {
        let text = std::fs::read_to_string(path).map_err(|source| LockError::Io {
            what: "cannot read",
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| LockError::Invalid {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses lockfile text.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > 16 << 20 {
            return Err("larger than 16 MiB".into());
        }
        let lock: Lockfile = toml::from_str(text).map_err(|e| e.to_string())?;
        if lock.version != LOCK_VERSION {
            return Err(format!(
                "lock format {} is not supported: this khub reads format {LOCK_VERSION}; run `khub lock` again",
                lock.version
            ));
        }
        for k in &lock.kernels {
            if k.commit.len() != 40 || !k.commit.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("{}: commit `{}` is not 40 hex digits", k.repo, k.commit));
            }
            if k.targets.is_empty() {
                return Err(format!("{}: no target host", k.repo));
            }
        }
        Ok(lock)
    }

    /// Writes the lockfile atomically and durably (temp file, fsync, rename, directory fsync).
    pub fn write(&self, path: &Path) -> Result<(), LockError> {
        let mut text = String::from("# khub.lock: generated by `khub lock`. Do not edit; commit it with the application.\n");
        text.push_str(&toml::to_string_pretty(self).map_err(|e| LockError::Invalid {
            path: path.to_owned(),
            message: e.to_string(),
        })?);
        crate::fsx::write_atomic_user_file(path, text.as_bytes()).map_err(|e| LockError::Io {
            what: e.what,
            path: path.to_owned(),
            source: e.source,
        })
    }

    /// The entry for `repo`.
    pub fn get(&self, repo: &RepoId) -> Option<&LockedKernel> {
        self.kernels.iter().find(|k| &k.repo == repo)
    }

    /// Inserts or replaces the entry for its repository, keeping entries sorted.
    pub fn upsert(&mut self, k: LockedKernel) {
        self.kernels.retain(|e| e.repo != k.repo);
        self.kernels.push(k);
        self.kernels.sort_by(|a, b| a.repo.cmp(&b.repo));
    }
}

impl Default for Lockfile {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests write scratch files directly
mod tests {
    use super::*;
    use crate::manifest::RelPath;

    fn sample() -> Lockfile {
        let mut l = Lockfile::new();
        l.upsert(LockedKernel {
            repo: "acme/act".parse().unwrap(),
            requirement: "^0.1".into(),
            registry: "http://127.0.0.1:1".into(),
            version: "0.1.2".parse().unwrap(),
            commit: "a".repeat(40),
            manifest_sha256: crate::verify::sha256(b"m"),
            targets: vec![LockedTarget {
                host: "this machine".into(),
                variant: "cpu".into(),
                files: vec![FileEntry {
                    path: RelPath::new("variants/cpu/lib.so").unwrap(),
                    size: 3,
                    sha256: crate::verify::sha256(b"abc"),
                }],
            }],
        });
        l
    }

    #[test]
    fn lockfiles_round_trip_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("khub.lock");
        let l = sample();
        l.write(&p).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with("# khub.lock"), "{text}");
        assert!(text.contains("[[kernel.target]]"), "{text}");
        assert_eq!(Lockfile::read(&p).unwrap(), l);
        let e = Lockfile::parse(&text.replace("version = 1", "version = 9")).unwrap_err();
        assert!(e.contains("run `khub lock` again"), "{e}");
        let e = Lockfile::parse(&text.replace(&"a".repeat(40), "HEAD")).unwrap_err();
        assert!(e.contains("40 hex"), "{e}");
        assert!(Lockfile::parse(&text.replace("variants/cpu/lib.so", "../lib.so")).is_err());
    }

    #[test]
    fn app_declarations_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kernels.toml");
        std::fs::write(&p, "[kernels]\n\"acme/act\" = \"^0.1\"\n").unwrap();
        assert_eq!(AppKernels::read(&p).unwrap().kernels.len(), 1);
        std::fs::write(&p, "[kernels]\n\"acme/act\" = \"latest\"\n").unwrap();
        assert!(AppKernels::read(&p).unwrap_err().to_string().contains("acme/act"));
        std::fs::write(&p, "[kernels]\n\"act\" = \"^1\"\n").unwrap();
        assert!(AppKernels::read(&p).unwrap_err().to_string().contains("org/name"));
    }
}
