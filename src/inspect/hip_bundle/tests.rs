//! Unit tests of the HIP offload-bundle parser, with hand-built and fuzzed inputs.
use super::*;
use crate::inspect::LibraryInfo;
use crate::inspect::nv_fatbin::EM_CUDA;
use crate::inspect::tests::{XorShift, mutate};

/// A 64-byte AMDGPU code object header (HSA OS ABI) with the given `e_flags` and code
/// object version, padded to `len` bytes.
fn code_object(e_flags: u32, cov: u8, len: usize) -> Vec<u8> {
    let mut h = vec![0u8; len.max(64)];
    h[..4].copy_from_slice(&elf::ELFMAG);
    h[EI_CLASS] = elf::ELFCLASS64;
    h[EI_DATA] = elf::ELFDATA2LSB;
    h[6] = elf::EV_CURRENT;
    h[EI_OSABI] = ELFOSABI_AMDGPU_HSA;
    h[EI_ABIVERSION] = cov - 2;
    h[0x10..0x12].copy_from_slice(&elf::ET_DYN.to_le_bytes());
    h[0x12..0x14].copy_from_slice(&EM_AMDGPU.to_le_bytes());
    h[0x30..0x34].copy_from_slice(&e_flags.to_le_bytes());
    h
}

const HOST_ID: &str = "host-x86_64-unknown-linux--";

/// A plain bundle: the entries in order, code objects at `align`-aligned offsets.
fn bundle(entries: &[(&str, Vec<u8>)], align: usize) -> Vec<u8> {
    let header_len = 32 + entries.iter().map(|(id, _)| 24 + id.len()).sum::<usize>();
    let mut offsets = Vec::new();
    let mut at = header_len;
    for (_, payload) in entries {
        if payload.is_empty() {
            offsets.push(0);
            continue;
        }
        at = at.div_ceil(align) * align;
        offsets.push(at);
        at += payload.len();
    }
    let mut b = BUNDLE_MAGIC.to_vec();
    b.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for ((id, payload), off) in entries.iter().zip(&offsets) {
        b.extend_from_slice(&(*off as u64).to_le_bytes());
        b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        b.extend_from_slice(&(id.len() as u64).to_le_bytes());
        b.extend_from_slice(id.as_bytes());
    }
    for ((_, payload), off) in entries.iter().zip(&offsets) {
        if !payload.is_empty() {
            b.resize(*off, 0);
            b.extend_from_slice(payload);
        }
    }
    b
}

/// The three code objects of `libhip19_a` (binary-formats.md §4), clang-19 v5 flags.
pub(crate) fn hip19_a() -> Vec<u8> {
    bundle(
        &[
            (HOST_ID, Vec::new()),
            ("hipv4-amdgcn-amd-amdhsa--gfx1100", code_object(0x41, 5, 256)),
            ("hipv4-amdgcn-amd-amdhsa--gfx90a", code_object(0x53F, 5, 256)),
            ("hipv4-amdgcn-amd-amdhsa--gfx942", code_object(0x54C, 5, 256)),
        ],
        4096,
    )
}

fn zlib(data: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
}

/// A CCOB bundle of `version` (1 to 3) and `method` (0 zlib, 1 zstd) around `inner`.
pub(crate) fn ccob(version: u16, method: u16, inner: &[u8]) -> Vec<u8> {
    let stream = if method == 0 { zlib(inner) } else { zstd(inner) };
    let mut b = CCOB_MAGIC.to_vec();
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&method.to_le_bytes());
    let hash = [0x5Au8; 8];
    match version {
        1 => {
            b.extend_from_slice(&(inner.len() as u32).to_le_bytes());
        }
        2 => {
            b.extend_from_slice(&((24 + stream.len()) as u32).to_le_bytes());
            b.extend_from_slice(&(inner.len() as u32).to_le_bytes());
        }
        _ => {
            b.extend_from_slice(&((32 + stream.len()) as u64).to_le_bytes());
            b.extend_from_slice(&(inner.len() as u64).to_le_bytes());
        }
    }
    b.extend_from_slice(&hash);
    b.extend(stream);
    b
}

