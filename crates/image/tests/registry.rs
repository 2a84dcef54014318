//! Pulls against a real local registry (Debian's docker-registry), started
//! and killed by each test.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use anyhow::Result;
use common::{busybox_layer, push, pushed_layer_digest};
use hutch_image::{ImageStore, PullFailure, PullOptions, PullPolicy, PullProgress, RegistryAuth};
use hutch_testkit::{LayerBuilder, Registry, wait_until};
use oci_client::secrets::RegistryAuth as OciAuth;

fn options(registry: &Registry) -> PullOptions {
    PullOptions { insecure_registries: vec![registry.addr.clone()], ..PullOptions::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulled_busybox_image_is_an_unpacked_rootfs_with_its_config() -> Result<()> {
    let registry = Registry::start()?;
    let layer = busybox_layer().tar();
    push(&registry, "test/busybox:1", std::slice::from_ref(&layer), &OciAuth::Anonymous).await?;

    let root = tempfile::tempdir()?;
    let store = ImageStore::open(root.path().join("store"))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let image = store
        .pull(
            &registry.reference("test/busybox:1"),
            RegistryAuth::Anonymous,
            options(&registry),
            Some(tx),
        )
        .await?;

    assert_eq!(image.reference, format!("{}/test/busybox:1", registry.addr));
    assert!(image.digest.starts_with("sha256:"));
    assert_eq!(image.layer_digests, [pushed_layer_digest(&layer)]);
    assert_eq!(image.layers.len(), 1);
    let rootfs = &image.layers[0];
    assert_eq!(
        rootfs,
        &root
            .path()
            .join("store/layers/sha256")
            .join(image.layer_digests[0].trim_start_matches("sha256:"))
    );

    // Content, modes and symlinks survive.
    let busybox = rootfs.join("bin/busybox");
    assert_eq!(std::fs::read(&busybox)?, std::fs::read(common::BUSYBOX)?);
    assert_eq!(std::fs::metadata(&busybox)?.permissions().mode() & 0o7777, 0o755);
    assert_eq!(common::read_link(&rootfs.join("bin/sh")), "busybox");
    assert_eq!(common::read_link(&rootfs.join("bin/ls")), "/bin/busybox");
    assert_eq!(std::fs::metadata(rootfs.join("tmp"))?.permissions().mode() & 0o7777, 0o1777);
    assert_eq!(std::fs::metadata(rootfs.join("home/app"))?.permissions().mode() & 0o7777, 0o750);
    assert_eq!(std::fs::metadata(rootfs.join("etc/passwd"))?.mtime(), 1_700_000_000);
    assert_eq!(std::fs::metadata(rootfs.join("home"))?.mtime(), 1_700_000_000);

    // The rootfs really runs: chroot into it and use busybox's shell.
    let output = std::process::Command::new("chroot")
        .arg(rootfs)
        .args(["/bin/sh", "-c", "echo hello from $(cat /etc/passwd | head -n1 | cut -d: -f1)"])
        .output()?;
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "hello from root\n");

    // Config fields come from the image config.
    assert_eq!(image.config.env, ["PATH=/bin", "GREETING=hello"]);
    assert_eq!(image.config.cmd, ["/bin/sh", "-c", "echo hi"]);
    assert_eq!(image.config.entrypoint, ["/bin/busybox"]);
    assert_eq!(image.config.working_dir.as_deref(), Some("/home/app"));
    assert_eq!(image.config.user.as_deref(), Some("65534:65534"));

    // Progress: resolved, then the layer went through start/bytes/done.
    let mut events = Vec::new();
    while let Ok(event) = rx.try_recv() {
        events.push(event);
    }
    assert!(
        matches!(&events[0], PullProgress::Resolved { layers: 1, digest } if *digest == image.digest)
    );
    assert!(events.iter().any(|e| matches!(e, PullProgress::LayerStarted { .. })));
    assert!(events.iter().any(
        |e| matches!(e, PullProgress::LayerBytes { downloaded, total, .. } if downloaded == total)
    ));
    assert!(
        matches!(events.last(), Some(PullProgress::LayerDone { digest }) if *digest == image.layer_digests[0])
    );

    // The store remembers the image; the reference is normalised on lookup.
    assert_eq!(store.get(&registry.reference("test/busybox:1"))?, Some(image.clone()));
    assert_eq!(store.list()?, vec![image.clone()]);
    // Nothing is left in the work area.
    assert_eq!(std::fs::read_dir(root.path().join("store/tmp"))?.count(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_image_and_layers_are_not_downloaded_again() -> Result<()> {
    let registry = Registry::start()?;
    let layer = busybox_layer().tar();
    push(&registry, "test/busybox:1", std::slice::from_ref(&layer), &OciAuth::Anonymous).await?;
    push(&registry, "test/busybox:2", std::slice::from_ref(&layer), &OciAuth::Anonymous).await?;
    let blob = pushed_layer_digest(&layer);

    let root = tempfile::tempdir()?;
    let store = ImageStore::open(root.path().to_owned())?;
    let first = store
        .pull(
            &registry.reference("test/busybox:1"),
            RegistryAuth::Anonymous,
            options(&registry),
            None,
        )
        .await?;
    assert!(wait_until(Duration::from_secs(5), || registry.requests_matching(&blob) == 1));

    // Same reference: answered from metadata, no request at all.
    let manifests_before = registry.requests_matching("/manifests/");
    let again = store
        .pull(
            &registry.reference("test/busybox:1"),
            RegistryAuth::Anonymous,
            options(&registry),
            None,
        )
        .await?;
    assert_eq!(again, first);
    // Another tag sharing the layer: the manifest is fetched, the layer is not.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let second = store
        .pull(
            &registry.reference("test/busybox:2"),
            RegistryAuth::Anonymous,
            options(&registry),
            Some(tx),
        )
        .await?;
    assert_eq!(second.layers, first.layers);
    assert!(wait_until(Duration::from_secs(5), || registry.requests_matching("/manifests/")
        > manifests_before));
    assert_eq!(registry.requests_matching(&blob), 1);
    let mut cached = false;
    while let Ok(event) = rx.try_recv() {
        cached |= matches!(event, PullProgress::LayerCached { ref digest } if *digest == blob);
    }
    assert!(cached);

    // PullPolicy::Always re-resolves the tag but still reuses the layer.
    let always = PullOptions { policy: PullPolicy::Always, ..options(&registry) };
    let refreshed = store
        .pull(&registry.reference("test/busybox:1"), RegistryAuth::Anonymous, always, None)
        .await?;
    assert_eq!(refreshed, first);
    assert_eq!(registry.requests_matching(&blob), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_of_one_image_download_it_once() -> Result<()> {
    let registry = Registry::start()?;
    let layer = busybox_layer().tar();
    push(&registry, "test/busybox:1", std::slice::from_ref(&layer), &OciAuth::Anonymous).await?;
    let blob = pushed_layer_digest(&layer);
    let reference = registry.reference("test/busybox:1");

    let root = tempfile::tempdir()?;
    let store = ImageStore::open(root.path().to_owned())?;
    let pulls = (0..8).map(|_| {
        let store = store.clone();
        let reference = reference.clone();
        let options = options(&registry);
        tokio::spawn(
            async move { store.pull(&reference, RegistryAuth::Anonymous, options, None).await },
        )
    });
    let mut images = Vec::new();
    for pull in pulls {
        images.push(pull.await??);
    }
    assert!(images.windows(2).all(|w| w[0] == w[1]));
    // Every pull has returned, so every request has been answered; give
    // the registry's access log a moment to be written.
    assert!(wait_until(Duration::from_secs(5), || registry.requests_matching(&blob) >= 1));
    assert_eq!(registry.requests_matching(&blob), 1, "{}", registry.log());
    let manifest_gets =
        registry.log().lines().filter(|l| l.contains("\"GET /v2/test/busybox/manifests/1")).count();
    assert_eq!(manifest_gets, 1, "{}", registry.log());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whiteouts_and_opaque_dirs_become_overlayfs_markers() -> Result<()> {
    let registry = Registry::start()?;
    let lower = LayerBuilder::new()
        .dir("etc/", 0o755)
        .file("etc/keep", b"keep", 0o644)
        .file("etc/gone", b"gone", 0o644)
        .dir("data/", 0o755)
        .file("data/old", b"old", 0o644)
        .tar();
    let upper = LayerBuilder::new()
        .dir("etc/", 0o755)
        .file("etc/.wh.gone", b"", 0o644)
        .dir("data/", 0o755)
        .file("data/.wh..wh..opq", b"", 0o644)
        .file("data/new", b"new", 0o644)
        .tar();
    push(&registry, "test/layers:1", &[lower, upper], &OciAuth::Anonymous).await?;

    let root = tempfile::tempdir()?;
    let store = ImageStore::open(root.path().join("store"))?;
    let image = store
        .pull(
            &registry.reference("test/layers:1"),
            RegistryAuth::Anonymous,
            options(&registry),
            None,
        )
        .await?;
    assert_eq!(image.layers.len(), 2);
    let (bottom, top) = (&image.layers[0], &image.layers[1]);
    assert!(bottom.join("etc/gone").is_file());

    let whiteout = std::fs::symlink_metadata(top.join("etc/gone"))?;
    use std::os::unix::fs::FileTypeExt;
    assert!(whiteout.file_type().is_char_device());
    assert_eq!(whiteout.rdev(), 0);
    assert!(!top.join("etc/.wh.gone").exists());
    assert!(!top.join("data/.wh..wh..opq").exists());
    let opaque = xattr_value(&top.join("data"), "trusted.overlay.opaque");
    assert_eq!(opaque.as_deref(), Some(&b"y"[..]));
    // What an overlay mounted in a user namespace (`userxattr`) reads.
    let opaque = xattr_value(&top.join("data"), "user.overlay.opaque");
    assert_eq!(opaque.as_deref(), Some(&b"y"[..]));

    // And the kernel agrees: stack them in an overlay mount under our temp dir.
    let merged = root.path().join("merged");
    std::fs::create_dir(&merged)?;
    let _mount = OverlayMount::mount(&merged, &[top, bottom])?;
    assert_eq!(std::fs::read(merged.join("etc/keep"))?, b"keep");
    assert!(!merged.join("etc/gone").exists());
    assert!(!merged.join("data/old").exists());
    assert_eq!(std::fs::read(merged.join("data/new"))?, b"new");
    Ok(())
}

fn xattr_value(path: &std::path::Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let name = std::ffi::CString::new(name).ok()?;
    let mut buf = [0u8; 64];
    // SAFETY: both strings are NUL-terminated and `buf` is writable for its length.
    let n = unsafe {
        libc::lgetxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    };
    usize::try_from(n).ok().map(|n| buf[..n].to_vec())
}

/// A read-only overlay of `lowers` (top first) on `target`, unmounted on drop.
struct OverlayMount(std::path::PathBuf);

impl OverlayMount {
    fn mount(target: &std::path::Path, lowers: &[&std::path::PathBuf]) -> Result<OverlayMount> {
        let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        let data = format!("lowerdir={}", lowerdir.join(":"));
        nix::mount::mount(
            Some("overlay"),
            target,
            Some("overlay"),
            nix::mount::MsFlags::MS_RDONLY,
            Some(data.as_str()),
        )?;
        Ok(OverlayMount(target.to_owned()))
    }
}

impl Drop for OverlayMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_pulls_with_the_right_password_and_fails_clearly_with_a_wrong_one() -> Result<()>
{
    let registry = Registry::start_with_auth(Some(("alice", "s3cret")))?;
    let layer = busybox_layer().tar();
    push(
        &registry,
        "private/busybox:1",
        std::slice::from_ref(&layer),
        &OciAuth::Basic("alice".into(), "s3cret".into()),
    )
    .await?;
    let reference = registry.reference("private/busybox:1");
    let root = tempfile::tempdir()?;
    let store = ImageStore::open(root.path().to_owned())?;

    let wrong = store
        .pull(
            &reference,
            RegistryAuth::Basic { username: "alice".into(), password: "wrong".into() },
            options(&registry),
            None,
        )
        .await
        .expect_err("wrong password must fail");
    assert!(matches!(wrong.failure(), PullFailure::Unauthorized(_)), "{wrong:?}");
    let anonymous = store
        .pull(&reference, RegistryAuth::Anonymous, options(&registry), None)
        .await
        .expect_err("anonymous must fail");
    assert!(matches!(anonymous.failure(), PullFailure::Unauthorized(_)), "{anonymous:?}");
    assert_eq!(store.get(&reference)?, None);

    let image = store
        .pull(
            &reference,
            RegistryAuth::Basic { username: "alice".into(), password: "s3cret".into() },
            options(&registry),
            None,
        )
        .await?;
    assert!(image.layers[0].join("bin/busybox").is_file());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_image_is_a_clear_not_found_error() -> Result<()> {
    let registry = Registry::start()?;
    push(&registry, "test/busybox:1", &[busybox_layer().tar()], &OciAuth::Anonymous).await?;
    let root = tempfile::tempdir()?;
    let store = ImageStore::open(root.path().to_owned())?;
    for missing in ["test/busybox:nope", "test/nothing:1"] {
        let err = store
            .pull(&registry.reference(missing), RegistryAuth::Anonymous, options(&registry), None)
            .await
            .expect_err("missing image");
        assert!(matches!(err.failure(), PullFailure::NotFound(_)), "{missing}: {err:?}");
    }
    let invalid = store
        .pull("Not A Reference", RegistryAuth::Anonymous, options(&registry), None)
        .await
        .expect_err("invalid reference");
    assert!(matches!(invalid.failure(), PullFailure::InvalidReference(_)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_blob_is_refused_and_nothing_is_cached() -> Result<()> {
    let registry = Registry::start()?;
    // Corruption early in the blob (the unpacker fails first) and in the
    // middle (the unpacker may finish first): both are digest mismatches.
    for (repo, at_start) in [("test/early:1", true), ("test/middle:1", false)] {
        let layer = busybox_layer().file(repo, repo.as_bytes(), 0o644).tar();
        push(&registry, repo, std::slice::from_ref(&layer), &OciAuth::Anonymous).await?;
        let blob = pushed_layer_digest(&layer);
        // Flip a byte in the stored blob: same length, different content.
        let data_path = registry.blob_data_path(&blob);
        let mut data = std::fs::read(&data_path)?;
        let at = if at_start { 20 } else { data.len() / 2 };
        data[at] ^= 0xff;
        std::fs::write(&data_path, &data)?;

        let root = tempfile::tempdir()?;
        let store = ImageStore::open(root.path().join("store"))?;
        let err = store
            .pull(&registry.reference(repo), RegistryAuth::Anonymous, options(&registry), None)
            .await
            .expect_err("corrupt blob must fail");
        let PullFailure::Layer(layer_err) = err.failure() else {
            panic!("expected a layer failure, got {err:?}");
        };
        assert!(
            matches!(&**layer_err, hutch_image::FetchLayerError::DigestMismatch { expected, .. } if *expected == blob),
            "{repo}: {layer_err:?}"
        );
        assert_eq!(store.get(&registry.reference(repo))?, None);
        assert_eq!(std::fs::read_dir(root.path().join("store/layers/sha256"))?.count(), 0);
        assert_eq!(std::fs::read_dir(root.path().join("store/images"))?.count(), 0);
        assert_eq!(std::fs::read_dir(root.path().join("store/tmp"))?.count(), 0);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_layer_from_a_registry_is_refused_and_nothing_is_cached() -> Result<()> {
    let registry = Registry::start()?;
    let hostile = LayerBuilder::new()
        .file("fine", b"fine", 0o644)
        .raw(b"../../../escape", tar::EntryType::Regular, b"", b"x")
        .tar();
    push(&registry, "test/hostile:1", &[busybox_layer().tar(), hostile], &OciAuth::Anonymous)
        .await?;
    let root = tempfile::tempdir()?;
    let store = ImageStore::open(root.path().join("a/b/store"))?;
    let err = store
        .pull(
            &registry.reference("test/hostile:1"),
            RegistryAuth::Anonymous,
            options(&registry),
            None,
        )
        .await
        .expect_err("hostile layer must fail");
    let PullFailure::Layer(layer_err) = err.failure() else {
        panic!("expected a layer failure, got {err:?}");
    };
    assert!(matches!(&**layer_err, hutch_image::FetchLayerError::Unpack { .. }), "{layer_err:?}");
    assert!(!root.path().join("escape").exists());
    assert!(!root.path().join("a/escape").exists());
    assert!(!root.path().join("a/b/escape").exists());
    assert_eq!(store.get(&registry.reference("test/hostile:1"))?, None);
    assert_eq!(std::fs::read_dir(root.path().join("a/b/store/tmp"))?.count(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_deletes_only_layers_no_other_image_uses() -> Result<()> {
    let registry = Registry::start()?;
    let base = busybox_layer().tar();
    let extra = LayerBuilder::new().file("extra", b"x", 0o644).tar();
    push(&registry, "test/base:1", std::slice::from_ref(&base), &OciAuth::Anonymous).await?;
    push(&registry, "test/app:1", &[base.clone(), extra.clone()], &OciAuth::Anonymous).await?;
    let root = tempfile::tempdir()?;
    let store = ImageStore::open(root.path().to_owned())?;
    let base_image = store
        .pull(&registry.reference("test/base:1"), RegistryAuth::Anonymous, options(&registry), None)
        .await?;
    let app = store
        .pull(&registry.reference("test/app:1"), RegistryAuth::Anonymous, options(&registry), None)
        .await?;
    assert_eq!(app.layers[0], base_image.layers[0]);

    store.remove(&app.reference).await?;
    assert!(base_image.layers[0].is_dir(), "shared layer must stay");
    assert!(!app.layers[1].exists(), "unshared layer must go");
    assert_eq!(store.get(&app.reference)?, None);
    assert_eq!(store.list()?, vec![base_image.clone()]);

    store.remove(&base_image.reference).await?;
    assert!(!base_image.layers[0].exists());
    assert!(matches!(
        store.remove(&base_image.reference).await,
        Err(hutch_image::RemoveImageError::NotFound { .. })
    ));
    Ok(())
}
