//! nftables rule generation (pure) and the reading of listed rulesets.
//!
//! Two tables carry the policy, both named after `NetConfig::nft_table`:
//!
//! * `bridge <table>` sees every frame a sandbox sends into the bridge. Its
//!   `prerouting` chain sends frames from sandbox ports (`hv-*`) to the `ports`
//!   chain, which holds one anti-spoofing pair of rules per sandbox (IPv4 and ARP
//!   from that port must carry the sandbox's own address), and drops everything
//!   else from sandbox ports: IPv6, other ethertypes, and spoofed sources. This is
//!   what makes the source address in the `inet` table trustworthy.
//! * `inet <table>` sees routed traffic. `input` drops every new connection from
//!   the bridge to the host itself, whatever host address it targets; `forward`
//!   lets nothing in towards sandboxes but replies, drops the blocked ranges
//!   (link-local and metadata by default), then sends traffic from the bridge to
//!   the `egress` chain, which accepts one sandbox address per rule, and drops
//!   the rest. `postrouting` masquerades the subnet on its way out.
//!
//! Base chains are flushed and rewritten by `NetManager::new` in one transaction;
//! the regular chains `ports` and `egress` hold only per-sandbox rules, each with
//! the comment `hutch:<sandbox id>`, and survive a restart of the manager.

use std::borrow::Cow;
use std::net::Ipv4Addr;

