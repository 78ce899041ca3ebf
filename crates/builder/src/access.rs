//! Who may ask for a build or cancel one: the signed identity of a message
//! ([`homelab_deploy_protocol::identity`]) checked against the `[access]` table of the builder's
//! config.
//!
//! With `require_signed = true`, every build request and cancel must be signed by a listed user;
//! a deployer builds only its `repos` (every repo when it lists none) and cancels only the builds
//! it requested; an admin builds and cancels anything. With `require_signed = false` (the default,
//! for migrating a fleet), a valid signature is still verified and shown in events, but nothing is
//! refused except a signature that does not verify. Every builder of a fleet needs the same table:
//! any of them may answer a cancel.

use std::collections::{BTreeMap, HashMap};

use async_nats::HeaderMap;
use homelab_deploy_protocol::identity::{
    signature_headers, signing_input, verify, Purpose, SignatureError, KEY_HEADER, SIGNATURE_HEADER,
};
use homelab_deploy_protocol::{Identity, RepoName, Target};
use serde::Deserialize;

/// The `[access]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// Refuse unsigned build requests and cancels, and those of keys not in `users`.
    #[serde(default)]
    pub require_signed: bool,
    /// Known users by name (`[access.users.alice]`).
    #[serde(default)]
    pub users: BTreeMap<String, UserConfig>,
}

/// One `[access.users.NAME]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// The NKey user public key (`U…`) the user connects and signs with.
    pub key: String,
    #[serde(default)]
    pub role: Role,
    /// Repos a deployer may build; absent means every repo. Not allowed for an admin.
    #[serde(default)]
    pub repos: Option<Vec<String>>,
}

/// What a listed user may do when signatures are required.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Builds its repos; cancels its own builds.
    #[default]
    Deployer,
    /// Builds every repo; cancels any build.
    Admin,
}

impl AccessConfig {
    /// Checks each user's key and that names are usable; returns the offending key path and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let mut seen: HashMap<&str, &str> = HashMap::new();
        for (name, user) in &self.users {
            let at = |field: &str| format!("access.users.{name}.{field}");
            if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
                return Err((
                    format!("access.users.{name}"),
                    "a user name is 1 to 64 printable characters".to_owned(),
                ));
            }
            if !is_user_key(&user.key) {
                return Err((
                    at("key"),
                    format!(
                        "is {}, not an NKey user public key (U…, 56 characters; `homelab-deploy nkey public --seed-file FILE` prints it)",
                        homelab_deploy_credentials::describe(&user.key)
                    ),
                ));
            }
            if let Some(other) = seen.insert(&user.key, name) {
                return Err((at("key"), format!("is also the key of user {other}")));
            }
            for repo in user.repos.iter().flatten() {
                if let Err(err) = RepoName::parse(repo) {
                    return Err((at("repos"), err.to_string()));
                }
            }
            if user.role == Role::Admin && user.repos.is_some() {
                return Err((
                    at("repos"),
                    "an admin builds every repo; drop repos or make the user a deployer".to_owned(),
                ));
            }
        }
        Ok(())
    }
}

fn is_user_key(key: &str) -> bool {
    nkeys::KeyPair::from_public_key(key)
        .is_ok_and(|pair| matches!(pair.key_pair_type(), nkeys::KeyPairType::User))
}

/// The `[access]` table, looked up by key.
#[derive(Debug, Default)]
pub struct Access {
    require_signed: bool,
    users: HashMap<String, User>,
}

#[derive(Debug)]
struct User {
    name: String,
    role: Role,
    repos: Option<Vec<String>>,
}

/// Why `[access]` refuses a request or a cancel; the text goes to the sender (a `finished`
/// event's error, or the API's `forbidden` reply), so it says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Signature headers that are malformed or do not verify.
    #[error("refused: {0}")]
    Signature(#[from] SignatureError),
    #[error("refused: the message is not signed, and this fleet requires signed requests ([access] require_signed); send it with homelab-deploy (which signs with its --nkey-file) or sign it as docs/protocol.md says ({KEY_HEADER} and {SIGNATURE_HEADER} headers)")]
    Unsigned,
    #[error("refused: key {key} is not a user in the builder's [access] table; an admin adds it under [access.users.NAME]")]
    UnknownKey { key: String },
    /// A deployer limited to `repos` asked for another repo.
    #[error("refused: user {user} may build only {repos} (its repos in the builder's [access] table), not {repo}")]
    RepoNotAllowed {
        user: String,
        /// The user's repos, comma-separated.
        repos: String,
        repo: String,
    },
    #[error("refused: the cancel is not signed by a listed user")]
    CancelByUnknown,
    /// A deployer cancelling a build someone else requested.
    #[error("refused: user {user} is a deployer and may cancel only its own builds; request {id} was requested by {owner}")]
    NotOwner {
        user: String,
        id: String,
        /// The requester, or "an unsigned request".
        owner: String,
    },
}

