//! Bearer-token authentication and tenant/role authorisation.
//!
//! Tokens are configured as `[[auth.tokens]]` entries holding the SHA-256 of
//! the token (never the token itself). [`RawToken::validate`] turns an entry
//! into [`TokenSettings`]; [`Authenticator`] hashes the bearer token a request
//! presents, looks the hash up and yields the [`Principal`] the request runs
//! as, which then answers "may this caller touch tenant X?" and "is it an
//! admin?". With no tokens configured the broker runs open: every request is
//! an anonymous admin (the server only allows that on loopback). Each token
//! also carries its own overload limits (requests per second, Watch
//! streams), which the gRPC layer enforces per [`Principal::token_index`].
//! Nothing here knows about tonic: the gRPC layer passes the `authorization`
//! metadata in and maps [`AuthError`] to a status code.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// A SHA-256 digest.
type Hash = [u8; 32];

/// Longest token name.
const MAX_NAME_CHARS: usize = 64;

/// The tenant list entry that means "every tenant".
const ALL_TENANTS: &str = "*";

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Role {
    /// Lease and inspect quota for its tenants.
    Client,
    /// Everything a client may do, plus the admin RPCs.
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Client => "client",
            Role::Admin => "admin",
        })
    }
}

/// One token as written in the config file (`[[auth.tokens]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawToken {
    /// Who holds the token, for logs ("wallboard-team").
    pub name: String,
    /// Hex SHA-256 of the token (64 hex digits, case-insensitive).
    pub sha256: String,
    /// "client" or "admin".
    pub role: Role,
    /// Tenant ids the token may touch; `["*"]` means every tenant.
    pub tenants: Vec<String>,
    /// RPCs per second this token may start (0: no limit); default
    /// `overload.max_requests_per_sec`.
    #[serde(default)]
    pub max_requests_per_sec: Option<u32>,
    /// Watch streams this token may hold open (0: no limit); default
    /// `overload.max_watch_streams`.
    #[serde(default)]
    pub max_watch_streams: Option<u32>,
}

/// A validated token.
#[derive(Clone)]
pub struct TokenSettings {
    name: String,
    hash: Hash,
    role: Role,
    /// `None` means every tenant.
    tenants: Option<BTreeSet<String>>,
    /// Own request rate (`None`: the `[overload]` default; 0: no limit).
    max_requests_per_sec: Option<u32>,
    /// Own Watch cap (`None`: the `[overload]` default; 0: no limit).
    max_watch_streams: Option<u32>,
}

impl fmt::Debug for TokenSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSettings")
            .field("name", &self.name)
            .field("sha256", &short(&self.hash))
            .field("role", &self.role)
            .field("tenants", &self.tenants)
            .field("max_requests_per_sec", &self.max_requests_per_sec)
            .field("max_watch_streams", &self.max_watch_streams)
            .finish()
    }
}

impl TokenSettings {
    /// Its name, for logs and overload messages.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The SHA-256 of the token.
    pub(crate) fn hash(&self) -> [u8; 32] {
        self.hash
    }

    /// Its own request rate, if set (0: no limit).
    pub(crate) fn max_requests_per_sec(&self) -> Option<u32> {
        self.max_requests_per_sec
    }

    /// Its own Watch cap, if set (0: no limit).
    pub(crate) fn max_watch_streams(&self) -> Option<u32> {
        self.max_watch_streams
    }
}