use nftables::batch::Batch;
use nftables::expr::{
    CT, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix,
};
use nftables::schema::{Chain, FlushObject, NfCmd, NfListObject, Nftables, Rule, Table};
use nftables::stmt::{JumpTarget, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use crate::ipnet::Ipv4Net;
use crate::naming::{VETH_PREFIX, rule_comment, sandbox_id_from_comment};

const INPUT: &str = "input";
const FORWARD: &str = "forward";
const EGRESS: &str = "egress";
const POSTROUTING: &str = "postrouting";
const PREROUTING: &str = "prerouting";
const PORTS: &str = "ports";

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

/// One per-sandbox rule found in a listed ruleset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SandboxRule {
    pub sandbox_id: String,
    pub family: NfFamily,
    pub chain: String,
    pub handle: u32,
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

fn jump(target: &str) -> Statement<'static> {
    Statement::Jump(JumpTarget { target: target.to_owned().into() })
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

/// The whole static policy: tables and chains are added (a no-op when they
/// exist), base chains are flushed and refilled, per-sandbox chains are kept.
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
    batch.add(NfListObject::Chain(regular_chain(NfFamily::Bridge, t, PORTS)));
    batch.add_cmd(NfCmd::Flush(FlushObject::Chain(prerouting)));
    let bridge_rules = [
        vec![eq(meta(MetaKey::Iifname), ports()), jump(PORTS)],
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
    batch.add(NfListObject::Chain(regular_chain(NfFamily::INet, t, EGRESS)));
    for chain in [input, forward, postrouting] {
        batch.add_cmd(NfCmd::Flush(FlushObject::Chain(chain)));
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
    forward_rules.push(vec![iif_bridge(), jump(EGRESS)]);
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

/// The rules that let one sandbox's traffic through: its port may only send its
/// own address (IPv4 and ARP), and that address may leave through `forward`.
pub(crate) fn sandbox_rules(
    policy: &Policy<'_>,
    sandbox_id: &str,
    veth: &str,
    address: Ipv4Addr,
) -> Nftables<'static> {
    let t = policy.table;
    let comment = || Some(rule_comment(sandbox_id));
    let port = || eq(meta(MetaKey::Iifname), string(veth));
    let mut batch = Batch::new();
    batch.add(NfListObject::Rule(rule(
        NfFamily::Bridge,
        t,
        PORTS,
        vec![port(), eq(payload("ip", "saddr"), string(address.to_string())), accept()],
        comment(),
    )));
    batch.add(NfListObject::Rule(rule(
        NfFamily::Bridge,
        t,
        PORTS,
        vec![port(), eq(payload("arp", "saddr ip"), string(address.to_string())), accept()],
        comment(),
    )));
    batch.add(NfListObject::Rule(rule(
        NfFamily::INet,
        t,
        EGRESS,
        vec![eq(payload("ip", "saddr"), string(address.to_string())), accept()],
        comment(),
    )));
    batch.to_nftables()
}

/// Deletes the given rules, by handle.
pub(crate) fn delete_rules(table_name: &str, rules: &[SandboxRule]) -> Nftables<'static> {
    let mut batch = Batch::new();
    for found in rules {
        batch.delete(NfListObject::Rule(Rule {
            handle: Some(found.handle),
            ..rule(found.family, table_name, &found.chain, Vec::new(), None)
        }));
    }
    batch.to_nftables()
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

/// Per-sandbox rules of our tables in the output of `nft -j list ruleset`, or
/// in nft's echo of an applied batch.
///
/// The listing is read as plain JSON rather than the typed schema because the
/// host's other tables may hold expressions the schema does not know.
pub(crate) fn sandbox_rules_in_listing(
    listing: &serde_json::Value,
    table_name: &str,
) -> Vec<SandboxRule> {
    let Some(objects) = listing.get("nftables").and_then(|v| v.as_array()) else {
        return Vec::new();
    };
    objects
        .iter()
        // A listing holds `{"rule": ..}`, the echo of an applied batch `{"add": {"rule": ..}}`.
        .filter_map(|object| {
            object.get("rule").or_else(|| object.get("add").and_then(|add| add.get("rule")))
        })
        .filter_map(|rule| {
            let family = match rule.get("family")?.as_str()? {
                "bridge" => NfFamily::Bridge,
                "inet" => NfFamily::INet,
                _ => return None,
            };
            if rule.get("table")?.as_str()? != table_name {
                return None;
            }
            let sandbox_id = sandbox_id_from_comment(rule.get("comment")?.as_str()?)?;
            Some(SandboxRule {
                sandbox_id: sandbox_id.to_owned(),
                family,
                chain: rule.get("chain")?.as_str()?.to_owned(),
                handle: u32::try_from(rule.get("handle")?.as_u64()?).ok()?,
            })
        })
        .collect()
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
        // Base chains are flushed, per-sandbox chains are not.
        let flushed: Vec<_> = json["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o.get("flush"))
            .map(|f| f["chain"]["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(flushed, ["prerouting", "input", "forward", "postrouting"]);
    }

    #[test]
    fn sandbox_rules_carry_the_sandbox_id_and_its_address() {
        let (subnet, blocked) = policy();
        let json = to_json(&sandbox_rules(
            &Policy { table: "hutch", bridge: "hutch0", subnet, blocked_destinations: &blocked },
            "sb-1",
            "hv-0123456789ab",
            Ipv4Addr::new(10, 89, 0, 2),
        ));
        let rules = json["nftables"].as_array().unwrap();
        assert_eq!(rules.len(), 3);
        for rule in rules {
            assert_eq!(rule["add"]["rule"]["comment"], "hutch:sb-1");
            assert!(rule.to_string().contains("10.89.0.2"));
        }
    }

    #[test]
    fn listed_rules_are_attributed_to_sandboxes_by_comment() {
        let listing = json!({"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "hutch", "handle": 1}},
            {"table": {"family": "ip", "name": "other", "handle": 2}},
            {"rule": {"family": "inet", "table": "hutch", "chain": "egress", "handle": 7, "comment": "hutch:sb-1", "expr": []}},
            {"rule": {"family": "bridge", "table": "hutch", "chain": "ports", "handle": 9, "comment": "hutch:sb-2", "expr": []}},
            {"rule": {"family": "inet", "table": "hutch", "chain": "forward", "handle": 3, "expr": []}},
            {"rule": {"family": "ip", "table": "other", "chain": "x", "handle": 4, "comment": "hutch:sb-1", "expr": [{"xt": null}]}},
            {"add": {"rule": {"family": "inet", "table": "hutch", "chain": "egress", "handle": 11, "comment": "hutch:sb-3", "expr": []}}},
        ]});
        assert_eq!(
            sandbox_rules_in_listing(&listing, "hutch"),
            vec![
                SandboxRule {
                    sandbox_id: "sb-1".into(),
                    family: NfFamily::INet,
                    chain: "egress".into(),
                    handle: 7
                },
                SandboxRule {
                    sandbox_id: "sb-2".into(),
                    family: NfFamily::Bridge,
                    chain: "ports".into(),
                    handle: 9
                },
                SandboxRule {
                    sandbox_id: "sb-3".into(),
                    family: NfFamily::INet,
                    chain: "egress".into(),
                    handle: 11
                },
            ]
        );
    }
}
