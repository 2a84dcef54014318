//! Shared fixtures of the privileged tests: a driver in a temp dir with its own cgroup
//! parent, a static sandboxd, and an HTTP/1.1 client over sandboxd's unix socket.
#![allow(dead_code)]

pub mod image;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hutch_isolate::{Driver, DriverConfig, SandboxCgroup, SandboxId, SandboxSpec};
use hyper_util::rt::TokioIo;

/// The static sandboxd the sandboxes run: `$HUTCH_SANDBOXD`, or built once by cargo.
pub fn sandboxd_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(path) = std::env::var_os("HUTCH_SANDBOXD") {
            return path.into();
        }
        build_sandboxd("dev").expect("build a static sandboxd")
    })
    .clone()
}

/// Builds sandboxd statically linked (it runs inside images without our libc) into
/// its own target dir, so the nested cargo never waits on the outer one's lock.
pub fn build_sandboxd(profile: &str) -> anyhow::Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("sandboxd-static");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&workspace)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_TARGET_DIR", &target)
        .args([
            "build",
            "-p",
            "hutch-sandboxd",
            "--target",
            "x86_64-unknown-linux-gnu",
            "--profile",
            profile,
        ])
        .status()
        .context("run cargo")?;
    if !status.success() {
        bail!("building sandboxd failed: {status}");
    }
    let dir = if profile == "dev" { "debug" } else { profile };
    Ok(target.join("x86_64-unknown-linux-gnu").join(dir).join("sandboxd"))
}

/// A driver rooted in a temp dir, with a cgroup parent of its own. Dropping it kills
/// and removes whatever sandboxes the test left, even when the test failed.
pub struct TestEnv {
    pub driver: Driver,
    pub dir: tempfile::TempDir,
    pub cgroup_parent: String,
}

impl TestEnv {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let cgroup_parent = format!("hutch-test-{name}-{}", std::process::id());
        let driver = Driver::new(config(dir.path(), &cgroup_parent))?;
        Ok(Self { driver, dir, cgroup_parent })
    }

    /// Like [`TestEnv::new`], with sandbox networking from `network`.
    pub fn with_network(
        name: &str,
        network: std::sync::Arc<hutch_net::NetManager>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let cgroup_parent = format!("hutch-test-{name}-{}", std::process::id());
        let driver = Driver::new(config(dir.path(), &cgroup_parent))?.with_network(network);
        Ok(Self { driver, dir, cgroup_parent })
    }

    /// A second driver over the same directories, as after a restart.
    pub fn reopen(&self) -> anyhow::Result<Driver> {
        Ok(Driver::new(config(self.dir.path(), &self.cgroup_parent))?)
    }

    pub fn spec(&self, id: &str) -> SandboxSpec {
        SandboxSpec::new(SandboxId::new(id).expect("valid test id"))
    }

    pub fn id(&self, id: &str) -> SandboxId {
        SandboxId::new(id).expect("valid test id")
    }

    pub fn socket(&self, id: &str) -> PathBuf {
        self.driver.sandboxd_socket(&self.id(id))
    }

    /// Runs `sh -c script` in the sandbox through sandboxd.
    pub async fn sh(&self, id: &str, script: &str) -> anyhow::Result<Exec> {
        exec(&self.socket(id), "/bin/sh", &["-c", script]).await
    }
}

fn config(dir: &Path, cgroup_parent: &str) -> DriverConfig {
    DriverConfig {
        state_dir: dir.join("state"),
        run_dir: dir.join("run"),
        sandboxd_path: sandboxd_path(),
        cgroup_parent: Some(cgroup_parent.to_owned()),
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let layout = self.driver.cgroup_layout().clone();
        let ids = layout.existing_ids();
        for id in ids {
            let Ok(id) = SandboxId::new(id) else { continue };
            let cgroup = self.driver.cgroup(&id);
            remove_cgroup(&cgroup);
        }
        let parents: Vec<PathBuf> = match layout {
            hutch_isolate::CgroupLayout::V1 { parents } => {
                parents.into_iter().map(|(_, p)| p).collect()
            }
            hutch_isolate::CgroupLayout::V2 { parent } => vec![parent],
        };
        for parent in parents {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// Kills everything in a cgroup and removes it, polling until the kernel lets go.
pub fn remove_cgroup(cgroup: &SandboxCgroup) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let _ = cgroup.kill_all();
        if cgroup.remove().is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The parts of sandboxd's `POST /exec` answer the tests look at.
#[derive(Debug)]
pub struct Exec {
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
    pub stdout: String,
    pub stderr: String,
}

impl Exec {
    pub fn ok(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// `POST /exec` over sandboxd's unix socket.
pub async fn exec(socket: &Path, command: &str, args: &[&str]) -> anyhow::Result<Exec> {
    let body = serde_json::json!({ "command": command, "args": args, "timeout_ms": 60_000 });
    let (status, body) = request(socket, "POST", "/exec", Some(body.to_string())).await?;
    if status != 200 {
        bail!("exec {command} {args:?}: HTTP {status}: {body}");
    }
    let value: serde_json::Value = serde_json::from_str(&body)?;
    let text = |key: &str| value[key].as_str().unwrap_or_default().to_owned();
    Ok(Exec {
        exit_code: value["exit_code"].as_i64(),
        signal: value["signal"].as_i64(),
        stdout: text("stdout"),
        stderr: text("stderr"),
    })
}

/// One HTTP/1.1 request over a unix socket; returns the status and the body.
pub async fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<String>,
) -> anyhow::Result<(u16, String)> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connect {}", socket.display()))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "sandboxd")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
