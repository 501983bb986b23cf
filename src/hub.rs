//! The front door: `Hub::from_env()?.load("org/name", "^1.2")?`.
//!
//! A [`Hub`] ties the pieces together: host facts, a registry, the store and the
//! resolver. Its jobs, and the network traffic each makes:
//!
//! - [`Hub::resolve_release`]: refs (one request), then the manifest and its signature at
//!   the chosen commit (always from the registry when online: the store is a cache, never
//!   the authority on which bytes a release holds).
//! - [`Hub::fetch`]: the above, then only the chosen variant's files, downloaded in
//!   parallel and streamed through SHA-256 into the store; files already in the store are
//!   re-hashed, not downloaded again, unless damaged (then quarantined and downloaded).
//! - [`Hub::load`]: fetch, then verify and load from the store; a file damaged on disk is
//!   quarantined and downloaded again once.
//!
//! The known-release index and the rollback state advance only once a release's manifest
//! passed the trust policy and its chosen files were verified ([`Hub::accept`]).
//! - [`Hub::lock`] / [`Hub::load_locked`]: pin releases in `khub.lock`; a locked load reads
//!   the lock and the store only.
//!
//! Offline mode (`KHUB_OFFLINE=1`, `HF_HUB_OFFLINE=1`, `--offline`) is a separate path:
//! the registry client is never constructed, so no socket can be opened. Versions resolve
//! against the releases this machine has seen before (an index written beside the store),
//! and a missing file is an error naming the file and the command that fetches it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::host::{Environment, HostError, HostFacts, ProbeOptions};
use crate::load::{Kernel, LoadError, load_from};
use crate::lock::{LockError, LockedKernel, LockedTarget, Lockfile};
use crate::manifest::{Manifest, ManifestError, Sha256Digest, Variant};
use crate::registry::{GitRef, Refs, Registry, RegistryError, RepoId, dir::DirRegistry};
use crate::resolve::{NoVariantFits, Preferences};
use crate::store::{KnownRelease, KnownReleases, Store, StoreError, StoreSource};
use crate::version::{RequirementError, Selected, parse_requirement, select};

/// Something went wrong between a requirement and a loaded kernel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// Host detection failed.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Loading failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A lockfile problem.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// A requirement does not parse.
    #[error(transparent)]
    Requirement(#[from] RequirementError),
    /// The trust policy refused the release.
    #[error(transparent)]
    Trust(Box<crate::verify::trust::TrustError>),
    /// No release matches the requirement.
    #[error("no release of {repo} on {registry} matches `{requirement}`; it has: {available}")]
    NoMatchingRelease {
        /// The repository.
        repo: RepoId,
        /// The registry.
        registry: String,
        /// The requirement.
        requirement: String,
        /// The releases it has.
        available: String,
    },
    /// A manifest from the registry is not valid.
    #[error("the manifest of {repo} at {commit} is not valid: {source}")]
    Manifest {
        /// The repository.
        repo: RepoId,
        /// The commit.
        commit: String,
        /// What is wrong.
        #[source]
        source: ManifestError,
    },
    /// The manifest names another kernel version than its tag.
    #[error("{repo}: tag {tag} holds a manifest for version {found}; the release is inconsistent")]
    TagMismatch {
        /// The repository.
        repo: RepoId,
        /// The tag.
        tag: String,
        /// The manifest's version.
        found: String,
    },
    /// No variant runs here.
    #[error(transparent)]
    NoVariant(#[from] NoVariantFits),
    /// An offline lookup found nothing.
    #[error("offline: {what} is not in the store at {}; run `{command}` while online", store.display())]
    OfflineMiss {
        /// What is missing.
        what: String,
        /// The store.
        store: PathBuf,
        /// The command that would fetch it.
        command: String,
    },
    /// A blob in the store does not hash to its name: it was moved to quarantine.
    #[error(
        "{what}: the stored copy at {} is damaged (its sha256 differs from its name){}; run `{command}` to fetch it again, or `khub cache verify --repair` to check the whole store",
        blob.display(),
        quarantined.as_ref().map(|q| format!(" and was moved to {}", q.display())).unwrap_or_default()
    )]
    DamagedBlob {
        /// What the blob is.
        what: String,
        /// Where it was.
        blob: PathBuf,
        /// Where it is now, if it was still there to move.
        quarantined: Option<PathBuf>,
        /// The command that fetches it again.
        command: String,
    },
    /// A release directory of a directory registry that the requirement would select
    /// cannot be used.
    #[error("release {version} of {repo} in the directory registry {registry} cannot be used: {why}; fix or remove that directory")]
    UnusableRelease {
        /// The repository.
        repo: RepoId,
        /// The registry.
        registry: String,
        /// The directory's version.
        version: String,
        /// What is wrong with it.
        why: String,
    },
    /// A file's digest in the lock differs from the locked manifest's.
    #[error("{} pins `{path}` of {repo} to sha256 {locked}, but the locked manifest says {manifest}; run `khub lock` again", lock.display())]
    LockDigestMismatch {
        /// The lockfile.
        lock: Box<Path>,
        /// The repository.
        repo: RepoId,
        /// The file.
        path: String,
        /// The lock's digest, hex.
        locked: Box<str>,
        /// The manifest's digest, hex.
        manifest: Box<str>,
    },
    /// None of the locked variants runs on this host.
    #[error(
        "none of the variants {} pins for {repo} ({variants}) runs on this host: {why}; lock for this host with `khub lock --host …`",
        lock.display()
    )]
    LockedVariantUnfit {
        /// The lockfile.
        lock: Box<Path>,
        /// The repository.
        repo: RepoId,
        /// The locked variants.
        variants: String,
        /// Why the best one does not fit.
        why: String,
    },
    /// Local I/O failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl From<crate::verify::trust::TrustError> for HubError {
    fn from(e: crate::verify::trust::TrustError) -> Self {
        HubError::Trust(Box::new(e))
    }
}

