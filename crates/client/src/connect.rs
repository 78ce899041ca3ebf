//! Connecting to NATS, optionally with an NKey user seed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event, ServerAddr};
use tracing::{info, warn};

use crate::ClientError;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ConnectSettings {
    /// One server URL, or several of one cluster separated by commas.
    pub url: String,
    pub nkey_file: Option<PathBuf>,
    /// Client name shown by the server (`nats server report connections`).
    pub name: String,
    /// How long the first connection attempt may take.
    pub timeout: Duration,
}

/// Reads an NKey user seed from `path`. The seed itself never appears in an error.
pub fn read_nkey_seed(path: &Path) -> Result<String, ClientError> {
    let error = |message: String| ClientError::Nkey {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|err| error(err.to_string()))?;
    let seed = text.trim();
    let holds = match seed.get(..2) {
        Some("SU") => return Ok(seed.to_owned()),
        Some("SA") => "an account seed",
        Some("SO") => "an operator seed",
        Some(prefix)
            if prefix.starts_with('U') || prefix.starts_with('A') || prefix.starts_with('N') =>
        {
            "a public key"
        }
        _ => "something that is not an NKey",
    };
    Err(error(format!(
        "it holds {holds}, not a user seed (a user seed starts with \"SU\"; make one with `nk -gen user`)"
    )))
}

/// Connects once; fails within `settings.timeout` when the server cannot be reached.
/// Later disconnects are retried by the client in the background and logged.
pub async fn connect(settings: &ConnectSettings) -> Result<Client, ClientError> {
    let url = settings.url.clone();
    let mut options = ConnectOptions::new()
        .name(&settings.name)
        .connection_timeout(settings.timeout)
        .event_callback(move |event| {
            let url = url.clone();
            async move {
                match event {
                    Event::Connected => info!(url, "connected to NATS"),
                    Event::Disconnected => warn!(url, "disconnected from NATS; reconnecting"),
                    other => warn!(url, event = %other, "NATS connection event"),
                }
            }
        });
    if let Some(path) = &settings.nkey_file {
        options = options.nkey(read_nkey_seed(path)?);
    }
    let servers = server_addrs(&settings.url)?;
    options
        .connect(servers)
        .await
        .map_err(|err| ClientError::Connect {
            url: settings.url.clone(),
            message: err.to_string(),
        })
}

/// `nats://a:4222,nats://b:4222`: several servers of one cluster, tried in turn.
fn server_addrs(urls: &str) -> Result<Vec<ServerAddr>, ClientError> {
    urls.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            url.parse::<ServerAddr>()
                .map_err(|err| ClientError::Connect {
                    url: url.to_owned(),
                    message: format!("not a NATS server URL: {err}"),
                })
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|servers| {
            if servers.is_empty() {
                Err(ClientError::Connect {
                    url: urls.to_owned(),
                    message: "no server URL given".to_owned(),
                })
            } else {
                Ok(servers)
            }
        })
}
