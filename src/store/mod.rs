//! The content-addressed store: verified file bytes on disk, named by their SHA-256.
//!
//! This module alone writes to the cache directory, with one exception. Nothing else in khub
//! creates, renames or deletes files there: the blobs live in `store-v1/`, and the
//! known-release index (what offline mode resolves against) in `index-v1/`, written by
//! [`index`]. The exception is `host-v1/`, the per-boot host-facts cache that
//! [`crate::host::cache`] owns (it holds no blob and nothing here reads it).
//!
//! # Layout
//!
//! ```text
//! <cache>/store-v1/                     cache: KHUB_CACHE, else $XDG_CACHE_HOME/khub, else $HOME/.cache/khub
//!   blobs/<first 2 hex>/<64 hex>        immutable, mode 0444, named by the SHA-256 of their bytes
//!   tmp/<64 hex>.<pid>.<random>.partial partial writes
//!   locks/<64 hex>.lock                 one lock file per entry
//!   gc.lock                             shared by writers and pinning readers, exclusive for gc
//! ```
//!
//! The layout version is in the directory name: a future layout gets `store-v2/` next to
//! this one, and the two never share a file.
//!
//! # Invariants
//!
//! - Only complete, verified bytes are ever renamed into `blobs/`: a writer streams into
//!   `tmp/` while hashing, and renames only when both the byte count and the digest match.
//!   Readers therefore never see a partial blob. The temp file sits on the same file system
//!   as `blobs/` (both are under `store-v1/`), so the rename is atomic.
//! - Nothing follows a symlink out of the store: every component below `store-v1/` is
//!   checked with `lstat` (or, to open a blob on Linux, by one `openat2` with
//!   `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` below `store-v1/`, the `lstat` walk being its
//!   fallback), blobs are opened with `O_NOFOLLOW` (and `O_NONBLOCK`), lock files with
//!   `O_NOFOLLOW` too, and temp files are created with `O_EXCL`. (`store-v1/` itself, and
//!   the cache directory above it, may be symlinks: that is the user's choice, not an
//!   attacker's.)
//! - The store is a cache, not a source of truth: [`crate::load`] re-verifies every byte it
//!   loads against the manifest, so a blob damaged after it was written is caught there.
//!   [`Store::verify_blob`] rehashes a blob and evicts it when damaged.
//!
//! # Locks
//!
//! Two kinds, both advisory (`flock` on Unix, `LockFileEx` on Windows, through std's
//! [`File::lock`]), always taken in this order:
//!
//! 1. `gc.lock`, **shared** by every writer ([`Store::insert_with`], [`Store::verify_blob`])
//!    and by readers that need blobs to stay put across several steps ([`Store::pin`]);
//!    **exclusive** for [`Store::gc`]. While gc holds it, nobody is writing, so every temp
//!    file is an orphan and every entry lock is free.
//! 2. `locks/<hex>.lock`, **exclusive**, held while one entry is written or evicted. A
//!    writer re-checks presence after taking it: two processes fetching the same file
//!    download it once.
//!
//! Each lock is tried first; when busy, khub polls every 10–50 ms up to the lock timeout
//! (default 10 minutes, `KHUB_LOCK_TIMEOUT`), then fails with [`StoreError::LockTimeout`]
//! naming the lock file and the variable. Guards ([`StoreLock`]) unlock on drop; closing the
//! descriptor would release the lock anyway, so a crashed process never leaves one held.
//! Lock files are never deleted while anybody may hold them: only gc removes them, under the
//! exclusive `gc.lock`.
//!
//! # Durability (fsync policy)
//!
//! A blob is durable before [`Store::insert_with`] returns: the temp file is `fsync`ed
//! before the rename (so a crash can never leave a renamed but empty or short blob, as
//! delayed allocation allows), and the shard directory is `fsync`ed after it, so the name
//! survives a crash too. A new shard directory is created and `blobs/` `fsync`ed while the
//! bytes stream in, and always before the rename. Callers may record the digest
//! elsewhere (a lock file) as soon as the call returns. Nothing else is synced: temp files
//! that lose their data in a crash are garbage that gc removes; lock files carry no data;
//! a removal by gc that a crash undoes merely leaves a blob behind. Directory `fsync` is
//! Unix-only; Windows has no portable equivalent through std.
//!
//! Readers hold no lock by default: an open descriptor survives a later unlink on Unix, and
//! the loader copies and verifies what it reads.

use std::collections::BTreeSet;
use std::fs::{File, Metadata, OpenOptions, TryLockError};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::env::{self, Environment};
use crate::verify::{FileSource, HashingWriter, VerifyError};

mod index;
use crate::manifest::{FileEntry, Sha256Digest, Variant};
pub use index::{IndexEntry, KnownRelease, KnownReleases};

/// The name of the store's directory inside the cache directory; the suffix is the layout
/// version.
pub const LAYOUT_DIR: &str = "store-v1";

/// How long khub waits for a store lock unless `KHUB_LOCK_TIMEOUT` says otherwise.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(600);

/// The age after which a temp file counts as abandoned even while writers may be active
/// (only a dry-run gc, which does not exclude writers, uses it).
pub const STALE_TMP_AGE: Duration = Duration::from_secs(3600);

/// The longest `KHUB_LOCK_TIMEOUT` may ask for: a year. Keeps `Duration` arithmetic sane.
const MAX_LOCK_TIMEOUT_SECS: f64 = 365.0 * 24.0 * 3600.0;

/// The first and the longest pause between two lock attempts.
const POLL_FIRST: Duration = Duration::from_millis(10);
const POLL_MAX: Duration = Duration::from_millis(50);

/// The write buffer between a `fill` callback and the temp file.
const WRITE_BUFFER: usize = 256 * 1024;

