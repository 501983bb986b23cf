//! A Hugging Face Hub (or any Hub-compatible server, such as `khub serve`) as a registry,
//! through `hf-hub` 1.0 for the API and reqwest for file downloads.
//!
//! Design notes:
//! - Endpoint, token and repository type are resolved by khub ([`HubConfig::from_env`])
//!   and passed to hf-hub explicitly: hf-hub's next version stops reading environment
//!   variables, and khub's own variables must win anyway.
//! - hf-hub sets no timeout and retries on its own schedule. khub gives it a reqwest client
//!   with connect and read timeouts, turns hf-hub's retries off, and retries itself: a
//!   bounded number of attempts with exponential backoff on transport errors and 5xx, and
//!   `Retry-After` honoured on 429 (capped at [`MAX_RETRY_AFTER`]).
//! - Files (the manifest and its signature included) are downloaded with reqwest directly,
//!   `GET {endpoint}/[kernels/]{org}/{name}/resolve/{commit}/{path}`, with the same token.
//!   hf-hub 1.0's `download_file_stream` takes a byte range, but it returns only a length
//!   and a byte stream: not the status (was the range honoured, `206`, or ignored, `200`?),
//!   nor `Content-Range`, nor the `ETag` / `X-Linked-Etag` / `X-Linked-Size` headers that
//!   say what the file is. A download that resumes, and a manifest checked against the
//!   digest the registry reports, need all of them. (It also sends a HEAD before every GET
//!   to look for Xet storage; the Hub serves Xet-stored files to plain clients through a
//!   redirect from the same URL.) Redirects are followed by hand, at most
//!   [`MAX_REDIRECTS`], so the `X-Linked-*` headers of the Hub's redirect are seen, and the
//!   token is sent only to the endpoint's own origin.
//! - Downloads finish ([`HubRegistry::fetch`]): an attempt that fails mid-body (reset,
//!   early close, a read that stalls past the read timeout, a body shorter or longer than
//!   declared) is retried within the same bounded attempts. The next attempt asks for
//!   `Range: bytes=N-`, N being the bytes already written to the sink; a `206` whose
//!   `Content-Range` starts at N continues the file, a `200` (the server ignored the range)
//!   is read from the start and its first N bytes are skipped, since the sink (the store's
//!   hashing writer) cannot be rewound. An attempt that moved the download forward before
//!   it failed does not count against the attempts, up to as many again. The store still checks the size and the SHA-256 of
//!   the whole file against the manifest; a resumed download that went wrong is refused
//!   there.
//! - The manifest and its signature are checked against the digest the registry reports
//!   for them before they are returned: `X-Linked-Etag`, else `ETag`, when it is a SHA-256
//!   (64 hex digits, what `khub serve` and the Hub's LFS files report). The Hub reports a
//!   git blob id (40 hex digits, SHA-1) for small files: no SHA-1 implementation is in
//!   khub's dependency tree, so that one is not checked. A mismatch is retried from
//!   scratch (these are buffered, not streamed) within the same attempts.
//! - Requests per operation: `refs` is one GET; a file (the manifest included) is one GET,
//!   plus one per retry. None of this depends on how many variants a release holds.
//! - Files are streamed chunk by chunk into the caller's sink (the store, which hashes as
//!   it writes); nothing is buffered whole, and hf-hub's own cache is not used.

use std::io::Write;
use std::time::Duration;

use hf_hub::{HFClient, HFError, HFRepository, RepoType};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, ETAG, HeaderMap, LOCATION, RANGE, RETRY_AFTER};

use super::{GitRef, Refs, Registry, RegistryError, RepoId};
use crate::env::Environment;
use crate::manifest::RelPath;

/// The public Hugging Face Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The longest `Retry-After` khub waits for before giving up.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// The most redirects a file download follows.
pub const MAX_REDIRECTS: usize = 10;
/// The largest signature file (`khub.toml.minisig`) a registry may return.
const MAX_SIGNATURE_BYTES: u64 = 64 * 1024;

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
    /// Attempts per request, the first included. For a file every GET counts, resumed ones
    /// included, except one that moved the download forward before it failed (up to as
    /// many again); a manifest whose digest did not match counts too.
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
///
/// The HTTP clients and the tokio runtime are built on the first request, not in
/// [`HubRegistry::new`]: a hub that never asks the registry anything (a locked load from a
/// filled store) does not pay for TLS roots, connection pools and worker threads.
pub struct HubRegistry {
    config: HubConfig,
    clients: std::sync::OnceLock<Clients>,
}

