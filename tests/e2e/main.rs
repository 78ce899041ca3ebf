//! End-to-end tests: the real `homelab-deploy` binary against a real nats-server, real git repos
//! and the real nix. Each test starts its own server, repo and builder.

mod api;
mod bench_smoke;
mod build;
mod cache;
mod cli;
mod config;
mod creds;
mod dashboard;
mod diffs;
mod ephemeral;
mod eval;
mod faults;
mod git;
mod identity;
mod lanes;
mod logs;
mod mcp;
mod metrics;
mod names;
mod nixos;
mod permissions;
mod processes;
mod protocol;
mod queue;
mod readmodel;
mod refusals;
mod secrets;
mod service;
mod settings;
mod soak;
mod stalls;
mod tenants;
mod vault;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use test_support::{run_cli, Builder, FixtureRepo, NatsServer};

/// The binary under test.
fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_homelab-deploy"))
}

/// A nats-server, a fixture repo served as `repo_name`, and one builder serving it.
struct Setup {
    repo: FixtureRepo,
    builder: Builder,
    nats: NatsServer,
}

impl Setup {
    fn new(fixture: &str) -> Self {
        let nats = NatsServer::start();
        let repo = FixtureRepo::new(fixture);
        let builder = Builder::start(bin(), &nats.url, &[("demo", repo.url())]);
        Self {
            repo,
            builder,
            nats,
        }
    }

    /// Runs `homelab-deploy ARGS` against this setup's server.
    fn cli(&self, args: &[&str]) -> Output {
        run_cli(bin(), &self.nats.url, args, Duration::from_secs(120))
    }

    /// Runs `homelab-deploy build demo TARGET --json ARGS`; returns the exit code and the
    /// `finished` event it printed.
    fn build_json(&self, target: &str, extra: &[&str]) -> (i32, Value) {
        let mut args = vec!["build", "demo", target, "--json"];
        args.extend_from_slice(extra);
        let output = self.cli(&args);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let finished: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|err| {
            panic!(
                "stdout is not one JSON object ({err}): {stdout}\nstderr:\n{}\nbuilder log:\n{}",
                String::from_utf8_lossy(&output.stderr),
                self.builder.log()
            )
        });
        (output.status.code().unwrap_or(-1), finished)
    }
}

/// The result of `host` in a `finished` event.
fn host<'a>(finished: &'a Value, name: &str) -> &'a Value {
    finished["hosts"]
        .as_array()
        .and_then(|hosts| hosts.iter().find(|h| h["name"] == name))
        .unwrap_or_else(|| panic!("host {name} missing from {finished:#}"))
}

/// SIGKILLs the one of two `builders` named `victim`; takes the other one out of `builders` and
/// returns it (the killed one stays there).
fn kill_one_of_two(builders: &mut Vec<Builder>, victim: &str) -> Builder {
    let index = builders
        .iter()
        .position(|b| b.name == victim)
        .expect("victim is ours");
    std::process::Command::new("kill")
        .args(["-KILL", &builders[index].pid().to_string()])
        .status()
        .expect("kill");
    builders.remove(1 - index)
}

/// `output` is of a command that exited 0; a failure shows what it printed and `builder`'s log.
fn assert_ok(output: &Output, builder: &Builder) {
    let (stdout, stderr) = text(output);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}\n{stderr}\nbuilder:\n{}",
        builder.log()
    );
}

/// Spawns a builder `name` with exactly `config`, which must exit by itself within a minute,
/// failing; returns it, for its log.
fn spawn_to_failure(name: &str, config: &str) -> Builder {
    let mut builder = Builder::spawn_config(bin(), name, config);
    let status = builder.wait_exit(Duration::from_secs(60));
    assert!(
        status.is_some_and(|status| !status.success()),
        "{}",
        builder.log()
    );
    builder
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Events of one request are numbered 1, 2, 3 … without gaps and end with exactly one `finished`.
pub fn seqs_are_contiguous(events: &[serde_json::Value]) {
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(
        seqs,
        (1..=events.len() as u64).collect::<Vec<_>>(),
        "{events:#?}"
    );
    assert_eq!(
        events.iter().filter(|e| e["type"] == "finished").count(),
        1,
        "{events:#?}"
    );
    assert_eq!(
        events.last().map(|e| e["type"].clone()),
        Some(serde_json::Value::from("finished"))
    );
}
