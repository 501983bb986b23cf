//! Host detection against fake NVIDIA drivers.
//!
//! There is no GPU here, so `tests/fixtures/fake_nvidia.c` stands in for `libcuda.so.1`
//! and `libnvidia-ml.so.1`: each test compiles the variants it needs with the system C
//! compiler into its own temporary directory (a fresh path, so every test gets a fresh
//! copy of the library's state), and points `KHUB_LIBCUDA` / `KHUB_LIBNVML` at them.
//!
//! Probe options are built from explicit environment snapshots with `root` at an empty
//! directory, so the real `/proc` and `/sys` are never read. Nothing here mutates the test
//! process's environment.
//!
//! In-process (`Isolation::Thread`) libcuda probes answer for the *process's*
//! `CUDA_VISIBLE_DEVICES`; the tests that expect such an answer are skipped when the test
//! process itself runs with that variable set.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use khub::host::{Detected, Environment, FactSource, HostFacts, Isolation, ProbeOptions};
use khub::platform::MajorMinor;
use serde_json::Value;
use tempfile::TempDir;

const FAKE_SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fake_nvidia.c");
const KHUB: &str = env!("CARGO_BIN_EXE_khub");

/// A realistic `/proc/driver/nvidia/version` for driver 550.144.03 (CUDA 12.4).
const PROC_VERSION_550: &str = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.144.03  Release Build  (dvs-builder@U16-I3-B03-4-3)  Thu Jan  9 00:45:47 UTC 2025\nGCC version:  gcc version 12.2.0 (Debian 12.2.0-14) \n";

/// The fake's physical devices: compute capability and name, in index order.
const PHYSICAL: [((u32, u32), &str); 3] = [
    ((8, 6), "NVIDIA GeForce RTX 3090"),
    ((9, 0), "NVIDIA H100 80GB HBM3"),
    ((12, 0), "NVIDIA GeForce RTX 5090"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Ok,
    Hang,
    Crash,
    NoDev,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Ok => "ok",
            Mode::Hang => "hang",
            Mode::Crash => "crash",
            Mode::NoDev => "nodev",
        }
    }

    fn define(self) -> &'static str {
        match self {
            Mode::Ok => "-DFAKE_MODE_OK",
            Mode::Hang => "-DFAKE_MODE_HANG",
            Mode::Crash => "-DFAKE_MODE_CRASH",
            Mode::NoDev => "-DFAKE_MODE_NODEV",
        }
    }
}

/// One test's scratch directory: fake libraries, filesystem roots, profiles.
struct Fixture {
    dir: TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("khub-host-probe-").tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("empty-root")).unwrap();
        Fixture { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Compiles the fake driver in `mode` and returns the library's path.
    fn lib(&self, mode: Mode) -> String {
        self.compile(mode, &format!("libfake_{}.so", mode.name()), &[])
    }

    /// The hanging fake, which writes the pid of the process it hangs to `pidfile`.
    fn hang_lib_with_pidfile(&self, pidfile: &Path) -> String {
        let define = format!("-DFAKE_PIDFILE=\"{}\"", pidfile.display());
        self.compile(Mode::Hang, "libfake_hang_pid.so", &[&define])
    }

    fn compile(&self, mode: Mode, file: &str, extra: &[&str]) -> String {
        let out = self.path().join(file);
        let cc = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
        let status = Command::new(&cc)
            .args(["-shared", "-fPIC", "-O1", mode.define()])
            .args(extra)
            .arg("-o")
            .arg(&out)
            .arg(FAKE_SOURCE)
            .status()
            .unwrap_or_else(|e| panic!("cannot run the C compiler {cc:?}: {e}"));
        assert!(status.success(), "compiling {FAKE_SOURCE} with {} failed: {status}", mode.define());
        path_str(&out)
    }

    /// A path that does not exist, for a library that is not installed.
    fn missing(&self, name: &str) -> String {
        path_str(&self.path().join("not-installed").join(name))
    }

    /// An empty filesystem root: no `/proc/driver/nvidia`, no KFD.
    fn empty_root(&self) -> PathBuf {
        self.path().join("empty-root")
    }

    /// A root whose `proc/driver/nvidia/version` names kernel module 550.144.03.
    fn proc_root(&self) -> PathBuf {
        let root = self.path().join("proc-root");
        let dir = root.join("proc/driver/nvidia");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("version"), PROC_VERSION_550).unwrap();
        root
    }

    /// Options from `pairs` alone, probing in a thread, with the empty root.
    fn options(&self, pairs: &[(&str, &str)]) -> ProbeOptions {
        let mut o = ProbeOptions::with_env(Environment::from_pairs(pairs.iter().copied())).expect("valid options");
        o.root = self.empty_root();
        o.timeout = Duration::from_secs(10);
        o.isolation = Isolation::Thread;
        o
    }

    /// As [`Fixture::options`], probing libcuda in a `khub __probe cuda` child.
    fn subprocess_options(&self, pairs: &[(&str, &str)]) -> ProbeOptions {
        let mut o = self.options(pairs);
        o.isolation = helper();
        o
    }
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("temporary paths are UTF-8").to_owned()
}

