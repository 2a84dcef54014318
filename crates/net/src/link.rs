//! The netlink seam: every rtnetlink call of the crate goes through here.
//!
//! Host-side operations use one connection opened in the manager's network
//! namespace. Configuration inside a sandbox's namespace runs on a dedicated
//! thread that `setns()`s into it, because a netlink socket (and a /proc/sys/net
//! file) acts on the namespace of the task that opened it.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use futures_util::TryStreamExt;
use nix::sched::CloneFlags;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, State};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth,
    RouteMessageBuilder,
};
use tokio::task::JoinHandle;

use crate::naming::{SANDBOX_IFNAME, mac_for};

/// Every network namespace's loopback device has this index.
const LOOPBACK_IFINDEX: u32 = 1;

/// A failed netlink request, with what it was doing and to which object.
#[derive(Debug, thiserror::Error)]
#[error("netlink request to {operation} {object:?} failed")]
pub struct NetlinkError {
    pub operation: &'static str,
    pub object: String,
    #[source]
    pub source: rtnetlink::Error,
}

/// The errno carried by a netlink error acknowledgement, if any.
fn errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => message.to_io().raw_os_error(),
        _ => None,
    }
}

fn context(operation: &'static str, object: &str) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let object = object.to_owned();
    move |source| NetlinkError { operation, object, source }
}

/// A netlink connection in the manager's own network namespace.
#[derive(Debug)]
pub(crate) struct HostNetlink {
    handle: Handle,
    connection: JoinHandle<()>,
}

impl Drop for HostNetlink {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl HostNetlink {
    /// Opens the connection; its driver task runs on the current tokio runtime.
    pub(crate) fn open() -> io::Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        let connection = tokio::spawn(connection);
        Ok(HostNetlink { handle, connection })
    }

    pub(crate) async fn link_index(&self, name: &str) -> Result<Option<u32>, NetlinkError> {
        let mut links = self.handle.link().get().match_name(name.to_owned()).execute();
        match links.try_next().await {
            Ok(link) => Ok(link.map(|link| link.header.index)),
            Err(error) if errno(&error) == Some(libc::ENODEV) => Ok(None),
            Err(error) => Err(context("look up link", name)(error)),
        }
    }

