//! Resolving a request's ref or rev to one commit, in a bare mirror of the repo under
//! `state_dir/mirrors/<repo>.git`. Nix later builds from this mirror at that exact commit, so a push
//! during a build cannot mix revisions. Everything here blocks: call it from `spawn_blocking`.

use std::path::{Path, PathBuf};

use git2::{FetchOptions, FetchPrune, Oid, Repository};

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("cannot open or create git mirror {path}: {message}")]
    Mirror { path: PathBuf, message: String },
    #[error("fetching {url} failed: {message}")]
    Fetch { url: String, message: String },
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
}

/// What a request asks to build.
#[derive(Debug, Clone, Copy)]
pub enum Wanted<'a> {
    /// A branch or tag name, or a full ref (`refs/…`).
    Ref(&'a str),
    /// A commit id, 7 to 40 hex digits (validated by the protocol crate).
    Rev(&'a str),
}

/// Refs under this prefix pin commits that requests resolved to, so nix can fetch exactly that
/// commit by ref (nix cannot fetch a bare rev from a bare repo) and a later push cannot remove it.
const PIN_PREFIX: &str = "refs/homelab-deploy/pin-";
/// Pins kept; older ones are removed when there are more (nix keeps its own copy once fetched).
const MAX_PINS: usize = 200;

/// A commit resolved for a request, and the mirror ref that pins it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub rev: String,
    pub pin_ref: String,
}

/// A bare mirror of one repo.
#[derive(Debug, Clone)]
pub struct Mirror {
    path: PathBuf,
    url: String,
    shown_url: String,
}

