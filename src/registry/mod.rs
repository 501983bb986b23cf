//! Where releases come from. One small trait, [`Registry`], and its implementations:
//!
//! - [`dir::DirRegistry`]: a directory of releases on disk, no network;
//! - `hf::HubRegistry` (feature `hub`): a Hugging Face Hub or any Hub-compatible server
//!   (`khub serve`), through `hf-hub`.
//!
//! A registry moves bytes and never loads code. Nothing it returns is trusted: manifests
//! are parsed as hostile input, and every file is checked against the manifest's digest
//! as it streams into the store.

use std::io::Write;

use crate::manifest::RelPath;

pub use crate::ids::{GitRef, Refs, RepoId, RepoIdError};

pub mod dir;
#[cfg(feature = "hub")]
pub mod hf;

pub use crate::manifest::SIGNATURE_FILE;

/// The largest manifest a registry may return.
pub const MAX_MANIFEST_BYTES: u64 = crate::manifest::MAX_MANIFEST_BYTES as u64;

/// A registry operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The repository does not exist (or is not visible with these credentials).
    #[error("repository {repo} not found on {registry}")]
    RepoNotFound {
        /// The repository.
        repo: RepoId,
        /// The registry.
        registry: String,
    },
    /// The commit or file does not exist.
    #[error("{what} not found in {repo} on {registry}")]
    NotFound {
        /// The repository.
        repo: RepoId,
        /// The registry.
        registry: String,
        /// What was looked for.
        what: String,
    },
    /// The registry wants credentials, or refused the ones given.
    #[error(
        "{registry} refused {access} access to {repo}: {message}; set HF_TOKEN (or KHUB_TOKEN) to a token that can {access} it{}",
        if *access == "write" { " (a `khub serve` started without --write-token is read-only)" } else { "" }
    )]
    Unauthorized {
        /// `read` or `write`.
        access: &'static str,
        /// The repository.
        repo: RepoId,
        /// The registry.
        registry: String,
        /// What it said.
        message: String,
    },
    /// The registry asked us to slow down, and retries ran out.
    #[error("{registry} is rate-limiting requests{}; try again later", retry_after.map(|s| format!(" (retry after {s} s)")).unwrap_or_default())]
    RateLimited {
        /// The registry.
        registry: String,
        /// Seconds it asked to wait.
        retry_after: Option<u64>,
    },
    /// A response was larger than allowed.
    #[error("{what} from {registry} is larger than {limit} bytes")]
    TooLarge {
        /// The registry.
        registry: String,
        /// What.
        what: String,
        /// The limit.
        limit: u64,
    },
    /// Offline mode is on, and this needs the network.
    #[error("offline mode is on (KHUB_OFFLINE / HF_HUB_OFFLINE / --offline): cannot {what}")]
    Offline {
        /// What was attempted.
        what: String,
    },
    /// A transport or server error.
    #[error("{registry}: {message}")]
    Transport {
        /// The registry.
        registry: String,
        /// What happened.
        message: String,
    },
    /// A file of a release, or a directory on its path, is a symlink or not a regular file.
    #[error("`{path}` of {repo} on {registry} is {what}; a registry serves regular files only")]
    NotRegular {
        /// The registry.
        registry: String,
        /// The repository.
        repo: RepoId,
        /// The path, relative to the release.
        path: String,
        /// What was found.
        what: &'static str,
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

/// A source of releases.
pub trait Registry: Send + Sync {
    /// A short description for messages: a URL or a directory.
    fn describe(&self) -> String;

    /// The refs of a repository (one request on a remote registry).
    fn refs(&self, repo: &RepoId) -> Result<Refs, RegistryError>;

    /// The raw bytes of `khub.toml` at `commit`, at most [`MAX_MANIFEST_BYTES`].
    fn manifest(&self, repo: &RepoId, commit: &str) -> Result<Vec<u8>, RegistryError>;

    /// The raw signature of the manifest at `commit` (`khub.toml.minisig`), or `None` when
    /// the release is unsigned. At most 64 KiB.
    fn signature(&self, repo: &RepoId, commit: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        let path = RelPath::new(SIGNATURE_FILE).map_err(|e| RegistryError::Io {
            what: SIGNATURE_FILE.into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let mut buf = Vec::new();
        match self.fetch(repo, commit, &path, 64 * 1024, &mut buf) {
            Ok(_) => Ok(Some(buf)),
            Err(RegistryError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Streams the file at `path` in `commit` into `sink`; returns the byte count. At most
    /// `limit` bytes are written: a longer file is an error, so a hostile server cannot fill
    /// the disk.
    fn fetch(&self, repo: &RepoId, commit: &str, path: &RelPath, limit: u64, sink: &mut dyn Write) -> Result<u64, RegistryError>;

    /// Releases of `repo` this registry holds but cannot serve (a directory registry's
    /// release directory that is a symlink, or whose manifest is invalid), by version, with
    /// why. A resolver refuses to choose around them silently.
    fn unusable(&self, _repo: &RepoId) -> Vec<(semver::Version, String)> {
        Vec::new()
    }
}

/// Copies at most `limit` bytes from `r` into `w`, failing if `r` has more.
pub(crate) fn copy_limited(
    r: &mut dyn std::io::Read,
    w: &mut dyn Write,
    limit: u64,
    what: &str,
    registry: &str,
) -> Result<u64, RegistryError> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        let k = match r.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(RegistryError::Transport {
                    registry: registry.to_owned(),
                    message: format!("reading {what}: {e}"),
                });
            }
        };
        n += k as u64;
        if n > limit {
            return Err(RegistryError::TooLarge {
                registry: registry.to_owned(),
                what: what.to_owned(),
                limit,
            });
        }
        w.write_all(&buf[..k]).map_err(|source| RegistryError::Io {
            what: format!("writing {what}"),
            source,
        })?;
    }
}

/// The first 12 characters of a commit id, for display; never panics, whatever the text
/// (commit ids from a server or a store's index are untrusted until checked).
pub fn short_commit(commit: &str) -> &str {
    commit
        .char_indices()
        .nth(12)
        .map_or(commit, |(i, _)| commit.get(..i).unwrap_or(commit))
}

#[cfg(test)]
mod short_commit_tests {
    /// Slicing 12 bytes of an id panicked when byte 12 fell inside a character (a server's
    /// commit id, or a damaged index, can hold any text).
    #[test]
    fn short_commit_takes_characters_and_never_panics() {
        assert_eq!(super::short_commit("0123456789abcdef0123"), "0123456789ab");
        assert_eq!(super::short_commit("abc"), "abc");
        assert_eq!(super::short_commit(""), "");
        assert_eq!(super::short_commit("aaaaaaaaaaaéééé"), "aaaaaaaaaaaé");
    }
}
