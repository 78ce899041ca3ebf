//! The NixOS modules, evaluated with the real module system (nixpkgs' `lib`, from
//! `../shared/nixpkgs-lib`) and the stubs in `tests/nixos/`; what they generate is read back by
//! the real binary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use test_support::{run_cli, NIX_CONFIG};

use crate::{bin, text, Setup};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn nixpkgs_lib() -> PathBuf {
    let lib = repo_root().join("../shared/nixpkgs-lib/lib");
    assert!(
        lib.join("default.nix").exists(),
        "nixpkgs' lib not found at {}: the module tests need ../shared/nixpkgs-lib next to the repo",
        lib.display()
    );
    lib
}

/// Evaluates the modules with `config` (Nix code of a module); Ok(summary) or Err(nix's error).
fn evaluate(config: &str) -> Result<Value, String> {
    eval_json(&format!(
        "import {}/tests/nixos/eval.nix {{ libPath = {}; config = {config}; }}",
        repo_root().display(),
        nixpkgs_lib().display()
    ))
}

/// [`evaluate`], which nix must accept: the summary.
fn evaluated(config: &str) -> Value {
    evaluate(config).unwrap_or_else(|err| panic!("{err}"))
}

/// [`evaluated`], with no failed assertion.
fn rendered(config: &str) -> Value {
    let summary = evaluated(config);
    assert_eq!(summary["failedAssertions"], serde_json::json!([]));
    summary
}

/// The modules evaluate `config`, and one of their assertions fails with `message`.
fn assert_refused(config: &str, message: &str) {
    let summary = evaluated(config);
    assert!(
        summary["failedAssertions"].to_string().contains(message),
        "{}",
        summary["failedAssertions"]
    );
}

/// The builder config file `summary` names, and its text.
fn builder_config(summary: &Value) -> (&str, String) {
    let file = summary["builderConfigFile"].as_str().expect("config file");
    (
        file,
        std::fs::read_to_string(file).expect("rendered config"),
    )
}

/// `homelab-deploy builder --check` accepts the rendered `file` (its text `config`).
fn assert_checked(file: &str, config: &str) {
    let check = Command::new(bin())
        .args(["builder", "--check", "--config", file])
        .output()
        .expect("check");
    assert!(check.status.success(), "{}\n{config}", text(&check).1);
}

/// Every one of `expected` is in the rendered `config`.
fn assert_contains_all(config: &str, expected: &[&str]) {
    for expected in expected {
        assert!(
            config.contains(expected),
            "{expected} missing from:\n{config}"
        );
    }
}

/// The arguments of a rendered `ExecStart` command line after the binary, unquoted.
fn exec_args(exec: &str) -> Vec<String> {
    exec.split_whitespace()
        .skip(1)
        .map(|a| a.trim_matches('\'').to_owned())
        .collect()
}

/// [`exec_args`] of a provision command line, with its admin seed credential (`%d/…`) replaced
/// by the `seed` file the test holds.
fn provision_args(exec: &str, credential: &str, seed: &Path) -> Vec<String> {
    let seed = seed.display().to_string();
    exec_args(exec)
        .iter()
        .map(|a| a.replace(credential, &seed))
        .collect()
}

/// The provision command line `args` (rendered as `exec`), run with the real binary, creates
/// the streams.
fn assert_provisions(args: &[String], exec: &str) {
    let output = Command::new(bin())
        .args(args)
        .env_remove("HOMELAB_DEPLOY_NATS_URL")
        .output()
        .expect("provision");
    assert_eq!(output.status.code(), Some(0), "{}\n{exec}", text(&output).1);
    assert!(
        text(&output).0.contains("BUILD_REQUESTS: created"),
        "{}",
        text(&output).0
    );
}