    /// Creates the bridge if it is missing, gives it the gateway address and
    /// brings it up; returns its index.
    pub(crate) async fn ensure_bridge(
        &self,
        name: &str,
        gateway: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<u32, NetlinkError> {
        if self.link_index(name).await?.is_none() {
            match self.handle.link().add(LinkBridge::new(name).build()).execute().await {
                Ok(()) => {}
                // Another manager created it between our look-up and our add.
                Err(error) if errno(&error) == Some(libc::EEXIST) => {}
                Err(error) => return Err(context("create bridge", name)(error)),
            }
        }
        let bridge = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute()
            .try_next()
            .await
            .map_err(context("look up link", name))?
            .ok_or_else(|| context("find created bridge", name)(rtnetlink::Error::RequestFailed))?;
        let index = bridge.header.index;
        let mac = mac_for(gateway);
        let mac_is_set = bridge
            .attributes
            .iter()
            .any(|attribute| matches!(attribute, LinkAttribute::Address(current) if current[..] == mac[..]));
        self.handle
            .address()
            .add(index, IpAddr::V4(gateway), prefix_len)
            .replace()
            .execute()
            .await
            .map_err(context("add gateway address to", name))?;
        // A bridge without a MAC of its own takes the lowest of its ports' and
        // changes it as sandboxes come and go, which would leave sandboxes with
        // a stale neighbour entry for their gateway. Setting a MAC flushes the
        // bridge's neighbour entries, running sandboxes' included, so it is
        // only set when it differs (on creation).
        let mut change = LinkUnspec::new_with_index(index).up();
        if !mac_is_set {
            change = change.address(mac.to_vec());
        }
        self.handle
            .link()
            .change(change.build())
            .execute()
            .await
            .map_err(context("set the MAC of and bring up", name))?;
        Ok(index)
    }

    /// Creates the veth pair `host_name` (a port of `bridge_index`, down) and
    /// `eth0` directly inside the namespace `netns`, with the MAC that belongs
    /// to `address`. A host end of that name left by a crashed earlier attempt
    /// (it belongs to the same sandbox id by its name) is replaced.
    pub(crate) async fn create_sandbox_veth(
        &self,
        host_name: &str,
        bridge_index: u32,
        netns: &File,
        address: Ipv4Addr,
    ) -> Result<(), NetlinkError> {
        let veth = || {
            let peer = LinkMessageBuilder::<LinkUnspec>::new()
                .name(SANDBOX_IFNAME)
                .address(mac_for(address).to_vec())
                .setns_by_fd(netns.as_raw_fd())
                .build();
            LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
                .name(host_name.to_owned())
                .controller(bridge_index)
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                .build()
        };
        // Trying first saves a look-up on every attach; the stale case is rare.
        match self.handle.link().add(veth()).execute().await {
            Err(error)
                if errno(&error) == Some(libc::EEXIST) && self.delete_link(host_name).await? =>
            {
                self.handle.link().add(veth()).execute().await
            }
            result => result,
        }
        .map_err(context("create veth", host_name))
    }

    /// Makes the host end `host_name` of a sandbox's veth an isolated, non-
    /// flooding port of `bridge_index`, brings it up, and tells the bridge and
    /// the host where `address` is.
    pub(crate) async fn set_up_sandbox_port(
        &self,
        host_name: &str,
        bridge_index: u32,
        address: Ipv4Addr,
    ) -> Result<(), NetlinkError> {
        // Isolated ports only talk to the bridge itself (the host), never to each
        // other: sandbox-to-sandbox frames are dropped before any IP rule runs.
        // The kernel applies the port data before the flags, so the port is
        // isolated by the time it is up.
        // No flooding towards the port either: the host reaches the sandbox
        // through the static entries below, so frames for other sandboxes or
        // for unknown MACs never reach a sandbox that listens promiscuously.
        let port = LinkBridgePort::new(0)
            .name(host_name.to_owned())
            .isolated(true)
            .flood(false)
            .mcast_flood(false)
            .bcast_flood(false)
            .up()
            .build();
        let mac = mac_for(address);
        let port = async {
            self.handle
                .link()
                .set_port(port)
                .execute()
                .await
                .map_err(context("isolate and bring up bridge port", host_name))?;
            let index = self.link_index(host_name).await?.ok_or_else(|| {
                context("find created veth", host_name)(rtnetlink::Error::RequestFailed)
            })?;
            // A static forwarding entry: the bridge knows the sandbox's port
            // before the sandbox has sent anything.
            self.handle
                .neighbours()
                .add_bridge(index, &mac)
                .flags(NeighbourFlags::Controller)
                .state(NeighbourState::Noarp)
                .replace()
                .execute()
                .await
                .map_err(context("add bridge forwarding entry for", host_name))
        };
        // A permanent neighbour entry: the host never has to ARP for the
        // sandbox, so no lost ARP request can delay its first connection by
        // the one-second ARP retry. Independent of the port, so it is sent
        // without waiting for the port's answers.
        let neighbour = async {
            self.handle
                .neighbours()
                .add(bridge_index, IpAddr::V4(address))
                .link_layer_address(&mac)
                .replace()
                .execute()
                .await
                .map_err(context("add neighbour entry for", &address.to_string()))
        };
        let (port, neighbour) = tokio::join!(port, neighbour);
        port.and(neighbour)
    }

    /// Removes the host's neighbour entry for a sandbox address; absent is fine.
    pub(crate) async fn delete_neighbour(
        &self,
        bridge_index: u32,
        address: Ipv4Addr,
    ) -> Result<(), NetlinkError> {
        let mut message = NeighbourMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.ifindex = bridge_index;
        message.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(address)));
        match self.handle.neighbours().del(message).execute().await {
            Ok(()) => Ok(()),
            Err(error) if matches!(errno(&error), Some(libc::ENOENT | libc::ENODEV)) => Ok(()),
            Err(error) => Err(context("delete neighbour entry for", &address.to_string())(error)),
        }
    }

    /// Waits until the kernel reports `name` operationally up, polling until
    /// `timeout`; `false` if it did not come up in time.
    ///
    /// A veth's carrier comes on when both ends are up, but the kernel handles
    /// the change (operstate, and the bridge then enabling the port) later, on
    /// a workqueue. Until then the bridge floods nothing to the port, so the
    /// host's first ARP request for the sandbox would be lost and retried only
    /// a second later.
    pub(crate) async fn wait_until_up(
        &self,
        name: &str,
        timeout: std::time::Duration,
    ) -> Result<bool, NetlinkError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut links = self.handle.link().get().match_name(name.to_owned()).execute();
            let link = links.try_next().await.map_err(context("look up link", name))?;
            let up = link.is_some_and(|link| {
                link.attributes
                    .iter()
                    .any(|attribute| matches!(attribute, LinkAttribute::OperState(State::Up)))
            });
            if up {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// Waits until no link is called `name`, polling until `timeout`; `false`
    /// if there still is one.
    pub(crate) async fn wait_until_gone(
        &self,
        name: &str,
        timeout: std::time::Duration,
    ) -> Result<bool, NetlinkError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.link_index(name).await?.is_none() {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    /// Deletes a link by name; `false` when there was none.
    pub(crate) async fn delete_link(&self, name: &str) -> Result<bool, NetlinkError> {
        let Some(index) = self.link_index(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(true),
            // Gone in between, e.g. because the sandbox's namespace died.
            Err(error) if errno(&error) == Some(libc::ENODEV) => Ok(false),
            Err(error) => Err(context("delete link", name)(error)),
        }
    }

    /// Names of all links starting with `prefix`.
    pub(crate) async fn link_names_with_prefix(
        &self,
        prefix: &str,
    ) -> Result<Vec<String>, NetlinkError> {
        let mut links = self.handle.link().get().execute();
        let mut names = Vec::new();
        while let Some(link) = links.try_next().await.map_err(context("list links", prefix))? {
            names.extend(link.attributes.into_iter().filter_map(|attribute| match attribute {
                LinkAttribute::IfName(name) if name.starts_with(prefix) => Some(name),
                _ => None,
            }));
        }
        Ok(names)
    }
}

/// How the sandbox's `eth0` is set up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SandboxInterface {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
}

