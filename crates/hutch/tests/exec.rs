//! `sandbox exec`, `shell` and `logs` against a real sandboxd: output
//! streamed byte for byte to the right stream, stdin forwarded, the exit
//! status passed on.

mod support;

use std::time::Duration;

use hutch_testkit::eventually;
use serde_json::json;
use support::{Sandboxd, finish};

#[tokio::test]
async fn exec_separates_the_streams_byte_for_byte_and_exits_with_the_code() {
    let sandboxd = Sandboxd::start();
    let script = r#"printf 'out\000\377\n'; printf 'err\n' >&2; exit 7"#;
    let output =
        sandboxd.hutch().args(["sandbox", "exec", "sb", "--", "sh", "-c", script]).run().await;
    assert_eq!(output.code, Some(7), "{}", output.stderr);
    assert_eq!(output.stdout, b"out\x00\xff\n");
    assert_eq!(output.stderr, "err\n");
}

#[tokio::test]
async fn exec_passes_env_workdir_and_arguments_verbatim() {
    let sandboxd = Sandboxd::start();
    let output = sandboxd
        .hutch()
        .args(["sandbox", "exec", "sb", "-e", "GREETING=a b=c", "-w", "/tmp", "--"])
        .args(["sh", "-c", r#"printf '%s|%s|%s' "$GREETING" "$(pwd)" "$1""#, "sh", "--not-a-flag"])
        .run()
        .await;
    assert_eq!(output.code, Some(0), "{}", output.stderr);
    assert_eq!(output.stdout_text(), "a b=c|/tmp|--not-a-flag");

    // Without `--`, everything from the command on is the command's.
    let output = sandboxd.hutch().args(["sandbox", "exec", "sb", "echo", "-n", "--x"]).run().await;
    assert_eq!(output.code, Some(0), "{}", output.stderr);
    assert_eq!(output.stdout_text(), "--x");
}

#[tokio::test]
async fn a_signal_exits_with_128_plus_its_number() {
    let sandboxd = Sandboxd::start();
    let output = sandboxd
        .hutch()
        .args(["sandbox", "exec", "sb", "--", "sh", "-c", "kill -9 $$"])
        .run()
        .await;
    assert_eq!(output.code, Some(137), "{}", output.stderr);
}

#[tokio::test]
async fn a_command_that_cannot_start_exits_127_with_one_line() {
    let sandboxd = Sandboxd::start();
    let output =
        sandboxd.hutch().args(["sandbox", "exec", "sb", "--", "/no/such/program"]).run().await;
    output.assert_one_line_failure(127);
    assert!(output.stderr.contains("spawn_failed"), "{}", output.stderr);
}

#[tokio::test]
async fn piped_stdin_is_forwarded_whole_and_closed() {
    let sandboxd = Sandboxd::start();
    let input: Vec<u8> =
        (0..3 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let output = sandboxd
        .hutch()
        .args(["sandbox", "exec", "sb", "--", "cat"])
        .stdin(input.clone())
        .run()
        .await;
    assert_eq!(output.code, Some(0), "{}", output.stderr);
    assert_eq!(output.stdout.len(), input.len());
    assert!(output.stdout == input, "stdout differs from stdin");
}

#[tokio::test]
async fn without_input_stdin_reads_end_of_file() {
    let sandboxd = Sandboxd::start();
    // stdin is /dev/null for hutch: the command must not wait for input.
    let output = sandboxd.hutch().args(["sandbox", "exec", "sb", "--", "wc", "-c"]).run().await;
    assert_eq!(output.code, Some(0), "{}", output.stderr);
    assert_eq!(output.stdout_text().trim(), "0");
}

#[tokio::test]
async fn a_timeout_kills_the_command() {
    let sandboxd = Sandboxd::start();
    let output = sandboxd
        .hutch()
        .args(["sandbox", "exec", "sb", "--timeout", "1", "--", "sleep", "30"])
        .run()
        .await;
    assert_eq!(output.code, Some(137), "{}", output.stderr);
    assert!(output.stderr.contains("timed out"), "{}", output.stderr);
}

#[tokio::test]
async fn ctrl_c_is_passed_on_to_the_command() {
    let sandboxd = Sandboxd::start();
    let child = sandboxd
        .hutch()
        .args([
            "sandbox",
            "exec",
            "sb",
            "--",
            "sh",
            "-c",
            "trap 'echo got-int; exit 5' INT; echo ready; while :; do sleep 0.05; done",
        ])
        .spawn();
    let pid = child.id().expect("hutch pid");
    // Wait until the trap is set (the command said so), then press Ctrl-C.
    let started = eventually(Duration::from_secs(20), async || {
        let processes = sandboxd.get("/processes").await;
        let Some(p) = processes.as_array().and_then(|a| a.first()).cloned() else { return false };
        p["output_bytes"].as_u64().unwrap_or(0) >= 6
    })
    .await;
    assert!(started, "the command never started");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let output = finish(child).await;
    assert_eq!(output.code, Some(5), "{}", output.stderr);
    assert_eq!(output.stdout_text(), "ready\ngot-int\n");
}

#[tokio::test]
async fn shell_runs_under_a_terminal_and_exits_with_its_status() {
    let sandboxd = Sandboxd::start();
    // Not a terminal on our side: no raw mode, but the remote end still has
    // a PTY (stdout and stderr merged, `tty` succeeds).
    let output = sandboxd
        .hutch()
        .args(["sandbox", "shell", "sb", "--", "sh"])
        .stdin("tty >/dev/null && echo on-a-tty; echo to-stderr >&2; exit 3\n")
        .run()
        .await;
    assert_eq!(output.code, Some(3), "{}", output.stderr);
    let stdout = output.stdout_text();
    assert!(stdout.contains("on-a-tty\r\n"), "{stdout:?}");
    assert!(stdout.contains("to-stderr\r\n"), "{stdout:?}");
    assert!(output.stderr.is_empty(), "{}", output.stderr);
}

#[tokio::test]
async fn logs_print_the_main_process_output_and_follow_it() {
    let sandboxd = Sandboxd::start();

    let missing = sandboxd.hutch().args(["sandbox", "logs", "sb"]).run().await;
    missing.assert_one_line_failure(1);
    assert!(missing.stderr.contains("no main command"), "{}", missing.stderr);

    sandboxd
        .post(
            "/processes",
            json!({"command": "sh", "args": ["-c", "echo one; echo two >&2; read line; echo $line"],
                   "stdin": "pipe", "tag": "main"}),
        )
        .await;
    let have_two = eventually(Duration::from_secs(20), async || {
        sandboxd.get("/processes/main").await["output_bytes"].as_u64() == Some(8)
    })
    .await;
    assert!(have_two, "main did not write its first lines");

    let now = sandboxd.hutch().args(["sandbox", "logs", "sb"]).run().await;
    assert_eq!(now.code, Some(0), "{}", now.stderr);
    assert_eq!(now.stdout_text(), "one\n");
    assert_eq!(now.stderr, "two\n");

    // -f keeps streaming until main exits.
    let follower = sandboxd.hutch().args(["sandbox", "logs", "-f", "sb"]).spawn();
    let response = reqwest::Client::new()
        .post(format!("{}/processes/main/stdin?close=true", sandboxd.base))
        .body("three\n")
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let followed = finish(follower).await;
    assert_eq!(followed.code, Some(0), "{}", followed.stderr);
    assert_eq!(followed.stdout_text(), "one\nthree\n");
    assert_eq!(followed.stderr, "two\n");
}

#[tokio::test]
async fn a_closed_stdout_stops_and_kills_the_command() {
    let sandboxd = Sandboxd::start();
    let mut child = sandboxd.hutch().args(["sandbox", "exec", "sb", "--", "yes"]).spawn();
    // Read a little of `yes`, then close the pipe as `| head -1` would.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 2];
    tokio::io::AsyncReadExt::read_exact(&mut stdout, &mut first).await.unwrap();
    assert_eq!(&first, b"y\n");
    drop(stdout);
    let output = finish(child).await;
    assert_eq!(output.code, Some(141), "{}", output.stderr);
    assert!(output.stderr.is_empty(), "{}", output.stderr);
    let killed = eventually(Duration::from_secs(20), async || {
        let processes = sandboxd.get("/processes").await;
        processes.as_array().unwrap().iter().all(|p| p["status"] == "exited")
    })
    .await;
    assert!(killed, "yes still runs in the sandbox");
}

/// A TCP forwarder to `target` that cuts the first attach WebSocket after a
/// few hundred bytes of its answer, as a restarting server or a flaky
/// network would; everything else passes through.
async fn forwarder_cutting_the_first_attach(target: &str) -> String {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let target = target.trim_start_matches("http://").to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let cut = Arc::new(AtomicBool::new(false));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(upstream) = tokio::net::TcpStream::connect(&target).await else { continue };
            let cut = cut.clone();
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut upstream_read, mut upstream_write) = upstream.into_split();
                let mut head = vec![0u8; 8192];
                let Ok(n) = client_read.read(&mut head).await else { return };
                let cut_this = String::from_utf8_lossy(&head[..n]).contains("/attach")
                    && !cut.swap(true, Ordering::SeqCst);
                if upstream_write.write_all(&head[..n]).await.is_err() {
                    return;
                }
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut upstream_write).await;
                });
                if cut_this {
                    let mut limited = (&mut upstream_read).take(400);
                    let _ = tokio::io::copy(&mut limited, &mut client_write).await;
                    // Dropping both halves closes the connection mid-stream.
                } else {
                    let _ = tokio::io::copy(&mut upstream_read, &mut client_write).await;
                }
            });
        }
    });
    format!("http://{address}")
}

#[tokio::test]
async fn a_lost_connection_resumes_where_the_output_stopped() {
    let sandboxd = Sandboxd::start();
    let flaky = forwarder_cutting_the_first_attach(&sandboxd.base).await;
    let script =
        "i=0; while [ $i -lt 200 ]; do i=$((i+1)); echo line $i; sleep 0.005; done; exit 3";
    let output = support::Hutch::new()
        .env("HUTCH_DAEMON_URL", &flaky)
        .args(["sandbox", "exec", "sb", "--", "sh", "-c", script])
        .run()
        .await;
    assert_eq!(output.code, Some(3), "{}", output.stderr);
    let expected: String = (1..=200).map(|i| format!("line {i}\n")).collect();
    assert_eq!(output.stdout_text(), expected);
}
