//! Limits hold: memory (with OOM reported), pids, disk and CPU. Runs as root.

mod support;

use std::time::Instant;

use hutch_isolate::{Limits, Reason};
use support::TestEnv;

#[tokio::test]
async fn memory_over_the_limit_is_oom_killed_and_reported() -> anyhow::Result<()> {
    let env = TestEnv::new("oom")?;
    let mut spec = env.spec("oom");
    // The cgroup holds memory and disk (the writable layer is a tmpfs): 112 MiB.
    spec.limits = Limits { memory_bytes: 96 << 20, disk_bytes: 16 << 20, ..Limits::default() };
    env.driver.create(spec).await?;
    let id = env.id("oom");
    assert_eq!(env.driver.inspect(&id)?.reason, None);

    let out = support::exec(
        &env.socket("oom"),
        "/usr/bin/python3",
        &["-c", "b = bytearray(400 << 20); print(len(b))"],
    )
    .await?;
    assert_eq!(out.signal, Some(9), "{out:?}");
    let info = env.driver.inspect(&id)?;
    assert!(info.oom_kills >= 1, "{info:?}");
    assert_eq!(info.reason, Some(Reason::Oom));
    // sandboxd survived: the sandbox still works.
    assert!(env.sh("oom", "true").await?.ok());
    Ok(())
}

#[tokio::test]
async fn a_fork_bomb_is_capped_by_the_pids_limit() -> anyhow::Result<()> {
    let env = TestEnv::new("pids")?;
    let mut spec = env.spec("bomb");
    spec.limits = Limits { pids: 64, ..Limits::default() };
    env.driver.create(spec).await?;
    let bomb = r#"
import os, time, errno
n = 0
try:
    while n < 1000:
        pid = os.fork()
        if pid == 0:
            os.close(1); os.close(2)
            time.sleep(30)
            os._exit(0)
        n += 1
    print(n, 0)
except OSError as e:
    print(n, e.errno)
"#;
    let out = support::exec(&env.socket("bomb"), "/usr/bin/python3", &["-c", bomb]).await?;
    let fields: Vec<u32> =
        out.stdout.split_whitespace().map(str::parse).collect::<Result<_, _>>()?;
    let [forked, errno] = fields[..] else { panic!("{out:?}") };
    assert!(forked > 10 && forked < 64, "forked {forked}: {out:?}");
    assert_eq!(errno, libc::EAGAIN as u32, "{out:?}");
    Ok(())
}

#[tokio::test]
async fn filling_the_disk_stops_at_the_limit() -> anyhow::Result<()> {
    let env = TestEnv::new("disk")?;
    let mut spec = env.spec("disk");
    spec.limits = Limits { disk_bytes: 16 << 20, memory_bytes: 256 << 20, ..Limits::default() };
    env.driver.create(spec).await?;
    let out = env
        .sh(
            "disk",
            "dd if=/dev/zero of=/var/tmp/fill bs=1M count=64 2>&1; echo status=$?; \
             dd if=/dev/zero of=/tmp/fill bs=1M count=64 2>/dev/null; \
             du -sk /var/tmp/fill /tmp/fill | cut -f1 | tr '\\n' ' '",
        )
        .await?;
    assert!(out.stdout.contains("No space left on device"), "{out:?}");
    assert!(!out.stdout.contains("status=0"), "{out:?}");
    let kib: u64 = out
        .stdout
        .lines()
        .last()
        .unwrap_or_default()
        .split_whitespace()
        .map(|s| s.parse::<u64>().unwrap_or(u64::MAX))
        .sum();
    assert!(kib <= 16 << 10, "wrote {kib} KiB: {out:?}");
    Ok(())
}

