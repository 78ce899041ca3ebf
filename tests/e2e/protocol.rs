//! The protocol is complete for a client that has only an id (issue 15 §2): machine-readable
//! error codes, an answer for every API verb, the real queue time, queue positions in start
//! order, `status` with no builder running, and a fleet list that shows new hosts and lost
//! builders. Everything is read the way any NATS client reads it.

use std::time::Duration;

use serde_json::{json, Value};
use test_support::{run_cli, stored_messages, wait_until, Builder, FixtureRepo, NatsServer};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::{bin, commit_hanging_branch, text, Setup};

/// Runs `homelab-deploy ARGS` and parses its stdout as one JSON object.
fn cli_json(nats_url: &str, args: &[&str]) -> (i32, Value) {
    let output = run_cli(bin(), nats_url, args, Duration::from_secs(120));
    let (stdout, stderr) = text(&output);
    let value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|err| panic!("{args:?}: stdout is not JSON ({err}): {stdout}\n{stderr}"));
    (output.status.code().unwrap_or(-1), value)
}

fn at(value: &Value) -> OffsetDateTime {
    OffsetDateTime::parse(value.as_str().unwrap_or_default(), &Rfc3339)
        .unwrap_or_else(|err| panic!("{value} is not an RFC 3339 time: {err}"))
}

async fn ask(client: &async_nats::Client, subject: &str, body: &[u8]) -> Value {
    let reply = tokio::time::timeout(
        Duration::from_secs(30),
        client.request(subject.to_owned(), body.to_vec().into()),
    )
    .await
    .unwrap_or_else(|_| panic!("no reply on {subject} within 30s"))
    .unwrap_or_else(|err| panic!("{subject}: {err}"));
    serde_json::from_slice(&reply.payload).expect("the reply is JSON")
}

