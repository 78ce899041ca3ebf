//! Short-lived NATS user credentials (NATS decentralized auth): a user JWT limited to one role,
//! signed by an account signing key, that the server refuses after it expires, together with a
//! fresh user seed in a `.creds` file. A CI runner or an on-demand builder gets one of these
//! instead of a long-lived seed.
//!
//! The user JWT is encoded here (serde_json, `nkeys`), not with the `nats-jwt` crate, which has
//! no `resp` claim: the builder role answers control API requests through it (reply to the
//! asker only, docs/decisions/private-replies.md). The operator and account JWTs the server
//! trusts are not made here: `nsc` (the NATS project's tool) makes them (docs/security.md).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nkeys::{KeyPair, KeyPairType};

use crate::{describe, Seed};

/// What a role may publish and subscribe to: the same lists as the role's block in
/// `nats/prod.example.conf` (a test holds them equal).
pub struct RolePermissions {
    pub publish: &'static [&'static str],
    pub subscribe: &'static [&'static str],
    /// May publish one reply to the reply subject of each request it received, within
    /// [`RESPONSE_TTL`] (nats-server's `allow_responses`, the JWT's `resp` claim).
    pub allow_responses: bool,
}

/// How long after a request a role with `allow_responses` may answer it: nats-server's default
/// for `allow_responses = true`, which the server config uses.
pub const RESPONSE_TTL: Duration = Duration::from_secs(120);

/// The builder role (`BUILDER` in `nats/prod.example.conf`; why each subject: docs/security.md).
pub const BUILDER: RolePermissions = RolePermissions {
    publish: &[
        "build.responses.>",
        "build.api.builder.*.cancel",
        "$JS.API.CONSUMER.CREATE.BUILD_REQUESTS.>",
        "$JS.API.CONSUMER.DURABLE.CREATE.BUILD_REQUESTS.>",
        "$JS.API.CONSUMER.MSG.NEXT.BUILD_REQUESTS.>",
        "$JS.ACK.BUILD_REQUESTS.>",
        "$JS.API.STREAM.MSG.DELETE.BUILD_REQUESTS",
        "$KV.BUILD_BUILDERS.>",
        "$KV.BUILD_STATE.>",
        "$KV.BUILD_PLACEMENT.>",
        "$JS.API.STREAM.INFO.KV_BUILD_PLACEMENT",
        "$JS.API.STREAM.MSG.GET.KV_BUILD_PLACEMENT",
        "$JS.API.DIRECT.GET.KV_BUILD_PLACEMENT.>",
        "$JS.API.INFO",
        "$JS.API.STREAM.INFO.BUILD_REQUESTS",
        "$JS.API.STREAM.INFO.BUILD_EVENTS",
        "$JS.API.STREAM.INFO.KV_BUILD_BUILDERS",
        "$JS.API.STREAM.MSG.GET.BUILD_REQUESTS",
        "$JS.API.STREAM.MSG.GET.BUILD_EVENTS",
        "$JS.API.STREAM.MSG.GET.KV_BUILD_BUILDERS",
        "$JS.API.DIRECT.GET.KV_BUILD_BUILDERS.>",
        "$JS.API.STREAM.INFO.KV_BUILD_STATE",
        "$JS.API.DIRECT.GET.KV_BUILD_STATE",
        "$JS.API.DIRECT.GET.KV_BUILD_STATE.>",
        "$JS.API.CONSUMER.INFO.BUILD_REQUESTS.*",
        "$JS.API.CONSUMER.CREATE.BUILD_EVENTS",
        "$JS.API.CONSUMER.INFO.BUILD_EVENTS.>",
        "$JS.API.CONSUMER.MSG.NEXT.BUILD_EVENTS.>",
        "$JS.API.CONSUMER.DELETE.BUILD_EVENTS.>",
        "$JS.API.CONSUMER.CREATE.KV_BUILD_BUILDERS",
        "$JS.API.CONSUMER.INFO.KV_BUILD_BUILDERS.>",
        "$JS.API.CONSUMER.MSG.NEXT.KV_BUILD_BUILDERS.>",
        "$JS.API.CONSUMER.DELETE.KV_BUILD_BUILDERS.>",
        "$JS.FC.>",
    ],
    subscribe: &["build.api.>", "_INBOX_builder.>"],
    allow_responses: true,
};

