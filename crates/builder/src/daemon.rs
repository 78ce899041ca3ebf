//! Startup, the pull loops and shutdown of the builder.
//!
//! Startup: find nix, connect to NATS (retrying with a log line each time), create or adopt the
//! streams and one durable consumer per repo. Then one pull loop per repo takes one request at a
//! time, only while a build slot is free, so a busy builder never holds requests another builder
//! could start. Shutdown: [`Stop::Drain`] stops pulling and lets running builds finish;
//! [`Stop::Abort`] kills running builds and puts their requests back in the queue. An ephemeral
//! builder's [`Session`] limits drain it by themselves. The long-lived tasks (API, registry,
//! sampler, …) run in one [`Supervisor`]: one that fails stops the builder with an error.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use homelab_deploy_client::{connect, ClientError, ConnectSettings};
use homelab_deploy_credentials::vault::VaultSeed;
use homelab_deploy_credentials::CredentialError;
use homelab_deploy_protocol::subject::{parse_request_subject, REQUESTS_STREAM};
use homelab_deploy_protocol::{BuildRequest, Priority, RepoName};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::bus::{ensure_consumer, ensure_streams, Publisher};
use crate::closures::History;
use crate::config::{Account, Config};
use crate::git::Mirror;
use crate::job::{Jobs, Running, ServedRepo};
use crate::metrics::BuilderPhase;
use crate::nix::Nix;
use crate::placement::{Decision, Pulled, RepoNeeds};
use crate::registry::Registry;
use crate::session::{Session, SessionDir, SessionReport, Tracker};
use crate::shares::Shares;
use crate::state::StateStore;
use crate::stop::Stop;
use crate::supervisor::{Ends, Supervisor};

