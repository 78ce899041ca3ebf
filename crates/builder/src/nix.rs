//! Running the `nix` CLI: list a flake's hosts, evaluate a host's toplevel to a derivation, build it.
//!
//! Every command is started by [`crate::process`]: in its own process group with a chosen
//! environment, dying with the builder; dropping a running command kills the whole group, so a
//! timed-out or cancelled build leaves no `nix` behind. Evaluations run one at a time, each under
//! the data-segment limit `builder.eval_memory_limit_mb`, so the limit bounds what evaluation uses
//! at once. Only host names that the flake itself listed reach a command line, and only as Nix
//! string literals ([`nix_string`]) inside an `--apply` function: a host name is data, never code
//! or part of an attribute path.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use homelab_deploy_credentials::secret_url::redact_urls;
use homelab_deploy_credentials::{Redactor, SecretUrl};
use homelab_deploy_protocol::text;
use nix::sys::signal::Signal;
use serde_json::Value;
use tokio::io::AsyncRead;
use tokio::sync::{mpsc, Semaphore};

use crate::logs::{cut_line, printable, RawLine, RecordLines};
use crate::process;

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
    /// The kernel refused nix memory past the limit; `rss` is nix's peak resident memory in bytes
    /// (`ru_maxrss`), `limit` the data-segment limit in bytes.
    #[error("{what} ran out of memory: nix may use {} MiB (builder.eval_memory_limit_mb) and reached {} MiB resident", limit / (1024 * 1024), rss / (1024 * 1024))]
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
    /// One line of build log (already cut to [`crate::logs::MAX_LINE_BYTES`]).
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
    /// Peak resident memory in bytes of nix and the build processes it waited for
    /// (`ru_maxrss`).
    pub peak_rss: u64,
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
    /// Where running commands leave pid files ([`process::end_leftovers`]).
    pid_dir: Option<PathBuf>,
    /// Data-segment limit of every evaluation, in bytes.
    eval_memory_limit: Option<u64>,
    /// One evaluation at a time, so the limit bounds all evaluation memory of the builder.
    eval_slot: Arc<Semaphore>,
    /// Git config file for the git that nix runs (`GIT_CONFIG_GLOBAL`), once it exists: it points
    /// submodule URLs into the builder's mirrors ([`crate::git::nix_git_config`]).
    git_config: Option<PathBuf>,
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
            pid_dir: None,
            eval_memory_limit: None,
            eval_slot: Arc::new(Semaphore::new(1)),
            git_config: None,
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

    /// Keeps a pid file of every running command in `dir`, for [`process::end_leftovers`].
    pub fn with_pid_dir(self, dir: PathBuf) -> Self {
        Self {
            pid_dir: Some(dir),
            ..self
        }
    }

    /// Limits every evaluation's data segment to `bytes` (`None`: no limit).
    pub fn with_eval_memory_limit(self, bytes: Option<u64>) -> Self {
        Self {
            eval_memory_limit: bytes,
            ..self
        }
    }

    /// The same nix, with `path` as its git's global config once that file exists.
    pub fn with_git_config(self, path: PathBuf) -> Self {
        Self {
            git_config: Some(path),
            ..self
        }
    }

    /// Names of the flake's `nixosConfigurations`, sorted.
    pub async fn list_hosts(&self, flake: &str) -> Result<Vec<String>, NixError> {
        let installable = format!("{flake}#nixosConfigurations");
        let stdout = self
            .evaluate(
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

    /// Evaluates `nixosConfigurations.<host>.config.system.build.toplevel` to its `.drv` path;
    /// also returns nix's peak resident memory in bytes. The host name reaches nix as a string
    /// literal, whatever it holds (`"`, `${`, `.`).
    pub async fn eval_toplevel_drv(
        &self,
        flake: &str,
        host: &str,
    ) -> Result<(String, u64), NixError> {
        let installable = format!("{flake}#nixosConfigurations");
        let apply = format!(
            "configs: (builtins.getAttr {} configs).config.system.build.toplevel.drvPath",
            nix_string(host)
        );
        let (drv, peak) = self
            .evaluate_measured(
                &format!("evaluating host {host}"),
                &self.eval_args(&["--raw", &installable, "--apply", &apply]),
            )
            .await?;
        if !drv.starts_with('/') || !drv.ends_with(".drv") {
            return Err(NixError::Output {
                what: format!("evaluating host {host}"),
                detail: format!(
                    "expected a .drv store path, got {:?}",
                    text::head(&drv, 200)
                ),
            });
        }
        Ok((drv, peak))
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
        let mut child = self
            .spawn(
                &[
                    "build",
                    "--json",
                    "--log-format",
                    "internal-json",
                    "--out-link",
                    &out_link,
                    &installable,
                ],
                None,
            )
            .await?;
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
            detail: format!("no output path in {:?}", text::head(&stdout, 300)),
        })?;
        Ok(Built {
            out_path,
            derivations_built: log.derivations_built,
            peak_rss: status.peak_rss,
        })
    }

    /// Starts nix with `args`; with `data_limit` (bytes) its data segment is capped there.
    async fn spawn(
        &self,
        args: &[&str],
        data_limit: Option<u64>,
    ) -> Result<process::Child, NixError> {
        self.spawn_program(&self.program, args, data_limit).await
    }

    /// Like [`Self::spawn`], for another program of nix's (`nix-instantiate`).
    async fn spawn_program(
        &self,
        program: &Path,
        args: &[&str],
        data_limit: Option<u64>,
    ) -> Result<process::Child, NixError> {
        let mut command = std::process::Command::new(program);
        command
            .args(FIXED_ARGS)
            .args(&self.options)
            .args(args)
            .env_clear()
            .envs(std::env::vars().filter(|(key, _)| passes_through(key)))
            .envs(
                self.git_config
                    .iter()
                    .filter(|path| path.exists())
                    .map(|path| ("GIT_CONFIG_GLOBAL", path)),
            )
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(limit) = data_limit {
            // Nix reserves min(¼ of RAM, 384 MiB) of heap at start unless told otherwise; under a
            // smaller limit that reservation alone leaves no room for its threads' stacks.
            command.env(
                "GC_INITIAL_HEAP_SIZE",
                (limit / 4).min(384 << 20).to_string(),
            );
        }
        process::spawn(command, data_limit, self.pid_dir.as_deref())
            .await
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

    /// Runs an evaluation: alone, under the evaluation memory limit.
    async fn evaluate(&self, what: &str, args: &[&str]) -> Result<String, NixError> {
        self.evaluate_measured(what, args)
            .await
            .map(|(stdout, _)| stdout)
    }

    /// Like [`Self::evaluate`], and also returns nix's peak resident memory in bytes.
    async fn evaluate_measured(
        &self,
        what: &str,
        args: &[&str],
    ) -> Result<(String, u64), NixError> {
        // The semaphore is never closed, so this only fails if it were.
        let _slot = self.eval_slot.acquire().await.ok();
        self.run_measured(what, args, self.eval_memory_limit).await
    }

    /// Like `run_captured`, and also returns nix's peak resident memory (`ru_maxrss`, bytes).
    /// With `data_limit` (bytes), nix cannot grow past it; running out of memory there is
    /// [`NixError::MemoryLimit`].
    async fn run_measured(
        &self,
        what: &str,
        args: &[&str],
        data_limit: Option<u64>,
    ) -> Result<(String, u64), NixError> {
        let mut child = self.spawn(args, data_limit).await?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let (stdout, stderr) =
            tokio::join!(read_bounded(stdout, MAX_STDOUT_BYTES), tail_lines(stderr));
        let exit = child
            .wait()
            .await
            .map_err(|source| self.spawn_error(source))?;
        if exit.success() {
            return Ok((stdout.trim().to_owned(), exit.peak_rss));
        }
        match data_limit {
            Some(limit) if ran_out_of_memory(&exit, &stderr) => Err(NixError::MemoryLimit {
                what: what.to_owned(),
                rss: exit.peak_rss,
                limit,
            }),
            _ => Err(NixError::Failed {
                what: what.to_owned(),
                excerpt: stderr,
            }),
        }
    }

    /// Registers `drvs` as indirect GC roots `link`, `link-2`, `link-3`, … so that a garbage
    /// collection cannot delete them (and the drvs they need) before they are built; removing
    /// the links ends the roots. Nix 2.8 has no `nix` subcommand that roots a `.drv` without
    /// building it, but `nix-instantiate --add-root` roots what an expression instantiates, and
    /// `import` of a `.drv` file reads the derivation back without evaluating the flake again.
    pub async fn add_drv_roots(&self, drvs: &[&str], link: &Path) -> Result<(), NixError> {
        let what = format!("adding GC roots for {} drvs", drvs.len());
        let link = link.to_string_lossy();
        // Store paths hold no spaces; passed as an argument, not spliced into the expression.
        let paths = drvs.join(" ");
        let program = match self.program.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join("nix-instantiate"),
            _ => PathBuf::from("nix-instantiate"),
        };
        let args = [
            "--add-root",
            &link,
            "--indirect",
            "--argstr",
            "drvs",
            &paths,
            "--expr",
            "{ drvs }: map import (builtins.filter builtins.isString (builtins.split \" \" drvs))",
        ];
        let mut child = self.spawn_program(&program, &args, None).await?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let (_, stderr) = tokio::join!(read_bounded(stdout, MAX_STDOUT_BYTES), tail_lines(stderr));
        let exit = child
            .wait()
            .await
            .map_err(|source| self.spawn_error(source))?;
        if exit.success() {
            Ok(())
        } else {
            Err(NixError::Failed {
                what,
                excerpt: stderr,
            })
        }
    }

    /// Keeps the store path `path` alive with an indirect GC root at `link` (`nix build` of a
    /// path already in the store builds nothing and only adds the root).
    pub async fn add_root(&self, path: &str, link: &Path) -> Result<(), NixError> {
        let link = link.to_string_lossy();
        self.run_captured(
            &format!("adding a GC root for {path}"),
            &["build", "--out-link", &link, path],
        )
        .await
        .map(|_| ())
    }

    /// `nix store diff-closures BEFORE AFTER`: one line per package whose versions or size
    /// differ (format: [`crate::closures::parse_diff_closures`]).
    pub async fn diff_closures(&self, before: &str, after: &str) -> Result<String, NixError> {
        self.run_captured(
            &format!("nix store diff-closures {before} {after}"),
            &["store", "diff-closures", before, after],
        )
        .await
    }

    /// The closure size in bytes (`nix path-info -S`, the sum of the NAR sizes of the path
    /// and everything it references) of each of `paths`, by path.
    pub async fn closure_sizes(&self, paths: &[&str]) -> Result<HashMap<String, u64>, NixError> {
        let what = "nix path-info -S --json";
        let mut args = vec!["path-info", "-S", "--json"];
        args.extend_from_slice(paths);
        let stdout = self.run_captured(what, &args).await?;
        parse_closure_sizes(&stdout).ok_or_else(|| NixError::Output {
            what: what.to_owned(),
            detail: format!("no closureSize in {:?}", text::head(&stdout, 300)),
        })
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
            .evaluate_measured(
                &what,
                &self.eval_args(&["--json", &installable, "--apply", &apply]),
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

/// Whether a nix that failed under a data limit failed for lack of memory: nix reports it
/// ("out of memory", a failed `std::bad_alloc`, a thread it could not create), or it was ended
/// by a signal the limit provokes when an allocation fails where nix cannot report it.
fn ran_out_of_memory(exit: &process::Exit, stderr: &str) -> bool {
    const SIGNALS: [i32; 3] = [
        Signal::SIGSEGV as i32,
        Signal::SIGABRT as i32,
        Signal::SIGBUS as i32,
    ];
    exit.signal.is_some_and(|signal| SIGNALS.contains(&signal))
        || [
            "out of memory",
            "bad_alloc",
            "Cannot allocate memory",
            "Resource temporarily unavailable",
        ]
        .iter()
        .any(|needle| stderr.contains(needle))
}

/// Environment a nix command may see: what nix needs to find its store, daemon and config, and
/// what `nix copy --to` needs for a binary cache: `s3://` reads the AWS SDK's variables
/// (`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, `AWS_SHARED_CREDENTIALS_FILE`, …), `ssh://` and
/// `ssh-ng://` run `ssh` (an agent, `NIX_SSHOPTS`), `http(s)://` honours the proxy variables.
fn passes_through(key: &str) -> bool {
    process::inherits_env(key)
        || matches!(key, "LANG" | "LC_ALL" | "SSH_AUTH_SOCK" | "CURL_CA_BUNDLE")
        || key.starts_with("NIX_")
        || key.starts_with("AWS_")
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

/// `closureSize` by path from `nix path-info -S --json`: a list of objects with `path` (nix
/// before 2.19) or an object keyed by path (later).
fn parse_closure_sizes(stdout: &str) -> Option<HashMap<String, u64>> {
    let value: Value = serde_json::from_str(stdout.trim()).ok()?;
    let size = |info: &Value| info.get("closureSize")?.as_u64();
    let sizes: HashMap<String, u64> = match &value {
        Value::Array(infos) => infos
            .iter()
            .filter_map(|info| Some((info.get("path")?.as_str()?.to_owned(), size(info)?)))
            .collect(),
        Value::Object(by_path) => by_path
            .iter()
            .filter_map(|(path, info)| Some((path.clone(), size(info)?)))
            .collect(),
        _ => return None,
    };
    (!sizes.is_empty()).then_some(sizes)
}

async fn read_bounded(pipe: Option<impl AsyncRead + Unpin>, max: usize) -> String {
    String::from_utf8_lossy(&process::read_head(pipe, max).await).into_owned()
}

/// The last lines of a pipe (for error messages), read to its end.
async fn tail_lines(pipe: Option<impl AsyncRead + Unpin>) -> String {
    let mut tail = Excerpt::default();
    if let Some(pipe) = pipe {
        let mut lines = RecordLines::new(pipe);
        while let Some(line) = lines.next_line().await {
            match line {
                RawLine::Text(text) => tail.push(text),
                RawLine::Record(json) => tail.push(cut_line(printable(&format!("@nix {json}")))),
            }
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
    let mut lines = RecordLines::new(stderr);
    let mut activity_types: HashMap<u64, u64> = HashMap::new();
    // Once the receiver is gone nobody reads logs, but the pipe must still be drained.
    let mut forward = true;
    while let Some(line) = lines.next_line().await {
        // Decode first, cut after: the record's text is what gets cut, never its JSON.
        let (items, is_error) = match line {
            RawLine::Record(json) => match serde_json::from_str::<Value>(&json) {
                Ok(message) => interpret(&message, &mut activity_types, &mut log),
                Err(_) => (text_lines(&format!("@nix {json}")), false),
            },
            RawLine::Text(text) => (vec![BuildOutput::Line(text)], false),
        };
        for item in items {
            // A URL nix or a build prints may carry credentials (a flake input, a substituter).
            let item = match item {
                // Most lines hold no URL: keep them as they are, without a copy.
                BuildOutput::Line(text) if text.contains("://") => {
                    BuildOutput::Line(redact_urls(&text))
                }
                other => other,
            };
            if let (BuildOutput::Line(text), false) = (&item, is_error) {
                log.log_tail.push(text.clone());
            }
            if forward {
                forward = output.send(item).await.is_ok();
            }
        }
    }
    log
}

/// Decoded text as log lines: one per line of the text (so the numbering matches what a reader
/// sees), each printable and cut to [`crate::logs::MAX_LINE_BYTES`].
fn text_lines(text: &str) -> Vec<BuildOutput> {
    text.split('\n')
        .map(|line| BuildOutput::Line(cut_line(printable(line.strip_suffix('\r').unwrap_or(line)))))
        .collect()
}

/// What one decoded record means: the lines and progress it carries, and whether they are one
/// of nix's error messages (kept in the excerpt's error part, not its log tail).
fn interpret(
    message: &Value,
    activity_types: &mut HashMap<u64, u64>,
    log: &mut BuildLog,
) -> (Vec<BuildOutput>, bool) {
    match interpret_record(message, activity_types, log) {
        Some((items, is_error)) => (items, is_error),
        None => (Vec::new(), false),
    }
}

fn interpret_record(
    message: &Value,
    activity_types: &mut HashMap<u64, u64>,
    log: &mut BuildLog,
) -> Option<(Vec<BuildOutput>, bool)> {
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
            (kind == ACT_BUILD && !text.is_empty()).then(|| (text_lines(text), false))
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
                    .map(|text| (text_lines(text), false)),
                RES_PROGRESS if activity_types.get(&number(field("id"))) == Some(&ACT_BUILDS) => {
                    let at = |index: usize| fields.get(index).and_then(Value::as_u64).unwrap_or(0);
                    let progress = BuildOutput::Progress {
                        done: at(0),
                        expected: at(1),
                        running: at(2),
                        failed: at(3),
                    };
                    Some((vec![progress], false))
                }
                _ => None,
            }
        }
        "msg" => {
            let text = field("msg").and_then(Value::as_str).unwrap_or_default();
            let level = number(field("level"));
            // Levels: 0 error, 1 warn, 2 notice, 3 info and more verbose.
            if level <= 1 {
                let lines = text_lines(text);
                if level == 0 {
                    let text: Vec<&str> = lines
                        .iter()
                        .filter_map(|line| match line {
                            BuildOutput::Line(line) => Some(line.as_str()),
                            BuildOutput::Progress { .. } => None,
                        })
                        .collect();
                    log.errors.push(text.join("\n"));
                }
                Some((lines, level == 0))
            } else {
                None
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::CUT_MARK;
    use crate::logs::MAX_LINE_BYTES;

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

    /// A 20 MB log line, a run of NULs, bytes that are not UTF-8 and a multi-line error: each
    /// record is decoded before its text is cut, nothing shows raw, and every line is counted.
    #[tokio::test]
    async fn records_are_decoded_before_they_are_cut() {
        let mut stderr = Vec::new();
        stderr.extend_from_slice(b"@nix {\"action\":\"result\",\"fields\":[\"");
        stderr.extend(std::iter::repeat_n(b'x', 20 << 20));
        stderr.extend_from_slice(b"\"],\"id\":2,\"type\":101}\n");
        stderr.extend_from_slice(b"@nix {\"action\":\"result\",\"fields\":[\"");
        stderr.extend(std::iter::repeat_n(&b"\\u0000"[..], 100_000).flatten());
        stderr.extend_from_slice(b"\"],\"id\":2,\"type\":101}\n");
        stderr.extend_from_slice(b"not json: \xff\xfe and a bell \x07\n");
        stderr.extend_from_slice(
            b"@nix {\"action\":\"msg\",\"level\":0,\"msg\":\"error: first\\n  second\"}\n",
        );
        let (tx, mut rx) = mpsc::channel(16);
        let reader = tokio::spawn(async move {
            let mut lines = Vec::new();
            while let Some(item) = rx.recv().await {
                if let BuildOutput::Line(line) = item {
                    lines.push(line);
                }
            }
            lines
        });
        let log = follow_internal_json(Some(&stderr[..]), tx).await;
        let lines = reader.await.expect("reader");
        assert_eq!(
            lines.len(),
            5,
            "{:?}",
            lines
                .iter()
                .map(|l| &l[..l.len().min(40)])
                .collect::<Vec<_>>()
        );
        assert!(
            lines[0].starts_with("xxxx") && lines[0].ends_with(CUT_MARK),
            "{}",
            &lines[0][..40]
        );
        assert!(lines[0].len() <= MAX_LINE_BYTES + CUT_MARK.len());
        assert!(lines[1].starts_with("\\x00\\x00") && lines[1].ends_with(CUT_MARK));
        assert!(lines[1].len() <= MAX_LINE_BYTES + CUT_MARK.len());
        assert_eq!(lines[2], "not json: \\xff\\xfe and a bell \\x07");
        assert_eq!(lines[3..], ["error: first", "  second"]);
        let excerpt = log.excerpt();
        assert!(
            excerpt.ends_with("bell \\x07\nerror: first\n  second"),
            "{excerpt}"
        );
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