/// Who sent a message: the verified signer, or `None` for an unsigned message (accepted only
/// without `require_signed`).
pub type Sender = Option<Identity>;

impl Access {
    pub fn new(config: &AccessConfig) -> Self {
        Self {
            require_signed: config.require_signed,
            users: config
                .users
                .iter()
                .map(|(name, user)| {
                    (
                        user.key.clone(),
                        User {
                            name: name.clone(),
                            role: user.role,
                            repos: user.repos.clone(),
                        },
                    )
                })
                .collect(),
        }
    }

    /// Checks the signature of a message signed for `purpose` and finds its user.
    ///
    /// # Errors
    /// A message that must be refused, with why: a signature that does not verify (always),
    /// no signature or an unlisted key (with `require_signed`).
    pub fn sender(
        &self,
        headers: Option<&HeaderMap>,
        purpose: Purpose<'_>,
        payload: &[u8],
    ) -> Result<Sender, Refused> {
        let header = |name: &str| {
            headers
                .and_then(|headers| headers.get(name))
                .map(|value| value.as_str())
        };
        let signed = signature_headers(header(KEY_HEADER), header(SIGNATURE_HEADER))?;
        let Some((key, signature)) = signed else {
            return if self.require_signed {
                Err(Refused::Unsigned)
            } else {
                Ok(None)
            };
        };
        verify(key, signature, &signing_input(purpose, payload))?;
        let name = self.users.get(key).map(|user| user.name.clone());
        if name.is_none() && self.require_signed {
            return Err(Refused::UnknownKey {
                key: key.to_owned(),
            });
        }
        Ok(Some(Identity {
            key: key.to_owned(),
            name,
        }))
    }

    /// Checks that a build request of `repo` and `target` may be built, and says who sent it.
    ///
    /// # Errors
    /// Why it is refused ([`Access::sender`], or a deployer asking for a repo not among its
    /// `repos`).
    pub fn build_request(
        &self,
        headers: Option<&HeaderMap>,
        repo: &RepoName,
        target: &Target,
        payload: &[u8],
    ) -> Result<Sender, Refused> {
        let sender = self.sender(headers, Purpose::Build { repo, target }, payload)?;
        if self.require_signed {
            if let Some(user) = self.user(sender.as_ref()) {
                if let Some(repos) = &user.repos {
                    if !repos.iter().any(|allowed| allowed == repo.as_str()) {
                        return Err(Refused::RepoNotAllowed {
                            user: user.name.clone(),
                            repos: repos.join(", "),
                            repo: repo.to_string(),
                        });
                    }
                }
            }
        }
        Ok(sender)
    }

    /// Checks that `sender` (from [`Access::sender`]) may cancel a build that `owner` requested
    /// (`None`: unsigned).
    ///
    /// # Errors
    /// Why not: with `require_signed`, a deployer cancels only its own builds.
    pub fn may_cancel(
        &self,
        sender: Option<&Identity>,
        owner: Option<&Identity>,
        id: &str,
    ) -> Result<(), Refused> {
        if !self.require_signed {
            return Ok(());
        }
        let Some(user) = self.user(sender) else {
            // `sender` checked it: with require_signed every sender is a listed user.
            return Err(Refused::CancelByUnknown);
        };
        let own = owner.is_some_and(|owner| sender.is_some_and(|me| me.key == owner.key));
        if user.role == Role::Admin || own {
            return Ok(());
        }
        Err(Refused::NotOwner {
            user: user.name.clone(),
            id: id.to_owned(),
            owner: owner.map_or_else(|| "an unsigned request".to_owned(), ToString::to_string),
        })
    }

