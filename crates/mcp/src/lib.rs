//! `homelab-deploy mcp`: an MCP server over stdio for AI assistants.
//!
//! Read-only tools are always there; `build` and `cancel_build` only with `--enable-builds`
//! (otherwise they are not listed, and calling them is a tool error that says how to enable
//! them). Every failure — bad arguments, NATS down, unknown request — is a tool error with a
//! clear message; the server keeps serving. Logs go to stderr: stdout is the protocol.

use std::time::Duration;

use homelab_deploy_client::inspect::{list_builders, list_builds, request_state};
use homelab_deploy_client::{connect, submit, ConnectSettings, LogStream, SubmitOptions};
use homelab_deploy_protocol::api::{
    ApiError, BuildsQuery, CancelReply, CancelRequest, RequestPhase, CANCEL_SUBJECT,
};
use homelab_deploy_protocol::request::{check_git_ref, check_rev};
use homelab_deploy_protocol::{Event, EventBody, Mode, RepoName, RequestId, Target};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ProgressNotificationParam, RequestMetaObject, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{
    schemars, tool, tool_handler, tool_router, ErrorData, Peer, RoleServer, ServerHandler,
    ServiceExt,
};
use serde::Deserialize;
use serde_json::{json, Value};

/// Tools that change something; only with `--enable-builds`.
const WRITE_TOOLS: [&str; 2] = ["build", "cancel_build"];
const DEFAULT_WAIT_SECS: u64 = 300;
const MAX_WAIT_SECS: u64 = 1800;
const DEFAULT_LOG_LINES: usize = 40;
const MAX_LOG_LINES: usize = 400;
const MAX_LOG_BYTES: usize = 32 * 1024;

/// Serves MCP on stdin/stdout until the client goes away.
pub async fn serve_stdio(settings: ConnectSettings, enable_builds: bool) -> Result<(), String> {
    let server = BuildTools::new(settings, enable_builds);
    let service = server
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|err| format!("MCP handshake failed: {err}"))?;
    service
        .waiting()
        .await
        .map_err(|err| format!("MCP server stopped: {err}"))?;
    Ok(())
}

