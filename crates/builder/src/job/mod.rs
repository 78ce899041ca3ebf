//! A build request's life, top to bottom:
//!
//! 1. parse and validate the request (a refusal still ends with a `finished` event when its id is
//!    known, and is acked so it is never redelivered);
//! 2. resolve the ref or rev to one commit in the repo's mirror;
//! 3. list the flake's hosts at that commit and pick the ones the target asks for;
//! 4. for each host, one at a time: evaluate its toplevel, build it, report `host_finished`;
//!    one failing host never stops the others;
//! 5. publish `finished` with every host's result, then ack.
//!
//! All the while the request is kept alive with progress acks, so only a builder that died lets
//! it be redelivered. NATS, git and nix sit behind [`Publisher`], [`Mirror`] and [`Nix`].

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use futures::{StreamExt, TryStreamExt};
use homelab_deploy_client::inspect::{
    blank_state, fold_event, fold_events, request_events, PendingRequest,
};
use homelab_deploy_protocol::api::{BuilderState, ErrorCode, RequestPhase, RequestState};
use homelab_deploy_protocol::diff::MAX_LISTED_PACKAGES;
use homelab_deploy_protocol::request::parse_request;
use homelab_deploy_protocol::subject::{
    attempts_subject, events_subject, logs_subject, request_subject, MSG_ID_HEADER,
};
use homelab_deploy_protocol::{
    BuildStatus, ClosureDiff, DiffStatus, Event, EventBody, HostResult, HostStatus, Identity,
    ParsedRequest, RepoName, RequestId, Target,
};
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn, Instrument};

use crate::access::Access;
use crate::bus::{last_event, BusError, LogFence, Publisher, RequestMessage};
use crate::cache::EvalCache;
use crate::closures::History;
use crate::config::{Evaluation, RepoConfig, Timeouts};
use crate::git::{GitError, Mirror, Resolved, Wanted};
use crate::logs::LogBatcher;
use crate::nix::{BuildOutput, Nix, NixError};
use crate::state::StateStore;

mod replace;
mod roots;

use replace::older_queued_holder;
pub use replace::ReplaceIndex;
pub(crate) use roots::gc_root_name;
pub use roots::DrvRoots;

/// Longest error excerpt kept in a host result or a `finished` event.
const MAX_ERROR_BYTES: usize = 4096;
/// Shortest excerpt an event that must shrink to fit `max_payload` keeps before leaving
/// excerpts out.
const MIN_ERROR_BYTES: usize = 128;
/// Progress events of one host are at most this frequent.
const PROGRESS_EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// Everything a job needs from the builder; shared by all jobs.
pub struct Jobs {
    pub builder_name: String,
    pub state_dir: PathBuf,
    pub nix: Nix,
    pub publisher: Publisher,
    /// The request-state bucket each event is folded into.
    pub state: StateStore,
    pub timeouts: Timeouts,
    pub evaluation: Evaluation,
    /// Hosts of one request built at once.
    pub build_jobs: usize,
    /// Attempts at a request (claims not ended by a hand-back, [`crate::attempts`]) before it is
    /// given up.
    pub max_attempts: u64,
    /// Host lists and toplevel drvs already evaluated, per commit.
    pub evaluated: EvalCache,
    pub repos: HashMap<RepoName, ServedRepo>,
    /// The requests stream, to spot newer `replace` requests for a running request's target.
    pub requests: jetstream::stream::Stream,
    /// What of the requests stream has been read for `replace` requests.
    pub replace_index: Arc<ReplaceIndex>,
    /// How often a running request is kept alive and checked for a newer `replace` request.
    pub watch_interval: Duration,
    /// Requests running here, by id.
    pub(crate) running: Mutex<HashMap<String, RunningJob>>,
    /// Woken when a request starts or stops running here, so the registry announces it at
    /// once: clients tell a request a builder holds from one waiting to be handed out again.
    pub running_changed: tokio::sync::Notify,
    /// Who may build and cancel what (`[access]`).
    pub access: Arc<Access>,
    /// Each host's recent builds, for closure diffs.
    pub history: History,
    /// Heavy lanes and warm-cache affinity: what each host needs, who built it last.
    pub placement: crate::placement::Placement,
}

/// A repo this builder serves, with its mirror (which keeps two jobs of the repo from fetching
/// into it at once).
pub struct ServedRepo {
    pub config: RepoConfig,
    /// The builder's nix with this repo's `impure` and `nix_options` ([`Nix::for_repo`]).
    pub nix: Nix,
    pub mirror: Mirror,
}

/// Both ends of a running request's interrupt: the sender for its watchers, the receiver for
/// the job.
type InterruptChannel = (
    watch::Sender<Option<Interrupt>>,
    watch::Receiver<Option<Interrupt>>,
);

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

/// What [`Jobs::cancel`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The request runs here; its build is being stopped.
    Cancelling,
    /// The request does not run here.
    NotHere,
    /// The sender may not cancel it ([`Access::may_cancel`]).
    Refused(String),
}

pub(crate) struct RunningJob {
    repo: String,
    target: String,
    /// Who requested it (verified), for [`Access::may_cancel`].
    requested_by_key: Option<Identity>,
    interrupt: watch::Sender<Option<Interrupt>>,
}

/// Why a job stopped without finishing its request.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A publish failed in a way a later attempt may not ([`BusError::Refused`] becomes
    /// [`JobError::Unpublishable`] instead).
    #[error(transparent)]
    Bus(BusError),
    #[error("stopped by shutdown")]
    Aborted,
    #[error("another builder took the request over (it was redelivered)")]
    Superseded,
    /// An event or log batch the server refuses whatever the retries (too large, or a
    /// subject this builder may not publish to): the request ends with a short `finished` that
    /// says so, instead of going back to the queue.
    #[error("{0}")]
    Unpublishable(String),
}

impl From<BusError> for JobError {
    fn from(err: BusError) -> Self {
        match err {
            BusError::Refused { .. } => JobError::Unpublishable(err.to_string()),
            // A log batch refused by the fence: another writer took the request's events over.
            BusError::Fenced { .. } => JobError::Superseded,
            other => JobError::Bus(other),
        }
    }
}

/// How a request message was answered.
enum Answered {
    /// Its `finished` event is stored (now, or by an earlier delivery): ack it.
    Finished,
    /// It cannot be answered on any subject, or was answered as malformed: terminate it.
    Never,
}

/// What happened to one host.
enum HostOutcome {
    Done(HostResult),
    Cancelled(HostResult, Canceller, String),
}

