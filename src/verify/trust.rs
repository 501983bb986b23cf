//! The host's trust policy (which releases to accept, signed by whom) and the rollback
//! state (the highest version seen per repository).
//!
//! # Where trust comes from
//!
//! Only from host configuration: the API ([`TrustPolicy::trust_key`] and friends), a TOML
//! file ([`TrustPolicy::read`]), found through the environment
//! ([`TrustPolicy::from_env`]). Nothing fetched from a registry can add a key, widen a
//! pattern or turn a check off. The file:
//!
//! ```toml
//! require-signature = true            # unsigned releases are refused unless allow-unsigned matches
//! allow-unsigned = ["dev/*"]          # repo patterns: "org/name", "org/*", "*"
//! allow-rollback = ["acme/legacy"]    # repos that may load a lower version than seen before
//!
//! [[publisher]]
//! repos = ["acme/*", "kernels-community/activation"]
//! keys = ["RWQ…base64 public key", "/etc/khub/keys/acme.pub"]   # inline, or a .pub file
//! ```
//!
//! A relative key path is taken relative to the directory of the policy file.
//!
//! # What is checked, and when
//!
//! [`TrustPolicy::check`] runs on the raw bytes of a release manifest and its signature,
//! before the manifest is parsed, so a hostile manifest never reaches the parser unless
//! the policy lets it. A signed release passes when a key trusted for its repository made
//! the signature, the signature covers those exact bytes, and the claim in the trusted
//! comment names this repository and version (no replay of another release's signature)
//! and has not expired (no indefinite freeze).
//!
//! [`RollbackState`] then keeps a registry from serving an older release than one this
//! host has already seen. Record a version only after every check passed: verifiers that
//! record state for releases they later reject can be rolled back by that very state.
//!
//! # Rollback state on disk
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
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::env::{self, Environment};
use crate::ids::RepoId;
use crate::verify::sign::{self, PublicKey, ReleaseClaim, SignError};

/// The name of the trust policy file inside khub's config directory.
pub const POLICY_FILE: &str = "trust.toml";
/// The rollback state file inside the state directory.
pub const ROLLBACK_FILE: &str = "rollback.toml";
/// The lock file that serializes updates of [`ROLLBACK_FILE`].
pub const ROLLBACK_LOCK: &str = "rollback.lock";
/// The format version of [`ROLLBACK_FILE`].
const ROLLBACK_VERSION: u32 = 1;

/// How the policy's messages point at where it is configured.
const POLICY_HINT: &str = "the trust policy (KHUB_TRUST_POLICY, or $XDG_CONFIG_HOME/khub/trust.toml)";

/// A trust decision refused a release, or the policy or state could not be read.
///
/// Every message says what was refused and what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// The policy file could not be read.
    #[error("cannot read the trust policy {}: {source}; fix the file or point KHUB_TRUST_POLICY elsewhere", path.display())]
    ReadPolicy {
        /// The policy file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// `KHUB_TRUST_POLICY` names a file that does not exist.
    #[error(
        "KHUB_TRUST_POLICY is {}, which does not exist: create it, or unset KHUB_TRUST_POLICY to use ~/.config/khub/trust.toml or the permissive default",
        path.display()
    )]
    MissingPolicy {
        /// The path it names.
        path: PathBuf,
    },
    /// The policy is not valid: bad TOML, an unknown field, a bad repo pattern.
    #[error("the trust policy{} is not valid: `{field}`: {message}", in_file(path.as_deref()))]
    InvalidPolicy {
        /// The policy file, when it came from one.
        path: Option<PathBuf>,
        /// The field at fault (`publisher[0].repos[1]`), or the whole file.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A key named in the policy could not be read.
    #[error("the trust policy{} lists a key it cannot use at `{field}`: {source}", in_file(path.as_deref()))]
    InvalidKey {
        /// The policy file, when it came from one.
        path: Option<PathBuf>,
        /// The field at fault (`publisher[0].keys[1]`).
        field: String,
        /// Why the key cannot be used.
        #[source]
        source: Box<SignError>,
    },
    /// The release is signed with a key the policy does not trust for this repository.
    #[error(
        "refusing {repo}: signed with key {key_id}, which {POLICY_HINT} does not trust for {repo}; trusted: {}. If you trust that key, add it to the [[publisher]] entry for {repo}",
        trusted.join(", ")
    )]
    UntrustedKey {
        /// The repository.
        repo: RepoId,
        /// The key id in the signature.
        key_id: String,
        /// The ids of the keys trusted for the repository.
        trusted: Vec<String>,
    },
    /// The signature does not verify (or is malformed).
    #[error("refusing {repo} {version}: {source}")]
    BadSignature {
        /// The repository.
        repo: RepoId,
        /// The release.
        version: semver::Version,
        /// Why it does not verify.
        #[source]
        source: Box<SignError>,
    },
    /// The signature verifies, but its trusted comment is not a khub release claim.
    #[error("refusing {repo} {version}: {source}")]
    MalformedClaim {
        /// The repository.
        repo: RepoId,
        /// The release.
        version: semver::Version,
        /// What is wrong with the claim.
        #[source]
        source: Box<SignError>,
    },
    /// A valid signature of another release was presented for this one (a replay).
    #[error(
        "refusing {repo} {version}: its signature is for {} {}, not for this release; the registry is serving another release's signature (replay). Ask the publisher to sign {repo} {version} with `khub sign`",
        claim.repo,
        claim.version
    )]
    WrongRelease {
        /// The repository asked for.
        repo: RepoId,
        /// The release asked for.
        version: semver::Version,
        /// What the signature claims.
        claim: Box<ReleaseClaim>,
    },
    /// The signature has expired.
    #[error(
        "refusing {repo} {version}: its signature expired at {expired_at} (unix time; now {now}); the registry may be serving a stale release (freeze). Ask the publisher to re-sign it with a later expiry (`khub sign --expires …`)"
    )]
    Expired {
        /// The repository.
        repo: RepoId,
        /// The release.
        version: semver::Version,
        /// When the signature expired, in seconds since the Unix epoch.
        expired_at: u64,
        /// The time of the check.
        now: u64,
    },
    /// The release is signed, signatures are required, and no key is trusted for the repo.
    #[error(
        "refusing {repo}: signatures are required, and {POLICY_HINT} trusts no key for {repo}; add a [[publisher]] for it with the publisher's public key (repos = [\"{repo}\"], keys = [\"RW…\"]), or list it in allow-unsigned"
    )]
    NoTrustedKey {
        /// The repository.
        repo: RepoId,
    },
    /// The release is not signed, and the policy requires a signature.
    #[error(
        "refusing {repo} {version}: the release is not signed, and {POLICY_HINT} requires a signature for {repo}{}; ask the publisher to sign it (`khub sign`), or allow it with allow-unsigned = [\"{repo}\"]",
        if *keys_configured { " (keys are configured for it)" } else { "" }
    )]
    Unsigned {
        /// The repository.
        repo: RepoId,
        /// The release.
        version: semver::Version,
        /// Whether keys are trusted for the repository (which makes a signature required
        /// even when `require-signature` is off).
        keys_configured: bool,
    },
    /// Loading `chosen` would go below the highest version seen before.
    #[error(
        "refusing {repo} {chosen}: this host has already loaded {highest}, which the version requirement also admits, so the registry may be hiding it (rollback). If the downgrade is intended, pass --allow-rollback or add \"{repo}\" to allow-rollback in the trust policy"
    )]
    Rollback {
        /// The repository.
        repo: RepoId,
        /// The version the registry offered.
        chosen: semver::Version,
        /// The highest version seen before.
        highest: Box<semver::Version>,
    },
    /// No state directory could be derived from the environment.
    #[error(
        "cannot choose a directory for rollback state: none of {}, {} (absolute) or {} is set; set {} to a writable directory outside the cache",
        env::KHUB_STATE_DIR,
        env::XDG_STATE_HOME,
        env::HOME,
        env::KHUB_STATE_DIR
    )]
    NoStateDir,
    /// The rollback state could not be read or written.
    #[error("{what} {}: {source}; check that the state directory is writable, or point KHUB_STATE_DIR at one that is", path.display())]
    StateIo {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The rollback state file is not valid.
    #[error(
        "the rollback state {} is not valid: {message}; fix it by hand, or delete it (which forgets every version seen, and with it rollback protection)",
        path.display()
    )]
    StateInvalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

