//! Events (`build.responses.<repo>.<target>.<id>.events`) and log batches (`….logs`).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::api::ErrorCode;
use crate::diff::ClosureDiff;
use crate::Identity;

/// One lifecycle or progress event of a request. `seq` counts 1, 2, 3 … per request without gaps,
/// across builders when a request is redelivered, so a client can tell what it missed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    pub seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    #[serde(flatten)]
    pub body: EventBody,
}

/// What happened. Serialized with a `type` field in snake case (`started`, `host_finished`, …).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventBody {
    /// A builder took the request, resolved its commit and knows which hosts it will build.
    /// A request redelivered to another builder gets a new `started` with a higher `attempt`.
    Started {
        builder: String,
        repo: String,
        target: String,
        rev: String,
        hosts: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        requested_by: Option<String>,
        /// Who requested it, verified from the request's signature
        /// ([`crate::identity`]); absent for an unsigned request.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        requested_by_key: Option<Identity>,
        /// Delivery attempt: 1 the first time, more after a builder died mid-build.
        attempt: u64,
        /// Stream sequence of the request message in `BUILD_REQUESTS` (what its publish ack
        /// told the sender). It binds the id to that one message: another message carrying the
        /// same id is refused under `stream-seq-<N>` instead of writing here. Absent from
        /// builders before it existed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_seq: Option<u64>,
        /// When the request was stored in the queue (its JetStream message time), the same in
        /// every event that carries it; absent from older builders.
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            with = "time::serde::rfc3339::option"
        )]
        queued_at: Option<OffsetDateTime>,
    },
    /// The builder starts on one host (evaluation, then build).
    HostStarted {
        host: String,
        /// 1-based position among the request's hosts.
        index: usize,
        total: usize,
    },
    /// Derivations of the current host's build, from `nix build --log-format internal-json`.
    Progress {
        host: String,
        done: u64,
        expected: u64,
        running: u64,
        failed: u64,
    },
    /// One host is done, whatever the outcome.
    HostFinished {
        host: String,
        index: usize,
        total: usize,
        result: HostResult,
        /// Log lines the host produced on the logs subject (numbered 1 to this), all stored
        /// before this event: a follower holding line `log_lines` has the whole log. Absent
        /// from older builders.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        log_lines: Option<u64>,
    },
    /// The builder handed the request back to the queue unfinished (it was stopped while
    /// building); the next builder to take it sends a new `started`.
    Requeued { builder: String, reason: String },
    /// The last event of every request, refusals included.
    Finished {
        status: BuildStatus,
        repo: String,
        target: String,
        /// The commit that was built; absent when the request failed before resolving one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rev: Option<String>,
        hosts: Vec<HostResult>,
        /// Why the whole request failed (refused, unknown ref, flake did not evaluate, …).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        /// The kind of failure, for programs: set whenever `status` is not `succeeded`
        /// (`hosts_failed` when only hosts failed); absent from older builders.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<ErrorCode>,
        /// When the request was stored in the queue, as in `started`; absent from older
        /// builders, and when a request whose id could not be read is refused.
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            with = "time::serde::rfc3339::option"
        )]
        queued_at: Option<OffsetDateTime>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        builder: Option<String>,
        /// Who cancelled the request, when `status` is `cancelled`: the cancel's free-text
        /// `requested_by`, or `replace request <id>`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cancelled_by: Option<String>,
        /// Who cancelled it, verified from the cancel's signature; absent for an unsigned one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cancelled_by_key: Option<Identity>,
        /// Who requested it, verified from the request's signature; absent for an unsigned one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        requested_by_key: Option<Identity>,
        duration_ms: u64,
    },
}

impl EventBody {
    /// The wire name of this event's type.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Started { .. } => "started",
            Self::HostStarted { .. } => "host_started",
            Self::Progress { .. } => "progress",
            Self::HostFinished { .. } => "host_finished",
            Self::Requeued { .. } => "requeued",
            Self::Finished { .. } => "finished",
        }
    }
}

/// Overall outcome of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildStatus {
    Succeeded,
    Failed,
    Cancelled,
}

/// Outcome of one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostStatus {
    /// Built now: at least one derivation was built.
    Built,
    /// The toplevel was already in the store; nothing was built.
    Cached,
    BuildFailed,
    EvalFailed,
    Cancelled,
    TimedOut,
}

