//! Which builder starts a request: heavy lanes and warm-cache affinity.
//!
//! A builder declares its memory envelope (`builder.memory_mb`). The fleet learns each host's
//! peak memory from its builds and keeps it, with the builder that built the host last, in the
//! bucket [`PLACEMENT_BUCKET`] (one [`RepoPlacement`] per repo). Before a builder starts a
//! request it pulled, it decides ([`Placement::decide`]):
//!
//! - the request's expected peak (the host's, or the heaviest host's for `all`: measured, with
//!   the repo's `expected_peak_mb` as a floor) does not fit its envelope: it hands the request
//!   back for a live builder that fits; when the registry shows none, it hands it back while a
//!   configured lane (`builder.lanes`) fits it, for an autoscaler to start a builder of that
//!   lane, up to the request's timeout; else it refuses it at once with an error naming the
//!   host, its peak and the largest envelope in the fleet;
//! - another live builder holds the host's last build and is idle: it hands the request back
//!   for that builder, a few times at most (about a second in all), then starts it itself.
//!
//! Hand-backs are NAKs, as for priorities (docs/decisions/nak-based-priority.md): the request
//! keeps its place, the builder pulls the next one, so light work never waits behind a heavy
//! request. A hand-back for a builder the registry shows idle is redelivered at once (that
//! builder's pull is waiting), the first [`HANDOFF_DELIVERIES`] times; otherwise after a delay.
//! Why an `all` request is not split, and why lanes are no consumers:
//! docs/decisions/lanes-whole-requests.md, docs/decisions/lanes-wait-for-autoscaled.md.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use homelab_deploy_client::inspect::list_builders;
use homelab_deploy_protocol::api::{BuilderInfo, BuilderState, BUILDER_LOST_AFTER_SECS};
use homelab_deploy_protocol::placement::{mib_of, HostPlacement, RepoPlacement, PLACEMENT_BUCKET};
use homelab_deploy_protocol::{RepoName, Target};
use time::OffsetDateTime;
use tracing::warn;

use crate::bus::BusError;

/// How long a request that does not fit this builder waits before it is offered again.
pub const LANE_RETRY: Duration = Duration::from_secs(1);
/// How long a request handed back for the builder that holds its host's last build waits
/// before it is offered again.
pub const AFFINITY_RETRY: Duration = Duration::from_millis(250);
/// Deliveries of a request after which no builder hands it back for a warmer one: with
/// [`AFFINITY_RETRY`] between them, a request waits about a second at most for that preference.
pub const AFFINITY_DELIVERIES: i64 = 4;
/// Deliveries of a request during which a hand-back for a builder the registry shows idle is
/// redelivered at once; later ones wait [`LANE_RETRY`] or [`AFFINITY_RETRY`], so a registry
/// that is behind (the idle builder just died) cannot make builders pass a request to and fro.
pub const HANDOFF_DELIVERIES: i64 = 2;
/// Compare-and-set attempts of one update of a repo's entry.
const WRITE_ATTEMPTS: usize = 5;

/// What a builder does with a request it pulled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start it here.
    Take,
    /// Hand it back (NAK) to be offered again after `delay` (zero: at once); `why` is logged.
    HandBack {
        delay: Duration,
        reason: HandBackReason,
        why: String,
    },
    /// No live builder can take it: end it at once, `failed`, with this error.
    Refuse(String),
}

/// Why a builder hands a request back: the label of `homelab_deploy_requests_handed_back_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandBackReason {
    /// Its expected peak is more than this builder's envelope.
    DoesNotFit,
    /// Another idle builder holds its host's last build.
    WarmBuilder,
}

impl HandBackReason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DoesNotFit => "does_not_fit",
            Self::WarmBuilder => "warm_builder",
        }
    }
}

