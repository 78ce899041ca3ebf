//! Resolving a request's ref or rev to one commit, in a bare mirror of the repo under
//! `state_dir/mirrors/<repo>.git`. Nix later builds from this mirror at that exact commit, so a push
//! during a build cannot mix revisions.
//!
//! Every git operation runs the `git` CLI as a child process (docs/decisions/git-cli.md): in its
//! own process group, stdin closed, prompts off, output read up to a bound, under a deadline, and
//! dropping the future kills the child's whole group. Whatever a git server answers, the worst it
//! can do is fail or time out one fetch.
//!
//! The mirror heals itself before each fetch: lock files left by a killed git are removed, a
//! mirror that is not a git repo any more, is shallow or misses objects is fetched anew, and so is
//! one fetched from another URL than the configured one.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use homelab_deploy_protocol::text;
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use crate::process;

/// Most stdout kept from one git command; the rest is read and dropped. A list of branches or
/// of `.gitattributes` files is far smaller.
const MAX_STDOUT_BYTES: usize = 4 * 1024 * 1024;
/// Most stderr kept from one git command (its tail: git's error is at the end).
const MAX_STDERR_BYTES: usize = 16 * 1024;
/// Longest part of git's stderr put in an error message.
const MAX_MESSAGE_BYTES: usize = 2 * 1024;
/// Deadline of a git command that only reads or writes the local mirror.
const LOCAL_TIMEOUT: Duration = Duration::from_secs(600);
/// Branches named in a "ref not found" error; more are counted.
const MAX_LISTED_BRANCHES: usize = 30;
/// Transports git may use; `ext::` and other remote helpers that run commands are refused, also
/// for submodule URLs a repo brings.
const ALLOWED_PROTOCOLS: &str = "file:git:http:https:ssh";
/// Environment variable that carries a repo's token from `token_file` to the credential helper.
const TOKEN_ENV: &str = "HOMELAB_DEPLOY_GIT_TOKEN";
/// Name of the mirror's git config key that records which URL it was fetched from (without
/// credentials).
const SOURCE_KEY: &str = "homelab-deploy.source";

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("cannot run git: {source}; is git installed (Debian: apt install git) and on PATH?")]
    Spawn { source: std::io::Error },
    #[error("git mirror {path}: {message}")]
    Mirror { path: PathBuf, message: String },
    #[error("fetching {url} failed: {message}")]
    Fetch { url: String, message: String },
    #[error("fetching {url} took longer than {secs}s (fetch_timeout_secs of the repo); the git server did not finish in time, so git was stopped")]
    Timeout { url: String, secs: u64 },
    #[error("the SSH host key of {host} is not in {file} (ssh_known_hosts_file; host keys are checked strictly): add the server's key, e.g. `ssh-keyscan -p PORT HOST >> {file}` after checking its fingerprint")]
    UnknownHostKey { host: String, file: String },
    #[error("{url} is a shallow repository: its branches cannot be mirrored in full and nix needs the whole history; make the origin a full clone (`git fetch --unshallow` there)")]
    ShallowOrigin { url: String },
    #[error("cannot read {key} {path}: {source}")]
    Secret {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("ref {git_ref:?} not found in {url}; branches: {available}")]
    RefNotFound {
        git_ref: String,
        url: String,
        available: String,
    },
    #[error("rev {rev} not found in {url} (after fetching every branch and tag)")]
    RevNotFound { rev: String, url: String },
    #[error("rev {rev} is ambiguous in {url}; give more hex digits")]
    RevAmbiguous { rev: String, url: String },
    #[error("rev {rev} of {url} stores files in Git LFS (filter=lfs in {files}); nix would build from the LFS pointer files instead of their contents, so the builder refuses it: keep the files the build reads out of LFS")]
    Lfs {
        rev: String,
        url: String,
        files: String,
    },
    #[error("submodule {path} of {url} at rev {rev}: {message}")]
    Submodule {
        url: String,
        rev: String,
        path: String,
        message: String,
    },
}

impl GitError {
    /// Whether the error says the mirror itself is broken, so that fetching anew may fix it.
    fn is_local_damage(&self) -> bool {
        let (Self::Fetch { message, .. } | Self::Mirror { message, .. }) = self else {
            return false;
        };
        [
            "not a git repository",
            "bad object",
            "corrupt",
            "missing blob",
            "missing tree",
            "missing commit",
            "unable to read",
            "bad config",
            "did not send all necessary objects",
            "is empty",
            "invalid sha1 pointer",
            "does not point to a valid object",
            "unable to parse object",
        ]
        .iter()
        .any(|sign| message.contains(sign))
    }
}

/// What a request asks to build.
#[derive(Debug, Clone, Copy)]
pub enum Wanted<'a> {
    /// A branch or tag name, or a full ref (`refs/…`).
    Ref(&'a str),
    /// A commit id, 7 to 40 hex digits (validated by the protocol crate).
    Rev(&'a str),
}

/// Where a repo comes from and how to reach it: the repo's config as the git layer needs it.
#[derive(Debug, Clone)]
pub struct Source {
    /// The URL git fetches from: the flake URL without nix's `git+` prefix and without query.
    pub url: String,
    /// The flake's directory in the repo (the flake URL's `?dir=`), relative, no `..`.
    pub dir: Option<String>,
    /// Whether nix includes submodules (the flake URL's `?submodules=1`).
    pub submodules: bool,
    /// Private key for `ssh://` URLs.
    pub ssh_key_file: Option<PathBuf>,
    /// The only known-hosts file `ssh://` URLs are checked against.
    pub ssh_known_hosts_file: Option<PathBuf>,
    /// File holding a token for `https://` URLs, given to git by a credential helper.
    pub token_file: Option<PathBuf>,
    /// How long one fetch (of the repo or of one submodule) may take.
    pub fetch_timeout: Duration,
}

impl Source {
    /// A source with only a URL (no credentials, no dir, no submodules) and a 10-minute fetch
    /// deadline.
    pub fn plain(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            dir: None,
            submodules: false,
            ssh_key_file: None,
            ssh_known_hosts_file: None,
            token_file: None,
            fetch_timeout: Duration::from_secs(600),
        }
    }
}

/// Refs under this prefix pin commits that requests resolved to, so nix can fetch exactly that
/// commit by ref (nix cannot fetch a bare rev from a bare repo) and a later push cannot remove it.
const PIN_PREFIX: &str = "refs/homelab-deploy/pin-";
/// Pins kept; the older half is removed when there are more (nix keeps its own copy once
/// fetched).
const MAX_PINS: usize = 200;

