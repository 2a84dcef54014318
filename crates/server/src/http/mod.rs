//! The REST API (docs/platform-api.md) on axum.
//!
//! Handlers parse and authorize, then ask the controller; they hold no state
//! of their own beyond request counters.

mod daemon;
mod error;
mod images;
mod nodes;
mod sandboxes;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post};
use http::request::Parts;
use http::{HeaderMap, StatusCode, header};
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

pub use self::error::ApiError;
use crate::controller::{Command, Handle};
use crate::keys::{constant_time_eq, sha256_hex};
use crate::model::{CreateNamespace, Namespace};
use crate::validate::{InvalidField, validate_namespace_name};

/// Largest JSON request body.
pub const MAX_JSON_BODY: usize = 1024 * 1024;

static OPENAPI: &str = include_str!("../../openapi.json");

/// What every handler shares.
#[derive(Clone, Debug)]
pub struct AppState {
    pub(crate) controller: Handle,
    pub(crate) admin_key: Arc<str>,
    pub(crate) node_token: Arc<str>,
    pub(crate) daemon_wait: Duration,
    pub(crate) shutdown: CancellationToken,
    pub(crate) requests: Arc<RequestCounters>,
}

/// Requests answered, by method and status, for /metrics.
#[derive(Debug, Default)]
pub struct RequestCounters {
    counts: Mutex<BTreeMap<(String, u16), u64>>,
}

impl RequestCounters {
    fn record(&self, method: &str, status: u16) {
        // Clients choose the method string (any token is a valid method): only
        // the standard ones get a series of their own, so that unauthenticated
        // requests cannot grow this map without bound.
        const KNOWN: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"];
        let method = KNOWN.into_iter().find(|known| *known == method).unwrap_or("other");
        // The lock is never held across an await.
        if let Ok(mut counts) = self.counts.lock() {
            *counts.entry((method.to_owned(), status)).or_default() += 1;
        }
    }

    fn snapshot(&self) -> BTreeMap<(String, u16), u64> {
        self.counts.lock().map(|counts| counts.clone()).unwrap_or_default()
    }
}

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    Admin,
    Namespace(String),
}

impl Principal {
    /// Admin only: namespaces and keys, deleting images.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self {
            Principal::Admin => Ok(()),
            Principal::Namespace(_) => Err(ApiError::Forbidden),
        }
    }

    /// A namespace key may only act in its own namespace; anything else
    /// looks exactly like something that does not exist.
    pub fn require_namespace(&self, namespace: &str, not_found: ApiError) -> Result<(), ApiError> {
        match self {
            Principal::Admin => Ok(()),
            Principal::Namespace(own) if own == namespace => Ok(()),
            Principal::Namespace(_) => Err(not_found),
        }
    }
}

/// Extracts and checks `Authorization: Bearer <key>`.
#[derive(Debug)]
pub struct Auth(pub Principal);

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let key = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|key| !key.is_empty())
            .ok_or(ApiError::Unauthenticated)?;
        if constant_time_eq(key.as_bytes(), state.admin_key.as_bytes()) {
            return Ok(Auth(Principal::Admin));
        }
        let key_sha256 = sha256_hex(key.as_bytes());
        let namespace = state
            .controller
            .call(|reply| Command::Authenticate { key_sha256, reply })
            .await?
            .ok_or(ApiError::Unauthenticated)?;
        Ok(Auth(Principal::Namespace(namespace)))
    }
}

/// `axum::extract::Path` whose rejection (say, a bad percent-encoding) is an
/// `ApiError` like every other failure.
#[derive(Debug)]
pub struct PathParams<T>(pub T);

impl<T, S> FromRequestParts<S> for PathParams<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| PathParams(value))
            .map_err(|rejection| ApiError::BadRequest(rejection.body_text()))
    }
}

/// Builds the REST API.
pub fn router(state: AppState) -> Router {
    let sandbox = "/v1/namespaces/{ns}/sandboxes/{id}";
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/v1/namespaces", get(list_namespaces).post(create_namespace))
        .route("/v1/namespaces/{ns}", delete(delete_namespace))
        .route("/v1/namespaces/{ns}/keys", post(create_key))
        .route("/v1/namespaces/{ns}/keys/{id}", delete(delete_key))
        .route("/v1/namespaces/{ns}/sandboxes", get(sandboxes::list).post(sandboxes::create))
        .route(sandbox, get(sandboxes::get).delete(sandboxes::delete))
        .route(&format!("{sandbox}/stop"), post(sandboxes::stop))
        .route(&format!("{sandbox}/timeout"), post(sandboxes::set_timeout))
        .route(&format!("{sandbox}/events"), get(sandboxes::events))
        .route(&format!("{sandbox}/daemon/{{*path}}"), any(daemon::forward))
        .route("/v1/nodes", get(nodes::list))
        .route("/v1/nodes/{id}", get(nodes::get))
        .route("/v1/images", get(images::list))
        .route("/v1/images/pull", post(images::pull))
        .route("/v1/images/import", post(images::import))
        .route("/v1/images/{*reference}", delete(images::delete))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .with_state(state)
}

