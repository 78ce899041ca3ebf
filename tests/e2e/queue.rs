//! The queue and the fleet: several builders, a killed builder, cancel, replace, status, watch,
//! logs, builds, builders, drain, a full queue and host timeouts.

use std::time::{Duration, Instant};

use serde_json::Value;
use test_support::{run_cli, wait_until, Builder, FixtureRepo, Fleet};

use crate::{bin, kill_one_of_two, seqs_are_contiguous, text};

/// The `finished` event ending `events`: the request was cancelled by someone whose name
/// contains `by` (the CLI's user@host, or the id of the `replace` request that superseded it).
fn assert_cancelled_by<'a>(events: &'a [Value], by: &str) -> &'a Value {
    let finished = events.last().expect("finished");
    assert_eq!(finished["status"], "cancelled", "{finished:#}");
    assert!(
        finished["cancelled_by"]
            .as_str()
            .is_some_and(|cancelled_by| cancelled_by.contains(by)),
        "{finished:#}"
    );
    finished
}

/// Two builders share one queue: six requests, both builders take work, all succeed.
#[tokio::test(flavor = "multi_thread")]
async fn two_builders_share_the_queue() {
    let fleet = Fleet::new(bin(), "queue");
    let first = fleet.builder("");
    let second = fleet.builder("");
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(fleet.submit_new("short"));
    }
    let mut builders = std::collections::BTreeSet::new();
    for id in &ids {
        let events = fleet.finished(id).await;
        seqs_are_contiguous(&events);
        assert_eq!(
            events.last().map(|e| e["status"].clone()),
            Some(Value::from("succeeded"))
        );
        builders.insert(events[0]["builder"].as_str().expect("builder").to_owned());
    }
    assert!(
        builders.contains(&first.name) && builders.contains(&second.name),
        "only {builders:?} took work"
    );
}

/// A builder SIGKILLed mid-build loses nothing: the request is redelivered to the other builder,
/// its events go on with the next seq under a new `started` (attempt 2), and it succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn killed_builder_request_completes_on_another() {
    let fleet = Fleet::new(bin(), "queue");
    let ack_wait = "\n[streams]\nrequest_ack_wait_secs = 3";
    let mut builders = vec![fleet.builder(ack_wait), fleet.builder(ack_wait)];
    let rev = fleet.repo.new_salt();
    let id = fleet.submit("medium", &["--rev", &rev]);
    fleet.wait_event(&id, "host_started").await;
    let victim = fleet.events(&id).await[0]["builder"]
        .as_str()
        .expect("builder")
        .to_owned();
    let survivor = kill_one_of_two(&mut builders, &victim);

    let events = fleet.finished(&id).await;
    seqs_are_contiguous(&events);
    let started: Vec<&Value> = events.iter().filter(|e| e["type"] == "started").collect();
    assert_eq!(started.len(), 2, "{events:#?}");
    assert_eq!(started[1]["attempt"], 2);
    assert_eq!(started[1]["builder"], survivor.name.as_str());
    assert_eq!(started[1]["rev"], rev.as_str());
    let finished = events.last().expect("finished");
    assert_eq!(finished["status"], "succeeded", "{finished:#}");
    assert_eq!(finished["builder"], survivor.name.as_str());
}

