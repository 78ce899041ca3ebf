//! Short forms of host failures for what people and assistants read: the end of an error, and
//! hosts grouped by identical error, so 300 hosts failing the same way read as one entry.

use crate::HostStatus;

/// Most characters of an [`error_excerpt`].
pub const EXCERPT_MAX_CHARS: usize = 400;
/// Most lines of an [`error_excerpt`].
pub const EXCERPT_MAX_LINES: usize = 6;

/// The end of `error`: its last non-empty lines (at most [`EXCERPT_MAX_LINES`]) and at most
/// `max_chars` characters, cut at the front with `…` where cut. Nix puts the cause last.
pub fn error_excerpt(error: &str, max_chars: usize) -> String {
    let lines: Vec<&str> = error
        .lines()
        .map(str::trim_end)
        .filter(|line| !line.trim().is_empty())
        .collect();
    let first = lines.len().saturating_sub(EXCERPT_MAX_LINES);
    let kept = lines[first..].join("\n");
    let count = kept.chars().count();
    if count <= max_chars {
        return if first > 0 {
            format!("…\n{kept}")
        } else {
            kept
        };
    }
    let tail: String = kept
        .chars()
        .skip(count - max_chars.saturating_sub(1))
        .collect();
    format!("…{tail}")
}

/// Hosts that failed with the same status and the same error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureGroup {
    pub status: HostStatus,
    /// The error excerpt of the first host of the group (as that host printed it).
    pub error: String,
    /// Every host of the group, in the order given.
    pub hosts: Vec<String>,
}

/// Groups failed hosts (`name`, `status`, `error`) by status and error, in order of first
/// appearance. Errors count as identical when they differ only in the host's own name or in
/// store path hashes (`/nix/store/<hash>-…`), which each host's derivations have of their own.
/// Hosts that succeeded are skipped.
pub fn group_failures<'a>(
    hosts: impl IntoIterator<Item = (&'a str, HostStatus, Option<&'a str>)>,
) -> Vec<FailureGroup> {
    let mut groups: Vec<(String, FailureGroup)> = Vec::new();
    for (name, status, error) in hosts {
        if status.is_success() {
            continue;
        }
        let excerpt = error_excerpt(error.unwrap_or(""), EXCERPT_MAX_CHARS);
        let key = format!("{}\n{}", status.as_str(), normalized(&excerpt, name));
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, group)) => group.hosts.push(name.to_owned()),
            None => groups.push((
                key,
                FailureGroup {
                    status,
                    error: excerpt,
                    hosts: vec![name.to_owned()],
                },
            )),
        }
    }
    groups.into_iter().map(|(_, group)| group).collect()
}

/// `text` with store path hashes and whole-word occurrences of `host` replaced by markers.
fn normalized(text: &str, host: &str) -> String {
    const STORE: &str = "/nix/store/";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(STORE) {
        out.push_str(&rest[..at + STORE.len()]);
        rest = &rest[at + STORE.len()..];
        let hash_len = rest
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric())
            .count();
        if hash_len == 32 {
            out.push('#');
            rest = &rest[32..];
        }
    }
    out.push_str(rest);
    if host.is_empty() {
        return out;
    }
    // '-' and '.' end a word: store paths and messages put the host between them
    // (`nixos-system-web-24.05.drv`).
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut replaced = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(at) = rest.find(host) {
        let before = rest[..at].chars().next_back();
        let after = rest[at + host.len()..].chars().next();
        replaced.push_str(&rest[..at]);
        if before.is_some_and(word) || after.is_some_and(word) {
            replaced.push_str(host);
        } else {
            replaced.push_str("{host}");
        }
        rest = &rest[at + host.len()..];
    }
    replaced.push_str(rest);
    replaced
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpt_keeps_the_end() {
        let error = (1..=20)
            .map(|i| format!("line {i}"))
            .collect::<Vec<_>>()
            .join("\n");
        let excerpt = error_excerpt(&error, EXCERPT_MAX_CHARS);
        assert!(excerpt.starts_with('…'), "{excerpt}");
        assert!(excerpt.ends_with("line 20"), "{excerpt}");
        assert!(!excerpt.contains("line 14\n"), "{excerpt}");
        let long = "x".repeat(5000) + "END";
        let excerpt = error_excerpt(&long, 100);
        assert_eq!(excerpt.chars().count(), 100);
        assert!(excerpt.ends_with("END"));
        assert_eq!(error_excerpt("short\n", 100), "short");
    }

    #[test]
    fn identical_errors_are_grouped() {
        let a = "error: builder for '/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-web.drv' failed\nweb: disk full";
        let b = "error: builder for '/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-db.drv' failed\ndb: disk full";
        let groups = group_failures([
            ("web", HostStatus::BuildFailed, Some(a)),
            ("ok", HostStatus::Built, None),
            ("db", HostStatus::BuildFailed, Some(b)),
            (
                "dbx",
                HostStatus::EvalFailed,
                Some("error: attribute missing"),
            ),
        ]);
        assert_eq!(groups.len(), 2, "{groups:#?}");
        assert_eq!(groups[0].hosts, ["web", "db"]);
        assert_eq!(groups[0].error, a);
        assert_eq!(groups[1].status, HostStatus::EvalFailed);
    }

    #[test]
    fn a_host_name_inside_a_word_is_not_replaced() {
        assert_eq!(
            normalized("dbx db-backup db", "db"),
            "dbx {host}-backup {host}"
        );
    }
}
