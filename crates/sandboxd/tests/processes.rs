//! Processes through sandboxd's HTTP API: exec, streaming, stdin, terminals,
//! signals, reattach and bounded output.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use support::{Sandboxd, assert_error, eventually};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn exec_returns_exit_code_stdout_stderr_and_duration() {
    let sandboxd = Sandboxd::start();
    let result = sandboxd.sh("echo out; echo err >&2; exit 7").await;
    assert_eq!(result["exit_code"], 7);
    assert_eq!(result["signal"], serde_json::Value::Null);
    assert_eq!(result["encoding"], "utf8");
    assert_eq!(result["stdout"], "out\n");
    assert_eq!(result["stderr"], "err\n");
    assert!(result["duration_ms"].as_f64().unwrap() > 0.0);
}

#[tokio::test]
async fn exec_applies_env_working_dir_user_and_stdin() {
    let sandboxd = Sandboxd::start();
    let (status, result) = sandboxd
        .post(
            "/exec",
            json!({
                "command": "sh",
                "args": ["-c", "echo $GREETING; pwd; id -u; cat"],
                "env": {"GREETING": "hello"},
                "working_dir": "/tmp",
                "user": "65534",
                "stdin": "from stdin",
            }),
        )
        .await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["stdout"], "hello\n/tmp\n65534\nfrom stdin");
}

#[tokio::test]
async fn exec_output_is_binary_safe() {
    let sandboxd = Sandboxd::start();
    let result = sandboxd.sh(r"printf 'a\000b\377\376c'; printf '\200' >&2").await;
    assert_eq!(result["encoding"], "base64");
    let response: hutch_api::ExecResponse = serde_json::from_value(result).unwrap();
    assert_eq!(response.stdout_bytes().unwrap(), b"a\0b\xff\xfec");
    assert_eq!(response.stderr_bytes().unwrap(), b"\x80");

    let (_, forced) = sandboxd
        .post("/exec", json!({"command": "echo", "args": ["hi"], "output_encoding": "base64"}))
        .await;
    assert_eq!(forced["encoding"], "base64");
    assert_eq!(forced["stdout"], hutch_api::encode_base64(b"hi\n"));

    let (_, echoed) = sandboxd
        .post(
            "/exec",
            json!({"command": "cat", "stdin": hutch_api::encode_base64(b"\x00\xff"), "stdin_encoding": "base64"}),
        )
        .await;
    assert_eq!(echoed["stdout"], hutch_api::encode_base64(b"\x00\xff"));
}

#[tokio::test]
async fn exec_timeout_kills_the_whole_process_group() {
    let sandboxd = Sandboxd::start();
    let (status, result) = sandboxd
        .post(
            "/exec",
            json!({"command": "sh", "args": ["-c", "sleep 30 & echo started; wait"], "timeout_ms": 300}),
        )
        .await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["timed_out"], true);
    assert_eq!(result["signal"], 9);
    assert_eq!(result["stdout"], "started\n");
    assert!(result["duration_ms"].as_f64().unwrap() < 5000.0);
}

#[tokio::test]
async fn a_hundred_concurrent_execs_all_succeed() {
    let sandboxd = Sandboxd::start();
    let runs = (0..100).map(|i| {
        let sandboxd = &sandboxd;
        async move {
            (i, sandboxd.post("/exec", json!({"command": "echo", "args": [i.to_string()]})).await)
        }
    });
    for (i, (status, result)) in futures_util::future::join_all(runs).await {
        assert_eq!(status, 200, "{result}");
        assert_eq!(result["stdout"], format!("{i}\n"));
        assert_eq!(result["exit_code"], 0);
    }
}

