//! The proxy (:8095): routes each request to a port of a sandbox, to the
//! sandbox's sandboxd (port 9501, node token required) or to the node API.
//!
//! Routing information, first match wins:
//! 1. headers `Hutch-Sandbox-Id` and `Hutch-Sandbox-Port`;
//! 2. host `{port}-{id}.{proxy_domain}`;
//! 3. path prefix `/v1/node/`: the node API;
//! 4. path `/{id}/{port}/{rest}`, forwarded as `/{rest}` with the query.
//!
//! Bodies are never buffered: the request and the response are handed to
//! `hutch_relay::forward`, which also splices WebSocket upgrades.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::HeaderValue;
use http::uri::PathAndQuery;
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hutch_relay::{Backend, BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::owner::{Node, Snapshot, error_chain};
use crate::record::now_ms;

/// The port that means "sandboxd itself".
pub const SANDBOXD_PORT: u16 = 9501;

pub const HEADER_SANDBOX_ID: &str = "hutch-sandbox-id";
pub const HEADER_SANDBOX_PORT: &str = "hutch-sandbox-port";
pub const HEADER_NODE_TOKEN: &str = "hutch-node-token";

#[derive(Debug)]
pub(crate) struct ProxyState {
    pub node: Arc<Node>,
    pub snapshots: watch::Receiver<Snapshot>,
}

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Sandbox {
        id: String,
        port: u16,
        /// The path and query to forward, when routing consumed a path prefix.
        rewrite: Option<String>,
    },
    NodeApi,
}

/// Why a request carries no usable routing information (answered 400 `bad_route`).
#[derive(Debug, PartialEq, Eq)]
pub struct BadRoute(pub &'static str);

/// Serves the proxy on `listener` until `shutdown`.
///
/// Bounded everywhere a client could make it hold resources: at most
/// `max_connections` client connections (the next is told so and closed), a
/// request head must arrive within `header_timeout`, and connections into one
/// sandbox are capped (see [`to_sandbox`]).
pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<ProxyState>,
    shutdown: impl Future<Output = ()>,
) {
    let limits = state.node.config.proxy;
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.header_timeout))
        .keep_alive_timeout(limits.header_timeout)
        .max_concurrent_streams(256);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        // EMFILE and friends: back off a little instead of spinning.
                        tracing::warn!(%error, "proxy accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    connections.spawn(refuse_overloaded(stream));
                    continue;
                };
                let builder = builder.clone();
                let state = state.clone();
                connections.spawn(async move {
                    let _slot = slot;
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, req).await) }
                    });
                    if let Err(error) =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await
                    {
                        tracing::debug!(%error, "proxy connection ended with an error");
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = &mut shutdown => break,
        }
    }
    connections.shutdown().await;
}