/// How long one pull waits for a request; also the longest a drain waits for a pull to end.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("nix is not usable: {0}")]
    Nix(#[from] crate::nix::NixError),
    #[error("cannot create state directory {path}: {source}")]
    StateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("setting up JetStream failed: {0}")]
    Bus(#[from] crate::bus::BusError),
    #[error("stopped before NATS could be reached")]
    StoppedWhileConnecting,
    #[error(transparent)]
    Credentials(#[from] homelab_deploy_credentials::CredentialError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// A long-lived task (the control API, the registry, …) ended or panicked while the
    /// builder ran; the builder stopped and handed its running requests back.
    #[error("{0}; the builder stopped (running requests went back to the queue)")]
    TaskFailed(#[from] crate::supervisor::TaskFailed),
}

/// Runs the builder until `external_stop` (signals), a drain request over NATS or a limit of
/// `session` asks it to end; returns what the session did once every running build is done.
pub async fn run(
    config: Config,
    session: Session,
    mut external_stop: watch::Receiver<Stop>,
) -> Result<SessionReport, DaemonError> {
    let (stop_tx, mut stop) = watch::channel(*external_stop.borrow());
    let tracker = Tracker::new(&session, stop_tx.clone());
    let name = session.builder_name(config.builder.name.as_deref());
    let state_dir = session.state_dir(&config.builder.state_dir, &name);
    let _session_dir = session
        .is_ephemeral()
        .then(|| SessionDir(state_dir.clone()));
    let mut supervisor = Supervisor::new();
    let follow_tx = stop_tx.clone();
    supervisor.spawn("stop signal", Ends::WithDaemon, async move {
        while external_stop.changed().await.is_ok() {
            let level = *external_stop.borrow();
            follow_tx.send_if_modified(|stop| {
                let harder = level > *stop;
                if harder {
                    *stop = level;
                }
                harder
            });
        }
        // The owner is gone: nothing more can ask the builder to stop that way.
        std::future::pending::<()>().await
    });
    if let Some(listen) = config.metrics_listen() {
        crate::metrics::install(listen)?;
        info!(%listen, "serving metrics");
    }
    crate::metrics::builder_state(BuilderPhase::Starting);
    std::fs::create_dir_all(&state_dir).map_err(|source| DaemonError::StateDir {
        path: state_dir.display().to_string(),
        source,
    })?;
    // Whatever a builder that died here left running holds nix's locks: end it before starting.
    let pid_dir = state_dir.join("processes");
    let ended = {
        let pid_dir = pid_dir.clone();
        tokio::task::spawn_blocking(move || crate::process::end_leftovers(&pid_dir))
            .await
            .unwrap_or_default()
    };
    if !ended.is_empty() {
        warn!(pids = ?ended, "ended processes a previous builder left running");
    }
    let repos = config.repos();
    let served: Vec<RepoName> = repos.iter().map(|repo| repo.name.clone()).collect();
    crate::job::DrvRoots::remove_leftovers(&state_dir, &served);
    let nix = Nix::detect(&config.builder.nix)
        .await?
        .with_pid_dir(pid_dir)
        .with_eval_memory_limit(config.evaluation().memory_limit)
        .with_git_config(crate::git::nix_git_config(&state_dir));

    let vault = config.vault_settings().map(VaultSeed::new);
    if let Some(vault) = vault.clone() {
        supervisor.spawn(
            "Vault refresher",
            Ends::WithDaemon,
            refresh_vault_seed(vault),
        );
    }
    let opening = Opening {
        config: &config,
        repos: &repos,
        name: &name,
        state_dir: &state_dir,
        nix: &nix,
        vault: vault.clone(),
        ephemeral: session.is_ephemeral(),
    };
    let mut accounts = Vec::new();
    for account in config.accounts() {
        let tenant = account.tenant.clone();
        accounts.push(open_account(&opening, account, &mut stop).await.map_err(
            |err| match err {
                DaemonError::Bus(err) => DaemonError::Bus(err.in_tenant(tenant.as_deref())),
                other => other,
            },
        )?);
    }
    let all_jobs: Vec<Arc<Jobs>> = accounts.iter().map(|a| a.jobs.clone()).collect();
    let mut sampled = Vec::new();
    let shares = Arc::new(Shares::new(
        &accounts.iter().map(|a| a.priority).collect::<Vec<_>>(),
    ));
    let slots = Arc::new(Semaphore::new(config.builder.max_concurrent_requests));
    let mut running = JoinSet::new();
    let mut pullers = JoinSet::new();
    let mut puller_id = 0;
    for (index, account) in accounts.into_iter().enumerate() {
        let refresh = refresh_hosts(
            account.jobs.clone(),
            account.repos.clone(),
            Duration::from_secs(config.builder.hosts_refresh_secs),
        );
        // With `hosts_refresh_secs = 0` it lists the hosts once and ends.
        supervisor.spawn("host discovery", Ends::Early, refresh);
        let registry = account.registry.run(
            account.jobs.running.clone(),
            account.jobs.evaluated.clone(),
            stop.clone(),
            supervisor.token(),
        );
        supervisor.spawn("registry", Ends::AfterCleanup, registry);
        let api = crate::api::serve(crate::api::Api {
            builder_name: name.clone(),
            client: account.client.clone(),
            js: account.js.clone(),
            running: account.jobs.running.clone(),
            access: account.jobs.access.clone(),
            jobs: account.jobs.clone(),
            history: account.jobs.history.clone(),
            nix: nix.clone(),
            stop_tx: stop_tx.clone(),
        });
        supervisor.spawn("control API", Ends::WithDaemon, async move {
            match api.await {
                Ok(()) => Err("its subscriptions ended".to_owned()),
                Err(err) => Err(format!("cannot subscribe: {err}")),
            }
        });
        sampled.push((
            account.js.clone(),
            account.repos.clone(),
            account.jobs.clone(),
        ));
        for (repo, consumer) in account.consumers {
            pullers.spawn(pull_loop(
                repo,
                consumer,
                Turn {
                    shares: shares.clone(),
                    account: index,
                    puller: puller_id,
                },
                slots.clone(),
                account.jobs.clone(),
                tracker.clone(),
                stop.clone(),
            ));
            puller_id += 1;
        }
    }
    let sampler = sample_metrics(sampled, all_jobs.clone(), stop.clone());
    supervisor.spawn("metrics sampler", Ends::WithDaemon, sampler);
    // Both limits count from here: waiting for NATS or Vault is no part of a session.
    if let Some(idle) = session.idle_exit {
        let idle_exit = tracker.clone().idle_exit(idle);
        supervisor.spawn("idle exit", Ends::Early, idle_exit);
    }
    if let Some(lifetime) = session.lifetime {
        let limit = tracker.clone().lifetime(lifetime);
        supervisor.spawn("lifetime", Ends::Early, limit);
    }
    info!(
        builder = %name,
        ephemeral = session.is_ephemeral(),
        repos = ?repos.iter().map(|repo| repo.name.as_str()).collect::<Vec<_>>(),
        tenants = ?config.tenants.keys().collect::<Vec<_>>(),
        nix_version = %nix.version,
        slots = config.builder.max_concurrent_requests,
        memory_mb = ?config.memory_envelope_mb(),
        "builder ready"
    );
    notify_systemd(sd_notify::NotifyState::Ready);

    // Wait for a stop request; pull loops end on their own once draining. A task that fails
    // meanwhile stops the builder as SIGTERM does: without its API or registry entry it would
    // build on unseen and uncancellable.
    let failure = tokio::select! {
        _ = stopping(&mut stop, Stop::Drain) => None,
        failed = supervisor.failed() => {
            error!(task = failed.task, error = %failed, "a builder task failed; stopping, running builds go back to the queue");
            stop_tx.send_replace(Stop::Abort);
            Some(failed)
        }
    };
    notify_systemd(sd_notify::NotifyState::Stopping);
    if *stop.borrow() == Stop::Abort {
        // SIGTERM: hand back now, not after the pull loops' last fetch has expired.
        warn!("stopping: killing running builds; their requests go back to the queue");
        all_jobs
            .iter()
            .for_each(|jobs| jobs.running.interrupt_all());
    } else {
        info!("draining: taking no new requests, finishing running builds");
    }
    while let Some(result) = pullers.join_next().await {
        match result {
            Ok(jobs_of_repo) => {
                for job in jobs_of_repo {
                    running.spawn(job);
                }
            }
            Err(err) => error!(error = %err, "a pull loop failed"),
        }
    }
    loop {
        tokio::select! {
            next = running.join_next() => if next.is_none() { break },
            _ = stopping(&mut stop, Stop::Abort) => {
                warn!("aborting running builds; their requests go back to the queue");
                all_jobs.iter().for_each(|jobs| jobs.running.interrupt_all());
                while running.join_next().await.is_some() {}
                break;
            }
        }
    }
    for failed in supervisor.shutdown().await {
        error!(task = failed.task, error = %failed, "a builder task failed while stopping");
    }
    if let Some(failed) = failure {
        return Err(DaemonError::TaskFailed(failed));
    }
    let report = tracker.report();
    info!(
        taken = report.taken,
        succeeded = report.succeeded,
        failed = report.failed,
        "builder stopped"
    );
    Ok(report)
}

/// One NATS account the builder serves, set up: its connection, streams, the repo consumers and
/// the jobs that run its requests.
struct OpenAccount {
    client: async_nats::Client,
    js: jetstream::Context,
    repos: Vec<RepoName>,
    priority: u32,
    consumers: Vec<(RepoName, PullConsumer)>,
    jobs: Arc<Jobs>,
    registry: Registry,
}

/// What every account of the builder is opened with.
struct Opening<'a> {
    config: &'a Config,
    repos: &'a [crate::config::Repo],
    /// The builder's name.
    name: &'a str,
    state_dir: &'a std::path::Path,
    nix: &'a Nix,
    /// Where the builder's NKey seed comes from, when it is Vault.
    vault: Option<VaultSeed>,
    /// A session builder (`--once`, …).
    ephemeral: bool,
}

/// Connects to `account` and creates or adopts its streams, consumers, read model and registry
/// entry. A tenant's requests, events and states stay in the tenant's own account.
async fn open_account(
    opening: &Opening<'_>,
    account: Account,
    stop: &mut watch::Receiver<Stop>,
) -> Result<OpenAccount, DaemonError> {
    let Opening {
        config,
        repos,
        name,
        state_dir,
        nix,
        ref vault,
        ephemeral,
    } = *opening;
    let client = connect_with_retry(config, &account, name, vault.clone(), stop).await?;
    let js = jetstream::new(client.clone());
    ensure_streams(&js, &account.streams, &account.repos).await?;
    let mut consumers = Vec::new();
    for repo in &account.repos {
        consumers.push((
            repo.clone(),
            ensure_consumer(&js, repo, config.request_ack_wait()).await?,
        ));
    }
    let served = repos
        .iter()
        .filter(|repo| account.repos.contains(&repo.name))
        .map(|repo| {
            let mirror = Mirror::new(state_dir, repo.name.as_str(), repo.config.git_source());
            let options: Vec<(String, String)> = repo
                .config
                .nix_options
                .iter()
                .map(|(key, value)| (key.clone(), value.to_arg()))
                .collect();
            let served = ServedRepo {
                nix: nix.for_repo(repo.config.impure, &options),
                config: repo.config.clone(),
                mirror,
            };
            (repo.name.clone(), served)
        })
        .collect::<HashMap<_, _>>();
    let requests =
        js.get_stream(REQUESTS_STREAM)
            .await
            .map_err(|err| crate::bus::BusError::Stream {
                stream: REQUESTS_STREAM.to_owned(),
                message: err.to_string(),
            })?;
    // Keep-alives well inside the ack wait; also how fast a newer `replace` request is noticed.
    let watch_interval = (config.request_ack_wait() / 4).min(Duration::from_secs(2));
    let state = StateStore::open(&js, &account.streams).await?;
    let envelope_mb = config.memory_envelope_mb();
    let placement = crate::placement::Placement::open(
        &js,
        name,
        envelope_mb,
        config.builder.warm_affinity,
        config.builder.lanes.clone(),
        config.streams.replicas,
    )
    .await?;
    let access = Arc::new(crate::access::Access::new(&config.access));
    let jobs = Arc::new(Jobs {
        builder_name: name.to_owned(),
        state_dir: state_dir.to_owned(),
        nix: nix.clone(),
        publisher: Publisher::new(js.clone()),
        state,
        timeouts: config.timeouts(),
        evaluation: config.evaluation(),
        evaluated: Default::default(),
        build_jobs: config.builder.build_jobs,
        max_attempts: config.builder.max_attempts,
        repos: served,
        requests,
        replace_index: Default::default(),
        watch_interval,
        running: Arc::new(Running::new(access.clone())),
        access,
        history: Arc::new(History::new(state_dir, config.builder.closure_history)),
        placement,
    });
    let registry = Registry::open(
        &js,
        name,
        account.repos.iter().map(|r| r.to_string()).collect(),
        config.streams.replicas,
        vault.clone(),
        ephemeral,
        envelope_mb,
    )
    .await?;
    if let Some(tenant) = &account.tenant {
        info!(tenant = %tenant, repos = ?account.repos.iter().map(RepoName::as_str).collect::<Vec<_>>(), priority = account.priority, "serving tenant");
    }
    Ok(OpenAccount {
        client,
        js,
        repos: account.repos,
        priority: account.priority,
        consumers,
        jobs,
        registry,
    })
}

/// Tells systemd (`Type=notify`) about a state change; nothing when not run by systemd
/// (no `NOTIFY_SOCKET`). `NOTIFY_SOCKET` stays set (removing it from a running multi-threaded
/// process is not sound); nix never sees it, as it gets an allowlisted environment.
fn notify_systemd(state: sd_notify::NotifyState<'_>) {
    if let Err(err) = sd_notify::notify(false, &[state]) {
        warn!(error = %err, "telling systemd the builder's state failed");
    }
}

async fn connect_with_retry(
    config: &Config,
    account: &Account,
    name: &str,
    vault: Option<VaultSeed>,
    stop: &mut watch::Receiver<Stop>,
) -> Result<async_nats::Client, DaemonError> {
    let settings = ConnectSettings {
        url: config.nats.url.clone(),
        nkey_file: account.nkey_seed_file.clone(),
        creds_file: account.creds_file.clone(),
        // The builder's user has the same prefix in every tenant's account
        // (nats/multi-tenant.example.conf): accounts do not share subjects.
        inbox_prefix: config.nats.inbox_prefix.clone(),
        name: match &account.tenant {
            Some(tenant) => format!("homelab-deploy builder {name} (tenant {tenant})"),
            None => format!("homelab-deploy builder {name}"),
        },
        timeout: Duration::from_secs(5),
        vault,
    };
    let mut delay = Duration::from_secs(1);
    loop {
        let waiting = match connect(&settings).await {
            Ok(client) => return Ok(client),
            // Everything wrong on the Vault side can be fixed there (or by delivering the
            // AppRole files late), so the builder waits, saying what is wrong each time.
            Err(ClientError::Credentials(CredentialError::Vault(err))) => {
                crate::metrics::builder_state(BuilderPhase::WaitingForVault);
                if err.is_transient() {
                    warn!("{err}; retrying in {}s", delay.as_secs());
                } else {
                    error!("{err}; trying again in {}s", delay.as_secs());
                }
                format!("waiting for Vault: {err}")
            }
            // A bad seed file does not get better by waiting.
            Err(ClientError::Credentials(err)) => return Err(DaemonError::Credentials(err)),
            // The server's users or the seed may be fixed while we wait (`connect` has the
            // seed from Vault fetched again for the next attempt).
            Err(
                err @ (ClientError::AuthRefused { .. }
                | ClientError::CredsRefused { .. }
                | ClientError::InboxRefused { .. }),
            ) => {
                warn!("{err}; retrying in {}s", delay.as_secs());
                format!("waiting for NATS: {err}")
            }
            Err(err) => {
                warn!(error = %err, retry_in_secs = delay.as_secs(), "NATS unreachable; retrying");
                format!("waiting for NATS: {err}")
            }
        };
        // `systemctl status` shows why the builder is not ready yet.
        notify_systemd(sd_notify::NotifyState::Status(&waiting));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopping(stop, Stop::Drain) => return Err(DaemonError::StoppedWhileConnecting),
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// Fetches the seed from Vault every refresh interval, so the next reconnect has a current
/// seed and a broken Vault setup (expired secret id, changed policy) shows in logs and metrics
/// while the builder still runs.
async fn refresh_vault_seed(vault: VaultSeed) {
    let mut ticker = tokio::time::interval(vault.settings().refresh_interval);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        if let Err(err) = vault.fetch().await {
            warn!("refreshing the NKey seed failed: {err}; keeping the one in memory");
        }
    }
}

/// Every few seconds: the builder's state, the NATS connections, and each repo's queue, also
/// by lane.
async fn sample_metrics(
    accounts: Vec<(jetstream::Context, Vec<RepoName>, Arc<Jobs>)>,
    jobs: Vec<Arc<Jobs>>,
    stop: watch::Receiver<Stop>,
) {
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    let mut was_connected = true;
    loop {
        ticker.tick().await;
        let state = if *stop.borrow() != Stop::Running {
            BuilderPhase::Draining
        } else if jobs.iter().all(|jobs| jobs.running.is_empty()) {
            BuilderPhase::Idle
        } else {
            BuilderPhase::Building
        };
        crate::metrics::builder_state(state);
        let connected = accounts.iter().all(|(js, _, _)| {
            js.client().connection_state() == async_nats::connection::State::Connected
        });
        crate::metrics::nats_connected(connected);
        if connected && !was_connected {
            crate::metrics::nats_reconnected();
        }
        was_connected = connected;
        for (js, repos, jobs) in &accounts {
            if let Ok(stream) = js.get_stream(REQUESTS_STREAM).await {
                for repo in repos {
                    if let Some((depth, age)) = queue_of(&stream, repo).await {
                        crate::metrics::queue(repo.as_str(), depth, age);
                    }
                    if let Some(by_lane) = lanes_of(&stream, jobs, repo).await {
                        for (lane, count) in by_lane {
                            crate::metrics::lane_requests(repo.as_str(), lane, count);
                        }
                    }
                }
            }
        }
    }
}

/// Requests of `repo` waiting for a builder, and the age of the oldest of them in seconds.
async fn queue_of(stream: &jetstream::stream::Stream, repo: &RepoName) -> Option<(u64, f64)> {
    let consumer = stream
        .consumer_info(homelab_deploy_protocol::subject::consumer_name(repo))
        .await
        .ok()?;
    let depth = consumer.num_pending;
    if depth == 0 {
        return Some((0, 0.0));
    }
    let first = consumer.delivered.stream_sequence + 1;
    // Requests of other repos may sit in between; a few probes find the oldest of this one.
    for seq in first..first + 64 {
        if let Ok(message) = stream.get_raw_message(seq).await {
            if of_repo(&message.subject, repo) {
                let age = (time::OffsetDateTime::now_utc() - message.time).as_seconds_f64();
                return Some((depth, age.max(0.0)));
            }
        }
    }
    Some((depth, 0.0))
}

/// The requests of `repo` in the queue (waiting, handed back or running: what KEDA's figure
/// `num_pending + num_ack_pending` counts), by the configured lane that fits each
/// ([`crate::placement::Placement::lane_of`]); every lane is listed, 0 when none is queued.
/// `None` without lanes, or when the stream cannot be read.
async fn lanes_of<'a>(
    stream: &jetstream::stream::Stream,
    jobs: &'a Jobs,
    repo: &RepoName,
) -> Option<std::collections::BTreeMap<&'a str, u64>> {
    let mut by_lane: std::collections::BTreeMap<&str, u64> =
        jobs.placement.lanes().map(|lane| (lane, 0)).collect();
    if by_lane.is_empty() {
        return None;
    }
    // Per-subject counts: one subject per target, so each target's need is looked up once.
    let mut subjects = stream
        .info_with_subjects(homelab_deploy_protocol::subject::repo_requests_filter(repo))
        .await
        .ok()?;
    let needs = repo_needs(jobs, repo).await;
    while let Some(entry) = subjects.next().await {
        let (subject, count) = entry.ok()?;
        let Ok((_, target)) = parse_request_subject(&subject) else {
            continue;
        };
        if let Some(lane) = jobs.placement.lane_of(needs.of(&target).as_ref()) {
            if let Some(total) = by_lane.get_mut(lane) {
                *total += count as u64;
            }
        }
    }
    Some(by_lane)
}

