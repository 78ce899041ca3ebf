//! The builder's NKey seed from Vault, as in the reference deployment: a real Vault-API server
//! (rvault) with an AppRole, the shipped policy `vault/builder-policy.hcl`, and a nats-server
//! running `nats/prod.example.conf`. Every refusal here is made by rvault or nats-server.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use test_support::{
    free_port, nkey_generate, unique, wait_until, AppRoleFiles, Builder, FixtureRepo, VaultServer,
};

use crate::permissions::SecuredNats;
use crate::{assert_ok, bin, text};

const SECRET: &str = "shared/homelab-deploy/builder-nkey";
const POLICY: &str = include_str!("../../vault/builder-policy.hcl");

struct VaultFleet {
    secured: SecuredNats,
    vault: VaultServer,
    repo: FixtureRepo,
    approle: AppRoleFiles,
    /// Everything secret: seeds, the secret id. None may show in any output.
    secrets: Vec<String>,
}

impl VaultFleet {
    /// Vault holds the builder's seed at `SECRET`; the AppRole `builder` has the shipped policy.
    async fn start() -> Self {
        let secured = SecuredNats::start();
        let vault = VaultServer::start().await;
        vault.mount_kv("shared").await;
        let seed = read(&secured.builder_seed);
        vault
            .write_secret(SECRET, json!({ "nkey_seed": seed }))
            .await;
        vault.write_policy("homelab-deploy-builder", POLICY).await;
        let approle = vault
            .approle("builder", &["homelab-deploy-builder"], &secured.dir)
            .await;
        let secrets = vec![
            seed,
            read(&secured.deployer_seed),
            approle.secret_id.clone(),
        ];
        let repo = FixtureRepo::new("fleet");
        secured.provisioned(&secured.builder_config("provisioner", &repo));
        Self {
            secured,
            vault,
            repo,
            approle,
            secrets,
        }
    }

    /// The `[vault]` table of the reference deployment, for `secret` and these AppRole files.
    fn vault_table(&self, secret: &str, approle: (&Path, &Path)) -> String {
        format!(
            "[vault]\naddress = \"{}\"\nnkey_secret = \"{secret}\"\nauth = \"approle\"\nrole_id_file = \"{}\"\nsecret_id_file = \"{}\"\n",
            self.vault.address,
            approle.0.display(),
            approle.1.display(),
        )
    }

    /// Builder config whose seed comes from Vault as `vault_table` says, plus `extra` tables.
    fn builder_config(&self, name: &str, vault_table: &str, extra: &str) -> String {
        self.secured.builder_config(name, &self.repo).replacen(
            "\n\n[repos",
            &format!("\n\n{vault_table}\n{extra}\n[repos"),
            1,
        )
    }

    /// A builder of the reference deployment; `vault_extra` adds lines to `[vault]`, `extra`
    /// adds tables.
    fn spawn_builder(&self, vault_extra: &str, extra: &str) -> Builder {
        let name = unique("builder");
        let table = self.vault_table(
            SECRET,
            (&self.approle.role_id_file, &self.approle.secret_id_file),
        ) + vault_extra;
        Builder::spawn_config(bin(), &name, &self.builder_config(&name, &table, extra))
    }

    fn build(&self) -> std::process::Output {
        self.secured.cli(
            &self.secured.deployer_seed,
            &["build", "demo", "web", "--json"],
        )
    }

