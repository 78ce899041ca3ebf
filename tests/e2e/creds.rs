//! Short-lived credentials: `creds mint` makes a builder-role user JWT that nats-server in
//! operator mode (the shipped `nats/operator.example.conf`) accepts until it expires, with the
//! role's permissions; a builder connects with it through `[nats] creds_file`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use homelab_deploy_credentials::jwt::{self, RolePermissions};
use serde_json::Value;
use test_support::{
    assert_refused, connect_recording, run_cli, wait_for_finished, wait_until, Builder,
    FixtureRepo, OperatorServer, ServerErrors,
};

use crate::{bin, text};

/// `homelab-deploy creds mint --role builder --ttl TTL …` into `out`.
fn mint(server: &OperatorServer, ttl: &str, out: &Path) {
    let sk = server.signing_key_file().display().to_string();
    let out_arg = out.display().to_string();
    let args = [
        "creds",
        "mint",
        "--role",
        "builder",
        "--ttl",
        ttl,
        "--account",
        &server.account,
        "--account-signing-key",
        &sk,
        "--out",
        &out_arg,
    ];
    let output = run_cli(bin(), &server.nats.url, &args, Duration::from_secs(30));
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("expires"), "{stderr}");
    let seed = std::fs::read_to_string(out).expect("creds file");
    let seed_line = seed
        .lines()
        .find(|line| line.starts_with("SU"))
        .expect("seed in creds");
    assert!(!stdout.contains(seed_line) && !stderr.contains(seed_line));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out).expect("meta").permissions().mode();
    assert_eq!(mode & 0o077, 0, "creds file mode {mode:o}");
}

/// Config of a builder `name` serving `repo` as `demo`, connecting with the creds in `creds`
/// and the builder role's inbox prefix; `{state_dir}` is left for the harness.
fn creds_builder_config(
    server: &OperatorServer,
    creds: &Path,
    name: &str,
    repo: &FixtureRepo,
) -> String {
    format!(
        "[nats]\nurl = \"{}\"\ncreds_file = \"{}\"\ninbox_prefix = \"_INBOX_builder\"\n\n[builder]\nname = \"{name}\"\nstate_dir = \"{{state_dir}}\"\n\n[repos.demo]\nurl = \"{}\"\nref = \"main\"\n",
        server.nats.url,
        creds.display(),
        repo.url()
    )
}

/// A connection with the creds in `path` (async-nats' own creds reader), recording the
/// server's errors.
async fn connect(
    server: &OperatorServer,
    path: &Path,
) -> Result<(async_nats::Client, ServerErrors), async_nats::ConnectError> {
    let options = async_nats::ConnectOptions::with_credentials_file(path)
        .await
        .expect("creds file readable by async-nats");
    connect_recording(options, &server.nats.url).await
}

/// Fresh builder creds work: a builder with `creds_file` sets up the streams, takes a request and
/// builds it. The role's permissions hold: the same creds cannot ask for a build.
#[tokio::test(flavor = "multi_thread")]
async fn minted_builder_creds_build_and_keep_the_role() {
    let server = OperatorServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let creds = dir.path().join("builder.creds");
    mint(&server, "1h", &creds);
    let repo = FixtureRepo::new("queue");
    let config = creds_builder_config(&server, &creds, "jwt-builder", &repo);
    // A requester of the same account (any user its signing key signs); it also provisions the
    // streams, which the builder role may not create.
    let requester_creds = dir.path().join("requester.creds");
    let requester = RolePermissions {
        publish: &[">"],
        subscribe: &[">"],
        allow_responses: false,
    };
    let signing = jwt::read_account_signing_key(server.signing_key_file()).expect("sk");
    let minted = jwt::mint(
        &requester,
        &server.account,
        &signing,
        "requester",
        Duration::from_secs(600),
    )
    .expect("mint requester");
    jwt::write_creds_file(&requester_creds, &minted).expect("write requester creds");
    let provision_config = dir.path().join("provision.toml");
    std::fs::write(
        &provision_config,
        config.replace(
            "{state_dir}",
            &dir.path().join("state").display().to_string(),
        ),
    )
    .expect("write config");
    let output = run_cli(
        bin(),
        &server.nats.url,
        &[
            "builder",
            "provision",
            "--config",
            &provision_config.display().to_string(),
            "--creds-file",
            &requester_creds.display().to_string(),
        ],
        Duration::from_secs(60),
    );
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
    let builder = Builder::start_config(bin(), "jwt-builder", &config);
    let (client, _) = connect(&server, &requester_creds)
        .await
        .expect("requester connects");
    let id = test_support::unique("jwtreq").replace(['.', ':'], "-");
    let js = async_nats::jetstream::new(client.clone());
    let body = serde_json::json!({"id": id, "requested_by": "test"}).to_string();
    js.publish("build.demo.short", body.into())
        .await
        .expect("publish")
        .await
        .expect("queued");
    let events =
        wait_for_finished(&client, &format!("build.responses.demo.short.{id}.events")).await;
    let finished: &Value = events.last().expect("finished");
    assert_eq!(
        finished["status"],
        "succeeded",
        "{finished:#}\n{}",
        builder.log()
    );
    assert_eq!(finished["builder"], "jwt-builder");
    // The builder answers the control API through the JWT's `resp` claim (its publish list has
    // no inbox): the reply reaches the asker.
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(homelab_deploy_protocol::api::BUILDERS_SUBJECT, "{}".into()),
    )
    .await
    .expect("the builder answers in time")
    .expect("a reply");
    let builders: Value = serde_json::from_slice(&reply.payload).expect("JSON reply");
    assert!(
        builders.to_string().contains("jwt-builder"),
        "{builders}\n{}",
        builder.log()
    );

    let (as_builder, errors) = connect(&server, &creds)
        .await
        .expect("builder creds connect");
    as_builder
        .publish("build.demo.short", "{}".into())
        .await
        .expect("send");
    as_builder.flush().await.expect("flush");
    assert_refused(&errors, "");
}

/// An expired credential is refused: by the server to any client, and a builder holding it says
/// so (and waits for a new one) instead of starting.
#[tokio::test(flavor = "multi_thread")]
async fn expired_creds_are_refused() {
    let server = OperatorServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let creds: PathBuf = dir.path().join("short.creds");
    mint(&server, "1s", &creds);
    // Past the expiry (a JWT counts whole seconds).
    let expired_at = SystemTime::now() + Duration::from_millis(2100);
    let past = wait_until(Duration::from_secs(5), || SystemTime::now() > expired_at);
    assert!(past);
    let refused = connect(&server, &creds).await;
    assert!(refused.is_err(), "an expired credential was accepted");

    let repo = FixtureRepo::new("queue");
    let config = creds_builder_config(&server, &creds, "late-builder", &repo);
    let builder = Builder::spawn_config(bin(), "late-builder", &config);
    let said = wait_until(Duration::from_secs(20), || {
        builder.log().contains("refused the credentials in")
    });
    assert!(said, "{}", builder.log());
    assert!(
        !builder.log().contains("builder ready"),
        "{}",
        builder.log()
    );
}