/// How long a request handed back for a more urgent one waits before it is offered again.
const PRIORITY_RETRY: Duration = Duration::from_secs(1);
/// Waiting requests looked at for a more urgent one.
const PRIORITY_SCAN: u64 = 256;

/// The priority of a request message (`interactive` when it does not say, or cannot be read).
fn priority_of(payload: &[u8]) -> Priority {
    serde_json::from_slice::<BuildRequest>(payload)
        .ok()
        .and_then(|request| request.priority)
        .unwrap_or_default()
}

/// A request of `repo` queued after `message` whose priority class is higher, if any, among
/// those this builder could start (a request too heavy for it is another builder's to take
/// first, so it never holds this builder's light work back). Only requests below the top class
/// look, so the common case costs nothing.
async fn higher_priority_waiting(
    jobs: &Jobs,
    repo: &RepoName,
    message: &jetstream::Message,
) -> Option<String> {
    let mine = priority_of(&message.payload);
    if mine == Priority::Interactive {
        return None;
    }
    let requests = &jobs.requests;
    let needs = repo_needs(jobs, repo).await;
    let fits = |subject: &str| {
        let target = parse_request_subject(subject)
            .ok()
            .map(|(_, target)| target);
        target.is_none_or(|target| jobs.placement.fits(needs.of(&target).as_ref()))
    };
    let first = message.info().ok()?.stream_sequence + 1;
    let last = requests.clone().info().await.ok()?.state.last_sequence;
    for seq in first..=last.min(first + PRIORITY_SCAN) {
        // A gap is a request already taken or cancelled.
        if let Ok(waiting) = requests.get_raw_message(seq).await {
            if of_repo(&waiting.subject, repo)
                && priority_of(&waiting.payload) < mine
                && fits(&waiting.subject)
            {
                return Some(format!("stream sequence {seq}"));
            }
        }
    }
    None
}

