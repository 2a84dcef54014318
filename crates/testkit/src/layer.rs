//! Image layers built in memory, entry by entry, and the digests and
//! compression a registry or an image layout wants of them.

use std::io::Write as _;

/// Builds a layer tarball entry by entry. Every entry is owned by root and
/// has one fixed mtime, so that the same entries make the same bytes (and
/// digest) on every run.
pub struct LayerBuilder {
    builder: tar::Builder<Vec<u8>>,
}

impl std::fmt::Debug for LayerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerBuilder").finish_non_exhaustive()
    }
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    pub fn new() -> Self {
        LayerBuilder { builder: tar::Builder::new(Vec::new()) }
    }

    fn header(entry_type: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(entry_type);
        header.set_mode(mode);
        header.set_size(size);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        header
    }

    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        let mut header = Self::header(tar::EntryType::Directory, mode, 0);
        self.builder.append_data(&mut header, path, std::io::empty()).expect("append dir");
        self
    }

    pub fn file(mut self, path: &str, content: &[u8], mode: u32) -> Self {
        let mut header = Self::header(tar::EntryType::Regular, mode, content.len() as u64);
        self.builder.append_data(&mut header, path, content).expect("append file");
        self
    }

    pub fn file_owned(mut self, path: &str, content: &[u8], mode: u32, uid: u64, gid: u64) -> Self {
        let mut header = Self::header(tar::EntryType::Regular, mode, content.len() as u64);
        header.set_uid(uid);
        header.set_gid(gid);
        self.builder.append_data(&mut header, path, content).expect("append file");
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut header = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.builder.append_link(&mut header, path, target).expect("append symlink");
        self
    }

    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut header = Self::header(tar::EntryType::Link, 0o644, 0);
        self.builder.append_link(&mut header, path, target).expect("append hardlink");
        self
    }

    pub fn device(
        mut self,
        path: &str,
        entry_type: tar::EntryType,
        major: u32,
        minor: u32,
    ) -> Self {
        let mut header = Self::header(entry_type, 0o666, 0);
        header.set_device_major(major).expect("major");
        header.set_device_minor(minor).expect("minor");
        self.builder.append_data(&mut header, path, std::io::empty()).expect("append device");
        self
    }

    pub fn fifo(mut self, path: &str) -> Self {
        let mut header = Self::header(tar::EntryType::Fifo, 0o640, 0);
        self.builder.append_data(&mut header, path, std::io::empty()).expect("append fifo");
        self
    }

    /// Appends an entry with raw name and link bytes, bypassing the tar
    /// crate's own path checks (which refuse `..` and absolute paths), the
    /// way a hostile layer would be written.
    pub fn raw(
        mut self,
        name: &[u8],
        entry_type: tar::EntryType,
        link: &[u8],
        content: &[u8],
    ) -> Self {
        let mut header = Self::header(entry_type, 0o644, content.len() as u64);
        {
            let gnu = header.as_gnu_mut().expect("gnu header");
            gnu.name = [0; 100];
            gnu.name[..name.len()].copy_from_slice(name);
            gnu.linkname = [0; 100];
            gnu.linkname[..link.len()].copy_from_slice(link);
        }
        header.set_cksum();
        self.builder.append(&header, content).expect("append raw");
        self
    }

    /// The finished, uncompressed tarball.
    pub fn tar(self) -> Vec<u8> {
        self.builder.into_inner().expect("finish tar")
    }

    /// The finished tarball, gzip-compressed.
    pub fn gzip(self) -> Vec<u8> {
        gzip(&self.tar())
    }
}

/// `data` gzip-compressed (fast: tests want speed, not size).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).expect("gzip");
    encoder.finish().expect("gzip")
}

/// The OCI digest of `data`: `sha256:<hex>`.
pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}