/// Cancel: a queued request never starts; a running one has its nix killed at once (no build
/// process survives), ends `cancelled` with the reason and who asked, and the next request starts.
#[tokio::test(flavor = "multi_thread")]
async fn cancel_queued_and_running_requests() {
    let fleet = Fleet::new(bin(), "queue");
    let _builder = fleet.builder("");
    let running = fleet.submit("long", &[]);
    fleet.wait_event(&running, "host_started").await;
    let queued = fleet.submit("short", &[]);

    let output = fleet.cli(&["status", &queued, "--json"]);
    let state: Value = serde_json::from_slice(&output.stdout).expect("status json");
    assert_eq!(state["phase"], "queued", "{state:#}");
    assert_eq!(state["queue_position"], 1);

    let output = fleet.cli(&["cancel", &queued, "--reason", "not needed"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
    let events = fleet.finished(&queued).await;
    assert_eq!(
        events.len(),
        1,
        "a cancelled queued request must never start: {events:#?}"
    );
    assert_eq!(events[0]["status"], "cancelled");
    assert!(events[0]["error"]
        .as_str()
        .is_some_and(|e| e.contains("not needed")));

    // `host_started` comes before nix has forked the builder: wait for it.
    assert!(
        wait_until(Duration::from_secs(20), || !fleet
            .repo
            .build_processes()
            .is_empty()),
        "the long build should be running"
    );
    let cancelled_at = Instant::now();
    let output = fleet.cli(&["cancel", &running, "--reason", "wrong branch"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
    let events = fleet.finished(&running).await;
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(15),
        "cancel took {:?}",
        cancelled_at.elapsed()
    );
    seqs_are_contiguous(&events);
    let finished = assert_cancelled_by(&events, "@");
    assert!(finished["error"]
        .as_str()
        .is_some_and(|e| e.contains("wrong branch")));
    assert_eq!(finished["hosts"][0]["status"], "cancelled");
    fleet.repo.assert_builds_gone(
        Duration::from_secs(10),
        "build processes survived the cancel",
    );

    let output = fleet.cli(&["status", &running]);
    assert!(text(&output).0.contains("cancelled"), "{}", text(&output).0);
    let started = Instant::now();
    let output = fleet.cli(&["build", "demo", "short", "--json"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// `replace` cancels the running request for the same target; of two racing `replace`
/// requests only the newest is built; an `enqueue` request queued after a `replace` one does
/// not hide it.
#[tokio::test(flavor = "multi_thread")]
async fn replace_cancels_older_requests_and_the_newest_wins() {
    let fleet = Fleet::new(bin(), "queue");
    let _builder = fleet.builder("");
    let first = fleet.submit("long", &[]);
    fleet.wait_event(&first, "host_started").await;
    let second = fleet.submit("long", &["--mode", "replace"]);
    assert_cancelled_by(&fleet.finished(&first).await, &second);
    fleet.wait_event(&second, "host_started").await;

    let third = fleet.submit("long", &["--mode", "replace"]);
    let fourth = fleet.submit("long", &["--mode", "replace"]);
    for older in [&second, &third] {
        let events = fleet.finished(older).await;
        assert_eq!(
            events.last().map(|e| e["status"].clone()),
            Some(Value::from("cancelled"))
        );
    }
    let third_events = fleet.events(&third).await;
    assert!(
        third_events.iter().all(|e| e["type"] != "started"),
        "a superseded replace request was built: {third_events:#?}"
    );
    fleet.wait_event(&fourth, "host_started").await;

    // An `enqueue` request queued on top of a `replace` one does not hide it.
    let fifth = fleet.submit("long", &["--mode", "replace"]);
    let sixth = fleet.submit("long", &[]);
    assert_cancelled_by(&fleet.finished(&fourth).await, &fifth);
    fleet.wait_event(&fifth, "host_started").await;
    for id in [&sixth, &fifth] {
        let output = fleet.cli(&["cancel", id]);
        assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
        fleet.finished(id).await;
    }
}

/// `watch` replays from seq 1 after the build ended and from the middle while it runs; `logs`
/// prints from a line offset and follows a running build to its end.
#[tokio::test(flavor = "multi_thread")]
async fn watch_and_logs_replay_and_follow() {
    let fleet = Fleet::new(bin(), "queue");
    let _builder = fleet.builder("");
    let id = fleet.submit_new("medium");
    fleet.wait_event(&id, "host_started").await;

    // Both start while the build runs (it takes 5 s) and follow it to its end.
    let url = fleet.nats.url.clone();
    let watch_id = id.clone();
    let watching = std::thread::spawn(move || {
        run_cli(
            bin(),
            &url,
            &["watch", &watch_id, "--from-seq", "2", "--json"],
            Duration::from_secs(120),
        )
    });
    let follow = fleet.cli(&["logs", &id, "--follow"]);
    let (stdout, stderr) = text(&follow);
    assert_eq!(follow.status.code(), Some(0), "{stderr}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("medium | medium ") && l.ends_with("starts")),
        "{stdout}"
    );

    let watch = watching.join().expect("watch thread");
    assert_eq!(watch.status.code(), Some(0), "{}", text(&watch).1);
    let events: Vec<Value> = text(&watch)
        .0
        .lines()
        .map(|line| serde_json::from_str(line).expect("event json"))
        .collect();
    assert_eq!(
        events.first().map(|e| e["seq"].clone()),
        Some(Value::from(2))
    );
    assert_eq!(
        events.last().map(|e| e["type"].clone()),
        Some(Value::from("finished"))
    );

    let replay = fleet.cli(&["watch", &id, "--json"]);
    let all: Vec<&str> = std::str::from_utf8(&replay.stdout)
        .expect("utf8")
        .lines()
        .collect();
    assert_eq!(
        all.len(),
        events.len() + 1,
        "replay from seq 1 after the end"
    );

    let offset = fleet.cli(&["logs", &id, "--host", "medium", "--from-line", "2"]);
    let lines: Vec<String> = text(&offset).0.lines().map(str::to_owned).collect();
    let full = fleet.cli(&["logs", &id]);
    let all_lines: Vec<String> = text(&full).0.lines().map(str::to_owned).collect();
    assert!(all_lines.len() >= 2, "{all_lines:?}");
    assert_eq!(lines, all_lines[1..].to_vec());

    // `--json`: the same lines, one object each, numbered per host from 1.
    let json = fleet.cli(&["logs", &id, "--host", "medium", "--json"]);
    assert_eq!(json.status.code(), Some(0), "{}", text(&json).1);
    let records: Vec<Value> = text(&json)
        .0
        .lines()
        .map(|line| serde_json::from_str(line).expect("log line json"))
        .collect();
    let medium: Vec<String> = all_lines
        .iter()
        .filter_map(|line| line.strip_prefix("medium | ").map(str::to_owned))
        .collect();
    assert_eq!(records.len(), medium.len(), "{records:?}");
    for (index, (record, line)) in records.iter().zip(&medium).enumerate() {
        assert_eq!(record["host"], "medium");
        assert_eq!(record["line"], index as u64 + 1);
        assert_eq!(record["text"], line.as_str());
    }
}

/// `builders` shows the fleet; `builds` filters by state; `builder drain NAME` over NATS makes
/// the builder exit 0 and leave the registry.
#[tokio::test(flavor = "multi_thread")]
async fn builders_builds_and_drain() {
    let fleet = Fleet::new(bin(), "queue");
    let mut builder = fleet.builder("");
    let output = fleet.cli(&["builders", "--json"]);
    let list: Value = serde_json::from_slice(&output.stdout).expect("builders json");
    assert_eq!(
        list["builders"][0]["name"],
        builder.name.as_str(),
        "{list:#}"
    );
    assert_eq!(list["builders"][0]["states"][0]["state"], "idle");
    assert_eq!(list["builders"][0]["repos"], serde_json::json!(["demo"]));

    let output = fleet.cli(&["build", "demo", "short"]);
    assert_eq!(output.status.code(), Some(0));
    let output = fleet.cli(&["build", "demo", "nope"]);
    assert_eq!(output.status.code(), Some(1));
    let succeeded = fleet.cli(&["builds", "--state", "succeeded", "--json"]);
    let list: Value = serde_json::from_slice(&succeeded.stdout).expect("builds json");
    let builds = list["builds"].as_array().expect("builds");
    assert_eq!(builds.len(), 1, "{list:#}");
    assert_eq!(builds[0]["target"], "short");
    let all = fleet.cli(&["builds"]);
    assert!(
        text(&all).0.contains("failed") && text(&all).0.contains("succeeded"),
        "{}",
        text(&all).0
    );

    let output = fleet.cli(&["builder", "drain", &builder.name]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
    let exited = wait_until(Duration::from_secs(20), || !builder.is_running());
    assert!(
        exited,
        "builder did not exit after drain:\n{}",
        builder.log()
    );
    let output = fleet.cli(&["builders", "--json"]);
    let list: Value = serde_json::from_slice(&output.stdout).expect("builders json");
    assert_eq!(list["builders"], serde_json::json!([]), "{list:#}");
}

/// A full queue is refused at once with `queue_full` and exit 3, never dropped silently.
#[tokio::test(flavor = "multi_thread")]
async fn full_queue_is_refused_with_queue_full() {
    let fleet = Fleet::new(bin(), "queue");
    let _builder = fleet.builder("\n[streams]\nmax_pending_requests_per_target = 2");
    let running = fleet.submit("long", &[]);
    fleet.wait_event(&running, "host_started").await;
    fleet.submit("short", &[]);
    fleet.submit("short", &[]);
    let output = fleet.cli(&["build", "demo", "short", "--no-wait"]);
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("queue_full"), "{stderr}");
    fleet.cli(&["cancel", &running]);
}

/// A host over its time limit is `timed_out` and its build processes are killed; a request over
/// its limit has the rest of its hosts `timed_out` without building; limits a request asks for
/// are capped by the builder's maximum.
#[tokio::test(flavor = "multi_thread")]
async fn host_and_request_timeouts() {
    let fleet = Fleet::new(bin(), "queue");
    let _builder = fleet.builder("\nhost_timeout_secs = 2\nmax_timeout_secs = 600");
    let output = fleet.cli(&["build", "demo", "long", "--json"]);
    assert_eq!(output.status.code(), Some(1));
    let finished: Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(finished["hosts"][0]["status"], "timed_out", "{finished:#}");
    fleet.repo.assert_builds_gone(
        Duration::from_secs(10),
        "build processes survived the timeout",
    );

    // Hosts build in name order: long, medium, short. The request limit stops `long` after 3 s
    // (its own limit is raised to 60 s) and leaves the others unbuilt.
    let output = fleet.cli(&[
        "build",
        "demo",
        "all",
        "--json",
        "--host-timeout",
        "60",
        "--build-timeout",
        "3",
    ]);
    let finished: Value = serde_json::from_slice(&output.stdout).expect("json");
    let statuses: Vec<&str> = finished["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| h["status"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        statuses,
        ["timed_out", "timed_out", "timed_out"],
        "{finished:#}"
    );
    assert!(
        finished["hosts"][2]["error"]
            .as_str()
            .is_some_and(|e| e.contains("request timed out after 3s")),
        "{finished:#}"
    );

    let output = fleet.cli(&["build", "demo", "short", "--json", "--host-timeout", "601"]);
    let finished: Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(finished["status"], "failed");
    assert!(
        finished["error"]
            .as_str()
            .is_some_and(|e| e.contains("max_timeout_secs")),
        "{finished:#}"
    );
}

/// SIGTERM (`systemctl stop`, or the restart of a `nixos-rebuild switch`) kills the running
/// build at once and hands its request back to the queue: it is not reported failed, `status`
/// shows it queued again (event `requeued`), and the next builder builds it (attempt 2,
/// numbering continued).
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_returns_the_request_to_the_queue_at_once() {
    let fleet = Fleet::new(bin(), "queue");
    let mut first = fleet.builder("");
    let id = fleet.submit_new("medium");
    fleet.wait_event(&id, "host_started").await;
    // Someone watching it sees the hand-back and then the end on the next builder.
    let url = fleet.nats.url.clone();
    let watch_id = id.clone();
    let watching = std::thread::spawn(move || {
        run_cli(bin(), &url, &["watch", &watch_id], Duration::from_secs(120))
    });
    // Well inside the build's own time: the builder does not wait for it.
    let status = first
        .terminate(Duration::from_secs(10))
        .expect("builder exited");
    assert!(status.success(), "exit {status}; log:\n{}", first.log());
    let events = fleet.events(&id).await;
    assert!(
        events.iter().all(|e| e["type"] != "finished"),
        "{events:#?}"
    );
    let last = events.last().cloned().unwrap_or_default();
    assert_eq!(last["type"], "requeued", "{events:#?}");
    assert_eq!(last["builder"], first.name.as_str());
    let output = fleet.cli(&["status", &id, "--json"]);
    let state: Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
    assert_eq!(state["phase"], "queued", "{state:#}");
    fleet
        .repo
        .assert_builds_gone(Duration::from_secs(10), "build processes survived");

    let second = fleet.builder("");
    let events = fleet.finished(&id).await;
    seqs_are_contiguous(&events);
    let started: Vec<&Value> = events.iter().filter(|e| e["type"] == "started").collect();
    assert_eq!(started.len(), 2, "{events:#?}");
    assert_eq!(started[1]["builder"], second.name.as_str());
    assert_eq!(started[1]["attempt"], 2, "{events:#?}");
    assert_eq!(
        events.last().map(|e| e["status"].clone()),
        Some(Value::from("succeeded"))
    );
    let watched = watching.join().expect("watch thread");
    let (_, stderr) = text(&watched);
    assert_eq!(watched.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "builder {} handed the request back to the queue",
            first.name
        )),
        "{stderr}"
    );
}

/// Past one machine: a 3-node NATS cluster with R3 streams, two builders on different nodes.
/// The node the building builder is connected to is killed mid-build: the builder fails over,
/// the build completes and no request or event is lost.
#[tokio::test(flavor = "multi_thread")]
async fn cluster_node_lost_mid_build() {
    let mut cluster = test_support::NatsCluster::start(3);
    cluster.wait_ready().await;
    let repo = FixtureRepo::new("queue");
    let extra = "\n[streams]\nreplicas = 3";
    let repos = [("demo", repo.url())];
    let builders = [
        Builder::start_with(bin(), &cluster.nodes[0].url, &repos, extra),
        Builder::start_with(bin(), &cluster.nodes[1].url, &repos, extra),
    ];
    let client_url = cluster.nodes[2].url.clone();
    let output = run_cli(
        bin(),
        &client_url,
        &["build", "demo", "medium", "--no-wait"],
        Duration::from_secs(60),
    );
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
    let id = text(&output).0.trim().to_owned();
    let client = cluster.nodes[2].client().await;
    let subject = format!("build.responses.demo.medium.{id}.events");
    let mut building = None;
    for _ in 0..600 {
        let events = test_support::try_stored_messages(&client, &subject)
            .await
            .unwrap_or_default();
        if events.iter().any(|e| e["type"] == "host_started") {
            building = events[0]["builder"].as_str().map(str::to_owned);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let building = building.expect("build started");
    let node = builders
        .iter()
        .position(|b| b.name == building)
        .expect("one of ours");
    cluster.nodes[node].stop();

    // JetStream answers nothing while the cluster elects new leaders: poll patiently.
    let mut events = Vec::new();
    for _ in 0..600 {
        if let Ok(stored) = test_support::try_stored_messages(&client, &subject).await {
            if stored.last().is_some_and(|e| e["type"] == "finished") {
                events = stored;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !events.is_empty(),
        "no finished event; builder log:\n{}",
        builders[node].log()
    );
    seqs_are_contiguous(&events);
    let finished = events.last().expect("finished");
    assert_eq!(
        finished["status"],
        "succeeded",
        "{finished:#}\nbuilder log:\n{}",
        builders[node].log()
    );
}

/// Priority: with one builder busy, scheduled requests queued before an interactive one still
/// wait for it: a flood of timer builds never starves a person's request.
#[tokio::test(flavor = "multi_thread")]
async fn interactive_requests_go_before_scheduled_ones() {
    let fleet = Fleet::new(bin(), "queue");
    let _builder = fleet.builder("");
    let blocker = fleet.submit("long", &[]);
    fleet.wait_event(&blocker, "host_started").await;
    let scheduled: Vec<String> = (0..3)
        .map(|_| {
            let rev = fleet.repo.new_salt();
            fleet.submit("short", &["--rev", &rev, "--priority", "scheduled"])
        })
        .collect();
    let person = fleet.submit_new("short");
    let output = fleet.cli(&["cancel", &blocker]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);

    let started_at = |events: &[Value]| {
        events
            .iter()
            .find(|e| e["type"] == "started")
            .and_then(|e| e["time"].as_str())
            .map(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                    .expect("time")
            })
            .expect("started")
    };
    let person_started = started_at(&fleet.finished(&person).await);
    for id in &scheduled {
        let events = fleet.finished(id).await;
        assert_eq!(
            events.last().map(|e| e["status"].clone()),
            Some(Value::from("succeeded")),
            "{events:#?}"
        );
        assert!(
            started_at(&events) > person_started,
            "scheduled {id} started before the interactive request"
        );
        // Handed back while the person's request went first, but started once.
        let started = events.iter().find(|e| e["type"] == "started");
        assert_eq!(started.map(|e| e["attempt"].clone()), Some(Value::from(1)));
    }
}

/// Sending someone's request id again (in the body only, so the server's duplicate window does
/// not drop the copy) neither takes over their running build nor ends their queued one: the copy
/// is answered under its own `stream-seq-<N>` id, and the owner's request builds as if alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_reused_id_cannot_take_over_or_end_another_request() {
    let fleet = Fleet::new(bin(), "queue");
    let _first = fleet.builder("");
    let _second = fleet.builder("");
    let js = async_nats::jetstream::new(fleet.nats.client().await);
    let send_copy = |id: String| {
        let js = js.clone();
        async move {
            let body = serde_json::json!({ "id": id }).to_string();
            js.publish("build.demo.short", body.into())
                .await
                .expect("publish")
                .await
                .expect("stored")
                .sequence
        }
    };
    let fleet = &fleet;
    let refused_copy = |seq: u64| async move {
        let events = fleet.finished(&format!("stream-seq-{seq}")).await;
        let finished = events.last().expect("finished");
        assert_eq!(finished["status"], "failed", "{finished:#}");
        assert!(
            finished["error"]
                .as_str()
                .is_some_and(|e| e.contains("belongs to another request")),
            "{finished:#}"
        );
    };
    let built_alone = |events: Vec<Value>, copy: u64| {
        seqs_are_contiguous(&events);
        let started: Vec<&Value> = events.iter().filter(|e| e["type"] == "started").collect();
        assert_eq!(started.len(), 1, "{events:#?}");
        assert_ne!(started[0]["request_seq"], copy, "{events:#?}");
        let finished = events.last().expect("finished");
        assert_eq!(finished["status"], "succeeded", "{finished:#}");
    };

    // Running on one builder while the other takes the copy.
    let running = fleet.submit_new("medium");
    fleet.wait_event(&running, "host_started").await;
    let copy = send_copy(running.clone()).await;
    refused_copy(copy).await;
    built_alone(fleet.finished(&running).await, copy);

    // Queued behind both builders at a lower priority than the copy, which goes first.
    let blockers = [fleet.submit("long", &[]), fleet.submit("long", &[])];
    for blocker in &blockers {
        fleet.wait_event(blocker, "host_started").await;
    }
    let rev = fleet.repo.new_salt();
    let queued = fleet.submit("short", &["--rev", &rev, "--priority", "scheduled"]);
    let copy = send_copy(queued.clone()).await;
    for blocker in &blockers {
        let output = fleet.cli(&["cancel", blocker]);
        assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
    }
    refused_copy(copy).await;
    built_alone(fleet.finished(&queued).await, copy);
}
