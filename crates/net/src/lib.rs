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
//! See `rules.rs` for the exact policy: static rules, and per sandbox two
//! elements of nft sets. Kernel calls go through three seams, `link.rs`
//! (rtnetlink), `nfnl.rs` (nf_tables netlink, for set elements: attach and
//! detach run no process) and `nft.rs` (the `nft` binary, for the static
//! ruleset and listings); address leases, naming and rule generation are plain
//! code with unit tests.

mod ipnet;
mod lease;
mod link;
mod naming;
mod nfnl;
mod nft;
mod rules;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

pub use crate::ipnet::{Ipv4Net, ParseIpv4NetError};
pub use crate::lease::LeaseError;
pub use crate::link::{ConfigureNamespaceError, NetlinkError};
pub use crate::naming::{
    InvalidSandboxIdError, MAX_SANDBOX_ID_LEN, SANDBOX_IFNAME, VETH_PREFIX, validate_sandbox_id,
    veth_name,
};
pub use crate::nfnl::SetElementError;
pub use crate::nft::NftError;

use crate::lease::LeaseStore;
use crate::link::{HostNetlink, SandboxInterface, configure_namespace};
use crate::nfnl::{SetElement, SetElements};
use crate::nft::Nft;
use crate::rules::Policy;

/// How long attach waits for the kernel to report the sandbox's veth up.
const LINK_UP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a removal leaves the veth of a sandbox whose namespace is gone to
/// the kernel before deleting it itself.
const NAMESPACE_EXIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// What a sandbox may reach beyond its own loopback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// Loopback only.
    None,
    /// The internet through NAT, and nothing on the host or in other sandboxes.
    Internet,
}