impl Jobs {
    /// What this builder is building now.
    pub fn running_states(&self) -> Vec<BuilderState> {
        self.lock_running()
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
        match self.lock_running().get(id) {
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
        for job in self.lock_running().values() {
            let _ = job.interrupt.send(Some(Interrupt::Shutdown));
        }
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<String, RunningJob>> {
        // The map is only touched in short critical sections that cannot panic.
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs one request message to its end, then acks it (or hands it back on shutdown).
    ///
    /// The message is acked, terminated or handed back only after this builder stored an
    /// event under its fence (`finished`, or `requeued`): a builder that lost the request (its
    /// fence broke) leaves the delivery alone, so it can never ack or hand back the delivery
    /// another builder is running.
    ///
    /// With `refusal`, a valid request (one this builder may answer) ends at once, `failed`,
    /// with that error (no builder of the fleet can take it: [`crate::placement`]).
    ///
    /// Returns the status of the `finished` event this builder stored for the request; `None`
    /// when it stored none (handed back on shutdown, taken over, ended by an earlier delivery,
    /// or NATS failed).
    pub async fn run(
        &self,
        message: RequestMessage,
        refusal: Option<String>,
    ) -> Option<BuildStatus> {
        let message = Arc::new(message);
        let (interrupt_tx, interrupt) = watch::channel(None);
        let watcher = tokio::spawn(watch_request(
            message.clone(),
            self.requests.clone(),
            self.replace_index.clone(),
            self.access.clone(),
            interrupt_tx.clone(),
            self.watch_interval,
        ));
        let mut verdict = None;
        let outcome = self
            .run_request(&message, refusal, interrupt_tx, interrupt, &mut verdict)
            .await;
        watcher.abort();
        let ack = match &outcome {
            Ok(Answered::Finished) => message.double_ack().await,
            Ok(Answered::Never) => message.ack_with(AckKind::Term).await,
            Err(JobError::Aborted) => message.ack_with(AckKind::Nak(None)).await,
            // Logged where the request id is known.
            Err(JobError::Superseded) => Ok(()),
            Err(JobError::Bus(err)) => {
                // Not handed back (NAK): without a stored event this builder cannot tell that
                // the delivery is still its own. It comes back after the ack wait.
                error!(error = %err, subject = %message.subject, "could not publish events; the request is redelivered after the ack wait");
                Ok(())
            }
            Err(JobError::Unpublishable(why)) => {
                error!(error = %why, subject = %message.subject, "not even a short finished event could be stored; terminating the request");
                message.ack_with(AckKind::Term).await
            }
        };
        if let Err(err) = ack {
            warn!(error = %err, subject = %message.subject, "acknowledging the request failed; it may be redelivered");
        }
        verdict
    }

    /// Answers the request; `verdict` gets the status of the `finished` event stored here.
    async fn run_request(
        &self,
        message: &RequestMessage,
        refusal: Option<String>,
        interrupt_tx: watch::Sender<Option<Interrupt>>,
        interrupt: watch::Receiver<Option<Interrupt>>,
        verdict: &mut Option<BuildStatus>,
    ) -> Result<Answered, JobError> {
        let info = message.info().ok();
        let stream_seq = info.as_ref().map(|i| i.stream_sequence).unwrap_or(0);
        // The time JetStream stored the request: kept in `started` and `finished`.
        let queued_at = info.as_ref().map(|i| i.published);
        let header_id = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(MSG_ID_HEADER))
            .map(|value| value.as_str().to_owned());
        let started = Instant::now();

        // 1. Parse.
        let request = match parse_request(
            &message.subject,
            header_id.as_deref(),
            &message.payload,
            || nuid::next().to_string(),
        ) {
            Ok(request) => request,
            Err(refusal) => {
                warn!(subject = %message.subject, id = ?refusal.id.as_ref().map(|id| id.to_string()), reason = %refusal.reason, "refused malformed request");
                let (Some(repo), Some(target)) = (refusal.repo, refusal.target) else {
                    return Ok(Answered::Never);
                };
                // An id that breaks the rules cannot name a subject: the answer goes to the id
                // derived from the request's stream sequence, which its publish ack told the
                // client (docs/protocol.md).
                let chosen = refusal.id.is_some();
                let id = match refusal.id {
                    Some(id) => id,
                    None => match RequestId::for_stream_sequence(stream_seq) {
                        Ok(id) => id,
                        Err(_) => return Ok(Answered::Never),
                    },
                };
                let mut events =
                    Events::open(&self.publisher, &self.state, &repo, &target, &id, queued_at)
                        .await?;
                if events.already_finished() {
                    return Ok(Answered::Never);
                }
                if chosen {
                    if let Some(holder) = self.id_holder(&id, &events, stream_seq).await? {
                        return self
                            .refuse_reused_id(message, &repo, &target, &id, holder, started)
                            .await;
                    }
                }
                self.finish_or_explain(
                    &mut events,
                    Finish {
                        error: Some(refusal.reason),
                        code: Some(ErrorCode::Invalid),
                        ..Finish::new(&repo, &target, &self.builder_name, started)
                    },
                )
                .await?;
                *verdict = events.verdict;
                // Terminated, not acked: a malformed request must never be retried.
                return Ok(Answered::Never);
            }
        };
        let mut events = Events::open(
            &self.publisher,
            &self.state,
            &request.repo,
            &request.target,
            &request.id,
            queued_at,
        )
        .await?;
        let answered = self
            .run_parsed(
                message,
                &request,
                refusal,
                &mut events,
                (interrupt_tx, interrupt),
                started,
            )
            .await;
        *verdict = events.verdict;
        answered
    }

    /// Runs a valid request (parsed from `message`) whose events subject is open.
    async fn run_parsed(
        &self,
        message: &RequestMessage,
        request: &ParsedRequest,
        refusal: Option<String>,
        events: &mut Events<'_>,
        (interrupt_tx, interrupt): InterruptChannel,
        started: Instant,
    ) -> Result<Answered, JobError> {
        let stream_seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let ParsedRequest {
            id, repo, target, ..
        } = request;
        if events.already_finished() {
            info!(request_id = %id, "request already has a finished event (cancelled while queued, or a reused id); not building it again");
            return Ok(Answered::Finished);
        }
        if let Some(holder) = self.id_holder(id, events, stream_seq).await? {
            return self
                .refuse_reused_id(message, repo, target, id, holder, started)
                .await;
        }
        match self
            .access
            .build_request(message.headers.as_ref(), repo, target, &message.payload)
        {
            Ok(sender) => events.requested_by_key = sender,
            Err(reason) => {
                warn!(request_id = %id, reason = %reason, "refused a request: its signature or its signer's rights");
                crate::metrics::request_received(repo.as_str());
                self.finish_or_explain(
                    events,
                    Finish {
                        error: Some(reason),
                        code: Some(ErrorCode::Forbidden),
                        ..Finish::new(repo, target, &self.builder_name, started)
                    },
                )
                .await?;
                // Terminated: sent again, it would be refused again.
                return Ok(Answered::Never);
            }
        }
        let claims = attempts_subject(repo, target, id);
        let last_claim = crate::attempts::last_claim(self.publisher.jetstream(), &claims).await?;
        let attempts = events
            .attempts(id, last_claim.and_then(|(_, claim)| claim).as_ref())
            .await?;
        crate::metrics::request_received(repo.as_str());
        if attempts.failed >= self.max_attempts {
            let mut finish = Finish::new(repo, target, &self.builder_name, started);
            finish.code = Some(ErrorCode::GaveUp);
            finish.error = Some(format!(
                "given up after {} attempts (builder.max_attempts); {}",
                attempts.failed,
                attempts
                    .last_ended
                    .as_deref()
                    .unwrap_or("the last one ended without a word")
            ));
            return self.finish_or_explain(events, finish).await;
        }
        if let Some(reason) = refusal {
            warn!(request_id = %id, reason = %reason, "refused a request no builder of the fleet can take");
            self.finish_or_explain(
                events,
                Finish {
                    error: Some(reason),
                    ..Finish::new(repo, target, &self.builder_name, started)
                },
            )
            .await?;
            // Terminated: it is answered.
            return Ok(Answered::Never);
        }
        // Counted before any work, so an attempt that dies before its `started` counts too.
        let delivered = message.info().map_or(1, |info| info.delivered as u64);
        let claim = crate::attempts::claim(
            &self.publisher,
            &claims,
            id.as_str(),
            &self.builder_name,
            (attempts.previous, delivered),
        )
        .await?;
        info!(request_id = %id, repo = %repo, target = target.as_str(), attempt = claim.attempt, mode = request.mode.as_str(), requested_by = ?request.requested_by, "request received");
        self.lock_running().insert(
            id.to_string(),
            RunningJob {
                repo: repo.to_string(),
                target: target.to_string(),
                requested_by_key: events.requested_by_key.clone(),
                interrupt: interrupt_tx,
            },
        );
        self.running_changed.notify_one();
        let span = tracing::info_span!("request", request_id = %id, repo = %repo, target = target.as_str());
        let result = self
            .build_request(
                request,
                events,
                interrupt,
                claim.attempt,
                stream_seq,
                started,
            )
            .instrument(span)
            .await;
        self.lock_running().remove(id.as_str());
        self.running_changed.notify_one();
        match result {
            Ok(()) => Ok(Answered::Finished),
            Err(JobError::Aborted) => {
                // Without it, the request would look running until a builder takes it again;
                // stored under the fence, it also proves the delivery is still this builder's.
                let requeued = EventBody::Requeued {
                    builder: self.builder_name.clone(),
                    reason: format!("builder {} is shutting down", self.builder_name),
                };
                events.emit(requeued).await?;
                Err(JobError::Aborted)
            }
            Err(JobError::Superseded) => {
                warn!(request_id = %id, "another writer published events of this request meanwhile (it was redelivered or cancelled); standing down without acking");
                Err(JobError::Superseded)
            }
            Err(JobError::Unpublishable(why)) => {
                let mut finish = Finish::new(repo, target, &self.builder_name, started);
                finish.error = Some(format!("the request cannot be reported in full: {why}"));
                finish.code = Some(ErrorCode::TooLarge);
                self.finish_or_explain(events, finish).await
            }
            Err(err) => Err(err),
        }
    }

    /// The stream sequence of another request message that holds `id`: the one the id's
    /// events were started for (`started.request_seq`), or an older one still queued. Whoever
    /// sends someone's id again (after the requests stream's 2-minute duplicate window) must
    /// not end, take over or answer that request; its own message is answered under
    /// `stream-seq-<N>` instead ([`Jobs::refuse_reused_id`]).
    async fn id_holder(
        &self,
        id: &RequestId,
        events: &Events<'_>,
        stream_seq: u64,
    ) -> Result<Option<u64>, JobError> {
        if stream_seq == 0 {
            return Ok(None);
        }
        if events.seq > 0 {
            let stored = request_events(self.publisher.jetstream(), id)
                .await
                .map_err(|err| events_error(&err))?;
            return Ok(stored
                .iter()
                .find_map(|event| match &event.body {
                    EventBody::Started {
                        request_seq: Some(seq),
                        ..
                    } => Some(*seq),
                    _ => None,
                })
                .filter(|seq| *seq != stream_seq));
        }
        Ok(older_queued_holder(&self.requests, id, stream_seq).await)
    }

    /// Answers `message`, whose id another request holds, under the message's own
    /// `stream-seq-<N>` id (which its publish ack told the sender), and terminates it.
    async fn refuse_reused_id(
        &self,
        message: &RequestMessage,
        repo: &RepoName,
        target: &Target,
        id: &RequestId,
        holder: u64,
        started: Instant,
    ) -> Result<Answered, JobError> {
        let info = message.info().ok();
        let stream_seq = info.as_ref().map_or(0, |i| i.stream_sequence);
        let queued_at = info.map(|i| i.published);
        warn!(request_id = %id, stream_seq, holder, "refused a request whose id another request holds");
        let Ok(own) = RequestId::for_stream_sequence(stream_seq) else {
            return Ok(Answered::Never);
        };
        let mut events =
            Events::open(&self.publisher, &self.state, repo, target, &own, queued_at).await?;
        if !events.already_finished() {
            let finish = Finish {
                error: Some(format!(
                    "refused: id {id} belongs to another request (stream sequence {holder}); send this request again with a new id"
                )),
                code: Some(ErrorCode::Invalid),
                ..Finish::new(repo, target, &self.builder_name, started)
            };
            self.finish_or_explain(&mut events, finish).await?;
        }
        Ok(Answered::Never)
    }

    /// Publishes `finish`; when the server refuses it whatever the retries, publishes a short
    /// one that says why instead.
    async fn finish_or_explain(
        &self,
        events: &mut Events<'_>,
        finish: Finish,
    ) -> Result<Answered, JobError> {
        let short = Finish {
            hosts: Vec::new(),
            rev: finish.rev.clone(),
            ..Finish::new_like(&finish)
        };
        match events.finish(finish).await {
            Ok(()) => Ok(Answered::Finished),
            Err(JobError::Unpublishable(why)) => {
                let mut short = short;
                short.status = BuildStatus::Failed;
                short.code = Some(ErrorCode::TooLarge);
                short.error = Some(format!(
                    "the request's finished event could not be stored: {why}"
                ));
                events.finish(short).await?;
                Ok(Answered::Finished)
            }
            Err(err) => Err(err),
        }
    }

    async fn build_request(
        &self,
        request: &ParsedRequest,
        events: &mut Events<'_>,
        mut interrupt: watch::Receiver<Option<Interrupt>>,
        attempt: u64,
        stream_seq: u64,
        started: Instant,
    ) -> Result<(), JobError> {
        let ParsedRequest {
            id, repo, target, ..
        } = request;
        let Some(served) = self.repos.get(repo) else {
            let reason = format!("repo {repo} is not served by builder {}", self.builder_name);
            return events
                .finish_refused(
                    &self.builder_name,
                    repo,
                    target,
                    (ErrorCode::NotServed, reason),
                    started,
                )
                .await;
        };
        let limits = match request_limits(&self.timeouts, request) {
            Ok(limits) => limits,
            Err(reason) => {
                return events
                    .finish_refused(
                        &self.builder_name,
                        repo,
                        target,
                        (ErrorCode::Invalid, reason),
                        started,
                    )
                    .await
            }
        };
        let request_deadline = Deadline {
            at: tokio::time::Instant::from_std(started) + limits.request,
            why: format!("the request timed out after {}s", limits.request.as_secs()),
        };
        if let Some(newer) = self
            .replace_index
            .newer_replace(
                &self.requests,
                &self.access,
                &request_subject(repo, target),
                stream_seq,
            )
            .await
        {
            let mut finish = Finish::new(repo, target, &self.builder_name, started);
            finish.status = BuildStatus::Cancelled;
            finish.cancelled_by = Some(Canceller::note(format!("replace request {newer}")));
            finish.code = Some(ErrorCode::Superseded);
            finish.error = Some(format!(
                "superseded by newer request {newer} (mode replace)"
            ));
            return events.finish(finish).await;
        }

        // 2. Resolve one commit, and 3. list the hosts at it. Both race the request's
        //    interrupt and deadline: dropping the losing future kills its git or nix process.
        let finish_early = |(code, error): (ErrorCode, String), rev: Option<String>| Finish {
            error: Some(error),
            code: Some(code),
            rev,
            ..Finish::new(repo, target, &self.builder_name, started)
        };
        let resolved = tokio::select! {
            resolved = self.resolve(served, request.rev.as_deref(), request.git_ref.as_deref()) => resolved,
            _ = tokio::time::sleep_until(request_deadline.at) => Err((ErrorCode::TimedOut, format!("{} while resolving the commit", request_deadline.why))),
            why = interrupted(&mut interrupt) => return self.stopped_early(events, why, finish_early((ErrorCode::Cancelled, String::new()), None)).await,
        };
        let resolved = match resolved {
            Ok(resolved) => resolved,
            Err(reason) => return events.finish(finish_early(reason, None)).await,
        };
        let flake = served.mirror.flake_url(&resolved);
        let rev = resolved.rev;
        let hosts = tokio::select! {
            hosts = self.hosts_to_build(&flake, repo, target, &rev) => hosts,
            _ = tokio::time::sleep_until(request_deadline.at) => Err((ErrorCode::TimedOut, format!("{} while listing the flake's hosts", request_deadline.why))),
            why = interrupted(&mut interrupt) => return self.stopped_early(events, why, finish_early((ErrorCode::Cancelled, String::new()), Some(rev))).await,
        };
        let hosts = match hosts {
            Ok(hosts) => hosts,
            Err(reason) => return events.finish(finish_early(reason, Some(rev))).await,
        };
        events
            .emit(EventBody::Started {
                builder: self.builder_name.clone(),
                repo: repo.to_string(),
                target: target.to_string(),
                rev: rev.clone(),
                hosts: hosts.clone(),
                requested_by: request.requested_by.clone(),
                requested_by_key: events.requested_by_key.clone(),
                attempt,
                request_seq: (stream_seq > 0).then_some(stream_seq),
                queued_at: events.queued_at,
            })
            .await?;

        // 4. Evaluate the hosts together where the memory budget allows, then build each in
        //    turn; after a cancel the rest are cancelled without building.
        let total = hosts.len();
        let mut cancelled: Option<(Canceller, String)> = None;
        let logs = logs_subject(repo, target, id);
        let roots = DrvRoots::new(&self.state_dir);
        let checkout = Checkout {
            flake: &flake,
            repo,
            rev: &rev,
            roots: &roots,
        };
        let drvs = tokio::select! {
            drvs = self.evaluate_together(&checkout, &hosts, id) => drvs,
            _ = tokio::time::sleep_until(request_deadline.at) => HashMap::new(),
            why = interrupted(&mut interrupt) => match why {
                Interrupt::Shutdown => return Err(JobError::Aborted),
                Interrupt::Cancel { by, reason } => {
                    cancelled = Some((by, reason));
                    HashMap::new()
                }
            },
        };
        // Up to `build_jobs` hosts at once (1 by default: one at a time, in order).
        let cancelled = Mutex::new(cancelled);
        let shared_events = tokio::sync::Mutex::new(events);
        let build_one = |(position, host): (usize, String)| {
            let mut interrupt = interrupt.clone();
            let (cancelled, shared_events, checkout, logs, drvs, request_deadline) = (
                &cancelled,
                &shared_events,
                &checkout,
                &logs,
                &drvs,
                &request_deadline,
            );
            async move {
                let host = &host;
                let index = position + 1;
                if lock(cancelled).is_some() {
                    return Ok(skipped_host(host, HostStatus::Cancelled, None));
                }
                if request_deadline.passed() {
                    let why = Some(request_deadline.why.clone());
                    return Ok(skipped_host(host, HostStatus::TimedOut, why));
                }
                let host_deadline = Deadline {
                    at: tokio::time::Instant::now() + limits.host,
                    why: format!("timed out after {}s (host timeout)", limits.host.as_secs()),
                };
                let deadline = if host_deadline.at <= request_deadline.at {
                    host_deadline
                } else {
                    request_deadline.clone()
                };
                let started = EventBody::HostStarted {
                    host: host.clone(),
                    index,
                    total,
                };
                shared_events.lock().await.emit(started).await?;
                let drv = drvs.get(host).map(String::as_str);
                let mut log_lines = 0;
                let mut measured = Measured::default();
                let outcome = self
                    .build_host(
                        shared_events,
                        checkout,
                        HostRun {
                            host,
                            drv,
                            deadline: &deadline,
                            measured: &mut measured,
                            log_lines: &mut log_lines,
                        },
                        logs,
                        id.as_str(),
                        &mut interrupt,
                    )
                    .await?;
                let held = match &outcome {
                    HostOutcome::Done(result) if result.status.is_success() => Some(checkout.rev),
                    _ => None,
                };
                self.placement
                    .learn(repo, host, measured.eval, measured.build, held)
                    .await;
                let result = match outcome {
                    HostOutcome::Done(result) => result,
                    HostOutcome::Cancelled(result, by, reason) => {
                        lock(cancelled).get_or_insert((by, reason));
                        result
                    }
                };
                info!(request_id = %id, host, status = result.status.as_str(), duration_ms = result.duration_ms, "host finished");
                crate::metrics::host_finished(
                    repo.as_str(),
                    host,
                    result.status.as_str(),
                    result.duration_ms as f64 / 1000.0,
                );
                let finished = EventBody::HostFinished {
                    host: host.clone(),
                    index,
                    total,
                    result: result.clone(),
                    log_lines: Some(log_lines),
                };
                shared_events.lock().await.emit(finished).await?;
                Ok::<_, JobError>(result)
            }
        };
        let results: Vec<HostResult> = futures::stream::iter(hosts.iter().cloned().enumerate())
            .map(build_one)
            .buffered(self.build_jobs.max(1))
            .try_collect()
            .await?;
        let events = shared_events.into_inner();
        let cancelled = cancelled
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner());

        // 5. The whole result.
        let mut finish = Finish::new(repo, target, &self.builder_name, started);
        finish.status = BuildStatus::from_hosts(&results);
        if let Some((by, reason)) = cancelled {
            finish.status = BuildStatus::Cancelled;
            finish.error = Some(format!("cancelled by {by}: {reason}"));
            finish.cancelled_by = Some(by);
        }
        finish.rev = Some(rev);
        finish.hosts = results;
        info!(request_id = %id, status = finish.status.as_str(), "request finished");
        events.finish(finish).await
    }

    /// The nix that runs `repo`'s commands: the builder's, with the repo's settings.
    fn nix_of(&self, repo: &RepoName) -> &Nix {
        self.repos
            .get(repo)
            .map(|served| &served.nix)
            .unwrap_or(&self.nix)
    }

    /// Lists the hosts of `repo` at the head of its branch, so the registry can announce them
    /// before the first build. Best effort: a failure is only logged.
    pub async fn discover_hosts(&self, repo: &RepoName) {
        let Some(served) = self.repos.get(repo) else {
            return;
        };
        let discover = async {
            let resolved = self.resolve(served, None, None).await?;
            self.hosts_to_build(
                &served.mirror.flake_url(&resolved),
                repo,
                &Target::All,
                &resolved.rev,
            )
            .await
            .map(|_| ())
        };
        // Bounded like a request, so a hung remote or evaluation is not waited on forever.
        let limit = self.timeouts.request;
        let outcome = tokio::time::timeout(limit, discover)
            .await
            .unwrap_or_else(|_| {
                Err((
                    ErrorCode::TimedOut,
                    format!("gave up after {}s", limit.as_secs()),
                ))
            });
        if let Err((_, err)) = outcome {
            warn!(repo = %repo, error = %err, "could not list the repo's hosts at start");
        }
    }

    /// Ends a request interrupted before it started building: a cancel finishes it
    /// `cancelled` (with what `finish` knows, e.g. the rev), a shutdown hands it back.
    async fn stopped_early(
        &self,
        events: &mut Events<'_>,
        why: Interrupt,
        mut finish: Finish,
    ) -> Result<(), JobError> {
        match why {
            Interrupt::Shutdown => Err(JobError::Aborted),
            Interrupt::Cancel { by, reason } => {
                info!(request_id = %events.id, cancelled_by = %by, "cancelled before its build started");
                finish.status = BuildStatus::Cancelled;
                finish.code = Some(ErrorCode::Cancelled);
                finish.error = Some(format!("cancelled by {by}: {reason}"));
                finish.cancelled_by = Some(by);
                events.finish(finish).await
            }
        }
    }

    /// Resolves `rev`, else `git_ref`, else the repo's branch, to one pinned commit.
    async fn resolve(
        &self,
        served: &ServedRepo,
        rev: Option<&str>,
        git_ref: Option<&str>,
    ) -> Result<Resolved, (ErrorCode, String)> {
        let wanted = match (rev, git_ref) {
            (Some(rev), _) => Wanted::Rev(rev),
            (None, Some(git_ref)) => Wanted::Ref(git_ref),
            (None, None) => Wanted::Ref(&served.config.git_ref),
        };
        // Dropping this future (cancel, deadline, shutdown) kills the git it waits for.
        served
            .mirror
            .fetch_and_resolve(wanted, &served.config.git_ref)
            .await
            .map_err(|err| {
                let code = match err {
                    GitError::RefNotFound { .. }
                    | GitError::RevNotFound { .. }
                    | GitError::RevAmbiguous { .. } => ErrorCode::UnknownRef,
                    _ => ErrorCode::FetchFailed,
                };
                (code, err.to_string())
            })
    }

    async fn hosts_to_build(
        &self,
        flake: &str,
        repo: &RepoName,
        target: &Target,
        rev: &str,
    ) -> Result<Vec<String>, (ErrorCode, String)> {
        let available = match self.evaluated.hosts(repo.as_str(), rev) {
            Some(hosts) => hosts,
            None => {
                let hosts = self.nix_of(repo).list_hosts(flake).await.map_err(|err| {
                    (
                        ErrorCode::EvalFailed,
                        format!(
                            "cannot list nixosConfigurations of the flake at rev {rev}: {}",
                            cut(&err.excerpt(), MAX_ERROR_BYTES)
                        ),
                    )
                })?;
                self.evaluated.put_hosts(repo.as_str(), rev, hosts.clone());
                hosts
            }
        };
        match target {
            Target::All if available.is_empty() => Err((
                ErrorCode::EvalFailed,
                format!("the flake at rev {rev} has no nixosConfigurations"),
            )),
            Target::All => Ok(available),
            Target::Host(host) if available.contains(host) => Ok(vec![host.clone()]),
            Target::Host(host) => Err((
                ErrorCode::UnknownHost,
                format!(
                    "host {host} is not in the flake's nixosConfigurations at rev {rev}; hosts: {}",
                    available.join(", ")
                ),
            )),
        }
    }

    /// Evaluates and builds one host. Only a failure to publish (or a shutdown) is an error;
    /// everything nix does wrong is the host's result.
    /// The output `drv` was built to, when this builder's GC root for the host still points at
    /// it: nix cannot have collected it, so there is nothing to build and no need to ask nix.
    fn held_by_gc_root(&self, drv: &str, out_link: &Path) -> Option<String> {
        let out_path = self.evaluated.out_path(drv)?;
        let target = std::fs::read_link(out_link).ok()?;
        (target == Path::new(&out_path) && target.exists()).then_some(out_path)
    }

    async fn build_host(
        &self,
        events: &tokio::sync::Mutex<&mut Events<'_>>,
        checkout: &Checkout<'_>,
        run: HostRun<'_>,
        logs: &str,
        request_id: &str,
        interrupt: &mut watch::Receiver<Option<Interrupt>>,
    ) -> Result<HostOutcome, JobError> {
        let Checkout {
            flake,
            repo,
            rev,
            roots,
        } = *checkout;
        let HostRun {
            host,
            drv: evaluated_drv,
            deadline,
            measured,
            log_lines,
        } = run;
        let started = Instant::now();
        let fence = events.lock().await.log_fence.clone();
        let result = |status, out_path, error: Option<String>| HostResult {
            name: host.to_owned(),
            status,
            out_path,
            duration_ms: started.elapsed().as_millis() as u64,
            error: error.map(|e| cut(&e, MAX_ERROR_BYTES)),
            pushed: None,
            push_error: None,
            closure_diff: None,
        };
        let done = |status, out_path, error| Ok(HostOutcome::Done(result(status, out_path, error)));
        let timed_out = || deadline.why.clone();
        let stopped = |why: Interrupt| match why {
            Interrupt::Shutdown => Err(JobError::Aborted),
            Interrupt::Cancel { by, reason } => {
                let error = format!("cancelled by {by}: {reason}");
                Ok(HostOutcome::Cancelled(
                    result(HostStatus::Cancelled, None, Some(error)),
                    by,
                    reason,
                ))
            }
        };

        let evaluate = async {
            match evaluated_drv {
                Some(drv) => Ok(drv.to_owned()),
                None => match self.nix_of(repo).eval_toplevel_drv(flake, host).await {
                    Ok((drv, peak)) => {
                        measured.eval = Some(peak);
                        self.evaluated.put_drv(repo.as_str(), rev, host, &drv);
                        let name = Path::new(&drv).file_name().unwrap_or_default();
                        roots.add(&self.nix, &[&drv], &name.to_string_lossy()).await;
                        Ok(drv)
                    }
                    Err(err) => {
                        // It needed at least what it reached before the limit stopped it.
                        if let NixError::MemoryLimit { rss, .. } = &err {
                            measured.eval = Some(*rss);
                        }
                        Err(err)
                    }
                },
            }
        };
        let drv = tokio::select! {
            drv = evaluate => drv,
            _ = tokio::time::sleep_until(deadline.at) => return done(HostStatus::TimedOut, None, Some(timed_out())),
            why = interrupted(interrupt) => return stopped(why),
        };
        let new_batcher = || {
            LogBatcher::new(
                self.publisher.clone(),
                fence,
                repo.to_string(),
                logs.to_owned(),
                request_id.to_owned(),
                host.to_owned(),
            )
        };
        let drv = match drv {
            Ok(drv) => drv,
            Err(err) => {
                // Events may carry a shortened excerpt (to fit `max_payload`); the logs
                // subject keeps it whole, as it keeps a failed build's log.
                let excerpt = err.excerpt();
                let mut batcher = new_batcher();
                for line in excerpt.lines() {
                    batcher.push(line.to_owned()).await?;
                }
                batcher.flush().await?;
                *log_lines = batcher.lines_published();
                return done(HostStatus::EvalFailed, None, Some(excerpt));
            }
        };

        let out_link = self
            .state_dir
            .join("gcroots")
            .join(repo.as_str())
            .join(gc_root_name(host));
        if let Some(parent) = out_link.parent() {
            if let Err(err) = std::fs::create_dir_all(parent) {
                let error = format!(
                    "cannot create GC root directory {}: {err}",
                    parent.display()
                );
                return done(HostStatus::BuildFailed, None, Some(error));
            }
        }
        let mut batcher = new_batcher();
        if let Some(out_path) = self.held_by_gc_root(&drv, &out_link) {
            let closure_diff = self
                .closure_diff(repo, rev, host, &out_path, &mut batcher)
                .await?;
            *log_lines = batcher.lines_published();
            let mut cached = result(HostStatus::Cached, Some(out_path), None);
            cached.closure_diff = closure_diff;
            return Ok(HostOutcome::Done(self.push(repo, cached, started).await));
        }
        let (output_tx, mut output) = mpsc::channel(256);
        let build = self.nix_of(repo).build(&drv, &out_link, output_tx);
        tokio::pin!(build);
        let mut last_progress: Option<Instant> = None;
        // The newest counts nix reported, and whether an event carried them already.
        let mut latest_progress: Option<(EventBody, bool)> = None;
        let far_future = tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600);
        // Dropping `build` (on timeout or interrupt) kills nix's whole process group.
        let built = loop {
            tokio::select! {
                built = &mut build => break built,
                Some(item) = output.recv() => match item {
                    BuildOutput::Line(line) => batcher.push(line).await?,
                    BuildOutput::Progress { done, expected, running, failed } => {
                        let progress = EventBody::Progress { host: host.to_owned(), done, expected, running, failed };
                        let due = last_progress.is_none_or(|at| at.elapsed() >= PROGRESS_EVENT_INTERVAL);
                        if due {
                            last_progress = Some(Instant::now());
                            events.lock().await.emit(progress.clone()).await?;
                        }
                        latest_progress = Some((progress, due));
                    }
                },
                _ = tokio::time::sleep_until(batcher.deadline().unwrap_or(far_future)) => batcher.flush().await?,
                _ = tokio::time::sleep_until(deadline.at) => {
                    batcher.flush().await?;
                    *log_lines = batcher.lines_published();
                    return done(HostStatus::TimedOut, None, Some(timed_out()));
                }
                why = interrupted(interrupt) => {
                    batcher.flush().await?;
                    *log_lines = batcher.lines_published();
                    return stopped(why);
                }
            }
        };
        while let Some(item) = output.recv().await {
            match item {
                BuildOutput::Line(line) => batcher.push(line).await?,
                BuildOutput::Progress {
                    done,
                    expected,
                    running,
                    failed,
                } => {
                    let progress = EventBody::Progress {
                        host: host.to_owned(),
                        done,
                        expected,
                        running,
                        failed,
                    };
                    latest_progress = Some((progress, false));
                }
            }
        }
        batcher.flush().await?;
        *log_lines = batcher.lines_published();
        // The host's last progress event carries nix's final counts, however close together
        // they came.
        if let Some((progress, false)) = latest_progress {
            events.lock().await.emit(progress).await?;
        }
        let built = match built {
            Ok(built) => built,
            Err(err) => return done(HostStatus::BuildFailed, None, Some(err.excerpt())),
        };
        self.evaluated.put_out_path(&drv, &built.out_path);
        let status = if built.derivations_built == 0 {
            HostStatus::Cached
        } else {
            // A build that built nothing measured only nix itself.
            measured.build = Some(built.peak_rss);
            HostStatus::Built
        };
        let closure_diff = self
            .closure_diff(repo, rev, host, &built.out_path, &mut batcher)
            .await?;
        *log_lines = batcher.lines_published();
        let mut host_result = result(status, Some(built.out_path), None);
        host_result.closure_diff = closure_diff;
        Ok(HostOutcome::Done(
            self.push(repo, host_result, started).await,
        ))
    }

