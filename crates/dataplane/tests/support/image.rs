//! A busybox OCI image built from busybox-static's /bin/busybox, as an OCI
//! image-layout tarball (the same image the isolate tests use).

use anyhow::Context;
use serde_json::json;

const BUSYBOX: &str = "/bin/busybox";
const APPLETS: [&str; 6] = ["sh", "echo", "sleep", "cat", "ls", "env"];

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

fn append(
    builder: &mut tar::Builder<Vec<u8>>,
    path: &str,
    kind: tar::EntryType,
    mode: u32,
    data: &[u8],
) {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(data.len() as u64);
    header.set_mtime(1_700_000_000);
    builder.append_data(&mut header, path, data).expect("append to tar");
}

pub fn busybox_layer() -> anyhow::Result<Vec<u8>> {
    let busybox = std::fs::read(BUSYBOX).context("busybox-static is installed")?;
    let mut tar = tar::Builder::new(Vec::new());
    append(&mut tar, "bin/", tar::EntryType::Directory, 0o755, b"");
    append(&mut tar, "bin/busybox", tar::EntryType::Regular, 0o755, &busybox);
    for applet in APPLETS {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_mode(0o777);
        header.set_size(0);
        tar.append_link(&mut header, format!("bin/{applet}"), "busybox")?;
    }
    append(&mut tar, "etc/", tar::EntryType::Directory, 0o755, b"");
    append(
        &mut tar,
        "etc/passwd",
        tar::EntryType::Regular,
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\n",
    );
    append(&mut tar, "tmp/", tar::EntryType::Directory, 0o1777, b"");
    Ok(tar.into_inner()?)
}

/// The image config (JSON) of the one uncompressed layer `layer`.
pub fn config_json(layer: &[u8], config: serde_json::Value) -> anyhow::Result<Vec<u8>> {
    Ok(serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": { "type": "layers", "diff_ids": [sha256(layer)] },
    }))?)
}

/// An OCI image-layout tarball of one image named `name`, whose image config
/// has `config` as its `config` section (Env, Cmd, WorkingDir, ...).
pub fn oci_layout(name: &str, config: serde_json::Value) -> anyhow::Result<Vec<u8>> {
    let layer = busybox_layer()?;
    let image_config = config_json(&layer, config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": sha256(&image_config), "size": image_config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar",
                     "digest": sha256(&layer), "size": layer.len() }],
    }))?;
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{ "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": sha256(&manifest), "size": manifest.len(),
                        "annotations": { "io.containerd.image.name": name } }],
    }))?;
    let mut tar = tar::Builder::new(Vec::new());
    append(
        &mut tar,
        "oci-layout",
        tar::EntryType::Regular,
        0o644,
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    );
    append(&mut tar, "index.json", tar::EntryType::Regular, 0o644, &index);
    for blob in [&manifest, &image_config, &layer] {
        let path = format!("blobs/sha256/{}", sha256(blob).trim_start_matches("sha256:"));
        append(&mut tar, &path, tar::EntryType::Regular, 0o644, blob);
    }
    Ok(tar.into_inner()?)
}