fn hip_parse(section: &[u8]) -> Result<(Vec<HipCodeObject>, Vec<String>), InspectError> {
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    parse_hip_fatbin(section, &mut out, &mut warnings).map(|()| (out, warnings))
}

fn hip_targets_of(objects: Vec<HipCodeObject>) -> Vec<String> {
    LibraryInfo {
        hip: objects,
        ..LibraryInfo::default()
    }
    .hip_targets()
    .iter()
    .map(ToString::to_string)
    .collect()
}

fn expect_hip_corrupt(section: &[u8], needle: &str) {
    match hip_parse(section) {
        Err(InspectError::Corrupt { problem, section, .. }) => {
            assert_eq!(section, HIP_FATBIN_SECTION);
            assert!(problem.contains(needle), "expected `{needle}` in `{problem}`");
        }
        other => panic!("expected a corrupt-section error containing `{needle}`, got {other:?}"),
    }
}

#[test]
fn plain_bundle_lists_every_entry_and_target() {
    let (objects, warnings) = hip_parse(&hip19_a()).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(objects.len(), 4);
    let host = &objects[0];
    assert_eq!(
        (host.kind.clone(), host.size, host.target.is_none()),
        (HipOffloadKind::Host, 0, true)
    );
    assert_eq!(host.triple, "x86_64-unknown-linux-");
    assert!(!host.is_device());
    let gfx90a = &objects[2];
    assert_eq!(gfx90a.kind, HipOffloadKind::HipV4);
    assert_eq!(gfx90a.triple, "amdgcn-amd-amdhsa-");
    assert_eq!(gfx90a.target_id, "gfx90a");
    assert_eq!(gfx90a.offset % 4096, 0);
    let elf = gfx90a.elf.as_ref().unwrap();
    assert_eq!((elf.e_machine, elf.mach, elf.processor), (224, 0x3F, Some("gfx90a")));
    assert_eq!(
        (elf.code_object_version, elf.xnack, elf.sramecc),
        (Some(5), CodeObjectFeature::Any, CodeObjectFeature::Any)
    );
    assert_eq!(elf.target_id().as_deref(), Some("gfx90a"));
    let gfx1100 = objects[1].elf.as_ref().unwrap();
    assert_eq!(
        (gfx1100.xnack, gfx1100.sramecc),
        (CodeObjectFeature::Unsupported, CodeObjectFeature::Unsupported)
    );
    assert_eq!(hip_targets_of(objects), ["gfx1100", "gfx90a", "gfx942"]);
}

#[test]
fn feature_settings_come_from_the_id_and_match_e_flags() {
    let section = bundle(
        &[
            (HOST_ID, Vec::new()),
            ("hipv4-amdgcn-amd-amdhsa--gfx1100", code_object(0x41, 5, 128)),
            ("hipv4-amdgcn-amd-amdhsa--gfx90a:xnack+", code_object(0x73F, 5, 128)),
            ("hipv4-amdgcn-amd-amdhsa--gfx90a:xnack-", code_object(0x63F, 5, 128)),
            ("hipv4-amdgcn-amd-amdhsa--gfx942:sramecc+:xnack-", code_object(0xE4C, 5, 128)),
        ],
        64,
    );
    let (objects, warnings) = hip_parse(&section).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let elf = |i: usize| objects[i].elf.clone().unwrap();
    assert_eq!((elf(2).xnack, elf(2).sramecc), (CodeObjectFeature::On, CodeObjectFeature::Any));
    assert_eq!((elf(3).xnack, elf(3).sramecc), (CodeObjectFeature::Off, CodeObjectFeature::Any));
    assert_eq!((elf(4).xnack, elf(4).sramecc), (CodeObjectFeature::Off, CodeObjectFeature::On));
    assert_eq!(elf(4).target_id().as_deref(), Some("gfx942:sramecc+:xnack-"));
    let t = objects[2].target.clone().unwrap();
    assert_eq!((t.xnack, t.sramecc), (FeatureState::On, FeatureState::Any));
    assert_eq!(
        hip_targets_of(objects),
        ["gfx1100", "gfx90a:xnack+", "gfx90a:xnack-", "gfx942:sramecc+:xnack-"]
    );
}