/// Largest request head a client may send.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Answers a client the proxy has no room for with a plain HTTP/1.1 503 and
/// closes; within a second, or not at all.
async fn refuse_overloaded(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt as _;
    let body = r#"{"error":{"code":"too_many_connections","message":"the proxy holds as many connections as it may; try again later"}}"#;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// One of a sandbox's connection slots, held for as long as the connection into
/// it lives.
struct ConnectionSlot(Arc<AtomicUsize>);

impl ConnectionSlot {
    fn try_take(count: &Arc<AtomicUsize>, limit: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|_| Self(count.clone()))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn handle(state: &ProxyState, req: Request<Incoming>) -> Response<BoxBody> {
    let domain = state.node.config.proxy_domain.as_deref();
    match route(req.headers(), req.uri(), domain) {
        Ok(Route::NodeApi) => {
            if !has_token(req.headers(), &state.node.config.node_token) {
                return unauthenticated();
            }
            crate::node_api::handle(&state.node, req).await
        }
        Ok(Route::Sandbox { id, port, rewrite }) => {
            to_sandbox(state, req, &id, port, rewrite).await
        }
        Err(BadRoute(message)) => error(StatusCode::BAD_REQUEST, "bad_route", message, None),
    }
}

async fn to_sandbox(
    state: &ProxyState,
    mut req: Request<Incoming>,
    id: &str,
    port: u16,
    rewrite: Option<String>,
) -> Response<BoxBody> {
    // Checked before the lookup, so an unauthenticated caller learns nothing
    // about which sandboxes exist.
    if port == SANDBOXD_PORT && !has_token(req.headers(), &state.node.config.node_token) {
        return unauthenticated();
    }
    let view = state.snapshots.borrow().get(id).cloned();
    let Some(view) = view else {
        return error(
            StatusCode::NOT_FOUND,
            "sandbox_not_found",
            "no such sandbox on this node",
            None,
        );
    };
    view.activity.store(now_ms(), Ordering::Relaxed);
    if !view.reachable {
        let detail = serde_json::json!({
            "state": view.observed.phase.as_str(),
            "reason": view.observed.reason,
        });
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "sandbox_not_running",
            "the sandbox is not running",
            Some(detail),
        );
    }
    if port != SANDBOXD_PORT && !view.ports.contains(&port) {
        return error(
            StatusCode::FORBIDDEN,
            "port_not_exposed",
            "the port is not in the sandbox's ports",
            None,
        );
    }

    let headers = req.headers_mut();
    for name in [HEADER_SANDBOX_ID, HEADER_SANDBOX_PORT, HEADER_NODE_TOKEN] {
        headers.remove(name);
    }
    if let Some(path_and_query) = rewrite {
        match rewrite_uri(req.uri(), &path_and_query) {
            Ok(uri) => *req.uri_mut() = uri,
            Err(()) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_route",
                    "invalid path after the route",
                    None,
                );
            }
        }
    }

    let Some(slot) = ConnectionSlot::try_take(
        &view.connections,
        state.node.config.proxy.max_connections_per_sandbox,
    ) else {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_connections",
            "the sandbox already has as many connections as the proxy allows one sandbox",
            None,
        );
    };
    let activity = view.activity.clone();
    let result = if port == SANDBOXD_PORT {
        match state.node.driver.connect_sandboxd(&view.id).await {
            Ok(stream) => {
                let stream = ActivityStream { inner: stream, activity, _slot: slot };
                hutch_relay::forward(stream, Backend::Http1, req).await
            }
            Err(e) => {
                if let hutch_isolate::ConnectSandboxdError::WrongPeer { .. } = e {
                    tracing::error!(id = %view.id, error = %e, "refusing a sandboxd socket served by another process");
                }
                return unreachable(port, &e);
            }
        }
    } else {
        let backend = Backend::matching(req.version());
        let timeout = state.node.config.proxy.connect_timeout;
        match state.node.driver.connect_port(&view.id, port, timeout).await {
            Ok(stream) => {
                let stream = ActivityStream { inner: stream, activity, _slot: slot };
                hutch_relay::forward(stream, backend, req).await
            }
            Err(e) => return unreachable(port, &e),
        }
    };
    match result {
        Ok(response) => response,
        Err(e) => unreachable(port, &e),
    }
}

/// A connection to a sandbox that stamps the sandbox's last activity whenever
/// bytes move, so a long stream or WebSocket session counts as activity for
/// as long as it carries traffic, not only when it starts.
struct ActivityStream<S> {
    inner: S,
    activity: Arc<AtomicI64>,
    /// Released when the connection into the sandbox closes.
    _slot: ConnectionSlot,
}

