//! The REST API at its boundary: authentication, namespaces, validation,
//! idempotency, listing, and the error shape of everything malformed.

mod common;

use anyhow::Result;
use common::{TestServer, error_of, id_of};
use reqwest::Method;
use serde_json::{Value, json};

#[tokio::test]
async fn requests_without_a_valid_key_are_unauthenticated() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let response = server.http.get(server.sandboxes("default")).send().await?;
    assert_eq!(error_of(response).await?.0, 401);
    let response =
        server.http.get(server.sandboxes("default")).bearer_auth("hk_wrong").send().await?;
    let (status, code, _) = error_of(response).await?;
    assert_eq!((status, code.as_str()), (401, "unauthenticated"));
    // Health needs no key.
    let health: Value = server.http.get(server.url("/health")).send().await?.json().await?;
    assert_eq!(health, json!({"status": "ok"}));
    Ok(())
}

#[tokio::test]
async fn the_admin_key_is_stored_0600_and_survives_a_restart() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let first = server.admin_key.clone();
    let node_token = server.node_token.clone();
    server.stop().await?;
    for file in ["admin.key", "node.key"] {
        let mode = std::fs::metadata(dir.path().join(file))?.permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    assert_eq!(std::fs::read_to_string(dir.path().join("admin.key"))?.trim(), first);
    let server = TestServer::start(dir.path()).await?;
    assert_eq!(server.admin_key, first);
    assert_eq!(server.node_token, node_token);
    Ok(())
}

#[tokio::test]
async fn namespace_keys_are_confined_to_their_namespace() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let key_a = server.namespace_with_key("team-a").await?;
    let key_b = server.namespace_with_key("team-b").await?;

    // A namespace key is not admin.
    let response = server.http.get(server.url("/v1/namespaces")).bearer_auth(&key_a).send().await?;
    let (status, code, _) = error_of(response).await?;
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    let response = server
        .http
        .post(server.url("/v1/namespaces/team-a/keys"))
        .bearer_auth(&key_a)
        .send()
        .await?;
    assert_eq!(response.status(), 403);

    let created: Value = server
        .http
        .post(server.sandboxes("team-a"))
        .bearer_auth(&key_a)
        .json(&json!({}))
        .send()
        .await?
        .json()
        .await?;
    let id = id_of(&created);
    assert_eq!(created["namespace"], "team-a");

    // The other namespace's key sees nothing: 404 as if it did not exist.
    let url = format!("{}/{id}", server.sandboxes("team-a"));
    let (status, code, _) =
        error_of(server.http.get(&url).bearer_auth(&key_b).send().await?).await?;
    assert_eq!((status, code.as_str()), (404, "sandbox_not_found"));
    let response = server.http.delete(&url).bearer_auth(&key_b).send().await?;
    assert_eq!(response.status(), 404);
    let response = server.http.get(server.sandboxes("team-a")).bearer_auth(&key_b).send().await?;
    assert_eq!(error_of(response).await?.1, "namespace_not_found");
    // Asking for the sandbox through its own namespace path is just as blind.
    let other = format!("{}/{id}", server.sandboxes("team-b"));
    let (status, code, _) =
        error_of(server.http.get(&other).bearer_auth(&key_b).send().await?).await?;
    assert_eq!((status, code.as_str()), (404, "sandbox_not_found"));

    // Its own key and the admin key see it.
    assert_eq!(server.http.get(&url).bearer_auth(&key_a).send().await?.status(), 200);
    assert_eq!(server.http.get(&url).bearer_auth(&server.admin_key).send().await?.status(), 200);

    // A deleted key stops working.
    let key: Value =
        server.admin(Method::POST, "/v1/namespaces/team-a/keys").send().await?.json().await?;
    let secret = key["key"].as_str().unwrap_or_default().to_owned();
    assert_eq!(server.http.get(&url).bearer_auth(&secret).send().await?.status(), 200);
    let path = format!("/v1/namespaces/team-a/keys/{}", key["id"].as_str().unwrap_or_default());
    assert_eq!(server.admin(Method::DELETE, &path).send().await?.status(), 204);
    assert_eq!(server.http.get(&url).bearer_auth(&secret).send().await?.status(), 401);
    Ok(())
}

