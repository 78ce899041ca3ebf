//! Connecting a client command to NATS.

use std::time::Duration;

use async_nats::Client;
use homelab_deploy_client::{connect, ConnectSettings, Signer};
use homelab_deploy_protocol::RequestId;

use crate::error::CliError;
use crate::NatsArgs;

/// Connects with the settings of `args` and the config files.
pub async fn connect_client(args: &NatsArgs, command: &str) -> Result<Client, CliError> {
    Ok(connect(&settings(args, command)?).await?)
}

/// Connects, and makes the signer of the same seed (for build requests and cancels).
pub async fn connect_signing(
    args: &NatsArgs,
    command: &str,
) -> Result<(Client, Option<Signer>), CliError> {
    let settings = settings(args, command)?;
    let signer = Signer::for_settings(&settings)?;
    let client = connect(&settings).await?;
    Ok((client, signer))
}

fn settings(args: &NatsArgs, command: &str) -> Result<ConnectSettings, CliError> {
    let resolved = crate::settings::resolve(args).map_err(CliError::usage)?;
    Ok(ConnectSettings {
        url: resolved.nats_url.into(),
        nkey_file: resolved.nkey_file,
        inbox_prefix: resolved.inbox_prefix,
        creds_file: None,
        name: format!("homelab-deploy {command}"),
        timeout: Duration::from_secs(5),
        vault: None,
    })
}

/// Parses a request id argument.
pub fn request_id(id: &str) -> Result<RequestId, CliError> {
    RequestId::parse(id).map_err(CliError::usage)
}

/// Prints `value` as one line of JSON.
pub fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string(value) {
        Ok(json) => println!("{json}"),
        Err(err) => eprintln!("error: cannot encode JSON: {err}"),
    }
}
