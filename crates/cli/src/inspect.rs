//! `status`, `builds` and `builders`: the state of requests and of the fleet, read from
//! JetStream (works even when no builder is running).

use clap::Args;
use homelab_deploy_client::control::{list_builders, list_builds, status as request_status};
use homelab_deploy_protocol::api::{BuildsQuery, RequestPhase, RequestState};
use homelab_deploy_protocol::{group_failures, PROTOCOL_VERSION};
use time::OffsetDateTime;

use crate::error::{CliError, CliResult, Outcome};
use crate::nats::{connect_client, print_json, request_id};
use crate::NatsArgs;

#[derive(Args)]
pub struct StatusArgs {
    /// Request id (printed by `build --no-wait` and at the start of `build`).
    id: String,
    /// Print the state as one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    nats: NatsArgs,
}

#[derive(Args)]
pub struct BuildsArgs {
    /// Only requests of this repo.
    #[arg(long)]
    repo: Option<String>,
    /// Only requests in this state: queued, running, succeeded, failed, cancelled.
    #[arg(long, value_parser = parse_phase)]
    state: Option<RequestPhase>,
    /// At most this many requests, newest first.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Continue after an earlier page: the cursor printed at its end (`next_cursor` in JSON).
    #[arg(long)]
    cursor: Option<String>,
    /// Print the list as one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    nats: NatsArgs,
}

#[derive(Args)]
pub struct BuildersArgs {
    /// Print the fleet as one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    nats: NatsArgs,
}

fn parse_phase(value: &str) -> Result<RequestPhase, String> {
    RequestPhase::parse(value).ok_or_else(|| {
        format!("{value:?} is not one of queued, running, succeeded, failed, cancelled")
    })
}

pub async fn status(args: StatusArgs) -> CliResult {
    let id = request_id(&args.id)?;
    let client = connect_client(&args.nats, "status").await?;
    let js = async_nats::jetstream::new(client);
    let state = request_status(&js, &id).await?.ok_or_else(|| {
        CliError::Refused(format!(
            "no request with id {id} (never sent, or its events expired)"
        ))
    })?;
    if args.json {
        print_json(&state);
    } else {
        print_state(&state);
    }
    Ok(Outcome::Done)
}

fn print_state(state: &RequestState) {
    let mut phase = state.phase.as_str().to_owned();
    if let Some(position) = state.queue_position {
        phase.push_str(&format!(
            " (position {position} in the {} queue)",
            state.repo
        ));
    }
    println!("request   {}", state.id);
    println!("state     {phase}");
    println!("repo      {} {}", state.repo, state.target);
    if let Some(rev) = &state.rev {
        println!("rev       {rev}");
    }
    if let Some(builder) = &state.builder {
        println!("builder   {builder}");
    }
    if let Some(by) = &state.requested_by {
        println!("by        {by}");
    }
    if let Some(key) = &state.requested_by_key {
        println!("signed by {key}");
    }
    println!("queued    {}", rfc3339(state.queued_at));
    if let Some(at) = state.started_at {
        println!("started   {}", rfc3339(at));
    }
    if let Some(at) = state.finished_at {
        println!("finished  {}", rfc3339(at));
    }
    let h = &state.hosts;
    println!(
        "hosts     {} total, {} done ({} built, {} cached, {} failed, {} cancelled), {} running, {} queued",
        h.total, h.done, h.built, h.cached, h.failed, h.cancelled, h.running, h.queued
    );
    if let Some(host) = &state.current_host {
        let d = &state.derivations;
        println!(
            "current   {host}: {}/{} derivations, {} running, {} failed",
            d.done, d.expected, d.running, d.failed
        );
    }
    if let Some(error) = &state.error {
        match state.code {
            Some(code) => println!("error     {code}: {error}"),
            None => println!("error     {error}"),
        }
    }
    if let Some(subject) = &state.events_subject {
        println!("events    {subject}");
    }
    if let Some(subject) = &state.logs_subject {
        println!("logs      {subject}");
    }
    let groups = group_failures(
        state
            .host_results
            .iter()
            .map(|h| (h.name.as_str(), h.status, h.error.as_deref())),
    );
    for group in groups.iter().take(STATUS_GROUPS_SHOWN) {
        let mut names = group
            .hosts
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if group.hosts.len() > 5 {
            names.push_str(&format!(" and {} more", group.hosts.len() - 5));
        }
        let last = group.error.lines().last().unwrap_or_default();
        println!(
            "failed    {} {names}: {}",
            group.status.as_str(),
            last.chars().take(160).collect::<String>()
        );
    }
    if groups.len() > STATUS_GROUPS_SHOWN {
        println!(
            "failed    … {} more distinct errors (status --json lists every host)",
            groups.len() - STATUS_GROUPS_SHOWN
        );
    }
    if let Some(group) = groups.first() {
        println!(
            "log       homelab-deploy logs {} --host {}",
            state.id, group.hosts[0]
        );
    }
}

