//! GC roots: the per-request directory that keeps evaluated drvs alive until their build, and
//! the file name of a host's toplevel root.

use std::path::{Path, PathBuf};

use homelab_deploy_protocol::subject::encode_host;
use homelab_deploy_protocol::RepoName;
use sha2::{Digest, Sha256};
use tracing::warn;

use crate::nix::{Nix, NixError};

/// The file name of `host`'s GC root in `gcroots/<repo>/`: the host name percent-encoded as in
/// its subject token ([`encode_host`]: no `/`, never `.` or `..`), so a host name never reaches
/// outside that directory; a plain name like `web` is its own file name. A name whose encoding is
/// empty or longer than a file name may be (255 bytes) is named `%sha256-<hex of the name>`,
/// which no encoded name can be (an encoded `%` is always followed by two upper-case hex digits).
pub(crate) fn gc_root_name(host: &str) -> String {
    let encoded = encode_host(host);
    if (1..=MAX_FILE_NAME_BYTES).contains(&encoded.len()) {
        encoded
    } else {
        let digest = Sha256::digest(host.as_bytes());
        let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
        format!("%sha256-{hex}")
    }
}

/// Where request directories went before `.requests`; a repo may be called that.
const LEGACY_PARENT: &str = "requests";

/// Longest file name Linux file systems take.
const MAX_FILE_NAME_BYTES: usize = 255;

/// A directory of GC roots for the drvs one request builds, so a garbage collection between
/// evaluation and build cannot delete them; removed (and with it the roots) when the request
/// ends. A builder that died leaves its directories behind; the next one removes them at start.
pub struct DrvRoots(PathBuf);

impl DrvRoots {
    /// Where every request's directory goes, under the state dir: `gcroots/.requests`, which
    /// no repo's `gcroots/<repo>` can be (a repo name has no `.`).
    fn parent(state_dir: &Path) -> PathBuf {
        state_dir.join("gcroots").join(".requests")
    }

    /// Removes the request directories a previous builder left (theirs to hold no more), and
    /// `gcroots/requests`, where earlier builders put them, unless a served repo is called
    /// `requests` (that directory then holds its hosts' roots).
    pub fn remove_leftovers(state_dir: &Path, repos: &[RepoName]) {
        let _ = std::fs::remove_dir_all(Self::parent(state_dir));
        if !repos.iter().any(|repo| repo.as_str() == LEGACY_PARENT) {
            let _ = std::fs::remove_dir_all(state_dir.join("gcroots").join(LEGACY_PARENT));
        }
    }

    pub(super) fn new(state_dir: &Path) -> Self {
        Self(Self::parent(state_dir).join(nuid::next().to_string()))
    }

    /// Roots the drvs still in the store; returns those that are not (collected while cached:
    /// evaluate them again).
    pub(super) async fn add(&self, nix: &Nix, drvs: &[&str], name: &str) -> Vec<String> {
        let (present, gone): (Vec<&str>, Vec<&str>) =
            drvs.iter().partition(|drv| Path::new(drv).exists());
        if present.is_empty() {
            return gone.into_iter().map(str::to_owned).collect();
        }
        let rooted = match std::fs::create_dir_all(&self.0) {
            Ok(()) => nix.add_drv_roots(&present, &self.0.join(name)).await,
            Err(err) => Err(NixError::Output {
                what: format!("creating GC root directory {}", self.0.display()),
                detail: err.to_string(),
            }),
        };
        if let Err(err) = rooted {
            warn!(error = %err, drvs = present.len(), "cannot add GC roots for evaluated drvs; a garbage collection before their build would fail it");
        }
        gone.into_iter().map(str::to_owned).collect()
    }
}

impl Drop for DrvRoots {
    fn drop(&mut self) {
        // Nix removes the stale registration under gcroots/auto at its next collection.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the host is called, its GC root is one plain file name inside `gcroots/<repo>/`.
    #[test]
    fn gc_root_names_stay_in_their_directory() {
        assert_eq!(gc_root_name("web"), "web");
        assert_eq!(gc_root_name("web.example.org"), "web%2Eexample%2Eorg");
        assert_eq!(gc_root_name("../../x"), "%2E%2E%2F%2E%2E%2Fx");
        let long = "h".repeat(300);
        for name in ["", ".", "..", "a/b", "a\nb", "é", &long, "%sha256-x"] {
            let file = gc_root_name(name);
            let path = Path::new("/state/gcroots/demo").join(&file);
            assert_eq!(
                path.parent(),
                Some(Path::new("/state/gcroots/demo")),
                "{name:?}"
            );
            assert!(
                !file.is_empty() && file.len() <= 255 && !file.starts_with('.'),
                "{name:?}: {file}"
            );
        }
        assert_ne!(gc_root_name(&long), gc_root_name(&"h".repeat(301)));
        assert!(gc_root_name(&long).starts_with("%sha256-"));
    }

    /// A repo called `requests` keeps its hosts' roots when a builder starts; the request
    /// directories a dead builder left go.
    #[test]
    fn leftover_request_roots_go_and_a_repo_named_requests_keeps_its_roots() {
        let state = tempfile::tempdir().expect("state dir");
        let gcroots = state.path().join("gcroots");
        let leftover = DrvRoots::new(state.path());
        std::fs::create_dir_all(&leftover.0).expect("request dir");
        std::fs::create_dir_all(gcroots.join("requests")).expect("repo dir");
        std::fs::write(gcroots.join("requests/web"), "").expect("host root");
        let requests = RepoName::parse("requests").expect("a valid repo name");
        assert!(RepoName::parse(".requests").is_err());

        DrvRoots::remove_leftovers(state.path(), std::slice::from_ref(&requests));
        assert!(!leftover.0.exists());
        assert!(gcroots.join("requests/web").exists());

        // No repo of that name: an old builder's request directory, removed.
        DrvRoots::remove_leftovers(state.path(), &[RepoName::parse("demo").expect("name")]);
        assert!(!gcroots.join("requests").exists());
    }
}
