//! One classification of khub's errors, shared by every front end: the C API's `KHUB_E_*`
//! codes, the command line's `--json` error reports, and language bindings' exception
//! classes all come from [`ErrorKind`].

use crate::hub::HubError;
use crate::load::{CallError, LoadError};
use crate::lock::LockError;
use crate::registry::RegistryError;
use crate::release::ReleaseError;
use crate::store::StoreError;
use crate::verify::VerifyError;

/// What kind of failure an error is. The discriminants are the C API's `KHUB_E_*` codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// An argument is wrong (a repository id, a requirement, a signature string …).
    InvalidArgument = 1,
    /// A repository, release, file, function or lock entry does not exist.
    NotFound = 2,
    /// No variant of the release runs on this host.
    NoVariant = 3,
    /// Bytes failed verification (digest, size, file type, lock digests).
    Verify = 4,
    /// The trust policy refused a release (signature, key, expiry, rollback).
    Trust = 5,
    /// The registry failed: unreachable, refused credentials, rate limit, bad answer.
    Registry = 6,
    /// Offline, and the store does not hold what was asked for.
    OfflineMiss = 7,
    /// A verified library could not be loaded, or its descriptor was refused.
    Load = 8,
    /// A function was asked for, or called, with the wrong signature or arguments.
    SignatureMismatch = 9,
    /// A kernel returned a non-zero status.
    Kernel = 10,
    /// Host detection failed (a bad override or host profile).
    Host = 11,
    /// A lockfile is unreadable or inconsistent.
    Lock = 12,
    /// A file system error.
    Io = 13,
}

impl ErrorKind {
    /// The C API's code (`KHUB_E_*`).
    pub fn code(self) -> i32 {
        self as i32
    }

    /// A stable, kebab-case name: `not-found`, `offline-miss`, …
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid-argument",
            ErrorKind::NotFound => "not-found",
            ErrorKind::NoVariant => "no-variant",
            ErrorKind::Verify => "verify",
            ErrorKind::Trust => "trust",
            ErrorKind::Registry => "registry",
            ErrorKind::OfflineMiss => "offline-miss",
            ErrorKind::Load => "load",
            ErrorKind::SignatureMismatch => "signature-mismatch",
            ErrorKind::Kernel => "kernel",
            ErrorKind::Host => "host",
            ErrorKind::Lock => "lock",
            ErrorKind::Io => "io",
        }
    }

    /// The kind whose C API code is `code`.
    pub fn from_code(code: i32) -> Option<ErrorKind> {
        const ALL: [ErrorKind; 13] = [
            ErrorKind::InvalidArgument,
            ErrorKind::NotFound,
            ErrorKind::NoVariant,
            ErrorKind::Verify,
            ErrorKind::Trust,
            ErrorKind::Registry,
            ErrorKind::OfflineMiss,
            ErrorKind::Load,
            ErrorKind::SignatureMismatch,
            ErrorKind::Kernel,
            ErrorKind::Host,
            ErrorKind::Lock,
            ErrorKind::Io,
        ];
        ALL.into_iter().find(|k| k.code() == code)
    }

    /// The kind of the first khub error in `e`'s chain (`e` itself first), if any.
    pub fn of(e: &(dyn std::error::Error + 'static)) -> Option<ErrorKind> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(c) = cur {
            if let Some(k) = Self::of_one(c) {
                return Some(k);
            }
            cur = c.source();
        }
        None
    }

    fn of_one(e: &(dyn std::error::Error + 'static)) -> Option<ErrorKind> {
        if let Some(e) = e.downcast_ref::<HubError>() {
            return Some(e.kind());
        }
        if let Some(e) = e.downcast_ref::<LoadError>() {
            return Some(e.kind());
        }
        if let Some(e) = e.downcast_ref::<CallError>() {
            return Some(e.kind());
        }
        if let Some(e) = e.downcast_ref::<RegistryError>() {
            return Some(e.kind());
        }
        if let Some(e) = e.downcast_ref::<StoreError>() {
            return Some(e.kind());
        }
        if let Some(e) = e.downcast_ref::<ReleaseError>() {
            return Some(e.kind());
        }
        if let Some(e) = e.downcast_ref::<VerifyError>() {
            return Some(e.kind());
        }
        if let Some(e) = e.downcast_ref::<LockError>() {
            return Some(HubError::kind_of_lock(e));
        }
        None
    }
}

/// The messages of an error's chain, outermost first, each said once: a cause whose text a
/// message before it already contains is dropped (libraries often repeat their source in
/// their own message), and so is a parenthesized group repeated back to back (`(URL)
/// (URL)`). What the command line prints and what bindings raise.
pub fn messages(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = next {
        let text = collapse_repeats(c.to_string().trim());
        if !text.is_empty() && !out.iter().any(|kept| kept.contains(&text)) {
            out.push(text);
        }
        next = c.source();
    }
    out
}

/// `a (x) (x)` → `a (x)`: a parenthesized group said twice in a row, once.
fn collapse_repeats(s: &str) -> String {
    let mut out = s.to_owned();
    let mut from = 0;
    while let Some(open) = out[from..].find('(').map(|i| i + from) {
        let Some(close) = out[open..].find(')').map(|i| i + open) else {
            break;
        };
        let group = out[open..=close].to_owned();
        let repeat = format!(" {group}");
        if out[close + 1..].starts_with(&repeat) {
            out.replace_range(close + 1..close + 1 + repeat.len(), "");
        } else {
            from = close + 1;
        }
    }
    out
}

