//! The homelab-deploy builder daemon.
//!
//! # Layout
//! - [`config`]: the TOML config and its validation.
//! - [`daemon`]: startup, the pull loops and shutdown.
//! - [`job`]: one request's life, top to bottom; [`attempts`]: the claims that count its attempts.
//! - [`api`], [`registry`]: the control API under `build.api.>` and the fleet registry.
//! - [`placement`]: heavy lanes and warm-cache affinity: which builder starts a request.
//! - [`session`]: the limits of an ephemeral builder (`--once`, `--max-builds`, …).
//! - [`state`]: the request-state bucket, the read model derived from the events.
//! - [`provision`]: creating the streams and buckets with an admin credential.
//! - [`bus`], [`git`], [`nix`], [`logs`]: the seams to NATS, git, nix and log batching.

pub mod access;
pub mod api;
pub mod attempts;
pub mod bus;
pub mod cache;
pub mod closures;
pub mod config;
pub mod daemon;
pub mod git;
pub mod job;
pub mod logs;
pub mod metrics;
pub mod nix;
pub mod placement;
pub mod process;
pub mod provision;
pub mod registry;
pub mod session;
pub mod shares;
pub mod state;

pub use config::{Config, ConfigError};
pub use daemon::{run, Stop};
pub use session::{Session, SessionReport};
