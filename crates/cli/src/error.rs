//! The one error path of the CLI: every command returns [`CliError`] with `?`, and `main` prints
//! it (`error: …` on stderr) and exits with its [`CliError::exit_code`]. Exit codes are those
//! of docs/cli.md, "Exit codes".

use homelab_deploy_client::ClientError;
use homelab_deploy_protocol::api::ErrorCode;

/// Exit codes, shared by every command.
pub mod exit {
    /// Every host built or cached.
    pub const OK: u8 = 0;
    /// The build finished failed or cancelled, or was refused.
    pub const BUILD_FAILED: u8 = 1;
    /// Usage error: bad arguments or config.
    pub const USAGE: u8 = 2;
    /// NATS unreachable, no builder serves the repo, or timed out.
    pub const UNAVAILABLE: u8 = 3;
    /// `builder --once` ended without a verdict: no request came, or it was handed back.
    pub const NO_VERDICT: u8 = 4;
}

/// How a command that ran to its end exits; its output said why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Exit 0: every host built or cached, or the command did what was asked.
    Done,
    /// Exit 1: the build (or a session's request) finished failed or cancelled.
    BuildFailed,
    /// Exit 4: `builder --once` ended without a verdict.
    NoVerdict,
}

impl Outcome {
    /// The process exit code of this outcome.
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Done => exit::OK,
            Outcome::BuildFailed => exit::BUILD_FAILED,
            Outcome::NoVerdict => exit::NO_VERDICT,
        }
    }
}

/// Why a command failed; the message is what the user reads after `error: `.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments, names, flags or config (exit 2).
    #[error("{0}")]
    Usage(String),
    /// A refusal or a missing request or build: the command reached NATS and the answer was no
    /// (exit 1).
    #[error("{0}")]
    Refused(String),
    /// NATS, a builder or the machine could not do it: unreachable, no answer in time, a lost
    /// subscription, a failed daemon (exit 3).
    #[error("{0}")]
    Unavailable(String),
    /// The client library failed; its exit code depends on what failed (see
    /// [`CliError::exit_code`]).
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl CliError {
    /// A usage error (exit 2) with `message`.
    pub fn usage(message: impl std::fmt::Display) -> Self {
        CliError::Usage(message.to_string())
    }

    /// An unavailable error (exit 3) with `message`.
    pub fn unavailable(message: impl std::fmt::Display) -> Self {
        CliError::Unavailable(message.to_string())
    }

    /// The process exit code of this error: credentials, a refused inbox and an `invalid`
    /// answer are the user's to fix (2); a refusal by the queue, the server's permissions or a
    /// builder is a verdict (1); anything else is NATS or the fleet out of reach (3).
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => exit::USAGE,
            CliError::Refused(_) => exit::BUILD_FAILED,
            CliError::Unavailable(_) => exit::UNAVAILABLE,
            CliError::Client(err) => match err {
                ClientError::Credentials(_) | ClientError::InboxRefused { .. } => exit::USAGE,
                ClientError::Api {
                    code: Some(ErrorCode::Invalid),
                    ..
                } => exit::USAGE,
                ClientError::Refused { .. }
                | ClientError::PublishDenied { .. }
                | ClientError::Api { .. } => exit::BUILD_FAILED,
                ClientError::Connect { .. }
                | ClientError::AuthRefused { .. }
                | ClientError::CredsRefused { .. }
                | ClientError::AuthRequired { .. }
                | ClientError::NoBuilder { .. }
                | ClientError::NoEventsStream
                | ClientError::QueueFull { .. }
                | ClientError::Nats { .. }
                | ClientError::BadCursor { .. }
                | ClientError::BadEvent { .. }
                | ClientError::NoResponders { .. }
                | ClientError::TimedOut { .. } => exit::UNAVAILABLE,
            },
        }
    }
}

/// What every command returns.
pub type CliResult = Result<Outcome, CliError>;
