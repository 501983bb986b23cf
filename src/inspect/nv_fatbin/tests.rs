//! Unit tests of the `.nv_fatbin` parser, with hand-built and fuzzed inputs.
use super::*;
use crate::inspect::LibraryInfo;
use crate::inspect::elf::tests::elf_with_fatbin;
use crate::inspect::inspect_library;
use crate::inspect::tests::{XorShift, mutate};

pub(crate) fn arch(s: &str) -> CudaArch {
    s.parse().expect("valid arch token")
}

/// One entry for the synthetic builder.
#[derive(Clone)]
pub(crate) struct E {
    kind: u16,
    arch: u32,
    flags: u64,
    code_version: (u16, u16),
    /// Extra header tail after the 64 base bytes (ext descriptor, concat table, ...).
    tail: Vec<u8>,
    ext_offset: u32,
    payload: Vec<u8>,
    compressed_size: u32,
    uncompressed_size: u64,
}

impl E {
    fn new(kind: u16, arch: u32, flags: u64) -> E {
        E {
            kind,
            arch,
            flags,
            code_version: if kind == KIND_PTX { (9, 5) } else { (1, 8) },
            tail: Vec::new(),
            ext_offset: 0,
            payload: vec![0xAB; 16],
            compressed_size: 0,
            uncompressed_size: 0,
        }
    }

    pub(crate) fn cubin(arch: u32, flags: u64) -> E {
        let mut e = E::new(KIND_ELF, arch, 0x11 | flags);
        e.payload = fake_cubin(arch);
        e
    }

    /// A zstd PTX entry with an empty options descriptor, as nvcc 13.5 writes it.
    fn zstd_ptx(arch: u32, flags: u64) -> E {
        let mut e = E::new(KIND_PTX, arch, 0x11 | FLAG_COMPRESS_ZSTD | flags);
        e.ext_offset = 0x40;
        e.tail = [0x48u32.to_le_bytes(), 0u32.to_le_bytes()].concat();
        e.tail.extend_from_slice(&[0; 8]);
        e.payload = vec![0x28, 0xB5, 0x2F, 0xFD, 1, 2, 3, 4, 5, 6, 7, 0, 0, 0, 0, 0];
        e.compressed_size = 11;
        e.uncompressed_size = 100;
        e
    }

    fn header(&self, header_size: u32, payload_size: u64) -> Vec<u8> {
        let mut h = Vec::with_capacity(64);
        h.extend_from_slice(&self.kind.to_le_bytes());
        h.extend_from_slice(&ENTRY_VERSION.to_le_bytes());
        h.extend_from_slice(&header_size.to_le_bytes());
        h.extend_from_slice(&payload_size.to_le_bytes());
        h.extend_from_slice(&self.compressed_size.to_le_bytes());
        h.extend_from_slice(&self.ext_offset.to_le_bytes());
        h.extend_from_slice(&self.code_version.1.to_le_bytes());
        h.extend_from_slice(&self.code_version.0.to_le_bytes());
        h.extend_from_slice(&self.arch.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes()); // ident offset
        h.extend_from_slice(&0u32.to_le_bytes()); // ident size
        h.extend_from_slice(&self.flags.to_le_bytes());
        h.extend_from_slice(&0u64.to_le_bytes()); // reserved
        h.extend_from_slice(&self.uncompressed_size.to_le_bytes());
        assert_eq!(h.len(), 64);
        h
    }

    fn bytes(&self) -> Vec<u8> {
        let header_size = 64 + self.tail.len() as u32;
        let mut payload = self.payload.clone();
        payload.resize(payload.len().div_ceil(8) * 8, 0);
        let mut b = self.header(header_size, payload.len() as u64);
        b.extend_from_slice(&self.tail);
        b.extend_from_slice(&payload);
        b
    }

    /// A concat sub-header: +4 image offset, +8 image size, and the same tail.
    fn sub_bytes(&self, image_offset: u32, image_size: u64) -> Vec<u8> {
        let mut b = self.header(image_offset, image_size);
        b.extend_from_slice(&self.tail);
        b
    }
}

/// A concat entry (kind 0x100, zstd) holding `subs` as sub-headers.
fn concat(subs: &[E]) -> E {
    let mut table = Vec::new();
    let mut image = 0u32;
    for s in subs {
        table.extend(s.sub_bytes(image, 0x100));
        image += 0x100;
    }
    let mut e = E::new(KIND_CONCAT, 0, 0x8011);
    e.code_version = (0, 1);
    e.ext_offset = 0x40;
    e.tail = [(subs.len() as u32).to_le_bytes(), (8 + table.len() as u32).to_le_bytes()].concat();
    e.tail.extend(table);
    e.payload = vec![0x28, 0xB5, 0x2F, 0xFD, 9, 9, 9, 9];
    e.compressed_size = 8;
    e.uncompressed_size = u64::from(image);
    e
}

