//! The names of things in a registry: repository ids (`org/name`), git refs and the refs of
//! a repository. Pure values, shared by the pure core (`version`, `lock`, `verify`) and the
//! edges (`registry`, `hub`, `serve`), so neither has to import the other.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A repository id, `org/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RepoId {
    org: String,
    name: String,
}

impl RepoId {
    /// The organisation (or user).
    pub fn org(&self) -> &str {
        &self.org
    }

    /// The repository name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A repository id that is not `org/name`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("repository `{0}` is not valid: write org/name, each 1-96 of letters, digits, `-`, `_`, `.`, not starting with `.` or `-`")]
pub struct RepoIdError(pub String);

fn valid_part(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 96
        && !p.starts_with(['.', '-'])
        && !p.contains("..")
        && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl FromStr for RepoId {
    type Err = RepoIdError;
    fn from_str(s: &str) -> Result<Self, RepoIdError> {
        let err = || RepoIdError(s.chars().take(200).collect());
        let (org, name) = s.split_once('/').ok_or_else(err)?;
        if !valid_part(org) || !valid_part(name) {
            return Err(err());
        }
        Ok(RepoId {
            org: org.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl TryFrom<String> for RepoId {
    type Error = RepoIdError;
    fn try_from(s: String) -> Result<Self, RepoIdError> {
        s.parse()
    }
}

impl From<RepoId> for String {
    fn from(r: RepoId) -> String {
        r.to_string()
    }
}

impl fmt::Display for RepoId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.org, self.name)
    }
}

/// A named ref and the commit it points at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitRef {
    /// The short name (`v1.2.0`, `v1`, `main`).
    pub name: String,
    /// The 40-hex commit id.
    pub commit: String,
}

/// The refs of a repository.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refs {
    /// Tags.
    pub tags: Vec<GitRef>,
    /// Branches.
    pub branches: Vec<GitRef>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_checked() {
        let r: RepoId = "kernels-community/activation".parse().unwrap();
        assert_eq!((r.org(), r.name()), ("kernels-community", "activation"));
        for bad in [
            "activation",
            "a/b/c",
            "../x",
            "a/..",
            "a/.hidden",
            "a/-x",
            "",
            "a/",
            "a/b c",
            "a/b\0",
        ] {
            assert!(bad.parse::<RepoId>().is_err(), "{bad}");
        }
    }
}