/// Where releases come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrySpec {
    /// A Hub-compatible URL.
    Url(String),
    /// A local directory registry.
    Dir(PathBuf),
}

impl RegistrySpec {
    /// A URL when it has a scheme, a directory otherwise.
    pub fn parse(s: &str) -> Self {
        if s.contains("://") {
            RegistrySpec::Url(s.trim_end_matches('/').to_owned())
        } else {
            RegistrySpec::Dir(PathBuf::from(s))
        }
    }

    /// The registry from the environment: `KHUB_REGISTRY`, else `HF_ENDPOINT`, else the
    /// public Hub.
    pub fn from_env(env: &Environment) -> Self {
        use crate::env as vars;
        match env.get(vars::KHUB_REGISTRY).or_else(|| env.get(vars::HF_ENDPOINT)) {
            Some(s) => RegistrySpec::parse(s),
            None => RegistrySpec::Url("https://huggingface.co".to_owned()),
        }
    }

    /// The registry as written.
    pub fn describe(&self) -> String {
        match self {
            RegistrySpec::Url(u) => u.clone(),
            // Tidy: `lk/../registry` and `./registry` name the same registry, once.
            RegistrySpec::Dir(d) => d
                .canonicalize()
                .or_else(|_| std::path::absolute(d))
                .unwrap_or_else(|_| d.clone())
                .display()
                .to_string(),
        }
    }
}

/// How a [`Hub`] is set up.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The environment snapshot (tokens, timeouts, store location).
    pub env: Environment,
    /// The registry.
    pub registry: RegistrySpec,
    /// The store's root directory.
    pub cache: PathBuf,
    /// Never touch the network.
    pub offline: bool,
    /// The host to resolve for.
    pub host: HostFacts,
    /// Resolution preferences.
    pub preferences: Preferences,
    /// Parallel downloads.
    pub jobs: usize,
    /// Which releases to trust (signatures).
    pub trust: crate::verify::trust::TrustPolicy,
    /// Where rollback state lives (outside the purgeable cache); `None` turns rollback
    /// protection off.
    pub state_dir: Option<PathBuf>,
}

impl HubOptions {
    /// Options from an environment snapshot: registry, store, offline mode and the host
    /// facts (probed, with any overrides the snapshot holds).
    pub fn from_env(env: Environment) -> Result<Self, HubError> {
        let host = HostFacts::detect(&ProbeOptions::with_env(env.clone())?)?.facts;
        Self::from_env_for_host(env, host)
    }

    /// As [`HubOptions::from_env`], for host facts the caller already has (probed once, in
    /// a helper process, or read from a profile): nothing is probed here.
    pub fn from_env_for_host(env: Environment, host: HostFacts) -> Result<Self, HubError> {
        use crate::env as vars;
        let offline = [vars::KHUB_OFFLINE, vars::HF_HUB_OFFLINE]
            .iter()
            .any(|v| env.get(v).is_some_and(|v| !matches!(v.trim(), "0" | "false" | "no")));
        Ok(HubOptions {
            registry: RegistrySpec::from_env(&env),
            cache: Store::default_root(&env)?,
            offline,
            host,
            preferences: Preferences::default(),
            jobs: 8,
            trust: crate::verify::trust::TrustPolicy::from_env(&env)?,
            state_dir: crate::verify::trust::RollbackState::default_dir(&env).ok(),
            env,
        })
    }
}

/// Reports fetch progress (the CLI draws bars with it).
pub trait Progress: Sync {
    /// A file download starts.
    fn start(&self, _file: &str, _size: u64) {}
    /// Bytes arrived.
    fn advance(&self, _file: &str, _bytes: u64) {}
    /// A file is stored (or was already there).
    fn finish(&self, _file: &str, _downloaded: bool) {}
}

/// No progress reporting.
pub struct Quiet;
impl Progress for Quiet {}

/// Where a loaded kernel came from: the provenance that front ends (the C API's
/// provenance document, the Python package's `kernel.info`) report beside the load report.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Origin {
    /// The repository.
    pub repo: String,
    /// The requirement it was loaded under.
    pub requirement: String,
    /// The registry, as described.
    pub registry: String,
    /// `registry` (resolved and fetched) or `lockfile` (pinned by a lock).
    pub source: &'static str,
    /// The lockfile, for a locked load.
    pub lockfile: Option<String>,
    /// The release version.
    pub version: String,
    /// Its commit.
    pub commit: String,
    /// The digest of its manifest.
    pub manifest_sha256: String,
    /// `signed` (a signature the trust policy checked), `unsigned` (accepted without one,
    /// as the policy allows) or `pinned` (a locked load: the lock pins the manifest's
    /// digest; the policy was applied when it was locked).
    pub signature: &'static str,
    /// The id of the key whose signature was checked.
    pub signed_by: Option<String>,
}

impl Origin {
    /// A release resolved for `requirement` on `registry`.
    pub fn resolved(requirement: &str, registry: String, release: &ResolvedRelease) -> Origin {
        Origin {
            repo: release.repo.to_string(),
            requirement: requirement.to_owned(),
            registry,
            source: "registry",
            lockfile: None,
            version: release.version.to_string(),
            commit: release.commit.clone(),
            manifest_sha256: release.manifest_sha256.to_string(),
            signature: if release.signed_by.is_some() { "signed" } else { "unsigned" },
            signed_by: release.signed_by.clone(),
        }
    }

