//! The fleet registry: every few seconds a builder writes what it is doing to the JetStream
//! key-value bucket `BUILD_BUILDERS` under its name, and removes its entry when it stops.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use homelab_deploy_credentials::vault::VaultSeed;
use homelab_deploy_protocol::api::{BuilderInfo, BuilderState, BUILDERS_BUCKET};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::eval_cache::EvalCache;
use crate::job::Running;
use crate::stop::Stop;

/// How often a builder announces itself.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// The registry bucket: what a builder creates when it is missing and `builder provision`
/// creates.
pub fn builders_bucket_config(replicas: usize) -> kv::Config {
    kv::Config {
        bucket: BUILDERS_BUCKET.to_owned(),
        description: "homelab-deploy builders: name → what it is doing".to_owned(),
        history: 1,
        // Entries of builders that vanished without saying goodbye expire.
        max_age: Duration::from_secs(24 * 60 * 60),
        num_replicas: replicas,
        ..Default::default()
    }
}

pub struct Registry {
    store: kv::Store,
    name: String,
    repos: Vec<String>,
    started_at: OffsetDateTime,
    vault: Option<VaultSeed>,
    ephemeral: bool,
    memory_mb: Option<u64>,
}

impl Registry {
    pub async fn open(
        js: &jetstream::Context,
        name: &str,
        repos: Vec<String>,
        replicas: usize,
        vault: Option<VaultSeed>,
        ephemeral: bool,
        memory_mb: Option<u64>,
    ) -> Result<Self, crate::bus::BusError> {
        let began = std::time::Instant::now();
        let store = match js.get_key_value(BUILDERS_BUCKET).await {
            Ok(store) => store,
            Err(_) => js
                .create_key_value(builders_bucket_config(replicas))
                .await
                .map_err(|err| {
                    crate::bus::unless_refused(
                        &format!("KV_{BUILDERS_BUCKET}"),
                        began,
                        format!("key-value bucket {BUILDERS_BUCKET} is missing"),
                        crate::bus::BusError::Stream {
                            stream: BUILDERS_BUCKET.to_owned(),
                            message: err.to_string(),
                        },
                    )
                })?,
        };
        Ok(Self {
            store,
            name: name.to_owned(),
            repos,
            started_at: OffsetDateTime::now_utc(),
            vault,
            ephemeral,
            memory_mb,
        })
    }

    pub async fn announce(
        &self,
        states: Vec<BuilderState>,
        hosts: std::collections::BTreeMap<String, Vec<String>>,
    ) {
        let info = BuilderInfo {
            protocol_version: homelab_deploy_protocol::PROTOCOL_VERSION,
            name: self.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            repos: self.repos.clone(),
            states,
            started_at: self.started_at,
            heartbeat: OffsetDateTime::now_utc(),
            hosts,
            vault_error: self.vault.as_ref().and_then(VaultSeed::last_error),
            ephemeral: self.ephemeral,
            heartbeat_age_secs: 0,
            lost: false,
            memory_mb: self.memory_mb,
        };
        let Ok(payload) = serde_json::to_vec(&info) else {
            return;
        };
        if let Err(err) = self.store.put(&self.name, payload.into()).await {
            warn!(error = %err, "announcing the builder in the registry failed");
        }
    }

    /// Announces the builder until it stops, then removes its entry: every
    /// [`HEARTBEAT_INTERVAL`], and at once when a request starts or ends here (placement
    /// reads who is idle).
    pub async fn run(
        self,
        running: Arc<Running>,
        evaluated: Arc<EvalCache>,
        mut stop: watch::Receiver<Stop>,
        finished: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(HEARTBEAT_INTERVAL);
        loop {
            let draining = *stop.borrow() != Stop::Running;
            let mut states = running.states();
            if draining {
                states.insert(0, BuilderState::Draining);
            } else if states.is_empty() {
                states.push(BuilderState::Idle);
            }
            self.announce(states, evaluated.latest_hosts()).await;
            tokio::select! {
                _ = ticker.tick() => {}
                _ = evaluated.hosts_changed() => {}
                _ = running.changed() => {}
                _ = stop.changed() => {}
                _ = finished.cancelled() => break,
            }
        }
        if let Err(err) = self.store.delete(&self.name).await {
            warn!(error = %err, "removing the builder from the registry failed");
        }
    }
}
