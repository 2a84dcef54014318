//! Sandbox networking against the real kernel: bridge, veths, nftables, NAT.
//!
//! Each test runs in its own network namespace (see `support`), as root.

mod support;

use std::collections::{BTreeSet, HashSet};
use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{Result, ensure};
use hutch_net::{Egress, NetConfig, NetManager, NetSweepReport, veth_name};
use support::*;

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

fn links(names: &[(&str, bool)]) -> BTreeSet<(String, bool)> {
    names.iter().map(|(n, up)| ((*n).to_owned(), *up)).collect()
}

#[test]
fn egress_none_brings_up_loopback_and_nothing_else() {
    in_private_netns("egress_none_brings_up_loopback_and_nothing_else", || async {
        let state = tempfile::tempdir()?;
        let manager = manager(&state).await?;
        let sandbox = Netns::new()?;
        ensure!(links_in(&sandbox)? == links(&[("lo", false)]));

        let net = manager.attach("sb-none", &sandbox.path(), Egress::None).await?;

        ensure!(net.address.is_none() && net.gateway.is_none());
        ensure!(links_in(&sandbox)? == links(&[("lo", true)]));
        let server = serve_peer_address(Some(&sandbox), addr(Ipv4Addr::LOCALHOST, 0))?;
        ensure!(probe(Some(&sandbox), server)? == "127.0.0.1");
        ensure!(lease_files(&state)?.is_empty());
        ensure!(sandbox_nft_comments()?.is_empty());
        manager.detach("sb-none").await?;
        Ok(())
    });
}

#[test]
fn egress_internet_reaches_the_outside_through_nat() {
    in_private_netns("egress_internet_reaches_the_outside_through_nat", || async {
        let state = tempfile::tempdir()?;
        let manager = manager(&state).await?;
        let outside = outside_network().await?;
        let server = serve_peer_address(Some(&outside), addr(OUTSIDE, 0))?;
        let sandbox = Netns::new()?;

        let net = manager.attach("sb-1", &sandbox.path(), Egress::Internet).await?;

        let address = net.address.expect("an address");
        ensure!(net.gateway == Some(Ipv4Addr::new(10, 89, 0, 1)));
        ensure!(manager.config().subnet.contains(address) && address != manager.gateway());
        ensure!(links_in(&sandbox)? == links(&[("lo", true), ("eth0", true)]));
        // The outside sees the host's uplink address, not the sandbox's.
        ensure!(probe(Some(&sandbox), server)? == HOST_UPLINK.to_string());
        ensure!(lease_files(&state)? == ["sb-1"]);
        ensure!(sandbox_nft_comments()?.iter().all(|c| c == "hutch:sb-1"));
        ensure!(sandbox_nft_comments()?.len() == 2);
        Ok(())
    });
}

#[test]
fn the_host_reaches_a_sandbox_listener_at_its_address() {
    in_private_netns("the_host_reaches_a_sandbox_listener_at_its_address", || async {
        let state = tempfile::tempdir()?;
        let manager = manager(&state).await?;
        let sandbox = Netns::new()?;
        let net = manager.attach("sb-1", &sandbox.path(), Egress::Internet).await?;
        let address = net.address.expect("an address");
        let server = serve_peer_address(Some(&sandbox), addr(Ipv4Addr::UNSPECIFIED, 0))?;

        let seen = probe(None, addr(address, server.port()))?;

        ensure!(seen == manager.gateway().to_string(), "sandbox saw {seen}");
        Ok(())
    });
}

#[test]
fn sandboxes_cannot_reach_each_other() {
    in_private_netns("sandboxes_cannot_reach_each_other", || async {
        let state = tempfile::tempdir()?;
        let manager = manager(&state).await?;
        let a = Netns::new()?;
        let b = Netns::new()?;
        let a_addr = manager.attach("sb-a", &a.path(), Egress::Internet).await?.address.expect("a");
        let b_addr = manager.attach("sb-b", &b.path(), Egress::Internet).await?.address.expect("b");
        let outside = outside_network().await?;
        let internet = serve_peer_address(Some(&outside), addr(OUTSIDE, 0))?;
        let a_server = serve_peer_address(Some(&a), addr(Ipv4Addr::UNSPECIFIED, 0))?;
        let b_server = serve_peer_address(Some(&b), addr(Ipv4Addr::UNSPECIFIED, 0))?;
        // Both listeners are there: the host reaches them.
        probe(None, addr(a_addr, a_server.port()))?;
        probe(None, addr(b_addr, b_server.port()))?;
        // Both sandboxes' links work: they reach the internet.
        probe(Some(&a), internet)?;
        probe(Some(&b), internet)?;

        // With br_netfilter loaded (as here, and wherever Docker runs), bridged
        // frames also pass the inet forward hook; check the bridge alone too.
        for call_iptables in ["1", "0"] {
            set_bridge_nf_call_iptables(call_iptables)?;
            ensure!(probe_once(Some(&a), addr(b_addr, b_server.port())).is_err());
            ensure!(probe_once(Some(&b), addr(a_addr, a_server.port())).is_err());
        }
        Ok(())
    });
}

