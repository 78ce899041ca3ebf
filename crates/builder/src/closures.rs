//! Closure diffs: each host's recent builds, kept alive by GC roots, and what changed between two
//! of them.
//!
//! After a host is built or cached, the builder roots its toplevel in
//! `state_dir/closures/<repo>/<host file>/<time>-<rev>` (the newest `builder.closure_history`
//! builds per host; older roots are removed, so nix may collect them), and compares it with the
//! newest one kept at another commit. The comparison is nix's own `nix store diff-closures`
//! (version changes, added and removed packages, size changes per package) plus
//! `nix path-info -S` for the closure sizes: nix already knows how to name packages and versions
//! from store paths, so nothing here re-implements it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use homelab_deploy_protocol::{ClosureDiff, DiffStatus, PackageChange};

use crate::nix::{Nix, NixError};

/// One build of a host that the builder still holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldBuild {
    /// Milliseconds since the Unix epoch when it was recorded.
    pub recorded_ms: u128,
    pub rev: String,
    /// The toplevel store path.
    pub out_path: String,
}

impl HeldBuild {
    /// When it was recorded, as a time.
    pub fn recorded_at(&self) -> time::OffsetDateTime {
        i128::try_from(self.recorded_ms)
            .ok()
            .and_then(|ms| time::OffsetDateTime::from_unix_timestamp_nanos(ms * 1_000_000).ok())
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
    }
}

/// Width of the time part of a root's name, so names sort by time.
const TIME_DIGITS: usize = 16;

/// The recent builds of every host of every repo, under one directory.
#[derive(Debug)]
pub struct History {
    dir: PathBuf,
    /// Builds kept per host; 0 keeps none and turns diffs off.
    keep: usize,
    /// Diffs already made, by (from, to) toplevel.
    compared: Mutex<HashMap<(String, String), ClosureDiff>>,
}

/// Why keeping a build's root failed.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("cannot create the closure history directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Nix(#[from] NixError),
}

impl History {
    /// Builds are kept under `state_dir/closures`.
    pub fn new(state_dir: &Path, keep: usize) -> Self {
        Self {
            dir: state_dir.join("closures"),
            keep,
            compared: Mutex::new(HashMap::new()),
        }
    }

    /// Whether diffs are on (`builder.closure_history` > 0).
    pub fn enabled(&self) -> bool {
        self.keep > 0
    }

    /// `host_file` is the host's GC root file name (no `/`, never `.` or `..`).
    fn host_dir(&self, repo: &str, host_file: &str) -> PathBuf {
        self.dir.join(repo).join(host_file)
    }

