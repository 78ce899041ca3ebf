//! NKey authentication and least-privilege permissions, enforced by a real nats-server running
//! the shipped `nats/prod.example.conf` with freshly generated keys.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use async_nats::jetstream;
use test_support::{
    assert_refused, connect_recording, example_config, nkey_generate, nkey_public, refused_within,
    run_cli, unique, violations, Builder, FixtureRepo, NatsServer, ServerErrors,
};

use crate::{assert_ok, bin, spawn_to_failure, text};

/// nats-server running the shipped `nats/prod.example.conf` with fresh keys for its five users.
pub(crate) struct SecuredNats {
    pub nats: NatsServer,
    pub dir: PathBuf,
    config_path: PathBuf,
    pub builder_seed: PathBuf,
    pub deployer_seed: PathBuf,
    /// The read-only `VIEWER` user (the dashboard).
    pub viewer_seed: PathBuf,
    pub admin_seed: PathBuf,
    /// `SERVERS_DEPLOYER`: may queue builds of repo `nixos-servers` only.
    pub servers_seed: PathBuf,
    builder_public: String,
}

impl SecuredNats {
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(unique("secured"));
        std::fs::create_dir_all(&dir).expect("dir");
        let builder_seed = dir.join("builder.nk");
        let deployer_seed = dir.join("deployer.nk");
        let admin_seed = dir.join("admin.nk");
        let viewer_seed = dir.join("viewer.nk");
        let servers_seed = dir.join("servers.nk");
        let builder_public = nkey_generate(bin(), &builder_seed);
        let config = example_config("prod.example.conf")
            .replace("BUILDER_PUBLIC_KEY", &builder_public)
            .replace(
                "TEST_DEPLOYER_PUBLIC_KEY",
                &nkey_generate(bin(), &deployer_seed),
            )
            .replace(
                "ADMIN_DEPLOYER_PUBLIC_KEY",
                &nkey_generate(bin(), &admin_seed),
            )
            .replace("VIEWER_PUBLIC_KEY", &nkey_generate(bin(), &viewer_seed))
            .replace(
                "SERVERS_DEPLOYER_PUBLIC_KEY",
                &nkey_generate(bin(), &servers_seed),
            );
        let config_path = dir.join("nats.conf");
        let nats = NatsServer::start_config(&config, &config_path);
        Self {
            nats,
            dir,
            config_path,
            builder_seed,
            deployer_seed,
            viewer_seed,
            admin_seed,
            servers_seed,
            builder_public,
        }
    }

    /// The inbox prefix the user of `seed` may subscribe to (`_INBOX_<user>.>` in the config).
    pub fn inbox_prefix(&self, seed: &Path) -> &'static str {
        if seed == self.builder_seed {
            "_INBOX_builder"
        } else if seed == self.deployer_seed {
            "_INBOX_test_deployer"
        } else if seed == self.admin_seed {
            "_INBOX_admin"
        } else if seed == self.viewer_seed {
            "_INBOX_viewer"
        } else if seed == self.servers_seed {
            "_INBOX_servers_deployer"
        } else {
            panic!("{} is none of the configured users' seeds", seed.display())
        }
    }

    /// Makes `seed_file` the builder's only key: rewrites the server config and reloads it
    /// (SIGHUP), which closes connections made with the old key.
    pub fn rotate_builder_key(&mut self, seed_file: &Path) -> String {
        let new_public = nkey_public(bin(), seed_file);
        let config = std::fs::read_to_string(&self.config_path).expect("nats config");
        std::fs::write(
            &self.config_path,
            config.replace(&self.builder_public, &new_public),
        )
        .expect("write nats config");
        let status = Command::new("kill")
            .args(["-HUP", &self.nats.pid().to_string()])
            .status()
            .expect("kill -HUP");
        assert!(status.success(), "reloading nats-server failed");
        self.builder_public = new_public.clone();
        new_public
    }

    /// Builder config without credentials, with the builder user's inbox prefix; `{state_dir}`
    /// is filled in by the harness.
    pub fn builder_config(&self, name: &str, repo: &FixtureRepo) -> String {
        Builder::config(
            name,
            &self.nats.url,
            Path::new("{state_dir}"),
            &[("demo", repo.url())],
        )
        .replacen(
            "\n\n[builder]",
            "\ninbox_prefix = \"_INBOX_builder\"\n\n[builder]",
            1,
        )
    }

    /// `homelab-deploy builder provision` of `builder_config` as the admin: the streams and
    /// buckets, which no builder may create on this server.
    pub fn provision(&self, builder_config: &str) -> std::process::Output {
        let path = self.dir.join(unique("provision.toml"));
        std::fs::write(
            &path,
            builder_config.replace("{state_dir}", &self.dir.join("state").display().to_string()),
        )
        .expect("write builder config");
        let path = path.display().to_string();
        self.cli(
            &self.admin_seed,
            &["builder", "provision", "--config", &path],
        )
    }

    /// [`SecuredNats::provision`], which must succeed.
    pub fn provisioned(&self, builder_config: &str) {
        let output = self.provision(builder_config);
        assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
    }

    /// The CLI as the user of `seed`, with its inbox prefix.
    pub fn cli(&self, seed: &Path, args: &[&str]) -> std::process::Output {
        let mut all = args.to_vec();
        let prefix = self.inbox_prefix(seed);
        let seed = seed.display().to_string();
        all.extend_from_slice(&["--nkey-file", &seed, "--inbox-prefix", prefix]);
        run_cli(bin(), &self.nats.url, &all, Duration::from_secs(60))
    }
}