#[tokio::test]
async fn namespaces_are_created_once_and_listed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let response =
        server.admin(Method::POST, "/v1/namespaces").json(&json!({"name": "ml"})).send().await?;
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await?;
    assert_eq!(created["name"], "ml");
    let response =
        server.admin(Method::POST, "/v1/namespaces").json(&json!({"name": "ml"})).send().await?;
    assert_eq!(error_of(response).await?.1, "already_exists");
    let response = server
        .admin(Method::POST, "/v1/namespaces")
        .json(&json!({"name": "Bad Name"}))
        .send()
        .await?;
    let (status, code, message) = error_of(response).await?;
    assert_eq!((status, code.as_str()), (400, "invalid_field"));
    assert!(message.contains("name"), "{message}");
    let list: Vec<Value> = server.admin(Method::GET, "/v1/namespaces").send().await?.json().await?;
    let names: Vec<&str> = list.iter().filter_map(|ns| ns["name"].as_str()).collect();
    assert_eq!(names, ["default", "ml"]);
    let response = server.admin(Method::POST, "/v1/namespaces/nope/keys").send().await?;
    assert_eq!(error_of(response).await?.1, "namespace_not_found");
    Ok(())
}

#[tokio::test]
async fn create_fills_in_defaults() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let sandbox = server.create("default", json!({"tags": {"k": "v"}})).await?;
    assert_eq!(id_of(&sandbox).len(), 32);
    assert_eq!(sandbox["state"], "pending");
    assert_eq!(sandbox["reason"], "no_capacity");
    assert_eq!(sandbox["image"], "host");
    assert_eq!(
        sandbox["resources"],
        json!({"cpus": 1.0, "memory_mb": 512, "disk_mb": 1024, "pids": 512})
    );
    assert_eq!(sandbox["network"], json!({"egress": "none"}));
    assert_eq!(sandbox["tags"], json!({"k": "v"}));
    assert!(sandbox["deadline"].is_string());
    Ok(())
}

#[tokio::test]
async fn invalid_create_requests_name_the_field() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let cases = [
        (json!({"resources": {"cpus": 0}}), "resources.cpus"),
        (json!({"resources": {"memory_mb": "lots"}}), "resources.memory_mb"),
        (json!({"timeout_secs": 0}), "timeout_secs"),
        (json!({"timeout_secs": 86401}), "timeout_secs"),
        (json!({"idle_timeout_secs": -1}), "idle_timeout_secs"),
        (json!({"ports": [70000]}), "ports"),
        (json!({"ports": [80, 80]}), "ports[1]"),
        (json!({"network": {"egress": "everywhere"}}), "network.egress"),
        (json!({"working_dir": "relative"}), "working_dir"),
        (json!({"image": ""}), "image"),
        (json!({"command": [""]}), "command[0]"),
        (json!({"env": {"A=B": "x"}}), "env.A=B"),
        (json!({"tags": {"bad key": "x"}}), "tags.bad key"),
        (json!({"imagee": "host"}), "imagee"),
    ];
    for (body, field) in cases {
        let response = server
            .http
            .post(server.sandboxes("default"))
            .bearer_auth(&server.admin_key)
            .json(&body)
            .send()
            .await?;
        let (status, code, message) = error_of(response).await?;
        assert_eq!((status, code.as_str()), (400, "invalid_field"), "{body}: {message}");
        assert!(message.contains(field), "{body}: {message:?} does not name {field}");
    }
    Ok(())
}

