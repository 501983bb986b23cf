//! `khub.toml`, the release manifest: types, parsing, validation and writing.
//!
//! A manifest sits at the root of every release. It names the kernel and its version, the
//! kernel ABI major it speaks, the functions every variant exports, and one entry per
//! variant: the constraints under which it runs and the files it is made of (each with its
//! size and SHA-256).
//!
//! Design notes:
//! - Manifests come from the network, so parsing treats the text as hostile. The document
//!   size and its nesting depth are bounded *before* the TOML parser runs, every string is
//!   bounded, every path is checked (no absolute paths, `..`, backslashes, NUL or control
//!   characters), and duplicates are refused. Nothing here panics on any input.
//! - The schema is versioned `MAJOR.MINOR`. An unknown major is refused. A minor up to
//!   [`SCHEMA_MINOR`] is read strictly (an unknown key is an error naming it); a newer minor
//!   comes from a newer producer, so its unknown keys are ignored.
//! - Device-code tokens, target ids and versions are parsed into typed values here, once,
//!   so that resolution compares numbers and never re-parses strings.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::platform::{AmdTarget, Backend, CpuArch, CudaArch, CudaFeatureSet, CudartLinkage, Libc, MajorMinor, Os, ParseError, X86Level};

/// The schema major this version of khub reads and writes.
pub const SCHEMA_MAJOR: u32 = 1;
/// The highest schema minor this version of khub knows.
pub const SCHEMA_MINOR: u32 = 0;
/// The signature file beside a release's `khub.toml` (minisign format).
pub const SIGNATURE_FILE: &str = "khub.toml.minisig";

/// The largest manifest accepted, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 16 * 1024 * 1024;
/// The deepest nesting of arrays and inline tables accepted.
pub const MAX_NESTING: usize = 16;
/// The most variants one manifest may hold.
pub const MAX_VARIANTS: usize = 65_536;
/// The most files one variant may hold.
pub const MAX_FILES_PER_VARIANT: usize = 4_096;
/// The most exported functions one kernel may declare.
pub const MAX_EXPORTS: usize = 4_096;
/// The largest size accepted for one file: 16 GiB.
pub const MAX_FILE_SIZE: u64 = 16 << 30;
/// The longest relative path accepted, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;
/// The longest free-text string (description, signature) accepted, in bytes.
pub const MAX_TEXT_BYTES: usize = 4096;

/// The manifest could not be read or is not valid.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The document is larger than [`MAX_MANIFEST_BYTES`].
    #[error("manifest is {size} bytes; the limit is {MAX_MANIFEST_BYTES} bytes")]
    TooLarge {
        /// The size that was seen.
        size: usize,
    },
    /// The document is not UTF-8.
    #[error("manifest is not valid UTF-8 (byte {offset}); khub.toml must be UTF-8 TOML")]
    NotUtf8 {
        /// The offset of the first invalid byte.
        offset: usize,
    },
    /// Arrays or inline tables nest deeper than [`MAX_NESTING`].
    #[error("manifest nests arrays or tables {MAX_NESTING}+ levels deep (line {line}); khub.toml never needs more than 4")]
    TooDeep {
        /// The line where the limit was crossed.
        line: usize,
    },
    /// The schema major is not one this khub reads.
    #[error("manifest schema {found} is not supported: this khub reads schema {SCHEMA_MAJOR}.x; upgrade khub to read it")]
    UnsupportedSchema {
        /// The schema string found.
        found: String,
    },
    /// The TOML is malformed, or a field has the wrong type or an invalid value.
    #[error("manifest is not valid: {0}")]
    Syntax(Box<toml::de::Error>),
    /// A key this schema version does not define.
    #[error(
        "manifest field `{field}` is not part of schema {SCHEMA_MAJOR}.{SCHEMA_MINOR}; remove it, or set a newer `schema` if a newer khub wrote it"
    )]
    UnknownField {
        /// The dotted path of the key.
        field: String,
    },
    /// A value is well-formed but breaks a rule of the schema.
    #[error("manifest field `{field}`: {problem}")]
    Invalid {
        /// The dotted path of the field, e.g. `variants[2].files[0].path`.
        field: String,
        /// What is wrong and what is allowed.
        problem: String,
    },
    /// The manifest could not be serialised.
    #[error("could not write the manifest: {0}")]
    Write(#[from] toml::ser::Error),
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ManifestError {
    ManifestError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// A release manifest (`khub.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Manifest {
    /// The schema version, `MAJOR.MINOR`.
    pub schema: String,
    /// The kernel this release holds.
    pub kernel: KernelInfo,
    /// The functions every variant exports.
    #[serde(default)]
    pub exports: Vec<Export>,
    /// The builds of this release.
    #[serde(default)]
    pub variants: Vec<Variant>,
}

/// The kernel a release holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct KernelInfo {
    /// The kernel's name: lowercase letters, digits, `-` and `_`.
    pub name: String,
    /// The release version.
    pub version: semver::Version,
    /// The kernel ABI major every variant speaks (`include/khub_kernel.h`).
    pub abi: u32,
    /// One line about the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// An SPDX license expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
}

