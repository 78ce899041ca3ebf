//! The CLI's habits: completions and man pages from the clap definitions, durations as people
//! write them, and `NO_COLOR`.

use std::process::Command;

use test_support::{unique, Builder};

use crate::{bin, text};

/// The bash completion script, sourced into a real bash, completes command names; the man pages
/// describe every command; and the commands nix/package.nix's postInstall runs work.
#[test]
fn completions_and_man_pages_come_from_the_cli() {
    let script = Command::new(bin())
        .args(["completions", "bash"])
        .output()
        .expect("run completions");
    assert_eq!(script.status.code(), Some(0), "{}", text(&script).1);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("homelab-deploy.bash");
    std::fs::write(&path, &script.stdout).expect("write script");
    let complete = |words: &str| {
        let words_count = words.split(' ').count();
        let probe = format!(
            "source {}; COMP_WORDS=({words}); COMP_CWORD={}; COMP_LINE='{words}'; COMP_POINT=${{#COMP_LINE}}; \
             func=$(complete -p homelab-deploy | sed -E 's/.*-F ([^ ]+).*/\\1/'); \
             \"$func\" homelab-deploy \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            path.display(),
            words_count - 1
        );
        let output = Command::new("bash")
            .args(["--norc", "-c", &probe])
            .output()
            .expect("run bash");
        assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
        text(&output).0
    };
    let commands = complete("homelab-deploy bu");
    for name in ["build", "builder", "builds", "builders"] {
        assert!(commands.lines().any(|l| l == name), "{name}: {commands}");
    }
    assert!(!commands.lines().any(|l| l == "status"), "{commands}");
    let flags = complete("homelab-deploy build --ti");
    assert!(flags.lines().any(|l| l == "--timeout"), "{flags}");

    // What nix/package.nix's postInstall runs, with nixpkgs' install hooks reduced to checks.
    let out = tempfile::tempdir().expect("out dir");
    std::fs::create_dir(out.path().join("bin")).expect("bin dir");
    std::os::unix::fs::symlink(bin(), out.path().join("bin/homelab-deploy")).expect("symlink");
    let package = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../nix/package.nix"),
    )
    .expect("read package.nix");
    let post_install = package
        .split("''")
        .nth(1)
        .expect("postInstall script between '' quotes");
    let work = tempfile::tempdir().expect("work dir");
    let run = Command::new("bash")
        .arg("-euc")
        .arg(format!(
            "installShellCompletion() {{ for f in \"$@\"; do test -s \"$f\"; echo \"completion $f\"; done; }}\n\
             installManPage() {{ for f in \"$@\"; do test -s \"$f\"; echo \"man $f\"; done; }}\n{post_install}"
        ))
        .env("out", out.path())
        .current_dir(work.path())
        .output()
        .expect("run postInstall");
    let (stdout, stderr) = text(&run);
    assert_eq!(run.status.code(), Some(0), "{stdout}{stderr}");
    for expected in [
        "completion homelab-deploy.bash",
        "completion homelab-deploy.zsh",
        "completion homelab-deploy.fish",
        "man man/homelab-deploy.1",
        "man man/homelab-deploy-build.1",
        "man man/homelab-deploy-logs.1",
    ] {
        assert!(
            stdout.lines().any(|l| l == expected),
            "{expected}: {stdout}"
        );
    }
    // The page renders with the real man tool chain and explains the options.
    let page = work.path().join("man/homelab-deploy-build.1");
    let rendered = Command::new("groff")
        // Plain text: no bold, underline or overstrike.
        .args(["-man", "-Tutf8", "-P-cbou"])
        .arg(&page)
        .output()
        .expect("run groff");
    let rendered = String::from_utf8_lossy(&rendered.stdout).replace('\u{2010}', "-");
    assert!(rendered.contains("--timeout"), "{rendered}");
    assert!(rendered.contains("DURATION"), "{rendered}");
}

/// `--timeout 3h` is taken; a duration that is not one is a usage error (exit 2) that shows how
/// to write one, before anything is sent.
#[test]
fn durations_are_written_as_people_write_them() {
    let run = |timeout: &str| {
        Command::new(bin())
            .args(["build", "demo", "web", "--timeout", timeout, "--nats-url"])
            .arg("nats://127.0.0.1:1")
            .env("HOME", "/nonexistent")
            .env_remove("XDG_CONFIG_HOME")
            .env("HOMELAB_DEPLOY_SYSTEM_CONFIG", "/nonexistent")
            .output()
            .expect("run cli")
    };
    for bad in ["banana", "0", "3 fortnights"] {
        let output = run(bad);
        let stderr = text(&output).1;
        assert_eq!(output.status.code(), Some(2), "{bad}: {stderr}");
        assert!(stderr.contains("--timeout"), "{bad}: {stderr}");
    }
    assert!(text(&run("banana")).1.contains("3h"));
    // Accepted, so the CLI goes on to connect, and fails there (exit 3), not at parsing.
    for good in ["3h", "1h30m", "90s", "1800"] {
        let output = run(good);
        assert_eq!(output.status.code(), Some(3), "{good}: {}", text(&output).1);
    }
}

/// On a terminal the builder's log is coloured; `NO_COLOR=1` turns that off.
#[test]
fn no_color_turns_colour_off_on_a_terminal() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("builder.toml");
    // NATS on a closed port: the builder starts, logs, and keeps retrying until it is stopped.
    std::fs::write(
        &config,
        Builder::config(
            &unique("colour"),
            "nats://127.0.0.1:1",
            &dir.path().join("state"),
            &[("demo", "git+file:///nonexistent".to_owned())],
        ),
    )
    .expect("write config");
    let on_terminal = |no_color: Option<&str>| {
        // `script` gives the builder a real pseudo-terminal as stdout and stderr.
        let mut command = Command::new("script");
        command
            .args(["-qec"])
            .arg(format!(
                "timeout -s INT 3 {} builder --config {}",
                bin().display(),
                config.display()
            ))
            .arg("/dev/null")
            .env("RUST_LOG", "info")
            .env_remove("NO_COLOR");
        if let Some(value) = no_color {
            command.env("NO_COLOR", value);
        }
        let output = command.output().expect("run script");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let coloured = on_terminal(None);
    assert!(coloured.contains("builder"), "{coloured}");
    assert!(
        coloured.contains("\u{1b}["),
        "no colour on a terminal: {coloured}"
    );
    let plain = on_terminal(Some("1"));
    assert!(plain.contains("builder"), "{plain}");
    assert!(
        !plain.contains("\u{1b}["),
        "colour despite NO_COLOR: {plain}"
    );
}
