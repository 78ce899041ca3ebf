//! The read model: each request's [`RequestState`] under its id in the key-value bucket
//! [`STATE_BUCKET`], so `status` and `builds` cost the same whatever the history holds. The
//! events stream stays the source of truth; this bucket is derived from it, written by the
//! builder that publishes each event, and rebuilt from the events when it is missing at start
//! (docs/decisions/read-model.md). The same bucket holds the finished-request index that
//! `builds` reads newest first ([`homelab_deploy_client::index`]); the builder appends to it
//! when a request's state first reaches a final phase, and rebuilds it with the bucket.

use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, kv};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use homelab_deploy_client::index::{self, IndexEntry, IndexHead, INDEXED_PHASES};
use homelab_deploy_client::inspect::{replayed_states, stored_state};
use homelab_deploy_protocol::api::{RequestPhase, RequestState, STATE_BUCKET};
use tracing::{info, warn};

use crate::bus::BusError;
use crate::config::StreamsConfig;

/// Writes to the bucket in flight at once while it is rebuilt.
const REBUILD_WRITES_IN_FLIGHT: usize = 256;
/// Compare-and-set attempts of one write before it gives up (another writer kept winning).
const WRITE_ATTEMPTS: usize = 5;
/// Index entries a rebuild appends between two writes of the list's head hint (a reader or
/// writer probes at most this many slots past the hint).
const HEAD_EVERY: usize = 256;

/// Sorts out one create of a rebuild: an entry that exists already is kept for a
/// compare-and-set write.
fn created<'a>(
    written: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
    state: &'a RequestState,
    existing: &mut Vec<&'a RequestState>,
) -> Result<(), BusError> {
    match written {
        Ok(_) => Ok(()),
        Err(err) if err.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
            existing.push(state);
            Ok(())
        }
        Err(err) => Err(bucket_error(format!(
            "writing the state of request {}: {err}",
            state.id
        ))),
    }
}

/// Bytes kept free below the server's `max_payload` for an entry's headers.
const ENTRY_HEADROOM: usize = 1024;

/// `state` as JSON within `max` bytes. A request with many failed hosts can fold into more
/// than the server takes in one message (each event fits, their sum need not): the hosts'
/// error excerpts go first, then the per-host list; the counts stay, and the events keep
/// every detail (`watch`, `logs`).
fn fitting(state: &RequestState, max: usize) -> Result<Vec<u8>, BusError> {
    let encode = |state: &RequestState| serde_json::to_vec(state).map_err(bucket_error);
    let bytes = encode(state)?;
    if bytes.len() <= max {
        return Ok(bytes);
    }
    let mut state = state.clone();
    for host in &mut state.host_results {
        host.error = None;
    }
    let bytes = encode(&state)?;
    if bytes.len() <= max {
        return Ok(bytes);
    }
    state.host_results.clear();
    let bytes = encode(&state)?;
    if bytes.len() <= max {
        return Ok(bytes);
    }
    Err(bucket_error(format!(
        "the state of request {} is {} bytes even without its host list, over the server's max_payload",
        state.id,
        bytes.len()
    )))
}

/// The request-state bucket.
pub struct StateStore {
    store: kv::Store,
    /// For the server's `max_payload`, which an entry must fit.
    js: jetstream::Context,
}

/// What [`StateStore::record`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Recorded {
    Written,
    /// The bucket already holds this request at this `last_seq` or a later one.
    Stale,
}

fn bucket_error(err: impl std::fmt::Display) -> BusError {
    BusError::Stream {
        stream: format!("KV_{STATE_BUCKET}"),
        message: err.to_string(),
    }
}

/// The request-state bucket as `limits` set it: entries expire with the events they come from
/// (`events_max_age_secs`) and take at most `events_max_bytes` in all (an entry is smaller than
/// the events it folds). What a builder creates when it is missing and `builder provision`
/// creates.
pub fn state_bucket_config(limits: &StreamsConfig) -> kv::Config {
    kv::Config {
        bucket: STATE_BUCKET.to_owned(),
        description: "homelab-deploy request states: id → state, derived from the events"
            .to_owned(),
        history: 1,
        max_age: Duration::from_secs(limits.events_max_age_secs),
        max_bytes: limits.events_max_bytes,
        num_replicas: limits.replicas,
        ..Default::default()
    }
}

