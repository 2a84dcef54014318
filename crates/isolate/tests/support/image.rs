//! The busybox test image (hutch-testkit's) imported into an image store.

use std::path::Path;

use hutch_image::{Image, ImageStore};

/// Imports the busybox image with `config` as its image config's `config`
/// section, written as an OCI image-layout tarball named `name`, into a store
/// under `dir`.
pub async fn import(dir: &Path, name: &str, config: serde_json::Value) -> anyhow::Result<Image> {
    let tarball = dir.join("image.tar");
    std::fs::write(&tarball, hutch_testkit::oci_layout(name, config)?)?;
    let store = ImageStore::open(dir.join("images"))?;
    let mut images = store.import(&tarball).await?;
    anyhow::ensure!(images.len() == 1, "imported {} images", images.len());
    Ok(images.remove(0))
}
