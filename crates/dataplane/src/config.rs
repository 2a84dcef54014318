//! What an operator configures (`hutch dataplane --config FILE`) and the
//! capacity the node offers when the operator does not say.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sha2::Digest as _;

/// Configuration of one dataplane. Every field has a default, so an empty
/// YAML document is a valid configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataplaneConfig {
    /// The node's name towards the server; the host name by default.
    pub node_id: String,
    /// The server's gRPC endpoint.
    pub server_url: String,
    /// Shared secret with the server: sent as `authorization: Bearer` on gRPC
    /// calls, and expected as `Hutch-Node-Token` on sandboxd and node API requests.
    pub node_token: String,
    /// Specs of the node's sandboxes, the image store and the driver's files.
    pub data_dir: PathBuf,
    /// Per-sandbox run state (sockets, logs, state records). Sandboxes do not
    /// survive a reboot, so it belongs on a tmpfs; when unset, a directory named
    /// after `data_dir` beneath `/run/hutch` or `/dev/shm/hutch`, whichever is a
    /// tmpfs (see [`DataplaneConfig::resolve_run_dir`]).
    pub run_dir: Option<PathBuf>,
    /// How the server reaches this node's proxy.
    pub proxy_url: String,
    /// Host routing: `{port}-{id}.{proxy_domain}` reaches port `port` of sandbox `id`.
    pub proxy_domain: Option<String>,
    /// What the node offers; unset fields are derived from the host.
    pub capacity: CapacityConfig,
    /// Egress `internet` for sandboxes (a bridge and nftables); without it
    /// sandboxes get loopback only and asking for internet fails the create.
    pub network: bool,
    /// Host bridge of sandbox networking; `hutch0` when unset. Two dataplanes
    /// with networking on one host need different bridges, subnets and tables.
    pub network_bridge: Option<String>,
    /// Subnet of sandbox addresses, e.g. `10.89.0.0/16` (the default).
    pub network_subnet: Option<String>,
    /// Name of the nftables tables; `hutch` when unset.
    pub network_table: Option<String>,
    /// IPv4 networks (CIDR) that egress `internet` never reaches. Unset: every
    /// range that is not the public internet (private networks, carrier-grade
    /// NAT, link-local and metadata services, loopback, multicast, reserved;
    /// `hutch_net::DEFAULT_BLOCKED_DESTINATIONS`). The server's address and the
    /// nodes' addresses are blocked on top, whatever this says.
    pub blocked_networks: Option<Vec<String>>,
    /// A statically linked sandboxd, bind-mounted into every sandbox.
    pub sandboxd_path: PathBuf,
    /// Name of the cgroup beneath our own that holds the sandboxes' cgroups;
    /// `hutch-<node_id>` when unset, so two dataplanes on one host never sweep
    /// each other's sandboxes.
    pub cgroup_parent: Option<String>,
    /// Registries (`host:port`) pulled from over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Credentials per registry, keyed by its host (and port) as image references
    /// name it (`docker.io` for Docker Hub). Sandbox images are pulled with them, and
    /// so is an image API pull that brings no credentials of its own; other
    /// registries are spoken to anonymously.
    pub registries: BTreeMap<String, RegistryLogin>,
    /// How often a report is sent when nothing changes.
    #[serde(with = "millis")]
    pub report_interval: Duration,
    /// Network namespaces made ahead of time, while no create runs, for the
    /// next creates to take (each idle one holds about 130 KiB of kernel
    /// memory); 0 makes each sandbox's namespace at its create.
    pub netns_pool: usize,
    /// What the proxy allows each client and each sandbox.
    pub proxy: ProxyLimits,
    /// Run every sandbox in a user namespace of its own (root inside is an
    /// unprivileged host uid). Only for kernels without idmapped mounts may an
    /// operator turn it off, and the dataplane then says so when it starts.
    pub user_namespace: bool,
}