#[tokio::test]
async fn malformed_and_oversized_bodies_get_clear_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let post = || server.http.post(server.sandboxes("default")).bearer_auth(&server.admin_key);

    let response =
        post().header("content-type", "application/json").body("{\"image\":").send().await?;
    assert_eq!(error_of(response).await?.1, "invalid_json");
    let response = post().header("content-type", "application/json").body("{nope").send().await?;
    let (status, code, _) = error_of(response).await?;
    assert_eq!((status, code.as_str()), (400, "invalid_json"));
    let response = post().header("content-type", "application/json").body("[1,2]").send().await?;
    assert_eq!(error_of(response).await?.1, "invalid_json");

    let response = post().header("content-type", "text/plain").body("{}").send().await?;
    let (status, code, _) = error_of(response).await?;
    assert_eq!((status, code.as_str()), (415, "unsupported_media_type"));

    let big = format!("{{\"tags\":{{\"k\":\"{}\"}}}}", "x".repeat(2 * 1024 * 1024));
    let response = post().header("content-type", "application/json").body(big).send().await?;
    let (status, code, _) = error_of(response).await?;
    assert_eq!((status, code.as_str()), (413, "payload_too_large"));

    let response = server.admin(Method::GET, "/v1/nothing-here").send().await?;
    let (status, code, _) = error_of(response).await?;
    assert_eq!((status, code.as_str()), (404, "not_found"));
    let response = server.admin(Method::PUT, "/v1/namespaces/default/sandboxes").send().await?;
    let (status, code, _) = error_of(response).await?;
    assert_eq!((status, code.as_str()), (405, "method_not_allowed"));
    let response =
        server.admin(Method::GET, "/v1/namespaces/default/sandboxes/0123/events").send().await?;
    assert_eq!(error_of(response).await?.1, "sandbox_not_found");
    let response =
        server.admin(Method::GET, "/v1/namespaces/default/sandboxes/%FF%FE").send().await?;
    let (status, code, _) = error_of(response).await?;
    assert_eq!((status, code.as_str()), (400, "bad_request"));
    let response =
        server.admin(Method::POST, "/v1/namespaces/default/sandboxes/0123/timeout").send().await?;
    assert_eq!(error_of(response).await?.1, "invalid_field");
    Ok(())
}

#[tokio::test]
async fn idempotency_keys_return_the_first_sandbox() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let post = |key: &str, body: Value| {
        server
            .http
            .post(server.sandboxes("default"))
            .bearer_auth(&server.admin_key)
            .header("Idempotency-Key", key)
            .json(&body)
    };
    let first = post("k1", json!({"tags": {"a": "1"}, "timeout_secs": 60})).send().await?;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await?;
    // Same body, keys in another order: the same sandbox, 200.
    let again = post("k1", json!({"timeout_secs": 60, "tags": {"a": "1"}})).send().await?;
    assert_eq!(again.status(), 200);
    assert_eq!(id_of(&again.json().await?), id_of(&first));
    let conflict = post("k1", json!({"timeout_secs": 61})).send().await?;
    let (status, code, _) = error_of(conflict).await?;
    assert_eq!((status, code.as_str()), (409, "idempotency_conflict"));
    let other = post("k2", json!({"tags": {"a": "1"}, "timeout_secs": 60})).send().await?;
    assert_eq!(other.status(), 201);
    assert_ne!(id_of(&other.json().await?), id_of(&first));
    Ok(())
}

#[tokio::test]
async fn list_filters_and_pages() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let mut ids = Vec::new();
    for i in 0..5 {
        let team = if i % 2 == 0 { "red" } else { "blue" };
        ids.push(id_of(
            &server.create("default", json!({"tags": {"team": team, "n": i.to_string()}})).await?,
        ));
    }
    let stopped = ids[0].clone();
    let response = server
        .admin(Method::POST, &format!("/v1/namespaces/default/sandboxes/{stopped}/stop"))
        .send()
        .await?;
    assert_eq!(response.status(), 202);
    let list = |query: &str| {
        let url = format!("{}?{query}", server.sandboxes("default"));
        let request = server.http.get(url).bearer_auth(&server.admin_key);
        async move { anyhow::Ok(request.send().await?.json::<Value>().await?) }
    };
    let ids_of = |list: &Value| -> Vec<String> {
        list["sandboxes"].as_array().map(|s| s.iter().map(id_of).collect()).unwrap_or_default()
    };

    // Stopped sandboxes are hidden unless asked for; newest first.
    let all = list("").await?;
    let expected: Vec<String> = ids[1..].iter().rev().cloned().collect();
    assert_eq!(ids_of(&all), expected);
    assert_eq!(ids_of(&list("include_stopped=true").await?).len(), 5);
    assert_eq!(ids_of(&list("state=terminated").await?), [stopped]);
    let red = list("tag=team=red&include_stopped=true").await?;
    assert_eq!(ids_of(&red), [ids[4].clone(), ids[2].clone(), ids[0].clone()]);
    assert_eq!(ids_of(&list("tag=team=red&tag=n=2").await?), [ids[2].clone()]);

    // Paging visits every sandbox exactly once.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let query = match &cursor {
            Some(cursor) => format!("include_stopped=true&limit=2&cursor={cursor}"),
            None => "include_stopped=true&limit=2".to_owned(),
        };
        let page = list(&query).await?;
        assert!(ids_of(&page).len() <= 2);
        seen.extend(ids_of(&page));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let expected_all: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(seen, expected_all);

    let bad = list("state=sleeping").await?;
    assert_eq!(bad["error"]["code"], "invalid_field");
    let bad = list("limit=100000").await?;
    assert_eq!(bad["error"]["code"], "invalid_field");
    Ok(())
}

