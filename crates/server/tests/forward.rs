//! Daemon and image routes: the server forwards to the owning node's proxy
//! with the node token. The proxy here is a small HTTP server standing in
//! for the dataplane's, recording what it was sent.

mod common;

use std::sync::{Arc, Mutex};

use anyhow::Result;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::response::IntoResponse;
use axum::routing::{any, delete, get, post};
use common::{FakeNode, TestServer, capacity, exited, id_of, observed, test_config};
use hutch_proto::node::{ObservedPhase, Phase};
use serde_json::{Value, json};

#[derive(Clone, Default)]
struct Seen {
    requests: Arc<Mutex<Vec<Value>>>,
}

impl Seen {
    fn all(&self) -> Vec<Value> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

#[derive(Clone)]
struct Proxy {
    seen: Seen,
    token: String,
}

/// Echoes a request forwarded to sandboxd, if it carries the node token
/// and not the user's key.
async fn echo(State(proxy): State<Proxy>, request: Request) -> axum::response::Response {
    // A block, so no borrow of the (non-Sync) request lives across the await.
    let mut record = {
        let header = |name: &str| {
            request.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
        };
        if header("hutch-node-token") != proxy.token
            || request.headers().contains_key("authorization")
        {
            return (http::StatusCode::FORBIDDEN, "bad token").into_response();
        }
        json!({
            "method": request.method().as_str(),
            "uri": request.uri().to_string(),
            "sandbox": header("hutch-sandbox-id"),
            "port": header("hutch-sandbox-port"),
            "host": header("host"),
        })
    };
    let body = axum::body::to_bytes(request.into_body(), 1 << 20).await.unwrap_or_default();
    record["body"] = json!(String::from_utf8_lossy(&body));
    if let Ok(mut requests) = proxy.seen.requests.lock() {
        requests.push(record.clone());
    }
    axum::Json(record).into_response()
}

/// Upgrades to a WebSocket that echoes every message back, upper-cased.
async fn websocket_echo(
    State(proxy): State<Proxy>,
    headers: http::HeaderMap,
    upgrade: axum::extract::ws::WebSocketUpgrade,
) -> axum::response::Response {
    if headers.get("hutch-node-token").and_then(|v| v.to_str().ok()) != Some(proxy.token.as_str()) {
        return http::StatusCode::FORBIDDEN.into_response();
    }
    upgrade.on_upgrade(|mut socket| async move {
        use axum::extract::ws::Message;
        while let Some(Ok(message)) = socket.recv().await {
            let reply = match message {
                Message::Text(text) => Message::Text(text.to_uppercase().into()),
                Message::Binary(data) => Message::Binary(data),
                Message::Close(_) => break,
                _ => continue,
            };
            if socket.send(reply).await.is_err() {
                break;
            }
        }
    })
}

/// The stand-in proxy: answers sandboxd routes with an echo of the request
/// and the node image API with fixed data named after `node`.
async fn start_proxy(node: &'static str, token: String) -> Result<(String, Seen)> {
    let seen = Seen::default();
    let images = move || {
        json!([{"reference": format!("{node}/only"), "digest": format!("sha256:{node}"), "size_bytes": 1, "created_at": "x"},
               {"reference": "shared", "digest": "sha256:shared", "size_bytes": 2, "created_at": "x"}])
    };
    let app = Router::new()
        .route("/ws", get(websocket_echo))
        .route("/v1/node/images", get(move || async move { axum::Json(images()) }))
        .route(
            "/v1/node/images/pull",
            post(move |body: Bytes| async move {
                let request: Value = serde_json::from_slice(&body).unwrap_or_default();
                let lines = format!(
                    "{}\n{}\n",
                    json!({"status": "resolving"}),
                    json!({"status": "done", "image": {"reference": request["reference"], "digest": format!("sha256:{node}"), "size_bytes": 1, "created_at": "x"}})
                );
                ([("content-type", "application/x-ndjson")], lines)
            }),
        )
        .route(
            "/v1/node/images/import",
            post(move |body: Bytes| async move {
                let image = json!({"reference": format!("imported-{}", body.len()), "digest": "sha256:imp", "size_bytes": body.len(), "created_at": "x"});
                (http::StatusCode::CREATED, axum::Json(json!([image])))
            }),
        )
        .route(
            "/v1/node/images/{reference}",
            delete(move |Path(reference): Path<String>| async move {
                if reference == "shared" || reference == format!("{node}/only") {
                    http::StatusCode::NO_CONTENT.into_response()
                } else {
                    (http::StatusCode::NOT_FOUND, axum::Json(json!({"error": {"code": "image_not_found", "message": reference}})))
                        .into_response()
                }
            }),
        )
        .fallback(any(echo))
        .with_state(Proxy { seen: seen.clone(), token });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, seen))
}

#[tokio::test]
async fn daemon_calls_wait_for_the_sandbox_then_reach_its_node() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let (proxy, seen) = start_proxy("n1", server.node_token.clone()).await?;
    let mut node = FakeNode::connect(&server, "node-1", capacity(4.0, 4096), &proxy).await?;
    let id = id_of(&server.create("default", json!({"command": ["sleep", "1"]})).await?);

    // Sent while the sandbox is still pending: it waits instead of failing.
    let url =
        format!("{}/{id}/daemon/processes/main/wait?timeout_ms=5", server.sandboxes("default"));
    let call = server.http.post(&url).bearer_auth(&server.admin_key).body("hello").send();
    let call = tokio::spawn(call);
    node.wait_phase(&id, Phase::Run).await?;
    node.report(vec![observed(&id, ObservedPhase::ObservedRunning)]).await?;
    let response = call.await??;
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await?;
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["uri"], "/processes/main/wait?timeout_ms=5");
    assert_eq!(echo["sandbox"], id.as_str());
    assert_eq!(echo["port"], "9501");
    assert_eq!(echo["body"], "hello");
    assert_eq!(echo["host"], proxy.trim_start_matches("http://"));

    // Finished: reads still work during retention, anything else is refused.
    node.report(vec![exited(&id, 0)]).await?;
    server.wait_state("default", &id, "completed").await?;
    let logs = format!("{}/{id}/daemon/processes/main/output", server.sandboxes("default"));
    let response = server.http.get(&logs).bearer_auth(&server.admin_key).send().await?;
    assert_eq!(response.status(), 200);
    let response = server.http.post(&url).bearer_auth(&server.admin_key).send().await?;
    assert_eq!(response.status(), 409);
    let error: Value = response.json().await?;
    assert_eq!(error["error"]["code"], "sandbox_not_running");
    assert_eq!(error["error"]["state"], "completed");
    assert_eq!(seen.all().len(), 2);
    Ok(())
}

