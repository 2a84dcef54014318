//! Attacks by a sandbox's own root on what the driver hands it: sandboxd's socket,
//! its descriptors, and what is left once its main command exited. Runs as root;
//! every target is another sandbox of the same test or a file in the test's temp
//! dir, so a missing defence fails the test and harms nothing.

mod support;

use std::os::fd::AsRawFd as _;
use std::time::Duration;

use hutch_isolate::{ConnectSandboxdError, SandboxState};
use hutch_testkit::sandboxd_request as request;
use support::TestEnv;

/// The attack: root in sandbox A makes the node's daemon calls for A land at
/// another socket: sandbox B's sandboxd (to run commands in B), or any host socket
/// (a container engine's). The first version let A replace its socket with a
/// symlink before it was sealed. Now no path of the socket exists inside any
/// sandbox, and even a socket swapped on the host is refused: whoever listens
/// must be A's PID 1.
#[tokio::test]
async fn a_sandbox_cannot_make_the_node_connect_elsewhere() -> anyhow::Result<()> {
    let env = TestEnv::new("redirect")?;
    let a = env.driver.create(env.spec("victim-a")).await?;
    let b = env.driver.create(env.spec("victim-b")).await?;

    // Inside: no socket to swap, and nothing of the host's run dir.
    let out = env
        .sh(
            "victim-a",
            "find / -xdev -type s 2>/dev/null; ls -A /.hutch; \
             grep -c hutch /proc/self/mountinfo; mount | grep -c ' /.hutch/run '",
        )
        .await?;
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines, ["sandboxd", "1", "0"], "{out:?}");

    // The daemon route connects through the check.
    let stream = env.driver.connect_sandboxd(&a.id).await?;
    drop(stream);

    // What the old attack achieved, done on the host: A's socket now leads to B's.
    let socket_a = env.driver.sandboxd_socket(&a.id);
    let socket_b = env.driver.sandboxd_socket(&b.id);
    std::fs::remove_file(&socket_a)?;
    std::os::unix::fs::symlink(&socket_b, &socket_a)?;
    match env.driver.connect_sandboxd(&a.id).await {
        Err(ConnectSandboxdError::WrongPeer { expected, found, .. }) => {
            assert_eq!((expected, found), (a.pid, b.pid));
        }
        other => panic!("connected through a swapped socket: {other:?}"),
    }
    // Any other listener at the path (here our own) is refused the same way.
    std::fs::remove_file(&socket_a)?;
    let impostor = std::os::unix::net::UnixListener::bind(&socket_a)?;
    let result = env.driver.connect_sandboxd(&a.id).await;
    assert!(matches!(result, Err(ConnectSandboxdError::WrongPeer { .. })), "{result:?}");
    drop(impostor);
    // B is untouched.
    env.driver.connect_sandboxd(&b.id).await?;
    Ok(())
}

