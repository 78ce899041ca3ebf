//! `cargo run --release -p bench -- [--quick] [--write FILE] [SCENARIO…]`
//!
//! Runs the benchmarks against `target/release/homelab-deploy` (or `$HOMELAB_DEPLOY_BIN`) and
//! prints a markdown table; `--write` also writes it, with the machine and the date, to FILE.

use std::time::Duration;

use anyhow::{Context, Result};
use bench::Report;

const SCENARIOS: [&str; 9] = [
    "eval-heavy",
    "dispatch",
    "queue",
    "log-flood",
    "idle",
    "read-model",
    "affinity",
    "lanes",
    "autoscaling",
];

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let write = args
        .iter()
        .position(|a| a == "--write")
        .and_then(|i| args.get(i + 1).cloned());
    let chosen: Vec<&str> = SCENARIOS
        .iter()
        .copied()
        .filter(|s| args.iter().any(|a| a == s))
        .collect();
    let chosen = if chosen.is_empty() {
        SCENARIOS.to_vec()
    } else {
        chosen
    };
    let bin = bench::default_bin();
    anyhow::ensure!(
        bin.exists(),
        "{} not found: run `cargo build --release --bin homelab-deploy` first",
        bin.display()
    );

    let mut reports: Vec<Report> = Vec::new();
    for scenario in chosen {
        eprintln!("running {scenario}…");
        if scenario == "read-model" {
            let (histories, queued, samples): (&[usize], usize, usize) = if quick {
                (&[50, 200, 500], 100, 20)
            } else {
                (&[500, 5_000, 50_000], 1_000, 200)
            };
            for timing in [bench::HistoryTiming::Burst, bench::HistoryTiming::Spread] {
                for report in bench::read_model(&bin, histories, queued, samples, timing)
                    .await
                    .with_context(|| format!("benchmark read-model ({timing:?} history)"))?
                {
                    eprintln!("{}", report.markdown_row());
                    reports.push(report);
                }
            }
            continue;
        }
        if scenario == "autoscaling" {
            let (samples, queued) = if quick { (3, 3) } else { (30, 10) };
            for report in bench::autoscaling(&bin, samples, queued)
                .await
                .context("benchmark autoscaling")?
            {
                eprintln!("{}", report.markdown_row());
                reports.push(report);
            }
            continue;
        }
        let report = match scenario {
            "eval-heavy" => bench::eval_heavy(&bin),
            "dispatch" => bench::dispatch_overhead(&bin, if quick { 3 } else { 20 }),
            "queue" => bench::queue_throughput(&bin, if quick { 20 } else { 1000 }).await,
            "log-flood" => bench::log_flood(&bin, if quick { 100_000 } else { 2_840_000 }),
            "affinity" => bench::affinity(&bin, if quick { 4 } else { 30 }).await,
            "lanes" => bench::lanes(&bin, if quick { 3 } else { 20 }).await,
            _ => bench::idle(&bin, Duration::from_secs(if quick { 3 } else { 60 })),
        }
        .with_context(|| format!("benchmark {scenario}"))?;
        eprintln!("{}", report.markdown_row());
        reports.push(report);
    }
    let table = table(&reports);
    println!("{table}");
    if let Some(path) = write {
        std::fs::write(&path, document(&table, &args))
            .with_context(|| format!("writing {path}"))?;
        eprintln!("wrote {path}");
    }
    Ok(())
}

fn table(reports: &[Report]) -> String {
    let mut out = String::from("| benchmark | homelab-deploy | baseline (same run) | ratio | goal | notes |\n| --- | --- | --- | --- | --- | --- |\n");
    for report in reports {
        out.push_str(&report.markdown_row());
        out.push('\n');
    }
    out
}

/// How to read the table; part of every docs/benchmarks.md this writes.
const READING: &str = "## Reading the results

- **eval-heavy**: the win comes from evaluating all 16 hosts in one `nix eval` (the shared module
  is evaluated once) instead of once per host; peak evaluator memory stays that of one host's
  evaluation here because the hosts share nearly everything. Goal met.
- **dispatch overhead**: the baseline is a repeated `nix build` of the same flake attribute, which
  Nix answers from its evaluation cache in a few tens of milliseconds. homelab-deploy remembers,
  per commit, what it evaluated and the output each `.drv` was built to; while the builder's own
  GC root for the host still points at that output, nix cannot have collected it, so a repeat
  build costs a git fetch and the NATS round trips, and starts no nix process at all. (When the
  root has moved on, because another commit of that host was built since, the builder asks nix:
  one `nix build` of the `.drv`, about what the baseline costs.)
- **queue**: requests are dispatched to a free builder within milliseconds (p99 far below 1 s).
  Repeat builds of a cached host start no nix process (see dispatch), so the queue drains faster
  than the baseline of `nix build`s in a row.
- **log flood**: the builder keeps ~20 MiB resident however much a build prints; log delivery runs
  at nix's own logging speed.
