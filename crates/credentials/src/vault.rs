//! Fetching the NKey seed from Vault (or OpenBao) with `vaultrs`: AppRole or token login, then a
//! KV v1 or v2 read. A fresh login per fetch means no token is held past its use, so none can
//! expire under the builder. [`VaultSeed`] keeps the seed in memory (never on disk) and fetches
//! it again when NATS refused it, when it is older than the refresh interval, or when asked.
//! `vaultrs` errors are never printed with `{:?}` (their Debug output can hold response bodies).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustify_derive::Endpoint;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use vaultrs::client::{Client, VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use crate::secret_url::redact_urls;
use crate::SecretUrl;

use crate::Seed;

/// Counter of failed fetches, by reason; the builder describes it.
pub const FETCH_FAILURES_METRIC: &str = "homelab_deploy_vault_fetch_failures_total";

/// How the builder logs in to Vault.
#[derive(Debug, Clone)]
pub enum VaultAuth {
    AppRole {
        role_id_file: PathBuf,
        secret_id_file: PathBuf,
    },
    Token {
        token_file: PathBuf,
    },
}

/// Where the seed is in Vault.
#[derive(Debug, Clone)]
pub struct VaultSettings {
    /// `https://vault.example.org:8200`; shown without credentials, should it hold any.
    pub address: SecretUrl,
    /// `mount/path/to/secret`, e.g. `shared/homelab-deploy/builder-nkey`.
    pub secret: String,
    /// Field of the secret holding the seed.
    pub field: String,
    pub auth: VaultAuth,
    /// 1 or 2: the KV engine version of the mount; `None` asks Vault
    /// (`sys/internal/ui/mounts/<secret>`).
    pub kv_version: Option<u8>,
    /// Mount path of the AppRole auth method, usually `approle`.
    pub approle_mount: String,
    /// After this long, the next connection attempt fetches the seed again.
    pub refresh_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// Vault could not be reached: worth retrying.
    #[error("vault at {address} unreachable: {message}")]
    Unreachable { address: SecretUrl, message: String },
    #[error("vault at {address} refused the login ({method}): {message}; check [vault] role_id_file and secret_id_file (or token_file): a secret id or token may have expired")]
    Login {
        address: SecretUrl,
        method: &'static str,
        message: String,
    },
    #[error("vault at {address}: reading {secret} failed: {message}")]
    Read {
        address: SecretUrl,
        secret: String,
        message: String,
    },
    #[error("vault secret {secret} has no field {field:?}; set [vault] nkey_field to the field holding the seed")]
    MissingField { secret: String, field: String },
    #[error("vault secret {secret} field {field:?} holds {holds}, not a user seed")]
    NotUserSeed {
        secret: String,
        field: String,
        holds: &'static str,
    },
    #[error("cannot read {path}: {message}")]
    CredentialFile { path: PathBuf, message: String },
    #[error("vault address \"{address}\" is not usable: {message}")]
    Settings { address: SecretUrl, message: String },
    #[error("vault at {address}: cannot tell the KV version of the mount holding {secret} ({message}); set [vault] kv_version = 1 or 2")]
    KvVersion {
        address: SecretUrl,
        secret: String,
        message: String,
    },
}

impl VaultError {
    /// Whether waiting may help (Vault down or restarting), as opposed to a wrong setting.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
    }

    /// Short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } => "unreachable",
            Self::Login { .. } => "login",
            Self::Read { .. } => "read",
            Self::MissingField { .. } => "missing_field",
            Self::NotUserSeed { .. } => "not_user_seed",
            Self::CredentialFile { .. } => "credential_file",
            Self::Settings { .. } => "settings",
            Self::KvVersion { .. } => "kv_version",
        }
    }
}

/// The HTTP status Vault answered with, if it answered.
fn status_of(err: &ClientError) -> Option<u16> {
    match err {
        ClientError::APIError { code, .. } => Some(*code),
        ClientError::RestClientError {
            source: rustify::errors::ClientError::ServerResponseError { code, .. },
        } => Some(*code),
        _ => None,
    }
}

/// Vault's answer as text, without the response body (it may hold secrets): the status and
/// Vault's own error strings, or what failed in the transport.
fn describe(err: &ClientError) -> String {
    // A transport error quotes the request's URL, which holds the address.
    redact_urls(&describe_unredacted(err))
}