/// What talking to the registry needs, built once on first use.
struct Clients {
    client: HFClient,
    /// File downloads: the same timeouts, redirects followed by hand.
    http: reqwest::Client,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for HubRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubRegistry").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Clients {
    fn build(config: &HubConfig) -> Result<Self, RegistryError> {
        let transport = |e: &dyn std::fmt::Display| RegistryError::Transport {
            registry: config.endpoint.clone(),
            message: e.to_string(),
        };
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.read_timeout)
            .build()
            .map_err(|e| transport(&e))?;
        let downloads = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.read_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("khub/", env!("CARGO_PKG_VERSION")))
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
        Ok(Clients {
            client,
            http: downloads,
            runtime,
        })
    }
}

impl HubRegistry {
    /// A client for `config`. Makes no request, and builds no HTTP client or runtime yet
    /// (the first request does).
    pub fn new(config: HubConfig) -> Result<Self, RegistryError> {
        Ok(HubRegistry {
            config,
            clients: std::sync::OnceLock::new(),
        })
    }

    /// The HTTP clients and runtime, built on first use. Two threads racing here may both
    /// build; one set is kept and the other dropped.
    fn clients(&self) -> Result<&Clients, RegistryError> {
        if let Some(c) = self.clients.get() {
            return Ok(c);
        }
        let built = Clients::build(&self.config)?;
        Ok(self.clients.get_or_init(|| built))
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
                access: if what.starts_with("listing") || what.starts_with("downloading") {
                    "read"
                } else {
                    "write"
                },
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
                message: format!("{what}: {}", with_root_cause(&other)),
            },
        }
    }

    /// Runs `op` with khub's retry policy: transport errors and 5xx back off
    /// exponentially, 429 waits for `Retry-After`, anything else fails at once.
    fn retrying<T, F, Fut>(&self, runtime: &tokio::runtime::Runtime, op: F) -> Result<T, HFError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, HFError>>,
    {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let result = runtime.block_on(op());
            // Exponential, saturating, and never longer than MAX_RETRY_AFTER whatever the
            // attempt count (a caller may configure many).
            let backoff = |shift: u32| self.config.backoff.saturating_mul(2u32.saturating_pow(shift)).min(MAX_RETRY_AFTER);
            let wait = match &result {
                Ok(_) => return result,
                Err(HFError::RateLimited { retry_after, .. }) => retry_after.unwrap_or_else(|| backoff(attempt)).min(MAX_RETRY_AFTER),
                Err(HFError::Request { .. }) => backoff(attempt - 1),
                Err(HFError::Http { context }) if context.status.is_server_error() => backoff(attempt - 1),
                Err(_) => return result,
            };
            if attempt >= self.config.attempts {
                return result;
            }
            std::thread::sleep(wait);
        }
    }

    /// What an answer's status means when every request reads it alike: 429 is retried
    /// after `Retry-After`, a 5xx is retried, 401/403 say a token is needed. `None` for
    /// the statuses each request handles itself. `what` begins the messages.
    fn status_failure(&self, repo: &RepoId, status: StatusCode, headers: &HeaderMap, what: &str) -> Option<Failed> {
        let registry = self.describe();
        match status {
            StatusCode::TOO_MANY_REQUESTS => {
                let wait = retry_after(headers);
                Some(Failed::Retry(
                    RegistryError::RateLimited {
                        registry,
                        retry_after: wait.map(|d| d.as_secs()),
                    },
                    wait,
                ))
            }
            s if s.is_server_error() => Some(Failed::Retry(
                RegistryError::Transport {
                    registry,
                    message: format!("{what}: HTTP {s}"),
                },
                None,
            )),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Some(Failed::Fatal(RegistryError::Unauthorized {
                access: "read",
                repo: repo.clone(),
                registry,
                message: format!("{what}: HTTP {status}"),
            })),
            _ => None,
        }
    }

    /// `{endpoint}/api/{kernels|models}/{org}/{name}/refs`.
    fn refs_url(&self, repo: &RepoId) -> Result<reqwest::Url, RegistryError> {
        let bad = |message: String| RegistryError::Transport {
            registry: self.describe(),
            message,
        };
        let mut url = reqwest::Url::parse(&self.config.endpoint).map_err(|e| bad(format!("not a valid URL: {e}")))?;
        {
            let mut segments = url.path_segments_mut().map_err(|()| bad("not a URL that can take a path".into()))?;
            segments.pop_if_empty();
            let kind = match self.config.repo_type {
                HubRepoType::Kernel => "kernels",
                HubRepoType::Model => "models",
            };
            segments.push("api").push(kind).push(repo.org()).push(repo.name()).push("refs");
        }
        Ok(url)
    }

    /// One request for the refs, with khub's own HTTP client (as for files) rather than
    /// hf-hub's, so that the answer is read within [`MAX_REFS_BYTES`]: hf-hub reads a
    /// body of any length into memory, and a hostile registry could send an endless one.
    async fn refs_once(&self, repo: &RepoId, url: &reqwest::Url) -> Result<Refs, Failed> {
        let registry = self.describe();
        let transport = |message: String| RegistryError::Transport {
            registry: self.describe(),
            message,
        };
        let Answer { mut response, .. } = self.get(url, None).await?;
        let status = response.status();
        let what = format!("listing the refs of {repo}");
        if let Some(failed) = self.status_failure(repo, status, response.headers(), &what) {
            return Err(failed);
        }
        match status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => {
                return Err(Failed::Fatal(RegistryError::RepoNotFound {
                    repo: repo.clone(),
                    registry,
                }));
            }
            s => return Err(Failed::Fatal(transport(format!("listing the refs of {repo}: unexpected HTTP {s}")))),
        }
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_REFS_BYTES {
                        return Err(Failed::Fatal(RegistryError::TooLarge {
                            registry,
                            what: format!("the refs of {repo}"),
                            limit: MAX_REFS_BYTES as u64,
                        }));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(Failed::Retry(
                        transport(format!("listing the refs of {repo}: {}", error_chain(&e))),
                        None,
                    ));
                }
            }
        }
        let parsed: RefsAnswer = serde_json::from_slice(&body)
            .map_err(|e| Failed::Fatal(transport(format!("the refs of {repo} are not the Hub's refs JSON: {e}"))))?;
        // Releases are pinned by full commit id: a ref whose target is anything else (a
        // branch name, `..`, an abbreviation) could move, would be sent as a URL path
        // segment, and would make a lockfile khub cannot read back.
        let conv = |v: Vec<RefAnswer>| -> Result<Vec<GitRef>, String> {
            v.into_iter()
                .map(|r| {
                    if !is_commit_id(&r.target_commit) {
                        return Err(format!(
                            "the refs of {repo} name `{}` as the commit of `{}`; a registry must answer with a full commit id (40 hex digits)",
                            r.target_commit.chars().take(80).collect::<String>().escape_default(),
                            r.name.chars().take(80).collect::<String>().escape_default()
                        ));
                    }
                    Ok(GitRef {
                        name: r.name,
                        commit: r.target_commit,
                    })
                })
                .collect()
        };
        let bad = |message: String| Failed::Fatal(transport(message));
        Ok(Refs {
            tags: conv(parsed.tags).map_err(bad)?,
            branches: conv(parsed.branches).map_err(bad)?,
        })
    }
}

