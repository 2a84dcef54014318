//! Fixtures of the image tests on top of hutch-testkit (the registry, the
//! layer builder): the busybox image these tests pull and import, with a
//! config that sets every field sandboxes use.
#![allow(dead_code)]

use std::path::Path;

use anyhow::Result;
use hutch_testkit::{LayerBuilder, Registry, gzip, sha256};
use oci_client::client::ImageLayer;
use oci_client::secrets::RegistryAuth;

pub use hutch_testkit::image::BUSYBOX;

/// A busybox-static root filesystem: /bin/busybox plus applet symlinks.
pub fn busybox_layer() -> LayerBuilder {
    let busybox = std::fs::read(BUSYBOX).expect("busybox-static is installed");
    LayerBuilder::new()
        .dir("bin/", 0o755)
        .file("bin/busybox", &busybox, 0o755)
        .symlink("bin/sh", "busybox")
        .symlink("bin/ls", "/bin/busybox")
        .symlink("bin/cat", "busybox")
        .symlink("bin/echo", "busybox")
        .dir("etc/", 0o755)
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
            0o644,
        )
        .dir("tmp/", 0o1777)
        .dir("home/", 0o755)
        .dir("home/app/", 0o750)
}

/// An image config with the fields sandboxes use.
pub fn image_config(diff_ids: &[String]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin", "GREETING=hello"],
            "Cmd": ["/bin/sh", "-c", "echo hi"],
            "Entrypoint": ["/bin/busybox"],
            "WorkingDir": "/home/app",
            "User": "65534:65534"
        },
        "rootfs": { "type": "layers", "diff_ids": diff_ids }
    }))
    .expect("config json")
}

/// Pushes an image of gzip layers (given as uncompressed tars) to the registry.
pub async fn push(
    registry: &Registry,
    repo_tag: &str,
    layer_tars: &[Vec<u8>],
    auth: &RegistryAuth,
) -> Result<()> {
    let diff_ids: Vec<String> = layer_tars.iter().map(|t| sha256(t)).collect();
    let layers: Vec<ImageLayer> =
        layer_tars.iter().map(|t| ImageLayer::oci_v1_gzip(gzip(t), None)).collect();
    registry.push(repo_tag, &layers, image_config(&diff_ids), auth).await
}

/// Digest of the gzip blob `push` uploads for `tar`.
pub fn pushed_layer_digest(tar: &[u8]) -> String {
    sha256(&gzip(tar))
}

pub fn read_link(path: &Path) -> String {
    std::fs::read_link(path).map(|p| p.display().to_string()).unwrap_or_default()
}
