//! `homelab-deploy builder`: run the daemon until SIGTERM or SIGINT.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use homelab_deploy_builder::{Config, Stop};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{error, info};

use crate::exit;

pub const AFTER_HELP: &str = "\
The config is TOML; see docs/configuration.md. The smallest one:

  [nats]
  url = \"nats://127.0.0.1:4222\"
  [builder]
  name = \"nix-cache02\"
  state_dir = \"/var/lib/homelab-deploy\"
  [repos.nixos-servers]
  url = \"git+https://git.example.org/torjus/nixos-servers.git\"
  ref = \"master\"
  # impure = true                  # evaluate with --impure (builtins.currentTime, getEnv)
  # [repos.nixos-servers.nix_options]
  # cores = 4                      # each passed as --option KEY VALUE, never written to nix.conf

A flake's nixConfig is never applied (nix runs with --option accept-flake-config false and no
stdin), whatever the machine's nix.conf says.

Private repos: `url = \"git+ssh://git@host:2222/owner/repo\"` with ssh_key_file and
ssh_known_hosts_file (host keys checked strictly), or git+https:// with token_file (never put in
the URL). A url may end in ?dir=infra/nixos and/or submodules=1, as in a flake URL; a commit
that keeps files in Git LFS is refused. Each git fetch is limited by fetch_timeout_secs (600).

NKey seed, first that is set: [nats] nkey_seed_file, $HOMELAB_DEPLOY_NKEY_SEED, or a [vault]
table (AppRole or token; see \"Seed from Vault\" in docs/configuration.md). While Vault cannot
give the seed, the builder waits and says why at each attempt.

Signals: SIGTERM (systemctl stop or restart) kills the running builds at once and hands their
requests back to the queue, where another builder (or this one, restarted) builds them again
(exit 0). SIGINT (Ctrl-C) stops taking requests and lets the running builds finish; a second
SIGINT, or a SIGTERM, then hands them back. `homelab-deploy builder drain NAME` drains over NATS.

Under systemd (NOTIFY_SOCKET set), READY=1 is sent once the streams and consumers are set up,
and STOPPING=1 when it stops.

Exit codes: 0 stopped cleanly; 2 invalid config; 3 nix unusable, NATS or JetStream setup failed.";

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BuilderArgs {
    #[command(subcommand)]
    action: Option<BuilderAction>,
    /// Path of the builder's TOML config.
    #[arg(long, short, value_name = "FILE", required = true)]
    config: Option<PathBuf>,
    /// Validate the config and exit, without connecting to anything.
    #[arg(long)]
    check: bool,
    /// `text` (default), or `json`: one JSON object per line, for journald and log shippers.
    /// Every line about a request carries its `request_id`.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum BuilderAction {
    /// Ask a running builder to finish its current build, take no new one, and exit.
    Drain(crate::cancel::DrainArgs),
}

impl BuilderArgs {
    /// Whether this runs the daemon itself (rather than talking to one).
    pub fn runs_daemon(&self) -> bool {
        self.action.is_none() && !self.check
    }

    pub fn json_logs(&self) -> bool {
        self.log_format == LogFormat::Json
    }
}

pub async fn run(args: BuilderArgs) -> u8 {
    let path = match (args.action, args.config) {
        (Some(BuilderAction::Drain(drain)), _) => return crate::cancel::drain(drain).await,
        (None, Some(path)) => path,
        (None, None) => {
            eprintln!("error: --config FILE is required to run a builder");
            return exit::USAGE;
        }
    };
    let args = RunArgs {
        config: path,
        check: args.check,
    };
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return exit::USAGE;
        }
    };
    if args.check {
        println!(
            "config {} is valid: builder {}, repos {}",
            args.config.display(),
            config.builder.name,
            config.repos.keys().cloned().collect::<Vec<_>>().join(", ")
        );
        return exit::OK;
    }
    let (stop_tx, stop_rx) = watch::channel(Stop::Running);
    let signals = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(err), _) | (_, Err(err)) => {
            eprintln!("error: cannot install signal handlers: {err}");
            return exit::UNAVAILABLE;
        }
    };
    tokio::spawn(forward_signals(signals, stop_tx));
    match homelab_deploy_builder::run(config, stop_rx).await {
        Ok(()) => exit::OK,
        Err(err) => {
            error!(error = %err, "builder failed");
            eprintln!("error: {err}");
            exit::UNAVAILABLE
        }
    }
}

struct RunArgs {
    config: PathBuf,
    check: bool,
}

/// SIGTERM hands running requests back at once, so `systemctl restart` (a `nixos-rebuild
/// switch` that changed the config) never waits for a build; SIGINT drains first, as a person
/// at a terminal expects, and a second SIGINT hands back.
async fn forward_signals(
    (mut term, mut int): (tokio::signal::unix::Signal, tokio::signal::unix::Signal),
    stop: watch::Sender<Stop>,
) {
    let mut level = Stop::Running;
    while level != Stop::Abort {
        level = tokio::select! {
            _ = term.recv() => Stop::Abort,
            _ = int.recv() => if level == Stop::Running { Stop::Drain } else { Stop::Abort },
        };
        info!(?level, "signal received");
        let _ = stop.send(level);
    }
}
