//! Reading the state of requests and of the fleet straight from JetStream: the request-state
//! bucket (the read model the builders keep, docs/decisions/read-model.md), the requests stream
//! (what is queued) and the builders' key-value bucket. Works with no builder running; the
//! builders serve the same answers on `build.api.>` for plain NATS clients.
//!
//! Without the state bucket (deleted, or a server where no builder of this version started) the
//! same answers come from replaying the events stream, which costs as much as the history.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{self, kv, Context};
use futures::StreamExt;
use homelab_deploy_protocol::api::{
    BuildList, BuilderInfo, BuilderState, BuildsCursor, BuildsQuery, HostOutcome, RequestPhase,
    RequestState, BUILDERS_BUCKET, DEFAULT_BUILDS_LIMIT, HOST_OUTCOME_PACKAGES, STATE_BUCKET,
};
use homelab_deploy_protocol::subject::{
    consumer_name, events_subject, logs_subject, parse_request_subject, request_events_filter,
    ALL_EVENTS_FILTER, EVENTS_STREAM, MSG_ID_HEADER, REQUESTS_STREAM,
};
use homelab_deploy_protocol::{
    error_excerpt, BuildRequest, Event, EventBody, HostResult, HostStatus, Mode, Priority,
    RepoName, RequestId, Target,
};
use time::OffsetDateTime;

use crate::{index, ClientError};

fn nats_error(action: &'static str) -> impl Fn(&dyn std::fmt::Display) -> ClientError {
    move |err| ClientError::Nats {
        action,
        message: err.to_string(),
    }
}

/// Every message stored under `filter` in `stream`, oldest first.
pub async fn read_stream(
    js: &Context,
    stream: &str,
    filter: &str,
) -> Result<Vec<jetstream::Message>, ClientError> {
    let mut out = Vec::new();
    for_each_message(js, stream, filter, |message| out.push(message)).await?;
    Ok(out)
}

/// Hands every message stored under `filter` in `stream` to `each`, oldest first, without
/// keeping them: memory stays at one fetched batch whatever the stream holds. The read's
/// ephemeral consumer expires [`READER_INACTIVE`] after its last fetch, or is deleted at the
/// end in a process that called [`delete_reader_consumers`].
pub async fn for_each_message(
    js: &Context,
    stream: &str,
    filter: &str,
    each: impl FnMut(jetstream::Message),
) -> Result<(), ClientError> {
    read_each(js, stream, filter, each).await
}

/// How long an idle stream reader's consumer outlives its last fetch when it is not deleted.
pub const READER_INACTIVE: Duration = Duration::from_secs(30);

static DELETE_READER_CONSUMERS: AtomicBool = AtomicBool::new(false);

/// From now on, every stream read of this process deletes its consumer when it ends, so a short
/// builder session (`builder --once`) leaves none behind. Called once by a builder at start:
/// builders may delete consumers on the events stream; deployers and viewers may not
/// (docs/security.md), so their readers are left to expire.
pub fn delete_reader_consumers() {
    DELETE_READER_CONSUMERS.store(true, Ordering::Relaxed);
}

async fn read_each(
    js: &Context,
    stream: &str,
    filter: &str,
    mut each: impl FnMut(jetstream::Message),
) -> Result<(), ClientError> {
    let error = nats_error("reading a stream");
    let stream = js.get_stream(stream).await.map_err(|e| error(&e))?;
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: filter.to_owned(),
            ack_policy: AckPolicy::None,
            deliver_policy: DeliverPolicy::All,
            inactive_threshold: READER_INACTIVE,
            ..Default::default()
        })
        .await
        .map_err(|e| error(&e))?;
    let read = async {
        loop {
            let mut batch = consumer
                .fetch()
                .max_messages(FETCH_BATCH)
                .messages()
                .await
                .map_err(|e| error(&e))?;
            let mut got = 0;
            while let Some(message) = batch.next().await {
                each(message.map_err(|e| error(&e))?);
                got += 1;
            }
            if got == 0 {
                return Ok(());
            }
        }
    }
    .await;
    if DELETE_READER_CONSUMERS.load(Ordering::Relaxed) {
        let name = consumer.cached_info().name.clone();
        // Best effort: if the delete fails, the server still removes it after READER_INACTIVE.
        let _ = stream.delete_consumer(&name).await;
    }
    read
}

/// Messages fetched per round trip while reading a stream.
const FETCH_BATCH: usize = 500;

/// Events of one request, oldest first.
pub async fn request_events(js: &Context, id: &RequestId) -> Result<Vec<Event>, ClientError> {
    let messages = read_stream(js, EVENTS_STREAM, &request_events_filter(id)).await?;
    Ok(messages
        .iter()
        .filter_map(|m| serde_json::from_slice(&m.payload).ok())
        .collect())
}

