//! One process as sandboxd tracks it: its output, its stdin and its exit.
//!
//! A `Process` is shared (`Arc`) between the supervisor that owns the table,
//! the tasks that pump its pipes, and the HTTP handlers that read it. Its
//! mutable state sits behind a short-lived `std::sync::Mutex` that is never
//! held across an `.await`; readers wait for changes on a `watch` channel.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;

use bytes::Bytes;
use hutch_api::{ExitInfo, ProcessInfo, ProcessStatus, Stream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::output::{OutputBuffer, Read};

/// What the stdin pump accepts.
#[derive(Debug)]
pub enum StdinOp {
    Data(Bytes, oneshot::Sender<Result<(), StdinError>>),
    Close,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StdinError {
    #[error("stdin of process {pid} is not open")]
    Closed { pid: u32 },
    #[error("writing to stdin of process {pid} failed: {reason}")]
    Write { pid: u32, reason: std::io::ErrorKind },
}

#[derive(Debug)]
pub struct Process {
    pub pid: u32,
    pub tag: Option<String>,
    pub command: String,
    pub args: Vec<String>,
    pub started_at_ms: u64,
    /// A duplicate of the terminal's master side, kept for resizing.
    pty: Option<OwnedFd>,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
}

#[derive(Debug)]
struct State {
    output: OutputBuffer,
    exit: Option<ExitInfo>,
    finished_at_ms: Option<u64>,
    stdin: Option<mpsc::Sender<StdinOp>>,
}

/// A snapshot of new output for a reader.
#[derive(Debug)]
pub struct Progress {
    pub read: Read,
    /// Set when the process has exited and the read reached the end.
    pub exit: Option<ExitInfo>,
}

impl Process {
    pub fn new(
        pid: u32,
        tag: Option<String>,
        command: String,
        args: Vec<String>,
        output_limit: usize,
        pty: Option<OwnedFd>,
        stdin: Option<mpsc::Sender<StdinOp>>,
    ) -> Process {
        Process {
            pid,
            tag,
            command,
            args,
            started_at_ms: unix_ms(),
            pty,
            state: Mutex::new(State {
                output: OutputBuffer::new(output_limit),
                exit: None,
                finished_at_ms: None,
                stdin,
            }),
            changed: watch::channel(0).0,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the buffer in a state
        // worse than "some bytes missing", so poisoning is ignored.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records output. Output that arrives after the exit was recorded
    /// (from background children still holding the pipes) is discarded, so
    /// a process's output always ends where its exit event stands.
    pub fn append(&self, stream: Stream, data: &[u8]) {
        {
            let mut state = self.state();
            if state.exit.is_some() {
                return;
            }
            state.output.append(stream, data);
        }
        self.changed.send_modify(|version| *version += 1);
    }

    pub fn finish(&self, exit: ExitInfo) {
        {
            let mut state = self.state();
            state.exit = Some(exit);
            state.finished_at_ms = Some(unix_ms());
            state.stdin = None;
        }
        self.changed.send_modify(|version| *version += 1);
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn exit(&self) -> Option<ExitInfo> {
        self.state().exit
    }

    pub fn is_running(&self) -> bool {
        self.exit().is_none()
    }

    pub fn read(&self, offset: u64, max_bytes: usize) -> Progress {
        let mut state = self.state();
        let read = state.output.read(offset, max_bytes);
        let exit = state.exit.filter(|_| read.next_offset == state.output.end());
        Progress { read, exit }
    }

    /// All retained output per stream, and how much of each was dropped.
    pub fn collect(&self) -> (Vec<u8>, Vec<u8>, u64, u64) {
        let mut state = self.state();
        let (stdout, stderr) = state.output.collect();
        (stdout, stderr, state.output.dropped(Stream::Stdout), state.output.dropped(Stream::Stderr))
    }

    pub fn retained_output(&self) -> u64 {
        self.state().output.retained()
    }

    pub fn info(&self) -> ProcessInfo {
        let state = self.state();
        ProcessInfo {
            pid: self.pid,
            tag: self.tag.clone(),
            command: self.command.clone(),
            args: self.args.clone(),
            status: if state.exit.is_some() {
                ProcessStatus::Exited
            } else {
                ProcessStatus::Running
            },
            exit: state.exit,
            pty: self.pty.is_some(),
            stdin_open: state.stdin.is_some(),
            started_at_ms: self.started_at_ms,
            finished_at_ms: state.finished_at_ms,
            output_bytes: state.output.end(),
            output_start: state.output.start(),
        }
    }

    /// Writes to stdin, waiting until the bytes are in the pipe (so a fast
    /// client is slowed to the pace of a slow reader instead of buffering).
    pub async fn write_stdin(&self, data: Bytes) -> Result<(), StdinError> {
        let sender = self.state().stdin.clone().ok_or(StdinError::Closed { pid: self.pid })?;
        let (done, written) = oneshot::channel();
        sender
            .send(StdinOp::Data(data, done))
            .await
            .map_err(|_| StdinError::Closed { pid: self.pid })?;
        written.await.map_err(|_| StdinError::Closed { pid: self.pid })?
    }

    pub async fn close_stdin(&self) -> Result<(), StdinError> {
        let sender = self.state().stdin.take().ok_or(StdinError::Closed { pid: self.pid })?;
        // The pump may already be gone if the process exited; closed is closed.
        let _ = sender.send(StdinOp::Close).await;
        self.changed.send_modify(|version| *version += 1);
        Ok(())
    }

    pub fn has_pty(&self) -> bool {
        self.pty.is_some()
    }

    /// Resizes the terminal. Returns false when the process has none.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<bool, std::io::Error> {
        let Some(master) = &self.pty else { return Ok(false) };
        crate::sys::set_window_size(master.as_raw_fd(), rows, cols)?;
        Ok(true)
    }
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
