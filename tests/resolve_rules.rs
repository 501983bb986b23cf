//! Table-driven tests of the resolver against the compatibility rules of
//! `shared/reference/compat-rules.md` (§1.1, §1.2, §2.1, §2.2, §2.5, §3, §7).
//!
//! Each case is a small manifest (built from TOML snippets by [`manifest`], which fills in
//! the schema, kernel, library and files), a host written as TOML and deserialised into
//! [`HostFacts`], optional [`Preferences`], and the expected verdict for one variant: the
//! device-match tier (and the matched token) or the rejection code (and, where it matters,
//! its fields). One loop runs every case and reports every failing case by name.

use khub::host::HostFacts;
use khub::manifest::Manifest;
use khub::platform::{Backend, CpuArch, LibcFamily, MajorMinor, Os, X86Level};
use khub::resolve::{DeviceMatch, Preferences, Rejection, Resolution, Verdict, choose, choose_among, resolve, runs_on};

/// A dummy SHA-256 (of the empty string) for every file.
const SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

// ----------------------------------------------------------------------------------------
// Builders: TOML snippets for variants and hosts.
// ----------------------------------------------------------------------------------------

/// Joins snippets with newlines: `cat!(cuda(..), "priority = 3")`.
macro_rules! cat {
    ($($part:expr),+ $(,)?) => {
        [$(AsRef::<str>::as_ref(&$part)),+].join("\n")
    };
}

fn mm(major: u32, minor: u32) -> MajorMinor {
    MajorMinor::new(major, minor)
}

