//! Deleting a namespace: its sandboxes stop with reason `namespace_deleted`,
//! its keys stop working at once, other namespaces are untouched, and the
//! name can be used again.

mod common;

use anyhow::{Context, Result};
use common::{FakeNode, TestServer, capacity, desires, error_of, id_of, observed};
use hutch_proto::node::{ObservedPhase, Phase};
use reqwest::Method;
use serde_json::{Value, json};

async fn namespace_names(server: &TestServer) -> Result<Vec<String>> {
    let list: Vec<Value> = server.admin(Method::GET, "/v1/namespaces").send().await?.json().await?;
    Ok(list.iter().filter_map(|ns| ns["name"].as_str().map(str::to_owned)).collect())
}

#[tokio::test]
async fn deleting_a_namespace_terminates_its_sandboxes_and_revokes_its_keys() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let key_a = server.namespace_with_key("team-a").await?;
    let key_b = server.namespace_with_key("team-b").await?;
    let mut node =
        FakeNode::connect(&server, "node-1", capacity(4.0, 4096), "http://127.0.0.1:1").await?;
    let doomed = id_of(&server.create("team-a", json!({})).await?);
    let kept = id_of(&server.create("team-b", json!({})).await?);
    node.wait_desired(|state| desires(state, &doomed) && desires(state, &kept)).await?;
    let running = vec![
        observed(&doomed, ObservedPhase::ObservedRunning),
        observed(&kept, ObservedPhase::ObservedRunning),
    ];
    node.report(running).await?;
    server.wait_state("team-a", &doomed, "running").await?;
    server.wait_state("team-b", &kept, "running").await?;
    // Its events stream, opened before, shows how the sandbox ends.
    let events = server
        .http
        .get(format!("{}/{doomed}/events", server.sandboxes("team-a")))
        .bearer_auth(&key_a)
        .send()
        .await?;
    assert_eq!(events.status(), 200);

    let response = server.admin(Method::DELETE, "/v1/namespaces/team-a").send().await?;
    assert_eq!(response.status(), 202);
    let deleted: Value = response.json().await?;
    assert_eq!(deleted["name"], "team-a");
    assert!(deleted["created_at"].is_string(), "{deleted}");

    // At once: its key is refused and the namespace is not listed.
    let response = server.http.get(server.sandboxes("team-a")).bearer_auth(&key_a).send().await?;
    let (status, code, _) = error_of(response).await?;
    assert_eq!((status, code.as_str()), (401, "unauthenticated"));
    assert_eq!(namespace_names(&server).await?, ["default", "team-b"]);
    let response = server.admin(Method::GET, "/v1/namespaces/team-a/sandboxes").send().await?;
    assert_eq!(error_of(response).await?.1, "namespace_not_found");

    // The node is asked to stop the sandbox; once it did, the sandbox is
    // terminated with reason namespace_deleted and no longer desired.
    node.wait_phase(&doomed, Phase::Stop).await?;
    node.report(vec![
        observed(&doomed, ObservedPhase::ObservedStopped),
        observed(&kept, ObservedPhase::ObservedRunning),
    ])
    .await?;
    let body = tokio::time::timeout(common::DEADLINE, events.text()).await??;
    let last: Value = body
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .filter_map(|data| serde_json::from_str(data.trim()).ok())
        .next_back()
        .context("no events")?;
    assert_eq!(
        (last["state"].as_str(), last["reason"].as_str()),
        (Some("terminated"), Some("namespace_deleted")),
        "{body}"
    );
    node.wait_desired(|state| !desires(state, &doomed)).await?;

    // The other namespace is untouched.
    assert!(node.latest.sandboxes.iter().all(|s| s.phase == Phase::Run as i32));
    let url = format!("{}/{kept}", server.sandboxes("team-b"));
    let sandbox: Value = server.http.get(&url).bearer_auth(&key_b).send().await?.json().await?;
    assert_eq!(sandbox["state"], "running");

    // The name can be used again, and starts empty.
    let response = server
        .admin(Method::POST, "/v1/namespaces")
        .json(&json!({"name": "team-a"}))
        .send()
        .await?;
    assert_eq!(response.status(), 201);
    let list: Value = server
        .admin(Method::GET, "/v1/namespaces/team-a/sandboxes?include_stopped=true")
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(list["sandboxes"], json!([]), "{list}");
    let response = server.http.get(server.sandboxes("team-a")).bearer_auth(&key_a).send().await?;
    assert_eq!(response.status(), 401, "an old key works in the new namespace");
    let fresh = id_of(&server.create("team-a", json!({})).await?);
    node.wait_phase(&fresh, Phase::Run).await?;
    Ok(())
}

#[tokio::test]
async fn a_deleted_namespace_stays_deleted_after_a_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let key = server.namespace_with_key("gone").await?;
    // Never placed (no node), so it ends at once.
    let pending = id_of(&server.create("gone", json!({"idle_timeout_secs": 60})).await?);
    let response = server
        .http
        .post(server.sandboxes("gone"))
        .bearer_auth(&key)
        .header("Idempotency-Key", "once")
        .json(&json!({}))
        .send()
        .await?;
    assert_eq!(response.status(), 201);
    let first = id_of(&response.json().await?);
    assert_eq!(server.admin(Method::DELETE, "/v1/namespaces/gone").send().await?.status(), 202);
    server.stop().await?;

    let server = TestServer::start(dir.path()).await?;
    assert_eq!(namespace_names(&server).await?, ["default"]);
    let response = server.http.get(server.sandboxes("gone")).bearer_auth(&key).send().await?;
    assert_eq!(response.status(), 401);
    server.namespace_with_key("gone").await?;
    let response = server
        .admin(Method::GET, &format!("/v1/namespaces/gone/sandboxes/{pending}"))
        .send()
        .await?;
    assert_eq!(error_of(response).await?.1, "sandbox_not_found");
    // Idempotency keys went with the namespace.
    let again = server
        .http
        .post(server.sandboxes("gone"))
        .header("Idempotency-Key", "once")
        .bearer_auth(&server.admin_key)
        .json(&json!({}))
        .send()
        .await?;
    assert_eq!(again.status(), 201);
    assert_ne!(id_of(&again.json().await?), first);
    Ok(())
}

#[tokio::test]
async fn namespace_delete_refuses_strangers_unknown_names_and_default() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let key = server.namespace_with_key("team").await?;

    let response =
        server.http.delete(server.url("/v1/namespaces/team")).bearer_auth(&key).send().await?;
    let (status, code, _) = error_of(response).await?;
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    let response = server.http.delete(server.url("/v1/namespaces/team")).send().await?;
    assert_eq!(response.status(), 401);

    let response = server.admin(Method::DELETE, "/v1/namespaces/nope").send().await?;
    let (status, code, _) = error_of(response).await?;
    assert_eq!((status, code.as_str()), (404, "namespace_not_found"));

    let response = server.admin(Method::DELETE, "/v1/namespaces/default").send().await?;
    let (status, code, message) = error_of(response).await?;
    assert_eq!((status, code.as_str()), (409, "namespace_reserved"));
    assert!(message.contains("default"), "{message}");
    assert_eq!(namespace_names(&server).await?, ["default", "team"]);
    Ok(())
}
