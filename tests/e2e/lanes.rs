//! Heavy lanes and warm-cache affinity, with real builders of different memory envelopes on
//! the `lanes` fixture, whose `heavy` host holds about 470 MiB while it evaluates.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use test_support::{run_cli, unique, Builder, FixtureRepo, Fleet};

use crate::{bin, seqs_are_contiguous, text};

/// A builder of `fleet` with `memory_mb` (none: the machine's memory) and extra lines for the
/// repo's table.
fn sized_builder(fleet: &Fleet, memory_mb: Option<u64>, repo_extra: &str) -> Builder {
    let builder_lines = memory_mb.map(|mb| format!("memory_mb = {mb}\n"));
    builder_with(
        fleet,
        builder_lines.as_deref().unwrap_or(""),
        repo_extra,
        "",
    )
}

/// A builder of `fleet` with extra lines for its `[builder]` table, the repo's table, and
/// tables after those.
fn builder_with(fleet: &Fleet, builder_lines: &str, repo_extra: &str, tables: &str) -> Builder {
    let name = unique("builder");
    let mut config = Builder::config(
        &name,
        &fleet.nats.url,
        Path::new("{state_dir}"),
        &[("demo", fleet.repo.url())],
    );
    config = config.replacen("\n\n[repos", &format!("\n{builder_lines}\n[repos"), 1);
    config.push_str(repo_extra);
    config.push_str(tables);
    Builder::start_config(bin(), &name, &config)
}

/// The events of request `id` once it finished, numbered without gaps.
async fn finished_in_order(fleet: &Fleet, id: &str) -> Vec<Value> {
    let events = fleet.finished(id).await;
    seqs_are_contiguous(&events);
    events
}