/// Every API error carries a `code`: an unknown verb is answered (`unknown_verb`), on the
/// queue group's subjects and on a builder's own; an unknown id is `not_found`, a bad query
/// `invalid`, a cancel too late `already_finished`. A `finished` that did not succeed says
/// why in `code` too: `unknown_host`, `unknown_ref`, `hosts_failed`; a success has none.
#[tokio::test(flavor = "multi_thread")]
async fn errors_carry_codes_and_every_verb_is_answered() {
    let setup = Setup::new("fleet");
    let client = async_nats::connect(&setup.nats.url).await.expect("connect");

    let unknown = ask(&client, "build.api.v1.frobnicate", b"{}").await;
    assert_eq!(unknown["code"], "unknown_verb", "{unknown}");
    assert!(
        unknown["error"]
            .as_str()
            .is_some_and(|e| e.contains("build.api.v1.status")),
        "the error lists the verbs there are: {unknown}"
    );
    let own = format!("build.api.builder.{}.frobnicate", setup.builder.name);
    assert_eq!(ask(&client, &own, b"{}").await["code"], "unknown_verb");
    let deeper = ask(&client, "build.api.v1.status.extra", b"{}").await;
    assert_eq!(deeper["code"], "unknown_verb", "{deeper}");

    let missing = ask(
        &client,
        "build.api.v1.status",
        br#"{"id":"no-such-request-01"}"#,
    )
    .await;
    assert_eq!(missing["code"], "not_found", "{missing}");
    let bad = ask(&client, "build.api.v1.status", b"not json").await;
    assert_eq!(bad["code"], "invalid", "{bad}");

    let (code, finished) = setup.build_json("web", &[]);
    assert_eq!(code, 0, "{finished}");
    assert!(
        finished.get("code").is_none(),
        "a success has no code: {finished}"
    );
    let id = finished["id"].as_str().expect("id").to_owned();
    let late = ask(
        &client,
        "build.api.v1.cancel",
        json!({"id": id, "reason": "too late"})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(late["code"], "already_finished", "{late}");
    let cancel = run_cli(
        bin(),
        &setup.nats.url,
        &["cancel", &id],
        Duration::from_secs(60),
    );
    let (_, stderr) = text(&cancel);
    assert_eq!(cancel.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("already_finished:"), "{stderr}");

    let (code, finished) = setup.build_json("no-such-host", &[]);
    assert_eq!(code, 1);
    assert_eq!(finished["code"], "unknown_host", "{finished}");
    let (_, finished) = setup.build_json("web", &["--ref", "no-such-branch"]);
    assert_eq!(finished["code"], "unknown_ref", "{finished}");
    let (_, finished) = setup.build_json("broken-build", &[]);
    assert_eq!(finished["status"], "failed");
    assert_eq!(finished["code"], "hosts_failed", "{finished}");
    // The read model keeps the code.
    let failed = finished["id"].as_str().expect("id");
    let (_, state) = cli_json(&setup.nats.url, &["status", failed, "--json"]);
    assert_eq!(state["code"], "hosts_failed", "{state}");
}

/// With no builder running, `status ID` answers from JetStream alone: three requests queued as
/// scheduled, ci and interactive are at positions 3, 2 and 1 (the order builders start them),
/// each names its events and logs subjects. Once a builder builds them, the real queue time
/// stays: the same in `status` before and after, in `started` and in `finished`, and before
/// the start.
#[tokio::test(flavor = "multi_thread")]
async fn an_id_is_enough_and_the_queue_time_stays() {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("fleet");
    let repos = [("demo", repo.url())];
    // A builder creates the streams, then stops: the requests wait with no builder at all.
    let mut first = Builder::start(bin(), &nats.url, &repos);
    first.terminate(Duration::from_secs(30));
    let mut ids = Vec::new();
    for (host, priority) in [("web", "scheduled"), ("db", "ci"), ("web", "interactive")] {
        let output = run_cli(
            bin(),
            &nats.url,
            &["build", "demo", host, "--no-wait", "--priority", priority],
            Duration::from_secs(60),
        );
        let (stdout, stderr) = text(&output);
        assert_eq!(output.status.code(), Some(0), "{stderr}");
        ids.push((stdout.trim().to_owned(), host));
    }
    let mut queued_at = Vec::new();
    for ((id, host), position) in ids.iter().zip([3, 2, 1]) {
        let (code, state) = cli_json(&nats.url, &["status", id, "--json"]);
        assert_eq!(code, 0, "{state}");
        assert_eq!(state["phase"], "queued", "{state}");
        assert_eq!(state["queue_position"], position, "{id}: {state}");
        assert_eq!(
            state["events_subject"],
            format!("build.responses.demo.{host}.{id}.events")
        );
        assert_eq!(
            state["logs_subject"],
            format!("build.responses.demo.{host}.{id}.logs")
        );
        queued_at.push(at(&state["queued_at"]));
    }
    let human = run_cli(
        bin(),
        &nats.url,
        &["status", &ids[0].0],
        Duration::from_secs(60),
    );
    let (stdout, _) = text(&human);
    assert!(stdout.contains("position 3"), "{stdout}");
    assert!(
        stdout.contains(&format!("build.responses.demo.web.{}.events", ids[0].0)),
        "{stdout}"
    );

    let _builder = Builder::start(bin(), &nats.url, &repos);
    let client = nats.client().await;
    for ((id, host), queued) in ids.iter().zip(&queued_at) {
        let mut state = Value::Null;
        let done = wait_until(Duration::from_secs(120), || {
            state = cli_json(&nats.url, &["status", id, "--json"]).1;
            state["phase"] == "succeeded"
        });
        assert!(done, "{id} did not succeed: {state}");
        let close = |seen: OffsetDateTime, what: &str| {
            assert!(
                (seen - *queued).abs() < time::Duration::milliseconds(1),
                "{id}: {what} {seen} is not the queue time {queued}"
            );
        };
        close(at(&state["queued_at"]), "status queued_at");
        assert!(at(&state["started_at"]) > *queued, "{state}");
        let events =
            stored_messages(&client, &format!("build.responses.demo.{host}.{id}.events")).await;
        let started = events
            .iter()
            .find(|e| e["type"] == "started")
            .expect("started");
        let finished = events.last().expect("finished");
        close(at(&started["queued_at"]), "started queued_at");
        close(at(&finished["queued_at"]), "finished queued_at");
        assert!(at(&started["time"]) > *queued, "{started}");
    }
}

/// `builders` shows the hosts a new commit adds without a build (`hosts_refresh_secs`), and a
/// builder whose heartbeat stopped as `lost`, with the age of its heartbeat.
#[tokio::test(flavor = "multi_thread")]
async fn the_fleet_list_follows_new_hosts_and_shows_lost_builders() {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("fleet");
    let builder = Builder::start_with(
        bin(),
        &nats.url,
        &[("demo", repo.url())],
        "\nhosts_refresh_secs = 1\n",
    );
    let hosts = |list: &Value| -> Vec<String> {
        list["builders"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|b| b["name"] == builder.name.as_str())
            .flat_map(|b| b["hosts"]["demo"].as_array().cloned().unwrap_or_default())
            .filter_map(|h| h.as_str().map(str::to_owned))
            .collect()
    };
    let mut list = Value::Null;
    assert!(
        wait_until(Duration::from_secs(60), || {
            list = cli_json(&nats.url, &["builders", "--json"]).1;
            hosts(&list).contains(&"web".to_owned())
        }),
        "{list}"
    );
    assert!(!hosts(&list).contains(&"added".to_owned()));
    let flake = std::fs::read_to_string(repo.path().join("flake.nix")).expect("read flake");
    let grown = flake.replacen(
        "db = ok \"db\";",
        "db = ok \"db\";\n        added = ok \"added\";",
        1,
    );
    assert_ne!(grown, flake, "the fixture flake defines db");
    repo.commit_file("flake.nix", &grown);
    assert!(
        wait_until(Duration::from_secs(60), || {
            list = cli_json(&nats.url, &["builders", "--json"]).1;
            hosts(&list).contains(&"added".to_owned())
        }),
        "the new commit's host is never announced: {list}\n{}",
        builder.log()
    );
    let me = list["builders"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["name"] == builder.name.as_str()))
        .expect("the builder is listed");
    assert_eq!(me["lost"], false, "{me}");
    assert_eq!(
        me["protocol_version"],
        homelab_deploy_protocol::PROTOCOL_VERSION,
        "{me}"
    );

    // A builder that died two minutes ago, as its last announcement left it.
    let js = async_nats::jetstream::new(nats.client().await);
    let store = js
        .get_key_value("BUILD_BUILDERS")
        .await
        .expect("registry bucket");
    let two_minutes_ago = (OffsetDateTime::now_utc() - time::Duration::minutes(2))
        .format(&Rfc3339)
        .expect("format");
    let entry = json!({"name": "gone01", "version": "0.1.0", "repos": ["demo"],
        "states": [{"state": "idle"}], "started_at": two_minutes_ago, "heartbeat": two_minutes_ago});
    store
        .put("gone01", entry.to_string().into())
        .await
        .expect("put the entry");
    let list = cli_json(&nats.url, &["builders", "--json"]).1;
    let gone = list["builders"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["name"] == "gone01"))
        .expect("the dead builder is listed");
    assert_eq!(gone["lost"], true, "{gone}");
    assert!(gone["heartbeat_age_secs"].as_u64() >= Some(120), "{gone}");
    let table = run_cli(bin(), &nats.url, &["builders"], Duration::from_secs(60));
    let (stdout, _) = text(&table);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("gone01"))
        .unwrap_or_default();
    assert!(line.contains("lost"), "{stdout}");
    // An entry of a builder older than `protocol_version` spoke version 1: nothing to flag.
    assert_eq!(gone["protocol_version"], 1, "{gone}");
    assert!(!stdout.contains("protocol: version"), "{stdout}");

    // A live builder of a later protocol is flagged under its row.
    let now = OffsetDateTime::now_utc().format(&Rfc3339).expect("format");
    let later = homelab_deploy_protocol::PROTOCOL_VERSION + 1;
    let entry = json!({"name": "later01", "version": "9.0.0", "protocol_version": later,
        "repos": ["demo"], "states": [{"state": "idle"}], "started_at": now, "heartbeat": now});
    store
        .put("later01", entry.to_string().into())
        .await
        .expect("put the entry");
    let table = run_cli(bin(), &nats.url, &["builders"], Duration::from_secs(60));
    let (stdout, _) = text(&table);
    let mut rows = stdout.lines().skip_while(|l| !l.starts_with("later01"));
    assert!(rows.next().is_some(), "{stdout}");
    let flagged = rows.next().unwrap_or_default();
    assert!(
        flagged.contains(&format!("protocol: version {later}"))
            && flagged.contains("upgrade the older side"),
        "{stdout}"
    );
}