fn helper() -> Isolation {
    Isolation::Subprocess {
        exe: KHUB.into(),
        args: vec!["__probe".into(), "cuda".into()],
    }
}

/// In this process the driver would see the test process's `CUDA_VISIBLE_DEVICES`; tests
/// that expect an in-process libcuda answer need it unset.
fn process_has_cuda_visible_devices(test: &str) -> bool {
    let set = std::env::var_os("CUDA_VISIBLE_DEVICES").is_some();
    if set {
        eprintln!("{test}: skipped, CUDA_VISIBLE_DEVICES is set in the test process");
    }
    set
}

fn detect(options: &ProbeOptions) -> Detected {
    HostFacts::detect(options).expect("detection succeeds")
}

fn mm(major: u32, minor: u32) -> MajorMinor {
    MajorMinor::new(major, minor)
}

/// The devices as (index, cc, name).
fn devices(d: &Detected) -> Vec<(u32, MajorMinor, Option<String>)> {
    let cuda = d.facts.cuda.as_ref().expect("an NVIDIA driver was found");
    cuda.devices.iter().map(|x| (x.index, x.cc, x.name.clone())).collect()
}

/// The expected visible devices, given physical indices in visible order.
fn expected(physical: &[usize]) -> Vec<(u32, MajorMinor, Option<String>)> {
    physical
        .iter()
        .enumerate()
        .map(|(ordinal, &i)| {
            let ((major, minor), name) = PHYSICAL[i];
            (ordinal as u32, mm(major, minor), Some(name.to_owned()))
        })
        .collect()
}

fn probe_method<'a>(d: &'a Detected, fact: &str) -> &'a str {
    match d.sources.get(fact) {
        Some(FactSource::Probe { method }) => method,
        other => panic!("{fact} should be probed, its source is {other:?}"),
    }
}

fn absent_why<'a>(d: &'a Detected, fact: &str) -> &'a str {
    match d.sources.get(fact) {
        Some(FactSource::Absent { why }) => why,
        other => panic!("{fact} should be absent, its source is {other:?}"),
    }
}

#[test]
fn libcuda_in_a_thread_reports_the_driver_and_every_device() {
    if process_has_cuda_visible_devices("libcuda_in_a_thread_reports_the_driver_and_every_device") {
        return;
    }
    let fx = Fixture::new();
    let lib = fx.lib(Mode::Ok);
    let nvml = fx.missing("libnvidia-ml.so.1");
    let d = detect(&fx.options(&[("KHUB_LIBCUDA", &lib), ("KHUB_LIBNVML", &nvml)]));
    let cuda = d.facts.cuda.as_ref().unwrap();
    assert_eq!(cuda.driver, mm(12, 8));
    assert_eq!(cuda.kmd, None, "the empty root has no /proc/driver/nvidia/version");
    assert_eq!(cuda.runtime, None);
    assert_eq!(devices(&d), expected(&[0, 1, 2]));
    for fact in ["cuda.driver", "cuda.devices"] {
        let method = probe_method(&d, fact);
        assert!(method.contains(&lib) && method.contains("cuDriverGetVersion"), "{fact}: {method}");
    }
}