/// A commit resolved for a request, and the mirror ref that pins it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub rev: String,
    pub pin_ref: String,
}

/// A bare mirror of one repo. Clones share one lock, so two requests of the repo never fetch
/// into it at once.
#[derive(Debug, Clone)]
pub struct Mirror {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// `state_dir/mirrors`
    mirrors: PathBuf,
    path: PathBuf,
    source: Source,
    shown_url: String,
    /// Where git's pid files go (`state_dir/processes`, shared with nix's).
    pid_dir: Option<PathBuf>,
    /// Held while git works in the mirror; holds the commits checked to be complete since the
    /// mirror was (re)made.
    state: tokio::sync::Mutex<HashSet<String>>,
}

impl Mirror {
    pub fn new(state_dir: &Path, repo_name: &str, source: Source) -> Self {
        let mirrors = state_dir.join("mirrors");
        Self::at(
            mirrors.clone(),
            mirrors.join(format!("{repo_name}.git")),
            source,
            Some(state_dir.join("processes")),
        )
    }

    fn at(mirrors: PathBuf, path: PathBuf, source: Source, pid_dir: Option<PathBuf>) -> Self {
        Self {
            inner: Arc::new(Inner {
                mirrors,
                pid_dir,
                path,
                shown_url: redact_url(&source.url),
                source,
                state: Default::default(),
            }),
        }
    }

    /// The mirror's directory (tests look inside it).
    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Fetches every branch and tag, resolves `wanted` to a full commit id and pins it.
    /// `default_branch` becomes the mirror's HEAD so tools that read HEAD find a commit.
    ///
    /// Cancellable: dropping the future kills the git process it waits for (and its children).
    ///
    /// # Errors
    /// A fetch that fails or outlives `fetch_timeout`, a ref or rev the repo does not have, a
    /// commit that stores files in LFS, a mirror that cannot be repaired.
    pub async fn fetch_and_resolve(
        &self,
        wanted: Wanted<'_>,
        default_branch: &str,
    ) -> Result<Resolved, GitError> {
        let mut verified = self.inner.state.lock().await;
        // One process at a time per mirror, also across builder processes sharing a state dir;
        // the kernel releases it when a builder dies, so a leftover lock file is stale.
        let _flock = self.lock_file().await?;
        if self.sync().await? {
            verified.clear();
        }
        let mut rev = self.resolve(wanted, default_branch).await?;
        if !verified.contains(&rev) {
            if let Err(missing) = self.check_complete(&rev).await {
                self.refetch(&format!("commit {rev} is incomplete in it: {missing}"))
                    .await?;
                verified.clear();
                rev = self.resolve(wanted, default_branch).await?;
                self.check_complete(&rev)
                    .await
                    .map_err(|message| self.mirror_error(message))?;
            }
            verified.insert(rev.clone());
        }
        self.refuse_lfs(&rev).await?;
        if self.inner.source.submodules {
            let base = format!("file://{}", self.inner.path.display());
            Box::pin(self.mirror_submodules(&rev, &base, 0)).await?;
        }
        let pin_ref = self.pin(&rev).await?;
        Ok(Resolved { rev, pin_ref })
    }

    /// Heals the mirror and fetches into it, fetching anew once when the mirror turns out
    /// damaged; true when it was made anew.
    async fn sync(&self) -> Result<bool, GitError> {
        let mut remade = self.heal().await?;
        if let Err(err) = self.fetch().await {
            if !err.is_local_damage() {
                return Err(err);
            }
            self.refetch(&format!("fetching into it failed: {err}"))
                .await?;
            remade = true;
        }
        Ok(remade)
    }

    /// Mirrors every submodule of `rev` (recursively) with this repo's credentials, pins the
    /// commits the superproject records, and points their URLs at the mirrors in the git config
    /// nix reads. `nix_base` is the URL nix's git resolves this repo's relative submodule URLs
    /// against: the mirror's `file://` URL for the repo itself, the original URL below it.
    async fn mirror_submodules(
        &self,
        rev: &str,
        nix_base: &str,
        depth: usize,
    ) -> Result<(), GitError> {
        const MAX_DEPTH: usize = 5;
        for (path, url) in self.submodule_urls(rev).await? {
            let submodule_error = |message: String| GitError::Submodule {
                url: self.inner.shown_url.clone(),
                rev: rev.to_owned(),
                path: path.clone(),
                message,
            };
            if depth >= MAX_DEPTH {
                return Err(submodule_error(format!(
                    "submodules are nested deeper than {MAX_DEPTH} levels"
                )));
            }
            let Some(commit) = self.gitlink(rev, &path).await? else {
                // Listed in .gitmodules but not in the tree: git ignores it, and so does nix.
                continue;
            };
            let fetch_url = resolve_submodule_url(&self.inner.source.url, &url);
            let nix_url = resolve_submodule_url(nix_base, &url);
            let local = fetch_url.starts_with("file://") || fetch_url.starts_with('/');
            if local && !self.inner.source.url.starts_with("file://") {
                return Err(submodule_error(format!(
                    "url {} is a path on the builder; only a repo that is itself on the builder (file://) may use those",
                    redact_url(&url)
                )));
            }
            let fetch_url = match fetch_url.strip_prefix('/') {
                Some(_) => format!("file://{fetch_url}"),
                None => fetch_url,
            };
            let source = Source {
                url: fetch_url.clone(),
                dir: None,
                submodules: false,
                ..self.inner.source.clone()
            };
            let submodule = Mirror::at(
                self.inner.mirrors.clone(),
                self.inner
                    .mirrors
                    .join("submodules")
                    .join(format!("{}.git", mirror_name(&fetch_url))),
                source,
                self.inner.pid_dir.clone(),
            );
            submodule
                .sync_commit(&commit)
                .await
                .map_err(|err| submodule_error(err.to_string()))?;
            add_url_rewrite(
                &nix_git_config_in(&self.inner.mirrors),
                &submodule.inner.path,
                &nix_url,
            )
            .map_err(|err| submodule_error(err.to_string()))?;
            Box::pin(submodule.mirror_submodules(&commit, &nix_url, depth + 1)).await?;
        }
        Ok(())
    }

