//! The dashboard's session cookie: what the page trades its token for,
//! since a browser's `EventSource` cannot send an `Authorization` header
//! and a token in the feed's URL would land in access logs.
//!
//! The cookie is not the token: `{token's place in the config}.{expiry,
//! unix seconds}.{MAC}` (the place a hint: a token that moved when one
//! above it was removed is found by the MAC), the MAC an HMAC-SHA256 over
//! the token's SHA-256
//! and the expiry under a key of this broker's (`dashboard.key` in
//! `server.state_dir`, made when the HTTP port starts; drawn per run without a state
//! directory, so sessions then end at a restart). So it opens the event
//! feed and nothing else (it is no gRPC credential), names no secret, and
//! ends when its token is removed or replaced, when it expires, or when
//! the key file is deleted. Each feed opened with it renews it.

use crate::auth::{Authenticator, Principal};
use crate::clock::unix_secs as unix_now;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use std::path::Path;
use std::time::Duration;

/// How long a session lasts without a feed opened with it.
pub(crate) const SESSION_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// The key's file in `server.state_dir`.
pub(crate) const KEY_FILE: &str = "dashboard.key";

/// Issues and checks session cookies.
pub(crate) struct Sessions {
    /// `None` when no key could be read or drawn: no session is issued or
    /// accepted (a fixed key would let anyone forge one).
    key: Option<hmac::Key>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").finish_non_exhaustive()
    }
}

impl Sessions {
    /// With the key in `state_dir` (made if missing), or one drawn now.
    pub(crate) fn new(state_dir: Option<&Path>) -> Sessions {
        let bytes = state_dir
            .and_then(|dir| match stored_key(&dir.join(KEY_FILE)) {
                Ok(k) => Some(k),
                Err(e) => {
                    tracing::warn!(error = %e, dir = %dir.display(),
                        "cannot keep the dashboard's session key in server.state_dir; \
                         sessions end at a restart");
                    None
                }
            })
            .or_else(|| match random() {
                Ok(k) => Some(k),
                Err(e) => {
                    tracing::error!(error = %e,
                        "cannot make a key for the dashboard's sessions: the dashboard \
                         refuses to open its live feed until the broker is restarted");
                    None
                }
            });
        Sessions {
            key: bytes.map(|b| hmac::Key::new(hmac::HMAC_SHA256, &b)),
        }
    }

    /// Whether sessions can be issued at all (see [`Sessions::key`]).
    pub(crate) fn available(&self) -> bool {
        self.key.is_some()
    }

    /// A cookie value for the token at `index` whose hash is `hash`; `None`
    /// without a key.
    pub(crate) fn issue(&self, index: usize, hash: &[u8; 32]) -> Option<String> {
        let key = self.key.as_ref()?;
        let expires = unix_now().saturating_add(SESSION_TTL.as_secs());
        let tag = hmac::sign(key, &message(hash, expires));
        Some(format!("{index}.{expires}.{}", hex::encode(tag.as_ref())))
    }

    /// The caller a cookie value stands for, if it is one of ours, has not
    /// expired, and its token is still in force.
    pub(crate) fn check(&self, value: &str, auth: &Authenticator) -> Option<Principal> {
        let key = self.key.as_ref()?;
        let mut parts = value.splitn(3, '.');
        let index: usize = parts.next()?.parse().ok()?;
        let expires: u64 = parts.next()?.parse().ok()?;
        let tag = hex::decode(parts.next()?).ok()?;
        if expires <= unix_now() {
            return None;
        }
        let signed = |i: usize| {
            let (who, hash) = auth.token_at(i)?;
            hmac::verify(key, &message(&hash, expires), &tag).ok()?;
            Some(who)
        };
        // The place is a hint: a token removed or added above this one (a
        // rotation) moved it, and the MAC says which token it is.
        signed(index).or_else(|| {
            (0..auth.token_places())
                .filter(|&i| i != index)
                .find_map(signed)
        })
    }
}

fn message(hash: &[u8; 32], expires: u64) -> Vec<u8> {
    let mut m = b"quota-broker dashboard session\0".to_vec();
    m.extend_from_slice(hash);
    m.extend_from_slice(&expires.to_be_bytes());
    m
}

fn random() -> Result<[u8; 32], String> {
    let mut key = [0u8; 32];
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| "the system's random source failed".to_owned())?;
    Ok(key)
}

