//! The read model: the `BUILD_STATE` bucket holds each request's state, written by the builder
//! at each event, so `status` and `builds` read one entry (or the newest few) instead of the
//! whole history. Checked through a request's life (queued with no builder, running, a builder
//! killed mid-build, finished), and after the bucket is deleted (rebuilt from the events).

use std::process::Command;
use std::time::Duration;

use homelab_deploy_builder::state::{Recorded, StateStore};
use homelab_deploy_protocol::api::{RequestState, STATE_BUCKET};
use serde_json::Value;
use test_support::{run_cli, stored_messages, Builder, FixtureRepo, NatsServer};

use crate::build::wait_for_finished;
use crate::{bin, text};

struct Fleet {
    nats: NatsServer,
    repo: FixtureRepo,
}

impl Fleet {
    fn new() -> Self {
        Self {
            nats: NatsServer::start(),
            repo: FixtureRepo::new("queue"),
        }
    }

    fn builder(&self) -> Builder {
        Builder::start_with(
            bin(),
            &self.nats.url,
            &[("demo", self.repo.url())],
            "\n[streams]\nrequest_ack_wait_secs = 3",
        )
    }

    /// `homelab-deploy ARGS --json`, parsed.
    fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let output = run_cli(bin(), &self.nats.url, &args, Duration::from_secs(60));
        let (stdout, stderr) = text(&output);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {stderr}");
        serde_json::from_str(stdout.trim()).unwrap_or_else(|err| panic!("{err}: {stdout}"))
    }

    fn submit(&self, target: &str, rev: &str) -> String {
        let output = run_cli(
            bin(),
            &self.nats.url,
            &["build", "demo", target, "--no-wait", "--rev", rev],
            Duration::from_secs(60),
        );
        let (stdout, stderr) = text(&output);
        assert_eq!(output.status.code(), Some(0), "{stderr}");
        stdout.trim().to_owned()
    }

    async fn events(&self, id: &str) -> Vec<Value> {
        let client = self.nats.client().await;
        stored_messages(&client, &format!("build.responses.demo.*.{id}.events")).await
    }

    /// The entry of request `id` in the state bucket, as a Python client would read it.
    async fn stored(&self, id: &str) -> Option<RequestState> {
        let js = async_nats::jetstream::new(self.nats.client().await);
        let store = js.get_key_value(STATE_BUCKET).await.ok()?;
        let bytes = store.get(id).await.expect("read the state bucket")?;
        Some(serde_json::from_slice(&bytes).expect("a state entry is a RequestState"))
    }

    /// Polls until `condition` holds for the events of `id`; returns them.
    async fn wait_events(&self, id: &str, condition: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        for _ in 0..1200 {
            let events = self.events(id).await;
            if condition(&events) {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "events of {id} never reached the awaited point: {:#?}",
            self.events(id).await
        );
    }
}

fn ids(list: &Value) -> Vec<&str> {
    list["builds"]
        .as_array()
        .unwrap_or_else(|| panic!("{list}"))
        .iter()
        .map(|b| b["id"].as_str().unwrap_or_default())
        .collect()
}

