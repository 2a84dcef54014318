//! `hutch server` with two `hutch dataplane` processes on one machine, the
//! shape of a real cluster.

mod platform_support;
use platform_support as support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{Api, DEADLINE, Hutch, delete_everything};

struct Cluster {
    dir: tempfile::TempDir,
    server: Hutch,
    nodes: Vec<Option<Hutch>>,
    admin_key: String,
}

fn server_args(data_dir: &Path) -> Vec<String> {
    ["server", "--data-dir", data_dir.to_str().unwrap(), "--listen", "127.0.0.1:0"]
        .iter()
        .map(|s| s.to_string())
        .chain(["--grpc-listen".to_owned(), "127.0.0.1:0".to_owned()])
        .collect()
}

impl Cluster {
    fn start(nodes: usize) -> Cluster {
        let dir = tempfile::Builder::new().prefix("hutch-cluster-").tempdir().unwrap();
        let server_dir = dir.path().join("server");
        let server = Hutch::start(&server_args(&server_dir), &server_dir, &[]);
        let admin_key = std::fs::read_to_string(server_dir.join("admin.key")).unwrap();
        let mut cluster =
            Cluster { dir, server, nodes: Vec::new(), admin_key: admin_key.trim().to_owned() };
        for n in 0..nodes {
            let node = cluster.start_node(n);
            cluster.nodes.push(Some(node));
        }
        cluster
    }

    fn node_dir(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("node-{n}"))
    }

    fn start_node(&self, n: usize) -> Hutch {
        let token = std::fs::read_to_string(self.dir.path().join("server/node.key")).unwrap();
        let grpc = format!("http://{}", self.server.endpoints.grpc.as_ref().unwrap());
        let node_dir = self.node_dir(n);
        let node_id = format!("node-{n}");
        let data_dir = node_dir.to_str().unwrap().to_owned();
        let env = [
            ("HUTCH_NODE_ID", node_id.as_str()),
            ("HUTCH_SERVER_URL", grpc.as_str()),
            ("HUTCH_NODE_TOKEN", token.trim()),
            ("HUTCH_DATA_DIR", data_dir.as_str()),
            ("HUTCH_PROXY_LISTEN", "127.0.0.1:0"),
            ("HUTCH_NETWORK", "false"),
        ];
        Hutch::start(&["dataplane".to_owned()], &node_dir, &env)
    }

    fn api(&self) -> Api {
        Api::new(&self.server.endpoints.api, &self.admin_key)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A killed node comes back so that it destroys what it still runs.
        for n in 0..self.nodes.len() {
            if self.nodes[n].is_none() {
                self.nodes[n] = Some(self.start_node(n));
            }
        }
        delete_everything(&self.api());
        let deadline = Instant::now() + DEADLINE;
        for n in 0..self.nodes.len() {
            // Sandboxes the server forgot are destroyed by the node on its own.
            let journal = self.node_dir(n).join("sandboxes.log");
            while live_records(&journal) > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if std::thread::panicking() {
            eprintln!("--- server log ---\n{}", self.server.log());
            for node in self.nodes.iter().flatten() {
                eprintln!("--- node log ---\n{}", node.log());
            }
        }
        for node in self.nodes.iter_mut().flatten() {
            node.terminate();
        }
        self.server.terminate();
    }
}

#[test]
fn placement_uses_both_nodes_and_a_lost_node_fails_its_sandboxes() {
    let mut cluster = Cluster::start(2);
    let api = cluster.api();
    let ids: Vec<String> =
        (0..4).map(|_| api.create("default", json!({"resources": {"memory_mb": 256}}))).collect();
    let mut placed = std::collections::BTreeMap::<String, Vec<String>>::new();
    for id in &ids {
        let sandbox = api.wait_state("default", id, "running", DEADLINE);
        placed.entry(sandbox["node"].as_str().unwrap().to_owned()).or_default().push(id.clone());
        assert_eq!(api.exec("default", id, "true", &[])["exit_code"], 0);
    }
    assert_eq!(placed.len(), 2, "placement used only {placed:?}");

    // node-1 dies without a word; within 15 s its sandboxes are lost.
    let lost = placed["node-1"].clone();
    let mut node = cluster.nodes[1].take().unwrap();
    node.kill();
    let killed_at = Instant::now();
    for id in &lost {
        let sandbox = api.wait_state("default", id, "failed", Duration::from_secs(25));
        assert_eq!(sandbox["reason"], "node_lost");
    }
    assert!(killed_at.elapsed() < Duration::from_secs(20), "took {:?}", killed_at.elapsed());
    for id in &placed["node-0"] {
        assert_eq!(api.sandbox("default", id)["state"], "running");
    }

    // A new sandbox goes to the node that is left.
    let id = api.create("default", json!({}));
    assert_eq!(api.wait_state("default", &id, "running", DEADLINE)["node"], "node-0");
}

/// How many sandboxes a node's record journal still holds: the ids whose
/// newest line is a save, not a removal.
fn live_records(journal: &std::path::Path) -> usize {
    let text = std::fs::read_to_string(journal).unwrap_or_default();
    let mut live = std::collections::BTreeSet::new();
    for line in text.lines() {
        let Ok(line) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if let Some(id) = line["save"]["spec"]["id"].as_str() {
            live.insert(id.to_owned());
        } else if let Some(id) = line["remove"].as_str() {
            live.remove(id);
        }
    }
    live.len()
}
