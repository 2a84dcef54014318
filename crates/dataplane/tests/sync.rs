//! The dataplane against a real gRPC `Node` server driven by the test: the
//! desired state goes in, the node's reports come out. Runs as root and starts
//! real sandboxes.

mod support;

use std::time::Duration;

use hutch_proto::node::ObservedPhase;
use support::{TestNode, new_id, run, spec, stop};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desired_sandbox_is_created_once_and_reported_creating_then_running() -> anyhow::Result<()>
{
    let node = TestNode::start("create").await?;
    let id = new_id();
    node.server.set_desired(vec![run(spec(&id, &[], &[]))]);
    let running = node.server.wait_phase(&id, ObservedPhase::ObservedRunning).await?;
    assert!(running.started_at_ms > 0);

    let history = node.server.history(&id);
    assert_eq!(history[0].phase, ObservedPhase::ObservedCreating as i32, "{history:?}");
    assert_eq!(history[0].reason, "creating");
    assert!(node.server.all_authorized());
    assert!(node.server.registrations() >= 1);

    // The same desired state again and again: nothing is created twice (a
    // second create of the id would fail and be reported as FAILED).
    for _ in 0..5 {
        node.server.set_desired(vec![run(spec(&id, &[], &[]))]);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reports_before = node.server.report_count();
    hutch_testkit::eventually(Duration::from_secs(10), || async {
        node.server.report_count() > reports_before + 2
    })
    .await;
    let history = node.server.history(&id);
    assert!(
        history
            .iter()
            .skip_while(|s| s.phase == ObservedPhase::ObservedCreating as i32)
            .all(|s| s.phase == ObservedPhase::ObservedRunning as i32
                && s.started_at_ms == running.started_at_ms),
        "{history:?}"
    );
    let (status, body) = node.sandboxd(&id, "GET", "/health", None).await?;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_exits_is_reported_exited_with_its_code() -> anyhow::Result<()> {
    let node = TestNode::start("exit").await?;
    let id = new_id();
    node.server.set_desired(vec![run(spec(&id, &["sh", "-c", "exit 3"], &[]))]);
    let exited = node.server.wait_phase(&id, ObservedPhase::ObservedExited).await?;
    assert_eq!(exited.exit_code, Some(3));
    assert_eq!(exited.reason, "exited");
    assert!(exited.finished_at_ms >= exited.started_at_ms);

    // A finished sandbox is never restarted, however often RUN is repeated;
    // its sandboxd stays up so the command's output can still be read.
    node.server.set_desired(vec![run(spec(&id, &["sh", "-c", "exit 3"], &[]))]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let latest = node.server.wait_phase(&id, ObservedPhase::ObservedExited).await?;
    assert_eq!(latest.finished_at_ms, exited.finished_at_ms);
    let (status, body) = node.sandboxd(&id, "GET", "/processes/main", None).await?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""exit_code":3"#), "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_then_absence_stops_destroys_and_forgets() -> anyhow::Result<()> {
    let node = TestNode::start("stop").await?;
    let id = new_id();
    let sandbox = spec(&id, &["sleep", "600"], &[]);
    node.server.set_desired(vec![run(sandbox.clone())]);
    node.server.wait_phase(&id, ObservedPhase::ObservedRunning).await?;
    assert_eq!(node.cgroup_ids(), vec![id.clone()]);

    node.server.set_desired(vec![stop(sandbox, 1)]);
    let stopped = node.server.wait_phase(&id, ObservedPhase::ObservedStopped).await?;
    assert_eq!(stopped.reason, "stopped");
    let (status, body) = node.sandboxd(&id, "GET", "/health", None).await?;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(r#""state":"stopped""#), "{body}");

    node.server.set_desired(vec![]);
    node.server.wait_gone(&id).await?;
    // Reports drop it at once; its artefacts go as the destroy completes.
    let run_dir = node.dir.path().join("run").join(&id);
    let record = node.dir.path().join("data/sandboxes").join(format!("{id}.json"));
    let gone = || async { node.cgroup_ids().is_empty() && !run_dir.exists() && !record.exists() };
    assert!(
        hutch_testkit::eventually(Duration::from_secs(10), gone).await,
        "left: cgroups {:?}, run dir {}, record {}",
        node.cgroup_ids(),
        run_dir.exists(),
        record.exists()
    );
    let (status, _) = node.sandboxd(&id, "GET", "/health", None).await?;
    assert_eq!(status, 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_dataplane_readopts_its_running_sandboxes() -> anyhow::Result<()> {
    let mut node = TestNode::start("restart").await?;
    let id = new_id();
    node.server.set_desired(vec![run(spec(&id, &["sleep", "600"], &[]))]);
    let before = node.server.wait_phase(&id, ObservedPhase::ObservedRunning).await?;
    let (status, main_before) = node.sandboxd(&id, "GET", "/processes/main", None).await?;
    assert_eq!(status, 200, "{main_before}");
    let pid = serde_json::from_str::<serde_json::Value>(&main_before)?["pid"].clone();

    // Gone without stopping anything, as after a crash.
    node.close().await?;
    let registrations = node.server.registrations();
    node.open().await?;
    assert!(
        hutch_testkit::eventually(Duration::from_secs(10), || async {
            node.server.registrations() > registrations
        })
        .await
    );
    // The first report of the new session already lists it as running.
    let reports = node.server.report_count();
    assert!(
        hutch_testkit::eventually(Duration::from_secs(10), || async {
            node.server.report_count() > reports
        })
        .await
    );
    let after = node.server.wait_phase(&id, ObservedPhase::ObservedRunning).await?;
    assert_eq!(after.started_at_ms, before.started_at_ms);
    let (status, main_after) = node.sandboxd(&id, "GET", "/processes/main", None).await?;
    assert_eq!(status, 200, "{main_after}");
    let main_after: serde_json::Value = serde_json::from_str(&main_after)?;
    assert_eq!(main_after["pid"], pid);
    assert_eq!(main_after["status"], "running");

    // The re-adopted sandbox's main command is watched again.
    node.sandboxd(&id, "POST", "/processes/main/kill", None).await?;
    let exited = node.server.wait_phase(&id, ObservedPhase::ObservedExited).await?;
    assert_eq!(exited.exit_code, Some(128 + 9));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_killed_by_the_oom_killer_is_reported_with_reason_oom() -> anyhow::Result<()> {
    let node = TestNode::start("oom").await?;
    let id = new_id();
    let mut sandbox = spec(&id, &["/usr/bin/python3", "-c", "b = bytearray(400 << 20)"], &[]);
    // Memory and disk share the cgroup: 96 + 16 MiB, far below what it asks.
    sandbox.resources =
        Some(hutch_proto::node::Resources { memory_mb: 96, disk_mb: 16, ..Default::default() });
    node.server.set_desired(vec![run(sandbox)]);
    let exited = node.server.wait_phase(&id, ObservedPhase::ObservedExited).await?;
    assert_eq!((exited.reason.as_str(), exited.exit_code), ("oom", Some(128 + 9)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_whose_init_dies_is_reported_failed() -> anyhow::Result<()> {
    let node = TestNode::start("died").await?;
    let id = new_id();
    node.server.set_desired(vec![run(spec(&id, &[], &[]))]);
    node.server.wait_phase(&id, ObservedPhase::ObservedRunning).await?;
    let sandboxd = node
        .pids(&id)
        .into_iter()
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "sandboxd")
        })
        .expect("sandboxd runs in the sandbox's cgroup");
    // SAFETY: kill has no memory-safety preconditions; the pid is the sandbox's init.
    assert_eq!(unsafe { libc::kill(sandboxd, libc::SIGKILL) }, 0);
    let failed = node.server.wait_phase(&id, ObservedPhase::ObservedFailed).await?;
    assert_eq!(failed.reason, "sandbox_died");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_reconnects_to_a_returning_server_and_keeps_its_sandboxes() -> anyhow::Result<()> {
    let mut node = TestNode::start("reconnect").await?;
    let id = new_id();
    let desired = vec![run(spec(&id, &["sleep", "600"], &[]))];
    node.server.set_desired(desired.clone());
    let before = node.server.wait_phase(&id, ObservedPhase::ObservedRunning).await?;

    let addr = node.server.addr;
    node.server.stop().await;
    // Unreachable for a while: nothing is stopped or forgotten meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, _) = node.sandboxd(&id, "GET", "/health", None).await?;
    assert_eq!(status, 200);

    node.server = support::TestServer::start_on(addr).await?;
    node.server.set_desired(desired);
    let after = node.server.wait_phase(&id, ObservedPhase::ObservedRunning).await?;
    assert_eq!(after.started_at_ms, before.started_at_ms);
    assert!(node.server.registrations() >= 1 && node.server.all_authorized());
    Ok(())
}
