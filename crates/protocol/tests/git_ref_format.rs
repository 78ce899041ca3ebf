//! `check_git_ref` against the real `git check-ref-format --allow-onelevel`: a ref is valid in a
//! request or a repo's config exactly when git accepts it, except that a leading `-` (an option
//! on a git command line) is refused as well.

use std::process::Command;

use homelab_deploy_protocol::request::check_git_ref;
use proptest::prelude::*;

/// What git says of `value` (never called with a leading `-`, which git would read as an option).
fn git_accepts(value: &str) -> bool {
    let output = Command::new("git")
        .args(["check-ref-format", "--allow-onelevel", value])
        .output()
        .expect("git is installed (Debian: apt install git)");
    output.status.success()
}

fn agrees_with_git(value: &str) {
    if value.starts_with('-') {
        assert!(check_git_ref(value).is_err(), "{value:?} accepted");
        return;
    }
    let ours = check_git_ref(value);
    assert_eq!(
        ours.is_ok(),
        git_accepts(value),
        "{value:?}: check_git_ref says {ours:?}, git check-ref-format disagrees"
    );
}

#[test]
fn refs_are_valid_exactly_when_git_says_so() {
    for value in [
        "main",
        "release/2026-11",
        "refs/heads/main",
        "refs/tags/v1.2.3",
        "feature/ünïcode",
        "user+topic",
        "fix#12",
        "v1.0",
        "a,b",
        "a=b",
        "a@b",
        "HEAD",
        "x.lockx",
        "a/b.c/d",
        "",
        "@",
        "a@{1}",
        "a..b",
        "../etc",
        "a/../b",
        ".hidden",
        "a/.hidden",
        "a.lock",
        "a/b.lock/c",
        "a/",
        "/a",
        "a//b",
        "a.",
        "a b",
        "a\tb",
        "a\nb",
        "a~1",
        "a^",
        "a:b",
        "a?",
        "a*",
        "a[1]",
        "a\\b",
        "a\u{7f}b",
        "-n",
        "--upload-pack=evil",
    ] {
        agrees_with_git(value);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    /// Refs built from the characters git's rules care about agree with git too.
    #[test]
    fn random_refs_agree_with_git(value in "[a-zA-Z0-9./@{}~^:?*\\[\\\\ ,+#é-]{1,12}") {
        agrees_with_git(&value);
    }
}
