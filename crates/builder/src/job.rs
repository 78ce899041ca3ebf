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
use homelab_deploy_protocol::api::BuilderState;
use homelab_deploy_protocol::request::parse_request;
use homelab_deploy_protocol::subject::{
    encode_host, events_subject, logs_subject, request_subject, MSG_ID_HEADER,
};
use homelab_deploy_protocol::{
    BuildRequest, BuildStatus, Event, EventBody, HostResult, HostStatus, Mode, ParsedRequest,
    RepoName, RequestId, Target,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn, Instrument};

use crate::bus::{last_event, BusError, Publisher, RequestMessage};
use crate::cache::EvalCache;
use crate::config::{Evaluation, RepoConfig, Timeouts};
use crate::git::{Mirror, Resolved, Wanted};
use crate::logs::LogBatcher;
use crate::nix::{BuildOutput, Nix, NixError};

/// Longest error excerpt kept in a host result or a `finished` event.
const MAX_ERROR_BYTES: usize = 4096;
/// Progress events of one host are at most this frequent.
const PROGRESS_EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// Everything a job needs from the builder; shared by all jobs.
pub struct Jobs {
    pub builder_name: String,
    pub state_dir: PathBuf,
    pub nix: Nix,
    pub publisher: Publisher,
    pub timeouts: Timeouts,
    pub evaluation: Evaluation,
    /// Hosts of one request built at once.
    pub build_jobs: usize,
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
}

/// A repo this builder serves, with its mirror. The lock keeps two jobs of the same repo from
/// fetching into the mirror at once.
pub struct ServedRepo {
    pub config: RepoConfig,
    /// The builder's nix with this repo's `impure` and `nix_options` ([`Nix::for_repo`]).
    pub nix: Nix,
    pub mirror: Mirror,
    pub fetch_lock: Arc<Mutex<()>>,
}

/// Why a running request must stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interrupt {
    /// The builder is going away: the request goes back to the queue.
    Shutdown,
    /// Cancelled (by a person, or by a newer `replace` request): it ends `cancelled`.
    Cancel { by: String, reason: String },
}

pub(crate) struct RunningJob {
    repo: String,
    target: String,
    interrupt: watch::Sender<Option<Interrupt>>,
}

/// Why a job stopped without finishing its request.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("stopped by shutdown")]
    Aborted,
    #[error("another builder took the request over (it was redelivered)")]
    Superseded,
}

/// What happened to one host.
enum HostOutcome {
    Done(HostResult),
    Cancelled(HostResult, String, String),
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

