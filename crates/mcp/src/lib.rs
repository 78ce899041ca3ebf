//! `homelab-deploy mcp`: an MCP server over stdio for AI assistants.
//!
//! Read-only tools are always there; `build` and `cancel_build` only with `--enable-builds`
//! (otherwise they are not listed, and calling them is a tool error that says how to enable
//! them). Every failure — bad arguments, NATS down, unknown request — is a tool error with a
//! clear message; the server keeps serving. Logs go to stderr: stdout is the protocol.
//!
//! Every tool declares a title, annotations (read-only or destructive) and an `outputSchema`
//! that its `structuredContent` follows; results stay within [`summary::RESULT_MAX_BYTES`] (see
//! [`summary`]).

mod choice;
mod summary;

use std::time::Duration;

use async_nats::connection::State;
use homelab_deploy_client::control::{
    self, list_builders, list_builds, status, wait_for_finished, Seen, WaitEnd,
};
use homelab_deploy_client::inspect::{fold_event, fold_events};
use homelab_deploy_client::{
    connect, submit, ClientError, ConnectSettings, LogStream, Signer, SubmitOptions,
};
use homelab_deploy_protocol::api::{
    BuildsCursor, BuildsQuery, CancelRequest, RequestPhase, RequestState, BUILDER_LOST_AFTER_SECS,
};
use homelab_deploy_protocol::request::{check_git_ref, check_rev, is_valid_note, MAX_NOTE_CHARS};
use homelab_deploy_protocol::text;
use homelab_deploy_protocol::{Event, EventBody, Mode, Priority, RepoName, RequestId, Target};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::{schema_for_output, ToolCallContext};
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ProgressNotificationParam, ProgressToken, RequestMetaObject, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{
    schemars, tool, tool_handler, tool_router, ErrorData, Peer, RoleServer, ServerHandler,
    ServiceExt,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::choice::Choice;
use crate::summary::{
    cap_text, list_line, summarize, summary_text, BuildSummary, BuilderSummary, FULL, LIST,
    RESULT_MAX_BYTES,
};

/// Tools that change something; only with `--enable-builds`.
const WRITE_TOOLS: [&str; 2] = ["build", "cancel_build"];
const DEFAULT_WAIT_SECS: u64 = 300;
const MAX_WAIT_SECS: u64 = 1800;
const DEFAULT_LOG_LINES: usize = 40;
const MAX_LOG_LINES: usize = 400;
const DEFAULT_LIST_LIMIT: usize = 10;
const MAX_LIST_LIMIT: usize = 100;

/// Why the MCP server stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    /// The client on stdin/stdout did not complete the MCP initialization.
    #[error("MCP handshake failed: {0}")]
    Handshake(#[from] Box<rmcp::service::ServerInitializeError>),
    /// The task serving the session panicked or was cancelled.
    #[error("MCP server stopped: {0}")]
    Stopped(#[from] tokio::task::JoinError),
}

/// Serves MCP on stdin/stdout until the client goes away.
///
/// # Errors
/// [`McpError`] when the handshake fails or the serving task dies.
pub async fn serve_stdio(settings: ConnectSettings, enable_builds: bool) -> Result<(), McpError> {
    let server = BuildTools::new(settings, enable_builds);
    let service = server
        .serve(rmcp::transport::stdio())
        .await
        .map_err(Box::new)?;
    service.waiting().await?;
    Ok(())
}

#[derive(Clone)]
pub(crate) struct BuildTools {
    settings: ConnectSettings,
    enable_builds: bool,
    tool_router: ToolRouter<Self>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(crate) struct BuildArgs {
    /// Repo to build, as the builders name it (see list_repos_and_hosts).
    pub repo: String,
    /// One host name of the repo's flake, or "all".
    pub target: String,
    /// Exact commit to build (7-40 hex digits). Default: the head of the repo's branch.
    pub rev: Option<String>,
    /// Branch or tag to build instead of the repo's default branch.
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    /// "enqueue" (default, as the CLI): wait in line behind other builds of the same target.
    /// "replace": cancel them, queued or running, even someone else's (destructive).
    #[serde(default, deserialize_with = "choice::optional")]
    #[schemars(with = "Choice<Mode>")]
    pub mode: Option<Choice<Mode>>,
    /// Queue class: "interactive" (default) starts before "ci", which starts before "scheduled".
    #[serde(default, deserialize_with = "choice::optional")]
    #[schemars(with = "Choice<Priority>")]
    pub priority: Option<Choice<Priority>>,
    /// Seconds to wait for the result before returning the id and the build's phase
    /// (default 300). The build goes on either way.
    #[schemars(range(min = 0, max = 1800))]
    pub wait_secs: Option<u64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(crate) struct IdArgs {
    /// The request id (returned by build, or shown by list_builds).
    pub id: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(crate) struct CancelArgs {
    /// The request id to cancel.
    pub id: String,
    /// Why; shown to whoever looks at the build (at most 256 characters).
    pub reason: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(crate) struct LogsArgs {
    /// The request id.
    pub id: String,
    /// Only this host's log (recommended for failed hosts).
    pub host: Option<String>,
    /// How many of the last lines to return (default 40).
    #[schemars(range(min = 1, max = 400))]
    pub lines: Option<usize>,
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
pub(crate) struct ListBuildsArgs {
    /// Only builds of this repo.
    pub repo: Option<String>,
    /// Only builds in this state.
    #[serde(default, deserialize_with = "choice::optional")]
    #[schemars(with = "Choice<RequestPhase>")]
    pub state: Option<Choice<RequestPhase>>,
    /// At most this many, newest first (default 10).
    #[schemars(range(min = 1, max = 100))]
    pub limit: Option<usize>,
    /// The next_cursor of the page before, for older builds.
    pub cursor: Option<String>,
}

/// `list_repos_and_hosts`: repo → builders serving it, and repo → the flake's hosts.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub(crate) struct ReposOutput {
    pub repos: std::collections::BTreeMap<String, Vec<String>>,
    pub hosts: std::collections::BTreeMap<String, Vec<String>>,
}

/// `list_builders`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub(crate) struct BuildersOutput {
    pub builders: Vec<BuilderSummary>,
}

/// `list_builds`: one page, newest first.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub(crate) struct BuildsOutput {
    pub builds: Vec<BuildSummary>,
    /// Pass as `cursor` for older builds; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// `build_logs`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub(crate) struct LogsOutput {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The last lines, `host | line`, cut at the front to stay small.
    pub log: String,
}

/// `cancel_build`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub(crate) struct CancelOutput {
    pub id: String,
    /// The phase the build was in.
    #[schemars(extend("enum" = ["queued", "running"]))]
    pub was: String,
    pub message: String,
}

fn tool_error(message: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(message.into())])
}

fn structured(text: String, value: &impl Serialize) -> CallToolResult {
    let mut result = CallToolResult::success(vec![ContentBlock::text(text)]);
    result.structured_content = Some(serde_json::to_value(value).unwrap_or(Value::Null));
    result
}

/// A number argument outside `min..=max` is refused, not clamped: the caller learns the bound.
fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
    name: &str,
    value: Option<T>,
    default: T,
    min: T,
    max: T,
) -> Result<T, CallToolResult> {
    let value = value.unwrap_or(default);
    if value < min || value > max {
        return Err(tool_error(format!(
            "{name} {value} is out of range: give {min} to {max}"
        )));
    }
    Ok(value)
}

