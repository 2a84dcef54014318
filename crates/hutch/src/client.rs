//! The REST client of the Hutch server (docs/platform-api.md).
//!
//! Sandboxes and images are handled as JSON values rather than typed structs:
//! the CLI prints them and reads a few fields, and so keeps working when the
//! server adds fields.

use std::time::Duration;

use anyhow::Context as _;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;

use crate::config::Connection;
use crate::daemon::Daemon;

/// An error answer of the server or of sandboxd: `{"error":{"code","message"}}`.
#[derive(Debug, thiserror::Error)]
#[error("{message} ({code}, HTTP {status}){hint}")]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
    /// Advice appended to the message, e.g. where the API key comes from.
    pub hint: String,
}

/// Failures to reach the server at all.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("cannot reach {url} (is the server running? --url/HUTCH_URL says where it is)")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
}

/// Turns a non-success response into an [`ApiError`]; passes others through.
pub async fn check(response: Response, has_key: bool) -> Result<Response, ApiError> {
    let status = response.status();
    if status.is_success() || status == StatusCode::SWITCHING_PROTOCOLS {
        return Ok(response);
    }
    let text = response.text().await.unwrap_or_default();
    Err(api_error(status.as_u16(), &text, has_key))
}

/// An [`ApiError`] from a status and a body that may or may not be the
/// standard error JSON (a proxy in between may answer in plain text).
pub fn api_error(status: u16, body: &str, has_key: bool) -> ApiError {
    let parsed = serde_json::from_str::<Value>(body).ok();
    let field =
        |name: &str| parsed.as_ref().and_then(|v| v["error"][name].as_str()).map(str::to_owned);
    let code = field("code").unwrap_or_else(|| "http_error".to_owned());
    let mut message = field("message").unwrap_or_else(|| {
        let text = body.trim();
        if text.is_empty() {
            StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("request failed")
                .to_ascii_lowercase()
        } else {
            text.chars().take(300).collect()
        }
    });
    // The server says why a sandbox cannot take daemon calls.
    if let Some(details) = parsed.as_ref().map(|v| &v["error"]) {
        let state = details["state"].as_str();
        let reason = details["reason"].as_str();
        if let Some(state) = state.filter(|state| !message.contains(state)) {
            message = match reason {
                Some(reason) => format!("{message} (sandbox is {state}: {reason})"),
                None => format!("{message} (sandbox is {state})"),
            };
        }
    }
    let hint = if status == 401 && !has_key {
        "; no API key: set HUTCH_API_KEY or --api-key, or run `hutch up` on this machine".to_owned()
    } else {
        String::new()
    };
    ApiError { status, code, message, hint }
}

/// A client of one server, namespace and key.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    connection: Connection,
}

impl Client {
    pub fn new(connection: Connection) -> anyhow::Result<Client> {
        let tls = connection.url.starts_with("https://")
            || connection.daemon_url.as_deref().is_some_and(|u| u.starts_with("https://"));
        Ok(Client { http: http_client(tls)?, connection })
    }

    pub fn has_key(&self) -> bool {
        self.connection.api_key.is_some()
    }

    /// `{url}/v1{path}`.
    fn url(&self, path: &str) -> String {
        format!("{}/v1{path}", self.connection.url)
    }

    fn sandboxes_path(&self) -> String {
        format!("/namespaces/{}/sandboxes", encode_segment(&self.connection.namespace))
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let mut builder = self.http.request(method, self.url(path));
        if let Some(key) = &self.connection.api_key {
            builder = builder.bearer_auth(key);
        }
        builder
    }

    /// Sends a request and checks its status.
    pub async fn send(&self, builder: RequestBuilder) -> anyhow::Result<Response> {
        let response = builder.send().await.map_err(|source| RequestError::Unreachable {
            url: self.connection.url.clone(),
            source,
        })?;
        Ok(check(response, self.has_key()).await?)
    }

    async fn json(&self, builder: RequestBuilder) -> anyhow::Result<Value> {
        let response = self.send(builder).await?;
        let url = response.url().clone();
        response.json().await.with_context(|| format!("invalid JSON from {url}"))
    }

    pub async fn create_sandbox(&self, body: &Value) -> anyhow::Result<Value> {
        self.json(self.request(Method::POST, &self.sandboxes_path()).json(body))
            .await
            .context("creating the sandbox")
    }

    pub async fn get_sandbox(&self, id: &str) -> anyhow::Result<Value> {
        let path = format!("{}/{}", self.sandboxes_path(), encode_segment(id));
        self.json(self.request(Method::GET, &path)).await
    }

