//! The control API stays bounded: concurrent queries, reply sizes, and what people and
//! assistants read for a request with hundreds of failing hosts. History is written into the
//! real events stream the way a builder writes it (any NATS client may read the same events).

use std::time::Duration;

use serde_json::{json, Value};
use test_support::{unique, Builder, FixtureRepo, NatsServer};

use crate::{bin, Setup};

/// A `finished` event of request `id`: every host failed with an error of `error_bytes`
/// (three kinds of error, each naming its host and a store path of its own).
pub fn failed_finished(id: &str, hosts: usize, error_bytes: usize) -> Value {
    let hosts: Vec<Value> = (0..hosts)
        .map(|i| {
            let name = format!("host{i:03}");
            let kind = [
                "the disk image does not fit",
                "attribute 'foo' missing",
                "out of memory",
            ][i % 3];
            let filler = "x".repeat(error_bytes.saturating_sub(200));
            json!({
                "name": name,
                "status": if i % 3 == 1 { "eval_failed" } else { "build_failed" },
                "duration_ms": 10,
                "error": format!(
                    "building '/nix/store/{:032}-{name}.drv'...\n{filler}\nerror: {name}: {kind}",
                    i
                ),
            })
        })
        .collect();
    json!({
        "type": "finished", "id": id, "seq": 1, "time": "2026-11-23T10:00:00Z",
        "status": "failed", "repo": "demo", "target": "all", "rev": "0123456789abcdef0123456789abcdef01234567",
        "hosts": hosts, "builder": "b1", "duration_ms": 1000
    })
}

/// Stores `events` of request `id` on its events subject, awaiting each ack.
pub async fn store_events(client: &async_nats::Client, id: &str, events: &[Value]) {
    let js = async_nats::jetstream::new(client.clone());
    for event in events {
        js.publish(
            format!("build.responses.demo.all.{id}.events"),
            serde_json::to_vec(event).expect("json").into(),
        )
        .await
        .expect("publish event")
        .await
        .expect("event stored");
    }
}

/// Folds the stored history into the request-state bucket with the builder's own rebuild (what
/// a builder does when it finds the bucket missing): the events stored here come from the test,
/// not from a builder that would have written the bucket as it published them.
pub async fn fold_history(client: &async_nats::Client) {
    let js = async_nats::jetstream::new(client.clone());
    let limits = homelab_deploy_builder::config::StreamsConfig::default();
    homelab_deploy_builder::state::StateStore::open(&js, &limits)
        .await
        .expect("open the state bucket")
        .rebuild(&js)
        .await
        .expect("rebuild the state bucket");
}

async fn ask(client: &async_nats::Client, subject: &str, body: Value) -> Value {
    let reply = tokio::time::timeout(
        Duration::from_secs(30),
        client.request(
            subject.to_owned(),
            serde_json::to_vec(&body).expect("json").into(),
        ),
    )
    .await
    .unwrap_or_else(|_| panic!("no reply to {subject} {body} within 30s"))
    .unwrap_or_else(|err| panic!("{subject} {body}: {err}"));
    serde_json::from_slice(&reply.payload).expect("reply is JSON")
}

/// 100 concurrent `builds` queries over a 6 MB history: the builder answers every one (a page
/// or "busy, retry") and its peak memory, read from /proc after the load, stays bounded.
/// Before, each query held the whole history at once: two builders went from 40 MB to 800 MB.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_queries_are_bounded_and_all_answered() {
    let setup = Setup::new("fleet");
    let client = async_nats::connect(&setup.nats.url).await.expect("connect");
    let ids: Vec<String> = (0..1500).map(|i| format!("history{i:05}")).collect();
    for id in &ids {
        store_events(&client, id, &[failed_finished(id, 1, 4000)]).await;
    }
    fold_history(&client).await;
    let before = setup.builder.peak_rss_bytes();
    let queries = (0..100).map(|_| {
        let client = client.clone();
        async move { ask(&client, "build.api.v1.builds", json!({"limit": 200})).await }
    });
    let replies = futures::future::join_all(queries).await;
    let pages = replies.iter().filter(|r| r["builds"].is_array()).count();
    let busy = replies.iter().filter(|r| r["code"] == "busy").count();
    assert_eq!(
        pages + busy,
        100,
        "every query is answered: {:?}",
        &replies[..3]
    );
    assert!(pages >= 1, "some queries get their page");
    assert!(
        replies
            .iter()
            .filter(|r| r["code"] == "busy")
            .all(|r| r["error"].as_str().unwrap_or_default().contains("retry")),
        "busy replies say to retry"
    );
    let page = replies
        .iter()
        .find(|r| r["builds"].is_array())
        .expect("a page");
    assert_eq!(page["builds"].as_array().map(Vec::len), Some(200));
    assert!(page["next_cursor"].is_string(), "{}", page["next_cursor"]);
    let peak = setup.builder.peak_rss_bytes();
    eprintln!(
        "builder peak RSS: {} MB before the queries, {} MB after ({pages} pages, {busy} busy)",
        before / 1024 / 1024,
        peak / 1024 / 1024
    );
    assert!(
        peak < before + 150 * 1024 * 1024,
        "builder peak RSS {} MB (before the load {} MB)",
        peak / 1024 / 1024,
        before / 1024 / 1024
    );
    // Retried later, a query gets its page.
    let again = ask(&client, "build.api.v1.builds", json!({"limit": 5})).await;
    assert_eq!(again["builds"].as_array().map(Vec::len), Some(5), "{again}");
}

