//! `nkey generate` and `nkey public`: make NKey user seeds and show their public keys.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use homelab_deploy_credentials::{generate_seed_file, read_seed_file};

use crate::error::{CliError, CliResult, Outcome};

#[derive(Args)]
pub struct NkeyArgs {
    #[command(subcommand)]
    action: NkeyAction,
}

#[derive(Subcommand)]
enum NkeyAction {
    /// Write a new NKey user seed to FILE (mode 0600; never overwrites) and print its public
    /// key, for the nats-server config.
    Generate {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Print the public key of the user seed in FILE.
    Public {
        #[arg(long, value_name = "FILE")]
        seed_file: PathBuf,
    },
}

pub fn run(args: NkeyArgs) -> CliResult {
    let seed = match &args.action {
        NkeyAction::Generate { out } => generate_seed_file(out),
        NkeyAction::Public { seed_file } => read_seed_file(seed_file),
    };
    let public = seed
        .and_then(|seed| seed.public_key())
        .map_err(CliError::usage)?;
    println!("{public}");
    Ok(Outcome::Done)
}
