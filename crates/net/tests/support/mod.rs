//! Test fixtures: network namespaces, an "outside" network, TCP probes.
//!
//! Every privileged test runs in hutch-testkit's `in_private_netns`, which
//! re-executes the test binary for itself under `unshare --net`, so the
//! bridge, the nft tables, the veths and the sysctl writes live in a network namespace that disappears with the child process;
//! the host's network is never touched. Sandboxes and the outside world are
//! further namespaces created by the child, held open by file descriptors.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::TryStreamExt;
use hutch_net::{NetConfig, NetManager};
use nix::sched::CloneFlags;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::{LinkUnspec, LinkVeth, RouteMessageBuilder};

pub use hutch_testkit::in_private_netns;

/// The test host's address towards the outside network.
pub const HOST_UPLINK: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// An "internet" server's address (TEST-NET-1).
pub const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// The cloud metadata address, served from the outside namespace.
pub const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// A network namespace held open by a file descriptor.
#[derive(Debug)]
pub struct Netns {
    file: File,
}

impl Netns {
    pub fn new() -> Result<Netns> {
        let file = std::thread::spawn(|| -> Result<File> {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
            File::open("/proc/thread-self/ns/net").context("open own netns")
        })
        .join()
        .expect("netns thread")?;
        Ok(Netns { file })
    }

    /// A path that opens this namespace, as the driver would pass /proc/<pid>/ns/net.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Runs `f` on a thread inside this namespace.
    pub fn run<T, F>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let file = self.file.try_clone().expect("dup netns fd");
        std::thread::spawn(move || {
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("thread in netns")
    }

    /// Runs the future `f` on a current-thread runtime inside this namespace.
    pub fn block_on<T, F, Fut>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
    {
        self.run(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(f())
        })
    }
}

async fn handle() -> Result<rtnetlink::Handle> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(connection);
    Ok(handle)
}

async fn index_of(handle: &rtnetlink::Handle, name: &str) -> Result<u32> {
    let link = handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await?
        .with_context(|| format!("no link {name}"))?;
    Ok(link.header.index)
}

async fn set_up(handle: &rtnetlink::Handle, index: u32) -> Result<()> {
    handle.link().change(LinkUnspec::new_with_index(index).up().build()).execute().await?;
    Ok(())
}

/// Links of the current thread's namespace: (name, is up).
pub async fn links_here() -> Result<BTreeSet<(String, bool)>> {
    let handle = handle().await?;
    let mut links = handle.link().get().execute();
    let mut found = BTreeSet::new();
    while let Some(link) = links.try_next().await? {
        let up = link.header.flags.contains(LinkFlags::Up);
        for attribute in link.attributes {
            if let LinkAttribute::IfName(name) = attribute {
                found.insert((name, up));
            }
        }
    }
    Ok(found)
}

pub fn links_in(netns: &Netns) -> Result<BTreeSet<(String, bool)>> {
    netns.block_on(links_here)
}

/// Adds an extra address to `eth0` inside `netns` (to try spoofing).
pub fn add_address_in(netns: &Netns, address: Ipv4Addr, prefix_len: u8) -> Result<()> {
    netns.block_on(move || async move {
        let handle = handle().await?;
        let eth0 = index_of(&handle, "eth0").await?;
        handle.address().add(eth0, IpAddr::V4(address), prefix_len).execute().await?;
        Ok(())
    })
}

/// The "internet": a namespace behind the uplink veth `up0`, serving
/// [`OUTSIDE`] and [`METADATA`]. The test host routes to both.
pub async fn outside_network() -> Result<Netns> {
    let outside = Netns::new()?;
    let host = handle().await?;
    let peer = rtnetlink::LinkMessageBuilder::<LinkUnspec>::new()
        .name("eth0")
        .setns_by_fd(outside.file().as_raw_fd())
        .build();
    let veth = rtnetlink::LinkMessageBuilder::<LinkVeth>::new_with_info_kind(
        rtnetlink::packet_route::link::InfoKind::Veth,
    )
    .name("up0".to_owned())
    .set_info_data(rtnetlink::packet_route::link::InfoData::Veth(
        rtnetlink::packet_route::link::InfoVeth::Peer(peer),
    ))
    .build();
    host.link().add(veth).execute().await?;
    let up0 = index_of(&host, "up0").await?;
    host.address().add(up0, IpAddr::V4(HOST_UPLINK), 24).execute().await?;
    set_up(&host, up0).await?;
    outside.block_on(|| async {
        let handle = handle().await?;
        let lo = index_of(&handle, "lo").await?;
        set_up(&handle, lo).await?;
        let eth0 = index_of(&handle, "eth0").await?;
        handle.address().add(eth0, IpAddr::V4(OUTSIDE), 24).execute().await?;
        handle.address().add(eth0, IpAddr::V4(METADATA), 16).execute().await?;
        set_up(&handle, eth0).await
    })?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(METADATA, 32)
        .gateway(OUTSIDE)
        .build();
    host.route().add(route).execute().await?;
    Ok(outside)
}

/// A manager with default settings and a fresh lease directory.
pub async fn manager(state: &tempfile::TempDir) -> Result<NetManager> {
    Ok(NetManager::new(NetConfig::new(state.path().join("leases"))).await?)
}

/// Starts a TCP server at `address` (in `netns`, or in the test host's
/// namespace) that answers every connection with the peer's IP address.
pub fn serve_peer_address(netns: Option<&Netns>, address: SocketAddr) -> Result<SocketAddr> {
    let serve = move || -> Result<SocketAddr> {
        let listener = TcpListener::bind(address).with_context(|| format!("bind {address}"))?;
        let local = listener.local_addr()?;
        // The server lives as long as the test process.
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                if let Ok(peer) = stream.peer_addr() {
                    let _ = stream.write_all(peer.ip().to_string().as_bytes());
                }
            }
        });
        Ok(local)
    };
    match netns {
        Some(netns) => netns.run(serve),
        None => serve(),
    }
}

