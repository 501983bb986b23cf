//! `khub publish`: upload a release directory as an immutable release.
//!
//! Before anything is sent, the release is checked locally: its manifest parses, every file
//! it lists has the listed size and SHA-256, and the directory holds nothing else (no extra
//! file, no symlink). Then, through hf-hub: the repository is created when asked, an
//! existing tag `v<version>` is refused, the files are committed in one commit, tagged
//! `v<version>`, and `v<major>` is pointed at it. Finally the release is read back from the
//! registry (refs, manifest, every file, each streamed through SHA-256) and compared with
//! what was sent.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::load::LoadError;
use crate::registry::hf::{HubConfig, HubRegistry};
use crate::registry::{Registry, RegistryError, RepoId};
use crate::release::Release;
use crate::verify::trust::{TrustError, TrustPolicy};

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What the loader needs of a variant's library, checked from its bytes (nothing of it
/// runs): an ELF shared object for the variant's architecture that exports the khub entry
/// point.
fn check_library(root: &Path, v: &crate::manifest::Variant) -> Result<(), PublishError> {
    let problem = |p: String| PublishError::NotLoadable {
        variant: v.id.clone(),
        problem: p,
    };
    let path = root.join(v.library.as_str());
    let bytes = std::fs::read(&path).map_err(|e| problem(format!("cannot read {}: {e}", path.display())))?;
    let info = crate::inspect::inspect_library(&bytes).map_err(|e| problem(format!("`{}`: {e}", v.library)))?;
    if info.machine != v.arch.name() {
        return Err(problem(format!(
            "`{}` is built for {}, the manifest says {}",
            v.library,
            info.machine,
            v.arch.name()
        )));
    }
    if !info.exports.iter().any(|e| e == crate::abi::ENTRY_SYMBOL) {
        return Err(problem(format!(
            "`{}` does not export `{}`, the khub entry point",
            v.library,
            crate::abi::ENTRY_SYMBOL
        )));
    }
    Ok(())
}

/// Checks a release's signature before it is published as `repo`: its claim must name
/// `repo` and the manifest's version (read from the signature, then, when the policy
/// trusts keys for `repo`, verified with them, exactly as a load will).
fn check_signature(
    dir: &Path,
    repo: &RepoId,
    manifest: &crate::manifest::Manifest,
    bytes: &[u8],
    sig: &[u8],
    trust: Option<&TrustPolicy>,
) -> Result<(), PublishError> {
    let invalid = |e: crate::verify::sign::SignError| {
        PublishError::Trust(Box::new(TrustError::MalformedClaim {
            repo: repo.clone(),
            version: manifest.kernel.version.clone(),
            source: Box::new(e),
        }))
    };
    let comment = crate::verify::sign::unverified_trusted_comment(sig).map_err(invalid)?;
    let claim: crate::verify::sign::ReleaseClaim = comment.parse().map_err(invalid)?;
    if claim.repo != *repo || claim.version != manifest.kernel.version {
        return Err(PublishError::SignedForOther {
            claimed: format!("{} {}", claim.repo, claim.version),
            to: format!("{repo} {}", manifest.kernel.version),
            repo: repo.to_string(),
            dir: dir.display().to_string(),
        });
    }
    if let Some(policy) = trust {
        policy
            .check(repo, &manifest.kernel.version, bytes, Some(sig), now_unix())
            .map_err(|e| PublishError::Trust(Box::new(e)))?;
    }
    Ok(())
}

/// Publishing failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The release directory is not a valid release.
    #[error("the release is not valid, nothing was uploaded: {0}")]
    Invalid(#[from] LoadError),
    /// The release directory is not a valid release.
    #[error("the release is not valid, nothing was uploaded: {0}")]
    InvalidRelease(#[from] crate::release::ReleaseError),
    /// The registry refused or failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The signature is for another repository or version than the one published.
    #[error(
        "the release is signed for {claimed}, but would be published as {to}: every load would refuse it as a replay, and a published release cannot be replaced; nothing was uploaded. Sign it again for this repository (`khub sign {dir} --key KEY --repo {repo}`) or publish to the repository it was signed for"
    )]
    SignedForOther {
        /// What the signature claims, `org/name version`.
        claimed: String,
        /// What it would be published as.
        to: String,
        /// The repository published to.
        repo: String,
        /// The release directory.
        dir: String,
    },
    /// A variant's library is not one the loader could load.
    #[error("variant `{variant}`: {problem}; every load of it would fail, so nothing was uploaded (package the release again)")]
    NotLoadable {
        /// The variant.
        variant: String,
        /// What is wrong.
        problem: String,
    },
    /// The trust policy would refuse the release at load time.
    #[error("the trust policy would refuse this release at load time, so nothing was uploaded: {0}")]
    Trust(Box<TrustError>),
    /// The directory registry refused the commit.
    #[error("directory registry: {0}")]
    Commit(#[from] crate::registry::dir::CommitError),
    /// Publishing into a directory registry failed.
    #[error("directory registry {}: {problem}", path.display())]
    Directory {
        /// The directory concerned.
        path: PathBuf,
        /// What went wrong and what to do.
        problem: String,
    },
    /// The release read back differs from what was sent.
    #[error("after upload, {what} read back from {registry} differs from the local release ({detail}); do not use this release")]
    Mismatch {
        /// The registry.
        registry: String,
        /// What differs.
        what: String,
        /// Details.
        detail: String,
    },
}

