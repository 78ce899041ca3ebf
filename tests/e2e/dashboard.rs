//! The dashboard in a real headless Chromium: what a person sees while a fixture build runs
//! (each host's derivations done of expected), its result, its log following live, and a
//! builder going away, all read from the page itself.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use test_support::{free_port, run_cli, wait_until, Browser, Builder, FixtureRepo, NatsServer};

use crate::permissions::SecuredNats;
use crate::text;

use crate::bin;

/// `homelab-deploy dashboard`; killed on drop.
pub(crate) struct Dashboard {
    child: Child,
    log: tempfile::NamedTempFile,
    url: String,
}

impl Dashboard {
    /// On a free port, with `extra` arguments.
    pub fn start(nats_url: &str, extra: &[&str]) -> Self {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["dashboard", "--listen", &listen];
        args.extend_from_slice(extra);
        Self::run(nats_url, &args, port)
    }

    /// `homelab-deploy ARGS` (which make it listen on 127.0.0.1:`port`); waits until it listens.
    pub fn run(nats_url: &str, args: &[&str], port: u16) -> Self {
        let log = tempfile::NamedTempFile::new().expect("log file");
        let child = Command::new(bin())
            .args(args)
            .env("HOMELAB_DEPLOY_NATS_URL", nats_url)
            .env("HOME", std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("log file"))
            .spawn()
            .expect("start the dashboard");
        let dashboard = Self {
            child,
            log,
            url: format!("http://127.0.0.1:{port}"),
        };
        assert!(
            wait_until(Duration::from_secs(30), || TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "the dashboard did not listen in 30 s:\n{}",
            dashboard.log()
        );
        dashboard
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// A plain HTTP/1.0 GET (no JavaScript, no browser): status line and body.
    pub fn get(&self, path: &str) -> (String, String) {
        let mut stream = self.send_get(path);
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read");
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        (
            head.lines().next().unwrap_or("").to_owned(),
            body.to_owned(),
        )
    }
}

impl Dashboard {
    fn send_get(&self, path: &str) -> TcpStream {
        let address = self.url.trim_start_matches("http://");
        let mut stream = TcpStream::connect(address).expect("connect to the dashboard");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").expect("send");
        stream
    }

    /// Opens `path` and reads up to its first event (or the end of a refusal); the stream
    /// stays open while the returned connection lives.
    fn open_stream(&self, path: &str) -> (TcpStream, String) {
        let mut stream = self.send_get(path);
        let mut seen = Vec::new();
        let mut buffer = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("data:") {
            match stream.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buffer[..n]),
            }
        }
        (stream, String::from_utf8_lossy(&seen).into_owned())
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the screenshot goes: `HOMELAB_DEPLOY_SCREENSHOT` (docs/dashboard.png is made that
/// way), else a temp file (the capture still runs).
fn screenshot_path(dir: &tempfile::TempDir) -> PathBuf {
    std::env::var_os("HOMELAB_DEPLOY_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().join("dashboard.png"))
}

/// "N/M derivations" with 0 < N < M on the `alpha` row: a build part-way through.
fn alpha_part_way(text: &str) -> bool {
    text.lines()
        .filter(|line| line.contains("alpha"))
        .filter_map(|line| line.split(" derivations").next()?.rsplit(' ').next())
        .filter_map(|counts| counts.split_once('/'))
        .filter_map(|(done, expected)| {
            Some((done.parse::<u64>().ok()?, expected.parse::<u64>().ok()?))
        })
        .any(|(done, expected)| done > 0 && done < expected)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_browser_sees_a_build_progress_finish_and_its_builder_leave() {
    let nats = NatsServer::start();
    let repo = FixtureRepo::new("dashboard");
    // An envelope no machine's memory gives by default, so the page must show the configured one.
    let mut builder = Builder::start_with(
        bin(),
        &nats.url,
        &[("demo", repo.url())],
        "\nmemory_mb = 3071",
    );
    let dashboard = Dashboard::start(&nats.url, &[]);
    let shots = tempfile::tempdir().expect("temp dir");
    let long = Duration::from_secs(120);

    // Server-rendered first: without JavaScript the page lists the fleet.
    assert!(
        wait_until(Duration::from_secs(30), || dashboard
            .get("/")
            .1
            .contains(&builder.name)),
        "GET / never listed builder {}:\n{}",
        builder.name,
        dashboard.get("/").1
    );
    // A malformed id (a wildcard in it too) is refused at the HTTP edge, saying why, on the
    // build page and its live stream alike; it never becomes part of a subject.
    for path in ["/builds/not%20an%20id", "/builds/REQUEST.%2A.x/events"] {
        let (status, body) = dashboard.get(path);
        assert!(status.contains("400"), "{path}: {status}\n{body}");
        assert!(body.contains("invalid request id"), "{path}: {body}");
    }

    let mut browser = Browser::open(&dashboard.url).await;
    browser
        .wait_for_text(
            "#fleet",
            long,
            "the builder as idle, with its memory envelope",
            |text| {
                text.lines().any(|row| {
                    row.contains(&builder.name) && row.contains("idle") && row.contains("3071 MiB")
                })
            },
        )
        .await;
    browser
        .wait_for_text("#live", long, "the live marker", |text| text == "live")
        .await;

    let nats_url = nats.url.clone();
    let build = std::thread::spawn(move || {
        run_cli(
            bin(),
            &nats_url,
            &["build", "demo", "all", "--json"],
            Duration::from_secs(300),
        )
    });

    // Live, without a reload: the running build and alpha's derivations part-way.
    let running = browser
        .wait_for_text(
            "#running",
            long,
            "alpha part-way through its derivations",
            alpha_part_way,
        )
        .await;
    assert!(running.contains("beta"), "{running}");
    browser
        .wait_for_text("#fleet", long, "the builder building", |text| {
            text.contains("building") && text.contains("demo all")
        })
        .await;

    // The build's own page: its log follows live, then the result.
    let id = browser
        .eval("document.querySelector('#running article.build').getAttribute('data-id')")
        .await
        .as_str()
        .expect("the running build's id on the page")
        .to_owned();
    browser
        .navigate(&format!("{}/builds/{id}", dashboard.url))
        .await;
    browser
        .wait_for_text("#log", long, "alpha's last step in the log", |text| {
            text.contains("alpha step 3 of 3") && text.contains("beta builds")
        })
        .await;
    browser
        .wait_for_text("#build", long, "the build succeeded", |text| {
            text.contains("succeeded") && text.contains("alpha") && text.contains("built")
        })
        .await;

    let output = build.join().expect("build thread");
    assert_eq!(output.status.code(), Some(0), "{output:?}");

    browser.navigate(&dashboard.url).await;
    let recent = browser
        .wait_for_text("#recent", long, "the result with each host", |text| {
            text.contains("succeeded")
                && text.contains("alpha built")
                && text.contains("beta built")
        })
        .await;
    assert!(recent.contains("demo all"), "{recent}");
    // Each host's closure-diff summary: a first build has nothing to compare with.
    assert!(recent.contains("no earlier build"), "{recent}");
    let charts = browser.text("#charts").await;
    assert!(
        charts.contains("demo/alpha") && charts.contains("queue depth"),
        "{charts}"
    );

    // A second build (a new commit rebuilds both hosts) runs on top of that history.
    repo.commit_file(
        "nonce.nix",
        &format!("\"{}\"\n", test_support::unique("second")),
    );
    let queued = run_cli(
        bin(),
        &nats.url,
        &["build", "demo", "all", "--no-wait"],
        long,
    );
    assert_eq!(queued.status.code(), Some(0), "{queued:?}");
    browser
        .wait_for_text(
            "#running",
            long,
            "the second build part-way",
            alpha_part_way,
        )
        .await;
    browser.screenshot(&screenshot_path(&shots)).await;

    // The builder goes away mid-build: the page shows it gone and the build handed back,
    // without a reload.
    assert!(
        builder.terminate(Duration::from_secs(60)).is_some(),
        "builder did not stop"
    );
    browser
        .wait_for_text("#fleet", long, "the builder gone", |text| {
            text.lines()
                .any(|line| line.contains(&builder.name) && line.contains("gone"))
        })
        .await;
    browser
        .wait_for_text("#running", long, "the build handed back", |text| {
            text.contains("requeued")
        })
        .await;
    assert!(
        !dashboard.log().contains("ERROR"),
        "dashboard log:\n{}",
        dashboard.log()
    );
}

/// The `viewer` user of nats/prod.example.conf is all the dashboard needs: the page lists the
/// fleet and a finished build with no NATS error; the same key cannot queue a build.
#[test]
fn the_viewer_user_reads_everything_the_page_shows_and_nothing_more() {
    let secured = SecuredNats::start();
    let repo = FixtureRepo::new("fleet");
    let name = test_support::unique("builder");
    let config = secured.builder_config(&name, &repo).replacen(
        "[builder]",
        &format!(
            "nkey_seed_file = \"{}\"\n\n[builder]",
            secured.builder_seed.display()
        ),
        1,
    );
    secured.provisioned(&config);
    let _builder = Builder::start_config(bin(), &name, &config);
    let built = secured.cli(&secured.deployer_seed, &["build", "demo", "web", "--quiet"]);
    assert_eq!(built.status.code(), Some(0), "{}", text(&built).1);

    let seed = secured.viewer_seed.display().to_string();
    let dashboard = Dashboard::start(
        &secured.nats.url,
        &["--nkey-file", &seed, "--inbox-prefix", "_INBOX_viewer"],
    );
    let mut page = String::new();
    let shown = wait_until(Duration::from_secs(60), || {
        page = dashboard.get("/").1;
        page.contains(&name) && page.contains("succeeded")
    });
    assert!(
        shown,
        "the page never showed the builder and the build:\n{page}\n{}",
        dashboard.log()
    );
    assert!(!page.contains("NATS:"), "{page}");
    assert!(
        !dashboard.log().contains("ermissions"),
        "{}",
        dashboard.log()
    );

    let refused = secured.cli(&secured.viewer_seed, &["build", "demo", "web", "--no-wait"]);
    assert_ne!(refused.status.code(), Some(0), "the viewer queued a build");
}

/// Live pages are capped: beyond `--max-clients` a page gets `503 busy` at once (and still
/// works as a static page), and a closed page frees its place.
#[test]
fn live_pages_beyond_the_cap_are_refused_not_queued() {
    let nats = NatsServer::start();
    let dashboard = Dashboard::start(&nats.url, &["--max-clients", "1"]);
    let (first, head) = dashboard.open_stream("/events");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(head.contains("text/event-stream"), "{head}");
    let (_, refused) = dashboard.open_stream("/events");
    assert!(
        refused.contains(" 503 ") && refused.contains("busy"),
        "{refused}"
    );
    let (status, page) = dashboard.get("/");
    assert!(
        status.contains("200") && page.contains("Fleet"),
        "{status}\n{page}"
    );
    drop(first);
    // The server notices the closed page at its next write (a section update, every second).
    let mut last = String::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            last = dashboard.open_stream("/events").1;
            last.contains(" 200 ")
        }),
        "the closed page's place was never freed: {last}"
    );
}
