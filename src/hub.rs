//! The front door: `Hub::from_env()?.load("org/name", "^1.2")?`.
//!
//! A [`Hub`] ties the pieces together: host facts, a registry, the store and the
//! resolver. Its jobs, and the network traffic each makes:
//!
//! - [`Hub::resolve_release`]: refs (one request), then the manifest at the chosen commit
//!   (one file download, skipped when the store already holds it).
//! - [`Hub::fetch`]: the above, then only the chosen variant's files, downloaded in
//!   parallel and streamed through SHA-256 into the store; files already in the store are
//!   not downloaded again.
//! - [`Hub::load`]: fetch, then verify and load from the store.
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
use crate::resolve::{NoVariantFits, Preferences, resolve};
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
    /// A file's digest in the lock differs from the locked manifest's.
    #[error("khub.lock pins `{path}` of {repo} to sha256 {locked}, but the locked manifest says {manifest}; run `khub lock` again")]
    LockDigestMismatch {
        /// The repository.
        repo: RepoId,
        /// The file.
        path: String,
        /// The lock's digest, hex.
        locked: String,
        /// The manifest's digest, hex.
        manifest: String,
    },
    /// None of the locked variants runs on this host.
    #[error(
        "none of the variants khub.lock pins for {repo} ({variants}) runs on this host: {why}; lock for this host with `khub lock --host …`"
    )]
    LockedVariantUnfit {
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
            RegistrySpec::Dir(d) => d.display().to_string(),
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
    /// The manifest.
    pub manifest: Manifest,
}