/// What egress `internet` never reaches by default: the special-purpose ranges
/// of RFC 6890 that are not the public internet. Private networks (RFC 1918)
/// and carrier-grade NAT (100.64/10) are where a node's own network and its
/// neighbours live; link-local holds cloud metadata services; the rest is
/// loopback, "this network", IETF protocol assignments, benchmarking,
/// multicast and reserved space. The documentation ranges (TEST-NET-1..3)
/// are left reachable, as they are on the internet (nowhere).
pub const DEFAULT_BLOCKED_DESTINATIONS: [Ipv4Net; 11] = [
    Ipv4Net::new_const(Ipv4Addr::new(0, 0, 0, 0), 8),
    Ipv4Net::new_const(Ipv4Addr::new(10, 0, 0, 0), 8),
    Ipv4Net::new_const(Ipv4Addr::new(100, 64, 0, 0), 10),
    Ipv4Net::new_const(Ipv4Addr::new(127, 0, 0, 0), 8),
    Ipv4Net::new_const(Ipv4Addr::new(169, 254, 0, 0), 16),
    Ipv4Net::new_const(Ipv4Addr::new(172, 16, 0, 0), 12),
    Ipv4Net::new_const(Ipv4Addr::new(192, 0, 0, 0), 24),
    Ipv4Net::new_const(Ipv4Addr::new(192, 168, 0, 0), 16),
    Ipv4Net::new_const(Ipv4Addr::new(198, 18, 0, 0), 15),
    Ipv4Net::new_const(Ipv4Addr::new(224, 0, 0, 0), 4),
    Ipv4Net::new_const(Ipv4Addr::new(240, 0, 0, 0), 4),
];

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
    /// Default [`DEFAULT_BLOCKED_DESTINATIONS`]: every range that is not the
    /// public internet, so that a sandbox reaches neither the node's network
    /// nor a cloud's metadata service.
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
            blocked_destinations: DEFAULT_BLOCKED_DESTINATIONS.to_vec(),
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
    /// Number of per-sandbox nft set elements removed (two per sandbox).
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
    #[error("cannot restore the nft set elements of leased sandboxes")]
    SetElements(#[from] SetElementError),
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
    #[error("cannot add the sandbox's nft set elements")]
    SetElements(#[from] SetElementError),
    #[error("cannot remove what an earlier attach of the same sandbox left")]
    Stale(#[source] Box<DetachNetworkError>),
}

/// Why a sandbox's network could not be fully removed.
#[derive(Debug, thiserror::Error)]
pub enum DetachNetworkError {
    #[error(transparent)]
    InvalidSandboxId(#[from] InvalidSandboxIdError),
    #[error("cannot remove the sandbox's nft set elements")]
    SetElements(#[from] SetElementError),
    #[error("cannot remove the sandbox's veth")]
    Netlink(#[from] NetlinkError),
    #[error("cannot release the sandbox's lease")]
    Lease(#[from] LeaseError),
}

/// Why a sweep could not finish.
#[derive(Debug, thiserror::Error)]
pub enum NetSweepError {
    #[error("cannot list the nft ruleset")]
    Nft(#[from] NftError),
    #[error("cannot remove stale nft set elements")]
    SetElements(#[from] SetElementError),
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
/// (its netlink connection and its background removals run as tasks on it),
/// from threads in the host's network namespace.
#[derive(Debug)]
pub struct NetManager {
    inner: Arc<Inner>,
}

/// What attach, detach and the background removals share.
#[derive(Debug)]
struct Inner {
    config: NetConfig,
    gateway: Ipv4Addr,
    bridge_index: u32,
    netlink: HostNetlink,
    nft: Nft,
    // Per-sandbox nft state (set elements) goes through netlink, not `nft`.
    elements: SetElements,
    leases: LeaseStore,
    // Ids whose removal runs in the background. A std mutex: it is held only
    // for a set insert, remove or look-up, never across an await.
    removing: Mutex<HashSet<String>>,
    // Woken whenever a background removal finishes.
    removed: Notify,
    // Single addresses no sandbox may reach, by the caller's tag (see
    // NetManager::block_addresses). A std mutex, never held across an await.
    blocked: Mutex<HashMap<String, HashSet<Ipv4Addr>>>,
    // The namespace each attached sandbox was attached in, so that a removal
    // can tell whether the kernel is about to delete the veth itself. A hint:
    // without it, the veth is deleted explicitly.
    namespaces: Mutex<HashMap<String, NamespaceRef>>,
}

/// Where a sandbox's network namespace was, and which namespace it was.
#[derive(Debug, Clone)]
struct NamespaceRef {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl NamespaceRef {
    fn of(path: &Path, namespace: &File) -> Option<Self> {
        let metadata = namespace.metadata().ok()?;
        Some(NamespaceRef { path: path.to_owned(), dev: metadata.dev(), ino: metadata.ino() })
    }

    /// Whether the path still leads to the same namespace. `/proc/<pid>/ns/net`
    /// stops doing so when the process exits, and a sandbox's namespace dies
    /// with its last process (the driver's sandbox init, after which the
    /// kernel kills the rest of its pid namespace).
    fn is_reachable(&self) -> bool {
        std::fs::metadata(&self.path)
            .is_ok_and(|metadata| metadata.dev() == self.dev && metadata.ino() == self.ino)
    }
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
    /// their static rules and sets, and IPv4 forwarding in this network
    /// namespace. Safe to call again, e.g. by a restarted dataplane: veths and
    /// leases of running sandboxes are kept, and every leased sandbox's set
    /// elements are (re-)added.
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
        let elements = SetElements::open()?;
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
        let inner = Inner {
            config,
            gateway,
            bridge_index,
            netlink,
            nft,
            elements,
            leases,
            removing: Mutex::new(HashSet::new()),
            blocked: Mutex::new(HashMap::new()),
            removed: Notify::new(),
            namespaces: Mutex::new(HashMap::new()),
        };
        inner.nft.apply(rules::base_ruleset(&inner.policy())).await?;
        // Every leased sandbox gets its set elements (again): a no-op for
        // running sandboxes, and how sandboxes attached by the first version,
        // which kept per-sandbox rules in chains the base ruleset just
        // removed, keep their network. Dead ones are left to sweep, as before.
        let restored: Vec<_> = inner
            .leases
            .sandbox_ids()
            .into_iter()
            .filter_map(|id| {
                let address = inner.leases.get(&id)?;
                Some(inner.sandbox_elements(&id, address))
            })
            .flatten()
            .collect();
        inner.elements.add(&restored)?;
        Ok(NetManager { inner: Arc::new(inner) })
    }

    pub fn config(&self) -> &NetConfig {
        &self.inner.config
    }

    /// The bridge's address, the sandboxes' default gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        self.inner.gateway
    }

    /// Sets up networking inside the network namespace at `netns` (for example
    /// `/proc/<pid>/ns/net`): loopback always; for [`Egress::Internet`] also the
    /// veth pair, the leased address, the default route and the sandbox's nft
    /// set elements. Attaching an attached sandbox again replaces its veth and
    /// set elements and keeps its address; attaching a sandbox whose detach still runs in
    /// the background first waits for it.
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
                self.inner.removal_finished(Some(sandbox_id)).await;
                let inner = &self.inner;
                if inner.leases.get(sandbox_id).is_some() {
                    inner
                        .remove(sandbox_id)
                        .await
                        .map_err(|error| AttachNetworkError::Stale(Box::new(error)))?;
                }
                let address = inner.leases.acquire(sandbox_id)?;
                if let Some(reference) = NamespaceRef::of(netns, &namespace) {
                    inner.namespaces().insert(sandbox_id.to_owned(), reference);
                }
                match inner.attach_internet(sandbox_id, namespace, address).await {
                    Ok(net) => Ok(net),
                    Err(error) => {
                        if let Err(cleanup) = inner.remove(sandbox_id).await {
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

    /// Starts removing the sandbox's veth, nft set elements, neighbour entry
    /// and lease in the background and returns at once; [`NetManager::settle`]
    /// waits for it. Idempotent: detaching a sandbox that has no network (or
    /// no longer has one, or is being detached) succeeds.
    ///
    /// The sandbox's address stays leased until everything else is gone, so it
    /// is never handed to another sandbox early; a removal that fails (it is
    /// logged) or is cut short by a crash leaves the lease, and with it the
    /// sandbox's remains, to [`NetManager::sweep`] or to the next attach of
    /// the same id. The sandbox's `eth0` also stays in its namespace until the
    /// removal finished, so a namespace that outlives its sandbox can be
    /// attached under another id only after [`NetManager::settle`].
    ///
    /// When the namespace the sandbox was attached in is gone (its path, e.g.
    /// `/proc/<pid>/ns/net`, no longer leads to it), the removal leaves the
    /// veth pair to the kernel, which deletes it with the namespace, and only
    /// waits for it to disappear (deleting it itself after 2 s).
    pub async fn detach(&self, sandbox_id: &str) -> Result<(), DetachNetworkError> {
        validate_sandbox_id(sandbox_id)?;
        // Invariant: a sandbox's veth and set elements exist only while its lease does
        // (attach leases first, removal releases last), so no lease, nothing to do.
        if self.inner.leases.get(sandbox_id).is_none() {
            return Ok(());
        }
        if !self.inner.removing().insert(sandbox_id.to_owned()) {
            return Ok(());
        }
        let inner = Arc::clone(&self.inner);
        let sandbox_id = sandbox_id.to_owned();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let result = inner.remove(&sandbox_id).await;
            inner.removing().remove(&sandbox_id);
            inner.removed.notify_waiters();
            match result {
                Ok(()) => tracing::debug!(
                    sandbox_id,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "sandbox network removed"
                ),
                Err(error) => tracing::warn!(
                    sandbox_id,
                    error = &error as &dyn std::error::Error,
                    "cannot remove a detached sandbox's network; sweep will"
                ),
            }
        });
        Ok(())
    }

    /// Waits until every background removal started by [`NetManager::detach`]
    /// before this call has finished.
    pub async fn settle(&self) {
        self.inner.removal_finished(None).await;
    }

    /// Removes veths, nft set elements and leases of every sandbox not in
    /// `live`, for example what a crashed dataplane left behind. Waits for
    /// background removals first.
    pub async fn sweep(&self, live: &HashSet<String>) -> Result<NetSweepReport, NetSweepError> {
        self.settle().await;
        self.inner.sweep(live).await
    }

    /// Makes `addresses` the set of single addresses named `tag` that no sandbox
    /// may reach, on top of [`NetConfig::blocked_destinations`]: the server's
    /// and the other nodes' addresses, which may be public. Several tags keep
    /// apart sets from different sources; an address stays blocked while any
    /// tag names it. Set elements only, in one netlink transaction each way.
    pub fn block_addresses(
        &self,
        tag: &str,
        addresses: &[Ipv4Addr],
    ) -> Result<(), SetElementError> {
        let inner = &self.inner;
        let mut blocked = inner.blocked.lock().unwrap_or_else(|poison| poison.into_inner());
        let before: HashSet<Ipv4Addr> = blocked.values().flatten().copied().collect();
        let wanted: HashSet<Ipv4Addr> = addresses.iter().copied().collect();
        if blocked.get(tag) == Some(&wanted) {
            return Ok(());
        }
        blocked.insert(tag.to_owned(), wanted);
        let after: HashSet<Ipv4Addr> = blocked.values().flatten().copied().collect();
        let element = |address: &Ipv4Addr| SetElement {
            family: nfnl::Family::Inet,
            table: inner.config.nft_table.clone(),
            set: rules::BLOCKED_SET.to_owned(),
            key: address.octets().to_vec(),
            comment: "blocked".to_owned(),
        };
        let added: Vec<SetElement> = after.difference(&before).map(element).collect();
        let removed: Vec<SetElement> = before.difference(&after).map(element).collect();
        if !added.is_empty() {
            inner.elements.add(&added)?;
        }
        if !removed.is_empty() {
            inner.elements.delete_each(&removed)?;
        }
        Ok(())
    }

    /// Removes every sandbox network, the nft tables and the bridge. For tests
    /// and uninstall; sandboxes lose their network.
    pub async fn teardown(&self) -> Result<(), NetTeardownError> {
        self.sweep(&HashSet::new()).await?;
        let inner = &self.inner;
        inner.nft.apply(rules::delete_tables(&inner.config.nft_table)).await?;
        inner.netlink.delete_link(&inner.config.bridge).await?;
        Ok(())
    }
}

impl Inner {
    fn policy(&self) -> Policy<'_> {
        Policy {
            table: &self.config.nft_table,
            bridge: &self.config.bridge,
            subnet: self.config.subnet,
            blocked_destinations: &self.config.blocked_destinations,
        }
    }

    fn namespaces(&self) -> MutexGuard<'_, HashMap<String, NamespaceRef>> {
        // Every update is a single insert or remove, so a poisoned map is intact.
        self.namespaces.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    fn removing(&self) -> MutexGuard<'_, HashSet<String>> {
        // Every update is a single insert or remove, so a poisoned set is intact.
        self.removing.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// Waits until no background removal of `sandbox_id` (of any sandbox for
    /// `None`) is running.
    async fn removal_finished(&self, sandbox_id: Option<&str>) {
        loop {
            let notified = self.removed.notified();
            tokio::pin!(notified);
            // Registered before the check, so a removal finishing in between
            // still wakes us.
            notified.as_mut().enable();
            let busy = match sandbox_id {
                Some(id) => self.removing().contains(id),
                None => !self.removing().is_empty(),
            };
            if !busy {
                return;
            }
            notified.await;
        }
    }

    async fn attach_internet(
        &self,
        sandbox_id: &str,
        namespace: File,
        address: Ipv4Addr,
    ) -> Result<SandboxNet, AttachNetworkError> {
        let veth = veth_name(sandbox_id);
        // The elements match the veth by name and address, so they can go in
        // before the veth exists; one netlink batch, tens of microseconds.
        self.elements.add(&self.sandbox_elements(sandbox_id, address))?;
        self.netlink.create_sandbox_veth(&veth, self.bridge_index, &namespace, address).await?;
        let interface = SandboxInterface {
            address,
            prefix_len: self.config.subnet.prefix_len(),
            gateway: self.gateway,
        };
        // Both ends exist now; the host end and the inside are configured at
        // the same time. The host end comes up only as an isolated port, and
        // the link carries nothing before both ends are up.
        let (port, inside) = tokio::join!(
            self.netlink.set_up_sandbox_port(&veth, self.bridge_index, address),
            configure_namespace(namespace, Some(interface)),
        );
        port?;
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

    async fn remove(&self, sandbox_id: &str) -> Result<(), DetachNetworkError> {
        let veth = veth_name(sandbox_id);
        let namespace = self.namespaces().remove(sandbox_id);
        let namespace_gone = namespace.is_some_and(|namespace| !namespace.is_reachable());
        let link = async {
            // When the namespace is gone, the kernel deletes the veth pair as it
            // cleans the namespace up, together with every other namespace that
            // died meanwhile; deleting it here as well would only compete with
            // that for the rtnl lock, which sandbox creation needs too.
            if namespace_gone && self.netlink.wait_until_gone(&veth, NAMESPACE_EXIT_TIMEOUT).await?
            {
                return Ok(false);
            }
            self.netlink.delete_link(&veth).await
        };
        // Elements first: once they are gone, nothing from the sandbox's port
        // passes the bridge, whatever the veth's removal still waits for.
        if let Some(address) = self.leases.get(sandbox_id) {
            let elements = self.sandbox_elements(sandbox_id, address);
            match self.elements.delete(&elements) {
                // One was missing (someone changed the sets underneath), so the
                // batch deleted nothing: delete what is there one by one.
                Err(error) if error.is_not_found() => self.elements.delete_each(&elements)?,
                result => result?,
            }
        }
        link.await?;
        if let Some(address) = self.leases.get(sandbox_id) {
            self.netlink.delete_neighbour(self.bridge_index, address).await?;
        }
        self.leases.release(sandbox_id)?;
        Ok(())
    }

    fn sandbox_elements(&self, sandbox_id: &str, address: Ipv4Addr) -> [SetElement; 2] {
        rules::sandbox_elements(&self.config.nft_table, sandbox_id, &veth_name(sandbox_id), address)
    }

    async fn sweep(&self, live: &HashSet<String>) -> Result<NetSweepReport, NetSweepError> {
        let mut report = NetSweepReport::default();
        let listing = self.nft.list().await?;
        let stale: Vec<_> = rules::sandbox_elements_in_listing(&listing, &self.config.nft_table)
            .into_iter()
            .filter(|(sandbox_id, _)| !live.contains(sandbox_id))
            .map(|(_, element)| element)
            .collect();
        report.rules_removed = stale.len();
        self.namespaces().retain(|id, _| live.contains(id));
        self.elements.delete_each(&stale)?;
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
