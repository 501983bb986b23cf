//! `khub explain`: every variant of a release, ranked and explained for a host.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

use khub::host::{HostFacts, ProbeOptions};
use khub::resolve::{Explain, Preferences, Resolution, Verdict, describe_host, resolve};

pub fn run(manifest: &Path, options: &ProbeOptions, prefs: &Preferences, json: bool) -> Result<ExitCode> {
    let m = super::read_manifest(manifest)?;
    let host = super::detect_host(options)?;
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
