//! NKey user seeds: where a client or builder gets one, checking that it is one, and keeping it
//! out of every log, error and `Debug` output.
//!
//! Sources, first that is set wins: a seed file (`--nkey-file`, `[nats] nkey_seed_file`), then
//! the environment variable `HOMELAB_DEPLOY_NKEY_SEED` (the seed itself, for CI secrets), then
//! Vault (the builder's `[vault]`, see [`vault`]). A seed file is read again at every connection,
//! so a rotated seed is used at the next reconnect. A `.creds` file (a user JWT and its seed,
//! [`jwt`]) is the other way in: short-lived credentials for NATS decentralized auth.

pub mod jwt;
pub mod secret_url;
pub mod vault;

pub use secret_url::{Redactor, SecretUrl, UrlError};

use std::fmt;
use std::path::{Path, PathBuf};

use nkeys::{KeyPair, KeyPairType};
use tracing::warn;

/// Environment variable holding a seed itself.
pub const SEED_ENV: &str = "HOMELAB_DEPLOY_NKEY_SEED";

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot read NKey seed file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("NKey seed file {path} holds {holds}, not a user seed (a user seed starts with \"SU\"; make one with `homelab-deploy nkey generate --out FILE`)")]
    NotUserSeed { path: PathBuf, holds: &'static str },
    #[error("${SEED_ENV} holds {holds}, not a user seed (a user seed starts with \"SU\")")]
    EnvNotUserSeed { holds: &'static str },
    #[error("cannot write NKey seed file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("signing the server's nonce failed: {0}")]
    Sign(String),
    #[error(transparent)]
    Vault(#[from] vault::VaultError),
    #[error(transparent)]
    Creds(#[from] jwt::MintError),
}

/// An NKey user seed. Neither `Debug` nor anything else prints it.
#[derive(Clone)]
pub struct Seed(String);

impl fmt::Debug for Seed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Seed(<redacted>)")
    }
}

impl Seed {
    /// A new random user seed.
    pub fn generate() -> Self {
        let pair = KeyPair::new_user();
        // A freshly made pair always has its seed.
        Self(pair.seed().unwrap_or_default())
    }

    /// Checks `text` is a user seed; says what it is otherwise (never echoing it).
    pub(crate) fn parse(text: &str) -> Result<Self, &'static str> {
        let text = text.trim();
        match KeyPair::from_seed(text) {
            Ok(pair) if matches!(pair.key_pair_type(), KeyPairType::User) => {
                Ok(Self(text.to_owned()))
            }
            _ => Err(describe(text)),
        }
    }

    fn pair(&self) -> Result<KeyPair, CredentialError> {
        KeyPair::from_seed(&self.0)
            .map_err(|_| CredentialError::Sign("the seed no longer parses".to_owned()))
    }

    /// The public key (`U…`), for the nats-server config.
    pub fn public_key(&self) -> Result<String, CredentialError> {
        Ok(self.pair()?.public_key())
    }

    /// Signs the server's connection nonce.
    pub fn sign(&self, nonce: &[u8]) -> Result<Vec<u8>, CredentialError> {
        self.pair()?
            .sign(nonce)
            .map_err(|err| CredentialError::Sign(err.to_string()))
    }

    /// The seed itself, for writing it to a file.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

/// What a piece of text is, in words, for an error message.
pub fn describe(text: &str) -> &'static str {
    let text = text.trim();
    if let Ok(pair) = KeyPair::from_seed(text) {
        return match pair.key_pair_type() {
            KeyPairType::User => "a user seed",
            KeyPairType::Account => "an account seed",
            KeyPairType::Operator => "an operator seed",
            KeyPairType::Server => "a server seed",
            KeyPairType::Cluster => "a cluster seed",
            _ => "a seed of another kind",
        };
    }
    if KeyPair::from_public_key(text).is_ok() {
        return "a public key";
    }
    "something that is not an NKey"
}

/// Where a seed comes from. Reading it again picks up a rotated seed.
#[derive(Debug, Clone)]
pub enum SeedSource {
    File(PathBuf),
    Env(Seed),
    Vault(vault::VaultSeed),
}

