//! `khub cache ls`, `khub cache verify [--repair]` and `khub cache rm`: look into the store
//! and heal it (like `uv cache` and `hf cache`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use serde::Serialize;

use khub::host::Environment;
use khub::manifest::{MAX_MANIFEST_BYTES, Manifest, Sha256Digest};
use khub::registry::RepoId;
use khub::store::{IndexEntry, Store};

use super::registry::{self, RegistryArgs};

/// Opens the store `--cache` (or the environment) names.
fn open_store(cache: Option<&PathBuf>) -> Result<Store> {
    let env = Environment::capture();
    let root = match cache {
        Some(c) => c.clone(),
        None => Store::default_root(&env)?,
    };
    Ok(Store::open_with(&root, khub::store::StoreOptions::from_env(&env)?)?)
}

/// The stored manifest of an index entry, when its blob is there and intact.
fn manifest_of(store: &Store, e: &IndexEntry) -> Option<Manifest> {
    let bytes = store.read_verified(&e.release.manifest_sha256, MAX_MANIFEST_BYTES as u64).ok()?;
    Manifest::from_bytes(&bytes).ok()
}

/// Every blob a recorded release uses: its manifest, its signature and, when the
/// manifest is readable, the files of all its variants.
fn digests_of(e: &IndexEntry, m: Option<&Manifest>) -> Vec<Sha256Digest> {
    let mut ds = vec![e.release.manifest_sha256];
    ds.extend(e.release.signature_sha256);
    if let Some(m) = m {
        ds.extend(m.variants.iter().flat_map(|v| v.files.iter().map(|f| f.sha256)));
    }
    ds
}

/// One release in the cache, as `cache ls` shows it.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Listed {
    repo: String,
    version: String,
    registry: Option<String>,
    /// Variants whose every file is in the store.
    variants: Vec<String>,
    /// Bytes of this release's files in the store (files shared with other releases count
    /// for each).
    bytes: u64,
    signed: bool,
    /// When the release was last fetched, locked or loaded online (Unix seconds).
    accepted_at: Option<u64>,
    /// Whether the manifest blob is missing or damaged.
    manifest_missing: bool,
}