/// `nix eval --json` of an expression: Ok(value) or Err(nix's error).
fn eval_json(expr: &str) -> Result<Value, String> {
    let output = Command::new("nix")
        .args(["eval", "--impure", "--json", "--expr", expr])
        .env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .expect("run nix eval");
    if output.status.success() {
        Ok(serde_json::from_slice(&output.stdout).expect("nix eval printed JSON"))
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// Where systemd puts the builder's credentials (LoadCredential).
const CREDENTIALS: &str = "/run/credentials/homelab-deploy-builder.service";

/// The builder's config renders to TOML that `homelab-deploy builder --check` accepts, with
/// every setting; the service is hardened, reports readiness (`Type=notify`), survives the
/// kernel killing an evaluation, needs nix-daemon's socket, gets its seed as a credential and
/// stops in seconds (handing requests back) rather than draining.
#[test]
fn builder_module_renders_a_config_the_binary_accepts() {
    let summary = rendered(
        r#"{
          services.homelab-deploy.builder = {
            enable = true;
            repos.nixos-servers = { url = "git+https://git.example.org/torjus/nixos-servers.git"; ref = "master"; };
            natsUrl = "nats://nats1:4222,nats://nats2:4222";
            nkeySeedFile = "/run/secrets/builder-nkey";
            settings.builder.build_jobs = 2;
            settings.builder.memory_mb = 65536;
            settings.builder.warm_affinity = false;
            settings.builder.lanes = { standard = 8192; heavy = 65536; };
            settings.nats.inbox_prefix = "_INBOX_builder";
            settings.streams.replicas = 3;
            settings.repos.nixos-servers.push_to = "file:///var/cache/nix";
            settings.repos.nixos-servers.impure = true;
            settings.repos.nixos-servers.expected_peak_mb = { big-host = 24576; };
            settings.repos.nixos-servers.nix_options = { cores = 4; extra-substituters = [ "https://a.example" "https://b.example" ]; };
            metrics = { enable = true; openFirewall = true; };
            settings.access = {
              require_signed = true;
              users.alice = { key = "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4"; repos = [ "nixos-servers" ]; };
              users.ops = { key = "UCUUZBTCYOLVUNDEPXOKCNYYT4A22MQGFSRJIG5RPYWWRBIG37X6FSWT"; role = "admin"; };
            };
          };
        }"#,
    );
    let (file, config) = builder_config(&summary);
    let seed = format!("nkey_seed_file = \"{CREDENTIALS}/nkey-seed\"");
    assert_contains_all(
        &config,
        &[
            seed.as_str(),
            "url = \"nats://nats1:4222,nats://nats2:4222\"",
            "replicas = 3",
            "inbox_prefix = \"_INBOX_builder\"",
            "build_jobs = 2",
            "memory_mb = 65536",
            "warm_affinity = false",
            "[builder.lanes]",
            "heavy = 65536",
            "[repos.nixos-servers.expected_peak_mb]",
            "big-host = 24576",
            "[repos.nixos-servers]",
            "ref = \"master\"",
            "push_to = \"file:///var/cache/nix\"",
            "impure = true",
            "[repos.nixos-servers.nix_options]",
            "cores = 4",
            "[metrics]",
            "listen = \"0.0.0.0:9973\"",
            "require_signed = true",
            "[access.users.alice]",
            "repos = [ \"nixos-servers\" ]",
            "role = \"admin\"",
        ],
    );
    assert_checked(file, &config);

    let service = &summary["services"]["homelab-deploy-builder"];
    let unit = &service["serviceConfig"];
    assert_eq!(
        unit["ExecStart"]
            .as_str()
            .map(|s| s.ends_with(&format!("builder --config {file}"))),
        Some(true)
    );
    assert_eq!(unit["User"], "homelab-deploy");
    assert_eq!(unit["NoNewPrivileges"], true);
    assert_eq!(unit["ProtectSystem"], "strict");
    assert_eq!(unit["Restart"], "on-failure");
    assert_eq!(unit["KillMode"], "mixed");
    assert_eq!(unit["TimeoutStopSec"], 30);
    assert_eq!(unit["Type"], "notify");
    assert_eq!(unit["OOMPolicy"], "continue");
    assert_eq!(
        unit["LoadCredential"],
        serde_json::json!(["nkey-seed:/run/secrets/builder-nkey"])
    );
    assert_eq!(
        service["requires"],
        serde_json::json!(["nix-daemon.socket"])
    );
    assert!(service["restartTriggers"][0]
        .as_str()
        .is_some_and(|trigger| trigger == file));
    assert_eq!(
        summary["paths"]["homelab-deploy-builder-credentials"]["pathConfig"]["PathChanged"],
        serde_json::json!(["/run/secrets/builder-nkey"])
    );
    assert_eq!(
        summary["nixSettings"]["extra-allowed-users"],
        serde_json::json!(["homelab-deploy"])
    );
    assert_eq!(summary["packages"]["builder"], "homelab-deploy");
    assert_eq!(unit["StateDirectory"], "homelab-deploy");
    // The file:// binary cache is written from inside the service (ProtectSystem=strict).
    assert_eq!(
        unit["ReadWritePaths"],
        serde_json::json!(["/var/lib/homelab-deploy", "/var/cache/nix"])
    );
    for package in ["-nix", "-git", "-openssh"] {
        assert!(
            service["path"].as_array().is_some_and(|p| p
                .iter()
                .any(|p| p.as_str().is_some_and(|p| p.ends_with(package)))),
            "{package} not in {}",
            service["path"]
        );
    }
    assert_eq!(summary["users"]["homelab-deploy"]["isSystemUser"], true);
    assert_eq!(summary["firewall"], serde_json::json!([9973]));
}

/// The reference deployment's Vault setup: `vault.address` and the AppRole files render a
/// `[vault]` table the binary accepts; a seed file and Vault together, or AppRole without its
/// files, are assertion failures.
#[test]
fn builder_module_takes_the_seed_from_vault() {
    let summary = rendered(
        r#"{
          services.homelab-deploy.builder = {
            enable = true;
            repos.nixos-servers.url = "git+https://git.example.org/torjus/nixos-servers.git";
            vault = {
              address = "https://vault.example.org:8200";
              roleIdFile = "/run/secrets/homelab-deploy/role-id";
              secretIdFile = "/run/secrets/homelab-deploy/secret-id";
            };
            settings.vault.kv_version = 2;
          };
        }"#,
    );
    let (file, config) = builder_config(&summary);
    let role_id = format!("role_id_file = \"{CREDENTIALS}/vault-role-id\"");
    let secret_id = format!("secret_id_file = \"{CREDENTIALS}/vault-secret-id\"");
    assert_contains_all(
        &config,
        &[
            "[vault]",
            "address = \"https://vault.example.org:8200\"",
            "nkey_secret = \"shared/homelab-deploy/builder-nkey\"",
            "auth = \"approle\"",
            &role_id,
            &secret_id,
            "kv_version = 2",
        ],
    );
    assert!(!config.contains("nkey_seed_file"), "{config}");
    assert_checked(file, &config);

    assert_refused(
        r#"{
          services.homelab-deploy.builder = {
            enable = true;
            repos.x.url = "git+file:///srv/x";
            nkeySeedFile = "/run/secrets/builder-nkey";
            vault = { address = "https://vault:8200"; roleIdFile = "/r"; secretIdFile = "/s"; };
          };
        }"#,
        "either nkeySeedFile or vault.address",
    );
    assert_refused(
        r#"{
          services.homelab-deploy.builder = {
            enable = true;
            repos.x.url = "git+file:///srv/x";
            vault.address = "https://vault:8200";
          };
        }"#,
        "vault.roleIdFile and vault.secretIdFile",
    );
}