/// The attack: root in a sandbox writes to host files through descriptors sandboxd
/// was given (its log was a host file: `echo x >> /proc/1/fd/1` grew it without
/// bound), or keeps descriptors the driver meant for sandboxd (the ready pipe).
/// Now sandboxd's descriptors lead to pipes, sockets and the sandbox's own
/// /dev/null, and every process it starts has 0, 1 and 2 only.
#[tokio::test]
async fn no_descriptor_leads_to_a_host_file() -> anyhow::Result<()> {
    let env = TestEnv::new("fds")?;
    let mut spec = env.spec("fds");
    // The main command starts before sandboxd is ready: it must not inherit the
    // ready pipe or the socket either.
    let check = "import os\n\
                 def is_open(fd):\n\
                 \x20   try:\n\
                 \x20       os.fstat(fd)\n\
                 \x20       return True\n\
                 \x20   except OSError:\n\
                 \x20       return False\n\
                 print(*[fd for fd in range(0, 1024) if is_open(fd)])\n";
    spec.command = Some(vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("python3 -c '{check}' > /tmp/main-fds; exec sleep 1000"),
    ]);
    env.driver.create(spec).await?;
    let host_dir = env.dir.path().to_string_lossy().into_owned();

    let out = env
        .sh(
            "fds",
            "for f in /proc/1/fd/*; do readlink $f; done; \
             (trap '' PIPE; for i in $(seq 1 100); do \
                echo flood >> /proc/1/fd/1; echo flood >> /proc/1/fd/2; done) 2>/dev/null; \
             echo x >> /proc/1/fd/0 2>/dev/null; echo done",
        )
        .await?;
    assert!(out.stdout.ends_with("done\n"), "{out:?}");
    for target in out.stdout.lines().filter(|l| *l != "done") {
        let allowed = target.starts_with("pipe:")
            || target.starts_with("socket:")
            || target.starts_with("anon_inode:")
            || target == "/dev/null";
        assert!(allowed, "sandboxd holds {target:?}: {out:?}");
        assert!(!target.contains(&host_dir), "{target:?} is a host path");
    }
    // Nothing in the sandbox's host directory is a file that took writes: only the
    // state record (and the socket) live there.
    let dir = env.dir.path().join("run/fds");
    let mut names: Vec<String> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    assert_eq!(names, ["root", "sock", "state.json"]);
    let state = std::fs::read_to_string(dir.join("state.json"))?;
    assert!(!state.contains("flood"));

    // A process sandboxd starts has its own 0, 1 and 2, and nothing else.
    let out = support::exec(&env.socket("fds"), "/usr/bin/python3", &["-c", check]).await?;
    assert_eq!(out.stdout, "0 1 2\n", "{out:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = env.sh("fds", "cat /tmp/main-fds").await?;
        if out.ok() && !out.stdout.is_empty() {
            assert_eq!(out.stdout, "0 1 2\n", "the main command: {out:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{out:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The attack: a main command that exits at once but leaves a process behind,
/// which goes on running, unaccounted, with the sandbox's network, until the
/// finished sandbox is removed. Once the main command exits nothing of the sandbox
/// may run, while its output and files stay readable.
#[tokio::test]
async fn nothing_runs_once_the_main_command_exited() -> anyhow::Result<()> {
    let env = TestEnv::new("ended")?;
    let mut spec = env.spec("ended");
    spec.command = Some(vec![
        "/bin/sh".into(),
        "-c".into(),
        "(trap '' TERM HUP; while :; do sleep 1; done) & echo result > /tmp/result; echo bye; exit 3"
            .into(),
    ]);
    let info = env.driver.create(spec).await?;
    let socket = env.socket("ended");
    let (status, body) =
        request(&socket, "GET", "/processes/main/wait?timeout_ms=10000", None).await?;
    assert_eq!(status, 200, "{body}");
    let main: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(main["exit"]["exit_code"], 3, "{body}");

    // Only sandboxd is left in the sandbox's cgroup.
    let cgroup = env.driver.cgroup(&info.id);
    let alone = hutch_testkit::wait_until(Duration::from_secs(10), || {
        cgroup.pids().is_ok_and(|pids| pids == [info.pid])
    });
    assert!(alone, "still running: {:?}", cgroup.pids());
    // Nothing new starts.
    let body = serde_json::json!({"command": "/bin/true"}).to_string();
    let (status, answer) = request(&socket, "POST", "/exec", Some(body)).await?;
    assert_eq!(status, 409, "{answer}");
    assert!(answer.contains("main_exited"), "{answer}");
    // The results are still there.
    let (status, output) = request(&socket, "GET", "/processes/main/output", None).await?;
    assert_eq!(status, 200, "{output}");
    let (status, file) = request(&socket, "GET", "/files?path=/tmp/result", None).await?;
    assert_eq!((status, file.as_str()), (200, "result\n"));
    env.driver.finish(&info.id).await?;
    assert_eq!(env.driver.inspect(&info.id)?.state, SandboxState::Running);
    assert!(env.driver.connect_sandboxd(&info.id).await?.as_raw_fd() > 0);
    Ok(())
}

/// The attack: a sandbox that never answers connections (its backlog full, SYNs
/// dropped) so that every proxied connection to it hangs, each on a node thread.
/// connect_port gives up at its timeout, and holds no thread while it waits.
#[tokio::test]
async fn a_port_that_never_accepts_times_out() -> anyhow::Result<()> {
    let env = TestEnv::new("tarpit")?;
    env.driver.create(env.spec("tarpit")).await?;
    let server = "import socket, time\n\
                  s = socket.socket()\n\
                  s.bind((\"127.0.0.1\", 8080)); s.listen(0)\n\
                  time.sleep(600)\n";
    let out = env.sh("tarpit", &format!("python3 -c '{server}' >/dev/null 2>&1 &")).await?;
    assert!(out.ok(), "{out:?}");
    let id = env.id("tarpit");
    let timeout = Duration::from_millis(300);
    // Fill the backlog until a connect hangs; it never takes much more than the
    // timeout, and it fails with a timeout once the queue is full.
    let mut held = Vec::new();
    let mut timed_out = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline && held.len() < 64 {
        let started = std::time::Instant::now();
        match env.driver.connect_port(&id, 8080, timeout).await {
            Ok(stream) => held.push(stream),
            Err(hutch_isolate::ConnectPortError::Timeout { port: 8080, .. }) => {
                assert!(started.elapsed() < timeout * 10, "{:?}", started.elapsed());
                timed_out = true;
                break;
            }
            // Not listening yet.
            Err(hutch_isolate::ConnectPortError::Connect { .. }) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    assert!(timed_out, "connected {} times and never hung", held.len());
    Ok(())
}
