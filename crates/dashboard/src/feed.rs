//! Reading NATS into the [`Model`]: the events stream followed live, the builder registry and the
//! request queue polled.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::Context;
use futures::StreamExt;
use homelab_deploy_client::inspect::{list_builders, pending_requests};
use homelab_deploy_protocol::subject::EVENTS_STREAM;
use homelab_deploy_protocol::{text, Event, LogBatch};
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

/// Follows every request's events from the start of the stream, for ever.
pub async fn follow_events(js: Context, shared: Shared) {
    loop {
        match follow_once(&js, &shared).await {
            Ok(()) => debug!("the events subscription ended; following again"),
            Err(message) => {
                warn!(error = %message, "cannot follow the events stream; trying again");
                shared.with(|m| m.nats_error = Some(message));
                shared.changed.notify_one();
            }
        }
        tokio::time::sleep(RETRY_AFTER).await;
    }
}

async fn follow_once(js: &Context, shared: &Shared) -> Result<(), String> {
    let stream = js
        .get_stream(EVENTS_STREAM)
        .await
        .map_err(|err| format!("stream {EVENTS_STREAM}: {err} (has a builder started yet?)"))?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: "build.responses.*.*.*.events".to_owned(),
            deliver_policy: DeliverPolicy::All,
            max_expires: Duration::from_secs(5),
            ..Default::default()
        })
        .await
        .map_err(|err| format!("following {EVENTS_STREAM}: {err}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|err| format!("following {EVENTS_STREAM}: {err}"))?;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|err| format!("reading {EVENTS_STREAM}: {err}"))?;
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
pub async fn stored_log(
    js: &Context,
    id: &str,
    max_lines: usize,
    max_chars: usize,
) -> Result<(Vec<LogLine>, bool, u64), String> {
    let mut lines = std::collections::VecDeque::new();
    let mut cut = false;
    let mut last_seq = 0;
    homelab_deploy_client::inspect::for_each_message(
        js,
        EVENTS_STREAM,
        &format!("build.responses.*.*.{id}.logs"),
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
    .map_err(|err| err.to_string())?;
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
pub async fn follow_log(
    js: &Context,
    id: &str,
    after: u64,
) -> Result<impl futures::Stream<Item = (u64, LogBatch)>, String> {
    let stream = js
        .get_stream(EVENTS_STREAM)
        .await
        .map_err(|err| format!("stream {EVENTS_STREAM}: {err}"))?;
    let deliver_policy = if after == 0 {
        DeliverPolicy::All
    } else {
        DeliverPolicy::ByStartSequence {
            start_sequence: after + 1,
        }
    };
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: format!("build.responses.*.*.{id}.logs"),
            deliver_policy,
            max_expires: Duration::from_secs(5),
            ..Default::default()
        })
        .await
        .map_err(|err| format!("following the log of {id}: {err}"))?;
    let messages = consumer
        .messages()
        .await
        .map_err(|err| format!("following the log of {id}: {err}"))?;
    Ok(messages.filter_map(|message| async move {
        let message = message.ok()?;
        let seq = message.info().ok()?.stream_sequence;
        let batch = serde_json::from_slice::<LogBatch>(&message.payload).ok()?;
        Some((seq, batch))
    }))
}
