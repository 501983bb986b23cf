//! A release directory on disk: `khub.toml` and the files it lists, checked as a tree (no
//! symlink, no special file, nothing unlisted) and read as a [`FileSource`] for the
//! verifier. Opening a release loads nothing; [`crate::load`] does that.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::manifest::{FileEntry, Manifest, ManifestError, RelPath, SIGNATURE_FILE, Variant};
use crate::verify::{FileSource, VerifyError, open_verified};

/// A release directory could not be opened or holds what it must not.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReleaseError {
    /// The release's manifest could not be read.
    #[error("cannot read {}: {source}", path.display())]
    ManifestRead {
        /// The manifest path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The release's manifest is not valid.
    #[error("{}: {source}", path.display())]
    Manifest {
        /// The manifest path.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: ManifestError,
    },
    /// The release directory holds a file its manifest does not list.
    #[error("the release at {} holds `{path}`, which khub.toml does not list: refusing a release with extra files (remove it, or package the release again)", root.display())]
    ExtraFile {
        /// The release root.
        root: PathBuf,
        /// The file.
        path: String,
    },
    /// A file or directory name in the release is not UTF-8; manifests name files in UTF-8
    /// and a lossy comparison could let an unlisted file pass as a listed one.
    #[error("the release at {} holds an entry whose name is not UTF-8 (`{path}`): rename or remove it", root.display())]
    NonUtf8Name {
        /// The release root.
        root: PathBuf,
        /// The path, non-UTF-8 bytes escaped.
        path: String,
    },
    /// A forced variant id is not in the release.
    #[error("the release has no variant `{0}`; `khub explain` lists them")]
    UnknownVariant(String),
    /// An entry of the tree is a symlink or not a regular file or directory.
    #[error("`{path}` in the release at {} is {what}; releases hold regular files only", root.display())]
    NotRegular {
        /// The release root.
        root: PathBuf,
        /// The path component.
        path: String,
        /// What was found.
        what: &'static str,
    },
    /// A file of a variant failed verification.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// The trust policy refuses the release.
    #[error(transparent)]
    Trust(Box<crate::verify::trust::TrustError>),
}

/// The largest signature file read.
const MAX_SIGNATURE_BYTES: u64 = 64 * 1024;

/// A release directory on disk: `khub.toml` and the files it lists.
#[derive(Debug, Clone)]
pub struct Release {
    root: PathBuf,
    manifest: Manifest,
    /// The manifest's bytes as read, which the manifest was parsed from: what a signature
    /// covers.
    manifest_bytes: Vec<u8>,
}

impl Release {
    /// Opens a release directory and reads its manifest. The root is made absolute.
    pub fn open(dir: &Path) -> Result<Release, ReleaseError> {
        let root = std::path::absolute(dir).map_err(|source| {
            ReleaseError::Verify(VerifyError::Io {
                what: "cannot resolve",
                path: dir.display().to_string(),
                source,
            })
        })?;
        let path = root.join("khub.toml");
        let bytes = std::fs::read(&path).map_err(|source| ReleaseError::ManifestRead {
            path: path.clone(),
            source,
        })?;
        let manifest = Manifest::from_bytes(&bytes).map_err(|source| ReleaseError::Manifest { path, source })?;
        Ok(Release {
            root,
            manifest,
            manifest_bytes: bytes,
        })
    }

    /// Applies the trust policy to this local release (see
    /// [`crate::verify::trust::TrustPolicy::check_local`]): a local directory is trusted no
    /// more than a registry's release. `khub load ./dir` calls it unless `--skip-trust`.
    pub fn check_trust(
        &self,
        policy: &crate::verify::trust::TrustPolicy,
        now_unix: u64,
    ) -> Result<crate::verify::trust::TrustDecision, ReleaseError> {
        let signature = self.signature()?;
        policy
            .check_local(
                &self.root,
                &self.manifest.kernel.version,
                &self.manifest_bytes,
                signature.as_deref(),
                now_unix,
            )
            .map_err(|e| ReleaseError::Trust(Box::new(e)))
    }

    /// The manifest's bytes, exactly as read when the release was opened.
    pub fn manifest_bytes(&self) -> &[u8] {
        &self.manifest_bytes
    }