impl StateStore {
    /// Opens the bucket, or creates it and rebuilds every request's state from the events
    /// stream when it does not exist (first start, or deleted). Entries expire with the events
    /// they come from (`events_max_age_secs`) and take at most `events_max_bytes` in all: an
    /// entry is smaller than the events it folds.
    ///
    /// # Errors
    /// [`BusError::Stream`] when the bucket can be neither opened nor created. A failed rebuild
    /// is logged, not an error: clients then read the events for what the bucket lacks.
    pub async fn open(js: &jetstream::Context, limits: &StreamsConfig) -> Result<Self, BusError> {
        if let Ok(store) = js.get_key_value(STATE_BUCKET).await {
            let state = Self {
                store,
                js: js.clone(),
            };
            state.index_if_missing(js).await;
            return Ok(state);
        }
        let began = std::time::Instant::now();
        let store = js
            .create_key_value(state_bucket_config(limits))
            .await
            .map_err(|err| {
                crate::bus::unless_refused(
                    &format!("KV_{STATE_BUCKET}"),
                    began,
                    format!("key-value bucket {STATE_BUCKET} is missing"),
                    bucket_error(err),
                )
            })?;
        let state = Self {
            store,
            js: js.clone(),
        };
        match state.rebuild(js).await {
            Ok(count) => info!(
                bucket = STATE_BUCKET,
                requests = count,
                "rebuilt the request-state bucket from the events stream"
            ),
            Err(err) => warn!(
                bucket = STATE_BUCKET,
                error = %err,
                "rebuilding the request-state bucket failed; status falls back to the events"
            ),
        }
        Ok(state)
    }

    /// Folds every stored event and writes each request's state, oldest `updated_at` first
    /// (`builds` reads the bucket back from its end and relies on that order); an entry that
    /// already exists (a live writer, or a bucket not empty) goes through [`StateStore::record`].
    /// Returns how many requests the events stream holds. What a builder does when it finds the
    /// bucket missing at start.
    ///
    /// # Errors
    /// [`BusError::Stream`] when the events cannot be read or the bucket written.
    pub async fn rebuild(&self, js: &jetstream::Context) -> Result<usize, BusError> {
        let mut states: Vec<RequestState> = replayed_states(js)
            .await
            .map_err(bucket_error)?
            .into_values()
            .collect();
        states.sort_by_key(|state| state.updated_at.unwrap_or(state.queued_at));
        let count = states.len();
        let max = self.max_entry_bytes();
        let prefix = self.store.put_prefix.as_ref().unwrap_or(&self.store.prefix);
        // Creates are sent one after another on this connection, so the stream stores them in
        // this order; their acks are awaited REBUILD_WRITES_IN_FLIGHT at a time.
        let mut acks = FuturesUnordered::new();
        let mut existing = Vec::new();
        for state in &states {
            let value = match fitting(state, max) {
                Ok(value) => value,
                Err(err) => {
                    warn!(error = %err, "a request's state was left out of the rebuilt bucket");
                    continue;
                }
            };
            let create = PublishMessage::build()
                .payload(value.into())
                .expected_last_subject_sequence(0);
            let ack = self
                .js
                .send_publish(format!("{prefix}{}", state.id), create)
                .await
                .map_err(bucket_error)?;
            acks.push(async move { (ack.await, state) });
            while acks.len() >= REBUILD_WRITES_IN_FLIGHT {
                if let Some((written, state)) = acks.next().await {
                    created(written, state, &mut existing)?;
                }
            }
        }
        while let Some((written, state)) = acks.next().await {
            created(written, state, &mut existing)?;
        }
        let existing_ids: std::collections::HashSet<&str> =
            existing.iter().map(|state| state.id.as_str()).collect();
        let created: Vec<&RequestState> = states
            .iter()
            .filter(|state| !existing_ids.contains(state.id.as_str()))
            .collect();
        self.index_states(&created).await?;
        for state in existing {
            if let Err(err) = self.record(state).await {
                warn!(error = %err, "a request's state was left out of the rebuilt bucket");
            }
        }
        Ok(count)
    }

