//! A record: what intake accepts (an upstream call to make later and its
//! idempotency key), its checks, and what the drain claims.

use serde::Deserialize;

/// Longest idempotency or order key, bytes.
pub const KEY_MAX: usize = 256;
/// Longest upstream path (with its query), bytes.
pub const PATH_MAX: usize = 2048;

/// The intake's JSON body, as a Data Action sends it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Intake {
    /// One record per key: a repeat (the data action retrying) is the same
    /// record. E.g. `<conversationId>:<participantId>:wrapup`.
    pub idempotency_key: String,
    /// `POST`, `PUT`, `PATCH` or `DELETE`.
    pub method: String,
    /// The upstream path, `/api/v2/...` (may carry a query).
    pub path: String,
    /// The upstream request's JSON body.
    #[serde(default)]
    pub body: Option<serde_json::Value>,
    /// Records of one order key go upstream one at a time, in the order
    /// they were accepted. Default: the path.
    #[serde(default)]
    pub order_key: Option<String>,
}

/// Why a record is refused (the messages never echo the input).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// Key missing, too long, or holding control characters.
    #[error("idempotencyKey must be 1 to {KEY_MAX} bytes, without control characters")]
    Key,
    /// Order key too long, or holding control characters.
    #[error("orderKey must be 1 to {KEY_MAX} bytes, without control characters")]
    OrderKey,
    /// Method not one of the writes.
    #[error("method must be POST, PUT, PATCH or DELETE")]
    Method,
    /// Path not an API path.
    #[error("path must start with /api/v2/, be at most {PATH_MAX} bytes, and hold no spaces, '..', '#' or an encoded '.', '/' or '\\'")]
    Path,
    /// Too big.
    #[error("the record is larger than the relay's limit of {0} bytes")]
    TooLarge(usize),
}

/// True if `path` percent-encodes a '.', '/' or '\\': an HTTP client
/// normalising `%2e%2e` would leave `/api/v2/` (and the broker would lease
/// the call for a route it does not go to).
fn encodes_a_separator(path: &str) -> bool {
    path.as_bytes().windows(3).any(|w| {
        w[0] == b'%'
            && matches!(
                (w[1], w[2].to_ascii_lowercase()),
                (b'2', b'e') | (b'2', b'f') | (b'5', b'c')
            )
    })
}

/// A checked record, ready to store.
#[derive(Clone, Debug)]
pub struct NewRecord {
    /// Idempotency key.
    pub key: String,
    /// Order key.
    pub order_key: String,
    /// Upper-case method.
    pub method: String,
    /// Path.
    pub path: String,
    /// JSON body text.
    pub body: Option<String>,
}

impl NewRecord {
    /// Checks `intake` (at most `max_bytes` in all).
    pub fn check(intake: Intake, max_bytes: usize) -> Result<NewRecord, Invalid> {
        // Control characters: a NUL cannot be stored in PostgreSQL's TEXT,
        // and would fail the whole group commit the record joins.
        let bad_key =
            |k: &str| k.is_empty() || k.len() > KEY_MAX || k.chars().any(char::is_control);
        if bad_key(&intake.idempotency_key) {
            return Err(Invalid::Key);
        }
        let order_key = match intake.order_key {
            Some(k) if bad_key(&k) => return Err(Invalid::OrderKey),
            Some(k) => k,
            None => intake.path.clone(),
        };
        let method = intake.method.to_ascii_uppercase();
        if !matches!(method.as_str(), "POST" | "PUT" | "PATCH" | "DELETE") {
            return Err(Invalid::Method);
        }
        let p = &intake.path;
        if !p.starts_with("/api/v2/")
            || p.len() > PATH_MAX
            || p.contains("..")
            || p.contains('#')
            || p.chars().any(|c| c.is_whitespace() || c.is_control())
            || encodes_a_separator(p)
        {
            return Err(Invalid::Path);
        }
        let record = NewRecord {
            key: intake.idempotency_key,
            order_key,
            method,
            path: intake.path,
            body: intake.body.map(|b| b.to_string()),
        };
        if record.bytes() > max_bytes {
            return Err(Invalid::TooLarge(max_bytes));
        }
        Ok(record)
    }

