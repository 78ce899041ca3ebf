//! Connecting to NATS, with an NKey user seed when one is configured (see
//! `homelab_deploy_credentials` for where it comes from).

use std::path::PathBuf;
use std::time::Duration;

use async_nats::{
    Auth, AuthError, Client, ConnectErrorKind, ConnectOptions, Event, ServerAddr, ServerError,
};
use homelab_deploy_credentials::secret_url::UrlCredentials;
use homelab_deploy_credentials::vault::VaultSeed;
use homelab_deploy_credentials::{SecretUrl, SeedSource};
use homelab_deploy_protocol::subject::shown;
use tracing::{debug, info, warn};

use crate::ClientError;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ConnectSettings {
    /// One server URL, or several of one cluster separated by commas. A user and password
    /// (`nats://user:password@host`) or a token (`nats://token@host`) in it authenticate; it is
    /// shown with them replaced by `***`.
    pub url: SecretUrl,
    pub nkey_file: Option<PathBuf>,
    /// A `.creds` file (user JWT and seed, NATS decentralized auth): used instead of an NKey
    /// seed, read again at every (re)connect so a re-minted file is picked up.
    pub creds_file: Option<PathBuf>,
    /// Client name shown by the server (`nats server report connections`).
    pub name: String,
    /// How long the first connection attempt may take.
    pub timeout: Duration,
    /// Where to fetch the seed when no file or environment variable gives one (the builder).
    pub vault: Option<VaultSeed>,
    /// Prefix of this connection's reply subjects (`PREFIX.<nuid>…`) instead of `_INBOX`, so a
    /// server can allow each user only its own replies (`_INBOX_<user>.>`, docs/security.md).
    /// Checked with [`check_inbox_prefix`].
    pub inbox_prefix: Option<String>,
}

/// Longest custom inbox prefix, in bytes: room is left in the subject for the reply tokens.
const MAX_INBOX_PREFIX_LEN: usize = 64;

/// Why a custom inbox prefix was refused; the prefix is shown escaped and cut short.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InboxPrefixError {
    #[error("inbox prefix {shown} is {len} bytes long; use at most {MAX_INBOX_PREFIX_LEN} (e.g. _INBOX_alice)")]
    TooLong { shown: String, len: usize },
    #[error("inbox prefix {shown} is not a subject prefix: use tokens of letters, digits, '_' and '-' separated by dots, no wildcard and no empty token (e.g. _INBOX_alice)")]
    NotTokens { shown: String },
}

/// Checks a custom inbox prefix: one or more subject tokens of `[A-Za-z0-9_-]` separated by
/// dots (no wildcard, no space, no empty token), at most 64 bytes.
///
/// # Errors
/// [`InboxPrefixError`] says what is wrong with `prefix` and gives an example.
pub fn check_inbox_prefix(prefix: &str) -> Result<(), InboxPrefixError> {
    let token_ok = |token: &str| {
        !token.is_empty()
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    if prefix.len() > MAX_INBOX_PREFIX_LEN {
        return Err(InboxPrefixError::TooLong {
            shown: shown(prefix),
            len: prefix.len(),
        });
    }
    if !prefix.split('.').all(token_ok) {
        return Err(InboxPrefixError::NotTokens {
            shown: shown(prefix),
        });
    }
    Ok(())
}

/// Connects once; fails within `settings.timeout` when the server cannot be reached.
/// Later disconnects are retried by the client in the background and logged.
pub async fn connect(settings: &ConnectSettings) -> Result<Client, ClientError> {
    let url = settings.url.clone();
    if let Some(prefix) = &settings.inbox_prefix {
        check_inbox_prefix(prefix).map_err(|err| ClientError::Connect {
            url: url.clone(),
            message: err.to_string(),
        })?;
    }
    let (servers, url_credentials) = server_addrs(&settings.url)?;
    let source = match settings.creds_file {
        Some(_) => None,
        None => SeedSource::find(settings.nkey_file.as_deref(), settings.vault.as_ref())?,
    };
    let mut public_key = None;
    let callback_credentials = url_credentials.clone();
    let options = match (source.clone(), settings.creds_file.clone()) {
        (_, Some(path)) => {
            // Checked now for a clear error; read again at every (re)connect.
            homelab_deploy_credentials::jwt::read_creds_file(&path)
                .map_err(homelab_deploy_credentials::CredentialError::from)?;
            ConnectOptions::with_auth_callback(move |nonce| {
                let path = path.clone();
                async move {
                    let (jwt, seed) = homelab_deploy_credentials::jwt::read_creds_file(&path)
                        .map_err(|err| AuthError::new(err.to_string()))?;
                    let mut auth = Auth::new();
                    auth.jwt = Some(jwt);
                    auth.signature = Some(
                        seed.sign(&nonce)
                            .map_err(|err| AuthError::new(err.to_string()))?,
                    );
                    Ok(auth)
                }
            })
        }
        (Some(source), None) => {
            // Checked now for a clear error; read again at every (re)connect for rotation.
            public_key = Some(source.load().await?.public_key()?);
            ConnectOptions::with_auth_callback(move |nonce| {
                let source = source.clone();
                let url_credentials = callback_credentials.clone();
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
                    // What the callback returns replaces the options' user, password and token.
                    if let Some(credentials) = url_credentials {
                        set_credentials(&mut auth, credentials);
                    }
                    Ok(auth)
                }
            })
        }
        (None, None) => match url_credentials {
            Some(UrlCredentials {
                user,
                password: Some(password),
            }) => ConnectOptions::with_user_and_password(user, password),
            Some(UrlCredentials {
                user,
                password: None,
            }) => ConnectOptions::with_token(user),
            None => ConnectOptions::new(),
        },
    };
    let events_source = source.clone();
    let options = match &settings.inbox_prefix {
        Some(prefix) => options.custom_inbox_prefix(prefix),
        None => options,
    };
    let options = options
        .name(&settings.name)
        .connection_timeout(settings.timeout)
        .event_callback(move |event| {
            let url = url.clone();
            let source = events_source.clone();
            async move {
                match event {
                    Event::Connected => info!(%url, "connected to NATS"),
                    Event::Disconnected => warn!(%url, "disconnected from NATS; reconnecting"),
                    // We closed it ourselves (the command is ending): nothing to warn about.
                    Event::Closed => debug!(%url, "NATS connection closed"),
                    Event::ClientError(err) if is_auth_refusal(&err.to_string()) => {
                        warn!(%url, "NATS refused the NKey at reconnect; fetching it again");
                        if let Some(source) = &source {
                            source.refused();
                        }
                    }
                    Event::ServerError(ServerError::Other(error)) => {
                        crate::denials::record(&error);
                        warn!(%url, error = %error, "NATS server error");
                    }
                    other => warn!(%url, event = %other, "NATS connection event"),
                }
            }
        });
    let client = options
        .connect(servers)
        .await
        .map_err(|err| match (err.kind(), public_key) {
            (ConnectErrorKind::AuthorizationViolation, _) if settings.creds_file.is_some() => {
                ClientError::CredsRefused {
                    url: settings.url.clone(),
                    path: settings.creds_file.clone().unwrap_or_default(),
                }
            }
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
        })?;
    check_replies(&client, settings).await?;
    Ok(client)
}

