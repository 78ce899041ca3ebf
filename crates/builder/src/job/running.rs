//! The requests running on this builder, by id: what the registry announces, what a cancel
//! stops, and what a shutdown hands back. Shared by the jobs (which add and remove themselves),
//! the control API and the registry; it holds no build context.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use homelab_deploy_protocol::api::BuilderState;
use homelab_deploy_protocol::Identity;
use tokio::sync::{watch, Notify};

use crate::access::{Access, Refused};

/// Why a running request must stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interrupt {
    /// The builder is going away: the request goes back to the queue.
    Shutdown,
    /// Cancelled (by a person, or by a newer `replace` request): it ends `cancelled`.
    Cancel { by: Canceller, reason: String },
}

/// Who cancelled a request: the free-text note of the cancel (`requested_by`, or "replace
/// request <id>"), and the verified signer when the cancel was signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canceller {
    pub note: String,
    pub key: Option<Identity>,
}

impl Canceller {
    /// A cancel by the builder itself, with no signer.
    pub fn note(note: impl Into<String>) -> Self {
        Self {
            note: note.into(),
            key: None,
        }
    }
}

impl std::fmt::Display for Canceller {
    /// The verified signer when there is one, else the note.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.key {
            Some(key) => write!(f, "{key}"),
            None => f.write_str(&self.note),
        }
    }
}

/// What [`Running::cancel`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The request runs here; its build is being stopped.
    Cancelling,
    /// The request does not run here.
    NotHere,
    /// The sender may not cancel it ([`Access::may_cancel`]).
    Refused(Refused),
}

/// One request running here: what the registry shows of it, and how to stop it.
pub(super) struct RunningJob {
    pub(super) repo: String,
    pub(super) target: String,
    /// Who requested it (verified), for [`Access::may_cancel`].
    pub(super) requested_by_key: Option<Identity>,
    pub(super) interrupt: watch::Sender<Option<Interrupt>>,
}

/// The requests running here (see the module doc).
pub struct Running {
    jobs: Mutex<HashMap<String, RunningJob>>,
    /// Woken when a request starts or stops running here, so the registry announces it at
    /// once: clients tell a request a builder holds from one waiting to be handed out again.
    changed: Notify,
    /// Who may cancel what (`[access]`).
    access: Arc<Access>,
}

impl Running {
    /// No request running; cancels are checked against `access`.
    pub fn new(access: Arc<Access>) -> Self {
        Self {
            jobs: Mutex::default(),
            changed: Notify::new(),
            access,
        }
    }

    /// What this builder is building now.
    pub fn states(&self) -> Vec<BuilderState> {
        self.lock()
            .iter()
            .map(|(id, job)| BuilderState::Building {
                repo: job.repo.clone(),
                target: job.target.clone(),
                id: id.clone(),
            })
            .collect()
    }

    /// Cancels request `id` if it runs here and `by` may cancel it.
    pub fn cancel(&self, id: &str, by: &Canceller, reason: &str) -> CancelOutcome {
        match self.lock().get(id) {
            Some(job) => {
                if let Err(why) =
                    self.access
                        .may_cancel(by.key.as_ref(), job.requested_by_key.as_ref(), id)
                {
                    return CancelOutcome::Refused(why);
                }
                let _ = job.interrupt.send(Some(Interrupt::Cancel {
                    by: by.clone(),
                    reason: reason.to_owned(),
                }));
                CancelOutcome::Cancelling
            }
            None => CancelOutcome::NotHere,
        }
    }

    /// Stops every running build; their requests go back to the queue.
    pub fn interrupt_all(&self) {
        for job in self.lock().values() {
            let _ = job.interrupt.send(Some(Interrupt::Shutdown));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, RunningJob>> {
        crate::lock(&self.jobs)
    }

    /// Whether no request runs here.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Resolves once a request started or stopped running here since the last call.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Adds request `id`, running here until [`Running::remove`].
    pub(super) fn insert(&self, id: String, job: RunningJob) {
        self.lock().insert(id, job);
        self.changed.notify_one();
    }

    pub(super) fn remove(&self, id: &str) {
        self.lock().remove(id);
        self.changed.notify_one();
    }
}
