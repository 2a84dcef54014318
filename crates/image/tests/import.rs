//! Importing `docker save` and OCI image-layout tarballs built by the test.

mod common;

use std::path::Path;

use anyhow::Result;
use common::{busybox_layer, image_config};
use hutch_image::{FetchLayerError, ImageStore, ImportImageError};
use hutch_testkit::{LayerBuilder, gzip, sha256};
use serde_json::json;

/// Writes a plain tar of (name, content) members; names ending in `@link:T`
/// become symlinks to T.
fn archive(members: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, content) in members {
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        if let Some((path, target)) = name.split_once("@link:") {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            builder.append_link(&mut header, path, target).expect("link");
        } else {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(content.len() as u64);
            builder.append_data(&mut header, name, &content[..]).expect("member");
        }
    }
    builder.into_inner().expect("archive")
}

/// A legacy `docker save` archive: two tagged images sharing their base
/// layer, the second one storing it as a symlink like docker does.
fn docker_save(base: &[u8], extra: &[u8]) -> Vec<u8> {
    let base_id = sha256(base).trim_start_matches("sha256:").to_owned();
    let extra_id = sha256(extra).trim_start_matches("sha256:").to_owned();
    let config1 = image_config(&[sha256(base)]);
    let config2 = image_config(&[sha256(base), sha256(extra)]);
    let c1 = format!("{}.json", sha256(&config1).trim_start_matches("sha256:"));
    let c2 = format!("{}.json", sha256(&config2).trim_start_matches("sha256:"));
    let manifest = json!([
        { "Config": c1, "RepoTags": ["busybox:imported"], "Layers": [format!("{base_id}/layer.tar")] },
        { "Config": c2, "RepoTags": ["example.com/app:2", "app:latest"],
          "Layers": [format!("other{base_id}/layer.tar"), format!("{extra_id}/layer.tar")] },
    ]);
    archive(&[
        (format!("{base_id}/layer.tar"), base.to_vec()),
        (format!("other{base_id}/layer.tar@link:../{base_id}/layer.tar"), Vec::new()),
        (format!("{extra_id}/layer.tar"), extra.to_vec()),
        (c1, config1),
        (c2, config2),
        ("manifest.json".into(), serde_json::to_vec(&manifest).expect("json")),
    ])
}

#[tokio::test]
async fn docker_save_archive_is_imported_with_tags_and_shared_layers() -> Result<()> {
    let base = busybox_layer().tar();
    let extra = LayerBuilder::new().file("app/hello", b"hi", 0o644).tar();
    let dir = tempfile::tempdir()?;
    let tarball = dir.path().join("save.tar");
    std::fs::write(&tarball, docker_save(&base, &extra))?;
    let store = ImageStore::open(dir.path().join("store"))?;

    let images = store.import(&tarball).await?;
    let references: Vec<&str> = images.iter().map(|i| i.reference.as_str()).collect();
    assert_eq!(
        references,
        ["docker.io/library/busybox:imported", "example.com/app:2", "docker.io/library/app:latest"]
    );
    let busybox = &images[0];
    let app = &images[1];
    assert_eq!(busybox.layer_digests, [sha256(&base)]);
    assert_eq!(app.layer_digests, [sha256(&base), sha256(&extra)]);
    assert_eq!(app.layers[0], busybox.layers[0]);
    assert!(busybox.layers[0].join("bin/busybox").is_file());
    assert_eq!(std::fs::read(app.layers[1].join("app/hello"))?, b"hi");
    assert_eq!(busybox.config.working_dir.as_deref(), Some("/home/app"));
    assert_eq!(busybox.size, base.len() as u64);
    assert_eq!(store.get("app")?.as_ref(), Some(&images[2]));
    assert_eq!(store.list()?.len(), 3);
    assert_eq!(std::fs::read_dir(dir.path().join("store/layers/sha256"))?.count(), 2);

    // Importing again changes nothing.
    assert_eq!(store.import(&tarball).await?, images);
    Ok(())
}

