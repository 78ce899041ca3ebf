//! `homelab-deploy builder`: run the daemon until SIGTERM or SIGINT, or as an ephemeral builder
//! until a session limit.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use homelab_deploy_builder::{Config, Session, SessionReport, Stop};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{error, info};

use homelab_deploy_client::control;
use homelab_deploy_protocol::api::check_builder_name;

use crate::error::{CliError, CliResult, Outcome};
use crate::nats::{connect_client, print_json};
use crate::NatsArgs;

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

Ephemeral builders (CI runners, on-demand units): --once, --max-builds, --idle-exit and
--lifetime bound a session; reaching one drains the builder (no new request, the running one
finishes). Such a builder may leave builder.name out and takes a unique one (HOSTNAME-NUID),
shows as ephemeral in `homelab-deploy builders`, keeps its state in STATE_DIR/sessions/NAME and
leaves no registry entry and no state behind. It shares the repo's durable consumer with the
fleet; it never creates one of its own. See \"Ephemeral builders\" in docs/operations.md.

Heavy lanes: the builder starts no request whose expected peak memory (learned from earlier
builds, at least the repo's expected_peak_mb) exceeds builder.memory_mb (default: the machine's
memory); it hands such a request back for a builder that fits, and fails it at once when no live
builder does, unless a lane of builder.lanes fits it: then it waits, up to its timeout, for an
autoscaler to start a builder of that lane. A repeat build of a host goes to the idle builder
that built it last (builder.warm_affinity). See \"Heavy lanes\" in docs/configuration.md.

Exit codes: 0 stopped cleanly (a session: every request it took succeeded, or it took none);
1 a session request it took finished failed or cancelled; 2 invalid config or flags; 3 nix
unusable, NATS or JetStream setup failed; 4 (--once only) no verdict: no request came before
--idle-exit, --lifetime or a signal, or the request was handed back (SIGTERM).";

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
    /// Take one request, build it and exit with its verdict (0 succeeded, 1 failed).
    #[arg(long, conflicts_with = "max_builds")]
    once: bool,
    /// Take at most N requests, finish them, then exit.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_builds: Option<u64>,
    /// Exit once no request has been running or taken for DURATION (90s, 10m, 1h), counted
    /// from when the builder is ready or its last request ended.
    #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration)]
    idle_exit: Option<Duration>,
    /// Take requests for DURATION after the builder is ready, then finish the running ones and
    /// exit.
    #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration)]
    lifetime: Option<Duration>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum BuilderAction {
    /// Ask a running builder to finish its current build, take no new one, and exit.
    Drain(DrainArgs),
    /// Create or update the streams and buckets of the builder config FILE with an admin
    /// credential, on a server where builders may not create them (nats/prod.example.conf).
    #[command(after_help = PROVISION_HELP)]
    Provision(ProvisionArgs),
}

const PROVISION_HELP: &str = "\
Creates BUILD_EVENTS and BUILD_REQUESTS (taking build.<repo>.* of every repo in the config,
besides the subjects it has) and the buckets BUILD_BUILDERS, BUILD_STATE and BUILD_PLACEMENT,
or sets existing
streams to the config's [streams] limits. Run it before the builders start, and again after
adding a repo or changing [streams]; on nats/prod.example.conf only the admin user may. Prints
one line per stream or bucket: created, updated or exists.

  homelab-deploy builder provision --config /etc/homelab-deploy/builder.toml \\
    --nkey-file /run/secrets/admin.nk --inbox-prefix _INBOX_admin

With [tenants.NAME] tables (nats/multi-tenant.example.conf), each tenant's account has its own
streams: provision each with --tenant NAME and the admin credential of that account, which
takes the tenant's repos and its max_queued:

  homelab-deploy builder provision --config /etc/homelab-deploy/builder.toml --tenant alpha \\
    --nkey-file /run/secrets/alpha-admin.nk --inbox-prefix _INBOX_admin

Exit codes: 0 done; 2 invalid config or flags; 3 NATS unreachable or a stream refused.";

#[derive(Args)]
pub struct ProvisionArgs {
    /// The builder config whose repos and [streams] limits to provision.
    #[arg(long, short, value_name = "FILE")]
    config: PathBuf,
    /// NKey seed of a user allowed to create and update the streams (the admin).
    #[arg(long, value_name = "FILE", required_unless_present = "creds_file")]
    nkey_file: Option<PathBuf>,
    /// Or a .creds file of such a user (operator mode).
    #[arg(long, value_name = "FILE", conflicts_with = "nkey_file")]
    creds_file: Option<PathBuf>,
    /// NATS server URL(s) [default: the config's nats.url].
    #[arg(long, env = "HOMELAB_DEPLOY_NATS_URL")]
    nats_url: Option<String>,
    /// The admin user's inbox prefix (e.g. _INBOX_admin), as for every client command.
    #[arg(long, env = "HOMELAB_DEPLOY_INBOX_PREFIX", value_name = "PREFIX")]
    inbox_prefix: Option<String>,
    /// Provision the account of tenant NAME (a [tenants.NAME] table of the config) with its
    /// repos and max_queued; the credential is that account's admin. Required when the config
    /// has tenants.
    #[arg(long, value_name = "NAME")]
    tenant: Option<String>,
}

