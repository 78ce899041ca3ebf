//! Names and subjects.
//!
//! Every token of a subject that comes from outside is checked here first: a repo name and a request
//! id only ever hold `[A-Za-z0-9_-]`, and a target token only `[A-Za-z0-9_-]` and `%`, so none can
//! add subject tokens, wildcards, or shell and command-line syntax.
//!
//! A host name is any string the flake uses as a `nixosConfigurations` attribute name. It travels
//! in a subject as its *token*: every UTF-8 byte outside `[A-Za-z0-9_-]` percent-encoded as `%XX`
//! (upper-case hex), so `web.example.org` is `web%2Eexample%2Eorg`, and a name made only of
//! `[A-Za-z0-9_-]` is its own token. The token `all` means every host; a host literally named
//! `all` is `%61ll`. Only the canonical token of a name is accepted, so one host has exactly one
//! subject (what `replace` and the per-subject queue limit rely on).

use std::fmt;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

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
/// Longest target token; well within NATS' 4 KiB control line with the other subject tokens.
pub const MAX_TARGET_TOKEN_LEN: usize = 512;
/// The one byte that starts an escape in a target token.
pub const TOKEN_ESCAPE: char = '%';
/// The token of the host literally named `all` (its first letter escaped).
pub const HOST_NAMED_ALL_TOKEN: &str = "%61ll";
/// Bytes a host name keeps in its token: `[A-Za-z0-9_-]`; every other byte is escaped.
const TOKEN_ESCAPED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'_').remove(b'-');
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

/// Percent-encodes `host`: every UTF-8 byte outside `[A-Za-z0-9_-]` becomes `%XX` (upper-case
/// hex). The result holds only `[A-Za-z0-9_%-]`: never a `.`, `/`, wildcard or whitespace, so it
/// is one subject token and, when 1 to 255 bytes long, a safe file name. Unlike
/// [`Target::token`] it does not treat `all` specially.
pub fn encode_host(host: &str) -> String {
    utf8_percent_encode(host, TOKEN_ESCAPED).to_string()
}

/// What to build: every host, or one host of the flake's `nixosConfigurations` by its raw name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    All,
    /// The host name as the flake spells it (any non-empty string; see the module docs).
    Host(String),
}

impl Target {
    /// What a person typed: `all` means every host, anything else is one host's raw name
    /// (`web.example.org`, `a"b`). Use [`Target::host`] for a host that is named `all`.
    ///
    /// # Errors
    /// The name is empty, or its token would be longer than [`MAX_TARGET_TOKEN_LEN`].
    pub fn parse(value: &str) -> Result<Self, NameError> {
        if value == ALL_TARGETS {
            Ok(Self::All)
        } else {
            Self::host(value)
        }
    }

    /// The host named `name`, even when that is `all`.
    ///
    /// # Errors
    /// As [`Target::parse`].
    pub fn host(name: &str) -> Result<Self, NameError> {
        if name.is_empty() {
            return Err(NameError::new("host name", name, "it is empty"));
        }
        let target = Self::Host(name.to_owned());
        let len = target.token().len();
        if len > MAX_TARGET_TOKEN_LEN {
            return Err(NameError::new(
                "host name",
                name,
                format!("its subject token is {len} bytes long; the limit is {MAX_TARGET_TOKEN_LEN} (build it with `all`)"),
            ));
        }
        Ok(target)
    }

