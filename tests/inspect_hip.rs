//! `.hip_fatbin` inspection cross-checked against the LLVM tools, on the HIP test vectors
//! of `shared/reference/binary-formats.md` §4, rebuilt here from a tiny header-free HIP
//! source with Debian's clang-19 (no GPU, no HIP headers, no device libraries needed):
//!
//! | vector | clang flags | expected |
//! |---|---|---|
//! | `libhip19_a` | gfx90a, gfx942, gfx1100 | code object v5: 0x53F, 0x54C, 0x41 |
//! | `libhip19_feat` | gfx90a:xnack±, gfx942:sramecc+:xnack-, gfx1100 | 0x73F, 0x63F, 0xE4C, 0x41 |
//! | `libhip19_z` | as `_a`, `--offload-compress` | one CCOB v2 zstd bundle |
//! | `libhip19_two` | two translation units | two bundles, 4096-aligned |
//! | `libhip19_gen` | `-mcode-object-version=6`: gfx9-generic, gfx11-generic, gfx942 | 0x1000151, 0x1000054, 0x54C |
//! | `libhip19_rdc`, `_new`, `_newrdc` | `-fgpu-rdc`, `--offload-new-driver` | one bundle; `_newrdc` uses the kind `hip` |
//!
//! For every library: the inspector's entry ids per bundle equal `clang-offload-bundler
//! --list` run on that bundle alone (the tool lists only the first bundle of a section,
//! which is checked too), and every code object's `OS/ABI`, `ABI Version` and `Flags`
//! (processor, xnack, sramecc, generic version) equal `llvm-readelf -h` on the object cut
//! out at the inspector's offsets (extracted with `clang-offload-bundler --unbundle` from
//! compressed bundles). CCOB v1, v2 and v3 bundles, zlib and zstd, are synthesized around
//! `libhip19_a`'s bundle and must read the same.
//!
//! Each test skips with a message when clang-19 or the LLVM 19 tools are missing
//! (`apt-get install clang-19 lld-19 llvm-19`).
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use khub::inspect::{CodeObjectFeature, HipCodeObject, HipOffloadKind, LibraryInfo, inspect_file};

/// A header-free HIP translation unit: a kernel written with clang builtins and a host
/// function that launches it through `hipLaunchKernel`, declared here (the shared library
/// may leave HIP runtime symbols undefined).
const KMIN: &str = r#"
typedef struct { unsigned x, y, z; } dim3;
extern "C" int hipLaunchKernel(const void*, dim3, dim3, void**, unsigned long, void*);
__attribute__((global)) void NAME(float* p, float a, int n) {
    int i = __builtin_amdgcn_workgroup_id_x() * __builtin_amdgcn_workgroup_size_x() + __builtin_amdgcn_workitem_id_x();
    if (i < n) p[i] *= a;
}
extern "C" int launch_NAME(float* p, float a, int n, void* stream) {
    void* args[] = {&p, &a, &n};
    dim3 grid = {(unsigned)((n + 255) / 256), 1, 1}, block = {256, 1, 1};
    return hipLaunchKernel((const void*)NAME, grid, block, args, 0, stream);
}
"#;

/// The LLVM 19 tools, or why they are missing.
struct Tools {
    clang: PathBuf,
    bundler: PathBuf,
    readelf: PathBuf,
    objcopy: PathBuf,
}

fn which(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    names
        .iter()
        .flat_map(|n| std::env::split_paths(&path).map(move |d| d.join(n)))
        .find(|p| p.is_file())
}

