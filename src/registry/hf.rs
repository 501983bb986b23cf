//! A Hugging Face Hub (or any Hub-compatible server, such as `khub serve`) as a registry,
//! through `hf-hub` 1.0.
//!
//! Design notes:
//! - Endpoint, token and repository type are resolved by khub ([`HubConfig::from_env`])
//!   and passed to hf-hub explicitly: hf-hub's next version stops reading environment
//!   variables, and khub's own variables must win anyway.
//! - hf-hub sets no timeout and retries on its own schedule. khub gives it a reqwest client
//!   with connect and read timeouts, turns hf-hub's retries off, and retries itself: a
//!   bounded number of attempts with exponential backoff on transport errors and 5xx, and
//!   `Retry-After` honoured on 429 (capped at [`MAX_RETRY_AFTER`]).
//! - Requests per operation: `refs` is one GET; a file (the manifest included) is a HEAD
//!   (hf-hub checks for Xet storage) and a GET, streamed. None of this depends on how many
//!   variants a release holds.
//! - Files are streamed chunk by chunk into the caller's sink (the store, which hashes as
//!   it writes); nothing is buffered whole, and hf-hub's own cache is not used.

use std::io::Write;
use std::time::Duration;

use futures_util::StreamExt;
use hf_hub::{HFClient, HFError, HFRepository, RepoType};

use super::{GitRef, Refs, Registry, RegistryError, RepoId};
use crate::env::Environment;
use crate::manifest::RelPath;

/// The public Hugging Face Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The longest `Retry-After` khub waits for before giving up.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Which Hub repository type kernels live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HubRepoType {
    /// `kernel` repositories (`/api/kernels/…`, `/kernels/<id>/resolve/…`).
    #[default]
    Kernel,
    /// `model` repositories (`/api/models/…`), where older kernels live.
    Model,
}

/// How to reach a Hub.
#[derive(Clone, Default)]
pub struct HubConfig {
    /// The endpoint URL, without a trailing slash.
    pub endpoint: String,
    /// The bearer token, if any.
    pub token: Option<String>,
    /// The repository type.
    pub repo_type: HubRepoType,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Timeout for each read (a stalled transfer fails after this).
    pub read_timeout: Duration,
    /// Attempts per request, the first included.
    pub attempts: u32,
    /// The base delay of the exponential backoff.
    pub backoff: Duration,
}

impl std::fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConfig")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("repo_type", &self.repo_type)
            .finish_non_exhaustive()
    }
}

impl HubConfig {
    /// The configuration for `endpoint` with khub's defaults.
    pub fn new(endpoint: &str) -> Self {
        HubConfig {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            token: None,
            repo_type: HubRepoType::Kernel,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            attempts: 4,
            backoff: Duration::from_millis(250),
        }
    }

    /// Resolves the configuration from the environment snapshot, in this order:
    /// - endpoint: `explicit`, `KHUB_REGISTRY` (when a URL), `HF_ENDPOINT`, the public Hub;
    /// - token: `KHUB_TOKEN`, `HF_TOKEN`, the file at `HF_TOKEN_PATH`, `$HF_HOME/token`
    ///   (`HF_HOME` defaults to `$XDG_CACHE_HOME/huggingface`, then
    ///   `$HOME/.cache/huggingface`);
    /// - repository type: `KHUB_REPO_TYPE` (`kernel` or `model`; default `kernel`);
    /// - `KHUB_HTTP_TIMEOUT` (seconds, read timeout) and `KHUB_HTTP_RETRIES` (attempts).
    pub fn from_env(env: &Environment, explicit: Option<&str>) -> Result<Self, RegistryError> {
        use crate::env as vars;
        let endpoint = explicit
            .map(str::to_owned)
            .or_else(|| env.get(vars::KHUB_REGISTRY).filter(|r| r.contains("://")).map(str::to_owned))
            .or_else(|| env.get(vars::HF_ENDPOINT).map(str::to_owned))
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
        let mut c = HubConfig::new(&endpoint);
        c.token = env
            .get(vars::KHUB_TOKEN)
            .or_else(|| env.get(vars::HF_TOKEN))
            .map(|t| t.trim().to_owned());
        if c.token.is_none() {
            let path = env
                .get(vars::HF_TOKEN_PATH)
                .map(std::path::PathBuf::from)
                .or_else(|| hf_home(env).map(|h| h.join("token")));
            if let Some(p) = path {
                c.token = std::fs::read_to_string(p)
                    .ok()
                    .map(|t| t.trim().to_owned())
                    .filter(|t| !t.is_empty());
            }
        }
        c.repo_type = match env.get(vars::KHUB_REPO_TYPE) {
            None | Some("kernel") | Some("kernels") => HubRepoType::Kernel,
            Some("model") | Some("models") => HubRepoType::Model,
            Some(other) => return Err(bad_env(vars::KHUB_REPO_TYPE, other, "kernel or model")),
        };
        if let Some(v) = env.get(vars::KHUB_HTTP_TIMEOUT) {
            let s: f64 = v
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite() && *s > 0.0 && *s <= 3600.0)
                .ok_or_else(|| bad_env(vars::KHUB_HTTP_TIMEOUT, v, "seconds, 0 to 3600"))?;
            c.read_timeout = Duration::from_secs_f64(s);
        }
        if let Some(v) = env.get(vars::KHUB_HTTP_RETRIES) {
            let n: u32 = v
                .parse()
                .ok()
                .filter(|n| *n <= 20)
                .ok_or_else(|| bad_env(vars::KHUB_HTTP_RETRIES, v, "a number of retries, 0 to 20"))?;
            c.attempts = n + 1;
        }
        Ok(c)
    }
}

