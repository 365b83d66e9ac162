//! The OAuth client-credentials access token: fetched from the login host
//! once, shared by every call, fetched again before it expires or after
//! the API says 401.

use crate::{Credentials, UpstreamError};
use serde::Deserialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// Longest token lifetime taken from a login answer, seconds (a day).
const MAX_TOKEN_LIFETIME_S: u64 = 86_400;

/// Longest login error text kept in an error.
const MAX_MESSAGE: usize = 200;

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: u64,
}

struct Cached {
    token: String,
    /// A tenth of its lifetime early, so no call goes out on a token that
    /// expires on the way.
    refresh_at: Instant,
}

pub(crate) struct TokenCache {
    http: reqwest::Client,
    url: String,
    credentials: Credentials,
    /// tokio `Mutex`: held across the login, so concurrent callers wait for
    /// one login instead of each making their own.
    cached: Mutex<Option<Cached>>,
    logins: AtomicU64,
}

impl TokenCache {
    pub(crate) fn new(http: reqwest::Client, login: &str, credentials: Credentials) -> TokenCache {
        TokenCache {
            http,
            url: format!("{login}/oauth/token"),
            credentials,
            cached: Mutex::new(None),
            logins: AtomicU64::new(0),
        }
    }

    pub(crate) fn logins(&self) -> u64 {
        self.logins.load(Ordering::Relaxed)
    }

    /// A token valid for now.
    pub(crate) async fn get(&self) -> Result<String, UpstreamError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| Instant::now() < c.refresh_at) {
            return Ok(c.token.clone());
        }
        let answer = self.login().await?;
        // A login host's figure, bounded: a lifetime past a day is read as
        // a day (an `Instant` that far out would overflow).
        let lifetime = Duration::from_secs(answer.expires_in.min(MAX_TOKEN_LIFETIME_S));
        *cached = Some(Cached {
            token: answer.access_token.clone(),
            refresh_at: Instant::now() + lifetime.mul_f64(0.9),
        });
        Ok(answer.access_token)
    }

    /// Forgets `token` (the API refused it), unless a newer one replaced it.
    pub(crate) async fn invalidate(&self, token: &str) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|c| c.token == token) {
            *cached = None;
        }
    }

    async fn login(&self) -> Result<TokenAnswer, UpstreamError> {
        self.logins.fetch_add(1, Ordering::Relaxed);
        let transport = |e: reqwest::Error| {
            UpstreamError::Transport(format!("login: {}", crate::without_url(e)))
        };
        let response = self
            .http
            .post(&self.url)
            .basic_auth(
                &self.credentials.client_id,
                Some(&self.credentials.client_secret),
            )
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body("grant_type=client_credentials")
            .send()
            .await
            .map_err(transport)?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(transport)?;
        if status >= 500 || status == 429 {
            return Err(UpstreamError::Transport(format!("login answered {status}")));
        }
        if status != 200 {
            let text = String::from_utf8_lossy(&body);
            return Err(UpstreamError::Auth {
                status,
                message: text.chars().take(MAX_MESSAGE).collect(),
            });
        }
        serde_json::from_slice::<TokenAnswer>(&body).map_err(|e| UpstreamError::Auth {
            status,
            message: format!("the login answer is not a token: {e}"),
        })
    }
}