fn tools() -> Option<Tools> {
    let found = (
        which(&["clang-19"]),
        which(&["clang-offload-bundler-19"]),
        which(&["llvm-readelf-19"]),
        which(&["llvm-objcopy-19"]),
    );
    match found {
        (Some(clang), Some(bundler), Some(readelf), Some(objcopy)) => Some(Tools {
            clang,
            bundler,
            readelf,
            objcopy,
        }),
        missing => {
            eprintln!(
                "skipped: needs clang-19, clang-offload-bundler-19, llvm-readelf-19 and llvm-objcopy-19 \
                 (apt-get install clang-19 lld-19 llvm-19); found {missing:?}"
            );
            None
        }
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds one test vector: `sources` names kernels (one translation unit each), `flags`
/// are clang's.
fn build(t: &Tools, dir: &Path, name: &str, sources: &[&str], flags: &[&str]) -> PathBuf {
    let lib = dir.join(format!("{name}.so"));
    let mut cmd = Command::new(&t.clang);
    cmd.args([
        "-x",
        "hip",
        "-nogpuinc",
        "-nogpulib",
        "-shared",
        "-fPIC",
        "-O2",
        "-Wno-unused-command-line-argument",
    ])
    .args(flags)
    .arg("-o")
    .arg(&lib);
    for kernel in sources {
        let src = dir.join(format!("{name}_{kernel}.hip"));
        std::fs::write(&src, KMIN.replace("NAME", kernel)).unwrap();
        cmd.arg(&src);
    }
    run(&mut cmd);
    lib
}

fn section(t: &Tools, lib: &Path) -> Vec<u8> {
    let out = lib.with_extension("hip_fatbin");
    run(Command::new(&t.objcopy)
        .arg(format!("--dump-section=.hip_fatbin={}", out.display()))
        .arg(lib)
        .arg(lib.with_extension("stripped")));
    std::fs::read(out).unwrap()
}

fn bundler_list(t: &Tools, file: &Path) -> BTreeSet<String> {
    run(Command::new(&t.bundler)
        .args(["--list", "--type=o"])
        .arg(format!("--input={}", file.display())))
    .lines()
    .map(str::to_owned)
    .collect()
}

/// `llvm-readelf -h`: (ABI version, flags value, processor and feature words).
fn readelf(t: &Tools, object: &Path) -> (u8, u32, Vec<String>) {
    let text = run(Command::new(&t.readelf).arg("-h").arg(object));
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_owned()))
            .unwrap_or_else(|| panic!("no `{name}` in\n{text}"))
    };
    assert_eq!(field("OS/ABI:"), "AMDGPU - HSA", "{text}");
    let abi: u8 = field("ABI Version:").parse().unwrap();
    let flags = field("Flags:");
    let mut words = flags.split(", ");
    let value = u32::from_str_radix(words.next().unwrap().trim_start_matches("0x"), 16).unwrap();
    (abi, value, words.map(str::to_owned).collect())
}

/// What `llvm-readelf` would print after the flags value for this code object.
fn readelf_words(o: &HipCodeObject) -> Vec<String> {
    let elf = o.elf.as_ref().unwrap();
    let mut words = vec![elf.processor.unwrap().to_owned()];
    for (name, state) in [("xnack", elf.xnack), ("sramecc", elf.sramecc)] {
        match state {
            CodeObjectFeature::Any => words.push(name.to_owned()),
            CodeObjectFeature::On => words.push(format!("{name}+")),
            CodeObjectFeature::Off => words.push(format!("{name}-")),
            CodeObjectFeature::Unsupported => {}
        }
    }
    if elf.generic_version > 0 {
        words.push(format!("generic_v{}", elf.generic_version));
    }
    words
}

/// Cross-checks the inspector against the LLVM tools on one library; returns what it read.
fn cross_check(t: &Tools, lib: &Path) -> LibraryInfo {
    let info = inspect_file(lib).unwrap();
    assert!(info.warnings.is_empty(), "{}: {:?}", lib.display(), info.warnings);
    let section = section(t, lib);
    let scratch = lib.with_extension("d");
    std::fs::create_dir_all(&scratch).unwrap();

    // Bundle by bundle: the same ids as the bundler lists for that bundle alone.
    let starts: BTreeSet<u64> = info.hip.iter().map(|o| o.bundle_offset).collect();
    let starts: Vec<u64> = starts.into_iter().collect();
    for (i, &start) in starts.iter().enumerate() {
        let end = starts.get(i + 1).copied().unwrap_or(section.len() as u64);
        let file = scratch.join(format!("bundle{i}.bin"));
        std::fs::write(&file, &section[start as usize..end as usize]).unwrap();
        let ours: BTreeSet<String> = info.hip.iter().filter(|o| o.bundle_offset == start).map(|o| o.id.clone()).collect();
        assert_eq!(bundler_list(t, &file), ours, "{} bundle {i}", lib.display());
        if i == 0 {
            // The bundler reads only the first bundle of a whole section.
            let whole = scratch.join("section.bin");
            std::fs::write(&whole, &section).unwrap();
            assert_eq!(bundler_list(t, &whole), ours, "{}: whole section", lib.display());
        }
    }

    // Code object by code object: the ELF header as llvm-readelf reads it.
    for (j, o) in info.hip.iter().enumerate().filter(|(_, o)| o.kind != HipOffloadKind::Host) {
        let object = scratch.join(format!("object{j}.o"));
        match o.compression {
            None => {
                let at = (o.bundle_offset + o.offset) as usize;
                std::fs::write(&object, &section[at..at + o.size as usize]).unwrap();
            }
            Some(_) => {
                let bundle = scratch.join(format!("compressed{j}.bin"));
                std::fs::write(&bundle, &section[o.bundle_offset as usize..]).unwrap();
                run(Command::new(&t.bundler)
                    .args(["--unbundle", "--type=o"])
                    .arg(format!("--input={}", bundle.display()))
                    .arg(format!("--targets={}", o.id))
                    .arg(format!("--output={}", object.display())));
                assert_eq!(std::fs::metadata(&object).unwrap().len(), o.size, "{}", o.id);
            }
        }
        let elf = o.elf.as_ref().unwrap();
        let (abi, flags, words) = readelf(t, &object);
        assert_eq!(abi, elf.abi_version, "{}", o.id);
        assert_eq!(flags, elf.e_flags, "{}", o.id);
        assert_eq!(words, readelf_words(o), "{}", o.id);
        // And the id agrees with the ELF header.
        assert_eq!(elf.target_id().as_deref(), Some(o.target_id.as_str()), "{}", o.id);
    }
    info
}

