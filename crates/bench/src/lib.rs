//! Benchmarks: each scenario measures homelab-deploy and a baseline in the same run, on the same
//! machine, and reports the ratio. `scripts/bench` runs them at full size and writes
//! `docs/benchmarks.md`; the test suite runs the light ones at smoke size without asserting on
//! timings.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use homelab_deploy_client::{connect, ConnectSettings};
use homelab_deploy_protocol::{Event, EventBody};
use test_support::{
    process_peak_rss, process_rss, run_cli, Builder, FixtureRepo, NatsServer, NIX_CONFIG,
};

/// One benchmark's result, as a row of `docs/benchmarks.md`.
#[derive(Debug, Clone)]
pub struct Report {
    pub name: &'static str,
    pub measured: String,
    pub baseline: String,
    /// homelab-deploy ÷ baseline (lower is better unless `higher_is_better`).
    pub ratio: f64,
    pub goal: &'static str,
    pub notes: String,
}

impl Report {
    pub fn markdown_row(&self) -> String {
        format!(
            "| {} | {} | {} | {:.2} | {} | {} |",
            self.name, self.measured, self.baseline, self.ratio, self.goal, self.notes
        )
    }
}

fn seconds(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values.get(values.len() / 2).copied().unwrap_or_default()
}

fn percentile(values: &mut [Duration], p: f64) -> Duration {
    values.sort();
    let index = ((values.len() as f64 - 1.0) * p).round() as usize;
    values.get(index).copied().unwrap_or_default()
}

/// `nix build` of a flake attribute, as a user would type it; returns wall time.
fn direct_nix_build(flake: &str, attr: &str) -> Result<Duration> {
    let started = Instant::now();
    let status = Command::new("nix")
        .args(["build", "--no-link", &format!("{flake}#{attr}")])
        .env("NIX_CONFIG", NIX_CONFIG)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running nix build")?;
    if !status.success() {
        bail!("nix build {flake}#{attr} failed");
    }
    Ok(started.elapsed())
}

fn toplevel(host: &str) -> String {
    format!("nixosConfigurations.{host}.config.system.build.toplevel")
}

fn flake_at(repo: &FixtureRepo, rev: &str) -> String {
    format!("git+file://{}?rev={rev}", repo.path().display())
}

