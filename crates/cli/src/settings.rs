//! Where client commands find NATS: flags, then environment, then the user's config file
//! (`$XDG_CONFIG_HOME/homelab-deploy/config.toml`, else `~/.config/…`), then the system's
//! (`/etc/homelab-deploy/config.toml`, which the NixOS option `programs.homelab-deploy` writes),
//! then the default `nats://127.0.0.1:4222`.
//!
//! ```toml
//! nats_url = "nats://nats.example.org:4222"
//! nkey_file = "/run/secrets/homelab-deploy-nkey"
//! inbox_prefix = "_INBOX_alice"
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::NatsArgs;

pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
pub const SYSTEM_CONFIG: &str = "/etc/homelab-deploy/config.toml";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientConfig {
    nats_url: Option<String>,
    nkey_file: Option<PathBuf>,
    inbox_prefix: Option<String>,
}

/// The NATS settings of a client command, after every source was consulted.
pub struct Resolved {
    pub nats_url: String,
    pub nkey_file: Option<PathBuf>,
    /// Checked with [`homelab_deploy_client::check_inbox_prefix`].
    pub inbox_prefix: Option<String>,
}

fn user_config() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))?;
    Some(base.join("homelab-deploy/config.toml"))
}

/// Why a client command's NATS settings cannot be resolved; all are usage errors (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("config file {} is not valid: {}", path.display(), message.trim_end())]
    Invalid { path: PathBuf, message: String },
    #[error("cannot read config file {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The inbox prefix, from a flag or a file.
    #[error(transparent)]
    InboxPrefix(#[from] homelab_deploy_client::InboxPrefixError),
}

fn read(path: &Path) -> Result<ClientConfig, SettingsError> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|err| SettingsError::Invalid {
            path: path.to_owned(),
            message: err.to_string(),
        }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(ClientConfig::default()),
        Err(source) => Err(SettingsError::Unreadable {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Resolves `args` against the config files; an unreadable or invalid file is an error.
pub fn resolve(args: &NatsArgs) -> Result<Resolved, SettingsError> {
    let system = std::env::var_os("HOMELAB_DEPLOY_SYSTEM_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(SYSTEM_CONFIG));
    let files: Vec<ClientConfig> = user_config()
        .into_iter()
        .chain([system])
        .map(|path| read(&path))
        .collect::<Result<_, _>>()?;
    let nats_url = args
        .nats_url
        .clone()
        .or_else(|| files.iter().find_map(|f| f.nats_url.clone()))
        .unwrap_or_else(|| DEFAULT_NATS_URL.to_owned());
    let nkey_file = args
        .nkey_file
        .clone()
        .or_else(|| files.iter().find_map(|f| f.nkey_file.clone()));
    let inbox_prefix = args
        .inbox_prefix
        .clone()
        .or_else(|| files.iter().find_map(|f| f.inbox_prefix.clone()));
    if let Some(prefix) = &inbox_prefix {
        homelab_deploy_client::check_inbox_prefix(prefix)?;
    }
    Ok(Resolved {
        nats_url,
        nkey_file,
        inbox_prefix,
    })
}
