//! The read model: the `BUILD_STATE` bucket holds each request's state, written by the builder
//! at each event, so `status` and `builds` read one entry (or the newest few) instead of the
//! whole history. Checked through a request's life (queued with no builder, running, a builder
//! killed mid-build, finished), and after the bucket is deleted (rebuilt from the events).

use std::time::Duration;

use homelab_deploy_builder::state::{Recorded, StateStore};
use homelab_deploy_protocol::api::{RequestState, STATE_BUCKET};
use serde_json::Value;
use test_support::{run_cli, Fleet};

use crate::{bin, kill_one_of_two, text};

/// The read-model tests' fleet, on the `queue` fixture.
fn fleet() -> Fleet {
    Fleet::new(bin(), "queue")
}

/// Builder config lines: a request is redelivered 3 s after its builder stopped acknowledging.
const ACK_WAIT: &str = "\n[streams]\nrequest_ack_wait_secs = 3";

/// `homelab-deploy ARGS --json`, parsed; it must succeed.
fn json(fleet: &Fleet, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let output = run_cli(bin(), &fleet.nats.url, &args, Duration::from_secs(60));
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{args:?}: {stderr}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|err| panic!("{err}: {stdout}"))
}

/// The entry of request `id` in the state bucket, as a Python client would read it.
async fn state_entry(fleet: &Fleet, id: &str) -> Option<RequestState> {
    let js = async_nats::jetstream::new(fleet.nats.client().await);
    let store = js.get_key_value(STATE_BUCKET).await.ok()?;
    let bytes = store.get(id).await.expect("read the state bucket")?;
    Some(serde_json::from_slice(&bytes).expect("a state entry is a RequestState"))
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
    let fleet = fleet();
    // A builder sets up the streams, then leaves: nothing runs while the request waits.
    let mut first = fleet.builder(ACK_WAIT);
    first
        .terminate(Duration::from_secs(30))
        .expect("builder stops");
    let rev = fleet.repo.new_salt();
    let id = fleet.submit("medium", &["--rev", &rev]);

    let status = json(&fleet, &["status", &id]);
    assert_eq!(status["phase"], "queued", "{status:#}");
    assert_eq!(status["queue_position"], 1, "{status:#}");
    let queued = json(&fleet, &["builds", "--state", "queued"]);
    assert_eq!(ids(&queued), vec![id.as_str()], "{queued:#}");
    assert!(
        state_entry(&fleet, &id).await.is_none(),
        "no builder saw it yet"
    );

    let mut builders = vec![fleet.builder(ACK_WAIT), fleet.builder(ACK_WAIT)];
    let events = fleet
        .wait_events(&id, |events| {
            events.iter().any(|e| e["type"] == "host_started")
        })
        .await;
    let victim = events[0]["builder"].as_str().expect("builder").to_owned();
    let status = json(&fleet, &["status", &id]);
    assert_eq!(status["phase"], "running", "{status:#}");
    assert_eq!(status["builder"], victim.as_str(), "{status:#}");
    assert_eq!(status["current_host"], "medium", "{status:#}");
    let stored = state_entry(&fleet, &id)
        .await
        .expect("a running request has an entry");
    assert!(stored.last_seq >= 2, "{stored:?}");

    let survivor = kill_one_of_two(&mut builders, &victim);

    let events = fleet.finished(&id).await;
    let status = json(&fleet, &["status", &id]);
    assert_eq!(status["phase"], "succeeded", "{status:#}");
    assert_eq!(status["builder"], survivor.name.as_str(), "{status:#}");
    assert_eq!(status["last_seq"], events.len() as u64, "{status:#}");
    assert_eq!(status["hosts"]["built"], 1, "{status:#}");
    let stored = state_entry(&fleet, &id).await.expect("entry");
    assert_eq!(stored.last_seq, events.len() as u64, "{stored:?}");
    assert_eq!(stored.phase.as_str(), "succeeded");

    let recent = json(&fleet, &["builds"]);
    assert_eq!(ids(&recent), vec![id.as_str()], "{recent:#}");
    assert_eq!(recent["builds"][0]["phase"], "succeeded", "{recent:#}");
    let queued = json(&fleet, &["builds", "--state", "queued"]);
    assert!(ids(&queued).is_empty(), "{queued:#}");
}

