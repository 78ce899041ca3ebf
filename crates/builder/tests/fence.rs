//! The event fence against a real nats-server: a writer whose subject another writer has
//! published to since its last message is refused, while a retry of its own message whose
//! ack was lost is recognised, inside the duplicate window and past it.

use std::time::Duration;

use homelab_deploy_builder::bus::{ensure_streams, BusError, Publisher};
use homelab_deploy_builder::config::StreamsConfig;
use homelab_deploy_protocol::RepoName;
use test_support::NatsServer;

const SUBJECT: &str = "build.responses.demo.web.FENCE0001.events";

async fn publisher(nats: &NatsServer, duplicate_window_secs: u64) -> Publisher {
    let js = async_nats::jetstream::new(nats.client().await);
    let limits = StreamsConfig {
        events_duplicate_window_secs: duplicate_window_secs,
        ..Default::default()
    };
    let repo = RepoName::parse("demo").expect("repo name");
    ensure_streams(&js, &limits, &[repo])
        .await
        .expect("streams");
    Publisher::new(js)
}

#[tokio::test(flavor = "multi_thread")]
async fn another_writer_is_fenced_and_an_own_retry_is_not() {
    let nats = NatsServer::start();
    let publisher = publisher(&nats, 1).await;
    let body = || bytes::Bytes::from_static(b"{}");

    // Writer A stores its first event; its ack is "lost", so it sends it again once the
    // duplicate window is over: the copy on the subject is recognised as its own.
    let first = publisher
        .publish_fenced(SUBJECT, "FENCE0001.event.1.A", body(), 0)
        .await
        .expect("first event");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let retried = publisher
        .publish_fenced(SUBJECT, "FENCE0001.event.1.A", body(), 0)
        .await
        .expect("a retry past the duplicate window is not a takeover");
    assert_eq!(retried, first);

    // Writer B (the request redelivered to another builder) continues after A's event.
    let taken = publisher
        .publish_fenced(SUBJECT, "FENCE0001.event.2.B", body(), first)
        .await
        .expect("B continues after A");
    // Inside the duplicate window, B's retry answers with B's stored copy.
    let again = publisher
        .publish_fenced(SUBJECT, "FENCE0001.event.2.B", body(), first)
        .await
        .expect("B's retry");
    assert_eq!(again, taken);

    // A resumes and publishes its next event, past the duplicate window and within it.
    for id in ["FENCE0001.event.2.A", "FENCE0001.event.3.A"] {
        match publisher.publish_fenced(SUBJECT, id, body(), first).await {
            Err(BusError::Fenced { .. }) => {}
            other => panic!("A published after B took over: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_over_max_payload_is_refused_at_once() {
    let nats = NatsServer::start();
    let publisher = publisher(&nats, 120).await;
    let max = publisher.max_body_bytes();
    assert!(max < 1024 * 1024, "{max}");
    let body = bytes::Bytes::from(vec![b' '; max + 4096]);
    let started = std::time::Instant::now();
    match publisher
        .publish_fenced(SUBJECT, "FENCE0001.event.1.A", body, 0)
        .await
    {
        Err(BusError::Refused { .. }) => {}
        other => panic!("expected a refusal: {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2), "it was retried");
}