    /// Fetches into a submodule's mirror and makes sure `commit` is there, complete and pinned.
    async fn sync_commit(&self, commit: &str) -> Result<(), GitError> {
        let _state = self.inner.state.lock().await;
        let _flock = self.lock_file().await?;
        self.sync().await?;
        if self.rev_parse(commit).await?.is_none() {
            return Err(GitError::RevNotFound {
                rev: commit.to_owned(),
                url: self.inner.shown_url.clone(),
            });
        }
        if let Err(missing) = self.check_complete(commit).await {
            self.refetch(&format!("commit {commit} is incomplete in it: {missing}"))
                .await?;
            self.check_complete(commit)
                .await
                .map_err(|message| self.mirror_error(message))?;
        }
        self.pin(commit).await.map(|_| ())
    }

    /// `(path, url)` of each submodule in `.gitmodules` at `rev`; none without that file.
    async fn submodule_urls(&self, rev: &str) -> Result<Vec<(String, String)>, GitError> {
        let output = self
            .run(GitRun {
                args: &[
                    "config".as_ref(),
                    "--null".as_ref(),
                    "--blob".as_ref(),
                    format!("{rev}:.gitmodules").as_ref(),
                    "--get-regexp".as_ref(),
                    r"^submodule\..*\.(path|url)$".as_ref(),
                ],
                ..GitRun::local(&self.inner.path)
            })
            .await?;
        if !output.success {
            // No .gitmodules (or no entries in it).
            return Ok(Vec::new());
        }
        let text = output.stdout_text();
        let mut paths = std::collections::BTreeMap::new();
        let mut urls = std::collections::BTreeMap::new();
        for entry in text.split('\0').filter(|entry| !entry.is_empty()) {
            let (key, value) = entry.split_once('\n').unwrap_or((entry, ""));
            let Some(name) = key.strip_prefix("submodule.") else {
                continue;
            };
            if let Some(name) = name.strip_suffix(".path") {
                paths.insert(name.to_owned(), value.to_owned());
            } else if let Some(name) = name.strip_suffix(".url") {
                urls.insert(name.to_owned(), value.to_owned());
            }
        }
        Ok(paths
            .into_iter()
            .filter_map(|(name, path)| Some((path, urls.get(&name)?.clone())))
            .collect())
    }

    /// The commit recorded for the submodule at `path` in `rev`'s tree, if there is one.
    async fn gitlink(&self, rev: &str, path: &str) -> Result<Option<String>, GitError> {
        let listing = self.local(&["ls-tree", "-z", rev, "--", path]).await?;
        Ok(listing.split('\0').find_map(|entry| {
            let (meta, _) = entry.split_once('\t')?;
            let mut fields = meta.split(' ');
            (fields.next()? == "160000" && fields.next()? == "commit")
                .then(|| fields.next().map(str::to_owned))
                .flatten()
        }))
    }

    /// The flake URL nix builds from: this mirror at exactly `resolved`'s commit, with the
    /// repo's `dir` and `submodules`.
    pub fn flake_url(&self, resolved: &Resolved) -> String {
        let mut url = format!(
            "git+file://{}?ref={}&rev={}",
            self.inner.path.display(),
            resolved.pin_ref,
            resolved.rev
        );
        if self.inner.source.submodules {
            url.push_str("&submodules=1");
        }
        if let Some(dir) = &self.inner.source.dir {
            url.push_str("&dir=");
            url.push_str(dir);
        }
        url
    }

