//! The file-system primitives every writer and reader in khub shares, so each exists once:
//!
//! - [`open_under`]: open a file inside a root directory without ever leaving it. Every
//!   component of the relative path is checked not to be a symlink, intermediate components
//!   must be directories, the last one a regular file, and the final open refuses symlinks
//!   too (`O_NOFOLLOW`).
//! - [`write_atomic`]: replace a file so that readers and crashes see the old bytes or the
//!   new ones, never a mix: temp file beside the target, write, `fsync`, rename, `fsync` of
//!   the directory.
//! - [`sync_dir`]: make a directory entry (a rename, a create) durable.

use std::fs::File;
use std::io::Write;
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

/// Makes the entries of `dir` durable: after a rename or create in it, the name survives a
/// crash only once the directory is synced. Unix only; a no-op elsewhere (std has no
/// portable directory sync).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Writes `bytes` to `path` atomically and durably: a temp file in the same directory
/// (`.<name>.<random>.tmp`), written, `fsync`ed, renamed over `path`, then the directory
/// `fsync`ed. Readers see the old file or the new one; a crash leaves one of them and, at
/// worst, a stray temp file. The directory must exist.
///
/// The error names the step that failed; the caller adds the path to its own error type.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AtomicWriteError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let step = |what: &'static str| move |source| AtomicWriteError { what, source };
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    // The new file gets the mode of the file it replaces, or, for a new one, what any new
    // file gets (0666 less the umask) rather than tempfile's private 0600: a release's
    // khub.toml or a project's khub.lock must stay readable by whoever could read it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let mut tmp = builder.tempfile_in(dir).map_err(step("cannot create a temporary file beside"))?;
    #[cfg(unix)]
    if let Ok(old) = std::fs::symlink_metadata(path)
        && old.is_file()
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = old.permissions().mode() & 0o7777;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(step("cannot set the permissions of the replacement of"))?;
    }
    tmp.write_all(bytes).map_err(step("cannot write"))?;
    tmp.as_file().sync_all().map_err(step("cannot sync"))?;
    tmp.persist(path).map_err(|e| AtomicWriteError {
        what: "cannot replace",
        source: e.error,
    })?;
    sync_dir(dir).map_err(step("cannot sync the directory of"))
}

/// As [`write_atomic`], for a file the user names and may keep behind a symlink (an
/// application's `kernels.toml` or `khub.lock` linked from elsewhere): a symlink at `path`
/// is followed and its target replaced, rather than the link turned into a regular file.
/// Never for files of the cache, where a planted symlink must not redirect a write.
pub fn write_atomic_user_file(path: &Path, bytes: &[u8]) -> Result<(), AtomicWriteError> {
    let target = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => std::fs::canonicalize(path).map_err(|source| AtomicWriteError {
            what: "cannot follow the symlink",
            source,
        })?,
        _ => path.to_path_buf(),
    };
    write_atomic(&target, bytes)
}

/// Creates `path` (which must not exist), writes `bytes` and `fsync`s the file: for files
/// staged in a private directory that is renamed into place as a whole afterwards (the
/// caller syncs the directories). Refuses to follow or replace anything already there.
pub fn write_durable_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// A step of [`write_atomic`] failed.
#[derive(Debug)]
pub struct AtomicWriteError {
    /// What was being done, phrased to precede the path: "cannot write", "cannot replace".
    pub what: &'static str,
    /// The I/O error.
    pub source: std::io::Error,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A user file behind a symlink is edited where it is; the link stays a link.
    #[cfg(unix)]
    #[test]
    fn user_files_are_written_through_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real.toml");
        write_atomic(&real, b"one").unwrap();
        let link = d.path().join("kernels.toml");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        write_atomic_user_file(&link, b"two").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(&real).unwrap(), b"two");
        // A dangling link is an error, not a new file beside it.
        let dangling = d.path().join("khub.lock");
        std::os::unix::fs::symlink(d.path().join("missing/khub.lock"), &dangling).unwrap();
        assert!(write_atomic_user_file(&dangling, b"x").is_err());
    }

    /// A file written atomically keeps the mode of the file it replaces, and a new one
    /// gets the umask's mode (tempfile's 0600 made every khub.toml, khub.lock and
    /// kernels.toml private to their writer).
    #[cfg(unix)]
    #[test]
    fn write_atomic_keeps_modes() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("khub.lock");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        // SAFETY: umask only reads and sets this process's file mode mask.
        let umask = unsafe {
            let u = libc::umask(0o022);
            libc::umask(u);
            u
        };
        write_atomic(&p, b"one").unwrap();
        assert_eq!(mode(&p), 0o666 & !(umask as u32), "a new file gets 0666 less the umask");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(mode(&p), 0o640, "a replaced file keeps its mode");
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.toml");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f.toml")]);
    }

    #[test]
    fn write_atomic_into_a_missing_directory_fails_without_creating_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("absent/f.toml");
        let e = write_atomic(&p, b"x").unwrap_err();
        assert_eq!(e.what, "cannot create a temporary file beside");
        assert!(!d.path().join("absent").exists());
    }
}
