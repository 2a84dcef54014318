//! The server and a dataplane speaking the real gRPC protocol: placement,
//! the lifecycle as nodes observe it, stops, timeouts, node loss, SSE, and
//! a restart of the server.

mod common;

use std::time::Duration;

use anyhow::{Context, Result};
use common::{FakeNode, TestServer, capacity, desires, error_of, exited, id_of, observed};
use futures_util::StreamExt;
use hutch_proto::node::{ObservedPhase, Phase, RegisterRequest};
use hutch_server::ServerConfig;
use reqwest::Method;
use serde_json::{Value, json};

#[tokio::test]
async fn a_command_that_exits_zero_completes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let mut node =
        FakeNode::connect(&server, "node-1", capacity(4.0, 4096), "http://127.0.0.1:1").await?;
    let sandbox = server
        .create(
            "default",
            json!({"image": "busybox", "command": ["true"], "env": {"A": "1"}, "ports": [8000]}),
        )
        .await?;
    let id = id_of(&sandbox);
    assert_eq!(sandbox["node"], "node-1");
    assert_eq!(sandbox["urls"]["8000"], format!("http://127.0.0.1:1/{id}/8000/"));

    let desired = node.wait_phase(&id, Phase::Run).await?;
    let spec = desired.sandboxes[0].spec.clone().context("no spec")?;
    assert_eq!(
        (spec.image.as_str(), spec.command.as_slice()),
        ("busybox", &["true".to_owned()][..])
    );
    assert_eq!(spec.env.get("A").map(String::as_str), Some("1"));
    assert_eq!(spec.namespace, "default");
    assert_eq!(spec.resources.map(|r| r.memory_mb), Some(512));

    node.report(vec![ObservedSandbox {
        reason: "pulling_image".into(),
        ..observed(&id, ObservedPhase::ObservedCreating)
    }])
    .await?;
    let pulling = server.wait_for("default", &id, |s| s["reason"] == "pulling_image").await?;
    assert_eq!(pulling["state"], "pending");
    node.report(vec![observed(&id, ObservedPhase::ObservedCreating)]).await?;
    let creating = server.wait_state("default", &id, "creating").await?;
    assert!(creating["reason"].is_null(), "{creating}");
    node.report(vec![observed(&id, ObservedPhase::ObservedRunning)]).await?;
    let running = server.wait_state("default", &id, "running").await?;
    assert!(running["started_at"].is_string());
    node.report(vec![exited(&id, 0)]).await?;
    let done = server.wait_state("default", &id, "completed").await?;
    assert_eq!((done["reason"].as_str(), done["exit_code"].as_i64()), (Some("exited"), Some(0)));
    assert!(done["finished_at"].is_string());
    // Kept on the node (logs stay readable) during retention.
    assert!(desires(&node.latest, &id));
    Ok(())
}

use hutch_proto::node::ObservedSandbox;

#[tokio::test]
async fn non_zero_exits_and_node_failures_fail() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let mut node =
        FakeNode::connect(&server, "node-1", capacity(4.0, 4096), "http://127.0.0.1:1").await?;
    let a = id_of(&server.create("default", json!({"command": ["false"]})).await?);
    let b = id_of(&server.create("default", json!({"image": "nope"})).await?);
    node.wait_desired(|state| desires(state, &a) && desires(state, &b)).await?;
    let failed_pull = ObservedSandbox {
        reason: "image_pull_failed".into(),
        message: "manifest unknown".into(),
        ..observed(&b, ObservedPhase::ObservedFailed)
    };
    node.report(vec![exited(&a, 3), failed_pull]).await?;
    let a = server.wait_state("default", &a, "failed").await?;
    assert_eq!((a["reason"].as_str(), a["exit_code"].as_i64()), (Some("exited"), Some(3)));
    let b = server.wait_state("default", &b, "failed").await?;
    assert_eq!(b["reason"], "image_pull_failed");
    Ok(())
}

