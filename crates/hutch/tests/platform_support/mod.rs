//! Starts the real `hutch` binary for end-to-end tests and cleans up after it.
//!
//! Every platform runs on free loopback ports with a temp data dir. When a
//! test ends — passing or panicking — the guard deletes every sandbox through
//! the API and waits until they are gone before it stops hutch, so no sandbox
//! outlives its test. If hutch itself died, the guard starts it once more on
//! the same data dir: adoption is how sandboxes are found again.

#![allow(dead_code)]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn hutch_bin() -> &'static str {
    env!("CARGO_BIN_EXE_hutch")
}

/// What a `hutch up` (or `hutch server`) printed about itself.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub api: String,
    pub grpc: Option<String>,
    pub proxy: Option<String>,
}

/// A running `hutch` process.
#[derive(Debug)]
pub struct Hutch {
    pub child: Child,
    pub endpoints: Endpoints,
    pub args: Vec<String>,
    pub data_dir: PathBuf,
    /// Keeps the process's stdout and stderr drained (and printed on failure).
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Hutch {
    /// Starts `hutch <args>` and waits for its address lines.
    pub fn start(args: &[String], data_dir: &Path, env: &[(&str, &str)]) -> Hutch {
        let mut command = Command::new(hutch_bin());
        command.args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
        for (key, value) in env {
            command.env(key, value);
        }
        command.env("RUST_LOG", "warn");
        let mut child = command.spawn().expect("spawn hutch");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel::<String>();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for (stream, tx) in [
            (Box::new(stdout) as Box<dyn std::io::Read + Send>, Some(tx)),
            (Box::new(stderr), None),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    log.lock().unwrap().push_str(&format!("{line}\n"));
                    if let Some(tx) = &tx {
                        let _ = tx.send(line);
                    }
                }
            });
        }
        // The last line each kind of process prints about itself.
        let last = match args[0].as_str() {
            "up" => "network:",
            "server" => "node token:",
            _ => "proxy:",
        };
        let (mut api, mut grpc, mut proxy) = (String::new(), None, None);
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = child.kill();
                panic!("hutch {args:?} did not come up:\n{}", log.lock().unwrap());
            };
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("api:") {
                api = rest.trim().to_owned();
            } else if let Some(rest) = line.strip_prefix("grpc:") {
                grpc = Some(rest.trim().to_owned());
            } else if let Some(rest) = line.strip_prefix("proxy:") {
                proxy = Some(rest.trim().to_owned());
            }
            if line.starts_with(last) {
                break;
            }
        }
        Hutch {
            child,
            endpoints: Endpoints { api, grpc, proxy },
            args: args.to_vec(),
            data_dir: data_dir.to_owned(),
            log,
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&mut self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal);
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        wait_exit(&mut self.child)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `hutch up` on free ports, with egress `none` only, in its own temp dir.
#[derive(Debug)]
pub struct Platform {
    pub hutch: Option<Hutch>,
    pub dir: tempfile::TempDir,
    pub admin_key: String,
}