#[test]
fn a_sandbox_cannot_reach_any_host_address() {
    in_private_netns("a_sandbox_cannot_reach_any_host_address", || async {
        let state = tempfile::tempdir()?;
        let manager = manager(&state).await?;
        let outside = outside_network().await?;
        let internet = serve_peer_address(Some(&outside), addr(OUTSIDE, 0))?;
        let host_server = serve_peer_address(None, addr(Ipv4Addr::UNSPECIFIED, 0))?;
        let port = host_server.port();
        let sandbox = Netns::new()?;
        manager.attach("sb-1", &sandbox.path(), Egress::Internet).await?;
        // The host service answers on every host address.
        probe(None, addr(Ipv4Addr::LOCALHOST, port))?;
        probe(None, addr(manager.gateway(), port))?;
        probe(Some(&outside), addr(HOST_UPLINK, port))?;

        // The sandbox's link works: it reaches the internet.
        probe(Some(&sandbox), internet)?;

        ensure!(probe_once(Some(&sandbox), addr(manager.gateway(), port)).is_err());
        ensure!(probe_once(Some(&sandbox), addr(HOST_UPLINK, port)).is_err());
        // 127.0.0.1 inside the sandbox is the sandbox's own loopback.
        ensure!(probe_once(Some(&sandbox), addr(Ipv4Addr::LOCALHOST, port)).is_err());
        Ok(())
    });
}

#[test]
fn a_sandbox_cannot_reach_the_metadata_address() {
    in_private_netns("a_sandbox_cannot_reach_the_metadata_address", || async {
        let state = tempfile::tempdir()?;
        let manager = manager(&state).await?;
        let outside = outside_network().await?;
        let metadata = serve_peer_address(Some(&outside), addr(METADATA, 0))?;
        let internet = serve_peer_address(Some(&outside), addr(OUTSIDE, 0))?;
        let sandbox = Netns::new()?;
        manager.attach("sb-1", &sandbox.path(), Egress::Internet).await?;
        // The metadata server is routed and answering: the host reaches it.
        probe(None, metadata)?;
        probe(Some(&sandbox), internet)?;

        ensure!(probe_once(Some(&sandbox), metadata).is_err());
        Ok(())
    });
}

#[test]
fn a_sandbox_cannot_send_from_an_address_it_was_not_given() {
    in_private_netns("a_sandbox_cannot_send_from_an_address_it_was_not_given", || async {
        let state = tempfile::tempdir()?;
        let manager = manager(&state).await?;
        let outside = outside_network().await?;
        let internet = serve_peer_address(Some(&outside), addr(OUTSIDE, 0))?;
        let sandbox = Netns::new()?;
        let own = manager
            .attach("sb-1", &sandbox.path(), Egress::Internet)
            .await?
            .address
            .expect("address");
        let spoofed = Ipv4Addr::new(10, 89, 200, 200);
        add_address_in(&sandbox, spoofed, 16)?;

        probe(Some(&sandbox), internet)?;
        ensure!(probe_from(&sandbox, own, internet)? == HOST_UPLINK.to_string());
        ensure!(probe_from(&sandbox, spoofed, internet).is_err());
        Ok(())
    });
}

