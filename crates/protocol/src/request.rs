//! The build request body, and how a raw request message becomes a [`ParsedRequest`] or a
//! [`Refusal`].

use serde::{Deserialize, Serialize};

use crate::subject::{parse_request_subject, shown, NameError, RepoName, RequestId, Target};

/// Largest request body a builder reads; the requests stream refuses larger messages too.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// Most characters a free-text note (`requested_by`, a cancel's `reason`) may have.
pub const MAX_NOTE_CHARS: usize = 256;
const MAX_REF_LEN: usize = 255;

/// Whether `text` is a note the protocol accepts: at most [`MAX_NOTE_CHARS`] characters, none
/// of them a control character (a note is shown in terminals, logs and the dashboard).
pub fn is_valid_note(text: &str) -> bool {
    text.chars().count() <= MAX_NOTE_CHARS && !text.chars().any(char::is_control)
}

/// The JSON body of `build.<repo>.<target>`. Every field is optional; an empty body asks for a
/// build of the head of the repo's configured ref. Unknown fields are ignored, so newer clients
/// can talk to older builders.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRequest {
    /// Request id; must equal the `Nats-Msg-Id` header when both are given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Who asked (user@host, "timer", "ci"): shown in events and logs, never interpreted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
    /// Branch or tag to build instead of the repo's configured ref.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    /// Exact commit to build (7 to 40 hex digits); wins over `ref`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    /// `enqueue` (default) or `replace`: cancel older requests for the same repo and target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// Per-host time limit instead of the builder's default (within its maximum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_timeout_secs: Option<u64>,
    /// Time limit of the whole request instead of the builder's default (within its maximum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// `interactive` (default), `ci` or `scheduled`: a builder takes waiting requests of a
    /// higher class first; FIFO within a class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
}

/// Priority class of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// A person waiting for it.
    #[default]
    Interactive,
    /// CI after or before a merge.
    Ci,
    /// A timer's routine build.
    Scheduled,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Interactive => "interactive",
            Self::Ci => "ci",
            Self::Scheduled => "scheduled",
        }
    }
}

/// What a request does to older requests for the same repo and target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Wait in line behind them.
    #[default]
    Enqueue,
    /// Cancel them, queued or running; the newest `replace` request wins.
    Replace,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enqueue => "enqueue",
            Self::Replace => "replace",
        }
    }
}

/// A request that passed every check: safe to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedRequest {
    pub id: RequestId,
    pub repo: RepoName,
    pub target: Target,
    pub requested_by: Option<String>,
    pub git_ref: Option<String>,
    pub rev: Option<String>,
    pub mode: Mode,
    pub host_timeout_secs: Option<u64>,
    pub timeout_secs: Option<u64>,
}

/// A request that cannot be acted on. `id` is set when the request's id could be known, so the
/// builder can tell the requester with a `finished` event; `repo` and `target` likewise.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    pub id: Option<RequestId>,
    pub repo: Option<RepoName>,
    pub target: Option<Target>,
    pub reason: String,
}

/// Checks a branch or tag name (`main`, `release/2026-11`, `refs/tags/v1`, `feature/ünïcode`):
/// accepted exactly when `git check-ref-format --allow-onelevel` accepts it, except that a ref
/// starting with `-` is refused too (it could act as an option on a git command line), as is one
/// over 255 bytes. The rules (git-check-ref-format(1)): no component starts with `.` or ends with
/// `.lock`; no `..`, `@{`, `\\`, ASCII control character, space, `~`, `^`, `:`, `?`, `*` or `[`;
/// it does not start or end with `/`, hold `//`, end with `.`, or equal `@`. So a ref can never be a
/// path escape, a revision range or a refspec.
///
/// # Errors
/// The first rule the ref breaks.
pub fn check_git_ref(value: &str) -> Result<(), NameError> {
    let bad = |reason: &str| {
        Err(NameError {
            kind: "git ref",
            shown: shown(value),
            reason: reason.to_owned(),
        })
    };
    if value.is_empty() || value.len() > MAX_REF_LEN {
        return bad("it must be 1 to 255 bytes long");
    }
    if value.starts_with('-') {
        return bad("it may not start with '-'");
    }
    if value == "@" {
        return bad("it may not be '@'");
    }
    if let Some(c) = value.chars().find(|c| {
        c.is_ascii_control() || matches!(c, ' ' | '~' | '^' | ':' | '?' | '*' | '[' | '\\')
    }) {
        return bad(&format!(
            "character {c:?} is not allowed (no space, control character, '~', '^', ':', '?', '*', '[' or '\\')"
        ));
    }
    if value.contains("..") || value.contains("@{") {
        return bad("it may not contain '..' or '@{'");
    }
    if value.starts_with('/') || value.ends_with('/') || value.contains("//") {
        return bad("it may not start or end with '/' or contain '//'");
    }
    if value.ends_with('.') {
        return bad("it may not end with '.'");
    }
    if value
        .split('/')
        .any(|component| component.starts_with('.') || component.ends_with(".lock"))
    {
        return bad("no '/'-separated part may start with '.' or end with '.lock'");
    }
    Ok(())
}