/// A store operation failed. Every variant names the path involved and what to do next.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A file-system call failed.
    #[error("{what} {}: {source}; check that the cache directory is writable, or point KHUB_CACHE at one that is", path.display())]
    Io {
        /// What was being done (`"cannot create"`).
        what: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The bytes offered for an entry hash differently from the digest they were announced
    /// with. Nothing was stored.
    #[error(
        "`{path}` has sha256 {actual}, expected {expected}: refusing to store it; the download is corrupt or was tampered with, fetch it again"
    )]
    DigestMismatch {
        /// What was being stored (a release-relative path, or a label).
        path: String,
        /// The announced digest.
        expected: Sha256Digest,
        /// The digest of the bytes received.
        actual: Sha256Digest,
    },
    /// The bytes offered for an entry are more or fewer than announced. Nothing was stored.
    #[error(
        "`{path}` is {actual} bytes, expected {expected}: refusing to store it; the download was truncated or replaced, fetch it again"
    )]
    SizeMismatch {
        /// What was being stored.
        path: String,
        /// The announced size.
        expected: u64,
        /// The bytes received (when too many: at least this many).
        actual: u64,
    },
    /// Something in the store is a symlink, or not the kind of file the layout puts there.
    #[error("{} is {what}; the store holds only regular files and directories: remove it, or run `khub gc`", path.display())]
    NotRegular {
        /// The offending path.
        path: PathBuf,
        /// What was found (`"a symlink"`).
        what: &'static str,
    },
    /// Another process held a store lock for longer than the lock timeout.
    #[error(
        "gave up after {waited:?} waiting for {}: another khub process is using the store; let it finish, or set {} (seconds) to wait longer",
        path.display(),
        env::KHUB_LOCK_TIMEOUT
    )]
    LockTimeout {
        /// The lock file.
        path: PathBuf,
        /// How long khub waited.
        waited: Duration,
    },
    /// The `fill` callback of [`Store::insert_with`] failed (a download, typically).
    /// Nothing was stored.
    #[error("cannot get `{path}`: {message}; nothing was stored, try again")]
    Fill {
        /// What was being stored.
        path: String,
        /// The callback's error, with its sources.
        message: String,
    },
    /// A blob is not in the store.
    #[error("blob {digest} is not in the store ({}); run `khub fetch` to download it", path.display())]
    Missing {
        /// The digest looked for.
        digest: Sha256Digest,
        /// Where it would be.
        path: PathBuf,
    },
    /// No cache directory could be derived from the environment.
    #[error(
        "cannot choose a cache directory: none of {}, {} (absolute) or {} is set; set {} to a writable directory",
        env::KHUB_CACHE,
        env::XDG_CACHE_HOME,
        env::HOME,
        env::KHUB_CACHE
    )]
    NoCacheDir,
    /// An environment variable the store reads holds a value it cannot use.
    #[error("{var}={value:?} is not valid: expected {expected}")]
    InvalidEnv {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is accepted.
        expected: &'static str,
    },
}

impl StoreError {
    fn io(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> StoreError {
        let path = path.into();
        move |source| StoreError::Io { what, path, source }
    }
}

/// How a [`Store`] behaves, apart from where it lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// The longest to wait for a lock another process holds.
    pub lock_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
        }
    }
}

impl StoreOptions {
    /// Options from an environment snapshot: `KHUB_LOCK_TIMEOUT`, in seconds (fractions
    /// allowed; `0` means "fail at once when busy").
    pub fn from_env(env: &Environment) -> Result<Self, StoreError> {
        let lock_timeout = match env.get(env::KHUB_LOCK_TIMEOUT) {
            None => DEFAULT_LOCK_TIMEOUT,
            Some(v) => {
                let secs: f64 = v
                    .trim()
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && (0.0..=MAX_LOCK_TIMEOUT_SECS).contains(s))
                    .ok_or_else(|| StoreError::InvalidEnv {
                        var: env::KHUB_LOCK_TIMEOUT,
                        value: v.to_owned(),
                        expected: "a number of seconds, 0 (fail at once) up to 31536000",
                    })?;
                Duration::from_secs_f64(secs)
            }
        };
        Ok(StoreOptions { lock_timeout })
    }
}

/// What a `fill` callback of [`Store::insert_with`] may fail with: any error, boxed, since
/// callers stream from a network registry, a directory or memory.
pub type FillError = Box<dyn std::error::Error + Send + Sync>;

/// The outcome of [`Store::insert_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// The blob was written: this many bytes.
    Written(u64),
    /// The blob was already there (perhaps written by another process meanwhile); the
    /// `fill` callback was not called.
    Present,
}

/// What [`Store::gc`] removed, or would remove on a dry run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Blobs removed: those not in the keep set, and symlinks found among blobs.
    pub removed: usize,
    /// The bytes of the removed blobs.
    pub removed_bytes: u64,
    /// Blobs kept.
    pub kept: usize,
    /// Abandoned temp files removed.
    pub tmp_removed: usize,
    /// Quarantined (damaged) blobs removed.
    pub quarantine_removed: usize,
}

/// A held store lock; released when dropped.
#[must_use = "the lock is released as soon as the guard is dropped"]
#[derive(Debug)]
pub struct StoreLock {
    file: File,
    path: PathBuf,
}

impl StoreLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        // Nothing to report to: khub has no logger, and closing the descriptor, right after
        // this, releases the lock whatever `unlock` says.
        let _ = self.file.unlock();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LockMode {
    Shared,
    Exclusive,
}

/// The content-addressed store under one cache directory.
#[derive(Debug, Clone)]
pub struct Store {
    /// The cache directory.
    cache: PathBuf,
    /// `<cache>/store-v1`.
    root: PathBuf,
    options: StoreOptions,
}