fn bad_env(var: &str, value: &str, expected: &str) -> RegistryError {
    RegistryError::Io {
        what: format!("environment variable {var}=`{value}` is not valid: expected {expected}"),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "invalid value"),
    }
}

/// `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `$HOME/.cache/huggingface`.
pub fn hf_home(env: &Environment) -> Option<std::path::PathBuf> {
    use crate::env as vars;
    env.get(vars::HF_HOME)
        .map(std::path::PathBuf::from)
        .or_else(|| env.get(vars::XDG_CACHE_HOME).map(|x| std::path::Path::new(x).join("huggingface")))
        .or_else(|| env.get(vars::HOME).map(|h| std::path::Path::new(h).join(".cache/huggingface")))
}

/// A Hub-compatible registry.
pub struct HubRegistry {
    config: HubConfig,
    client: HFClient,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for HubRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubRegistry").field("config", &self.config).finish_non_exhaustive()
    }
}

impl HubRegistry {
    /// A client for `config`. Makes no request.
    pub fn new(config: HubConfig) -> Result<Self, RegistryError> {
        let transport = |e: &dyn std::fmt::Display| RegistryError::Transport {
            registry: config.endpoint.clone(),
            message: e.to_string(),
        };
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.read_timeout)
            .build()
            .map_err(|e| transport(&e))?;
        let mut builder = HFClient::builder()
            .endpoint(config.endpoint.clone())
            .client(http)
            .cache_enabled(false)
            .retry_max_attempts(0);
        if let Some(t) = &config.token {
            builder = builder.token(t.clone());
        }
        let client = builder.build().map_err(|e| transport(&e))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("khub-hub")
            .enable_all()
            .build()
            .map_err(|e| transport(&e))?;
        Ok(HubRegistry { config, client, runtime })
    }

    /// The configuration.
    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    fn map_err(&self, repo: &RepoId, e: HFError, what: &str) -> RegistryError {
        let registry = self.describe();
        match e {
            HFError::RepoNotFound { .. } => RegistryError::RepoNotFound {
                repo: repo.clone(),
                registry,
            },
            HFError::RevisionNotFound { revision, .. } => RegistryError::NotFound {
                repo: repo.clone(),
                registry,
                what: format!("revision {revision}"),
            },
            HFError::EntryNotFound { path, .. } => RegistryError::NotFound {
                repo: repo.clone(),
                registry,
                what: format!("file `{path}`"),
            },
            HFError::AuthRequired { .. } | HFError::Forbidden { .. } => RegistryError::Unauthorized {
                repo: repo.clone(),
                registry,
                message: format!("{what}: {e}"),
            },
            HFError::RateLimited { retry_after, .. } => RegistryError::RateLimited {
                registry,
                retry_after: retry_after.map(|d| d.as_secs()),
            },
            other => RegistryError::Transport {
                registry,
                message: format!("{what}: {other}"),
            },
        }
    }

    /// Runs `op` with khub's retry policy: transport errors and 5xx back off
    /// exponentially, 429 waits for `Retry-After`, anything else fails at once.
    fn retrying<T, F, Fut>(&self, op: F) -> Result<T, HFError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, HFError>>,
    {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let result = self.runtime.block_on(op());
            let wait = match &result {
                Ok(_) => return result,
                Err(HFError::RateLimited { retry_after, .. }) => {
                    retry_after.unwrap_or(self.config.backoff * 2u32.pow(attempt)).min(MAX_RETRY_AFTER)
                }
                Err(HFError::Request { .. }) => self.config.backoff * 2u32.pow(attempt - 1),
                Err(HFError::Http { context }) if context.status.is_server_error() => self.config.backoff * 2u32.pow(attempt - 1),
                Err(_) => return result,
            };
            if attempt >= self.config.attempts {
                return result;
            }
            std::thread::sleep(wait);
        }
    }

    fn refs_of<T: RepoType>(&self, repo: &RepoId, handle: HFRepository<T>) -> Result<Refs, RegistryError> {
        let refs = self
            .retrying(|| handle.list_refs().send())
            .map_err(|e| self.map_err(repo, e, "listing refs"))?;
        let conv = |v: Vec<hf_hub::repository::GitRefInfo>| {
            v.into_iter()
                .map(|r| GitRef {
                    name: r.name,
                    commit: r.target_commit,
                })
                .collect()
        };
        Ok(Refs {
            tags: conv(refs.tags),
            branches: conv(refs.branches),
        })
    }

    fn fetch_of<T: RepoType>(
        &self,
        repo: &RepoId,
        handle: HFRepository<T>,
        commit: &str,
        path: &str,
        limit: u64,
        sink: &mut dyn Write,
    ) -> Result<u64, RegistryError> {
        let registry = self.describe();
        let (len, mut stream) = self
            .retrying(|| {
                handle
                    .download_file_stream()
                    .filename(path.to_owned())
                    .revision(commit.to_owned())
                    .send()
            })
            .map_err(|e| self.map_err(repo, e, &format!("downloading `{path}`")))?;
        if len.is_some_and(|l| l > limit) {
            return Err(RegistryError::TooLarge {
                registry,
                what: format!("`{path}`"),
                limit,
            });
        }
        let mut n = 0u64;
        self.runtime.block_on(async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| RegistryError::Transport {
                    registry: registry.clone(),
                    message: format!("downloading `{path}`: {e}"),
                })?;
                n += chunk.len() as u64;
                if n > limit {
                    return Err(RegistryError::TooLarge {
                        registry: registry.clone(),
                        what: format!("`{path}`"),
                        limit,
                    });
                }
                sink.write_all(&chunk).map_err(|source| RegistryError::Io {
                    what: format!("storing `{path}`"),
                    source,
                })?;
            }
            Ok(n)
        })
    }
}

