//! What the fleet learns about each host to place its requests: the host's peak memory (heavy
//! lanes) and the builder that holds its last build (warm-cache affinity).
//!
//! Builders keep one JSON [`RepoPlacement`] per repo in the JetStream key-value bucket
//! [`PLACEMENT_BUCKET`], under the repo's name, and update it after each host they build
//! (compare-and-set on the entry's revision, so two builders never lose each other's update).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// JetStream key-value bucket holding a [`RepoPlacement`] per repo, keyed by repo name.
pub const PLACEMENT_BUCKET: &str = "BUILD_PLACEMENT";

/// Most hosts a [`RepoPlacement`] keeps; past it the host updated longest ago is dropped, so
/// the entry stays far below the server's `max_payload` (about 300 bytes a host).
pub const MAX_PLACEMENT_HOSTS: usize = 2048;

/// Bytes in a MiB: every memory figure of the protocol is in MiB.
pub const MIB: u64 = 1024 * 1024;

/// Everything learned about the hosts of one repo.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoPlacement {
    /// By the host's raw name (as the flake spells it).
    #[serde(default)]
    pub hosts: BTreeMap<String, HostPlacement>,
}

/// What the fleet learned about one host from its builds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPlacement {
    /// Peak resident memory (MiB) of the last evaluation of this host alone (`nix eval` of its
    /// toplevel); absent until the host was evaluated alone once. A shared evaluation of
    /// several hosts measures them together and is not recorded per host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_peak_mb: Option<u64>,
    /// Peak resident memory (MiB) of the last `nix build` of this host that built something
    /// (nix and the build processes it waited for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_peak_mb: Option<u64>,
    /// When a peak was last measured.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub measured_at: Option<OffsetDateTime>,
    /// The builder that built (or found cached) the host last: its store holds the closure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_builder: Option<String>,
    /// The commit of that build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rev: Option<String>,
    /// When that build finished.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub last_built_at: Option<OffsetDateTime>,
}

impl HostPlacement {
    /// The larger of the measured evaluation and build peaks (MiB), when either is known.
    pub fn peak_mb(&self) -> Option<u64> {
        self.eval_peak_mb.max(self.build_peak_mb)
    }

    /// When the entry last changed, for dropping the stalest host first.
    fn updated_at(&self) -> Option<OffsetDateTime> {
        self.measured_at.max(self.last_built_at)
    }
}

impl RepoPlacement {
    /// Drops the hosts updated longest ago until at most [`MAX_PLACEMENT_HOSTS`] are left.
    pub fn bound(&mut self) {
        while self.hosts.len() > MAX_PLACEMENT_HOSTS {
            let stalest = self
                .hosts
                .iter()
                .min_by_key(|(_, host)| host.updated_at())
                .map(|(name, _)| name.clone());
            match stalest {
                Some(name) => self.hosts.remove(&name),
                None => break,
            };
        }
    }
}

/// Bytes rounded up to whole MiB.
pub fn mib_of(bytes: u64) -> u64 {
    bytes.div_ceil(MIB)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_is_the_larger_measurement_and_absent_fields_stay_out() {
        let host = HostPlacement {
            eval_peak_mb: Some(700),
            build_peak_mb: Some(40),
            ..Default::default()
        };
        assert_eq!(host.peak_mb(), Some(700));
        assert_eq!(HostPlacement::default().peak_mb(), None);
        let json = serde_json::to_string(&host).expect("json");
        assert_eq!(json, r#"{"eval_peak_mb":700,"build_peak_mb":40}"#);
        assert_eq!(mib_of(1), 1);
        assert_eq!(mib_of(MIB), 1);
        assert_eq!(mib_of(MIB + 1), 2);
    }

    #[test]
    fn bound_drops_the_stalest_hosts() {
        let mut repo = RepoPlacement::default();
        for i in 0..MAX_PLACEMENT_HOSTS + 2 {
            let at = OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(i as i64);
            repo.hosts.insert(
                format!("h{i}"),
                HostPlacement {
                    measured_at: Some(at),
                    ..Default::default()
                },
            );
        }
        repo.bound();
        assert_eq!(repo.hosts.len(), MAX_PLACEMENT_HOSTS);
        assert!(!repo.hosts.contains_key("h0") && !repo.hosts.contains_key("h1"));
        assert!(repo.hosts.contains_key("h2"));
    }
}
