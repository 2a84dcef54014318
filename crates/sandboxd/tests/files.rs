//! Files through sandboxd's HTTP API: streamed, ranged, atomic, archived.

mod support;

use futures_util::StreamExt;
use serde_json::json;
use support::{Sandboxd, assert_error};

fn q(path: &std::path::Path) -> String {
    path.to_str().unwrap().replace('%', "%25").replace(' ', "%20")
}

#[tokio::test]
async fn write_creates_parents_and_read_streams_back_with_ranges() {
    let sandboxd = Sandboxd::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/c.bin");
    let payload: Vec<u8> = (0..=255u8).cycle().take(1_000_000).collect();
    let response = sandboxd
        .client
        .put(sandboxd.url(&format!("/files?path={}&mode=0600", q(&path))))
        .body(payload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let info: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        (info["kind"].as_str(), info["size"].as_u64(), info["mode"].as_u64()),
        (Some("file"), Some(1_000_000), Some(0o600))
    );
    assert_eq!(std::fs::read(&path).unwrap(), payload);

    let whole = sandboxd
        .client
        .get(sandboxd.url(&format!("/files?path={}", q(&path))))
        .send()
        .await
        .unwrap();
    assert_eq!(whole.status(), 200);
    assert_eq!(whole.headers()["accept-ranges"], "bytes");
    assert_eq!(whole.bytes().await.unwrap(), payload);

    let part = sandboxd
        .client
        .get(sandboxd.url(&format!("/files?path={}", q(&path))))
        .header("range", "bytes=1000-1009")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.headers()["content-range"], "bytes 1000-1009/1000000");
    assert_eq!(part.bytes().await.unwrap(), payload[1000..1010]);

    let suffix = sandboxd
        .client
        .get(sandboxd.url(&format!("/files?path={}", q(&path))))
        .header("range", "bytes=-5")
        .send()
        .await
        .unwrap();
    assert_eq!(suffix.bytes().await.unwrap(), payload[999_995..]);

    let outside = sandboxd
        .client
        .get(sandboxd.url(&format!("/files?path={}", q(&path))))
        .header("range", "bytes=2000000-")
        .send()
        .await
        .unwrap();
    assert_eq!(outside.status(), 416);
    assert_eq!(outside.headers()["content-range"], "bytes */1000000");
}

#[tokio::test]
async fn overwriting_is_atomic_and_keeps_mode_and_leaves_no_temp_files() {
    let sandboxd = Sandboxd::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("script.sh");
    std::fs::write(&path, "old").unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o751)).unwrap();
    let response = sandboxd
        .client
        .put(sandboxd.url(&format!("/files?path={}", q(&path))))
        .body("new")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o7777, 0o751);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[tokio::test]
async fn list_stat_mkdir_move_and_delete() {
    let sandboxd = Sandboxd::start();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (status, made) = sandboxd
        .post(&format!("/files/mkdir?path={}&mode=750", q(&root.join("x/y/z"))), json!(null))
        .await;
    assert_eq!(status, 200, "{made}");
    assert_eq!(made["kind"], "dir");
    // mkdir -p of an existing directory is fine.
    assert_eq!(
        sandboxd.post(&format!("/files/mkdir?path={}", q(&root.join("x/y"))), json!(null)).await.0,
        200
    );
    std::fs::write(root.join("x/file.txt"), "hello").unwrap();
    std::os::unix::fs::symlink("file.txt", root.join("x/link")).unwrap();

    let (status, listing) = sandboxd.get(&format!("/files/list?path={}", q(&root.join("x")))).await;
    assert_eq!(status, 200);
    let names: Vec<_> = listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(names, [("file.txt", "file"), ("link", "symlink"), ("y", "dir")]);
    assert_eq!(listing["entries"][1]["symlink_target"], "file.txt");

    let (status, stat) =
        sandboxd.get(&format!("/files/stat?path={}", q(&root.join("x/file.txt")))).await;
    assert_eq!((status, stat["size"].as_u64()), (200, Some(5)));

    let moved = sandboxd
        .post(
            "/files/move",
            json!({"from": root.join("x/file.txt"), "to": root.join("moved/here.txt")}),
        )
        .await;
    assert_eq!(moved.0, 200, "{}", moved.1);
    assert_eq!(std::fs::read_to_string(root.join("moved/here.txt")).unwrap(), "hello");
    std::fs::write(root.join("other"), "x").unwrap();
    assert_error(
        &sandboxd
            .post(
                "/files/move",
                json!({"from": root.join("other"), "to": root.join("moved/here.txt")}),
            )
            .await,
        409,
        "already_exists",
    );
    assert_eq!(
        sandboxd
            .post("/files/move", json!({"from": root.join("other"), "to": root.join("moved/here.txt"), "overwrite": true}))
            .await
            .0,
        200
    );

    assert_error(
        &sandboxd.delete(&format!("/files?path={}", q(&root.join("x")))).await,
        409,
        "directory_not_empty",
    );
    assert_eq!(
        sandboxd.delete(&format!("/files?path={}&recursive=true", q(&root.join("x")))).await.0,
        204
    );
    assert!(!root.join("x").exists());
    assert_error(
        &sandboxd.delete(&format!("/files?path={}", q(&root.join("x")))).await,
        404,
        "file_not_found",
    );
}

