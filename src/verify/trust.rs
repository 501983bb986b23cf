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
//! The rollback state lives in [`super::rollback`].

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

pub use super::rollback::{ROLLBACK_FILE, ROLLBACK_LOCK, RollbackState};
use crate::env::{self, Environment};
use crate::ids::RepoId;
use crate::verify::sign::{self, PublicKey, ReleaseClaim, SignError};

/// The name of the trust policy file inside khub's config directory.
pub const POLICY_FILE: &str = "trust.toml";

/// How the policy's messages point at where it is configured.
const POLICY_HINT: &str = "the trust policy (KHUB_TRUST_POLICY, or $XDG_CONFIG_HOME/khub/trust.toml)";

/// A trust decision refused a release, or the policy or state could not be read.
///
/// Every message says what was refused and what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// A local release directory is unsigned where the policy wants signatures.
    #[error(
        "the release at {} is unsigned, and the trust policy requires signatures or trusts publisher keys: sign it (`khub sign`), or pass --skip-trust to load it for development",
        dir.display()
    )]
    UnsignedLocal {
        /// The release directory.
        dir: PathBuf,
    },
    /// A local release's signature does not say which release it signs.
    #[error("the signature of the release at {} names no release khub can check: {source}; sign it again with `khub sign`", dir.display())]
    LocalClaim {
        /// The release directory.
        dir: PathBuf,
        /// What is wrong.
        #[source]
        source: Box<SignError>,
    },
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

    pub(crate) fn validate(&self) -> Result<(), TrustError> {
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

impl TrustPolicy {
    /// Decides on a release read from a local directory, which has no repository of its
    /// own. A signed release is checked exactly as [`TrustPolicy::check`] checks the
    /// repository its signature claims (so it is accepted only when a key trusted for that
    /// repository made it, for this version). An unsigned one is accepted only when the
    /// policy requires no signature and trusts no key at all; `allow-unsigned` patterns
    /// name repositories and so do not apply.
    pub fn check_local(
        &self,
        dir: &Path,
        version: &semver::Version,
        manifest: &[u8],
        signature: Option<&[u8]>,
        now_unix: u64,
    ) -> Result<TrustDecision, TrustError> {
        self.validate()?;
        match signature {
            Some(sig) => {
                let bad = |source| TrustError::LocalClaim {
                    dir: dir.to_owned(),
                    source: Box::new(source),
                };
                let comment = sign::unverified_trusted_comment(sig).map_err(bad)?;
                let claim: ReleaseClaim = comment.parse().map_err(bad)?;
                match self.check(&claim.repo, version, manifest, Some(sig), now_unix)? {
                    signed @ TrustDecision::Signed { .. } => Ok(signed),
                    // The claim named a repository with no trusted key (or one that
                    // `allow-unsigned` matches): the signature was not verified, so it counts
                    // for nothing, and the release is judged as unsigned.
                    TrustDecision::Unsigned if !self.require_signature && self.publishers.is_empty() => Ok(TrustDecision::Unsigned),
                    TrustDecision::Unsigned => Err(TrustError::UnsignedLocal { dir: dir.to_owned() }),
                }
            }
            None if !self.require_signature && self.publishers.is_empty() => Ok(TrustDecision::Unsigned),
            None => Err(TrustError::UnsignedLocal { dir: dir.to_owned() }),
        }
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

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests write scratch files directly
mod tests;