    /// Compares the host's new toplevel with its newest held build at another commit, writes
    /// the whole diff to the host's logs, and keeps the new toplevel for later diffs. `None`
    /// when diffs are off; a failure is the diff's `failed` status, never the host's. Only a
    /// failure to publish the log lines is an error.
    async fn closure_diff(
        &self,
        repo: &RepoName,
        rev: &str,
        host: &str,
        out_path: &str,
        batcher: &mut LogBatcher,
    ) -> Result<Option<ClosureDiff>, JobError> {
        if !self.history.enabled() {
            return Ok(None);
        }
        let host_file = gc_root_name(host);
        let mut diff = match self.history.previous(repo.as_str(), &host_file, rev) {
            Some(previous) => self.history.compare(&self.nix, &previous, out_path).await,
            None => ClosureDiff::no_previous(),
        };
        if let Err(err) = self
            .history
            .record(&self.nix, repo.as_str(), &host_file, rev, out_path)
            .await
        {
            warn!(repo = %repo, host, error = %err, "cannot keep the build for later closure diffs");
        }
        match diff.status {
            DiffStatus::Failed => {
                let error = diff.error.take().unwrap_or_default();
                warn!(repo = %repo, host, error = %error, "closure diff failed");
                batcher
                    .push(format!("closure diff failed: {}", error.trim()))
                    .await?;
                diff.error = Some(cut(&error, MAX_ERROR_BYTES));
            }
            DiffStatus::NoPrevious => {}
            DiffStatus::Compared => {
                for line in diff_log_lines(&diff) {
                    batcher.push(line).await?;
                }
            }
        }
        batcher.flush().await?;
        diff.keep_packages(MAX_LISTED_PACKAGES);
        Ok(Some(diff))
    }

