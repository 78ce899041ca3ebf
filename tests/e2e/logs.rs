//! Build logs: batched, numbered, complete, and a flood does not grow the builder.

use test_support::stored_messages;

use crate::Setup;

const FLOOD_LINES: u64 = 700_000;

/// A build printing ~50 MB of log: every line arrives, in batches of many lines with contiguous
/// numbering, and the builder's peak memory stays bounded.
#[tokio::test(flavor = "multi_thread")]
async fn log_flood_is_batched_and_memory_stays_bounded() {
    let setup = Setup::new("flood");
    let (code, finished) = setup.build_json("flood", &[]);
    assert_eq!(code, 0, "{finished:#}");
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