/// A pulled request's place in the queue: what [`Placement::decide`] weighs besides its needs.
#[derive(Debug, Clone, Copy)]
pub struct Pulled {
    /// Times JetStream delivered it, this delivery included.
    pub delivered: i64,
    /// Since it was stored in the queue.
    pub waited: Duration,
    /// Its request timeout: how long it may wait for a builder of a lane to appear.
    pub timeout: Duration,
}

/// The expected peak memory of a request: its heaviest host's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    pub host: String,
    /// MiB.
    pub mb: u64,
    /// Where the figure comes from, for messages: "measured" or "expected_peak_mb".
    pub source: &'static str,
}

/// What this builder knows to place one repo's requests.
pub struct RepoNeeds<'a> {
    record: RepoPlacement,
    floors: &'a BTreeMap<String, u64>,
    /// The flake's hosts at the last evaluated commit, when known: an `all` request needs
    /// only what these need (hosts removed from the flake stay in the record a while).
    hosts: Option<Vec<String>>,
}

impl RepoNeeds<'_> {
    /// The expected peak of `host`: its measured peak, at least its `expected_peak_mb`.
    fn of_host(&self, host: &str) -> Option<Need> {
        let measured = self.record.hosts.get(host).and_then(HostPlacement::peak_mb);
        let floor = self.floors.get(host).copied();
        let (mb, source) = match (measured, floor) {
            (Some(m), Some(f)) if f > m => (f, "expected_peak_mb"),
            (Some(m), _) => (m, "measured"),
            (None, Some(f)) => (f, "expected_peak_mb"),
            (None, None) => return None,
        };
        Some(Need {
            host: host.to_owned(),
            mb,
            source,
        })
    }

    /// The expected peak of a request for `target`: for `all`, its heaviest host's.
    pub fn of(&self, target: &Target) -> Option<Need> {
        match target {
            Target::Host(host) => self.of_host(host),
            Target::All => {
                let known: Vec<&String> = match &self.hosts {
                    Some(hosts) => hosts.iter().collect(),
                    None => self.record.hosts.keys().chain(self.floors.keys()).collect(),
                };
                known
                    .into_iter()
                    .filter_map(|host| self.of_host(host))
                    .max_by_key(|need| need.mb)
            }
        }
    }
}

/// The placement bucket, and this builder's envelope.
pub struct Placement {
    store: kv::Store,
    js: jetstream::Context,
    builder: String,
    /// MiB; `None`: unknown, takes anything.
    envelope_mb: Option<u64>,
    /// `builder.warm_affinity`.
    warm_affinity: bool,
    /// `builder.lanes`: name → envelope in MiB.
    lanes: BTreeMap<String, u64>,
}

/// The placement bucket: what a builder creates when it is missing and `builder provision`
/// creates.
pub fn placement_bucket_config(replicas: usize) -> kv::Config {
    kv::Config {
        bucket: PLACEMENT_BUCKET.to_owned(),
        description: "homelab-deploy: per repo, each host's peak memory and last builder"
            .to_owned(),
        history: 1,
        num_replicas: replicas,
        ..Default::default()
    }
}

impl Placement {
    /// Opens (or creates) the placement bucket.
    pub async fn open(
        js: &jetstream::Context,
        builder: &str,
        envelope_mb: Option<u64>,
        warm_affinity: bool,
        lanes: BTreeMap<String, u64>,
        replicas: usize,
    ) -> Result<Self, BusError> {
        let began = std::time::Instant::now();
        let store = match js.get_key_value(PLACEMENT_BUCKET).await {
            Ok(store) => store,
            Err(_) => js
                .create_key_value(placement_bucket_config(replicas))
                .await
                .map_err(|err| {
                    crate::bus::unless_refused(
                        &format!("KV_{PLACEMENT_BUCKET}"),
                        began,
                        format!("key-value bucket {PLACEMENT_BUCKET} is missing"),
                        BusError::Stream {
                            stream: PLACEMENT_BUCKET.to_owned(),
                            message: err.to_string(),
                        },
                    )
                })?,
        };
        Ok(Self {
            store,
            js: js.clone(),
            builder: builder.to_owned(),
            envelope_mb,
            warm_affinity,
            lanes,
        })
    }

