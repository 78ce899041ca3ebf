//! Showing a build while it runs (stderr) and its result (stdout).
//!
//! On a terminal: one `indicatif` line that changes in place. Otherwise (CI, timers, pipes): one
//! plain line per step, so logs stay readable.

use std::io::IsTerminal;
use std::time::Duration;

use homelab_deploy_protocol::{
    error_excerpt, group_failures, Event, EventBody, FailureGroup, HostResult, HostStatus,
};
use indicatif::{ProgressBar, ProgressStyle};

/// Lines of a failed host's error shown under the result table.
const ERROR_LINES_SHOWN: usize = 15;
/// Characters of one error line shown (a 100 MB line stays one screen line or so).
const ERROR_LINE_CHARS: usize = 300;
/// Rows of the result table: past this many hosts, only the ones that did not succeed are
/// listed, up to this many, and the rest are counted.
const TABLE_ROWS_SHOWN: usize = 50;
/// Groups of identical errors shown under the table; the rest are counted.
const ERROR_GROUPS_SHOWN: usize = 8;
/// Package change lines (closure diffs) under the table, over all hosts.
const PACKAGE_LINES_SHOWN: usize = 40;
/// Widest closure-diff summary in the table's CHANGES column.
const CHANGES_WIDTH: usize = 40;
/// Host names listed per group of identical errors.
const GROUP_NAMES_SHOWN: usize = 10;

pub struct Progress {
    quiet: bool,
    bar: Option<ProgressBar>,
    started: bool,
    said_waiting: bool,
    /// "[2/5] web" while a host builds.
    current: Option<String>,
    derivations: String,
}

impl Progress {
    /// For `build`; `quiet` shows nothing while waiting.
    pub fn new(subject: &str, id: &str, quiet: bool) -> Self {
        if quiet {
            return Self::silent();
        }
        eprintln!("queued {subject} as request {id}");
        Self::start("waiting for a builder")
    }

    fn silent() -> Self {
        Self {
            bar: None,
            started: true,
            said_waiting: true,
            current: None,
            derivations: String::new(),
            quiet: true,
        }
    }

    /// For `watch`: the request may be anywhere in its life.
    pub fn watching(id: &str) -> Self {
        eprintln!("watching request {id}");
        Self::start("waiting for events")
    }

