//! Closure diffs: what a host's new toplevel changes against an earlier build of the same host
//! (packages added, removed, changed in version or size, and the closure size change), in host
//! results and in the `diff` control verb.

use serde::{Deserialize, Serialize};

/// Most packages a host result lists; the counts always cover all of them, and the whole list
/// is on the logs subject and from `homelab-deploy diff`.
pub const MAX_LISTED_PACKAGES: usize = 50;

/// Whether a closure diff could be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiffStatus {
    /// Compared with an earlier build; the counts and sizes are set.
    Compared,
    /// The builder holds no earlier build of this host at another commit (its first build
    /// there, or the earlier ones were pruned).
    NoPrevious,
    /// The comparison failed (`error` says why); the host's own result is unaffected.
    Failed,
}

impl DiffStatus {
    /// The wire name (`compared`, `no_previous`, `failed`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Compared => "compared",
            Self::NoPrevious => "no_previous",
            Self::Failed => "failed",
        }
    }
}

/// A host's closure compared with an earlier build of it: `host_result.closure_diff`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClosureDiff {
    pub status: DiffStatus,
    /// The commit of the earlier build compared with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_rev: Option<String>,
    /// The earlier build's toplevel store path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_path: Option<String>,
    /// Packages only in the new closure.
    #[serde(default)]
    pub added: u64,
    /// Packages only in the earlier closure.
    #[serde(default)]
    pub removed: u64,
    /// Packages in both whose versions changed, or whose size changed by more than 8 KiB.
    #[serde(default)]
    pub changed: u64,
    /// Closure size of the earlier build, in bytes (`nix path-info -S`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_before: Option<u64>,
    /// Closure size of the new build, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_after: Option<u64>,
    /// The changed packages, sorted by name; at most [`MAX_LISTED_PACKAGES`] in a host result,
    /// fewer (or none) when an event must shrink to fit `max_payload`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<PackageChange>,
    /// How many changes `packages` leaves out.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub packages_omitted: u64,
    /// Why the comparison failed, when `status` is `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// One package (a store path's name without its version) whose versions or size differ, as
/// `nix store diff-closures` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageChange {
    pub name: String,
    /// Versions only in the earlier closure (empty: the package is new). `""` is a path
    /// without a version.
    pub before: Vec<String>,
    /// Versions only in the new closure (empty: the package is gone).
    pub after: Vec<String>,
    /// Change of the package's size in bytes, when over 8 KiB (nix's threshold; nix reports
    /// tenths of KiB, so this is exact to about 100 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_delta: Option<i64>,
}

/// What a package change is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Removed,
    Changed,
}

impl PackageChange {
    pub fn kind(&self) -> ChangeKind {
        match (self.before.is_empty(), self.after.is_empty()) {
            (true, false) => ChangeKind::Added,
            (false, true) => ChangeKind::Removed,
            _ => ChangeKind::Changed,
        }
    }
}

impl std::fmt::Display for PackageChange {
    /// `openssl 3.0.1 → 3.0.2`, `+ htop 3.2.1`, `- nano 7.2`, `glibc +12.0 KiB`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let versions = |list: &[String]| {
            list.iter()
                .map(|v| if v.is_empty() { "ε" } else { v.as_str() })
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self.kind() {
            ChangeKind::Added => write!(f, "+ {} {}", self.name, versions(&self.after))?,
            ChangeKind::Removed => write!(f, "- {} {}", self.name, versions(&self.before))?,
            ChangeKind::Changed if self.before.is_empty() => write!(f, "{}", self.name)?,
            ChangeKind::Changed => write!(
                f,
                "{} {} → {}",
                self.name,
                versions(&self.before),
                versions(&self.after)
            )?,
        }
        if let Some(delta) = self.size_delta {
            write!(f, " ({})", signed_size(delta))?;
        }
        Ok(())
    }
}

impl ClosureDiff {
    /// A diff that could not be made.
    pub fn failed(error: impl Into<String>) -> Self {
        Self {
            status: DiffStatus::Failed,
            error: Some(error.into()),
            ..Self::no_previous()
        }
    }

    /// No earlier build to compare with.
    pub fn no_previous() -> Self {
        Self {
            status: DiffStatus::NoPrevious,
            from_rev: None,
            from_path: None,
            added: 0,
            removed: 0,
            changed: 0,
            size_before: None,
            size_after: None,
            packages: Vec::new(),
            packages_omitted: 0,
            error: None,
        }
    }

    /// A comparison of `packages` (every change); counts them and keeps the first `max` listed.
    pub fn compared(mut packages: Vec<PackageChange>, max: usize) -> Self {
        packages.sort_by(|a, b| a.name.cmp(&b.name));
        let count = |kind| packages.iter().filter(|p| p.kind() == kind).count() as u64;
        let mut diff = Self {
            status: DiffStatus::Compared,
            added: count(ChangeKind::Added),
            removed: count(ChangeKind::Removed),
            changed: count(ChangeKind::Changed),
            packages,
            ..Self::no_previous()
        };
        diff.keep_packages(max);
        diff
    }