type ToolResult = Result<CallToolResult, ErrorData>;

/// Sends progress notifications that only rise, as MCP requires. They are made while the
/// client crate's wait loop runs (synchronously) and sent in that order by one task; at most
/// one per event of the request, and a request's `progress` events come at most once a second.
struct ProgressReporter {
    token: Option<ProgressToken>,
    outbox: Option<mpsc::UnboundedSender<ProgressNotificationParam>>,
    sender: Option<tokio::task::JoinHandle<()>>,
    last: Option<f64>,
}

impl ProgressReporter {
    /// Reports to the client under `token`; without a token it reports nothing.
    fn new(token: Option<ProgressToken>, peer: Peer<RoleServer>) -> Self {
        let (outbox, sender) = match &token {
            Some(_) => {
                let (outbox, mut inbox) = mpsc::unbounded_channel::<ProgressNotificationParam>();
                let sender = tokio::spawn(async move {
                    while let Some(param) = inbox.recv().await {
                        let _ = peer.notify_progress(param).await;
                    }
                });
                (Some(outbox), Some(sender))
            }
            None => (None, None),
        };
        Self {
            token,
            outbox,
            sender,
            last: None,
        }
    }

    fn report(&mut self, progress: f64, total: Option<f64>, message: String) {
        let (Some(token), Some(outbox)) = (&self.token, &self.outbox) else {
            return;
        };
        if self.last.is_some_and(|last| progress <= last) {
            return;
        }
        self.last = Some(progress);
        let mut param =
            ProgressNotificationParam::new(token.clone(), progress).with_message(message);
        if let Some(total) = total {
            param = param.with_total(total);
        }
        let _ = outbox.send(param);
    }