impl Drop for SecuredNats {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct SecuredFleet {
    secured: SecuredNats,
    repo: FixtureRepo,
    builder: Option<Builder>,
}

impl SecuredFleet {
    fn start() -> Self {
        Self::start_with("")
    }

    /// A builder serving `demo` with `extra` appended to its config (more repos, `[streams]`;
    /// `{repo_url}` stands for the fixture repo's URL).
    fn start_with(extra: &str) -> Self {
        let secured = SecuredNats::start();
        let repo = FixtureRepo::new("fleet");
        let name = unique("builder");
        let builder_config = (secured.builder_config(&name, &repo)
            + &extra.replace("{repo_url}", &repo.url()))
            .replacen(
                "[builder]",
                &format!(
                    "nkey_seed_file = \"{}\"\n\n[builder]",
                    secured.builder_seed.display()
                ),
                1,
            );
        secured.provisioned(&builder_config);
        let builder = Builder::start_config(bin(), &name, &builder_config);
        Self {
            secured,
            repo,
            builder: Some(builder),
        }
    }

    /// A connection as the user of `seed` with its inbox prefix, recording the server's errors
    /// (permission violations).
    async fn connect(&self, seed: &Path) -> (async_nats::Client, ServerErrors) {
        let prefix = self.secured.inbox_prefix(seed);
        connect_as(&self.secured.nats.url, seed, prefix).await
    }

