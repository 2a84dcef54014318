//! Bad requests get clear JSON errors with the right status, never a panic,
//! a hang or a 500.

mod support;

use serde_json::json;
use support::{Sandboxd, assert_error};

#[tokio::test]
async fn malformed_and_mistyped_json_is_invalid_json() {
    let sandboxd = Sandboxd::start();
    let send = |body: &'static str| {
        sandboxd
            .client
            .post(sandboxd.url("/exec"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for body in ["{", "[]", r#"{"command": 5}"#, r#"{"command":"true","bogus":1}"#, ""] {
        let response = send(body).await.unwrap();
        assert_eq!(response.status(), 400, "{body}");
        let error: serde_json::Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "invalid_json", "{body}");
    }
    let no_type = sandboxd
        .client
        .post(sandboxd.url("/exec"))
        .body(r#"{"command":"true"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(no_type.status(), 415);
}

#[tokio::test]
async fn unknown_processes_routes_and_methods() {
    let sandboxd = Sandboxd::start();
    assert_error(&sandboxd.get("/processes/999999").await, 404, "process_not_found");
    assert_error(&sandboxd.get("/processes/no-such-tag/output").await, 404, "process_not_found");
    assert_error(
        &sandboxd.post("/processes/424242/kill", json!(null)).await,
        404,
        "process_not_found",
    );
    assert_error(&sandboxd.get("/nowhere").await, 404, "not_found");
    assert_error(&sandboxd.delete("/health").await, 405, "method_not_allowed");
}

#[tokio::test]
async fn bad_process_requests() {
    let sandboxd = Sandboxd::start();
    assert_error(
        &sandboxd.post("/exec", json!({"command": "/no/such/binary"})).await,
        400,
        "spawn_failed",
    );
    assert_error(&sandboxd.post("/exec", json!({"command": ""})).await, 400, "bad_request");
    assert_error(
        &sandboxd.post("/exec", json!({"command": "true", "working_dir": "rel"})).await,
        400,
        "invalid_path",
    );
    assert_error(
        &sandboxd.post("/exec", json!({"command": "true", "working_dir": "/no/such/dir"})).await,
        404,
        "file_not_found",
    );
    assert_error(
        &sandboxd.post("/exec", json!({"command": "true", "user": "nosuchuser"})).await,
        400,
        "unknown_user",
    );
    assert_error(
        &sandboxd.post("/processes", json!({"command": "true", "tag": "12345"})).await,
        400,
        "bad_request",
    );
    assert_error(
        &sandboxd.post("/processes", json!({"command": "true", "tag": "bad/tag"})).await,
        400,
        "bad_request",
    );
    assert_error(
        &sandboxd
            .post("/processes", json!({"command": "true", "pty": {"rows": 0, "cols": 5}}))
            .await,
        400,
        "bad_request",
    );
    assert_error(
        &sandboxd
            .post("/exec", json!({"command": "cat", "stdin": "%%%", "stdin_encoding": "base64"}))
            .await,
        400,
        "bad_request",
    );
    let pid = sandboxd.start_process(json!({"command": "sleep", "args": ["30"]})).await;
    assert_error(
        &sandboxd.post(&format!("/processes/{pid}/resize"), json!({"rows": 5, "cols": 5})).await,
        409,
        "not_a_terminal",
    );
    assert_error(
        &sandboxd.post(&format!("/processes/{pid}/stdin/close"), json!(null)).await,
        409,
        "stdin_closed",
    );
    assert_error(
        &sandboxd.get(&format!("/processes/{pid}/output?offset=-1")).await,
        400,
        "invalid_query",
    );
    sandboxd.post(&format!("/processes/{pid}/kill"), json!(null)).await;
}

#[tokio::test]
async fn oversized_headers_are_refused_with_431() {
    let sandboxd = Sandboxd::start();
    let response = sandboxd
        .client
        .get(sandboxd.url("/health"))
        .header("x-huge", "a".repeat(100 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 431);
    // The daemon is still there.
    assert_eq!(sandboxd.get("/health").await.0, 200);
}