/// Every secret file of the builder (seed, Vault token, each repo's push signing key, SSH key,
/// known-hosts file and token file) reaches the service with LoadCredential, under an id of its
/// own, and the rendered config names the credential; a change to any of them restarts the
/// builder. Cache-push environment files are the service's `EnvironmentFile`s.
#[test]
fn every_secret_file_is_a_credential() {
    let summary = rendered(
        r#"{
          services.homelab-deploy.builder = {
            enable = true;
            environmentFiles = [ "/run/secrets/s3.env" ];
            settings.vault = { address = "https://vault:8200"; auth = "token"; token_file = "/run/secrets/vault-token"; };
            settings.repos = {
              fleet = {
                url = "git+ssh://git@git.example.org:2222/ops/fleet";
                ssh_key_file = "/run/secrets/deploy-key";
                ssh_known_hosts_file = "/etc/homelab-deploy/known_hosts";
                push_to = "s3://cache?region=eu-west-1";
                push_secret_key_file = "/run/secrets/cache-key";
              };
              web = { url = "git+https://git.example.org/ops/web.git"; token_file = "/run/secrets/web-token"; };
            };
          };
        }"#,
    );
    let service = &summary["services"]["homelab-deploy-builder"];
    let expected = [
        ("vault-token", "/run/secrets/vault-token", "token_file"),
        (
            "repo-fleet-push-key",
            "/run/secrets/cache-key",
            "push_secret_key_file",
        ),
        (
            "repo-fleet-ssh-key",
            "/run/secrets/deploy-key",
            "ssh_key_file",
        ),
        (
            "repo-fleet-known-hosts",
            "/etc/homelab-deploy/known_hosts",
            "ssh_known_hosts_file",
        ),
        ("repo-web-token", "/run/secrets/web-token", "token_file"),
    ];
    assert_eq!(
        service["serviceConfig"]["LoadCredential"],
        serde_json::json!(expected
            .iter()
            .map(|(id, source, _)| format!("{id}:{source}"))
            .collect::<Vec<_>>())
    );
    assert_eq!(
        summary["paths"]["homelab-deploy-builder-credentials"]["pathConfig"]["PathChanged"],
        serde_json::json!(expected
            .iter()
            .map(|(_, source, _)| *source)
            .collect::<Vec<_>>())
    );
    let (_, config) = builder_config(&summary);
    for (id, source, key) in expected {
        assert!(
            config.contains(&format!("{key} = \"{CREDENTIALS}/{id}\"")),
            "{key} of {id} not a credential:\n{config}"
        );
        assert!(!config.contains(source), "{source} still in:\n{config}");
    }
    assert_eq!(
        service["serviceConfig"]["EnvironmentFile"],
        serde_json::json!(["/run/secrets/s3.env"])
    );
    let restart = &summary["services"]["homelab-deploy-builder-credentials"]["serviceConfig"];
    assert!(
        restart["ExecStart"].as_str().is_some_and(
            |exec| exec.ends_with("systemctl try-restart homelab-deploy-builder.service")
        )
    );

    // The old drain timeout is an assertion failure that says what replaced it.
    assert_refused(
        r#"{ services.homelab-deploy.builder = { enable = true; repos.x.url = "git+file:///srv/x"; drainTimeoutSec = 7200; }; }"#,
        "stopTimeoutSec",
    );
}