/// Runs `nix build` of `attr` while polling its peak RSS; returns (wall time, peak RSS bytes).
fn direct_nix_build_measured(flake: &str, attr: &str) -> Result<(Duration, u64)> {
    let started = Instant::now();
    let mut child = Command::new("nix")
        .args(["build", "--no-link", &format!("{flake}#{attr}")])
        .env("NIX_CONFIG", NIX_CONFIG)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("running nix build")?;
    let mut peak = 0;
    loop {
        peak = peak.max(process_peak_rss(child.id()));
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("nix build {flake}#{attr} failed");
            }
            return Ok((started.elapsed(), peak));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Commits a new `nonce.nix` (named after `label`), so every derivation of the fixture is new;
/// returns the commit.
fn new_nonce(repo: &FixtureRepo, label: &str) -> String {
    repo.commit_file("nonce.nix", &format!("\"{}\"", test_support::unique(label)))
}

/// Runs `homelab-deploy ARGS` against `nats_url`; an error naming `what` when it exits non-zero.
fn cli_ok(
    bin: &Path,
    nats_url: &str,
    args: &[&str],
    timeout: Duration,
    what: &str,
) -> Result<std::process::Output> {
    let output = run_cli(bin, nats_url, args, timeout);
    if output.status.code() != Some(0) {
        bail!("{what} failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(output)
}

/// CPU time (user + system) a process has used; zero when it is gone.
fn cpu_time(pid: u32) -> Duration {
    let ticks = i32::try_from(pid)
        .ok()
        .and_then(|pid| procfs::process::Process::new(pid).ok()?.stat().ok())
        .map_or(0, |stat| stat.utime + stat.stime);
    Duration::from_secs_f64(ticks as f64 / procfs::ticks_per_second() as f64)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The toplevel of every host of a 16-host fleet whose hosts share ~1 s of evaluation, on a
/// fresh commit: homelab-deploy `all` vs a shell loop of `nix build` per host.
pub fn eval_heavy(bin: &Path) -> Result<Report> {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("evalheavy");
    let builder = Builder::start(bin, &nats.url, &[("demo", repo.url())]);
    let hosts: Vec<String> = (1..=16).map(|i| format!("host-{i:02}")).collect();

    let baseline_rev = new_nonce(&repo, "baseline");
    let flake = flake_at(&repo, &baseline_rev);
    let started = Instant::now();
    let mut baseline_peak = 0;
    for host in &hosts {
        let (_, peak) = direct_nix_build_measured(&flake, &toplevel(host))?;
        baseline_peak = baseline_peak.max(peak);
    }
    let baseline = started.elapsed();

    let rev = new_nonce(&repo, "measured");
    let started = Instant::now();
    cli_ok(
        bin,
        &nats.url,
        &["build", "demo", "all", "--rev", &rev, "--json"],
        Duration::from_secs(3600),
        "homelab-deploy build",
    )?;
    let measured = started.elapsed();
    let log = builder.log();
    let peak_line = log
        .lines()
        .rev()
        .find(|l| l.contains("shared evaluation done"))
        .unwrap_or("");
    let peak_mb = peak_line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("peak_evaluator_rss_mb="))
        .unwrap_or("?");
    Ok(Report {
        name: "eval-heavy fleet (16 hosts, fresh commit)",
        measured: format!("{} (peak evaluator RSS {peak_mb} MiB)", seconds(measured)),
        baseline: format!(
            "{} shell loop of `nix build` (peak RSS {})",
            seconds(baseline),
            mib(baseline_peak)
        ),
        ratio: measured.as_secs_f64() / baseline.as_secs_f64(),
        goal: "≤ 0.5",
        notes: "shared evaluation: one `nix eval` for all hosts, then one `nix build` per host"
            .to_owned(),
    })
}

/// `homelab-deploy build R H` of an already-built host, end to end, vs a direct `nix build`
/// of the same host at the same commit: medians over `runs`.
pub fn dispatch_overhead(bin: &Path, runs: usize) -> Result<Report> {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("evalheavy");
    let _builder = Builder::start(bin, &nats.url, &[("demo", repo.url())]);
    let rev = repo.head();
    let flake = flake_at(&repo, &rev);
    let build = || {
        let started = Instant::now();
        cli_ok(
            bin,
            &nats.url,
            &["build", "demo", "host-01", "--rev", &rev, "--json"],
            Duration::from_secs(600),
            "homelab-deploy build",
        )?;
        anyhow::Ok(started.elapsed())
    };
    build()?; // build it once: from now on it is cached
    direct_nix_build(&flake, &toplevel("host-01"))?;
    let mut measured = Vec::new();
    let mut direct = Vec::new();
    for _ in 0..runs {
        measured.push(build()?);
        direct.push(direct_nix_build(&flake, &toplevel("host-01"))?);
    }
    let (measured, direct) = (median(measured), median(direct));
    Ok(Report {
        name: "dispatch overhead (1 cached host)",
        measured: format!("median {}", seconds(measured)),
        baseline: format!("median {} direct `nix build`", seconds(direct)),
        ratio: measured.as_secs_f64() / direct.as_secs_f64(),
        goal: "≤ 1.25",
        notes: format!(
            "{runs} runs each; overhead {:+.0} ms",
            (measured.as_secs_f64() - direct.as_secs_f64()) * 1000.0
        ),
    })
}

/// Publishes `count` requests for `demo web` as a plain JetStream client would (every `pace`, or
/// all at once), and waits for all of them to finish. Returns the time from the first publish
/// to the last `finished`, and each request's time from publish to `started`.
async fn run_requests(
    js: &async_nats::jetstream::Context,
    events: &mut async_nats::Subscriber,
    label: &str,
    count: usize,
    pace: Option<Duration>,
) -> Result<(Duration, Vec<Duration>)> {
    let published = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let started = Instant::now();
    let publisher = {
        let (js, published, label) = (js.clone(), published.clone(), label.to_owned());
        tokio::spawn(async move {
            for i in 0..count {
                let id = format!("{label}{i:06}{}", nuid_suffix());
                let message = async_nats::jetstream::message::PublishMessage::build()
                    .payload(format!(r#"{{"id":"{id}"}}"#).into())
                    .message_id(id.as_str());
                published
                    .lock()
                    .map_err(|_| anyhow::anyhow!("lock"))?
                    .insert(id, Instant::now());
                js.send_publish("build.demo.web", message).await?.await?;
                if let Some(pace) = pace {
                    tokio::time::sleep(pace).await;
                }
            }
            anyhow::Ok(())
        })
    };
    let mut to_started = Vec::new();
    let mut finished = 0;
    while finished < count {
        let message = tokio::time::timeout(Duration::from_secs(120), events.next())
            .await
            .context("no event for 2 minutes")?
            .context("subscription ended")?;
        let event: Event = serde_json::from_slice(&message.payload)?;
        if !event.id.starts_with(label) {
            continue;
        }
        match event.body {
            EventBody::Started { .. } => {
                let at = published
                    .lock()
                    .map_err(|_| anyhow::anyhow!("lock"))?
                    .get(&event.id)
                    .copied();
                if let Some(at) = at {
                    to_started.push(at.elapsed());
                }
            }
            EventBody::Finished { .. } => finished += 1,
            _ => {}
        }
    }
    publisher.await??;
    Ok((started.elapsed(), to_started))
}

/// A suffix that keeps request ids of separate runs apart.
fn nuid_suffix() -> String {
    test_support::unique("b").replace('-', "")
}

/// `requests` requests of a cached host through 2 builders: requests/s, and p50/p99 time from
/// publish to `started`; baseline: the same number of direct `nix build`s of that host in a row.
pub async fn queue_throughput(bin: &Path, requests: usize) -> Result<Report> {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("fleet");
    let repos = [("demo", repo.url())];
    // Every request is published at once: let the queue hold them all.
    let limits = "\n[streams]\nmax_pending_requests_per_target = 5000";
    let _builders = [
        Builder::start_with(bin, &nats.url, &repos, limits),
        Builder::start_with(bin, &nats.url, &repos, limits),
    ];
    cli_ok(
        bin,
        &nats.url,
        &["build", "demo", "web"],
        Duration::from_secs(120),
        "first build",
    )?;
    let client = bench_client(&nats).await?;
    let mut events = client
        .subscribe("build.responses.demo.web.*.events")
        .await?;
    let js = async_nats::jetstream::new(client.clone());
    // A burst of every request at once measures how fast the queue drains; a paced run below
    // that rate measures how long a request waits for a free builder.
    let (elapsed, _) = run_requests(&js, &mut events, "burst", requests, None).await?;
    let paced = (requests / 10).max(10);
    let (_, mut to_started) = run_requests(
        &js,
        &mut events,
        "paced",
        paced,
        Some(Duration::from_millis(100)),
    )
    .await?;
    let flake = flake_at(&repo, &repo.head());
    let direct_runs = requests.min(50);
    let direct_started = Instant::now();
    for _ in 0..direct_runs {
        direct_nix_build(&flake, &toplevel("web"))?;
    }
    let direct_rate = direct_runs as f64 / direct_started.elapsed().as_secs_f64();
    let rate = requests as f64 / elapsed.as_secs_f64();
    let (p50, p99) = (
        percentile(&mut to_started, 0.5),
        percentile(&mut to_started, 0.99),
    );
    Ok(Report {
        name: "queue throughput (cached host, 2 builders)",
        measured: format!(
            "{requests} requests drained at {rate:.1}/s; publish→started at 10/s: p50 {} ms, p99 {} ms ({} samples)",
            p50.as_millis(),
            p99.as_millis(),
            to_started.len()
        ),
        baseline: format!("{direct_rate:.1}/s direct `nix build`s in a row ({direct_runs})"),
        ratio: rate / direct_rate,
        goal: "p99 < 1 s (ratio: throughput, higher is better)",
        notes: format!("{paced} paced requests for the latency"),
    })
}

/// One build printing `lines` × 74 bytes of log: builder peak RSS and log MB/s delivered to a
/// `logs --follow` client; baseline: a direct `nix build` of the same derivation, log discarded.
pub fn log_flood(bin: &Path, lines: u64) -> Result<Report> {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("flood");
    repo.commit_file("lines.nix", &lines.to_string());
    let builder = Builder::start(bin, &nats.url, &[("demo", repo.url())]);
    let baseline_rev = new_nonce(&repo, "baseline");
    let baseline = direct_nix_build(&flake_at(&repo, &baseline_rev), &toplevel("flood"))?;

    let rev = new_nonce(&repo, "measured");
    let output = run_cli(
        bin,
        &nats.url,
        &["build", "demo", "flood", "--rev", &rev, "--no-wait"],
        Duration::from_secs(60),
    );
    let id = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let started = Instant::now();
    let follow = Command::new(bin)
        .args(["logs", &id, "--follow"])
        .env("HOMELAB_DEPLOY_NATS_URL", &nats.url)
        .stderr(Stdio::null())
        .output()
        .context("logs --follow")?;
    let elapsed = started.elapsed();
    let delivered = follow.stdout.len() as f64 / (1024.0 * 1024.0);
    let bytes = (lines * 74) as f64 / (1024.0 * 1024.0);
    let peak = builder.peak_rss_bytes();
    let rate = delivered / elapsed.as_secs_f64();
    let baseline_rate = bytes / baseline.as_secs_f64();
    Ok(Report {
        name: "log flood",
        measured: format!(
            "{delivered:.0} MiB delivered at {rate:.1} MiB/s; builder peak RSS {}",
            mib(peak)
        ),
        baseline: format!(
            "direct `nix build` {baseline_rate:.1} MiB/s ({})",
            seconds(baseline)
        ),
        ratio: rate / baseline_rate,
        goal: "builder peak RSS < 64 MiB (ratio: delivered ÷ nix's own rate)",
        notes: format!("{bytes:.0} MiB of log"),
    })
}

/// The builder with no work: RSS and CPU over `duration`; baseline: nats-server over the same
/// time.
pub fn idle(bin: &Path, duration: Duration) -> Result<Report> {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("fleet");
    let builder = Builder::start(bin, &nats.url, &[("demo", repo.url())]);
    std::thread::sleep(Duration::from_secs(1));
    let nats_pid = nats.pid();
    let (builder_cpu, nats_cpu) = (cpu_time(builder.pid()), cpu_time(nats_pid));
    std::thread::sleep(duration);
    let builder_used = cpu_time(builder.pid()).saturating_sub(builder_cpu);
    let nats_used = cpu_time(nats_pid).saturating_sub(nats_cpu);
    let rss = process_rss(builder.pid());
    let nats_rss = process_rss(nats_pid);
    let percent = |used: Duration| 100.0 * used.as_secs_f64() / duration.as_secs_f64();
    Ok(Report {
        name: "idle builder",
        measured: format!("RSS {}, CPU {:.2} %", mib(rss), percent(builder_used)),
        baseline: format!(
            "nats-server RSS {}, CPU {:.2} %",
            mib(nats_rss),
            percent(nats_used)
        ),
        ratio: rss as f64 / nats_rss.max(1) as f64,
        goal: "< 20 MiB, ~0 % CPU (ratio: RSS ÷ nats-server's)",
        notes: format!("{} s without requests", duration.as_secs()),
    })
}

/// The `homelab-deploy` binary next to this executable's target dir, or `$HOMELAB_DEPLOY_BIN`.
pub fn default_bin() -> PathBuf {
    std::env::var_os("HOMELAB_DEPLOY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/release/homelab-deploy"))
}

/// Id of the `i`th request of the synthetic history.
fn history_id(i: usize) -> String {
    format!("history{i:07}")
}

/// How the synthetic history of [`read_model`] is timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryTiming {
    /// Every request timed when it is stored: the whole history within a few seconds.
    Burst,
    /// Request `i` queued, run and finished [`SPREAD_STEP`] after request `i - 1`, the last
    /// one of the largest history a minute before the queued requests: 50,000 requests span
    /// about a week (the events' default retention), and the first page of `builds` is the
    /// newest queued requests.
    Spread,
}

/// Time between two requests of a [`HistoryTiming::Spread`] history.
const SPREAD_STEP: time::Duration = time::Duration::seconds(12);

/// Publishes the events of requests `from..to` (of `total`) of the synthetic history
/// (`started`, `host_started`, `host_finished`, `finished` of one host, as a builder writes
/// them, timed as `timing` says, a spread history ending at `spread_end`), keeping up to 1,000
/// publishes in flight.
async fn store_history(
    js: &async_nats::jetstream::Context,
    from: usize,
    to: usize,
    total: usize,
    timing: HistoryTiming,
    spread_end: time::OffsetDateTime,
) -> Result<()> {
    use std::future::IntoFuture;
    let mut acks = futures::stream::FuturesUnordered::new();
    for i in from..to {
        let id = history_id(i);
        let subject = format!("build.responses.demo.web.{id}.events");
        let at = match timing {
            HistoryTiming::Burst => time::OffsetDateTime::now_utc(),
            HistoryTiming::Spread => spread_end - SPREAD_STEP * i32::try_from(total - 1 - i)?,
        };
        let time = at.format(&time::format_description::well_known::Rfc3339)?;
        let result = serde_json::json!({"name": "web", "status": "built", "duration_ms": 1200,
            "out_path": "/nix/store/00000000000000000000000000000000-web"});
        let events = [
            serde_json::json!({"type": "started", "id": id, "seq": 1, "time": time, "builder": "b1",
                "repo": "demo", "target": "web", "rev": "0123456789abcdef0123456789abcdef01234567",
                "hosts": ["web"], "requested_by": "bench", "attempt": 1}),
            serde_json::json!({"type": "host_started", "id": id, "seq": 2, "time": time,
                "host": "web", "index": 1, "total": 1}),
            serde_json::json!({"type": "host_finished", "id": id, "seq": 3, "time": time,
                "host": "web", "index": 1, "total": 1, "result": result}),
            serde_json::json!({"type": "finished", "id": id, "seq": 4, "time": time,
                "status": "succeeded", "repo": "demo", "target": "web",
                "rev": "0123456789abcdef0123456789abcdef01234567", "hosts": [result],
                "builder": "b1", "duration_ms": 1300}),
        ];
        for event in events {
            acks.push(
                js.publish(subject.clone(), serde_json::to_vec(&event)?.into())
                    .await?
                    .into_future(),
            );
            while acks.len() >= 1000 {
                if let Some(ack) = acks.next().await {
                    ack?;
                }
            }
        }
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    Ok(())
}

/// Starts a builder serving `demo` and waits (up to 10 minutes: it rebuilds the request-state
/// bucket from the whole history first) until it is ready; returns it and how long that took.
fn start_rebuilding_builder(
    bin: &Path,
    nats_url: &str,
    repos: &[(&str, String)],
) -> Result<(Builder, Duration)> {
    let started = Instant::now();
    let builder = Builder::spawn(bin, nats_url, repos, "");
    let ready = test_support::wait_until(Duration::from_secs(600), || {
        builder.log().contains("builder ready")
    });
    if !ready {
        bail!("builder did not become ready:\n{}", builder.log());
    }
    Ok((builder, started.elapsed()))
}

/// Latency of one client call, `samples` times: (p50, p99).
async fn latency<F, Fut>(samples: usize, mut call: F) -> Result<(Duration, Duration)>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut times = Vec::with_capacity(samples);
    for i in 0..samples {
        let started = Instant::now();
        call(i).await?;
        times.push(started.elapsed());
    }
    Ok((percentile(&mut times, 0.5), percentile(&mut times, 0.99)))
}

/// [`latency`] of `status` of each of `ids` (one call each), which must be in `phase`.
async fn status_latency(
    js: &async_nats::jetstream::Context,
    ids: &[homelab_deploy_protocol::RequestId],
    phase: homelab_deploy_protocol::api::RequestPhase,
) -> Result<(Duration, Duration)> {
    latency(ids.len(), |i| async move {
        let state = homelab_deploy_client::inspect::request_state(js, &ids[i])
            .await?
            .context("request not found")?;
        anyhow::ensure!(state.phase == phase, "{state:?}");
        Ok(())
    })
    .await
}

/// [`latency`] of `builds` with `query`, `samples` times; `check` judges the ids it listed.
async fn builds_latency(
    js: &async_nats::jetstream::Context,
    query: &homelab_deploy_protocol::api::BuildsQuery,
    samples: usize,
    check: impl Fn(&[&str]) -> Result<()>,
) -> Result<(Duration, Duration)> {
    let check = &check;
    latency(samples, |_| async move {
        let list = homelab_deploy_client::inspect::list_builds(js, query).await?;
        let listed: Vec<&str> = list.builds.iter().map(|b| b.id.as_str()).collect();
        check(&listed)
    })
    .await
}

fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// `status` (of a finished request), `builds` (first page) and `builds --state queued` with
/// `histories` requests in the events stream (each level adds to the one before) and `queued`
/// requests waiting for a repo no builder serves, `samples` calls each, in process through the
/// client library that the CLI, the MCP server and the builders' control API all use. Before
/// each level a builder rebuilds the request-state bucket from the events (its time is reported
/// too). Baseline: the same calls at the first (smallest) history, same run. `timing` says how
/// the history is spread over time (the rows' names say which).
pub async fn read_model(
    bin: &Path,
    histories: &[usize],
    queued: usize,
    samples: usize,
    timing: HistoryTiming,
) -> Result<Vec<Report>> {
    use homelab_deploy_protocol::api::{BuildsQuery, RequestPhase, STATE_BUCKET};
    use homelab_deploy_protocol::RequestId;

    let nats = NatsServer::start();
    let repo = FixtureRepo::new("fleet");
    let both = [("demo", repo.url()), ("parked", repo.url())];
    let demo = [("demo", repo.url())];
    // A builder sets up the streams for both repos, then `parked` is left without a builder so
    // its requests stay queued.
    let limits = "\n[streams]\nmax_pending_requests_per_target = 5000";
    let mut setup = Builder::start_with(bin, &nats.url, &both, limits);
    setup.terminate(Duration::from_secs(30));
    let client = bench_client(&nats).await?;
    let js = async_nats::jetstream::new(client.clone());
    let spread_end = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
    let mut queued_ids = Vec::new();
    for i in 0..queued {
        let id = format!("parked{i:06}{}", nuid_suffix());
        let message = async_nats::jetstream::message::PublishMessage::build()
            .payload(format!(r#"{{"id":"{id}"}}"#).into())
            .message_id(id.as_str());
        js.send_publish("build.parked.web", message).await?.await?;
        queued_ids.push(id);
    }

    struct Level {
        history: usize,
        rebuild: Duration,
        status: (Duration, Duration),
        status_queued: (Duration, Duration),
        builds: (Duration, Duration),
        queued: (Duration, Duration),
    }
    let mut levels: Vec<Level> = Vec::new();
    let mut stored = 0;
    let mut builder: Option<Builder> = None;
    for &history in histories {
        drop(builder.take());
        let total = histories.iter().copied().max().unwrap_or(history);
        store_history(&js, stored, history, total, timing, spread_end).await?;
        stored = history;
        let _ = js.delete_key_value(STATE_BUCKET).await;
        let (started, rebuild) = start_rebuilding_builder(bin, &nats.url, &demo)?;
        builder = Some(started);
        let ids: Vec<RequestId> = (0..samples)
            .map(|i| RequestId::parse(&history_id((i * 7919) % history)))
            .collect::<Result<_, _>>()?;
        let queued_sample: Vec<RequestId> = (0..samples)
            .map(|i| RequestId::parse(&queued_ids[(i * 31) % queued_ids.len().max(1)]))
            .collect::<Result<_, _>>()?;
        let status = status_latency(&js, &ids, RequestPhase::Succeeded).await?;
        let status_queued = status_latency(&js, &queued_sample, RequestPhase::Queued).await?;
        let newest: Vec<String> = match timing {
            HistoryTiming::Burst => (history.saturating_sub(20)..history)
                .rev()
                .map(history_id)
                .collect(),
            HistoryTiming::Spread => queued_ids.iter().rev().take(20).cloned().collect(),
        };
        let builds = builds_latency(&js, &BuildsQuery::default(), samples, |listed| {
            anyhow::ensure!(listed == newest, "first page {listed:?}, not {newest:?}");
            Ok(())
        })
        .await?;
        let queued_query = BuildsQuery {
            phase: Some(RequestPhase::Queued),
            ..Default::default()
        };
        let queued_list = builds_latency(&js, &queued_query, samples, |listed| {
            anyhow::ensure!(listed.len() == 20, "{} builds", listed.len());
            Ok(())
        })
        .await?;
        levels.push(Level {
            history,
            rebuild,
            status,
            status_queued,
            builds,
            queued: queued_list,
        });
    }
    let (Some(base), Some(top)) = (levels.first(), levels.last()) else {
        bail!("no history sizes given");
    };
    let row = |name: &'static str, pick: &dyn Fn(&Level) -> (Duration, Duration)| {
        let measured = levels
            .iter()
            .skip(1)
            .map(|level| {
                let (p50, p99) = pick(level);
                format!(
                    "{}: p50 {}, p99 {}",
                    level.history,
                    millis(p50),
                    millis(p99)
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        let (base50, base99) = pick(base);
        Report {
            name,
            measured,
            baseline: format!(
                "{}: p50 {}, p99 {}",
                base.history,
                millis(base50),
                millis(base99)
            ),
            ratio: pick(top).1.as_secs_f64() / base99.as_secs_f64().max(1e-6),
            goal: "≤ 2, p99 < 100 ms (ratio: p99 at the largest history ÷ at the smallest)",
            notes: format!("requests in history; {queued} queued; {samples} calls each"),
        }
    };
    let rebuilds = levels
        .iter()
        .map(|level| format!("{}: {}", level.history, seconds(level.rebuild)))
        .collect::<Vec<_>>()
        .join(", ");
    let names = match timing {
        HistoryTiming::Burst => [
            "read model, history in one burst: `status` (finished request)",
            "read model, history in one burst: `status` (queued request)",
            "read model, history in one burst: `builds` (first page)",
            "read model, history in one burst: `builds --state queued`",
        ],
        HistoryTiming::Spread => [
            "read model, history over a week: `status` (finished request)",
            "read model, history over a week: `status` (queued request)",
            "read model, history over a week: `builds` (first page)",
            "read model, history over a week: `builds --state queued`",
        ],
    };
    let mut status = row(names[0], &|l| l.status);
    status.notes = format!(
        "{}; builder start with bucket rebuild {rebuilds}",
        status.notes
    );
    Ok(vec![
        status,
        row(names[1], &|l| l.status_queued),
        row(names[2], &|l| l.builds),
        row(names[3], &|l| l.queued),
    ])
}

/// Starts a builder for the `lanes` fixture with `builder_extra` lines in its `[builder]` table.
fn lanes_builder(
    bin: &Path,
    nats: &NatsServer,
    repo: &FixtureRepo,
    builder_extra: &str,
) -> Builder {
    Builder::start_with(bin, &nats.url, &[("demo", repo.url())], builder_extra)
}

/// A client of `nats` as the benchmarks connect: no credentials, the client library's own
/// connect.
async fn bench_client(nats: &NatsServer) -> Result<async_nats::Client> {
    Ok(connect(&ConnectSettings {
        url: nats.url.clone().into(),
        nkey_file: None,
        creds_file: None,
        inbox_prefix: None,
        name: "bench".to_owned(),
        timeout: Duration::from_secs(5),
        vault: None,
    })
    .await?)
}

/// A JetStream client of `nats` and a subscription to every event of `demo`.
async fn lanes_client(
    nats: &NatsServer,
) -> Result<(async_nats::jetstream::Context, async_nats::Subscriber)> {
    let client = bench_client(nats).await?;
    let events = client.subscribe("build.responses.demo.*.*.events").await?;
    Ok((async_nats::jetstream::new(client), events))
}

/// Waits (60 s at most) until every builder in the registry announces itself idle.
async fn fleet_idle(js: &async_nats::jetstream::Context, builders: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let fleet = homelab_deploy_client::inspect::list_builders(js).await?;
        let idle = fleet.len() == builders
            && fleet.iter().all(|b| {
                b.states
                    .iter()
                    .all(|s| matches!(s, homelab_deploy_protocol::api::BuilderState::Idle))
            });
        if idle {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("the builders never were idle together")
}

/// What one request did: who started it, publish → `started`, publish → `finished`, its status.
struct Dispatched {
    builder: Option<String>,
    to_started: Option<Duration>,
    to_finished: Duration,
    status: String,
}

/// Publishes one request for `demo <target>` (at `rev` when given) as a plain JetStream client
/// would and follows it to its `finished` event.
async fn dispatch_one(
    js: &async_nats::jetstream::Context,
    events: &mut async_nats::Subscriber,
    target: &str,
    rev: Option<&str>,
) -> Result<Dispatched> {
    let (id, published) = publish_request(js, "demo", target, rev).await?;
    follow(events, &id, published).await
}

/// Publishes one request for `<repo> <target>` (at `rev` when given) as a plain JetStream
/// client would and waits for the stream to store it; its id, and when publishing began.
async fn publish_request(
    js: &async_nats::jetstream::Context,
    repo: &str,
    target: &str,
    rev: Option<&str>,
) -> Result<(String, Instant)> {
    let id = format!("lanes{}", nuid_suffix());
    let body = match rev {
        Some(rev) => serde_json::json!({ "id": id, "rev": rev }),
        None => serde_json::json!({ "id": id }),
    };
    let message = async_nats::jetstream::message::PublishMessage::build()
        .payload(serde_json::to_vec(&body)?.into())
        .message_id(id.as_str());
    let published = Instant::now();
    js.send_publish(format!("build.{repo}.{target}"), message)
        .await?
        .await?;
    Ok((id, published))
}

/// Follows request `id`, published at `published`, on `events` to its `finished` event.
async fn follow(
    events: &mut async_nats::Subscriber,
    id: &str,
    published: Instant,
) -> Result<Dispatched> {
    let (mut builder, mut to_started) = (None, None);
    loop {
        let message = tokio::time::timeout(Duration::from_secs(300), events.next())
            .await
            .context("no event for 5 minutes")?
            .context("subscription ended")?;
        let event: Event = serde_json::from_slice(&message.payload)?;
        if event.id != id {
            continue;
        }
        match event.body {
            EventBody::Started { builder: by, .. } => {
                builder = Some(by);
                to_started = Some(published.elapsed());
            }
            EventBody::Finished { status, .. } => {
                return Ok(Dispatched {
                    builder,
                    to_started,
                    to_finished: published.elapsed(),
                    status: status.as_str().to_owned(),
                })
            }
            _ => {}
        }
    }
}

/// Repeat builds of one host, each at a new commit, with two idle builders: the share that
/// starts on the builder that built the host last, and publish → `started`; with
/// `warm_affinity` on and, as the baseline, off (the same run, fresh server and builders each).
pub async fn affinity(bin: &Path, rounds: usize) -> Result<Report> {
    let mut figures = Vec::new();
    for warm_affinity in [true, false] {
        let nats = NatsServer::start();
        let repo = FixtureRepo::new("lanes");
        let extra = format!("\nwarm_affinity = {warm_affinity}");
        let _builders = [
            lanes_builder(bin, &nats, &repo, &extra),
            lanes_builder(bin, &nats, &repo, &extra),
        ];
        let (js, mut events) = lanes_client(&nats).await?;
        fleet_idle(&js, 2).await?;
        let first = dispatch_one(&js, &mut events, "light", None).await?;
        let mut warm = first.builder.context("first build never started")?;
        let (mut on_warm, mut latencies) = (0usize, Vec::new());
        for _ in 0..rounds {
            fleet_idle(&js, 2).await?;
            let rev = repo.new_salt();
            let done = dispatch_one(&js, &mut events, "light", Some(&rev)).await?;
            if done.status != "succeeded" {
                bail!("a repeat build ended {}", done.status);
            }
            let by = done.builder.context("no started event")?;
            if by == warm {
                on_warm += 1;
            }
            latencies.extend(done.to_started);
            warm = by;
        }
        let share = on_warm as f64 * 100.0 / rounds as f64;
        let p50 = percentile(&mut latencies, 0.5);
        let max = percentile(&mut latencies, 1.0);
        figures.push((share, p50, max));
    }
    let [(share, p50, max), (base_share, base_p50, base_max)] = figures[..] else {
        bail!("two runs expected");
    };
    Ok(Report {
        name: "warm-cache affinity (2 idle builders, repeat builds)",
        measured: format!(
            "{share:.0} % on the warm builder; publish→started p50 {}, max {}",
            millis(p50),
            millis(max)
        ),
        baseline: format!(
            "`warm_affinity = false`: {base_share:.0} %; p50 {}, max {}",
            millis(base_p50),
            millis(base_max)
        ),
        ratio: p50.as_secs_f64() / base_p50.as_secs_f64().max(1e-6),
        goal: "share → 100 %, added latency ≤ ~1 s (ratio: p50 latency)",
        notes: format!(
            "{rounds} repeat builds of one host, each at a new commit; added p50 {:+.0} ms",
            (p50.as_secs_f64() - base_p50.as_secs_f64()) * 1000.0
        ),
    })
}

/// Heavy lanes: a 200 MiB and a 4096 MiB builder, the `lanes` fixture's `heavy` host (about
/// 470 MiB in evaluation) measured once. Then `rounds` heavy requests while both builders idle:
/// the share started on the big builder and publish → `started`, against the same for the
/// light host (which either builder takes at once); last, with the big builder drained, the
/// time until a heavy request is refused.
pub async fn lanes(bin: &Path, rounds: usize) -> Result<Report> {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("lanes");
    let small = lanes_builder(
        bin,
        &nats,
        &repo,
        "\nmemory_mb = 200\nwarm_affinity = false",
    );
    let big = lanes_builder(
        bin,
        &nats,
        &repo,
        "\nmemory_mb = 4096\nwarm_affinity = false",
    );
    let (js, mut events) = lanes_client(&nats).await?;
    fleet_idle(&js, 2)
        .await
        .context("waiting for both builders")?;
    dispatch_one(&js, &mut events, "heavy", None)
        .await
        .context("first heavy build")?;
    dispatch_one(&js, &mut events, "light", None)
        .await
        .context("first light build")?;
    let run = |target: &'static str| {
        let (js, big) = (js.clone(), big.name.clone());
        async move {
            let mut events = events_again(&js).await?;
            let (mut on_big, mut latencies) = (0usize, Vec::new());
            for _ in 0..rounds {
                fleet_idle(&js, 2).await?;
                let done = dispatch_one(&js, &mut events, target, None).await?;
                if done.builder.as_deref() == Some(big.as_str()) {
                    on_big += 1;
                }
                latencies.extend(done.to_started);
            }
            anyhow::Ok((on_big as f64 * 100.0 / rounds as f64, latencies))
        }
    };
    let (heavy_share, mut heavy) = run("heavy").await.context("heavy requests")?;
    let (_, mut light) = run("light").await.context("light requests")?;
    cli_ok(
        bin,
        &nats.url,
        &["builder", "drain", &big.name],
        Duration::from_secs(60),
        "drain",
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while homelab_deploy_client::inspect::list_builders(&js)
        .await?
        .len()
        > 1
    {
        if Instant::now() > deadline {
            bail!("the big builder never left the registry");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(big);
    let refused = dispatch_one(&js, &mut events, "heavy", None)
        .await
        .context("heavy request with no big builder")?;
    if refused.status != "failed" || refused.builder.is_some() {
        bail!(
            "a heavy request with no big builder ended {}",
            refused.status
        );
    }
    drop(small);
    let (heavy_p50, light_p50) = (percentile(&mut heavy, 0.5), percentile(&mut light, 0.5));
    Ok(Report {
        name: "heavy lanes (200 MiB + 4096 MiB builder, heavy host ~470 MiB)",
        measured: format!(
            "{heavy_share:.0} % of heavy requests on the big builder; publish→started p50 {}, max {}",
            millis(heavy_p50),
            millis(percentile(&mut heavy, 1.0))
        ),
        baseline: format!(
            "light host (either builder): p50 {}, max {}",
            millis(light_p50),
            millis(percentile(&mut light, 1.0))
        ),
        ratio: heavy_p50.as_secs_f64() / light_p50.as_secs_f64().max(1e-6),
        goal: "100 % on the big builder; no builder big enough: refused at once",
        notes: format!(
            "{rounds} requests each, both builders idle; with the big builder gone a heavy request is refused {} after publishing",
            millis(refused.to_finished)
        ),
    })
}

/// A fresh subscription to `demo`'s events on `js`'s connection.
async fn events_again(js: &async_nats::jetstream::Context) -> Result<async_nats::Subscriber> {
    Ok(js
        .client()
        .subscribe("build.responses.demo.*.*.events")
        .await?)
}

/// Runs a session builder for `repo` (from `url`) that exits as soon as it is idle: it adds
/// the repo's subjects and consumer, and leaves no builder running.
fn run_setup_session(bin: &Path, nats_url: &str, repo: &str, url: &str) -> Result<()> {
    let config = Builder::nameless_config(nats_url, repo, url);
    let mut setup = Builder::spawn_config_with_args(bin, "", &config, &["--idle-exit", "100ms"]);
    match setup.wait_exit(Duration::from_secs(120)) {
        Some(status) if status.success() => Ok(()),
        other => bail!("the setup session ended {other:?}:\n{}", setup.log()),
    }
}

/// A bench client of `nats` (JetStream) and a subscription to the events of every repo.
async fn autoscaling_client(
    nats: &NatsServer,
) -> Result<(async_nats::jetstream::Context, async_nats::Subscriber)> {
    let (js, _) = lanes_client(nats).await?;
    let events = js
        .client()
        .subscribe("build.responses.*.*.*.events")
        .await?;
    Ok((js, events))
}

/// Names of the consumers on the requests stream.
async fn request_consumers(js: &async_nats::jetstream::Context) -> Result<Vec<String>> {
    use futures::TryStreamExt;
    let stream = js
        .get_stream(homelab_deploy_protocol::subject::REQUESTS_STREAM)
        .await?;
    let mut names: Vec<String> = stream.consumer_names().try_collect().await?;
    names.sort();
    Ok(names)
}

/// When a polled condition first held, and how many reads that took.
struct Seen {
    at: Instant,
    reads: usize,
}

/// Polls `probe` (every 2 ms, `limit` at most) until it holds.
async fn first_time<F, Fut>(limit: Duration, what: &str, mut probe: F) -> Result<Seen>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + limit;
    let mut reads = 0;
    loop {
        reads += 1;
        if probe().await? {
            return Ok(Seen {
                at: Instant::now(),
                reads,
            });
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {} s", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn p50_p99(values: &mut [Duration]) -> String {
    format!(
        "p50 {}, p99 {}",
        millis(percentile(values, 0.5)),
        millis(percentile(values, 0.99))
    )
}

/// Autoscaling: what an ephemeral builder adds to a request's dispatch, and how quickly the
/// signals an autoscaler reads follow the queue. Three rows: [`ephemeral_dispatch`] with
/// `samples` pairs, then [`queue_signals`] with `samples` rounds of `queued` requests.
pub async fn autoscaling(bin: &Path, samples: usize, queued: usize) -> Result<Vec<Report>> {
    let ephemeral = ephemeral_dispatch(bin, samples)
        .await
        .context("ephemeral dispatch")?;
    let [jsz, gauge] = queue_signals(bin, samples, queued)
        .await
        .context("queue signals")?;
    Ok(vec![ephemeral, jsz, gauge])
}

/// Publish → `started` of a `light` request (each at a new commit) for a long-running idle
/// builder (the baseline), against the same for a request of a repo no builder serves, with
/// `homelab-deploy builder --once` (nameless, fresh state directory) started as soon as the
/// request is stored: what an autoscaler adds (process start, connect, stream and consumer
/// bind, clone, fetch). Then the time from that request's `finished` until the session has
/// exited and neither the registry nor the requests stream's consumers hold anything of it.
/// `samples` pairs, one of each in turn, after one pair not counted.
async fn ephemeral_dispatch(bin: &Path, samples: usize) -> Result<Report> {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("lanes");
    let resident = Builder::start(bin, &nats.url, &[("demo", repo.url())]);
    let config = Builder::nameless_config(&nats.url, "eph", &repo.url());
    // `eph`'s requests can be stored before the next session starts.
    run_setup_session(bin, &nats.url, "eph", &repo.url())?;
    let (js, mut events) = autoscaling_client(&nats).await?;
    let consumers = request_consumers(&js).await?;
    let (mut resident_started, mut session_started) = (Vec::new(), Vec::new());
    let (mut to_exit, mut to_gone, mut at_once) = (Vec::new(), Vec::new(), 0);
    for round in 0..=samples {
        let rev = repo.new_salt();
        let base = dispatch_one(&js, &mut events, "light", Some(&rev)).await?;
        if base.status != "succeeded" || base.builder.as_deref() != Some(&resident.name) {
            bail!("the resident builder's request ended {}", base.status);
        }
        let rev = repo.new_salt();
        let (id, published) = publish_request(&js, "eph", "light", Some(&rev)).await?;
        let mut session = Builder::spawn_config_with_args(bin, "", &config, &["--once"]);
        let done = follow(&mut events, &id, published).await?;
        let name = done.builder.clone().context("no started event")?;
        if done.status != "succeeded" || name == resident.name {
            bail!(
                "the session's request ended {}:\n{}",
                done.status,
                session.log()
            );
        }
        let finished = published + done.to_finished;
        let exited = first_time(Duration::from_secs(60), "session exit", || {
            let running = session.is_running();
            async move { Ok(!running) }
        })
        .await?
        .at;
        match session.wait_exit(Duration::ZERO) {
            Some(status) if status.success() => {}
            other => bail!("the session ended {other:?}:\n{}", session.log()),
        }
        let gone = first_time(Duration::from_secs(60), "session left", || {
            let (js, name, consumers) = (js.clone(), name.clone(), consumers.clone());
            async move {
                let listed = homelab_deploy_client::inspect::list_builders(&js)
                    .await?
                    .iter()
                    .any(|b| b.name == name);
                Ok(!listed && request_consumers(&js).await? == consumers)
            }
        })
        .await?;
        if round > 0 {
            resident_started.extend(base.to_started);
            session_started.extend(done.to_started);
            to_exit.push(exited - finished);
            to_gone.push(gone.at - finished);
            at_once += usize::from(gone.reads == 1);
        }
    }
    let ratio = percentile(&mut session_started, 0.5).as_secs_f64()
        / percentile(&mut resident_started, 0.5)
            .as_secs_f64()
            .max(1e-6);
    Ok(Report {
        name: "ephemeral builder (`builder --once` started at publish)",
        measured: format!(
            "publish→started {}; `finished`→exited {}; →exited, out of the registry and no consumer of its own {}",
            p50_p99(&mut session_started),
            p50_p99(&mut to_exit),
            p50_p99(&mut to_gone)
        ),
        baseline: format!(
            "long-running idle builder: publish→started {}",
            p50_p99(&mut resident_started)
        ),
        ratio,
        goal: "what an autoscaler adds per request (ratio: p50 publish→started)",
        notes: format!(
            "{samples} requests each, in turn, each at a new commit; the session has a fresh state directory (clones the repo); registry and requests-stream consumers clean at the first look after exit in {at_once} of {samples}"
        ),
    })
}

/// `/jsz?consumers=true` of nats-server's monitoring endpoint: (`num_pending`,
/// `num_ack_pending`) of consumer `consumer` of the requests stream, account `$G`.
async fn jsz_consumer(
    http: &reqwest::Client,
    monitor: &str,
    consumer: &str,
) -> Result<Option<(u64, u64)>> {
    let jsz: serde_json::Value = http
        .get(format!("{monitor}/jsz?consumers=true"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(test_support::jsz_request_consumer(&jsz, consumer))
}

/// The value of the sample line starting with `prefix` in a builder's `/metrics` on `port`.
async fn scraped(http: &reqwest::Client, port: u16, prefix: &str) -> Result<Option<f64>> {
    let text = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(text
        .lines()
        .find_map(|line| line.strip_prefix(prefix))
        .and_then(|value| value.trim().parse().ok()))
}

/// Publishes `count` requests for `demo <target>` one after the other; when the last was stored.
async fn publish_burst(
    js: &async_nats::jetstream::Context,
    target: &str,
    count: usize,
) -> Result<Instant> {
    for _ in 0..count {
        publish_request(js, "demo", target, None).await?;
    }
    Ok(Instant::now())
}

/// Empties `demo`'s part of the queue.
async fn purge_demo(js: &async_nats::jetstream::Context) -> Result<()> {
    js.get_stream(homelab_deploy_protocol::subject::REQUESTS_STREAM)
        .await?
        .purge()
        .filter("build.demo.>")
        .await?;
    Ok(())
}

/// What an autoscaler reads to see the queue, in [`queue_signals`].
#[derive(Debug, Clone, Copy)]
enum Signal {
    /// `/jsz?consumers=true`: `num_pending` of `builder-demo` (what KEDA reads).
    JszPending,
    /// `/jsz?consumers=true`: `num_pending` + `num_ack_pending` of `builder-demo`.
    JszLag,
    /// The JetStream API's consumer info of `builder-demo`: `num_pending` (what the builder's
    /// `homelab_deploy_queue_depth` reads).
    ConsumerInfo,
    /// `homelab_deploy_lane_requests{lane="heavy"}` of the builder whose metrics are on this
    /// port.
    HeavyLane(u16),
}

/// The consumer of `demo`'s requests whose figures [`Signal`]s read.
const DEMO_CONSUMER: &str = "builder-demo";

/// Where [`Signal`]s are read: the bench's JetStream client and nats-server's monitoring
/// endpoint.
struct Signals {
    js: async_nats::jetstream::Context,
    http: reqwest::Client,
    monitor: String,
}

impl Signals {
    /// The count `signal` shows now; `None` while it shows nothing (no such consumer, sample).
    async fn read(&self, signal: Signal) -> Result<Option<f64>> {
        Ok(match signal {
            Signal::JszPending => jsz_consumer(&self.http, &self.monitor, DEMO_CONSUMER)
                .await?
                .map(|(pending, _)| pending as f64),
            Signal::JszLag => jsz_consumer(&self.http, &self.monitor, DEMO_CONSUMER)
                .await?
                .map(|(pending, acking)| (pending + acking) as f64),
            Signal::ConsumerInfo => {
                let stream = self
                    .js
                    .get_stream(homelab_deploy_protocol::subject::REQUESTS_STREAM)
                    .await?;
                let info = stream.consumer_info(DEMO_CONSUMER).await?;
                Some(info.num_pending as f64)
            }
            Signal::HeavyLane(port) => {
                let gauge = "homelab_deploy_lane_requests{repo=\"demo\",lane=\"heavy\"} ";
                scraped(&self.http, port, gauge).await?
            }
        })
    }

    /// Polls `signal` (a minute at most) until it shows `count`.
    async fn shows(&self, signal: Signal, count: usize) -> Result<Seen> {
        let what = format!("{signal:?} showing {count}");
        first_time(Duration::from_secs(60), &what, || async move {
            Ok(self.read(signal).await? == Some(count as f64))
        })
        .await
    }

    /// Publishes `count` requests for `demo <target>`, then waits for each of `signals` in
    /// turn to show them; empties `demo`'s queue after. For each signal: the time from the
    /// last request stored until it showed them, and whether the first read did.
    async fn burst(
        &self,
        target: &str,
        count: usize,
        signals: &[Signal],
    ) -> Result<Vec<(Duration, bool)>> {
        let stored = publish_burst(&self.js, target, count).await?;
        let mut seen = Vec::new();
        for signal in signals {
            let shown = self.shows(*signal, count).await?;
            seen.push((shown.at - stored, shown.reads == 1));
        }
        purge_demo(&self.js).await?;
        Ok(seen)
    }
}

/// How often a builder samples its queue gauges (`sample_metrics` in the builder crate).
const SAMPLING_TICK: Duration = Duration::from_secs(5);

/// How quickly what autoscalers read follows the queue. First with no builder running (a
/// session made `demo`'s consumer and left), `rounds` times: `queued` requests published, then
/// the time from the last one stored until `/jsz?consumers=true` shows `num_pending` = `queued`
/// for `builder-demo` (what KEDA reads), against the JetStream API's consumer info (what the
/// builder's `homelab_deploy_queue_depth` reads), one or the other per round in turn. Then
/// with one 200 MiB builder of `builder.lanes = { standard = 200, heavy = 4096 }` running and
/// `busy` pinned at 1024 MiB (it waits for the heavy lane, so the builder cannot take it):
/// until that builder's `homelab_deploy_lane_requests{lane="heavy"}` shows them, against
/// `/jsz`'s lag (`num_pending` + `num_ack_pending`) in the same round.
async fn queue_signals(bin: &Path, rounds: usize, queued: usize) -> Result<[Report; 2]> {
    let nats = NatsServer::start_with_monitoring();
    let monitor = nats
        .monitoring_url()
        .context("nats-server wrote no monitoring port")?;
    let repo = FixtureRepo::new("lanes");
    run_setup_session(bin, &nats.url, "demo", &repo.url())?;
    let (js, _) = autoscaling_client(&nats).await?;
    let signals = Signals {
        js,
        http: reqwest::Client::new(),
        monitor,
    };
    let (mut jsz, mut api, mut at_once) = (Vec::new(), Vec::new(), 0);
    for round in 0..rounds * 2 {
        let (signal, times) = if round % 2 == 0 {
            (Signal::JszPending, &mut jsz)
        } else {
            (Signal::ConsumerInfo, &mut api)
        };
        let seen = signals.burst("light", queued, &[signal]).await?;
        at_once += usize::from(seen[0].1);
        times.push(seen[0].0);
    }

    let port = test_support::free_port();
    let name = test_support::unique("builder");
    let config = Builder::config(
        &name,
        &nats.url,
        Path::new("{state_dir}"),
        &[("demo", repo.url())],
    )
    .replacen(
        "\n\n[repos",
        "\nmemory_mb = 200\nlanes = { standard = 200, heavy = 4096 }\n\n[repos",
        1,
    ) + &format!(
        "expected_peak_mb = {{ busy = 1024 }}\n\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"
    );
    let _small = Builder::start_config(bin, &name, &config);
    let heavy_lane = Signal::HeavyLane(port);
    let (mut lag, mut lane) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        signals.shows(heavy_lane, 0).await?;
        // The gauge just changed, so its tick was now: publish at offsets spread over the
        // next tick, as requests arriving at any time would be.
        tokio::time::sleep(SAMPLING_TICK.mul_f64(round as f64 / rounds as f64)).await;
        let seen = signals
            .burst("busy", queued, &[Signal::JszLag, heavy_lane])
            .await?;
        lag.push(seen[0].0);
        lane.push(seen[1].0);
    }
    let p50 = |values: &mut Vec<Duration>| percentile(values, 0.5).as_secs_f64().max(1e-6);
    let jsz_ratio = p50(&mut jsz) / p50(&mut api);
    let lane_ratio = p50(&mut lane) / p50(&mut lag);
    Ok([
        Report {
            name: "autoscaler signal: `/jsz` `num_pending` (no builder running)",
            measured: format!("last request stored → `/jsz?consumers=true` shows them: {}", p50_p99(&mut jsz)),
            baseline: format!("JetStream API consumer info: {}", p50_p99(&mut api)),
            ratio: jsz_ratio,
            goal: "KEDA sees the queue as soon as it is stored (ratio: p50)",
            notes: format!("{rounds} rounds each of {queued} requests, in turn; the first read after the last publish showed them in {at_once} of {} rounds", rounds * 2),
        },
        Report {
            name: "autoscaler signal: `homelab_deploy_lane_requests` (heavy lane, no builder of it)",
            measured: format!("last request stored → the 200 MiB builder's gauge shows them: {}", p50_p99(&mut lane)),
            baseline: format!("`/jsz` lag (`num_pending` + `num_ack_pending`), same rounds: {}", p50_p99(&mut lag)),
            ratio: lane_ratio,
            goal: "within the builder's 5 s sampling tick (ratio: p50)",
            notes: format!("{rounds} rounds of {queued} requests for a host pinned at 1024 MiB, which the running builder hands back; published at offsets spread over the gauge's 5 s sampling tick"),
        },
    ])
}
