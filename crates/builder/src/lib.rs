//! The homelab-deploy builder daemon. Only what the `homelab-deploy` binary and the tests need
//! is public (the config, `run`, provisioning, the bus and the read model); the rest is private
//! so that the compiler finds dead code. No two modules depend on each other.
//!
//! # Layout
//! - `config`: the TOML config and its validation.
//! - `daemon`: startup, the pull loops and shutdown; `stop`: what its owner asks of it;
//!   `supervisor`: its long-lived tasks, one set that fails loudly.
//! - `job`: one request's life, top to bottom (`job/mod.rs`); its events (`job/events.rs`), one
//!   host's build (`job/host.rs`), shared evaluation (`job/eval.rs`), the requests running here
//!   (`job/running.rs`); `attempts`: the claims that count its attempts.
//! - `api`, `registry`: the control API under `build.api.>` and the fleet registry.
//! - `placement`: heavy lanes and warm-cache affinity: which builder starts a request.
//! - `session`: the limits of an ephemeral builder (`--once`, `--max-builds`, …).
//! - `state`: the request-state bucket, the read model derived from the events.
//! - `provision`: creating the streams and buckets with an admin credential.
//! - `bus`, `git`, `nix`, `logs`: the seams to NATS, git, nix and log batching.

mod access;
mod api;
pub mod attempts;
pub mod bus;
mod cache;
mod closures;
pub mod config;
mod daemon;
mod git;
mod job;
mod logs;
mod metrics;
mod nix;
mod placement;
mod process;
pub mod provision;
mod registry;
mod session;
mod shares;
pub mod state;
mod stop;
mod supervisor;

pub use config::{Config, ConfigError};
pub use daemon::run;
pub use session::{Session, SessionReport};
pub use stop::Stop;
