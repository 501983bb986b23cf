//! Helpers shared by integration tests: compiling C kernels into real shared libraries
//! and writing release directories around them.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use khub::manifest::{Export, FileEntry, KernelInfo, Manifest, RelPath, Variant};
use khub::platform::{Backend, CpuArch, Libc, LibcFamily, MajorMinor, Os};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Compiles C source text into a shared library with the system compiler (found by the
/// `cc` crate), against include/khub_kernel.h.
pub fn build_c_lib(source: &str, out: &Path, extra: &[&str]) {
    let src = out.with_extension("c");
    std::fs::write(&src, source).unwrap();
    let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let tool = cc::Build::new()
        .target(&triple)
        .host(&triple)
        .opt_level(2)
        .cargo_metadata(false)
        .get_compiler();
    let status = tool
        .to_command()
        .args(["-shared", "-fPIC", "-std=c11", "-Wall", "-Werror"])
        .arg("-I")
        .arg(repo().join("include"))
        .args(extra)
        .arg("-o")
        .arg(out)
        .arg(&src)
        .arg("-lm")
        .status()
        .unwrap();
    assert!(status.success(), "compiling {}", src.display());
}

/// Writes a one-variant release around a library: `dir/khub.toml` and
/// `dir/variants/v/libk.so`.
pub fn release_with(dir: &Path, lib: &Path, name: &str, version: &str, exports: &[(&str, &str)]) -> PathBuf {
    let vdir = dir.join("variants/v");
    std::fs::create_dir_all(&vdir).unwrap();
    let bytes = std::fs::read(lib).unwrap();
    std::fs::write(vdir.join("libk.so"), &bytes).unwrap();
    let rel = RelPath::new("variants/v/libk.so").unwrap();
    let m = Manifest {
        schema: "1.0".into(),
        kernel: KernelInfo {
            name: name.into(),
            version: version.parse().unwrap(),
            abi: 1,
            description: None,
            license: None,
        },
        exports: exports
            .iter()
            .map(|(n, s)| Export {
                name: n.to_string(),
                signature: s.to_string(),
            })
            .collect(),
        variants: vec![Variant {
            id: "v".into(),
            backend: Backend::Cpu,
            os: Os::Linux,
            arch: if cfg!(target_arch = "aarch64") {
                CpuArch::Aarch64
            } else {
                CpuArch::X86_64
            },
            libc: Some(Libc {
                family: LibcFamily::Glibc,
                version: MajorMinor::new(2, 17),
            }),
            macos_min: None,
            cpu_level: None,
            cpu_features: Default::default(),
            cuda: None,
            rocm: None,
            metal: None,
            xpu: None,
            priority: 0,
            library: rel.clone(),
            files: vec![FileEntry {
                path: rel,
                size: bytes.len() as u64,
                sha256: khub::verify::sha256(&bytes),
            }],
        }],
    };
    std::fs::write(dir.join("khub.toml"), m.to_toml_string().unwrap()).unwrap();
    dir.to_owned()
}

/// Packages kernels-example (CPU variants only: nvcc is not required) into a fresh
/// directory, once per test binary.
pub fn example_release() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("khub-test-example-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let options = khub::package::BuildOptions {
            only: vec![
                "cpu-x86_64-v1-linux".into(),
                "cpu-x86_64-v3-linux".into(),
                "cpu-x86_64-v4-linux".into(),
            ],
            ..Default::default()
        };
        khub::package::package(&repo().join("kernels-example"), &dir, &options, &mut |_| {}).expect("package kernels-example");
        dir
    })
}

/// Runs the khub binary with no KHUB_* overrides from the caller.
pub fn khub(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_khub"));
    cmd.args(args).current_dir(repo());
    for var in khub::env::ALL {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run khub")
}

/// Copies a directory tree (regular files and directories).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}