/// What this builder knows to place `repo`'s requests: the bucket's record, the repo's
/// `expected_peak_mb`, and the flake's hosts at the last evaluated commit.
async fn repo_needs<'a>(jobs: &'a Jobs, repo: &RepoName) -> RepoNeeds<'a> {
    let floors = jobs
        .repos
        .get(repo)
        .map(|served| &served.config.expected_peak_mb);
    let hosts = jobs.evaluated.latest_hosts().remove(repo.as_str());
    jobs.placement
        .needs(repo, floors.unwrap_or(&NO_FLOORS), hosts)
        .await
}

/// No `expected_peak_mb` (a repo this builder does not serve: its request is refused anyway).
static NO_FLOORS: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();

/// Where a pulled request of `repo` should run ([`crate::placement`]). A subject that does
/// not parse is taken, to be refused with the reason.
async fn place(jobs: &Jobs, repo: &RepoName, message: &jetstream::Message) -> Decision {
    let Ok((_, target)) = parse_request_subject(&message.subject) else {
        return Decision::Take;
    };
    let info = message.info().ok();
    let waited = info
        .as_ref()
        .map(|info| time::OffsetDateTime::now_utc() - info.published)
        .and_then(|waited| Duration::try_from(waited).ok())
        .unwrap_or_default();
    // The request's own timeout (as the job will cap it), else this builder's.
    let asked = serde_json::from_slice::<BuildRequest>(&message.payload)
        .ok()
        .and_then(|request| request.timeout_secs)
        .map(|secs| Duration::from_secs(secs).min(jobs.timeouts.max));
    let pulled = Pulled {
        delivered: info.map(|info| info.delivered).unwrap_or(1),
        waited,
        timeout: asked.unwrap_or(jobs.timeouts.request),
    };
    let needs = repo_needs(jobs, repo).await;
    jobs.placement.decide(repo, &target, &needs, pulled).await
}

