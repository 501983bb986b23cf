//! Versions on a registry: tags `v<semver>` and branches `v<major>`, and the choice of a
//! release for a requirement. Pure: takes the refs as a value.
//!
//! Rules:
//! - A tag `v1.2.3` (or `v1.2.3-rc.1`) is a release. Tags that are not `v` + semver are
//!   ignored.
//! - A requirement uses the semver crate's syntax (`^1.2`, `~1.2.3`, `=1.2.0`,
//!   `>=1, <3`, `*`). The highest matching tag wins.
//! - Pre-releases are chosen only when asked for: semver's rule, under which a
//!   pre-release matches only a requirement that names a pre-release of the same
//!   `major.minor.patch` (`>=1.3.0-rc.1`).
//! - When no tag matches, a branch `v<major>` whose major the requirement admits is the
//!   fallback (the Hugging Face kernels convention); its version is only known once its
//!   manifest is read, so the caller must check it ([`Selected::Branch`]).

use semver::{Version, VersionReq};

use crate::ids::Refs;

/// A requirement that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("version requirement `{text}` is not valid ({problem}); write e.g. ^1.2, ~1.2.3, =1.2.0, \">=1, <3\" or *")]
pub struct RequirementError {
    /// What was given.
    pub text: String,
    /// What semver said.
    pub problem: String,
}

/// Parses a version requirement.
pub fn parse_requirement(text: &str) -> Result<VersionReq, RequirementError> {
    VersionReq::parse(text.trim()).map_err(|e| RequirementError {
        text: text.chars().take(100).collect(),
        problem: e.to_string(),
    })
}

/// What was chosen for a requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selected {
    /// A release tag.
    Tag {
        /// Its version.
        version: Version,
        /// The tag's name (`v1.2.3`).
        tag: String,
        /// The commit it points at.
        commit: String,
    },
    /// A major-version branch; the manifest at `commit` must be checked against the
    /// requirement.
    Branch {
        /// The branch's name (`v1`).
        branch: String,
        /// Its major.
        major: u64,
        /// The commit it points at.
        commit: String,
    },
}

impl Selected {
    /// The commit.
    pub fn commit(&self) -> &str {
        match self {
            Selected::Tag { commit, .. } | Selected::Branch { commit, .. } => commit,
        }
    }
}

/// The releases a set of refs holds, highest version first.
pub fn releases(refs: &Refs) -> Vec<(Version, &str, &str)> {
    let mut out: Vec<(Version, &str, &str)> = refs
        .tags
        .iter()
        .filter_map(|t| {
            let v = t.name.strip_prefix('v')?.parse::<Version>().ok()?;
            Some((v, t.name.as_str(), t.commit.as_str()))
        })
        .collect();
    out.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    out
}

/// Chooses the release for `req` among `refs`, or `None` when nothing matches.
pub fn select(refs: &Refs, req: &VersionReq) -> Option<Selected> {
    if let Some((version, tag, commit)) = releases(refs).into_iter().find(|(v, _, _)| req.matches(v)) {
        return Some(Selected::Tag {
            version,
            tag: tag.to_owned(),
            commit: commit.to_owned(),
        });
    }
    // Fallback: the highest v<major> branch whose major the requirement could admit.
    let mut branches: Vec<(u64, &str, &str)> = refs
        .branches
        .iter()
        .filter_map(|b| {
            let major = b.name.strip_prefix('v')?.parse::<u64>().ok()?;
            Some((major, b.name.as_str(), b.commit.as_str()))
        })
        .filter(|(major, _, _)| major_admitted(req, *major))
        .collect();
    branches.sort_by_key(|b| std::cmp::Reverse(b.0));
    branches.first().map(|(major, branch, commit)| Selected::Branch {
        branch: (*branch).to_owned(),
        major: *major,
        commit: (*commit).to_owned(),
    })
}

/// Whether some non-pre-release `major.x.y` could satisfy `req`: tries the versions at
/// the edges that requirements name.
fn major_admitted(req: &VersionReq, major: u64) -> bool {
    let mut probes = vec![Version::new(major, 0, 0), Version::new(major, u64::MAX / 2, 0)];
    for c in &req.comparators {
        if c.major == major {
            let minor = c.minor.unwrap_or(0);
            let patch = c.patch.unwrap_or(0);
            probes.push(Version::new(major, minor, patch));
            probes.push(Version::new(major, minor, patch.saturating_add(1)));
            probes.push(Version::new(major, minor.saturating_add(1), 0));
        }
    }
    probes.iter().any(|v| req.matches(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::GitRef;

    fn refs(tags: &[&str], branches: &[&str]) -> Refs {
        let r = |n: &&str| GitRef {
            name: n.to_string(),
            commit: format!("c-{n}"),
        };
        Refs {
            tags: tags.iter().map(r).collect(),
            branches: branches.iter().map(r).collect(),
        }
    }

    fn pick(r: &Refs, req: &str) -> Option<String> {
        select(r, &parse_requirement(req).unwrap()).map(|s| match s {
            Selected::Tag { tag, .. } => tag,
            Selected::Branch { branch, .. } => format!("branch {branch}"),
        })
    }

    #[test]
    fn requirements_pick_the_highest_matching_tag() {
        let r = refs(
            &["v1.0.0", "v1.2.0", "v1.2.5", "v1.3.0-rc.1", "v2.0.0", "v2.1.0", "latest", "vnext"],
            &["main", "v1", "v2"],
        );
        let cases = [
            ("^1.2", Some("v1.2.5")),
            ("~1.2.3", Some("v1.2.5")),
            ("=1.2.0", Some("v1.2.0")),
            (">=1, <3", Some("v2.1.0")),
            ("*", Some("v2.1.0")),
            ("^1", Some("v1.2.5")),
            (">=1.3.0-rc.1", Some("v2.1.0")),
            ("=1.3.0-rc.1", Some("v1.3.0-rc.1")),
            ("^3", None),
        ];
        for (req, want) in cases {
            assert_eq!(pick(&r, req).as_deref(), want, "{req}");
        }
    }

    #[test]
    fn pre_releases_only_when_asked() {
        let r = refs(&["v1.0.0", "v1.1.0-rc.1"], &[]);
        assert_eq!(pick(&r, "^1").as_deref(), Some("v1.0.0"));
        assert_eq!(pick(&r, ">=1.1.0-rc.1").as_deref(), Some("v1.1.0-rc.1"));
        let only_pre = refs(&["v2.0.0-beta.1"], &[]);
        assert_eq!(pick(&only_pre, "^2"), None);
    }

    #[test]
    fn branches_are_the_fallback() {
        let r = refs(&[], &["main", "v1", "v2"]);
        assert_eq!(pick(&r, "^1.2").as_deref(), Some("branch v1"));
        assert_eq!(pick(&r, "*").as_deref(), Some("branch v2"));
        assert_eq!(pick(&r, ">=1, <2").as_deref(), Some("branch v1"));
        assert_eq!(pick(&r, "^3"), None);
        // A tag always wins over a branch.
        let r = refs(&["v1.0.0"], &["v2"]);
        assert_eq!(pick(&r, "*").as_deref(), Some("v1.0.0"));
    }

    #[test]
    fn bad_requirements_say_what_to_write() {
        let e = parse_requirement("one point two").unwrap_err().to_string();
        assert!(e.contains("^1.2"), "{e}");
    }
}
