//! The builder's TOML configuration.
//!
//! Unknown keys are errors, so a typo never silently falls back to a default. Every error names
//! the file, the key and what is wrong.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use homelab_deploy_credentials::secret_url::redact_urls;
use homelab_deploy_credentials::SecretUrl;
use homelab_deploy_protocol::api::check_builder_name;
use homelab_deploy_protocol::request::check_git_ref;
use homelab_deploy_protocol::subject::shown;
use homelab_deploy_protocol::RepoName;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub nats: NatsConfig,
    pub builder: BuilderConfig,
    #[serde(default)]
    pub streams: StreamsConfig,
    /// Fetch the NKey seed from Vault (when `nats.nkey_seed_file` and the environment give none).
    #[serde(default)]
    pub vault: Option<VaultConfig>,
    /// Prometheus metrics; off when the table is absent.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// Known users and whether requests must be signed (`crate::access`).
    #[serde(default)]
    pub access: crate::access::AccessConfig,
    pub repos: BTreeMap<String, RepoConfig>,
    /// Teams sharing this fleet, each in its own NATS account (`[tenants.NAME]`); empty means
    /// one account for everything (`[nats]`'s credentials).
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
}

/// One `[tenants.NAME]` table: a team whose NATS account holds its own request queue, events,
/// read model and builder registry. The builder connects to each tenant's account with that
/// tenant's credential and builds only the tenant's `repos` there.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// NKey seed of this builder's user in the tenant's account.
    #[serde(default)]
    pub nkey_seed_file: Option<PathBuf>,
    /// Or a `.creds` file for that user.
    #[serde(default)]
    pub creds_file: Option<PathBuf>,
    /// Names of `[repos.NAME]` tables this tenant builds; each repo belongs to one tenant.
    pub repos: Vec<String>,
    /// Share of the build slots while several tenants have requests waiting, relative to the
    /// other tenants' (1 to 100): a tenant with priority 3 starts three requests for every one
    /// of a tenant with priority 1. No tenant waits for another's backlog to drain.
    #[serde(default = "default_tenant_priority")]
    pub priority: u32,
    /// Requests the tenant's queue holds at most (its `BUILD_REQUESTS` stream's `max_msgs`,
    /// applied when the stream is created); one more is refused to its sender as `queue_full`.
    /// Defaults to `streams.max_pending_requests`.
    #[serde(default)]
    pub max_queued: Option<i64>,
}

/// Largest `[tenants.NAME] priority`.
pub const MAX_TENANT_PRIORITY: u32 = 100;

