//! `/v1/nodes`: the dataplanes the server knows, with what they offer and
//! what is placed on them (admin only).

use axum::Json;
use axum::extract::State;

use super::{ApiError, AppState, Auth, PathParams};
use crate::controller::Command;
use crate::model::Node;

pub async fn list(
    State(state): State<AppState>,
    Auth(principal): Auth,
) -> Result<Json<Vec<Node>>, ApiError> {
    principal.require_admin()?;
    Ok(Json(state.controller.call(|reply| Command::DescribeNodes { only: None, reply }).await?))
}

pub async fn get(
    State(state): State<AppState>,
    Auth(principal): Auth,
    PathParams(id): PathParams<String>,
) -> Result<Json<Node>, ApiError> {
    principal.require_admin()?;
    let only = Some(id.clone());
    let nodes = state.controller.call(|reply| Command::DescribeNodes { only, reply }).await?;
    nodes.into_iter().next().map(Json).ok_or(ApiError::NodeNotFound(id))
}
