//! Shared evaluation: hosts of an `all` request are evaluated in one nix process where the memory
//! budget allows, and a host that fails evaluation never hides the others.

use test_support::{Builder, FixtureRepo, NatsServer};

use crate::{bin, host, Setup};

fn statuses(finished: &serde_json::Value) -> Vec<(String, String)> {
    finished["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap_or("").to_owned(),
                h["status"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// The good hosts evaluate in one nix process; a throwing host and a host with an error
/// `tryEval` cannot catch are isolated by splitting, and reported with their own messages.
#[test]
fn shared_evaluation_isolates_failing_hosts() {
    let setup = Setup::new("evalmix");
    let (code, finished) = setup.build_json("all", &[]);
    assert_eq!(code, 1);
    assert_eq!(
        statuses(&finished),
        [
            ("alpha".into(), "built".into()),
            ("beta".into(), "built".into()),
            ("throws".into(), "eval_failed".into()),
            ("typeerr".into(), "eval_failed".into()),
        ]
    );
    assert!(host(&finished, "throws")["error"]
        .as_str()
        .is_some_and(|e| e.contains("services.foo is misconfigured")));
    assert!(
        host(&finished, "typeerr")["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot add")),
        "{finished:#}"
    );
    let log = setup.builder.log();
    assert!(log.contains("splitting the batch"), "{log}");
    assert!(
        log.contains("shared evaluation done") && log.contains("evaluated=2"),
        "{log}"
    );
}

/// With the fleet's hosts (one throws), everything that evaluates does so in one nix process,
/// and a second build of the same commit reuses it.
#[test]
fn fleet_is_evaluated_in_one_process() {
    let setup = Setup::new("fleet");
    let (_, finished) = setup.build_json("all", &[]);
    assert_eq!(host(&finished, "web")["status"], "built");
    let log = setup.builder.log();
    let line = log
        .lines()
        .find(|l| l.contains("shared evaluation done"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        line.contains("nix_processes=1") && line.contains("evaluated=3"),
        "{line}"
    );
}

/// The memory limit is a kernel limit on every evaluation, a single host's included: the shared
/// evaluation runs out of memory, the hosts then evaluate one at a time, those that fit are
/// built, and the one that needs more than the limit alone fails with a message naming the
/// setting. Nothing here depends on timing: the kernel refuses the memory.
#[test]
fn memory_limit_splits_the_evaluation() {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("evalhungry");
    let builder = Builder::start_with(
        bin(),
        &nats.url,
        &[("demo", repo.url())],
        "\neval_memory_limit_mb = 256",
    );
    let output = test_support::run_cli(
        bin(),
        &nats.url,
        &["build", "demo", "all", "--json"],
        std::time::Duration::from_secs(120),
    );
    let finished: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(
        statuses(&finished),
        [
            ("hungry".into(), "eval_failed".into()),
            ("small-a".into(), "built".into()),
            ("small-b".into(), "built".into()),
        ],
        "{finished:#}"
    );
    let error = host(&finished, "hungry")["error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        error.contains("ran out of memory") && error.contains("eval_memory_limit_mb"),
        "{error}"
    );
    let log = builder.log();
    assert!(
        log.contains("shared evaluation ran out of memory; evaluating the hosts one at a time"),
        "{log}"
    );
}

/// `build_jobs = 2` builds two hosts at once: the second starts before the first finishes, and
/// the result still lists the hosts in order.
#[tokio::test(flavor = "multi_thread")]
async fn build_jobs_build_hosts_at_once() {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("slow");
    let _builder = Builder::start_with(
        bin(),
        &nats.url,
        &[("demo", repo.url())],
        "\nbuild_jobs = 2",
    );
    let output = test_support::run_cli(
        bin(),
        &nats.url,
        &["build", "demo", "all", "--json"],
        std::time::Duration::from_secs(120),
    );
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let finished: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(
        statuses(&finished),
        [
            ("first".into(), "built".into()),
            ("second".into(), "built".into())
        ]
    );
    let id = finished["id"].as_str().expect("id");
    let client = nats.client().await;
    let events =
        test_support::stored_messages(&client, &format!("build.responses.demo.all.{id}.events"))
            .await;
    let position = |kind: &str, host: &str| {
        events
            .iter()
            .position(|e| e["type"] == kind && e["host"] == host)
            .unwrap_or_else(|| panic!("no {kind} for {host}: {events:#?}"))
    };
    assert!(
        position("host_started", "second") < position("host_finished", "first"),
        "{events:#?}"
    );
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
}