    /// A release as the lockfile at `lock` pins it.
    pub fn locked(entry: &LockedKernel, lock: &Path) -> Origin {
        Origin {
            repo: entry.repo.to_string(),
            requirement: entry.requirement.clone(),
            registry: entry.registry.clone(),
            source: "lockfile",
            lockfile: Some(lock.display().to_string()),
            version: entry.version.to_string(),
            commit: entry.commit.clone(),
            manifest_sha256: entry.manifest_sha256.to_string(),
            signature: "pinned",
            signed_by: None,
        }
    }
}

/// A release chosen for a requirement.
#[derive(Debug, Clone)]
pub struct ResolvedRelease {
    /// The repository.
    pub repo: RepoId,
    /// The release version.
    pub version: semver::Version,
    /// Its commit.
    pub commit: String,
    /// The manifest's raw bytes' digest.
    pub manifest_sha256: Sha256Digest,
    /// The digest of the manifest's signature file, when the release is signed.
    pub signature_sha256: Option<Sha256Digest>,
    /// The id of the trusted key whose signature the policy checked; `None` when the
    /// release was accepted without a checked signature.
    pub signed_by: Option<String>,
    /// The manifest.
    pub manifest: Manifest,
}

/// One release of a repository, as [`Hub::versions`] lists it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ReleaseSummary {
    /// The version.
    pub version: String,
    /// Its commit.
    pub commit: String,
    /// Whether a signature file accompanies the manifest (not whether a trusted key made
    /// it: loading decides that under the trust policy).
    pub signed: bool,
    /// The variants its manifest lists.
    pub variants: Vec<String>,
    /// Why the manifest could not be read or parsed, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// What a fetch did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FetchReport {
    /// The repository.
    pub repo: String,
    /// The release version.
    pub version: String,
    /// Its commit.
    pub commit: String,
    /// The variants fetched.
    pub variants: Vec<String>,
    /// Files downloaded now.
    pub downloaded: usize,
    /// Bytes downloaded now.
    pub downloaded_bytes: u64,
    /// Files already in the store.
    pub cached: usize,
}

/// The front door.
pub struct Hub {
    options: HubOptions,
    store: Store,
    registry: Option<Box<dyn Registry>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("registry", &self.options.registry)
            .field("offline", &self.options.offline)
            .field("store", &self.store.root())
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub configured from the process environment.
    pub fn from_env() -> Result<Hub, HubError> {
        Hub::new(HubOptions::from_env(Environment::capture())?)
    }

    /// A hub with explicit options. In offline mode no registry client is created.
    pub fn new(options: HubOptions) -> Result<Hub, HubError> {
        let store = Store::open_with(&options.cache, crate::store::StoreOptions::from_env(&options.env)?)?;
        let registry: Option<Box<dyn Registry>> = if options.offline {
            None
        } else {
            Some(match &options.registry {
                RegistrySpec::Dir(d) => Box::new(DirRegistry::new(d)?),
                #[cfg(feature = "hub")]
                RegistrySpec::Url(u) => Box::new(crate::registry::hf::HubRegistry::new(crate::registry::hf::HubConfig::from_env(
                    &options.env,
                    Some(u),
                )?)?),
                #[cfg(not(feature = "hub"))]
                RegistrySpec::Url(u) => {
                    return Err(HubError::Registry(RegistryError::Transport {
                        registry: u.clone(),
                        message: "this khub was built without the `hub` feature; use a directory registry or a lockfile".into(),
                    }));
                }
            })
        };
        Ok(Hub { options, store, registry })
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The host facts resolution uses.
    pub fn host(&self) -> &HostFacts {
        &self.options.host
    }

    /// The registry, as the index and `khub cache ls` name it.
    pub fn registry_name(&self) -> String {
        self.options.registry.describe()
    }

    /// Whether offline mode is on.
    pub fn offline(&self) -> bool {
        self.options.offline
    }

    fn registry(&self, what: &str) -> Result<&dyn Registry, HubError> {
        self.registry
            .as_deref()
            .ok_or_else(|| HubError::Registry(RegistryError::Offline { what: what.to_owned() }))
    }

    /// The releases this machine knows of `repo` on the current registry.
    fn read_index(&self, repo: &RepoId) -> KnownReleases {
        self.store.known_releases(&self.options.registry.describe(), repo)
    }

    fn remember(
        &self,
        repo: &RepoId,
        version: &semver::Version,
        commit: &str,
        manifest: Sha256Digest,
        signature: Option<Sha256Digest>,
    ) -> Result<(), HubError> {
        let release = KnownRelease {
            commit: commit.to_owned(),
            manifest_sha256: manifest,
            signature_sha256: signature,
            accepted_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs()),
        };
        Ok(self
            .store
            .record_release(&self.options.registry.describe(), repo, version, release)?)
    }