/// Bounds on the proxy, so that no client and no sandbox can exhaust the node.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyLimits {
    /// How long a connection to a sandbox's port may take before the client gets
    /// 502 `port_unreachable`.
    #[serde(with = "millis", rename = "connect_timeout_ms")]
    pub connect_timeout: Duration,
    /// How long a client may take to send a request's head (slow-loris clients
    /// are cut off after it), and how long a kept-alive connection may idle
    /// before its next request.
    #[serde(with = "millis", rename = "header_timeout_ms")]
    pub header_timeout: Duration,
    /// Client connections the proxy holds at once; more are answered 503
    /// `too_many_connections` and closed.
    pub max_connections: usize,
    /// Connections into one sandbox at once (all its ports, sandboxd's
    /// included); more are answered 429 `too_many_connections`.
    pub max_connections_per_sandbox: usize,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(30),
            max_connections: 8192,
            max_connections_per_sandbox: 512,
        }
    }
}

/// Enough for a burst of creates to skip making network namespaces, for about
/// 8 MiB of kernel memory while idle.
pub const DEFAULT_NETNS_POOL: usize = 64;

impl Default for DataplaneConfig {
    fn default() -> Self {
        Self {
            node_id: host_name(),
            server_url: "http://127.0.0.1:8901".to_owned(),
            node_token: String::new(),
            data_dir: PathBuf::from("/var/lib/hutch/dataplane"),
            run_dir: None,
            proxy_url: "http://127.0.0.1:8095".to_owned(),
            proxy_domain: None,
            capacity: CapacityConfig::default(),
            network: true,
            network_bridge: None,
            network_subnet: None,
            network_table: None,
            blocked_networks: None,
            sandboxd_path: PathBuf::from("/usr/local/lib/hutch/sandboxd"),
            cgroup_parent: None,
            insecure_registries: Vec::new(),
            registries: BTreeMap::new(),
            report_interval: Duration::from_secs(2),
            netns_pool: DEFAULT_NETNS_POOL,
            proxy: ProxyLimits::default(),
            user_namespace: true,
        }
    }
}

