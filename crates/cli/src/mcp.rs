//! `homelab-deploy mcp`: the MCP server an AI assistant launches (stdio).

use std::time::Duration;

use clap::Args;
use homelab_deploy_client::ConnectSettings;

use crate::error::{CliError, CliResult, Outcome};
use crate::NatsArgs;

#[derive(Args)]
pub struct McpArgs {
    /// Also offer the `build` and `cancel_build` tools (otherwise the server is read-only).
    #[arg(long)]
    enable_builds: bool,
    #[command(flatten)]
    nats: NatsArgs,
}

pub const AFTER_HELP: &str = "\
In an assistant's .mcp.json:

  { \"mcpServers\": { \"homelab-deploy\": {
      \"command\": \"homelab-deploy\",
      \"args\": [\"mcp\", \"--enable-builds\", \"--nats-url\", \"nats://nats1.home.example:4222\"] } } }

Tools: list_repos_and_hosts, list_builders, list_builds, build_status, build_logs; with
--enable-builds also build and cancel_build. stdout carries the protocol; logs go to stderr.";

pub async fn run(args: McpArgs) -> CliResult {
    let resolved = crate::settings::resolve(&args.nats).map_err(CliError::usage)?;
    let settings = ConnectSettings {
        url: resolved.nats_url.into(),
        nkey_file: resolved.nkey_file,
        inbox_prefix: resolved.inbox_prefix,
        creds_file: None,
        name: "homelab-deploy mcp".to_owned(),
        timeout: Duration::from_secs(3),
        vault: None,
    };
    homelab_deploy_mcp::serve_stdio(settings, args.enable_builds)
        .await
        .map_err(CliError::unavailable)?;
    Ok(Outcome::Done)
}