    /// Takes the mirror's file lock, waiting while another process holds it.
    async fn lock_file(&self) -> Result<std::fs::File, GitError> {
        let path = self.inner.path.with_extension("git.flock");
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|err| self.mirror_error(err.to_string()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|err| self.mirror_error(format!("lock file {}: {err}", path.display())))?;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(file),
                Err(std::fs::TryLockError::WouldBlock) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(std::fs::TryLockError::Error(err)) => {
                    return Err(self.mirror_error(format!("lock file {}: {err}", path.display())))
                }
            }
        }
    }

    /// Repairs what a crash or a config change left; true when the mirror was made anew.
    async fn heal(&self) -> Result<bool, GitError> {
        let path = &self.inner.path;
        if !path.exists() {
            self.init().await?;
            return Ok(true);
        }
        if !path.join("HEAD").is_file() || !path.join("objects").is_dir() {
            self.refetch("it is not a git repository (HEAD or objects/ is missing)")
                .await?;
            return Ok(true);
        }
        if path.join("shallow").exists() {
            self.refetch("it is shallow (has a `shallow` file), so it lacks history")
                .await?;
            return Ok(true);
        }
        for lock in stale_locks(path) {
            match std::fs::remove_file(&lock) {
                Ok(()) => warn!(
                    mirror = %path.display(),
                    lock = %lock.display(),
                    "removed a stale git lock file (left by a git that was killed or crashed; no process of this builder holds it)"
                ),
                Err(err) => {
                    return Err(self.mirror_error(format!(
                        "stale lock file {} cannot be removed: {err}; remove it by hand",
                        lock.display()
                    )))
                }
            }
        }
        match self.local(&["config", "--get", SOURCE_KEY]).await {
            Ok(recorded) if recorded.trim() == self.inner.shown_url => Ok(false),
            Ok(recorded) => {
                self.refetch(&format!(
                    "it was fetched from {} but the repo's url is now {}",
                    recorded.trim(),
                    self.inner.shown_url
                ))
                .await?;
                Ok(true)
            }
            Err(err) => {
                self.refetch(&format!("its config cannot be read: {err}"))
                    .await?;
                Ok(true)
            }
        }
    }

    /// Moves the broken mirror away, makes an empty one and fetches into it.
    async fn refetch(&self, why: &str) -> Result<(), GitError> {
        let path = &self.inner.path;
        warn!(mirror = %path.display(), url = %self.inner.shown_url, reason = why, "fetching the git mirror anew");
        if path.exists() {
            let aside = path.with_extension(format!("git.removing-{}", nuid::next()));
            std::fs::rename(path, &aside).map_err(|err| {
                self.mirror_error(format!(
                    "{why}; moving it aside to fetch anew failed: {err}; remove it by hand"
                ))
            })?;
            if let Err(err) = tokio::fs::remove_dir_all(&aside).await {
                warn!(path = %aside.display(), error = %err, "could not remove an old git mirror");
            }
        }
        self.init().await?;
        self.fetch().await
    }

    async fn init(&self) -> Result<(), GitError> {
        let path = &self.inner.path;
        let parent = path.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(parent).map_err(|err| self.mirror_error(err.to_string()))?;
        let output = self
            .run(GitRun {
                dir: parent,
                args: &[
                    "init".as_ref(),
                    "--quiet".as_ref(),
                    "--bare".as_ref(),
                    path.as_os_str(),
                ],
                ..GitRun::local(parent)
            })
            .await?;
        if !output.success {
            return Err(self.mirror_error(output.message()));
        }
        self.local(&["config", SOURCE_KEY, &self.inner.shown_url])
            .await?;
        // Auto-gc in the foreground, so it runs under the fetch's deadline and process group.
        self.local(&["config", "gc.autoDetach", "false"]).await?;
        info!(mirror = %path.display(), url = %self.inner.shown_url, "created git mirror");
        Ok(())
    }

    /// Fetches every branch and tag of the source into the mirror, pruning deleted ones.
    async fn fetch(&self) -> Result<(), GitError> {
        let source = &self.inner.source;
        let output = self
            .remote_run(
                &self.inner.path,
                &source.url,
                &[
                    "fetch",
                    "--quiet",
                    "--prune",
                    "--no-write-fetch-head",
                    "origin",
                    "+refs/heads/*:refs/heads/*",
                    "+refs/tags/*:refs/tags/*",
                ],
            )
            .await?;
        let stderr = output.stderr_text();
        if !output.success {
            return Err(self.fetch_error(&source.url, &output));
        }
        if stderr.contains("shallow roots are not allowed") || stderr.contains("shallow update") {
            return Err(GitError::ShallowOrigin {
                url: self.inner.shown_url.clone(),
            });
        }
        Ok(())
    }

    /// Runs a git command that talks to `url` (as remote `origin`), with the repo's credentials
    /// and the fetch deadline.
    async fn remote_run(&self, dir: &Path, url: &str, args: &[&str]) -> Result<Output, GitError> {
        let source = &self.inner.source;
        let mut env: Vec<(String, String)> = Vec::new();
        // The URL goes in through the environment, not argv: argv is world-readable in /proc.
        let mut config: Vec<(&str, String)> = vec![("remote.origin.url", url.to_owned())];
        if let Some(token_file) = &source.token_file {
            let token = std::fs::read_to_string(token_file).map_err(|source| GitError::Secret {
                key: "token_file",
                path: token_file.clone(),
                source,
            })?;
            env.push((TOKEN_ENV.to_owned(), token.trim().to_owned()));
            // An empty value first drops helpers from other config files; then ours answers
            // with the token (never on a command line, never in a URL). A helper, unlike an
            // `http.extraHeader`, only answers the host that asked, so a redirect elsewhere
            // does not get the token.
            config.push(("credential.helper", String::new()));
            config.push((
                "credential.helper",
                format!(
                    "!f() {{ test \"$1\" = get || exit 0; echo username={}; printf 'password=%s\\n' \"${TOKEN_ENV}\"; }}; f",
                    token_username(url)
                ),
            ));
        }
        if url.starts_with("ssh://") {
            env.push(("GIT_SSH_COMMAND".to_owned(), ssh_command(source)));
        }
        let output = run_git(
            GitRun {
                dir,
                args: &args.iter().map(|arg| arg.as_ref()).collect::<Vec<_>>(),
                config: &config,
                env: &env,
                input: None,
                timeout: source.fetch_timeout,
            },
            self.inner.pid_dir.as_deref(),
        )
        .await;
        match output {
            Err(GitError::Timeout { .. }) => Err(GitError::Timeout {
                url: redact_url(url),
                secs: source.fetch_timeout.as_secs(),
            }),
            other => other,
        }
    }

    fn fetch_error(&self, url: &str, output: &Output) -> GitError {
        let stderr = output.stderr_text();
        if stderr.contains("Host key verification failed") {
            return GitError::UnknownHostKey {
                host: ssh_host(url),
                file: match &self.inner.source.ssh_known_hosts_file {
                    Some(file) => file.display().to_string(),
                    None => "~/.ssh/known_hosts or /etc/ssh/ssh_known_hosts (no ssh_known_hosts_file is set)".to_owned(),
                },
            };
        }
        GitError::Fetch {
            url: redact_url(url),
            message: output.message(),
        }
    }

    /// Points HEAD at the default branch and resolves `wanted` to a full commit id.
    async fn resolve(&self, wanted: Wanted<'_>, default_branch: &str) -> Result<String, GitError> {
        let default_ref = format!("refs/heads/{default_branch}");
        if self.rev_parse(&default_ref).await?.is_some() {
            self.local(&["symbolic-ref", "HEAD", &default_ref]).await?;
        }
        match wanted {
            Wanted::Rev(rev) => self.resolve_rev(rev).await,
            Wanted::Ref(git_ref) => self.resolve_ref(git_ref).await,
        }
    }

    async fn resolve_ref(&self, git_ref: &str) -> Result<String, GitError> {
        let candidates = if git_ref.starts_with("refs/") {
            vec![git_ref.to_owned()]
        } else {
            vec![
                format!("refs/heads/{git_ref}"),
                format!("refs/tags/{git_ref}"),
            ]
        };
        for name in candidates {
            if let Some(rev) = self.rev_parse(&name).await? {
                return Ok(rev);
            }
        }
        Err(GitError::RefNotFound {
            git_ref: git_ref.to_owned(),
            url: self.inner.shown_url.clone(),
            available: self.branch_list().await?,
        })
    }

    async fn resolve_rev(&self, rev: &str) -> Result<String, GitError> {
        let output = self
            .run(GitRun {
                args: &[
                    "rev-parse".as_ref(),
                    "--verify".as_ref(),
                    "--end-of-options".as_ref(),
                    format!("{rev}^{{commit}}").as_ref(),
                ],
                ..GitRun::local(&self.inner.path)
            })
            .await?;
        if output.success {
            return Ok(output.stdout_text().trim().to_owned());
        }
        if output.stderr_text().contains("ambiguous") {
            return Err(GitError::RevAmbiguous {
                rev: rev.to_owned(),
                url: self.inner.shown_url.clone(),
            });
        }
        Err(GitError::RevNotFound {
            rev: rev.to_owned(),
            url: self.inner.shown_url.clone(),
        })
    }

    /// The commit `name` (a full ref) points to, or `None` when there is no such commit.
    async fn rev_parse(&self, name: &str) -> Result<Option<String>, GitError> {
        let output = self
            .run(GitRun {
                args: &[
                    "rev-parse".as_ref(),
                    "--verify".as_ref(),
                    "--quiet".as_ref(),
                    "--end-of-options".as_ref(),
                    format!("{name}^{{commit}}").as_ref(),
                ],
                ..GitRun::local(&self.inner.path)
            })
            .await?;
        Ok(output
            .success
            .then(|| output.stdout_text().trim().to_owned()))
    }

    async fn branch_list(&self) -> Result<String, GitError> {
        let names = self
            .local(&["for-each-ref", "--format=%(refname:short)", "refs/heads/"])
            .await?;
        let names: Vec<&str> = names.lines().filter(|line| !line.is_empty()).collect();
        Ok(match names.len() {
            0 => "(none: the repo has no branches)".to_owned(),
            n if n > MAX_LISTED_BRANCHES => format!(
                "{} and {} more",
                names[..MAX_LISTED_BRANCHES].join(", "),
                n - MAX_LISTED_BRANCHES
            ),
            _ => names.join(", "),
        })
    }

    /// Checks that every object of `rev`'s history is in the mirror (what nix reads); the
    /// error is git's message.
    async fn check_complete(&self, rev: &str) -> Result<(), String> {
        let output = self
            .run(GitRun {
                args: &[
                    "rev-list".as_ref(),
                    "--objects".as_ref(),
                    "--count".as_ref(),
                    "--end-of-options".as_ref(),
                    rev.as_ref(),
                ],
                ..GitRun::local(&self.inner.path)
            })
            .await
            .map_err(|err| err.to_string())?;
        if output.success {
            Ok(())
        } else {
            Err(output.message())
        }
    }

    /// Refuses a commit whose `.gitattributes` put files in Git LFS: nix's git fetcher would
    /// hand the build the pointer files.
    async fn refuse_lfs(&self, rev: &str) -> Result<(), GitError> {
        let output = self
            .run(GitRun {
                args: &[
                    "grep".as_ref(),
                    "--name-only".as_ref(),
                    "--fixed-strings".as_ref(),
                    "-e".as_ref(),
                    "filter=lfs".as_ref(),
                    rev.as_ref(),
                    "--".as_ref(),
                    ".gitattributes".as_ref(),
                    ":(glob)**/.gitattributes".as_ref(),
                ],
                ..GitRun::local(&self.inner.path)
            })
            .await?;
        match output.code {
            Some(0) => {}
            // No match.
            Some(1) => return Ok(()),
            _ => return Err(self.mirror_error(format!("git grep: {}", output.message()))),
        }
        let files: Vec<String> = output
            .stdout_text()
            .lines()
            .map(|line| {
                line.strip_prefix(&format!("{rev}:"))
                    .unwrap_or(line)
                    .to_owned()
            })
            .collect();
        Err(GitError::Lfs {
            rev: rev.to_owned(),
            url: self.inner.shown_url.clone(),
            files: files.join(", "),
        })
    }

    async fn pin(&self, rev: &str) -> Result<String, GitError> {
        let pins = self
            .local(&[
                "for-each-ref",
                "--sort=-creatordate",
                "--format=%(refname)",
                PIN_PREFIX.trim_end_matches("pin-"),
            ])
            .await?;
        let pins: Vec<&str> = pins.lines().filter(|line| !line.is_empty()).collect();
        if pins.len() >= MAX_PINS {
            let deletes: String = pins[MAX_PINS / 2..]
                .iter()
                .map(|pin| format!("delete {pin}\n"))
                .collect();
            let output = self
                .run(GitRun {
                    args: &["update-ref".as_ref(), "--stdin".as_ref()],
                    input: Some(deletes.as_bytes()),
                    ..GitRun::local(&self.inner.path)
                })
                .await?;
            if !output.success {
                warn!(mirror = %self.inner.path.display(), error = %output.message(), "could not remove old pins");
            }
        }
        let pin_ref = format!("{PIN_PREFIX}{rev}");
        self.local(&["update-ref", &pin_ref, rev]).await?;
        Ok(pin_ref)
    }

    /// Runs a git command on the mirror alone; its stdout, or its stderr as the error.
    async fn local(&self, args: &[&str]) -> Result<String, GitError> {
        let output = self
            .run(GitRun {
                args: &args.iter().map(|arg| arg.as_ref()).collect::<Vec<_>>(),
                ..GitRun::local(&self.inner.path)
            })
            .await?;
        if output.success {
            Ok(output.stdout_text())
        } else {
            Err(self.mirror_error(format!("git {}: {}", args.join(" "), output.message())))
        }
    }

    /// Runs a git command that stays on this machine; a timeout is the mirror's error.
    async fn run(&self, run: GitRun<'_>) -> Result<Output, GitError> {
        run_git(run, self.inner.pid_dir.as_deref())
            .await
            .map_err(|err| match err {
                GitError::Timeout { secs, .. } => {
                    self.mirror_error(format!("a local git command did not finish in {secs}s"))
                }
                other => other,
            })
    }

    fn mirror_error(&self, message: String) -> GitError {
        GitError::Mirror {
            path: self.inner.path.clone(),
            message,
        }
    }
}

