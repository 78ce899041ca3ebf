//! Connecting a client command to NATS, with the exit code to use when that fails.

use std::time::Duration;

use async_nats::Client;
use homelab_deploy_client::{connect, ConnectSettings};
use homelab_deploy_protocol::RequestId;

use crate::build::client_error;
use crate::{exit, NatsArgs};

/// Connects, or prints why not and returns the exit code.
pub async fn connect_or_exit(args: &NatsArgs, command: &str) -> Result<Client, u8> {
    let resolved = crate::settings::resolve(args).map_err(|err| {
        eprintln!("error: {err}");
        exit::USAGE
    })?;
    let settings = ConnectSettings {
        url: resolved.nats_url.into(),
        nkey_file: resolved.nkey_file,
        name: format!("homelab-deploy {command}"),
        timeout: Duration::from_secs(5),
        vault: None,
    };
    connect(&settings).await.map_err(client_error)
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