#[tokio::test]
async fn move_across_filesystems_copies() {
    let sandboxd = Sandboxd::start();
    // /dev/shm is a tmpfs; the temp dir usually is not. If both happen to
    // share a filesystem the move is a plain rename, which is also right.
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let disk = tempfile::tempdir().unwrap();
    std::fs::create_dir(shm.path().join("tree")).unwrap();
    std::fs::write(shm.path().join("tree/f"), "data").unwrap();
    let (status, body) = sandboxd
        .post(
            "/files/move",
            json!({"from": shm.path().join("tree"), "to": disk.path().join("tree")}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(std::fs::read_to_string(disk.path().join("tree/f")).unwrap(), "data");
    assert!(!shm.path().join("tree").exists());
}

#[tokio::test]
async fn directories_travel_as_tar_archives_both_ways() {
    let sandboxd = Sandboxd::start();
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("d/e")).unwrap();
    std::fs::write(src.path().join("d/e/f.txt"), "deep").unwrap();
    std::fs::write(src.path().join("top"), vec![7u8; 100_000]).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", src.path().join("link")).unwrap();
    let archive = sandboxd
        .client
        .get(sandboxd.url(&format!("/files/archive?path={}", q(src.path()))))
        .send()
        .await
        .unwrap();
    assert_eq!(archive.status(), 200);
    assert_eq!(archive.headers()["content-type"], "application/x-tar");
    let tar_bytes = archive.bytes().await.unwrap();

    let dst = tempfile::tempdir().unwrap();
    let target = dst.path().join("copy");
    let response = sandboxd
        .client
        .put(sandboxd.url(&format!("/files/archive?path={}", q(&target))))
        .body(tar_bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(std::fs::read_to_string(target.join("d/e/f.txt")).unwrap(), "deep");
    assert_eq!(std::fs::read(target.join("top")).unwrap(), vec![7u8; 100_000]);
    assert_eq!(std::fs::read_link(target.join("link")).unwrap().to_str(), Some("/etc/passwd"));

    // An archive that tries to climb out of the target is refused.
    let mut evil = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(4);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    let name = b"../escaped";
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.set_cksum();
    evil.append(&header, &b"evil"[..]).unwrap();
    let evil = evil.into_inner().unwrap();
    let inner = dst.path().join("inner");
    let response = sandboxd
        .client
        .put(sandboxd.url(&format!("/files/archive?path={}", q(&inner))))
        .body(evil)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_client_error()
            || response.status().is_server_error()
            || !dst.path().join("escaped").exists()
    );
    assert!(!dst.path().join("escaped").exists(), "the archive escaped its directory");
}

#[tokio::test]
async fn file_errors_are_clear() {
    let sandboxd = Sandboxd::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("plain"), "x").unwrap();
    assert_error(&sandboxd.get("/files?path=relative/path").await, 400, "invalid_path");
    assert_error(&sandboxd.get("/files?path=/../etc/passwd").await, 400, "invalid_path");
    assert_error(&sandboxd.get("/files").await, 400, "invalid_query");
    assert_error(
        &sandboxd.get(&format!("/files?path={}", q(&dir.path().join("missing")))).await,
        404,
        "file_not_found",
    );
    assert_error(
        &sandboxd.get(&format!("/files?path={}", q(dir.path()))).await,
        409,
        "is_a_directory",
    );
    assert_error(
        &sandboxd.get(&format!("/files/list?path={}", q(&dir.path().join("plain")))).await,
        409,
        "not_a_directory",
    );
    let under_file = sandboxd
        .client
        .put(sandboxd.url(&format!("/files?path={}", q(&dir.path().join("plain/child")))))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(under_file.status(), 409);
    let onto_dir = sandboxd
        .client
        .put(sandboxd.url(&format!("/files?path={}", q(dir.path()))))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(onto_dir.status(), 409);
    let bad_mode = sandboxd
        .client
        .put(sandboxd.url(&format!("/files?path={}&mode=999", q(&dir.path().join("m")))))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_mode.status(), 400);
    assert_error(&sandboxd.delete("/files?path=/").await, 400, "bad_request");
    assert_error(
        &sandboxd
            .post(&format!("/files/mkdir?path={}", q(&dir.path().join("plain"))), json!(null))
            .await,
        409,
        "already_exists",
    );
}

/// 1 GiB up and down through sandboxd while its peak memory stays flat.
#[tokio::test]
async fn a_gibibyte_streams_both_ways_in_flat_memory() {
    const SIZE: u64 = 1 << 30;
    const CHUNK: usize = 1 << 20;
    let sandboxd = Sandboxd::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big");
    let chunks = futures_util::stream::iter(
        (0..SIZE / CHUNK as u64)
            .map(|i| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![(i % 251) as u8; CHUNK]))),
    );
    let response = sandboxd
        .client
        .put(sandboxd.url(&format!("/files?path={}", q(&path))))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE);

    let response = sandboxd
        .client
        .get(sandboxd.url(&format!("/files?path={}", q(&path))))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-length"], SIZE.to_string().as_str());
    let mut body = response.bytes_stream();
    let mut received = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        // Every 4 KiB is enough to catch a lost, duplicated or shifted
        // chunk, and keeps a debug build quick.
        for (i, byte) in chunk.iter().enumerate().step_by(4096) {
            let position = received + i as u64;
            assert_eq!(*byte, ((position / CHUNK as u64) % 251) as u8, "byte {position}");
        }
        let last = received + chunk.len() as u64 - 1;
        assert_eq!(chunk[chunk.len() - 1], ((last / CHUNK as u64) % 251) as u8, "byte {last}");
        received += chunk.len() as u64;
    }
    assert_eq!(received, SIZE);
    let peak = sandboxd.peak_rss_kib();
    assert!(peak < 64 * 1024, "sandboxd's peak RSS was {peak} KiB while moving 1 GiB");
}
