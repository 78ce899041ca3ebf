//! Running the `nix` CLI: list a flake's hosts, evaluate a host's toplevel to a derivation, build it.
//!
//! Every command runs in its own process group with a chosen environment; dropping a running
//! command kills the whole group, so a timed-out or cancelled build leaves no `nix` behind.
//! Only host names that the flake itself listed reach a command line, and only as Nix string
//! literals ([`nix_string`]) inside an `--apply` function: a host name is data, never code or
//! part of an attribute path.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use homelab_deploy_credentials::secret_url::redact_urls;
use homelab_deploy_credentials::{Redactor, SecretUrl};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// Longest log line kept; the rest of a longer line is dropped and marked.
pub const MAX_LINE_BYTES: usize = 8 * 1024;
/// Lines of output kept for an error excerpt.
const EXCERPT_LINES: usize = 25;
/// Most stdout read from an evaluation; a host list or a store path is far smaller.
const MAX_STDOUT_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum NixError {
    #[error("cannot run {program}: {source}; is nix installed (Debian: apt install nix-bin) and on PATH?")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{what} failed:\n{excerpt}")]
    Failed { what: String, excerpt: String },
    #[error("{what} printed unexpected output: {detail}")]
    Output { what: String, detail: String },
    #[error("{what} was stopped: nix used {} MiB, over the limit of {} MiB (builder.eval_memory_limit_mb)", rss / (1024 * 1024), limit / (1024 * 1024))]
    MemoryLimit { what: String, rss: u64, limit: u64 },
}

impl NixError {
    /// The part of the error worth showing to a user next to a host: nix's own message.
    pub fn excerpt(&self) -> String {
        match self {
            Self::Failed { excerpt, .. } => excerpt.clone(),
            other => other.to_string(),
        }
    }
}

/// What a build reports while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildOutput {
    /// One line of build log (already cut to [`MAX_LINE_BYTES`]).
    Line(String),
    /// Derivations done / expected / running / failed of the whole build.
    Progress {
        done: u64,
        expected: u64,
        running: u64,
        failed: u64,
    },
}

/// A finished build.
#[derive(Debug, Clone)]
pub struct Built {
    pub out_path: String,
    /// Derivations nix built; 0 means the toplevel was already in the store.
    pub derivations_built: u64,
}

/// The `nix` CLI and how to call it.
#[derive(Debug, Clone)]
pub struct Nix {
    program: PathBuf,
    /// Nix ≥ 2.13 reads a bare `.drv` path as the file itself; outputs need `^*`.
    drv_outputs_suffix: &'static str,
    pub version: String,
    /// A repo's `nix_options` as `--option KEY VALUE` arguments, given to every command.
    options: Vec<String>,
    /// Evaluate with `--impure` (a repo's `impure`).
    impure: bool,
}

/// Settings the builder passes to every nix command, before a repo's own: a flake's
/// `nixConfig` is never applied (so it can neither change nix's settings, e.g. turn on a
/// `post-build-hook`, nor make nix ask about them), whatever the machine's nix.conf says.
const FIXED_ARGS: [&str; 5] = [
    "--extra-experimental-features",
    "nix-command flakes",
    "--option",
    "accept-flake-config",
    "false",
];

impl Nix {
    /// Finds out which nix `program` is; fails when it cannot be run.
    pub async fn detect(program: &Path) -> Result<Self, NixError> {
        let probe = Self {
            program: program.to_owned(),
            drv_outputs_suffix: "",
            version: String::new(),
            options: Vec::new(),
            impure: false,
        };
        let output = probe.run_captured("nix --version", &["--version"]).await?;
        let version = output
            .split_whitespace()
            .last()
            .unwrap_or_default()
            .to_owned();
        let (major, minor) = parse_version(&version);
        Ok(Self {
            drv_outputs_suffix: if (major, minor) >= (2, 13) { "^*" } else { "" },
            version,
            ..probe
        })
    }

