//! The NATS seam: connecting, the JetStream streams and consumers the builder relies on, and
//! publishing events and logs with retries.

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
use homelab_deploy_protocol::{Event, RepoName};
use serde::Serialize;
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

    /// `message_id` makes retries safe: a publish that reached the stream but whose ack was lost
    /// (NATS restarting) is de-duplicated when it is sent again. Returns the stream sequence
    /// the message is stored under.
    pub async fn publish_json(
        &self,
        subject: &str,
        message_id: &str,
        value: &impl Serialize,
    ) -> Result<u64, BusError> {
        let payload = serde_json::to_vec(value).map_err(|err| BusError::Publish {
            subject: subject.to_owned(),
            attempts: 0,
            message: err.to_string(),
        })?;
        self.publish(subject, message_id, payload.into(), None)
            .await
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
        self.publish(subject, message_id, payload, Some(expected_last))
            .await
    }

    async fn publish(
        &self,
        subject: &str,
        message_id: &str,
        payload: bytes::Bytes,
        expected_last: Option<u64>,
    ) -> Result<u64, BusError> {
        use jetstream::context::PublishErrorKind;
        let attempts = 6;
        let mut last_error = String::new();
        let began = std::time::Instant::now();
        for attempt in 1..=attempts {
            let mut message = PublishMessage::build()
                .payload(payload.clone())
                .message_id(message_id);
            if let Some(expected) = expected_last {
                message = message.expected_last_subject_sequence(expected);
            }
            let sent = match self.js.send_publish(subject.to_owned(), message).await {
                Ok(ack) => ack.await,
                Err(err) => Err(err),
            };
            match sent {
                Ok(ack) => return Ok(ack.sequence),
                Err(err) if err.kind() == PublishErrorKind::WrongLastSequence => {
                    return match self.stored_last(subject, message_id).await {
                        Ok(Some(sequence)) => Ok(sequence),
                        Ok(None) => Err(BusError::Fenced {
                            subject: subject.to_owned(),
                        }),
                        Err(err) => Err(BusError::Publish {
                            subject: subject.to_owned(),
                            attempts: attempt,
                            message: err,
                        }),
                    };
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

    /// The stream sequence of the last message on `subject` when it carries `message_id`
    /// (this publisher's earlier copy), `None` when it is someone else's.
    async fn stored_last(&self, subject: &str, message_id: &str) -> Result<Option<u64>, String> {
        let stream = self
            .js
            .get_stream(EVENTS_STREAM)
            .await
            .map_err(|err| err.to_string())?;
        let last = stream
            .get_last_raw_message_by_subject(subject)
            .await
            .map_err(|err| err.to_string())?;
        let ours = last
            .headers
            .get(MSG_ID_HEADER)
            .is_some_and(|id| id.as_str() == message_id);
        Ok(ours.then_some(last.sequence))
    }
}

/// The last message stored on an events subject: its stream sequence (what the next fenced
/// publish expects) and the event, if it parses.
pub async fn last_event(
    js: &Context,
    events_subject: &str,
) -> Result<Option<(u64, Option<Event>)>, BusError> {
    let stream = js
        .get_stream(EVENTS_STREAM)
        .await
        .map_err(|err| stream_error(EVENTS_STREAM, err))?;
    match stream.get_last_raw_message_by_subject(events_subject).await {
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
