//! The `homelab-deploy` binary: thin argument parsing around the client and builder libraries.

mod build;
mod builder;
mod cancel;
mod creds;
mod dashboard;
mod diff;
mod docs;
mod error;
mod follow;
mod inspect;
mod junit;
mod mcp;
mod nats;
mod nkey;
mod progress;
mod settings;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::error::{CliError, Outcome};

const EXIT_CODES: &str = "\
Exit codes:
  0  every host built or cached
  1  the build finished failed or cancelled, or was refused
  2  usage error (bad arguments, invalid names, bad config)
  3  could not reach NATS, no builder serves the repo, or timed out
  4  builder --once: no verdict (no request came, or SIGTERM handed it back)

Durations (--timeout, --host-timeout, --build-timeout) are written as 90s, 30m, 3h, 1h30m or a
plain number of seconds. NO_COLOR=1 turns colour off.";

/// Build NixOS hosts of flake repos on a fleet of builders over NATS.
#[derive(Parser)]
#[command(name = "homelab-deploy", version, about, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Ask the builders to build one host, or every host, of a repo and wait for the result.
    #[command(after_help = build::AFTER_HELP)]
    Build(build::BuildArgs),
    /// Run a builder daemon (`--config FILE`), or ask one to drain (`builder drain NAME`).
    #[command(after_help = builder::AFTER_HELP)]
    Builder(builder::BuilderArgs),
    /// Show a request's state: queued (with position), running, succeeded, failed, cancelled.
    Status(inspect::StatusArgs),
    /// Cancel a request: a queued one never starts, a running one has its build killed.
    Cancel(cancel::CancelArgs),
    /// Replay a request's events from any `seq`, then follow them until it finishes.
    Watch(follow::WatchArgs),
    /// Print a request's build log, or one host's, from any line; `--follow` to keep going.
    Logs(follow::LogsArgs),
    /// List queued and recent requests, newest first.
    Builds(inspect::BuildsArgs),
    /// List the builders of the fleet, with their state, last heartbeat and memory envelope.
    Builders(inspect::BuildersArgs),
    /// Serve a read-only live web page of the fleet, the queue and the builds.
    #[command(after_help = dashboard::AFTER_HELP)]
    Dashboard(dashboard::DashboardArgs),
    /// Show what changed between two builds of a host (packages, versions, closure size).
    #[command(after_help = diff::AFTER_HELP)]
    Diff(diff::DiffArgs),
    /// Make NKey user seeds and show their public keys.
    Nkey(nkey::NkeyArgs),
    /// Mint short-lived NATS credentials (a .creds file) for a role, e.g. an ephemeral builder.
    Creds(creds::CredsArgs),
    /// Serve the MCP tools an AI assistant uses to list, build, watch and cancel (stdio).
    #[command(after_help = mcp::AFTER_HELP)]
    Mcp(mcp::McpArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    Completions(docs::CompletionsArgs),
    /// Print the man page on stdout, or write one page per command with `--out-dir DIR`.
    Man(docs::ManArgs),
}

/// How to reach NATS; shared by every client command. Unset values come from the user's, then
/// the system's config file (see docs/cli.md), then the defaults.
#[derive(Args, Clone)]
pub struct NatsArgs {
    /// NATS server URL; several of one cluster separated by commas [default: from
    /// ~/.config/homelab-deploy/config.toml, /etc/homelab-deploy/config.toml, else
    /// nats://127.0.0.1:4222]
    #[arg(long, env = "HOMELAB_DEPLOY_NATS_URL")]
    pub nats_url: Option<String>,
    /// File holding an NKey user seed to authenticate with.
    #[arg(long, env = "HOMELAB_DEPLOY_NKEY_FILE", value_name = "FILE")]
    pub nkey_file: Option<PathBuf>,
    /// Prefix of this client's reply subjects instead of `_INBOX`, e.g. `_INBOX_alice`: on a
    /// server that allows each user only its own replies (nats/prod.example.conf), the one its
    /// user may subscribe to.
    #[arg(long, env = "HOMELAB_DEPLOY_INBOX_PREFIX", value_name = "PREFIX")]
    pub inbox_prefix: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (default_level, json) = match &cli.command {
        Command::Builder(args) if args.runs_daemon() => ("info", args.json_logs()),
        Command::Dashboard(_) => ("info", false),
        _ => ("warn", false),
    };
    init_logging(default_level, json);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            let err = CliError::unavailable(format!("cannot start the async runtime: {err}"));
            return ExitCode::from(exit_code(Err(err)));
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Build(args) => build::run(args).await,
            Command::Builder(args) => builder::run(args).await,
            Command::Status(args) => inspect::status(args).await,
            Command::Cancel(args) => cancel::cancel(args).await,
            Command::Watch(args) => follow::watch(args).await,
            Command::Logs(args) => follow::logs(args).await,
            Command::Builds(args) => inspect::builds(args).await,
            Command::Builders(args) => inspect::builders(args).await,
            Command::Dashboard(args) => dashboard::run(args).await,
            Command::Diff(args) => diff::run(args).await,
            Command::Nkey(args) => nkey::run(args),
            Command::Creds(args) => creds::run(args),
            Command::Mcp(args) => mcp::run(args).await,
            Command::Completions(args) => docs::completions(args),
            Command::Man(args) => docs::man(args),
        }
    });
    ExitCode::from(exit_code(result))
}

/// The one place a command's result becomes an exit code; an error is printed here, once.
fn exit_code(result: Result<Outcome, CliError>) -> u8 {
    match result {
        Ok(outcome) => outcome.exit_code(),
        Err(err) => {
            eprintln!("error: {err}");
            err.exit_code()
        }
    }
}

/// Colour only on a terminal, and never when `NO_COLOR` is set to anything but the empty string
/// (<https://no-color.org>). The progress bars (indicatif) follow the same rule by themselves.
fn colour_wanted() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|value| !value.is_empty());
    !no_color && std::io::IsTerminal::is_terminal(&std::io::stderr())
}

/// A duration as people write it: `90s`, `30m`, `3h`, `1h 30m`, `2days`, or a plain number of
/// seconds (`1800`, what earlier versions took). Zero is refused.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let duration = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse::<u64>()
            .map(std::time::Duration::from_secs)
            .map_err(|err| format!("{text:?} is not a number of seconds: {err}"))?
    } else {
        humantime::parse_duration(text).map_err(|err| {
            format!("{text:?} is not a duration ({err}); write e.g. 90s, 30m, 3h or 1h30m")
        })?
    };
    if duration.is_zero() {
        return Err("a duration must be longer than zero".to_owned());
    }
    Ok(duration)
}

/// Logs go to stderr, as text or one JSON object per line; `RUST_LOG` overrides the level
/// (e.g. `RUST_LOG=homelab_deploy_builder=debug`). The Vault client's own error lines are off
/// by default: the builder logs each Vault failure once, in its own words.
fn init_logging(default_level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{default_level},vaultrs=off,rustify=off"))
    });
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        logs.json()
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        logs.with_ansi(colour_wanted()).init();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::parse_duration;

    #[test]
    fn durations_as_people_write_them() {
        assert_eq!(parse_duration("3h"), Ok(Duration::from_secs(3 * 3600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2days"), Ok(Duration::from_secs(2 * 86400)));
        assert_eq!(parse_duration("1800"), Ok(Duration::from_secs(1800)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-5").is_err());
        let err = parse_duration("banana").expect_err("banana is no duration");
        assert!(err.contains("banana") && err.contains("3h"), "{err}");
    }
}