    /// This nix with a repo's settings: `--option KEY VALUE` for each of `options` on every
    /// command, and `--impure` on evaluations when `impure`. Keys and values are passed as
    /// arguments, never through a shell or nix.conf (the config checked them).
    pub fn for_repo(&self, impure: bool, options: &[(String, String)]) -> Self {
        let options = options
            .iter()
            .flat_map(|(key, value)| ["--option".to_owned(), key.clone(), value.clone()])
            .collect();
        Self {
            options,
            impure,
            ..self.clone()
        }
    }

    /// `nix eval` with `args`, and `--impure` when the repo asks for it.
    fn eval_args<'a>(&self, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec!["eval"];
        if self.impure {
            all.push("--impure");
        }
        all.extend_from_slice(args);
        all
    }

    /// Names of the flake's `nixosConfigurations`, sorted.
    pub async fn list_hosts(&self, flake: &str) -> Result<Vec<String>, NixError> {
        let installable = format!("{flake}#nixosConfigurations");
        let stdout = self
            .run_captured(
                "listing the flake's nixosConfigurations",
                &self.eval_args(&["--json", &installable, "--apply", "builtins.attrNames"]),
            )
            .await?;
        let mut hosts: Vec<String> =
            serde_json::from_str(&stdout).map_err(|err| NixError::Output {
                what: "nix eval of nixosConfigurations".into(),
                detail: err.to_string(),
            })?;
        hosts.sort();
        Ok(hosts)
    }

    /// Evaluates `nixosConfigurations.<host>.config.system.build.toplevel` to its `.drv` path.
    /// The host name reaches nix as a string literal, whatever it holds (`"`, `${`, `.`).
    pub async fn eval_toplevel_drv(&self, flake: &str, host: &str) -> Result<String, NixError> {
        let installable = format!("{flake}#nixosConfigurations");
        let apply = format!(
            "configs: (builtins.getAttr {} configs).config.system.build.toplevel.drvPath",
            nix_string(host)
        );
        let drv = self
            .run_captured(
                &format!("evaluating host {host}"),
                &self.eval_args(&["--raw", &installable, "--apply", &apply]),
            )
            .await?;
        if !drv.starts_with('/') || !drv.ends_with(".drv") {
            return Err(NixError::Output {
                what: format!("evaluating host {host}"),
                detail: format!("expected a .drv store path, got {:?}", truncate(&drv, 200)),
            });
        }
        Ok(drv)
    }

    /// Builds the outputs of `drv`, keeping the result alive with a GC root at `out_link`.
    /// Log lines and progress go to `output` as they come.
    pub async fn build(
        &self,
        drv: &str,
        out_link: &Path,
        output: mpsc::Sender<BuildOutput>,
    ) -> Result<Built, NixError> {
        let installable = format!("{drv}{}", self.drv_outputs_suffix);
        let out_link = out_link.to_string_lossy();
        let what = format!("building {drv}");
        let mut child = self.spawn(&[
            "build",
            "--json",
            "--log-format",
            "internal-json",
            "--out-link",
            &out_link,
            &installable,
        ])?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let (stdout, log) = tokio::join!(
            read_bounded(stdout, MAX_STDOUT_BYTES),
            follow_internal_json(stderr, output)
        );
        let status = child
            .wait()
            .await
            .map_err(|source| self.spawn_error(source))?;
        if !status.success() {
            return Err(NixError::Failed {
                what,
                excerpt: log.excerpt(),
            });
        }
        let out_path = parse_build_json(&stdout).ok_or_else(|| NixError::Output {
            what,
            detail: format!("no output path in {:?}", truncate(&stdout, 300)),
        })?;
        Ok(Built {
            out_path,
            derivations_built: log.derivations_built,
        })
    }

    fn spawn(&self, args: &[&str]) -> Result<ProcessGroup, NixError> {
        let mut command = Command::new(&self.program);
        command
            .args(FIXED_ARGS)
            .args(&self.options)
            .args(args)
            .env_clear()
            .envs(std::env::vars().filter(|(key, _)| passes_through(key)))
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Not `kill_on_drop`: an immediate SIGKILL would orphan nix's builders; dropping
            // the `ProcessGroup` stops them in order instead (tokio reaps the child).
            .process_group(0);
        command
            .spawn()
            .map(ProcessGroup)
            .map_err(|source| self.spawn_error(source))
    }

    fn spawn_error(&self, source: std::io::Error) -> NixError {
        NixError::Spawn {
            program: self.program.display().to_string(),
            source,
        }
    }

    /// Runs a short nix command; returns its trimmed stdout, or its stderr's tail as the error.
    async fn run_captured(&self, what: &str, args: &[&str]) -> Result<String, NixError> {
        self.run_measured(what, args, None)
            .await
            .map(|(stdout, _)| stdout)
    }

    /// Like `run_captured`, and also returns nix's peak resident memory. With `memory_limit`,
    /// nix is stopped once its RSS goes over it ([`NixError::MemoryLimit`]).
    async fn run_measured(
        &self,
        what: &str,
        args: &[&str],
        memory_limit: Option<u64>,
    ) -> Result<(String, u64), NixError> {
        let mut child = self.spawn(args)?;
        let pid = child.id();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let output =
            async { tokio::join!(read_bounded(stdout, MAX_STDOUT_BYTES), tail_lines(stderr)) };
        let mut peak = 0u64;
        let watch_memory = async {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                let rss = pid.map(resident_bytes).unwrap_or(0);
                peak = peak.max(rss);
                if memory_limit.is_some_and(|limit| rss > limit) {
                    return rss;
                }
            }
        };
        let (stdout, stderr) = tokio::select! {
            output = output => output,
            rss = watch_memory => {
                // Dropping `child` stops nix's process group.
                return Err(NixError::MemoryLimit {
                    what: what.to_owned(),
                    rss,
                    limit: memory_limit.unwrap_or_default(),
                });
            }
        };
        let status = child
            .wait()
            .await
            .map_err(|source| self.spawn_error(source))?;
        if status.success() {
            Ok((stdout.trim().to_owned(), peak))
        } else {
            Err(NixError::Failed {
                what: what.to_owned(),
                excerpt: stderr,
            })
        }
    }

    /// Copies `path` and its closure to the binary cache `store` (a nix store URI). nix quotes
    /// the URI in its errors as it was given: its credentials are scrubbed from the error.
    pub async fn copy_to(&self, store: &SecretUrl, path: &str) -> Result<(), NixError> {
        let what = format!("copying {path} to the binary cache");
        self.run_captured(&what, &["copy", "--to", store.expose(), path])
            .await
            .map(|_| ())
            .map_err(|err| match err {
                NixError::Failed { what, excerpt } => NixError::Failed {
                    what,
                    excerpt: Redactor::new([store], []).redact(&excerpt),
                },
                other => other,
            })
    }

    /// Evaluates the toplevel `.drv` of several hosts in one nix process, so the work they share
    /// (nixpkgs, common modules) is evaluated once. A host whose evaluation throws maps to
    /// `None` (evaluate it alone to learn why); an error `tryEval` cannot catch fails the whole
    /// batch. Returns the drv paths and nix's peak RSS.
    pub async fn eval_toplevel_drvs(
        &self,
        flake: &str,
        hosts: &[String],
        memory_limit: Option<u64>,
    ) -> Result<(HashMap<String, Option<String>>, u64), NixError> {
        let names: Vec<String> = hosts.iter().map(String::as_str).map(nix_string).collect();
        let apply = format!(
            "configs: builtins.listToAttrs (map (name: {{ inherit name; value = \
             let r = builtins.tryEval (builtins.getAttr name configs).config.system.build.toplevel.drvPath; \
             in if r.success then r.value else null; }}) [ {} ])",
            names.join(" ")
        );
        let installable = format!("{flake}#nixosConfigurations");
        let what = format!("evaluating hosts {}", hosts.join(", "));
        let (stdout, peak) = self
            .run_measured(
                &what,
                &self.eval_args(&["--json", &installable, "--apply", &apply]),
                memory_limit,
            )
            .await?;
        let drvs: HashMap<String, Option<String>> =
            serde_json::from_str(&stdout).map_err(|err| NixError::Output {
                what,
                detail: err.to_string(),
            })?;
        Ok((drvs, peak))
    }
}

