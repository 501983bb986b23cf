//! `khub build`, `package`, `inspect`, `load`, `selftest`, `bench` and `demo`: the local
//! path from a kernel's sources to a verified, loaded, checked function call.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use khub::host::ProbeOptions;
use khub::load::Kernel;
use khub::package::{self, BuildOptions};
use khub::release::Release;
use khub::resolve::{Preferences, resolve};

/// Options shared by build and package.
pub struct Toolchain {
    pub strict: bool,
    pub nvcc: Option<PathBuf>,
    pub nvcc_args: Vec<String>,
    pub hip: Option<PathBuf>,
    pub only: Vec<String>,
}

impl Toolchain {
    fn options(&self) -> BuildOptions {
        BuildOptions {
            strict: self.strict,
            nvcc: self.nvcc.clone(),
            nvcc_args: self.nvcc_args.clone(),
            hip: self.hip.clone(),
            only: self.only.clone(),
            describe_helper: std::env::current_exe().ok(),
            force: false,
        }
    }
}

/// Build progress on stderr: `building `id``, with the whole compiler command under -v;
/// nothing under -q or --json.
fn log(json: bool) -> impl FnMut(&str) {
    use super::{Verbosity, verbosity};
    move |line: &str| match verbosity() {
        _ if json => {}
        Verbosity::Quiet => {}
        Verbosity::Verbose => eprintln!("{line}"),
        Verbosity::Normal => match line.strip_prefix("building ").and_then(|l| l.split_once(": ")) {
            Some((id, _command)) => eprintln!("building {id}"),
            None => eprintln!("{line}"),
        },
    }
}

pub fn build(kernel_dir: &Path, out: Option<&Path>, tc: &Toolchain) -> Result<ExitCode> {
    let out = out.map(Path::to_owned).unwrap_or_else(|| kernel_dir.join("build"));
    let report = package::build(kernel_dir, &out, &tc.options(), &mut log(false))?;
    for b in &report.built {
        println!("built {:<36} {}", b.config.id, b.library.display());
    }
    // Skipped variants were reported as warnings (stderr) when they were skipped.
    Ok(ExitCode::SUCCESS)
}

pub fn package(kernel_dir: &Path, out: &Path, force: bool, tc: &Toolchain, json: bool) -> Result<ExitCode> {
    let options = BuildOptions { force, ..tc.options() };
    let (manifest, report) = package::package(kernel_dir, out, &options, &mut log(json))?;
    if json {
        #[derive(Serialize)]
        #[serde(rename_all = "kebab-case")]
        struct Doc<'a> {
            release: String,
            kernel: &'a str,
            version: String,
            variants: Vec<&'a str>,
            skipped: &'a [(String, String)],
        }
        let doc = Doc {
            release: out.display().to_string(),
            kernel: &manifest.kernel.name,
            version: manifest.kernel.version.to_string(),
            variants: manifest.variants.iter().map(|v| v.id.as_str()).collect(),
            skipped: &report.skipped,
        };
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "packaged {} {} into {}",
            manifest.kernel.name,
            manifest.kernel.version,
            out.display()
        );
        for v in &manifest.variants {
            let f = &v.files[0];
            println!("  {:<36} {:>9} bytes  sha256 {}", v.id, f.size, f.sha256);
        }
        // Skipped variants were reported as warnings (stderr) when they were skipped.
    }
    Ok(ExitCode::SUCCESS)
}

