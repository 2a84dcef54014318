//! Timing for the bench binaries (`harness = false`), so that every bench
//! warms up, reads its knobs and reports percentiles the same way and their
//! figures compare.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::bail;

/// Runs before the measured ones, not timed: the first runs pay for the
/// page cache and lazy initialisation, which is not what a bench measures.
const WARM_UP: usize = 3;

/// The bench knob `name` (e.g. `BENCH_ITERS`) from the environment, or
/// `default` when it is unset or not a number.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Times `iters` runs of `run` after a few untimed warm-up runs; the first
/// error ends the bench.
pub fn timed(
    iters: usize,
    mut run: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(iters);
    for i in 0..iters + WARM_UP {
        let start = Instant::now();
        run()?;
        if i >= WARM_UP {
            samples.push(start.elapsed());
        }
    }
    Ok(samples)
}

/// Like [`timed`] for a command `run` starts and waits for: a command that
/// fails ends the bench, so that a broken tool is not timed as a fast one.
pub fn time_command(
    iters: usize,
    mut run: impl FnMut() -> std::io::Result<ExitStatus>,
) -> anyhow::Result<Vec<Duration>> {
    timed(iters, || {
        let status = run()?;
        if !status.success() {
            bail!("command failed: {status}");
        }
        Ok(())
    })
}

/// The `p`th percentile (0 to 100) of `samples`, by the nearest rank below;
/// zero when there are none.
pub fn percentile(samples: &[Duration], p: usize) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let index = (sorted.len() * p / 100).min(sorted.len().saturating_sub(1));
    sorted.get(index).copied().unwrap_or_default()
}

/// `d` in milliseconds with two decimals, as the bench tables print it.
pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}