/// Checks a commit id: 7 to 40 hex digits.
pub fn check_rev(value: &str) -> Result<(), NameError> {
    if (7..=40).contains(&value.len()) && value.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(NameError {
            kind: "rev",
            shown: shown(value),
            reason: "a commit id is 7 to 40 hex digits".to_owned(),
        })
    }
}

/// Turns a request message into a valid request.
///
/// `header_id` is the `Nats-Msg-Id` header. The id is taken from it first, then from the body, so
/// that a request with a body that is not even JSON can still be answered on its events subject.
/// `generate_id` is called when neither gives one.
pub fn parse_request(
    subject: &str,
    header_id: Option<&str>,
    body: &[u8],
    generate_id: impl FnOnce() -> String,
) -> Result<ParsedRequest, Refusal> {
    let (repo, target) = parse_request_subject(subject).map_err(|err| Refusal {
        id: header_id.and_then(|id| RequestId::parse(id).ok()),
        repo: None,
        target: None,
        reason: err.to_string(),
    })?;
    let mut refusal = Refusal {
        id: None,
        repo: Some(repo.clone()),
        target: Some(target.clone()),
        reason: String::new(),
    };
    let refuse = |mut refusal: Refusal, reason: String| {
        refusal.reason = reason;
        Err(refusal)
    };

    if let Some(header_id) = header_id {
        match RequestId::parse(header_id) {
            Ok(id) => refusal.id = Some(id),
            Err(err) => return refuse(refusal, format!("header {MSG_ID}: {err}")),
        }
    }
    if body.len() > MAX_REQUEST_BYTES {
        return refuse(
            refusal,
            format!(
                "request body is {} bytes; the limit is {MAX_REQUEST_BYTES}",
                body.len()
            ),
        );
    }
    let request: BuildRequest = if body.iter().all(u8::is_ascii_whitespace) {
        BuildRequest::default()
    } else {
        match serde_json::from_slice(body) {
            Ok(request) => request,
            Err(err) => {
                return refuse(
                    refusal,
                    format!("request body is not a valid build request: {err}"),
                )
            }
        }
    };

    let id = match (&refusal.id, request.id.as_deref()) {
        (Some(header), Some(body)) if header.as_str() != body => {
            return refuse(
                refusal.clone(),
                format!(
                    "request id in the body ({}) differs from the {MSG_ID} header ({header})",
                    shown(body)
                ),
            )
        }
        (Some(header), _) => header.clone(),
        (None, Some(body)) => match RequestId::parse(body) {
            Ok(id) => id,
            Err(err) => return refuse(refusal, err.to_string()),
        },
        (None, None) => match RequestId::generated(generate_id()) {
            Ok(id) => id,
            Err(err) => return refuse(refusal, err.to_string()),
        },
    };
    refusal.id = Some(id.clone());

    if let Some(by) = &request.requested_by {
        if !is_valid_note(by) {
            return refuse(
                refusal,
                format!("requested_by must be at most {MAX_NOTE_CHARS} printable characters"),
            );
        }
    }
    if let Some(git_ref) = &request.git_ref {
        if let Err(err) = check_git_ref(git_ref) {
            return refuse(refusal, err.to_string());
        }
    }
    if let Some(rev) = &request.rev {
        if let Err(err) = check_rev(rev) {
            return refuse(refusal, err.to_string());
        }
    }
    for (field, value) in [
        ("host_timeout_secs", request.host_timeout_secs),
        ("timeout_secs", request.timeout_secs),
    ] {
        if value == Some(0) {
            return refuse(refusal, format!("{field} must be at least 1"));
        }
    }
    Ok(ParsedRequest {
        id,
        repo,
        target,
        requested_by: request.requested_by,
        git_ref: request.git_ref,
        rev: request.rev.map(|rev| rev.to_ascii_lowercase()),
        mode: request.mode.unwrap_or_default(),
        host_timeout_secs: request.host_timeout_secs,
        timeout_secs: request.timeout_secs,
    })
}

