//! The library's own ELF facts: CPU machine, exported symbols, `DT_NEEDED` libraries, the
//! glibc floor from the version needs, musl, and the device code sections, which go to
//! the NVIDIA and AMD parsers.

use object::LittleEndian;
use object::elf;
use object::read::elf::{Dyn as _, FileHeader as _, ProgramHeader as _, SectionHeader as _, Sym as _};

use super::hip_bundle::{HIP_FATBIN_SECTION, parse_hip_fatbin};
use super::nv_fatbin::{NV_FATBIN_SECTION, NV_RELFATBIN_SECTION, parse_nv_fatbin};
use super::{EI_CLASS, EI_DATA, InspectError, LibraryInfo, corrupt};
use crate::platform::MajorMinor;

/// Most `DT_NEEDED`, version-need and version-aux records read.
const MAX_DYNAMIC_RECORDS: usize = 1 << 16;

/// Inspects a 64-bit little-endian ELF shared library held in memory.
///
/// Fails with [`InspectError::NotElf`] for anything without the ELF magic,
/// [`InspectError::Unsupported`] for 32-bit or big-endian ELF, and
/// [`InspectError::Corrupt`] for malformed headers, tables or fatbin sections.
pub fn inspect_library(bytes: &[u8]) -> Result<LibraryInfo, InspectError> {
    if bytes.get(..4) != Some(&elf::ELFMAG[..]) {
        return Err(InspectError::NotElf);
    }
    match bytes.get(EI_CLASS) {
        Some(&elf::ELFCLASS64) => {}
        Some(&elf::ELFCLASS32) => return Err(InspectError::Unsupported("32-bit ELF".into())),
        _ => return Err(corrupt("ELF header", 0, "invalid ELF class")),
    }
    match bytes.get(EI_DATA) {
        Some(&elf::ELFDATA2LSB) => {}
        Some(&elf::ELFDATA2MSB) => return Err(InspectError::Unsupported("big-endian ELF".into())),
        _ => return Err(corrupt("ELF header", 0, "invalid ELF data encoding")),
    }
    let elf_err = |what: &str| {
        let what = what.to_owned();
        move |e: object::read::Error| corrupt(&what, 0, e.to_string())
    };
    let endian = LittleEndian;
    let header = elf::FileHeader64::<LittleEndian>::parse(bytes).map_err(elf_err("ELF header"))?;
    let mut info = LibraryInfo {
        machine: match header.e_machine(endian) {
            elf::EM_X86_64 => "x86_64".to_owned(),
            elf::EM_AARCH64 => "aarch64".to_owned(),
            m => format!("elf machine {m}"),
        },
        ..LibraryInfo::default()
    };
    let sections = header.sections(endian, bytes).map_err(elf_err("section headers"))?;
    if sections.is_empty() {
        info.warnings
            .push("no section headers: exports, needed libraries, versions and device code cannot be read".into());
    }

    // Exports.
    let dynsym = sections
        .symbols(endian, bytes, elf::SHT_DYNSYM)
        .map_err(elf_err("dynamic symbol table"))?;
    for sym in dynsym.symbols().iter().skip(1) {
        let exported_binding = matches!(sym.st_bind(), elf::STB_GLOBAL | elf::STB_WEAK);
        let exported_visibility = matches!(sym.st_visibility(), elf::STV_DEFAULT | elf::STV_PROTECTED);
        let shndx = sym.st_shndx(endian);
        // Version-definition placeholders are absolute symbols of value and size 0.
        let placeholder = shndx == elf::SHN_ABS && sym.st_value(endian) == 0 && sym.st_size(endian) == 0;
        if !exported_binding
            || !exported_visibility
            || shndx == elf::SHN_UNDEF
            || placeholder
            || matches!(sym.st_type(), elf::STT_SECTION | elf::STT_FILE)
        {
            continue;
        }
        let name = sym.name(endian, dynsym.strings()).map_err(elf_err("dynamic symbol table"))?;
        if !name.is_empty() {
            info.exports.push(String::from_utf8_lossy(name).into_owned());
        }
    }
    info.exports.sort();
    info.exports.dedup();

    // Needed libraries.
    if let Some((dynamic, link)) = sections.dynamic(endian, bytes).map_err(elf_err("dynamic section"))? {
        let strings = sections.strings(endian, bytes, link).map_err(elf_err("dynamic string table"))?;
        for d in dynamic.iter().take(MAX_DYNAMIC_RECORDS) {
            match d.tag32(endian) {
                Some(elf::DT_NULL) => break,
                Some(elf::DT_NEEDED) => {
                    let name = d.string(endian, strings).map_err(elf_err("dynamic section"))?;
                    info.needed.push(String::from_utf8_lossy(name).into_owned());
                }
                _ => {}
            }
        }
    }

    // glibc floor, from the version needs.
    if let Some((mut needs, link)) = sections.gnu_verneed(endian, bytes).map_err(elf_err("version needs"))? {
        let strings = sections
            .strings(endian, bytes, link)
            .map_err(elf_err("version needs string table"))?;
        let mut records = 0usize;
        while let Some((_, mut aux)) = needs.next().map_err(elf_err("version needs"))? {
            while let Some(vernaux) = aux.next().map_err(elf_err("version needs"))? {
                records += 1;
                if records > MAX_DYNAMIC_RECORDS {
                    return Err(corrupt("version needs", 0, "too many version records"));
                }
                let name = vernaux.name(endian, strings).map_err(elf_err("version needs"))?;
                let written = std::str::from_utf8(name).ok().and_then(|n| n.strip_prefix("GLIBC_"));
                if let Some((w, v)) = written.and_then(|w| Some((w, w.parse::<MajorMinor>().ok()?))) {
                    let newer = match (&info.glibc_floor, &info.glibc_floor_version) {
                        (Some(old), Some(old_w)) => (v, patch_of(w)) > (*old, patch_of(old_w)),
                        _ => true,
                    };
                    if newer {
                        info.glibc_floor = Some(v);
                        info.glibc_floor_version = Some(w.to_owned());
                    }
                }
            }
            records += 1;
            if records > MAX_DYNAMIC_RECORDS {
                return Err(corrupt("version needs", 0, "too many version records"));
            }
        }
    }

    // musl.
    let musl_name = |n: &str| n.starts_with("libc.musl-") || n.starts_with("ld-musl");
    info.musl = info.needed.iter().any(|n| musl_name(n));
    let program_headers = header.program_headers(endian, bytes).map_err(elf_err("program headers"))?;
    for ph in program_headers {
        match ph.interpreter(endian, bytes) {
            Ok(Some(interp)) => {
                if String::from_utf8_lossy(interp).contains("musl") {
                    info.musl = true;
                }
            }
            Ok(None) => {}
            Err(e) => info.warnings.push(format!("unreadable PT_INTERP: {e}")),
        }
    }

    // Device code: CUDA fat binaries and HIP offload bundles.
    for (_, sh) in sections.enumerate().skip(1) {
        let Ok(name) = sections.section_name(endian, sh) else {
            continue;
        };
        let section_name = match name {
            b".nv_fatbin" => NV_FATBIN_SECTION,
            b"__nv_relfatbin" => NV_RELFATBIN_SECTION,
            b".hip_fatbin" => HIP_FATBIN_SECTION,
            _ => continue,
        };
        if sh.sh_type(endian) == elf::SHT_NOBITS {
            info.warnings
                .push(format!("{section_name} has no file contents (SHT_NOBITS); skipped"));
            continue;
        }
        let data = sh
            .data(endian, bytes)
            .map_err(|e| corrupt(section_name, 0, format!("section bytes lie outside the file: {e}")))?;
        if section_name == HIP_FATBIN_SECTION {
            parse_hip_fatbin(data, &mut info.hip, &mut info.warnings)?;
        } else {
            parse_nv_fatbin(data, section_name == NV_RELFATBIN_SECTION, &mut info.cuda, &mut info.warnings)?;
        }
    }

    Ok(info)
}