#[tokio::test]
async fn stop_asks_the_node_and_ends_terminated() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let mut node =
        FakeNode::connect(&server, "node-1", capacity(4.0, 4096), "http://127.0.0.1:1").await?;
    let id = id_of(&server.create("default", json!({})).await?);
    node.wait_phase(&id, Phase::Run).await?;
    node.report(vec![observed(&id, ObservedPhase::ObservedRunning)]).await?;
    server.wait_state("default", &id, "running").await?;

    let url = format!("{}/{id}/stop", server.sandboxes("default"));
    let response = server
        .http
        .post(url)
        .bearer_auth(&server.admin_key)
        .json(&json!({"grace_secs": 3}))
        .send()
        .await?;
    assert_eq!(response.status(), 202);
    let desired = node.wait_phase(&id, Phase::Stop).await?;
    assert_eq!(desired.sandboxes[0].grace_secs, 3);
    // Still running until the node says it stopped.
    assert_eq!(server.get("default", &id).await?["state"], "running");
    node.report(vec![observed(&id, ObservedPhase::ObservedStopped)]).await?;
    let stopped = server.wait_state("default", &id, "terminated").await?;
    assert_eq!(stopped["reason"], "stopped");
    Ok(())
}

#[tokio::test]
async fn delete_stops_and_forgets() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let mut node =
        FakeNode::connect(&server, "node-1", capacity(4.0, 4096), "http://127.0.0.1:1").await?;
    let id = id_of(&server.create("default", json!({})).await?);
    node.wait_phase(&id, Phase::Run).await?;
    node.report(vec![observed(&id, ObservedPhase::ObservedRunning)]).await?;
    server.wait_state("default", &id, "running").await?;
    let url = format!("{}/{id}", server.sandboxes("default"));
    let response = server.http.delete(&url).bearer_auth(&server.admin_key).send().await?;
    assert_eq!(response.status(), 202);
    node.wait_phase(&id, Phase::Stop).await?;
    node.report(vec![observed(&id, ObservedPhase::ObservedStopped)]).await?;
    // Gone from the node's desired state and from the API.
    node.wait_desired(|state| !desires(state, &id)).await?;
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    while server.http.get(&url).bearer_auth(&server.admin_key).send().await?.status() != 404 {
        assert!(tokio::time::Instant::now() < deadline, "deleted sandbox still visible");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test]
async fn deadlines_stop_with_reason_timeout() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let mut node =
        FakeNode::connect(&server, "node-1", capacity(4.0, 4096), "http://127.0.0.1:1").await?;
    let id = id_of(&server.create("default", json!({"timeout_secs": 1})).await?);
    node.wait_phase(&id, Phase::Run).await?;
    node.report(vec![observed(&id, ObservedPhase::ObservedRunning)]).await?;
    node.wait_phase(&id, Phase::Stop).await?;
    node.report(vec![ObservedSandbox {
        exit_code: Some(143),
        ..observed(&id, ObservedPhase::ObservedExited)
    }])
    .await?;
    let done = server.wait_state("default", &id, "terminated").await?;
    assert_eq!(done["reason"], "timeout");
    Ok(())
}

#[tokio::test]
async fn idle_sandboxes_stop_with_reason_idle_timeout() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let mut node =
        FakeNode::connect(&server, "node-1", capacity(4.0, 4096), "http://127.0.0.1:1").await?;
    let id = id_of(&server.create("default", json!({"idle_timeout_secs": 1})).await?);
    node.wait_phase(&id, Phase::Run).await?;
    node.report(vec![observed(&id, ObservedPhase::ObservedRunning)]).await?;
    node.wait_phase(&id, Phase::Stop).await?;
    node.report(vec![observed(&id, ObservedPhase::ObservedStopped)]).await?;
    let done = server.wait_state("default", &id, "terminated").await?;
    assert_eq!(done["reason"], "idle_timeout");
    Ok(())
}

