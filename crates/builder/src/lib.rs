//! The homelab-deploy builder daemon. Only what the `homelab-deploy` binary and the tests need
//! is public (the config, `run`, provisioning, the bus and the read model); the rest is private
//! so that the compiler finds dead code. No two modules depend on each other.
//!
//! # Layout
//! - `config`: the TOML config and its validation.
//! - `daemon`: startup, the pull loops and shutdown; `stop`: what its owner asks of it;
//!   `supervisor`: its long-lived tasks, one set that fails loudly; `session`: the limits of an
//!   ephemeral builder (`--once`, `--max-builds`, …); `shares`: how tenants share the build slots.
//! - `job`: one request's life, top to bottom (`job/mod.rs`, with the queued cancel and start-up
//!   host discovery that use the same steps); its events (`job/events.rs`), one host's build
//!   (`job/host.rs`), shared evaluation (`job/eval.rs`), the requests running here
//!   (`job/running.rs`), newer `replace` requests (`job/replace.rs`), GC roots of evaluated drvs
//!   (`job/roots.rs`); `attempts`: the claims that count a request's attempts.
//! - `api`, `registry`: the control API under `build.api.>` and the fleet registry.
//! - `access`: who may build and cancel what (`[access]`, signed requests).
//! - `placement`: heavy lanes and warm-cache affinity: which builder starts a request.
//! - `state`: the request-state bucket, the read model derived from the events.
//! - `provision`: creating the streams and buckets with an admin credential.
//! - `eval_cache`: what nix evaluated per commit (host lists, toplevel drvs), kept in memory;
//!   `closures`: each host's recent builds, for closure diffs.
//! - `metrics`: the Prometheus metrics.
//! - `bus`, `git`, `nix`, `logs`, `process`: the seams to NATS, git, nix, log batching and child
//!   processes.

mod access;
mod api;
pub mod attempts;
pub mod bus;
mod closures;
pub mod config;
mod daemon;
mod eval_cache;
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

/// Locks a std mutex that guards only short critical sections that cannot panic: a poisoned
/// lock still holds consistent data, so it is used as it is.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
pub use session::{Session, SessionReport};
pub use stop::Stop;
