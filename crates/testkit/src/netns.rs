//! Privileged network tests in a network namespace of their own.

use std::process::Command;

/// Set in the re-executed test binary to the name of the test it runs.
const INNER_ENV: &str = "HUTCH_TESTKIT_NETNS_TEST";

/// Runs `body` for the test `test_name` inside a fresh network namespace
/// with its loopback up, on a two-thread Tokio runtime.
///
/// In the outer process this re-executes the test binary under `unshare
/// --net` for exactly this test and asserts that it ran and passed there. So
/// whatever the test sets up — bridges, nftables tables, veths, sysctl
/// writes — lives in a namespace that vanishes with the child process, and
/// the host's network is never touched, even when the test fails half-way.
/// `test_name` must be the test function's own name.
///
/// # Panics
///
/// When the test fails, inside or out.
pub fn in_private_netns<F, Fut>(test_name: &str, body: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    if std::env::var(INNER_ENV).as_deref() == Ok(test_name) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        runtime
            .block_on(async {
                let up = Command::new("ip").args(["link", "set", "lo", "up"]).status()?;
                anyhow::ensure!(up.success(), "ip link set lo up failed");
                body().await
            })
            .unwrap_or_else(|error| panic!("{error:?}"));
        return;
    }
    let output = Command::new("unshare")
        .args(["--net", "--"])
        .arg(std::env::current_exe().expect("test binary path"))
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(INNER_ENV, test_name)
        .output()
        .expect("run unshare (util-linux)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains(&format!("test {test_name} ... ok")),
        "test in a private network namespace failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
}