#[tokio::test]
async fn a_silent_node_is_lost_and_its_sandboxes_fail() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let mut node =
        FakeNode::connect(&server, "node-1", capacity(4.0, 4096), "http://127.0.0.1:1").await?;
    let id = id_of(&server.create("default", json!({})).await?);
    node.wait_phase(&id, Phase::Run).await?;
    node.report(vec![observed(&id, ObservedPhase::ObservedRunning)]).await?;
    server.wait_state("default", &id, "running").await?;
    // The node says nothing more; node_timeout_ms is 1000 in tests.
    node.go_silent();
    let lost = server.wait_state("default", &id, "failed").await?;
    assert_eq!(lost["reason"], "node_lost");
    let metrics = server.http.get(server.url("/metrics")).send().await?.text().await?;
    assert!(metrics.contains("hutch_nodes{status=\"lost\"} 1"), "{metrics}");
    // When it comes back, the lost sandbox is no longer desired (destroyed).
    let mut node =
        FakeNode::connect(&server, "node-1", capacity(4.0, 4096), "http://127.0.0.1:1").await?;
    node.report(vec![observed(&id, ObservedPhase::ObservedRunning)]).await?;
    node.wait_desired(|state| !desires(state, &id)).await?;
    assert_eq!(server.get("default", &id).await?["state"], "failed");
    Ok(())
}

#[tokio::test]
async fn no_capacity_waits_pending_until_a_node_fits() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let mut small =
        FakeNode::connect(&server, "small", capacity(1.0, 1024), "http://127.0.0.1:1").await?;
    let first = id_of(&server.create("default", json!({"resources": {"memory_mb": 1024}})).await?);
    small.wait_phase(&first, Phase::Run).await?;
    // The small node is full now.
    let second = server.create("default", json!({"resources": {"memory_mb": 1024}})).await?;
    assert_eq!(
        (second["state"].as_str(), second["reason"].as_str()),
        (Some("pending"), Some("no_capacity"))
    );
    assert!(second["node"].is_null());
    let second = id_of(&second);

    // Finishing the first frees the small node, and the second is placed.
    small.report(vec![exited(&first, 0)]).await?;
    small.wait_phase(&second, Phase::Run).await?;
    let placed = server.wait_for("default", &second, |s| s["node"] == "small").await?;
    assert!(placed["reason"].is_null(), "{placed}");

    // A node that registers takes what no node had room for.
    let third = server.create("default", json!({"resources": {"memory_mb": 2048}})).await?;
    assert_eq!(third["reason"], "no_capacity");
    let third = id_of(&third);
    let mut big =
        FakeNode::connect(&server, "big", capacity(8.0, 8192), "http://127.0.0.1:2").await?;
    big.wait_phase(&third, Phase::Run).await?;
    server.wait_for("default", &third, |s| s["node"] == "big" && s["reason"].is_null()).await?;
    Ok(())
}

#[tokio::test]
async fn nodes_need_the_node_token_and_registration() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let mut wrong = common::client(server.grpc, "not-the-token").await?;
    let request = RegisterRequest {
        node_id: "n".into(),
        capacity: Some(capacity(1.0, 1024)),
        proxy_url: "http://127.0.0.1:1".into(),
        version: String::new(),
        sandbox_max: None,
    };
    let status = wrong.register(request).await.expect_err("registered without the token");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    // A report from a node that never registered is refused on the stream.
    let mut client = common::client(server.grpc, &server.node_token).await?;
    let report = hutch_proto::node::NodeReport {
        node_id: "stranger".into(),
        capacity: None,
        sandboxes: vec![],
        sandbox_max: None,
    };
    let mut stream = client.sync(tokio_stream::iter(vec![report])).await?.into_inner();
    let answer =
        tokio::time::timeout(common::DEADLINE, stream.next()).await?.context("stream ended")?;
    assert_eq!(answer.expect_err("accepted a stranger").code(), tonic::Code::FailedPrecondition);
    Ok(())
}

