//! The build path: hosts built, cached and failed, revisions, and the event stream.

use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use test_support::{stored_messages, wait_for_finished};

use crate::{host, text, Setup};

/// One host builds, the table shows it, and its toplevel is really in the store.
#[test]
fn one_host_builds_and_lands_in_the_store() {
    let setup = Setup::new("fleet");
    let output = setup.cli(&["build", "demo", "web"]);
    let (stdout, stderr) = text(&output);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or_else(|| panic!("no row for web:\n{stdout}"));
    assert!(row.contains("built"), "{row}");
    let out_path = row.split_whitespace().last().expect("out path column");
    let hostname =
        std::fs::read_to_string(format!("{out_path}/hostname")).expect("built toplevel in store");
    assert_eq!(hostname.trim(), "web");
    assert!(
        stderr.contains("[1/1] web"),
        "progress missing from stderr:\n{stderr}"
    );
    assert!(stdout.contains("demo web: succeeded"), "{stdout}");
}

/// `all` with one build failure and one eval failure: every host reported, overall failed, exit 1.
#[test]
fn all_reports_every_host_when_some_fail() {
    let setup = Setup::new("fleet");
    let (code, finished) = setup.build_json("all", &[]);
    assert_eq!(code, 1, "{finished:#}");
    assert_eq!(finished["type"], "finished");
    assert_eq!(finished["status"], "failed");
    assert_eq!(
        finished["hosts"].as_array().map(Vec::len),
        Some(4),
        "{finished:#}"
    );
    for good in ["web", "db"] {
        assert_eq!(host(&finished, good)["status"], "built", "{finished:#}");
        assert!(host(&finished, good)["out_path"]
            .as_str()
            .is_some_and(|p| p.starts_with("/nix/store/")));
    }
    let build_failed = host(&finished, "broken-build");
    assert_eq!(build_failed["status"], "build_failed");
    let error = build_failed["error"].as_str().expect("error excerpt");
    assert!(
        error.contains("the disk image does not fit"),
        "log tail missing from error: {error}"
    );
    let eval_failed = host(&finished, "broken-eval");
    assert_eq!(eval_failed["status"], "eval_failed");
    assert!(
        eval_failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("services.nginx.enable")),
        "{eval_failed}"
    );
    assert_eq!(finished["rev"], setup.repo.head());
}

/// The second build of the same rev finds the toplevel in the store: `cached`, same out path.
/// Once the builder's GC roots are gone and the output collected, it is built again, not
/// reported cached from memory.
#[test]
fn second_build_of_same_rev_is_cached() {
    let setup = Setup::new("fleet");
    let (code, first) = setup.build_json("db", &[]);
    assert_eq!(code, 0, "{first:#}");
    assert_eq!(host(&first, "db")["status"], "built");
    let (code, second) = setup.build_json("db", &[]);
    assert_eq!(code, 0, "{second:#}");
    assert_eq!(host(&second, "db")["status"], "cached");
    let out_path = host(&first, "db")["out_path"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(host(&second, "db")["out_path"], out_path.as_str());

    let root = setup.builder.state_dir().join("gcroots/demo/db");
    std::fs::remove_file(&root).expect("remove the builder's GC root");
    // The builds kept for closure diffs hold the output too.
    std::fs::remove_dir_all(setup.builder.state_dir().join("closures/demo/db"))
        .expect("remove the builder's kept builds");
    let deleted = std::process::Command::new("nix-store")
        .args(["--delete", &out_path])
        .output()
        .expect("nix-store --delete");
    assert!(
        deleted.status.success(),
        "{}",
        String::from_utf8_lossy(&deleted.stderr)
    );
    let (code, third) = setup.build_json("db", &[]);
    assert_eq!(code, 0, "{third:#}");
    assert_eq!(host(&third, "db")["status"], "built", "{third:#}");
    assert_eq!(host(&third, "db")["out_path"], out_path.as_str());
    assert!(std::path::Path::new(&out_path).exists());
}

/// A requested rev is built even when the branch has moved on; an unknown rev fails by name.
#[test]
fn requested_rev_is_built_and_unknown_rev_is_named() {
    let setup = Setup::new("fleet");
    let old = setup.repo.head();
    let new = setup.repo.commit_file("README", "moved on\n");
    let (code, finished) = setup.build_json("web", &["--rev", &old[..12]]);
    assert_eq!(code, 0, "{finished:#}");
    assert_eq!(finished["rev"], old.as_str());
    let (_, latest) = setup.build_json("web", &[]);
    assert_eq!(latest["rev"], new.as_str());

    let missing = "0123456789abcdef0123456789abcdef01234567";
    let (code, finished) = setup.build_json("web", &["--rev", missing]);
    assert_eq!(code, 1);
    assert_eq!(finished["status"], "failed");
    assert!(
        finished["error"]
            .as_str()
            .is_some_and(|e| e.contains(missing)),
        "{finished:#}"
    );

    let (code, finished) = setup.build_json("web", &["--ref", "no-such-branch"]);
    assert_eq!(code, 1);
    let error = finished["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("no-such-branch") && error.contains("main"),
        "{finished:#}"
    );
}

/// A host the flake does not list fails with an error that lists the hosts that exist.
#[test]
fn unknown_host_lists_the_real_hosts() {
    let setup = Setup::new("fleet");
    let (code, finished) = setup.build_json("mail", &[]);
    assert_eq!(code, 1);
    let error = finished["error"].as_str().unwrap_or_default();
    assert!(error.contains("mail"), "{error}");
    for name in ["broken-build", "broken-eval", "db", "web"] {
        assert!(error.contains(name), "{name} not listed in: {error}");
    }
}

/// A commit pushed while an `all` build runs does not change the rev of that build.
#[tokio::test(flavor = "multi_thread")]
async fn push_during_build_does_not_change_its_rev() {
    let setup = Setup::new("slow");
    let before = setup.repo.head();
    let output = setup.cli(&["build", "demo", "all", "--no-wait"]);
    assert_eq!(output.status.code(), Some(0));
    let id = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let client = setup.nats.client().await;
    let subject = format!("build.responses.demo.all.{id}.events");
    let mut started = false;
    for _ in 0..300 {
        let messages = stored_messages(&client, &subject).await;
        if messages.iter().any(|m| m["type"] == "host_started") {
            started = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        started,
        "build never started; builder log:\n{}",
        setup.builder.log()
    );
    // Change what `first` builds; a build that picked this up would get another out path.
    let content = std::fs::read_to_string(setup.repo.path().join("flake.nix")).expect("flake");
    let pushed = setup
        .repo
        .commit_file("flake.nix", &content.replace("starts;", "starts again;"));
    let events = wait_for_finished(&client, &subject).await;
    let finished = events.last().expect("events");
    assert_eq!(finished["status"], "succeeded", "{finished:#}");
    assert_eq!(finished["rev"], before.as_str());
    assert_ne!(finished["rev"], pushed.as_str());
    let started = events
        .iter()
        .find(|e| e["type"] == "started")
        .expect("started event");
    assert_eq!(started["rev"], before.as_str());
}

/// Events are numbered 1, 2, 3 … without gaps, carry RFC 3339 times, and `finished` is last;
/// `--json` prints exactly that `finished` event.
#[tokio::test(flavor = "multi_thread")]
async fn events_are_contiguous_and_json_output_matches_them() {
    let setup = Setup::new("fleet");
    let (_, printed) = setup.build_json("all", &[]);
    let id = printed["id"].as_str().expect("id").to_owned();
    let client = setup.nats.client().await;
    let events = stored_messages(&client, &format!("build.responses.demo.all.{id}.events")).await;
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["type"].as_str().expect("type"))
        .collect();
    assert_eq!(kinds.first(), Some(&"started"));
    assert_eq!(kinds.last(), Some(&"finished"));
    assert_eq!(kinds.iter().filter(|k| **k == "host_started").count(), 4);
    assert_eq!(kinds.iter().filter(|k| **k == "host_finished").count(), 4);
    for event in &events {
        let time = event["time"].as_str().expect("time");
        time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|err| panic!("time {time} is not RFC 3339: {err}"));
        assert_eq!(event["id"], id.as_str());
    }
    assert_eq!(events.last(), Some(&printed));
    let started = &events[0];
    assert_eq!(started["builder"], setup.builder.name.as_str());
    assert_eq!(
        started["hosts"],
        serde_json::json!(["broken-build", "broken-eval", "db", "web"])
    );
}

