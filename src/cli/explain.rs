//! `khub explain`: every variant of a release, ranked and explained for a host.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Result, bail};

use khub::host::HostFacts;
use khub::manifest::Manifest;
use khub::resolve::{Explain, Preferences, Resolution, Verdict, describe_host, resolve};

use super::registry::RegistryArgs;

/// What `khub explain` reads the manifest from.
enum Source {
    Local(PathBuf),
    Repo(khub::RepoId),
}

/// A path form or an existing file or directory is local (explain loads nothing, so a
/// directory named like a repository keeps working), unless a registry option asks for the
/// repository; otherwise `org/name` is a repository, and anything else a path.
fn source(target: &str, version: Option<&str>, args: &RegistryArgs) -> Result<Source> {
    let remote_asked = version.is_some() || args.source.registry.is_some() || args.source.offline;
    let path_form = target == "." || target == ".." || ["/", "./", "../", "~/"].iter().any(|p| target.starts_with(p));
    let repo = target.parse::<khub::RepoId>();
    let local = if path_form {
        match super::classify(target)? {
            super::Target::Path(p) => Some(p),
            super::Target::Repo(_) => None,
        }
    } else if !(remote_asked && repo.is_ok()) && Path::new(target).exists() {
        Some(PathBuf::from(target))
    } else {
        None
    };
    if let Some(path) = local {
        if version.is_some() {
            bail!("--version applies to a repository; {target} is a local release");
        }
        return Ok(Source::Local(path));
    }
    match repo {
        Ok(id) => Ok(Source::Repo(id)),
        // Not a repository name: a path, and reading it says what is wrong with it.
        Err(_) => Ok(Source::Local(PathBuf::from(target))),
    }
}

pub fn run(
    target: &str,
    version: Option<&str>,
    args: &RegistryArgs,
    host: Option<PathBuf>,
    prefs: &Preferences,
    json: bool,
) -> Result<ExitCode> {
    let (m, host): (Manifest, HostFacts) = match source(target, version, args)? {
        Source::Local(path) => (super::read_manifest(&path)?, super::detect_host(&super::probe_options(host)?)?),
        Source::Repo(repo) => {
            let hub = super::registry::hub(args, host, prefs.clone())?;
            let release = hub.resolve_release(&repo, version.unwrap_or("*"))?;
            (release.manifest, hub.host().clone())
        }
    };
    let r = resolve(&m, &host, prefs);
    let chosen = r.best().map(|c| c.id.as_str());
    if json {
        // The JSON document is documented in docs/cli.md.
        println!("{}", serde_json::to_string_pretty(&Explain::new(&r, &host))?);
    } else {
        print!("{}", render(&r, &host));
    }
    // Exit 1 when nothing fits, so scripts can test the answer without parsing it.
    Ok(if chosen.is_some() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

pub(super) fn render(r: &Resolution, host: &HostFacts) -> String {
    let accepted = r.accepted().count();
    let mut out = format!(
        "{} {}: {} variants, {accepted} accepted\nhost: {}\n\n",
        r.kernel,
        r.version,
        r.candidates.len(),
        describe_host(host)
    );
    let width = r.candidates.iter().map(|c| c.id.len()).max().unwrap_or(0);
    let mut rank = 0;
    for c in &r.candidates {
        match &c.verdict {
            Verdict::Accepted { score } => {
                rank += 1;
                let mark = if rank == 1 { "=> " } else { "   " };
                out.push_str(&format!("{mark}{rank:>2}. {:<width$}  accepted  {score}\n", c.id));
            }
            Verdict::Rejected { reason } => {
                out.push_str(&format!("     -  {:<width$}  rejected  {reason}\n", c.id));
            }
        }
    }
    match r.chosen(host) {
        Ok(best) => out.push_str(&format!("\nchosen: {}\n", best.id)),
        Err(e) => out.push_str(&format!("\n{e}\n")),
    }
    out
}
