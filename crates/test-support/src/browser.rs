//! A real headless Chromium driven over the DevTools protocol (a websocket, with the
//! tokio-websockets client that async-nats already brings): tests read what the page shows
//! (`innerText`, after its scripts ran) and take screenshots.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio_websockets::{ClientBuilder, MaybeTlsStream, Message, WebSocketStream};

/// The Chromium binary: `CHROMIUM_BIN`, else `chromium` from `PATH` (Debian's package, which
/// `scripts/lib.sh` installs).
pub fn chromium_bin() -> std::ffi::OsString {
    std::env::var_os("CHROMIUM_BIN").unwrap_or_else(|| "chromium".into())
}

/// One headless Chromium with one page open; killed on drop.
pub struct Browser {
    child: Child,
    _profile: TempDir,
    socket: WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>,
    session: String,
    next_id: u64,
}

impl Browser {
    /// Starts Chromium on `url` (a new profile in a temp dir) and attaches to its page.
    pub async fn open(url: &str) -> Self {
        let profile = tempfile::tempdir().expect("temp dir");
        let child = Command::new(chromium_bin())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1280,1000",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium (apt install chromium, or set CHROMIUM_BIN)");
        // Chromium writes its DevTools port and browser path into the profile once it listens.
        let port_file = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(60);
        let endpoint = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    break format!("ws://127.0.0.1:{port}{path}");
                }
            }
            assert!(
                Instant::now() < deadline,
                "chromium wrote no DevToolsActivePort in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let uri = endpoint.parse().expect("DevTools URI");
        let (socket, _) = ClientBuilder::from_uri(uri)
            .connect()
            .await
            .expect("connect to Chromium's DevTools");
        let mut browser = Self {
            child,
            _profile: profile,
            socket,
            session: String::new(),
            next_id: 1,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let target = loop {
            let targets = browser.call("Target.getTargets", json!({})).await;
            let page = targets["targetInfos"]
                .as_array()
                .and_then(|t| t.iter().find(|t| t["type"] == "page"))
                .map(|t| t["targetId"].clone());
            if let Some(page) = page {
                break page;
            }
            assert!(
                Instant::now() < deadline,
                "chromium opened no page: {targets}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let attached = browser
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target, "flatten": true }),
            )
            .await;
        browser.session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_owned();
        browser
    }

    /// Sends one DevTools command (to the page once attached) and returns its result.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut command = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            command["sessionId"] = json!(self.session);
        }
        self.socket
            .send(Message::text(command.to_string()))
            .await
            .expect("send to DevTools");
        let reply = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(message) = self.socket.next().await {
                let message = message.expect("read DevTools");
                let Some(text) = message.as_text() else {
                    continue;
                };
                let value: Value = serde_json::from_str(text).expect("DevTools JSON");
                if value["id"] == id {
                    return value;
                }
            }
            panic!("DevTools closed the connection");
        })
        .await
        .unwrap_or_else(|_| panic!("DevTools did not answer {method} in 30 s"));
        assert!(reply["error"].is_null(), "{method} failed: {reply}");
        reply["result"].clone()
    }

    /// Evaluates `expression` in the page; returns its value (JSON).
    pub async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true }),
            )
            .await;
        result["result"]["value"].clone()
    }

    /// The text a person sees in the element `selector` (`innerText`; empty when absent).
    pub async fn text(&mut self, selector: &str) -> String {
        let expression = format!(
            "(function(){{var e=document.querySelector({}); return e ? e.innerText : '';}})()",
            json!(selector)
        );
        self.eval(&expression)
            .await
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    /// Polls the text of `selector` until `condition` holds; panics with the last text seen
    /// after `timeout`.
    pub async fn wait_for_text(
        &mut self,
        selector: &str,
        timeout: Duration,
        what: &str,
        condition: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.text(selector).await;
            if condition(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "the page never showed {what} in {timeout:?}; {selector} shows:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Loads `url` in the page and waits for it to finish loading.
    pub async fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url })).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.eval("document.readyState").await != "complete" {
            assert!(Instant::now() < deadline, "{url} did not load in 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Saves a PNG of the whole page (beyond the window's height) to `path`.
    pub async fn screenshot(&mut self, path: &Path) {
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({ "format": "png", "captureBeyondViewport": true }),
            )
            .await;
        let data = shot["data"].as_str().expect("screenshot data");
        let png = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, data)
            .expect("screenshot base64");
        std::fs::write(path, png).expect("write screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
