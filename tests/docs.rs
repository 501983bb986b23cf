//! Every command block in README.md and docs/*.md runs here, as written, so the
//! documentation cannot drift from the program.
//!
//! What counts as a command block: a fenced block tagged `sh` (or `console`, `bash`,
//! `shell`), and an untagged block whose first line starts with `$ ` (a transcript).
//!
//! - A block of plain lines is a script: each command (a line, with its `\`
//!   continuations) must exit 0. A line ending in `&` starts a background job (a
//!   `khub serve` is waited for until it listens); background jobs end with the file.
//! - A transcript (`$ command` lines, each followed by its output) runs each command and
//!   matches what it printed (stdout and stderr together, as a terminal shows them)
//!   against the lines shown, with snapbox: `…` stands for any text within a line, and a
//!   line holding only `…` for any number of lines.
//!
//! An HTML comment on the line before a block changes how it runs:
//!
//! - `<!-- doctest: skip: REASON -->`: not run; the reason is printed (for commands whose
//!   run this test cannot host: the test suite itself, release builds, benchmarks).
//! - `<!-- doctest: needs: TOOL … -->`: skipped with a message when a tool is missing
//!   (with `CI=true`, a failure: CI installs every tool). `python:MODULE` needs the
//!   sandbox's `python` to import MODULE. Later blocks must not depend on such a block.
//! - `<!-- doctest: output varies: REASON -->`: a transcript whose commands run but whose
//!   output is a record of one machine (lscpu, timings), not matched.
//! - `<!-- doctest: servers -->`: each line is a server: started, waited for until it
//!   listens, then stopped.
//!
//! And `<!-- doctest-hidden … -->` (a multi-line comment) holds hidden commands run at that
//! point, like rustdoc's hidden `#` lines: the fixtures a page assumes.
//!
//! Each file runs in one bash session in a sandbox: the working directory holds copies of
//! kernels-example/, examples/ and include/; HOME, TMPDIR and the store are private;
//! `/tmp/` in a command means the sandbox's own tmp, and port 8080 a free port (both
//! mapped back in the output before matching); `khub` on PATH is the binary under test, and
//! `python` is `KHUB_DOCS_PYTHON` (a Python with the `khub` package installed, as `.ci/run`
//! sets it), else `PYTHON`.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own

mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// How a block runs.
#[derive(Debug, Clone, PartialEq)]
enum Mode {
    Run,
    Skip(String),
    Needs(Vec<String>),
    OutputVaries,
    Servers,
}

#[derive(Debug)]
enum Body {
    /// Commands that must succeed, with the line each starts on.
    Script(Vec<(usize, String)>),
    /// Commands with their expected output.
    Transcript(Vec<(usize, String, String)>),
}

#[derive(Debug)]
struct Block {
    line: usize,
    mode: Mode,
    body: Body,
}

fn is_command_tag(tag: &str) -> bool {
    matches!(tag, "sh" | "console" | "bash" | "shell")
}

fn parse_directive(comment: &str, file: &str, line: usize) -> Mode {
    let d = comment.trim();
    if let Some(r) = d.strip_prefix("skip:") {
        let r = r.trim();
        assert!(!r.is_empty(), "{file}:{line}: a skipped block must say why");
        return Mode::Skip(r.to_owned());
    }
    if let Some(t) = d.strip_prefix("needs:") {
        return Mode::Needs(t.split_whitespace().map(str::to_owned).collect());
    }
    if d.starts_with("output varies") {
        return Mode::OutputVaries;
    }
    if d == "servers" {
        return Mode::Servers;
    }
    panic!("{file}:{line}: unknown doctest directive `{d}`");
}

/// Splits a script block into commands, joining `\` continuations.
fn commands(lines: &[(usize, &str)]) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut cur: Option<(usize, String)> = None;
    for &(n, l) in lines {
        let (start, mut text) = cur.take().unwrap_or((n, String::new()));
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(l);
        if l.trim_end().ends_with('\\') {
            cur = Some((start, text));
        } else if !text.trim().is_empty() && !text.trim_start().starts_with('#') {
            out.push((start, text));
        }
    }
    if let Some(c) = cur {
        out.push(c);
    }
    out
}