/// The Python of docs/protocol.md ("Resuming"), between its snippet markers.
fn resume_snippet() -> String {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/protocol.md"
    ))
    .expect("read docs/protocol.md");
    let start = doc
        .find("# resume-snippet-start")
        .expect("the resume snippet starts");
    let end = doc
        .find("# resume-snippet-end")
        .expect("the resume snippet ends");
    doc[start..end].to_owned()
}

/// Runs the documented recipe: events of request ID from seq SEQ, and HOST's log from LINE.
const RESUME_HARNESS: &str = r#"
import asyncio, sys
import nats

async def main():
    url, request_id, seq, host, line = sys.argv[1:6]
    nc = await nats.connect(url)
    js = nc.jetstream()
    events = [event async for event in events_from(js, request_id, int(seq))]
    log_lines = next(e["log_lines"] for e in events
                     if e["type"] == "host_finished" and e["host"] == host)
    lines = await host_log_from(js, request_id, host, int(line), log_lines)
    print(json.dumps({"events": events, "log_lines": log_lines, "lines": lines}))
    await nc.close()

asyncio.run(main())
"#;

/// The Python interpreter with nats-py: `NATS_PY_PYTHON` (set by scripts/lib.sh), else the
/// venv `ensure_nats_py` makes under `.tools`.
fn nats_py_python() -> String {
    if let Ok(python) = std::env::var("NATS_PY_PYTHON") {
        return python;
    }
    let venv = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../.tools/nats-py-venv/bin/python"
    );
    assert!(
        std::path::Path::new(venv).exists(),
        "NATS_PY_PYTHON is not set and {venv} is missing: run ./scripts/test, which installs nats-py under .tools"
    );
    venv.to_owned()
}