#[test]
fn detach_and_sweep_leave_no_veth_rule_or_lease_behind() {
    in_private_netns("detach_and_sweep_leave_no_veth_rule_or_lease_behind", || async {
        let state = tempfile::tempdir()?;
        let manager = manager(&state).await?;
        let outside = outside_network().await?;
        let internet = serve_peer_address(Some(&outside), addr(OUTSIDE, 0))?;
        let host_links = links_here().await?;
        let sandboxes = [Netns::new()?, Netns::new()?, Netns::new()?];
        for (id, netns) in ["sb-a", "sb-b", "sb-c"].iter().zip(&sandboxes) {
            manager.attach(id, &netns.path(), Egress::Internet).await?;
        }

        manager.detach("sb-a").await?;
        manager.detach("sb-a").await?;
        manager.settle().await;
        ensure!(!sandbox_nft_comments()?.iter().any(|c| c == "hutch:sb-a"));
        ensure!(!links_here().await?.iter().any(|(name, _)| *name == veth_name("sb-a")));
        ensure!(lease_files(&state)? == ["sb-b", "sb-c"]);
        ensure!(links_in(&sandboxes[0])? == links(&[("lo", true)]));

        // A restarted manager keeps what running sandboxes have ...
        drop(manager);
        let manager = support::manager(&state).await?;
        ensure!(sandbox_nft_comments()?.len() == 4);
        ensure!(permanent_neighbours_here().await?.len() == 2);
        probe(Some(&sandboxes[1]), internet)?;
        // ... and its sweep removes what the dead ones left.
        let report = manager.sweep(&HashSet::from(["sb-b".to_owned()])).await?;
        ensure!(
            report
                == NetSweepReport {
                    veths_removed: vec![veth_name("sb-c")],
                    rules_removed: 2,
                    leases_released: vec!["sb-c".to_owned()],
                },
            "{report:?}"
        );
        probe(Some(&sandboxes[1]), internet)?;
        ensure!(probe_once(Some(&sandboxes[2]), internet).is_err());

        let report = manager.sweep(&HashSet::new()).await?;
        ensure!(report.veths_removed == [veth_name("sb-b")] && report.rules_removed == 2);
        ensure!(sandbox_nft_comments()?.is_empty());
        ensure!(lease_files(&state)?.is_empty());
        ensure!(permanent_neighbours_here().await?.is_empty());
        ensure!(links_here().await? == host_links);

        manager.teardown().await?;
        ensure!(nft_tables()?.is_empty(), "{:?}", nft_tables()?);
        ensure!(
            !links_here()
                .await?
                .iter()
                .any(|(name, _)| name == "hutch0" || name.starts_with("hb-"))
        );
        Ok(())
    });
}

#[test]
fn detach_returns_before_the_removal_and_a_new_attach_of_the_id_waits_for_it() {
    in_private_netns(
        "detach_returns_before_the_removal_and_a_new_attach_of_the_id_waits_for_it",
        || async {
            let state = tempfile::tempdir()?;
            let manager = manager(&state).await?;
            let outside = outside_network().await?;
            let internet = serve_peer_address(Some(&outside), addr(OUTSIDE, 0))?;
            let first = Netns::new()?;
            let address = manager.attach("sb-1", &first.path(), Egress::Internet).await?.address;

            manager.detach("sb-1").await?;
            // Whether or not the removal is still running, both attaches work
            // and get distinct addresses.
            let other = Netns::new()?;
            let other_address =
                manager.attach("sb-2", &other.path(), Egress::Internet).await?.address;
            let second = Netns::new()?;
            let again = manager.attach("sb-1", &second.path(), Egress::Internet).await?;

            ensure!(again.address.is_some() && again.address != other_address);
            ensure!(address.is_some());
            probe(Some(&second), internet)?;
            probe(Some(&other), internet)?;
            ensure!(sandbox_nft_comments()?.len() == 4);
            ensure!(lease_files(&state)? == ["sb-1", "sb-2"]);
            manager.detach("sb-1").await?;
            manager.detach("sb-2").await?;
            manager.settle().await;
            ensure!(sandbox_nft_comments()?.is_empty());
            ensure!(lease_files(&state)?.is_empty());
            ensure!(permanent_neighbours_here().await?.is_empty());
            Ok(())
        },
    )
}