#[test]
fn generic_targets_take_their_version_from_e_flags() {
    let section = bundle(
        &[
            (HOST_ID, Vec::new()),
            ("hipv4-amdgcn-amd-amdhsa--gfx11-generic", code_object(0x100_0054, 6, 128)),
            ("hipv4-amdgcn-amd-amdhsa--gfx9-generic", code_object(0x100_0151, 6, 128)),
            ("hipv4-amdgcn-amd-amdhsa--gfx942", code_object(0x54C, 6, 128)),
            ("hipv4-amdgcn-amd-amdhsa--gfx10-3-generic", code_object(0x200_0053, 6, 128)),
        ],
        64,
    );
    let (objects, warnings) = hip_parse(&section).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let gen11 = objects[1].elf.clone().unwrap();
    assert_eq!(
        (gen11.code_object_version, gen11.generic_version, gen11.processor),
        (Some(6), 1, Some("gfx11-generic"))
    );
    let gen9 = objects[2].elf.clone().unwrap();
    assert_eq!((gen9.generic_version, gen9.xnack), (1, CodeObjectFeature::Any));
    assert_eq!(objects[3].elf.clone().unwrap().generic_version, 0);
    assert_eq!(objects[4].target.clone().unwrap().generic_version, 2);
    assert_eq!(
        hip_targets_of(objects),
        ["gfx10-3-generic@2", "gfx11-generic", "gfx9-generic", "gfx942"]
    );
}

#[test]
fn older_code_object_versions_decode_their_own_feature_bits() {
    let v3 = AmdCodeObjectHeader::read(&code_object(0x3F | 0x100, 3, 64)).unwrap();
    assert_eq!(
        (v3.code_object_version, v3.xnack, v3.sramecc),
        (Some(3), CodeObjectFeature::On, CodeObjectFeature::Off)
    );
    let v2 = AmdCodeObjectHeader::read(&code_object(0x2C | 0x1, 2, 64)).unwrap();
    assert_eq!((v2.xnack, v2.sramecc), (CodeObjectFeature::On, CodeObjectFeature::Unsupported));
    // hipcc 5.2.3's gfx940 (binary-formats.md §4): v4, e_flags 0x540.
    let v4 = AmdCodeObjectHeader::read(&code_object(0x540, 4, 64)).unwrap();
    assert_eq!(
        (v4.processor, v4.xnack, v4.sramecc),
        (Some("gfx940"), CodeObjectFeature::Any, CodeObjectFeature::Any)
    );
    // The generic version field only exists from v6 on.
    assert_eq!(
        AmdCodeObjectHeader::read(&code_object(0x100_003F, 5, 64)).unwrap().generic_version,
        0
    );
    assert!(AmdCodeObjectHeader::read(b"\x7fELF").unwrap_err().contains("not a 64-bit"));
    let mut cuda = code_object(0x41, 5, 64);
    cuda[0x12..0x14].copy_from_slice(&EM_CUDA.to_le_bytes());
    assert!(AmdCodeObjectHeader::read(&cuda).unwrap_err().contains("EM_AMDGPU"));
    assert_eq!(amdgpu_mach_name(0x5F), Some("gfx9-4-generic"));
    assert_eq!(amdgpu_mach_name(0x49), None);
}

