//! One host of a request: evaluate its toplevel (unless the shared evaluation did), build it (or
//! find it held by its GC root), diff its closure against its previous build, and push it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use homelab_deploy_protocol::diff::MAX_LISTED_PACKAGES;
use homelab_deploy_protocol::{
    ClosureDiff, DiffStatus, EventBody, HostResult, HostStatus, RepoName,
};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::events::{cut, Events, MAX_ERROR_BYTES};
use super::{gc_root_name, interrupted, Canceller, Checkout, Deadline, Interrupt, JobError, Jobs};
use crate::lock;
use crate::logs::LogBatcher;
use crate::nix::{BuildOutput, NixError};

/// Progress events of one host are at most this frequent.
const PROGRESS_EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// What all hosts of one request share while they are built (up to `build_jobs` at once).
pub(super) struct RequestHosts<'a, 'e> {
    /// The request's events, published by one host at a time.
    pub(super) events: tokio::sync::Mutex<&'a mut Events<'e>>,
    pub(super) checkout: &'a Checkout<'a>,
    /// The toplevel drvs the shared evaluation found, by host.
    pub(super) drvs: &'a HashMap<String, String>,
    /// The request's deadline.
    pub(super) deadline: &'a Deadline,
    /// How long one host may take (`builder.host_timeout_secs`, or what the request asked).
    pub(super) host_timeout: Duration,
    /// The request's number of hosts.
    pub(super) total: usize,
    /// Who cancelled the request and why, once a cancel was seen: the hosts not started yet
    /// are skipped.
    pub(super) cancelled: Mutex<Option<(Canceller, String)>>,
}

/// What happened to one host.
enum HostOutcome {
    Done(HostResult),
    /// Stopped by a cancel: the host's result, and who cancelled the request and why (the
    /// request's other hosts are cancelled too).
    Cancelled {
        result: HostResult,
        by: Canceller,
        reason: String,
    },
}

impl Jobs {
    /// Runs host `position` (0-based) of a request to its `host_finished` event: skipped when
    /// the request was cancelled or timed out already, else built within the sooner of the host
    /// and request deadlines. A cancel seen here cancels the request's later hosts.
    pub(super) async fn run_host(
        &self,
        run: &RequestHosts<'_, '_>,
        position: usize,
        host: String,
        mut interrupt: watch::Receiver<Option<Interrupt>>,
    ) -> Result<HostResult, JobError> {
        let host = &host;
        let (index, total) = (position + 1, run.total);
        let Checkout { repo, id, .. } = *run.checkout;
        if lock(&run.cancelled).is_some() {
            return Ok(skipped_host(host, HostStatus::Cancelled, None));
        }
        if run.deadline.passed() {
            let why = Some(run.deadline.why.clone());
            return Ok(skipped_host(host, HostStatus::TimedOut, why));
        }
        let host_deadline = Deadline {
            at: tokio::time::Instant::now() + run.host_timeout,
            why: format!(
                "timed out after {}s (host timeout)",
                run.host_timeout.as_secs()
            ),
        };
        let deadline = if host_deadline.at <= run.deadline.at {
            host_deadline
        } else {
            run.deadline.clone()
        };
        let started = EventBody::HostStarted {
            host: host.clone(),
            index,
            total,
        };
        run.events.lock().await.emit(started).await?;
        let mut log_lines = 0;
        let mut measured = Measured::default();
        let outcome = self
            .build_host(
                &run.events,
                run.checkout,
                HostRun {
                    host,
                    drv: run.drvs.get(host).map(String::as_str),
                    deadline: &deadline,
                    measured: &mut measured,
                    log_lines: &mut log_lines,
                    interrupt: &mut interrupt,
                },
            )
            .await?;
        let held = match &outcome {
            HostOutcome::Done(result) if result.status.is_success() => Some(run.checkout.rev),
            _ => None,
        };
        self.placement
            .learn(repo, host, measured.eval, measured.build, held)
            .await;
        let result = match outcome {
            HostOutcome::Done(result) => result,
            HostOutcome::Cancelled { result, by, reason } => {
                lock(&run.cancelled).get_or_insert((by, reason));
                result
            }
        };
        info!(request_id = %id, host, status = result.status.as_str(), duration_ms = result.duration_ms, "host finished");
        crate::metrics::host_finished(
            repo.as_str(),
            host,
            result.status.as_str(),
            result.duration_ms as f64 / 1000.0,
        );
        let finished = EventBody::HostFinished {
            host: host.clone(),
            index,
            total,
            result: result.clone(),
            log_lines: Some(log_lines),
        };
        run.events.lock().await.emit(finished).await?;
        Ok(result)
    }

