//! `khub fetch`, `lock`, `gc`, `serve`, and loading kernels by name from a registry or a
//! lockfile.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

use khub::host::{Environment, HostFacts, ProbeOptions};
use khub::hub::{Hub, HubOptions, Progress, RegistrySpec};
use khub::lock::{AppKernels, LOCK_FILE, Lockfile};
use khub::registry::RepoId;
use khub::resolve::Preferences;

/// Where kernels come from: the registry, the network and the store. Commands that only
/// read what a registry lists (`versions`, `add`) take just these.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SourceArgs {
    /// A Hub-compatible URL or a directory registry (default: KHUB_REGISTRY, HF_ENDPOINT,
    /// then https://huggingface.co).
    #[arg(long, value_name = "URL|DIR")]
    pub registry: Option<String>,
    /// Never touch the network: use the store and the lock only (also KHUB_OFFLINE=1,
    /// HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
    /// The store's root (default: KHUB_CACHE, then ~/.cache/khub).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
}

/// Where kernels come from and which to trust, for commands that resolve a release (the
/// trust policy and the rollback check apply to them).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RegistryArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// The trust policy (default: KHUB_TRUST_POLICY, then ~/.config/khub/trust.toml if
    /// present, else: signatures are not required).
    #[arg(long, value_name = "FILE")]
    pub trust: Option<PathBuf>,
    /// Allow loading a lower version than seen before under the same requirement.
    #[arg(long)]
    pub allow_rollback: bool,
}

impl From<SourceArgs> for RegistryArgs {
    fn from(source: SourceArgs) -> Self {
        RegistryArgs {
            source,
            ..Default::default()
        }
    }
}

/// Builds a hub from the environment, the registry flags, a host profile and preferences.
pub fn hub(args: &RegistryArgs, host: Option<PathBuf>, prefs: Preferences) -> Result<Hub> {
    let mut env = Environment::capture();
    // --cache stands for KHUB_CACHE: with it, no default cache directory (HOME) is needed.
    if let Some(c) = &args.source.cache {
        env.set(khub::env::KHUB_CACHE, c.display().to_string());
    }
    let mut probe = super::probe_options(host)?;
    probe.env = env.clone();
    // The NVIDIA probe's answer is cached per boot in the cache directory (docs/host.md),
    // so a warm command starts no probe helper.
    probe.host_cache = khub::store::Store::default_root(&env)
        .ok()
        .map(|d| khub::host::cache::default_path(&d));
    // The host is probed once, here, under the CLI's isolation (a helper process for the
    // driver) and with --host applied; the hub takes these facts as they are.
    let facts = HostFacts::detect(&probe)?.facts;
    let mut o = HubOptions::from_env_for_host(env, facts)?;
    if let Some(r) = &args.source.registry {
        o.registry = RegistrySpec::parse(r);
    }
    if args.source.offline {
        o.offline = true;
    }
    if let Some(c) = &args.source.cache {
        o.cache = c.clone();
    }
    if args.trust.is_some() {
        o.trust = trust_policy(args)?;
    }
    if args.allow_rollback {
        o.trust = o.trust.allow_rollback("*");
    }
    o.preferences = prefs;
    if super::verbosity() == super::Verbosity::Verbose {
        eprintln!(
            "registry {}{}\nstore    {}\nhost     {}",
            o.registry.describe(),
            if o.offline { " (offline: not contacted)" } else { "" },
            o.cache.display(),
            khub::resolve::describe_host(&o.host)
        );
    }
    Ok(Hub::new(o)?)
}

/// `khub add org/name[@REQ]`: declares the kernel in `app`; without a requirement, `^`
/// the newest usable release the registry has, as `cargo add` does.
pub fn add(spec: &str, app: &Path, args: &RegistryArgs) -> Result<ExitCode> {
    let (repo, requirement) = match spec.split_once('@') {
        Some((r, q)) => (r, Some(q.trim().to_owned())),
        None => (spec, None),
    };
    let id: RepoId = repo.parse()?;
    let requirement = match requirement {
        Some(q) if q.is_empty() => {
            bail!("`{spec}` has an empty requirement after @; write org/name@^1.2, or org/name for the newest release")
        }
        Some(q) => q,
        None => {
            let mut args = args.clone();
            if args.source.registry.is_none()
                && let Ok(decl) = AppKernels::read(app)
                && let Some(r) = decl.registry
            {
                args.source.registry = Some(r.url);
            }
            let hub = hub(&args, None, Preferences::default())?;
            let newest = hub
                .versions(&id)?
                .into_iter()
                .filter(|r| r.problem.is_none())
                .filter_map(|r| r.version.parse::<semver::Version>().ok())
                .max()
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "{id} has no releases on {} to add; give a requirement: {id}@^1.0",
                        hub.registry_name()
                    )
                })?;
            if newest.major == 0 && newest.minor == 0 {
                format!("^0.0.{}", newest.patch)
            } else if newest.major == 0 {
                format!("^0.{}", newest.minor)
            } else {
                format!("^{}.{}", newest.major, newest.minor)
            }
        }
    };
    match AppKernels::add(app, &id, &requirement)? {
        Some(old) if old == requirement => println!("{id} = \"{requirement}\" is already in {}", app.display()),
        Some(old) => println!(
            "changed {id} from \"{old}\" to \"{requirement}\" in {}; run `khub lock` to update khub.lock",
            app.display()
        ),
        None => println!("added {id} = \"{requirement}\" to {}; run `khub lock` to pin it", app.display()),
    }
    Ok(ExitCode::SUCCESS)
}