    /// A bucket whose finished-request index has no list at all (written by a builder older
    /// than the index, or every list expired): the index is rebuilt from the events. Failures
    /// are logged: `builds` then lists fewer finished requests, `status` is unaffected.
    async fn index_if_missing(&self, js: &jetstream::Context) {
        for phase in INDEXED_PHASES {
            match index::head(&self.store, phase).await {
                Ok(Some(_)) => return,
                Ok(None) => {}
                Err(err) => {
                    warn!(error = %err, "reading the finished-request index failed");
                    return;
                }
            }
        }
        let indexed = async {
            let states: Vec<RequestState> = replayed_states(js)
                .await
                .map_err(bucket_error)?
                .into_values()
                .collect();
            self.index_states(&states.iter().collect::<Vec<_>>())
                .await?;
            Ok::<usize, BusError>(states.len())
        };
        match indexed.await {
            Ok(0) => {}
            Ok(count) => info!(
                bucket = STATE_BUCKET,
                requests = count,
                "rebuilt the finished-request index from the events stream"
            ),
            Err(err) => warn!(
                bucket = STATE_BUCKET,
                error = %err,
                "rebuilding the finished-request index failed; builds lists fewer finished requests"
            ),
        }
    }

    /// Appends each of `states` that is in a final phase to that phase's list, oldest
    /// `queued_at` first, so the lists read back newest first at once.
    async fn index_states(&self, states: &[&RequestState]) -> Result<(), BusError> {
        for phase in INDEXED_PHASES {
            let mut finished: Vec<&RequestState> = states
                .iter()
                .copied()
                .filter(|state| state.phase == phase)
                .collect();
            finished.sort_by(|a, b| a.queued_at.cmp(&b.queued_at).then_with(|| b.id.cmp(&a.id)));
            self.append_index(phase, &finished).await?;
        }
        Ok(())
    }

    /// Appends `states` to `phase`'s list, one slot each, in this order.
    ///
    /// Each goes into the first free slot above the head hint (a KV create: a slot another
    /// writer took is read, and its `queued_at` counted, before the next is tried), with the
    /// latest `queued_at` of every lower slot as its `before`; so every entry bounds the ones
    /// below it, whoever wrote them. The hint follows every [`HEAD_EVERY`] entries and at the end.
    async fn append_index(
        &self,
        phase: RequestPhase,
        states: &[&RequestState],
    ) -> Result<(), BusError> {
        if states.is_empty() {
            return Ok(());
        }
        let head = index::head(&self.store, phase)
            .await
            .map_err(bucket_error)?;
        let (mut slot, mut high) = head.map_or((0, None), |head| (head.slot, head.high));
        for (done, state) in states.iter().enumerate() {
            loop {
                slot += 1;
                let entry = IndexEntry {
                    id: state.id.clone(),
                    repo: state.repo.clone(),
                    queued_at: state.queued_at,
                    before: high,
                };
                let value = serde_json::to_vec(&entry).map_err(bucket_error)?;
                match self
                    .store
                    .create(index::slot_key(phase, slot), value.into())
                    .await
                {
                    Ok(_) => {
                        high = index::latest(high, Some(state.queued_at));
                        break;
                    }
                    Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => {
                        let taken = index::slot(&self.store, phase, slot)
                            .await
                            .map_err(bucket_error)?;
                        if let Some(taken) = taken {
                            high = index::latest(
                                high,
                                index::latest(Some(taken.queued_at), taken.before),
                            );
                        }
                    }
                    Err(err) => {
                        return Err(bucket_error(format!(
                            "writing slot {slot} of the {} index: {err}",
                            phase.as_str()
                        )))
                    }
                }
            }
            if (done + 1) % HEAD_EVERY == 0 || done + 1 == states.len() {
                self.advance_head(phase, IndexHead { slot, high }).await?;
            }
        }
        Ok(())
    }

