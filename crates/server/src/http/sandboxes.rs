//! `/v1/namespaces/{ns}/sandboxes...`: create, list, get, delete, stop,
//! timeout and the SSE event stream.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use http::{HeaderMap, StatusCode};
use tokio::sync::broadcast;

use super::{ApiError, AppState, Auth, PathParams, parse_json, read_json};
use crate::controller::{Command, Handle, ListFilter};
use crate::keys::sha256_hex;
use crate::model::{CreateSandbox, Sandbox, SandboxList, SandboxState, SetTimeout, StopSandbox};
use crate::validate::{InvalidField, validate_create, validate_timeout};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::InvalidField(InvalidField { field: field.to_owned(), message: message.into() })
}

pub async fn create(
    State(state): State<AppState>,
    Auth(principal): Auth,
    PathParams(namespace): PathParams<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    principal.require_namespace(&namespace, ApiError::NamespaceNotFound(namespace.clone()))?;
    let request: CreateSandbox = parse_json(&read_json(&headers, body).await?)?;
    let idempotency = match headers.get("idempotency-key") {
        None => None,
        Some(value) => {
            let key =
                value.to_str().ok().filter(|key| !key.is_empty() && key.len() <= 255).ok_or_else(
                    || invalid("Idempotency-Key", "must be 1 to 255 visible ASCII characters"),
                )?;
            // The parsed request, re-serialized, is the body's canonical form:
            // whitespace and key order do not make two bodies different.
            let canonical = serde_json::to_vec(&request)
                .map_err(|error| ApiError::Internal(Box::new(error)))?;
            Some((key.to_owned(), sha256_hex(&canonical)))
        }
    };
    let request = Box::new(validate_create(request)?);
    let (sandbox, created) = state
        .controller
        .call(|reply| Command::CreateSandbox { namespace, request, idempotency, reply })
        .await??;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(sandbox)).into_response())
}

pub async fn list(
    State(state): State<AppState>,
    Auth(principal): Auth,
    PathParams(namespace): PathParams<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<SandboxList>, ApiError> {
    principal.require_namespace(&namespace, ApiError::NamespaceNotFound(namespace.clone()))?;
    let filter = parse_list_query(query.as_deref().unwrap_or(""))?;
    let list = state
        .controller
        .call(|reply| Command::ListSandboxes { namespace, filter, reply })
        .await??;
    Ok(Json(list))
}

fn parse_list_query(query: &str) -> Result<ListFilter, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
        .map_err(|error| ApiError::BadRequest(format!("invalid query string: {error}")))?;
    let mut filter = ListFilter { limit: DEFAULT_LIMIT, ..ListFilter::default() };
    for (name, value) in pairs {
        match name.as_str() {
            "state" => {
                for state in value.split(',').filter(|s| !s.is_empty()) {
                    let state = SandboxState::parse(state).ok_or_else(|| {
                        invalid("state", format!("{state:?} is not one of pending, creating, running, completed, failed, terminated"))
                    })?;
                    filter.states.push(state);
                }
            }
            "tag" => {
                let (key, tag_value) =
                    value.split_once('=').ok_or_else(|| invalid("tag", "must be key=value"))?;
                filter.tags.push((key.to_owned(), tag_value.to_owned()));
            }
            "include_stopped" => {
                filter.include_stopped = match value.as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(invalid("include_stopped", "must be true or false")),
                };
            }
            "limit" => {
                filter.limit =
                    value.parse().ok().filter(|limit| (1..=MAX_LIMIT).contains(limit)).ok_or_else(
                        || invalid("limit", format!("must be between 1 and {MAX_LIMIT}")),
                    )?;
            }
            "cursor" => {
                let cursor = value
                    .parse()
                    .map_err(|_| invalid("cursor", "is not a cursor this server returned"))?;
                filter.cursor = Some(cursor);
            }
            other => return Err(invalid(other, "unknown query parameter")),
        }
    }
    Ok(filter)
}

pub async fn get(
    State(state): State<AppState>,
    Auth(principal): Auth,
    PathParams((namespace, id)): PathParams<(String, String)>,
) -> Result<Json<Sandbox>, ApiError> {
    principal.require_namespace(&namespace, ApiError::SandboxNotFound(id.clone()))?;
    Ok(Json(get_sandbox(&state.controller, namespace, id).await?))
}

async fn get_sandbox(
    controller: &Handle,
    namespace: String,
    id: String,
) -> Result<Sandbox, ApiError> {
    Ok(controller.call(|reply| Command::GetSandbox { namespace, id, reply }).await??)
}

