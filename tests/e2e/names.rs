//! Host names are data: any name Nix takes builds, from the CLI, a raw NATS client and the MCP
//! tool; its subject token follows docs/protocol.md; it never becomes a path outside the state
//! dir, a piece of a Nix expression, an unescaped log line or a broken metric.

use std::collections::BTreeSet;
use std::path::Path;

use async_nats::HeaderMap;
use serde_json::Value;
use test_support::{free_port, unique, wait_for_finished, Builder, FixtureRepo, NatsServer};

use crate::{bin, cli_ok, host, text};

/// Every host of the `names` fixture, as the flake spells it, with its documented token.
const HOSTS: [(&str, &str); 9] = [
    ("web.example.org", "web%2Eexample%2Eorg"),
    ("a\"b", "a%22b"),
    ("back\\slash", "back%5Cslash"),
    ("dollar${x}", "dollar%24%7Bx%7D"),
    ("../../../escaped", "%2E%2E%2F%2E%2E%2F%2E%2E%2Fescaped"),
    ("new\nline", "new%0Aline"),
    ("ünïcödé", "%C3%BCn%C3%AFc%C3%B6d%C3%A9"),
    ("50%", "50%25"),
    ("all", "%61ll"),
];

/// Every file and directory under `dir`, relative to it.
fn tree(dir: &Path) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                pending.push(path.clone());
            }
            found.insert(
                path.strip_prefix(dir)
                    .expect("under dir")
                    .display()
                    .to_string(),
            );
        }
    }
    found
}