fn in_file(path: Option<&Path>) -> String {
    path.map(|p| format!(" {}", p.display())).unwrap_or_default()
}

/// A pattern of repositories: `org/name`, `org/*` or `*`.
///
/// Matching is exact and case-sensitive: a pattern that fails to match only makes the
/// policy stricter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RepoPattern {
    /// `*`: every repository.
    Any,
    /// `org/*`: every repository of one organisation.
    Org(String),
    /// `org/name`: one repository.
    Repo(RepoId),
}

impl RepoPattern {
    /// Whether `repo` matches.
    pub fn matches(&self, repo: &RepoId) -> bool {
        match self {
            RepoPattern::Any => true,
            RepoPattern::Org(org) => repo.org() == org,
            RepoPattern::Repo(r) => r == repo,
        }
    }
}

/// A string that is not a repository pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a repository pattern: write org/name, org/* or *")]
pub struct RepoPatternError(pub String);

impl FromStr for RepoPattern {
    type Err = RepoPatternError;
    fn from_str(s: &str) -> Result<Self, RepoPatternError> {
        let err = || RepoPatternError(s.chars().take(200).collect());
        if s == "*" {
            return Ok(RepoPattern::Any);
        }
        if let Some(org) = s.strip_suffix("/*") {
            // Validate the organisation as RepoId does, with a stand-in name.
            let _: RepoId = format!("{org}/x").parse().map_err(|_| err())?;
            return Ok(RepoPattern::Org(org.to_owned()));
        }
        s.parse().map(RepoPattern::Repo).map_err(|_| err())
    }
}

impl fmt::Display for RepoPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RepoPattern::Any => f.write_str("*"),
            RepoPattern::Org(org) => write!(f, "{org}/*"),
            RepoPattern::Repo(r) => write!(f, "{r}"),
        }
    }
}

/// Keys trusted for some repositories.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Publisher {
    repos: Vec<RepoPattern>,
    keys: Vec<PublicKey>,
}

/// What the host trusts: which keys sign which repositories, whether signatures are
/// required, and where unsigned releases and rollbacks are allowed.
///
/// The default is permissive: signatures are not required and no key is trusted, so
/// every release loads unsigned (its file digests are still checked against its
/// manifest). Build a stricter one with the chained methods, or read one from a file:
///
/// ```
/// # use khub::verify::trust::TrustPolicy;
/// # let (pk, _) = khub::verify::sign::keygen(None).unwrap();
/// let policy = TrustPolicy::permissive()
///     .require_signature(true)
///     .trust_key("acme/*", pk.parse().unwrap())
///     .allow_unsigned("dev/*");
/// ```
///
/// A pattern given to the chained methods that does not parse makes every later
/// [`TrustPolicy::check`] and [`RollbackState::check`] fail with
/// [`TrustError::InvalidPolicy`]: a typo never silently loosens, nor silently ignores, a
/// rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustPolicy {
    require_signature: bool,
    allow_unsigned: Vec<RepoPattern>,
    allow_rollback: Vec<RepoPattern>,
    publishers: Vec<Publisher>,
    /// Patterns given to the chained methods that did not parse: (method, pattern).
    invalid: Vec<(&'static str, String)>,
}

