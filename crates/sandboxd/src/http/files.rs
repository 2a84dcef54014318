//! File endpoints. Paths come in the `path` query parameter, are absolute,
//! and are normalized by [`hutch_api::parse_absolute_path`].

use std::path::PathBuf;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use hutch_api::{ErrorCode, FileInfo, ListFilesResponse, MoveRequest};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{ApiError, Json, Query};
use crate::files::{self, FileError, Upload};
use crate::range::{RangeOutcome, parse_range};

impl From<FileError> for ApiError {
    fn from(e: FileError) -> ApiError {
        let code = match &e {
            FileError::NotFound(_) => ErrorCode::FileNotFound,
            FileError::NotADirectory(_) => ErrorCode::NotADirectory,
            FileError::IsADirectory(_) => ErrorCode::IsADirectory,
            FileError::AlreadyExists(_) => ErrorCode::AlreadyExists,
            FileError::DirectoryNotEmpty(_) => ErrorCode::DirectoryNotEmpty,
            FileError::PermissionDenied(_) => ErrorCode::PermissionDenied,
            FileError::Root(_) | FileError::InvalidMode(_) => ErrorCode::BadRequest,
            FileError::Io { .. } => return ApiError::internal(e),
        };
        ApiError::new(code, e.to_string())
    }
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, FileError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(e) => Err(ApiError::internal(format!("file task failed: {e}"))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathQuery {
    path: String,
}

impl PathQuery {
    fn parse(&self) -> Result<PathBuf, ApiError> {
        Ok(hutch_api::parse_absolute_path(&self.path)?)
    }
}

/// Streams a file, honouring a single `Range`.
pub async fn read(
    Query(query): Query<PathQuery>,
    headers: http::HeaderMap,
) -> Result<Response, ApiError> {
    let path = query.parse()?;
    let opened = path.clone();
    let (file, size) = blocking(move || files::open_for_read(&opened)).await?;
    let range = headers.get(http::header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, len, content_range) = match parse_range(range, size) {
        RangeOutcome::Full => (http::StatusCode::OK, 0, size, None),
        RangeOutcome::Partial { start, end } => (
            http::StatusCode::PARTIAL_CONTENT,
            start,
            end - start + 1,
            Some(format!("bytes {start}-{end}/{size}")),
        ),
        RangeOutcome::Unsatisfiable => {
            let mut response = ApiError::new(
                ErrorCode::RangeNotSatisfiable,
                format!("range {} is outside the file's {size} bytes", range.unwrap_or_default()),
            )
            .into_response();
            if let Ok(value) = http::HeaderValue::from_str(&format!("bytes */{size}")) {
                response.headers_mut().insert(http::header::CONTENT_RANGE, value);
            }
            return Ok(response);
        }
    };
    let (sink, chunks) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || files::stream_file(&path, file, start, len, sink));
    let mut response = Response::new(Body::from_stream(ReceiverStream::new(chunks)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    headers.insert(http::header::ACCEPT_RANGES, http::HeaderValue::from_static("bytes"));
    if let Some(value) = content_range.and_then(|v| http::HeaderValue::from_str(&v).ok()) {
        headers.insert(http::header::CONTENT_RANGE, value);
    }
    Ok(response)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteQuery {
    path: String,
    mode: Option<String>,
}

/// Streams the body into a file: parents are created, and the file appears
/// atomically once the whole body has arrived.
pub async fn write(
    Query(query): Query<WriteQuery>,
    body: Body,
) -> Result<Json<FileInfo>, ApiError> {
    let path = hutch_api::parse_absolute_path(&query.path)?;
    let mode = query.mode.as_deref().map(files::parse_mode).transpose()?;
    let (sink, mut chunks) = mpsc::channel::<bytes::Bytes>(8);
    let writer = tokio::task::spawn_blocking(move || {
        let mut upload = Upload::begin(&path, mode)?;
        while let Some(chunk) = chunks.blocking_recv() {
            upload.write(&chunk)?;
        }
        Ok::<_, FileError>(upload)
    });
    let mut frames = body.into_data_stream();
    let mut body_error = None;
    while let Some(frame) = frames.next().await {
        match frame {
            Ok(data) => {
                // A send fails only when the writer stopped on an error,
                // which joining it below reports.
                if sink.send(data).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                body_error = Some(e);
                break;
            }
        }
    }
    drop(sink);
    let upload =
        writer.await.map_err(|e| ApiError::internal(format!("upload task failed: {e}")))??;
    if let Some(e) = body_error {
        // Dropping the unfinished upload removes its temporary file.
        drop(upload);
        return Err(ApiError::new(ErrorCode::BadRequest, format!("request body broke off: {e}")));
    }
    Ok(Json(blocking(move || upload.commit()).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    path: String,
    #[serde(default)]
    recursive: bool,
}

pub async fn delete(Query(query): Query<DeleteQuery>) -> Result<http::StatusCode, ApiError> {
    let path = hutch_api::parse_absolute_path(&query.path)?;
    blocking(move || files::remove(&path, query.recursive)).await?;
    Ok(http::StatusCode::NO_CONTENT)
}

pub async fn stat(Query(query): Query<PathQuery>) -> Result<Json<FileInfo>, ApiError> {
    let path = query.parse()?;
    Ok(Json(blocking(move || files::stat(&path)).await?))
}

pub async fn list(Query(query): Query<PathQuery>) -> Result<Json<ListFilesResponse>, ApiError> {
    let path = query.parse()?;
    let shown = path.to_string_lossy().into_owned();
    let entries = blocking(move || files::list(&path)).await?;
    Ok(Json(ListFilesResponse { path: shown, entries }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MkdirQuery {
    path: String,
    mode: Option<String>,
}

pub async fn mkdir(Query(query): Query<MkdirQuery>) -> Result<Json<FileInfo>, ApiError> {
    let path = hutch_api::parse_absolute_path(&query.path)?;
    let mode = query.mode.as_deref().map(files::parse_mode).transpose()?;
    Ok(Json(blocking(move || files::mkdir(&path, mode)).await?))
}

pub async fn rename(Json(request): Json<MoveRequest>) -> Result<Json<FileInfo>, ApiError> {
    let from = hutch_api::parse_absolute_path(&request.from)?;
    let to = hutch_api::parse_absolute_path(&request.to)?;
    Ok(Json(blocking(move || files::rename(&from, &to, request.overwrite)).await?))
}

/// Streams a tar archive of a directory.
pub async fn archive_download(Query(query): Query<PathQuery>) -> Result<Response, ApiError> {
    let path = query.parse()?;
    let checked = path.clone();
    let info = blocking(move || files::stat(&checked)).await?;
    if info.kind != hutch_api::FileKind::Dir {
        return Err(FileError::NotADirectory(path).into());
    }
    let (sink, chunks) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let mut out = files::ChunkWriter::new(sink);
        if let Err(e) = files::archive_dir(&path, &mut out) {
            tracing::warn!("archiving {} failed: {e}", path.display());
            out.fail(e);
        }
    });
    let mut response = Response::new(Body::from_stream(ReceiverStream::new(chunks)));
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/x-tar"));
    Ok(response)
}

/// Unpacks a tar archive streamed in the body into a directory.
pub async fn archive_upload(
    Query(query): Query<PathQuery>,
    body: Body,
) -> Result<Json<FileInfo>, ApiError> {
    let path = query.parse()?;
    let stream = body.into_data_stream().map(|frame| frame.map_err(std::io::Error::other));
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
    Ok(Json(blocking(move || files::extract_archive(reader, &path)).await?))
}