/// `all` builds every host whatever its name: each output holds its own name, each GC root is
/// an encoded file name in `gcroots/demo/` and nothing is written beside the state dir; events,
/// JUnit, log lines and metric labels carry the raw names, escaped where their format needs it.
#[test]
fn every_host_name_builds_and_stays_in_the_state_dir() {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("names");
    let port = free_port();
    let builder = Builder::start_with(
        bin(),
        &nats.url,
        &[("demo", repo.url())],
        &format!("\n\n[metrics]\nlisten = \"127.0.0.1:{port}\""),
    );
    let builder_dir = builder
        .state_dir()
        .parent()
        .expect("builder dir")
        .to_owned();
    let before = tree(&builder_dir);
    let junit = std::env::temp_dir().join(format!("{}.xml", unique("junit")));
    let junit_path = junit.display().to_string();
    let output = cli_ok(
        &nats.url,
        &["build", "demo", "all", "--json", "--junit", &junit_path],
        &builder,
    );
    let finished: Value = serde_json::from_str(text(&output).0.trim()).expect("finished event");
    assert_eq!(
        finished["hosts"].as_array().map(Vec::len),
        Some(HOSTS.len())
    );

    let mut roots = BTreeSet::new();
    for (name, token) in HOSTS {
        let result = host(&finished, name);
        assert_eq!(result["status"], "built", "{name:?}: {result}");
        let out_path = result["out_path"].as_str().expect("out path");
        let built = std::fs::read_to_string(format!("{out_path}/hostname")).expect("output");
        assert_eq!(
            built, name,
            "the output of {name:?} holds another host's name"
        );
        // The file name is the encoded name; only subjects need `all` escaped.
        let file = if name == "all" { "all" } else { token };
        let root = builder.state_dir().join("gcroots/demo").join(file);
        assert_eq!(
            std::fs::read_link(&root).ok().as_deref(),
            Some(Path::new(out_path)),
            "GC root of {name:?}"
        );
        roots.insert(format!("state/gcroots/demo/{file}"));
    }
    let added: BTreeSet<String> = tree(&builder_dir).difference(&before).cloned().collect();
    let outside: Vec<&String> = added.iter().filter(|p| !p.starts_with("state")).collect();
    assert!(
        outside.is_empty(),
        "written outside the state dir: {outside:?}"
    );
    let in_gcroots: BTreeSet<String> = added
        .iter()
        .filter(|p| p.starts_with("state/gcroots/demo/"))
        .cloned()
        .collect();
    assert_eq!(in_gcroots, roots);
    assert!(!builder_dir.join("escaped").exists() && !builder.state_dir().join("escaped").exists());

    // JUnit keeps each raw name, newline included (an attribute keeps it only as a reference).
    let report = std::fs::read_to_string(&junit).expect("junit report");
    let _ = std::fs::remove_file(&junit);
    for escaped in [
        "name=\"a&quot;b\"",
        "name=\"new&#10;line\"",
        "name=\"ünïcödé\"",
        "name=\"../../../escaped\"",
    ] {
        assert!(report.contains(escaped), "{escaped} missing:\n{report}");
    }

    // Log fields are quoted and escaped: the newline never starts a line of its own.
    let log = builder.log();
    assert!(log.contains(r#"host="new\nline""#), "{log}");
    assert!(!log.lines().any(|line| line.starts_with("line")), "{log}");

    let metrics = crate::metrics::scrape(port);
    for label in [
        r#"host="web.example.org""#,
        r#"host="a\"b""#,
        r#"host="new\nline""#,
        r#"host="ünïcödé""#,
        r#"host="dollar${x}""#,
    ] {
        assert!(
            metrics.contains(&format!(
                "homelab_deploy_host_builds_total{{repo=\"demo\",{label},status=\"built\"}} 1"
            )),
            "{label} missing:\n{metrics}"
        );
    }
    let (ok, report) = crate::metrics::promtool(&["check", "metrics"], Some(&metrics));
    assert!(ok, "promtool check metrics:\n{report}");
}

/// An FQDN and the host literally named `all` build alone from the CLI; a name that is no host
/// of the flake is sent as data and refused by name, not taken for a subject wildcard.
#[test]
fn one_host_of_any_name_builds_from_the_cli() {
    let setup = crate::Setup::new("names");
    let (code, finished) = setup.build_json("web.example.org", &[]);
    assert_eq!(code, 0, "{finished:#}");
    assert_eq!(finished["target"], "web.example.org");
    let names: Vec<&str> = finished["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h["name"].as_str())
        .collect();
    assert_eq!(names, ["web.example.org"]);

    let output = setup.cli(&["build", "demo", "--host", "all"]);
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stderr.contains("queued build.demo.%61ll"), "{stderr}");
    assert!(stdout.lines().any(|l| l.starts_with("all ")), "{stdout}");
    assert!(
        stdout.contains("succeeded") && stdout.contains("(1 built)"),
        "{stdout}"
    );

    let (code, finished) = setup.build_json("web.>", &[]);
    assert_eq!(code, 1, "{finished:#}");
    let error = finished["error"].as_str().unwrap_or_default();
    assert!(error.contains("host web.> is not in the flake"), "{error}");
}

/// A raw NATS client that encodes the host name as docs/protocol.md says gets it built, and
/// reads its events on the subject with the same token.
#[tokio::test(flavor = "multi_thread")]
async fn a_raw_nats_client_builds_an_encoded_host() {
    let setup = crate::Setup::new("names");
    let client = setup.nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    for (name, token, id) in [
        ("web.example.org", "web%2Eexample%2Eorg", "RAWFQDN001"),
        ("new\nline", "new%0Aline", "RAWNEWLINE"),
    ] {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", id);
        js.publish_with_headers(format!("build.demo.{token}"), headers, "{}".into())
            .await
            .expect("publish")
            .await
            .expect("stored");
        let events = wait_for_finished(
            &client,
            &format!("build.responses.demo.{token}.{id}.events"),
        )
        .await;
        let finished = events.last().expect("finished");
        assert_eq!(finished["status"], "succeeded", "{finished:#}");
        assert_eq!(finished["target"], name);
        assert_eq!(host(finished, name)["status"], "built");
    }
}
