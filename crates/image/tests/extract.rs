//! Hostile and unusual layers: nothing escapes the layer directory.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Result;
use hutch_image::extract::{EntryPathError, UnpackLayerError, unpack_layer};
use hutch_testkit::{LayerBuilder, gzip};

/// A temp dir holding an empty layer dir and an "outside" dir with a secret,
/// standing in for the host.
struct Scene {
    dir: tempfile::TempDir,
}

impl Scene {
    fn new() -> Result<Scene> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir(dir.path().join("layer"))?;
        std::fs::create_dir(dir.path().join("outside"))?;
        std::fs::write(dir.path().join("outside/secret"), b"secret")?;
        Ok(Scene { dir })
    }

    fn layer(&self) -> PathBuf {
        self.dir.path().join("layer")
    }

    fn outside(&self) -> PathBuf {
        self.dir.path().join("outside")
    }

    fn unpack(&self, tar: &[u8]) -> Result<hutch_image::extract::UnpackStats, UnpackLayerError> {
        unpack_layer(tar, &self.layer())
    }

    /// The "host" is exactly as we left it.
    fn assert_outside_untouched(&self) {
        let names: Vec<_> = std::fs::read_dir(self.outside())
            .expect("outside")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["secret"]);
        assert_eq!(std::fs::read(self.outside().join("secret")).expect("secret"), b"secret");
        let meta = std::fs::metadata(self.outside().join("secret")).expect("secret");
        assert_eq!(meta.nlink(), 1, "nothing may hard-link the secret");
        let top: Vec<_> = std::fs::read_dir(self.dir.path())
            .expect("scene")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(top.len(), 2, "nothing may appear next to the layer: {top:?}");
    }
}

fn abs(path: &Path) -> Vec<u8> {
    path.display().to_string().into_bytes()
}

#[test]
fn parent_components_are_refused() -> Result<()> {
    let scene = Scene::new()?;
    let tar = LayerBuilder::new().raw(b"../escape", tar::EntryType::Regular, b"", b"x").tar();
    let err = scene.unpack(&tar).expect_err("must refuse ..");
    assert!(matches!(
        err,
        UnpackLayerError::UnsafePath { source: EntryPathError::ParentComponent, .. }
    ));
    scene.assert_outside_untouched();
    let tar = LayerBuilder::new()
        .dir("a/", 0o755)
        .raw(b"a/../../outside/secret", tar::EntryType::Regular, b"", b"pwned")
        .tar();
    assert!(scene.unpack(&tar).is_err());
    scene.assert_outside_untouched();
    Ok(())
}

#[test]
fn absolute_paths_are_refused() -> Result<()> {
    let scene = Scene::new()?;
    let target = scene.outside().join("abs");
    let tar = LayerBuilder::new().raw(&abs(&target), tar::EntryType::Regular, b"", b"x").tar();
    let err = scene.unpack(&tar).expect_err("must refuse absolute paths");
    assert!(matches!(err, UnpackLayerError::UnsafePath { source: EntryPathError::Absolute, .. }));
    scene.assert_outside_untouched();
    Ok(())
}

#[test]
fn writing_through_a_symlink_is_refused() -> Result<()> {
    for link_target in [None, Some("../outside")] {
        let scene = Scene::new()?;
        let target =
            link_target.map(str::to_owned).unwrap_or_else(|| scene.outside().display().to_string());
        let tar = LayerBuilder::new().symlink("a", &target).file("a/file", b"pwned", 0o644).tar();
        let err = scene.unpack(&tar).expect_err("must not write through a symlink");
        assert!(matches!(err, UnpackLayerError::ParentNotDirectory { .. }), "{err:?}");
        scene.assert_outside_untouched();
        // The same with a directory entry and a nested path.
        let tar = LayerBuilder::new().symlink("b", &target).dir("b/sub/", 0o755).tar();
        assert!(scene.unpack(&tar).is_err());
        scene.assert_outside_untouched();
    }
    Ok(())
}