/// One NATS account the builder serves: the single account of `[nats]`, or one tenant's.
#[derive(Debug, Clone)]
pub struct Account {
    /// The tenant's name; `None` for the single account.
    pub tenant: Option<String>,
    pub nkey_seed_file: Option<PathBuf>,
    pub creds_file: Option<PathBuf>,
    /// Repos built for this account, by name.
    pub repos: Vec<RepoName>,
    /// Share weight among accounts (1 for the single account).
    pub priority: u32,
    /// Stream limits with the tenant's `max_queued` applied.
    pub streams: StreamsConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// `https://vault.example.org:8200`
    pub address: SecretUrl,
    /// `mount/path` of the secret holding the seed, e.g. `shared/homelab-deploy/builder-nkey`.
    pub nkey_secret: String,
    /// Field of the secret holding the seed.
    #[serde(default = "default_nkey_field")]
    pub nkey_field: String,
    /// How the builder logs in to Vault.
    pub auth: VaultAuthKind,
    #[serde(default)]
    pub role_id_file: Option<PathBuf>,
    #[serde(default)]
    pub secret_id_file: Option<PathBuf>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// KV engine version of the mount: 1 or 2; unset asks Vault.
    #[serde(default)]
    pub kv_version: Option<u8>,
    /// Mount path of the AppRole auth method.
    #[serde(default = "default_approle_mount")]
    pub approle_mount: String,
    /// Fetch the seed again after this many seconds (at the next connection, and in the
    /// background so a broken Vault setup shows early).
    #[serde(default = "default_vault_refresh_secs")]
    pub refresh_interval_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Off switch that keeps the rest of the table.
    #[serde(default = "default_true")]
    pub enable: bool,
    /// Address of the `/metrics` endpoint (Prometheus job `homelab-deploy-builder`).
    #[serde(default = "default_metrics_listen")]
    pub listen: std::net::SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated; a user and password (or token) in them authenticate,
    /// and are never shown.
    pub url: SecretUrl,
    /// File holding an NKey user seed to authenticate with.
    #[serde(default)]
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file (user JWT and seed, e.g. from `homelab-deploy creds mint`) to
    /// authenticate with instead; read again at every reconnect.
    #[serde(default)]
    pub creds_file: Option<PathBuf>,
    /// Prefix of the builder's reply subjects instead of `_INBOX` (e.g. `_INBOX_builder`), for
    /// a server that allows each user only its own (docs/security.md).
    #[serde(default)]
    pub inbox_prefix: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuilderConfig {
    /// Shown in `started` events and the fleet list. Required, except for an ephemeral
    /// builder (`--once`, `--max-builds`, `--idle-exit`, `--lifetime`), which takes a generated
    /// unique name when it has none.
    #[serde(default)]
    pub name: Option<String>,
    /// Git mirrors and GC roots of built hosts live here. An ephemeral builder keeps its own
    /// in `sessions/<name>` below it and removes that when it exits.
    pub state_dir: PathBuf,
    /// Requests this builder runs at once.
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: usize,
    /// A host's evaluation and build together may take this long before it is `timed_out`.
    #[serde(default = "default_host_timeout_secs")]
    pub host_timeout_secs: u64,
    /// A whole request may take this long; hosts not built by then are `timed_out`.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
    /// Largest `host_timeout_secs` or `timeout_secs` a request may ask for.
    #[serde(default = "default_max_timeout_secs")]
    pub max_timeout_secs: u64,
    /// Hosts of one request built at once; 1 builds them one at a time, in order.
    #[serde(default = "default_build_jobs")]
    pub build_jobs: usize,
    /// Most hosts evaluated in one nix process (shared evaluation of an `all` request).
    #[serde(default = "default_eval_batch_size")]
    pub eval_batch_size: usize,
    /// A shared evaluation whose nix process grows past this many MiB is stopped and split;
    /// 0 means no limit.
    #[serde(default = "default_eval_memory_limit_mb")]
    pub eval_memory_limit_mb: u64,
    /// Path of the `nix` binary; looked up on PATH by default.
    #[serde(default = "default_nix")]
    pub nix: PathBuf,
    /// A request is started at most this many times (a builder died or stalled during each
    /// one, before or after its `started` event: every attempt that began work is claimed,
    /// [`crate::attempts`]); the next builder to take it ends it `failed` instead of starting it
    /// again.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u64,
    /// Builds of each host kept (as GC roots under `state_dir/closures`) to compare new builds
    /// with; 0 keeps none and turns closure diffs off.
    #[serde(default = "default_closure_history")]
    pub closure_history: usize,
    /// Every this many seconds the builder fetches each repo's branch and lists its hosts
    /// again, so the registry's host lists follow new commits without a build; 0: only at
    /// start and at each build.
    #[serde(default = "default_hosts_refresh_secs")]
    pub hosts_refresh_secs: u64,
    /// The builder's memory envelope in MiB: it never starts a request whose expected peak
    /// memory (measured, or a repo's `expected_peak_mb`) is larger. Default: the machine's
    /// memory (`MemTotal` of /proc/meminfo).
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// Hand a repeat build of a host back, for about a second at most, when another idle
    /// builder holds the host's last build (its store has most of the closure). Off: this
    /// builder starts whatever it pulls that fits it.
    #[serde(default = "default_true")]
    pub warm_affinity: bool,
    /// The fleet's lanes: name → memory envelope in MiB of the builders of that lane, every
    /// envelope the fleet's builders come in (the ordinary one too), the same on every
    /// builder. A request that fits no live builder but fits a lane waits for a builder of
    /// that lane (an autoscaler starts one) up to its request timeout instead of failing at
    /// once; `homelab_deploy_lane_requests{repo,lane}` counts each repo's requests by the
    /// smallest lane that fits them. Empty: no lanes; such a request fails at once.
    #[serde(default)]
    pub lanes: BTreeMap<String, u64>,
}

/// Limits of the JetStream streams, applied when this builder creates them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamsConfig {
    /// Events and logs are kept this long for replay.
    #[serde(default = "default_events_max_age_secs")]
    pub events_max_age_secs: u64,
    /// Events and logs of all requests together are kept up to this size; oldest go first.
    #[serde(default = "default_events_max_bytes")]
    pub events_max_bytes: i64,
    /// Pending requests per `build.<repo>.<target>` subject; one more is refused to its sender.
    #[serde(default = "default_requests_per_subject")]
    pub max_pending_requests_per_target: i64,
    /// Copies of each stream and of the builder registry: 1 on a single server, 3 on a cluster.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// Pending requests of all repos together; one more is refused to its sender.
    #[serde(default = "default_max_pending_requests")]
    pub max_pending_requests: i64,
    /// Bytes of pending requests of all repos together.
    #[serde(default = "default_requests_max_bytes")]
    pub requests_max_bytes: i64,
    /// A request whose builder went silent (died) for this long is redelivered to another one.
    #[serde(default = "default_request_ack_wait_secs")]
    pub request_ack_wait_secs: u64,
    /// Seconds within which the events stream drops a second copy of an event or log batch
    /// (same message id), e.g. one sent again after its ack was lost.
    #[serde(default = "default_events_duplicate_window_secs")]
    pub events_duplicate_window_secs: u64,
    /// Most consumers the events stream holds at once (`max_consumers`): every `build`, `watch`,
    /// `logs` and dashboard page holds an ephemeral one; the server refuses more.
    #[serde(default = "default_events_max_consumers")]
    pub events_max_consumers: i32,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        Self {
            events_max_age_secs: default_events_max_age_secs(),
            events_max_bytes: default_events_max_bytes(),
            max_pending_requests_per_target: default_requests_per_subject(),
            request_ack_wait_secs: default_request_ack_wait_secs(),
            events_duplicate_window_secs: default_events_duplicate_window_secs(),
            events_max_consumers: default_events_max_consumers(),
            replicas: default_replicas(),
            max_pending_requests: default_max_pending_requests(),
            requests_max_bytes: default_requests_max_bytes(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    /// `git+https://…`, `git+ssh://…`, `git+file:///…`: any git URL, with nix's `git+` prefix.
    /// Credentials in it are never shown (prefer a token file).
    pub url: SecretUrl,
    /// Branch (or tag) built when a request names no ref or rev.
    #[serde(rename = "ref", default = "default_ref")]
    pub git_ref: String,
    /// Nix store URI of a binary cache (`file:///var/cache/nix`, `s3://…`, `ssh-ng://…`): each
    /// built host's closure is copied there with `nix copy --to`.
    #[serde(default)]
    pub push_to: Option<SecretUrl>,
    /// Key to sign what is pushed with (`nix key generate-secret`); becomes the store URI's
    /// `secret-key` parameter.
    #[serde(default)]
    pub push_secret_key_file: Option<PathBuf>,
    /// Evaluate this repo's flake with `--impure`: it may read the environment, the clock
    /// (`builtins.currentTime`) and paths outside the flake. Off by default, as in `nix build`.
    #[serde(default)]
    pub impure: bool,
    /// Extra nix settings for this repo's evaluations, builds and pushes, each passed as
    /// `--option KEY VALUE` on nix's command line (the machine's nix.conf is never edited).
    /// Keys are nix setting names (`[a-z][a-z0-9-]*`, e.g. `cores`, `extra-substituters`);
    /// values are strings, integers, booleans, or lists of strings (joined with spaces).
    #[serde(default)]
    pub nix_options: BTreeMap<String, NixOptionValue>,
    /// Private SSH key (deploy key) for a `git+ssh://` url; readable by the builder only.
    #[serde(default)]
    pub ssh_key_file: Option<PathBuf>,
    /// The known-hosts file a `git+ssh://` server's host key is checked against, strictly
    /// (an unknown or changed key fails the fetch).
    #[serde(default)]
    pub ssh_known_hosts_file: Option<PathBuf>,
    /// File holding an access token for a `git+https://` url; git gets it from a credential
    /// helper, never in the URL or on a command line.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Seconds one fetch of the repo (or of one of its submodules) may take before git is
    /// stopped and the request fails.
    #[serde(default = "default_fetch_timeout_secs")]
    pub fetch_timeout_secs: u64,
    /// Expected peak memory (MiB) of hosts, by raw host name: a floor under what the fleet
    /// measures, so a heavy host goes only to builders whose `memory_mb` fits it, from its
    /// first build on.
    #[serde(default)]
    pub expected_peak_mb: BTreeMap<String, u64>,
}

/// The value of a `nix_options` entry, as TOML gives it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum NixOptionValue {
    Text(String),
    Integer(i64),
    Bool(bool),
    List(Vec<String>),
}

impl NixOptionValue {
    /// The value as nix reads it on the command line: `true`/`false`, a number, or the list's
    /// items separated by spaces.
    pub fn to_arg(&self) -> String {
        match self {
            Self::Text(text) => text.clone(),
            Self::Integer(number) => number.to_string(),
            Self::Bool(flag) => flag.to_string(),
            Self::List(items) => items.join(" "),
        }
    }
}

/// Settings the builder sets itself on every nix command; a repo may not change them.
/// `accept-flake-config` is always `false`, so a flake's `nixConfig` can neither change nix's
/// settings nor make nix ask about them; `experimental-features` would drop `flakes`.
const RESERVED_NIX_OPTIONS: [&str; 3] = [
    "accept-flake-config",
    "experimental-features",
    "extra-experimental-features",
];

/// Checks one `nix_options` entry: a setting name nix could know, and a value that reaches
/// nix as one command-line argument.
fn check_nix_option(key: &str, value: &NixOptionValue) -> Result<(), String> {
    let mut chars = key.chars();
    let well_formed = chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && key.len() <= 64;
    if !well_formed {
        return Err("is not a nix setting name (lower-case letters, digits and '-', starting with a letter, e.g. `cores` or `extra-substituters`)".into());
    }
    if RESERVED_NIX_OPTIONS.contains(&key) {
        return Err("is set by the builder itself and cannot be changed per repo".into());
    }
    let arg = value.to_arg();
    if arg.chars().any(char::is_control) || arg.len() > 4096 {
        return Err("value must be at most 4096 characters without control characters".into());
    }
    Ok(())
}

/// Query parameters of a repo's `url` that mean what they mean to nix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlakeParams {
    /// `?dir=infra/nixos`: the flake is in this directory of the repo.
    pub dir: Option<String>,
    /// `?submodules=1`: the flake's source includes git submodules.
    pub submodules: bool,
}

