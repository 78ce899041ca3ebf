//! The builder as a systemd service (`Type=notify`): readiness and stopping are reported on a
//! real `NOTIFY_SOCKET` datagram socket, as systemd reads them.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use homelab_deploy_protocol::subject::consumer_name;
use homelab_deploy_protocol::RepoName;
use test_support::{free_port, Builder, FixtureRepo, NatsServer, NIX_CONFIG};

use crate::bin;

/// The next notification on `socket`, as text; panics after the socket's read timeout.
fn next_notification(socket: &UnixDatagram, log: &std::path::Path) -> String {
    let mut buffer = [0u8; 4096];
    match socket.recv(&mut buffer) {
        Ok(len) => String::from_utf8_lossy(&buffer[..len])
            .trim_end()
            .to_owned(),
        Err(err) => panic!(
            "no notification ({err}); builder log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        ),
    }
}

/// While NATS is down the builder says so in `STATUS=` (shown by `systemctl status`); `READY=1`
/// arrives only once the streams and the repo's consumer exist (systemd then starts what is
/// ordered after the builder), and `STOPPING=1` when SIGTERM stops it.
#[tokio::test(flavor = "multi_thread")]
async fn readiness_and_stopping_are_reported_to_systemd() {
    let port = free_port();
    let repo = FixtureRepo::new("fleet");
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind NOTIFY_SOCKET");
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let config = dir.path().join("builder.toml");
    std::fs::write(
        &config,
        Builder::config(
            "notified",
            &format!("nats://127.0.0.1:{port}"),
            &dir.path().join("state"),
            &[("demo", repo.url())],
        ),
    )
    .expect("config");
    let log = dir.path().join("builder.log");
    let log_file = std::fs::File::create(&log).expect("log");
    let mut child = Command::new(bin())
        .args(["builder", "--config"])
        .arg(&config)
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("NOTIFY_SOCKET", &socket_path)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("log"))
        .stderr(log_file)
        .spawn()
        .expect("start builder");

    let waiting = next_notification(&socket, &log);
    assert!(
        waiting.starts_with(&format!(
            "STATUS=waiting for NATS: cannot reach NATS at nats://127.0.0.1:{port}"
        )),
        "{waiting}"
    );
    let nats = NatsServer::start_on_port(port);
    let mut notification = next_notification(&socket, &log);
    while notification.starts_with("STATUS=waiting for NATS") {
        notification = next_notification(&socket, &log);
    }
    assert_eq!(notification, "READY=1");
    let js = async_nats::jetstream::new(nats.client().await);
    let stream = js
        .get_stream("BUILD_REQUESTS")
        .await
        .expect("stream exists");
    let demo = RepoName::parse("demo").expect("repo name");
    stream
        .consumer_info(consumer_name(&demo))
        .await
        .expect("the repo's consumer exists at READY=1");

    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert_eq!(next_notification(&socket, &log), "STOPPING=1");
    let status = child.wait().expect("builder exits");
    assert!(status.success(), "{status}");
}

/// With `hosts_refresh_secs = 0` the builder lists the flake's hosts once at start and that
/// listing ends: the builder keeps serving (a long-lived task that ends early would stop it).
#[tokio::test(flavor = "multi_thread")]
async fn hosts_listed_once_at_start_keep_the_builder_serving() {
    let fleet = test_support::Fleet::new(bin(), "fleet");
    let builder = fleet.builder("\nhosts_refresh_secs = 0\n");
    let announced = test_support::wait_until(Duration::from_secs(60), || {
        let list = fleet.cli(&["builders", "--json"]);
        String::from_utf8_lossy(&list.stdout).contains("\"web\"")
    });
    assert!(announced, "hosts never announced; log:\n{}", builder.log());
    let id = fleet.submit("web", &[]);
    let events = fleet.finished(&id).await;
    let finished = events.last().expect("finished");
    assert_eq!(
        finished["status"],
        "succeeded",
        "{finished:#}\n{}",
        builder.log()
    );
    assert!(
        !builder.log().contains("task failed"),
        "log:\n{}",
        builder.log()
    );
}
