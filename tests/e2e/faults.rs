//! Faults: NATS restarting mid-build, duplicate request ids, a git remote gone, nix gone, a
//! state dir that cannot be written. Each ends in a clear error or a recovery, and the builder
//! stays up.

use std::time::Duration;

use async_nats::HeaderMap;
use serde_json::Value;
use test_support::{run_cli, stored_messages, wait_for_finished, Builder, FixtureRepo, NatsServer};

use crate::{bin, host, text, Setup};

/// nats-server stopped for 10 s during a running build and started again on the same store: the
/// build completes, the events published meanwhile arrive in order, and the waiting client gets
/// the result.
#[tokio::test(flavor = "multi_thread")]
async fn nats_restart_during_a_build() {
    let mut setup = Setup::new("queue");
    let rev = setup
        .repo
        .commit_file("salt", &test_support::unique("salt"));
    let url = setup.nats.url.clone();
    let waiting = std::thread::spawn(move || {
        run_cli(
            bin(),
            &url,
            &["build", "demo", "medium", "--rev", &rev, "--json"],
            Duration::from_secs(180),
        )
    });
    let client = setup.nats.client().await;
    let mut started = false;
    for _ in 0..600 {
        let events = stored_messages(&client, "build.responses.demo.medium.*.events").await;
        if events.iter().any(|e| e["type"] == "host_started") {
            started = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(started, "{}", setup.builder.log());
    drop(client);
    setup.nats.stop();
    tokio::time::sleep(Duration::from_secs(10)).await;
    setup.nats.restart();

    let output = waiting.join().expect("client thread");
    let (stdout, stderr) = text(&output);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}\nbuilder:\n{}",
        setup.builder.log()
    );
    let finished: Value = serde_json::from_str(stdout.trim()).expect("finished json");
    assert_eq!(host(&finished, "medium")["status"], "built");
    let client = setup.nats.client().await;
    let id = finished["id"].as_str().expect("id");
    let events =
        stored_messages(&client, &format!("build.responses.demo.medium.{id}.events")).await;
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
}

