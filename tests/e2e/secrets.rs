//! Secrets never leave: every secret a builder and the CLI are given is planted, a run goes
//! through the paths that used to print them (connection retries, a failing fetch, a failing
//! cache push, `--check`), and everything the run wrote is searched for them.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use test_support::{
    free_port, run_cli, stored_messages, unique, wait_until, Builder, FixtureRepo, NatsServer,
    VaultServer,
};

use crate::{bin, host, text};

const SECRET: &str = "shared/homelab-deploy/builder-nkey";
const POLICY: &str = include_str!("../../vault/builder-policy.hcl");
/// Passwords and tokens with a quote in them: a quote used to end the redaction early.
const NATS_PASSWORD: &str = "n'ats-pw-7Yq2Lm";
const REPO_TOKEN: &str = "ghp_T0ken'x9XfQa";
const PUSH_PASSWORD: &str = "pu'sh-pw-3Kd9Wz";

/// Fails, naming the secret's role and where it showed, if any of `secrets` is in `output`.
fn assert_clean(secrets: &[(&str, String)], what: &str, output: &str) {
    for (role, secret) in secrets {
        assert!(
            !output.contains(secret.as_str()),
            "{what} shows the {role}:\n{output}"
        );
    }
}

/// A builder whose seed comes from Vault (token login), authenticating to NATS with a password
/// in its URL, serving a repo whose pushes go to a cache URL with a password and a repo whose
/// URL has a token. It starts before NATS, so it retries the connection first. Builder log, CLI
/// output (text, JSON, JUnit), every stored event and log line, API replies, metrics and
/// `--check` errors hold none of those secrets, nor the seed or the Vault token.
#[tokio::test(flavor = "multi_thread")]
async fn planted_secrets_never_leave() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vault = VaultServer::start().await;
    vault.mount_kv("shared").await;
    let seed_file = dir.path().join("builder.nk");
    test_support::nkey_generate(bin(), &seed_file);
    let seed = std::fs::read_to_string(&seed_file)
        .expect("seed")
        .trim()
        .to_owned();
    vault
        .write_secret(SECRET, json!({ "nkey_seed": seed }))
        .await;
    vault.write_policy("homelab-deploy-builder", POLICY).await;
    let vault_token = vault.token(&["homelab-deploy-builder"]).await;
    let token_file = dir.path().join("vault-token");
    std::fs::write(&token_file, &vault_token).expect("token file");
    let secrets = [
        ("NATS password", NATS_PASSWORD.to_owned()),
        ("repo token", REPO_TOKEN.to_owned()),
        ("cache password", PUSH_PASSWORD.to_owned()),
        ("NKey seed", seed.clone()),
        ("Vault token", vault_token.clone()),
    ];

    let port = free_port();
    let nats_url = |port: u16| format!("nats://deploy:{NATS_PASSWORD}@127.0.0.1:{port}");
    let metrics_port = free_port();
    let repo = FixtureRepo::new("fleet");
    let name = unique("builder");
    let config = format!(
        "[nats]\nurl = \"{}\"\n\n[builder]\nname = \"{name}\"\nstate_dir = \"{{state_dir}}\"\n\n\
         [vault]\naddress = \"{}\"\nnkey_secret = \"{SECRET}\"\nauth = \"token\"\ntoken_file = \"{}\"\n\n\
         [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n\
         [repos.demo]\nurl = \"{}\"\npush_to = \"http://cache:{PUSH_PASSWORD}@127.0.0.1:1/cache\"\n\n\
         [repos.private]\nurl = \"git+https://deploy:{REPO_TOKEN}@127.0.0.1:1/fleet.git\"\n",
        nats_url(port),
        vault.address,
        token_file.display(),
        repo.url(),
    );
    let builder = Builder::spawn_config(bin(), &name, &config);
    let retried = wait_until(Duration::from_secs(30), || {
        builder.log().contains("NATS unreachable")
    });
    assert!(retried, "{}", builder.log());
    let nats = NatsServer::start_with(&[
        "-p",
        &port.to_string(),
        "--user",
        "deploy",
        "--pass",
        NATS_PASSWORD,
    ]);
    builder.wait_ready();
    let cli = |args: &[&str]| run_cli(bin(), &nats_url(port), args, Duration::from_secs(120));
    let mut seen = String::new();
    let mut record = |what: &str, output: &std::process::Output| {
        let (stdout, stderr) = text(output);
        assert_clean(&secrets, what, &format!("{stdout}\n{stderr}"));
        seen.push_str(&stdout);
        seen.push_str(&stderr);
    };

    // A built host whose push fails: nix names the cache URL in its error.
    let junit = dir.path().join("hosts.xml");
    let output = cli(&[
        "build",
        "demo",
        "web",
        "--json",
        "--junit",
        &junit.display().to_string(),
    ]);
    record("build --json", &output);
    let finished: Value = serde_json::from_slice(&output.stdout).expect("finished event");
    let web = host(&finished, "web");
    assert_eq!(web["pushed"], false, "{finished:#}");
    let push_error = web["push_error"].as_str().unwrap_or_default();
    assert!(push_error.contains("***@127.0.0.1:1"), "{push_error}");
    let id = finished["id"].as_str().expect("id").to_owned();
    let junit = std::fs::read_to_string(&junit).expect("junit written");
    assert_clean(&secrets, "the JUnit report", &junit);

    // A repo that cannot be fetched: git names the URL in its error.
    let output = cli(&["build", "private", "all"]);
    assert_ne!(output.status.code(), Some(0));
    let (stdout, stderr) = text(&output);
    assert!(
        format!("{stdout}{stderr}").contains("***@127.0.0.1:1"),
        "{stdout}{stderr}"
    );
    record("a failed fetch", &output);

    for args in [
        &["logs", id.as_str()][..],
        &["status", id.as_str(), "--json"],
        &["builds", "--json"],
        &["builders", "--json"],
    ] {
        let output = cli(args);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{args:?}: {}",
            text(&output).1
        );
        record(&format!("{args:?}"), &output);
    }
    // The CLI retrying a server that is down names it, without the password.
    let output = run_cli(
        bin(),
        &nats_url(free_port()),
        &["builders"],
        Duration::from_secs(60),
    );
    assert_ne!(output.status.code(), Some(0));
    assert!(
        text(&output).1.contains("nats://***@127.0.0.1"),
        "{}",
        text(&output).1
    );
    record("the CLI without a server", &output);

    let client =
        async_nats::ConnectOptions::with_user_and_password("deploy".into(), NATS_PASSWORD.into())
            .connect(nats.url.as_str())
            .await
            .expect("connect with the password");
    let stored = stored_messages(&client, "build.responses.>").await;
    assert!(stored.len() > 4, "{stored:#?}");
    assert_clean(
        &secrets,
        "the events and logs subjects",
        &serde_json::to_string(&stored).expect("json"),
    );
    assert_clean(
        &secrets,
        "the metrics",
        &crate::metrics::scrape(metrics_port),
    );
    let log = builder.log();
    assert!(log.contains("nats://***@127.0.0.1"), "{log}");
    assert_clean(&secrets, "the builder log", &log);
    assert!(!seen.is_empty());
}