pub fn up_args(data_dir: &Path) -> Vec<String> {
    [
        "up",
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--grpc-listen",
        "127.0.0.1:0",
        "--proxy-listen",
        "127.0.0.1:0",
        "--no-network",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl Platform {
    pub fn up() -> Platform {
        let dir = tempfile::Builder::new().prefix("hutch-e2e-").tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let hutch = Hutch::start(&up_args(&data_dir), &data_dir, &[]);
        let admin_key = std::fs::read_to_string(data_dir.join("admin.key")).unwrap();
        Platform { hutch: Some(hutch), dir, admin_key: admin_key.trim().to_owned() }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn api(&self) -> String {
        self.hutch.as_ref().unwrap().endpoints.api.clone()
    }

    pub fn proxy(&self) -> String {
        self.hutch.as_ref().unwrap().endpoints.proxy.clone().unwrap()
    }

    pub fn client(&self) -> Api {
        Api::new(&self.api(), &self.admin_key)
    }

    /// Stops hutch gracefully and starts it again on the same data dir.
    pub fn restart(&mut self) {
        let mut hutch = self.hutch.take().unwrap();
        let status = hutch.terminate();
        assert!(status.success(), "hutch exited with {status}:\n{}", hutch.log());
        self.hutch = Some(Hutch::start(&up_args(&self.data_dir()), &self.data_dir(), &[]));
    }

    /// Kills hutch with SIGKILL and starts it again on the same data dir.
    pub fn crash_and_restart(&mut self) {
        let mut hutch = self.hutch.take().unwrap();
        hutch.kill();
        self.hutch = Some(Hutch::start(&up_args(&self.data_dir()), &self.data_dir(), &[]));
    }

    /// The environment a CLI client needs to reach this platform.
    pub fn client_env(&self) -> Vec<(String, String)> {
        vec![
            ("HUTCH_URL".to_owned(), self.api()),
            ("HUTCH_API_KEY".to_owned(), self.admin_key.clone()),
        ]
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        let Some(mut hutch) = self.hutch.take() else { return };
        if hutch.child.try_wait().ok().flatten().is_some() {
            hutch = Hutch::start(&up_args(&self.data_dir()), &self.data_dir(), &[]);
        }
        let api = Api::new(&hutch.endpoints.api, &self.admin_key);
        delete_everything(&api);
        if std::thread::panicking() {
            eprintln!("--- hutch log ---\n{}", hutch.log());
        }
        hutch.terminate();
    }
}

/// Deletes every sandbox of every namespace and waits until none is left.
pub fn delete_everything(api: &Api) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut left = 0;
        let namespaces = api.get("/v1/namespaces").1;
        for ns in namespaces.as_array().cloned().unwrap_or_default() {
            let ns = ns["name"].as_str().unwrap_or("default").to_owned();
            let (_, list) = api.get(&format!("/v1/namespaces/{ns}/sandboxes?include_stopped=true"));
            for sandbox in list["sandboxes"].as_array().cloned().unwrap_or_default() {
                left += 1;
                let id = sandbox["id"].as_str().unwrap();
                api.delete(&format!("/v1/namespaces/{ns}/sandboxes/{id}"));
            }
        }
        if left == 0 || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A small blocking JSON client for the REST API.
#[derive(Clone, Debug)]
pub struct Api {
    base: String,
    key: String,
    client: reqwest::blocking::Client,
}

impl Api {
    pub fn new(base: &str, key: &str) -> Api {
        Api {
            base: base.trim_end_matches('/').to_owned(),
            key: key.to_owned(),
            client: reqwest::blocking::Client::builder().timeout(DEADLINE * 2).build().unwrap(),
        }
    }

    pub fn with_key(&self, key: &str) -> Api {
        Api { key: key.to_owned(), ..self.clone() }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::blocking::RequestBuilder {
        self.client.request(method, self.url(path)).bearer_auth(&self.key)
    }

    fn json(response: reqwest::blocking::Response) -> (u16, Value) {
        let status = response.status().as_u16();
        let text = response.text().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        Self::json(self.request(reqwest::Method::GET, path).send().unwrap())
    }

    pub fn post(&self, path: &str, body: Value) -> (u16, Value) {
        Self::json(self.request(reqwest::Method::POST, path).json(&body).send().unwrap())
    }

    pub fn delete(&self, path: &str) -> (u16, Value) {
        Self::json(self.request(reqwest::Method::DELETE, path).send().unwrap())
    }

    /// Creates a sandbox in `ns` and returns its id.
    pub fn create(&self, ns: &str, body: Value) -> String {
        let (status, sandbox) = self.post(&format!("/v1/namespaces/{ns}/sandboxes"), body);
        assert_eq!(status, 201, "{sandbox}");
        sandbox["id"].as_str().unwrap().to_owned()
    }

    pub fn sandbox(&self, ns: &str, id: &str) -> Value {
        let (status, sandbox) = self.get(&format!("/v1/namespaces/{ns}/sandboxes/{id}"));
        assert_eq!(status, 200, "{sandbox}");
        sandbox
    }

    /// Polls until the sandbox is in `state`, and returns it.
    pub fn wait_state(&self, ns: &str, id: &str, state: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let sandbox = self.sandbox(ns, id);
            if sandbox["state"] == state {
                return sandbox;
            }
            assert!(Instant::now() < deadline, "sandbox never became {state}: {sandbox}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a command in the sandbox through the daemon route.
    pub fn exec(&self, ns: &str, id: &str, command: &str, args: &[&str]) -> Value {
        let (status, result) = self.post(
            &format!("/v1/namespaces/{ns}/sandboxes/{id}/daemon/exec"),
            json!({"command": command, "args": args}),
        );
        assert_eq!(status, 200, "{result}");
        result
    }
}