    /// The configured lane a request needing `need` belongs to: the smallest that fits it
    /// (the smallest of all when its need is unknown); `None` without lanes or when none fits.
    pub fn lane_of(&self, need: Option<&Need>) -> Option<&str> {
        lane_of(&self.lanes, need).map(|(name, _)| name)
    }

    /// The configured lanes' names.
    pub fn lanes(&self) -> impl Iterator<Item = &str> {
        self.lanes.keys().map(String::as_str)
    }

    /// What the fleet learned about `repo`'s hosts; empty when nothing is stored or the bucket
    /// cannot be read (logged): placement then falls back to the configured floors.
    async fn record(&self, repo: &RepoName) -> RepoPlacement {
        match self.store.get(repo.as_str()).await {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_default(),
            Ok(None) => RepoPlacement::default(),
            Err(err) => {
                warn!(repo = %repo, error = %err, "cannot read the placement bucket; using the configured expected_peak_mb only");
                RepoPlacement::default()
            }
        }
    }

    /// What `repo`'s requests are expected to need.
    pub async fn needs<'a>(
        &self,
        repo: &RepoName,
        floors: &'a BTreeMap<String, u64>,
        hosts: Option<Vec<String>>,
    ) -> RepoNeeds<'a> {
        RepoNeeds {
            record: self.record(repo).await,
            floors,
            hosts,
        }
    }

    /// Whether a request that needs `need` fits this builder.
    pub fn fits(&self, need: Option<&Need>) -> bool {
        fits(self.envelope_mb, need)
    }

    /// Decides what to do with a pulled request for `repo`/`target`.
    pub async fn decide(
        &self,
        repo: &RepoName,
        target: &Target,
        needs: &RepoNeeds<'_>,
        pulled: Pulled,
    ) -> Decision {
        let delivered = pulled.delivered;
        let need = needs.of(target);
        if !self.fits(need.as_ref()) {
            let Some(need) = need else {
                return Decision::Take;
            };
            return match list_builders(&self.js).await {
                Ok(fleet) => lane_decision(
                    &need,
                    &fleet,
                    repo,
                    OffsetDateTime::now_utc(),
                    &self.lanes,
                    pulled,
                ),
                Err(err) => Decision::HandBack {
                    delay: LANE_RETRY,
                    reason: HandBackReason::DoesNotFit,
                    why: format!("it needs {} MiB, more than this builder's envelope, and the registry cannot be read to find one that fits: {err}", need.mb),
                },
            };
        }
        let Target::Host(host) = target else {
            return Decision::Take;
        };
        if !self.warm_affinity {
            return Decision::Take;
        }
        let last = needs
            .record
            .hosts
            .get(host)
            .and_then(|h| h.last_builder.clone());
        match last {
            Some(warm) if warm != self.builder && delivered <= AFFINITY_DELIVERIES => {
                let fleet = list_builders(&self.js).await.unwrap_or_default();
                affinity_decision(
                    &warm,
                    need.as_ref(),
                    &fleet,
                    repo,
                    OffsetDateTime::now_utc(),
                    delivered,
                )
            }
            _ => Decision::Take,
        }
    }

    /// Records what building `host` of `repo` measured: the peak of its own evaluation and of
    /// its build (bytes, when measured), and, when it ended built or cached at `rev`, that
    /// this builder now holds it. Best effort: a failure is logged.
    pub async fn learn(
        &self,
        repo: &RepoName,
        host: &str,
        eval_peak: Option<u64>,
        build_peak: Option<u64>,
        held_rev: Option<&str>,
    ) {
        if eval_peak.is_none() && build_peak.is_none() && held_rev.is_none() {
            return;
        }
        let now = OffsetDateTime::now_utc();
        let update = |record: &mut RepoPlacement| {
            let entry = record.hosts.entry(host.to_owned()).or_default();
            if let Some(bytes) = eval_peak {
                entry.eval_peak_mb = Some(mib_of(bytes));
                entry.measured_at = Some(now);
            }
            if let Some(bytes) = build_peak {
                entry.build_peak_mb = Some(mib_of(bytes));
                entry.measured_at = Some(now);
            }
            if let Some(rev) = held_rev {
                entry.last_builder = Some(self.builder.clone());
                entry.last_rev = Some(rev.to_owned());
                entry.last_built_at = Some(now);
            }
            record.bound();
        };
        for _ in 0..WRITE_ATTEMPTS {
            let entry = match self.store.entry(repo.as_str()).await {
                Ok(entry) => entry,
                Err(err) => {
                    warn!(repo = %repo, host, error = %err, "cannot read the placement bucket; the host's peak memory is not recorded");
                    return;
                }
            };
            let (mut record, revision) = match &entry {
                Some(entry) if entry.operation == kv::Operation::Put => (
                    serde_json::from_slice(&entry.value).unwrap_or_default(),
                    Some(entry.revision),
                ),
                Some(entry) => (RepoPlacement::default(), Some(entry.revision)),
                None => (RepoPlacement::default(), None),
            };
            update(&mut record);
            let Ok(bytes) = serde_json::to_vec(&record) else {
                return;
            };
            let written = match revision {
                Some(revision) => self
                    .store
                    .update(repo.as_str(), bytes.into(), revision)
                    .await
                    .map(|_| ())
                    .map_err(|err| err.to_string()),
                None => self
                    .store
                    .create(repo.as_str(), bytes.into())
                    .await
                    .map(|_| ())
                    .map_err(|err| err.to_string()),
            };
            match written {
                Ok(()) => return,
                // Another builder wrote meanwhile: read its update and apply ours on top.
                Err(err) => {
                    warn!(repo = %repo, host, error = %err, "placement update lost a race; retrying")
                }
            }
        }
        warn!(repo = %repo, host, "giving up recording the host's peak memory: other builders kept writing");
    }
}

