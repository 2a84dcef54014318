//! Fixtures of the dataplane tests: a real tonic `Node` server driven by the
//! test, a dataplane in a temp dir with its own cgroup parent (running
//! hutch-testkit's static sandboxd), and small HTTP helpers for the proxy.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::Bytes;
use futures_util::Stream;
use http_body_util::{BodyExt, Full};
use hutch_dataplane::{CapacityConfig, Dataplane, DataplaneConfig};
use hutch_isolate::{CgroupLayout, SandboxCgroup, SandboxId};
use hutch_proto::node::node_server::{Node, NodeServer};
use hutch_proto::node::{
    DesiredSandbox, DesiredState, NodeReport, ObservedPhase, ObservedSandbox, Phase,
    RegisterRequest, RegisterResponse, SandboxSpec,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

pub const TOKEN: &str = "test-node-token";
pub const DOMAIN: &str = "sb.test";
pub const WAIT: Duration = Duration::from_secs(30);

/// What the test server saw and what it sends.
#[derive(Default)]
struct ServerState {
    registrations: Vec<RegisterRequest>,
    reports: Vec<NodeReport>,
    authorized: Vec<bool>,
}

#[derive(Clone)]
struct NodeService {
    state: Arc<Mutex<ServerState>>,
    desired: watch::Sender<DesiredState>,
    /// Set to end every open Sync stream (the server going away).
    closed: watch::Receiver<bool>,
}

impl NodeService {
    fn check(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), tonic::Status> {
        let ok = metadata.get("authorization").and_then(|v| v.to_str().ok())
            == Some(&format!("Bearer {TOKEN}"));
        self.state.lock().unwrap().authorized.push(ok);
        if ok { Ok(()) } else { Err(tonic::Status::unauthenticated("bad node token")) }
    }
}

type DesiredStream = Pin<Box<dyn Stream<Item = Result<DesiredState, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl Node for NodeService {
    async fn register(
        &self,
        request: tonic::Request<RegisterRequest>,
    ) -> Result<tonic::Response<RegisterResponse>, tonic::Status> {
        self.check(request.metadata())?;
        self.state.lock().unwrap().registrations.push(request.into_inner());
        Ok(tonic::Response::new(RegisterResponse {
            heartbeat_interval_ms: 2000,
            node_timeout_ms: 15_000,
        }))
    }

    type SyncStream = DesiredStream;

    /// Like the real server: the desired state at once, after every change,
    /// and in answer to every report.
    async fn sync(
        &self,
        request: tonic::Request<tonic::Streaming<NodeReport>>,
    ) -> Result<tonic::Response<DesiredStream>, tonic::Status> {
        self.check(request.metadata())?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<DesiredState, tonic::Status>>(16);
        let initial = self.desired.borrow().clone();
        let _ = tx.send(Ok(initial)).await;
        let this = self.clone();
        tokio::spawn(async move {
            let mut desired = this.desired.subscribe();
            let mut closed = this.closed.clone();
            loop {
                tokio::select! {
                    report = inbound.message() => match report {
                        Ok(Some(report)) => {
                            this.state.lock().unwrap().reports.push(report);
                            let state = desired.borrow().clone();
                            if tx.send(Ok(state)).await.is_err() { return; }
                        }
                        _ => return,
                    },
                    changed = desired.changed() => {
                        if changed.is_err() { return; }
                        let state = desired.borrow_and_update().clone();
                        if tx.send(Ok(state)).await.is_err() { return; }
                    }
                    () = wait_closed(&mut closed) => {
                        let _ = tx.send(Err(tonic::Status::unavailable("server going away"))).await;
                        return;
                    }
                }
            }
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            let item = rx.recv().await?;
            Some((item, rx))
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

async fn wait_closed(closed: &mut watch::Receiver<bool>) {
    let _ = closed.wait_for(|closed| *closed).await;
}

/// A real tonic `Node` server on 127.0.0.1:0, controlled by the test.
pub struct TestServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<ServerState>>,
    desired: watch::Sender<DesiredState>,
    closed: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0".parse()?).await
    }

    /// A server on `addr`, e.g. where a stopped one listened.
    pub async fn start_on(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(ServerState::default()));
        let (desired, _) = watch::channel(DesiredState::default());
        let (closed, closed_rx) = watch::channel(false);
        let service = NodeService {
            state: state.clone(),
            desired: desired.clone(),
            closed: closed_rx.clone(),
        };
        let incoming = futures_util::stream::unfold(listener, |listener| async move {
            let accepted = listener.accept().await.map(|(stream, _)| stream);
            Some((accepted, listener))
        });
        let mut shutdown = closed_rx;
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(NodeServer::new(service))
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = shutdown.wait_for(|closed| *closed).await;
                })
                .await;
        });
        Ok(Self { addr, state, desired, closed, task: Some(task) })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the desired state; sent to the node at once (even if identical).
    pub fn set_desired(&self, sandboxes: Vec<DesiredSandbox>) {
        self.desired.send_replace(DesiredState { sandboxes, ..Default::default() });
    }

    /// Ends every Sync stream and stops listening.
    pub async fn stop(&mut self) {
        let _ = self.closed.send(true);
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }

    pub fn registrations(&self) -> usize {
        self.state.lock().unwrap().registrations.len()
    }

    pub fn all_authorized(&self) -> bool {
        self.state.lock().unwrap().authorized.iter().all(|ok| *ok)
    }

    pub fn report_count(&self) -> usize {
        self.state.lock().unwrap().reports.len()
    }

    /// Every observed state of sandbox `id`, in the order reported.
    pub fn history(&self, id: &str) -> Vec<ObservedSandbox> {
        let state = self.state.lock().unwrap();
        state
            .reports
            .iter()
            .flat_map(|r| r.sandboxes.iter().filter(|s| s.id == id).cloned())
            .collect()
    }

    pub fn latest(&self) -> Option<NodeReport> {
        self.state.lock().unwrap().reports.last().cloned()
    }

    /// Waits for a report in which sandbox `id` satisfies `check`.
    pub async fn wait_for(
        &self,
        id: &str,
        what: &str,
        check: impl Fn(&ObservedSandbox) -> bool,
    ) -> anyhow::Result<ObservedSandbox> {
        let deadline = Instant::now() + WAIT;
        loop {
            let found = {
                let state = self.state.lock().unwrap();
                state.reports.last().and_then(|r| r.sandboxes.iter().find(|s| s.id == id).cloned())
            };
            if let Some(sandbox) = found.filter(|s| check(s)) {
                return Ok(sandbox);
            }
            if Instant::now() > deadline {
                bail!("sandbox {id} never became {what}; history: {:?}", self.history(id));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn wait_phase(
        &self,
        id: &str,
        phase: ObservedPhase,
    ) -> anyhow::Result<ObservedSandbox> {
        self.wait_for(id, phase.as_str_name(), |s| s.phase == phase as i32).await
    }

    /// Waits until the newest report no longer lists `id`.
    pub async fn wait_gone(&self, id: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            let report_count = self.report_count();
            let present = self.latest().is_none_or(|r| r.sandboxes.iter().any(|s| s.id == id));
            if !present && report_count > 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("sandbox {id} was still reported: {:?}", self.latest());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.closed.send(true);
    }
}

/// A fresh 32-hex-digit sandbox id, as the server makes them.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

pub fn spec(id: &str, command: &[&str], ports: &[u32]) -> SandboxSpec {
    SandboxSpec {
        id: id.to_owned(),
        namespace: "default".into(),
        image: "host".into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        ports: ports.to_vec(),
        ..Default::default()
    }
}

pub fn run(spec: SandboxSpec) -> DesiredSandbox {
    DesiredSandbox {
        id: spec.id.clone(),
        spec: Some(spec),
        phase: Phase::Run as i32,
        grace_secs: 0,
    }
}

pub fn stop(spec: SandboxSpec, grace_secs: u32) -> DesiredSandbox {
    DesiredSandbox { id: spec.id.clone(), spec: Some(spec), phase: Phase::Stop as i32, grace_secs }
}

/// A running dataplane.
struct Running {
    proxy: SocketAddr,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// A dataplane in a temp dir with its own cgroup parent, talking to a
/// [`TestServer`]. Dropping it kills and removes whatever sandboxes are left,
/// even when the test failed.
pub struct TestNode {
    pub server: TestServer,
    pub dir: tempfile::TempDir,
    pub config: DataplaneConfig,
    running: Option<Running>,
}

impl TestNode {
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        Self::start_with(name, |_| {}).await
    }

    /// Like [`TestNode::start`], with `adjust` applied to the configuration.
    pub async fn start_with(
        name: &str,
        adjust: impl FnOnce(&mut DataplaneConfig),
    ) -> anyhow::Result<Self> {
        let server = TestServer::start().await?;
        let dir = tempfile::tempdir()?;
        let config = DataplaneConfig {
            node_id: format!("test-{name}"),
            server_url: server.url(),
            node_token: TOKEN.to_owned(),
            data_dir: dir.path().join("data"),
            run_dir: Some(dir.path().join("run")),
            proxy_url: "http://127.0.0.1:0".into(),
            proxy_domain: Some(DOMAIN.to_owned()),
            capacity: CapacityConfig {
                cpus: Some(8.0),
                memory_mb: Some(8192),
                disk_mb: Some(8192),
                pids: Some(4096),
                max_pids_per_sandbox: None,
            },
            network: false,
            network_bridge: None,
            network_subnet: None,
            network_table: None,
            blocked_networks: None,
            sandboxd_path: hutch_testkit::sandboxd_path(),
            cgroup_parent: Some(format!("hutch-dptest-{name}-{}", std::process::id())),
            insecure_registries: Vec::new(),
            registries: Default::default(),
            report_interval: Duration::from_secs(2),
            // Small, but the first creates of a test still take pooled namespaces.
            netns_pool: 4,
            proxy: Default::default(),
            user_namespace: true,
        };
        let mut config = config;
        adjust(&mut config);
        let mut node = Self { server, dir, config, running: None };
        node.open().await?;
        Ok(node)
    }

    /// Opens and runs a dataplane over the node's directories.
    pub async fn open(&mut self) -> anyhow::Result<()> {
        let dataplane = Dataplane::open(self.config.clone()).await?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let proxy = listener.local_addr()?;
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = dataplane
                .run(listener, async move {
                    let _ = stopped.await;
                })
                .await;
        });
        self.running = Some(Running { proxy, shutdown, task });
        Ok(())
    }

    /// Ends the dataplane without touching its sandboxes, as a crash would.
    pub async fn close(&mut self) -> anyhow::Result<()> {
        if let Some(running) = self.running.take() {
            let _ = running.shutdown.send(());
            tokio::time::timeout(Duration::from_secs(10), running.task).await??;
        }
        Ok(())
    }

    pub fn proxy(&self) -> SocketAddr {
        self.running.as_ref().expect("dataplane running").proxy
    }

    /// Sandbox ids whose cgroup still exists.
    pub fn cgroup_ids(&self) -> Vec<String> {
        self.layout().map(|l| l.existing_ids()).unwrap_or_default()
    }

    /// Host pids of the processes in sandbox `id`'s cgroup.
    pub fn pids(&self, id: &str) -> Vec<i32> {
        let Some(layout) = self.layout() else { return Vec::new() };
        let Ok(id) = SandboxId::new(id) else { return Vec::new() };
        layout.sandbox(&id).pids().unwrap_or_default()
    }

    fn layout(&self) -> Option<CgroupLayout> {
        CgroupLayout::detect(self.config.cgroup_parent.as_deref()?).ok()
    }

    /// A request to sandboxd (port 9501) of `id` through the proxy.
    pub async fn sandboxd(
        &self,
        id: &str,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<(u16, String)> {
        let headers = [
            ("hutch-sandbox-id", id.to_owned()),
            ("hutch-sandbox-port", "9501".to_owned()),
            ("hutch-node-token", TOKEN.to_owned()),
        ];
        request(self.proxy(), method, path, &headers, body.map(|b| b.to_string())).await
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.task.abort();
        }
        let Some(layout) = self.layout() else { return };
        for id in layout.existing_ids() {
            let Ok(id) = SandboxId::new(id) else { continue };
            remove_cgroup(&layout.sandbox(&id));
        }
        let parents: Vec<PathBuf> = match layout {
            CgroupLayout::V1 { parents } => parents.into_iter().map(|(_, p)| p).collect(),
            CgroupLayout::V2 { parent } => vec![parent],
        };
        for parent in parents {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// Kills everything in a cgroup and removes it, polling until the kernel lets go.
fn remove_cgroup(cgroup: &SandboxCgroup) {
    hutch_testkit::wait_until(Duration::from_secs(10), || {
        let _ = cgroup.kill_all();
        cgroup.remove().is_ok()
    });
}

/// One HTTP/1.1 request to `addr`; returns the status and the body.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Option<String>,
) -> anyhow::Result<(u16, String)> {
    let (status, _, body) =
        request_full(addr, method, path, headers, body.map(String::into_bytes)).await?;
    Ok((status, body))
}

/// Like [`request`], with the response headers.
pub async fn request_full(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Option<Vec<u8>>,
) -> anyhow::Result<(u16, HashMap<String, String>, String)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut builder = hyper::Request::builder().method(method).uri(path);
    if !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("host")) {
        builder = builder.header("host", addr.to_string());
    }
    for (name, value) in headers {
        builder = builder.header(*name, value);
    }
    let request = builder
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
        .collect();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, headers, String::from_utf8_lossy(&bytes).into_owned()))
}

/// One HTTP/2 request with prior knowledge (h2c) to `addr`.
pub async fn request_h2(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, String)],
) -> anyhow::Result<(u16, String)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await?;
    tokio::spawn(connection);
    let mut builder = hyper::Request::builder().uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        builder = builder.header(*name, value);
    }
    let response = sender.send_request(builder.body(Full::new(Bytes::new()))?).await?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}