#[test]
fn a_sandbox_whose_namespace_died_is_removed_completely() {
    in_private_netns("a_sandbox_whose_namespace_died_is_removed_completely", || async {
        let state = tempfile::tempdir()?;
        let manager = manager(&state).await?;
        let host_links = links_here().await?;
        let sandbox = Netns::new()?;
        manager.attach("sb-1", &sandbox.path(), Egress::Internet).await?;
        ensure!(links_here().await?.len() == host_links.len() + 1);

        // The last reference: the namespace dies, and the kernel deletes the
        // veth pair on its own.
        drop(sandbox);
        manager.detach("sb-1").await?;
        manager.settle().await;

        ensure!(links_here().await? == host_links);
        ensure!(sandbox_nft_comments()?.is_empty());
        ensure!(lease_files(&state)?.is_empty());
        ensure!(permanent_neighbours_here().await?.is_empty());
        Ok(())
    });
}

#[test]
fn attaching_again_keeps_the_address_and_replaces_the_rules() {
    in_private_netns("attaching_again_keeps_the_address_and_replaces_the_rules", || async {
        let state = tempfile::tempdir()?;
        let manager = manager(&state).await?;
        let outside = outside_network().await?;
        let internet = serve_peer_address(Some(&outside), addr(OUTSIDE, 0))?;
        let sandbox = Netns::new()?;
        let first = manager.attach("sb-1", &sandbox.path(), Egress::Internet).await?;

        let second = manager.attach("sb-1", &sandbox.path(), Egress::Internet).await?;

        ensure!(first == second);
        ensure!(sandbox_nft_comments()?.len() == 2);
        probe(Some(&sandbox), internet)?;
        Ok(())
    });
}

#[test]
fn two_hundred_attach_detach_cycles_leak_nothing() {
    in_private_netns("two_hundred_attach_detach_cycles_leak_nothing", || async {
        let state = tempfile::tempdir()?;
        let manager = manager(&state).await?;
        let outside = outside_network().await?;
        let internet = serve_peer_address(Some(&outside), addr(OUTSIDE, 0))?;
        let sandbox = Netns::new()?;
        // Warm up lazily created runtime resources before taking the baseline.
        manager.attach("warm-up", &sandbox.path(), Egress::Internet).await?;
        manager.detach("warm-up").await?;
        manager.settle().await;
        let host_links = links_here().await?;
        let fds = open_fds()?;

        for cycle in 0..200 {
            for egress in [Egress::Internet, Egress::None] {
                let id = format!("cycle-{cycle}-{egress:?}");
                manager.attach(&id, &sandbox.path(), egress).await?;
                manager.detach(&id).await?;
                // The next cycle reuses the namespace, and so the name eth0.
                manager.settle().await;
            }
        }

        ensure!(links_here().await? == host_links);
        ensure!(permanent_neighbours_here().await?.is_empty());
        ensure!(links_in(&sandbox)? == links(&[("lo", true)]));
        ensure!(sandbox_nft_comments()?.is_empty());
        ensure!(lease_files(&state)?.is_empty());
        // Descriptors of finished work (an nft pipe, a netlink socket) close
        // asynchronously; a leak would be 200 of them.
        let settled = eventually(|| Ok(open_fds()? <= fds)).await?;
        ensure!(settled, "fds went from {fds} to {}", open_fds()?);
        // The machinery still works after the cycles.
        manager.attach("after", &sandbox.path(), Egress::Internet).await?;
        probe(Some(&sandbox), internet)?;
        Ok(())
    });
}

#[test]
fn a_custom_bridge_subnet_and_table_are_honoured() {
    in_private_netns("a_custom_bridge_subnet_and_table_are_honoured", || async {
        let state = tempfile::tempdir()?;
        let mut config = NetConfig::new(state.path().join("leases"));
        config.bridge = "test-br".to_owned();
        config.subnet = "172.31.7.0/24".parse()?;
        config.nft_table = "custom".to_owned();
        let manager = NetManager::new(config).await?;
        let sandbox = Netns::new()?;

        let net = manager.attach("sb-1", &sandbox.path(), Egress::Internet).await?;

        ensure!(net.address == Some(Ipv4Addr::new(172, 31, 7, 2)));
        ensure!(net.gateway == Some(Ipv4Addr::new(172, 31, 7, 1)));
        let mut tables = nft_tables()?;
        tables.sort();
        ensure!(tables == ["bridge custom", "inet custom"], "{tables:?}");
        let server = serve_peer_address(Some(&sandbox), addr(Ipv4Addr::UNSPECIFIED, 0))?;
        ensure!(probe(None, addr(Ipv4Addr::new(172, 31, 7, 2), server.port()))? == "172.31.7.1");
        Ok(())
    });
}