    /// Copies a finished host to the repo's binary cache, when it has one. A failed push is
    /// reported, but the host is still built.
    async fn push(
        &self,
        repo: &RepoName,
        mut host_result: HostResult,
        started: Instant,
    ) -> HostResult {
        let push_store = self
            .repos
            .get(repo)
            .and_then(|served| served.config.push_store());
        if let (Some(store), Some(out_path)) = (push_store, host_result.out_path.clone()) {
            let pushed = self.nix_of(repo).copy_to(&store, &out_path).await;
            host_result.pushed = Some(pushed.is_ok());
            host_result.push_error = pushed.err().map(|err| cut(&err.excerpt(), MAX_ERROR_BYTES));
            host_result.duration_ms = started.elapsed().as_millis() as u64;
        }
        host_result
    }
}

impl Jobs {
    /// Ends a request that was removed from the queue before any builder took it.
    /// `queued` is the message removed from the queue, `repo` its repo.
    pub async fn finish_cancelled_queued(
        &self,
        queued: &PendingRequest,
        repo: &RepoName,
        id: &RequestId,
        by: &Canceller,
        reason: &str,
        requested_by_key: Option<Identity>,
    ) -> Result<(), JobError> {
        let target = &queued.target;
        let mut events = Events::open(
            &self.publisher,
            &self.state,
            repo,
            target,
            id,
            Some(queued.queued_at),
        )
        .await?;
        events.requested_by_key = requested_by_key;
        let mut finish = Finish::new(repo, target, &self.builder_name, Instant::now());
        finish.status = BuildStatus::Cancelled;
        finish.cancelled_by = Some(by.clone());
        finish.error = Some(format!("cancelled by {by} while queued: {reason}"));
        events.finish(finish).await
    }
}