/// A function the kernel exports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Export {
    /// The function's name, a C identifier.
    pub name: String,
    /// The signature string the kernel's descriptor reports for it.
    pub signature: String,
}

/// One build of the kernel and the conditions under which it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Variant {
    /// A unique id within the release: letters, digits, `.`, `_`, `+` and `-`.
    pub id: String,
    /// The backend its code runs on.
    pub backend: Backend,
    /// The operating system it was built for.
    pub os: Os,
    /// The CPU architecture of its host code.
    pub arch: CpuArch,
    /// Linux only: the libc it links and the lowest version it needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libc: Option<Libc>,
    /// macOS only: the lowest macOS version it runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macos_min: Option<MajorMinor>,
    /// x86-64 only: the micro-architecture level its host code needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_level: Option<X86Level>,
    /// CPU features its host code needs beyond the level (`std::arch` names, such as
    /// `avx512f` or `sve2`).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub cpu_features: BTreeSet<String>,
    /// CUDA constraints; required when `backend = "cuda"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda: Option<CudaVariant>,
    /// ROCm constraints; required when `backend = "rocm"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rocm: Option<RocmVariant>,
    /// Metal constraints; required when `backend = "metal"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metal: Option<MetalVariant>,
    /// Intel XPU constraints; required when `backend = "xpu"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xpu: Option<XpuVariant>,
    /// The publisher's preference among otherwise equal variants: higher wins.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
    /// The file, among `files`, that the loader opens.
    pub library: RelPath,
    /// Every file of the variant.
    pub files: Vec<FileEntry>,
}

fn is_zero(v: &i32) -> bool {
    *v == 0
}

/// CUDA constraints of a variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CudaVariant {
    /// The toolkit version it was built with.
    pub toolkit: MajorMinor,
    /// How it links the CUDA runtime.
    pub cudart: CudartLinkage,
    /// The device code it carries: cubins (`sm_80`, `sm_90a`, `sm_100f`) and PTX
    /// (`compute_90`).
    pub code: Vec<CudaArch>,
}

/// ROCm constraints of a variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RocmVariant {
    /// The ROCm version it was built with. The host must run the same major; a different
    /// minor only where listed in `compatible`.
    pub version: MajorMinor,
    /// Other ROCm `major.minor` releases the publisher declares it runs on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compatible: Vec<MajorMinor>,
    /// The code objects it carries, as target ids (`gfx942:sramecc+:xnack-`,
    /// `gfx11-generic`).
    pub targets: Vec<AmdTarget>,
}

/// Metal constraints of a variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MetalVariant {
    /// The Metal Shading Language version it was built with (`-std=metalX.Y`).
    pub language: MajorMinor,
}

impl MetalVariant {
    /// The lowest macOS that loads a library built with this language version
    /// (compat-rules.md §3.1), or `None` for a version khub does not know.
    pub fn min_macos(self) -> Option<MajorMinor> {
        let l = self.language;
        let os = match (l.major, l.minor) {
            (3, 0) => (13, 0),
            (3, 1) => (14, 0),
            (3, 2) => (15, 0),
            (4, 0) => (26, 0),
            (4, 1) => (27, 0),
            (major, _) if major < 3 => (11, 0),
            _ => return None,
        };
        Some(MajorMinor::new(os.0, os.1))
    }
}

/// Intel XPU constraints of a variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct XpuVariant {
    /// The oneAPI release it was built with, `YYYY.R`; the host must match it.
    pub oneapi: MajorMinor,
    /// Device IP versions (`arch.release.revision`, e.g. `20.1.4`) it carries native
    /// (AOT) code for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aot: Vec<String>,
    /// Whether it carries SPIR-V that the driver compiles for any Intel GPU.
    #[serde(default)]
    pub spirv: bool,
}

/// One file of a variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FileEntry {
    /// Where the file lives, relative to the release root.
    pub path: RelPath,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256.
    pub sha256: Sha256Digest,
}

/// A SHA-256 digest, written as 64 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sha256Digest(pub [u8; 32]);

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl FromStr for Sha256Digest {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let err = || ParseError {
            what: "sha256",
            value: s.chars().take(80).collect(),
            expected: "64 lowercase hex digits",
        };
        if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(err());
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| err())?;
        Ok(Sha256Digest(out))
    }
}

