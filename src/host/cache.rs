//! A per-boot cache of the NVIDIA probe's answer, so a warm command does not load the
//! driver (or start a helper process to load it) again.
//!
//! Design notes:
//! - Only the NVIDIA probe is cached: it is the one that loads vendor code, in a child
//!   process under the CLI, and costs milliseconds. The CPU, libc and AMD probes are
//!   in-process reads that cost microseconds, and stay live (a libc upgraded without a
//!   reboot is seen at once). Profiles and per-fact overrides (`KHUB_CPU_LEVEL`,
//!   `KHUB_CUDA_ARCH`, …) are applied after the cache, on every run, so they never need to
//!   be part of its key and can never be shadowed by it.
//! - The cache is a single JSON file holding one answer and the key it was computed under.
//!   The key is a SHA-256 over everything the answer depends on ([`key`]): the boot id; the
//!   kernel module's version (`/proc/driver/nvidia/version`); the identity (device, inode,
//!   size, modification time) of the dynamic loader's cache `/etc/ld.so.cache`, of every
//!   directory of `LD_LIBRARY_PATH` and of `KHUB_LIBCUDA` / `KHUB_LIBNVML` when they are
//!   paths, and of the probe helper executable; the snapshot's and the process's
//!   `CUDA_VISIBLE_DEVICES`; the probe timeout and isolation; the probe root; khub's
//!   version and this format's. A driver installed, upgraded or reloaded, a reboot, a
//!   different device selection or a different khub all change the key, and the probe
//!   runs again.
//! - Only definite answers are cached: the driver answered (libcuda, or NVML), or nothing
//!   NVIDIA is installed (neither library loads and `/proc/driver/nvidia/version` is
//!   absent). A probe that timed out, crashed, or failed half-way is not cached, so a
//!   transient failure lasts one run, not one boot.
//! - The file is untrusted input. It is read only if it is a regular file (not a symlink,
//!   `O_NOFOLLOW`), owned by this user, not writable by group or others, and under 64 KiB;
//!   it is parsed strictly (unknown fields refused) and may only set the `cuda` facts.
//!   Anything else (a corrupt, truncated, foreign or hostile file) is ignored, the probe
//!   runs, and the file is replaced atomically (a private temp file renamed over it). Host facts
//!   decide which variant is *chosen*, never whether bytes are *trusted*: every loaded
//!   byte is still verified against the manifest, so a forged cache can at worst pick a
//!   variant that fails to load, as a forged `KHUB_CUDA_ARCH` could.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{CudaHost, Detected, FactSource, Isolation, ProbeOptions};
use crate::env;

/// The format of the cache file; a new format is a new number (and a new key).
const FORMAT: u32 = 1;
/// The largest cache file read.
const MAX_BYTES: u64 = 64 * 1024;

/// The cache file: the key it was written under and the NVIDIA facts with their sources.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    format: u32,
    key: String,
    cuda: Option<CudaHost>,
    sources: BTreeMap<String, FactSource>,
}

