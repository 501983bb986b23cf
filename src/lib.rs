//! khub: a registry and loader for prebuilt compute kernels.
//!
//! A host asks for a kernel by name and version range; khub picks the build that fits this
//! machine, verifies every byte against the release manifest and loads it behind a
//! stable, versioned C ABI. See `docs/` and `DESIGN.md` for the whole picture.
//!
//! Modules, in the order data flows through them:
//! - [`platform`]: the vocabulary shared by manifests and host facts;
//! - [`manifest`]: the release manifest `khub.toml`;
//! - [`host`]: the facts of this machine, probed or overridden;
//! - [`resolve`]: the pure choice of a variant, with an explanation for every decision.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod abi;
#[cfg(feature = "capi")]
pub mod capi;
pub mod env;
mod fsx;
pub mod host;
pub mod hub;
mod ids;
pub mod inspect;
pub mod load;
pub mod lock;
pub mod manifest;
pub mod package;
pub mod platform;
pub mod registry;
pub mod resolve;
#[cfg(feature = "serve")]
pub mod serve;
pub mod sign;
pub mod store;
pub mod trust;
pub mod verify;
pub mod version;

pub use host::{HostFacts, ProbeOptions};
pub use load::{Kernel, LoadError, Release};
pub use manifest::{Manifest, ManifestError};
pub use resolve::{Preferences, Resolution, resolve};
