//! A real local registry (Debian's docker-registry) and a pusher built on
//! oci-client, as in the image crate's tests.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

/// A docker-registry process on 127.0.0.1:<free port>, killed on drop.
pub struct Registry {
    child: Child,
    pub dir: tempfile::TempDir,
    pub addr: String,
}

impl Registry {
    pub fn start() -> Result<Registry> {
        let dir = tempfile::tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage)?;
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {addr}\n",
            storage.display()
        );
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
                let log = std::fs::read_to_string(self.dir.path().join("registry.log"));
                bail!("registry on {} did not come up: {log:?}", self.addr);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn reference(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.addr)
    }

    /// Pushes an image of one gzip layer (given as an uncompressed tar) whose
    /// image config has `config` as its `config` section.
    pub async fn push(
        &self,
        repo_tag: &str,
        layer: &[u8],
        config: serde_json::Value,
    ) -> Result<()> {
        let client =
            Client::new(ClientConfig { protocol: ClientProtocol::Http, ..ClientConfig::default() });
        let reference: Reference = self.reference(repo_tag).parse()?;
        let image_config = super::image::config_json(layer, config)?;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(layer)?;
        let layers = vec![ImageLayer::oci_v1_gzip(gz.finish()?, None)];
        let config = Config::oci_v1(image_config, None);
        client
            .push(&reference, &layers, config, &RegistryAuth::Anonymous, None)
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
