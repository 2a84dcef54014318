//! sandboxd as PID 1: orphans are reaped, shutdown is orderly, and a
//! child's crash never takes sandboxd down.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{Sandboxd, assert_error, eventually, zombie_children};

#[tokio::test]
async fn orphans_are_reaped_even_when_not_pid_1() {
    let sandboxd = Sandboxd::start();
    for _ in 0..10 {
        // The shell exits at once; its background children are orphaned
        // and re-parented to sandboxd, the subreaper.
        sandboxd.sh("for i in 1 2 3 4 5; do (sleep 0.05 &); done; exit 0").await;
    }
    let pid = sandboxd.pid();
    assert!(
        eventually(Duration::from_secs(10), async || zombie_children(pid).is_empty()).await,
        "zombies left: {:?}",
        zombie_children(pid)
    );
}

#[tokio::test]
async fn as_pid_1_it_reaps_orphans_of_the_whole_namespace() {
    let mut command = Command::new("unshare");
    command.args(["--pid", "--fork", "--mount-proc", "--kill-child"]);
    command.arg(env!("CARGO_BIN_EXE_sandboxd")).args(["--listen", "tcp:127.0.0.1:0"]);
    let sandboxd = Sandboxd::spawn(command);
    let (_, info) = sandboxd.get("/info").await;
    assert_eq!(info["pid"], 1);
    for _ in 0..5 {
        sandboxd.sh("for i in 1 2 3 4 5; do (sleep 0.05 &); done; exit 0").await;
    }
    // Inside the namespace /proc shows only its processes: no zombies.
    let clean = eventually(Duration::from_secs(10), async || {
        let result = sandboxd.sh("cat /proc/[0-9]*/stat 2>/dev/null").await;
        let stats = result["stdout"].as_str().unwrap().to_owned();
        !stats.lines().any(|line| {
            line.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
    })
    .await;
    assert!(clean, "zombies remained in the pid namespace");
}

#[tokio::test]
async fn a_crashing_child_never_takes_sandboxd_down() {
    let sandboxd = Sandboxd::start();
    let result = sandboxd.sh("kill -SEGV $$").await;
    assert_eq!(result["signal"], 11);
    let result = sandboxd.sh("kill -ABRT $$").await;
    assert_eq!(result["signal"], 6);
    // A child that closes its pipes early and then writes gets SIGPIPE,
    // not sandboxd.
    let result = sandboxd.sh("exec 1>&-; exec 2>&-; sleep 0.05; echo lost").await;
    assert!(result["exit_code"].is_number() || result["signal"].is_number());
    let (status, _) = sandboxd.get("/health").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn sigterm_stops_every_process_within_the_grace_period_then_exits() {
    let mut sandboxd = Sandboxd::start_with(&["--grace-secs", "1"]);
    let polite = sandboxd
        .start_process(json!({
            "command": "sh",
            "args": ["-c", "trap 'exit 0' TERM; echo armed; while :; do sleep 0.05; done"],
        }))
        .await as u32;
    // `exec` keeps the ignored disposition, so the sleep itself ignores TERM.
    let stubborn = sandboxd
        .start_process(
            json!({"command": "sh", "args": ["-c", "trap '' TERM; echo armed; exec sleep 100"]}),
        )
        .await as u32;
    // SIGTERM before a trap is set would kill the shell at once, which says
    // nothing about the grace period: wait until both are armed.
    for pid in [polite, stubborn] {
        let armed = eventually(Duration::from_secs(10), async || {
            sandboxd.output(pid).await.0 == b"armed\n"
        })
        .await;
        assert!(armed, "process {pid} never armed its trap");
    }
    let started = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sandboxd.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = sandboxd.wait_exit(Duration::from_secs(15)).await;
    let took = started.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        took >= Duration::from_millis(900),
        "the stubborn process got its grace period ({took:?})"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    for pid in [polite, stubborn] {
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "process {pid} survived");
    }
}

#[tokio::test]
async fn listens_on_a_unix_socket_and_signals_readiness() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sandboxd.sock");
    let (read, write) = nix::unistd::pipe().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_sandboxd"));
    command.arg("--listen").arg(format!("unix:{}", socket.display()));
    command.args(["--listen", "tcp:127.0.0.1:0", "--ready-fd", "3"]);
    let write_fd = std::os::fd::AsRawFd::as_raw_fd(&write);
    // SAFETY: dup2 in the child is async-signal-safe; it moves the pipe's
    // write end to fd 3, where sandboxd expects it.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
            if libc::dup2(write_fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let sandboxd = Sandboxd::spawn(command);
    drop(write);
    let mut byte = [0u8; 1];
    let n = nix::unistd::read(&read, &mut byte).unwrap();
    assert_eq!((n, byte[0]), (1, b'1'));
    assert!(socket.exists());
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    use std::io::{Read, Write};
    stream.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with(r#"{"status":"ok"}"#), "{response}");
    drop(sandboxd);
}

#[tokio::test]
async fn as_pid_1_shutdown_reaches_orphans_it_never_started() {
    let markers = tempfile::tempdir().unwrap();
    let mut command = Command::new("unshare");
    command.args(["--pid", "--fork", "--mount-proc", "--kill-child"]);
    command.arg(env!("CARGO_BIN_EXE_sandboxd")).args([
        "--listen",
        "tcp:127.0.0.1:0",
        "--grace-secs",
        "5",
    ]);
    let mut sandboxd = Sandboxd::spawn(command);
    // Each orphan runs in its own session, out of every process group
    // sandboxd started, so only PID 1's `kill(-1)` reaches it. Its TERM trap
    // leaves a marker; the kernel's SIGKILL at namespace teardown would not.
    let script = format!(
        "for i in 1 2 3; do setsid sh -c 'trap \"touch {dir}/$1; exit 0\" TERM; echo up > {dir}/up$1; while :; do sleep 0.05; done' sh $i & done; exit 0",
        dir = markers.path().display()
    );
    assert_eq!(sandboxd.sh(&script).await["exit_code"], 0);
    let all_up = eventually(Duration::from_secs(10), async || {
        (1..=3).all(|i| markers.path().join(format!("up{i}")).exists())
    })
    .await;
    assert!(all_up, "orphans did not start");
    let unshare = sandboxd.pid();
    let children =
        std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children")).unwrap();
    let inner: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(inner), nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    let status = sandboxd.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}");
    for i in 1..=3 {
        assert!(markers.path().join(i.to_string()).exists(), "orphan {i} never got SIGTERM");
    }
}

#[tokio::test]
async fn a_main_command_starts_before_readiness_as_the_default_user() {
    let sandboxd = Sandboxd::start_with(&[
        "--default-user",
        "65534",
        "--main-tag",
        "app",
        "--",
        "sh",
        "-c",
        "echo main as $(id -u); exec sleep 100",
    ]);
    // Readiness (the listening line) comes after the main command started,
    // so it is there at once.
    let (status, info) = sandboxd.get("/processes/app").await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["status"], "running");
    assert!(
        eventually(Duration::from_secs(10), async || sandboxd.output("app").await.0
            == b"main as 65534\n")
        .await
    );
    assert_eq!(sandboxd.sh("id -u").await["stdout"], "65534\n");
    let (_, as_root) =
        sandboxd.post("/exec", json!({"command": "id", "args": ["-u"], "user": "0"})).await;
    assert_eq!(as_root["stdout"], "0\n");
}

#[test]
fn a_main_command_that_cannot_start_stops_sandboxd_with_a_clear_message() {
    let output = Command::new(env!("CARGO_BIN_EXE_sandboxd"))
        .args(["--listen", "tcp:127.0.0.1:0", "--", "/no/such/program"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("starting the main command") && stderr.contains("/no/such/program"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty(), "it must not announce readiness");

    let output = Command::new(env!("CARGO_BIN_EXE_sandboxd"))
        .args(["--listen", "tcp:127.0.0.1:0", "--default-user", "nosuchuser"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("nosuchuser"));
}

#[tokio::test]
async fn hutch_user_sets_the_default_user_and_is_not_inherited() {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sandboxd"));
    command.args(["--listen", "tcp:127.0.0.1:0"]).env("HUTCH_USER", "65534:65534");
    let sandboxd = Sandboxd::spawn(command);
    let result = sandboxd.sh("id -u; id -g; env | grep -c HUTCH_USER || true").await;
    assert_eq!(result["stdout"], "65534\n65534\n0\n");
}

/// `--end-with-main`: a main command that leaves a process behind and exits ends
/// everything; results stay readable and nothing new starts.
#[tokio::test]
async fn ending_with_main_kills_what_it_left_and_starts_nothing_more() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("left");
    let script = format!("sleep 1000 & echo $! > {}; echo finished; exit 4", pidfile.display());
    let sandboxd = Sandboxd::start_with(&["--end-with-main", "--", "sh", "-c", &script]);
    let main = sandboxd.wait("main").await;
    assert_eq!(main["exit"]["exit_code"], 4, "{main}");
    let left: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    let gone = eventually(Duration::from_secs(10), async || {
        // Reaped by sandboxd, or at least dead (a zombie until then).
        std::fs::read_to_string(format!("/proc/{left}/stat"))
            .map_or(true, |stat| stat.split_whitespace().nth(2) == Some("Z"))
    })
    .await;
    assert!(gone, "the process main left behind still runs");
    let refused = sandboxd.post("/exec", json!({"command": "true"})).await;
    assert_error(&refused, 409, "main_exited");
    assert_eq!(sandboxd.output("main").await.0, b"finished\n");
}

/// Every process sandboxd starts, and whatever it forks at once, carries the OOM
/// score sandboxd was given; sandboxd keeps its own.
#[tokio::test]
async fn children_carry_the_oom_score_from_their_first_instruction() {
    let sandboxd = Sandboxd::start_with(&["--child-oom-score-adj", "1000"]);
    // The shell's first fork happens before any outsider could write the score.
    let out =
        sandboxd.sh("cat /proc/self/oom_score_adj; sh -c 'cat /proc/self/oom_score_adj'").await;
    assert_eq!(out["stdout"], "1000\n1000\n", "{out}");
    let (_, as_nobody) = sandboxd
        .post(
            "/exec",
            json!({"command": "cat", "args": ["/proc/self/oom_score_adj"], "user": "65534"}),
        )
        .await;
    assert_eq!(as_nobody["stdout"], "1000\n", "{as_nobody}");
    let own = std::fs::read_to_string(format!("/proc/{}/oom_score_adj", sandboxd.pid())).unwrap();
    assert_eq!(own.trim(), "0");
}
