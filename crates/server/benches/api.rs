//! Latency of the server's own share of the hot paths, on loopback with a
//! SQLite file in a temp dir: create, create → first daemon call (the node
//! reports RUNNING as soon as it is told), and a daemon round trip through
//! the server to a node proxy that answers at once.
//!
//! Run: `cargo bench -p hutch-server --bench api`

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use anyhow::Result;
use common::{FakeNode, TestServer, capacity, id_of, observed};
use hutch_proto::node::{ObservedPhase, Phase};
use serde_json::json;

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let pick = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "{name:<40} n={:<5} p50={:>8.3} ms  p99={:>8.3} ms",
        samples.len(),
        pick(0.50).as_secs_f64() * 1e3,
        pick(0.99).as_secs_f64() * 1e3
    );
}

/// A node that reports every sandbox it is asked to run as running.
fn run_everything(mut node: FakeNode) {
    tokio::spawn(async move {
        let mut reported = std::collections::BTreeSet::new();
        while let Ok(state) = node.next_desired().await {
            let running = state
                .sandboxes
                .iter()
                .filter(|s| s.phase == Phase::Run as i32)
                .map(|s| observed(&s.id, ObservedPhase::ObservedRunning))
                .collect::<Vec<_>>();
            // Like a real dataplane, report only when something changed (the
            // server answers every report with the desired state).
            let ids: std::collections::BTreeSet<String> =
                running.iter().map(|s| s.id.clone()).collect();
            if ids == reported {
                continue;
            }
            reported = ids;
            if node.report(running).await.is_err() {
                break;
            }
        }
    });
}

async fn start_proxy() -> Result<String> {
    let app = axum::Router::new().fallback(|| async { "ok" });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(url)
}

/// Creates a sandbox and makes its first daemon call; returns its id.
async fn create_and_call<F, Fut>(server: &TestServer, create: &F) -> Result<String>
where
    F: Fn() -> Fut,
    Fut: Future<Output = reqwest::Result<reqwest::Response>>,
{
    let sandbox: serde_json::Value = create().await?.json().await?;
    let id = id_of(&sandbox);
    let url = format!("{}/{id}/daemon/health", server.sandboxes("default"));
    let response = server.http.get(&url).bearer_auth(&server.admin_key).send().await?;
    let status = response.status();
    anyhow::ensure!(status == 200, "daemon call failed: {status} {}", response.text().await?);
    response.bytes().await?;
    Ok(id)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start_with(hutch_server::ServerConfig {
        node_timeout_ms: 15_000,
        ..common::test_config(dir.path())
    })
    .await?;
    let proxy = start_proxy().await?;
    let node = FakeNode::connect(
        &server,
        "node-1",
        hutch_proto::node::Resources { disk_mb: 1 << 40, ..capacity(1.0e6, 1 << 40) },
        &proxy,
    )
    .await?;
    run_everything(node);
    let create = || {
        server
            .http
            .post(server.sandboxes("default"))
            .bearer_auth(&server.admin_key)
            .json(&json!({"command": ["sleep", "infinity"]}))
            .send()
    };

    // Create, first daemon call, delete: the server stays nearly empty.
    let mut samples = Vec::new();
    for _ in 0..300 {
        let start = Instant::now();
        let id = create_and_call(&server, &create).await?;
        samples.push(start.elapsed());
        let url = format!("{}/{id}", server.sandboxes("default"));
        server.http.delete(url).bearer_auth(&server.admin_key).send().await?;
    }
    report("create -> first daemon call (then delete)", samples);

    let mut samples = Vec::new();
    for _ in 0..500 {
        let start = Instant::now();
        let response = create().await?;
        anyhow::ensure!(response.status() == 201, "create failed: {}", response.status());
        response.bytes().await?;
        samples.push(start.elapsed());
    }
    report("POST create (0 -> 500 running)", samples);

    let mut samples = Vec::new();
    let mut last = String::new();
    for _ in 0..100 {
        let start = Instant::now();
        last = create_and_call(&server, &create).await?;
        samples.push(start.elapsed());
    }
    report("create -> first daemon call (500 running)", samples);

    // 100 clients at once, each creating and calling its own sandbox.
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let http = server.http.clone();
        let (sandboxes, key) = (server.sandboxes("default"), server.admin_key.clone());
        tasks.push(tokio::spawn(async move {
            let sandbox: serde_json::Value = http
                .post(&sandboxes)
                .bearer_auth(&key)
                .json(&json!({}))
                .send()
                .await?
                .json()
                .await?;
            let url = format!("{sandboxes}/{}/daemon/health", id_of(&sandbox));
            let response = http.get(&url).bearer_auth(&key).send().await?;
            anyhow::ensure!(response.status() == 200, "daemon call failed: {}", response.status());
            anyhow::Ok(start.elapsed())
        }));
    }
    let mut samples = Vec::new();
    for task in tasks {
        samples.push(task.await??);
    }
    report("100 concurrent create -> first call", samples);

    let url = format!("{}/{last}/daemon/health", server.sandboxes("default"));
    let mut samples = Vec::new();
    for _ in 0..2000 {
        let start = Instant::now();
        let response = server.http.get(&url).bearer_auth(&server.admin_key).send().await?;
        response.bytes().await?;
        samples.push(start.elapsed());
    }
    report("daemon round trip (server -> proxy)", samples);
    server.stop().await?;
    Ok(())
}