/// Tenants: each tenant's builder seed is a credential, the rendered `[tenants]` tables pass
/// `builder --check`, and a tenant beside a single-account seed is an assertion failure.
#[test]
fn builder_module_renders_tenants() {
    let summary = rendered(
        r#"{
          services.homelab-deploy.builder = {
            enable = true;
            repos.shop.url = "git+https://git.example.org/shop/infra.git";
            repos.lab.url = "git+https://git.example.org/lab/nixos.git";
            settings.tenants = {
              shop = { nkey_seed_file = "/run/secrets/builder-shop.nk"; repos = [ "shop" ]; priority = 3; max_queued = 500; };
              lab = { creds_file = "/run/secrets/builder-lab.creds"; repos = [ "lab" ]; };
            };
          };
        }"#,
    );
    let service = &summary["services"]["homelab-deploy-builder"];
    assert_eq!(
        service["serviceConfig"]["LoadCredential"],
        serde_json::json!([
            "tenant-lab-creds:/run/secrets/builder-lab.creds",
            "tenant-shop-nkey-seed:/run/secrets/builder-shop.nk"
        ])
    );
    let (file, config) = builder_config(&summary);
    assert!(
        config.contains(&format!(
            "nkey_seed_file = \"{CREDENTIALS}/tenant-shop-nkey-seed\""
        )),
        "{config}"
    );
    assert_checked(file, &config);

    assert_refused(
        r#"{
          services.homelab-deploy.builder = {
            enable = true;
            nkeySeedFile = "/run/secrets/builder.nk";
            repos.shop.url = "git+https://git.example.org/shop/infra.git";
            settings.tenants.shop = { nkey_seed_file = "/run/secrets/builder-shop.nk"; repos = [ "shop" ]; };
          };
        }"#,
        "tenants",
    );
}