    /// Waits until every notification made so far is sent: before the tool's result, which
    /// must come after them.
    async fn finish(mut self) {
        drop(self.outbox.take());
        if let Some(sender) = self.sender.take() {
            let _ = sender.await;
        }
    }

    /// Progress of a request's event: host index plus the derivation fraction of the host
    /// being built, out of the number of hosts.
    fn event(&mut self, event: &Event, current: &mut (usize, usize)) {
        match &event.body {
            EventBody::Started { builder, hosts, .. } => {
                *current = (0, hosts.len());
                let message = format!(
                    "request {} started on builder {builder}: {} host{}",
                    event.id,
                    hosts.len(),
                    if hosts.len() == 1 { "" } else { "s" }
                );
                self.report(0.0, Some(hosts.len() as f64), message);
            }
            EventBody::HostStarted { host, index, total } => {
                *current = (*index, *total);
                self.report(
                    (*index - 1) as f64,
                    Some(*total as f64),
                    format!("host {index} of {total}: {host}"),
                );
            }
            EventBody::Progress {
                host,
                done,
                expected,
                ..
            } if *expected > 0 && current.0 > 0 => {
                let (index, total) = *current;
                let fraction = (*done as f64 / *expected as f64).min(0.99);
                self.report(
                    (index - 1) as f64 + fraction,
                    Some(total as f64),
                    format!("host {index} of {total}: {host}, {done}/{expected} derivations"),
                );
            }
            EventBody::HostFinished {
                index,
                total,
                result,
                ..
            } => {
                self.report(
                    *index as f64,
                    Some(*total as f64),
                    format!(
                        "host {index} of {total}: {} {}",
                        result.name,
                        result.status.as_str()
                    ),
                );
            }
            _ => {}
        }
    }
}