impl RawToken {
    /// Validates into settings, pushing one human-readable line per problem
    /// (prefixed with `at`, e.g. `auth.tokens[2] ("wallboard")`) onto
    /// `problems`. Returns `None` if any problem was found.
    pub(crate) fn validate(self, at: &str, problems: &mut Vec<String>) -> Option<TokenSettings> {
        let before = problems.len();
        if self.name.trim().is_empty() {
            problems.push(format!("{at}: name must not be empty"));
        }
        // The name is on every log line of the token's calls.
        if self.name.chars().count() > MAX_NAME_CHARS {
            problems.push(format!(
                "{at}: name is {} characters; at most {MAX_NAME_CHARS} (it names the token's \
                 holder on every log line of its calls)",
                self.name.chars().count()
            ));
        }
        // ... where a newline would forge a line, and a bidirectional
        // override make one holder's calls read as another's.
        if let Some(c) = crate::config::hidden_char(&self.name) {
            problems.push(format!(
                "{at}: name must not hold control characters or invisible format characters: \
                 it holds {} (it names the token's holder on every log line of its calls)",
                crate::config::hidden_char_named(c)
            ));
        }
        // Never echo the value: a plain token pasted here by mistake must not
        // end up in logs.
        let mut hash = [0u8; 32];
        if self.sha256.len() != 64 || hex::decode_to_slice(&self.sha256, &mut hash).is_err() {
            problems.push(format!(
                "{at}: sha256 must be 64 hex digits (got {} characters{}); \
                 put the token's hash here, not the token: `quota-broker hash-token`",
                self.sha256.chars().count(),
                if self.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                    ""
                } else {
                    ", some not hex"
                },
            ));
        } else if self.sha256.eq_ignore_ascii_case(&hash_token("")) {
            problems.push(format!(
                "{at}: sha256 is the hash of an empty token, which no caller can send (an empty \
                 or unset variable hashed?); hash the token itself: `quota-broker hash-token`"
            ));
        }
        if self.tenants.is_empty() {
            problems.push(format!(
                "{at}: tenants is empty; list tenant ids, or [\"*\"] for every tenant"
            ));
        }
        let wildcard = self.tenants.iter().any(|t| t == ALL_TENANTS);
        if wildcard && self.tenants.len() > 1 {
            problems.push(format!(
                "{at}: tenants mixes \"*\" with tenant ids; use either [\"*\"] or a list of ids"
            ));
        }
        if self.tenants.iter().any(|t| t.trim().is_empty()) {
            problems.push(format!("{at}: tenants contains an empty tenant id"));
        }
        if problems.len() > before {
            return None;
        }
        Some(TokenSettings {
            name: self.name,
            hash,
            role: self.role,
            tenants: (!wildcard).then(|| self.tenants.into_iter().collect()),
            max_requests_per_sec: self.max_requests_per_sec,
            max_watch_streams: self.max_watch_streams,
        })
    }
}

/// The caller a request was authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Principal {
    name: Arc<str>,
    role: Role,
    /// `None` means every tenant.
    tenants: Option<Arc<BTreeSet<String>>>,
    /// Position of its token in the list given to [`Authenticator::new`];
    /// `None` for the anonymous caller of open mode.
    token_index: Option<usize>,
}

impl Principal {
    /// The caller in open mode: an admin for every tenant.
    fn anonymous() -> Principal {
        Principal {
            name: "anonymous".into(),
            role: Role::Admin,
            tenants: None,
            token_index: None,
        }
    }

    /// Name for logs ("anonymous" in open mode).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Which configured token it authenticated with (its position in
    /// `[[auth.tokens]]`), `None` in open mode. Overload limits are kept per
    /// token under this index.
    pub(crate) fn token_index(&self) -> Option<usize> {
        self.token_index
    }

    /// `Ok` if the principal may touch `tenant`, else [`AuthError::TenantDenied`].
    pub(crate) fn may_access(&self, tenant: &str) -> Result<(), AuthError> {
        if self.sees(tenant) {
            Ok(())
        } else {
            Err(AuthError::TenantDenied {
                name: self.name.to_string(),
                tenant: crate::error::clip(tenant),
                allowed: self.tenants_said(),
            })
        }
    }

    /// The tenants it may use, for a refusal: the first few, quoted.
    fn tenants_said(&self) -> String {
        const SAID: usize = 5;
        let Some(tenants) = &self.tenants else {
            return "every tenant".to_owned();
        };
        let mut said: Vec<String> = tenants
            .iter()
            .take(SAID)
            .map(|t| crate::error::clip(t))
            .collect();
        if tenants.len() > SAID {
            said.push(format!("and {} more", tenants.len() - SAID));
        }
        said.join(", ")
    }