/// The file format, as written; converted and validated into [`TrustPolicy`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct PolicyRepr {
    #[serde(default)]
    require_signature: bool,
    #[serde(default)]
    allow_unsigned: Vec<String>,
    #[serde(default)]
    allow_rollback: Vec<String>,
    #[serde(default, rename = "publisher")]
    publishers: Vec<PublisherRepr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublisherRepr {
    repos: Vec<String>,
    keys: Vec<String>,
}

/// What [`TrustPolicy::check`] accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustDecision {
    /// Signed with a trusted key, over these bytes, for this release, not expired.
    Signed {
        /// The id of the key that signed it.
        key_id: String,
        /// What the signature claims (repository, version, time, expiry).
        claim: ReleaseClaim,
    },
    /// Accepted without a checked signature, as the policy allows: either it has no
    /// signature, or it has one that no configured key can check.
    Unsigned,
}

impl TrustPolicy {
    /// The permissive policy: signatures not required, no key trusted. The same as
    /// [`TrustPolicy::default`].
    pub fn permissive() -> Self {
        Self::default()
    }

    /// Reads a policy file (format in the [module docs](self)).
    ///
    /// Unknown fields, bad patterns, unreadable keys and publishers without repos or keys
    /// are errors naming the field.
    pub fn read(path: &Path) -> Result<Self, TrustError> {
        let text = fs::read_to_string(path).map_err(|source| TrustError::ReadPolicy {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base, Some(path))
    }

    /// Parses the text of a policy file. Relative key paths are taken relative to `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<Self, TrustError> {
        Self::parse(text, base, None)
    }

    fn parse(text: &str, base: &Path, path: Option<&Path>) -> Result<Self, TrustError> {
        let invalid = |field: String, message: String| TrustError::InvalidPolicy {
            path: path.map(Path::to_path_buf),
            field,
            message,
        };
        let repr: PolicyRepr = toml::from_str(text).map_err(|e| invalid("(file)".to_owned(), e.to_string()))?;
        let patterns = |field: &str, list: &[String]| -> Result<Vec<RepoPattern>, TrustError> {
            list.iter()
                .enumerate()
                .map(|(i, p)| {
                    p.parse()
                        .map_err(|e: RepoPatternError| invalid(format!("{field}[{i}]"), e.to_string()))
                })
                .collect()
        };
        let mut policy = TrustPolicy {
            require_signature: repr.require_signature,
            allow_unsigned: patterns("allow-unsigned", &repr.allow_unsigned)?,
            allow_rollback: patterns("allow-rollback", &repr.allow_rollback)?,
            ..Self::default()
        };
        for (n, p) in repr.publishers.iter().enumerate() {
            let field = format!("publisher[{n}]");
            if p.repos.is_empty() {
                return Err(invalid(
                    format!("{field}.repos"),
                    "empty: list the repositories this publisher signs".to_owned(),
                ));
            }
            if p.keys.is_empty() {
                return Err(invalid(
                    format!("{field}.keys"),
                    "empty: list the publisher's public keys".to_owned(),
                ));
            }
            let repos = patterns(&format!("{field}.repos"), &p.repos)?;
            let keys = p
                .keys
                .iter()
                .enumerate()
                .map(|(i, k)| {
                    load_key(k, base).map_err(|source| TrustError::InvalidKey {
                        path: path.map(Path::to_path_buf),
                        field: format!("{field}.keys[{i}]"),
                        source: Box::new(source),
                    })
                })
                .collect::<Result<_, _>>()?;
            policy.publishers.push(Publisher { repos, keys });
        }
        Ok(policy)
    }

    /// The policy the environment configures, in this order:
    ///
    /// 1. `KHUB_TRUST_POLICY`: that file, which must exist;
    /// 2. `$XDG_CONFIG_HOME/khub/trust.toml` (when `XDG_CONFIG_HOME` is set and absolute),
    ///    else `$HOME/.config/khub/trust.toml`, when it exists;
    /// 3. else the [permissive](TrustPolicy::permissive) policy.
    ///
    /// An I/O error other than "not found" while looking is an error, not a fallback.
    pub fn from_env(env: &Environment) -> Result<Self, TrustError> {
        if let Some(p) = env.get(env::KHUB_TRUST_POLICY) {
            let path = PathBuf::from(p);
            return match fs::metadata(&path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Err(TrustError::MissingPolicy { path }),
                _ => Self::read(&path),
            };
        }
        let config = match env.get(env::XDG_CONFIG_HOME).map(PathBuf::from).filter(|p| p.is_absolute()) {
            Some(dir) => Some(dir),
            None => env.get(env::HOME).map(|h| Path::new(h).join(".config")),
        };
        let Some(config) = config else {
            return Ok(Self::permissive());
        };
        let path = config.join("khub").join(POLICY_FILE);
        match fs::metadata(&path) {
            Ok(_) => Self::read(&path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::permissive()),
            Err(source) => Err(TrustError::ReadPolicy { path, source }),
        }
    }

    /// Requires (or stops requiring) a signature on every release, except where
    /// [`TrustPolicy::allow_unsigned`] matches.
    pub fn require_signature(mut self, required: bool) -> Self {
        self.require_signature = required;
        self
    }

    /// Trusts `key` to sign the repositories `pattern` matches (`org/name`, `org/*`, `*`).
    pub fn trust_key(mut self, pattern: &str, key: PublicKey) -> Self {
        match pattern.parse() {
            Ok(p) => self.publishers.push(Publisher {
                repos: vec![p],
                keys: vec![key],
            }),
            Err(_) => self.invalid.push(("trust_key", pattern.to_owned())),
        }
        self
    }

