//! The control API under `build.api.>`, answered by builders: status, builds and builders for
//! plain NATS clients (the CLI reads the same from JetStream itself), cancel, and drain.

use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, Message};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use homelab_deploy_client::inspect::{list_builders, list_builds, pending_requests, request_state};
use homelab_deploy_client::ClientError;
use homelab_deploy_protocol::api::{
    builder_cancel_subject, builder_diff_subject, builder_drain_subject, builder_wildcard_subject,
    ApiError, BuildList, BuilderList, BuildsCursor, BuildsQuery, CancelReply, CancelRequest,
    DiffQuery, DiffReply, DrainReply, ErrorCode, HeldBuild, RequestPhase, StatusQuery,
    API_QUEUE_GROUP, API_V1_WILDCARD, BUILDERS_SUBJECT, BUILDS_SUBJECT, CANCEL_SUBJECT,
    DEFAULT_BUILDS_LIMIT, MAX_BUILDS_LIMIT, STATUS_SUBJECT,
};
use homelab_deploy_protocol::identity::Purpose;
use homelab_deploy_protocol::subject::shown;
use homelab_deploy_protocol::{RepoName, RequestId};
use serde::Serialize;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::access::{Access, Refused};
use crate::closures;
use crate::closures::History;
use crate::job::{CancelOutcome, Canceller, Jobs, QueuedCancel, Running};
use crate::nix::Nix;
use crate::stop::Stop;

/// Longest host name a diff query may carry (what a request subject's token allows, unescaped).
const MAX_HOST_BYTES: usize = 512;

/// Queries (status, builds, builders, cancel) one builder answers at once. Each reads JetStream
/// and holds what it read until it replies, so this bounds the API's memory: a flood of queries
/// gets [`ErrorCode::Busy`] replies instead of one task each.
pub const MAX_CONCURRENT_QUERIES: usize = 4;

/// Bytes kept free below the server's `max_payload` for a reply's headers.
const REPLY_HEADROOM: usize = 1024;

/// How long a cancel looks for a request that a builder took but has not started (or that is
/// between two builders) before it answers [`ErrorCode::Retry`].
pub const CANCEL_SETTLE: Duration = Duration::from_secs(5);
/// Pause between two looks of a cancel that is settling.
const CANCEL_POLL: Duration = Duration::from_millis(200);
/// How long a cancel waits for the builder it forwards to.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);

/// What an API subject asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Status,
    Builds,
    Builders,
    Cancel,
    /// `build.api.builder.<me>.cancel`
    CancelHere,
    Drain,
    Diff,
    Unknown,
}

impl Verb {
    /// Whether answering reads JetStream or runs nix, so it takes one of the
    /// [`MAX_CONCURRENT_QUERIES`] permits (or is refused as busy). This builder's cancel and drain
    /// touch only its own state, and an unknown verb reads nothing: those are answered at once,
    /// never refused as busy.
    fn takes_a_permit(self) -> bool {
        match self {
            Verb::Status | Verb::Builds | Verb::Builders | Verb::Cancel | Verb::Diff => true,
            Verb::CancelHere | Verb::Drain | Verb::Unknown => false,
        }
    }
}

