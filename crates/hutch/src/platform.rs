//! `hutch up`, `hutch server` and `hutch dataplane`: the platform's own
//! processes. The CLI only parses into these argument structs and calls the
//! functions here.
//!
//! `hutch up` is the same server and dataplane that run apart, in one
//! process: the dataplane still registers with the server over gRPC on
//! loopback, so the single-machine platform exercises exactly the code paths
//! of a cluster.

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Args;
use hutch_dataplane::{Dataplane, DataplaneConfig};
use hutch_server::{Server, ServerConfig};
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;

/// `hutch up`: server, dataplane and proxy in one process.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where the database, keys, images and sandbox state live
    /// [default: /var/lib/hutch as root, else ~/.local/share/hutch].
    #[arg(long, env = "HUTCH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The REST API's address.
    #[arg(long, default_value = "127.0.0.1:8900")]
    pub listen: SocketAddr,
    /// The gRPC address dataplanes connect to.
    #[arg(long, default_value = "127.0.0.1:8901")]
    pub grpc_listen: SocketAddr,
    /// The proxy's address (sandbox ports and sandboxd).
    #[arg(long, default_value = "127.0.0.1:8095")]
    pub proxy_listen: SocketAddr,
    /// Domain for host-based proxy routing (`{port}-{id}.{domain}`).
    #[arg(long)]
    pub proxy_domain: Option<String>,
    /// CPUs offered to sandboxes [default: host cores × 64].
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Memory offered to sandboxes, in MiB [default: host memory × 4].
    #[arg(long)]
    pub memory: Option<u64>,
    /// Disk offered to sandboxes, in MiB [default: free space of the data dir × 8].
    #[arg(long)]
    pub disk: Option<u64>,
    /// Give sandboxes egress `none` only; nftables is then not needed.
    #[arg(long)]
    pub no_network: bool,
    /// A static sandboxd to use instead of the one built into hutch.
    #[arg(long, env = "HUTCH_SANDBOXD", hide = true)]
    pub sandboxd: Option<PathBuf>,
}

/// `hutch server`: the control plane alone.
#[derive(Debug, Args)]
pub struct ServerArgs {
    #[arg(long, env = "HUTCH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:8900")]
    pub listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:8901")]
    pub grpc_listen: SocketAddr,
}

/// `hutch dataplane`: one node agent and its proxy. Every configuration key
/// can come from the YAML file or from `HUTCH_<KEY>` in the environment
/// (the environment wins).
#[derive(Debug, Args)]
pub struct DataplaneArgs {
    /// A YAML file with the dataplane's configuration.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The proxy's address; the server must be able to reach it.
    #[arg(long, env = "HUTCH_PROXY_LISTEN", default_value = "0.0.0.0:8095")]
    pub proxy_listen: SocketAddr,
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    check_root("hutch up")?;
    let network = !args.no_network;
    if network {
        check_nft()?;
    }
    let data_dir = args.data_dir.unwrap_or_else(default_data_dir);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create the data dir {}", data_dir.display()))?;
    let sandboxd = match args.sandboxd {
        Some(path) => path,
        None => install_sandboxd(&data_dir)?,
    };

    let server = Server::open(ServerConfig::new(&data_dir))
        .await
        .context("cannot open the server's store")?;
    let api = bind(args.listen, "the API").await?;
    let grpc = bind(args.grpc_listen, "gRPC").await?;
    let proxy = bind(args.proxy_listen, "the proxy").await?;
    let api_addr = api.local_addr()?;
    let grpc_addr = grpc.local_addr()?;
    let proxy_addr = proxy.local_addr()?;

    let mut config = DataplaneConfig {
        node_id: "local".to_owned(),
        server_url: format!("http://{grpc_addr}"),
        node_token: server.node_token().to_owned(),
        data_dir: data_dir.join("node"),
        proxy_url: format!("http://{proxy_addr}"),
        proxy_domain: args.proxy_domain,
        network,
        sandboxd_path: sandboxd,
        // Named after the data dir, so that two `hutch up` on one host (tests
        // run several at once) never sweep each other's sandboxes.
        cgroup_parent: Some(format!(
            "hutch-up-{}",
            short_digest(data_dir.as_os_str().as_encoded_bytes())
        )),
        ..Default::default()
    };
    override_capacity(&mut config, args.cpus, args.memory, args.disk);
    // Registry settings come from the environment, as for `hutch dataplane`: a
    // password does not belong on a command line that `ps` shows. So does the
    // size of the network namespace pool, an operator's tuning knob.
    const FROM_ENV: [&str; 4] = [
        "HUTCH_REGISTRIES",
        "HUTCH_INSECURE_REGISTRIES",
        "HUTCH_NETNS_POOL",
        "HUTCH_USER_NAMESPACE",
    ];
    let from_env = DataplaneConfig::from_yaml_and_env(
        None,
        std::env::vars().filter(|(key, _)| FROM_ENV.contains(&key.as_str())),
    )
    .context(
        "invalid HUTCH_REGISTRIES, HUTCH_INSECURE_REGISTRIES, HUTCH_NETNS_POOL or HUTCH_USER_NAMESPACE",
    )?;
    config.registries = from_env.registries;
    config.insecure_registries = from_env.insecure_registries;
    config.netns_pool = from_env.netns_pool;
    config.user_namespace = from_env.user_namespace;
    let user_namespace = config.user_namespace;
    let dataplane = Dataplane::open(config).await.context("cannot start the dataplane")?;

    let admin_key = data_dir.join("admin.key");
    let mut out = std::io::stdout().lock();
    writeln!(out, "hutch is up")?;
    writeln!(out, "  api:       http://{api_addr}")?;
    writeln!(out, "  grpc:      {grpc_addr}")?;
    writeln!(out, "  proxy:     http://{proxy_addr}")?;
    writeln!(out, "  admin key: {}", admin_key.display())?;
    writeln!(out, "  isolation: {}", isolation(user_namespace))?;
    writeln!(out, "  network:   {}", if network { "internet and none" } else { "none only" })?;
    out.flush()?;
    drop(out);

