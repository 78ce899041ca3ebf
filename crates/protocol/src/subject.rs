//! Names and subjects.
//!
//! Every token of a subject that comes from outside is checked here first: a repo name, a target (a
//! host name or `all`) and a request id only ever hold `[A-Za-z0-9_-]`, so they cannot add subject
//! tokens, wildcards, or shell and command-line syntax.

use std::fmt;

/// Work-queue stream that holds pending build requests.
pub const REQUESTS_STREAM: &str = "BUILD_REQUESTS";
/// Limits stream that keeps every request's events and log batches for replay.
pub const EVENTS_STREAM: &str = "BUILD_EVENTS";
/// Subject filter of [`EVENTS_STREAM`].
pub const EVENTS_STREAM_SUBJECTS: &str = "build.responses.*.*.*.*";
/// Header that carries the request id on a request message (JetStream de-duplicates on it).
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";
/// Target that means "every host of the flake".
pub const ALL_TARGETS: &str = "all";

const RESERVED_REPO_NAMES: [&str; 2] = ["responses", "api"];
const MAX_REPO_LEN: usize = 64;
const MAX_TARGET_LEN: usize = 128;
const MIN_ID_LEN: usize = 8;
const MAX_ID_LEN: usize = 64;

/// Why a name was refused. The offending value is kept short and escaped, so it is safe to print.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {shown}: {reason}")]
pub struct NameError {
    /// What the name is for: "repo name", "target", "request id".
    pub kind: &'static str,
    /// The value as given, escaped and truncated for display.
    pub shown: String,
    /// What rule it breaks.
    pub reason: String,
}

impl NameError {
    fn new(kind: &'static str, value: &str, reason: impl Into<String>) -> Self {
        Self {
            kind,
            shown: shown(value),
            reason: reason.into(),
        }
    }
}

/// A value quoted and escaped for an error message, cut at 80 characters.
pub fn shown(value: &str) -> String {
    let mut escaped: String = value
        .chars()
        .take(80)
        .flat_map(char::escape_debug)
        .collect();
    if value.chars().count() > 80 {
        escaped.push('…');
    }
    format!("\"{escaped}\"")
}