    /// Reads a target token from a subject: `all`, or the canonical token of one host.
    ///
    /// # Errors
    /// The token is empty or too long, holds a character other than `[A-Za-z0-9_%-]`, a `%` not
    /// followed by two upper-case hex digits, bytes that are not UTF-8, or is not the canonical
    /// token of the name it decodes to (e.g. `%77eb` for `web`); the error then names the
    /// canonical one.
    pub fn from_token(token: &str) -> Result<Self, NameError> {
        const KIND: &str = "target";
        if token == ALL_TARGETS {
            return Ok(Self::All);
        }
        if token.is_empty() {
            return Err(NameError::new(KIND, token, "it is empty"));
        }
        if token.len() > MAX_TARGET_TOKEN_LEN {
            return Err(NameError::new(
                KIND,
                token,
                format!("it must be at most {MAX_TARGET_TOKEN_LEN} characters long"),
            ));
        }
        if let Some(bad) = token
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(*c, '_' | '-' | TOKEN_ESCAPE)))
        {
            return Err(NameError::new(
                KIND,
                token,
                format!(
                    "character {bad:?} is not allowed (only letters, digits, '_', '-' and '%XX' escapes; \
                     docs/protocol.md says how to encode a host name)"
                ),
            ));
        }
        let name = percent_decode_str(token)
            .decode_utf8()
            .map_err(|_| NameError::new(KIND, token, "its %XX escapes do not decode to UTF-8"))?;
        let target = Self::Host(name.into_owned());
        let canonical = target.token();
        if canonical != token {
            return Err(NameError::new(
                KIND,
                token,
                format!(
                    "it is not the canonical token of host {}; use {canonical}",
                    shown(target.as_str())
                ),
            ));
        }
        Ok(target)
    }

    /// The subject token: `all`, or the host name percent-encoded by [`encode_host`], with the
    /// host named `all` as [`HOST_NAMED_ALL_TOKEN`].
    pub fn token(&self) -> String {
        match self {
            Self::All => ALL_TARGETS.to_owned(),
            Self::Host(host) if host == ALL_TARGETS => HOST_NAMED_ALL_TOKEN.to_owned(),
            Self::Host(host) => encode_host(host),
        }
    }

    /// The raw name, for people: `all` or the host name as the flake spells it.
    pub fn as_str(&self) -> &str {
        match self {
            Self::All => ALL_TARGETS,
            Self::Host(host) => host,
        }
    }
}

/// Shows the raw name (what a person reads); subjects use [`Target::token`].
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

    /// The id a request is answered under when it has no valid one of its own (too short, a
    /// dot, not JSON and no header): `stream-seq-<N>`, N being the request's sequence in the
    /// requests stream, which the publish ack tells the client.
    pub fn for_stream_sequence(stream_sequence: u64) -> Result<Self, NameError> {
        Self::parse(&format!("stream-seq-{stream_sequence}"))
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
    format!("build.{repo}.{}", target.token())
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
    format!("build.responses.{repo}.{}.{id}.events", target.token())
}

/// `build.responses.<repo>.<target>.<id>.logs`
pub fn logs_subject(repo: &RepoName, target: &Target, id: &RequestId) -> String {
    format!("build.responses.{repo}.{}.{id}.logs", target.token())
}

/// `build.responses.<repo>.<target>.<id>.attempts`: the builders' claims on a request, one
/// message per attempt that began work (the builders' own bookkeeping, not for clients).
pub fn attempts_subject(repo: &RepoName, target: &Target, id: &RequestId) -> String {
    format!("build.responses.{repo}.{}.{id}.attempts", target.token())
}

/// `build.responses.*.*.<id>.events`: the events of request `id`, whatever its repo and target
/// (a consumer filter on the events stream).
pub fn request_events_filter(id: &RequestId) -> String {
    format!("build.responses.*.*.{id}.events")
}

/// `build.responses.*.*.<id>.logs`: the log batches of request `id`, whatever its repo and
/// target.
pub fn request_logs_filter(id: &RequestId) -> String {
    format!("build.responses.*.*.{id}.logs")
}

/// `build.responses.*.*.*.events`: the events of every request.
pub const ALL_EVENTS_FILTER: &str = "build.responses.*.*.*.events";