/// A request waiting in (or just taken from) the requests stream.
#[derive(Debug, Clone)]
pub struct PendingRequest {
    pub stream_seq: u64,
    pub id: String,
    pub repo: String,
    /// From the request's subject token.
    pub target: Target,
    pub requested_by: Option<String>,
    pub mode: Mode,
    /// The request's priority class (`interactive` when it named none).
    pub priority: Priority,
    pub queued_at: OffsetDateTime,
    /// No builder holds it: never handed out, or handed back (a request of a higher priority
    /// class waited, or its builder stopped) and waiting to be handed out again.
    pub waiting: bool,
}

/// Every request in the requests stream, oldest first, and whether it waits.
///
/// A request above its repo consumer's delivered sequence was never handed out. One at or
/// below it was, but may have been handed back (NAK) and wait for redelivery: it counts as
/// held only while a live builder lists it among its running requests in the registry (which
/// a builder updates as soon as it takes or ends one), or its state shows it running.
pub async fn pending_requests(js: &Context) -> Result<Vec<PendingRequest>, ClientError> {
    let mut pending = queue_messages(js).await?;
    if pending.iter().all(|p| p.waiting) {
        return Ok(pending);
    }
    let held_by_builders: std::collections::HashSet<String> = list_builders(js)
        .await?
        .into_iter()
        .filter(|builder| !builder.lost)
        .flat_map(|builder| builder.states)
        .filter_map(|state| match state {
            BuilderState::Building { id, .. } => Some(id),
            _ => None,
        })
        .collect();
    let store = state_bucket(js).await;
    for request in pending.iter_mut().filter(|p| !p.waiting) {
        if held_by_builders.contains(&request.id) {
            continue;
        }
        let running = match &store {
            Some(store) => stored_state(store, &request.id)
                .await?
                .is_some_and(|state| state.phase == RequestPhase::Running),
            None => false,
        };
        request.waiting = !running;
    }
    Ok(pending)
}

/// Every message of the requests stream, `waiting` when above its repo consumer's delivered
/// sequence.
async fn queue_messages(js: &Context) -> Result<Vec<PendingRequest>, ClientError> {
    let error = nats_error("reading the request queue");
    let mut stream = match js.get_stream(REQUESTS_STREAM).await {
        Ok(stream) => stream,
        Err(_) => return Ok(Vec::new()),
    };
    let state = stream.info().await.map_err(|e| error(&e))?.state.clone();
    if state.messages == 0 {
        return Ok(Vec::new());
    }
    let mut delivered: HashMap<String, u64> = HashMap::new();
    let mut out = Vec::new();
    // The queue is bounded (`max_pending_requests`); its messages are read QUEUE_GETS_IN_FLIGHT
    // at a time rather than one round trip after another.
    let stream_ref = &stream;
    let mut messages = futures::stream::iter(state.first_sequence..=state.last_sequence)
        .map(|seq| async move { (seq, stream_ref.get_raw_message(seq).await) })
        .buffered(QUEUE_GETS_IN_FLIGHT);
    while let Some((seq, message)) = messages.next().await {
        let Ok(message) = message else {
            continue; // acked or deleted
        };
        let Ok((repo, target)) = parse_request_subject(&message.subject) else {
            continue;
        };
        let body: BuildRequest = serde_json::from_slice(&message.payload).unwrap_or_default();
        let id = message
            .headers
            .get(MSG_ID_HEADER)
            .map(|value| value.as_str().to_owned())
            .or(body.id)
            .unwrap_or_default();
        if !delivered.contains_key(repo.as_str()) {
            let seq = match stream.consumer_info(consumer_name(&repo)).await {
                Ok(info) => info.delivered.stream_sequence,
                Err(_) => 0,
            };
            delivered.insert(repo.to_string(), seq);
        }
        let waiting = seq > delivered.get(repo.as_str()).copied().unwrap_or(0);
        out.push(PendingRequest {
            stream_seq: seq,
            id,
            repo: repo.to_string(),
            target,
            requested_by: body.requested_by,
            mode: body.mode.unwrap_or_default(),
            priority: body.priority.unwrap_or_default(),
            queued_at: message.time,
            waiting,
        });
    }
    Ok(out)
}

/// Direct gets of queued requests (and of state entries) in flight at once.
const QUEUE_GETS_IN_FLIGHT: usize = 64;

/// Folds a request's events into its state.
pub fn fold_events(events: &[Event]) -> Option<RequestState> {
    let first = events.first()?;
    let mut state = blank_state(&first.id, "", "", RequestPhase::Running, first.time);
    for event in events {
        fold_event(&mut state, event);
    }
    Some(state)
}

/// Characters of each host's error excerpt in [`RequestState::host_results`].
pub(crate) const HOST_EXCERPT_CHARS: usize = 240;