    /// Every page of the list.
    pub async fn list_sandboxes(&self, query: &[(&str, String)]) -> anyhow::Result<Vec<Value>> {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut query = query.to_vec();
            if let Some(cursor) = &cursor {
                query.push(("cursor", cursor.clone()));
            }
            let page =
                self.json(self.request(Method::GET, &self.sandboxes_path()).query(&query)).await?;
            if let Some(sandboxes) = page["sandboxes"].as_array() {
                all.extend(sandboxes.iter().cloned());
            }
            match page["next_cursor"].as_str() {
                Some(next) if !next.is_empty() && cursor.as_deref() != Some(next) => {
                    cursor = Some(next.to_owned());
                }
                _ => return Ok(all),
            }
        }
    }

    pub async fn delete_sandbox(&self, id: &str) -> anyhow::Result<Value> {
        let path = format!("{}/{}", self.sandboxes_path(), encode_segment(id));
        self.json(self.request(Method::DELETE, &path)).await
    }

    pub async fn stop_sandbox(&self, id: &str, grace_secs: Option<u64>) -> anyhow::Result<Value> {
        let path = format!("{}/{}/stop", self.sandboxes_path(), encode_segment(id));
        let body = match grace_secs {
            Some(grace) => serde_json::json!({ "grace_secs": grace }),
            None => serde_json::json!({}),
        };
        self.json(self.request(Method::POST, &path).json(&body)).await
    }

    /// The daemon of a sandbox: through the server's daemon route, or
    /// directly when `--daemon-url` is set.
    pub fn daemon(&self, id: &str) -> Daemon {
        match &self.connection.daemon_url {
            Some(url) => Daemon::new(self.http.clone(), url.clone(), None),
            None => Daemon::new(
                self.http.clone(),
                format!("{}/{}/daemon", self.url(&self.sandboxes_path()), encode_segment(id)),
                self.connection.api_key.clone(),
            ),
        }
    }

    /// `GET {path}` as JSON.
    pub async fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        self.json(self.request(Method::GET, path)).await
    }

    pub async fn create_namespace(&self, name: &str) -> anyhow::Result<Value> {
        let body = serde_json::json!({ "name": name });
        self.json(self.request(Method::POST, "/namespaces").json(&body)).await
    }

    pub async fn delete_namespace(&self, name: &str) -> anyhow::Result<Value> {
        let path = format!("/namespaces/{}", encode_segment(name));
        self.json(self.request(Method::DELETE, &path)).await
    }

    pub async fn list_images(&self) -> anyhow::Result<Value> {
        self.json(self.request(Method::GET, "/images")).await
    }

    pub async fn delete_image(&self, reference: &str) -> anyhow::Result<()> {
        let path = format!("/images/{}", encode_segment(reference));
        self.send(self.request(Method::DELETE, &path)).await.map(drop)
    }
}

/// The HTTP client every command uses: no overall timeout (streams last as
/// long as the command they carry) but a bounded connect. Without `tls` it
/// trusts no certificate authority: loading the system's takes milliseconds,
/// a large part of a `hutch run` against a local server.
pub fn http_client(tls: bool) -> anyhow::Result<reqwest::Client> {
    // No proxy from the environment: the attach WebSocket cannot use one, and
    // one route for all calls fails or works as a whole.
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .no_proxy();
    if !tls {
        builder = builder.tls_certs_only(Vec::new());
    }
    builder.build().context("cannot build the HTTP client")
}

/// Percent-encodes one path segment (everything but RFC 3986's unreserved
/// characters), so ids and image references such as
/// `docker.io/library/busybox:1.36` stay one segment.
pub fn encode_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(encode_segment("abc-1.2_~"), "abc-1.2_~");
        assert_eq!(
            encode_segment("docker.io/library/busybox:1.36"),
            "docker.io%2Flibrary%2Fbusybox%3A1.36"
        );
        assert_eq!(encode_segment("a b@c"), "a%20b%40c");
    }

    #[test]
    fn error_bodies_become_one_readable_message() {
        let body = r#"{"error":{"code":"sandbox_not_running","message":"sandbox is not running","state":"failed","reason":"oom"}}"#;
        let error = api_error(409, body, true);
        assert_eq!(error.code, "sandbox_not_running");
        assert_eq!(
            error.to_string(),
            "sandbox is not running (sandbox is failed: oom) (sandbox_not_running, HTTP 409)"
        );
        let plain = api_error(502, "Bad Gateway\n", true);
        let said = r#"{"error":{"code":"sandbox_not_running","message":"sandbox x is failed (oom)","state":"failed","reason":"oom"}}"#;
        assert_eq!(
            api_error(409, said, true).to_string(),
            "sandbox x is failed (oom) (sandbox_not_running, HTTP 409)"
        );
        assert_eq!(plain.to_string(), "Bad Gateway (http_error, HTTP 502)");
        let empty = api_error(401, "", false);
        assert!(empty.to_string().starts_with("unauthorized (http_error, HTTP 401); no API key"));
    }
}
