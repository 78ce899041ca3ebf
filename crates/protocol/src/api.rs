//! The control API under `build.api.>`: NATS request/reply with JSON bodies. Every API subject
//! has four tokens or more, so it can never be taken for a build request (`build.<repo>.<target>`).
//!
//! | subject | served by | body → reply |
//! | --- | --- | --- |
//! | `build.api.v1.status` | any builder (queue group) | [`StatusQuery`] → [`RequestState`] or [`ApiError`] |
//! | `build.api.v1.builds` | any builder (queue group) | [`BuildsQuery`] → [`BuildList`] (one page) or [`ApiError`] |
//! | `build.api.v1.builders` | any builder (queue group) | `{}` → [`BuilderList`] |
//! | `build.api.v1.cancel` | any builder (queue group) | [`CancelRequest`] → [`CancelReply`] or [`ApiError`] |
//! | `build.api.builder.<name>.cancel` | builder `<name>` | [`CancelRequest`] → [`CancelReply`] |
//! | `build.api.builder.<name>.drain` | builder `<name>` | `{}` → [`DrainReply`] |
//! | `build.api.builder.<name>.diff` | builder `<name>` | [`DiffQuery`] → [`DiffReply`] or [`ApiError`] |
//!
//! Builders subscribe `build.api.v1.>` (queue group) and `build.api.builder.<name>.>`, so any
//! other verb there gets an [`ApiError`] with [`ErrorCode::UnknownVerb`], never silence.
//!
//! Every reply fits the server's `max_payload`: a page of builds is cut short (with
//! [`BuildList::next_cursor`]) and any other reply too large becomes an [`ApiError`] with code
//! [`ErrorCode::TooLarge`]. A builder answers at most a few queries at once; the rest get an
//! [`ApiError`] with code [`ErrorCode::Busy`] at once.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::subject::shown;
use crate::{BuildStatus, NameError};

pub const STATUS_SUBJECT: &str = "build.api.v1.status";
pub const BUILDS_SUBJECT: &str = "build.api.v1.builds";
pub const BUILDERS_SUBJECT: &str = "build.api.v1.builders";
pub const CANCEL_SUBJECT: &str = "build.api.v1.cancel";
/// What the builders' queue group subscribes: every `build.api.v1.<verb>`.
pub const API_V1_WILDCARD: &str = "build.api.v1.>";
/// Queue group of the API subjects any builder may answer.
pub const API_QUEUE_GROUP: &str = "homelab-deploy-api";
/// JetStream key-value bucket where builders announce themselves.
pub const BUILDERS_BUCKET: &str = "BUILD_BUILDERS";
/// JetStream key-value bucket holding each request's [`RequestState`] under its id: the read
/// model, written by the builder that runs the request at each event and rebuilt from the events
/// stream when missing (docs/decisions/read-model.md).
pub const STATE_BUCKET: &str = "BUILD_STATE";
/// A builder that has not announced itself for this long is shown as lost: six heartbeats
/// (one every 5 s) missed in a row.
pub const BUILDER_LOST_AFTER_SECS: i64 = 30;

/// `build.api.builder.<name>.cancel`
pub fn builder_cancel_subject(builder: &str) -> String {
    format!("build.api.builder.{builder}.cancel")
}

/// `build.api.builder.<name>.drain`
pub fn builder_drain_subject(builder: &str) -> String {
    format!("build.api.builder.{builder}.drain")
}

/// `build.api.builder.<name>.diff`
pub fn builder_diff_subject(builder: &str) -> String {
    format!("build.api.builder.{builder}.diff")
}

/// `build.api.builder.<name>.>`: every verb addressed to builder `<name>`.
pub fn builder_wildcard_subject(builder: &str) -> String {
    format!("build.api.builder.{builder}.>")
}

