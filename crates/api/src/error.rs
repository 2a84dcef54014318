use serde::{Deserialize, Serialize};

/// The body of every error response: `{"error":{"code":"…","message":"…"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
        ErrorBody { error: ErrorDetail { code, message: message.into() } }
    }
}

/// Stable, machine-readable error codes. Clients match on these, never on
/// messages, so a code is never renamed once released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed in a way no more specific code covers.
    BadRequest,
    /// The body is not valid JSON or does not match the expected shape.
    InvalidJson,
    /// A query string parameter is missing or malformed.
    InvalidQuery,
    /// No route matches the request path.
    NotFound,
    /// The route exists but not for this method.
    MethodNotAllowed,
    /// The body is larger than this endpoint accepts.
    PayloadTooLarge,
    /// The body's content type is not what the endpoint accepts.
    UnsupportedMediaType,
    /// A path is relative, contains NUL, or climbs above `/`.
    InvalidPath,
    FileNotFound,
    NotADirectory,
    IsADirectory,
    AlreadyExists,
    DirectoryNotEmpty,
    PermissionDenied,
    /// The requested byte range lies outside the file.
    RangeNotSatisfiable,
    /// No process with that pid or tag is known.
    ProcessNotFound,
    /// The operation needs a running process and this one has exited.
    ProcessExited,
    /// The operation needs an exited process and this one is still running.
    ProcessRunning,
    /// Another running process already uses this tag.
    TagInUse,
    /// The process was not started with `stdin: "pipe"`, or stdin was closed.
    StdinClosed,
    /// The process has no terminal to resize.
    NotATerminal,
    /// The command could not be started (not found, not executable, bad user…).
    SpawnFailed,
    /// No such user or group inside the sandbox.
    UnknownUser,
    /// sandboxd is shutting down and starts nothing new.
    ShuttingDown,
    /// The main command exited and sandboxd was told to end with it: every
    /// other process was killed and nothing new starts; output and files can
    /// still be read.
    MainExited,
    /// An unexpected failure; the message says what failed.
    Internal,
}

impl ErrorCode {
    /// The HTTP status that goes with this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest
            | ErrorCode::InvalidJson
            | ErrorCode::InvalidQuery
            | ErrorCode::InvalidPath
            | ErrorCode::SpawnFailed
            | ErrorCode::UnknownUser => 400,
            ErrorCode::PermissionDenied => 403,
            ErrorCode::NotFound | ErrorCode::FileNotFound | ErrorCode::ProcessNotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::NotADirectory
            | ErrorCode::IsADirectory
            | ErrorCode::AlreadyExists
            | ErrorCode::DirectoryNotEmpty
            | ErrorCode::ProcessExited
            | ErrorCode::ProcessRunning
            | ErrorCode::TagInUse
            | ErrorCode::StdinClosed
            | ErrorCode::NotATerminal
            | ErrorCode::MainExited => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::UnsupportedMediaType => 415,
            ErrorCode::RangeNotSatisfiable => 416,
            ErrorCode::Internal => 500,
            ErrorCode::ShuttingDown => 503,
        }
    }
}
