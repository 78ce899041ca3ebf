//! Ephemeral builders: `builder --once`, `--max-builds`, `--idle-exit` and `--lifetime` bound a
//! session; the builder takes a generated name, shows as ephemeral, and leaves no registry
//! entry, consumer or state behind. Scale-in is safe: nothing is lost or built twice.

use std::time::Duration;

use serde_json::Value;
use test_support::{free_port, jsz_request_consumer, wait_until, Builder, Fleet};

use crate::{bin, seqs_are_contiguous, text};

/// Waits until request `id` started building a host; panics with `builder`'s log if it never
/// did.
async fn wait_building(fleet: &Fleet, id: &str, builder: &Builder) {
    let started = fleet
        .poll_events(id, Duration::from_secs(30), |events| {
            events.iter().any(|e| e["type"] == "host_started")
        })
        .await;
    assert!(
        started.is_some(),
        "{id} never started building; log:\n{}",
        builder.log()
    );
}

/// Starts a nameless builder of `fleet` with `args` and waits until it is ready.
fn session(fleet: &Fleet, args: &[&str]) -> Builder {
    let config = Builder::nameless_config(&fleet.nats.url, "demo", &fleet.repo.url());
    let builder = Builder::spawn_config_with_args(bin(), "", &config, args);
    builder.wait_ready();
    builder
}

/// The phase `homelab-deploy status ID --json` shows (null when it shows none).
fn phase(fleet: &Fleet, id: &str) -> Value {
    let output = fleet.cli(&["status", id, "--json"]);
    let state: Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
    state["phase"].clone()
}

/// The registry as `homelab-deploy builders --json` shows it.
fn builders(fleet: &Fleet) -> Vec<Value> {
    let output = fleet.cli(&["builders", "--json"]);
    let list: Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
    list["builders"].as_array().cloned().unwrap_or_default()
}

/// Names of the consumers on the requests stream.
async fn consumers(fleet: &Fleet) -> Vec<String> {
    consumers_of(fleet, "BUILD_REQUESTS").await
}

/// The filter subjects of the consumers on the events stream. The builder reads with
/// wildcard filters (`build.responses.*.*.<id>.events`, all events when it rebuilds the state
/// bucket); the CLI follows a request's own subject.
async fn event_consumer_filters(fleet: &Fleet) -> Vec<String> {
    let js = async_nats::jetstream::new(fleet.nats.client().await);
    let stream = js.get_stream("BUILD_EVENTS").await.expect("events stream");
    let mut filters = Vec::new();
    for name in consumers_of(fleet, "BUILD_EVENTS").await {
        // A consumer can expire between the listing and this read.
        if let Ok(info) = stream.consumer_info(&name).await {
            filters.push(info.config.filter_subject.clone());
        }
    }
    filters
}

/// Names of the consumers on `stream`.
async fn consumers_of(fleet: &Fleet, stream: &str) -> Vec<String> {
    use futures::TryStreamExt;
    let js = async_nats::jetstream::new(fleet.nats.client().await);
    let stream = js.get_stream(stream).await.expect("stream");
    stream
        .consumer_names()
        .try_collect()
        .await
        .expect("consumer names")
}

/// Runs `builder` to its own exit; its exit code.
fn exit_code(builder: &mut Builder) -> i32 {
    let status = builder
        .wait_exit(Duration::from_secs(90))
        .unwrap_or_else(|| panic!("the builder did not exit; log:\n{}", builder.log()));
    status.code().unwrap_or(-1)
}

