//! Nothing outlives its owner and nothing is collected from under a build: a builder killed with
//! SIGKILL takes its nix with it, and a garbage collection between evaluation and build cannot
//! delete the drvs a request still has to build.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use test_support::{
    process_alive, run_cli, stored_messages, wait_for_finished, wait_until, Builder, FixtureRepo,
    NatsServer,
};

use crate::{bin, host, text, Setup};

/// Processes whose command line mentions `pattern` (`pgrep -a -f`); empty when none.
fn processes_matching(pattern: &str) -> String {
    let output = Command::new("pgrep")
        .args(["-a", "-f", pattern])
        .output()
        .expect("pgrep runs");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// `kill -9` of a builder mid-build ends its `nix build` at once, instead of leaving it to hold
/// the build's locks; the derivation's builder that nix (without a daemon) leaves behind is ended
/// by the next builder before it takes work, and the redelivered request builds there in about
/// the build's own time.
#[tokio::test(flavor = "multi_thread")]
async fn killed_builder_takes_its_nix_along() {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("queue");
    let rev = repo.commit_file("salt", &test_support::unique("salt"));
    let ack_wait = "\n[streams]\nrequest_ack_wait_secs = 3";
    let victim = Builder::start_with(bin(), &nats.url, &[("demo", repo.url())], ack_wait);
    let output = run_cli(
        bin(),
        &nats.url,
        &["build", "demo", "medium", "--rev", &rev, "--no-wait"],
        Duration::from_secs(60),
    );
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
    let id = text(&output).0.trim().to_owned();
    // The derivation's builder has the nonce on its command line; nix has the state dir.
    assert!(
        wait_until(Duration::from_secs(60), || !repo
            .build_processes()
            .is_empty()),
        "the build never started:\n{}",
        victim.log()
    );
    let state_dir = victim.state_dir().display().to_string();
    assert!(
        !processes_matching(&state_dir).is_empty(),
        "no nix build running"
    );
    let derivation_builders: Vec<String> = repo
        .build_processes()
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect();

    Command::new("kill")
        .args(["-KILL", &victim.pid().to_string()])
        .status()
        .expect("kill");
    // SIGKILL reaches nix at once; the 5 s build would still be running without it.
    let gone = wait_until(Duration::from_secs(2), || {
        processes_matching(&state_dir).is_empty()
    });
    assert!(
        gone,
        "nix left running after the builder was killed:\n{}",
        processes_matching(&state_dir)
    );

    // A builder on the same state dir ends the rest before it is ready.
    let started = Instant::now();
    let name = test_support::unique("builder");
    let config = Builder::config(
        &name,
        &nats.url,
        &victim.state_dir(),
        &[("demo", repo.url())],
    );
    let next = Builder::start_config(bin(), &name, &(config + ack_wait));
    let alive = |pid: &String| pid.parse().is_ok_and(process_alive);
    let left: Vec<&String> = derivation_builders
        .iter()
        .filter(|pid| alive(pid))
        .collect();
    assert!(
        left.is_empty(),
        "derivation builders {left:?} outlived their nix:\n{}",
        next.log()
    );
    let client = nats.client().await;
    let events =
        wait_for_finished(&client, &format!("build.responses.demo.medium.{id}.events")).await;
    let finished = events.last().expect("finished");
    assert_eq!(
        finished["status"],
        "succeeded",
        "{finished:#}\n{}",
        next.log()
    );
    assert_eq!(finished["builder"], next.name.as_str());
    // `medium` builds for 5 s, plus the ack wait before the request is redelivered.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
}

/// A garbage collection of the drv a request still has to build, while an earlier host of the
/// same request builds, is refused: the request holds GC roots for everything it evaluated, and
/// the later host builds. `nix-store --delete` is nix's garbage collector limited to the named
/// paths, so tests running beside this one keep their store.
#[tokio::test(flavor = "multi_thread")]
async fn collection_between_evaluation_and_build_spares_the_request() {
    let setup = Setup::new("slow");
    let rev = setup.repo.head();
    let flake = format!("{}?rev={rev}", setup.repo.url());
    let eval = Command::new("nix")
        .args([
            "eval",
            "--raw",
            &format!("{flake}#nixosConfigurations.second.config.system.build.toplevel.drvPath"),
        ])
        .output()
        .expect("nix eval runs");
    assert!(eval.status.success(), "{}", text(&eval).1);
    let second_drv = text(&eval).0.trim().to_owned();

    let url = setup.nats.url.clone();
    let waiting = std::thread::spawn(move || {
        run_cli(
            bin(),
            &url,
            &["build", "demo", "all", "--json"],
            Duration::from_secs(120),
        )
    });
    let client = setup.nats.client().await;
    let mut first_started = false;
    for _ in 0..1200 {
        let events = stored_messages(&client, "build.responses.demo.all.*.events").await;
        if events
            .iter()
            .any(|e| e["type"] == "host_started" && e["host"] == "first")
        {
            first_started = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(first_started, "{}", setup.builder.log());
    let collect = Command::new("nix-store")
        .args(["--delete", &second_drv])
        .output()
        .expect("nix-store runs");
    assert!(
        !collect.status.success() && std::path::Path::new(&second_drv).exists(),
        "the collector deleted {second_drv} while the request still needed it: {}",
        text(&collect).1
    );

    let output = waiting.join().expect("client thread");
    let finished: Value = serde_json::from_slice(&output.stdout).expect("finished json");
    assert_eq!(host(&finished, "first")["status"], "built", "{finished:#}");
    assert_eq!(host(&finished, "second")["status"], "built", "{finished:#}");
    // The roots end with the request; the directory that held them stays.
    let roots = setup.builder.state_dir().join("gcroots").join(".requests");
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_dir(&roots)
            .map(|dir| dir.count() == 0)
            .unwrap_or(false)),
        "request GC roots left behind, or never made in {}",
        roots.display()
    );
}

/// `kill -9` of a builder while git fetches from a server that never answers: git and its
/// transport helper (`git-remote-http`, in git's process group) do not hang on for the fetch
/// timeout; the next builder on the state dir ends whatever the death left.
#[tokio::test(flavor = "multi_thread")]
async fn killed_builder_takes_its_git_along() {
    let nats = NatsServer::start();
    let silent = test_support::HostileHttp::start(test_support::Hostility::Silent);
    let name = test_support::unique("builder");
    let state_dir = tempfile::tempdir().expect("state dir");
    let config = Builder::config(
        &name,
        &nats.url,
        state_dir.path(),
        &[("silent", format!("git+{}", silent.url))],
    )
    .replace(
        "ref = \"main\"\n",
        "ref = \"main\"\nfetch_timeout_secs = 600\n",
    );
    let victim = Builder::start_config(bin(), &name, &config);
    let output = run_cli(
        bin(),
        &nats.url,
        &["build", "silent", "all", "--no-wait"],
        Duration::from_secs(60),
    );
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
    assert!(
        wait_until(Duration::from_secs(60), || !processes_matching(&silent.url)
            .is_empty()),
        "git never started:\n{}",
        victim.log()
    );

    // git and its transport helper (the helper may take a moment to start).
    assert!(
        wait_until(Duration::from_secs(30), || processes_matching(&silent.url)
            .lines()
            .count()
            >= 2),
        "no transport helper:\n{}",
        processes_matching(&silent.url)
    );
    let pids: Vec<String> = processes_matching(&silent.url)
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect();
    let alive = |pid: &String| pid.parse().is_ok_and(process_alive);
    Command::new("kill")
        .args(["-KILL", &victim.pid().to_string()])
        .status()
        .expect("kill");
    let git = processes_matching("git fetch");
    let git_pids: Vec<&String> = pids
        .iter()
        .filter(|pid| git.lines().any(|line| line.starts_with(&format!("{pid} "))))
        .collect();
    assert!(
        wait_until(Duration::from_secs(2), || !git_pids
            .iter()
            .any(|pid| alive(pid))),
        "git left running after the builder was killed: {git_pids:?}"
    );
    let next = Builder::start_config(bin(), &format!("{name}-next"), &config);
    let left: Vec<&String> = pids.iter().filter(|pid| alive(pid)).collect();
    assert!(
        left.is_empty(),
        "processes {left:?} of the dead builder's git outlived the next builder's start:\n{}",
        next.log()
    );
}