/// `value` as a Nix string literal: in double quotes, with `\\`, `"` and `$` escaped (so `${`
/// never starts an interpolation) and newline, carriage return and tab written as `\\n`, `\\r`,
/// `\\t`. Nix reads the literal back as exactly `value`: it is data, never code. (Written here
/// because no crate quotes Nix strings; the rules are Nix's lexer's, `src/libexpr/lexer.l`.)
pub fn nix_string(value: &str) -> String {
    let mut literal = String::with_capacity(value.len() + 2);
    literal.push('"');
    for c in value.chars() {
        match c {
            '\\' => literal.push_str("\\\\"),
            '"' => literal.push_str("\\\""),
            '$' => literal.push_str("\\$"),
            '\n' => literal.push_str("\\n"),
            '\r' => literal.push_str("\\r"),
            '\t' => literal.push_str("\\t"),
            c => literal.push(c),
        }
    }
    literal.push('"');
    literal
}

/// Resident memory of process `pid` in bytes (0 when it is gone).
fn resident_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|value| {
                    value
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Environment a nix command may see: what nix needs to find its store, daemon and config, and
/// what `nix copy --to` needs for a binary cache: `s3://` reads the AWS SDK's variables
/// (`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, `AWS_SHARED_CREDENTIALS_FILE`, …), `ssh://` and
/// `ssh-ng://` run `ssh` (an agent, `NIX_SSHOPTS`), `http(s)://` honours the proxy variables.
fn passes_through(key: &str) -> bool {
    matches!(
        key,
        "PATH"
            | "HOME"
            | "USER"
            | "LOGNAME"
            | "TMPDIR"
            | "LANG"
            | "LC_ALL"
            | "TZ"
            | "SSH_AUTH_SOCK"
            | "CURL_CA_BUNDLE"
            | "http_proxy"
            | "https_proxy"
            | "no_proxy"
            | "HTTP_PROXY"
            | "HTTPS_PROXY"
            | "NO_PROXY"
    ) || key.starts_with("NIX_")
        || key.starts_with("XDG_")
        || key.starts_with("SSL_CERT")
        || key.starts_with("AWS_")
}

/// A child that is the leader of its own process group; dropping it kills the whole group.
struct ProcessGroup(Child);

impl std::ops::Deref for ProcessGroup {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for ProcessGroup {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// How long nix gets to stop its builders after SIGTERM before the group is SIGKILLed.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        let Some(pid) = self.0.id().and_then(|pid| i32::try_from(pid).ok()) else {
            return; // already reaped: nothing left to stop
        };
        // SIGTERM first: nix then kills its derivation builders, which run in sessions of
        // their own that a signal to this group would not reach. SIGKILL whatever is left.
        let group = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGTERM);
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + STOP_GRACE;
            while std::time::Instant::now() < deadline {
                // Signal 0 probes whether any process of the group is left.
                if nix::sys::signal::killpg(group, None).is_err() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        });
    }
}