#[test]
fn a_file_replaces_a_symlink_instead_of_following_it() -> Result<()> {
    let scene = Scene::new()?;
    let tar = LayerBuilder::new()
        .symlink("x", &scene.outside().join("secret").display().to_string())
        .file("x", b"mine", 0o644)
        .tar();
    scene.unpack(&tar)?;
    let meta = std::fs::symlink_metadata(scene.layer().join("x"))?;
    assert!(meta.file_type().is_file());
    assert_eq!(std::fs::read(scene.layer().join("x"))?, b"mine");
    scene.assert_outside_untouched();
    Ok(())
}

#[test]
fn hard_links_must_stay_inside_the_layer() -> Result<()> {
    let scene = Scene::new()?;
    let secret = scene.outside().join("secret");
    let cases: Vec<(Vec<u8>, &str)> =
        vec![(b"../outside/secret".to_vec(), "relative escape"), (abs(&secret), "absolute target")];
    for (target, what) in cases {
        let tar = LayerBuilder::new().raw(b"h", tar::EntryType::Link, &target, b"").tar();
        let err = scene.unpack(&tar).expect_err(what);
        assert!(matches!(err, UnpackLayerError::UnsafeLinkTarget { .. }), "{what}: {err:?}");
        scene.assert_outside_untouched();
    }
    // Through a symlink created by an earlier entry.
    let tar = LayerBuilder::new()
        .symlink("s", &scene.outside().display().to_string())
        .raw(b"h", tar::EntryType::Link, b"s/secret", b"")
        .tar();
    let err = scene.unpack(&tar).expect_err("link through symlink");
    assert!(matches!(err, UnpackLayerError::ParentNotDirectory { .. }), "{err:?}");
    scene.assert_outside_untouched();

    // A link to a file of the layer itself works.
    let scene = Scene::new()?;
    let tar = LayerBuilder::new().file("a", b"shared", 0o644).hardlink("b", "a").tar();
    scene.unpack(&tar)?;
    assert_eq!(
        std::fs::metadata(scene.layer().join("b"))?.ino(),
        std::fs::metadata(scene.layer().join("a"))?.ino()
    );
    Ok(())
}

#[test]
fn devices_are_skipped_fifos_kept_and_setuid_stripped() -> Result<()> {
    let scene = Scene::new()?;
    let tar = LayerBuilder::new()
        .dir("dev/", 0o755)
        .device("dev/null", tar::EntryType::Char, 1, 3)
        .device("dev/sda", tar::EntryType::Block, 8, 0)
        .fifo("dev/pipe")
        .file("bin/su", b"#!", 0o4755)
        .file("bin/wall", b"#!", 0o2755)
        .file_owned("home/u/file", b"x", 0o640, 1234, 5678)
        .dir("shared/", 0o1777)
        .tar();
    let stats = scene.unpack(&tar)?;
    assert_eq!(stats.skipped, 2);
    let layer = scene.layer();
    assert!(std::fs::symlink_metadata(layer.join("dev/null")).is_err());
    assert!(std::fs::symlink_metadata(layer.join("dev/sda")).is_err());
    assert!(std::fs::symlink_metadata(layer.join("dev/pipe"))?.file_type().is_fifo());
    assert_eq!(std::fs::metadata(layer.join("bin/su"))?.permissions().mode() & 0o7777, 0o755);
    assert_eq!(std::fs::metadata(layer.join("bin/wall"))?.permissions().mode() & 0o7777, 0o755);
    assert_eq!(std::fs::metadata(layer.join("shared"))?.permissions().mode() & 0o7777, 0o1777);
    let owned = std::fs::metadata(layer.join("home/u/file"))?;
    assert_eq!((owned.uid(), owned.gid(), owned.mode() & 0o7777), (1234, 5678, 0o640));
    // Parents that the archive did not list are created as plain 0755 dirs.
    assert_eq!(std::fs::metadata(layer.join("home/u"))?.permissions().mode() & 0o7777, 0o755);
    scene.assert_outside_untouched();
    Ok(())
}

/// One PAX extended-header record: "<len> <key>=<value>\n".
fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while format!("{len}{body}").len() != len {
        len += 1;
    }
    format!("{len}{body}").into_bytes()
}

