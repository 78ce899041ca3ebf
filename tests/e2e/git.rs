//! The builder's git layer against hostile and broken inputs: git servers that redirect, loop,
//! flood or hang; a mirror left with a stale lock.

use std::time::Duration;

use test_support::{Builder, FixtureRepo, HostileHttp, Hostility, NatsServer};

use crate::{bin, build_json, cli_ok, text, Setup};

/// A redirecting (SIGSEGV in libgit2 before), looping, flooding or silent git server fails only
/// the requests of its repo, with an error that names the fetch, in bounded time: the builder
/// stays up through start-up host listing and the requests, and its other repo still builds.
#[test]
fn hostile_git_servers_fail_their_repo_only() {
    let nats = NatsServer::start();
    let good = FixtureRepo::new("fleet");
    let hostile: Vec<(String, HostileHttp)> = [
        ("moved", Hostility::RedirectLoop(301)),
        ("found", Hostility::RedirectLoop(302)),
        ("temporary", Hostility::RedirectLoop(307)),
        ("permanent", Hostility::RedirectLoop(308)),
        ("pingpong", Hostility::RedirectPingPong),
        ("tofile", Hostility::RedirectToFile),
        ("garbage", Hostility::Garbage),
        ("flood", Hostility::EndlessBody),
        ("headers", Hostility::EndlessHeader),
        ("silent", Hostility::Silent),
    ]
    .into_iter()
    .map(|(name, hostility)| (name.to_owned(), HostileHttp::start(hostility)))
    .collect();
    let mut repos = vec![("demo", good.url())];
    for (name, server) in &hostile {
        repos.push((name.as_str(), format!("git+{}", server.url)));
    }
    let name = test_support::unique("builder");
    let mut config = Builder::config(
        &name,
        &nats.url,
        std::path::Path::new("{state_dir}"),
        &repos,
    );
    config = config.replace(
        "ref = \"main\"\n",
        "ref = \"main\"\nfetch_timeout_secs = 5\n",
    );
    let mut builder = Builder::start_config(bin(), &name, &config);
    for (repo, _) in &hostile {
        let output = test_support::run_cli(
            bin(),
            &nats.url,
            &["build", repo, "all", "--json"],
            Duration::from_secs(120),
        );
        let (stdout, stderr) = text(&output);
        assert_eq!(output.status.code(), Some(1), "{repo}: {stdout}\n{stderr}");
        let finished: serde_json::Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|err| panic!("{repo}: {err}: {stdout}\n{stderr}"));
        let error = finished["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("fetching http://127.0.0.1:"),
            "{repo}: {finished:#}"
        );
        assert!(
            builder.is_running(),
            "builder died on {repo}:\n{}",
            builder.log()
        );
    }
    let output = test_support::run_cli(
        bin(),
        &nats.url,
        &["build", "demo", "web"],
        Duration::from_secs(120),
    );
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(builder.is_running(), "{}", builder.log());
}

/// A `refs/heads/main.lock` left in the mirror by a killed git no longer fails every build of
/// the repo: the builder removes it (no process of its own holds it), says so, and builds the new
/// commit.
#[test]
fn stale_lock_in_the_mirror_is_removed() {
    let setup = Setup::new("fleet");
    let (code, finished) = setup.build_json("web", &[]);
    assert_eq!(code, 0, "{finished:#}");
    let lock = setup
        .builder
        .state_dir()
        .join("mirrors/demo.git/refs/heads/main.lock");
    std::fs::write(&lock, "").expect("plant a stale lock");
    let new = setup.repo.commit_file("extra.txt", "a change");
    let (code, finished) = setup.build_json("web", &[]);
    assert_eq!(code, 0, "{finished:#}\n{}", setup.builder.log());
    assert_eq!(finished["rev"], new.as_str(), "{finished:#}");
    assert!(!lock.exists());
    assert!(
        setup
            .builder
            .log()
            .contains("removed a stale git lock file"),
        "{}",
        setup.builder.log()
    );
}