#[test]
fn libcuda_in_a_helper_process_reports_the_same() {
    let fx = Fixture::new();
    let lib = fx.lib(Mode::Ok);
    let d = detect(&fx.subprocess_options(&[("KHUB_LIBCUDA", &lib)]));
    assert_eq!(d.facts.cuda.as_ref().unwrap().driver, mm(12, 8));
    assert_eq!(devices(&d), expected(&[0, 1, 2]));
    assert!(probe_method(&d, "cuda.devices").contains(&lib));
}

#[test]
fn cuda_visible_devices_reaches_the_driver_in_a_helper_process() {
    let fx = Fixture::new();
    let lib = fx.lib(Mode::Ok);
    let nvml = fx.missing("libnvidia-ml.so.1");
    // The helper's environment is built from the snapshot: each value reaches the driver,
    // which applies it itself (indices; the list ends at the first invalid entry).
    for (cvd, physical) in [("2,0", &[2, 0][..]), ("1,7,0", &[1]), ("GPU-cccc,1", &[2, 1])] {
        let d = detect(&fx.subprocess_options(&[("KHUB_LIBCUDA", &lib), ("KHUB_LIBNVML", &nvml), ("CUDA_VISIBLE_DEVICES", cvd)]));
        assert_eq!(devices(&d), expected(physical), "CUDA_VISIBLE_DEVICES={cvd}");
        assert!(probe_method(&d, "cuda.devices").contains(&lib), "CUDA_VISIBLE_DEVICES={cvd}");
    }
    // Set but empty hides every device; the driver is still known.
    let d = detect(&fx.subprocess_options(&[("KHUB_LIBCUDA", &lib), ("KHUB_LIBNVML", &nvml), ("CUDA_VISIBLE_DEVICES", "")]));
    assert_eq!(d.facts.cuda.as_ref().unwrap().driver, mm(12, 8));
    assert_eq!(devices(&d), []);
}

#[test]
fn a_snapshot_cuda_visible_devices_is_not_lost_in_thread_mode() {
    if process_has_cuda_visible_devices("a_snapshot_cuda_visible_devices_is_not_lost_in_thread_mode") {
        return;
    }
    let fx = Fixture::new();
    let lib = fx.lib(Mode::Ok);
    // An in-process driver would apply the process's (unset) CUDA_VISIBLE_DEVICES and
    // report all three devices. The probe declines, and NVML applies the snapshot's.
    let d = detect(&fx.options(&[("KHUB_LIBCUDA", &lib), ("KHUB_LIBNVML", &lib), ("CUDA_VISIBLE_DEVICES", "2,0")]));
    assert_eq!(devices(&d), expected(&[2, 0]));
    let method = probe_method(&d, "cuda.devices");
    assert!(method.contains("nvmlSystemGetCudaDriverVersion_v2"), "{method}");
    assert!(
        method.contains("CUDA_VISIBLE_DEVICES"),
        "the reason libcuda was skipped is kept: {method}"
    );

    // With no NVML either, the mismatch is the recorded reason.
    let nvml = fx.missing("libnvidia-ml.so.1");
    let d = detect(&fx.options(&[("KHUB_LIBCUDA", &lib), ("KHUB_LIBNVML", &nvml), ("CUDA_VISIBLE_DEVICES", "2,0")]));
    assert!(d.facts.cuda.is_none());
    let why = absent_why(&d, "cuda");
    assert!(why.contains("CUDA_VISIBLE_DEVICES") && why.contains("`2,0`"), "{why}");
}