/// A builder name: it becomes a subject token of the API, so the same rule as a repo name.
pub fn check_builder_name(name: &str) -> Result<(), NameError> {
    let valid = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if valid {
        Ok(())
    } else {
        Err(NameError {
            kind: "builder name",
            shown: shown(name),
            reason: "it must be 1 to 64 letters, digits, '_' or '-'".to_owned(),
        })
    }
}

/// Default page size of `builds` when the query names no `limit`.
pub const DEFAULT_BUILDS_LIMIT: usize = 20;
/// Largest `limit` a `builds` query may ask for; more is refused with [`ErrorCode::Invalid`] (page
/// with `cursor` instead).
pub const MAX_BUILDS_LIMIT: usize = 200;

/// Machine-readable kind of a failure, serialized in snake case (`not_found`, `queue_full`, …):
/// the `code` of an [`ApiError`] reply, of a `finished` event that did not succeed, and of a
/// client error. A program acts on the code; the text beside it is for people. A code this
/// version does not know (from a newer builder) reads as [`ErrorCode::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// API: no request with that id (never sent, or its events expired); a builder's own
    /// `cancel` also answers it for a request it does not run.
    NotFound,
    /// API: the request has already finished (a `cancel` too late); its state is in the reply.
    AlreadyFinished,
    /// API: try the same call again in a few seconds. A `cancel` of a request a builder took
    /// but that no builder answers for (see docs/protocol.md, "Cancelling").
    Retry,
    /// API: the query is not valid (bad JSON, `limit` out of range, bad cursor, bad id).
    /// `finished`: the request itself is not valid (bad body, bad id, a time limit over the
    /// builder's maximum).
    Invalid,
    /// Client: the queue refused the request, its limit for the target or in all is reached.
    QueueFull,
    /// API and `finished`: the sender may not do this: its signature does not verify, it is
    /// unsigned where the builders require signatures, or its user lacks the right (a
    /// deployer cancelling another user's build, or building a repo outside its list). See
    /// `docs/security.md`.
    Forbidden,
    /// API: the builder is answering as many queries as it allows; retry in a moment.
    Busy,
    /// API: the reply would not fit the server's `max_payload`. `finished`: an event of the
    /// request could not be stored, even shortened.
    TooLarge,
    /// API: no such verb under `build.api.v1.` or `build.api.builder.<name>.`.
    UnknownVerb,
    /// API: reading JetStream, or asking the builder that runs the request, failed.
    Unavailable,
    /// `finished`: the builder that took the request does not serve its repo.
    NotServed,
    /// `finished`: the `ref` or `rev` is not in the repo (or a rev prefix is ambiguous).
    UnknownRef,
    /// `finished`: fetching the repo failed (network, credentials, host key, LFS, submodule).
    FetchFailed,
    /// `finished`: the target host is not in the flake's `nixosConfigurations` at that commit.
    UnknownHost,
    /// `finished`: the flake's host list could not be evaluated (or it is empty).
    EvalFailed,
    /// `finished`: the request's time limit ran out before a host was built.
    TimedOut,
    /// `finished`: cancelled (`cancelled_by` says by whom).
    Cancelled,
    /// `finished`: cancelled because a newer `replace` request for the same target came.
    Superseded,
    /// `finished`: started `builder.max_attempts` times without an end; not tried again.
    GaveUp,
    /// `finished`: at least one host failed (see each host's `status` and `error`).
    HostsFailed,
    /// A code this version does not know.
    #[serde(other)]
    Other,
}