    /// Moves `phase`'s head hint up to `head` unless it is there already. A hint that other
    /// writers kept moving is left to them: readers and writers probe past it.
    async fn advance_head(&self, phase: RequestPhase, head: IndexHead) -> Result<(), BusError> {
        let key = index::head_key(phase);
        let value: bytes::Bytes = serde_json::to_vec(&head).map_err(bucket_error)?.into();
        for _attempt in 0..WRITE_ATTEMPTS {
            let entry = self.store.entry(key.clone()).await.map_err(bucket_error)?;
            let current = entry
                .filter(|e| e.operation == kv::Operation::Put)
                .map(|e| {
                    (
                        serde_json::from_slice::<IndexHead>(&e.value).ok(),
                        e.revision,
                    )
                });
            // Err(None): another writer moved the hint meanwhile, read it again.
            let written: Result<u64, Option<String>> = match current {
                Some((Some(current), _)) if current.slot >= head.slot => return Ok(()),
                Some((_, revision)) => self
                    .store
                    .update(&key, value.clone(), revision)
                    .await
                    .map_err(|err| {
                        (err.kind() != kv::UpdateErrorKind::WrongLastRevision)
                            .then(|| err.to_string())
                    }),
                None => self.store.create(&key, value.clone()).await.map_err(|err| {
                    (err.kind() != kv::CreateErrorKind::AlreadyExists).then(|| err.to_string())
                }),
            };
            match written {
                Ok(_) | Err(None) => {}
                Err(Some(message)) => {
                    return Err(bucket_error(format!(
                        "writing the head of the {} index: {message}",
                        phase.as_str()
                    )))
                }
            }
            if written.is_ok() {
                return Ok(());
            }
        }
        Ok(())
    }

    fn max_entry_bytes(&self) -> usize {
        self.js
            .client()
            .server_info()
            .max_payload
            .saturating_sub(ENTRY_HEADROOM)
    }

    /// The state the bucket holds for request `id`.
    ///
    /// # Errors
    /// [`BusError::Stream`] when the bucket cannot be read.
    pub async fn get(&self, id: &str) -> Result<Option<RequestState>, BusError> {
        stored_state(&self.store, id).await.map_err(bucket_error)
    }

    /// Writes `state` unless the bucket holds the same request at the same or a later
    /// `last_seq`: a compare-and-set on the entry's revision, so a builder that lost the request
    /// (or a rebuild racing a live writer) never puts an older state over a newer one.
    ///
    /// # Errors
    /// [`BusError::Stream`] when the bucket cannot be written, or other writers kept changing
    /// the entry through every attempt.
    pub async fn record(&self, state: &RequestState) -> Result<Recorded, BusError> {
        let value: bytes::Bytes = fitting(state, self.max_entry_bytes())?.into();
        // Appended once, before the state shows the final phase: a finished state is never
        // missing from the index (at worst an entry points to a state written a moment later).
        let mut indexed = !index::is_indexed(state.phase);
        for _attempt in 0..WRITE_ATTEMPTS {
            let entry = self.store.entry(&state.id).await.map_err(bucket_error)?;
            let entry = entry.filter(|e| e.operation == kv::Operation::Put);
            let held: Option<RequestState> = entry
                .as_ref()
                .and_then(|entry| serde_json::from_slice(&entry.value).ok());
            if held
                .as_ref()
                .is_some_and(|held| held.last_seq >= state.last_seq)
            {
                return Ok(Recorded::Stale);
            }
            if !indexed && held.as_ref().map(|held| held.phase) != Some(state.phase) {
                if let Err(err) = self.append_index(state.phase, &[state]).await {
                    warn!(request_id = %state.id, error = %err, "appending to the finished-request index failed; builds may not list this request");
                }
                indexed = true;
            }
            // Err(None): another writer changed the entry meanwhile, read it again.
            let written: Result<u64, Option<String>> = match entry {
                Some(entry) => self
                    .store
                    .update(&state.id, value.clone(), entry.revision)
                    .await
                    .map_err(|err| {
                        (err.kind() != kv::UpdateErrorKind::WrongLastRevision)
                            .then(|| err.to_string())
                    }),
                None => self
                    .store
                    .create(&state.id, value.clone())
                    .await
                    .map_err(|err| {
                        (err.kind() != kv::CreateErrorKind::AlreadyExists).then(|| err.to_string())
                    }),
            };
            match written {
                Ok(_) => return Ok(Recorded::Written),
                Err(None) => continue,
                Err(Some(message)) => {
                    return Err(bucket_error(format!(
                        "writing the state of request {}: {message}",
                        state.id
                    )))
                }
            }
        }
        Err(bucket_error(format!(
            "the state of request {} kept changing under {WRITE_ATTEMPTS} writes",
            state.id
        )))
    }
}
