//! The dependency rules of docs/architecture.md, checked on the sources: every library
//! module sits in a layer, and a module may only name (`crate::…`) modules of lower layers.
//! A new module fails this test until it is placed; an import that runs back up the data
//! flow fails it too. Comments and unit tests are not code paths and are skipped.
#![allow(clippy::disallowed_methods)] // test code: reads the source tree directly

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The layers, lowest first: the order a kernel flows through them (docs/architecture.md).
const LAYERS: &[&[&str]] = &[
    // Shared vocabulary.
    &["platform", "abi", "env", "ids"],
    // Pure: the manifest, then what reads it.
    &["manifest"],
    &["fsx", "host", "version", "inspect"],
    &["resolve"],
    // Edges, in the order of the path of a kernel.
    &["verify"],
    &["registry", "release"],
    &["store"],
    &["load"],
    &["lock", "bench"],
    &["hub"],
    // One classification of every error above, for the front ends.
    &["error_kind"],
    // Front ends on the library's API.
    &["package", "serve", "capi"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The library module a file belongs to (`src/store/index.rs` → `store`), or `None` for
/// the crate root, the binary and the CLI (which sit on top of everything).
fn module_of(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src()).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.trim_end_matches(".rs").to_owned();
    match first.as_str() {
        "lib" | "main" | "cli" => None,
        _ => Some(first),
    }
}

/// The code of a file: no comment lines, nothing from the unit tests on.
fn code(file: &Path) -> String {
    if file.file_name().is_some_and(|n| n == "tests.rs") {
        return String::new();
    }
    let text = std::fs::read_to_string(file).unwrap();
    let text = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The crate modules a piece of code names.
fn named_modules(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let name: String = rest.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

#[test]
fn every_module_imports_only_lower_layers() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for f in &files {
        let Some(module) = module_of(f) else { continue };
        seen.insert(module.clone());
        let Some(own) = layer_of(&module) else {
            problems.push(format!(
                "module `{module}` ({}) has no layer: place it in LAYERS and docs/architecture.md",
                f.display()
            ));
            continue;
        };
        for used in named_modules(&code(f)) {
            if used == module {
                continue;
            }
            match layer_of(&used) {
                None => problems.push(format!("{} names `crate::{used}`, which has no layer", f.display())),
                Some(l) if l >= own => problems.push(format!(
                    "{} (`{module}`, layer {own}) names `crate::{used}` (layer {l}): a module may only use lower layers",
                    f.display()
                )),
                Some(_) => {}
            }
        }
    }
    // The table lists no module that does not exist.
    for m in LAYERS.iter().flat_map(|l| l.iter()) {
        if !seen.contains(*m) {
            problems.push(format!("LAYERS lists `{m}`, which is not a module of src/"));
        }
    }
    assert!(problems.is_empty(), "dependency rules broken:\n  {}", problems.join("\n  "));
}

#[test]
fn the_architecture_page_names_every_module() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md")).unwrap();
    let missing: Vec<&str> = LAYERS
        .iter()
        .flat_map(|l| l.iter().copied())
        .filter(|m| !doc.contains(&format!("`{m}`")))
        .collect();
    assert!(missing.is_empty(), "docs/architecture.md does not name: {missing:?}");
}

#[test]
fn only_env_reads_the_environment() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let offenders: Vec<String> = files
        .iter()
        .filter(|f| !f.ends_with("src/env.rs"))
        .filter(|f| {
            let c = code(f);
            ["std::env::var(", "std::env::var_os(", "std::env::vars("]
                .iter()
                .any(|p| c.contains(p))
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(offenders.is_empty(), "read the environment through src/env.rs: {offenders:?}");
}

#[test]
fn the_checker_sees_a_violation() {
    // The parser behind the rules finds names in code and ignores comments.
    let c = "use crate::load::Kernel;\n// crate::serve is only mentioned\nlet x = crate::store::Store::open(p);";
    let found = named_modules(c);
    assert_eq!(found, ["load", "serve", "store"].iter().map(|s| s.to_string()).collect());
    let tmp = std::env::temp_dir().join(format!("khub-arch-{}.rs", std::process::id()));
    std::fs::write(&tmp, c).unwrap();
    let found = named_modules(&code(&tmp));
    std::fs::remove_file(&tmp).unwrap();
    assert!(!found.contains("serve") && found.contains("load"));
    assert!(layer_of("load") > layer_of("store"), "store may not use load");
}
