//! `homelab-deploy build REPO TARGET`: submit a request, show its progress, print the result.

use std::time::{Duration, Instant};

use clap::Args;
use homelab_deploy_client::control::{wait_for_finished, Seen, WaitEnd};
use homelab_deploy_client::{submit, SubmitOptions};
use homelab_deploy_protocol::request::{check_git_ref, check_rev};
use homelab_deploy_protocol::{BuildStatus, EventBody, Mode, Priority, RepoName, Target};

use crate::error::{CliError, CliResult, Outcome};
use crate::progress::{print_result, Progress};
use crate::NatsArgs;

pub const AFTER_HELP: &str = "\
Examples:
  homelab-deploy build nixos-servers ns1
  homelab-deploy build nixos-servers web.example.org
  homelab-deploy build nixos-servers --host all      # the host named `all`, not every host
  homelab-deploy build nixos-servers --all --json > result.json
  homelab-deploy build nixos-servers all --ref flake-update --timeout 30m
  id=$(homelab-deploy build nixos-servers all --no-wait)
  homelab-deploy build nixos-servers all --rev $SHA --json --junit hosts.xml --timeout 1h

Progress goes to stderr; the result table (or with --json, exactly the `finished` event as one
JSON object) goes to stdout.

Exit codes:
  0  every host built or cached
  1  the build finished failed or cancelled, or was refused (unknown host, ref or rev)
  2  usage error (bad arguments, invalid repo or target names)
  3  could not reach NATS, no builder serves the repo, or timed out";

