//! The homelab-deploy wire protocol, version 1.
//!
//! Everything a client or builder needs to agree on, and nothing else: subject names, stream and
//! consumer names, the request body, the events, and the rules that keep hostile input out of
//! subjects and command lines. This crate does no I/O, so every rule here is unit tested.
//!
//! # Layout
//! - [`subject`]: names (repo, target, request id) and the subjects built from them.
//! - [`request`]: the build request body and how a builder turns a raw message into a valid request
//!   or a refusal.
//! - [`diff`]: closure diffs between two builds of a host.
//! - [`event`]: lifecycle events and log batches a builder publishes.
//! - [`identity`]: signing requests and cancels with an NKey, and checking the signature.
//! - [`api`]: the control API under `build.api.>` and the fleet registry.
//! - [`placement`]: what the fleet learns about each host to place its requests (peak memory,
//!   last builder).
//! - [`summary`]: short forms of host failures (excerpts, grouped errors) for lists and tools.
//! - [`text`]: text cut to a byte or character budget without splitting a character.

pub mod api;
pub mod diff;
pub mod event;
pub mod identity;
pub mod placement;
pub mod request;
pub mod subject;
pub mod summary;
pub mod text;

pub use diff::{ClosureDiff, DiffStatus, PackageChange};
pub use event::{BuildStatus, Event, EventBody, HostResult, HostStatus, LogBatch};
pub use identity::Identity;
pub use request::{BuildRequest, Mode, ParsedRequest, Priority, Refusal};
pub use subject::{NameError, RepoName, RequestId, Target};
pub use summary::{error_excerpt, group_failures, FailureGroup};

/// Bumped on an incompatible change of any subject, request field or event.
pub const PROTOCOL_VERSION: u32 = 1;