    /// `Ok` for admins, else [`AuthError::NotAdmin`].
    pub(crate) fn require_admin(&self) -> Result<(), AuthError> {
        match self.role {
            Role::Admin => Ok(()),
            Role::Client => Err(AuthError::NotAdmin {
                name: self.name.to_string(),
            }),
        }
    }

    /// Whether `tenant` is visible (for "all tenants I may see" listings).
    pub(crate) fn sees(&self, tenant: &str) -> bool {
        self.tenants.as_ref().is_none_or(|t| t.contains(tenant))
    }
}

/// Checks bearer tokens. Cheap to clone (the token table sits in an `Arc`).
#[derive(Clone)]
pub(crate) struct Authenticator {
    /// Keyed by the SHA-256 of the token; empty means open mode.
    tokens: Arc<HashMap<Hash, Principal>>,
    /// Open mode's caller, made once (a clone is a reference count).
    anonymous: Principal,
    /// Each token's hash, by its place in the config (`None`: a duplicate).
    hashes: Arc<Vec<Option<Hash>>>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut tokens: Vec<_> = self
            .tokens
            .iter()
            .map(|(hash, p)| (short(hash), p.name(), p.role))
            .collect();
        tokens.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        f.debug_struct("Authenticator")
            .field("open", &self.is_open())
            .field("tokens", &tokens)
            .finish()
    }
}

impl Authenticator {
    /// From validated tokens. No tokens = open mode: every request is an
    /// anonymous admin for every tenant (the caller only allows this on
    /// loopback). If two tokens share a hash, the first wins and the
    /// duplicate is logged.
    pub(crate) fn new(tokens: Vec<TokenSettings>) -> Authenticator {
        let mut map: HashMap<Hash, Principal> = HashMap::with_capacity(tokens.len());
        let mut hashes = Vec::with_capacity(tokens.len());
        for (index, t) in tokens.into_iter().enumerate() {
            hashes.push((!map.contains_key(&t.hash)).then_some(t.hash));
            if let Some(first) = map.get(&t.hash) {
                tracing::warn!(
                    token = %t.name,
                    kept = %first.name,
                    "auth.tokens: duplicate sha256; ignoring this token and keeping the first"
                );
                continue;
            }
            let principal = Principal {
                name: t.name.into(),
                role: t.role,
                tenants: t.tenants.map(Arc::new),
                token_index: Some(index),
            };
            map.insert(t.hash, principal);
        }
        Authenticator {
            tokens: Arc::new(map),
            anonymous: Principal::anonymous(),
            hashes: Arc::new(hashes),
        }
    }

    /// The token at `index` in the config, and its hash, if it is in force.
    pub(crate) fn token_at(&self, index: usize) -> Option<(Principal, Hash)> {
        let hash = (*self.hashes.get(index)?)?;
        Some((self.tokens.get(&hash)?.clone(), hash))
    }

    /// How many token entries the config has (in force or not): the
    /// places [`Authenticator::token_at`] takes.
    pub(crate) fn token_places(&self) -> usize {
        self.hashes.len()
    }

    /// Whether it runs open (no tokens configured).
    pub(crate) fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Authenticates the value of the `authorization` header
    /// (`Bearer <token>`, scheme case-insensitive, surrounding whitespace ok).
    /// Open mode: always `Ok(anonymous admin)`, whatever is sent.
    pub(crate) fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, AuthError> {
        if self.is_open() {
            return Ok(self.anonymous.clone());
        }
        let value = authorization.ok_or(AuthError::Missing)?.trim();
        let token = match value.split_once(char::is_whitespace) {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            _ => return Err(AuthError::Malformed),
        };
        if token.is_empty() {
            return Err(AuthError::Malformed);
        }
        // Only the digest is compared, so lookup time says nothing useful
        // about the secret.
        let hash: Hash = Sha256::digest(token.as_bytes()).into();
        self.tokens
            .get(&hash)
            .cloned()
            .ok_or(AuthError::UnknownToken)
    }
}

