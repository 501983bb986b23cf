//! The bodies of khub's fuzz targets, one function per target: arbitrary bytes into one
//! of khub's public parsers, which must return (`Ok` or a typed error), never panic, and
//! keep the cheap properties checked here.
//!
//! Shared by the cargo-fuzz binaries (`fuzz/fuzz_targets/*.rs`, nightly) and by
//! `tests/fuzz_corpus.rs` (stable), which includes this file with `#[path]` and replays
//! every committed corpus input through [`TARGETS`]: the two cannot drift.
#![allow(clippy::disallowed_methods)] // scratch files only (the served registry); keep test builds quiet

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use khub::inspect::{self, AmdCodeObjectHeader};
use khub::lock::{AppKernels, Lockfile};
use khub::manifest::Manifest;
use khub::verify::sign::{self, PublicKey, ReleaseClaim};
use khub::verify::trust::TrustPolicy;

/// The body of one target.
pub type Target = fn(&[u8]);

/// Every target: its name (its binary, and its directories `fuzz/seeds/<name>` and
/// `fuzz/corpus/<name>`) and its body.
pub const TARGETS: &[(&str, Target)] = &[
    ("manifest", manifest),
    ("lockfile", lockfile),
    ("app_kernels", app_kernels),
    ("trust_policy", trust_policy),
    ("minisig", minisig),
    ("elf", elf),
    ("nv_fatbin", nv_fatbin),
    ("hip_bundle", hip_bundle),
    #[cfg(feature = "serve")]
    ("serve_request", serve_request),
];

/// The manifest bytes that `fuzz/keys/fuzz.pub` signed (signature `fuzz/keys/signed-khub.toml.minisig`).
const SIGNED_MANIFEST: &[u8] = include_bytes!("../keys/signed-khub.toml");
/// The public key that signed [`SIGNED_MANIFEST`].
const FUZZ_PUB: &str = include_str!("../keys/fuzz.pub");

fn fuzz_key() -> &'static PublicKey {
    static KEY: OnceLock<PublicKey> = OnceLock::new();
    KEY.get_or_init(|| FUZZ_PUB.parse().expect("fuzz/keys/fuzz.pub parses"))
}

/// `fuzz/keys`, the base directory of relative key paths in trust policies, from the
/// fuzz crate (`CARGO_MANIFEST_DIR` = `fuzz/`) and from the main crate's tests.
fn keys_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        [here.join("keys"), here.join("fuzz/keys")]
            .into_iter()
            .find(|d| d.join("fuzz.pub").is_file())
            .expect("fuzz/keys/fuzz.pub exists")
    })
}

/// `khub.toml`: [`Manifest::from_bytes`] (which validates); an accepted manifest validates
/// again, and round-trips through `to_toml_string` → `from_toml_str` to an equal value.
pub fn manifest(data: &[u8]) {
    let Ok(m) = Manifest::from_bytes(data) else { return };
    m.validate().expect("a parsed manifest validates");
    let text = m.to_toml_string().expect("a parsed manifest serializes");
    let again = Manifest::from_toml_str(&text).unwrap_or_else(|e| panic!("a written manifest parses: {e}\n{text}"));
    assert_eq!(m, again, "manifest round-trip\n{text}");
}

/// `khub.lock`: [`Lockfile::parse`]; an accepted lock round-trips through the TOML that
/// `Lockfile::write` writes.
pub fn lockfile(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(lock) = Lockfile::parse(text) else { return };
    let written = toml::to_string_pretty(&lock).expect("a parsed lock serializes");
    let again = Lockfile::parse(&written).unwrap_or_else(|e| panic!("a written lock parses: {e}\n{written}"));
    assert_eq!(lock, again, "lock round-trip\n{written}");
}

/// `kernels.toml`: [`AppKernels::parse`]; an accepted file round-trips through TOML.
pub fn app_kernels(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(app) = AppKernels::parse(text) else { return };
    let written = toml::to_string_pretty(&app).expect("a parsed kernels.toml serializes");
    let again = AppKernels::parse(&written).unwrap_or_else(|e| panic!("a written kernels.toml parses: {e}\n{written}"));
    assert_eq!(app, again, "kernels.toml round-trip\n{written}");
}

