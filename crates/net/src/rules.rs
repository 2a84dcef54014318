//! nftables rule generation (pure) and the reading of listed rulesets.
//!
//! Two tables carry the policy, both named after `NetConfig::nft_table`. The
//! rules are static; what is per sandbox are elements of two sets, which
//! attach and detach add and delete over netlink (see `nfnl.rs`) in one
//! transaction, each with the comment `hutch:<sandbox id>`:
//!
//! * `bridge <table>` sees every frame a sandbox sends into the bridge. Its
//!   `prerouting` chain accepts IPv4 and ARP from a sandbox port (`hv-*`) only
//!   when the pair (port name, source address) is in the set `sandbox_ports`,
//!   which holds one element per sandbox, and drops everything else from
//!   sandbox ports: IPv6, other ethertypes, and spoofed sources. This is what
//!   makes the source address in the `inet` table trustworthy.
//! * `inet <table>` sees routed traffic. `input` drops every new connection from
//!   the bridge to the host itself, whatever host address it targets; `forward`
//!   lets nothing in towards sandboxes but replies, drops the blocked ranges
//!   (link-local and metadata by default), then accepts traffic from the bridge
//!   whose source is in the set `sandbox_addrs` (one address per sandbox), and
//!   drops the rest. `postrouting` masquerades the subnet on its way out.
//!
//! Base chains are flushed and rewritten by `NetManager::new` in one
//! transaction; the sets and their elements survive a restart of the manager.

use std::borrow::Cow;
use std::net::Ipv4Addr;

use nftables::batch::Batch;
use nftables::expr::{
    CT, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix,
};
use nftables::schema::{
    Chain, FlushObject, NfCmd, NfListObject, Nftables, Rule, Set, SetType, SetTypeValue, Table,
};
use nftables::stmt::{Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use crate::ipnet::Ipv4Net;
use crate::naming::{VETH_PREFIX, rule_comment, sandbox_id_from_comment};
use crate::nfnl::{Family, SetElement};

const INPUT: &str = "input";
const FORWARD: &str = "forward";
/// Regular chains of the first version, which held one rule per sandbox.
const LEGACY_CHAINS: [(NfFamily, &str); 2] =
    [(NfFamily::Bridge, "ports"), (NfFamily::INet, "egress")];
const POSTROUTING: &str = "postrouting";
const PREROUTING: &str = "prerouting";
/// The bridge table's set of `port name . address` pairs sandboxes may send from.
pub(crate) const PORTS_SET: &str = "sandbox_ports";
/// The inet table's set of sandbox addresses that may leave through `forward`.
pub(crate) const ADDRESSES_SET: &str = "sandbox_addrs";
/// The inet table's set of single addresses no sandbox may reach (the server's
/// and the nodes', which may be public), beside the blocked prefixes.
pub(crate) const BLOCKED_SET: &str = "blocked_addrs";
/// Bytes of an interface name in a set key (`IFNAMSIZ`).
const IFNAME_KEY_LEN: usize = 16;

/// Standard hook priorities (`filter`, `srcnat`, and the bridge family's `filter`).
const PRIORITY_FILTER: i32 = 0;
const PRIORITY_SRCNAT: i32 = 100;
const PRIORITY_BRIDGE_FILTER: i32 = -200;

/// What the generated rules are about.
#[derive(Debug, Clone)]
pub(crate) struct Policy<'a> {
    pub table: &'a str,
    pub bridge: &'a str,
    pub subnet: Ipv4Net,
    pub blocked_destinations: &'a [Ipv4Net],
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: protocol.into(),
        field: field.into(),
    })))
}

fn string(value: impl Into<String>) -> Expression<'static> {
    Expression::String(Cow::Owned(value.into()))
}

fn prefix(net: Ipv4Net) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(string(net.network().to_string())),
        len: u32::from(net.prefix_len()),
    }))
}

fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    matches(left, Operator::EQ, right)
}

fn ct_state_reply() -> Statement<'static> {
    matches(
        Expression::Named(NamedExpression::CT(CT { key: "state".into(), family: None, dir: None })),
        Operator::IN,
        Expression::List(vec![string("established"), string("related")]),
    )
}

fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

fn drop() -> Statement<'static> {
    Statement::Drop(None)
}

fn table(family: NfFamily, name: &str) -> Table<'static> {
    Table { family, name: name.to_owned().into(), handle: None }
}

fn regular_chain(family: NfFamily, table: &str, name: &str) -> Chain<'static> {
    Chain {
        family,
        table: table.to_owned().into(),
        name: name.to_owned().into(),
        ..Chain::default()
    }
}

fn base_chain(
    family: NfFamily,
    table: &str,
    name: &str,
    chain_type: NfChainType,
    hook: NfHook,
    priority: i32,
) -> Chain<'static> {
    Chain {
        _type: Some(chain_type),
        hook: Some(hook),
        prio: Some(priority),
        // Accept: traffic that is not ours is left to the host's other tables.
        policy: Some(NfChainPolicy::Accept),
        ..regular_chain(family, table, name)
    }
}

fn rule(
    family: NfFamily,
    table: &str,
    chain: &str,
    expr: Vec<Statement<'static>>,
    comment: Option<String>,
) -> Rule<'static> {
    Rule {
        family,
        table: table.to_owned().into(),
        chain: chain.to_owned().into(),
        expr: expr.into(),
        handle: None,
        index: None,
        comment: comment.map(Into::into),
    }
}

fn set(family: NfFamily, table: &str, name: &str, set_type: SetTypeValue<'static>) -> Set<'static> {
    Set {
        family,
        table: table.to_owned().into(),
        name: name.to_owned().into(),
        set_type,
        ..Set::default()
    }
}

fn set_reference(name: &str) -> Expression<'static> {
    string(format!("@{name}"))
}

