//! Release signatures: Ed25519 in minisign's format, so that the `minisign` command-line
//! tool and khub make and check each other's keys and signatures byte for byte.
//!
//! A release is signed over the exact bytes of its manifest (`khub.toml`); the signature
//! lives beside it as [`SIGNATURE_FILE`]. The signature's *trusted comment*, which minisign
//! covers with a second ("global") signature, carries a [`ReleaseClaim`]: the repository,
//! version, signing time and expiry of the release. The claim is what stops a valid
//! signature of one release from being replayed for another, and an old one from being
//! served forever (see [`crate::verify::trust`], which decides what to accept).
//!
//! # Formats
//!
//! ```text
//! public key (.pub)   untrusted comment: minisign public key <KEY ID>
//!                     base64("Ed" ‖ key id (8 bytes, little-endian) ‖ Ed25519 public key (32))
//! secret key          untrusted comment: …
//!                     base64("Ed" ‖ kdf "Sc"|"\0\0" ‖ "B2" ‖ salt (32) ‖ opslimit (8) ‖ memlimit (8)
//!                            ‖ key id (8) ‖ Ed25519 secret key (64) ‖ BLAKE2b checksum (32)),
//!                     the last three XORed with an scrypt stream when encrypted
//! signature (.minisig) untrusted comment: …
//!                     base64("ED"|"Ed" ‖ key id (8) ‖ signature (64))
//!                     trusted comment: <text>
//!                     base64(signature over (signature ‖ text))
//! ```
//!
//! `"ED"` signatures sign the BLAKE2b-512 hash of the data (minisign's default since 0.10,
//! and what [`sign`] makes); legacy `"Ed"` signatures sign the data itself and are still
//! accepted by [`verify`].
//!
//! The cryptography is the `minisign` crate's. This module adds a strict parser in front
//! of it, since the crate panics or prompts on some inputs: every key and signature is
//! checked here for size (at most [`MAX_FILE_BYTES`]), encoding and exact lengths first,
//! so hostile input is an error, never a panic or a password prompt.