    fn user(&self, sender: Option<&Identity>) -> Option<&User> {
        self.users.get(&sender?.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use homelab_deploy_protocol::identity::encode_signature;

    fn signed(pair: &nkeys::KeyPair, purpose: Purpose<'_>, payload: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(KEY_HEADER, pair.public_key().as_str());
        let signature = pair.sign(&signing_input(purpose, payload)).expect("signs");
        headers.insert(SIGNATURE_HEADER, encode_signature(&signature).as_str());
        headers
    }

    fn access(
        require_signed: bool,
        users: &[(&str, &nkeys::KeyPair, Role, Option<&str>)],
    ) -> Access {
        let config = AccessConfig {
            require_signed,
            users: users
                .iter()
                .map(|(name, pair, role, repos)| {
                    (
                        (*name).to_owned(),
                        UserConfig {
                            key: pair.public_key(),
                            role: *role,
                            repos: repos.map(|repo| vec![repo.to_owned()]),
                        },
                    )
                })
                .collect(),
        };
        config.validate().expect("valid");
        Access::new(&config)
    }

    #[test]
    fn deployers_build_their_repos_and_cancel_their_builds() {
        let (alice, bob, root) = (
            nkeys::KeyPair::new_user(),
            nkeys::KeyPair::new_user(),
            nkeys::KeyPair::new_user(),
        );
        let access = access(
            true,
            &[
                ("alice", &alice, Role::Deployer, Some("web")),
                ("bob", &bob, Role::Deployer, None),
                ("root", &root, Role::Admin, None),
            ],
        );
        let (web, ops) = (
            RepoName::parse("web").expect("repo"),
            RepoName::parse("ops").expect("repo"),
        );
        let all = Target::All;
        let payload = br#"{"id":"REQUEST01"}"#;
        let for_web = Purpose::Build {
            repo: &web,
            target: &all,
        };
        let for_ops = Purpose::Build {
            repo: &ops,
            target: &all,
        };
        let alice_web = access
            .build_request(Some(&signed(&alice, for_web, payload)), &web, &all, payload)
            .expect("alice builds web");
        assert_eq!(
            alice_web.as_ref().and_then(|i| i.name.as_deref()),
            Some("alice")
        );
        let refused = access
            .build_request(Some(&signed(&alice, for_ops, payload)), &ops, &all, payload)
            .expect_err("alice may not build ops");
        assert!(
            refused.to_string().contains("may build only web"),
            "{refused}"
        );
        // A signature made for web does not carry over to ops.
        assert!(access
            .build_request(Some(&signed(&bob, for_web, payload)), &ops, &all, payload)
            .is_err());
        assert!(access.build_request(None, &web, &all, payload).is_err());

        let cancel = br#"{"id":"REQUEST01"}"#;
        let sender = |pair| {
            access
                .sender(
                    Some(&signed(pair, Purpose::Cancel, cancel)),
                    Purpose::Cancel,
                    cancel,
                )
                .expect("verified")
        };
        let owner = alice_web.as_ref();
        access
            .may_cancel(sender(&alice).as_ref(), owner, "REQUEST01")
            .expect("own build");
        let refused = access
            .may_cancel(sender(&bob).as_ref(), owner, "REQUEST01")
            .expect_err("bob cancels alice's build");
        assert!(
            refused.to_string().contains("only its own builds"),
            "{refused}"
        );
        access
            .may_cancel(sender(&root).as_ref(), owner, "REQUEST01")
            .expect("admin cancels anything");
    }

    #[test]
    fn migration_mode_shows_identity_but_refuses_only_bad_signatures() {
        let (alice, stranger) = (nkeys::KeyPair::new_user(), nkeys::KeyPair::new_user());
        let access = access(false, &[("alice", &alice, Role::Deployer, Some("web"))]);
        let ops = RepoName::parse("ops").expect("repo");
        let all = Target::All;
        let for_ops = Purpose::Build {
            repo: &ops,
            target: &all,
        };
        let payload = b"";
        assert_eq!(access.build_request(None, &ops, &all, payload), Ok(None));
        let unlisted = access
            .build_request(
                Some(&signed(&stranger, for_ops, payload)),
                &ops,
                &all,
                payload,
            )
            .expect("unlisted key accepted");
        assert_eq!(unlisted.and_then(|i| i.name), None);
        let mut forged = signed(&stranger, for_ops, payload);
        forged.insert(KEY_HEADER, alice.public_key().as_str());
        let refused = access
            .build_request(Some(&forged), &ops, &all, payload)
            .expect_err("forged");
        assert!(refused.to_string().contains("does not match"), "{refused}");
    }

    #[test]
    fn config_errors_name_the_user() {
        let config: AccessConfig =
            toml::from_str("require_signed = true\n[users.alice]\nkey = \"SUAAA\"\n")
                .expect("parses");
        let (key, message) = config.validate().expect_err("bad key");
        assert_eq!(key, "access.users.alice.key");
        assert!(message.contains("not an NKey user public key"), "{message}");
    }
}
