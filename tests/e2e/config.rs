//! Starting the builder: config errors, missing nix, NATS not yet up, and drain on SIGINT.

use std::process::Command;
use std::time::Duration;

use test_support::{free_port, wait_until, Builder, FixtureRepo, NatsServer};

use crate::{bin, cli_ok, failed_start_log, text, Setup};

fn builder_check(config: &str) -> (Option<i32>, String) {
    let dir = tempfile_dir();
    let path = dir.join("builder.toml");
    std::fs::write(&path, config).expect("write config");
    let output = Command::new(bin())
        .args(["builder", "--check", "--config"])
        .arg(&path)
        .output()
        .expect("run builder --check");
    let (stdout, stderr) = text(&output);
    (output.status.code(), format!("{stdout}{stderr}"))
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(test_support::unique("config"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

const GOOD: &str = "[nats]\nurl = \"nats://127.0.0.1:4222\"\n[builder]\nname = \"b1\"\nstate_dir = \"/tmp/hd\"\n[repos.nixos-servers]\nurl = \"git+https://git.example.org/nixos-servers.git\"\nref = \"master\"\n";

/// Each config mistake exits 2 with a message that names the file, the key and the problem.
#[test]
fn config_errors_name_file_key_and_problem() {
    let (code, out) = builder_check(GOOD);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("nixos-servers"), "{out}");

    let cases = [
        (GOOD.replace("name = \"b1\"", "nmae = \"b1\""), "nmae"),
        (
            GOOD.replace("[repos.nixos-servers]", "[repos.\"nixos.servers\"]"),
            "repos.nixos.servers",
        ),
        (
            GOOD.replace("ref = \"master\"", "ref = \"master\"\nbranch = \"x\""),
            "branch",
        ),
        (
            GOOD.replace("url = \"git+https", "url = \"https"),
            "repos.nixos-servers.url",
        ),
        (GOOD.replace("[nats]", "[nats"), "line 1"),
        (
            GOOD.replace("[builder]", "inbox_prefix = \"_INBOX.>\"\n[builder]"),
            "nats.inbox_prefix",
        ),
        (
            GOOD.replace("nats://127.0.0.1:4222", "nats://user:secret@"),
            "nats.url",
        ),
    ];
    for (config, key) in cases {
        let (code, out) = builder_check(&config);
        assert_eq!(code, Some(2), "{out}");
        assert!(
            out.contains("builder.toml") && out.contains(key),
            "expected {key} in: {out}"
        );
    }

    let output = Command::new(bin())
        .args(["builder", "--config", "/nonexistent/builder.toml"])
        .output()
        .expect("run builder");
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr.contains("/nonexistent/builder.toml") && stderr.contains("No such file"),
        "{stderr}"
    );
}

/// A builder whose nix cannot be run exits 3 at once and says how to fix it.
#[test]
fn missing_nix_is_a_clear_startup_error() {
    let log = failed_start_log(
        "\nnix = \"/nonexistent/bin/nix\"",
        "builder kept running without nix",
    );
    assert!(
        log.contains("/nonexistent/bin/nix") && log.contains("nix-bin"),
        "{log}"
    );
}

/// A builder started before NATS logs each failed attempt, then serves once NATS is up.
#[test]
fn builder_waits_for_nats_then_serves() {
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let repo = FixtureRepo::new("fleet");
    let builder = Builder::spawn(bin(), &url, &[("demo", repo.url())], "");
    let retried = wait_until(Duration::from_secs(20), || {
        builder.log().contains("NATS unreachable; retrying")
    });
    assert!(retried, "{}", builder.log());
    let nats = NatsServer::start_on_port(port);
    builder.wait_ready();
    cli_ok(&nats.url, &["build", "demo", "web"], &builder);
}

/// SIGINT (Ctrl-C at a terminal) during a build lets the build finish (its request is
/// answered), then the builder exits 0 and takes nothing more.
#[test]
fn sigint_drains_the_running_build() {
    let mut setup = Setup::new("slow");
    let output = setup.cli(&["build", "demo", "first", "--no-wait"]);
    assert_eq!(output.status.code(), Some(0));
    let building = wait_until(Duration::from_secs(30), || {
        setup.builder.log().contains("request received")
    });
    assert!(building, "{}", setup.builder.log());
    let status = setup
        .builder
        .signal("INT", Duration::from_secs(60))
        .expect("builder exited");
    assert!(
        status.success(),
        "exit {status}; log:\n{}",
        setup.builder.log()
    );
    let log = setup.builder.log();
    assert!(
        log.contains("host finished") && log.contains("status=\"built\""),
        "{log}"
    );
    assert!(log.contains("builder stopped"), "{log}");
}

/// Client commands read NATS settings from flags, then env, then the user's config file, then
/// the system's; a broken config file is a usage error that names it.
#[test]
fn client_config_files_are_read_in_order() {
    let setup = Setup::new("fleet");
    let home = tempfile_dir();
    let system = home.join("system.toml");
    std::fs::write(&system, "nats_url = \"nats://127.0.0.1:1\"\n").expect("system config");
    let run = |home: &std::path::Path, args: &[&str]| {
        Command::new(bin())
            .args(args)
            .env_remove("HOMELAB_DEPLOY_NATS_URL")
            .env_remove("XDG_CONFIG_HOME")
            .env("HOME", home)
            .env("HOMELAB_DEPLOY_SYSTEM_CONFIG", &system)
            .output()
            .expect("run cli")
    };
    // Only the system config (a dead port): unreachable.
    let output = run(&home, &["build", "demo", "web"]);
    assert_eq!(output.status.code(), Some(3), "{}", text(&output).1);
    assert!(
        text(&output).1.contains("nats://127.0.0.1:1"),
        "{}",
        text(&output).1
    );
    // The user config wins over the system config.
    std::fs::create_dir_all(home.join(".config/homelab-deploy")).expect("dir");
    std::fs::write(
        home.join(".config/homelab-deploy/config.toml"),
        format!("nats_url = \"{}\"\n", setup.nats.url),
    )
    .expect("user config");
    let output = run(&home, &["build", "demo", "web"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
    // A flag wins over both.
    let output = run(
        &home,
        &["build", "demo", "web", "--nats-url", "nats://127.0.0.1:1"],
    );
    assert_eq!(output.status.code(), Some(3));
    // An inbox prefix that is no subject prefix is refused before connecting, with an example.
    let output = run(&home, &["builders", "--inbox-prefix", "_INBOX.*"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output).1.contains("\"_INBOX.*\"") && text(&output).1.contains("_INBOX_alice"),
        "{}",
        text(&output).1
    );
    // A typo in a config file is named.
    std::fs::write(&system, "nats_ulr = \"x\"\n").expect("system config");
    let output = run(&home, &["builders"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output).1.contains("system.toml") && text(&output).1.contains("nats_ulr"),
        "{}",
        text(&output).1
    );
}

/// `--log-format json`: every log line is one JSON object, and every line about a request
/// carries its id, so `journalctl -u homelab-deploy-builder | grep ID` finds its story.
#[test]
fn json_logs_carry_the_request_id() {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("fleet");
    let builder = Builder::start_with_args(
        bin(),
        &nats.url,
        &[("demo", repo.url())],
        &["--log-format", "json"],
    );
    let output = test_support::run_cli(
        bin(),
        &nats.url,
        &["build", "demo", "web", "--json"],
        Duration::from_secs(60),
    );
    let finished: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    let id = finished["id"].as_str().expect("id").to_owned();
    let log = builder.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}"))
        })
        .collect();
    let about_request: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| {
            ["request received", "host finished", "request finished"]
                .contains(&l["fields"]["message"].as_str().unwrap_or(""))
        })
        .collect();
    assert_eq!(about_request.len(), 3, "{log}");
    for line in about_request {
        assert!(line.to_string().contains(&id), "no request id in {line}");
    }
}
