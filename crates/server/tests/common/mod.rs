//! A real server on loopback port 0 with a temp data dir, an HTTP client
//! for its REST API, and a fake dataplane that speaks the real gRPC
//! protocol through tonic's generated client.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hutch_proto::node::node_client::NodeClient;
use hutch_proto::node::{
    DesiredState, NodeReport, ObservedPhase, ObservedSandbox, RegisterRequest, Resources,
};
use hutch_server::{Server, ServerConfig};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;

pub const DEADLINE: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub dir: PathBuf,
    pub api: SocketAddr,
    pub grpc: SocketAddr,
    pub admin_key: String,
    pub node_token: String,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

pub fn test_config(dir: &Path) -> ServerConfig {
    ServerConfig {
        node_timeout_ms: 1000,
        tick_ms: 50,
        retention_secs: 60,
        daemon_wait_secs: 5,
        ..ServerConfig::new(dir)
    }
}

impl TestServer {
    pub async fn start(dir: &Path) -> Result<TestServer> {
        TestServer::start_with(test_config(dir)).await
    }

    pub async fn start_with(config: ServerConfig) -> Result<TestServer> {
        let dir = config.data_dir.clone();
        let server = Server::open(config).await.context("open server")?;
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let (api_addr, grpc_addr) = (api.local_addr()?, grpc.local_addr()?);
        let admin_key = server.admin_key().to_owned();
        let node_token = server.node_token().to_owned();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .run(api, grpc, async move {
                    let _ = stopped.await;
                })
                .await
                .expect("server run failed");
        });
        Ok(TestServer {
            dir,
            api: api_addr,
            grpc: grpc_addr,
            admin_key,
            node_token,
            http: reqwest::Client::new(),
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Shuts the server down and waits until it has closed its store.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(DEADLINE, task).await.context("server did not stop")??;
        }
        Ok(())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.api, path)
    }

    pub fn sandboxes(&self, ns: &str) -> String {
        self.url(&format!("/v1/namespaces/{ns}/sandboxes"))
    }

    /// A request with the admin key.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path)).bearer_auth(&self.admin_key)
    }

    /// Creates a sandbox as admin in `ns` and returns it.
    pub async fn create(&self, ns: &str, body: Value) -> Result<Value> {
        let response = self
            .http
            .post(self.sandboxes(ns))
            .bearer_auth(&self.admin_key)
            .json(&body)
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if status != 201 {
            bail!("create answered {status}: {body}");
        }
        Ok(body)
    }

    pub async fn get(&self, ns: &str, id: &str) -> Result<Value> {
        let response = self
            .http
            .get(format!("{}/{id}", self.sandboxes(ns)))
            .bearer_auth(&self.admin_key)
            .send()
            .await?;
        Ok(response.json().await?)
    }

    /// Polls the sandbox until `check` holds, failing after [`DEADLINE`].
    pub async fn wait_for(
        &self,
        ns: &str,
        id: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let sandbox = self.get(ns, id).await?;
            if check(&sandbox) {
                return Ok(sandbox);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("sandbox never reached the expected state; last: {sandbox}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_state(&self, ns: &str, id: &str, state: &str) -> Result<Value> {
        self.wait_for(ns, id, |s| s["state"] == state).await
    }

    /// Creates a namespace and a key for it; returns the key.
    pub async fn namespace_with_key(&self, name: &str) -> Result<String> {
        let response = self
            .admin(reqwest::Method::POST, "/v1/namespaces")
            .json(&json!({"name": name}))
            .send()
            .await?;
        if response.status() != 201 {
            bail!("create namespace answered {}", response.status());
        }
        let key: Value = self
            .admin(reqwest::Method::POST, &format!("/v1/namespaces/{name}/keys"))
            .send()
            .await?
            .json()
            .await?;
        Ok(key["key"].as_str().context("no key")?.to_owned())
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A dataplane as the server sees it: registers, holds a Sync stream,
/// reports what it is told to report.
pub struct FakeNode {
    pub id: String,
    /// The report the heartbeat task sends now and every 300 ms.
    reports: watch::Sender<NodeReport>,
    heartbeat: JoinHandle<()>,
    desired: mpsc::Receiver<DesiredState>,
    pub latest: DesiredState,
    pub capacity: Resources,
}

pub fn capacity(cpus: f64, memory_mb: u64) -> Resources {
    Resources { cpus, memory_mb, disk_mb: 100_000, pids: 100_000 }
}

pub async fn client(
    grpc: SocketAddr,
    token: &str,
) -> Result<
    NodeClient<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            impl tonic::service::Interceptor + Clone,
        >,
    >,
> {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))?.connect().await?;
    let value: MetadataValue<_> = format!("Bearer {token}").parse()?;
    Ok(NodeClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
        request.metadata_mut().insert("authorization", value.clone());
        Ok(request)
    }))
}

impl FakeNode {
    pub async fn connect(
        server: &TestServer,
        id: &str,
        capacity: Resources,
        proxy_url: &str,
    ) -> Result<FakeNode> {
        FakeNode::connect_to(server.grpc, &server.node_token, id, capacity, proxy_url).await
    }