/// A 64-byte ELF header of a CUDA 13 cubin for `sm` (ABI version 8).
fn fake_cubin(sm: u32) -> Vec<u8> {
    let mut c = vec![0u8; 64];
    c[..4].copy_from_slice(&elf::ELFMAG);
    c[4] = elf::ELFCLASS64;
    c[5] = elf::ELFDATA2LSB;
    c[6] = 1;
    c[7] = 0x41;
    c[8] = 8;
    c[0x10..0x12].copy_from_slice(&2u16.to_le_bytes());
    c[0x12..0x14].copy_from_slice(&EM_CUDA.to_le_bytes());
    let flags = 0x0600_0004 | (sm << 8);
    c[0x30..0x34].copy_from_slice(&flags.to_le_bytes());
    c
}

pub(crate) fn container(entries: &[E]) -> Vec<u8> {
    let body: Vec<u8> = entries.iter().flat_map(E::bytes).collect();
    let mut c = Vec::new();
    c.extend_from_slice(&FATBIN_MAGIC.to_le_bytes());
    c.extend_from_slice(&1u16.to_le_bytes());
    c.extend_from_slice(&16u16.to_le_bytes());
    c.extend_from_slice(&(body.len() as u64).to_le_bytes());
    c.extend(body);
    c
}

fn parse(section: &[u8]) -> Result<(Vec<CudaCodeEntry>, Vec<String>), InspectError> {
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    parse_nv_fatbin(section, false, &mut out, &mut warnings)?;
    Ok((out, warnings))
}

fn archs(entries: &[CudaCodeEntry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e.arch.map_or_else(|| format!("{}", e.kind), |a| a.to_string()))
        .collect()
}

fn info_of(entries: Vec<CudaCodeEntry>) -> LibraryInfo {
    LibraryInfo {
        cuda: entries,
        ..LibraryInfo::default()
    }
}

fn expect_corrupt(section: &[u8], needle: &str) {
    match parse(section) {
        Err(InspectError::Corrupt { problem, .. }) => {
            assert!(problem.contains(needle), "problem `{problem}` should mention `{needle}`")
        }
        other => panic!("expected a Corrupt error mentioning `{needle}`, got {other:?}"),
    }
}

pub(crate) fn liba_container() -> Vec<u8> {
    container(&[E::cubin(80, 0), E::cubin(90, FLAG_ARCH_SPECIFIC), E::zstd_ptx(90, 0)])
}

#[test]
fn reads_cubins_and_compressed_ptx() {
    let (entries, warnings) = parse(&liba_container()).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(archs(&entries), ["sm_80", "sm_90a", "compute_90"]);
    assert_eq!(entries[2].kind, CudaCodeKind::Ptx);
    assert_eq!(entries[2].code_version, (9, 5));
    assert_eq!(entries[2].compression, Some("zstd"));
    assert_eq!(entries[0].compression, None);
    assert!(entries.iter().all(|e| e.container == 0 && !e.relocatable && !e.concat));
    assert_eq!(entries[0].offset, 16);
    let info = info_of(entries);
    assert_eq!(info.cuda_code(), [arch("sm_80"), arch("sm_90a"), arch("compute_90")]);
}

#[test]
fn dedups_across_containers_and_excludes_relocatable_and_nvvm() {
    // A dlink container then a per-TU container, as every nvcc -shared link has.
    let mut section = container(&[E::cubin(80, 0), E::cubin(90, FLAG_ARCH_SPECIFIC)]);
    section.extend(liba_container());
    let (mut entries, _) = parse(&section).unwrap();
    assert_eq!(entries.len(), 5);
    assert_eq!(entries[4].container, 1);
    let mut warnings = Vec::new();
    let rel = container(&[E::cubin(75, 0), E::new(KIND_NVVM, 86, 0x18011)]);
    parse_nv_fatbin(&rel, true, &mut entries, &mut warnings).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert!(entries[5].relocatable && entries[6].relocatable);
    assert_eq!(entries[6].kind, CudaCodeKind::Nvvm);
    let info = info_of(entries);
    assert_eq!(info.cuda_code(), [arch("sm_80"), arch("sm_90a"), arch("compute_90")]);
}

#[test]
fn family_flag_gives_f_suffix() {
    let (entries, _) = parse(&container(&[
        E::cubin(100, FLAG_FAMILY),
        E::zstd_ptx(100, FLAG_FAMILY),
        E::cubin(120, FLAG_ARCH_SPECIFIC),
    ]))
    .unwrap();
    assert_eq!(archs(&entries), ["sm_100f", "compute_100f", "sm_120a"]);
    assert_eq!(entries[0].arch.unwrap().set, CudaFeatureSet::Family);
}

