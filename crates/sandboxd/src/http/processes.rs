//! Process endpoints: start, inspect, signal, feed stdin, read output.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::sse::{Event, KeepAlive, Sse};
use bytes::Bytes;
use futures_util::{Stream as FuturesStream, StreamExt};
use hutch_api::{
    Encoding, ErrorCode, ExecRequest, ExecResponse, ExitInfo, Info, OutputChunk, OutputPage,
    ProcessCounts, ProcessInfo, ResizeRequest, SignalRequest, StartProcessRequest, StdinMode,
    StdinWriteResponse,
};
use serde::Deserialize;

use super::{ApiError, Json, Path, Query, State};
use crate::process::{Process, StdinError};
use crate::supervisor::{ProcessRef, RemoveProcessError, StartProcessError, Supervisor};

/// Most bytes one output read returns.
const MAX_READ: usize = 1 << 20;

impl From<StartProcessError> for ApiError {
    fn from(e: StartProcessError) -> ApiError {
        let code = match &e {
            StartProcessError::TagInUse(_) => ErrorCode::TagInUse,
            StartProcessError::InvalidTag(_)
            | StartProcessError::EmptyCommand
            | StartProcessError::InvalidPtySize => ErrorCode::BadRequest,
            StartProcessError::InvalidWorkingDir(_) => ErrorCode::InvalidPath,
            StartProcessError::MissingWorkingDir(_) => ErrorCode::FileNotFound,
            StartProcessError::User(_) => ErrorCode::UnknownUser,
            StartProcessError::Spawn(_) => ErrorCode::SpawnFailed,
            StartProcessError::ShuttingDown => ErrorCode::ShuttingDown,
            StartProcessError::MainExited => ErrorCode::MainExited,
            StartProcessError::Pipes { .. } => return ApiError::internal(e),
        };
        ApiError::new(code, e.to_string())
    }
}

impl From<StdinError> for ApiError {
    fn from(e: StdinError) -> ApiError {
        ApiError::new(ErrorCode::StdinClosed, e.to_string())
    }
}

async fn find(supervisor: &Supervisor, id: &str) -> Result<Arc<Process>, ApiError> {
    supervisor
        .get(ProcessRef::parse(id))
        .await
        .ok_or_else(|| ApiError::new(ErrorCode::ProcessNotFound, format!("no process {id:?}")))
}

fn require_running(process: &Process) -> Result<(), ApiError> {
    if process.is_running() {
        Ok(())
    } else {
        Err(ApiError::new(ErrorCode::ProcessExited, format!("process {} has exited", process.pid)))
    }
}

pub async fn info(state: State) -> Json<Info> {
    let processes = state.supervisor.list().await;
    let running = processes.iter().filter(|p| p.is_running()).count() as u32;
    Json(Info {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_ms: state.started.elapsed().as_millis() as u64,
        pid: std::process::id(),
        processes: ProcessCounts { running, exited: processes.len() as u32 - running },
    })
}

/// Kills a process whose `/exec` caller went away before it finished, so an
/// abandoned request leaves nothing running.
struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = crate::sys::signal(pid, libc::SIGKILL, true);
        }
    }
}

pub async fn exec(
    state: State,
    Json(request): Json<ExecRequest>,
) -> Result<Json<ExecResponse>, ApiError> {
    let started = Instant::now();
    let input = match request.stdin {
        Some(text) => Some(Bytes::from(match request.stdin_encoding {
            Encoding::Utf8 => text.into_bytes(),
            Encoding::Base64 => hutch_api::decode_base64(&text).map_err(|e| {
                ApiError::new(ErrorCode::BadRequest, format!("stdin is not valid base64: {e}"))
            })?,
        })),
        None => None,
    };
    let start = StartProcessRequest {
        command: request.command,
        args: request.args,
        env: request.env,
        working_dir: request.working_dir,
        user: request.user,
        stdin: StdinMode::Closed,
        pty: None,
        tag: None,
        timeout_ms: request.timeout_ms,
    };
    let process = state.supervisor.start_process(start, input).await?;
    let mut guard = KillOnDrop(Some(process.pid));
    let exit = wait_for_exit(&process, None).await;
    guard.0 = None;
    let _ = state.supervisor.remove(ProcessRef::Pid(process.pid)).await;
    let exit = exit.ok_or_else(|| ApiError::internal("process vanished before exiting"))?;
    let (stdout, stderr, stdout_dropped, stderr_dropped) = process.collect();
    let utf8 = request.output_encoding != Some(Encoding::Base64)
        && std::str::from_utf8(&stdout).is_ok()
        && std::str::from_utf8(&stderr).is_ok();
    let (encoding, stdout, stderr) = if utf8 {
        // Both were just checked to be UTF-8, so nothing is replaced.
        let text = |bytes: Vec<u8>| String::from_utf8(bytes).unwrap_or_default();
        (Encoding::Utf8, text(stdout), text(stderr))
    } else {
        (Encoding::Base64, hutch_api::encode_base64(&stdout), hutch_api::encode_base64(&stderr))
    };
    Ok(Json(ExecResponse {
        exit_code: exit.exit_code,
        signal: exit.signal,
        timed_out: exit.timed_out,
        encoding,
        stdout,
        stderr,
        stdout_dropped,
        stderr_dropped,
        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
    }))
}

