//! Several tenants on one fleet, enforced by a real nats-server running the shipped
//! `nats/multi-tenant.example.conf` with freshly generated keys: each tenant's streams are
//! provisioned by the operator's admin user of its account, each tenant builds its own repos in
//! its own account and sees nothing of the other's; inside an account every role has exactly
//! its `nats/prod.example.conf` permissions; each tenant has its own queue limit, and a tenant's
//! flood does not keep the other's builds waiting.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use test_support::{
    assert_refused, example_config, nkey_generate, run_cli, unique, Builder, FixtureRepo,
    NatsServer, ServerErrors,
};

use crate::permissions::{a_transform_update_is_refused, connect_as, table_mismatches};
use crate::{bin, spawn_to_failure, text};

/// The users of each tenant account in `nats/multi-tenant.example.conf`, with the inbox prefix
/// each may subscribe to (the same in every account).
const USERS: [(&str, &str); 4] = [
    ("BUILDER", "_INBOX_builder"),
    ("ADMIN", "_INBOX_admin"),
    ("DEPLOYER", "_INBOX_deployer"),
    ("VIEWER", "_INBOX_viewer"),
];

/// nats-server running `nats/multi-tenant.example.conf` with both tenants provisioned by their
/// admin users, one builder serving both tenants, and the seeds of each tenant's deployer.
struct Tenants {
    nats: NatsServer,
    dir: PathBuf,
    alpha: PathBuf,
    beta: PathBuf,
    builder: Builder,
    builder_name: String,
    /// The builder's config, `{state_dir}` left for the harness.
    builder_config: String,
    repos: [FixtureRepo; 2],
}

impl Tenants {
    /// `builder_extra`: lines added to the `[builder]` table; `alpha_extra`: to
    /// `[tenants.alpha]`; `beta_extra`: to `[tenants.beta]`.
    fn start(builder_extra: &str, alpha_extra: &str, beta_extra: &str) -> Self {
        let dir = std::env::temp_dir().join(unique("tenants"));
        let nats = start_server(&dir);
        let seed = |name: &str| dir.join(format!("{name}.nk"));

        let repos = [FixtureRepo::new("queue"), FixtureRepo::new("queue")];
        let name = unique("builder");
        let builder_config = format!(
            "[nats]\nurl = \"{url}\"\ninbox_prefix = \"_INBOX_builder\"\n\n[builder]\nname = \"{name}\"\nstate_dir = \"{{state_dir}}\"\n{builder_extra}\n\n\
             [repos.alpha-app]\nurl = \"{alpha_repo}\"\nref = \"main\"\n\n\
             [repos.beta-app]\nurl = \"{beta_repo}\"\nref = \"main\"\n\n\
             [tenants.alpha]\nnkey_seed_file = \"{alpha_seed}\"\nrepos = [\"alpha-app\"]\n{alpha_extra}\n\n\
             [tenants.beta]\nnkey_seed_file = \"{beta_seed}\"\nrepos = [\"beta-app\"]\n{beta_extra}\n",
            url = nats.url,
            alpha_repo = repos[0].url(),
            beta_repo = repos[1].url(),
            alpha_seed = seed("ALPHA_BUILDER").display(),
            beta_seed = seed("BETA_BUILDER").display(),
        );
        for tenant in ["alpha", "beta"] {
            let output = provision(&nats.url, &dir, &builder_config, tenant);
            assert_eq!(output.status.code(), Some(0), "{:?}", text(&output));
        }
        let builder = Builder::start_config(bin(), &name, &builder_config);
        Self {
            alpha: seed("ALPHA_DEPLOYER"),
            beta: seed("BETA_DEPLOYER"),
            nats,
            dir,
            builder,
            builder_name: name,
            builder_config,
            repos,
        }
    }

    /// The seed file of `user` (`ALPHA_DEPLOYER`, `BETA_ADMIN`, …).
    fn seed(&self, user: &str) -> PathBuf {
        self.dir.join(format!("{user}.nk"))
    }

    /// `homelab-deploy ARGS` with the key of a tenant's user and that user's inbox prefix.
    fn cli(&self, seed: &Path, args: &[&str]) -> std::process::Output {
        cli(&self.nats.url, seed, args)
    }