pub async fn delete(
    State(state): State<AppState>,
    Auth(principal): Auth,
    PathParams((namespace, id)): PathParams<(String, String)>,
) -> Result<Response, ApiError> {
    principal.require_namespace(&namespace, ApiError::SandboxNotFound(id.clone()))?;
    let sandbox =
        state.controller.call(|reply| Command::DeleteSandbox { namespace, id, reply }).await??;
    Ok((StatusCode::ACCEPTED, Json(sandbox)).into_response())
}

pub async fn stop(
    State(state): State<AppState>,
    Auth(principal): Auth,
    PathParams((namespace, id)): PathParams<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    principal.require_namespace(&namespace, ApiError::SandboxNotFound(id.clone()))?;
    let request: StopSandbox = parse_json(&read_json(&headers, body).await?)?;
    if request.grace_secs.is_some_and(|grace| grace > 3600) {
        return Err(invalid("grace_secs", "must be at most 3600"));
    }
    let grace_secs = request.grace_secs;
    let sandbox = state
        .controller
        .call(|reply| Command::StopSandbox { namespace, id, grace_secs, reply })
        .await??;
    Ok((StatusCode::ACCEPTED, Json(sandbox)).into_response())
}

pub async fn set_timeout(
    State(state): State<AppState>,
    Auth(principal): Auth,
    PathParams((namespace, id)): PathParams<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Sandbox>, ApiError> {
    principal.require_namespace(&namespace, ApiError::SandboxNotFound(id.clone()))?;
    let value = read_json(&headers, body).await?;
    if value.is_none() {
        return Err(invalid("timeout_secs", "is required"));
    }
    let request: SetTimeout = parse_json(&value)?;
    validate_timeout("timeout_secs", request.timeout_secs)?;
    let timeout_secs = request.timeout_secs;
    let sandbox = state
        .controller
        .call(|reply| Command::SetTimeout { namespace, id, timeout_secs, reply })
        .await??;
    Ok(Json(sandbox))
}

/// SSE: the sandbox as it is now, then every change, until it is terminal.
pub async fn events(
    State(state): State<AppState>,
    Auth(principal): Auth,
    PathParams((namespace, id)): PathParams<(String, String)>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    principal.require_namespace(&namespace, ApiError::SandboxNotFound(id.clone()))?;
    // Subscribe before reading the current state, so no change falls between.
    let events = state.controller.subscribe();
    let current = get_sandbox(&state.controller, namespace.clone(), id.clone()).await?;
    let stream = EventStream {
        first: Some(Arc::new(current)),
        events,
        controller: state.controller.clone(),
        shutdown: state.shutdown.clone(),
        namespace,
        id,
        last: None,
        done: false,
    };
    let stream = futures_util::stream::unfold(stream, |mut stream| async move {
        let sandbox = stream.next().await?;
        let event = Event::default().event("state").json_data(&*sandbox).unwrap_or_default();
        Some((Ok(event), stream))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

struct EventStream {
    first: Option<Arc<Sandbox>>,
    events: broadcast::Receiver<Arc<Sandbox>>,
    controller: Handle,
    shutdown: tokio_util::sync::CancellationToken,
    namespace: String,
    id: String,
    last: Option<Arc<Sandbox>>,
    done: bool,
}

impl EventStream {
    async fn next(&mut self) -> Option<Arc<Sandbox>> {
        if self.done {
            return None;
        }
        let sandbox = match self.first.take() {
            Some(first) => first,
            None => loop {
                let received = tokio::select! {
                    () = self.shutdown.cancelled() => return None,
                    received = self.events.recv() => received,
                };
                match received {
                    Ok(sandbox) if sandbox.id == self.id => break sandbox,
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Fell behind: the current state is all that matters.
                        let sandbox =
                            get_sandbox(&self.controller, self.namespace.clone(), self.id.clone())
                                .await
                                .ok()?;
                        if self.last.as_deref() == Some(&sandbox) {
                            continue;
                        }
                        break Arc::new(sandbox);
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            },
        };
        self.done = sandbox.state.is_terminal();
        self.last = Some(sandbox.clone());
        Some(sandbox)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_query_parses_repeated_tags_and_states() {
        let filter = parse_list_query(
            "state=running,pending&tag=a=1&tag=b=x%3Dy&limit=5&include_stopped=true",
        )
        .unwrap();
        assert_eq!(filter.states, [SandboxState::Running, SandboxState::Pending]);
        assert_eq!(filter.tags, [("a".into(), "1".into()), ("b".into(), "x=y".into())]);
        assert_eq!(filter.limit, 5);
        assert!(filter.include_stopped);
        assert!(parse_list_query("limit=0").is_err());
        assert!(parse_list_query("bogus=1").is_err());
        assert!(parse_list_query("cursor=nope").is_err());
    }
}