/// The whole static policy: tables, chains and sets are added (a no-op when
/// they exist), base chains are flushed and refilled, set elements are kept.
/// The per-sandbox chains of the first version are removed.
pub(crate) fn base_ruleset(policy: &Policy<'_>) -> Nftables<'static> {
    let t = policy.table;
    let bridge = || string(policy.bridge);
    let ports = || string(format!("{VETH_PREFIX}*"));
    let mut batch = Batch::new();

    batch.add(NfListObject::Table(table(NfFamily::Bridge, t)));
    let prerouting = base_chain(
        NfFamily::Bridge,
        t,
        PREROUTING,
        NfChainType::Filter,
        NfHook::Prerouting,
        PRIORITY_BRIDGE_FILTER,
    );
    batch.add(NfListObject::Chain(prerouting.clone()));
    batch.add(NfListObject::Set(Box::new(set(
        NfFamily::Bridge,
        t,
        PORTS_SET,
        SetTypeValue::Concatenated(vec![SetType::Ifname, SetType::Ipv4Addr].into()),
    ))));
    batch.add_cmd(NfCmd::Flush(FlushObject::Chain(prerouting)));
    let port_and_source = |protocol: &'static str, field: &'static str| {
        Expression::Named(NamedExpression::Concat(vec![
            meta(MetaKey::Iifname),
            payload(protocol, field),
        ]))
    };
    let bridge_rules = [
        vec![
            eq(meta(MetaKey::Iifname), ports()),
            eq(port_and_source("ip", "saddr"), set_reference(PORTS_SET)),
            accept(),
        ],
        vec![
            eq(meta(MetaKey::Iifname), ports()),
            eq(port_and_source("arp", "saddr ip"), set_reference(PORTS_SET)),
            accept(),
        ],
        vec![eq(meta(MetaKey::Iifname), ports()), drop()],
    ];

    batch.add(NfListObject::Table(table(NfFamily::INet, t)));
    let input =
        base_chain(NfFamily::INet, t, INPUT, NfChainType::Filter, NfHook::Input, PRIORITY_FILTER);
    let forward = base_chain(
        NfFamily::INet,
        t,
        FORWARD,
        NfChainType::Filter,
        NfHook::Forward,
        PRIORITY_FILTER,
    );
    let postrouting = base_chain(
        NfFamily::INet,
        t,
        POSTROUTING,
        NfChainType::NAT,
        NfHook::Postrouting,
        PRIORITY_SRCNAT,
    );
    for chain in [&input, &forward, &postrouting] {
        batch.add(NfListObject::Chain(chain.clone()));
    }
    batch.add(NfListObject::Set(Box::new(set(
        NfFamily::INet,
        t,
        ADDRESSES_SET,
        SetTypeValue::Single(SetType::Ipv4Addr),
    ))));
    let blocked_set = set(NfFamily::INet, t, BLOCKED_SET, SetTypeValue::Single(SetType::Ipv4Addr));
    batch.add(NfListObject::Set(Box::new(blocked_set.clone())));
    // Refilled by NetManager::block_addresses after every start.
    batch.add_cmd(NfCmd::Flush(FlushObject::Set(Box::new(blocked_set))));
    for chain in [input, forward, postrouting] {
        batch.add_cmd(NfCmd::Flush(FlushObject::Chain(chain)));
    }
    // The base chains no longer jump to them (flushed above, in the same
    // transaction), so they can go; adding them first makes this work whether
    // or not they exist.
    for (family, name) in LEGACY_CHAINS {
        let chain = regular_chain(family, t, name);
        batch.add(NfListObject::Chain(chain.clone()));
        batch.add_cmd(NfCmd::Flush(FlushObject::Chain(chain.clone())));
        batch.delete(NfListObject::Chain(chain));
    }

    for expr in bridge_rules {
        batch.add(NfListObject::Rule(rule(NfFamily::Bridge, t, PREROUTING, expr, None)));
    }

    let iif_bridge = || eq(meta(MetaKey::Iifname), bridge());
    let oif_bridge = || eq(meta(MetaKey::Oifname), bridge());
    let input_rules = [vec![iif_bridge(), ct_state_reply(), accept()], vec![iif_bridge(), drop()]];
    for expr in input_rules {
        batch.add(NfListObject::Rule(rule(NfFamily::INet, t, INPUT, expr, None)));
    }

    let mut forward_rules = vec![
        vec![oif_bridge(), ct_state_reply(), accept()],
        // Nothing may open a connection towards a sandbox through routing:
        // neither the outside nor another sandbox hairpinning via the gateway.
        vec![oif_bridge(), drop()],
    ];
    for blocked in policy.blocked_destinations {
        forward_rules.push(vec![
            iif_bridge(),
            eq(payload("ip", "daddr"), prefix(*blocked)),
            drop(),
        ]);
    }
    forward_rules.push(vec![
        iif_bridge(),
        eq(payload("ip", "daddr"), set_reference(BLOCKED_SET)),
        drop(),
    ]);
    forward_rules.push(vec![
        iif_bridge(),
        eq(payload("ip", "saddr"), set_reference(ADDRESSES_SET)),
        accept(),
    ]);
    forward_rules.push(vec![iif_bridge(), drop()]);
    for expr in forward_rules {
        batch.add(NfListObject::Rule(rule(NfFamily::INet, t, FORWARD, expr, None)));
    }

    batch.add(NfListObject::Rule(rule(
        NfFamily::INet,
        t,
        POSTROUTING,
        vec![
            eq(payload("ip", "saddr"), prefix(policy.subnet)),
            matches(meta(MetaKey::Oifname), Operator::NEQ, bridge()),
            Statement::Masquerade(None),
        ],
        None,
    )));
    batch.to_nftables()
}

/// The key of a `sandbox_ports` element: the port name zero-padded to
/// `IFNAMSIZ` bytes, then the address (each part of a concatenation fills
/// whole 4-byte registers, and both parts already do).
fn port_key(veth: &str, address: Ipv4Addr) -> Vec<u8> {
    let mut key = vec![0u8; IFNAME_KEY_LEN];
    let name = &veth.as_bytes()[..veth.len().min(IFNAME_KEY_LEN - 1)];
    key[..name.len()].copy_from_slice(name);
    key.extend_from_slice(&address.octets());
    key
}

/// The set elements that let one sandbox's traffic through: its port may only
/// send its own address (IPv4 and ARP), and that address may leave through
/// `forward`.
pub(crate) fn sandbox_elements(
    table_name: &str,
    sandbox_id: &str,
    veth: &str,
    address: Ipv4Addr,
) -> [SetElement; 2] {
    let element = |family, set: &str, key| SetElement {
        family,
        table: table_name.to_owned(),
        set: set.to_owned(),
        key,
        comment: rule_comment(sandbox_id),
    };
    [
        element(Family::Bridge, PORTS_SET, port_key(veth, address)),
        element(Family::Inet, ADDRESSES_SET, address.octets().to_vec()),
    ]
}

/// Removes both tables. Adding a table first makes the deletion succeed whether
/// or not the table existed, so teardown is idempotent in one transaction.
pub(crate) fn delete_tables(table_name: &str) -> Nftables<'static> {
    let mut batch = Batch::new();
    for family in [NfFamily::Bridge, NfFamily::INet] {
        batch.add(NfListObject::Table(table(family, table_name)));
        batch.delete(NfListObject::Table(table(family, table_name)));
    }
    batch.to_nftables()
}