/// The Hub's answer to `GET /api/…/refs` (the fields khub reads).
#[derive(serde::Deserialize)]
struct RefsAnswer {
    #[serde(default)]
    branches: Vec<RefAnswer>,
    #[serde(default)]
    tags: Vec<RefAnswer>,
}

/// One branch or tag of a [`RefsAnswer`].
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct RefAnswer {
    name: String,
    target_commit: String,
}

/// The most bytes a refs answer may have: a ref takes about 150, so this holds tens of
/// thousands of tags.
const MAX_REFS_BYTES: usize = 4 << 20;

/// How long one refs request may take in all, its body included (the read timeout only
/// bounds the wait for each piece of it).
const REFS_DEADLINE: Duration = Duration::from_secs(120);

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
        let client = &self.clients()?.client;
        match self.config.repo_type {
            HubRepoType::Kernel => self.publish_of(
                repo,
                hf_hub::RepoTypeKernel,
                client.kernel(repo.org(), repo.name()),
                version,
                files,
                create,
            ),
            HubRepoType::Model => self.publish_of(
                repo,
                hf_hub::RepoTypeModel,
                client.model(repo.org(), repo.name()),
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
        let clients = self.clients()?;
        let runtime = &clients.runtime;
        let tag = format!("v{version}");
        let mut created = false;
        if create {
            let id = repo.to_string();
            self.retrying(runtime, || {
                clients
                    .client
                    .create_repository()
                    .repo_id(&id)
                    .repo_type(repo_type)
                    .exist_ok(true)
                    .send()
            })
            .map_err(|e| self.map_err(repo, e, "creating the repository"))?;
            created = true;
        }
        let refs = self.refs(repo)?;
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
        let info = runtime
            .block_on(
                handle
                    .create_commit()
                    .operations(operations)
                    .commit_message(format!("Release {tag}"))
                    .revision("main".to_owned())
                    .send(),
            )
            .map_err(|e| self.map_err(repo, e, "committing the release"))?;
        let commit = info
            .commit_oid
            .filter(|c| is_commit_id(c))
            .ok_or_else(|| RegistryError::Transport {
                registry: self.describe(),
                message: "the commit response carried no commit id (40 hex digits)".into(),
            })?;
        self.retrying(runtime, || {
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
            let created_branch = self.retrying(runtime, || handle.create_branch().branch(&major).revision(commit.clone()).send());
            if created_branch.is_err() && current.is_some() {
                let _ = self.retrying(runtime, || handle.delete_branch().branch(&major).send());
                let _ = self.retrying(runtime, || handle.create_branch().branch(&major).revision(commit.clone()).send());
            }
        }
        let after = self.refs(repo)?;
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
        let url = self.refs_url(repo)?;
        self.clients()?.runtime.block_on(async {
            let mut attempts = Attempts::new(&self.config);
            loop {
                attempts.made += 1;
                let once = tokio::time::timeout(REFS_DEADLINE, self.refs_once(repo, &url)).await;
                let failed = match once {
                    Ok(Ok(refs)) => return Ok(refs),
                    Ok(Err(f)) => f,
                    Err(_) => Failed::Retry(
                        RegistryError::Transport {
                            registry: self.describe(),
                            message: format!("listing the refs of {repo} took longer than {} s", REFS_DEADLINE.as_secs()),
                        },
                        None,
                    ),
                };
                match failed {
                    Failed::Retry(e, wait) => {
                        if !attempts.again(wait).await {
                            return Err(e);
                        }
                    }
                    Failed::Fatal(e) => return Err(e),
                }
            }
        })
    }

    fn manifest(&self, repo: &RepoId, commit: &str) -> Result<Vec<u8>, RegistryError> {
        self.fetch_verified(repo, commit, "khub.toml", super::MAX_MANIFEST_BYTES)
    }

    fn signature(&self, repo: &RepoId, commit: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        match self.fetch_verified(repo, commit, super::SIGNATURE_FILE, MAX_SIGNATURE_BYTES) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(RegistryError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn fetch(&self, repo: &RepoId, commit: &str, path: &RelPath, limit: u64, sink: &mut dyn Write) -> Result<u64, RegistryError> {
        self.clients()?.runtime.block_on(async {
            let mut attempts = Attempts::new(&self.config);
            let t = self.download(repo, commit, path.as_str(), limit, sink, &mut attempts).await?;
            Ok(t.written)
        })
    }
}

/// The attempts one operation may still make, and the backoff between them.
///
/// An attempt that failed after writing new bytes to the sink (a download that moved
/// forward before it broke) is not counted, up to `max` such attempts: a long download on
/// a flaky link finishes, and no download makes more than `2 × max` requests.
struct Attempts {
    /// Attempts counted against `max`.
    made: u32,
    /// Attempts that moved the download forward and were not counted.
    free: u32,
    max: u32,
    backoff: Duration,
}

impl Attempts {
    fn new(config: &HubConfig) -> Self {
        Attempts {
            made: 0,
            free: 0,
            max: config.attempts.max(1),
            backoff: config.backoff,
        }
    }

    /// Every request made.
    fn requests(&self) -> u32 {
        self.made + self.free
    }

    /// The last attempt moved the download forward: it does not count, while free ones
    /// remain.
    fn progressed(&mut self) {
        if self.free < self.max && self.made > 0 {
            self.made -= 1;
            self.free += 1;
        }
    }

    /// After a failed attempt: waits (`retry_after`, capped at [`MAX_RETRY_AFTER`], else the
    /// exponential backoff) and returns true when another attempt is allowed.
    async fn again(&mut self, retry_after: Option<Duration>) -> bool {
        if self.made >= self.max {
            return false;
        }
        let backoff = self
            .backoff
            .saturating_mul(1 << self.made.saturating_sub(1).min(16))
            .min(MAX_RETRY_AFTER);
        tokio::time::sleep(retry_after.map_or(backoff, |d| d.min(MAX_RETRY_AFTER))).await;
        true
    }
}

/// One file download across its attempts: what was written to the sink, and what the
/// registry said about the file.
struct Transfer {
    /// Bytes written to the sink: the next attempt resumes here.
    written: u64,
    /// The file's size, once a response declared it (`X-Linked-Size`, or the total of a
    /// `Content-Range`).
    total: Option<u64>,
    /// The file's digest as the registry reports it (`X-Linked-Etag`, else `ETag`),
    /// normalized: no `W/`, no quotes, lowercase.
    etag: Option<String>,
    /// False once the server answered a `Range` request wrongly: later attempts ask for the
    /// whole file and skip what was written.
    use_range: bool,
}

/// The file a download is for.
struct Want<'a> {
    url: &'a reqwest::Url,
    repo: &'a RepoId,
    commit: &'a str,
    path: &'a str,
    /// The most bytes the sink may receive.
    limit: u64,
}

/// Why an attempt failed.
enum Failed {
    /// Worth another attempt (after this wait, when the server asked for one).
    Retry(RegistryError, Option<Duration>),
    /// An answer that another attempt would not change.
    Fatal(RegistryError),
}

/// A body longer than `limit` (retried: a server that sent too much may send it right).
fn too_large(registry: String, path: &str, limit: u64) -> Failed {
    Failed::Retry(
        RegistryError::TooLarge {
            registry,
            what: format!("`{path}`"),
            limit,
        },
        None,
    )
}

/// What the response to a file GET says about the file.
struct Answer {
    response: reqwest::Response,
    /// `X-Linked-Size` of the first response that had one (the Hub's redirect for LFS
    /// files, or `khub serve`'s answer).
    linked_size: Option<u64>,
    /// `X-Linked-Etag` of the first response that had one, else the final `ETag`.
    etag: Option<String>,
}

/// An `ETag` without `W/` and quotes, lowercase.
fn normalize_etag(v: &str) -> String {
    let v = v.trim();
    let v = v.strip_prefix("W/").unwrap_or(v);
    v.trim_matches('"').to_ascii_lowercase()
}

fn header_str<'h>(h: &'h HeaderMap, name: &str) -> Option<&'h str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

fn header_u64(h: &HeaderMap, name: impl reqwest::header::AsHeaderName) -> Option<u64> {
    h.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok())
}