/// The key for `options` on this machine, as 64 hex digits; `None` when the boot id cannot
/// be read (then nothing is cached: a cache that outlives a reboot is not a per-boot one).
pub(crate) fn key(options: &ProbeOptions) -> Option<String> {
    let root = &options.root;
    let boot_id = std::fs::read_to_string(root.join("proc/sys/kernel/random/boot_id")).ok()?;
    let mut h = Sha256::new();
    let mut line = |name: &str, value: &str| {
        h.update(name.as_bytes());
        h.update(b"=");
        h.update(value.as_bytes());
        h.update(b"\n");
    };
    line("format", &FORMAT.to_string());
    line("khub", env!("CARGO_PKG_VERSION"));
    line("root", &root.display().to_string());
    line("boot-id", boot_id.trim());
    let module = std::fs::read(root.join("proc/driver/nvidia/version"));
    line(
        "nvidia-module",
        &module.map_or_else(|e| format!("absent ({:?})", e.kind()), |b| String::from_utf8_lossy(&b).into_owned()),
    );
    line("ld.so.cache", &identity(&root.join("etc/ld.so.cache")));
    let ld_path = env::var_os_raw(env::LD_LIBRARY_PATH).unwrap_or_default();
    line("LD_LIBRARY_PATH", &ld_path.to_string_lossy());
    for dir in std::env::split_paths(&ld_path) {
        line("ld-dir", &format!("{} {}", dir.display(), identity(&dir)));
    }
    for var in [env::LIBCUDA, env::LIBNVML] {
        let value = options.env.get(var).unwrap_or_default();
        let id = if value.contains('/') {
            identity(Path::new(value))
        } else {
            String::new()
        };
        line(var, &format!("{value} {id}"));
    }
    let cvd = |v: Option<String>| v.map_or_else(|| "(unset)".to_owned(), |v| format!("`{v}`"));
    line(
        "CUDA_VISIBLE_DEVICES",
        &cvd(options.env.get_raw(env::CUDA_VISIBLE_DEVICES).map(str::to_owned)),
    );
    line(
        "CUDA_VISIBLE_DEVICES (process)",
        &cvd(env::var_os_raw(env::CUDA_VISIBLE_DEVICES).map(|v| v.to_string_lossy().into_owned())),
    );
    line("timeout", &format!("{:?}", options.timeout));
    match &options.isolation {
        Isolation::Thread => line("isolation", "thread"),
        Isolation::Subprocess { exe, args } => {
            line("isolation", &format!("subprocess {} {args:?} {}", exe.display(), identity(exe)));
        }
    }
    Some(hex::encode(h.finalize()))
}

/// Device, inode, size and modification time of `path` (following symlinks, as the
/// loader does), or why there is none.
fn identity(path: &Path) -> String {
    match std::fs::metadata(path) {
        #[cfg(unix)]
        Ok(m) => {
            use std::os::unix::fs::MetadataExt;
            format!("{}:{}:{}:{}.{}", m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec())
        }
        #[cfg(not(unix))]
        Ok(m) => format!("{}:{:?}", m.len(), m.modified().ok()),
        Err(e) => format!("absent ({:?})", e.kind()),
    }
}

/// The cached NVIDIA facts for `key` from `path`, applied to `d`; `false` (and `d`
/// untouched) when there is no usable entry for this key.
pub(crate) fn apply(path: &Path, key: &str, d: &mut Detected) -> bool {
    let Some(entry) = read(path) else { return false };
    if entry.format != FORMAT || entry.key != key || !entry.sources.keys().all(|k| is_cuda_fact(k)) {
        return false;
    }
    d.facts.cuda = entry.cuda;
    for (fact, source) in entry.sources {
        d.set_source(&fact, source);
    }
    true
}

