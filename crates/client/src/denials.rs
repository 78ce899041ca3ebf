//! Permission refusals the server reported on this process's NATS connections.
//!
//! The server answers a publish or subscription it refuses only with an asynchronous
//! `-ERR 'Permissions Violation for Publish to "SUBJECT"'` (or `… for Subscription to …`), which
//! async-nats hands to the connection's event callback as text, never to the publish itself
//! (nats-io/nats.rs#1485); a JetStream publish then waits for an ack that never comes, a request
//! whose inbox was refused for a reply that never comes. The callback records the subject here,
//! and a caller whose wait timed out asks whether it was refused meanwhile, so it can stop
//! retrying what no retry fixes and say why.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

/// Most refusals kept; older ones are dropped (a caller asks within seconds of its own).
const KEPT: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Publish,
    Subscription,
}

static REFUSED: Mutex<VecDeque<(Instant, Kind, String)>> = Mutex::new(VecDeque::new());

/// The kind and subject of a server error text, when it is a permission violation.
fn refusal(error: &str) -> Option<(Kind, &str)> {
    const PUBLISH: &str = "Permissions Violation for Publish to ";
    const SUBSCRIPTION: &str = "Permissions Violation for Subscription to ";
    let (kind, start) = match (error.find(PUBLISH), error.find(SUBSCRIPTION)) {
        (Some(at), _) => (Kind::Publish, at + PUBLISH.len()),
        (None, Some(at)) => (Kind::Subscription, at + SUBSCRIPTION.len()),
        (None, None) => return None,
    };
    // A refused queue subscription is reported as `"SUBJECT" using queue "GROUP"`.
    let rest = error[start..].trim();
    let subject = match rest.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next().unwrap_or_default(),
        None => rest,
    };
    (!subject.is_empty()).then_some((kind, subject))
}

/// Records the refusal in `error` (a server error's text), if it is one.
pub(crate) fn record(error: &str) {
    let Some((kind, subject)) = refusal(error) else {
        return;
    };
    let mut refused = REFUSED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if refused.len() == KEPT {
        refused.pop_front();
    }
    refused.push_back((Instant::now(), kind, subject.to_owned()));
}

fn refused_since(since: Instant, kind: Kind, matches: impl Fn(&str) -> bool) -> bool {
    let refused = REFUSED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    refused
        .iter()
        .any(|(at, k, subject)| *at >= since && *k == kind && matches(subject))
}

/// Whether the server refused a publish to `subject` at or after `since` (on any connection of
/// this process; a subject permission is the same for every publish to that subject).
pub fn publish_refused_since(subject: &str, since: Instant) -> bool {
    refused_since(since, Kind::Publish, |refused| refused == subject)
}

/// Whether the server refused a subscription to a reply subject under `inbox_prefix`
/// (`PREFIX.…`) at or after `since`: this user may not receive replies there.
pub(crate) fn inbox_refused_since(inbox_prefix: &str, since: Instant) -> bool {
    refused_since(since, Kind::Subscription, |refused| {
        refused
            .strip_prefix(inbox_prefix)
            .is_some_and(|rest| rest.starts_with('.'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kind_and_subject_of_a_violation() {
        assert_eq!(
            refusal(r#"Permissions Violation for Publish to "build.logs.fleet.web""#),
            Some((Kind::Publish, "build.logs.fleet.web"))
        );
        assert_eq!(
            refusal(r#"Permissions Violation for Subscription to "_INBOX.abc.*""#),
            Some((Kind::Subscription, "_INBOX.abc.*"))
        );
        assert_eq!(
            refusal(r#"Permissions Violation for Subscription to "x.y" using queue "q""#),
            Some((Kind::Subscription, "x.y"))
        );
        assert_eq!(refusal("Maximum Payload Violation"), None);
    }

    #[test]
    fn a_refusal_counts_only_for_its_subject_and_after_the_publish_began() {
        let before = Instant::now();
        record(r#"Permissions Violation for Publish to "a.refused.subject""#);
        assert!(publish_refused_since("a.refused.subject", before));
        assert!(!publish_refused_since("another.subject", before));
        assert!(!publish_refused_since("a.refused.subject", Instant::now()));
    }

    #[test]
    fn an_inbox_refusal_counts_for_its_prefix_only() {
        let before = Instant::now();
        record(r#"Permissions Violation for Subscription to "_INBOX_x.nuid.*""#);
        assert!(inbox_refused_since("_INBOX_x", before));
        assert!(!inbox_refused_since("_INBOX", before));
        assert!(!publish_refused_since("_INBOX_x.nuid.*", before));
    }
}