/// Top-level keys that `HUTCH_<KEY>` may set (nested: `HUTCH_CAPACITY_<KEY>`).
const KEYS: [&str; 19] = [
    "node_id",
    "server_url",
    "node_token",
    "data_dir",
    "run_dir",
    "proxy_url",
    "proxy_domain",
    "network",
    "network_bridge",
    "network_subnet",
    "network_table",
    "blocked_networks",
    "sandboxd_path",
    "cgroup_parent",
    "insecure_registries",
    "registries",
    "report_interval",
    "netns_pool",
    "user_namespace",
];
const CAPACITY_KEYS: [&str; 5] = ["cpus", "memory_mb", "disk_mb", "pids", "max_pids_per_sandbox"];
const PROXY_KEYS: [&str; 4] =
    ["connect_timeout_ms", "header_timeout_ms", "max_connections", "max_connections_per_sandbox"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration")]
    Yaml(#[from] serde_yaml::Error),
    #[error("the configuration is not a mapping of keys to values")]
    NotAMapping,
}

impl DataplaneConfig {
    /// The configuration of `hutch dataplane`: the YAML document `yaml` (if
    /// any), then every `HUTCH_<KEY>` in `env` over it (`HUTCH_SERVER_URL`,
    /// `HUTCH_CAPACITY_CPUS`, ...; values are read as YAML scalars, lists as
    /// YAML flow sequences), then the defaults for whatever is still unset.
    pub fn from_yaml_and_env(
        yaml: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        use serde_yaml::{Mapping, Value};
        let mut root = match yaml.map(serde_yaml::from_str::<Value>).transpose()? {
            None | Some(Value::Null) => Mapping::new(),
            Some(Value::Mapping(mapping)) => mapping,
            Some(_) => return Err(ConfigError::NotAMapping),
        };
        let env: std::collections::HashMap<String, String> = env.into_iter().collect();
        let scalar = |text: &str| {
            serde_yaml::from_str::<Value>(text).unwrap_or_else(|_| Value::String(text.to_owned()))
        };
        for key in KEYS {
            if let Some(value) = env.get(&format!("HUTCH_{}", key.to_uppercase())) {
                // Strings stay strings even when they look like numbers (a token "123").
                let value = match key {
                    "network"
                    | "user_namespace"
                    | "report_interval"
                    | "netns_pool"
                    | "insecure_registries"
                    | "blocked_networks"
                    | "registries" => scalar(value),
                    _ => Value::String(value.clone()),
                };
                root.insert(Value::String(key.to_owned()), value);
            }
        }
        for (section, keys) in [("capacity", &CAPACITY_KEYS[..]), ("proxy", &PROXY_KEYS[..])] {
            for key in keys {
                let name = format!("HUTCH_{}_{}", section.to_uppercase(), key.to_uppercase());
                if let Some(value) = env.get(&name) {
                    let nested = root
                        .entry(Value::String(section.to_owned()))
                        .or_insert_with(|| Value::Mapping(Mapping::new()));
                    let Value::Mapping(nested) = nested else {
                        return Err(ConfigError::NotAMapping);
                    };
                    nested.insert(Value::String((*key).to_owned()), scalar(value));
                }
            }
        }
        Ok(serde_yaml::from_value(Value::Mapping(root))?)
    }

    /// Sandbox networking settings, leases in `<data_dir>/net`.
    pub(crate) fn net_config(&self) -> Result<hutch_net::NetConfig, hutch_net::ParseIpv4NetError> {
        let mut net = hutch_net::NetConfig::new(self.data_dir.join("net"));
        if let Some(bridge) = &self.network_bridge {
            net.bridge = bridge.clone();
        }
        if let Some(subnet) = &self.network_subnet {
            net.subnet = subnet.parse()?;
        }
        if let Some(table) = &self.network_table {
            net.nft_table = table.clone();
        }
        if let Some(networks) = &self.blocked_networks {
            net.blocked_destinations =
                networks.iter().map(|net| net.parse()).collect::<Result<_, _>>()?;
        }
        Ok(net)
    }

    /// How to authenticate to the registry of `reference`: the configured login
    /// for its host, else anonymously.
    pub(crate) fn registry_auth(&self, reference: &str) -> hutch_image::RegistryAuth {
        let login = hutch_image::normalize_reference(reference).ok().and_then(|normalized| {
            let host = normalized.split('/').next()?;
            self.registries.get(host)
        });
        match login {
            Some(login) => hutch_image::RegistryAuth::Basic {
                username: login.username.clone(),
                password: login.password.clone(),
            },
            None => hutch_image::RegistryAuth::Anonymous,
        }
    }

    /// The run dir: `run_dir` when set. Otherwise `<data_dir>/run` if it exists
    /// (a node set up before run dirs moved to tmpfs: its sandboxes live there),
    /// else `hutch/<digest of data_dir>` beneath the first tmpfs of `/run` and
    /// `/dev/shm`, else `<data_dir>/run`.
    ///
    /// Why a tmpfs: every create makes and every destroy removes a handful of
    /// directories and files there, and on ext4 allocating an inode while many were
    /// freed in the last seconds scans past them (`recently_deleted`), which made
    /// inode allocation the largest single cost of a burst of creates.
    pub fn resolve_run_dir(&self) -> std::io::Result<PathBuf> {
        if let Some(dir) = &self.run_dir {
            return Ok(dir.clone());
        }
        let legacy = self.data_dir.join("run");
        if legacy.is_dir() {
            return Ok(legacy);
        }
        for base in ["/run", "/dev/shm"] {
            if is_tmpfs(Path::new(base)) {
                let parent = Path::new(base).join("hutch");
                private_dir(&parent)?;
                let absolute = std::path::absolute(&self.data_dir)?;
                let digest = sha2::Sha256::digest(absolute.as_os_str().as_encoded_bytes());
                return Ok(parent.join(hex::encode(&digest[..8])));
            }
        }
        Ok(legacy)
    }

    pub(crate) fn cgroup_parent(&self) -> String {
        self.cgroup_parent.clone().unwrap_or_else(|| {
            let safe: String = self
                .node_id
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
                .collect();
            format!("hutch-{safe}")
        })
    }
}

/// Whether `path` is on a tmpfs.
fn is_tmpfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct we pass for a NUL-terminated path.
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut stat) == 0 && stat.f_type == libc::TMPFS_MAGIC
    }
}

