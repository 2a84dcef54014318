//! `/v1/images...`: forwarded to the node API of every dataplane proxy
//! (`/v1/node/images...`). Lists are merged; pulls, imports and deletes go to
//! every node.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, Method, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hutch_relay::{Backend, BoxBody};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::daemon::{NODE_TOKEN_HEADER, connect, header_value, proxy_authority};
use super::{ApiError, AppState, Auth, PathParams, parse_json, read_json};
use crate::controller::{Command, NodeTarget};

/// An image on a node, as its node API describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub reference: String,
    pub digest: String,
    pub size_bytes: u64,
    pub created_at: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullImage {
    pub reference: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

async fn nodes(state: &AppState) -> Result<Vec<NodeTarget>, ApiError> {
    let nodes = state.controller.call(|reply| Command::ListNodes { reply }).await?;
    if nodes.is_empty() { Err(ApiError::NoNodes) } else { Ok(nodes) }
}

/// Sends one request to a node's API.
async fn node_call(
    state: &AppState,
    node: &NodeTarget,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: Body,
) -> Result<http::Response<BoxBody>, ApiError> {
    let authority = proxy_authority(&node.proxy_url)?;
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, header_value(&authority)?)
        .header(NODE_TOKEN_HEADER, header_value(&state.node_token)?);
    if let Some(content_type) = content_type {
        request = request.header(header::CONTENT_TYPE, content_type);
    }
    let request = request.body(body).map_err(|error| ApiError::Internal(Box::new(error)))?;
    let stream = connect(&authority).await?;
    hutch_relay::forward(stream, Backend::Http1, request)
        .await
        .map_err(|error| ApiError::SandboxUnreachable(Box::new(error)))
}

async fn collect(response: http::Response<BoxBody>) -> Result<(StatusCode, Bytes), ApiError> {
    let status = response.status();
    let bytes =
        response.into_body().collect().await.map_err(ApiError::SandboxUnreachable)?.to_bytes();
    Ok((status, bytes))
}

/// A node's own error answer, passed on as it is.
fn passthrough(status: StatusCode, body: Bytes) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

pub async fn list(State(state): State<AppState>, Auth(_): Auth) -> Result<Response, ApiError> {
    let mut merged: BTreeMap<(String, String), Image> = BTreeMap::new();
    for node in nodes(&state).await? {
        let response =
            node_call(&state, &node, Method::GET, "/v1/node/images", None, Body::empty()).await?;
        let (status, body) = collect(response).await?;
        if !status.is_success() {
            return Ok(passthrough(status, body));
        }
        let images: Vec<Image> = serde_json::from_slice(&body).map_err(|error| {
            ApiError::SandboxUnreachable(
                format!("node {} sent an invalid image list: {error}", node.id).into(),
            )
        })?;
        for image in images {
            merged.insert((image.reference.clone(), image.digest.clone()), image);
        }
    }
    Ok(Json(merged.into_values().collect::<Vec<_>>()).into_response())
}

pub async fn pull(
    State(state): State<AppState>,
    Auth(_): Auth,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let request: PullImage = parse_json(&read_json(&headers, body).await?)?;
    if request.reference.is_empty() {
        return Err(ApiError::InvalidField(crate::validate::InvalidField {
            field: "reference".to_owned(),
            message: "must not be empty".to_owned(),
        }));
    }
    let body = Bytes::from(
        serde_json::to_vec(&request).map_err(|error| ApiError::Internal(Box::new(error)))?,
    );
    let nodes = nodes(&state).await?;
    let mut responses = Vec::new();
    for node in &nodes {
        let response = node_call(
            &state,
            node,
            Method::POST,
            "/v1/node/images/pull",
            Some("application/json"),
            Body::from(body.clone()),
        )
        .await?;
        responses.push(response);
    }
    // The first node's progress is streamed to the client; the other nodes'
    // pulls run to completion in the background.
    let mut responses = responses.into_iter();
    let first = responses.next().ok_or(ApiError::NoNodes)?;
    for other in responses {
        tokio::spawn(async move {
            if let Err(error) = other.into_body().collect().await {
                tracing::warn!(%error, "image pull on another node failed");
            }
        });
    }
    Ok(first.map(Body::new))
}

pub async fn import(
    State(state): State<AppState>,
    Auth(_): Auth,
    request: Request,
) -> Result<Response, ApiError> {
    let nodes = nodes(&state).await?;
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("application/x-tar")
        .to_owned();
    // The tarball is streamed to every node at once: each frame is copied
    // into one bounded channel per node, so the slowest node sets the pace
    // and nothing is held whole in memory.
    let mut senders = Vec::new();
    let mut bodies = Vec::new();
    for _ in &nodes {
        let (sender, receiver) =
            mpsc::channel::<Result<http_body::Frame<Bytes>, std::io::Error>>(8);
        senders.push(sender);
        bodies.push(Body::new(StreamBody::new(ReceiverStream::new(receiver))));
    }
    let mut incoming = request.into_body().into_data_stream();
    tokio::spawn(async move {
        while let Some(chunk) = incoming.next().await {
            let frame = chunk.map(http_body::Frame::data).map_err(std::io::Error::other);
            let failed = frame.is_err();
            for sender in &senders {
                let copy = match &frame {
                    Ok(frame) => {
                        Ok(http_body::Frame::data(frame.data_ref().cloned().unwrap_or_default()))
                    }
                    Err(error) => Err(std::io::Error::other(error.to_string())),
                };
                // A node that hung up is answered on its own response.
                let _ = sender.send(copy).await;
            }
            if failed {
                return;
            }
        }
    });
    let mut calls = Vec::new();
    for (node, body) in nodes.iter().zip(bodies) {
        calls.push(node_call(
            &state,
            node,
            Method::POST,
            "/v1/node/images/import",
            Some(&content_type),
            body,
        ));
    }
    let mut merged: BTreeMap<(String, String), Image> = BTreeMap::new();
    for result in futures_util::future::join_all(calls).await {
        let (status, body) = collect(result?).await?;
        if !status.is_success() {
            return Ok(passthrough(status, body));
        }
        let images: Vec<Image> = serde_json::from_slice(&body).map_err(|error| {
            ApiError::SandboxUnreachable(
                format!("a node sent an invalid import answer: {error}").into(),
            )
        })?;
        for image in images {
            merged.insert((image.reference.clone(), image.digest.clone()), image);
        }
    }
    Ok((StatusCode::CREATED, Json(merged.into_values().collect::<Vec<_>>())).into_response())
}

pub async fn delete(
    State(state): State<AppState>,
    Auth(principal): Auth,
    PathParams(reference): PathParams<String>,
) -> Result<Response, ApiError> {
    principal.require_admin()?;
    let path = format!("/v1/node/images/{}", percent_encode(&reference));
    let mut missing = None;
    let mut deleted = false;
    for node in nodes(&state).await? {
        let response = node_call(&state, &node, Method::DELETE, &path, None, Body::empty()).await?;
        let (status, body) = collect(response).await?;
        match status {
            status if status.is_success() => deleted = true,
            StatusCode::NOT_FOUND => missing = Some(body),
            status => return Ok(passthrough(status, body)),
        }
    }
    match (deleted, missing) {
        (false, Some(body)) => Ok(passthrough(StatusCode::NOT_FOUND, body)),
        _ => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn references_are_percent_encoded() {
        assert_eq!(
            super::percent_encode("docker.io/library/busybox:1.36"),
            "docker.io%2Flibrary%2Fbusybox%3A1.36"
        );
    }
}