#[derive(Args)]
pub struct BuildArgs {
    /// Repo to build, as named in the builders' config ([repos.NAME]).
    repo: String,
    /// Host to build, as the flake spells it in nixosConfigurations (any name: web.example.org
    /// too), or `all`.
    #[arg(required_unless_present_any = ["all", "host"])]
    target: Option<String>,
    /// Build every host; the same as the target `all`.
    #[arg(long, conflicts_with = "host")]
    all: bool,
    /// Build the host named NAME, even one named `all` (instead of the TARGET argument).
    #[arg(long, value_name = "NAME", conflicts_with = "target")]
    host: Option<String>,
    /// Branch or tag to build instead of the repo's configured ref.
    #[arg(long = "ref", value_name = "REF", conflicts_with = "rev")]
    git_ref: Option<String>,
    /// Exact commit to build (7 to 40 hex digits).
    #[arg(long, value_name = "COMMIT")]
    rev: Option<String>,
    /// Give up waiting after this long (exit 3); the build itself goes on. E.g. 90s, 30m, 3h.
    #[arg(long, value_name = "DURATION", default_value = "3h", value_parser = crate::parse_duration)]
    timeout: Duration,
    /// Print exactly the `finished` event as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Print the request id and exit once the request is safely in the queue.
    #[arg(long)]
    no_wait: bool,
    /// No progress on stderr (for timers): only the result, and the exit code.
    #[arg(long, short)]
    quiet: bool,
    /// Also write the result as a JUnit XML report (one test case per host) to FILE, for CI.
    #[arg(long, value_name = "FILE")]
    junit: Option<std::path::PathBuf>,
    /// `enqueue`: wait in line behind other requests for the same target. `replace`: cancel
    /// them (queued or running); the newest `replace` request wins.
    #[arg(long, value_enum, default_value_t = ModeArg::Enqueue)]
    mode: ModeArg,
    /// Queue class: interactive (people, the default) before ci before scheduled (timers).
    #[arg(long, value_enum, default_value_t = PriorityArg::Interactive)]
    priority: PriorityArg,
    /// Time limit per host on the builder, instead of its default (within its maximum); whole
    /// seconds, e.g. 20m.
    #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration)]
    host_timeout: Option<Duration>,
    /// Time limit of the whole build on the builder, instead of its default (within its
    /// maximum); whole seconds, e.g. 2h.
    #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration)]
    build_timeout: Option<Duration>,
    #[command(flatten)]
    nats: NatsArgs,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PriorityArg {
    Interactive,
    Ci,
    Scheduled,
}

impl From<PriorityArg> for Priority {
    fn from(priority: PriorityArg) -> Self {
        match priority {
            PriorityArg::Interactive => Priority::Interactive,
            PriorityArg::Ci => Priority::Ci,
            PriorityArg::Scheduled => Priority::Scheduled,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ModeArg {
    Enqueue,
    Replace,
}

impl From<ModeArg> for Mode {
    fn from(mode: ModeArg) -> Self {
        match mode {
            ModeArg::Enqueue => Mode::Enqueue,
            ModeArg::Replace => Mode::Replace,
        }
    }
}

pub async fn run(args: BuildArgs) -> CliResult {
    let repo = RepoName::parse(&args.repo).map_err(CliError::usage)?;
    let target = match (args.all, args.target.as_deref(), args.host.as_deref()) {
        (_, _, Some(host)) => Target::host(host),
        (true, None | Some("all"), None) => Ok(Target::All),
        (true, Some(other), None) => {
            return Err(CliError::usage(format!(
                "--all builds every host; drop the target {other:?} or --all"
            )))
        }
        (false, Some(target), None) => Target::parse(target),
        (false, None, None) => return Err(CliError::usage("name a target host, or `all`")),
    };
    let target = target.map_err(CliError::usage)?;
    if let Some(git_ref) = args.git_ref.as_deref() {
        check_git_ref(git_ref).map_err(CliError::usage)?;
    }
    if let Some(rev) = args.rev.as_deref() {
        check_rev(rev).map_err(CliError::usage)?;
    }

    let (client, signer) = crate::nats::connect_signing(&args.nats, "build").await?;
    let options = SubmitOptions {
        requested_by: Some(requested_by()),
        git_ref: args.git_ref,
        rev: args.rev,
        mode: args.mode.into(),
        host_timeout_secs: args.host_timeout.map(whole_seconds),
        timeout_secs: args.build_timeout.map(whole_seconds),
        priority: args.priority.into(),
        signer,
    };
    let mut submission = submit(&client, &repo, &target, options).await?;
    if args.no_wait {
        println!("{}", submission.id);
        return Ok(Outcome::Done);
    }

    let mut progress = Progress::new(&submission.subject, submission.id.as_str(), args.quiet);
    let deadline = tokio::time::Instant::now() + args.timeout;
    let waiting_since = Instant::now();
    let waited = wait_for_finished(
        &mut submission.events,
        deadline,
        Duration::from_secs(1),
        |seen| match seen {
            Seen::Event(event) => progress.event(event),
            Seen::Tick => progress.tick(waiting_since.elapsed()),
        },
    )
    .await;
    progress.clear();
    let finished = match waited {
        Ok(finished) => finished,
        Err(WaitEnd::TimedOut) => {
            return Err(CliError::unavailable(format!(
                "timed out after {} waiting for request {}; the build goes on (see its events on build.responses.{}.{}.{}.events)",
                humantime::format_duration(args.timeout), submission.id, repo, target.token(), submission.id
            )));
        }
        Err(WaitEnd::Failed(err)) => return Err(err.into()),
        Err(WaitEnd::Closed) => {
            return Err(CliError::unavailable(
                "the event subscription ended before the build finished (NATS connection lost?)",
            ));
        }
    };
    if let Some(path) = &args.junit {
        let xml = crate::junit::report(&finished).unwrap_or_default();
        if let Err(err) = std::fs::write(path, xml) {
            eprintln!(
                "error: cannot write the JUnit report to {}: {err}",
                path.display()
            );
        }
    }
    if args.json {
        match serde_json::to_string(&finished) {
            Ok(json) => println!("{json}"),
            Err(err) => eprintln!("error: cannot encode the result as JSON: {err}"),
        }
    } else {
        print_result(&finished);
    }
    match finished.body {
        EventBody::Finished {
            status: BuildStatus::Succeeded,
            ..
        } => Ok(Outcome::Done),
        _ => Ok(Outcome::BuildFailed),
    }
}

/// `user@host` of whoever runs the CLI, for the builder's logs and events.
pub fn requested_by() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|host| host.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    let by: String = format!("{user}@{host}")
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    by
}

/// The builder takes time limits in whole seconds; a sub-second rest is dropped, never to zero.
fn whole_seconds(duration: Duration) -> u64 {
    duration.as_secs().max(1)
}