impl Jobs {
    /// Evaluates the toplevels of `hosts` in as few nix processes as `eval_batch_size` and
    /// `eval_memory_limit_mb` allow. A batch that fails (an error `tryEval` cannot catch) or goes
    /// over the memory limit is split in halves and retried; a host left without a drv is
    /// evaluated alone when its turn comes, which also yields its own error message.
    async fn evaluate_together(
        &self,
        checkout: &Checkout<'_>,
        hosts: &[String],
        request_id: &RequestId,
    ) -> HashMap<String, String> {
        let mut drvs = self.evaluate_shared(checkout, hosts, request_id).await;
        let paths: Vec<&str> = drvs.values().map(String::as_str).collect();
        let gone = checkout.roots.add(&self.nix, &paths, "shared").await;
        // A cached drv collected since: its host evaluates again when its turn comes.
        drvs.retain(|_, drv| !gone.contains(drv));
        drvs
    }

    /// [`Self::evaluate_together`] before the drvs are rooted.
    async fn evaluate_shared(
        &self,
        checkout: &Checkout<'_>,
        hosts: &[String],
        request_id: &RequestId,
    ) -> HashMap<String, String> {
        let Checkout {
            flake, repo, rev, ..
        } = *checkout;
        let mut drvs: HashMap<String, String> = hosts
            .iter()
            .filter_map(|host| Some((host.clone(), self.evaluated.drv(repo.as_str(), rev, host)?)))
            .collect();
        let hosts: Vec<String> = hosts
            .iter()
            .filter(|h| !drvs.contains_key(*h))
            .cloned()
            .collect();
        let hosts = hosts.as_slice();
        if hosts.len() < 2 {
            return drvs;
        }
        let started = Instant::now();
        let mut batches: VecDeque<Vec<String>> = hosts
            .chunks(self.evaluation.batch_size.max(1))
            .map(<[String]>::to_vec)
            .collect();
        let (mut processes, mut peak) = (0u32, 0u64);
        while let Some(batch) = batches.pop_front() {
            processes += 1;
            let hosts_in_batch = batch.len();
            match self.nix.eval_toplevel_drvs(flake, &batch).await {
                Ok((evaluated, rss)) => {
                    peak = peak.max(rss);
                    drvs.extend(
                        evaluated
                            .into_iter()
                            .filter_map(|(host, drv)| Some((host, drv?))),
                    );
                }
                Err(err @ NixError::MemoryLimit { .. }) => {
                    // Halving would evaluate the shared part again at every level; the hosts
                    // left evaluate one at a time instead, which costs no more than a plain
                    // per-host loop plus this one stopped attempt.
                    let left = hosts_in_batch + batches.iter().map(Vec::len).sum::<usize>();
                    warn!(request_id = %request_id, hosts = left, error = %err, "shared evaluation ran out of memory; evaluating the hosts one at a time");
                    batches.clear();
                }
                Err(err) if batch.len() > 1 => {
                    warn!(request_id = %request_id, hosts = batch.len(), error = %err, "shared evaluation failed; splitting the batch");
                    let (first, second) = batch.split_at(batch.len() / 2);
                    batches.push_front(second.to_vec());
                    batches.push_front(first.to_vec());
                }
                Err(err) => {
                    warn!(request_id = %request_id, host = batch[0].as_str(), error = %err, "host left to evaluate alone");
                }
            }
        }
        info!(
            request_id = %request_id,
            hosts = hosts.len(),
            evaluated = drvs.len(),
            nix_processes = processes,
            peak_evaluator_rss_mb = peak / (1024 * 1024),
            duration_ms = started.elapsed().as_millis() as u64,
            "shared evaluation done"
        );
        drvs
    }
}

