//! Who is calling: the bearer token of an API request (an access token
//! `POST /oauth/token` issued, or `<org>:<client>` taken as it is), and
//! `POST /oauth/token` itself, OAuth client credentials checked against the
//! org's secret.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;

use super::errors::error_body;
use super::{lock, Sim};
use crate::data::uuid_like;

/// An access token `POST /oauth/token` issued.
pub(super) struct Issued {
    org: String,
    client: String,
    expires: Instant,
}

impl Sim {
    /// The caller of an API request: `Authorization: Bearer <token>` with a
    /// token `POST /oauth/token` issued, or `Bearer <org>:<client>`, →
    /// (org, client).
    pub(super) fn caller(&self, headers: &HeaderMap) -> Result<(String, String), Box<Response>> {
        let unauthorized = |why: &str| {
            Box::new(error_body(
                StatusCode::UNAUTHORIZED,
                "authentication.required",
                format!(
                    "{why}: expected \"Authorization: Bearer <access token>\" \
                     (from POST /oauth/token) or \"Bearer <org>:<client>\"."
                ),
                None,
            ))
        };
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("No authorization header"))?
            .to_str()
            .map_err(|_| unauthorized("Authorization header is not text"))?;
        let token = value
            .strip_prefix("Bearer ")
            .ok_or_else(|| unauthorized("Not a bearer token"))?;
        if let Some((org, client)) = token.split_once(':') {
            return if !org.is_empty() && !client.is_empty() {
                Ok((org.to_owned(), client.to_owned()))
            } else {
                Err(unauthorized("Malformed bearer token"))
            };
        }
        match lock(&self.inner.tokens).get(token) {
            Some(issued) if issued.expires > Instant::now() => {
                Ok((issued.org.clone(), issued.client.clone()))
            }
            Some(_) => Err(unauthorized("The access token has expired")),
            None => Err(unauthorized("Unknown access token")),
        }
    }
}

/// The form of `POST /oauth/token`.
#[derive(Deserialize)]
pub(super) struct TokenForm {
    grant_type: String,
}

/// OAuth client credentials: `Authorization: Basic base64(<client>@<org>:
/// <the org's oauth_secret>)`, form `grant_type=client_credentials`.
pub(super) async fn oauth_token(
    State(sim): State<Sim>,
    headers: HeaderMap,
    form: Result<axum::Form<TokenForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let oauth_error = |status: StatusCode, error: &str, description: &str| {
        (
            status,
            axum::Json(json!({ "error": error, "description": description })),
        )
            .into_response()
    };
    let invalid_client =
        |description: &str| oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", description);
    match form {
        Ok(form) if form.grant_type == "client_credentials" => {}
        Ok(_) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "only grant_type=client_credentials is supported",
            )
        }
        Err(_) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "expected a form body grant_type=client_credentials",
            )
        }
    }
    let Some((client_id, secret)) = basic_credentials(&headers) else {
        return invalid_client("expected Authorization: Basic base64(client_id:client_secret)");
    };
    let Some((client, org)) = client_id
        .rsplit_once('@')
        .filter(|(c, o)| !c.is_empty() && !o.is_empty())
    else {
        return invalid_client("a gcsim client id is <client>@<org>");
    };
    let Some(slot) = sim.inner.orgs.get(org) else {
        return invalid_client("no such org");
    };
    if secret != slot.oauth_secret {
        return invalid_client("wrong client secret");
    }
    let token = format!("gcsim-{}", uuid_like(&mut fastrand::Rng::new()));
    let now = Instant::now();
    {
        let mut tokens = lock(&sim.inner.tokens);
        tokens.retain(|_, t| t.expires > now);
        tokens.insert(
            token.clone(),
            Issued {
                org: org.to_owned(),
                client: client.to_owned(),
                expires: now + slot.token_ttl,
            },
        );
    }
    axum::Json(json!({
        "access_token": token,
        "token_type": "bearer",
        "expires_in": slot.token_ttl.as_secs(),
    }))
    .into_response()
}

/// `Authorization: Basic base64(id:secret)` → (id, secret).
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    use base64::Engine;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}