/// Whether `s` is a full git commit id: 40 hex digits.
fn is_commit_id(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `Content-Range: bytes a-b/total` (total may be `*`).
fn content_range(h: &HeaderMap) -> Option<(u64, u64, Option<u64>)> {
    let v = h.get(CONTENT_RANGE)?.to_str().ok()?.trim();
    let (range, total) = v.strip_prefix("bytes ")?.split_once('/')?;
    let total = if total == "*" { None } else { Some(total.parse().ok()?) };
    let (a, b) = range.split_once('-')?;
    let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
    // `b` is an inclusive end: `b + 1` must exist, and `b` must lie inside a known total.
    (a <= b && b < u64::MAX && total.is_none_or(|n| b < n)).then_some((a, b, total))
}

/// `Content-Range: bytes */total`, the answer to an unsatisfiable range.
fn unsatisfied_range_total(h: &HeaderMap) -> Option<u64> {
    h.get(CONTENT_RANGE)?.to_str().ok()?.trim().strip_prefix("bytes */")?.parse().ok()
}

/// `Retry-After` in seconds (an HTTP date is not honoured: the backoff applies).
fn retry_after(h: &HeaderMap) -> Option<Duration> {
    header_u64(h, RETRY_AFTER).map(Duration::from_secs)
}

/// An error and its sources, joined: reqwest's own message ("error decoding response
/// body") says little without them.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

/// Whether `bytes` match the digest the registry reports for them; a description of the
/// mismatch when they do not. Only a SHA-256 (64 hex digits) is checked: a git blob id
/// (40 hex digits, SHA-1, what the Hub reports for small non-LFS files) would need a SHA-1
/// implementation, and none is in khub's dependency tree; anything else is opaque.
fn digest_mismatch(reported: Option<&str>, bytes: &[u8]) -> Option<String> {
    let reported = reported?;
    if reported.len() != 64 || !reported.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let actual = crate::verify::sha256(bytes).to_string();
    (actual != reported).then(|| {
        format!(
            "the registry reports sha256 {reported}, the {} bytes received have sha256 {actual}",
            bytes.len()
        )
    })
}

impl HubRegistry {
    /// `{endpoint}/[kernels/]{org}/{name}/resolve/{commit}/{path}`, each segment encoded.
    fn file_url(&self, repo: &RepoId, commit: &str, path: &str) -> Result<reqwest::Url, RegistryError> {
        let bad = |message: String| RegistryError::Transport {
            registry: self.describe(),
            message,
        };
        let mut url = reqwest::Url::parse(&self.config.endpoint).map_err(|e| bad(format!("not a valid URL: {e}")))?;
        {
            let mut segments = url.path_segments_mut().map_err(|()| bad("not a URL that can take a path".into()))?;
            segments.pop_if_empty();
            if self.config.repo_type == HubRepoType::Kernel {
                segments.push("kernels");
            }
            segments.push(repo.org()).push(repo.name()).push("resolve").push(commit);
            segments.extend(path.split('/'));
        }
        Ok(url)
    }

    /// One GET of `url` (with `range`), following redirects by hand. The token goes only to
    /// the endpoint's origin.
    async fn get(&self, url: &reqwest::Url, range: Option<&str>) -> Result<Answer, Failed> {
        let origin = reqwest::Url::parse(&self.config.endpoint).ok().map(|u| u.origin());
        let mut url = url.clone();
        let mut linked_size = None;
        let mut linked_etag = None;
        let http = &self.clients().map_err(Failed::Fatal)?.http;
        for _ in 0..=MAX_REDIRECTS {
            let mut rq = http.get(url.clone());
            if let Some(t) = &self.config.token
                && origin.as_ref() == Some(&url.origin())
            {
                rq = rq.bearer_auth(t);
            }
            if let Some(r) = range {
                rq = rq.header(RANGE, r);
            }
            let response = rq.send().await.map_err(|e| {
                Failed::Retry(
                    RegistryError::Transport {
                        registry: self.describe(),
                        message: error_chain(&e),
                    },
                    None,
                )
            })?;
            let h = response.headers();
            linked_size = linked_size.or_else(|| header_u64(h, "x-linked-size"));
            linked_etag = linked_etag.or_else(|| header_str(h, "x-linked-etag").map(normalize_etag));
            let location = h.get(LOCATION).and_then(|l| l.to_str().ok());
            if response.status().is_redirection()
                && let Some(location) = location
            {
                url = url.join(location).map_err(|e| {
                    Failed::Fatal(RegistryError::Transport {
                        registry: self.describe(),
                        message: format!("a redirect to `{location}`: {e}"),
                    })
                })?;
                continue;
            }
            let etag = linked_etag.or_else(|| header_str(h, ETAG.as_str()).map(normalize_etag));
            return Ok(Answer {
                response,
                linked_size,
                etag,
            });
        }
        Err(Failed::Fatal(RegistryError::Transport {
            registry: self.describe(),
            message: format!("more than {MAX_REDIRECTS} redirects"),
        }))
    }

    /// Downloads `path` into `sink` within `attempts`, resuming after mid-body failures.
    async fn download(
        &self,
        repo: &RepoId,
        commit: &str,
        path: &str,
        limit: u64,
        sink: &mut dyn Write,
        attempts: &mut Attempts,
    ) -> Result<Transfer, RegistryError> {
        let url = self.file_url(repo, commit, path)?;
        let mut t = Transfer {
            written: 0,
            total: None,
            etag: None,
            use_range: true,
        };
        loop {
            attempts.made += 1;
            let before = t.written;
            let want = Want {
                url: &url,
                repo,
                commit,
                path,
                limit,
            };
            match self.attempt(&want, &mut t, sink).await {
                Ok(()) => return Ok(t),
                Err(Failed::Fatal(e)) => return Err(e),
                Err(Failed::Retry(e, wait)) => {
                    if t.written > before {
                        attempts.progressed();
                    }
                    if !attempts.again(wait).await {
                        return Err(match e {
                            RegistryError::Transport { registry, message } => RegistryError::Transport {
                                registry,
                                message: format!("{message} (gave up after {} attempts)", attempts.requests()),
                            },
                            other => other,
                        });
                    }
                }
            }
        }
    }

    /// One GET of a download: from `t.written` on, into `sink`.
    async fn attempt(&self, want: &Want<'_>, t: &mut Transfer, sink: &mut dyn Write) -> Result<(), Failed> {
        let Want {
            url,
            repo,
            commit,
            path,
            limit,
        } = *want;
        let registry = self.describe();
        let what = format!("downloading `{path}` of {repo} at {commit}");
        let transport = |message: String| RegistryError::Transport {
            registry: registry.clone(),
            message: format!("{what}: {message}"),
        };
        let retry = |message: String| Failed::Retry(transport(message), None);
        let resume = t.written > 0 && t.use_range;
        let range = resume.then(|| format!("bytes={}-", t.written));
        let Answer {
            mut response,
            linked_size,
            etag,
        } = match self.get(url, range.as_deref()).await {
            Ok(a) => a,
            Err(Failed::Retry(RegistryError::Transport { message, .. }, w)) => return Err(Failed::Retry(transport(message), w)),
            Err(e) => return Err(e),
        };
        let status = response.status();
        let h = response.headers().clone();

        if let Some(failed) = self.status_failure(repo, status, &h, &what) {
            return Err(failed);
        }
        match status {
            // Compared only on an answer that carries the file: a proxy's 503 or 429 page
            // has an ETag of its own, and must stay a reason to retry.
            StatusCode::OK | StatusCode::PARTIAL_CONTENT => {
                if let (Some(before), Some(now)) = (&t.etag, &etag)
                    && before != now
                {
                    return Err(Failed::Fatal(transport(format!(
                        "the file changed on the server during the download (ETag {before}, then {now})"
                    ))));
                }
            }
            StatusCode::RANGE_NOT_SATISFIABLE if resume => {
                // Everything was written already (an earlier body was complete, but its
                // connection failed after it): the server says how long the file is.
                let total = unsatisfied_range_total(&h);
                if total == Some(t.written) && t.total.is_none_or(|n| n == t.written) {
                    t.etag = t.etag.take().or(etag);
                    return Ok(());
                }
                t.use_range = false;
                return Err(retry(format!(
                    "the server refused `Range: bytes={}-` (HTTP 416, Content-Range {:?})",
                    t.written,
                    header_str(&h, CONTENT_RANGE.as_str()).unwrap_or("")
                )));
            }
            StatusCode::NOT_FOUND => {
                return Err(Failed::Fatal(match header_str(&h, "x-error-code") {
                    Some("RepoNotFound") => RegistryError::RepoNotFound {
                        repo: repo.clone(),
                        registry,
                    },
                    Some("RevisionNotFound") => RegistryError::NotFound {
                        repo: repo.clone(),
                        registry,
                        what: format!("revision {commit}"),
                    },
                    _ => RegistryError::NotFound {
                        repo: repo.clone(),
                        registry,
                        what: format!("file `{path}`"),
                    },
                }));
            }
            s => return Err(Failed::Fatal(transport(format!("unexpected HTTP {s}")))),
        }

        // Where this body starts in the file, where it ends, and the file's size.
        let (start, end, declared) = if status == StatusCode::PARTIAL_CONTENT {
            let Some((a, b, total)) = content_range(&h) else {
                t.use_range = false;
                return Err(retry("a 206 answer without a valid Content-Range".into()));
            };
            if a != t.written || total.is_some_and(|n| b >= n) {
                t.use_range = false;
                return Err(retry(format!(
                    "asked for bytes {}-, the server sent {a}-{b}/{}",
                    t.written,
                    total.map_or("*".into(), |n| n.to_string())
                )));
            }
            (a, b.checked_add(1), linked_size.or(total))
        } else {
            (0, header_u64(&h, CONTENT_LENGTH), linked_size)
        };
        if let (Some(before), Some(now)) = (t.total, declared)
            && before != now
        {
            return Err(retry(format!("the server declared {now} bytes, earlier {before}")));
        }
        t.total = t.total.or(declared);
        t.etag = t.etag.take().or(etag);
        if t.total.or(end).is_some_and(|n| n > limit) {
            return Err(too_large(registry, path, limit));
        }
        // Nothing goes to the sink past the declared size (of the file, else of this body),
        // nor past `limit`.
        let bound = t.total.or(end).map_or(limit, |n| n.min(limit));

        let mut pos = start;
        loop {
            let chunk = match response.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    return Err(retry(format!(
                        "the connection failed after {} of {} bytes: {}",
                        t.written,
                        t.total.map_or("?".into(), |n| n.to_string()),
                        error_chain(&e)
                    )));
                }
            };
            let mut data = &chunk[..];
            // A 200 after a resume: skip what the sink already has.
            if pos < t.written {
                let skip = (t.written - pos).min(data.len() as u64) as usize;
                pos += skip as u64;
                data = &data[skip..];
            }
            if data.is_empty() {
                continue;
            }
            let room = bound.saturating_sub(pos);
            if data.len() as u64 > room {
                // Keep what fits (the store checks the whole file), refuse the rest.
                let keep = &data[..room as usize];
                sink.write_all(keep).map_err(|source| {
                    Failed::Fatal(RegistryError::Io {
                        what: format!("storing `{path}`"),
                        source,
                    })
                })?;
                t.written = t.written.max(bound);
                if t.total.or(end).is_none_or(|n| n > limit) {
                    return Err(too_large(registry, path, limit));
                }
                return Err(retry(format!("the body is longer than the {bound} bytes declared")));
            }
            sink.write_all(data).map_err(|source| {
                Failed::Fatal(RegistryError::Io {
                    what: format!("storing `{path}`"),
                    source,
                })
            })?;
            pos += data.len() as u64;
            t.written = pos;
        }
        if pos < t.written {
            return Err(retry(format!(
                "the body ended at byte {pos}, before the {} bytes already received",
                t.written
            )));
        }
        match t.total.or(end) {
            Some(n) if t.written < n => Err(retry(format!("the body ended after {} of {n} bytes", t.written))),
            _ => Ok(()),
        }
    }

    /// A small file (the manifest, its signature), checked against the digest the registry
    /// reports for it; a mismatch is downloaded again, within the same attempts.
    fn fetch_verified(&self, repo: &RepoId, commit: &str, path: &str, limit: u64) -> Result<Vec<u8>, RegistryError> {
        self.clients()?.runtime.block_on(async {
            let mut attempts = Attempts::new(&self.config);
            loop {
                let mut buf = Vec::new();
                let t = self.download(repo, commit, path, limit, &mut buf, &mut attempts).await?;
                let Some(mismatch) = digest_mismatch(t.etag.as_deref(), &buf) else {
                    return Ok(buf);
                };
                if !attempts.again(None).await {
                    return Err(RegistryError::Transport {
                        registry: self.describe(),
                        message: format!(
                            "`{path}` of {repo} at {commit} is corrupt: {mismatch} (gave up after {} attempts)",
                            attempts.requests()
                        ),
                    });
                }
            }
        })
    }
}
/// An error's message followed by what its sources add: the root cause of a failed request
/// (`Connection refused`, a DNS failure, a TLS error, a timeout) sits several sources deep
/// under reqwest's `error sending request for url (…)`.
pub(crate) fn with_root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let said = s.to_string();
        if !said.is_empty() && !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = s.source();
    }
    text
}