    /// The release's signature (`khub.toml.minisig`), if it has one. Read with the same
    /// care as every file of a release: no symlink, a regular file, at most 64 KiB.
    pub fn signature(&self) -> Result<Option<Vec<u8>>, ReleaseError> {
        let rel = crate::manifest::RelPath::new(SIGNATURE_FILE).map_err(|e| {
            ReleaseError::Verify(VerifyError::Io {
                what: "cannot name",
                path: SIGNATURE_FILE.into(),
                source: std::io::Error::other(e.to_string()),
            })
        })?;
        let f = match crate::fsx::open_under(&self.root, &rel) {
            Ok(f) => f,
            Err(crate::fsx::OpenError::Missing { .. }) => return Ok(None),
            Err(crate::fsx::OpenError::NotRegular { path, what, .. }) => {
                return Err(ReleaseError::NotRegular {
                    root: self.root.clone(),
                    path,
                    what,
                });
            }
            Err(e) => {
                return Err(ReleaseError::Verify(VerifyError::Io {
                    what: "cannot open",
                    path: self.root.join(SIGNATURE_FILE).display().to_string(),
                    source: std::io::Error::other(e.to_string()),
                }));
            }
        };
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_SIGNATURE_BYTES + 1), &mut buf).map_err(|source| {
            ReleaseError::Verify(VerifyError::Io {
                what: "cannot read",
                path: self.root.join(SIGNATURE_FILE).display().to_string(),
                source,
            })
        })?;
        if buf.len() as u64 > MAX_SIGNATURE_BYTES {
            return Err(ReleaseError::Verify(VerifyError::Io {
                what: "refusing",
                path: self.root.join(SIGNATURE_FILE).display().to_string(),
                source: std::io::Error::other(format!("larger than {MAX_SIGNATURE_BYTES} bytes")),
            }));
        }
        Ok(Some(buf))
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The absolute root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Checks the release directory itself: no symlink anywhere, nothing but regular files
    /// and directories, and no file the manifest does not list (besides `khub.toml` and its
    /// signature `khub.toml.minisig`).
    pub fn check_tree(&self) -> Result<(), ReleaseError> {
        let mut listed: std::collections::BTreeSet<String> = self
            .manifest
            .variants
            .iter()
            .flat_map(|v| v.files.iter().map(|f| f.path.to_string()))
            .collect();
        listed.insert("khub.toml".into());
        listed.insert(SIGNATURE_FILE.into());
        let mut stack = vec![(self.root.clone(), String::new())];
        let mut seen = 0usize;
        while let Some((dir, prefix)) = stack.pop() {
            let entries = std::fs::read_dir(&dir).map_err(|source| {
                ReleaseError::Verify(VerifyError::Io {
                    what: "cannot list",
                    path: dir.display().to_string(),
                    source,
                })
            })?;
            for e in entries {
                let e = e.map_err(|source| {
                    ReleaseError::Verify(VerifyError::Io {
                        what: "cannot list",
                        path: dir.display().to_string(),
                        source,
                    })
                })?;
                seen += 1;
                if seen > 1_000_000 {
                    return Err(ReleaseError::Verify(VerifyError::Io {
                        what: "too many entries in",
                        path: self.root.display().to_string(),
                        source: std::io::Error::other("more than a million entries"),
                    }));
                }
                // Byte-exact: a name that is not UTF-8 is refused, never compared lossily
                // (a manifest listing `lib\u{fffd}.so` must not admit `lib\xff.so`).
                let raw = e.file_name();
                let Some(name) = raw.to_str() else {
                    let shown = raw.to_string_lossy().escape_default().to_string();
                    return Err(ReleaseError::NonUtf8Name {
                        root: self.root.clone(),
                        path: if prefix.is_empty() { shown } else { format!("{prefix}/{shown}") },
                    });
                };
                let rel = if prefix.is_empty() {
                    name.to_owned()
                } else {
                    format!("{prefix}/{name}")
                };
                let t = e.file_type().map_err(|source| {
                    ReleaseError::Verify(VerifyError::Io {
                        what: "cannot inspect",
                        path: rel.clone(),
                        source,
                    })
                })?;
                if t.is_symlink() {
                    return Err(ReleaseError::NotRegular {
                        root: self.root.clone(),
                        path: rel,
                        what: "a symlink",
                    });
                } else if t.is_dir() {
                    stack.push((e.path(), rel));
                } else if !t.is_file() {
                    return Err(ReleaseError::NotRegular {
                        root: self.root.clone(),
                        path: rel,
                        what: "not a regular file",
                    });
                } else if !listed.contains(&rel) {
                    return Err(ReleaseError::ExtraFile {
                        root: self.root.clone(),
                        path: rel,
                    });
                }
            }
        }
        Ok(())
    }

    /// Verifies every file of a variant without loading anything.
    pub fn verify_variant(&self, id: &str) -> Result<(), ReleaseError> {
        let variant = self
            .manifest
            .variant(id)
            .ok_or_else(|| ReleaseError::UnknownVariant(id.to_owned()))?;
        for f in &variant.files {
            open_verified(self, variant, f)?;
        }
        Ok(())
    }
}

impl FileSource for Release {
    fn open(&self, variant: &Variant, entry: &FileEntry) -> Result<File, VerifyError> {
        crate::fsx::open_under(&self.root, &entry.path).map_err(|e| match e {
            crate::fsx::OpenError::Missing { root, path } => VerifyError::FileMissing {
                variant: variant.id.clone(),
                root,
                path: RelPath::new(path).unwrap_or_else(|_| entry.path.clone()),
            },
            crate::fsx::OpenError::NotRegular { root, path, what } => VerifyError::NotRegular { root, path, what },
            crate::fsx::OpenError::Io { path, source, .. } => VerifyError::Io {
                what: "cannot open",
                path,
                source,
            },
        })
    }
}