/// Queued with no builder running (status and `builds --state queued` still answer), running,
/// its builder SIGKILLed mid-build (redelivered to the other), finished: at every step `status`
/// says what the events say, and the bucket entry carries the last event's `seq`.
#[tokio::test(flavor = "multi_thread")]
async fn state_follows_a_request_through_a_killed_builder() {
    let fleet = Fleet::new();
    // A builder sets up the streams, then leaves: nothing runs while the request waits.
    let mut first = fleet.builder();
    first
        .terminate(Duration::from_secs(30))
        .expect("builder stops");
    let rev = fleet
        .repo
        .commit_file("salt", &test_support::unique("salt"));
    let id = fleet.submit("medium", &rev);

    let status = fleet.json(&["status", &id]);
    assert_eq!(status["phase"], "queued", "{status:#}");
    assert_eq!(status["queue_position"], 1, "{status:#}");
    let queued = fleet.json(&["builds", "--state", "queued"]);
    assert_eq!(ids(&queued), vec![id.as_str()], "{queued:#}");
    assert!(fleet.stored(&id).await.is_none(), "no builder saw it yet");

    let mut builders = vec![fleet.builder(), fleet.builder()];
    let events = fleet
        .wait_events(&id, |events| {
            events.iter().any(|e| e["type"] == "host_started")
        })
        .await;
    let victim = events[0]["builder"].as_str().expect("builder").to_owned();
    let status = fleet.json(&["status", &id]);
    assert_eq!(status["phase"], "running", "{status:#}");
    assert_eq!(status["builder"], victim.as_str(), "{status:#}");
    assert_eq!(status["current_host"], "medium", "{status:#}");
    let stored = fleet
        .stored(&id)
        .await
        .expect("a running request has an entry");
    assert!(stored.last_seq >= 2, "{stored:?}");

    let index = builders
        .iter()
        .position(|b| b.name == victim)
        .expect("victim is ours");
    Command::new("kill")
        .args(["-KILL", &builders[index].pid().to_string()])
        .status()
        .expect("kill");
    let survivor = builders.remove(1 - index);

    let client = fleet.nats.client().await;
    let events = wait_for_finished(&client, &format!("build.responses.demo.*.{id}.events")).await;
    let status = fleet.json(&["status", &id]);
    assert_eq!(status["phase"], "succeeded", "{status:#}");
    assert_eq!(status["builder"], survivor.name.as_str(), "{status:#}");
    assert_eq!(status["last_seq"], events.len() as u64, "{status:#}");
    assert_eq!(status["hosts"]["built"], 1, "{status:#}");
    let stored = fleet.stored(&id).await.expect("entry");
    assert_eq!(stored.last_seq, events.len() as u64, "{stored:?}");
    assert_eq!(stored.phase.as_str(), "succeeded");

    let recent = fleet.json(&["builds"]);
    assert_eq!(ids(&recent), vec![id.as_str()], "{recent:#}");
    assert_eq!(recent["builds"][0]["phase"], "succeeded", "{recent:#}");
    let queued = fleet.json(&["builds", "--state", "queued"]);
    assert!(ids(&queued).is_empty(), "{queued:#}");
}

/// The bucket deleted: `status` and `builds` still answer from the events, and the next builder
/// to start rebuilds it from the events stream. A state older than the stored one (a builder
/// that lost its request, or a rebuild racing a live writer) is never written over it.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_state_bucket_is_rebuilt_from_the_events() {
    let fleet = Fleet::new();
    let mut builder = fleet.builder();
    let rev = fleet
        .repo
        .commit_file("salt", &test_support::unique("salt"));
    let ids_built: Vec<String> = (0..2).map(|_| fleet.submit("short", &rev)).collect();
    let client = fleet.nats.client().await;
    let mut last_seqs = Vec::new();
    for id in &ids_built {
        let events =
            wait_for_finished(&client, &format!("build.responses.demo.*.{id}.events")).await;
        last_seqs.push(events.len() as u64);
    }
    builder
        .terminate(Duration::from_secs(30))
        .expect("builder stops");

    let js = async_nats::jetstream::new(client.clone());
    js.delete_key_value(STATE_BUCKET)
        .await
        .expect("delete the bucket");
    let status = fleet.json(&["status", &ids_built[0]]);
    assert_eq!(status["phase"], "succeeded", "{status:#}");
    let recent = fleet.json(&["builds"]);
    let mut listed = ids(&recent);
    listed.sort();
    let mut expected: Vec<&str> = ids_built.iter().map(String::as_str).collect();
    expected.sort();
    assert_eq!(listed, expected, "{recent:#}");

    let _builder = fleet.builder();
    for (id, last_seq) in ids_built.iter().zip(&last_seqs) {
        let stored = fleet.stored(id).await.expect("rebuilt entry");
        assert_eq!(stored.last_seq, *last_seq, "{stored:?}");
        assert_eq!(stored.phase.as_str(), "succeeded", "{stored:?}");
    }
    let recent = fleet.json(&["builds"]);
    let mut listed = ids(&recent);
    listed.sort();
    assert_eq!(listed, expected, "{recent:#}");

    let limits = homelab_deploy_builder::config::StreamsConfig::default();
    let store = StateStore::open(&js, &limits).await.expect("open");
    let mut older = fleet.stored(&ids_built[0]).await.expect("entry");
    older.last_seq -= 1;
    older.phase = homelab_deploy_protocol::api::RequestPhase::Running;
    assert_eq!(store.record(&older).await.expect("write"), Recorded::Stale);
    let kept = fleet.stored(&ids_built[0]).await.expect("entry");
    assert_eq!(kept.phase.as_str(), "succeeded");
}