#[test]
fn nvml_answers_when_libcuda_is_missing_and_applies_cuda_visible_devices() {
    let fx = Fixture::new();
    let cuda = fx.missing("libcuda.so.1");
    let nvml = fx.lib(Mode::Ok);
    let base = [("KHUB_LIBCUDA", cuda.as_str()), ("KHUB_LIBNVML", nvml.as_str())];

    let d = detect(&fx.subprocess_options(&base));
    let c = d.facts.cuda.as_ref().unwrap();
    assert_eq!(c.driver, mm(12, 8));
    assert_eq!(devices(&d), expected(&[0, 1, 2]));
    for fact in ["cuda.driver", "cuda.devices"] {
        let method = probe_method(&d, fact);
        assert!(
            method.contains(&nvml) && method.contains("nvmlSystemGetCudaDriverVersion_v2"),
            "{method}"
        );
        assert!(
            method.contains(&cuda) && method.contains("not loaded"),
            "what libcuda said is kept: {method}"
        );
    }

    // NVML ignores CUDA_VISIBLE_DEVICES, so khub applies it: indices and UUID prefixes,
    // ending at the first entry that names no device.
    for (cvd, physical) in [
        ("GPU-cccc,0", &[2, 0][..]),
        ("1", &[1]),
        ("0,GPU-bbbbbbbb-1111", &[0, 1]),
        ("1,9,2", &[1]),
        ("GPU-dddd,0", &[]),
        ("", &[]),
    ] {
        let mut pairs = base.to_vec();
        pairs.push(("CUDA_VISIBLE_DEVICES", cvd));
        for options in [fx.options(&pairs), fx.subprocess_options(&pairs)] {
            let d = detect(&options);
            assert_eq!(
                devices(&d),
                expected(physical),
                "CUDA_VISIBLE_DEVICES={cvd:?} with {:?}",
                options.isolation
            );
        }
    }
}

#[test]
fn proc_gives_the_driver_but_not_the_devices() {
    let fx = Fixture::new();
    let (cuda, nvml) = (fx.missing("libcuda.so.1"), fx.missing("libnvidia-ml.so.1"));
    let mut o = fx.options(&[("KHUB_LIBCUDA", &cuda), ("KHUB_LIBNVML", &nvml)]);
    o.root = fx.proc_root();
    let d = detect(&o);
    let c = d.facts.cuda.as_ref().unwrap();
    assert_eq!(c.driver, mm(12, 4), "550.144.03 supports CUDA 12.4");
    assert_eq!(c.kmd.as_deref(), Some("550.144.03"));
    assert!(c.devices.is_empty());
    let method = probe_method(&d, "cuda.driver");
    assert!(
        method.contains("proc/driver/nvidia/version") && method.contains("550.144.03"),
        "{method}"
    );
    let why = absent_why(&d, "cuda.devices");
    assert!(why.contains("KHUB_CUDA_ARCH"), "{why}");
    assert!(why.contains(&cuda) && why.contains(&nvml), "both libraries are named: {why}");

    // The override completes the picture.
    let mut o = fx.options(&[("KHUB_LIBCUDA", &cuda), ("KHUB_LIBNVML", &nvml), ("KHUB_CUDA_ARCH", "8.9")]);
    o.root = fx.proc_root();
    let d = detect(&o);
    assert_eq!(d.facts.cuda.as_ref().unwrap().devices[0].cc, mm(8, 9));
    assert_eq!(
        d.sources["cuda.devices"],
        FactSource::Env {
            var: "KHUB_CUDA_ARCH".into()
        }
    );
}

#[test]
fn no_driver_at_all_is_absent_with_what_was_tried() {
    let fx = Fixture::new();
    let (cuda, nvml) = (fx.missing("libcuda.so.1"), fx.missing("libnvidia-ml.so.1"));
    let d = detect(&fx.options(&[("KHUB_LIBCUDA", &cuda), ("KHUB_LIBNVML", &nvml)]));
    assert!(d.facts.cuda.is_none());
    let why = absent_why(&d, "cuda");
    for tried in [cuda.as_str(), nvml.as_str(), "proc/driver/nvidia/version"] {
        assert!(why.contains(tried), "`{tried}` is missing from: {why}");
    }
    assert!(!d.sources.contains_key("cuda.driver") && !d.sources.contains_key("cuda.devices"));
}