/// The same request id published twice within the dedupe window is built once.
#[tokio::test(flavor = "multi_thread")]
async fn duplicate_request_id_builds_once() {
    let setup = Setup::new("fleet");
    let client = setup.nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    for _ in 0..2 {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", "DUPLICATE1");
        js.publish_with_headers("build.demo.web", headers, r#"{"id":"DUPLICATE1"}"#.into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    let events = wait_for_finished(&client, "build.responses.demo.web.DUPLICATE1.events").await;
    // Give a second build (if any) time to show up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events_after = stored_messages(&client, "build.responses.demo.web.DUPLICATE1.events").await;
    assert_eq!(events, events_after);
    assert_eq!(
        events.iter().filter(|e| e["type"] == "started").count(),
        1,
        "{events:#?}"
    );
}

/// A git remote that is gone: the request fails with an error naming the fetch; the builder
/// keeps serving other repos.
#[test]
fn unreachable_git_remote_fails_the_request_clearly() {
    let nats = NatsServer::start();
    let good = FixtureRepo::new("fleet");
    let gone = "git+file:///nonexistent/homelab-deploy/gone.git".to_owned();
    let _builder = Builder::start(bin(), &nats.url, &[("demo", good.url()), ("gone", gone)]);
    let output = run_cli(
        bin(),
        &nats.url,
        &["build", "gone", "all", "--json"],
        Duration::from_secs(60),
    );
    assert_eq!(output.status.code(), Some(1));
    let finished: Value = serde_json::from_slice(&output.stdout).expect("json");
    let error = finished["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("fetching file:///nonexistent/homelab-deploy/gone.git failed"),
        "{error}"
    );
    let output = run_cli(
        bin(),
        &nats.url,
        &["build", "demo", "web"],
        Duration::from_secs(60),
    );
    assert_eq!(output.status.code(), Some(0));
}

/// nix gone after the builder started: each request fails with an error that says so, and the
/// builder stays up; a GC root directory that cannot be made fails that host only.
#[test]
fn nix_gone_and_unwritable_state_are_request_errors() {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("fleet");
    let dir = tempfile_dir();
    let wrapper = dir.join("nix");
    let real_nix = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "command -v nix"])
            .output()
            .expect("sh")
            .stdout,
    )
    .expect("utf8");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec {} \"$@\"\n", real_nix.trim()),
    )
    .expect("wrapper");
    std::process::Command::new("chmod")
        .args(["+x"])
        .arg(&wrapper)
        .status()
        .expect("chmod");
    let mut builder = Builder::start_with(
        bin(),
        &nats.url,
        &[("demo", repo.url())],
        &format!("\nnix = \"{}\"", wrapper.display()),
    );

    // A file where the GC roots directory should go.
    std::fs::create_dir_all(builder.state_dir()).expect("state dir");
    std::fs::write(builder.state_dir().join("gcroots"), "not a directory").expect("block gcroots");
    let output = run_cli(
        bin(),
        &nats.url,
        &["build", "demo", "web", "--json"],
        Duration::from_secs(60),
    );
    let finished: Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(host(&finished, "web")["status"], "build_failed");
    assert!(
        host(&finished, "web")["error"]
            .as_str()
            .is_some_and(|e| e.contains("GC root directory")),
        "{finished:#}"
    );

    std::fs::remove_file(&wrapper).expect("remove nix wrapper");
    // A new commit, so nothing evaluated before can stand in for nix.
    repo.commit_file("README", "new commit\n");
    let output = run_cli(
        bin(),
        &nats.url,
        &["build", "demo", "web", "--json"],
        Duration::from_secs(60),
    );
    assert_eq!(output.status.code(), Some(1));
    let finished: Value = serde_json::from_slice(&output.stdout).expect("json");
    let error = finished["error"].as_str().unwrap_or_default();
    assert!(error.contains("is nix installed"), "{error}");
    assert!(builder.is_running(), "{}", builder.log());
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(test_support::unique("faults"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A builder whose NATS user may store events but not log batches: the server refuses the first
/// log batch with an asynchronous permissions violation. The request ends at its first attempt
/// with a `finished` that names the refused subject, instead of being handed back and started
/// again until `builder.max_attempts`.
#[tokio::test(flavor = "multi_thread")]
async fn a_publish_the_server_refuses_ends_the_request_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("nats.conf");
    std::fs::write(
        &config,
        r#"authorization {
  users = [
    { user: builder, password: builder-pw,
      permissions: { publish: { allow: ">", deny: "build.responses.*.*.*.logs" }, subscribe: ">" } }
    { user: client, password: client-pw }
  ]
}
"#,
    )
    .expect("write nats config");
    let nats = NatsServer::start_with(&["-c", &config.display().to_string()]);
    let builder_url = nats.url.replace("nats://", "nats://builder:builder-pw@");
    let client_url = nats.url.replace("nats://", "nats://client:client-pw@");
    let repo = FixtureRepo::new("fleet");
    let builder = Builder::start(bin(), &builder_url, &[("demo", repo.url())]);

    let output = run_cli(
        bin(),
        &client_url,
        &["build", "demo", "broken-build", "--json"],
        Duration::from_secs(120),
    );
    let (stdout, stderr) = text(&output);
    assert_eq!(
        output.status.code(),
        Some(1),
        "stdout:\n{stdout}\nstderr:\n{stderr}\nbuilder:\n{}",
        builder.log()
    );
    let finished: Value = serde_json::from_str(stdout.trim()).expect("finished json");
    let error = finished["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("permission denied") && error.contains(".logs"),
        "the error names the refusal and the subject: {finished}"
    );
    let id = finished["id"].as_str().expect("id");
    let client =
        async_nats::ConnectOptions::with_user_and_password("client".into(), "client-pw".into())
            .connect(&nats.url)
            .await
            .expect("connect");
    let events = stored_messages(&client, &format!("build.responses.demo.*.{id}.events")).await;
    let started = events.iter().filter(|e| e["type"] == "started").count();
    assert_eq!(started, 1, "started once, not retried: {events:?}");
    assert!(
        !builder.log().contains("builder-pw"),
        "the builder's log never shows its NATS password"
    );
}