fn parse_version(version: &str) -> (u32, u32) {
    let mut parts = version.split('.').map(|part| {
        part.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap_or(0)
    });
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

fn parse_build_json(stdout: &str) -> Option<String> {
    let value: Value = serde_json::from_str(stdout.trim()).ok()?;
    let outputs = value.get(0)?.get("outputs")?;
    outputs
        .get("out")
        .or_else(|| outputs.as_object()?.values().next())?
        .as_str()
        .map(str::to_owned)
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((index, _)) => &text[..index],
        None => text,
    }
}

async fn read_bounded(pipe: Option<impl AsyncRead + Unpin>, max: usize) -> String {
    let mut out = Vec::new();
    if let Some(pipe) = pipe {
        let _ = pipe.take(max as u64).read_to_end(&mut out).await;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The last lines of a pipe (for error messages), read to its end.
async fn tail_lines(pipe: Option<impl AsyncRead + Unpin>) -> String {
    let mut tail = Excerpt::default();
    if let Some(pipe) = pipe {
        let mut lines = BoundedLines::new(pipe);
        while let Some(line) = lines.next_line().await {
            tail.push(line);
        }
    }
    tail.text()
}

/// The last [`EXCERPT_LINES`] lines seen.
#[derive(Debug, Default)]
struct Excerpt(VecDeque<String>);

impl Excerpt {
    fn push(&mut self, line: String) {
        if line.trim().is_empty() {
            return;
        }
        if self.0.len() == EXCERPT_LINES {
            self.0.pop_front();
        }
        self.0.push_back(redact_urls(&line));
    }

    fn text(&self) -> String {
        let lines: Vec<&str> = self.0.iter().map(String::as_str).collect();
        lines.join("\n")
    }
}

/// What a build's stderr told us once it ended.
struct BuildLog {
    derivations_built: u64,
    log_tail: Excerpt,
    errors: Excerpt,
}

impl BuildLog {
    /// The last lines of the build log, then nix's own error messages.
    fn excerpt(&self) -> String {
        let tail = self.log_tail.text();
        let errors = self.errors.text();
        match (tail.is_empty(), errors.is_empty()) {
            (_, true) => tail,
            (true, false) => errors,
            (false, false) => format!("{tail}\n{errors}"),
        }
    }
}

// Activity and result types of nix's internal-json log format (src/libutil/logging.hh).
const ACT_BUILDS: u64 = 104;
const ACT_BUILD: u64 = 105;
const RES_BUILD_LOG_LINE: u64 = 101;
const RES_PROGRESS: u64 = 105;
const RES_POST_BUILD_LOG_LINE: u64 = 107;

/// Reads `nix --log-format internal-json` stderr to its end, forwarding log lines and progress.
async fn follow_internal_json(
    stderr: Option<impl AsyncRead + Unpin>,
    output: mpsc::Sender<BuildOutput>,
) -> BuildLog {
    let mut log = BuildLog {
        derivations_built: 0,
        log_tail: Excerpt::default(),
        errors: Excerpt::default(),
    };
    let Some(stderr) = stderr else { return log };
    let mut lines = BoundedLines::new(stderr);
    let mut activity_types: HashMap<u64, u64> = HashMap::new();
    // Once the receiver is gone nobody reads logs, but the pipe must still be drained.
    let mut forward = true;
    while let Some(line) = lines.next_line().await {
        let item = match line.strip_prefix("@nix ") {
            Some(json) => match serde_json::from_str::<Value>(json) {
                Ok(message) => interpret(&message, &mut activity_types, &mut log),
                Err(_) => Some(BuildOutput::Line(line)),
            },
            None => Some(BuildOutput::Line(line)),
        };
        // A URL nix or a build prints may carry credentials (a flake input, a substituter).
        let item = item.map(|item| match item {
            // Most lines hold no URL: keep them as they are, without a copy.
            BuildOutput::Line(text) if text.contains("://") => {
                BuildOutput::Line(redact_urls(&text))
            }
            other => other,
        });
        if let Some(BuildOutput::Line(text)) = &item {
            if log.errors.0.back().is_none_or(|error| error != text) {
                log.log_tail.push(text.clone());
            }
        }
        if let (Some(item), true) = (item, forward) {
            forward = output.send(item).await.is_ok();
        }
    }
    log
}

fn interpret(
    message: &Value,
    activity_types: &mut HashMap<u64, u64>,
    log: &mut BuildLog,
) -> Option<BuildOutput> {
    let field = |name: &str| message.get(name);
    let number = |value: Option<&Value>| value.and_then(Value::as_u64).unwrap_or(0);
    match field("action")?.as_str()? {
        "start" => {
            let kind = number(field("type"));
            let id = number(field("id"));
            activity_types.insert(id, kind);
            let text = field("text").and_then(Value::as_str).unwrap_or_default();
            if kind == ACT_BUILD {
                log.derivations_built += 1;
            }
            (kind == ACT_BUILD && !text.is_empty()).then(|| BuildOutput::Line(text.to_owned()))
        }
        "stop" => {
            activity_types.remove(&number(field("id")));
            None
        }
        "result" => {
            let kind = number(field("type"));
            let fields = field("fields")?.as_array()?;
            match kind {
                RES_BUILD_LOG_LINE | RES_POST_BUILD_LOG_LINE => fields
                    .first()?
                    .as_str()
                    .map(|text| BuildOutput::Line(cut_line(text.to_owned()))),
                RES_PROGRESS if activity_types.get(&number(field("id"))) == Some(&ACT_BUILDS) => {
                    let at = |index: usize| fields.get(index).and_then(Value::as_u64).unwrap_or(0);
                    Some(BuildOutput::Progress {
                        done: at(0),
                        expected: at(1),
                        running: at(2),
                        failed: at(3),
                    })
                }
                _ => None,
            }
        }
        "msg" => {
            let text = field("msg").and_then(Value::as_str).unwrap_or_default();
            let level = number(field("level"));
            // Levels: 0 error, 1 warn, 2 notice, 3 info and more verbose.
            if level <= 1 {
                let text = strip_ansi(text);
                if level == 0 {
                    log.errors.push(text.clone());
                }
                Some(BuildOutput::Line(cut_line(text)))
            } else {
                None
            }
        }
        _ => None,
    }
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn cut_line(mut line: String) -> String {
    if line.len() > MAX_LINE_BYTES {
        let mut end = MAX_LINE_BYTES;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
        line.push_str(" …[line cut]");
    }
    line
}

/// Splits a pipe into lines without ever holding more than one bounded line in memory.
struct BoundedLines<R> {
    reader: R,
    buffer: Vec<u8>,
    start: usize,
    eof: bool,
}

impl<R: AsyncRead + Unpin> BoundedLines<R> {
    fn new(reader: R) -> Self {
        Self {
            reader,
            buffer: Vec::with_capacity(64 * 1024),
            start: 0,
            eof: false,
        }
    }

    async fn next_line(&mut self) -> Option<String> {
        // Internal-json lines carry a log line plus JSON framing; allow for both.
        let limit = MAX_LINE_BYTES * 2;
        let mut line: Vec<u8> = Vec::new();
        let mut cut = false;
        loop {
            if let Some(newline) = self.buffer[self.start..].iter().position(|b| *b == b'\n') {
                let end = self.start + newline;
                take_into(&mut line, &self.buffer[self.start..end], limit, &mut cut);
                self.start = end + 1;
                return Some(finish_line(line, cut));
            }
            take_into(&mut line, &self.buffer[self.start..], limit, &mut cut);
            self.buffer.clear();
            self.start = 0;
            if self.eof {
                return (!line.is_empty()).then(|| finish_line(line, cut));
            }
            self.buffer.resize(64 * 1024, 0);
            match self.reader.read(&mut self.buffer).await {
                Ok(0) | Err(_) => {
                    self.buffer.clear();
                    self.eof = true;
                }
                Ok(read) => self.buffer.truncate(read),
            }
        }
    }
}

fn take_into(line: &mut Vec<u8>, bytes: &[u8], limit: usize, cut: &mut bool) {
    let room = limit.saturating_sub(line.len());
    if bytes.len() > room {
        *cut = true;
    }
    line.extend_from_slice(&bytes[..bytes.len().min(room)]);
}

fn finish_line(line: Vec<u8>, cut: bool) -> String {
    let mut text = String::from_utf8_lossy(&line).into_owned();
    if text.ends_with('\r') {
        text.pop();
    }
    if cut {
        text = cut_line(text);
        if !text.ends_with("[line cut]") {
            text.push_str(" …[line cut]");
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_push_gets_its_credentials_and_ssh_from_the_environment() {
        for key in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_PROFILE",
            "SSH_AUTH_SOCK",
            "NIX_SSHOPTS",
            "https_proxy",
        ] {
            assert!(passes_through(key), "{key}");
        }
        for key in [
            "HOMELAB_DEPLOY_NKEY_SEED",
            "NOTIFY_SOCKET",
            "CREDENTIALS_DIRECTORY",
            "VAULT_TOKEN",
        ] {
            assert!(!passes_through(key), "{key}");
        }
    }

    #[tokio::test]
    async fn long_lines_are_cut_and_memory_stays_bounded() {
        let mut input = vec![b'x'; 1024 * 1024];
        input.extend_from_slice(b"\nshort\nlast");
        let mut lines = BoundedLines::new(&input[..]);
        let first = lines.next_line().await.expect("line");
        assert!(first.len() <= MAX_LINE_BYTES + 20, "{}", first.len());
        assert!(first.ends_with("[line cut]"));
        assert_eq!(lines.next_line().await.as_deref(), Some("short"));
        assert_eq!(lines.next_line().await.as_deref(), Some("last"));
        assert_eq!(lines.next_line().await, None);
    }

    #[tokio::test]
    async fn internal_json_gives_lines_progress_and_build_count() {
        let stderr = concat!(
            "@nix {\"action\":\"start\",\"id\":1,\"level\":0,\"text\":\"\",\"type\":104}\n",
            "@nix {\"action\":\"start\",\"fields\":[\"/nix/store/x-a.drv\"],\"id\":2,\"level\":3,\"text\":\"building '/nix/store/x-a.drv'\",\"type\":105}\n",
            "@nix {\"action\":\"result\",\"fields\":[\"hello a\"],\"id\":2,\"type\":101}\n",
            "@nix {\"action\":\"result\",\"fields\":[1,1,0,0],\"id\":1,\"type\":105}\n",
            "@nix {\"action\":\"msg\",\"level\":0,\"msg\":\"\\u001b[31;1merror:\\u001b[0m builder failed\"}\n",
            "plain line\n",
        );
        let (tx, mut rx) = mpsc::channel(16);
        let log = follow_internal_json(Some(stderr.as_bytes()), tx).await;
        let mut seen = Vec::new();
        while let Ok(item) = rx.try_recv() {
            seen.push(item);
        }
        assert_eq!(log.derivations_built, 1);
        assert_eq!(
            seen,
            vec![
                BuildOutput::Line("building '/nix/store/x-a.drv'".into()),
                BuildOutput::Line("hello a".into()),
                BuildOutput::Progress {
                    done: 1,
                    expected: 1,
                    running: 0,
                    failed: 0
                },
                BuildOutput::Line("error: builder failed".into()),
                BuildOutput::Line("plain line".into()),
            ]
        );
        assert!(
            log.excerpt().contains("error: builder failed"),
            "{}",
            log.excerpt()
        );
    }

    /// The real nix reads every literal back as the string it was made from.
    #[test]
    fn nix_reads_string_literals_back_unchanged() {
        let values = [
            "web.example.org",
            "a\"b",
            "back\\slash\\",
            "${builtins.abort \"x\"}",
            "$${x}",
            "\\${x}",
            "../../x",
            "new\nline\r\tend",
            "ünïcödé 名前",
            "'' ''${x}",
            "",
        ];
        for value in values {
            let output = std::process::Command::new("nix")
                .args([
                    "--extra-experimental-features",
                    "nix-command",
                    "eval",
                    "--json",
                    "--expr",
                ])
                .arg(nix_string(value))
                .output()
                .expect("nix is installed (Debian: apt install nix-bin)");
            assert!(
                output.status.success(),
                "{value:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let read: String = serde_json::from_slice(&output.stdout).expect("a JSON string");
            assert_eq!(read, value);
        }
    }

    #[test]
    fn versions_and_build_json_parse() {
        assert_eq!(parse_version("2.8.0"), (2, 8));
        assert_eq!(parse_version("2.24.10pre"), (2, 24));
        assert_eq!(
            parse_build_json(
                r#"[{"drvPath":"/nix/store/a.drv","outputs":{"out":"/nix/store/b"}}]"#
            ),
            Some("/nix/store/b".into())
        );
    }
}