#[test]
fn a_hung_driver_in_a_thread_is_abandoned_after_the_timeout() {
    if process_has_cuda_visible_devices("a_hung_driver_in_a_thread_is_abandoned_after_the_timeout") {
        return;
    }
    let fx = Fixture::new();
    let hang = fx.lib(Mode::Hang);
    let nvml = fx.missing("libnvidia-ml.so.1");

    // Next source: /proc.
    let mut o = fx.options(&[("KHUB_LIBCUDA", &hang), ("KHUB_LIBNVML", &nvml)]);
    o.timeout = Duration::from_millis(300);
    o.root = fx.proc_root();
    let start = Instant::now();
    let d = detect(&o);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(2), "detection took {took:?}");
    assert_eq!(d.facts.cuda.as_ref().unwrap().driver, mm(12, 4));
    let why = absent_why(&d, "cuda.devices");
    assert!(why.contains("did not answer within 300ms"), "{why}");

    // Next source: NVML (the same fake, whose NVML side answers).
    let mut o = fx.options(&[("KHUB_LIBCUDA", &hang), ("KHUB_LIBNVML", &hang)]);
    o.timeout = Duration::from_millis(300);
    let start = Instant::now();
    let d = detect(&o);
    assert!(start.elapsed() < Duration::from_secs(2), "detection took {:?}", start.elapsed());
    assert_eq!(devices(&d), expected(&[0, 1, 2]));
    let method = probe_method(&d, "cuda.devices");
    assert!(
        method.contains("nvml") && method.contains("did not answer within 300ms"),
        "{method}"
    );
}

#[test]
fn a_hung_driver_in_a_helper_process_is_killed() {
    let fx = Fixture::new();
    let pidfile = fx.path().join("hung.pid");
    let hang = fx.hang_lib_with_pidfile(&pidfile);
    let nvml = fx.missing("libnvidia-ml.so.1");
    let mut o = fx.subprocess_options(&[("KHUB_LIBCUDA", &hang), ("KHUB_LIBNVML", &nvml)]);
    o.timeout = Duration::from_millis(300);
    o.root = fx.proc_root();
    let start = Instant::now();
    let d = detect(&o);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(2), "detection took {took:?}");
    assert_eq!(d.facts.cuda.as_ref().unwrap().driver, mm(12, 4), "fell through to /proc");
    let why = absent_why(&d, "cuda.devices");
    assert!(why.contains("did not answer within 300ms") && why.contains("killed"), "{why}");

    // The helper reached cuInit (it wrote its pid) and is gone: killed and reaped.
    let pid = std::fs::read_to_string(&pidfile).expect("the helper reached the hanging cuInit within 300 ms");
    let pid: u32 = pid.trim().parse().unwrap();
    assert_ne!(pid, std::process::id(), "the hang ran in a child, not in the test process");
    let proc_entry = PathBuf::from(format!("/proc/{pid}"));
    if Path::new("/proc/self").exists() {
        assert!(!proc_entry.exists(), "the hung helper {pid} is still there");
    }
}

#[test]
fn a_crashing_driver_in_a_helper_process_does_not_take_the_host_down() {
    let fx = Fixture::new();
    let crash = fx.lib(Mode::Crash);
    let nvml = fx.missing("libnvidia-ml.so.1");
    let mut o = fx.subprocess_options(&[("KHUB_LIBCUDA", &crash), ("KHUB_LIBNVML", &nvml)]);
    o.root = fx.proc_root();
    let d = detect(&o);
    // Still here: the crash happened in the helper.
    assert_eq!(d.facts.cuda.as_ref().unwrap().driver, mm(12, 4), "fell through to /proc");
    let why = absent_why(&d, "cuda.devices");
    assert!(why.contains("helper failed"), "{why}");

    // With nothing else to fall back on, the failure is the recorded reason.
    let mut o = fx.subprocess_options(&[("KHUB_LIBCUDA", &crash), ("KHUB_LIBNVML", &nvml)]);
    o.root = fx.empty_root();
    let d = detect(&o);
    assert!(d.facts.cuda.is_none());
    assert!(absent_why(&d, "cuda").contains("helper failed"));
}

