//! Exactly one answer per request, whatever stalls: a builder paused (SIGSTOP) for less and
//! more than the ack wait and the duplicate window (its events and its log batches), a request
//! whose builders keep dying (after `started`, and before it while git fetches), a `finished`
//! larger than the server's `max_payload`, an id that breaks the rules, and a flake whose
//! evaluation hangs.

use std::process::Command;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use serde_json::Value;
use test_support::{
    run_cli, stored_messages, unique, wait_for_finished, wait_until, Builder, FixtureRepo,
    NatsServer,
};

use crate::{bin, commit_hanging_branch, host, seqs_are_contiguous, text, Setup};

/// Ack wait 5 s (kept alive every second), duplicate window 2 s: pauses of 1 s (under both),
/// 3 s (over the duplicate window, under the ack wait) and 10 s (over both).
const SHORT_WINDOWS: &str =
    "\n[streams]\nrequest_ack_wait_secs = 5\nevents_duplicate_window_secs = 2";

fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {signal} {pid}");
}

/// `build demo TARGET --no-wait ARGS` against `nats`: the request id.
fn submit(nats: &NatsServer, target: &str, extra: &[&str]) -> String {
    let mut args = vec!["build", "demo", target, "--no-wait"];
    args.extend_from_slice(extra);
    let output = run_cli(bin(), &nats.url, &args, Duration::from_secs(60));
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    stdout.trim().to_owned()
}