    fn cli(&self, seed: &Path, args: &[&str]) -> std::process::Output {
        self.secured.cli(seed, args)
    }
}

/// A connection to `url` as the user of `seed` with inbox prefix `prefix`, recording the
/// server's errors (permission violations).
pub(crate) async fn connect_as(
    url: &str,
    seed: &Path,
    prefix: &str,
) -> (async_nats::Client, ServerErrors) {
    let seed = homelab_deploy_credentials::read_seed_file(seed).expect("seed");
    let options =
        async_nats::ConnectOptions::with_nkey_seed_for_tests(seed).custom_inbox_prefix(prefix);
    connect_recording(options, url)
        .await
        .expect("connect with nkey")
}

/// Helper so tests authenticate the way the product does (sign the nonce with the seed).
trait NkeyOptions {
    fn with_nkey_seed_for_tests(
        seed: homelab_deploy_credentials::Seed,
    ) -> async_nats::ConnectOptions;
}

impl NkeyOptions for async_nats::ConnectOptions {
    fn with_nkey_seed_for_tests(
        seed: homelab_deploy_credentials::Seed,
    ) -> async_nats::ConnectOptions {
        async_nats::ConnectOptions::with_auth_callback(move |nonce| {
            let seed = seed.clone();
            async move {
                let mut auth = async_nats::Auth::new();
                auth.nkey = Some(
                    seed.public_key()
                        .map_err(|e| async_nats::AuthError::new(e.to_string()))?,
                );
                auth.signature = Some(
                    seed.sign(&nonce)
                        .map_err(|e| async_nats::AuthError::new(e.to_string()))?,
                );
                Ok(auth)
            }
        })
    }
}

async fn pending(client: &async_nats::Client) -> u64 {
    let js = jetstream::new(client.clone());
    let mut stream = js
        .get_stream("BUILD_REQUESTS")
        .await
        .expect("stream info is allowed");
    stream.info().await.expect("info").state.messages
}

/// The builder authenticates with its NKey and builds; a deployer requests a build and reads
/// its events; an unauthenticated connection is refused.
#[tokio::test(flavor = "multi_thread")]
async fn nkey_users_build_end_to_end() {
    let fleet = SecuredFleet::start();
    let output = fleet.cli(
        &fleet.secured.deployer_seed,
        &["build", "demo", "web", "--json"],
    );
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}\nbuilder:\n{}",
        text(&output).1,
        fleet.builder.as_ref().map(|b| b.log()).unwrap_or_default()
    );
    let finished: serde_json::Value =
        serde_json::from_str(text(&output).0.trim()).expect("build --json prints finished");
    let id = finished["id"].as_str().expect("id").to_owned();
    // The deployer reads the request's state from the state bucket (read-only to it).
    let output = fleet.cli(&fleet.secured.deployer_seed, &["status", &id, "--json"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
    assert!(
        text(&output).0.contains("\"phase\":\"succeeded\""),
        "{}",
        text(&output).0
    );
    let output = fleet.cli(&fleet.secured.deployer_seed, &["builds", "--json"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
    assert!(text(&output).0.contains(&id), "{}", text(&output).0);
    let output = fleet.cli(&fleet.secured.deployer_seed, &["builders", "--json"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
    assert!(text(&output).0.contains("demo"), "{}", text(&output).0);

    let refused = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(3))
        .connect(&fleet.secured.nats.url)
        .await;
    assert!(refused.is_err(), "an unauthenticated client was let in");
    let output = run_cli(
        bin(),
        &fleet.secured.nats.url,
        &["build", "demo", "web"],
        Duration::from_secs(30),
    );
    assert_eq!(output.status.code(), Some(3), "{}", text(&output).1);
    assert!(
        text(&output)
            .1
            .contains("requires authentication: give an NKey user seed"),
        "{}",
        text(&output).1
    );
    let log = fleet.builder.as_ref().map(|b| b.log()).unwrap_or_default();
    let seed = std::fs::read_to_string(&fleet.secured.builder_seed).expect("seed");
    assert!(!log.contains(seed.trim()), "the builder logged its seed");
}

/// What the server refuses: a deployer forging builder events, pulling from the request queue,
/// purging or deleting streams; the builder publishing a build request.
#[tokio::test(flavor = "multi_thread")]
async fn the_server_refuses_what_each_role_must_not_do() {
    let mut fleet = SecuredFleet::start();
    // Stop the builder so a queued request stays queued.
    fleet.builder = None;
    let (deployer, deployer_errors) = fleet.connect(&fleet.secured.deployer_seed).await;
    let js = jetstream::new(deployer.clone());
    js.publish("build.demo.web", "{}".into())
        .await
        .expect("publish")
        .await
        .expect("a deployer may queue a request");
    assert_eq!(pending(&deployer).await, 1);

    // Forging a builder event.
    deployer
        .publish(
            "build.responses.demo.web.FORGED0001.events",
            r#"{"type":"finished"}"#.into(),
        )
        .await
        .expect("send");
    deployer.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let forged =
        test_support::try_stored_messages(&deployer, "build.responses.demo.web.FORGED0001.events")
            .await
            .expect("events are readable");
    assert!(forged.is_empty(), "a deployer forged an event");

    // Writing a request's state: the bucket is the builders' to write.
    let states = js
        .get_key_value("BUILD_STATE")
        .await
        .expect("a deployer may read the state bucket");
    let written = tokio::time::timeout(
        Duration::from_secs(3),
        states.put("FORGED0001", r#"{"phase":"succeeded"}"#.into()),
    )
    .await;
    assert!(
        written.map(|r| r.is_err()).unwrap_or(true),
        "a deployer wrote a request state"
    );
    assert!(
        states.get("FORGED0001").await.expect("readable").is_none(),
        "a deployer forged a request state"
    );

    // Taking a request off the queue.
    let stream = js.get_stream("BUILD_REQUESTS").await.expect("stream info");
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_consumer("builder-demo")
        .await
        .expect("consumer info is allowed");
    let pulled = tokio::time::timeout(Duration::from_secs(3), async {
        let mut batch = consumer.fetch().max_messages(1).messages().await.ok()?;
        futures::StreamExt::next(&mut batch).await?.ok()
    })
    .await
    .ok()
    .flatten();
    assert!(pulled.is_none(), "a deployer pulled a request");

    // Purging and deleting.
    assert!(tokio::time::timeout(Duration::from_secs(3), stream.purge())
        .await
        .map(|r| r.is_err())
        .unwrap_or(true));
    assert!(
        tokio::time::timeout(Duration::from_secs(3), js.delete_stream("BUILD_EVENTS"))
            .await
            .map(|r| r.is_err())
            .unwrap_or(true)
    );
    assert_eq!(pending(&deployer).await, 1, "the queue changed");
    assert!(
        js.get_stream("BUILD_EVENTS").await.is_ok(),
        "a deployer deleted a stream"
    );
    let seen = violations(&deployer_errors);
    assert!(
        seen.contains("Permissions Violation"),
        "no violation reported by the server:\n{seen}"
    );

    // The builder may not ask for builds.
    let (builder, builder_errors) = fleet.connect(&fleet.secured.builder_seed).await;
    builder
        .publish("build.demo.db", "{}".into())
        .await
        .expect("send");
    builder.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pending(&builder).await, 1, "the builder queued a request");
    assert!(
        violations(&builder_errors).contains("Permissions Violation"),
        "{}",
        violations(&builder_errors)
    );
}

/// A seed file holding the wrong kind of key is refused with a message that says what it holds,
/// without printing it; the builder stops instead of retrying.
#[test]
fn wrong_seed_files_are_named() {
    let dir = std::env::temp_dir().join(unique("seeds"));
    std::fs::create_dir_all(&dir).expect("dir");
    let seed = dir.join("user.nk");
    let public = nkey_generate(bin(), &seed);
    let wrong = dir.join("public.nk");
    std::fs::write(&wrong, &public).expect("write");
    let output = run_cli(
        bin(),
        "nats://127.0.0.1:1",
        &[
            "build",
            "demo",
            "web",
            "--nkey-file",
            &wrong.display().to_string(),
        ],
        Duration::from_secs(20),
    );
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("holds a public key"), "{stderr}");
    assert!(!stderr.contains(&public), "{stderr}");
    let output = Command::new(bin())
        .args(["nkey", "public", "--seed-file"])
        .arg(&seed)
        .output()
        .expect("nkey public");
    assert_eq!(text(&output).0.trim(), public);
}

/// A seed file rotated while the builder runs: the server is reloaded with the new key and
/// closes the old key's connection; the builder reads the file again at its reconnect and goes
/// on building, without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_seed_file_is_used_at_the_next_reconnect() {
    let mut fleet = SecuredFleet::start();
    let rotated = fleet.secured.dir.join("rotated.nk");
    nkey_generate(bin(), &rotated);
    std::fs::copy(&rotated, &fleet.secured.builder_seed).expect("rotate the seed file");
    fleet.secured.rotate_builder_key(&rotated);
    let builder = fleet.builder.as_ref().expect("builder");
    let reconnected = test_support::wait_until(Duration::from_secs(40), || {
        builder.log().matches("connected to NATS").count() >= 2
    });
    assert!(
        reconnected,
        "no reconnect with the rotated seed:\n{}",
        builder.log()
    );
    let output = fleet.cli(&fleet.secured.deployer_seed, &["build", "demo", "web"]);
    assert_ok(&output, builder);
}

/// As `client` (whose permission violations `errors` collects), updates `BUILD_REQUESTS` with
/// a subject transform that would turn `build.responses.evil.*` into a build request of `repo`:
/// the server must refuse it, and the stream keep its subjects and have no transform. `who`
/// names the key in the failure messages.
pub(crate) async fn a_transform_update_is_refused(
    client: &async_nats::Client,
    errors: &ServerErrors,
    repo: &str,
    who: &str,
) {
    let js = jetstream::new(client.clone());
    let mut stream = js.get_stream("BUILD_REQUESTS").await.expect("stream info");
    let before = stream.info().await.expect("info").config.clone();
    let mut changed = serde_json::to_value(&before).expect("config as JSON");
    changed["subjects"]
        .as_array_mut()
        .expect("subjects")
        .push("build.responses.evil.*".into());
    changed["subject_transform"] = serde_json::json!(
        {"src": "build.responses.evil.*", "dest": format!("build.{repo}.{{{{wildcard(1)}}}}")}
    );
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        client.request(
            "$JS.API.STREAM.UPDATE.BUILD_REQUESTS",
            changed.to_string().into(),
        ),
    )
    .await;
    assert!(
        !matches!(answer, Ok(Ok(_))),
        "the server answered {who}'s stream update"
    );
    assert_refused(errors, "$JS.API.STREAM.UPDATE.BUILD_REQUESTS");
    let after = stream.info().await.expect("info").config.clone();
    assert_eq!(after.subjects, before.subjects, "the subjects changed");
    assert!(
        serde_json::to_value(&after).expect("JSON")["subject_transform"].is_null(),
        "a transform was set"
    );
}

/// Replies are private: a user may subscribe only to its own inbox prefix, not to another
/// user's nor to `_INBOX.>`, so it reads nobody else's replies; with their own prefixes the
/// replies of every role still arrive (the builder answers through `allow_responses`).
#[tokio::test(flavor = "multi_thread")]
async fn replies_go_only_to_the_asker() {
    let fleet = SecuredFleet::start();
    let secured = &fleet.secured;
    let (deployer, deployer_errors) = fleet.connect(&secured.deployer_seed).await;
    let (admin, _) = fleet.connect(&secured.admin_seed).await;
    let (viewer, viewer_errors) = fleet.connect(&secured.viewer_seed).await;

    // Listening on others' replies is refused by the server.
    let mut everyone = deployer.subscribe("_INBOX.>").await.expect("sent");
    let mut admins = deployer.subscribe("_INBOX_admin.>").await.expect("sent");
    let mut deployers = viewer
        .subscribe("_INBOX_test_deployer.>")
        .await
        .expect("sent");
    assert_refused(&deployer_errors, "\"_INBOX.>\"");
    assert_refused(&deployer_errors, "\"_INBOX_admin.>\"");
    assert_refused(&viewer_errors, "\"_INBOX_test_deployer.>\"");

    // The builder answers each asker (control API), on the asker's own prefix.
    for (who, client) in [("deployer", &deployer), ("admin", &admin)] {
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            client.request(homelab_deploy_protocol::api::BUILDERS_SUBJECT, "{}".into()),
        )
        .await
        .unwrap_or_else(|_| panic!("no reply in time for the {who}"))
        .unwrap_or_else(|err| panic!("the {who}'s request failed: {err}"));
        assert!(
            String::from_utf8_lossy(&reply.payload).contains("demo"),
            "{who}: {:?}",
            reply.payload
        );
    }
    // None of those replies reached the refused subscriptions (the server dropped them).
    for subscription in [&mut everyone, &mut admins, &mut deployers] {
        let leaked = tokio::time::timeout(
            Duration::from_millis(300),
            futures::StreamExt::next(subscription),
        )
        .await;
        assert!(
            !matches!(leaked, Ok(Some(_))),
            "a reply reached another user"
        );
    }

    // The builder's key may not publish to an inbox itself: only answer requests it received.
    let (builder, builder_errors) = fleet.connect(&secured.builder_seed).await;
    builder
        .publish("_INBOX_admin.forged", "{}".into())
        .await
        .expect("sent");
    builder.flush().await.expect("flush");
    assert_refused(&builder_errors, "_INBOX_admin.forged");

    // Every role's JetStream replies arrive on its own prefix (the CLI with --inbox-prefix).
    for seed in [
        &secured.deployer_seed,
        &secured.admin_seed,
        &secured.viewer_seed,
    ] {
        let output = fleet.cli(seed, &["builders", "--json"]);
        assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
        assert!(text(&output).0.contains("demo"), "{}", text(&output).0);
    }
    // Without its prefix a client hears no reply at all: the CLI says so and which setting
    // fixes it, instead of reporting an empty fleet.
    let output = run_cli(
        bin(),
        &secured.nats.url,
        &[
            "builders",
            "--nkey-file",
            &secured.deployer_seed.display().to_string(),
        ],
        Duration::from_secs(60),
    );
    assert_eq!(output.status.code(), Some(2), "{}", text(&output).0);
    assert!(
        text(&output)
            .1
            .contains("refuses this user's replies on _INBOX.>")
            && text(&output).1.contains("--inbox-prefix"),
        "{}",
        text(&output).1
    );
}

