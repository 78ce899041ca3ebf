//! The NATS seam: connecting, the JetStream streams and consumers the builder relies on, and
//! publishing events and logs with retries.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, Context};
use homelab_deploy_client::denials::publish_refused_since;
use homelab_deploy_protocol::request::MAX_REQUEST_BYTES;
use homelab_deploy_protocol::subject::{
    consumer_name, repo_requests_filter, EVENTS_STREAM, EVENTS_STREAM_SUBJECTS, MSG_ID_HEADER,
    REQUESTS_STREAM,
};
use homelab_deploy_protocol::RepoName;
use tracing::warn;

use crate::config::StreamsConfig;

/// Largest event or log batch message the events stream takes (its `max_message_size`).
pub const MAX_EVENT_BYTES: i32 = 1024 * 1024;
/// Room kept below a message size limit for the headers (message id, expected subject
/// sequence) and the protocol line around the JSON body.
const HEADER_ALLOWANCE: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("stream {stream}: {message}")]
    Stream { stream: String, message: String },
    /// The server refused this builder creating or changing a stream or bucket it needs: on a
    /// server where builders may not, an admin provisions them. `tenant`: the tenant whose
    /// account lacks it (set by [`BusError::in_tenant`]), `None` for the single account.
    #[error("{what}{}, and this builder's NATS user may not create or change it: provision the streams and buckets first with an admin credential{}, `homelab-deploy builder provision --config FILE{} --nkey-file ADMIN_SEED` (docs/operations.md, \"Provisioning the streams\")",
        tenant.as_ref().map(|t| format!(" in tenant {t}'s account")).unwrap_or_default(),
        tenant.as_ref().map(|_| " of that account").unwrap_or_default(),
        tenant.as_ref().map(|t| format!(" --tenant {t}")).unwrap_or_default())]
    NotProvisioned {
        what: String,
        tenant: Option<String>,
    },
    #[error("consumer {consumer} on stream {REQUESTS_STREAM}: {message}")]
    Consumer { consumer: String, message: String },
    #[error("publishing to {subject} failed after {attempts} attempts: {message}")]
    Publish {
        subject: String,
        attempts: u32,
        message: String,
    },
    /// The server refused the message for a reason that retrying cannot fix (too large).
    #[error("the server refused the message for {subject}: {message}")]
    Refused { subject: String, message: String },
    /// Another writer stored a message on the subject since this publisher's last one: the
    /// request was taken over (redelivered to another builder, or cancelled while queued).
    #[error("another writer published to {subject} since this builder's last event")]
    Fenced { subject: String },
}

impl BusError {
    /// This error as met in `tenant`'s account: a [`BusError::NotProvisioned`] then names the
    /// tenant and `builder provision --tenant`; other errors are returned as they are.
    pub fn in_tenant(self, tenant: Option<&str>) -> Self {
        match self {
            BusError::NotProvisioned { what, tenant: None } => BusError::NotProvisioned {
                what,
                tenant: tenant.map(str::to_owned),
            },
            other => other,
        }
    }
}

fn stream_error(stream: &str, err: impl std::fmt::Display) -> BusError {
    BusError::Stream {
        stream: stream.to_owned(),
        message: err.to_string(),
    }
}

/// The events stream as `limits` set it: what a builder creates when it is missing and what
/// `builder provision` creates or updates.
pub fn events_stream_config(limits: &StreamsConfig) -> stream::Config {
    stream::Config {
        name: EVENTS_STREAM.to_owned(),
        description: Some("homelab-deploy build events and logs, kept for replay".to_owned()),
        subjects: vec![EVENTS_STREAM_SUBJECTS.to_owned()],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_age: Duration::from_secs(limits.events_max_age_secs),
        max_bytes: limits.events_max_bytes,
        max_message_size: MAX_EVENT_BYTES,
        discard: DiscardPolicy::Old,
        // Event and log publishes carry ids, so a retried publish is stored once; events are
        // also fenced by subject sequence, which holds beyond this window.
        duplicate_window: Duration::from_secs(limits.events_duplicate_window_secs),
        // Followers hold ephemeral consumers; a flood of them is refused by the server.
        max_consumers: limits.events_max_consumers,
        num_replicas: limits.replicas,
        ..Default::default()
    }
}