    /// Chooses the release for `requirement`: one refs request, then the manifest (from the
    /// store when it already holds it). Offline, from the releases seen before.
    pub fn resolve_release(&self, repo: &RepoId, requirement: &str) -> Result<ResolvedRelease, HubError> {
        let req = parse_requirement(requirement)?;
        let known = self.read_index(repo);
        let refs = match &self.registry {
            Some(r) => r.refs(repo)?,
            None => Refs {
                tags: known
                    .releases
                    .iter()
                    .map(|(v, k)| GitRef {
                        name: format!("v{v}"),
                        commit: k.commit.clone(),
                    })
                    .collect(),
                branches: Vec::new(),
            },
        };
        let selected = select(&refs, &req);
        // A release the registry holds but cannot serve is reported, not chosen around.
        if let Some(reg) = self.registry.as_deref() {
            let chosen = match &selected {
                Some(Selected::Tag { version, .. }) => Some(version.clone()),
                _ => None,
            };
            let blocking = reg
                .unusable(repo)
                .into_iter()
                .find(|(v, _)| req.matches(v) && chosen.as_ref().is_none_or(|c| v > c));
            if let Some((version, why)) = blocking {
                return Err(HubError::UnusableRelease {
                    repo: repo.clone(),
                    registry: self.options.registry.describe(),
                    version: version.to_string(),
                    why,
                });
            }
        }
        let selected = selected.ok_or_else(|| {
            let mut have: Vec<String> = crate::version::releases(&refs).iter().map(|(v, _, _)| v.to_string()).collect();
            if have.is_empty() {
                have.push("no releases".into());
            }
            if self.registry.is_none() {
                // The store may hold the repository from another registry: say which, so a
                // forgotten --registry is not mistaken for an empty store.
                let this = self.options.registry.describe();
                let mut elsewhere: Vec<String> = self
                    .store
                    .index_entries()
                    .into_iter()
                    .filter(|e| &e.repo == repo)
                    .filter_map(|e| e.registry)
                    .filter(|r| r != &this)
                    .collect();
                elsewhere.sort();
                elsewhere.dedup();
                let also = match elsewhere.first() {
                    Some(first) => format!(
                        "; the store has releases of it from {}: pass --registry {first}",
                        elsewhere.join(", ")
                    ),
                    None => String::new(),
                };
                HubError::OfflineMiss {
                    what: format!(
                        "a release of {repo} matching `{requirement}` from {this} (known here: {}{also})",
                        have.join(", ")
                    ),
                    store: self.store.root().to_owned(),
                    command: format!("khub fetch {repo} --version '{requirement}'"),
                }
            } else {
                HubError::NoMatchingRelease {
                    repo: repo.clone(),
                    registry: self.options.registry.describe(),
                    requirement: requirement.to_owned(),
                    available: have.join(", "),
                }
            }
        })?;
        let commit = selected.commit().to_owned();
        // The manifest and its signature. Online, the registry decides: they are fetched
        // for the commit its refs name, never taken from the store, whose index and blobs
        // are a cache that whoever can write the cache directory could have planted.
        // Offline, the index is all there is: its entry names the manifest by digest, the
        // blob is re-hashed, and the manifest must name the version the entry is filed
        // under (below); the trust policy checks the bytes as it does online.
        let (bytes, signature) = match self.registry.as_deref() {
            Some(reg) => (reg.manifest(repo, &commit)?, reg.signature(repo, &commit)?),
            None => {
                let miss = || HubError::OfflineMiss {
                    what: format!("the manifest of {repo} at {commit}"),
                    store: self.store.root().to_owned(),
                    command: format!("khub fetch {repo} --version '{requirement}'"),
                };
                let k = known.releases.values().find(|k| k.commit == commit).ok_or_else(miss)?;
                let what = format!("the manifest of {repo} at {commit}");
                let bytes = self.read_blob_healing(&k.manifest_sha256, &what, || format!("khub fetch {repo} --version '{requirement}'"))?;
                let sig = match &k.signature_sha256 {
                    Some(d) => Some(self.read_blob_healing(d, &format!("the signature of {repo} at {commit}"), || {
                        format!("khub fetch {repo} --version '{requirement}'")
                    })?),
                    None => None,
                };
                (bytes, sig)
            }
        };
        // The trust policy decides on the raw bytes, before the manifest is parsed. A branch
        // head's version is only known from its manifest, so that (rare) path parses first.
        let version = match &selected {
            Selected::Tag { version, .. } => version.clone(),
            Selected::Branch { .. } => {
                Manifest::from_bytes(&bytes)
                    .map_err(|source| HubError::Manifest {
                        repo: repo.clone(),
                        commit: commit.clone(),
                        source,
                    })?
                    .kernel
                    .version
            }
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let decision = self.options.trust.check(repo, &version, &bytes, signature.as_deref(), now)?;
        let manifest = Manifest::from_bytes(&bytes).map_err(|source| HubError::Manifest {
            repo: repo.clone(),
            commit: commit.clone(),
            source,
        })?;
        match &selected {
            Selected::Tag { version, tag, .. } if &manifest.kernel.version != version => {
                return Err(HubError::TagMismatch {
                    repo: repo.clone(),
                    tag: tag.clone(),
                    found: manifest.kernel.version.to_string(),
                });
            }
            Selected::Branch { .. } if !req.matches(&manifest.kernel.version) => {
                return Err(HubError::NoMatchingRelease {
                    repo: repo.clone(),
                    registry: self.options.registry.describe(),
                    requirement: requirement.to_owned(),
                    available: format!("branch head {}", manifest.kernel.version),
                });
            }
            _ => {}
        }
        // Rollback: never go below the highest version seen under the same requirement. The
        // state advances only in [`Hub::accept`], once the chosen files are verified too.
        if let Some(dir) = &self.options.state_dir {
            let state = crate::verify::trust::RollbackState::open(dir)?;
            state.check(&self.options.trust, repo, &req, &manifest.kernel.version)?;
        }
        let digest = self.store.insert_bytes("khub.toml", &bytes)?;
        let sig_digest = match &signature {
            Some(sig) => Some(self.store.insert_bytes(crate::registry::SIGNATURE_FILE, sig)?),
            None => None,
        };
        Ok(ResolvedRelease {
            repo: repo.clone(),
            version: manifest.kernel.version.clone(),
            commit,
            manifest_sha256: digest,
            signature_sha256: sig_digest,
            signed_by: match decision {
                crate::verify::trust::TrustDecision::Signed { key_id, .. } => Some(key_id),
                crate::verify::trust::TrustDecision::Unsigned => None,
            },
            manifest,
        })
    }

    /// Records `release` as accepted, after its manifest passed the trust policy and the
    /// files chosen from it were verified: the known-release index (what offline mode
    /// resolves against) and the rollback state advance here and nowhere else, so a release
    /// that was merely announced (a tag whose files never arrive or fail verification)
    /// changes neither.
    fn accept(&self, release: &ResolvedRelease) -> Result<(), HubError> {
        if let Some(dir) = &self.options.state_dir {
            crate::verify::trust::RollbackState::open(dir)?.record(&release.repo, &release.version)?;
        }
        self.remember(
            &release.repo,
            &release.version,
            &release.commit,
            release.manifest_sha256,
            release.signature_sha256,
        )
    }

    /// Reads a whole blob that must hash to `d` (a manifest or a signature). A damaged
    /// copy is moved to the store's quarantine and reported with the command that repairs
    /// it.
    fn read_blob_healing(&self, d: &Sha256Digest, what: &str, command: impl Fn() -> String) -> Result<Vec<u8>, HubError> {
        match self.store.read_verified(d, crate::manifest::MAX_MANIFEST_BYTES as u64) {
            Err(StoreError::DigestMismatch { .. }) => {
                let blob = self.store.blob_path(d);
                let quarantined = self.store.quarantine_if_damaged(d)?;
                Err(HubError::DamagedBlob {
                    what: what.to_owned(),
                    blob,
                    quarantined,
                    command: command(),
                })
            }
            Err(StoreError::Missing { .. }) => Err(HubError::OfflineMiss {
                what: what.to_owned(),
                store: self.store.root().to_owned(),
                command: command(),
            }),
            other => Ok(other?),
        }
    }

    /// Every release of `repo`, highest version first: online from the registry (its refs,
    /// then each release's manifest and signature), offline from the releases this machine
    /// has verified before.
    pub fn versions(&self, repo: &RepoId) -> Result<Vec<ReleaseSummary>, HubError> {
        let summary = |version: String, commit: String, signed: bool, bytes: Result<Vec<u8>, String>| {
            let parsed = bytes.and_then(|b| Manifest::from_bytes(&b).map_err(|e| e.to_string()));
            let (variants, problem) = match parsed {
                Ok(m) => (m.variants.iter().map(|v| v.id.clone()).collect(), None),
                Err(e) => (Vec::new(), Some(e)),
            };
            ReleaseSummary {
                version,
                commit,
                signed,
                variants,
                problem,
            }
        };
        let mut out = Vec::new();
        match self.registry.as_deref() {
            Some(reg) => {
                let refs = reg.refs(repo)?;
                for (version, _, commit) in crate::version::releases(&refs) {
                    let signed = reg.signature(repo, commit)?.is_some();
                    let bytes = reg.manifest(repo, commit).map_err(|e| e.to_string());
                    out.push(summary(version.to_string(), commit.to_owned(), signed, bytes));
                }
            }
            None => {
                let known = self.read_index(repo);
                let mut releases: Vec<(semver::Version, KnownRelease)> =
                    known.releases.into_iter().filter_map(|(v, k)| Some((v.parse().ok()?, k))).collect();
                releases.sort_by(|a, b| b.0.cmp(&a.0));
                for (version, k) in releases {
                    let bytes = self
                        .store
                        .read_verified(&k.manifest_sha256, crate::manifest::MAX_MANIFEST_BYTES as u64)
                        .map_err(|e| e.to_string());
                    out.push(summary(version.to_string(), k.commit, k.signature_sha256.is_some(), bytes));
                }
            }
        }
        Ok(out)
    }

    /// The variant of `release` for this host.
    pub fn choose_variant<'a>(&self, release: &'a ResolvedRelease) -> Result<&'a Variant, HubError> {
        choose(&release.manifest, &self.options.host, &self.options.preferences)
    }

    /// Downloads `variants` of `release` into the store, in parallel, each streamed through
    /// SHA-256. Files already there are re-hashed first: a damaged copy is moved to the
    /// store's quarantine and downloaded again.
    pub fn fetch_variants(
        &self,
        release: &ResolvedRelease,
        variants: &[&Variant],
        progress: &dyn Progress,
    ) -> Result<FetchReport, HubError> {
        self.fetch_files(release, variants, progress, true)
    }

    /// As [`Hub::fetch_variants`]; with `verify_present` off, files already in the store
    /// are trusted to be intact (the loader re-hashes them anyway, see [`Hub::load_release`]).
    fn fetch_files(
        &self,
        release: &ResolvedRelease,
        variants: &[&Variant],
        progress: &dyn Progress,
        verify_present: bool,
    ) -> Result<FetchReport, HubError> {
        let mut wanted: BTreeMap<Sha256Digest, &crate::manifest::FileEntry> = BTreeMap::new();
        for v in variants {
            for f in &v.files {
                wanted.entry(f.sha256).or_insert(f);
            }
        }
        let mut present = Vec::new();
        let mut missing = Vec::new();
        for f in wanted.values().copied() {
            let here = if verify_present {
                self.store.verify_blob(&f.sha256, f.size)?
            } else {
                self.store.contains(&f.sha256, f.size)
            };
            if here { present.push(f) } else { missing.push(f) }
        }
        for f in &present {
            progress.finish(f.path.as_str(), false);
        }
        let mut report = FetchReport {
            repo: release.repo.to_string(),
            version: release.version.to_string(),
            commit: release.commit.clone(),
            variants: variants.iter().map(|v| v.id.clone()).collect(),
            downloaded: 0,
            downloaded_bytes: 0,
            cached: present.len(),
        };
        if missing.is_empty() {
            return Ok(report);
        }
        let registry = match self.registry("download files") {
            Ok(r) => r,
            Err(_) => {
                let f = missing[0];
                return Err(HubError::OfflineMiss {
                    what: format!("file `{}` (sha256 {}) of {} {}", f.path, f.sha256, release.repo, release.version),
                    store: self.store.root().to_owned(),
                    command: format!("khub fetch {} --version '={}'", release.repo, release.version),
                });
            }
        };
        let jobs = self.options.jobs.clamp(1, 32).min(missing.len());
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results: Vec<Result<(bool, u64), HubError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..jobs)
                .map(|_| {
                    s.spawn(|| {
                        let mut out = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(f) = missing.get(i) else { break };
                            out.push(self.fetch_one(registry, release, f, progress));
                        }
                        out
                    })
                })
                .collect();
            // A worker that panicked (a `Progress` callback, say) must not pass for one
            // that finished: its files would be missing from a fetch reported complete, and
            // the release accepted. The panic goes on, once every worker has stopped.
            let mut results = Vec::new();
            let mut panicked = None;
            for h in handles {
                match h.join() {
                    Ok(out) => results.extend(out),
                    Err(payload) => {
                        panicked.get_or_insert(payload);
                    }
                }
            }
            if let Some(payload) = panicked {
                std::panic::resume_unwind(payload);
            }
            results
        });
        for r in results {
            let (downloaded, bytes) = r?;
            if downloaded {
                report.downloaded += 1;
                report.downloaded_bytes += bytes;
            } else {
                report.cached += 1;
            }
        }
        Ok(report)
    }

    /// Downloads one file into the store. Bytes that do not match the manifest (size or
    /// digest: a transfer corrupted on the way) are discarded by the store and the download
    /// is tried again, up to [`CORRUPT_DOWNLOAD_ATTEMPTS`] times in all.
    fn fetch_one(
        &self,
        registry: &dyn Registry,
        release: &ResolvedRelease,
        f: &crate::manifest::FileEntry,
        progress: &dyn Progress,
    ) -> Result<(bool, u64), HubError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            progress.start(f.path.as_str(), f.size);
            // The registry's own error, kept typed (the store only sees it as text).
            let mut failed: Option<RegistryError> = None;
            let mut fill = |w: &mut dyn Write| -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
                let mut counting = Counting {
                    inner: w,
                    progress,
                    file: f.path.as_str(),
                };
                match registry.fetch(&release.repo, &release.commit, &f.path, f.size, &mut counting) {
                    Ok(n) => Ok(n),
                    Err(e) => {
                        let text = e.to_string();
                        failed = Some(e);
                        Err(text.into())
                    }
                }
            };
            let inserted = match self.store.insert_with(f.path.as_str(), &f.sha256, f.size, &mut fill) {
                Ok(i) => i,
                Err(StoreError::Fill { .. }) if failed.is_some() => {
                    return Err(HubError::Registry(
                        failed.take().ok_or(RegistryError::Offline { what: String::new() })?,
                    ));
                }
                Err(e @ (StoreError::DigestMismatch { .. } | StoreError::SizeMismatch { .. })) => {
                    if attempt >= CORRUPT_DOWNLOAD_ATTEMPTS {
                        return Err(e.into());
                    }
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let downloaded = matches!(inserted, crate::store::Inserted::Written(_));
            progress.finish(f.path.as_str(), downloaded);
            return Ok((downloaded, if downloaded { f.size } else { 0 }));
        }
    }

    /// Resolves `requirement` and fetches the variant for this host (or every variant).
    pub fn fetch(&self, repo: &RepoId, requirement: &str, all_variants: bool, progress: &dyn Progress) -> Result<FetchReport, HubError> {
        let release = self.resolve_release(repo, requirement)?;
        let variants: Vec<&Variant> = if all_variants {
            release.manifest.variants.iter().collect()
        } else {
            vec![self.choose_variant(&release)?]
        };
        let report = self.fetch_variants(&release, &variants, progress)?;
        self.accept(&release)?;
        Ok(report)
    }

    /// Resolves, fetches what is missing, verifies and loads.
    pub fn load(&self, repo: &str, requirement: &str) -> Result<Kernel, HubError> {
        let repo: RepoId = repo.parse().map_err(|e: crate::registry::RepoIdError| {
            HubError::Registry(RegistryError::Io {
                what: e.to_string(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad repository id"),
            })
        })?;
        Ok(self.load_release(&repo, requirement)?.1)
    }

    /// As [`Hub::load`], also returning the release that was loaded (version, commit,
    /// manifest digest), for provenance.
    ///
    /// A stored file that fails verification at load time (damaged on disk since it was
    /// fetched) is moved to the store's quarantine, downloaded again and loaded again,
    /// once; offline, the error names the damaged blob and the command that repairs it.
    pub fn load_release(&self, repo: &RepoId, requirement: &str) -> Result<(ResolvedRelease, Kernel), HubError> {
        let release = self.resolve_release(repo, requirement)?;
        let variant = self.choose_variant(&release)?;
        self.fetch_files(&release, &[variant], &Quiet, false)?;
        let source = StoreSource { store: &self.store };
        let kernel = match load_from(&source, &release.manifest, &variant.id) {
            Ok(k) => k,
            Err(e) if is_damage(&e) || (self.registry.is_some() && is_unavailable(&e)) => {
                let command = format!("khub fetch {repo} --version '={}'", release.version);
                self.quarantine_damaged(variant, &release, e, &command)?;
                self.fetch_files(&release, &[variant], &Quiet, false)?;
                load_from(&source, &release.manifest, &variant.id)?
            }
            Err(e) => return Err(e.into()),
        };
        // Offline, nothing new was accepted: the index already holds the release, and the
        // rollback state advances on online evidence only.
        if self.registry.is_some() {
            self.accept(&release)?;
        }
        Ok((release, kernel))
    }

    /// After a load found a damaged stored file: re-hashes the variant's files, moving the
    /// damaged ones to quarantine. Online that is all (the caller fetches them again);
    /// offline the load cannot go on, and the error names the blob and the repair.
    fn quarantine_damaged(&self, variant: &Variant, release: &ResolvedRelease, e: LoadError, command: &str) -> Result<(), HubError> {
        let mut first = None;
        for f in &variant.files {
            if !self.store.verify_blob(&f.sha256, f.size)? && first.is_none() {
                first = Some((f, self.store.blob_path(&f.sha256)));
            }
        }
        if self.registry.is_some() {
            return Ok(());
        }
        match first {
            Some((f, blob)) => Err(HubError::DamagedBlob {
                what: format!("file `{}` of {} {}", f.path, release.repo, release.version),
                quarantined: self.store.quarantined_path(&f.sha256),
                blob,
                command: command.to_owned(),
            }),
            None => Err(e.into()),
        }
    }

    /// Locks every kernel `app` declares for each target host (`(label, facts)`), fetching
    /// the chosen variants so a locked load works offline. Existing entries for other
    /// repositories are kept.
    pub fn lock(
        &self,
        app: &crate::lock::AppKernels,
        targets: &[(String, HostFacts)],
        mut lock: Lockfile,
        progress: &dyn Progress,
    ) -> Result<Lockfile, HubError> {
        for (repo, requirement) in &app.kernels {
            let release = self.resolve_release(repo, requirement)?;
            let mut locked_targets = Vec::new();
            let mut chosen = Vec::new();
            for (label, host) in targets {
                let v = choose(&release.manifest, host, &self.options.preferences)?;
                locked_targets.push(LockedTarget {
                    host: label.clone(),
                    variant: v.id.clone(),
                    files: v.files.clone(),
                });
                chosen.push(v);
            }
            self.fetch_variants(&release, &chosen, progress)?;
            self.accept(&release)?;
            lock.upsert(LockedKernel {
                repo: repo.clone(),
                requirement: requirement.clone(),
                registry: self.options.registry.describe(),
                version: release.version.clone(),
                commit: release.commit.clone(),
                manifest_sha256: release.manifest_sha256,
                targets: locked_targets,
            });
        }
        Ok(lock)
    }

    /// Loads `repo` exactly as `lock` pins it: the manifest and files from the store, checked
    /// against the lock's digests. Makes no registry request and resolves no version; of the
    /// locked variants, the best one for this host is loaded.
    pub fn load_locked(&self, lock: &Lockfile, lock_path: &Path, repo: &RepoId) -> Result<Kernel, HubError> {
        let entry = lock.get(repo).ok_or_else(|| LockError::NotLocked {
            path: lock_path.to_owned(),
            repo: repo.clone(),
        })?;
        let fetch_cmd = format!("khub fetch {repo} --version '={}' --all-variants", entry.version);
        let bytes = self.read_blob_healing(
            &entry.manifest_sha256,
            &format!("the locked manifest of {repo} {} (sha256 {})", entry.version, entry.manifest_sha256),
            || fetch_cmd.clone(),
        )?;
        let manifest = Manifest::from_bytes(&bytes).map_err(|source| HubError::Manifest {
            repo: repo.clone(),
            commit: entry.commit.clone(),
            source,
        })?;
        // The lock's file digests must be the manifest's (the manifest is pinned by digest,
        // so this only catches a hand-edited lock).
        for t in &entry.targets {
            let v = manifest
                .variant(&t.variant)
                .ok_or_else(|| LoadError::UnknownVariant(t.variant.clone()))?;
            for f in &t.files {
                let m = v.files.iter().find(|m| m.path == f.path);
                if m.is_none_or(|m| m.sha256 != f.sha256 || m.size != f.size) {
                    return Err(HubError::LockDigestMismatch {
                        lock: lock_path.into(),
                        repo: repo.clone(),
                        path: f.path.to_string(),
                        locked: f.sha256.to_string().into(),
                        manifest: m
                            .map_or_else(|| "nothing (no such file)".to_owned(), |m| m.sha256.to_string())
                            .into(),
                    });
                }
            }
        }
        // Among the locked variants, the best one for this host: one pass, no copy of the
        // manifest, no ranking of the others.
        let locked = |v: &Variant| entry.targets.iter().any(|t| t.variant == v.id);
        let chosen = crate::resolve::choose_among(&manifest, &self.options.host, &self.options.preferences, locked).map_err(|e| {
            HubError::LockedVariantUnfit {
                lock: lock_path.into(),
                repo: repo.clone(),
                variants: {
                    // Each variant once: several target hosts often pin the same one.
                    let mut ids: Vec<&str> = Vec::new();
                    for t in &entry.targets {
                        if !ids.contains(&t.variant.as_str()) {
                            ids.push(&t.variant);
                        }
                    }
                    ids.join(", ")
                },
                why: e.to_string(),
            }
        })?;
        let variant = &manifest.variants[chosen];
        // The store is not checked for the files here: `load_from` opens each one (with
        // the same lstat checks) and a missing one comes back as `OfflineMiss` below.
        match load_from(&StoreSource { store: &self.store }, &manifest, &variant.id) {
            Err(e) if is_damage(&e) => {
                let release = ResolvedRelease {
                    repo: repo.clone(),
                    version: entry.version.clone(),
                    commit: entry.commit.clone(),
                    manifest_sha256: entry.manifest_sha256,
                    signature_sha256: None,
                    signed_by: None,
                    manifest: manifest.clone(),
                };
                // A locked load makes no registry request: report, even online.
                self.quarantine_damaged(variant, &release, e, &fetch_cmd)?;
                Err(HubError::OfflineMiss {
                    what: format!("an intact copy of {repo} {} (variant `{}`)", entry.version, variant.id),
                    store: self.store.root().to_owned(),
                    command: fetch_cmd,
                })
            }
            Err(e) if store_miss(&e).is_some() => {
                let path = store_miss(&e).map(ToString::to_string).unwrap_or_default();
                let digest = variant
                    .files
                    .iter()
                    .find(|f| f.path.as_str() == path)
                    .map_or_else(String::new, |f| format!(" (sha256 {})", f.sha256));
                Err(HubError::OfflineMiss {
                    what: format!("file `{path}`{digest} of {repo} {}", entry.version),
                    store: self.store.root().to_owned(),
                    command: fetch_cmd,
                })
            }
            other => Ok(other?),
        }
    }
}

