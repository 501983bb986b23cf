//! `include/khub.h` is written by hand; this test keeps it honest. It generates the C API's
//! declarations from `src/capi.rs` with cbindgen (configured by `cbindgen.toml`), reduces
//! both headers to canonical declarations (function prototypes with parameter names
//! dropped, `#define`d constants, struct and union definitions, opaque types) and fails on
//! any difference, in either direction.
//!
//! `KHUB_PRINT_GENERATED_HEADER=1 cargo test --test capi_header -- --nocapture` prints the
//! generated header.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own
#![cfg(feature = "capi")]

use std::collections::BTreeMap;
use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn generated() -> String {
    let config = cbindgen::Config::from_file(repo().join("cbindgen.toml")).expect("read cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(repo().join("src/capi.rs"))
        .generate()
        .expect("cbindgen generates the C API's declarations");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("UTF-8")
}

/// One canonical declaration, keyed by kind and name.
type Decls = BTreeMap<String, String>;

/// Removes `/* */` and `//` comments (string literals in a header hold no comment
/// markers worth keeping).
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let block = rest.find("/*");
        let line = rest.find("//");
        match (block, line) {
            (Some(b), l) if l.is_none_or(|l| b < l) => {
                out.push_str(&rest[..b]);
                let end = rest[b + 2..].find("*/").expect("unterminated comment");
                out.push(' ');
                rest = &rest[b + 2 + end + 2..];
            }
            (_, Some(l)) => {
                out.push_str(&rest[..l]);
                rest = &rest[l..];
                rest = rest.find('\n').map_or("", |n| &rest[n..]);
            }
            (None, None) => {
                out.push_str(rest);
                return out;
            }
            (Some(_), None) => unreachable!(),
        }
    }
}

