//! Soak: many requests mixing success, build failure, eval failure, cancel and replace through
//! two builders while one of them is SIGKILLed and restarted every few seconds. Size with
//! `SOAK_REQUESTS` (default 60 in the suite; `scripts/bench`-style runs use 300).

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use homelab_deploy_client::{connect, submit, ConnectSettings, SubmitOptions};
use homelab_deploy_protocol::{Mode, RepoName, Target};
use serde_json::Value;
use test_support::{run_cli, stored_messages, wait_until, Builder, FixtureRepo, NatsServer};

use crate::{bin, seqs_are_contiguous};

#[tokio::test(flavor = "multi_thread")]
async fn soak_with_builder_kills() {
    let requests: usize = std::env::var("SOAK_REQUESTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(60);
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("fleet");
    let repos = [("demo", repo.url())];
    // A request the killer hits three times would be given up (builder.max_attempts, tested in
    // stalls.rs); here every request must come through the kills.
    let extra = "\nmax_attempts = 100\n\n[streams]\nrequest_ack_wait_secs = 3";
    let steady = Builder::start_with(bin(), &nats.url, &repos, extra);
    let flaky = Arc::new(Mutex::new(Builder::start_with(
        bin(),
        &nats.url,
        &repos,
        extra,
    )));

    // Kill and restart the flaky builder every 2 s while requests flow.
    let stop = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(Mutex::new(0u32));
    let killer = {
        let (flaky, stop, kills, url) =
            (flaky.clone(), stop.clone(), kills.clone(), nats.url.clone());
        let repos = repos.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(2));
                let mut builder = flaky.lock().unwrap_or_else(|p| p.into_inner());
                let _ = Command::new("kill")
                    .args(["-KILL", &builder.pid().to_string()])
                    .status();
                *kills.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                *builder = Builder::start_with(bin(), &url, &repos, extra);
            }
        })
    };

    let client = connect(&ConnectSettings {
        url: nats.url.clone().into(),
        nkey_file: None,
        creds_file: None,
        inbox_prefix: None,
        name: "soak".to_owned(),
        timeout: Duration::from_secs(5),
        vault: None,
    })
    .await
    .expect("connect");
    let demo = RepoName::parse("demo").expect("repo");
    let targets = ["web", "db", "broken-build", "broken-eval", "all"];
    let mut ids: BTreeMap<String, &str> = BTreeMap::new();
    let mut cancels = Vec::new();
    for i in 0..requests {
        let target = targets[i % targets.len()];
        let mode = if i % 7 == 3 {
            Mode::Replace
        } else {
            Mode::Enqueue
        };
        let options = SubmitOptions {
            mode,
            requested_by: Some("soak".to_owned()),
            ..Default::default()
        };
        let submission = loop {
            match submit(
                &client,
                &demo,
                &Target::parse(target).expect("target"),
                options.clone(),
            )
            .await
            {
                Ok(submission) => break submission,
                Err(err) if err.to_string().contains("queue_full") => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(err) => panic!("submit {i}: {err}"),
            }
        };
        if i % 11 == 5 {
            cancels.push(submission.id.to_string());
        }
        ids.insert(submission.id.to_string(), target);
    }
    for id in &cancels {
        // A cancel may find the request queued, running, or already finished; all are fine.
        run_cli(
            bin(),
            &nats.url,
            &["cancel", id, "--reason", "soak"],
            Duration::from_secs(60),
        );
    }

    let inspector = nats.client().await;
    let mut redelivered = 0;
    for (id, target) in &ids {
        let subject = format!("build.responses.demo.{target}.{id}.events");
        let mut events = Vec::new();
        for _ in 0..1200 {
            events = stored_messages(&inspector, &subject).await;
            if events.iter().any(|e| e["type"] == "finished") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        seqs_are_contiguous(&events);
        let finished: Vec<&Value> = events.iter().filter(|e| e["type"] == "finished").collect();
        let status = finished[0]["status"].as_str().unwrap_or("");
        match *target {
            "web" | "db" => assert!(
                ["succeeded", "cancelled"].contains(&status),
                "{id} {target}: {status}: {}",
                finished[0]["error"]
            ),
            _ => assert!(
                ["failed", "cancelled"].contains(&status),
                "{id} {target}: {status}: {}",
                finished[0]["error"]
            ),
        }
        redelivered += events
            .iter()
            .filter(|e| e["type"] == "started")
            .count()
            .saturating_sub(1);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = killer.join();
    let kills = *kills.lock().unwrap_or_else(|p| p.into_inner());
    let nonce = std::fs::read_to_string(repo.path().join("nonce.nix")).expect("nonce");
    let orphans = || {
        let out = Command::new("pgrep")
            .args(["-a", "-f", nonce.trim().trim_matches('"')])
            .output()
            .expect("pgrep");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert!(
        wait_until(Duration::from_secs(15), || orphans().is_empty()),
        "orphaned builds:\n{}",
        orphans()
    );
    println!(
        "soak: {} requests, {} builder kills, {} redeliveries, {} cancels asked, lost = 0",
        ids.len(),
        kills,
        redelivered,
        cancels.len()
    );
    drop(steady);
}
