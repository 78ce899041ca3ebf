//! The replace index and the queue scans: which newer `replace` request supersedes a running
//! one, and which older queued message carries the same request id.

use std::collections::HashMap;
use std::sync::Mutex;

use async_nats::jetstream;
use homelab_deploy_protocol::subject::{parse_request_subject, MSG_ID_HEADER};
use homelab_deploy_protocol::{BuildRequest, Mode, RequestId};

use crate::access::Access;

/// What this builder has read of each request subject: a contiguous range of stream sequences
/// and the newest `replace` request in it. Messages never change, so each is read once, however
/// long the queue and however often running requests check it.
#[derive(Default)]
pub struct ReplaceIndex {
    subjects: Mutex<HashMap<String, Scanned>>,
}

#[derive(Debug, Clone, Default)]
struct Scanned {
    /// Stream sequences `from..=up_to` of the subject have been read (empty while `up_to` is 0).
    from: u64,
    up_to: u64,
    /// Stream sequence and id of the newest `replace` request read.
    newest_replace: Option<(u64, String)>,
}

impl Scanned {
    /// The parts of `wanted` not read yet: all of it at first, then what lies before and after
    /// the range read so far (each possibly empty).
    fn unread(&self, wanted: &std::ops::Range<u64>) -> [std::ops::Range<u64>; 2] {
        if self.up_to == 0 {
            [wanted.clone(), 0..0]
        } else {
            [wanted.start..self.from, self.up_to + 1..wanted.end]
        }
    }

    /// Notes that `wanted`, and the newest message at `newest`, have been read.
    fn mark_read(&mut self, wanted: &std::ops::Range<u64>, newest: u64) {
        self.from = if self.up_to == 0 {
            wanted.start
        } else {
            self.from.min(wanted.start)
        };
        self.up_to = self.up_to.max(newest);
    }

    /// The id of the newest `replace` request read, when it is newer than `stream_seq` (a
    /// running request is only replaced by a later one).
    fn replace_newer_than(&self, stream_seq: u64) -> Option<String> {
        self.newest_replace
            .as_ref()
            .filter(|(seq, _)| *seq > stream_seq)
            .map(|(_, id)| id.clone())
    }

    fn saw(&mut self, sequence: u64, id: Option<String>) {
        if let Some(id) = id {
            if self
                .newest_replace
                .as_ref()
                .is_none_or(|(seq, _)| *seq < sequence)
            {
                self.newest_replace = Some((sequence, id));
            }
        }
    }
}

impl ReplaceIndex {
    /// The id of a `replace` request for `subject` newer than `stream_seq`, if any; only a
    /// request that `access` lets build counts.
    pub(super) async fn newer_replace(
        &self,
        requests: &jetstream::stream::Stream,
        access: &Access,
        subject: &str,
        stream_seq: u64,
    ) -> Option<String> {
        let mut scanned = self
            .subjects
            .lock()
            .map(|subjects| subjects.get(subject).cloned().unwrap_or_default())
            .unwrap_or_default();
        if let Ok(newest) = requests.get_last_raw_message_by_subject(subject).await {
            scanned.saw(newest.sequence, replace_request_id(&newest, access));
            let wanted = stream_seq + 1..newest.sequence;
            let mut read = true;
            for range in scanned.unread(&wanted) {
                read = read && read_range(requests, access, subject, range, &mut scanned).await;
            }
            if read {
                scanned.mark_read(&wanted, newest.sequence);
            }
        }
        let answer = scanned.replace_newer_than(stream_seq);
        if let Ok(mut subjects) = self.subjects.lock() {
            subjects.insert(subject.to_owned(), scanned);
        }
        answer
    }
}

/// Reads the subject's messages with stream sequences in `range`, noting `replace` requests;
/// false if reading failed (the range then counts as not read).
async fn read_range(
    requests: &jetstream::stream::Stream,
    access: &Access,
    subject: &str,
    range: std::ops::Range<u64>,
    scanned: &mut Scanned,
) -> bool {
    let mut next = range.start;
    while next < range.end {
        match requests
            .raw_message_builder()
            .sequence(next)
            .next_by_subject(subject)
            .send()
            .await
        {
            Ok(message) if message.sequence < range.end => {
                scanned.saw(message.sequence, replace_request_id(&message, access));
                next = message.sequence + 1;
            }
            Ok(_) => return true,
            Err(err) if err.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                return true
            }
            Err(_) => return false,
        }
    }
    true
}