    /// `build REPO TARGET --json` as the tenant of `seed`: the `finished` event.
    fn build(&self, seed: &Path, repo: &str, target: &str) -> Value {
        let output = self.cli(seed, &["build", repo, target, "--json"]);
        let (stdout, stderr) = text(&output);
        serde_json::from_str(stdout.trim()).unwrap_or_else(|err| {
            panic!(
                "build {repo} {target}: not JSON ({err}): {stdout}\n{stderr}\nbuilder log:\n{}",
                self.builder.log()
            )
        })
    }

    /// `build REPO TARGET --no-wait` as the tenant of `seed`: the request id.
    fn submit(&self, seed: &Path, repo: &str, target: &str) -> String {
        let output = self.cli(seed, &["build", repo, target, "--no-wait"]);
        let (stdout, stderr) = text(&output);
        assert_eq!(output.status.code(), Some(0), "{stderr}");
        stdout.trim().to_owned()
    }

    /// Waits (a minute at most) until `status ID` as the tenant of `seed` says it runs.
    fn wait_running(&self, seed: &Path, id: &str) {
        let running = test_support::wait_until(Duration::from_secs(60), || {
            let output = self.cli(seed, &["status", id, "--json"]);
            text(&output).0.contains("\"running\"")
        });
        assert!(running, "{id} never ran:\n{}", self.builder.log());
    }

    /// `watch ID --json` as the tenant of `seed`: every event of the request, up to `finished`.
    fn events(&self, seed: &Path, id: &str) -> Vec<Value> {
        let output = self.cli(seed, &["watch", id, "--json"]);
        let (stdout, stderr) = text(&output);
        let events: Vec<Value> = stdout
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect();
        assert!(
            events.iter().any(|e| e["type"] == "finished"),
            "watch {id}: {stdout}\n{stderr}"
        );
        events
    }

    /// A raw NATS connection with the key of a tenant's user and its inbox prefix, recording
    /// the server's errors (permission violations).
    async fn client(&self, seed: &Path) -> (async_nats::Client, ServerErrors) {
        connect_as(&self.nats.url, seed, inbox_prefix(seed)).await
    }
}

/// nats-server running `nats/multi-tenant.example.conf` with a fresh key for each user, its seed
/// in `dir/USER.nk` (`ALPHA_BUILDER.nk`, `BETA_ADMIN.nk`, …).
pub(crate) fn start_server(dir: &Path) -> NatsServer {
    std::fs::create_dir_all(dir).expect("dir");
    let mut config = example_config("multi-tenant.example.conf");
    for tenant in ["ALPHA", "BETA"] {
        for (role, _) in USERS {
            let user = format!("{tenant}_{role}");
            let public = nkey_generate(bin(), &dir.join(format!("{user}.nk")));
            config = config.replace(&format!("{user}_PUBLIC_KEY"), &public);
        }
    }
    assert!(
        !config.contains("_PUBLIC_KEY, permissions"),
        "a user placeholder is left"
    );
    NatsServer::start_config(&config, &dir.join("nats.conf"))
}

/// `homelab-deploy ARGS` against `url` with the key of a tenant's user and its inbox prefix.
fn cli(url: &str, seed: &Path, args: &[&str]) -> std::process::Output {
    let mut all = args.to_vec();
    let prefix = inbox_prefix(seed);
    let seed = seed.display().to_string();
    all.extend_from_slice(&["--nkey-file", &seed, "--inbox-prefix", prefix]);
    run_cli(bin(), url, &all, Duration::from_secs(120))
}

/// `homelab-deploy builder provision --tenant TENANT` of `builder_config` (its `{state_dir}`
/// filled in under `dir`) with the admin seed of that tenant's account (`dir/TENANT_ADMIN.nk`).
fn provision(url: &str, dir: &Path, builder_config: &str, tenant: &str) -> std::process::Output {
    let path = dir.join(unique("provision.toml"));
    std::fs::write(
        &path,
        builder_config.replace("{state_dir}", &dir.join("state").display().to_string()),
    )
    .expect("write builder config");
    let admin = dir.join(format!("{}_ADMIN.nk", tenant.to_uppercase()));
    cli(
        url,
        &admin,
        &[
            "builder",
            "provision",
            "--config",
            &path.display().to_string(),
            "--tenant",
            tenant,
        ],
    )
}

