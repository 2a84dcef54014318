//! A sandbox may ask for no more than a node really has. Nodes overcommit their
//! capacity (limits are caps, most sandboxes idle), but one sandbox's limits are
//! bounded by the node's real cores and memory and by its operator's pids
//! maximum: asking for 16 TiB of memory or a million pids is a clear 400.

mod common;

use anyhow::Result;
use common::{FakeNode, TestServer, error_of};
use hutch_proto::node::{Phase, Resources};
use serde_json::{Value, json};

async fn create(server: &TestServer, body: Value) -> Result<(u16, String, String)> {
    let response = server
        .http
        .post(server.sandboxes("default"))
        .bearer_auth(&server.admin_key)
        .json(&body)
        .send()
        .await?;
    if response.status() == 201 {
        let sandbox: Value = response.json().await?;
        return Ok((201, String::new(), common::id_of(&sandbox)));
    }
    error_of(response).await
}

/// The attack: a tenant asks for far more than the node has, so that its limits
/// never bind (16 TiB of memory, a million pids) and it can take the node down.
#[tokio::test]
async fn limits_beyond_the_nodes_real_resources_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    // Overcommitted capacity, real resources of 4 cores and 8 GiB.
    let capacity = Resources { cpus: 256.0, memory_mb: 32768, disk_mb: 1 << 20, pids: 1 << 22 };
    let max = Resources { cpus: 4.0, memory_mb: 8192, disk_mb: 0, pids: 32768 };
    let mut node = FakeNode::connect_with_max(
        server.grpc,
        &server.node_token,
        "real",
        capacity,
        "http://127.0.0.1:1",
        Some(max),
    )
    .await?;

    for (resources, field) in [
        (json!({"memory_mb": 16u64 << 20}), "resources.memory_mb"),
        // Memory and disk share the node's memory.
        (json!({"memory_mb": 4096, "disk_mb": 5000}), "resources.memory_mb"),
        (json!({"cpus": 16}), "resources.cpus"),
        (json!({"pids": 1_000_000}), "resources.pids"),
    ] {
        let (status, code, message) = create(&server, json!({"resources": resources})).await?;
        assert_eq!((status, code.as_str()), (400, "invalid_field"), "{resources}: {message}");
        assert!(message.contains(field), "{resources}: {message}");
    }
    // What fits is placed.
    let (status, _, id) = create(
        &server,
        json!({"resources": {"cpus": 4, "memory_mb": 4096, "disk_mb": 4096, "pids": 32768}}),
    )
    .await?;
    assert_eq!(status, 201);
    node.wait_phase(&id, Phase::Run).await?;
    Ok(())
}
