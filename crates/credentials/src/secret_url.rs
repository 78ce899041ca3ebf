//! URLs that may carry credentials (`https://deploy:TOKEN@git.example.org/…`,
//! `nats://user:password@nats1:4222`), and scrubbing credentials out of text that other programs
//! print (nix, git).
//!
//! A [`SecretUrl`] shows the user-info part of its URL as `***` in `Display` and `Debug`; only
//! [`SecretUrl::expose`] hands out the URL itself, for the one call that needs it (git, nix,
//! the NATS connection). [`Redactor`] scrubs text a child process printed: every `scheme://
//! user:password@` it finds, and the configured secrets wherever they stand (nix prints a store
//! URI as it was given, in quotes that a password may contain too).
//!
//! What stays readable: the user of an `ssh://` (`git+ssh://`, `ssh-ng://`) URL, which names an
//! account (`git@`, `nix@`) rather than a credential: SSH authenticates with keys. Every other
//! scheme's user is shown as `***` too, since `https://TOKEN@host` and `nats://TOKEN@host` put the
//! token there.

use std::fmt;

use percent_encoding::percent_decode_str;
use serde::{Deserialize, Deserializer};

/// What replaces a credential in anything shown.
pub const REDACTED: &str = "***";

/// Secrets shorter than this are not replaced wherever they stand in a text (a one-letter
/// password would blot out every such letter); they are still replaced inside URLs.
const MIN_LITERAL_LEN: usize = 4;

/// A URL, or a comma-separated list of URLs (the NATS server list), that may carry credentials.
/// `Display` and `Debug` never show them.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

/// The user-info part of a URL, percent-decoded.
#[derive(Clone, PartialEq, Eq)]
pub struct UrlCredentials {
    /// The user, or the whole token of a `scheme://TOKEN@host` URL.
    pub user: String,
    pub password: Option<String>,
}

impl fmt::Debug for UrlCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UrlCredentials(<redacted>)")
    }
}

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL itself, credentials included: only for the program that connects with it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL as it may be shown: credentials replaced by `***`.
    pub fn redacted(&self) -> String {
        self.0
            .split(',')
            .map(redact_one)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Whether the URL carries credentials (a password, or a user outside `ssh://`).
    pub fn has_credentials(&self) -> bool {
        self.redacted() != self.0
    }

    /// Each URL of a comma-separated list, as its own [`SecretUrl`].
    pub fn split_list(&self) -> Vec<SecretUrl> {
        self.0
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(SecretUrl::new)
            .collect()
    }

    /// The credentials of a single URL, decoded, and the URL without them; `None` when the URL
    /// has none. Parsed with the `url` crate (WHATWG rules, as async-nats parses server URLs).
    pub fn take_credentials(&self) -> Option<(UrlCredentials, String)> {
        let mut parsed = url::Url::parse(self.0.trim()).ok()?;
        if parsed.username().is_empty() && parsed.password().is_none() {
            return None;
        }
        let decode = |text: &str| percent_decode_str(text).decode_utf8_lossy().into_owned();
        let credentials = UrlCredentials {
            user: decode(parsed.username()),
            password: parsed.password().map(decode),
        };
        parsed.set_username("").ok()?;
        parsed.set_password(None).ok()?;
        Some((credentials, parsed.to_string()))
    }

    /// Checks that every URL of the list parses and names a host; a URL without `://` is read
    /// with `default_scheme` (`nats` reads `host:4222` as `nats://host:4222`).
    ///
    /// # Errors
    /// [`UrlError`] for the first URL that does not, shown without its credentials.
    pub fn check_hosts(&self, default_scheme: &str) -> Result<(), UrlError> {
        let urls = self.split_list();
        if urls.is_empty() {
            return Err(UrlError::Empty);
        }
        for url in urls {
            let text = url.expose();
            // Shown with the scheme, so that `user:password@host` is read as credentials.
            let full = if text.contains("://") {
                url
            } else {
                SecretUrl::new(format!("{default_scheme}://{text}"))
            };
            match url::Url::parse(full.expose()) {
                Ok(parsed) if parsed.host_str().is_some_and(|host| !host.is_empty()) => {}
                Ok(_) => return Err(UrlError::NoHost { url: full }),
                Err(source) => return Err(UrlError::NotUrl { url: full, source }),
            }
        }
        Ok(())
    }

    /// The credentials of every URL in the list, in every spelling a program may print them
    /// (as written, and percent-decoded), for [`Redactor`].
    pub fn secrets(&self) -> Vec<String> {
        let mut secrets = Vec::new();
        for url in self.split_list() {
            let Some(userinfo) = userinfo_span(url.expose()) else {
                continue;
            };
            let (user, password) = match userinfo.split_once(':') {
                Some((user, password)) => (user, Some(password)),
                None => (userinfo, None),
            };
            let mut parts = vec![];
            if let Some(password) = password {
                parts.push(password);
            }
            if !is_ssh(url.expose()) {
                parts.push(user);
            }
            for part in parts.into_iter().filter(|part| !part.is_empty()) {
                secrets.push(part.to_owned());
                let decoded = percent_decode_str(part).decode_utf8_lossy().into_owned();
                if decoded != part {
                    secrets.push(decoded);
                }
            }
        }
        secrets
    }
}

