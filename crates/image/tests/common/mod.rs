//! Shared test fixtures: a real local registry (Debian's docker-registry),
//! layer builders and a pusher built on oci-client.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

pub const BUSYBOX: &str = "/bin/busybox";

/// A docker-registry process on 127.0.0.1:<free port>, killed on drop.
pub struct Registry {
    child: Child,
    pub dir: tempfile::TempDir,
    pub addr: String,
}

impl Registry {
    pub fn start() -> Result<Registry> {
        Self::start_with_auth(None)
    }

    /// Starts a registry; with `Some((user, password))` it demands HTTP basic
    /// auth backed by an htpasswd file with a bcrypt hash.
    pub fn start_with_auth(auth: Option<(&str, &str)>) -> Result<Registry> {
        let dir = tempfile::tempdir()?;
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            listener.local_addr()?.port()
        };
        let addr = format!("127.0.0.1:{port}");
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage)?;
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n",
            storage.display()
        );
        if let Some((user, password)) = auth {
            let hash =
                bcrypt::hash_with_result(password, 4)?.format_for_version(bcrypt::Version::TwoY);
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{user}:{hash}\n"))?;
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: hutch-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start docker-registry")?;
        let registry = Registry { child, dir, addr };
        registry.wait_ready()?;
        Ok(registry)
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut stream) = TcpStream::connect(&self.addr) {
                let request = format!("GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
                let mut response = String::new();
                if stream.write_all(request.as_bytes()).is_ok()
                    && stream.read_to_string(&mut response).is_ok()
                    && response.starts_with("HTTP/1.")
                {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("registry on {} did not come up: {}", self.addr, self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Access-log lines of completed requests whose request line contains `needle`.
    pub fn requests_matching(&self, needle: &str) -> usize {
        self.log().lines().filter(|line| line.contains("\"GET ") && line.contains(needle)).count()
    }

    /// Path of a blob's data file in the registry's storage.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    pub fn reference(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.addr)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `condition` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Builds a layer tarball entry by entry.
pub struct LayerBuilder {
    builder: tar::Builder<Vec<u8>>,
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

    pub fn tar(self) -> Vec<u8> {
        self.builder.into_inner().expect("finish tar")
    }

    pub fn gzip(self) -> Vec<u8> {
        gzip(&self.tar())
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).expect("gzip");
    encoder.finish().expect("gzip")
}

pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

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
    let client =
        Client::new(ClientConfig { protocol: ClientProtocol::Http, ..ClientConfig::default() });
    let reference: Reference = registry.reference(repo_tag).parse()?;
    let diff_ids: Vec<String> = layer_tars.iter().map(|t| sha256(t)).collect();
    let layers: Vec<ImageLayer> =
        layer_tars.iter().map(|t| ImageLayer::oci_v1_gzip(gzip(t), None)).collect();
    let config = Config::oci_v1(image_config(&diff_ids), None);
    client.push(&reference, &layers, config, auth, None).await.context("push image")?;
    Ok(())
}

/// Digest of the gzip blob `push` uploads for `tar`.
pub fn pushed_layer_digest(tar: &[u8]) -> String {
    sha256(&gzip(tar))
}

pub fn read_link(path: &Path) -> String {
    std::fs::read_link(path).map(|p| p.display().to_string()).unwrap_or_default()
}