/// Tokens: identifiers and numbers, and single punctuation characters.
fn tokens(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
            continue;
        }
        if !word.is_empty() {
            out.push(std::mem::take(&mut word));
        }
        if !c.is_whitespace() {
            out.push(c.to_string());
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

fn is_ident(t: &str) -> bool {
    t.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
}

/// Splits tokens on a separator at bracket depth 0.
fn split_top(tokens: &[String], sep: &str) -> Vec<Vec<String>> {
    let (mut depth, mut parts, mut cur) = (0i32, Vec::new(), Vec::new());
    for t in tokens {
        match t.as_str() {
            "(" | "{" | "[" => depth += 1,
            ")" | "}" | "]" => depth -= 1,
            _ => {}
        }
        if depth == 0 && t == sep {
            parts.push(std::mem::take(&mut cur));
        } else {
            cur.push(t.clone());
        }
    }
    if !cur.is_empty() {
        parts.push(cur);
    }
    parts
}

fn canonical(text: &str) -> Decls {
    parse(text).0
}

/// The canonical declarations, and the functions in the order they are declared.
fn parse(text: &str) -> (Decls, Vec<String>) {
    let text = strip_comments(text);
    let mut order = Vec::new();
    let mut decls = Decls::new();
    let mut body = String::new();
    // Preprocessor: keep #defines, drop includes and guards, skip `#ifdef __cplusplus`
    // blocks (the extern "C" wrapper).
    let mut skip_depth = 0usize;
    let mut depth = 0usize;
    for line in text.lines() {
        let l = line.trim();
        if let Some(d) = l.strip_prefix('#') {
            let d = d.trim_start();
            if d.starts_with("if") {
                depth += 1;
                if skip_depth == 0 && (d == "ifdef __cplusplus" || d == "if defined(__cplusplus)") {
                    skip_depth = depth;
                }
            } else if d.starts_with("endif") {
                if skip_depth == depth {
                    skip_depth = 0;
                }
                depth -= 1;
            } else if let Some(def) = d.strip_prefix("define")
                && skip_depth == 0
            {
                let mut parts = def.trim().splitn(2, char::is_whitespace);
                let name = parts.next().unwrap_or_default().to_owned();
                let value: String = parts.next().unwrap_or_default().split_whitespace().collect();
                if name != "KHUB_H" {
                    decls.insert(format!("define {name}"), value);
                }
            }
            continue;
        }
        if skip_depth == 0 {
            body.push_str(line);
            body.push('\n');
        }
    }
    for stmt in split_top(&tokens(&body), ";") {
        if stmt.is_empty() {
            continue;
        }
        let mut stmt = stmt;
        // `typedef struct khub_arg { … } khub_arg` and `typedef struct { … } khub_arg` are
        // the same type to a C user.
        if stmt.len() > 3 && stmt[0] == "typedef" && (stmt[1] == "struct" || stmt[1] == "union") && stmt[3] == "{" {
            stmt.remove(2);
        }
        let joined = stmt.join(" ");
        if stmt[0] == "typedef" {
            let name = stmt.last().expect("typedef name").clone();
            if stmt.contains(&"{".to_owned()) {
                decls.insert(format!("type {name}"), joined);
            } else {
                decls.insert(format!("opaque {name}"), joined);
            }
            continue;
        }
        // A function prototype: return type, name, parameters.
        let open = stmt
            .iter()
            .position(|t| t == "(")
            .unwrap_or_else(|| panic!("not a declaration: {joined}"));
        assert!(
            open >= 1 && stmt.last().map(String::as_str) == Some(")"),
            "not a prototype: {joined}"
        );
        let name = stmt[open - 1].clone();
        let ret = stmt[..open - 1].join(" ");
        let params: Vec<String> = split_top(&stmt[open + 1..stmt.len() - 1], ",")
            .into_iter()
            .map(|mut p| {
                if p.len() > 1 && p.last().is_some_and(|t| is_ident(t)) {
                    p.pop();
                }
                p.join(" ")
            })
            .filter(|p| p != "void")
            .collect();
        decls.insert(format!("fn {name}"), format!("{ret} {name}({})", params.join(", ")));
        order.push(name);
    }
    (decls, order)
}

/// The functions of C API 1.0, in header order. A minor version only appends (docs/c-api.md,
/// "Versioning"): this list never changes within major 1, and both sides must start with it.
const C_API_1_0: &[&str] = &[
    "khub_c_api_version",
    "khub_version_string",
    "khub_string_free",
    "khub_error_code",
    "khub_error_message",
    "khub_error_kernel_status",
    "khub_error_free",
    "khub_options_new",
    "khub_options_free",
    "khub_options_set_registry",
    "khub_options_set_cache",
    "khub_options_set_offline",
    "khub_options_set_trust_policy",
    "khub_options_set_host_profile",
    "khub_options_set_state_dir",
    "khub_hub_open",
    "khub_hub_free",
    "khub_hub_load",
    "khub_hub_load_locked",
    "khub_hub_explain_json",
    "khub_hub_host_json",
    "khub_kernel_free",
    "khub_kernel_function",
    "khub_kernel_call",
    "khub_kernel_provenance_json",
];

#[test]
fn additions_go_at_the_end() {
    let hand = std::fs::read_to_string(repo().join("include/khub.h")).expect("read include/khub.h");
    for (side, text) in [("include/khub.h", hand), ("src/capi.rs", generated())] {
        let order = parse(&text).1;
        assert!(
            order.len() >= C_API_1_0.len() && order[..C_API_1_0.len()] == *C_API_1_0,
            "{side} must declare the C API 1.0 functions first, in their order, and add new ones after them:\n  \
             1.0:   {C_API_1_0:?}\n  found: {order:?}"
        );
    }
    let major: u32 = 1;
    let generated = canonical(&generated());
    assert_eq!(
        generated.get("define KHUB_C_API_VERSION_MAJOR").map(String::as_str),
        Some(major.to_string().as_str()),
        "a new major: start a new frozen list beside C_API_1_0"
    );
}

#[test]
fn header_matches_the_rust_side() {
    let generated = generated();
    if std::env::var_os("KHUB_PRINT_GENERATED_HEADER").is_some() {
        println!("{generated}");
    }
    let hand = std::fs::read_to_string(repo().join("include/khub.h")).expect("read include/khub.h");
    let (want, have) = (canonical(&generated), canonical(&hand));
    assert!(
        want.keys().filter(|k| k.starts_with("fn ")).count() >= 20,
        "the generated declarations look empty: {want:#?}"
    );
    let mut problems = Vec::new();
    for (k, v) in &want {
        match have.get(k) {
            None => problems.push(format!("src/capi.rs has `{k}` = `{v}`; include/khub.h does not declare it")),
            Some(h) if h != v => problems.push(format!("`{k}` differs:\n    src/capi.rs:     {v}\n    include/khub.h:  {h}")),
            Some(_) => {}
        }
    }
    for (k, v) in &have {
        if !want.contains_key(k) {
            problems.push(format!("include/khub.h declares `{k}` = `{v}`; src/capi.rs does not export it"));
        }
    }
    assert!(
        problems.is_empty(),
        "include/khub.h drifted from src/capi.rs (KHUB_PRINT_GENERATED_HEADER=1 shows cbindgen's view):\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn the_canonical_form_sees_changes() {
    let base = "int khub_a(const char *name, size_t n);\n#define KHUB_X 1\ntypedef struct khub_h khub_h;";
    let same = "/* doc */ int  khub_a(const char* other_name,\n size_t count); // x\n#define KHUB_X   1\ntypedef struct khub_h khub_h;";
    assert_eq!(canonical(base), canonical(same));
    let tagged = "typedef struct khub_s { int32_t kind; double v; } khub_s;";
    assert_eq!(canonical(tagged), canonical("typedef struct { int32_t kind ; double v ; } khub_s;"));
    assert_ne!(canonical(tagged), canonical("typedef struct { int32_t kind; float v; } khub_s;"));
    assert_ne!(canonical(tagged), canonical("typedef union { int32_t kind; double v; } khub_s;"));
    for changed in [
        "int khub_a(char *name, size_t n);\n#define KHUB_X 1\ntypedef struct khub_h khub_h;",
        "int khub_a(const char *name);\n#define KHUB_X 1\ntypedef struct khub_h khub_h;",
        "int32_t khub_a(const char *name, size_t n);\n#define KHUB_X 1\ntypedef struct khub_h khub_h;",
        "int khub_a(const char *name, size_t n);\n#define KHUB_X 2\ntypedef struct khub_h khub_h;",
        "int khub_a(const char *name, size_t n);\n#define KHUB_X 1\n",
        "int khub_a(const char *name, size_t n);\nint khub_b(void);\n#define KHUB_X 1\ntypedef struct khub_h khub_h;",
        "int khub_a(const char *name, size_t n);\n#define KHUB_X 1\ntypedef struct khub_h khub_h;\ntypedef struct { int a; } khub_s;",
    ] {
        assert_ne!(canonical(base), canonical(changed), "{changed}");
    }
}