    fn start(message: &'static str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar.set_message(message);
            bar
        });
        Self {
            quiet: false,
            bar,
            started: false,
            said_waiting: false,
            current: None,
            derivations: String::new(),
        }
    }

    /// Called about once a second while no event comes.
    pub fn tick(&mut self, waited: Duration) {
        if !self.started && !self.said_waiting && waited >= Duration::from_secs(5) {
            self.said_waiting = true;
            self.line("waiting for a builder to take the request (all busy or none running)");
        }
    }

    pub fn event(&mut self, event: &Event) {
        if self.quiet {
            return;
        }
        match &event.body {
            EventBody::Started {
                builder,
                rev,
                hosts,
                attempt,
                ..
            } => {
                self.started = true;
                let again = if *attempt > 1 {
                    format!(" (attempt {attempt})")
                } else {
                    String::new()
                };
                self.line(&format!(
                    "builder {builder} took the request{again}: rev {}, {} host{}",
                    short_rev(rev),
                    hosts.len(),
                    if hosts.len() == 1 { "" } else { "s" }
                ));
            }
            EventBody::HostStarted { host, index, total } => {
                self.current = Some(format!("[{index}/{total}] {host}"));
                self.derivations.clear();
                if self.bar.is_none() {
                    eprintln!("[{index}/{total}] {host}: evaluating and building");
                }
            }
            EventBody::Progress { done, expected, .. } => {
                self.derivations = format!(" ({done}/{expected} derivations)");
            }
            EventBody::HostFinished {
                index,
                total,
                result,
                ..
            } => {
                self.current = None;
                let mut line = format!(
                    "[{index}/{total}] {}: {} in {}",
                    result.name,
                    result.status.as_str(),
                    duration(result.duration_ms)
                );
                if let Some(out) = &result.out_path {
                    line.push_str(&format!(" → {out}"));
                }
                self.line(&line);
            }
            EventBody::Requeued { builder, reason } => {
                self.current = None;
                self.line(&format!(
                    "builder {builder} handed the request back to the queue ({reason}); waiting for a builder"
                ));
            }
            EventBody::Finished { .. } => {}
        }
        if let (Some(bar), Some(current)) = (&self.bar, &self.current) {
            bar.set_message(format!("{current}: building{}", self.derivations));
        }
    }

    fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    pub fn clear(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Prints the result table of a `finished` event, then the errors of failed hosts grouped by
/// identical error. Bounded for any number of hosts: at most [`TABLE_ROWS_SHOWN`] rows and
/// [`ERROR_GROUPS_SHOWN`] errors, each saying which command shows the rest.
pub fn print_result(finished: &Event) {
    let EventBody::Finished {
        status,
        repo,
        target,
        rev,
        hosts,
        error,
        builder,
        duration_ms,
        ..
    } = &finished.body
    else {
        return;
    };
    let rows: Vec<&HostResult> = if hosts.len() <= TABLE_ROWS_SHOWN {
        hosts.iter().collect()
    } else {
        hosts
            .iter()
            .filter(|h| !h.status.is_success())
            .take(TABLE_ROWS_SHOWN)
            .collect()
    };
    let name_width = rows.iter().map(|h| h.name.len()).max().unwrap_or(4).max(4);
    let changes = |h: &HostResult| h.closure_diff.as_ref().map(|d| d.summary());
    let changes_width = rows
        .iter()
        .filter_map(|h| changes(h).map(|c| c.chars().count()))
        .max()
        .unwrap_or(0)
        .clamp(7, CHANGES_WIDTH);
    if !rows.is_empty() {
        println!(
            "{:<name_width$}  {:<12}  {:>9}  {:<changes_width$}  OUT PATH",
            "HOST", "STATUS", "DURATION", "CHANGES"
        );
        for host in &rows {
            let changes = changes(host).unwrap_or_else(|| "-".to_owned());
            println!(
                "{:<name_width$}  {:<12}  {:>9}  {:<changes_width$}  {}",
                host.name,
                host.status.as_str(),
                duration(host.duration_ms),
                cell(&changes, CHANGES_WIDTH),
                host.out_path.as_deref().unwrap_or("-")
            );
        }
    }
    print_package_changes(repo, hosts);
    if rows.len() < hosts.len() {
        println!(
            "… {} more hosts not listed{}; every host: `homelab-deploy watch {} --json` (or `build --json`)",
            hosts.len() - rows.len(),
            if rows.is_empty() {
                String::new()
            } else {
                " (only hosts that did not succeed are listed)".to_owned()
            },
            finished.id
        );
    }
    let groups = group_failures(
        hosts
            .iter()
            .map(|h| (h.name.as_str(), h.status, h.error.as_deref())),
    );
    for group in groups.iter().take(ERROR_GROUPS_SHOWN) {
        print_failure_group(group, hosts);
    }
    if groups.len() > ERROR_GROUPS_SHOWN {
        println!(
            "\n… {} more distinct errors not shown: `homelab-deploy watch {} --json` has them all",
            groups.len() - ERROR_GROUPS_SHOWN,
            finished.id
        );
    }
    if let Some(group) = groups.first() {
        println!(
            "\nwhole log of a host: homelab-deploy logs {} --host {}",
            finished.id, group.hosts[0]
        );
    }
    let counts = count(hosts);
    println!(
        "{repo} {target}: {} in {}{}{}{}",
        status.as_str(),
        duration(*duration_ms),
        rev.as_deref()
            .map(|rev| format!(", rev {}", short_rev(rev)))
            .unwrap_or_default(),
        builder
            .as_deref()
            .map(|b| format!(", builder {b}"))
            .unwrap_or_default(),
        counts,
    );
    if let Some(error) = error {
        println!("error: {}", error_excerpt(error, 2000));
    }
}

/// The first line of `text`, at most `max` characters (cut with `…`).
fn cell(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or_default();
    if line.chars().count() <= max {
        return line.to_owned();
    }
    let kept: String = line.chars().take(max.saturating_sub(1)).collect();
    format!("{kept}…")
}

/// The package changes of each host whose closure was compared, at most
/// [`PACKAGE_LINES_SHOWN`] lines in all, then which command shows the rest.
fn print_package_changes(repo: &str, hosts: &[HostResult]) {
    let mut budget = PACKAGE_LINES_SHOWN;
    let mut cut: Vec<&str> = Vec::new();
    for host in hosts {
        let Some(diff) = host
            .closure_diff
            .as_ref()
            .filter(|d| !d.packages.is_empty())
        else {
            continue;
        };
        let lines = diff.lines();
        let Some((heading, packages)) = lines.split_first().filter(|_| budget > 0) else {
            cut.push(&host.name);
            continue;
        };
        println!("\nchanges of {} {heading}", host.name);
        let shown = packages.len().min(budget);
        for line in &packages[..shown] {
            println!("{line}");
        }
        budget -= shown;
        if shown < packages.len() {
            cut.push(&host.name);
        }
    }
    if let Some(first) = cut.first() {
        println!(
            "\n… not every change is listed ({}): homelab-deploy diff {repo} {first}",
            cut.join(", ")
        );
    }
}

/// One group of hosts that failed the same way: who, and the end of the first one's error.
fn print_failure_group(group: &FailureGroup, hosts: &[HostResult]) {
    let mut names = group
        .hosts
        .iter()
        .take(GROUP_NAMES_SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if group.hosts.len() > GROUP_NAMES_SHOWN {
        names.push_str(&format!(
            " and {} more",
            group.hosts.len() - GROUP_NAMES_SHOWN
        ));
    }
    if group.hosts.len() == 1 {
        println!("\n{} {}:", names, group.status.as_str());
    } else {
        println!(
            "\n{} hosts {} with the same error ({names}):",
            group.hosts.len(),
            group.status.as_str()
        );
    }
    // The first host's whole error, not the group's excerpt: a person gets more lines.
    let error = hosts
        .iter()
        .find(|h| h.name == group.hosts[0])
        .and_then(|h| h.error.as_deref())
        .unwrap_or(&group.error);
    let lines: Vec<&str> = error.lines().collect();
    for line in &lines[lines.len().saturating_sub(ERROR_LINES_SHOWN)..] {
        if line.chars().count() > ERROR_LINE_CHARS {
            let cut: String = line.chars().take(ERROR_LINE_CHARS).collect();
            println!("  {cut}…");
        } else {
            println!("  {line}");
        }
    }
}

fn count(hosts: &[HostResult]) -> String {
    if hosts.is_empty() {
        return String::new();
    }
    let mut counts = std::collections::BTreeMap::new();
    for host in hosts {
        *counts
            .entry((count_order(host.status), host.status.as_str()))
            .or_insert(0usize) += 1;
    }
    let parts: Vec<String> = counts
        .into_iter()
        .map(|((_, status), n)| format!("{n} {status}"))
        .collect();
    format!(" ({})", parts.join(", "))
}

/// Where a status stands in the result's counts: successes, failures, then cancelled. A new
/// status fails to compile here until it has a place.
fn count_order(status: HostStatus) -> u8 {
    match status {
        HostStatus::Built => 0,
        HostStatus::Cached => 1,
        HostStatus::BuildFailed => 2,
        HostStatus::EvalFailed => 3,
        HostStatus::TimedOut => 4,
        HostStatus::Cancelled => 5,
    }
}

fn short_rev(rev: &str) -> &str {
    rev.get(..12).unwrap_or(rev)
}

fn duration(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}
