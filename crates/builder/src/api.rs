//! The control API under `build.api.>`, answered by builders: status, builds and builders for
//! plain NATS clients (the CLI reads the same from JetStream itself), cancel, and drain.

use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, Message};
use futures::StreamExt;
use homelab_deploy_client::inspect::{list_builders, list_builds, pending_requests, request_state};
use homelab_deploy_client::ClientError;
use homelab_deploy_protocol::api::{
    builder_cancel_subject, builder_diff_subject, builder_drain_subject, ApiError, BuildList,
    BuilderList, BuilderState, BuildsCursor, BuildsQuery, CancelReply, CancelRequest, DiffQuery,
    DiffReply, DrainReply, HeldBuild, RequestPhase, StatusQuery, API_QUEUE_GROUP, BUILDERS_SUBJECT,
    BUILDS_SUBJECT, CANCEL_SUBJECT, DEFAULT_BUILDS_LIMIT, ERROR_BUSY, ERROR_FORBIDDEN,
    ERROR_INVALID, ERROR_TOO_LARGE, MAX_BUILDS_LIMIT, STATUS_SUBJECT,
};
use homelab_deploy_protocol::identity::Purpose;
use homelab_deploy_protocol::subject::shown;
use homelab_deploy_protocol::{RepoName, RequestId};
use serde::Serialize;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::closures;
use crate::daemon::Stop;
use crate::job::{CancelOutcome, Canceller, Jobs};

const MAX_TEXT_CHARS: usize = 256;
/// Longest host name a diff query may carry (what a request subject's token allows, unescaped).
const MAX_HOST_BYTES: usize = 512;

/// Queries (status, builds, builders, cancel) one builder answers at once. Each reads JetStream
/// and holds what it read until it replies, so this bounds the API's memory: a flood of queries
/// gets [`ERROR_BUSY`] replies instead of one task each.
pub const MAX_CONCURRENT_QUERIES: usize = 4;

/// Bytes kept free below the server's `max_payload` for a reply's headers.
const REPLY_HEADROOM: usize = 1024;

/// Serves the API until the builder stops (dropping the future ends every query it runs).
pub async fn serve(
    client: Client,
    jobs: Arc<Jobs>,
    stop_tx: watch::Sender<Stop>,
) -> Result<(), async_nats::SubscribeError> {
    let me = jobs.builder_name.clone();
    let mut subscriptions = Vec::new();
    for subject in [
        STATUS_SUBJECT,
        BUILDS_SUBJECT,
        BUILDERS_SUBJECT,
        CANCEL_SUBJECT,
    ] {
        subscriptions.push(
            client
                .queue_subscribe(subject, API_QUEUE_GROUP.to_owned())
                .await?,
        );
    }
    subscriptions.push(client.subscribe(builder_cancel_subject(&me)).await?);
    subscriptions.push(client.subscribe(builder_drain_subject(&me)).await?);
    // Runs nix, so it takes a query permit like the JetStream queries.
    subscriptions.push(client.subscribe(builder_diff_subject(&me)).await?);
    let mut requests = futures::stream::select_all(subscriptions);
    let api = Arc::new(Api {
        client: client.clone(),
        jobs,
        stop_tx,
    });
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_QUERIES));
    let mut queries = JoinSet::new();
    while let Some(message) = requests.next().await {
        while queries.try_join_next().is_some() {}
        if api.is_own_subject(&message.subject) {
            // This builder's cancel and drain touch only its own state: answered here at once,
            // never refused as busy.
            api.handle(message).await;
            continue;
        }
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let api = api.clone();
                queries.spawn(async move {
                    api.handle(message).await;
                    drop(permit);
                });
            }
            Err(_) => {
                warn!(subject = %message.subject, limit = MAX_CONCURRENT_QUERIES, "API busy: refused a query");
                api.answer(
                    &message,
                    Err(ApiFailure::new(
                        ERROR_BUSY,
                        format!(
                            "builder {me} is answering {MAX_CONCURRENT_QUERIES} API queries already; retry in a moment"
                        ),
                    )),
                )
                .await;
            }
        }
    }
    Ok(())
}