impl ErrorCode {
    /// The wire name (`not_found`, `queue_full`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::AlreadyFinished => "already_finished",
            Self::Retry => "retry",
            Self::Invalid => "invalid",
            Self::QueueFull => "queue_full",
            Self::Forbidden => "forbidden",
            Self::Busy => "busy",
            Self::TooLarge => "too_large",
            Self::UnknownVerb => "unknown_verb",
            Self::Unavailable => "unavailable",
            Self::NotServed => "not_served",
            Self::UnknownRef => "unknown_ref",
            Self::FetchFailed => "fetch_failed",
            Self::UnknownHost => "unknown_host",
            Self::EvalFailed => "eval_failed",
            Self::TimedOut => "timed_out",
            Self::Cancelled => "cancelled",
            Self::Superseded => "superseded",
            Self::GaveUp => "gave_up",
            Self::HostsFailed => "hosts_failed",
            Self::Other => "other",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Any API reply that failed: `{"error": "…", "code": "…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// What failed and what to do, for people.
    pub error: String,
    /// Machine-readable kind; every builder of this version sets it (absent from older ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusQuery {
    pub id: String,
}

/// Where a request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestPhase {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl RequestPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        [
            Self::Queued,
            Self::Running,
            Self::Succeeded,
            Self::Failed,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|phase| phase.as_str() == value)
    }

    pub fn from_status(status: BuildStatus) -> Self {
        match status {
            BuildStatus::Succeeded => Self::Succeeded,
            BuildStatus::Failed => Self::Failed,
            BuildStatus::Cancelled => Self::Cancelled,
        }
    }
}

/// Counts across the hosts of a request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCounts {
    pub total: u64,
    pub done: u64,
    pub built: u64,
    pub cached: u64,
    pub running: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub queued: u64,
}

/// Derivation counts of the host being built, from the last `progress` event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DerivationCounts {
    pub done: u64,
    pub expected: u64,
    pub running: u64,
    pub failed: u64,
}

/// The outcome of one finished host of a request, slim enough for lists: its status and the
/// end of its error ([`crate::error_excerpt`]); the whole log is on the logs subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostOutcome {
    pub name: String,
    pub status: crate::HostStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The host result's closure diff, its package list cut to
    /// [`HOST_OUTCOME_PACKAGES`] (counts kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closure_diff: Option<crate::ClosureDiff>,
}

/// Most package changes of a closure diff in a [`HostOutcome`].
pub const HOST_OUTCOME_PACKAGES: usize = 10;

/// The state of one request, from the streams.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestState {
    pub id: String,
    pub repo: String,
    pub target: String,
    pub phase: RequestPhase,
    /// 1-based place among the repo's queued requests, when queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builder: Option<String>,
    /// The request's free-text note of who asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
    /// Who asked, verified by the builder from the request's signature (from its `started` or
    /// `finished` event; absent while queued and for unsigned requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by_key: Option<crate::Identity>,
    /// When the request was stored in the queue; never changes (from the queue, or the
    /// `queued_at` of its `started` and `finished` events).
    #[serde(with = "time::serde::rfc3339")]
    pub queued_at: OffsetDateTime,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub started_at: Option<OffsetDateTime>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub finished_at: Option<OffsetDateTime>,
    /// Host being built now, when running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_host: Option<String>,
    pub hosts: HostCounts,
    /// Each finished host's status and error excerpt, in the order they finished (evaluation
    /// failures included); empty until a host finishes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_results: Vec<HostOutcome>,
    pub derivations: DerivationCounts,
    /// Why it failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The `code` of its `finished` event: the kind of failure, for programs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    /// Highest event `seq` so far (0 when queued).
    pub last_seq: u64,
    /// Where the request's events come (`build.responses.<repo>.<target>.<id>.events`), so an
    /// id is enough to follow it. Set in `status` answers; not stored in the bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_subject: Option<String>,
    /// Where its build log batches come (`….logs`). Set with `events_subject`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs_subject: Option<String>,
    /// `time` of the event with `last_seq`: when the state last changed (absent when queued).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub updated_at: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildsQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RequestPhase>,
    /// Page size: 1 to [`MAX_BUILDS_LIMIT`] (default [`DEFAULT_BUILDS_LIMIT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Where the page starts: the `next_cursor` of the page before; absent for the newest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildList {
    /// Newest first.
    pub builds: Vec<RequestState>,
    /// More builds follow: pass this as `cursor` for the next page. Absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// A page cursor: the `queued_at` (Unix nanoseconds) and id of the last build of a page. Builds
/// are ordered newest `queued_at` first, then by id, so a cursor stays valid while new requests
/// arrive.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BuildsCursor {
    pub queued_at_ns: i128,
    pub id: String,
}

impl BuildsCursor {
    /// The cursor that continues after `state`.
    pub fn after(state: &RequestState) -> Self {
        Self {
            queued_at_ns: state.queued_at.unix_timestamp_nanos(),
            id: state.id.clone(),
        }
    }