/// Whether `need` fits an envelope (`None`: unknown, fits anything).
fn fits(envelope_mb: Option<u64>, need: Option<&Need>) -> bool {
    match (envelope_mb, need) {
        (Some(envelope), Some(need)) => need.mb <= envelope,
        _ => true,
    }
}

/// Builders that can start a request of `repo` now or soon: announced within
/// [`BUILDER_LOST_AFTER_SECS`], serving the repo, not draining.
fn live<'a>(
    fleet: &'a [BuilderInfo],
    repo: &'a RepoName,
    now: OffsetDateTime,
) -> impl Iterator<Item = &'a BuilderInfo> {
    fleet.iter().filter(move |info| {
        (now - info.heartbeat).whole_seconds() <= BUILDER_LOST_AFTER_SECS
            && info.repos.iter().any(|r| r == repo.as_str())
            && !info.states.contains(&BuilderState::Draining)
    })
}

/// Whether the registry shows `info` idle: its pull for the next request is waiting.
fn idle(info: &BuilderInfo) -> bool {
    info.states
        .iter()
        .all(|state| matches!(state, BuilderState::Idle))
}

/// The delay of a hand-back for a builder that is `idle` (or not), at the `delivered`th
/// delivery: at once for an idle one the first [`HANDOFF_DELIVERIES`] times, else `otherwise`.
fn handoff_delay(idle: bool, delivered: i64, otherwise: Duration) -> Duration {
    if idle && delivered <= HANDOFF_DELIVERIES {
        Duration::ZERO
    } else {
        otherwise
    }
}

/// The smallest of `lanes` that fits `need` (the smallest of all for an unknown need).
fn lane_of<'a>(lanes: &'a BTreeMap<String, u64>, need: Option<&Need>) -> Option<(&'a str, u64)> {
    lanes
        .iter()
        .filter(|(_, mb)| fits(Some(**mb), need))
        .map(|(name, mb)| (name.as_str(), *mb))
        .min_by_key(|(name, mb)| (*mb, *name))
}