/// The bucket deleted: `status` and `builds` still answer from the events, and the next builder
/// to start rebuilds it from the events stream. A state older than the stored one (a builder
/// that lost its request, or a rebuild racing a live writer) is never written over it.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_state_bucket_is_rebuilt_from_the_events() {
    let fleet = fleet();
    let mut builder = fleet.builder(ACK_WAIT);
    let rev = fleet.repo.new_salt();
    let ids_built: Vec<String> = (0..2)
        .map(|_| fleet.submit("short", &["--rev", &rev]))
        .collect();
    let client = fleet.nats.client().await;
    let mut last_seqs = Vec::new();
    for id in &ids_built {
        let events = fleet.finished(id).await;
        last_seqs.push(events.len() as u64);
    }
    builder
        .terminate(Duration::from_secs(30))
        .expect("builder stops");

    let js = async_nats::jetstream::new(client.clone());
    js.delete_key_value(STATE_BUCKET)
        .await
        .expect("delete the bucket");
    let status = json(&fleet, &["status", &ids_built[0]]);
    assert_eq!(status["phase"], "succeeded", "{status:#}");
    let recent = json(&fleet, &["builds"]);
    let mut listed = ids(&recent);
    listed.sort();
    let mut expected: Vec<&str> = ids_built.iter().map(String::as_str).collect();
    expected.sort();
    assert_eq!(listed, expected, "{recent:#}");

    let _builder = fleet.builder(ACK_WAIT);
    for (id, last_seq) in ids_built.iter().zip(&last_seqs) {
        let stored = state_entry(&fleet, id).await.expect("rebuilt entry");
        assert_eq!(stored.last_seq, *last_seq, "{stored:?}");
        assert_eq!(stored.phase.as_str(), "succeeded", "{stored:?}");
    }
    let recent = json(&fleet, &["builds"]);
    let mut listed = ids(&recent);
    listed.sort();
    assert_eq!(listed, expected, "{recent:#}");

    let limits = homelab_deploy_builder::config::StreamsConfig::default();
    let store = StateStore::open(&js, &limits).await.expect("open");
    let mut older = state_entry(&fleet, &ids_built[0]).await.expect("entry");
    older.last_seq -= 1;
    older.phase = homelab_deploy_protocol::api::RequestPhase::Running;
    assert_eq!(store.record(&older).await.expect("write"), Recorded::Stale);
    let kept = state_entry(&fleet, &ids_built[0]).await.expect("entry");
    assert_eq!(kept.phase.as_str(), "succeeded");
}

/// The events a builder stores for request `id` of the synthetic history: queued at
/// `queued_at`, one host, ended `finished_at` in `status` (`succeeded`, `failed`, `cancelled`).
fn history_events(
    id: &str,
    queued_at: time::OffsetDateTime,
    finished_at: time::OffsetDateTime,
    status: &str,
) -> Vec<Value> {
    let at = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .expect("format a time")
    };
    let started = at(queued_at + time::Duration::seconds(1));
    let result = match status {
        "succeeded" => serde_json::json!({"name": "web", "status": "built", "duration_ms": 10,
            "out_path": "/nix/store/00000000000000000000000000000000-web"}),
        "failed" => serde_json::json!({"name": "web", "status": "build_failed", "duration_ms": 10,
            "error": "builder for '/nix/store/00000000000000000000000000000000-web.drv' failed"}),
        _ => serde_json::json!({"name": "web", "status": "cancelled", "duration_ms": 10}),
    };
    let rev = "0123456789abcdef0123456789abcdef01234567";
    vec![
        serde_json::json!({"type": "started", "id": id, "seq": 1, "time": started,
            "builder": "b1", "repo": "demo", "target": "web", "rev": rev, "hosts": ["web"],
            "requested_by": "test", "attempt": 1, "queued_at": at(queued_at)}),
        serde_json::json!({"type": "host_started", "id": id, "seq": 2, "time": started,
            "host": "web", "index": 1, "total": 1}),
        serde_json::json!({"type": "host_finished", "id": id, "seq": 3, "time": at(finished_at),
            "host": "web", "index": 1, "total": 1, "result": result}),
        serde_json::json!({"type": "finished", "id": id, "seq": 4, "time": at(finished_at),
            "status": status, "repo": "demo", "target": "web", "rev": rev, "hosts": [result],
            "builder": "b1", "duration_ms": 10, "queued_at": at(queued_at)}),
    ]
}

/// Stores the events of request `id` and writes its state as the builder does: running after
/// `started`, then final after `finished`.
async fn finish_request(
    js: &async_nats::jetstream::Context,
    store: &StateStore,
    id: &str,
    events: &[Value],
) {
    let mut parsed = Vec::new();
    for event in events {
        js.publish(
            format!("build.responses.demo.web.{id}.events"),
            serde_json::to_vec(event).expect("json").into(),
        )
        .await
        .expect("publish event")
        .await
        .expect("event stored");
        parsed.push(serde_json::from_value(event.clone()).expect("a protocol event"));
        if parsed.len() == 1 || parsed.len() == events.len() {
            let state = homelab_deploy_client::inspect::fold_events(&parsed).expect("a state");
            assert_eq!(
                store.record(&state).await.expect("write the state"),
                Recorded::Written
            );
        }
    }
}

