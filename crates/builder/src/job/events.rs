//! A request's events, published under its fence, and the `finished` event that ends it: what
//! each event carries, how earlier attempts are counted from them, and how an event too large for
//! the server's `max_payload` is shortened.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use homelab_deploy_client::inspect::{blank_state, fold_event, fold_events, request_events};
use homelab_deploy_protocol::api::{ErrorCode, RequestPhase, RequestState};
use homelab_deploy_protocol::subject::events_subject;
use homelab_deploy_protocol::{
    BuildStatus, Event, EventBody, HostResult, Identity, RepoName, RequestId, Target,
};
use time::OffsetDateTime;
use tracing::warn;

use super::{Canceller, JobError};
use crate::bus::{last_stored, BusError, LogFence, Publisher};
use crate::state::StateStore;

/// Longest error excerpt kept in a host result or a `finished` event.
pub(super) const MAX_ERROR_BYTES: usize = 4096;
/// Shortest excerpt an event that must shrink to fit `max_payload` keeps before leaving
/// excerpts out.
const MIN_ERROR_BYTES: usize = 128;

/// The numbered events of one request, published under a fence: each publish expects the
/// subject's last stored message to be this writer's previous one (JetStream's
/// `Nats-Expected-Last-Subject-Sequence`), so a builder that lost the request (paused past the
/// ack wait while another builder took it over, or cancelled while queued) cannot add to it.
pub(super) struct Events<'a> {
    publisher: &'a Publisher,
    /// Where [`Events::state`] is written after each event.
    store: &'a StateStore,
    /// The request's state with every stored event folded in.
    state: RequestState,
    subject: String,
    pub(super) id: String,
    pub(super) seq: u64,
    /// Stream sequence of the last message stored on the subject (0: none): what the next
    /// publish expects.
    last_stored: u64,
    /// Names this writer in its message ids, so that a copy it stored itself (its ack lost)
    /// is never taken for another writer's message, nor another's for its own.
    writer: String,
    /// What this run's log batches are stored on condition of: its events still end the
    /// subject.
    pub(super) log_fence: Arc<LogFence>,
    last_was_finished: bool,
    /// Status of the `finished` event this writer stored, once it has.
    pub(super) verdict: Option<BuildStatus>,
    /// The verified signer of the request, shown in `started` and `finished`.
    pub(super) requested_by_key: Option<Identity>,
    /// When JetStream stored the request, shown in `started` and `finished`.
    pub(super) queued_at: Option<OffsetDateTime>,
}

pub(super) fn events_error(err: &homelab_deploy_client::ClientError) -> JobError {
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
pub(super) struct Finish {
    pub(super) status: BuildStatus,
    pub(super) repo: String,
    pub(super) target: String,
    pub(super) rev: Option<String>,
    pub(super) hosts: Vec<HostResult>,
    pub(super) error: Option<String>,
    pub(super) builder: String,
    pub(super) cancelled_by: Option<Canceller>,
    /// The kind of failure; when unset, [`Events::finish`] derives it from `status`.
    pub(super) code: Option<ErrorCode>,
    pub(super) started: Instant,
}

impl Finish {
    /// An empty `finished` of the same request, builder and start time as `other`.
    pub(super) fn new_like(other: &Finish) -> Self {
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

    pub(super) fn new(repo: &RepoName, target: &Target, builder: &str, started: Instant) -> Self {
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
pub(super) struct Attempts {
    /// Attempts begun so far: the newest claim's number, or the `started` events when there
    /// are more of those (claims gone with the stream's limits, or made before claims existed).
    pub(super) previous: u64,
    /// Of those, the ones that did not end by handing the request back (`requeued`): the
    /// builder died, stalled past the ack wait, or could not publish.
    pub(super) failed: u64,
    /// How the last attempt ended, for the error of a request given up on.
    pub(super) last_ended: Option<String>,
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
    pub(super) async fn open(
        publisher: &'a Publisher,
        store: &'a StateStore,
        repo: &RepoName,
        target: &Target,
        id: &RequestId,
        queued_at: Option<OffsetDateTime>,
    ) -> Result<Events<'a>, JobError> {
        let subject = events_subject(repo, target, id);
        let last = last_stored::<Event>(publisher.jetstream(), &subject).await?;
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
    pub(super) fn already_finished(&self) -> bool {
        self.last_was_finished
    }

    /// What earlier attempts at this request did, from its events and `last_claim`.
    pub(super) async fn attempts(
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
    pub(super) async fn emit(&mut self, body: EventBody) -> Result<(), JobError> {
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

    pub(super) async fn finish(&mut self, finish: Finish) -> Result<(), JobError> {
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

    pub(super) async fn finish_refused(
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
pub(super) fn cut(text: &str, max: usize) -> String {
    homelab_deploy_protocol::text::tail_marked(text.trim(), max)
}

#[cfg(test)]
mod tests {
    use homelab_deploy_protocol::HostStatus;

    use super::*;

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
