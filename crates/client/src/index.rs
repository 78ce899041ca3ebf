//! The finished-request index of the state bucket: per final phase (`succeeded`, `failed`,
//! `cancelled`), a list of the requests that reached it, so that `builds` reads the newest few
//! entries instead of the whole bucket (docs/decisions/read-model.md).
//!
//! The list of phase `P` lives in the state bucket itself, under keys no request id can take
//! (ids have no dots): slot `n` (1, 2, 3 …) at `index.P.n`, and a hint of the last slot at
//! `index.P.head`. A builder appends one entry when a request's state first reaches `P`: it
//! creates the first free slot (a KV create, so two writers never share a slot), and the entry
//! carries `before`, the latest `queued_at` of every entry in a lower slot. Read back from the
//! top, the list is thus certain as soon as `count` entries were queued after the `before` of
//! the lowest slot read: whatever lies further down was queued no later than that. Slots are
//! appended in the order requests finish, which is nearly the order they were queued in, so the
//! first page costs a few dozen direct gets however long the history is.

use async_nats::jetstream::kv;
use futures::StreamExt;
use homelab_deploy_protocol::api::RequestPhase;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ClientError;

/// The phases that have an index: a request reaches each at most once, and stays in it.
pub const INDEXED_PHASES: [RequestPhase; 3] = [
    RequestPhase::Succeeded,
    RequestPhase::Failed,
    RequestPhase::Cancelled,
];

/// Whether `phase` has an index (a request that reaches it is appended to its list).
pub fn is_indexed(phase: RequestPhase) -> bool {
    INDEXED_PHASES.contains(&phase)
}

/// One slot of a phase's list: a request that reached the phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub id: String,
    pub repo: String,
    /// The request's `queued_at`, as its state shows it.
    #[serde(with = "time::serde::rfc3339")]
    pub queued_at: OffsetDateTime,
    /// The latest `queued_at` of every entry in a lower slot; `None` for the first slot.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub before: Option<OffsetDateTime>,
}

/// The hint at `index.P.head`: every slot up to `slot` exists (or expired), and `high` is the
/// latest `queued_at` among them. Written after the slot, so slots above it may exist too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexHead {
    pub slot: u64,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub high: Option<OffsetDateTime>,
}

/// The key of slot `slot` of `phase`'s list.
pub fn slot_key(phase: RequestPhase, slot: u64) -> String {
    format!("index.{}.{slot}", phase.as_str())
}

/// The key of `phase`'s head hint.
pub fn head_key(phase: RequestPhase) -> String {
    format!("index.{}.head", phase.as_str())
}

/// The later of two optional times.
pub fn latest(a: Option<OffsetDateTime>, b: Option<OffsetDateTime>) -> Option<OffsetDateTime> {
    a.max(b)
}

fn read_error(err: &dyn std::fmt::Display) -> ClientError {
    ClientError::Nats {
        action: "reading the finished-request index",
        message: err.to_string(),
    }
}

/// `phase`'s head hint, `None` when the list was never written (or expired).
///
/// # Errors
/// [`ClientError::Nats`] when the bucket cannot be read.
pub async fn head(
    store: &kv::Store,
    phase: RequestPhase,
) -> Result<Option<IndexHead>, ClientError> {
    let bytes = store
        .get(head_key(phase))
        .await
        .map_err(|e| read_error(&e))?;
    Ok(bytes.and_then(|bytes| serde_json::from_slice(&bytes).ok()))
}

/// Slot `slot` of `phase`'s list, `None` when it is free or expired.
///
/// # Errors
/// [`ClientError::Nats`] when the bucket cannot be read.
pub async fn slot(
    store: &kv::Store,
    phase: RequestPhase,
    slot: u64,
) -> Result<Option<IndexEntry>, ClientError> {
    let bytes = store
        .get(slot_key(phase, slot))
        .await
        .map_err(|e| read_error(&e))?;
    Ok(bytes.and_then(|bytes| serde_json::from_slice(&bytes).ok()))
}

/// Slots read at first by [`newest`]; each further round reads twice as many.
const FIRST_WINDOW: u64 = 64;

/// Direct gets in flight at once while a list is read.
const GETS_IN_FLIGHT: usize = 64;

/// The entries of `phase`'s list for which `wanted` holds: at least the `count` of them with
/// the latest `queued_at` (then the smallest id), when the list holds that many; one per
/// request id.
///
/// Reads back from the top slot, `FIRST_WINDOW` slots, then twice as many each round, until
/// `count` wanted entries were queued after the `before` of the lowest slot read (nothing
/// further down can come before them), or a round finds no slot at all (the rest expired). The
/// first page costs one round at any history; a page far back, or a filter few entries match,
/// reads further.
///
/// # Errors
/// [`ClientError::Nats`] when the bucket cannot be read.
pub async fn newest(
    store: &kv::Store,
    phase: RequestPhase,
    count: usize,
    wanted: &impl Fn(&IndexEntry) -> bool,
) -> Result<Vec<IndexEntry>, ClientError> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let mut top = head(store, phase).await?.map_or(0, |head| head.slot);
    // The head is written after its slot: a writer may have stopped in between.
    while slot(store, phase, top + 1).await?.is_some() {
        top += 1;
    }
    let mut found: Vec<IndexEntry> = Vec::new();
    let mut window = FIRST_WINDOW;
    let mut high = top;
    while high >= 1 {
        let low = high.saturating_sub(window - 1).max(1);
        let mut read: Vec<(u64, IndexEntry)> = Vec::new();
        let mut slots = futures::stream::iter(low..=high)
            .map(|n| async move { (n, slot(store, phase, n).await) })
            .buffer_unordered(GETS_IN_FLIGHT);
        while let Some((n, entry)) = slots.next().await {
            if let Some(entry) = entry? {
                read.push((n, entry));
            }
        }
        let Some(lowest) = read.iter().min_by_key(|(n, _)| *n).map(|(_, e)| e.before) else {
            break; // a whole round expired: so did everything below it
        };
        found.extend(read.into_iter().map(|(_, e)| e).filter(|e| wanted(e)));
        found = distinct_newest_first(found);
        let certain = match lowest {
            None => true, // the lowest slot read is the first one
            Some(before) => found.get(count - 1).is_some_and(|e| e.queued_at > before),
        };
        if certain {
            break;
        }
        high = low - 1;
        window = window.saturating_mul(2);
    }
    Ok(found)
}

/// `entries` newest `queued_at` first (then by id), one per id (its latest).
fn distinct_newest_first(mut entries: Vec<IndexEntry>) -> Vec<IndexEntry> {
    entries.sort_by(|a, b| b.queued_at.cmp(&a.queued_at).then_with(|| a.id.cmp(&b.id)));
    let mut seen = std::collections::HashSet::new();
    entries.retain(|e| seen.insert(e.id.clone()));
    entries
}