impl FlakeParams {
    /// Parses the query of a repo url; an error says which parameter is wrong and why.
    fn parse(query: &str) -> Result<Self, String> {
        let mut params = Self::default();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "dir" => {
                    let valid_segment = |segment: &str| {
                        !segment.is_empty()
                            && segment != "."
                            && segment != ".."
                            && segment
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
                    };
                    if !value.trim_end_matches('/').split('/').all(valid_segment) {
                        return Err(format!(
                            "dir={value:?} must be a relative directory of the repo (letters, digits, `._+-` and `/`, no `..`), e.g. dir=infra/nixos"
                        ));
                    }
                    params.dir = Some(value.trim_end_matches('/').to_owned());
                }
                "submodules" => {
                    params.submodules = match value {
                        "1" | "true" => true,
                        "0" | "false" => false,
                        other => {
                            return Err(format!("submodules={other:?} must be 1 or 0"));
                        }
                    }
                }
                "ref" | "rev" => {
                    return Err(format!(
                        "`{key}=` does not belong in the url: set the branch with the repo's `ref` key, and a request's --rev picks a commit"
                    ));
                }
                other => {
                    return Err(format!(
                        "query parameter {other:?} is not supported (only dir= and submodules=)"
                    ));
                }
            }
        }
        Ok(params)
    }
}

impl RepoConfig {
    /// The store URI `nix copy --to` takes, with the signing key when one is configured.
    pub fn push_store(&self) -> Option<SecretUrl> {
        let store = self.push_to.as_ref()?.expose();
        Some(SecretUrl::new(match &self.push_secret_key_file {
            Some(key) => {
                let separator = if store.contains('?') { '&' } else { '?' };
                format!("{store}{separator}secret-key={}", key.display())
            }
            None => store.to_owned(),
        }))
    }

    /// The URL git fetches from, credentials included: the flake URL without nix's `git+`
    /// prefix and without its query (`?dir=…&submodules=…`). Show it as [`SecretUrl`] or through
    /// `redact_urls`, never as it is.
    pub fn git_url(&self) -> &str {
        let url = self.url.expose();
        let url = url.strip_prefix("git+").unwrap_or(url);
        url.split_once('?').map_or(url, |(url, _)| url)
    }

    /// The url's `dir` and `submodules` parameters (validated when the config was loaded).
    pub fn flake_params(&self) -> FlakeParams {
        let query = self
            .url
            .expose()
            .split_once('?')
            .map_or("", |(_, query)| query);
        FlakeParams::parse(query).unwrap_or_default()
    }