#[tokio::test]
async fn events_stream_state_changes_until_terminal() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let mut node =
        FakeNode::connect(&server, "node-1", capacity(4.0, 4096), "http://127.0.0.1:1").await?;
    let id = id_of(&server.create("default", json!({"command": ["true"]})).await?);
    let response = server
        .http
        .get(format!("{}/{id}/events", server.sandboxes("default")))
        .bearer_auth(&server.admin_key)
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str()?.starts_with("text/event-stream"));
    node.wait_phase(&id, Phase::Run).await?;
    node.report(vec![observed(&id, ObservedPhase::ObservedCreating)]).await?;
    server.wait_state("default", &id, "creating").await?;
    node.report(vec![observed(&id, ObservedPhase::ObservedRunning)]).await?;
    server.wait_state("default", &id, "running").await?;
    node.report(vec![exited(&id, 0)]).await?;

    // The stream ends by itself after the terminal state.
    let body = tokio::time::timeout(common::DEADLINE, response.text()).await??;
    let states: Vec<String> = body
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .filter_map(|data| serde_json::from_str::<Value>(data.trim()).ok())
        .map(|sandbox| sandbox["state"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(body.contains("event: state"), "{body}");
    assert_eq!(states.first().map(String::as_str), Some("pending"), "{body}");
    assert_eq!(states.last().map(String::as_str), Some("completed"), "{body}");
    assert!(
        states.contains(&"creating".to_owned()) && states.contains(&"running".to_owned()),
        "{body}"
    );
    Ok(())
}

#[tokio::test]
async fn a_restarted_server_keeps_its_state() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let key = server.namespace_with_key("team").await?;
    let mut node =
        FakeNode::connect(&server, "node-1", capacity(4.0, 4096), "http://127.0.0.1:1").await?;
    let running = id_of(&server.create("team", json!({"tags": {"keep": "me"}})).await?);
    let done = id_of(&server.create("team", json!({"command": ["true"]})).await?);
    node.wait_desired(|state| desires(state, &running) && desires(state, &done)).await?;
    node.report(vec![observed(&running, ObservedPhase::ObservedRunning), exited(&done, 0)]).await?;
    server.wait_state("team", &done, "completed").await?;
    server.wait_state("team", &running, "running").await?;
    let idem = server
        .http
        .post(server.sandboxes("team"))
        .bearer_auth(&key)
        .header("Idempotency-Key", "once")
        .json(&json!({}))
        .send()
        .await?
        .json::<Value>()
        .await?;
    let before = server.get("team", &running).await?;
    drop(node);
    server.stop().await?;

    let server = TestServer::start(dir.path()).await?;
    let after = server.get("team", &running).await?;
    assert_eq!(after, before);
    assert_eq!(server.get("team", &done).await?["state"], "completed");
    // The namespace key, and the idempotency key, are remembered.
    let again = server
        .http
        .post(server.sandboxes("team"))
        .bearer_auth(&key)
        .header("Idempotency-Key", "once")
        .json(&json!({}))
        .send()
        .await?;
    assert_eq!(again.status(), 200);
    assert_eq!(id_of(&again.json().await?), id_of(&idem));
    // The node reconnects and gets its sandboxes back.
    let mut node =
        FakeNode::connect(&server, "node-1", capacity(4.0, 4096), "http://127.0.0.1:1").await?;
    node.wait_phase(&running, Phase::Run).await?;
    node.report(vec![observed(&running, ObservedPhase::ObservedRunning)]).await?;
    assert_eq!(server.get("team", &running).await?["state"], "running");
    Ok(())
}

