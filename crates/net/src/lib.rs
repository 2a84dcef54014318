//! Per-sandbox networking for Hutch's native driver.
//!
//! A sandbox with egress [`Egress::None`] gets a network namespace with only
//! loopback up. A sandbox with [`Egress::Internet`] also gets a veth pair: the
//! host end (`hv-<hash of the id>`) is an isolated port of a host bridge that
//! carries the gateway address, the other end is `eth0` inside the sandbox with
//! an address leased from the subnet and a default route via the gateway.
//! nftables masquerades the subnet to the outside and enforces what sandboxes
//! may reach:
//!
//! * not each other (isolated bridge ports, and no routed hairpin);
//! * not the host itself, on any of its addresses (new connections from the
//!   bridge are dropped in `input`; replies to the host's own connections pass,
//!   so the host, e.g. the proxy, can reach every sandbox's address);
//! * not link-local or metadata addresses (169.254.0.0/16 by default);
//! * no IPv6 at all, and no spoofed source address.
//!
//! See `rules.rs` for the exact policy. Kernel calls go through two seams,
//! `link.rs` (rtnetlink) and `nft.rs` (the `nft` binary); address leases,
//! naming and rule generation are plain code with unit tests.

mod ipnet;
mod lease;
mod link;
mod naming;
mod nft;
mod rules;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

pub use crate::ipnet::{Ipv4Net, ParseIpv4NetError};
pub use crate::lease::LeaseError;
pub use crate::link::{ConfigureNamespaceError, NetlinkError};
pub use crate::naming::{
    InvalidSandboxIdError, MAX_SANDBOX_ID_LEN, SANDBOX_IFNAME, VETH_PREFIX, validate_sandbox_id,
    veth_name,
};
pub use crate::nft::NftError;

use crate::lease::LeaseStore;
use crate::link::{HostNetlink, SandboxInterface, configure_namespace};
use crate::nft::Nft;
use crate::rules::{Policy, SandboxRule};

/// How long attach waits for the kernel to report the sandbox's veth up.
const LINK_UP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// What a sandbox may reach beyond its own loopback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// Loopback only.
    None,
    /// The internet through NAT, and nothing on the host or in other sandboxes.
    Internet,
}

/// Host-wide network settings. One [`NetManager`] owns them at a time.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Name of the host bridge (at most 15 bytes). Default `hutch0`.
    pub bridge: String,
    /// The sandboxes' subnet; the bridge gets its first address as gateway.
    /// Default 10.89.0.0/16.
    pub subnet: Ipv4Net,
    /// Name of the `bridge` and `inet` nft tables. Default `hutch`.
    pub nft_table: String,
    /// Directory of IP leases, one file per sandbox id.
    pub state_dir: PathBuf,
    /// Destinations sandboxes may never reach even with internet egress.
    /// Default 169.254.0.0/16 (link-local, including cloud metadata services).
    pub blocked_destinations: Vec<Ipv4Net>,
    /// The `nft` executable: a path, or a name looked up in `PATH`. Default `nft`.
    pub nft_binary: PathBuf,
}

impl NetConfig {
    /// The default settings with leases kept in `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        NetConfig {
            bridge: "hutch0".to_owned(),
            subnet: Ipv4Net::new_const(Ipv4Addr::new(10, 89, 0, 0), 16),
            nft_table: "hutch".to_owned(),
            state_dir: state_dir.into(),
            blocked_destinations: vec![Ipv4Net::new_const(Ipv4Addr::new(169, 254, 0, 0), 16)],
            nft_binary: PathBuf::from("nft"),
        }
    }
}

impl Default for NetConfig {
    /// The default settings with leases in `/var/lib/hutch/net/leases`.
    fn default() -> Self {
        NetConfig::new("/var/lib/hutch/net/leases")
    }
}