pub fn inspect(lib: &Path, json: bool) -> Result<ExitCode> {
    let info = khub::inspect::inspect_file(lib).with_context(|| format!("cannot inspect {}", lib.display()))?;
    // The descriptor is read by loading the library, which runs its initialisers: do that in
    // a child process so an arbitrary library cannot affect this one.
    let description = describe_isolated(lib);
    if json {
        #[derive(Serialize)]
        #[serde(rename_all = "kebab-case")]
        struct Doc<'a> {
            library: String,
            machine: &'a str,
            exports: &'a [String],
            needed: &'a [String],
            glibc_floor: Option<String>,
            musl: bool,
            cuda_code: Vec<String>,
            cuda_entries: Vec<String>,
            hip_targets: Vec<String>,
            hip_entries: &'a [khub::inspect::HipCodeObject],
            descriptor: serde_json::Value,
            warnings: &'a [String],
        }
        let doc = Doc {
            library: lib.display().to_string(),
            machine: &info.machine,
            exports: &info.exports,
            needed: &info.needed,
            glibc_floor: info.glibc_floor_version.clone(),
            musl: info.musl,
            cuda_code: info.cuda_code().iter().map(ToString::to_string).collect(),
            cuda_entries: info.cuda.iter().map(|e| format!("{e:?}")).collect(),
            hip_targets: info.hip_targets().iter().map(ToString::to_string).collect(),
            hip_entries: &info.hip,
            descriptor: match &description {
                Ok(v) => v.clone(),
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            },
            warnings: &info.warnings,
        };
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("library      {}", lib.display());
    println!("machine      {}", info.machine);
    println!("needs        {}", info.needed.join(", "));
    match (info.musl, info.glibc_floor) {
        (true, _) => println!("libc         musl"),
        (false, Some(v)) => println!(
            "libc         glibc {} or newer",
            info.glibc_floor_version.clone().unwrap_or_else(|| v.to_string())
        ),
        (false, None) => println!("libc         no versioned glibc symbols"),
    }
    println!("exports      {}", info.exports.join(", "));
    let code = info.cuda_code();
    if !code.is_empty() {
        println!(
            "device code  {}",
            code.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        );
        for e in &info.cuda {
            println!("  {e:?}");
        }
    }
    let amd = info.hip_targets();
    if !info.hip.is_empty() {
        println!(
            "amd targets  {}",
            amd.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        );
        for o in &info.hip {
            let stored = o
                .compression
                .map(|c| format!(", CCOB v{} {}", c.version, c.method))
                .unwrap_or_default();
            let elf = o
                .elf
                .as_ref()
                .map(|h| {
                    format!(
                        ", code object v{}, e_flags {:#x}",
                        h.code_object_version.map_or("?".to_owned(), |v| v.to_string()),
                        h.e_flags
                    )
                })
                .unwrap_or_default();
            println!("  bundle {} {:<48} {:>8} bytes{stored}{elf}", o.bundle, o.id, o.size);
        }
    }
    match description {
        Ok(d) => {
            println!(
                "kernel       {} {} ({}), ABI {}",
                d["name"].as_str().unwrap_or("?"),
                d["version"].as_str().unwrap_or("?"),
                d["backend"].as_str().unwrap_or("?"),
                d["abi"].as_str().unwrap_or("?")
            );
            for f in d["functions"].as_array().into_iter().flatten() {
                let test = if f["selftest"].as_bool() == Some(true) {
                    "  [self-test]"
                } else {
                    ""
                };
                println!(
                    "  {:<20} {}{test}",
                    f["name"].as_str().unwrap_or("?"),
                    f["signature"].as_str().unwrap_or("?")
                );
            }
        }
        Err(e) => println!("kernel       not a loadable khub kernel: {e:#}"),
    }
    for w in &info.warnings {
        println!("warning: {w}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `khub __describe LIB` and parses its JSON.
fn describe_isolated(lib: &Path) -> Result<serde_json::Value> {
    let exe = std::env::current_exe()?;
    Ok(serde_json::to_value(khub::load::describe_library_in(&exe, lib)?)?)
}

/// `khub __describe`: loads a library in this (child) process and prints its descriptor.
pub fn describe(lib: &Path) -> Result<ExitCode> {
    let d = khub::load::describe_library(lib)?;
    println!("{}", serde_json::to_string(&d)?);
    Ok(ExitCode::SUCCESS)
}

pub fn load(kernel: &Kernel, took: Duration, trust: &str, json: bool) -> Result<ExitCode> {
    let report = kernel.report();
    if json {
        let mut doc = serde_json::to_value(&report)?;
        if let Some(o) = doc.as_object_mut() {
            o.insert("trust".into(), trust.into());
        }
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "loaded {} {} variant {} ({}), kernel ABI {} in {:.1} ms",
        report.kernel,
        report.version,
        report.variant,
        report.backend,
        report.abi,
        took.as_secs_f64() * 1e3
    );
    println!("  trust    {trust}");
    for f in &report.files {
        println!("  verified {}  {} bytes  sha256 {}", f.path, f.size, f.sha256);
    }
    for e in &report.exports {
        println!("  export   {:<20} {}", e.name, e.signature);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn selftest(kernel: &Kernel, seed: u64, size: usize, json: bool) -> Result<ExitCode> {
    let names: Vec<String> = kernel.functions().map(str::to_owned).collect();
    let mut reports = Vec::new();
    for name in &names {
        match kernel.selftest(name, seed, size) {
            Ok(r) => reports.push(r),
            Err(e) => eprintln!("{name}: {e}"),
        }
    }
    let all_passed = reports.iter().all(|r| r.passed) && reports.len() == names.len();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "variant": kernel.variant(), "results": reports, "passed": all_passed }))?
        );
    } else {
        println!(
            "self-tests of {} {} variant {} (seed {seed}, {size} elements)",
            kernel.name(),
            kernel.version(),
            kernel.variant()
        );
        for r in &reports {
            let verdict = if r.passed { "pass" } else { "FAIL" };
            let msg = if r.message.is_empty() {
                String::new()
            } else {
                format!("  {}", r.message)
            };
            println!("  {verdict}  {:<20} max error {:.3e}{msg}", r.function, r.max_error);
        }
    }
    Ok(if all_passed { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

pub fn bench(kernel: &Kernel, function: &str, size: usize, iters: usize, json: bool) -> Result<ExitCode> {
    if size == 0 || iters == 0 {
        bail!("--size and --iters must be at least 1 (a benchmark of nothing measures nothing)");
    }
    let r = khub::bench::bench_kernel(kernel, function, size, 4096, iters)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print_bench(&r);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_bench(r: &khub::bench::BenchResult) {
    println!(
        "{} on {}: {:.1} MiB moved in {:.3} ms = {:.2} GB/s; memcpy of the same bytes {:.2} GB/s ({:.0}% of memcpy)",
        r.function,
        r.variant,
        r.bytes as f64 / (1 << 20) as f64,
        r.median_ms,
        r.gb_per_s,
        r.memcpy_gb_per_s,
        r.ratio_to_memcpy * 100.0
    );
}

/// The README's main job: package kernels-example into a local release, explain the choice
/// for this host, load it, run its self-tests and benchmark `silu_and_mul`.
pub fn demo(kernel_dir: &Path, out: &Path, options: &ProbeOptions, tc: &Toolchain) -> Result<ExitCode> {
    println!("== 1. package {} -> {}", kernel_dir.display(), out.display());
    // Progress and skip warnings stay quiet: the summary below reports each skipped variant.
    let (manifest, report) = package::package(kernel_dir, out, &tc.options(), &mut |_: &str| {})?;
    for v in &manifest.variants {
        println!("   packaged {:<34} sha256 {}", v.id, v.files[0].sha256);
    }
    for (id, why) in &report.skipped {
        println!("   skipped  {id}: {why}");
    }
    println!("\n== 2. explain the choice for this host");
    let host = super::detect_host(options)?;
    let r = resolve(&manifest, &host, &Preferences::default());
    print!("{}", super::explain::render(&r, &host));
    println!("\n== 3. load (verify every byte, dlopen the sealed copy, negotiate the ABI)");
    let started = Instant::now();
    let kernel = Release::open(out)?.load(&host, &Preferences::default())?;
    println!(
        "   loaded {} {} variant {} in {:.1} ms",
        kernel.name(),
        kernel.version(),
        kernel.variant(),
        started.elapsed().as_secs_f64() * 1e3
    );
    println!("\n== 4. self-test every function against the kernel's scalar reference");
    let mut ok = true;
    for name in kernel.functions().map(str::to_owned).collect::<Vec<_>>() {
        let r = kernel.selftest(&name, 42, 1 << 16)?;
        ok &= r.passed;
        println!(
            "   {}  {:<14} max error {:.3e}",
            if r.passed { "pass" } else { "FAIL" },
            name,
            r.max_error
        );
    }
    println!("\n== 5. benchmark silu_and_mul on 64 MiB of input");
    let r = khub::bench::bench_kernel(&kernel, "silu_and_mul", 16 << 20, 4096, 5)?;
    print!("   ");
    print_bench(&r);
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