- **idle**: a builder without work uses no CPU to speak of and about as much memory as the
  nats-server beside it; most of that is the binary's own code pages (the release profile uses
  LTO to keep them few).
- **read model**: `status` and `builds` read the `BUILD_STATE` bucket (docs/decisions/read-model.md),
  so their cost does not follow the history: each row compares the largest history with the
  smallest, in the same run, with the same 1,000 requests queued for a repo no builder serves.
  `status` of a finished request is one bucket read; of a queued one, and `builds`, read the
  queue (parallel gets, bounded by `streams.max_pending_requests`), which is what they cost here;
  `builds` reads besides a few dozen slots of the finished-request index and one state per build
  listed (its first page is checked to be the 20 newest requests). The calls are the client
  library's (`request_state`, `list_builds`), which the CLI, the MCP server and the builders'
  control API all use. History: finished one-host requests whose events are stored as a builder
  stores them, either all within a few seconds (one burst) or 12 s apart, the newest now (over a
  week); a builder then rebuilds the bucket and its index from them at start.
- **warm-cache affinity**: two idle builders, repeat builds of one host at a new commit each.
  Without the preference the request goes to whichever builder's pull waits longest, which is
  usually the one that did *not* just build (its pull is the older one); with it, the builder that
  pulled it hands it back when the registry shows the warm builder idle (a plain NAK, redelivered
  at once to the warm builder's waiting pull; 250 ms apart after the 2nd delivery), and the warm
  builder takes it. The added latency is that hand-back; it is bounded (4 deliveries, about a
  second) whatever the registry says.
- **heavy lanes**: once the fleet has measured the heavy host, every heavy request starts on the
  big builder, also when the small one pulled it first: it hands it back with a plain NAK while the
  registry shows the big builder idle, which the big builder's waiting pull gets at once (1 s
  apart only while the big builder is busy, or after the 2nd delivery). With no live builder big
  enough the request is refused as soon as a builder pulls it (or, with `builder.lanes`, waits for
  a builder of a lane that fits, up to its timeout).
- **autoscaling**: an ephemeral `builder --once` started when a request is stored, against an
  idle long-running builder: the session's start (connect, consumer bind, a clone into a fresh
  state directory) is what an autoscaler adds to a request's dispatch; after its `finished` it
  exits and leaves the registry. `/jsz` shows the queue as soon as it is stored;
  `homelab_deploy_lane_requests` follows within the builder's 5 s sampling tick.

## Evaluation under a memory limit

`builder.eval_memory_limit_mb` is a kernel limit (`RLIMIT_DATA`) on every evaluation, and
evaluations run one at a time, so it bounds what evaluation uses at once; the peak below is the
kernel's `ru_maxrss`. Measured on the eval-heavy fleet with the commands the builder runs
(`nix eval` of all 16 hosts under `prlimit --data`, `GC_INITIAL_HEAP_SIZE` as the builder sets
it), on the same 2-core machine under a load average of 12 from parallel test runs, 2026-11-29:

| limit | shared evaluation of 16 hosts | per-host loop of `nix eval` (no limit) |
| --- | --- | --- |
| 8192 MiB (default) | 5.65 s, peak 266 MiB | 106.8 s, peak 266 MiB |
| 300 MiB | 5.17 s, peak 224 MiB | |
| 200 MiB | stopped at 4.23 s, peak 206 MiB; each host alone then stops at 206 MiB (4.7 s): all `eval_failed`, about 80 s in all | |

A batch that runs out of memory is not halved (that would evaluate the shared part again at
every level): its hosts go to the per-host loop, so splitting costs the loop plus the one stopped
attempt, and memory never exceeds the limit. `eval::memory_limit_splits_the_evaluation` checks
the split with the `evalhungry` fixture (hosts that fit alone, a batch that does not, a host that
never fits).
";

fn document(table: &str, args: &[String]) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let memory = {
        use procfs::Current;
        procfs::Meminfo::current().map_or(0, |info| info.mem_total) / (1024 * 1024 * 1024)
    };
    let nix = std::process::Command::new("nix")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let date = time::OffsetDateTime::now_utc().date();
    format!(
        "# Benchmarks\n\nEach benchmark measures homelab-deploy and a baseline in the same run on the same machine\nand reports the ratio. Reproduce with:\n\n```sh\n{}\n```\n\nMachine: {cpu}, {cores} cores, {memory} GiB RAM; {nix}. Date: {date}.\n\n{table}\n{READING}\nWhat each one does is described in `crates/bench/src/lib.rs`; the light ones also run in the\ntest suite at smoke size (`bench_smoke` tests), without asserting on timings.\n",
        std::iter::once("./scripts/bench".to_owned())
            .chain(args.iter().filter(|a| *a != "--write" && !a.ends_with(".md")).cloned())
            .collect::<Vec<_>>()
            .join(" ")
    )
}
