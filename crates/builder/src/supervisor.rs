//! The daemon's long-lived tasks (the control API, the registry, the metrics sampler, host
//! discovery, the Vault refresher, session limits), run as one supervised set with one
//! cancellation token: shutdown cancels them all and waits for each, and a task that ends or
//! panics while the builder runs is reported by name, so the daemon stops instead of running on
//! without its API or its registry entry.
//!
//! Written here rather than with `tokio_util::task::TaskTracker`: that tracks tasks but does not
//! say which one ended early, which is the point.

use std::collections::HashMap;
use std::future::Future;

use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;

/// How a supervised task may end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ends {
    /// Runs until the token is cancelled: the wrapper drops it then. Ending earlier is a failure.
    WithDaemon,
    /// Watches the token itself and returns once it is cancelled, after cleaning up (the
    /// registry removes its entry). Returning earlier is a failure.
    AfterCleanup,
    /// May finish its work before shutdown (a session limit that fired, host discovery with
    /// `hosts_refresh_secs = 0`); dropped when the token is cancelled, like
    /// [`Ends::WithDaemon`]. Only a panic or an `Err` is a failure.
    Early,
}

/// What a supervised task returns: `()` for a task that cannot fail but by ending or panicking,
/// or `Result<(), String>` for one that says why it ended.
pub trait TaskEnd {
    /// `Err(why)` when the task failed.
    fn into_result(self) -> Result<(), String>;
}

impl TaskEnd for () {
    fn into_result(self) -> Result<(), String> {
        Ok(())
    }
}

impl TaskEnd for Result<(), String> {
    fn into_result(self) -> Result<(), String> {
        self
    }
}

/// A task that failed: its name and how.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the builder's {task} task {how}")]
pub struct TaskFailed {
    pub task: &'static str,
    /// "ended: <why>", "ended" or "panicked: <message>".
    pub how: String,
}

/// The supervised set (see the module doc).
pub struct Supervisor {
    tasks: JoinSet<Result<(), TaskFailed>>,
    names: HashMap<Id, &'static str>,
    token: CancellationToken,
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl Supervisor {
    pub fn new() -> Self {
        Self {
            tasks: JoinSet::new(),
            names: HashMap::new(),
            token: CancellationToken::new(),
        }
    }

    /// The token every task stops on; [`Ends::AfterCleanup`] tasks watch it themselves.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Runs `task`, named `name` in failures. `Err(why)` from the task ([`TaskEnd`]) is a
    /// failure whatever `ends` says.
    pub fn spawn<F>(&mut self, name: &'static str, ends: Ends, task: F)
    where
        F: Future + Send + 'static,
        F::Output: TaskEnd,
    {
        let token = self.token.clone();
        let failed = move |how: String| Err(TaskFailed { task: name, how });
        let handle = self.tasks.spawn(async move {
            let ended = match ends {
                Ends::WithDaemon | Ends::Early => tokio::select! {
                    _ = token.cancelled() => return Ok(()),
                    ended = task => ended,
                },
                Ends::AfterCleanup => task.await,
            }
            .into_result();
            match ended {
                Err(why) => failed(format!("ended: {why}")),
                Ok(()) if ends == Ends::Early || token.is_cancelled() => Ok(()),
                Ok(()) => failed("ended".to_owned()),
            }
        });
        self.names.insert(handle.id(), name);
    }

    /// Resolves with the first task that fails while the builder runs; pending while none has
    /// (and for ever once every task ended well).
    pub async fn failed(&mut self) -> TaskFailed {
        loop {
            match self.tasks.join_next_with_id().await {
                None => std::future::pending::<()>().await,
                Some(joined) => {
                    if let Some(failure) = self.judge(joined) {
                        return failure;
                    }
                }
            }
        }
    }

    /// Cancels the token and waits for every task; returns the failures seen meanwhile.
    pub async fn shutdown(mut self) -> Vec<TaskFailed> {
        self.token.cancel();
        let mut failures = Vec::new();
        while let Some(joined) = self.tasks.join_next_with_id().await {
            failures.extend(self.judge(joined));
        }
        failures
    }

    fn judge(
        &mut self,
        joined: Result<(Id, Result<(), TaskFailed>), tokio::task::JoinError>,
    ) -> Option<TaskFailed> {
        match joined {
            Ok((id, result)) => {
                self.names.remove(&id);
                result.err()
            }
            Err(err) => {
                let task = self.names.remove(&err.id()).unwrap_or("unnamed");
                let how = match err.try_into_panic() {
                    Ok(panic) => format!("panicked: {}", panic_message(panic.as_ref())),
                    Err(err) => format!("was aborted: {err}"),
                };
                Some(TaskFailed { task, how })
            }
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_task_that_ends_while_the_builder_runs_is_named() {
        let mut supervisor = Supervisor::new();
        supervisor.spawn("sampler", Ends::WithDaemon, std::future::pending::<()>());
        supervisor.spawn("api", Ends::WithDaemon, async {
            Err("its subscription ended".to_owned())
        });
        let failed = supervisor.failed().await;
        assert_eq!(failed.task, "api");
        assert_eq!(
            failed.to_string(),
            "the builder's api task ended: its subscription ended"
        );
        assert!(supervisor.shutdown().await.is_empty());
    }

    #[tokio::test]
    async fn a_panicking_task_is_named_with_its_message() {
        let mut supervisor = Supervisor::new();
        fn bucket_gone() {
            panic!("bucket gone");
        }
        supervisor.spawn("registry", Ends::AfterCleanup, async { bucket_gone() });
        let failed = supervisor.failed().await;
        assert_eq!(failed.task, "registry");
        assert_eq!(failed.how, "panicked: bucket gone");
    }

    #[tokio::test]
    async fn shutdown_cancels_every_task_and_waits_for_cleanups() {
        let mut supervisor = Supervisor::new();
        let cleaned = Arc::new(AtomicBool::new(false));
        let token = supervisor.token();
        let done = cleaned.clone();
        supervisor.spawn("registry", Ends::AfterCleanup, async move {
            token.cancelled().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            done.store(true, Ordering::SeqCst);
            Ok(())
        });
        supervisor.spawn("api", Ends::WithDaemon, std::future::pending::<()>());
        supervisor.spawn("idle exit", Ends::Early, async { Ok(()) });
        // A limit that has not fired (a long --lifetime) does not hold shutdown up.
        supervisor.spawn("lifetime", Ends::Early, std::future::pending::<()>());
        let failed = tokio::time::timeout(Duration::from_millis(100), supervisor.failed()).await;
        assert!(failed.is_err(), "no task failed: {failed:?}");
        assert!(supervisor.shutdown().await.is_empty());
        assert!(
            cleaned.load(Ordering::SeqCst),
            "shutdown waited for the cleanup"
        );
    }

    #[tokio::test]
    async fn a_cleanup_task_that_returns_before_shutdown_failed() {
        let mut supervisor = Supervisor::new();
        supervisor.spawn("registry", Ends::AfterCleanup, async { Ok(()) });
        assert_eq!(
            supervisor.failed().await,
            TaskFailed {
                task: "registry",
                how: "ended".to_owned()
            }
        );
    }
}