impl Serialize for Sha256Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Sha256Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A path relative to the release root, checked to stay inside it.
///
/// Components are separated by `/`. Refused: empty paths, absolute paths, `.` and `..`
/// components, empty components, backslashes, colons (drive letters, NTFS streams), NUL and
/// other control characters, components over 255 bytes and paths over
/// [`MAX_PATH_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RelPath(String);

impl RelPath {
    /// Checks `s` and wraps it.
    pub fn new(s: impl Into<String>) -> Result<Self, PathError> {
        let s = s.into();
        check_rel_path(&s)?;
        Ok(RelPath(s))
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path's components.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for RelPath {
    type Error = PathError;
    fn try_from(s: String) -> Result<Self, PathError> {
        RelPath::new(s)
    }
}

impl From<RelPath> for String {
    fn from(p: RelPath) -> String {
        p.0
    }
}

/// Why a relative path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// The path is empty.
    #[error("path is empty")]
    Empty,
    /// The path is too long.
    #[error("path is {0} bytes long; the limit is {MAX_PATH_BYTES}")]
    TooLong(usize),
    /// The path starts at the root.
    #[error("path `{0}` is absolute; paths are relative to the release root")]
    Absolute(String),
    /// The path holds a `..` or `.` component, or an empty one.
    #[error("path `{0}` has a `..`, `.` or empty component; write a plain relative path such as `variants/cpu/libk.so`")]
    BadComponent(String),
    /// A component of the path is longer than file systems allow.
    #[error("path `{path}` has a component of {len} bytes; the limit is 255 bytes a component (a file system limit)")]
    ComponentTooLong {
        /// The path, with control characters escaped.
        path: String,
        /// The component's length in bytes.
        len: usize,
    },
    /// The path holds a character that is not allowed.
    #[error("path `{path}` contains {what}; use `/` separators and printable characters only")]
    BadCharacter {
        /// The path, with control characters escaped.
        path: String,
        /// The offending character, described.
        what: &'static str,
    },
}

fn check_rel_path(s: &str) -> Result<(), PathError> {
    let shown = || s.escape_default().to_string();
    if s.is_empty() {
        return Err(PathError::Empty);
    }
    if s.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong(s.len()));
    }
    for c in s.chars() {
        let what = match c {
            '\0' => "a NUL byte",
            '\\' => "a backslash",
            ':' => "a colon",
            c if c.is_control() => "a control character",
            _ => continue,
        };
        return Err(PathError::BadCharacter { path: shown(), what });
    }
    if s.starts_with('/') {
        return Err(PathError::Absolute(shown()));
    }
    for c in s.split('/') {
        if c.is_empty() || c == "." || c == ".." {
            return Err(PathError::BadComponent(shown()));
        }
        if c.len() > 255 {
            return Err(PathError::ComponentTooLong {
                path: shown(),
                len: c.len(),
            });
        }
    }
    Ok(())
}

