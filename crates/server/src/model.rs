//! Wire types of the REST API (docs/platform-api.md).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a sandbox is in its lifecycle:
/// `pending → creating → running → completed | failed | terminated`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    Pending,
    Creating,
    Running,
    Completed,
    Failed,
    Terminated,
}

impl SandboxState {
    pub const ALL: [SandboxState; 6] = [
        SandboxState::Pending,
        SandboxState::Creating,
        SandboxState::Running,
        SandboxState::Completed,
        SandboxState::Failed,
        SandboxState::Terminated,
    ];

    /// Whether the sandbox has finished for good.
    pub fn is_terminal(self) -> bool {
        matches!(self, SandboxState::Completed | SandboxState::Failed | SandboxState::Terminated)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Pending => "pending",
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Completed => "completed",
            SandboxState::Failed => "failed",
            SandboxState::Terminated => "terminated",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        SandboxState::ALL.into_iter().find(|state| state.as_str() == s)
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Resource limits of one sandbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    pub cpus: f64,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub pids: u32,
}

impl Default for Resources {
    fn default() -> Self {
        Resources { cpus: 1.0, memory_mb: 512, disk_mb: 1024, pids: 512 }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Egress {
    #[default]
    None,
    Internet,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub egress: Egress,
}

/// Body of `POST /v1/namespaces/{ns}/sandboxes`. Every field is optional;
/// the server fills in the documented defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourcesRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<u16>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Egress>,
}

/// What a sandbox runs: the validated create request with defaults applied.
/// Stored as JSON and sent to the node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SandboxSpec {
    pub image: String,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    pub resources: Resources,
    #[serde(default)]
    pub network: Network,
    #[serde(default)]
    pub ports: Vec<u16>,
}

/// A sandbox as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sandbox {
    pub id: String,
    pub namespace: String,
    pub state: SandboxState,
    pub reason: Option<String>,
    pub exit_code: Option<i32>,
    pub image: String,
    pub command: Vec<String>,
    pub resources: Resources,
    pub network: Network,
    pub ports: Vec<u16>,
    pub tags: BTreeMap<String, String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub deadline: Option<String>,
    pub idle_timeout_secs: Option<u64>,
    pub node: Option<String>,
    /// Proxy URL of each exposed port, once the sandbox is placed.
    pub urls: BTreeMap<String, String>,
}

/// Answer of `GET /v1/namespaces/{ns}/sandboxes`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SandboxList {
    pub sandboxes: Vec<Sandbox>,
    pub next_cursor: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub name: String,
    pub created_at: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateNamespace {
    pub name: String,
}

/// Whether the server can place sandboxes on a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Registered and reporting: sandboxes are placed on it.
    Ready,
    /// Silent for longer than the node timeout; its sandboxes failed with
    /// `node_lost`. It becomes ready again when it reports.
    Lost,
    /// Known only from the sandboxes it held when the server started; it
    /// has not registered with this server process yet.
    Unregistered,
}

/// Resources of a node as the scheduler counts them, in the units of
/// [`Resources`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeResources {
    pub cpus: f64,
    pub memory_mb: u64,
    pub disk_mb: u64,
}

/// A dataplane as `GET /v1/nodes` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub state: NodeState,
    /// Where the server reaches the node's proxy; null until it registers.
    pub proxy_url: Option<String>,
    /// What the node offers, as it last reported.
    pub capacity: NodeResources,
    /// The sum of the resources of the non-terminal sandboxes placed on it.
    pub allocated: NodeResources,
    /// How many non-terminal sandboxes are placed on it.
    pub sandboxes: u64,
    /// When it last registered or reported to this server process.
    pub last_seen_at: Option<String>,
}

/// Answer of `POST /v1/namespaces/{ns}/keys`; `key` is shown only here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedKey {
    pub id: String,
    pub key: String,
    pub namespace: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopSandbox {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_secs: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetTimeout {
    pub timeout_secs: u64,
}

/// `{"error":{"code","message"}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    /// For `sandbox_not_running`: the sandbox's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<SandboxState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