/// `"sm_80, compute_90"` -> `"sm_80", "compute_90"` (a TOML array body).
fn quoted(list: &str) -> String {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

fn strings(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Whether a snippet sets the top-level key `key`.
fn has_key(snippet: &str, key: &str) -> bool {
    snippet.lines().any(|line| {
        line.trim_start()
            .strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with('='))
    })
}

/// A CUDA variant with static cudart.
fn cuda(toolkit: &str, code: &str) -> String {
    format!(
        "backend = \"cuda\"\ncuda = {{ toolkit = \"{toolkit}\", cudart = \"static\", code = [{}] }}",
        quoted(code)
    )
}

/// A CUDA variant that links cudart dynamically.
fn cuda_dyn(toolkit: &str, code: &str) -> String {
    format!(
        "backend = \"cuda\"\ncuda = {{ toolkit = \"{toolkit}\", cudart = \"dynamic\", code = [{}] }}",
        quoted(code)
    )
}

/// A ROCm variant.
fn rocm(version: &str, targets: &str) -> String {
    format!(
        "backend = \"rocm\"\nrocm = {{ version = \"{version}\", targets = [{}] }}",
        quoted(targets)
    )
}

/// A ROCm variant that declares other compatible ROCm minors.
fn rocm_compat(version: &str, compatible: &str, targets: &str) -> String {
    format!(
        "backend = \"rocm\"\nrocm = {{ version = \"{version}\", compatible = [{}], targets = [{}] }}",
        quoted(compatible),
        quoted(targets)
    )
}

/// A Metal variant (macOS, aarch64).
fn metal(language: &str) -> String {
    format!("os = \"macos\"\narch = \"aarch64\"\nbackend = \"metal\"\nmetal = {{ language = \"{language}\" }}")
}

/// An Intel XPU variant.
fn xpu(oneapi: &str, aot: &str, spirv: bool) -> String {
    format!(
        "backend = \"xpu\"\nxpu = {{ oneapi = \"{oneapi}\", aot = [{}], spirv = {spirv} }}",
        quoted(aot)
    )
}

/// Gives a variant snippet an id.
fn id(id: &str, body: impl AsRef<str>) -> String {
    format!("id = \"{id}\"\n{}", body.as_ref())
}

/// Host: an NVIDIA driver (CUDA version), optional runtime ("" = none) and visible devices
/// by compute capability.
fn nv(driver: &str, runtime: &str, ccs: &str) -> String {
    let devices: Vec<String> = strings(ccs)
        .iter()
        .enumerate()
        .map(|(i, cc)| format!("{{ index = {i}, cc = \"{cc}\" }}"))
        .collect();
    let runtime = if runtime.is_empty() {
        String::new()
    } else {
        format!("runtime = \"{runtime}\", ")
    };
    format!("cuda = {{ driver = \"{driver}\", {runtime}devices = [{}] }}", devices.join(", "))
}

/// Host: ROCm version ("" = unknown) and devices by target id.
fn amd(version: &str, targets: &str) -> String {
    let devices: Vec<String> = strings(targets).iter().map(|t| format!("{{ target = \"{t}\" }}")).collect();
    let version = if version.is_empty() {
        String::new()
    } else {
        format!("version = \"{version}\", ")
    };
    format!("rocm = {{ {version}devices = [{}] }}", devices.join(", "))
}

/// Host: oneAPI release ("" = unknown) and device IP versions.
fn intel(oneapi: &str, ips: &str) -> String {
    let oneapi = if oneapi.is_empty() {
        String::new()
    } else {
        format!("oneapi = \"{oneapi}\", ")
    };
    format!("xpu = {{ {oneapi}devices = [{}] }}", quoted(ips))
}

/// Host: an Apple-silicon Mac with Metal.
fn mac(version: &str) -> String {
    format!("os = \"macos\"\narch = \"aarch64\"\nmacos = \"{version}\"\nmetal = {{}}")
}

/// Builds a manifest from variant snippets. Fills in what a case does not state: the id
/// (`v<i>`), backend `cpu`, os `linux`, arch `x86_64`, libc `glibc 2.17` (Linux only, when
/// the snippet leaves the os to the default), the library and its file entry.
fn manifest(abi: u32, variants: &[String]) -> Result<Manifest, String> {
    let mut text = format!("schema = \"1.0\"\n\n[kernel]\nname = \"rules\"\nversion = \"1.0.0\"\nabi = {abi}\n");
    for (i, body) in variants.iter().enumerate() {
        text.push_str("\n[[variants]]\n");
        if !has_key(body, "id") {
            text.push_str(&format!("id = \"v{i}\"\n"));
        }
        if !has_key(body, "backend") {
            text.push_str("backend = \"cpu\"\n");
        }
        if !has_key(body, "os") {
            text.push_str("os = \"linux\"\n");
            if !has_key(body, "libc") {
                text.push_str("libc = \"glibc 2.17\"\n");
            }
        }
        if !has_key(body, "arch") {
            text.push_str("arch = \"x86_64\"\n");
        }
        text.push_str(body);
        text.push_str(&format!(
            "\nlibrary = \"lib/v{i}/librules.so\"\nfiles = [{{ path = \"lib/v{i}/librules.so\", size = 1, sha256 = \"{SHA256}\" }}]\n"
        ));
    }
    Manifest::from_toml_str(&text).map_err(|e| format!("manifest does not build: {e}\n{text}"))
}

/// Builds a host from a TOML snippet. When the snippet does not set `os`, it describes a
/// Linux x86_64 machine and gets `libc = "glibc 2.35"` and `cpu-level = "x86-64-v3"` unless
/// it sets them; a snippet that sets `os` is taken as the whole machine.
fn host(snippet: &str) -> Result<HostFacts, String> {
    let mut text = String::new();
    if !has_key(snippet, "os") {
        for (key, value) in [
            ("os", "\"linux\""),
            ("arch", "\"x86_64\""),
            ("libc", "\"glibc 2.35\""),
            ("cpu-level", "\"x86-64-v3\""),
        ] {
            if !has_key(snippet, key) {
                text.push_str(&format!("{key} = {value}\n"));
            }
        }
    }
    text.push_str(snippet);
    toml::from_str(&text).map_err(|e| format!("host does not parse: {e}\n{text}"))
}

// ----------------------------------------------------------------------------------------
// The table.
// ----------------------------------------------------------------------------------------

/// The verdict a case expects for its target variant.
#[derive(Debug)]
enum Expect {
    /// Accepted with this tier; `matched` and `jit_distance` are checked when given.
    Accepted {
        tier: DeviceMatch,
        matched: Option<&'static str>,
        jit_distance: Option<u32>,
    },
    /// Rejected with this code (`Rejection::code`).
    Code(&'static str),
    /// Rejected with exactly this reason, fields included.
    Exactly(Rejection),
}

/// Accepted with this tier.
fn ok(tier: DeviceMatch) -> Expect {
    Expect::Accepted {
        tier,
        matched: None,
        jit_distance: None,
    }
}

/// Accepted with this tier through this token (no JIT distance).
fn ok_m(tier: DeviceMatch, matched: &'static str) -> Expect {
    Expect::Accepted {
        tier,
        matched: Some(matched),
        jit_distance: Some(0),
    }
}

/// Accepted through JIT of `matched`, `distance` compute-capability steps below the device.
fn jit(matched: &'static str, distance: u32) -> Expect {
    Expect::Accepted {
        tier: DeviceMatch::Jit,
        matched: Some(matched),
        jit_distance: Some(distance),
    }
}

/// Rejected with this code.
fn no(code: &'static str) -> Expect {
    Expect::Code(code)
}

/// Rejected with exactly this reason.
fn no_eq(reason: Rejection) -> Expect {
    Expect::Exactly(reason)
}

struct Case {
    name: &'static str,
    variants: Vec<String>,
    host: String,
    prefs: Preferences,
    abi: u32,
    /// The variant whose verdict is checked; `None` = the first candidate (the best, or the
    /// closest miss).
    target: Option<&'static str>,
    expect: Expect,
    /// The expected order of all candidate ids, when given.
    order: Option<Vec<&'static str>>,
}

fn case(name: &'static str, variants: impl IntoIterator<Item = String>, host: impl AsRef<str>, expect: Expect) -> Case {
    Case {
        name,
        variants: variants.into_iter().collect(),
        host: host.as_ref().to_owned(),
        prefs: Preferences::default(),
        abi: 1,
        target: None,
        expect,
        order: None,
    }
}

impl Case {
    fn prefs(mut self, prefs: Preferences) -> Self {
        self.prefs = prefs;
        self
    }

    fn target(mut self, id: &'static str) -> Self {
        self.target = Some(id);
        self
    }

    fn order(mut self, ids: &[&'static str]) -> Self {
        self.order = Some(ids.to_vec());
        self
    }

    fn abi(mut self, abi: u32) -> Self {
        self.abi = abi;
        self
    }
}

fn forbid_jit() -> Preferences {
    Preferences {
        forbid_jit: true,
        ..Preferences::default()
    }
}

fn on_device(device: u32) -> Preferences {
    Preferences {
        device: Some(device),
        ..Preferences::default()
    }
}

fn strs(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[allow(clippy::too_many_lines)]
fn cases() -> Vec<Case> {
    use DeviceMatch::{ArchSpecific, Cpu, Exact, Generic, SameMajorLower};
    let nv128 = |ccs: &str| nv("12.8", "", ccs);
    let nv129 = |ccs: &str| nv("12.9", "", ccs);
    let rocm62 = |targets: &str| amd("6.2", targets);
    let linux_v4 = "cpu-level = \"x86-64-v4\"";

    vec![
        // ---- §1.1 / §7.5: sm_80 cubin runs on 8.0, 8.6, 8.7, 8.9; not 7.5, not 9.0 ----
        case("sm_80 on 8.0: exact", [cuda("12.8", "sm_80")], nv128("8.0"), ok_m(Exact, "sm_80")),
        case(
            "sm_80 on 8.6: same major",
            [cuda("12.8", "sm_80")],
            nv128("8.6"),
            ok_m(SameMajorLower, "sm_80"),
        ),
        case(
            "sm_80 on 8.7: same major",
            [cuda("12.8", "sm_80")],
            nv128("8.7"),
            ok_m(SameMajorLower, "sm_80"),
        ),
        case(
            "sm_80 on 8.9: same major",
            [cuda("12.8", "sm_80")],
            nv128("8.9"),
            ok_m(SameMajorLower, "sm_80"),
        ),
        case(
            "sm_80 not on 7.5",
            [cuda("12.8", "sm_80")],
            nv128("7.5"),
            no_eq(Rejection::NoDeviceCode {
                device: "cuda:0 (7.5)".into(),
                have: strs(&["sm_80"]),
            }),
        ),
        case("sm_80 not on 9.0", [cuda("12.8", "sm_80")], nv128("9.0"), no("NoDeviceCode")),
        case("sm_80 not on 12.0", [cuda("12.8", "sm_80")], nv128("12.0"), no("NoDeviceCode")),
        case(
            "sm_89 not on 8.6 (lower minor)",
            [cuda("12.8", "sm_89")],
            nv128("8.6"),
            no("NoDeviceCode"),
        ),
        case(
            "sm_80+sm_86 on 8.6 picks sm_86",
            [cuda("12.8", "sm_80, sm_86")],
            nv128("8.6"),
            ok_m(Exact, "sm_86"),
        ),
        // ---- §1.1 / §7.5: compute_80 PTX runs on 8.x, 9.0, 10.x, 12.x with driver >= toolkit ----
        case(
            "compute_80 on 8.0: jit 0",
            [cuda("12.8", "compute_80")],
            nv128("8.0"),
            jit("compute_80", 0),
        ),
        case(
            "compute_80 on 8.6: jit 6",
            [cuda("12.8", "compute_80")],
            nv128("8.6"),
            jit("compute_80", 6),
        ),
        case(
            "compute_80 on 8.9: jit 9",
            [cuda("12.8", "compute_80")],
            nv128("8.9"),
            jit("compute_80", 9),
        ),
        case(
            "compute_80 on 9.0: jit 10",
            [cuda("12.8", "compute_80")],
            nv128("9.0"),
            jit("compute_80", 10),
        ),
        case(
            "compute_80 on 10.0: jit 20",
            [cuda("12.8", "compute_80")],
            nv128("10.0"),
            jit("compute_80", 20),
        ),
        case(
            "compute_80 on 10.3: jit 23",
            [cuda("12.9", "compute_80")],
            nv129("10.3"),
            jit("compute_80", 23),
        ),
        case(
            "compute_80 on 12.0: jit 40",
            [cuda("12.8", "compute_80")],
            nv128("12.0"),
            jit("compute_80", 40),
        ),
        case(
            "compute_80 on 12.1: jit 41",
            [cuda("12.9", "compute_80")],
            nv129("12.1"),
            jit("compute_80", 41),
        ),
        case(
            "compute_80 with newer-major driver: jit",
            [cuda("12.8", "compute_80")],
            nv("13.0", "", "9.0"),
            jit("compute_80", 10),
        ),
        case(
            "compute_80 not on 7.5",
            [cuda("12.8", "compute_80")],
            nv128("7.5"),
            no("NoDeviceCode"),
        ),
        case(
            "compute_80, driver 12.4 < toolkit 12.8: MVC needs SASS",
            [cuda("12.8", "compute_80")],
            nv("12.4", "", "9.0"),
            no_eq(Rejection::MvcNeedsSass {
                device: "cuda:0 (9.0)".into(),
                toolkit: mm(12, 8),
                driver: mm(12, 4),
            }),
        ),
        case(
            "compute_80, driver 11.8 < toolkit 12.8: driver too old",
            [cuda("12.8", "compute_80")],
            nv("11.8", "", "9.0"),
            no_eq(Rejection::DriverTooOld {
                need: mm(12, 8),
                have: mm(11, 8),
            }),
        ),
        case(
            "sm_90 with driver of lower major: driver too old (no MVC across majors)",
            [cuda("12.8", "sm_90")],
            nv("11.8", "", "9.0"),
            no("DriverTooOld"),
        ),
        case(
            "fat binary sm_90+compute_90 on 9.0 uses the cubin",
            [cuda("12.8", "sm_90, compute_90")],
            nv128("9.0"),
            ok_m(Exact, "sm_90"),
        ),
        case(
            "sm_80+compute_90 on 9.0: PTX takes over",
            [cuda("12.8", "sm_80, compute_90")],
            nv128("9.0"),
            jit("compute_90", 0),
        ),
        case(
            "closest PTX wins: compute_80+compute_90 on 10.0",
            [cuda("12.8", "compute_80, compute_90")],
            nv128("10.0"),
            jit("compute_90", 10),
        ),
        case(
            "compute_90 not on 8.9",
            [cuda("12.8", "compute_90")],
            nv128("8.9"),
            no("NoDeviceCode"),
        ),
        // ---- §1.1: arch-specific (a) and family (f) code ----
        case(
            "sm_90a on 9.0: arch-specific",
            [cuda("12.8", "sm_90a")],
            nv128("9.0"),
            ok_m(ArchSpecific, "sm_90a"),
        ),
        case(
            "sm_90a not on 9.1 (hypothetical same-major device)",
            [cuda("12.8", "sm_90a")],
            nv128("9.1"),
            no_eq(Rejection::ArchSpecificOnly {
                device: "cuda:0 (9.1)".into(),
                have: strs(&["sm_90a"]),
            }),
        ),
        case("sm_90a not on 10.0", [cuda("12.8", "sm_90a")], nv128("10.0"), no("NoDeviceCode")),
        case(
            "sm_90a+sm_90 on 9.0 picks sm_90a",
            [cuda("12.8", "sm_90, sm_90a")],
            nv128("9.0"),
            ok_m(ArchSpecific, "sm_90a"),
        ),
        case(
            "sm_90a+compute_90 on 10.0: jit",
            [cuda("12.8", "sm_90a, compute_90")],
            nv128("10.0"),
            jit("compute_90", 10),
        ),
        case(
            "compute_90a on 9.0: jit",
            [cuda("12.8", "compute_90a")],
            nv128("9.0"),
            jit("compute_90a", 0),
        ),
        case(
            "compute_90a not on 10.0",
            [cuda("12.8", "compute_90a")],
            nv128("10.0"),
            no("NoDeviceCode"),
        ),
        case(
            "sm_100a on 10.0: arch-specific",
            [cuda("12.8", "sm_100a")],
            nv128("10.0"),
            ok_m(ArchSpecific, "sm_100a"),
        ),
        case(
            "sm_100a not on 10.3",
            [cuda("12.9", "sm_100a")],
            nv129("10.3"),
            no_eq(Rejection::ArchSpecificOnly {
                device: "cuda:0 (10.3)".into(),
                have: strs(&["sm_100a"]),
            }),
        ),
        case(
            "compute_100a not on 10.3",
            [cuda("12.9", "compute_100a")],
            nv129("10.3"),
            no("ArchSpecificOnly"),
        ),
        case(
            "sm_103a on 10.3: arch-specific",
            [cuda("12.9", "sm_103a")],
            nv129("10.3"),
            ok_m(ArchSpecific, "sm_103a"),
        ),
        case(
            "sm_100f on 10.0: exact",
            [cuda("12.9", "sm_100f")],
            nv129("10.0"),
            ok_m(Exact, "sm_100f"),
        ),
        case(
            "sm_100f on 10.3: same major",
            [cuda("12.9", "sm_100f")],
            nv129("10.3"),
            ok_m(SameMajorLower, "sm_100f"),
        ),
        case(
            "sm_100f not on 11.0",
            [cuda("12.9", "sm_100f")],
            nv("13.0", "", "11.0"),
            no("NoDeviceCode"),
        ),
        case("sm_100f not on 12.0", [cuda("12.9", "sm_100f")], nv129("12.0"), no("NoDeviceCode")),
        case(
            "compute_100f on 10.3: jit 3",
            [cuda("12.9", "compute_100f")],
            nv129("10.3"),
            jit("compute_100f", 3),
        ),
        case(
            "compute_100f not on 12.0",
            [cuda("12.9", "compute_100f")],
            nv129("12.0"),
            no("NoDeviceCode"),
        ),
        case(
            "sm_120f on 12.0: exact",
            [cuda("12.9", "sm_120f")],
            nv129("12.0"),
            ok_m(Exact, "sm_120f"),
        ),
        case(
            "sm_120f on 12.1: same major",
            [cuda("12.9", "sm_120f")],
            nv129("12.1"),
            ok_m(SameMajorLower, "sm_120f"),
        ),
        case("sm_120f not on 10.0", [cuda("12.9", "sm_120f")], nv129("10.0"), no("NoDeviceCode")),
        // Jetson Thor: 10.1 under CUDA 12 is 11.0 under CUDA 13.
        case(
            "Thor: sm_101 on cc 11.0",
            [cuda("12.8", "sm_101")],
            nv("13.0", "", "11.0"),
            ok_m(Exact, "sm_101"),
        ),
        case(
            "Thor: sm_110 on cc 10.1",
            [cuda("13.0", "sm_110")],
            nv("13.0", "", "10.1"),
            ok_m(Exact, "sm_110"),
        ),
        case(
            "Thor: sm_101a on cc 11.0",
            [cuda("12.8", "sm_101a")],
            nv("13.0", "", "11.0"),
            ok_m(ArchSpecific, "sm_101a"),
        ),
        case(
            "sm_100 not on Thor cc 11.0",
            [cuda("12.8", "sm_100")],
            nv("13.0", "", "11.0"),
            no("NoDeviceCode"),
        ),
        case(
            "Thor under CUDA 12 (cc 10.1): plain rules, sm_100 runs",
            [cuda("12.8", "sm_100")],
            nv("12.8", "", "10.1"),
            ok_m(SameMajorLower, "sm_100"),
        ),
        // ---- §1.2 / §7.5: CUDA 12.8 with dynamic cudart ----
        case(
            "cu12.8 dynamic on runtime 12.8",
            [cuda_dyn("12.8", "sm_90")],
            nv("12.8", "12.8", "9.0"),
            ok_m(Exact, "sm_90"),
        ),
        case(
            "cu12.8 dynamic on runtime 12.9",
            [cuda_dyn("12.8", "sm_90")],
            nv("12.9", "12.9", "9.0"),
            ok_m(Exact, "sm_90"),
        ),
        case(
            "cu12.8 dynamic on runtime 12.6: runtime too old",
            [cuda_dyn("12.8", "sm_90")],
            nv("12.8", "12.6", "9.0"),
            no_eq(Rejection::RuntimeTooOld {
                need: mm(12, 8),
                have: mm(12, 6),
            }),
        ),
        case(
            "cu12.8 dynamic on runtime 13.0: major mismatch",
            [cuda_dyn("12.8", "sm_90")],
            nv("13.0", "13.0", "9.0"),
            no_eq(Rejection::RuntimeMajorMismatch {
                need: mm(12, 8),
                have: mm(13, 0),
            }),
        ),
        case(
            "cu12.8 dynamic without runtime: runtime missing",
            [cuda_dyn("12.8", "sm_90")],
            nv("12.8", "", "9.0"),
            no_eq(Rejection::RuntimeMissing { need: mm(12, 8) }),
        ),
        case(
            "cu12.8 static ignores runtime 12.6",
            [cuda("12.8", "sm_90")],
            nv("12.8", "12.6", "9.0"),
            ok_m(Exact, "sm_90"),
        ),
        case(
            "cu12.8 static ignores runtime 13.0",
            [cuda("12.8", "sm_90")],
            nv("13.0", "13.0", "9.0"),
            ok_m(Exact, "sm_90"),
        ),
        case(
            "cu12.8 static with no runtime",
            [cuda("12.8", "sm_90")],
            nv("12.8", "", "9.0"),
            ok_m(Exact, "sm_90"),
        ),
        case(
            "cu12.8 on driver 12.4 with SASS: MVC accepts",
            [cuda("12.8", "sm_90")],
            nv("12.4", "", "9.0"),
            ok_m(Exact, "sm_90"),
        ),
        case(
            "cu12.8 dynamic on driver 12.4, runtime 12.8, SASS: MVC accepts",
            [cuda_dyn("12.8", "sm_80")],
            nv("12.4", "12.8", "8.6"),
            ok_m(SameMajorLower, "sm_80"),
        ),
        case(
            "cu12.8 on driver 12.4, SASS for 9.0 + PTX, device 10.0: MVC needs SASS",
            [cuda("12.8", "sm_90, compute_90")],
            nv("12.4", "", "10.0"),
            no("MvcNeedsSass"),
        ),
        case(
            "cu12.8 on driver 12.4 with compute_90 only on 9.0: MVC needs SASS",
            [cuda("12.8", "compute_90")],
            nv("12.4", "", "9.0"),
            no("MvcNeedsSass"),
        ),
        case(
            "cuda variant on a host without NVIDIA: backend unavailable",
            [cuda("12.8", "sm_90")],
            "",
            no("BackendUnavailable"),
        ),
        case(
            "cuda variant, driver with no visible device: backend unavailable",
            [cuda("12.8", "sm_90")],
            nv128(""),
            no("BackendUnavailable"),
        ),
        // ---- §2.1: AMD target ids and features ----
        case(
            "gfx90a on gfx90a: exact",
            [rocm("6.2", "gfx90a")],
            rocm62("gfx90a"),
            ok_m(Exact, "gfx90a"),
        ),
        case(
            "gfx90a not on gfx942",
            [rocm("6.2", "gfx90a")],
            rocm62("gfx942"),
            no_eq(Rejection::NoDeviceCode {
                device: "rocm:0 (gfx942)".into(),
                have: strs(&["gfx90a"]),
            }),
        ),
        case(
            "gfx1100 not on gfx1101",
            [rocm("6.2", "gfx1100")],
            rocm62("gfx1101"),
            no("NoDeviceCode"),
        ),
        case(
            "gfx90a:xnack+ on gfx90a with xnack unknown: feature mismatch",
            [rocm("6.2", "gfx90a:xnack+")],
            rocm62("gfx90a"),
            no_eq(Rejection::FeatureMismatch {
                device: "rocm:0 (gfx90a)".into(),
                have: strs(&["gfx90a:xnack+"]),
            }),
        ),
        case(
            "gfx90a:xnack+ on gfx90a:xnack+: exact",
            [rocm("6.2", "gfx90a:xnack+")],
            rocm62("gfx90a:xnack+"),
            ok_m(Exact, "gfx90a:xnack+"),
        ),
        case(
            "gfx90a:xnack- on gfx90a:xnack+: feature mismatch",
            [rocm("6.2", "gfx90a:xnack-")],
            rocm62("gfx90a:xnack+"),
            no("FeatureMismatch"),
        ),
        case(
            "gfx90a:xnack+ on gfx90a:xnack-: feature mismatch",
            [rocm("6.2", "gfx90a:xnack+")],
            rocm62("gfx90a:xnack-"),
            no("FeatureMismatch"),
        ),
        case(
            "gfx90a (any) on gfx90a:xnack+: exact",
            [rocm("6.2", "gfx90a")],
            rocm62("gfx90a:xnack+"),
            ok_m(Exact, "gfx90a"),
        ),
        case(
            "gfx942:sramecc+:xnack- on the same device: exact",
            [rocm("6.2", "gfx942:sramecc+:xnack-")],
            rocm62("gfx942:sramecc+:xnack-"),
            ok_m(Exact, "gfx942:sramecc+:xnack-"),
        ),
        case(
            "gfx942:sramecc+ on gfx942:sramecc-: feature mismatch",
            [rocm("6.2", "gfx942:sramecc+")],
            rocm62("gfx942:sramecc-:xnack-"),
            no("FeatureMismatch"),
        ),
        case(
            "xnack+ and xnack- objects on gfx90a:xnack-",
            [rocm("6.2", "gfx90a:xnack+, gfx90a:xnack-")],
            rocm62("gfx90a:xnack-"),
            ok_m(Exact, "gfx90a:xnack-"),
        ),
        // ---- §2.2: generic targets ----
        case(
            "gfx11-generic on gfx1100",
            [rocm("6.2", "gfx11-generic")],
            rocm62("gfx1100"),
            ok_m(Generic, "gfx11-generic"),
        ),
        case(
            "gfx11-generic on gfx1101",
            [rocm("6.2", "gfx11-generic")],
            rocm62("gfx1101"),
            ok_m(Generic, "gfx11-generic"),
        ),
        case(
            "gfx11-generic on gfx1102",
            [rocm("6.2", "gfx11-generic")],
            rocm62("gfx1102"),
            ok_m(Generic, "gfx11-generic"),
        ),
        case(
            "gfx11-generic on gfx1103",
            [rocm("6.2", "gfx11-generic")],
            rocm62("gfx1103"),
            ok_m(Generic, "gfx11-generic"),
        ),
        case(
            "gfx11-generic on gfx1150",
            [rocm("6.2", "gfx11-generic")],
            rocm62("gfx1150"),
            ok_m(Generic, "gfx11-generic"),
        ),
        case(
            "gfx11-generic on gfx1151",
            [rocm("6.2", "gfx11-generic")],
            rocm62("gfx1151"),
            ok_m(Generic, "gfx11-generic"),
        ),
        case(
            "gfx11-generic on gfx1152",
            [rocm("6.2", "gfx11-generic")],
            rocm62("gfx1152"),
            ok_m(Generic, "gfx11-generic"),
        ),
        case(
            "gfx11-generic on gfx1153",
            [rocm("6.2", "gfx11-generic")],
            rocm62("gfx1153"),
            ok_m(Generic, "gfx11-generic"),
        ),
        case(
            "gfx11-generic never on gfx1200",
            [rocm("6.2", "gfx11-generic")],
            rocm62("gfx1200"),
            no("NoDeviceCode"),
        ),
        case(
            "gfx11-generic not on gfx1030",
            [rocm("6.2", "gfx11-generic")],
            rocm62("gfx1030"),
            no("NoDeviceCode"),
        ),
        case(
            "gfx12-generic on gfx1201",
            [rocm("6.2", "gfx12-generic")],
            rocm62("gfx1201"),
            ok_m(Generic, "gfx12-generic"),
        ),
        case(
            "gfx9-4-generic on gfx942",
            [rocm("6.2", "gfx9-4-generic")],
            rocm62("gfx942:sramecc+:xnack-"),
            ok_m(Generic, "gfx9-4-generic"),
        ),
        case(
            "gfx9-4-generic not on gfx90a",
            [rocm("6.2", "gfx9-4-generic")],
            rocm62("gfx90a"),
            no("NoDeviceCode"),
        ),
        case(
            "gfx9-4-generic:xnack+ not on gfx942:xnack-",
            [rocm("6.2", "gfx9-4-generic:xnack+")],
            rocm62("gfx942:sramecc+:xnack-"),
            no("FeatureMismatch"),
        ),
        case(
            "gfx9-4-generic:xnack- on gfx942:xnack-",
            [rocm("6.2", "gfx9-4-generic:xnack-")],
            rocm62("gfx942:sramecc+:xnack-"),
            ok_m(Generic, "gfx9-4-generic:xnack-"),
        ),
        case(
            "exact beats generic within a variant",
            [rocm("6.2", "gfx11-generic, gfx1100")],
            rocm62("gfx1100"),
            ok_m(Exact, "gfx1100"),
        ),
        case(
            "exact beats generic across variants",
            [id("a-generic", rocm("6.2", "gfx9-4-generic")), id("z-exact", rocm("6.2", "gfx942"))],
            rocm62("gfx942"),
            ok_m(Exact, "gfx942"),
        )
        .order(&["z-exact", "a-generic"]),
        case(
            "any-feature object beats explicit features",
            [
                id("a-explicit", rocm("6.2", "gfx942:sramecc+:xnack-")),
                id("b-any", rocm("6.2", "gfx942")),
            ],
            rocm62("gfx942:sramecc+:xnack-"),
            ok_m(Exact, "gfx942"),
        )
        .order(&["b-any", "a-explicit"]),
        // ---- §2.5: ROCm versions ----
        case(
            "ROCm 6.2 variant on ROCm 7.0: major mismatch",
            [rocm("6.2", "gfx942")],
            amd("7.0", "gfx942"),
            no_eq(Rejection::RocmMajorMismatch {
                need: mm(6, 2),
                have: mm(7, 0),
            }),
        ),
        case(
            "ROCm 6.2 variant on ROCm 6.3: minor not declared",
            [rocm("6.2", "gfx942")],
            amd("6.3", "gfx942"),
            no_eq(Rejection::RocmMinorNotDeclared {
                need: mm(6, 2),
                have: mm(6, 3),
            }),
        ),
        case(
            "ROCm 6.2 variant on ROCm 6.1: minor not declared",
            [rocm("6.2", "gfx942")],
            amd("6.1", "gfx942"),
            no("RocmMinorNotDeclared"),
        ),
        case(
            "ROCm 6.2 variant declaring 6.3, on 6.3",
            [rocm_compat("6.2", "6.3", "gfx942")],
            amd("6.3", "gfx942"),
            ok_m(Exact, "gfx942"),
        ),
        case(
            "ROCm 6.2 variant declaring 6.3, on 6.4",
            [rocm_compat("6.2", "6.3", "gfx942")],
            amd("6.4", "gfx942"),
            no("RocmMinorNotDeclared"),
        ),
        case(
            "ROCm version unknown",
            [rocm("6.2", "gfx942")],
            amd("", "gfx942"),
            no_eq(Rejection::RocmVersionUnknown { need: mm(6, 2) }),
        ),
        case(
            "rocm variant on a host without AMD GPU",
            [rocm("6.2", "gfx942")],
            nv128("9.0"),
            no("BackendUnavailable"),
        ),
        // ---- §3.3 / §7.5: CPU levels and features ----
        case(
            "x86-64-v3 variant on a v4 host",
            ["cpu-level = \"x86-64-v3\"".to_owned()],
            linux_v4,
            ok(Cpu),
        ),
        case(
            "v4 variant ranks above v3 variant on a v4 host",
            [
                id("cpu-v3", "cpu-level = \"x86-64-v3\""),
                id("cpu-v4", "cpu-level = \"x86-64-v4\""),
                id("cpu-base", ""),
            ],
            linux_v4,
            ok(Cpu),
        )
        .target("cpu-v3")
        .order(&["cpu-v4", "cpu-v3", "cpu-base"]),
        case(
            "v4 variant on a v3 host: level too low",
            ["cpu-level = \"x86-64-v4\"".to_owned()],
            "cpu-level = \"x86-64-v3\"",
            no_eq(Rejection::CpuLevelTooLow {
                need: X86Level::V4,
                have: Some(X86Level::V3),
            }),
        ),
        case(
            "v2 variant on a host of unknown level",
            ["cpu-level = \"x86-64-v2\"".to_owned()],
            "os = \"linux\"\narch = \"x86_64\"\nlibc = \"glibc 2.35\"",
            no_eq(Rejection::CpuLevelTooLow {
                need: X86Level::V2,
                have: None,
            }),
        ),
        case(
            "cpu features missing",
            ["cpu-features = [\"avx512f\", \"avx512vnni\", \"avx512bf16\"]".to_owned()],
            "cpu-features = [\"avx2\", \"avx512f\"]",
            no_eq(Rejection::CpuFeaturesMissing {
                missing: strs(&["avx512bf16", "avx512vnni"]),
            }),
        ),
        case(
            "cpu features present",
            ["cpu-features = [\"avx512f\"]".to_owned()],
            "cpu-features = [\"avx2\", \"avx512f\"]",
            ok(Cpu),
        ),
        case(
            "aarch64 sve2 variant on an sve host",
            [cat!("arch = \"aarch64\"", "cpu-features = [\"sve2\"]")],
            "os = \"linux\"\narch = \"aarch64\"\nlibc = \"glibc 2.35\"\ncpu-features = [\"sve\"]",
            no_eq(Rejection::CpuFeaturesMissing { missing: strs(&["sve2"]) }),
        ),
        case(
            "cpu checks come before device code",
            [cat!(cuda("12.8", "sm_80"), "cpu-level = \"x86-64-v4\"")],
            nv128("9.0"),
            no("CpuLevelTooLow"),
        ),
        // ---- §3.4 / §7.5: OS, libc ----
        case(
            "manylinux_2_28 on glibc 2.27",
            ["libc = \"glibc 2.28\"".to_owned()],
            "libc = \"glibc 2.27\"",
            no_eq(Rejection::GlibcTooOld {
                need: mm(2, 28),
                have: mm(2, 27),
            }),
        ),
        case(
            "glibc 2.28 on glibc 2.28",
            ["libc = \"glibc 2.28\"".to_owned()],
            "libc = \"glibc 2.28\"",
            ok(Cpu),
        ),
        case("glibc 2.17 on glibc 2.35", ["libc = \"glibc 2.17\"".to_owned()], "", ok(Cpu)),
        case(
            "musl variant on a glibc host",
            ["libc = \"musl 1.2\"".to_owned()],
            "",
            no_eq(Rejection::LibcMismatch {
                need: LibcFamily::Musl,
                have: Some(LibcFamily::Glibc),
            }),
        ),
        case(
            "glibc variant on a musl host",
            ["libc = \"glibc 2.17\"".to_owned()],
            "libc = \"musl 1.2\"",
            no_eq(Rejection::LibcMismatch {
                need: LibcFamily::Glibc,
                have: Some(LibcFamily::Musl),
            }),
        ),
        case(
            "musl 1.2 variant on musl 1.1",
            ["libc = \"musl 1.2\"".to_owned()],
            "libc = \"musl 1.1\"",
            no_eq(Rejection::MuslTooOld {
                need: mm(1, 2),
                have: mm(1, 1),
            }),
        ),
        case(
            "musl 1.2 variant on musl 1.2",
            ["libc = \"musl 1.2\"".to_owned()],
            "libc = \"musl 1.2\"",
            ok(Cpu),
        ),
        case(
            "libc unknown on the host",
            ["libc = \"glibc 2.17\"".to_owned()],
            "os = \"linux\"\narch = \"x86_64\"",
            no_eq(Rejection::LibcMismatch {
                need: LibcFamily::Glibc,
                have: None,
            }),
        ),
        case(
            "windows variant on linux",
            ["os = \"windows\"".to_owned()],
            "",
            no_eq(Rejection::OsMismatch {
                need: Os::Windows,
                have: Os::Linux,
            }),
        ),
        case(
            "aarch64 variant on x86_64",
            ["arch = \"aarch64\"".to_owned()],
            "",
            no_eq(Rejection::CpuArchMismatch {
                need: CpuArch::Aarch64,
                have: CpuArch::X86_64,
            }),
        ),
        case(
            "libc is checked before the CUDA driver",
            [cat!(cuda("12.8", "sm_90"), "libc = \"glibc 2.28\"")],
            cat!("libc = \"glibc 2.27\"", nv("11.8", "", "9.0")),
            no("GlibcTooOld"),
        ),
        case(
            "kernel ABI 2 is not spoken",
            [String::new()],
            "",
            no_eq(Rejection::AbiUnsupported { need: 2, have: 1 }),
        )
        .abi(2),
        // ---- §3.1 / §7.5: Metal and macOS ----
        case(
            "Metal 4.0 on macOS 15: MSL too new",
            [metal("4.0")],
            mac("15.0"),
            no_eq(Rejection::MslTooNew {
                need_macos: mm(26, 0),
                have: Some(mm(15, 0)),
            }),
        ),
        case("Metal 4.0 on macOS 26", [metal("4.0")], mac("26.0"), ok_m(Exact, "metal 4.0")),
        case("Metal 3.2 on macOS 15", [metal("3.2")], mac("15.0"), ok_m(Exact, "metal 3.2")),
        case("Metal 3.2 on macOS 14: MSL too new", [metal("3.2")], mac("14.6"), no("MslTooNew")),
        case(
            "Metal 4.0 with unknown macOS",
            [metal("4.0")],
            "os = \"macos\"\narch = \"aarch64\"\nmetal = {}",
            no_eq(Rejection::MslTooNew {
                need_macos: mm(26, 0),
                have: None,
            }),
        ),
        case(
            "Metal variant on a Mac without Metal",
            [metal("3.0")],
            "os = \"macos\"\narch = \"aarch64\"\nmacos = \"15.0\"",
            no("BackendUnavailable"),
        ),
        case(
            "macos-min 14 on macOS 13",
            ["os = \"macos\"\narch = \"aarch64\"\nmacos-min = \"14.0\"".to_owned()],
            mac("13.5"),
            no_eq(Rejection::MacOsTooOld {
                need: mm(14, 0),
                have: Some(mm(13, 5)),
            }),
        ),
        case(
            "macos-min 14 on macOS 15",
            ["os = \"macos\"\narch = \"aarch64\"\nmacos-min = \"14.0\"".to_owned()],
            mac("15.0"),
            ok(Cpu),
        ),
        // ---- §3.2: Intel XPU ----
        case(
            "XPU AOT for the exact IP",
            [xpu("2025.1", "20.1.4", false)],
            intel("2025.1", "20.1.4"),
            ok_m(Exact, "20.1.4"),
        ),
        case(
            "XPU SPIR-V on any Intel GPU: jit",
            [xpu("2025.1", "", true)],
            intel("2025.1", "12.60.7"),
            jit("spirv", 0),
        ),
        case(
            "XPU AOT preferred over SPIR-V",
            [xpu("2025.1", "20.1.4", true)],
            intel("2025.1", "20.1.4"),
            ok_m(Exact, "20.1.4"),
        ),
        case(
            "XPU AOT for another IP, no SPIR-V",
            [xpu("2025.1", "20.1.4", false)],
            intel("2025.1", "20.2.0"),
            no("NoDeviceCode"),
        ),
        case(
            "XPU oneAPI mismatch",
            [xpu("2025.1", "20.1.4", true)],
            intel("2025.2", "20.1.4"),
            no_eq(Rejection::OneApiMismatch {
                need: mm(2025, 1),
                have: Some(mm(2025, 2)),
            }),
        ),
        case(
            "XPU oneAPI unknown",
            [xpu("2025.1", "20.1.4", true)],
            intel("", "20.1.4"),
            no_eq(Rejection::OneApiMismatch {
                need: mm(2025, 1),
                have: None,
            }),
        ),
        case(
            "XPU SPIR-V with JIT forbidden",
            [xpu("2025.1", "", true)],
            intel("2025.1", "12.60.7"),
            no("JitForbidden"),
        )
        .prefs(forbid_jit()),
        // ---- §7.3 user overrides: preferences ----
        case(
            "forced backend sets the CPU variant aside",
            [id("cpu", ""), id("cuda", cuda("12.8", "sm_90"))],
            nv128("9.0"),
            no_eq(Rejection::BackendNotPreferred { want: Backend::Cuda }),
        )
        .target("cpu")
        .order(&["cuda", "cpu"])
        .prefs(Preferences {
            backend: Some(Backend::Cuda),
            ..Preferences::default()
        }),
        case(
            "forced CPU backend sets the CUDA variant aside",
            [id("cpu", ""), id("cuda", cuda("12.8", "sm_90"))],
            nv128("9.0"),
            ok(Cpu),
        )
        .order(&["cpu", "cuda"])
        .prefs(Preferences {
            backend: Some(Backend::Cpu),
            ..Preferences::default()
        }),
        case(
            "forced variant: the better one is not selected",
            [id("a", cuda("12.8", "sm_80")), id("b", cuda("12.8", "sm_90a"))],
            nv128("9.0"),
            no_eq(Rejection::NotSelected { selected: "a".into() }),
        )
        .target("b")
        .prefs(Preferences {
            variant: Some("a".into()),
            ..Preferences::default()
        }),
        case(
            "forced variant is still checked against the host",
            [id("a", cuda("12.8", "sm_80")), id("b", cuda("12.8", "sm_90a"))],
            nv128("9.0"),
            no("NoDeviceCode"),
        )
        .target("a")
        .prefs(Preferences {
            variant: Some("a".into()),
            ..Preferences::default()
        }),
        case(
            "forbid_jit turns a PTX-only match into JitForbidden",
            [cuda("12.8", "compute_80")],
            nv128("9.0"),
            no("JitForbidden"),
        )
        .prefs(forbid_jit()),
        case(
            "forbid_jit keeps a cubin match",
            [cuda("12.8", "sm_90, compute_90")],
            nv128("9.0"),
            ok_m(Exact, "sm_90"),
        )
        .prefs(forbid_jit()),
        case(
            "forbid_jit ranks a cubin variant over the PTX one",
            [id("ptx", cuda("12.8", "compute_80")), id("sass", cuda("12.6", "sm_90"))],
            nv128("9.0"),
            no("JitForbidden"),
        )
        .target("ptx")
        .order(&["sass", "ptx"])
        .prefs(forbid_jit()),
        case(
            "device 0 of 8.0 + 9.0 with sm_80",
            [cuda("12.8", "sm_80")],
            nv128("8.0, 9.0"),
            ok_m(Exact, "sm_80"),
        )
        .prefs(on_device(0)),
        case(
            "device 1 of 8.0 + 9.0 with sm_80",
            [cuda("12.8", "sm_80")],
            nv128("8.0, 9.0"),
            no_eq(Rejection::NoDeviceCode {
                device: "cuda:1 (9.0)".into(),
                have: strs(&["sm_80"]),
            }),
        )
        .prefs(on_device(1)),
        case(
            "device 1 of 8.0 + 9.0 with sm_80 + compute_80",
            [cuda("12.8", "sm_80, compute_80")],
            nv128("8.0, 9.0"),
            jit("compute_80", 10),
        )
        .prefs(on_device(1)),
        case(
            "device index out of range",
            [cuda("12.8", "sm_80")],
            nv128("8.0, 9.0"),
            no("BackendUnavailable"),
        )
        .prefs(on_device(2)),
        case(
            "device 1 of gfx90a + gfx942",
            [rocm("6.2", "gfx942")],
            rocm62("gfx90a, gfx942"),
            ok_m(Exact, "gfx942"),
        )
        .prefs(on_device(1)),
        // ---- §7.2 rule 8: every visible device; the tier is the worst ----
        case(
            "all devices: sm_80 does not serve 9.0",
            [cuda("12.8", "sm_80")],
            nv128("8.0, 9.0"),
            no_eq(Rejection::NoDeviceCode {
                device: "cuda:1 (9.0)".into(),
                have: strs(&["sm_80"]),
            }),
        ),
        case(
            "all devices: 8.0 + 8.6 gives same major",
            [cuda("12.8", "sm_80")],
            nv128("8.0, 8.6"),
            ok_m(SameMajorLower, "sm_80"),
        ),
        case(
            "all devices: 8.0 + 9.0 with PTX gives jit",
            [cuda("12.8", "sm_80, compute_80")],
            nv128("8.0, 9.0"),
            jit("compute_80", 10),
        ),
        case(
            "all devices: 9.0 + 8.0 with sm_90a + sm_80 gives exact",
            [cuda("12.8", "sm_90a, sm_80")],
            nv128("9.0, 8.0"),
            ok_m(Exact, "sm_80"),
        ),
        case(
            "all devices: sm_80 + sm_90 on 8.0 + 9.0",
            [cuda("12.8", "sm_80, sm_90")],
            nv128("8.0, 9.0"),
            ok_m(Exact, "sm_80"),
        ),
        case(
            "all devices: gfx90a + gfx942 code on both",
            [rocm("6.2", "gfx90a, gfx942")],
            rocm62("gfx90a, gfx942"),
            ok(Exact),
        ),
        case(
            "all devices: exact + generic gives generic",
            [rocm("6.2", "gfx1100, gfx11-generic")],
            rocm62("gfx1100, gfx1101"),
            ok_m(Generic, "gfx11-generic"),
        ),
        case(
            "all devices: gfx90a code misses gfx942",
            [rocm("6.2", "gfx90a")],
            rocm62("gfx90a, gfx942"),
            no_eq(Rejection::NoDeviceCode {
                device: "rocm:1 (gfx942)".into(),
                have: strs(&["gfx90a"]),
            }),
        ),
        // ---- §7.3: ranking ----
        case(
            "toolkit tiebreak: newer CUDA first",
            [id("cu126", cuda("12.6", "sm_90")), id("cu128", cuda("12.8", "sm_90"))],
            nv128("9.0"),
            ok_m(Exact, "sm_90"),
        )
        .order(&["cu128", "cu126"]),
        case(
            "device match outranks toolkit",
            [id("cu128-ptx", cuda("12.8", "compute_90")), id("cu126-sass", cuda("12.6", "sm_90"))],
            nv128("9.0"),
            ok_m(Exact, "sm_90"),
        )
        .order(&["cu126-sass", "cu128-ptx"]),
        case(
            "priority tiebreak",
            [id("a", cuda("12.8", "sm_90")), id("b", cat!(cuda("12.8", "sm_90"), "priority = 5"))],
            nv128("9.0"),
            ok(Exact),
        )
        .order(&["b", "a"]),
        case(
            "id tiebreak",
            [id("beta", cuda("12.8", "sm_90")), id("alpha", cuda("12.8", "sm_90"))],
            nv128("9.0"),
            ok(Exact),
        )
        .order(&["alpha", "beta"]),
        case(
            "specificity outranks priority",
            [
                id("a-plain", "os = \"macos\"\narch = \"aarch64\"\npriority = 100"),
                id("b-min", "os = \"macos\"\narch = \"aarch64\"\nmacos-min = \"13.0\""),
            ],
            mac("14.0"),
            ok(Cpu),
        )
        .order(&["b-min", "a-plain"]),
        case(
            "a GPU match outranks the CPU variant",
            [id("a-cpu", "cpu-level = \"x86-64-v3\""), id("b-jit", cuda("12.8", "compute_80"))],
            nv128("9.0"),
            jit("compute_80", 10),
        )
        .order(&["b-jit", "a-cpu"]),
        case(
            "arch-specific outranks exact",
            [id("a", cuda("12.8", "sm_90")), id("b", cuda("12.8", "sm_90a"))],
            nv128("9.0"),
            ok_m(ArchSpecific, "sm_90a"),
        )
        .order(&["b", "a"]),
        case(
            "exact outranks same major",
            [id("a", cuda("12.8", "sm_80")), id("b", cuda("12.8", "sm_86"))],
            nv128("8.6"),
            ok_m(Exact, "sm_86"),
        )
        .order(&["b", "a"]),
        case(
            "smaller JIT distance first",
            [id("a", cuda("12.8", "compute_80")), id("b", cuda("12.8", "compute_90"))],
            nv128("10.0"),
            jit("compute_90", 10),
        )
        .order(&["b", "a"]),
        case(
            "accepted before rejected",
            [id("a-bad", cuda("12.8", "sm_80")), id("z-good", cuda("12.8", "sm_90"))],
            nv128("9.0"),
            ok(Exact),
        )
        .order(&["z-good", "a-bad"]),
        // ---- §7.4: closest miss = highest stage ----
        case(
            "closest miss is the latest stage",
            [
                id("a-os", "os = \"windows\""),
                id("b-glibc", "libc = \"glibc 2.40\""),
                id("c-device", cuda("12.8", "sm_80")),
                id("d-level", "cpu-level = \"x86-64-v4\""),
                id("e-runtime", cuda_dyn("12.8", "sm_90")),
            ],
            nv128("9.0"),
            no("NoDeviceCode"),
        )
        .order(&["c-device", "d-level", "e-runtime", "b-glibc", "a-os"]),
        case(
            "closest miss: JitForbidden beats NoDeviceCode",
            [id("a", cuda("12.8", "sm_80")), id("b", cuda("12.8", "compute_90"))],
            nv128("9.0"),
            no("JitForbidden"),
        )
        .order(&["b", "a"])
        .prefs(forbid_jit()),
        case(
            "closest miss: equal rejections break ties by id",
            [id("b", "libc = \"glibc 2.40\""), id("a", "libc = \"glibc 2.39\"")],
            "",
            no_eq(Rejection::GlibcTooOld {
                need: mm(2, 39),
                have: mm(2, 35),
            }),
        )
        .order(&["a", "b"]),
    ]
}

// ----------------------------------------------------------------------------------------
// Running the table.
// ----------------------------------------------------------------------------------------

fn show(v: &Verdict) -> String {
    match v {
        Verdict::Accepted { score } => format!("accepted ({score})"),
        Verdict::Rejected { reason } => format!("rejected ({reason})"),
    }
}

fn ids(r: &Resolution) -> Vec<&str> {
    r.candidates.iter().map(|c| c.id.as_str()).collect()
}

/// Runs one case; returns what went wrong.
fn run(case: &Case) -> Vec<String> {
    let built = manifest(case.abi, &case.variants).and_then(|m| host(&case.host).map(|h| (m, h)));
    let (manifest, host) = match built {
        Ok(x) => x,
        Err(e) => return vec![e],
    };
    let res = resolve(&manifest, &host, &case.prefs);
    let mut problems = Vec::new();

    let cand = match case.target {
        Some(id) => res.candidates.iter().find(|c| c.id == id),
        None => res.candidates.first(),
    };
    match cand {
        None => problems.push(format!("no candidate {:?}", case.target)),
        Some(cand) => match (&case.expect, &cand.verdict) {
            (
                Expect::Accepted {
                    tier,
                    matched,
                    jit_distance,
                },
                Verdict::Accepted { score },
            ) => {
                if score.device != *tier {
                    problems.push(format!("`{}`: tier {:?}, expected {tier:?}", cand.id, score.device));
                }
                if let Some(m) = matched
                    && score.matched.as_deref() != Some(*m)
                {
                    problems.push(format!("`{}`: matched {:?}, expected {m:?}", cand.id, score.matched));
                }
                if let Some(d) = jit_distance
                    && score.jit_distance != *d
                {
                    problems.push(format!("`{}`: jit distance {}, expected {d}", cand.id, score.jit_distance));
                }
            }
            (Expect::Code(code), Verdict::Rejected { reason }) if reason.code() == *code => {}
            (Expect::Exactly(want), Verdict::Rejected { reason }) if reason == want => {}
            (want, got) => problems.push(format!("`{}`: {}, expected {want:?}", cand.id, show(got))),
        },
    }

    if let Some(order) = &case.order
        && ids(&res) != *order
    {
        problems.push(format!("order {:?}, expected {order:?}", ids(&res)));
    }

    // Closest miss: exists exactly when nothing is accepted, and has the highest stage.
    match (res.best(), res.closest_miss()) {
        (Some(_), Some(c)) => problems.push(format!("closest_miss `{}` although a variant was accepted", c.id)),
        (None, miss) => {
            let top = res.candidates.iter().filter_map(|c| c.rejection()).map(Rejection::stage).max();
            let got = miss.and_then(|c| c.rejection()).map(Rejection::stage);
            if got != top {
                problems.push(format!("closest_miss stage {got:?}, highest rejection stage {top:?}"));
            }
        }
        (Some(_), None) => {}
    }
    problems
}

#[test]
fn resolver_follows_the_compatibility_rules() {
    let failures: Vec<String> = cases()
        .iter()
        .flat_map(|c| run(c).into_iter().map(move |p| format!("[{}] {p}", c.name)))
        .collect();
    assert!(failures.is_empty(), "{} problem(s):\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn table_has_at_least_70_cases_with_unique_names() {
    let cases = cases();
    assert!(cases.len() >= 70, "only {} cases", cases.len());
    let mut names: Vec<&str> = cases.iter().map(|c| c.name).collect();
    names.sort_unstable();
    let dupes: Vec<&&str> = names.windows(2).filter(|w| w[0] == w[1]).map(|w| &w[0]).collect();
    assert!(dupes.is_empty(), "duplicate case names: {dupes:?}");
}

/// `runs_on` (the cheap yes/no path) agrees with `resolve` under default preferences, for
/// every variant of every case.
#[test]
fn runs_on_agrees_with_resolve() {
    let mut failures = Vec::new();
    for case in cases() {
        let (Ok(manifest), Ok(host)) = (manifest(case.abi, &case.variants), host(&case.host)) else {
            failures.push(format!("[{}] does not build", case.name));
            continue;
        };
        let res = resolve(&manifest, &host, &Preferences::default());
        for v in &manifest.variants {
            let accepted = res.candidates.iter().find(|c| c.id == v.id).is_some_and(|c| c.score().is_some());
            let quick = runs_on(&manifest, v, &host);
            if quick != accepted {
                failures.push(format!(
                    "[{}] `{}`: runs_on = {quick}, resolve accepted = {accepted}",
                    case.name, v.id
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `choose` (one pass, no sort: the load path) picks what `resolve` ranks first, and fails
/// with the same error, for every case and its preferences; `choose_among` agrees with
/// `resolve` over the manifest cut down to the kept variants.
#[test]
fn choose_agrees_with_resolve() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in cases() {
        let (Ok(manifest), Ok(host)) = (manifest(case.abi, &case.variants), host(&case.host)) else {
            failures.push(format!("[{}] does not build", case.name));
            continue;
        };
        let full = resolve(&manifest, &host, &case.prefs);
        let want = full.chosen(&host).map(|c| c.index).map_err(|e| e.to_string());
        let got = choose(&manifest, &host, &case.prefs).map_err(|e| e.to_string());
        if got != want {
            failures.push(format!("[{}] choose = {got:?}, resolve = {want:?}", case.name));
        }
        // Every other variant dropped: the odd positions only.
        let keep = |v: &khub::manifest::Variant| manifest.variants.iter().position(|w| w.id == v.id).is_some_and(|i| i % 2 == 1);
        let mut cut = manifest.clone();
        cut.variants.retain(|v| keep(v));
        let want = resolve(&cut, &host, &case.prefs)
            .chosen(&host)
            .map(|c| c.id.clone())
            .map_err(|e| e.to_string());
        let got = choose_among(&manifest, &host, &case.prefs, keep)
            .map(|i| manifest.variants[i].id.clone())
            .map_err(|e| e.to_string());
        if got != want {
            failures.push(format!("[{}] choose_among = {got:?}, resolve over the cut = {want:?}", case.name));
        }
        checked += 1;
    }
    assert!(checked >= 70, "only {checked} cases");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The order `resolve` returns does not depend on the order of variants in the manifest.
#[test]
fn order_is_independent_of_manifest_order() {
    let mut failures = Vec::new();
    let mut multi = 0;
    for case in cases() {
        let (Ok(manifest), Ok(host)) = (manifest(case.abi, &case.variants), host(&case.host)) else {
            failures.push(format!("[{}] does not build", case.name));
            continue;
        };
        let n = manifest.variants.len();
        if n < 2 {
            continue;
        }
        multi += 1;
        let key = |r: &Resolution| -> Vec<(String, Verdict)> { r.candidates.iter().map(|c| (c.id.clone(), c.verdict.clone())).collect() };
        let base = key(&resolve(&manifest, &host, &case.prefs));
        // Reversed, rotated by one, and odd positions before even ones.
        let perms: Vec<Vec<usize>> = vec![
            (0..n).rev().collect(),
            (1..n).chain(0..1).collect(),
            (0..n).filter(|i| i % 2 == 1).chain((0..n).filter(|i| i % 2 == 0)).collect(),
        ];
        for perm in perms {
            let mut shuffled = manifest.clone();
            shuffled.variants = perm.iter().map(|&i| manifest.variants[i].clone()).collect();
            let got = key(&resolve(&shuffled, &host, &case.prefs));
            if got != base {
                let a: Vec<&str> = base.iter().map(|(id, _)| id.as_str()).collect();
                let b: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
                failures.push(format!("[{}] permutation {perm:?}: {b:?} != {a:?}", case.name));
            }
        }
    }
    assert!(multi >= 10, "only {multi} multi-variant cases");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The order is (rank, id) on a manifest large enough for `resolve`'s radix ordering of ids
/// to split groups: 600 variants in a few rank classes (accepted at two CPU levels and two
/// priorities, rejected at three stages), with ids that share long prefixes, are
/// prefixes of one another, and are listed in neither id nor rank order. Checked against a
/// comparison sort of the same verdicts.
#[test]
fn order_is_rank_then_id_on_a_large_manifest() {
    let mut bodies = Vec::new();
    for i in 0..600usize {
        // Ids: `cu128-static-x86_64-linux-` + a number (so `…-1` is a prefix of `…-10`),
        // some with a suffix, scrambled against the manifest's order.
        let n = (i * 7919) % 600;
        let suffix = if i % 9 == 0 { "-b" } else { "" };
        let id = format!("cu128-static-x86_64-linux-{n}{suffix}");
        let body = match i % 6 {
            0 => format!("id = \"{id}\"\ncpu-level = \"x86-64-v2\""),
            1 => format!("id = \"{id}\"\ncpu-level = \"x86-64-v3\"\npriority = 1"),
            2 => format!("id = \"{id}\"\ncpu-level = \"x86-64-v3\""),
            3 => format!("id = \"{id}\"\ncpu-level = \"x86-64-v4\""),
            4 => format!("id = \"{id}\"\nos = \"macos\"\narch = \"aarch64\"\nmacos-min = \"13.0\""),
            _ => format!("id = \"{id}\"\nlibc = \"musl 1.2\""),
        };
        bodies.push(body);
    }
    let manifest = manifest(1, &bodies).expect("the manifest builds");
    let host = host("").expect("the host builds");
    let got: Vec<String> = resolve(&manifest, &host, &Preferences::default())
        .candidates
        .into_iter()
        .map(|c| c.id)
        .collect();
    let mut want: Vec<(Verdict, String)> = Vec::new();
    for v in &manifest.variants {
        let one = resolve(
            &Manifest {
                variants: vec![v.clone()],
                ..manifest.clone()
            },
            &host,
            &Preferences::default(),
        );
        want.push((one.candidates[0].verdict.clone(), v.id.clone()));
    }
    want.sort_by(|(a, ida), (b, idb)| {
        let rank = |v: &Verdict| match v {
            Verdict::Accepted { score } => (0, Some(std::cmp::Reverse(score.clone())), None),
            Verdict::Rejected { reason } => (1, None, Some(std::cmp::Reverse(reason.closeness()))),
        };
        rank(a).cmp(&rank(b)).then_with(|| ida.cmp(idb))
    });
    let want_verdicts: Vec<Verdict> = want.iter().map(|(v, _)| v.clone()).collect();
    let want: Vec<String> = want.into_iter().map(|(_, id)| id).collect();
    assert_eq!(got.len(), 600);
    // Three accepted classes (v2, v3, v3 with priority) on the v3 host; the v4, macOS and
    // musl variants rejected at three different stages.
    let accepted = want_verdicts.iter().filter(|v| matches!(v, Verdict::Accepted { .. })).count();
    assert_eq!(accepted, 300);
    assert_eq!(got, want);
}