/// Refuses documents that nest arrays or inline tables deeper than [`MAX_NESTING`], before
/// the TOML parser (which recurses) sees them. Strings and comments are skipped.
fn check_nesting(text: &str) -> Result<(), ManifestError> {
    #[derive(PartialEq)]
    enum State {
        Code,
        Comment,
        Basic,
        Literal,
        MlBasic,
        MlLiteral,
    }
    let b = text.as_bytes();
    let (mut i, mut depth, mut line, mut state) = (0usize, 0usize, 1usize, State::Code);
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line += 1;
        }
        match state {
            State::Code => match c {
                b'#' => state = State::Comment,
                b'"' if b[i..].starts_with(b"\"\"\"") => {
                    state = State::MlBasic;
                    i += 2;
                }
                b'\'' if b[i..].starts_with(b"'''") => {
                    state = State::MlLiteral;
                    i += 2;
                }
                b'"' => state = State::Basic,
                b'\'' => state = State::Literal,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > MAX_NESTING {
                        return Err(ManifestError::TooDeep { line });
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            },
            State::Comment if c == b'\n' => state = State::Code,
            State::Basic | State::MlBasic if c == b'\\' => i += 1,
            State::Basic if c == b'"' || c == b'\n' => state = State::Code,
            State::Literal if c == b'\'' || c == b'\n' => state = State::Code,
            State::MlBasic if b[i..].starts_with(b"\"\"\"") => {
                state = State::Code;
                i += 2;
            }
            State::MlLiteral if b[i..].starts_with(b"'''") => {
                state = State::Code;
                i += 2;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Reads the `schema` value without deserialising the rest, to choose strict or lenient
/// parsing. Returns `(major, minor)`.
fn schema_version(text: &str) -> Result<(u32, u32), ManifestError> {
    #[derive(Deserialize)]
    struct Head {
        schema: Option<toml::Value>,
    }
    if let Some(found) = leading_schema(text) {
        return parse_schema(found.to_owned());
    }
    // Parsing twice costs a little; it lets an unknown major fail with a clear message
    // before any field of a future format is misread. Only documents that do not open
    // with a plain `schema = "…"` line (the first line khub writes) pay for it.
    let head: Head = toml::from_str(text).map_err(|e| ManifestError::Syntax(Box::new(e)))?;
    let found = match head.schema {
        Some(toml::Value::String(s)) => s,
        Some(other) => {
            return Err(invalid(
                "schema",
                format!("must be a string such as \"{SCHEMA_MAJOR}.{SCHEMA_MINOR}\", found {other}"),
            ));
        }
        None => {
            return Err(invalid(
                "schema",
                format!("is missing; write schema = \"{SCHEMA_MAJOR}.{SCHEMA_MINOR}\" at the top"),
            ));
        }
    };
    parse_schema(found)
}

/// The schema string when the document's first line that is not blank or a comment is
/// exactly `schema = "DIGITS.DIGITS"` (spaces around `=` and a trailing comment allowed).
/// Such a line can only be the top-level key `schema`: nothing comes before it that could
/// open a table or a multi-line string, and a second `schema` key would be a TOML error
/// that the full parse reports. Anything else returns `None` and is parsed in full.
fn leading_schema(text: &str) -> Option<&str> {
    let line = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#'))?;
    let rest = line.strip_prefix("schema")?.trim_start().strip_prefix('=')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    let (value, after) = rest.split_once('"')?;
    let after = after.trim_start();
    let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (major, minor) = value.split_once('.')?;
    (plain(major) && plain(minor) && (after.is_empty() || after.starts_with('#'))).then_some(value)
}

/// `MAJOR.MINOR` of a schema string; an error for another major or another form.
fn parse_schema(found: String) -> Result<(u32, u32), ManifestError> {
    let parsed = found
        .split_once('.')
        .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)));
    match parsed {
        Some((SCHEMA_MAJOR, minor)) => Ok((SCHEMA_MAJOR, minor)),
        Some(_) => Err(ManifestError::UnsupportedSchema { found }),
        None => Err(invalid(
            "schema",
            format!(
                "`{}` is not MAJOR.MINOR, e.g. \"{SCHEMA_MAJOR}.{SCHEMA_MINOR}\"",
                found.escape_default()
            ),
        )),
    }
}

impl Manifest {
    /// Parses and validates a manifest from its raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge { size: bytes.len() });
        }
        let text = std::str::from_utf8(bytes).map_err(|e| ManifestError::NotUtf8 { offset: e.valid_up_to() })?;
        Manifest::from_toml_str(text)
    }

    /// Parses and validates a manifest from TOML text.
    pub fn from_toml_str(text: &str) -> Result<Manifest, ManifestError> {
        if text.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge { size: text.len() });
        }
        check_nesting(text)?;
        let (_, minor) = schema_version(text)?;
        let mut unknown = Vec::new();
        let de = toml::Deserializer::parse(text).map_err(|e| ManifestError::Syntax(Box::new(e)))?;
        let manifest: Manifest =
            serde_ignored::deserialize(de, |path| unknown.push(path.to_string())).map_err(|e| ManifestError::Syntax(Box::new(e)))?;
        if minor.cmp(&SCHEMA_MINOR) != std::cmp::Ordering::Greater
            && let Some(field) = unknown.into_iter().next()
        {
            return Err(ManifestError::UnknownField { field });
        }
        manifest.validate()?;
        Ok(manifest)
    }

    /// Writes the manifest as TOML, after checking that it is valid.
    pub fn to_toml_string(&self) -> Result<String, ManifestError> {
        self.validate()?;
        Ok(toml::to_string_pretty(self)?)
    }

    /// Finds a variant by id.
    pub fn variant(&self, id: &str) -> Option<&Variant> {
        self.variants.iter().find(|v| v.id == id)
    }

    /// Checks every rule that the types alone do not enforce. Returns the first violation,
    /// scanning in document order.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let (major, _) = parse_schema(self.schema.clone())?;
        debug_assert_eq!(major, SCHEMA_MAJOR);
        let k = &self.kernel;
        check_kernel_name("kernel.name", &k.name)?;
        if k.abi == 0 {
            return Err(invalid(
                "kernel.abi",
                "must be 1 or higher: the kernel ABI major the variants speak",
            ));
        }
        check_text("kernel.description", k.description.as_deref())?;
        check_text("kernel.license", k.license.as_deref())?;

        if self.exports.len() > MAX_EXPORTS {
            return Err(invalid(
                "exports",
                format!("{} entries; the limit is {MAX_EXPORTS}", self.exports.len()),
            ));
        }
        let mut names = BTreeSet::new();
        for (i, e) in self.exports.iter().enumerate() {
            let field = format!("exports[{i}].name");
            check_name(&field, &e.name, 128, |b| b.is_ascii_alphanumeric() || b == b'_', "a C identifier")?;
            if e.name.as_bytes()[0].is_ascii_digit() {
                return Err(invalid(field, "a C identifier cannot start with a digit"));
            }
            if !names.insert(e.name.as_str()) {
                return Err(invalid(field, format!("`{}` is exported twice", e.name)));
            }
            let sig = format!("exports[{i}].signature");
            check_text(&sig, Some(&e.signature))?;
            if e.signature.is_empty() || !e.signature.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                return Err(invalid(sig, "must be non-empty printable ASCII"));
            }
        }

        if self.variants.len() > MAX_VARIANTS {
            return Err(invalid(
                "variants",
                format!("{} entries; the limit is {MAX_VARIANTS}", self.variants.len()),
            ));
        }
        let mut ids = BTreeSet::new();
        for (i, v) in self.variants.iter().enumerate() {
            if !ids.insert(v.id.as_str()) {
                return Err(invalid(
                    format!("variants[{i}].id"),
                    format!("`{}` is used by an earlier variant; variant ids must be unique", v.id),
                ));
            }
            v.validate(i)?;
        }
        Ok(())
    }
}

