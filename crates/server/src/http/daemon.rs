//! `ANY /v1/namespaces/{ns}/sandboxes/{id}/daemon/{*path}`: forwarded to
//! sandboxd through the owning node's proxy, streaming both ways, upgrades
//! included. A sandbox still pending or creating is waited for, so clients
//! can create and exec at once.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use http::{HeaderValue, Method, Uri, header};
use hutch_relay::Backend;
use tokio::net::TcpStream;

use super::{ApiError, AppState, Auth, PathParams};
use crate::controller::{Command, DaemonTarget};

/// Routing headers of the dataplane proxy.
pub const SANDBOX_ID_HEADER: &str = "hutch-sandbox-id";
pub const SANDBOX_PORT_HEADER: &str = "hutch-sandbox-port";
pub const NODE_TOKEN_HEADER: &str = "hutch-node-token";
/// sandboxd's port as the proxy knows it.
pub const SANDBOXD_PORT: &str = "9501";

pub async fn forward(
    State(state): State<AppState>,
    Auth(principal): Auth,
    PathParams((namespace, id, _path)): PathParams<(String, String, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    principal.require_namespace(&namespace, ApiError::SandboxNotFound(id.clone()))?;
    let read_only = matches!(*request.method(), Method::GET | Method::HEAD);
    let proxy_url = wait_until_running(&state, &namespace, &id, read_only).await?;

    let (mut parts, body) = request.into_parts();
    // The rest of the raw path (still percent-encoded), after
    // "", "v1", "namespaces", ns, "sandboxes", id, "daemon".
    let rest = parts.uri.path().splitn(8, '/').nth(7).unwrap_or("");
    let path_and_query = match parts.uri.query() {
        Some(query) => format!("/{rest}?{query}"),
        None => format!("/{rest}"),
    };
    parts.uri = path_and_query
        .parse::<Uri>()
        .map_err(|error| ApiError::BadRequest(format!("invalid daemon path: {error}")))?;
    let authority = proxy_authority(&proxy_url)?;
    let headers = &mut parts.headers;
    // The user's key is for the server; the node gets the node token.
    headers.remove(header::AUTHORIZATION);
    headers.insert(header::HOST, header_value(&authority)?);
    headers.insert(SANDBOX_ID_HEADER, header_value(&id)?);
    headers.insert(SANDBOX_PORT_HEADER, HeaderValue::from_static(SANDBOXD_PORT));
    headers.insert(NODE_TOKEN_HEADER, header_value(&state.node_token)?);

    let stream = connect(&authority).await?;
    let response = hutch_relay::forward(stream, Backend::Http1, Request::from_parts(parts, body))
        .await
        .map_err(|error| ApiError::SandboxUnreachable(Box::new(error)))?;
    Ok(response.map(Body::new))
}

/// The proxy URL of the sandbox's node once it runs; waits (up to the
/// configured daemon wait) while it is pending or creating. A finished
/// sandbox still in retention answers read-only requests (logs, output).
async fn wait_until_running(
    state: &AppState,
    namespace: &str,
    id: &str,
    read_only: bool,
) -> Result<String, ApiError> {
    let deadline = tokio::time::Instant::now() + state.daemon_wait;
    loop {
        let (ns, sandbox_id) = (namespace.to_owned(), id.to_owned());
        let target = state
            .controller
            .call(|reply| Command::ResolveDaemon { namespace: ns, id: sandbox_id, reply })
            .await??;
        let changed = match target {
            DaemonTarget::Ready { proxy_url } => return Ok(proxy_url),
            DaemonTarget::Finished { retained_proxy_url: Some(proxy_url), .. } if read_only => {
                return Ok(proxy_url);
            }
            DaemonTarget::Finished { state, reason, .. } => {
                return Err(ApiError::SandboxNotRunning { id: id.to_owned(), state, reason });
            }
            DaemonTarget::NotYet(changed) => changed,
        };
        // The controller registered this wait before answering, so a change
        // in between is not missed. A dropped sender (the controller is
        // stopping) sends us round once more, to its error.
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            let (ns, sandbox_id) = (namespace.to_owned(), id.to_owned());
            let sandbox = state
                .controller
                .call(|reply| Command::GetSandbox { namespace: ns, id: sandbox_id, reply })
                .await??;
            return Err(ApiError::SandboxNotRunning {
                id: id.to_owned(),
                state: sandbox.state,
                reason: sandbox.reason,
            });
        }
    }
}

/// `host:port` of a node's `http://` proxy URL.
pub fn proxy_authority(proxy_url: &str) -> Result<String, ApiError> {
    let uri: Uri = proxy_url.parse().map_err(|error: http::uri::InvalidUri| {
        ApiError::SandboxUnreachable(
            format!("node proxy url {proxy_url:?} is invalid: {error}").into(),
        )
    })?;
    if uri.scheme_str().is_some_and(|scheme| scheme != "http") {
        return Err(ApiError::SandboxUnreachable(
            format!("node proxy url {proxy_url:?}: only http:// is supported").into(),
        ));
    }
    let authority = uri.authority().ok_or_else(|| {
        ApiError::SandboxUnreachable(format!("node proxy url {proxy_url:?} has no host").into())
    })?;
    Ok(match authority.port_u16() {
        Some(_) => authority.as_str().to_owned(),
        None => format!("{}:80", authority.host()),
    })
}

pub async fn connect(authority: &str) -> Result<TcpStream, ApiError> {
    let stream = TcpStream::connect(authority)
        .await
        .map_err(|error| ApiError::SandboxUnreachable(Box::new(error)))?;
    // Exec round trips are small messages; do not let Nagle delay them.
    stream.set_nodelay(true).map_err(|error| ApiError::SandboxUnreachable(Box::new(error)))?;
    Ok(stream)
}

pub fn header_value(value: &str) -> Result<HeaderValue, ApiError> {
    HeaderValue::from_str(value).map_err(|error| ApiError::Internal(Box::new(error)))
}