/// Why a credential could not be made or read. No variant holds a seed or a JWT.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("cannot read account signing key file {path}: {source}")]
    ReadSigningKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("account signing key file {path} holds {holds}, not an account seed (it starts with \"SA\"; `nsc edit account --sk generate` makes one, in ~/.local/share/nats/nsc/keys)")]
    NotAccountSeed { path: PathBuf, holds: &'static str },
    #[error("--account {given:?} is not an account public key (it starts with \"A\": `nsc describe account` shows it as Account ID)")]
    NotAccount { given: String },
    #[error("--ttl must be between 1 second and {max_days} days", max_days = MAX_TTL.as_secs() / 86_400)]
    Ttl,
    #[error("cannot write creds file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read creds file {path}: {source}")]
    ReadCreds {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("creds file {path} is not a NATS creds file: {why} (`homelab-deploy creds mint` writes one)")]
    BadCreds { path: PathBuf, why: &'static str },
    #[error("the account signing key cannot sign: it holds no seed")]
    Sign,
}

/// Longest lifetime a minted credential may have: the point is that it is short.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 86_400);

/// A minted credential. `Debug` shows neither the seed nor the JWT.
pub struct Minted {
    /// The user JWT (public: it holds no secret, but it is a bearer of the role with the seed).
    pub jwt: String,
    pub seed: Seed,
    /// Unix seconds after which the server refuses it.
    pub expires_at: u64,
}

impl std::fmt::Debug for Minted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minted")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Reads an account signing key (an account seed, `SA…`) from `path`.
pub fn read_account_signing_key(path: &Path) -> Result<KeyPair, MintError> {
    let text = std::fs::read_to_string(path).map_err(|source| MintError::ReadSigningKey {
        path: path.to_owned(),
        source,
    })?;
    match KeyPair::from_seed(text.trim()) {
        Ok(pair) if matches!(pair.key_pair_type(), KeyPairType::Account) => Ok(pair),
        _ => Err(MintError::NotAccountSeed {
            path: path.to_owned(),
            holds: describe(&text),
        }),
    }
}

/// Mints a user credential named `name` with `role`'s permissions for `account` (its public key,
/// `A…`), signed by `signing_key` (one of the account's signing keys, or its own key), that
/// expires `ttl` from now.
pub fn mint(
    role: &RolePermissions,
    account: &str,
    signing_key: &KeyPair,
    name: &str,
    ttl: Duration,
) -> Result<Minted, MintError> {
    let is_account = KeyPair::from_public_key(account)
        .is_ok_and(|pair| matches!(pair.key_pair_type(), KeyPairType::Account));
    if !is_account {
        return Err(MintError::NotAccount {
            given: account.chars().take(60).collect(),
        });
    }
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err(MintError::Ttl);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let expires_at = now + ttl.as_secs().max(1);
    let seed = Seed::generate();
    let user = KeyPair::from_seed(seed.expose()).map_err(|_| MintError::BadCreds {
        path: PathBuf::new(),
        why: "a fresh user seed did not parse",
    })?;
    let mut nats = serde_json::json!({
        "type": "user",
        "version": 2,
        "issuer_account": account,
        "pub": { "allow": role.publish },
        "sub": { "allow": role.subscribe },
        "subs": -1,
        "data": -1,
        "payload": -1,
    });
    if role.allow_responses {
        // Go's time.Duration: nanoseconds.
        nats["resp"] = serde_json::json!({ "max": 1, "ttl": RESPONSE_TTL.as_nanos() as u64 });
    }
    let jwt = encode_user_jwt(
        serde_json::json!({
            "iat": now,
            "exp": expires_at,
            "iss": signing_key.public_key(),
            "sub": user.public_key(),
            "name": name,
            "nats": nats,
        }),
        signing_key,
    )?;
    Ok(Minted {
        jwt,
        seed,
        expires_at,
    })
}

/// Signs `claims` as a NATS JWT: header and claims in base64url, the claims' `jti` a hash of
/// the claims without it (as the Go `jwt` library makes it), signed by `signing_key`.
fn encode_user_jwt(
    mut claims: serde_json::Value,
    signing_key: &KeyPair,
) -> Result<String, MintError> {
    use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
    use sha2::Digest;
    claims["jti"] = serde_json::Value::String(String::new());
    let hash = sha2::Sha256::digest(claims.to_string().as_bytes());
    claims["jti"] = serde_json::Value::String(BASE32_NOPAD.encode(&hash));
    let header = BASE64URL_NOPAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = BASE64URL_NOPAD.encode(claims.to_string().as_bytes());
    let signed = format!("{header}.{body}");
    let signature = signing_key
        .sign(signed.as_bytes())
        .map_err(|_| MintError::Sign)?;
    Ok(format!("{signed}.{}", BASE64URL_NOPAD.encode(&signature)))
}

/// The text of a `.creds` file, in the format every NATS client reads (`nats --creds`,
/// `async-nats`, `nsc generate creds`). It holds the seed: write it with mode 0600.
pub fn creds_text(minted: &Minted) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n",
        minted.jwt,
        minted.seed.expose()
    )
}