/// Serves the API until the builder stops (dropping the future ends every query it runs).
pub async fn serve(api: Api) -> Result<(), async_nats::SubscribeError> {
    let (client, me) = (api.client.clone(), api.builder_name.clone());
    // Wildcards, so that a verb this builder does not know is answered, not met with silence.
    let subscriptions = vec![
        client
            .queue_subscribe(API_V1_WILDCARD, API_QUEUE_GROUP.to_owned())
            .await?,
        client.subscribe(builder_wildcard_subject(&me)).await?,
    ];
    let mut requests = futures::stream::select_all(subscriptions);
    let api = Arc::new(api);
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_QUERIES));
    let mut queries = JoinSet::new();
    while let Some(message) = requests.next().await {
        while queries.try_join_next().is_some() {}
        if !api.verb(&message.subject).takes_a_permit() {
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
                        ErrorCode::Busy,
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

/// What the control API of one NATS account reads and acts on.
pub struct Api {
    pub builder_name: String,
    /// The account's connection: queries arrive and replies leave on it.
    pub client: Client,
    /// The account's JetStream: request states, the builds index, the registry.
    pub js: async_nats::jetstream::Context,
    /// The requests running here, for cancels.
    pub running: Arc<Running>,
    /// Who may cancel what (`[access]`).
    pub access: Arc<Access>,
    /// Ends requests cancelled while queued ([`Jobs::cancel_queued`]).
    pub jobs: Arc<Jobs>,
    /// The held builds diffs are made from.
    pub history: Arc<History>,
    pub nix: Nix,
    /// Where a drain request goes.
    pub stop_tx: watch::Sender<Stop>,
}

/// A failed query: its message and its machine-readable [`ApiError::code`].
struct ApiFailure {
    error: String,
    code: ErrorCode,
}

impl ApiFailure {
    fn new(code: ErrorCode, error: String) -> Self {
        Self { error, code }
    }

    /// JetStream (or NATS) could not be read or written.
    fn unavailable(err: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::Unavailable, err.to_string())
    }

    fn invalid(err: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::Invalid, err.to_string())
    }

    fn not_found(id: &RequestId) -> Self {
        Self::new(
            ErrorCode::NotFound,
            format!("no request with id {id} (never sent, or its events expired)"),
        )
    }
}

impl From<Refused> for ApiFailure {
    /// `[access]` refused the sender: [`ErrorCode::Forbidden`] with why.
    fn from(why: Refused) -> Self {
        Self::new(ErrorCode::Forbidden, why.to_string())
    }
}

/// A reply, or a failure with its code.
type Answer = Result<Vec<u8>, ApiFailure>;

fn json(value: &impl Serialize) -> Answer {
    serde_json::to_vec(value).map_err(|err| {
        ApiFailure::new(
            ErrorCode::TooLarge,
            format!("cannot encode the reply: {err}"),
        )
    })
}

fn parse<T: serde::de::DeserializeOwned + Default>(payload: &[u8]) -> Result<T, ApiFailure> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(payload)
        .map_err(|err| ApiFailure::invalid(format!("request body is not valid: {err}")))
}

impl Api {
    fn verb(&self, subject: &str) -> Verb {
        let me = &self.builder_name;
        match subject {
            STATUS_SUBJECT => Verb::Status,
            BUILDS_SUBJECT => Verb::Builds,
            BUILDERS_SUBJECT => Verb::Builders,
            CANCEL_SUBJECT => Verb::Cancel,
            s if s == builder_cancel_subject(me) => Verb::CancelHere,
            s if s == builder_drain_subject(me) => Verb::Drain,
            s if s == builder_diff_subject(me) => Verb::Diff,
            _ => Verb::Unknown,
        }
    }

    /// The largest reply the server takes from this connection.
    fn max_reply_bytes(&self) -> usize {
        self.client
            .server_info()
            .max_payload
            .saturating_sub(REPLY_HEADROOM)
    }

    async fn handle(&self, message: Message) {
        let reply: Answer = match self.verb(&message.subject) {
            Verb::Builds => self.builds(&message.payload).await,
            Verb::Status => self.status(&message.payload).await,
            Verb::Builders => self.builders().await,
            Verb::Cancel => self.cancel(&message).await,
            Verb::CancelHere => self.cancel_here(&message),
            Verb::Drain => self.drain(),
            Verb::Diff => self.diff(&message.payload).await,
            Verb::Unknown => Err(ApiFailure::new(
                ErrorCode::UnknownVerb,
                format!(
                    "no API verb {}: builders answer {STATUS_SUBJECT}, {BUILDS_SUBJECT}, {BUILDERS_SUBJECT}, {CANCEL_SUBJECT}, and build.api.builder.<name>.cancel, .drain, .diff",
                    shown(&message.subject)
                ),
            )),
        };
        self.answer(&message, reply).await;
    }