/// The attack: a tenant whose disk limit is larger than its memory limit fills the
/// disk. The writable layer lives in memory, so before the cgroup counted it, the
/// OOM killer struck (sandboxd included) long before the disk was full.
#[tokio::test]
async fn filling_a_disk_larger_than_memory_gives_enospc_and_the_sandbox_stays_healthy()
-> anyhow::Result<()> {
    let env = TestEnv::new("bigdisk")?;
    let mut spec = env.spec("bigdisk");
    spec.limits = Limits { disk_bytes: 96 << 20, memory_bytes: 32 << 20, ..Limits::default() };
    env.driver.create(spec).await?;
    let out = env
        .sh("bigdisk", "dd if=/dev/zero of=/var/tmp/fill bs=1M count=200 2>&1; echo status=$?")
        .await?;
    assert!(out.stdout.contains("No space left on device"), "{out:?}");
    assert!(!out.stdout.contains("status=0"), "{out:?}");
    let id = env.id("bigdisk");
    let info = env.driver.inspect(&id)?;
    assert_eq!(info.oom_kills, 0, "{info:?}");
    assert_eq!(info.state, hutch_isolate::SandboxState::Running);
    // sandboxd and the disk's contents are intact, and processes still run.
    let out = env.sh("bigdisk", "du -sm /var/tmp/fill | cut -f1").await?;
    assert!(out.ok(), "{out:?}");
    let mib: u64 = out.stdout.trim().parse()?;
    assert!((90..=96).contains(&mib), "{out:?}");
    Ok(())
}

/// The attack: a process hogs memory hoping the OOM killer takes sandboxd (and with
/// it every process and file of the sandbox). The kernel must pick the hog.
#[tokio::test]
async fn the_oom_killer_never_picks_sandboxd() -> anyhow::Result<()> {
    let env = TestEnv::new("oompick")?;
    let mut spec = env.spec("oompick");
    spec.limits = Limits { memory_bytes: 48 << 20, disk_bytes: 1 << 20, ..Limits::default() };
    env.driver.create(spec).await?;
    let id = env.id("oompick");
    for _ in 0..3 {
        // Small hogs each, so that sandboxd is not the smallest process either.
        let out = env
            .sh("oompick", "python3 -c 'b = bytearray(8 << 20); import time; time.sleep(30)' &                  python3 -c 'b = bytearray(200 << 20)'; echo status=$?")
            .await?;
        assert!(out.stdout.contains("status=137"), "{out:?}");
    }
    let info = env.driver.inspect(&id)?;
    assert!(info.oom_kills >= 3, "{info:?}");
    assert_eq!(info.state, hutch_isolate::SandboxState::Running, "{info:?}");
    let out = env.sh("oompick", "cat /proc/self/oom_score_adj").await?;
    assert_eq!(out.stdout.trim(), "1000", "{out:?}");
    let out = env.sh("oompick", "cat /proc/1/oom_score_adj").await?;
    assert_eq!(out.stdout.trim(), "0", "{out:?}");
    Ok(())
}

#[tokio::test]
async fn the_cpu_quota_holds() -> anyhow::Result<()> {
    let env = TestEnv::new("cpu")?;
    let mut spec = env.spec("cpu");
    spec.limits = Limits { cpu_millis: 200, ..Limits::default() };
    env.driver.create(spec).await?;
    let cgroup = env.driver.cgroup(&env.id("cpu"));
    // Two busy processes for 1.5 s of wall time: unlimited they would use ~2 CPUs.
    let burn = "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass";
    let script = format!("python3 -c '{burn}' & python3 -c '{burn}'; wait");
    let before = cgroup.cpu_usage_ns()?;
    let start = Instant::now();
    let out = env.sh("cpu", &script).await?;
    let wall = start.elapsed();
    let used = cgroup.cpu_usage_ns()? - before;
    assert!(out.ok(), "{out:?}");
    let share = used as f64 / wall.as_nanos() as f64;
    assert!(share > 0.1, "the burners barely ran: {share:.3} CPUs");
    assert!(share < 0.3, "quota of 0.2 CPUs exceeded: {share:.3} CPUs over {wall:?}");
    Ok(())
}