fn describe_unredacted(err: &ClientError) -> String {
    use rustify::errors::ClientError as Rest;
    match err {
        ClientError::APIError { code, errors } if errors.is_empty() => format!("HTTP {code}"),
        ClientError::APIError { code, errors } => format!("HTTP {code}: {}", errors.join("; ")),
        ClientError::RestClientError { source } => match source {
            Rest::ServerResponseError { code, content } => {
                match content.as_deref().and_then(vault_error_strings) {
                    Some(errors) => format!("HTTP {code}: {errors}"),
                    None => format!("HTTP {code}"),
                }
            }
            Rest::RequestError { source, .. } | Rest::ResponseError { source } => {
                format!("{source:#}")
            }
            other => other.to_string(),
        },
        other => other.to_string(),
    }
}

/// Only the error strings of an error body: `{"errors": [..]}` (Vault) or `{"error": ".."}`.
fn vault_error_strings(body: &str) -> Option<String> {
    let body: serde_json::Value = serde_json::from_str(body).ok()?;
    let errors: Vec<&str> = match (&body["errors"], &body["error"]) {
        (serde_json::Value::Array(list), _) => list.iter().filter_map(|e| e.as_str()).collect(),
        (_, serde_json::Value::String(one)) => vec![one.as_str()],
        _ => return None,
    };
    (!errors.is_empty()).then(|| errors.join("; "))
}

/// Vault down, sealed or not answering is worth waiting for; anything else is `otherwise`.
fn unreachable_or(
    err: &ClientError,
    address: &SecretUrl,
    otherwise: impl FnOnce(String) -> VaultError,
) -> VaultError {
    use rustify::errors::ClientError as Rest;
    let transport = matches!(
        err,
        ClientError::RestClientError {
            source: Rest::RequestError { .. } | Rest::ResponseError { .. }
        }
    );
    if transport || status_of(err).is_some_and(|code| code >= 500) {
        VaultError::Unreachable {
            address: address.clone(),
            message: describe(err),
        }
    } else {
        otherwise(describe(err))
    }
}

fn read_file(path: &Path) -> Result<String, VaultError> {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_owned())
        .map_err(|err| VaultError::CredentialFile {
            path: path.to_owned(),
            message: err.to_string(),
        })
}

/// `GET sys/internal/ui/mounts/<path>`: the mount holding a path and its options, answered for
/// paths the token may use (unlike `sys/mounts`, which builders usually may not read).
#[derive(Debug, Default, Endpoint, Serialize)]
#[endpoint(
    path = "sys/internal/ui/mounts/{self.path}",
    response = "MountInfoResponse"
)]
struct MountInfoRequest {
    #[endpoint(skip)]
    path: String,
}

/// Vault wraps the answer in `data`; some Vault-API servers (rvault) answer bare.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum MountInfoResponse {
    Wrapped { data: MountInfo },
    Bare(MountInfo),
}

#[derive(Debug, Deserialize)]
struct MountInfo {
    /// The mount's path with a trailing slash, e.g. `shared/`.
    path: Option<String>,
    options: Option<HashMap<String, serde_json::Value>>,
}

impl MountInfo {
    fn kv_version(&self) -> u8 {
        // Vault says "2"; be lenient about a number.
        match self
            .options
            .as_ref()
            .and_then(|options| options.get("version"))
        {
            Some(serde_json::Value::String(version)) if version == "2" => 2,
            Some(serde_json::Value::Number(version)) if version.as_u64() == Some(2) => 2,
            _ => 1,
        }
    }
}

/// Where a secret is: its mount and the path inside the mount.
#[derive(Debug, PartialEq)]
struct Location {
    mount: String,
    path: String,
    kv_version: u8,
}

impl VaultSettings {
    /// Logs in and reads the seed.
    pub async fn fetch_seed(&self) -> Result<Seed, VaultError> {
        let client = self.login().await?;
        let location = self.locate(&client).await?;
        let read_error = |err: ClientError| {
            let hint = match status_of(&err) {
                Some(404) => "; no such secret: store the seed there (field \"nkey_seed\" unless [vault] nkey_field says otherwise)",
                Some(403) => "; permission denied: the builder's Vault policy must allow \"read\" on this path (see docs/configuration.md)",
                _ => "",
            };
            unreachable_or(&err, &self.address, |message| VaultError::Read {
                address: self.address.clone(),
                secret: self.secret.clone(),
                message: format!("{message}{hint}"),
            })
        };
        let data: HashMap<String, serde_json::Value> = if location.kv_version == 1 {
            vaultrs::kv1::get(&client, &location.mount, &location.path)
                .await
                .map_err(read_error)?
        } else {
            vaultrs::kv2::read(&client, &location.mount, &location.path)
                .await
                .map_err(read_error)?
        };
        seed_from(&data, &self.secret, &self.field)
    }