    /// What it weighs against the queue's byte limit.
    pub fn bytes(&self) -> usize {
        self.key.len()
            + self.order_key.len()
            + self.method.len()
            + self.path.len()
            + self.body.as_ref().map_or(0, String::len)
    }
}

/// A claimed record.
#[derive(Clone, Debug)]
pub struct Record {
    /// Its id.
    pub id: i64,
    /// Idempotency key.
    pub key: String,
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// JSON body text.
    pub body: Option<String>,
    /// Attempts so far, this one included.
    pub attempts: i64,
    /// When intake accepted it, epoch ms.
    pub received_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intake(json: &str) -> Intake {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_wrapup_is_accepted_and_ordered_by_path() {
        let r = NewRecord::check(
            intake(r#"{"idempotencyKey":"c1:p1:wrapup","method":"post","path":"/api/v2/conversations/calls/c1/participants/p1/communications/m1/wrapup","body":{"code":"x"}}"#),
            1000,
        )
        .unwrap();
        assert_eq!(r.method, "POST");
        assert_eq!(r.order_key, r.path);
        assert_eq!(r.body.as_deref(), Some(r#"{"code":"x"}"#));
    }

    #[test]
    fn bad_records_are_refused_without_echo() {
        let check = |json: &str| NewRecord::check(intake(json), 200).unwrap_err();
        assert_eq!(
            check(r#"{"idempotencyKey":"","method":"POST","path":"/api/v2/x"}"#),
            Invalid::Key
        );
        assert_eq!(
            check(r#"{"idempotencyKey":"k","method":"GET","path":"/api/v2/x"}"#),
            Invalid::Method
        );
        assert_eq!(
            check(r#"{"idempotencyKey":"k","method":"POST","path":"http://evil/api/v2/x"}"#),
            Invalid::Path
        );
        assert_eq!(
            check(r#"{"idempotencyKey":"k","method":"POST","path":"/api/v2/../x"}"#),
            Invalid::Path
        );
        assert_eq!(
            check(r#"{"idempotencyKey":"k","method":"POST","path":"/api/v2/x","orderKey":""}"#),
            Invalid::OrderKey
        );
        // A NUL would fail the whole group commit in PostgreSQL.
        assert_eq!(
            check(r#"{"idempotencyKey":"k\u0000","method":"POST","path":"/api/v2/x"}"#),
            Invalid::Key
        );
        assert_eq!(
            check(
                r#"{"idempotencyKey":"k","method":"POST","path":"/api/v2/x","orderKey":"a\u0000"}"#
            ),
            Invalid::OrderKey
        );
        // Encoded dots and slashes that a client would normalise away.
        for path in [
            "/api/v2/%2e%2e/%2E%2E/x",
            "/api/v2/users%2F..%2Fx",
            "/api/v2/a%5c..%5cb",
        ] {
            let json = format!(r#"{{"idempotencyKey":"k","method":"POST","path":"{path}"}}"#);
            assert_eq!(check(&json), Invalid::Path, "{path}");
        }
        assert!(NewRecord::check(
            intake(r#"{"idempotencyKey":"k","method":"POST","path":"/api/v2/users/a%20b"}"#),
            200
        )
        .is_ok());
        let big = format!(
            r#"{{"idempotencyKey":"k","method":"POST","path":"/api/v2/x","body":"{}"}}"#,
            "a".repeat(300)
        );
        assert_eq!(check(&big), Invalid::TooLarge(200));
        assert!(!check(&format!(
            r#"{{"idempotencyKey":"{}","method":"POST","path":"/api/v2/x"}}"#,
            "k".repeat(300)
        ))
        .to_string()
        .contains("kkk"));
    }
}