/// Waits until the process has exited, or until `timeout`. Returns the
/// exit, or `None` on timeout.
async fn wait_for_exit(process: &Process, timeout: Option<Duration>) -> Option<ExitInfo> {
    let mut changes = process.subscribe();
    let wait = async {
        loop {
            changes.borrow_and_update();
            if let Some(exit) = process.exit() {
                return Some(exit);
            }
            if changes.changed().await.is_err() {
                return process.exit();
            }
        }
    };
    match timeout {
        Some(timeout) => tokio::time::timeout(timeout, wait).await.ok().flatten(),
        None => wait.await,
    }
}

pub async fn start(
    state: State,
    Json(request): Json<StartProcessRequest>,
) -> Result<(http::StatusCode, Json<ProcessInfo>), ApiError> {
    let process = state.supervisor.start_process(request, None).await?;
    Ok((http::StatusCode::CREATED, Json(process.info())))
}

pub async fn list(state: State) -> Json<Vec<ProcessInfo>> {
    Json(state.supervisor.list().await.iter().map(|p| p.info()).collect())
}

pub async fn get(state: State, Path(id): Path<String>) -> Result<Json<ProcessInfo>, ApiError> {
    Ok(Json(find(&state.supervisor, &id).await?.info()))
}

pub async fn remove(state: State, Path(id): Path<String>) -> Result<http::StatusCode, ApiError> {
    match state.supervisor.remove(ProcessRef::parse(&id)).await {
        Ok(()) => Ok(http::StatusCode::NO_CONTENT),
        Err(e @ RemoveProcessError::NotFound(_)) => {
            Err(ApiError::new(ErrorCode::ProcessNotFound, e.to_string()))
        }
        Err(e @ RemoveProcessError::Running(_)) => {
            Err(ApiError::new(ErrorCode::ProcessRunning, e.to_string()))
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    timeout_ms: Option<u64>,
}

/// Returns the process once it exits, or as it is when `timeout_ms` passes
/// (then `status` is still `running`).
pub async fn wait(
    state: State,
    Path(id): Path<String>,
    Query(query): Query<WaitQuery>,
) -> Result<Json<ProcessInfo>, ApiError> {
    let process = find(&state.supervisor, &id).await?;
    wait_for_exit(&process, query.timeout_ms.map(Duration::from_millis)).await;
    Ok(Json(process.info()))
}

pub async fn kill(state: State, Path(id): Path<String>) -> Result<Json<ProcessInfo>, ApiError> {
    let process = find(&state.supervisor, &id).await?;
    require_running(&process)?;
    crate::sys::signal(process.pid, libc::SIGKILL, true).map_err(ApiError::internal)?;
    Ok(Json(process.info()))
}

pub async fn signal(
    state: State,
    Path(id): Path<String>,
    Json(request): Json<SignalRequest>,
) -> Result<Json<ProcessInfo>, ApiError> {
    let number = hutch_api::parse_signal(&request.signal)
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, e.to_string()))?;
    let process = find(&state.supervisor, &id).await?;
    require_running(&process)?;
    crate::sys::signal(process.pid, number, request.group).map_err(ApiError::internal)?;
    Ok(Json(process.info()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdinQuery {
    #[serde(default)]
    close: bool,
}

/// Streams the request body into the process's stdin as it arrives.
pub async fn write_stdin(
    state: State,
    Path(id): Path<String>,
    Query(query): Query<StdinQuery>,
    body: Body,
) -> Result<Json<StdinWriteResponse>, ApiError> {
    let process = find(&state.supervisor, &id).await?;
    let mut written = 0u64;
    let mut frames = body.into_data_stream();
    while let Some(frame) = frames.next().await {
        let data = frame
            .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("reading body: {e}")))?;
        written += data.len() as u64;
        process.write_stdin(data).await?;
    }
    if query.close {
        process.close_stdin().await?;
    }
    Ok(Json(StdinWriteResponse { bytes_written: written, stdin_open: process.info().stdin_open }))
}

pub async fn close_stdin(
    state: State,
    Path(id): Path<String>,
) -> Result<Json<ProcessInfo>, ApiError> {
    let process = find(&state.supervisor, &id).await?;
    process.close_stdin().await?;
    Ok(Json(process.info()))
}

pub async fn resize(
    state: State,
    Path(id): Path<String>,
    Json(size): Json<ResizeRequest>,
) -> Result<Json<ProcessInfo>, ApiError> {
    let process = find(&state.supervisor, &id).await?;
    resize_process(&process, size)?;
    Ok(Json(process.info()))
}

pub fn resize_process(process: &Process, size: ResizeRequest) -> Result<(), ApiError> {
    if size.rows == 0 || size.cols == 0 {
        return Err(ApiError::new(ErrorCode::BadRequest, "terminal size must be at least 1x1"));
    }
    require_running(process)?;
    match process.resize(size.rows, size.cols) {
        Ok(true) => Ok(()),
        Ok(false) => Err(ApiError::new(
            ErrorCode::NotATerminal,
            format!("process {} has no terminal", process.pid),
        )),
        Err(e) => Err(ApiError::internal(format!("resizing terminal: {e}"))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputQuery {
    #[serde(default)]
    offset: u64,
    max_bytes: Option<usize>,
}

pub async fn output(
    state: State,
    Path(id): Path<String>,
    Query(query): Query<OutputQuery>,
) -> Result<Json<OutputPage>, ApiError> {
    let process = find(&state.supervisor, &id).await?;
    let progress = process.read(query.offset, query.max_bytes.unwrap_or(MAX_READ).min(MAX_READ));
    Ok(Json(OutputPage {
        chunks: progress
            .read
            .chunks
            .iter()
            .map(|c| OutputChunk {
                stream: c.stream,
                offset: c.offset,
                data: hutch_api::encode_base64(&c.data),
            })
            .collect(),
        next_offset: progress.read.next_offset,
        dropped: progress.read.dropped,
        exit: progress.exit,
    }))
}

/// One thing a live reader learns, in order.
pub enum OutputEvent {
    Dropped { offset: u64, bytes: u64 },
    Chunk(crate::output::Chunk),
    Exit(ExitInfo),
}

/// Follows a process's output from `offset`: replays what is buffered,
/// then yields new output as it arrives, and ends with the exit.
pub fn follow(process: Arc<Process>, offset: u64) -> impl FuturesStream<Item = OutputEvent> + Send {
    struct Cursor {
        process: Arc<Process>,
        changes: tokio::sync::watch::Receiver<u64>,
        offset: u64,
        pending: std::collections::VecDeque<OutputEvent>,
        done: bool,
    }
    let changes = process.subscribe();
    let cursor = Cursor { process, changes, offset, pending: Default::default(), done: false };
    futures_util::stream::unfold(cursor, |mut cursor| async move {
        loop {
            if let Some(event) = cursor.pending.pop_front() {
                return Some((event, cursor));
            }
            if cursor.done {
                return None;
            }
            cursor.changes.borrow_and_update();
            let progress = cursor.process.read(cursor.offset, MAX_READ);
            if progress.read.dropped > 0 {
                cursor.pending.push_back(OutputEvent::Dropped {
                    offset: cursor.offset,
                    bytes: progress.read.dropped,
                });
            }
            cursor.offset = progress.read.next_offset;
            cursor.pending.extend(progress.read.chunks.into_iter().map(OutputEvent::Chunk));
            if let Some(exit) = progress.exit {
                cursor.pending.push_back(OutputEvent::Exit(exit));
                cursor.done = true;
            }
            if cursor.pending.is_empty() && cursor.changes.changed().await.is_err() {
                cursor.done = true;
            }
        }
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    #[serde(default)]
    offset: u64,
}

/// Server-sent events: `output` (an [`OutputChunk`]), `dropped`
/// (`{"offset","bytes"}`) and a final `exit` (an [`ExitInfo`]).
pub async fn output_stream(
    state: State,
    Path(id): Path<String>,
    Query(query): Query<StreamQuery>,
) -> Result<Sse<impl FuturesStream<Item = Result<Event, Infallible>>>, ApiError> {
    let process = find(&state.supervisor, &id).await?;
    let events = follow(process, query.offset).map(|event| {
        let event = match event {
            OutputEvent::Chunk(chunk) => Event::default().event("output").json_data(OutputChunk {
                stream: chunk.stream,
                offset: chunk.offset,
                data: hutch_api::encode_base64(&chunk.data),
            }),
            OutputEvent::Dropped { offset, bytes } => Event::default()
                .event("dropped")
                .json_data(serde_json::json!({ "offset": offset, "bytes": bytes })),
            OutputEvent::Exit(exit) => Event::default().event("exit").json_data(exit),
        };
        // Serializing these plain structs cannot fail.
        Ok(event.unwrap_or_default())
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