/// The whole closure diff as log lines: a heading naming the earlier build, one line per
/// package, and the closure sizes.
fn diff_log_lines(diff: &ClosureDiff) -> Vec<String> {
    let mut lines = vec![format!(
        "closure diff against rev {} ({}): {}",
        diff.from_rev.as_deref().unwrap_or("?"),
        diff.from_path.as_deref().unwrap_or("?"),
        diff.summary()
    )];
    lines.extend(diff.packages.iter().map(|p| format!("  {p}")));
    if let (Some(before), Some(after)) = (diff.size_before, diff.size_after) {
        lines.push(format!("closure size: {before} → {after} bytes"));
    }
    lines
}

/// A host that was never started because the request was cancelled or timed out first.
fn skipped_host(host: &str, status: HostStatus, error: Option<String>) -> HostResult {
    HostResult {
        name: host.to_owned(),
        status,
        out_path: None,
        duration_ms: 0,
        error,
        pushed: None,
        push_error: None,
        closure_diff: None,
    }
}

/// One host of a request to build: its name, its drv when the shared evaluation found it, its
/// deadline, where the peaks measured on the way go, and where the number of its log lines
/// published (all of them stored) goes.
struct HostRun<'a> {
    host: &'a str,
    drv: Option<&'a str>,
    deadline: &'a Deadline,
    measured: &'a mut Measured,
    log_lines: &'a mut u64,
}

/// Peak resident memory (bytes) of a host's own evaluation and build, when they ran.
#[derive(Debug, Default)]
struct Measured {
    eval: Option<u64>,
    build: Option<u64>,
}

/// The commit a request builds, and the flake URL nix reads it from.
#[derive(Clone, Copy)]
struct Checkout<'a> {
    flake: &'a str,
    repo: &'a RepoName,
    rev: &'a str,
    /// GC roots of the request's evaluated drvs.
    roots: &'a DrvRoots,
}
/// When a host's work must stop, and what to say then.
#[derive(Debug, Clone)]
struct Deadline {
    at: tokio::time::Instant,
    why: String,
}

impl Deadline {
    fn passed(&self) -> bool {
        tokio::time::Instant::now() >= self.at
    }
}

/// The time limits of `request`: `timeouts`' defaults, or what the request asked for up to
/// `timeouts.max`. The error names the field and the maximum.
fn request_limits(timeouts: &Timeouts, request: &ParsedRequest) -> Result<Limits, String> {
    let pick = |asked: Option<u64>, default: Duration, field: &str| match asked {
        None => Ok(default),
        Some(secs) if Duration::from_secs(secs) <= timeouts.max => Ok(Duration::from_secs(secs)),
        Some(secs) => Err(format!(
            "{field} {secs} is over this builder's maximum of {}s (builder.max_timeout_secs)",
            timeouts.max.as_secs()
        )),
    };
    Ok(Limits {
        host: pick(
            request.host_timeout_secs,
            timeouts.host,
            "host_timeout_secs",
        )?,
        request: pick(request.timeout_secs, timeouts.request, "timeout_secs")?,
    })
}

#[derive(Debug, PartialEq)]
struct Limits {
    host: Duration,
    request: Duration,
}

/// Locks a std mutex whose holders cannot panic while holding it.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Resolves with the reason once the running request must stop.
async fn interrupted(interrupt: &mut watch::Receiver<Option<Interrupt>>) -> Interrupt {
    let why = interrupt
        .wait_for(Option::is_some)
        .await
        .map(|why| why.clone());
    match why {
        Ok(why) => why.unwrap_or(Interrupt::Shutdown),
        // The sender lives as long as the job; if it is gone, nothing can interrupt any more.
        Err(_) => std::future::pending().await,
    }
}

/// While a request runs: keeps it alive with progress acks, and cancels it when a newer
/// `replace` request for the same repo and target is queued.
async fn watch_request(
    message: Arc<RequestMessage>,
    requests: jetstream::stream::Stream,
    replace_index: Arc<ReplaceIndex>,
    access: Arc<Access>,
    interrupt: watch::Sender<Option<Interrupt>>,
    interval: Duration,
) {
    let stream_seq = message.info().map(|info| info.stream_sequence).unwrap_or(0);
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        if let Err(err) = message.ack_with(AckKind::Progress).await {
            warn!(error = %err, subject = %message.subject, "progress ack failed");
        }
        if interrupt.borrow().is_some() {
            continue;
        }
        if let Some(newer) = replace_index
            .newer_replace(&requests, &access, &message.subject, stream_seq)
            .await
        {
            let _ = interrupt.send(Some(Interrupt::Cancel {
                by: Canceller::note(format!("replace request {newer}")),
                reason: "replaced by a newer request for the same target".to_owned(),
            }));
        }
    }
}

/// The numbered events of one request, published under a fence: each publish expects the
/// subject's last stored message to be this writer's previous one (JetStream's
/// `Nats-Expected-Last-Subject-Sequence`), so a builder that lost the request (paused past the
/// ack wait while another builder took it over, or cancelled while queued) cannot add to it.
struct Events<'a> {
    publisher: &'a Publisher,
    /// Where [`Events::state`] is written after each event.
    store: &'a StateStore,
    /// The request's state with every stored event folded in.
    state: RequestState,
    subject: String,
    id: String,
    seq: u64,
    /// Stream sequence of the last message stored on the subject (0: none): what the next
    /// publish expects.
    last_stored: u64,
    /// Names this writer in its message ids, so that a copy it stored itself (its ack lost)
    /// is never taken for another writer's message, nor another's for its own.
    writer: String,
    /// What this run's log batches are stored on condition of: its events still end the
    /// subject.
    log_fence: Arc<LogFence>,
    last_was_finished: bool,
    /// Status of the `finished` event this writer stored, once it has.
    verdict: Option<BuildStatus>,
    /// The verified signer of the request, shown in `started` and `finished`.
    requested_by_key: Option<Identity>,
    /// When JetStream stored the request, shown in `started` and `finished`.
    queued_at: Option<OffsetDateTime>,
}

fn events_error(err: &homelab_deploy_client::ClientError) -> JobError {
    JobError::Bus(BusError::Stream {
        stream: homelab_deploy_protocol::subject::EVENTS_STREAM.to_owned(),
        message: err.to_string(),
    })
}

/// The state of a request no event was stored for yet, queued at `queued_at` (now when the
/// request's stream message time is unknown).
fn new_state(
    id: &RequestId,
    repo: &RepoName,
    target: &Target,
    queued_at: Option<OffsetDateTime>,
) -> RequestState {
    blank_state(
        id.as_str(),
        repo.as_str(),
        target.as_str(),
        RequestPhase::Queued,
        queued_at.unwrap_or_else(OffsetDateTime::now_utc),
    )
}

/// The parts of a `finished` event, filled in as the request goes.
struct Finish {
    status: BuildStatus,
    repo: String,
    target: String,
    rev: Option<String>,
    hosts: Vec<HostResult>,
    error: Option<String>,
    builder: String,
    cancelled_by: Option<Canceller>,
    /// The kind of failure; when unset, [`Events::finish`] derives it from `status`.
    code: Option<ErrorCode>,
    started: Instant,
}

impl Finish {
    /// An empty `finished` of the same request, builder and start time as `other`.
    fn new_like(other: &Finish) -> Self {
        Self {
            status: BuildStatus::Failed,
            repo: other.repo.clone(),
            target: other.target.clone(),
            rev: None,
            hosts: Vec::new(),
            error: None,
            code: None,
            builder: other.builder.clone(),
            cancelled_by: None,
            started: other.started,
        }
    }

    fn new(repo: &RepoName, target: &Target, builder: &str, started: Instant) -> Self {
        Self {
            status: BuildStatus::Failed,
            repo: repo.to_string(),
            target: target.to_string(),
            rev: None,
            hosts: Vec::new(),
            error: None,
            code: None,
            builder: builder.to_owned(),
            cancelled_by: None,
            started,
        }
    }
}

/// What earlier builders did with a request, from its newest claim ([`crate::attempts`]) and
/// its stored events.
#[derive(Debug, Default, PartialEq)]
struct Attempts {
    /// Attempts begun so far: the newest claim's number, or the `started` events when there
    /// are more of those (claims gone with the stream's limits, or made before claims existed).
    previous: u64,
    /// Of those, the ones that did not end by handing the request back (`requeued`): the
    /// builder died, stalled past the ack wait, or could not publish.
    failed: u64,
    /// How the last attempt ended, for the error of a request given up on.
    last_ended: Option<String>,
}