/// The hint for a registry that did not answer, with `--offline` when the store holds
/// releases of `repo` fetched from that registry before.
pub fn unreachable_hint(repo: &str, args: &RegistryArgs) -> String {
    let base = "the registry did not answer: check the URL (--registry, KHUB_REGISTRY, HF_ENDPOINT) and that the server is up";
    let mut offline = args.clone();
    offline.source.offline = true;
    let stored = repo
        .parse::<RepoId>()
        .ok()
        .and_then(|id| hub(&offline, None, Preferences::default()).ok()?.versions(&id).ok())
        .map_or(0, |v| v.len());
    match stored {
        0 => base.to_owned(),
        n => format!(
            "{base}; the store holds {n} release{} of {repo} from it: add --offline to use {}",
            if n == 1 { "" } else { "s" },
            if n == 1 { "it" } else { "them" }
        ),
    }
}

/// The trust policy: `--trust FILE`, else the environment's (KHUB_TRUST_POLICY, then
/// ~/.config/khub/trust.toml, else the permissive default).
pub fn trust_policy(args: &RegistryArgs) -> Result<khub::verify::trust::TrustPolicy> {
    Ok(match &args.trust {
        Some(t) => khub::verify::trust::TrustPolicy::read(t)?,
        None => khub::verify::trust::TrustPolicy::from_env(&Environment::capture())?,
    })
}

/// Progress bars on a terminal, nothing otherwise.
pub struct Bars {
    multi: Option<indicatif::MultiProgress>,
    bars: Mutex<std::collections::BTreeMap<String, indicatif::ProgressBar>>,
}

impl Bars {
    pub fn new(quiet: bool) -> Self {
        let quiet = quiet || super::verbosity() == super::Verbosity::Quiet;
        let multi = (!quiet && std::io::stderr().is_terminal()).then(indicatif::MultiProgress::new);
        Bars {
            multi,
            bars: Mutex::new(Default::default()),
        }
    }
}