fn host_outcome(result: &HostResult, before: Option<&HostOutcome>) -> HostOutcome {
    HostOutcome {
        name: result.name.clone(),
        status: result.status,
        error: result
            .error
            .as_deref()
            .map(|error| error_excerpt(error, HOST_EXCERPT_CHARS))
            .or_else(|| before.and_then(|b| b.error.clone())),
        // A `finished` that had to shrink lists no packages; its host_finished did.
        closure_diff: result
            .closure_diff
            .clone()
            .filter(|d| !d.packages.is_empty() || d.packages_omitted == 0)
            .or_else(|| before.and_then(|b| b.closure_diff.clone()))
            .map(|mut diff| {
                diff.keep_packages(HOST_OUTCOME_PACKAGES);
                diff
            }),
    }
}

/// Applies one event of a request to its state (events in `seq` order).
pub fn fold_event(state: &mut RequestState, event: &Event) {
    if event.seq >= state.last_seq {
        state.updated_at = Some(event.time);
    }
    state.last_seq = state.last_seq.max(event.seq);
    match &event.body {
        EventBody::Started {
            builder,
            repo,
            target,
            rev,
            hosts,
            requested_by,
            requested_by_key,
            queued_at,
            ..
        } => {
            state.phase = RequestPhase::Running;
            if let Some(at) = queued_at {
                state.queued_at = *at;
            }
            state.builder = Some(builder.clone());
            state.repo = repo.clone();
            state.target = target.clone();
            state.rev = Some(rev.clone());
            state.requested_by = requested_by.clone();
            state.requested_by_key = requested_by_key.clone();
            state.started_at = Some(event.time);
            state.hosts = Default::default();
            state.hosts.total = hosts.len() as u64;
            state.hosts.queued = hosts.len() as u64;
            state.host_results.clear();
        }
        EventBody::HostStarted { host, .. } => {
            state.current_host = Some(host.clone());
            state.hosts.running = 1;
            state.hosts.queued = state.hosts.queued.saturating_sub(1);
            state.derivations = Default::default();
        }
        EventBody::Progress {
            done,
            expected,
            running,
            failed,
            ..
        } => {
            state.derivations.done = *done;
            state.derivations.expected = *expected;
            state.derivations.running = *running;
            state.derivations.failed = *failed;
        }
        EventBody::HostFinished { result, .. } => {
            state.current_host = None;
            state.hosts.running = 0;
            state.hosts.done += 1;
            match result.status {
                HostStatus::Built => state.hosts.built += 1,
                HostStatus::Cached => state.hosts.cached += 1,
                HostStatus::Cancelled => state.hosts.cancelled += 1,
                HostStatus::BuildFailed | HostStatus::EvalFailed | HostStatus::TimedOut => {
                    state.hosts.failed += 1
                }
            }
            state.host_results.retain(|h| h.name != result.name);
            state.host_results.push(host_outcome(result, None));
        }
        EventBody::Requeued { .. } => {
            state.phase = RequestPhase::Queued;
            state.builder = None;
            state.current_host = None;
            state.hosts.running = 0;
        }
        EventBody::Finished {
            status,
            repo,
            target,
            rev,
            hosts,
            error,
            builder,
            requested_by_key,
            code,
            queued_at,
            ..
        } => {
            state.phase = RequestPhase::from_status(*status);
            state.code = *code;
            if let Some(at) = queued_at {
                state.queued_at = *at;
            }
            if requested_by_key.is_some() {
                state.requested_by_key = requested_by_key.clone();
            }
            state.repo = repo.clone();
            state.target = target.clone();
            state.rev = rev.clone().or(state.rev.take());
            state.builder = builder.clone().or(state.builder.take());
            state.finished_at = Some(event.time);
            state.error = error.clone();
            state.current_host = None;
            state.hosts.running = 0;
            state.hosts.queued = 0;
            let cancelled = hosts
                .iter()
                .filter(|h| h.status == HostStatus::Cancelled)
                .count() as u64;
            state.hosts.cancelled = cancelled;
            state.hosts.total = state.hosts.total.max(hosts.len() as u64);
            if !hosts.is_empty() {
                // The `finished` list is complete (cancelled hosts included); keep the
                // excerpt a `host_finished` gave when `finished` carries none for a host.
                let before = std::mem::take(&mut state.host_results);
                state.host_results = hosts
                    .iter()
                    .map(|host| host_outcome(host, before.iter().find(|b| b.name == host.name)))
                    .collect();
            }
        }
    }
}

/// A request state with nothing known yet but its id, place and phase.
pub fn blank_state(
    id: &str,
    repo: &str,
    target: &str,
    phase: RequestPhase,
    queued_at: OffsetDateTime,
) -> RequestState {
    RequestState {
        id: id.to_owned(),
        repo: repo.to_owned(),
        target: target.to_owned(),
        phase,
        queue_position: None,
        rev: None,
        builder: None,
        requested_by: None,
        requested_by_key: None,
        queued_at,
        started_at: None,
        finished_at: None,
        current_host: None,
        hosts: Default::default(),
        host_results: Vec::new(),
        derivations: Default::default(),
        error: None,
        code: None,
        last_seq: 0,
        updated_at: None,
        events_subject: None,
        logs_subject: None,
    }
}