/// The key in `path`, made (readable by this user only) if missing.
fn stored_key(path: &Path) -> Result<[u8; 32], String> {
    match std::fs::read(path) {
        Ok(bytes) => bytes
            .try_into()
            .map_err(|_| format!("{} is not a 32-byte key: delete it", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // In cluster mode nothing else made the directory.
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            }
            let key = random()?;
            write_private(path, &key).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn write_private(path: &Path, key: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(path)?;
    f.write_all(key)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::TokenSettings;

    fn auth(tokens: &[(&str, &str)]) -> Authenticator {
        let toml: String = tokens
            .iter()
            .map(|(name, token)| {
                format!(
                    "[[auth.tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\nrole = \"client\"\n\
                     tenants = [\"t\"]\n",
                    crate::auth::hash_token(token)
                )
            })
            .collect();
        let settings = crate::config::Settings::from_toml(&format!(
            "[server]\nstate_dir = \"\"\n{toml}[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\n\
             name = \"b\"\nroutes = [\"* /**\"]\nmax_in_flight = 1\n"
        ))
        .unwrap();
        let tokens: Vec<TokenSettings> = settings.tokens.clone();
        Authenticator::new(tokens)
    }

    #[test]
    fn a_cookie_stands_for_its_token_until_the_token_changes() {
        let top = std::env::temp_dir().join(format!("qb-session-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&top);
        // A state directory nothing made yet (cluster mode): made.
        let dir = top.join("state");
        let sessions = Sessions::new(Some(&dir));
        assert!(dir.join(KEY_FILE).is_file());
        let a = auth(&[("wallboard", "secret-1"), ("ops", "secret-2")]);
        let (_, hash) = a.token_at(1).unwrap();
        let cookie = sessions.issue(1, &hash).unwrap();
        assert!(!cookie.contains("secret"), "{cookie}");
        assert_eq!(sessions.check(&cookie, &a).unwrap().name(), "ops");
        // The same key after a restart (kept in the state directory).
        assert!(Sessions::new(Some(&dir)).check(&cookie, &a).is_some());
        // Tampered, for another token, the token replaced, another key.
        // Its place changed to another token's: still only its own token
        // (the place is a hint, the MAC names the token).
        let forged = cookie.replacen("1.", "0.", 1);
        assert_eq!(sessions.check(&forged, &a).unwrap().name(), "ops");
        let other = if cookie.ends_with('0') { '1' } else { '0' };
        let tampered = format!("{}{other}", &cookie[..cookie.len() - 1]);
        assert!(sessions.check(&tampered, &a).is_none());
        let replaced = auth(&[("wallboard", "secret-1"), ("ops", "secret-3")]);
        assert!(sessions.check(&cookie, &replaced).is_none());
        // The token moved (one above it removed, another added above it):
        // still its session, and no other token's.
        let moved = auth(&[("ops", "secret-2")]);
        assert_eq!(sessions.check(&cookie, &moved).unwrap().name(), "ops");
        let shifted = auth(&[("new", "secret-9"), ("a", "secret-1"), ("ops", "secret-2")]);
        assert_eq!(sessions.check(&cookie, &shifted).unwrap().name(), "ops");
        let (_, wallboard) = a.token_at(0).unwrap();
        let wallboard_cookie = sessions.issue(0, &wallboard).unwrap();
        assert_eq!(
            sessions.check(&wallboard_cookie, &shifted).unwrap().name(),
            "a"
        );
        assert!(Sessions::new(None).check(&cookie, &a).is_none());
        // Expired.
        let past = unix_now() - 1;
        let tag = hmac::sign(sessions.key.as_ref().unwrap(), &message(&hash, past));
        let expired = format!("1.{past}.{}", hex::encode(tag.as_ref()));
        assert!(sessions.check(&expired, &a).is_none());
        for junk in ["", "1", "1.2", "x.y.z", "1.1.00"] {
            assert!(sessions.check(junk, &a).is_none(), "{junk}");
        }
        let _ = std::fs::remove_dir_all(&top);
    }

    #[test]
    fn without_a_key_no_session_is_issued_or_accepted() {
        let a = auth(&[("wallboard", "secret-1")]);
        let (_, hash) = a.token_at(0).unwrap();
        let keyless = Sessions { key: None };
        assert!(!keyless.available());
        assert!(keyless.issue(0, &hash).is_none());
        // Not even one made under a key of zeros, what a default would be.
        let expires = unix_now() + 3600;
        let zeros = hmac::Key::new(hmac::HMAC_SHA256, &[0u8; 32]);
        let tag = hmac::sign(&zeros, &message(&hash, expires));
        let forged = format!("0.{expires}.{}", hex::encode(tag.as_ref()));
        assert!(keyless.check(&forged, &a).is_none());
        assert!(Sessions::new(None).available());
    }
}