    /// The output `drv` was built to, when this builder's GC root for the host still points at
    /// it: nix cannot have collected it, so there is nothing to build and no need to ask nix.
    fn held_by_gc_root(&self, drv: &str, out_link: &Path) -> Option<String> {
        let out_path = self.evaluated.out_path(drv)?;
        let target = std::fs::read_link(out_link).ok()?;
        (target == Path::new(&out_path) && target.exists()).then_some(out_path)
    }

    /// Evaluates and builds one host. Only a failure to publish (or a shutdown) is an error;
    /// everything nix does wrong is the host's result.
    async fn build_host(
        &self,
        events: &tokio::sync::Mutex<&mut Events<'_>>,
        checkout: &Checkout<'_>,
        run: HostRun<'_>,
    ) -> Result<HostOutcome, JobError> {
        let Checkout {
            flake,
            repo,
            rev,
            roots,
            logs,
            id: request_id,
        } = *checkout;
        let HostRun {
            host,
            drv: evaluated_drv,
            deadline,
            measured,
            log_lines,
            interrupt,
        } = run;
        let started = Instant::now();
        let fence = events.lock().await.log_fence.clone();
        let result = |status, out_path, error: Option<String>| HostResult {
            name: host.to_owned(),
            status,
            out_path,
            duration_ms: started.elapsed().as_millis() as u64,
            error: error.map(|e| cut(&e, MAX_ERROR_BYTES)),
            pushed: None,
            push_error: None,
            closure_diff: None,
        };
        let done = |status, out_path, error| Ok(HostOutcome::Done(result(status, out_path, error)));
        let timed_out = || deadline.why.clone();
        let stopped = |why: Interrupt| match why {
            Interrupt::Shutdown => Err(JobError::Aborted),
            Interrupt::Cancel { by, reason } => {
                let error = format!("cancelled by {by}: {reason}");
                Ok(HostOutcome::Cancelled {
                    result: result(HostStatus::Cancelled, None, Some(error)),
                    by,
                    reason,
                })
            }
        };

        let evaluate = async {
            match evaluated_drv {
                Some(drv) => Ok(drv.to_owned()),
                None => match self.nix_of(repo).eval_toplevel_drv(flake, host).await {
                    Ok((drv, peak)) => {
                        measured.eval = Some(peak);
                        self.evaluated.put_drv(repo.as_str(), rev, host, &drv);
                        let name = Path::new(&drv).file_name().unwrap_or_default();
                        roots.add(&self.nix, &[&drv], &name.to_string_lossy()).await;
                        Ok(drv)
                    }
                    Err(err) => {
                        // It needed at least what it reached before the limit stopped it.
                        if let NixError::MemoryLimit { rss, .. } = &err {
                            measured.eval = Some(*rss);
                        }
                        Err(err)
                    }
                },
            }
        };
        let drv = tokio::select! {
            drv = evaluate => drv,
            _ = tokio::time::sleep_until(deadline.at) => return done(HostStatus::TimedOut, None, Some(timed_out())),
            why = interrupted(interrupt) => return stopped(why),
        };
        let new_batcher = || {
            LogBatcher::new(
                self.publisher.clone(),
                fence,
                repo.to_string(),
                logs.to_owned(),
                request_id.to_string(),
                host.to_owned(),
            )
        };
        let drv = match drv {
            Ok(drv) => drv,
            Err(err) => {
                // Events may carry a shortened excerpt (to fit `max_payload`); the logs
                // subject keeps it whole, as it keeps a failed build's log.
                let excerpt = err.excerpt();
                let mut batcher = new_batcher();
                for line in excerpt.lines() {
                    batcher.push(line.to_owned()).await?;
                }
                batcher.flush().await?;
                *log_lines = batcher.lines_published();
                return done(HostStatus::EvalFailed, None, Some(excerpt));
            }
        };

        let out_link = self
            .state_dir
            .join("gcroots")
            .join(repo.as_str())
            .join(gc_root_name(host));
        if let Some(parent) = out_link.parent() {
            if let Err(err) = std::fs::create_dir_all(parent) {
                let error = format!(
                    "cannot create GC root directory {}: {err}",
                    parent.display()
                );
                return done(HostStatus::BuildFailed, None, Some(error));
            }
        }
        let mut batcher = new_batcher();
        if let Some(out_path) = self.held_by_gc_root(&drv, &out_link) {
            let closure_diff = self
                .closure_diff(repo, rev, host, &out_path, &mut batcher)
                .await?;
            *log_lines = batcher.lines_published();
            let mut cached = result(HostStatus::Cached, Some(out_path), None);
            cached.closure_diff = closure_diff;
            return Ok(HostOutcome::Done(self.push(repo, cached, started).await));
        }
        let (output_tx, mut output) = mpsc::channel(256);
        let build = self.nix_of(repo).build(&drv, &out_link, output_tx);
        tokio::pin!(build);
        let mut last_progress: Option<Instant> = None;
        // The newest counts nix reported, and whether an event carried them already.
        let mut latest_progress: Option<(EventBody, bool)> = None;
        let far_future = tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600);
        // Dropping `build` (on timeout or interrupt) kills nix's whole process group.
        let built = loop {
            tokio::select! {
                built = &mut build => break built,
                Some(item) = output.recv() => match item {
                    BuildOutput::Line(line) => batcher.push(line).await?,
                    BuildOutput::Progress { done, expected, running, failed } => {
                        let progress = EventBody::Progress { host: host.to_owned(), done, expected, running, failed };
                        let due = last_progress.is_none_or(|at| at.elapsed() >= PROGRESS_EVENT_INTERVAL);
                        if due {
                            last_progress = Some(Instant::now());
                            events.lock().await.emit(progress.clone()).await?;
                        }
                        latest_progress = Some((progress, due));
                    }
                },
                _ = tokio::time::sleep_until(batcher.deadline().unwrap_or(far_future)) => batcher.flush().await?,
                _ = tokio::time::sleep_until(deadline.at) => {
                    batcher.flush().await?;
                    *log_lines = batcher.lines_published();
                    return done(HostStatus::TimedOut, None, Some(timed_out()));
                }
                why = interrupted(interrupt) => {
                    batcher.flush().await?;
                    *log_lines = batcher.lines_published();
                    return stopped(why);
                }
            }
        };
        while let Some(item) = output.recv().await {
            match item {
                BuildOutput::Line(line) => batcher.push(line).await?,
                BuildOutput::Progress {
                    done,
                    expected,
                    running,
                    failed,
                } => {
                    let progress = EventBody::Progress {
                        host: host.to_owned(),
                        done,
                        expected,
                        running,
                        failed,
                    };
                    latest_progress = Some((progress, false));
                }
            }
        }
        batcher.flush().await?;
        *log_lines = batcher.lines_published();
        // The host's last progress event carries nix's final counts, however close together
        // they came.
        if let Some((progress, false)) = latest_progress {
            events.lock().await.emit(progress).await?;
        }
        let built = match built {
            Ok(built) => built,
            Err(err) => return done(HostStatus::BuildFailed, None, Some(err.excerpt())),
        };
        self.evaluated.put_out_path(&drv, &built.out_path);
        let status = if built.derivations_built == 0 {
            HostStatus::Cached
        } else {
            // A build that built nothing measured only nix itself.
            measured.build = Some(built.peak_rss);
            HostStatus::Built
        };
        let closure_diff = self
            .closure_diff(repo, rev, host, &built.out_path, &mut batcher)
            .await?;
        *log_lines = batcher.lines_published();
        let mut host_result = result(status, Some(built.out_path), None);
        host_result.closure_diff = closure_diff;
        Ok(HostOutcome::Done(
            self.push(repo, host_result, started).await,
        ))
    }

    /// Compares the host's new toplevel with its newest held build at another commit, writes
    /// the whole diff to the host's logs, and keeps the new toplevel for later diffs. `None`
    /// when diffs are off; a failure is the diff's `failed` status, never the host's. Only a
    /// failure to publish the log lines is an error.
    async fn closure_diff(
        &self,
        repo: &RepoName,
        rev: &str,
        host: &str,
        out_path: &str,
        batcher: &mut LogBatcher,
    ) -> Result<Option<ClosureDiff>, JobError> {
        if !self.history.enabled() {
            return Ok(None);
        }
        let host_file = gc_root_name(host);
        let mut diff = match self.history.previous(repo.as_str(), &host_file, rev) {
            Some(previous) => self.history.compare(&self.nix, &previous, out_path).await,
            None => ClosureDiff::no_previous(),
        };
        if let Err(err) = self
            .history
            .record(&self.nix, repo.as_str(), &host_file, rev, out_path)
            .await
        {
            warn!(repo = %repo, host, error = %err, "cannot keep the build for later closure diffs");
        }
        match diff.status {
            DiffStatus::Failed => {
                let error = diff.error.take().unwrap_or_default();
                warn!(repo = %repo, host, error = %error, "closure diff failed");
                batcher
                    .push(format!("closure diff failed: {}", error.trim()))
                    .await?;
                diff.error = Some(cut(&error, MAX_ERROR_BYTES));
            }
            DiffStatus::NoPrevious => {}
            DiffStatus::Compared => {
                for line in diff_log_lines(&diff) {
                    batcher.push(line).await?;
                }
            }
        }
        batcher.flush().await?;
        diff.keep_packages(MAX_LISTED_PACKAGES);
        Ok(Some(diff))
    }

    /// Copies a finished host to the repo's binary cache, when it has one. A failed push is
    /// reported, but the host is still built.
    async fn push(
        &self,
        repo: &RepoName,
        mut host_result: HostResult,
        started: Instant,
    ) -> HostResult {
        let push_store = self
            .repos
            .get(repo)
            .and_then(|served| served.config.push_store());
        if let (Some(store), Some(out_path)) = (push_store, host_result.out_path.clone()) {
            let pushed = self.nix_of(repo).copy_to(&store, &out_path).await;
            host_result.pushed = Some(pushed.is_ok());
            host_result.push_error = pushed.err().map(|err| cut(&err.excerpt(), MAX_ERROR_BYTES));
            host_result.duration_ms = started.elapsed().as_millis() as u64;
        }
        host_result
    }
}