#[test]
fn a_driver_without_devices_reports_the_driver_and_no_devices() {
    let fx = Fixture::new();
    let nodev = fx.lib(Mode::NoDev);
    let nvml = fx.missing("libnvidia-ml.so.1");
    let pairs = [("KHUB_LIBCUDA", nodev.as_str()), ("KHUB_LIBNVML", nvml.as_str())];
    let mut runs = vec![fx.subprocess_options(&pairs)];
    if !process_has_cuda_visible_devices("a_driver_without_devices_reports_the_driver_and_no_devices (thread)") {
        runs.push(fx.options(&pairs));
    }
    for o in runs {
        let d = detect(&o);
        let c = d
            .facts
            .cuda
            .as_ref()
            .unwrap_or_else(|| panic!("{:?}: {:?}", o.isolation, d.sources.get("cuda")));
        assert_eq!(c.driver, mm(12, 8));
        assert!(c.devices.is_empty());
        assert!(probe_method(&d, "cuda.devices").contains(&nodev));
    }

    // NVML on a machine without devices says the same.
    let d = detect(&fx.options(&[("KHUB_LIBCUDA", &fx.missing("libcuda.so.1")), ("KHUB_LIBNVML", &nodev)]));
    assert_eq!(d.facts.cuda.as_ref().unwrap().driver, mm(12, 8));
    assert!(d.facts.cuda.as_ref().unwrap().devices.is_empty());
}

/// The `khub` binary with every variable khub reads removed from its environment, then
/// `vars` set.
fn khub(args: &[&str], vars: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(KHUB);
    cmd.args(args);
    for (name, _) in std::env::vars_os() {
        let n = name.to_string_lossy();
        if n.starts_with("KHUB_") || ["CUDA_VISIBLE_DEVICES", "HSA_OVERRIDE_GFX_VERSION", "ROCM_PATH"].contains(&n.as_ref()) {
            cmd.env_remove(&name);
        }
    }
    cmd.envs(vars.iter().copied());
    let out = cmd.output().expect("run khub");
    assert!(
        out.status.success(),
        "khub {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn cli_host_json_reports_the_fake_driver() {
    let fx = Fixture::new();
    let lib = fx.lib(Mode::Ok);
    let nvml = fx.missing("libnvidia-ml.so.1");
    let v = json(&khub(&["host", "--json"], &[("KHUB_LIBCUDA", &lib), ("KHUB_LIBNVML", &nvml)]));
    let devs = v["facts"]["cuda"]["devices"].as_array().expect("facts.cuda.devices");
    assert_eq!(devs.len(), 3, "{v:#}");
    assert_eq!(v["facts"]["cuda"]["driver"], "12.8");
    let ccs: Vec<&str> = devs.iter().map(|d| d["cc"].as_str().unwrap()).collect();
    assert_eq!(ccs, ["8.6", "9.0", "12.0"]);
    assert_eq!(v["sources"]["cuda.devices"]["kind"], "probe");

    // The CLI probes in a helper, whose environment carries CUDA_VISIBLE_DEVICES.
    let v = json(&khub(
        &["host", "--json"],
        &[("KHUB_LIBCUDA", &lib), ("KHUB_LIBNVML", &nvml), ("CUDA_VISIBLE_DEVICES", "2,0")],
    ));
    let ccs: Vec<&str> = v["facts"]["cuda"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["cc"].as_str().unwrap())
        .collect();
    assert_eq!(ccs, ["12.0", "8.6"], "{v:#}");

    // The helper itself prints the probe result as JSON.
    let v = json(&khub(
        &["__probe", "cuda"],
        &[("KHUB_LIBCUDA", &lib), ("CUDA_VISIBLE_DEVICES", "1")],
    ));
    assert_eq!(v["Ok"]["driver"], "12.8", "{v:#}");
    assert_eq!(v["Ok"]["devices"][0]["name"], "NVIDIA H100 80GB HBM3");
    let v = json(&khub(&["__probe", "cuda"], &[("KHUB_LIBCUDA", &fx.missing("libcuda.so.1"))]));
    assert!(v["Err"].as_str().is_some_and(|e| e.contains("not loaded")), "{v:#}");
}

#[test]
fn cli_host_without_a_driver_says_so_and_why() {
    if Path::new("/proc/driver/nvidia/version").exists() {
        eprintln!("cli_host_without_a_driver_says_so_and_why: skipped, this machine has an NVIDIA kernel module");
        return;
    }
    let fx = Fixture::new();
    let (cuda, nvml) = (fx.missing("libcuda.so.1"), fx.missing("libnvidia-ml.so.1"));
    let out = khub(&["host"], &[("KHUB_LIBCUDA", &cuda), ("KHUB_LIBNVML", &nvml)]);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("nvidia gpu"))
        .unwrap_or_else(|| panic!("no `nvidia gpu` line in:\n{text}"));
    assert!(line.contains("none"), "{line}");
    assert!(
        line.contains(&cuda) && line.contains("not loaded") && line.contains(&nvml),
        "the line says why: {line}"
    );
}