/// The rule for a kernel's name: 1 to 96 lowercase letters, digits, `-` and `_`.
pub(crate) fn check_kernel_name(field: &str, name: &str) -> Result<(), ManifestError> {
    check_name(
        field,
        name,
        96,
        |b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_',
        "lowercase letters, digits, `-` and `_`",
    )
}

/// The rule for a variant id: 1 to 128 letters, digits, `.`, `_`, `+` and `-`, and not `.`
/// or `..`. Ids name directories (`variants/<id>/` in a packaged release), so `..` would
/// climb out of one.
pub(crate) fn check_variant_id(field: &str, id: &str) -> Result<(), ManifestError> {
    check_name(
        field,
        id,
        128,
        |b| b.is_ascii_alphanumeric() || b"._+-".contains(&b),
        "letters, digits, `.`, `_`, `+` and `-`",
    )?;
    if id == "." || id == ".." {
        return Err(invalid(
            field,
            format!("`{id}` is not allowed: it would name a directory other than the variant's"),
        ));
    }
    Ok(())
}

fn check_name(field: &str, s: &str, max: usize, ok: impl Fn(u8) -> bool, allowed: &str) -> Result<(), ManifestError> {
    if s.is_empty() || s.len() > max || !s.bytes().all(ok) {
        return Err(invalid(
            field,
            format!("`{}` is not allowed: use 1 to {max} of {allowed}", s.escape_default()),
        ));
    }
    Ok(())
}

fn check_text(field: &str, s: Option<&str>) -> Result<(), ManifestError> {
    match s {
        Some(s) if s.len() > MAX_TEXT_BYTES => Err(invalid(field, format!("is {} bytes; the limit is {MAX_TEXT_BYTES}", s.len()))),
        Some(s) if s.contains('\0') => Err(invalid(field, "contains a NUL byte")),
        _ => Ok(()),
    }
}

