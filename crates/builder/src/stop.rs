//! What the owner of the daemon (signals, a drain request over NATS, a session limit) asks of
//! it; read by the daemon's tasks through a `watch` channel. Its own module so that the API, the
//! registry and the session can read it without depending on the daemon.

/// What the owner of the daemon asks of it; ordered from mildest to hardest, and a request
/// only ever gets harder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stop {
    Running,
    /// Take no new request, finish the running ones, then return.
    Drain,
    /// Kill running builds, return their requests to the queue, then return.
    Abort,
}
