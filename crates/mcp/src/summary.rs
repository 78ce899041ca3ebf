//! What the tools return: slim summaries whose JSON schema is each tool's `outputSchema`, and
//! the short text beside them. Both stay within [`RESULT_MAX_BYTES`] however many hosts failed:
//! identical errors are grouped, excerpts are cut, and each result says which call has more.

use homelab_deploy_protocol::api::{
    BuilderInfo, RequestPhase, RequestState, BUILDER_LOST_AFTER_SECS,
};
use homelab_deploy_protocol::{error_excerpt, group_failures, text, DiffStatus, HostStatus};
use rmcp::schemars::{self, JsonSchema};

use crate::choice::{Choice, FailedStatus};
use serde::Serialize;
use time::OffsetDateTime;

/// Most bytes of a result's text, and of its `structuredContent`: about 2,000 tokens each, so
/// a build of 300 failing hosts reads as a page, not as tens of thousands of tokens.
pub(crate) const RESULT_MAX_BYTES: usize = 8 * 1024;

/// How much of a request a summary shows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Detail {
    /// Failure groups shown (the rest are counted).
    pub groups: usize,
    /// Host names shown per group (the rest are counted).
    pub names: usize,
    /// Characters of each group's error excerpt.
    pub excerpt_chars: usize,
    /// Up to this many hosts, every host's status is listed.
    pub host_lines: usize,
}

/// One request on its own (`build`, `build_status`).
pub(crate) const FULL: Detail = Detail {
    groups: 6,
    names: 20,
    excerpt_chars: 400,
    host_lines: 30,
};

/// One entry of `list_builds`.
pub(crate) const LIST: Detail = Detail {
    groups: 2,
    names: 5,
    excerpt_chars: 160,
    host_lines: 0,
};

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Counts across a request's hosts.
#[derive(Debug, Serialize, JsonSchema)]
pub(crate) struct HostTotals {
    pub total: u64,
    pub done: u64,
    pub built: u64,
    pub cached: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub running: u64,
    pub queued: u64,
}

/// Derivations of the host being built, from the builder's last `progress` event.
#[derive(Debug, Serialize, JsonSchema)]
pub(crate) struct Derivations {
    pub done: u64,
    pub expected: u64,
}

/// Hosts that failed with the same status and the same error (store hashes and the host's own
/// name aside).
#[derive(Debug, Serialize, JsonSchema)]
pub(crate) struct Failure {
    #[schemars(with = "FailedStatus")]
    pub status: HostStatus,
    /// The end of the first host's error; `build_logs` with that host has the whole log.
    pub error: String,
    /// The first hosts that failed this way.
    pub hosts: Vec<String>,
    /// How many more hosts failed this way (not named).
    #[serde(skip_serializing_if = "is_zero")]
    pub more_hosts: usize,
}

/// One host and its status.
#[derive(Debug, Serialize, JsonSchema)]
pub(crate) struct HostLine {
    pub name: String,
    #[schemars(with = "Choice<HostStatus>")]
    pub status: HostStatus,
    /// What the build changes against the builder's earlier build of the host at another
    /// commit: `+1 -1 ~1, +40.0 KiB (against rev …)` (added, removed, changed packages;
    /// closure size change) or `diff failed: …`; absent when there was nothing to compare with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changes: Option<String>,
    /// The first package changes (`openssl 3.0.1 → 3.0.2`, `+ htop 3.3.0`, `- nano 7.2`);
    /// `homelab-deploy diff` has them all.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
}

/// Package changes listed per host in a summary, and over all hosts; with
/// [`PACKAGE_CHARS`] per change they keep a summary well inside [`RESULT_MAX_BYTES`].
const PACKAGES_SHOWN: usize = 5;
const PACKAGES_SHOWN_IN_ALL: usize = 15;
/// Characters of one listed package change.
const PACKAGE_CHARS: usize = 100;

/// A build request as an assistant needs it.
#[derive(Debug, Serialize, JsonSchema)]
pub(crate) struct BuildSummary {
    pub id: String,
    pub repo: String,
    pub target: String,
    #[schemars(with = "Choice<RequestPhase>")]
    pub phase: RequestPhase,
    /// 1-based place among the repo's queued requests, when queued.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub builder: Option<String>,
    /// The host being evaluated or built, when running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_host: Option<String>,
    pub hosts: HostTotals,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub derivations: Option<Derivations>,
    /// Every finished host's status, when the request has few hosts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<HostLine>,
    /// Failed hosts grouped by identical error (evaluation errors included).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<Failure>,
    /// Further distinct errors not shown.
    #[serde(skip_serializing_if = "is_zero")]
    pub more_failures: usize,
    /// Why the whole request failed or was cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What is happening now, when a `build` call stopped waiting before the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Which call gives more.
    pub details: String,
}

