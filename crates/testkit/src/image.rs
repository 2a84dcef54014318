//! A busybox image made from Debian's busybox-static, as a layer, an OCI
//! image-layout tarball, a plain root filesystem or an OCI runtime bundle.
//!
//! It is built on the spot from the host's `/bin/busybox` (one static binary
//! that is every tool a test needs), so no test pulls an image from the
//! internet.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};
use serde_json::json;

use crate::layer::{LayerBuilder, sha256};

/// Debian's busybox-static: statically linked, so it runs in any root.
pub const BUSYBOX: &str = "/bin/busybox";

/// The applets [`busybox_layer`] links to busybox.
pub const APPLETS: [&str; 10] =
    ["sh", "echo", "id", "pwd", "sleep", "cat", "ls", "test", "touch", "env"];

/// A busybox root filesystem as an uncompressed layer: /bin/busybox, the
/// [`APPLETS`] as relative symlinks to it, /etc/passwd and /etc/group with
/// `root` and `app` (1000:1000, home /work), and /tmp. It has no /usr and no
/// /work, so a sandbox of it must not see the host's and must create the
/// working directory.
pub fn busybox_layer() -> anyhow::Result<Vec<u8>> {
    let busybox = std::fs::read(BUSYBOX).context("busybox-static is installed")?;
    let mut layer = LayerBuilder::new().dir("bin/", 0o755).file("bin/busybox", &busybox, 0o755);
    for applet in APPLETS {
        layer = layer.symlink(&format!("bin/{applet}"), "busybox");
    }
    let passwd = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/work:/bin/sh\n";
    Ok(layer
        .dir("etc/", 0o755)
        .file("etc/passwd", passwd, 0o644)
        .file("etc/group", b"root:x:0:\napp:x:1000:\n", 0o644)
        .dir("tmp/", 0o1777)
        .tar())
}

/// The image config (JSON) of an image whose one layer is the uncompressed
/// `layer`, with `config` as its `config` section (Env, Cmd, WorkingDir, ...).
pub fn image_config(layer: &[u8], config: serde_json::Value) -> anyhow::Result<Vec<u8>> {
    Ok(serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": { "type": "layers", "diff_ids": [sha256(layer)] },
    }))?)
}

/// An OCI image-layout tarball (what `docker save` and `skopeo copy
/// oci-archive:` write) of one image named `name`: the [`busybox_layer`]
/// with `config` as its image config's `config` section.
pub fn oci_layout(name: &str, config: serde_json::Value) -> anyhow::Result<Vec<u8>> {
    let layer = busybox_layer()?;
    let image_config = image_config(&layer, config)?;
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
    let mut tarball = LayerBuilder::new()
        .file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#, 0o644)
        .file("index.json", &index, 0o644);
    for blob in [&manifest, &image_config, &layer] {
        let path = format!("blobs/sha256/{}", sha256(blob).trim_start_matches("sha256:"));
        tarball = tarball.file(&path, blob, 0o644);
    }
    Ok(tarball.tar())
}

/// Writes a busybox root filesystem into the directory `root` (created if
/// missing): `bin/busybox` and each of `applets` as a symlink to it.
pub fn busybox_rootfs(root: &Path, applets: &[&str]) -> anyhow::Result<()> {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy(BUSYBOX, bin.join("busybox")).context("busybox-static is installed")?;
    for applet in applets {
        std::os::unix::fs::symlink("busybox", bin.join(applet))?;
    }
    Ok(())
}

/// Writes an OCI runtime bundle into `bundle` whose rootfs is busybox and
/// whose process runs `/bin/true` on a read-only root without a terminal: the
/// smallest container crun and runc can run, to compare sandboxes against.
/// Needs runc (for `runc spec`).
pub fn busybox_bundle(bundle: &Path) -> anyhow::Result<()> {
    busybox_rootfs(&bundle.join("rootfs"), &["sh", "true"])?;
    let status = Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(bundle)
        .status()
        .context("run runc spec")?;
    if !status.success() {
        bail!("runc spec failed");
    }
    let path = bundle.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    config["process"]["terminal"] = false.into();
    config["process"]["args"] = json!(["/bin/true"]);
    config["root"]["readonly"] = true.into();
    std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
    Ok(())
}

/// `crun run` of the bundle `bundle` as container `id`, stdin closed, for
/// benchmarks to time beside sandboxes.
///
/// It runs in a private mount namespace without `/sys/fs/cgroup/unified`:
/// this machine mounts a cgroup2 hierarchy there that has no controllers,
/// and crun would try to use it; without it crun uses the cgroup v1
/// controllers like everything else here. The host's mounts are untouched.
pub fn crun_run(bundle: &Path, id: &str) -> Command {
    let mut command = Command::new("unshare");
    command
        .args(["-m", "sh", "-c"])
        .arg(format!(
            "umount /sys/fs/cgroup/unified 2>/dev/null; exec crun run -b {} {id}",
            bundle.display()
        ))
        .stdin(std::process::Stdio::null());
    command
}