/// The requests stream as `limits` set it, taking `subjects` (`build.<repo>.*` of each repo).
pub fn requests_stream_config(limits: &StreamsConfig, subjects: Vec<String>) -> stream::Config {
    stream::Config {
        name: REQUESTS_STREAM.to_owned(),
        description: Some("homelab-deploy pending build requests".to_owned()),
        subjects,
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        duplicate_window: Duration::from_secs(120),
        max_messages_per_subject: limits.max_pending_requests_per_target,
        discard: DiscardPolicy::New,
        discard_new_per_subject: true,
        // Headers come on top of the body; the builder itself enforces the body limit.
        max_message_size: (MAX_REQUEST_BYTES + 4096) as i32,
        max_messages: limits.max_pending_requests,
        max_bytes: limits.requests_max_bytes,
        num_replicas: limits.replicas,
        ..Default::default()
    }
}

/// Whether the server refused this process creating or updating `stream` since `since`: its
/// NATS user may not (a locked server, where `builder provision` sets the streams up).
pub(crate) fn change_refused(stream: &str, since: Instant) -> bool {
    ["CREATE", "UPDATE"]
        .iter()
        .any(|action| publish_refused_since(&format!("$JS.API.STREAM.{action}.{stream}"), since))
}

/// The error for `what` (a missing stream, a missing subject) when the server refused the
/// change, else `otherwise`.
pub(crate) fn unless_refused(
    stream: &str,
    since: Instant,
    what: String,
    otherwise: BusError,
) -> BusError {
    if change_refused(stream, since) {
        BusError::NotProvisioned { what, tenant: None }
    } else {
        otherwise
    }
}