const PROFILE: &str = r#"
description = "a two-GPU workstation"
os = "linux"
arch = "x86_64"
libc = "glibc 2.31"
cpu-level = "x86-64-v3"
[cuda]
driver = "12.6"
devices = [
  { index = 0, cc = "8.9", name = "NVIDIA L4" },
  { index = 1, cc = "9.0", name = "NVIDIA H100 80GB HBM3" },
]
"#;

#[test]
fn cli_host_profile_replaces_probing_and_env_overrides_win() {
    let fx = Fixture::new();
    let profile = fx.path().join("workstation.toml");
    std::fs::write(&profile, PROFILE).unwrap();
    let profile_s = path_str(&profile);
    // A fake driver is available, but a profile that does not inherit is not probed.
    let lib = fx.lib(Mode::Ok);

    let v = json(&khub(&["host", "--host", &profile_s, "--json"], &[("KHUB_LIBCUDA", &lib)]));
    let f = &v["facts"];
    assert_eq!(f["os"], "linux");
    assert_eq!(f["arch"], "x86_64");
    assert_eq!(f["libc"], "glibc 2.31", "{v:#}");
    assert_eq!(f["cpu-level"], "x86-64-v3");
    assert_eq!(f["cuda"]["driver"], "12.6");
    let ccs: Vec<&str> = f["cuda"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["cc"].as_str().unwrap())
        .collect();
    assert_eq!(ccs, ["8.9", "9.0"]);
    for fact in ["os", "arch", "libc", "cpu-level", "cuda"] {
        assert_eq!(v["sources"][fact]["kind"], "profile", "{fact}: {v:#}");
        assert_eq!(v["sources"][fact]["path"], profile_s.as_str());
    }

    let out = khub(&["host", "--host", &profile_s], &[("KHUB_LIBCUDA", &lib)]);
    let text = String::from_utf8_lossy(&out.stdout);
    let cuda_line = text
        .lines()
        .find(|l| l.starts_with("cuda devices"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        cuda_line.contains("sm_89 NVIDIA L4") && cuda_line.contains("profile"),
        "{cuda_line}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("libc") && l.contains("glibc 2.31") && l.contains("profile")),
        "{text}"
    );

    // Per-fact variables win over the profile (KHUB_HOST_PROFILE names it here).
    let v = json(&khub(
        &["host", "--json"],
        &[
            ("KHUB_HOST_PROFILE", &profile_s),
            ("KHUB_CUDA_ARCH", "8.0"),
            ("KHUB_CUDA_DRIVER", "12.4"),
            ("KHUB_LIBCUDA", &lib),
        ],
    ));
    assert_eq!(v["facts"]["cuda"]["driver"], "12.4", "{v:#}");
    let devs = v["facts"]["cuda"]["devices"].as_array().unwrap();
    assert_eq!(devs.len(), 1);
    assert_eq!(devs[0]["cc"], "8.0");
    assert_eq!(v["sources"]["cuda.driver"]["kind"], "env");
    assert_eq!(v["sources"]["cuda.driver"]["var"], "KHUB_CUDA_DRIVER");
    assert_eq!(v["sources"]["cuda.devices"]["var"], "KHUB_CUDA_ARCH");
    assert_eq!(v["sources"]["libc"]["kind"], "profile", "untouched facts keep the profile");
}

/// Regression (issue 10): a registry command probed the host twice, the second time
/// in-process, so a driver that crashes in `cuInit` took `khub fetch` down with SIGSEGV even
/// though the CLI's own probe ran it in a helper process.
#[test]
fn a_crashing_driver_does_not_take_a_registry_command_down() {
    use std::os::unix::process::ExitStatusExt;
    let fx = Fixture::new();
    let crash = fx.lib(Mode::Crash);
    let nvml = fx.missing("libnvidia-ml.so.1");
    let registry = fx.path().join("empty-registry");
    std::fs::create_dir_all(&registry).unwrap();
    let mut cmd = std::process::Command::new(KHUB);
    for var in khub::env::ALL {
        cmd.env_remove(var);
    }
    let out = cmd
        .args(["fetch", "acme/activation", "--offline", "--registry"])
        .arg(&registry)
        .arg("--cache")
        .arg(fx.path().join("cache"))
        .env("KHUB_LIBCUDA", &crash)
        .env("KHUB_LIBNVML", &nvml)
        .env("HOME", fx.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), None, "killed by a signal: {stderr}");
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("error:"), "{stderr}");
}

