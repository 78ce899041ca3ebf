//! Signed identity: who requested or cancelled a build comes from the NKey that signed the
//! message, checked by the builder against its `[access]` table, never from a JSON field.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::HeaderMap;
use homelab_deploy_protocol::identity::{
    encode_signature, signing_input, Purpose, KEY_HEADER, SIGNATURE_HEADER,
};
use homelab_deploy_protocol::{RepoName, Target};
use serde_json::{json, Value};
use test_support::{
    nkey_generate, run_cli, stored_messages, unique, wait_for_finished, Builder, FixtureRepo,
    NatsServer,
};

use crate::{bin, text};

/// A server, the `queue` fixture served as `demo` and as `other`, a builder that requires
/// signatures, and four seeds: alice (deployer of `demo` only), bob (deployer), root (admin)
/// and stranger (not listed).
struct Signed {
    nats: NatsServer,
    _repo: FixtureRepo,
    builder: Builder,
    dir: tempfile::TempDir,
    keys: Vec<(String, String)>,
}

impl Signed {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut keys = Vec::new();
        for name in ["alice", "bob", "root", "stranger"] {
            keys.push((
                name.to_owned(),
                nkey_generate(bin(), &dir.path().join(name)),
            ));
        }
        let key = |name: &str| {
            keys.iter()
                .find(|(n, _)| n == name)
                .map(|(_, k)| k.clone())
                .expect("key")
        };
        let access = format!(
            "\n[access]\nrequire_signed = true\n\
             [access.users.alice]\nkey = \"{}\"\nrepos = [\"demo\"]\n\
             [access.users.bob]\nkey = \"{}\"\nrole = \"deployer\"\n\
             [access.users.root]\nkey = \"{}\"\nrole = \"admin\"\n",
            key("alice"),
            key("bob"),
            key("root")
        );
        let nats = NatsServer::start();
        let repo = FixtureRepo::new("queue");
        let builder = Builder::start_with(
            bin(),
            &nats.url,
            &[("demo", repo.url()), ("other", repo.url())],
            &access,
        );
        Self {
            nats,
            _repo: repo,
            builder,
            dir,
            keys,
        }
    }

    fn seed(&self, user: &str) -> PathBuf {
        self.dir.path().join(user)
    }

    fn key(&self, user: &str) -> &str {
        self.keys
            .iter()
            .find(|(name, _)| name == user)
            .map(|(_, key)| key.as_str())
            .expect("known user")
    }

    /// `homelab-deploy ARGS --nkey-file <user's seed>`.
    fn cli_as(&self, user: &str, args: &[&str]) -> std::process::Output {
        let seed = self.seed(user).display().to_string();
        let mut all = args.to_vec();
        all.extend_from_slice(&["--nkey-file", &seed]);
        run_cli(bin(), &self.nats.url, &all, Duration::from_secs(120))
    }

    /// `build REPO TARGET --no-wait` as `user`: the request id.
    fn submit_as(&self, user: &str, repo: &str, target: &str) -> String {
        let output = self.cli_as(user, &["build", repo, target, "--no-wait"]);
        assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
        text(&output).0.trim().to_owned()
    }

    async fn finished(&self, id: &str) -> Value {
        let client = self.nats.client().await;
        let events = wait_for_finished(&client, &format!("build.responses.*.*.{id}.events")).await;
        events.last().cloned().expect("finished")
    }

    async fn wait_host_started(&self, id: &str) {
        let client = self.nats.client().await;
        let subject = format!("build.responses.*.*.{id}.events");
        for _ in 0..600 {
            let events = stored_messages(&client, &subject).await;
            if events.iter().any(|e| e["type"] == "host_started") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("request {id} never started a host\n{}", self.builder.log());
    }

    /// Publishes a build request with these headers, as any NATS client could.
    async fn publish_raw(&self, target: &str, id: &str, body: &[u8], mut headers: HeaderMap) {
        let client = self.nats.client().await;
        headers.insert("Nats-Msg-Id", id);
        let js = async_nats::jetstream::new(client);
        js.publish_with_headers(
            format!("build.demo.{target}"),
            headers,
            body.to_vec().into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
    }
}

/// `user`'s signature headers over `payload` for `purpose`, naming `claimed` as the key.
fn signed_headers(seed: &Path, claimed: &str, purpose: Purpose<'_>, payload: &[u8]) -> HeaderMap {
    let seed = homelab_deploy_credentials::read_seed_file(seed).expect("seed");
    let signature = seed.sign(&signing_input(purpose, payload)).expect("signs");
    let mut headers = HeaderMap::new();
    headers.insert(KEY_HEADER, claimed);
    headers.insert(SIGNATURE_HEADER, encode_signature(&signature).as_str());
    headers
}

fn identity_name(value: &Value) -> &str {
    value["name"].as_str().unwrap_or("")
}

/// A signed request shows its verified signer; unsigned, forged, unlisted and out-of-repo
/// requests end with a `finished` error that says why; a deployer cannot cancel another
/// user's build (queued or running, nor by claiming `requested_by: admin@boss`), while the
/// owner and an admin can, and the events name who did it.
#[tokio::test(flavor = "multi_thread")]
async fn identity_comes_from_the_signature() {
    let fleet = Signed::start();

    // Cancels: alice's running and queued builds.
    let running = fleet.submit_as("alice", "demo", "long");
    fleet.wait_host_started(&running).await;
    let queued = fleet.submit_as("alice", "demo", "short");
    for id in [&queued, &running] {
        let output = fleet.cli_as("bob", &["cancel", id, "--reason", "mine now"]);
        assert_ne!(output.status.code(), Some(0), "bob cancelled alice's {id}");
        assert!(
            text(&output).1.contains("may cancel only its own builds"),
            "{}",
            text(&output).1
        );
    }
    let client = fleet.nats.client().await;
    let forged_cancel = json!({"id": running, "requested_by": "admin@boss"}).to_string();
    let reply = client
        .request("build.api.v1.cancel", forged_cancel.clone().into())
        .await
        .expect("answered");
    let reply: Value = serde_json::from_slice(&reply.payload).expect("json");
    assert_eq!(reply["code"], "forbidden", "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .is_some_and(|e| e.contains("not signed")),
        "{reply}"
    );
    // bob's signature with root's key: refused, not taken for root.
    let headers = signed_headers(
        &fleet.seed("bob"),
        fleet.key("root"),
        Purpose::Cancel,
        forged_cancel.as_bytes(),
    );
    let reply = client
        .request_with_headers("build.api.v1.cancel", headers, forged_cancel.into())
        .await
        .expect("answered");
    let reply: Value = serde_json::from_slice(&reply.payload).expect("json");
    assert_eq!(reply["code"], "forbidden", "{reply}");

    let output = fleet.cli_as("alice", &["cancel", &queued, "--reason", "not needed"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
    let finished = fleet.finished(&queued).await;
    assert_eq!(finished["status"], "cancelled", "{finished:#}");
    assert_eq!(identity_name(&finished["cancelled_by_key"]), "alice");
    assert_eq!(finished["cancelled_by_key"]["key"], fleet.key("alice"));

    let output = fleet.cli_as("root", &["cancel", &running, "--reason", "maintenance"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
    let finished = fleet.finished(&running).await;
    assert_eq!(finished["status"], "cancelled", "{finished:#}");
    assert_eq!(identity_name(&finished["cancelled_by_key"]), "root");
    assert_eq!(identity_name(&finished["requested_by_key"]), "alice");
    assert!(
        finished["error"]
            .as_str()
            .is_some_and(|e| e.contains("root")),
        "{finished:#}"
    );

    // A signed build: the verified signer next to the free-text note.
    let output = fleet.cli_as("alice", &["build", "demo", "short", "--json"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
    let finished: Value = serde_json::from_str(text(&output).0.trim()).expect("json");
    assert_eq!(identity_name(&finished["requested_by_key"]), "alice");
    assert_eq!(finished["requested_by_key"]["key"], fleet.key("alice"));
    let id = finished["id"].as_str().expect("id").to_owned();
    let client = fleet.nats.client().await;
    let started = stored_messages(&client, &format!("build.responses.demo.short.{id}.events"))
        .await
        .into_iter()
        .find(|e| e["type"] == "started")
        .expect("started");
    assert_eq!(identity_name(&started["requested_by_key"]), "alice");
    let output = fleet.cli_as("bob", &["status", &id, "--json"]);
    let state: Value = serde_json::from_slice(&output.stdout).expect("status json");
    assert_eq!(
        identity_name(&state["requested_by_key"]),
        "alice",
        "{state:#}"
    );

    // Refused, each with a finished event that says why.
    let output = fleet.cli_as("alice", &["build", "other", "short", "--json"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output).1);
    let finished: Value = serde_json::from_str(text(&output).0.trim()).expect("json");
    assert!(
        finished["error"]
            .as_str()
            .is_some_and(|e| e.contains("may build only demo")),
        "{finished:#}"
    );
    let output = fleet.cli_as("stranger", &["build", "demo", "short", "--json"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output).1);
    let finished: Value = serde_json::from_str(text(&output).0.trim()).expect("json");
    assert!(
        finished["error"]
            .as_str()
            .is_some_and(|e| e.contains("not a user in the builder's [access] table")),
        "{finished:#}"
    );

    let unsigned = unique("UNSIGNED");
    let body = json!({"id": unsigned, "requested_by": "admin@boss"}).to_string();
    fleet
        .publish_raw("short", &unsigned, body.as_bytes(), HeaderMap::new())
        .await;
    let finished = fleet.finished(&unsigned).await;
    assert_eq!(finished["status"], "failed");
    assert!(
        finished["error"]
            .as_str()
            .is_some_and(|e| e.contains("not signed")),
        "{finished:#}"
    );
    assert!(finished.get("requested_by_key").is_none(), "{finished:#}");

    // bob signs but claims root's key.
    let forged = unique("FORGED");
    let body = json!({"id": forged, "requested_by": "root"}).to_string();
    let (demo, short) = (
        RepoName::parse("demo").expect("repo"),
        Target::parse("short").expect("target"),
    );
    let headers = signed_headers(
        &fleet.seed("bob"),
        fleet.key("root"),
        Purpose::Build {
            repo: &demo,
            target: &short,
        },
        body.as_bytes(),
    );
    fleet
        .publish_raw("short", &forged, body.as_bytes(), headers)
        .await;
    let finished = fleet.finished(&forged).await;
    assert_eq!(finished["status"], "failed");
    assert!(
        finished["error"]
            .as_str()
            .is_some_and(|e| e.contains("does not match")),
        "{finished:#}"
    );
}