async fn first_event(client: &async_nats::Client, id: &str, kind: &str) -> Value {
    let subject = format!("build.responses.demo.*.{id}.events");
    for _ in 0..1200 {
        if let Some(event) = stored_messages(client, &subject)
            .await
            .into_iter()
            .find(|e| e["type"] == kind)
        {
            return event;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("request {id} never had a {kind} event");
}

/// A builder stopped mid-build and resumed: under the ack wait it finishes the request itself;
/// over it the request is redelivered to the other builder, and the resumed one stands down
/// (its next publish is fenced). Each time exactly one `finished`, and `seq`s 1, 2, 3 … once each.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_builder_never_adds_to_a_request_it_lost() {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("queue");
    let builders = [
        Builder::start_with(bin(), &nats.url, &[("demo", repo.url())], SHORT_WINDOWS),
        Builder::start_with(bin(), &nats.url, &[("demo", repo.url())], SHORT_WINDOWS),
    ];
    let client = nats.client().await;
    for pause in [1u64, 3, 10] {
        let rev = repo.commit_file("salt", &unique("salt"));
        let id = submit(&nats, "medium", &["--rev", &rev]);
        let started = first_event(&client, &id, "started").await;
        first_event(&client, &id, "host_started").await;
        let stalled = builders
            .iter()
            .find(|b| started["builder"] == b.name.as_str())
            .expect("one of ours started it");
        signal(stalled.pid(), "-STOP");
        tokio::time::sleep(Duration::from_secs(pause)).await;
        signal(stalled.pid(), "-CONT");

        let events =
            wait_for_finished(&client, &format!("build.responses.demo.*.{id}.events")).await;
        // The resumed builder either finished the request or stood down; wait for it to say
        // which, so nothing it publishes afterwards can be missed.
        let settled = wait_until(Duration::from_secs(60), || {
            stalled.log().lines().any(|line| {
                line.contains(&id)
                    && (line.contains("standing down") || line.contains("request finished"))
            })
        });
        assert!(settled, "pause {pause}s:\n{}", stalled.log());
        let after = stored_messages(&client, &format!("build.responses.demo.*.{id}.events")).await;
        assert_eq!(
            events, after,
            "pause {pause}s: events after the finished one"
        );
        seqs_are_contiguous(&after);
        let finished = after.last().expect("finished");
        assert_eq!(
            finished["status"], "succeeded",
            "pause {pause}s: {finished:#}"
        );
        let starts = after.iter().filter(|e| e["type"] == "started").count();
        if pause < 5 {
            assert_eq!(
                starts, 1,
                "pause {pause}s is under the ack wait: {after:#?}"
            );
            assert_eq!(finished["builder"], stalled.name.as_str());
        } else {
            let stood_down = builders.iter().any(|b| b.logged(&id, "standing down"));
            assert!(
                stood_down,
                "pause {pause}s: nobody stood down\n{}\n{}",
                builders[0].log(),
                builders[1].log()
            );
        }
    }
}

/// A builder stopped (SIGSTOP) while its build prints, until another builder took the request
/// over and stored its `started`: resumed, it adds no log batch to the request (its first
/// publish is refused by the events' fence, and it stands down), and the new attempt's lines are
/// there, numbered 1, 2, 3 … (none taken for a copy of the stalled attempt's batches inside the
/// duplicate window).
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_builder_adds_no_logs_to_a_request_it_lost() {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("chatty");
    // Ack wait 5 s; the duplicate window stays at its default 2 minutes, longer than the pause.
    let config = "\n[streams]\nrequest_ack_wait_secs = 5";
    let builders = [
        Builder::start_with(bin(), &nats.url, &[("demo", repo.url())], config),
        Builder::start_with(bin(), &nats.url, &[("demo", repo.url())], config),
    ];
    let client = nats.client().await;
    let id = submit(&nats, "chatty", &[]);
    let started = first_event(&client, &id, "started").await;
    let stalled = builders
        .iter()
        .find(|b| started["builder"] == b.name.as_str())
        .expect("one of ours started it");
    let logs = format!("build.responses.demo.*.{id}.logs");
    let logged = |batches: &[Value]| {
        batches
            .iter()
            .map(|b| b["lines"].as_array().map_or(0, Vec::len))
            .sum::<usize>()
    };
    let mut flowing = false;
    for _ in 0..1200 {
        if logged(&stored_messages(&client, &logs).await) >= 20 {
            flowing = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(flowing, "the build's lines never came:\n{}", stalled.log());
    signal(stalled.pid(), "-STOP");
    // Resumed only once the other builder started the request: the stalled one holds lines nix
    // printed meanwhile, which it tries to publish first.
    let events = format!("build.responses.demo.*.{id}.events");
    let mut taken = false;
    for _ in 0..1200 {
        let stored = stored_messages(&client, &events).await;
        if stored.iter().filter(|e| e["type"] == "started").count() == 2 {
            taken = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal(stalled.pid(), "-CONT");
    assert!(taken, "nobody took the request over");

    let events = wait_for_finished(&client, &events).await;
    let finished = events.last().expect("finished");
    assert_eq!(finished["status"], "succeeded", "{finished:#}");
    assert_ne!(finished["builder"], stalled.name.as_str());
    let stood_down = wait_until(Duration::from_secs(60), || {
        stalled.logged(&id, "standing down")
    });
    assert!(stood_down, "{}", stalled.log());

    // Events and log batches in the order the stream stored them.
    let stored = stored_messages(&client, &format!("build.responses.demo.*.{id}.*")).await;
    let takeover = stored
        .iter()
        .enumerate()
        .filter(|(_, m)| m["type"] == "started")
        .nth(1)
        .map(|(at, _)| at)
        .expect("a second started");
    let mut next_line = 1;
    for batch in stored[takeover..]
        .iter()
        .filter(|m| m.get("first_line").is_some())
    {
        assert_eq!(
            batch["first_line"], next_line,
            "after the takeover the host's log goes on at line {next_line}: {batch:#}"
        );
        next_line += batch["lines"].as_array().map_or(0, Vec::len) as u64;
    }
    let host_finished = events
        .iter()
        .rfind(|e| e["type"] == "host_finished")
        .expect("host_finished");
    assert_eq!(
        host_finished["log_lines"],
        next_line - 1,
        "{host_finished:#}"
    );
}

/// A request whose builders keep dying is started at most `builder.max_attempts` times; the
/// next builder ends it `failed`, saying it gave up and how the last attempt ended.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_whose_builders_keep_dying_is_given_up() {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("queue");
    let config = "\nmax_attempts = 2\n[streams]\nrequest_ack_wait_secs = 2";
    let client = nats.client().await;
    let rev = repo.commit_file("salt", &unique("salt"));
    let id = {
        let first = Builder::start_with(bin(), &nats.url, &[("demo", repo.url())], config);
        let id = submit(&nats, "long", &["--rev", &rev]);
        first_event(&client, &id, "host_started").await;
        signal(first.pid(), "-KILL");
        id
    };
    let second = Builder::start_with(bin(), &nats.url, &[("demo", repo.url())], config);
    let subject = format!("build.responses.demo.*.{id}.events");
    // The second attempt must have reached the host (its `host_started`), not only `started`,
    // for the verdict to name the step it died in.
    for _ in 0..1200 {
        let events = stored_messages(&client, &subject).await;
        if events
            .iter()
            .filter(|e| e["type"] == "host_started")
            .count()
            == 2
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal(second.pid(), "-KILL");
    let third = Builder::start_with(bin(), &nats.url, &[("demo", repo.url())], config);

    let events = wait_for_finished(&client, &subject).await;
    seqs_are_contiguous(&events);
    assert_eq!(
        events.iter().filter(|e| e["type"] == "started").count(),
        2,
        "{events:#?}"
    );
    let finished = events.last().expect("finished");
    assert_eq!(finished["status"], "failed");
    assert_eq!(finished["builder"], third.name.as_str());
    let error = finished["error"].as_str().unwrap_or_default();
    assert!(error.contains("given up after 2 attempts"), "{error}");
    assert!(error.contains(&second.name), "{error}");
    assert!(error.contains("starting host long"), "{error}");
}

/// A request whose builder is killed (SIGKILL) every time while git fetches, before its
/// `started` event: each attempt counts all the same, and after `builder.max_attempts` the next
/// builder ends it `failed`, naming the builder of the last attempt and the step it died in.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_whose_fetch_kills_its_builders_is_given_up() {
    let nats = NatsServer::start();
    // Accepts the fetch and never answers: each attempt waits in git until its builder dies.
    let silent = test_support::HostileHttp::start(test_support::Hostility::Silent);
    let repos = [("demo", format!("git+{}", silent.url))];
    let config = "\nmax_attempts = 2\n[streams]\nrequest_ack_wait_secs = 2";
    let client = nats.client().await;
    let mut id = String::new();
    let mut killed = Vec::new();
    for attempt in 1..=2 {
        let builder = Builder::start_with(bin(), &nats.url, &repos, config);
        if attempt == 1 {
            id = submit(&nats, "all", &[]);
        }
        let began = wait_until(Duration::from_secs(120), || {
            builder.logged(&id, "request received")
        });
        assert!(began, "attempt {attempt} never began:\n{}", builder.log());
        signal(builder.pid(), "-KILL");
        killed.push(builder);
    }
    let last = Builder::start_with(bin(), &nats.url, &repos, config);

    let subject = format!("build.responses.demo.*.{id}.events");
    let events = wait_for_finished(&client, &subject).await;
    seqs_are_contiguous(&events);
    assert!(
        events.iter().all(|e| e["type"] != "started"),
        "no attempt got as far as started: {events:#?}"
    );
    let finished = events.last().expect("finished");
    assert_eq!(finished["status"], "failed", "{finished:#}");
    assert_eq!(finished["code"], "gave_up", "{finished:#}");
    assert_eq!(finished["builder"], last.name.as_str());
    let error = finished["error"].as_str().unwrap_or_default();
    assert!(error.contains("given up after 2 attempts"), "{error}");
    assert!(error.contains(&killed[1].name), "{error}");
    assert!(error.contains("before its started event"), "{error}");
}

/// A flake of 28 hosts that each fail with a long error, on a server whose `max_payload` is
/// 32 KiB: the `finished` event still fits (identical errors grouped, excerpts shortened), each
/// `host_finished` keeps its host's excerpt, and the logs subject the whole text.
#[test]
fn a_finished_event_fits_a_small_max_payload() {
    let dir = tempfile_dir();
    let server_config = dir.join("nats.conf");
    std::fs::write(&server_config, "max_payload: 32768\n").expect("server config");
    let nats = NatsServer::start_with(&["-c", &server_config.display().to_string()]);
    let repo = FixtureRepo::new("fleet");
    let lines = |name: &str| {
        (0..60)
            .map(|line| format!("{name} line {line:02}: {}", "x".repeat(56)))
            .collect::<Vec<_>>()
            .join("\\n")
    };
    let mut hosts = String::new();
    for index in 0..24 {
        let name = format!("distinct{index:02}");
        hosts.push_str(&format!(
            "        {name} = {{ config.system.build.toplevel = throw \"{}\"; }};\n",
            lines(&name)
        ));
    }
    for index in 0..4 {
        hosts.push_str(&format!(
            "        same{index} = {{ config.system.build.toplevel = throw \"{}\"; }};\n",
            lines("same")
        ));
    }
    repo.commit_file(
        "flake.nix",
        &format!(
            "# Hosts whose evaluation fails with a long message each.\n{{\n  outputs = {{ self }}: {{\n    nixosConfigurations = {{\n{hosts}    }};\n  }};\n}}\n"
        ),
    );
    let builder = Builder::start(bin(), &nats.url, &[("demo", repo.url())]);
    let output = run_cli(
        bin(),
        &nats.url,
        &["build", "demo", "all", "--json"],
        Duration::from_secs(180),
    );
    let (stdout, stderr) = text(&output);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{stderr}\nbuilder:\n{}",
        builder.log()
    );
    let finished: Value = serde_json::from_str(stdout.trim()).expect("finished json");
    assert_eq!(finished["hosts"].as_array().map(Vec::len), Some(28));
    let distinct = host(&finished, "distinct07")["error"]
        .as_str()
        .unwrap_or_default();
    assert!(distinct.contains("distinct07 line 59"), "{distinct}");
    assert!(
        !distinct.contains("distinct07 line 40"),
        "not shortened: {distinct}"
    );
    let grouped = (1..4)
        .filter(|index| {
            host(&finished, &format!("same{index}"))["error"]
                .as_str()
                .is_some_and(|e| e.contains("same error as host same0"))
        })
        .count();
    assert_eq!(grouped, 3, "{finished:#}");

    let id = finished["id"].as_str().expect("id");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let client = nats.client().await;
        let events =
            stored_messages(&client, &format!("build.responses.demo.all.{id}.events")).await;
        seqs_are_contiguous(&events);
        let host_finished = events
            .iter()
            .find(|e| e["type"] == "host_finished" && e["host"] == "distinct07")
            .expect("host_finished of distinct07");
        let full = host_finished["result"]["error"]
            .as_str()
            .unwrap_or_default();
        assert!(full.contains("distinct07 line 40"), "{full}");
        let logs = stored_messages(&client, &format!("build.responses.demo.all.{id}.logs")).await;
        let text: Vec<String> = logs
            .iter()
            .filter(|batch| batch["host"] == "distinct07")
            .flat_map(|batch| batch["lines"].as_array().cloned().unwrap_or_default())
            .filter_map(|line| line.as_str().map(str::to_owned))
            .collect();
        assert!(
            text.iter().any(|line| line.contains("distinct07 line 40")),
            "{text:#?}"
        );
    });
}

/// A request whose id breaks the rules (too short, a dot) is answered: on the events subject of
/// `stream-seq-<N>`, N being the stream sequence its publish ack named.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_with_a_bad_id_is_answered_under_its_stream_sequence() {
    let setup = Setup::new("fleet");
    let client = setup.nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let mut answered = Vec::new();
    for (header, body) in [
        (Some("short"), r#"{"id":"short"}"#),
        (None, r#"{"id":"has.a.dot.in.it"}"#),
    ] {
        let mut headers = HeaderMap::new();
        if let Some(header) = header {
            headers.insert("Nats-Msg-Id", header);
        }
        let ack = js
            .publish_with_headers("build.demo.web", headers, body.into())
            .await
            .expect("publish")
            .await
            .expect("stored");
        let subject = format!(
            "build.responses.demo.web.stream-seq-{}.events",
            ack.sequence
        );
        let events = wait_for_finished(&client, &subject).await;
        seqs_are_contiguous(&events);
        let finished = events.last().expect("finished");
        assert_eq!(finished["status"], "failed");
        let error = finished["error"].as_str().unwrap_or_default();
        assert!(error.contains("invalid request id"), "{error}");
        answered.push(error.to_owned());
    }
    assert_eq!(answered.len(), 2);
}

/// A flake whose host listing hangs (an import from a derivation that sleeps): `cancel` ends
/// the request at once and kills the evaluation, and a request timeout ends it too.
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_evaluation_is_cancelled_and_timed_out() {
    let setup = Setup::new("fleet");
    // On a branch of its own: the builder lists the hosts of `main` at start.
    commit_hanging_branch(&setup.repo);
    let client = setup.nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let publish = |id: String, body: String| {
        let js = js.clone();
        async move {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            js.publish_with_headers("build.demo.all", headers, body.into())
                .await
                .expect("publish")
                .await
                .expect("stored");
        }
    };

    let id = unique("hungcancel");
    publish(id.clone(), format!(r#"{{"id":"{id}","ref":"hang"}}"#)).await;
    let listing = wait_until(Duration::from_secs(30), || {
        !setup.repo.build_processes().is_empty()
    });
    assert!(
        listing,
        "the evaluation never started:\n{}",
        setup.builder.log()
    );
    let cancelled_at = Instant::now();
    let output = setup.cli(&["cancel", &id, "--reason", "hung evaluation"]);
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    let events = wait_for_finished(&client, &format!("build.responses.demo.all.{id}.events")).await;
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(15),
        "{:?}",
        cancelled_at.elapsed()
    );
    let finished = events.last().expect("finished");
    assert_eq!(finished["status"], "cancelled", "{finished:#}");
    assert!(
        finished["error"]
            .as_str()
            .is_some_and(|e| e.contains("hung evaluation")),
        "{finished:#}"
    );
    setup
        .repo
        .assert_builds_gone(Duration::from_secs(15), "left running");

    let id = unique("hungtimeout");
    publish(
        id.clone(),
        format!(r#"{{"id":"{id}","ref":"hang","timeout_secs":3}}"#),
    )
    .await;
    let events = wait_for_finished(&client, &format!("build.responses.demo.all.{id}.events")).await;
    let finished = events.last().expect("finished");
    assert_eq!(finished["status"], "failed", "{finished:#}");
    let error = finished["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("timed out after 3s while listing the flake's hosts"),
        "{error}"
    );
    setup
        .repo
        .assert_builds_gone(Duration::from_secs(15), "left running");
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(unique("stalls"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
