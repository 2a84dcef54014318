//! Store lifecycle: ownership lock and crash leftovers.

use anyhow::Result;
use hutch_image::{ImageStore, OpenStoreError};

#[test]
fn a_store_has_one_owner_at_a_time() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = ImageStore::open(dir.path().to_owned())?;
    let second = ImageStore::open(dir.path().to_owned());
    assert!(matches!(second, Err(OpenStoreError::Locked { .. })), "{second:?}");
    // Clones share the one owner.
    let clone = store.clone();
    drop(store);
    assert!(ImageStore::open(dir.path().to_owned()).is_err());
    drop(clone);
    ImageStore::open(dir.path().to_owned())?;
    Ok(())
}

#[test]
fn leftovers_of_an_interrupted_unpack_are_removed_on_open() -> Result<()> {
    let dir = tempfile::tempdir()?;
    drop(ImageStore::open(dir.path().to_owned())?);
    // What a crash mid-unpack leaves: a half-written layer dir and a blob.
    let half = dir.path().join("tmp/0123abcd");
    std::fs::create_dir_all(half.join("usr/bin"))?;
    std::fs::write(half.join("usr/bin/partial"), b"par")?;
    std::fs::write(dir.path().join("tmp/blob"), b"blob")?;
    let store = ImageStore::open(dir.path().to_owned())?;
    assert_eq!(std::fs::read_dir(dir.path().join("tmp"))?.count(), 0);
    assert!(store.list()?.is_empty());
    Ok(())
}