#[tool_router]
impl BuildTools {
    pub(crate) fn new(settings: ConnectSettings, enable_builds: bool) -> Self {
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
        title = "List repos and hosts",
        description = "List the repos the builders serve (what can be built) and which builders serve each. Use this first to learn valid repo names; hosts are the flake's nixosConfigurations, or \"all\".",
        annotations(read_only_hint = true, open_world_hint = false),
        output_schema = schema_for_output::<ReposOutput>()
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
        let mut output = ReposOutput {
            repos: Default::default(),
            hosts: Default::default(),
        };
        for builder in &builders {
            for repo in &builder.repos {
                output
                    .repos
                    .entry(repo.clone())
                    .or_default()
                    .push(builder.name.clone());
            }
            for (repo, list) in &builder.hosts {
                output
                    .hosts
                    .entry(repo.clone())
                    .or_insert_with(|| list.clone());
            }
        }
        if output.repos.is_empty() {
            return Ok(structured(
                "No builder has announced itself: nothing can be built right now.".into(),
                &output,
            ));
        }
        let text = output
            .repos
            .iter()
            .map(|(repo, builders)| {
                let known = output
                    .hosts
                    .get(repo)
                    .map(|h| h.join(", "))
                    .unwrap_or_else(|| "not known yet".to_owned());
                format!("{repo}: hosts {known} (builders: {})", builders.join(", "))
            })
            .collect::<Vec<_>>()
            .join("\n");
        Ok(structured(
            cap_text(
                format!("Repos that can be built (target: one of the hosts, or \"all\"):\n{text}"),
                "",
            ),
            &output,
        ))
    }

