//! The static sandboxd that sandboxes run in tests.
//!
//! sandboxd must be statically linked to run inside images without our libc,
//! which needs its own target and RUSTFLAGS, so it cannot be an ordinary
//! dependency of a test: it is built by a nested cargo.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use anyhow::{Context, bail};

/// The static sandboxd binary: `$HUTCH_SANDBOXD` when set (scripts/test builds
/// one for every suite, which skips the nested build), else a static dev
/// build made once per test process by [`build_sandboxd`].
///
/// # Panics
///
/// When the nested build fails: no test that needs sandboxd can run then.
pub fn sandboxd_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(path) = std::env::var_os("HUTCH_SANDBOXD") {
            return path.into();
        }
        build_sandboxd("dev").expect("build a static sandboxd")
    })
    .clone()
}

/// Builds sandboxd statically linked with cargo profile `profile` ("dev",
/// "release", ...) and returns the binary's path.
///
/// It builds into `sandboxd-static` beneath the outer target dir, a target
/// dir of its own, so the nested cargo never waits on the lock the outer
/// cargo (the one running the tests) holds.
pub fn build_sandboxd(profile: &str) -> anyhow::Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("sandboxd-static");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&workspace)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_TARGET_DIR", &target)
        .args([
            "build",
            "-p",
            "hutch-sandboxd",
            "--target",
            "x86_64-unknown-linux-gnu",
            "--profile",
            profile,
        ])
        .status()
        .context("run cargo")?;
    if !status.success() {
        bail!("building sandboxd failed: {status}");
    }
    // Cargo names the dev profile's output directory "debug".
    let dir = if profile == "dev" { "debug" } else { profile };
    Ok(target.join("x86_64-unknown-linux-gnu").join(dir).join("sandboxd"))
}

/// Spawns `command` — sandboxd with `--listen tcp:127.0.0.1:0`, or something
/// that execs it — and waits for the line in which sandboxd says which port
/// it got. Returns the process and sandboxd's base URL (`http://<addr>`).
///
/// Port 0 rather than a port picked beforehand: nothing can take the port
/// between the pick and the bind. The stdout pipe is closed once that line
/// is read; stderr is the test's.
///
/// # Panics
///
/// When the process cannot start or exits before it listens.
pub fn spawn_listening(mut command: Command) -> (Child, String) {
    let mut child =
        command.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn sandboxd");
    let stdout = child.stdout.take().expect("sandboxd stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines.next().expect("sandboxd exited before listening").expect("read stdout");
        if let Some(addr) = line.trim().strip_prefix("sandboxd listening on tcp:") {
            break addr.to_owned();
        }
    };
    (child, format!("http://{addr}"))
}
