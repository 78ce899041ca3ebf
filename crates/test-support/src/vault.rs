//! A real Vault-API server (`rvault`, built by `../shared/tools/install-rvault`), initialised,
//! unsealed and driven over its HTTP API as an operator would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tempfile::TempDir;

use crate::wait_until;

/// The `rvault` binary: `$RVAULT_BIN` (set by scripts/test), else the installer's cached build.
fn rvault_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("RVAULT_BIN") {
        return PathBuf::from(bin);
    }
    let installer =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/tools/install-rvault");
    let output = Command::new("bash")
        .arg(&installer)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|err| panic!("cannot run {} ({err}); run ./scripts/test, which installs rvault, or set RVAULT_BIN", installer.display()));
    assert!(output.status.success(), "{} failed", installer.display());
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}

pub struct VaultServer {
    child: Child,
    dir: TempDir,
    pub address: String,
    pub port: u16,
    root_token: String,
    unseal_key: String,
    http: reqwest::Client,
}

/// AppRole credentials as files, the way a secrets manager hands them to the builder.
pub struct AppRoleFiles {
    pub role_id_file: PathBuf,
    pub secret_id_file: PathBuf,
    pub secret_id: String,
}

impl VaultServer {
    /// Starts rvault on a free port, initialises and unseals it.
    pub async fn start() -> Self {
        Self::start_on_port(crate::free_port()).await
    }

    /// Starts on a given port (e.g. one a builder is already trying to reach).
    pub async fn start_on_port(port: u16) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for rvault");
        let address = format!("http://127.0.0.1:{port}");
        let mut server = Self {
            child: Self::spawn(dir.path(), port),
            dir,
            address,
            port,
            root_token: String::new(),
            unseal_key: String::new(),
            http: reqwest::Client::new(),
        };
        server.wait_listening();
        let init = server
            .call(
                "PUT",
                "sys/init",
                Some(json!({"secret_shares": 1, "secret_threshold": 1})),
            )
            .await;
        server.unseal_key = init["keys"][0].as_str().expect("unseal key").to_owned();
        server.root_token = init["root_token"].as_str().expect("root token").to_owned();
        server.unseal().await;
        server
    }

    fn spawn(dir: &Path, port: u16) -> Child {
        let address = format!("http://127.0.0.1:{port}");
        let config = format!(
            "storage \"file\" {{\n  path = \"{}\"\n}}\nlistener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  tls_disable = true\n}}\napi_addr = \"{address}\"\n",
            dir.join("data").display()
        );
        let config_path = dir.join("rvault.hcl");
        std::fs::write(&config_path, config).expect("write rvault config");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("rvault.log"))
            .expect("rvault log");
        Command::new(rvault_bin())
            .args(["server", "--config"])
            .arg(&config_path)
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start rvault")
    }

    fn wait_listening(&self) {
        let up = wait_until(Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
        assert!(up, "rvault did not start; log:\n{}", self.log());
    }

    async fn unseal(&self) {
        self.call("PUT", "sys/unseal", Some(json!({ "key": self.unseal_key })))
            .await;
    }

    /// Starts it again after [`VaultServer::stop`], on the same port and storage, and unseals it.
    pub async fn restart(&mut self) {
        self.child = Self::spawn(self.dir.path(), self.port);
        self.wait_listening();
        self.unseal().await;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("rvault.log")).unwrap_or_default()
    }

    /// An API call with the root token; panics unless it succeeds.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, value) = self.try_call(method, path, body).await;
        assert!(
            (200..300).contains(&status),
            "rvault {method} {path}: HTTP {status} {value}"
        );
        value
    }

    /// An API call with the root token: its status and JSON body (null when empty).
    pub async fn try_call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut request = self
            .http
            .request(method, format!("{}/v1/{path}", self.address))
            .header("X-Vault-Token", &self.root_token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("rvault request");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Mounts a KV v1 engine (rvault has no KV v2) at `mount`.
    pub async fn mount_kv(&self, mount: &str) {
        self.call(
            "POST",
            &format!("sys/mounts/{mount}"),
            Some(json!({"type": "kv"})),
        )
        .await;
    }

    pub async fn write_secret(&self, path: &str, data: Value) {
        self.call("POST", path, Some(data)).await;
    }

    /// Writes an ACL policy (HCL text).
    pub async fn write_policy(&self, name: &str, policy: &str) {
        self.call(
            "POST",
            &format!("sys/policies/acl/{name}"),
            Some(json!({ "policy": policy })),
        )
        .await;
    }

    /// Enables AppRole (once), creates `role` with `policies`, and writes its role id and a new
    /// secret id to files in `dir`.
    pub async fn approle(&self, role: &str, policies: &[&str], dir: &Path) -> AppRoleFiles {
        let (status, _) = self
            .try_call("POST", "sys/auth/approle", Some(json!({"type": "approle"})))
            .await;
        // 400 or 409: already enabled.
        assert!(
            status < 300 || status == 400 || status == 409,
            "enabling approle: HTTP {status}"
        );
        self.call(
            "POST",
            &format!("auth/approle/role/{role}"),
            Some(json!({ "token_policies": policies })),
        )
        .await;
        let role_id = self
            .call("GET", &format!("auth/approle/role/{role}/role-id"), None)
            .await["data"]["role_id"]
            .as_str()
            .expect("role id")
            .to_owned();
        let secret_id = self
            .call("POST", &format!("auth/approle/role/{role}/secret-id"), None)
            .await["data"]["secret_id"]
            .as_str()
            .expect("secret id")
            .to_owned();
        let role_id_file = dir.join(format!("{role}.role-id"));
        let secret_id_file = dir.join(format!("{role}.secret-id"));
        std::fs::write(&role_id_file, role_id).expect("write role id");
        std::fs::write(&secret_id_file, &secret_id).expect("write secret id");
        AppRoleFiles {
            role_id_file,
            secret_id_file,
            secret_id,
        }
    }

    /// A new token with `policies`, as an operator would hand one out.
    pub async fn token(&self, policies: &[&str]) -> String {
        self.call(
            "POST",
            "auth/token/create",
            Some(json!({ "policies": policies })),
        )
        .await["auth"]["client_token"]
            .as_str()
            .expect("client token")
            .to_owned()
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for VaultServer {
    fn drop(&mut self) {
        self.stop();
    }
}
