//! NKey authentication and least-privilege permissions, enforced by a real nats-server running
//! the shipped `nats/prod.example.conf` with freshly generated keys.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use test_support::{run_cli, unique, Builder, FixtureRepo, NatsServer};

use crate::{bin, text};

/// nats-server running the shipped `nats/prod.example.conf` with fresh keys for its four users.
pub(crate) struct SecuredNats {
    pub nats: NatsServer,
    pub dir: PathBuf,
    config_path: PathBuf,
    pub builder_seed: PathBuf,
    pub deployer_seed: PathBuf,
    /// The read-only `VIEWER` user (the dashboard).
    pub viewer_seed: PathBuf,
    pub admin_seed: PathBuf,
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
        let template = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../nats/prod.example.conf"),
        )
        .expect("nats/prod.example.conf");
        let builder_public = generate(&builder_seed);
        // The harness gives the store dir and port on the command line.
        let config = template
            .replace("store_dir: \"/var/lib/nats/jetstream\"", "")
            .replace("BUILDER_PUBLIC_KEY", &builder_public)
            .replace("TEST_DEPLOYER_PUBLIC_KEY", &generate(&deployer_seed))
            .replace("ADMIN_DEPLOYER_PUBLIC_KEY", &generate(&admin_seed))
            .replace("VIEWER_PUBLIC_KEY", &generate(&viewer_seed));
        let config_path = dir.join("nats.conf");
        std::fs::write(&config_path, config).expect("write nats config");
        let nats = NatsServer::start_with(&["-c", &config_path.display().to_string()]);
        Self {
            nats,
            dir,
            config_path,
            builder_seed,
            deployer_seed,
            viewer_seed,
            admin_seed,
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
        } else {
            panic!("{} is none of the configured users' seeds", seed.display())
        }
    }

    /// Makes `seed_file` the builder's only key: rewrites the server config and reloads it
    /// (SIGHUP), which closes connections made with the old key.
    pub fn rotate_builder_key(&mut self, seed_file: &Path) -> String {
        let new_public = public_key(seed_file);
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
    _repo: FixtureRepo,
    builder: Option<Builder>,
}

/// `homelab-deploy nkey generate --out FILE`: the public key it prints.
pub(crate) fn generate(path: &Path) -> String {
    let output = Command::new(bin())
        .args(["nkey", "generate", "--out"])
        .arg(path)
        .output()
        .expect("nkey generate");
    assert!(output.status.success(), "{}", text(&output).1);
    text(&output).0.trim().to_owned()
}

/// `homelab-deploy nkey public --seed-file FILE`.
pub(crate) fn public_key(seed: &Path) -> String {
    let output = Command::new(bin())
        .args(["nkey", "public", "--seed-file"])
        .arg(seed)
        .output()
        .expect("nkey public");
    assert!(output.status.success(), "{}", text(&output).1);
    text(&output).0.trim().to_owned()
}

impl SecuredFleet {
    fn start() -> Self {
        let secured = SecuredNats::start();
        let repo = FixtureRepo::new("fleet");
        let name = unique("builder");
        let builder_config = secured.builder_config(&name, &repo).replacen(
            "[builder]",
            &format!(
                "nkey_seed_file = \"{}\"\n\n[builder]",
                secured.builder_seed.display()
            ),
            1,
        );
        let builder = Builder::start_config(bin(), &name, &builder_config);
        Self {
            secured,
            _repo: repo,
            builder: Some(builder),
        }
    }

    /// A connection as the user of `seed` with its inbox prefix, recording the server's errors
    /// (permission violations).
    async fn connect(&self, seed: &Path) -> (async_nats::Client, Arc<Mutex<Vec<String>>>) {
        let prefix = self.secured.inbox_prefix(seed);
        self.connect_with_prefix(seed, prefix).await
    }

    /// Like [`SecuredFleet::connect`], with any inbox prefix.
    async fn connect_with_prefix(
        &self,
        seed: &Path,
        prefix: &str,
    ) -> (async_nats::Client, Arc<Mutex<Vec<String>>>) {
        let seed = homelab_deploy_credentials::read_seed_file(seed).expect("seed");
        let errors = Arc::new(Mutex::new(Vec::new()));
        let recorded = errors.clone();
        let client = async_nats::ConnectOptions::with_nkey_seed_for_tests(seed)
            .custom_inbox_prefix(prefix)
            .event_callback(move |event| {
                let recorded = recorded.clone();
                async move {
                    recorded
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(event.to_string());
                }
            })
            .connect(&self.secured.nats.url)
            .await
            .expect("connect with nkey");
        (client, errors)
    }

    fn cli(&self, seed: &Path, args: &[&str]) -> std::process::Output {
        self.secured.cli(seed, args)
    }
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

fn violations(errors: &Arc<Mutex<Vec<String>>>) -> String {
    errors.lock().unwrap_or_else(|p| p.into_inner()).join("\n")
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
    let public = generate(&seed);
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
    generate(&rotated);
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
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}\nbuilder:\n{}",
        text(&output).1,
        builder.log()
    );
}

/// Waits (10 s at most) until the server reported a permissions violation naming `needle`.
fn refused_within(errors: &Arc<Mutex<Vec<String>>>, needle: &str) -> bool {
    test_support::wait_until(Duration::from_secs(10), || {
        errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|e| e.contains("Permissions Violation") && e.contains(needle))
    })
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
    assert!(
        refused_within(&deployer_errors, "\"_INBOX.>\""),
        "{}",
        violations(&deployer_errors)
    );
    assert!(
        refused_within(&deployer_errors, "\"_INBOX_admin.>\""),
        "{}",
        violations(&deployer_errors)
    );
    assert!(
        refused_within(&viewer_errors, "\"_INBOX_test_deployer.>\""),
        "{}",
        violations(&viewer_errors)
    );

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
    assert!(
        refused_within(&builder_errors, "_INBOX_admin.forged"),
        "{}",
        violations(&builder_errors)
    );

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
