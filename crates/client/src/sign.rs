//! Signing build requests and cancels with the NKey seed the client connects with, so builders
//! know who sent them (`homelab_deploy_protocol::identity`, `docs/security.md`).

use async_nats::HeaderMap;
use homelab_deploy_credentials::SeedSource;
use homelab_deploy_protocol::identity::{
    encode_signature, signing_input, Purpose, KEY_HEADER, SIGNATURE_HEADER,
};

use crate::{ClientError, ConnectSettings};

/// Signs messages with the seed of a connection's settings. The seed is read again for each
/// signature, like at each (re)connect, so a rotated seed signs at once.
#[derive(Debug, Clone)]
pub struct Signer {
    source: SeedSource,
}

impl Signer {
    /// The signer of the seed `settings` connect with; `None` when they name no seed (then
    /// messages go unsigned, which builders with `require_signed` refuse).
    ///
    /// # Errors
    /// `$HOMELAB_DEPLOY_NKEY_SEED` holds something other than a user seed.
    pub fn for_settings(settings: &ConnectSettings) -> Result<Option<Self>, ClientError> {
        Ok(
            SeedSource::find(settings.nkey_file.as_deref(), settings.vault.as_ref())?
                .map(|source| Self { source }),
        )
    }

    /// The [`KEY_HEADER`] and [`SIGNATURE_HEADER`] headers of `payload` sent for `purpose`.
    ///
    /// # Errors
    /// The seed cannot be read, or no longer is a user seed.
    pub async fn headers(
        &self,
        purpose: Purpose<'_>,
        payload: &[u8],
    ) -> Result<HeaderMap, ClientError> {
        let seed = self.source.load().await?;
        let signature = seed.sign(&signing_input(purpose, payload))?;
        let mut headers = HeaderMap::new();
        headers.insert(KEY_HEADER, seed.public_key()?.as_str());
        headers.insert(SIGNATURE_HEADER, encode_signature(&signature).as_str());
        Ok(headers)
    }
}