/// The account `tenant` names in `config`: the single account without tenants, else one
/// tenant's. The error (a usage error) says what to pass instead.
fn provisioned_account(
    config: &Config,
    path: &std::path::Path,
    tenant: Option<&str>,
) -> Result<homelab_deploy_builder::config::Account, CliError> {
    let tenants = || {
        config
            .tenants
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    };
    let accounts = config.accounts();
    match tenant {
        // Without tenants, `accounts` is the single account of [nats].
        None if config.tenants.is_empty() => accounts
            .into_iter()
            .next()
            .ok_or_else(|| {
                CliError::usage(format!("config file {} serves no account", path.display()))
            }),
        None => Err(CliError::usage(format!(
            "config file {} has tenants ({}), each with its own streams in its own NATS account: provision each with --tenant NAME and the admin credential of that account",
            path.display(),
            tenants()
        ))),
        Some(_) if config.tenants.is_empty() => Err(CliError::usage(format!(
            "--tenant: config file {} has no [tenants.NAME] table; leave --tenant out",
            path.display()
        ))),
        Some(name) => accounts
            .into_iter()
            .find(|account| account.tenant.as_deref() == Some(name))
            .ok_or_else(|| {
                CliError::usage(format!(
                    "--tenant {name}: config file {} has no [tenants.{name}] table; its tenants: {}",
                    path.display(),
                    tenants()
                ))
            }),
    }
}

async fn provision(args: ProvisionArgs) -> CliResult {
    let config = Config::load(&args.config).map_err(CliError::usage)?;
    let account = provisioned_account(&config, &args.config, args.tenant.as_deref())?;
    if let Some(prefix) = args.inbox_prefix.as_deref() {
        homelab_deploy_client::check_inbox_prefix(prefix)
            .map_err(|err| CliError::usage(format!("--inbox-prefix: {err}")))?;
    }
    let settings = homelab_deploy_client::ConnectSettings {
        url: args
            .nats_url
            .map(Into::into)
            .unwrap_or_else(|| config.nats.url.clone()),
        nkey_file: args.nkey_file,
        creds_file: args.creds_file,
        inbox_prefix: args.inbox_prefix,
        name: "homelab-deploy builder provision".to_owned(),
        timeout: Duration::from_secs(5),
        vault: None,
    };
    let client = homelab_deploy_client::connect(&settings).await?;
    let js = async_nats::jetstream::new(client);
    let done = homelab_deploy_builder::provision::provision(&js, &account)
        .await
        .map_err(CliError::unavailable)?;
    for (name, outcome) in done {
        println!("{name}: {outcome}");
    }
    Ok(Outcome::Done)
}

#[derive(Args)]
pub struct DrainArgs {
    /// Name of the builder (as in `homelab-deploy builders`).
    name: String,
    /// Print the builder's answer as one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    nats: NatsArgs,
}

/// `builder drain NAME`: asks the builder over `build.api.>` to finish its build and exit.
async fn drain(args: DrainArgs) -> CliResult {
    check_builder_name(&args.name).map_err(CliError::usage)?;
    let client = connect_client(&args.nats, "builder drain").await?;
    let reply = control::drain(&client, &args.name).await?;
    if args.json {
        print_json(&reply);
    } else {
        println!("{}: {}", reply.builder, reply.message);
    }
    Ok(Outcome::Done)
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

pub async fn run(args: BuilderArgs) -> CliResult {
    let path = match (args.action, args.config) {
        (Some(BuilderAction::Drain(drain_args)), _) => return drain(drain_args).await,
        (Some(BuilderAction::Provision(args)), _) => return provision(args).await,
        (None, Some(path)) => path,
        (None, None) => {
            return Err(CliError::usage(
                "--config FILE is required to run a builder",
            ))
        }
    };
    let session = Session {
        max_builds: if args.once { Some(1) } else { args.max_builds },
        idle_exit: args.idle_exit,
        lifetime: args.lifetime,
    };
    let config = Config::load(&path).map_err(CliError::usage)?;
    if config.builder.name.is_none() && !session.is_ephemeral() {
        return Err(CliError::usage(format!(
            "config file {}: key `builder.name` is required, except for an ephemeral builder (--once, --max-builds, --idle-exit or --lifetime), which takes a generated one",
            path.display()
        )));
    }
    if args.check {
        println!(
            "config {} is valid: builder {}, repos {}",
            path.display(),
            config
                .builder
                .name
                .as_deref()
                .unwrap_or("(a generated name)"),
            config.repos.keys().cloned().collect::<Vec<_>>().join(", ")
        );
        return Ok(Outcome::Done);
    }
    let (stop_tx, stop_rx) = watch::channel(Stop::Running);
    let signals = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(err), _) | (_, Err(err)) => {
            return Err(CliError::unavailable(format!(
                "cannot install signal handlers: {err}"
            )))
        }
    };
    tokio::spawn(forward_signals(signals, stop_tx));
    // A builder may delete its readers' consumers on the events stream (docs/security.md).
    homelab_deploy_client::inspect::delete_reader_consumers();
    match homelab_deploy_builder::run(config, session, stop_rx).await {
        Ok(report) if session.is_ephemeral() => Ok(session_outcome(&report, args.once)),
        Ok(_) => Ok(Outcome::Done),
        Err(err) => {
            error!(error = %err, "builder failed");
            Err(CliError::unavailable(err))
        }
    }
}

/// How an ephemeral builder that stopped cleanly exits: a failed request it took makes it
/// [`Outcome::BuildFailed`], and `--once` without a verdict is [`Outcome::NoVerdict`]. (A
/// long-running builder exits 0: its builds' verdicts are the requesters' business, not
/// systemd's.)
fn session_outcome(report: &SessionReport, once: bool) -> Outcome {
    if report.failed > 0 {
        Outcome::BuildFailed
    } else if once && report.succeeded == 0 {
        Outcome::NoVerdict
    } else {
        Outcome::Done
    }
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
