//! The homelab-deploy builder daemon.
//!
//! # Layout
//! - [`config`]: the TOML config and its validation.
//! - [`daemon`]: startup, the pull loops and shutdown.
//! - [`job`]: one request's life, top to bottom.
//! - [`bus`], [`git`], [`nix`], [`logs`]: the seams to NATS, git, nix and log batching.

pub mod bus;
pub mod config;
pub mod daemon;
pub mod git;
pub mod job;
pub mod logs;
pub mod nix;

pub use config::{Config, ConfigError};
pub use daemon::{run, Stop};
