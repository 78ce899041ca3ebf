//! Several tenants on one fleet, enforced by a real nats-server running the shipped
//! `nats/multi-tenant.example.conf` with freshly generated keys: each tenant builds its own
//! repos in its own account and sees nothing of the other's; each has its own queue limit, and a
//! tenant's flood does not keep the other's builds waiting.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use test_support::{run_cli, unique, Builder, FixtureRepo, NatsServer};

use crate::permissions::generate;
use crate::{bin, text};

/// nats-server running `nats/multi-tenant.example.conf`, one builder serving both tenants, and
/// the seeds of each tenant's deployer.
struct Tenants {
    nats: NatsServer,
    dir: PathBuf,
    alpha: PathBuf,
    beta: PathBuf,
    builder: Builder,
    builder_name: String,
    _repos: [FixtureRepo; 2],
}

impl Tenants {
    /// `builder_extra`: lines added to the `[builder]` table; `alpha_extra`: to
    /// `[tenants.alpha]`; `beta_extra`: to `[tenants.beta]`.
    fn start(builder_extra: &str, alpha_extra: &str, beta_extra: &str) -> Self {
        let dir = std::env::temp_dir().join(unique("tenants"));
        std::fs::create_dir_all(&dir).expect("dir");
        let seed = |name: &str| dir.join(format!("{name}.nk"));
        let template = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../nats/multi-tenant.example.conf"),
        )
        .expect("nats/multi-tenant.example.conf");
        let mut config = template.replace("store_dir: \"/var/lib/nats/jetstream\"", "");
        for user in [
            "ALPHA_BUILDER",
            "ALPHA_DEPLOYER",
            "BETA_BUILDER",
            "BETA_DEPLOYER",
        ] {
            let public = generate(&seed(user));
            config = config.replace(&format!("{user}_PUBLIC_KEY"), &public);
        }
        assert!(
            !config.contains("_PUBLIC_KEY, permissions"),
            "a user placeholder is left"
        );
        let config_path = dir.join("nats.conf");
        std::fs::write(&config_path, config).expect("write nats config");
        let nats = NatsServer::start_with(&["-c", &config_path.display().to_string()]);

        let repos = [FixtureRepo::new("queue"), FixtureRepo::new("queue")];
        let name = unique("builder");
        let builder_config = format!(
            "[nats]\nurl = \"{url}\"\n\n[builder]\nname = \"{name}\"\nstate_dir = \"{{state_dir}}\"\n{builder_extra}\n\n\
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
        let builder = Builder::start_config(bin(), &name, &builder_config);
        Self {
            alpha: seed("ALPHA_DEPLOYER"),
            beta: seed("BETA_DEPLOYER"),
            nats,
            dir,
            builder,
            builder_name: name,
            _repos: repos,
        }
    }

