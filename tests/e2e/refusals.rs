//! Bad input gets a clear error, loses nothing and never crashes the builder.

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use serde_json::Value;
use test_support::{free_port, run_cli, stored_messages, wait_for_finished};

use crate::{bin, text, Setup};

/// Messages waiting in the requests stream.
async fn pending_requests(client: &async_nats::Client) -> u64 {
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js
        .get_stream("BUILD_REQUESTS")
        .await
        .expect("requests stream");
    stream.info().await.expect("stream info").state.messages
}

/// Waits up to 10 s for the requests stream to be empty: the builder acks a request just after
/// storing its `finished` event, which the CLI may have seen first.
async fn queue_drains(client: &async_nats::Client) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pending = pending_requests(client).await;
        if pending == 0 || Instant::now() >= deadline {
            return pending;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The builder of `setup` still builds (`build demo web` succeeds), still runs, and leaves the
/// queue empty.
async fn still_builds(setup: &mut Setup, client: &async_nats::Client) {
    let output = setup.cli(&["build", "demo", "web"]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(setup.builder.is_running());
    assert_eq!(queue_drains(client).await, 0);
}

/// An unknown repo fails within seconds, names the repo, exits 3 and parks nothing in the queue.
#[tokio::test(flavor = "multi_thread")]
async fn unknown_repo_is_refused_at_once() {
    let setup = Setup::new("fleet");
    let started = Instant::now();
    let output = setup.cli(&["build", "no-such-repo", "all"]);
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        stderr.contains("no builder serves repo no-such-repo"),
        "{stderr}"
    );
    assert_eq!(pending_requests(&setup.nats.client().await).await, 0);
}

/// A repo outside the subject rules, an empty or overlong host name, or a hostile ref or rev is
/// a usage error before anything is sent: the NATS URL given here does not even answer. (Any
/// other host name is data: `web.>` is encoded, see names.rs.)
#[test]
fn hostile_names_are_usage_errors() {
    let dead_url = format!("nats://127.0.0.1:{}", free_port());
    let overlong = "é".repeat(100);
    for args in [
        &["build", "demo", ""][..],
        &["build", "demo", &overlong],
        &["build", "demo*", "web"],
        &["build", "responses", "all"],
        &["build", "demo", "web", "--rev", "HEAD~1"],
        &["build", "demo", "web", "--ref", "--upload-pack=x"],
        &["build", "demo", "web", "--all"],
    ] {
        let output = run_cli(bin(), &dead_url, args, Duration::from_secs(20));
        let (_, stderr) = text(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("error"), "{args:?}: {stderr}");
    }
}

/// NATS down: exit 3 within seconds, saying which URL could not be reached.
#[test]
fn nats_down_is_exit_3() {
    let url = format!("nats://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let output = run_cli(
        bin(),
        &url,
        &["build", "demo", "web"],
        Duration::from_secs(30),
    );
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("cannot reach NATS") && stderr.contains(&url),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// Malformed bodies from a raw client each get a `finished` `failed` event naming the problem,
/// are acked (the queue ends empty), and the builder goes on serving.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_are_answered_and_acked() {
    let mut setup = Setup::new("fleet");
    let client = setup.nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let cases: [(&str, &[u8], &str); 5] = [
        ("BADJSON001", b"{not json", "not a valid build request"),
        ("BADTYPES01", br#"{"rev": 12}"#, "invalid type"),
        ("BADREV0001", br#"{"rev": "HEAD~1"}"#, "commit id"),
        ("BADREF0001", br#"{"ref": "../../etc/passwd"}"#, "git ref"),
        ("IDMISMATCH", br#"{"id": "SOMEONEELSE"}"#, "differs"),
    ];
    for (id, body, _) in &cases {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", *id);
        js.publish_with_headers("build.demo.web", headers, body.to_vec().into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    for (id, _, expected) in &cases {
        let events =
            wait_for_finished(&client, &format!("build.responses.demo.web.{id}.events")).await;
        assert_eq!(events.len(), 1, "{events:#?}");
        let finished = &events[0];
        assert_eq!(finished["status"], "failed");
        assert_eq!(finished["seq"], 1);
        let error = finished["error"].as_str().unwrap_or_default();
        assert!(error.contains(expected), "{id}: {error}");
    }

    // A target that breaks the rules cannot be answered on a subject; it is dropped and logged.
    js.publish("build.demo.web$evil", "{}".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    // Oversized requests are refused by the stream itself, to the sender.
    let huge = vec![b' '; 64 * 1024];
    let refused = match js.publish("build.demo.web", huge.into()).await {
        Ok(ack) => ack.await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a 64 KiB request was accepted");

    still_builds(&mut setup, &client).await;
    let log = setup.builder.log();
    assert!(
        log.contains("refused malformed request") && log.contains("web$evil"),
        "{log}"
    );
}

/// An oversized body that still fits the stream is refused by the builder with a finished event.
#[tokio::test(flavor = "multi_thread")]
async fn body_over_the_builder_limit_gets_a_finished_event() {
    let setup = Setup::new("fleet");
    let client = setup.nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", "OVERSIZED1");
    let body = format!(r#"{{"requested_by": "{}"}}"#, "x".repeat(17 * 1024));
    js.publish_with_headers("build.demo.web", headers, body.into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let events = wait_for_finished(&client, "build.responses.demo.web.OVERSIZED1.events").await;
    let error = events[0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("limit"), "{error}");
    let logs: Vec<Value> =
        stored_messages(&client, "build.responses.demo.web.OVERSIZED1.logs").await;
    assert!(logs.is_empty());
}

/// A running builder fed 200 random and adversarial bodies (invalid UTF-8, deep nesting, huge
/// numbers, shell and path syntax) answers each with a refusal or a build, and keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn builder_survives_a_flood_of_hostile_requests() {
    let mut setup = Setup::new("fleet");
    let client = setup.nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let mut seed: u64 = 0x5eed;
    let mut next = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        seed >> 33
    };
    let samples: Vec<Vec<u8>> = (0..200)
        .map(|i| match i % 5 {
            0 => (0..(next() % 512)).map(|_| next() as u8).collect(),
            1 => format!("{}{}", "[".repeat(300), "]".repeat(300)).into_bytes(),
            2 => format!(r#"{{"timeout_secs": {}{}}}"#, next(), "9".repeat(400)).into_bytes(),
            3 => r#"{"ref": "$(reboot)", "requested_by": "x"}"#.as_bytes().to_vec(),
            _ => format!(r#"{{"rev": "../../{}", "mode": "explode"}}"#, next()).into_bytes(),
        })
        .collect();
    for (i, body) in samples.into_iter().enumerate() {
        // More than the 100 requests a target may have queued: wait for the builder when full.
        loop {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("HOSTILE{i:04}").as_str());
            let ack = js
                .publish_with_headers("build.demo.web", headers, body.clone().into())
                .await
                .expect("publish")
                .await;
            match ack {
                Ok(_) => break,
                Err(err) if err.to_string().contains("maximum messages per subject") => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => panic!("request {i} not stored: {err}"),
            }
        }
    }
    for i in [0, 1, 2, 3, 4, 199] {
        let events = wait_for_finished(
            &client,
            &format!("build.responses.demo.web.HOSTILE{i:04}.events"),
        )
        .await;
        assert_eq!(events.len(), 1, "{events:#?}");
        assert_eq!(events[0]["status"], "failed");
    }
    still_builds(&mut setup, &client).await;
}
