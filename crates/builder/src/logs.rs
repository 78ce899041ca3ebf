//! Batching build log lines into `LogBatch` messages, so a flood of output becomes a steady
//! stream of bounded messages instead of one message per line.

use std::time::Duration;

use homelab_deploy_protocol::subject::encode_host;
use homelab_deploy_protocol::LogBatch;
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::bus::{BusError, Publisher};

/// A batch is sent when it holds this many lines…
const MAX_BATCH_LINES: usize = 1000;
/// …or this many bytes…
const MAX_BATCH_BYTES: usize = 128 * 1024;
/// …or its first line is this old.
pub const MAX_BATCH_AGE: Duration = Duration::from_millis(250);

/// Collects one host's log lines and publishes them in numbered batches.
pub struct LogBatcher {
    publisher: Publisher,
    repo: String,
    subject: String,
    request_id: String,
    host: String,
    next_line: u64,
    lines: Vec<String>,
    bytes: usize,
    first_at: Option<Instant>,
    /// Bytes published so far, for metrics and tests.
    pub published_bytes: u64,
}

impl LogBatcher {
    pub fn new(
        publisher: Publisher,
        repo: String,
        subject: String,
        request_id: String,
        host: String,
    ) -> Self {
        Self {
            publisher,
            repo,
            subject,
            request_id,
            host,
            next_line: 1,
            lines: Vec::new(),
            bytes: 0,
            first_at: None,
            published_bytes: 0,
        }
    }

    /// Adds a line; publishes the batch when it is full.
    pub async fn push(&mut self, line: String) -> Result<(), BusError> {
        self.bytes += line.len();
        self.lines.push(line);
        self.first_at.get_or_insert_with(Instant::now);
        if self.lines.len() >= MAX_BATCH_LINES || self.bytes >= MAX_BATCH_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    /// When the pending batch must go out even if no more lines come.
    pub fn deadline(&self) -> Option<Instant> {
        self.first_at.map(|first| first + MAX_BATCH_AGE)
    }

    pub async fn flush(&mut self) -> Result<(), BusError> {
        if self.lines.is_empty() {
            return Ok(());
        }
        let lines = std::mem::take(&mut self.lines);
        let count = lines.len() as u64;
        let batch = LogBatch {
            id: self.request_id.clone(),
            host: self.host.clone(),
            first_line: self.next_line,
            lines,
            time: OffsetDateTime::now_utc(),
        };
        // The host's token: a header value holds no newline, and no `.` makes two ids alike.
        let message_id = format!(
            "{}.log.{}.{}",
            self.request_id,
            encode_host(&self.host),
            self.next_line
        );
        self.publisher
            .publish_json(&self.subject, &message_id, &batch)
            .await?;
        // A batch id already stored means this batch was stored before; nothing is lost.
        self.next_line += count;
        self.published_bytes += self.bytes as u64;
        crate::metrics::log_bytes(&self.repo, self.bytes as u64);
        self.bytes = 0;
        self.first_at = None;
        Ok(())
    }
}
