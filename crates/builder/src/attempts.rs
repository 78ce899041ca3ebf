//! Claims on a request: before a builder does any work for a delivery of a request (resolving
//! the commit, listing the hosts, building), it stores a claim naming the attempt, so an attempt
//! that dies before its `started` event (the builder killed while git fetches) still counts
//! towards `builder.max_attempts`. Hand-backs that happen before any work (priority, heavy
//! lanes, a full slot) claim nothing. (docs/decisions/attempts-claimed-before-work.md)
//!
//! The claims of request `<id>` are messages on its `….<id>.attempts` subject in the events
//! stream (so they expire with the events), each stored only if the subject's last message is
//! still the one the builder read (`Nats-Expected-Last-Subject-Sequence`): two deliveries that
//! claim at once get different numbers, and no claim is lost.

use async_nats::jetstream::Context;
use homelab_deploy_protocol::subject::EVENTS_STREAM;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::bus::{BusError, Publisher};

/// Claims a builder tries before giving up on a request that other builders keep claiming at
/// the same instant (a redelivery storm); the request then comes back after the ack wait.
const CLAIM_TRIES: usize = 5;

/// One attempt at a request, as its builder claimed it before doing any work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// 1 for the first attempt, one more for each attempt claimed before (whatever its end).
    pub attempt: u64,
    /// The builder that made the attempt.
    pub builder: String,
    /// JetStream's delivery count of the request message this attempt was for (hand-backs
    /// included), for people reading the claims.
    pub delivered: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
}

fn stream_error(err: impl std::fmt::Display) -> BusError {
    BusError::Stream {
        stream: EVENTS_STREAM.to_owned(),
        message: err.to_string(),
    }
}

/// The newest claim on `subject` with its stream sequence; `None` when there is none. A claim
/// that does not parse counts as missing (its stream sequence is kept for the next claim).
///
/// # Errors
/// [`BusError::Stream`] when the events stream cannot be read.
pub async fn last_claim(
    js: &Context,
    subject: &str,
) -> Result<Option<(u64, Option<Claim>)>, BusError> {
    crate::bus::last_stored(js, subject).await
}

/// Stores the next claim on `subject` (`request_id`'s attempts) for `builder` and returns it.
/// Its number follows the newest claim, and at least `previous` (attempts known from the
/// request's `started` events, should older claims be gone).
///
/// # Errors
/// What [`Publisher::publish_fenced`] returns, and [`BusError::Publish`] when other builders
/// claimed first [`CLAIM_TRIES`] times in a row.
pub async fn claim(
    publisher: &Publisher,
    subject: &str,
    request_id: &str,
    builder: &str,
    (previous, delivered): (u64, u64),
) -> Result<Claim, BusError> {
    let writer = nuid::next().to_string();
    for _ in 0..CLAIM_TRIES {
        let (last_stored, last) = last_claim(publisher.jetstream(), subject)
            .await?
            .unwrap_or((0, None));
        let claim = Claim {
            attempt: last.map_or(0, |claim| claim.attempt).max(previous) + 1,
            builder: builder.to_owned(),
            delivered,
            time: OffsetDateTime::now_utc(),
        };
        let payload = serde_json::to_vec(&claim).map_err(stream_error)?;
        let message_id = format!("{request_id}.attempt.{}.{writer}", claim.attempt);
        match publisher
            .publish_fenced(subject, &message_id, payload.into(), last_stored)
            .await
        {
            Ok(_) => return Ok(claim),
            // Another delivery claimed meanwhile: this one is the attempt after it.
            Err(BusError::Fenced { .. }) => continue,
            Err(err) => return Err(err),
        }
    }
    Err(BusError::Publish {
        subject: subject.to_owned(),
        attempts: CLAIM_TRIES as u32,
        message: "other builders claimed the request first every time".to_owned(),
    })
}