/// Why [`SecretUrl::check_hosts`] refused a URL list; the URL is shown without its credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("no URL given")]
    Empty,
    #[error("\"{url}\" names no host")]
    NoHost { url: SecretUrl },
    #[error("\"{url}\" is not a URL: {source}")]
    NotUrl {
        url: SecretUrl,
        source: url::ParseError,
    },
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({:?})", self.redacted())
    }
}

impl From<String> for SecretUrl {
    fn from(url: String) -> Self {
        Self(url)
    }
}

impl<'de> Deserialize<'de> for SecretUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self)
    }
}

/// Whether `url` is an SSH URL (`ssh://`, `git+ssh://`, `ssh-ng://`), whose user is an account.
fn is_ssh(url: &str) -> bool {
    url.split("://").next().is_some_and(|scheme| {
        scheme
            .rsplit('+')
            .next()
            .is_some_and(|s| s.starts_with("ssh"))
    })
}

/// The user-info part of the single URL `url`: between `://` and the last `@` before the
/// path, query or fragment. Stricter than [`authority_of`]: a URL given as one value may hold
/// anything in its password, spaces included.
fn userinfo_span(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    authority.rfind('@').map(|at| &authority[..at])
}

/// One URL given as a value, with its credentials replaced (see [`redact_urls`] for which).
fn redact_one(url: &str) -> String {
    match userinfo_span(url) {
        Some(userinfo) => {
            let start = url.find("://").map_or(0, |i| i + 3);
            let shown = match userinfo.split_once(':') {
                Some((user, _)) if is_ssh(url) => format!("{user}:{REDACTED}"),
                _ if is_ssh(url) => userinfo.to_owned(),
                _ => REDACTED.to_owned(),
            };
            format!("{}{shown}{}", &url[..start], &url[start + userinfo.len()..])
        }
        None => redact_urls(url),
    }
}

/// The authority at the start of `rest` (the text after `://`): up to the first `/`, `?` or
/// `#`, or to the end of the word. Quotes do not end it, so a password holding `'` is still
/// inside.
fn authority_of(rest: &str) -> &str {
    let end = rest
        .find(|c: char| c.is_whitespace() || matches!(c, '/' | '?' | '#' | '"' | '<' | '>' | '`'))
        .unwrap_or(rest.len());
    &rest[..end]
}

/// Replaces the credentials of every URL in `text` by `***` (the user of an `ssh` URL stays,
/// its password does not).
///
/// Hand-written rather than the `url` crate: this reads free text (nix's and git's messages,
/// URLs in quotes and sentences), which a URL parser refuses as a whole.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        let scheme_start = rest[..pos]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |i| i + 1);
        let ssh = is_ssh(&rest[scheme_start..]);
        let (head, tail) = rest.split_at(pos + 3);
        out.push_str(head);
        let authority = authority_of(tail);
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.split_once(':') {
                    Some((user, _)) if ssh => {
                        out.push_str(user);
                        out.push(':');
                        out.push_str(REDACTED);
                    }
                    _ if ssh => out.push_str(userinfo),
                    _ => out.push_str(REDACTED),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[authority.len()..];
    }
    out.push_str(rest);
    out
}

/// Scrubs known secrets and URL credentials out of text a child process printed.
#[derive(Clone, Default)]
pub struct Redactor {
    /// Longest first, so a secret that contains another is replaced whole.
    secrets: Vec<String>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redactor({} secrets)", self.secrets.len())
    }
}