/// An OCI image layout: one image named via the containerd annotation, one
/// with only a tag name (so it is stored under its digest).
fn oci_layout(layer_gz: &[u8], diff_id: &str) -> (Vec<u8>, String) {
    let config = image_config(&[diff_id.to_owned()]);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": sha256(&config), "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                     "digest": sha256(layer_gz), "size": layer_gz.len() }],
    }))
    .expect("manifest");
    let manifest_digest = sha256(&manifest);
    let descriptor = |annotations: serde_json::Value| {
        json!({ "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest, "size": manifest.len(), "annotations": annotations })
    };
    let index = json!({
        "schemaVersion": 2,
        "manifests": [
            descriptor(json!({ "io.containerd.image.name": "registry.example/team/busybox:oci",
                               "org.opencontainers.image.ref.name": "oci" })),
            descriptor(json!({ "org.opencontainers.image.ref.name": "latest" })),
        ],
    });
    let blob =
        |bytes: &[u8]| format!("blobs/sha256/{}", sha256(bytes).trim_start_matches("sha256:"));
    let tar = archive(&[
        ("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
        ("index.json".into(), serde_json::to_vec(&index).expect("index")),
        (blob(&manifest), manifest.clone()),
        (blob(&config), config.clone()),
        (blob(layer_gz), layer_gz.to_vec()),
    ]);
    (tar, manifest_digest)
}

#[tokio::test]
async fn oci_layout_archive_is_imported_even_when_compressed() -> Result<()> {
    let layer = busybox_layer().tar();
    let layer_gz = gzip(&layer);
    let (layout, manifest_digest) = oci_layout(&layer_gz, &sha256(&layer));
    let dir = tempfile::tempdir()?;
    let tarball = dir.path().join("oci.tar.gz");
    std::fs::write(&tarball, gzip(&layout))?;
    let store = ImageStore::open(dir.path().join("store"))?;

    let images = store.import(&tarball).await?;
    assert_eq!(images.len(), 2);
    assert_eq!(images[0].reference, "registry.example/team/busybox:oci");
    assert_eq!(images[1].reference, manifest_digest);
    for image in &images {
        assert_eq!(image.digest, manifest_digest);
        assert_eq!(image.layer_digests, [sha256(&layer_gz)]);
        assert_eq!(image.size, layer_gz.len() as u64);
        assert_eq!(image.config.user.as_deref(), Some("65534:65534"));
        assert!(image.layers[0].join("bin/busybox").is_file());
    }
    assert_eq!(store.get(&manifest_digest)?.as_ref(), Some(&images[1]));
    // The decompressed copy of the archive was only scratch space.
    assert_eq!(std::fs::read_dir(dir.path().join("store/tmp"))?.count(), 0);
    Ok(())
}

fn assert_nothing_stored(store_root: &Path) -> Result<()> {
    for sub in ["layers/sha256", "images", "tmp"] {
        let n = std::fs::read_dir(store_root.join(sub))?.count();
        assert_eq!(n, 0, "{sub} must be empty");
    }
    Ok(())
}

#[tokio::test]
async fn layer_not_matching_its_diff_id_is_refused_and_nothing_is_cached() -> Result<()> {
    let base = busybox_layer().tar();
    let extra = LayerBuilder::new().file("x", b"x", 0o644).tar();
    let mut save = docker_save(&base, &extra);
    // Corrupt one byte of busybox's content inside the first layer member.
    let needle = std::fs::read(common::BUSYBOX)?;
    let pos =
        save.windows(64).position(|w| w == &needle[1000..1064]).expect("busybox bytes in archive");
    save[pos] ^= 0xff;
    let dir = tempfile::tempdir()?;
    let tarball = dir.path().join("save.tar");
    std::fs::write(&tarball, save)?;
    let store = ImageStore::open(dir.path().join("store"))?;

    let err = store.import(&tarball).await.expect_err("corrupt layer");
    let ImportImageError::Layer(layer_err) = &err else {
        panic!("expected a layer error, got {err:?}");
    };
    assert!(matches!(&**layer_err, FetchLayerError::DigestMismatch { .. }), "{layer_err:?}");
    assert_nothing_stored(&dir.path().join("store"))
}

#[tokio::test]
async fn hostile_layer_in_an_archive_is_refused_and_nothing_is_cached() -> Result<()> {
    let hostile = LayerBuilder::new()
        .file("ok", b"fine", 0o644)
        .raw(b"../../escape", tar::EntryType::Regular, b"", b"x")
        .tar();
    let extra = LayerBuilder::new().file("x", b"x", 0o644).tar();
    let dir = tempfile::tempdir()?;
    let tarball = dir.path().join("save.tar");
    std::fs::write(&tarball, docker_save(&hostile, &extra))?;
    let store = ImageStore::open(dir.path().join("store"))?;

    let err = store.import(&tarball).await.expect_err("hostile layer");
    assert!(
        matches!(&err, ImportImageError::Layer(e) if matches!(&**e, FetchLayerError::Unpack { .. })),
        "{err:?}"
    );
    assert!(!dir.path().join("escape").exists());
    assert!(!dir.path().join("store/escape").exists());
    assert_nothing_stored(&dir.path().join("store"))
}

#[tokio::test]
async fn archive_without_an_index_is_a_clear_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tarball = dir.path().join("junk.tar");
    std::fs::write(&tarball, archive(&[("readme".into(), b"hello".to_vec())]))?;
    let store = ImageStore::open(dir.path().join("store"))?;
    let err = store.import(&tarball).await.expect_err("not an image");
    assert!(matches!(err, ImportImageError::NotAnImageArchive { .. }), "{err:?}");
    let missing = store.import(&dir.path().join("absent.tar")).await.expect_err("missing");
    assert!(matches!(missing, ImportImageError::Read { .. }), "{missing:?}");
    Ok(())
}