/// The file a locked load found absent from the store (or unreadable there), if that is
/// why it failed.
///
/// Only an absent blob is a miss. Any other failure to open one (permissions, too many
/// open files, an I/O error) is reported as itself: "not in the store, run `khub fetch`"
/// would send the user to download a file that is there.
fn store_miss(e: &LoadError) -> Option<&crate::manifest::RelPath> {
    match e {
        LoadError::Verify(crate::verify::VerifyError::Unavailable { path, source, .. })
            if matches!(source.downcast_ref::<StoreError>(), Some(StoreError::Missing { .. })) =>
        {
            Some(path)
        }
        _ => None,
    }
}

/// How many times a file whose bytes arrive corrupted is downloaded before giving up.
const CORRUPT_DOWNLOAD_ATTEMPTS: u32 = 3;

/// Whether a load failed because a stored file was not there to read (moved to quarantine
/// or removed by another process meanwhile): online, fetching it again heals that too.
fn is_unavailable(e: &LoadError) -> bool {
    matches!(
        e,
        LoadError::Verify(crate::verify::VerifyError::Unavailable { .. })
            | LoadError::Release(crate::release::ReleaseError::Verify(crate::verify::VerifyError::Unavailable { .. }))
    )
}

/// Whether a load failed because a file's bytes are not the manifest's (damaged on disk),
/// as opposed to a missing file or a library that does not load.
fn is_damage(e: &LoadError) -> bool {
    let v = match e {
        LoadError::Verify(v) | LoadError::Release(crate::release::ReleaseError::Verify(v)) => v,
        _ => return false,
    };
    matches!(
        v,
        crate::verify::VerifyError::DigestMismatch { .. } | crate::verify::VerifyError::SizeMismatch { .. }
    )
}