use std::fmt;
use std::fs::File;
use std::io::{self, Cursor, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::ids::RepoId;

/// The name of a release's signature file, beside its manifest.
pub const SIGNATURE_FILE: &str = "khub.toml.minisig";

/// The largest key or signature file khub reads. Real ones are a few hundred bytes.
pub const MAX_FILE_BYTES: usize = 64 * 1024;

/// The first word of every khub trusted comment.
const CLAIM_TAG: &str = "khub-release";

const UNTRUSTED_PREFIX: &str = "untrusted comment: ";
const TRUSTED_PREFIX: &str = "trusted comment: ";
const SIGNATURE_UNTRUSTED_COMMENT: &str = "signature from khub secret key";

/// Algorithm tags, as minisign writes them.
const ALG_ED25519: [u8; 2] = *b"Ed";
const ALG_PREHASHED: [u8; 2] = *b"ED";
const KDF_SCRYPT: [u8; 2] = *b"Sc";
const KDF_NONE: [u8; 2] = [0, 0];
const CHK_BLAKE2B: [u8; 2] = *b"B2";

/// Decoded sizes: public key, secret key, signature line, global signature.
const PUBLIC_KEY_BYTES: usize = 2 + 8 + 32;
const SECRET_KEY_BYTES: usize = 2 + 2 + 2 + 32 + 8 + 8 + 8 + 64 + 32;
const SIGNATURE_BYTES: usize = 2 + 8 + 64;
const GLOBAL_SIGNATURE_BYTES: usize = 64;

/// Bounds on the scrypt parameters of an encrypted secret key. minisign's own keys use
/// opslimit 2^25 and memlimit 2^30 (1 GiB); anything above these bounds would only make
/// reading the key take minutes or exhaust memory.
const MAX_KDF_OPSLIMIT: u64 = 1 << 30;
const MAX_KDF_MEMLIMIT: u64 = 1 << 30;

/// A key or signature could not be read, made or checked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignError {
    /// A key file could not be read.
    #[error("cannot read key file {}: {source}; check the path and its permissions", path.display())]
    ReadKey {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A key or signature is not in minisign's format.
    #[error("{what}{} is malformed: {reason}", from_path(path.as_deref()))]
    Malformed {
        /// What was being read: `"public key"`, `"secret key"` or `"signature"`.
        what: &'static str,
        /// The file it came from, when it came from one.
        path: Option<PathBuf>,
        /// What is wrong with it.
        reason: String,
    },
    /// The secret key is encrypted, and no password was given.
    #[error(
        "the secret key{} is encrypted: give its password (set KHUB_SIGNING_PASSWORD for the khub CLI)",
        from_path(path.as_deref())
    )]
    PasswordRequired {
        /// The key file, when the key came from one.
        path: Option<PathBuf>,
    },
    /// The password does not decrypt the secret key.
    #[error("wrong password for the secret key{}: check KHUB_SIGNING_PASSWORD or the password given", from_path(path.as_deref()))]
    WrongPassword {
        /// The key file, when the key came from one.
        path: Option<PathBuf>,
    },
    /// The signature does not match the data under this key.
    #[error("the signature does not match these bytes: the manifest was changed after signing, or signed by another key (key {key_id})")]
    BadSignature {
        /// The key id the signature names.
        key_id: String,
    },
    /// The signature matches the data, but its global signature does not cover the trusted
    /// comment in the file: somebody edited the trusted comment after signing.
    #[error(
        "the trusted comment of the signature (key {key_id}) was changed after signing: the global signature does not match it; get the signature file again, or re-sign the release"
    )]
    BadCommentSignature {
        /// The key id the signature names.
        key_id: String,
    },
    /// The signature was made with a different key than the one given.
    #[error("the signature was made with key {signature}, not with the given key {key}; verify it with the public key {signature}")]
    KeyIdMismatch {
        /// The key id in the signature.
        signature: String,
        /// The key id of the public key given.
        key: String,
    },
    /// The trusted comment is not a khub release claim.
    #[error(
        "the trusted comment {comment:?} is not a khub release claim ({reason}); expected `{CLAIM_TAG} repo=<org/name> version=<semver> timestamp=<unix seconds> expires=<unix seconds|never>`; re-sign with `khub sign`"
    )]
    TrustedComment {
        /// The comment (at most 200 characters of it).
        comment: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Making a key or a signature failed (the random source, or the self-check after
    /// signing).
    #[error("cannot {what}: {message}")]
    Crypto {
        /// What was being done (`"generate a key pair"`).
        what: &'static str,
        /// The underlying error.
        message: String,
    },
}

fn from_path(path: Option<&Path>) -> String {
    path.map(|p| format!(" in {}", p.display())).unwrap_or_default()
}

fn malformed(what: &'static str, path: Option<&Path>, reason: impl Into<String>) -> SignError {
    SignError::Malformed {
        what,
        path: path.map(Path::to_path_buf),
        reason: reason.into(),
    }
}

/// A key id as minisign prints it: the 8 id bytes read as a little-endian integer, in
/// 16 upper-case hex digits.
fn key_id_hex(keynum: &[u8]) -> String {
    let mut le = [0u8; 8];
    for (dst, src) in le.iter_mut().zip(keynum) {
        *dst = *src;
    }
    format!("{:016X}", u64::from_le_bytes(le))
}

/// Decodes one base64 line that must hold exactly `len` bytes.
fn decode_exact(what: &'static str, path: Option<&Path>, field: &str, line: &str, len: usize) -> Result<Vec<u8>, SignError> {
    let bytes = BASE64
        .decode(line.trim())
        .map_err(|e| malformed(what, path, format!("the {field} is not valid base64 ({e})")))?;
    if bytes.len() != len {
        return Err(malformed(
            what,
            path,
            format!(
                "the {field} decodes to {} bytes, expected {len} (truncated or not a minisign file)",
                bytes.len()
            ),
        ));
    }
    Ok(bytes)
}

/// The non-empty lines of a small text file, each without its line ending.
fn text_lines<'a>(what: &'static str, path: Option<&Path>, bytes: &'a [u8]) -> Result<Vec<&'a str>, SignError> {
    if bytes.len() > MAX_FILE_BYTES {
        return Err(malformed(
            what,
            path,
            format!("it is {} bytes, more than the {MAX_FILE_BYTES} allowed", bytes.len()),
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| malformed(what, path, "it is not UTF-8 text"))?;
    Ok(text.lines().filter(|l| !l.trim().is_empty()).collect())
}

/// Reads at most [`MAX_FILE_BYTES`] + 1 bytes of a key file, so that a huge file (or a
/// device) is refused without being read whole.
fn read_small(path: &Path) -> Result<Vec<u8>, SignError> {
    let io_err = |source| SignError::ReadKey {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let mut buf = Vec::new();
    file.take(MAX_FILE_BYTES as u64 + 1).read_to_end(&mut buf).map_err(io_err)?;
    Ok(buf)
}

/// An Ed25519 public key in minisign's format, which verifies release signatures.
///
/// Parses ([`FromStr`]) from the base64 line (`RW…`) or a whole `.pub` file, and prints
/// ([`fmt::Display`]) the base64 line. Two keys are equal when their id and key bytes are.
#[derive(Clone)]
pub struct PublicKey {
    inner: minisign::PublicKey,
    /// The 42 decoded bytes: algorithm, key id, key.
    raw: [u8; PUBLIC_KEY_BYTES],
}

impl PublicKey {
    /// The key id, as minisign prints it (`86E862F5948A3EC5`).
    pub fn key_id(&self) -> String {
        key_id_hex(&self.raw[2..10])
    }

    /// The text of a `.pub` file for this key, as `minisign -G` writes it.
    pub fn to_file_text(&self) -> String {
        format!("{UNTRUSTED_PREFIX}minisign public key {}\n{self}\n", self.key_id())
    }

    fn parse(text: &str, path: Option<&Path>) -> Result<Self, SignError> {
        const WHAT: &str = "public key";
        let lines = text_lines(WHAT, path, text.as_bytes())?;
        let line = match lines.as_slice() {
            [line] if !line.starts_with(UNTRUSTED_PREFIX.trim_end()) => *line,
            [comment, line] if comment.starts_with(UNTRUSTED_PREFIX.trim_end()) => *line,
            [] => return Err(malformed(WHAT, path, "it is empty")),
            _ => {
                return Err(malformed(
                    WHAT,
                    path,
                    "expected a base64 key line (RW…), or an `untrusted comment:` line followed by one",
                ));
            }
        };
        let bytes = decode_exact(WHAT, path, "key", line, PUBLIC_KEY_BYTES)?;
        Self::from_raw(&bytes).map_err(|reason| malformed(WHAT, path, reason))
    }

    fn from_raw(bytes: &[u8]) -> Result<Self, String> {
        let raw: [u8; PUBLIC_KEY_BYTES] = bytes
            .try_into()
            .map_err(|_| format!("{} bytes, expected {PUBLIC_KEY_BYTES}", bytes.len()))?;
        if raw[..2] != ALG_ED25519 {
            return Err(format!(
                "unknown key algorithm {:?}, expected \"Ed\" (Ed25519)",
                String::from_utf8_lossy(&raw[..2])
            ));
        }
        let inner = minisign::PublicKey::from_bytes(&raw).map_err(|e| e.to_string())?;
        Ok(PublicKey { inner, raw })
    }
}

impl FromStr for PublicKey {
    type Err = SignError;
    fn from_str(s: &str) -> Result<Self, SignError> {
        Self::parse(s, None)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE64.encode(self.raw))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({} {self})", self.key_id())
    }
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}

impl Eq for PublicKey {}

impl std::hash::Hash for PublicKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.raw.hash(state);
    }
}

/// A decrypted Ed25519 secret key in minisign's format, which signs releases.
///
/// Its `Debug` output names the key id only, never the key.
#[derive(Clone)]
pub struct SecretKey {
    inner: minisign::SecretKey,
}

impl SecretKey {
    /// Parses the text of a secret key file, decrypting it with `password` when it is
    /// encrypted; the password is ignored for an unencrypted key.
    ///
    /// Reads keys made by `minisign -G` (encrypted with scrypt), `minisign -G -W`
    /// (unencrypted) and [`keygen`]. Never prompts: an encrypted key without a password is
    /// [`SignError::PasswordRequired`].
    pub fn parse(text: &str, password: Option<&str>) -> Result<Self, SignError> {
        Self::parse_from(text.as_bytes(), password, None)
    }

    /// The key id, as minisign prints it.
    pub fn key_id(&self) -> String {
        key_id_hex(self.inner.keynum())
    }

    /// The public key that goes with this secret key.
    pub fn public_key(&self) -> Result<PublicKey, SignError> {
        let pk = minisign::PublicKey::from_secret_key(&self.inner).map_err(|e| malformed("secret key", None, e.to_string()))?;
        PublicKey::from_raw(&pk.to_bytes()).map_err(|reason| malformed("secret key", None, reason))
    }

    fn parse_from(bytes: &[u8], password: Option<&str>, path: Option<&Path>) -> Result<Self, SignError> {
        const WHAT: &str = "secret key";
        let lines = text_lines(WHAT, path, bytes)?;
        let [comment, line] = lines.as_slice() else {
            return Err(malformed(
                WHAT,
                path,
                "expected an `untrusted comment:` line followed by a base64 key line",
            ));
        };
        if !comment.starts_with(UNTRUSTED_PREFIX.trim_end()) {
            return Err(malformed(WHAT, path, "the first line does not start with `untrusted comment:`"));
        }
        let raw = decode_exact(WHAT, path, "key", line, SECRET_KEY_BYTES)?;
        if raw[0..2] != ALG_ED25519 {
            return Err(malformed(WHAT, path, "unknown key algorithm, expected \"Ed\" (Ed25519)"));
        }
        if raw[4..6] != CHK_BLAKE2B {
            return Err(malformed(WHAT, path, "unknown checksum algorithm, expected \"B2\" (BLAKE2b)"));
        }
        let kdf: [u8; 2] = [raw[2], raw[3]];
        let inner = if kdf == KDF_NONE {
            // Decoded directly rather than through the crate's box reader: `minisign -G -W`
            // leaves the checksum of unencrypted keys zero, which that reader rejects as
            // corrupt. The self-check below catches a damaged key instead.
            minisign::SecretKey::from_bytes(&raw).map_err(|e| malformed(WHAT, path, e.to_string()))?
        } else if kdf == KDF_SCRYPT {
            let Some(password) = password else {
                return Err(SignError::PasswordRequired {
                    path: path.map(Path::to_path_buf),
                });
            };
            let le = |r: std::ops::Range<usize>| {
                raw.get(r)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_le_bytes)
                    .unwrap_or(u64::MAX)
            };
            let (opslimit, memlimit) = (le(38..46), le(46..54));
            if opslimit > MAX_KDF_OPSLIMIT || memlimit > MAX_KDF_MEMLIMIT {
                return Err(malformed(
                    WHAT,
                    path,
                    format!("its scrypt parameters (opslimit {opslimit}, memlimit {memlimit}) exceed the 2^30 khub allows"),
                ));
            }
            // A canonical box, so the crate reads exactly the bytes checked above.
            let text = format!("{UNTRUSTED_PREFIX}key\n{}\n", BASE64.encode(&raw));
            let sk_box = minisign::SecretKeyBox::from_string(&text).map_err(|e| malformed(WHAT, path, e.to_string()))?;
            minisign::SecretKey::from_box(sk_box, Some(password.to_owned())).map_err(|e| match e.kind() {
                // The only check after decryption is the checksum: a mismatch means the
                // password is wrong (or the key is damaged, which looks the same).
                minisign::ErrorKind::Verify => SignError::WrongPassword {
                    path: path.map(Path::to_path_buf),
                },
                _ => malformed(WHAT, path, e.to_string()),
            })?
        } else {
            return Err(malformed(WHAT, path, "unknown key derivation, expected scrypt (\"Sc\") or none"));
        };
        let sk = SecretKey { inner };
        sk.self_check()
            .map_err(|_| malformed(WHAT, path, "its public half does not match its secret half (damaged key)"))?;
        Ok(sk)
    }

    /// Signs a fixed message and checks it with the derived public key: proves the key is
    /// whole before it signs a release.
    fn self_check(&self) -> Result<(), SignError> {
        let pk = self.public_key()?;
        minisign::sign(
            Some(&pk.inner),
            &self.inner,
            Cursor::new(b"khub key self-check"),
            Some("check"),
            None,
        )
        .map(|_| ())
        .map_err(|e| SignError::Crypto {
            what: "check the secret key",
            message: e.to_string(),
        })
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.key_id())
    }
}