async fn count_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let method = request.method().as_str().to_owned();
    let response = if state.shutdown.is_cancelled() {
        ApiError::ShuttingDown.into_response()
    } else {
        next.run(request).await
    };
    state.requests.record(&method, response.status().as_u16());
    response
}

async fn not_found(request: Request) -> ApiError {
    ApiError::NotFound(request.uri().path().to_owned())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let snapshot = state.controller.call(|reply| Command::Metrics { reply }).await?;
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(text, "# HELP hutch_sandboxes Sandboxes known to the server, by state.");
    let _ = writeln!(text, "# TYPE hutch_sandboxes gauge");
    for (state, count) in &snapshot.sandboxes {
        let _ = writeln!(text, "hutch_sandboxes{{state=\"{state}\"}} {count}");
    }
    let _ = writeln!(text, "# HELP hutch_nodes Dataplane nodes, by status.");
    let _ = writeln!(text, "# TYPE hutch_nodes gauge");
    let _ = writeln!(text, "hutch_nodes{{status=\"ready\"}} {}", snapshot.nodes_ready);
    let _ = writeln!(text, "hutch_nodes{{status=\"lost\"}} {}", snapshot.nodes_lost);
    let _ = writeln!(
        text,
        "# HELP hutch_http_requests_total REST requests answered, by method and status."
    );
    let _ = writeln!(text, "# TYPE hutch_http_requests_total counter");
    for ((method, status), count) in state.requests.snapshot() {
        let _ = writeln!(
            text,
            "hutch_http_requests_total{{method=\"{method}\",status=\"{status}\"}} {count}"
        );
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response())
}

async fn list_namespaces(
    State(state): State<AppState>,
    Auth(principal): Auth,
) -> Result<Json<Vec<Namespace>>, ApiError> {
    principal.require_admin()?;
    Ok(Json(state.controller.call(|reply| Command::ListNamespaces { reply }).await?))
}

async fn create_namespace(
    State(state): State<AppState>,
    Auth(principal): Auth,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    principal.require_admin()?;
    let request: CreateNamespace = parse_json(&read_json(&headers, body).await?)?;
    validate_namespace_name(&request.name)?;
    let name = request.name;
    let namespace =
        state.controller.call(|reply| Command::CreateNamespace { name, reply }).await??;
    Ok((StatusCode::CREATED, Json(namespace)).into_response())
}

/// Stops and forgets every sandbox of the namespace and revokes its keys;
/// 202 because the sandboxes stop after the answer.
async fn delete_namespace(
    State(state): State<AppState>,
    Auth(principal): Auth,
    PathParams(name): PathParams<String>,
) -> Result<Response, ApiError> {
    principal.require_admin()?;
    let namespace =
        state.controller.call(|reply| Command::DeleteNamespace { name, reply }).await??;
    Ok((StatusCode::ACCEPTED, Json(namespace)).into_response())
}

async fn create_key(
    State(state): State<AppState>,
    Auth(principal): Auth,
    PathParams(namespace): PathParams<String>,
) -> Result<Response, ApiError> {
    principal.require_admin()?;
    let key = state.controller.call(|reply| Command::CreateKey { namespace, reply }).await??;
    Ok((StatusCode::CREATED, Json(key)).into_response())
}

async fn delete_key(
    State(state): State<AppState>,
    Auth(principal): Auth,
    PathParams((namespace, id)): PathParams<(String, String)>,
) -> Result<StatusCode, ApiError> {
    principal.require_admin()?;
    state.controller.call(|reply| Command::DeleteKey { namespace, id, reply }).await??;
    Ok(StatusCode::NO_CONTENT)
}

/// Reads a JSON body of at most [`MAX_JSON_BODY`] bytes. An empty body is
/// `None`, so routes whose body is optional can default it.
pub async fn read_json(
    headers: &HeaderMap,
    body: Body,
) -> Result<Option<serde_json::Value>, ApiError> {
    let declared_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .map(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json" || mime.ends_with("+json")
        });
    if let Some(length) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok())
        && length > MAX_JSON_BODY as u64
    {
        return Err(ApiError::PayloadTooLarge(MAX_JSON_BODY));
    }
    let bytes = http_body_util::Limited::new(body, MAX_JSON_BODY)
        .collect()
        .await
        .map_err(|error| {
            if error.is::<http_body_util::LengthLimitError>() {
                ApiError::PayloadTooLarge(MAX_JSON_BODY)
            } else {
                ApiError::BadRequest(format!("cannot read the request body: {error}"))
            }
        })?
        .to_bytes();
    if bytes.is_empty() {
        return Ok(None);
    }
    if declared_json != Some(true) {
        return Err(ApiError::UnsupportedMediaType);
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|error| ApiError::InvalidJson(format!("request body is not valid JSON: {error}")))
}

/// Deserializes a JSON value, naming the field that does not fit.
pub fn parse_json<T: DeserializeOwned>(value: &Option<serde_json::Value>) -> Result<T, ApiError> {
    let value = value.clone().unwrap_or_else(|| serde_json::Value::Object(Default::default()));
    if !value.is_object() {
        return Err(ApiError::InvalidJson("request body must be a JSON object".to_owned()));
    }
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let field = if path == "." { "body".to_owned() } else { path };
        ApiError::InvalidField(InvalidField { field, message: error.into_inner().to_string() })
    })
}