/// A Python client with only an id follows the documented recipe: the events from `seq` 2 on
/// (contiguous, ending with `finished`) and one host's log from line 2, which it knows is
/// complete because `host_finished` says how many lines the host produced, the number the
/// logs subject holds.
#[tokio::test(flavor = "multi_thread")]
async fn the_documented_resume_recipe_works_from_python() {
    let python = nats_py_python();
    let setup = Setup::new("fleet");
    let (_, finished) = setup.build_json("all", &[]);
    let id = finished["id"].as_str().expect("id").to_owned();
    let client = setup.nats.client().await;
    let events = stored_messages(&client, &format!("build.responses.demo.all.{id}.events")).await;
    let batches = stored_messages(&client, &format!("build.responses.demo.all.{id}.logs")).await;
    let mut web_log: Vec<String> = Vec::new();
    for batch in batches.iter().filter(|b| b["host"] == "web") {
        assert_eq!(batch["first_line"], web_log.len() as u64 + 1, "{batch}");
        let lines = batch["lines"].as_array().expect("lines");
        web_log.extend(lines.iter().filter_map(|l| l.as_str().map(str::to_owned)));
    }
    assert!(web_log.len() >= 2, "web logged {web_log:?}");
    for event in events.iter().filter(|e| e["type"] == "host_finished") {
        let host = event["host"].as_str().expect("host");
        let stored = batches
            .iter()
            .filter(|b| b["host"] == host)
            .map(|b| b["lines"].as_array().map_or(0, Vec::len) as u64)
            .sum::<u64>();
        assert_eq!(event["log_lines"], stored, "{host}: {event}");
    }

    let script = format!("{}\n{RESUME_HARNESS}", resume_snippet());
    let run = tokio::process::Command::new(&python)
        .args(["-c", &script, &setup.nats.url, &id, "2", "web", "2"])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the Python client finished in time")
        .expect("python runs");
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    let resumed: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    let seqs: Vec<u64> = resumed["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .collect();
    assert_eq!(seqs, (2..=events.len() as u64).collect::<Vec<_>>());
    assert_eq!(
        resumed["events"]
            .as_array()
            .and_then(|e| e.last())
            .map(|e| &e["type"]),
        Some(&Value::from("finished"))
    );
    assert_eq!(resumed["log_lines"], web_log.len() as u64);
    assert_eq!(resumed["lines"], json!(web_log[1..]));
}

/// A scheduled request that a builder took and handed back because an interactive one waited
/// behind it (NAK, to be handed out again later) is still queued, first in line, while the
/// person's build runs: not "running" on no builder, and listed among the queued builds.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_handed_back_for_priority_stays_queued() {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("queue");
    let _builder = Builder::start(bin(), &nats.url, &[("demo", repo.url())]);
    let submit = |args: &[&str]| {
        let mut all = vec!["build", "demo"];
        all.extend_from_slice(args);
        all.push("--no-wait");
        let output = run_cli(bin(), &nats.url, &all, Duration::from_secs(60));
        let (stdout, stderr) = text(&output);
        assert_eq!(output.status.code(), Some(0), "{stderr}");
        stdout.trim().to_owned()
    };
    let phase_becomes = |id: &str, phase: &str| {
        let mut state = Value::Null;
        let reached = wait_until(Duration::from_secs(60), || {
            state = cli_json(&nats.url, &["status", id, "--json"]).1;
            state["phase"] == phase
        });
        assert!(reached, "{id} never {phase}: {state}");
    };
    let blocker = submit(&["long"]);
    phase_becomes(&blocker, "running");
    let scheduled = submit(&["short", "--priority", "scheduled"]);
    let person = submit(&["long"]);
    let cancel = run_cli(
        bin(),
        &nats.url,
        &["cancel", &blocker],
        Duration::from_secs(60),
    );
    assert_eq!(cancel.status.code(), Some(0), "{}", text(&cancel).1);
    phase_becomes(&person, "running");

    let (_, state) = cli_json(&nats.url, &["status", &scheduled, "--json"]);
    assert_eq!(state["phase"], "queued", "{state}");
    assert_eq!(state["queue_position"], 1, "{state}");
    let (_, queued) = cli_json(&nats.url, &["builds", "--state", "queued", "--json"]);
    let ids: Vec<&str> = queued["builds"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["id"].as_str())
        .collect();
    assert_eq!(ids, [scheduled.as_str()], "{queued}");
}