/// Resolves `manifest` for `host`, returning the chosen variant.
fn choose<'a>(manifest: &'a Manifest, host: &HostFacts, prefs: &Preferences) -> Result<&'a Variant, HubError> {
    Ok(&manifest.variants[crate::resolve::choose(manifest, host, prefs)?])
}

/// A writer that reports progress as bytes pass through.
struct Counting<'a> {
    inner: &'a mut dyn Write,
    progress: &'a dyn Progress,
    file: &'a str,
}

impl Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.progress.advance(self.file, n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::VerifyError;

    fn unavailable(source: StoreError) -> LoadError {
        LoadError::Verify(VerifyError::Unavailable {
            what: "the store has no readable copy of",
            variant: "v".into(),
            path: crate::manifest::RelPath::new("lib/libk.so").expect("a valid path"),
            source: Box::new(source),
        })
    }

    /// A locked load calls a file "not in the store" only when the store says it is
    /// absent; an error opening a blob that is there keeps its own cause.
    #[test]
    fn only_an_absent_blob_is_a_store_miss() {
        let d = crate::verify::sha256(b"x");
        let missing = unavailable(StoreError::Missing {
            digest: d,
            path: PathBuf::from("/store/blobs/2d/x"),
        });
        assert_eq!(store_miss(&missing).map(ToString::to_string).as_deref(), Some("lib/libk.so"));
        let denied = unavailable(StoreError::Io {
            what: "cannot open",
            path: PathBuf::from("/store/blobs/2d/x"),
            source: std::io::ErrorKind::PermissionDenied.into(),
        });
        assert!(store_miss(&denied).is_none());
        assert!(denied.to_string().contains("cannot open"), "{denied}");
    }
}
