//! Forwards one HTTP request over a stream the caller has already connected,
//! and hands back the backend's response with its body still streaming.
//!
//! Both the dataplane's proxy (client → sandbox port or sandboxd) and the
//! server's daemon route (client → dataplane proxy) are this operation; they
//! differ only in how they find and connect the stream, which stays theirs.
//!
//! Nothing is buffered: request and response bodies are hyper bodies polled
//! frame by frame, so a slow reader slows the writer instead of filling memory.
//! A request asking for a protocol upgrade (WebSocket) that the backend
//! accepts with `101 Switching Protocols` is spliced: once the caller's server
//! has sent the 101 on, both upgraded connections are copied into each other
//! until either side closes.

use std::error::Error as StdError;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};

/// The error type carried by forwarded bodies.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// A response body of any origin: the backend's, or one the caller makes up.
pub type BoxBody = UnsyncBoxBody<Bytes, BoxError>;

/// Which HTTP version to speak to the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// HTTP/1.1; upgrades (WebSocket) work.
    Http1,
    /// HTTP/2 with prior knowledge (h2c), for gRPC and other HTTP/2-only servers.
    Http2,
}

impl Backend {
    /// The backend version that keeps the client's semantics: HTTP/2 clients
    /// (gRPC needs trailers and h2) get HTTP/2, everyone else HTTP/1.1.
    pub fn matching(version: Version) -> Self {
        if version == Version::HTTP_2 { Backend::Http2 } else { Backend::Http1 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("http handshake with the backend failed")]
    Handshake(#[source] hyper::Error),
    #[error("the backend did not answer the request")]
    Request(#[source] hyper::Error),
    #[error("invalid request uri for the backend")]
    Uri(#[source] http::Error),
}

/// Headers that describe one connection, not the message, and so must not be
/// passed on (RFC 9110 §7.6.1). `Connection` and `Upgrade` survive on an
/// upgrade request, which is the one case where they are the message.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Whether the request asks to switch protocols (`Connection: upgrade`).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Sends `req` over `stream` and returns the backend's response.
///
/// The request's URI may be absolute (HTTP/2 clients) or origin-form; the
/// backend gets what its version needs. The caller sets whatever routing
/// headers it wants beforehand; hop-by-hop headers are removed here.
pub async fn forward<S, B>(
    stream: S,
    backend: Backend,
    mut req: Request<B>,
) -> Result<Response<BoxBody>, ForwardError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let upgrade = backend == Backend::Http1 && is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    strip_hop_by_hop(req.headers_mut(), upgrade);
    if upgrade {
        req.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let req = shape_for_backend(req, backend)?
        .map(|body| body.map_err(Into::<BoxError>::into).boxed_unsync());
    let io = TokioIo::new(stream);

    let mut response = match backend {
        Backend::Http1 => {
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(io).await.map_err(ForwardError::Handshake)?;
            tokio::spawn(async move {
                if let Err(error) = connection.with_upgrades().await {
                    tracing::debug!(%error, "backend connection ended with an error");
                }
            });
            sender.send_request(req).await.map_err(ForwardError::Request)?
        }
        Backend::Http2 => {
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(ForwardError::Handshake)?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "backend connection ended with an error");
                }
            });
            sender.send_request(req).await.map_err(ForwardError::Request)?
        }
    };

    if let Some(client_upgrade) = client_upgrade
        && response.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        let backend_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            let (client, backend) = match tokio::try_join!(client_upgrade, backend_upgrade) {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::debug!(%error, "upgrade did not complete");
                    return;
                }
            };
            let mut client = TokioIo::new(client);
            let mut backend = TokioIo::new(backend);
            if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut backend).await {
                tracing::debug!(%error, "upgraded connection ended with an error");
            }
        });
    } else {
        strip_hop_by_hop(response.headers_mut(), false);
    }
    Ok(response.map(|body| body.map_err(BoxError::from).boxed_unsync()))
}

fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        if keep_upgrade && (name == header::UPGRADE || name == header::CONNECTION) {
            continue;
        }
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(header::UPGRADE);
    }
}

/// HTTP/1.1 wants an origin-form target and a Host header; HTTP/2 wants the
/// scheme and authority in the URI (they become `:scheme` and `:authority`).
fn shape_for_backend<B>(req: Request<B>, backend: Backend) -> Result<Request<B>, ForwardError> {
    let (mut parts, body) = req.into_parts();
    let authority = parts
        .uri
        .authority()
        .map(|authority| authority.as_str().to_owned())
        .or_else(|| {
            parts.headers.get(header::HOST).and_then(|v| v.to_str().ok()).map(str::to_owned)
        })
        .unwrap_or_else(|| "localhost".to_owned());
    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str()).to_owned();
    match backend {
        Backend::Http1 => {
            parts.version = Version::HTTP_11;
            parts.uri = Uri::builder().path_and_query(path).build().map_err(ForwardError::Uri)?;
            if !parts.headers.contains_key(header::HOST)
                && let Ok(host) = HeaderValue::from_str(&authority)
            {
                parts.headers.insert(header::HOST, host);
            }
        }
        Backend::Http2 => {
            parts.version = Version::HTTP_2;
            parts.uri = Uri::builder()
                .scheme("http")
                .authority(authority)
                .path_and_query(path)
                .build()
                .map_err(ForwardError::Uri)?;
            // HTTP/2 carries the authority in the pseudo-header.
            parts.headers.remove(header::HOST);
        }
    }
    Ok(Request::from_parts(parts, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_needs_both_headers() {
        let req = Request::builder()
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(is_upgrade(&req));
        let req = Request::builder().header("upgrade", "websocket").body(()).unwrap();
        assert!(!is_upgrade(&req));
    }

    #[test]
    fn hop_by_hop_headers_are_removed_with_those_connection_names() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("x-private, close"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers, false);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));
    }

    #[test]
    fn absolute_uris_become_origin_form_for_http1() {
        let req = Request::builder().uri("http://example.test:81/a/b?c=d").body(()).unwrap();
        let req = shape_for_backend(req, Backend::Http1).unwrap();
        assert_eq!(req.uri(), "/a/b?c=d");
        assert_eq!(req.headers()[header::HOST], "example.test:81");
        let req = Request::builder().uri("/x").header("host", "h").body(()).unwrap();
        let req = shape_for_backend(req, Backend::Http2).unwrap();
        assert_eq!(req.uri(), "http://h/x");
    }
}