    #[tool(
        title = "List builders",
        description = "List the builders of the fleet: name, state (idle, building, draining, lost), repos and seconds since the last heartbeat.",
        annotations(read_only_hint = true, open_world_hint = false),
        output_schema = schema_for_output::<BuildersOutput>()
    )]
    async fn list_builders(&self) -> ToolResult {
        let js = match self.jetstream().await {
            Ok(js) => js,
            Err(error) => return Ok(error),
        };
        match list_builders(&js).await {
            Ok(builders) => {
                let now = OffsetDateTime::now_utc();
                let output = BuildersOutput {
                    builders: builders
                        .iter()
                        .map(|b| BuilderSummary::new(b, now))
                        .collect(),
                };
                let text = if output.builders.is_empty() {
                    "No builder has announced itself.".to_owned()
                } else {
                    output
                        .builders
                        .iter()
                        .map(|b| {
                            format!(
                                "{}: {} (repos: {}; heartbeat {}s ago)",
                                b.name,
                                b.states.join(", "),
                                b.repos.join(", "),
                                b.heartbeat_age_secs
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                };
                Ok(structured(cap_text(text, ""), &output))
            }
            Err(err) => Ok(tool_error(err.to_string())),
        }
    }

    #[tool(
        title = "List builds",
        description = "List queued and recent builds, newest first, optionally by repo and state. Finished entries name their failed hosts with the error, grouped; build_status gives one build in full. Pages: pass next_cursor as cursor.",
        annotations(read_only_hint = true, open_world_hint = false),
        output_schema = schema_for_output::<BuildsOutput>()
    )]
    async fn list_builds(&self, Parameters(args): Parameters<ListBuildsArgs>) -> ToolResult {
        let phase = match args.state.map(|state| state.get("state")).transpose() {
            Ok(phase) => phase,
            Err(error) => return Ok(tool_error(error.to_string())),
        };
        let limit = match in_range("limit", args.limit, DEFAULT_LIST_LIMIT, 1, MAX_LIST_LIMIT) {
            Ok(limit) => limit,
            Err(error) => return Ok(error),
        };
        let js = match self.jetstream().await {
            Ok(js) => js,
            Err(error) => return Ok(error),
        };
        let query = BuildsQuery {
            repo: args.repo,
            phase,
            limit: Some(limit),
            cursor: args.cursor,
        };
        match list_builds(&js, &query).await {
            Ok(list) => {
                let (output, text) = builds_page(&list.builds, list.next_cursor);
                Ok(structured(text, &output))
            }
            Err(err) => Ok(tool_error(err.to_string())),
        }
    }

    #[tool(
        title = "Build status",
        description = "The state of one build by request id: queued (with position), running (current host, derivations), or the finished result with every failed host's error, grouped.",
        annotations(read_only_hint = true, open_world_hint = false),
        output_schema = schema_for_output::<BuildSummary>()
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
        match status(&js, &id).await {
            Ok(Some(state)) => Ok(summary_result(summarize(&state, FULL))),
            Ok(None) => Ok(tool_error(format!(
                "no build with id {id} (never sent, or too old)"
            ))),
            Err(err) => Ok(tool_error(err.to_string())),
        }
    }

    #[tool(
        title = "Build log",
        description = "The last lines of a build's log, or of one host's log (use it to explain why a host failed). At most 8 KB; a host that failed to evaluate has its error in build_status instead.",
        annotations(read_only_hint = true, open_world_hint = false),
        output_schema = schema_for_output::<LogsOutput>()
    )]
    async fn build_logs(&self, Parameters(args): Parameters<LogsArgs>) -> ToolResult {
        let id = match RequestId::parse(&args.id) {
            Ok(id) => id,
            Err(err) => return Ok(tool_error(err.to_string())),
        };
        if let Some(Err(err)) = args.host.as_deref().map(Target::parse) {
            return Ok(tool_error(err.to_string()));
        }
        let wanted = match in_range("lines", args.lines, DEFAULT_LOG_LINES, 1, MAX_LOG_LINES) {
            Ok(wanted) => wanted,
            Err(error) => return Ok(error),
        };
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
        let lines = tail.into_iter().collect::<Vec<_>>().join("\n");
        // Keep the end (where nix puts the cause), with room for the JSON escaping of the copy
        // in structuredContent.
        let mut text = text::tail_marked(&lines, RESULT_MAX_BYTES / 2);
        if text.is_empty() {
            text = format!(
                "No log lines for build {id}{}. A host that failed to evaluate has no build log: build_status shows its error.",
                args.host.as_deref().map(|h| format!(" host {h}")).unwrap_or_default()
            );
        }
        let output = LogsOutput {
            id: id.to_string(),
            host: args.host,
            log: text.clone(),
        };
        Ok(structured(text, &output))
    }

    #[tool(
        title = "Build NixOS hosts",
        description = "Build NixOS hosts: repo and target (a host, or \"all\"), optionally a rev or ref. mode \"enqueue\" (default) waits behind other builds of the target; \"replace\" cancels them. Waits up to wait_secs (default 300) and returns per-host results with failed hosts grouped by error; if not finished by then, returns the id and what the build is doing (queued with or without a builder online, running, NATS lost): call build_status. Sends progress notifications (the first one has the request id) when the client gives a progress token.",
        annotations(
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = false,
            open_world_hint = false
        ),
        output_schema = schema_for_output::<BuildSummary>()
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
        let mode = match args.mode.map(|mode| mode.get("mode")).transpose() {
            Ok(mode) => mode.unwrap_or_default(),
            Err(error) => return Ok(tool_error(error.to_string())),
        };
        let priority = match args
            .priority
            .map(|priority| priority.get("priority"))
            .transpose()
        {
            Ok(priority) => priority.unwrap_or_default(),
            Err(error) => return Ok(tool_error(error.to_string())),
        };
        let wait = match in_range(
            "wait_secs",
            args.wait_secs,
            DEFAULT_WAIT_SECS,
            0,
            MAX_WAIT_SECS,
        ) {
            Ok(secs) => Duration::from_secs(secs),
            Err(error) => return Ok(error),
        };
        let client = match connect(&self.settings).await {
            Ok(client) => client,
            Err(err) => {
                return Ok(tool_error(format!(
                    "{err}. Is NATS running, and is the MCP server's --nats-url right?"
                )))
            }
        };
        let signer = match Signer::for_settings(&self.settings) {
            Ok(signer) => signer,
            Err(err) => return Ok(tool_error(err.to_string())),
        };
        let options = SubmitOptions {
            requested_by: Some("mcp".to_owned()),
            git_ref: args.git_ref,
            rev: args.rev,
            mode,
            priority,
            signer,
            ..Default::default()
        };
        let mut submission = match submit(&client, &repo, &target, options).await {
            Ok(submission) => submission,
            Err(err) => return Ok(tool_error(err.to_string())),
        };
        let id = submission.id.to_string();
        let mut progress = ProgressReporter::new(meta.get_progress_token(), peer);
        progress.report(
            0.0,
            None,
            format!("request {id} queued ({repo} {target}); build_status with this id follows it"),
        );
        let mut state: Option<RequestState> = None;
        let mut current = (0, 0);
        let deadline = tokio::time::Instant::now() + wait;
        let waited = wait_for_finished(
            &mut submission.events,
            deadline,
            wait.max(Duration::from_secs(1)),
            |seen| {
                if let Seen::Event(event) = seen {
                    progress.event(event, &mut current);
                    match &mut state {
                        Some(state) => fold_event(state, event),
                        None => state = fold_events(std::slice::from_ref(event)),
                    }
                }
            },
        )
        .await;
        progress.finish().await;
        let lost = match waited {
            Ok(_) => match &state {
                Some(state) => return Ok(summary_result(summarize(state, FULL))),
                None => None,
            },
            Err(WaitEnd::TimedOut) => None,
            Err(WaitEnd::Failed(err)) => Some(format!("following its events failed: {err}")),
            Err(WaitEnd::Closed) => Some("the event subscription ended".to_owned()),
        };
        Ok(self
            .unfinished(&client, &submission.id, &repo, &target, state, lost, wait)
            .await)
    }

    #[tool(
        title = "Cancel a build",
        description = "Cancel a build by request id: a queued build never starts, a running one is stopped at once. Not a failure.",
        annotations(
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        ),
        output_schema = schema_for_output::<CancelOutput>()
    )]
    async fn cancel_build(&self, Parameters(args): Parameters<CancelArgs>) -> ToolResult {
        if let Err(err) = RequestId::parse(&args.id) {
            return Ok(tool_error(err.to_string()));
        }
        if args.reason.as_deref().is_some_and(|r| !is_valid_note(r)) {
            return Ok(tool_error(format!(
                "reason must be at most {MAX_NOTE_CHARS} printable characters"
            )));
        }
        let client = match connect(&self.settings).await {
            Ok(client) => client,
            Err(err) => return Ok(tool_error(err.to_string())),
        };
        // Signed with the seed the server connects with, so the builders know who cancels.
        let signer = match Signer::for_settings(&self.settings) {
            Ok(signer) => signer,
            Err(err) => return Ok(tool_error(err.to_string())),
        };
        let request = CancelRequest {
            id: args.id.clone(),
            reason: args.reason,
            requested_by: Some("mcp".to_owned()),
        };
        match control::cancel(&client, signer.as_ref(), &request).await {
            Ok(reply) => {
                let output = CancelOutput {
                    id: reply.id,
                    was: reply.was.as_str().to_owned(),
                    message: reply.message,
                };
                Ok(structured(output.message.clone(), &output))
            }
            Err(err @ ClientError::NoResponders { .. }) => Ok(tool_error(format!(
                "{err}; the cancel needs a running builder"
            ))),
            Err(err) => Ok(tool_error(err.to_string())),
        }
    }
}

