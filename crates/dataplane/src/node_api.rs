//! The node API on the proxy (`/v1/node/...`, node token required): the
//! node's images, for the server's `/v1/images` routes.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hutch_image::{Image, PullProgress, RegistryAuth};
use hutch_relay::BoxBody;
use hyper::body::Incoming;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::owner::{Node, error_chain};
use crate::proxy::{error, json};

/// Largest JSON body the node API reads.
const MAX_JSON: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
struct PullRequest {
    reference: String,
    username: Option<String>,
    password: Option<String>,
}

pub(crate) async fn handle(node: &Node, req: Request<Incoming>) -> Response<BoxBody> {
    let path = req.uri().path().to_owned();
    let Some(rest) = path.strip_prefix("/v1/node/images") else {
        return error(StatusCode::NOT_FOUND, "not_found", "no such node route", None);
    };
    match (req.method().clone(), rest) {
        (Method::GET, "" | "/") => list(node),
        (Method::POST, "/pull") => pull(node, req).await,
        (Method::POST, "/import") => import(node, req).await,
        (Method::DELETE, reference) if reference.len() > 1 => {
            remove(node, &percent_decode(&reference[1..])).await
        }
        (_, "" | "/" | "/pull" | "/import") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed", None)
        }
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such node route", None),
    }
}

fn list(node: &Node) -> Response<BoxBody> {
    match node.images.list() {
        Ok(images) => {
            let images: Vec<_> = images.iter().map(|image| image_json(node, image)).collect();
            json(StatusCode::OK, &serde_json::Value::Array(images))
        }
        Err(e) => internal(&e),
    }
}

async fn pull(node: &Node, req: Request<Incoming>) -> Response<BoxBody> {
    let body = match http_body_util::Limited::new(req.into_body(), MAX_JSON).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "body too large",
                None,
            );
        }
    };
    let request: PullRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_json", &e.to_string(), None),
    };
    let auth = match (request.username, request.password) {
        (Some(username), Some(password)) => RegistryAuth::Basic { username, password },
        _ => node.config.registry_auth(&request.reference),
    };
    let (lines_tx, lines_rx) = mpsc::channel::<serde_json::Value>(64);
    let images = node.images.clone();
    let options =
        hutch_image::PullOptions { policy: hutch_image::PullPolicy::Always, ..node.pull_options() };
    let stored_at = |image: &Image, images: &hutch_image::ImageStore| {
        serde_json::json!({
            "reference": image.reference,
            "digest": image.digest,
            "size_bytes": image.size,
            "created_at": images.stored_at(&image.reference).map(rfc3339),
        })
    };
    tokio::spawn(async move {
        let _ = lines_tx.send(serde_json::json!({ "status": "resolving" })).await;
        let (progress_tx, mut progress_rx) = mpsc::unbounded_channel();
        let pull = images.pull(&request.reference, auth, options, Some(progress_tx));
        tokio::pin!(pull);
        let result = loop {
            tokio::select! {
                result = &mut pull => break result,
                Some(event) = progress_rx.recv() => {
                    if let Some(line) = progress_line(event) {
                        // A client that went away stops the stream, not the pull.
                        let _ = lines_tx.send(line).await;
                    }
                }
            }
        };
        while let Ok(event) = progress_rx.try_recv() {
            if let Some(line) = progress_line(event) {
                let _ = lines_tx.send(line).await;
            }
        }
        let last = match result {
            Ok(image) => {
                serde_json::json!({ "status": "done", "image": stored_at(&image, &images) })
            }
            Err(e) => serde_json::json!({
                "status": "error",
                "error": { "code": "image_pull_failed", "message": error_chain(&e) },
            }),
        };
        let _ = lines_tx.send(last).await;
    });
    let lines = futures_util::stream::unfold(lines_rx, |mut rx| async move {
        let line = rx.recv().await?;
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        Some((Ok::<_, hutch_relay::BoxError>(Frame::data(Bytes::from(bytes))), rx))
    });
    let mut response = Response::new(StreamBody::new(lines.boxed()).boxed_unsync());
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/x-ndjson"));
    response
}

fn progress_line(event: PullProgress) -> Option<serde_json::Value> {
    match event {
        PullProgress::LayerStarted { digest, total } => Some(
            serde_json::json!({ "status": "layer", "digest": digest, "done_bytes": 0, "total_bytes": total }),
        ),
        PullProgress::LayerBytes { digest, downloaded, total } => Some(serde_json::json!({
            "status": "layer", "digest": digest, "done_bytes": downloaded, "total_bytes": total,
        })),
        PullProgress::LayerDone { digest } | PullProgress::LayerCached { digest } => {
            Some(serde_json::json!({ "status": "layer", "digest": digest, "done": true }))
        }
        PullProgress::Resolved { .. } => None,
    }
}

async fn import(node: &Node, req: Request<Incoming>) -> Response<BoxBody> {
    let dir = node.config.data_dir.join("tmp");
    if let Err(e) = tokio::fs::create_dir_all(&dir).await {
        return internal(&e);
    }
    let path = dir.join(format!("import-{}.tar", uuid::Uuid::new_v4().simple()));
    let _guard = RemoveOnDrop(path.clone());
    let written = async {
        let mut file = tokio::fs::File::create(&path).await?;
        let mut body = req.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(std::io::Error::other)?;
            if let Ok(data) = frame.into_data() {
                file.write_all(&data).await?;
            }
        }
        file.flush().await
    }
    .await;
    if let Err(e) = written {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("read the tarball: {e}"),
            None,
        );
    }
    match node.images.import(&path).await {
        Ok(images) => {
            let images: Vec<_> = images.iter().map(|image| image_json(node, image)).collect();
            json(StatusCode::CREATED, &serde_json::Value::Array(images))
        }
        Err(e) => error(StatusCode::BAD_REQUEST, "invalid_image", &error_chain(&e), None),
    }
}

async fn remove(node: &Node, reference: &str) -> Response<BoxBody> {
    match node.images.remove(reference).await {
        Ok(()) => {
            let mut response = Response::new(crate::proxy::full(Bytes::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        }
        Err(hutch_image::RemoveImageError::NotFound { reference }) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("image {reference} is not on this node"),
            None,
        ),
        Err(e @ hutch_image::RemoveImageError::InvalidReference(_)) => {
            error(StatusCode::BAD_REQUEST, "invalid_field", &error_chain(&e), None)
        }
        Err(e) => internal(&e),
    }
}

fn image_json(node: &Node, image: &Image) -> serde_json::Value {
    serde_json::json!({
        "reference": image.reference,
        "digest": image.digest,
        "size_bytes": image.size,
        "created_at": node.images.stored_at(&image.reference).map(rfc3339),
    })
}

fn internal(e: &dyn std::error::Error) -> Response<BoxBody> {
    error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &error_chain(e), None)
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `%XX` escapes decoded; anything else kept as is.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) =
                (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex))
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `2026-11-22T17:46:10Z`.
pub(crate) fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_795_369_570);
        assert_eq!(rfc3339(t), "2026-11-22T17:46:10Z");
        let leap = UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn references_are_percent_decoded() {
        assert_eq!(
            percent_decode("docker.io%2Flibrary%2Fbusybox%3Alatest"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(percent_decode("a%zz%2"), "a%zz%2");
    }
}