/// A private repo over SSH with a deploy key and a known-hosts file, served by a real sshd:
/// it builds; the same repo with a known-hosts file that lacks the server's key fails with an
/// error naming the host and the file; the key's content is nowhere in the builder's log.
#[test]
fn private_repo_over_ssh_with_a_deploy_key() {
    let nats = NatsServer::start();
    let sshd = test_support::SshServer::start();
    let repo = FixtureRepo::new("fleet");
    let empty_known_hosts = sshd.client_key().with_file_name("empty_known_hosts");
    std::fs::write(&empty_known_hosts, "").expect("empty known_hosts");
    let url = sshd.url(repo.path());
    let ssh_files = |known_hosts: &std::path::Path| {
        format!(
            "ssh_key_file = \"{}\"\nssh_known_hosts_file = \"{}\"\n",
            sshd.client_key().display(),
            known_hosts.display()
        )
    };
    let builder = start_with_repo_tables(
        &nats.url,
        &[
            ("private", &url, &ssh_files(&sshd.known_hosts())),
            ("stranger", &url, &ssh_files(&empty_known_hosts)),
        ],
    );
    let build = |repo: &str| build_json(&nats.url, &builder, repo, "web", &[]);
    let (code, finished) = build("private");
    assert_eq!(
        code,
        Some(0),
        "{finished:#}\n{}\nsshd:\n{}",
        builder.log(),
        sshd.log()
    );
    assert_eq!(finished["rev"], repo.head().as_str());
    let (code, finished) = build("stranger");
    assert_eq!(code, Some(1), "{finished:#}");
    let error = finished["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("[127.0.0.1]:{}", sshd.port))
            && error.contains(&empty_known_hosts.display().to_string()),
        "{error}"
    );
    let key = std::fs::read_to_string(sshd.client_key()).expect("key");
    let secret_line = key.lines().nth(2).expect("key body");
    assert!(!builder.log().contains(secret_line));
    assert!(!finished.to_string().contains(secret_line));
}

/// A private repo over HTTP(S) with a token file, served by a real `git http-backend` behind
/// lighttpd with basic auth: it builds; a wrong token fails with git's authentication error; the
/// token is nowhere in the builder's log, the result or the state dir (mirror config included).
#[test]
fn private_repo_over_https_with_a_token_file() {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("fleet");
    let token = format!("tok-{}", test_support::unique("secret"));
    let http = test_support::GitHttpServer::start(repo.path(), &token);
    let secrets = tempfile_dir();
    let good = secrets.join("good-token");
    let wrong = secrets.join("wrong-token");
    std::fs::write(&good, format!("{token}\n")).expect("token file");
    std::fs::write(&wrong, "not-the-token\n").expect("token file");
    let token_file = |file: &std::path::Path| format!("token_file = \"{}\"\n", file.display());
    let builder = start_with_repo_tables(
        &nats.url,
        &[
            ("lab", &http.url(), &token_file(&good)),
            ("wrong", &http.url(), &token_file(&wrong)),
        ],
    );
    let build = |repo: &str| build_json(&nats.url, &builder, repo, "web", &[]);
    let (code, finished) = build("lab");
    assert_eq!(
        code,
        Some(0),
        "{finished:#}\n{}\n{}",
        builder.log(),
        http.log()
    );
    let (code, wrong_finished) = build("wrong");
    assert_eq!(code, Some(1), "{wrong_finished:#}");
    assert!(
        wrong_finished["error"]
            .as_str()
            .is_some_and(|e| e.contains("Authentication failed")),
        "{wrong_finished:#}"
    );
    assert!(!builder.log().contains(&token));
    assert!(!finished.to_string().contains(&token));
    let grep = std::process::Command::new("grep")
        .args(["-r", "-l", &token])
        .arg(builder.state_dir())
        .output()
        .expect("grep runs");
    assert!(
        grep.stdout.is_empty(),
        "token written to {}",
        String::from_utf8_lossy(&grep.stdout)
    );
    let _ = std::fs::remove_dir_all(&secrets);
}

