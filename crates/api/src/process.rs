use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How a process's stdin is set up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StdinMode {
    /// stdin reads end-of-file at once (it is `/dev/null`).
    #[default]
    Closed,
    /// stdin is a pipe fed through the stdin endpoint or a WebSocket.
    Pipe,
}

/// Terminal size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PtySize {
    pub rows: u16,
    pub cols: u16,
}

/// `POST /processes`: start a process and return at once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartProcessRequest {
    /// Program to run; looked up in `PATH` when it contains no slash.
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// Added to (and overriding) sandboxd's own environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Absolute working directory; sandboxd's own (`/`) when absent.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `name`, `uid` or `uid:gid`, resolved in the sandbox's /etc/passwd.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub stdin: StdinMode,
    /// Run under a new pseudo-terminal of this size. stdout and stderr are
    /// then one stream, reported as `stdout`.
    #[serde(default)]
    pub pty: Option<PtySize>,
    /// A name to find the process by later, unique among running processes.
    #[serde(default)]
    pub tag: Option<String>,
    /// Kill the process group after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// Which output stream bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    /// The first byte of a binary WebSocket frame carrying this stream.
    pub fn ws_tag(self) -> u8 {
        match self {
            Stream::Stdout => 1,
            Stream::Stderr => 2,
        }
    }

    pub fn from_ws_tag(tag: u8) -> Option<Stream> {
        match tag {
            1 => Some(Stream::Stdout),
            2 => Some(Stream::Stderr),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessStatus {
    Running,
    Exited,
}

/// How a process ended. Exactly one of `exit_code` and `signal` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// The process was killed because its `timeout_ms` elapsed.
    #[serde(default)]
    pub timed_out: bool,
}

/// A process as sandboxd knows it, running or exited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub tag: Option<String>,
    pub command: String,
    pub args: Vec<String>,
    pub status: ProcessStatus,
    pub exit: Option<ExitInfo>,
    pub pty: bool,
    /// stdin is a pipe that is still open for writing.
    pub stdin_open: bool,
    /// Milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    /// Bytes of output produced so far, stdout and stderr together; also the
    /// offset the next output byte will have.
    pub output_bytes: u64,
    /// Offset of the oldest output byte still buffered: output before it was
    /// dropped because the process's buffer was full.
    pub output_start: u64,
}

/// A run of bytes from one stream. `offset` counts bytes of stdout and stderr
/// together, so chunks from both streams form one ordered sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputChunk {
    pub stream: Stream,
    pub offset: u64,
    /// The bytes, base64-encoded.
    pub data: String,
}

/// `GET /processes/{id}/output?offset=N`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputPage {
    pub chunks: Vec<OutputChunk>,
    /// Ask for this offset next time.
    pub next_offset: u64,
    /// Bytes between the requested offset and the first chunk that were
    /// dropped from the buffer before anyone read them.
    pub dropped: u64,
    /// Set once the process has exited and `next_offset` is the end.
    pub exit: Option<ExitInfo>,
}

/// How `stdout`/`stderr` are written in an [`ExecResponse`], and how `stdin`
/// is written in an [`ExecRequest`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// Plain text (valid UTF-8).
    #[default]
    Utf8,
    Base64,
}

/// `POST /exec`: run a command to completion in one round trip.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    /// Bytes to feed on stdin, then close it; stdin is `/dev/null` when absent.
    #[serde(default)]
    pub stdin: Option<String>,
    /// How `stdin` is encoded.
    #[serde(default)]
    pub stdin_encoding: Encoding,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Force base64 output even when it is valid UTF-8.
    #[serde(default)]
    pub output_encoding: Option<Encoding>,
}

/// The result of `POST /exec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecResponse {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// `utf8` when both streams are valid UTF-8 (and base64 was not asked
    /// for), otherwise `base64`. It applies to both fields.
    pub encoding: Encoding,
    pub stdout: String,
    pub stderr: String,
    /// Bytes of each stream dropped because they did not fit the buffer.
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
    pub duration_ms: f64,
}

impl ExecResponse {
    /// stdout as bytes, whichever encoding was used.
    pub fn stdout_bytes(&self) -> Result<Vec<u8>, base64::DecodeError> {
        self.decode(&self.stdout)
    }

    /// stderr as bytes, whichever encoding was used.
    pub fn stderr_bytes(&self) -> Result<Vec<u8>, base64::DecodeError> {
        self.decode(&self.stderr)
    }

    fn decode(&self, text: &str) -> Result<Vec<u8>, base64::DecodeError> {
        match self.encoding {
            Encoding::Utf8 => Ok(text.as_bytes().to_vec()),
            Encoding::Base64 => crate::decode_base64(text),
        }
    }
}

/// A signal given by name (`"SIGTERM"`, `"TERM"`) or by number (`15`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Signal {
    Number(i32),
    Name(String),
}

/// `POST /processes/{id}/signal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    pub signal: Signal,
    /// Signal the process's whole process group rather than the process.
    #[serde(default)]
    pub group: bool,
}

/// `POST /processes/{id}/resize`.
pub type ResizeRequest = PtySize;

/// Counts reported by `GET /info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessCounts {
    pub running: u32,
    pub exited: u32,
}

/// Text frames a client sends on `GET /processes/{id}/attach` (binary frames
/// are stdin bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum WsClientMessage {
    Resize { rows: u16, cols: u16 },
    CloseStdin,
    Signal { signal: Signal },
}

/// Text frames sandboxd sends on an attach WebSocket (binary frames are
/// output: one byte naming the stream, see [`Stream::ws_tag`], then the bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WsServerEvent {
    /// Output before this point was dropped from the buffer unread.
    Dropped {
        offset: u64,
        bytes: u64,
    },
    Exit(ExitInfo),
    Error {
        code: crate::ErrorCode,
        message: String,
    },
}

/// The reply to `POST /processes/{id}/stdin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StdinWriteResponse {
    pub bytes_written: u64,
    pub stdin_open: bool,
}
