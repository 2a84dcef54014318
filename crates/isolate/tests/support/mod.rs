//! Shared fixtures of the privileged tests: a driver in a temp dir with its own cgroup
//! parent (running hutch-testkit's static sandboxd), and sandboxd's `POST /exec`.
#![allow(dead_code)]

pub mod image;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;
use hutch_isolate::{Driver, DriverConfig, SandboxCgroup, SandboxId, SandboxSpec};

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

    /// Like [`TestEnv::new`], with sandbox networking from `network` and a pool
    /// of two network namespaces, full before this returns: the first two
    /// sandboxes without a user namespace are born in pooled namespaces.
    pub fn with_network(
        name: &str,
        network: std::sync::Arc<hutch_net::NetManager>,
    ) -> anyhow::Result<Self> {
        Self::build(name, 2, Some(network))
    }

    /// Like [`TestEnv::new`], with a pool of `size` network namespaces, full
    /// before this returns.
    pub fn with_netns_pool(name: &str, size: usize) -> anyhow::Result<Self> {
        Self::build(name, size, None)
    }

    fn build(
        name: &str,
        pool: usize,
        network: Option<std::sync::Arc<hutch_net::NetManager>>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let cgroup_parent = format!("hutch-test-{name}-{}", std::process::id());
        let mut driver = Driver::new(config(dir.path(), &cgroup_parent))?.with_netns_pool(pool)?;
        if let Some(network) = network {
            driver = driver.with_network(network);
        }
        let full = hutch_testkit::wait_until(Duration::from_secs(10), || {
            driver.netns_pool().is_some_and(|stats| stats.ready == pool)
        });
        if !full {
            bail!("the network namespace pool never filled");
        }
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
        sandboxd_path: hutch_testkit::sandboxd_path(),
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
    hutch_testkit::wait_until(Duration::from_secs(10), || {
        let _ = cgroup.kill_all();
        cgroup.remove().is_ok()
    });
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
    let (status, body) =
        hutch_testkit::sandboxd_request(socket, "POST", "/exec", Some(body.to_string())).await?;
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

/// Everything on the host that could name a sandbox: state and run entries, cgroups,
/// and mounts (in our own mount namespace).
#[derive(Debug, PartialEq, Eq)]
pub struct HostArtefacts {
    pub state_entries: Vec<String>,
    pub run_entries: Vec<String>,
    pub cgroups: Vec<String>,
    pub mounts_mentioning_dir: usize,
    pub mount_count: usize,
}

pub fn artefacts(env: &TestEnv) -> HostArtefacts {
    let list = |dir: PathBuf| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        names.sort();
        names
    };
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dir = env.dir.path().to_string_lossy().into_owned();
    HostArtefacts {
        state_entries: list(env.dir.path().join("state")),
        run_entries: list(env.dir.path().join("run")),
        cgroups: env.driver.cgroup_layout().existing_ids(),
        mounts_mentioning_dir: mountinfo.lines().filter(|l| l.contains(&dir)).count(),
        mount_count: mountinfo.lines().count(),
    }
}