/// Makes one request every role may make (`$JS.API.INFO`; a server without JetStream answers
/// "no responders", which arrives the same way) and waits, at most `settings.timeout`, for its
/// answer or for the server refusing this connection's reply subscription: a server that allows
/// each user only its own inbox prefix refuses a client with another one, and every later
/// request would time out without saying why.
async fn check_replies(client: &Client, settings: &ConnectSettings) -> Result<(), ClientError> {
    const PROBE: &str = "$JS.API.INFO";
    let prefix = settings.inbox_prefix.as_deref().unwrap_or("_INBOX");
    let began = std::time::Instant::now();
    let refused = || crate::denials::inbox_refused_since(prefix, began);
    let answered = client.request(PROBE, "".into());
    tokio::pin!(answered);
    let deadline = tokio::time::sleep(settings.timeout);
    tokio::pin!(deadline);
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            _ = &mut answered => break,
            () = &mut deadline => break,
            _ = poll.tick() => {
                if refused() || crate::denials::publish_refused_since(PROBE, began) {
                    break;
                }
            }
        }
    }
    if refused() {
        return Err(ClientError::InboxRefused {
            url: settings.url.clone(),
            prefix: prefix.to_owned(),
        });
    }
    Ok(())
}

/// async-nats reports a refused reconnect only as text.
fn is_auth_refusal(message: &str) -> bool {
    message.contains("authorization violation")
}

fn set_credentials(auth: &mut Auth, credentials: UrlCredentials) {
    match credentials.password {
        Some(password) => {
            auth.username = Some(credentials.user);
            auth.password = Some(password);
        }
        None => auth.token = Some(credentials.user),
    }
}

/// `nats://a:4222,nats://b:4222`: several servers of one cluster, tried in turn; and the
/// credentials of the first URL that has any, which then authenticate at every server.
///
/// The credentials are taken out of the addresses handed to async-nats: it does not send a
/// URL's user and password itself, and logs server addresses whole at debug level. The
/// options that carry them instead are redacted in its `Debug` output.
fn server_addrs(
    urls: &SecretUrl,
) -> Result<(Vec<ServerAddr>, Option<UrlCredentials>), ClientError> {
    let mut credentials = None;
    let mut servers = Vec::new();
    for url in urls.split_list() {
        // A bare `host:port` is a NATS URL too (as async-nats reads it).
        let url = if url.expose().contains("://") {
            url
        } else {
            SecretUrl::new(format!("nats://{}", url.expose()))
        };
        let address = match url.take_credentials() {
            Some((found, bare)) => {
                credentials.get_or_insert(found);
                bare
            }
            None => url.expose().to_owned(),
        };
        let server = address
            .parse::<ServerAddr>()
            .map_err(|err| ClientError::Connect {
                url: url.clone(),
                message: format!("not a NATS server URL: {err}"),
            })?;
        servers.push(server);
    }
    if servers.is_empty() {
        return Err(ClientError::Connect {
            url: urls.clone(),
            message: "no server URL given".to_owned(),
        });
    }
    Ok((servers, credentials))
}

#[cfg(test)]
mod tests {
    use super::check_inbox_prefix;

    #[test]
    fn inbox_prefixes_are_plain_subject_tokens() {
        for good in ["_INBOX_alice", "_INBOX.ci-runner_2", "a"] {
            assert_eq!(check_inbox_prefix(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "_INBOX.>",
            "_INBOX.*",
            "a..b",
            ".a",
            "a.",
            "has space",
            "ü",
        ] {
            let err = check_inbox_prefix(bad).expect_err(bad).to_string();
            assert!(err.contains("_INBOX_alice"), "{err}");
        }
        let err = check_inbox_prefix(&"a".repeat(65)).expect_err("65 bytes");
        assert!(err.to_string().contains("65 bytes long"), "{err}");
    }
}