/// Connects to `address` (from `netns`, or from the test host) and returns
/// what the server said: the source address it saw. Retries until a deadline,
/// because a link that was just brought up may drop packets until the kernel
/// has activated its queue (linkwatch runs from a workqueue).
pub fn probe(netns: Option<&Netns>, address: SocketAddr) -> Result<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match probe_once(netns, address) {
            Ok(answer) => return Ok(answer),
            Err(error) if std::time::Instant::now() > deadline => return Err(error),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// One connection attempt with a one-second timeout. Negative checks use this
/// after a positive check over the same link proved the link works.
pub fn probe_once(netns: Option<&Netns>, address: SocketAddr) -> Result<String> {
    let connect = move || -> Result<String> {
        let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(1))
            .with_context(|| format!("connect {address}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        if answer.is_empty() {
            bail!("{address} answered nothing");
        }
        Ok(answer)
    };
    match netns {
        Some(netns) => netns.run(connect),
        None => connect(),
    }
}

/// Like [`probe_once`], from `netns` with the given source address.
pub fn probe_from(netns: &Netns, source: Ipv4Addr, address: SocketAddr) -> Result<String> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket, sockopt,
    };
    let SocketAddr::V4(target) = address else {
        bail!("ipv4 only");
    };
    netns.run(move || -> Result<String> {
        let socket = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
        // Linux bounds a blocking connect() by the send timeout.
        setsockopt(&socket, sockopt::SendTimeout, &nix::sys::time::TimeVal::new(1, 0))?;
        bind(socket.as_raw_fd(), &SockaddrIn::from(std::net::SocketAddrV4::new(source, 0)))?;
        connect(socket.as_raw_fd(), &SockaddrIn::from(target))
            .with_context(|| format!("connect {address} from {source}"))?;
        let mut stream = TcpStream::from(socket);
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    })
}

/// The current namespace's whole ruleset, as `nft -j` lists it.
fn nft_ruleset() -> Result<serde_json::Value> {
    let output = Command::new("nft").args(["-j", "list", "ruleset"]).output()?;
    if !output.status.success() {
        bail!("nft list ruleset: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// Comments of all nft rules and set elements in the current namespace that
/// name a sandbox: what the manager keeps per sandbox.
pub fn sandbox_nft_comments() -> Result<Vec<String>> {
    Ok(nft_ruleset()?["nftables"]
        .as_array()
        .map(|objects| {
            objects
                .iter()
                .flat_map(|o| {
                    let rule = o.get("rule").and_then(|rule| rule.get("comment"));
                    let elements = o
                        .get("set")
                        .and_then(|set| set.get("elem")?.as_array())
                        .into_iter()
                        .flatten()
                        .filter_map(|element| element.get("elem")?.get("comment"));
                    rule.into_iter().chain(elements).filter_map(|c| c.as_str())
                })
                .filter(|c| c.starts_with("hutch:"))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default())
}

/// Number of nft rules in the current namespace.
pub fn nft_rule_count() -> Result<usize> {
    Ok(nft_ruleset()?["nftables"]
        .as_array()
        .map(|objects| objects.iter().filter(|o| o.get("rule").is_some()).count())
        .unwrap_or_default())
}

/// Runs `nft` with `args`, failing unless it succeeds.
pub fn nft(args: &[&str]) -> Result<()> {
    let output = Command::new("nft").args(args).output()?;
    if !output.status.success() {
        bail!("nft {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}

/// Tables in the current namespace, as `family name`.
pub fn nft_tables() -> Result<Vec<String>> {
    let output = Command::new("nft").args(["-j", "list", "tables"]).output()?;
    let listing: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    Ok(listing["nftables"]
        .as_array()
        .map(|objects| {
            objects
                .iter()
                .filter_map(|o| {
                    let t = o.get("table")?;
                    Some(format!("{} {}", t.get("family")?.as_str()?, t.get("name")?.as_str()?))
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Names of the leases in the manager's state directory.
pub fn lease_files(state: &tempfile::TempDir) -> Result<Vec<String>> {
    let dir = state.path().join("leases");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Number of open file descriptors of this process.
pub fn open_fds() -> Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count())
}

/// Polls `condition` until it holds or two seconds have passed.
pub async fn eventually(mut condition: impl FnMut() -> Result<bool>) -> Result<bool> {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        if condition()? {
            return Ok(true);
        }
        if std::time::Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sets `net.bridge.bridge-nf-call-iptables` of the test's own namespace, if
/// br_netfilter is loaded (the setting is per network namespace).
pub fn set_bridge_nf_call_iptables(value: &str) -> Result<()> {
    let path = "/proc/sys/net/bridge/bridge-nf-call-iptables";
    match std::fs::write(path, value) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error).context(path),
    }
}

/// IPv4 addresses with a permanent neighbour entry in the current namespace.
pub async fn permanent_neighbours_here() -> Result<BTreeSet<Ipv4Addr>> {
    use rtnetlink::packet_route::neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourState,
    };
    let handle = handle().await?;
    let mut neighbours = handle.neighbours().get().execute();
    let mut found = BTreeSet::new();
    while let Some(neighbour) = neighbours.try_next().await? {
        if neighbour.header.state != NeighbourState::Permanent {
            continue;
        }
        for attribute in neighbour.attributes {
            if let NeighbourAttribute::Destination(NeighbourAddress::Inet(address)) = attribute {
                found.insert(address);
            }
        }
    }
    Ok(found)
}