/// Why the inside of a sandbox's network namespace could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum ConfigureNamespaceError {
    #[error("cannot spawn the thread that enters the sandbox's network namespace")]
    SpawnThread(#[source] io::Error),
    #[error("cannot enter the sandbox's network namespace")]
    Setns(#[source] nix::Error),
    #[error("cannot start a runtime inside the sandbox's network namespace")]
    Runtime(#[source] io::Error),
    #[error("cannot open a netlink socket inside the sandbox's network namespace")]
    Connect(#[source] io::Error),
    #[error("link {name:?} is missing inside the sandbox's network namespace")]
    MissingLink { name: &'static str },
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("cannot write sysctl {path}")]
    Sysctl {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("the thread configuring the sandbox's network namespace died")]
    ThreadLost,
}

/// Brings `lo` up inside `netns` and, for a networked sandbox, configures `eth0`:
/// address, up, default route via the gateway, and IPv6 off (IPv6 is not
/// routed for sandboxes, and the bridge drops it anyway).
pub(crate) async fn configure_namespace(
    netns: File,
    interface: Option<SandboxInterface>,
) -> Result<(), ConfigureNamespaceError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("hutch-net-ns".to_owned())
        .spawn(move || {
            // This thread is never returned to a pool: it enters the sandbox's
            // namespace, does its work and exits.
            let result = nix::sched::setns(&netns, CloneFlags::CLONE_NEWNET)
                .map_err(ConfigureNamespaceError::Setns)
                .and_then(|()| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_io()
                        .build()
                        .map_err(ConfigureNamespaceError::Runtime)
                })
                .and_then(|runtime| runtime.block_on(configure_here(interface)));
            let _ = tx.send(result);
        })
        .map_err(ConfigureNamespaceError::SpawnThread)?;
    rx.await.map_err(|_| ConfigureNamespaceError::ThreadLost)?
}

async fn configure_here(
    interface: Option<SandboxInterface>,
) -> Result<(), ConfigureNamespaceError> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(ConfigureNamespaceError::Connect)?;
    let connection = tokio::spawn(connection);
    let result = configure_links(&handle, interface).await;
    connection.abort();
    result?;
    if interface.is_some() {
        let path = format!("/proc/sys/net/ipv6/conf/{SANDBOX_IFNAME}/disable_ipv6");
        match std::fs::write(&path, "1") {
            Ok(()) => {}
            // A kernel without IPv6 has nothing to disable.
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(ConfigureNamespaceError::Sysctl { path, source }),
        }
    }
    Ok(())
}

async fn link_index(handle: &Handle, name: &'static str) -> Result<u32, ConfigureNamespaceError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        Ok(None) => Err(ConfigureNamespaceError::MissingLink { name }),
        Err(error) if errno(&error) == Some(libc::ENODEV) => {
            Err(ConfigureNamespaceError::MissingLink { name })
        }
        Err(error) => Err(context("look up link", name)(error).into()),
    }
}

async fn configure_links(
    handle: &Handle,
    interface: Option<SandboxInterface>,
) -> Result<(), ConfigureNamespaceError> {
    // Requests that do not depend on each other's answers are sent together:
    // the kernel still handles them in order, but no round trip waits for
    // another.
    let lo_up = async {
        handle
            .link()
            .change(LinkUnspec::new_with_index(LOOPBACK_IFINDEX).up().build())
            .execute()
            .await
            .map_err(context("bring up", "lo"))
    };
    let Some(interface) = interface else {
        return Ok(lo_up.await?);
    };
    let eth0_up = async {
        let eth0 = link_index(handle, SANDBOX_IFNAME).await?;
        let address = handle
            .address()
            .add(eth0, IpAddr::V4(interface.address), interface.prefix_len)
            .replace()
            .execute();
        // The gateway's MAC is known (the bridge's, derived from its address),
        // so the sandbox's first packet needs no ARP round trip either.
        let neighbour = handle
            .neighbours()
            .add(eth0, IpAddr::V4(interface.gateway))
            .link_layer_address(&mac_for(interface.gateway))
            .replace()
            .execute();
        let (address, neighbour) = tokio::join!(address, neighbour);
        address.map_err(context("add address to", SANDBOX_IFNAME))?;
        neighbour.map_err(context("add neighbour entry for", &interface.gateway.to_string()))?;
        handle
            .link()
            .change(LinkUnspec::new_with_index(eth0).up().build())
            .execute()
            .await
            .map_err(context("bring up", SANDBOX_IFNAME))?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(interface.gateway)
            .output_interface(eth0)
            .build();
        handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(context("add default route via", &interface.gateway.to_string()))?;
        Ok::<_, ConfigureNamespaceError>(())
    };
    let (lo, eth0) = tokio::join!(lo_up, eth0_up);
    lo?;
    eth0
}