    /// Accepts unsigned releases of the repositories `pattern` matches, even when
    /// signatures are required or keys are configured for them.
    pub fn allow_unsigned(mut self, pattern: &str) -> Self {
        match pattern.parse() {
            Ok(p) => self.allow_unsigned.push(p),
            Err(_) => self.invalid.push(("allow_unsigned", pattern.to_owned())),
        }
        self
    }

    /// Allows loading a lower version than seen before for the repositories `pattern`
    /// matches (the CLI's `--allow-rollback` passes `*`).
    pub fn allow_rollback(mut self, pattern: &str) -> Self {
        match pattern.parse() {
            Ok(p) => self.allow_rollback.push(p),
            Err(_) => self.invalid.push(("allow_rollback", pattern.to_owned())),
        }
        self
    }

    /// Whether the policy requires signatures (`require-signature`).
    pub fn requires_signature(&self) -> bool {
        self.require_signature
    }

    /// Whether unsigned releases of `repo` are explicitly allowed (`allow-unsigned`).
    pub fn allows_unsigned(&self, repo: &RepoId) -> bool {
        self.allow_unsigned.iter().any(|p| p.matches(repo))
    }

    /// Whether `repo` may go below the highest version seen (`allow-rollback`).
    pub fn allows_rollback(&self, repo: &RepoId) -> bool {
        self.allow_rollback.iter().any(|p| p.matches(repo))
    }

    /// The keys trusted to sign `repo`, each once, in the order configured.
    pub fn keys_for(&self, repo: &RepoId) -> Vec<&PublicKey> {
        let mut keys: Vec<&PublicKey> = Vec::new();
        for p in self.publishers.iter().filter(|p| p.repos.iter().any(|r| r.matches(repo))) {
            for k in &p.keys {
                if !keys.contains(&k) {
                    keys.push(k);
                }
            }
        }
        keys
    }

    fn validate(&self) -> Result<(), TrustError> {
        match self.invalid.first() {
            Some((method, pattern)) => Err(TrustError::InvalidPolicy {
                path: None,
                field: format!("{method}({pattern:?})"),
                message: RepoPatternError(pattern.clone()).to_string(),
            }),
            None => Ok(()),
        }
    }

    /// Decides on a release BEFORE its manifest is parsed: `manifest` is the raw bytes,
    /// `signature` the raw `.minisig` if the registry has one, `now_unix` the current time.
    ///
    /// - A signature, and keys trusted for `repo`: the key is picked by the signature's key
    ///   id (none matches: [`TrustError::UntrustedKey`]); the signature must verify over
    ///   `manifest` ([`TrustError::BadSignature`]); its trusted comment must be a
    ///   [`ReleaseClaim`] ([`TrustError::MalformedClaim`]) for exactly `repo` and `version`
    ///   ([`TrustError::WrongRelease`]) that has not expired ([`TrustError::Expired`]).
    ///   This holds even where `allow-unsigned` matches: a signature that is there is
    ///   checked, and a bad one refused.
    /// - A signature, and no key for `repo`: the signature cannot be checked, so it counts
    ///   for nothing. With signatures required (and no `allow-unsigned` match) that is
    ///   [`TrustError::NoTrustedKey`]; otherwise the release is accepted as
    ///   [`TrustDecision::Unsigned`].
    /// - No signature: accepted as [`TrustDecision::Unsigned`] when `allow-unsigned`
    ///   matches, or when signatures are not required *and* no key is trusted for `repo`.
    ///   Otherwise [`TrustError::Unsigned`]. Configuring a publisher key for a repository
    ///   thus means its releases must be signed: else stripping the signature would
    ///   defeat the key.
    pub fn check(
        &self,
        repo: &RepoId,
        version: &semver::Version,
        manifest: &[u8],
        signature: Option<&[u8]>,
        now_unix: u64,
    ) -> Result<TrustDecision, TrustError> {
        self.validate()?;
        let keys = self.keys_for(repo);
        let exempt = self.allows_unsigned(repo);
        let Some(signature) = signature else {
            if exempt || (!self.require_signature && keys.is_empty()) {
                return Ok(TrustDecision::Unsigned);
            }
            return Err(TrustError::Unsigned {
                repo: repo.clone(),
                version: version.clone(),
                keys_configured: !keys.is_empty(),
            });
        };
        if keys.is_empty() {
            if self.require_signature && !exempt {
                return Err(TrustError::NoTrustedKey { repo: repo.clone() });
            }
            return Ok(TrustDecision::Unsigned);
        }
        let bad = |source| TrustError::BadSignature {
            repo: repo.clone(),
            version: version.clone(),
            source: Box::new(source),
        };
        let key_id = sign::signature_key_id(signature).map_err(bad)?;
        // The id picks candidates; only a verifying signature authorizes. Two trusted keys
        // may share an id, so every candidate is tried.
        let candidates: Vec<&PublicKey> = keys.iter().copied().filter(|k| k.key_id() == key_id).collect();
        if candidates.is_empty() {
            return Err(TrustError::UntrustedKey {
                repo: repo.clone(),
                key_id,
                trusted: keys.iter().map(|k| k.key_id()).collect(),
            });
        }
        let mut last_error = None;
        let mut verified = None;
        for k in candidates {
            match sign::verify(k, manifest, signature) {
                Ok(v) => {
                    verified = Some(v);
                    break;
                }
                Err(e) => last_error = Some(e),
            }
        }
        let verified = match (verified, last_error) {
            (Some(v), _) => v,
            (None, Some(e)) => return Err(bad(e)),
            (None, None) => return Err(bad(SignError::BadSignature { key_id })),
        };
        let claim: ReleaseClaim = verified.trusted_comment.parse().map_err(|source| TrustError::MalformedClaim {
            repo: repo.clone(),
            version: version.clone(),
            source: Box::new(source),
        })?;
        if claim.repo != *repo || claim.version != *version {
            return Err(TrustError::WrongRelease {
                repo: repo.clone(),
                version: version.clone(),
                claim: Box::new(claim),
            });
        }
        if let Some(expired_at) = claim.expires
            && expired_at < now_unix
        {
            return Err(TrustError::Expired {
                repo: repo.clone(),
                version: version.clone(),
                expired_at,
                now: now_unix,
            });
        }
        Ok(TrustDecision::Signed {
            key_id: verified.key_id,
            claim,
        })
    }
}