/// The request's id when it is a `replace` request that `access` lets build: an unsigned or
/// badly signed one, refused when its turn comes, cancels nothing.
fn replace_request_id(
    message: &jetstream::message::StreamMessage,
    access: &Access,
) -> Option<String> {
    let body: BuildRequest = serde_json::from_slice(&message.payload).unwrap_or_default();
    if body.mode != Some(Mode::Replace) {
        return None;
    }
    let (repo, target) = parse_request_subject(&message.subject).ok()?;
    access
        .build_request(Some(&message.headers), &repo, &target, &message.payload)
        .ok()?;
    let id = message
        .headers
        .get(MSG_ID_HEADER)
        .map(|value| value.as_str().to_owned())
        .or(body.id);
    Some(id.unwrap_or_else(|| format!("at stream sequence {}", message.sequence)))
}

/// Queued messages an id check reads at most: the default `streams.max_pending_requests`.
const MAX_HOLDER_SCAN: usize = 10_000;

/// The stream sequence of a message older than `stream_seq` still in the requests stream
/// (queued, or running elsewhere) that carries `id`. Older messages still there are few in a
/// first-in first-out queue: the ones running and the ones lower priority classes hold back.
pub(super) async fn older_queued_holder(
    requests: &jetstream::stream::Stream,
    id: &RequestId,
    stream_seq: u64,
) -> Option<u64> {
    let mut next = 1;
    for _ in 0..MAX_HOLDER_SCAN {
        let message = requests
            .raw_message_builder()
            .sequence(next)
            .next_by_subject(">")
            .send()
            .await
            .ok()?;
        if message.sequence >= stream_seq {
            return None;
        }
        let header = message
            .headers
            .get(MSG_ID_HEADER)
            .map(|value| value.as_str().to_owned());
        let carried = header.or_else(|| {
            serde_json::from_slice::<BuildRequest>(&message.payload)
                .ok()
                .and_then(|body| body.id)
        });
        if carried.as_deref() == Some(id.as_str()) {
            return Some(message.sequence);
        }
        next = message.sequence + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replace_index_reads_each_sequence_once() {
        let mut scanned = Scanned::default();
        // First look, from a request at sequence 10 with the newest message at 20.
        let wanted = 11..20;
        assert_eq!(scanned.unread(&wanted), [11..20, 0..0]);
        scanned.mark_read(&wanted, 20);
        assert_eq!((scanned.from, scanned.up_to), (11, 20));
        // Again, nothing new: nothing to read.
        assert!(scanned.unread(&wanted).iter().all(|range| range.is_empty()));
        // Newer messages up to 30: only 21..30 is read.
        let wanted = 11..30;
        assert_eq!(scanned.unread(&wanted)[1], 21..30);
        assert!(scanned.unread(&wanted)[0].is_empty());
        scanned.mark_read(&wanted, 30);
        assert_eq!((scanned.from, scanned.up_to), (11, 30));
        // An older running request (at 4) reads only what lies before: 5..11.
        let wanted = 5..30;
        let [before, after] = scanned.unread(&wanted);
        assert_eq!(before, 5..11);
        assert!(after.is_empty());
        scanned.mark_read(&wanted, 30);
        assert_eq!((scanned.from, scanned.up_to), (5, 30));
    }

    #[test]
    fn the_newest_replace_wins_whatever_order_it_is_seen_in() {
        let mut scanned = Scanned::default();
        scanned.saw(20, Some("LATER".to_owned()));
        scanned.saw(12, Some("EARLIER".to_owned()));
        scanned.saw(25, None);
        assert_eq!(scanned.newest_replace, Some((20, "LATER".to_owned())));
    }

    #[test]
    fn only_a_later_replace_request_replaces_a_running_one() {
        let mut scanned = Scanned::default();
        assert_eq!(scanned.replace_newer_than(0), None);
        scanned.saw(20, Some("NEWER".to_owned()));
        assert_eq!(scanned.replace_newer_than(10), Some("NEWER".to_owned()));
        // The replace request itself, and anything after it, is not replaced by it.
        assert_eq!(scanned.replace_newer_than(20), None);
        assert_eq!(scanned.replace_newer_than(25), None);
    }

    #[test]
    fn a_later_running_request_reads_on_from_what_was_read_so_the_read_range_stays_whole() {
        let mut scanned = Scanned::default();
        scanned.mark_read(&(11..20), 20);
        // A request at 24: 21..24 lie before it but were never read; reading them too keeps
        // `from..=up_to` one range with no hole.
        let [before, after] = scanned.unread(&(25..30));
        assert!(before.is_empty(), "{before:?}");
        assert_eq!(after, 21..30);
        scanned.mark_read(&(25..30), 30);
        assert_eq!((scanned.from, scanned.up_to), (11, 30));
    }
}