struct Api {
    client: Client,
    jobs: Arc<Jobs>,
    stop_tx: watch::Sender<Stop>,
}

/// A failed query: its message, and a machine-readable [`ApiError::code`] where one applies.
struct ApiFailure {
    error: String,
    code: Option<&'static str>,
}

impl ApiFailure {
    fn new(code: &'static str, error: String) -> Self {
        Self {
            error,
            code: Some(code),
        }
    }
}

impl From<String> for ApiFailure {
    fn from(error: String) -> Self {
        Self { error, code: None }
    }
}

type Reply = Result<Vec<u8>, String>;
/// A reply, or a failure with its code.
type Answer = Result<Vec<u8>, ApiFailure>;

fn json(value: &impl Serialize) -> Reply {
    serde_json::to_vec(value).map_err(|err| format!("cannot encode the reply: {err}"))
}

fn parse<T: serde::de::DeserializeOwned + Default>(payload: &[u8]) -> Result<T, String> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(payload).map_err(|err| format!("request body is not valid: {err}"))
}

impl Api {
    fn is_own_subject(&self, subject: &str) -> bool {
        let me = &self.jobs.builder_name;
        subject == builder_cancel_subject(me) || subject == builder_drain_subject(me)
    }

    /// The largest reply the server takes from this connection.
    fn max_reply_bytes(&self) -> usize {
        self.client
            .server_info()
            .max_payload
            .saturating_sub(REPLY_HEADROOM)
    }

    async fn handle(&self, message: Message) {
        let me = &self.jobs.builder_name;
        let reply: Answer = match message.subject.as_str() {
            BUILDS_SUBJECT => self.builds(&message.payload).await,
            STATUS_SUBJECT => self.status(&message.payload).await.map_err(Into::into),
            BUILDERS_SUBJECT => self.builders().await.map_err(Into::into),
            CANCEL_SUBJECT => self.cancel(&message).await,
            subject if subject == builder_cancel_subject(me) => self.cancel_here(&message),
            subject if subject == builder_drain_subject(me) => self.drain().map_err(Into::into),
            subject if subject == builder_diff_subject(me) => self.diff(&message.payload).await,
            other => Err(format!("unknown API subject {other}").into()),
        };
        self.answer(&message, reply).await;
    }

    /// Sends `reply` (or its error) to the asker; a reply over `max_payload` becomes an
    /// [`ERROR_TOO_LARGE`] error, so the asker always hears something.
    async fn answer(&self, message: &Message, reply: Answer) {
        let Some(reply_to) = message.reply.clone() else {
            return;
        };
        let max = self.max_reply_bytes();
        let reply = reply.and_then(|payload| {
            if payload.len() <= max {
                Ok(payload)
            } else {
                Err(ApiFailure::new(
                    ERROR_TOO_LARGE,
                    format!(
                        "the reply is {} bytes, over the NATS server's max_payload of {} bytes (less {REPLY_HEADROOM} for headers)",
                        payload.len(),
                        self.client.server_info().max_payload
                    ),
                ))
            }
        });
        let payload = match reply {
            Ok(payload) => payload,
            Err(failure) => serde_json::to_vec(&ApiError {
                error: failure.error,
                code: failure.code.map(str::to_owned),
            })
            .unwrap_or_default(),
        };
        if let Err(err) = self.client.publish(reply_to, payload.into()).await {
            warn!(error = %err, subject = %message.subject, "answering an API request failed");
        }
    }

    fn js(&self) -> &async_nats::jetstream::Context {
        self.jobs.publisher.jetstream()
    }

    async fn status(&self, payload: &[u8]) -> Reply {
        let query: StatusQuery = serde_json::from_slice(payload)
            .map_err(|err| format!("expected {{\"id\": \"…\"}}: {err}"))?;
        let id = RequestId::parse(&query.id).map_err(|err| err.to_string())?;
        match request_state(self.js(), &id)
            .await
            .map_err(|err| err.to_string())?
        {
            Some(state) => json(&state),
            None => Err(format!(
                "no request with id {id} (never sent, or its events expired)"
            )),
        }
    }