/// Records the NVIDIA facts of `d` under `key`. Failing to write is not an error: the
/// next run probes again.
pub(crate) fn record(path: &Path, key: &str, d: &Detected) {
    let entry = Entry {
        format: FORMAT,
        key: key.to_owned(),
        cuda: d.facts.cuda.clone(),
        sources: d
            .sources
            .iter()
            .filter(|(k, _)| is_cuda_fact(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    let Ok(bytes) = serde_json::to_vec_pretty(&entry) else { return };
    if let Some(dir) = path.parent()
        && create_private_dir(dir).is_ok()
    {
        let _ = write_atomic(dir, path, &bytes);
    }
}

/// Replaces `path` with `bytes` through a private temp file in `dir` and a rename, so a
/// reader sees the old file or the new one. Not synced: a crash can at worst leave an
/// empty or short file, which [`read`] refuses, and the next run rewrites.
fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = tempfile::Builder::new().prefix(".nvidia.").suffix(".tmp").tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

fn is_cuda_fact(name: &str) -> bool {
    name == "cuda" || name.starts_with("cuda.")
}

/// Creates `dir` (mode 0700 on Unix) unless it exists; refuses a symlink or a non-directory.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)?;
    let m = std::fs::symlink_metadata(dir)?;
    if !m.is_dir() {
        return Err(std::io::Error::other("not a directory"));
    }
    Ok(())
}

/// Reads and parses the cache file, or `None` when it is absent or not one we trust to
/// parse (see the module notes).
fn read(path: &Path) -> Option<Entry> {
    use std::io::Read;
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    // O_NONBLOCK: a FIFO planted at the path must not block every command that probes
    // the host (it is refused below as not a regular file).
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut opts, libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK);
    let file = opts.open(path).ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.len() > MAX_BYTES {
        return None;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me || meta.mode() & 0o022 != 0 {
            return None;
        }
    }
    let mut bytes = Vec::new();
    file.take(MAX_BYTES + 1).read_to_end(&mut bytes).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The cache file for a cache directory (`KHUB_CACHE`, …): `<cache>/host-v1/nvidia.json`.
pub fn default_path(cache_dir: &Path) -> PathBuf {
    cache_dir.join("host-v1").join("nvidia.json")
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests write scratch files directly
mod tests {
    use super::*;
    use crate::host::Environment;
    use crate::platform::{CpuArch, MajorMinor, Os};

    struct Fx {
        dir: tempfile::TempDir,
    }

    impl Fx {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("root/proc/sys/kernel/random")).unwrap();
            std::fs::write(dir.path().join("root/proc/sys/kernel/random/boot_id"), "boot-1\n").unwrap();
            Fx { dir }
        }
        fn root(&self) -> PathBuf {
            self.dir.path().join("root")
        }
        fn options(&self, pairs: &[(&str, &str)]) -> ProbeOptions {
            let mut o = ProbeOptions::with_env(Environment::from_pairs(pairs.iter().copied())).unwrap();
            o.root = self.root();
            o.isolation = Isolation::Thread;
            o
        }
        fn file(&self) -> PathBuf {
            default_path(&self.dir.path().join("cache"))
        }
    }

    fn detected_with_gpu() -> Detected {
        let mut d = Detected::empty(Os::Linux, CpuArch::X86_64);
        d.facts.cuda = Some(CudaHost {
            driver: MajorMinor::new(12, 8),
            kmd: None,
            runtime: None,
            devices: Vec::new(),
        });
        d.set_source("cuda.driver", FactSource::Probe { method: "test".into() });
        d.set_source(
            "libc",
            FactSource::Probe {
                method: "not cached".into(),
            },
        );
        d
    }

    #[test]
    fn the_key_changes_with_each_input() {
        let fx = Fx::new();
        let base = key(&fx.options(&[])).unwrap();
        assert_eq!(key(&fx.options(&[])).unwrap(), base, "the key is deterministic");
        assert_ne!(key(&fx.options(&[("KHUB_LIBCUDA", "/x/libcuda.so.1")])).unwrap(), base);
        assert_ne!(key(&fx.options(&[("KHUB_LIBNVML", "libnvml-other.so")])).unwrap(), base);
        assert_ne!(key(&fx.options(&[("CUDA_VISIBLE_DEVICES", "1")])).unwrap(), base);
        assert_ne!(
            key(&fx.options(&[("CUDA_VISIBLE_DEVICES", "")])).unwrap(),
            base,
            "empty is not unset"
        );
        let mut o = fx.options(&[]);
        o.timeout = std::time::Duration::from_secs(3);
        assert_ne!(key(&o).unwrap(), base);
        std::fs::create_dir_all(fx.root().join("proc/driver/nvidia")).unwrap();
        std::fs::write(fx.root().join("proc/driver/nvidia/version"), "NVRM version: 550.144.03\n").unwrap();
        let with_module = key(&fx.options(&[])).unwrap();
        assert_ne!(with_module, base, "a loaded kernel module changes the key");
        std::fs::write(fx.root().join("proc/driver/nvidia/version"), "NVRM version: 570.124.06\n").unwrap();
        assert_ne!(key(&fx.options(&[])).unwrap(), with_module, "a reloaded module changes the key");
        std::fs::create_dir_all(fx.root().join("etc")).unwrap();
        std::fs::write(fx.root().join("etc/ld.so.cache"), "ldconfig ran").unwrap();
        let with_ldcache = key(&fx.options(&[])).unwrap();
        assert_ne!(with_ldcache, with_module);
        std::fs::write(fx.root().join("proc/sys/kernel/random/boot_id"), "boot-2\n").unwrap();
        assert_ne!(key(&fx.options(&[])).unwrap(), with_ldcache, "a reboot changes the key");
        // The overrides are applied after the cache, so they are not part of its key.
        assert_eq!(
            key(&fx.options(&[("KHUB_CPU_LEVEL", "x86-64-v2"), ("KHUB_CUDA_ARCH", "9.0")])).unwrap(),
            key(&fx.options(&[])).unwrap()
        );
    }

    #[test]
    fn no_boot_id_means_no_cache() {
        let fx = Fx::new();
        std::fs::remove_file(fx.root().join("proc/sys/kernel/random/boot_id")).unwrap();
        assert_eq!(key(&fx.options(&[])), None);
    }

    #[test]
    fn a_recorded_answer_comes_back_for_its_key_only() {
        let fx = Fx::new();
        let k = key(&fx.options(&[])).unwrap();
        record(&fx.file(), &k, &detected_with_gpu());
        let mut d = Detected::empty(Os::Linux, CpuArch::X86_64);
        assert!(apply(&fx.file(), &k, &mut d));
        assert_eq!(d.facts.cuda, detected_with_gpu().facts.cuda);
        assert!(d.sources.contains_key("cuda.driver"));
        assert!(!d.sources.contains_key("libc"), "only the NVIDIA facts are cached");
        let other = key(&fx.options(&[("CUDA_VISIBLE_DEVICES", "0")])).unwrap();
        let mut d = Detected::empty(Os::Linux, CpuArch::X86_64);
        assert!(!apply(&fx.file(), &other, &mut d));
        assert_eq!(d.facts.cuda, None, "a miss leaves the facts alone");
    }

    #[test]
    fn corrupt_foreign_and_hostile_files_are_ignored_then_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let fx = Fx::new();
        let k = key(&fx.options(&[])).unwrap();
        let file = fx.file();
        let fresh = || Detected::empty(Os::Linux, CpuArch::X86_64);
        record(&file, &k, &detected_with_gpu());
        let good = std::fs::read(&file).unwrap();

        // Truncated, garbage, unknown fields, a fact other than cuda.
        let text = String::from_utf8(good.clone()).unwrap();
        for bad in [
            text[..text.len() / 2].to_owned(),
            "\u{0}\u{1}garbage".to_owned(),
            text.replacen("\"format\"", "\"extra\": 1, \"format\"", 1),
            text.replacen("\"cuda.driver\"", "\"libc\"", 1),
        ] {
            std::fs::write(&file, bad).unwrap();
            let mut d = fresh();
            assert!(!apply(&file, &k, &mut d));
            assert_eq!(d.facts.cuda, None);
            record(&file, &k, &detected_with_gpu());
            assert!(apply(&file, &k, &mut fresh()), "rewritten after a bad file");
        }

        // Writable by others: not read.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(!apply(&file, &k, &mut fresh()));
        record(&file, &k, &detected_with_gpu());
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o077,
            0,
            "rewritten private"
        );
        assert!(apply(&file, &k, &mut fresh()));

        // A symlink to a valid file: not followed.
        let elsewhere = fx.dir.path().join("elsewhere.json");
        std::fs::write(&elsewhere, &good).unwrap();
        std::fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &file).unwrap();
        assert!(!apply(&file, &k, &mut fresh()));
        record(&file, &k, &detected_with_gpu());
        assert!(
            !std::fs::symlink_metadata(&file).unwrap().file_type().is_symlink(),
            "the link is replaced"
        );
        assert_eq!(std::fs::read(&elsewhere).unwrap(), good, "its target is untouched");

        // A FIFO: ignored at once (opening it used to wait for a writer, hanging every
        // command that probes the host), then replaced.
        std::fs::remove_file(&file).unwrap();
        let c = std::ffi::CString::new(file.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        let (f, key) = (file.clone(), k.clone());
        std::thread::spawn(move || {
            let _ = tx.send(apply(&f, &key, &mut Detected::empty(Os::Linux, CpuArch::X86_64)));
        });
        let applied = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("reading a FIFO at the cache path blocked");
        assert!(!applied);
        record(&file, &k, &detected_with_gpu());
        assert!(apply(&file, &k, &mut fresh()), "the FIFO is replaced by a cache file");
    }
}
