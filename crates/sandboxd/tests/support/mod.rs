//! Runs sandboxd as a real process on 127.0.0.1:0 and talks to it.
#![allow(dead_code)]

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub struct Sandboxd {
    pub child: Child,
    pub base: String,
    pub client: reqwest::Client,
}

impl Sandboxd {
    pub fn start() -> Sandboxd {
        Sandboxd::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Sandboxd {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sandboxd"));
        command.args(["--listen", "tcp:127.0.0.1:0"]).args(extra);
        Sandboxd::spawn(command)
    }

    /// Starts sandboxd through `command`, which must print sandboxd's
    /// "listening on" line on stdout.
    pub fn spawn(command: Command) -> Sandboxd {
        let (child, base) = hutch_testkit::spawn_listening(command);
        Sandboxd { child, base, client: reqwest::Client::new() }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.client.get(self.url(path)).send().await.unwrap();
        split(response).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self.client.post(self.url(path)).json(&body).send().await.unwrap();
        split(response).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        let response = self.client.delete(self.url(path)).send().await.unwrap();
        split(response).await
    }

    /// `POST /exec` of `sh -c script`, asserting success of the request.
    pub async fn sh(&self, script: &str) -> Value {
        let (status, body) =
            self.post("/exec", json!({"command": "sh", "args": ["-c", script]})).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Starts a process and returns its pid.
    pub async fn start_process(&self, request: Value) -> u64 {
        let (status, body) = self.post("/processes", request).await;
        assert_eq!(status, 201, "{body}");
        body["pid"].as_u64().unwrap()
    }

    /// Waits (server side) for a process to exit and returns its info.
    pub async fn wait(&self, id: impl std::fmt::Display) -> Value {
        let (status, body) = self.get(&format!("/processes/{id}/wait?timeout_ms=20000")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "exited", "process did not exit in time: {body}");
        body
    }

    /// All output of a process, decoded, per stream.
    pub async fn output(&self, id: impl std::fmt::Display) -> (Vec<u8>, Vec<u8>) {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut offset = 0;
        loop {
            let (status, page) = self.get(&format!("/processes/{id}/output?offset={offset}")).await;
            assert_eq!(status, 200, "{page}");
            let chunks = page["chunks"].as_array().unwrap();
            for chunk in chunks {
                let data = hutch_api::decode_base64(chunk["data"].as_str().unwrap()).unwrap();
                match chunk["stream"].as_str().unwrap() {
                    "stdout" => stdout.extend(data),
                    _ => stderr.extend(data),
                }
            }
            offset = page["next_offset"].as_u64().unwrap();
            if chunks.is_empty() {
                return (stdout, stderr);
            }
        }
    }

    /// Waits for the sandboxd process itself to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "sandboxd did not exit within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Peak resident memory of sandboxd so far, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        status_field(self.pid(), "VmHWM:")
    }

    pub fn rss_kib(&self) -> u64 {
        status_field(self.pid(), "VmRSS:")
    }
}

pub fn status_field(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap()
}

impl Drop for Sandboxd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn split(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, body)
}

/// Asserts an error response: the status and the stable code.
pub fn assert_error(response: &(u16, Value), status: u16, code: &str) {
    assert_eq!(response.0, status, "{}", response.1);
    assert_eq!(response.1["error"]["code"], code, "{}", response.1);
    assert!(
        response.1["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        response.1
    );
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Zombie children of `parent`, from /proc.
pub fn zombie_children(parent: u32) -> Vec<u32> {
    let mut zombies = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // Fields after the parenthesized command: state, ppid, ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 1 && fields[0] == "Z" && fields[1] == parent.to_string() {
            zombies.push(pid);
        }
    }
    zombies
}
