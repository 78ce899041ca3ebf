//! `builder provision`: creates or updates the streams and buckets a fleet uses, with a
//! credential allowed to (an admin), so that builders need no right to create streams or change
//! their subjects and transforms (docs/security.md). The configurations are the ones a builder
//! creates on an open server ([`crate::bus::events_stream_config`] and its siblings).

use std::collections::BTreeSet;

use async_nats::jetstream::stream::RetentionPolicy;
use async_nats::jetstream::Context;
use homelab_deploy_protocol::api::{BUILDERS_BUCKET, STATE_BUCKET};
use homelab_deploy_protocol::placement::PLACEMENT_BUCKET;
use homelab_deploy_protocol::subject::{repo_requests_filter, EVENTS_STREAM, REQUESTS_STREAM};

use crate::bus::{events_stream_config, requests_stream_config, BusError};
use crate::config::Account;
use crate::placement::placement_bucket_config;
use crate::registry::builders_bucket_config;
use crate::state::state_bucket_config;

/// What provisioning did to one stream or bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    /// Its configuration set to the config's limits (a no-op when they already held); for the
    /// requests stream, the config's repo subjects added to those it had.
    Updated,
    /// A bucket that exists is left as it is.
    Exists,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Created => "created",
            Outcome::Updated => "updated",
            Outcome::Exists => "exists",
        })
    }
}

fn error(stream: &str, err: impl std::fmt::Display) -> BusError {
    BusError::Stream {
        stream: stream.to_owned(),
        message: err.to_string(),
    }
}

/// Creates `BUILD_EVENTS`, `BUILD_REQUESTS` (taking `build.<repo>.*` of every repo of
/// `account`, besides the subjects it has) and the buckets `BUILD_BUILDERS`, `BUILD_STATE` and
/// `BUILD_PLACEMENT`, or updates the streams to the account's limits (the config's `[streams]`,
/// with a tenant's `max_queued`), in the account `js` is connected to: the single account, or
/// one tenant's ([`crate::Config::accounts`]). Returns each name with what was done.
///
/// A state bucket created here starts empty: `status` and `builds` read the events of requests
/// from before (docs/decisions/read-model.md).
///
/// # Errors
/// [`BusError::Stream`] naming the stream or bucket the server refused (the credential lacks
/// `$JS.API.STREAM.CREATE/UPDATE` for it, or a limit the server does not allow), or a requests
/// stream that is not a work queue.
pub async fn provision(
    js: &Context,
    account: &Account,
) -> Result<Vec<(&'static str, Outcome)>, BusError> {
    let limits = &account.streams;
    let mut done = Vec::new();

    let events = events_stream_config(limits);
    let outcome = match js.get_stream(EVENTS_STREAM).await {
        Ok(_) => js.update_stream(&events).await.map(|_| Outcome::Updated),
        Err(_) => js.create_stream(events).await.map(|_| Outcome::Created),
    }
    .map_err(|err| error(EVENTS_STREAM, err))?;
    done.push((EVENTS_STREAM, outcome));

    let wanted: BTreeSet<String> = account.repos.iter().map(repo_requests_filter).collect();
    let outcome = match js.get_stream(REQUESTS_STREAM).await {
        Ok(mut existing) => {
            let info = existing
                .info()
                .await
                .map_err(|err| error(REQUESTS_STREAM, err))?;
            if info.config.retention != RetentionPolicy::WorkQueue {
                return Err(error(
                    REQUESTS_STREAM,
                    format!(
                        "exists with retention {:?}, but homelab-deploy needs a work queue; delete it (nats stream rm {REQUESTS_STREAM}) and provision again",
                        info.config.retention
                    ),
                ));
            }
            let mut subjects = info.config.subjects.clone();
            subjects.extend(wanted.into_iter().filter(|s| !info.config.subjects.contains(s)));
            js.update_stream(&requests_stream_config(limits, subjects))
                .await
                .map(|_| Outcome::Updated)
        }
        Err(_) => js
            .create_stream(requests_stream_config(limits, wanted.into_iter().collect()))
            .await
            .map(|_| Outcome::Created),
    }
    .map_err(|err| error(REQUESTS_STREAM, err))?;
    done.push((REQUESTS_STREAM, outcome));

    let outcome = match js.get_key_value(BUILDERS_BUCKET).await {
        Ok(_) => Outcome::Exists,
        Err(_) => js
            .create_key_value(builders_bucket_config(limits.replicas))
            .await
            .map(|_| Outcome::Created)
            .map_err(|err| error(BUILDERS_BUCKET, err))?,
    };
    done.push((BUILDERS_BUCKET, outcome));

    let outcome = match js.get_key_value(STATE_BUCKET).await {
        Ok(_) => Outcome::Exists,
        Err(_) => js
            .create_key_value(state_bucket_config(limits))
            .await
            .map(|_| Outcome::Created)
            .map_err(|err| error(STATE_BUCKET, err))?,
    };
    done.push((STATE_BUCKET, outcome));

    let outcome = match js.get_key_value(PLACEMENT_BUCKET).await {
        Ok(_) => Outcome::Exists,
        Err(_) => js
            .create_key_value(placement_bucket_config(limits.replicas))
            .await
            .map(|_| Outcome::Created)
            .map_err(|err| error(PLACEMENT_BUCKET, err))?,
    };
    done.push((PLACEMENT_BUCKET, outcome));
    Ok(done)
}
