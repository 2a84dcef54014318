//! Sandbox start-up and teardown against unshare, bwrap, crun and runc; then density.
//!
//! Run as root: `cargo bench -p hutch-isolate --bench isolate`
//! Knobs: BENCH_ITERS (default 100), BENCH_DENSITY (idle sandboxes, default 1000; 0
//! skips the density runs, one with egress none and one with egress internet),
//! HUTCH_SANDBOXD (a static sandboxd; built in release mode when unset).
//!
//! The bench re-executes itself under `unshare --net`, so the bridge and nft rules of
//! the egress-internet rows live in a private network namespace. The run dir is on
//! /dev/shm, a tmpfs like the /run it stands for; images stay on disk.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;

use anyhow::{Context, bail};
use hutch_isolate::{Driver, DriverConfig, Egress, SandboxId, SandboxSpec};
use hutch_net::{NetConfig, NetManager};
use hutch_testkit::bench::{env_or, ms, percentile, time_command};

const INNER_ENV: &str = "HUTCH_ISOLATE_BENCH_INNER";

fn main() -> anyhow::Result<()> {
    if std::env::var_os(INNER_ENV).is_none() {
        let status = Command::new("unshare")
            .args(["--net", "--"])
            .arg(std::env::current_exe()?)
            .args(std::env::args_os().skip(1))
            .env(INNER_ENV, "1")
            .status()?;
        std::process::exit(status.code().unwrap_or(1));
    }
    if !Command::new("ip").args(["link", "set", "lo", "up"]).status()?.success() {
        bail!("ip link set lo up failed");
    }
    let iters: usize = env_or("BENCH_ITERS", 100);
    let density: usize = env_or("BENCH_DENSITY", 1000);
    let sandboxd = match std::env::var_os("HUTCH_SANDBOXD") {
        Some(path) => path.into(),
        None => hutch_testkit::build_sandboxd("release")?,
    };
    let dir = tempfile::tempdir()?;
    let run = tempfile::tempdir_in("/dev/shm")?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let network = runtime.block_on(async {
        anyhow::Ok(Arc::new(NetManager::new(NetConfig::new(dir.path().join("net"))).await?))
    })?;
    let driver = Driver::new(DriverConfig {
        state_dir: dir.path().join("state"),
        run_dir: run.path().to_owned(),
        sandboxd_path: sandboxd,
        cgroup_parent: Some(format!("hutch-bench-{}", std::process::id())),
    })?
    .with_network(network);

    // The other tools run first, so that the teardown backlog our sandboxes leave
    // (network namespaces are freed asynchronously) cannot slow them down.
    let mut rows = Vec::new();
    let unshare = time_command(iters, || {
        Command::new("unshare")
            .args(["--fork", "--pid", "--mount", "--uts", "--ipc", "--net", "true"])
            .status()
    })?;
    rows.push(("unshare --fork --pid --mount --uts --ipc --net true", unshare, None));
    let bwrap = time_command(iters, || {
        Command::new("bwrap").args(["--unshare-all", "--ro-bind", "/", "/", "true"]).status()
    })?;
    rows.push(("bwrap --unshare-all --ro-bind / / true", bwrap, None));

    let bundle = dir.path().join("bundle");
    hutch_testkit::busybox_bundle(&bundle)?;
    let mut n = 0;
    let crun = time_command(iters, || {
        n += 1;
        hutch_testkit::crun_run(&bundle, &format!("hutch-bench-crun-{n}")).status()
    });
    match crun {
        Ok(s) => rows.push(("crun run (busybox bundle, true)", s, None)),
        Err(e) => eprintln!("crun skipped: {e:#}"),
    }
    let mut n = 0;
    let runc = time_command(iters, || {
        n += 1;
        Command::new("runc")
            .args(["run", "-b"])
            .arg(&bundle)
            .arg(format!("hutch-bench-runc-{n}"))
            .stdin(Stdio::null())
            .status()
    });
    match runc {
        Ok(s) => rows.push(("runc run (busybox bundle, true)", s, None)),
        Err(e) => eprintln!("runc skipped: {e:#}"),
    }

    let host = |id| SandboxSpec::new(id);
    let (create, destroy) = runtime.block_on(bench_hutch(&driver, iters, Egress::None, host))?;
    rows.push(("hutch-isolate (host image, egress none)", create, Some(destroy)));
    let (create, destroy) =
        runtime.block_on(bench_hutch(&driver, iters, Egress::Internet, host))?;
    rows.push(("hutch-isolate (host image, egress internet)", create, Some(destroy)));
    let userns = |id| SandboxSpec { user_namespace: true, ..SandboxSpec::new(id) };
    let (create, destroy) = runtime.block_on(bench_hutch(&driver, iters, Egress::None, userns))?;
    rows.push(("hutch-isolate (host image, userns, egress none)", create, Some(destroy)));

    // An imported busybox OCI image, idle like the host-image rows (its Cmd cleared, as
    // a sandbox platform does), so the rows differ only in the root filesystem.
    let image = runtime.block_on(support::image::import(
        dir.path(),
        "example.com/bench/busybox:1",
        serde_json::json!({ "Env": ["PATH=/bin"], "WorkingDir": "/work", "Cmd": ["sh"] }),
    ))?;
    let oci = |id| SandboxSpec { command: None, ..SandboxSpec::from_image(id, &image) };
    let (create, destroy) = runtime.block_on(bench_hutch(&driver, iters, Egress::None, oci))?;
    rows.push(("hutch-isolate (OCI busybox image, egress none)", create, Some(destroy)));
    let (create, destroy) = runtime.block_on(bench_hutch(&driver, iters, Egress::Internet, oci))?;
    rows.push(("hutch-isolate (OCI busybox image, egress internet)", create, Some(destroy)));

    println!("\n## Start-up (n = {iters})\n");
    println!("| what | start p50 | start p99 | destroy p50 | destroy p99 |");
    println!("|---|---|---|---|---|");
    for (name, start, destroy) in &rows {
        let (d50, d99) = match destroy {
            Some(d) => (ms(percentile(d, 50)), ms(percentile(d, 99))),
            None => ("(in start)".into(), "(in start)".into()),
        };
        println!(
            "| {name} | {} | {} | {d50} | {d99} |",
            ms(percentile(start, 50)),
            ms(percentile(start, 99))
        );
    }
    println!(
        "\nhutch start = create() until sandboxd wrote its ready byte, plus one GET /health over its unix socket; \
         the others run `true` to completion (their teardown is included)."
    );

    if density > 0 {
        runtime.block_on(bench_density(&driver, density, Egress::None))?;
        runtime.block_on(bench_density(&driver, density, Egress::Internet))?;
    }
    // The per-bench cgroup parents are ours to remove.
    let parents: Vec<std::path::PathBuf> = match driver.cgroup_layout() {
        hutch_isolate::CgroupLayout::V1 { parents } => {
            parents.iter().map(|(_, p)| p.clone()).collect()
        }
        hutch_isolate::CgroupLayout::V2 { parent } => vec![parent.clone()],
    };
    for parent in parents {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(())
}

async fn bench_hutch(
    driver: &Driver,
    iters: usize,
    egress: Egress,
    spec: impl Fn(SandboxId) -> SandboxSpec,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let mut create = Vec::with_capacity(iters);
    let mut destroy = Vec::with_capacity(iters);
    // Warm-up: page cache, cgroup parents, lazily built images.
    for i in 0..(iters + 5) {
        let id = SandboxId::new(format!("bench-{i}"))?;
        let mut spec = spec(id.clone());
        spec.egress = egress;
        let start = Instant::now();
        driver.create(spec).await?;
        let (status, _) =
            hutch_testkit::sandboxd_request(&driver.sandboxd_socket(&id), "GET", "/health", None)
                .await?;
        let created = start.elapsed();
        if status != 200 {
            bail!("health returned {status}");
        }
        let start = Instant::now();
        driver.destroy(&id).await?;
        let destroyed = start.elapsed();
        if i >= 5 {
            create.push(created);
            destroy.push(destroyed);
        }
    }
    Ok((create, destroy))
}

async fn bench_density(driver: &Driver, count: usize, egress: Egress) -> anyhow::Result<()> {
    let available_before = mem_available()?;
    let start = Instant::now();
    let mut ids = Vec::with_capacity(count);
    for i in 0..count {
        let id = SandboxId::new(format!("idle-{i}"))?;
        let mut spec = SandboxSpec::new(id.clone());
        spec.egress = egress;
        driver.create(spec).await.with_context(|| format!("sandbox {i} of {count}"))?;
        ids.push(id);
    }
    let created = start.elapsed();
    // Let sandboxd settle into idleness before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let available_after = mem_available()?;
    let mut cgroup_total = 0u64;
    let mut rss_total = 0u64;
    let mut pss_total = 0u64;
    for info in driver.list() {
        cgroup_total += driver.cgroup(&info.id).memory_usage()?;
        rss_total += status_kib(&format!("/proc/{}/status", info.pid), "VmRSS:")? * 1024;
        pss_total += status_kib(&format!("/proc/{}/smaps_rollup", info.pid), "Pss:")? * 1024;
    }
    let healthy = {
        let mut ok = 0;
        for id in ids.iter().step_by((count / 20).max(1)) {
            if hutch_testkit::sandboxd_request(&driver.sandboxd_socket(id), "GET", "/health", None)
                .await
                .is_ok_and(|(s, _)| s == 200)
            {
                ok += 1;
            }
        }
        ok
    };
    let start = Instant::now();
    for id in &ids {
        driver.destroy(id).await?;
    }
    let destroyed = start.elapsed();

    let per = |total: u64| format!("{:.2} MiB", total as f64 / count as f64 / (1 << 20) as f64);
    println!("\n## Density ({count} idle sandboxes, egress {egress:?})\n");
    println!("| measure | value |");
    println!("|---|---|");
    println!("| created in | {:.2} s |", created.as_secs_f64());
    println!(
        "| sampled /health answering | {healthy} of {} |",
        ids.iter().step_by((count / 20).max(1)).count()
    );
    println!("| cgroup memory.usage per sandbox | {} |", per(cgroup_total));
    println!(
        "| sandboxd RSS per sandbox (counts the shared binary in full) | {} |",
        per(rss_total)
    );
    println!("| sandboxd PSS per sandbox (shared pages split) | {} |", per(pss_total));
    println!(
        "| host MemAvailable drop per sandbox | {} |",
        per(available_before.saturating_sub(available_after))
    );
    println!("| destroyed in | {:.2} s |", destroyed.as_secs_f64());
    Ok(())
}

fn mem_available() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("MemAvailable")?;
    Ok(kib * 1024)
}

/// A `Key:   N kB` field of a /proc file.
fn status_kib(path: &str, key: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{key} in {path}"))
}