/// Groups of identical host errors `status` shows, one line each.
const STATUS_GROUPS_SHOWN: usize = 5;

pub async fn builds(args: BuildsArgs) -> CliResult {
    let client = connect_client(&args.nats, "builds").await?;
    let js = async_nats::jetstream::new(client);
    let query = BuildsQuery {
        repo: args.repo,
        phase: args.state,
        limit: Some(args.limit),
        cursor: args.cursor,
    };
    let list = list_builds(&js, &query).await?;
    if args.json {
        print_json(&list);
        return Ok(Outcome::Done);
    }
    if list.builds.is_empty() {
        eprintln!("no requests");
        return Ok(Outcome::Done);
    }
    println!(
        "{:<24}  {:<26}  {:<10}  {:<16}  {:<20}  HOSTS",
        "ID", "REPO TARGET", "STATE", "BUILDER", "QUEUED"
    );
    for build in &list.builds {
        let state = match build.queue_position {
            Some(position) => format!("queued #{position}"),
            None => build.phase.as_str().to_owned(),
        };
        println!(
            "{:<24}  {:<26}  {:<10}  {:<16}  {:<20}  {}/{}",
            build.id,
            format!("{} {}", build.repo, build.target),
            state,
            build.builder.as_deref().unwrap_or("-"),
            rfc3339(build.queued_at),
            build.hosts.done,
            build.hosts.total
        );
    }
    if let Some(cursor) = &list.next_cursor {
        eprintln!("more: homelab-deploy builds --cursor {cursor}");
    }
    Ok(Outcome::Done)
}

pub async fn builders(args: BuildersArgs) -> CliResult {
    let client = connect_client(&args.nats, "builders").await?;
    let js = async_nats::jetstream::new(client);
    let builders = list_builders(&js).await?;
    if args.json {
        print_json(&homelab_deploy_protocol::api::BuilderList { builders });
        return Ok(Outcome::Done);
    }
    if builders.is_empty() {
        eprintln!("no builder has announced itself");
        return Ok(Outcome::Done);
    }
    println!(
        "{:<20}  {:<8}  {:<40}  {:<10}  {:<9}  REPOS",
        "NAME", "VERSION", "STATE", "HEARTBEAT", "MEMORY"
    );
    for builder in &builders {
        let age = builder.heartbeat_age_secs;
        let state = if builder.lost {
            "lost".to_owned()
        } else {
            builder
                .states
                .iter()
                .map(|state| match state {
                    homelab_deploy_protocol::api::BuilderState::Building { repo, target, id } => {
                        format!("building {repo} {target} {id}")
                    }
                    other => other.label().to_owned(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let name = if builder.ephemeral {
            format!("{} (ephemeral)", builder.name)
        } else {
            builder.name.clone()
        };
        let memory = builder
            .memory_mb
            .map_or_else(|| "-".to_owned(), |mb| format!("{mb} MiB"));
        println!(
            "{:<20}  {:<8}  {:<40}  {:<10}  {:<9}  {}",
            name,
            builder.version,
            state,
            format!("{age}s ago"),
            memory,
            builder.repos.join(", ")
        );
        if let Some(error) = &builder.vault_error {
            println!("  vault: {error}");
        }
        if builder.protocol_version != PROTOCOL_VERSION {
            println!(
                "  protocol: version {}, but this homelab-deploy speaks version {PROTOCOL_VERSION}: upgrade the older side (docs/operations.md, Upgrading)",
                builder.protocol_version
            );
        }
    }
    Ok(Outcome::Done)
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.replace_nanosecond(0)
        .unwrap_or(at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
