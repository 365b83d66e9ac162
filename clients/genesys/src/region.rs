//! Where an org's API and login live, and the OAuth client it logs in as.

use crate::UpstreamError;

/// The API and login base URLs of a Genesys Cloud region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// API base, e.g. `https://api.mypurecloud.com`.
    pub api: String,
    /// Login base (for `/oauth/token`), e.g. `https://login.mypurecloud.com`.
    pub login: String,
}

impl Region {
    /// A region from its host (`mypurecloud.com`, `euw2.pure.cloud`, ...:
    /// `https://api.<host>` and `https://login.<host>`), or from one base
    /// URL serving both (`http://127.0.0.1:8080`, as gcsim does).
    pub fn new(host_or_url: &str) -> Result<Region, UpstreamError> {
        let invalid = |message: &str| UpstreamError::Invalid {
            what: "region",
            message: message.into(),
        };
        let s = host_or_url.trim();
        if s.starts_with("http://") || s.starts_with("https://") {
            let base = s.trim_end_matches('/');
            let rest = base.split_once("://").map(|(_, r)| r).unwrap_or_default();
            if rest.is_empty() || rest.contains(['/', '?', '#', ' ']) {
                return Err(invalid("a base URL is scheme://host[:port] with no path"));
            }
            return Ok(Region {
                api: base.to_owned(),
                login: base.to_owned(),
            });
        }
        let valid = !s.is_empty()
            && s.len() <= 253
            && s.contains('.')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
        if !valid {
            return Err(invalid(
                "expected a region host such as mypurecloud.com or a base URL such as http://127.0.0.1:8080",
            ));
        }
        Ok(Region {
            api: format!("https://api.{s}"),
            login: format!("https://login.{s}"),
        })
    }
}

/// An OAuth client (client-credentials grant).
#[derive(Clone)]
pub struct Credentials {
    /// Client id.
    pub client_id: String,
    /// Client secret.
    pub client_secret: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("client_id", &self.client_id)
            .field("client_secret", &"<hidden>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_base_urls() {
        let r = Region::new("mypurecloud.com").unwrap();
        assert_eq!(r.api, "https://api.mypurecloud.com");
        assert_eq!(r.login, "https://login.mypurecloud.com");
        let r = Region::new("http://127.0.0.1:8080/").unwrap();
        assert_eq!(
            (r.api.as_str(), r.login.as_str()),
            ("http://127.0.0.1:8080", "http://127.0.0.1:8080")
        );
        for bad in [
            "",
            "localhost",
            "api.example.com/x",
            "http://",
            "http://h/path",
            "a b.com",
        ] {
            assert!(Region::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let c = Credentials {
            client_id: "id".into(),
            client_secret: "s3cret".into(),
        };
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
