//! The builder's git layer against hostile and broken inputs: git servers that redirect, loop,
//! flood or hang; a mirror left with a stale lock.

use std::time::Duration;

use test_support::{Builder, FixtureRepo, HostileHttp, Hostility, NatsServer};

use crate::{bin, text, Setup};

/// A redirecting (SIGSEGV in libgit2 before), looping, flooding or silent git server fails only
/// the requests of its repo, with an error that names the fetch, in bounded time: the builder
/// stays up through start-up host listing and the requests, and its other repo still builds.
#[test]
fn hostile_git_servers_fail_their_repo_only() {
    let nats = NatsServer::start();
    let good = FixtureRepo::new("fleet");
    let hostile: Vec<(String, HostileHttp)> = [
        ("moved", Hostility::RedirectLoop(301)),
        ("found", Hostility::RedirectLoop(302)),
        ("temporary", Hostility::RedirectLoop(307)),
        ("permanent", Hostility::RedirectLoop(308)),
        ("pingpong", Hostility::RedirectPingPong),
        ("tofile", Hostility::RedirectToFile),
        ("garbage", Hostility::Garbage),
        ("flood", Hostility::EndlessBody),
        ("headers", Hostility::EndlessHeader),
        ("silent", Hostility::Silent),
    ]
    .into_iter()
    .map(|(name, hostility)| (name.to_owned(), HostileHttp::start(hostility)))
    .collect();
    let mut repos = vec![("demo", good.url())];
    for (name, server) in &hostile {
        repos.push((name.as_str(), format!("git+{}", server.url)));
    }
    let name = test_support::unique("builder");
    let mut config = Builder::config(
        &name,
        &nats.url,
        std::path::Path::new("{state_dir}"),
        &repos,
    );
    config = config.replace(
        "ref = \"main\"\n",
        "ref = \"main\"\nfetch_timeout_secs = 5\n",
    );
    let mut builder = Builder::start_config(bin(), &name, &config);
    for (repo, _) in &hostile {
        let output = test_support::run_cli(
            bin(),
            &nats.url,
            &["build", repo, "all", "--json"],
            Duration::from_secs(120),
        );
        let (stdout, stderr) = text(&output);
        assert_eq!(output.status.code(), Some(1), "{repo}: {stdout}\n{stderr}");
        let finished: serde_json::Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|err| panic!("{repo}: {err}: {stdout}\n{stderr}"));
        let error = finished["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("fetching http://127.0.0.1:"),
            "{repo}: {finished:#}"
        );
        assert!(
            builder.is_running(),
            "builder died on {repo}:\n{}",
            builder.log()
        );
    }
    let output = test_support::run_cli(
        bin(),
        &nats.url,
        &["build", "demo", "web"],
        Duration::from_secs(120),
    );
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(builder.is_running(), "{}", builder.log());
}

/// A `refs/heads/main.lock` left in the mirror by a killed git no longer fails every build of
/// the repo: the builder removes it (no process of its own holds it), says so, and builds the new
/// commit.
#[test]
fn stale_lock_in_the_mirror_is_removed() {
    let setup = Setup::new("fleet");
    let (code, finished) = setup.build_json("web", &[]);
    assert_eq!(code, 0, "{finished:#}");
    let lock = setup
        .builder
        .state_dir()
        .join("mirrors/demo.git/refs/heads/main.lock");
    std::fs::write(&lock, "").expect("plant a stale lock");
    let new = setup.repo.commit_file("extra.txt", "a change");
    let (code, finished) = setup.build_json("web", &[]);
    assert_eq!(code, 0, "{finished:#}\n{}", setup.builder.log());
    assert_eq!(finished["rev"], new.as_str(), "{finished:#}");
    assert!(!lock.exists());
    assert!(
        setup
            .builder
            .log()
            .contains("removed a stale git lock file"),
        "{}",
        setup.builder.log()
    );
}