impl BuildTools {
    /// The result of a `build` call that stopped waiting before `finished`: what the build is
    /// doing now, read from the streams, and why it is not done.
    #[allow(clippy::too_many_arguments)]
    async fn unfinished(
        &self,
        client: &async_nats::Client,
        id: &RequestId,
        repo: &RepoName,
        target: &Target,
        followed: Option<RequestState>,
        lost: Option<String>,
        waited: Duration,
    ) -> CallToolResult {
        let js = async_nats::jetstream::new(client.clone());
        let nats_down = client.connection_state() != State::Connected;
        let read = if nats_down {
            None
        } else {
            tokio::time::timeout(Duration::from_secs(10), status(&js, id))
                .await
                .ok()
                .and_then(Result::ok)
                .flatten()
        };
        let state = read.or(followed);
        let why = match (&lost, nats_down) {
            (_, true) => format!(
                "The connection to NATS is lost, so its phase is unknown; the build goes on if a builder has it. Call build_status with id {id} once NATS is back."
            ),
            (Some(reason), false) => format!("Stopped following it: {reason}."),
            (None, false) => format!("Not finished after waiting {}s.", waited.as_secs()),
        };
        let Some(state) = state else {
            let mut summary = summarize(&blank(id, repo, target), FULL);
            summary.phase = RequestPhase::Queued;
            summary.note = Some(why);
            return summary_result(summary);
        };
        let now = match state.phase {
            RequestPhase::Queued if !nats_down => {
                let builders = list_builders(&js).await.unwrap_or_default();
                let now = OffsetDateTime::now_utc();
                let online: Vec<&str> = builders
                    .iter()
                    .filter(|b| {
                        b.repos.iter().any(|r| r == repo.as_str())
                            && (now - b.heartbeat).whole_seconds() <= BUILDER_LOST_AFTER_SECS
                    })
                    .map(|b| b.name.as_str())
                    .collect();
                if online.is_empty() {
                    format!(" It is queued, and no builder serving {repo} is online (none announced itself in the last {BUILDER_LOST_AFTER_SECS}s): it starts when one comes.")
                } else {
                    format!(
                        " It is queued behind other builds; builders serving {repo}: {}.",
                        online.join(", ")
                    )
                }
            }
            RequestPhase::Running => " It is running.".to_owned(),
            _ => String::new(),
        };
        let mut summary = summarize(&state, FULL);
        summary.note = Some(format!("{why}{now}"));
        summary_result(summary)
    }
}