#[test]
fn xattrs_from_the_archive_are_not_applied() -> Result<()> {
    let scene = Scene::new()?;
    let pax = pax_record("SCHILY.xattr.trusted.overlay.opaque", "y");
    let tar = LayerBuilder::new()
        .raw(b"././@PaxHeader", tar::EntryType::XHeader, b"", &pax)
        .dir("forged/", 0o755)
        .tar();
    scene.unpack(&tar)?;
    assert!(scene.layer().join("forged").is_dir());
    assert_eq!(xattr_len(&scene.layer().join("forged"), "trusted.overlay.opaque"), None);
    Ok(())
}

fn xattr_len(path: &Path, name: &str) -> Option<usize> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: both strings are NUL-terminated; a null buffer of size 0 asks for the length.
    let n = unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
    usize::try_from(n).ok()
}

#[test]
fn malformed_whiteouts_are_refused() -> Result<()> {
    let scene = Scene::new()?;
    for name in [&b"etc/.wh."[..], b"etc/.wh.."] {
        let tar = LayerBuilder::new().raw(name, tar::EntryType::Regular, b"", b"").tar();
        let err = scene.unpack(&tar).expect_err("bad whiteout");
        assert!(matches!(err, UnpackLayerError::InvalidWhiteout { .. }), "{err:?}");
    }
    scene.assert_outside_untouched();
    Ok(())
}

#[test]
fn gzip_zstd_and_plain_layers_unpack_alike() -> Result<()> {
    let tar = LayerBuilder::new()
        .dir("d/", 0o700)
        .file("d/f", b"content", 0o600)
        .symlink("l", "d/f")
        .tar();
    let zstd = zstd::encode_all(&tar[..], 3)?;
    for (what, bytes) in [("plain", tar.clone()), ("gzip", gzip(&tar)), ("zstd", zstd)] {
        let scene = Scene::new()?;
        let stats = scene.unpack(&bytes)?;
        assert_eq!(stats.entries, 3, "{what}");
        assert_eq!(stats.file_bytes, 7, "{what}");
        assert_eq!(std::fs::read(scene.layer().join("l"))?, b"content", "{what}");
        assert_eq!(std::fs::metadata(scene.layer().join("d"))?.permissions().mode() & 0o777, 0o700);
    }
    Ok(())
}

#[test]
fn truncated_archive_is_an_error() -> Result<()> {
    let scene = Scene::new()?;
    let tar = LayerBuilder::new().file("big", &[7u8; 10_000], 0o644).tar();
    let err = scene.unpack(&tar[..3000]).expect_err("truncated");
    assert!(
        matches!(err, UnpackLayerError::WriteContent { .. } | UnpackLayerError::ReadArchive(_)),
        "{err:?}"
    );
    Ok(())
}

#[test]
fn decompression_bombs_stop_at_the_limits() -> Result<()> {
    use hutch_image::extract::{UnpackLimits, unpack_layer_with_limits};
    // 8 MiB of zeros compress to a few KiB.
    let bomb = gzip(&LayerBuilder::new().file("zeros", &vec![0u8; 8 << 20], 0o644).tar());
    assert!(bomb.len() < 64 << 10);
    let scene = Scene::new()?;
    let limits = UnpackLimits { max_file_bytes: 1 << 20, ..UnpackLimits::default() };
    let err = unpack_layer_with_limits(&bomb[..], &scene.layer(), limits).expect_err("too large");
    assert!(matches!(err, UnpackLayerError::TooLarge { limit } if limit == 1 << 20), "{err:?}");
    assert!(!scene.layer().join("zeros").exists(), "the oversized file is not even started");

    let mut many = LayerBuilder::new();
    for i in 0..20 {
        many = many.file(&format!("f{i}"), b"", 0o644);
    }
    let scene = Scene::new()?;
    let limits = UnpackLimits { max_entries: 10, ..UnpackLimits::default() };
    let err =
        unpack_layer_with_limits(&many.tar()[..], &scene.layer(), limits).expect_err("too many");
    assert!(matches!(err, UnpackLayerError::TooManyEntries { limit: 10 }), "{err:?}");
    Ok(())
}