/// Makes `dir` a directory only root can enter, or checks that it is one. `/dev/shm`
/// is world-writable: another user could have put a symlink or a directory of theirs
/// there first, which we must not follow or use.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{} is not a directory of ours with mode 0700", dir.display()),
        ));
    }
    Ok(())
}

/// A user name and password (or token) for one registry: HTTP basic auth, or the
/// credentials for the registry's token service.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegistryLogin {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for RegistryLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The configuration is logged at start-up; the password must not be.
        f.debug_struct("RegistryLogin")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Capacity overrides; `None` means "derive from the host".
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CapacityConfig {
    pub cpus: Option<f64>,
    pub memory_mb: Option<u64>,
    pub disk_mb: Option<u64>,
    pub pids: Option<u32>,
    /// The most pids one sandbox may ask for; [`DEFAULT_MAX_PIDS_PER_SANDBOX`]
    /// (and never more than the kernel's `pid_max`) when unset.
    pub max_pids_per_sandbox: Option<u32>,
}

/// The default of [`CapacityConfig::max_pids_per_sandbox`]: plenty for a build
/// or a test suite, a small share of the kernel's default `pid_max` (4 Mi).
pub const DEFAULT_MAX_PIDS_PER_SANDBOX: u32 = 32768;

/// What the node offers sandboxes in total.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Capacity {
    pub cpus: f64,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub pids: u32,
    /// The most one sandbox may have: the host's real resources, not the
    /// overcommitted totals above.
    pub per_sandbox: SandboxMax,
}

/// The largest sandbox a node runs. A sandbox's memory and disk both live in
/// memory (the writable layer is a tmpfs), so together they must fit the host's
/// memory; its CPU quota must fit the host's cores.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SandboxMax {
    pub cpus: f64,
    /// Memory plus disk, in MiB.
    pub memory_mb: u64,
    pub pids: u32,
}

impl Capacity {
    /// Whether one sandbox's limits fit [`Capacity::per_sandbox`]; the message
    /// says which does not.
    pub(crate) fn check(&self, limits: &hutch_isolate::Limits) -> Result<(), String> {
        let max = self.per_sandbox;
        let memory_mb = limits.memory_limit() >> 20;
        if memory_mb > max.memory_mb {
            return Err(format!(
                "resources.memory_mb + resources.disk_mb is {memory_mb} MiB, more than this node's memory ({} MiB)",
                max.memory_mb
            ));
        }
        if f64::from(limits.cpu_millis) / 1000.0 > max.cpus {
            return Err(format!(
                "resources.cpus is {}, more than this node's {} cores",
                f64::from(limits.cpu_millis) / 1000.0,
                max.cpus
            ));
        }
        if limits.pids > max.pids {
            return Err(format!(
                "resources.pids is {}, more than this node allows one sandbox ({})",
                limits.pids, max.pids
            ));
        }
        Ok(())
    }
}

impl Capacity {
    /// Fills what `config` leaves open from the host: cpus = cores × 64 (a
    /// sandbox's cpus are a CFS quota, a cap on a time-shared core, and most
    /// sandboxes idle), memory = MemTotal × 4 (limits are caps, and idle
    /// sandboxes use ~3 MiB),
    /// disk = free space of `data_dir` × 8 (a sandbox's disk limit caps a tmpfs
    /// that costs nothing until written), pids = the kernel's `pid_max`. Host
    /// numbers come from `/host/proc` when the dataplane runs in a container
    /// with the host's /proc mounted there.
    pub fn resolve(config: &CapacityConfig, data_dir: &Path) -> Self {
        let proc = if Path::new("/host/proc").is_dir() { "/host/proc" } else { "/proc" };
        let proc = Path::new(proc);
        let cores = std::fs::read_to_string(proc.join("cpuinfo"))
            .map(|text| count_processors(&text))
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let mem_total_kb = std::fs::read_to_string(proc.join("meminfo"))
            .ok()
            .and_then(|text| mem_total_kb(&text))
            .unwrap_or(1 << 20);
        let pid_max = std::fs::read_to_string(proc.join("sys/kernel/pid_max"))
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(32768);
        let per_sandbox = SandboxMax {
            cpus: cores as f64,
            memory_mb: mem_total_kb / 1024,
            pids: config.max_pids_per_sandbox.unwrap_or(DEFAULT_MAX_PIDS_PER_SANDBOX).min(pid_max),
        };
        Self {
            cpus: config.cpus.unwrap_or(cores as f64 * 64.0),
            memory_mb: config.memory_mb.unwrap_or(mem_total_kb / 1024 * 4),
            disk_mb: config.disk_mb.unwrap_or_else(|| free_disk_mb(data_dir).saturating_mul(8)),
            pids: config.pids.unwrap_or(pid_max),
            per_sandbox,
        }
    }
}