#[test]
fn a_reused_address_is_reachable_at_once() {
    in_private_netns("a_reused_address_is_reachable_at_once", || async {
        let state = tempfile::tempdir()?;
        let manager = manager(&state).await?;
        let outside = outside_network().await?;
        let internet = serve_peer_address(Some(&outside), addr(OUTSIDE, 0))?;
        let first = Netns::new()?;
        let address = manager.attach("sb-1", &first.path(), Egress::Internet).await?.address;
        let server = serve_peer_address(Some(&first), addr(Ipv4Addr::UNSPECIFIED, 0))?;
        let address = address.expect("an address");
        // The host now has a neighbour entry for the address.
        probe(None, addr(address, server.port()))?;
        probe(Some(&first), internet)?;
        manager.detach("sb-1").await?;
        manager.settle().await;

        let second = Netns::new()?;
        let reused = manager.attach("sb-2", &second.path(), Egress::Internet).await?.address;
        ensure!(reused == Some(address));
        let server = serve_peer_address(Some(&second), addr(Ipv4Addr::UNSPECIFIED, server.port()))?;

        probe(None, addr(address, server.port()))?;
        probe(Some(&second), internet)?;
        Ok(())
    });
}

#[test]
fn detach_removes_what_is_left_when_the_sets_changed_underneath() {
    in_private_netns("detach_removes_what_is_left_when_the_sets_changed_underneath", || async {
        let state = tempfile::tempdir()?;
        let manager = manager(&state).await?;
        let sandbox = Netns::new()?;
        let address = manager
            .attach("sb-1", &sandbox.path(), Egress::Internet)
            .await?
            .address
            .expect("address");
        nft(&["delete", "element", "inet", "hutch", "sandbox_addrs", &format!("{{ {address} }}")])?;
        ensure!(sandbox_nft_comments()? == ["hutch:sb-1"]);

        manager.detach("sb-1").await?;
        manager.settle().await;

        ensure!(sandbox_nft_comments()?.is_empty());
        ensure!(lease_files(&state)?.is_empty());
        Ok(())
    });
}

#[test]
fn concurrent_attaches_get_distinct_working_addresses() {
    in_private_netns("concurrent_attaches_get_distinct_working_addresses", || async {
        let state = tempfile::tempdir()?;
        let manager = manager(&state).await?;
        let outside = outside_network().await?;
        let internet = serve_peer_address(Some(&outside), addr(OUTSIDE, 0))?;
        let sandboxes = (0..8).map(|_| Netns::new()).collect::<Result<Vec<_>>>()?;
        let ids: Vec<String> = (0..8).map(|i| format!("sb-{i}")).collect();

        let paths: Vec<_> = sandboxes.iter().map(Netns::path).collect();

        let attached = futures_util::future::join_all(
            ids.iter().zip(&paths).map(|(id, path)| manager.attach(id, path, Egress::Internet)),
        )
        .await;

        let mut addresses = HashSet::new();
        for net in attached {
            ensure!(addresses.insert(net?.address.expect("an address")));
        }
        for netns in &sandboxes {
            ensure!(probe(Some(netns), internet)? == HOST_UPLINK.to_string());
        }
        ensure!(sandbox_nft_comments()?.len() == 8 * 2);
        futures_util::future::join_all(ids.iter().map(|id| manager.detach(id)))
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        manager.settle().await;
        ensure!(sandbox_nft_comments()?.is_empty());
        ensure!(lease_files(&state)?.is_empty());
        Ok(())
    });
}

#[test]
fn a_sandbox_is_reachable_from_the_host_as_soon_as_attach_returns() {
    in_private_netns("a_sandbox_is_reachable_from_the_host_as_soon_as_attach_returns", || async {
        let state = tempfile::tempdir()?;
        let manager = manager(&state).await?;
        let sandbox = Netns::new()?;
        let server = serve_peer_address(Some(&sandbox), addr(Ipv4Addr::UNSPECIFIED, 0))?;
        for cycle in 0..20 {
            let id = format!("sb-{cycle}");
            let address = manager
                .attach(&id, &sandbox.path(), Egress::Internet)
                .await?
                .address
                .expect("an address");
            let target = addr(address, server.port());
            let started = std::time::Instant::now();
            let reachable = eventually(|| {
                Ok(std::net::TcpStream::connect_timeout(
                    &target,
                    std::time::Duration::from_millis(50),
                )
                .is_ok())
            })
            .await?;

            // A lost first ARP request would cost a one-second retry.
            ensure!(reachable);
            ensure!(
                started.elapsed() < std::time::Duration::from_millis(500),
                "cycle {cycle}: reachable after {:?}",
                started.elapsed()
            );
            manager.detach(&id).await?;
            manager.settle().await;
        }
        Ok(())
    });
}