/// The git config file that nix's git reads as its global config (`GIT_CONFIG_GLOBAL`): it sends
/// submodule URLs to the builder's mirrors. Written once a repo with submodules is fetched.
pub fn nix_git_config(state_dir: &Path) -> PathBuf {
    nix_git_config_in(&state_dir.join("mirrors"))
}

fn nix_git_config_in(mirrors: &Path) -> PathBuf {
    mirrors.join("nix-gitconfig")
}

/// Serialises rewrites of the nix git config between the repos of this builder.
static NIX_GIT_CONFIG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Adds `url."file://MIRROR".insteadOf = URL` to the nix git config, unless it is there.
fn add_url_rewrite(config: &Path, mirror: &Path, url: &str) -> std::io::Result<()> {
    let _guard = crate::lock(&NIX_GIT_CONFIG);
    let mut text = match std::fs::read_to_string(config) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            // The user's own global config still applies; `file` transport is needed because
            // git refuses it for submodules by default (CVE-2022-39253), and the mirrors are
            // local.
            "# Written by homelab-deploy: nix's git fetches submodules from the builder's mirrors.\n\
             [include]\n\tpath = ~/.gitconfig\n[protocol \"file\"]\n\tallow = always\n"
                .to_owned()
        }
        Err(err) => return Err(err),
    };
    let quoted = |value: &str| value.replace('\\', "\\\\").replace('"', "\\\"");
    let block = format!(
        "[url \"file://{}\"]\n\tinsteadOf = \"{}\"\n",
        quoted(&mirror.display().to_string()),
        quoted(url)
    );
    if text.contains(&block) {
        return Ok(());
    }
    text.push_str(&block);
    let temporary = config.with_extension(format!("tmp-{}", nuid::next()));
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, config)
}

