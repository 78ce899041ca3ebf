//! Submitting a build request and following its events.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, Context};
use async_nats::Client;
use futures::StreamExt;
use homelab_deploy_protocol::subject::{events_subject, request_subject, EVENTS_STREAM};
use homelab_deploy_protocol::{BuildRequest, Event, RepoName, RequestId, Target};

use crate::ClientError;

/// Optional parts of a request.
#[derive(Debug, Clone, Default)]
pub struct SubmitOptions {
    pub requested_by: Option<String>,
    pub git_ref: Option<String>,
    pub rev: Option<String>,
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
    };
    let payload = serde_json::to_vec(&body).map_err(|err| ClientError::Nats {
        action: "encoding the request",
        message: err.to_string(),
    })?;
    let subject = request_subject(repo, target);
    let publish = PublishMessage::build()
        .payload(payload.into())
        .message_id(id.as_str());
    let publish_error = |kind: PublishErrorKind, message: String| match kind {
        PublishErrorKind::StreamNotFound => ClientError::NoBuilder { repo: repo.clone() },
        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => ClientError::Nats {
            action: "publishing the request",
            message,
        },
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
        let stream = js
            .get_stream(EVENTS_STREAM)
            .await
            .map_err(|_| ClientError::NoEventsStream)?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: events_subject(repo, target, id),
                deliver_policy: DeliverPolicy::All,
                max_expires: Duration::from_secs(5),
                ..Default::default()
            })
            .await
            .map_err(|err| ClientError::Nats {
                action: "subscribing to the request's events",
                message: err.to_string(),
            })?;
        let messages = consumer.messages().await.map_err(|err| ClientError::Nats {
            action: "subscribing to the request's events",
            message: err.to_string(),
        })?;
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