#[test]
fn bundles_follow_each_other_after_zero_padding() {
    // libhip19_two: a second translation unit's bundle at 0x5000.
    let mut section = hip19_a();
    section.resize(0x5000, 0);
    section.extend(bundle(
        &[
            (HOST_ID, Vec::new()),
            ("hipv4-amdgcn-amd-amdhsa--gfx90a", code_object(0x53F, 5, 128)),
        ],
        4096,
    ));
    section.resize(section.len().div_ceil(4096) * 4096, 0);
    let (objects, warnings) = hip_parse(&section).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(objects.len(), 6);
    assert_eq!((objects[4].bundle, objects[4].bundle_offset), (1, 0x5000));
    assert_eq!(hip_targets_of(objects), ["gfx1100", "gfx90a", "gfx942"]);
    // An empty or all-zero section holds nothing.
    assert!(hip_parse(&[]).unwrap().0.is_empty());
    assert!(hip_parse(&[0; 4096]).unwrap().0.is_empty());
}

#[test]
fn compressed_bundles_of_every_version_and_method() {
    let inner = hip19_a();
    let (plain, _) = hip_parse(&inner).unwrap();
    for version in 1..=3u16 {
        for method in 0..=1u16 {
            let mut section = ccob(version, method, &inner);
            let stored = section.len() as u64;
            // Another bundle after the compressed one, 4096-aligned: v1 records no
            // size, so its end is where the stream ends.
            section.resize(section.len().div_ceil(4096) * 4096, 0);
            let second_at = section.len() as u64;
            section.extend(bundle(
                &[
                    (HOST_ID, Vec::new()),
                    ("hipv4-amdgcn-amd-amdhsa--gfx1030", code_object(0x36, 4, 128)),
                ],
                4096,
            ));
            let (objects, warnings) = hip_parse(&section).unwrap_or_else(|e| panic!("v{version} method {method}: {e}"));
            assert!(warnings.is_empty(), "{warnings:?}");
            assert_eq!(objects.len(), 6, "v{version} method {method}");
            let c = objects[0].compression.unwrap();
            assert_eq!(c.version, version);
            assert_eq!(c.method, if method == 0 { "zlib" } else { "zstd" });
            assert_eq!(c.uncompressed_size, inner.len() as u64);
            assert_eq!(c.stored_size, stored, "v{version} method {method}");
            for (a, b) in objects.iter().zip(&plain) {
                assert_eq!((&a.id, a.offset, a.size, &a.elf), (&b.id, b.offset, b.size, &b.elf));
            }
            assert_eq!((objects[5].bundle, objects[5].bundle_offset), (1, second_at));
            assert!(objects[5].compression.is_none());
            assert_eq!(hip_targets_of(objects), ["gfx1030", "gfx1100", "gfx90a", "gfx942"]);
        }
    }
}

