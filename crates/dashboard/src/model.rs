//! What the dashboard knows: the fleet and the queue (polled), the builds (folded from the
//! events stream), and the samples behind the charts. Every collection has a cap.

use std::collections::{BTreeMap, HashMap, VecDeque};

use homelab_deploy_client::inspect::{blank_state, fold_event, PendingRequest};
use homelab_deploy_protocol::api::{BuilderInfo, RequestPhase, RequestState};
use homelab_deploy_protocol::{Event, EventBody, HostStatus, Priority};
use time::{Duration, OffsetDateTime};

/// Caps on what the dashboard keeps in memory.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Finished builds kept for "recent results" (the oldest go first).
    pub recent_builds: usize,
    /// Running builds tracked at once; beyond it the oldest running one is dropped (a request
    /// whose builder died stays "running" in the events until another builder takes it).
    pub running_builds: usize,
    /// Hosts with a duration chart, and durations kept per host.
    pub chart_hosts: usize,
    pub durations_per_host: usize,
    /// Queued requests listed one by one (the counts per repo and priority cover all of them).
    pub queue_rows: usize,
    /// Live clients (server-sent event streams) at once; more get `503`.
    pub sse_clients: usize,
    /// Log lines shown on a build's page when it opens, and the longest line (in characters).
    pub log_lines: usize,
    pub log_line_chars: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            recent_builds: 50,
            running_builds: 100,
            chart_hosts: 24,
            durations_per_host: 20,
            queue_rows: 50,
            sse_clients: 32,
            log_lines: 2000,
            log_line_chars: 2000,
        }
    }
}

/// One sample of the queue depth per this interval, kept for [`QUEUE_WINDOW`].
pub const QUEUE_SAMPLE_EVERY: Duration = Duration::seconds(10);
/// How far back the queue-depth chart reaches.
pub const QUEUE_WINDOW: Duration = Duration::hours(1);

/// Builders that left the registry are listed as gone for this long.
const GONE_SHOWN_FOR: Duration = Duration::minutes(10);
/// At most this many gone builders are remembered.
const GONE_KEPT: usize = 16;

/// One host of a build as the page shows it.
#[derive(Debug, Clone)]
pub struct HostView {
    pub name: String,
    /// `None` while queued or running.
    pub status: Option<HostStatus>,
    pub running: bool,
    /// Derivations built and expected, from the host's last `progress` event.
    pub done: u64,
    pub expected: u64,
    pub duration_ms: Option<u64>,
    pub error: Option<String>,
    /// What deploying the new toplevel would change: the closure diff's one-line summary
    /// (`+1 -1 ~2, +45.9 KiB`, `no earlier build`), at most [`MAX_CHANGES_CHARS`] characters.
    pub changes: Option<String>,
}

/// Longest closure-diff summary kept per host (a failed diff's error can be long).
pub const MAX_CHANGES_CHARS: usize = 200;

fn changes(result: &homelab_deploy_protocol::HostResult) -> Option<String> {
    result
        .closure_diff
        .as_ref()
        .map(|diff| diff.summary().chars().take(MAX_CHANGES_CHARS).collect())
}

/// A build: its folded state and its hosts in request order.
#[derive(Debug, Clone)]
pub struct BuildView {
    pub state: RequestState,
    pub hosts: Vec<HostView>,
    /// Whole-request duration from its `finished` event, in milliseconds.
    pub duration_ms: Option<u64>,
}

impl BuildView {
    fn new(event: &Event) -> Self {
        Self {
            state: blank_state(&event.id, "", "", RequestPhase::Running, event.time),
            hosts: Vec::new(),
            duration_ms: None,
        }
    }

    fn host(&mut self, name: &str) -> &mut HostView {
        if let Some(index) = self.hosts.iter().position(|h| h.name == name) {
            return &mut self.hosts[index];
        }
        self.hosts.push(HostView::queued(name));
        let last = self.hosts.len() - 1;
        &mut self.hosts[last]
    }