impl HubError {
    /// This error's kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            HubError::Host(_) => ErrorKind::Host,
            HubError::Registry(r) => r.kind(),
            HubError::Store(s) => s.kind(),
            HubError::Load(l) => l.kind(),
            HubError::Lock(l) => Self::kind_of_lock(l),
            HubError::Requirement(_) => ErrorKind::InvalidArgument,
            HubError::Trust(_) => ErrorKind::Trust,
            HubError::NoMatchingRelease { .. } => ErrorKind::NotFound,
            HubError::Manifest { .. } | HubError::TagMismatch { .. } => ErrorKind::Registry,
            HubError::NoVariant(_) | HubError::LockedVariantUnfit { .. } => ErrorKind::NoVariant,
            HubError::OfflineMiss { .. } => ErrorKind::OfflineMiss,
            HubError::LockDigestMismatch { .. } | HubError::DamagedBlob { .. } | HubError::UnusableRelease { .. } => ErrorKind::Verify,
            HubError::Io { .. } => ErrorKind::Io,
        }
    }

    fn kind_of_lock(e: &LockError) -> ErrorKind {
        match e {
            LockError::NotLocked { .. } => ErrorKind::NotFound,
            _ => ErrorKind::Lock,
        }
    }
}

impl RegistryError {
    /// This error's kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RegistryError::RepoNotFound { .. } | RegistryError::NotFound { .. } => ErrorKind::NotFound,
            RegistryError::Offline { .. } => ErrorKind::OfflineMiss,
            RegistryError::Io { .. } => ErrorKind::Io,
            RegistryError::NotRegular { .. } => ErrorKind::Verify,
            RegistryError::Unauthorized { .. }
            | RegistryError::RateLimited { .. }
            | RegistryError::TooLarge { .. }
            | RegistryError::Transport { .. } => ErrorKind::Registry,
        }
    }
}

impl StoreError {
    /// This error's kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::DigestMismatch { .. } | StoreError::SizeMismatch { .. } | StoreError::NotRegular { .. } => ErrorKind::Verify,
            StoreError::Fill { .. } => ErrorKind::Registry,
            StoreError::Missing { .. } => ErrorKind::OfflineMiss,
            StoreError::InvalidEnv { .. } => ErrorKind::Host,
            StoreError::Io { .. } | StoreError::LockTimeout { .. } | StoreError::NoCacheDir => ErrorKind::Io,
        }
    }
}

impl VerifyError {
    /// This error's kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            VerifyError::FileMissing { .. }
            | VerifyError::NotRegular { .. }
            | VerifyError::SizeMismatch { .. }
            | VerifyError::DigestMismatch { .. } => ErrorKind::Verify,
            VerifyError::Unavailable { .. } | VerifyError::Io { .. } => ErrorKind::Io,
        }
    }
}

impl ReleaseError {
    /// This error's kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ReleaseError::ExtraFile { .. } | ReleaseError::NotRegular { .. } | ReleaseError::NonUtf8Name { .. } => ErrorKind::Verify,
            ReleaseError::Verify(e) => e.kind(),
            ReleaseError::Trust(_) => ErrorKind::Trust,
            ReleaseError::UnknownVariant(_) => ErrorKind::NotFound,
            ReleaseError::ManifestRead { .. } | ReleaseError::Manifest { .. } => ErrorKind::Load,
        }
    }
}

impl LoadError {
    /// This error's kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            LoadError::NoVariant(_) | LoadError::CpuUnsupported { .. } => ErrorKind::NoVariant,
            LoadError::Release(e) => e.kind(),
            LoadError::Verify(e) => e.kind(),
            LoadError::UnknownVariant(_) | LoadError::NoSuchFunction { .. } => ErrorKind::NotFound,
            LoadError::TypeMismatch { .. } => ErrorKind::SignatureMismatch,
            LoadError::Dlopen { .. }
            | LoadError::Helper { .. }
            | LoadError::NoEntry { .. }
            | LoadError::AbiRefused { .. }
            | LoadError::BadDescriptor { .. }
            | LoadError::ExportMissing { .. }
            | LoadError::SignatureMismatch { .. }
            | LoadError::IdentityMismatch { .. } => ErrorKind::Load,
        }
    }
}

impl CallError {
    /// This error's kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CallError::Kernel { .. } => ErrorKind::Kernel,
            CallError::Arguments { .. } => ErrorKind::SignatureMismatch,
            CallError::NotFound(_) => ErrorKind::NotFound,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_repeated_back_to_back_is_said_once() {
        assert_eq!(
            collapse_repeats("error sending request for url (http://h:9/x) (http://h:9/x)"),
            "error sending request for url (http://h:9/x)"
        );
        assert_eq!(collapse_repeats("a (b) (c) (c) d"), "a (b) (c) d");
        assert_eq!(collapse_repeats("unbalanced (x"), "unbalanced (x");
    }

    #[test]
    fn codes_round_trip() {
        for code in 1..=13 {
            assert_eq!(ErrorKind::from_code(code).map(ErrorKind::code), Some(code));
        }
        assert_eq!(ErrorKind::from_code(0), None);
        assert_eq!(ErrorKind::from_code(14), None);
    }
}