    let (shutdown_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let server_task = tokio::spawn(server.run(api, grpc, wait_for(shutdown_tx.subscribe())));
    let dataplane_task = tokio::spawn(dataplane.run(proxy, wait_for(shutdown_tx.subscribe())));
    shutdown_signal().await;
    eprintln!("hutch: shutting down; sandboxes keep running and are adopted on the next start");
    let _ = shutdown_tx.send(());
    let (server_result, dataplane_result) = tokio::join!(server_task, dataplane_task);
    server_result.context("server task")?.context("server")?;
    dataplane_result.context("dataplane task")?.context("dataplane")?;
    Ok(())
}

pub async fn server(args: ServerArgs) -> anyhow::Result<()> {
    let data_dir = args.data_dir.unwrap_or_else(default_data_dir);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create the data dir {}", data_dir.display()))?;
    let server = Server::open(ServerConfig::new(&data_dir))
        .await
        .context("cannot open the server's store")?;
    let api = bind(args.listen, "the API").await?;
    let grpc = bind(args.grpc_listen, "gRPC").await?;
    println!("hutch server");
    println!("  api:        http://{}", api.local_addr()?);
    println!("  grpc:       {}", grpc.local_addr()?);
    println!("  admin key:  {}", data_dir.join("admin.key").display());
    println!("  node token: {}", data_dir.join("node.key").display());
    server.run(api, grpc, shutdown_signal()).await.context("server")?;
    Ok(())
}

pub async fn dataplane(args: DataplaneArgs) -> anyhow::Result<()> {
    check_root("hutch dataplane")?;
    let yaml = match &args.config {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?,
        ),
        None => None,
    };
    let mut config = DataplaneConfig::from_yaml_and_env(yaml.as_deref(), std::env::vars())
        .context("invalid dataplane configuration")?;
    if config.network {
        check_nft()?;
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create the data dir {}", config.data_dir.display()))?;
    if !config.sandboxd_path.is_file() {
        config.sandboxd_path = install_sandboxd(&config.data_dir)?;
    }
    let proxy = bind(args.proxy_listen, "the proxy").await?;
    let proxy_addr = proxy.local_addr()?;
    // The default URL names the default port on loopback; a dataplane bound
    // elsewhere advertises where it really is unless the operator said.
    if config.proxy_url == DataplaneConfig::default().proxy_url {
        let host = if proxy_addr.ip().is_unspecified() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            proxy_addr.ip()
        };
        config.proxy_url = format!("http://{}", SocketAddr::new(host, proxy_addr.port()));
    }
    let node_id = config.node_id.clone();
    let user_namespace = config.user_namespace;
    let dataplane = Dataplane::open(config).await.context("cannot start the dataplane")?;
    println!("hutch dataplane {node_id}");
    println!("  isolation: {}", isolation(user_namespace));
    println!("  proxy: http://{proxy_addr}");
    dataplane.run(proxy, shutdown_signal()).await.context("dataplane")?;
    Ok(())
}

/// How sandboxes are kept from the host, for the start-up lines.
fn isolation(user_namespace: bool) -> &'static str {
    if user_namespace {
        "a user namespace per sandbox (root inside is an unprivileged host uid)"
    } else {
        "NO user namespaces (user_namespace: false): root in a sandbox is host root, \
         held only by namespaces, capabilities and seccomp"
    }
}

fn override_capacity(
    config: &mut DataplaneConfig,
    cpus: Option<f64>,
    memory: Option<u64>,
    disk: Option<u64>,
) {
    config.capacity.cpus = cpus.or(config.capacity.cpus);
    config.capacity.memory_mb = memory.or(config.capacity.memory_mb);
    config.capacity.disk_mb = disk.or(config.capacity.disk_mb);
}

/// The data dir a local `hutch up` uses, which clients also fall back to.
pub fn default_data_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/hutch");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/hutch"),
        None => PathBuf::from(".hutch"),
    }
}

/// Writes the sandboxd embedded at build time into `<data_dir>/bin`, named
/// by its digest so a new hutch never runs against an old sandboxd and a
/// running sandbox's bind mount is never replaced underneath it.
fn install_sandboxd(data_dir: &Path) -> anyhow::Result<PathBuf> {
    static SANDBOXD: &[u8] = include_bytes!(env!("HUTCH_EMBEDDED_SANDBOXD"));
    let digest = short_digest(SANDBOXD);
    let dir = data_dir.join("bin");
    let path = dir.join(format!("sandboxd-{digest}"));
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let temp = dir.join(format!(".sandboxd-{digest}.{}", std::process::id()));
    std::fs::write(&temp, SANDBOXD).with_context(|| format!("cannot write {}", temp.display()))?;
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&temp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

fn short_digest(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..8])
}

fn check_root(what: &str) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "{what} needs root: the native driver creates namespaces, cgroups and mounts \
             (run it with sudo)"
        );
    }
    Ok(())
}

fn check_nft() -> anyhow::Result<()> {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("nft").is_file()))
        || Path::new("/usr/sbin/nft").is_file();
    if !found {
        bail!(
            "egress `internet` needs nftables, which is not installed: \
             run `apt-get install nftables`, or start with --no-network"
        );
    }
    Ok(())
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} for {what}"))
}

async fn wait_for(mut rx: tokio::sync::broadcast::Receiver<()>) {
    let _ = rx.recv().await;
}

/// Resolves on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) =
        (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    else {
        // Without signal handlers the process can still be killed; wait forever.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
}
