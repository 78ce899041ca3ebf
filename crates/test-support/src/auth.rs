//! Authenticated servers: the shipped example configs with fresh keys, keys made by the binary
//! under test, and connections that record what the server refused.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{wait_until, NatsServer};

/// The shipped example server config `nats/NAME`, without its `store_dir` (the harness gives
/// the store dir on the command line).
pub fn example_config(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../nats")
        .join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("nats/{name}: {err}"))
        .replace("store_dir: \"/var/lib/nats/jetstream\"", "")
}

impl NatsServer {
    /// Writes the config text `config` to `path` and starts with it.
    pub fn start_config(config: &str, path: &Path) -> Self {
        std::fs::write(path, config).expect("write nats config");
        Self::start_with(&["-c", &path.display().to_string()])
    }
}

/// `homelab-deploy nkey generate --out SEED` of the binary `bin`: a fresh user seed in `seed`;
/// its public key.
pub fn nkey_generate(bin: &Path, seed: &Path) -> String {
    nkey(bin, &["nkey", "generate", "--out"], seed)
}

/// `homelab-deploy nkey public --seed-file SEED` of the binary `bin`: the public key of `seed`.
pub fn nkey_public(bin: &Path, seed: &Path) -> String {
    nkey(bin, &["nkey", "public", "--seed-file"], seed)
}

/// `bin ARGS SEED`, which must succeed; what it printed, trimmed.
fn nkey(bin: &Path, args: &[&str], seed: &Path) -> String {
    let output = Command::new(bin)
        .args(args)
        .arg(seed)
        .output()
        .unwrap_or_else(|err| panic!("{args:?}: {err}"));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// What the server reported to a connection (permission violations, auth errors), in order.
pub type ServerErrors = Arc<Mutex<Vec<String>>>;

/// Connects to `url` with `options`, recording what the server reports in [`ServerErrors`].
pub async fn connect_recording(
    options: async_nats::ConnectOptions,
    url: &str,
) -> Result<(async_nats::Client, ServerErrors), async_nats::ConnectError> {
    let errors = ServerErrors::default();
    let recorded = errors.clone();
    let client = options
        .event_callback(move |event| {
            let recorded = recorded.clone();
            async move {
                recorded
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(event.to_string());
            }
        })
        .connect(url)
        .await?;
    Ok((client, errors))
}

/// Everything the server reported so far, one report a line.
pub fn violations(errors: &ServerErrors) -> String {
    errors.lock().unwrap_or_else(|p| p.into_inner()).join("\n")
}

/// Waits (10 s at most) until the server reported a permissions violation naming `needle`
/// (any violation, for an empty `needle`).
pub fn refused_within(errors: &ServerErrors, needle: &str) -> bool {
    wait_until(Duration::from_secs(10), || {
        errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|e| e.contains("Permissions Violation") && e.contains(needle))
    })
}

/// [`refused_within`], which must hold; the failure shows every report.
pub fn assert_refused(errors: &ServerErrors, needle: &str) {
    assert!(refused_within(errors, needle), "{}", violations(errors));
}
