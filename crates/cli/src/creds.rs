//! `creds mint`: short-lived NATS user credentials for one role (NATS decentralized auth).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use homelab_deploy_credentials::jwt::{mint, read_account_signing_key, write_creds_file, BUILDER};

use crate::error::{CliError, CliResult, Outcome};

pub const AFTER_HELP: &str = "\
The server must run in operator mode and trust the account (nats/operator.example.conf, made
with nsc; docs/security.md, \"Short-lived credentials\"). The creds file holds a fresh user seed
and a user JWT with the role's permissions (those of nats/prod.example.conf), signed by the
account signing key, that the server refuses after --ttl. Point the builder at it with
[nats] creds_file; it is read again at every reconnect, so re-minting it in place rotates it.

Example, in a CI job that runs an ephemeral builder for at most an hour:

  homelab-deploy creds mint --role builder --ttl 1h \\
    --account ADQ4...  --account-signing-key /run/secrets/deploy-account-sk \\
    --out \"$RUNNER_TEMP/builder.creds\"";

#[derive(Args)]
pub struct CredsArgs {
    #[command(subcommand)]
    action: CredsAction,
}

#[derive(Subcommand)]
enum CredsAction {
    /// Write a creds file (user JWT + seed, mode 0600) for ROLE that expires after --ttl.
    #[command(after_help = AFTER_HELP)]
    Mint(MintArgs),
}

#[derive(Args)]
struct MintArgs {
    /// The role whose permissions the credential carries.
    #[arg(long, value_enum)]
    role: Role,
    /// How long the credential is valid (90s, 30m, 1h; at most 30 days).
    #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration)]
    ttl: Duration,
    /// Public key of the account (`A…`, "Account ID" in `nsc describe account`).
    #[arg(long, value_name = "PUBKEY", env = "HOMELAB_DEPLOY_ACCOUNT")]
    account: String,
    /// File holding one of the account's signing keys (an account seed, `SA…`).
    #[arg(long, value_name = "FILE")]
    account_signing_key: PathBuf,
    /// Where to write the creds file (replaced atomically if it exists).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Name in the JWT, shown by the server (`nats server report connections`).
    #[arg(long, default_value = "homelab-deploy ephemeral builder")]
    name: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum Role {
    /// Takes requests and publishes their events: a builder.
    Builder,
}

pub fn run(args: CredsArgs) -> CliResult {
    let CredsAction::Mint(args) = args.action;
    let permissions = match args.role {
        Role::Builder => &BUILDER,
    };
    let minted = read_account_signing_key(&args.account_signing_key).and_then(|signing_key| {
        mint(
            permissions,
            args.account.trim(),
            &signing_key,
            &args.name,
            args.ttl,
        )
    });
    let minted = minted
        .and_then(|minted| write_creds_file(&args.out, &minted).map(|()| minted))
        .map_err(CliError::usage)?;
    let expires = time::OffsetDateTime::from_unix_timestamp(minted.expires_at as i64)
        .ok()
        .and_then(|at| {
            at.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| minted.expires_at.to_string());
    let user = minted.seed.public_key().unwrap_or_default();
    eprintln!(
        "wrote {}: user {user}, expires {expires}",
        args.out.display()
    );
    Ok(Outcome::Done)
}