/// A request needing `need` does not fit this builder: hand it back when a live builder fits
/// it (at once when that one is idle); when none does, hand it back while a configured lane
/// fits it and it has waited less than its timeout; else refuse it, naming the largest
/// envelope in the fleet.
fn lane_decision(
    need: &Need,
    fleet: &[BuilderInfo],
    repo: &RepoName,
    now: OffsetDateTime,
    lanes: &BTreeMap<String, u64>,
    pulled: Pulled,
) -> Decision {
    let live: Vec<&BuilderInfo> = live(fleet, repo, now).collect();
    let fitting = || live.iter().filter(|info| fits(info.memory_mb, Some(need)));
    if let Some(fitting) = fitting()
        .find(|info| idle(info))
        .or_else(|| fitting().next())
    {
        return Decision::HandBack {
            delay: handoff_delay(idle(fitting), pulled.delivered, LANE_RETRY),
            reason: HandBackReason::DoesNotFit,
            why: format!(
                "host {} needs {} MiB ({}), more than this builder's envelope; builder {} fits it",
                need.host, need.mb, need.source, fitting.name
            ),
        };
    }
    let lane = lane_of(lanes, Some(need));
    if let Some((lane, mb)) = lane {
        if pulled.waited < pulled.timeout {
            return Decision::HandBack {
                delay: LANE_RETRY,
                reason: HandBackReason::DoesNotFit,
                why: format!(
                    "host {} needs {} MiB ({}) and no live builder fits it; waiting for a builder of lane {lane} ({mb} MiB) to start, {}s at most",
                    need.host, need.mb, need.source, pulled.timeout.as_secs()
                ),
            };
        }
    }
    let largest = live
        .iter()
        .filter_map(|info| Some((info.memory_mb?, info.name.as_str())))
        .max();
    let largest = match largest {
        Some((mb, name)) => format!("{mb} MiB (builder {name})"),
        None => "none: no live builder serves the repo".to_owned(),
    };
    let waited = match lane {
        Some((lane, mb)) => format!(
            "; it waited {}s (its timeout) for a builder of lane {lane} ({mb} MiB) and none started",
            pulled.waited.as_secs()
        ),
        None => String::new(),
    };
    Decision::Refuse(format!(
        "host {} needs {} MiB of memory ({}), more than any live builder of repo {repo} has: the largest envelope in the fleet is {largest}{waited}; start a builder with builder.memory_mb of at least {} (or lower the host's expected_peak_mb if it is set too high)",
        need.host, need.mb, need.source, need.mb
    ))
}