/// The trust policy: [`TrustPolicy::from_toml`] with relative key paths under
/// `fuzz/keys`; an accepted policy then decides on a fixed signed release (with and
/// without its signature) without panicking, and never accepts that release as signed
/// once a byte of its manifest is flipped.
pub fn trust_policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(policy) = TrustPolicy::from_toml(text, keys_dir()) else {
        return;
    };
    let repo = "acme/act".parse().expect("repo id");
    let version = semver::Version::new(1, 0, 0);
    let now = 1_800_000_000;
    let sig = seed_signature();
    let _ = policy.check(&repo, &version, SIGNED_MANIFEST, None, now);
    let signed = policy.check(&repo, &version, SIGNED_MANIFEST, Some(sig), now);
    // A flipped manifest byte never turns into an accepted *signed* release.
    let mut tampered = SIGNED_MANIFEST.to_vec();
    tampered[0] ^= 1;
    if let Ok(khub::verify::trust::TrustDecision::Signed { .. }) = policy.check(&repo, &version, &tampered, Some(sig), now) {
        panic!("a tampered manifest was accepted as signed (untampered: {signed:?})");
    }
}

/// The valid signature of [`SIGNED_MANIFEST`] (the `minisig` target's main seed).
fn seed_signature() -> &'static [u8] {
    include_bytes!("../keys/signed-khub.toml.minisig")
}

/// `.minisig`: [`sign::signature_key_id`] and [`sign::verify`] against `fuzz/keys/fuzz.pub`
/// over a fixed manifest; an accepted signature's trusted comment goes through
/// [`ReleaseClaim`]'s parser, whose accepted claims print back to the same text. The input
/// is also tried as a public key and as a claim (both print back to what they parsed).
pub fn minisig(data: &[u8]) {
    let key_id = sign::signature_key_id(data);
    if let Ok(v) = sign::verify(fuzz_key(), SIGNED_MANIFEST, data) {
        assert_eq!(key_id.as_deref().ok(), Some(v.key_id.as_str()), "verified key id");
        if let Ok(claim) = v.trusted_comment.parse::<ReleaseClaim>() {
            assert_eq!(claim.to_string(), v.trusted_comment, "claim round-trip");
        }
    }
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(pk) = text.parse::<PublicKey>() {
        let again: PublicKey = pk.to_string().parse().expect("a printed key parses");
        assert_eq!(pk, again, "public key round-trip");
        let again: PublicKey = pk.to_file_text().parse().expect("a key's .pub text parses");
        assert_eq!(pk, again, "public key file round-trip");
    }
    if let Ok(claim) = text.parse::<ReleaseClaim>() {
        assert_eq!(claim.to_string(), text, "claim round-trip");
    }
}

/// The ELF inspector: [`inspect::inspect_library`] on the bytes of a whole file.
pub fn elf(data: &[u8]) {
    if let Ok(info) = inspect::inspect_library(data) {
        let _ = info.cuda_code();
        let _ = info.hip_targets();
    }
}

/// The NVIDIA fat binary parser: [`inspect::parse_nv_fatbin`] on one section's bytes.
pub fn nv_fatbin(data: &[u8]) {
    let (mut out, mut warnings) = (Vec::new(), Vec::new());
    let _ = inspect::parse_nv_fatbin(data, false, &mut out, &mut warnings);
}

/// The HIP offload bundle parser: [`inspect::parse_hip_fatbin`] on one section's bytes,
/// and the AMDGPU code object header reader on the same bytes.
pub fn hip_bundle(data: &[u8]) {
    let (mut out, mut warnings) = (Vec::new(), Vec::new());
    let _ = inspect::parse_hip_fatbin(data, &mut out, &mut warnings);
    for o in &out {
        let _ = o.is_device();
    }
    if let Ok(h) = AmdCodeObjectHeader::read(data) {
        let _ = h.target_id();
    }
}

/// The registry the `serve_request` target serves, and the scratch directory around it.
#[cfg(feature = "serve")]
struct ServeFixture {
    /// `<temp>/khub-fuzz-serve-<pid>`: holds `registry` and nothing else.
    base: PathBuf,
    /// `<base>/registry`: one repository, [`SERVE_REPO`], with one release, [`SERVE_VERSION`].
    root: PathBuf,
}

/// The repository of the served registry (`fuzz/seeds/serve_request` asks for it).
#[cfg(feature = "serve")]
const SERVE_REPO: (&str, &str) = ("acme", "k");
/// Its one release.
#[cfg(feature = "serve")]
const SERVE_VERSION: &str = "1.0.0";

