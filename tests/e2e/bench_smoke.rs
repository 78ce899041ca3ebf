//! The light benchmarks at smoke size: they must run and report numbers; no timing is asserted
//! (speed is measured by `scripts/bench`, see docs/benchmarks.md).

use std::time::Duration;

use crate::bin;

fn sane(report: &bench::Report) {
    assert!(report.ratio.is_finite() && report.ratio > 0.0, "{report:?}");
    assert!(
        !report.measured.is_empty() && !report.baseline.is_empty(),
        "{report:?}"
    );
}

#[test]
fn bench_smoke_dispatch_overhead() {
    sane(&bench::dispatch_overhead(bin(), 2).expect("dispatch benchmark runs"));
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_smoke_queue_throughput() {
    sane(
        &bench::queue_throughput(bin(), 10)
            .await
            .expect("queue benchmark runs"),
    );
}

#[test]
fn bench_smoke_log_flood() {
    let report = bench::log_flood(bin(), 20_000).expect("log flood benchmark runs");
    sane(&report);
    assert!(report.measured.contains("MiB delivered"), "{report:?}");
}

#[test]
fn bench_smoke_idle() {
    sane(&bench::idle(bin(), Duration::from_secs(2)).expect("idle benchmark runs"));
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_smoke_read_model() {
    for timing in [bench::HistoryTiming::Burst, bench::HistoryTiming::Spread] {
        let reports = bench::read_model(bin(), &[30, 60], 25, 3, timing)
            .await
            .expect("read model benchmark runs");
        assert_eq!(reports.len(), 4, "{reports:?}");
        for report in &reports {
            sane(report);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_smoke_autoscaling() {
    let reports = bench::autoscaling(bin(), 1, 2)
        .await
        .expect("autoscaling benchmark runs");
    assert_eq!(reports.len(), 3, "{reports:?}");
    for report in &reports {
        sane(report);
    }
}