impl Mirror {
    pub fn new(state_dir: &Path, repo_name: &str, git_url: &str) -> Self {
        Self {
            path: state_dir.join("mirrors").join(format!("{repo_name}.git")),
            url: git_url.to_owned(),
            shown_url: redact_url(git_url),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fetches every branch and tag, resolves `wanted` to a full commit id and pins it.
    /// `default_branch` becomes the mirror's HEAD so tools that read HEAD find a commit.
    pub fn fetch_and_resolve(
        &self,
        wanted: Wanted<'_>,
        default_branch: &str,
    ) -> Result<Resolved, GitError> {
        let repo = self.open_or_init()?;
        self.fetch(&repo)?;
        let default_ref = format!("refs/heads/{default_branch}");
        if repo.find_reference(&default_ref).is_ok() {
            let _ = repo.set_head(&default_ref);
        }
        let rev = match wanted {
            Wanted::Rev(rev) => self.resolve_rev(&repo, rev)?,
            Wanted::Ref(git_ref) => self.resolve_ref(&repo, git_ref)?,
        };
        let pin_ref = self.pin(&repo, &rev)?;
        Ok(Resolved { rev, pin_ref })
    }

    /// The flake URL nix builds from: this mirror at exactly `resolved`'s commit.
    pub fn flake_url(&self, resolved: &Resolved) -> String {
        format!(
            "git+file://{}?ref={}&rev={}",
            self.path.display(),
            resolved.pin_ref,
            resolved.rev
        )
    }

    fn pin(&self, repo: &Repository, rev: &str) -> Result<String, GitError> {
        let mirror_error = |err: git2::Error| GitError::Mirror {
            path: self.path.clone(),
            message: err.message().to_owned(),
        };
        let pin_ref = format!("{PIN_PREFIX}{rev}");
        let oid = Oid::from_str(rev).map_err(mirror_error)?;
        if let Ok(pins) = repo.references_glob(&format!("{PIN_PREFIX}*")) {
            let mut pins: Vec<git2::Reference<'_>> = pins.filter_map(Result::ok).collect();
            if pins.len() >= MAX_PINS {
                for old in pins.iter_mut() {
                    let _ = old.delete();
                }
            }
        }
        repo.reference(
            &pin_ref,
            oid,
            true,
            "homelab-deploy: pin a requested commit",
        )
        .map_err(mirror_error)?;
        Ok(pin_ref)
    }

    fn open_or_init(&self) -> Result<Repository, GitError> {
        let result = if self.path.exists() {
            Repository::open_bare(&self.path)
        } else {
            Repository::init_bare(&self.path)
        };
        result.map_err(|err| GitError::Mirror {
            path: self.path.clone(),
            message: err.message().to_owned(),
        })
    }

    fn fetch(&self, repo: &Repository) -> Result<(), GitError> {
        let fetch_error = |err: git2::Error| GitError::Fetch {
            url: self.shown_url.clone(),
            message: redact_url(err.message()),
        };
        let mut remote = repo.remote_anonymous(&self.url).map_err(fetch_error)?;
        let mut options = FetchOptions::new();
        options
            .prune(FetchPrune::On)
            .download_tags(git2::AutotagOption::All);
        remote
            .fetch(
                &["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"],
                Some(&mut options),
                None,
            )
            .map_err(fetch_error)
    }

    fn resolve_ref(&self, repo: &Repository, git_ref: &str) -> Result<String, GitError> {
        let candidates = if git_ref.starts_with("refs/") {
            vec![git_ref.to_owned()]
        } else {
            vec![
                format!("refs/heads/{git_ref}"),
                format!("refs/tags/{git_ref}"),
            ]
        };
        for name in candidates {
            if let Ok(reference) = repo.find_reference(&name) {
                if let Ok(commit) = reference.peel_to_commit() {
                    return Ok(commit.id().to_string());
                }
            }
        }
        Err(GitError::RefNotFound {
            git_ref: git_ref.to_owned(),
            url: self.shown_url.clone(),
            available: branch_list(repo),
        })
    }

    fn resolve_rev(&self, repo: &Repository, rev: &str) -> Result<String, GitError> {
        let not_found = || GitError::RevNotFound {
            rev: rev.to_owned(),
            url: self.shown_url.clone(),
        };
        let object = if rev.len() == 40 {
            let oid = Oid::from_str(rev).map_err(|_| not_found())?;
            repo.find_object(oid, None)
        } else {
            repo.revparse_single(rev)
        };
        match object {
            Ok(object) => object
                .peel_to_commit()
                .map(|commit| commit.id().to_string())
                .map_err(|_| not_found()),
            Err(err) if err.code() == git2::ErrorCode::Ambiguous => Err(GitError::RevAmbiguous {
                rev: rev.to_owned(),
                url: self.shown_url.clone(),
            }),
            Err(_) => Err(not_found()),
        }
    }
}

fn branch_list(repo: &Repository) -> String {
    let mut names: Vec<String> = repo
        .branches(Some(git2::BranchType::Local))
        .map(|branches| {
            branches
                .filter_map(|branch| branch.ok()?.0.name().ok().flatten().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        "(none: the repo has no branches)".to_owned()
    } else {
        names.join(", ")
    }
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

    #[test]
    fn resolves_branch_then_sees_new_commits() {
        let origin = origin();
        let state = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}", origin.path().display());
        let mirror = Mirror::new(state.path(), "demo", &url);
        let first = mirror
            .fetch_and_resolve(Wanted::Ref("main"), "main")
            .expect("resolves")
            .rev;
        assert_eq!(first, git(origin.path(), &["rev-parse", "HEAD"]));
        std::fs::write(origin.path().join("a"), "2").expect("write");
        git(origin.path(), &["commit", "-qam", "two"]);
        let second = mirror
            .fetch_and_resolve(Wanted::Ref("main"), "main")
            .expect("resolves")
            .rev;
        assert_ne!(first, second);
        let by_rev = mirror
            .fetch_and_resolve(Wanted::Rev(&first[..10]), "main")
            .expect("resolves");
        assert_eq!(by_rev.rev, first);
        assert!(mirror
            .flake_url(&by_rev)
            .ends_with(&format!("?ref=refs/homelab-deploy/pin-{first}&rev={first}")));
    }

    #[test]
    fn unknown_ref_and_rev_are_named() {
        let origin = origin();
        let state = tempfile::tempdir().expect("tempdir");
        let mirror = Mirror::new(
            state.path(),
            "demo",
            &format!("file://{}", origin.path().display()),
        );
        let err = mirror
            .fetch_and_resolve(Wanted::Ref("nope"), "main")
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
            .expect_err("resolved");
        assert!(err.to_string().contains("0123456789abcdef"), "{err}");
    }

    #[test]
    fn unreachable_url_is_a_fetch_error_without_credentials() {
        let state = tempfile::tempdir().expect("tempdir");
        let mirror = Mirror::new(
            state.path(),
            "demo",
            "file:///nonexistent/homelab-deploy-repo",
        );
        let err = mirror
            .fetch_and_resolve(Wanted::Ref("main"), "main")
            .expect_err("fetched");
        assert!(matches!(err, GitError::Fetch { .. }), "{err}");
        assert_eq!(
            redact_url("fetch https://bot:s3cret@git.example.org/x.git failed"),
            "fetch https://***@git.example.org/x.git failed"
        );
    }
}
