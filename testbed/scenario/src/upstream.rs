//! HTTP to the simulator: the fleet's upstream calls (one pooled HTTP/1.1
//! client shared by every simulated client process; what tells them apart
//! upstream is their OAuth token) and the control plane (`/_sim/stats`,
//! `/_sim/orgs/{org}/writes`, `/_sim/log`) with serde types of its contract
//! (testbed/gcsim/README.md).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::Error;

/// Why one upstream call did not get an answer (the fleet retries it).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct CallError(String);

/// An upstream answer.
#[derive(Debug)]
pub(crate) struct Answer {
    /// HTTP status.
    pub(crate) status: u16,
    /// Response headers (the rate-limit ones are reported to the broker).
    pub(crate) headers: HeaderMap,
    /// Response body.
    pub(crate) body: Bytes,
}

impl Answer {
    /// The `Retry-After` header as a real duration (decimal seconds).
    pub(crate) fn retry_after(&self) -> Option<Duration> {
        let v = self.headers.get("retry-after")?.to_str().ok()?;
        let secs: f64 = v.trim().parse().ok()?;
        (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
    }
}

/// The simulator, over HTTP (cheap to clone).
#[derive(Clone)]
pub(crate) struct Upstream {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl Upstream {
    /// A client for the simulator at `addr`.
    pub(crate) fn new(addr: SocketAddr) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Upstream {
            client: Client::builder(TokioExecutor::new()).build(connector),
            base: format!("http://{addr}"),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        auth: Option<&str>,
        body: Bytes,
    ) -> Result<Answer, CallError> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(auth) = auth {
            req = req.header(AUTHORIZATION, auth);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| CallError(format!("build request to {path}: {e}")))?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| CallError(format!("{path}: {e}")))?;
        let status = resp.status().as_u16();
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| CallError(format!("{path}: reading the body: {e}")))?
            .to_bytes();
        Ok(Answer {
            status,
            headers: parts.headers,
            body,
        })
    }

    /// One fleet call: `POST path` with `body` as OAuth client `client` of
    /// the org.
    pub(crate) async fn post(
        &self,
        org: &str,
        client: &str,
        path: &str,
        body: Bytes,
    ) -> Result<Answer, CallError> {
        let auth = format!("Bearer {org}:{client}");
        self.send(Method::POST, path, Some(&auth), body).await
    }

    /// A control-plane GET, decoded.
    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        let answer = self
            .send(Method::GET, path, None, Bytes::new())
            .await
            .map_err(|e| Error::sim(format!("GET {path}"), e))?;
        if answer.status != 200 {
            return Err(Error::sim(
                format!("GET {path}"),
                format!(
                    "status {}: {}",
                    answer.status,
                    String::from_utf8_lossy(&answer.body)
                ),
            ));
        }
        serde_json::from_slice(&answer.body).map_err(|e| Error::sim(format!("GET {path}"), e))
    }

    /// `/_sim/stats`.
    pub(crate) async fn stats(&self) -> Result<SimStats, Error> {
        self.get_json("/_sim/stats").await
    }

    /// `/_sim/orgs/{org}/writes`: conversation id → writes stored.
    pub(crate) async fn writes(&self, org: &str) -> Result<BTreeMap<String, u64>, Error> {
        self.get_json(&format!("/_sim/orgs/{org}/writes")).await
    }

    /// `/_sim/orgs/{org}/conversations?interval=`: the ids of the org's
    /// conversations starting in `interval` (`<start>/<end>`).
    pub(crate) async fn conversation_ids(
        &self,
        org: &str,
        interval: &str,
    ) -> Result<Vec<String>, Error> {
        self.get_json(&format!(
            "/_sim/orgs/{org}/conversations?interval={interval}"
        ))
        .await
    }

    /// The whole `/_sim/log` (every page), as raw JSON entries.
    pub(crate) async fn log(&self) -> Result<Vec<serde_json::Value>, Error> {
        let mut since = 0u64;
        let mut entries = Vec::new();
        loop {
            let page: LogPage = self.get_json(&format!("/_sim/log?since={since}")).await?;
            if page.entries.is_empty() || page.next <= since {
                return Ok(entries);
            }
            entries.extend(page.entries);
            since = page.next;
        }
    }
}

/// One page of `/_sim/log`.
#[derive(Debug, Deserialize)]
struct LogPage {
    next: u64,
    #[serde(default)]
    entries: Vec<serde_json::Value>,
}

/// `/_sim/stats`.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
pub(crate) struct SimStats {
    /// Simulated time of the answer.
    pub(crate) sim_ms: f64,
    /// Per org.
    #[serde(default)]
    pub(crate) orgs: Vec<OrgStats>,
}

impl SimStats {
    /// The org called `id`.
    pub(crate) fn org(&self, id: &str) -> Option<&OrgStats> {
        self.orgs.iter().find(|o| o.id == id)
    }
}