/// The registry, made once per process under the temporary directory (what earlier
/// processes left there is removed once they are gone).
#[cfg(feature = "serve")]
fn serve_fixture() -> &'static ServeFixture {
    static FIXTURE: OnceLock<ServeFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let tmp = std::env::temp_dir();
        remove_stale_fixtures(&tmp);
        let base = tmp.join(format!("khub-fuzz-serve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("registry");
        let release = root.join(SERVE_REPO.0).join(SERVE_REPO.1).join(SERVE_VERSION);
        let lib = b"not really a shared object: the library of acme/k 1.0.0\n";
        let readme = "---\nlicense: apache-2.0\ntags:\n- kernels\n---\n# acme/k\n";
        let manifest = format!(
            "schema = \"1.0\"\n\n[kernel]\nname = \"k\"\nversion = \"{SERVE_VERSION}\"\nabi = 1\n\n\
             [[variants]]\nid = \"cpu\"\nbackend = \"cpu\"\nos = \"linux\"\narch = \"x86_64\"\nlibc = \"glibc 2.17\"\n\
             library = \"variants/cpu/libk.so\"\n\
             files = [{{ path = \"variants/cpu/libk.so\", size = {}, sha256 = \"{}\" }}]\n",
            lib.len(),
            khub::verify::sha256(lib)
        );
        std::fs::create_dir_all(release.join("variants/cpu")).expect("the fuzz registry's directories");
        for (path, bytes) in [
            ("khub.toml", manifest.as_bytes()),
            ("README.md", readme.as_bytes()),
            ("variants/cpu/libk.so", &lib[..]),
        ] {
            std::fs::write(release.join(path), bytes).expect("the fuzz registry's files");
        }
        ServeFixture { base, root }
    })
}

/// Removes the registries of `serve_request` processes that are gone (Linux: no `/proc/<pid>`).
#[cfg(feature = "serve")]
fn remove_stale_fixtures(tmp: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(tmp) else { return };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name();
        let pid = name.to_str().and_then(|n| n.strip_prefix("khub-fuzz-serve-"));
        if pid.is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()) && !Path::new("/proc").join(p).exists()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Removes the entries of `dir` not named in `keep`; whether there were any.
#[cfg(feature = "serve")]
fn prune(dir: &Path, keep: &str) -> bool {
    let mut pruned = false;
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let e = e.expect("a directory entry");
        if e.file_name() != keep {
            let path = e.path();
            let gone = if e.file_type().is_ok_and(|t| t.is_dir()) {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            gone.unwrap_or_else(|e| panic!("removing {}: {e}", path.display()));
            pruned = true;
        }
    }
    pruned
}

/// The server's request handling: [`khub::serve::fuzz::handle_bytes`] sends the bytes (one
/// or more raw HTTP/1.1 requests) on one in-memory connection to `khub serve`'s connection
/// code, router and handlers, over a registry with one release; the connection must end
/// within its time, answered or closed. Requests that write (the write token is
/// [`khub::serve::fuzz::WRITE_TOKEN`]) may create repositories and releases: they are
/// removed after each input, so every input meets the same registry. Nothing may appear
/// beside the registry, and a request without the write token must change nothing.
#[cfg(feature = "serve")]
pub fn serve_request(data: &[u8]) {
    let fx = serve_fixture();
    let status = khub::serve::fuzz::handle_bytes(&fx.root, data).unwrap_or_else(|e| panic!("{e}"));
    if let Some(s) = status {
        assert!((100..600).contains(&s), "status {s}");
    }
    // Whatever a request wrote, it wrote inside the registry ...
    let beside = prune(&fx.base, "registry");
    assert!(!beside, "a request wrote beside the registry");
    // ... and only with the write token. The registry is put back as it was.
    let org = fx.root.join(SERVE_REPO.0);
    let repo = org.join(SERVE_REPO.1);
    let changed = [
        prune(&fx.root, SERVE_REPO.0),
        prune(&org, SERVE_REPO.1),
        prune(&repo, SERVE_VERSION),
    ];
    let token = khub::serve::fuzz::WRITE_TOKEN.as_bytes();
    if changed.contains(&true) {
        assert!(
            data.windows(token.len()).any(|w| w == token),
            "a request without the write token changed the registry"
        );
    }
}
