//! The command line: malformed invocations fail with one line on stderr and
//! status 2; an unreachable server with one line and status 1.

mod support;

use support::Hutch;

#[tokio::test]
async fn malformed_command_lines_exit_2_with_one_line() {
    let cases: &[&[&str]] = &[
        &[],
        &["bogus"],
        &["run"],
        &["run", "--bogus"],
        &["sandbox", "exec", "abc", "--bogus"],
        &["run", "--memory", "12x", "--", "true"],
        &["run", "--timeout", "soon", "--", "true"],
        &["run", "--env", "NOEQUALS", "--", "true"],
        &["run", "--network", "wifi", "--", "true"],
        &["sandbox"],
        &["sandbox", "exec", "abc"],
        &["sandbox", "cp", "only-one"],
        &["sandbox", "cp", "./a", "./b"],
        &["sandbox", "cp", "abc:/x", "def:/y"],
        &["sandbox", "cp", "abc:relative", "./b"],
        &["sandbox", "ls", "--tag", "novalue"],
        &["sandbox", "rm"],
        &["image", "pull"],
        &["node"],
        &["node", "get"],
        &["namespace", "create"],
        &["namespace", "rm"],
        &["sandbox", "ls", "--url", "ftp://example.invalid"],
    ];
    for args in cases {
        let output = Hutch::new().args(*args).run().await;
        assert!(output.stdout.is_empty(), "{args:?}: stdout {:?}", output.stdout_text());
        assert_eq!(output.code, Some(2), "{args:?}: {}", output.stderr);
        assert_eq!(output.stderr.lines().count(), 1, "{args:?}: {:?}", output.stderr);
        assert!(output.stderr.starts_with("hutch: "), "{args:?}: {:?}", output.stderr);
    }
}

#[tokio::test]
async fn run_cannot_bypass_the_server() {
    let output = Hutch::new()
        .env("HUTCH_DAEMON_URL", "http://127.0.0.1:9")
        .args(["run", "--", "true"])
        .run()
        .await;
    output.assert_one_line_failure(2);
}

#[tokio::test]
async fn help_and_version_succeed() {
    for args in [&["--help"][..], &["--version"], &["sandbox", "cp", "--help"], &["run", "--help"]]
    {
        let output = Hutch::new().args(args).run().await;
        assert_eq!(output.code, Some(0), "{args:?}: {}", output.stderr);
        assert!(!output.stdout.is_empty(), "{args:?}");
    }
}

#[tokio::test]
async fn an_unreachable_server_is_one_line_and_status_1() {
    // Port 9 (discard) on loopback: nothing listens there in a test machine.
    for args in [
        &["sandbox", "ls"][..],
        &["sandbox", "get", "abc"],
        &["sandbox", "rm", "abc"],
        &["run", "--", "true"],
        &["image", "ls"],
        &["node", "ls"],
        &["namespace", "rm", "team"],
    ] {
        let output = Hutch::new()
            .env("HUTCH_URL", "http://127.0.0.1:9")
            .env("HUTCH_API_KEY", "k")
            .args(args)
            .run()
            .await;
        output.assert_one_line_failure(1);
        assert!(output.stderr.contains("cannot reach http://127.0.0.1:9"), "{}", output.stderr);
    }
    // The connection flags go anywhere on the line and win over the
    // environment.
    for args in [
        &["--url", "http://127.0.0.1:9", "--api-key", "k", "sandbox", "ls"][..],
        &["sandbox", "--url", "http://127.0.0.1:9", "ls"],
        &["sandbox", "ls", "--url", "http://127.0.0.1:9", "--namespace", "n"],
    ] {
        let output = Hutch::new().env("HUTCH_URL", "http://127.0.0.1:1").args(args).run().await;
        output.assert_one_line_failure(1);
        assert!(output.stderr.contains("cannot reach http://127.0.0.1:9"), "{}", output.stderr);
    }
}

#[tokio::test]
async fn the_local_admin_key_is_read_from_the_data_dir() {
    // An unreadable key file (a directory in its place) is reported, with
    // where the key should come from instead.
    let data_dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(data_dir.path().join("admin.key")).unwrap();
    let output = Hutch::new()
        .env("HUTCH_DATA_DIR", data_dir.path())
        .env("HUTCH_URL", "http://127.0.0.1:9")
        .args(["sandbox", "ls"])
        .run()
        .await;
    output.assert_one_line_failure(1);
    assert!(output.stderr.contains("admin.key"), "{}", output.stderr);
    assert!(output.stderr.contains("HUTCH_API_KEY"), "{}", output.stderr);
}