    /// Cancels request `id` if it runs here; false when it does not.
    pub fn cancel(&self, id: &str, by: &str, reason: &str) -> bool {
        match self.lock_running().get(id) {
            Some(job) => {
                let _ = job.interrupt.send(Some(Interrupt::Cancel {
                    by: by.to_owned(),
                    reason: reason.to_owned(),
                }));
                true
            }
            None => false,
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
    pub async fn run(&self, message: RequestMessage) {
        let message = Arc::new(message);
        let (interrupt_tx, interrupt) = watch::channel(None);
        let watcher = tokio::spawn(watch_request(
            message.clone(),
            self.requests.clone(),
            self.replace_index.clone(),
            interrupt_tx.clone(),
            self.watch_interval,
        ));
        let outcome = self.run_request(&message, interrupt_tx, interrupt).await;
        watcher.abort();
        let ack = match &outcome {
            Ok(()) => message.double_ack().await,
            Err(JobError::Aborted) => message.ack_with(AckKind::Nak(None)).await,
            Err(JobError::Superseded) => {
                warn!(subject = %message.subject, "request was redelivered to another builder meanwhile; standing down without acking");
                Ok(())
            }
            Err(JobError::Bus(err)) => {
                error!(error = %err, subject = %message.subject, "could not publish events; request goes back to the queue");
                message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                    .await
            }
        };
        if let Err(err) = ack {
            warn!(error = %err, subject = %message.subject, "acknowledging the request failed; it may be redelivered");
        }
    }

    async fn run_request(
        &self,
        message: &RequestMessage,
        interrupt_tx: watch::Sender<Option<Interrupt>>,
        interrupt: watch::Receiver<Option<Interrupt>>,
    ) -> Result<(), JobError> {
        let info = message.info().ok();
        let attempt = info
            .as_ref()
            .map(|i| i.delivered.max(1) as u64)
            .unwrap_or(1);
        let stream_seq = info.as_ref().map(|i| i.stream_sequence).unwrap_or(0);
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
                if let (Some(id), Some(repo), Some(target)) =
                    (refusal.id, refusal.repo, refusal.target)
                {
                    let mut events = Events::open(&self.publisher, &repo, &target, &id).await;
                    if !events.already_finished() {
                        events
                            .finish_refused(
                                &self.builder_name,
                                &repo,
                                &target,
                                refusal.reason,
                                started,
                            )
                            .await?;
                    }
                }
                // Term, not ack: a malformed request must never be retried.
                let _ = message.ack_with(AckKind::Term).await;
                return Ok(());
            }
        };
        let ParsedRequest {
            id, repo, target, ..
        } = &request;
        let mut events = Events::open(&self.publisher, repo, target, id).await;
        if events.already_finished() {
            info!(request_id = %id, "request already has a finished event (cancelled while queued, or a reused id); not building it again");
            return Ok(());
        }
        info!(request_id = %id, repo = %repo, target = target.as_str(), attempt, mode = request.mode.as_str(), requested_by = ?request.requested_by, "request received");
        crate::metrics::request_received(repo.as_str());
        self.lock_running().insert(
            id.to_string(),
            RunningJob {
                repo: repo.to_string(),
                target: target.to_string(),
                interrupt: interrupt_tx,
            },
        );
        let span = tracing::info_span!("request", request_id = %id, repo = %repo, target = target.as_str());
        let result = self
            .build_request(
                &request,
                &mut events,
                interrupt,
                attempt,
                stream_seq,
                started,
            )
            .instrument(span)
            .await;
        self.lock_running().remove(id.as_str());
        if matches!(result, Err(JobError::Aborted)) {
            // Without it, the request would look running until a builder takes it again.
            let requeued = EventBody::Requeued {
                builder: self.builder_name.clone(),
                reason: format!("builder {} is shutting down", self.builder_name),
            };
            if let Err(err) = events.emit(requeued).await {
                warn!(request_id = %id, error = %err, "could not say the request goes back to the queue");
            }
        }
        result
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
                .finish_refused(&self.builder_name, repo, target, reason, started)
                .await;
        };
        let limits = match self.request_limits(request) {
            Ok(limits) => limits,
            Err(reason) => {
                return events
                    .finish_refused(&self.builder_name, repo, target, reason, started)
                    .await
            }
        };
        let request_deadline = Deadline {
            at: tokio::time::Instant::from_std(started) + limits.request,
            why: format!("the request timed out after {}s", limits.request.as_secs()),
        };
        if let Some(newer) = self
            .replace_index
            .newer_replace(&self.requests, &request_subject(repo, target), stream_seq)
            .await
        {
            let mut finish = Finish::new(repo, target, &self.builder_name, started);
            finish.status = BuildStatus::Cancelled;
            finish.cancelled_by = Some(format!("replace request {newer}"));
            finish.error = Some(format!(
                "superseded by newer request {newer} (mode replace)"
            ));
            return events.finish(finish).await;
        }

        // 2. Resolve one commit.
        let resolved = match self
            .resolve(served, request.rev.as_deref(), request.git_ref.as_deref())
            .await
        {
            Ok(resolved) => resolved,
            Err(reason) => {
                return events
                    .finish_refused(&self.builder_name, repo, target, reason, started)
                    .await
            }
        };
        let flake = served.mirror.flake_url(&resolved);
        let rev = resolved.rev;

