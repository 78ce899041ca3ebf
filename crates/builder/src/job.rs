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

use async_nats::jetstream::AckKind;
use homelab_deploy_protocol::request::parse_request;
use homelab_deploy_protocol::subject::{events_subject, logs_subject, MSG_ID_HEADER};
use homelab_deploy_protocol::{
    BuildStatus, Event, EventBody, HostResult, HostStatus, ParsedRequest, RepoName, RequestId,
    Target,
};
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::bus::{last_event_seq, BusError, Publisher, RequestMessage, PROGRESS_ACK_INTERVAL};
use crate::config::RepoConfig;
use crate::git::{Mirror, Resolved, Wanted};
use crate::logs::LogBatcher;
use crate::nix::{BuildOutput, Nix};

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
    pub host_timeout: Duration,
    pub repos: HashMap<RepoName, ServedRepo>,
}

/// A repo this builder serves, with its mirror. The lock keeps two jobs of the same repo from
/// fetching into the mirror at once.
pub struct ServedRepo {
    pub config: RepoConfig,
    pub mirror: Mirror,
    pub fetch_lock: Arc<Mutex<()>>,
}

/// Why a job stopped without finishing its request.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("stopped by shutdown")]
    Aborted,
}

impl Jobs {
    /// Runs one request message to its end. `abort` turning true stops the build at once and
    /// puts the request back in the queue (a second SIGTERM).
    pub async fn run(&self, message: RequestMessage, abort: watch::Receiver<bool>) {
        let message = Arc::new(message);
        let keepalive = tokio::spawn(keep_alive(message.clone()));
        let outcome = self.run_request(&message, abort).await;
        keepalive.abort();
        let ack = match &outcome {
            Ok(()) => message.double_ack().await,
            Err(JobError::Aborted) => message.ack_with(AckKind::Nak(None)).await,
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
        abort: watch::Receiver<bool>,
    ) -> Result<(), JobError> {
        let attempt = message
            .info()
            .map(|info| info.delivered.max(1) as u64)
            .unwrap_or(1);
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
                    events
                        .finish_refused(&self.builder_name, &repo, &target, refusal.reason, started)
                        .await?;
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
        info!(request_id = %id, repo = %repo, target = %target, attempt, requested_by = ?request.requested_by, "request received");
        let Some(served) = self.repos.get(repo) else {
            let reason = format!("repo {repo} is not served by builder {}", self.builder_name);
            return events
                .finish_refused(&self.builder_name, repo, target, reason, started)
                .await;
        };

        // 2. Resolve one commit.
        let resolved = match self.resolve(served, &request).await {
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
        let hosts = match self.hosts_to_build(&flake, target, &rev).await {
            Ok(hosts) => hosts,
            Err(reason) => {
                let mut finish = Finish::new(repo, target, &self.builder_name, started);
                finish.rev = Some(rev);
                finish.error = Some(reason);
                return events.finish(finish).await;
            }
        };
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

        // 4. Each host in turn.
        let total = hosts.len();
        let mut results = Vec::with_capacity(total);
        let logs = logs_subject(repo, target, id);
        for (position, host) in hosts.iter().enumerate() {
            let index = position + 1;
            events
                .emit(EventBody::HostStarted {
                    host: host.clone(),
                    index,
                    total,
                })
                .await?;
            let result = self
                .build_host(
                    &mut events,
                    &flake,
                    repo,
                    host,
                    &logs,
                    id.as_str(),
                    abort.clone(),
                )
                .await?;
            info!(request_id = %id, host, status = result.status.as_str(), duration_ms = result.duration_ms, "host finished");
            events
                .emit(EventBody::HostFinished {
                    host: host.clone(),
                    index,
                    total,
                    result: result.clone(),
                })
                .await?;
            results.push(result);
        }

        // 5. The whole result.
        let mut finish = Finish::new(repo, target, &self.builder_name, started);
        finish.status = BuildStatus::from_hosts(&results);
        finish.rev = Some(rev);
        finish.hosts = results;
        info!(request_id = %id, status = finish.status.as_str(), "request finished");
        events.finish(finish).await
    }

    async fn resolve(
        &self,
        served: &ServedRepo,
        request: &ParsedRequest,
    ) -> Result<Resolved, String> {
        let mirror = served.mirror.clone();
        let lock = served.fetch_lock.clone();
        let default_ref = served.config.git_ref.clone();
        let rev = request.rev.clone();
        let git_ref = request
            .git_ref
            .clone()
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
        target: &Target,
        rev: &str,
    ) -> Result<Vec<String>, String> {
        let available = self.nix.list_hosts(flake).await.map_err(|err| {
            format!(
                "cannot list nixosConfigurations of the flake at rev {rev}: {}",
                cut(&err.excerpt())
            )
        })?;
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

    /// Evaluates and builds one host. Only a failure to publish is an error; everything nix does
    /// wrong is the host's result.
    #[allow(clippy::too_many_arguments)]
    async fn build_host(
        &self,
        events: &mut Events<'_>,
        flake: &str,
        repo: &RepoName,
        host: &str,
        logs: &str,
        request_id: &str,
        mut abort: watch::Receiver<bool>,
    ) -> Result<HostResult, JobError> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.host_timeout;
        let result = |status, out_path, error: Option<String>| HostResult {
            name: host.to_owned(),
            status,
            out_path,
            duration_ms: started.elapsed().as_millis() as u64,
            error: error.map(|e| cut(&e)),
        };
        let timed_out = || {
            format!(
                "timed out after {}s (builder.host_timeout_secs)",
                self.host_timeout.as_secs()
            )
        };

        let drv = tokio::select! {
            drv = self.nix.eval_toplevel_drv(flake, host) => drv,
            _ = tokio::time::sleep_until(deadline) => {
                return Ok(result(HostStatus::TimedOut, None, Some(timed_out())))
            }
            _ = aborted(&mut abort) => return Err(JobError::Aborted),
        };
        let drv = match drv {
            Ok(drv) => drv,
            Err(err) => return Ok(result(HostStatus::EvalFailed, None, Some(err.excerpt()))),
        };

        let out_link = self
            .state_dir
            .join("gcroots")
            .join(repo.as_str())
            .join(host);
        if let Some(parent) = out_link.parent() {
            if let Err(err) = std::fs::create_dir_all(parent) {
                let error = format!(
                    "cannot create GC root directory {}: {err}",
                    parent.display()
                );
                return Ok(result(HostStatus::BuildFailed, None, Some(error)));
            }
        }
        let mut batcher = LogBatcher::new(
            self.publisher.clone(),
            logs.to_owned(),
            request_id.to_owned(),
            host.to_owned(),
        );
        let (output_tx, mut output) = mpsc::channel(256);
        let build = self.nix.build(&drv, &out_link, output_tx);
        tokio::pin!(build);
        let mut last_progress: Option<Instant> = None;
        let far_future = tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let built = loop {
            tokio::select! {
                built = &mut build => break built,
                Some(item) = output.recv() => match item {
                    BuildOutput::Line(line) => batcher.push(line).await?,
                    BuildOutput::Progress { done, expected, running, failed } => {
                        if last_progress.is_none_or(|at| at.elapsed() >= PROGRESS_EVENT_INTERVAL) {
                            last_progress = Some(Instant::now());
                            events.emit(EventBody::Progress { host: host.to_owned(), done, expected, running, failed }).await?;
                        }
                    }
                },
                _ = tokio::time::sleep_until(batcher.deadline().unwrap_or(far_future)) => batcher.flush().await?,
                _ = tokio::time::sleep_until(deadline) => {
                    batcher.flush().await?;
                    return Ok(result(HostStatus::TimedOut, None, Some(timed_out())));
                }
                _ = aborted(&mut abort) => return Err(JobError::Aborted),
            }
        };
        while let Some(item) = output.recv().await {
            if let BuildOutput::Line(line) = item {
                batcher.push(line).await?;
            }
        }
        batcher.flush().await?;
        Ok(match built {
            Ok(built) if built.derivations_built == 0 => {
                result(HostStatus::Cached, Some(built.out_path), None)
            }
            Ok(built) => result(HostStatus::Built, Some(built.out_path), None),
            Err(err) => result(HostStatus::BuildFailed, None, Some(err.excerpt())),
        })
    }
}

/// Resolves once the builder asks running builds to stop.
async fn aborted(abort: &mut watch::Receiver<bool>) {
    let _ = abort.wait_for(|abort| *abort).await;
}

/// Sends progress acks so the request is not redelivered while it is being built.
async fn keep_alive(message: Arc<RequestMessage>) {
    let mut interval = tokio::time::interval(PROGRESS_ACK_INTERVAL);
    interval.tick().await;
    loop {
        interval.tick().await;
        if let Err(err) = message.ack_with(AckKind::Progress).await {
            warn!(error = %err, subject = %message.subject, "progress ack failed");
        }
    }
}

/// The numbered events of one request.
struct Events<'a> {
    publisher: &'a Publisher,
    subject: String,
    id: String,
    seq: u64,
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
        let seq = last_event_seq(publisher.jetstream(), &subject)
            .await
            .unwrap_or(0);
        Events {
            publisher,
            subject,
            id: id.to_string(),
            seq,
        }
    }

    async fn emit(&mut self, body: EventBody) -> Result<(), BusError> {
        self.seq += 1;
        let event = Event {
            id: self.id.clone(),
            seq: self.seq,
            time: OffsetDateTime::now_utc(),
            body,
        };
        self.publisher.publish_json(&self.subject, &event).await
    }

    async fn finish(&mut self, finish: Finish) -> Result<(), JobError> {
        if let Some(error) = &finish.error {
            warn!(request_id = %self.id, error = %error, "request failed");
        }
        self.emit(EventBody::Finished {
            status: finish.status,
            repo: finish.repo,
            target: finish.target,
            rev: finish.rev,
            hosts: finish.hosts,
            error: finish.error.map(|e| cut(&e)),
            builder: Some(finish.builder),
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
