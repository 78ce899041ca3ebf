//! Signed identity: who asked for a build, or cancelled one, proven by the NKey that signed it.
//!
//! A client signs a [`signing_input`] with its NKey user seed (the one it connects with) and sends
//! the signature and its public key in the headers [`KEY_HEADER`] and [`SIGNATURE_HEADER`]. A
//! builder checks the signature with [`verify`] and looks the key up in its `[access]` table.
//! Why this and not one subject namespace per user: `docs/decisions/signed-identity.md`.
//!
//! The signed bytes are a fixed prefix, what the message is for ([`Purpose`]) and the payload
//! exactly as sent, so a signature over a build request cannot be replayed as a cancel, nor
//! for another repo or target (a subject mapping on the way, e.g. a tenant's import, changes the
//! subject the builder sees but not what was signed).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use nkeys::{KeyPair, KeyPairType};
use serde::{Deserialize, Serialize};

use crate::api::CANCEL_SUBJECT;
use crate::subject::{request_subject, shown};
use crate::{RepoName, Target};

/// Header with the signer's NKey user public key (`U…`, 56 characters).
pub const KEY_HEADER: &str = "Homelab-Key";
/// Header with the Ed25519 signature of [`signing_input`], unpadded URL-safe base64.
pub const SIGNATURE_HEADER: &str = "Homelab-Signature";

/// What a signed message asks for; part of the signed bytes.
#[derive(Debug, Clone, Copy)]
pub enum Purpose<'a> {
    /// A build request for `build.<repo>.<target>`.
    Build {
        repo: &'a RepoName,
        target: &'a Target,
    },
    /// A cancel request (`build.api.v1.cancel`, also when a builder forwards it).
    Cancel,
}

/// The bytes a client signs and a builder verifies:
/// `homelab-deploy-signature-v1\n<subject>\n<payload>`, where `<subject>` is the request subject
/// `build.<repo>.<target>` of a build request, or `build.api.v1.cancel` of a cancel.
pub fn signing_input(purpose: Purpose<'_>, payload: &[u8]) -> Vec<u8> {
    let subject = match purpose {
        Purpose::Build { repo, target } => request_subject(repo, target),
        Purpose::Cancel => CANCEL_SUBJECT.to_owned(),
    };
    let mut input = Vec::with_capacity(SIGNING_PREFIX.len() + subject.len() + payload.len() + 2);
    input.extend_from_slice(SIGNING_PREFIX.as_bytes());
    input.push(b'\n');
    input.extend_from_slice(subject.as_bytes());
    input.push(b'\n');
    input.extend_from_slice(payload);
    input
}

const SIGNING_PREFIX: &str = "homelab-deploy-signature-v1";

/// Encodes a raw Ed25519 signature for [`SIGNATURE_HEADER`].
pub fn encode_signature(signature: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(signature)
}

/// A verified signer, as events and API replies show it: the public key that signed, and the
/// user name the builder's `[access]` table gives that key (absent for a key it does not list,
/// which only a builder with `require_signed = false` accepts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{name} ({})", self.key),
            None => write!(f, "unlisted key {}", self.key),
        }
    }
}

/// Why a signature was not accepted. Never holds more of the header values than [`shown`] lets
/// through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("header {KEY_HEADER} is {0}, not an NKey user public key (U…)")]
    NotUserKey(String),
    #[error("header {SIGNATURE_HEADER} is not unpadded URL-safe base64")]
    NotBase64,
    #[error("the signature in {SIGNATURE_HEADER} does not match the message and key {0}: it was signed for another subject or payload, or with another key")]
    Mismatch(String),
    #[error("header {0} is given without {1}: a signed message has both")]
    HalfSigned(&'static str, &'static str),
}

/// Checks that `signature` (the [`SIGNATURE_HEADER`] value) is `key`'s signature of `input`.
///
/// # Errors
/// The key is not a user public key, the signature is not base64, or it does not match.
pub fn verify(key: &str, signature: &str, input: &[u8]) -> Result<(), SignatureError> {
    let pair = KeyPair::from_public_key(key)
        .ok()
        .filter(|pair| matches!(pair.key_pair_type(), KeyPairType::User))
        .ok_or_else(|| SignatureError::NotUserKey(shown(key)))?;
    let raw = URL_SAFE_NO_PAD
        .decode(signature.trim())
        .map_err(|_| SignatureError::NotBase64)?;
    pair.verify(input, &raw)
        .map_err(|_| SignatureError::Mismatch(key.to_owned()))
}

/// The key and signature headers of a message, both or neither.
///
/// # Errors
/// [`SignatureError::HalfSigned`] when only one of them is there.
pub fn signature_headers<'a>(
    key: Option<&'a str>,
    signature: Option<&'a str>,
) -> Result<Option<(&'a str, &'a str)>, SignatureError> {
    match (key, signature) {
        (Some(key), Some(signature)) => Ok(Some((key, signature))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(SignatureError::HalfSigned(KEY_HEADER, SIGNATURE_HEADER)),
        (None, Some(_)) => Err(SignatureError::HalfSigned(SIGNATURE_HEADER, KEY_HEADER)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(pair: &KeyPair, input: &[u8]) -> String {
        encode_signature(&pair.sign(input).expect("sign"))
    }

    #[test]
    fn a_signature_verifies_only_for_its_subject_and_payload() {
        let pair = KeyPair::new_user();
        let repo = RepoName::parse("demo").expect("repo");
        let web = Target::parse("web").expect("target");
        let db = Target::parse("db").expect("target");
        let payload = br#"{"id":"REQUEST01"}"#;
        let input = signing_input(
            Purpose::Build {
                repo: &repo,
                target: &web,
            },
            payload,
        );
        let signature = sign(&pair, &input);
        verify(&pair.public_key(), &signature, &input).expect("verifies");
        let other_target = signing_input(
            Purpose::Build {
                repo: &repo,
                target: &db,
            },
            payload,
        );
        assert!(verify(&pair.public_key(), &signature, &other_target).is_err());
        let as_cancel = signing_input(Purpose::Cancel, payload);
        assert!(verify(&pair.public_key(), &signature, &as_cancel).is_err());
        let other_payload = signing_input(
            Purpose::Build {
                repo: &repo,
                target: &web,
            },
            br#"{"id":"REQUEST02"}"#,
        );
        assert!(verify(&pair.public_key(), &signature, &other_payload).is_err());
        let other_key = KeyPair::new_user().public_key();
        assert!(matches!(
            verify(&other_key, &signature, &input),
            Err(SignatureError::Mismatch(_))
        ));
    }

    #[test]
    fn bad_headers_are_named() {
        let account = KeyPair::new_account().public_key();
        assert!(matches!(
            verify(&account, "AAAA", b"x"),
            Err(SignatureError::NotUserKey(_))
        ));
        let user = KeyPair::new_user().public_key();
        assert_eq!(
            verify(&user, "not base64!", b"x"),
            Err(SignatureError::NotBase64)
        );
        assert!(signature_headers(Some("U"), None).is_err());
        assert!(signature_headers(None, Some("s")).is_err());
        assert_eq!(signature_headers(None, None), Ok(None));
    }
}