/// With tenants, the provision oneshot runs `builder provision --tenant NAME` once per tenant,
/// each with that account's admin seed as a credential; its commands, run as rendered against
/// nats/multi-tenant.example.conf, create each tenant's streams. A tenant without an admin seed
/// is an assertion.
#[test]
fn builder_module_provisions_each_tenant_with_its_admin_seed() {
    let dir = std::env::temp_dir().join(test_support::unique("nixos-tenants"));
    let nats = crate::tenants::start_server(&dir);
    let module = |provision: &str| {
        format!(
            r#"{{
              services.homelab-deploy.builder = {{
                enable = true;
                natsUrl = "{}";
                repos.alpha-app.url = "git+https://git.example.org/alpha/infra.git";
                repos.beta-app.url = "git+https://git.example.org/beta/nixos.git";
                settings.nats.inbox_prefix = "_INBOX_builder";
                settings.tenants = {{
                  alpha = {{ nkey_seed_file = "/run/secrets/alpha-builder.nk"; repos = [ "alpha-app" ]; max_queued = 50; }};
                  beta = {{ nkey_seed_file = "/run/secrets/beta-builder.nk"; repos = [ "beta-app" ]; }};
                }};
                provision = {{ enable = true; inboxPrefix = "_INBOX_admin"; {provision} }};
              }};
            }}"#,
            nats.url
        )
    };
    let summary = rendered(&module(
        r#"tenants.alpha.adminNkeySeedFile = "/run/secrets/alpha-admin.nk"; tenants.beta.adminNkeySeedFile = "/run/secrets/beta-admin.nk";"#,
    ));
    let unit = &summary["services"]["homelab-deploy-builder-provision"]["serviceConfig"];
    assert_eq!(
        unit["LoadCredential"],
        serde_json::json!([
            "admin-nkey-alpha:/run/secrets/alpha-admin.nk",
            "admin-nkey-beta:/run/secrets/beta-admin.nk"
        ])
    );
    let commands = unit["ExecStart"]
        .as_array()
        .expect("one ExecStart per tenant");
    assert_eq!(commands.len(), 2, "{commands:?}");
    for (command, tenant) in commands.iter().zip(["alpha", "beta"]) {
        let exec = command.as_str().expect("command");
        let seed = dir.join(format!("{}_ADMIN.nk", tenant.to_uppercase()));
        let args = provision_args(exec, &format!("%d/admin-nkey-{tenant}"), &seed);
        assert!(
            args.windows(2).any(|pair| pair == ["--tenant", tenant]),
            "{exec}"
        );
        assert_provisions(&args, exec);
    }

    assert_refused(
        &module(r#"tenants.alpha.adminNkeySeedFile = "/run/secrets/alpha-admin.nk";"#),
        "provision.tenants.<name>.adminNkeySeedFile",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A typo in an option name, a wrong type, and a repo name that breaks the subject rules are
/// evaluation errors that name the option.
#[test]
fn typos_and_wrong_types_are_eval_errors() {
    let base = r#"enable = true; repos.demo.url = "git+file:///srv/demo";"#;
    let err = evaluate(&format!(
        "{{ services.homelab-deploy.builder = {{ {base} settings.builder.nmae = \"x\"; }}; }}"
    ))
    .expect_err("typo accepted");
    assert!(
        err.contains("nmae") && err.contains("does not exist"),
        "{err}"
    );
    let err = evaluate(&format!("{{ services.homelab-deploy.builder = {{ {base} settings.builder.build_jobs = \"two\"; }}; }}"))
        .expect_err("wrong type accepted");
    assert!(
        err.contains("build_jobs") && err.contains("is not of type"),
        "{err}"
    );
    let err = evaluate(r#"{ services.homelab-deploy.scheduledBuilds.x = { repo = "nixos.servers"; onCalendar = "daily"; }; }"#)
        .expect_err("bad repo name accepted");
    assert!(
        err.contains("repo") && err.contains("is not of type"),
        "{err}"
    );
    let summary = evaluated(
        r#"{ services.homelab-deploy.builder = { enable = true; repos."bad.name".url = "git+file:///srv/x"; }; }"#,
    );
    assert!(
        summary["failedAssertions"][0]
            .as_str()
            .is_some_and(|m| m.contains("repo names")),
        "{summary:#}"
    );
}

/// A scheduled build is a oneshot service plus a persistent timer; its command line, run for
/// real, exits non-zero when the build fails (so `systemctl --failed` shows it).
#[test]
fn scheduled_builds_are_oneshots_with_persistent_timers() {
    let summary = evaluated(
        r#"{
          services.homelab-deploy.scheduledBuilds.servers = {
            repo = "demo"; target = "broken-build"; onCalendar = "*-*-* *:30:00";
            randomizedDelaySec = 300; nkeySeedFile = "/run/secrets/deployer-nkey";
          };
        }"#,
    );
    let service = &summary["services"]["homelab-deploy-build-servers"];
    assert_eq!(service["serviceConfig"]["Type"], "oneshot");
    assert_eq!(
        service["serviceConfig"]["LoadCredential"][0],
        "nkey:/run/secrets/deployer-nkey"
    );
    assert_eq!(
        service["environment"]["HOMELAB_DEPLOY_NKEY_FILE"],
        "%d/nkey"
    );
    let timer = &summary["timers"]["homelab-deploy-build-servers"];
    assert_eq!(timer["timerConfig"]["OnCalendar"], "*-*-* *:30:00");
    assert_eq!(timer["timerConfig"]["Persistent"], true);
    assert_eq!(timer["timerConfig"]["RandomizedDelaySec"], 300);
    assert_eq!(timer["wantedBy"][0], "timers.target");

    let exec = service["serviceConfig"]["ExecStart"]
        .as_str()
        .expect("ExecStart");
    let args: Vec<&str> = exec.split_whitespace().skip(1).collect();
    assert_eq!(
        args[..5],
        ["build", "demo", "broken-build", "--mode", "replace"],
        "{exec}"
    );
    let setup = Setup::new("fleet");
    let output = run_cli(bin(), &setup.nats.url, &args, Duration::from_secs(120));
    assert_eq!(output.status.code(), Some(1), "{exec}: {}", text(&output).1);
    let mut good = args.clone();
    good[2] = "web";
    let output = run_cli(bin(), &setup.nats.url, &good, Duration::from_secs(120));
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
}

/// `programs.homelab-deploy` writes the system config file the CLI reads.
#[test]
fn cli_module_writes_the_config_the_cli_reads() {
    let setup = Setup::new("fleet");
    let summary = evaluated(&format!(
        "{{ programs.homelab-deploy = {{ enable = true; natsUrl = \"{}\"; inboxPrefix = \"_INBOX_cli\"; }}; }}",
        setup.nats.url
    ));
    let file = summary["etc"]["homelab-deploy/config.toml"]["source"]
        .as_str()
        .expect("etc file");
    let output = Command::new(bin())
        .args(["build", "demo", "web", "--quiet"])
        .env_remove("HOMELAB_DEPLOY_NATS_URL")
        .env("HOME", "/nonexistent")
        .env_remove("XDG_CONFIG_HOME")
        .env("HOMELAB_DEPLOY_SYSTEM_CONFIG", file)
        .output()
        .expect("run cli");
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
}

/// What of flake.nix can be checked without nixpkgs (not fetchable here): its outputs, the
/// overlay, the NixOS module through the overlay, and what nix/package.nix hands to
/// `buildRustPackage`. See docs/flake.md for what was not run.
#[test]
fn flake_outputs_evaluate_without_nixpkgs() {
    let outputs = eval_json(&format!(
        "import {}/tests/nixos/flake-outputs.nix {{ libPath = {}; }}",
        repo_root().display(),
        nixpkgs_lib().display()
    ))
    .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(
        outputs["packages"],
        serde_json::json!(["default", "homelab-deploy"])
    );
    assert_eq!(outputs["apps"], serde_json::json!(["default"]));
    assert_eq!(outputs["devShells"], serde_json::json!(["default"]));
    assert_eq!(
        outputs["checks"],
        serde_json::json!(["nixos-module", "package"])
    );
    assert_eq!(
        outputs["nixosModules"],
        serde_json::json!(["default", "homelab-deploy"])
    );
    assert_eq!(outputs["overlayIsFunction"], true);
    // The module builds the package from the host's nixpkgs, without adding an overlay to it.
    assert_eq!(outputs["overlayCount"], 0);
    assert_eq!(
        outputs["builderPackage"],
        "homelab-deploy-callPackage-package.nix"
    );
    assert_eq!(outputs["builderUnit"], true);
    let package = &outputs["package"];
    assert_eq!(package["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(package["lockFile"], true);
    assert_eq!(package["srcHasLock"], true);
    assert_eq!(package["srcHasCli"], true);
}

/// An on-demand builder: the session options become `--max-builds`, `--idle-exit` and
/// `--lifetime` flags the binary accepts, and exit 1 (a build it took failed) is no unit failure;
/// a long-running builder has neither.
#[test]
fn session_options_make_an_ephemeral_builder() {
    let module = |session: &str| {
        format!(
            r#"{{
              services.homelab-deploy.builder = {{
                enable = true;
                repos.nixos-servers.url = "git+https://git.example.org/torjus/nixos-servers.git";
                {session}
              }};
            }}"#
        )
    };
    let summary = evaluated(&module(
        r#"session = { maxBuilds = 3; idleExit = "10m"; lifetime = "2h"; };"#,
    ));
    let unit = &summary["services"]["homelab-deploy-builder"]["serviceConfig"];
    let exec = unit["ExecStart"].as_str().expect("ExecStart");
    assert!(
        exec.ends_with("--max-builds 3 --idle-exit 10m --lifetime 2h"),
        "{exec}"
    );
    assert_eq!(unit["SuccessExitStatus"], "1");
    let file = summary["builderConfigFile"].as_str().expect("config file");
    let args = exec_args(exec);
    let check = Command::new(bin())
        .args(&args)
        .arg("--check")
        .output()
        .expect("check");
    assert!(check.status.success(), "{}\n{file}", text(&check).1);

    let summary = evaluated(&module(""));
    let unit = &summary["services"]["homelab-deploy-builder"]["serviceConfig"];
    assert!(unit.get("SuccessExitStatus").is_none(), "{unit:#}");
}

/// The dashboard's service: hardened like the builder, its seed a credential, and the command
/// line systemd would run serves the page (run here with the real binary against a real fleet).
#[test]
fn dashboard_module_runs_a_hardened_page_server() {
    let setup = Setup::new("fleet");
    let port = test_support::free_port();
    let summary = rendered(&format!(
        r#"{{ services.homelab-deploy.dashboard = {{
              enable = true; listen = "127.0.0.1:{port}"; natsUrl = "{}";
              nkeySeedFile = "/run/secrets/viewer.nk"; maxClients = 4; openFirewall = true; }}; }}"#,
        setup.nats.url
    ));
    assert_eq!(summary["firewall"], serde_json::json!([port]));
    let service = &summary["services"]["homelab-deploy-dashboard"];
    assert_eq!(
        service["environment"]["HOMELAB_DEPLOY_NATS_URL"],
        setup.nats.url.as_str()
    );
    let unit = &service["serviceConfig"];
    assert_eq!(
        unit["LoadCredential"],
        serde_json::json!(["nkey:/run/secrets/viewer.nk"])
    );
    for key in [
        "DynamicUser",
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "RestrictNamespaces",
        "MemoryDenyWriteExecute",
    ] {
        assert_eq!(unit[key], true, "{key} in {unit:#}");
    }
    assert_eq!(unit["ProtectSystem"], "strict");
    assert_eq!(unit["CapabilityBoundingSet"], "");
    let exec = unit["ExecStart"].as_str().expect("ExecStart");
    let words: Vec<&str> = exec.split(' ').map(|w| w.trim_matches('\'')).collect();
    assert!(words[0].ends_with("/bin/homelab-deploy"), "{exec}");
    let nkey = words
        .iter()
        .position(|w| *w == "--nkey-file")
        .expect("--nkey-file");
    assert_eq!(words[nkey + 1], "%d/nkey", "{exec}");
    // The test server has no users: the same command line without the credential.
    let args = &words[1..nkey];
    let dashboard = crate::dashboard::Dashboard::run(&setup.nats.url, args, port);
    let mut page = String::new();
    let shown = test_support::wait_until(Duration::from_secs(60), || {
        page = dashboard.get("/").1;
        page.contains(&setup.builder.name)
    });
    assert!(
        shown,
        "the service's command line served no fleet:\n{page}\n{}",
        dashboard.log()
    );
}