#[tokio::test]
async fn websockets_pass_through_the_daemon_route() -> Result<()> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let (proxy, _) = start_proxy("n1", server.node_token.clone()).await?;
    let mut node = FakeNode::connect(&server, "node-1", capacity(4.0, 4096), &proxy).await?;
    let id = id_of(&server.create("default", json!({})).await?);
    node.wait_phase(&id, Phase::Run).await?;
    node.report(vec![observed(&id, ObservedPhase::ObservedRunning)]).await?;

    let url = format!("ws://{}/v1/namespaces/default/sandboxes/{id}/daemon/ws", server.api);
    let mut request = url.into_client_request()?;
    request.headers_mut().insert("authorization", format!("Bearer {}", server.admin_key).parse()?);
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
    socket.send(Message::text("shell says hi")).await?;
    let reply = tokio::time::timeout(common::DEADLINE, socket.next()).await?;
    assert_eq!(reply.transpose()?, Some(Message::text("SHELL SAYS HI")));
    socket.send(Message::binary(vec![0u8, 1, 2])).await?;
    let reply = tokio::time::timeout(common::DEADLINE, socket.next()).await?;
    assert_eq!(reply.transpose()?, Some(Message::binary(vec![0u8, 1, 2])));
    Ok(())
}

#[tokio::test]
async fn daemon_calls_give_up_on_a_sandbox_that_never_runs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start_with(hutch_server::ServerConfig {
        daemon_wait_secs: 1,
        ..test_config(dir.path())
    })
    .await?;
    let id = id_of(&server.create("default", json!({})).await?);
    let url = format!("{}/{id}/daemon/health", server.sandboxes("default"));
    let response = server.http.get(&url).bearer_auth(&server.admin_key).send().await?;
    assert_eq!(response.status(), 409);
    let error: Value = response.json().await?;
    assert_eq!(
        (error["error"]["state"].as_str(), error["error"]["reason"].as_str()),
        (Some("pending"), Some("no_capacity"))
    );

    // Another namespace's key cannot reach it at all.
    let key = server.namespace_with_key("other").await?;
    let response = server.http.get(&url).bearer_auth(&key).send().await?;
    assert_eq!(response.status(), 404);
    Ok(())
}

#[tokio::test]
async fn image_routes_reach_every_node() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let images = server.url("/v1/images");
    let response = server.http.get(&images).bearer_auth(&server.admin_key).send().await?;
    assert_eq!(response.status(), 503);

    let (proxy1, _) = start_proxy("n1", server.node_token.clone()).await?;
    let (proxy2, _) = start_proxy("n2", server.node_token.clone()).await?;
    let _n1 = FakeNode::connect(&server, "n1", capacity(1.0, 1024), &proxy1).await?;
    let _n2 = FakeNode::connect(&server, "n2", capacity(1.0, 1024), &proxy2).await?;
    let key = server.namespace_with_key("users").await?;

    let list: Vec<Value> = server.http.get(&images).bearer_auth(&key).send().await?.json().await?;
    let mut references: Vec<&str> =
        list.iter().filter_map(|image| image["reference"].as_str()).collect();
    references.sort();
    assert_eq!(references, ["n1/only", "n2/only", "shared"]);

    let response = server
        .http
        .post(server.url("/v1/images/pull"))
        .bearer_auth(&key)
        .json(&json!({"reference": "docker.io/library/busybox:latest"}))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let text = response.text().await?;
    let lines: Vec<Value> =
        text.lines().filter_map(|line| serde_json::from_str(line).ok()).collect();
    assert_eq!(lines.first().map(|l| l["status"].clone()), Some(json!("resolving")), "{text}");
    assert_eq!(
        lines.last().map(|l| l["image"]["reference"].clone()),
        Some(json!("docker.io/library/busybox:latest"))
    );

    let tarball = vec![7u8; 300_000];
    let response = server
        .http
        .post(server.url("/v1/images/import"))
        .bearer_auth(&key)
        .header("content-type", "application/x-tar")
        .body(tarball)
        .send()
        .await?;
    assert_eq!(response.status(), 201);
    let imported: Vec<Value> = response.json().await?;
    assert_eq!(imported.len(), 1);
    assert_eq!(imported[0]["reference"], "imported-300000");

    let response =
        server.http.delete(server.url("/v1/images/shared")).bearer_auth(&key).send().await?;
    assert_eq!(response.status(), 403);
    let response = server
        .http
        .delete(server.url("/v1/images/n1%2Fonly"))
        .bearer_auth(&server.admin_key)
        .send()
        .await?;
    assert_eq!(response.status(), 204);
    let response = server
        .http
        .delete(server.url("/v1/images/missing"))
        .bearer_auth(&server.admin_key)
        .send()
        .await?;
    assert_eq!(response.status(), 404);
    Ok(())
}
