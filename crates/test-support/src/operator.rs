//! A nats-server in operator mode (NATS decentralized JWT auth), as `nsc` would set it up: an
//! operator with its system account, one account with JetStream and a signing key, and `resolver: MEMORY` with the
//! account preloaded, from `nats/operator.example.conf`.
//!
//! `nsc` is a Go tool that no package registry here ships, so the operator and account JWTs are
//! encoded here with serde_json and nkeys (the `nats-jwt` crate makes no operator JWTs and no
//! JetStream account limits); the server checks every signature, so a wrong encoding fails.

use std::path::{Path, PathBuf};

use data_encoding::BASE64URL_NOPAD;
use nkeys::KeyPair;
use serde_json::{json, Value};

use crate::NatsServer;

/// An operator-mode server with account `DEPLOY` and its signing key on disk.
pub struct OperatorServer {
    pub nats: NatsServer,
    /// Public key of the account (`A…`).
    pub account: String,
    /// File holding the account signing key's seed (`SA…`).
    pub signing_key_file: PathBuf,
    _dir: tempfile::TempDir,
}

fn encode(claims: &Value, signer: &KeyPair) -> String {
    let header = BASE64URL_NOPAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = BASE64URL_NOPAD.encode(claims.to_string().as_bytes());
    let signed = format!("{header}.{body}");
    let signature = signer.sign(signed.as_bytes()).expect("sign the JWT");
    format!("{signed}.{}", BASE64URL_NOPAD.encode(&signature))
}

fn claims(subject: &str, issuer: &KeyPair, name: &str, nats: Value) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    json!({
        "jti": nuid::next().to_string(),
        "iat": now,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    })
}

impl OperatorServer {
    /// Starts nats-server with the shipped `nats/operator.example.conf`, its placeholders
    /// filled with a fresh operator and account.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir for operator config");
        let operator = KeyPair::new_operator();
        let account = KeyPair::new_account();
        let signing = KeyPair::new_account();
        let system = KeyPair::new_account();
        let operator_jwt = encode(
            &claims(
                &operator.public_key(),
                &operator,
                "homelab",
                json!({"type": "operator", "version": 2, "system_account": system.public_key()}),
            ),
            &operator,
        );
        let system_jwt = encode(
            &claims(
                &system.public_key(),
                &operator,
                "SYS",
                json!({"type": "account", "version": 2, "limits": {
                    "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                    "wildcards": true, "conn": -1, "leaf": -1
                }}),
            ),
            &operator,
        );
        let account_jwt = encode(
            &claims(
                &account.public_key(),
                &operator,
                "DEPLOY",
                json!({
                    "type": "account",
                    "version": 2,
                    "signing_keys": [signing.public_key()],
                    "limits": {
                        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                        "wildcards": true, "conn": -1, "leaf": -1,
                        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
                    },
                    "default_permissions": {"pub": {}, "sub": {}}
                }),
            ),
            &operator,
        );
        let config = crate::example_config("operator.example.conf")
            .replace("OPERATOR_JWT", &operator_jwt)
            .replace("DEPLOY_ACCOUNT_PUBLIC_KEY", &account.public_key())
            .replace("DEPLOY_ACCOUNT_JWT", &account_jwt)
            .replace("SYS_ACCOUNT_PUBLIC_KEY", &system.public_key())
            .replace("SYS_ACCOUNT_JWT", &system_jwt);
        let signing_key_file = dir.path().join("deploy-account-sk");
        std::fs::write(&signing_key_file, signing.seed().expect("seed")).expect("write sk");
        let nats = NatsServer::start_config(&config, &dir.path().join("nats.conf"));
        Self {
            nats,
            account: account.public_key(),
            signing_key_file,
            _dir: dir,
        }
    }

    pub fn signing_key_file(&self) -> &Path {
        &self.signing_key_file
    }
}