#[test]
fn concat_entries_are_expanded() {
    let section = container(&[
        E::cubin(100, FLAG_FAMILY),
        concat(&[E::zstd_ptx(90, 0), E::zstd_ptx(120, 0)]),
        concat(&[E::cubin(80, 0), E::cubin(90, FLAG_ARCH_SPECIFIC)]),
    ]);
    let (entries, warnings) = parse(&section).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(archs(&entries), ["sm_100f", "compute_90", "compute_120", "sm_80", "sm_90a"]);
    assert!(!entries[0].concat && entries[1..].iter().all(|e| e.concat));
    assert!(entries[1..].iter().all(|e| e.compression == Some("zstd")));
    assert_eq!(entries[1].code_version, (9, 5));
    assert_eq!(
        info_of(entries).cuda_code(),
        [
            arch("sm_80"),
            arch("sm_90a"),
            arch("sm_100f"),
            arch("compute_90"),
            arch("compute_120")
        ]
    );
}

#[test]
fn concat_table_must_tile_and_count_is_capped() {
    let mut bad = concat(&[E::cubin(80, 0)]);
    bad.tail[4..8].copy_from_slice(&(8u32 + 0x40 + 8).to_le_bytes());
    bad.tail.extend_from_slice(&[0; 8]);
    expect_corrupt(&container(&[bad]), "table ends");

    let mut huge = concat(&[E::cubin(80, 0)]);
    huge.tail[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    expect_corrupt(&container(&[huge]), "exceeds the cap");

    let mut short = concat(&[E::cubin(80, 0)]);
    short.tail[..4].copy_from_slice(&2u32.to_le_bytes());
    expect_corrupt(&container(&[short]), "overruns the concat table");

    let mut no_table = concat(&[]);
    no_table.ext_offset = 0;
    expect_corrupt(&container(&[no_table]), "without a sub-entry table");
}

#[test]
fn truncated_container_is_corrupt() {
    let c = liba_container();
    expect_corrupt(&c[..10], "truncated container header");
    expect_corrupt(&c[..c.len() - 8], "overruns the section");
}

#[test]
fn small_entry_header_is_corrupt() {
    let mut c = liba_container();
    c[16 + 4..16 + 8].copy_from_slice(&0x38u32.to_le_bytes());
    expect_corrupt(&c, "less than 0x40");
    let mut c = liba_container();
    c[6..8].copy_from_slice(&8u16.to_le_bytes());
    expect_corrupt(&c, "less than 16");
}

#[test]
fn overrunning_payload_is_corrupt() {
    let mut c = liba_container();
    c[16 + 8..16 + 16].copy_from_slice(&0x10_0000u64.to_le_bytes());
    expect_corrupt(&c, "overruns container");
    let mut c = liba_container();
    c[16 + 8..16 + 16].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_corrupt(&c, "overruns container");
    let mut c = liba_container();
    c[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_corrupt(&c, "overruns the section");
    let mut c = liba_container();
    c[16 + 0x10..16 + 0x14].copy_from_slice(&0x1000u32.to_le_bytes());
    expect_corrupt(&c, "exceeds payload size");
}

#[test]
fn non_tiling_walk_is_corrupt() {
    // Container claims 8 more bytes than its entries use.
    let mut c = liba_container();
    let fat = le_u64(&c, 8).unwrap() + 8;
    c[8..16].copy_from_slice(&fat.to_le_bytes());
    c.extend_from_slice(&[0; 8]);
    expect_corrupt(&c, "do not tile");
}

#[test]
fn header_offsets_must_stay_in_the_header() {
    let mut e = E::zstd_ptx(90, 0);
    e.ext_offset = 0x50;
    expect_corrupt(&container(&[e]), "extension descriptor");
    let mut e = E::zstd_ptx(90, 0);
    e.tail[4..8].copy_from_slice(&0x100u32.to_le_bytes());
    expect_corrupt(&container(&[e]), "extension data");
    let mut c = container(&[E::cubin(80, 0)]);
    c[16 + 0x20..16 + 0x24].copy_from_slice(&0x40u32.to_le_bytes());
    c[16 + 0x24..16 + 0x28].copy_from_slice(&0x20u32.to_le_bytes());
    expect_corrupt(&c, "identifier");
}

#[test]
fn identifier_is_read() {
    let mut e = E::cubin(80, 0);
    e.tail = b"k.cu \0\0\0".to_vec();
    let mut c = container(&[e]);
    c[16 + 0x20..16 + 0x24].copy_from_slice(&0x40u32.to_le_bytes());
    c[16 + 0x24..16 + 0x28].copy_from_slice(&5u32.to_le_bytes());
    let (entries, _) = parse(&c).unwrap();
    assert_eq!(entries[0].identifier.as_deref(), Some("k.cu"));
}

#[test]
fn zero_padding_between_containers_is_skipped() {
    let mut section = container(&[E::cubin(80, 0)]);
    section.extend_from_slice(&[0; 24]);
    section.extend(liba_container());
    section.extend_from_slice(&[0; 8]);
    let (entries, warnings) = parse(&section).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(archs(&entries), ["sm_80", "sm_80", "sm_90a", "compute_90"]);
    assert_eq!(entries[3].container, 1);

    // Garbage instead of padding is not.
    let mut section = container(&[E::cubin(80, 0)]);
    section.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]);
    expect_corrupt(&section, "magic");
    // So is an empty or all-zero section.
    assert!(parse(&[]).unwrap().0.is_empty());
    assert!(parse(&[0; 64]).unwrap().0.is_empty());
}