/// `provision.enable` adds a oneshot before the builder that runs `builder provision` with the
/// admin's seed as a credential; its command, run as rendered against nats/prod.example.conf,
/// creates the streams. Without a seed file it is an assertion.
#[test]
fn builder_module_provisions_the_streams_with_the_admin_seed() {
    let secured = crate::permissions::SecuredNats::start();
    let summary = rendered(&format!(
        r#"{{
          services.homelab-deploy.builder = {{
            enable = true;
            natsUrl = "{}";
            repos.nixos-servers.url = "git+https://git.example.org/torjus/nixos-servers.git";
            provision = {{ enable = true; adminNkeySeedFile = "/run/secrets/admin.nk"; inboxPrefix = "_INBOX_admin"; }};
          }};
        }}"#,
        secured.nats.url
    ));
    let service = &summary["services"]["homelab-deploy-builder-provision"];
    assert_eq!(
        service["wantedBy"],
        serde_json::json!(["homelab-deploy-builder.service"])
    );
    assert_eq!(
        service["before"],
        serde_json::json!(["homelab-deploy-builder.service"])
    );
    let unit = &service["serviceConfig"];
    assert_eq!(unit["Type"], "oneshot");
    assert_eq!(
        unit["LoadCredential"],
        serde_json::json!(["admin-nkey:/run/secrets/admin.nk"])
    );
    let exec = unit["ExecStart"].as_str().expect("ExecStart");
    let args = provision_args(exec, "%d/admin-nkey", &secured.admin_seed);
    assert_eq!(args[..2], ["builder", "provision"], "{exec}");
    assert_provisions(&args, exec);

    assert_refused(
        r#"{
          services.homelab-deploy.builder = {
            enable = true;
            repos.nixos-servers.url = "git+https://git.example.org/torjus/nixos-servers.git";
            provision.enable = true;
          };
        }"#,
        "provision.adminNkeySeedFile",
    );
}
