//! Many creates at once from a multithreaded runtime: each child is cloned into the
//! driver's memory (`CLONE_VM`) on a stack of its own while other threads keep
//! allocating, cloning and reaping. Runs as root.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_concurrent_creates_all_run_and_are_destroyed() -> anyhow::Result<()> {
    let env = Arc::new(TestEnv::new("concurrent")?);
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let env = env.clone();
            tokio::spawn(async move {
                let name = format!("conc-{i}");
                env.driver.create(env.spec(&name)).await?;
                let exec = env.sh(&name, "echo $((6 * 7))").await?;
                anyhow::ensure!(exec.ok() && exec.stdout.trim() == "42", "{name}: {exec:?}");
                env.driver.destroy(&env.id(&name)).await?;
                anyhow::Ok(())
            })
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(120), async {
        for task in tasks {
            task.await??;
        }
        anyhow::Ok(())
    })
    .await??;
    assert!(env.driver.cgroup_layout().existing_ids().is_empty());
    Ok(())
}