impl Variant {
    fn validate(&self, i: usize) -> Result<(), ManifestError> {
        let f = |name: &str| format!("variants[{i}].{name}");
        check_variant_id(&f("id"), &self.id)?;

        // Platform constraints must make sense together.
        match (self.os, &self.libc) {
            (Os::Linux, None) => {
                return Err(invalid(
                    f("libc"),
                    "is required for Linux variants: e.g. libc = \"glibc 2.28\" or \"musl 1.2\"",
                ));
            }
            (Os::Linux, Some(_)) => {}
            (os, Some(_)) => return Err(invalid(f("libc"), format!("only applies to Linux variants; this one is for {os}"))),
            _ => {}
        }
        if self.macos_min.is_some() && self.os != Os::MacOs {
            return Err(invalid(
                f("macos-min"),
                format!("only applies to macOS variants; this one is for {}", self.os),
            ));
        }
        if self.cpu_level.is_some() && self.arch != CpuArch::X86_64 {
            return Err(invalid(
                f("cpu-level"),
                format!(
                    "x86-64 levels only apply to x86_64 variants; this one is for {}; use cpu-features",
                    self.arch
                ),
            ));
        }
        if self.cpu_features.len() > 256 {
            return Err(invalid(f("cpu-features"), "more than 256 entries"));
        }
        for feat in &self.cpu_features {
            check_name(
                &f("cpu-features"),
                feat,
                32,
                |b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_',
                "lowercase feature names such as avx512f or sve2",
            )?;
        }

        // Exactly the backend's own section, and no other.
        let sections = [
            (Backend::Cuda, self.cuda.is_some(), "cuda"),
            (Backend::Rocm, self.rocm.is_some(), "rocm"),
            (Backend::Metal, self.metal.is_some(), "metal"),
            (Backend::Xpu, self.xpu.is_some(), "xpu"),
        ];
        for (backend, present, key) in sections {
            if backend == self.backend && !present {
                return Err(invalid(f(key), format!("is required when backend = \"{backend}\"")));
            }
            if backend != self.backend && present {
                return Err(invalid(
                    f(key),
                    format!("does not apply to a {} variant; remove it or set backend = \"{key}\"", self.backend),
                ));
            }
        }
        if self.backend == Backend::Metal && self.os != Os::MacOs {
            return Err(invalid(f("os"), "Metal variants run on macOS only"));
        }
        if let Some(c) = &self.cuda {
            validate_cuda(c, &f("cuda"))?;
        }
        if let Some(r) = &self.rocm {
            if r.targets.is_empty() {
                return Err(invalid(
                    f("rocm.targets"),
                    "lists no code object; name at least one target id such as gfx942",
                ));
            }
            if r.targets.len() > 256 || r.compatible.len() > 64 {
                return Err(invalid(f("rocm"), "too many entries"));
            }
            let mut seen = BTreeSet::new();
            for (j, t) in r.targets.iter().enumerate() {
                if !seen.insert(t) {
                    return Err(invalid(format!("{}[{j}]", f("rocm.targets")), format!("`{t}` is listed twice")));
                }
            }
        }
        if let Some(m) = &self.metal
            && m.min_macos().is_none()
        {
            return Err(invalid(
                f("metal.language"),
                format!("Metal {} is unknown to this khub; known: 2.x, 3.0, 3.1, 3.2, 4.0, 4.1", m.language),
            ));
        }
        if let Some(x) = &self.xpu {
            if x.aot.is_empty() && !x.spirv {
                return Err(invalid(
                    f("xpu"),
                    "carries no device code: list aot IP versions or set spirv = true",
                ));
            }
            for (j, ip) in x.aot.iter().enumerate() {
                let parts: Vec<&str> = ip.split('.').collect();
                if parts.len() != 3
                    || parts
                        .iter()
                        .any(|p| p.is_empty() || p.len() > 4 || !p.bytes().all(|b| b.is_ascii_digit()))
                {
                    return Err(invalid(
                        format!("{}[{j}]", f("xpu.aot")),
                        format!(
                            "`{}` is not an IP version arch.release.revision such as 20.1.4",
                            ip.escape_default()
                        ),
                    ));
                }
            }
        }
        if self.priority.unsigned_abs() > 1_000_000 {
            return Err(invalid(f("priority"), "must be between -1000000 and 1000000"));
        }

        // Files: bounded, unique, sane sizes, and the library among them.
        if self.files.is_empty() {
            return Err(invalid(f("files"), "is empty; a variant has at least its library"));
        }
        if self.files.len() > MAX_FILES_PER_VARIANT {
            return Err(invalid(
                f("files"),
                format!("{} entries; the limit is {MAX_FILES_PER_VARIANT}", self.files.len()),
            ));
        }
        let mut paths = BTreeSet::new();
        for (j, file) in self.files.iter().enumerate() {
            if !paths.insert(&file.path) {
                return Err(invalid(
                    format!("{}[{j}].path", f("files")),
                    format!("`{}` is listed twice", file.path),
                ));
            }
            if file.size > MAX_FILE_SIZE {
                return Err(invalid(
                    format!("{}[{j}].size", f("files")),
                    format!("{} bytes is over the {MAX_FILE_SIZE}-byte limit for one file", file.size),
                ));
            }
        }
        if !paths.contains(&self.library) {
            return Err(invalid(
                f("library"),
                format!("`{}` is not one of the variant's files", self.library),
            ));
        }
        Ok(())
    }

    /// How many properties this variant constrains; more is more specific (compat-rules.md
    /// §7.3 rule 5).
    pub fn specificity(&self) -> u32 {
        let mut n = 0;
        n += u32::from(self.libc.is_some());
        n += u32::from(self.macos_min.is_some());
        n += u32::from(self.cpu_level.is_some());
        n += u32::from(!self.cpu_features.is_empty());
        n += u32::from(self.backend != Backend::Cpu);
        n
    }
}

