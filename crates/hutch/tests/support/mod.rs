//! Runs the real `hutch` binary, and a real sandboxd on 127.0.0.1:0 for the
//! commands that only talk to a sandbox's daemon (`--daemon-url`).
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long one `hutch` invocation may take before the test fails.
const HUTCH_TIMEOUT: Duration = Duration::from_secs(60);

/// A sandboxd process, killed when dropped.
pub struct Sandboxd {
    child: Child,
    pub base: String,
}

impl Sandboxd {
    pub fn start() -> Sandboxd {
        let mut command = Command::new(hutch_testkit::sandboxd_path());
        command.args(["--listen", "tcp:127.0.0.1:0"]);
        let (child, base) = hutch_testkit::spawn_listening(command);
        Sandboxd { child, base }
    }

    /// `hutch` pointed at this sandboxd.
    pub fn hutch(&self) -> Hutch {
        Hutch::new().env("HUTCH_DAEMON_URL", &self.base)
    }

    /// POSTs JSON to sandboxd itself and returns the JSON answer.
    pub async fn post(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let response = reqwest::Client::new()
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .expect("request to sandboxd");
        assert!(response.status().is_success(), "{path}: {}", response.status());
        response.json().await.expect("JSON from sandboxd")
    }

    pub async fn get(&self, path: &str) -> serde_json::Value {
        let response =
            reqwest::get(format!("{}{path}", self.base)).await.expect("request to sandboxd");
        assert!(response.status().is_success(), "{path}: {}", response.status());
        response.json().await.expect("JSON from sandboxd")
    }
}

impl Drop for Sandboxd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One invocation of the `hutch` binary, with a clean `HUTCH_*` environment
/// (no local `hutch up` is consulted: the data dir is an empty temp dir).
pub struct Hutch {
    command: tokio::process::Command,
    stdin: Option<Vec<u8>>,
    _data_dir: std::sync::Arc<tempfile::TempDir>,
}

pub struct Output {
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Output {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Asserts the one-line failure the CLI promises, with this status.
    pub fn assert_one_line_failure(&self, code: i32) {
        assert_eq!(self.code, Some(code), "stderr: {}", self.stderr);
        assert_eq!(self.stderr.lines().count(), 1, "stderr: {:?}", self.stderr);
        assert!(self.stderr.starts_with("hutch: "), "stderr: {:?}", self.stderr);
    }
}

impl Hutch {
    pub fn new() -> Hutch {
        let data_dir = tempfile::tempdir().expect("temp dir");
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_hutch"));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("HUTCH_") {
                command.env_remove(key);
            }
        }
        command.env("HUTCH_DATA_DIR", data_dir.path()).kill_on_drop(true);
        Hutch { command, stdin: None, _data_dir: std::sync::Arc::new(data_dir) }
    }

    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Hutch {
        self.command.env(key, value);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Hutch
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.command.args(args);
        self
    }

    pub fn current_dir(mut self, dir: &Path) -> Hutch {
        self.command.current_dir(dir);
        self
    }

    /// Feeds these bytes on stdin (a pipe); stdin is /dev/null otherwise.
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Hutch {
        self.stdin = Some(bytes.into());
        self
    }

    /// Starts it with piped stdout and stderr (and stdin if given).
    pub fn spawn(mut self) -> tokio::process::Child {
        self.command
            .stdin(if self.stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self.command.spawn().expect("spawn hutch");
        if let Some(bytes) = self.stdin.take() {
            let mut stdin = child.stdin.take().expect("stdin pipe");
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt as _;
                let _ = stdin.write_all(&bytes).await;
            });
        }
        child
    }

    pub async fn run(self) -> Output {
        let child = self.spawn();
        finish(child).await
    }
}

impl Default for Hutch {
    fn default() -> Hutch {
        Hutch::new()
    }
}

/// Waits for a spawned `hutch` (failing the test after a minute).
pub async fn finish(child: tokio::process::Child) -> Output {
    let output = tokio::time::timeout(HUTCH_TIMEOUT, child.wait_with_output())
        .await
        .expect("hutch did not finish in time")
        .expect("wait for hutch");
    Output {
        code: output.status.code(),
        stdout: output.stdout,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}
