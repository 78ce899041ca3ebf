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

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use futures::{StreamExt, TryStreamExt};
use homelab_deploy_client::inspect::{request_events, PendingRequest};
use homelab_deploy_protocol::api::ErrorCode;
use homelab_deploy_protocol::request::parse_request;
use homelab_deploy_protocol::subject::{
    attempts_subject, logs_subject, request_subject, MSG_ID_HEADER,
};
use homelab_deploy_protocol::{
    BuildStatus, EventBody, HostResult, ParsedRequest, RepoName, RequestId, Target,
};
use tokio::sync::watch;
use tracing::{error, info, warn, Instrument};

use crate::access::{Access, Refused};
use crate::bus::{BusError, Publisher, RequestMessage};
use crate::closures::History;
use crate::config::{Evaluation, RepoConfig, Timeouts};
use crate::eval_cache::EvalCache;
use crate::git::{GitError, Mirror, Resolved, Wanted};
use crate::nix::Nix;
use crate::state::StateStore;

mod eval;
mod events;
mod host;
mod replace;
mod roots;
mod running;

use events::{cut, events_error, Events, Finish, MAX_ERROR_BYTES};
use host::RequestHosts;
use replace::older_queued_holder;
pub use replace::ReplaceIndex;
pub(crate) use roots::gc_root_name;
pub use roots::DrvRoots;
use running::RunningJob;
pub use running::{CancelOutcome, Canceller, Interrupt, Running};

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
    pub evaluated: Arc<EvalCache>,
    pub repos: HashMap<RepoName, ServedRepo>,
    /// The requests stream, to spot newer `replace` requests for a running request's target.
    pub requests: jetstream::stream::Stream,
    /// What of the requests stream has been read for `replace` requests.
    pub replace_index: Arc<ReplaceIndex>,
    /// How often a running request is kept alive and checked for a newer `replace` request.
    pub watch_interval: Duration,
    /// Requests running here, which each job adds itself to.
    pub running: Arc<Running>,
    /// Who may build and cancel what (`[access]`).
    pub access: Arc<Access>,
    /// Each host's recent builds, for closure diffs.
    pub history: Arc<History>,
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

impl Jobs {
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
                        error: Some(reason.to_string()),
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
        self.running.insert(
            id.to_string(),
            RunningJob {
                repo: repo.to_string(),
                target: target.to_string(),
                requested_by_key: events.requested_by_key.clone(),
                interrupt: interrupt_tx,
            },
        );
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
        self.running.remove(id.as_str());
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
                        (ErrorCode::Invalid, reason.to_string()),
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
        let mut cancelled: Option<(Canceller, String)> = None;
        let logs = logs_subject(repo, target, id);
        let roots = DrvRoots::new(&self.state_dir);
        let checkout = Checkout {
            flake: &flake,
            repo,
            rev: &rev,
            roots: &roots,
            logs: &logs,
            id,
        };
        let drvs = tokio::select! {
            drvs = self.evaluate_together(&checkout, &hosts) => drvs,
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
        let run = RequestHosts {
            events: tokio::sync::Mutex::new(events),
            checkout: &checkout,
            drvs: &drvs,
            deadline: &request_deadline,
            host_timeout: limits.host,
            total: hosts.len(),
            cancelled: Mutex::new(cancelled),
        };
        let build_one = |(position, host): (usize, String)| {
            self.run_host(&run, position, host, interrupt.clone())
        };
        let results: Vec<HostResult> = futures::stream::iter(hosts.iter().cloned().enumerate())
            .map(build_one)
            .buffered(self.build_jobs.max(1))
            .try_collect()
            .await?;
        let events = run.events.into_inner();
        let cancelled = run
            .cancelled
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
        finish.rev = Some(rev.clone());
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
}

impl Jobs {
    /// Cancels request `id`, waiting in the queue as `queued`, for `by`: checks that `by` may
    /// (against the signer of the queued message itself), removes the message from the queue,
    /// and finishes the request `cancelled`. `repo` is the queued message's. An error is NATS
    /// failing.
    pub async fn cancel_queued(
        &self,
        queued: &PendingRequest,
        repo: &RepoName,
        id: &RequestId,
        by: &Canceller,
        reason: &str,
    ) -> Result<QueuedCancel, JobError> {
        let target = &queued.target;
        // Who asked for it, from the queued message itself: checked before it is removed.
        let owner = self
            .requests
            .get_raw_message(queued.stream_seq)
            .await
            .ok()
            .and_then(|stored| {
                self.access
                    .build_request(Some(&stored.headers), repo, target, &stored.payload)
                    .ok()
                    .flatten()
            });
        if let Err(why) = self
            .access
            .may_cancel(by.key.as_ref(), owner.as_ref(), id.as_str())
        {
            return Ok(QueuedCancel::Refused(why));
        }
        if let Err(err) = self.requests.delete_message(queued.stream_seq).await {
            info!(request_id = %id, error = %err, "a queued request left the queue while being cancelled");
            return Ok(QueuedCancel::Gone);
        }
        let mut events = Events::open(
            &self.publisher,
            &self.state,
            repo,
            target,
            id,
            Some(queued.queued_at),
        )
        .await?;
        events.requested_by_key = owner;
        let mut finish = Finish::new(repo, target, &self.builder_name, Instant::now());
        finish.status = BuildStatus::Cancelled;
        finish.cancelled_by = Some(by.clone());
        finish.error = Some(format!("cancelled by {by} while queued: {reason}"));
        events.finish(finish).await?;
        info!(request_id = %id, cancelled_by = %by, "cancelled a queued request");
        Ok(QueuedCancel::Cancelled)
    }
}

/// What [`Jobs::cancel_queued`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum QueuedCancel {
    /// Removed from the queue and finished `cancelled`.
    Cancelled,
    /// No longer in the queue (a builder took it meanwhile).
    Gone,
    /// The sender may not cancel it ([`Access::may_cancel`]).
    Refused(Refused),
}

/// What every host of a request shares: the commit it builds, the flake URL nix reads it from,
/// and where its log lines go.
#[derive(Clone, Copy)]
struct Checkout<'a> {
    flake: &'a str,
    repo: &'a RepoName,
    rev: &'a str,
    /// GC roots of the request's evaluated drvs.
    roots: &'a DrvRoots,
    /// The request's logs subject.
    logs: &'a str,
    id: &'a RequestId,
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
fn request_limits(timeouts: &Timeouts, request: &ParsedRequest) -> Result<Limits, OverMaximum> {
    let pick = |asked: Option<u64>, default: Duration, field: &'static str| match asked {
        None => Ok(default),
        Some(secs) if Duration::from_secs(secs) <= timeouts.max => Ok(Duration::from_secs(secs)),
        Some(secs) => Err(OverMaximum {
            field,
            secs,
            max_secs: timeouts.max.as_secs(),
        }),
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

/// A request asked for a timeout over `builder.max_timeout_secs`.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("{field} {secs} is over this builder's maximum of {max_secs}s (builder.max_timeout_secs)")]
struct OverMaximum {
    field: &'static str,
    secs: u64,
    max_secs: u64,
}

#[derive(Debug, PartialEq)]
struct Limits {
    host: Duration,
    request: Duration,
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
        assert_eq!(
            over.to_string(),
            "timeout_secs 3601 is over this builder's maximum of 3600s (builder.max_timeout_secs)"
        );
        let over = request_limits(&timeouts(), &asking(Some(u64::MAX), None))
            .expect_err("over the maximum");
        assert_eq!(over.field, "host_timeout_secs");
    }
}
