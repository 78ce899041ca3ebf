//! Prometheus metrics of the builder (`[metrics] listen`), with the `metrics` facade.
//!
//! Label values come only from the config (repo names) and the flake's own host names, never
//! from request text, so a hostile client cannot add label values. Names follow Prometheus
//! conventions: `_total` counters, `_seconds` in base units, histograms with buckets.

use std::net::SocketAddr;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

// Each name once: `describe()` and the setters use these, so a typo cannot split a metric.
const HOST_BUILD_DURATION: &str = "homelab_deploy_host_build_duration_seconds";
const BUILD_INFO: &str = "homelab_deploy_build_info";
const BUILDER_STATE: &str = "homelab_deploy_builder_state";
const HOST_BUILDS_TOTAL: &str = "homelab_deploy_host_builds_total";
const LANE_REQUESTS: &str = "homelab_deploy_lane_requests";
const LOG_BYTES_PUBLISHED_TOTAL: &str = "homelab_deploy_log_bytes_published_total";
const NATS_CONNECTED: &str = "homelab_deploy_nats_connected";
const NATS_RECONNECTS_TOTAL: &str = "homelab_deploy_nats_reconnects_total";
const QUEUE_DEPTH: &str = "homelab_deploy_queue_depth";
const QUEUE_OLDEST_AGE_SECONDS: &str = "homelab_deploy_queue_oldest_age_seconds";
const REQUESTS_FINISHED_TOTAL: &str = "homelab_deploy_requests_finished_total";
const REQUESTS_HANDED_BACK_TOTAL: &str = "homelab_deploy_requests_handed_back_total";
const REQUESTS_RECEIVED_TOTAL: &str = "homelab_deploy_requests_received_total";

/// From one second to two hours: what a NixOS host's evaluation and build take.
const DURATION_BUCKETS: [f64; 12] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
];

/// What the builder is doing, for `homelab_deploy_builder_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuilderPhase {
    /// Before the first NATS connection.
    Starting,
    Idle,
    Building,
    Draining,
    /// The NKey seed cannot be read from Vault yet.
    WaitingForVault,
}

impl BuilderPhase {
    /// Every phase: each has a gauge, 1 for the current one.
    const ALL: [BuilderPhase; 5] = [
        Self::Starting,
        Self::Idle,
        Self::Building,
        Self::Draining,
        Self::WaitingForVault,
    ];

    /// The `state` label.
    fn label(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Idle => "idle",
            Self::Building => "building",
            Self::Draining => "draining",
            Self::WaitingForVault => "waiting_for_vault",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot serve metrics on {listen}: {message}; change [metrics] listen or set enable = false"
)]
pub struct MetricsError {
    listen: SocketAddr,
    message: String,
}

/// Starts the `/metrics` endpoint on `listen` and describes every metric.
pub fn install(listen: SocketAddr) -> Result<(), MetricsError> {
    let error = |message: String| MetricsError { listen, message };
    // Bind first, so a port in use is a clear error rather than a log line from the exporter.
    std::net::TcpListener::bind(listen).map_err(|err| error(err.to_string()))?;
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets_for_metric(
            Matcher::Full(HOST_BUILD_DURATION.to_owned()),
            &DURATION_BUCKETS,
        )
        .map_err(|err| error(err.to_string()))?
        .install()
        .map_err(|err| error(err.to_string()))?;
    describe();
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(())
}