/// The inbox prefix of the user whose seed file is `seed` (named after its user, `ALPHA_ADMIN.nk`).
fn inbox_prefix(seed: &Path) -> &'static str {
    let name = seed
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_default();
    USERS
        .iter()
        .find(|(role, _)| name.ends_with(&format!("_{role}")))
        .map(|(_, prefix)| *prefix)
        .unwrap_or_else(|| panic!("{} is no tenant user's seed", seed.display()))
}

impl Drop for Tenants {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `time` of the request's `started` event.
fn started_at(events: &[Value]) -> time::OffsetDateTime {
    events
        .iter()
        .find(|e| e["type"] == "started")
        .and_then(|e| e["time"].as_str())
        .and_then(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        })
        .unwrap_or_else(|| panic!("no started event in {events:#?}"))
}

/// Every message that reaches `subscription` within `window`.
async fn collect(subscription: &mut async_nats::Subscriber, window: Duration) -> Vec<String> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, subscription.next()).await {
        seen.push(format!(
            "{} {}",
            message.subject,
            String::from_utf8_lossy(&message.payload)
        ));
    }
    seen
}

/// Each tenant builds its own repo with the CLI unchanged; the other tenant's build, events,
/// logs, status, list, registry entry, queue and replies are out of its reach, and it cannot
/// queue a build of the other's repo.
#[tokio::test(flavor = "multi_thread")]
async fn tenants_build_their_own_repos_and_see_nothing_of_each_other() {
    let tenants = Tenants::start("", "", "");
    let (alpha, beta) = (&tenants.alpha, &tenants.beta);

    // Alpha listens to everything its key may subscribe to while beta builds and asks.
    let (alpha_client, _) = tenants.client(alpha).await;
    let mut alpha_events = alpha_client
        .subscribe("build.responses.>")
        .await
        .expect("subscribe");
    let mut alpha_inboxes = alpha_client
        .subscribe("_INBOX_deployer.>")
        .await
        .expect("subscribe");
    alpha_client.flush().await.expect("flush");

    let finished = tenants.build(beta, "beta-app", "short");
    assert_eq!(finished["status"], "succeeded", "{finished:#}");
    let beta_id = finished["id"].as_str().expect("id").to_owned();
    let status = tenants.cli(beta, &["status", &beta_id, "--json"]);
    assert_eq!(status.status.code(), Some(0), "{}", text(&status).1);
    let logs = tenants.cli(beta, &["logs", &beta_id]);
    assert!(
        text(&logs).0.contains("short"),
        "beta reads its own logs: {:?}",
        text(&logs)
    );
    assert!(collect(&mut alpha_events, Duration::from_millis(500))
        .await
        .is_empty());
    // Alpha's deployer inbox carries nothing of beta's (beta's deployer has the same prefix, in
    // beta's account).
    let leaked: Vec<String> = collect(&mut alpha_inboxes, Duration::from_millis(100))
        .await
        .into_iter()
        .filter(|message| message.contains("beta") || message.contains(&beta_id))
        .collect();
    assert!(leaked.is_empty(), "alpha read beta's replies: {leaked:#?}");

    let finished = tenants.build(alpha, "alpha-app", "short");
    assert_eq!(finished["status"], "succeeded", "{finished:#}");
    let alpha_id = finished["id"].as_str().expect("id").to_owned();
    // Alpha's own events did reach its subscription: the silence above was isolation.
    assert!(!collect(&mut alpha_events, Duration::from_millis(500))
        .await
        .is_empty());

    // Beta's repo does not exist in alpha's account: refused at once, nothing queued.
    let output = tenants.cli(alpha, &["build", "beta-app", "short", "--no-wait"]);
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("beta-app"), "{stderr}");

    // Status and cancel of beta's request: unknown to alpha; its logs: none.
    for args in [vec!["status", &beta_id], vec!["cancel", &beta_id]] {
        let output = tenants.cli(alpha, &args);
        let (stdout, stderr) = text(&output);
        assert_ne!(
            output.status.code(),
            Some(0),
            "{args:?}: {stdout}\n{stderr}"
        );
        assert!(!stdout.contains("short"), "{args:?}: {stdout}");
    }
    let output = tenants.cli(alpha, &["logs", &beta_id]);
    assert_eq!(text(&output).0, "", "{:?}", text(&output));
    let status = tenants.cli(beta, &["status", &beta_id, "--json"]);
    assert!(
        text(&status).0.contains("succeeded"),
        "beta's build was touched: {:?}",
        text(&status)
    );
    // The lists and the fleet as each tenant sees them.
    let list = |seed: &Path| -> Value {
        let output = tenants.cli(seed, &["builds", "--json"]);
        serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|err| panic!("builds --json: {err}: {:?}", text(&output)))
    };
    let ids = |list: &Value| -> Vec<String> {
        list["builds"]
            .as_array()
            .map(|builds| {
                builds
                    .iter()
                    .filter_map(|b| b["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(ids(&list(alpha)), [alpha_id.as_str()]);
    assert_eq!(ids(&list(beta)), [beta_id.as_str()]);
    let output = tenants.cli(alpha, &["builders", "--json"]);
    let builders: Value = serde_json::from_slice(&output.stdout).expect("builders json");
    assert_eq!(
        builders["builders"][0]["repos"],
        serde_json::json!(["alpha-app"]),
        "{builders:#}"
    );

    // Draining stops the builder for every tenant: no tenant may.
    let output = tenants.cli(alpha, &["builder", "drain", &tenants.builder_name]);
    assert_ne!(output.status.code(), Some(0), "{:?}", text(&output));
    let finished = tenants.build(beta, "beta-app", "short");
    assert_eq!(finished["status"], "succeeded", "{finished:#}");

    // Alpha's raw key cannot reach into beta's streams either: there are none in its account
    // but its own, holding only its own request.
    let js = async_nats::jetstream::new(alpha_client.clone());
    let mut events = js
        .get_stream("BUILD_EVENTS")
        .await
        .expect("alpha's events stream");
    let info = events.info().await.expect("info");
    assert!(info.state.messages > 0);
    let beta_subject = format!("build.responses.beta-app.short.{beta_id}.events");
    assert!(
        events
            .get_last_raw_message_by_subject(&beta_subject)
            .await
            .is_err(),
        "beta's events are in alpha's stream"
    );
}

/// Inside a tenant's account every role has its single-account permissions, each line of the
/// permission table tried as each of the account's users (`permissions::TABLE`). The tenant's
/// builder key cannot change a stream (a subject transform on `BUILD_REQUESTS` that would queue
/// builds is refused, and the stream stays as it was) nor read another user's replies; a
/// builder whose repo the account was not provisioned for names `builder provision --tenant`.
#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_builder_key_cannot_change_streams_or_read_replies() {
    let tenants = Tenants::start("", "", "");
    let seeds: Vec<(&str, PathBuf)> = [
        ("builder", "ALPHA_BUILDER"),
        ("deployer", "ALPHA_DEPLOYER"),
        ("admin", "ALPHA_ADMIN"),
        ("viewer", "ALPHA_VIEWER"),
    ]
    .into_iter()
    .map(|(role, user)| (role, tenants.seed(user)))
    .collect();
    let users: Vec<(&str, &Path, &str)> = seeds
        .iter()
        .map(|(role, seed)| (*role, seed.as_path(), inbox_prefix(seed)))
        .collect();
    let wrong = table_mismatches(&tenants.nats.url, &users).await;
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    let (builder, errors) = tenants.client(&tenants.seed("ALPHA_BUILDER")).await;
    a_transform_update_is_refused(&builder, &errors, "alpha-app", "the tenant builder").await;

    // The builder key listens on the deployer's inbox while the deployer asks the builder:
    // refused, and the answer reaches the deployer only.
    let mut spy = builder.subscribe("_INBOX_deployer.>").await.expect("sent");
    assert_refused(&errors, "\"_INBOX_deployer.>\"");
    let (deployer, _) = tenants.client(&tenants.alpha).await;
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        deployer.request(homelab_deploy_protocol::api::BUILDERS_SUBJECT, "{}".into()),
    )
    .await
    .expect("the builder answers the deployer")
    .expect("reply");
    assert!(
        String::from_utf8_lossy(&reply.payload).contains("alpha-app"),
        "{:?}",
        reply.payload
    );
    assert!(
        collect(&mut spy, Duration::from_millis(300))
            .await
            .is_empty(),
        "the builder key read the deployer's reply"
    );

    // A repo added to alpha without provisioning alpha's account again: named, with the fix.
    let other = unique("builder");
    let added = tenants
        .builder_config
        .replace(&tenants.builder_name, &other)
        .replace(
            "repos = [\"alpha-app\"]",
            "repos = [\"alpha-app\", \"alpha-more\"]",
        )
        + &format!(
            "\n[repos.alpha-more]\nurl = \"{}\"\nref = \"main\"\n",
            tenants.repos[0].url()
        );
    let late = spawn_to_failure(&other, &added);
    assert!(
        late.log().contains(
            "stream BUILD_REQUESTS does not take build.alpha-more.* (a repo added since it was provisioned) in tenant alpha's account"
        ) && late
            .log()
            .contains("homelab-deploy builder provision --config FILE --tenant alpha --nkey-file ADMIN_SEED"),
        "{}",
        late.log()
    );
    drop(late);
    let output = provision(&tenants.nats.url, &tenants.dir, &added, "alpha");
    assert_eq!(output.status.code(), Some(0), "{:?}", text(&output));
    assert!(
        text(&output).0.contains("BUILD_REQUESTS: updated"),
        "{:?}",
        text(&output)
    );
    // A tenant config provisions one named tenant at a time.
    let path = tenants.dir.join("tenants.toml");
    std::fs::write(
        &path,
        added.replace("{state_dir}", &tenants.dir.display().to_string()),
    )
    .expect("write");
    let path = path.display().to_string();
    let admin = tenants.seed("ALPHA_ADMIN");
    for (args, needle) in [
        (vec![], "has tenants (alpha, beta)"),
        (vec!["--tenant", "gamma"], "no [tenants.gamma] table"),
    ] {
        let mut all = vec!["builder", "provision", "--config", &path];
        all.extend(args);
        let output = cli(&tenants.nats.url, &admin, &all);
        assert_eq!(output.status.code(), Some(2), "{:?}", text(&output));
        assert!(text(&output).1.contains(needle), "{:?}", text(&output));
    }
}

/// A tenant whose queue is full gets `queue_full` for itself only: the other tenant still
/// queues, and its request starts before the flooding tenant's backlog is through.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_gets_its_own_queue_full_and_does_not_starve_the_other() {
    let tenants = Tenants::start("max_concurrent_requests = 1", "max_queued = 3", "");
    let (alpha, beta) = (&tenants.alpha, &tenants.beta);
    let long = tenants.submit(alpha, "alpha-app", "long");
    tenants.wait_running(alpha, &long);
    // Alpha's queue holds three: the running request and two more.
    let first = tenants.submit(alpha, "alpha-app", "short");
    let second = tenants.submit(alpha, "alpha-app", "medium");
    let output = tenants.cli(alpha, &["build", "alpha-app", "short", "--no-wait"]);
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("queue_full"), "{stderr}");

    // Beta's queue is its own.
    let beta_request = tenants.submit(beta, "beta-app", "short");
    let cancel = tenants.cli(alpha, &["cancel", &long]);
    assert_eq!(cancel.status.code(), Some(0), "{:?}", text(&cancel));

    let beta_events = tenants.events(beta, &beta_request);
    let first_events = tenants.events(alpha, &first);
    let second_events = tenants.events(alpha, &second);
    for events in [&beta_events, &first_events, &second_events] {
        assert_eq!(
            events.last().expect("finished")["status"],
            "succeeded",
            "{events:#?}"
        );
    }
    // One slot: beta's request ran before alpha's backlog was through.
    assert!(
        started_at(&beta_events) < started_at(&second_events),
        "beta waited for alpha's whole backlog:\nbeta {}\nalpha {} then {}",
        started_at(&beta_events),
        started_at(&first_events),
        started_at(&second_events)
    );
}