    /// Whether `state` comes after this cursor in list order (newest first, then by id).
    pub fn precedes(&self, state: &RequestState) -> bool {
        self.precedes_key(state.queued_at, &state.id)
    }

    /// Whether a build queued at `queued_at` with id `id` comes after this cursor.
    pub fn precedes_key(&self, queued_at: OffsetDateTime, id: &str) -> bool {
        let at = queued_at.unix_timestamp_nanos();
        at < self.queued_at_ns || (at == self.queued_at_ns && id > self.id.as_str())
    }

    /// Reads a cursor written by [`BuildsCursor::to_string`].
    pub fn parse(text: &str) -> Option<Self> {
        let (at, id) = text.split_once(':')?;
        Some(Self {
            queued_at_ns: at.parse().ok()?,
            id: id.to_owned(),
        })
    }
}

impl std::fmt::Display for BuildsCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.queued_at_ns, self.id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelRequest {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelReply {
    pub id: String,
    /// The request's phase before the cancel: `queued` (removed from the queue) or `running`
    /// (its build was killed).
    pub was: RequestPhase,
    pub message: String,
}

/// What a builder is doing, as announced in the [`BUILDERS_BUCKET`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum BuilderState {
    Idle,
    Building {
        repo: String,
        target: String,
        id: String,
    },
    Draining,
}

impl BuilderState {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Building { .. } => "building",
            Self::Draining => "draining",
        }
    }
}

/// A builder's announcement, refreshed every few seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuilderInfo {
    pub name: String,
    pub version: String,
    /// The protocol version the builder speaks ([`crate::PROTOCOL_VERSION`]). Entries of
    /// builders older than this field hold none: they spoke version 1.
    #[serde(default = "first_protocol_version")]
    pub protocol_version: u32,
    pub repos: Vec<String>,
    /// Running requests (more than one when `max_concurrent_requests` > 1).
    pub states: Vec<BuilderState>,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub heartbeat: OffsetDateTime,
    /// Hosts of each repo's flake at the last commit this builder evaluated (empty until known).
    #[serde(default)]
    pub hosts: std::collections::BTreeMap<String, Vec<String>>,
    /// Why the last fetch of the builder's NKey seed from Vault failed, while it keeps failing
    /// (the builder runs on with the seed it holds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault_error: Option<String>,
    /// A session builder (`builder --once`, `--max-builds`, `--idle-exit`, `--lifetime`): it
    /// exits by itself and removes this entry, its name is usually generated. Absent (false)
    /// in entries of older builders.
    #[serde(default)]
    pub ephemeral: bool,
    /// The builder's memory envelope in MiB (`builder.memory_mb`, by default the machine's
    /// memory): it takes no request whose expected peak memory is larger. Absent in entries of
    /// older builders and when the machine's memory is unknown: such a builder takes anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// Seconds since `heartbeat`, as the reader of the registry saw it (the entry in the
    /// bucket holds 0).
    #[serde(default)]
    pub heartbeat_age_secs: u64,
    /// The heartbeat is older than [`BUILDER_LOST_AFTER_SECS`]: the builder died, hangs or
    /// lost NATS, whatever `states` says (the entry in the bucket holds `false`).
    #[serde(default)]
    pub lost: bool,
}