/// The start of `text`, at most `max` characters (cut with `…`).
fn first_chars(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let kept: String = text.chars().take(max.saturating_sub(1)).collect();
    format!("{kept}…")
}

/// The summary of `state` at `detail`.
pub(crate) fn summarize(state: &RequestState, detail: Detail) -> BuildSummary {
    let groups = group_failures(
        state
            .host_results
            .iter()
            .map(|h| (h.name.as_str(), h.status, h.error.as_deref())),
    );
    let more_failures = groups.len().saturating_sub(detail.groups);
    let failures: Vec<Failure> = groups
        .into_iter()
        .take(detail.groups)
        .map(|group| Failure {
            status: group.status,
            error: error_excerpt(&group.error, detail.excerpt_chars),
            more_hosts: group.hosts.len().saturating_sub(detail.names),
            hosts: group.hosts.into_iter().take(detail.names).collect(),
        })
        .collect();
    let mut package_budget = PACKAGES_SHOWN_IN_ALL;
    let results = if state.host_results.len() <= detail.host_lines {
        state
            .host_results
            .iter()
            .map(|h| HostLine {
                name: h.name.clone(),
                status: h.status,
                changes: h
                    .closure_diff
                    .as_ref()
                    .filter(|d| d.status != DiffStatus::NoPrevious)
                    .map(|d| {
                        let mut line = error_excerpt(&d.summary(), detail.excerpt_chars);
                        if let Some(rev) = d.from_rev.as_deref() {
                            line.push_str(&format!(
                                " (against rev {})",
                                rev.get(..12).unwrap_or(rev)
                            ));
                        }
                        line
                    }),
                packages: {
                    let shown: Vec<String> = h
                        .closure_diff
                        .iter()
                        .flat_map(|d| d.packages.iter())
                        .take(PACKAGES_SHOWN.min(package_budget))
                        .map(|p| first_chars(&p.to_string(), PACKAGE_CHARS))
                        .collect();
                    package_budget -= shown.len();
                    shown
                },
            })
            .collect()
    } else {
        Vec::new()
    };
    let running = state.phase == RequestPhase::Running;
    let details = match (&failures.first(), running) {
        (_, true) => format!("build_status with id {} follows it", state.id),
        (Some(failure), _) => format!(
            "build_logs with id {} and host {} has that host's whole log",
            state.id,
            failure.hosts.first().map(String::as_str).unwrap_or("…")
        ),
        (None, false) => format!("build_logs with id {} has the build log", state.id),
    };
    let h = &state.hosts;
    BuildSummary {
        id: state.id.clone(),
        repo: state.repo.clone(),
        target: state.target.clone(),
        phase: state.phase,
        queue_position: state.queue_position,
        rev: state.rev.clone(),
        builder: state.builder.clone(),
        current_host: state.current_host.clone(),
        hosts: HostTotals {
            total: h.total,
            done: h.done,
            built: h.built,
            cached: h.cached,
            failed: h.failed,
            cancelled: h.cancelled,
            running: h.running,
            queued: h.queued,
        },
        derivations: (running && state.derivations.expected > 0).then_some(Derivations {
            done: state.derivations.done,
            expected: state.derivations.expected,
        }),
        results,
        failures,
        more_failures,
        error: state
            .error
            .as_deref()
            .map(|error| error_excerpt(error, detail.excerpt_chars.max(400))),
        note: None,
        details,
    }
}