/// A submodule's URL as git resolves it against its superproject's URL: `./x` and `../x` are
/// relative to `base`, anything else is taken as it is.
fn resolve_submodule_url(base: &str, url: &str) -> String {
    if !url.starts_with("./") && !url.starts_with("../") {
        return url.to_owned();
    }
    let mut base = base.trim_end_matches('/').to_owned();
    let mut rest = url;
    loop {
        if let Some(next) = rest.strip_prefix("./") {
            rest = next;
        } else if let Some(next) = rest.strip_prefix("../") {
            rest = next;
            let cut = base.rfind('/').unwrap_or(0);
            // Never above the host part (`https://host`).
            if base[..cut].ends_with('/') || cut == 0 {
                break;
            }
            base.truncate(cut);
        } else {
            break;
        }
    }
    format!("{base}/{rest}")
}

/// A directory name for a submodule's mirror: readable, unique per URL (FNV-1a of it; written
/// here rather than pulling a hash crate for 64 bits that only need to be stable).
fn mirror_name(url: &str) -> String {
    let shown = redact_url(url);
    let readable: String = shown
        .rsplit('/')
        .next()
        .unwrap_or("")
        .trim_end_matches(".git")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let hash = url.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{readable}-{hash:016x}")
}

/// Lock files (`*.lock`) anywhere in the mirror except among loose objects.
fn stale_locks(mirror: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![mirror.to_owned()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let loose_objects = dir.ends_with("objects")
                && name.len() == 2
                && name.bytes().all(|b| b.is_ascii_hexdigit());
            if kind.is_dir() && !loose_objects {
                dirs.push(path);
            } else if kind.is_file() && name.ends_with(".lock") {
                found.push(path);
            }
        }
    }
    found
}

/// `ssh` with the repo's key and known-hosts file, strict host-key checking and no prompts.
fn ssh_command(source: &Source) -> String {
    let mut command = String::from(
        "ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o UpdateHostKeys=no -o ConnectTimeout=30",
    );
    if let Some(key) = &source.ssh_key_file {
        command.push_str(" -o IdentitiesOnly=yes -o IdentityAgent=none -i ");
        command.push_str(&shell_quote(&key.display().to_string()));
    }
    if let Some(known_hosts) = &source.ssh_known_hosts_file {
        command.push_str(" -o GlobalKnownHostsFile=/dev/null -o UserKnownHostsFile=");
        command.push_str(&shell_quote(&known_hosts.display().to_string()));
    }
    command
}

/// `'text'` for a POSIX shell.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// `host` or `[host]:port` of an `ssh://` URL, as ssh and known-hosts files write it.
fn ssh_host(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    match host_port.rsplit_once(':') {
        Some((host, port)) if port != "22" => format!("[{host}]:{port}"),
        Some((host, _)) => host.to_owned(),
        None => host_port.to_owned(),
    }
}

/// The user name sent with a token: the URL's own (`https://deploy@host/…`), else
/// `x-access-token`, which GitHub, Gitea/Forgejo and GitLab all accept with a token.
fn token_username(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    authority
        .rsplit_once('@')
        .map(|(user, _)| user.split(':').next().unwrap_or(user))
        .filter(|user| {
            !user.is_empty()
                && user
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
        .unwrap_or("x-access-token")
        .to_owned()
}

/// One git command to run.
struct GitRun<'a> {
    dir: &'a Path,
    args: &'a [&'a std::ffi::OsStr],
    /// `git -c`-like settings, passed through `GIT_CONFIG_*` so no value lands on argv.
    config: &'a [(&'a str, String)],
    env: &'a [(String, String)],
    input: Option<&'a [u8]>,
    timeout: Duration,
}

impl<'a> GitRun<'a> {
    fn local(dir: &'a Path) -> Self {
        Self {
            dir,
            args: &[],
            config: &[],
            env: &[],
            input: None,
            timeout: LOCAL_TIMEOUT,
        }
    }
}