/// A key from the policy: an inline base64 key (`RW…`, 56 characters), or a path to a
/// `.pub` file, relative to `base` unless absolute.
fn load_key(entry: &str, base: &Path) -> Result<PublicKey, SignError> {
    let entry = entry.trim();
    if entry.len() == 56 && entry.starts_with("RW") {
        return entry.parse();
    }
    sign::read_public_key(&base.join(entry))
}

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

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests write scratch files directly
mod tests {
    use super::*;
    use crate::verify::sign::{SecretKey, keygen};

    fn repo(s: &str) -> RepoId {
        s.parse().unwrap()
    }

    fn v(s: &str) -> semver::Version {
        semver::Version::parse(s).unwrap()
    }

    fn key() -> (PublicKey, SecretKey) {
        let (pk, sk) = keygen(None).unwrap();
        (pk.parse().unwrap(), SecretKey::parse(&sk, None).unwrap())
    }

    const NOW: u64 = 1_750_000_000;
    const MANIFEST: &[u8] = b"[kernel]\nname = \"activation\"\nversion = \"1.2.3\"\n";

    fn signed(sk: &SecretKey, r: &str, ver: &str, expires: Option<u64>) -> String {
        let claim = ReleaseClaim {
            repo: repo(r),
            version: v(ver),
            timestamp: NOW - 100,
            expires,
        };
        sign::sign(sk, MANIFEST, &claim).unwrap()
    }

    #[test]
    fn patterns_parse_and_match() {
        let a = repo("acme/activation");
        assert!("*".parse::<RepoPattern>().unwrap().matches(&a));
        assert!("acme/*".parse::<RepoPattern>().unwrap().matches(&a));
        assert!(!"acme2/*".parse::<RepoPattern>().unwrap().matches(&a));
        assert!(!"Acme/*".parse::<RepoPattern>().unwrap().matches(&a));
        assert!("acme/activation".parse::<RepoPattern>().unwrap().matches(&a));
        assert!(!"acme/activations".parse::<RepoPattern>().unwrap().matches(&a));
        for bad in [
            "", "acme", "*/*", "*/x", "acme/a*", "acme/", "/x", "a/b/c", "acme/**", " acme/x", "..//x",
        ] {
            assert!(bad.parse::<RepoPattern>().is_err(), "{bad}");
        }
        for good in ["*", "acme/*", "acme/activation"] {
            assert_eq!(good.parse::<RepoPattern>().unwrap().to_string(), good);
        }
    }

    #[test]
    fn permissive_accepts_unsigned_and_unchecked_signatures() {
        let p = TrustPolicy::permissive();
        assert_eq!(p, TrustPolicy::default());
        let r = repo("acme/activation");
        assert_eq!(p.check(&r, &v("1.2.3"), MANIFEST, None, NOW).unwrap(), TrustDecision::Unsigned);
        // A signature no configured key can check counts for nothing.
        let (_, sk) = key();
        let sig = signed(&sk, "acme/activation", "1.2.3", None);
        assert_eq!(
            p.check(&r, &v("1.2.3"), MANIFEST, Some(sig.as_bytes()), NOW).unwrap(),
            TrustDecision::Unsigned
        );
    }

    #[test]
    fn signed_by_trusted_key_is_accepted() {
        let (pk, sk) = key();
        let p = TrustPolicy::permissive().require_signature(true).trust_key("acme/*", pk.clone());
        let sig = signed(&sk, "acme/activation", "1.2.3", Some(NOW + 10));
        let d = p
            .check(&repo("acme/activation"), &v("1.2.3"), MANIFEST, Some(sig.as_bytes()), NOW)
            .unwrap();
        let TrustDecision::Signed { key_id, claim } = d else {
            panic!("{d:?}")
        };
        assert_eq!(key_id, pk.key_id());
        assert_eq!(claim.version, v("1.2.3"));
        // Expiry is inclusive: valid at exactly `expires`.
        p.check(&repo("acme/activation"), &v("1.2.3"), MANIFEST, Some(sig.as_bytes()), NOW + 10)
            .unwrap();
    }

