//! What a sandbox should be: the typed input of [`crate::Driver::create`].

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A validated sandbox id: `[a-z0-9-]`, 1 to 63 characters, not starting with `-`.
///
/// Every host artefact of a sandbox (directories, cgroups, the socket) is named after
/// it, so the charset is kept to what is safe in a path, a cgroup name and a hostname.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SandboxId(String);

/// Why a string is not a [`SandboxId`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidSandboxId {
    #[error("sandbox id is empty")]
    Empty,
    #[error("sandbox id is {len} characters long, at most 63 are allowed")]
    TooLong { len: usize },
    #[error("sandbox id contains {character:?}; only a-z, 0-9 and '-' are allowed")]
    BadCharacter { character: char },
    #[error("sandbox id starts with '-'")]
    LeadingDash,
}

impl SandboxId {
    /// Maximum length, the limit of a DNS label (ids double as hostnames).
    pub const MAX_LEN: usize = 63;

    pub fn new(id: impl Into<String>) -> Result<Self, InvalidSandboxId> {
        let id = id.into();
        if id.is_empty() {
            return Err(InvalidSandboxId::Empty);
        }
        if id.len() > Self::MAX_LEN {
            return Err(InvalidSandboxId::TooLong { len: id.len() });
        }
        if let Some(character) =
            id.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(InvalidSandboxId::BadCharacter { character });
        }
        if id.starts_with('-') {
            return Err(InvalidSandboxId::LeadingDash);
        }
        Ok(Self(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SandboxId {
    type Error = InvalidSandboxId;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<SandboxId> for String {
    fn from(value: SandboxId) -> Self {
        value.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Everything needed to create one sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxSpec {
    pub id: SandboxId,
    /// Hostname inside the sandbox's UTS namespace; defaults to the id when `None`.
    pub hostname: Option<String>,
    pub rootfs: Rootfs,
    /// Environment of sandboxd, which hands it on to the processes it starts.
    pub env: Vec<(String, String)>,
    /// Working directory of sandboxd inside the sandbox; `/` when `None`.
    pub working_dir: Option<String>,
    /// Default user of processes started by sandboxd, passed to it as `HUTCH_USER`
    /// (sandboxd itself runs as root inside, to be able to switch users).
    pub user: Option<String>,
    pub limits: Limits,
    pub egress: Egress,
    /// Run the sandbox in its own user namespace. Not supported yet.
    pub user_namespace: bool,
}

impl SandboxSpec {
    /// A spec with the host image, default limits and no network.
    pub fn new(id: SandboxId) -> Self {
        Self {
            id,
            hostname: None,
            rootfs: Rootfs::Host,
            env: Vec::new(),
            working_dir: None,
            user: None,
            limits: Limits::default(),
            egress: Egress::None,
            user_namespace: false,
        }
    }
}

/// The root filesystem of a sandbox. Every variant is mounted read-only beneath a
/// per-sandbox writable layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rootfs {
    /// The built-in `host` image: the host's /usr (and /bin, /lib*, /sbin) read-only
    /// and a filtered copy of /etc; nothing from /home, /root or /var.
    Host,
    /// Unpacked OCI layer directories, bottom to top.
    Layers { lower: Vec<PathBuf> },
}

/// Resource limits, enforced through cgroups and the size of the writable layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// CPU quota in thousandths of a CPU (1000 = one full CPU).
    pub cpu_millis: u32,
    /// Memory limit in bytes; includes the writable layer (see [`Limits::disk_bytes`]).
    pub memory_bytes: u64,
    /// Maximum number of tasks (processes and threads).
    pub pids: u32,
    /// Size of the writable layer (a tmpfs, so its pages are charged to the sandbox's
    /// memory cgroup too).
    pub disk_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { cpu_millis: 1000, memory_bytes: 512 << 20, pids: 512, disk_bytes: 1 << 30 }
    }
}

/// What the sandbox may reach on the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Egress {
    /// Loopback only.
    None,
    /// NAT to the internet through a host bridge, set up by `hutch-net`; needs a
    /// driver built with [`crate::Driver::with_network`].
    Internet,
}
