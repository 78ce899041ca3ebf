//! `cancel ID` and `builder drain NAME`: requests to the builders over `build.api.>`.

use std::time::Duration;

use clap::Args;
use homelab_deploy_protocol::api::{
    builder_drain_subject, check_builder_name, ApiError, CancelReply, CancelRequest, DrainReply,
    CANCEL_SUBJECT,
};
use homelab_deploy_protocol::identity::Purpose;
use serde::de::DeserializeOwned;

use crate::build::requested_by;
use crate::nats::{connect_signing_or_exit, print_json, request_id_or_exit};
use crate::{exit, NatsArgs};

#[derive(Args)]
pub struct CancelArgs {
    /// Request id.
    id: String,
    /// Why; shown in the request's `finished` event.
    #[arg(long, value_name = "TEXT")]
    reason: Option<String>,
    /// Print the builder's answer as one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    nats: NatsArgs,
}

#[derive(Args)]
pub struct DrainArgs {
    /// Name of the builder (as in `homelab-deploy builders`).
    name: String,
    /// Print the builder's answer as one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    nats: NatsArgs,
}

/// Sends an API request and decodes the reply, or prints why it failed and returns the exit code.
/// A cancel is signed with the connection's seed, so the builders know who sent it.
async fn api_request<T: DeserializeOwned>(
    nats: &NatsArgs,
    command: &str,
    subject: String,
    body: Vec<u8>,
    signed: Option<Purpose<'_>>,
) -> Result<T, u8> {
    let (client, signer) = connect_signing_or_exit(nats, command).await?;
    let mut headers = async_nats::HeaderMap::new();
    if let (Some(purpose), Some(signer)) = (signed, signer) {
        headers = signer
            .headers(purpose, &body)
            .await
            .map_err(crate::build::client_error)?;
    }
    let reply = tokio::time::timeout(
        Duration::from_secs(15),
        client.request_with_headers(subject.clone(), headers, body.into()),
    )
    .await;
    let message = match reply {
        Ok(Ok(message)) => message,
        Ok(Err(err)) if err.kind() == async_nats::RequestErrorKind::NoResponders => {
            eprintln!("error: nobody answers on {subject}: no builder is running (or no builder by that name)");
            return Err(exit::UNAVAILABLE);
        }
        Ok(Err(err)) => {
            eprintln!("error: request on {subject} failed: {err}");
            return Err(exit::UNAVAILABLE);
        }
        Err(_) => {
            eprintln!("error: no answer on {subject} within 15s");
            return Err(exit::UNAVAILABLE);
        }
    };
    if let Ok(answer) = serde_json::from_slice::<T>(&message.payload) {
        return Ok(answer);
    }
    match serde_json::from_slice::<ApiError>(&message.payload) {
        Ok(ApiError {
            error,
            code: Some(code),
        }) => eprintln!("error: {code}: {error}"),
        Ok(error) => eprintln!("error: {}", error.error),
        Err(_) => eprintln!(
            "error: unexpected answer on {subject}: {}",
            String::from_utf8_lossy(&message.payload)
        ),
    }
    Err(exit::BUILD_FAILED)
}

pub async fn cancel(args: CancelArgs) -> u8 {
    let id = match request_id_or_exit(&args.id) {
        Ok(id) => id,
        Err(code) => return code,
    };
    let request = CancelRequest {
        id: id.to_string(),
        reason: args.reason.clone(),
        requested_by: Some(requested_by()),
    };
    let body = serde_json::to_vec(&request).unwrap_or_default();
    match api_request::<CancelReply>(
        &args.nats,
        "cancel",
        CANCEL_SUBJECT.to_owned(),
        body,
        Some(Purpose::Cancel),
    )
    .await
    {
        Ok(reply) if args.json => {
            print_json(&reply);
            exit::OK
        }
        Ok(reply) => {
            println!("{}", reply.message);
            exit::OK
        }
        Err(code) => code,
    }
}

pub async fn drain(args: DrainArgs) -> u8 {
    if let Err(err) = check_builder_name(&args.name) {
        eprintln!("error: {err}");
        return exit::USAGE;
    }
    let subject = builder_drain_subject(&args.name);
    match api_request::<DrainReply>(&args.nats, "builder drain", subject, b"{}".to_vec(), None)
        .await
    {
        Ok(reply) if args.json => {
            print_json(&reply);
            exit::OK
        }
        Ok(reply) => {
            println!("{}: {}", reply.builder, reply.message);
            exit::OK
        }
        Err(code) => code,
    }
}