#[tokio::test]
async fn interleaved_stdout_and_stderr_stream_live_in_order() {
    let sandboxd = Sandboxd::start();
    // The process prints, then blocks on stdin: the stream must deliver the
    // first lines while it is still running.
    let pid = sandboxd
        .start_process(json!({
            "command": "sh",
            "args": ["-c", "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; done; read line; echo got $line"],
            "stdin": "pipe",
        }))
        .await;
    let response = sandboxd
        .client
        .get(sandboxd.url(&format!("/processes/{pid}/output/stream")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.bytes_stream();
    let mut text = String::new();
    let mut events = Vec::new();
    let mut fed = false;
    while let Some(chunk) =
        tokio::time::timeout(Duration::from_secs(20), body.next()).await.unwrap()
    {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        while let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            let kind = event
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or_default()
                .to_owned();
            let data = event.lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or("null");
            events.push((kind, serde_json::from_str::<serde_json::Value>(data).unwrap()));
        }
        let seen: usize =
            events.iter().filter(|(k, _)| k == "output").map(|(_, d)| decode(d).len()).sum();
        if !fed && seen >= 50 {
            // All ten lines arrived while the process waits for input.
            let (status, info) = sandboxd.get(&format!("/processes/{pid}")).await;
            assert_eq!((status, info["status"].as_str()), (200, Some("running")));
            let written = sandboxd
                .client
                .post(sandboxd.url(&format!("/processes/{pid}/stdin?close=true")))
                .body("bye\n")
                .send()
                .await
                .unwrap();
            assert_eq!(written.status(), 200);
            fed = true;
        }
        if events.last().is_some_and(|(k, _)| k == "exit") {
            break;
        }
    }
    assert!(fed, "never saw the first lines live");
    let (mut stdout, mut stderr, mut expected_offset) = (Vec::new(), Vec::new(), 0);
    for (kind, data) in &events[..events.len() - 1] {
        assert_eq!(kind, "output");
        assert_eq!(data["offset"], expected_offset, "offsets are contiguous");
        let bytes = decode(data);
        expected_offset += bytes.len() as u64;
        match data["stream"].as_str().unwrap() {
            "stdout" => stdout.extend(bytes),
            _ => stderr.extend(bytes),
        }
    }
    assert_eq!(String::from_utf8(stdout).unwrap(), "out1\nout2\nout3\nout4\nout5\ngot bye\n");
    assert_eq!(String::from_utf8(stderr).unwrap(), "err1\nerr2\nerr3\nerr4\nerr5\n");
    assert_eq!(events.last().unwrap().1["exit_code"], 0);
}

fn decode(chunk: &serde_json::Value) -> Vec<u8> {
    hutch_api::decode_base64(chunk["data"].as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn stdin_round_trips_binary_bytes_and_closes() {
    let sandboxd = Sandboxd::start();
    let pid =
        sandboxd.start_process(json!({"command": "cat", "stdin": "pipe", "tag": "echoer"})).await;
    let payload: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let response = sandboxd
        .client
        .post(sandboxd.url("/processes/echoer/stdin"))
        .body(payload.clone())
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["bytes_written"], 300_000);
    assert_eq!(body["stdin_open"], true);
    let (status, _) = sandboxd.post(&format!("/processes/{pid}/stdin/close"), json!(null)).await;
    assert_eq!(status, 200);
    let info = sandboxd.wait(pid).await;
    assert_eq!(info["exit"]["exit_code"], 0);
    assert_eq!(sandboxd.output(pid).await.0, payload);
    // Once closed, stdin stays closed.
    let again = sandboxd
        .client
        .post(sandboxd.url(&format!("/processes/{pid}/stdin")))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
}

#[tokio::test]
async fn a_pty_is_a_terminal_and_sees_resizes() {
    let sandboxd = Sandboxd::start();
    let pid = sandboxd
        .start_process(json!({
            "command": "sh",
            "args": ["-c", "tty; stty size; read line; stty size"],
            "pty": {"rows": 24, "cols": 80},
        }))
        .await;
    assert!(
        eventually(Duration::from_secs(10), async || {
            String::from_utf8_lossy(&sandboxd.output(pid).await.0).contains("24 80")
        })
        .await
    );
    let (status, info) =
        sandboxd.post(&format!("/processes/{pid}/resize"), json!({"rows": 40, "cols": 100})).await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["pty"], true);
    let response = sandboxd
        .client
        .post(sandboxd.url(&format!("/processes/{pid}/stdin")))
        .body("\n")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    sandboxd.wait(pid).await;
    let output = String::from_utf8(sandboxd.output(pid).await.0).unwrap();
    assert!(output.contains("/dev/pts/"), "{output}");
    assert!(output.contains("40 100"), "{output}");
}

#[tokio::test]
async fn websocket_attach_carries_stdin_output_resize_and_exit() {
    let sandboxd = Sandboxd::start();
    let pid = sandboxd
        .start_process(json!({
            "command": "sh",
            "args": ["-c", "echo ready; read a; echo \"a=$a\" >&2; stty size; read b; echo \"b=$b\""],
            "pty": {"rows": 10, "cols": 20},
            "tag": "shell",
        }))
        .await;
    let url = format!("{}/processes/shell/attach", sandboxd.base.replace("http://", "ws://"));
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut output = Vec::new();
    let mut exit = None;
    let mut step = 0;
    while let Some(message) =
        tokio::time::timeout(Duration::from_secs(20), socket.next()).await.unwrap()
    {
        match message.unwrap() {
            Message::Binary(frame) => {
                assert_eq!(frame[0], 1, "a terminal's output is stdout");
                output.extend_from_slice(&frame[1..]);
            }
            Message::Text(text) => {
                let event: serde_json::Value = serde_json::from_str(&text).unwrap();
                if event["type"] == "exit" {
                    exit = Some(event);
                }
            }
            Message::Close(_) => break,
            _ => {}
        }
        let text = String::from_utf8_lossy(&output).to_string();
        if step == 0 && text.contains("ready") {
            socket
                .send(Message::Text(r#"{"type":"resize","rows":33,"cols":44}"#.into()))
                .await
                .unwrap();
            socket.send(Message::Binary(b"one\n".to_vec().into())).await.unwrap();
            step = 1;
        }
        if step == 1 && text.contains("33 44") {
            socket.send(Message::Binary(b"two\n".to_vec().into())).await.unwrap();
            step = 2;
        }
    }
    let text = String::from_utf8_lossy(&output);
    assert!(text.contains("a=one") && text.contains("b=two"), "{text}");
    assert_eq!(exit.expect("an exit event")["exit_code"], 0);
    assert_eq!(sandboxd.wait(pid).await["exit"]["exit_code"], 0);
}

#[tokio::test]
async fn signals_kill_and_exit_statuses() {
    let sandboxd = Sandboxd::start();
    let sleeper = sandboxd.start_process(json!({"command": "sleep", "args": ["100"]})).await;
    let (status, _) =
        sandboxd.post(&format!("/processes/{sleeper}/signal"), json!({"signal": "SIGTERM"})).await;
    assert_eq!(status, 200);
    assert_eq!(sandboxd.wait(sleeper).await["exit"]["signal"], 15);

    let trapper = sandboxd
        .start_process(json!({
            "command": "sh",
            "args": ["-c", "trap 'echo caught; exit 3' USR1; echo armed; while :; do sleep 0.05; done"],
        }))
        .await;
    assert!(
        eventually(Duration::from_secs(10), async || sandboxd
            .output(trapper)
            .await
            .0
            .starts_with(b"armed"))
        .await
    );
    let (status, _) =
        sandboxd.post(&format!("/processes/{trapper}/signal"), json!({"signal": 10})).await;
    assert_eq!(status, 200);
    let info = sandboxd.wait(trapper).await;
    assert_eq!(info["exit"]["exit_code"], 3);
    assert_eq!(sandboxd.output(trapper).await.0, b"armed\ncaught\n");

    let victim = sandboxd
        .start_process(json!({"command": "sh", "args": ["-c", "trap '' TERM; sleep 100"]}))
        .await;
    let (status, _) = sandboxd.post(&format!("/processes/{victim}/kill"), json!(null)).await;
    assert_eq!(status, 200);
    assert_eq!(sandboxd.wait(victim).await["exit"]["signal"], 9);
    // Killing or signalling an exited process is a conflict, not a crash.
    assert_error(
        &sandboxd.post(&format!("/processes/{victim}/kill"), json!(null)).await,
        409,
        "process_exited",
    );
    assert_error(
        &sandboxd.post(&format!("/processes/{victim}/signal"), json!({"signal": "NOPE"})).await,
        400,
        "bad_request",
    );
}

#[tokio::test]
async fn processes_are_found_again_by_pid_or_tag_and_resume_from_an_offset() {
    let sandboxd = Sandboxd::start();
    let pid = sandboxd
        .start_process(json!({"command": "sh", "args": ["-c", "echo 0123456789"], "tag": "job-1"}))
        .await;
    let info = sandboxd.wait("job-1").await;
    assert_eq!(info["pid"], pid);
    assert_eq!(info["tag"], "job-1");
    assert_eq!(info["output_bytes"], 11);
    let (_, page) = sandboxd.get("/processes/job-1/output?offset=5").await;
    assert_eq!(page["chunks"][0]["offset"], 5);
    assert_eq!(decode(&page["chunks"][0]), b"56789\n");
    assert_eq!(page["exit"]["exit_code"], 0);
    let (_, list) = sandboxd.get("/processes").await;
    assert!(list.as_array().unwrap().iter().any(|p| p["tag"] == "job-1"));
    // A tag in use by a running process cannot be taken.
    sandboxd.start_process(json!({"command": "sleep", "args": ["30"], "tag": "busy"})).await;
    assert_error(
        &sandboxd.post("/processes", json!({"command": "true", "tag": "busy"})).await,
        409,
        "tag_in_use",
    );
    assert_error(&sandboxd.delete("/processes/busy").await, 409, "process_running");
    let (status, _) = sandboxd.delete("/processes/job-1").await;
    assert_eq!(status, 204);
    assert_error(&sandboxd.get("/processes/job-1").await, 404, "process_not_found");
}

#[tokio::test]
async fn bounded_output_reports_what_was_dropped() {
    let sandboxd = Sandboxd::start_with(&["--output-limit", "1000"]);
    let pid = sandboxd.start_process(json!({"command": "sh", "args": ["-c", "seq 1 2000"]})).await;
    sandboxd.wait(pid).await;
    let (_, page) = sandboxd.get(&format!("/processes/{pid}/output?offset=0")).await;
    let total: u64 = (1..=2000u64).map(|n| n.to_string().len() as u64 + 1).sum();
    assert_eq!(page["dropped"], total - 1000);
    assert_eq!(page["next_offset"], total);
    let tail: Vec<u8> = page["chunks"].as_array().unwrap().iter().flat_map(decode).collect();
    assert!(tail.ends_with(b"1999\n2000\n"));
    let exec = sandboxd.sh("seq 1 2000").await;
    assert_eq!(exec["stdout_dropped"], total - 1000);
}

#[tokio::test]
async fn a_process_nobody_reads_never_blocks_on_a_full_pipe() {
    let sandboxd = Sandboxd::start_with(&["--output-limit", "65536"]);
    let pid = sandboxd
        .start_process(
            json!({"command": "sh", "args": ["-c", "head -c 200000000 /dev/zero; echo done >&2"]}),
        )
        .await;
    let info = sandboxd.wait(pid).await;
    assert_eq!(info["exit"]["exit_code"], 0);
    assert_eq!(info["output_bytes"], 200_000_005);
    assert_eq!(sandboxd.output(pid).await.1, b"done\n");
}

#[tokio::test]
async fn background_children_outlive_their_exec_and_may_keep_writing() {
    let sandboxd = Sandboxd::start();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("alive");
    // The child writes to the inherited stdout after the exec returned; it
    // must not die of SIGPIPE, and its late output is not part of the exec.
    let result = sandboxd
        .sh(&format!(
            "(sleep 0.3; echo late; echo late >&2; touch {}) & echo now",
            marker.display()
        ))
        .await;
    assert_eq!(result["stdout"], "now\n");
    assert!(
        eventually(Duration::from_secs(10), async || marker.exists()).await,
        "the child was killed"
    );
}