fn parse(file: &str, text: &str) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        if let Some(rest) = l.strip_prefix("<!-- doctest-hidden") {
            assert!(rest.trim().is_empty(), "{file}:{}: doctest-hidden goes on its own line", i + 1);
            let start = i + 1;
            let mut body = Vec::new();
            i += 1;
            while i < lines.len() && lines[i].trim() != "-->" {
                body.push((i + 1, lines[i]));
                i += 1;
            }
            assert!(i < lines.len(), "{file}:{start}: unterminated doctest-hidden");
            blocks.push(Block {
                line: start,
                mode: Mode::Run,
                body: Body::Script(commands(&body)),
            });
            i += 1;
            continue;
        }
        if let Some(tag) = l.strip_prefix("```") {
            let tag = tag.trim();
            let start = i + 1;
            let mut content = Vec::new();
            i += 1;
            while i < lines.len() && !lines[i].starts_with("```") {
                content.push((i + 1, lines[i]));
                i += 1;
            }
            i += 1;
            let transcript = content.first().is_some_and(|(_, l)| l.starts_with("$ "));
            if !(is_command_tag(tag) || (tag.is_empty() && transcript)) {
                continue;
            }
            let mode = start
                .checked_sub(2)
                .and_then(|p| lines[p].trim().strip_prefix("<!-- doctest:"))
                .and_then(|d| d.strip_suffix("-->"))
                .map_or(Mode::Run, |d| parse_directive(d, file, start));
            let body = if transcript {
                let mut cmds: Vec<(usize, String, String)> = Vec::new();
                for (n, l) in content {
                    if let Some(c) = l.strip_prefix("$ ") {
                        cmds.push((n, c.to_owned(), String::new()));
                    } else {
                        let last = cmds.last_mut().unwrap_or_else(|| panic!("{file}:{n}: output before a `$` line"));
                        last.2.push_str(l);
                        last.2.push('\n');
                    }
                }
                Body::Transcript(cmds)
            } else {
                Body::Script(commands(&content))
            };
            blocks.push(Block { line: start, mode, body });
            continue;
        }
        i += 1;
    }
    blocks
}

/// The Python the sandbox's `python` runs.
fn docs_python() -> Option<std::ffi::OsString> {
    std::env::var_os("KHUB_DOCS_PYTHON").or_else(|| std::env::var_os("PYTHON"))
}