fn validate_cuda(c: &CudaVariant, field: &str) -> Result<(), ManifestError> {
    if c.code.is_empty() {
        return Err(invalid(
            format!("{field}.code"),
            "lists no device code; name at least one of sm_XY[a|f] or compute_XY[a|f]",
        ));
    }
    if c.code.len() > 256 {
        return Err(invalid(format!("{field}.code"), "more than 256 entries"));
    }
    if c.toolkit.major < 9 || c.toolkit.major > 99 {
        return Err(invalid(
            format!("{field}.toolkit"),
            format!("CUDA {} is not a CUDA toolkit version", c.toolkit),
        ));
    }
    let mut seen = BTreeSet::new();
    for (j, a) in c.code.iter().enumerate() {
        let f = format!("{field}.code[{j}]");
        if !seen.insert(a) {
            return Err(invalid(f, format!("`{a}` is listed twice")));
        }
        // §1.1: arch-specific targets came with CUDA 12.0, family targets with 12.9.
        match a.set {
            CudaFeatureSet::ArchSpecific if c.toolkit < MajorMinor::new(12, 0) => {
                return Err(invalid(f, format!("`{a}` needs CUDA 12.0 or newer; toolkit is {}", c.toolkit)));
            }
            CudaFeatureSet::Family if c.toolkit < MajorMinor::new(12, 9) => {
                return Err(invalid(f, format!("`{a}` needs CUDA 12.9 or newer; toolkit is {}", c.toolkit)));
            }
            _ => {}
        }
        // §1.1: CUDA 13 dropped Maxwell, Pascal and Volta (compute capability below 7.5).
        if c.toolkit.major >= 13 && a.cc() < (7, 5) {
            return Err(invalid(
                f,
                format!(
                    "CUDA {} cannot build `{a}`: CUDA 13 dropped compute capabilities below 7.5",
                    c.toolkit
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const SMALL: &str = r#"
schema = "1.0"

[kernel]
name = "activation"
version = "0.1.0"
abi = 1

[[exports]]
name = "silu_and_mul"
signature = "status(tensor out, tensor in, stream)"

[[variants]]
id = "cuda128-x86_64-linux"
backend = "cuda"
os = "linux"
arch = "x86_64"
libc = "glibc 2.28"
library = "variants/cuda128/libactivation.so"
cuda = { toolkit = "12.8", cudart = "static", code = ["sm_80", "sm_90a", "compute_90"] }

[[variants.files]]
path = "variants/cuda128/libactivation.so"
size = 1024
sha256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
"#;

    fn with(find: &str, replace: &str) -> Result<Manifest, ManifestError> {
        assert!(SMALL.contains(find), "{find}");
        Manifest::from_toml_str(&SMALL.replacen(find, replace, 1))
    }

    fn err_text(r: Result<Manifest, ManifestError>) -> String {
        r.expect_err("should be refused").to_string()
    }

    #[test]
    fn parses_and_round_trips() {
        let m = Manifest::from_toml_str(SMALL).unwrap();
        assert_eq!(m.variants[0].cuda.as_ref().unwrap().code.len(), 3);
        let again = Manifest::from_toml_str(&m.to_toml_string().unwrap()).unwrap();
        assert_eq!(m, again);
    }

    #[test]
    fn hostile_paths_are_refused() {
        for (bad, needle) in [
            ("/etc/passwd", "absolute"),
            ("variants/../../x.so", "`..`"),
            ("variants\\\\x.so", "backslash"),
            ("variants/x\\u0000.so", "NUL"),
            ("C:/x.so", "colon"),
            ("variants//x.so", "empty component"),
            ("./x.so", "`.`"),
            ("", "empty"),
        ] {
            let text = SMALL.replace("path = \"variants/cuda128/libactivation.so\"", &format!("path = \"{bad}\""));
            let e = err_text(Manifest::from_toml_str(&text));
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn duplicate_variant_ids_are_refused() {
        let (head, variant) = SMALL.split_at(SMALL.find("[[variants]]").unwrap());
        let text = format!("{head}{variant}{variant}");
        let e = err_text(Manifest::from_toml_str(&text));
        assert!(e.contains("variants[1].id") && e.contains("unique"), "{e}");
    }

    /// The shortcut for a leading `schema = "X.Y"` line agrees with the full parse, and
    /// declines everything it cannot read for certain.
    #[test]
    fn the_leading_schema_line_shortcut_agrees_with_the_full_parse() {
        for (text, want) in [
            ("schema = \"1.0\"\n[kernel]\n", Some("1.0")),
            ("# comment\n\n  schema=\"1.3\"   # trailing\nx = 1\n", Some("1.3")),
            ("schema = \"2.0\"\n", Some("2.0")),
            ("\"schema\" = \"1.0\"\n", None),
            ("schema = '1.0'\n", None),
            ("schema = \"1.0\" x\n", None),
            ("schema = \"1\\u002e0\"\n", None),
            ("schema.x = 1\n", None),
            ("[kernel]\nschema = \"1.0\"\n", None),
            ("name = \"\"\"\nschema = \"1.0\"\n\"\"\"\nschema = \"2.0\"\n", None),
        ] {
            assert_eq!(leading_schema(text), want, "{text:?}");
            if let Some(v) = want {
                let head: toml::Table = toml::from_str(text).unwrap();
                assert_eq!(head["schema"].as_str(), Some(v), "{text:?}");
            }
        }
        // A second `schema` key after the shortcut's line is still a syntax error.
        assert!(Manifest::from_toml_str(&format!("{SMALL}\nschema = \"2.0\"\n")).is_err());
    }

    #[test]
    fn schema_versions_are_checked() {
        assert!(matches!(
            with("schema = \"1.0\"", "schema = \"2.0\""),
            Err(ManifestError::UnsupportedSchema { .. })
        ));
        assert!(err_text(with("schema = \"1.0\"", "schema = \"one\"")).contains("MAJOR.MINOR"));
        assert!(err_text(with("schema = \"1.0\"", "")).contains("missing"));
        // A known minor is strict about unknown keys, a newer one is not.
        let e = err_text(with("abi = 1", "abi = 1\nflavour = \"x\""));
        assert!(e.contains("kernel.flavour"), "{e}");
        let newer = SMALL
            .replace("schema = \"1.0\"", "schema = \"1.7\"")
            .replace("abi = 1", "abi = 1\nflavour = \"x\"");
        assert!(Manifest::from_toml_str(&newer).is_ok());
    }

    #[test]
    fn absurd_sizes_and_documents_are_refused() {
        assert!(err_text(with("size = 1024", "size = 99999999999999")).contains("limit"));
        assert!(err_text(with("size = 1024", "size = -1")).contains("size"));
        let deep = format!("schema = \"1.0\"\nx = {}{}", "[".repeat(5000), "]".repeat(5000));
        assert!(matches!(Manifest::from_toml_str(&deep), Err(ManifestError::TooDeep { .. })));
        let inline = format!("schema = \"1.0\"\nx = {}1{}", "{a=".repeat(100), "}".repeat(100));
        assert!(matches!(Manifest::from_toml_str(&inline), Err(ManifestError::TooDeep { .. })));
        let huge = vec![b'#'; MAX_MANIFEST_BYTES + 1];
        assert!(matches!(Manifest::from_bytes(&huge), Err(ManifestError::TooLarge { .. })));
        assert!(matches!(
            Manifest::from_bytes(b"schema = \"1.0\"\n\xff"),
            Err(ManifestError::NotUtf8 { .. })
        ));
        // Brackets inside strings and comments do not count.
        let quoted = SMALL.replace(
            "abi = 1",
            &format!("abi = 1\ndescription = \"{}\" # {}", "[".repeat(100), "{".repeat(100)),
        );
        assert!(Manifest::from_toml_str(&quoted).is_ok());
    }

    #[test]
    fn field_rules_name_the_field() {
        let cases = [
            (
                "code = [\"sm_80\", \"sm_90a\", \"compute_90\"]",
                "code = []",
                "variants[0].cuda.code",
            ),
            ("\"sm_90a\", \"compute_90\"", "\"sm_100f\", \"compute_90\"", "12.9"),
            ("\"sm_90a\", \"compute_90\"", "\"sm_90a\", \"sm_90a\"", "twice"),
            ("sha256 = \"e3b0", "sha256 = \"E3B0", "sha256"),
            (
                "library = \"variants/cuda128/libactivation.so\"",
                "library = \"variants/other.so\"",
                "variants[0].library",
            ),
            ("libc = \"glibc 2.28\"\n", "", "variants[0].libc"),
            ("backend = \"cuda\"", "backend = \"rocm\"", "does not apply to a rocm variant"),
            ("backend = \"cuda\"", "backend = \"opencl\"", "backend"),
            ("name = \"activation\"", "name = \"Activation!\"", "kernel.name"),
            ("id = \"cuda128-x86_64-linux\"", "id = \"..\"", "`..` is not allowed"),
            ("id = \"cuda128-x86_64-linux\"", "id = \".\"", "`.` is not allowed"),
            ("name = \"silu_and_mul\"", "name = \"9lives\"", "exports[0].name"),
            ("abi = 1", "abi = 0", "kernel.abi"),
            ("version = \"0.1.0\"", "version = \"one\"", "version"),
            ("arch = \"x86_64\"", "arch = \"x86_64\"\ncpu-level = \"x86-64-v9\"", "x86-64 level"),
            ("toolkit = \"12.8\"", "toolkit = \"7.0\"", "toolkit"),
        ];
        for (find, replace, needle) in cases {
            let e = err_text(with(find, replace));
            assert!(e.contains(needle), "{replace}: {e}");
        }
    }

    #[test]
    fn cuda13_cannot_carry_volta() {
        let e = err_text(with(
            "toolkit = \"12.8\", cudart = \"static\", code = [\"sm_80\"",
            "toolkit = \"13.0\", cudart = \"static\", code = [\"sm_70\"",
        ));
        assert!(e.contains("7.5"), "{e}");
    }
}