/// SHA-256 of `token` as lower-case hex (what goes in the config).
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The first 8 hex digits of a hash, enough to tell tokens apart in logs.
fn short(hash: &Hash) -> String {
    format!("{}…", hex::encode(&hash[..4]))
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No authorization header (→ UNAUTHENTICATED).
    #[error("no bearer token: send metadata `authorization: Bearer <token>`")]
    Missing,
    /// Not `Bearer <token>` (→ UNAUTHENTICATED).
    #[error("malformed authorization metadata: expected `authorization: Bearer <token>`")]
    Malformed,
    /// Token not configured (→ UNAUTHENTICATED). Never echoes the token.
    #[error(
        "the bearer token is not one this broker knows; ask the operator for a token \
         (the broker stores only its SHA-256)"
    )]
    UnknownToken,
    /// Token not scoped to that tenant (→ PERMISSION_DENIED).
    #[error(
        "token {name:?} may not use tenant {tenant}; it may use {allowed} (the operator sets \
         a token's tenants in the broker config)"
    )]
    TenantDenied {
        /// The token's configured name.
        name: String,
        /// The tenant it asked for, quoted and clipped (it is the caller's
        /// input).
        tenant: String,
        /// The tenants it may use: the first few, quoted.
        allowed: String,
    },
    /// Admin RPC with a client token (→ PERMISSION_DENIED).
    #[error("token {name:?} has role client; this RPC needs an admin token")]
    NotAdmin {
        /// The token's configured name.
        name: String,
    },
}

impl AuthError {
    /// True for the three UNAUTHENTICATED cases, false for the
    /// PERMISSION_DENIED ones.
    pub fn is_unauthenticated(&self) -> bool {
        matches!(
            self,
            AuthError::Missing | AuthError::Malformed | AuthError::UnknownToken
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABC_SHA256: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    fn raw(name: &str, token: &str, role: Role, tenants: &[&str]) -> RawToken {
        RawToken {
            name: name.into(),
            sha256: hash_token(token),
            role,
            tenants: tenants.iter().map(|t| t.to_string()).collect(),
            max_requests_per_sec: None,
            max_watch_streams: None,
        }
    }

    fn settings(raw: RawToken) -> TokenSettings {
        let mut problems = Vec::new();
        let s = raw.validate("auth.tokens[0]", &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        s.unwrap()
    }

    fn auth() -> Authenticator {
        Authenticator::new(vec![
            settings(raw(
                "wallboard",
                "s3cret-wall",
                Role::Client,
                &["acme", "globex"],
            )),
            settings(raw("ops", "s3cret-ops", Role::Admin, &["*"])),
        ])
    }

    #[test]
    fn hash_token_is_sha256_hex() {
        assert_eq!(hash_token("abc"), ABC_SHA256);
    }

    #[test]
    fn validate_accepts_upper_case_hex() {
        let mut r = raw("w", "abc", Role::Client, &["acme"]);
        r.sha256 = ABC_SHA256.to_uppercase();
        let a = Authenticator::new(vec![settings(r)]);
        assert_eq!(a.authenticate(Some("Bearer abc")).unwrap().name(), "w");
    }

    #[test]
    fn validate_lists_every_problem() {
        let r = RawToken {
            name: "  ".into(),
            sha256: "hunter2".into(),
            role: Role::Client,
            tenants: vec![],
            max_requests_per_sec: None,
            max_watch_streams: None,
        };
        let mut problems = Vec::new();
        assert!(r.validate("auth.tokens[2] (\"\")", &mut problems).is_none());
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems
            .iter()
            .all(|p| p.starts_with("auth.tokens[2] (\"\"): ")));
        assert!(problems[0].contains("name"));
        assert!(problems[1].contains("64 hex digits") && problems[1].contains("hash-token"));
        assert!(!problems[1].contains("hunter2"), "echoed the value");
        assert!(problems[2].contains("tenants is empty"));

        let mut r = raw("w", "x", Role::Client, &["*", "acme"]);
        r.sha256 = "g".repeat(64);
        let mut problems = Vec::new();
        assert!(r.validate("at", &mut problems).is_none());
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("not hex"));
        assert!(problems[1].contains("mixes \"*\""));
    }

    #[test]
    fn names_that_would_forge_or_spoof_a_log_line_are_refused() {
        for (name, named) in [
            ("ops\n2026-01-01 INFO forged", "a control character (U+000A"),
            ("ops\u{1b}[31m", "a control character (U+001B"),
            (
                "wallboard\u{202E}nimda",
                "an invisible format character (U+202E",
            ),
            ("ops\u{2066}", "an invisible format character (U+2066"),
            ("o\u{200B}ps", "an invisible format character (U+200B"),
        ] {
            let mut problems = Vec::new();
            let r = raw(name, "a-token", Role::Admin, &["*"]);
            assert!(r.validate("at", &mut problems).is_none(), "{name:?}");
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(problems[0].starts_with("at: name must not hold control characters"));
            assert!(problems[0].contains(named), "{named}: {problems:?}");
            assert!(!problems[0].contains(name), "echoed the name: {problems:?}");
        }
        // Spaces, other scripts and emoji are names like any other.
        settings(raw("Équipe wallboard 👍", "a-token", Role::Client, &["*"]));
    }

    #[test]
    fn the_hash_of_an_empty_token_is_refused() {
        let mut r = raw("w", "", Role::Admin, &["*"]);
        r.sha256 = hash_token("").to_uppercase();
        let mut problems = Vec::new();
        assert!(r.validate("at", &mut problems).is_none());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("hash of an empty token"),
            "{problems:?}"
        );
    }