/// The summary as text an assistant can read aloud, at most [`RESULT_MAX_BYTES`].
pub(crate) fn summary_text(summary: &BuildSummary) -> String {
    let mut text = format!(
        "Build {} of {} {}: {}",
        summary.id,
        summary.repo,
        summary.target,
        summary.phase.as_str()
    );
    if let Some(position) = summary.queue_position {
        text.push_str(&format!(", position {position} in the queue"));
    }
    if let Some(rev) = &summary.rev {
        text.push_str(&format!(", rev {}", rev.get(..12).unwrap_or(rev)));
    }
    if let Some(builder) = &summary.builder {
        text.push_str(&format!(", builder {builder}"));
    }
    text.push('.');
    if let Some(note) = &summary.note {
        text.push_str(&format!("\n{note}"));
    }
    let h = &summary.hosts;
    if h.total > 0 {
        text.push_str(&format!(
            "\nHosts: {} of {} done ({} built, {} cached, {} failed, {} cancelled).",
            h.done, h.total, h.built, h.cached, h.failed, h.cancelled
        ));
    }
    if let Some(host) = &summary.current_host {
        text.push_str(&format!("\nBuilding {host}"));
        if let Some(d) = &summary.derivations {
            text.push_str(&format!(": {}/{} derivations", d.done, d.expected));
        }
        text.push('.');
    }
    for line in &summary.results {
        text.push_str(&format!("\n- {}: {}", line.name, line.status.as_str()));
        if let Some(changes) = &line.changes {
            text.push_str(&format!("; changes {changes}"));
        }
        for package in &line.packages {
            text.push_str(&format!("\n    {package}"));
        }
    }
    for failure in &summary.failures {
        let count = failure.hosts.len() + failure.more_hosts;
        let more = if failure.more_hosts > 0 {
            format!(" and {} more", failure.more_hosts)
        } else {
            String::new()
        };
        text.push_str(&format!(
            "\n{count} host{} {} ({}{more}):\n  {}",
            if count == 1 { "" } else { "s" },
            failure.status.as_str(),
            failure.hosts.join(", "),
            failure.error.replace('\n', "\n  ")
        ));
    }
    if summary.more_failures > 0 {
        text.push_str(&format!(
            "\n{} more distinct errors not shown.",
            summary.more_failures
        ));
    }
    if let Some(error) = &summary.error {
        text.push_str(&format!("\nError: {error}"));
    }
    text.push_str(&format!("\nMore: {}.", summary.details));
    cap_text(text, &summary.id)
}

/// `text` cut to [`RESULT_MAX_BYTES`], saying where the rest is.
pub(crate) fn cap_text(text: String, id: &str) -> String {
    if text.len() <= RESULT_MAX_BYTES {
        return text;
    }
    let tail = format!("\n… (cut; build_status and build_logs with id {id} give the details)");
    format!("{}{tail}", text::head(&text, RESULT_MAX_BYTES - tail.len()))
}

/// One line of `list_builds`.
pub(crate) fn list_line(summary: &BuildSummary) -> String {
    let mut line = format!(
        "{} {} {}: {}",
        summary.id,
        summary.repo,
        summary.target,
        summary.phase.as_str()
    );
    if let Some(position) = summary.queue_position {
        line.push_str(&format!(" #{position}"));
    }
    line.push_str(&format!(
        " ({}/{} hosts done",
        summary.hosts.done, summary.hosts.total
    ));
    if summary.hosts.failed > 0 {
        line.push_str(&format!(", {} failed", summary.hosts.failed));
    }
    line.push(')');
    if let Some(failure) = summary.failures.first() {
        let last = failure.error.lines().last().unwrap_or_default();
        line.push_str(&format!(
            "; {} {}: {}",
            failure.hosts.first().map(String::as_str).unwrap_or("?"),
            failure.status.as_str(),
            last.chars().take(120).collect::<String>()
        ));
    } else if let Some(error) = &summary.error {
        let last = error.lines().last().unwrap_or_default();
        line.push_str(&format!("; {}", last.chars().take(120).collect::<String>()));
    }
    line
}

/// A builder as an assistant needs it.
#[derive(Debug, Serialize, JsonSchema)]
pub(crate) struct BuilderSummary {
    pub name: String,
    pub version: String,
    /// `idle`, `building`, `draining`, `starting`; `lost` when its heartbeat is older than 30 s.
    pub states: Vec<String>,
    /// Request ids it is building.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub building: Vec<String>,
    pub repos: Vec<String>,
    /// Seconds since its last heartbeat.
    pub heartbeat_age_secs: i64,
    pub lost: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vault_error: Option<String>,
}