/// Per-sandbox set elements of our tables in the output of
/// `nft -j list ruleset`, with the sandbox id their comment names.
///
/// The listing is read as plain JSON rather than the typed schema because the
/// host's other tables may hold expressions the schema does not know.
pub(crate) fn sandbox_elements_in_listing(
    listing: &serde_json::Value,
    table_name: &str,
) -> Vec<(String, SetElement)> {
    let Some(objects) = listing.get("nftables").and_then(|v| v.as_array()) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for set in objects.iter().filter_map(|object| object.get("set")) {
        let family = match set.get("family").and_then(|v| v.as_str()) {
            Some("bridge") => Family::Bridge,
            Some("inet") => Family::Inet,
            _ => continue,
        };
        let name = set.get("name").and_then(|v| v.as_str());
        let ours = set.get("table").and_then(|v| v.as_str()) == Some(table_name)
            && matches!(
                (family, name),
                (Family::Bridge, Some(PORTS_SET)) | (Family::Inet, Some(ADDRESSES_SET))
            );
        if !ours {
            continue;
        }
        let elements = set.get("elem").and_then(|v| v.as_array()).map(Vec::as_slice).unwrap_or(&[]);
        for element in elements {
            let Some(element) = element.get("elem") else { continue };
            let Some(comment) = element.get("comment").and_then(|v| v.as_str()) else {
                continue;
            };
            let Some(sandbox_id) = sandbox_id_from_comment(comment) else { continue };
            let value = element.get("val");
            let key = match family {
                Family::Bridge => value
                    .and_then(|v| v.get("concat"))
                    .and_then(|v| v.as_array())
                    .and_then(|parts| match parts.as_slice() {
                        [veth, address] => {
                            let address = address.as_str()?.parse::<Ipv4Addr>().ok()?;
                            Some(port_key(veth.as_str()?, address))
                        }
                        _ => None,
                    }),
                Family::Inet => value
                    .and_then(|v| v.as_str())
                    .and_then(|address| address.parse::<Ipv4Addr>().ok())
                    .map(|address| address.octets().to_vec()),
            };
            let Some(key) = key else { continue };
            found.push((
                sandbox_id.to_owned(),
                SetElement {
                    family,
                    table: table_name.to_owned(),
                    set: name.unwrap_or_default().to_owned(),
                    key,
                    comment: comment.to_owned(),
                },
            ));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy() -> (Ipv4Net, Vec<Ipv4Net>) {
        ("10.89.0.0/16".parse().unwrap(), vec!["169.254.0.0/16".parse().unwrap()])
    }

    fn to_json(nftables: &Nftables<'_>) -> serde_json::Value {
        serde_json::to_value(nftables).unwrap()
    }

    #[test]
    fn base_ruleset_drops_new_connections_to_the_host_and_masquerades_the_subnet() {
        let (subnet, blocked) = policy();
        let json = to_json(&base_ruleset(&Policy {
            table: "hutch",
            bridge: "hutch0",
            subnet,
            blocked_destinations: &blocked,
        }));
        let text = json.to_string();
        // The input chain: replies accepted, everything else from the bridge dropped.
        assert!(text.contains(
            r#"{"rule":{"chain":"input","expr":[{"match":{"left":{"meta":{"key":"iifname"}},"op":"==","right":"hutch0"}},{"drop":null}],"family":"inet","table":"hutch"}}"#
        ), "{text}");
        assert!(text.contains(r#"{"prefix":{"addr":"169.254.0.0","len":16}}"#));
        assert!(text.contains(r#"{"masquerade":null}"#));
        assert!(text.contains(r#""right":"hv-*""#));
        assert!(text.contains(r#""right":"@sandbox_ports""#));
        assert!(text.contains(r#""right":"@sandbox_addrs""#));
        // Base chains are flushed, the sets are not; legacy chains are removed.
        let flushed: Vec<_> = json["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o.get("flush")?.get("chain"))
            .map(|chain| chain["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(flushed, ["prerouting", "input", "forward", "postrouting", "ports", "egress"]);
        let flushed_sets: Vec<_> = json["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o.get("flush")?.get("set"))
            .map(|set| set["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(flushed_sets, ["blocked_addrs"]);
        assert!(text.contains(r#""right":"@blocked_addrs""#));
        let deleted: Vec<_> = json["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o.get("delete"))
            .map(|d| d["chain"]["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(deleted, ["ports", "egress"]);
    }

    #[test]
    fn sandbox_elements_carry_the_sandbox_id_and_its_address() {
        let [port, egress] =
            sandbox_elements("hutch", "sb-1", "hv-0123456789ab", Ipv4Addr::new(10, 89, 0, 2));
        assert_eq!(port.set, PORTS_SET);
        assert_eq!(port.family, Family::Bridge);
        assert_eq!(&port.key[..16], b"hv-0123456789ab\0");
        assert_eq!(&port.key[16..], [10, 89, 0, 2]);
        assert_eq!(egress.set, ADDRESSES_SET);
        assert_eq!(egress.family, Family::Inet);
        assert_eq!(egress.key, [10, 89, 0, 2]);
        assert!(port.comment == "hutch:sb-1" && egress.comment == "hutch:sb-1");
    }

    #[test]
    fn listed_elements_are_attributed_to_sandboxes_by_comment() {
        let listing = json!({"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"set": {"family": "bridge", "table": "hutch", "name": "sandbox_ports", "type": ["ifname", "ipv4_addr"],
                     "elem": [{"elem": {"val": {"concat": ["hv-0123456789ab", "10.89.0.2"]}, "comment": "hutch:sb-1"}},
                              {"concat": ["hv-uncommented", "10.89.0.9"]}]}},
            {"set": {"family": "inet", "table": "hutch", "name": "sandbox_addrs", "type": "ipv4_addr",
                     "elem": [{"elem": {"val": "10.89.0.3", "comment": "hutch:sb-2"}}]}},
            {"set": {"family": "inet", "table": "other", "name": "sandbox_addrs", "type": "ipv4_addr",
                     "elem": [{"elem": {"val": "10.89.0.4", "comment": "hutch:sb-3"}}]}},
            {"set": {"family": "inet", "table": "hutch", "name": "unrelated", "type": "ipv4_addr",
                     "elem": [{"elem": {"val": "10.89.0.5", "comment": "hutch:sb-4"}}]}},
        ]});
        let found = sandbox_elements_in_listing(&listing, "hutch");
        let [port, _] =
            sandbox_elements("hutch", "sb-1", "hv-0123456789ab", Ipv4Addr::new(10, 89, 0, 2));
        let [_, egress] = sandbox_elements("hutch", "sb-2", "hv-x", Ipv4Addr::new(10, 89, 0, 3));
        assert_eq!(found, [("sb-1".to_owned(), port), ("sb-2".to_owned(), egress)]);
    }
}
