//! Names of host objects that belong to a sandbox: its veth and its nft rule comments.
//!
//! Everything on the host is named after the sandbox id so that a sweep can tell
//! whose an object is without any other state.

use sha2::{Digest, Sha256};

/// Prefix of every host-side veth; the bridge rules match ports by it.
pub const VETH_PREFIX: &str = "hv-";
/// Prefix of the comment on every per-sandbox nft rule.
pub const COMMENT_PREFIX: &str = "hutch:";
/// Name of the sandbox-side end of the veth pair.
pub const SANDBOX_IFNAME: &str = "eth0";
/// nft truncates comments at 128 bytes; the id must fit behind the prefix.
pub const MAX_SANDBOX_ID_LEN: usize = 128 - COMMENT_PREFIX.len() - 1;

/// Why a sandbox id cannot name host objects.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "sandbox id {id:?} must be 1 to {MAX_SANDBOX_ID_LEN} characters of [A-Za-z0-9_.-] and not start with '.'"
)]
pub struct InvalidSandboxIdError {
    pub id: String,
}

/// Checks that `id` is safe as a file name (the lease) and inside an nft comment.
pub fn validate_sandbox_id(id: &str) -> Result<(), InvalidSandboxIdError> {
    let valid = !id.is_empty()
        && id.len() <= MAX_SANDBOX_ID_LEN
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if valid { Ok(()) } else { Err(InvalidSandboxIdError { id: id.to_owned() }) }
}

/// The host-side veth name of a sandbox: `hv-` and 12 hex digits of the id's
/// SHA-256, 15 bytes, the most a Linux interface name can hold (IFNAMSIZ - 1).
pub fn veth_name(sandbox_id: &str) -> String {
    format!("{VETH_PREFIX}{}", hex12(sandbox_id))
}

/// The MAC address that goes with an IPv4 address on the bridge: locally
/// administered, unicast, the address's four bytes at the end.
///
/// Deriving it from the address means a reused address comes back with the
/// same MAC, so neighbour entries cached for an earlier holder (by the host,
/// or by sandboxes for the gateway) are never stale.
pub fn mac_for(address: std::net::Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = address.octets();
    [0x02, 0x48, a, b, c, d]
}

fn hex12(input: &str) -> String {
    Sha256::digest(input.as_bytes())[..6].iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The comment carried by every nft rule that belongs to `sandbox_id`.
pub fn rule_comment(sandbox_id: &str) -> String {
    format!("{COMMENT_PREFIX}{sandbox_id}")
}

/// The sandbox id named by a rule comment, if the rule is a per-sandbox rule.
pub fn sandbox_id_from_comment(comment: &str) -> Option<&str> {
    comment.strip_prefix(COMMENT_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_fit_ifnamsiz_and_are_stable_per_id() {
        let name = veth_name("sb-0123456789abcdef0123456789abcdef");
        assert_eq!(name.len(), 15);
        assert!(name.starts_with(VETH_PREFIX));
        assert_eq!(name, veth_name("sb-0123456789abcdef0123456789abcdef"));
        assert_ne!(veth_name("a"), veth_name("b"));
    }

    #[test]
    fn macs_are_local_unicast_and_follow_the_address() {
        let mac = mac_for(std::net::Ipv4Addr::new(10, 89, 1, 2));
        assert_eq!(mac, [0x02, 0x48, 10, 89, 1, 2]);
        assert_eq!(mac[0] & 0x01, 0, "unicast");
        assert_eq!(mac[0] & 0x02, 0x02, "locally administered");
    }

    #[test]
    fn comments_round_trip_to_the_sandbox_id() {
        assert_eq!(sandbox_id_from_comment(&rule_comment("sb-1")), Some("sb-1"));
        assert_eq!(sandbox_id_from_comment("something else"), None);
    }

    #[test]
    fn ids_that_could_escape_a_path_or_a_comment_are_rejected() {
        for bad in ["", ".", "..", "../x", "a/b", "a b", "a\"b", "\u{e9}"] {
            assert!(validate_sandbox_id(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_sandbox_id(&"x".repeat(MAX_SANDBOX_ID_LEN + 1)).is_err());
        for good in ["sb-1", "A_b.c-9", &"x".repeat(MAX_SANDBOX_ID_LEN)] {
            assert!(validate_sandbox_id(good).is_ok(), "{good:?} rejected");
        }
    }
}
