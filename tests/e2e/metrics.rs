//! Prometheus metrics, scraped over HTTP after real builds, and checked with `promtool`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use test_support::{free_port, run_cli, wait_until, Builder, FixtureRepo, NatsServer};

use crate::{bin, failed_start_log};

pub(crate) fn scrape(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to /metrics");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// The value of the sample line that starts with `prefix` (name and labels).
fn sample(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

pub(crate) fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (Debian package prometheus; ./scripts/test installs it)");
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input.write_all(text.as_bytes()).expect("write to promtool");
    }
    drop(child.stdin.take());
    let output = child.wait_with_output().expect("promtool finishes");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Counters move by the right amounts, the duration histogram has buckets, a hostile target adds
/// no label value, and the scrape passes `promtool check metrics`.
#[test]
fn metrics_count_builds_and_pass_promtool() {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("fleet");
    let port = free_port();
    let _builder = Builder::start_with(
        bin(),
        &nats.url,
        &[("demo", repo.url())],
        &format!("\n\n[metrics]\nlisten = \"127.0.0.1:{port}\""),
    );
    let build = |target: &str| {
        run_cli(
            bin(),
            &nats.url,
            &["build", "demo", target],
            Duration::from_secs(120),
        )
    };
    assert_eq!(build("web").status.code(), Some(0));
    assert_eq!(build("web").status.code(), Some(0));
    assert_eq!(build("broken-build").status.code(), Some(1));
    assert_eq!(build("evil-host-not-in-flake").status.code(), Some(1));

    // The builder counts a request just after storing the finished event the CLI returns on:
    // scrape until all four are counted (at most 10 s), then check every figure.
    let counted = |body: &str| {
        ["succeeded", "failed"]
            .iter()
            .filter_map(|status| {
                sample(
                    body,
                    &format!("homelab_deploy_requests_finished_total{{repo=\"demo\",status=\"{status}\"}}"),
                )
            })
            .sum::<f64>()
    };
    let mut body = scrape(port);
    wait_until(Duration::from_secs(10), || {
        body = scrape(port);
        counted(&body) >= 4.0
    });
    assert_eq!(
        sample(
            &body,
            "homelab_deploy_requests_received_total{repo=\"demo\"}"
        ),
        Some(4.0),
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "homelab_deploy_requests_finished_total{repo=\"demo\",status=\"succeeded\"}"
        ),
        Some(2.0),
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "homelab_deploy_requests_finished_total{repo=\"demo\",status=\"failed\"}"
        ),
        Some(2.0),
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "homelab_deploy_host_builds_total{repo=\"demo\",host=\"web\",status=\"built\"}"
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "homelab_deploy_host_builds_total{repo=\"demo\",host=\"web\",status=\"cached\"}"
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(sample(&body, "homelab_deploy_host_builds_total{repo=\"demo\",host=\"broken-build\",status=\"build_failed\"}"), Some(1.0), "{body}");
    assert_eq!(
        sample(
            &body,
            "homelab_deploy_host_build_duration_seconds_count{repo=\"demo\",host=\"web\"}"
        ),
        Some(2.0),
        "{body}"
    );
    assert!(body.contains("homelab_deploy_host_build_duration_seconds_bucket{repo=\"demo\",host=\"web\",le=\"7200\"}"), "{body}");
    assert!(
        sample(
            &body,
            "homelab_deploy_log_bytes_published_total{repo=\"demo\"}"
        )
        .is_some_and(|b| b > 0.0),
        "{body}"
    );
    assert!(
        body.contains(&format!(
            "homelab_deploy_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{body}"
    );
    assert!(
        !body.contains("evil-host"),
        "a request's target became a label value:\n{body}"
    );
    let sampled = wait_until(Duration::from_secs(15), || {
        let body = scrape(port);
        sample(&body, "homelab_deploy_builder_state{state=\"idle\"}") == Some(1.0)
            && sample(&body, "homelab_deploy_queue_depth{repo=\"demo\"}") == Some(0.0)
            && sample(&body, "homelab_deploy_nats_connected") == Some(1.0)
    });
    assert!(sampled, "{}", scrape(port));

    let (ok, report) = promtool(&["check", "metrics"], Some(&scrape(port)));
    assert!(ok, "promtool check metrics:\n{report}");
}

/// The example alert rules are valid.
#[test]
fn alert_rules_pass_promtool() {
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/alerts.yml");
    let (ok, report) = promtool(&["check", "rules", &rules.display().to_string()], None);
    assert!(ok, "promtool check rules:\n{report}");
}

/// A port already in use is a clear startup error.
#[test]
fn metrics_port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let log = failed_start_log(
        &format!("\n\n[metrics]\nlisten = \"127.0.0.1:{port}\""),
        "builder kept running",
    );
    assert!(
        log.contains(&format!("cannot serve metrics on 127.0.0.1:{port}")),
        "{log}"
    );
}