/// `builder --check` of a config whose URLs carry credentials, with an error in them (a URL
/// without nix's `git+` prefix, a broken NATS URL, a TOML error on the URL's line): the error
/// names the key and shows the URL without them.
#[test]
fn check_errors_show_urls_without_credentials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good_nats = "url = \"nats://127.0.0.1:4222\"";
    for (nats, repo_line, key) in [
        (
            good_nats.to_owned(),
            format!("url = \"https://deploy:{REPO_TOKEN}@git.example.org/x.git\""),
            "repos.demo.url",
        ),
        (
            format!("url = \"deploy:{NATS_PASSWORD}@\""),
            "url = \"git+file:///srv/x\"".to_owned(),
            "nats.url",
        ),
        (
            good_nats.to_owned(),
            format!("url = \"git+https://deploy:{REPO_TOKEN}@git.example.org/x.git\" junk"),
            "",
        ),
    ] {
        let config = dir.path().join("builder.toml");
        std::fs::write(
            &config,
            format!(
                "[nats]\n{nats}\n[builder]\nname = \"b\"\nstate_dir = \"/tmp/x\"\n[repos.demo]\n{repo_line}\n"
            ),
        )
        .expect("config");
        let output = check(&config);
        let (stdout, stderr) = text(&output);
        assert_eq!(output.status.code(), Some(2), "{stdout}{stderr}");
        assert!(stderr.contains(key), "{stderr}");
        for secret in [REPO_TOKEN, NATS_PASSWORD] {
            assert!(!stderr.contains(secret), "{stderr}");
        }
    }
}

fn check(config: &Path) -> std::process::Output {
    Command::new(bin())
        .args(["builder", "--check", "--config"])
        .arg(config)
        .output()
        .expect("builder --check")
}