    /// What the git layer needs of the repo: where to fetch from and with which credentials.
    pub fn git_source(&self) -> crate::git::Source {
        let params = self.flake_params();
        crate::git::Source {
            url: self.git_url().to_owned(),
            dir: params.dir,
            submodules: params.submodules,
            ssh_key_file: self.ssh_key_file.clone(),
            ssh_known_hosts_file: self.ssh_known_hosts_file.clone(),
            token_file: self.token_file.clone(),
            fetch_timeout: Duration::from_secs(self.fetch_timeout_secs),
        }
    }
}

fn default_max_concurrent_requests() -> usize {
    1
}
fn default_host_timeout_secs() -> u64 {
    2 * 60 * 60
}
/// `vault.auth`: how the builder logs in to Vault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VaultAuthKind {
    /// An AppRole login with `role_id_file` and `secret_id_file`, at `approle_mount`.
    Approle,
    /// A Vault token read from `token_file`.
    Token,
}

impl VaultAuthKind {
    /// The name the config file uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Approle => "approle",
            Self::Token => "token",
        }
    }
}

fn default_request_timeout_secs() -> u64 {
    6 * 60 * 60
}
fn default_max_timeout_secs() -> u64 {
    24 * 60 * 60
}
fn default_nkey_field() -> String {
    "nkey_seed".to_owned()
}
fn default_approle_mount() -> String {
    "approle".to_owned()
}
fn default_vault_refresh_secs() -> u64 {
    3600
}
fn default_true() -> bool {
    true
}
fn default_metrics_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([0, 0, 0, 0], 9973))
}
fn default_build_jobs() -> usize {
    1
}
fn default_eval_batch_size() -> usize {
    16
}
fn default_eval_memory_limit_mb() -> u64 {
    8192
}
fn default_nix() -> PathBuf {
    PathBuf::from("nix")
}
fn default_events_max_age_secs() -> u64 {
    7 * 24 * 60 * 60
}
fn default_events_max_bytes() -> i64 {
    1024 * 1024 * 1024
}
fn default_requests_per_subject() -> i64 {
    100
}
fn default_replicas() -> usize {
    1
}
fn default_max_pending_requests() -> i64 {
    10_000
}
fn default_requests_max_bytes() -> i64 {
    256 * 1024 * 1024
}
fn default_request_ack_wait_secs() -> u64 {
    60
}
fn default_events_duplicate_window_secs() -> u64 {
    120
}
fn default_tenant_priority() -> u32 {
    1
}
fn default_events_max_consumers() -> i32 {
    1000
}
fn default_max_attempts() -> u64 {
    3
}
/// Most builds kept per host for closure diffs: each is a GC root that keeps a whole system
/// closure alive.
const MAX_CLOSURE_HISTORY: usize = 100;
fn default_closure_history() -> usize {
    5
}
fn default_hosts_refresh_secs() -> u64 {
    300
}
fn default_fetch_timeout_secs() -> u64 {
    10 * 60
}
fn default_ref() -> String {
    "main".to_owned()
}

/// `MemTotal` of /proc/meminfo in MiB.
fn machine_memory_mb() -> Option<u64> {
    use procfs::Current;
    let total = procfs::Meminfo::current().ok()?.mem_total;
    Some(total / (1024 * 1024))
}

/// Time limits of a builder: defaults, and the largest a request may ask for.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub host: Duration,
    pub request: Duration,
    pub max: Duration,
}

/// How hosts are evaluated together.
#[derive(Debug, Clone, Copy)]
pub struct Evaluation {
    pub batch_size: usize,
    /// Bytes; `None` for no limit.
    pub memory_limit: Option<u64>,
}

