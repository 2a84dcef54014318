//! Calls to a sandbox's sandboxd (docs/sandboxd-api.md) under a base URL:
//! the server's `…/sandboxes/{id}/daemon` route, which forwards `/{path}`
//! verbatim, or a sandboxd reached directly.

use anyhow::Context as _;
use hutch_api::{FileInfo, OutputPage, ProcessInfo, StartProcessRequest};
use reqwest::{Method, RequestBuilder, Response};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use crate::client::{RequestError, check};

pub type WebSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

#[derive(Debug, Clone)]
pub struct Daemon {
    http: reqwest::Client,
    /// Without a trailing slash; paths are appended.
    base: String,
    api_key: Option<String>,
}

impl Daemon {
    pub fn new(http: reqwest::Client, base: String, api_key: Option<String>) -> Daemon {
        Daemon { http, base, api_key }
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let mut builder = self.http.request(method, format!("{}{path}", self.base));
        if let Some(key) = &self.api_key {
            builder = builder.bearer_auth(key);
        }
        builder
    }

    /// Sends a request and checks its status.
    pub async fn send(&self, builder: RequestBuilder) -> anyhow::Result<Response> {
        let response = builder
            .send()
            .await
            .map_err(|source| RequestError::Unreachable { url: self.base.clone(), source })?;
        Ok(check(response, self.api_key.is_some()).await?)
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        builder: RequestBuilder,
    ) -> anyhow::Result<T> {
        let response = self.send(builder).await?;
        let url = response.url().path().to_owned();
        response.json().await.with_context(|| format!("invalid answer from sandboxd ({url})"))
    }

    /// `POST /processes`.
    pub async fn start_process(
        &self,
        request: &StartProcessRequest,
    ) -> anyhow::Result<ProcessInfo> {
        self.json(self.request(Method::POST, "/processes").json(request))
            .await
            .with_context(|| format!("starting {:?}", request.command))
    }

    /// `POST /processes/{id}/signal`, to its process group if `group`.
    pub async fn signal(&self, id: &str, signal: &str, group: bool) -> anyhow::Result<ProcessInfo> {
        let body =
            hutch_api::SignalRequest { signal: hutch_api::Signal::Name(signal.to_owned()), group };
        self.json(self.request(Method::POST, &format!("/processes/{id}/signal")).json(&body)).await
    }

    /// `GET /processes/{id}/output?offset=`.
    pub async fn output(&self, id: &str, offset: u64) -> anyhow::Result<OutputPage> {
        let path = format!("/processes/{id}/output");
        self.json(self.request(Method::GET, &path).query(&[("offset", offset)])).await
    }

    /// `GET /processes/{id}/attach?offset=` as a WebSocket.
    pub async fn attach(&self, id: &str, offset: u64) -> anyhow::Result<WebSocket> {
        let url = format!("{}/processes/{id}/attach?offset={offset}", self.base);
        let url = match url.strip_prefix("https://") {
            Some(rest) => format!("wss://{rest}"),
            None => url.replacen("http://", "ws://", 1),
        };
        let mut request = url.as_str().into_client_request().context("invalid attach URL")?;
        if let Some(key) = &self.api_key {
            let value = format!("Bearer {key}")
                .parse()
                .context("the API key is not a valid header value")?;
            request.headers_mut().insert(http_header::AUTHORIZATION, value);
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((socket, _)) => Ok(socket),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let status = response.status().as_u16();
                let body = response
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                Err(crate::client::api_error(status, &body, self.api_key.is_some()))
                    .context("attaching to the process")
            }
            Err(e) => {
                Err(e).with_context(|| format!("cannot attach to the process at {}", self.base))
            }
        }
    }

    /// `GET /files/stat?path=`; `None` when nothing is there.
    pub async fn stat(&self, path: &str) -> anyhow::Result<Option<FileInfo>> {
        let builder = self.request(Method::GET, "/files/stat").query(&[("path", path)]);
        match self.json(builder).await {
            Ok(info) => Ok(Some(info)),
            Err(e)
                if e.downcast_ref::<crate::client::ApiError>().is_some_and(|a| a.status == 404) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// `GET /files?path=`: the response, its body not yet read.
    pub async fn download_file(&self, path: &str) -> anyhow::Result<Response> {
        self.send(self.request(Method::GET, "/files").query(&[("path", path)])).await
    }

    /// `PUT /files?path=&mode=` with a streamed body.
    pub async fn upload_file(
        &self,
        path: &str,
        mode: Option<u32>,
        body: reqwest::Body,
    ) -> anyhow::Result<FileInfo> {
        let mut query = vec![("path", path.to_owned())];
        if let Some(mode) = mode {
            query.push(("mode", format!("{mode:o}")));
        }
        self.json(self.request(Method::PUT, "/files").query(&query).body(body)).await
    }

    /// `GET /files/archive?path=`: a tar stream of a directory.
    pub async fn download_archive(&self, path: &str) -> anyhow::Result<Response> {
        self.send(self.request(Method::GET, "/files/archive").query(&[("path", path)])).await
    }

    /// `PUT /files/archive?path=`: unpacks a streamed tar into a directory.
    pub async fn upload_archive(
        &self,
        path: &str,
        body: reqwest::Body,
    ) -> anyhow::Result<FileInfo> {
        let builder = self
            .request(Method::PUT, "/files/archive")
            .query(&[("path", path)])
            .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
            .body(body);
        self.json(builder).await
    }
}

mod http_header {
    pub use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
}
