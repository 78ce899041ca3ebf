//! Client side of homelab-deploy: connect to NATS, request a build, follow its events, and
//! every control verb ([`control`]: status, cancel, drain, lists of builds and builders, wait
//! for a result).
//!
//! Used by the `homelab-deploy` CLI and the MCP server, and meant for timers and CI as well, so
//! that all of them submit, watch and control builds the same way.

mod connect;
pub mod control;
pub mod denials;
pub mod index;
pub mod inspect;
mod request;
mod sign;

pub use connect::{check_inbox_prefix, connect, ConnectSettings, InboxPrefixError};
pub use request::{submit, EventStream, LogStream, Submission, SubmitOptions};
pub use sign::Signer;

use homelab_deploy_credentials::SecretUrl;
use homelab_deploy_protocol::api::ErrorCode;
use homelab_deploy_protocol::RepoName;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach NATS at {url}: {message}")]
    Connect { url: SecretUrl, message: String },
    #[error("NATS at {url} refused the NKey {public_key}: authorization violation; add this public key to the server's users, or use the seed that belongs to the configured one")]
    AuthRefused { url: SecretUrl, public_key: String },
    #[error("NATS at {url} refused the credentials in {path}: authorization violation; they expired (mint new ones with `homelab-deploy creds mint`), or the server does not trust the account that signed them")]
    CredsRefused {
        url: SecretUrl,
        path: std::path::PathBuf,
    },
    #[error("NATS at {url} requires authentication: give an NKey user seed with --nkey-file (or HOMELAB_DEPLOY_NKEY_FILE, or nkey_file in the config file) or HOMELAB_DEPLOY_NKEY_SEED")]
    AuthRequired { url: SecretUrl },
    #[error("NATS at {url} refuses this user's replies on {prefix}.>: give the inbox prefix the server allows this user with --inbox-prefix (or HOMELAB_DEPLOY_INBOX_PREFIX, inbox_prefix in the config file, [nats] inbox_prefix for a builder), e.g. _INBOX_alice for a user allowed _INBOX_alice.>")]
    InboxRefused { url: SecretUrl, prefix: String },
    #[error(transparent)]
    Credentials(#[from] homelab_deploy_credentials::CredentialError),
    #[error("no builder serves repo {repo}: no JetStream stream takes build.{repo}.* (is a builder configured with [repos.{repo}] and has it started?)")]
    NoBuilder { repo: RepoName },
    #[error("stream BUILD_EVENTS is missing: no builder has started on this NATS server yet")]
    NoEventsStream,
    #[error("the build queue refused the request: {message}")]
    Refused { message: String },
    /// The server refused this user publishing to `subject` (its permissions).
    #[error("NATS refused this user publishing to {subject}: its permissions do not allow it (draining a builder and cancelling on it directly are admin actions, and a deployer may be limited to some repos; docs/security.md)")]
    PublishDenied { subject: String },
    #[error("queue_full: the queue for {subject} is full ({message}); try again later")]
    QueueFull { subject: String, message: String },
    #[error("NATS {action} failed: {message}")]
    Nats {
        action: &'static str,
        message: String,
    },
    #[error("invalid: {cursor:?} is not a page cursor (pass the next_cursor of the page before)")]
    BadCursor { cursor: String },
    #[error("event {seq} of request {id} is not valid JSON: {message}")]
    BadEvent {
        id: String,
        seq: String,
        message: String,
    },
    /// The builders answered with an error: its code (see docs/protocol.md, "Error codes")
    /// and text.
    #[error("{}{message}", code.map(|code| format!("{code}: ")).unwrap_or_default())]
    Api {
        code: Option<ErrorCode>,
        message: String,
    },
    #[error("nobody answers on {subject}: no builder is running (or none by that name)")]
    NoResponders { subject: String },
    #[error("no answer on {subject} within {secs}s")]
    TimedOut { subject: String, secs: u64 },
}