    async fn builds(&self, payload: &[u8]) -> Answer {
        let query: BuildsQuery =
            parse(payload).map_err(|error| ApiFailure::new(ERROR_INVALID, error))?;
        let limit = query.limit.unwrap_or(DEFAULT_BUILDS_LIMIT);
        if !(1..=MAX_BUILDS_LIMIT).contains(&limit) {
            return Err(ApiFailure::new(
                ERROR_INVALID,
                format!(
                    "limit {limit} is out of range: ask for 1 to {MAX_BUILDS_LIMIT} builds and page with next_cursor"
                ),
            ));
        }
        let list = list_builds(self.js(), &query).await.map_err(|err| {
            let text = err.to_string();
            match err {
                ClientError::BadCursor { .. } => ApiFailure::new(ERROR_INVALID, text),
                _ => text.into(),
            }
        })?;
        fit_page(list, self.max_reply_bytes())
    }

    async fn builders(&self) -> Reply {
        let builders = list_builders(self.js())
            .await
            .map_err(|err| err.to_string())?;
        json(&BuilderList { builders })
    }

    /// Who sent a cancel and what it says; a cancel whose signature fails (or that is unsigned
    /// where signatures are required) is refused with [`ERROR_FORBIDDEN`].
    fn cancel_sender(&self, message: &Message) -> Result<(CancelRequest, Canceller), ApiFailure> {
        let request = parse_cancel(&message.payload)?;
        let key = self
            .jobs
            .access
            .sender(message.headers.as_ref(), Purpose::Cancel, &message.payload)
            .map_err(|why| {
                warn!(request_id = %shown(&request.id), reason = %why, "refused a cancel");
                ApiFailure::new(ERROR_FORBIDDEN, why)
            })?;
        let note = request
            .requested_by
            .clone()
            .unwrap_or_else(|| "unknown".to_owned());
        Ok((request, Canceller { note, key }))
    }

    /// Cancels a queued request (removes it from the queue and finishes it) or a running one
    /// (asks the builder running it to kill its build), if the sender may
    /// ([`crate::access::Access::may_cancel`]).
    async fn cancel(&self, message: &Message) -> Answer {
        let (request, by) = self.cancel_sender(message)?;
        let id = RequestId::parse(&request.id).map_err(|err| err.to_string())?;
        let reason = request
            .reason
            .clone()
            .unwrap_or_else(|| "no reason given".to_owned());
        let state = request_state(self.js(), &id)
            .await
            .map_err(|err| err.to_string())?
            .ok_or_else(|| {
                format!("no request with id {id} (never sent, or its events expired)")
            })?;
        match state.phase {
            RequestPhase::Queued => {
                let pending = pending_requests(self.js())
                    .await
                    .map_err(|err| err.to_string())?;
                let queued = pending
                    .iter()
                    .find(|p| p.id == id.as_str() && p.waiting)
                    .ok_or_else(|| {
                        format!("request {id} was just taken by a builder; cancel it again")
                    })?;
                let repo = RepoName::parse(&queued.repo).map_err(|err| err.to_string())?;
                // Who asked for it, from the queued message itself: checked before it is removed.
                let owner = self
                    .jobs
                    .requests
                    .get_raw_message(queued.stream_seq)
                    .await
                    .ok()
                    .and_then(|stored| {
                        self.jobs
                            .access
                            .build_request(
                                Some(&stored.headers),
                                &repo,
                                &queued.target,
                                &stored.payload,
                            )
                            .ok()
                            .flatten()
                    });
                self.jobs
                    .access
                    .may_cancel(by.key.as_ref(), owner.as_ref(), id.as_str())
                    .map_err(|why| ApiFailure::new(ERROR_FORBIDDEN, why))?;
                self.jobs
                    .requests
                    .delete_message(queued.stream_seq)
                    .await
                    .map_err(|err| format!("removing request {id} from the queue failed: {err}"))?;
                self.jobs
                    .finish_cancelled_queued(&repo, &queued.target, &id, &by, &reason, owner)
                    .await
                    .map_err(|err| err.to_string())?;
                info!(request_id = %id, cancelled_by = %by, "cancelled a queued request");
                Ok(json(&CancelReply {
                    id: id.to_string(),
                    was: RequestPhase::Queued,
                    message: format!("request {id} removed from the queue; it will not be built"),
                })?)
            }
            RequestPhase::Running => {
                match self.jobs.cancel(id.as_str(), &by, &reason) {
                    CancelOutcome::Cancelling => {
                        return Ok(json(&running_cancelled(&id, &self.jobs.builder_name))?)
                    }
                    CancelOutcome::Refused(why) => {
                        return Err(ApiFailure::new(ERROR_FORBIDDEN, why))
                    }
                    CancelOutcome::NotHere => {}
                }
                // Not started yet (resolving its commit or listing hosts): the builder that
                // took it lists it among its running requests in the registry.
                let builder = match state.builder {
                    Some(builder) => builder,
                    None => list_builders(self.js())
                        .await
                        .map_err(|err| err.to_string())?
                        .into_iter()
                        .find(|builder| {
                            builder.states.iter().any(|state| {
                                matches!(state, BuilderState::Building { id: running, .. } if running == id.as_str())
                            })
                        })
                        .map(|builder| builder.name)
                        .ok_or_else(|| {
                            format!(
                                "request {id} is being started by a builder; cancel it again in a moment"
                            )
                        })?,
                };
                // Passed on as it came, signature headers included: that builder checks them.
                let forwarded = self.client.request_with_headers(
                    builder_cancel_subject(&builder),
                    message.headers.clone().unwrap_or_default(),
                    message.payload.clone(),
                );
                match tokio::time::timeout(Duration::from_secs(5), forwarded).await {
                    Ok(Ok(answer)) => Ok(answer.payload.to_vec()),
                    Ok(Err(err)) => Err(format!(
                        "builder {builder}, which runs request {id}, did not answer: {err}"
                    )
                    .into()),
                    Err(_) => Err(format!(
                        "builder {builder}, which runs request {id}, did not answer within 5s"
                    )
                    .into()),
                }
            }
            finished => Err(format!("request {id} already finished: {}", finished.as_str()).into()),
        }
    }