impl SeedSource {
    /// The first configured source: `file`, else `$HOMELAB_DEPLOY_NKEY_SEED`, else `vault`,
    /// else none.
    pub fn find(
        file: Option<&Path>,
        vault: Option<&vault::VaultSeed>,
    ) -> Result<Option<Self>, CredentialError> {
        if let Some(path) = file {
            return Ok(Some(Self::File(path.to_owned())));
        }
        match std::env::var(SEED_ENV) {
            Ok(value) if !value.trim().is_empty() => {
                let seed = Seed::parse(&value)
                    .map_err(|holds| CredentialError::EnvNotUserSeed { holds })?;
                Ok(Some(Self::Env(seed)))
            }
            _ => Ok(vault.cloned().map(Self::Vault)),
        }
    }

    /// The seed for a connection attempt (a file is read again; see [`vault::VaultSeed::current`]).
    pub async fn load(&self) -> Result<Seed, CredentialError> {
        match self {
            Self::Env(seed) => Ok(seed.clone()),
            Self::File(path) => read_seed_file(path),
            Self::Vault(vault) => Ok(vault.current().await?),
        }
    }

    /// The server refused the last seed: a Vault seed is fetched again at the next attempt.
    pub fn refused(&self) {
        if let Self::Vault(vault) = self {
            vault.refused();
        }
    }
}

/// Reads a user seed from `path`, warning when other users may read the file.
pub fn read_seed_file(path: &Path) -> Result<Seed, CredentialError> {
    let text = std::fs::read_to_string(path).map_err(|source| CredentialError::Read {
        path: path.to_owned(),
        source,
    })?;
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o004 != 0 {
            warn!(path = %path.display(), "NKey seed file is readable by every user; chmod 600 it");
        }
    }
    Seed::parse(&text).map_err(|holds| CredentialError::NotUserSeed {
        path: path.to_owned(),
        holds,
    })
}

/// Writes a new user seed to `path` (mode 0600, refusing to overwrite) and returns it.
pub fn generate_seed_file(path: &Path) -> Result<Seed, CredentialError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let write_error = |source| CredentialError::Write {
        path: path.to_owned(),
        source,
    };
    let seed = Seed::generate();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(write_error)?;
    writeln!(file, "{}", seed.expose()).map_err(write_error)?;
    Ok(seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_never_show_in_debug() {
        let seed = Seed::generate();
        assert_eq!(format!("{seed:?}"), "Seed(<redacted>)");
        assert!(!format!("{:?}", SeedSource::Env(seed.clone())).contains(seed.expose()));
        assert!(seed.public_key().expect("public key").starts_with('U'));
    }

    #[test]
    fn wrong_keys_are_named_without_echoing_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let account = KeyPair::new_account();
        let account_seed = account.seed().expect("seed");
        for (text, holds) in [
            (account_seed.as_str(), "an account seed"),
            (account.public_key().as_str(), "a public key"),
            ("hunter2", "something that is not an NKey"),
        ] {
            let path = dir.path().join("seed");
            std::fs::write(&path, text).expect("write");
            let err = read_seed_file(&path).expect_err("accepted");
            let message = err.to_string();
            assert!(
                message.contains(holds) && message.contains("seed"),
                "{message}"
            );
            assert!(!message.contains(text), "{message}");
        }
    }

    #[test]
    fn generated_file_is_private_and_reads_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("builder.nk");
        let seed = generate_seed_file(&path).expect("generate");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let read = read_seed_file(&path).expect("reads back");
        assert_eq!(
            read.public_key().expect("pk"),
            seed.public_key().expect("pk")
        );
        assert!(
            generate_seed_file(&path).is_err(),
            "overwrote an existing seed"
        );
        let signature = read.sign(b"nonce").expect("sign");
        let public = KeyPair::from_public_key(&seed.public_key().expect("pk")).expect("public");
        assert!(public.verify(b"nonce", &signature).is_ok());
    }
}