#[test]
fn compressed_bundles_are_capped_at_their_declared_size() {
    let inner = hip19_a();
    // A stream that expands past what the header declares: a bomb, refused.
    let mut bomb = ccob(2, 1, &inner);
    bomb[12..16].copy_from_slice(&100u32.to_le_bytes());
    expect_hip_corrupt(&bomb, "expands past the declared 100 bytes");
    let mut bomb = ccob(3, 0, &inner);
    bomb[16..24].copy_from_slice(&100u64.to_le_bytes());
    expect_hip_corrupt(&bomb, "expands past");
    // One that falls short of it.
    let mut short = ccob(1, 0, &inner);
    short[8..12].copy_from_slice(&(inner.len() as u32 + 1).to_le_bytes());
    expect_hip_corrupt(&short, "its header declares");
    // A declared size over the cap is refused before decompressing.
    let mut huge = ccob(3, 1, &inner);
    huge[16..24].copy_from_slice(&(MAX_HIP_DECOMPRESSED + 1).to_le_bytes());
    expect_hip_corrupt(&huge, "over the cap");
    // Sizes and methods that do not fit.
    let mut long = ccob(2, 1, &inner);
    long[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    expect_hip_corrupt(&long, "does not fit the section");
    let mut tiny = ccob(3, 1, &inner);
    tiny[8..16].copy_from_slice(&8u64.to_le_bytes());
    expect_hip_corrupt(&tiny, "does not fit the section");
    let mut method = ccob(2, 1, &inner);
    method[6..8].copy_from_slice(&7u16.to_le_bytes());
    expect_hip_corrupt(&method, "unknown CCOB compression method 7");
    let mut garbage = ccob(2, 1, &inner);
    let n = garbage.len();
    garbage[30..n].fill(0x55);
    expect_hip_corrupt(&garbage, "zstd stream");
    expect_hip_corrupt(&ccob(1, 0, &inner)[..30], "zlib stream");
    expect_hip_corrupt(b"CCOB\x02", "truncated CCOB header");
    // What decompresses must be a bundle.
    expect_hip_corrupt(&ccob(2, 1, b"not a bundle"), "does not start with __CLANG_OFFLOAD_BUNDLE__");
    // An unknown version stops the walk with a warning.
    let mut section = hip19_a();
    let mut v4 = ccob(3, 1, &inner);
    v4[4..6].copy_from_slice(&4u16.to_le_bytes());
    section.resize(4 * 4096, 0);
    section.extend(v4);
    let (objects, warnings) = hip_parse(&section).unwrap();
    assert_eq!(objects.len(), 4);
    assert!(warnings[0].contains("unknown CCOB version 4"), "{warnings:?}");
}

#[test]
fn malformed_bundles_are_corrupt() {
    let good = hip19_a();
    let mut magic = good.clone();
    magic[0] = b'X';
    expect_hip_corrupt(&magic, "expected __CLANG_OFFLOAD_BUNDLE__ or CCOB");
    expect_hip_corrupt(&good[..28], "truncated bundle header");
    let mut count = good.clone();
    count[24..32].copy_from_slice(&5000u64.to_le_bytes());
    expect_hip_corrupt(&count, "exceed the cap");
    // A count past the real entries reads the zero padding: an entry with no id.
    let mut more = good.clone();
    more[24..32].copy_from_slice(&5u64.to_le_bytes());
    expect_hip_corrupt(&more, "has an empty id");
    expect_hip_corrupt(&good[..40], "is truncated");
    let mut id_len = good.clone();
    id_len[32 + 16..32 + 24].copy_from_slice(&5000u64.to_le_bytes());
    expect_hip_corrupt(&id_len, "exceeds the cap");
    let mut id_past = good.clone();
    id_past[32 + 16..32 + 24].copy_from_slice(&4000u64.to_le_bytes());
    expect_hip_corrupt(&id_past[..200], "id of 4000 bytes is truncated");
    // Second entry (gfx1100): offset + size beyond the bundle, or overflowing.
    let second = 32 + 24 + HOST_ID.len();
    let mut past = good.clone();
    past[second + 8..second + 16].copy_from_slice(&0x10_0000u64.to_le_bytes());
    expect_hip_corrupt(&past, "overruns the bundle");
    let mut wrap = good.clone();
    wrap[second..second + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_hip_corrupt(&wrap, "overruns the bundle");
    // Garbage after a bundle is not padding.
    let mut trailing = good.clone();
    trailing.extend_from_slice(&[0, 0, 1, 2, 3]);
    match hip_parse(&trailing) {
        Err(InspectError::Corrupt { offset, .. }) => assert_eq!(offset, good.len() as u64 + 2),
        other => panic!("{other:?}"),
    }
}

#[test]
fn odd_entries_are_warnings() {
    let mut wrong_mach = code_object(0x4C, 5, 128);
    wrong_mach[0x30] = 0x3F;
    let section = bundle(
        &[
            ("host-x86_64-unknown-linux", Vec::new()),
            ("hipv4-amdgcn-amd-amdhsa--gfx942", wrong_mach),
            ("hipv4-amdgcn-amd-amdhsa--gfx90a:xnack+", code_object(0x53F, 5, 128)),
            ("hipv4-amdgcn-amd-amdhsa--gfx90a", code_object(0x3D0 | 0x20, 5, 128)),
            (
                "hipv4-amdgcn-amd-amdhsa--gfx1100",
                b"not an elf image at all, but long enough".to_vec(),
            ),
            ("sycl-spir64-unknown-unknown-", code_object(0x41, 5, 64)),
            ("hip-amdgcn-amd-amdhsa--gfx90a:cumode+", code_object(0x53F, 5, 64)),
            ("hip-amdgcn-amd-amdhsa--gfx11-generic", code_object(0x54, 5, 64)),
            ("hip-amdgcn-amd-amdhsa--gfx1100", code_object(0x100_0041, 6, 64)),
        ],
        64,
    );
    let (objects, warnings) = hip_parse(&section).unwrap();
    let all = warnings.join("\n");
    assert_eq!(objects.len(), 9);
    // clang 15 and older write the host triple without a trailing `--`.
    assert_eq!(
        (objects[0].kind.clone(), objects[0].triple.as_str()),
        (HipOffloadKind::Host, "x86_64-unknown-linux")
    );
    assert!(
        all.contains("the code object is for gfx90a (e_flags 0x3f), the id says gfx942"),
        "{all}"
    );
    assert!(
        all.contains("features are gfx90a (e_flags 0x53f), the id says gfx90a:xnack+"),
        "{all}"
    );
    assert!(all.contains("unknown EF_AMDGPU_MACH 0x0f0 (e_flags 0x3f0)"), "{all}");
    assert!(all.contains("code object is not an ELF image"), "{all}");
    assert!(all.contains("unknown offload kind `sycl`"), "{all}");
    assert!(all.contains("invalid AMD target feature `gfx90a:cumode+`"), "{all}");
    assert!(all.contains("no generic version"), "{all}");
    assert!(all.contains("not generic, but e_flags carries generic version 1"), "{all}");
    // The kind `hip` (new offload driver) counts; unknown kinds and unparsable ids do not.
    assert_eq!(objects[7].kind, HipOffloadKind::Hip);
    assert!(!objects[5].is_device() && !objects[6].is_device());
    assert_eq!(
        hip_targets_of(objects),
        ["gfx11-generic", "gfx1100", "gfx90a", "gfx90a:xnack+", "gfx942"]
    );
}

#[test]
fn bundle_ids_split_at_the_fifth_dash() {
    assert_eq!(
        split_bundle_id("hipv4-amdgcn-amd-amdhsa--gfx10-3-generic"),
        ("hipv4", "amdgcn-amd-amdhsa-".to_owned(), "gfx10-3-generic")
    );
    assert_eq!(
        split_bundle_id("host-x86_64-unknown-linux--"),
        ("host", "x86_64-unknown-linux-".to_owned(), "")
    );
    assert_eq!(
        split_bundle_id("host-x86_64-unknown-linux"),
        ("host", "x86_64-unknown-linux".to_owned(), "")
    );
    assert_eq!(split_bundle_id(""), ("", String::new(), ""));
}

#[test]
fn fuzzed_hip_inputs_never_panic() {
    let inner = bundle(
        &[
            (HOST_ID, Vec::new()),
            ("hipv4-amdgcn-amd-amdhsa--gfx90a:xnack+", code_object(0x73F, 5, 96)),
            ("hipv4-amdgcn-amd-amdhsa--gfx11-generic", code_object(0x100_0054, 6, 96)),
        ],
        64,
    );
    let mut section = inner.clone();
    for (version, method) in [(2u16, 1u16), (1, 0), (3, 1)] {
        section.resize(section.len().div_ceil(64) * 64, 0);
        section.extend(ccob(version, method, &inner));
    }
    assert_eq!(hip_parse(&section).unwrap().0.len(), 12);
    let mut rng = XorShift(0xD1B5_4A32_D192_ED03);
    let mut outcomes = [0usize; 2];
    for _ in 0..20_000 {
        let m = mutate(&mut rng, &section);
        outcomes[usize::from(hip_parse(&m).is_ok())] += 1;
    }
    assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
    for _ in 0..2_000 {
        let m = mutate(&mut rng, &code_object(0xE4C, 5, 64));
        let _ = AmdCodeObjectHeader::read(&m);
    }
}
