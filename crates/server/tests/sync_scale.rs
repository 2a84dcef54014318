//! The Sync protocol under the attack of one tenant with huge specs, and at the
//! scale of a full node: a node's messages stay small however many sandboxes it
//! runs and however large their specs are.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Result, bail};
use common::{FakeNode, TestServer, capacity, error_of, observed};
use hutch_proto::node::{ObservedPhase, Phase};
use prost::Message as _;
use serde_json::json;

/// The attack: five creates with about 1 MiB of env each made the node's desired
/// state larger than the 4 MiB a gRPC message may be, so every Sync stream of the
/// node broke, forever, and no create, stop or timeout reached it again. Specs
/// are now bounded at create, with a clear 400.
#[tokio::test]
async fn a_spec_larger_than_the_bounds_is_refused_at_create() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let mut node =
        FakeNode::connect(&server, "node-1", capacity(64.0, 1 << 20), "http://127.0.0.1:1").await?;
    for _ in 0..5 {
        let response = server
            .http
            .post(server.sandboxes("default"))
            .bearer_auth(&server.admin_key)
            .json(&json!({"env": {"BLOB": "x".repeat(1000 * 1024)}}))
            .send()
            .await?;
        let (status, code, message) = error_of(response).await?;
        assert_eq!((status, code.as_str()), (400, "invalid_field"), "{message}");
        assert!(message.contains("env:"), "{message}");
    }
    let response = server
        .http
        .post(server.sandboxes("default"))
        .bearer_auth(&server.admin_key)
        .json(&json!({"command": ["sh", "-c", "y".repeat(200 * 1024)]}))
        .send()
        .await?;
    let (status, code, message) = error_of(response).await?;
    assert_eq!((status, code.as_str()), (400, "invalid_field"), "{message}");
    // The node is still served.
    let sandbox = server.create("default", json!({})).await?;
    let id = common::id_of(&sandbox);
    node.wait_phase(&id, Phase::Run).await?;
    Ok(())
}

/// 1,000 sandboxes with 64 KiB specs each: 64 MiB of specs for one node, more
/// than sixteen times what one message may carry. Every sandbox reaches its node,
/// every message stays below the default 4 MiB limit of the fake node's client,
/// and once the node has reported them all, a message is just ids and phases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sandboxes_with_64_kib_specs_reach_their_node() -> Result<()> {
    const COUNT: usize = 1000;
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let room = hutch_proto::node::Resources {
        cpus: 100_000.0,
        memory_mb: 1 << 30,
        disk_mb: 1 << 30,
        pids: 1 << 30,
    };
    let mut node = FakeNode::connect(&server, "big", room, "http://127.0.0.1:1").await?;

    // Create them all, a few at a time.
    let blob = "v".repeat(64 * 1024 - 64);
    let mut ids = BTreeSet::new();
    let mut creates = futures_util::stream::iter(0..COUNT)
        .map(|i| {
            let server = &server;
            let blob = &blob;
            async move {
                let body = json!({"env": {"BLOB": blob, "N": i.to_string()}, "timeout_secs": 3600});
                server.create("default", body).await
            }
        })
        .buffer_unordered(16);
    use futures_util::StreamExt as _;
    while let Some(sandbox) = creates.next().await {
        ids.insert(common::id_of(&sandbox?));
    }
    assert_eq!(ids.len(), COUNT);

    // Act as a node: take in the specs, report every sandbox it has, running.
    let mut specs: BTreeMap<String, usize> = BTreeMap::new();
    let mut largest = 0;
    let mut messages = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let state = match tokio::time::timeout_at(deadline, node.next_desired()).await {
            Ok(state) => state?,
            Err(_) => bail!("only {} of {COUNT} specs arrived", specs.len()),
        };
        messages += 1;
        largest = largest.max(state.encoded_len());
        for sandbox in &state.sandboxes {
            if let Some(spec) = &sandbox.spec {
                assert_eq!(spec.id, sandbox.id);
                assert_eq!(spec.env.get("BLOB").map(String::len), Some(blob.len()));
                specs.insert(spec.id.clone(), spec.encoded_len());
            }
        }
        let everything_named = state.sandboxes.len() == COUNT;
        node.report(specs.keys().map(|id| observed(id, ObservedPhase::ObservedRunning)).collect())
            .await?;
        if everything_named && specs.len() == COUNT {
            break;
        }
    }
    assert_eq!(specs.keys().cloned().collect::<BTreeSet<_>>(), ids);
    assert!(largest < 4 << 20, "a message of {largest} bytes");
    assert!(messages >= 64 * COUNT / 1024, "64 MiB of specs in {messages} messages?");

    // Every sandbox is running as the server sees it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let list: serde_json::Value = server
            .admin(
                reqwest::Method::GET,
                "/v1/namespaces/default/sandboxes?state=running&limit=1000",
            )
            .send()
            .await?
            .json()
            .await?;
        let running = list["sandboxes"].as_array().map_or(0, Vec::len);
        if running == COUNT {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{running} of {COUNT} running");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A change now sends ids and phases only: well under 100 KiB for the node.
    let first = ids.iter().next().unwrap().clone();
    let response = server
        .admin(reqwest::Method::POST, &format!("/v1/namespaces/default/sandboxes/{first}/stop"))
        .json(&json!({"grace_secs": 1}))
        .send()
        .await?;
    assert_eq!(response.status(), 202);
    let stopping = node.wait_phase(&first, Phase::Stop).await?;
    assert!(stopping.sandboxes.iter().all(|s| s.spec.is_none()));
    assert!(stopping.encoded_len() < 100 * 1024, "{} bytes", stopping.encoded_len());
    Ok(())
}
