//! `sandbox cp` against a real sandboxd: files and directories both ways,
//! byte-identical, streamed, with `cp`'s rules for destinations.

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use support::Sandboxd;

/// Deterministic bytes that do not compress into a pattern.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

async fn cp(sandboxd: &Sandboxd, from: &str, to: &str) -> support::Output {
    let output = sandboxd.hutch().args(["sandbox", "cp", from, to]).run().await;
    assert_eq!(output.code, Some(0), "cp {from} {to}: {}", output.stderr);
    output
}

#[tokio::test]
async fn a_50_mib_file_round_trips_byte_identical() {
    let sandboxd = Sandboxd::start();
    let local = tempfile::tempdir().unwrap();
    let remote = tempfile::tempdir().unwrap();
    let data = noise(50 * 1024 * 1024 + 17, 42);
    let source = local.path().join("big.bin");
    std::fs::write(&source, &data).unwrap();
    std::fs::set_permissions(&source, std::fs::Permissions::from_mode(0o640)).unwrap();

    let remote_file = remote.path().join("in/sub/big.bin");
    cp(&sandboxd, source.to_str().unwrap(), &format!("sb:{}", remote_file.display())).await;
    assert!(std::fs::read(&remote_file).unwrap() == data, "upload differs");
    assert_eq!(std::fs::metadata(&remote_file).unwrap().permissions().mode() & 0o777, 0o640);

    let back = local.path().join("back.bin");
    cp(&sandboxd, &format!("sb:{}", remote_file.display()), back.to_str().unwrap()).await;
    assert!(std::fs::read(&back).unwrap() == data, "download differs");
    assert_eq!(std::fs::metadata(&back).unwrap().permissions().mode() & 0o777, 0o640);
    // No temp file is left beside the result.
    assert_eq!(std::fs::read_dir(local.path()).unwrap().count(), 2);
}

fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("a/b/empty")).unwrap();
    std::fs::write(root.join("top.txt"), "top\n").unwrap();
    std::fs::write(root.join("a/b/data.bin"), noise(300_000, 7)).unwrap();
    std::fs::write(root.join("a/run.sh"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(root.join("a/run.sh"), std::fs::Permissions::from_mode(0o755))
        .unwrap();
    std::os::unix::fs::symlink("../top.txt", root.join("a/link")).unwrap();
}

fn assert_same_tree(expected: &Path, actual: &Path) {
    for relative in ["top.txt", "a/b/data.bin", "a/run.sh"] {
        assert_eq!(
            std::fs::read(expected.join(relative)).unwrap(),
            std::fs::read(actual.join(relative)).unwrap(),
            "{relative}"
        );
    }
    let mode = std::fs::metadata(actual.join("a/run.sh")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755);
    assert!(actual.join("a/b/empty").is_dir());
    assert_eq!(std::fs::read_link(actual.join("a/link")).unwrap(), Path::new("../top.txt"));
}

#[tokio::test]
async fn directories_round_trip_as_trees() {
    let sandboxd = Sandboxd::start();
    let local = tempfile::tempdir().unwrap();
    let remote = tempfile::tempdir().unwrap();
    let tree = local.path().join("tree");
    make_tree(&tree);

    // Into a path that does not exist: it becomes the copy.
    let remote_copy = remote.path().join("copy");
    cp(&sandboxd, tree.to_str().unwrap(), &format!("sb:{}", remote_copy.display())).await;
    assert_same_tree(&tree, &remote_copy);

    // Into an existing directory: the copy goes inside under its own name.
    cp(&sandboxd, tree.to_str().unwrap(), &format!("sb:{}", remote.path().display())).await;
    assert_same_tree(&tree, &remote.path().join("tree"));

    // And back, into an existing local directory.
    let back = local.path().join("back");
    std::fs::create_dir(&back).unwrap();
    cp(&sandboxd, &format!("sb:{}", remote_copy.display()), back.to_str().unwrap()).await;
    assert_same_tree(&tree, &back.join("copy"));
}

#[tokio::test]
async fn files_land_inside_existing_directories_and_stdio_works() {
    let sandboxd = Sandboxd::start();
    let local = tempfile::tempdir().unwrap();
    let remote = tempfile::tempdir().unwrap();
    std::fs::write(local.path().join("note.txt"), "hello\n").unwrap();

    // A destination ending in `/` is a directory, created if needed.
    let note = local.path().join("note.txt");
    cp(&sandboxd, note.to_str().unwrap(), &format!("sb:{}/new/", remote.path().display())).await;
    assert_eq!(std::fs::read_to_string(remote.path().join("new/note.txt")).unwrap(), "hello\n");

    // A relative local path, into an existing directory.
    let output = sandboxd
        .hutch()
        .current_dir(local.path())
        .args(["sandbox", "cp", "note.txt", &format!("sb:{}", remote.path().display())])
        .run()
        .await;
    assert_eq!(output.code, Some(0), "{}", output.stderr);
    assert_eq!(std::fs::read_to_string(remote.path().join("note.txt")).unwrap(), "hello\n");

    let to_stdout = cp(&sandboxd, &format!("sb:{}/note.txt", remote.path().display()), "-").await;
    assert_eq!(to_stdout.stdout, b"hello\n");

    let from_stdin = sandboxd
        .hutch()
        .args(["sandbox", "cp", "-", &format!("sb:{}/piped.bin", remote.path().display())])
        .stdin(noise(100_000, 3))
        .run()
        .await;
    assert_eq!(from_stdin.code, Some(0), "{}", from_stdin.stderr);
    assert_eq!(std::fs::read(remote.path().join("piped.bin")).unwrap(), noise(100_000, 3));
}

#[tokio::test]
async fn missing_sources_fail_with_one_line() {
    let sandboxd = Sandboxd::start();
    let local = tempfile::tempdir().unwrap();
    let missing_remote = sandboxd
        .hutch()
        .args(["sandbox", "cp", "sb:/no/such/file", local.path().to_str().unwrap()])
        .run()
        .await;
    missing_remote.assert_one_line_failure(1);
    assert!(missing_remote.stderr.contains("/no/such/file"), "{}", missing_remote.stderr);

    let missing_local = sandboxd
        .hutch()
        .args(["sandbox", "cp", local.path().join("nothing").to_str().unwrap(), "sb:/tmp/x"])
        .run()
        .await;
    missing_local.assert_one_line_failure(1);
    assert!(missing_local.stderr.contains("nothing"), "{}", missing_local.stderr);
}

/// The attack: a sandbox marks a file setuid (its root may) and waits for
/// someone to copy it out; a setuid-root file on the host is a root shell for
/// whoever runs it. Copied out, alone or in a directory, it is a plain file.
#[tokio::test]
async fn files_copied_out_of_a_sandbox_are_never_setuid() {
    let sandboxd = Sandboxd::start();
    let local = tempfile::tempdir().unwrap();
    let remote = tempfile::tempdir().unwrap();
    let tree = remote.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    let planted = tree.join("shell");
    std::fs::write(&planted, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o6755)).unwrap();

    let single = local.path().join("shell");
    cp(&sandboxd, &format!("sb:{}", planted.display()), single.to_str().unwrap()).await;
    let mode = std::fs::metadata(&single).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o755, "{mode:o}");

    let copied = local.path().join("tree");
    cp(&sandboxd, &format!("sb:{}", tree.display()), copied.to_str().unwrap()).await;
    let mode = std::fs::metadata(copied.join("shell")).unwrap().permissions().mode();
    assert_eq!(mode & 0o7000, 0, "{mode:o}");
}