    fn cancel_here(&self, message: &Message) -> Answer {
        let (request, by) = self.cancel_sender(message)?;
        let reason = request.reason.as_deref().unwrap_or("no reason given");
        match self.jobs.cancel(&request.id, &by, reason) {
            CancelOutcome::Cancelling => {
                info!(request_id = %request.id, cancelled_by = %by, "cancelling a running request");
                let id = RequestId::parse(&request.id).map_err(|err| err.to_string())?;
                Ok(json(&running_cancelled(&id, &self.jobs.builder_name))?)
            }
            CancelOutcome::Refused(why) => Err(ApiFailure::new(ERROR_FORBIDDEN, why)),
            CancelOutcome::NotHere => Err(format!(
                "request {} is not running on builder {}",
                request.id, self.jobs.builder_name
            )
            .into()),
        }
    }

    /// Compares two builds of a host this builder holds. A side it does not hold is left out
    /// of the reply (the asker tries the other builders and says which side is gone).
    async fn diff(&self, payload: &[u8]) -> Answer {
        let query: DiffQuery = parse(payload).map_err(|err| ApiFailure::new(ERROR_INVALID, err))?;
        let repo = RepoName::parse(&query.repo)
            .map_err(|err| ApiFailure::new(ERROR_INVALID, err.to_string()))?;
        if query.host.is_empty() || query.host.len() > MAX_HOST_BYTES {
            return Err(ApiFailure::new(
                ERROR_INVALID,
                format!("a host name is 1 to {MAX_HOST_BYTES} bytes"),
            ));
        }
        for rev in [&query.from, &query.to].into_iter().flatten() {
            if !(7..=40).contains(&rev.len()) || !rev.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ApiFailure::new(
                    ERROR_INVALID,
                    format!("rev {} is not 7 to 40 hex digits", shown(rev)),
                ));
            }
        }
        let history = &self.jobs.history;
        let held = history.held(repo.as_str(), &crate::job::gc_root_name(&query.host));
        let matches = |wanted: &str, build: &closures::HeldBuild| {
            build.rev.starts_with(&wanted.to_ascii_lowercase())
        };
        let to = match &query.to {
            Some(rev) => held.iter().position(|b| matches(rev, b)),
            None => (!held.is_empty()).then_some(0),
        };
        let from = match (&query.from, to) {
            (Some(rev), _) => held.iter().position(|b| matches(rev, b)),
            (None, Some(to)) => held
                .iter()
                .enumerate()
                .skip(to + 1)
                .find(|(_, b)| b.rev != held[to].rev)
                .map(|(index, _)| index),
            (None, None) => None,
        };
        let diff = match (from, to) {
            (Some(from), Some(to)) => Some(
                history
                    .compare(&self.jobs.nix, &held[from], &held[to].out_path)
                    .await,
            ),
            _ => None,
        };
        let wire = |build: &closures::HeldBuild| HeldBuild {
            rev: build.rev.clone(),
            out_path: build.out_path.clone(),
            built_at: build.recorded_at(),
        };
        let mut reply = DiffReply {
            builder: self.jobs.builder_name.clone(),
            held: held.iter().map(wire).collect(),
            from: from.map(|i| wire(&held[i])),
            to: to.map(|i| wire(&held[i])),
            diff,
        };
        // Halve the package list until the reply fits; the counts always stay.
        let max = self.max_reply_bytes();
        loop {
            let payload = json(&reply)?;
            let listed = reply.diff.as_ref().map_or(0, |d| d.packages.len());
            if payload.len() <= max || listed == 0 {
                return Ok(payload);
            }
            if let Some(diff) = reply.diff.as_mut() {
                diff.keep_packages(listed / 2);
            }
        }
    }

    fn drain(&self) -> Reply {
        info!("drain requested over NATS");
        self.stop_tx.send_if_modified(|stop| {
            let changed = *stop == Stop::Running;
            if changed {
                *stop = Stop::Drain;
            }
            changed
        });
        json(&DrainReply {
            builder: self.jobs.builder_name.clone(),
            message: "draining: finishing the running build, taking no new ones, then exiting"
                .to_owned(),
        })
    }
}