    async fn login(&self) -> Result<VaultClient, VaultError> {
        let settings = VaultClientSettingsBuilder::default()
            .address(self.address.expose())
            .build()
            .map_err(|err| VaultError::Settings {
                address: self.address.clone(),
                message: err.to_string(),
            })?;
        let mut client = VaultClient::new(settings).map_err(|err| VaultError::Settings {
            address: self.address.clone(),
            message: describe(&err),
        })?;
        match &self.auth {
            VaultAuth::Token { token_file } => client.set_token(&read_file(token_file)?),
            VaultAuth::AppRole {
                role_id_file,
                secret_id_file,
            } => {
                let (role_id, secret_id) = (read_file(role_id_file)?, read_file(secret_id_file)?);
                let login = vaultrs::auth::approle::login(
                    &client,
                    &self.approle_mount,
                    &role_id,
                    &secret_id,
                )
                .await
                .map_err(|err| {
                    unreachable_or(&err, &self.address, |message| VaultError::Login {
                        address: self.address.clone(),
                        method: "approle",
                        message,
                    })
                })?;
                client.set_token(&login.client_token);
            }
        }
        Ok(client)
    }

    /// The mount and KV version: from the settings when `kv_version` is set, else from Vault.
    async fn locate(&self, client: &VaultClient) -> Result<Location, VaultError> {
        if let Some(kv_version) = self.kv_version {
            let (mount, path) = self.secret.split_once('/').unwrap_or((&self.secret, ""));
            return Ok(Location {
                mount: mount.to_owned(),
                path: path.to_owned(),
                kv_version,
            });
        }
        let request = MountInfoRequest {
            path: self.secret.clone(),
        };
        let response = vaultrs::api::exec_with_no_result(client, request)
            .await
            .map_err(|err| {
                unreachable_or(&err, &self.address, |message| VaultError::KvVersion {
                    address: self.address.clone(),
                    secret: self.secret.clone(),
                    message: format!("sys/internal/ui/mounts answered {message}"),
                })
            })?;
        let info = match response {
            MountInfoResponse::Wrapped { data } | MountInfoResponse::Bare(data) => data,
        };
        location_from(&self.secret, &info).ok_or_else(|| VaultError::KvVersion {
            address: self.address.clone(),
            secret: self.secret.clone(),
            message: "sys/internal/ui/mounts named no mount holding it".to_owned(),
        })
    }
}

fn location_from(secret: &str, info: &MountInfo) -> Option<Location> {
    let mount = info.path.as_deref()?.trim_end_matches('/');
    let path = secret.strip_prefix(mount)?.trim_start_matches('/');
    Some(Location {
        mount: mount.to_owned(),
        path: path.to_owned(),
        kv_version: info.kv_version(),
    })
}

/// The builder's seed from Vault, held in memory between fetches. Clones share it.
#[derive(Clone)]
pub struct VaultSeed {
    settings: Arc<VaultSettings>,
    held: Arc<Mutex<Option<Held>>>,
    last_error: Arc<Mutex<Option<String>>>,
}

#[derive(Clone)]
struct Held {
    seed: Seed,
    fetched_at: Instant,
    /// NATS refused it: fetch again at the next attempt.
    refused: bool,
}

impl fmt::Debug for VaultSeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultSeed")
            .field("address", &self.settings.address)
            .field("secret", &self.settings.secret)
            .finish_non_exhaustive()
    }
}

impl VaultSeed {
    pub fn new(settings: VaultSettings) -> Self {
        Self {
            settings: Arc::new(settings),
            held: Arc::new(Mutex::new(None)),
            last_error: Arc::new(Mutex::new(None)),
        }
    }

    pub fn settings(&self) -> &VaultSettings {
        &self.settings
    }

    fn held(&self) -> Option<Held> {
        self.held.lock().map(|held| held.clone()).unwrap_or(None)
    }

    /// The seed for a connection attempt: the one in memory while it is fresh and NATS has not
    /// refused it, else a new fetch. When Vault is unreachable, the seed in memory is used.
    pub async fn current(&self) -> Result<Seed, VaultError> {
        match self.held() {
            Some(held)
                if !held.refused && held.fetched_at.elapsed() < self.settings.refresh_interval =>
            {
                Ok(held.seed)
            }
            Some(held) => match self.fetch().await {
                Err(err) if err.is_transient() && !held.refused => {
                    warn!(
                        "{err}; using the seed fetched {}s ago",
                        held.fetched_at.elapsed().as_secs()
                    );
                    Ok(held.seed)
                }
                other => other,
            },
            None => self.fetch().await,
        }
    }