fn describe() {
    describe_counter!(
        homelab_deploy_credentials::vault::FETCH_FAILURES_METRIC,
        "Failed fetches of the NKey seed from Vault, by reason (unreachable, login, read, missing_field, not_user_seed, credential_file, settings, kv_version)."
    );
    describe_gauge!(
        BUILD_INFO,
        "Version of the running homelab-deploy builder (always 1)."
    );
    describe_counter!(
        REQUESTS_RECEIVED_TOTAL,
        "Build requests taken from the queue, by repo."
    );
    describe_counter!(
        REQUESTS_FINISHED_TOTAL,
        "Build requests finished, by repo and status (succeeded, failed, cancelled)."
    );
    describe_counter!(HOST_BUILDS_TOTAL, "Hosts finished, by repo, host and status (built, cached, build_failed, eval_failed, cancelled, timed_out).");
    describe_histogram!(
        HOST_BUILD_DURATION,
        Unit::Seconds,
        "Time to evaluate and build one host, by repo and host."
    );
    describe_counter!(
        LOG_BYTES_PUBLISHED_TOTAL,
        Unit::Bytes,
        "Build log bytes published to NATS, by repo."
    );
    describe_gauge!(QUEUE_DEPTH, "Requests waiting in the queue, by repo.");
    describe_gauge!(
        QUEUE_OLDEST_AGE_SECONDS,
        Unit::Seconds,
        "Age of the oldest request waiting in the queue, by repo (0 when none waits)."
    );
    describe_gauge!(
        LANE_REQUESTS,
        "Requests in the queue (waiting, handed back or being built), by repo and by the smallest lane of builder.lanes that fits their expected peak memory."
    );
    describe_counter!(
        REQUESTS_HANDED_BACK_TOTAL,
        "Requests this builder pulled and handed back to the queue, by repo and reason (does_not_fit: more than its memory envelope; warm_builder: another idle builder holds the host's last build; priority: a more urgent request waits)."
    );
    describe_gauge!(BUILDER_STATE, "1 for the builder's current state (starting, idle, building, draining, waiting_for_vault), 0 for the others.");
    describe_gauge!(NATS_CONNECTED, "1 while the builder is connected to NATS.");
    describe_counter!(
        NATS_RECONNECTS_TOTAL,
        "Times the builder's NATS connection was re-established."
    );
}

pub fn request_received(repo: &str) {
    counter!(REQUESTS_RECEIVED_TOTAL, "repo" => repo.to_owned()).increment(1);
}

pub fn request_finished(repo: &str, status: &str) {
    counter!(REQUESTS_FINISHED_TOTAL, "repo" => repo.to_owned(), "status" => status.to_owned())
        .increment(1);
}

/// `host` must be a name the flake itself lists.
pub fn host_finished(repo: &str, host: &str, status: &str, seconds: f64) {
    counter!(HOST_BUILDS_TOTAL, "repo" => repo.to_owned(), "host" => host.to_owned(), "status" => status.to_owned()).increment(1);
    histogram!(HOST_BUILD_DURATION, "repo" => repo.to_owned(), "host" => host.to_owned())
        .record(seconds);
}

pub fn log_bytes(repo: &str, bytes: u64) {
    counter!(LOG_BYTES_PUBLISHED_TOTAL, "repo" => repo.to_owned()).increment(bytes);
}

pub fn queue(repo: &str, depth: u64, oldest_age_seconds: f64) {
    gauge!(QUEUE_DEPTH, "repo" => repo.to_owned()).set(depth as f64);
    gauge!(QUEUE_OLDEST_AGE_SECONDS, "repo" => repo.to_owned()).set(oldest_age_seconds);
}

/// `lane` must be a name of `builder.lanes`.
pub fn lane_requests(repo: &str, lane: &str, count: u64) {
    gauge!(LANE_REQUESTS, "repo" => repo.to_owned(), "lane" => lane.to_owned()).set(count as f64);
}

/// `reason` is one of the fixed labels the description lists.
pub fn handed_back(repo: &str, reason: &'static str) {
    counter!(REQUESTS_HANDED_BACK_TOTAL, "repo" => repo.to_owned(), "reason" => reason)
        .increment(1);
}

/// Sets the gauge of `current` to 1 and of every other phase to 0.
pub fn builder_state(current: BuilderPhase) {
    for phase in BuilderPhase::ALL {
        gauge!(BUILDER_STATE, "state" => phase.label()).set(if phase == current {
            1.0
        } else {
            0.0
        });
    }
}

pub fn nats_connected(connected: bool) {
    gauge!(NATS_CONNECTED).set(if connected { 1.0 } else { 0.0 });
}

pub fn nats_reconnected() {
    counter!(NATS_RECONNECTS_TOTAL).increment(1);
}
