//! Reading NATS into the [`Model`]: the events stream followed live, the builder registry and the
//! request queue polled.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy, StreamError};
use async_nats::jetstream::context::GetStreamError;
use async_nats::jetstream::stream::ConsumerError;
use async_nats::jetstream::Context;
use futures::StreamExt;
use homelab_deploy_client::inspect::{list_builders, pending_requests};
use homelab_deploy_client::ClientError;
use homelab_deploy_protocol::subject::{request_logs_filter, ALL_EVENTS_FILTER, EVENTS_STREAM};
use homelab_deploy_protocol::{text, Event, LogBatch, RequestId};
use time::OffsetDateTime;
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::model::Model;

/// How often the builder registry and the queue are read.
pub const POLL_EVERY: Duration = Duration::from_secs(2);
/// Wait before following the events stream again after it failed (or does not exist yet).
const RETRY_AFTER: Duration = Duration::from_secs(3);

/// Shared model; `changed` wakes the renderer.
#[derive(Clone)]
pub struct Shared {
    pub model: Arc<Mutex<Model>>,
    pub changed: Arc<Notify>,
}

impl Shared {
    /// Runs `f` on the model. A panic while holding the lock cannot leave a half-applied
    /// event worse than a stale one, so a poisoned lock is used as it is.
    pub fn with<T>(&self, f: impl FnOnce(&mut Model) -> T) -> T {
        let mut model = self
            .model
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut model)
    }
}

/// Why the dashboard cannot read the events stream. The text is shown on the page
/// (`Model::nats_error`) and logged, so it names the stream and filter and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("cannot open stream {EVENTS_STREAM}: {source} (has a builder started on this NATS server, or `homelab-deploy builder provision` run? Either creates it)")]
    NoStream { source: GetStreamError },
    #[error("cannot follow {filter} on stream {EVENTS_STREAM}: {source} (the stream serves at most streams.events_max_consumers readers at once: close other pages and followers; or this NATS user may not read it, see docs/security.md)")]
    Consumer {
        filter: String,
        source: ConsumerError,
    },
    #[error("cannot follow {filter} on stream {EVENTS_STREAM}: {source} (is the NATS server still reachable?)")]
    Messages { filter: String, source: StreamError },
    #[error("lost {filter} on stream {EVENTS_STREAM} while reading it: {source} (following it again in a few seconds)")]
    Read {
        filter: String,
        source: pull::OrderedError,
    },
    #[error("cannot read the stored log of request {id}: {source}")]
    StoredLog { id: RequestId, source: ClientError },
}

/// Follows every request's events from the start of the stream, for ever.
pub async fn follow_events(js: Context, shared: Shared) {
    loop {
        match follow_once(&js, &shared).await {
            Ok(()) => debug!("the events subscription ended; following again"),
            Err(err) => {
                warn!(error = %err, "cannot follow the events stream; trying again");
                shared.with(|m| m.nats_error = Some(err.to_string()));
                shared.changed.notify_one();
            }
        }
        tokio::time::sleep(RETRY_AFTER).await;
    }
}

/// The messages of [`EVENTS_STREAM`] under `filter` from `deliver_policy` on, then live, through
/// an ordered consumer.
async fn follow(
    js: &Context,
    filter: &str,
    deliver_policy: DeliverPolicy,
) -> Result<pull::Ordered, FeedError> {
    let stream = js
        .get_stream(EVENTS_STREAM)
        .await
        .map_err(|source| FeedError::NoStream { source })?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter.to_owned(),
            deliver_policy,
            max_expires: Duration::from_secs(5),
            ..Default::default()
        })
        .await
        .map_err(|source| FeedError::Consumer {
            filter: filter.to_owned(),
            source,
        })?;
    consumer
        .messages()
        .await
        .map_err(|source| FeedError::Messages {
            filter: filter.to_owned(),
            source,
        })
}

