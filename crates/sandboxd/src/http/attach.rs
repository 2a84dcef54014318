//! `GET /processes/{id}/attach`: a WebSocket carrying a process's output out
//! and its stdin, resizes and signals in.
//!
//! Server to client: binary frames are output (first byte: 1 stdout,
//! 2 stderr; then the bytes); text frames are [`WsServerEvent`]s. The socket
//! closes after the `exit` event. Client to server: binary frames are stdin
//! bytes; text frames are [`WsClientMessage`]s.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use hutch_api::{ErrorCode, WsClientMessage, WsServerEvent};
use serde::Deserialize;

use super::processes::{OutputEvent, follow, resize_process};
use super::{ApiError, Path, Query, State};
use crate::process::Process;
use crate::supervisor::ProcessRef;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachQuery {
    /// Replay output from this offset (0: everything still buffered).
    #[serde(default)]
    offset: u64,
}

pub async fn attach(
    state: State,
    Path(id): Path<String>,
    Query(query): Query<AttachQuery>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let process =
        state.supervisor.get(ProcessRef::parse(&id)).await.ok_or_else(|| {
            ApiError::new(ErrorCode::ProcessNotFound, format!("no process {id:?}"))
        })?;
    Ok(upgrade.on_upgrade(move |socket| session(socket, process, query.offset)))
}

fn event(event: &WsServerEvent) -> Message {
    Message::Text(serde_json::to_string(event).unwrap_or_default().into())
}

async fn session(socket: WebSocket, process: Arc<Process>, offset: u64) {
    let (mut sender, mut receiver) = socket.split();
    let output = follow(process.clone(), offset);
    tokio::pin!(output);
    // Input is handled inline, but stdin writes can block on a full pipe; a
    // separate task keeps output flowing meanwhile.
    let input_process = process.clone();
    let (errors_tx, mut errors) = tokio::sync::mpsc::unbounded_channel::<WsServerEvent>();
    let input = tokio::spawn(async move {
        while let Some(Ok(message)) = receiver.next().await {
            if let Err(e) = handle_input(&input_process, message).await {
                let _ = errors_tx.send(WsServerEvent::Error { code: e.0, message: e.1 });
            }
        }
    });
    loop {
        tokio::select! {
            next = output.next() => {
                let message = match next {
                    Some(OutputEvent::Chunk(chunk)) => {
                        let mut frame = Vec::with_capacity(chunk.data.len() + 1);
                        frame.push(chunk.stream.ws_tag());
                        frame.extend_from_slice(&chunk.data);
                        Message::Binary(frame.into())
                    }
                    Some(OutputEvent::Dropped { offset, bytes }) => event(&WsServerEvent::Dropped { offset, bytes }),
                    Some(OutputEvent::Exit(exit)) => {
                        let _ = sender.send(event(&WsServerEvent::Exit(exit))).await;
                        break;
                    }
                    None => break,
                };
                if sender.send(message).await.is_err() {
                    break;
                }
            }
            Some(error) = errors.recv() => {
                if sender.send(event(&error)).await.is_err() {
                    break;
                }
            }
        }
    }
    input.abort();
    let _ = sender.send(Message::Close(None)).await;
}

async fn handle_input(process: &Process, message: Message) -> Result<(), (ErrorCode, String)> {
    match message {
        Message::Binary(data) => {
            process.write_stdin(data).await.map_err(|e| (ErrorCode::StdinClosed, e.to_string()))
        }
        Message::Text(text) => {
            let message: WsClientMessage = serde_json::from_str(text.as_str())
                .map_err(|e| (ErrorCode::InvalidJson, e.to_string()))?;
            match message {
                WsClientMessage::Resize { rows, cols } => {
                    resize_process(process, hutch_api::PtySize { rows, cols })
                        .map_err(|e| (e.code, e.message))
                }
                WsClientMessage::CloseStdin => {
                    process.close_stdin().await.map_err(|e| (ErrorCode::StdinClosed, e.to_string()))
                }
                WsClientMessage::Signal { signal } => {
                    let number = hutch_api::parse_signal(&signal)
                        .map_err(|e| (ErrorCode::BadRequest, e.to_string()))?;
                    crate::sys::signal(process.pid, number, false)
                        .map_err(|e| (ErrorCode::Internal, e.to_string()))
                }
            }
        }
        // Pings are answered by the WebSocket layer; close ends the loop.
        _ => Ok(()),
    }
}