/// Generates a key pair and returns the text of its public key file and secret key file.
///
/// With a password, the secret key is encrypted with scrypt as `minisign -G` does (with
/// the `minisign` crate's parameters: 32 MiB, which the CLI reads as well); without one it
/// is stored unencrypted, like `minisign -G -W`.
pub fn keygen(password: Option<&str>) -> Result<(String, String), SignError> {
    let crypto = |e: minisign::PError| SignError::Crypto {
        what: "generate a key pair",
        message: e.to_string(),
    };
    let (pair, comment) = match password {
        None => (
            minisign::KeyPair::generate_unencrypted_keypair().map_err(crypto)?,
            "minisign unencrypted secret key",
        ),
        Some(pw) => (
            minisign::KeyPair::generate_encrypted_keypair(Some(pw.to_owned())).map_err(crypto)?,
            "minisign encrypted secret key",
        ),
    };
    let pk = PublicKey::from_raw(&pair.pk.to_bytes()).map_err(|message| SignError::Crypto {
        what: "generate a key pair",
        message,
    })?;
    let sk_text = pair.sk.to_box(Some(comment)).map_err(crypto)?.into_string();
    Ok((pk.to_file_text(), sk_text))
}

/// Reads a public key file (`.pub`, or a file holding just the base64 line).
pub fn read_public_key(path: &Path) -> Result<PublicKey, SignError> {
    let bytes = read_small(path)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| malformed("public key", Some(path), "it is not UTF-8 text"))?;
    PublicKey::parse(text, Some(path))
}

