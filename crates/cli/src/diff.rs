//! `diff REPO HOST [--from REV] [--to REV]`: the closure diff between two builds of a host that
//! a builder still holds. Each live builder serving the repo is asked
//! (`build.api.builder.<name>.diff`), since only the builder that keeps both builds' GC roots
//! can compare them.

use std::time::Duration;

use clap::Args;
use homelab_deploy_client::control::list_builders;
use homelab_deploy_protocol::api::{
    builder_diff_subject, ApiError, DiffQuery, DiffReply, HeldBuild,
};
use homelab_deploy_protocol::RepoName;

use crate::error::{CliError, CliResult, Outcome};
use crate::nats::{connect_client, print_json};
use crate::NatsArgs;

pub const AFTER_HELP: &str = "\
Builders keep the newest builder.closure_history (5) builds of each host; `diff` compares two of
them with `nix store diff-closures`. Without --to it takes the newest held build, without --from
the newest older one at another commit. Exit 0: diff shown; 1: a side is not held by any builder
(the message says which and lists the builds that are); 3: NATS or no builder reachable.";

/// How long one builder may take to answer (it runs `nix store diff-closures`).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Args)]
pub struct DiffArgs {
    /// Repo name, as configured on the builders.
    repo: String,
    /// Host name, as the flake spells it.
    host: String,
    /// Earlier build: its commit, or a prefix of at least 7 hex digits.
    #[arg(long, value_name = "REV")]
    from: Option<String>,
    /// Later build: its commit, or a prefix of at least 7 hex digits.
    #[arg(long, value_name = "REV")]
    to: Option<String>,
    /// Print the answering builder's reply as one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    nats: NatsArgs,
}

pub async fn run(args: DiffArgs) -> CliResult {
    RepoName::parse(&args.repo).map_err(CliError::usage)?;
    for rev in [&args.from, &args.to].into_iter().flatten() {
        if !(7..=40).contains(&rev.len()) || !rev.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CliError::usage(format!(
                "rev {rev:?} is not a commit: write 7 to 40 hex digits"
            )));
        }
    }
    let client = connect_client(&args.nats, "diff").await?;
    let js = async_nats::jetstream::new(client.clone());
    // Any failure to read the fleet is "out of reach" here, whatever the client error.
    let builders = list_builders(&js).await.map_err(CliError::unavailable)?;
    let names: Vec<String> = builders
        .into_iter()
        .filter(|b| b.repos.contains(&args.repo) && !b.lost)
        .map(|b| b.name)
        .collect();
    if names.is_empty() {
        return Err(CliError::unavailable(format!(
            "no live builder serves repo {}; the builds it held are out of reach",
            args.repo
        )));
    }
    let query = DiffQuery {
        repo: args.repo.clone(),
        host: args.host.clone(),
        from: args.from.clone(),
        to: args.to.clone(),
    };
    let body = serde_json::to_vec(&query).unwrap_or_default();
    let asks = names.iter().map(|name| {
        let client = client.clone();
        let body = body.clone();
        async move {
            let subject = builder_diff_subject(name);
            let answer =
                tokio::time::timeout(ANSWER_TIMEOUT, client.request(subject, body.into())).await;
            let reply = match answer {
                Err(_) => Err(format!("no answer within {}s", ANSWER_TIMEOUT.as_secs())),
                Ok(Err(err)) => Err(err.to_string()),
                Ok(Ok(message)) => {
                    serde_json::from_slice::<DiffReply>(&message.payload).map_err(|_| {
                        match serde_json::from_slice::<ApiError>(&message.payload) {
                            Ok(error) => error.error,
                            Err(err) => format!("unexpected answer: {err}"),
                        }
                    })
                }
            };
            (name.clone(), reply)
        }
    });
    let answers = futures::future::join_all(asks).await;
    let mut replies = Vec::new();
    for (name, reply) in answers {
        match reply {
            Ok(reply) => replies.push(reply),
            Err(err) => eprintln!("warning: builder {name}: {err}"),
        }
    }
    if replies.is_empty() {
        return Err(CliError::unavailable(format!(
            "no builder of repo {} answered",
            args.repo
        )));
    }
    // The builder holding both sides with the newest later build.
    let best = replies
        .iter()
        .filter(|r| r.diff.is_some())
        .max_by_key(|r| r.to.as_ref().map(|b| b.built_at));
    if let Some(reply) = best {
        if args.json {
            print_json(reply);
        } else {
            print_diff(&args, reply);
        }
        return Ok(Outcome::Done);
    }
    Err(CliError::Refused(missing_side(&args, &replies)))
}

fn short(rev: &str) -> &str {
    rev.get(..12).unwrap_or(rev)
}

fn print_diff(args: &DiffArgs, reply: &DiffReply) {
    let (Some(from), Some(to), Some(diff)) = (&reply.from, &reply.to, &reply.diff) else {
        return;
    };
    println!(
        "{} {}: rev {} → rev {} (builder {})",
        args.repo,
        args.host,
        short(&from.rev),
        short(&to.rev),
        reply.builder
    );
    println!("  {} → {}", from.out_path, to.out_path);
    let lines = diff.lines();
    if let Some((_, packages)) = lines.split_first() {
        println!("{}", diff.summary());
        for line in packages {
            println!("{line}");
        }
    }
    if let (Some(before), Some(after)) = (diff.size_before, diff.size_after) {
        println!("closure size: {before} → {after} bytes");
    }
}

/// Which side no builder holds, in words, with the builds that are held.
fn missing_side(args: &DiffArgs, replies: &[DiffReply]) -> String {
    let held: Vec<(&str, &HeldBuild)> = replies
        .iter()
        .flat_map(|r| r.held.iter().map(|b| (r.builder.as_str(), b)))
        .collect();
    let host = format!("host {} of repo {}", args.host, args.repo);
    if held.is_empty() {
        return format!(
            "no builder holds a build of {host}: it was never built or cached since closure diffs were on, or its builds were released"
        );
    }
    let listing = held
        .iter()
        .map(|(builder, b)| {
            format!(
                "rev {} on {builder} ({})",
                short(&b.rev),
                b.built_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let to_held = replies.iter().any(|r| r.to.is_some());
    let message = match (&args.to, &args.from, to_held) {
        (Some(to), _, false) => {
            format!("the build of {host} at rev {to} is gone: no builder holds it")
        }
        (_, Some(from), _) if replies.iter().all(|r| r.from.is_none()) => {
            format!("the build of {host} at rev {from} is gone: no builder holds it")
        }
        (_, Some(_), _) => {
            format!("no builder holds both builds of {host}: each side is on another builder")
        }
        (_, None, _) => {
            format!("no earlier build of {host} at another commit is held: nothing to compare with")
        }
    };
    format!("{message}; held: {listing}")
}
