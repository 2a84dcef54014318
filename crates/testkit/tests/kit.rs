//! The kit's promises that the suites lean on: polling stops at its deadline,
//! the busybox bundle runs under crun, and a registry takes a push and leaves
//! nothing behind once dropped. Runs as root (crun).

use std::time::{Duration, Instant};

use hutch_testkit::{Registry, busybox_bundle, busybox_layer, crun_run, eventually, image_config};
use oci_client::client::ImageLayer;
use oci_client::secrets::RegistryAuth;

#[tokio::test]
async fn eventually_returns_as_soon_as_the_check_holds_and_false_at_the_deadline() {
    let mut calls = 0;
    assert!(
        eventually(Duration::from_secs(10), async || {
            calls += 1;
            calls == 3
        })
        .await
    );
    assert_eq!(calls, 3);

    let start = Instant::now();
    assert!(!eventually(Duration::from_millis(50), async || false).await);
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(50), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
}

#[test]
fn the_busybox_bundle_runs_true_under_crun() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let bundle = dir.path().join("bundle");
    busybox_bundle(&bundle)?;
    let id = format!("hutch-testkit-{}", std::process::id());
    let status = crun_run(&bundle, &id).status()?;
    assert!(status.success(), "crun run: {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_takes_a_push_and_leaves_nothing_behind_when_dropped() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let layer = busybox_layer()?;
    let config = image_config(&layer, serde_json::json!({ "Cmd": ["sh"] }))?;
    let digest = hutch_testkit::sha256(&layer);
    let layers = [ImageLayer::oci_v1(layer, None)];
    registry.push("kit/busybox:1", &layers, config, &RegistryAuth::Anonymous).await?;
    assert!(registry.blob_data_path(&digest).is_file(), "{}", registry.log());

    let (addr, dir) = (registry.addr.clone(), registry.dir.path().to_owned());
    drop(registry);
    assert!(std::net::TcpStream::connect(&addr).is_err(), "{addr} still accepts");
    assert!(!dir.exists(), "{} left behind", dir.display());
    Ok(())
}
