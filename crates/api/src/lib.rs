//! Wire types of sandboxd's HTTP API.
//!
//! sandboxd runs as PID 1 inside every sandbox. The dataplane, the proxy, the
//! CLI and the tests all talk to it with these types, so this crate holds only
//! data and the rules for validating it: no I/O, no HTTP, no kernel.
//!
//! Bytes that a process writes are arbitrary binary data. Wherever they cross
//! the wire inside JSON they are either valid UTF-8 text or base64, and the
//! [`Encoding`] next to them says which, so no byte is ever lost.

mod error;
mod files;
mod process;
mod validate;

pub use error::{ErrorBody, ErrorCode, ErrorDetail};
pub use files::{FileInfo, FileKind, ListFilesResponse, MoveRequest};
pub use process::{
    Encoding, ExecRequest, ExecResponse, ExitInfo, OutputChunk, OutputPage, ProcessCounts,
    ProcessInfo, ProcessStatus, PtySize, ResizeRequest, Signal, SignalRequest, StartProcessRequest,
    StdinMode, StdinWriteResponse, Stream, WsClientMessage, WsServerEvent,
};
pub use validate::{
    ParsePathError, ParseSignalError, ParseTagError, parse_absolute_path, parse_signal,
    validate_tag,
};

use serde::{Deserialize, Serialize};

/// `GET /health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
}

/// `GET /info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    pub version: String,
    /// Milliseconds since sandboxd started.
    pub uptime_ms: u64,
    /// sandboxd's own pid (1 inside a sandbox).
    pub pid: u32,
    pub processes: ProcessCounts,
}

/// Encodes bytes as standard base64, the encoding used for binary data in JSON.
pub fn encode_base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decodes standard base64.
pub fn decode_base64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(text)
}