/// The request fits this builder, and `warm` holds its host's last build: hand it back when
/// `warm` is live, idle and fits it too.
fn affinity_decision(
    warm: &str,
    need: Option<&Need>,
    fleet: &[BuilderInfo],
    repo: &RepoName,
    now: OffsetDateTime,
    delivered: i64,
) -> Decision {
    match live(fleet, repo, now).find(|info| info.name == warm) {
        Some(info) if idle(info) && fits(info.memory_mb, need) => Decision::HandBack {
            delay: handoff_delay(true, delivered, AFFINITY_RETRY),
            reason: HandBackReason::WarmBuilder,
            why: format!("builder {warm} holds the host's last build and is idle"),
        },
        _ => Decision::Take,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builder(name: &str, memory_mb: Option<u64>, states: Vec<BuilderState>) -> BuilderInfo {
        BuilderInfo {
            protocol_version: homelab_deploy_protocol::PROTOCOL_VERSION,
            name: name.to_owned(),
            version: "0".to_owned(),
            repos: vec!["demo".to_owned()],
            states,
            started_at: OffsetDateTime::UNIX_EPOCH,
            heartbeat: OffsetDateTime::UNIX_EPOCH,
            hosts: BTreeMap::new(),
            vault_error: None,
            ephemeral: false,
            memory_mb,
            heartbeat_age_secs: 0,
            lost: false,
        }
    }

    fn idle_builder(name: &str, memory_mb: Option<u64>) -> BuilderInfo {
        builder(name, memory_mb, vec![BuilderState::Idle])
    }

    /// A builder of `memory_mb` building a request of `demo`.
    fn busy_builder(name: &str, memory_mb: u64) -> BuilderInfo {
        builder(
            name,
            Some(memory_mb),
            vec![BuilderState::Building {
                repo: "demo".into(),
                target: "x".into(),
                id: "REQUEST01".into(),
            }],
        )
    }

    fn repo() -> RepoName {
        RepoName::parse("demo").expect("repo")
    }

    /// When the decisions are made: the builders' heartbeats are this recent.
    const NOW: OffsetDateTime = OffsetDateTime::UNIX_EPOCH;

    const NO_LANES: BTreeMap<String, u64> = BTreeMap::new();

    /// A 256 MiB `standard` and a 4096 MiB `heavy` lane.
    fn two_lanes() -> BTreeMap<String, u64> {
        BTreeMap::from([("standard".to_owned(), 256), ("heavy".to_owned(), 4096)])
    }

    /// [`lane_decision`] for a request of `demo` whose host needs `mb`.
    fn lane_decision_for(
        mb: u64,
        fleet: &[BuilderInfo],
        lanes: &BTreeMap<String, u64>,
        pulled: Pulled,
    ) -> Decision {
        lane_decision(&need(mb), fleet, &repo(), NOW, lanes, pulled)
    }

    fn pulled(delivered: i64) -> Pulled {
        Pulled {
            delivered,
            waited: Duration::from_secs(1),
            timeout: Duration::from_secs(60),
        }
    }

    fn need(mb: u64) -> Need {
        Need {
            host: "big".to_owned(),
            mb,
            source: "measured",
        }
    }

    #[test]
    fn needs_take_the_larger_of_measured_and_floor_and_all_takes_the_heaviest_host() {
        let mut record = RepoPlacement::default();
        for (host, eval) in [("big", 900), ("small", 60), ("gone", 5000)] {
            record.hosts.insert(
                host.to_owned(),
                HostPlacement {
                    eval_peak_mb: Some(eval),
                    build_peak_mb: Some(20),
                    ..Default::default()
                },
            );
        }
        let floors = BTreeMap::from([("small".to_owned(), 100), ("big".to_owned(), 500)]);
        let needs = RepoNeeds {
            record,
            floors: &floors,
            hosts: Some(vec!["big".to_owned(), "small".to_owned(), "new".to_owned()]),
        };
        let host = |name: &str| Target::host(name).expect("host");
        assert_eq!(
            needs.of(&host("big")).map(|n| (n.mb, n.source)),
            Some((900, "measured"))
        );
        assert_eq!(
            needs.of(&host("small")).map(|n| (n.mb, n.source)),
            Some((100, "expected_peak_mb"))
        );
        assert_eq!(needs.of(&host("new")), None);
        // `gone` left the flake: it no longer weighs on `all`.
        assert_eq!(needs.of(&Target::All), Some(need(900)));
    }

    #[test]
    fn a_request_too_big_for_this_builder_goes_back_for_one_that_fits_or_fails_naming_the_largest()
    {
        let small = idle_builder("small", Some(256));
        let big = idle_builder("big-1", Some(4096));
        let busy = busy_builder("big-2", 4096);
        let fleet = [small.clone(), busy.clone(), big.clone()];
        // An idle builder that fits: at once, the first two deliveries, then every second.
        for (delivered, wanted) in [(1, Duration::ZERO), (2, Duration::ZERO), (3, LANE_RETRY)] {
            let decision = lane_decision_for(900, &fleet, &NO_LANES, pulled(delivered));
            assert!(
                matches!(&decision, Decision::HandBack { delay, reason: HandBackReason::DoesNotFit, why } if *delay == wanted && why.contains("big-1")),
                "{delivered}: {decision:?}"
            );
        }
        // Only a busy one fits: every second.
        let decision = lane_decision_for(900, &[small.clone(), busy], &NO_LANES, pulled(1));
        assert!(
            matches!(&decision, Decision::HandBack { delay, why, .. } if *delay == LANE_RETRY && why.contains("big-2")),
            "{decision:?}"
        );
        // A draining or lost big builder is no help: fail at once, naming host, peak, largest.
        let draining = builder("big-1", Some(4096), vec![BuilderState::Draining]);
        let mut lost = big.clone();
        lost.heartbeat = NOW - time::Duration::seconds(BUILDER_LOST_AFTER_SECS + 1);
        for fleet in [vec![small.clone(), draining], vec![small.clone(), lost]] {
            let Decision::Refuse(error) = lane_decision_for(900, &fleet, &NO_LANES, pulled(1))
            else {
                panic!("not refused");
            };
            assert!(
                error.contains("host big needs 900 MiB")
                    && error.contains("largest envelope in the fleet is 256 MiB (builder small)"),
                "{error}"
            );
        }
        // An older builder that announces no envelope takes anything.
        let old = idle_builder("old", None);
        assert!(matches!(
            lane_decision_for(900, &[small, old], &NO_LANES, pulled(1)),
            Decision::HandBack { .. }
        ));
    }

    #[test]
    fn affinity_hands_back_only_for_a_live_idle_warm_builder_that_fits() {
        let warm = idle_builder("warm", Some(1024));
        for (delivered, wanted) in [(1, Duration::ZERO), (3, AFFINITY_RETRY)] {
            assert!(matches!(
                affinity_decision("warm", Some(&need(100)), std::slice::from_ref(&warm), &repo(), NOW, delivered),
                Decision::HandBack { delay, reason: HandBackReason::WarmBuilder, .. } if delay == wanted
            ));
        }
        let busy = busy_builder("warm", 1024);
        for (fleet, need_mb) in [(vec![busy], 100), (vec![warm.clone()], 2048), (vec![], 100)] {
            assert_eq!(
                affinity_decision("warm", Some(&need(need_mb)), &fleet, &repo(), NOW, 1),
                Decision::Take
            );
        }
    }

    #[test]
    fn with_no_live_builder_big_enough_a_request_waits_for_a_lane_until_its_timeout() {
        let small = idle_builder("small", Some(256));
        let lanes = two_lanes();
        let decision = lane_decision_for(900, std::slice::from_ref(&small), &lanes, pulled(7));
        assert!(
            matches!(&decision, Decision::HandBack { delay, why, .. } if *delay == LANE_RETRY && why.contains("lane heavy (4096 MiB)")),
            "{decision:?}"
        );
        let late = Pulled {
            waited: Duration::from_secs(60),
            ..pulled(60)
        };
        let Decision::Refuse(error) =
            lane_decision_for(900, std::slice::from_ref(&small), &lanes, late)
        else {
            panic!("not refused");
        };
        assert!(
            error.contains("host big needs 900 MiB")
                && error
                    .contains("waited 60s (its timeout) for a builder of lane heavy (4096 MiB)"),
            "{error}"
        );
        // Bigger than every lane: at once, as without lanes.
        assert!(matches!(
            lane_decision_for(5000, &[small], &lanes, pulled(1)),
            Decision::Refuse(error) if !error.contains("waited")
        ));
    }

    #[test]
    fn a_request_belongs_to_the_smallest_lane_that_fits_it() {
        let lanes = two_lanes();
        assert_eq!(lane_of(&lanes, Some(&need(900))), Some(("heavy", 4096)));
        assert_eq!(lane_of(&lanes, Some(&need(256))), Some(("standard", 256)));
        assert_eq!(lane_of(&lanes, None), Some(("standard", 256)));
        assert_eq!(lane_of(&lanes, Some(&need(4097))), None);
        assert_eq!(lane_of(&NO_LANES, None), None);
    }
}