    #[test]
    fn deserializes_from_toml() {
        let r: RawToken = toml::from_str(&format!(
            "name = \"w\"\nsha256 = \"{ABC_SHA256}\"\nrole = \"admin\"\ntenants = [\"*\"]\n"
        ))
        .unwrap();
        assert_eq!(r.role, Role::Admin);
        assert_eq!((r.max_requests_per_sec, r.max_watch_streams), (None, None));
        let limited: RawToken = toml::from_str(&format!(
            "name = \"w\"\nsha256 = \"{ABC_SHA256}\"\nrole = \"client\"\ntenants = [\"*\"]\n\
             max_requests_per_sec = 50\nmax_watch_streams = 0\n"
        ))
        .unwrap();
        let s = settings(limited);
        assert_eq!(
            (s.max_requests_per_sec(), s.max_watch_streams()),
            (Some(50), Some(0))
        );
        let bad = toml::from_str::<RawToken>(&format!(
            "name = \"w\"\nsha256 = \"{ABC_SHA256}\"\nrole = \"root\"\ntenants = [\"*\"]\n"
        ));
        assert!(bad.is_err());
        let extra = toml::from_str::<RawToken>(&format!(
            "name = \"w\"\ntoken = \"x\"\nsha256 = \"{ABC_SHA256}\"\nrole = \"client\"\ntenants = [\"*\"]\n"
        ));
        assert!(extra.is_err());
    }

    #[test]
    fn authenticate_rejects_missing_malformed_unknown() {
        let a = auth();
        assert!(!a.is_open());
        assert_eq!(a.authenticate(None), Err(AuthError::Missing));
        for bad in [
            "Basic x",
            "Bearer",
            "Bearer ",
            "",
            "s3cret-wall",
            "Bearer\t  ",
        ] {
            assert_eq!(
                a.authenticate(Some(bad)),
                Err(AuthError::Malformed),
                "{bad:?}"
            );
        }
        assert_eq!(
            a.authenticate(Some("Bearer nope")),
            Err(AuthError::UnknownToken)
        );
        for e in [
            AuthError::Missing,
            AuthError::Malformed,
            AuthError::UnknownToken,
        ] {
            assert!(e.is_unauthenticated());
        }
    }