    fn apply(&mut self, event: &Event) {
        fold_event(&mut self.state, event);
        match &event.body {
            EventBody::Started { hosts, .. } => {
                self.hosts = hosts.iter().map(|h| HostView::queued(h)).collect();
            }
            EventBody::HostStarted { host, .. } => {
                let view = self.host(host);
                view.running = true;
                view.done = 0;
                view.expected = 0;
            }
            EventBody::Progress {
                host,
                done,
                expected,
                ..
            } => {
                let view = self.host(host);
                view.done = *done;
                view.expected = *expected;
            }
            EventBody::HostFinished { result, .. } => {
                let view = self.host(&result.name);
                view.running = false;
                view.status = Some(result.status);
                view.duration_ms = Some(result.duration_ms);
                view.error = result.error.clone();
                view.changes = changes(result);
            }
            EventBody::Requeued { .. } => {
                for host in &mut self.hosts {
                    host.running = false;
                }
            }
            EventBody::Finished {
                hosts, duration_ms, ..
            } => {
                self.duration_ms = Some(*duration_ms);
                for result in hosts {
                    let view = self.host(&result.name);
                    view.running = false;
                    view.status = Some(result.status);
                    view.duration_ms = Some(result.duration_ms);
                    if result.error.is_some() {
                        view.error = result.error.clone();
                    }
                    if result.closure_diff.is_some() {
                        view.changes = changes(result);
                    }
                }
            }
        }
    }
}

impl HostView {
    fn queued(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            status: None,
            running: false,
            done: 0,
            expected: 0,
            duration_ms: None,
            error: None,
            changes: None,
        }
    }
}

/// One finished host build, a point of its duration chart.
#[derive(Debug, Clone)]
pub struct DurationPoint {
    pub id: String,
    /// When the host finished.
    pub at: OffsetDateTime,
    pub status: HostStatus,
    pub duration_ms: u64,
}

/// A builder the page lists: announced now, or gone from the registry since `gone_at`.
#[derive(Debug, Clone)]
pub struct FleetEntry {
    pub info: BuilderInfo,
    pub gone_at: Option<OffsetDateTime>,
}

/// Everything the page shows.
#[derive(Debug, Default)]
pub struct Model {
    pub limits: Limits,
    pub builders: Vec<BuilderInfo>,
    gone: VecDeque<(BuilderInfo, OffsetDateTime)>,
    /// Requests not yet handed to a builder, oldest first, at most `limits.queue_rows`.
    pub queued: Vec<PendingRequest>,
    /// Waiting requests per repo and priority class.
    pub queue_counts: BTreeMap<(String, Priority), u64>,
    pub queue_total: u64,
    /// `(time, waiting requests)`, oldest first, spanning at most [`QUEUE_WINDOW`].
    pub queue_samples: VecDeque<(OffsetDateTime, u64)>,
    builds: HashMap<String, BuildView>,
    /// Per `repo/host`: its last durations, oldest first.
    pub durations: BTreeMap<String, VecDeque<DurationPoint>>,
    /// Why the last read from NATS failed, while it keeps failing.
    pub nats_error: Option<String>,
    /// When the fleet and queue were last read.
    pub polled_at: Option<OffsetDateTime>,
}