/// What was published.
#[derive(Debug, Clone, Serialize)]
pub struct PublishReport {
    /// The repository.
    pub repo: String,
    /// The registry.
    pub registry: String,
    /// The version.
    pub version: String,
    /// The commit.
    pub commit: String,
    /// The tag.
    pub tag: String,
    /// Branches now pointing at the commit.
    pub branches: Vec<String>,
    /// Whether the repository was created (or already existed) on `--create`.
    pub created: bool,
    /// Whether the manifest is signed.
    pub signed: bool,
    /// Every file uploaded, with its size and digest.
    pub files: Vec<PublishedFile>,
    /// Whether reading the release back matched every digest.
    pub verified: bool,
}

/// One uploaded file.
#[derive(Debug, Clone, Serialize)]
pub struct PublishedFile {
    /// Its path in the repository.
    pub path: String,
    /// Its size.
    pub size: u64,
    /// Its SHA-256.
    pub sha256: String,
}

/// Publishes the release in `dir` to `repo` on the registry `config` describes.
/// The report's list of what was published.
fn published_files(files: &[(String, PathBuf, u64, crate::manifest::Sha256Digest)]) -> Vec<PublishedFile> {
    files
        .iter()
        .map(|(p, _, s, d)| PublishedFile {
            path: p.clone(),
            size: *s,
            sha256: d.to_string(),
        })
        .collect()
}

/// A release checked for publishing: what is uploaded, byte for byte.
struct Checked {
    manifest: crate::manifest::Manifest,
    /// (path in the release, local file, size, digest); khub.toml first.
    files: Vec<(String, PathBuf, u64, crate::manifest::Sha256Digest)>,
    signed: bool,
}

/// Checks the release locally, as a load would: the tree, every digest, and the signature
/// against the repository and version it is published as.
fn check_release(dir: &Path, repo: &RepoId, trust: Option<&TrustPolicy>, log: &mut dyn FnMut(&str)) -> Result<Checked, PublishError> {
    let release = Release::open(dir)?;
    release.check_tree()?;
    let manifest = release.manifest().clone();
    let root = release.root().to_owned();
    let mut files: Vec<(String, PathBuf, u64, crate::manifest::Sha256Digest)> = Vec::new();
    // The bytes the manifest was parsed from: what is uploaded is what was checked.
    let manifest_bytes = release.manifest_bytes().to_vec();
    files.push((
        "khub.toml".into(),
        root.join("khub.toml"),
        manifest_bytes.len() as u64,
        crate::verify::sha256(&manifest_bytes),
    ));
    let signature = release.signature()?;
    let signed = signature.is_some();
    if let Some(sig) = &signature {
        check_signature(dir, repo, &manifest, &manifest_bytes, sig, trust)?;
        files.push((
            crate::registry::SIGNATURE_FILE.into(),
            root.join(crate::registry::SIGNATURE_FILE),
            sig.len() as u64,
            crate::verify::sha256(sig),
        ));
    } else if let Some(policy) = trust {
        let now = now_unix();
        policy
            .check(repo, &manifest.kernel.version, &manifest_bytes, None, now)
            .map_err(|e| PublishError::Trust(Box::new(e)))?;
    }
    let mut seen = std::collections::BTreeSet::new();
    for v in &manifest.variants {
        release.verify_variant(&v.id)?;
        check_library(&root, v)?;
        for f in &v.files {
            if seen.insert(f.path.clone()) {
                files.push((f.path.to_string(), root.join(f.path.as_str()), f.size, f.sha256));
            }
        }
    }
    log(&format!(
        "checked {} {}: {} variant{}, {} files, {}",
        manifest.kernel.name,
        manifest.kernel.version,
        manifest.variants.len(),
        if manifest.variants.len() == 1 { "" } else { "s" },
        files.len(),
        if signed { "signed" } else { "unsigned" }
    ));
    Ok(Checked { manifest, files, signed })
}