/// Starts a builder serving `repos` (name, url, lines added to its table) and waits until it is
/// ready.
fn start_with_repo_tables(nats_url: &str, repos: &[(&str, &str, &str)]) -> Builder {
    let name = test_support::unique("builder");
    let mut config = Builder::config(&name, nats_url, std::path::Path::new("{state_dir}"), &[]);
    for (repo, url, lines) in repos {
        config.push_str(&Builder::repo_table(repo, url));
        config.push_str(lines);
    }
    Builder::start_config(bin(), &name, &config)
}

/// A directory of its own under the system temp dir (the e2e crate has no `tempfile`).
fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(test_support::unique("git-secrets"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// `?dir=infra/nixos` in a repo's url: the flake lives in that directory, as for
/// `nix build 'git+…?dir=infra/nixos#…'`.
#[test]
fn flake_in_a_subdirectory_builds() {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("fleet");
    std::fs::create_dir_all(repo.path().join("infra/nixos")).expect("mkdir");
    for file in ["flake.nix", "nonce.nix"] {
        repo.git(&["mv", file, &format!("infra/nixos/{file}")]);
    }
    repo.git(&["commit", "-q", "-m", "flake under infra/nixos"]);
    let builder = Builder::start(
        bin(),
        &nats.url,
        &[("demo", format!("{}?dir=infra/nixos", repo.url()))],
    );
    cli_ok(&nats.url, &["build", "demo", "web", "--json"], &builder);
}

/// `?submodules=1`: a host that imports a file from a git submodule (with a relative URL, as
/// most `.gitmodules` have) builds; the submodule is fetched into a mirror of its own.
#[test]
fn host_importing_from_a_submodule_builds() {
    let nats = NatsServer::start();
    let modules = FixtureRepo::new("fleet");
    modules.commit_file("hostname.nix", "\"from-submodule\"\n");
    let repo = FixtureRepo::new("fleet");
    let relative = format!(
        "../{}",
        modules
            .path()
            .file_name()
            .expect("dir name")
            .to_string_lossy()
    );
    repo.git(&[
        "-c",
        "protocol.file.allow=always",
        "submodule",
        "add",
        "-q",
        &relative,
        "modules",
    ]);
    let flake = std::fs::read_to_string(repo.path().join("flake.nix")).expect("flake");
    let flake = flake.replace(
        "web = ok \"web\";",
        "web = ok \"web\";\n        sub = ok (import ./modules/hostname.nix);",
    );
    repo.commit_file("flake.nix", &flake);
    let builder = Builder::start(
        bin(),
        &nats.url,
        &[("demo", format!("{}?submodules=1", repo.url()))],
    );
    let output = test_support::run_cli(
        bin(),
        &nats.url,
        &["build", "demo", "sub", "--json"],
        Duration::from_secs(120),
    );
    let (stdout, stderr) = text(&output);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}\n{stderr}\n{}",
        builder.log()
    );
    let finished: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json");
    let out_path = finished["hosts"][0]["out_path"].as_str().expect("out path");
    let hostname = std::fs::read_to_string(format!("{out_path}/hostname")).expect("built");
    assert_eq!(hostname.trim(), "from-submodule");
    assert!(builder.state_dir().join("mirrors/submodules").is_dir());
}

/// A repo whose files are in Git LFS (made with the real `git lfs`) is never reported `built`
/// from pointer files: the request fails with an error that names LFS.
#[test]
fn lfs_repo_fails_with_an_error_naming_lfs() {
    let setup = Setup::new("fleet");
    setup.repo.git(&["lfs", "install", "--local"]);
    setup.repo.git(&["lfs", "track", "*.bin"]);
    let commit = setup.repo.commit_file("disk.bin", "binary contents\n");
    let pointer = setup
        .repo
        .git(&["cat-file", "-p", &format!("{commit}:disk.bin")]);
    assert!(pointer.contains("git-lfs"), "not an LFS pointer: {pointer}");
    let (code, finished) = setup.build_json("web", &[]);
    assert_eq!(code, 1, "{finished:#}");
    let error = finished["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("Git LFS") && error.contains(".gitattributes"),
        "{finished:#}"
    );
    assert!(
        finished["hosts"]
            .as_array()
            .is_none_or(|hosts| hosts.iter().all(|h| h["status"] != "built")),
        "{finished:#}"
    );
}
