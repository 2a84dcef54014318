//! sandboxd's HTTP API: routing, the error type at the edge, and the serve
//! loop. Handlers parse and validate; the supervisor changes state.

mod attach;
mod files;
mod processes;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hutch_api::{ErrorBody, ErrorCode};
use serde::de::DeserializeOwned;

use crate::supervisor::Supervisor;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    pub supervisor: Supervisor,
    pub started: Instant,
}

/// Builds the router. A value, so tests and the benchmark can serve it on
/// any listener.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/info", get(processes::info))
        .route("/exec", post(processes::exec))
        .route("/processes", get(processes::list).post(processes::start))
        .route("/processes/{id}", get(processes::get).delete(processes::remove))
        .route("/processes/{id}/wait", get(processes::wait))
        .route("/processes/{id}/kill", post(processes::kill))
        .route("/processes/{id}/signal", post(processes::signal))
        .route("/processes/{id}/stdin", post(processes::write_stdin))
        .route("/processes/{id}/stdin/close", post(processes::close_stdin))
        .route("/processes/{id}/resize", post(processes::resize))
        .route("/processes/{id}/output", get(processes::output))
        .route("/processes/{id}/output/stream", get(processes::output_stream))
        .route("/processes/{id}/attach", get(attach::attach))
        .route("/files", get(files::read).put(files::write).delete(files::delete))
        .route("/files/stat", get(files::stat))
        .route("/files/list", get(files::list))
        .route("/files/mkdir", post(files::mkdir))
        .route("/files/move", post(files::rename))
        .route("/files/archive", get(files::archive_download).put(files::archive_upload))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(Arc::new(state))
}

type State = axum::extract::State<Arc<AppState>>;

async fn health() -> axum::Json<hutch_api::Health> {
    axum::Json(hutch_api::Health { status: "ok".into() })
}

async fn not_found(uri: http::Uri) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no route for {}", uri.path()))
}

async fn method_not_allowed(method: http::Method, uri: http::Uri) -> ApiError {
    ApiError::new(ErrorCode::MethodNotAllowed, format!("{method} is not allowed on {}", uri.path()))
}

/// The one error type at the HTTP edge: a stable code, the matching status,
/// and a message for people.
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError { code, message: message.into() }
    }

    /// An unexpected failure. The detail is logged; the client sees it too,
    /// because inside a sandbox there is nothing to hide from its owner.
    pub fn internal(message: impl std::fmt::Display) -> ApiError {
        tracing::error!("internal error: {message}");
        ApiError::new(ErrorCode::Internal, message.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = http::StatusCode::from_u16(self.code.http_status())
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(ErrorBody::new(self.code, self.message))).into_response()
    }
}

/// `axum::Json`, but rejections become [`ApiError`]s.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Json(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    let code = match &rejection {
        JsonRejection::MissingJsonContentType(_) => ErrorCode::UnsupportedMediaType,
        JsonRejection::BytesRejection(_) if rejection.status() == 413 => ErrorCode::PayloadTooLarge,
        _ => ErrorCode::InvalidJson,
    };
    ApiError::new(code, rejection.body_text())
}

/// `axum::extract::Query`, but rejections become [`ApiError`]s.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Query(value)),
            Err(rejection) => Err(query_rejection(rejection)),
        }
    }
}

/// `axum::extract::Path`, but rejections become [`ApiError`]s.
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(rejection) => Err(ApiError::new(ErrorCode::BadRequest, rejection.body_text())),
        }
    }
}

fn query_rejection(rejection: QueryRejection) -> ApiError {
    ApiError::new(ErrorCode::InvalidQuery, rejection.body_text())
}

impl From<hutch_api::ParsePathError> for ApiError {
    fn from(e: hutch_api::ParsePathError) -> ApiError {
        ApiError::new(ErrorCode::InvalidPath, e.to_string())
    }
}