/// A sandbox's network identity, as seen from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxNet {
    /// The sandbox's address on the bridge; `None` for [`Egress::None`].
    pub address: Option<Ipv4Addr>,
    /// The gateway (the bridge's address); `None` for [`Egress::None`].
    pub gateway: Option<Ipv4Addr>,
    /// The host end of the sandbox's veth; `None` for [`Egress::None`].
    pub host_interface: Option<String>,
}

/// What a sweep removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetSweepReport {
    /// Host-side veths removed.
    pub veths_removed: Vec<String>,
    /// Number of per-sandbox nft rules removed.
    pub rules_removed: usize,
    /// Sandbox ids whose lease was released.
    pub leases_released: Vec<String>,
}

/// Why the host side of sandbox networking could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetSetupError {
    #[error("bridge name {name:?} must be 1 to 15 bytes and must not start with {VETH_PREFIX:?}")]
    InvalidBridgeName { name: String },
    #[error("nft table name {name:?} must be 1 to 64 characters of [A-Za-z0-9_-]")]
    InvalidTableName { name: String },
    #[error("subnet {subnet} is too small to hold a gateway and a sandbox")]
    SubnetTooSmall { subnet: Ipv4Net },
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error("cannot load ip leases")]
    Leases(#[from] LeaseError),
    #[error("cannot open a netlink socket")]
    NetlinkConnect(#[source] io::Error),
    #[error("cannot set up bridge")]
    Netlink(#[from] NetlinkError),
    #[error("cannot write sysctl {path}")]
    Sysctl {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Why a sandbox could not be attached. Whatever was created for it is removed
/// again before this is returned.
#[derive(Debug, thiserror::Error)]
pub enum AttachNetworkError {
    #[error(transparent)]
    InvalidSandboxId(#[from] InvalidSandboxIdError),
    #[error("cannot open network namespace {path}")]
    OpenNamespace {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot lease an address")]
    Lease(#[from] LeaseError),
    #[error("cannot create the sandbox's veth")]
    Netlink(#[from] NetlinkError),
    #[error("cannot configure the sandbox's network namespace")]
    Namespace(#[from] ConfigureNamespaceError),
    #[error("cannot add the sandbox's nft rules")]
    Nft(#[from] NftError),
    #[error("cannot remove what an earlier attach of the same sandbox left")]
    Stale(#[source] Box<DetachNetworkError>),
}

/// Why a sandbox's network could not be fully removed.
#[derive(Debug, thiserror::Error)]
pub enum DetachNetworkError {
    #[error(transparent)]
    InvalidSandboxId(#[from] InvalidSandboxIdError),
    #[error("cannot remove the sandbox's nft rules")]
    Nft(#[from] NftError),
    #[error("cannot remove the sandbox's veth")]
    Netlink(#[from] NetlinkError),
    #[error("cannot release the sandbox's lease")]
    Lease(#[from] LeaseError),
}

/// Why a sweep could not finish.
#[derive(Debug, thiserror::Error)]
pub enum NetSweepError {
    #[error("cannot remove stale nft rules")]
    Nft(#[from] NftError),
    #[error("cannot remove stale veths")]
    Netlink(#[from] NetlinkError),
    #[error("cannot release stale leases")]
    Lease(#[from] LeaseError),
}

/// Why the host side could not be removed.
#[derive(Debug, thiserror::Error)]
pub enum NetTeardownError {
    #[error("cannot remove sandbox networks")]
    Sweep(#[from] NetSweepError),
    #[error("cannot remove the nft tables")]
    Nft(#[from] NftError),
    #[error("cannot remove the bridge")]
    Netlink(#[from] NetlinkError),
}

/// Owns the host side of sandbox networking: the bridge, the nft tables and
/// the lease directory.
///
/// Must be created and used inside a tokio runtime with I/O and time enabled
/// (its netlink connection runs as a task on it), from threads in the host's
/// network namespace.
#[derive(Debug)]
pub struct NetManager {
    config: NetConfig,
    gateway: Ipv4Addr,
    bridge_index: u32,
    netlink: HostNetlink,
    nft: Nft,
    leases: LeaseStore,
    // Handles of each attached sandbox's rules, as nft echoed them, so that
    // detach need not list the ruleset. A cache: the ruleset is the truth, and
    // a manager started later finds rules by their comments instead.
    rule_handles: Mutex<HashMap<String, Vec<SandboxRule>>>,
}

fn write_sysctl(path: &str, value: &str, missing_ok: bool) -> Result<(), NetSetupError> {
    match std::fs::write(path, value) {
        Ok(()) => Ok(()),
        Err(error) if missing_ok && error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetSetupError::Sysctl { path: path.to_owned(), source }),
    }
}

impl NetManager {
    /// Ensures the bridge (with the gateway address, up), the nft tables and
    /// their static rules, and IPv4 forwarding in this network namespace. Safe
    /// to call again, e.g. by a restarted dataplane: per-sandbox rules, veths
    /// and leases of running sandboxes are kept.
    pub async fn new(config: NetConfig) -> Result<NetManager, NetSetupError> {
        let bridge_ok = !config.bridge.is_empty()
            && config.bridge.len() <= 15
            && !config.bridge.starts_with(VETH_PREFIX)
            && config.bridge != "."
            && config.bridge != ".."
            && !config.bridge.contains(['/', ':', '*', ' ', '"', '\0']);
        if !bridge_ok {
            return Err(NetSetupError::InvalidBridgeName { name: config.bridge.clone() });
        }
        let table_ok = !config.nft_table.is_empty()
            && config.nft_table.len() <= 64
            && config
                .nft_table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
        if !table_ok {
            return Err(NetSetupError::InvalidTableName { name: config.nft_table.clone() });
        }
        let Some(gateway) = config.subnet.gateway() else {
            return Err(NetSetupError::SubnetTooSmall { subnet: config.subnet });
        };
        let nft = Nft::new(config.nft_binary.clone());
        nft.check_installed().await?;
        let leases = LeaseStore::open(&config.state_dir, config.subnet)?;
        let netlink = HostNetlink::open().map_err(NetSetupError::NetlinkConnect)?;
        let bridge_index =
            netlink.ensure_bridge(&config.bridge, gateway, config.subnet.prefix_len()).await?;
        // The bridge needs no IPv6 (sandboxes get none), so it gets no
        // link-local address sandboxes could talk to.
        write_sysctl(
            &format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", config.bridge),
            "1",
            true,
        )?;
        write_sysctl("/proc/sys/net/ipv4/ip_forward", "1", false)?;
        let manager = NetManager {
            config,
            gateway,
            bridge_index,
            netlink,
            nft,
            leases,
            rule_handles: Mutex::new(HashMap::new()),
        };
        manager.nft.apply(rules::base_ruleset(&manager.policy())).await?;
        Ok(manager)
    }

    fn policy(&self) -> Policy<'_> {
        Policy {
            table: &self.config.nft_table,
            bridge: &self.config.bridge,
            subnet: self.config.subnet,
            blocked_destinations: &self.config.blocked_destinations,
        }
    }

    fn rule_handles(&self) -> MutexGuard<'_, HashMap<String, Vec<SandboxRule>>> {
        // Every update is a single insert or remove, so a poisoned map is intact.
        self.rule_handles.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// The bridge's address, the sandboxes' default gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// Sets up networking inside the network namespace at `netns` (for example
    /// `/proc/<pid>/ns/net`): loopback always; for [`Egress::Internet`] also the
    /// veth pair, the leased address, the default route and the sandbox's nft
    /// rules. Attaching an attached sandbox again replaces its veth and rules
    /// and keeps its address.
    pub async fn attach(
        &self,
        sandbox_id: &str,
        netns: &Path,
        egress: Egress,
    ) -> Result<SandboxNet, AttachNetworkError> {
        validate_sandbox_id(sandbox_id)?;
        let namespace = File::open(netns).map_err(|source| AttachNetworkError::OpenNamespace {
            path: netns.to_owned(),
            source,
        })?;
        match egress {
            Egress::None => {
                configure_namespace(namespace, None).await?;
                Ok(SandboxNet { address: None, gateway: None, host_interface: None })
            }
            Egress::Internet => {
                if self.leases.get(sandbox_id).is_some() {
                    self.remove(sandbox_id)
                        .await
                        .map_err(|error| AttachNetworkError::Stale(Box::new(error)))?;
                }
                let address = self.leases.acquire(sandbox_id)?;
                match self.attach_internet(sandbox_id, namespace, address).await {
                    Ok(net) => Ok(net),
                    Err(error) => {
                        if let Err(cleanup) = self.remove(sandbox_id).await {
                            tracing::warn!(
                                sandbox_id,
                                error = &cleanup as &dyn std::error::Error,
                                "cannot clean up after a failed attach"
                            );
                        }
                        Err(error)
                    }
                }
            }
        }
    }

    async fn attach_internet(
        &self,
        sandbox_id: &str,
        namespace: File,
        address: Ipv4Addr,
    ) -> Result<SandboxNet, AttachNetworkError> {
        let veth = veth_name(sandbox_id);
        // A veth of a crashed earlier attempt would make creation fail; it
        // belongs to this sandbox id by its name.
        self.netlink.delete_link(&veth).await?;
        self.netlink.create_sandbox_veth(&veth, self.bridge_index, &namespace, address).await?;
        let interface = SandboxInterface {
            address,
            prefix_len: self.config.subnet.prefix_len(),
            gateway: self.gateway,
        };
        let rules = rules::sandbox_rules(&self.policy(), sandbox_id, &veth, address);
        // Independent: one runs on a thread inside the sandbox's namespace, the
        // other in an `nft` child process.
        let (inside, echo) = tokio::join!(
            configure_namespace(namespace, Some(interface)),
            self.nft.apply_echo(rules)
        );
        let echo = echo?;
        let added = rules::sandbox_rules_in_listing(&echo, &self.config.nft_table);
        self.rule_handles().insert(sandbox_id.to_owned(), added);
        inside?;
        if !self.netlink.wait_until_up(&veth, LINK_UP_TIMEOUT).await? {
            // Not an error: the sandbox works once the kernel catches up.
            tracing::warn!(sandbox_id, veth, "veth not operationally up after attach");
        }
        Ok(SandboxNet {
            address: Some(address),
            gateway: Some(self.gateway),
            host_interface: Some(veth),
        })
    }

    /// Removes the sandbox's veth, nft rules and lease. Idempotent: detaching a
    /// sandbox that has no network (or no longer has one) succeeds.
    pub async fn detach(&self, sandbox_id: &str) -> Result<(), DetachNetworkError> {
        validate_sandbox_id(sandbox_id)?;
        // Invariant: a sandbox's veth and rules exist only while its lease does
        // (attach leases first, detach releases last), so no lease, nothing to do.
        if self.leases.get(sandbox_id).is_none() {
            return Ok(());
        }
        self.remove(sandbox_id).await
    }

    async fn remove(&self, sandbox_id: &str) -> Result<(), DetachNetworkError> {
        let veth = veth_name(sandbox_id);
        // Independent, and deleting a veth waits for an RCU grace period.
        let (rules, link) =
            tokio::join!(self.remove_rules(sandbox_id), self.netlink.delete_link(&veth));
        rules?;
        link?;
        if let Some(address) = self.leases.get(sandbox_id) {
            self.netlink.delete_neighbour(self.bridge_index, address).await?;
        }
        self.leases.release(sandbox_id)?;
        Ok(())
    }

    async fn remove_rules(&self, sandbox_id: &str) -> Result<(), NftError> {
        // An empty echo (an nft that does not echo handles) proves nothing.
        let cached = self.rule_handles().remove(sandbox_id).filter(|rules| !rules.is_empty());
        if let Some(cached) = cached {
            match self.nft.apply(rules::delete_rules(&self.config.nft_table, &cached)).await {
                Ok(()) => return Ok(()),
                // Someone changed the ruleset under us; fall back to the listing.
                Err(error) => tracing::debug!(
                    sandbox_id,
                    error = &error as &dyn std::error::Error,
                    "cannot delete rules by their cached handles"
                ),
            }
        }
        let listing = self.nft.list().await?;
        let stale: Vec<_> = rules::sandbox_rules_in_listing(&listing, &self.config.nft_table)
            .into_iter()
            .filter(|rule| rule.sandbox_id == sandbox_id)
            .collect();
        self.nft.apply(rules::delete_rules(&self.config.nft_table, &stale)).await
    }

    /// Removes veths, nft rules and leases of every sandbox not in `live`, for
    /// example what a crashed dataplane left behind.
    pub async fn sweep(&self, live: &HashSet<String>) -> Result<NetSweepReport, NetSweepError> {
        let mut report = NetSweepReport::default();
        let listing = self.nft.list().await?;
        let stale: Vec<_> = rules::sandbox_rules_in_listing(&listing, &self.config.nft_table)
            .into_iter()
            .filter(|rule| !live.contains(&rule.sandbox_id))
            .collect();
        report.rules_removed = stale.len();
        self.rule_handles().retain(|id, _| live.contains(id));
        self.nft.apply(rules::delete_rules(&self.config.nft_table, &stale)).await?;
        let live_veths: HashSet<String> = live.iter().map(|id| veth_name(id)).collect();
        for name in self.netlink.link_names_with_prefix(VETH_PREFIX).await? {
            if !live_veths.contains(&name) && self.netlink.delete_link(&name).await? {
                report.veths_removed.push(name);
            }
        }
        for id in self.leases.sandbox_ids() {
            if !live.contains(&id) {
                if let Some(address) = self.leases.get(&id) {
                    self.netlink.delete_neighbour(self.bridge_index, address).await?;
                }
                self.leases.release(&id)?;
                report.leases_released.push(id);
            }
        }
        report.veths_removed.sort();
        report.leases_released.sort();
        Ok(report)
    }

    /// Removes every sandbox network, the nft tables and the bridge. For tests
    /// and uninstall; sandboxes lose their network.
    pub async fn teardown(&self) -> Result<(), NetTeardownError> {
        self.sweep(&HashSet::new()).await?;
        self.nft.apply(rules::delete_tables(&self.config.nft_table)).await?;
        self.netlink.delete_link(&self.config.bridge).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_nft_binary_is_reported_with_the_package_to_install() {
        let state = tempfile::tempdir().unwrap();
        let mut config = NetConfig::new(state.path());
        config.nft_binary = PathBuf::from("/nonexistent/hutch-test/nft");
        let error = NetManager::new(config).await.unwrap_err();
        assert!(matches!(error, NetSetupError::Nft(NftError::Missing { .. })));
        assert!(error.to_string().contains("apt-get install nftables"), "{error}");
    }

    #[tokio::test]
    async fn invalid_names_are_rejected_before_touching_the_host() {
        let state = tempfile::tempdir().unwrap();
        let mut config = NetConfig::new(state.path());
        config.bridge = "hv-bridge".to_owned();
        assert!(matches!(
            NetManager::new(config.clone()).await,
            Err(NetSetupError::InvalidBridgeName { .. })
        ));
        config.bridge = "a-name-longer-than-15".to_owned();
        assert!(matches!(
            NetManager::new(config.clone()).await,
            Err(NetSetupError::InvalidBridgeName { .. })
        ));
        config.bridge = "hutch0".to_owned();
        config.nft_table = "bad table".to_owned();
        assert!(matches!(
            NetManager::new(config.clone()).await,
            Err(NetSetupError::InvalidTableName { .. })
        ));
        config.nft_table = "hutch".to_owned();
        config.subnet = "10.0.0.0/31".parse().unwrap();
        assert!(matches!(NetManager::new(config).await, Err(NetSetupError::SubnetTooSmall { .. })));
    }
}
