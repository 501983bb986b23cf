//! A release directory on disk: `khub.toml` and the files it lists, checked as a tree (no
//! symlink, no special file, nothing unlisted) and read as a [`FileSource`] for the
//! verifier. Opening a release loads nothing; [`crate::load`] does that.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::manifest::{FileEntry, Manifest, ManifestError, RelPath, Variant};
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
}

/// A release directory on disk: `khub.toml` and the files it lists.
#[derive(Debug, Clone)]
pub struct Release {
    root: PathBuf,
    manifest: Manifest,
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
        Ok(Release { root, manifest })
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
        listed.insert("khub.toml.minisig".into());
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
                let name = e.file_name().to_string_lossy().into_owned();
                let rel = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
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