impl Attempts {
    fn of(events: &[Event], last_claim: Option<&crate::attempts::Claim>) -> Self {
        let mut attempts = Self::default();
        let (mut started, mut handed_back, mut last_started) = (0u64, 0u64, 0u64);
        // The open attempt: its builder and the last step its events show.
        let mut current: Option<(String, String)> = None;
        let mut silent = 0u64;
        let close = |attempts: &mut Self, silent: &mut u64, current: Option<(String, String)>| {
            if let Some((builder, last)) = current {
                *silent += 1;
                attempts.last_ended = Some(format!(
                    "the last one, on builder {builder}, stopped without a word after {last} (the builder died, stalled past the ack wait, or lost NATS)"
                ));
            }
        };
        for event in events {
            match &event.body {
                EventBody::Started {
                    builder, attempt, ..
                } => {
                    close(&mut attempts, &mut silent, current.take());
                    started += 1;
                    last_started = *attempt;
                    current = Some((builder.clone(), "starting".to_owned()));
                }
                EventBody::Requeued { .. } => {
                    handed_back += 1;
                    current = None;
                }
                EventBody::HostStarted { host, .. } | EventBody::Progress { host, .. } => {
                    if let Some((_, last)) = current.as_mut() {
                        *last = format!("starting host {host}");
                    }
                }
                EventBody::HostFinished { host, .. } => {
                    if let Some((_, last)) = current.as_mut() {
                        *last = format!("finishing host {host}");
                    }
                }
                EventBody::Finished { .. } => current = None,
            }
        }
        close(&mut attempts, &mut silent, current);
        let claimed = last_claim.map_or(0, |claim| claim.attempt);
        attempts.previous = claimed.max(started);
        attempts.failed = claimed.saturating_sub(handed_back).max(silent);
        if let Some(claim) = last_claim.filter(|claim| claim.attempt > last_started) {
            attempts.last_ended = Some(format!(
                "the last one, on builder {}, stopped before its started event, while resolving the commit or listing the flake's hosts (the builder died, stalled past the ack wait, or lost NATS)",
                claim.builder
            ));
        }
        attempts
    }
}

impl<'a> Events<'a> {
    /// Continues after the last stored event of this request, if any (a redelivered request).
    /// `queued_at` is when JetStream stored the request (unknown for a message without info).
    async fn open(
        publisher: &'a Publisher,
        store: &'a StateStore,
        repo: &RepoName,
        target: &Target,
        id: &RequestId,
        queued_at: Option<OffsetDateTime>,
    ) -> Result<Events<'a>, JobError> {
        let subject = events_subject(repo, target, id);
        let last = last_event(publisher.jetstream(), &subject).await?;
        let (last_stored, event) = last.unwrap_or((0, None));
        let seq = event.as_ref().map(|event| event.seq).unwrap_or(0);
        let state = match store.get(id.as_str()).await {
            Ok(Some(state)) if state.last_seq == seq => state,
            // Behind the events (a write failed, or the bucket was rebuilt without them): fold
            // the request's own events again.
            _ if seq > 0 => {
                let events = request_events(publisher.jetstream(), id)
                    .await
                    .map_err(|err| events_error(&err))?;
                fold_events(&events).unwrap_or_else(|| new_state(id, repo, target, queued_at))
            }
            _ => new_state(id, repo, target, queued_at),
        };
        let writer = nuid::next().to_string();
        Ok(Events {
            publisher,
            store,
            state,
            log_fence: Arc::new(LogFence::new(subject.clone(), writer.clone(), last_stored)),
            subject,
            id: id.to_string(),
            seq: event.as_ref().map(|event| event.seq).unwrap_or(0),
            last_stored,
            writer,
            last_was_finished: event
                .is_some_and(|event| matches!(event.body, EventBody::Finished { .. })),
            verdict: None,
            requested_by_key: None,
            queued_at,
        })
    }

    /// The request already ended (cancelled while queued, or an id used again).
    fn already_finished(&self) -> bool {
        self.last_was_finished
    }

    /// What earlier attempts at this request did, from its events and `last_claim`.
    async fn attempts(
        &self,
        id: &RequestId,
        last_claim: Option<&crate::attempts::Claim>,
    ) -> Result<Attempts, JobError> {
        let events = if self.seq == 0 {
            Vec::new()
        } else {
            request_events(self.publisher.jetstream(), id)
                .await
                .map_err(|err| events_error(&err))?
        };
        Ok(Attempts::of(&events, last_claim))
    }

    /// Publishes the next event under the fence. Another writer on the subject means the
    /// request was taken over: [`JobError::Superseded`], and this builder stands down.
    async fn emit(&mut self, body: EventBody) -> Result<(), JobError> {
        let seq = self.seq + 1;
        let kind = body.kind();
        let event = Event {
            id: self.id.clone(),
            seq,
            time: OffsetDateTime::now_utc(),
            body,
        };
        let max = self.publisher.max_body_bytes();
        let folded = event.clone();
        let payload = encode_fitting(event, max).map_err(JobError::Unpublishable)?;
        let message_id = format!("{}.event.{seq}.{}", self.id, self.writer);
        match self
            .publisher
            .publish_fenced(&self.subject, &message_id, payload.into(), self.last_stored)
            .await
        {
            Ok(stored) => {
                self.seq = seq;
                self.last_stored = stored;
                self.log_fence.stored(stored);
                fold_event(&mut self.state, &folded);
                // The event is stored: a state write that fails is caught up by the next one,
                // or by the next builder that opens the request.
                if let Err(err) = self.store.record(&self.state).await {
                    warn!(request_id = %self.id, seq, error = %err, "writing the request state failed");
                }
                Ok(())
            }
            Err(BusError::Fenced { .. }) => Err(JobError::Superseded),
            Err(BusError::Refused { message, .. }) => Err(JobError::Unpublishable(format!(
                "the {kind} event was refused by the server: {message}"
            ))),
            Err(err) => Err(JobError::Bus(err)),
        }
    }

    async fn finish(&mut self, finish: Finish) -> Result<(), JobError> {
        if let Some(error) = &finish.error {
            warn!(request_id = %self.id, error = %error, "request failed");
        }
        let (repo, status) = (finish.repo.clone(), finish.status);
        let code = match status {
            BuildStatus::Succeeded => None,
            BuildStatus::Cancelled => Some(finish.code.unwrap_or(ErrorCode::Cancelled)),
            BuildStatus::Failed => Some(finish.code.unwrap_or(ErrorCode::HostsFailed)),
        };
        self.emit(EventBody::Finished {
            status: finish.status,
            repo: finish.repo,
            target: finish.target,
            rev: finish.rev,
            hosts: finish.hosts,
            error: finish.error.map(|e| cut(&e, MAX_ERROR_BYTES)),
            code,
            queued_at: self.queued_at,
            builder: Some(finish.builder),
            cancelled_by: finish.cancelled_by.as_ref().map(|by| by.note.clone()),
            cancelled_by_key: finish.cancelled_by.and_then(|by| by.key),
            requested_by_key: self.requested_by_key.clone(),
            duration_ms: finish.started.elapsed().as_millis() as u64,
        })
        .await?;
        self.verdict = Some(status);
        crate::metrics::request_finished(&repo, status.as_str());
        Ok(())
    }

    async fn finish_refused(
        &mut self,
        builder: &str,
        repo: &RepoName,
        target: &Target,
        (code, reason): (ErrorCode, String),
        started: Instant,
    ) -> Result<(), JobError> {
        let mut finish = Finish::new(repo, target, builder, started);
        finish.code = Some(code);
        finish.error = Some(reason);
        self.finish(finish).await
    }
}

/// Serializes `event` within `max` bytes. A `finished` (or `host_finished`) event that is too
/// large first has its closure diffs' package lists left out (counts kept) and identical host
/// errors grouped, then its error excerpts cut shorter (keeping
/// their ends), then dropped, and last its host list dropped (each host's result is in its own
/// `host_finished` event, and the full text in the logs subject). Fails only when not even that
/// fits.
fn encode_fitting(mut event: Event, max: usize) -> Result<Vec<u8>, String> {
    let encode = |event: &Event| serde_json::to_vec(event).map_err(|err| err.to_string());
    let bytes = encode(&event)?;
    if bytes.len() <= max {
        return Ok(bytes);
    }
    let full = bytes.len();
    if let EventBody::Finished { hosts, .. } = &mut event.body {
        // Each host's package list is in its host_finished event; the counts stay.
        for diff in hosts.iter_mut().filter_map(|h| h.closure_diff.as_mut()) {
            diff.keep_packages(0);
        }
        group_identical_errors(hosts);
        let bytes = encode(&event)?;
        if bytes.len() <= max {
            return Ok(bytes);
        }
    }
    let mut budget = MAX_ERROR_BYTES / 2;
    while budget >= MIN_ERROR_BYTES {
        for_each_excerpt(&mut event.body, |excerpt| *excerpt = cut(excerpt, budget));
        let bytes = encode(&event)?;
        if bytes.len() <= max {
            return Ok(bytes);
        }
        budget /= 2;
    }
    for_each_excerpt(&mut event.body, |excerpt| {
        *excerpt =
            "(excerpt left out to fit the server's max_payload; see the logs subject)".to_owned()
    });
    let bytes = encode(&event)?;
    if bytes.len() <= max {
        return Ok(bytes);
    }
    let EventBody::Finished { hosts, error, .. } = &mut event.body else {
        return Err(too_large(&event, full, max));
    };
    let failed = hosts.iter().filter(|h| !h.status.is_success()).count();
    let note = format!(
        "{} hosts, {failed} of them not built: the list does not fit the server's max_payload ({max} bytes); each host's result is in its host_finished event",
        hosts.len()
    );
    hosts.clear();
    *error = Some(match error.take() {
        Some(error) => format!("{}; {note}", cut(&error, MIN_ERROR_BYTES)),
        None => note,
    });
    let bytes = encode(&event)?;
    if bytes.len() <= max {
        return Ok(bytes);
    }
    Err(too_large(&event, full, max))
}

