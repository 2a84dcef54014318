//! A small IPv4 network type: the sandbox subnet and blocked destination ranges.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network, `address/prefix_len`, always stored with its host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Net {
    network: Ipv4Addr,
    prefix_len: u8,
}

/// Why a string or an address/prefix pair is not an IPv4 network.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseIpv4NetError {
    #[error("ipv4 network {input:?} is not of the form a.b.c.d/len")]
    Syntax { input: String },
    #[error("prefix length {prefix_len} is longer than 32")]
    PrefixTooLong { prefix_len: u8 },
}

impl Ipv4Net {
    /// Builds the network containing `address`; host bits are cleared.
    pub fn new(address: Ipv4Addr, prefix_len: u8) -> Result<Self, ParseIpv4NetError> {
        if prefix_len > 32 {
            return Err(ParseIpv4NetError::PrefixTooLong { prefix_len });
        }
        let network = Ipv4Addr::from(u32::from(address) & mask(prefix_len));
        Ok(Ipv4Net { network, prefix_len })
    }

    /// For constants: `prefix_len` must be at most 32 (larger is clamped).
    pub(crate) const fn new_const(address: Ipv4Addr, prefix_len: u8) -> Self {
        let prefix_len = if prefix_len > 32 { 32 } else { prefix_len };
        Ipv4Net { network: Ipv4Addr::from_bits(address.to_bits() & mask(prefix_len)), prefix_len }
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !mask(self.prefix_len))
    }

    pub fn contains(&self, address: Ipv4Addr) -> bool {
        u32::from(address) & mask(self.prefix_len) == u32::from(self.network)
    }

    /// The first host address, which the bridge carries as the sandboxes' gateway.
    /// `None` for networks too small to hold a gateway and one sandbox (/31, /32).
    pub fn gateway(&self) -> Option<Ipv4Addr> {
        (self.prefix_len <= 30).then(|| Ipv4Addr::from(u32::from(self.network) + 1))
    }

    /// Addresses that can be leased to sandboxes: every host address except the
    /// gateway, in ascending order.
    pub fn sandbox_addresses(&self) -> impl Iterator<Item = Ipv4Addr> + use<> {
        let (first, last) = if self.prefix_len <= 30 {
            (u32::from(self.network) + 2, u32::from(self.broadcast()) - 1)
        } else {
            // An empty range: /31 and /32 have no room for a gateway and a sandbox.
            (1, 0)
        };
        (first..=last).map(Ipv4Addr::from)
    }
}

const fn mask(prefix_len: u8) -> u32 {
    match prefix_len {
        0 => 0,
        n if n >= 32 => u32::MAX,
        n => u32::MAX << (32 - n as u32),
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Ipv4Net {
    type Err = ParseIpv4NetError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let syntax = || ParseIpv4NetError::Syntax { input: input.to_owned() };
        let (address, prefix_len) = input.split_once('/').ok_or_else(syntax)?;
        let address: Ipv4Addr = address.parse().map_err(|_| syntax())?;
        let prefix_len: u8 = prefix_len.parse().map_err(|_| syntax())?;
        Ipv4Net::new(address, prefix_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing_clears_host_bits_and_round_trips() {
        let net: Ipv4Net = "10.89.3.7/16".parse().unwrap();
        assert_eq!(net.network(), Ipv4Addr::new(10, 89, 0, 0));
        assert_eq!(net.to_string(), "10.89.0.0/16");
        assert_eq!(net.broadcast(), Ipv4Addr::new(10, 89, 255, 255));
        assert_eq!(net.gateway(), Some(Ipv4Addr::new(10, 89, 0, 1)));
    }

    #[test]
    fn malformed_networks_are_rejected() {
        assert!(matches!("10.0.0.0".parse::<Ipv4Net>(), Err(ParseIpv4NetError::Syntax { .. })));
        assert!(matches!(
            "10.0.0.0/33".parse::<Ipv4Net>(),
            Err(ParseIpv4NetError::PrefixTooLong { prefix_len: 33 })
        ));
        assert!("10.0.0.300/8".parse::<Ipv4Net>().is_err());
    }

    #[test]
    fn sandbox_addresses_skip_network_gateway_and_broadcast() {
        let net: Ipv4Net = "192.168.7.0/29".parse().unwrap();
        let addresses: Vec<_> = net.sandbox_addresses().collect();
        assert_eq!(
            addresses,
            (2..=6).map(|host| Ipv4Addr::new(192, 168, 7, host)).collect::<Vec<_>>()
        );
        assert!(net.contains(Ipv4Addr::new(192, 168, 7, 7)));
        assert!(!net.contains(Ipv4Addr::new(192, 168, 7, 8)));
        let tiny: Ipv4Net = "192.168.7.0/31".parse().unwrap();
        assert_eq!(tiny.sandbox_addresses().count(), 0);
        assert_eq!(tiny.gateway(), None);
    }
}