/// One org's counters.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
pub(crate) struct OrgStats {
    /// Org id.
    pub(crate) id: String,
    /// Endpoint families.
    #[serde(default)]
    pub(crate) families: Vec<FamilyStats>,
    /// Per OAuth client token.
    #[serde(default)]
    pub(crate) tokens: Vec<TokenStats>,
    /// Refusals by reason (`token`, `family:<name>`, ...).
    #[serde(default)]
    pub(crate) refused_by_reason: BTreeMap<String, u64>,
    /// Stored writes.
    #[serde(default)]
    pub(crate) writes: WriteStats,
}

impl OrgStats {
    /// The family called `name`.
    pub(crate) fn family(&self, name: &str) -> Option<&FamilyStats> {
        self.families.iter().find(|f| f.name == name)
    }
}

/// One endpoint family's windows.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
pub(crate) struct FamilyStats {
    /// Family name.
    pub(crate) name: String,
    /// Window length, simulated ms.
    pub(crate) window_ms: u64,
    /// `fixed_window`, `token_bucket` or `sliding_log` (absent: fixed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) kind: Option<String>,
    /// A token bucket's capacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) burst: Option<u64>,
    /// Requests holding a concurrency slot now.
    #[serde(default)]
    pub(crate) in_flight: u64,
    /// Every window from 0 to the current one.
    #[serde(default)]
    pub(crate) windows: Vec<WindowStats>,
}

/// One window of one family.
#[derive(Clone, Copy, Debug, Default, Deserialize, serde::Serialize)]
pub(crate) struct WindowStats {
    /// Window number.
    pub(crate) index: u64,
    /// Its start, simulated ms.
    pub(crate) start_ms: u64,
    /// Permits the family enforced in it.
    pub(crate) enforced_permits: u64,
    /// The concurrency limit in it (None: none).
    #[serde(default)]
    pub(crate) max_concurrent: Option<u64>,
    /// Fleet requests served.
    #[serde(default)]
    pub(crate) served_fleet: u64,
    /// Unmanaged requests served.
    #[serde(default)]
    pub(crate) served_unmanaged: u64,
    /// Fleet requests refused.
    #[serde(default)]
    pub(crate) refused_fleet: u64,
    /// Unmanaged requests refused.
    #[serde(default)]
    pub(crate) refused_unmanaged: u64,
}

/// One token's counters.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
pub(crate) struct TokenStats {
    /// OAuth client.
    pub(crate) client: String,
    /// Served requests.
    #[serde(default)]
    pub(crate) served: u64,
    /// Refused requests.
    #[serde(default)]
    pub(crate) refused: u64,
}

/// Stored writes.
#[derive(Clone, Copy, Debug, Default, Deserialize, serde::Serialize)]
pub(crate) struct WriteStats {
    /// Distinct conversations written.
    #[serde(default)]
    pub(crate) distinct: u64,
    /// Writes stored, repeats included.
    #[serde(default)]
    pub(crate) total: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_contracts_stats() {
        let json = r#"{"sim_ms":61000,"orgs":[{"id":"org-a","families":[{"name":"analytics-query",
            "window_ms":60000,"in_flight":2,"windows":[{"index":0,"start_ms":0,"enforced_permits":45,"max_concurrent":10,
            "served_fleet":40,"served_unmanaged":5,"refused_fleet":3,"refused_unmanaged":0}]}],
            "tokens":[{"client":"ingest","served":30,"refused":2}],"refused_by_reason":{"token":1},
            "writes":{"distinct":10,"total":11}}]}"#;
        let stats: SimStats = serde_json::from_str(json).unwrap();
        let org = stats.org("org-a").unwrap();
        let w = org.family("analytics-query").unwrap().windows[0];
        assert_eq!(
            (w.enforced_permits, w.served_fleet, w.refused_fleet),
            (45, 40, 3)
        );
        assert_eq!(org.writes.total, 11);
        // Kept logs re-encode the stats: nothing of the contract is lost.
        let kept = serde_json::to_value(&stats).unwrap();
        let family = &kept["orgs"][0]["families"][0];
        assert_eq!(family["in_flight"], 2);
        assert_eq!(family["windows"][0]["max_concurrent"], 10);
    }

    #[tokio::test]
    async fn kept_stats_are_what_the_simulator_said() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sim = gcsim::Sim::start(gcsim::SimConfig::default(), listener).unwrap();
        let upstream = Upstream::new(sim.addr());
        let raw: serde_json::Value = upstream.get_json("/_sim/stats").await.unwrap();
        let typed: SimStats = serde_json::from_value(raw.clone()).unwrap();
        sim.shutdown().await;
        assert_eq!(serde_json::to_value(&typed).unwrap(), raw);
    }

    #[test]
    fn retry_after_is_decimal_seconds() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("0.25"));
        let a = Answer {
            status: 429,
            headers,
            body: Bytes::new(),
        };
        assert_eq!(a.retry_after(), Some(Duration::from_millis(250)));
    }
}