fn queued_state(pending: &PendingRequest, position: u64) -> RequestState {
    let mut state = blank_state(
        &pending.id,
        &pending.repo,
        pending.target.as_str(),
        RequestPhase::Queued,
        pending.queued_at,
    );
    state.queue_position = Some(position);
    state.requested_by = pending.requested_by.clone();
    state
}

/// Queued requests, oldest first, each with its 1-based position in its repo's queue in the
/// order builders start them: every `interactive` request before any `ci` one before any
/// `scheduled` one, oldest first within a class (docs/protocol.md, `priority`).
fn queued_states(pending: &[PendingRequest]) -> Vec<RequestState> {
    let mut order: Vec<&PendingRequest> = pending.iter().filter(|p| p.waiting).collect();
    order.sort_by(|a, b| {
        (a.repo.as_str(), a.priority, a.stream_seq).cmp(&(
            b.repo.as_str(),
            b.priority,
            b.stream_seq,
        ))
    });
    let mut positions: HashMap<u64, u64> = HashMap::with_capacity(order.len());
    let mut counts: HashMap<&str, u64> = HashMap::new();
    for request in order {
        let count = counts.entry(request.repo.as_str()).or_insert(0);
        *count += 1;
        positions.insert(request.stream_seq, *count);
    }
    pending
        .iter()
        .filter(|p| p.waiting)
        .map(|p| queued_state(p, positions.get(&p.stream_seq).copied().unwrap_or(0)))
        .collect()
}

/// The request-state bucket, or `None` when it does not exist.
pub(crate) async fn state_bucket(js: &Context) -> Option<kv::Store> {
    js.get_key_value(STATE_BUCKET).await.ok()
}

/// The state of request `id` as the state bucket holds it (one direct get).
///
/// # Errors
/// [`ClientError::Nats`] when the bucket cannot be read.
pub async fn stored_state(
    store: &kv::Store,
    id: &str,
) -> Result<Option<RequestState>, ClientError> {
    let bytes = store
        .get(id)
        .await
        .map_err(|e| nats_error("reading the request-state bucket")(&e))?;
    Ok(bytes.and_then(|bytes| serde_json::from_slice(&bytes).ok()))
}

/// `state` with its events and logs subjects named.
fn with_subjects(mut state: RequestState) -> RequestState {
    let id = RequestId::parse(&state.id);
    let repo = RepoName::parse(&state.repo);
    let target = Target::parse(&state.target);
    if let (Ok(id), Ok(repo), Ok(target)) = (id, repo, target) {
        state.events_subject = Some(events_subject(&repo, &target, &id));
        state.logs_subject = Some(logs_subject(&repo, &target, &id));
    }
    state
}

/// The state of request `id`, with its events and logs subjects, or `None` when no stream
/// knows it (never sent, or expired). Reads JetStream only: works with no builder running.
///
/// A request the state bucket shows running or finished costs one read of the bucket,
/// whatever the history holds. A queued one (or one the bucket does not know) is looked up in
/// the queue, which is bounded; only an id known to neither replays its own events.
pub async fn request_state(
    js: &Context,
    id: &RequestId,
) -> Result<Option<RequestState>, ClientError> {
    Ok(find_state(js, id).await?.map(with_subjects))
}

async fn find_state(js: &Context, id: &RequestId) -> Result<Option<RequestState>, ClientError> {
    let stored = match state_bucket(js).await {
        Some(store) => stored_state(&store, id.as_str()).await?,
        None => None,
    };
    if let Some(state) = stored {
        let mut state = caught_up(js, id, state).await?;
        if state.phase == RequestPhase::Queued {
            // Handed back (`requeued`): its place comes from the queue.
            let pending = pending_requests(js).await?;
            state.queue_position = queued_states(&pending)
                .into_iter()
                .find(|s| s.id == id.as_str())
                .and_then(|s| s.queue_position);
        }
        return Ok(Some(state));
    }
    let pending = pending_requests(js).await?;
    if let Some(state) = queued_states(&pending)
        .into_iter()
        .find(|s| s.id == id.as_str())
    {
        return Ok(Some(state));
    }
    if let Some(request) = pending.iter().find(|p| p.id == id.as_str()) {
        // Handed to a builder that has not published `started` yet.
        let mut state = queued_state(request, 0);
        state.phase = RequestPhase::Running;
        state.queue_position = None;
        return Ok(Some(state));
    }
    let events = request_events(js, id).await?;
    Ok(fold_events(&events))
}

