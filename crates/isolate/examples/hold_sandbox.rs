//! Test helper: creates one sandbox, prints `ready`, then waits to be killed.
//! Used by the crash test to play a dataplane that dies with SIGKILL.
//!
//! Usage: hold_sandbox <dir> <cgroup-parent> <sandboxd> <id>

use std::path::PathBuf;

use hutch_isolate::{Driver, DriverConfig, SandboxId, SandboxSpec};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let mut next = || {
        args.next()
            .ok_or_else(|| anyhow::anyhow!("usage: hold_sandbox DIR CGROUP_PARENT SANDBOXD ID"))
    };
    let dir = PathBuf::from(next()?);
    let cgroup_parent =
        next()?.into_string().map_err(|_| anyhow::anyhow!("cgroup parent is not UTF-8"))?;
    let sandboxd_path = PathBuf::from(next()?);
    let id =
        SandboxId::new(next()?.into_string().map_err(|_| anyhow::anyhow!("id is not UTF-8"))?)?;
    let driver = Driver::new(DriverConfig {
        state_dir: dir.join("state"),
        run_dir: dir.join("run"),
        sandboxd_path,
        cgroup_parent: Some(cgroup_parent),
    })?;
    driver.create(SandboxSpec::new(id)).await?;
    println!("ready");
    std::future::pending::<()>().await;
    Ok(())
}