impl Model {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            ..Default::default()
        }
    }

    /// Takes a fresh read of the builder registry; builders that left are kept as gone.
    pub fn set_builders(&mut self, builders: Vec<BuilderInfo>, now: OffsetDateTime) {
        for old in std::mem::take(&mut self.builders) {
            if !builders.iter().any(|b| b.name == old.name) {
                self.gone.retain(|(b, _)| b.name != old.name);
                self.gone.push_back((old, now));
            }
        }
        self.gone.retain(|(b, at)| {
            now - *at < GONE_SHOWN_FOR && !builders.iter().any(|n| n.name == b.name)
        });
        while self.gone.len() > GONE_KEPT {
            self.gone.pop_front();
        }
        self.builders = builders;
    }

    /// Announced builders, then gone ones (most recently gone first).
    pub fn fleet(&self) -> Vec<FleetEntry> {
        let mut fleet: Vec<FleetEntry> = self
            .builders
            .iter()
            .map(|info| FleetEntry {
                info: info.clone(),
                gone_at: None,
            })
            .collect();
        fleet.extend(self.gone.iter().rev().map(|(info, at)| FleetEntry {
            info: info.clone(),
            gone_at: Some(*at),
        }));
        fleet
    }

    /// Takes a fresh read of the requests stream; samples the queue depth.
    pub fn set_queue(&mut self, pending: Vec<PendingRequest>, now: OffsetDateTime) {
        self.queue_counts.clear();
        let mut queued = Vec::new();
        let mut total = 0;
        for request in pending.into_iter().filter(|p| p.waiting) {
            total += 1;
            *self
                .queue_counts
                .entry((request.repo.clone(), request.priority))
                .or_insert(0) += 1;
            if queued.len() < self.limits.queue_rows {
                queued.push(request);
            }
        }
        self.queued = queued;
        self.queue_total = total;
        let due = self
            .queue_samples
            .back()
            .is_none_or(|(at, _)| now - *at >= QUEUE_SAMPLE_EVERY);
        if due {
            self.queue_samples.push_back((now, total));
        }
        while self
            .queue_samples
            .front()
            .is_some_and(|(at, _)| now - *at > QUEUE_WINDOW)
        {
            self.queue_samples.pop_front();
        }
    }

    /// Folds one event in; drops the oldest builds beyond the caps.
    pub fn apply(&mut self, event: &Event) {
        let build = self
            .builds
            .entry(event.id.clone())
            .or_insert_with(|| BuildView::new(event));
        build.apply(event);
        if let EventBody::HostFinished { result, .. } = &event.body {
            let key = format!("{}/{}", build.state.repo, result.name);
            let point = DurationPoint {
                id: event.id.clone(),
                at: event.time,
                status: result.status,
                duration_ms: result.duration_ms,
            };
            self.record_duration(key, point);
        }
        self.evict();
    }

    fn record_duration(&mut self, key: String, point: DurationPoint) {
        if !self.durations.contains_key(&key) && self.durations.len() >= self.limits.chart_hosts {
            // The host whose last build is oldest makes room.
            let oldest = self
                .durations
                .iter()
                .min_by_key(|(_, points)| points.back().map(|p| p.at))
                .map(|(key, _)| key.clone());
            if let Some(oldest) = oldest {
                self.durations.remove(&oldest);
            }
        }
        let points = self.durations.entry(key).or_default();
        if points.back().is_some_and(|p| p.id == point.id) {
            points.pop_back(); // the same host again after a redelivery: the last run counts
        }
        points.push_back(point);
        while points.len() > self.limits.durations_per_host {
            points.pop_front();
        }
    }

    fn evict(&mut self) {
        for (phase_running, cap) in [
            (true, self.limits.running_builds),
            (false, self.limits.recent_builds),
        ] {
            let mut ids: Vec<(OffsetDateTime, String)> = self
                .builds
                .values()
                .filter(|b| is_running(b) == phase_running)
                .map(|b| (sort_time(b), b.state.id.clone()))
                .collect();
            if ids.len() <= cap {
                continue;
            }
            ids.sort();
            for (_, id) in ids.iter().take(ids.len() - cap) {
                self.builds.remove(id);
            }
        }
    }

    /// Running builds, oldest first.
    pub fn running(&self) -> Vec<&BuildView> {
        let mut running: Vec<&BuildView> = self.builds.values().filter(|b| is_running(b)).collect();
        running.sort_by_key(|b| (sort_time(b), b.state.id.clone()));
        running
    }

    /// Finished builds, newest first.
    pub fn recent(&self) -> Vec<&BuildView> {
        let mut recent: Vec<&BuildView> = self.builds.values().filter(|b| !is_running(b)).collect();
        recent.sort_by_key(|b| std::cmp::Reverse((sort_time(b), b.state.id.clone())));
        recent
    }

    pub fn build(&self, id: &str) -> Option<&BuildView> {
        self.builds.get(id)
    }
}