    /// Sends `reply` (or its error) to the asker; a reply over `max_payload` becomes an
    /// [`ErrorCode::TooLarge`] error, so the asker always hears something.
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
                    ErrorCode::TooLarge,
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
                code: Some(failure.code),
            })
            .unwrap_or_default(),
        };
        if let Err(err) = self.client.publish(reply_to, payload.into()).await {
            warn!(error = %err, subject = %message.subject, "answering an API request failed");
        }
    }

    fn js(&self) -> &async_nats::jetstream::Context {
        &self.js
    }

    async fn status(&self, payload: &[u8]) -> Answer {
        let query: StatusQuery = serde_json::from_slice(payload)
            .map_err(|err| ApiFailure::invalid(format!("expected {{\"id\": \"…\"}}: {err}")))?;
        let id = RequestId::parse(&query.id).map_err(ApiFailure::invalid)?;
        match request_state(self.js(), &id)
            .await
            .map_err(ApiFailure::unavailable)?
        {
            Some(state) => json(&state),
            None => Err(ApiFailure::not_found(&id)),
        }
    }

    async fn builds(&self, payload: &[u8]) -> Answer {
        let query: BuildsQuery = parse(payload)?;
        let limit = query.limit.unwrap_or(DEFAULT_BUILDS_LIMIT);
        if !(1..=MAX_BUILDS_LIMIT).contains(&limit) {
            return Err(ApiFailure::new(
                ErrorCode::Invalid,
                format!(
                    "limit {limit} is out of range: ask for 1 to {MAX_BUILDS_LIMIT} builds and page with next_cursor"
                ),
            ));
        }
        let list = list_builds(self.js(), &query)
            .await
            .map_err(|err| match err {
                ClientError::BadCursor { .. } => ApiFailure::invalid(err),
                _ => ApiFailure::unavailable(err),
            })?;
        fit_page(list, self.max_reply_bytes())
    }

    async fn builders(&self) -> Answer {
        let builders = list_builders(self.js())
            .await
            .map_err(ApiFailure::unavailable)?;
        json(&BuilderList { builders })
    }

    /// Who sent a cancel and what it says; a cancel whose signature fails (or that is unsigned
    /// where signatures are required) is refused with [`ErrorCode::Forbidden`].
    fn cancel_sender(&self, message: &Message) -> Result<(CancelRequest, Canceller), ApiFailure> {
        let request = parse_cancel(&message.payload)?;
        let key = self
            .access
            .sender(message.headers.as_ref(), Purpose::Cancel, &message.payload)
            .map_err(|why| {
                warn!(request_id = %shown(&request.id), reason = %why, "refused a cancel");
                ApiFailure::from(why)
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
    ///
    /// A request a builder took but has not started yet, or one between two builders, is
    /// looked for again for up to [`CANCEL_SETTLE`]: on the builder its state names, else on
    /// every live builder, each of which answers for the requests it holds. Only a request
    /// whose builder answers for none of that time gets [`ErrorCode::Retry`].
    async fn cancel(&self, message: &Message) -> Answer {
        let (request, by) = self.cancel_sender(message)?;
        let id = RequestId::parse(&request.id).map_err(ApiFailure::invalid)?;
        let reason = request
            .reason
            .clone()
            .unwrap_or_else(|| "no reason given".to_owned());
        let settle_until = tokio::time::Instant::now() + CANCEL_SETTLE;
        loop {
            let state = request_state(self.js(), &id)
                .await
                .map_err(ApiFailure::unavailable)?
                .ok_or_else(|| ApiFailure::not_found(&id))?;
            let answered = match state.phase {
                RequestPhase::Queued => self.cancel_queued(&id, &by, &reason).await?,
                RequestPhase::Running => {
                    self.cancel_running(message, &id, &by, &reason, state.builder)
                        .await?
                }
                finished => {
                    return Err(ApiFailure::new(
                        ErrorCode::AlreadyFinished,
                        format!("request {id} already finished: {}", finished.as_str()),
                    ))
                }
            };
            if let Some(reply) = answered {
                return Ok(reply);
            }
            if tokio::time::Instant::now() >= settle_until {
                return Err(ApiFailure::new(
                    ErrorCode::Retry,
                    format!(
                        "request {id} was taken by a builder that has not answered for it in {}s (it may have stopped or lost NATS); the queue hands it out again after its ack wait: cancel it again then",
                        CANCEL_SETTLE.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(CANCEL_POLL).await;
        }
    }

    /// Removes request `id` from the queue and finishes it `cancelled`; `None` when no
    /// queued message of it waits any more (a builder took it meanwhile).
    async fn cancel_queued(
        &self,
        id: &RequestId,
        by: &Canceller,
        reason: &str,
    ) -> Result<Option<Vec<u8>>, ApiFailure> {
        let pending = pending_requests(self.js())
            .await
            .map_err(ApiFailure::unavailable)?;
        let Some(queued) = pending.iter().find(|p| p.id == id.as_str() && p.waiting) else {
            return Ok(None);
        };
        let repo = RepoName::parse(&queued.repo).map_err(ApiFailure::invalid)?;
        match self
            .jobs
            .cancel_queued(queued, &repo, id, by, reason)
            .await
            .map_err(ApiFailure::unavailable)?
        {
            QueuedCancel::Cancelled => {}
            QueuedCancel::Refused(why) => return Err(ApiFailure::from(why)),
            // Most likely taken and acked by a builder in this instant: look again.
            QueuedCancel::Gone => return Ok(None),
        }
        json(&CancelReply {
            id: id.to_string(),
            was: RequestPhase::Queued,
            message: format!("request {id} removed from the queue; it will not be built"),
        })
        .map(Some)
    }

    /// Asks the builder that runs request `id` to cancel it: this one, the one its state names,
    /// or else each live builder in the registry. `None` when none of them holds it (yet).
    async fn cancel_running(
        &self,
        message: &Message,
        id: &RequestId,
        by: &Canceller,
        reason: &str,
        builder: Option<String>,
    ) -> Result<Option<Vec<u8>>, ApiFailure> {
        match self.running.cancel(id.as_str(), by, reason) {
            CancelOutcome::Cancelling => {
                return json(&running_cancelled(id, &self.builder_name)).map(Some)
            }
            CancelOutcome::Refused(why) => return Err(ApiFailure::from(why)),
            CancelOutcome::NotHere => {}
        }
        let me = &self.builder_name;
        let candidates: Vec<String> = match builder {
            Some(builder) if &builder != me => vec![builder],
            Some(_) => Vec::new(),
            // Taken, not started: the registry may not list it for a heartbeat yet, so every
            // live builder is asked.
            None => list_builders(self.js())
                .await
                .map_err(ApiFailure::unavailable)?
                .into_iter()
                .filter(|b| !b.lost && &b.name != me)
                .map(|b| b.name)
                .collect(),
        };
        // Asked all at once, so builders that do not answer cost one FORWARD_TIMEOUT together,
        // not one each; only the builder that runs the request acts on it.
        let headers = message.headers.clone().unwrap_or_default();
        let mut asked: FuturesUnordered<_> = candidates
            .into_iter()
            .map(|builder| {
                // Passed on as it came, signature headers included: that builder checks them.
                let forwarded = self.client.request_with_headers(
                    builder_cancel_subject(&builder),
                    headers.clone(),
                    message.payload.clone(),
                );
                async move {
                    (
                        builder,
                        tokio::time::timeout(FORWARD_TIMEOUT, forwarded).await,
                    )
                }
            })
            .collect();
        while let Some((builder, answered)) = asked.next().await {
            let answer = match answered {
                Ok(Ok(answer)) => answer,
                Ok(Err(err)) => {
                    info!(request_id = %id, builder, error = %err, "forwarding a cancel failed");
                    continue;
                }
                Err(_) => {
                    warn!(request_id = %id, builder, timeout_secs = FORWARD_TIMEOUT.as_secs(), "a builder did not answer a forwarded cancel");
                    continue;
                }
            };
            let not_here = serde_json::from_slice::<ApiError>(&answer.payload)
                .is_ok_and(|error| error.code == Some(ErrorCode::NotFound));
            if !not_here {
                return Ok(Some(answer.payload.to_vec()));
            }
        }
        Ok(None)
    }

    fn cancel_here(&self, message: &Message) -> Answer {
        let (request, by) = self.cancel_sender(message)?;
        let reason = request.reason.as_deref().unwrap_or("no reason given");
        match self.running.cancel(&request.id, &by, reason) {
            CancelOutcome::Cancelling => {
                info!(request_id = %request.id, cancelled_by = %by, "cancelling a running request");
                let id = RequestId::parse(&request.id).map_err(ApiFailure::invalid)?;
                json(&running_cancelled(&id, &self.builder_name))
            }
            CancelOutcome::Refused(why) => Err(ApiFailure::from(why)),
            CancelOutcome::NotHere => Err(ApiFailure::new(
                ErrorCode::NotFound,
                format!(
                    "request {} is not running on builder {}",
                    shown(&request.id),
                    self.builder_name
                ),
            )),
        }
    }

    /// Compares two builds of a host this builder holds. A side it does not hold is left out
    /// of the reply (the asker tries the other builders and says which side is gone).
    async fn diff(&self, payload: &[u8]) -> Answer {
        let query: DiffQuery = parse(payload)?;
        let repo = RepoName::parse(&query.repo).map_err(ApiFailure::invalid)?;
        if query.host.is_empty() || query.host.len() > MAX_HOST_BYTES {
            return Err(ApiFailure::new(
                ErrorCode::Invalid,
                format!("a host name is 1 to {MAX_HOST_BYTES} bytes"),
            ));
        }
        for rev in [&query.from, &query.to].into_iter().flatten() {
            if !(7..=40).contains(&rev.len()) || !rev.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ApiFailure::new(
                    ErrorCode::Invalid,
                    format!("rev {} is not 7 to 40 hex digits", shown(rev)),
                ));
            }
        }
        let history = &self.history;
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
                    .compare(&self.nix, &held[from], &held[to].out_path)
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
            builder: self.builder_name.clone(),
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

    fn drain(&self) -> Answer {
        info!("drain requested over NATS");
        self.stop_tx.send_if_modified(|stop| {
            let changed = *stop == Stop::Running;
            if changed {
                *stop = Stop::Drain;
            }
            changed
        });
        json(&DrainReply {
            builder: self.builder_name.clone(),
            message: "draining: finishing the running build, taking no new ones, then exiting"
                .to_owned(),
        })
    }
}

/// Encodes a page of builds that fits in `max` bytes: a page too large is cut short, and its
/// `next_cursor` then continues after the last build it holds.
fn fit_page(mut list: BuildList, max: usize) -> Answer {
    loop {
        let payload = json(&list)?;
        if payload.len() <= max {
            return Ok(payload);
        }
        if list.builds.len() <= 1 {
            return Err(ApiFailure::new(
                ErrorCode::TooLarge,
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

fn parse_cancel(payload: &[u8]) -> Result<CancelRequest, ApiFailure> {
    let request: CancelRequest = serde_json::from_slice(payload).map_err(|err| {
        ApiFailure::invalid(format!(
            "expected {{\"id\": \"…\", \"reason\": \"…\", \"requested_by\": \"…\"}}: {err}"
        ))
    })?;
    for text in [&request.reason, &request.requested_by]
        .into_iter()
        .flatten()
    {
        if !homelab_deploy_protocol::request::is_valid_note(text) {
            return Err(ApiFailure::invalid(format!(
                "reason and requested_by must be at most {} printable characters",
                homelab_deploy_protocol::request::MAX_NOTE_CHARS
            )));
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