/// Reads a secret key file, decrypting it with `password` when it is encrypted.
///
/// See [`SecretKey::parse`] for what is accepted.
pub fn read_secret_key(path: &Path, password: Option<&str>) -> Result<SecretKey, SignError> {
    let bytes = read_small(path)?;
    SecretKey::parse_from(&bytes, password, Some(path))
}

/// What a release signature claims, carried in its trusted comment.
///
/// Printed and parsed as
/// `khub-release repo=<org/name> version=<semver> timestamp=<unix> expires=<unix|never>`.
/// Parsing is strict: exactly these fields, in this order, single spaces, canonical
/// numbers and versions; anything else is [`SignError::TrustedComment`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseClaim {
    /// The repository the release belongs to.
    pub repo: RepoId,
    /// The release's version.
    pub version: semver::Version,
    /// When it was signed, in seconds since the Unix epoch.
    pub timestamp: u64,
    /// When the signature stops being accepted, in seconds since the Unix epoch; `None`
    /// for never. An expiry bounds how long a stale release can be served (freeze attack).
    pub expires: Option<u64>,
}

impl fmt::Display for ReleaseClaim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{CLAIM_TAG} repo={} version={} timestamp={} expires=",
            self.repo, self.version, self.timestamp
        )?;
        match self.expires {
            Some(t) => write!(f, "{t}"),
            None => f.write_str("never"),
        }
    }
}