/// Resolves once the daemon is asked to stop at `level` or harder.
async fn stopping(stop: &mut watch::Receiver<Stop>, level: Stop) {
    let _ = stop.wait_for(|stop| *stop >= level).await;
}

type JobHandle = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A pull loop's place in the tenants' turn-taking ([`Shares`]).
struct Turn {
    shares: Arc<Shares>,
    /// Index of the loop's account.
    account: usize,
    /// This loop, among every loop of the builder.
    puller: usize,
}

/// Pulls requests of one repo while a slot is free and it is the repo's tenant's turn. Returns
/// the jobs still running when the builder drains, so the caller can wait for them.
async fn pull_loop(
    repo: RepoName,
    consumer: PullConsumer,
    turn: Turn,
    slots: Arc<Semaphore>,
    jobs: Arc<Jobs>,
    session: Arc<Tracker>,
    stop: watch::Receiver<Stop>,
) -> Vec<JobHandle> {
    let mut running: JoinSet<()> = JoinSet::new();
    let draining = || *stop.borrow() != Stop::Running;
    let mut failures = 0u32;
    while !draining() {
        // Pull only when a slot is free, so no request waits here while another builder idles.
        if slots.available_permits() == 0 {
            let mut stop = stop.clone();
            tokio::select! {
                permit = slots.acquire() => drop(permit),
                _ = stopping(&mut stop, Stop::Drain) => break,
            }
        }
        while running.try_join_next().is_some() {}
        // Pull only what the session may still take, so a limit never strands a request.
        let ticket = {
            let mut stop = stop.clone();
            tokio::select! {
                ticket = session.ticket() => ticket,
                _ = stopping(&mut stop, Stop::Drain) => break,
            }
        };
        let others_waiting = {
            let mut stop = stop.clone();
            tokio::select! {
                others = turn.shares.turn(turn.account) => others,
                _ = stopping(&mut stop, Stop::Drain) => break,
            }
        };
        // While another tenant waits, a pull that finds nothing returns at once, so the turn
        // passes on instead of waiting here for a request.
        let batch = if others_waiting {
            consumer.fetch().max_messages(1).messages().await
        } else {
            consumer
                .batch()
                .max_messages(1)
                .expires(PULL_EXPIRES)
                .messages()
                .await
        };
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(err) => {
                failures += 1;
                let delay = Duration::from_secs(u64::from(failures.min(5)));
                warn!(repo = %repo, error = %err, retry_in_secs = delay.as_secs(), "pulling requests failed");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        let message = match batch.next().await {
            None => {
                turn.shares.wanting(turn.account, turn.puller, false);
                continue;
            }
            Some(Err(err)) => {
                failures += 1;
                warn!(repo = %repo, error = %err, "pulling requests failed");
                tokio::time::sleep(Duration::from_secs(u64::from(failures.min(5)))).await;
                continue;
            }
            Some(Ok(message)) => message,
        };
        failures = 0;
        turn.shares.wanting(turn.account, turn.puller, true);
        let permit = match (draining(), slots.clone().try_acquire_owned()) {
            (false, Ok(permit)) => permit,
            _ => {
                // Another repo's request took the slot meanwhile, or we are draining: hand it back.
                if let Err(err) = message.ack_with(AckKind::Nak(None)).await {
                    warn!(repo = %repo, error = %err, "handing a request back failed; it returns after the ack wait");
                }
                continue;
            }
        };
        if let Some(waiting) = higher_priority_waiting(&jobs, &repo, &message).await {
            // Let the more urgent request through; this one comes back after a short pause.
            info!(repo = %repo, waiting = %waiting, "a request of a higher priority is waiting; handing this one back");
            drop(permit);
            crate::metrics::handed_back(repo.as_str(), "priority");
            if let Err(err) = message.ack_with(AckKind::Nak(Some(PRIORITY_RETRY))).await {
                warn!(repo = %repo, error = %err, "handing a request back failed; it returns after the ack wait");
            }
            continue;
        }
        let refusal = match place(&jobs, &repo, &message).await {
            Decision::Take => None,
            Decision::Refuse(reason) => Some(reason),
            Decision::HandBack { delay, reason, why } => {
                info!(repo = %repo, subject = %message.subject, why = %why, delay_ms = delay.as_millis() as u64, "handing a request back for another builder");
                drop(permit);
                crate::metrics::handed_back(repo.as_str(), reason.as_str());
                // No delay: redelivered at once, to the pull the idle builder has waiting.
                let nak = AckKind::Nak((!delay.is_zero()).then_some(delay));
                if let Err(err) = message.ack_with(nak).await {
                    warn!(repo = %repo, error = %err, "handing a request back failed; it returns after the ack wait");
                }
                continue;
            }
        };
        session.taken(ticket);
        turn.shares.took(turn.account);
        let (jobs, session) = (jobs.clone(), session.clone());
        running.spawn(async move {
            let verdict = jobs.run(message, refusal).await;
            session.done(verdict);
            drop(permit);
        });
    }
    let mut left: Vec<JobHandle> = Vec::new();
    if !running.is_empty() {
        left.push(Box::pin(async move {
            while running.join_next().await.is_some() {}
        }));
    }
    left
}

/// Lists each repo's hosts at the head of its branch now and then every `every` (never again
/// when zero), so the registry announces the hosts a new commit adds without a build.
async fn refresh_hosts(jobs: Arc<Jobs>, repos: Vec<RepoName>, every: Duration) {
    loop {
        futures::future::join_all(repos.iter().map(|repo| jobs.discover_hosts(repo))).await;
        if every.is_zero() {
            return;
        }
        tokio::time::sleep(every).await;
    }
}

/// Whether `subject` is a request subject of `repo`.
fn of_repo(subject: &str, repo: &RepoName) -> bool {
    parse_request_subject(subject).is_ok_and(|(of, _)| &of == repo)
}
