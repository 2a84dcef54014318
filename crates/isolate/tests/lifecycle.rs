//! Create, inspect, stop, destroy, adopt and sweep, and that nothing is left behind.
//! Runs as root.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use hutch_isolate::{CgroupLayout, CreateSandboxError, Egress, ExitStatus, Reason, SandboxState};
use hutch_testkit::eventually;
use hutch_testkit::sandboxd_request as request;
use support::{TestEnv, artefacts};

fn cgroup_dirs(layout: &CgroupLayout) -> Vec<PathBuf> {
    match layout {
        CgroupLayout::V1 { parents } => parents.iter().map(|(_, p)| p.clone()).collect(),
        CgroupLayout::V2 { parent } => vec![parent.clone()],
    }
}

#[tokio::test]
async fn create_inspect_stop_and_destroy() -> anyhow::Result<()> {
    let env = TestEnv::new("lifecycle")?;
    let before = artefacts(&env);
    let id = env.id("life");
    let info = env.driver.create(env.spec("life")).await?;
    assert_eq!(info.state, SandboxState::Running);
    assert_eq!(info.exit, None);
    assert_eq!(env.driver.list(), vec![info.clone()]);
    assert!(env.socket("life").exists());
    // Placed in its own cgroups, beneath ours.
    for dir in cgroup_dirs(env.driver.cgroup_layout()) {
        let procs = std::fs::read_to_string(dir.join("hutch-life/cgroup.procs"))?;
        assert!(procs.lines().any(|p| p == info.pid.to_string()), "{dir:?}: {procs}");
    }

    // A second sandbox with the same id is refused.
    let err = env.driver.create(env.spec("life")).await.unwrap_err();
    assert!(matches!(err, CreateSandboxError::AlreadyExists(_)), "{err}");

    // sandboxd shuts down on SIGTERM within the grace period.
    let stopped = env.driver.stop(&id, Duration::from_secs(5)).await?;
    assert_eq!(stopped.state, SandboxState::Exited);
    assert_eq!(stopped.reason, Some(Reason::Stopped));
    assert!(matches!(stopped.exit, Some(ExitStatus::Code(_) | ExitStatus::Signal(_))));

    env.driver.destroy(&id).await?;
    assert!(env.driver.inspect(&id).is_err());
    assert_eq!(artefacts(&env), before);
    Ok(())
}

#[tokio::test]
async fn unsupported_options_are_refused_clearly() -> anyhow::Result<()> {
    let env = TestEnv::new("unsupported")?;
    let mut spec = env.spec("net");
    spec.egress = Egress::Internet;
    let err = env.driver.create(spec).await.unwrap_err();
    assert!(matches!(err, CreateSandboxError::Unsupported { .. }), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_failing_child_reports_its_step_and_leaves_nothing() -> anyhow::Result<()> {
    let env = TestEnv::new("fail")?;
    let before = artefacts(&env);
    let mut spec = env.spec("bad");
    // A missing working directory is created, as Docker does; a file cannot be one.
    spec.working_dir = Some("/etc/passwd".into());
    let err = env.driver.create(spec).await.unwrap_err();
    let CreateSandboxError::Child { step, source } = &err else { panic!("{err:?}") };
    assert_eq!(step, "Chdir");
    assert_eq!(source.raw_os_error(), Some(libc::ENOTDIR));
    assert_eq!(artefacts(&env), before);

    let mut spec = env.spec("relative");
    spec.working_dir = Some("work/../..".into());
    let err = env.driver.create(spec).await.unwrap_err();
    assert!(matches!(err, CreateSandboxError::InvalidWorkingDir(_)), "{err:?}");
    assert_eq!(artefacts(&env), before);
    Ok(())
}

#[tokio::test]
async fn two_hundred_create_destroy_cycles_leave_nothing_behind() -> anyhow::Result<()> {
    let env = TestEnv::new("leak")?;
    let before = artefacts(&env);
    let mappings_before = mappings()?;
    for i in 0..200 {
        let id = env.id(&format!("leak-{}", i % 4));
        env.driver.create(env.spec(id.as_str())).await?;
        env.driver.destroy(&id).await?;
    }
    assert_eq!(artefacts(&env), before);
    // Each child runs on a stack mapped in the driver's memory until it execs; a stack
    // not unmapped afterwards would add two mappings per cycle. Other tests of this
    // binary run meanwhile, hence the slack.
    let grown = mappings()?.saturating_sub(mappings_before);
    assert!(grown < 100, "{grown} more mappings after 200 cycles");
    Ok(())
}

#[tokio::test]
async fn exited_sandbox_is_reported_and_destroyable() -> anyhow::Result<()> {
    let env = TestEnv::new("exit")?;
    let id = env.id("exit");
    let info = env.driver.create(env.spec("exit")).await?;
    // Kill PID 1 behind the driver's back.
    // SAFETY-free: kill(2) of the sandbox init we just created.
    Command::new("kill").args(["-9", &info.pid.to_string()]).status()?;
    assert!(
        eventually(Duration::from_secs(5), async || env
            .driver
            .inspect(&id)
            .is_ok_and(|i| i.state == SandboxState::Exited))
        .await
    );
    let info = env.driver.inspect(&id)?;
    assert_eq!(info.exit, Some(ExitStatus::Signal(9)));
    assert_eq!(info.reason, Some(Reason::Exited));
    env.driver.destroy(&id).await?;
    Ok(())
}

/// How many memory mappings this process has.
fn mappings() -> anyhow::Result<usize> {
    Ok(std::fs::read_to_string("/proc/self/maps")?.lines().count())
}

/// The example binary that creates a sandbox and then waits to be killed.
fn hold_sandbox_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>/examples/hold_sandbox
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("examples/hold_sandbox"))
        .expect("target dir")
}

