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
use test_support::{run_cli, wait_until, Builder, FixtureRepo, NatsServer};

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
        let (code, finished) = build_json(&self.nats.url, &self.builder, "demo", target, extra);
        (code.unwrap_or(-1), finished)
    }
}

/// Runs `homelab-deploy build REPO TARGET --json ARGS` against `nats_url`; returns the exit code
/// and the `finished` event it printed (when it printed none, panics with `builder`'s log).
fn build_json(
    nats_url: &str,
    builder: &Builder,
    repo: &str,
    target: &str,
    extra: &[&str],
) -> (Option<i32>, Value) {
    let mut args = vec!["build", repo, target, "--json"];
    args.extend_from_slice(extra);
    let output = run_cli(bin(), nats_url, &args, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let finished: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|err| {
        panic!(
            "{repo} {target}: stdout is not one JSON object ({err}): {stdout}\nstderr:\n{}\nbuilder log:\n{}",
            String::from_utf8_lossy(&output.stderr),
            builder.log()
        )
    });
    (output.status.code(), finished)
}

/// The result of `host` in a `finished` event.
fn host<'a>(finished: &'a Value, name: &str) -> &'a Value {
    finished["hosts"]
        .as_array()
        .and_then(|hosts| hosts.iter().find(|h| h["name"] == name))
        .unwrap_or_else(|| panic!("host {name} missing from {finished:#}"))
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

/// Runs `homelab-deploy ARGS` against `nats_url` (two minutes at most), which must exit 0
/// ([`assert_ok`], with `builder`'s log).
fn cli_ok(nats_url: &str, args: &[&str], builder: &Builder) -> Output {
    let output = run_cli(bin(), nats_url, args, Duration::from_secs(120));
    assert_ok(&output, builder);
    output
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

/// The log of a builder serving the `fleet` fixture with `builder_extra` config lines, which
/// must stop by itself within 20 s of starting (`what` names the failure otherwise).
fn failed_start_log(builder_extra: &str, what: &str) -> String {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("fleet");
    let mut builder = Builder::spawn(bin(), &nats.url, &[("demo", repo.url())], builder_extra);
    let exited = wait_until(Duration::from_secs(20), || !builder.is_running());
    assert!(exited, "{what}");
    builder.log()
}

/// Commits, on a new branch `hang` of `repo`, a flake whose host listing imports a derivation
/// that never finishes building; `repo` is back on `main` after.
fn commit_hanging_branch(repo: &FixtureRepo) {
    repo.git(&["checkout", "-q", "-b", "hang"]);
    repo.commit_file(
        "flake.nix",
        r#"# Listing the hosts imports a derivation that never finishes building.
# /bin/sleep resolves only because Nix's sandbox is off on the test machines.
{
  outputs = { self }:
    let
      nonce = import ./nonce.nix;
      hang = derivation {
        name = "hang";
        inherit nonce;
        system = "x86_64-linux";
        builder = "/bin/sh";
        args = [ "-c" "echo ${nonce}; /bin/sleep 600; echo '{}' > $out" ];
      };
    in { nixosConfigurations = import hang; };
}
"#,
    );
    repo.git(&["checkout", "-q", "main"]);
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
