//! The explain document: the JSON that `khub explain --json` prints and the C API's
//! `khub_hub_explain_json` returns (docs/cli.md, docs/resolve.md).

use serde::Serialize;

use super::Resolution;
use crate::host::HostFacts;

/// The explain document: the host facts, the chosen variant and every variant ranked or
/// rejected with its reason. Serialize it with serde; the fields appear in this order.
#[derive(Debug, Clone, Serialize)]
pub struct Explain<'a> {
    /// Format version of this document ([`Explain::FORMAT`]).
    format: u32,
    /// The release the resolution came from, when the caller fetched it from a registry
    /// (the C API's document has it, `khub explain` on a manifest file does not).
    #[serde(flatten)]
    release: Option<ExplainRelease<'a>>,
    host: &'a HostFacts,
    /// The id of the chosen variant; `null` when nothing fits.
    chosen: Option<&'a str>,
    resolution: &'a Resolution,
}

/// Where a resolved release came from: the fields the C API's explain document adds
/// between `format` and `host`.
#[derive(Debug, Clone, Serialize)]
pub struct ExplainRelease<'a> {
    /// The repository, `owner/name`.
    pub repo: String,
    /// The version requirement asked for.
    pub requirement: &'a str,
    /// The registry it was resolved from.
    pub registry: &'a str,
    /// The release version chosen.
    pub version: String,
    /// The release's commit.
    pub commit: &'a str,
}

impl<'a> Explain<'a> {
    /// The document's format version.
    pub const FORMAT: u32 = 1;

    /// The document for `resolution`, made for `host`.
    pub fn new(resolution: &'a Resolution, host: &'a HostFacts) -> Self {
        Explain {
            format: Self::FORMAT,
            release: None,
            host,
            chosen: resolution.best().map(|c| c.id.as_str()),
            resolution,
        }
    }

    /// The same document, naming the release the resolution came from.
    pub fn with_release(self, release: ExplainRelease<'a>) -> Self {
        Explain {
            release: Some(release),
            ..self
        }
    }

    /// The id of the chosen variant, if any fits.
    pub fn chosen(&self) -> Option<&'a str> {
        self.chosen
    }
}