fn too_large(event: &Event, size: usize, max: usize) -> String {
    format!(
        "a {} event of {size} bytes does not fit the server's max_payload ({max} bytes usable) even shortened",
        event.body.kind()
    )
}

/// Every host error after the first with the same text becomes a pointer to that first host.
fn group_identical_errors(hosts: &mut [HostResult]) {
    let mut first: HashMap<String, String> = HashMap::new();
    for host in hosts {
        if let Some(error) = host.error.take() {
            host.error = Some(match first.get(&error) {
                Some(name) => format!("same error as host {name}"),
                None => {
                    first.insert(error.clone(), host.name.clone());
                    error
                }
            });
        }
    }
}

/// Calls `shorten` on every error excerpt an event carries.
fn for_each_excerpt(body: &mut EventBody, mut shorten: impl FnMut(&mut String)) {
    let mut host = |result: &mut HostResult| {
        for excerpt in [&mut result.error, &mut result.push_error]
            .into_iter()
            .flatten()
        {
            if !excerpt.starts_with("same error as host ") {
                shorten(excerpt);
            }
        }
    };
    match body {
        EventBody::Finished { hosts, error, .. } => {
            hosts.iter_mut().for_each(&mut host);
            if let Some(error) = error {
                shorten(error);
            }
        }
        EventBody::HostFinished { result, .. } => host(result),
        EventBody::Requeued { reason, .. } => shorten(reason),
        _ => {}
    }
}

/// Keeps the end of an error excerpt (where nix puts the cause) within `max` bytes.
fn cut(text: &str, max: usize) -> String {
    let text = text.trim();
    if text.len() <= max {
        return text.to_owned();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

#[cfg(test)]
mod tests {
    use homelab_deploy_protocol::Mode;

    use super::*;

    fn timeouts() -> Timeouts {
        Timeouts {
            host: Duration::from_secs(60),
            request: Duration::from_secs(600),
            max: Duration::from_secs(3600),
        }
    }

    fn asking(host_timeout_secs: Option<u64>, timeout_secs: Option<u64>) -> ParsedRequest {
        ParsedRequest {
            id: RequestId::parse("REQUEST01").expect("id"),
            repo: RepoName::parse("demo").expect("repo"),
            target: Target::parse("web").expect("target"),
            requested_by: None,
            git_ref: None,
            rev: None,
            mode: Mode::Enqueue,
            host_timeout_secs,
            timeout_secs,
        }
    }

    #[test]
    fn request_limits_default_allow_up_to_the_maximum_and_name_the_field_over_it() {
        assert_eq!(
            request_limits(&timeouts(), &asking(None, None)),
            Ok(Limits {
                host: Duration::from_secs(60),
                request: Duration::from_secs(600)
            })
        );
        assert_eq!(
            request_limits(&timeouts(), &asking(Some(3600), Some(5))),
            Ok(Limits {
                host: Duration::from_secs(3600),
                request: Duration::from_secs(5)
            })
        );
        let over =
            request_limits(&timeouts(), &asking(None, Some(3601))).expect_err("over the maximum");
        assert!(
            over.contains("timeout_secs 3601") && over.contains("3600s"),
            "{over}"
        );
        let over = request_limits(&timeouts(), &asking(Some(u64::MAX), None))
            .expect_err("over the maximum");
        assert!(over.starts_with("host_timeout_secs"), "{over}");
    }

    fn failed_host(name: &str, error: String) -> HostResult {
        HostResult {
            name: name.to_owned(),
            status: HostStatus::BuildFailed,
            out_path: None,
            duration_ms: 1,
            error: Some(error),
            pushed: None,
            push_error: None,
            closure_diff: None,
        }
    }

    fn finished(hosts: Vec<HostResult>) -> Event {
        Event {
            id: "REQUEST01".to_owned(),
            seq: 9,
            time: OffsetDateTime::UNIX_EPOCH,
            body: EventBody::Finished {
                status: BuildStatus::Failed,
                repo: "demo".to_owned(),
                target: "all".to_owned(),
                rev: None,
                hosts,
                error: None,
                code: None,
                queued_at: None,
                builder: Some("b1".to_owned()),
                cancelled_by: None,
                cancelled_by_key: None,
                requested_by_key: None,
                duration_ms: 1,
            },
        }
    }

    fn excerpt(host: usize) -> String {
        (0..64)
            .map(|line| format!("host{host:03} line {line:02} {}", "x".repeat(48)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The input of the issue: 300 hosts that each fail with a 4 KiB excerpt (1.26 MB of JSON)
    /// fit the default 1 MiB `max_payload`, every host still listed with the end of its error.
    #[test]
    fn three_hundred_failing_hosts_fit_one_mebibyte() {
        let hosts = (0..300)
            .map(|host| {
                failed_host(
                    &format!("host{host:03}"),
                    cut(&excerpt(host), MAX_ERROR_BYTES),
                )
            })
            .collect();
        let event = finished(hosts);
        assert!(serde_json::to_vec(&event).expect("json").len() > 1024 * 1024);
        let max = 1024 * 1024 - 512;
        let bytes = encode_fitting(event, max).expect("fits");
        assert!(bytes.len() <= max);
        let decoded: Event = serde_json::from_slice(&bytes).expect("json");
        let EventBody::Finished { hosts, .. } = decoded.body else {
            panic!("not a finished event");
        };
        assert_eq!(hosts.len(), 300);
        let error = hosts[299].error.as_deref().unwrap_or_default();
        assert!(
            error.ends_with(&"x".repeat(48)) && error.contains("host299 line 63"),
            "{error}"
        );
    }

    /// Identical errors are grouped before anything is cut, and a limit too small for even the
    /// shortest excerpts leaves the host list out with a note instead of failing.
    #[test]
    fn identical_errors_are_grouped_and_the_host_list_goes_last() {
        let same = excerpt(1);
        let hosts: Vec<HostResult> = (0..40)
            .map(|host| failed_host(&format!("host{host:03}"), same.clone()))
            .collect();
        let bytes = encode_fitting(finished(hosts.clone()), 16 * 1024).expect("fits");
        let decoded: Event = serde_json::from_slice(&bytes).expect("json");
        let EventBody::Finished { hosts: fitted, .. } = decoded.body else {
            panic!("not a finished event");
        };
        assert_eq!(fitted[0].error.as_deref(), Some(same.as_str()));
        assert_eq!(
            fitted[39].error.as_deref(),
            Some("same error as host host000")
        );

        let many = (0..600)
            .map(|host| failed_host(&format!("host{host:04}"), excerpt(host)))
            .collect();
        let bytes = encode_fitting(finished(many), 4096).expect("fits");
        assert!(bytes.len() <= 4096);
        let decoded: Event = serde_json::from_slice(&bytes).expect("json");
        let EventBody::Finished { hosts, error, .. } = decoded.body else {
            panic!("not a finished event");
        };
        assert!(hosts.is_empty());
        let error = error.unwrap_or_default();
        assert!(
            error.contains("600 hosts, 600 of them not built"),
            "{error}"
        );
    }

    fn event(seq: u64, body: EventBody) -> Event {
        Event {
            id: "REQUEST01".to_owned(),
            seq,
            time: OffsetDateTime::UNIX_EPOCH,
            body,
        }
    }

    fn started(builder: &str) -> EventBody {
        EventBody::Started {
            builder: builder.to_owned(),
            repo: "demo".to_owned(),
            target: "all".to_owned(),
            rev: "0".repeat(40),
            hosts: vec!["web".to_owned()],
            requested_by: None,
            requested_by_key: None,
            attempt: 1,
            request_seq: Some(7),
            queued_at: None,
        }
    }

    /// Attempts that ended without a word count; a hand-back at shutdown does not.
    #[test]
    fn attempts_count_silent_ends_only() {
        let host_started = EventBody::HostStarted {
            host: "web".to_owned(),
            index: 1,
            total: 1,
        };
        let requeued = EventBody::Requeued {
            builder: "b1".to_owned(),
            reason: "shutting down".to_owned(),
        };
        let events = [
            event(1, started("b1")),
            event(2, requeued),
            event(3, started("b2")),
            event(4, host_started),
            event(5, started("b3")),
        ];
        let attempts = Attempts::of(&events, None);
        assert_eq!(attempts.previous, 3);
        assert_eq!(attempts.failed, 2);
        let last = attempts.last_ended.unwrap_or_default();
        assert!(
            last.contains("builder b3") && last.contains("after starting"),
            "{last}"
        );

        // Claims also count the attempts that died before their `started`: b3's was the
        // fourth claim, and a fifth on b4 never got as far.
        let mut events = events.to_vec();
        if let EventBody::Started { attempt, .. } = &mut events[4].body {
            *attempt = 4;
        }
        let claim = crate::attempts::Claim {
            attempt: 5,
            builder: "b4".to_owned(),
            delivered: 9,
            time: OffsetDateTime::UNIX_EPOCH,
        };
        let attempts = Attempts::of(&events, Some(&claim));
        assert_eq!(attempts.previous, 5);
        assert_eq!(attempts.failed, 4);
        let last = attempts.last_ended.unwrap_or_default();
        assert!(
            last.contains("builder b4") && last.contains("before its started event"),
            "{last}"
        );
    }
}