/// Every role's permissions in a tenant's account are those of `nats/prod.example.conf`, so a
/// change there cannot leave the tenant config behind: `BUILDER`, `VIEWER` and the deny lists
/// are the same text; the tenant's `DEPLOYER` is prod's `TEST_DEPLOYER` and its `ADMIN` prod's
/// `ADMIN_DEPLOYER`, without the `deploy.*` subjects (the reference deployment's deploy side,
/// no part of a build tenant), and the deployer's inbox prefix is named `_INBOX_deployer`.
#[test]
fn tenant_roles_have_the_single_account_permissions() {
    let file = |name: &str| -> String {
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../..")
                .join(name),
        )
        .expect(name)
    };
    let (prod, tenants) = (
        file("nats/prod.example.conf"),
        file("nats/multi-tenant.example.conf"),
    );
    // The lines of block `name` after its first, up to its closing `}` or `]`.
    let block = |text: &str, name: &str| -> String {
        let body: Vec<&str> = text
            .lines()
            .skip_while(|line| !line.starts_with(&format!("{name} = ")))
            .skip(1)
            .take_while(|line| *line != "}" && *line != "]")
            .collect();
        assert!(body.len() > 3, "no block {name}");
        body.join("\n")
    };
    // A block without its `deploy.*` grants.
    let without_deploy = |block: String| -> String {
        block
            .lines()
            .filter(|line| !line.trim().starts_with("\"deploy."))
            .map(|line| {
                let mut line = line.to_owned();
                while let Some(start) = line.find("\"deploy.") {
                    let end = line[start + 1..]
                        .find("\", ")
                        .map(|end| start + 1 + end + 3)
                        .expect("a deploy grant in a list");
                    line.replace_range(start..end, "");
                }
                line
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    for name in ["BUILDER", "VIEWER", "DEPLOYER_DENY", "ADMIN_DENY"] {
        assert_eq!(block(&tenants, name), block(&prod, name), "{name}");
    }
    assert_eq!(
        block(&tenants, "DEPLOYER"),
        without_deploy(block(&prod, "TEST_DEPLOYER"))
            .replace("_INBOX_test_deployer", "_INBOX_deployer")
    );
    assert_eq!(
        block(&tenants, "ADMIN"),
        without_deploy(block(&prod, "ADMIN_DEPLOYER"))
    );
    // Each account has each role.
    for tenant in ["ALPHA", "BETA"] {
        for (role, _) in USERS {
            assert!(
                tenants.contains(&format!(
                    "{{ nkey: {tenant}_{role}_PUBLIC_KEY, permissions: ${role} }}"
                )),
                "{tenant}_{role}"
            );
        }
    }
}

/// With one slot and both tenants' requests waiting, a tenant of priority 3 starts three
/// requests for every one of a tenant of priority 1 (with equal priorities they alternate).
#[tokio::test(flavor = "multi_thread")]
async fn priorities_share_the_slot_between_waiting_tenants() {
    let tenants = Tenants::start("max_concurrent_requests = 1", "priority = 3", "");
    let (alpha, beta) = (&tenants.alpha, &tenants.beta);
    let long = tenants.submit(alpha, "alpha-app", "long");
    tenants.wait_running(alpha, &long);
    let mut waiting = Vec::new();
    for _ in 0..4 {
        waiting.push(("alpha", tenants.submit(alpha, "alpha-app", "short")));
        waiting.push(("beta", tenants.submit(beta, "beta-app", "short")));
    }
    let cancel = tenants.cli(alpha, &["cancel", &long]);
    assert_eq!(cancel.status.code(), Some(0), "{:?}", text(&cancel));

    let mut starts: Vec<(time::OffsetDateTime, &str)> = waiting
        .iter()
        .map(|(tenant, id)| {
            let seed = if *tenant == "alpha" { alpha } else { beta };
            let events = tenants.events(seed, id);
            assert_eq!(
                events.last().expect("finished")["status"],
                "succeeded",
                "{events:#?}"
            );
            (started_at(&events), *tenant)
        })
        .collect();
    starts.sort();
    let order: Vec<&str> = starts.iter().map(|(_, tenant)| *tenant).collect();
    assert_eq!(
        order[..4].iter().filter(|t| **t == "alpha").count(),
        3,
        "start order {order:?}"
    );
    // Beta was not left waiting for alpha's whole backlog.
    assert!(order[..4].contains(&"beta"), "start order {order:?}");
}