/// Creates the requests and events streams, or adopts existing ones, and makes sure the requests
/// stream takes `build.<repo>.*` for every repo served here. Requests for a repo that no builder
/// ever served match no stream, so their publisher hears "no stream" at once. On a server where
/// builders may not create or change streams, what is missing is a
/// [`BusError::NotProvisioned`] naming `builder provision`.
pub async fn ensure_streams(
    js: &Context,
    limits: &StreamsConfig,
    repos: &[RepoName],
) -> Result<(), BusError> {
    let began = Instant::now();
    js.get_or_create_stream(events_stream_config(limits))
        .await
        .map_err(|err| {
            unless_refused(
                EVENTS_STREAM,
                began,
                format!("stream {EVENTS_STREAM} is missing"),
                stream_error(EVENTS_STREAM, err),
            )
        })?;

    let wanted: Vec<String> = repos.iter().map(repo_requests_filter).collect();
    // Builders starting at once may each add their subjects; re-read until ours are all in.
    for _attempt in 0..5 {
        let began = Instant::now();
        match js.get_stream(REQUESTS_STREAM).await {
            Ok(mut existing) => {
                let info = existing
                    .info()
                    .await
                    .map_err(|err| stream_error(REQUESTS_STREAM, err))?;
                let mut config = info.config.clone();
                if config.retention != RetentionPolicy::WorkQueue {
                    return Err(stream_error(
                        REQUESTS_STREAM,
                        format!(
                            "exists with retention {:?}, but homelab-deploy needs a work queue; delete it (nats stream rm {REQUESTS_STREAM}) and restart the builder",
                            config.retention
                        ),
                    ));
                }
                let missing: Vec<String> = wanted
                    .iter()
                    .filter(|s| !config.subjects.contains(s))
                    .cloned()
                    .collect();
                if missing.is_empty() {
                    return Ok(());
                }
                config.subjects.extend(missing.iter().cloned());
                if let Err(err) = js.update_stream(&config).await {
                    if change_refused(REQUESTS_STREAM, began) {
                        return Err(BusError::NotProvisioned {
                            what: format!(
                                "stream {REQUESTS_STREAM} does not take {} (a repo added since it was provisioned)",
                                missing.join(", ")
                            ),
                            tenant: None,
                        });
                    }
                    warn!(stream = REQUESTS_STREAM, error = %err, "adding repo subjects failed; retrying");
                }
            }
            Err(_) => {
                if let Err(err) = js
                    .create_stream(requests_stream_config(limits, wanted.clone()))
                    .await
                {
                    if change_refused(REQUESTS_STREAM, began) {
                        return Err(BusError::NotProvisioned {
                            what: format!("stream {REQUESTS_STREAM} is missing"),
                            tenant: None,
                        });
                    }
                    warn!(stream = REQUESTS_STREAM, error = %err, "creating stream failed; retrying");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(stream_error(
        REQUESTS_STREAM,
        "could not add this builder's repo subjects after 5 attempts; check the account's JetStream permissions",
    ))
}

/// The durable pull consumer that all builders of `repo` share. A request neither acked nor kept
/// alive within `ack_wait` is redelivered to another builder.
pub async fn ensure_consumer(
    js: &Context,
    repo: &RepoName,
    ack_wait: Duration,
) -> Result<PullConsumer, BusError> {
    let name = consumer_name(repo);
    let consumer_error = |err: &dyn std::fmt::Display| BusError::Consumer {
        consumer: name.clone(),
        message: err.to_string(),
    };
    let stream = js
        .get_stream(REQUESTS_STREAM)
        .await
        .map_err(|err| stream_error(REQUESTS_STREAM, err))?;
    let config = pull::Config {
        durable_name: Some(name.clone()),
        description: Some(format!("builders of repo {repo}")),
        filter_subject: repo_requests_filter(repo),
        ack_policy: AckPolicy::Explicit,
        ack_wait,
        deliver_policy: DeliverPolicy::All,
        max_ack_pending: 1000,
        ..Default::default()
    };
    stream
        .get_or_create_consumer(&name, config)
        .await
        .map_err(|err| consumer_error(&err))
}

/// Publishes JSON to JetStream and waits for the stream to store it, retrying while NATS
/// reconnects. An event that could not be stored is an error: the caller must not ack the request.
#[derive(Clone)]
pub struct Publisher {
    js: Context,
}

/// A publish error that sending the same message again cannot fix: the message is too large.
/// (A permission violation is the other; the server reports it apart from the publish, see
/// [`publish_refused_since`].)
/// "No stream" is not one: a cluster answers so while it elects a new stream leader.
fn refused(err: &jetstream::context::PublishError) -> bool {
    use jetstream::context::PublishErrorKind;
    use std::error::Error as _;
    match err.kind() {
        PublishErrorKind::MaxPayloadExceeded => true,
        PublishErrorKind::Other => err
            .source()
            .and_then(|source| source.downcast_ref::<jetstream::Error>())
            .is_some_and(|err| {
                err.error_code() == jetstream::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
            }),
        _ => false,
    }
}

impl Publisher {
    pub fn new(js: Context) -> Self {
        Self { js }
    }

    pub fn jetstream(&self) -> &Context {
        &self.js
    }

    /// Largest JSON body of an event or log batch, in bytes: the smaller of the server's
    /// `max_payload` (from the INFO of the server this connection is on, so it follows a
    /// reconnect to another server) and the events stream's [`MAX_EVENT_BYTES`], less room for
    /// the headers.
    pub fn max_body_bytes(&self) -> usize {
        let max_payload = self.js.client().max_payload();
        max_payload
            .min(MAX_EVENT_BYTES as usize)
            .saturating_sub(HEADER_ALLOWANCE)
    }

    /// Publishes `payload` only if the last message stored on `subject` is still the one at
    /// stream sequence `expected_last` (0: no message yet), JetStream's
    /// `Nats-Expected-Last-Subject-Sequence`. Returns the new message's stream sequence, the
    /// next `expected_last`.
    ///
    /// [`BusError::Fenced`] when someone else stored a message on the subject meanwhile. A
    /// retry after a lost ack is not mistaken for that: within the stream's duplicate window
    /// the message id answers with the stored copy, and past it the last message on the
    /// subject is read back: if it carries this `message_id` (which names its writer), it is
    /// the one stored before.
    pub async fn publish_fenced(
        &self,
        subject: &str,
        message_id: &str,
        payload: bytes::Bytes,
        expected_last: u64,
    ) -> Result<u64, BusError> {
        self.publish(
            subject,
            message_id,
            payload,
            Condition::Subject(expected_last),
        )
        .await
    }

    /// Publishes a log batch of a request only while `fence`'s events subject still ends with
    /// an event of this run of the request: JetStream checks the events subject's last stream
    /// sequence on the write (`Nats-Expected-Last-Subject-Sequence` with
    /// `Nats-Expected-Last-Subject-Sequence-Subject`), so a builder that lost the request (another
    /// builder or a cancel wrote an event since) cannot add to its logs. A refusal caused by this
    /// run's own newer event is retried with that event's sequence.
    ///
    /// `message_id` makes retries safe: a batch that reached the stream but whose ack was lost
    /// (NATS restarting) is de-duplicated when it is sent again.
    ///
    /// [`BusError::Fenced`] when another writer stored an event on the subject. On a server
    /// that ignores the subject header (nats-server before 2.11) the batch goes out unfenced.
    pub async fn publish_log(
        &self,
        subject: &str,
        message_id: &str,
        payload: bytes::Bytes,
        fence: &LogFence,
    ) -> Result<u64, BusError> {
        self.publish(subject, message_id, payload, Condition::Events(fence))
            .await
    }

    async fn publish(
        &self,
        subject: &str,
        message_id: &str,
        payload: bytes::Bytes,
        condition: Condition<'_>,
    ) -> Result<u64, BusError> {
        use jetstream::context::PublishErrorKind;
        let attempts = 6;
        let mut last_error = String::new();
        let began = std::time::Instant::now();
        for attempt in 1..=attempts {
            let mut message = PublishMessage::build()
                .payload(payload.clone())
                .message_id(message_id);
            let mut expected_event = None;
            match condition {
                Condition::Subject(expected) => {
                    message = message.expected_last_subject_sequence(expected);
                }
                Condition::Events(fence) if !fence.unsupported.load(Ordering::SeqCst) => {
                    let expected = fence.last_event.load(Ordering::SeqCst);
                    expected_event = Some(expected);
                    message = message
                        .expected_last_subject_sequence(expected)
                        .header(EXPECTED_SUBJECT_HEADER, fence.events_subject.as_str());
                }
                Condition::Events(_) => {}
            }
            let sent = match self.js.send_publish(subject.to_owned(), message).await {
                Ok(ack) => ack.await,
                Err(err) => Err(err),
            };
            match sent {
                Ok(ack) => return Ok(ack.sequence),
                Err(err) if err.kind() == PublishErrorKind::WrongLastSequence => {
                    let checked = match (condition, expected_event) {
                        (Condition::Events(fence), Some(expected)) => {
                            self.check_log_fence(fence, expected).await.map(|()| None)
                        }
                        _ => self.stored_last(subject, message_id).await,
                    };
                    match checked {
                        // This run's own newer event, or a server without the subject header:
                        // send the batch again at once.
                        Ok(None) if matches!(condition, Condition::Events(_)) => continue,
                        Ok(Some(sequence)) => return Ok(sequence),
                        Ok(None) => {
                            return Err(BusError::Fenced {
                                subject: subject.to_owned(),
                            })
                        }
                        Err(Some(err)) => {
                            return Err(BusError::Publish {
                                subject: subject.to_owned(),
                                attempts: attempt,
                                message: err,
                            })
                        }
                        Err(None) => {
                            return Err(BusError::Fenced {
                                subject: fence_subject(condition, subject),
                            })
                        }
                    }
                }
                Err(err) if refused(&err) => {
                    return Err(BusError::Refused {
                        subject: subject.to_owned(),
                        message: err.to_string(),
                    })
                }
                Err(err) if publish_refused_since(subject, began) => {
                    return Err(BusError::Refused {
                        subject: subject.to_owned(),
                        message: format!("permission denied ({err}: the server reported a permissions violation for publishing to it); allow this builder's NATS user to publish to {subject}"),
                    })
                }
                Err(err) => last_error = err.to_string(),
            }
            if attempt < attempts {
                let delay = Duration::from_millis(250 << attempt);
                warn!(subject, attempt, error = %last_error, retry_in_ms = delay.as_millis() as u64, "publish failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
        Err(BusError::Publish {
            subject: subject.to_owned(),
            attempts,
            message: last_error,
        })
    }

    /// The last message stored on `subject` of the events stream; `Err(Some(why))` when it
    /// cannot be read.
    async fn last_on(
        &self,
        subject: &str,
    ) -> Result<async_nats::jetstream::message::StreamMessage, Option<String>> {
        let stream = self
            .js
            .get_stream(EVENTS_STREAM)
            .await
            .map_err(|err| Some(err.to_string()))?;
        stream
            .get_last_raw_message_by_subject(subject)
            .await
            .map_err(|err| Some(err.to_string()))
    }

    /// The stream sequence of the last message on `subject` when it carries `message_id`
    /// (this publisher's earlier copy), `None` when it is someone else's.
    async fn stored_last(
        &self,
        subject: &str,
        message_id: &str,
    ) -> Result<Option<u64>, Option<String>> {
        let last = self.last_on(subject).await?;
        let ours = last
            .headers
            .get(MSG_ID_HEADER)
            .is_some_and(|id| id.as_str() == message_id);
        Ok(ours.then_some(last.sequence))
    }

    /// Why a log batch sent expecting event `expected` was refused: `Ok` when it may be sent
    /// again (the events subject ends with a newer event of this run, now expected; or with
    /// `expected` itself, so the server did not apply the subject header and the fence is off),
    /// `Err(None)` when another writer's event ends the subject.
    async fn check_log_fence(&self, fence: &LogFence, expected: u64) -> Result<(), Option<String>> {
        let last = self.last_on(&fence.events_subject).await?;
        let ours = last
            .headers
            .get(MSG_ID_HEADER)
            .is_some_and(|id| fence.wrote(id.as_str()));
        if !ours {
            return Err(None);
        }
        if last.sequence == expected {
            if !fence.unsupported.swap(true, Ordering::SeqCst) {
                warn!(subject = %fence.events_subject, "the server ignores Nats-Expected-Last-Subject-Sequence-Subject (nats-server before 2.11): this request's log batches are not fenced");
            }
        } else {
            fence.stored(last.sequence);
        }
        Ok(())
    }
}

/// `Nats-Expected-Last-Subject-Sequence-Subject` (nats-server 2.11): the subject whose last
/// stream sequence `Nats-Expected-Last-Subject-Sequence` is checked against.
const EXPECTED_SUBJECT_HEADER: &str = "Nats-Expected-Last-Subject-Sequence-Subject";

/// What a publish is stored on condition of.
#[derive(Clone, Copy)]
enum Condition<'a> {
    /// The subject's own last stream sequence.
    Subject(u64),
    /// The last event of a request's events subject ([`LogFence`]).
    Events(&'a LogFence),
}

/// The subject whose writer took over, for [`BusError::Fenced`].
fn fence_subject(condition: Condition<'_>, subject: &str) -> String {
    match condition {
        Condition::Events(fence) => fence.events_subject.clone(),
        _ => subject.to_owned(),
    }
}

/// What fences the log batches of one builder's run of a request: the request's events
/// subject, which holds that run's events as long as the request is its own. Shared by the
/// run's event publisher (which records each event it stores) and its log batchers.
#[derive(Debug)]
pub struct LogFence {
    events_subject: String,
    /// The last part of the message id of every event of this run
    /// (`<id>.event.<seq>.<writer>`).
    writer: String,
    /// Stream sequence of the newest event this run stored (or found when it began).
    last_event: AtomicU64,
    /// The server ignores [`EXPECTED_SUBJECT_HEADER`] (nats-server before 2.11).
    unsupported: AtomicBool,
}

impl LogFence {
    /// `last_event`: the stream sequence of the subject's last event when the run began.
    pub fn new(events_subject: String, writer: String, last_event: u64) -> Self {
        Self {
            events_subject,
            writer,
            last_event: AtomicU64::new(last_event),
            unsupported: AtomicBool::new(false),
        }
    }

    /// This run stored an event at stream sequence `sequence`.
    pub fn stored(&self, sequence: u64) {
        self.last_event.fetch_max(sequence, Ordering::SeqCst);
    }

    /// The last part of this run's message ids.
    pub fn writer(&self) -> &str {
        &self.writer
    }

    /// Whether the event with message id `message_id` is this run's.
    fn wrote(&self, message_id: &str) -> bool {
        message_id
            .rsplit_once('.')
            .is_some_and(|(_, writer)| writer == self.writer)
    }
}

/// The last message stored on `subject` of the events stream (an events or an attempts
/// subject): its stream sequence (what the next fenced publish expects) and its body as `T`, if
/// it parses; `None` when the subject holds no message.
pub async fn last_stored<T: serde::de::DeserializeOwned>(
    js: &Context,
    subject: &str,
) -> Result<Option<(u64, Option<T>)>, BusError> {
    let stream = js
        .get_stream(EVENTS_STREAM)
        .await
        .map_err(|err| stream_error(EVENTS_STREAM, err))?;
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(message) => Ok(Some((
            message.sequence,
            serde_json::from_slice(&message.payload).ok(),
        ))),
        Err(err) if err.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
            Ok(None)
        }
        Err(err) => Err(stream_error(EVENTS_STREAM, err)),
    }
}

pub use jetstream::Message as RequestMessage;