        // 3. Hosts at that commit.
        let hosts = match self.hosts_to_build(&flake, repo, target, &rev).await {
            Ok(hosts) => hosts,
            Err(reason) => {
                let mut finish = Finish::new(repo, target, &self.builder_name, started);
                finish.rev = Some(rev);
                finish.error = Some(reason);
                return events.finish(finish).await;
            }
        };
        // A cancel may have finished the request while it was being resolved.
        events.check_still_owner().await?;
        let attempt = events.attempt(id, attempt).await;
        events
            .emit(EventBody::Started {
                builder: self.builder_name.clone(),
                repo: repo.to_string(),
                target: target.to_string(),
                rev: rev.clone(),
                hosts: hosts.clone(),
                requested_by: request.requested_by.clone(),
                attempt,
            })
            .await?;

        // 4. Evaluate the hosts together where the memory budget allows, then build each in
        //    turn; after a cancel the rest are cancelled without building.
        let total = hosts.len();
        let mut cancelled: Option<(String, String)> = None;
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
                {
                    let mut events = shared_events.lock().await;
                    events.check_still_owner().await?;
                    let started = EventBody::HostStarted {
                        host: host.clone(),
                        index,
                        total,
                    };
                    events.emit(started).await?;
                }
                let drv = drvs.get(host).map(String::as_str);
                let outcome = self
                    .build_host(
                        shared_events,
                        checkout,
                        host,
                        logs,
                        id.as_str(),
                        drv,
                        &deadline,
                        &mut interrupt,
                    )
                    .await?;
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
        events.check_still_owner().await?;
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
        let outcome = match self.resolve(served, None, None).await {
            Ok(resolved) => self
                .hosts_to_build(
                    &served.mirror.flake_url(&resolved),
                    repo,
                    &Target::All,
                    &resolved.rev,
                )
                .await
                .map(|_| ()),
            Err(err) => Err(err),
        };
        if let Err(err) = outcome {
            warn!(repo = %repo, error = %err, "could not list the repo's hosts at start");
        }
    }

    /// Resolves `rev`, else `git_ref`, else the repo's branch, to one pinned commit.
    async fn resolve(
        &self,
        served: &ServedRepo,
        rev: Option<&str>,
        git_ref: Option<&str>,
    ) -> Result<Resolved, String> {
        let mirror = served.mirror.clone();
        let lock = served.fetch_lock.clone();
        let default_ref = served.config.git_ref.clone();
        let rev = rev.map(str::to_owned);
        let git_ref = git_ref
            .map(str::to_owned)
            .unwrap_or_else(|| default_ref.clone());
        tokio::task::spawn_blocking(move || {
            let _guard = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let wanted = match &rev {
                Some(rev) => Wanted::Rev(rev),
                None => Wanted::Ref(&git_ref),
            };
            mirror.fetch_and_resolve(wanted, &default_ref)
        })
        .await
        .map_err(|err| format!("resolving the commit failed: {err}"))?
        .map_err(|err| err.to_string())
    }

    async fn hosts_to_build(
        &self,
        flake: &str,
        repo: &RepoName,
        target: &Target,
        rev: &str,
    ) -> Result<Vec<String>, String> {
        let available = match self.evaluated.hosts(repo.as_str(), rev) {
            Some(hosts) => hosts,
            None => {
                let hosts = self.nix_of(repo).list_hosts(flake).await.map_err(|err| {
                    format!(
                        "cannot list nixosConfigurations of the flake at rev {rev}: {}",
                        cut(&err.excerpt())
                    )
                })?;
                self.evaluated.put_hosts(repo.as_str(), rev, hosts.clone());
                hosts
            }
        };
        match target {
            Target::All if available.is_empty() => {
                Err(format!("the flake at rev {rev} has no nixosConfigurations"))
            }
            Target::All => Ok(available),
            Target::Host(host) if available.contains(host) => Ok(vec![host.clone()]),
            Target::Host(host) => Err(format!(
                "host {host} is not in the flake's nixosConfigurations at rev {rev}; hosts: {}",
                available.join(", ")
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

    #[allow(clippy::too_many_arguments)]
    async fn build_host(
        &self,
        events: &tokio::sync::Mutex<&mut Events<'_>>,
        checkout: &Checkout<'_>,
        host: &str,
        logs: &str,
        request_id: &str,
        evaluated_drv: Option<&str>,
        deadline: &Deadline,
        interrupt: &mut watch::Receiver<Option<Interrupt>>,
    ) -> Result<HostOutcome, JobError> {
        let Checkout {
            flake,
            repo,
            rev,
            roots,
        } = *checkout;
        let started = Instant::now();
        let result = |status, out_path, error: Option<String>| HostResult {
            name: host.to_owned(),
            status,
            out_path,
            duration_ms: started.elapsed().as_millis() as u64,
            error: error.map(|e| cut(&e)),
            pushed: None,
            push_error: None,
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
                None => {
                    let drv = self.nix_of(repo).eval_toplevel_drv(flake, host).await;
                    if let Ok(drv) = &drv {
                        self.evaluated.put_drv(repo.as_str(), rev, host, drv);
                        let name = Path::new(drv).file_name().unwrap_or_default();
                        roots.add(&self.nix, &[drv], &name.to_string_lossy()).await;
                    }
                    drv
                }
            }
        };
        let drv = tokio::select! {
            drv = evaluate => drv,
            _ = tokio::time::sleep_until(deadline.at) => return done(HostStatus::TimedOut, None, Some(timed_out())),
            why = interrupted(interrupt) => return stopped(why),
        };
        let drv = match drv {
            Ok(drv) => drv,
            Err(err) => return done(HostStatus::EvalFailed, None, Some(err.excerpt())),
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
        if let Some(out_path) = self.held_by_gc_root(&drv, &out_link) {
            let cached = result(HostStatus::Cached, Some(out_path), None);
            return Ok(HostOutcome::Done(self.push(repo, cached, started).await));
        }
        let mut batcher = LogBatcher::new(
            self.publisher.clone(),
            repo.to_string(),
            logs.to_owned(),
            request_id.to_owned(),
            host.to_owned(),
        );
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
                    return done(HostStatus::TimedOut, None, Some(timed_out()));
                }
                why = interrupted(interrupt) => {
                    batcher.flush().await?;
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
            HostStatus::Built
        };
        let host_result = result(status, Some(built.out_path), None);
        Ok(HostOutcome::Done(
            self.push(repo, host_result, started).await,
        ))
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
            host_result.push_error = pushed.err().map(|err| cut(&err.excerpt()));
            host_result.duration_ms = started.elapsed().as_millis() as u64;
        }
        host_result
    }
}

impl Jobs {
    /// Ends a request that was removed from the queue before any builder took it.
    pub async fn finish_cancelled_queued(
        &self,
        repo: &RepoName,
        target: &Target,
        id: &RequestId,
        by: &str,
        reason: &str,
    ) -> Result<(), JobError> {
        let mut events = Events::open(&self.publisher, repo, target, id).await;
        let mut finish = Finish::new(repo, target, &self.builder_name, Instant::now());
        finish.status = BuildStatus::Cancelled;
        finish.cancelled_by = Some(by.to_owned());
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

/// The file name of `host`'s GC root in `gcroots/<repo>/`: the host name percent-encoded as in
/// its subject token ([`encode_host`]: no `/`, never `.` or `..`), so a host name never reaches
/// outside that directory; a plain name like `web` is its own file name. A name whose encoding is
/// empty or longer than a file name may be (255 bytes) is named `%sha256-<hex of the name>`,
/// which no encoded name can be (an encoded `%` is always followed by two upper-case hex digits).
fn gc_root_name(host: &str) -> String {
    let encoded = encode_host(host);
    if (1..=MAX_FILE_NAME_BYTES).contains(&encoded.len()) {
        encoded
    } else {
        let digest = Sha256::digest(host.as_bytes());
        let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
        format!("%sha256-{hex}")
    }
}

/// Longest file name Linux file systems take.
const MAX_FILE_NAME_BYTES: usize = 255;

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
    }
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

/// A directory of GC roots for the drvs one request builds, so a garbage collection between
/// evaluation and build cannot delete them; removed (and with it the roots) when the request
/// ends. A builder that died leaves its directories behind; the next one removes them at start.
pub struct DrvRoots(PathBuf);

impl DrvRoots {
    /// Where every request's directory goes, under the state dir.
    pub fn parent(state_dir: &Path) -> PathBuf {
        state_dir.join("gcroots").join("requests")
    }

    fn new(state_dir: &Path) -> Self {
        Self(Self::parent(state_dir).join(nuid::next().to_string()))
    }

    /// Roots the drvs still in the store; returns those that are not (collected while cached:
    /// evaluate them again).
    async fn add(&self, nix: &Nix, drvs: &[&str], name: &str) -> Vec<String> {
        let (present, gone): (Vec<&str>, Vec<&str>) =
            drvs.iter().partition(|drv| Path::new(drv).exists());
        if present.is_empty() {
            return gone.into_iter().map(str::to_owned).collect();
        }
        let rooted = match std::fs::create_dir_all(&self.0) {
            Ok(()) => nix.add_drv_roots(&present, &self.0.join(name)).await,
            Err(err) => Err(NixError::Output {
                what: format!("creating GC root directory {}", self.0.display()),
                detail: err.to_string(),
            }),
        };
        if let Err(err) = rooted {
            warn!(error = %err, drvs = present.len(), "cannot add GC roots for evaluated drvs; a garbage collection before their build would fail it");
        }
        gone.into_iter().map(str::to_owned).collect()
    }
}

impl Drop for DrvRoots {
    fn drop(&mut self) {
        // Nix removes the stale registration under gcroots/auto at its next collection.
        let _ = std::fs::remove_dir_all(&self.0);
    }
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

impl Jobs {
    /// The time limits of `request`: the builder's defaults, or what it asked for within the
    /// builder's maximum.
    fn request_limits(&self, request: &ParsedRequest) -> Result<Limits, String> {
        let pick = |asked: Option<u64>, default: Duration, field: &str| match asked {
            None => Ok(default),
            Some(secs) if Duration::from_secs(secs) <= self.timeouts.max => {
                Ok(Duration::from_secs(secs))
            }
            Some(secs) => Err(format!(
                "{field} {secs} is over this builder's maximum of {}s (builder.max_timeout_secs)",
                self.timeouts.max.as_secs()
            )),
        };
        Ok(Limits {
            host: pick(
                request.host_timeout_secs,
                self.timeouts.host,
                "host_timeout_secs",
            )?,
            request: pick(request.timeout_secs, self.timeouts.request, "timeout_secs")?,
        })
    }
}

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

/// What this builder has read of each request subject: a contiguous range of stream sequences
/// and the newest `replace` request in it. Messages never change, so each is read once, however
/// long the queue and however often running requests check it.
#[derive(Default)]
pub struct ReplaceIndex {
    subjects: Mutex<HashMap<String, Scanned>>,
}

#[derive(Debug, Clone, Default)]
struct Scanned {
    /// Stream sequences `from..=up_to` of the subject have been read (empty while `up_to` is 0).
    from: u64,
    up_to: u64,
    /// Stream sequence and id of the newest `replace` request read.
    newest_replace: Option<(u64, String)>,
}

impl Scanned {
    fn saw(&mut self, sequence: u64, id: Option<String>) {
        if let Some(id) = id {
            if self
                .newest_replace
                .as_ref()
                .is_none_or(|(seq, _)| *seq < sequence)
            {
                self.newest_replace = Some((sequence, id));
            }
        }
    }
}

impl ReplaceIndex {
    /// The id of a `replace` request for `subject` newer than `stream_seq`, if any.
    async fn newer_replace(
        &self,
        requests: &jetstream::stream::Stream,
        subject: &str,
        stream_seq: u64,
    ) -> Option<String> {
        let mut scanned = self
            .subjects
            .lock()
            .map(|subjects| subjects.get(subject).cloned().unwrap_or_default())
            .unwrap_or_default();
        if let Ok(newest) = requests.get_last_raw_message_by_subject(subject).await {
            scanned.saw(newest.sequence, replace_request_id(&newest));
            let wanted = stream_seq + 1..newest.sequence;
            let read = if scanned.up_to == 0 {
                read_range(requests, subject, wanted.clone(), &mut scanned).await
            } else {
                // Only what lies outside the range read before.
                read_range(requests, subject, wanted.start..scanned.from, &mut scanned).await
                    && read_range(
                        requests,
                        subject,
                        scanned.up_to + 1..wanted.end,
                        &mut scanned,
                    )
                    .await
            };
            if read {
                scanned.from = if scanned.up_to == 0 {
                    wanted.start
                } else {
                    scanned.from.min(wanted.start)
                };
                scanned.up_to = scanned.up_to.max(newest.sequence);
            }
        }
        let answer = scanned
            .newest_replace
            .as_ref()
            .filter(|(seq, _)| *seq > stream_seq)
            .map(|(_, id)| id.clone());
        if let Ok(mut subjects) = self.subjects.lock() {
            subjects.insert(subject.to_owned(), scanned);
        }
        answer
    }
}

/// Reads the subject's messages with stream sequences in `range`, noting `replace` requests;
/// false if reading failed (the range then counts as not read).
async fn read_range(
    requests: &jetstream::stream::Stream,
    subject: &str,
    range: std::ops::Range<u64>,
    scanned: &mut Scanned,
) -> bool {
    let mut next = range.start;
    while next < range.end {
        match requests
            .raw_message_builder()
            .sequence(next)
            .next_by_subject(subject)
            .send()
            .await
        {
            Ok(message) if message.sequence < range.end => {
                scanned.saw(message.sequence, replace_request_id(&message));
                next = message.sequence + 1;
            }
            Ok(_) => return true,
            Err(err) if err.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                return true
            }
            Err(_) => return false,
        }
    }
    true
}

/// The request's id when it is a `replace` request.
fn replace_request_id(message: &jetstream::message::StreamMessage) -> Option<String> {
    let body: BuildRequest = serde_json::from_slice(&message.payload).unwrap_or_default();
    if body.mode != Some(Mode::Replace) {
        return None;
    }
    let id = message
        .headers
        .get(MSG_ID_HEADER)
        .map(|value| value.as_str().to_owned())
        .or(body.id);
    Some(id.unwrap_or_else(|| format!("at stream sequence {}", message.sequence)))
}

/// While a request runs: keeps it alive with progress acks, and cancels it when a newer
/// `replace` request for the same repo and target is queued.
async fn watch_request(
    message: Arc<RequestMessage>,
    requests: jetstream::stream::Stream,
    replace_index: Arc<ReplaceIndex>,
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
            .newer_replace(&requests, &message.subject, stream_seq)
            .await
        {
            let _ = interrupt.send(Some(Interrupt::Cancel {
                by: format!("replace request {newer}"),
                reason: "replaced by a newer request for the same target".to_owned(),
            }));
        }
    }
}

/// The numbered events of one request.
struct Events<'a> {
    publisher: &'a Publisher,
    subject: String,
    id: String,
    seq: u64,
    last_was_finished: bool,
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
    cancelled_by: Option<String>,
    started: Instant,
}