/// The third component of a symbol version such as `2.2.5` (0 when there is none).
fn patch_of(version: &str) -> u32 {
    version.split('.').nth(2).and_then(|p| p.parse().ok()).unwrap_or(0)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::inspect::hip_bundle::tests::{ccob, hip19_a};
    use crate::inspect::nv_fatbin::tests::{E, arch, container, liba_container};

    /// A minimal ELF64 x86-64 shared object with a `.nv_fatbin` section (and optionally
    /// `__nv_relfatbin`) and no dynamic section.
    pub(crate) fn elf_with_fatbin(fatbin: &[u8], relfatbin: Option<&[u8]>) -> Vec<u8> {
        let shstrtab = b"\0.nv_fatbin\0__nv_relfatbin\0.shstrtab\0".to_vec();
        let mut out = vec![0u8; 64];
        let mut sections: Vec<(u32, u32, u64, u64)> = Vec::new(); // name, type, off, size
        let fat_off = out.len() as u64;
        out.extend_from_slice(fatbin);
        sections.push((1, elf::SHT_PROGBITS, fat_off, fatbin.len() as u64));
        if let Some(rel) = relfatbin {
            while !out.len().is_multiple_of(8) {
                out.push(0);
            }
            let off = out.len() as u64;
            out.extend_from_slice(rel);
            sections.push((12, elf::SHT_PROGBITS, off, rel.len() as u64));
        }
        let str_off = out.len() as u64;
        out.extend_from_slice(&shstrtab);
        sections.push((27, elf::SHT_STRTAB, str_off, shstrtab.len() as u64));
        while !out.len().is_multiple_of(8) {
            out.push(0);
        }
        let shoff = out.len() as u64;
        out.extend_from_slice(&[0u8; 64]); // null section
        for (name, ty, off, size) in &sections {
            let mut sh = vec![0u8; 64];
            sh[0..4].copy_from_slice(&name.to_le_bytes());
            sh[4..8].copy_from_slice(&ty.to_le_bytes());
            sh[8..16].copy_from_slice(&u64::from(elf::SHF_ALLOC).to_le_bytes());
            sh[0x18..0x20].copy_from_slice(&off.to_le_bytes());
            sh[0x20..0x28].copy_from_slice(&size.to_le_bytes());
            sh[0x30..0x38].copy_from_slice(&8u64.to_le_bytes());
            out.extend(sh);
        }
        let h = &mut out[..64];
        h[..4].copy_from_slice(&elf::ELFMAG);
        h[4] = elf::ELFCLASS64;
        h[5] = elf::ELFDATA2LSB;
        h[6] = elf::EV_CURRENT;
        h[0x10..0x12].copy_from_slice(&elf::ET_DYN.to_le_bytes());
        h[0x12..0x14].copy_from_slice(&elf::EM_X86_64.to_le_bytes());
        h[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
        h[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        h[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        h[0x3A..0x3C].copy_from_slice(&64u16.to_le_bytes());
        let shnum = sections.len() as u16 + 1;
        h[0x3C..0x3E].copy_from_slice(&shnum.to_le_bytes());
        h[0x3E..0x40].copy_from_slice(&(shnum - 1).to_le_bytes());
        out
    }

    #[test]
    fn library_with_fatbin_sections() {
        let rel = container(&[E::cubin(75, 0)]);
        let bytes = elf_with_fatbin(&liba_container(), Some(&rel));
        let info = inspect_library(&bytes).unwrap();
        assert_eq!(info.machine, "x86_64");
        assert!(info.exports.is_empty() && info.needed.is_empty());
        assert_eq!(info.glibc_floor, None);
        assert!(!info.musl);
        assert_eq!(info.cuda.len(), 4);
        assert!(info.cuda[3].relocatable);
        assert_eq!(info.cuda_code(), [arch("sm_80"), arch("sm_90a"), arch("compute_90")]);
    }

    #[test]
    fn library_errors() {
        assert!(matches!(inspect_library(b"MZ\x90\0"), Err(InspectError::NotElf)));
        assert!(matches!(inspect_library(b""), Err(InspectError::NotElf)));
        let mut bytes = elf_with_fatbin(&liba_container(), None);
        bytes[4] = elf::ELFCLASS32;
        assert!(matches!(inspect_library(&bytes), Err(InspectError::Unsupported(_))));
        let mut bytes = elf_with_fatbin(&liba_container(), None);
        bytes[5] = elf::ELFDATA2MSB;
        assert!(matches!(inspect_library(&bytes), Err(InspectError::Unsupported(_))));
        let bytes = elf_with_fatbin(&liba_container(), None);
        assert!(matches!(
            inspect_library(&bytes[..bytes.len() - 1]),
            Err(InspectError::Corrupt { .. })
        ));
        // A corrupt fatbin is an error of the section.
        let mut c = liba_container();
        c[16 + 4..16 + 8].copy_from_slice(&0x10u32.to_le_bytes());
        match inspect_library(&elf_with_fatbin(&c, None)) {
            Err(InspectError::Corrupt { section, offset, .. }) => {
                assert_eq!(section, ".nv_fatbin");
                assert_eq!(offset, 16);
            }
            other => panic!("{other:?}"),
        }
        // Misaligned input still parses.
        let bytes = elf_with_fatbin(&liba_container(), None);
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes);
        assert_eq!(inspect_library(&shifted[1..]).unwrap().cuda.len(), 3);
    }

    /// A minimal ELF64 x86-64 shared object with one `.hip_fatbin` section.
    fn elf_with_hip(section: &[u8]) -> Vec<u8> {
        let mut out = elf_with_fatbin(section, None);
        // Rename the section: ".nv_fatbin" and ".hip_fatbin" differ in length, so rewrite
        // the string table entry in place with a name of the same length.
        let at = out.windows(10).position(|w| w == b".nv_fatbin").unwrap();
        out[at..at + 10].copy_from_slice(b".nv_hipbin");
        out
    }

    #[test]
    fn library_with_a_hip_fatbin_section() {
        let shstrtab = b"\0.hip_fatbin\0.shstrtab\0";
        let section = ccob(2, 1, &hip19_a());
        // Build by hand: the NVIDIA helper's name table does not fit `.hip_fatbin`.
        let mut out = vec![0u8; 64];
        let off = 4096usize;
        out.resize(off, 0);
        out.extend_from_slice(&section);
        let str_off = out.len();
        out.extend_from_slice(shstrtab);
        out.resize(out.len().div_ceil(8) * 8, 0);
        let shoff = out.len();
        out.extend_from_slice(&[0u8; 64]);
        for (name, ty, o, size) in [
            (1u32, elf::SHT_PROGBITS, off, section.len()),
            (13, elf::SHT_STRTAB, str_off, shstrtab.len()),
        ] {
            let mut sh = vec![0u8; 64];
            sh[0..4].copy_from_slice(&name.to_le_bytes());
            sh[4..8].copy_from_slice(&ty.to_le_bytes());
            sh[8..16].copy_from_slice(&u64::from(elf::SHF_ALLOC).to_le_bytes());
            sh[0x18..0x20].copy_from_slice(&(o as u64).to_le_bytes());
            sh[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            sh[0x30..0x38].copy_from_slice(&4096u64.to_le_bytes());
            out.extend(sh);
        }
        let h = &mut out[..64];
        h[..4].copy_from_slice(&elf::ELFMAG);
        h[4] = elf::ELFCLASS64;
        h[5] = elf::ELFDATA2LSB;
        h[6] = elf::EV_CURRENT;
        h[0x10..0x12].copy_from_slice(&elf::ET_DYN.to_le_bytes());
        h[0x12..0x14].copy_from_slice(&elf::EM_X86_64.to_le_bytes());
        h[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
        h[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        h[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        h[0x3A..0x3C].copy_from_slice(&64u16.to_le_bytes());
        h[0x3C..0x3E].copy_from_slice(&3u16.to_le_bytes());
        h[0x3E..0x40].copy_from_slice(&2u16.to_le_bytes());
        let info = inspect_library(&out).unwrap();
        assert_eq!(info.hip.len(), 4);
        assert!(info.cuda.is_empty());
        assert_eq!(
            info.hip_targets().iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["gfx1100", "gfx90a", "gfx942"]
        );
        // A section by another name is not read.
        assert!(inspect_library(&elf_with_hip(&section)).unwrap().hip.is_empty());
        // A corrupt bundle is an error of the section.
        let mut bad = out.clone();
        bad[off + 6] = 9;
        match inspect_library(&bad) {
            Err(InspectError::Corrupt { section, .. }) => assert_eq!(section, HIP_FATBIN_SECTION),
            other => panic!("{other:?}"),
        }
    }
}