/// `state` with the events stored after it folded in. The builder writes the bucket just after
/// each event, so a client that saw an event may read the state before it; one read of the
/// subject's last event tells, for a request that has not finished.
async fn caught_up(
    js: &Context,
    id: &RequestId,
    state: RequestState,
) -> Result<RequestState, ClientError> {
    if !matches!(state.phase, RequestPhase::Queued | RequestPhase::Running) {
        return Ok(state);
    }
    let (Ok(repo), Ok(target)) = (RepoName::parse(&state.repo), Target::parse(&state.target))
    else {
        return Ok(state);
    };
    let error = nats_error("reading the events stream");
    let stream = js.get_stream(EVENTS_STREAM).await.map_err(|e| error(&e))?;
    let last_seq = match stream
        .get_last_raw_message_by_subject(&events_subject(&repo, &target, id))
        .await
    {
        Ok(message) => serde_json::from_slice::<Event>(&message.payload)
            .map(|event| event.seq)
            .unwrap_or(0),
        Err(_) => 0,
    };
    if last_seq <= state.last_seq {
        return Ok(state);
    }
    let events = request_events(js, id).await?;
    Ok(fold_events(&events).unwrap_or(state))
}

/// Queued and recent requests, newest first: one page of at most `query.limit` (default
/// [`DEFAULT_BUILDS_LIMIT`]) from `query.cursor` on, with the cursor of the next page.
///
/// Queued and running requests come from the queue (bounded: a running request stays in it
/// until its builder acks it at the end), with the running ones' states from the state bucket;
/// finished ones from the newest entries of the bucket's finished-request index
/// ([`crate::index`]), then one bucket read per build on the page. So the first page costs the
/// same whatever the history holds; a page far back, or a `--state` few recent requests are in,
/// reads further back. Without the bucket, every stored event is replayed.
///
/// # Errors
/// [`ClientError::BadCursor`] when `query.cursor` is not a cursor this function wrote;
/// [`ClientError::Nats`] when a stream cannot be read.
pub async fn list_builds(js: &Context, query: &BuildsQuery) -> Result<BuildList, ClientError> {
    let cursor = match query.cursor.as_deref() {
        Some(text) => Some(
            BuildsCursor::parse(text).ok_or_else(|| ClientError::BadCursor {
                cursor: text.chars().take(80).collect(),
            })?,
        ),
        None => None,
    };
    let wanted = |b: &RequestState| {
        query.repo.as_ref().is_none_or(|repo| &b.repo == repo)
            && query.phase.is_none_or(|phase| b.phase == phase)
            && cursor.as_ref().is_none_or(|cursor| cursor.precedes(b))
    };
    let limit = query.limit.unwrap_or(DEFAULT_BUILDS_LIMIT);
    let pending = pending_requests(js).await?;
    let mut builds = queued_states(&pending);
    // Every queued request is in the queue: the bucket is read only for the other phases.
    if query.phase != Some(RequestPhase::Queued) {
        match state_bucket(js).await {
            Some(store) => {
                if query
                    .phase
                    .is_none_or(|phase| phase == RequestPhase::Running)
                {
                    builds.extend(held_states(&store, &pending).await?);
                }
                let in_index = |e: &index::IndexEntry| {
                    query.repo.as_ref().is_none_or(|repo| &e.repo == repo)
                        && cursor
                            .as_ref()
                            .is_none_or(|cursor| cursor.precedes_key(e.queued_at, &e.id))
                };
                builds.extend(finished_states(&store, query.phase, limit + 1, &in_index).await?);
            }
            None => {
                let in_queue: std::collections::HashSet<&str> =
                    builds.iter().map(|b| b.id.as_str()).collect();
                let mut others: Vec<RequestState> =
                    replayed_states(js).await?.into_values().collect();
                others.retain(|b| !in_queue.contains(b.id.as_str()));
                for state in &mut others {
                    if let Some(request) = pending.iter().find(|p| p.id == state.id) {
                        state.queued_at = request.queued_at;
                    }
                }
                builds.extend(others);
            }
        }
    }
    builds.retain(|b| wanted(b));
    builds.sort_by(|a, b| b.queued_at.cmp(&a.queued_at).then_with(|| a.id.cmp(&b.id)));
    let mut seen = std::collections::HashSet::new();
    builds.retain(|b| seen.insert(b.id.clone()));
    let next_cursor = (builds.len() > limit)
        .then(|| {
            builds
                .get(limit.wrapping_sub(1))
                .map(|b| BuildsCursor::after(b).to_string())
        })
        .flatten();
    builds.truncate(limit);
    Ok(BuildList {
        builds,
        next_cursor,
    })
}

/// The states of the requests a builder holds (in the queue, not waiting): running, or handed
/// out and not started yet. One that finished and is not acked yet is left to the index.
async fn held_states(
    store: &kv::Store,
    pending: &[PendingRequest],
) -> Result<Vec<RequestState>, ClientError> {
    let held: Vec<PendingRequest> = pending.iter().filter(|p| !p.waiting).cloned().collect();
    let mut reads = futures::stream::iter(held)
        .map(|request| async move {
            let stored = stored_state(store, &request.id).await;
            (request, stored)
        })
        .buffer_unordered(QUEUE_GETS_IN_FLIGHT);
    let mut states = Vec::new();
    while let Some((request, stored)) = reads.next().await {
        let state = match stored? {
            Some(state) if index::is_indexed(state.phase) => continue,
            Some(mut state) => {
                state.queued_at = request.queued_at;
                state
            }
            None => {
                // Handed to a builder that has not published `started` yet.
                let mut state = queued_state(&request, 0);
                state.phase = RequestPhase::Running;
                state.queue_position = None;
                state
            }
        };
        states.push(state);
    }
    Ok(states)
}

