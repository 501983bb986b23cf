//! `khub::inspect` against real libraries: a gcc-built `.so`, and CUDA libraries built by
//! nvcc and cross-checked with `cuobjdump`.
//!
//! The CUDA tests need nvcc, found in `KHUB_NVCC`, on `PATH`, or in a pip install
//! (`pip install nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-crt nvidia-cuda-cuobjdump`);
//! without it they print why they skip and pass. No GPU is needed.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

use std::path::{Path, PathBuf};
use std::process::Command;

use khub::inspect::{CudaCodeEntry, CudaCodeKind, LibraryInfo, inspect_file};
use khub::platform::{CudaArch, CudaFeatureSet, MajorMinor};

const SKIP_NVCC: &str = "skipped: nvcc not found (pip install nvidia-cuda-nvcc nvidia-cuda-runtime \
                         nvidia-cuda-crt nvidia-cuda-cuobjdump)";

const KERNEL_CU: &str = r#"
extern "C" __global__ void khub_scale(float *x, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= a;
}
extern "C" int khub_launch(float *x, float a, int n) {
    khub_scale<<<(n + 255) / 256, 256>>>(x, a, n);
    return (int)cudaGetLastError();
}
"#;

fn arch(s: &str) -> CudaArch {
    s.parse().expect("valid arch token")
}

fn is_executable(p: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }
    #[cfg(not(unix))]
    {
        p.is_file()
    }
}

/// `name` in a directory of `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| is_executable(p))
}

/// The first `bin/<name>` at most `depth` folders below `root`, in sorted order.
fn find_below(root: &Path, name: &str, depth: usize) -> Option<PathBuf> {
    let candidate = root.join("bin").join(name);
    if is_executable(&candidate) {
        return Some(candidate);
    }
    if depth == 0 {
        return None;
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs.iter().find_map(|d| find_below(d, name, depth - 1))
}

/// The folder that holds pip's `nvidia` namespace package, asked of python3.
fn pip_nvidia_base() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import nvidia, os; print(os.path.dirname(nvidia.__file__ or nvidia.__path__[0]))",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = String::from_utf8(out.stdout).ok()?;
    let dir = PathBuf::from(dir.trim());
    dir.is_dir().then_some(dir)
}

/// nvcc: `KHUB_NVCC` if set, else `PATH`, else a pip install (`.../nvidia/cu13/bin/nvcc`
/// for CUDA 13 wheels, `.../nvidia/cuda_nvcc/bin/nvcc` for CUDA 12 ones).
fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KHUB_NVCC").map(PathBuf::from) {
        if is_executable(&p) {
            return Some(p);
        }
        eprintln!("KHUB_NVCC={} is not a file; looking elsewhere", p.display());
    }
    if let Some(p) = on_path("nvcc") {
        return Some(p);
    }
    let base = pip_nvidia_base()?;
    find_below(&base.join("nvidia"), "nvcc", 2).or_else(|| find_below(&base, "nvcc", 3))
}

/// cuobjdump beside nvcc, else on `PATH`, else in the pip install.
fn find_cuobjdump(nvcc: &Path) -> Option<PathBuf> {
    nvcc.parent()
        .map(|d| d.join("cuobjdump"))
        .filter(|p| is_executable(p))
        .or_else(|| on_path("cuobjdump"))
        .or_else(|| {
            let base = pip_nvidia_base()?;
            find_below(&base.join("nvidia"), "cuobjdump", 2)
        })
}