impl Progress for Bars {
    fn start(&self, file: &str, size: u64) {
        let Some(m) = &self.multi else { return };
        let bar = m.add(indicatif::ProgressBar::new(size));
        let (name_width, bar_width) = bar_layout(terminal_width());
        let style = indicatif::ProgressStyle::with_template(&format!(
            "{{msg:{name_width}}} {{bar:{bar_width}}} {{bytes:>9}}/{{total_bytes:9}} {{bytes_per_sec:>11}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_message(fit_name(file, name_width));
        if let Ok(mut b) = self.bars.lock() {
            b.insert(file.to_owned(), bar);
        }
    }

    fn advance(&self, file: &str, bytes: u64) {
        if let Ok(b) = self.bars.lock()
            && let Some(bar) = b.get(file)
        {
            bar.inc(bytes);
        }
    }

    fn finish(&self, file: &str, _downloaded: bool) {
        if let Ok(b) = self.bars.lock()
            && let Some(bar) = b.get(file)
        {
            bar.finish();
        }
    }
}

/// The columns of stderr's terminal (80 when unknown; never below 80).
fn terminal_width() -> usize {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we pass; a descriptor that is
    // not a terminal makes it fail without writing.
    let ok = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 { usize::from(ws.ws_col).max(80) } else { 80 }
}

/// The widths of the file name and of the bar for a terminal `width` columns wide: the
/// sizes and the rate take 31 columns, the separators 3; the name gets up to 40.
fn bar_layout(width: usize) -> (usize, usize) {
    let rest = width.max(80) - 31 - 3 - 1;
    let name = (rest / 2).min(40);
    (name, rest - name)
}

/// `file` in at most `width` columns: whole when it fits, else its last path components,
/// else its end behind `…` (never cut in the middle of a name's start).
fn fit_name(file: &str, width: usize) -> String {
    if file.chars().count() <= width {
        return file.to_owned();
    }
    let parts: Vec<&str> = file.split('/').collect();
    for skip in 1..parts.len() {
        let tail = format!("…/{}", parts[skip..].join("/"));
        if tail.chars().count() <= width {
            return tail;
        }
    }
    let chars: Vec<char> = file.chars().collect();
    let keep = width.saturating_sub(1);
    format!("…{}", chars[chars.len() - keep..].iter().collect::<String>())
}

pub fn fetch(
    repo: &str,
    version: &str,
    all_variants: bool,
    args: &RegistryArgs,
    host: Option<PathBuf>,
    prefs: Preferences,
    json: bool,
) -> Result<ExitCode> {
    let repo: RepoId = repo.parse()?;
    let hub = hub(args, host, prefs)?;
    let bars = Bars::new(json);
    let report = hub.fetch(&repo, version, all_variants, &bars)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "fetched {} {} ({}) variant{} {}: {} file{} downloaded ({} bytes), {} already in the store at {}",
            report.repo,
            report.version,
            khub::registry::short_commit(&report.commit),
            if report.variants.len() == 1 { "" } else { "s" },
            report.variants.join(", "),
            report.downloaded,
            if report.downloaded == 1 { "" } else { "s" },
            report.downloaded_bytes,
            report.cached,
            hub.store().root().display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn versions(repo: &str, args: &RegistryArgs, json: bool) -> Result<ExitCode> {
    let id: RepoId = repo.parse()?;
    let hub = hub(args, None, Preferences::default())?;
    let list = hub.versions(&id)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    if list.is_empty() {
        println!(
            "{id} has no releases on {}{}",
            hub.registry_name(),
            if hub.offline() { " known to this machine (offline)" } else { "" }
        );
    }
    for r in &list {
        let what = match &r.problem {
            Some(p) => format!("manifest unusable: {p}"),
            None => format!(
                "{} variant{}: {}",
                r.variants.len(),
                if r.variants.len() == 1 { "" } else { "s" },
                r.variants.join(", ")
            ),
        };
        println!(
            "{:<12} {:<8} {}  {what}",
            r.version,
            if r.signed { "signed" } else { "unsigned" },
            khub::registry::short_commit(&r.commit)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Loads a kernel by repository id: from the lock when `locked`, else resolved and fetched.
/// Returns it with one line saying why its bytes are trusted.
pub fn load_kernel(
    repo: &str,
    version: &str,
    locked: Option<&Path>,
    args: &RegistryArgs,
    host: Option<PathBuf>,
    prefs: Preferences,
) -> Result<(khub::Kernel, String)> {
    let id: RepoId = repo.parse()?;
    let hub = hub(args, host, prefs)?;
    match locked {
        Some(path) => {
            let lock = Lockfile::read(path)?;
            let kernel = hub.load_locked(&lock, path, &id)?;
            let digest = lock.get(&id).map(|k| k.manifest_sha256.to_string()).unwrap_or_default();
            Ok((kernel, format!("pinned by {} (manifest sha256 {digest})", path.display())))
        }
        None => {
            let (release, kernel) = hub.load_release(&id, version)?;
            let trust = match &release.signed_by {
                Some(key) => format!("signed by key {key} for {id} {}, verified under the trust policy", release.version),
                None if release.signature_sha256.is_some() => {
                    "has a signature no trusted key checks; accepted unsigned under the trust policy".to_owned()
                }
                None => "unsigned; accepted under the trust policy (it requires no signature for this repository)".to_owned(),
            };
            Ok((kernel, trust))
        }
    }
}

pub fn lock(app: &Path, out: &Path, hosts: &[PathBuf], args: &RegistryArgs, prefs: Preferences) -> Result<ExitCode> {
    let decl = AppKernels::read(app).with_context(|| format!("the application declares its kernels in {}", app.display()))?;
    if decl.kernels.is_empty() {
        bail!(
            "{} declares no kernels: add lines like \"org/name\" = \"^1.0\" under [kernels]",
            app.display()
        );
    }
    let mut args = args.clone();
    if args.source.registry.is_none()
        && let Some(r) = &decl.registry
    {
        args.source.registry = Some(r.url.clone());
    }
    let hub = hub(&args, None, prefs)?;
    let mut targets = Vec::new();
    if hosts.is_empty() {
        targets.push(("this machine".to_owned(), hub.host().clone()));
    }
    for h in hosts {
        let mut o = ProbeOptions::from_env()?;
        o.profile = Some(h.clone());
        targets.push((h.display().to_string(), HostFacts::detect(&o)?.facts));
    }
    let mut existing = if out.exists() { Lockfile::read(out)? } else { Lockfile::new() };
    // Like cargo: a kernel no longer declared leaves the lock.
    let pruned: Vec<String> = existing
        .kernels
        .iter()
        .filter(|k| !decl.kernels.contains_key(&k.repo))
        .map(|k| k.repo.to_string())
        .collect();
    existing.kernels.retain(|k| decl.kernels.contains_key(&k.repo));
    let lock = hub.lock(&decl, &targets, existing, &Bars::new(false))?;
    lock.write(out)?;
    println!(
        "wrote {} ({} kernel{}, {} target host{})",
        out.display(),
        lock.kernels.len(),
        if lock.kernels.len() == 1 { "" } else { "s" },
        targets.len(),
        if targets.len() == 1 { "" } else { "s" }
    );
    for k in &lock.kernels {
        for t in &k.targets {
            println!("  {} {} {} -> {} [{}]", k.repo, k.requirement, k.version, t.variant, t.host);
        }
    }
    for r in &pruned {
        println!("  removed {r} (no longer in {})", app.display());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn gc(cache: Option<&PathBuf>, keep_locks: &[PathBuf], dry_run: bool) -> Result<ExitCode> {
    let env = Environment::capture();
    let root = match cache {
        Some(c) => c.clone(),
        None => khub::store::Store::default_root(&env)?,
    };
    let store = khub::store::Store::open(&root)?;
    let mut locks: Vec<PathBuf> = keep_locks.to_vec();
    if locks.is_empty() && Path::new(LOCK_FILE).exists() {
        locks.push(PathBuf::from(LOCK_FILE));
    }
    let mut keep = std::collections::BTreeSet::new();
    for l in &locks {
        let lock = Lockfile::read(l)?;
        for k in &lock.kernels {
            keep.insert(k.manifest_sha256);
            for t in &k.targets {
                keep.extend(t.files.iter().map(|f| f.sha256));
            }
        }
    }
    // What gc keeps must be intact: a damaged kept blob is quarantined (and then removed
    // below), so the next fetch downloads it again.
    let mut damaged = 0usize;
    if !dry_run {
        for (d, size) in store.list()? {
            if keep.contains(&d) && !store.verify_blob(&d, size)? {
                damaged += 1;
            }
        }
    }
    let report = store.gc(&keep, dry_run)?;
    if damaged > 0 {
        println!(
            "{damaged} pinned blob{} failed verification and {} removed; `khub fetch` (or `khub lock`) downloads {} again",
            if damaged == 1 { "" } else { "s" },
            if damaged == 1 { "was" } else { "were" },
            if damaged == 1 { "it" } else { "them" }
        );
    }
    println!(
        "{} {} blob{} ({} bytes), kept {}, removed {} temporary file{} (pinned by: {})",
        if dry_run { "would remove" } else { "removed" },
        report.removed,
        if report.removed == 1 { "" } else { "s" },
        report.removed_bytes,
        report.kept,
        report.tmp_removed,
        if report.tmp_removed == 1 { "" } else { "s" },
        if locks.is_empty() {
            "no lockfile".to_owned()
        } else {
            locks.iter().map(|l| l.display().to_string()).collect::<Vec<_>>().join(", ")
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// The limits of `khub serve` (docs/serve.md); each wins over its `KHUB_SERVE_*` variable.
#[cfg(feature = "serve")]
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeLimitArgs {
    /// The most connections served at once (default 1024, never more than `ulimit -n` less
    /// 64; KHUB_SERVE_MAX_CONNECTIONS).
    #[arg(long, value_name = "N")]
    max_connections: Option<String>,
    /// The largest request head, in bytes (default 64K; KHUB_SERVE_MAX_HEADER_BYTES).
    #[arg(long, value_name = "SIZE")]
    max_header_bytes: Option<String>,
    /// Seconds a client has to send a request head (default 10; KHUB_SERVE_HEADER_TIMEOUT).
    #[arg(long, value_name = "SECS")]
    header_timeout: Option<String>,
    /// Seconds a request may go without a byte read or written (default 30;
    /// KHUB_SERVE_BODY_TIMEOUT).
    #[arg(long, value_name = "SECS")]
    body_timeout: Option<String>,
    /// Seconds an idle kept-alive connection stays open (default 30; KHUB_SERVE_IDLE_TIMEOUT).
    #[arg(long, value_name = "SECS")]
    idle_timeout: Option<String>,
    /// The largest JSON request body (default 1M; KHUB_SERVE_MAX_JSON_BYTES).
    #[arg(long, value_name = "SIZE")]
    max_json_bytes: Option<String>,
    /// The largest file in a commit (default 1G; KHUB_SERVE_MAX_FILE_BYTES).
    #[arg(long, value_name = "SIZE")]
    max_file_bytes: Option<String>,
    /// The largest commit body (default 2G; KHUB_SERVE_MAX_COMMIT_BYTES).
    #[arg(long, value_name = "SIZE")]
    max_commit_bytes: Option<String>,
    /// Requests a second per client address, 0 for no limit (default 500; KHUB_SERVE_RATE).
    #[arg(long, value_name = "N")]
    rate_limit: Option<String>,
    /// Requests a client address may send at once before the rate applies (default 1000;
    /// KHUB_SERVE_RATE_BURST).
    #[arg(long, value_name = "N")]
    rate_burst: Option<String>,
}

#[cfg(feature = "serve")]
pub fn serve(
    dir: &Path,
    addr: &str,
    read_token: Option<String>,
    write_token: Option<String>,
    access_log: bool,
    limits: &ServeLimitArgs,
) -> Result<ExitCode> {
    use khub::env as e;
    let mut env = Environment::capture();
    let read_token = read_token.or_else(|| env.get(e::KHUB_SERVE_READ_TOKEN).map(str::to_owned));
    let write_token = write_token.or_else(|| env.get(e::KHUB_SERVE_WRITE_TOKEN).map(str::to_owned));
    // A flag wins over its variable: set it in the snapshot, then parse them all alike.
    for (var, flag) in [
        (e::KHUB_SERVE_MAX_CONNECTIONS, &limits.max_connections),
        (e::KHUB_SERVE_MAX_HEADER_BYTES, &limits.max_header_bytes),
        (e::KHUB_SERVE_HEADER_TIMEOUT, &limits.header_timeout),
        (e::KHUB_SERVE_BODY_TIMEOUT, &limits.body_timeout),
        (e::KHUB_SERVE_IDLE_TIMEOUT, &limits.idle_timeout),
        (e::KHUB_SERVE_MAX_JSON_BYTES, &limits.max_json_bytes),
        (e::KHUB_SERVE_MAX_FILE_BYTES, &limits.max_file_bytes),
        (e::KHUB_SERVE_MAX_COMMIT_BYTES, &limits.max_commit_bytes),
        (e::KHUB_SERVE_RATE, &limits.rate_limit),
        (e::KHUB_SERVE_RATE_BURST, &limits.rate_burst),
    ] {
        if let Some(v) = flag {
            env.set(var, v.clone());
        }
    }
    let options = khub::serve::ServeOptions {
        read_token,
        write_token,
        limits: khub::serve::Limits::from_env(&env)?,
        access_log,
        handle_signals: true,
        ..Default::default()
    };
    let writable = options.write_token.is_some();
    let server = khub::serve::Server::start(dir, addr, options)?;
    eprintln!(
        "khub serve: {} on {} ({}; HF_ENDPOINT={} works for huggingface_hub)",
        dir.display(),
        server.url(),
        if writable { "read-write with the write token" } else { "read-only" },
        server.url()
    );
    // Returns after SIGTERM or SIGINT, once the requests in flight are answered.
    server.wait();
    eprintln!("khub serve: stopped");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_fit_the_terminal() {
        for width in [40, 80, 100, 132, 200, 400] {
            let (name, bar) = bar_layout(width);
            // name, space, bar, space, "123.4 MiB/123.4 MiB", space, rate.
            assert!(name + 1 + bar + 1 + 19 + 1 + 11 <= width.max(80), "{width}: {name} + {bar}");
            assert!(name >= 20 && bar >= 10, "{width}: {name} {bar}");
        }
    }

    #[test]
    fn long_file_names_keep_their_end() {
        let f = "variants/cuda-sm80-sm90a-x86_64-linux/libactivation.so";
        assert_eq!(fit_name(f, 60), f);
        assert_eq!(fit_name(f, 48), "…/cuda-sm80-sm90a-x86_64-linux/libactivation.so");
        assert_eq!(fit_name(f, 40), "…/libactivation.so");
        assert_eq!(fit_name(f, 20), "…/libactivation.so");
        assert_eq!(fit_name(f, 10).chars().count(), 10);
        assert!(fit_name(f, 10).ends_with("tion.so"));
    }
}
