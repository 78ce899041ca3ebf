//! Submitting a build request and following its events.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, Context};
use async_nats::Client;
use futures::StreamExt;
use homelab_deploy_protocol::identity::Purpose;
use homelab_deploy_protocol::subject::{
    events_subject, request_events_filter, request_logs_filter, request_subject, EVENTS_STREAM,
};
use homelab_deploy_protocol::{
    BuildRequest, Event, LogBatch, Mode, Priority, RepoName, RequestId, Target,
};

use crate::{ClientError, Signer};

/// Optional parts of a request.
#[derive(Debug, Clone, Default)]
pub struct SubmitOptions {
    pub requested_by: Option<String>,
    pub git_ref: Option<String>,
    pub rev: Option<String>,
    pub mode: Mode,
    /// Per-host time limit instead of the builder's default.
    pub host_timeout_secs: Option<u64>,
    /// Time limit of the whole request instead of the builder's default.
    pub timeout_secs: Option<u64>,
    pub priority: Priority,
    /// Signs the request, so builders know who sent it; `None` sends it unsigned.
    pub signer: Option<Signer>,
}

/// A request that is safely in the queue, and the stream of its events.
pub struct Submission {
    pub id: RequestId,
    pub subject: String,
    pub events: EventStream,
}

/// Puts a build request in the queue.
///
/// The event stream is opened before the request is published, so no event can be missed; it
/// replays from the events stream, so a slow reader misses nothing either.
///
/// # Errors
/// [`ClientError::NoBuilder`] at once when no builder serves `repo`; [`ClientError::Refused`] when
/// the queue is full; [`ClientError::NoEventsStream`] when no builder ever ran on this server.
pub async fn submit(
    client: &Client,
    repo: &RepoName,
    target: &Target,
    options: SubmitOptions,
) -> Result<Submission, ClientError> {
    let js = jetstream::new(client.clone());
    let id = RequestId::generated(nuid::next().to_string()).map_err(|err| ClientError::Nats {
        action: "generating a request id",
        message: err.to_string(),
    })?;
    let events = EventStream::open(&js, repo, target, &id, 1).await?;
    let body = BuildRequest {
        id: Some(id.to_string()),
        requested_by: options.requested_by,
        git_ref: options.git_ref,
        rev: options.rev,
        mode: Some(options.mode),
        host_timeout_secs: options.host_timeout_secs,
        timeout_secs: options.timeout_secs,
        priority: Some(options.priority),
    };
    let payload = serde_json::to_vec(&body).map_err(|err| ClientError::Nats {
        action: "encoding the request",
        message: err.to_string(),
    })?;
    let subject = request_subject(repo, target);
    let mut publish = PublishMessage::build();
    if let Some(signer) = &options.signer {
        publish = publish.headers(
            signer
                .headers(Purpose::Build { repo, target }, &payload)
                .await?,
        );
    }
    let publish = publish.payload(payload.into()).message_id(id.as_str());
    let began = std::time::Instant::now();
    let publish_error = |kind: PublishErrorKind, message: String| match kind {
        PublishErrorKind::StreamNotFound => ClientError::NoBuilder { repo: repo.clone() },
        // The server refuses a publish only asynchronously; the ack then times out.
        PublishErrorKind::TimedOut if crate::denials::publish_refused_since(&subject, began) => {
            ClientError::PublishDenied {
                subject: subject.clone(),
            }
        }
        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => ClientError::Nats {
            action: "publishing the request",
            message,
        },
        _ if message.contains("maximum messages") || message.contains("maximum bytes") => {
            ClientError::QueueFull {
                subject: subject.clone(),
                message,
            }
        }
        _ => ClientError::Refused { message },
    };
    let ack = js
        .send_publish(subject.clone(), publish)
        .await
        .map_err(|err| publish_error(err.kind(), err.to_string()))?;
    ack.await
        .map_err(|err| publish_error(err.kind(), err.to_string()))?;
    Ok(Submission {
        id,
        subject,
        events,
    })
}

/// The events of one request, in `seq` order, replayed from the events stream and then live.
pub struct EventStream {
    id: String,
    messages: jetstream::consumer::pull::Ordered,
    next_seq: u64,
}

impl EventStream {
    /// Follows the events of request `id` from `from_seq` on.
    pub async fn open(
        js: &Context,
        repo: &RepoName,
        target: &Target,
        id: &RequestId,
        from_seq: u64,
    ) -> Result<Self, ClientError> {
        let messages = follow(js, events_subject(repo, target, id)).await?;
        Ok(Self {
            id: id.to_string(),
            messages,
            next_seq: from_seq,
        })
    }

    /// Follows the events of request `id`, whatever its repo and target, from `from_seq` on.
    pub async fn open_by_id(
        js: &Context,
        id: &RequestId,
        from_seq: u64,
    ) -> Result<Self, ClientError> {
        let messages = follow(js, request_events_filter(id)).await?;
        Ok(Self {
            id: id.to_string(),
            messages,
            next_seq: from_seq,
        })
    }

    /// The next event not seen before; `None` when the subscription ended.
    pub async fn next(&mut self) -> Option<Result<Event, ClientError>> {
        loop {
            let message = match self.messages.next().await? {
                Ok(message) => message,
                Err(err) => {
                    return Some(Err(ClientError::Nats {
                        action: "reading events",
                        message: err.to_string(),
                    }))
                }
            };
            let event: Event = match serde_json::from_slice(&message.payload) {
                Ok(event) => event,
                Err(err) => {
                    return Some(Err(ClientError::BadEvent {
                        id: self.id.clone(),
                        seq: "?".to_owned(),
                        message: err.to_string(),
                    }))
                }
            };
            if event.seq < self.next_seq {
                continue;
            }
            self.next_seq = event.seq + 1;
            return Some(Ok(event));
        }
    }
}

/// An ordered consumer on the events stream: replays what is stored under `filter`, then follows.
async fn follow(
    js: &Context,
    filter: String,
) -> Result<jetstream::consumer::pull::Ordered, ClientError> {
    let error = |err: &dyn std::fmt::Display| ClientError::Nats {
        action: "subscribing to the events stream",
        message: err.to_string(),
    };
    let stream = js
        .get_stream(EVENTS_STREAM)
        .await
        .map_err(|_| ClientError::NoEventsStream)?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy: DeliverPolicy::All,
            max_expires: Duration::from_secs(5),
            ..Default::default()
        })
        .await
        .map_err(|err| error(&err))?;
    consumer.messages().await.map_err(|err| error(&err))
}

/// The log batches of one request, replayed from the events stream and then live.
pub struct LogStream {
    messages: jetstream::consumer::pull::Ordered,
}

impl LogStream {
    pub async fn open_by_id(js: &Context, id: &RequestId) -> Result<Self, ClientError> {
        Ok(Self {
            messages: follow(js, request_logs_filter(id)).await?,
        })
    }

    /// The next batch, and how many more are stored right now (0: caught up with the stream).
    pub async fn next(&mut self) -> Option<Result<(LogBatch, u64), ClientError>> {
        loop {
            let message = match self.messages.next().await? {
                Ok(message) => message,
                Err(err) => {
                    return Some(Err(ClientError::Nats {
                        action: "reading logs",
                        message: err.to_string(),
                    }))
                }
            };
            let pending = message.info().map(|info| info.pending).unwrap_or(0);
            if let Ok(batch) = serde_json::from_slice::<LogBatch>(&message.payload) {
                return Some(Ok((batch, pending)));
            }
        }
    }
}