/// The builder named by the request's only `started` event.
fn started_by(events: &[Value]) -> String {
    let started: Vec<&Value> = events.iter().filter(|e| e["type"] == "started").collect();
    assert_eq!(started.len(), 1, "{events:#?}");
    started[0]["builder"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The registry as `homelab-deploy builders --json` shows it.
fn builders(fleet: &Fleet) -> Vec<Value> {
    let output = fleet.cli(&["builders", "--json"]);
    let list: Value = serde_json::from_slice(&output.stdout).expect("builders --json");
    list["builders"].as_array().cloned().unwrap_or_default()
}

/// What the fleet learned about `host` (the `BUILD_PLACEMENT` entry of `demo`).
async fn placement_of(fleet: &Fleet, host: &str) -> Value {
    let js = async_nats::jetstream::new(fleet.nats.client().await);
    let store = js
        .get_key_value("BUILD_PLACEMENT")
        .await
        .expect("placement bucket");
    let entry = store.get("demo").await.expect("read").expect("demo entry");
    let record: Value = serde_json::from_slice(&entry).expect("json");
    record["hosts"][host].clone()
}

fn time_of(event: &Value) -> time::OffsetDateTime {
    let text = event["time"].as_str().unwrap_or_default();
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|err| panic!("time of {event}: {err}"))
}

/// A small (200 MiB) and a big (4096 MiB) builder. The fleet learns `heavy`'s evaluation peak
/// from its first build; after that it starts only on the big builder, even while the big one
/// is busy and the small one idles, and light work keeps flowing on the small one meanwhile.
/// `busy` is pinned by `expected_peak_mb` before it was ever measured; an `all` request goes
/// whole to the builder that fits its heaviest host. Once the big builder is gone, `heavy` and
/// `all` fail at once, naming the host, its peak and the largest envelope left.
#[tokio::test(flavor = "multi_thread")]
async fn heavy_hosts_start_only_where_they_fit_and_fail_at_once_when_none_does() {
    let fleet = Fleet::new(bin(), "lanes");
    let pinned = "expected_peak_mb = { busy = 1024 }\n";
    let small = sized_builder(&fleet, Some(200), pinned);
    let big = sized_builder(&fleet, Some(4096), pinned);

    let envelopes: Vec<(String, u64)> = builders(&fleet)
        .iter()
        .map(|b| {
            let name = b["name"].as_str().unwrap_or_default().to_owned();
            (name, b["memory_mb"].as_u64().unwrap_or_default())
        })
        .collect();
    assert!(
        envelopes.contains(&(small.name.clone(), 200)),
        "{envelopes:?}"
    );
    assert!(
        envelopes.contains(&(big.name.clone(), 4096)),
        "{envelopes:?}"
    );
    let table = fleet.cli(&["builders"]);
    assert!(text(&table).0.contains("4096 MiB"), "{}", text(&table).0);

    // Never measured: it goes anywhere, and its peak is learned.
    let first = fleet.submit("heavy", &[]);
    let events = finished_in_order(&fleet, &first).await;
    assert_eq!(events.last().expect("finished")["status"], "succeeded");
    let learned = placement_of(&fleet, "heavy").await;
    let peak = learned["eval_peak_mb"].as_u64().unwrap_or_default();
    assert!((201..4096).contains(&peak), "{learned}");
    assert!(
        learned["last_builder"] == started_by(&events).as_str(),
        "{learned}"
    );

    // The big builder busy with the pinned host; then heavy, then light.
    let busy = fleet.submit("busy", &[]);
    let busy_started = fleet.wait_event(&busy, "started").await;
    assert_eq!(busy_started["builder"], Value::from(big.name.clone()));
    let heavy = fleet.submit("heavy", &[]);
    let light = fleet.submit("light", &[]);
    let light_events = finished_in_order(&fleet, &light).await;
    assert_eq!(started_by(&light_events), small.name);
    let heavy_events = finished_in_order(&fleet, &heavy).await;
    assert_eq!(started_by(&heavy_events), big.name, "{heavy_events:#?}");
    assert_eq!(
        heavy_events.last().expect("finished")["status"],
        "succeeded"
    );
    let heavy_started = heavy_events
        .iter()
        .find(|e| e["type"] == "started")
        .expect("started");
    let light_finished = light_events.last().expect("finished");
    assert!(
        time_of(light_finished) < time_of(heavy_started),
        "light work waited behind the heavy request: {light_finished} vs {heavy_started}"
    );
    finished_in_order(&fleet, &busy).await;

    // `all` holds `heavy`: the whole request goes to the big builder, one commit for all hosts.
    let all = fleet.submit("all", &[]);
    let all_events = finished_in_order(&fleet, &all).await;
    assert_eq!(started_by(&all_events), big.name);
    assert_eq!(all_events.last().expect("finished")["status"], "succeeded");

    // The big builder leaves: nothing left fits `heavy`, `busy` or `all`.
    let output = fleet.cli(&["builder", "drain", &big.name]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
    for _ in 0..300 {
        if builders(&fleet)
            .iter()
            .all(|b| b["name"] != big.name.as_str())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Each evaluation of `heavy` measured it again: the error names the latest figure.
    let peak = placement_of(&fleet, "heavy").await["eval_peak_mb"].clone();
    for (target, host, mb) in [
        ("heavy", "heavy", peak.to_string()),
        // The heaviest host of `all` is named.
        ("all", "busy", "1024".to_owned()),
        ("busy", "busy", "1024".to_owned()),
    ] {
        let id = fleet.submit(target, &[]);
        let events = finished_in_order(&fleet, &id).await;
        assert!(events.iter().all(|e| e["type"] != "started"), "{events:#?}");
        let finished = events.last().expect("finished");
        assert_eq!(finished["status"], "failed");
        let error = finished["error"].as_str().unwrap_or_default();
        let largest = format!(
            "largest envelope in the fleet is 200 MiB (builder {})",
            small.name
        );
        assert!(
            error.contains(&format!("host {host} needs {mb} MiB")) && error.contains(&largest),
            "{target}: {error}"
        );
    }
    let light = fleet.submit("light", &[]);
    let events = finished_in_order(&fleet, &light).await;
    assert_eq!(events.last().expect("finished")["status"], "succeeded");
    drop(big);
}

/// Two idle builders: every repeat build of a host, each at a new commit, lands on the
/// builder that built it first (it holds the closure); without the preference the pulls
/// would spread them.
#[tokio::test(flavor = "multi_thread")]
async fn repeat_builds_go_to_the_builder_that_holds_the_host() {
    let fleet = Fleet::new(bin(), "lanes");
    let one = sized_builder(&fleet, None, "");
    let two = sized_builder(&fleet, None, "");
    let first = fleet.submit("light", &[]);
    let warm = started_by(&finished_in_order(&fleet, &first).await);
    for round in 0..6 {
        // Both idle again (the registry shows it) before the next request.
        for _ in 0..100 {
            let idle = builders(&fleet).iter().all(|b| {
                b["states"]
                    .as_array()
                    .is_some_and(|s| s.iter().all(|s| s["state"] == "idle"))
            });
            if idle {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let rev = fleet.repo.new_salt();
        let id = fleet.submit("light", &["--rev", &rev]);
        let events = finished_in_order(&fleet, &id).await;
        assert_eq!(
            started_by(&events),
            warm,
            "round {round}: builders {} and {}",
            one.name,
            two.name
        );
    }
}

/// The value of the metric sample line that starts with `prefix` (name and labels), scraped
/// from the builder's `/metrics` on `port`.
fn sample(port: u16, prefix: &str) -> Option<f64> {
    crate::metrics::scrape(port)
        .lines()
        .find_map(|line| line.strip_prefix(prefix))
        .and_then(|value| value.trim().parse().ok())
}

/// Scale-from-zero of a heavy lane: only a small builder runs, and `builder.lanes` says a
/// `heavy` lane (4096 MiB) can appear. A request for `busy` (pinned at 1024 MiB) fits no live
/// builder but fits that lane: it waits in the queue instead of failing, the small builder's
/// `homelab_deploy_lane_requests{lane="heavy"}` counts it (what an autoscaler of the lane scales
/// on) and its hand-backs are counted; light work flows meanwhile. Once a big builder starts,
/// the request is built there. A request that waits past its own timeout fails, naming the lane
/// it waited for.
#[tokio::test(flavor = "multi_thread")]
async fn a_heavy_request_waits_for_an_autoscaled_lane_that_its_gauge_shows() {
    let fleet = Fleet::new(bin(), "lanes");
    let pinned = "expected_peak_mb = { busy = 1024 }\n";
    let lanes = "lanes = { standard = 200, heavy = 4096 }\n";
    let port = test_support::free_port();
    let metrics = format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let _small = builder_with(
        &fleet,
        &format!("memory_mb = 200\n{lanes}"),
        pinned,
        &metrics,
    );

    // Its own timeout is 3 s: it waits that long for the lane, then fails.
    let short = fleet.submit("busy", &["--build-timeout", "3s"]);
    let events = finished_in_order(&fleet, &short).await;
    assert!(events.iter().all(|e| e["type"] != "started"), "{events:#?}");
    let finished = events.last().expect("finished");
    assert_eq!(finished["status"], "failed");
    let error = finished["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("host busy needs 1024 MiB")
            && error.contains("for a builder of lane heavy (4096 MiB) and none started"),
        "{error}"
    );
    let queued_at = serde_json::json!({ "time": finished["queued_at"] });
    let waited = time_of(finished) - time_of(&queued_at);
    assert!(waited >= time::Duration::seconds(3), "{waited} {events:#?}");

    let heavy = fleet.submit("busy", &[]);
    let light = fleet.submit("light", &[]);
    let light_events = finished_in_order(&fleet, &light).await;
    assert_eq!(
        light_events.last().expect("finished")["status"],
        "succeeded"
    );
    let gauge = |lane: &str| {
        sample(
            port,
            &format!("homelab_deploy_lane_requests{{repo=\"demo\",lane=\"{lane}\"}} "),
        )
    };
    let mut figures = (None, None);
    let counted = test_support::wait_until(Duration::from_secs(30), || {
        figures = (gauge("heavy"), gauge("standard"));
        figures == (Some(1.0), Some(0.0))
    });
    assert!(counted, "heavy and standard lane figures: {figures:?}");
    let handed_back = sample(
        port,
        "homelab_deploy_requests_handed_back_total{repo=\"demo\",reason=\"does_not_fit\"} ",
    );
    assert!(handed_back.is_some_and(|n| n >= 1.0), "{handed_back:?}");
    let (ok, report) =
        crate::metrics::promtool(&["check", "metrics"], Some(&crate::metrics::scrape(port)));
    assert!(ok, "promtool check metrics:\n{report}");
    let waiting = fleet.events(&heavy).await;
    assert!(
        waiting
            .iter()
            .all(|e| e["type"] != "finished" && e["type"] != "started"),
        "{waiting:#?}"
    );

    // The autoscaler starts a builder of the lane: the request is built there.
    let big = builder_with(&fleet, &format!("memory_mb = 4096\n{lanes}"), pinned, "");
    let events = finished_in_order(&fleet, &heavy).await;
    assert_eq!(events.last().expect("finished")["status"], "succeeded");
    assert_eq!(started_by(&events), big.name);
    let drained = test_support::wait_until(Duration::from_secs(30), || gauge("heavy") == Some(0.0));
    assert!(
        drained,
        "heavy lane figure after the build: {:?}",
        gauge("heavy")
    );
}

/// On a three-node JetStream cluster (replicated streams and buckets), a small builder on one
/// node and a big one on another: what one builder learned about `heavy` is read by the other
/// through the replicated `BUILD_PLACEMENT`, so after the first build every `heavy` request,
/// sent through the third node, starts on the big builder.
#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_places_heavy_hosts_by_what_any_builder_learned() {
    let cluster = test_support::NatsCluster::start(3);
    cluster.wait_ready().await;
    let repo = FixtureRepo::new("lanes");
    let repos = [("demo", repo.url())];
    let extra =
        |mb: u64| format!("\nmemory_mb = {mb}\nwarm_affinity = false\n\n[streams]\nreplicas = 3");
    let small = Builder::start_with(bin(), &cluster.nodes[0].url, &repos, &extra(200));
    let big = Builder::start_with(bin(), &cluster.nodes[1].url, &repos, &extra(4096));
    let client = cluster.nodes[2].client().await;
    let submit = |target: &str| {
        let output = run_cli(
            bin(),
            &cluster.nodes[2].url,
            &["build", "demo", target, "--no-wait"],
            Duration::from_secs(60),
        );
        assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
        text(&output).0.trim().to_owned()
    };
    let finished = |id: String| {
        let client = client.clone();
        async move {
            // A replicated stream answers 503 while it elects a leader: read again.
            let subject = format!("build.responses.demo.*.{id}.events");
            let mut events = Vec::new();
            for _ in 0..1200 {
                events = test_support::try_stored_messages(&client, &subject)
                    .await
                    .unwrap_or_default();
                if events.iter().any(|e| e["type"] == "finished") {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_eq!(
                events.last().expect("finished")["status"],
                "succeeded",
                "{events:#?}"
            );
            started_by(&events)
        }
    };
    // Whichever builder takes the first one measures it.
    finished(submit("heavy")).await;
    for round in 0..4 {
        let builder = finished(submit("heavy")).await;
        assert_eq!(builder, big.name, "round {round}; small is {}", small.name);
    }
}