fn check_token(kind: &'static str, value: &str, min: usize, max: usize) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::new(kind, value, "it is empty"));
    }
    if value.len() < min || value.len() > max {
        return Err(NameError::new(
            kind,
            value,
            format!("it must be {min} to {max} characters long"),
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(NameError::new(
            kind,
            value,
            format!(
                "character {:?} is not allowed (only letters, digits, '_' and '-')",
                bad
            ),
        ));
    }
    Ok(())
}

/// A configured repo name: `[A-Za-z0-9_-]{1,64}`, not `responses` or `api`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    pub fn parse(value: &str) -> Result<Self, NameError> {
        check_token("repo name", value, 1, MAX_REPO_LEN)?;
        if RESERVED_REPO_NAMES.contains(&value) {
            return Err(NameError::new(
                "repo name",
                value,
                "it is reserved for response and API subjects",
            ));
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What to build: every host, or one host name (`[A-Za-z0-9_-]{1,128}`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    All,
    Host(String),
}

impl Target {
    pub fn parse(value: &str) -> Result<Self, NameError> {
        check_token("target", value, 1, MAX_TARGET_LEN)?;
        if value == ALL_TARGETS {
            Ok(Self::All)
        } else {
            Ok(Self::Host(value.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::All => ALL_TARGETS,
            Self::Host(host) => host,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request id: `[A-Za-z0-9_-]{8,64}`, chosen by the client (a NUID) or by the builder.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(String);

impl RequestId {
    pub fn parse(value: &str) -> Result<Self, NameError> {
        check_token("request id", value, MIN_ID_LEN, MAX_ID_LEN)?;
        Ok(Self(value.to_owned()))
    }

    /// Wraps an id produced by a generator that only emits valid characters (e.g. a NUID).
    /// Falls back to validation so that a bad generator cannot sneak in a wildcard.
    pub fn generated(value: String) -> Result<Self, NameError> {
        Self::parse(&value)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `build.<repo>.<target>`: where a build request is published.
pub fn request_subject(repo: &RepoName, target: &Target) -> String {
    format!("build.{repo}.{target}")
}

/// `build.<repo>.*`: the request subjects of one repo (a stream subject and a consumer filter).
pub fn repo_requests_filter(repo: &RepoName) -> String {
    format!("build.{repo}.*")
}

/// Durable pull consumer that every builder of `repo` shares.
pub fn consumer_name(repo: &RepoName) -> String {
    format!("builder-{repo}")
}

/// `build.responses.<repo>.<target>.<id>.events`
pub fn events_subject(repo: &RepoName, target: &Target, id: &RequestId) -> String {
    format!("build.responses.{repo}.{target}.{id}.events")
}

/// `build.responses.<repo>.<target>.<id>.logs`
pub fn logs_subject(repo: &RepoName, target: &Target, id: &RequestId) -> String {
    format!("build.responses.{repo}.{target}.{id}.logs")
}

/// Splits `build.<repo>.<target>` into its validated parts.
pub fn parse_request_subject(subject: &str) -> Result<(RepoName, Target), NameError> {
    let mut tokens = subject.split('.');
    match (tokens.next(), tokens.next(), tokens.next(), tokens.next()) {
        (Some("build"), Some(repo), Some(target), None) => {
            Ok((RepoName::parse(repo)?, Target::parse(target)?))
        }
        _ => Err(NameError::new(
            "request subject",
            subject,
            "expected build.<repo>.<target>",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reserved_and_hostile_repo_names_are_refused() {
        for bad in [
            "responses",
            "api",
            "",
            "a.b",
            "a*",
            ">",
            "a b",
            "ä",
            "x;rm -rf /",
        ] {
            assert!(RepoName::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(RepoName::parse(&"r".repeat(65)).is_err());
        assert_eq!(
            RepoName::parse("nixos-servers").map(|r| r.to_string()),
            Ok("nixos-servers".to_owned())
        );
    }

    #[test]
    fn target_all_is_special_and_hosts_are_kept() {
        assert_eq!(Target::parse("all"), Ok(Target::All));
        assert_eq!(Target::parse("ns1"), Ok(Target::Host("ns1".into())));
        let err = Target::parse("ns1.>").expect_err("wildcard accepted");
        assert!(err.to_string().contains("'.'"), "{err}");
    }

    #[test]
    fn error_shows_escaped_truncated_value() {
        let err = Target::parse(&format!("a\n{}", "b".repeat(200))).expect_err("accepted");
        let text = err.to_string();
        assert!(text.contains("a\\nbbb"), "{text}");
        assert!(text.len() < 250, "{text}");
    }

    #[test]
    fn ids_have_bounded_length() {
        assert!(RequestId::parse("short").is_err());
        assert!(RequestId::parse(&"x".repeat(65)).is_err());
        assert!(RequestId::parse("abcdEFGH1234_-").is_ok());
    }

    #[test]
    fn subjects_round_trip() {
        let repo = RepoName::parse("nixos-servers").expect("valid");
        let target = Target::parse("ns1").expect("valid");
        let id = RequestId::parse("REQ12345").expect("valid");
        assert_eq!(request_subject(&repo, &target), "build.nixos-servers.ns1");
        assert_eq!(
            events_subject(&repo, &target, &id),
            "build.responses.nixos-servers.ns1.REQ12345.events"
        );
        assert_eq!(
            parse_request_subject("build.nixos-servers.all"),
            Ok((repo, Target::All))
        );
        assert!(parse_request_subject("build.api.status.x").is_err());
        assert!(parse_request_subject("build.responses.x").is_err());
    }

    proptest! {
        /// Whatever string is offered, an accepted name is one subject token without wildcards.
        #[test]
        fn accepted_names_are_single_safe_tokens(value in "\\PC{0,80}") {
            for accepted in [
                RepoName::parse(&value).map(|r| r.to_string()),
                Target::parse(&value).map(|t| t.to_string()),
            ].into_iter().flatten() {
                prop_assert!(!accepted.is_empty());
                prop_assert!(accepted.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
            }
        }

        /// Every name made of allowed characters is accepted, and its subject parses back to it.
        #[test]
        fn valid_names_round_trip(repo in "[A-Za-z0-9_-]{1,64}", target in "[A-Za-z0-9_-]{1,128}") {
            prop_assume!(repo != "responses" && repo != "api");
            let repo = RepoName::parse(&repo).expect("valid repo");
            let target = Target::parse(&target).expect("valid target");
            let subject = request_subject(&repo, &target);
            prop_assert_eq!(parse_request_subject(&subject), Ok((repo, target)));
        }
    }
}