/// `retry` is the one cancel answer that asks the caller to try again, and only for a request
/// whose builder vanished while holding it (killed while listing the flake's hosts, before
/// `started`): the builder that gets the cancel looks for 5 s, then says so, and the request is
/// still there to cancel once the queue hands it out again.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_says_retry_only_when_the_holder_vanished() {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("fleet");
    // On a branch of its own: listing its hosts imports a derivation that never finishes.
    commit_hanging_branch(&repo);
    let repos = [("demo", repo.url())];
    let mut holder = Builder::start(bin(), &nats.url, &repos);
    let output = run_cli(
        bin(),
        &nats.url,
        &["build", "demo", "all", "--ref", "hang", "--no-wait"],
        Duration::from_secs(60),
    );
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let id = stdout.trim().to_owned();
    assert!(
        wait_until(Duration::from_secs(60), || !repo
            .build_processes()
            .is_empty()),
        "the evaluation never started:\n{}",
        holder.log()
    );
    let _other = Builder::start(bin(), &nats.url, &repos);
    holder.signal("KILL", Duration::from_secs(10));

    let started = std::time::Instant::now();
    let cancel = run_cli(bin(), &nats.url, &["cancel", &id], Duration::from_secs(60));
    let (_, stderr) = text(&cancel);
    assert_eq!(cancel.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error: retry:"), "{stderr}");
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "answered before looking for 5 s: {stderr}"
    );
    let (_, state) = cli_json(&nats.url, &["status", &id, "--json"]);
    assert_eq!(state["phase"], "running", "{state}");
}
