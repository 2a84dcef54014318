//! The dataplane's proxy in front of real sandboxes: routing by header, path
//! and host, the proxy's own errors, sandboxd behind the node token, and
//! WebSockets. Runs as root.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hutch_proto::node::ObservedPhase;
use support::{DOMAIN, TOKEN, TestNode, new_id, request, run, spec};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn route(id: &str, port: u16) -> Vec<(&'static str, String)> {
    vec![("hutch-sandbox-id", id.to_owned()), ("hutch-sandbox-port", port.to_string())]
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn code(body: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    value["error"]["code"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exposed_port_is_reachable_by_header_path_and_host() -> anyhow::Result<()> {
    let mut node = TestNode::start("routes").await?;
    let id = new_id();
    let server = ["python3", "-m", "http.server", "8000"];
    node.server.set_desired(vec![run(spec(&id, &server, &[8000, 8002]))]);
    node.server.wait_phase(&id, ObservedPhase::ObservedRunning).await?;
    let proxy = node.proxy();

    // Python binds a moment after it starts; until then the port is unreachable.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (up, last) = loop {
        let last = request(proxy, "GET", "/", &route(&id, 8000), None).await?;
        if last.0 == 200 || std::time::Instant::now() > deadline {
            break (last.0 == 200, last);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(up, "python never answered: {last:?}");
    assert!(last.1.contains("Directory listing for /"), "{}", last.1);

    let (status, body) = request(proxy, "GET", &format!("/{id}/8000/etc/?x=1"), &[], None).await?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Directory listing for /etc/"), "{body}");

    let host = vec![("host", format!("8000-{id}.{DOMAIN}:{}", proxy.port()))];
    let (status, body) = request(proxy, "GET", "/etc/", &host, None).await?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Directory listing for /etc/"), "{body}");

    // The proxy's own answers.
    let (status, body) = request(proxy, "GET", "/", &route(&id, 8001), None).await?;
    assert_eq!((status, code(&body)), (403, "port_not_exposed".into()), "{body}");
    let (status, body) = request(proxy, "GET", "/", &route(&id, 8002), None).await?;
    assert_eq!((status, code(&body)), (502, "port_unreachable".into()), "{body}");
    let (status, body) = request(proxy, "GET", "/", &route(&new_id(), 8000), None).await?;
    assert_eq!((status, code(&body)), (404, "sandbox_not_found".into()), "{body}");
    let (status, body) = request(proxy, "GET", "/", &[], None).await?;
    assert_eq!((status, code(&body)), (400, "bad_route".into()), "{body}");
    let (status, body) = request(proxy, "GET", "/x/y/z", &[], None).await?;
    assert_eq!((status, code(&body)), (400, "bad_route".into()), "{body}");

    // sandboxd only with the node token.
    let (status, body) = request(proxy, "GET", "/health", &route(&id, 9501), None).await?;
    assert_eq!((status, code(&body)), (401, "unauthenticated".into()), "{body}");
    let mut wrong = route(&id, 9501);
    wrong.push(("hutch-node-token", format!("{TOKEN}x")));
    let (status, _) = request(proxy, "GET", "/health", &wrong, None).await?;
    assert_eq!(status, 401);
    let (status, body) = request(proxy, "GET", &format!("/{id}/9501/health"), &[], None).await?;
    assert_eq!(status, 401, "{body}");
    let (status, body) = node.sandboxd(&id, "GET", "/health", None).await?;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));

    // Proxy traffic is reported as activity.
    node.server.wait_for(&id, "active", |s| s.last_activity_ms > 0).await?;

    // The server goes away: the sandbox keeps running and the proxy serving.
    node.server.stop().await;
    let (status, body) = request(proxy, "GET", "/", &route(&id, 8000), None).await?;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = request(proxy, "GET", &format!("/{id}/8000/"), &[], None).await?;
    assert_eq!(status, 200, "{body}");
    let (status, _) = node.sandboxd(&id, "GET", "/health", None).await?;
    assert_eq!(status, 200);
    node.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_reaches_sandboxd_attach_through_the_proxy() -> anyhow::Result<()> {
    let node = TestNode::start("ws").await?;
    let id = new_id();
    node.server.set_desired(vec![run(spec(&id, &[], &[]))]);
    node.server.wait_phase(&id, ObservedPhase::ObservedRunning).await?;
    let start = serde_json::json!({ "command": "cat", "stdin": "pipe", "tag": "echo" });
    let (status, body) = node.sandboxd(&id, "POST", "/processes", Some(start)).await?;
    assert_eq!(status, 201, "{body}");

    let url = format!("ws://{}/{id}/9501/processes/echo/attach", node.proxy());
    let mut request = url.into_client_request()?;
    request.headers_mut().insert("hutch-node-token", TOKEN.parse()?);
    let (mut socket, response) = tokio_tungstenite::connect_async(request).await?;
    assert_eq!(response.status(), 101);

    socket.send(Message::Binary(b"hello through the proxy\n".to_vec().into())).await?;
    let mut output = Vec::new();
    while !output.ends_with(b"hello through the proxy\n") {
        let frame = tokio::time::timeout(support::WAIT, socket.next()).await?;
        match frame {
            Some(Ok(Message::Binary(data))) => {
                assert_eq!(data[0], 1, "stdout frame");
                output.extend_from_slice(&data[1..]);
            }
            Some(Ok(_)) => {}
            other => anyhow::bail!("socket ended early: {other:?}"),
        }
    }
    // Traffic on the open WebSocket counts as activity, not only its handshake.
    let after_first_echo = unix_ms();
    tokio::time::sleep(Duration::from_millis(5)).await;
    socket.send(Message::Binary(b"again\n".to_vec().into())).await?;
    node.server
        .wait_for(&id, "active during the session", |s| s.last_activity_ms > after_first_echo)
        .await?;

    socket.send(Message::Text(r#"{"type":"close_stdin"}"#.into())).await?;
    loop {
        let frame = tokio::time::timeout(support::WAIT, socket.next()).await?;
        match frame {
            Some(Ok(Message::Text(text))) if text.contains(r#""type":"exit""#) => {
                assert!(text.contains(r#""exit_code":0"#), "{text}");
                break;
            }
            Some(Ok(_)) => {}
            other => anyhow::bail!("socket ended before the exit frame: {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_are_served_over_h2c() -> anyhow::Result<()> {
    let node = TestNode::start("h2c").await?;
    let id = new_id();
    node.server.set_desired(vec![run(spec(&id, &[], &[]))]);
    node.server.wait_phase(&id, ObservedPhase::ObservedRunning).await?;
    let mut headers = route(&id, 9501);
    headers.push(("hutch-node-token", TOKEN.to_owned()));
    let (status, body) = support::request_h2(node.proxy(), "/health", &headers).await?;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    let (status, body) = support::request_h2(node.proxy(), "/", &[]).await?;
    assert_eq!((status, code(&body)), (400, "bad_route".into()), "{body}");
    Ok(())
}
