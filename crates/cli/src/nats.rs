//! Connecting a client command to NATS, with the exit code to use when that fails.

use std::time::Duration;

use async_nats::Client;
use homelab_deploy_client::{connect, ConnectSettings, Signer};
use homelab_deploy_protocol::RequestId;

use crate::build::client_error;
use crate::{exit, NatsArgs};

/// Connects, or prints why not and returns the exit code.
pub async fn connect_or_exit(args: &NatsArgs, command: &str) -> Result<Client, u8> {
    connect(&settings_or_exit(args, command)?)
        .await
        .map_err(client_error)
}

/// Connects, and makes the signer of the same seed (for build requests and cancels).
pub async fn connect_signing_or_exit(
    args: &NatsArgs,
    command: &str,
) -> Result<(Client, Option<Signer>), u8> {
    let settings = settings_or_exit(args, command)?;
    let signer = Signer::for_settings(&settings).map_err(client_error)?;
    let client = connect(&settings).await.map_err(client_error)?;
    Ok((client, signer))
}

fn settings_or_exit(args: &NatsArgs, command: &str) -> Result<ConnectSettings, u8> {
    let resolved = crate::settings::resolve(args).map_err(|err| {
        eprintln!("error: {err}");
        exit::USAGE
    })?;
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

/// Parses a request id argument, or prints why not and returns the exit code.
pub fn request_id_or_exit(id: &str) -> Result<RequestId, u8> {
    RequestId::parse(id).map_err(|err| {
        eprintln!("error: {err}");
        exit::USAGE
    })
}

/// Prints `value` as one line of JSON.
pub fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string(value) {
        Ok(json) => println!("{json}"),
        Err(err) => eprintln!("error: cannot encode JSON: {err}"),
    }
}
