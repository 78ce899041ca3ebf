//! The NATS seam: connecting, the JetStream streams and consumers the builder relies on, and
//! publishing events and logs with retries.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, Context};
use homelab_deploy_protocol::request::MAX_REQUEST_BYTES;
use homelab_deploy_protocol::subject::{
    consumer_name, repo_requests_filter, EVENTS_STREAM, EVENTS_STREAM_SUBJECTS, REQUESTS_STREAM,
};
use homelab_deploy_protocol::{Event, RepoName};
use serde::Serialize;
use tracing::warn;

use crate::config::StreamsConfig;

/// Largest event or log batch message.
pub const MAX_EVENT_BYTES: i32 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("stream {stream}: {message}")]
    Stream { stream: String, message: String },
    #[error("consumer {consumer} on stream {REQUESTS_STREAM}: {message}")]
    Consumer { consumer: String, message: String },
    #[error("publishing to {subject} failed after {attempts} attempts: {message}")]
    Publish {
        subject: String,
        attempts: u32,
        message: String,
    },
}

fn stream_error(stream: &str, err: impl std::fmt::Display) -> BusError {
    BusError::Stream {
        stream: stream.to_owned(),
        message: err.to_string(),
    }
}

/// Creates the requests and events streams, or adopts existing ones, and makes sure the requests
/// stream takes `build.<repo>.*` for every repo served here. Requests for a repo that no builder
/// ever served match no stream, so their publisher hears "no stream" at once.
pub async fn ensure_streams(
    js: &Context,
    limits: &StreamsConfig,
    repos: &[RepoName],
) -> Result<(), BusError> {
    let events = stream::Config {
        name: EVENTS_STREAM.to_owned(),
        description: Some("homelab-deploy build events and logs, kept for replay".to_owned()),
        subjects: vec![EVENTS_STREAM_SUBJECTS.to_owned()],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_age: Duration::from_secs(limits.events_max_age_secs),
        max_bytes: limits.events_max_bytes,
        max_message_size: MAX_EVENT_BYTES,
        discard: DiscardPolicy::Old,
        // Event and log publishes carry ids, so a retried publish is stored once.
        duplicate_window: Duration::from_secs(120),
        num_replicas: limits.replicas,
        ..Default::default()
    };
    js.get_or_create_stream(events)
        .await
        .map_err(|err| stream_error(EVENTS_STREAM, err))?;

    let wanted: Vec<String> = repos.iter().map(repo_requests_filter).collect();
    // Builders starting at once may each add their subjects; re-read until ours are all in.
    for _attempt in 0..5 {
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
                let missing: Vec<&String> = wanted
                    .iter()
                    .filter(|s| !config.subjects.contains(s))
                    .collect();
                if missing.is_empty() {
                    return Ok(());
                }
                config.subjects.extend(missing.into_iter().cloned());
                if let Err(err) = js.update_stream(&config).await {
                    warn!(stream = REQUESTS_STREAM, error = %err, "adding repo subjects failed; retrying");
                }
            }
            Err(_) => {
                let config = stream::Config {
                    name: REQUESTS_STREAM.to_owned(),
                    description: Some("homelab-deploy pending build requests".to_owned()),
                    subjects: wanted.clone(),
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
                };
                if let Err(err) = js.create_stream(config).await {
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

/// How a publish went.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    /// The message id was already stored before this publisher's first attempt.
    pub taken_by_another: bool,
}

/// Publishes JSON to JetStream and waits for the stream to store it, retrying while NATS
/// reconnects. An event that could not be stored is an error: the caller must not ack the request.
#[derive(Clone)]
pub struct Publisher {
    js: Context,
}

impl Publisher {
    pub fn new(js: Context) -> Self {
        Self { js }
    }

    pub fn jetstream(&self) -> &Context {
        &self.js
    }

    /// `message_id` makes retries safe: a publish that reached the stream but whose ack was lost
    /// (NATS restarting) is de-duplicated when it is sent again. Returns whether the stream
    /// already held a message with this id at the first attempt: then someone else published it.
    pub async fn publish_json(
        &self,
        subject: &str,
        message_id: &str,
        value: &impl Serialize,
    ) -> Result<Published, BusError> {
        let payload = serde_json::to_vec(value).map_err(|err| BusError::Publish {
            subject: subject.to_owned(),
            attempts: 0,
            message: err.to_string(),
        })?;
        let payload = bytes::Bytes::from(payload);
        let attempts = 6;
        let mut last_error = String::new();
        for attempt in 1..=attempts {
            let message = PublishMessage::build()
                .payload(payload.clone())
                .message_id(message_id);
            match self.js.send_publish(subject.to_owned(), message).await {
                Ok(ack) => match ack.await {
                    Ok(ack) => {
                        return Ok(Published {
                            taken_by_another: ack.duplicate && attempt == 1,
                        })
                    }
                    Err(err) => last_error = err.to_string(),
                },
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
}

/// The last event stored for a request, so a redelivered request continues its numbering and a
/// finished one is not built again.
pub async fn last_event(js: &Context, events_subject: &str) -> Option<Event> {
    let stream = js.get_stream(EVENTS_STREAM).await.ok()?;
    let message = stream
        .get_last_raw_message_by_subject(events_subject)
        .await
        .ok()?;
    serde_json::from_slice(&message.payload).ok()
}

pub use jetstream::Message as RequestMessage;