impl Finish {
    fn new(repo: &RepoName, target: &Target, builder: &str, started: Instant) -> Self {
        Self {
            status: BuildStatus::Failed,
            repo: repo.to_string(),
            target: target.to_string(),
            rev: None,
            hosts: Vec::new(),
            error: None,
            builder: builder.to_owned(),
            cancelled_by: None,
            started,
        }
    }
}

impl<'a> Events<'a> {
    /// Continues after the last stored event of this request, if any (a redelivered request).
    async fn open(
        publisher: &'a Publisher,
        repo: &RepoName,
        target: &Target,
        id: &RequestId,
    ) -> Events<'a> {
        let subject = events_subject(repo, target, id);
        let last = last_event(publisher.jetstream(), &subject).await;
        Events {
            publisher,
            subject,
            id: id.to_string(),
            seq: last.as_ref().map(|event| event.seq).unwrap_or(0),
            last_was_finished: last
                .is_some_and(|event| matches!(event.body, EventBody::Finished { .. })),
        }
    }

    /// The request already ended (cancelled while queued, or an id used again).
    fn already_finished(&self) -> bool {
        self.last_was_finished
    }

    /// 1 for the first `started` of a request, one more for each `started` before this one.
    /// JetStream's delivery count also counts priority hand-backs, so it is only the fallback
    /// when the events cannot be read.
    async fn attempt(&self, id: &RequestId, delivered: u64) -> u64 {
        if self.seq == 0 {
            return 1;
        }
        match homelab_deploy_client::inspect::request_events(self.publisher.jetstream(), id).await {
            Ok(events) => {
                let starts = events
                    .iter()
                    .filter(|event| matches!(event.body, EventBody::Started { .. }))
                    .count();
                starts as u64 + 1
            }
            Err(_) => delivered,
        }
    }

    /// Fails when another builder has published events of this request since our last one:
    /// the request was redelivered while this builder was paused, and the other builder owns it.
    async fn check_still_owner(&self) -> Result<(), JobError> {
        match last_event(self.publisher.jetstream(), &self.subject).await {
            Some(event) if event.seq > self.seq => Err(JobError::Superseded),
            _ => Ok(()),
        }
    }

    /// Publishes the next event. Another event stored under the same `seq` first means another
    /// builder (or a cancel) took the request over: stand down.
    async fn emit(&mut self, body: EventBody) -> Result<(), JobError> {
        self.seq += 1;
        let event = Event {
            id: self.id.clone(),
            seq: self.seq,
            time: OffsetDateTime::now_utc(),
            body,
        };
        let message_id = format!("{}.event.{}", self.id, self.seq);
        let published = self
            .publisher
            .publish_json(&self.subject, &message_id, &event)
            .await?;
        if published.taken_by_another {
            return Err(JobError::Superseded);
        }
        Ok(())
    }

    async fn finish(&mut self, finish: Finish) -> Result<(), JobError> {
        if let Some(error) = &finish.error {
            warn!(request_id = %self.id, error = %error, "request failed");
        }
        crate::metrics::request_finished(&finish.repo, finish.status.as_str());
        self.emit(EventBody::Finished {
            status: finish.status,
            repo: finish.repo,
            target: finish.target,
            rev: finish.rev,
            hosts: finish.hosts,
            error: finish.error.map(|e| cut(&e)),
            builder: Some(finish.builder),
            cancelled_by: finish.cancelled_by,
            duration_ms: finish.started.elapsed().as_millis() as u64,
        })
        .await?;
        Ok(())
    }

    async fn finish_refused(
        &mut self,
        builder: &str,
        repo: &RepoName,
        target: &Target,
        reason: String,
        started: Instant,
    ) -> Result<(), JobError> {
        let mut finish = Finish::new(repo, target, builder, started);
        finish.error = Some(reason);
        self.finish(finish).await
    }
}