/// Issue 14: a registry command caches the NVIDIA probe's answer for the boot, so a warm
/// run starts no probe helper (the fake driver logs every `cuInit`); a change of the key
/// (here `CUDA_VISIBLE_DEVICES`) probes again, and a corrupt cache file is ignored and
/// replaced.
#[test]
fn a_warm_registry_command_probes_the_driver_once_per_boot() {
    let fx = Fixture::new();
    let log = fx.path().join("cuinit.log");
    let lib = fx.compile(Mode::Ok, "libfake_ok_log.so", &[&format!("-DFAKE_CALLLOG=\"{}\"", log.display())]);
    let nvml = fx.missing("libnvidia-ml.so.1");
    let registry = fx.path().join("empty-registry");
    std::fs::create_dir_all(&registry).unwrap();
    let cache_file = fx.path().join("cache/host-v1/nvidia.json");
    let probes = || std::fs::read_to_string(&log).map_or(0, |t| t.lines().count());
    let run = |cvd: Option<&str>| {
        let mut cmd = Command::new(KHUB);
        for var in khub::env::ALL {
            cmd.env_remove(var);
        }
        cmd.args(["fetch", "acme/activation", "--offline", "--registry"])
            .arg(&registry)
            .arg("--cache")
            .arg(fx.path().join("cache"))
            .env("KHUB_LIBCUDA", &lib)
            .env("KHUB_LIBNVML", &nvml)
            .env("HOME", fx.path());
        if let Some(v) = cvd {
            cmd.env("CUDA_VISIBLE_DEVICES", v);
        }
        let out = cmd.output().unwrap();
        // An empty registry, offline: the command fails after probing, as intended.
        assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let base = std::env::var_os("CUDA_VISIBLE_DEVICES");
    let base = base.as_ref().map(|v| v.to_str().unwrap());
    run(base);
    assert_eq!(probes(), 1, "the first run probes");
    assert!(cache_file.is_file(), "and records the answer");
    run(base);
    assert_eq!(probes(), 1, "a warm run does not probe again");
    run(Some("2,0"));
    assert_eq!(probes(), 2, "another device selection is another key");
    std::fs::write(&cache_file, b"{ not json").unwrap();
    run(Some("2,0"));
    assert_eq!(probes(), 3, "a corrupt cache is ignored");
    let v: Value = serde_json::from_slice(&std::fs::read(&cache_file).unwrap()).expect("rewritten as valid JSON");
    assert_eq!(v["cuda"]["devices"][0]["cc"], "12.0", "the answer for CUDA_VISIBLE_DEVICES=2,0");
    run(Some("2,0"));
    assert_eq!(probes(), 3, "and the rewritten cache is used");
}