    #[test]
    fn untrusted_key_is_refused_and_named() {
        let (trusted, _) = key();
        let (_, other) = key();
        let p = TrustPolicy::permissive().trust_key("acme/*", trusted.clone());
        let sig = signed(&other, "acme/activation", "1.2.3", None);
        let e = p
            .check(&repo("acme/activation"), &v("1.2.3"), MANIFEST, Some(sig.as_bytes()), NOW)
            .unwrap_err();
        let TrustError::UntrustedKey { key_id, trusted: list, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(key_id, &other.key_id());
        assert_eq!(list, &vec![trusted.key_id()]);
        let msg = e.to_string();
        assert!(
            msg.contains(&other.key_id()) && msg.contains(&trusted.key_id()) && msg.contains("[[publisher]]"),
            "{msg}"
        );
    }

    #[test]
    fn keys_apply_only_to_their_patterns() {
        let (acme, acme_sk) = key();
        let (other, _) = key();
        let p = TrustPolicy::permissive()
            .require_signature(true)
            .trust_key("acme/*", acme.clone())
            .trust_key("kernels-community/activation", other.clone())
            .trust_key("acme/activation", acme.clone());
        assert_eq!(p.keys_for(&repo("acme/activation")), vec![&acme]);
        assert_eq!(p.keys_for(&repo("kernels-community/activation")), vec![&other]);
        assert!(p.keys_for(&repo("kernels-community/norm")).is_empty());
        // acme's key signing a kernels-community release: not trusted there.
        let sig = signed(&acme_sk, "kernels-community/activation", "1.2.3", None);
        let e = p
            .check(
                &repo("kernels-community/activation"),
                &v("1.2.3"),
                MANIFEST,
                Some(sig.as_bytes()),
                NOW,
            )
            .unwrap_err();
        assert!(matches!(e, TrustError::UntrustedKey { .. }), "{e}");
    }

    #[test]
    fn changed_manifest_is_a_bad_signature() {
        let (pk, sk) = key();
        let p = TrustPolicy::permissive().trust_key("*", pk);
        let sig = signed(&sk, "acme/activation", "1.2.3", None);
        let mut m = MANIFEST.to_vec();
        m[3] ^= 0x20;
        let e = p
            .check(&repo("acme/activation"), &v("1.2.3"), &m, Some(sig.as_bytes()), NOW)
            .unwrap_err();
        assert!(matches!(e, TrustError::BadSignature { .. }), "{e}");
        assert!(e.to_string().contains("changed after signing"), "{e}");
        let e = p
            .check(&repo("acme/activation"), &v("1.2.3"), MANIFEST, Some(b"garbage"), NOW)
            .unwrap_err();
        assert!(matches!(e, TrustError::BadSignature { .. }), "{e}");
    }

    #[test]
    fn replayed_signatures_are_refused() {
        let (pk, sk) = key();
        let p = TrustPolicy::permissive().trust_key("acme/*", pk);
        // A genuine signature of 1.2.2 presented for 1.2.3 (same bytes, say a re-tag).
        let sig = signed(&sk, "acme/activation", "1.2.2", None);
        let e = p
            .check(&repo("acme/activation"), &v("1.2.3"), MANIFEST, Some(sig.as_bytes()), NOW)
            .unwrap_err();
        assert!(matches!(e, TrustError::WrongRelease { .. }), "{e}");
        assert!(e.to_string().contains("replay"), "{e}");
        // A genuine signature of another repository by the same publisher.
        let sig = signed(&sk, "acme/norm", "1.2.3", None);
        let e = p
            .check(&repo("acme/activation"), &v("1.2.3"), MANIFEST, Some(sig.as_bytes()), NOW)
            .unwrap_err();
        assert!(matches!(e, TrustError::WrongRelease { .. }), "{e}");
    }

    #[test]
    fn expired_signatures_are_refused() {
        let (pk, sk) = key();
        let p = TrustPolicy::permissive().trust_key("acme/*", pk);
        let sig = signed(&sk, "acme/activation", "1.2.3", Some(NOW - 1));
        let e = p
            .check(&repo("acme/activation"), &v("1.2.3"), MANIFEST, Some(sig.as_bytes()), NOW)
            .unwrap_err();
        let TrustError::Expired { expired_at, .. } = e else { panic!("{e}") };
        assert_eq!(expired_at, NOW - 1);
        assert!(e.to_string().contains("re-sign"), "{e}");
    }

    #[test]
    fn non_claim_trusted_comment_is_refused() {
        // A valid minisign signature whose trusted comment is minisign's default, made with
        // the crate directly since khub's `sign` always writes a claim.
        let pair = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        let pk: PublicKey = pair.pk.to_base64().parse().unwrap();
        let p = TrustPolicy::permissive().trust_key("acme/*", pk);
        let sig = minisign::sign(Some(&pair.pk), &pair.sk, MANIFEST, Some("timestamp:1\tfile:khub.toml"), None)
            .unwrap()
            .into_string();
        let e = p
            .check(&repo("acme/activation"), &v("1.2.3"), MANIFEST, Some(sig.as_bytes()), NOW)
            .unwrap_err();
        assert!(matches!(e, TrustError::MalformedClaim { .. }), "{e}");
        assert!(e.to_string().contains("khub sign"), "{e}");
    }

    #[test]
    fn strict_mode_refuses_unsigned() {
        let p = TrustPolicy::permissive().require_signature(true).allow_unsigned("dev/*");
        let e = p.check(&repo("acme/activation"), &v("1.2.3"), MANIFEST, None, NOW).unwrap_err();
        assert!(matches!(e, TrustError::Unsigned { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("khub sign") && msg.contains("allow-unsigned"), "{msg}");
        assert_eq!(
            p.check(&repo("dev/scratch"), &v("0.1.0"), MANIFEST, None, NOW).unwrap(),
            TrustDecision::Unsigned
        );
        // Signed, but no key for the repo: cannot be checked, so refused in strict mode.
        let (_, sk) = key();
        let sig = signed(&sk, "acme/activation", "1.2.3", None);
        let e = p
            .check(&repo("acme/activation"), &v("1.2.3"), MANIFEST, Some(sig.as_bytes()), NOW)
            .unwrap_err();
        assert!(
            matches!(e, TrustError::NoTrustedKey { .. }) && e.to_string().contains("[[publisher]]"),
            "{e}"
        );
        let sig = signed(&sk, "dev/scratch", "0.1.0", None);
        assert_eq!(
            p.check(&repo("dev/scratch"), &v("0.1.0"), MANIFEST, Some(sig.as_bytes()), NOW)
                .unwrap(),
            TrustDecision::Unsigned
        );
    }

    #[test]
    fn configured_keys_require_a_signature() {
        // Not strict, but a key is configured for acme/*: stripping the signature must not
        // get around it.
        let (pk, _) = key();
        let p = TrustPolicy::permissive().trust_key("acme/*", pk);
        let e = p.check(&repo("acme/activation"), &v("1.2.3"), MANIFEST, None, NOW).unwrap_err();
        assert!(matches!(e, TrustError::Unsigned { keys_configured: true, .. }), "{e}");
        assert_eq!(
            p.check(&repo("other/x"), &v("1.2.3"), MANIFEST, None, NOW).unwrap(),
            TrustDecision::Unsigned
        );
        let p = p.allow_unsigned("acme/activation");
        assert_eq!(
            p.check(&repo("acme/activation"), &v("1.2.3"), MANIFEST, None, NOW).unwrap(),
            TrustDecision::Unsigned
        );
    }

    #[test]
    fn invalid_builder_patterns_fail_closed() {
        let p = TrustPolicy::permissive().allow_unsigned("not a pattern");
        let e = p.check(&repo("acme/activation"), &v("1.2.3"), MANIFEST, None, NOW).unwrap_err();
        assert!(
            matches!(e, TrustError::InvalidPolicy { .. }) && e.to_string().contains("not a pattern"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let state = RollbackState::open(dir.path()).unwrap();
        let req = semver::VersionReq::parse("*").unwrap();
        assert!(state.check(&p, &repo("acme/activation"), &req, &v("1.0.0")).is_err());
    }

    #[test]
    fn policy_file_parses() {
        let dir = tempfile::tempdir().unwrap();
        let (acme, _) = key();
        let (file_key, _) = key();
        std::fs::create_dir(dir.path().join("keys")).unwrap();
        std::fs::write(dir.path().join("keys/other.pub"), file_key.to_file_text()).unwrap();
        let abs = dir.path().join("keys/other.pub");
        let text = format!(
            r#"
require-signature = true
allow-unsigned = ["dev/*"]
allow-rollback = ["acme/legacy"]

[[publisher]]
repos = ["acme/*", "kernels-community/activation"]
keys = ["{acme}", "keys/other.pub"]

[[publisher]]
repos = ["*"]
keys = ["{}"]
"#,
            abs.display()
        );
        let path = dir.path().join("trust.toml");
        std::fs::write(&path, &text).unwrap();
        let p = TrustPolicy::read(&path).unwrap();
        assert!(p.requires_signature());
        assert!(p.allows_unsigned(&repo("dev/x")) && !p.allows_unsigned(&repo("acme/x")));
        assert!(p.allows_rollback(&repo("acme/legacy")) && !p.allows_rollback(&repo("acme/x")));
        assert_eq!(p.keys_for(&repo("acme/x")), vec![&acme, &file_key]);
        assert_eq!(p.keys_for(&repo("zzz/x")), vec![&file_key]);
        assert_eq!(TrustPolicy::from_toml("", dir.path()).unwrap(), TrustPolicy::permissive());
    }

    #[test]
    fn policy_file_errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("require-signatures = true", "require-signatures"),
            ("allow-unsigned = [\"dev\"]", "allow-unsigned[0]"),
            ("allow-rollback = [\"*\", \"a/b/c\"]", "allow-rollback[1]"),
            ("[[publisher]]\nrepos = []\nkeys = [\"x\"]", "publisher[0].repos"),
            ("[[publisher]]\nrepos = [\"a/*\"]\nkeys = []", "publisher[0].keys"),
            (
                "[[publisher]]\nrepos = [\"a/x\", \"a/\"]\nkeys = [\"k.pub\"]",
                "publisher[0].repos[1]",
            ),
            ("[[publisher]]\nrepos = [\"a/*\"]\nkeys = [\"missing.pub\"]", "publisher[0].keys[0]"),
            (
                "[[publisher]]\nrepos = [\"a/*\"]\nkeys = [\"RWQ", /* truncated inline */
                "publisher[0].keys[0]",
            ),
            ("[[publisher]]\nrepos = [\"a/*\"]\nkeys = [\"k.pub\"]\nkey = \"x\"", "key"),
            ("require-signature = \"yes\"", "require-signature"),
        ];
        for (text, field) in cases {
            let text = if text.ends_with("RWQ") {
                format!("{text}\"]")
            } else {
                text.to_owned()
            };
            let e = TrustPolicy::from_toml(&text, dir.path()).unwrap_err();
            assert!(e.to_string().contains(field), "{text}: {e}");
        }
    }

    #[test]
    fn from_env_finds_the_policy() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        // Nothing set: permissive.
        assert_eq!(TrustPolicy::from_env(&Environment::empty()).unwrap(), TrustPolicy::permissive());
        // HOME without a file: permissive.
        let env = Environment::from_pairs([("HOME", d.as_str())]);
        assert_eq!(TrustPolicy::from_env(&env).unwrap(), TrustPolicy::permissive());
        // $HOME/.config/khub/trust.toml.
        std::fs::create_dir_all(dir.path().join(".config/khub")).unwrap();
        std::fs::write(dir.path().join(".config/khub/trust.toml"), "require-signature = true\n").unwrap();
        assert!(TrustPolicy::from_env(&env).unwrap().requires_signature());
        // XDG_CONFIG_HOME wins over HOME.
        let xdg = dir.path().join("xdg");
        std::fs::create_dir_all(xdg.join("khub")).unwrap();
        let x = xdg.display().to_string();
        let env = Environment::from_pairs([("HOME", d.as_str()), ("XDG_CONFIG_HOME", x.as_str())]);
        assert!(!TrustPolicy::from_env(&env).unwrap().requires_signature());
        std::fs::write(xdg.join("khub/trust.toml"), "bogus = 1\n").unwrap();
        assert!(matches!(TrustPolicy::from_env(&env), Err(TrustError::InvalidPolicy { .. })));
        // KHUB_TRUST_POLICY wins, and must exist.
        let explicit = dir.path().join("explicit.toml");
        let e = explicit.display().to_string();
        let env = Environment::from_pairs([("HOME", d.as_str()), ("KHUB_TRUST_POLICY", e.as_str())]);
        let err = TrustPolicy::from_env(&env).unwrap_err();
        assert!(
            matches!(err, TrustError::MissingPolicy { .. }) && err.to_string().contains("KHUB_TRUST_POLICY"),
            "{err}"
        );
        std::fs::write(&explicit, "allow-unsigned = [\"*\"]\n").unwrap();
        assert!(TrustPolicy::from_env(&env).unwrap().allows_unsigned(&repo("a/b")));
    }

    #[test]
    fn default_state_dir() {
        let env = |pairs: &[(&str, &str)]| RollbackState::default_dir(&Environment::from_pairs(pairs.iter().copied()));
        assert_eq!(
            env(&[("KHUB_STATE_DIR", "/s"), ("XDG_STATE_HOME", "/x"), ("HOME", "/h")]).unwrap(),
            PathBuf::from("/s")
        );
        assert_eq!(env(&[("XDG_STATE_HOME", "/x"), ("HOME", "/h")]).unwrap(), PathBuf::from("/x/khub"));
        assert_eq!(
            env(&[("XDG_STATE_HOME", "rel"), ("HOME", "/h")]).unwrap(),
            PathBuf::from("/h/.local/state/khub")
        );
        assert!(matches!(env(&[]), Err(TrustError::NoStateDir)));
    }

    #[test]
    fn rollback_is_refused_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let state = RollbackState::open(&dir.path().join("state")).unwrap();
        let r = repo("acme/activation");
        let any = semver::VersionReq::parse(">=1").unwrap();
        let p = TrustPolicy::permissive();
        assert_eq!(state.highest(&r), None);
        state.check(&p, &r, &any, &v("1.0.0")).unwrap();
        state.record(&r, &v("1.3.0")).unwrap();
        assert_eq!(state.highest(&r), Some(v("1.3.0")));
        // Lower, and the requirement admits 1.3.0: refused.
        let e = state.check(&p, &r, &any, &v("1.2.0")).unwrap_err();
        assert!(matches!(e, TrustError::Rollback { .. }), "{e}");
        assert!(e.to_string().contains("--allow-rollback") && e.to_string().contains("1.3.0"), "{e}");
        // Same or higher: fine.
        state.check(&p, &r, &any, &v("1.3.0")).unwrap();
        state.check(&p, &r, &any, &v("2.0.0")).unwrap();
        // A requirement that excludes 1.3.0 is the host's choice.
        state
            .check(&p, &r, &semver::VersionReq::parse("~1.2").unwrap(), &v("1.2.0"))
            .unwrap();
        // Other repos are independent.
        state.check(&p, &repo("acme/norm"), &any, &v("0.1.0")).unwrap();
        // Allowed by pattern.
        state.check(&p.clone().allow_rollback("acme/*"), &r, &any, &v("1.2.0")).unwrap();
        state.check(&p.clone().allow_rollback("*"), &r, &any, &v("1.2.0")).unwrap();
        assert!(state.check(&p.clone().allow_rollback("acme/norm"), &r, &any, &v("1.2.0")).is_err());
    }

    #[test]
    fn record_keeps_the_max_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo("acme/activation");
        let state = RollbackState::open(dir.path()).unwrap();
        state.record(&r, &v("1.3.0")).unwrap();
        state.record(&r, &v("1.2.0")).unwrap();
        assert_eq!(state.highest(&r), Some(v("1.3.0")));
        state.record(&r, &v("1.3.0-rc.1")).unwrap();
        assert_eq!(state.highest(&r), Some(v("1.3.0")));
        // A fresh reader sees it; a stale one is brought up to date by its next record.
        let stale = RollbackState::open(dir.path()).unwrap();
        state.record(&r, &v("1.4.0")).unwrap();
        assert_eq!(stale.highest(&r), Some(v("1.3.0")));
        stale.record(&repo("acme/norm"), &v("0.1.0")).unwrap();
        assert_eq!(stale.highest(&r), Some(v("1.4.0")));
        let fresh = RollbackState::open(dir.path()).unwrap();
        assert_eq!(fresh.highest(&r), Some(v("1.4.0")));
        assert_eq!(fresh.highest(&repo("acme/norm")), Some(v("0.1.0")));
        // No temp files are left behind.
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec![ROLLBACK_LOCK, ROLLBACK_FILE]);
    }

    #[test]
    fn corrupt_state_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        for text in [
            "garbage",
            "version = 2\n",
            "version = 1\n[highest]\n\"acme\" = \"1.0.0\"\n",
            "version = 1\n[highest]\n\"acme/x\" = \"one\"\n",
            "version = 1\nextra = true\n",
        ] {
            std::fs::write(dir.path().join(ROLLBACK_FILE), text).unwrap();
            let e = RollbackState::open(dir.path()).unwrap_err();
            assert!(
                matches!(e, TrustError::StateInvalid { .. }) && e.to_string().contains("delete it"),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn concurrent_records_keep_the_max() {
        let dir = tempfile::tempdir().unwrap();
        let repos = [repo("acme/a"), repo("acme/b")];
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let dir = dir.path();
                let repos = &repos;
                s.spawn(move || {
                    // Each thread opens its own state, as separate processes would.
                    let state = RollbackState::open(dir).unwrap();
                    for i in 0..10u64 {
                        let minor = (t * 7 + i * 3) % 40;
                        state.record(&repos[(i % 2) as usize], &semver::Version::new(1, minor, t)).unwrap();
                    }
                });
            }
        });
        let state = RollbackState::open(dir.path()).unwrap();
        // The max over every (t, i) that wrote each repo.
        let expected = |parity: u64| {
            (0..8u64)
                .flat_map(|t| {
                    (0..10u64)
                        .filter(move |i| i % 2 == parity)
                        .map(move |i| semver::Version::new(1, (t * 7 + i * 3) % 40, t))
                })
                .max()
                .unwrap()
        };
        assert_eq!(state.highest(&repos[0]), Some(expected(0)));
        assert_eq!(state.highest(&repos[1]), Some(expected(1)));
    }
}
