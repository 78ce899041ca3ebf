//! `homelab-deploy dashboard`: serve the read-only live web page (crates/dashboard).

use std::net::SocketAddr;

use clap::Args;
use homelab_deploy_dashboard::Limits;
use tokio::signal::unix::{signal, SignalKind};
use tracing::error;

use crate::error::{CliError, CliResult, Outcome};
use crate::nats::connect_client;
use crate::NatsArgs;

#[derive(Args)]
pub struct DashboardArgs {
    /// Address and port to serve the page on (plain HTTP; put a TLS proxy in front to expose it
    /// beyond the machine).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9974")]
    listen: SocketAddr,
    /// Most live pages (server-sent event streams) served at once; more get HTTP 503.
    #[arg(long, value_name = "N", default_value_t = 32,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    max_clients: u16,
    #[command(flatten)]
    nats: NatsArgs,
}

pub const AFTER_HELP: &str = "\
The page lists the fleet, the queue per repo and priority, running builds with a progress bar
per host, recent results and charts; /builds/<id> shows one build with its log following live.
It only reads NATS: a user with the read permissions of docs/security.md (\"viewer\") is enough.
Stops on SIGTERM or Ctrl-C.";

pub async fn run(args: DashboardArgs) -> CliResult {
    let client = connect_client(&args.nats, "dashboard").await?;
    let (mut term, mut int) = match (
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
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    let limits = Limits {
        sse_clients: usize::from(args.max_clients),
        ..Limits::default()
    };
    homelab_deploy_dashboard::serve(client, args.listen, limits, shutdown)
        .await
        .map_err(|err| {
            error!(error = %err, "dashboard failed");
            CliError::unavailable(err)
        })?;
    Ok(Outcome::Done)
}