/// `--once` without a configured name: a unique name, shown as ephemeral while it runs; it
/// takes exactly one request, exits with its verdict (0 succeeded, 1 failed) and leaves no
/// registry entry, no consumer of its own and no state directory behind. The next request
/// stays queued for the next builder.
#[tokio::test(flavor = "multi_thread")]
async fn once_takes_one_request_and_exits_with_its_verdict() {
    let fleet = Fleet::new(bin(), "fleet");
    let mut first = session(&fleet, &["--once"]);
    let listed = wait_until(Duration::from_secs(20), || {
        builders(&fleet).iter().any(|b| b["ephemeral"] == true)
    });
    assert!(listed, "not listed as ephemeral: {:#?}", builders(&fleet));
    let name = builders(&fleet)[0]["name"]
        .as_str()
        .expect("name")
        .to_owned();
    assert!(!name.is_empty());
    let good = fleet.submit("web", &[]);
    let bad = fleet.submit("broken-build", &[]);

    assert_eq!(exit_code(&mut first), 0, "log:\n{}", first.log());
    // The session read the events stream (rebuilding the state bucket, checking the request's
    // earlier events); it deleted those readers' consumers rather than leave them to expire.
    let readers: Vec<String> = event_consumer_filters(&fleet)
        .await
        .into_iter()
        .filter(|filter| filter.contains('*'))
        .collect();
    assert_eq!(
        readers,
        Vec::<String>::new(),
        "the session left its readers' consumers on the events stream"
    );
    let events = fleet.finished(&good).await;
    seqs_are_contiguous(&events);
    let finished = events.last().expect("finished");
    assert_eq!(finished["status"], "succeeded", "{finished:#}");
    assert_eq!(finished["builder"], name.as_str());
    assert_eq!(phase(&fleet, &bad), "queued");
    assert!(builders(&fleet).is_empty(), "{:#?}", builders(&fleet));
    assert_eq!(consumers(&fleet).await, vec!["builder-demo".to_owned()]);
    assert!(
        !first.state_dir().join("sessions").exists(),
        "session state left behind"
    );

    let mut second = session(&fleet, &["--once"]);
    assert_eq!(exit_code(&mut second), 1, "log:\n{}", second.log());
    let events = fleet.finished(&bad).await;
    let finished = events.last().expect("finished");
    assert_eq!(finished["status"], "failed", "{finished:#}");
    assert_ne!(finished["builder"], name.as_str(), "names are unique");
}

/// `--max-builds 2` takes two of three queued requests and exits at once (limits that have not
/// fired, an hour's `--lifetime` and `--idle-exit`, do not hold it up); `--idle-exit` takes the
/// third, then exits once nothing came for that long; `--once --idle-exit` with an empty queue
/// exits 4 (no verdict).
#[tokio::test(flavor = "multi_thread")]
async fn max_builds_and_idle_exit_bound_a_session() {
    let fleet = Fleet::new(bin(), "queue");
    let mut first = session(
        &fleet,
        &["--max-builds", "2", "--lifetime", "1h", "--idle-exit", "1h"],
    );
    let ids: Vec<String> = (0..3).map(|_| fleet.submit_new("short")).collect();
    assert_eq!(exit_code(&mut first), 0, "log:\n{}", first.log());
    for id in &ids[..2] {
        let events = fleet.finished(id).await;
        assert_eq!(
            events.last().map(|e| e["status"].clone()),
            Some(Value::from("succeeded"))
        );
    }
    assert_eq!(phase(&fleet, &ids[2]), "queued");

    let mut second = session(&fleet, &["--idle-exit", "2s"]);
    let events = fleet.finished(&ids[2]).await;
    seqs_are_contiguous(&events);
    assert_eq!(exit_code(&mut second), 0, "log:\n{}", second.log());
    assert!(second.log().contains("--idle-exit"), "{}", second.log());

    let mut third = session(&fleet, &["--once", "--idle-exit", "1s"]);
    assert_eq!(exit_code(&mut third), 4, "log:\n{}", third.log());
    assert!(builders(&fleet).is_empty(), "{:#?}", builders(&fleet));
}

/// `--lifetime` ends the session while a request builds: that request finishes (succeeded, not
/// handed back) and a request queued meanwhile stays queued.
#[tokio::test(flavor = "multi_thread")]
async fn lifetime_lets_the_running_request_finish() {
    let fleet = Fleet::new(bin(), "queue");
    // A session that ends at once sets up the streams, so requests can queue before the next.
    let mut setup = session(&fleet, &["--idle-exit", "100ms"]);
    assert_eq!(exit_code(&mut setup), 0, "log:\n{}", setup.log());
    let running = fleet.submit_new("medium");
    let waiting = fleet.submit_new("short");
    // Well inside `medium`'s five seconds of building.
    let mut builder = session(&fleet, &["--lifetime", "3s"]);
    assert_eq!(exit_code(&mut builder), 0, "log:\n{}", builder.log());
    let events = fleet.finished(&running).await;
    seqs_are_contiguous(&events);
    assert_eq!(
        events.last().map(|e| e["status"].clone()),
        Some(Value::from("succeeded"))
    );
    assert!(
        events.iter().all(|e| e["type"] != "requeued"),
        "{events:#?}"
    );
    assert_eq!(phase(&fleet, &waiting), "queued");
}