/// What a finished git command printed.
struct Output {
    success: bool,
    /// Exit code; `None` when a signal ended git.
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Output {
    fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// The end of stderr, credentials hidden, cut to a readable size.
    fn message(&self) -> String {
        let text = text::tail_marked(&redact_url(self.stderr_text().trim()), MAX_MESSAGE_BYTES);
        if text.is_empty() {
            "git failed without a message".to_owned()
        } else {
            text
        }
    }
}

/// Runs git as a child of [`crate::process`]: in its own process group (dropping it ends git's
/// helpers too: ssh, `git-remote-https`), killed with the builder on any death, and with a pid
/// file under `pid_dir` so a builder that starts after a crash ends a git left behind.
async fn run_git(run: GitRun<'_>, pid_dir: Option<&Path>) -> Result<Output, GitError> {
    let mut command = Command::new("git");
    command
        .args(run.args)
        .current_dir(run.dir)
        .env_clear()
        .envs(std::env::vars().filter(|(key, _)| passes_through(key)))
        // English messages: errors are recognised by their text.
        .env("LC_ALL", "C")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ALLOW_PROTOCOL", ALLOWED_PROTOCOLS)
        .env("SSH_ASKPASS_REQUIRE", "never")
        .env("GIT_CONFIG_COUNT", run.config.len().to_string())
        .envs(run.env.iter().map(|(key, value)| (key, value)))
        .stdin(if run.input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (index, (key, value)) in run.config.iter().enumerate() {
        command.env(format!("GIT_CONFIG_KEY_{index}"), key);
        command.env(format!("GIT_CONFIG_VALUE_{index}"), value);
    }
    let mut git = process::spawn(command, None, pid_dir)
        .await
        .map_err(|source| GitError::Spawn { source })?;
    let stdin = git.stdin.take();
    let stdout = git.stdout.take();
    let stderr = git.stderr.take();
    let input = run.input;
    let work = async {
        let write = async {
            if let (Some(mut stdin), Some(input)) = (stdin, input) {
                // A git that exits early closes its end; its exit status tells why.
                let _ = stdin.write_all(input).await;
            }
        };
        let (_, stdout, stderr) = tokio::join!(
            write,
            process::read_head(stdout, MAX_STDOUT_BYTES),
            process::read_tail(stderr, MAX_STDERR_BYTES)
        );
        let exit = git.wait().await;
        (stdout, stderr, exit)
    };
    match tokio::time::timeout(run.timeout, work).await {
        Ok((stdout, stderr, Ok(exit))) => Ok(Output {
            success: exit.success(),
            code: exit.code,
            stdout,
            stderr,
        }),
        Ok((_, _, Err(source))) => Err(GitError::Spawn { source }),
        // Dropping `git` ends its process group.
        Err(_) => Err(GitError::Timeout {
            url: String::new(),
            secs: run.timeout.as_secs(),
        }),
    }
}

/// The environment git may see from the builder's; the rest (`GIT_*` settings, askpass
/// helpers) is dropped.
fn passes_through(key: &str) -> bool {
    process::inherits_env(key) || key == "GIT_SSL_CAINFO"
}

/// Hides the credentials of URLs in `text` (`https://user:token@host/…` → `https://***@host/…`),
/// a password holding a quote included; see `homelab_deploy_credentials::secret_url`.
pub fn redact_url(text: &str) -> String {
    homelab_deploy_credentials::secret_url::redact_urls(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use test_support::{HostileHttp, Hostility};

    fn git(dir: &Path, args: &[&str]) -> String {
        let output = Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(dir)
            .output()
            .expect("git runs");
        assert!(
            output.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    fn origin() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        git(dir.path(), &["init", "-q"]);
        std::fs::write(dir.path().join("a"), "1").expect("write");
        git(dir.path(), &["add", "a"]);
        git(dir.path(), &["commit", "-qm", "one"]);
        dir
    }

    fn mirror_of(state: &Path, origin: &Path) -> Mirror {
        Mirror::new(
            state,
            "demo",
            Source::plain(&format!("file://{}", origin.display())),
        )
    }

    fn commit(origin: &Path, content: &str) -> String {
        std::fs::write(origin.join("a"), content).expect("write");
        git(origin, &["commit", "-qam", content]);
        git(origin, &["rev-parse", "HEAD"])
    }

    #[tokio::test]
    async fn resolves_branch_then_sees_new_commits() {
        let origin = origin();
        let state = tempfile::tempdir().expect("tempdir");
        let mirror = mirror_of(state.path(), origin.path());
        let first = mirror
            .fetch_and_resolve(Wanted::Ref("main"), "main")
            .await
            .expect("resolves")
            .rev;
        assert_eq!(first, git(origin.path(), &["rev-parse", "HEAD"]));
        let second_commit = commit(origin.path(), "2");
        let second = mirror
            .fetch_and_resolve(Wanted::Ref("main"), "main")
            .await
            .expect("resolves")
            .rev;
        assert_eq!(second, second_commit);
        let by_rev = mirror
            .fetch_and_resolve(Wanted::Rev(&first[..10]), "main")
            .await
            .expect("resolves");
        assert_eq!(by_rev.rev, first);
        assert!(mirror
            .flake_url(&by_rev)
            .ends_with(&format!("?ref=refs/homelab-deploy/pin-{first}&rev={first}")));
    }

    #[tokio::test]
    async fn unknown_ref_and_rev_are_named() {
        let origin = origin();
        let state = tempfile::tempdir().expect("tempdir");
        let mirror = mirror_of(state.path(), origin.path());
        let err = mirror
            .fetch_and_resolve(Wanted::Ref("nope"), "main")
            .await
            .expect_err("resolved");
        assert!(
            err.to_string().contains("\"nope\"") && err.to_string().contains("main"),
            "{err}"
        );
        let err = mirror
            .fetch_and_resolve(
                Wanted::Rev("0123456789abcdef0123456789abcdef01234567"),
                "main",
            )
            .await
            .expect_err("resolved");
        assert!(err.to_string().contains("0123456789abcdef"), "{err}");
    }

    #[tokio::test]
    async fn unreachable_url_is_a_fetch_error_without_credentials() {
        let state = tempfile::tempdir().expect("tempdir");
        let mirror = Mirror::new(
            state.path(),
            "demo",
            Source::plain("https://bot:s3cret@127.0.0.1:1/x.git"),
        );
        let err = mirror
            .fetch_and_resolve(Wanted::Ref("main"), "main")
            .await
            .expect_err("fetched");
        assert!(matches!(err, GitError::Fetch { .. }), "{err}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
        assert_eq!(
            redact_url("fetch https://bot:s3cret@git.example.org/x.git failed"),
            "fetch https://***@git.example.org/x.git failed"
        );
    }

    /// Every hostile answer ends the fetch with an error naming the URL, in bounded time; the
    /// same process then still fetches a real repo.
    #[tokio::test]
    async fn hostile_http_servers_fail_the_fetch_only() {
        let state = tempfile::tempdir().expect("tempdir");
        for hostility in [
            Hostility::RedirectLoop(301),
            Hostility::RedirectLoop(302),
            Hostility::RedirectLoop(307),
            Hostility::RedirectLoop(308),
            Hostility::RedirectPingPong,
            Hostility::RedirectToFile,
            Hostility::Garbage,
            Hostility::EndlessBody,
            Hostility::EndlessHeader,
            Hostility::Silent,
        ] {
            let server = HostileHttp::start(hostility);
            let mut source = Source::plain(&server.url);
            source.fetch_timeout = Duration::from_secs(5);
            let mirror = Mirror::new(state.path(), &format!("h{}", nuid::next()), source);
            let started = std::time::Instant::now();
            let err = mirror
                .fetch_and_resolve(Wanted::Ref("main"), "main")
                .await
                .expect_err("a hostile server gave a commit");
            assert!(
                matches!(err, GitError::Fetch { .. } | GitError::Timeout { .. }),
                "{hostility:?}: {err}"
            );
            assert!(
                err.to_string().contains("127.0.0.1"),
                "{hostility:?}: {err}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{hostility:?} took {:?}",
                started.elapsed()
            );
        }
        let origin = origin();
        let mirror = mirror_of(state.path(), origin.path());
        mirror
            .fetch_and_resolve(Wanted::Ref("main"), "main")
            .await
            .expect("a real repo still resolves");
    }

    /// Dropping the future of a fetch that hangs kills git and its helpers at once.
    #[tokio::test]
    async fn dropping_the_fetch_kills_git() {
        let server = HostileHttp::start(Hostility::Silent);
        let state = tempfile::tempdir().expect("tempdir");
        let mirror = Mirror::new(state.path(), "silent", Source::plain(&server.url));
        let port = server
            .url
            .split(':')
            .nth(2)
            .and_then(|rest| rest.split('/').next())
            .expect("port")
            .to_owned();
        let gits = || {
            let output = Command::new("pgrep")
                .args(["-f", &format!("127.0.0.1:{port}")])
                .output()
                .expect("pgrep runs");
            String::from_utf8_lossy(&output.stdout).trim().to_owned()
        };
        let mut fetch = Box::pin(mirror.fetch_and_resolve(Wanted::Ref("main"), "main"));
        // git-remote-http names the URL on its command line while it waits for the server.
        let waited = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                tokio::select! {
                    _ = fetch.as_mut() => panic!("a silent server answered"),
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                if !gits().is_empty() {
                    return;
                }
            }
        })
        .await;
        assert!(waited.is_ok(), "git never started");
        drop(fetch);
        // The group gets SIGTERM at once and SIGKILL after STOP_GRACE: wait past both, so a
        // loaded machine's slow SIGTERM handling is not taken for a leak.
        let deadline = tokio::time::Instant::now() + crate::process::STOP_GRACE * 3;
        while tokio::time::Instant::now() < deadline {
            if gits().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let output = Command::new("pgrep")
            .args(["-a", "-f", &format!("127.0.0.1:{port}")])
            .output()
            .expect("pgrep");
        panic!(
            "git still runs: {}",
            String::from_utf8_lossy(&output.stdout)
        );
    }

    #[tokio::test]
    async fn stale_lock_file_is_removed() {
        let origin = origin();
        let state = tempfile::tempdir().expect("tempdir");
        let mirror = mirror_of(state.path(), origin.path());
        mirror
            .fetch_and_resolve(Wanted::Ref("main"), "main")
            .await
            .expect("resolves");
        std::fs::write(mirror.path().join("refs/heads/main.lock"), "").expect("plant lock");
        let new = commit(origin.path(), "2");
        let resolved = mirror
            .fetch_and_resolve(Wanted::Ref("main"), "main")
            .await
            .expect("resolves despite the stale lock");
        assert_eq!(resolved.rev, new);
        assert!(!mirror.path().join("refs/heads/main.lock").exists());
    }

    #[tokio::test]
    async fn missing_objects_and_shallow_mirror_are_fetched_anew() {
        let origin = origin();
        let state = tempfile::tempdir().expect("tempdir");
        let mirror = mirror_of(state.path(), origin.path());
        let rev = mirror
            .fetch_and_resolve(Wanted::Ref("main"), "main")
            .await
            .expect("resolves")
            .rev;
        // A blob of the commit goes missing (a crash during a repack, a disk error).
        let blob = git(mirror.path(), &["rev-parse", "main:a"]);
        std::fs::remove_file(
            mirror
                .path()
                .join("objects")
                .join(&blob[..2])
                .join(&blob[2..]),
        )
        .expect("remove blob");
        let fresh = Mirror::new(
            state.path(),
            "demo",
            Source::plain(&format!("file://{}", origin.path().display())),
        );
        let resolved = fresh
            .fetch_and_resolve(Wanted::Ref("main"), "main")
            .await
            .expect("fetched anew");
        assert_eq!(resolved.rev, rev);
        git(mirror.path(), &["cat-file", "-e", &blob]);
        // A shallow mirror lacks history nix needs.
        std::fs::write(mirror.path().join("shallow"), format!("{rev}\n")).expect("shallow");
        fresh
            .fetch_and_resolve(Wanted::Ref("main"), "main")
            .await
            .expect("fetched anew");
        assert!(!mirror.path().join("shallow").exists());
    }

    #[tokio::test]
    async fn mirror_of_another_url_is_fetched_anew() {
        let first = origin();
        let first_head = commit(first.path(), "only in the first");
        let second = origin();
        let second_only = commit(second.path(), "only in the second");
        let state = tempfile::tempdir().expect("tempdir");
        mirror_of(state.path(), first.path())
            .fetch_and_resolve(Wanted::Ref("main"), "main")
            .await
            .expect("resolves");
        let moved = mirror_of(state.path(), second.path());
        let resolved = moved
            .fetch_and_resolve(Wanted::Ref("main"), "main")
            .await
            .expect("resolves");
        assert_eq!(resolved.rev, second_only);
        let branches = git(moved.path(), &["rev-list", "--all"]);
        assert!(
            !branches.contains(&first_head),
            "old objects kept: {branches}"
        );
    }

    #[tokio::test]
    async fn shallow_origin_is_named() {
        let origin = origin();
        commit(origin.path(), "2");
        let parent = tempfile::tempdir().expect("tempdir");
        let shallow = parent.path().join("shallow");
        git(
            parent.path(),
            &[
                "clone",
                "-q",
                "--depth",
                "1",
                &format!("file://{}", origin.path().display()),
                &shallow.display().to_string(),
            ],
        );
        let state = tempfile::tempdir().expect("tempdir");
        let err = mirror_of(state.path(), &shallow)
            .fetch_and_resolve(Wanted::Ref("main"), "main")
            .await
            .expect_err("resolved from a shallow origin");
        assert!(matches!(err, GitError::ShallowOrigin { .. }), "{err}");
    }

    #[tokio::test]
    async fn lfs_is_refused_by_name() {
        let origin = origin();
        std::fs::write(
            origin.path().join(".gitattributes"),
            "*.bin filter=lfs diff=lfs merge=lfs -text\n",
        )
        .expect("write");
        git(origin.path(), &["add", ".gitattributes"]);
        git(origin.path(), &["commit", "-qm", "lfs"]);
        let state = tempfile::tempdir().expect("tempdir");
        let err = mirror_of(state.path(), origin.path())
            .fetch_and_resolve(Wanted::Ref("main"), "main")
            .await
            .expect_err("resolved a commit in LFS");
        assert!(
            err.to_string().contains("LFS") && err.to_string().contains(".gitattributes"),
            "{err}"
        );
    }

    #[test]
    fn ssh_host_and_token_user() {
        assert_eq!(ssh_host("ssh://git@127.0.0.1:2222/o/r"), "[127.0.0.1]:2222");
        assert_eq!(ssh_host("ssh://git@example.org/o/r"), "example.org");
        assert_eq!(token_username("https://deploy@example.org/o/r"), "deploy");
        assert_eq!(token_username("https://example.org/o/r"), "x-access-token");
        assert_eq!(shell_quote("/a b/it's"), "'/a b/it'\\''s'");
    }
}