/// Writes `minted` to `path` as a creds file, mode 0600, replacing an older one atomically (a
/// builder reading it at a reconnect sees the old or the new file, never half of one).
pub fn write_creds_file(path: &Path, minted: &Minted) -> Result<(), MintError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let write_error = |source| MintError::Write {
        path: path.to_owned(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(write_error)?;
    file.write_all(creds_text(minted).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(write_error)?;
    std::fs::rename(&tmp, path).map_err(write_error)
}

/// Reads a creds file: the user JWT and its seed.
pub fn read_creds_file(path: &Path) -> Result<(String, Seed), MintError> {
    let text = std::fs::read_to_string(path).map_err(|source| MintError::ReadCreds {
        path: path.to_owned(),
        source,
    })?;
    let bad = |why| MintError::BadCreds {
        path: path.to_owned(),
        why,
    };
    let jwt = section(&text, "NATS USER JWT").ok_or_else(|| bad("no user JWT section"))?;
    let seed = section(&text, "USER NKEY SEED").ok_or_else(|| bad("no user seed section"))?;
    let seed = Seed::parse(seed).map_err(|_| bad("the seed section holds no user seed"))?;
    Ok((jwt.to_owned(), seed))
}

/// The first non-empty line after `-----BEGIN <name>-----`.
fn section<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let begin = format!("BEGIN {name}");
    let mut lines = text.lines().skip_while(|line| !line.contains(&begin));
    lines.next()?;
    lines
        .map(str::trim)
        .find(|line| !line.is_empty())
        .filter(|line| !line.starts_with('-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_creds_read_back_and_never_show_the_seed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let account = KeyPair::new_account();
        let signing = KeyPair::new_account();
        let minted = mint(
            &BUILDER,
            &account.public_key(),
            &signing,
            "ci",
            Duration::from_secs(3600),
        )
        .expect("minted");
        assert!(!format!("{minted:?}").contains(minted.seed.expose()));
        let path = dir.path().join("builder.creds");
        write_creds_file(&path, &minted).expect("written");
        let (jwt, seed) = read_creds_file(&path).expect("read back");
        assert_eq!(jwt, minted.jwt);
        assert_eq!(
            seed.public_key().expect("key"),
            minted.seed.public_key().expect("key")
        );
    }

    /// The builder role here and `BUILDER` in the shipped server config grant the same.
    #[test]
    fn builder_role_matches_the_shipped_server_config() {
        let conf = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../nats/prod.example.conf"),
        )
        .expect("nats/prod.example.conf");
        let block: Vec<&str> = conf
            .lines()
            .skip_while(|line| !line.starts_with("BUILDER = {"))
            .take_while(|line| *line != "}")
            .collect();
        let quoted = |lines: &[&str]| -> Vec<String> {
            lines
                .iter()
                .filter(|line| !line.trim_start().starts_with('#'))
                .flat_map(|line| line.split('"').skip(1).step_by(2))
                .map(str::to_owned)
                .collect()
        };
        let split = block
            .iter()
            .position(|line| line.trim_start().starts_with("subscribe"))
            .expect("subscribe in BUILDER");
        let responses = block
            .iter()
            .position(|line| line.trim() == "allow_responses = true");
        assert_eq!(quoted(&block[..split]), BUILDER.publish, "publish");
        assert_eq!(
            quoted(&block[split..responses.unwrap_or(block.len())]),
            BUILDER.subscribe,
            "subscribe"
        );
        assert_eq!(
            responses.is_some(),
            BUILDER.allow_responses,
            "allow_responses"
        );
    }

    #[test]
    fn wrong_inputs_are_refused_without_echoing_seeds() {
        let account = KeyPair::new_account();
        let user = KeyPair::new_user();
        let err = mint(
            &BUILDER,
            &user.public_key(),
            &account,
            "ci",
            Duration::from_secs(60),
        )
        .expect_err("a user key is no account");
        assert!(
            err.to_string().contains("not an account public key"),
            "{err}"
        );
        let err = mint(&BUILDER, &account.public_key(), &account, "ci", MAX_TTL * 2)
            .expect_err("too long");
        assert!(err.to_string().contains("--ttl"), "{err}");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sk");
        let user_seed = user.seed().expect("seed");
        std::fs::write(&path, &user_seed).expect("write");
        let err = read_account_signing_key(&path).expect_err("a user seed");
        assert!(err.to_string().contains("a user seed"), "{err}");
        assert!(!err.to_string().contains(&user_seed));
    }
}
