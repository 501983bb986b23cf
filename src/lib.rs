//! khub: a registry and loader for prebuilt compute kernels.
//!
//! A host asks for a kernel by name and version range; khub picks the build that fits this
//! machine, verifies every byte against the release manifest and loads it behind a
//! stable, versioned C ABI. The front door is [`Hub`]: `Hub::from_env()?.load("org/name",
//! "^1.2")?` gives a [`Kernel`]. See `docs/architecture.md` for the module map and its
//! dependency rules, and `docs/` for everything else.
//!
//! # Modules, in the order a kernel flows through them
//!
//! Shared vocabulary:
//! - [`platform`]: OS, CPU, libc, GPU architectures: the words manifests and host facts use;
//! - [`abi`]: the Rust mirror of the kernel ABI (`include/khub_kernel.h`);
//! - [`env`]: every environment variable khub reads, and the one place it reads them.
//!
//! The pure core (values in, values out; no I/O):
//! - [`manifest`]: the release manifest `khub.toml`;
//! - [`version`]: a semver requirement and a repository's refs → the release;
//! - [`resolve`]: a manifest and host facts → the ranked variants, with the reason for
//!   every rejection.
//!
//! The path of a kernel, at the edges:
//! - [`host`]: the facts of this machine, probed or overridden;
//! - [`registry`]: where releases come from (a directory, or the Hub through `hf-hub`);
//! - [`release`]: a release directory on disk, checked as a tree;
//! - [`store`]: the content-addressed store of verified blobs and the known-release index;
//! - [`verify`]: digests, sealed verified bytes, signatures, the trust policy, rollback;
//! - [`load`]: `dlopen` of verified bytes, ABI negotiation, export checks, calls;
//! - [`lock`]: `khub.lock` and `kernels.toml`;
//! - [`hub`]: the front door that runs the steps above in order.
//!
//! Around it (feature `tools`, part of the defaults; a host that only loads leaves it out):
//! - `bench`: the benchmark engine and `bench::HostTensor`;
//! - `inspect`: facts read from a library's bytes (ELF, NVIDIA fatbin, HIP bundles);
//! - `package`: the author's side: `init`, `build`, `package`, `sign`, `publish`;
//! - [`serve`] (feature `serve`): a Hub-compatible server over a directory registry;
//! - [`capi`] (feature `capi`): the C API of `include/khub.h`.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod platform;

pub mod abi;
pub mod env;
pub mod error_kind;
mod fsx;
mod ids;

pub mod manifest;
pub mod resolve;
pub mod version;

pub mod host;
pub mod registry;
pub mod release;
pub mod store;
pub mod verify;

pub mod load;
pub mod lock;

pub mod hub;

#[cfg(feature = "tools")]
pub mod bench;
#[cfg(feature = "tools")]
pub mod inspect;
#[cfg(feature = "tools")]
pub mod package;

#[cfg(feature = "serve")]
pub mod serve;

#[cfg(feature = "capi")]
pub mod capi;

pub use host::{Environment, HostFacts, ProbeOptions};
pub use hub::{Hub, HubError, HubOptions, RegistrySpec};
pub use ids::{GitRef, Refs, RepoId, RepoIdError};
pub use load::{Arg, CallError, Function, Kernel, LoadError, LoadReport};
pub use lock::Lockfile;
pub use manifest::{Manifest, ManifestError};
pub use release::{Release, ReleaseError};
pub use resolve::{Preferences, Resolution, resolve};
pub use verify::VerifyError;
