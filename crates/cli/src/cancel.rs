//! `cancel ID`: a request to the builders over `build.api.>`, through the client crate's
//! control verbs.

use clap::Args;
use homelab_deploy_client::control;
use homelab_deploy_protocol::api::CancelRequest;

use crate::build::requested_by;
use crate::error::{CliResult, Outcome};
use crate::nats::{connect_signing, print_json, request_id};
use crate::NatsArgs;

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

/// Signed with the connection's seed, so the builders know who cancels.
pub async fn cancel(args: CancelArgs) -> CliResult {
    let id = request_id(&args.id)?;
    let (client, signer) = connect_signing(&args.nats, "cancel").await?;
    let request = CancelRequest {
        id: id.to_string(),
        reason: args.reason.clone(),
        requested_by: Some(requested_by()),
    };
    let reply = control::cancel(&client, signer.as_ref(), &request).await?;
    if args.json {
        print_json(&reply);
    } else {
        println!("{}", reply.message);
    }
    Ok(Outcome::Done)
}