fn flags_of(info: &LibraryInfo) -> Vec<(String, u32, u32)> {
    info.hip
        .iter()
        .filter_map(|o| o.elf.as_ref().map(|e| (o.target_id.clone(), e.e_flags, e.generic_version)))
        .collect()
}

fn targets(info: &LibraryInfo) -> Vec<String> {
    info.hip_targets().iter().map(ToString::to_string).collect()
}

#[test]
fn hip19_vectors_match_the_llvm_tools() {
    let Some(t) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let a = cross_check(
        &t,
        &build(
            &t,
            d,
            "libhip19_a",
            &["k"],
            &["--offload-arch=gfx90a", "--offload-arch=gfx942", "--offload-arch=gfx1100"],
        ),
    );
    assert_eq!(targets(&a), ["gfx1100", "gfx90a", "gfx942"]);
    let mut fl = flags_of(&a);
    fl.sort();
    assert_eq!(
        fl,
        [
            ("gfx1100".into(), 0x41, 0),
            ("gfx90a".into(), 0x53F, 0),
            ("gfx942".into(), 0x54C, 0)
        ]
    );
    assert!(
        a.hip
            .iter()
            .all(|o| o.elf.as_ref().is_none_or(|e| e.code_object_version == Some(5)))
    );
    assert_eq!(a.hip.iter().filter(|o| o.kind == HipOffloadKind::Host).count(), 1);

    let feat = cross_check(
        &t,
        &build(
            &t,
            d,
            "libhip19_feat",
            &["k"],
            &[
                "--offload-arch=gfx90a:xnack+",
                "--offload-arch=gfx90a:xnack-",
                "--offload-arch=gfx942:sramecc+:xnack-",
                "--offload-arch=gfx1100",
            ],
        ),
    );
    assert_eq!(
        targets(&feat),
        ["gfx1100", "gfx90a:xnack+", "gfx90a:xnack-", "gfx942:sramecc+:xnack-"]
    );
    let mut fl: Vec<u32> = flags_of(&feat).iter().map(|f| f.1).collect();
    fl.sort();
    assert_eq!(fl, [0x41, 0x63F, 0x73F, 0xE4C]);

    let z = cross_check(
        &t,
        &build(
            &t,
            d,
            "libhip19_z",
            &["k"],
            &[
                "--offload-compress",
                "--offload-arch=gfx90a",
                "--offload-arch=gfx942",
                "--offload-arch=gfx1100",
            ],
        ),
    );
    assert_eq!(targets(&z), targets(&a));
    let c = z.hip[0].compression.expect("a compressed bundle");
    assert_eq!((c.version, c.method), (2, "zstd"));
    assert!(c.uncompressed_size > c.stored_size, "{c:?}");
    assert!(z.hip.iter().all(|o| o.compression == Some(c)));

    let two = cross_check(
        &t,
        &build(
            &t,
            d,
            "libhip19_two",
            &["k", "k2"],
            &["--offload-arch=gfx90a", "--offload-arch=gfx1100"],
        ),
    );
    let bundles: BTreeSet<(usize, u64)> = two.hip.iter().map(|o| (o.bundle, o.bundle_offset)).collect();
    assert_eq!(bundles.len(), 2, "{bundles:?}");
    assert!(bundles.iter().all(|(_, off)| off % 4096 == 0), "{bundles:?}");
    assert_eq!(targets(&two), ["gfx1100", "gfx90a"]);

    let generic = cross_check(
        &t,
        &build(
            &t,
            d,
            "libhip19_gen",
            &["k"],
            &[
                "-mcode-object-version=6",
                "--offload-arch=gfx9-generic",
                "--offload-arch=gfx11-generic",
                "--offload-arch=gfx942",
            ],
        ),
    );
    let mut fl = flags_of(&generic);
    fl.sort();
    assert_eq!(
        fl,
        [
            ("gfx11-generic".into(), 0x100_0054, 1),
            ("gfx9-generic".into(), 0x100_0151, 1),
            ("gfx942".into(), 0x54C, 0)
        ]
    );
    assert!(
        generic
            .hip
            .iter()
            .all(|o| o.elf.as_ref().is_none_or(|e| e.code_object_version == Some(6)))
    );
    assert_eq!(targets(&generic), ["gfx11-generic", "gfx9-generic", "gfx942"]);
    assert!(
        generic
            .hip_targets()
            .iter()
            .filter(|t| t.is_generic())
            .all(|t| t.generic_version == 1)
    );

    for (name, flags, kind) in [
        ("libhip19_rdc", &["-fgpu-rdc"][..], HipOffloadKind::HipV4),
        ("libhip19_new", &["--offload-new-driver"][..], HipOffloadKind::HipV4),
        ("libhip19_newrdc", &["--offload-new-driver", "-fgpu-rdc"][..], HipOffloadKind::Hip),
    ] {
        let mut all = flags.to_vec();
        all.extend(["--offload-arch=gfx90a", "--offload-arch=gfx1100"]);
        let info = cross_check(&t, &build(&t, d, name, &["k"], &all));
        assert_eq!(targets(&info), ["gfx1100", "gfx90a"], "{name}");
        assert!(info.hip.iter().all(|o| o.bundle == 0), "{name}");
        assert!(
            info.hip.iter().filter(|o| o.kind != HipOffloadKind::Host).all(|o| o.kind == kind),
            "{name}"
        );
    }
}

