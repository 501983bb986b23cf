//! Opening files inside a root directory without ever leaving it: every component of the
//! relative path is checked not to be a symlink, intermediate components must be
//! directories, the last one a regular file, and the final open refuses symlinks too.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::manifest::RelPath;

/// Why a file inside a root could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Nothing at that path.
    #[error("`{path}` does not exist under {}", root.display())]
    Missing {
        /// The root.
        root: PathBuf,
        /// The relative path.
        path: String,
    },
    /// A component is a symlink, or not the kind of file expected.
    #[error("`{path}` under {} is {what}; only regular files and directories are allowed", root.display())]
    NotRegular {
        /// The root.
        root: PathBuf,
        /// The component's relative path.
        path: String,
        /// What was found.
        what: &'static str,
    },
    /// Another I/O error.
    #[error("cannot open `{path}` under {}: {source}", root.display())]
    Io {
        /// The root.
        root: PathBuf,
        /// The relative path.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Opens `rel` under `root` for reading, refusing symlinks anywhere on the way.
pub fn open_under(root: &Path, rel: &RelPath) -> Result<File, OpenError> {
    let mut p = root.to_path_buf();
    let parts: Vec<&str> = rel.components().collect();
    for (i, part) in parts.iter().enumerate() {
        p.push(part);
        let shown = || parts[..=i].join("/");
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(OpenError::NotRegular {
                    root: root.to_owned(),
                    path: shown(),
                    what: "a symlink",
                });
            }
            Ok(m) if i + 1 < parts.len() && !m.is_dir() => {
                return Err(OpenError::NotRegular {
                    root: root.to_owned(),
                    path: shown(),
                    what: "not a directory",
                });
            }
            Ok(m) if i + 1 == parts.len() && !m.is_file() => {
                return Err(OpenError::NotRegular {
                    root: root.to_owned(),
                    path: shown(),
                    what: "not a regular file",
                });
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(OpenError::Missing {
                    root: root.to_owned(),
                    path: rel.to_string(),
                });
            }
            Err(source) => {
                return Err(OpenError::Io {
                    root: root.to_owned(),
                    path: rel.to_string(),
                    source,
                });
            }
        }
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    }
    opts.open(&p).map_err(|source| OpenError::Io {
        root: root.to_owned(),
        path: rel.to_string(),
        source,
    })
}