/// Encodes a page of builds that fits in `max` bytes: a page too large is cut short, and its
/// `next_cursor` then continues after the last build it holds.
fn fit_page(mut list: BuildList, max: usize) -> Answer {
    loop {
        let payload = serde_json::to_vec(&list)
            .map_err(|err| ApiFailure::from(format!("cannot encode the reply: {err}")))?;
        if payload.len() <= max {
            return Ok(payload);
        }
        if list.builds.len() <= 1 {
            return Err(ApiFailure::new(
                ERROR_TOO_LARGE,
                format!(
                    "build {} alone is {} bytes, over the {max} bytes the NATS server takes in one message; ask build.api.v1.status for it",
                    list.builds.first().map(|b| b.id.as_str()).unwrap_or("?"),
                    payload.len()
                ),
            ));
        }
        // Cut by the share that fits (at least half of the excess), then check again.
        let keep = (list.builds.len() * max / payload.len()).clamp(1, list.builds.len() - 1);
        list.builds.truncate(keep);
        list.next_cursor = list
            .builds
            .last()
            .map(|last| BuildsCursor::after(last).to_string());
    }
}

fn parse_cancel(payload: &[u8]) -> Result<CancelRequest, String> {
    let request: CancelRequest = serde_json::from_slice(payload).map_err(|err| {
        format!("expected {{\"id\": \"…\", \"reason\": \"…\", \"requested_by\": \"…\"}}: {err}")
    })?;
    for text in [&request.reason, &request.requested_by]
        .into_iter()
        .flatten()
    {
        if text.chars().count() > MAX_TEXT_CHARS || text.chars().any(char::is_control) {
            return Err(format!(
                "reason and requested_by must be at most {MAX_TEXT_CHARS} printable characters"
            ));
        }
    }
    Ok(request)
}

fn running_cancelled(id: &RequestId, builder: &str) -> CancelReply {
    CancelReply {
        id: id.to_string(),
        was: RequestPhase::Running,
        message: format!("request {id}: builder {builder} is killing its build"),
    }
}