    #[test]
    fn authenticate_accepts_any_case_and_padding() {
        let a = auth();
        for ok in [
            "Bearer s3cret-wall",
            "bearer s3cret-wall",
            "  BEARER   s3cret-wall \t",
        ] {
            let p = a.authenticate(Some(ok)).unwrap();
            assert_eq!((p.name(), p.role), ("wallboard", Role::Client), "{ok:?}");
        }
    }

    #[test]
    fn may_access_follows_tenants() {
        let a = auth();
        let wall = a.authenticate(Some("Bearer s3cret-wall")).unwrap();
        assert_eq!(wall.may_access("acme"), Ok(()));
        assert!(wall.sees("globex"));
        assert!(!wall.sees("initech"));
        let err = wall.may_access("initech").unwrap_err();
        assert!(!err.is_unauthenticated());
        assert_eq!(
            err.to_string(),
            "token \"wallboard\" may not use tenant \"initech\"; it may use \"acme\", \
             \"globex\" (the operator sets a token's tenants in the broker config)"
        );
        // The tenant is the caller's input: clipped, not echoed whole.
        let long = "x".repeat(64 * 1024);
        let message = wall.may_access(&long).unwrap_err().to_string();
        assert!(message.len() < 1_000, "{} bytes", message.len());
        assert!(message.contains("(65536 bytes)"), "{message}");
        let ops = a.authenticate(Some("Bearer s3cret-ops")).unwrap();
        assert_eq!(ops.may_access("initech"), Ok(()));
        assert!(ops.sees("anything"));
    }

    #[test]
    fn require_admin_follows_role() {
        let a = auth();
        let wall = a.authenticate(Some("Bearer s3cret-wall")).unwrap();
        let err = wall.require_admin().unwrap_err();
        assert!(!err.is_unauthenticated());
        assert_eq!(
            err.to_string(),
            "token \"wallboard\" has role client; this RPC needs an admin token"
        );
        let ops = a.authenticate(Some("Bearer s3cret-ops")).unwrap();
        assert_eq!(ops.require_admin(), Ok(()));
    }

    #[test]
    fn open_mode_admits_everyone_as_admin() {
        let a = Authenticator::new(vec![]);
        assert!(a.is_open());
        for sent in [None, Some(""), Some("Basic x"), Some("Bearer whatever")] {
            let p = a.authenticate(sent).unwrap();
            assert_eq!((p.name(), p.role), ("anonymous", Role::Admin));
            assert_eq!(p.token_index(), None);
            assert_eq!(p.require_admin(), Ok(()));
            assert_eq!(p.may_access("acme"), Ok(()));
        }
    }

    #[test]
    fn duplicate_hash_keeps_first() {
        let a = Authenticator::new(vec![
            settings(raw("first", "same", Role::Client, &["acme"])),
            settings(raw("second", "same", Role::Admin, &["*"])),
        ]);
        let p = a.authenticate(Some("Bearer same")).unwrap();
        assert_eq!((p.name(), p.role), ("first", Role::Client));
        assert_eq!(p.token_index(), Some(0));
    }

    #[test]
    fn debug_never_prints_token_or_full_hash() {
        let s = settings(raw("w", "abc", Role::Client, &["acme"]));
        let a = Authenticator::new(vec![s.clone()]);
        for dbg in [format!("{s:?}"), format!("{a:?}")] {
            assert!(dbg.contains("ba7816bf"), "{dbg}");
            assert!(!dbg.contains(&ABC_SHA256[..9]), "{dbg}");
            assert!(!dbg.contains("abc\""), "{dbg}");
        }
        let p = a.authenticate(Some("Bearer abc")).unwrap();
        assert!(!format!("{p:?}").contains("ba7816bf"));
        assert!(!AuthError::UnknownToken.to_string().contains("abc"));
    }
}
