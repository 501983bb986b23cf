//! Verification: every decision about whether bytes may be trusted.
//!
//! - [`digest`]: SHA-256 of slices, readers and writers (the one hashing writer);
//! - [`sealed`]: a file's bytes copied into private, sealed storage and checked against the
//!   manifest, so what `dlopen` maps is exactly what was hashed;
//! - [`sign`]: minisign signatures over a release manifest and the claim they carry;
//! - [`trust`]: the host's trust policy (who may sign what);
//! - [`rollback`]: the highest version seen per repository, outside the cache.
//!
//! This module decides. It reads from a [`FileSource`] handed to it and never opens a
//! registry, the store or a library itself: the store and the loader call it, it calls
//! neither.

pub mod digest;
pub mod rollback;
pub mod sealed;
pub mod sign;
pub mod trust;

use std::fs::File;
use std::path::PathBuf;

pub use digest::{HashingWriter, sha256, sha256_reader};
pub use sealed::{Verified, open_verified};

use crate::manifest::{FileEntry, RelPath, Sha256Digest, Variant};

/// Where the bytes of a variant's files come from: a release directory, or the store.
///
/// The source is not trusted: whatever it returns is copied, sealed and checked against
/// the manifest before anything is loaded.
pub trait FileSource {
    /// Opens the file of `variant` described by `entry`, for reading.
    fn open(&self, variant: &Variant, entry: &FileEntry) -> Result<File, VerifyError>;
}

/// A file of a variant could not be verified. Every variant names the file and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// A file of the variant is missing.
    #[error("file `{path}` of variant `{variant}` is missing from the release at {}", root.display())]
    FileMissing {
        /// The variant.
        variant: String,
        /// The release root.
        root: PathBuf,
        /// The file.
        path: RelPath,
    },
    /// A file of the variant, or a directory on its path, is a symlink or not a regular
    /// file.
    #[error("`{path}` in the release at {} is {what}; releases hold regular files only", root.display())]
    NotRegular {
        /// The release (or store) root.
        root: PathBuf,
        /// The path component.
        path: String,
        /// What was found.
        what: &'static str,
    },
    /// A file does not have the size the manifest says.
    #[error("file `{path}` is {actual} bytes, the manifest says {expected}: the file is truncated or replaced; fetch the release again")]
    SizeMismatch {
        /// The file.
        path: RelPath,
        /// The manifest's size.
        expected: u64,
        /// The size found (at most expected + 1 bytes are read).
        actual: u64,
    },
    /// A file's SHA-256 differs from the manifest's.
    #[error(
        "file `{path}` has sha256 {actual}, the manifest says {expected}: refusing to load it; the release is corrupt or was tampered with"
    )]
    DigestMismatch {
        /// The file.
        path: RelPath,
        /// The manifest's digest.
        expected: Sha256Digest,
        /// The digest of the bytes found.
        actual: Sha256Digest,
    },
    /// The source could not provide the file (for the store: the blob is absent or
    /// unreadable); the source's own error says why and what to run.
    #[error("{what} `{path}` (variant `{variant}`): {source}")]
    Unavailable {
        /// What was being done.
        what: &'static str,
        /// The variant.
        variant: String,
        /// The file.
        path: RelPath,
        /// The source's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Reading or copying a file failed.
    #[error("{what} `{path}`: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}