impl FromStr for ReleaseClaim {
    type Err = SignError;
    fn from_str(s: &str) -> Result<Self, SignError> {
        let err = |reason: String| SignError::TrustedComment {
            comment: s.chars().take(200).collect(),
            reason,
        };
        let parts: Vec<&str> = s.split(' ').collect();
        let [tag, repo, version, timestamp, expires] = parts.as_slice() else {
            return Err(err(format!("{} space-separated fields, expected 5", parts.len())));
        };
        if *tag != CLAIM_TAG {
            return Err(err(format!("it does not start with `{CLAIM_TAG}`")));
        }
        let value = |part: &str, key: &str| -> Result<String, SignError> {
            part.strip_prefix(key)
                .and_then(|rest| rest.strip_prefix('='))
                .map(str::to_owned)
                .ok_or_else(|| err(format!("expected `{key}=…`, found `{part}`")))
        };
        let repo: RepoId = value(repo, "repo")?
            .parse()
            .map_err(|e: crate::ids::RepoIdError| err(e.to_string()))?;
        let version = semver::Version::parse(&value(version, "version")?).map_err(|e| err(format!("bad version: {e}")))?;
        let number = |key: &str, v: String| -> Result<u64, SignError> {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err(format!("`{key}` must be a number of seconds, found `{v}`")));
            }
            v.parse().map_err(|_| err(format!("`{key}` is out of range: `{v}`")))
        };
        let timestamp = number("timestamp", value(timestamp, "timestamp")?)?;
        let expires = match value(expires, "expires")?.as_str() {
            "never" => None,
            v => Some(number("expires", v.to_owned())?),
        };
        let claim = ReleaseClaim {
            repo,
            version,
            timestamp,
            expires,
        };
        // Round-trip: one claim has exactly one spelling (no leading zeros, no `+` signs).
        if claim.to_string() != s {
            return Err(err(format!("not in canonical form, expected `{claim}`")));
        }
        Ok(claim)
    }
}

/// A signature that [`verify`] accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSignature {
    /// The id of the key that made it.
    pub key_id: String,
    /// Its trusted comment, covered by the global signature. Parse it with
    /// [`ReleaseClaim::from_str`] before relying on it.
    pub trusted_comment: String,
}

/// Signs `data` (a release manifest) with `sk`, putting `claim` in the trusted comment.
///
/// Returns the text of the `.minisig` file: a prehashed (`ED`) signature, as `minisign -S`
/// makes by default, which `minisign -V` accepts.
pub fn sign(sk: &SecretKey, data: &[u8], claim: &ReleaseClaim) -> Result<String, SignError> {
    let pk = sk.public_key()?;
    let trusted = claim.to_string();
    let sig = minisign::sign(
        Some(&pk.inner),
        &sk.inner,
        Cursor::new(data),
        Some(&trusted),
        Some(SIGNATURE_UNTRUSTED_COMMENT),
    )
    .map_err(|e| SignError::Crypto {
        what: "sign",
        message: e.to_string(),
    })?;
    Ok(sig.into_string())
}

/// A `.minisig` file, checked for shape and exact lengths.
struct ParsedSignature {
    key_id: String,
    /// The trusted comment, as written (unverified).
    trusted_comment: String,
    /// The file rewritten from the checked parts: four lines, base64 re-encoded. The
    /// crate's parser sees only this, so it cannot read a line the checks skipped (a
    /// blank line would shift its lines, and an empty global signature makes its verifier
    /// panic).
    canonical: String,
}

fn parse_signature(minisig: &[u8]) -> Result<ParsedSignature, SignError> {
    const WHAT: &str = "signature";
    let lines = text_lines(WHAT, None, minisig)?;
    let [untrusted, sig, trusted, global] = lines.as_slice() else {
        return Err(malformed(
            WHAT,
            None,
            format!(
                "{} non-empty lines, expected 4 (untrusted comment, signature, trusted comment, global signature)",
                lines.len()
            ),
        ));
    };
    if !untrusted.starts_with(UNTRUSTED_PREFIX) {
        return Err(malformed(WHAT, None, "the first line does not start with `untrusted comment: `"));
    }
    if !trusted.starts_with(TRUSTED_PREFIX) {
        return Err(malformed(WHAT, None, "the third line does not start with `trusted comment: `"));
    }
    let sig = decode_exact(WHAT, None, "signature line", sig, SIGNATURE_BYTES)?;
    if sig[..2] != ALG_PREHASHED && sig[..2] != ALG_ED25519 {
        return Err(malformed(
            WHAT,
            None,
            "unknown signature algorithm, expected \"ED\" (prehashed) or \"Ed\" (legacy)",
        ));
    }
    let global = decode_exact(WHAT, None, "global signature", global, GLOBAL_SIGNATURE_BYTES)?;
    Ok(ParsedSignature {
        trusted_comment: trusted[TRUSTED_PREFIX.len()..].to_owned(),
        key_id: key_id_hex(&sig[2..10]),
        canonical: format!("{untrusted}\n{}\n{trusted}\n{}\n", BASE64.encode(&sig), BASE64.encode(&global)),
    })
}

/// The id of the key that made a signature, read without verifying it: use it to pick
/// the key to verify with.
///
/// The id is only a hint: it authorizes nothing until [`verify`] succeeds.
pub fn signature_key_id(minisig: &[u8]) -> Result<String, SignError> {
    parse_signature(minisig).map(|p| p.key_id)
}

/// The trusted comment of a signature, read without verifying it: for a release that has
/// no repository of its own (a local directory), the release it claims to be, whose keys
/// then verify it. Authorizes nothing until [`verify`] succeeds.
pub fn unverified_trusted_comment(minisig: &[u8]) -> Result<String, SignError> {
    parse_signature(minisig).map(|p| p.trusted_comment)
}