/// With a server whose `max_payload` is 16 KiB, a page of builds that would not fit is cut
/// short with a cursor, following the cursors yields every build once, a state whose host errors
/// cannot fit is answered without them (the state bucket stores it so), and a
/// `limit` out of range is refused.
#[tokio::test(flavor = "multi_thread")]
async fn replies_fit_max_payload_and_page() {
    let conf = std::env::temp_dir().join(format!("{}.conf", unique("nats-small-payload")));
    std::fs::write(&conf, "max_payload: 16384\n").expect("write nats config");
    let nats = NatsServer::start_with(&["-c", conf.to_str().expect("utf-8 path")]);
    let _ = std::fs::remove_file(&conf);
    let repo = FixtureRepo::new("fleet");
    let _builder = Builder::start(bin(), &nats.url, &[("demo", repo.url())]);
    let client = async_nats::connect(&nats.url).await.expect("connect");
    assert_eq!(client.server_info().max_payload, 16384);

    let ids: Vec<String> = (0..120).map(|i| format!("paged{i:05}")).collect();
    for id in &ids {
        store_events(&client, id, &[failed_finished(id, 2, 1500)]).await;
    }
    fold_history(&client).await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut query = json!({"limit": 200});
        if let Some(cursor) = &cursor {
            query["cursor"] = json!(cursor);
        }
        let page = ask(&client, "build.api.v1.builds", query).await;
        let builds = page["builds"]
            .as_array()
            .unwrap_or_else(|| panic!("{page}"));
        assert!(!builds.is_empty(), "{page}");
        pages += 1;
        seen.extend(
            builds
                .iter()
                .map(|b| b["id"].as_str().unwrap_or_default().to_owned()),
        );
        assert_eq!(builds[0]["host_results"][0]["status"], "build_failed");
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
        assert!(pages < 100, "paging does not end");
    }
    assert!(pages > 1, "a 200-build page cannot fit 16 KiB");
    let mut expected = ids.clone();
    expected.sort();
    seen.sort();
    assert_eq!(seen, expected, "every build exactly once");

    // One request whose 120 host results do not fit in one message.
    let big = "bigrequest01";
    let events: Vec<Value> = (0..120)
        .map(|i| {
            json!({"type": "host_finished", "id": big, "seq": i + 1, "time": "2026-11-23T10:00:00Z",
                   "host": format!("h{i}"), "index": i + 1, "total": 120,
                   "result": {"name": format!("h{i}"), "status": "build_failed", "duration_ms": 1,
                              "error": format!("error {i}: {}", "z".repeat(300))}})
        })
        .collect();
    store_events(&client, big, &events).await;
    fold_history(&client).await;
    // Its state fits the bucket (and so a reply) without the hosts' error excerpts; the counts
    // and statuses stay.
    let status = ask(&client, "build.api.v1.status", json!({"id": big})).await;
    assert_eq!(status["hosts"]["failed"], 120, "{status}");
    assert_eq!(
        status["host_results"][119]["status"], "build_failed",
        "{status}"
    );
    assert!(status["host_results"][0]["error"].is_null(), "{status}");

    let refused = ask(&client, "build.api.v1.builds", json!({"limit": 100000})).await;
    assert_eq!(refused["code"], "invalid", "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap_or_default()
            .contains("200"),
        "{refused}"
    );
    let bad_cursor = ask(&client, "build.api.v1.builds", json!({"cursor": "nope"})).await;
    assert_eq!(bad_cursor["code"], "invalid", "{bad_cursor}");
}

/// What a person reads for a request whose 300 hosts failed (three kinds of error): `watch`
/// and `status` group identical errors, stay short, and name the command for a host's log.
#[tokio::test(flavor = "multi_thread")]
async fn cli_output_for_300_failing_hosts_is_bounded() {
    let setup = Setup::new("fleet");
    let client = async_nats::connect(&setup.nats.url).await.expect("connect");
    let id = "manyfailures01";
    store_events(&client, id, &[failed_finished(id, 300, 2000)]).await;
    fold_history(&client).await;

    let output = setup.cli(&["watch", id]);
    let (stdout, stderr) = crate::text(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stdout.len() < 16 * 1024,
        "{} bytes:\n{stdout}",
        stdout.len()
    );
    assert!(
        stdout.contains("100 hosts build_failed with the same error"),
        "{stdout}"
    );
    assert!(
        stdout.contains("100 hosts eval_failed with the same error"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("homelab-deploy logs {id} --host host000")),
        "{stdout}"
    );
    assert!(
        stdout.contains("200 build_failed, 100 eval_failed"),
        "{stdout}"
    );

    let output = setup.cli(&["status", id]);
    let (stdout, _) = crate::text(&output);
    assert!(stdout.len() < 4 * 1024, "{stdout}");
    assert!(stdout.contains("build_failed host000, host003"), "{stdout}");
    assert!(stdout.contains("out of memory"), "{stdout}");
}
