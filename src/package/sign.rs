//! The author's signing workflow: make a key pair (`khub keygen`) and sign a release
//! (`khub sign`). The minisign primitives live in [`crate::verify::sign`]; this module decides what
//! a release signature claims (repository, version, time, expiry) and writes the files.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::ids::RepoId;
use crate::release::{Release, ReleaseError};
use crate::verify::sign::{self, PublicKey, ReleaseClaim, SignError};

/// The longest signature lifetime `--expires` accepts: a hundred years.
pub const MAX_EXPIRY_DAYS: u64 = 36_500;

/// Signing a release or making a key pair failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SigningError {
    /// A key file exists already.
    #[error("{} exists; khub keygen never overwrites a key", path.display())]
    KeyExists {
        /// The file.
        path: PathBuf,
    },
    /// An expiry that is neither `never` nor a number of days.
    #[error("--expires `{0}`: write a number of days such as 90d, or never")]
    BadExpiry(String),
    /// The release directory is not a valid release.
    #[error(transparent)]
    Release(#[from] ReleaseError),
    /// Making, reading or using a key failed.
    #[error(transparent)]
    Sign(#[from] SignError),
    /// Reading or writing a file failed.
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// How long a release signature stays valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// It never expires.
    Never,
    /// It expires this many days after signing (1 to [`MAX_EXPIRY_DAYS`]).
    Days(u64),
}

impl FromStr for Expiry {
    type Err = SigningError;

    /// `never`, or a number of days followed by `d` (`90d`).
    fn from_str(s: &str) -> Result<Expiry, SigningError> {
        if s == "never" {
            return Ok(Expiry::Never);
        }
        s.strip_suffix('d')
            .and_then(|n| n.parse().ok())
            .filter(|n| (1..=MAX_EXPIRY_DAYS).contains(n))
            .map(Expiry::Days)
            .ok_or_else(|| SigningError::BadExpiry(s.to_owned()))
    }
}

/// Key pair files written by [`keygen_files`].
#[derive(Debug, Clone)]
pub struct KeyPair {
    /// The public key, as read back from its file.
    pub public: PublicKey,
    /// Whether the secret key is encrypted with a password.
    pub encrypted: bool,
}

/// Makes a key pair and writes it: the public key to `public`, the secret key to `secret`
/// (created exclusively, mode 0600 on Unix). Neither file may exist already.
pub fn keygen_files(public: &Path, secret: &Path, password: Option<&str>) -> Result<KeyPair, SigningError> {
    for p in [public, secret] {
        if p.exists() {
            return Err(SigningError::KeyExists { path: p.to_owned() });
        }
    }
    let (pk, sk) = sign::keygen(password)?;
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| SigningError::Io { what, path, source }
    };
    // The secret key first, created exclusively: a failure there (a missing directory,
    // `--secret` naming the public key's path) must not leave a public key whose secret
    // does not exist, which every retry would then refuse to replace.
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    use std::io::Write as _;
    opts.open(secret)
        .and_then(|mut f| {
            f.write_all(sk.as_bytes())?;
            f.sync_all()
        })
        .map_err(io("write", secret))?;
    // Created exclusively too: `--public` naming the secret's path fails here, and the
    // secret just written is removed rather than left behind or overwritten.
    if let Err(source) = crate::fsx::write_durable_new(public, pk.as_bytes()) {
        let _ = std::fs::remove_file(secret);
        return Err(SigningError::Io {
            what: "write",
            path: public.to_owned(),
            source,
        });
    }
    let public = sign::read_public_key(public)?;
    Ok(KeyPair {
        public,
        encrypted: password.is_some(),
    })
}

/// A release signed by [`sign_release`].
#[derive(Debug, Clone)]
pub struct SignedRelease {
    /// The signature file written (`<release>/khub.toml.minisig`).
    pub signature_path: PathBuf,
    /// The id of the key that signed.
    pub key_id: String,
    /// What the signature claims.
    pub claim: ReleaseClaim,
}

/// Signs the manifest of the release at `release` for `repo` with the secret key at `key`,
/// after checking the release tree, and writes `khub.toml.minisig` next to it.
pub fn sign_release(
    release: &Path,
    key: &Path,
    repo: RepoId,
    expires: Expiry,
    password: Option<&str>,
) -> Result<SignedRelease, SigningError> {
    let r = Release::open(release)?;
    r.check_tree()?;
    // The bytes signed are the bytes checked (read once, by `Release::open`): reading the
    // file again would sign whatever it holds by then under the checked version's claim.
    let bytes = r.manifest_bytes().to_vec();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let expires = match expires {
        Expiry::Never => None,
        Expiry::Days(days) => Some(now + days * 86_400),
    };
    let sk = sign::read_secret_key(key, password)?;
    let claim = ReleaseClaim {
        repo,
        version: r.manifest().kernel.version.clone(),
        timestamp: now,
        expires,
    };
    let sig = sign::sign(&sk, &bytes, &claim)?;
    let out = r.root().join(sign::SIGNATURE_FILE);
    crate::fsx::write_atomic(&out, sig.as_bytes()).map_err(|e| SigningError::Io {
        what: "write",
        path: out.clone(),
        source: e.source,
    })?;
    Ok(SignedRelease {
        signature_path: out,
        key_id: sk.key_id(),
        claim,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_forms() {
        assert_eq!("never".parse::<Expiry>().unwrap(), Expiry::Never);
        assert_eq!("90d".parse::<Expiry>().unwrap(), Expiry::Days(90));
        assert_eq!("36500d".parse::<Expiry>().unwrap(), Expiry::Days(36_500));
        for bad in ["0d", "36501d", "90", "d", "-1d", "1w", ""] {
            let e = bad.parse::<Expiry>().unwrap_err();
            assert!(e.to_string().contains("write a number of days"), "{bad}: {e}");
        }
    }

    #[test]
    fn keygen_refuses_to_overwrite() {
        let d = tempfile::tempdir().unwrap();
        let (p, s) = (d.path().join("k.pub"), d.path().join("k.key"));
        let kp = keygen_files(&p, &s, None).unwrap();
        assert!(!kp.encrypted);
        let e = keygen_files(&p, &d.path().join("other.key"), None).unwrap_err();
        assert!(matches!(e, SigningError::KeyExists { .. }), "{e}");
        assert!(!d.path().join("other.key").exists());
    }

    /// A key pair whose files cannot both be written leaves neither: the public key used
    /// to be written first, and a failed secret left it behind for every retry to refuse.
    #[test]
    fn a_failed_keygen_leaves_no_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k.pub");
        // The secret's directory does not exist.
        assert!(keygen_files(&p, &d.path().join("missing/k.key"), None).is_err());
        assert!(!p.exists(), "an orphan public key was left");
        // Both paths the same: refused, nothing left.
        let same = d.path().join("same");
        assert!(keygen_files(&same, &same, None).is_err());
        assert!(!same.exists());
        keygen_files(&p, &d.path().join("k.key"), None).unwrap();
    }
}