/// Builds `src` into the shared library `out`:
///
/// ```text
/// nvcc -gencode ... -shared -Xcompiler -fPIC -cudart static [extra...] -o out src
/// ```
///
/// With CUDA 13 wheels (`nvidia/cu13`) the wheel's own `bin/nvcc.profile` already adds
/// `-I<cu13>/include`, `-isystem <cu13>/include/cccl` and `-L<cu13>/lib`, so nothing more
/// is needed. With the split CUDA 12 wheels (`nvidia/cuda_nvcc`, `nvidia/cuda_runtime`,
/// `nvidia/cuda_crt`) the headers and `libcudart_static.a` live in sibling packages, so
/// their `include` and `lib` folders are added with `-I` and `-L`.
fn nvcc_shared(nvcc: &Path, src: &Path, out: &Path, gencodes: &[&str], extra: &[&str]) {
    let mut cmd = Command::new(nvcc);
    for g in gencodes {
        cmd.args(["-gencode", g]);
    }
    cmd.args(["-shared", "-Xcompiler", "-fPIC", "-cudart", "static"]);
    cmd.args(extra);
    let toolkit = nvcc.parent().and_then(Path::parent);
    let self_contained = toolkit.is_some_and(|t| t.join("include/cuda_runtime.h").is_file());
    if let (false, Some(nvidia)) = (self_contained, toolkit.and_then(Path::parent)) {
        let mut packages: Vec<PathBuf> = std::fs::read_dir(nvidia)
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        packages.sort();
        for p in packages {
            if p.join("include").is_dir() {
                cmd.arg(format!("-I{}", p.join("include").display()));
            }
            if p.join("lib/libcudart_static.a").is_file() {
                cmd.arg(format!("-L{}", p.join("lib").display()));
            }
        }
    }
    cmd.arg("-o").arg(out).arg(src);
    eprintln!("running {cmd:?}");
    let output = cmd.output().expect("nvcc runs");
    assert!(
        output.status.success(),
        "nvcc failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Builds the test kernel with `gencodes` and inspects it.
fn build_cuda(gencodes: &[&str], extra: &[&str]) -> Option<(tempfile::TempDir, PathBuf, PathBuf, LibraryInfo)> {
    let Some(nvcc) = find_nvcc() else {
        println!("{SKIP_NVCC}");
        return None;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let src = dir.path().join("k.cu");
    std::fs::write(&src, KERNEL_CU).expect("write k.cu");
    let lib = dir.path().join("libk.so");
    nvcc_shared(&nvcc, &src, &lib, gencodes, extra);
    let info = inspect_file(&lib).expect("inspect the nvcc-built library");
    Some((dir, nvcc, lib, info))
}

/// The arch tokens of cuobjdump's `--list-elf --list-ptx` lines, in order:
/// (`ELF`|`PTX`, `sm_80`) from `ELF file    1: libk.1.sm_80.cubin`.
fn cuobjdump_list(cuobjdump: &Path, lib: &Path, all: bool) -> Vec<(String, String)> {
    let mut cmd = Command::new(cuobjdump);
    cmd.args(["--list-elf", "--list-ptx"]);
    if all {
        cmd.arg("-all");
    }
    let output = cmd.arg(lib).output().expect("cuobjdump runs");
    assert!(
        output.status.success(),
        "cuobjdump failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let (head, file) = line.split_once(':')?;
            let kind = head.split_whitespace().next()?.to_owned();
            if kind != "ELF" && kind != "PTX" {
                return None;
            }
            let parts: Vec<&str> = file.trim().rsplitn(3, '.').collect();
            // ["cubin" | "ptx", "sm_80", "libk.1"]
            Some((kind, (*parts.get(1)?).to_owned()))
        })
        .collect()
}

/// Our entries as cuobjdump names them: `sm_` for both kinds, `f` dropped for ELF
/// entries in `--list-elf` but kept for PTX.
fn as_cuobjdump(entries: &[&CudaCodeEntry]) -> Vec<(String, String)> {
    entries
        .iter()
        .filter_map(|e| {
            let a = e.arch?;
            let (kind, drop_f) = match e.kind {
                CudaCodeKind::Cubin => ("ELF", true),
                CudaCodeKind::Ptx => ("PTX", false),
                _ => return None,
            };
            let suffix = match a.set {
                CudaFeatureSet::ArchSpecific => "a",
                CudaFeatureSet::Family if !drop_f => "f",
                _ => "",
            };
            Some((kind.to_owned(), format!("sm_{}{}{suffix}", a.major, a.minor)))
        })
        .collect()
}

/// Checks our entry list against cuobjdump's, without and with `-all`.
fn cross_check(nvcc: &Path, lib: &Path, info: &LibraryInfo) {
    let Some(cuobjdump) = find_cuobjdump(nvcc) else {
        println!("cuobjdump not found (pip install nvidia-cuda-cuobjdump): cross-check skipped");
        return;
    };
    let by_kind = |list: Vec<(String, String)>| {
        let (elf, ptx): (Vec<_>, Vec<_>) = list.into_iter().partition(|(k, _)| k == "ELF");
        (elf, ptx)
    };
    let loadable: Vec<&CudaCodeEntry> = info.cuda.iter().filter(|e| !e.relocatable).collect();
    let all: Vec<&CudaCodeEntry> = info.cuda.iter().collect();
    for (ours, all_flag) in [(loadable, false), (all, true)] {
        let theirs = cuobjdump_list(&cuobjdump, lib, all_flag);
        eprintln!("cuobjdump{}: {theirs:?}", if all_flag { " -all" } else { "" });
        assert!(!theirs.is_empty(), "cuobjdump listed nothing");
        assert_eq!(
            by_kind(as_cuobjdump(&ours)),
            by_kind(theirs),
            "our entries vs cuobjdump --list-elf --list-ptx (-all: {all_flag})"
        );
    }
}

fn assert_host_facts(info: &LibraryInfo) {
    assert_eq!(info.machine, std::env::consts::ARCH);
    assert!(info.exports.iter().any(|e| e == "khub_launch"), "{:?}", info.exports);
    assert!(info.needed.iter().any(|n| n == "libc.so.6"), "{:?}", info.needed);
    assert!(info.glibc_floor.is_some());
    assert!(!info.musl);
}

#[test]
fn nvcc_library_lists_its_device_code() {
    let gencodes = [
        "arch=compute_80,code=sm_80",
        "arch=compute_90a,code=sm_90a",
        "arch=compute_90,code=compute_90",
    ];
    let Some((_dir, nvcc, lib, info)) = build_cuda(&gencodes, &[]) else {
        return;
    };
    assert_eq!(info.cuda_code(), [arch("sm_80"), arch("sm_90a"), arch("compute_90")]);
    assert!(info.warnings.is_empty(), "{:?}", info.warnings);
    // The device-link container (cubins only), then the translation unit's.
    assert!(info.cuda.iter().any(|e| e.container == 1), "{:#?}", info.cuda);
    let ptx: Vec<&CudaCodeEntry> = info.cuda.iter().filter(|e| e.kind == CudaCodeKind::Ptx).collect();
    assert_eq!(ptx.len(), 1);
    assert_eq!(ptx[0].code_version.0, 9, "PTX ISA 9.x from CUDA 13: {:?}", ptx[0].code_version);
    assert!(info.cuda.iter().all(|e| !e.relocatable && !e.concat));
    assert_host_facts(&info);
    cross_check(&nvcc, &lib, &info);
}

#[test]
fn nvcc_concat_library_reports_sub_entries() {
    let gencodes = [
        "arch=compute_80,code=sm_80",
        "arch=compute_90a,code=sm_90a",
        "arch=compute_100f,code=sm_100f",
        "arch=compute_90,code=compute_90",
        "arch=compute_120,code=compute_120",
    ];
    let Some((_dir, nvcc, lib, info)) = build_cuda(&gencodes, &["--concat"]) else {
        return;
    };
    assert_eq!(
        info.cuda_code(),
        [
            arch("sm_80"),
            arch("sm_90a"),
            arch("sm_100f"),
            arch("compute_90"),
            arch("compute_120")
        ]
    );
    assert!(info.warnings.is_empty(), "{:?}", info.warnings);
    assert!(info.cuda.iter().any(|e| e.concat), "{:#?}", info.cuda);
    assert!(info.cuda.iter().all(|e| !matches!(e.kind, CudaCodeKind::Unknown(_))));
    cross_check(&nvcc, &lib, &info);
}

#[test]
fn nvcc_rdc_library_marks_relocatable_code() {
    let gencodes = ["arch=compute_80,code=sm_80", "arch=compute_90,code=compute_90"];
    let Some((_dir, nvcc, lib, info)) = build_cuda(&gencodes, &["-rdc=true"]) else {
        return;
    };
    // Only the device-linked sm_80 cubin is loadable; the per-TU code is relocatable.
    assert_eq!(info.cuda_code(), [arch("sm_80")]);
    let relocatable: Vec<String> = info
        .cuda
        .iter()
        .filter(|e| e.relocatable)
        .filter_map(|e| e.arch.map(|a| a.to_string()))
        .collect();
    assert!(relocatable.contains(&"sm_80".to_owned()), "{relocatable:?}");
    assert!(relocatable.contains(&"compute_90".to_owned()), "{relocatable:?}");
    assert!(info.warnings.is_empty(), "{:?}", info.warnings);
    cross_check(&nvcc, &lib, &info);
}

#[test]
fn gcc_library_reports_exports_needs_and_glibc_floor() {
    let Some(cc) = on_path("cc").or_else(|| on_path("gcc")) else {
        println!("skipped: no C compiler (cc) on PATH");
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let src = dir.path().join("plain.c");
    std::fs::write(
        &src,
        r#"
#include <string.h>
#include <stdio.h>
int khub_plain_counter = 1;
static int helper(int x) { return x * 2; }
__attribute__((visibility("hidden"))) int khub_hidden(int x) { return helper(x); }
void khub_plain_copy(char *dst, const char *src, size_t n) {
    memcpy(dst, src, n);
    khub_plain_counter += khub_hidden((int)n);
}
__attribute__((weak)) int khub_plain_weak(void) { return printf("%d\n", khub_plain_counter); }
"#,
    )
    .expect("write plain.c");
    let lib = dir.path().join("libplain.so");
    let output = Command::new(&cc)
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&lib)
        .arg(&src)
        .output()
        .expect("cc runs");
    assert!(output.status.success(), "cc failed: {}", String::from_utf8_lossy(&output.stderr));
    let info = inspect_file(&lib).expect("inspect the cc-built library");
    assert_eq!(info.machine, std::env::consts::ARCH);
    for name in ["khub_plain_copy", "khub_plain_counter", "khub_plain_weak"] {
        assert!(info.exports.iter().any(|e| e == name), "{name} in {:?}", info.exports);
    }
    assert!(!info.exports.iter().any(|e| e == "khub_hidden" || e == "helper"));
    assert!(
        !info.exports.iter().any(|e| e == "memcpy" || e == "printf"),
        "imports are not exports"
    );
    let mut sorted = info.exports.clone();
    sorted.sort();
    assert_eq!(sorted, info.exports);
    assert!(info.needed.iter().any(|n| n == "libc.so.6"), "{:?}", info.needed);
    let floor = info.glibc_floor.expect("a glibc version need");
    assert!(floor >= MajorMinor::new(2, 2), "{floor}");
    if cfg!(target_arch = "x86_64") {
        // memcpy@GLIBC_2.14 on x86-64.
        assert!(floor >= MajorMinor::new(2, 14), "{floor}");
    }
    assert!(!info.musl);
    assert!(info.cuda.is_empty());
    assert!(info.cuda_code().is_empty());
    assert!(info.warnings.is_empty(), "{:?}", info.warnings);
}
