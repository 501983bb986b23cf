//! Rollback protection: the highest version of each repository this host has accepted.
//!
//! ```text
//! <state dir>/rollback.toml   the highest version seen per repository
//! <state dir>/rollback.lock   exclusive while one process updates it
//! ```
//!
//! The state directory (`KHUB_STATE_DIR`, else `$XDG_STATE_HOME/khub`, else
//! `$HOME/.local/state/khub`) is outside the cache on purpose: purging the cache must not
//! reset rollback protection. Updates take the lock, re-read the file, keep the maximum,
//! and replace the file atomically (temp file, fsync, rename, fsync of the directory), so
//! concurrent processes never lose a higher version and readers never see a partial file.
//! Readers take no lock.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use super::trust::{TrustError, TrustPolicy};
use crate::env::{self, Environment};
use crate::ids::RepoId;

/// The rollback state file inside the state directory.
pub const ROLLBACK_FILE: &str = "rollback.toml";
/// The lock file that serializes updates of [`ROLLBACK_FILE`].
pub const ROLLBACK_LOCK: &str = "rollback.lock";
/// The format version of [`ROLLBACK_FILE`].
const ROLLBACK_VERSION: u32 = 1;

/// The highest version of each repository this host has accepted, kept outside the
/// purgeable cache (see the [module docs](self) for the layout and the locking).
#[derive(Debug)]
pub struct RollbackState {
    dir: PathBuf,
    /// The state as last read or written by this value.
    highest: Mutex<BTreeMap<RepoId, semver::Version>>,
}

/// The file format, as written.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateRepr {
    version: u32,
    #[serde(default)]
    highest: BTreeMap<String, String>,
}

impl RollbackState {
    /// Opens the state in `dir` (the file `<dir>/rollback.toml`). Neither the directory nor
    /// the file need exist: both are created on the first [`RollbackState::record`].
    pub fn open(dir: &Path) -> Result<Self, TrustError> {
        let highest = read_state(&dir.join(ROLLBACK_FILE))?;
        Ok(RollbackState {
            dir: dir.to_path_buf(),
            highest: Mutex::new(highest),
        })
    }

    /// The state directory the environment names: `KHUB_STATE_DIR`, else
    /// `$XDG_STATE_HOME/khub` (when absolute), else `$HOME/.local/state/khub`.
    pub fn default_dir(env: &Environment) -> Result<PathBuf, TrustError> {
        if let Some(d) = env.get(env::KHUB_STATE_DIR) {
            return Ok(PathBuf::from(d));
        }
        if let Some(d) = env.get(env::XDG_STATE_HOME).map(PathBuf::from).filter(|p| p.is_absolute()) {
            return Ok(d.join("khub"));
        }
        match env.get(env::HOME) {
            Some(h) => Ok(Path::new(h).join(".local").join("state").join("khub")),
            None => Err(TrustError::NoStateDir),
        }
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The highest version of `repo` seen, if any.
    pub fn highest(&self, repo: &RepoId) -> Option<semver::Version> {
        self.highest.lock().unwrap_or_else(PoisonError::into_inner).get(repo).cloned()
    }

    /// Refuses `chosen` when the requirement also admits the highest version seen before and
    /// `chosen` is lower — unless the policy allows rollback for the repo.
    ///
    /// A requirement that excludes the highest version seen (say `^1` after `2.0.0` was
    /// loaded) is an explicit choice of the host and is not a rollback.
    pub fn check(
        &self,
        policy: &TrustPolicy,
        repo: &RepoId,
        requirement: &semver::VersionReq,
        chosen: &semver::Version,
    ) -> Result<(), TrustError> {
        policy.validate()?;
        match self.highest(repo) {
            Some(highest) if chosen < &highest && requirement.matches(&highest) && !policy.allows_rollback(repo) => {
                Err(TrustError::Rollback {
                    repo: repo.clone(),
                    chosen: chosen.clone(),
                    highest: Box::new(highest),
                })
            }
            _ => Ok(()),
        }
    }

    /// Records that `version` of `repo` was accepted, keeping the maximum. Call it only
    /// after every check on the release passed.
    ///
    /// Takes an exclusive lock on `<dir>/rollback.lock` (blocking: it is held for a read and
    /// a small write), re-reads the file, and replaces it atomically only when `version` is
    /// higher than what it holds.
    pub fn record(&self, repo: &RepoId, version: &semver::Version) -> Result<(), TrustError> {
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| TrustError::StateIo { what, path, source }
        };
        fs::create_dir_all(&self.dir).map_err(io("cannot create", &self.dir))?;
        let lock_path = self.dir.join(ROLLBACK_LOCK);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io("cannot open", &lock_path))?;
        lock.lock().map_err(io("cannot lock", &lock_path))?;
        // Under the lock: another process may have recorded since this value was opened.
        let path = self.dir.join(ROLLBACK_FILE);
        let mut highest = read_state(&path)?;
        let higher = highest.get(repo).is_none_or(|h| version > h);
        if higher {
            highest.insert(repo.clone(), version.clone());
            write_state(&path, &highest)?;
        }
        *self.highest.lock().unwrap_or_else(PoisonError::into_inner) = highest;
        // Closing the descriptor releases the lock too; unlocking first just says so.
        lock.unlock().map_err(io("cannot unlock", &lock_path))?;
        Ok(())
    }
}

fn read_state(path: &Path) -> Result<BTreeMap<RepoId, semver::Version>, TrustError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(source) => {
            return Err(TrustError::StateIo {
                what: "cannot read",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let invalid = |message: String| TrustError::StateInvalid {
        path: path.to_path_buf(),
        message,
    };
    let repr: StateRepr = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    if repr.version != ROLLBACK_VERSION {
        return Err(invalid(format!(
            "format version {}, this khub reads {ROLLBACK_VERSION} (written by a newer khub?)",
            repr.version
        )));
    }
    repr.highest
        .into_iter()
        .map(|(r, v)| {
            let repo: RepoId = r.parse().map_err(|e: crate::ids::RepoIdError| invalid(e.to_string()))?;
            let version = semver::Version::parse(&v).map_err(|e| invalid(format!("{repo}: version {v:?}: {e}")))?;
            Ok((repo, version))
        })
        .collect()
}

fn write_state(path: &Path, highest: &BTreeMap<RepoId, semver::Version>) -> Result<(), TrustError> {
    let repr = StateRepr {
        version: ROLLBACK_VERSION,
        highest: highest.iter().map(|(r, v)| (r.to_string(), v.to_string())).collect(),
    };
    let body = toml::to_string(&repr).map_err(|e| TrustError::StateInvalid {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let text = format!(
        "# khub rollback state: the highest version of each repository this host has loaded.\n\
         # Deleting an entry lets the registry serve an older release of that repository.\n{body}"
    );
    crate::fsx::write_atomic(path, text.as_bytes()).map_err(|e| TrustError::StateIo {
        what: e.what,
        path: path.to_path_buf(),
        source: e.source,
    })
}