#[tokio::test]
async fn after_the_owner_is_sigkilled_a_new_driver_adopts_and_destroys() -> anyhow::Result<()> {
    let env = TestEnv::new("crash")?;
    let before = artefacts(&env);
    let mut owner = Command::new(hold_sandbox_binary())
        .arg(env.dir.path())
        .arg(&env.cgroup_parent)
        .arg(hutch_testkit::sandboxd_path())
        .arg("survivor")
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(owner.stdout.take().expect("piped stdout")),
        &mut line,
    )?;
    assert_eq!(line.trim(), "ready");
    owner.kill()?;
    owner.wait()?;

    // A sandbox whose init died while nobody owned it, to be swept.
    let dead_pid: i32 = {
        let state = std::fs::read_to_string(env.dir.path().join("run/survivor/state.json"))?;
        let value: serde_json::Value = serde_json::from_str(&state)?;
        value["pid"].as_i64().unwrap_or_default() as i32
    };
    assert!(dead_pid > 0);

    let driver = env.reopen()?;
    let report = driver.adopt().await?;
    assert_eq!(report.adopted, vec![env.id("survivor")]);
    let id = env.id("survivor");
    let info = driver.inspect(&id)?;
    assert_eq!(info.state, SandboxState::Running);
    assert_eq!(info.pid, dead_pid);
    let (status, _) = request(&driver.sandboxd_socket(&id), "GET", "/health", None).await?;
    assert_eq!(status, 200);

    driver.destroy(&id).await?;
    assert_eq!(artefacts(&env), before);
    Ok(())
}

#[tokio::test]
async fn leftovers_of_a_dead_sandbox_are_swept() -> anyhow::Result<()> {
    let env = TestEnv::new("sweep")?;
    let before = artefacts(&env);
    let mut owner = Command::new(hold_sandbox_binary())
        .arg(env.dir.path())
        .arg(&env.cgroup_parent)
        .arg(hutch_testkit::sandboxd_path())
        .arg("ghost")
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(owner.stdout.take().expect("piped stdout")),
        &mut line,
    )?;
    assert_eq!(line.trim(), "ready");
    owner.kill()?;
    owner.wait()?;
    // The sandbox dies too while nobody owns it: only its leftovers remain.
    let cgroup = env.driver.cgroup(&env.id("ghost"));
    cgroup.kill_all()?;
    assert!(
        eventually(Duration::from_secs(5), async || cgroup.pids().is_ok_and(|p| p.is_empty()))
            .await
    );
    assert_ne!(artefacts(&env), before);

    let driver = env.reopen()?;
    let report = driver.sweep().await?;
    assert_eq!(report.removed, vec!["ghost".to_owned()]);
    assert_eq!(artefacts(&env), before);
    // Nothing to adopt afterwards.
    assert_eq!(driver.adopt().await?, Default::default());
    Ok(())
}
