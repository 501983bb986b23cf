//! `khub host`: the facts of this machine and where each came from.

use std::process::ExitCode;

use anyhow::Result;

use khub::host::{Detected, FactSource, HostFacts, ProbeOptions};
use khub::platform::MajorMinor;

pub fn run(options: &ProbeOptions, json: bool) -> Result<ExitCode> {
    let d = HostFacts::detect(options)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        print!("{}", render(&d));
    }
    Ok(ExitCode::SUCCESS)
}

fn source(d: &Detected, keys: &[&str]) -> String {
    keys.iter()
        .find_map(|k| d.sources.get(*k))
        .map(|s| format!("  [{s}]"))
        .unwrap_or_default()
}

fn render(d: &Detected) -> String {
    let f = &d.facts;
    let mut out = String::new();
    let mut line = |name: &str, value: String, src: String| out.push_str(&format!("{name:<14}{value}{src}\n"));
    line("os", f.os.to_string(), source(d, &["os"]));
    line("arch", f.arch.to_string(), source(d, &["arch"]));
    if let Some(l) = &f.libc {
        line("libc", l.to_string(), source(d, &["libc"]));
    } else if let Some(s) = d.sources.get("libc") {
        line("libc", "unknown".into(), format!("  [{s}]"));
    }
    if let Some(m) = &f.macos {
        line("macos", m.to_string(), source(d, &["macos"]));
    }
    if let Some(l) = &f.cpu_level {
        line("cpu level", l.to_string(), source(d, &["cpu-level"]));
    }
    let features: Vec<&str> = f.cpu_features.iter().map(String::as_str).collect();
    line(
        "cpu features",
        if features.is_empty() { "none".into() } else { features.join(" ") },
        source(d, &["cpu-features"]),
    );
    match &f.cuda {
        Some(c) => {
            line(
                "cuda driver",
                format!(
                    "CUDA {}{}",
                    c.driver,
                    c.kmd.as_ref().map(|k| format!(" (kernel module {k})")).unwrap_or_default()
                ),
                source(d, &["cuda.driver", "cuda"]),
            );
            if let Some(r) = &c.runtime {
                line("cuda runtime", r.to_string(), source(d, &["cuda.runtime", "cuda"]));
            }
            let devs: Vec<String> = c
                .devices
                .iter()
                .map(|x| {
                    format!(
                        "{}: sm_{}{}{}",
                        x.index,
                        x.cc.major,
                        x.cc.minor,
                        x.name.as_ref().map(|n| format!(" {n}")).unwrap_or_default()
                    )
                })
                .collect();
            line(
                "cuda devices",
                if devs.is_empty() { "none".into() } else { devs.join("; ") },
                source(d, &["cuda.devices", "cuda"]),
            );
        }
        None => line("nvidia gpu", "none".into(), source(d, &["cuda"])),
    }
    match &f.rocm {
        Some(r) => {
            line(
                "rocm",
                r.version.map_or("version unknown".into(), |v: MajorMinor| v.to_string()),
                source(d, &["rocm.version", "rocm"]),
            );
            let devs: Vec<String> = r.devices.iter().enumerate().map(|(i, x)| format!("{i}: {}", x.target)).collect();
            line(
                "amd devices",
                if devs.is_empty() { "none".into() } else { devs.join("; ") },
                source(d, &["rocm.devices", "rocm"]),
            );
        }
        None => line("amd gpu", "none".into(), source(d, &["rocm"])),
    }
    if f.metal.is_some() {
        line("metal", "available".into(), source(d, &["metal"]));
    }
    if let Some(x) = &f.xpu {
        line(
            "intel xpu",
            format!(
                "oneAPI {} [{}]",
                x.oneapi.map_or("unknown".into(), |v| v.to_string()),
                x.devices.join(", ")
            ),
            source(d, &["xpu.devices", "xpu.oneapi"]),
        );
    }
    out
}

#[allow(dead_code)]
fn _source_is_used(_: FactSource) {}
