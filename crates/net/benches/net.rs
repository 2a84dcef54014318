//! Attach/detach latency of sandbox networking, p50/p99, for egress `none` and
//! `internet`; for `internet` also the time from the start of attach until the
//! host can open a TCP connection to a listener inside the sandbox.
//!
//! Needs root. Like the tests, it re-executes itself under `unshare --net` so the
//! bridge, nft tables and veths it creates never touch the host's network.
//!
//! Run: `cargo bench -p hutch-net --bench net` (CYCLES=N to change the count).

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::TryStreamExt;
use hutch_net::{Egress, NetConfig, NetManager};
use nix::sched::CloneFlags;

const INNER_ENV: &str = "HUTCH_NET_BENCH_INNER";

fn main() -> Result<()> {
    if std::env::var_os(INNER_ENV).is_none() {
        let status = Command::new("unshare")
            .arg("--net")
            .arg("--")
            .arg(std::env::current_exe()?)
            .env(INNER_ENV, "1")
            .status()
            .context("run unshare (util-linux)")?;
        if !status.success() {
            bail!("benchmark failed: {status}");
        }
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(bench())
}

fn new_netns() -> Result<File> {
    std::thread::spawn(|| -> Result<File> {
        nix::sched::unshare(CloneFlags::CLONE_NEWNET)?;
        Ok(File::open("/proc/thread-self/ns/net")?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

async fn loopback_up() -> Result<()> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(connection);
    let lo = handle
        .link()
        .get()
        .match_name("lo".to_owned())
        .execute()
        .try_next()
        .await?
        .context("no lo")?;
    handle
        .link()
        .change(rtnetlink::LinkUnspec::new_with_index(lo.header.index).up().build())
        .execute()
        .await?;
    Ok(())
}

/// A listener on 0.0.0.0 inside `netns`; it outlives every eth0 of the loop.
fn listen_in(netns: &File) -> Result<u16> {
    let netns = netns.try_clone()?;
    std::thread::spawn(move || -> Result<u16> {
        nix::sched::setns(&netns, CloneFlags::CLONE_NEWNET)?;
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        let port = listener.local_addr()?.port();
        std::thread::spawn(move || for _ in listener.incoming() {});
        Ok(port)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("listener thread panicked"))?
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name:<44} p50 {:>7.2} ms   p99 {:>7.2} ms   max {:>7.2} ms",
        percentile(&samples, 0.50).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        samples.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}

async fn bench() -> Result<()> {
    let cycles: usize = std::env::var("CYCLES").ok().and_then(|c| c.parse().ok()).unwrap_or(200);
    loopback_up().await?;
    let state = tempfile::tempdir()?;
    let started = Instant::now();
    let manager = NetManager::new(NetConfig::new(state.path().join("leases"))).await?;
    let setup = started.elapsed();
    let sandbox = new_netns()?;
    let path = std::path::PathBuf::from(format!("/proc/self/fd/{}", sandbox.as_raw_fd()));
    let port = listen_in(&sandbox)?;

    println!("hutch-net: {cycles} cycles per row, one sandbox netns, private test netns");
    println!(
        "{:<44} {:>7.2} ms",
        "NetManager::new (bridge, tables, sysctls)",
        setup.as_secs_f64() * 1e3
    );
    for egress in [Egress::None, Egress::Internet] {
        for i in 0..10 {
            let id = format!("warm-{i}");
            manager.attach(&id, &path, egress).await?;
            manager.detach(&id).await?;
            manager.settle().await;
        }
        let mut attach = Vec::with_capacity(cycles);
        let mut detach = Vec::with_capacity(cycles);
        let mut settled = Vec::with_capacity(cycles);
        let mut reachable = Vec::with_capacity(cycles);
        for i in 0..cycles {
            let id = format!("bench-{i}");
            let started = Instant::now();
            let net = manager.attach(&id, &path, egress).await?;
            attach.push(started.elapsed());
            if let Some(address) = net.address {
                let target = SocketAddr::from((address, port));
                let deadline = started + Duration::from_secs(5);
                loop {
                    if TcpStream::connect_timeout(&target, Duration::from_millis(20)).is_ok() {
                        reachable.push(started.elapsed());
                        break;
                    }
                    if Instant::now() > deadline {
                        bail!("sandbox {address} not reachable after 5 s");
                    }
                }
            }
            let started = Instant::now();
            manager.detach(&id).await?;
            detach.push(started.elapsed());
            // The next cycle reuses the namespace, and with it the name eth0.
            manager.settle().await;
            settled.push(started.elapsed());
        }
        let label = match egress {
            Egress::None => "none",
            Egress::Internet => "internet",
        };
        report(&format!("attach ({label})"), attach);
        report(&format!("detach ({label})"), detach);
        report(&format!("detach -> removal settled ({label})"), settled);
        if !reachable.is_empty() {
            report(&format!("attach -> host connects to sandbox ({label})"), reachable);
        }
    }
    // As the driver uses it: a fresh namespace per sandbox, which dies (its last
    // process exits) before detach. Settling after each cycle keeps the rows
    // comparable; the driver does not wait for it.
    let mut attach = Vec::with_capacity(cycles);
    let mut detach = Vec::with_capacity(cycles);
    let mut settled = Vec::with_capacity(cycles);
    let mut unshare = Vec::with_capacity(cycles);
    for i in 0..cycles {
        let id = format!("fresh-{i}");
        let started = Instant::now();
        let sandbox = new_netns()?;
        unshare.push(started.elapsed());
        let path = std::path::PathBuf::from(format!("/proc/self/fd/{}", sandbox.as_raw_fd()));
        let started = Instant::now();
        manager.attach(&id, &path, Egress::Internet).await?;
        attach.push(started.elapsed());
        drop(sandbox);
        let started = Instant::now();
        manager.detach(&id).await?;
        detach.push(started.elapsed());
        manager.settle().await;
        settled.push(started.elapsed());
    }
    report("attach (internet, fresh netns)", attach);
    report("detach (internet, netns gone)", detach);
    report("detach -> removal settled (netns gone)", settled);
    report("new netns (a thread's unshare) in that loop", unshare);
    // The same back to back without waiting for the removals, as the driver
    // runs: the kernel still cleans up the previous namespaces meanwhile.
    let mut attach = Vec::with_capacity(cycles);
    let mut unshare = Vec::with_capacity(cycles);
    for i in 0..cycles {
        let id = format!("busy-{i}");
        let started = Instant::now();
        let sandbox = new_netns()?;
        unshare.push(started.elapsed());
        let path = std::path::PathBuf::from(format!("/proc/self/fd/{}", sandbox.as_raw_fd()));
        let started = Instant::now();
        manager.attach(&id, &path, Egress::Internet).await?;
        attach.push(started.elapsed());
        drop(sandbox);
        manager.detach(&id).await?;
    }
    manager.settle().await;
    report("new netns, back to back without settling", unshare);
    report("attach (internet), back to back without settling", attach);
    manager.teardown().await?;
    Ok(())
}
