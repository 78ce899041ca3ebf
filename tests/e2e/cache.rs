//! Pushing built closures to a binary cache (`push_to`), signed when a key is configured.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use test_support::{run_cli, unique, Builder, FixtureRepo, NatsServer, NIX_CONFIG};

use crate::{bin, cli_ok, host};

/// A built host's closure lands in a real `file://` binary cache, signed with the configured
/// key; a cache that cannot be written is reported per host without failing the build.
#[test]
fn built_hosts_are_pushed_to_the_binary_cache() {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("fleet");
    let dir = std::env::temp_dir().join(unique("cache"));
    std::fs::create_dir_all(&dir).expect("cache dir");
    let key = dir.join("cache-key.sec");
    let generated = Command::new("nix")
        .args(["key", "generate-secret", "--key-name", "homelab-test-1"])
        .env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .expect("nix key generate-secret");
    assert!(
        generated.status.success(),
        "{}",
        String::from_utf8_lossy(&generated.stderr)
    );
    std::fs::write(&key, &generated.stdout).expect("write key");
    let cache = dir.join("store");
    let name = unique("builder");
    let mut config = Builder::config(
        &name,
        &nats.url,
        Path::new("{state_dir}"),
        &[("demo", repo.url())],
    );
    config.push_str(&format!(
        "push_to = \"file://{}\"\npush_secret_key_file = \"{}\"\n\n[repos.broken-cache]\nurl = \"{}\"\nref = \"main\"\npush_to = \"file:///proc/homelab-deploy-no-cache\"\n",
        cache.display(),
        key.display(),
        repo.url()
    ));
    let builder = Builder::start_config(bin(), &name, &config);

    let output = cli_ok(&nats.url, &["build", "demo", "web", "--json"], &builder);
    let finished: Value = serde_json::from_slice(&output.stdout).expect("json");
    let web = host(&finished, "web");
    assert_eq!(web["pushed"], true, "{finished:#}");
    let out_path = web["out_path"].as_str().expect("out path");
    let hash = out_path
        .trim_start_matches("/nix/store/")
        .split('-')
        .next()
        .expect("hash");
    let narinfo = std::fs::read_to_string(cache.join(format!("{hash}.narinfo")))
        .expect("narinfo in the cache");
    assert!(
        narinfo.contains(&format!("StorePath: {out_path}")),
        "{narinfo}"
    );
    assert!(
        narinfo.contains("Sig: homelab-test-1:"),
        "not signed: {narinfo}"
    );

    let output = run_cli(
        bin(),
        &nats.url,
        &["build", "broken-cache", "db", "--json"],
        Duration::from_secs(120),
    );
    assert_eq!(
        output.status.code(),
        Some(0),
        "a failed push must not fail the build"
    );
    let finished: Value = serde_json::from_slice(&output.stdout).expect("json");
    let db = host(&finished, "db");
    assert_eq!(db["pushed"], false, "{finished:#}");
    assert!(
        db["push_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{finished:#}"
    );
}
