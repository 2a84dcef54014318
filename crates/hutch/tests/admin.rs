//! The admin commands against a real `hutch up`: `hutch node ls|get` and
//! `hutch namespace ls|create|rm`.

mod platform_support;
use platform_support as support;

use std::process::{Command, Output};
use std::time::Instant;

use serde_json::json;
use support::{DEADLINE, Platform};

/// Runs the `hutch` client against `api` with the admin key.
fn hutch(api: &str, admin_key: &str, args: &[&str]) -> Output {
    Command::new(support::hutch_bin())
        .args(args)
        .env("HUTCH_URL", api)
        .env("HUTCH_API_KEY", admin_key)
        .env_remove("HUTCH_NAMESPACE")
        .output()
        .expect("run hutch")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn node_ls_shows_the_dataplane_with_what_is_allocated_of_its_capacity() {
    let platform = Platform::up();
    let api = platform.client();
    api.create("default", json!({"resources": {"cpus": 0.5, "memory_mb": 256}}));
    let deadline = Instant::now() + DEADLINE;
    let (header, row) = loop {
        let output = hutch(&platform.api(), &platform.admin_key, &["node", "ls"]);
        assert!(output.status.success(), "{}", stderr(&output));
        let text = stdout(&output);
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        // The one node of `hutch up`, once the sandbox is placed on it.
        if lines.len() == 2 && lines[1].ends_with(" 1") {
            break (lines[0].clone(), lines[1].clone());
        }
        assert!(Instant::now() < deadline, "node never showed the sandbox:\n{text}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let columns: Vec<&str> = header.split_whitespace().collect();
    assert_eq!(columns, ["ID", "STATE", "CPUS", "MEMORY", "SANDBOXES"]);
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells.len(), 5, "{row}");
    assert_eq!(cells[1], "ready", "{row}");
    assert!(cells[2].starts_with("0.5/"), "{row}");
    assert!(cells[3].starts_with("256M/"), "{row}");

    // `node get` shows the same node in full.
    let output = hutch(&platform.api(), &platform.admin_key, &["node", "get", cells[0]]);
    assert!(output.status.success(), "{}", stderr(&output));
    let node: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(node["allocated"]["memory_mb"], 256, "{node}");
    let output = hutch(&platform.api(), &platform.admin_key, &["node", "get", "no-such-node"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stderr(&output).lines().count(), 1, "{}", stderr(&output));
    assert!(stderr(&output).contains("not_found"), "{}", stderr(&output));
}

#[test]
fn namespaces_are_created_listed_and_removed() {
    let platform = Platform::up();
    let run = |args: &[&str]| hutch(&platform.api(), &platform.admin_key, args);

    let created = run(&["namespace", "create", "team"]);
    assert!(created.status.success(), "{}", stderr(&created));
    assert_eq!(stdout(&created), "team\n");
    let listed = stdout(&run(&["namespace", "ls"]));
    let names: Vec<&str> =
        listed.lines().skip(1).filter_map(|line| line.split_whitespace().next()).collect();
    assert_eq!(names, ["default", "team"], "{listed}");

    let removed = run(&["namespace", "rm", "team"]);
    assert!(removed.status.success(), "{}", stderr(&removed));
    assert_eq!(stdout(&removed), "team\n");
    assert!(!stdout(&run(&["namespace", "ls"])).contains("team"));

    // Failures are one line and status 1.
    for (args, code) in [
        (&["namespace", "rm", "team"][..], "namespace_not_found"),
        (&["namespace", "rm", "default"], "namespace_reserved"),
        (&["namespace", "create", "Bad Name"], "invalid_field"),
    ] {
        let output = run(args);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        assert!(stdout(&output).is_empty(), "{args:?}");
        assert_eq!(stderr(&output).lines().count(), 1, "{args:?}: {}", stderr(&output));
        assert!(stderr(&output).contains(code), "{args:?}: {}", stderr(&output));
    }
}
