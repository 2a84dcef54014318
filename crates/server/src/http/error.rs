//! `ApiError`: every failure of the REST API, mapped to one status and code
//! and rendered as `{"error":{"code","message"}}`.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::StatusCode;

use crate::controller::{ControlError, error_chain};
use crate::model::{ErrorBody, ErrorDetail, SandboxState};
use crate::validate::InvalidField;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid API key (Authorization: Bearer <key>)")]
    Unauthenticated,
    #[error("this route needs the admin key")]
    Forbidden,
    #[error("no route for {0}")]
    NotFound(String),
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("sandbox {0} not found")]
    SandboxNotFound(String),
    #[error("namespace {0} not found")]
    NamespaceNotFound(String),
    #[error("key {0} not found")]
    KeyNotFound(String),
    #[error("node {0} not found")]
    NodeNotFound(String),
    #[error("namespace {0} is reserved: it always exists and cannot be deleted")]
    NamespaceReserved(String),
    #[error("{0}")]
    InvalidJson(String),
    #[error("invalid field {0}")]
    InvalidField(#[from] InvalidField),
    #[error("{0}")]
    BadRequest(String),
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("content-type must be application/json")]
    UnsupportedMediaType,
    #[error("idempotency key {0:?} was already used with a different body")]
    IdempotencyConflict(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("sandbox {id} is {state}{}", reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default())]
    SandboxNotRunning { id: String, state: SandboxState, reason: Option<String> },
    #[error("cannot reach the sandbox's node")]
    SandboxUnreachable(#[source] BoxError),
    #[error("no node is connected")]
    NoNodes,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("internal error")]
    Internal(#[source] BoxError),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthenticated => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::NotFound(_)
            | ApiError::SandboxNotFound(_)
            | ApiError::NamespaceNotFound(_)
            | ApiError::KeyNotFound(_)
            | ApiError::NodeNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::InvalidJson(_) | ApiError::InvalidField(_) | ApiError::BadRequest(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::IdempotencyConflict(_)
            | ApiError::AlreadyExists(_)
            | ApiError::NamespaceReserved(_)
            | ApiError::SandboxNotRunning { .. } => StatusCode::CONFLICT,
            ApiError::SandboxUnreachable(_) => StatusCode::BAD_GATEWAY,
            ApiError::NoNodes | ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthenticated => "unauthenticated",
            ApiError::Forbidden => "forbidden",
            ApiError::NotFound(_) | ApiError::KeyNotFound(_) | ApiError::NodeNotFound(_) => {
                "not_found"
            }
            ApiError::SandboxNotFound(_) => "sandbox_not_found",
            ApiError::NamespaceNotFound(_) => "namespace_not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidField(_) => "invalid_field",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::IdempotencyConflict(_) => "idempotency_conflict",
            ApiError::AlreadyExists(_) => "already_exists",
            ApiError::NamespaceReserved(_) => "namespace_reserved",
            ApiError::SandboxNotRunning { .. } => "sandbox_not_running",
            ApiError::SandboxUnreachable(_) => "sandbox_unreachable",
            ApiError::NoNodes => "no_nodes",
            ApiError::ShuttingDown => "shutting_down",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl From<ControlError> for ApiError {
    fn from(error: ControlError) -> Self {
        match error {
            ControlError::NamespaceNotFound(ns) => ApiError::NamespaceNotFound(ns),
            ControlError::NamespaceExists(ns) => ApiError::AlreadyExists(format!("namespace {ns}")),
            ControlError::NamespaceReserved(ns) => ApiError::NamespaceReserved(ns),
            ControlError::SandboxNotFound(id) => ApiError::SandboxNotFound(id),
            ControlError::KeyNotFound(id) => ApiError::KeyNotFound(id),
            ControlError::IdempotencyConflict(key) => ApiError::IdempotencyConflict(key),
            ControlError::NotRunning { id, state, reason } => {
                ApiError::SandboxNotRunning { id, state, reason }
            }
            ControlError::ShuttingDown => ApiError::ShuttingDown,
            ControlError::TooLarge(field) => ApiError::InvalidField(field),
            error @ (ControlError::NodeNotRegistered(_) | ControlError::Store(_)) => {
                ApiError::Internal(Box::new(error))
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        // What the client is not told is logged instead.
        match &self {
            ApiError::Internal(source) => {
                tracing::error!(error = %error_chain(source.as_ref()), "request failed");
            }
            ApiError::SandboxUnreachable(source) => {
                tracing::warn!(error = %error_chain(source.as_ref()), "cannot reach a node proxy");
            }
            _ => {}
        }
        let (state, reason) = match &self {
            ApiError::SandboxNotRunning { state, reason, .. } => (Some(*state), reason.clone()),
            _ => (None, None),
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code().to_owned(),
                message: self.to_string(),
                state,
                reason,
            },
        };
        (status, Json(body)).into_response()
    }
}
