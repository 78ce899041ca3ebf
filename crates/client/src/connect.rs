//! Connecting to NATS, with an NKey user seed when one is configured (see
//! `homelab_deploy_credentials` for where it comes from).

use std::path::PathBuf;
use std::time::Duration;

use async_nats::{Auth, AuthError, Client, ConnectErrorKind, ConnectOptions, Event, ServerAddr};
use homelab_deploy_credentials::vault::VaultSeed;
use homelab_deploy_credentials::SeedSource;
use tracing::{debug, info, warn};

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
    /// Where to fetch the seed when no file or environment variable gives one (the builder).
    pub vault: Option<VaultSeed>,
}

/// Connects once; fails within `settings.timeout` when the server cannot be reached.
/// Later disconnects are retried by the client in the background and logged.
pub async fn connect(settings: &ConnectSettings) -> Result<Client, ClientError> {
    let url = settings.url.clone();
    let source = SeedSource::find(settings.nkey_file.as_deref(), settings.vault.as_ref())?;
    let mut public_key = None;
    let options = match source.clone() {
        Some(source) => {
            // Checked now for a clear error; read again at every (re)connect for rotation.
            public_key = Some(source.load().await?.public_key()?);
            ConnectOptions::with_auth_callback(move |nonce| {
                let source = source.clone();
                async move {
                    // On a task of its own: the callback's future must be Sync, Vault's is not.
                    let seed = tokio::spawn(async move { source.load().await })
                        .await
                        .map_err(|err| AuthError::new(err.to_string()))?
                        .map_err(|err| AuthError::new(err.to_string()))?;
                    let signature = seed
                        .sign(&nonce)
                        .map_err(|err| AuthError::new(err.to_string()))?;
                    let mut auth = Auth::new();
                    auth.nkey = Some(
                        seed.public_key()
                            .map_err(|err| AuthError::new(err.to_string()))?,
                    );
                    auth.signature = Some(signature);
                    Ok(auth)
                }
            })
        }
        None => ConnectOptions::new(),
    };
    let events_source = source.clone();
    let options = options
        .name(&settings.name)
        .connection_timeout(settings.timeout)
        .event_callback(move |event| {
            let url = url.clone();
            let source = events_source.clone();
            async move {
                match event {
                    Event::Connected => info!(url, "connected to NATS"),
                    Event::Disconnected => warn!(url, "disconnected from NATS; reconnecting"),
                    // We closed it ourselves (the command is ending): nothing to warn about.
                    Event::Closed => debug!(url, "NATS connection closed"),
                    Event::ClientError(err) if is_auth_refusal(&err.to_string()) => {
                        warn!(url, "NATS refused the NKey at reconnect; fetching it again");
                        if let Some(source) = &source {
                            source.refused();
                        }
                    }
                    other => warn!(url, event = %other, "NATS connection event"),
                }
            }
        });
    let servers = server_addrs(&settings.url)?;
    options
        .connect(servers)
        .await
        .map_err(|err| match (err.kind(), public_key) {
            (ConnectErrorKind::AuthorizationViolation, Some(public_key)) => {
                // A seed from Vault is fetched again for the next attempt, as at a reconnect.
                if let Some(source) = &source {
                    source.refused();
                }
                ClientError::AuthRefused {
                    url: settings.url.clone(),
                    public_key,
                }
            }
            (ConnectErrorKind::AuthorizationViolation, None) => ClientError::AuthRequired {
                url: settings.url.clone(),
            },
            _ => ClientError::Connect {
                url: settings.url.clone(),
                message: err.to_string(),
            },
        })
}

/// async-nats reports a refused reconnect only as text.
fn is_auth_refusal(message: &str) -> bool {
    message.contains("authorization violation")
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