/// Scale-in by SIGTERM: the ephemeral builder hands its request back (exit 4 with `--once`: no
/// verdict), the next one builds it to the end, and it is built once, not twice.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_hands_the_request_to_the_next_session() {
    let fleet = Fleet::new(bin(), "queue");
    let mut first = session(&fleet, &["--once"]);
    let id = fleet.submit_new("medium");
    wait_building(&fleet, &id, &first).await;
    let status = first
        .terminate(Duration::from_secs(10))
        .expect("builder exited");
    assert_eq!(status.code(), Some(4), "log:\n{}", first.log());
    assert_eq!(
        fleet.events(&id).await.last().map(|e| e["type"].clone()),
        Some(Value::from("requeued"))
    );

    let mut second = session(&fleet, &["--once"]);
    assert_eq!(exit_code(&mut second), 0, "log:\n{}", second.log());
    let events = fleet.finished(&id).await;
    seqs_are_contiguous(&events);
    let started: Vec<&Value> = events.iter().filter(|e| e["type"] == "started").collect();
    assert_eq!(started.len(), 2, "{events:#?}");
    assert_eq!(
        events.last().map(|e| e["status"].clone()),
        Some(Value::from("succeeded"))
    );
    let built = events
        .iter()
        .filter(|e| e["type"] == "host_finished" && e["result"]["status"] == "built")
        .count();
    assert_eq!(built, 1, "{events:#?}");
}

/// What KEDA's NATS JetStream scaler reads: `GET /jsz?acc=$G&consumers=true&config=true` on
/// nats-server's monitoring port, account `$G` (`DEPLOY` with the shipped accounts), stream
/// `BUILD_REQUESTS`, consumer `builder-<repo>`, lag = `num_pending` (queued) + `num_ack_pending`
/// (running). With one request running and three queued, the figures are 3 and 1, and the
/// builder's gauge `homelab_deploy_queue_depth{repo="demo"}` says 3 too.
#[tokio::test(flavor = "multi_thread")]
async fn queue_depth_is_where_autoscalers_look() {
    let fleet = Fleet::monitored(bin(), "queue");
    let port = free_port();
    let builder = fleet.builder(&format!("\n\n[metrics]\nlisten = \"127.0.0.1:{port}\""));
    let running = fleet.submit_new("long");
    wait_building(&fleet, &running, &builder).await;
    for _ in 0..3 {
        fleet.submit_new("short");
    }

    let mut figures = None;
    for _ in 0..200 {
        let jsz = fleet
            .nats
            .monitoring("/jsz?acc=$G&consumers=true&config=true")
            .await;
        figures = jsz_request_consumer(&jsz, "builder-demo");
        if figures == Some((3, 1)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(figures, Some((3, 1)), "queued, running per /jsz");
    // The timer's script of docs/operations.md reads the same figure: 3 waiting, 2 per builder.
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs/systemd/homelab-deploy-scale");
    let monitor = fleet.nats.monitoring_url().expect("monitoring url");
    let output = std::process::Command::new(script)
        .env("MONITOR", monitor)
        .env("ACCOUNT", "$G")
        .env("REPO", "demo")
        .env("START", "echo")
        .output()
        .expect("run homelab-deploy-scale");
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(
        stdout,
        "homelab-deploy-ephemeral@1.service\nhomelab-deploy-ephemeral@2.service\ndemo: 3 waiting; builders 1..2 started\n"
    );

    let gauge = "homelab_deploy_queue_depth{repo=\"demo\"} ";
    let mut depth = None;
    let seen = wait_until(Duration::from_secs(20), || {
        depth = crate::metrics::scrape(port)
            .lines()
            .find_map(|line| line.strip_prefix(gauge).map(str::to_owned));
        depth.as_deref() == Some("3")
    });
    assert!(seen, "{gauge}is {depth:?}, not 3");
}
