//! Build script for khub. It does NOTHING unless the environment variable
//! `KHUB_BENCH_STATIC=1` is set: a normal build, `cargo test`, and every crate that depends
//! on khub need no C compiler and compile nothing here (they only build and run this small
//! script, which prints two lines and returns).
//!
//! With `KHUB_BENCH_STATIC=1` it compiles `kernels-example/src/activation.c` into a static
//! library, with `-DKHUB_STATIC_EXPORT` (which adds non-static wrappers
//! `khub_example_gelu`, `khub_example_silu_and_mul` and `khub_example_rms_norm`) and the
//! flags of the `cpu-x86_64-v3-linux` variant (`-O3 -march=x86-64-v3 -std=c11 -I include`),
//! links it into the bench binaries only, and sets `cfg(khub_static_kernel)`. That is the
//! direct-call baseline of `benches/kernel_call.rs`:
//!
//! ```sh
//! KHUB_BENCH_STATIC=1 cargo bench --bench kernel_call
//! ```
//!
//! Changing the variable rebuilds the whole khub crate, because a `rustc-cfg` applies to
//! every target of the package; keep it set while running several benches.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(khub_static_kernel)");
    println!("cargo:rerun-if-env-changed=KHUB_BENCH_STATIC");
    if std::env::var_os("KHUB_BENCH_STATIC").is_none_or(|v| v != "1") {
        return;
    }
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("x86_64") {
        println!("cargo::warning=KHUB_BENCH_STATIC=1 is ignored: the static baseline uses x86-64-v3 flags, and this target is not x86_64");
        return;
    }
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let source = root.join("kernels-example/src/activation.c");
    let include = root.join("include");
    println!("cargo:rerun-if-changed={}", source.display());
    println!("cargo:rerun-if-changed={}", include.join("khub_kernel.h").display());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    cc::Build::new()
        .file(&source)
        .include(&include)
        .define("KHUB_STATIC_EXPORT", None)
        .opt_level(3)
        .flag("-march=x86-64-v3")
        .flag("-std=c11")
        .cargo_metadata(false)
        .out_dir(&out)
        .compile("khub_example_static");
    // Only the bench binaries link the archive (not the library, its tests or dependents).
    println!("cargo::rustc-link-arg-benches={}", out.join("libkhub_example_static.a").display());
    println!("cargo::rustc-link-arg-benches=-lm");
    println!("cargo:rustc-cfg=khub_static_kernel");
}
