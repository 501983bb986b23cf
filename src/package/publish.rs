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
pub fn publish(
    dir: &Path,
    repo: &RepoId,
    config: HubConfig,
    create: bool,
    log: &mut dyn FnMut(&str),
) -> Result<PublishReport, PublishError> {
    // 1. Check the release locally.
    let release = Release::open(dir)?;
    release.check_tree()?;
    let manifest = release.manifest().clone();
    let root = release.root().to_owned();
    let mut files: Vec<(String, PathBuf, u64, crate::manifest::Sha256Digest)> = Vec::new();
    let manifest_bytes = std::fs::read(root.join("khub.toml")).map_err(|source| {
        LoadError::Verify(crate::verify::VerifyError::Io {
            what: "cannot read",
            path: "khub.toml".into(),
            source,
        })
    })?;
    files.push((
        "khub.toml".into(),
        root.join("khub.toml"),
        manifest_bytes.len() as u64,
        crate::verify::sha256(&manifest_bytes),
    ));
    let sig_path = root.join(crate::registry::SIGNATURE_FILE);
    let signed = sig_path.is_file();
    if signed {
        let sig = std::fs::read(&sig_path).map_err(|source| {
            LoadError::Verify(crate::verify::VerifyError::Io {
                what: "cannot read",
                path: crate::registry::SIGNATURE_FILE.into(),
                source,
            })
        })?;
        files.push((
            crate::registry::SIGNATURE_FILE.into(),
            sig_path.clone(),
            sig.len() as u64,
            crate::verify::sha256(&sig),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for v in &manifest.variants {
        release.verify_variant(&v.id)?;
        for f in &v.files {
            if seen.insert(f.path.clone()) {
                files.push((f.path.to_string(), root.join(f.path.as_str()), f.size, f.sha256));
            }
        }
    }
    log(&format!(
        "checked {} {}: {} variants, {} files, {}",
        manifest.kernel.name,
        manifest.kernel.version,
        manifest.variants.len(),
        files.len(),
        if signed { "signed" } else { "unsigned" }
    ));

    // 2. Upload.
    let registry = HubRegistry::new(config)?;
    log(&format!("uploading to {repo} on {}", registry.describe()));
    let upload: Vec<(String, PathBuf)> = files.iter().map(|(p, l, _, _)| (p.clone(), l.clone())).collect();
    let published = registry.publish(repo, &manifest.kernel.version, &upload, create)?;
    log(&format!(
        "committed {} as {} ({})",
        published.tag,
        &published.commit[..12.min(published.commit.len())],
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
        files: files
            .iter()
            .map(|(p, _, s, d)| PublishedFile {
                path: p.clone(),
                size: *s,
                sha256: d.to_string(),
            })
            .collect(),
        verified: true,
    })
}