#[test]
fn unknown_kind_is_warned_and_skipped() {
    let (entries, warnings) = parse(&container(&[
        E::cubin(80, 0),
        E::new(0x4, 80, 0x11),
        E::new(0x40, 0, 0x11),
        E::zstd_ptx(90, 0),
    ]))
    .unwrap();
    assert_eq!(entries.len(), 4);
    assert_eq!(entries[1].kind, CudaCodeKind::Unknown(4));
    assert_eq!(entries[2].kind, CudaCodeKind::Unknown(0x40));
    assert!(entries[1].arch.is_none());
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].contains("unknown(kind=0x4, arch=80)"), "{warnings:?}");
    assert_eq!(info_of(entries).cuda_code(), [arch("sm_80"), arch("compute_90")]);
}

#[test]
fn unknown_flags_versions_and_mismatches_are_warned() {
    let mut odd = E::cubin(80, 0x4000_0000);
    odd.payload = fake_cubin(86);
    let mut c = container(&[odd, E::cubin(90, 0)]);
    let second = 16 + 64 + 64;
    c[second + 2..second + 4].copy_from_slice(&0x0202u16.to_le_bytes());
    let (entries, warnings) = parse(&c).unwrap();
    assert_eq!(entries.len(), 2);
    let all = warnings.join("\n");
    assert!(all.contains("unknown flag bits 0x40000000"), "{all}");
    assert!(all.contains("says sm_86"), "{all}");
    assert!(all.contains("unknown entry version 0x0202"), "{all}");
}

#[test]
fn other_container_version_stops_the_section() {
    let mut section = liba_container();
    let mut second = container(&[E::cubin(75, 0)]);
    second[4..6].copy_from_slice(&2u16.to_le_bytes());
    section.extend(second);
    let (entries, warnings) = parse(&section).unwrap();
    assert_eq!(entries.len(), 3);
    assert!(warnings[0].contains("unknown container version 2"), "{warnings:?}");
}

#[test]
fn huge_counts_are_bounded() {
    // 70,000 minimal entries in one container: over the entry cap.
    let mut e = E::new(0x77, 0, 0);
    e.payload.clear();
    let one = e.bytes();
    let mut body = Vec::new();
    for _ in 0..(MAX_ENTRIES + 1) {
        body.extend_from_slice(&one);
    }
    let mut c = Vec::new();
    c.extend_from_slice(&FATBIN_MAGIC.to_le_bytes());
    c.extend_from_slice(&1u16.to_le_bytes());
    c.extend_from_slice(&16u16.to_le_bytes());
    c.extend_from_slice(&(body.len() as u64).to_le_bytes());
    c.extend(body);
    expect_corrupt(&c, "more than");
}

#[test]
fn fuzzed_inputs_never_panic() {
    let section = {
        let mut s = container(&[E::cubin(80, 0), E::cubin(90, FLAG_ARCH_SPECIFIC)]);
        s.extend(container(&[
            E::cubin(100, FLAG_FAMILY),
            concat(&[E::zstd_ptx(90, 0), E::cubin(80, 0)]),
            E::zstd_ptx(120, FLAG_ARCH_SPECIFIC),
        ]));
        s
    };
    let library = elf_with_fatbin(&section, Some(&liba_container()));
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut outcomes = [0usize; 2];
    for i in 0..20_000 {
        let m = mutate(&mut rng, &section);
        let mut out = Vec::new();
        let mut warnings = Vec::new();
        outcomes[usize::from(parse_nv_fatbin(&m, i % 2 == 0, &mut out, &mut warnings).is_ok())] += 1;
        let m = mutate(&mut rng, &library);
        let _ = inspect_library(&m);
    }
    // Both outcomes happen: the mutations reach past the first check.
    assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
}