impl<S> ActivityStream<S> {
    fn touch<T>(&self, poll: &Poll<std::io::Result<T>>) {
        if matches!(poll, Poll::Ready(Ok(_))) {
            self.activity.store(now_ms(), Ordering::Relaxed);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ActivityStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.touch(&poll);
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ActivityStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.touch(&poll);
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.touch(&poll);
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

fn unreachable(port: u16, error: &dyn std::error::Error) -> Response<BoxBody> {
    let message = format!("cannot reach port {port} in the sandbox: {}", error_chain(error));
    crate::proxy::error(StatusCode::BAD_GATEWAY, "port_unreachable", &message, None)
}

fn unauthenticated() -> Response<BoxBody> {
    error(
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "this route needs a valid Hutch-Node-Token header",
        None,
    )
}

/// Whether the request carries the node token, compared in constant time.
pub(crate) fn has_token(headers: &HeaderMap, token: &str) -> bool {
    // An unset token never matches: nothing is served unauthenticated by mistake.
    if token.is_empty() {
        return false;
    }
    headers
        .get(HEADER_NODE_TOKEN)
        .is_some_and(|given| constant_time_eq(given.as_bytes(), token.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Finds the routing information of a request: headers first, then the host
/// under `domain`, then the node API prefix, then the path. Public so that it
/// can be fuzzed: it is the first thing to see every proxied request.
pub fn route(headers: &HeaderMap, uri: &Uri, domain: Option<&str>) -> Result<Route, BadRoute> {
    if let Some(id) = headers.get(HEADER_SANDBOX_ID) {
        let id = id.to_str().map_err(|_| BadRoute("Hutch-Sandbox-Id is not a valid id"))?;
        let port = headers
            .get(HEADER_SANDBOX_PORT)
            .ok_or(BadRoute("Hutch-Sandbox-Id needs Hutch-Sandbox-Port"))?;
        let port = port
            .to_str()
            .ok()
            .and_then(parse_port)
            .ok_or(BadRoute("Hutch-Sandbox-Port is not a port number"))?;
        if !valid_id(id) {
            return Err(BadRoute("Hutch-Sandbox-Id is not a valid id"));
        }
        return Ok(Route::Sandbox { id: id.to_owned(), port, rewrite: None });
    }
    if let Some(domain) = domain {
        let host = uri
            .host()
            .or_else(|| headers.get(http::header::HOST).and_then(|h| h.to_str().ok()))
            .map(|host| host.split(':').next().unwrap_or(host));
        if let Some(label) = host.and_then(|h| h.strip_suffix(domain)?.strip_suffix('.')) {
            let (port, id) =
                label.split_once('-').ok_or(BadRoute("host is not {port}-{id}.{domain}"))?;
            let port = parse_port(port).ok_or(BadRoute("host is not {port}-{id}.{domain}"))?;
            if !valid_id(id) {
                return Err(BadRoute("host is not {port}-{id}.{domain}"));
            }
            return Ok(Route::Sandbox { id: id.to_owned(), port, rewrite: None });
        }
    }
    let path = uri.path();
    if path.starts_with("/v1/node/") {
        return Ok(Route::NodeApi);
    }
    let mut parts = path.trim_start_matches('/').splitn(3, '/');
    let (Some(id), Some(port)) = (parts.next(), parts.next()) else {
        return Err(BadRoute(
            "no routing information: use the Hutch-Sandbox-Id and Hutch-Sandbox-Port headers or the path /{id}/{port}/",
        ));
    };
    let port = parse_port(port).ok_or(BadRoute("path is not /{id}/{port}/..."))?;
    if !valid_id(id) {
        return Err(BadRoute("path is not /{id}/{port}/..."));
    }
    let mut rewrite = format!("/{}", parts.next().unwrap_or(""));
    if let Some(query) = uri.query() {
        rewrite.push('?');
        rewrite.push_str(query);
    }
    Ok(Route::Sandbox { id: id.to_owned(), port, rewrite: Some(rewrite) })
}

fn parse_port(text: &str) -> Option<u16> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().filter(|port| *port != 0)
}

fn valid_id(id: &str) -> bool {
    hutch_isolate::SandboxId::new(id).is_ok()
}

fn rewrite_uri(uri: &Uri, path_and_query: &str) -> Result<Uri, ()> {
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(path_and_query).map_err(drop)?);
    Uri::from_parts(parts).map_err(drop)
}

/// A JSON error answer of the proxy itself: `{"error":{"code","message",...detail}}`.
pub(crate) fn error(
    status: StatusCode,
    code: &str,
    message: &str,
    detail: Option<serde_json::Value>,
) -> Response<BoxBody> {
    let mut error = serde_json::json!({ "code": code, "message": message });
    if let (Some(serde_json::Value::Object(detail)), Some(object)) = (detail, error.as_object_mut())
    {
        object.extend(detail);
    }
    json(status, &serde_json::json!({ "error": error }))
}

pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Response<BoxBody> {
    let body = Bytes::from(value.to_string());
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

pub(crate) fn full(bytes: Bytes) -> BoxBody {
    http_body_util::Full::new(bytes).map_err(|never| match never {}).boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    fn sandbox(port: u16, rewrite: Option<&str>) -> Result<Route, BadRoute> {
        Ok(Route::Sandbox { id: ID.into(), port, rewrite: rewrite.map(str::to_owned) })
    }

    #[test]
    fn headers_route_first() {
        let h = headers(&[(HEADER_SANDBOX_ID, ID), (HEADER_SANDBOX_PORT, "9501")]);
        assert_eq!(route(&h, &"/x/1/y".parse().unwrap(), None), sandbox(9501, None));
        let h = headers(&[(HEADER_SANDBOX_ID, ID)]);
        assert!(route(&h, &"/".parse().unwrap(), None).is_err());
        let h = headers(&[(HEADER_SANDBOX_ID, ID), (HEADER_SANDBOX_PORT, "+80")]);
        assert!(route(&h, &"/".parse().unwrap(), None).is_err());
        let h = headers(&[(HEADER_SANDBOX_ID, "../x"), (HEADER_SANDBOX_PORT, "80")]);
        assert!(route(&h, &"/".parse().unwrap(), None).is_err());
    }

    #[test]
    fn paths_route_and_are_rewritten_with_the_query() {
        let none = HeaderMap::new();
        let uri = format!("/{ID}/8000/a/b?x=1");
        assert_eq!(route(&none, &uri.parse().unwrap(), None), sandbox(8000, Some("/a/b?x=1")));
        let uri = format!("/{ID}/8000");
        assert_eq!(route(&none, &uri.parse().unwrap(), None), sandbox(8000, Some("/")));
        assert!(route(&none, &"/".parse().unwrap(), None).is_err());
        assert!(route(&none, &format!("/{ID}/http/").parse().unwrap(), None).is_err());
        assert_eq!(route(&none, &"/v1/node/images".parse().unwrap(), None), Ok(Route::NodeApi));
    }

    #[test]
    fn hosts_route_under_the_proxy_domain() {
        let h = headers(&[("host", &format!("8000-{ID}.sb.example:8095"))]);
        let uri: Uri = "/some/path".parse().unwrap();
        assert_eq!(route(&h, &uri, Some("sb.example")), sandbox(8000, None));
        assert!(route(&h, &uri, Some("other.example")).is_err());
        let h = headers(&[("host", "nope.sb.example")]);
        assert!(route(&h, &uri, Some("sb.example")).is_err());
        let absolute: Uri = format!("http://8000-{ID}.sb.example/x").parse().unwrap();
        assert_eq!(route(&HeaderMap::new(), &absolute, Some("sb.example")), sandbox(8000, None));
    }

    #[test]
    fn the_token_must_match_exactly() {
        let h = headers(&[(HEADER_NODE_TOKEN, "secret")]);
        assert!(has_token(&h, "secret"));
        assert!(!has_token(&h, "secret2"));
        assert!(!has_token(&h, "secreT"));
        assert!(!has_token(&HeaderMap::new(), "secret"));
        assert!(!has_token(&headers(&[(HEADER_NODE_TOKEN, "")]), ""));
    }

    #[test]
    fn errors_carry_their_detail() {
        let response = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "sandbox_not_running",
            "m",
            Some(serde_json::json!({"state": "exited", "reason": "exited"})),
        );
        assert_eq!(response.status(), 503);
    }
}