/// Verifies a `.minisig` signature of `data` with `pk`: the signature over the data and the
/// global signature over the trusted comment.
///
/// Accepts prehashed (`ED`) signatures, which minisign ≥ 0.10 makes by default, and legacy
/// (`Ed`) ones. The trusted comment is returned as text; parse it with
/// [`ReleaseClaim::from_str`] before relying on it.
pub fn verify(pk: &PublicKey, data: &[u8], minisig: &[u8]) -> Result<VerifiedSignature, SignError> {
    let parsed = parse_signature(minisig)?;
    if parsed.key_id != pk.key_id() {
        return Err(SignError::KeyIdMismatch {
            signature: parsed.key_id,
            key: pk.key_id(),
        });
    }
    // `parse_signature` has checked UTF-8, the four lines and every length, which keeps the
    // crate's parser and verifier off the inputs that would make them panic.
    let sig_box = minisign::SignatureBox::from_string(&parsed.canonical).map_err(|e| malformed("signature", None, e.to_string()))?;
    let check = |b: &minisign::SignatureBox| minisign::verify(&pk.inner, b, Cursor::new(data), true, false, true);
    if check(&sig_box).is_err() {
        // Tell a changed manifest from an edited trusted comment: check the data signature
        // alone (a box without comment and global signature).
        let bare: minisign::SignatureBox = minisign::SignatureBones::from(sig_box.clone()).into();
        return Err(if check(&bare).is_ok() {
            SignError::BadCommentSignature { key_id: parsed.key_id }
        } else {
            SignError::BadSignature { key_id: parsed.key_id }
        });
    }
    let trusted_comment = sig_box.trusted_comment().map_err(|e| malformed("signature", None, e.to_string()))?;
    Ok(VerifiedSignature {
        key_id: parsed.key_id,
        trusted_comment,
    })
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests write scratch files directly
mod tests {
    use super::*;

    fn claim() -> ReleaseClaim {
        ReleaseClaim {
            repo: "acme/activation".parse().unwrap(),
            version: semver::Version::parse("1.2.3").unwrap(),
            timestamp: 1_700_000_000,
            expires: Some(1_800_000_000),
        }
    }

    fn keys() -> (PublicKey, SecretKey) {
        let (pk, sk) = keygen(None).unwrap();
        (pk.parse().unwrap(), SecretKey::parse(&sk, None).unwrap())
    }

    #[test]
    fn round_trip_unencrypted() {
        let (pk, sk) = keys();
        assert_eq!(pk.key_id(), sk.key_id());
        assert_eq!(sk.public_key().unwrap(), pk);
        let sig = sign(&sk, b"manifest bytes", &claim()).unwrap();
        assert_eq!(signature_key_id(sig.as_bytes()).unwrap(), pk.key_id());
        let v = verify(&pk, b"manifest bytes", sig.as_bytes()).unwrap();
        assert_eq!(v.key_id, pk.key_id());
        assert_eq!(v.trusted_comment.parse::<ReleaseClaim>().unwrap(), claim());
        // Prehashed, as minisign makes by default.
        assert!(sig.lines().nth(1).unwrap().starts_with("RU"), "{sig}");
    }

    #[test]
    fn round_trip_encrypted() {
        let (pk_text, sk_text) = keygen(Some("correct horse")).unwrap();
        let pk: PublicKey = pk_text.parse().unwrap();
        assert!(matches!(SecretKey::parse(&sk_text, None), Err(SignError::PasswordRequired { .. })));
        assert!(matches!(
            SecretKey::parse(&sk_text, Some("wrong")),
            Err(SignError::WrongPassword { .. })
        ));
        let sk = SecretKey::parse(&sk_text, Some("correct horse")).unwrap();
        let sig = sign(&sk, b"data", &claim()).unwrap();
        verify(&pk, b"data", sig.as_bytes()).unwrap();
    }

    #[test]
    fn key_files_round_trip_through_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (pk_text, sk_text) = keygen(None).unwrap();
        assert!(pk_text.starts_with("untrusted comment: minisign public key "), "{pk_text}");
        std::fs::write(dir.path().join("k.pub"), &pk_text).unwrap();
        std::fs::write(dir.path().join("k.key"), &sk_text).unwrap();
        let pk = read_public_key(&dir.path().join("k.pub")).unwrap();
        let sk = read_secret_key(&dir.path().join("k.key"), None).unwrap();
        assert_eq!(pk.to_file_text(), pk_text);
        // The base64 line alone parses to the same key, and Display prints it.
        let line = pk_text.lines().nth(1).unwrap();
        assert_eq!(line.parse::<PublicKey>().unwrap(), pk);
        assert_eq!(pk.to_string(), line);
        assert_eq!(format!("{sk:?}"), format!("SecretKey({})", pk.key_id()));
        let e = read_public_key(&dir.path().join("missing.pub")).unwrap_err();
        assert!(
            matches!(e, SignError::ReadKey { .. }) && e.to_string().contains("missing.pub"),
            "{e}"
        );
    }

    #[test]
    fn wrong_key_is_a_key_id_mismatch() {
        let (_, sk) = keys();
        let (other, _) = keys();
        let sig = sign(&sk, b"data", &claim()).unwrap();
        let e = verify(&other, b"data", sig.as_bytes()).unwrap_err();
        assert!(matches!(e, SignError::KeyIdMismatch { .. }), "{e}");
    }

    #[test]
    fn same_key_id_other_key_does_not_verify() {
        // A key that claims the signer's id but holds other key bytes: the id is only a hint.
        let (pk, sk) = keys();
        let (other, _) = keys();
        let mut raw = other.raw;
        raw[2..10].copy_from_slice(&pk.raw[2..10]);
        let impostor = PublicKey::from_raw(&raw).unwrap();
        let sig = sign(&sk, b"data", &claim()).unwrap();
        let e = verify(&impostor, b"data", sig.as_bytes()).unwrap_err();
        assert!(matches!(e, SignError::BadSignature { .. }), "{e}");
    }

    #[test]
    fn one_changed_byte_fails() {
        let (pk, sk) = keys();
        let data = b"[kernel]\nname = \"x\"\n".to_vec();
        let sig = sign(&sk, &data, &claim()).unwrap();
        for i in 0..data.len() {
            let mut d = data.clone();
            d[i] ^= 1;
            let e = verify(&pk, &d, sig.as_bytes()).unwrap_err();
            assert!(matches!(e, SignError::BadSignature { .. }), "{e}");
            assert!(e.to_string().contains("changed after signing"), "{e}");
        }
        let mut longer = data.clone();
        longer.push(b'\n');
        assert!(matches!(verify(&pk, &longer, sig.as_bytes()), Err(SignError::BadSignature { .. })));
    }

    #[test]
    fn edited_trusted_comment_fails_the_global_signature() {
        let (pk, sk) = keys();
        let sig = sign(&sk, b"data", &claim()).unwrap();
        let edited = sig.replace("version=1.2.3", "version=9.9.9");
        assert_ne!(edited, sig);
        let e = verify(&pk, b"data", edited.as_bytes()).unwrap_err();
        assert!(matches!(e, SignError::BadCommentSignature { .. }), "{e}");
        let edited = sig.replace("expires=1800000000", "expires=never");
        assert!(matches!(
            verify(&pk, b"data", edited.as_bytes()),
            Err(SignError::BadCommentSignature { .. })
        ));
        // The untrusted comment is not covered, and may change.
        let edited = sig.replace(SIGNATURE_UNTRUSTED_COMMENT, "anything");
        verify(&pk, b"data", edited.as_bytes()).unwrap();
    }

    #[test]
    fn hostile_signatures_are_errors() {
        let (pk, sk) = keys();
        let sig = sign(&sk, b"data", &claim()).unwrap();
        let lines: Vec<&str> = sig.lines().collect();
        let mut cases: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"garbage".to_vec(),
            vec![0xff; 300],
            vec![b'a'; MAX_FILE_BYTES + 1],
            sig.as_bytes()[..sig.len() / 2].to_vec(),
            lines[..3].join("\n").into_bytes(),
            format!("{}\n{}\n{}\n{}\n{}\n", lines[0], lines[1], lines[2], lines[3], lines[3]).into_bytes(),
            // Truncated base64 in either signature line.
            format!("{}\n{}\n{}\n{}\n", lines[0], &lines[1][..40], lines[2], lines[3]).into_bytes(),
            format!("{}\n{}\n{}\n{}\n", lines[0], lines[1], lines[2], &lines[3][..40]).into_bytes(),
            format!("{}\n{}\n{}\n{}\n", lines[0], lines[1], lines[2], &lines[3][..4]).into_bytes(),
            // Bad prefixes and algorithms.
            format!("comment\n{}\n{}\n{}\n", lines[1], lines[2], lines[3]).into_bytes(),
            format!("{}\n{}\ncomment: x\n{}\n", lines[0], lines[1], lines[3]).into_bytes(),
            format!("{}\n{}\n{}\n{}\n", lines[0], lines[1].replacen("RU", "QU", 1), lines[2], lines[3]).into_bytes(),
            format!("{}\n{}\n{}\n{}\n", lines[0], "!!!!", lines[2], lines[3]).into_bytes(),
        ];
        // A global signature that is longer than 64 bytes.
        let long = BASE64.encode([7u8; 65]);
        cases.push(format!("{}\n{}\n{}\n{}\n", lines[0], lines[1], lines[2], long).into_bytes());
        for case in cases {
            let e = verify(&pk, b"data", &case).unwrap_err();
            assert!(
                matches!(e, SignError::Malformed { .. }),
                "{e} for {:?}",
                String::from_utf8_lossy(&case)
            );
            assert!(signature_key_id(&case).is_err());
        }
        // CRLF line endings and blank lines are fine (a blank line before the global
        // signature once reached the crate as an empty signature, which panics there).
        verify(&pk, b"data", sig.replace('\n', "\r\n").as_bytes()).unwrap();
        let blank = format!("{}\n{}\n{}\n\n{}\n", lines[0], lines[1], lines[2], lines[3]);
        verify(&pk, b"data", blank.as_bytes()).unwrap();
        let spaced = format!("{}\n  {}  \n{}\n\t{}\n", lines[0], lines[1], lines[2], lines[3]);
        verify(&pk, b"data", spaced.as_bytes()).unwrap();
    }

    #[test]
    fn mutated_signatures_never_panic() {
        let (pk, sk) = keys();
        let sig = sign(&sk, b"data", &claim()).unwrap().into_bytes();
        for i in (0..sig.len()).step_by(5) {
            for b in [b'\n', b'A', b' ', 0xc3] {
                let mut m = sig.clone();
                m[i] = b;
                let _ = verify(&pk, b"data", &m);
                let _ = signature_key_id(&m);
            }
            let _ = verify(&pk, b"data", &sig[..i]);
        }
    }

    #[test]
    fn hostile_keys_are_errors() {
        let (pk_text, sk_text) = keygen(None).unwrap();
        let pk_line = pk_text.lines().nth(1).unwrap();
        let sk_line = sk_text.lines().nth(1).unwrap();
        for bad in [
            "",
            "garbage",
            &pk_line[..30],
            &format!("{pk_line}AAAA"),
            &format!("untrusted comment: x\n{pk_line}\n{pk_line}\n"),
            &format!("x\n{pk_line}\n"),
            &pk_line.replacen("RW", "QW", 1),
            sk_line,
        ] {
            let e = bad.parse::<PublicKey>().unwrap_err();
            assert!(matches!(e, SignError::Malformed { .. }), "{e} for {bad:?}");
        }
        for bad in [
            String::new(),
            "untrusted comment: x\ngarbage\n".to_owned(),
            format!("untrusted comment: x\n{}\n", &sk_line[..100]),
            format!("untrusted comment: x\n{pk_line}\n"),
            format!("x\n{sk_line}\n"),
            "a".repeat(MAX_FILE_BYTES + 1),
        ] {
            let e = SecretKey::parse(&bad, Some("pw")).unwrap_err();
            assert!(matches!(e, SignError::Malformed { .. }), "{e} for {bad:?}");
        }
        // A damaged secret half (the public half no longer matches) is caught.
        let mut raw = BASE64.decode(sk_line).unwrap();
        raw[100] ^= 1; // in the public half of the 64-byte secret key
        let damaged = format!("untrusted comment: x\n{}\n", BASE64.encode(&raw));
        let e = SecretKey::parse(&damaged, None).unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
        // Huge scrypt parameters are refused before any work.
        let (_, enc) = keygen(Some("pw")).unwrap();
        let mut raw = BASE64.decode(enc.lines().nth(1).unwrap()).unwrap();
        raw[38..46].copy_from_slice(&u64::MAX.to_le_bytes());
        let huge = format!("untrusted comment: x\n{}\n", BASE64.encode(&raw));
        let e = SecretKey::parse(&huge, Some("pw")).unwrap_err();
        assert!(e.to_string().contains("scrypt"), "{e}");
    }

    #[test]
    fn huge_key_files_are_not_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("huge.pub");
        std::fs::write(&p, vec![b'R'; 10 * MAX_FILE_BYTES]).unwrap();
        let e = read_public_key(&p).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
        let e = read_secret_key(&p, None).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
    }

    #[test]
    fn claims_print_and_parse() {
        let c = claim();
        let s = c.to_string();
        assert_eq!(
            s,
            "khub-release repo=acme/activation version=1.2.3 timestamp=1700000000 expires=1800000000"
        );
        assert_eq!(s.parse::<ReleaseClaim>().unwrap(), c);
        let never = ReleaseClaim {
            expires: None,
            version: semver::Version::parse("0.1.0-rc.1+build.5").unwrap(),
            ..c
        };
        assert_eq!(never.to_string().parse::<ReleaseClaim>().unwrap(), never);
        assert!(never.to_string().ends_with("expires=never"));
    }

    #[test]
    fn claims_parse_strictly() {
        for bad in [
            "",
            "timestamp:1700000000",
            "khub-release repo=acme/activation version=1.2.3 timestamp=1700000000",
            "khub-release repo=acme/activation version=1.2.3 timestamp=1700000000 expires=never extra=1",
            "khub-release  repo=acme/activation version=1.2.3 timestamp=1700000000 expires=never",
            "khub-release repo=acme/activation version=1.2.3 timestamp=1700000000 expires=never ",
            "khub-release version=1.2.3 repo=acme/activation timestamp=1700000000 expires=never",
            "khub-releases repo=acme/activation version=1.2.3 timestamp=1700000000 expires=never",
            "khub-release repo=acme version=1.2.3 timestamp=1700000000 expires=never",
            "khub-release repo=acme/activation version=1.2 timestamp=1700000000 expires=never",
            "khub-release repo=acme/activation version=01.2.3 timestamp=1700000000 expires=never",
            "khub-release repo=acme/activation version=1.2.3 timestamp=01700000000 expires=never",
            "khub-release repo=acme/activation version=1.2.3 timestamp=+1700000000 expires=never",
            "khub-release repo=acme/activation version=1.2.3 timestamp=-1 expires=never",
            "khub-release repo=acme/activation version=1.2.3 timestamp=99999999999999999999999 expires=never",
            "khub-release repo=acme/activation version=1.2.3 timestamp=1700000000 expires=soon",
            "khub-release repo=acme/activation version=1.2.3 timestamp=1700000000 expires=",
            "khub-release repo=acme/activation version=1.2.3 timestamp=1700000000 expiry=never",
            "khub-release repo=acme/activation version=1.2.3 timestamp=1700000000 expires=Never",
        ] {
            let e = bad.parse::<ReleaseClaim>().unwrap_err();
            assert!(matches!(e, SignError::TrustedComment { .. }), "{bad}: {e}");
        }
    }
}