/// What a publish did on the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The commit created.
    pub commit: String,
    /// The tag created.
    pub tag: String,
    /// The branches that now point at the commit.
    pub branches: Vec<String>,
    /// Whether the repository was created.
    pub created: bool,
}

impl HubRegistry {
    /// Publishes a release: creates the repository when `create` is set, refuses an
    /// existing tag `v<version>`, commits every file in one commit to `main`, tags it
    /// `v<version>`, and points the branch `v<major>` at it (creating or moving it). The
    /// same calls Hugging Face's kernel-builder makes; `khub serve` derives the refs itself
    /// and accepts them when consistent.
    pub fn publish(
        &self,
        repo: &RepoId,
        version: &semver::Version,
        files: &[(String, std::path::PathBuf)],
        create: bool,
    ) -> Result<Published, RegistryError> {
        match self.config.repo_type {
            HubRepoType::Kernel => self.publish_of(
                repo,
                hf_hub::RepoTypeKernel,
                self.client.kernel(repo.org(), repo.name()),
                version,
                files,
                create,
            ),
            HubRepoType::Model => self.publish_of(
                repo,
                hf_hub::RepoTypeModel,
                self.client.model(repo.org(), repo.name()),
                version,
                files,
                create,
            ),
        }
    }

    fn publish_of<T: RepoType>(
        &self,
        repo: &RepoId,
        repo_type: T,
        handle: HFRepository<T>,
        version: &semver::Version,
        files: &[(String, std::path::PathBuf)],
        create: bool,
    ) -> Result<Published, RegistryError> {
        let tag = format!("v{version}");
        let mut created = false;
        if create {
            let id = repo.to_string();
            self.retrying(|| {
                self.client
                    .create_repository()
                    .repo_id(&id)
                    .repo_type(repo_type)
                    .exist_ok(true)
                    .send()
            })
            .map_err(|e| self.map_err(repo, e, "creating the repository"))?;
            created = true;
        }
        let refs = self.refs_of(repo, handle.clone())?;
        if let Some(t) = refs.tags.iter().find(|t| t.name == tag) {
            return Err(RegistryError::Transport {
                registry: self.describe(),
                message: format!(
                    "{repo} already has {tag} (commit {}); releases are immutable: bump the version to publish again",
                    t.commit
                ),
            });
        }
        let operations: Vec<hf_hub::repository::CommitOperation> = files
            .iter()
            .map(|(path, local)| hf_hub::repository::CommitOperation::Add {
                path_in_repo: path.clone(),
                source: hf_hub::repository::AddSource::File(local.clone()),
            })
            .collect();
        let info = self
            .runtime
            .block_on(
                handle
                    .create_commit()
                    .operations(operations)
                    .commit_message(format!("Release {tag}"))
                    .revision("main".to_owned())
                    .send(),
            )
            .map_err(|e| self.map_err(repo, e, "committing the release"))?;
        let commit = info.commit_oid.ok_or_else(|| RegistryError::Transport {
            registry: self.describe(),
            message: "the commit response carried no commit id".into(),
        })?;
        self.retrying(|| {
            handle
                .create_tag()
                .tag(&tag)
                .revision(&commit)
                .message(format!("khub release {tag}"))
                .send()
        })
        .map_err(|e| self.map_err(repo, e, &format!("tagging {tag}")))?;
        // Point v<major> at the release: create it, or move it (delete + create) on a Hub
        // where it exists elsewhere. A server that derives its branches accepts the create.
        let major = format!("v{}", version.major);
        let current = refs.branches.iter().find(|b| b.name == major).map(|b| b.commit.clone());
        if current.as_deref() != Some(commit.as_str()) {
            let created_branch = self.retrying(|| handle.create_branch().branch(&major).revision(commit.clone()).send());
            if created_branch.is_err() && current.is_some() {
                let _ = self.retrying(|| handle.delete_branch().branch(&major).send());
                let _ = self.retrying(|| handle.create_branch().branch(&major).revision(commit.clone()).send());
            }
        }
        let after = self.refs_of(repo, handle)?;
        let branches = after
            .branches
            .iter()
            .filter(|b| b.commit == commit)
            .map(|b| b.name.clone())
            .collect();
        Ok(Published {
            commit,
            tag,
            branches,
            created,
        })
    }
}