/// The states of at least the `count` newest finished requests (of `phase` only, when given)
/// for which `wanted` holds, from the finished-request index: one read of the bucket for each.
async fn finished_states(
    store: &kv::Store,
    phase: Option<RequestPhase>,
    count: usize,
    wanted: &impl Fn(&index::IndexEntry) -> bool,
) -> Result<Vec<RequestState>, ClientError> {
    let lists = futures::future::try_join_all(
        index::INDEXED_PHASES
            .into_iter()
            .filter(|indexed| phase.is_none_or(|phase| phase == *indexed))
            .map(|indexed| index::newest(store, indexed, count, wanted)),
    )
    .await?;
    let mut entries: Vec<index::IndexEntry> = lists.into_iter().flatten().collect();
    entries.sort_by(|a, b| b.queued_at.cmp(&a.queued_at).then_with(|| a.id.cmp(&b.id)));
    let mut seen = std::collections::HashSet::new();
    entries.retain(|e| seen.insert(e.id.clone()));
    entries.truncate(count);
    let mut reads = futures::stream::iter(entries)
        .map(|entry| async move { stored_state(store, &entry.id).await })
        .buffer_unordered(QUEUE_GETS_IN_FLIGHT);
    let mut states = Vec::new();
    while let Some(state) = reads.next().await {
        // A state that expired before its index entry is left out.
        states.extend(state?);
    }
    Ok(states)
}

/// Every request's state, folded from every stored event: what the state bucket is rebuilt
/// from. Memory grows with the number of requests in the events stream, not of events.
///
/// # Errors
/// [`ClientError::Nats`] when the events stream cannot be read.
pub async fn replayed_states(js: &Context) -> Result<HashMap<String, RequestState>, ClientError> {
    let mut by_id: HashMap<String, RequestState> = HashMap::new();
    for_each_message(js, EVENTS_STREAM, ALL_EVENTS_FILTER, |message| {
        let Ok(event) = serde_json::from_slice::<Event>(&message.payload) else {
            return;
        };
        let state = by_id
            .entry(event.id.clone())
            .or_insert_with(|| blank_state(&event.id, "", "", RequestPhase::Running, event.time));
        fold_event(state, &event);
    })
    .await?;
    Ok(by_id)
}

/// Every builder that announced itself, by name, with the age of its heartbeat and whether
/// it is lost ([`BuilderInfo::judge`]).
pub async fn list_builders(js: &Context) -> Result<Vec<BuilderInfo>, ClientError> {
    let error = nats_error("reading the builder registry");
    let Ok(store) = js.get_key_value(BUILDERS_BUCKET).await else {
        return Ok(Vec::new());
    };
    let mut keys = store.keys().await.map_err(|e| error(&e))?;
    let mut names = Vec::new();
    while let Some(key) = keys.next().await {
        names.push(key.map_err(|e| error(&e))?);
    }
    let mut builders = Vec::new();
    let now = OffsetDateTime::now_utc();
    for name in names {
        if let Some(bytes) = store.get(&name).await.map_err(|e| error(&e))? {
            if let Ok(mut info) = serde_json::from_slice::<BuilderInfo>(&bytes) {
                info.judge(now);
                builders.push(info);
            }
        }
    }
    builders.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(builders)
}

#[cfg(test)]
mod tests {
    use super::*;
    use homelab_deploy_protocol::api::{DerivationCounts, HostCounts};

    fn pending(seq: u64, repo: &str, priority: Priority) -> PendingRequest {
        PendingRequest {
            stream_seq: seq,
            id: format!("request{seq:02}"),
            repo: repo.to_owned(),
            target: Target::All,
            requested_by: None,
            mode: Mode::Enqueue,
            priority,
            queued_at: OffsetDateTime::UNIX_EPOCH,
            waiting: true,
        }
    }

    /// Positions follow the order builders start requests in: class first, then age, per repo.
    #[test]
    fn queue_positions_put_priority_classes_first() {
        let queue = [
            pending(1, "demo", Priority::Scheduled),
            pending(2, "demo", Priority::Ci),
            pending(3, "other", Priority::Scheduled),
            pending(4, "demo", Priority::Interactive),
            pending(5, "demo", Priority::Scheduled),
            pending(6, "demo", Priority::Interactive),
        ];
        let positions: Vec<(String, Option<u64>)> = queued_states(&queue)
            .into_iter()
            .map(|s| (s.id, s.queue_position))
            .collect();
        let expected = [(1, 4), (2, 3), (3, 1), (4, 1), (5, 5), (6, 2)]
            .map(|(seq, at)| (format!("request{seq:02}"), Some(at)));
        assert_eq!(positions, expected);
    }