    /// The held builds of a host whose output is still in the store, newest first.
    pub fn held(&self, repo: &str, host_file: &str) -> Vec<HeldBuild> {
        let Ok(entries) = std::fs::read_dir(self.host_dir(repo, host_file)) else {
            return Vec::new();
        };
        let mut builds: Vec<HeldBuild> = entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let (time, rev) = name.split_once('-')?;
                let target = std::fs::read_link(entry.path()).ok()?;
                target.exists().then_some(())?;
                Some(HeldBuild {
                    recorded_ms: time.parse().ok()?,
                    rev: rev.to_owned(),
                    out_path: target.to_str()?.to_owned(),
                })
            })
            .collect();
        builds.sort_by_key(|b| std::cmp::Reverse(b.recorded_ms));
        builds
    }

    /// The newest held build of the host at a commit other than `rev`.
    pub fn previous(&self, repo: &str, host_file: &str, rev: &str) -> Option<HeldBuild> {
        self.held(repo, host_file)
            .into_iter()
            .find(|build| build.rev != rev)
    }

    /// Roots `out_path` as the host's newest build at `rev` (replacing an older root of the same
    /// commit), then removes the roots past the newest `keep`.
    pub async fn record(
        &self,
        nix: &Nix,
        repo: &str,
        host_file: &str,
        rev: &str,
        out_path: &str,
    ) -> Result<(), HistoryError> {
        let newest = self.held(repo, host_file).into_iter().next();
        if newest.is_some_and(|b| b.rev == rev && b.out_path == out_path) {
            // Rooted already: a repeat build of the same commit starts no nix.
            return Ok(());
        }
        let dir = self.host_dir(repo, host_file);
        std::fs::create_dir_all(&dir).map_err(|source| HistoryError::Dir {
            path: dir.clone(),
            source,
        })?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        let link = dir.join(format!("{now:0width$}-{rev}", width = TIME_DIGITS));
        nix.add_root(out_path, &link).await?;
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|source| HistoryError::Dir {
                path: dir.clone(),
                source,
            })?
            .flatten()
            .filter_map(|entry| entry.file_name().into_string().ok())
            .collect();
        names.sort_by(|a, b| b.cmp(a));
        let newest = link
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let mut kept = 0;
        for name in names {
            let same_rev = name.split_once('-').map(|(_, r)| r) == Some(rev);
            if name == newest || (!same_rev && kept < self.keep) {
                kept += 1;
                continue;
            }
            // Nix drops the stale registration under gcroots/auto at its next collection.
            let _ = std::fs::remove_file(dir.join(&name));
        }
        Ok(())
    }

    /// Compares two toplevels: `nix store diff-closures` for the packages, `nix path-info -S`
    /// for the closure sizes. The result lists every change (cut it with
    /// [`ClosureDiff::keep_packages`]). A pair compared before is answered from memory (store
    /// paths never change), so a repeat build of an unchanged commit starts no nix.
    pub async fn compare(&self, nix: &Nix, from: &HeldBuild, to: &str) -> ClosureDiff {
        let key = (from.out_path.clone(), to.to_owned());
        if let Some(diff) = self.lock_compared().get(&key) {
            return diff.clone();
        }
        let diff = compare(nix, from, to).await;
        if diff.status == DiffStatus::Compared {
            let mut compared = self.lock_compared();
            if compared.len() >= MAX_REMEMBERED_DIFFS {
                compared.clear();
            }
            compared.insert(key, diff.clone());
        }
        diff
    }

    fn lock_compared(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), ClosureDiff>> {
        // A panic while holding the lock leaves a usable map.
        self.compared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Pairs of toplevels whose diff is remembered; past this the memory starts over.
const MAX_REMEMBERED_DIFFS: usize = 256;

async fn compare(nix: &Nix, from: &HeldBuild, to: &str) -> ClosureDiff {
    let diff = nix.diff_closures(&from.out_path, to).await;
    let sizes = nix.closure_sizes(&[&from.out_path, to]).await;
    let mut result = match diff {
        Ok(text) => ClosureDiff::compared(parse_diff_closures(&text), usize::MAX),
        Err(err) => ClosureDiff::failed(err.excerpt()),
    };
    result.from_rev = Some(from.rev.clone());
    result.from_path = Some(from.out_path.clone());
    if let Ok(sizes) = sizes {
        result.size_before = sizes.get(&from.out_path).copied();
        result.size_after = sizes.get(to).copied();
    }
    result
}

/// Reads `nix store diff-closures` output: one line per package,
/// `name: BEFORE → AFTER[, ±SIZE KiB]` or `name: ±SIZE KiB`, where each side is a
/// comma-separated list of versions, `∅` for none and `ε` for an empty version. Colour codes
/// (nix prints them even into a pipe) are ignored; a line in another shape is skipped.
pub fn parse_diff_closures(text: &str) -> Vec<PackageChange> {
    text.lines()
        .filter_map(|line| parse_line(&strip_ansi(line)))
        .collect()
}

fn parse_line(line: &str) -> Option<PackageChange> {
    let (name, rest) = line.split_once(": ")?;
    let (versions, size) = match rest.rsplit_once(", ") {
        Some((versions, size)) if parse_kib(size).is_some() => (Some(versions), parse_kib(size)),
        _ if parse_kib(rest).is_some() => (None, parse_kib(rest)),
        _ => (Some(rest), None),
    };
    let (before, after) = match versions {
        Some(versions) => {
            let (before, after) = versions.split_once(" → ")?;
            (version_list(before), version_list(after))
        }
        None => (Vec::new(), Vec::new()),
    };
    Some(PackageChange {
        name: name.trim().to_owned(),
        before,
        after,
        size_delta: size,
    })
}

fn version_list(side: &str) -> Vec<String> {
    match side.trim() {
        "∅" => Vec::new(),
        side => side
            .split(", ")
            .map(|v| {
                if v == "ε" {
                    String::new()
                } else {
                    v.to_owned()
                }
            })
            .collect(),
    }
}

/// `+45.9 KiB` → 47002 bytes.
fn parse_kib(text: &str) -> Option<i64> {
    let number = text.trim().strip_suffix(" KiB")?;
    if !number.starts_with(['+', '-']) {
        return None;
    }
    let kib: f64 = number.parse().ok()?;
    Some((kib * 1024.0).round() as i64)
}

/// Removes ANSI escape sequences (`ESC [ … letter`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Output of nix 2.8's `nix store diff-closures` between two fixture toplevels, colour codes
    /// included.
    const SAMPLE: &str = "added-pkg: ∅ → 2.1, \u{1b}[31;1m+45.9 KiB\u{1b}[0m\n\
        gone-pkg: 1.0 → ∅\n\
        nixos-system-web: 1 → 2\n\
        openssl: 3.0.1 → 3.0.2\n\
        bluez-qt: \u{1b}[32;1m-12.6 KiB\u{1b}[0m\n\
        libfoo: 1.2, 1.3 → 1.4, ε\n\
        some warning nix printed\n";

    #[test]
    fn reads_what_nix_prints() {
        let changes = parse_diff_closures(SAMPLE);
        let shown: Vec<String> = changes.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "+ added-pkg 2.1 (+45.9 KiB)",
                "- gone-pkg 1.0",
                "nixos-system-web 1 → 2",
                "openssl 3.0.1 → 3.0.2",
                "bluez-qt (-12.6 KiB)",
                "libfoo 1.2, 1.3 → 1.4, ε",
            ]
        );
        assert_eq!(changes[0].size_delta, Some(47002));
        assert_eq!(changes[5].after, ["1.4", ""]);
    }
}