/// A state with only the id, repo and target, for a request no stream answers about.
fn blank(id: &RequestId, repo: &RepoName, target: &Target) -> RequestState {
    homelab_deploy_client::inspect::blank_state(
        id.as_str(),
        repo.as_str(),
        target.as_str(),
        RequestPhase::Queued,
        OffsetDateTime::now_utc(),
    )
}

fn summary_result(summary: BuildSummary) -> CallToolResult {
    structured(summary_text(&summary), &summary)
}

/// A page of `list_builds` that fits in [`RESULT_MAX_BYTES`]: cut short (with a cursor to the
/// rest) when the entries do not fit.
fn builds_page(states: &[RequestState], next_cursor: Option<String>) -> (BuildsOutput, String) {
    let mut keep = states.len();
    loop {
        let builds: Vec<BuildSummary> = states[..keep].iter().map(|s| summarize(s, LIST)).collect();
        let cursor = if keep < states.len() {
            states[..keep]
                .last()
                .map(|last| BuildsCursor::after(last).to_string())
        } else {
            next_cursor.clone()
        };
        let output = BuildsOutput {
            builds,
            next_cursor: cursor,
        };
        let size = serde_json::to_vec(&output).map(|v| v.len()).unwrap_or(0);
        if size <= RESULT_MAX_BYTES || keep <= 1 {
            let mut text = if output.builds.is_empty() {
                "No builds.".to_owned()
            } else {
                output
                    .builds
                    .iter()
                    .map(list_line)
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            if let Some(cursor) = &output.next_cursor {
                text.push_str(&format!(
                    "\nMore builds: call list_builds with cursor {cursor:?}."
                ));
            }
            text.push_str("\nbuild_status with an id gives that build in full.");
            return (output, cap_text(text, ""));
        }
        keep = (keep * RESULT_MAX_BYTES / size).clamp(1, keep - 1);
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for BuildTools {
    fn get_info(&self) -> ServerConfig {
        let mut instructions = "homelab-deploy builds NixOS hosts of flake repos on a fleet of builders. Use list_repos_and_hosts to see what can be built, list_builds and build_status to see builds, build_logs to explain a failure.".to_owned();
        if self.enable_builds {
            instructions.push_str(
                " build starts a build (default mode enqueue: it waits behind other builds of the same target; mode replace cancels them) and cancel_build stops one.",
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
