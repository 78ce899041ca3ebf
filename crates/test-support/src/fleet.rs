//! A nats-server and one fixture repo served as `demo`, with builders started on demand: the
//! setup of the tests of the queue, lanes, ephemeral builders and the read model.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{run_cli, stored_messages, wait_for_finished, Builder, FixtureRepo, NatsServer};

/// A nats-server, a fixture repo served as `demo`, and the binary under test.
pub struct Fleet {
    pub nats: NatsServer,
    pub repo: FixtureRepo,
    bin: PathBuf,
}

impl Fleet {
    /// A fresh nats-server and the fixture `fixture`; no builder yet.
    pub fn new(bin: &Path, fixture: &str) -> Self {
        Self::with_server(bin, NatsServer::start(), fixture)
    }

    /// Like [`Fleet::new`], with nats-server's HTTP monitoring endpoint on.
    pub fn monitored(bin: &Path, fixture: &str) -> Self {
        Self::with_server(bin, NatsServer::start_with_monitoring(), fixture)
    }

    fn with_server(bin: &Path, nats: NatsServer, fixture: &str) -> Self {
        Self {
            nats,
            repo: FixtureRepo::new(fixture),
            bin: bin.to_owned(),
        }
    }

    /// The binary under test.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Starts a builder serving `demo`, with `extra` config lines (`[builder]` keys, then any
    /// further tables), and waits until it is ready.
    pub fn builder(&self, extra: &str) -> Builder {
        Builder::start_with(
            &self.bin,
            &self.nats.url,
            &[("demo", self.repo.url())],
            extra,
        )
    }

    /// `homelab-deploy ARGS` against this fleet's server (two minutes at most).
    pub fn cli(&self, args: &[&str]) -> Output {
        run_cli(&self.bin, &self.nats.url, args, Duration::from_secs(120))
    }

    /// `build demo TARGET --no-wait EXTRA`, which must succeed: the request id.
    pub fn submit(&self, target: &str, extra: &[&str]) -> String {
        let mut args = vec!["build", "demo", target, "--no-wait"];
        args.extend_from_slice(extra);
        let output = self.cli(&args);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// [`Fleet::submit`] at a new commit ([`FixtureRepo::new_salt`]).
    pub fn submit_new(&self, target: &str) -> String {
        let rev = self.repo.new_salt();
        self.submit(target, &["--rev", &rev])
    }

    /// The subject of request `id`'s events.
    fn events_subject(id: &str) -> String {
        format!("build.responses.demo.*.{id}.events")
    }

    /// The events of request `id` stored so far.
    pub async fn events(&self, id: &str) -> Vec<Value> {
        let client = self.nats.client().await;
        stored_messages(&client, &Self::events_subject(id)).await
    }

    /// Waits for request `id`'s `finished` event; all its events.
    pub async fn finished(&self, id: &str) -> Vec<Value> {
        let client = self.nats.client().await;
        wait_for_finished(&client, &Self::events_subject(id)).await
    }

    /// Polls the events of request `id` (every 50 ms, `timeout` at most) until `condition`
    /// holds for them; `None` when it never did.
    pub async fn poll_events(
        &self,
        id: &str,
        timeout: Duration,
        condition: impl Fn(&[Value]) -> bool,
    ) -> Option<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.events(id).await;
            if condition(&events) {
                return Some(events);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// [`Fleet::poll_events`] for a minute at most; panics with the events when `condition`
    /// never held.
    pub async fn wait_events(&self, id: &str, condition: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        match self
            .poll_events(id, Duration::from_secs(60), condition)
            .await
        {
            Some(events) => events,
            None => panic!(
                "events of {id} never reached the awaited point: {:#?}",
                self.events(id).await
            ),
        }
    }

    /// Waits (a minute at most) until request `id` has an event of type `kind`; the first one.
    pub async fn wait_event(&self, id: &str, kind: &str) -> Value {
        let events = self
            .poll_events(id, Duration::from_secs(60), |events| {
                events.iter().any(|e| e["type"] == kind)
            })
            .await
            .unwrap_or_else(|| panic!("request {id} never had a {kind} event"));
        events
            .into_iter()
            .find(|e| e["type"] == kind)
            .unwrap_or_default()
    }
}
