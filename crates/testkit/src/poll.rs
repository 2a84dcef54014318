//! Waiting for a condition with a deadline: tests poll, they never sleep a
//! fixed time, so they are as fast as the system allows and still fail
//! (rather than hang) when the condition never comes.

use std::time::{Duration, Instant};

/// How long to wait between two checks: short next to what tests wait for,
/// long enough not to starve what they wait on.
const INTERVAL: Duration = Duration::from_millis(10);

/// Polls `check` until it returns true (→ true) or `timeout` passes (→
/// false). `check` runs at least once, and once more after the deadline, so
/// a slow check cannot make the last chance disappear.
pub async fn eventually(timeout: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(INTERVAL).await;
    }
}

/// Like [`eventually`], blocking the thread: for tests and drops outside an
/// async runtime.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(INTERVAL);
    }
}
