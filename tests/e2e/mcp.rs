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

/// A client that records the progress notifications it gets: value and message.
#[derive(Clone, Default)]
struct Recorder {
    progress: Arc<Mutex<Vec<(f64, String)>>>,
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
            .push((params.progress, params.message.unwrap_or_default()));
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

/// Every tool says what it is and what it returns: a title, read-only or destructive
/// annotations, an output schema, enums for modes and states, and bounds for numbers.
#[tokio::test(flavor = "multi_thread")]
async fn tools_declare_titles_annotations_and_schemas() {
    let setup = Setup::new("fleet");
    let (service, _) = start(&setup.nats.url, true).await;
    let tools: Vec<Value> = service
        .list_all_tools()
        .await
        .expect("tools/list")
        .into_iter()
        .map(|t| serde_json::to_value(t).expect("tool as JSON"))
        .collect();
    let tool = |name: &str| {
        tools
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("no tool {name}"))
            .clone()
    };
    for t in &tools {
        assert!(t["title"].is_string(), "{t:#}");
        assert_eq!(t["outputSchema"]["type"], "object", "{t:#}");
        let read_only = !["build", "cancel_build"].contains(&t["name"].as_str().unwrap_or(""));
        assert_eq!(t["annotations"]["readOnlyHint"], read_only, "{t:#}");
        if !read_only {
            assert_eq!(t["annotations"]["destructiveHint"], true, "{t:#}");
        }
    }
    let build = tool("build");
    let props = &build["inputSchema"]["properties"];
    assert_eq!(
        props["mode"]["enum"],
        json!(["enqueue", "replace"]),
        "{props:#}"
    );
    assert_eq!(
        props["priority"]["enum"],
        json!(["interactive", "ci", "scheduled"]),
        "{props:#}"
    );
    assert_eq!(props["wait_secs"]["maximum"], 1800, "{props:#}");
    let list = tool("list_builds");
    let props = &list["inputSchema"]["properties"];
    assert_eq!(props["limit"]["maximum"], 100, "{props:#}");
    assert_eq!(props["limit"]["minimum"], 1, "{props:#}");
    assert!(
        props["state"]["enum"]
            .as_array()
            .is_some_and(|states| states.contains(&json!("queued"))),
        "{props:#}"
    );
    assert_eq!(
        tool("build_logs")["inputSchema"]["properties"]["lines"]["maximum"],
        400
    );
    assert!(
        build["outputSchema"]["properties"]["failures"].is_object(),
        "{build:#}"
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
    let structured = &result["structuredContent"];
    assert_eq!(structured["phase"], "failed", "{result:#}");
    let failures = structured["failures"].as_array().expect("failures");
    assert!(
        failures.iter().any(|f| f["status"] == "eval_failed"
            && f["hosts"] == json!(["broken-eval"])
            && f["error"]
                .as_str()
                .unwrap_or("")
                .contains("services.nginx.enable")),
        "{failures:#?}"
    );
    let mut progress = recorder
        .progress
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    // rmcp runs each incoming notification's handler in a task of its own, so the recorder may
    // see two in another order than they were sent; the order as sent is checked through the
    // Python SDK (`the_python_sdk_accepts_every_result`). Here: distinct values, the lowest
    // (the first sent) naming the request.
    progress.sort_by(|a, b| a.0.total_cmp(&b.0));
    let id = structured["id"].as_str().expect("id").to_owned();
    assert!(
        progress.first().is_some_and(|(_, m)| m.contains(&id)),
        "the first notification names the request: {progress:?}"
    );
    assert!(
        progress.iter().any(|(_, m)| m.contains("host 1 of 4")),
        "{progress:?}"
    );
    assert!(
        progress.windows(2).all(|w| w[1].0 > w[0].0),
        "no progress value sent twice: {progress:?}"
    );

    let status = call(&service, "build_status", json!({"id": id})).await;
    assert!(text(&status).contains("failed"), "{status:#}");
    assert!(
        text(&status).contains("services.nginx.enable"),
        "an evaluation error is in the status: {status:#}"
    );
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
    let entry = &builds["structuredContent"]["builds"][0];
    assert_eq!(entry["id"], id.as_str(), "{builds:#}");
    assert!(
        entry["failures"].as_array().is_some_and(|f| f.len() == 2),
        "{builds:#}"
    );
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
        finished["results"],
        json!([{"name": "web.example.org", "status": "built"}]),
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
            "enqueue",
        ),
        (
            json!({"repo": "demo", "target": "web", "wait_secs": 100000}),
            "wait_secs 100000 is out of range: give 0 to 1800",
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
    for (tool, args) in [
        ("build_logs", json!({"id": "abcdefgh", "lines": 100000})),
        ("list_builds", json!({"limit": 0})),
    ] {
        let refused = call(&service, tool, args.clone()).await;
        assert_eq!(refused["isError"], true, "{args}: {refused:#}");
        assert!(text(&refused).contains("out of range"), "{refused:#}");
    }
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

/// With no builder online, `build` (default mode `enqueue`, as the CLI) returns when its wait
/// ends and says the request is queued with no builder to take it, not "still running".
#[tokio::test(flavor = "multi_thread")]
async fn a_wait_that_ends_says_the_real_phase() {
    let mut setup = Setup::new("fleet");
    setup.builder.terminate(Duration::from_secs(30));
    let (service, recorder) = start(&setup.nats.url, true).await;
    let result = call(
        &service,
        "build",
        json!({"repo": "demo", "target": "web", "wait_secs": 1}),
    )
    .await;
    assert!(!result["isError"].as_bool().unwrap_or(false), "{result:#}");
    let structured = &result["structuredContent"];
    assert_eq!(structured["phase"], "queued", "{result:#}");
    assert!(
        structured["note"]
            .as_str()
            .unwrap_or_default()
            .contains("no builder serving demo is online"),
        "{result:#}"
    );
    assert!(!text(&result).contains("still running"), "{result:#}");
    let id = structured["id"].as_str().expect("id").to_owned();
    let progress = recorder
        .progress
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    assert!(
        progress.is_empty() || progress[0].1.contains(&id),
        "{progress:?}"
    );

    let client = async_nats::connect(&setup.nats.url).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let pending = homelab_deploy_client::inspect::pending_requests(&js)
        .await
        .expect("read the queue");
    let request = pending.iter().find(|p| p.id == id).expect("request queued");
    assert_eq!(request.mode, homelab_deploy_protocol::Mode::Enqueue);
    let _ = service.cancel().await;
}

/// A build of 300 failing hosts reads as a page: identical errors grouped, text and
/// structuredContent within 8 KB each, and the call that gives details named.
#[tokio::test(flavor = "multi_thread")]
async fn results_for_300_failing_hosts_stay_small() {
    let setup = Setup::new("fleet");
    let client = async_nats::connect(&setup.nats.url).await.expect("connect");
    let id = "manyfailures02";
    crate::api::store_events(&client, id, &[crate::api::failed_finished(id, 300, 2000)]).await;
    crate::api::fold_history(&client).await;
    let (service, _) = start(&setup.nats.url, false).await;
    for (tool, args) in [
        ("build_status", json!({"id": id})),
        ("list_builds", json!({"state": "failed", "limit": 100})),
    ] {
        let result = call(&service, tool, args).await;
        let body = text(&result);
        let structured = serde_json::to_string(&result["structuredContent"]).expect("json");
        assert!(
            body.len() <= 8 * 1024,
            "{tool}: {} bytes of text",
            body.len()
        );
        assert!(
            structured.len() <= 8 * 1024,
            "{tool}: {} bytes",
            structured.len()
        );
        assert!(
            body.contains("build_status") || body.contains("build_logs"),
            "{body}"
        );
    }
    let status = call(&service, "build_status", json!({"id": id})).await;
    let failures = status["structuredContent"]["failures"]
        .as_array()
        .expect("failures");
    assert_eq!(failures.len(), 3, "{status:#}");
    assert_eq!(failures[0]["hosts"][0], "host000");
    assert_eq!(
        failures[0]["hosts"].as_array().map(Vec::len).unwrap_or(0)
            + failures[0]["more_hosts"].as_u64().unwrap_or(0) as usize,
        100
    );
    assert!(
        text(&status).contains("100 hosts build_failed"),
        "{}",
        text(&status)
    );
    assert!(text(&status).contains("build_logs with id manyfailures02 and host host000"));
    let _ = service.cancel().await;
}

/// The official MCP Python SDK as the client (`tests/mcp/sdk_client.py`): it checks every
/// result's structuredContent against the tool's outputSchema and raises on a mismatch. Every
/// read tool (one request with 300 failing hosts among the builds) and a whole build pass, each
/// within 8 KB, and the build's progress rises from a first notification that names the id.
#[tokio::test(flavor = "multi_thread")]
async fn the_python_sdk_accepts_every_result() {
    let setup = Setup::new("fleet");
    let client = async_nats::connect(&setup.nats.url).await.expect("connect");
    let id = "manyfailures03";
    crate::api::store_events(&client, id, &[crate::api::failed_finished(id, 300, 2000)]).await;
    crate::api::fold_history(&client).await;
    let python = std::env::var("MCP_SDK_PYTHON").unwrap_or_else(|_| {
        panic!("MCP_SDK_PYTHON is not set: run ./scripts/test, which installs the MCP Python SDK (pip install mcp) under .tools")
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/mcp/sdk_client.py");
    let run = tokio::process::Command::new(python)
        .arg(script)
        .arg(bin())
        .arg(&setup.nats.url)
        .arg(id)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("the SDK client finished in time")
        .expect("run the SDK client");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "SDK client failed:\n{stderr}");
    let report: Value = serde_json::from_slice(&output.stdout).expect("report JSON");
    for (tool, call) in report["calls"].as_object().expect("calls") {
        assert_eq!(call["is_error"], false, "{tool}: {call:#}");
        assert!(
            call["text_bytes"].as_u64().unwrap_or(u64::MAX) <= 8192,
            "{tool}: {call:#}"
        );
        assert!(
            call["structured_bytes"].as_u64().unwrap_or(u64::MAX) <= 8192,
            "{tool}: {call:#}"
        );
    }
    for (name, tool) in report["tools"].as_object().expect("tools") {
        assert!(tool["title"].is_string(), "{name}: {tool:#}");
        assert!(tool["annotations"].is_object(), "{name}: {tool:#}");
        assert!(tool["outputSchema"].is_object(), "{name}: {tool:#}");
    }
    let status = &report["calls"]["build_status"]["structured"];
    assert_eq!(
        status["failures"].as_array().map(Vec::len),
        Some(3),
        "{status:#}"
    );
    let build = &report["calls"]["build"]["structured"];
    assert_eq!(build["phase"], "failed", "{build:#}");
    let build_id = build["id"].as_str().expect("build id");
    let progress = report["progress"].as_array().expect("progress");
    assert!(
        progress
            .first()
            .and_then(|p| p[2].as_str())
            .is_some_and(|m| m.contains(build_id)),
        "{progress:#?}"
    );
    let values: Vec<f64> = progress.iter().filter_map(|p| p[0].as_f64()).collect();
    assert!(values.windows(2).all(|w| w[1] > w[0]), "{values:?}");
    assert_eq!(values.last().copied(), Some(4.0), "{values:?}");
}
