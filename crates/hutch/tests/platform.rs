//! The platform end to end: the real `hutch up` binary, real sandboxes, the
//! REST API as users see it.

mod platform_support;
use platform_support as support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{DEADLINE, Platform};

const NS: &str = "default";

fn path(id: &str, rest: &str) -> String {
    format!("/v1/namespaces/{NS}/sandboxes/{id}{rest}")
}

#[test]
fn a_sandbox_runs_commands_holds_files_and_stops_with_a_reason() {
    let platform = Platform::up();
    let api = platform.client();
    let id = api.create(NS, json!({"tags": {"suite": "e2e"}}));

    // Exec right after create: the server waits for the sandbox to run.
    let result = api.exec(NS, &id, "sh", &["-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(result["exit_code"], 7, "{result}");
    assert_eq!(result["stdout"], "out\n");
    assert_eq!(result["stderr"], "err\n");
    assert_eq!(api.sandbox(NS, &id)["state"], "running");

    // Output streams live through the daemon route as server-sent events.
    let (status, process) = api.post(
        &path(&id, "/daemon/processes"),
        json!({"command": "sh", "args": ["-c", "for i in 1 2 3; do echo line $i; done"], "tag": "lines"}),
    );
    assert_eq!(status, 201, "{process}");
    let events = api
        .request(reqwest::Method::GET, &path(&id, "/daemon/processes/lines/output/stream"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(events.contains("event: exit"), "{events}");

    // Files go in and come out byte for byte, binary included.
    let payload: Vec<u8> = (0..=255u8).cycle().take(3 << 20).collect();
    let put = api
        .request(reqwest::Method::PUT, &path(&id, "/daemon/files?path=/tmp/blob.bin"))
        .body(payload.clone())
        .send()
        .unwrap();
    assert_eq!(put.status(), 200);
    let got = api
        .request(reqwest::Method::GET, &path(&id, "/daemon/files?path=/tmp/blob.bin"))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert!(got.as_ref() == payload.as_slice(), "downloaded file differs");

    // Stop: terminated with reason `stopped`, listed with it, daemon calls refused.
    let (status, _) = api.post(&path(&id, "/stop"), json!({"grace_secs": 1}));
    assert_eq!(status, 202);
    let sandbox = api.wait_state(NS, &id, "terminated", DEADLINE);
    assert_eq!(sandbox["reason"], "stopped");
    let (_, list) = api.get(&format!("/v1/namespaces/{NS}/sandboxes?include_stopped=true"));
    let listed = list["sandboxes"].as_array().unwrap().iter().find(|s| s["id"] == id.as_str());
    assert_eq!(listed.unwrap()["reason"], "stopped");
    let (_, running) = api.get(&format!("/v1/namespaces/{NS}/sandboxes"));
    assert!(running["sandboxes"].as_array().unwrap().iter().all(|s| s["id"] != id.as_str()));
    let (status, error) = api.post(&path(&id, "/daemon/exec"), json!({"command": "true"}));
    assert_eq!(status, 409, "{error}");
    assert_eq!(error["error"]["code"], "sandbox_not_running");
}

#[test]
fn a_command_that_exits_completes_the_sandbox_with_its_exit_code() {
    let platform = Platform::up();
    let api = platform.client();
    let ok = api.create(NS, json!({"command": ["sh", "-c", "echo done"]}));
    let failing = api.create(NS, json!({"command": ["sh", "-c", "exit 42"]}));

    let sandbox = api.wait_state(NS, &ok, "completed", DEADLINE);
    assert_eq!(sandbox["reason"], "exited");
    assert_eq!(sandbox["exit_code"], 0);
    let sandbox = api.wait_state(NS, &failing, "failed", DEADLINE);
    assert_eq!(sandbox["reason"], "exited");
    assert_eq!(sandbox["exit_code"], 42);
}

#[test]
fn timeouts_terminate_sandboxes_with_reason_timeout() {
    let platform = Platform::up();
    let api = platform.client();
    let id = api.create(NS, json!({"timeout_secs": 1}));
    api.wait_state(NS, &id, "running", DEADLINE);
    let sandbox = api.wait_state(NS, &id, "terminated", DEADLINE);
    assert_eq!(sandbox["reason"], "timeout");

    // Extending the deadline keeps a sandbox alive past its first one.
    let id = api.create(NS, json!({"timeout_secs": 1}));
    let (status, sandbox) = api.post(&path(&id, "/timeout"), json!({"timeout_secs": 600}));
    assert_eq!(status, 200, "{sandbox}");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(api.wait_state(NS, &id, "running", DEADLINE)["state"], "running");
}

#[test]
fn namespaces_cannot_see_each_others_sandboxes() {
    let platform = Platform::up();
    let admin = platform.client();
    let mut keys = Vec::new();
    for name in ["team-a", "team-b"] {
        let (status, ns) = admin.post("/v1/namespaces", json!({"name": name}));
        assert_eq!(status, 201, "{ns}");
        let (status, key) = admin.post(&format!("/v1/namespaces/{name}/keys"), json!({}));
        assert_eq!(status, 201, "{key}");
        keys.push(admin.with_key(key["key"].as_str().unwrap()));
    }
    let (a, b) = (&keys[0], &keys[1]);
    let id = a.create("team-a", json!({}));

    // b sees nothing of a's sandbox: not in a's namespace, not by id.
    let (status, _) = b.get(&format!("/v1/namespaces/team-a/sandboxes/{id}"));
    assert_eq!(status, 404);
    let (status, _) = b.get(&format!("/v1/namespaces/team-b/sandboxes/{id}"));
    assert_eq!(status, 404);
    let (status, _) = b.delete(&format!("/v1/namespaces/team-b/sandboxes/{id}"));
    assert_eq!(status, 404);
    let (status, _) = b.post(
        &format!("/v1/namespaces/team-b/sandboxes/{id}/daemon/exec"),
        json!({"command": "true"}),
    );
    assert_eq!(status, 404);
    let (_, list) = b.get("/v1/namespaces/team-b/sandboxes");
    assert_eq!(list["sandboxes"].as_array().unwrap().len(), 0);
    // A namespace key is not an admin key.
    let (status, error) = b.post("/v1/namespaces", json!({"name": "team-c"}));
    assert_eq!(status, 403, "{error}");
    // a still reaches its own.
    assert_eq!(a.exec("team-a", &id, "true", &[])["exit_code"], 0);
}

#[test]
fn bad_requests_get_clear_errors() {
    let platform = Platform::up();
    let api = platform.client();
    let sandboxes = format!("/v1/namespaces/{NS}/sandboxes");

    let anonymous = reqwest::blocking::Client::new();
    let response = anonymous.get(api.url(&sandboxes)).send().unwrap();
    assert_eq!(response.status(), 401);
    let (status, error) = api.with_key("wrong").get(&sandboxes);
    assert_eq!((status, error["error"]["code"].as_str()), (401, Some("unauthenticated")));

    let response = api
        .request(reqwest::Method::POST, &sandboxes)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .unwrap();
    assert_eq!(response.status(), 400);
    let (status, error) = api.post(&sandboxes, json!({"resources": {"memory_mb": "lots"}}));
    assert_eq!(status, 400, "{error}");
    assert!(error["error"]["message"].as_str().unwrap().contains("memory_mb"), "{error}");
    let (status, error) = api.post(&sandboxes, json!({"timeout_secs": 10_000_000}));
    assert_eq!(status, 400, "{error}");
    let response = api
        .request(reqwest::Method::POST, &sandboxes)
        .header("content-type", "application/json")
        .body(vec![b' '; 2 << 20])
        .send()
        .unwrap();
    assert_eq!(response.status(), 413);
    let (status, error) = api.get(&format!("{sandboxes}/00000000000000000000000000000000"));
    assert_eq!((status, error["error"]["code"].as_str()), (404, Some("sandbox_not_found")));
    let (status, _) = api.get("/v1/nowhere");
    assert_eq!(status, 404);
}

#[test]
fn state_survives_a_restart_and_a_crash_with_processes_and_output() {
    let mut platform = Platform::up();
    let api = platform.client();
    let id = api.create(NS, json!({}));
    let (status, process) = api.post(
        &path(&id, "/daemon/processes"),
        json!({"command": "sh", "args": ["-c", "echo before; sleep 600"], "tag": "keeper"}),
    );
    assert_eq!(status, 201, "{process}");
    let finished = api.create(NS, json!({"command": ["true"]}));
    api.wait_state(NS, &finished, "completed", DEADLINE);

    platform.restart();
    let api = platform.client();
    assert_eq!(api.sandbox(NS, &finished)["state"], "completed");
    api.wait_state(NS, &id, "running", DEADLINE);

    // SIGKILL: nothing gets to clean up; the next start adopts the sandbox
    // with its process and the output it wrote.
    platform.crash_and_restart();
    let api = platform.client();
    api.wait_state(NS, &id, "running", DEADLINE);
    let (status, info) = api.get(&path(&id, "/daemon/processes/keeper"));
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["status"], "running");
    let (status, output) = api.get(&path(&id, "/daemon/processes/keeper/output"));
    assert_eq!(status, 200, "{output}");
    let text: Vec<u8> = output["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|chunk| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(chunk["data"].as_str().unwrap())
                .unwrap()
        })
        .collect();
    assert_eq!(text, b"before\n");
}

#[test]
fn hutch_run_streams_output_and_exits_with_the_commands_code() {
    let platform = Platform::up();
    let output = std::process::Command::new(support::hutch_bin())
        .args(["run", "--", "sh", "-c", "echo hello; echo oops >&2; exit 3"])
        .envs(platform.client_env())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    assert_eq!(output.stdout, b"hello\n");
    assert_eq!(String::from_utf8_lossy(&output.stderr).trim_end(), "oops");

    // The sandbox it used is gone.
    let api = platform.client();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (_, list) = api.get(&format!("/v1/namespaces/{NS}/sandboxes"));
        if list["sandboxes"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "hutch run left {list}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
