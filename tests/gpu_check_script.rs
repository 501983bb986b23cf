//! `scripts/gpu-check.sh` (issue 14) without a GPU: the script parses, and on a machine
//! without a usable NVIDIA GPU it stops before building anything, with exit status 2 and a
//! message saying what is missing. The GPU itself is simulated away: the script runs with a
//! `PATH` holding only the tools it needs before its first check, plus (per case) a fake
//! `nvidia-smi`, so the real one is never consulted even where a GPU is present.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/gpu-check.sh");

/// Where `tool` lives on this machine, found with `command -v`.
fn which(tool: &str) -> PathBuf {
    let out = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().unwrap();
    assert!(out.status.success(), "{tool} is not installed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A `PATH` directory with `dirname`, `sed` and `head` (what the script runs before its
/// first check), and `nvidia-smi` as the given shell script when there is one.
fn bin_dir(dir: &Path, nvidia_smi: Option<&str>) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for tool in ["dirname", "sed", "head"] {
        std::os::unix::fs::symlink(which(tool), bin.join(tool)).unwrap();
    }
    if let Some(body) = nvidia_smi {
        let p = bin.join("nvidia-smi");
        std::fs::write(&p, format!("#!{}\n{body}\n", which("sh").display())).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin
}

fn run(nvidia_smi: Option<&str>, args: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let bin = bin_dir(dir.path(), nvidia_smi);
    Command::new(which("bash"))
        .arg(SCRIPT)
        .args(args)
        .env_clear()
        .env("PATH", &bin)
        .env("HOME", dir.path())
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn the_script_parses() {
    let out = Command::new(which("bash")).args(["-n", SCRIPT]).output().unwrap();
    assert!(out.status.success(), "bash -n: {}", stderr(&out));
}

#[test]
fn without_nvidia_smi_it_says_so_and_exits_2() {
    let out = run(None, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no usable NVIDIA GPU: nvidia-smi is not on PATH"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("nothing was run"), "{}", stderr(&out));
}

#[test]
fn a_failing_nvidia_smi_is_no_gpu() {
    let out = run(
        Some("echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'; exit 9"),
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("nvidia-smi failed: NVIDIA-SMI has failed"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_nvidia_smi_listing_no_gpu_is_no_gpu() {
    let out = run(Some("exit 0"), &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("nvidia-smi lists no GPU"), "{}", stderr(&out));
}

#[test]
fn help_and_bad_arguments() {
    let out = run(None, &["--help"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: scripts/gpu-check.sh"));
    let out = run(None, &["--bogus"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("unknown argument '--bogus'"), "{}", stderr(&out));
}
