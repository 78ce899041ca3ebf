//! The limits of an ephemeral (session) builder: how many requests it takes (`--once`,
//! `--max-builds`), how long it waits for one (`--idle-exit`) and how long it takes them at all
//! (`--lifetime`). Reaching a limit drains the builder, exactly as `builder drain` does: it
//! takes no new request, finishes the running ones, and returns. Nothing is pulled that the
//! session may not start, so a limit never strands a request.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use homelab_deploy_protocol::BuildStatus;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};

use crate::stop::Stop;

/// Limits of a session; all unset is a long-running builder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Session {
    /// Requests taken before the builder stops taking more (`--once` is 1).
    pub max_builds: Option<u64>,
    /// Stop once no request has been running or taken for this long.
    pub idle_exit: Option<Duration>,
    /// Stop taking requests this long after the start; running ones finish.
    pub lifetime: Option<Duration>,
}

impl Session {
    /// A builder with any limit is ephemeral: it may take a generated name, keeps its state in
    /// a directory of its own that it removes at exit, and shows as ephemeral in the registry.
    pub fn is_ephemeral(&self) -> bool {
        self.max_builds.is_some() || self.idle_exit.is_some() || self.lifetime.is_some()
    }

    /// The configured name, or for an ephemeral builder without one a unique name:
    /// `<hostname>-<NUID>` (the host name cut to 32 characters of `[A-Za-z0-9_-]`).
    pub fn builder_name(&self, configured: Option<&str>) -> String {
        if let Some(name) = configured {
            return name.to_owned();
        }
        let host: String = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .take(32)
            .collect();
        let host = if host.is_empty() { "ephemeral" } else { &host };
        format!("{host}-{}", nuid::next())
    }

    /// Where the builder keeps its git mirrors, GC roots and process records: `state_dir`
    /// itself, or `state_dir/sessions/<name>` for an ephemeral builder.
    pub fn state_dir(&self, state_dir: &Path, name: &str) -> PathBuf {
        if self.is_ephemeral() {
            state_dir.join("sessions").join(name)
        } else {
            state_dir.to_owned()
        }
    }
}

/// What a session did: the figures the exit code of `builder --once` is made of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionReport {
    /// Requests taken from the queue.
    pub taken: u64,
    /// Of those, finished `succeeded` by this builder.
    pub succeeded: u64,
    /// Of those, finished `failed` or `cancelled` by this builder (a refused request too).
    pub failed: u64,
}

impl SessionReport {
    /// Taken requests this builder stored no `finished` event for: handed back (SIGTERM),
    /// taken over by another builder, or already ended by an earlier delivery.
    pub fn unanswered(&self) -> u64 {
        self.taken - self.succeeded - self.failed
    }
}

/// The right to pull one request; given back when dropped without [`Tracker::taken`].
pub(crate) struct Ticket(Option<OwnedSemaphorePermit>);

/// The running session, shared by the pull loops and their jobs.
pub(crate) struct Tracker {
    max_builds: Option<u64>,
    /// One permit per request the session may still take; `None` without `--max-builds`.
    tickets: Option<Arc<Semaphore>>,
    /// Requests running now; the idle timer runs while it is 0.
    busy: watch::Sender<usize>,
    report: Mutex<SessionReport>,
    stop: watch::Sender<Stop>,
}

impl Tracker {
    pub fn new(session: &Session, stop: watch::Sender<Stop>) -> Arc<Self> {
        let tickets = session.max_builds.map(|max| {
            // More than a semaphore holds is no limit in practice.
            let permits = usize::try_from(max)
                .unwrap_or(usize::MAX)
                .min(Semaphore::MAX_PERMITS);
            Arc::new(Semaphore::new(permits))
        });
        Arc::new(Self {
            max_builds: session.max_builds,
            tickets,
            busy: watch::channel(0).0,
            report: Mutex::new(SessionReport::default()),
            stop,
        })
    }

    fn lock_report(&self) -> std::sync::MutexGuard<'_, SessionReport> {
        crate::lock(&self.report)
    }

    pub fn report(&self) -> SessionReport {
        *self.lock_report()
    }

    /// Waits until the session may pull one more request. With every request taken that
    /// `--max-builds` allows, it never resolves (the builder drains meanwhile).
    pub async fn ticket(&self) -> Ticket {
        match &self.tickets {
            None => Ticket(None),
            Some(tickets) => match tickets.clone().acquire_owned().await {
                Ok(permit) => Ticket(Some(permit)),
                // The semaphore is never closed.
                Err(_) => std::future::pending().await,
            },
        }
    }

    /// A request was taken with `ticket`; drains the builder when it was the last one allowed.
    pub fn taken(&self, ticket: Ticket) {
        if let Some(permit) = ticket.0 {
            permit.forget();
        }
        self.busy.send_modify(|busy| *busy += 1);
        let taken = {
            let mut report = self.lock_report();
            report.taken += 1;
            report.taken
        };
        if self.max_builds.is_some_and(|max| taken >= max) {
            self.drain(&format!("took {taken} request(s), its --max-builds"));
        }
    }

    /// A taken request ended; `verdict` as [`crate::job::Jobs::run`] returns it.
    pub fn done(&self, verdict: Option<BuildStatus>) {
        {
            let mut report = self.lock_report();
            match verdict {
                Some(BuildStatus::Succeeded) => report.succeeded += 1,
                Some(_) => report.failed += 1,
                None => {}
            }
        }
        self.busy.send_modify(|busy| *busy = busy.saturating_sub(1));
    }

    fn drain(&self, why: &str) {
        let asked = self.stop.send_if_modified(|stop| {
            let running = *stop == Stop::Running;
            if running {
                *stop = Stop::Drain;
            }
            running
        });
        if asked {
            info!(
                reason = why,
                "session limit reached: taking no new request, finishing the running ones"
            );
        }
    }

    /// Drains the builder once no request has run or been taken for `idle`.
    pub async fn idle_exit(self: Arc<Self>, idle: Duration) {
        let mut busy = self.busy.subscribe();
        loop {
            if busy.wait_for(|busy| *busy == 0).await.is_err() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(idle) => {
                    self.drain(&format!("no request for {}s, its --idle-exit", idle.as_secs_f64()));
                    return;
                }
                changed = busy.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Drains the builder `lifetime` after it was called.
    pub async fn lifetime(self: Arc<Self>, lifetime: Duration) {
        tokio::time::sleep(lifetime).await;
        self.drain(&format!(
            "ran for {}s, its --lifetime",
            lifetime.as_secs_f64()
        ));
    }
}

/// The state directory of an ephemeral builder, removed when the builder ends whichever way
/// it ends (a failed start too).
pub(crate) struct SessionDir(pub PathBuf);

impl Drop for SessionDir {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_dir_all(&self.0) {
            if err.kind() != std::io::ErrorKind::NotFound {
                warn!(path = %self.0.display(), error = %err, "removing the session's state directory failed");
            }
        }
        // `sessions/` itself goes when this was the last session on the machine.
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}