impl Redactor {
    /// A redactor for the credentials of `urls`, plus `others` (e.g. tokens read from files).
    pub fn new<'a>(
        urls: impl IntoIterator<Item = &'a SecretUrl>,
        others: impl IntoIterator<Item = String>,
    ) -> Self {
        let mut secrets: Vec<String> = urls
            .into_iter()
            .flat_map(SecretUrl::secrets)
            .chain(others)
            .filter(|secret| secret.len() >= MIN_LITERAL_LEN)
            .collect();
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        secrets.dedup();
        Self { secrets }
    }

    /// `text` with every known secret and every URL credential replaced by `***`.
    pub fn redact(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for secret in &self.secrets {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), REDACTED);
            }
        }
        redact_urls(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_debug_hide_credentials() {
        for (url, shown) in [
            (
                "git+https://deploy:TOKEN123@git.example.org/x.git",
                "git+https://***@git.example.org/x.git",
            ),
            (
                "https://ghp_TOKEN123@github.com/o/r",
                "https://***@github.com/o/r",
            ),
            (
                "nats://u:p4ss'w@nats1:4222,nats://u:p4ss'w@nats2:4222",
                "nats://***@nats1:4222,nats://***@nats2:4222",
            ),
            ("git+ssh://git@host:2222/o/r", "git+ssh://git@host:2222/o/r"),
            ("ssh-ng://nix:PASS1234@cache", "ssh-ng://nix:***@cache"),
            ("file:///srv/repo", "file:///srv/repo"),
            // Not a valid URL at all: still nothing after the scheme's user info shows.
            ("https://de ploy:TOK EN@x", "https://***@x"),
        ] {
            let url = SecretUrl::new(url);
            assert_eq!(url.to_string(), shown);
            assert_eq!(format!("{url:?}"), format!("SecretUrl({shown:?})"));
        }
    }

    #[test]
    fn a_quote_in_the_password_does_not_end_the_redaction() {
        let text = "error: unable to download 'http://cache:PU'SH%20PASS@127.0.0.1:1/c/nix-cache-info': Couldn't connect";
        assert_eq!(
            redact_urls(text),
            "error: unable to download 'http://***@127.0.0.1:1/c/nix-cache-info': Couldn't connect"
        );
        assert_eq!(
            redact_urls("fetch https://bot:s3cret@git.example.org/x.git failed"),
            "fetch https://***@git.example.org/x.git failed"
        );
        assert_eq!(
            redact_urls("s3://bucket?endpoint=http://k:SEC@127.0.0.1:1"),
            "s3://bucket?endpoint=http://***@127.0.0.1:1"
        );
    }

    #[test]
    fn known_secrets_are_scrubbed_wherever_they_stand() {
        let url = SecretUrl::new("http://cache:PU'SH%20PASS@127.0.0.1:1/c");
        assert_eq!(url.secrets(), vec!["PU'SH%20PASS", "PU'SH PASS", "cache"]);
        let redactor = Redactor::new([&url], ["tok-from-file".to_owned()]);
        assert_eq!(
            redactor.redact("password PU'SH PASS refused; tok-from-file; user cache"),
            "password *** refused; ***; user ***"
        );
        assert!(format!("{redactor:?}").starts_with("Redactor("));
    }

    #[test]
    fn check_errors_show_no_credentials() {
        let err = SecretUrl::new("deploy:pw'1234@")
            .check_hosts("nats")
            .expect_err("no host")
            .to_string();
        assert!(err.contains("\"nats://***@\" is not a URL"), "{err}");
        assert!(!err.contains("pw'1234"), "{err}");
        assert!(SecretUrl::new("nats://a:4222, b:4222")
            .check_hosts("nats")
            .is_ok());
        assert_eq!(
            SecretUrl::new(" , ").check_hosts("nats"),
            Err(UrlError::Empty)
        );
    }

    #[test]
    fn credentials_are_taken_out_for_the_connection() {
        let (credentials, bare) = SecretUrl::new("nats://deploy:p%40ss@127.0.0.1:4222")
            .take_credentials()
            .expect("credentials");
        assert_eq!(credentials.user, "deploy");
        assert_eq!(credentials.password.as_deref(), Some("p@ss"));
        assert_eq!(bare, "nats://127.0.0.1:4222");
        assert!(!format!("{credentials:?}").contains("p@ss"));
        let (token, _) = SecretUrl::new("nats://s3cr3t@h:4222")
            .take_credentials()
            .expect("token");
        assert_eq!((token.user.as_str(), token.password), ("s3cr3t", None));
        assert!(SecretUrl::new("nats://h:4222").take_credentials().is_none());
    }
}
