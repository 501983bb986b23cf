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

mod cache;
mod explain;
mod host;
mod kernel;
mod registry;
mod report;

/// khub: a registry and loader for prebuilt compute kernels.
#[derive(Parser, Debug)]
#[command(name = "khub", version, about, long_about = None)]
struct Cli {
    /// Print nothing but results and errors: no progress, no warnings.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Say more: the full compiler commands, and which registry, store and host a command
    /// uses.
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

/// How much the command says on stderr besides results and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    Quiet = 0,
    Normal = 1,
    Verbose = 2,
}

static VERBOSITY: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);

/// The verbosity `-q`/`-v` chose.
pub fn verbosity() -> Verbosity {
    match VERBOSITY.load(std::sync::atomic::Ordering::Relaxed) {
        0 => Verbosity::Quiet,
        1 => Verbosity::Normal,
        _ => Verbosity::Verbose,
    }
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
        /// A release directory or a khub.toml, or a repository `org/name` (its manifest
        /// is fetched, no variant is). A name that exists here as a directory is that
        /// directory unless --registry, --version or --offline is given; write `./dir` or
        /// pass --registry to say which.
        target: String,
        /// For a repository: a version requirement.
        #[arg(long)]
        version: Option<String>,
        /// A host-profile TOML file to resolve for (also KHUB_HOST_PROFILE).
        #[arg(long, value_name = "FILE")]
        host: Option<PathBuf>,
        /// Preferences: `backend=cuda`, `variant=ID`, `no-jit`, `device=N`. Repeatable.
        #[arg(long, value_name = "PREF")]
        prefer: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        registry: registry::RegistryArgs,
    },
    /// Compile a kernel package's variants (kernel.toml) into shared libraries.
    Build {
        /// The kernel directory (holding kernel.toml).
        kernel: PathBuf,
        /// Where to put the libraries (default: <kernel>/build).
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
        #[command(flatten)]
        toolchain: ToolchainArgs,
    },
    /// Build, inspect and write a release directory with a derived khub.toml.
    Package {
        /// The kernel directory (holding kernel.toml).
        kernel: PathBuf,
        /// The release directory to write: new or empty.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Empty a non-empty --out directory first.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        toolchain: ToolchainArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show what a shared library holds: exports, libc floor, device code, descriptor.
    Inspect {
        /// The library.
        library: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resolve, verify and load a kernel for this host, and report what was loaded.
    Load {
        #[command(flatten)]
        target: TargetArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the chosen variant's self-tests against the kernel's own scalar reference.
    Selftest {
        #[command(flatten)]
        target: TargetArgs,
        /// The seed for generated data.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Elements per test.
        #[arg(long, default_value_t = 1 << 16)]
        size: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Call a function on tensors generated from its signature and print its throughput.
    Bench {
        #[command(flatten)]
        target: TargetArgs,
        /// The function.
        function: String,
        /// Elements in the largest tensor.
        #[arg(long, default_value_t = 16 << 20)]
        size: usize,
        /// Timed calls (the median is reported).
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Download a release's variant for this host (or all variants) into the store.
    Fetch {
        /// The repository, org/name.
        repo: String,
        /// A version requirement (^1.2, ~1.2.3, =1.2.0, ">=1, <3", *).
        #[arg(long, default_value = "*")]
        version: String,
        /// Fetch every variant, not only the one for this host.
        #[arg(long)]
        all_variants: bool,
        #[command(flatten)]
        select: SelectArgs,
        #[command(flatten)]
        registry: registry::RegistryArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resolve the kernels kernels.toml declares and pin them in khub.lock.
    Lock {
        /// The application's declaration file.
        #[arg(long, default_value = "kernels.toml", value_name = "FILE")]
        app: PathBuf,
        /// The lockfile to write.
        #[arg(long, default_value = "khub.lock", value_name = "FILE")]
        out: PathBuf,
        /// A target host profile (repeatable; default: this machine).
        #[arg(long, value_name = "FILE")]
        host: Vec<PathBuf>,
        /// Preferences, as for explain.
        #[arg(long, value_name = "PREF")]
        prefer: Vec<String>,
        #[command(flatten)]
        registry: registry::RegistryArgs,
    },
    /// Declare a kernel in kernels.toml: `org/name@REQ`, or `org/name` for `^` the newest
    /// release in the registry (like `cargo add`). Then run `khub lock`.
    Add {
        /// The repository, with an optional requirement: `acme/activation@^0.1`.
        kernel: String,
        /// The application's declaration file (created when missing).
        #[arg(long, default_value = "kernels.toml", value_name = "FILE")]
        app: PathBuf,
        #[command(flatten)]
        registry: registry::SourceArgs,
    },
    /// Remove a kernel from kernels.toml (the next `khub lock` drops it from khub.lock).
    Remove {
        /// The repository, org/name.
        repo: String,
        /// The application's declaration file.
        #[arg(long, default_value = "kernels.toml", value_name = "FILE")]
        app: PathBuf,
    },
    /// A repository's releases: versions, commits, signed or not, their variants.
    Versions {
        /// The repository, org/name.
        repo: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        registry: registry::SourceArgs,
    },
    /// Print a shell completion script: `khub completions bash > ~/.local/share/bash-completion/completions/khub`.
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Look into the store and heal it: list, re-hash, remove.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Remove store blobs that no lockfile pins, and stale temporary files.
    Gc {
        /// Lockfiles whose files to keep (repeatable; default: ./khub.lock if present).
        #[arg(long = "keep", value_name = "LOCKFILE")]
        keep: Vec<PathBuf>,
        /// Only report what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// The store's root (default: KHUB_CACHE, then ~/.cache/khub).
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
    },
    /// Serve a directory registry over a Hub-compatible HTTP API.
    #[cfg(feature = "serve")]
    Serve {
        /// The registry directory (<org>/<name>/<version>/khub.toml …).
        dir: PathBuf,
        /// The address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: String,
        /// A token every read must present (also KHUB_SERVE_READ_TOKEN).
        #[arg(long, value_name = "TOKEN")]
        read_token: Option<String>,
        /// A token writes must present; without one the server is read-only (also
        /// KHUB_SERVE_WRITE_TOKEN).
        #[arg(long, value_name = "TOKEN")]
        write_token: Option<String>,
        /// One JSON line per request on stderr: method, path, status, bytes, ms, client
        /// (also KHUB_SERVE_LOG=1).
        #[arg(long)]
        access_log: bool,
        #[command(flatten)]
        limits: registry::ServeLimitArgs,
    },
    /// The whole local path on the example kernel: package, explain, load, self-test, bench.
    Demo {
        /// The kernel package (default: kernels-example next to khub's sources).
        #[arg(long, value_name = "DIR")]
        kernel: Option<PathBuf>,
        /// Where to write the release (default: a fresh temporary directory).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        #[command(flatten)]
        toolchain: ToolchainArgs,
    },
    /// Scaffold a kernel package (kernel.toml, C and CUDA sources, tests) that builds at once.
    Init {
        /// The directory to create.
        dir: PathBuf,
        /// The kernel's name (default: the directory's name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Upload a release directory to a Hub-compatible registry (or write it into a directory
    /// registry) as an immutable release.
    #[cfg(feature = "hub")]
    Publish {
        /// The release directory (from `khub package`).
        release: PathBuf,
        /// The repository, org/name.
        #[arg(long, value_name = "ORG/NAME")]
        to: String,
        /// A Hub-compatible URL, or a directory registry written in place (default:
        /// KHUB_REGISTRY, HF_ENDPOINT, https://huggingface.co).
        #[arg(long, value_name = "URL|DIR")]
        registry: Option<String>,
        /// Create the repository if it does not exist.
        #[arg(long)]
        create: bool,
        /// The trust policy loads will apply, checked before anything is uploaded (default:
        /// KHUB_TRUST_POLICY, then ~/.config/khub/trust.toml, else the permissive default).
        #[arg(long, value_name = "FILE")]
        trust: Option<PathBuf>,
        /// Print a JSON summary.
        #[arg(long)]
        json: bool,
    },
    /// Generate a minisign-compatible Ed25519 signing key pair.
    Keygen {
        /// Where to write the public key.
        #[arg(long, default_value = "khub.pub", value_name = "FILE")]
        public: PathBuf,
        /// Where to write the secret key.
        #[arg(long, default_value = "khub.key", value_name = "FILE")]
        secret: PathBuf,
        /// Encrypt the secret key with the password in this environment variable (default:
        /// KHUB_SIGNING_PASSWORD when set; otherwise the key is written unencrypted, mode 0600).
        #[arg(long, value_name = "VAR")]
        password_env: Option<String>,
    },
    /// Sign a release's manifest: writes khub.toml.minisig (minisign format).
    Sign {
        /// The release directory.
        release: PathBuf,
        /// The secret key.
        #[arg(long, default_value = "khub.key", value_name = "FILE")]
        key: PathBuf,
        /// The repository the release is published as, org/name (goes into the trusted
        /// comment, so the signature cannot be replayed for another repository).
        #[arg(long, value_name = "ORG/NAME")]
        repo: String,
        /// How long the signature stays valid: days (`90d`), or `never`.
        #[arg(long, default_value = "365d")]
        expires: String,
        /// The environment variable holding the key's password (default:
        /// KHUB_SIGNING_PASSWORD).
        #[arg(long, value_name = "VAR")]
        password_env: Option<String>,
    },
    /// Internal: load a library in this process and print its descriptor as JSON.
    #[command(name = "__describe", hide = true)]
    Describe {
        /// The library.
        library: PathBuf,
    },
    /// Internal: run a GPU probe in this process and print its result as JSON.
    #[command(name = "__probe", hide = true)]
    Probe {
        /// The probe: `cuda`.
        what: String,
    },
}

/// Toolchain options for building kernels.
#[derive(clap::Args, Debug)]
struct ToolchainArgs {
    /// Fail when a variant's toolchain (nvcc, clang for HIP) is missing, instead of skipping it.
    #[arg(long)]
    strict: bool,
    /// The nvcc to use (default: KHUB_NVCC, PATH, $CUDA_HOME/bin).
    #[arg(long, value_name = "PATH")]
    nvcc: Option<PathBuf>,
    /// An extra argument for nvcc (repeatable), e.g. an include path.
    #[arg(long = "nvcc-arg", value_name = "ARG", allow_hyphen_values = true)]
    nvcc_args: Vec<String>,
    /// The clang that builds HIP variants (default: KHUB_HIPCC, clang-19 on PATH,
    /// $ROCM_PATH/llvm/bin/clang, clang on PATH).
    #[arg(long, value_name = "PATH")]
    hipcc: Option<PathBuf>,
    /// Build only this variant (repeatable; default: every variant kernel.toml declares).
    #[arg(long = "variant", value_name = "ID")]
    only: Vec<String>,
}

impl ToolchainArgs {
    fn into_toolchain(self) -> kernel::Toolchain {
        kernel::Toolchain {
            strict: self.strict,
            nvcc: self.nvcc,
            nvcc_args: self.nvcc_args,
            hip: self.hipcc,
            only: self.only,
        }
    }
}

/// Which kernel to load: a repository from a registry or a lock, or a release directory
/// named as a path.
#[derive(clap::Args, Debug)]
struct TargetArgs {
    /// A repository `org/name`, or a release directory written as a path (`./dir`,
    /// `../dir`, `/abs/dir`). `org/name` always means a repository, even where a directory
    /// of that name exists.
    target: String,
    /// Development only: load a release directory without applying the trust policy.
    #[arg(long)]
    skip_trust: bool,
    /// For a repository: a version requirement.
    #[arg(long, default_value = "*")]
    version: String,
    /// For a repository: load exactly what khub.lock pins (no version resolution, no
    /// network).
    #[arg(long)]
    locked: bool,
    /// The lockfile for --locked.
    #[arg(long, default_value = "khub.lock", value_name = "FILE")]
    lock: PathBuf,
    #[command(flatten)]
    select: SelectArgs,
    #[command(flatten)]
    registry: registry::RegistryArgs,
}

/// `khub cache …`.
#[derive(Subcommand, Debug)]
enum CacheCommand {
    /// The releases in the store: versions, complete variants, sizes, last use.
    Ls {
        /// The store's root (default: KHUB_CACHE, then ~/.cache/khub).
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every blob; exit 1 when one is damaged (and not repaired).
    Verify {
        /// Move damaged blobs to quarantine and fetch them again from the registry they
        /// came from (when it is the current one and the network is allowed).
        #[arg(long)]
        repair: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        registry: registry::RegistryArgs,
    },
    /// Forget releases and delete the blobs only they use.
    Rm {
        /// The repository `org/name`.
        repo: Option<String>,
        /// Only this version (as `khub cache ls` shows it).
        #[arg(long, requires = "repo")]
        version: Option<String>,
        /// Everything: every release and every blob.
        #[arg(long, conflicts_with = "repo")]
        all: bool,
        /// The store's root (default: KHUB_CACHE, then ~/.cache/khub).
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
    },
}

/// What a target names.
enum Target {
    /// A release directory.
    Path(PathBuf),
    /// A repository.
    Repo(String),
}

/// Reads a target: a path form is a directory, anything else must be `org/name`.
fn classify(target: &str) -> Result<Target> {
    let is_path = target == "."
        || target == ".."
        || target.starts_with('/')
        || target.starts_with("./")
        || target.starts_with("../")
        || target.starts_with("~/");
    if is_path {
        let p = match target.strip_prefix("~/") {
            Some(rest) => match khub::env::var_os(khub::env::HOME) {
                Some(home) => PathBuf::from(home).join(rest),
                None => bail!("`{target}` starts with ~/, but HOME is not set; write the directory's full path"),
            },
            None => PathBuf::from(target),
        };
        return Ok(Target::Path(p));
    }
    match target.parse::<khub::registry::RepoId>() {
        Ok(_) => Ok(Target::Repo(target.to_owned())),
        Err(e) if Path::new(target).join("khub.toml").is_file() => {
            bail!("`{target}` is not a repository ({e}); to load the release directory of that name, write it as a path: ./{target}")
        }
        Err(e) => bail!("`{target}` is neither a repository org/name ({e}) nor a path (write a directory as ./dir or /abs/dir)"),
    }
}

impl TargetArgs {
    /// Loads the kernel; returns it, how long loading took, and why its bytes are trusted.
    fn open(self) -> Result<(khub::Kernel, std::time::Duration, String)> {
        let prefs = parse_preferences(&self.select.prefer)?;
        let started = std::time::Instant::now();
        let target = classify(&self.target)?;
        let (kernel, trust) = match target {
            Target::Path(dir) => {
                if self.locked {
                    bail!(
                        "--locked loads only what {} pins, by repository: name the repository (org/name), not the directory {}",
                        self.lock.display(),
                        dir.display()
                    );
                }
                if !dir.exists() {
                    bail!("{} does not exist", dir.display());
                }
                if !dir.join("khub.toml").is_file() {
                    bail!("{} is not a release directory: there is no khub.toml in it", dir.display());
                }
                let release = khub::Release::open(&dir)?;
                let trust = if self.skip_trust {
                    "not checked (--skip-trust)".to_owned()
                } else {
                    let policy = registry::trust_policy(&self.registry)?;
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    match release.check_trust(&policy, now)? {
                        khub::verify::trust::TrustDecision::Signed { key_id, claim } => {
                            format!(
                                "signed by key {key_id} for {} {}, verified under the trust policy",
                                claim.repo, claim.version
                            )
                        }
                        khub::verify::trust::TrustDecision::Unsigned => {
                            "unsigned; accepted under the trust policy (it requires no signature)".to_owned()
                        }
                    }
                };
                let host = detect_host(&probe_options(self.select.host)?)?;
                (release.load(&host, &prefs)?, trust)
            }
            Target::Repo(repo) => {
                if self.skip_trust {
                    bail!("--skip-trust applies to release directories only; a repository is always checked against the trust policy");
                }
                let locked = self.locked.then_some(self.lock.as_path());
                registry::load_kernel(&repo, &self.version, locked, &self.registry, self.select.host, prefs)?
            }
        };
        Ok((kernel, started.elapsed(), trust))
    }
}

/// How to pick the variant to load.
#[derive(clap::Args, Debug)]
struct SelectArgs {
    /// A host-profile TOML file to resolve for (also KHUB_HOST_PROFILE).
    #[arg(long, value_name = "FILE")]
    host: Option<PathBuf>,
    /// Preferences: `backend=cpu`, `variant=ID`, `no-jit`, `device=N`. Repeatable.
    #[arg(long, value_name = "PREF")]
    prefer: Vec<String>,
}

pub fn main() -> ExitCode {
    // Like any Unix filter: `khub … | head` ends quietly when the reader goes away, rather
    // than panicking on the failed write (Rust ignores SIGPIPE by default).
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE at startup, before any thread
    // is spawned; `signal` has no other effect.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    // With --json anywhere on the command line, an error is one JSON object on stderr.
    let json = std::env::args_os().any(|a| a == "--json");
    let network = network_context(&cli);
    let level = if cli.quiet {
        Verbosity::Quiet
    } else if cli.verbose {
        Verbosity::Verbose
    } else {
        Verbosity::Normal
    };
    VERBOSITY.store(level as u8, std::sync::atomic::Ordering::Relaxed);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            const FAILED: u8 = 2;
            use khub::registry::RegistryError;
            let unreachable = e.chain().any(|c| {
                let registry = c.downcast_ref::<RegistryError>().or(match c.downcast_ref::<khub::hub::HubError>() {
                    Some(khub::hub::HubError::Registry(r)) => Some(r),
                    _ => None,
                });
                matches!(registry, Some(RegistryError::Transport { .. }))
            });
            let hint = match network {
                Some((repo, args)) if unreachable => Some(registry::unreachable_hint(&repo, &args)),
                _ => None,
            };
            let r = report::Report::new(&e, hint);
            if json {
                eprintln!("{}", r.json(FAILED));
            } else {
                eprintln!("{}", r.text());
            }
            ExitCode::from(FAILED)
        }
    }
}

/// The repository and registry options of a command that talks to a registry, for the
/// hint when the registry cannot be reached.
fn network_context(cli: &Cli) -> Option<(String, registry::RegistryArgs)> {
    match &cli.command {
        Command::Load { target, .. } | Command::Selftest { target, .. } | Command::Bench { target, .. } => {
            Some((target.target.clone(), target.registry.clone()))
        }
        Command::Fetch { repo, registry, .. } => Some((repo.clone(), registry.clone())),
        Command::Versions { repo, registry, .. } => Some((repo.clone(), registry.clone().into())),
        Command::Add { kernel, registry, .. } => Some((kernel.split('@').next().unwrap_or_default().to_owned(), registry.clone().into())),
        Command::Explain { target, registry, .. } => Some((target.clone(), registry.clone())),
        _ => None,
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Host { host, json } => host::run(&probe_options(host)?, json),
        Command::Explain {
            target,
            version,
            host,
            prefer,
            json,
            registry: reg,
        } => explain::run(&target, version.as_deref(), &reg, host, &parse_preferences(&prefer)?, json),
        Command::Build {
            kernel,
            out_dir,
            toolchain,
        } => kernel::build(&kernel, out_dir.as_deref(), &toolchain.into_toolchain()),
        Command::Package {
            kernel,
            out,
            force,
            toolchain,
            json,
        } => kernel::package(&kernel, &out, force, &toolchain.into_toolchain(), json),
        Command::Inspect { library, json } => kernel::inspect(&library, json),
        Command::Load { target, json } => {
            let (k, took, trust) = target.open()?;
            kernel::load(&k, took, &trust, json)
        }
        Command::Selftest { target, seed, size, json } => kernel::selftest(&target.open()?.0, seed, size, json),
        Command::Bench {
            target,
            function,
            size,
            iters,
            json,
        } => kernel::bench(&target.open()?.0, &function, size, iters, json),
        Command::Fetch {
            repo,
            version,
            all_variants,
            select,
            registry: reg,
            json,
        } => registry::fetch(
            &repo,
            &version,
            all_variants,
            &reg,
            select.host,
            parse_preferences(&select.prefer)?,
            json,
        ),
        Command::Lock {
            app,
            out,
            host,
            prefer,
            registry: reg,
        } => registry::lock(&app, &out, &host, &reg, parse_preferences(&prefer)?),
        Command::Versions { repo, json, registry: reg } => registry::versions(&repo, &reg.into(), json),
        Command::Add {
            kernel,
            app,
            registry: reg,
        } => registry::add(&kernel, &app, &reg.into()),
        Command::Remove { repo, app } => {
            let id: khub::RepoId = repo.parse()?;
            let old = khub::lock::AppKernels::remove(&app, &id)?;
            println!("removed {id} ({old}) from {}; run `khub lock` to update khub.lock", app.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            use std::io::Write;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "khub", &mut script);
            match std::io::stdout().write_all(&script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(ExitCode::SUCCESS),
            }
        }
        Command::Cache { command } => match command {
            CacheCommand::Ls { cache: c, json } => cache::ls(c.as_ref(), json),
            CacheCommand::Verify { repair, json, registry } => cache::verify(&registry, repair, json),
            CacheCommand::Rm {
                repo,
                version,
                all,
                cache: c,
            } => cache::rm(c.as_ref(), repo.as_deref(), version.as_deref(), all),
        },
        Command::Gc { keep, dry_run, cache: c } => registry::gc(c.as_ref(), &keep, dry_run),
        #[cfg(feature = "serve")]
        Command::Serve {
            dir,
            addr,
            read_token,
            write_token,
            access_log,
            limits,
        } => registry::serve(&dir, &addr, read_token, write_token, access_log, &limits),
        Command::Demo { kernel, out, toolchain } => {
            let kernel_dir = kernel.unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernels-example"));
            // Without --out, the release goes to a temporary directory removed at the end
            // (the loaded library lives in a sealed memfd, not in that directory).
            let (_tmp, out) = match out {
                Some(o) => (None, o),
                None => {
                    let t = tempfile::Builder::new()
                        .prefix("khub-demo-")
                        .tempdir()
                        .context("cannot create a temporary directory for the demo")?;
                    let p = t.path().join("activation-release");
                    (Some(t), p)
                }
            };
            kernel::demo(&kernel_dir, &out, &probe_options(None)?, &toolchain.into_toolchain())
        }
        Command::Describe { library } => kernel::describe(&library),
        Command::Keygen {
            public,
            secret,
            password_env,
        } => keygen(&public, &secret, password(password_env.as_deref())?.as_deref()),
        Command::Sign {
            release,
            key,
            repo,
            expires,
            password_env,
        } => sign(&release, &key, &repo, &expires, password(password_env.as_deref())?.as_deref()),
        Command::Init { dir, name } => {
            let s = khub::package::init::init(&dir, name.as_deref())?;
            println!("created kernel package `{}` in {}:", s.name, dir.display());
            for f in &s.files {
                println!("  {}", f.display());
            }
            println!(
                "next: khub package {} --out {}/release && khub selftest {}/release",
                dir.display(),
                dir.display(),
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "hub")]
        Command::Publish {
            release,
            to,
            registry,
            create,
            trust,
            json,
        } => {
            let repo: khub::registry::RepoId = to.parse()?;
            let env = Environment::capture();
            let policy = registry::trust_policy(&registry::RegistryArgs {
                trust,
                ..Default::default()
            })?;
            let mut log = |line: &str| {
                if !json && verbosity() > Verbosity::Quiet {
                    eprintln!("{line}");
                }
            };
            // A directory registry (--registry ./registry, or KHUB_REGISTRY naming one) is
            // written in place; anything else is a Hub-compatible URL.
            let spec = registry
                .clone()
                .or_else(|| env.get(khub::env::KHUB_REGISTRY).map(str::to_owned))
                .map(|r| khub::hub::RegistrySpec::parse(&r));
            let report = match spec {
                Some(khub::hub::RegistrySpec::Dir(dir)) => {
                    khub::package::publish::publish_to_directory(&release, &repo, &dir, create, Some(&policy), &mut log)?
                }
                _ => {
                    let config = khub::registry::hf::HubConfig::from_env(&env, registry.as_deref())?;
                    khub::package::publish::publish(&release, &repo, config, create, Some(&policy), &mut log)?
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "published {} {} as {} ({}) on {}: {} files, {}, verified after upload",
                    report.repo,
                    report.version,
                    report.tag,
                    khub::registry::short_commit(&report.commit),
                    report.registry,
                    report.files.len(),
                    if report.signed { "signed" } else { "unsigned" }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
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

/// The signing password from `var`, or KHUB_SIGNING_PASSWORD.
fn password(var: Option<&str>) -> Result<Option<String>> {
    let env = Environment::capture();
    match var {
        Some(v) => match khub::env::user_named_var(v) {
            Some(p) => Ok(Some(p)),
            None => bail!("--password-env {v}: the variable is not set"),
        },
        None => Ok(env.get(khub::env::KHUB_SIGNING_PASSWORD).map(str::to_owned)),
    }
}

fn keygen(public: &Path, secret: &Path, password: Option<&str>) -> Result<ExitCode> {
    let pair = khub::package::sign::keygen_files(public, secret, password)?;
    let key = &pair.public;
    println!("public key {} (id {}) -> {}", key, key.key_id(), public.display());
    println!(
        "secret key -> {} ({})",
        secret.display(),
        if pair.encrypted { "encrypted" } else { "unencrypted, mode 0600" }
    );
    println!("trust it on hosts with a [[publisher]] entry in the trust policy: keys = [\"{key}\"]");
    Ok(ExitCode::SUCCESS)
}

fn sign(release: &Path, key: &Path, repo: &str, expires: &str, password: Option<&str>) -> Result<ExitCode> {
    let repo: khub::RepoId = repo.parse()?;
    let expires: khub::package::sign::Expiry = expires.parse()?;
    let signed = khub::package::sign::sign_release(release, key, repo, expires, password)?;
    println!(
        "signed {} with key {}: {}",
        signed.signature_path.display(),
        signed.key_id,
        signed.claim
    );
    Ok(ExitCode::SUCCESS)
}

/// A fresh directory under the system temp dir for the demo's release.
/// Reads a manifest from a file, or from `khub.toml` in a directory.
fn read_manifest(path: &Path) -> Result<Manifest> {
    let file = if path.is_dir() { path.join("khub.toml") } else { path.to_owned() };
    let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
    Manifest::from_bytes(&bytes).with_context(|| format!("in {}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clap's own consistency checks over every subcommand (they run only for the
    /// subcommand being parsed otherwise): positional order, conflicts, names.
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn completions_cover_every_command() {
        use clap::CommandFactory;
        let mut script = Vec::new();
        clap_complete::generate(clap_complete::Shell::Bash, &mut Cli::command(), "khub", &mut script);
        let script = String::from_utf8(script).unwrap();
        for cmd in ["load", "fetch", "versions", "cache", "completions"] {
            assert!(script.contains(cmd), "{cmd}");
        }
    }
}