fn is_running(build: &BuildView) -> bool {
    matches!(
        build.state.phase,
        RequestPhase::Running | RequestPhase::Queued
    )
}

fn sort_time(build: &BuildView) -> OffsetDateTime {
    build
        .state
        .finished_at
        .or(build.state.started_at)
        .unwrap_or(build.state.queued_at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use homelab_deploy_protocol::{BuildStatus, HostResult};

    fn event(id: &str, seq: u64, body: EventBody) -> Event {
        Event {
            id: id.to_owned(),
            seq,
            time: OffsetDateTime::UNIX_EPOCH + Duration::seconds(seq as i64),
            body,
        }
    }

    fn finished(id: &str, seq: u64) -> Event {
        event(
            id,
            seq,
            EventBody::Finished {
                status: BuildStatus::Succeeded,
                repo: "demo".into(),
                target: "web".into(),
                rev: None,
                hosts: vec![HostResult {
                    name: "web".into(),
                    status: HostStatus::Built,
                    out_path: None,
                    duration_ms: 5,
                    error: None,
                    pushed: None,
                    push_error: None,
                    closure_diff: Some(homelab_deploy_protocol::ClosureDiff {
                        status: homelab_deploy_protocol::DiffStatus::Compared,
                        added: 1,
                        removed: 2,
                        changed: 3,
                        size_before: Some(1024),
                        size_after: Some(2048),
                        ..homelab_deploy_protocol::ClosureDiff::no_previous()
                    }),
                }],
                error: None,
                code: None,
                queued_at: None,
                builder: None,
                cancelled_by: None,
                cancelled_by_key: None,
                requested_by_key: None,
                duration_ms: 7,
            },
        )
    }

    #[test]
    fn recent_builds_are_capped_newest_kept() {
        let mut model = Model::new(Limits {
            recent_builds: 3,
            ..Limits::default()
        });
        for i in 0..10 {
            model.apply(&finished(&format!("req{i:05}"), i + 1));
        }
        let ids: Vec<&str> = model.recent().iter().map(|b| b.state.id.as_str()).collect();
        assert_eq!(ids, ["req00009", "req00008", "req00007"]);
    }

    #[test]
    fn a_hosts_closure_diff_shows_as_its_changes() {
        let mut model = Model::new(Limits::default());
        model.apply(&finished("req1", 1));
        let recent = model.recent();
        assert_eq!(
            recent[0].hosts[0].changes.as_deref(),
            Some("+1 -2 ~3, +1.0 KiB")
        );
        let page = crate::render::recent(&model).into_string();
        assert!(page.contains("+1 -2 ~3, +1.0 KiB"), "{page}");
    }

    #[test]
    fn progress_lands_on_its_host() {
        let mut model = Model::new(Limits::default());
        model.apply(&event(
            "req1",
            1,
            EventBody::Started {
                builder: "b1".into(),
                repo: "demo".into(),
                target: "all".into(),
                rev: "abc".into(),
                hosts: vec!["web".into(), "db".into()],
                requested_by: None,
                requested_by_key: None,
                attempt: 1,
                request_seq: None,
                queued_at: None,
            },
        ));
        model.apply(&event(
            "req1",
            2,
            EventBody::Progress {
                host: "db".into(),
                done: 2,
                expected: 4,
                running: 1,
                failed: 0,
            },
        ));
        let build = &model.running()[0];
        assert_eq!((build.hosts[1].done, build.hosts[1].expected), (2, 4));
        assert_eq!(build.hosts[0].expected, 0);
    }

    #[test]
    fn queue_samples_span_one_hour() {
        let mut model = Model::new(Limits::default());
        let start = OffsetDateTime::UNIX_EPOCH;
        for i in 0..2000 {
            model.set_queue(Vec::new(), start + Duration::seconds(i * 5));
        }
        let count = model.queue_samples.len() as i64;
        assert!(count <= QUEUE_WINDOW.whole_seconds() / QUEUE_SAMPLE_EVERY.whole_seconds() + 1);
    }
}