fn have_tool(tool: &str) -> bool {
    if let Some(module) = tool.strip_prefix("python:") {
        return docs_python().is_some_and(|py| {
            Command::new(py)
                .args(["-c", &format!("import {module}")])
                .output()
                .is_ok_and(|o| o.status.success())
        });
    }
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The port a server command listens on (after the port substitution).
fn server_port(cmd: &str, default: u16) -> u16 {
    cmd.split_whitespace()
        .skip_while(|w| *w != "--addr")
        .nth(1)
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Sandbox {
    _dir: tempfile::TempDir,
    root: PathBuf,
    port: u16,
}

impl Sandbox {
    fn new() -> Sandbox {
        let dir = tempfile::Builder::new().prefix("khub-docs-").tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        for d in ["work", "home", "tmp", "bin", "out"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for d in ["kernels-example", "examples", "include"] {
            common::copy_dir(&common::repo().join(d), &root.join("work").join(d));
        }
        // The install script reads the crate's layout next to it.
        std::fs::copy(common::repo().join("Cargo.toml"), root.join("work/Cargo.toml")).unwrap();
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_khub"), root.join("bin/khub")).unwrap();
        if let Some(py) = docs_python() {
            // A wrapper, not a symlink: a virtual environment's python finds its packages
            // from the path it was started by.
            let wrapper = root.join("bin/python");
            std::fs::write(&wrapper, format!("#!/bin/sh\nexec '{}' \"$@\"\n", py.to_string_lossy())).unwrap();
            std::fs::set_permissions(
                &wrapper,
                <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
            )
            .unwrap();
        }
        Sandbox {
            _dir: dir,
            root,
            port: free_port(),
        }
    }

    /// A command as the sandbox runs it.
    fn rewrite(&self, cmd: &str) -> String {
        cmd.replace("/tmp/", &format!("{}/tmp/", self.root.display()))
            .replace(":8080", &format!(":{}", self.port))
    }

    /// Output as the documentation shows it.
    fn unwrite(&self, out: &str) -> String {
        out.replace(&format!("{}/tmp/", self.root.display()), "/tmp/")
            .replace(&format!("{}/work/", self.root.display()), "")
            .replace(&format!("{}/home", self.root.display()), "~")
            .replace(&format!(":{}", self.port), ":8080")
    }
}

/// One command of the generated script, and what to check once it ran.
struct Step {
    origin: String,
    command: String,
    expect: Option<String>,
}

/// Runs one documentation file's blocks; returns the failures.
fn run_file(rel: &str) {
    let text = std::fs::read_to_string(common::repo().join(rel)).unwrap();
    let blocks = parse(rel, &text);
    let sb = Sandbox::new();
    let out = sb.root.join("out");
    let mut script = String::from(
        "cd \"$SANDBOX/work\"\n\
         __wait_port() { for _ in $(seq 1 400); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.05; done; return 1; }\n\
         trap 'kill $(jobs -pr) 2>/dev/null; wait' EXIT\n",
    );
    let mut steps: Vec<Step> = Vec::new();
    let mut skipped = Vec::new();
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    for b in &blocks {
        let origin = format!("{rel}:{}", b.line);
        match &b.mode {
            Mode::Skip(why) => {
                skipped.push(format!("{origin}: skipped: {why}"));
                continue;
            }
            Mode::Needs(tools) => {
                let missing: Vec<&String> = tools.iter().filter(|t| !have_tool(t)).collect();
                if !missing.is_empty() {
                    assert!(!ci, "{origin}: needs {missing:?}, which CI must install");
                    skipped.push(format!("{origin}: skipped: needs {missing:?}"));
                    continue;
                }
            }
            _ => {}
        }
        let cmds: Vec<(usize, String, Option<String>)> = match &b.body {
            Body::Script(c) => c.iter().map(|(n, c)| (*n, c.clone(), None)).collect(),
            Body::Transcript(t) => t
                .iter()
                .map(|(n, c, o)| (*n, c.clone(), (b.mode != Mode::OutputVaries).then(|| o.clone())))
                .collect(),
        };
        for (n, cmd, expect) in cmds {
            let k = steps.len();
            let origin = format!("{rel}:{n}");
            let run = sb.rewrite(&cmd);
            let o = out.join(k.to_string());
            let o = o.display();
            let background = run.trim_end().strip_suffix('&').map(str::to_owned);
            if b.mode == Mode::Servers {
                let port = server_port(&run, 8080);
                writeln!(
                    script,
                    "{{ exec {} {run}\n}} > {o}.out 2>&1 & pid=$!\n\
                     if __wait_port {port} && kill -0 $pid 2>/dev/null; then echo 0 > {o}.rc; else echo 'not listening on {port}, or exited' >> {o}.out; echo 1 > {o}.rc; exit 0; fi\n\
                     kill $pid; wait $pid 2>/dev/null",
                    exec_prefix(&run)
                )
                .unwrap();
            } else if let Some(bg) = background {
                // `exec`: `$!` must be the server itself, not a subshell that a kill would
                // leave it running behind (a group keeps a trailing `# comment` harmless).
                writeln!(
                    script,
                    "{{ exec {} {bg}\n}} > {o}.out 2>&1 & pid=$!\necho 0 > {o}.rc",
                    exec_prefix(&bg)
                )
                .unwrap();
                if bg.contains("khub serve") {
                    let port = server_port(&bg, 8080);
                    writeln!(
                        script,
                        "__wait_port {port} && kill -0 $pid 2>/dev/null || {{ echo 'not listening on {port}, or exited' >> {o}.out; echo 1 > {o}.rc; exit 0; }}"
                    )
                    .unwrap();
                }
            } else {
                writeln!(
                    script,
                    "{{ {run}\n}} > {o}.out 2>&1 </dev/null; rc=$?; echo $rc > {o}.rc; [ $rc = 0 ] || exit 0"
                )
                .unwrap();
            }
            steps.push(Step {
                origin,
                command: cmd,
                expect,
            });
        }
    }
    for s in &skipped {
        eprintln!("{s}");
    }
    std::fs::write(sb.root.join("script.sh"), &script).unwrap();

    let mut cmd = Command::new("bash");
    cmd.arg(sb.root.join("script.sh"));
    for var in khub::env::ALL {
        if *var != "KHUB_NVCC" {
            cmd.env_remove(var);
        }
    }
    for var in [
        "HF_TOKEN",
        "HF_ENDPOINT",
        "HF_HOME",
        "XDG_CONFIG_HOME",
        "XDG_CACHE_HOME",
        "PKG_CONFIG_PATH",
    ] {
        cmd.env_remove(var);
    }
    let path = format!("{}:{}", sb.root.join("bin").display(), std::env::var("PATH").unwrap_or_default());
    cmd.env("PATH", path)
        .env("HOME", sb.root.join("home"))
        .env("TMPDIR", sb.root.join("tmp"))
        .env("SANDBOX", &sb.root)
        // examples/c-host/install-khub.sh installs the libraries this test run built
        // instead of running a release build (see the script's KHUB_INSTALL_FROM).
        .env("KHUB_INSTALL_FROM", target_dir())
        .env("KHUB_INSTALL_LINK", "1")
        .env("NO_COLOR", "1")
        // The example kernel packaged with its CPU variants only (no nvcc, no clang: fast),
        // for hidden setup commands: `cp -r "$EXAMPLE_RELEASE" /tmp/activation`.
        .env("EXAMPLE_RELEASE", common::example_release());
    let status = cmd.status().unwrap();
    assert!(status.success(), "{rel}: the generated script failed to run: {status}");

    let assert = snapbox::Assert::new();
    let mut failures = Vec::new();
    for (k, s) in steps.iter().enumerate() {
        let rc = std::fs::read_to_string(out.join(format!("{k}.rc")));
        let output = std::fs::read_to_string(out.join(format!("{k}.out"))).unwrap_or_default();
        let output = sb.unwrite(&output);
        let Ok(rc) = rc else {
            // An earlier command failed; it is reported.
            break;
        };
        if rc.trim() != "0" {
            failures.push(format!("{}: `{}` exited with {}:\n{}", s.origin, s.command, rc.trim(), output));
            break;
        }
        if let Some(expect) = &s.expect {
            let pattern = to_pattern(expect);
            if let Err(e) = assert.try_eq(None, output.clone().into(), pattern.into()) {
                failures.push(format!("{}: `{}` printed something else:\n{e}", s.origin, s.command));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    eprintln!("{rel}: {} commands ran, {} blocks skipped", steps.len(), skipped.len());
}

/// `env` when a command starts with `VAR=value` (which `exec` alone does not take).
fn exec_prefix(cmd: &str) -> &'static str {
    let first = cmd.split_whitespace().next().unwrap_or_default();
    if first.contains('=') { "env" } else { "" }
}

/// The documentation's `…` as snapbox wildcards.
fn to_pattern(expect: &str) -> String {
    let mut p = String::new();
    for line in expect.lines() {
        if line.trim() == "…" {
            p.push_str("...\n");
        } else {
            p.push_str(&line.replace('…', "[..]"));
            p.push('\n');
        }
    }
    p
}

/// Refuses an untagged block that starts with a command: it would escape this test. Tag it
/// `sh` (with a directive, if it cannot run here).
fn untagged_commands(page: &str, text: &str) {
    const COMMANDS: [&str; 12] = [
        "khub ",
        "cargo ",
        "scripts/",
        "python",
        "valgrind ",
        "pip ",
        "make ",
        "cc ",
        "KHUB_",
        "HF_",
        "hyperfine",
        "strace",
    ];
    let lines: Vec<&str> = text.lines().collect();
    let mut inside = false;
    for (i, l) in lines.iter().enumerate() {
        if let Some(tag) = l.strip_prefix("```") {
            if !inside && tag.trim().is_empty() {
                let first = lines.get(i + 1).copied().unwrap_or_default();
                assert!(
                    !COMMANDS.iter().any(|c| first.starts_with(c)),
                    "{page}:{}: an untagged block of commands (`{first}`); tag it ```sh so tests/docs.rs runs it, or skips it with a reason",
                    i + 1
                );
            }
            inside = !inside;
        }
    }
}

/// Where this test run's libkhub.so and libkhub.a are.
fn target_dir() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_khub"));
    exe.parent().map(Path::to_path_buf).unwrap()
}

macro_rules! doc_tests {
    ($($name:ident => $file:literal,)*) => {
        $(#[test] fn $name() { run_file($file); })*

        /// Every page with a command block has a test above.
        #[test]
        fn every_page_is_covered() {
            let covered = [$($file),*];
            let mut pages = vec!["README.md".to_owned()];
            for e in std::fs::read_dir(common::repo().join("docs")).unwrap() {
                let name = e.unwrap().file_name().into_string().unwrap();
                if name.ends_with(".md") {
                    pages.push(format!("docs/{name}"));
                }
            }
            for page in pages {
                let text = std::fs::read_to_string(common::repo().join(&page)).unwrap();
                untagged_commands(&page, &text);
                if !parse(&page, &text).is_empty() {
                    assert!(covered.contains(&page.as_str()), "{page} has command blocks but no test in tests/docs.rs");
                }
            }
        }
    };
}

doc_tests! {
    readme => "README.md",
    amd => "docs/amd.md",
    c_api => "docs/c-api.md",
    host => "docs/host.md",
    loading => "docs/loading.md",
    lockfile => "docs/lockfile.md",
    performance => "docs/performance.md",
    publishing => "docs/publishing.md",
    python => "docs/python.md",
    registry => "docs/registry.md",
    resolve => "docs/resolve.md",
    security => "docs/security.md",
    serve => "docs/serve.md",
}

#[test]
fn the_parser_reads_blocks_and_directives() {
    let page = "x\n<!-- doctest: skip: slow -->\n```sh\ncargo test\n```\n\n```sh\na \\\n  b\n# c\nd &\n```\n```\n$ khub host\nos …\n…\n```\n<!-- doctest-hidden\nmkdir x\n-->\n```toml\n[a]\n```\n";
    let b = parse("t.md", page);
    assert_eq!(b.len(), 4, "{b:?}");
    assert_eq!(b[0].mode, Mode::Skip("slow".into()));
    match &b[1].body {
        Body::Script(c) => assert_eq!(c, &vec![(8, "a \\\n  b".to_owned()), (11, "d &".to_owned())]),
        other => panic!("{other:?}"),
    }
    match &b[2].body {
        Body::Transcript(t) => assert_eq!(t, &vec![(14, "khub host".to_owned(), "os …\n…\n".to_owned())]),
        other => panic!("{other:?}"),
    }
    assert!(matches!(&b[3].body, Body::Script(s) if s == &vec![(19, "mkdir x".to_owned())]));
    assert_eq!(to_pattern("a … b\n…\n"), "a [..] b\n...\n");
}