/// What a fetch did.
#[derive(Debug, Clone, Serialize)]
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
        let selected = select(&refs, &req).ok_or_else(|| {
            let mut have: Vec<String> = crate::version::releases(&refs).iter().map(|(v, _, _)| v.to_string()).collect();
            if have.is_empty() {
                have.push("no releases".into());
            }
            if self.registry.is_none() {
                HubError::OfflineMiss {
                    what: format!("a release of {repo} matching `{requirement}` (known here: {})", have.join(", ")),
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
        // The manifest and its signature: from the store if a previous fetch of this commit
        // stored them, else from the registry.
        let cached = known.releases.values().find(|k| k.commit == commit).cloned();
        let from_store = cached.as_ref().and_then(|k| {
            let bytes = read_blob(&self.store, &k.manifest_sha256).ok()?;
            let sig = match &k.signature_sha256 {
                Some(d) => Some(read_blob(&self.store, d).ok()?),
                None => None,
            };
            Some((bytes, sig))
        });
        let (bytes, signature) = match from_store {
            Some(found) => found,
            None => {
                let reg = self.registry.as_deref().ok_or_else(|| HubError::OfflineMiss {
                    what: format!("the manifest of {repo} at {commit}"),
                    store: self.store.root().to_owned(),
                    command: format!("khub fetch {repo} --version '{requirement}'"),
                })?;
                (reg.manifest(repo, &commit)?, reg.signature(repo, &commit)?)
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
        self.options.trust.check(repo, &version, &bytes, signature.as_deref(), now)?;
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
        // Rollback: never go below the highest version seen under the same requirement.
        if let Some(dir) = &self.options.state_dir {
            let state = crate::verify::trust::RollbackState::open(dir)?;
            state.check(&self.options.trust, repo, &req, &manifest.kernel.version)?;
            state.record(repo, &manifest.kernel.version)?;
        }
        let digest = self.store.insert_bytes("khub.toml", &bytes)?;
        let sig_digest = match &signature {
            Some(sig) => Some(self.store.insert_bytes(crate::registry::SIGNATURE_FILE, sig)?),
            None => None,
        };
        self.remember(repo, &manifest.kernel.version, &commit, digest, sig_digest)?;
        Ok(ResolvedRelease {
            repo: repo.clone(),
            version: manifest.kernel.version.clone(),
            commit,
            manifest_sha256: digest,
            manifest,
        })
    }

    /// The variant of `release` for this host.
    pub fn choose_variant<'a>(&self, release: &'a ResolvedRelease) -> Result<&'a Variant, HubError> {
        choose(&release.manifest, &self.options.host, &self.options.preferences)
    }

    /// Downloads `variants` of `release` into the store (files already there are skipped),
    /// in parallel, each streamed through SHA-256.
    pub fn fetch_variants(
        &self,
        release: &ResolvedRelease,
        variants: &[&Variant],
        progress: &dyn Progress,
    ) -> Result<FetchReport, HubError> {
        let mut wanted: BTreeMap<Sha256Digest, &crate::manifest::FileEntry> = BTreeMap::new();
        for v in variants {
            for f in &v.files {
                wanted.entry(f.sha256).or_insert(f);
            }
        }
        let (present, missing): (Vec<&crate::manifest::FileEntry>, Vec<&crate::manifest::FileEntry>) =
            wanted.values().copied().partition(|f| self.store.contains(&f.sha256, f.size));
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
            handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
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

    fn fetch_one(
        &self,
        registry: &dyn Registry,
        release: &ResolvedRelease,
        f: &crate::manifest::FileEntry,
        progress: &dyn Progress,
    ) -> Result<(bool, u64), HubError> {
        progress.start(f.path.as_str(), f.size);
        let mut fill = |w: &mut dyn Write| -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
            let mut counting = Counting {
                inner: w,
                progress,
                file: f.path.as_str(),
            };
            Ok(registry.fetch(&release.repo, &release.commit, &f.path, f.size, &mut counting)?)
        };
        let inserted = self.store.insert_with(f.path.as_str(), &f.sha256, f.size, &mut fill)?;
        let downloaded = matches!(inserted, crate::store::Inserted::Written(_));
        progress.finish(f.path.as_str(), downloaded);
        Ok((downloaded, if downloaded { f.size } else { 0 }))
    }

    /// Resolves `requirement` and fetches the variant for this host (or every variant).
    pub fn fetch(&self, repo: &RepoId, requirement: &str, all_variants: bool, progress: &dyn Progress) -> Result<FetchReport, HubError> {
        let release = self.resolve_release(repo, requirement)?;
        let variants: Vec<&Variant> = if all_variants {
            release.manifest.variants.iter().collect()
        } else {
            vec![self.choose_variant(&release)?]
        };
        self.fetch_variants(&release, &variants, progress)
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
    pub fn load_release(&self, repo: &RepoId, requirement: &str) -> Result<(ResolvedRelease, Kernel), HubError> {
        let release = self.resolve_release(repo, requirement)?;
        let variant = self.choose_variant(&release)?;
        self.fetch_variants(&release, &[variant], &Quiet)?;
        let kernel = load_from(&StoreSource { store: &self.store }, &release.manifest, &variant.id)?;
        Ok((release, kernel))
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
        let bytes = read_blob(&self.store, &entry.manifest_sha256).map_err(|_| HubError::OfflineMiss {
            what: format!("the locked manifest of {repo} {} (sha256 {})", entry.version, entry.manifest_sha256),
            store: self.store.root().to_owned(),
            command: fetch_cmd.clone(),
        })?;
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
                        repo: repo.clone(),
                        path: f.path.to_string(),
                        locked: f.sha256.to_string(),
                        manifest: m.map_or_else(|| "nothing (no such file)".to_owned(), |m| m.sha256.to_string()),
                    });
                }
            }
        }
        // Among the locked variants, the best one for this host.
        let locked: Vec<&str> = entry.targets.iter().map(|t| t.variant.as_str()).collect();
        let mut restricted = manifest.clone();
        restricted.variants.retain(|v| locked.contains(&v.id.as_str()));
        let resolution = resolve(&restricted, &self.options.host, &self.options.preferences);
        let chosen = resolution.chosen(&self.options.host).map_err(|e| HubError::LockedVariantUnfit {
            repo: repo.clone(),
            variants: locked.join(", "),
            why: e.to_string(),
        })?;
        let variant = manifest
            .variant(&chosen.id)
            .ok_or_else(|| LoadError::UnknownVariant(chosen.id.clone()))?;
        for f in &variant.files {
            if !self.store.contains(&f.sha256, f.size) {
                return Err(HubError::OfflineMiss {
                    what: format!("file `{}` (sha256 {}) of {repo} {}", f.path, f.sha256, entry.version),
                    store: self.store.root().to_owned(),
                    command: fetch_cmd,
                });
            }
        }
        Ok(load_from(&StoreSource { store: &self.store }, &manifest, &variant.id)?)
    }
}

/// Resolves `manifest` for `host`, returning the chosen variant.
fn choose<'a>(manifest: &'a Manifest, host: &HostFacts, prefs: &Preferences) -> Result<&'a Variant, HubError> {
    let r = resolve(manifest, host, prefs);
    let c = r.chosen(host)?;
    Ok(&manifest.variants[c.index])
}

/// Reads a whole blob (a manifest) from the store, checking its digest.
fn read_blob(store: &Store, d: &Sha256Digest) -> Result<Vec<u8>, HubError> {
    let mut f = store.open_blob(d)?;
    let mut buf = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(&mut f, crate::manifest::MAX_MANIFEST_BYTES as u64 + 1),
        &mut buf,
    )
    .map_err(|source| HubError::Io {
        what: "cannot read",
        path: store.blob_path(d),
        source,
    })?;
    if crate::verify::sha256(&buf) != *d {
        return Err(HubError::Store(StoreError::DigestMismatch {
            path: "khub.toml".into(),
            expected: *d,
            actual: crate::verify::sha256(&buf),
        }));
    }
    Ok(buf)
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