#[tokio::test]
async fn unplaced_sandboxes_stop_and_delete_at_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let id = id_of(&server.create("default", json!({})).await?);
    let url = format!("{}/{id}", server.sandboxes("default"));
    let response = server
        .http
        .post(format!("{url}/stop"))
        .bearer_auth(&server.admin_key)
        .json(&json!({"grace_secs": 1}))
        .send()
        .await?;
    assert_eq!(response.status(), 202);
    let sandbox: Value = response.json().await?;
    assert_eq!(
        (sandbox["state"].as_str(), sandbox["reason"].as_str()),
        (Some("terminated"), Some("stopped"))
    );
    let response = server
        .http
        .post(format!("{url}/timeout"))
        .bearer_auth(&server.admin_key)
        .json(&json!({"timeout_secs": 10}))
        .send()
        .await?;
    assert_eq!(error_of(response).await?.1, "sandbox_not_running");

    let id = id_of(&server.create("default", json!({})).await?);
    let url = format!("{}/{id}", server.sandboxes("default"));
    let response = server.http.delete(&url).bearer_auth(&server.admin_key).send().await?;
    assert_eq!(response.status(), 202);
    let sandbox: Value = response.json().await?;
    assert_eq!(sandbox["reason"], "deleted");
    let response = server.http.get(&url).bearer_auth(&server.admin_key).send().await?;
    assert_eq!(response.status(), 404);
    Ok(())
}

#[tokio::test]
async fn timeout_sets_a_new_deadline_and_expiry_terminates() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    let id = id_of(&server.create("default", json!({"timeout_secs": 3600})).await?);
    let url = format!("{}/{id}/timeout", server.sandboxes("default"));
    let response = server
        .http
        .post(&url)
        .bearer_auth(&server.admin_key)
        .json(&json!({"timeout_secs": 1}))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let sandbox = server.wait_state("default", &id, "terminated").await?;
    assert_eq!(sandbox["reason"], "timeout");
    Ok(())
}

#[tokio::test]
async fn metrics_and_openapi_describe_the_server() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    server.create("default", json!({})).await?;
    let metrics = server.http.get(server.url("/metrics")).send().await?.text().await?;
    assert!(metrics.contains("hutch_sandboxes{state=\"pending\"} 1"), "{metrics}");
    assert!(metrics.contains("hutch_nodes{status=\"ready\"} 0"), "{metrics}");
    assert!(
        metrics.contains("hutch_http_requests_total{method=\"POST\",status=\"201\"} 1"),
        "{metrics}"
    );

    let openapi: Value = server.http.get(server.url("/openapi.json")).send().await?.json().await?;
    assert_eq!(openapi["openapi"], "3.1.0");
    let paths = openapi["paths"].as_object().cloned().unwrap_or_default();
    for path in [
        "/health",
        "/metrics",
        "/openapi.json",
        "/v1/namespaces",
        "/v1/namespaces/{ns}",
        "/v1/namespaces/{ns}/keys",
        "/v1/namespaces/{ns}/keys/{id}",
        "/v1/namespaces/{ns}/sandboxes",
        "/v1/namespaces/{ns}/sandboxes/{id}",
        "/v1/namespaces/{ns}/sandboxes/{id}/stop",
        "/v1/namespaces/{ns}/sandboxes/{id}/timeout",
        "/v1/namespaces/{ns}/sandboxes/{id}/events",
        "/v1/namespaces/{ns}/sandboxes/{id}/daemon/{path}",
        "/v1/images",
        "/v1/images/pull",
        "/v1/images/import",
        "/v1/images/{reference}",
        "/v1/nodes",
        "/v1/nodes/{id}",
    ] {
        assert!(paths.contains_key(path), "openapi.json does not list {path}");
    }
    Ok(())
}