/// `--no-wait` returns the id once the request is queued; the build still happens.
#[tokio::test(flavor = "multi_thread")]
async fn no_wait_returns_an_id_and_the_build_still_runs() {
    let setup = Setup::new("fleet");
    let output = setup.cli(&["build", "demo", "web", "--no-wait"]);
    assert_eq!(output.status.code(), Some(0));
    let id = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    assert!(
        id.len() >= 8 && id.chars().all(|c| c.is_ascii_alphanumeric()),
        "{id:?}"
    );
    let client = setup.nats.client().await;
    let events = wait_for_finished(&client, &format!("build.responses.demo.web.{id}.events")).await;
    assert_eq!(
        events.last().map(|e| e["status"].clone()),
        Some(Value::from("succeeded"))
    );
}

/// A client that knows only docs/protocol.md: an empty body published with plain JetStream is a
/// build of the default branch; the builder picks the id and the client finds it by wildcard.
#[tokio::test(flavor = "multi_thread")]
async fn plain_nats_client_can_drive_a_build() {
    let setup = Setup::new("fleet");
    let client = setup.nats.client().await;
    let mut events = client
        .subscribe("build.responses.demo.db.*.events")
        .await
        .expect("subscribe");
    let js = async_nats::jetstream::new(client.clone());
    js.publish("build.demo.db", "".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let finished = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(message) = events.next().await {
            let event: Value = serde_json::from_slice(&message.payload).expect("json");
            if event["type"] == "finished" {
                return event;
            }
        }
        panic!("subscription ended");
    })
    .await
    .expect("finished within a minute");
    assert_eq!(finished["status"], "succeeded", "{finished:#}");
    assert_eq!(host(&finished, "db")["status"], "built");
}

/// What a timer and CI call: `--quiet` prints no progress, `--junit` writes one test case per
/// host (well-formed XML, failures with their error), and the exit code is the verdict.
#[test]
fn quiet_and_junit_for_timers_and_ci() {
    let setup = Setup::new("fleet");
    let report = std::env::temp_dir().join(format!("{}.xml", test_support::unique("junit")));
    let report_arg = report.display().to_string();
    let output = setup.cli(&["build", "demo", "all", "--quiet", "--junit", &report_arg]);
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr.trim().is_empty(), "--quiet printed: {stderr}");
    assert!(stdout.contains("demo all: failed"), "{stdout}");
    let xml = std::fs::read_to_string(&report).expect("junit report written");
    let check = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, xml.dom.minidom as m; d = m.parse(sys.argv[1]); \
             cases = d.getElementsByTagName('testcase'); \
             print(len(cases), len(d.getElementsByTagName('failure')))",
            &report_arg,
        ])
        .output()
        .expect("python3 parses the report");
    assert_eq!(
        String::from_utf8_lossy(&check.stdout).trim(),
        "4 2",
        "{xml}"
    );
    assert!(xml.contains("the disk image does not fit"), "{xml}");
}