#[derive(Clone)]
pub struct BuildTools {
    settings: ConnectSettings,
    enable_builds: bool,
    tool_router: ToolRouter<Self>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct BuildArgs {
    /// Repo to build, as the builders name it (see list_repos_and_hosts).
    pub repo: String,
    /// One host name of the repo's flake, or "all".
    pub target: String,
    /// Exact commit to build (7-40 hex digits). Default: the head of the repo's branch.
    pub rev: Option<String>,
    /// Branch or tag to build instead of the repo's default branch.
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    /// "replace" (default): cancel an older build of the same target; "enqueue": wait behind it.
    pub mode: Option<String>,
    /// Seconds to wait for the result before returning the id (default 300, at most 1800).
    pub wait_secs: Option<u64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct IdArgs {
    /// The request id (returned by build, or shown by list_builds).
    pub id: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct CancelArgs {
    /// The request id to cancel.
    pub id: String,
    /// Why; shown to whoever looks at the build.
    pub reason: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct LogsArgs {
    /// The request id.
    pub id: String,
    /// Only this host's log (recommended for failed hosts).
    pub host: Option<String>,
    /// How many of the last lines to return (default 40, at most 400).
    pub lines: Option<usize>,
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
pub struct ListBuildsArgs {
    /// Only builds of this repo.
    pub repo: Option<String>,
    /// Only builds in this state: queued, running, succeeded, failed, cancelled.
    pub state: Option<String>,
    /// At most this many, newest first (default 10, at most 100).
    pub limit: Option<usize>,
}

fn tool_error(message: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(message.into())])
}

fn structured(text: String, value: Value) -> CallToolResult {
    let mut result = CallToolResult::success(vec![ContentBlock::text(text)]);
    result.structured_content = Some(value);
    result
}

type ToolResult = Result<CallToolResult, ErrorData>;

#[tool_router]
impl BuildTools {
    pub fn new(settings: ConnectSettings, enable_builds: bool) -> Self {
        let mut tool_router = Self::tool_router();
        if !enable_builds {
            for name in WRITE_TOOLS {
                tool_router.remove_route(name);
            }
        }
        Self {
            settings,
            enable_builds,
            tool_router,
        }
    }

    async fn jetstream(&self) -> Result<async_nats::jetstream::Context, CallToolResult> {
        connect(&self.settings)
            .await
            .map(async_nats::jetstream::new)
            .map_err(|err| {
                tool_error(format!(
                    "{err}. Is NATS running, and is the MCP server's --nats-url right?"
                ))
            })
    }

    #[tool(
        description = "List the repos the builders serve (what can be built) and which builders serve each. Use this first to learn valid repo names; hosts are the flake's nixosConfigurations, or \"all\"."
    )]
    async fn list_repos_and_hosts(&self) -> ToolResult {
        let js = match self.jetstream().await {
            Ok(js) => js,
            Err(error) => return Ok(error),
        };
        let builders = match list_builders(&js).await {
            Ok(builders) => builders,
            Err(err) => return Ok(tool_error(err.to_string())),
        };
        let mut repos: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        let mut hosts: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for builder in &builders {
            for repo in &builder.repos {
                repos
                    .entry(repo.clone())
                    .or_default()
                    .push(builder.name.clone());
            }
            for (repo, list) in &builder.hosts {
                hosts.entry(repo.clone()).or_insert_with(|| list.clone());
            }
        }
        if repos.is_empty() {
            return Ok(structured(
                "No builder has announced itself: nothing can be built right now.".into(),
                json!({ "repos": {} }),
            ));
        }
        let text = repos
            .iter()
            .map(|(repo, builders)| {
                let known = hosts
                    .get(repo)
                    .map(|h| h.join(", "))
                    .unwrap_or_else(|| "not known yet".to_owned());
                format!("{repo}: hosts {known} (builders: {})", builders.join(", "))
            })
            .collect::<Vec<_>>()
            .join("\n");
        Ok(structured(
            format!("Repos that can be built (target: one of the hosts, or \"all\"):\n{text}"),
            json!({ "repos": repos, "hosts": hosts }),
        ))
    }

    #[tool(
        description = "List the builders of the fleet: name, state (idle, building, draining), repos and last heartbeat."
    )]
    async fn list_builders(&self) -> ToolResult {
        let js = match self.jetstream().await {
            Ok(js) => js,
            Err(error) => return Ok(error),
        };
        match list_builders(&js).await {
            Ok(builders) => {
                let text = if builders.is_empty() {
                    "No builder has announced itself.".to_owned()
                } else {
                    builders
                        .iter()
                        .map(|b| {
                            format!(
                                "{}: {} (repos: {})",
                                b.name,
                                b.states
                                    .iter()
                                    .map(|s| s.label())
                                    .collect::<Vec<_>>()
                                    .join(", "),
                                b.repos.join(", ")
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                };
                Ok(structured(text, json!({ "builders": builders })))
            }
            Err(err) => Ok(tool_error(err.to_string())),
        }
    }

    #[tool(
        description = "List queued and recent builds, newest first, optionally by repo and state (queued, running, succeeded, failed, cancelled)."
    )]
    async fn list_builds(&self, Parameters(args): Parameters<ListBuildsArgs>) -> ToolResult {
        let phase = match args
            .state
            .as_deref()
            .map(|s| RequestPhase::parse(s).ok_or(s))
        {
            Some(Err(bad)) => {
                return Ok(tool_error(format!(
                    "state {bad:?} is not one of queued, running, succeeded, failed, cancelled"
                )))
            }
            Some(Ok(phase)) => Some(phase),
            None => None,
        };
        let js = match self.jetstream().await {
            Ok(js) => js,
            Err(error) => return Ok(error),
        };
        let query = BuildsQuery {
            repo: args.repo,
            phase,
            limit: Some(args.limit.unwrap_or(10).min(100)),
        };
        match list_builds(&js, &query).await {
            Ok(list) => {
                let text = if list.builds.is_empty() {
                    "No builds.".to_owned()
                } else {
                    list.builds
                        .iter()
                        .map(|b| {
                            format!(
                                "{} {} {}: {} ({}/{} hosts done)",
                                b.id,
                                b.repo,
                                b.target,
                                b.phase.as_str(),
                                b.hosts.done,
                                b.hosts.total
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                };
                Ok(structured(text, json!(list)))
            }
            Err(err) => Ok(tool_error(err.to_string())),
        }
    }

    #[tool(
        description = "The state of one build by request id: queued (with position), running (current host, hosts done), or the finished result."
    )]
    async fn build_status(&self, Parameters(args): Parameters<IdArgs>) -> ToolResult {
        let id = match RequestId::parse(&args.id) {
            Ok(id) => id,
            Err(err) => return Ok(tool_error(err.to_string())),
        };
        let js = match self.jetstream().await {
            Ok(js) => js,
            Err(error) => return Ok(error),
        };
        match request_state(&js, &id).await {
            Ok(Some(state)) => {
                let mut text = format!(
                    "Build {} of {} {}: {}",
                    state.id,
                    state.repo,
                    state.target,
                    state.phase.as_str()
                );
                if let Some(position) = state.queue_position {
                    text.push_str(&format!(", position {position} in the queue"));
                }
                if let Some(host) = &state.current_host {
                    text.push_str(&format!(", building {host}"));
                }
                text.push_str(&format!(
                    ". Hosts: {} of {} done ({} built, {} cached, {} failed).",
                    state.hosts.done,
                    state.hosts.total,
                    state.hosts.built,
                    state.hosts.cached,
                    state.hosts.failed
                ));
                if let Some(error) = &state.error {
                    text.push_str(&format!(" Error: {error}"));
                }
                Ok(structured(text, json!(state)))
            }
            Ok(None) => Ok(tool_error(format!(
                "no build with id {id} (never sent, or too old)"
            ))),
            Err(err) => Ok(tool_error(err.to_string())),
        }
    }

    #[tool(
        description = "The last lines of a build's log, or of one host's log (use it to explain why a host failed). Bounded in size."
    )]
    async fn build_logs(&self, Parameters(args): Parameters<LogsArgs>) -> ToolResult {
        let id = match RequestId::parse(&args.id) {
            Ok(id) => id,
            Err(err) => return Ok(tool_error(err.to_string())),
        };
        if let Some(Err(err)) = args.host.as_deref().map(Target::parse) {
            return Ok(tool_error(err.to_string()));
        }
        let wanted = args
            .lines
            .unwrap_or(DEFAULT_LOG_LINES)
            .clamp(1, MAX_LOG_LINES);
        let js = match self.jetstream().await {
            Ok(js) => js,
            Err(error) => return Ok(error),
        };
        let mut logs = match LogStream::open_by_id(&js, &id).await {
            Ok(logs) => logs,
            Err(err) => return Ok(tool_error(err.to_string())),
        };
        let mut tail: std::collections::VecDeque<String> = Default::default();
        // Read what is stored now; stop once caught up (or when nothing arrives).
        while let Ok(Some(Ok((batch, pending)))) =
            tokio::time::timeout(Duration::from_millis(500), logs.next()).await
        {
            if args.host.as_ref().is_none_or(|host| *host == batch.host) {
                for line in batch.lines {
                    if tail.len() == wanted {
                        tail.pop_front();
                    }
                    tail.push_back(format!("{} | {line}", batch.host));
                }
            }
            if pending == 0 {
                break;
            }
        }
        let mut text = tail.into_iter().collect::<Vec<_>>().join("\n");
        if text.len() > MAX_LOG_BYTES {
            let mut start = text.len() - MAX_LOG_BYTES;
            while !text.is_char_boundary(start) {
                start += 1;
            }
            text = format!("…{}", &text[start..]);
        }
        if text.is_empty() {
            text = format!(
                "No log lines for build {id}{}.",
                args.host.map(|h| format!(" host {h}")).unwrap_or_default()
            );
        }
        Ok(structured(
            text.clone(),
            json!({ "id": id.to_string(), "log": text }),
        ))
    }

    #[tool(
        description = "Build NixOS hosts: repo and target (a host, or \"all\"), optionally a rev or ref. Waits up to wait_secs (default 300) and returns per-host results; if still running then, returns the request id: call build_status. Sends progress notifications (host k of n) when the client gives a progress token."
    )]
    async fn build(
        &self,
        Parameters(args): Parameters<BuildArgs>,
        meta: RequestMetaObject,
        peer: Peer<RoleServer>,
    ) -> ToolResult {
        let repo = match RepoName::parse(&args.repo) {
            Ok(repo) => repo,
            Err(err) => return Ok(tool_error(err.to_string())),
        };
        let target = match Target::parse(&args.target) {
            Ok(target) => target,
            Err(err) => return Ok(tool_error(err.to_string())),
        };
        if let Some(Err(err)) = args.rev.as_deref().map(check_rev) {
            return Ok(tool_error(err.to_string()));
        }
        if let Some(Err(err)) = args.git_ref.as_deref().map(check_git_ref) {
            return Ok(tool_error(err.to_string()));
        }
        let mode = match args.mode.as_deref() {
            None | Some("replace") => Mode::Replace,
            Some("enqueue") => Mode::Enqueue,
            Some(other) => {
                return Ok(tool_error(format!(
                    "mode {other:?} is not \"replace\" or \"enqueue\""
                )))
            }
        };
        let wait = Duration::from_secs(
            args.wait_secs
                .unwrap_or(DEFAULT_WAIT_SECS)
                .min(MAX_WAIT_SECS),
        );
        let client = match connect(&self.settings).await {
            Ok(client) => client,
            Err(err) => {
                return Ok(tool_error(format!(
                    "{err}. Is NATS running, and is the MCP server's --nats-url right?"
                )))
            }
        };
        let options = SubmitOptions {
            requested_by: Some("mcp".to_owned()),
            git_ref: args.git_ref,
            rev: args.rev,
            mode,
            ..Default::default()
        };
        let mut submission = match submit(&client, &repo, &target, options).await {
            Ok(submission) => submission,
            Err(err) => return Ok(tool_error(err.to_string())),
        };
        let token = meta.get_progress_token();
        let id = submission.id.to_string();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let next = tokio::select! {
                next = submission.events.next() => next,
                _ = tokio::time::sleep_until(deadline) => {
                    return Ok(structured(
                        format!("Build {id} of {repo} {target} is still running after {}s; call build_status with this id.", wait.as_secs()),
                        json!({ "id": id, "phase": "running" }),
                    ));
                }
            };
            let event = match next {
                Some(Ok(event)) => event,
                Some(Err(err)) => {
                    return Ok(tool_error(format!(
                        "following build {id} failed: {err}; call build_status with this id"
                    )))
                }
                None => {
                    return Ok(tool_error(format!(
                        "lost the event stream of build {id}; call build_status with this id"
                    )))
                }
            };
            if let (Some(token), EventBody::HostStarted { host, index, total }) =
                (&token, &event.body)
            {
                let progress = ProgressNotificationParam::new(token.clone(), (*index - 1) as f64)
                    .with_total(*total as f64)
                    .with_message(format!("host {index} of {total}: {host}"));
                let _ = peer.notify_progress(progress).await;
            }
            if matches!(event.body, EventBody::Finished { .. }) {
                return Ok(finished_result(&event));
            }
        }
    }

    #[tool(
        description = "Cancel a build by request id: a queued build never starts, a running one is stopped at once. Not a failure."
    )]
    async fn cancel_build(&self, Parameters(args): Parameters<CancelArgs>) -> ToolResult {
        if let Err(err) = RequestId::parse(&args.id) {
            return Ok(tool_error(err.to_string()));
        }
        if args
            .reason
            .as_ref()
            .is_some_and(|r| r.chars().count() > 256 || r.chars().any(char::is_control))
        {
            return Ok(tool_error(
                "reason must be at most 256 printable characters",
            ));
        }
        let client = match connect(&self.settings).await {
            Ok(client) => client,
            Err(err) => return Ok(tool_error(err.to_string())),
        };
        let body = CancelRequest {
            id: args.id.clone(),
            reason: args.reason,
            requested_by: Some("mcp".to_owned()),
        };
        let payload = serde_json::to_vec(&body).unwrap_or_default();
        match tokio::time::timeout(
            Duration::from_secs(15),
            client.request(CANCEL_SUBJECT, payload.into()),
        )
        .await
        {
            Ok(Ok(answer)) => {
                if let Ok(reply) = serde_json::from_slice::<CancelReply>(&answer.payload) {
                    return Ok(structured(reply.message.clone(), json!(reply)));
                }
                let error = serde_json::from_slice::<ApiError>(&answer.payload)
                    .map(|e| e.error)
                    .unwrap_or_else(|_| "unexpected answer from the builders".to_owned());
                Ok(tool_error(error))
            }
            Ok(Err(err)) => Ok(tool_error(format!(
                "no builder answered the cancel ({err}); is any builder running?"
            ))),
            Err(_) => Ok(tool_error("no builder answered the cancel within 15s")),
        }
    }
}

