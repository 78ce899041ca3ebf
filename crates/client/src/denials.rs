//! Publish permission refusals the server reported on this process's NATS connections.
//!
//! The server answers a publish it refuses only with an asynchronous
//! `-ERR 'Permissions Violation for Publish to "SUBJECT"'`, which async-nats hands to the
//! connection's event callback as text, never to the publish itself (nats-io/nats.rs#1485); a
//! JetStream publish then waits for an ack that never comes. The callback records the subject
//! here, and a publisher whose ack timed out asks whether its subject was refused meanwhile, so it
//! can stop retrying what no retry fixes.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

/// Most refusals kept; older ones are dropped (a publisher asks within seconds of its own).
const KEPT: usize = 64;

static REFUSED: Mutex<VecDeque<(Instant, String)>> = Mutex::new(VecDeque::new());

/// The subject of a server error text, when it is a publish permission violation.
pub(crate) fn refused_subject(error: &str) -> Option<&str> {
    const PREFIX: &str = "Permissions Violation for Publish to ";
    let start = error.find(PREFIX)? + PREFIX.len();
    let subject = error[start..].trim().trim_matches('"');
    (!subject.is_empty()).then_some(subject)
}

/// Records the refusal in `error` (a server error's text), if it is one.
pub(crate) fn record(error: &str) {
    let Some(subject) = refused_subject(error) else {
        return;
    };
    let mut refused = REFUSED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if refused.len() == KEPT {
        refused.pop_front();
    }
    refused.push_back((Instant::now(), subject.to_owned()));
}

/// Whether the server refused a publish to `subject` at or after `since` (on any connection of
/// this process; a subject permission is the same for every publish to that subject).
pub fn publish_refused_since(subject: &str, since: Instant) -> bool {
    let refused = REFUSED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    refused
        .iter()
        .any(|(at, refused)| *at >= since && refused == subject)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_subject_of_a_publish_violation_only() {
        assert_eq!(
            refused_subject(r#"Permissions Violation for Publish to "build.logs.fleet.web""#),
            Some("build.logs.fleet.web")
        );
        assert_eq!(
            refused_subject(r#"Permissions Violation for Subscription to "x""#),
            None
        );
        assert_eq!(refused_subject("Maximum Payload Violation"), None);
    }

    #[test]
    fn a_refusal_counts_only_for_its_subject_and_after_the_publish_began() {
        let before = Instant::now();
        record(r#"Permissions Violation for Publish to "a.refused.subject""#);
        assert!(publish_refused_since("a.refused.subject", before));
        assert!(!publish_refused_since("another.subject", before));
        assert!(!publish_refused_since("a.refused.subject", Instant::now()));
    }
}