/// A request as `client`; the reply's text, or `None` when nothing came within 10 s.
async fn ask(client: &async_nats::Client, subject: &str, body: &str) -> Option<String> {
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(subject.to_owned(), body.to_owned().into()),
    )
    .await
    .ok()?
    .ok()?;
    Some(String::from_utf8_lossy(&reply.payload).into_owned())
}

/// Draining a builder and cancelling on it directly are admin actions, refused to a deployer by
/// the server; the deployer keeps the closure-diff call and the `build.api.v1` verbs.
#[tokio::test(flavor = "multi_thread")]
async fn only_the_admin_drains_or_cancels_on_a_builder() {
    let fleet = SecuredFleet::start();
    let secured = &fleet.secured;
    let name = fleet.builder.as_ref().expect("builder").name.clone();
    let drain = format!("build.api.builder.{name}.drain");
    let cancel = format!("build.api.builder.{name}.cancel");
    let diff = format!("build.api.builder.{name}.diff");

    // The deployer's drain is refused, said so, and the builder goes on.
    let output = fleet.cli(&secured.deployer_seed, &["builder", "drain", &name]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output).1);
    assert!(
        text(&output)
            .1
            .contains(&format!("NATS refused this user publishing to {drain}")),
        "{}",
        text(&output).1
    );
    let (deployer, deployer_errors) = fleet.connect(&secured.deployer_seed).await;
    deployer
        .publish(cancel.clone(), r#"{"id":"whatever"}"#.into())
        .await
        .expect("sent");
    deployer.flush().await.expect("flush");
    assert_refused(&deployer_errors, &cancel);
    // What a deployer keeps: the diff call (answered, here with an error: nothing was built)
    // and the shared API (here `builders`).
    let answer = ask(&deployer, &diff, r#"{"repo":"demo","host":"web"}"#).await;
    assert!(answer.is_some(), "no answer to a deployer's diff");
    let answer = ask(
        &deployer,
        homelab_deploy_protocol::api::BUILDERS_SUBJECT,
        "{}",
    )
    .await;
    assert!(answer.is_some_and(|a| a.contains(&name)));
    assert!(
        !violations(&deployer_errors).contains(&diff),
        "{}",
        violations(&deployer_errors)
    );
    let output = fleet.cli(&secured.deployer_seed, &["build", "demo", "web"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);

    // The admin may do both: its direct cancel is answered, its drain drains the builder.
    let (admin, admin_errors) = fleet.connect(&secured.admin_seed).await;
    let answer = ask(&admin, &cancel, r#"{"id":"NOSUCHREQUEST1"}"#).await;
    assert!(answer.is_some(), "{}", violations(&admin_errors));
    let output = fleet.cli(&secured.admin_seed, &["builder", "drain", &name, "--json"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
    assert!(text(&output).0.contains(&name), "{}", text(&output).0);
}

/// A deployer limited to one repo (`SERVERS_DEPLOYER`) builds that repo and is refused by the
/// server for any other; the unlimited deployer builds both.
#[tokio::test(flavor = "multi_thread")]
async fn a_deployer_limited_to_a_repo_builds_only_that_repo() {
    let fleet =
        SecuredFleet::start_with("\n[repos.nixos-servers]\nurl = \"{repo_url}\"\nref = \"main\"\n");
    let secured = &fleet.secured;
    let output = fleet.cli(&secured.servers_seed, &["build", "nixos-servers", "web"]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}\n{}",
        text(&output).1,
        fleet.builder.as_ref().map(|b| b.log()).unwrap_or_default()
    );
    let output = fleet.cli(
        &secured.servers_seed,
        &["build", "demo", "web", "--no-wait"],
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output).1);
    assert!(
        text(&output)
            .1
            .contains("NATS refused this user publishing to build.demo.web"),
        "{}",
        text(&output).1
    );
    let (servers, _) = fleet.connect(&secured.servers_seed).await;
    assert_eq!(pending(&servers).await, 0, "a refused request was queued");
    for repo in ["demo", "nixos-servers"] {
        let output = fleet.cli(&secured.deployer_seed, &["build", repo, "web"]);
        assert_eq!(output.status.code(), Some(0), "{repo}: {}", text(&output).1);
    }
}

/// A deployer creates no durable or named consumer (300 attempts, all refused by the server),
/// ephemeral ones only, and those up to the events stream's `max_consumers`
/// (`streams.events_max_consumers`); following a build still works.
#[tokio::test(flavor = "multi_thread")]
async fn deployers_create_only_ephemeral_bounded_consumers() {
    let limit = 12;
    let fleet = SecuredFleet::start_with(&format!("\n[streams]\nevents_max_consumers = {limit}\n"));
    let secured = &fleet.secured;
    let (deployer, errors) = fleet.connect(&secured.deployer_seed).await;
    // In batches: async-nats drops connection events beyond its event queue, and each
    // refusal is one event.
    for batch in 0..6 {
        for i in batch * 25..(batch + 1) * 25 {
            let config = format!(
                r#"{{"stream_name":"BUILD_EVENTS","config":{{"durable_name":"flood{i}","ack_policy":"none"}}}}"#
            );
            deployer
                .publish(
                    format!("$JS.API.CONSUMER.DURABLE.CREATE.BUILD_EVENTS.flood{i}"),
                    config.clone().into(),
                )
                .await
                .expect("sent");
            deployer
                .publish(
                    format!("$JS.API.CONSUMER.CREATE.BUILD_EVENTS.named{i}"),
                    config.replace("flood", "named").into(),
                )
                .await
                .expect("sent");
        }
        deployer.flush().await.expect("flush");
        let last = format!(
            "$JS.API.CONSUMER.CREATE.BUILD_EVENTS.named{}",
            (batch + 1) * 25 - 1
        );
        assert_refused(&errors, &last);
    }
    let refusals = violations(&errors)
        .matches("Permissions Violation for Publish to \"$JS.API.CONSUMER")
        .count();
    assert_eq!(refusals, 300, "{}", violations(&errors));
    let js = jetstream::new(deployer.clone());
    let stream = js.get_stream("BUILD_EVENTS").await.expect("stream info");
    for name in ["flood0", "flood149", "named0", "named149"] {
        assert!(
            stream.consumer_info(name).await.is_err(),
            "consumer {name} exists"
        );
    }

    // Following a build (ephemeral ordered consumers) still works.
    let output = fleet.cli(&secured.deployer_seed, &["build", "demo", "web", "--json"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
    let finished: serde_json::Value =
        serde_json::from_str(text(&output).0.trim()).expect("build --json prints finished");
    let id = finished["id"].as_str().expect("id").to_owned();
    let output = fleet.cli(&secured.deployer_seed, &["watch", &id]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);

    // Ephemeral consumers: allowed, up to the stream's limit, then refused by the server.
    let mut held = Vec::new();
    let refused = loop {
        let created = stream
            .create_consumer(jetstream::consumer::pull::Config {
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
            .await;
        match created {
            Ok(consumer) => held.push(consumer),
            Err(err) => break err.to_string(),
        }
        assert!(held.len() <= limit, "more than {limit} consumers");
    };
    assert!(!held.is_empty(), "no ephemeral consumer: {refused}");
    assert!(refused.contains("maximum consumers limit"), "{refused}");
}

/// A builder's key cannot change a stream: updating `BUILD_REQUESTS` with a subject transform
/// (which would turn a subject it may publish to into `build.<repo>.<target>`, a build request)
/// is refused by the server and the stream stays as it was; nor may a deployer provision.
#[tokio::test(flavor = "multi_thread")]
async fn a_builder_key_cannot_change_a_stream() {
    let fleet = SecuredFleet::start();
    let secured = &fleet.secured;
    let (builder, errors) = fleet.connect(&secured.builder_seed).await;
    a_transform_update_is_refused(&builder, &errors, "demo", "the builder").await;

    // Provisioning is the admin's: a deployer is refused, with the stream named.
    let config = secured.builder_config("provisioner", &fleet.repo);
    let path = secured.dir.join("deployer-provision.toml");
    std::fs::write(
        &path,
        config.replace("{state_dir}", &secured.dir.display().to_string()),
    )
    .expect("write");
    let output = fleet.cli(
        &secured.deployer_seed,
        &[
            "builder",
            "provision",
            "--config",
            &path.display().to_string(),
        ],
    );
    assert_eq!(output.status.code(), Some(3), "{}", text(&output).1);
    assert!(
        text(&output).1.contains("BUILD_EVENTS"),
        "{}",
        text(&output).1
    );
}

/// On a server where builders may not create streams, a builder started before provisioning
/// stops with an error naming `builder provision`; after the admin provisions, the same config
/// builds.
#[tokio::test(flavor = "multi_thread")]
async fn a_builder_needs_the_streams_provisioned() {
    let secured = SecuredNats::start();
    let repo = FixtureRepo::new("fleet");
    let name = unique("builder");
    let config = secured.builder_config(&name, &repo).replacen(
        "[builder]",
        &format!(
            "nkey_seed_file = \"{}\"\n\n[builder]",
            secured.builder_seed.display()
        ),
        1,
    );
    let early = spawn_to_failure(&name, &config);
    assert!(
        early.log().contains("stream BUILD_EVENTS is missing")
            && early
                .log()
                .contains("homelab-deploy builder provision --config FILE --nkey-file ADMIN_SEED"),
        "{}",
        early.log()
    );
    drop(early);

    let output = secured.provision(&config);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
    for line in [
        "BUILD_EVENTS: created",
        "BUILD_REQUESTS: created",
        "BUILD_BUILDERS: created",
        "BUILD_STATE: created",
        "BUILD_PLACEMENT: created",
    ] {
        assert!(text(&output).0.contains(line), "{}", text(&output).0);
    }
    // Again: nothing to create, the limits are set again.
    let output = secured.provision(&config);
    assert!(
        text(&output).0.contains("BUILD_REQUESTS: updated")
            && text(&output).0.contains("BUILD_STATE: exists"),
        "{}",
        text(&output).0
    );
    let builder = Builder::start_config(bin(), &name, &config);
    let output = secured.cli(&secured.deployer_seed, &["build", "demo", "web"]);
    assert_ok(&output, &builder);

    // A repo added to the config without provisioning again: named, with the fix.
    let added = config.clone()
        + &format!(
            "\n[repos.added]\nurl = \"{}\"\nref = \"main\"\n",
            repo.url()
        );
    let other = unique("builder");
    let late = spawn_to_failure(&other, &added.replace(&name, &other));
    assert!(
        late.log()
            .contains("stream BUILD_REQUESTS does not take build.added.*"),
        "{}",
        late.log()
    );
}

/// What a row of the permission table tries: publishing to a subject, or subscribing to one.
#[derive(Clone, Copy)]
enum Try {
    Publish(&'static str),
    Subscribe(&'static str),
}

/// The roles of `nats/prod.example.conf`, in the order of [`TABLE`]'s columns.
const ROLES: [&str; 5] = ["builder", "deployer", "servers", "admin", "viewer"];

/// The permission table of docs/security.md: each line with the roles the server must allow;
/// every other role must be refused. Payloads are `{` (not JSON), so an allowed JetStream API
/// call changes nothing.
const TABLE: &[(Try, &[&str])] = &[
    (Try::Publish("build.demo.web"), &["deployer", "admin"]),
    (
        Try::Publish("build.nixos-servers.web"),
        &["deployer", "servers", "admin"],
    ),
    (
        Try::Publish("build.api.v1.status"),
        &["deployer", "servers", "admin"],
    ),
    (
        Try::Publish("build.api.v1.cancel"),
        &["deployer", "servers", "admin"],
    ),
    (
        Try::Publish("build.api.builder.nobody.diff"),
        &["deployer", "servers", "admin"],
    ),
    (Try::Publish("build.api.builder.nobody.drain"), &["admin"]),
    (
        Try::Publish("build.api.builder.nobody.cancel"),
        &["builder", "admin"],
    ),
    (
        Try::Publish("build.responses.demo.web.PERMTEST0001.events"),
        &["builder"],
    ),
    (Try::Publish("_INBOX_admin.forged"), &[]),
    (
        Try::Publish("$JS.API.STREAM.CREATE.BUILD_EVENTS"),
        &["admin"],
    ),
    (
        Try::Publish("$JS.API.STREAM.UPDATE.BUILD_REQUESTS"),
        &["admin"],
    ),
    (Try::Publish("$JS.API.STREAM.DELETE.BUILD_EVENTS"), &[]),
    (Try::Publish("$JS.API.STREAM.PURGE.BUILD_REQUESTS"), &[]),
    (
        Try::Publish("$JS.API.STREAM.MSG.DELETE.BUILD_REQUESTS"),
        &["builder"],
    ),
    (
        Try::Publish("$JS.API.CONSUMER.CREATE.BUILD_EVENTS"),
        &["builder", "deployer", "servers", "admin", "viewer"],
    ),
    (
        Try::Publish("$JS.API.CONSUMER.CREATE.BUILD_EVENTS.named"),
        &[],
    ),
    (
        Try::Publish("$JS.API.CONSUMER.DURABLE.CREATE.BUILD_EVENTS.durable"),
        &[],
    ),
    (
        Try::Publish("$JS.API.CONSUMER.CREATE.BUILD_REQUESTS.builder-demo"),
        &["builder"],
    ),
    (
        Try::Publish("$JS.API.CONSUMER.MSG.NEXT.BUILD_REQUESTS.builder-demo"),
        &["builder"],
    ),
    (
        Try::Publish("$JS.API.CONSUMER.DELETE.BUILD_EVENTS.any"),
        &["builder"],
    ),
    (
        Try::Publish("$JS.ACK.BUILD_REQUESTS.builder-demo.1.1.1.0.0"),
        &["builder"],
    ),
    (Try::Publish("$KV.BUILD_BUILDERS.permtest"), &["builder"]),
    (Try::Publish("$KV.BUILD_STATE.PERMTEST0001"), &["builder"]),
    (Try::Publish("$KV.BUILD_PLACEMENT.permtest"), &["builder"]),
    (
        Try::Publish("$JS.API.STREAM.CREATE.KV_BUILD_PLACEMENT"),
        &["admin"],
    ),
    (
        Try::Publish("$JS.API.STREAM.INFO.BUILD_EVENTS"),
        &["builder", "deployer", "servers", "admin", "viewer"],
    ),
    (
        Try::Publish("$JS.API.DIRECT.GET.KV_BUILD_BUILDERS.$KV.BUILD_BUILDERS.x"),
        &["builder", "deployer", "servers", "admin", "viewer"],
    ),
    (
        Try::Publish("$JS.API.DIRECT.GET.KV_BUILD_STATE.$KV.BUILD_STATE.x"),
        &["builder", "deployer", "servers", "admin", "viewer"],
    ),
    (
        Try::Publish("$JS.API.STREAM.INFO.KV_BUILD_STATE"),
        &["builder", "deployer", "servers", "admin", "viewer"],
    ),
    (
        Try::Publish("$JS.API.DIRECT.GET.KV_BUILD_PLACEMENT.$KV.BUILD_PLACEMENT.x"),
        &["builder"],
    ),
    (
        Try::Publish("$JS.API.STREAM.INFO.KV_BUILD_PLACEMENT"),
        &["builder", "admin"],
    ),
    (Try::Subscribe("build.api.>"), &["builder"]),
    (Try::Subscribe("build.responses.>"), &["deployer", "admin"]),
    (
        Try::Subscribe("build.responses.nixos-servers.>"),
        &["deployer", "servers", "admin"],
    ),
    (Try::Subscribe("_INBOX.>"), &[]),
    (Try::Subscribe("_INBOX_admin.>"), &["admin"]),
    (Try::Subscribe("_INBOX_builder.>"), &["builder"]),
];

/// Every line of the permission table, tried as every role: the server refuses it to each role
/// not listed and allows it to each listed one. (What an allowed call then does is tested by the
/// tests around: builds, replies, drains, provisioning.)
#[tokio::test(flavor = "multi_thread")]
async fn every_line_of_the_permission_table_holds() {
    let secured = SecuredNats::start();
    let seeds = [
        &secured.builder_seed,
        &secured.deployer_seed,
        &secured.servers_seed,
        &secured.admin_seed,
        &secured.viewer_seed,
    ];
    let mut users = Vec::new();
    for (role, seed) in ROLES.iter().zip(seeds) {
        users.push((*role, seed.as_path(), secured.inbox_prefix(seed)));
    }
    let wrong = table_mismatches(&secured.nats.url, &users).await;
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Tries every line of [`TABLE`] as each of `users` (role, seed, inbox prefix) on the server at
/// `url`; returns each line whose answer (refused or not) differs from the table, as "ROLE was
/// refused|allowed Publish|Subscription SUBJECT".
pub(crate) async fn table_mismatches(url: &str, users: &[(&str, &Path, &str)]) -> Vec<String> {
    let mut wrong = Vec::new();
    for (role, seed, prefix) in users {
        let (client, errors) = connect_as(url, seed, prefix).await;
        let mut subscriptions = Vec::new();
        for (attempt, _) in TABLE {
            match attempt {
                Try::Publish(subject) => client.publish(*subject, "{".into()).await.expect("sent"),
                Try::Subscribe(subject) => {
                    subscriptions.push(client.subscribe(*subject).await.expect("sent"))
                }
            }
        }
        // Refused by every role: once its refusal is in, every earlier one is (the server
        // answers in order, the callback records in order).
        client
            .publish("permtest.sentinel", "{".into())
            .await
            .expect("sent");
        client.flush().await.expect("flush");
        assert!(
            refused_within(&errors, "permtest.sentinel"),
            "{role}: {}",
            violations(&errors)
        );
        let seen = violations(&errors);
        for (attempt, allowed) in TABLE {
            let (kind, subject) = match attempt {
                Try::Publish(subject) => ("Publish", subject),
                Try::Subscribe(subject) => ("Subscription", subject),
            };
            let refused = seen.contains(&format!(
                "Permissions Violation for {kind} to \"{subject}\""
            ));
            if refused == allowed.contains(role) {
                wrong.push(format!(
                    "{role} {} {kind} {subject}",
                    if refused {
                        "was refused"
                    } else {
                        "was allowed"
                    }
                ));
            }
        }
    }
    wrong
}