impl BuilderSummary {
    pub(crate) fn new(info: &BuilderInfo, now: OffsetDateTime) -> Self {
        let age = (now - info.heartbeat).whole_seconds().max(0);
        let lost = age > BUILDER_LOST_AFTER_SECS;
        Self {
            name: info.name.clone(),
            version: info.version.clone(),
            states: if lost {
                vec!["lost".to_owned()]
            } else {
                info.states.iter().map(|s| s.label().to_owned()).collect()
            },
            building: info
                .states
                .iter()
                .filter_map(|s| match s {
                    homelab_deploy_protocol::api::BuilderState::Building { id, .. } => {
                        Some(id.clone())
                    }
                    _ => None,
                })
                .collect(),
            repos: info.repos.clone(),
            heartbeat_age_secs: age,
            lost,
            vault_error: info
                .vault_error
                .as_deref()
                .map(|error| error_excerpt(error, 200)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use homelab_deploy_protocol::api::{HostOutcome, RequestPhase};
    use homelab_deploy_protocol::HostStatus;

    fn failed_state(hosts: usize) -> RequestState {
        let error =
            "error: builder for '/nix/store/0123456789abcdefghijklmnopqrstuv-x.drv' failed\n"
                .repeat(3)
                + &"y".repeat(3000);
        let mut state: RequestState = serde_json::from_value(serde_json::json!({
            "id": "REQUEST01", "repo": "demo", "target": "all", "phase": "failed",
            "queued_at": "2026-11-23T10:00:00Z",
            "hosts": {"total": hosts, "done": hosts, "built": 0, "cached": 0, "running": 0,
                      "failed": hosts, "cancelled": 0, "queued": 0},
            "derivations": {"done": 0, "expected": 0, "running": 0, "failed": 0},
            "last_seq": 1
        }))
        .expect("state");
        state.phase = RequestPhase::Failed;
        state.host_results = (0..hosts)
            .map(|i| HostOutcome {
                name: format!("host{i:03}"),
                status: if i % 2 == 0 {
                    HostStatus::BuildFailed
                } else {
                    HostStatus::EvalFailed
                },
                error: Some(error.clone()),
                closure_diff: None,
            })
            .collect();
        state
    }

    /// A built host's closure diff reaches the assistant: the counts, the size change, the rev
    /// it was compared with, and the package changes with their versions.
    #[test]
    fn a_built_hosts_closure_diff_is_in_the_result() {
        use homelab_deploy_protocol::diff::{DiffStatus, PackageChange};
        use homelab_deploy_protocol::ClosureDiff;
        let mut state = failed_state(1);
        state.phase = RequestPhase::Succeeded;
        let change = |name: &str, before: &[&str], after: &[&str]| PackageChange {
            name: name.to_owned(),
            before: before.iter().map(|v| (*v).to_owned()).collect(),
            after: after.iter().map(|v| (*v).to_owned()).collect(),
            size_delta: None,
        };
        state.host_results[0] = HostOutcome {
            name: "web".to_owned(),
            status: HostStatus::Built,
            error: None,
            closure_diff: Some(ClosureDiff {
                status: DiffStatus::Compared,
                from_rev: Some("0123456789abcdef0123456789abcdef01234567".to_owned()),
                added: 1,
                removed: 1,
                changed: 1,
                size_before: Some(1024 * 1024),
                size_after: Some(1024 * 1024 + 40 * 1024),
                packages: vec![
                    change("openssl", &["3.0.1"], &["3.0.2"]),
                    change("htop", &[], &["3.3.0"]),
                    change("nano", &["7.2"], &[]),
                ],
                ..ClosureDiff::no_previous()
            }),
        };
        let summary = summarize(&state, FULL);
        let web = &summary.results[0];
        assert_eq!(
            web.changes.as_deref(),
            Some("+1 -1 ~1, +40.0 KiB (against rev 0123456789ab)")
        );
        assert_eq!(
            web.packages,
            ["openssl 3.0.1 → 3.0.2", "+ htop 3.3.0", "- nano 7.2"]
        );
        let text = summary_text(&summary);
        assert!(
            text.contains("changes +1 -1 ~1") && text.contains("openssl 3.0.1 → 3.0.2"),
            "{text}"
        );
    }

    #[test]
    fn three_hundred_failures_stay_small() {
        let summary = summarize(&failed_state(300), FULL);
        assert_eq!(summary.failures.len(), 2);
        assert_eq!(summary.failures[0].more_hosts, 150 - FULL.names);
        let json = serde_json::to_string(&summary).expect("json");
        assert!(json.len() < RESULT_MAX_BYTES, "{}", json.len());
        let text = summary_text(&summary);
        assert!(text.len() <= RESULT_MAX_BYTES);
        assert!(text.contains("150 hosts build_failed"), "{text}");
        assert!(text.contains("build_logs"), "{text}");
    }
}