/// A `finished` event as short text an assistant can read aloud, plus the event itself.
fn finished_result(event: &Event) -> CallToolResult {
    let EventBody::Finished {
        status,
        repo,
        target,
        rev,
        hosts,
        error,
        duration_ms,
        ..
    } = &event.body
    else {
        return tool_error("unexpected event");
    };
    let mut text = format!(
        "Build {} of {repo} {target} {} in {:.1}s{}.",
        event.id,
        status.as_str(),
        *duration_ms as f64 / 1000.0,
        rev.as_deref()
            .map(|r| format!(" at {}", r.get(..12).unwrap_or(r)))
            .unwrap_or_default()
    );
    for host in hosts {
        text.push_str(&format!(
            "\n- {}: {} ({:.1}s)",
            host.name,
            host.status.as_str(),
            host.duration_ms as f64 / 1000.0
        ));
        if let Some(error) = &host.error {
            let excerpt: Vec<&str> = error
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            text.push_str(&format!(": {}", excerpt.join(" / ")));
        }
    }
    if let Some(error) = error {
        text.push_str(&format!("\nError: {error}"));
    }
    structured(text, serde_json::to_value(event).unwrap_or(Value::Null))
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for BuildTools {
    fn get_info(&self) -> ServerConfig {
        let mut instructions = "homelab-deploy builds NixOS hosts of flake repos on a fleet of builders. Use list_repos_and_hosts to see what can be built, list_builds and build_status to see builds, build_logs to explain a failure.".to_owned();
        if self.enable_builds {
            instructions.push_str(
                " build starts a build (default mode replace) and cancel_build stops one.",
            );
        } else {
            instructions.push_str(
                " Builds cannot be started from here (the server runs without --enable-builds).",
            );
        }
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new(
                "homelab-deploy",
                env!("CARGO_PKG_VERSION"),
            ))
            .with_instructions(instructions)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        if !self.enable_builds && WRITE_TOOLS.contains(&request.name.as_ref()) {
            return Ok(tool_error(format!(
                "the tool {} is disabled: this MCP server runs read-only; start it with `homelab-deploy mcp --enable-builds` to allow builds and cancels",
                request.name
            ))
            .into());
        }
        let context = ToolCallContext::new(self, request, context);
        self.tool_router.call(context).await
    }
}