pub fn ls(cache: Option<&PathBuf>, json: bool) -> Result<ExitCode> {
    let store = open_store(cache)?;
    let blobs: BTreeMap<Sha256Digest, u64> = store.list()?.into_iter().collect();
    let mut listed = Vec::new();
    for e in store.index_entries() {
        let manifest = manifest_of(&store, &e);
        let (variants, bytes) = match &manifest {
            Some(m) => {
                let mut files = BTreeSet::new();
                let variants = m
                    .variants
                    .iter()
                    .filter(|v| v.files.iter().all(|f| blobs.get(&f.sha256) == Some(&f.size)))
                    .map(|v| {
                        files.extend(v.files.iter().map(|f| (f.sha256, f.size)));
                        v.id.clone()
                    })
                    .collect();
                (variants, files.iter().map(|(_, s)| s).sum())
            }
            None => (Vec::new(), 0),
        };
        listed.push(Listed {
            repo: e.repo.to_string(),
            version: e.version.clone(),
            registry: e.registry.clone(),
            variants,
            bytes,
            signed: e.release.signature_sha256.is_some(),
            accepted_at: e.release.accepted_at,
            manifest_missing: manifest.is_none(),
        });
    }
    let total: u64 = blobs.values().sum();
    let quarantined = store.quarantined()?;
    if json {
        #[derive(Serialize)]
        #[serde(rename_all = "kebab-case")]
        struct Doc<'a> {
            store: String,
            blobs: usize,
            bytes: u64,
            quarantined: usize,
            releases: &'a [Listed],
        }
        let doc = Doc {
            store: store.root().display().to_string(),
            blobs: blobs.len(),
            bytes: total,
            quarantined: quarantined.len(),
            releases: &listed,
        };
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{}: {} blob{}, {}{}",
        store.root().display(),
        blobs.len(),
        if blobs.len() == 1 { "" } else { "s" },
        human(total),
        if quarantined.is_empty() {
            String::new()
        } else {
            format!(", {} quarantined (removed by `khub gc`)", quarantined.len())
        }
    );
    if listed.is_empty() {
        println!("no releases recorded (`khub fetch org/name` adds some)");
    }
    for l in &listed {
        println!(
            "  {} {}{}  {}  {}  {}{}",
            l.repo,
            l.version,
            if l.signed { " (signed)" } else { "" },
            human(l.bytes),
            if l.manifest_missing {
                "manifest missing or damaged".to_owned()
            } else if l.variants.is_empty() {
                "no variant complete".to_owned()
            } else {
                l.variants.join(", ")
            },
            l.accepted_at.map(ago).unwrap_or_else(|| "never used".to_owned()),
            l.registry.as_deref().map(|r| format!("  from {r}")).unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A byte count for people.
fn human(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// "used 3 h ago".
fn ago(t: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let s = now.saturating_sub(t);
    let (n, unit) = match s {
        0..60 => (s, "s"),
        60..3600 => (s / 60, "min"),
        3600..86400 => (s / 3600, "h"),
        _ => (s / 86400, "d"),
    };
    format!("used {n} {unit} ago")
}

/// What `cache verify` found.
#[derive(Serialize, Default)]
#[serde(rename_all = "kebab-case")]
struct Checked {
    store: String,
    checked: usize,
    bytes: u64,
    damaged: Vec<Damaged>,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Damaged {
    sha256: String,
    path: String,
    /// The releases that reference it, `org/name version`.
    used_by: Vec<String>,
    quarantined: Option<String>,
    refetched: bool,
    /// The command that would fetch it again, when it was not.
    fix: Option<String>,
}

pub fn verify(args: &RegistryArgs, repair: bool, json: bool) -> Result<ExitCode> {
    let store = open_store(args.source.cache.as_ref())?;
    let blobs = store.list()?;
    let mut report = Checked {
        store: store.root().display().to_string(),
        ..Default::default()
    };
    let mut bad: Vec<Sha256Digest> = Vec::new();
    for (d, size) in &blobs {
        report.checked += 1;
        report.bytes += size;
        if !store.check_blob(d)? {
            bad.push(*d);
        }
    }
    // Which releases use each damaged blob, from the manifests as stored before repair (a
    // damaged manifest's own files are unknown until it is fetched again).
    let entries = store.index_entries();
    let manifests: Vec<(IndexEntry, Option<Manifest>)> = entries.into_iter().map(|e| (e.clone(), manifest_of(&store, &e))).collect();
    let uses = |e: &IndexEntry, m: &Option<Manifest>, d: &Sha256Digest| digests_of(e, m.as_ref()).contains(d);
    let mut items: Vec<Damaged> = bad
        .iter()
        .map(|d| Damaged {
            sha256: d.to_string(),
            path: store.blob_path(d).display().to_string(),
            used_by: manifests
                .iter()
                .filter(|(e, m)| uses(e, m, d))
                .map(|(e, _)| format!("{} {}", e.repo, e.version))
                .collect(),
            quarantined: None,
            refetched: false,
            fix: None,
        })
        .collect();
    if !repair {
        for item in &mut items {
            item.fix = Some("khub cache verify --repair".to_owned());
        }
    } else {
        // 1. Quarantine, each under its entry lock, only if still damaged.
        for (d, item) in bad.iter().zip(items.iter_mut()) {
            item.quarantined = store.quarantine_if_damaged(d)?.map(|p| p.display().to_string());
        }
        // 2. Fetch again every affected release from its registry, when that is the
        //    current one and the network is allowed: its manifest and signature (always,
        //    online) and the variants that use a damaged blob (per the fresh manifest).
        let hub = if args.source.offline {
            None
        } else {
            registry::hub(args, None, Default::default()).ok().filter(|h| !h.offline())
        };
        let this_registry = hub.as_ref().map(|h| h.registry_name());
        let mut fixes: Vec<String> = Vec::new();
        for (e, m) in &manifests {
            let affected = m.is_none() || bad.iter().any(|d| uses(e, m, d));
            if !affected {
                continue;
            }
            match (&hub, this_registry.is_some() && e.registry == this_registry) {
                (Some(h), true) => {
                    if let Err(err) = refetch(h, &e.repo, &e.version, &bad) {
                        fixes.push(format!("{} (it failed: {err:#})", fetch_command(e)));
                    }
                }
                _ => fixes.push(fetch_command(e)),
            }
        }
        // 3. What is repaired: intact now, or used by no recorded release any more.
        let referenced: BTreeSet<Sha256Digest> = store
            .index_entries()
            .iter()
            .flat_map(|e| digests_of(e, manifest_of(&store, e).as_ref()))
            .collect();
        for (d, item) in bad.iter().zip(items.iter_mut()) {
            let present = store.list()?.iter().any(|(x, _)| x == d);
            item.refetched = present && store.check_blob(d)?;
            if !item.refetched && referenced.contains(d) {
                item.fix = Some(if fixes.is_empty() {
                    "khub cache verify --repair (online, with the release's --registry)".to_owned()
                } else {
                    fixes.join("; ")
                });
            }
        }
        // A release whose manifest could not be read may hide more damage.
        if items.iter().all(|i| i.fix.is_none()) && !fixes.is_empty() {
            items.push(Damaged {
                sha256: String::new(),
                path: String::new(),
                used_by: Vec::new(),
                quarantined: None,
                refetched: false,
                fix: Some(fixes.join("; ")),
            });
        }
    }
    let all_fixed = items.iter().all(|i| i.fix.is_none());
    report.damaged = items;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let damaged = report.damaged.iter().filter(|d| !d.sha256.is_empty()).count();
        println!(
            "checked {} blob{} ({}) in {}: {} damaged",
            report.checked,
            if report.checked == 1 { "" } else { "s" },
            human(report.bytes),
            report.store,
            damaged
        );
        for d in &report.damaged {
            if d.sha256.is_empty() {
                if let Some(f) = &d.fix {
                    println!("  a release's manifest is missing or damaged; to repair: {f}");
                }
                continue;
            }
            let users = if d.used_by.is_empty() {
                "used by no recorded release".to_owned()
            } else {
                format!("used by {}", d.used_by.join(", "))
            };
            println!("  damaged: {} ({users})", d.path);
            if let Some(q) = &d.quarantined {
                println!("    moved to {q}");
            }
            if d.refetched {
                println!("    fetched again: repaired");
            }
            if let Some(f) = &d.fix {
                println!("    to repair: {f}");
            }
        }
    }
    Ok(if all_fixed { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `khub fetch` for an index entry, with its registry.
fn fetch_command(e: &IndexEntry) -> String {
    match &e.registry {
        Some(r) => format!("khub fetch {} --version '={}' --registry {r}", e.repo, e.version),
        None => format!("khub fetch {} --version '={}'", e.repo, e.version),
    }
}

/// Fetches again, from the registry, release `version` of `repo`: its manifest and
/// signature, and the variants that use one of the `bad` blobs.
fn refetch(hub: &khub::hub::Hub, repo: &RepoId, version: &str, bad: &[Sha256Digest]) -> Result<()> {
    let release = hub.resolve_release(repo, &format!("={version}"))?;
    let variants: Vec<&khub::manifest::Variant> = release
        .manifest
        .variants
        .iter()
        .filter(|v| v.files.iter().any(|f| bad.contains(&f.sha256)))
        .collect();
    if !variants.is_empty() {
        hub.fetch_variants(&release, &variants, &khub::hub::Quiet)?;
    }
    Ok(())
}

pub fn rm(cache: Option<&PathBuf>, repo: Option<&str>, version: Option<&str>, all: bool) -> Result<ExitCode> {
    let store = open_store(cache)?;
    let removed = match (repo, all) {
        (Some(r), false) => {
            let id: RepoId = r.parse()?;
            // `=0.1.0` and `v0.1.0` name 0.1.0 too.
            let version = version.map(|v| v.trim_start_matches('=').trim_start_matches('v'));
            let removed = store.forget(&id, version)?;
            if removed.is_empty() {
                bail!(
                    "the cache has no release of {id}{}; `khub cache ls` lists what it has",
                    version.map(|v| format!(" {v}")).unwrap_or_default()
                );
            }
            removed
        }
        (None, true) => {
            let mut removed = Vec::new();
            let repos: BTreeSet<RepoId> = store.index_entries().into_iter().map(|e| e.repo).collect();
            for r in repos {
                removed.extend(store.forget(&r, None)?);
            }
            removed
        }
        _ => bail!("name a repository (`khub cache rm org/name [--version V]`) or pass --all"),
    };
    let manifests_of_removed: Vec<Option<Manifest>> = removed.iter().map(|e| manifest_of(&store, e)).collect();
    // Delete exactly the removed releases' blobs that no remaining release uses (blobs no
    // recorded release referenced, such as a lockfile's, stay), under the exclusive gc
    // lock; with --all, every blob (and temp files and the quarantine, through gc).
    let report = if all {
        let r = store.gc(&BTreeSet::new(), false)?;
        (r.removed, r.removed_bytes)
    } else {
        let still: BTreeSet<Sha256Digest> = store
            .index_entries()
            .iter()
            .flat_map(|e| digests_of(e, manifest_of(&store, e).as_ref()))
            .collect();
        let theirs: BTreeSet<Sha256Digest> = removed
            .iter()
            .zip(&manifests_of_removed)
            .flat_map(|(e, m)| digests_of(e, m.as_ref()))
            .filter(|d| !still.contains(d))
            .collect();
        store.remove_blobs(&theirs)?
    };
    println!(
        "removed {} release{} from the index, {} blob{} ({})",
        removed.len(),
        if removed.len() == 1 { "" } else { "s" },
        report.0,
        if report.0 == 1 { "" } else { "s" },
        human(report.1)
    );
    Ok(ExitCode::SUCCESS)
}