/// A repo of the config with its validated name.
#[derive(Debug, Clone)]
pub struct Repo {
    pub name: RepoName,
    pub config: RepoConfig,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates config text; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: path.to_owned(),
            // toml quotes the offending line, which may be a URL with a token in it.
            message: redact_urls(err.to_string().trim_end()),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message,
        };
        if let Err(message) = self.nats.url.check_hosts("nats") {
            return Err(invalid(
                "nats.url".into(),
                format!("{message}; e.g. nats://127.0.0.1:4222"),
            ));
        }
        if self.nats.creds_file.is_some()
            && (self.nats.nkey_seed_file.is_some() || self.vault.is_some())
        {
            return Err(invalid(
                "nats.creds_file".into(),
                "cannot be combined with nats.nkey_seed_file or [vault]: a creds file carries its own seed".into(),
            ));
        }
        if let Some(Err(err)) = self.builder.name.as_deref().map(check_builder_name) {
            return Err(invalid(
                "builder.name".into(),
                format!("{err}; it names the builder's control subjects"),
            ));
        }
        if let Some(prefix) = &self.nats.inbox_prefix {
            if let Err(err) = homelab_deploy_client::check_inbox_prefix(prefix) {
                return Err(invalid("nats.inbox_prefix".into(), err.to_string()));
            }
        }
        if !(1..=5).contains(&self.streams.replicas) {
            return Err(invalid(
                "streams.replicas".into(),
                "must be 1 to 5 (JetStream's limit)".into(),
            ));
        }
        if self.streams.events_max_consumers < 1 {
            return Err(invalid(
                "streams.events_max_consumers".into(),
                "must be at least 1 (each follower of a build holds one consumer)".into(),
            ));
        }
        if self.streams.request_ack_wait_secs < 2 {
            return Err(invalid(
                "streams.request_ack_wait_secs".into(),
                "must be at least 2".into(),
            ));
        }
        if self.streams.events_duplicate_window_secs == 0
            || self.streams.events_duplicate_window_secs > self.streams.events_max_age_secs
        {
            return Err(invalid(
                "streams.events_duplicate_window_secs".into(),
                "must be at least 1 and at most streams.events_max_age_secs".into(),
            ));
        }
        if let Err((key, message)) = self.access.validate() {
            return Err(invalid(key, message));
        }
        if self.builder.closure_history > MAX_CLOSURE_HISTORY {
            return Err(invalid(
                "builder.closure_history".into(),
                format!("must be at most {MAX_CLOSURE_HISTORY} (0 turns closure diffs off)"),
            ));
        }
        if self.builder.max_attempts == 0 {
            return Err(invalid(
                "builder.max_attempts".into(),
                "must be at least 1".into(),
            ));
        }
        if self.builder.memory_mb == Some(0) {
            return Err(invalid(
                "builder.memory_mb".into(),
                "must be at least 1 (leave it out for the machine's memory)".into(),
            ));
        }
        for (lane, mb) in &self.builder.lanes {
            let valid_name = (1..=32).contains(&lane.len())
                && lane
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !valid_name {
                return Err(invalid(
                    format!("builder.lanes.{lane}"),
                    "a lane's name is 1 to 32 of A-Z, a-z, 0-9, '_' and '-' (it becomes a metric label)".into(),
                ));
            }
            if *mb == 0 {
                return Err(invalid(
                    format!("builder.lanes.{lane}"),
                    "must be at least 1 (the lane's memory envelope in MiB)".into(),
                ));
            }
        }
        if self.builder.max_concurrent_requests == 0 {
            return Err(invalid(
                "builder.max_concurrent_requests".into(),
                "must be at least 1".into(),
            ));
        }
        if let Some(vault) = &self.vault {
            let needs = |key: &str, value: &Option<PathBuf>| match value {
                Some(_) => Ok(()),
                None => Err(invalid(
                    format!("vault.{key}"),
                    format!("is required with auth = {:?}", vault.auth.name()),
                )),
            };
            match vault.auth {
                VaultAuthKind::Approle => {
                    needs("role_id_file", &vault.role_id_file)?;
                    needs("secret_id_file", &vault.secret_id_file)?;
                }
                VaultAuthKind::Token => needs("token_file", &vault.token_file)?,
            }
            if !matches!(vault.kv_version, None | Some(1 | 2)) {
                return Err(invalid("vault.kv_version".into(), "must be 1 or 2".into()));
            }
            if vault.refresh_interval_secs == 0 {
                return Err(invalid(
                    "vault.refresh_interval_secs".into(),
                    "must be at least 1".into(),
                ));
            }
            if !vault.nkey_secret.contains('/') {
                return Err(invalid(
                    "vault.nkey_secret".into(),
                    "must be mount/path, e.g. shared/homelab-deploy/builder-nkey".into(),
                ));
            }
        }
        if self.builder.build_jobs == 0 {
            return Err(invalid(
                "builder.build_jobs".into(),
                "must be at least 1".into(),
            ));
        }
        if self.builder.eval_batch_size == 0 {
            return Err(invalid(
                "builder.eval_batch_size".into(),
                "must be at least 1 (1 evaluates every host alone)".into(),
            ));
        }
        if self.builder.request_timeout_secs == 0 {
            return Err(invalid(
                "builder.request_timeout_secs".into(),
                "must be at least 1".into(),
            ));
        }
        if self.builder.host_timeout_secs == 0 {
            return Err(invalid(
                "builder.host_timeout_secs".into(),
                "must be at least 1".into(),
            ));
        }
        if self.repos.is_empty() {
            return Err(invalid(
                "repos".into(),
                "no repos configured; add a [repos.NAME] table with url and ref".into(),
            ));
        }
        for (name, repo) in &self.repos {
            let key = format!("repos.{name}");
            RepoName::parse(name).map_err(|err| {
                invalid(
                    key.clone(),
                    format!("{err}; repo names become NATS subject tokens"),
                )
            })?;
            let url = repo.git_url();
            let known_scheme = ["https://", "http://", "ssh://", "file://", "git://"]
                .iter()
                .any(|scheme| url.starts_with(scheme));
            let full = repo.url.expose();
            if !full.starts_with("git+") && !full.starts_with("git://") || !known_scheme {
                return Err(invalid(
                    format!("{key}.url"),
                    format!(
                        "\"{}\" is not a git URL; use git+https://, git+ssh://, git+http:// or git+file://",
                        repo.url
                    ),
                ));
            }
            if full.contains('#') {
                return Err(invalid(
                    format!("{key}.url"),
                    "must not contain a fragment (#…); set the branch with `ref`".into(),
                ));
            }
            if let Some((_, query)) = full.split_once('?') {
                FlakeParams::parse(query)
                    .map_err(|message| invalid(format!("{key}.url"), message))?;
            }
            let ssh = url.starts_with("ssh://");
            let https = url.starts_with("https://") || url.starts_with("http://");
            for (name, set) in [
                ("ssh_key_file", repo.ssh_key_file.is_some()),
                ("ssh_known_hosts_file", repo.ssh_known_hosts_file.is_some()),
            ] {
                if set && !ssh {
                    return Err(invalid(
                        format!("{key}.{name}"),
                        "only applies to a git+ssh:// url".into(),
                    ));
                }
            }
            if repo.token_file.is_some() && !https {
                return Err(invalid(
                    format!("{key}.token_file"),
                    "only applies to a git+https:// (or git+http://) url".into(),
                ));
            }
            let url_password = url.split('/').nth(2).is_some_and(|authority| {
                authority
                    .rsplit_once('@')
                    .is_some_and(|(user_info, _)| user_info.contains(':'))
            });
            if repo.token_file.is_some() && url_password {
                return Err(invalid(
                    format!("{key}.token_file"),
                    "is set, but the url carries a password too; keep the secret in the file only"
                        .into(),
                ));
            }
            if repo.fetch_timeout_secs == 0 {
                return Err(invalid(
                    format!("{key}.fetch_timeout_secs"),
                    "must be at least 1".into(),
                ));
            }
            if repo
                .push_to
                .as_ref()
                .is_some_and(|uri| !uri.expose().contains("://"))
            {
                return Err(invalid(
                    format!("{key}.push_to"),
                    "must be a nix store URI such as file:///var/cache/nix or s3://bucket".into(),
                ));
            }
            if repo.push_secret_key_file.is_some() && repo.push_to.is_none() {
                return Err(invalid(
                    format!("{key}.push_secret_key_file"),
                    "is set, but push_to is not: nothing would be signed".into(),
                ));
            }
            check_git_ref(&repo.git_ref)
                .map_err(|err| invalid(format!("{key}.ref"), err.to_string()))?;
            for (option, value) in &repo.nix_options {
                check_nix_option(option, value)
                    .map_err(|reason| invalid(format!("{key}.nix_options.{option:?}"), reason))?;
            }
        }
        self.validate_tenants(path)
    }

    fn validate_tenants(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message,
        };
        if self.tenants.is_empty() {
            return Ok(());
        }
        if self.nats.nkey_seed_file.is_some()
            || self.nats.creds_file.is_some()
            || self.vault.is_some()
        {
            return Err(invalid(
                "tenants".into(),
                "with tenants, each [tenants.NAME] table names the builder's credential in that tenant's account; remove nats.nkey_seed_file, nats.creds_file and [vault]".into(),
            ));
        }
        let mut owner: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, tenant) in &self.tenants {
            let key = format!("tenants.{name}");
            check_builder_name(name).map_err(|_| {
                invalid(
                    key.clone(),
                    "a tenant name must be 1 to 64 letters, digits, '_' or '-'".into(),
                )
            })?;
            match (&tenant.nkey_seed_file, &tenant.creds_file) {
                (Some(_), None) | (None, Some(_)) => {}
                _ => {
                    return Err(invalid(
                        key,
                        "needs exactly one of nkey_seed_file and creds_file: the builder's credential in this tenant's NATS account".into(),
                    ))
                }
            }
            if !(1..=MAX_TENANT_PRIORITY).contains(&tenant.priority) {
                return Err(invalid(
                    format!("{key}.priority"),
                    format!("must be 1 to {MAX_TENANT_PRIORITY}"),
                ));
            }
            if tenant.max_queued.is_some_and(|max| max < 1) {
                return Err(invalid(
                    format!("{key}.max_queued"),
                    "must be at least 1".into(),
                ));
            }
            if tenant.repos.is_empty() {
                return Err(invalid(
                    format!("{key}.repos"),
                    "lists no repo; name the [repos.NAME] tables this tenant builds".into(),
                ));
            }
            for repo in &tenant.repos {
                if !self.repos.contains_key(repo) {
                    return Err(invalid(
                        format!("{key}.repos"),
                        format!(
                            "{} is not a configured repo (no [repos.{repo}] table)",
                            shown(repo)
                        ),
                    ));
                }
                if let Some(other) = owner.insert(repo, name) {
                    return Err(invalid(
                        format!("{key}.repos"),
                        format!("repo {repo} already belongs to tenant {other}; a repo belongs to one tenant"),
                    ));
                }
            }
        }
        if let Some(repo) = self
            .repos
            .keys()
            .find(|repo| !owner.contains_key(repo.as_str()))
        {
            return Err(invalid(
                format!("repos.{repo}"),
                "belongs to no tenant; list it in one [tenants.NAME] repos".into(),
            ));
        }
        Ok(())
    }

    /// The NATS accounts to serve: one per tenant, or the single account of `[nats]`.
    pub fn accounts(&self) -> Vec<Account> {
        let all = self.repos();
        if self.tenants.is_empty() {
            return vec![Account {
                tenant: None,
                nkey_seed_file: self.nats.nkey_seed_file.clone(),
                creds_file: self.nats.creds_file.clone(),
                repos: all.into_iter().map(|repo| repo.name).collect(),
                priority: 1,
                streams: self.streams.clone(),
            }];
        }
        self.tenants
            .iter()
            .map(|(name, tenant)| {
                let mut streams = self.streams.clone();
                if let Some(max) = tenant.max_queued {
                    streams.max_pending_requests = max;
                }
                Account {
                    tenant: Some(name.clone()),
                    nkey_seed_file: tenant.nkey_seed_file.clone(),
                    creds_file: tenant.creds_file.clone(),
                    repos: all
                        .iter()
                        .filter(|repo| tenant.repos.iter().any(|r| r == repo.name.as_str()))
                        .map(|repo| repo.name.clone())
                        .collect(),
                    priority: tenant.priority,
                    streams,
                }
            })
            .collect()
    }

    /// The configured repos with their validated names.
    pub fn repos(&self) -> Vec<Repo> {
        self.repos
            .iter()
            .filter_map(|(name, config)| {
                RepoName::parse(name).ok().map(|name| Repo {
                    name,
                    config: config.clone(),
                })
            })
            .collect()
    }

    /// Where the seed is in Vault, when configured.
    pub fn vault_settings(&self) -> Option<homelab_deploy_credentials::vault::VaultSettings> {
        use homelab_deploy_credentials::vault::{VaultAuth, VaultSettings};
        let vault = self.vault.as_ref()?;
        let auth = match vault.auth {
            VaultAuthKind::Token => VaultAuth::Token {
                token_file: vault.token_file.clone()?,
            },
            VaultAuthKind::Approle => VaultAuth::AppRole {
                role_id_file: vault.role_id_file.clone()?,
                secret_id_file: vault.secret_id_file.clone()?,
            },
        };
        Some(VaultSettings {
            address: vault.address.clone(),
            secret: vault.nkey_secret.clone(),
            field: vault.nkey_field.clone(),
            auth,
            kv_version: vault.kv_version,
            approle_mount: vault.approle_mount.clone(),
            refresh_interval: Duration::from_secs(vault.refresh_interval_secs),
        })
    }

    /// Where to serve metrics, when they are on.
    pub fn metrics_listen(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().filter(|m| m.enable).map(|m| m.listen)
    }

    /// The builder's memory envelope in MiB: `builder.memory_mb`, else the machine's memory;
    /// `None` when neither is known (the builder then takes any request).
    pub fn memory_envelope_mb(&self) -> Option<u64> {
        self.builder.memory_mb.or_else(machine_memory_mb)
    }

    pub fn evaluation(&self) -> Evaluation {
        Evaluation {
            batch_size: self.builder.eval_batch_size,
            memory_limit: (self.builder.eval_memory_limit_mb > 0)
                .then(|| self.builder.eval_memory_limit_mb * 1024 * 1024),
        }
    }

    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            host: Duration::from_secs(self.builder.host_timeout_secs),
            request: Duration::from_secs(self.builder.request_timeout_secs),
            max: Duration::from_secs(self.builder.max_timeout_secs),
        }
    }

    pub fn request_ack_wait(&self) -> Duration {
        Duration::from_secs(self.streams.request_ack_wait_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[nats]
url = "nats://127.0.0.1:4222"
[builder]
name = "nix-cache02"
state_dir = "/var/lib/homelab-deploy"
[repos.nixos-servers]
url = "git+https://git.example.org/torjus/nixos-servers.git"
ref = "master"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/hd.toml"), text)
    }

    #[test]
    fn nix_options_become_arguments_and_bad_keys_are_refused() {
        let config = parse(&format!(
            "{GOOD}impure = true\n[repos.nixos-servers.nix_options]\ncores = 3\nsandbox = false\n\
             extra-substituters = [\"https://a.example\", \"https://b.example\"]\nwarn-dirty = \"false\"\n"
        ))
        .expect("valid");
        let repo = &config.repos()[0].config;
        assert!(repo.impure);
        let args: Vec<(String, String)> = repo
            .nix_options
            .iter()
            .map(|(key, value)| (key.clone(), value.to_arg()))
            .collect();
        assert_eq!(
            args,
            [
                ("cores", "3"),
                ("extra-substituters", "https://a.example https://b.example"),
                ("sandbox", "false"),
                ("warn-dirty", "false"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        for (bad, why) in [
            ("\"--impure\" = true", "not a nix setting name"),
            ("\"a b\" = 1", "not a nix setting name"),
            ("Cores = 1", "not a nix setting name"),
            ("accept-flake-config = true", "set by the builder"),
            ("experimental-features = \"flakes\"", "set by the builder"),
            ("cores = \"1\\n2\"", "control characters"),
        ] {
            let err = parse(&format!("{GOOD}[repos.nixos-servers.nix_options]\n{bad}\n"))
                .expect_err(bad)
                .to_string();
            assert!(
                err.contains("nix_options") && err.contains(why),
                "{bad}: {err}"
            );
        }
        assert!(parse(&format!(
            "{GOOD}[repos.nixos-servers.nix_options]\ncores = 1.5\n"
        ))
        .is_err());
    }

    #[test]
    fn issue_example_parses_with_defaults() {
        let config = parse(GOOD).expect("valid");
        assert_eq!(config.builder.max_concurrent_requests, 1);
        assert_eq!(config.repos()[0].name.as_str(), "nixos-servers");
        assert_eq!(
            config.repos()[0].config.git_url(),
            "https://git.example.org/torjus/nixos-servers.git"
        );
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let err = parse(&GOOD.replace("name = ", "nmae = ")).expect_err("accepted");
        let text = err.to_string();
        assert!(
            text.contains("/etc/hd.toml") && text.contains("nmae"),
            "{text}"
        );
    }

    #[test]
    fn repo_name_that_breaks_subject_rules_is_refused() {
        let err = parse(&GOOD.replace("[repos.nixos-servers]", "[repos.\"nixos.servers\"]"))
            .expect_err("accepted");
        let text = err.to_string();
        assert!(
            text.contains("repos.nixos.servers") && text.contains("'.'"),
            "{text}"
        );
        assert!(parse(&GOOD.replace("[repos.nixos-servers]", "[repos.api]")).is_err());
    }

    #[test]
    fn url_errors_never_show_credentials() {
        for (text, key) in [
            (
                GOOD.replace("git+https://", "https://bot:s3cr'et@"),
                "repos.nixos-servers.url",
            ),
            (
                GOOD.replace("nats://127.0.0.1:4222", "nats://u:s3cr'et@"),
                "nats.url",
            ),
            (
                GOOD.replace("git+https://", "git+https://bot:s3cr'et@")
                    .replace(".git\"", ".git\" junk"),
                "/etc/hd.toml",
            ),
        ] {
            let err = parse(&text).expect_err("accepted").to_string();
            assert!(err.contains(key) && !err.contains("s3cr'et"), "{err}");
        }
        let config =
            parse(&GOOD.replace("git+https://", "git+https://bot:s3cr'et@")).expect("valid");
        assert!(!format!("{config:?}").contains("s3cr'et"));
    }

    #[test]
    fn an_inbox_prefix_must_be_a_plain_subject_prefix() {
        let with = |prefix: &str| {
            GOOD.replace(
                "url = \"nats://127.0.0.1:4222\"",
                &format!("url = \"nats://127.0.0.1:4222\"\ninbox_prefix = \"{prefix}\""),
            )
        };
        let config = parse(&with("_INBOX_builder")).expect("valid");
        assert_eq!(config.nats.inbox_prefix.as_deref(), Some("_INBOX_builder"));
        let err = parse(&with("_INBOX.>")).expect_err("a wildcard");
        assert!(err.to_string().contains("nats.inbox_prefix"), "{err}");
    }

    #[test]
    fn hostile_ref_and_odd_urls_are_refused() {
        let err = parse(&GOOD.replace("\"master\"", "\"--upload-pack=x\"")).expect_err("accepted");
        assert!(err.to_string().contains("repos.nixos-servers.ref"), "{err}");
        let err = parse(&GOOD.replace("git+https://", "ftp://")).expect_err("accepted");
        assert!(err.to_string().contains("repos.nixos-servers.url"), "{err}");
    }
    #[test]
    fn flake_url_parameters_and_private_repo_keys() {
        let config = parse(&GOOD.replace(
            "nixos-servers.git\"",
            "nixos-servers.git?dir=infra/nixos&submodules=1\"",
        ))
        .expect("valid");
        let repo = &config.repos()[0].config;
        assert_eq!(
            repo.git_url(),
            "https://git.example.org/torjus/nixos-servers.git"
        );
        let source = repo.git_source();
        assert_eq!(source.dir.as_deref(), Some("infra/nixos"));
        assert!(source.submodules);
        for bad in [
            "?dir=../x",
            "?dir=/abs",
            "?ref=main",
            "?submodules=yes",
            "#frag",
        ] {
            let err =
                parse(&GOOD.replace("nixos-servers.git\"", &format!("nixos-servers.git{bad}\"")))
                    .expect_err(bad);
            assert!(
                err.to_string().contains("repos.nixos-servers.url"),
                "{bad}: {err}"
            );
        }
        let err = parse(&GOOD.replace(
            "ref = \"master\"",
            "ref = \"master\"\nssh_key_file = \"/k\"",
        ))
        .expect_err("ssh key on an https url");
        assert!(err.to_string().contains("ssh_key_file"), "{err}");
        let ssh = GOOD
            .replace(
                "git+https://git.example.org/",
                "git+ssh://git@git.example.org:2222/",
            )
            .replace(
                "ref = \"master\"",
                "ref = \"master\"\nssh_key_file = \"/k\"\nssh_known_hosts_file = \"/h\"",
            );
        let source = parse(&ssh).expect("valid").repos()[0].config.git_source();
        assert_eq!(source.ssh_key_file.as_deref(), Some(Path::new("/k")));
        let err = parse(
            &GOOD
                .replace("ref = \"master\"", "ref = \"master\"\ntoken_file = \"/t\"")
                .replace("https://", "https://u:pw@"),
        )
        .expect_err("password and token file");
        assert!(err.to_string().contains("token_file"), "{err}");
    }

    #[test]
    fn memory_envelope_is_the_key_or_the_machines_memory() {
        let config =
            parse(&GOOD.replace("[builder]\n", "[builder]\nmemory_mb = 512\n")).expect("valid");
        assert_eq!(config.memory_envelope_mb(), Some(512));
        let machine = parse(GOOD).expect("valid").memory_envelope_mb();
        assert!(machine.is_some_and(|mb| mb > 0), "{machine:?}");
        let err = parse(&GOOD.replace("[builder]\n", "[builder]\nmemory_mb = 0\n"))
            .expect_err("zero envelope");
        assert!(err.to_string().contains("builder.memory_mb"), "{err}");
    }

    #[test]
    fn lanes_are_named_envelopes() {
        let with = |lanes: &str| {
            parse(&GOOD.replace(
                "[builder]\n",
                &format!("[builder]\nlanes = {{ {lanes} }}\n"),
            ))
        };
        let config = with("standard = 8192, heavy = 32768").expect("valid");
        assert_eq!(config.builder.lanes.get("heavy"), Some(&32768));
        for (bad, why) in [("heavy = 0", "at least 1"), ("\"a b\" = 1", "metric label")] {
            let err = with(bad).expect_err(bad);
            assert!(
                err.to_string().contains("builder.lanes.") && err.to_string().contains(why),
                "{err}"
            );
        }
    }

    #[test]
    fn tenants_split_the_repos_and_each_brings_its_credential() {
        let two = format!(
            "{GOOD}[repos.lab]\nurl = \"git+file:///srv/lab\"\n\
             [tenants.shop]\nnkey_seed_file = \"/s/shop.nk\"\nrepos = [\"nixos-servers\"]\npriority = 3\nmax_queued = 5\n\
             [tenants.lab]\ncreds_file = \"/s/lab.creds\"\nrepos = [\"lab\"]\n"
        );
        let config = parse(&two).expect("valid");
        let accounts = config.accounts();
        let shop = accounts
            .iter()
            .find(|a| a.tenant.as_deref() == Some("shop"))
            .expect("shop");
        assert_eq!(
            shop.repos.iter().map(RepoName::as_str).collect::<Vec<_>>(),
            ["nixos-servers"]
        );
        assert_eq!((shop.priority, shop.streams.max_pending_requests), (3, 5));
        let lab = accounts
            .iter()
            .find(|a| a.tenant.as_deref() == Some("lab"))
            .expect("lab");
        assert_eq!(lab.priority, 1);
        assert_eq!(
            lab.streams.max_pending_requests,
            default_max_pending_requests()
        );
        assert!(lab.creds_file.is_some() && lab.nkey_seed_file.is_none());

        // Without tenants: one account with [nats]'s credential and every repo.
        let single = parse(GOOD).expect("valid").accounts();
        assert_eq!(single.len(), 1);
        assert!(single[0].tenant.is_none());

        for (broken, key) in [
            (
                two.replace("repos = [\"lab\"]", "repos = [\"nixos-servers\"]"),
                "tenants.shop.repos",
            ),
            (
                two.replace("repos = [\"lab\"]", "repos = [\"nope\"]"),
                "tenants.lab.repos",
            ),
            (
                two.replace("repos = [\"lab\"]", "repos = []"),
                "tenants.lab.repos",
            ),
            (
                two.replace(
                    "[tenants.lab]\ncreds_file = \"/s/lab.creds\"\nrepos = [\"lab\"]\n",
                    "",
                ),
                "repos.lab",
            ),
            (
                two.replace("creds_file = \"/s/lab.creds\"\n", ""),
                "tenants.lab",
            ),
            (
                two.replace("priority = 3", "priority = 0"),
                "tenants.shop.priority",
            ),
            (
                two.replace("max_queued = 5", "max_queued = 0"),
                "tenants.shop.max_queued",
            ),
            (
                two.replace("[builder]", "nkey_seed_file = \"/s/b.nk\"\n[builder]"),
                "tenants",
            ),
            (
                two.replace("[tenants.lab]", "[tenants.\"l b\"]"),
                "tenants.l b",
            ),
        ] {
            let err = parse(&broken).expect_err(key);
            assert!(
                err.to_string().contains(&format!("key `{key}`")),
                "{key}: {err}"
            );
        }
    }
}