async fn follow_once(js: &Context, shared: &Shared) -> Result<(), FeedError> {
    let mut messages = follow(js, ALL_EVENTS_FILTER, DeliverPolicy::All).await?;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|source| FeedError::Read {
            filter: ALL_EVENTS_FILTER.to_owned(),
            source,
        })?;
        match serde_json::from_slice::<Event>(&message.payload) {
            Ok(event) => shared.with(|m| m.apply(&event)),
            Err(err) => {
                debug!(subject = %message.subject, error = %err, "skipping an event that is not valid JSON")
            }
        }
        shared.changed.notify_one();
    }
    Ok(())
}

/// Reads the builder registry and the queue every [`POLL_EVERY`], for ever.
pub async fn poll(js: Context, shared: Shared) {
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let builders = list_builders(&js).await;
        let pending = pending_requests(&js).await;
        let now = OffsetDateTime::now_utc();
        shared.with(|m| {
            m.polled_at = Some(now);
            m.nats_error = None;
            match builders {
                Ok(builders) => m.set_builders(builders, now),
                Err(err) => m.nats_error = Some(err.to_string()),
            }
            match pending {
                Ok(pending) => m.set_queue(pending, now),
                Err(err) => m.nats_error = Some(err.to_string()),
            }
        });
        shared.changed.notify_one();
    }
}

/// The stored log of request `id`: its last `max_lines` lines (each cut to `max_chars`
/// characters), whether earlier lines were left out, and the stream sequence of the last batch
/// read (0 when none), from which [`follow_log`] goes on.
///
/// # Errors
/// [`FeedError::StoredLog`] when the events stream cannot be read.
pub async fn stored_log(
    js: &Context,
    id: &RequestId,
    max_lines: usize,
    max_chars: usize,
) -> Result<(Vec<LogLine>, bool, u64), FeedError> {
    let mut lines = std::collections::VecDeque::new();
    let mut cut = false;
    let mut last_seq = 0;
    homelab_deploy_client::inspect::for_each_message(
        js,
        EVENTS_STREAM,
        &request_logs_filter(id),
        |message| {
            if let Ok(info) = message.info() {
                last_seq = info.stream_sequence;
            }
            if let Ok(batch) = serde_json::from_slice::<LogBatch>(&message.payload) {
                for line in log_lines(&batch, max_chars) {
                    lines.push_back(line);
                    if lines.len() > max_lines {
                        lines.pop_front();
                        cut = true;
                    }
                }
            }
        },
    )
    .await
    .map_err(|source| FeedError::StoredLog {
        id: id.clone(),
        source,
    })?;
    Ok((lines.into(), cut, last_seq))
}

/// One log line as the page shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LogLine {
    pub host: String,
    pub text: String,
}

/// The lines of one batch, each cut to `max_chars` characters.
pub fn log_lines(batch: &LogBatch, max_chars: usize) -> Vec<LogLine> {
    batch
        .lines
        .iter()
        .map(|line| LogLine {
            host: batch.host.clone(),
            text: text::head_chars_marked(line, max_chars),
        })
        .collect()
}

/// The log batches of request `id` stored after stream sequence `after`, then live; each with
/// its stream sequence.
///
/// # Errors
/// [`FeedError::NoStream`], [`FeedError::Consumer`] or [`FeedError::Messages`] when the events
/// stream cannot be followed.
pub async fn follow_log(
    js: &Context,
    id: &RequestId,
    after: u64,
) -> Result<impl futures::Stream<Item = (u64, LogBatch)>, FeedError> {
    let deliver_policy = if after == 0 {
        DeliverPolicy::All
    } else {
        DeliverPolicy::ByStartSequence {
            start_sequence: after + 1,
        }
    };
    let messages = follow(js, &request_logs_filter(id), deliver_policy).await?;
    Ok(messages.filter_map(|message| async move {
        let message = message.ok()?;
        let seq = message.info().ok()?.stream_sequence;
        let batch = serde_json::from_slice::<LogBatch>(&message.payload).ok()?;
        Some((seq, batch))
    }))
}
