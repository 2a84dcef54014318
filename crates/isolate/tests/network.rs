//! Egress `internet` through hutch-net: an address the host can reach, and nothing
//! else. Runs as root; every test re-executes itself under `unshare --net`, so the
//! bridge, nft tables and sysctls live in a namespace that vanishes with it.

mod support;

use std::net::{Ipv4Addr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hutch_isolate::Egress;
use hutch_net::{NetConfig, NetManager};
use hutch_testkit::in_private_netns;
use support::TestEnv;

/// Python that connects to `host:port` and prints `connected` or the error name.
fn connect_probe(host: Ipv4Addr, port: u16) -> String {
    format!(
        "import socket, errno\ns = socket.socket(); s.settimeout(1)\ntry:\n    s.connect((\"{host}\", {port})); print(\"connected\")\nexcept OSError as e:\n    print(errno.errorcode.get(e.errno, \"timeout\"))"
    )
}

#[test]
fn internet_egress_gives_an_address_the_host_reaches_and_nothing_else() {
    in_private_netns(
        "internet_egress_gives_an_address_the_host_reaches_and_nothing_else",
        || async {
            let net_dir = tempfile::tempdir()?;
            let network = Arc::new(NetManager::new(NetConfig::new(net_dir.path())).await?);
            let gateway = network.gateway();
            let env = TestEnv::with_network("net", network.clone())?;
            let mut a = env.spec("a");
            a.egress = Egress::Internet;
            let mut b = env.spec("b");
            b.egress = Egress::Internet;
            let a_addr = env.driver.create(a).await?.address.expect("address of a");
            let b_addr = env.driver.create(b).await?.address.expect("address of b");
            assert_ne!(a_addr, b_addr);
            // Both were born in pooled namespaces, wired from the host all the same.
            assert_eq!(env.driver.netns_pool().map(|stats| stats.taken), Some(2));

            // A server inside a, on all its addresses.
            let server = "import socket\ns = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind((\"0.0.0.0\", 8080)); s.listen()\nwhile True:\n    c, _ = s.accept(); c.sendall(b\"hi\"); c.close()";
            let out = env.sh("a", &format!("python3 -c '{server}' >/dev/null 2>&1 &")).await?;
            assert!(out.ok(), "{out:?}");

            // The host (the proxy's side) reaches it on its address.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(mut stream) = std::net::TcpStream::connect((a_addr, 8080)) {
                    let mut text = String::new();
                    std::io::Read::read_to_string(&mut stream, &mut text)?;
                    assert_eq!(text, "hi");
                    break;
                }
                assert!(Instant::now() < deadline, "host cannot reach {a_addr}:8080");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }

            // Neither the host's own services nor the other sandbox are reachable.
            let host_service = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            let port = host_service.local_addr()?.port();
            for (from, to, to_port) in [("a", gateway, port), ("b", a_addr, 8080)] {
                let out = support::exec(
                    &env.socket(from),
                    "/usr/bin/python3",
                    &["-c", &connect_probe(to, to_port)],
                )
                .await?;
                assert_ne!(out.stdout.trim(), "connected", "{from} reached {to}:{to_port}");
                assert!(!out.stdout.trim().is_empty(), "{out:?}");
            }

            // Destroy removes the host ends of the veths.
            env.driver.destroy(&env.id("a")).await?;
            env.driver.destroy(&env.id("b")).await?;
            // Network removal finishes in the background after destroy.
            network.settle().await;
            let veths: Vec<String> = std::fs::read_dir("/sys/class/net")?
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(hutch_net::VETH_PREFIX))
                .collect();
            assert!(veths.is_empty(), "{veths:?}");
            Ok(())
        },
    );
}
