//! Build logs: batched, numbered, complete, and a flood does not grow the builder.

use test_support::stored_messages;

use crate::Setup;

const FLOOD_LINES: u64 = 700_000;

/// A build printing ~50 MB of log: every line arrives, in batches of many lines with contiguous
/// numbering, and the builder's peak memory stays bounded.
#[tokio::test(flavor = "multi_thread")]
async fn log_flood_is_batched_and_memory_stays_bounded() {
    let setup = Setup::new("flood");
    // Moving 50 MB through nix's JSON log records and NATS takes a while on a loaded 2-core
    // machine; this test checks what arrives and the memory it took, not the time.
    let output = test_support::run_cli(
        crate::bin(),
        &setup.nats.url,
        &["build", "demo", "flood", "--json"],
        std::time::Duration::from_secs(600),
    );
    let finished: serde_json::Value =
        serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
            panic!(
                "stdout is not one JSON object ({err}); stderr:\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    assert_eq!(output.status.code(), Some(0), "{finished:#}");
    let peak = setup.builder.peak_rss_bytes();
    let id = finished["id"].as_str().expect("id");
    let client = setup.nats.client().await;
    let batches = stored_messages(&client, &format!("build.responses.demo.flood.{id}.logs")).await;

    let mut next_line = 1;
    let mut flood_lines = 0;
    for batch in &batches {
        assert_eq!(batch["host"], "flood");
        assert_eq!(batch["first_line"], next_line, "batches must be contiguous");
        let lines = batch["lines"].as_array().expect("lines");
        next_line += lines.len() as u64;
        flood_lines += lines
            .iter()
            .filter(|l| l.as_str().is_some_and(|l| l.starts_with("flood line:")))
            .count() as u64;
    }
    assert_eq!(flood_lines, FLOOD_LINES, "lines lost");
    assert!(
        (batches.len() as u64) < FLOOD_LINES / 100,
        "{} batches for {FLOOD_LINES} lines: not batched",
        batches.len()
    );
    // The whole log is ~50 MB; the builder must not hold it.
    assert!(
        peak < 100 * 1024 * 1024,
        "builder peak RSS {} MiB",
        peak / (1024 * 1024)
    );
}

/// A 100 MB line, a run of NUL bytes and control characters arrive decoded from nix's
/// records, escaped and cut, each as one numbered line between the plain lines around them, and
/// the host's last progress event has nix's final counts.
#[tokio::test(flavor = "multi_thread")]
async fn wide_lines_are_decoded_then_cut() {
    let setup = Setup::new("wide");
    let (code, finished) = setup.build_json("wide", &[]);
    assert_eq!(code, 0, "{finished:#}");
    let id = finished["id"].as_str().expect("id");
    let client = setup.nats.client().await;
    let batches = stored_messages(&client, &format!("build.responses.demo.wide.{id}.logs")).await;
    let mut lines: Vec<String> = Vec::new();
    for batch in &batches {
        assert_eq!(
            batch["first_line"],
            lines.len() as u64 + 1,
            "batches must be contiguous"
        );
        for line in batch["lines"].as_array().expect("lines") {
            lines.push(line.as_str().expect("line").to_owned());
        }
    }
    let at = |needle: &str| {
        lines
            .iter()
            .position(|line| line.starts_with(needle))
            .unwrap_or_else(|| panic!("no line starts with {needle:?}: {lines:#?}"))
    };
    let before = at("before the wide line");
    let wide = &lines[before + 1];
    assert!(
        wide.starts_with("xxxxxxxx") && wide.ends_with("…[line cut]") && wide.len() < 9 * 1024,
        "{}…",
        &wide[..wide.len().min(80)]
    );
    let nuls = &lines[before + 2];
    assert!(
        nuls.starts_with("\\x00\\x00\\x00")
            && nuls.ends_with("…[line cut]")
            && nuls.len() < 9 * 1024,
        "{}…",
        &nuls[..nuls.len().min(80)]
    );
    // Nix itself writes bytes that are not UTF-8 as U+FFFD into its records; the bell is ours
    // to escape.
    assert_eq!(
        lines[before + 3],
        "bad bytes \u{fffd}\u{fffd} and a bell \\x07"
    );
    assert_eq!(at("after the wide line"), before + 4);
    assert!(
        !lines.iter().any(|line| line.starts_with("@nix")),
        "undecoded records"
    );

    let events = stored_messages(&client, &format!("build.responses.demo.wide.{id}.events")).await;
    let progress = events
        .iter()
        .rfind(|e| e["type"] == "progress")
        .unwrap_or_else(|| panic!("no progress event: {events:#?}"));
    assert_eq!(progress["done"], progress["expected"], "{progress:#}");
    assert_eq!(progress["running"], 0, "{progress:#}");
}
