//! Per-repo nix settings: `impure`, `nix_options`, and a flake's `nixConfig`, which is never
//! applied (nor asked about), whatever the machine's nix.conf says.

use std::time::Duration;

use serde_json::Value;
use test_support::{run_cli, unique, Builder, FixtureRepo, NatsServer, NIX_CONFIG};

use crate::{bin, host, text};

/// Runs `homelab-deploy build REPO HOST --json`; returns the exit code and the `finished` event.
fn build(nats: &NatsServer, repo: &str, target: &str) -> (i32, Value) {
    let output = run_cli(
        bin(),
        &nats.url,
        &["build", repo, target, "--json"],
        Duration::from_secs(120),
    );
    let (stdout, stderr) = text(&output);
    let finished = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|err| panic!("no finished event ({err}): {stdout}\n{stderr}"));
    (output.status.code().unwrap_or(-1), finished)
}

/// The file `name` in the output of `host`.
fn output_file(finished: &Value, host_name: &str, name: &str) -> String {
    let out_path = host(finished, host_name)["out_path"]
        .as_str()
        .unwrap_or_else(|| panic!("{host_name} has no out path: {finished:#}"));
    std::fs::read_to_string(format!("{out_path}/{name}"))
        .expect("file in the output")
        .trim()
        .to_owned()
}

/// A flake that reads the clock fails evaluation as `nix build` would, unless its repo says
/// `impure = true`; `nix_options` reach the build (`cores` becomes `NIX_BUILD_CORES`).
#[test]
fn impure_and_nix_options_are_per_repo() {
    let nats = NatsServer::start();
    let plain = FixtureRepo::new("settings");
    let tuned = FixtureRepo::new("settings");
    let name = unique("builder");
    let config = format!(
        "{}\nimpure = true\n\n[repos.tuned.nix_options]\ncores = 7\n",
        Builder::config(
            &name,
            &nats.url,
            std::path::Path::new("{state_dir}"),
            &[("plain", plain.url()), ("tuned", tuned.url())],
        )
    );
    let builder = Builder::start_config(bin(), &name, &config);

    let (code, finished) = build(&nats, "plain", "clock");
    assert_eq!(code, 1, "{finished:#}");
    let clock = host(&finished, "clock");
    assert_eq!(clock["status"], "eval_failed", "{finished:#}");
    assert!(
        clock["error"]
            .as_str()
            .is_some_and(|e| e.contains("currentTime")),
        "{finished:#}"
    );

    let (code, finished) = build(&nats, "tuned", "clock");
    assert_eq!(code, 0, "{finished:#}\n{}", builder.log());
    let time: u64 = output_file(&finished, "clock", "time")
        .parse()
        .expect("a time stamp");
    assert!(time > 1_700_000_000, "{time}");

    let (code, finished) = build(&nats, "tuned", "cores");
    assert_eq!(code, 0, "{finished:#}");
    assert_eq!(output_file(&finished, "cores", "cores"), "7");
    let (code, finished) = build(&nats, "plain", "cores");
    assert_eq!(code, 0, "{finished:#}");
    assert_ne!(output_file(&finished, "cores", "cores"), "7");
}

/// On a machine whose nix.conf trusts every flake's `nixConfig` (`accept-flake-config = true`),
/// the builder still ignores it: the fixture's `nixConfig` forbids import-from-derivation, and
/// its `ifd` host builds anyway. nix never waits for an answer (its stdin is closed).
#[test]
fn a_flakes_nix_config_is_never_applied() {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("settings");
    let name = unique("builder");
    let config = Builder::config(
        &name,
        &nats.url,
        std::path::Path::new("{state_dir}"),
        &[("demo", repo.url())],
    );
    let trusting = format!("{NIX_CONFIG}accept-flake-config = true\n");
    let builder = Builder::start_config_with_nix_config(bin(), &name, &config, &trusting);
    let (code, finished) = build(&nats, "demo", "ifd");
    assert_eq!(code, 0, "{finished:#}\n{}", builder.log());
    assert_eq!(
        output_file(&finished, "ifd", "text"),
        "imported from a derivation"
    );
}