    /// Cuts the package list to `max` entries, counting the rest in `packages_omitted`.
    pub fn keep_packages(&mut self, max: usize) {
        if self.packages.len() > max {
            self.packages_omitted += (self.packages.len() - max) as u64;
            self.packages.truncate(max);
        }
    }

    /// Closure size change in bytes (after − before), when both sizes are known.
    pub fn size_delta(&self) -> Option<i64> {
        Some(self.size_after? as i64 - self.size_before? as i64)
    }

    /// The diff for people: a heading (`against rev 0123abc…: +1 -1 ~1, +40.0 KiB`), then
    /// one indented line per listed package, then how many are not listed. `None` when there
    /// was nothing to compare.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = vec![match (&self.status, &self.from_rev) {
            (DiffStatus::Compared, Some(rev)) => format!("against rev {rev}: {}", self.summary()),
            _ => self.summary(),
        }];
        lines.extend(self.packages.iter().map(|p| format!("  {p}")));
        if self.packages_omitted > 0 {
            lines.push(format!("  … and {} more", self.packages_omitted));
        }
        lines
    }

    /// One line for tables: `+1 −1 ~2, +45.9 KiB` / `no earlier build` / `diff failed: …`.
    pub fn summary(&self) -> String {
        match self.status {
            DiffStatus::NoPrevious => "no earlier build".to_owned(),
            DiffStatus::Failed => format!(
                "diff failed: {}",
                self.error.as_deref().unwrap_or("unknown error")
            ),
            DiffStatus::Compared => {
                let mut line = format!("+{} -{} ~{}", self.added, self.removed, self.changed);
                if let Some(delta) = self.size_delta() {
                    line.push_str(&format!(", {}", signed_size(delta)));
                }
                line
            }
        }
    }
}

/// `+45.9 KiB`, `-1.2 MiB`, `+0 B`: a signed byte count in binary units.
pub fn signed_size(bytes: i64) -> String {
    let sign = if bytes < 0 { "-" } else { "+" };
    let abs = bytes.unsigned_abs() as f64;
    let units = ["KiB", "MiB", "GiB", "TiB"];
    if abs < 1024.0 {
        return format!("{sign}{abs} B");
    }
    let mut value = abs / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{sign}{value:.1} {}", units[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(name: &str, before: &[&str], after: &[&str], size: Option<i64>) -> PackageChange {
        PackageChange {
            name: name.into(),
            before: before.iter().map(|v| v.to_string()).collect(),
            after: after.iter().map(|v| v.to_string()).collect(),
            size_delta: size,
        }
    }

    #[test]
    fn changes_read_like_nix_prints_them() {
        assert_eq!(
            change("openssl", &["3.0.1"], &["3.0.2"], None).to_string(),
            "openssl 3.0.1 → 3.0.2"
        );
        assert_eq!(
            change("htop", &[], &["3.2.1"], Some(47002)).to_string(),
            "+ htop 3.2.1 (+45.9 KiB)"
        );
        assert_eq!(
            change("nano", &["7.2"], &[], None).to_string(),
            "- nano 7.2"
        );
        assert_eq!(
            change("glibc", &[], &[], Some(-12288)).to_string(),
            "glibc (-12.0 KiB)"
        );
        assert_eq!(change("x", &[""], &["1"], None).to_string(), "x ε → 1");
    }

    #[test]
    fn counts_cover_every_package_and_the_list_is_cut() {
        let packages = vec![
            change("b", &[], &["1"], None),
            change("a", &["1"], &[], None),
            change("c", &["1"], &["2"], None),
            change("d", &["1"], &["2"], None),
        ];
        let diff = ClosureDiff::compared(packages, 2);
        assert_eq!((diff.added, diff.removed, diff.changed), (1, 1, 2));
        assert_eq!(diff.packages.len(), 2);
        assert_eq!(diff.packages[0].name, "a");
        assert_eq!(diff.packages_omitted, 2);
        let json = serde_json::to_value(&diff).expect("serializes");
        assert_eq!(json["status"], "compared");
        assert_eq!(json["packages_omitted"], 2);
        let back: ClosureDiff = serde_json::from_value(json).expect("parses back");
        assert_eq!(back, diff);
    }

    #[test]
    fn summaries_name_the_outcome() {
        let mut diff = ClosureDiff::compared(vec![change("a", &["1"], &["2"], None)], 50);
        diff.size_before = Some(1024);
        diff.size_after = Some(48 * 1024);
        assert_eq!(diff.summary(), "+0 -0 ~1, +47.0 KiB");
        assert_eq!(ClosureDiff::no_previous().summary(), "no earlier build");
        assert_eq!(
            ClosureDiff::failed("nix crashed").summary(),
            "diff failed: nix crashed"
        );
        assert_eq!(signed_size(-10), "-10 B");
        assert_eq!(signed_size(3 * 1024 * 1024), "+3.0 MiB");
    }
}