/// The whole closure diff as log lines: a heading naming the earlier build, one line per
/// package, and the closure sizes.
fn diff_log_lines(diff: &ClosureDiff) -> Vec<String> {
    let mut lines = vec![format!(
        "closure diff against rev {} ({}): {}",
        diff.from_rev.as_deref().unwrap_or("?"),
        diff.from_path.as_deref().unwrap_or("?"),
        diff.summary()
    )];
    lines.extend(diff.packages.iter().map(|p| format!("  {p}")));
    if let (Some(before), Some(after)) = (diff.size_before, diff.size_after) {
        lines.push(format!("closure size: {before} → {after} bytes"));
    }
    lines
}

/// A host that was never started because the request was cancelled or timed out first.
fn skipped_host(host: &str, status: HostStatus, error: Option<String>) -> HostResult {
    HostResult {
        name: host.to_owned(),
        status,
        out_path: None,
        duration_ms: 0,
        error,
        pushed: None,
        push_error: None,
        closure_diff: None,
    }
}

/// One host of a request to build: its name, its drv when the shared evaluation found it, its
/// deadline, where the peaks measured on the way go, where the number of its log lines
/// published (all of them stored) goes, and what interrupts it.
struct HostRun<'a> {
    host: &'a str,
    drv: Option<&'a str>,
    deadline: &'a Deadline,
    measured: &'a mut Measured,
    log_lines: &'a mut u64,
    /// The request's interrupt: a cancel or shutdown stops the host's nix at once.
    interrupt: &'a mut watch::Receiver<Option<Interrupt>>,
}

/// Peak resident memory (bytes) of a host's own evaluation and build, when they ran.
#[derive(Debug, Default)]
struct Measured {
    eval: Option<u64>,
    build: Option<u64>,
}