    /// NATS refused the seed in memory: the next attempt fetches it again.
    pub fn refused(&self) {
        if let Ok(mut held) = self.held.lock() {
            if let Some(held) = held.as_mut() {
                held.refused = true;
            }
        }
    }

    /// Why the last fetch failed, until one succeeds.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().map(|e| e.clone()).unwrap_or(None)
    }

    fn set_last_error(&self, error: Option<String>) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = error;
        }
    }

    /// Fetches the seed now and keeps it; failures are counted in
    /// `homelab_deploy_vault_fetch_failures_total`.
    pub async fn fetch(&self) -> Result<Seed, VaultError> {
        let seed = match self.settings.fetch_seed().await {
            Ok(seed) => seed,
            Err(err) => {
                metrics::counter!(FETCH_FAILURES_METRIC, "reason" => err.reason()).increment(1);
                self.set_last_error(Some(err.to_string()));
                return Err(err);
            }
        };
        self.set_last_error(None);
        let public_key = seed.public_key().ok();
        let previous = self.held().and_then(|held| held.seed.public_key().ok());
        let public_key_text = public_key.as_deref().unwrap_or("?");
        match previous {
            None => info!(
                secret = %self.settings.secret,
                public_key = public_key_text,
                "fetched the NKey seed from vault"
            ),
            Some(previous) if Some(&previous) != public_key.as_ref() => info!(
                secret = %self.settings.secret,
                public_key = public_key_text,
                "the NKey seed in vault changed; the new one is used from the next connection"
            ),
            Some(_) => {}
        }
        if let Ok(mut held) = self.held.lock() {
            *held = Some(Held {
                seed: seed.clone(),
                fetched_at: Instant::now(),
                refused: false,
            });
        }
        Ok(seed)
    }
}

/// The seed in field `field` of a secret's data (the same shape for KV v1 and v2's inner data).
fn seed_from(
    data: &HashMap<String, serde_json::Value>,
    secret: &str,
    field: &str,
) -> Result<Seed, VaultError> {
    let text = data
        .get(field)
        .and_then(|value| value.as_str())
        .ok_or_else(|| VaultError::MissingField {
            secret: secret.to_owned(),
            field: field.to_owned(),
        })?;
    Seed::parse(text).map_err(|holds| VaultError::NotUserSeed {
        secret: secret.to_owned(),
        field: field.to_owned(),
        holds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// KV v2 wraps the data in `data.data`; vaultrs' kv2::read hands back the inner map, which
    /// is what `seed_from` reads. rvault (used by the end-to-end tests) has no KV v2, so the v2
    /// response shape is checked here.
    #[test]
    fn kv2_response_data_yields_the_seed() {
        let seed = Seed::generate();
        let response = serde_json::json!({
            "data": { "data": { "nkey_seed": seed.expose() }, "metadata": { "version": 3 } }
        });
        let inner: HashMap<String, serde_json::Value> =
            serde_json::from_value(response["data"]["data"].clone()).expect("inner data");
        let read = seed_from(&inner, "shared/builder", "nkey_seed").expect("seed");
        assert_eq!(
            read.public_key().expect("pk"),
            seed.public_key().expect("pk")
        );
        let err = seed_from(&inner, "shared/builder", "seed").expect_err("wrong field");
        assert!(err.to_string().contains("no field \"seed\""), "{err}");
    }

    /// Vault's answer for a KV v2 mount whose path has a slash in it.
    #[test]
    fn mount_info_of_a_kv2_mount_locates_the_secret() {
        let response: MountInfoResponse = serde_json::from_value(serde_json::json!({
            "request_id": "r", "data": { "type": "kv", "path": "team/shared/", "options": { "version": "2" } }
        }))
        .expect("mount info");
        let MountInfoResponse::Wrapped { data: info } = response else {
            panic!("Vault's wrapped answer was read as bare");
        };
        let location = location_from("team/shared/homelab-deploy/builder-nkey", &info);
        assert_eq!(
            location,
            Some(Location {
                mount: "team/shared".into(),
                path: "homelab-deploy/builder-nkey".into(),
                kv_version: 2,
            })
        );
        let v1: MountInfo = serde_json::from_value(serde_json::json!({
            "type": "kv", "path": "shared/", "options": null
        }))
        .expect("mount info");
        assert_eq!(
            location_from("shared/x", &v1).map(|l| l.kv_version),
            Some(1)
        );
        assert_eq!(location_from("other/x", &v1), None);
    }
}