impl Store {
    /// Opens (creating it if needed) the store in the cache directory `root`, with default
    /// options.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        Self::open_with(root, StoreOptions::default())
    }

    /// Opens (creating it if needed) the store in the cache directory `root`.
    pub fn open_with(root: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        let store = Store {
            cache: root.to_path_buf(),
            root: root.join(LAYOUT_DIR),
            options,
        };
        std::fs::create_dir_all(&store.root).map_err(StoreError::io("cannot create", &store.root))?;
        for dir in [store.blobs_dir(), store.tmp_dir(), store.locks_dir(), store.quarantine_dir()] {
            create_dir_once(&dir)?;
        }
        Ok(store)
    }

    /// Opens the store where the environment says: [`Store::default_root`] and
    /// [`StoreOptions::from_env`].
    pub fn from_env(env: &Environment) -> Result<Store, StoreError> {
        Self::open_with(&Self::default_root(env)?, StoreOptions::from_env(env)?)
    }

    /// The cache directory the environment designates, in this order: `KHUB_CACHE`;
    /// `$XDG_CACHE_HOME/khub` when that is absolute (the XDG Base Directory specification
    /// says to ignore a relative one); `$HOME/.cache/khub`. Empty values count as unset.
    pub fn default_root(env: &Environment) -> Result<PathBuf, StoreError> {
        if let Some(dir) = env.get(env::KHUB_CACHE) {
            return Ok(PathBuf::from(dir));
        }
        if let Some(xdg) = env.get(env::XDG_CACHE_HOME).map(Path::new).filter(|p| p.is_absolute()) {
            return Ok(xdg.join("khub"));
        }
        if let Some(home) = env.get(env::HOME) {
            return Ok(Path::new(home).join(".cache").join("khub"));
        }
        Err(StoreError::NoCacheDir)
    }

    /// The store directory, `<cache>/store-v1`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// Where the blob named `d` lives: `blobs/<first 2 hex>/<64 hex>`. Pure: nothing is
    /// checked.
    pub fn blob_path(&self, d: &Sha256Digest) -> PathBuf {
        let hex = d.to_string();
        self.blobs_dir().join(shard_of(&hex)).join(hex)
    }

    /// The lock file of the entry `d`: `locks/<64 hex>.lock`.
    pub fn entry_lock_path(&self, d: &Sha256Digest) -> PathBuf {
        self.locks_dir().join(format!("{d}.lock"))
    }

    /// The lock file gc takes exclusively and writers share: `gc.lock`.
    pub fn gc_lock_path(&self) -> PathBuf {
        self.root.join("gc.lock")
    }

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn quarantine_dir(&self) -> PathBuf {
        self.root.join("quarantine")
    }

    fn locks_dir(&self) -> PathBuf {
        self.root.join("locks")
    }

    /// Whether the blob `d` is present as a regular file (not a symlink) of `size` bytes.
    /// Its bytes are not rehashed; see [`Store::verify_blob`].
    pub fn contains(&self, d: &Sha256Digest, size: u64) -> bool {
        matches!(self.blob_metadata(d), Ok(Some(m)) if m.is_file() && m.len() == size)
    }

    /// Opens the blob `d` for reading. Refuses symlinks and anything but a regular file, at
    /// the blob and at every directory between it and the store root. The file is opened
    /// with `O_NONBLOCK` (so that a FIFO in its place cannot block the open), which changes
    /// nothing for reading, copying or mapping a regular file.
    pub fn open_blob(&self, d: &Sha256Digest) -> Result<File, StoreError> {
        // One `openat2` that refuses every symlink and any escape below the store root does
        // what the checks below do with three `lstat`s and an `open`. When it cannot answer
        // (no `openat2`, a missing blob, a symlink, not a regular file), the path-by-path
        // checks below run and name exactly what is wrong.
        #[cfg(target_os = "linux")]
        if let Some(file) = self.open_blob_beneath(d) {
            return Ok(file);
        }
        let path = self.blob_path(d);
        let missing = || StoreError::Missing {
            digest: *d,
            path: path.clone(),
        };
        if self.blob_metadata(d)?.is_none() {
            return Err(missing());
        }
        // O_NONBLOCK: a FIFO swapped in after the `lstat`s must not block the open (it is
        // refused below as not a regular file).
        let file = open_nofollow(OpenOptions::new().read(true), &path, NONBLOCK).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => missing(),
            _ if is_symlink_refusal(&e) => StoreError::NotRegular {
                path: path.clone(),
                what: "a symlink",
            },
            _ => StoreError::Io {
                what: "cannot open",
                path: path.clone(),
                source: e,
            },
        })?;
        // The checks above are by path; this one is on what was actually opened.
        let meta = file.metadata().map_err(StoreError::io("cannot inspect", &path))?;
        if !meta.is_file() {
            return Err(StoreError::NotRegular {
                path,
                what: "not a regular file",
            });
        }
        Ok(file)
    }

    /// The blob `d` opened with one `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`
    /// relative to the store root, if that finds a regular file; `None` otherwise, for
    /// [`Store::open_blob`]'s path-by-path checks to answer.
    #[cfg(target_os = "linux")]
    fn open_blob_beneath(&self, d: &Sha256Digest) -> Option<File> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        use std::os::unix::ffi::OsStrExt;
        // The root is opened on every call rather than kept: a store directory moved,
        // re-pointed (it may be a symlink) or recreated while this `Store` lives is then
        // seen here exactly as the path-based operations (insert, gc, quarantine) see it.
        let path = std::ffi::CString::new(self.root.as_os_str().as_bytes()).ok()?;
        // SAFETY: `path` is NUL-terminated; O_PATH opens a handle to the directory and
        // nothing else.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` was just opened by this call and is owned by nothing else.
        let root = unsafe { OwnedFd::from_raw_fd(fd) };
        let hex = d.to_string();
        let rel = std::ffi::CString::new(format!("blobs/{}/{hex}", shard_of(&hex))).ok()?;
        // O_NONBLOCK: a FIFO planted at the blob's path must not block the open (it is
        // then refused below as not a regular file). A device node would be opened before that check, as
        // with any `open`: making one takes CAP_MKNOD, which a store writer does not have.
        // The kernel's `struct open_how` (linux/openat2.h), whose size is passed with it
        // (libc's is non-exhaustive, so it cannot be built here).
        #[repr(C)]
        struct OpenHow {
            flags: u64,
            mode: u64,
            resolve: u64,
        }
        const _: () = assert!(std::mem::size_of::<OpenHow>() == 24, "OPEN_HOW_SIZE_VER0");
        let how = OpenHow {
            flags: (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK) as u64,
            mode: 0,
            resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
        };
        // SAFETY: a valid directory descriptor, a NUL-terminated relative path, and an
        // `open_how` whose size is passed with it; the result is a new descriptor or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                root.as_raw_fd(),
                rel.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
        // SAFETY: `fd` was just returned by openat2 and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.metadata().ok().filter(Metadata::is_file).map(|_| file)
    }

    /// `lstat`s the blob and the directories above it inside the store: `Ok(None)` when
    /// any is missing, an error when any is a symlink or of the wrong kind.
    fn blob_metadata(&self, d: &Sha256Digest) -> Result<Option<Metadata>, StoreError> {
        let blob = self.blob_path(d);
        let shard = blob.parent().map(Path::to_path_buf).unwrap_or_default();
        for dir in [self.blobs_dir(), shard] {
            match lstat(&dir)? {
                None => return Ok(None),
                Some(m) if m.file_type().is_symlink() => {
                    return Err(StoreError::NotRegular {
                        path: dir,
                        what: "a symlink",
                    });
                }
                Some(m) if !m.is_dir() => {
                    return Err(StoreError::NotRegular {
                        path: dir,
                        what: "not a directory",
                    });
                }
                Some(_) => {}
            }
        }
        match lstat(&blob)? {
            Some(m) if m.file_type().is_symlink() => Err(StoreError::NotRegular {
                path: blob,
                what: "a symlink",
            }),
            Some(m) if !m.is_file() => Err(StoreError::NotRegular {
                path: blob,
                what: "not a regular file",
            }),
            other => Ok(other),
        }
    }

    /// Holds `gc.lock` shared: while the guard lives, [`Store::gc`] waits, so blobs seen
    /// present stay present (for a fetch followed by a load, say). Writers share it too.
    pub fn pin(&self) -> Result<StoreLock, StoreError> {
        acquire(&self.gc_lock_path(), LockMode::Shared, self.options.lock_timeout)
    }

    /// Takes the exclusive lock of entry `d`. The `_pin` argument proves the caller holds
    /// `gc.lock` shared, as the lock order requires.
    fn lock_entry(&self, _pin: &StoreLock, d: &Sha256Digest) -> Result<StoreLock, StoreError> {
        acquire(&self.entry_lock_path(d), LockMode::Exclusive, self.options.lock_timeout)
    }

    /// Stores a blob whose digest and size are known in advance.
    ///
    /// Takes `gc.lock` shared and the entry's lock, then re-checks presence: when the blob
    /// is there (another process may just have written it), `fill` is **not** called and
    /// [`Inserted::Present`] is returned. Otherwise `fill` gets a writer that streams into a
    /// temp file in `tmp/` while hashing; more than `size` bytes are refused at once. If the
    /// bytes count or hash differently from `size` and `d`, or `fill` fails, the temp file
    /// is deleted and nothing is stored. Otherwise the file is `fsync`ed, made read-only
    /// (0444), renamed into `blobs/`, and the directory `fsync`ed.
    ///
    /// `label` names what is being stored in errors (a release-relative path, typically).
    /// The count `fill` returns is informational: the store counts the bytes itself.
    pub fn insert_with(
        &self,
        label: &str,
        d: &Sha256Digest,
        size: u64,
        fill: &mut dyn FnMut(&mut dyn Write) -> Result<u64, FillError>,
    ) -> Result<Inserted, StoreError> {
        let pin = self.pin()?;
        let _entry = self.lock_entry(&pin, d)?;
        if self.contains(d, size) {
            return Ok(Inserted::Present);
        }
        // Holding the entry lock, any temp file of this entry belongs to a writer that died.
        self.remove_orphan_temps(d)?;

        let hex = d.to_string();
        let tmp_dir = self.tmp_dir();
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!("{hex}.{}.", std::process::id()))
            .suffix(".partial")
            .rand_bytes(8)
            .tempfile_in(&tmp_dir)
            .map_err(StoreError::io("cannot create a temp file in", &tmp_dir))?;
        let tmp_path = tmp.path().to_path_buf();

        // A new shard directory is created, and its name in `blobs/` made durable, on a
        // thread of its own while the bytes arrive, instead of after the last of them: one
        // directory flush fewer at the end of a download into a fresh shard.
        let shard = self.blobs_dir().join(shard_of(&hex));
        let sink = EarlyWriteback::new(tmp.as_file_mut());
        let mut w = HashingWriter::new(BufWriter::with_capacity(WRITE_BUFFER, sink), size);
        let (filled, shard_ready) = if lstat(&shard)?.is_some_and(|m| m.is_dir()) {
            (fill(&mut w), Ok(()))
        } else {
            std::thread::scope(|s| {
                let prepare = s.spawn(|| self.prepare_shard(&shard));
                let filled = fill(&mut w);
                let ready = prepare.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
                (filled, ready)
            })
        };
        if let Some(attempted) = w.overflow() {
            return Err(StoreError::SizeMismatch {
                path: label.to_owned(),
                expected: size,
                actual: attempted,
            });
        }
        if let Some(source) = w.take_write_error() {
            return Err(StoreError::Io {
                what: "cannot write",
                path: tmp_path,
                source,
            });
        }
        if let Err(e) = filled {
            return Err(StoreError::Fill {
                path: label.to_owned(),
                message: error_chain(e.as_ref()),
            });
        }
        if w.written() != size {
            return Err(StoreError::SizeMismatch {
                path: label.to_owned(),
                expected: size,
                actual: w.written(),
            });
        }
        let (actual, mut out, _) = w.finish();
        if actual != *d {
            return Err(StoreError::DigestMismatch {
                path: label.to_owned(),
                expected: *d,
                actual,
            });
        }
        let flushed = out.flush();
        drop(out);
        flushed.map_err(StoreError::io("cannot write", &tmp_path))?;

        let file = tmp.as_file();
        file.sync_all().map_err(StoreError::io("cannot sync", &tmp_path))?;
        make_read_only(file).map_err(StoreError::io("cannot make read-only", &tmp_path))?;

        let blob = self.blob_path(d);
        shard_ready?;
        // Checked again here: the shard may have been there before `fill` (and not made by
        // this call), or replaced since.
        expect_dir(&shard)?;
        // `rename` replaces a damaged blob of the wrong size, or a symlink, in one step.
        tmp.persist(&blob).map_err(|e| StoreError::Io {
            what: "cannot rename a verified temp file to",
            path: blob.clone(),
            source: e.error,
        })?;
        sync_dir(&shard)?;
        Ok(Inserted::Written(size))
    }

    /// Creates the shard directory `shard` unless it exists, and makes its name in
    /// `blobs/` durable. Called only when the shard was absent a moment before, so one
    /// found existing was just made by a concurrent writer, whose sync may still be under
    /// way: it is synced here too.
    fn prepare_shard(&self, shard: &Path) -> Result<(), StoreError> {
        match std::fs::create_dir(shard) {
            Ok(()) => sync_dir(&self.blobs_dir()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => sync_dir(&self.blobs_dir()),
            Err(source) => Err(StoreError::Io {
                what: "cannot create",
                path: shard.to_path_buf(),
                source,
            }),
        }
    }

    /// Stores `bytes`, computing their digest; returns it. A present blob is re-hashed
    /// (these are small: manifests and signatures) and replaced when damaged.
    pub fn insert_bytes(&self, label: &str, bytes: &[u8]) -> Result<Sha256Digest, StoreError> {
        let d = crate::verify::sha256(bytes);
        let len = bytes.len() as u64;
        if self.contains(&d, len) {
            self.verify_blob(&d, len)?;
        }
        self.insert_with(label, &d, len, &mut |w| {
            w.write_all(bytes)?;
            Ok(len)
        })?;
        Ok(d)
    }

    /// Rehashes the blob `d`: `Ok(true)` when it is a regular file of `size` bytes with
    /// that digest. A blob whose bytes do not hash to its name is damaged: it is moved to
    /// quarantine (a symlink in its place is removed) and `Ok(false)` returned, as for a
    /// missing one, so that the next fetch writes it afresh. An intact blob of another size
    /// is left alone (`Ok(false)`): a manifest naming a digest with the wrong size does not
    /// make an intact blob that other releases use look damaged.
    pub fn verify_blob(&self, d: &Sha256Digest, size: u64) -> Result<bool, StoreError> {
        let pin = self.pin()?;
        let _entry = self.lock_entry(&pin, d)?;
        match self.rehash(d)? {
            Some((true, n)) => Ok(n == size),
            Some((false, _)) => {
                self.move_to_quarantine(d)?;
                Ok(false)
            }
            None => Ok(false),
        }
    }

    /// Rehashes the blob `d` under its entry lock and moves it to quarantine when its bytes
    /// do not hash to its name; returns where it went (`None`: intact or absent).
    pub fn quarantine_if_damaged(&self, d: &Sha256Digest) -> Result<Option<PathBuf>, StoreError> {
        let pin = self.pin()?;
        let _entry = self.lock_entry(&pin, d)?;
        match self.rehash(d)? {
            Some((false, _)) => self.move_to_quarantine(d),
            _ => Ok(None),
        }
    }

    /// Whether the blob `d` hashes to its name, and its length; `None` when absent. A
    /// symlink or other non-file in its place is removed and reads as absent.
    fn rehash(&self, d: &Sha256Digest) -> Result<Option<(bool, u64)>, StoreError> {
        let path = self.blob_path(d);
        let file = match self.open_blob(d) {
            Ok(f) => f,
            Err(StoreError::Missing { .. }) => return Ok(None),
            Err(StoreError::NotRegular { path: bad, .. }) if bad == path => {
                remove_file(&path)?;
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let (actual, n) = crate::verify::sha256_reader(file).map_err(StoreError::io("cannot read", &path))?;
        Ok(Some((actual == *d, n)))
    }

    /// Moves the blob `d` to quarantine (`store-v1/quarantine/<hex>`, replacing an older
    /// copy there), out of every reader's way but kept for inspection; `khub gc` and
    /// `khub cache rm` delete it. Returns where it went, or `None` when there was no blob.
    /// Call it only for a blob that failed verification.
    pub fn quarantine(&self, d: &Sha256Digest) -> Result<Option<PathBuf>, StoreError> {
        let pin = self.pin()?;
        let _entry = self.lock_entry(&pin, d)?;
        self.move_to_quarantine(d)
    }

    /// Where the quarantined copy of `d` is, if there is one.
    pub fn quarantined_path(&self, d: &Sha256Digest) -> Option<PathBuf> {
        let p = self.quarantine_dir().join(d.to_string());
        lstat(&p).ok().flatten().map(|_| p)
    }

    /// The quarantined blobs: digest (as named) and size.
    pub fn quarantined(&self) -> Result<Vec<(String, u64)>, StoreError> {
        if !lstat(&self.quarantine_dir())?.is_some_and(|m| m.is_dir()) {
            return Ok(Vec::new());
        }
        let mut out: Vec<(String, u64)> = read_dir(&self.quarantine_dir())?
            .into_iter()
            .filter(|e| e.meta.is_file())
            .map(|e| (e.name, e.meta.len()))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Removes exactly the blobs `digests` (those present), under the exclusive `gc.lock`
    /// so that no writer or pinned reader is mid-way; returns how many and their bytes.
    pub fn remove_blobs(&self, digests: &BTreeSet<Sha256Digest>) -> Result<(usize, u64), StoreError> {
        let _lock = acquire(&self.gc_lock_path(), LockMode::Exclusive, self.options.lock_timeout)?;
        let (mut n, mut bytes) = (0, 0);
        for d in digests {
            let path = self.blob_path(d);
            if let Some(m) = lstat(&path)? {
                remove_file(&path)?;
                n += 1;
                bytes += if m.is_file() { m.len() } else { 0 };
                if let Some(shard) = path.parent() {
                    sync_dir(shard)?;
                }
            }
        }
        Ok((n, bytes))
    }

    /// Moves (the caller holds the entry lock) a damaged blob to quarantine.
    fn move_to_quarantine(&self, d: &Sha256Digest) -> Result<Option<PathBuf>, StoreError> {
        let path = self.blob_path(d);
        match lstat(&path)? {
            None => return Ok(None),
            Some(m) if !m.is_file() => {
                remove_file(&path)?;
                if let Some(shard) = path.parent() {
                    sync_dir(shard)?;
                }
                return Ok(None);
            }
            Some(_) => {}
        }
        let qdir = self.quarantine_dir();
        create_dir_once(&qdir)?;
        let target = qdir.join(d.to_string());
        std::fs::rename(&path, &target).map_err(StoreError::io("cannot move to quarantine", &path))?;
        if let Some(shard) = path.parent() {
            sync_dir(shard)?;
        }
        sync_dir(&qdir)?;
        Ok(Some(target))
    }

    /// Reads the whole blob `d` (at most `limit` bytes: manifests, signatures) and checks
    /// that it hashes to its name ([`StoreError::DigestMismatch`] otherwise).
    pub fn read_verified(&self, d: &Sha256Digest, limit: u64) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(d);
        let f = self.open_blob(d)?;
        let mut buf = Vec::new();
        f.take(limit + 1)
            .read_to_end(&mut buf)
            .map_err(StoreError::io("cannot read", &path))?;
        let actual = crate::verify::sha256(&buf);
        if actual != *d {
            return Err(StoreError::DigestMismatch {
                path: path.display().to_string(),
                expected: *d,
                actual,
            });
        }
        Ok(buf)
    }

    /// Rehashes the blob `d` without changing anything: `Ok(true)` when it hashes to its
    /// name or is absent (removed meanwhile by gc or a healer: nothing damaged is there),
    /// `Ok(false)` when its bytes (or a symlink in its place) are not what its name says.
    /// For `khub cache verify` without `--repair`.
    pub fn check_blob(&self, d: &Sha256Digest) -> Result<bool, StoreError> {
        let path = self.blob_path(d);
        let file = match self.open_blob(d) {
            Ok(f) => f,
            Err(StoreError::Missing { .. }) => return Ok(true),
            Err(StoreError::NotRegular { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        let (actual, _) = crate::verify::sha256_reader(file).map_err(StoreError::io("cannot read", &path))?;
        Ok(actual == *d)
    }

    /// Every blob in the store, with its size, sorted by digest. Symlinks and names that
    /// are not digests (in the right shard) are skipped.
    pub fn list(&self) -> Result<Vec<(Sha256Digest, u64)>, StoreError> {
        let mut out = Vec::new();
        for shard in self.shards()? {
            for entry in read_dir(&shard.path)? {
                let Some(d) = blob_name(&shard.name, &entry.name) else { continue };
                if entry.meta.is_file() {
                    out.push((d, entry.meta.len()));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes every blob whose digest is not in `keep`, abandoned temp files, entry lock
    /// files and empty shard directories; with `dry_run`, removes nothing and reports what
    /// it would remove.
    ///
    /// A real gc holds `gc.lock` exclusively, so no writer is active: every temp file is
    /// abandoned and every entry lock file free. A dry run does not wait for writers: it
    /// takes the exclusive lock if free, else shares it, and then counts only temp files
    /// older than [`STALE_TMP_AGE`]. Symlinks among blobs are never valid and are removed
    /// (counted in `removed`, with no bytes), and so are directories at blob names (nothing
    /// could be stored under that name again); foreign names are left alone. Directories
    /// are opened once, refusing symlinks, and emptied through that handle (`GcDir`).
    pub fn gc(&self, keep: &BTreeSet<Sha256Digest>, dry_run: bool) -> Result<GcReport, StoreError> {
        let gc_lock = self.gc_lock_path();
        let (_lock, writers_may_be_active) = if dry_run {
            match try_acquire(&gc_lock, LockMode::Exclusive)? {
                Some(lock) => (lock, false),
                None => (acquire(&gc_lock, LockMode::Shared, self.options.lock_timeout)?, true),
            }
        } else {
            (acquire(&gc_lock, LockMode::Exclusive, self.options.lock_timeout)?, false)
        };
        let mut report = GcReport::default();
        // Every directory is opened once, without following a symlink, and listed and
        // emptied through that handle: one swapped for a symlink while gc runs (by whoever
        // can write the cache) cannot make gc remove files anywhere else.
        if let Some(blobs) = GcDir::open(&self.blobs_dir())? {
            for entry in blobs.entries()? {
                if entry.meta.file_type().is_symlink() {
                    blobs.remove(&entry, dry_run)?;
                    report.removed += 1;
                    continue;
                }
                if !(entry.meta.is_dir() && is_shard_name(&entry.name)) {
                    continue;
                }
                let Some(shard) = blobs.open_child(&entry)? else { continue };
                let entries = shard.entries()?;
                let mut left = entries.len();
                for item in &entries {
                    let Some(d) = blob_name(&entry.name, &item.name) else { continue };
                    let kind = item.meta.file_type();
                    if kind.is_symlink() || kind.is_dir() || (kind.is_file() && !keep.contains(&d)) {
                        // A directory at a blob's name would block that blob for good
                        // (nothing can be renamed onto it): it goes, with what it holds.
                        shard.remove(item, dry_run)?;
                        report.removed += 1;
                        report.removed_bytes += if kind.is_file() { item.meta.len() } else { 0 };
                        left -= 1;
                    } else if kind.is_file() {
                        report.kept += 1;
                    }
                }
                if left == 0 && !dry_run {
                    blobs.remove_empty_dir(&entry)?;
                }
            }
        }

        let now = SystemTime::now();
        if let Some(tmp) = GcDir::open(&self.tmp_dir())? {
            for entry in tmp.entries()? {
                if entry.meta.is_dir() {
                    continue;
                }
                let age = entry
                    .meta
                    .modified()
                    .ok()
                    .and_then(|t| now.duration_since(t).ok())
                    .unwrap_or_default();
                if !writers_may_be_active || age > STALE_TMP_AGE {
                    tmp.remove(&entry, dry_run)?;
                    report.tmp_removed += 1;
                }
            }
        }

        // A symlink or a file in the place of `quarantine/` is removed itself, never what
        // it points to; a directory at a quarantine name would block quarantining that
        // digest, and goes too.
        let qdir = self.quarantine_dir();
        match lstat(&qdir)? {
            Some(m) if m.is_dir() => {
                if let Some(q) = GcDir::open(&qdir)? {
                    for entry in q.entries()? {
                        q.remove(&entry, dry_run)?;
                        report.quarantine_removed += 1;
                    }
                }
            }
            Some(_) if !dry_run => remove_file(&qdir)?,
            _ => {}
        }

        // Safe only because nobody holds or waits for an entry lock without holding
        // `gc.lock` shared, which this exclusive hold rules out.
        if !dry_run && let Some(locks) = GcDir::open(&self.locks_dir())? {
            for entry in locks.entries()? {
                if !entry.meta.is_dir() && entry.name.ends_with(".lock") {
                    locks.remove(&entry, false)?;
                }
            }
        }
        Ok(report)
    }

    /// The shard directories under `blobs/`.
    fn shards(&self) -> Result<Vec<DirItem>, StoreError> {
        Ok(read_dir(&self.blobs_dir())?
            .into_iter()
            .filter(|e| e.meta.is_dir() && is_shard_name(&e.name))
            .collect())
    }

    /// Removes `tmp/<hex>.*` files: called with the entry lock held, when they can only be
    /// left over from a writer that died.
    fn remove_orphan_temps(&self, d: &Sha256Digest) -> Result<(), StoreError> {
        let prefix = format!("{d}.");
        for entry in read_dir(&self.tmp_dir())? {
            if entry.name.starts_with(&prefix) && !entry.meta.is_dir() {
                remove_file(&entry.path)?;
            }
        }
        Ok(())
    }
}

/// Reads files from the store, for the verifier and [`crate::load::load_from`]: the store
/// is a cache, so what it returns is checked like any other source.
#[derive(Debug, Clone, Copy)]
pub struct StoreSource<'a> {
    /// The store.
    pub store: &'a Store,
}

impl FileSource for StoreSource<'_> {
    fn open(&self, variant: &Variant, entry: &FileEntry) -> Result<File, VerifyError> {
        self.store.open_blob(&entry.sha256).map_err(|e| match e {
            StoreError::NotRegular { path, what } => VerifyError::NotRegular {
                root: self.store.root().to_path_buf(),
                path: path.strip_prefix(self.store.root()).unwrap_or(&path).display().to_string(),
                what,
            },
            other => VerifyError::Unavailable {
                what: "the store has no readable copy of",
                variant: variant.id.clone(),
                path: entry.path.clone(),
                source: Box::new(other),
            },
        })
    }
}

/// A store directory as gc sees it: opened once, refusing a symlink, and then listed,
/// inspected and emptied through that open handle (`/proc/self/fd/N/…` on Linux), so a
/// path component swapped for a symlink after the open is never followed. Where there is
/// no `/proc`, the path itself is used, checked to be a real directory when opened.
struct GcDir {
    /// The directory's path, for messages.
    path: PathBuf,
    /// Where its entries are reached: `/proc/self/fd/N`, or `path`.
    via: PathBuf,
    /// Keeps `via` valid while this lives.
    #[cfg(target_os = "linux")]
    _handle: Option<File>,
}

impl GcDir {
    /// Opens the directory at `path`; `None` when it is absent; `NotRegular` when a symlink
    /// or anything but a directory is there.
    fn open(path: &Path) -> Result<Option<GcDir>, StoreError> {
        Self::open_at(path, path)
    }

    /// Opens `entry`, a subdirectory listed by [`GcDir::entries`], through this handle.
    fn open_child(&self, entry: &DirItem) -> Result<Option<GcDir>, StoreError> {
        Self::open_at(&entry.path, &self.via.join(&entry.name))
    }

    fn open_at(shown: &Path, at: &Path) -> Result<Option<GcDir>, StoreError> {
        let not_dir = |meta: &Metadata| StoreError::NotRegular {
            path: shown.to_path_buf(),
            what: if meta.file_type().is_symlink() {
                "a symlink"
            } else {
                "not a directory"
            },
        };
        match lstat(at)? {
            None => return Ok(None),
            Some(m) if !m.is_dir() => return Err(not_dir(&m)),
            Some(_) => {}
        }
        #[cfg(target_os = "linux")]
        {
            let handle = match open_nofollow(OpenOptions::new().read(true), at, libc::O_DIRECTORY) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) if is_symlink_refusal(&e) || e.raw_os_error() == Some(libc::ENOTDIR) => {
                    return Err(StoreError::NotRegular {
                        path: shown.to_path_buf(),
                        what: "not a directory",
                    });
                }
                Err(source) => {
                    return Err(StoreError::Io {
                        what: "cannot open",
                        path: shown.to_path_buf(),
                        source,
                    });
                }
            };
            use std::os::fd::AsRawFd;
            let via = PathBuf::from(format!("/proc/self/fd/{}", handle.as_raw_fd()));
            if via.is_dir() {
                return Ok(Some(GcDir {
                    path: shown.to_path_buf(),
                    via,
                    _handle: Some(handle),
                }));
            }
        }
        Ok(Some(GcDir {
            path: shown.to_path_buf(),
            via: at.to_path_buf(),
            #[cfg(target_os = "linux")]
            _handle: None,
        }))
    }

    /// The entries, `lstat`ed through the handle; their `path` is for messages.
    fn entries(&self) -> Result<Vec<DirItem>, StoreError> {
        let mut items = read_dir(&self.via).map_err(|e| self.named(e))?;
        for item in &mut items {
            item.path = self.path.join(&item.name);
        }
        Ok(items)
    }

    /// Removes `entry` (a file, a symlink itself, or a directory with what it holds)
    /// through the handle; with `dry_run`, nothing.
    fn remove(&self, entry: &DirItem, dry_run: bool) -> Result<(), StoreError> {
        if dry_run {
            return Ok(());
        }
        let at = self.via.join(&entry.name);
        if entry.meta.is_dir() {
            // std's `remove_dir_all` does not follow symlinks inside the tree.
            removed(std::fs::remove_dir_all(&at), entry)
        } else {
            remove_file(&at).map_err(|e| self.named(e))
        }
    }

    /// Removes the subdirectory `entry` if it is (still) empty.
    fn remove_empty_dir(&self, entry: &DirItem) -> Result<(), StoreError> {
        removed(std::fs::remove_dir(self.via.join(&entry.name)), entry)
    }

    /// An error about a path under `via`, renamed to the same path under `path`.
    fn named(&self, e: StoreError) -> StoreError {
        match e {
            StoreError::Io { what, path, source } => StoreError::Io {
                what,
                path: path.strip_prefix(&self.via).map_or(path.clone(), |rest| self.path.join(rest)),
                source,
            },
            other => other,
        }
    }
}

/// The outcome of removing `entry`: gone already is fine; any other error names it.
fn removed(result: io::Result<()>, entry: &DirItem) -> Result<(), StoreError> {
    match result {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(StoreError::Io {
            what: "cannot remove",
            path: entry.path.clone(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// One entry of a directory, `lstat`ed.
struct DirItem {
    name: String,
    path: PathBuf,
    meta: Metadata,
}

/// The entries of `dir` (an absent directory has none), `lstat`ed, names that are not
/// UTF-8 skipped: the store never writes such names.
fn read_dir(dir: &Path) -> Result<Vec<DirItem>, StoreError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(StoreError::Io {
                what: "cannot list",
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(StoreError::io("cannot list", dir))?;
        let Ok(name) = entry.file_name().into_string() else { continue };
        let path = entry.path();
        match std::fs::symlink_metadata(&path) {
            Ok(meta) => out.push(DirItem { name, path, meta }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(StoreError::Io {
                    what: "cannot inspect",
                    path,
                    source,
                });
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The shard directory name of a digest's hex form: its first two digits.
fn shard_of(hex: &str) -> &str {
    hex.get(..2).unwrap_or("00")
}

/// Whether `name` can be a shard directory: two lowercase hex digits.
fn is_shard_name(name: &str) -> bool {
    name.len() == 2 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The digest a file named `name` in shard `shard` stands for, if it is a blob name.
fn blob_name(shard: &str, name: &str) -> Option<Sha256Digest> {
    let d: Sha256Digest = name.parse().ok()?;
    (shard_of(name) == shard).then_some(d)
}

/// `lstat`, with "absent" as `None`.
fn lstat(path: &Path) -> Result<Option<Metadata>, StoreError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Io {
            what: "cannot inspect",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Fails unless `path` is a real directory (not a symlink to one).
/// Creates the directory `path` unless it exists, then checks it is a real directory (not
/// a symlink).
fn create_dir_once(path: &Path) -> Result<(), StoreError> {
    match std::fs::create_dir(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(StoreError::Io {
                what: "cannot create",
                path: path.to_path_buf(),
                source,
            });
        }
    }
    expect_dir(path)
}

fn expect_dir(path: &Path) -> Result<(), StoreError> {
    match lstat(path)? {
        Some(m) if m.is_dir() => Ok(()),
        Some(m) => Err(StoreError::NotRegular {
            path: path.to_path_buf(),
            what: if m.file_type().is_symlink() {
                "a symlink"
            } else {
                "not a directory"
            },
        }),
        None => Err(StoreError::Io {
            what: "cannot find",
            path: path.to_path_buf(),
            source: io::ErrorKind::NotFound.into(),
        }),
    }
}

/// Opens `path` with `opts`, refusing to follow a symlink at its last component.
/// `O_NONBLOCK` where there is one: opening a FIFO then returns at once instead of waiting
/// for a writer.
#[cfg(unix)]
const NONBLOCK: i32 = libc::O_NONBLOCK;
#[cfg(not(unix))]
const NONBLOCK: i32 = 0;

fn open_nofollow(opts: &mut OpenOptions, path: &Path, extra_flags: i32) -> io::Result<File> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | extra_flags);
    }
    #[cfg(not(unix))]
    let _ = extra_flags;
    #[cfg(not(unix))]
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(io::Error::other("refusing to follow a symlink"));
    }
    opts.open(path)
}

/// Whether an `open` error is `O_NOFOLLOW` meeting a symlink.
fn is_symlink_refusal(e: &io::Error) -> bool {
    #[cfg(unix)]
    {
        e.raw_os_error() == Some(libc::ELOOP)
    }
    #[cfg(not(unix))]
    {
        e.kind() == io::ErrorKind::Other
    }
}

/// Takes a lock on `path` (created if needed), polling while another process holds it.
fn acquire(path: &Path, mode: LockMode, timeout: Duration) -> Result<StoreLock, StoreError> {
    let file = open_lock_file(path)?;
    let start = Instant::now();
    let mut pause = POLL_FIRST;
    loop {
        if try_lock(&file, mode).map_err(StoreError::io("cannot lock", path))? {
            return Ok(StoreLock {
                file,
                path: path.to_path_buf(),
            });
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(StoreError::LockTimeout {
                path: path.to_path_buf(),
                waited,
            });
        }
        std::thread::sleep(pause.min(timeout - waited));
        pause = (pause * 2).min(POLL_MAX);
    }
}

/// Takes a lock on `path` if nobody holds a conflicting one; `None` when busy.
fn try_acquire(path: &Path, mode: LockMode) -> Result<Option<StoreLock>, StoreError> {
    let file = open_lock_file(path)?;
    Ok(try_lock(&file, mode)
        .map_err(StoreError::io("cannot lock", path))?
        .then(|| StoreLock {
            file,
            path: path.to_path_buf(),
        }))
}

/// One lock attempt: `Ok(false)` when another holder conflicts.
fn try_lock(file: &File, mode: LockMode) -> io::Result<bool> {
    let r = match mode {
        LockMode::Shared => file.try_lock_shared(),
        LockMode::Exclusive => file.try_lock(),
    };
    match r {
        Ok(()) => Ok(true),
        Err(TryLockError::WouldBlock) => Ok(false),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

fn open_lock_file(path: &Path) -> Result<File, StoreError> {
    open_nofollow(OpenOptions::new().read(true).write(true).create(true).truncate(false), path, 0).map_err(|e| {
        if is_symlink_refusal(&e) {
            StoreError::NotRegular {
                path: path.to_path_buf(),
                what: "a symlink",
            }
        } else {
            StoreError::Io {
                what: "cannot open lock file",
                path: path.to_path_buf(),
                source: e,
            }
        }
    })
}

/// Makes a directory entry durable (Unix; a no-op elsewhere).
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io("cannot sync directory", dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// How many bytes a temp file takes in before [`EarlyWriteback`] asks the kernel to start
/// writing them out.
const WRITEBACK_CHUNK: u64 = 4 * 1024 * 1024;

/// A temp file that starts the writeback of each [`WRITEBACK_CHUNK`] it receives while
/// the download goes on (`sync_file_range(SYNC_FILE_RANGE_WRITE)` on Linux: it queues the
/// I/O and does not wait). The `fsync` before the rename is unchanged and still what makes
/// the blob durable; it just finds most pages already on their way to the disk, so the
/// disk works while the network does rather than after it. Elsewhere it only writes.
struct EarlyWriteback<'a> {
    file: &'a mut File,
    /// Bytes written so far.
    written: u64,
    /// Bytes whose writeback was started.
    started: u64,
}

impl<'a> EarlyWriteback<'a> {
    fn new(file: &'a mut File) -> Self {
        EarlyWriteback {
            file,
            written: 0,
            started: 0,
        }
    }
}

impl Write for EarlyWriteback<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.started >= WRITEBACK_CHUNK {
            #[cfg(target_os = "linux")]
            {
                use std::os::fd::AsRawFd;
                let (offset, len) = (self.started, self.written - self.started);
                if let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) {
                    // SAFETY: a plain syscall on a descriptor we own, over a range we wrote;
                    // it only schedules writeback and reads or writes no memory of ours. A
                    // failure is ignored: the fsync before the rename still syncs it all.
                    let _ = unsafe { libc::sync_file_range(self.file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
                }
            }
            self.started = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Removes a file (or a symlink, never its target); an absent one is fine.
fn remove_file(path: &Path) -> Result<(), StoreError> {
    // Windows refuses to delete read-only files; Unix only needs the directory writable.
    #[cfg(not(unix))]
    if let Ok(m) = std::fs::symlink_metadata(path) {
        let mut p = m.permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        p.set_readonly(false);
        let _ = std::fs::set_permissions(path, p);
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoreError::Io {
            what: "cannot remove",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Makes an open file read-only: mode 0444 on Unix, the read-only attribute elsewhere.
fn make_read_only(file: &File) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o444))
    }
    #[cfg(not(unix))]
    {
        let mut p = file.metadata()?.permissions();
        p.set_readonly(true);
        file.set_permissions(p)
    }
}

/// An error and its sources, `: `-separated.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests write scratch files directly
mod tests;