#[test]
fn only_the_host_can_open_connections_to_a_sandbox() {
    in_private_netns("only_the_host_can_open_connections_to_a_sandbox", || async {
        let state = tempfile::tempdir()?;
        let manager = manager(&state).await?;
        let outside = outside_network().await?;
        let sandbox = Netns::new()?;
        let address = manager
            .attach("sb-1", &sandbox.path(), Egress::Internet)
            .await?
            .address
            .expect("address");
        let server = serve_peer_address(Some(&sandbox), addr(Ipv4Addr::UNSPECIFIED, 0))?;
        // Give the outside a route to the sandbox subnet through the host.
        outside.block_on(|| async {
            let (connection, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(connection);
            let route = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::new(10, 89, 0, 0), 16)
                .gateway(HOST_UPLINK)
                .build();
            handle.route().add(route).execute().await?;
            anyhow::Ok(())
        })?;
        probe(None, addr(address, server.port()))?;

        ensure!(probe_once(Some(&outside), addr(address, server.port())).is_err());
        Ok(())
    });
}

#[test]
fn a_networked_sandbox_has_no_ipv6_on_its_link() {
    in_private_netns("a_networked_sandbox_has_no_ipv6_on_its_link", || async {
        let state = tempfile::tempdir()?;
        let manager = manager(&state).await?;
        let sandbox = Netns::new()?;
        manager.attach("sb-1", &sandbox.path(), Egress::Internet).await?;

        let disabled = sandbox.run(|| {
            std::fs::read_to_string("/proc/sys/net/ipv6/conf/eth0/disable_ipv6")
                .map(|value| value.trim() == "1")
                .unwrap_or(true)
        });

        ensure!(disabled);
        Ok(())
    });
}

#[test]
fn per_sandbox_state_is_set_elements_and_the_rules_stay_static() {
    in_private_netns("per_sandbox_state_is_set_elements_and_the_rules_stay_static", || async {
        let state = tempfile::tempdir()?;
        let manager = manager(&state).await?;
        let rules = nft_rule_count()?;
        let sandboxes = [Netns::new()?, Netns::new()?, Netns::new()?];

        for (id, netns) in ["sb-a", "sb-b", "sb-c"].iter().zip(&sandboxes) {
            manager.attach(id, &netns.path(), Egress::Internet).await?;
        }

        ensure!(nft_rule_count()? == rules);
        let mut comments = sandbox_nft_comments()?;
        comments.sort();
        ensure!(
            comments
                == [
                    "hutch:sb-a",
                    "hutch:sb-a",
                    "hutch:sb-b",
                    "hutch:sb-b",
                    "hutch:sb-c",
                    "hutch:sb-c"
                ],
            "{comments:?}"
        );
        manager.detach("sb-b").await?;
        manager.settle().await;
        let mut comments = sandbox_nft_comments()?;
        comments.sort();
        ensure!(comments == ["hutch:sb-a", "hutch:sb-a", "hutch:sb-c", "hutch:sb-c"]);
        ensure!(nft_rule_count()? == rules);
        Ok(())
    });
}

#[test]
fn attach_and_detach_run_no_nft_process() {
    in_private_netns("attach_and_detach_run_no_nft_process", || async {
        let state = tempfile::tempdir()?;
        let tools = tempfile::tempdir()?;
        let nft_path = String::from_utf8(
            std::process::Command::new("sh").args(["-c", "command -v nft"]).output()?.stdout,
        )?;
        let nft_link = tools.path().join("nft");
        std::os::unix::fs::symlink(nft_path.trim(), &nft_link)?;
        let mut config = NetConfig::new(state.path().join("leases"));
        config.nft_binary = nft_link.clone();
        let manager = NetManager::new(config).await?;
        let outside = outside_network().await?;
        let internet = serve_peer_address(Some(&outside), addr(OUTSIDE, 0))?;
        std::fs::remove_file(&nft_link)?;
        let sandbox = Netns::new()?;

        manager.attach("sb-1", &sandbox.path(), Egress::Internet).await?;
        ensure!(probe(Some(&sandbox), internet)? == HOST_UPLINK.to_string());
        manager.detach("sb-1").await?;
        manager.settle().await;

        ensure!(links_in(&sandbox)? == links(&[("lo", true)]));
        ensure!(sandbox_nft_comments()?.is_empty() && lease_files(&state)?.is_empty());
        Ok(())
    });
}

