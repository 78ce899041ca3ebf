//! `watch` and `logs`: replay a request's events or log from any point, then follow it live.

use clap::Args;
use homelab_deploy_client::{EventStream, LogStream};
use homelab_deploy_protocol::{BuildStatus, EventBody};

use crate::error::{CliError, CliResult, Outcome};
use crate::nats::{connect_client, print_json, request_id};
use crate::progress::{print_result, Progress};
use crate::NatsArgs;

#[derive(Args)]
pub struct WatchArgs {
    /// Request id.
    id: String,
    /// Replay from this event `seq` (1 = from the start).
    #[arg(long, default_value_t = 1)]
    from_seq: u64,
    /// Print every event as one JSON line on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    nats: NatsArgs,
}

#[derive(Args)]
pub struct LogsArgs {
    /// Request id.
    id: String,
    /// Only this host's log.
    #[arg(long)]
    host: Option<String>,
    /// Start at this line number (per host, from 1).
    #[arg(long, default_value_t = 1)]
    from_line: u64,
    /// Keep following the log until the request finishes.
    #[arg(long)]
    follow: bool,
    /// Print each line as one JSON object on stdout: `{"host": H, "line": N, "text": T}`.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    nats: NatsArgs,
}

/// Replays the events from `--from-seq`, then follows until `finished`. Exit code as `build`.
pub async fn watch(args: WatchArgs) -> CliResult {
    let id = request_id(&args.id)?;
    let client = connect_client(&args.nats, "watch").await?;
    let js = async_nats::jetstream::new(client);
    let mut events = EventStream::open_by_id(&js, &id, args.from_seq).await?;
    let mut progress = (!args.json).then(|| Progress::watching(id.as_str()));
    while let Some(event) = events.next().await {
        let event = event?;
        match &mut progress {
            Some(progress) => progress.event(&event),
            None => print_json(&event),
        }
        if let EventBody::Finished { status, .. } = &event.body {
            if let Some(mut progress) = progress.take() {
                progress.clear();
                print_result(&event);
            }
            return Ok(if *status == BuildStatus::Succeeded {
                Outcome::Done
            } else {
                Outcome::BuildFailed
            });
        }
    }
    Err(CliError::unavailable(
        "the event subscription ended before the request finished",
    ))
}

/// Prints log lines (`host | line`); with `--follow`, until the request finishes.
pub async fn logs(args: LogsArgs) -> CliResult {
    let id = request_id(&args.id)?;
    let client = connect_client(&args.nats, "logs").await?;
    let js = async_nats::jetstream::new(client);
    let mut logs = LogStream::open_by_id(&js, &id).await?;
    let mut events = EventStream::open_by_id(&js, &id, 1).await?;
    let mut finished = false;
    let mut caught_up = false;
    let mut printed = 0u64;
    loop {
        // Without --follow: stop once caught up with what is stored. With it: once the request
        // finished and its last batch is printed.
        if caught_up && (!args.follow || finished) {
            break;
        }
        tokio::select! {
            batch = logs.next() => match batch {
                Some(Ok((batch, pending))) => {
                    caught_up = pending == 0;
                    if args.host.as_ref().is_some_and(|host| *host != batch.host) {
                        continue;
                    }
                    for (offset, line) in batch.lines.iter().enumerate() {
                        let number = batch.first_line + offset as u64;
                        if number >= args.from_line {
                            if args.json {
                                print_json(&serde_json::json!({"host": batch.host, "line": number, "text": line}));
                            } else {
                                println!("{} | {line}", batch.host);
                            }
                            printed += 1;
                        }
                    }
                }
                Some(Err(err)) => return Err(err.into()),
                None => break,
            },
            event = events.next(), if !finished => {
                finished = match event {
                    Some(Ok(event)) => matches!(event.body, EventBody::Finished { .. }),
                    Some(Err(err)) => return Err(err.into()),
                    None => true,
                };
                // Batches stored before `finished` may still be on their way: catch up again.
                if finished {
                    caught_up = false;
                }
            }
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)), if !caught_up => {
                // Nothing stored at all (yet): the stream has no batch to tell us we caught up.
                caught_up = true;
            }
        }
    }
    if printed == 0 {
        eprintln!(
            "no log lines for request {id}{}",
            args.host.map(|h| format!(" host {h}")).unwrap_or_default()
        );
    }
    Ok(Outcome::Done)
}