    pub async fn connect_to(
        grpc: SocketAddr,
        token: &str,
        id: &str,
        capacity: Resources,
        proxy_url: &str,
    ) -> Result<FakeNode> {
        FakeNode::connect_with_max(grpc, token, id, capacity, proxy_url, None).await
    }

    /// [`FakeNode::connect_to`] for a node that says how large a sandbox it runs.
    pub async fn connect_with_max(
        grpc: SocketAddr,
        token: &str,
        id: &str,
        capacity: Resources,
        proxy_url: &str,
        sandbox_max: Option<Resources>,
    ) -> Result<FakeNode> {
        let mut client = client(grpc, token).await?;
        let registered = client
            .register(RegisterRequest {
                node_id: id.to_owned(),
                capacity: Some(capacity),
                proxy_url: proxy_url.to_owned(),
                version: "test".to_owned(),
                sandbox_max,
            })
            .await?
            .into_inner();
        assert!(registered.node_timeout_ms > 0);
        let (sender, receiver) = mpsc::channel(16);
        let mut stream = client.sync(ReceiverStream::new(receiver)).await?.into_inner();
        let (reports, mut latest) = watch::channel(NodeReport {
            node_id: id.to_owned(),
            capacity: Some(capacity),
            sandboxes: vec![],
            sandbox_max: None,
        });
        // Like a real dataplane: report at once after a change, and as a
        // heartbeat in between.
        let heartbeat = tokio::spawn(async move {
            loop {
                let report = latest.borrow_and_update().clone();
                if sender.send(report).await.is_err() {
                    break;
                }
                tokio::select! {
                    changed = latest.changed() => if changed.is_err() { break },
                    () = tokio::time::sleep(Duration::from_millis(300)) => {}
                }
            }
        });
        let (desired_tx, desired) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Some(Ok(state)) = stream.next().await {
                if desired_tx.send(state).await.is_err() {
                    break;
                }
            }
        });
        Ok(FakeNode {
            id: id.to_owned(),
            reports,
            heartbeat,
            desired,
            latest: DesiredState::default(),
            capacity,
        })
    }

    /// Sends a full report (and repeats it as the heartbeat from now on).
    pub async fn report(&mut self, sandboxes: Vec<ObservedSandbox>) -> Result<()> {
        self.reports
            .send(NodeReport {
                node_id: self.id.clone(),
                capacity: Some(self.capacity),
                sandboxes,
                sandbox_max: None,
            })
            .context("heartbeat task ended")
    }

    /// Stops reporting, as a crashed dataplane would.
    pub fn go_silent(&self) {
        self.heartbeat.abort();
    }

    /// Waits for a desired state that satisfies `check`.
    pub async fn wait_desired(
        &mut self,
        check: impl Fn(&DesiredState) -> bool,
    ) -> Result<DesiredState> {
        if check(&self.latest) {
            return Ok(self.latest.clone());
        }
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let state = tokio::time::timeout_at(deadline, self.desired.recv())
                .await
                .with_context(|| format!("no matching desired state; last: {:?}", self.latest))?
                .context("sync stream ended")?;
            self.latest = state;
            if check(&self.latest) {
                return Ok(self.latest.clone());
            }
        }
    }

    /// The next desired state the server sends.
    pub async fn next_desired(&mut self) -> Result<DesiredState> {
        let state = self.desired.recv().await.context("sync stream ended")?;
        self.latest = state.clone();
        Ok(state)
    }

    /// Waits until `id` is desired on this node with `phase`.
    pub async fn wait_phase(
        &mut self,
        id: &str,
        phase: hutch_proto::node::Phase,
    ) -> Result<DesiredState> {
        let id = id.to_owned();
        self.wait_desired(move |state| {
            state.sandboxes.iter().any(|s| s.id == id && s.phase == phase as i32)
        })
        .await
    }
}

pub fn observed(id: &str, phase: ObservedPhase) -> ObservedSandbox {
    ObservedSandbox {
        id: id.to_owned(),
        phase: phase as i32,
        reason: String::new(),
        message: String::new(),
        exit_code: None,
        started_at_ms: 0,
        finished_at_ms: 0,
        last_activity_ms: 0,
    }
}

pub fn exited(id: &str, code: i32) -> ObservedSandbox {
    ObservedSandbox { exit_code: Some(code), ..observed(id, ObservedPhase::ObservedExited) }
}

/// The status, code and message of an error answer.
pub async fn error_of(response: reqwest::Response) -> Result<(u16, String, String)> {
    let status = response.status().as_u16();
    let body: Value = response.json().await?;
    Ok((
        status,
        body["error"]["code"].as_str().unwrap_or_default().to_owned(),
        body["error"]["message"].as_str().unwrap_or_default().to_owned(),
    ))
}

/// Whether the desired state names sandbox `id` (in any phase).
pub fn desires(state: &DesiredState, id: &str) -> bool {
    state.sandboxes.iter().any(|s| s.id == id)
}

pub fn id_of(sandbox: &Value) -> String {
    sandbox["id"].as_str().unwrap_or_default().to_owned()
}