fn count_processors(cpuinfo: &str) -> usize {
    cpuinfo.lines().filter(|line| line.starts_with("processor")).count()
}

fn mem_total_kb(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix("MemTotal:")?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

fn free_disk_mb(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return 0;
    };
    // SAFETY: statvfs is plain old data that the kernel fills in.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return 0;
    }
    (stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64) >> 20
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "node".to_owned())
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(deserializer)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_numbers_are_parsed_from_proc_files() {
        assert_eq!(count_processors("processor\t: 0\nmodel\nprocessor\t: 1\n"), 2);
        assert_eq!(mem_total_kb("MemTotal:       24684084 kB\nMemFree: 1 kB\n"), Some(24684084));
        assert_eq!(mem_total_kb("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn overrides_win_over_the_host() {
        let config = CapacityConfig {
            cpus: Some(2.5),
            memory_mb: Some(100),
            disk_mb: Some(7),
            pids: Some(9),
            max_pids_per_sandbox: Some(5),
        };
        let capacity = Capacity::resolve(&config, Path::new("/"));
        assert_eq!(
            (capacity.cpus, capacity.memory_mb, capacity.disk_mb, capacity.pids),
            (2.5, 100, 7, 9)
        );
        assert_eq!(capacity.per_sandbox.pids, 5);
    }

    #[test]
    fn derived_capacity_is_a_multiple_of_the_host() {
        let capacity = Capacity::resolve(&CapacityConfig::default(), Path::new("/"));
        let cores = std::thread::available_parallelism().unwrap().get() as f64;
        assert!(capacity.cpus >= cores * 64.0 - 0.1, "{capacity:?}");
        assert!(capacity.memory_mb > 0 && capacity.pids > 0, "{capacity:?}");
    }

    #[test]
    fn yaml_fills_what_it_leaves_out_with_defaults() {
        let config: DataplaneConfig = serde_yaml::from_str("{}").unwrap();
        assert_eq!(config.server_url, "http://127.0.0.1:8901");
        assert_eq!(config.report_interval, Duration::from_secs(2));
        assert_eq!(config.netns_pool, DEFAULT_NETNS_POOL);
        assert!(config.network);
        let yaml = "node_id: n1\nnode_token: t\ndata_dir: /tmp/dp\nnetwork: false\n\
                    proxy_domain: sb.example\ncapacity: { cpus: 4, memory_mb: 2048 }\n\
                    report_interval: 500\n";
        let config: DataplaneConfig = serde_yaml::from_str(yaml).unwrap();
        assert_eq!((config.node_id.as_str(), config.node_token.as_str()), ("n1", "t"));
        assert!(config.run_dir.is_none());
        assert_eq!(config.capacity.cpus, Some(4.0));
        assert_eq!(config.capacity.disk_mb, None);
        assert_eq!(config.report_interval, Duration::from_millis(500));
        assert!(serde_yaml::from_str::<DataplaneConfig>("nodeid: x").is_err());
    }

    #[test]
    fn env_overrides_yaml() {
        let env = [
            ("HUTCH_SERVER_URL", "http://10.0.0.1:8901"),
            ("HUTCH_NODE_TOKEN", "123"),
            ("HUTCH_NETWORK", "false"),
            ("HUTCH_CAPACITY_CPUS", "3"),
            ("HUTCH_INSECURE_REGISTRIES", "[127.0.0.1:5000]"),
            ("HUTCH_NETNS_POOL", "0"),
            ("PATH", "/usr/bin"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let yaml = "node_id: a\nnetwork: true\ncapacity:\n  memory_mb: 100\n";
        let config = DataplaneConfig::from_yaml_and_env(Some(yaml), env).unwrap();
        assert_eq!(config.node_id, "a");
        assert_eq!(config.server_url, "http://10.0.0.1:8901");
        assert_eq!(config.node_token, "123");
        assert_eq!(config.netns_pool, 0);
        assert!(!config.network);
        assert_eq!(config.capacity.cpus, Some(3.0));
        assert_eq!(config.capacity.memory_mb, Some(100));
        assert_eq!(config.insecure_registries, vec!["127.0.0.1:5000".to_owned()]);
        let defaults = DataplaneConfig::from_yaml_and_env(None, []).unwrap();
        assert_eq!(defaults.server_url, "http://127.0.0.1:8901");
        assert!(DataplaneConfig::from_yaml_and_env(Some("- 1"), []).is_err());
    }

    #[test]
    fn registry_logins_apply_to_their_host_only_and_are_never_printed() {
        let env = [(
            "HUTCH_REGISTRIES".to_owned(),
            "{127.0.0.1:5000: {username: ci, password: s3cret}}".to_owned(),
        )];
        let yaml = "registries:\n  docker.io: {username: hub, password: hubpass}\n";
        let config = DataplaneConfig::from_yaml_and_env(Some(yaml), env).unwrap();
        // The environment replaces the whole map, as for every other key.
        assert_eq!(config.registries.len(), 1);
        assert!(matches!(
            config.registry_auth("127.0.0.1:5000/team/app:1"),
            hutch_image::RegistryAuth::Basic { ref username, ref password }
                if username == "ci" && password == "s3cret"
        ));
        assert!(matches!(config.registry_auth("busybox"), hutch_image::RegistryAuth::Anonymous));
        assert!(matches!(
            config.registry_auth("127.0.0.1:5001/team/app"),
            hutch_image::RegistryAuth::Anonymous
        ));
        let hub: DataplaneConfig = serde_yaml::from_str(yaml).unwrap();
        assert!(matches!(
            hub.registry_auth("busybox"),
            hutch_image::RegistryAuth::Basic { ref username, .. } if username == "hub"
        ));
        assert!(!format!("{config:?}").contains("s3cret"));
        assert!(serde_yaml::from_str::<DataplaneConfig>("registries: {r: {username: u}}").is_err());
    }

    #[test]
    fn run_dir_defaults_to_a_private_tmpfs_dir_named_after_the_data_dir() {
        let data = tempfile::tempdir().unwrap();
        let config = DataplaneConfig { data_dir: data.path().join("a"), ..Default::default() };
        let dir = config.resolve_run_dir().unwrap();
        assert_eq!(dir, config.resolve_run_dir().unwrap(), "stable across calls");
        if is_tmpfs(Path::new("/run")) || is_tmpfs(Path::new("/dev/shm")) {
            assert!(is_tmpfs(dir.parent().unwrap()), "{dir:?}");
            let meta = std::fs::metadata(dir.parent().unwrap()).unwrap();
            assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o700);
        }
        let other = DataplaneConfig { data_dir: data.path().join("b"), ..Default::default() };
        assert_ne!(other.resolve_run_dir().unwrap(), dir);
        // A node whose sandboxes already live in <data_dir>/run keeps them there.
        std::fs::create_dir_all(data.path().join("b/run")).unwrap();
        assert_eq!(other.resolve_run_dir().unwrap(), data.path().join("b/run"));
        let set = DataplaneConfig { run_dir: Some("/x".into()), ..Default::default() };
        assert_eq!(set.resolve_run_dir().unwrap(), PathBuf::from("/x"));
    }

    #[test]
    fn a_run_dir_parent_that_others_can_enter_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("hutch");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        assert!(private_dir(&open).is_err());
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        assert!(private_dir(&link).is_err());
        let fresh = dir.path().join("fresh");
        private_dir(&fresh).unwrap();
        private_dir(&fresh).unwrap();
    }

    #[test]
    fn cgroup_parent_is_named_after_the_node() {
        let config = DataplaneConfig { node_id: "n1.example".into(), ..Default::default() };
        assert_eq!(config.cgroup_parent(), "hutch-n1_example");
    }
}