impl Registry for HubRegistry {
    fn describe(&self) -> String {
        self.config.endpoint.clone()
    }

    fn refs(&self, repo: &RepoId) -> Result<Refs, RegistryError> {
        match self.config.repo_type {
            HubRepoType::Kernel => self.refs_of(repo, self.client.kernel(repo.org(), repo.name())),
            HubRepoType::Model => self.refs_of(repo, self.client.model(repo.org(), repo.name())),
        }
    }

    fn manifest(&self, repo: &RepoId, commit: &str) -> Result<Vec<u8>, RegistryError> {
        let mut buf = Vec::new();
        let path = RelPath::new("khub.toml").map_err(|e| RegistryError::Io {
            what: "khub.toml".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        self.fetch(repo, commit, &path, super::MAX_MANIFEST_BYTES, &mut buf)?;
        Ok(buf)
    }

    fn fetch(&self, repo: &RepoId, commit: &str, path: &RelPath, limit: u64, sink: &mut dyn Write) -> Result<u64, RegistryError> {
        match self.config.repo_type {
            HubRepoType::Kernel => self.fetch_of(
                repo,
                self.client.kernel(repo.org(), repo.name()),
                commit,
                path.as_str(),
                limit,
                sink,
            ),
            HubRepoType::Model => self.fetch_of(repo, self.client.model(repo.org(), repo.name()), commit, path.as_str(), limit, sink),
        }
    }
}