    /// Fails if any secret shows in `output`.
    fn assert_no_secret(&self, what: &str, output: &str) {
        for secret in &self.secrets {
            assert!(!output.contains(secret.as_str()), "{what} shows a secret");
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .expect("read")
        .trim()
        .to_owned()
}

/// Every file under `dir`, as text (for checking the seed was not written to disk).
fn all_text_under(dir: &Path) -> String {
    let mut text = String::new();
    let mut stack: Vec<PathBuf> = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() && !path.is_symlink() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                text.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
    }
    text
}

/// The reference deployment end to end: the builder logs in with its AppRole, finds the KV
/// version of the mount itself, reads its seed, authenticates to NATS with it and builds. When
/// the seed is rotated in Vault and on the server, the builder is refused at its reconnect,
/// fetches the seed again and goes on building. The seed is never logged nor written to disk.
#[tokio::test(flavor = "multi_thread")]
async fn builder_takes_its_seed_from_vault_and_follows_a_rotation() {
    let mut fleet = VaultFleet::start().await;
    let builder = fleet.spawn_builder("", "");
    builder.wait_ready();
    let output = fleet.build();
    assert_ok(&output, &builder);

    let rotated = fleet.secured.dir.join("rotated.nk");
    nkey_generate(bin(), &rotated);
    let rotated_seed = read(&rotated);
    fleet.secrets.push(rotated_seed.clone());
    fleet
        .vault
        .write_secret(SECRET, json!({ "nkey_seed": rotated_seed }))
        .await;
    let new_public = fleet.secured.rotate_builder_key(&rotated);
    let refetched = wait_until(Duration::from_secs(40), || {
        let log = builder.log();
        log.contains("NATS refused the NKey at reconnect; fetching it again")
            && log.contains(&new_public)
            && log.matches("connected to NATS").count() >= 2
    });
    assert!(refetched, "no refetch after rotation:\n{}", builder.log());
    let output = fleet.build();
    assert_ok(&output, &builder);

    fleet.assert_no_secret("the builder log", &builder.log());
    fleet.assert_no_secret("the build output", &text(&output).0);
    fleet.assert_no_secret("the state dir", &all_text_under(&builder.state_dir()));
}

/// What goes wrong on the Vault side is named in the builder's log, with the secret's path and
/// what to do, while the builder waits in state `waiting_for_vault` (no crash loop): a missing
/// secret, a path the policy does not grant, a wrong secret id, and a field holding something
/// other than a user seed. Storing the missing secret is enough for the builder to start.
#[tokio::test(flavor = "multi_thread")]
async fn vault_refusals_are_named_and_waited_out() {
    let fleet = VaultFleet::start().await;
    let other = "shared/homelab-deploy/other-builder";
    let public = "shared/homelab-deploy/public-key";
    fleet
        .vault
        .write_secret(
            other,
            json!({ "nkey_seed": read(&fleet.secured.deployer_seed) }),
        )
        .await;
    let public_key = nkey_generate(bin(), &fleet.secured.dir.join("unused.nk"));
    fleet
        .vault
        .write_secret(public, json!({ "nkey_seed": public_key }))
        .await;
    // A second role may also read `public` and `missing`, to get past the policy to the field
    // and to the missing secret.
    let missing = "shared/homelab-deploy/missing";
    fleet
        .vault
        .write_policy(
            "read-public",
            &format!(
                "path \"{public}\" {{\n  capabilities = [\"read\"]\n}}\npath \"{missing}\" {{\n  capabilities = [\"read\"]\n}}\n"
            ),
        )
        .await;
    let public_role = fleet
        .vault
        .approle(
            "public",
            &["homelab-deploy-builder", "read-public"],
            &fleet.secured.dir,
        )
        .await;
    let wrong_secret_id = fleet.secured.dir.join("wrong.secret-id");
    std::fs::write(&wrong_secret_id, "not-the-secret-id").expect("write");

    let approle = (
        fleet.approle.role_id_file.as_path(),
        fleet.approle.secret_id_file.as_path(),
    );
    let cases = [
        (
            fleet.vault_table(
                missing,
                (&public_role.role_id_file, &public_role.secret_id_file),
            ),
            vec![missing, "HTTP 404", "no such secret"],
        ),
        (
            fleet.vault_table(other, approle),
            vec![other, "HTTP 403", "policy must allow \"read\""],
        ),
        (
            fleet.vault_table(SECRET, (approle.0, &wrong_secret_id)),
            vec!["refused the login (approle)", "invalid secret id"],
        ),
        (
            fleet.vault_table(
                public,
                (&public_role.role_id_file, &public_role.secret_id_file),
            ),
            vec![public, "holds a public key, not a user seed"],
        ),
    ];
    let mut builders = Vec::new();
    for (table, expected) in cases {
        let name = unique("builder");
        let metrics_port = free_port();
        let metrics = format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n");
        let config = fleet.builder_config(&name, &table, &metrics);
        let mut builder = Builder::spawn_config(bin(), &name, &config);
        let named = wait_until(Duration::from_secs(30), || {
            let log = builder.log();
            expected.iter().all(|expected| log.contains(expected))
                && log.contains("trying again in")
        });
        let log = builder.log();
        assert!(named, "{table}: expected {expected:?} in:\n{log}");
        assert!(builder.is_running(), "{table}: the builder exited:\n{log}");
        let metrics = crate::metrics::scrape(metrics_port);
        assert!(
            metrics.contains("homelab_deploy_builder_state{state=\"waiting_for_vault\"} 1"),
            "{table}: {metrics}"
        );
        fleet.assert_no_secret("the builder log", &log);
        builders.push(builder);
    }

    fleet
        .vault
        .write_secret(
            missing,
            json!({ "nkey_seed": read(&fleet.secured.builder_seed) }),
        )
        .await;
    let fixed = &builders[0];
    fixed.wait_ready();
    fleet.assert_no_secret("the builder log", &fixed.log());
}

/// A seed in Vault that the NATS server does not know: the builder says which public key was
/// refused and keeps trying, fetching the seed again each time; once the right seed is stored
/// in Vault it connects and builds, without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_seed_in_vault_is_reported_until_it_is_fixed() {
    let mut fleet = VaultFleet::start().await;
    let stranger = fleet.secured.dir.join("stranger.nk");
    let stranger_public = nkey_generate(bin(), &stranger);
    fleet.secrets.push(read(&stranger));
    fleet
        .vault
        .write_secret(SECRET, json!({ "nkey_seed": read(&stranger) }))
        .await;
    let mut builder = fleet.spawn_builder("kv_version = 1\n", "");
    let refused = wait_until(Duration::from_secs(30), || {
        builder.log().contains(&format!(
            "refused the NKey {stranger_public}: authorization violation"
        ))
    });
    assert!(refused, "no refusal reported:\n{}", builder.log());
    assert!(
        builder.is_running(),
        "the builder gave up:\n{}",
        builder.log()
    );