/// CCOB v1, v2 and v3 with zlib and zstd, wrapping `libhip19_a`'s plain bundle: the
/// inspector reads the same entries from each; LLVM 19's bundler lists v1 and v2 alike
/// (it does not read v3).
#[test]
fn synthetic_compressed_bundles_read_like_the_plain_one() {
    use std::io::Write as _;
    let Some(t) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let lib = build(
        &t,
        dir.path(),
        "libhip19_a",
        &["k"],
        &["--offload-arch=gfx90a", "--offload-arch=gfx942", "--offload-arch=gfx1100"],
    );
    let plain = section(&t, &lib);
    let ids = bundler_list(&t, &lib.with_extension("hip_fatbin"));
    let mut reference = Vec::new();
    let mut warnings = Vec::new();
    khub::inspect::parse_hip_fatbin(&plain, &mut reference, &mut warnings).unwrap();
    // The bundle proper: the section without its trailing padding.
    let end = reference.iter().map(|o| o.offset + o.size).max().unwrap() as usize;
    let inner = &plain[..end];
    for version in 1..=3u16 {
        for method in 0..=1u16 {
            let stream = if method == 0 {
                let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
                e.write_all(inner).unwrap();
                e.finish().unwrap()
            } else {
                ruzstd::encoding::compress_to_vec(inner, ruzstd::encoding::CompressionLevel::Fastest)
            };
            let mut b = b"CCOB".to_vec();
            b.extend_from_slice(&version.to_le_bytes());
            b.extend_from_slice(&method.to_le_bytes());
            match version {
                1 => b.extend_from_slice(&(inner.len() as u32).to_le_bytes()),
                2 => {
                    b.extend_from_slice(&((24 + stream.len()) as u32).to_le_bytes());
                    b.extend_from_slice(&(inner.len() as u32).to_le_bytes());
                }
                _ => {
                    b.extend_from_slice(&((32 + stream.len()) as u64).to_le_bytes());
                    b.extend_from_slice(&(inner.len() as u64).to_le_bytes());
                }
            }
            b.extend_from_slice(&[0; 8]); // the hash: a cache key nobody checks
            b.extend(stream);
            let mut objects = Vec::new();
            let mut warnings = Vec::new();
            khub::inspect::parse_hip_fatbin(&b, &mut objects, &mut warnings).unwrap();
            assert!(warnings.is_empty(), "{warnings:?}");
            assert_eq!(objects.len(), reference.len());
            for (x, y) in objects.iter().zip(&reference) {
                assert_eq!((&x.id, x.offset, x.size, &x.elf), (&y.id, y.offset, y.size, &y.elf));
                assert_eq!(
                    x.compression.map(|c| (c.version, c.method)),
                    Some((version, if method == 0 { "zlib" } else { "zstd" }))
                );
            }
            if version <= 2 {
                let file = dir.path().join(format!("ccob_v{version}_{method}.bin"));
                std::fs::write(&file, &b).unwrap();
                assert_eq!(bundler_list(&t, &file), ids, "CCOB v{version} method {method}");
            }
        }
    }
}