fn first_protocol_version() -> u32 {
    1
}

impl BuilderInfo {
    /// Sets [`BuilderInfo::heartbeat_age_secs`] and [`BuilderInfo::lost`] as seen at `now`.
    pub fn judge(&mut self, now: OffsetDateTime) {
        let age = (now - self.heartbeat).whole_seconds().max(0);
        self.heartbeat_age_secs = age as u64;
        self.lost = age > BUILDER_LOST_AFTER_SECS;
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuilderList {
    pub builders: Vec<BuilderInfo>,
}

/// Which two builds of a host to compare. A rev is a commit or a prefix of one (at least 7 hex
/// digits) among the builds the builder holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffQuery {
    pub repo: String,
    /// The host's raw name.
    pub host: String,
    /// The earlier build; default: the newest held build, older than `to`, at another commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The later build; default: the newest held build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

/// One build of a host a builder holds (keeps alive with a GC root).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldBuild {
    pub rev: String,
    /// The toplevel store path.
    pub out_path: String,
    /// When the builder built (or last found cached) it.
    #[serde(with = "time::serde::rfc3339")]
    pub built_at: OffsetDateTime,
}

/// A builder's answer to a [`DiffQuery`]: the builds of the host it holds, which of them it
/// took for each side, and the diff when it holds both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffReply {
    pub builder: String,
    /// The builds of the host this builder holds, newest first.
    pub held: Vec<HeldBuild>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<HeldBuild>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<HeldBuild>,
    /// Set when both sides are held; its package list is cut to fit `max_payload`
    /// (`packages_omitted` counts the rest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<crate::ClosureDiff>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainReply {
    pub builder: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_state_is_tagged() {
        let json = serde_json::to_value(BuilderState::Building {
            repo: "demo".into(),
            target: "all".into(),
            id: "REQUEST01".into(),
        })
        .expect("serializes");
        assert_eq!(json["state"], "building");
        assert_eq!(json["id"], "REQUEST01");
    }

    #[test]
    fn api_subjects_are_never_build_requests() {
        for subject in [
            STATUS_SUBJECT.to_owned(),
            BUILDS_SUBJECT.to_owned(),
            BUILDERS_SUBJECT.to_owned(),
            CANCEL_SUBJECT.to_owned(),
            builder_cancel_subject("b1"),
            builder_drain_subject("b1"),
        ] {
            assert!(subject.split('.').count() >= 4, "{subject}");
            assert!(
                crate::subject::parse_request_subject(&subject).is_err(),
                "{subject}"
            );
        }
    }

    #[test]
    fn error_codes_are_snake_case_and_unknown_ones_still_parse() {
        let error = ApiError {
            error: "no request with id x".into(),
            code: Some(ErrorCode::AlreadyFinished),
        };
        let json = serde_json::to_value(&error).expect("serializes");
        assert_eq!(json["code"], "already_finished");
        assert_eq!(
            serde_json::to_value(ErrorCode::UnknownVerb).expect("serializes"),
            "unknown_verb"
        );
        for code in [
            ErrorCode::QueueFull,
            ErrorCode::HostsFailed,
            ErrorCode::GaveUp,
        ] {
            assert_eq!(
                serde_json::to_value(code).expect("serializes"),
                code.as_str()
            );
        }
        let newer: ApiError =
            serde_json::from_str(r#"{"error":"x","code":"something_new"}"#).expect("parses");
        assert_eq!(newer.code, Some(ErrorCode::Other));
        let older: ApiError = serde_json::from_str(r#"{"error":"x"}"#).expect("parses");
        assert_eq!(older.code, None);
    }

    #[test]
    fn builder_names_are_subject_tokens() {
        assert!(check_builder_name("nix-cache02").is_ok());
        assert!(check_builder_name("nix cache").is_err());
        assert!(check_builder_name("a.b").is_err());
        assert!(check_builder_name("").is_err());
    }
}
