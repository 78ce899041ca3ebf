//! The event fence against a real nats-server: a writer whose subject another writer has
//! published to since its last message is refused, while a retry of its own message whose
//! ack was lost is recognised, inside the duplicate window and past it; log batches are fenced
//! by the events.

use std::time::Duration;

use homelab_deploy_builder::attempts;
use homelab_deploy_builder::bus::{ensure_streams, BusError, LogFence, Publisher};
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

/// Log batches are fenced by the request's events: stored while the events subject ends with
/// the writer's own event (also one stored after the batch's fence was read), refused once
/// another writer stored an event there.
#[tokio::test(flavor = "multi_thread")]
async fn log_batches_stop_when_another_writer_takes_the_events() {
    let nats = NatsServer::start();
    let publisher = publisher(&nats, 120).await;
    let body = || bytes::Bytes::from_static(b"{}");
    const LOGS: &str = "build.responses.demo.web.FENCE0001.logs";

    let first = publisher
        .publish_fenced(SUBJECT, "FENCE0001.event.1.A", body(), 0)
        .await
        .expect("A's first event");
    let fence = LogFence::new(SUBJECT.to_owned(), "A".to_owned(), first);
    publisher
        .publish_log(LOGS, "FENCE0001.log.web.1.A", body(), &fence)
        .await
        .expect("A's batch while its event is the last");

    // A stores another event without telling the fence: the refusal it causes is A's own.
    let second = publisher
        .publish_fenced(SUBJECT, "FENCE0001.event.2.A", body(), first)
        .await
        .expect("A's second event");
    publisher
        .publish_log(LOGS, "FENCE0001.log.web.2.A", body(), &fence)
        .await
        .expect("A's batch after its own newer event");

    publisher
        .publish_fenced(SUBJECT, "FENCE0001.event.3.B", body(), second)
        .await
        .expect("B takes over");
    match publisher
        .publish_log(LOGS, "FENCE0001.log.web.3.A", body(), &fence)
        .await
    {
        Err(BusError::Fenced { .. }) => {}
        other => panic!("A added logs after B took over: {other:?}"),
    }
}

/// Claims made at the same instant (two deliveries of one request) each get their own number,
/// and a later claim counts on from the newest, or from the attempts the caller knows of.
#[tokio::test(flavor = "multi_thread")]
async fn simultaneous_claims_are_numbered_apart() {
    let nats = NatsServer::start();
    let publisher = publisher(&nats, 120).await;
    const CLAIMS: &str = "build.responses.demo.web.FENCE0001.attempts";
    let claim = |builder: &'static str, previous: u64| {
        let publisher = publisher.clone();
        async move {
            attempts::claim(&publisher, CLAIMS, "FENCE0001", builder, (previous, 1))
                .await
                .expect("claimed")
                .attempt
        }
    };
    let (a, b, c) = tokio::join!(claim("a", 0), claim("b", 0), claim("c", 0));
    let mut numbers = vec![a, b, c];
    numbers.sort_unstable();
    assert_eq!(numbers, [1, 2, 3]);
    assert_eq!(claim("d", 0).await, 4);
    assert_eq!(claim("e", 7).await, 8);
    let (_, last) = attempts::last_claim(publisher.jetstream(), CLAIMS)
        .await
        .expect("read")
        .expect("a claim");
    assert_eq!(last.map(|claim| claim.builder).as_deref(), Some("e"));
}
