//! The MCP server, driven over stdio by the official Rust SDK's client, against a real
//! nats-server and builder.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmcp::model::{CallToolRequestParams, ClientRequest, ProgressNotificationParam, Request};
use rmcp::service::{NotificationContext, PeerRequestOptions, RunningService};
use rmcp::transport::TokioChildProcess;
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::{json, Value};
use test_support::free_port;

use crate::{bin, Setup};

/// A client that records the progress notifications it gets.
#[derive(Clone, Default)]
struct Recorder {
    progress: Arc<Mutex<Vec<String>>>,
}

impl ClientHandler for Recorder {
    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(params.message.unwrap_or_default());
    }
}

async fn start(
    nats_url: &str,
    enable_builds: bool,
) -> (RunningService<RoleClient, Recorder>, Recorder) {
    let mut command = tokio::process::Command::new(bin());
    command.args(["mcp", "--nats-url", nats_url]);
    if enable_builds {
        command.arg("--enable-builds");
    }
    let transport = TokioChildProcess::new(command).expect("spawn homelab-deploy mcp");
    let recorder = Recorder::default();
    let service = recorder
        .clone()
        .serve(transport)
        .await
        .expect("MCP handshake");
    (service, recorder)
}

async fn call(
    service: &RunningService<RoleClient, Recorder>,
    tool: &str,
    arguments: Value,
) -> Value {
    let params = CallToolRequestParams::new(tool.to_owned())
        .with_arguments(arguments.as_object().cloned().unwrap_or_default());
    let handle = service
        .send_cancellable_request(
            ClientRequest::CallToolRequest(Request::new(params)),
            PeerRequestOptions::no_options(),
        )
        .await
        .expect("send tools/call");
    let response = tokio::time::timeout(Duration::from_secs(120), handle.await_response())
        .await
        .expect("tool answered in time")
        .expect("tool call result");
    serde_json::to_value(response).expect("result as JSON")
}

