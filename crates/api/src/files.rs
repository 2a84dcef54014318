use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// What `stat`, `list` and a finished upload report about a path. Symlinks
/// are described as themselves, never followed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    pub path: String,
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits, e.g. `0o644` (420).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time in milliseconds since the Unix epoch.
    pub modified_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListFilesResponse {
    pub path: String,
    pub entries: Vec<FileInfo>,
}

/// `POST /files/move`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    pub from: String,
    pub to: String,
    /// Replace `to` if it exists (a directory only if it is empty).
    #[serde(default)]
    pub overwrite: bool,
}
