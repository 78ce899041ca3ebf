//! Every control verb a client needs, in one place, so the CLI, the MCP server and any other
//! Rust client do them the same way: the state of a request, lists of builds and builders
//! (read from JetStream, no builder needed), cancel and drain (asked of the builders over
//! `build.api.>`), and waiting for a request's `finished` event.

use std::time::Duration;

use async_nats::{Client, RequestErrorKind};
use homelab_deploy_protocol::api::{
    builder_drain_subject, check_builder_name, ApiError, CancelReply, CancelRequest, DrainReply,
    CANCEL_SUBJECT,
};
use homelab_deploy_protocol::identity::Purpose;
use homelab_deploy_protocol::{Event, EventBody};
use serde::de::DeserializeOwned;

use crate::{ClientError, EventStream, Signer};

pub use crate::inspect::{list_builders, list_builds, request_state as status};

/// How long a control request waits for a builder's answer. A cancel may take a builder up
/// to 5 s to settle (docs/protocol.md, "Cancelling"), plus the forward to the builder that
/// runs the request.
pub(crate) const API_TIMEOUT: Duration = Duration::from_secs(15);

/// Cancels request `request.id`: a queued one never starts, a running one has its build
/// killed. Signed with `signer` when given, so the builders know who cancels.
///
/// # Errors
/// [`ClientError::Api`] with the builders' code (`not_found`, `already_finished`,
/// `forbidden`, `retry`, …); [`ClientError::NoResponders`] when no builder runs;
/// [`ClientError::TimedOut`] after [`API_TIMEOUT`]; [`ClientError::PublishDenied`] when the server
/// does not let this user publish the request.
pub async fn cancel(
    client: &Client,
    signer: Option<&Signer>,
    request: &CancelRequest,
) -> Result<CancelReply, ClientError> {
    let body = serde_json::to_vec(request).map_err(|err| ClientError::Nats {
        action: "encoding the cancel",
        message: err.to_string(),
    })?;
    let headers = match signer {
        Some(signer) => signer.headers(Purpose::Cancel, &body).await?,
        None => async_nats::HeaderMap::new(),
    };
    ask(client, CANCEL_SUBJECT.to_owned(), headers, body).await
}

/// Asks builder `name` to drain: finish its running builds, take no new ones, exit.
///
/// # Errors
/// [`ClientError::Api`] when the name is not a builder name (code `invalid`) or the builder
/// refuses; [`ClientError::NoResponders`] when no builder has that name; [`ClientError::PublishDenied`]
/// when the server does not let this user drain (an admin action on nats/prod.example.conf).
pub async fn drain(client: &Client, name: &str) -> Result<DrainReply, ClientError> {
    check_builder_name(name).map_err(|err| ClientError::Api {
        code: Some(homelab_deploy_protocol::api::ErrorCode::Invalid),
        message: err.to_string(),
    })?;
    ask(
        client,
        builder_drain_subject(name),
        async_nats::HeaderMap::new(),
        b"{}".to_vec(),
    )
    .await
}

/// One request/reply on `build.api.>`: the reply as `T`, or the builder's [`ApiError`].
async fn ask<T: DeserializeOwned>(
    client: &Client,
    subject: String,
    headers: async_nats::HeaderMap,
    body: Vec<u8>,
) -> Result<T, ClientError> {
    let began = std::time::Instant::now();
    let request = client.request_with_headers(subject.clone(), headers, body.into());
    tokio::pin!(request);
    let deadline = tokio::time::sleep(API_TIMEOUT);
    tokio::pin!(deadline);
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    // The server refuses a publish it does not allow only asynchronously: stop waiting for an
    // answer that cannot come, and say why.
    let reply = loop {
        tokio::select! {
            reply = &mut request => break Ok(reply),
            () = &mut deadline => break Err(()),
            _ = poll.tick() => {
                if crate::denials::publish_refused_since(&subject, began) {
                    return Err(ClientError::PublishDenied { subject });
                }
            }
        }
    };
    let message = match reply {
        Ok(Ok(message)) => message,
        Ok(Err(err)) if err.kind() == RequestErrorKind::NoResponders => {
            return Err(ClientError::NoResponders { subject })
        }
        Ok(Err(err)) => {
            return Err(ClientError::Nats {
                action: "asking the builders",
                message: format!("{subject}: {err}"),
            })
        }
        Err(_) => {
            return Err(ClientError::TimedOut {
                subject,
                secs: API_TIMEOUT.as_secs(),
            })
        }
    };
    if let Ok(answer) = serde_json::from_slice::<T>(&message.payload) {
        return Ok(answer);
    }
    Err(match serde_json::from_slice::<ApiError>(&message.payload) {
        Ok(error) => ClientError::Api {
            code: error.code,
            message: error.error,
        },
        Err(_) => ClientError::Api {
            code: None,
            message: format!(
                "unexpected answer on {subject}: {}",
                String::from_utf8_lossy(&message.payload)
            ),
        },
    })
}

/// What [`wait_for_finished`] hands its caller while it waits.
pub enum Seen<'a> {
    /// An event of the request (the `finished` one included, before it returns).
    Event(&'a Event),
    /// `tick` passed without an event.
    Tick,
}

/// Why [`wait_for_finished`] returned without a `finished` event.
#[derive(Debug)]
pub enum WaitEnd {
    /// The deadline passed; the build goes on.
    TimedOut,
    /// The subscription ended (NATS connection lost).
    Closed,
    /// Reading an event failed.
    Failed(ClientError),
}

/// Follows `events` until the request's `finished` event, which it returns, or until
/// `deadline`. Each event is handed to `seen` first, and [`Seen::Tick`] every `tick` without
/// one, so a caller can show progress.
///
/// # Errors
/// [`WaitEnd`]: why no `finished` came.
pub async fn wait_for_finished(
    events: &mut EventStream,
    deadline: tokio::time::Instant,
    tick: Duration,
    mut seen: impl FnMut(Seen<'_>),
) -> Result<Event, WaitEnd> {
    loop {
        let next = tokio::select! {
            next = events.next() => next,
            _ = tokio::time::sleep_until(deadline) => return Err(WaitEnd::TimedOut),
            _ = tokio::time::sleep(tick) => {
                seen(Seen::Tick);
                continue;
            }
        };
        match next {
            Some(Ok(event)) => {
                seen(Seen::Event(&event));
                if matches!(event.body, EventBody::Finished { .. }) {
                    return Ok(event);
                }
            }
            Some(Err(err)) => return Err(WaitEnd::Failed(err)),
            None => return Err(WaitEnd::Closed),
        }
    }
}