impl HostStatus {
    /// Whether the host's toplevel is in the store: `built` or `cached`.
    pub fn is_success(self) -> bool {
        match self {
            Self::Built | Self::Cached => true,
            Self::BuildFailed | Self::EvalFailed | Self::Cancelled | Self::TimedOut => false,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Built => "built",
            Self::Cached => "cached",
            Self::BuildFailed => "build_failed",
            Self::EvalFailed => "eval_failed",
            Self::Cancelled => "cancelled",
            Self::TimedOut => "timed_out",
        }
    }
}

impl BuildStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// `succeeded` when every host succeeded (and there was at least one), `failed` otherwise.
    pub fn from_hosts(hosts: &[HostResult]) -> Self {
        if !hosts.is_empty() && hosts.iter().all(|h| h.status.is_success()) {
            Self::Succeeded
        } else {
            Self::Failed
        }
    }
}

/// The result of one host, in `host_finished` and in `finished`'s `hosts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostResult {
    pub name: String,
    pub status: HostStatus,
    /// The toplevel's store path, when built or cached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_path: Option<String>,
    pub duration_ms: u64,
    /// A short excerpt of what went wrong (the last lines of nix's output), when failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether the closure was copied to the repo's binary cache (`push_to`); absent when the
    /// repo has no cache or the host was not built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed: Option<bool>,
    /// Why the copy to the binary cache failed; the host still counts as built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_error: Option<String>,
    /// The closure compared with the builder's earlier build of the host at another commit;
    /// set when the host was built or cached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closure_diff: Option<ClosureDiff>,
}

/// A batch of build log lines of one host, on `build.responses.<repo>.<target>.<id>.logs`.
/// Lines are numbered per host from 1; a batch holds `lines.len()` consecutive lines from
/// `first_line`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogBatch {
    pub id: String,
    pub host: String,
    pub first_line: u64,
    pub lines: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_event_has_the_documented_shape() {
        let event = Event {
            id: "REQUEST01".into(),
            seq: 7,
            time: OffsetDateTime::UNIX_EPOCH,
            body: EventBody::Finished {
                status: BuildStatus::Failed,
                repo: "demo".into(),
                target: "all".into(),
                rev: Some("abc".into()),
                hosts: vec![HostResult {
                    name: "web".into(),
                    status: HostStatus::EvalFailed,
                    out_path: None,
                    duration_ms: 12,
                    error: Some("boom".into()),
                    pushed: None,
                    push_error: None,
                    closure_diff: None,
                }],
                error: None,
                code: Some(ErrorCode::HostsFailed),
                queued_at: Some(OffsetDateTime::UNIX_EPOCH),
                builder: Some("b1".into()),
                cancelled_by: None,
                cancelled_by_key: None,
                requested_by_key: None,
                duration_ms: 40,
            },
        };
        let json = serde_json::to_value(&event).expect("serializes");
        assert_eq!(json["type"], "finished");
        assert_eq!(json["seq"], 7);
        assert_eq!(json["time"], "1970-01-01T00:00:00Z");
        assert_eq!(json["status"], "failed");
        assert_eq!(json["hosts"][0]["status"], "eval_failed");
        assert!(json.get("error").is_none());
        assert_eq!(json["code"], "hosts_failed");
        assert_eq!(json["queued_at"], "1970-01-01T00:00:00Z");
        let back: Event = serde_json::from_value(json).expect("parses back");
        assert_eq!(back, event);
    }

    /// A sample written by hand from docs/protocol.md must keep parsing.
    #[test]
    fn documented_started_sample_parses() {
        let sample = r#"{"type":"started","id":"REQUEST01","seq":1,"time":"2026-11-23T10:00:00Z",
            "builder":"nix-cache02","repo":"nixos-servers","target":"all","rev":"0123456789abcdef0123456789abcdef01234567",
            "hosts":["ns1","ns2"],"attempt":1}"#;
        let event: Event = serde_json::from_str(sample).expect("parses");
        assert_eq!(event.body.kind(), "started");
    }

    #[test]
    fn overall_status_needs_every_host_to_succeed() {
        let host = |status| HostResult {
            name: "h".into(),
            status,
            out_path: None,
            duration_ms: 0,
            error: None,
            pushed: None,
            push_error: None,
            closure_diff: None,
        };
        assert_eq!(BuildStatus::from_hosts(&[]), BuildStatus::Failed);
        assert_eq!(
            BuildStatus::from_hosts(&[host(HostStatus::Built), host(HostStatus::Cached)]),
            BuildStatus::Succeeded
        );
        assert_eq!(
            BuildStatus::from_hosts(&[host(HostStatus::Built), host(HostStatus::TimedOut)]),
            BuildStatus::Failed
        );
    }
}