/// Splits `build.<repo>.<target>` into its validated parts.
pub fn parse_request_subject(subject: &str) -> Result<(RepoName, Target), NameError> {
    let mut tokens = subject.split('.');
    match (tokens.next(), tokens.next(), tokens.next(), tokens.next()) {
        (Some("build"), Some(repo), Some(target), None) => {
            Ok((RepoName::parse(repo)?, Target::from_token(target)?))
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

    /// NATS subject matching with `*` (one token), enough for the filters here.
    fn matches(filter: &str, subject: &str) -> bool {
        let (filter, subject): (Vec<_>, Vec<_>) =
            (filter.split('.').collect(), subject.split('.').collect());
        filter.len() == subject.len()
            && filter
                .iter()
                .zip(&subject)
                .all(|(f, s)| *f == "*" || f == s)
    }

    #[test]
    fn request_filters_take_the_requests_own_subjects_only() {
        let repo = RepoName::parse("fleet").expect("a repo name");
        let target = Target::parse("web.example.org").expect("a host name");
        let id = RequestId::parse("REQUEST01").expect("an id");
        let other = RequestId::parse("REQUEST02").expect("an id");
        let events = events_subject(&repo, &target, &id);
        let logs = logs_subject(&repo, &target, &id);
        assert!(matches(&request_events_filter(&id), &events));
        assert!(matches(ALL_EVENTS_FILTER, &events));
        assert!(matches(&request_logs_filter(&id), &logs));
        assert!(!matches(&request_events_filter(&id), &logs));
        assert!(!matches(ALL_EVENTS_FILTER, &logs));
        assert!(!matches(&request_events_filter(&other), &events));
        assert!(matches(EVENTS_STREAM_SUBJECTS, &events) && matches(EVENTS_STREAM_SUBJECTS, &logs));
    }

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
        assert_eq!(Target::host("all"), Ok(Target::Host("all".into())));
        assert_eq!(Target::from_token("all"), Ok(Target::All));
        assert_eq!(Target::from_token("%61ll"), Ok(Target::Host("all".into())));
        let err = Target::from_token("ns1.>").expect_err("wildcard accepted");
        assert!(err.to_string().contains("'.'"), "{err}");
    }

    /// The examples docs/protocol.md gives: the token of each raw host name.
    #[test]
    fn host_names_encode_to_documented_tokens() {
        for (name, token) in [
            ("web", "web"),
            ("nix-cache_02", "nix-cache_02"),
            ("web.example.org", "web%2Eexample%2Eorg"),
            ("all", "%61ll"),
            ("All", "All"),
            ("all.example.org", "all%2Eexample%2Eorg"),
            ("50%", "50%25"),
            ("%2E", "%252E"),
            ("../../x", "%2E%2E%2F%2E%2E%2Fx"),
            ("a\"b", "a%22b"),
            ("a\\b", "a%5Cb"),
            ("${x}", "%24%7Bx%7D"),
            ("new\nline", "new%0Aline"),
            ("café", "caf%C3%A9"),
            ("a b*>", "a%20b%2A%3E"),
        ] {
            let target = Target::host(name).expect("valid host name");
            assert_eq!(target.token(), token, "{name:?}");
            assert_eq!(Target::from_token(token), Ok(target), "{token}");
        }
    }

    #[test]
    fn only_canonical_tokens_are_accepted() {
        for (token, canonical) in [
            ("%77eb", Some("web")),
            ("web%2eexample", None),
            ("%41ll", Some("All")),
            ("a%2Db", Some("a-b")),
        ] {
            let err = Target::from_token(token).expect_err(token).to_string();
            assert!(
                err.contains("canonical") || err.contains("escape"),
                "{token}: {err}"
            );
            if let Some(canonical) = canonical {
                assert!(err.contains(&format!("use {canonical}")), "{token}: {err}");
            }
        }
        for bad in [
            "", "%", "%G1", "%C3", "a.b", "a*", ">", "a b", "ä", "%C3%A9%",
        ] {
            assert!(Target::from_token(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Target::parse("").is_err());
        assert!(
            Target::parse(&"é".repeat(100)).is_err(),
            "token over 512 bytes accepted"
        );
    }

    #[test]
    fn error_shows_escaped_truncated_value() {
        let err = Target::from_token(&format!("a\n{}", "b".repeat(200))).expect_err("accepted");
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
        /// Whatever string is offered, an accepted repo name or target token is one subject
        /// token without wildcards, and a host name's token holds only `[A-Za-z0-9_%-]`.
        #[test]
        fn accepted_names_are_single_safe_tokens(value in "\\PC{0,80}") {
            for accepted in [
                RepoName::parse(&value).map(|r| r.to_string()),
                Target::from_token(&value).map(|t| t.token()),
            ].into_iter().flatten() {
                prop_assert!(!accepted.is_empty());
                prop_assert!(accepted.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '%'));
            }
            if let Ok(target) = Target::host(&value) {
                prop_assert!(target.token().chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '%'));
            }
        }

        /// Any host name Nix could list comes back from its token unchanged, and its token is
        /// a different string for every different name (the encoding is reversible).
        #[test]
        fn any_host_name_round_trips(name in "\\PC{1,40}|[\\x00-\\x7f]{1,40}") {
            let target = Target::host(&name).expect("valid host");
            prop_assert_eq!(Target::from_token(&target.token()), Ok(Target::Host(name)));
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