fn text(result: &Value) -> String {
    result["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn tool_names(service: &RunningService<RoleClient, Recorder>) -> Vec<String> {
    let mut names: Vec<String> = service
        .list_all_tools()
        .await
        .expect("tools/list")
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    names.sort();
    names
}

/// Read-only by default; `--enable-builds` adds `build` and `cancel_build`, whose calls are a
/// clear tool error without it.
#[tokio::test(flavor = "multi_thread")]
async fn tools_are_listed_by_mode() {
    let setup = Setup::new("fleet");
    let (service, _) = start(&setup.nats.url, false).await;
    assert_eq!(
        tool_names(&service).await,
        [
            "build_logs",
            "build_status",
            "list_builders",
            "list_builds",
            "list_repos_and_hosts"
        ]
    );
    let refused = call(&service, "build", json!({"repo": "demo", "target": "web"})).await;
    assert_eq!(refused["isError"], true, "{refused:#}");
    assert!(text(&refused).contains("--enable-builds"), "{refused:#}");
    // Builders announce the hosts they found at start (within a heartbeat or two).
    let mut repos = Value::Null;
    for _ in 0..100 {
        repos = call(&service, "list_repos_and_hosts", json!({})).await;
        if text(&repos).contains("broken-build, broken-eval, db, web") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        text(&repos).contains("demo: hosts broken-build, broken-eval, db, web"),
        "{repos:#}"
    );
    let _ = service.cancel().await;

    let (service, _) = start(&setup.nats.url, true).await;
    let tools = tool_names(&service).await;
    assert!(
        tools.contains(&"build".to_owned()) && tools.contains(&"cancel_build".to_owned()),
        "{tools:?}"
    );
    let _ = service.cancel().await;
}

/// A build through MCP: progress notifications arrive, the result lists every host with the
/// failed one's error, and status and logs can be asked for by id.
#[tokio::test(flavor = "multi_thread")]
async fn build_with_progress_and_a_failed_host() {
    let setup = Setup::new("fleet");
    let (service, recorder) = start(&setup.nats.url, true).await;
    let result = call(&service, "build", json!({"repo": "demo", "target": "all"})).await;
    let summary = text(&result);
    assert!(!result["isError"].as_bool().unwrap_or(false), "{result:#}");
    assert!(
        summary.contains("failed")
            && summary.contains("web: built")
            && summary.contains("broken-build: build_failed"),
        "{summary}"
    );
    assert!(summary.contains("the disk image does not fit"), "{summary}");
    assert_eq!(
        result["structuredContent"]["type"], "finished",
        "{result:#}"
    );
    let progress = recorder
        .progress
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    assert!(
        progress.iter().any(|m| m.contains("host 1 of 4")),
        "{progress:?}"
    );

    let id = result["structuredContent"]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let status = call(&service, "build_status", json!({"id": id})).await;
    assert!(text(&status).contains("failed"), "{status:#}");
    let logs = call(
        &service,
        "build_logs",
        json!({"id": id, "host": "broken-build"}),
    )
    .await;
    assert!(
        text(&logs).contains("the disk image does not fit"),
        "{logs:#}"
    );
    let builds = call(&service, "list_builds", json!({"state": "failed"})).await;
    assert!(text(&builds).contains(&id), "{builds:#}");
    let _ = service.cancel().await;
}

/// The build tool takes any host name Nix accepts: an FQDN builds alone, named as the flake
/// spells it.
#[tokio::test(flavor = "multi_thread")]
async fn build_tool_builds_an_fqdn_host() {
    let setup = Setup::new("names");
    let (service, _) = start(&setup.nats.url, true).await;
    let result = call(
        &service,
        "build",
        json!({"repo": "demo", "target": "web.example.org"}),
    )
    .await;
    assert!(!result["isError"].as_bool().unwrap_or(false), "{result:#}");
    let summary = text(&result);
    assert!(summary.contains("web.example.org: built"), "{summary}");
    let finished = &result["structuredContent"];
    assert_eq!(finished["target"], "web.example.org", "{result:#}");
    assert_eq!(
        finished["hosts"].as_array().map(Vec::len),
        Some(1),
        "{result:#}"
    );
    let _ = service.cancel().await;
}

/// Bad arguments are tool errors with a clear message, and the server keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn invalid_arguments_are_tool_errors() {
    let setup = Setup::new("fleet");
    let (service, _) = start(&setup.nats.url, true).await;
    for (args, expected) in [
        (json!({"repo": "demo", "target": ""}), "empty"),
        (
            json!({"repo": "no-such-repo", "target": "all"}),
            "no builder serves repo no-such-repo",
        ),
        (json!({"repo": "demo", "target": "x".repeat(10_000)}), "512"),
        (
            json!({"repo": "demo", "target": "web", "rev": "HEAD~1"}),
            "hex",
        ),
        (
            json!({"repo": "demo", "target": "web", "mode": "explode"}),
            "replace",
        ),
    ] {
        let result = call(&service, "build", args.clone()).await;
        assert_eq!(result["isError"], true, "{args}: {result:#}");
        assert!(
            text(&result).contains(expected),
            "{args}: {}",
            text(&result)
        );
    }
    let status = call(&service, "build_status", json!({"id": "no such id"})).await;
    assert_eq!(status["isError"], true);
    let ok = call(&service, "list_builders", json!({})).await;
    assert!(text(&ok).contains("idle"), "{ok:#}");
    let _ = service.cancel().await;
}

/// NATS down: a tool error that says so; the server keeps answering.
#[tokio::test(flavor = "multi_thread")]
async fn nats_down_is_a_tool_error() {
    let dead = format!("nats://127.0.0.1:{}", free_port());
    let (service, _) = start(&dead, true).await;
    for _ in 0..2 {
        let result = call(&service, "list_builders", json!({})).await;
        assert_eq!(result["isError"], true, "{result:#}");
        assert!(
            text(&result).contains("cannot reach NATS"),
            "{}",
            text(&result)
        );
    }
    let _ = service.cancel().await;
}
