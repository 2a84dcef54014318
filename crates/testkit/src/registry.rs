//! A real OCI registry for tests: Debian's `docker-registry` (the CNCF
//! distribution registry) on a free loopback port, its storage, config and
//! log in a temp dir. Tests pull from it rather than from a mock, so they
//! meet a real registry's answers.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

/// How long `docker-registry` may take to answer its first request.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A `docker-registry` process serving plain HTTP on `127.0.0.1:<port>`.
/// Dropping it kills the process and then removes its temp dir, even when
/// the test failed.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    /// Holds `storage/`, `config.yml`, `registry.log` (and `htpasswd`).
    pub dir: tempfile::TempDir,
    /// `127.0.0.1:<port>`: the registry part of a reference, and what a
    /// puller must be told is an insecure (HTTP) registry.
    pub addr: String,
}

impl Registry {
    /// Starts an anonymous registry and waits until it answers.
    pub fn start() -> anyhow::Result<Registry> {
        Self::start_with_auth(None)
    }

    /// Like [`Registry::start`]; with `Some((user, password))` it demands
    /// HTTP basic auth, checked against an htpasswd file with a bcrypt hash
    /// (the only kind docker-registry accepts).
    pub fn start_with_auth(auth: Option<(&str, &str)>) -> anyhow::Result<Registry> {
        let dir = tempfile::tempdir()?;
        let addr = format!("127.0.0.1:{}", crate::free_loopback_port()?);
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage)?;
        // The access log is on so that tests can count requests; deletes are
        // enabled so that tests can remove what they pushed.
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n",
            storage.display()
        );
        if let Some((user, password)) = auth {
            // Cost 4, the least bcrypt allows: the registry checks it on every request.
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
            .context("start docker-registry (apt-get install docker-registry)")?;
        let registry = Registry { child, dir, addr };
        registry.wait_ready()?;
        Ok(registry)
    }

    /// Polls `GET /v2/` until an HTTP answer comes (any status: with auth it
    /// is 401), which means the registry has bound its port and serves.
    fn wait_ready(&self) -> anyhow::Result<()> {
        let ready = crate::wait_until(READY_TIMEOUT, || {
            let Ok(mut stream) = TcpStream::connect(&self.addr) else { return false };
            let request = format!("GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
            let mut response = String::new();
            stream.write_all(request.as_bytes()).is_ok()
                && stream.read_to_string(&mut response).is_ok()
                && response.starts_with("HTTP/1.")
        });
        if !ready {
            bail!("registry on {} did not come up: {}", self.addr, self.log());
        }
        Ok(())
    }

    /// Everything the registry logged so far (its access log included).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// How many completed GET requests the access log holds whose line
    /// contains `needle` (a digest, `/manifests/`, ...).
    pub fn requests_matching(&self, needle: &str) -> usize {
        self.log().lines().filter(|line| line.contains("\"GET ") && line.contains(needle)).count()
    }

    /// Path of a blob's data file in the registry's storage, for tests that
    /// corrupt or remove a blob behind the registry's back.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// The full reference of `repo_tag` (`name:tag`) in this registry.
    pub fn reference(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.addr)
    }

    /// Pushes an image of `layers` with the image config `config` (JSON, see
    /// [`crate::image_config`]) as `repo_tag`, over plain HTTP.
    pub async fn push(
        &self,
        repo_tag: &str,
        layers: &[ImageLayer],
        config: Vec<u8>,
        auth: &RegistryAuth,
    ) -> anyhow::Result<()> {
        let client =
            Client::new(ClientConfig { protocol: ClientProtocol::Http, ..ClientConfig::default() });
        let reference: Reference = self.reference(repo_tag).parse()?;
        client
            .push(&reference, layers, Config::oci_v1(config, None), auth, None)
            .await
            .context("push image")?;
        Ok(())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
