//! Replays the committed fuzz inputs (`fuzz/seeds/<target>/*`, the real files the fuzzer
//! started from, and `fuzz/corpus/<target>/*`, what it kept) on stable Rust through
//! the very bodies the cargo-fuzz targets run (`fuzz/src/lib.rs`, included below), so
//! every input the fuzzer kept, regression inputs included, stays a test in CI.
//! Fuzzing itself: `docs/security.md`, "Fuzzing".
#![allow(clippy::disallowed_methods)]

use std::path::Path;

#[path = "../fuzz/src/lib.rs"]
mod targets;

#[test]
fn every_corpus_input_replays_without_panic() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut failed = Vec::new();
    for (name, body) in targets::TARGETS {
        let mut inputs = Vec::new();
        for kind in ["seeds", "corpus"] {
            let dir = fuzz.join(kind).join(name);
            let before = inputs.len();
            for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
                inputs.push(e.expect("directory entry").path());
            }
            assert!(inputs.len() > before, "{}: no inputs", dir.display());
        }
        inputs.sort();
        for path in inputs {
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if std::panic::catch_unwind(|| body(&data)).is_err() {
                failed.push(path.display().to_string());
            }
        }
    }
    assert!(failed.is_empty(), "fuzz corpus inputs that panic: {failed:#?}");
}

#[test]
fn every_target_has_a_fuzz_binary_seeds_and_a_corpus() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).unwrap();
    for (name, _) in targets::TARGETS {
        let bin = fuzz.join(format!("fuzz_targets/{name}.rs"));
        let src = std::fs::read_to_string(&bin).unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        assert!(
            src.contains(&format!("khub_fuzz::{name}(")),
            "{} does not call khub_fuzz::{name}",
            bin.display()
        );
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "fuzz/Cargo.toml has no [[bin]] {name}"
        );
        for kind in ["seeds", "corpus"] {
            assert!(fuzz.join(kind).join(name).is_dir(), "fuzz/{kind}/{name} is missing");
        }
    }
}