/// Every page of `builds ARGS`, `limit` at a time, following `next_cursor`: the ids in
/// list order.
fn all_pages(fleet: &Fleet, args: &[&str], limit: usize) -> Vec<String> {
    let limit = limit.to_string();
    let mut listed = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut call = vec!["builds", "--limit", limit.as_str()];
        call.extend_from_slice(args);
        if let Some(cursor) = &cursor {
            call.extend(["--cursor", cursor.as_str()]);
        }
        let page = json(fleet, &call);
        listed.extend(ids(&page).into_iter().map(str::to_owned));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return listed,
        }
    }
}

/// `builds` (first page of 25, then every page) and `builds --state failed` list exactly
/// `expected` (id, phase) newest `queued_at` first.
fn assert_listed(fleet: &Fleet, expected: &[(String, &str)], when: &str) {
    let all: Vec<String> = expected.iter().map(|(id, _)| id.clone()).collect();
    let first = json(fleet, &["builds", "--limit", "25"]);
    assert_eq!(
        ids(&first),
        all[..25].to_vec(),
        "{when}: first page {first:#}"
    );
    assert_eq!(all_pages(fleet, &[], 40), all, "{when}: every page");
    let failed: Vec<String> = expected
        .iter()
        .filter(|(_, phase)| *phase == "failed")
        .map(|(id, _)| id.clone())
        .collect();
    let first = json(fleet, &["builds", "--state", "failed", "--limit", "10"]);
    assert_eq!(
        ids(&first),
        failed[..10].to_vec(),
        "{when}: failed {first:#}"
    );
    assert!(
        first["builds"]
            .as_array()
            .expect("builds")
            .iter()
            .all(|b| b["phase"] == "failed"),
        "{when}: {first:#}"
    );
    assert_eq!(
        all_pages(fleet, &["--state", "failed"], 7),
        failed,
        "{when}: every failed page"
    );
}

/// 300 requests queued 10 s apart, finishing in another order (each block of 50 backwards,
/// one queued early finishing last, one queued late finishing first), so the finished-request
/// index is written out of `queued_at` order over many slots: `builds` lists them newest
/// `queued_at` first, page after page, and so does `builds --state failed`; the same after the
/// bucket (and its index) is deleted and rebuilt from the events, and with new requests
/// finishing on top of the rebuilt index.
#[tokio::test(flavor = "multi_thread")]
async fn builds_list_newest_first_over_a_long_out_of_order_history() {
    let fleet = fleet();
    let mut setup = fleet.builder(ACK_WAIT);
    setup
        .terminate(Duration::from_secs(30))
        .expect("builder stops");
    let js = async_nats::jetstream::new(fleet.nats.client().await);
    let limits = homelab_deploy_builder::config::StreamsConfig::default();
    let store = StateStore::open(&js, &limits)
        .await
        .expect("open the bucket");

    let count = 300;
    let first = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let queued_at = |i: usize| first + time::Duration::seconds(10 * i as i64);
    let id = |i: usize| format!("history{i:04}");
    let phase = |i: usize| match i % 9 {
        4 => "failed",
        7 => "cancelled",
        _ => "succeeded",
    };
    let mut finish_order: Vec<usize> = (0..count)
        .map(|i| (i / 50) * 50 + (49 - i % 50))
        .filter(|&i| i != 5 && i != count - 3)
        .collect();
    finish_order.insert(0, count - 3);
    finish_order.push(5);
    for (rank, &i) in finish_order.iter().enumerate() {
        let finished_at = first + time::Duration::hours(2) + time::Duration::seconds(rank as i64);
        let events = history_events(&id(i), queued_at(i), finished_at, phase(i));
        finish_request(&js, &store, &id(i), &events).await;
    }
    let mut expected: Vec<(String, &str)> = (0..count).rev().map(|i| (id(i), phase(i))).collect();
    assert_listed(&fleet, &expected, "written live");

    js.delete_key_value(STATE_BUCKET)
        .await
        .expect("delete the bucket");
    let store = StateStore::open(&js, &limits)
        .await
        .expect("recreate and rebuild the bucket");
    assert_listed(&fleet, &expected, "rebuilt from the events");

    let now = time::OffsetDateTime::now_utc();
    for i in count..count + 3 {
        let events = history_events(&id(i), queued_at(i), now, phase(i));
        finish_request(&js, &store, &id(i), &events).await;
        expected.insert(0, (id(i), phase(i)));
    }
    assert_listed(&fleet, &expected, "new requests over the rebuilt index");
}