/// `GET /v1/nodes/{id}` as admin, polled until `check` holds.
async fn wait_node(server: &TestServer, id: &str, check: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    loop {
        let node: Value =
            server.admin(Method::GET, &format!("/v1/nodes/{id}")).send().await?.json().await?;
        if check(&node) {
            return Ok(node);
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "node never matched: {node}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn nodes_show_their_capacity_and_what_is_placed_on_them() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let mut node =
        FakeNode::connect(&server, "node-1", capacity(4.0, 4096), "http://127.0.0.1:1").await?;

    let nodes: Value = server.admin(Method::GET, "/v1/nodes").send().await?.json().await?;
    let listed = nodes.as_array().context("not a list")?;
    assert_eq!(listed.len(), 1, "{nodes}");
    let fresh = &listed[0];
    assert_eq!(fresh["id"], "node-1");
    assert_eq!(fresh["state"], "ready");
    assert_eq!(fresh["proxy_url"], "http://127.0.0.1:1");
    assert_eq!(fresh["capacity"], json!({"cpus": 4.0, "memory_mb": 4096, "disk_mb": 100_000}));
    assert_eq!(fresh["allocated"], json!({"cpus": 0.0, "memory_mb": 0, "disk_mb": 0}));
    assert_eq!(fresh["sandboxes"], 0);
    assert!(fresh["last_seen_at"].as_str().is_some_and(|at| at.ends_with('Z')), "{fresh}");

    // A placement is reserved as soon as the create is answered.
    let big = json!({"resources": {"cpus": 0.5, "memory_mb": 1024, "disk_mb": 2048}});
    let first = id_of(&server.create("default", big).await?);
    let small = json!({"resources": {"cpus": 0.1, "memory_mb": 512, "disk_mb": 10}});
    let second = id_of(&server.create("default", small).await?);
    let placed = wait_node(&server, "node-1", |_| true).await?;
    assert_eq!(placed["allocated"], json!({"cpus": 0.6, "memory_mb": 1536, "disk_mb": 2058}));
    assert_eq!(placed["sandboxes"], 2);

    // A finished sandbox gives its reservation back.
    node.wait_desired(|state| desires(state, &first) && desires(state, &second)).await?;
    node.report(vec![exited(&first, 0), observed(&second, ObservedPhase::ObservedRunning)]).await?;
    let freed = wait_node(&server, "node-1", |node| node["sandboxes"] == 1).await?;
    assert_eq!(freed["allocated"], json!({"cpus": 0.1, "memory_mb": 512, "disk_mb": 10}));
    Ok(())
}

#[tokio::test]
async fn a_node_that_stops_reporting_is_shown_lost_until_it_returns() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let node =
        FakeNode::connect(&server, "node-1", capacity(4.0, 4096), "http://127.0.0.1:1").await?;
    wait_node(&server, "node-1", |node| node["state"] == "ready").await?;
    // node_timeout_ms is 1000 in tests.
    node.go_silent();
    let lost = wait_node(&server, "node-1", |node| node["state"] == "lost").await?;
    assert_eq!(lost["capacity"]["memory_mb"], 4096, "{lost}");
    let _node =
        FakeNode::connect(&server, "node-1", capacity(4.0, 4096), "http://127.0.0.1:1").await?;
    wait_node(&server, "node-1", |node| node["state"] == "ready").await?;
    Ok(())
}

#[tokio::test]
async fn nodes_are_for_the_admin_and_unknown_ones_are_not_found() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let key = server.namespace_with_key("team").await?;
    let _node =
        FakeNode::connect(&server, "node-1", capacity(4.0, 4096), "http://127.0.0.1:1").await?;
    for path in ["/v1/nodes", "/v1/nodes/node-1"] {
        let response = server.http.get(server.url(path)).bearer_auth(&key).send().await?;
        let (status, code, _) = error_of(response).await?;
        assert_eq!((status, code.as_str()), (403, "forbidden"), "{path}");
        let response = server.http.get(server.url(path)).send().await?;
        assert_eq!(response.status(), 401, "{path}");
    }
    let response = server.admin(Method::GET, "/v1/nodes/node-2").send().await?;
    let (status, code, message) = error_of(response).await?;
    assert_eq!((status, code.as_str()), (404, "not_found"));
    assert!(message.contains("node-2"), "{message}");
    Ok(())
}

#[tokio::test]
async fn after_a_restart_nodes_are_known_from_their_sandboxes_until_they_register() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // Long enough that the node cannot be declared lost during the test.
    let config = ServerConfig { node_timeout_ms: 60_000, ..common::test_config(dir.path()) };
    let server = TestServer::start_with(config.clone()).await?;
    let node =
        FakeNode::connect(&server, "node-1", capacity(4.0, 4096), "http://127.0.0.1:1").await?;
    server.create("default", json!({"resources": {"memory_mb": 256}})).await?;
    drop(node);
    server.stop().await?;

    let server = TestServer::start_with(config).await?;
    let waiting = wait_node(&server, "node-1", |_| true).await?;
    assert_eq!(waiting["state"], "unregistered", "{waiting}");
    assert_eq!(waiting["sandboxes"], 1);
    assert_eq!(waiting["allocated"]["memory_mb"], 256);
    assert!(waiting["proxy_url"].is_null() && waiting["last_seen_at"].is_null(), "{waiting}");
    let _node =
        FakeNode::connect(&server, "node-1", capacity(4.0, 4096), "http://127.0.0.1:1").await?;
    let back = wait_node(&server, "node-1", |node| node["state"] == "ready").await?;
    assert_eq!(back["proxy_url"], "http://127.0.0.1:1");
    Ok(())
}
