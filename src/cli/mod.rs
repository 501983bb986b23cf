//! Command-line parsing and dispatch. Each command lives in its own file and prints
//! either human text or stable JSON (`--json`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use khub::host::{Environment, HostFacts, Isolation, ProbeOptions};
use khub::manifest::Manifest;
use khub::platform::Backend;
use khub::resolve::Preferences;

mod explain;
mod host;

/// khub: a registry and loader for prebuilt compute kernels.
#[derive(Parser, Debug)]
#[command(name = "khub", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the facts of this host (or of a simulated one) and where each came from.
    Host {
        /// A host-profile TOML file to apply (also KHUB_HOST_PROFILE).
        #[arg(long, value_name = "FILE")]
        host: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show every variant of a release for this host: accepted with its score, or
    /// rejected with its reason, best first.
    Explain {
        /// A khub.toml, or a release directory holding one.
        manifest: PathBuf,
        /// A host-profile TOML file to resolve for (also KHUB_HOST_PROFILE).
        #[arg(long, value_name = "FILE")]
        host: Option<PathBuf>,
        /// Preferences: `backend=cuda`, `variant=ID`, `no-jit`, `device=N`. Repeatable.
        #[arg(long, value_name = "PREF")]
        prefer: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Internal: run a GPU probe in this process and print its result as JSON.
    #[command(name = "__probe", hide = true)]
    Probe {
        /// The probe: `cuda`.
        what: String,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Host { host, json } => host::run(&probe_options(host)?, json),
        Command::Explain {
            manifest,
            host,
            prefer,
            json,
        } => explain::run(&manifest, &probe_options(host)?, &parse_preferences(&prefer)?, json),
        Command::Probe { what } => {
            if what != "cuda" {
                bail!("unknown probe `{what}`; the only probe is `cuda`");
            }
            println!("{}", khub::host::probe::cuda_probe_helper_main(&Environment::capture()));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Probe options for the CLI: GPU probes that load vendor code run in a child `khub`
/// process, so a crashing driver cannot take the command down.
fn probe_options(host: Option<PathBuf>) -> Result<ProbeOptions> {
    let mut o = ProbeOptions::from_env()?;
    o.profile = host;
    if o.isolation == Isolation::Thread
        && let Ok(exe) = std::env::current_exe()
    {
        o.isolation = Isolation::Subprocess {
            exe,
            args: vec!["__probe".into(), "cuda".into()],
        };
    }
    Ok(o)
}

fn detect_host(options: &ProbeOptions) -> Result<HostFacts> {
    Ok(HostFacts::detect(options)?.facts)
}

fn parse_preferences(items: &[String]) -> Result<Preferences> {
    let mut p = Preferences::default();
    for item in items {
        for part in item.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match part.split_once('=') {
                Some(("backend", b)) => p.backend = Some(b.parse::<Backend>()?),
                Some(("variant", v)) => p.variant = Some(v.to_owned()),
                Some(("device", d)) => p.device = Some(d.parse().with_context(|| format!("device=`{d}` is not a device index"))?),
                None if part == "no-jit" => p.forbid_jit = true,
                _ => bail!("unknown preference `{part}`; use backend=NAME, variant=ID, device=N or no-jit"),
            }
        }
    }
    Ok(p)
}

/// Reads a manifest from a file, or from `khub.toml` in a directory.
fn read_manifest(path: &Path) -> Result<Manifest> {
    let file = if path.is_dir() { path.join("khub.toml") } else { path.to_owned() };
    let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
    Manifest::from_bytes(&bytes).with_context(|| format!("in {}", file.display()))
}
