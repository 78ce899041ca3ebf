//! `completions` and `man`: shell completion scripts and man pages generated from the clap
//! definitions, so they never drift from `--help`. The Nix package installs both.

use std::path::{Path, PathBuf};

use clap::{Args, CommandFactory};
use clap_complete::Shell;

use crate::error::{CliError, CliResult, Outcome};
use crate::Cli;

#[derive(Args)]
pub struct CompletionsArgs {
    /// Shell to write the completion script for.
    #[arg(value_enum)]
    shell: Shell,
}

#[derive(Args)]
pub struct ManArgs {
    /// Write `homelab-deploy.1` and one `homelab-deploy-<command>.1` per command into DIR,
    /// instead of printing the main page on stdout.
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
}

/// Prints the completion script for `args.shell` on stdout.
pub fn completions(args: CompletionsArgs) -> CliResult {
    let mut command = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "homelab-deploy", &mut script);
    let mut script = String::from_utf8_lossy(&script).into_owned();
    if args.shell == Shell::Bash {
        // clap_complete 4.6 spells the case labels of a hyphenated binary's subcommands
        // differently from the state its loop builds, so no subcommand's options complete
        // (clap-rs/clap#6421, #6529, unfixed in 4.6.12): spell them the loop's way.
        script = script.replace("homelab__subcmd__deploy", "homelab__deploy");
    }
    use std::io::Write;
    std::io::stdout()
        .write_all(script.as_bytes())
        .map_err(|err| {
            CliError::unavailable(format!("cannot write the completion script: {err}"))
        })?;
    Ok(Outcome::Done)
}

/// Prints the main man page, or writes every page into `--out-dir`.
pub fn man(args: ManArgs) -> CliResult {
    let command = Cli::command();
    let written = match &args.out_dir {
        None => clap_mangen::Man::new(command).render(&mut std::io::stdout()),
        Some(dir) => write_pages(command, dir),
    };
    written.map_err(|err| {
        let place = args
            .out_dir
            .map(|dir| dir.display().to_string())
            .unwrap_or_else(|| "stdout".to_owned());
        CliError::usage(format!("cannot write the man pages to {place}: {err}"))
    })?;
    Ok(Outcome::Done)
}

fn write_pages(command: clap::Command, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let command = command.name("homelab-deploy");
    for sub in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
        let name = format!("homelab-deploy-{}", sub.get_name());
        let page = sub.clone().name(name.clone()).bin_name(name.clone());
        let mut file = std::fs::File::create(dir.join(format!("{name}.1")))?;
        clap_mangen::Man::new(page).render(&mut file)?;
    }
    let mut file = std::fs::File::create(dir.join("homelab-deploy.1"))?;
    clap_mangen::Man::new(command).render(&mut file)
}