#[tokio::test]
async fn finished_sandboxes_leave_the_api_after_the_history_period() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = hutch_server::ServerConfig { history_secs: 1, ..common::test_config(dir.path()) };
    let server = TestServer::start_with(config.clone()).await?;
    let kept = id_of(&server.create("default", json!({})).await?);
    let id = id_of(&server.create("default", json!({})).await?);
    let url = format!("{}/{id}", server.sandboxes("default"));
    server.http.post(format!("{url}/stop")).bearer_auth(&server.admin_key).send().await?;
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    while server.http.get(&url).bearer_auth(&server.admin_key).send().await?.status() != 404 {
        assert!(tokio::time::Instant::now() < deadline, "finished sandbox never left the API");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    server.stop().await?;
    let server = TestServer::start_with(config).await?;
    let list: Value = server
        .http
        .get(format!("{}?include_stopped=true", server.sandboxes("default")))
        .bearer_auth(&server.admin_key)
        .send()
        .await?
        .json()
        .await?;
    let ids: Vec<String> =
        list["sandboxes"].as_array().map(|s| s.iter().map(id_of).collect()).unwrap_or_default();
    assert_eq!(ids, [kept]);
    // New sandboxes still sort after every earlier one, forgotten ones too.
    let newest = id_of(&server.create("default", json!({})).await?);
    let list: Value = server
        .http
        .get(server.sandboxes("default"))
        .bearer_auth(&server.admin_key)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(list["sandboxes"][0]["id"], newest.as_str());
    Ok(())
}

/// The attack: an unauthenticated client sends requests with made-up methods
/// (any token is a valid HTTP method), each of which used to get a metrics series
/// of its own, growing the server's memory without bound.
#[tokio::test]
async fn made_up_methods_share_one_metrics_series() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = TestServer::start(dir.path()).await?;
    for i in 0..200 {
        let method = reqwest::Method::from_bytes(format!("HUTCH{i}").as_bytes())?;
        let _ = server.http.request(method, server.url("/v1/namespaces")).send().await?;
    }
    let metrics = server.http.get(server.url("/metrics")).send().await?.text().await?;
    assert!(!metrics.contains("HUTCH1"), "{metrics}");
    let series = metrics.lines().filter(|l| l.starts_with("hutch_http_requests_total{")).count();
    assert!(series < 10, "{metrics}");
    assert!(metrics.contains("method=\"other\""), "{metrics}");
    Ok(())
}

/// The database and the data dir hold tenants' environments and key hashes:
/// no other user of the host may read them, whatever the umask.
#[tokio::test]
async fn the_data_dir_and_the_database_are_the_owners_alone() -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    // A permissive umask for the duration of the test would race other tests;
    // an existing, open data dir and database show the same: they are tightened.
    std::fs::create_dir(&data)?;
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(data.join("hutch.db"), b"")?;
    std::fs::set_permissions(data.join("hutch.db"), std::fs::Permissions::from_mode(0o644))?;
    let server = TestServer::start(&data).await?;
    server.create("default", json!({})).await?;
    let mode = |name: &str| -> Result<u32> {
        Ok(std::fs::metadata(data.join(name))?.permissions().mode() & 0o777)
    };
    assert_eq!(mode("")?, 0o700);
    for name in ["hutch.db", "hutch.db-wal", "admin.key", "node.key"] {
        if data.join(name).exists() {
            assert_eq!(mode(name)?, 0o600, "{name}");
        }
    }
    Ok(())
}