    /// `homelab-deploy ARGS` with a tenant deployer's key.
    fn cli(&self, seed: &Path, args: &[&str]) -> std::process::Output {
        let mut all = args.to_vec();
        let seed = seed.display().to_string();
        all.extend_from_slice(&["--nkey-file", &seed]);
        run_cli(bin(), &self.nats.url, &all, Duration::from_secs(120))
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

    /// A raw NATS connection with a tenant deployer's key.
    async fn client(&self, seed: &Path) -> async_nats::Client {
        let seed = std::fs::read_to_string(seed).expect("seed");
        async_nats::ConnectOptions::with_nkey(seed.trim().to_owned())
            .connect(&self.nats.url)
            .await
            .expect("connect with a tenant's key")
    }
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
    let alpha_client = tenants.client(alpha).await;
    let mut alpha_events = alpha_client
        .subscribe("build.responses.>")
        .await
        .expect("subscribe");
    let mut alpha_inboxes = alpha_client.subscribe("_INBOX.>").await.expect("subscribe");
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
    // Alpha's inboxes carry its own account's traffic (the builder's JetStream calls there), but
    // nothing of beta's.
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

/// A tenant whose queue is full gets `queue_full` for itself only: the other tenant still
/// queues, and its request starts before the flooding tenant's backlog is through.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_gets_its_own_queue_full_and_does_not_starve_the_other() {
    let tenants = Tenants::start("max_concurrent_requests = 1", "max_queued = 3", "");
    let (alpha, beta) = (&tenants.alpha, &tenants.beta);
    let long = tenants.submit(alpha, "alpha-app", "long");
    let running = test_support::wait_until(Duration::from_secs(60), || {
        let output = tenants.cli(alpha, &["status", &long, "--json"]);
        text(&output).0.contains("\"running\"")
    });
    assert!(
        running,
        "alpha's long build never ran:\n{}",
        tenants.builder.log()
    );
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

/// The builder's permissions in a tenant's account are exactly those of `BUILDER` in
/// `nats/prod.example.conf`, so a change there cannot leave the tenant config behind.
#[test]
fn tenant_builder_permissions_match_the_single_account_ones() {
    let block = |file: &str| -> String {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../..")
                .join(file),
        )
        .expect(file);
        text.lines()
            .skip_while(|line| !line.starts_with("BUILDER = {"))
            .take_while(|line| *line != "}")
            .collect::<Vec<_>>()
            .join("\n")
    };
    let single = block("nats/prod.example.conf");
    assert!(single.contains("build.responses.>"), "{single}");
    let tenant = block("nats/multi-tenant.example.conf");
    // The subjects of every quoted grant in a block.
    let grants = |block: &str| -> std::collections::BTreeSet<String> {
        block
            .split('"')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    };
    let (single, tenant_grants) = (grants(&single), grants(&tenant));
    // A tenant builder creates its streams in the tenant's account (no per-tenant admin
    // provisions them) and uses the default inbox prefix; nothing else may differ.
    let tenant_only: std::collections::BTreeSet<String> = [
        "_INBOX.>",
        "$JS.API.STREAM.CREATE.BUILD_REQUESTS",
        "$JS.API.STREAM.CREATE.BUILD_EVENTS",
        "$JS.API.STREAM.CREATE.KV_BUILD_BUILDERS",
        "$JS.API.STREAM.CREATE.KV_BUILD_STATE",
        "$JS.API.STREAM.CREATE.KV_BUILD_PLACEMENT",
        "$JS.API.STREAM.UPDATE.BUILD_REQUESTS",
        "$JS.API.CONSUMER.CREATE.BUILD_EVENTS.>",
        "$JS.API.CONSUMER.CREATE.KV_BUILD_BUILDERS.>",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    let single_only: std::collections::BTreeSet<String> = ["_INBOX_builder.>"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    let extra: std::collections::BTreeSet<_> = tenant_grants.difference(&single).cloned().collect();
    let missing: std::collections::BTreeSet<_> =
        single.difference(&tenant_grants).cloned().collect();
    assert!(
        extra.is_subset(&tenant_only),
        "the tenant builder has grants prod's has not: {:?}",
        extra.difference(&tenant_only).collect::<Vec<_>>()
    );
    assert_eq!(
        missing, single_only,
        "the tenant builder lacks grants prod's has"
    );
}

/// With one slot and both tenants' requests waiting, a tenant of priority 3 starts three
/// requests for every one of a tenant of priority 1 (with equal priorities they alternate).
#[tokio::test(flavor = "multi_thread")]
async fn priorities_share_the_slot_between_waiting_tenants() {
    let tenants = Tenants::start("max_concurrent_requests = 1", "priority = 3", "");
    let (alpha, beta) = (&tenants.alpha, &tenants.beta);
    let long = tenants.submit(alpha, "alpha-app", "long");
    let running = test_support::wait_until(Duration::from_secs(60), || {
        let output = tenants.cli(alpha, &["status", &long, "--json"]);
        text(&output).0.contains("\"running\"")
    });
    assert!(
        running,
        "alpha's long build never ran:\n{}",
        tenants.builder.log()
    );
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