#[test]
fn a_restarted_manager_restores_the_set_elements_of_leased_sandboxes() {
    in_private_netns(
        "a_restarted_manager_restores_the_set_elements_of_leased_sandboxes",
        || async {
            let state = tempfile::tempdir()?;
            let manager = manager(&state).await?;
            let outside = outside_network().await?;
            let internet = serve_peer_address(Some(&outside), addr(OUTSIDE, 0))?;
            let sandbox = Netns::new()?;
            manager.attach("sb-1", &sandbox.path(), Egress::Internet).await?;
            probe(Some(&sandbox), internet)?;
            // The sets lose their elements (as a first-version manager's
            // sandboxes never had any): the sandbox loses its network ...
            nft(&["flush", "set", "bridge", "hutch", "sandbox_ports"])?;
            nft(&["flush", "set", "inet", "hutch", "sandbox_addrs"])?;
            ensure!(probe_once(Some(&sandbox), internet).is_err());

            drop(manager);
            let _manager = support::manager(&state).await?;

            // ... and gets it back from the restarted manager, from its lease.
            ensure!(probe(Some(&sandbox), internet)? == HOST_UPLINK.to_string());
            ensure!(sandbox_nft_comments()? == ["hutch:sb-1", "hutch:sb-1"]);
            Ok(())
        },
    );
}

#[test]
fn a_manager_replaces_the_per_sandbox_chains_of_the_first_version() {
    in_private_netns("a_manager_replaces_the_per_sandbox_chains_of_the_first_version", || async {
        let state = tempfile::tempdir()?;
        let manager = manager(&state).await?;
        drop(manager);
        // What the first version left: regular chains with per-sandbox rules.
        nft(&["add", "chain", "bridge", "hutch", "ports"])?;
        nft(&[
            "add",
            "rule",
            "bridge",
            "hutch",
            "ports",
            "iifname",
            "hv-0",
            "accept",
            "comment",
            "\"hutch:old\"",
        ])?;
        nft(&["add", "chain", "inet", "hutch", "egress"])?;
        nft(&[
            "add",
            "rule",
            "inet",
            "hutch",
            "egress",
            "ip",
            "saddr",
            "10.89.0.9",
            "accept",
            "comment",
            "\"hutch:old\"",
        ])?;
        ensure!(sandbox_nft_comments()?.len() == 2);

        let manager = support::manager(&state).await?;

        ensure!(sandbox_nft_comments()?.is_empty());
        manager.teardown().await?;
        ensure!(nft_tables()?.is_empty());
        Ok(())
    });
}

#[test]
fn a_thousand_leases_are_restored_on_start_and_swept_without_veths() {
    in_private_netns("a_thousand_leases_are_restored_on_start_and_swept_without_veths", || async {
        let state = tempfile::tempdir()?;
        // What a crashed manager with a thousand sandboxes leaves: leases.
        let leases = state.path().join("leases");
        std::fs::create_dir_all(&leases)?;
        let ids: Vec<String> = (0..1000).map(|i| format!("sb-{i}")).collect();
        for (i, id) in (2u32..).zip(&ids) {
            let address = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 89, 0, 0)) + i);
            std::fs::write(leases.join(id), format!("{address}\n"))?;
        }

        let manager = manager(&state).await?;

        ensure!(sandbox_nft_comments()?.len() == 2 * ids.len());
        let live = HashSet::from([ids[0].clone()]);
        let report = manager.sweep(&live).await?;
        ensure!(report.rules_removed == 2 * (ids.len() - 1), "{}", report.rules_removed);
        ensure!(report.leases_released.len() == ids.len() - 1);
        ensure!(sandbox_nft_comments()? == ["hutch:sb-0", "hutch:sb-0"]);
        ensure!(lease_files(&state)? == ["sb-0"]);
        Ok(())
    });
}
