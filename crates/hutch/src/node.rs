//! `hutch node ...`: the server's `/v1/nodes` routes (admin).

use serde_json::Value;

use crate::args::{ConnectionArgs, NodeArgs, NodeCommand};
use crate::client::{Client, encode_segment};
use crate::config::Connection;
use crate::sandbox::{table, text};

pub async fn node(connection: &ConnectionArgs, args: NodeArgs) -> anyhow::Result<()> {
    let client = Client::new(Connection::resolve(connection)?)?;
    match args.command {
        NodeCommand::Ls => {
            let nodes = client.get_json("/nodes").await?;
            print!("{}", node_table(&nodes));
        }
        NodeCommand::Get { id } => {
            let node = client.get_json(&format!("/nodes/{}", encode_segment(&id))).await?;
            println!("{}", serde_json::to_string_pretty(&node)?);
        }
    }
    Ok(())
}

/// One row per node: what is allocated of what it offers.
fn node_table(nodes: &Value) -> String {
    let rows: Vec<Vec<String>> = nodes
        .as_array()
        .into_iter()
        .flatten()
        .map(|node| {
            let (allocated, capacity) = (&node["allocated"], &node["capacity"]);
            vec![
                text(&node["id"]),
                text(&node["state"]),
                format!("{}/{}", cpus(&allocated["cpus"]), cpus(&capacity["cpus"])),
                format!("{}/{}", mib(&allocated["memory_mb"]), mib(&capacity["memory_mb"])),
                text(&node["sandboxes"]),
            ]
        })
        .collect();
    table(&["ID", "STATE", "CPUS", "MEMORY", "SANDBOXES"], &rows)
}

/// `0.6`, `4`: no trailing zeros.
fn cpus(value: &Value) -> String {
    match value.as_f64() {
        Some(cpus) => {
            let text = format!("{cpus:.3}");
            text.trim_end_matches('0').trim_end_matches('.').to_owned()
        }
        None => "-".to_owned(),
    }
}

/// MiB as `512M`, `1.5G`, `4G`.
fn mib(value: &Value) -> String {
    match value.as_u64() {
        Some(mb) if mb >= 1024 => {
            let text = format!("{:.1}", mb as f64 / 1024.0);
            format!("{}G", text.trim_end_matches(".0"))
        }
        Some(mb) => format!("{mb}M"),
        None => "-".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nodes_print_allocated_over_capacity() {
        let nodes = json!([{
            "id": "node-1", "state": "ready", "proxy_url": "http://127.0.0.1:8095",
            "capacity": {"cpus": 4.0, "memory_mb": 4096, "disk_mb": 100},
            "allocated": {"cpus": 0.6, "memory_mb": 1536, "disk_mb": 10},
            "sandboxes": 2, "last_seen_at": "2026-01-01T00:00:00.000Z"
        }, {
            "id": "n2", "state": "unregistered", "proxy_url": null,
            "capacity": {"cpus": 0.0, "memory_mb": 0, "disk_mb": 0},
            "allocated": {"cpus": 1.0, "memory_mb": 512, "disk_mb": 0},
            "sandboxes": 1, "last_seen_at": null
        }]);
        assert_eq!(
            node_table(&nodes),
            "ID      STATE         CPUS   MEMORY   SANDBOXES\n\
             node-1  ready         0.6/4  1.5G/4G  2\n\
             n2      unregistered  1/0    512M/0M  1\n"
        );
    }
}
