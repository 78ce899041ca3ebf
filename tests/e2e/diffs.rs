//! Closure diffs: each built or cached host is compared with the builder's earlier build of it
//! at another commit (packages added, removed, changed with versions; closure size change).

use serde_json::Value;
use test_support::stored_messages;

use crate::{host, text, Setup};

/// The second commit of the `diffs` fixture: openssl 3.0.1 → 3.0.2, nano removed, htop added
/// (about 40 KiB, so nix reports its size).
const SECOND_PACKAGES: &str = r#"[
  { name = "openssl-3.0.2"; }
  { name = "zlib-1.3"; }
  { name = "htop-3.3.0"; lines = 2000; }
]
"#;

/// The names and versions of a closure diff's package list, as `name before → after`.
fn package_lines(diff: &Value) -> Vec<String> {
    let versions = |list: &Value| {
        list.as_array()
            .map(|l| {
                l.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default()
    };
    diff["packages"]
        .as_array()
        .map(|packages| {
            packages
                .iter()
                .map(|p| {
                    format!(
                        "{} {} → {}",
                        p["name"].as_str().unwrap_or("?"),
                        versions(&p["before"]),
                        versions(&p["after"])
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The first build of a host has nothing to compare with; after a commit that bumps openssl,
/// drops nano and adds htop, the host result says exactly that, with the closure growing, and
/// the whole diff is on the host's logs subject. A repeat build of the new commit (cached) still
/// compares with the first commit.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_commit_shows_added_removed_and_changed_packages() {
    let setup = Setup::new("diffs");
    let first_rev = setup.repo.head();
    let (code, first) = setup.build_json("web", &[]);
    assert_eq!(code, 0, "{first:#}");
    assert_eq!(
        host(&first, "web")["closure_diff"]["status"],
        "no_previous",
        "{first:#}"
    );

    setup.repo.commit_file("packages.nix", SECOND_PACKAGES);
    let (code, second) = setup.build_json("web", &[]);
    assert_eq!(code, 0, "{second:#}");
    let web = host(&second, "web");
    assert_eq!(web["status"], "built", "{second:#}");
    let diff = &web["closure_diff"];
    assert_eq!(diff["status"], "compared", "{diff:#}");
    assert_eq!(diff["from_rev"], first_rev.as_str());
    assert_eq!(diff["from_path"], host(&first, "web")["out_path"]);
    assert_eq!(
        (&diff["added"], &diff["removed"], &diff["changed"]),
        (&Value::from(1), &Value::from(1), &Value::from(1)),
        "{diff:#}"
    );
    assert_eq!(
        package_lines(diff),
        ["htop  → 3.3.0", "nano 7.2 → ", "openssl 3.0.1 → 3.0.2"],
        "{diff:#}"
    );
    let before = diff["size_before"].as_u64().expect("size_before");
    let after = diff["size_after"].as_u64().expect("size_after");
    assert!(after > before + 40_000, "{diff:#}");
    assert!(
        diff["packages"][0]["size_delta"]
            .as_i64()
            .is_some_and(|d| d > 40_000),
        "htop's size is reported: {diff:#}"
    );

    let id = second["id"].as_str().expect("id");
    let client = setup.nats.client().await;
    let batches = stored_messages(&client, &format!("build.responses.demo.web.{id}.logs")).await;
    let lines: Vec<&str> = batches
        .iter()
        .flat_map(|b| b["lines"].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    for wanted in [
        format!("closure diff against rev {first_rev}"),
        "openssl 3.0.1 → 3.0.2".to_owned(),
        "- nano 7.2".to_owned(),
        "+ htop 3.3.0".to_owned(),
        format!("closure size: {before} → {after} bytes"),
    ] {
        assert!(
            lines.iter().any(|l| l.contains(&wanted)),
            "{wanted:?} missing from the logs:\n{}",
            lines.join("\n")
        );
    }

    let (code, again) = setup.build_json("web", &[]);
    assert_eq!(code, 0, "{again:#}");
    let web = host(&again, "web");
    assert_eq!(web["status"], "cached", "{again:#}");
    assert_eq!(web["closure_diff"]["from_rev"], first_rev.as_str());
    assert_eq!(web["closure_diff"]["changed"], 1, "{again:#}");
}

/// What a person and CI see: the result table has a CHANGES column and the package changes
/// under it, the JUnit test case of the host carries the diff, and `homelab-deploy diff`
/// compares any two held builds, saying plainly when a side is gone.
#[test]
fn the_table_junit_and_diff_command_show_the_changes() {
    let setup = Setup::new("diffs");
    let first_rev = setup.repo.head();
    let (code, first) = setup.build_json("web", &[]);
    assert_eq!(code, 0, "{first:#}");
    let second_rev = setup.repo.commit_file("packages.nix", SECOND_PACKAGES);

    let dir = tempfile::tempdir().expect("temp dir");
    let report = dir.path().join("hosts.xml");
    let report_arg = report.display().to_string();
    let output = setup.cli(&["build", "demo", "web", "--junit", &report_arg]);
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("CHANGES"), "{stdout}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or_else(|| panic!("no row for web:\n{stdout}"));
    assert!(row.contains("+1 -1 ~1, +"), "{row}");
    for wanted in [
        format!("changes of web against rev {first_rev}"),
        "openssl 3.0.1 → 3.0.2".to_owned(),
        "+ htop 3.3.0".to_owned(),
        "- nano 7.2".to_owned(),
    ] {
        assert!(stdout.contains(&wanted), "{wanted:?} missing:\n{stdout}");
    }
    let xml = std::fs::read_to_string(&report).expect("JUnit report written");
    assert!(
        xml.contains("closure_diff: against rev") && xml.contains("openssl 3.0.1 → 3.0.2"),
        "{xml}"
    );

    let output = setup.cli(&["diff", "demo", "web"]);
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!(
            "rev {} → rev {}",
            &first_rev[..12],
            &second_rev[..12]
        )),
        "{stdout}"
    );
    assert!(stdout.contains("openssl 3.0.1 → 3.0.2"), "{stdout}");

    // Backwards, by short revs: the same packages the other way round.
    let output = setup.cli(&[
        "diff",
        "demo",
        "web",
        "--from",
        &second_rev[..8],
        "--to",
        &first_rev[..8],
        "--json",
    ]);
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    let reply: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(
        package_lines(&reply["diff"]),
        ["htop 3.3.0 → ", "nano  → 7.2", "openssl 3.0.2 → 3.0.1"],
        "{reply:#}"
    );

    let gone = "0123456789abcdef";
    let output = setup.cli(&["diff", "demo", "web", "--from", gone]);
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!("at rev {gone} is gone: no builder holds it"))
            && stderr.contains(&first_rev[..12])
            && stderr.contains(&second_rev[..12]),
        "{stderr}"
    );
}