const MSG_ID: &str = crate::subject::MSG_ID_HEADER;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(subject: &str, header: Option<&str>, body: &str) -> Result<ParsedRequest, Refusal> {
        parse_request(subject, header, body.as_bytes(), || "GENERATED1".to_owned())
    }

    #[test]
    fn empty_body_is_a_request_for_the_default_ref() {
        let request = parse("build.demo.all", None, "").expect("valid");
        assert_eq!(request.id.as_str(), "GENERATED1");
        assert_eq!(request.target, Target::All);
        assert_eq!(request.git_ref, None);
    }

    #[test]
    fn header_id_is_known_even_when_the_body_is_garbage() {
        let refusal =
            parse("build.demo.web", Some("REQUEST01"), "{not json").expect_err("accepted");
        assert_eq!(
            refusal.id.map(|id| id.to_string()),
            Some("REQUEST01".into())
        );
        assert!(
            refusal.reason.contains("not a valid build request"),
            "{}",
            refusal.reason
        );
    }

    #[test]
    fn wrong_types_are_refused_with_the_field() {
        let refusal =
            parse("build.demo.web", None, r#"{"id":"REQUEST01","rev":5}"#).expect_err("accepted");
        assert!(
            refusal.reason.contains("invalid type"),
            "{}",
            refusal.reason
        );
    }

    #[test]
    fn hostile_fields_are_refused() {
        for body in [
            r#"{"ref":"--upload-pack=evil"}"#,
            r#"{"ref":"a/../../etc"}"#,
            r#"{"rev":"HEAD~1"}"#,
            r#"{"id":"bad id with spaces"}"#,
            r#"{"requested_by":"a\nb"}"#,
        ] {
            assert!(
                parse("build.demo.all", None, body).is_err(),
                "{body} accepted"
            );
        }
    }

    #[test]
    fn oversized_body_is_refused_before_parsing() {
        let body = format!(r#"{{"requested_by":"{}"}}"#, "x".repeat(MAX_REQUEST_BYTES));
        let refusal = parse("build.demo.all", Some("REQUEST01"), &body).expect_err("accepted");
        assert!(refusal.reason.contains("limit"), "{}", refusal.reason);
        assert!(refusal.id.is_some());
    }

    #[test]
    fn mismatched_ids_are_refused() {
        let refusal = parse("build.demo.all", Some("REQUEST01"), r#"{"id":"REQUEST02"}"#)
            .expect_err("accepted");
        assert!(refusal.reason.contains("differs"), "{}", refusal.reason);
    }

    proptest::proptest! {
        /// Whatever bytes arrive, parsing never panics; a refusal always says why, and an
        /// accepted request only holds values that passed the rules.
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..2048),
                                        target in "\\PC{0,40}") {
            let subject = format!("build.demo.{target}");
            match parse_request(&subject, None, &body, || "GENERATED1".to_owned()) {
                Ok(request) => {
                    proptest::prop_assert!(request.rev.as_deref().is_none_or(|r| check_rev(r).is_ok()));
                    proptest::prop_assert!(request.git_ref.as_deref().is_none_or(|r| check_git_ref(r).is_ok()));
                }
                Err(refusal) => proptest::prop_assert!(!refusal.reason.is_empty()),
            }
        }

        /// JSON of the right shape with hostile values: deep nesting, huge numbers, shell and
        /// path syntax; each is parsed or refused, never accepted unchecked.
        #[test]
        fn hostile_json_values_are_checked(
            value in proptest::prop_oneof![
                "\\PC{0,300}".prop_map(serde_json::Value::from),
                proptest::num::i64::ANY.prop_map(serde_json::Value::from),
                proptest::num::f64::ANY.prop_map(serde_json::Value::from),
                Just(serde_json::Value::from("$(reboot)")),
                Just(serde_json::Value::from("../../../../etc/passwd")),
                Just(serde_json::Value::from("-oProxyCommand=x")),
            ],
            field in proptest::sample::select(vec!["id", "ref", "rev", "requested_by", "mode", "timeout_secs"]),
            depth in 0usize..200,
        ) {
            let mut nested = value;
            for _ in 0..depth {
                nested = serde_json::json!([nested]);
            }
            let body = serde_json::json!({ field: nested }).to_string();
            let _ = parse_request("build.demo.all", None, body.as_bytes(), || "GENERATED1".to_owned());
        }
    }

    use proptest::prelude::{Just, Strategy};

    #[test]
    fn full_request_parses() {
        let request = parse(
            "build.demo.web",
            Some("REQUEST01"),
            r#"{"id":"REQUEST01","requested_by":"alice@laptop","ref":"release/2026-11","rev":"ABCDEF1","extra":1}"#,
        )
        .expect("valid");
        assert_eq!(request.rev.as_deref(), Some("abcdef1"));
        assert_eq!(request.git_ref.as_deref(), Some("release/2026-11"));
        assert_eq!(request.requested_by.as_deref(), Some("alice@laptop"));
    }
}