    /// When the event numbered `seq` happened: a second apart.
    fn at(seq: u64) -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(seq as i64)
    }

    fn event(seq: u64, body: EventBody) -> Event {
        Event {
            id: "request01".to_owned(),
            seq,
            time: at(seq),
            body,
        }
    }

    fn started(builder: &str, hosts: &[&str], attempt: u64) -> EventBody {
        EventBody::Started {
            builder: builder.to_owned(),
            repo: "demo".to_owned(),
            target: "all".to_owned(),
            rev: "0123456789abcdef0123456789abcdef01234567".to_owned(),
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            requested_by: Some("alice@laptop".to_owned()),
            requested_by_key: None,
            attempt,
            request_seq: Some(7),
            queued_at: Some(at(0)),
        }
    }

    fn host_started(host: &str, index: usize, total: usize) -> EventBody {
        EventBody::HostStarted {
            host: host.to_owned(),
            index,
            total,
        }
    }

    fn result(host: &str, status: HostStatus, error: Option<&str>) -> HostResult {
        HostResult {
            name: host.to_owned(),
            status,
            out_path: None,
            duration_ms: 1000,
            error: error.map(str::to_owned),
            pushed: None,
            push_error: None,
            closure_diff: None,
        }
    }

    fn host_finished(result: HostResult, index: usize, total: usize) -> EventBody {
        EventBody::HostFinished {
            host: result.name.clone(),
            index,
            total,
            result,
            log_lines: None,
        }
    }

    /// A `finished` event of `status` (`failed`, …) listing `hosts`, with none of the optional
    /// fields (no rev, no builder: `started` gave them).
    fn finished(status: &str, hosts: &[HostResult]) -> EventBody {
        serde_json::from_value(serde_json::json!({
            "type": "finished",
            "status": status,
            "repo": "demo",
            "target": "all",
            "hosts": hosts,
            "duration_ms": 5000,
        }))
        .expect("a finished event")
    }

    /// The bucket of [`HostCounts`] a host of `status` counts in. Exhaustive: a new status
    /// does not compile here until it has a bucket.
    fn bucket(counts: &HostCounts, status: HostStatus) -> u64 {
        match status {
            HostStatus::Built => counts.built,
            HostStatus::Cached => counts.cached,
            HostStatus::Cancelled => counts.cancelled,
            HostStatus::BuildFailed | HostStatus::EvalFailed | HostStatus::TimedOut => {
                counts.failed
            }
        }
    }

    /// A request with no event has no state.
    #[test]
    fn no_events_fold_to_no_state() {
        assert_eq!(fold_events(&[]), None);
    }

    /// Each host's `host_finished` counts it in the bucket of its status and in no other; with
    /// one host of every status, `finished` keeps those counts (its cancelled count is the
    /// hosts it lists cancelled) and lists every host's outcome in order.
    #[test]
    fn every_host_status_counts_in_its_own_bucket() {
        use HostStatus::{BuildFailed, Built, Cached, Cancelled, EvalFailed, TimedOut};
        let statuses = [Built, Cached, BuildFailed, EvalFailed, Cancelled, TimedOut];
        for status in statuses {
            let state = fold_events(&[
                event(1, started("b1", &["web"], 1)),
                event(2, host_started("web", 1, 1)),
                event(3, host_finished(result("web", status, None), 1, 1)),
            ])
            .expect("state");
            let counts = &state.hosts;
            assert_eq!(bucket(counts, status), 1, "{status:?}: {counts:?}");
            assert_eq!(
                counts.built + counts.cached + counts.failed + counts.cancelled,
                1,
                "{status:?} counted twice: {counts:?}"
            );
            assert_eq!(
                (counts.done, counts.running, counts.queued),
                (1, 0, 0),
                "{status:?}"
            );
        }

        let hosts: Vec<&str> = statuses.iter().map(|s| s.as_str()).collect();
        let mut events = vec![event(1, started("b1", &hosts, 1))];
        for (index, (host, status)) in hosts.iter().zip(statuses).enumerate() {
            let seq = events.len() as u64 + 1;
            events.push(event(seq, host_started(host, index + 1, hosts.len())));
            let done = result(host, status, None);
            events.push(event(seq + 1, host_finished(done, index + 1, hosts.len())));
        }
        let results: Vec<HostResult> = hosts
            .iter()
            .zip(statuses)
            .map(|(host, status)| result(host, status, None))
            .collect();
        let seq = events.len() as u64 + 1;
        events.push(event(seq, finished("failed", &results)));
        let state = fold_events(&events).expect("state");
        let expected = HostCounts {
            total: 6,
            done: 6,
            built: 1,
            cached: 1,
            running: 0,
            failed: 3,
            cancelled: 1,
            queued: 0,
        };
        assert_eq!(state.hosts, expected);
        assert_eq!(state.phase, RequestPhase::Failed);
        let outcomes: Vec<(&str, HostStatus)> = state
            .host_results
            .iter()
            .map(|h| (h.name.as_str(), h.status))
            .collect();
        let wanted: Vec<(&str, HostStatus)> = hosts.into_iter().zip(statuses).collect();
        assert_eq!(outcomes, wanted);
    }

    /// Through a request's life the state says what the last event says: running on a host
    /// with its derivation counts, then finished with the rev and builder of `started` (which
    /// `finished` need not repeat) and the error excerpt of the host's own `host_finished`.
    #[test]
    fn a_request_folds_through_its_life() {
        let mut state = fold_events(&[event(1, started("b1", &["web", "db"], 1))]).expect("state");
        assert_eq!(state.phase, RequestPhase::Running);
        assert_eq!(state.builder.as_deref(), Some("b1"));
        assert_eq!(state.started_at, Some(at(1)));
        assert_eq!(state.queued_at, at(0));
        assert_eq!((state.hosts.total, state.hosts.queued), (2, 2));

        fold_event(&mut state, &event(2, host_started("web", 1, 2)));
        fold_event(
            &mut state,
            &event(
                3,
                EventBody::Progress {
                    host: "web".to_owned(),
                    done: 3,
                    expected: 10,
                    running: 2,
                    failed: 0,
                },
            ),
        );
        assert_eq!(state.current_host.as_deref(), Some("web"));
        assert_eq!((state.hosts.running, state.hosts.queued), (1, 1));
        assert_eq!(
            (state.derivations.done, state.derivations.expected),
            (3, 10)
        );
        let failed = result("web", HostStatus::BuildFailed, Some("error: boom"));
        fold_event(&mut state, &event(4, host_finished(failed, 1, 2)));
        fold_event(&mut state, &event(5, host_started("db", 2, 2)));
        // `db` starts with no derivation counted yet.
        assert_eq!(state.derivations, DerivationCounts::default());
        let db = result("db", HostStatus::Built, None);
        fold_event(&mut state, &event(6, host_finished(db.clone(), 2, 2)));
        // `finished` lists `web` without the excerpt its `host_finished` carried.
        let web = result("web", HostStatus::BuildFailed, None);
        fold_event(&mut state, &event(7, finished("failed", &[web, db])));

        assert_eq!(state.phase, RequestPhase::Failed);
        assert_eq!(state.finished_at, Some(state.updated_at.expect("updated")));
        assert_eq!(state.finished_at, Some(at(7)));
        assert_eq!(state.last_seq, 7);
        assert_eq!(
            state.rev.as_deref(),
            Some("0123456789abcdef0123456789abcdef01234567")
        );
        assert_eq!(state.builder.as_deref(), Some("b1"));
        assert_eq!(state.current_host, None);
        assert_eq!((state.hosts.built, state.hosts.failed), (1, 1));
        assert_eq!(state.host_results[0].error.as_deref(), Some("error: boom"));
        assert_eq!(state.host_results[1].error, None);
    }

    /// An event folded after a later one (events read out of order) counts, but leaves the
    /// state's `last_seq` and `updated_at` at the later event.
    #[test]
    fn an_earlier_event_folded_late_does_not_move_the_state_back() {
        let first = event(1, started("b1", &["web"], 1));
        let progress = event(
            3,
            EventBody::Progress {
                host: "web".to_owned(),
                done: 1,
                expected: 4,
                running: 1,
                failed: 0,
            },
        );
        let late = event(2, host_started("web", 1, 1));
        let state = fold_events(&[first, progress, late]).expect("state");
        assert_eq!(state.last_seq, 3);
        assert_eq!(state.updated_at, Some(at(3)));
        assert_eq!(state.current_host.as_deref(), Some("web"));
    }

    /// A request handed back is queued again with no builder; the next builder's `started`
    /// (attempt 2) counts its hosts afresh.
    #[test]
    fn a_requeued_request_is_queued_until_the_next_start() {
        let mut state = fold_events(&[
            event(1, started("b1", &["web", "db"], 1)),
            event(2, host_started("web", 1, 2)),
            event(
                3,
                host_finished(result("web", HostStatus::Built, None), 1, 2),
            ),
            event(4, host_started("db", 2, 2)),
            event(
                5,
                EventBody::Requeued {
                    builder: "b1".to_owned(),
                    reason: "stopping".to_owned(),
                },
            ),
        ])
        .expect("state");
        assert_eq!(state.phase, RequestPhase::Queued);
        assert_eq!(state.builder, None);
        assert_eq!(state.current_host, None);
        assert_eq!(state.hosts.running, 0);

        fold_event(&mut state, &event(6, started("b2", &["web", "db"], 2)));
        assert_eq!(state.phase, RequestPhase::Running);
        assert_eq!(state.builder.as_deref(), Some("b2"));
        assert_eq!(
            state.hosts,
            HostCounts {
                total: 2,
                queued: 2,
                ..Default::default()
            }
        );
        assert!(state.host_results.is_empty(), "{:?}", state.host_results);
    }
}