/// Uploads the release directory `dir` to `repo` on a Hub-compatible registry as an
/// immutable release (tag `v<version>`), then reads every byte back.
pub fn publish(
    dir: &Path,
    repo: &RepoId,
    config: HubConfig,
    create: bool,
    trust: Option<&TrustPolicy>,
    log: &mut dyn FnMut(&str),
) -> Result<PublishReport, PublishError> {
    // 1. Check.
    let Checked { manifest, files, signed } = check_release(dir, repo, trust, log)?;

    // 2. Upload.
    let registry = HubRegistry::new(config)?;
    log(&format!("uploading to {repo} on {}", registry.describe()));
    let upload: Vec<(String, PathBuf)> = files.iter().map(|(p, l, _, _)| (p.clone(), l.clone())).collect();
    let published = registry.publish(repo, &manifest.kernel.version, &upload, create)?;
    log(&format!(
        "committed {} as {} ({})",
        published.tag,
        crate::registry::short_commit(&published.commit),
        published.branches.join(", ")
    ));

    // 3. Read it back: the tag must point at the commit, and every byte must match.
    let mismatch = |what: String, detail: String| PublishError::Mismatch {
        registry: registry.describe(),
        what,
        detail,
    };
    let refs = registry.refs(repo)?;
    let tagged = refs.tags.iter().find(|t| t.name == published.tag).map(|t| t.commit.clone());
    if tagged.as_deref() != Some(published.commit.as_str()) {
        return Err(mismatch(
            format!("tag {}", published.tag),
            format!("points at {tagged:?}, the commit was {}", published.commit),
        ));
    }
    for (path, _, size, digest) in &files {
        let rel = crate::manifest::RelPath::new(path.clone()).map_err(|e| mismatch(path.clone(), e.to_string()))?;
        let mut hasher = crate::verify::HashingWriter::new(std::io::sink(), *size);
        let n = registry.fetch(repo, &published.commit, &rel, *size, &mut hasher)?;
        let (got, _, _) = hasher.finish();
        if n != *size || got != *digest {
            return Err(mismatch(
                format!("`{path}`"),
                format!("{n} bytes, sha256 {got}; sent {size} bytes, sha256 {digest}"),
            ));
        }
    }
    log(&format!("verified {} files read back from the registry", files.len()));
    Ok(PublishReport {
        repo: repo.to_string(),
        registry: registry.describe(),
        version: manifest.kernel.version.to_string(),
        commit: published.commit,
        tag: published.tag,
        branches: published.branches,
        created: published.created,
        signed,
        files: published_files(&files),
        verified: true,
    })
}

/// Publishes the release directory `dir` into the directory registry `registry` as
/// `<registry>/<org>/<name>/<version>/`, through [`commit_release`](crate::registry::dir::commit_release):
/// a reader (or `khub serve`) sees the whole release or none, and an existing version is
/// refused (releases are immutable).
pub fn publish_to_directory(
    dir: &Path,
    repo: &RepoId,
    registry: &Path,
    create: bool,
    trust: Option<&TrustPolicy>,
    log: &mut dyn FnMut(&str),
) -> Result<PublishReport, PublishError> {
    let Checked { manifest, files, signed } = check_release(dir, repo, trust, log)?;
    let fail = |path: &Path, problem: String| PublishError::Directory {
        path: path.to_owned(),
        problem,
    };
    // The same checks as a load from it (a `host:port` gets the hint to write a URL).
    crate::registry::dir::DirRegistry::new(registry)?;
    let repo_dir = registry.join(repo.org()).join(repo.name());
    if !repo_dir.is_dir() {
        if !create {
            return Err(fail(&repo_dir, format!("{repo} does not exist here; pass --create to create it")));
        }
        std::fs::create_dir_all(&repo_dir).map_err(|e| fail(&repo_dir, format!("cannot create it: {e}")))?;
    }
    let version = manifest.kernel.version.to_string();
    let target = repo_dir.join(&version);
    log(&format!("committing to {}", target.display()));
    // The directory registry's one write path (the one `khub serve` commits with): staged,
    // synced, renamed into place; a version that exists is refused.
    let contents = files.iter().map(|(path, local, _, _)| -> Result<_, PublishError> {
        let rel = crate::manifest::RelPath::new(path.clone()).map_err(|e| fail(local, e.to_string()))?;
        let bytes = std::fs::read(local).map_err(|e| fail(local, format!("cannot read it: {e}")))?;
        Ok((rel, bytes))
    });
    let committed = crate::registry::dir::commit_release::<PublishError>(registry, repo, None, contents)?;
    // Read it back as a load would.
    let back = Release::open(&committed.dir)?;
    back.check_tree()?;
    for v in &back.manifest().variants {
        back.verify_variant(&v.id)?;
    }
    log(&format!("verified {} files in {}", files.len(), target.display()));
    Ok(PublishReport {
        repo: repo.to_string(),
        registry: registry.display().to_string(),
        version: version.clone(),
        commit: committed.commit,
        tag: format!("v{version}"),
        branches: Vec::new(),
        created: false,
        signed,
        files: published_files(&files),
        verified: true,
    })
}