/// Keeps the end of an error excerpt (where nix puts the cause) within [`MAX_ERROR_BYTES`].
fn cut(text: &str) -> String {
    let text = text.trim();
    if text.len() <= MAX_ERROR_BYTES {
        return text.to_owned();
    }
    let mut start = text.len() - MAX_ERROR_BYTES;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the host is called, its GC root is one plain file name inside `gcroots/<repo>/`.
    #[test]
    fn gc_root_names_stay_in_their_directory() {
        assert_eq!(gc_root_name("web"), "web");
        assert_eq!(gc_root_name("web.example.org"), "web%2Eexample%2Eorg");
        assert_eq!(gc_root_name("../../x"), "%2E%2E%2F%2E%2E%2Fx");
        let long = "h".repeat(300);
        for name in ["", ".", "..", "a/b", "a\nb", "é", &long, "%sha256-x"] {
            let file = gc_root_name(name);
            let path = Path::new("/state/gcroots/demo").join(&file);
            assert_eq!(
                path.parent(),
                Some(Path::new("/state/gcroots/demo")),
                "{name:?}"
            );
            assert!(
                !file.is_empty() && file.len() <= 255 && !file.starts_with('.'),
                "{name:?}: {file}"
            );
        }
        assert_ne!(gc_root_name(&long), gc_root_name(&"h".repeat(301)));
        assert!(gc_root_name(&long).starts_with("%sha256-"));
    }
}