    fleet
        .vault
        .write_secret(
            SECRET,
            json!({ "nkey_seed": read(&fleet.secured.builder_seed) }),
        )
        .await;
    builder.wait_ready();
    let output = fleet.build();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
    fleet.assert_no_secret("the builder log", &builder.log());
}

/// Vault down when the builder starts: a log line per attempt naming the address, the state
/// `waiting_for_vault` and a failure count in the metrics; once Vault is back (and unsealed)
/// the builder starts and builds.
#[tokio::test(flavor = "multi_thread")]
async fn vault_down_at_start_is_waited_for() {
    let mut fleet = VaultFleet::start().await;
    fleet.vault.stop();
    let metrics_port = free_port();
    let builder = fleet.spawn_builder(
        "",
        &format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"),
    );
    let waiting = wait_until(Duration::from_secs(30), || {
        let log = builder.log();
        log.contains(&format!("vault at {} unreachable", fleet.vault.address))
            && log.contains("retrying in 2s")
    });
    assert!(waiting, "no retry reported:\n{}", builder.log());
    let metrics = crate::metrics::scrape(metrics_port);
    assert!(
        metrics.contains("homelab_deploy_builder_state{state=\"waiting_for_vault\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("homelab_deploy_vault_fetch_failures_total{reason=\"unreachable\"}"),
        "{metrics}"
    );

    fleet.vault.restart().await;
    builder.wait_ready();
    let output = fleet.build();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
    fleet.assert_no_secret("the builder log", &builder.log());
}

/// `auth = "token"`: the builder reads a Vault token from a file (kept fresh by e.g. vault-agent)
/// instead of logging in with an AppRole, and starts with the seed it reads.
#[tokio::test(flavor = "multi_thread")]
async fn token_auth_reads_the_seed() {
    let mut fleet = VaultFleet::start().await;
    let token = fleet.vault.token(&["homelab-deploy-builder"]).await;
    fleet.secrets.push(token.clone());
    let token_file = fleet.secured.dir.join("vault-token");
    std::fs::write(&token_file, &token).expect("write token");
    let name = unique("builder");
    let table = format!(
        "[vault]\naddress = \"{}\"\nnkey_secret = \"{SECRET}\"\nauth = \"token\"\ntoken_file = \"{}\"\n",
        fleet.vault.address,
        token_file.display()
    );
    let builder = Builder::spawn_config(bin(), &name, &fleet.builder_config(&name, &table, ""));
    builder.wait_ready();
    let output = fleet
        .secured
        .cli(&fleet.secured.deployer_seed, &["builders"]);
    assert!(text(&output).0.contains(&name), "{}", text(&output).0);
    fleet.assert_no_secret("the builder log", &builder.log());
}

/// Vault going away while the builder runs: the builder keeps the seed it holds and goes on
/// building; `builders` shows why its background fetches fail, and the metrics count them;
/// once Vault is back the error is gone.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_background_fetch_shows_in_builders() {
    let mut fleet = VaultFleet::start().await;
    let metrics_port = free_port();
    let builder = fleet.spawn_builder(
        "refresh_interval_secs = 1\n",
        &format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"),
    );
    builder.wait_ready();
    fleet.vault.stop();
    let vault_error = |fleet: &VaultFleet| {
        let output = fleet
            .secured
            .cli(&fleet.secured.deployer_seed, &["builders", "--json"]);
        let list: serde_json::Value = serde_json::from_str(&text(&output).0).unwrap_or_default();
        list["builders"][0]["vault_error"]
            .as_str()
            .map(str::to_owned)
    };
    let shown = wait_until(Duration::from_secs(30), || {
        vault_error(&fleet).is_some_and(|error| {
            error.contains(&format!("vault at {} unreachable", fleet.vault.address))
        })
    });
    assert!(shown, "no vault error in builders:\n{}", builder.log());
    let output = fleet
        .secured
        .cli(&fleet.secured.deployer_seed, &["builders"]);
    assert!(
        text(&output).0.contains("  vault: vault at"),
        "{}",
        text(&output).0
    );
    let metrics = crate::metrics::scrape(metrics_port);
    assert!(
        metrics.contains("homelab_deploy_vault_fetch_failures_total{reason=\"unreachable\"}"),
        "{metrics}"
    );
    let output = fleet.build();
    assert_eq!(
        output.status.code(),
        Some(0),
        "a build while Vault is down: {}",
        text(&output).1
    );

    fleet.vault.restart().await;
    let cleared = wait_until(Duration::from_secs(30), || vault_error(&fleet).is_none());
    assert!(cleared, "the vault error stayed:\n{}", builder.log());
    fleet.assert_no_secret("the builder log", &builder.log());
}
