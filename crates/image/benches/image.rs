//! Image store benchmarks against a real local registry.
//!
//! `cargo bench -p hutch-image --bench image`
//!
//! - cached pull: `ImageStore::pull` of an image already in the store
//!   (metadata hit, no network);
//! - cold pull: pull + verify + unpack of the busybox image from a local
//!   docker-registry into an empty store;
//! - unpack: `extract::unpack_layer` alone, from memory, for the busybox
//!   layer and for a synthetic layer of many small files.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use anyhow::Result;
use common::{busybox_layer, push};
use hutch_image::{ImageStore, PullOptions, RegistryAuth, extract};
use hutch_testkit::{LayerBuilder, Registry, gzip};
use oci_client::secrets::RegistryAuth as OciAuth;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn summary(name: &str, mut samples: Vec<Duration>, bytes: Option<u64>) {
    samples.sort();
    let p50 = percentile(&samples, 0.50);
    let p99 = percentile(&samples, 0.99);
    let throughput = bytes
        .map(|b| format!("{:>8.1} MB/s", b as f64 / 1e6 / p50.as_secs_f64()))
        .unwrap_or_default();
    println!(
        "{name:<40} n={:<6} p50={:>10.3?} p99={:>10.3?} {throughput}",
        samples.len(),
        p50,
        p99
    );
}

fn main() -> Result<()> {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(run())
}

async fn run() -> Result<()> {
    let registry = Registry::start()?;
    let layer = busybox_layer().tar();
    let unpacked_bytes = std::fs::metadata(common::BUSYBOX)?.len();
    push(&registry, "bench/busybox:1", std::slice::from_ref(&layer), &OciAuth::Anonymous).await?;
    let reference = registry.reference("bench/busybox:1");
    let options =
        PullOptions { insecure_registries: vec![registry.addr.clone()], ..PullOptions::default() };
    let scratch = tempfile::tempdir()?;

    // Cold pull into a brand-new store (includes building the registry
    // client, which loads TLS roots).
    let mut fresh = Vec::new();
    for i in 0..10 {
        let store = ImageStore::open(scratch.path().join(format!("fresh-{i}")))?;
        let start = Instant::now();
        store.pull(&reference, RegistryAuth::Anonymous, options.clone(), None).await?;
        fresh.push(start.elapsed());
    }
    summary("cold pull+unpack busybox, new store", fresh, Some(unpacked_bytes));

    // Cold pull in a long-lived store: the image (and so its layer) is
    // removed between runs, the registry client is reused.
    let store = ImageStore::open(scratch.path().join("cold"))?;
    let mut cold = Vec::new();
    for _ in 0..30 {
        let start = Instant::now();
        let image = store.pull(&reference, RegistryAuth::Anonymous, options.clone(), None).await?;
        cold.push(start.elapsed());
        store.remove(&image.reference).await?;
    }
    summary("cold pull+unpack busybox, warm client", cold, Some(unpacked_bytes));
    drop(store);

    // Cached pull: metadata hit.
    let store = ImageStore::open(scratch.path().join("warm"))?;
    store.pull(&reference, RegistryAuth::Anonymous, options.clone(), None).await?;
    let mut warm = Vec::new();
    for _ in 0..10_000 {
        let start = Instant::now();
        store.pull(&reference, RegistryAuth::Anonymous, options.clone(), None).await?;
        warm.push(start.elapsed());
    }
    summary("cached pull (metadata hit)", warm, None);

    // Unpack alone.
    let gz = gzip(&layer);
    let mut unpack = Vec::new();
    for i in 0..30 {
        let dest = scratch.path().join(format!("unpack-{i}"));
        std::fs::create_dir(&dest)?;
        let start = Instant::now();
        extract::unpack_layer(&gz[..], &dest)?;
        unpack.push(start.elapsed());
    }
    summary("unpack busybox layer (gzip)", unpack, Some(unpacked_bytes));

    let mut many = LayerBuilder::new();
    let content = vec![0x5au8; 4096];
    for d in 0..50 {
        many = many.dir(&format!("d{d}/"), 0o755);
        for f in 0..100 {
            many = many.file(&format!("d{d}/f{f}"), &content, 0o644);
        }
    }
    let many = many.tar();
    let many_bytes = 5000 * 4096;
    for (what, bytes) in [("plain", many.clone()), ("gzip", gzip(&many))] {
        let mut samples = Vec::new();
        for i in 0..5 {
            let dest = scratch.path().join(format!("many-{what}-{i}"));
            std::fs::create_dir(&dest)?;
            let start = Instant::now();
            let stats = extract::unpack_layer(&bytes[..], &dest)?;
            samples.push(start.elapsed());
            assert_eq!(stats.file_bytes, many_bytes);
        }
        summary(&format!("unpack 5000 x 4 KiB files ({what})"), samples, Some(many_bytes));
    }
    Ok(())
}
