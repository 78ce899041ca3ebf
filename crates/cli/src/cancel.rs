//! `cancel ID` and `builder drain NAME`: requests to the builders over `build.api.>`, through
//! the client crate's control verbs.

use clap::Args;
use homelab_deploy_client::control;
use homelab_deploy_protocol::api::{check_builder_name, CancelRequest};

use crate::build::{client_error, requested_by};
use crate::nats::{connect_or_exit, connect_signing_or_exit, print_json, request_id_or_exit};
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

/// Signed with the connection's seed, so the builders know who cancels.
pub async fn cancel(args: CancelArgs) -> u8 {
    let id = match request_id_or_exit(&args.id) {
        Ok(id) => id,
        Err(code) => return code,
    };
    let (client, signer) = match connect_signing_or_exit(&args.nats, "cancel").await {
        Ok(connected) => connected,
        Err(code) => return code,
    };
    let request = CancelRequest {
        id: id.to_string(),
        reason: args.reason.clone(),
        requested_by: Some(requested_by()),
    };
    match control::cancel(&client, signer.as_ref(), &request).await {
        Ok(reply) if args.json => {
            print_json(&reply);
            exit::OK
        }
        Ok(reply) => {
            println!("{}", reply.message);
            exit::OK
        }
        Err(err) => client_error(err),
    }
}

pub async fn drain(args: DrainArgs) -> u8 {
    if let Err(err) = check_builder_name(&args.name) {
        eprintln!("error: {err}");
        return exit::USAGE;
    }
    let client = match connect_or_exit(&args.nats, "builder drain").await {
        Ok(client) => client,
        Err(code) => return code,
    };
    match control::drain(&client, &args.name).await {
        Ok(reply) if args.json => {
            print_json(&reply);
            exit::OK
        }
        Ok(reply) => {
            println!("{}: {}", reply.builder, reply.message);
            exit::OK
        }
        Err(err) => client_error(err),
    }
}
